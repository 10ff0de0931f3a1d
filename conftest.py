"""pytest wiring for tdx-harness: options (with TDXH_* environment fallbacks), the images a
session boots (built once), and fixtures that start a machine with the software module attached,
wait until it is ready, and always stop it: ``boot`` (QEMU), ``bochs_boot`` (Bochs), and
``vmx_boot`` for scenarios that need VMX in the guest (QEMU with KVM where the host offers nested
VMX, else Bochs, else a skip saying why)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from harness import paths
from harness.coverage.collect import ScenarioCoverage
from harness.coverage.objects import COVERAGE_ENV, CoverageBuildError
from harness.coverage.report import (
    BLIND_SPOTS,
    HTML,
    LCOV,
    LINES_BY_SCENARIO,
    SUMMARY,
    ReportError,
    summary_text,
    write_report,
)
from harness.images.iso import HOST_PACKAGES as ISO_PACKAGES
from harness.images.iso import IsoError, check_host
from harness.launch import (
    Images,
    SavedMachine,
    image_options_problem,
    prepare_images,
    save_machine,
    start_machine,
)
from harness.machine.base import Machine
from harness.machine.bochs import BOOT_TIMEOUT as BOCHS_BOOT_TIMEOUT
from harness.machine.bochs import TD_MIN_IPS, BochsConfig, BochsMachine, start_bochs_machine
from harness.machine.bochs_install import BochsInstall, BochsUnavailable, fetch_bochs
from harness.machine.qemu import QemuConfig, QemuMachine, nested_vmx_available
from harness.repro import BUNDLE_NAME, write_bundle
from harness.seam.faults import FaultPlan
from harness.seam.platform import PlatformConfig
from harness.seam.profiles import DEFAULT_PROFILE, PROFILE_ENV, PROFILES, default_profile

BOOT_TIMEOUT = 300.0  # TCG on a loaded 2-core host; a healthy boot takes seconds
WORKER_MEMORY = 4 << 30  # a worker's guest (up to 2 GiB touched under TCG) and its module's memory
EMULATED_VMX_GROUP = "emulated-vmx"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tdx-harness")
    group.addoption("--kernel", type=Path, default=os.environ.get("TDXH_KERNEL"),
                    help="boot this prebuilt bzImage [TDXH_KERNEL]")
    group.addoption("--initramfs", type=Path, default=os.environ.get("TDXH_INITRAMFS"),
                    help="with --kernel: boot this initramfs instead of building one (tdxh repro) [TDXH_INITRAMFS]")
    group.addoption("--kernel-tree", type=Path, default=os.environ.get("TDXH_KERNEL_TREE"),
                    help="build and boot this kernel tree [TDXH_KERNEL_TREE]")
    group.addoption("--backend", default=os.environ.get("TDXH_BACKEND", "qemu"), choices=["qemu"],
                    help="machine backend [TDXH_BACKEND]")
    group.addoption("--target", default=os.environ.get("TDXH_TARGET"),
                    help="ssh://user@host[:port] of a real TDX host for tests/target (observation only) [TDXH_TARGET]")
    group.addoption("--target-key", type=Path, default=os.environ.get("TDXH_TARGET_KEY"),
                    help="private key for --target (default: the SSH agent and ~/.ssh) [TDXH_TARGET_KEY]")
    group.addoption("--artifacts", type=Path, default=Path(os.environ.get("TDXH_ARTIFACTS", "artifacts")),
                    help="where each scenario's logs and trace go [TDXH_ARTIFACTS]")
    group.addoption("--keep-artifacts", action="store_true", default=bool(os.environ.get("TDXH_KEEP_ARTIFACTS")),
                    help="keep logs of passing scenarios too [TDXH_KEEP_ARTIFACTS]")
    group.addoption("--module-profile", default=default_profile(), choices=sorted(PROFILES),
                    help=f"the TDX module release the software module follows (harness/seam/profiles.py; default "
                         f"{DEFAULT_PROFILE}) [{PROFILE_ENV}]")
    group.addoption("--coverage", type=Path, default=os.environ.get(COVERAGE_ENV), metavar="DIR",
                    help="boot the coverage kernel (gcov in the TDX host objects), copy each scenario's counters "
                         "into DIR and write the report there at the end [TDXH_COVERAGE]")
    group.addoption("--coverage-no-report", action="store_true",
                    help="with --coverage: collect the counters only (tdxh coverage DIR reports)")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (the default, see pyproject.toml): one worker per CPU, as many as memory holds."""
    cpus = len(os.sched_getaffinity(0))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(cpus, memory // WORKER_MEMORY))


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The Bochs scenarios (single-threaded emulator, the suite's longest tests) form one xdist
    group: xdist schedules the largest group first, so one worker runs them back to back from
    the start while the others take the QEMU scenarios, instead of leaving them for the tail."""
    vmx_on_bochs = not nested_vmx_available()  # vmx_boot's choice: read /sys once, not per test
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "bochs_boot" in names or ("vmx_boot" in names and vmx_on_bochs):
            item.add_marker(pytest.mark.xdist_group(EMULATED_VMX_GROUP))


@pytest.fixture(scope="session")
def images(request: pytest.FixtureRequest) -> Images:
    """Kernel and initramfs for this session (the default build is cached across sessions)."""
    opt = request.config.getoption
    kernel, tree, initramfs = opt("--kernel"), opt("--kernel-tree"), opt("--initramfs")
    problem = image_options_problem(kernel, tree, initramfs)
    if problem:
        raise pytest.UsageError(problem)
    coverage = opt("--coverage")
    try:
        found = prepare_images(paths.cache_dir(), kernel=kernel, kernel_tree=tree, initramfs=initramfs,
                               coverage=coverage is not None)
        if found.coverage is not None:
            found.coverage.claim(coverage)
    except CoverageBuildError as err:
        raise pytest.UsageError(str(err)) from err
    request.config.stash[_IMAGES] = found
    return found


@pytest.fixture
def scenario_coverage(request: pytest.FixtureRequest, images: Images) -> ScenarioCoverage | None:
    """With --coverage: the collector of this scenario's counters (machines attach to it)."""
    if images.coverage is None:
        return None
    root = request.config.getoption("--coverage").resolve()
    nodeid = request.node.nodeid
    return ScenarioCoverage(root, paths.artifact_name(nodeid), images.coverage, label=nodeid)


def _retire(machine: Machine, coverage: ScenarioCoverage | None) -> None:
    """A machine's end: its counters first (while its kernel answers), then stop it."""
    try:
        if coverage is not None:
            coverage.finish(machine)
    finally:
        machine.stop()


@pytest.fixture
def retire_machine(scenario_coverage: ScenarioCoverage | None) -> Callable[[Machine], None]:
    """``retire_machine(machine)``: end one machine in the middle of a scenario as the scenario's
    end would, so one that replaces its machine keeps the old one's counters."""
    return lambda machine: _retire(machine, scenario_coverage)


def _stop_all(machines: Sequence[Machine], coverage: ScenarioCoverage | None, node: pytest.Item) -> None:
    """The scenario's end: each machine retired (counters, then stop); then what went wrong
    between shim and module that the scenario did not declare fails it."""
    for machine in machines:
        _retire(machine, coverage)
    declared = [re.compile(text) for marker in node.iter_markers("module_anomalies") for text in marker.args]
    for machine in machines:
        module = getattr(machine, "module", None)
        if module is None:
            continue
        anomalies = module.anomalies  # the first reports, and the last one of those not kept
        seen = [*anomalies, *([anomalies.last] if anomalies.dropped and anomalies.last is not None else [])]
        surprises = [a for a in seen if not any(p.search(a) for p in declared)]
        more = f"\n  ({anomalies.dropped} more were counted, not kept)" if anomalies.dropped else ""
        assert not surprises, (f"{machine.run_dir}: the module or its server saw trouble the scenario does not "
                               "declare (@pytest.mark.module_anomalies(pattern)):\n  " + "\n  ".join(surprises) + more)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """With --coverage: merge every scenario's counters into the report (the controller of a
    parallel run does it once, after its workers)."""
    config = session.config
    root = config.getoption("--coverage")
    if root is None or config.getoption("--coverage-no-report") or hasattr(config, "workerinput"):
        return
    if not (root / "raw").is_dir():
        return  # no scenario booted (e.g. only unit tests were selected)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    try:
        write_report(root)
        text = summary_text(root)
    except (ReportError, CoverageBuildError) as err:
        text = f"coverage: no report: {err}"
    if reporter is not None:
        reporter.write("\n")  # the progress line may still be open
        reporter.write_sep("=", "TDX host code coverage")
        reporter.write_line(text)
        reporter.write_line(f"report: {root / HTML} (also {root / SUMMARY}, {LCOV}, {LINES_BY_SCENARIO}, "
                            f"{BLIND_SPOTS})")


_IMAGES = pytest.StashKey[Images]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    found = item.config.stash.get(_IMAGES, None)
    if call.when == "call" and found is not None and "images" in getattr(item, "fixturenames", ()):
        # The kernel each scenario booted, as a property of its JUnit test case (also from xdist
        # workers, whose reports carry user_properties to the controller's XML).
        item.user_properties.append(("kernel", found.identity))
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    if report.failed and report.when in ("setup", "call"):
        item.stash[_FAILURE] = report.longreprtext


_FAILED = pytest.StashKey[bool]()
_FAILURE = pytest.StashKey[str]()


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Iterator[Path]:
    """This test's run directory; removed after a pass unless --keep-artifacts."""
    path = request.config.getoption("--artifacts").resolve() / paths.artifact_name(request.node.nodeid)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    yield path  # the machines are stopped by now (their fixtures depend on this one)
    failure = request.node.stash.get(_FAILURE, None)
    images = request.config.stash.get(_IMAGES, None)
    if failure is not None and images is not None and "images" in request.fixturenames:
        bundle = write_bundle(path / BUNDLE_NAME, request.node.nodeid, failure, images.kernel, images.initrd,
                              images.identity, path)
        print(f"\nreproducer bundle: {bundle} (re-run it with `tdxh repro {bundle}`)")
    if not request.node.stash.get(_FAILED, True) and not request.config.getoption("--keep-artifacts"):
        shutil.rmtree(path, ignore_errors=True)


BootFactory = Callable[..., QemuMachine]


PlatformFactory = Callable[..., PlatformConfig]


@pytest.fixture(scope="session")
def platform_config(request: pytest.FixtureRequest) -> PlatformFactory:
    """``platform_config(**changes)``: the platform of the session's module release
    (--module-profile) with ``changes``; the boot fixtures use it when given no platform."""
    name = request.config.getoption("--module-profile")

    def make(**changes: object) -> PlatformConfig:
        return PlatformConfig.for_profile(name, **changes)

    return make


@pytest.fixture(scope="session")
def saved_machines() -> dict[str, SavedMachine]:
    """Ready machines saved this session (``boot(..., reuse=True)``), by configuration."""
    return {}


@pytest.fixture
def boot(request: pytest.FixtureRequest, images: Images, artifacts: Path, saved_machines: dict[str, SavedMachine],
         tmp_path_factory: pytest.TempPathFactory, scenario_coverage: ScenarioCoverage | None,
         platform_config: PlatformFactory) -> Iterator[BootFactory]:
    """``boot(config=QemuConfig(), platform=None, faults=None, append="", ready=True, reuse=False)``:
    a started machine, ready for commands unless ready=False; every machine is stopped at
    teardown. ``reuse``: resume a saved machine of the same configuration (the boot's console is
    then console.boot.log, the module's trace and state carry on from the saved boot)."""
    machines: list[QemuMachine] = []
    saves = tmp_path_factory.getbasetemp() / "saved-machines"
    saves.mkdir(exist_ok=True)

    def start(config: QemuConfig | None = None, platform: PlatformConfig | None = None,
              faults: FaultPlan | None = None, append: str = "", ready: bool = True,
              serve_module: bool = True, reuse: bool = False) -> QemuMachine:
        config = config or QemuConfig()
        platform = platform or platform_config()
        run_dir = artifacts / f"machine{len(machines)}"
        key = repr((config, platform, append))  # the platform holds lists: not hashable
        # reuse: resume the machine an earlier scenario of this session booted with the same
        # configuration (saved when it was ready) instead of booting; only without a fault plan.
        reusable = reuse and ready and serve_module and faults is None
        saved = saved_machines.get(key) if reusable else None
        machine = start_machine(images, config, run_dir, platform=platform, faults=faults, append=append,
                                serve_module=serve_module, saved=saved)
        machines.append(machine)
        if scenario_coverage is not None:
            scenario_coverage.attach(machine, run_dir.name)
        if saved is not None:
            machine.resume_saved(BOOT_TIMEOUT)
        elif ready:
            machine.wait_ready(BOOT_TIMEOUT)
            if reusable:
                saved_machines[key] = save_machine(machine, saves / f"{len(saved_machines)}.vmstate")
        return machine

    yield start
    _stop_all(machines, scenario_coverage, request.node)


@pytest.fixture(scope="session")
def bochs_install() -> BochsInstall:
    """Bochs 3.0 from trixie, fetched once into the cache; the test is skipped if that fails."""
    try:
        check_host()
        return fetch_bochs(paths.cache_dir())
    except BochsUnavailable as err:
        pytest.skip(f"Bochs is not available: {err}")
    except IsoError as err:
        pytest.skip(f"cannot build a Bochs boot image ({' '.join(ISO_PACKAGES)}): {err}")


BochsBoot = Callable[..., BochsMachine]


@pytest.fixture
def bochs_boot(request: pytest.FixtureRequest, images: Images, artifacts: Path, bochs_install: BochsInstall,
               scenario_coverage: ScenarioCoverage | None, platform_config: PlatformFactory) -> Iterator[BochsBoot]:
    """``bochs_boot(config=BochsConfig(), platform=None, faults=None, append="", ready=True)``:
    a started Bochs machine, ready for commands unless ready=False; stopped at teardown."""
    machines: list[BochsMachine] = []

    def start(config: BochsConfig | None = None, platform: PlatformConfig | None = None,
              faults: FaultPlan | None = None, append: str = "", ready: bool = True) -> BochsMachine:
        run_dir = artifacts / f"machine{len(machines)}"
        machine = start_bochs_machine(images, config or BochsConfig(), run_dir, platform=platform or platform_config(),
                                      faults=faults, append=append, install=bochs_install)
        machines.append(machine)
        if scenario_coverage is not None:
            scenario_coverage.attach(machine, run_dir.name)
        if ready:
            machine.wait_ready(BOCHS_BOOT_TIMEOUT)
        return machine

    yield start
    _stop_all(machines, scenario_coverage, request.node)


VmxBoot = Callable[..., Machine]


@pytest.fixture
def vmx_boot(request: pytest.FixtureRequest, images: Images, artifacts: Path) -> Iterator[VmxBoot]:
    """``vmx_boot(cpus=1, memory="1G", platform=None, faults=None, append="")``: a ready machine
    whose guest has VMX: QEMU with KVM when the host offers nested VMX, else Bochs (emulated
    VMX), else the test is skipped with the reason."""
    if nested_vmx_available():
        def start_qemu(cpus: int = 1, memory: str = "1G", platform: PlatformConfig | None = None,
                       faults: FaultPlan | None = None, append: str = "") -> Machine:
            return qemu(QemuConfig(cpus=cpus, memory=memory, accel="kvm", cpu_model="host"), platform, faults,
                        append)

        qemu = request.getfixturevalue("boot")
        yield start_qemu
        return
    bochs = request.getfixturevalue("bochs_boot")

    def start_bochs(cpus: int = 1, memory: str = "1G", platform: PlatformConfig | None = None,
                    faults: FaultPlan | None = None, append: str = "") -> Machine:
        return bochs(BochsConfig(cpus=cpus, memory=memory, ips=TD_MIN_IPS), platform, faults, append)

    yield start_bochs

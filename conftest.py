"""pytest wiring for tdx-harness: options (with TDXH_* environment fallbacks), the images a
session boots (built once), and a ``boot`` fixture that starts a machine with the software
module attached, waits until it is ready, and always stops it."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import paths
from harness.launch import Images, prepare_images, start_machine
from harness.machine.qemu import QemuConfig, QemuMachine
from harness.seam.faults import FaultPlan
from harness.seam.platform import PlatformConfig

BOOT_TIMEOUT = 300.0  # TCG on a loaded 2-core host; a healthy boot takes seconds


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tdx-harness")
    group.addoption("--kernel", type=Path, default=os.environ.get("TDXH_KERNEL"),
                    help="boot this prebuilt bzImage [TDXH_KERNEL]")
    group.addoption("--kernel-tree", type=Path, default=os.environ.get("TDXH_KERNEL_TREE"),
                    help="build and boot this kernel tree [TDXH_KERNEL_TREE]")
    group.addoption("--backend", default=os.environ.get("TDXH_BACKEND", "qemu"), choices=["qemu"],
                    help="machine backend [TDXH_BACKEND]")
    group.addoption("--artifacts", type=Path, default=Path(os.environ.get("TDXH_ARTIFACTS", "artifacts")),
                    help="where each scenario's logs and trace go [TDXH_ARTIFACTS]")
    group.addoption("--keep-artifacts", action="store_true", default=bool(os.environ.get("TDXH_KEEP_ARTIFACTS")),
                    help="keep logs of passing scenarios too [TDXH_KEEP_ARTIFACTS]")


@pytest.fixture(scope="session")
def images(request: pytest.FixtureRequest) -> Images:
    """Kernel and initramfs for this session (the default build is cached across sessions)."""
    opt = request.config.getoption
    kernel, tree = opt("--kernel"), opt("--kernel-tree")
    if kernel and tree:
        raise pytest.UsageError("--kernel and --kernel-tree are exclusive")
    found = prepare_images(paths.cache_dir(), kernel=kernel, kernel_tree=tree)
    request.config.stash[_IMAGES] = found
    return found


_IMAGES = pytest.StashKey[Images]()


def pytest_sessionfinish(session: pytest.Session) -> None:
    found = session.config.stash.get(_IMAGES, None)
    xml = getattr(session.config, "_xml", None)
    if found is not None and xml is not None:
        xml.add_global_property("kernel", found.identity)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_FAILED] = report.failed


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Iterator[Path]:
    """This test's run directory; removed after a pass unless --keep-artifacts."""
    name = re.sub(r"[^\w.-]+", "_", request.node.nodeid)
    path = request.config.getoption("--artifacts").resolve() / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    yield path
    if not request.node.stash.get(_FAILED, True) and not request.config.getoption("--keep-artifacts"):
        shutil.rmtree(path, ignore_errors=True)


BootFactory = Callable[..., QemuMachine]


@pytest.fixture
def boot(images: Images, artifacts: Path) -> Iterator[BootFactory]:
    """``boot(config=QemuConfig(), platform=None, faults=None, append="", ready=True)``: a started
    machine, ready for commands unless ready=False; every machine is stopped at teardown."""
    machines: list[QemuMachine] = []

    def start(config: QemuConfig | None = None, platform: PlatformConfig | None = None,
              faults: FaultPlan | None = None, append: str = "", ready: bool = True,
              serve_module: bool = True) -> QemuMachine:
        run_dir = artifacts / f"machine{len(machines)}"
        machine = start_machine(images, config or QemuConfig(), run_dir, platform=platform, faults=faults,
                                append=append,
                                serve_module=serve_module)
        machines.append(machine)
        if ready:
            machine.wait_ready(BOOT_TIMEOUT)
        return machine

    yield start
    for machine in machines:
        machine.stop()

"""Coverage: the guest's counter dump and its checks, the per-kernel bookkeeping, and the merge
(gcov + gcovr) checked against gcov's own output for stored samples.

tests/data/coverage holds a small C program (sample.c) compiled by Debian 12's GCC 12.2 with
--coverage (sample.gcno) and the counters of two runs: ``./sample 1 2 -3`` (ok.gcda) and
``./sample fail`` (fail.gcda); tests/data/README.md says how they were made."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.coverage import collect, report
from harness.coverage.collect import CoverageError, GcdaCopy, ScenarioCoverage, dump_command, parse_dump
from harness.coverage.objects import CoverageBuild, CoverageBuildError, noinstr_functions
from harness.machine.base import Machine, RunState
from harness.machine.shell import CommandResult

SAMPLES = Path(__file__).parent.parent / "data" / "coverage"
BUSYBOX = Path("/bin/busybox")
BUILD = Path("/build/tdx")  # the build directory the fake guest's counters name
TDX_GCDA = f"{collect.GUEST_GCOV_ROOT}{BUILD}/arch/x86/virt/vmx/tdx/tdx.gcda"
KVM_GCDA = f"{collect.GUEST_GCOV_ROOT}{BUILD}/arch/x86/kvm/vmx/tdx.gcda"


def guest_output(files: dict[str, bytes], damage: set[str] = frozenset()) -> str:
    """What the guest's dump prints for ``files``; those in ``damage`` lose a byte on the way."""
    out = []
    for path, data in files.items():
        out.append(f"{collect.MARK} {path} {len(data)} {hashlib.md5(data).hexdigest()}  -")
        text = base64.b64encode(gzip.compress(data)).decode()
        if path in damage:
            text = text[:10] + text[11:]
        out += [text[i:i + 76] for i in range(0, len(text), 76)]
    return "\n".join([*out, collect.END, ""])


class FakeGuest(Machine):
    """A machine whose shell answers the dump command from ``files``; ``damaged`` lists, per
    dump, which files lose a byte on the way."""

    emulator = "fake"

    def __init__(self, files: dict[str, bytes], damaged: list[set[str]] | None = None) -> None:
        self.files, self.damaged = files, list(damaged or [])
        self.state, self._broken, self._proc, self._console = RunState.RUNNING, None, None, None
        self.commands: list[str] = []
        self.shell_ready = True
        self.run_dir = Path("/runs/fake")

    def start(self) -> None: ...

    def stop(self) -> None:
        self.state = RunState.STOPPED

    def run(self, cmd: str, timeout: float) -> CommandResult:
        self.commands.append(cmd)
        assert re.match(r"for f in \$\(find .*?\); do", cmd), cmd
        damage = self.damaged.pop(0) if self.damaged else set()
        return CommandResult(0, guest_output(self.files, damage))


def build(tmp_path: Path) -> CoverageBuild:
    return CoverageBuild(BUILD, tmp_path / "src", "key-1")


def test_the_dump_runs_under_busybox_and_its_copies_check_out(tmp_path):
    """The guest's command, run by busybox's shell on a stand-in debugfs, prints copies whose
    length and MD5 match the files."""
    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed (the initramfs needs it too)")
    root = tmp_path / "gcov"
    files = {root / "a/tdx.gcda": bytes(range(256)) * 40, root / "b/main.gcda": b"\0" * 5000 + b"x"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    command = dump_command(root=str(root)).replace(collect.SCRATCH, str(tmp_path / "scratch"))
    result = subprocess.run([str(BUSYBOX), "sh", "-c", command], capture_output=True, text=True, timeout=60,
                            check=True)
    copies = {copy.path: copy for copy in parse_dump(result.stdout)}
    assert set(copies) == {str(p) for p in files}
    for path, data in files.items():
        assert copies[str(path)].intact and copies[str(path)].data == data


def test_a_copy_that_lost_a_byte_is_not_intact():
    data = b"counters" * 100
    (copy,) = parse_dump(guest_output({TDX_GCDA: data}, damage={TDX_GCDA}))
    assert not copy.intact
    assert GcdaCopy(TDX_GCDA, len(data), hashlib.md5(data).hexdigest(), data).intact
    assert not GcdaCopy(TDX_GCDA, len(data) + 1, hashlib.md5(data).hexdigest(), data).intact


def test_an_unfinished_dump_is_an_error():
    text = guest_output({TDX_GCDA: b"abc"}).replace(collect.END, "")
    with pytest.raises(CoverageError, match="did not finish"):
        parse_dump(text)


def test_a_damaged_copy_is_never_written(tmp_path):
    guest = FakeGuest({TDX_GCDA: b"t" * 3000}, damaged=[{TDX_GCDA}])
    coverage = ScenarioCoverage(tmp_path, "scenario", build(tmp_path))
    coverage.attach(guest, "machine0")
    coverage.finish(guest)
    assert not list(tmp_path.rglob("*.gcda"))
    (kernel,) = json.loads((tmp_path / "raw/scenario/events.json").read_text())["machines"][0]["kernels"]
    assert kernel["snapshots"] == [] and "damaged" in kernel["blind"][0]


def test_counters_of_another_build_are_refused():
    guest = FakeGuest({"/sys/kernel/debug/gcov/elsewhere/arch/x86/virt/vmx/tdx/tdx.gcda": b"x"})
    with pytest.raises(CoverageError, match="built elsewhere"):
        collect.read_counters(guest, build(Path("/nonexistent")))


def test_each_kernel_keeps_its_last_snapshot_and_names_what_died_with_it(tmp_path):
    guest = FakeGuest({TDX_GCDA: b"first kernel"})
    coverage = ScenarioCoverage(tmp_path, "scenario", build(tmp_path))
    coverage.attach(guest, "machine0")
    guest.kernel_ending("kexec")
    assert not guest.shell_ready  # the next kernel's wait_ready sets it
    guest.files[TDX_GCDA], guest.shell_ready = b"second kernel", True
    coverage.finish(guest)
    raw = tmp_path / "raw/scenario/machine0"
    assert (raw / "k0/arch/x86/virt/vmx/tdx/tdx.gcda").read_bytes() == b"first kernel"
    assert (raw / "k1/arch/x86/virt/vmx/tdx/tdx.gcda").read_bytes() == b"second kernel"
    k0, k1 = json.loads((tmp_path / "raw/scenario/events.json").read_text())["machines"][0]["kernels"]
    assert (k0["ended_by"], k1["ended_by"]) == ("kexec", "end of scenario")
    assert "kexec path" in k0["blind"][0] and k1["blind"] == []


def test_a_kernel_that_died_unseen_is_a_blind_spot(tmp_path):
    guest = FakeGuest({TDX_GCDA: b"x"})
    coverage = ScenarioCoverage(tmp_path, "scenario", build(tmp_path))
    coverage.attach(guest, "machine0")
    guest.state = RunState.STOPPED  # a panic ended the emulator
    coverage.finish(guest)
    assert guest.commands == []
    (kernel,) = json.loads((tmp_path / "raw/scenario/events.json").read_text())["machines"][0]["kernels"]
    assert "the whole kernel" in kernel["blind"][0]


def test_noinstr_definitions_are_found():
    source = ("noinstr u64 tdh_vp_enter(struct tdx_vp *td, struct tdx_module_args *args)\n{\n}\n"
              "static noinstr void tdx_vcpu_enter_exit(struct kvm_vcpu *vcpu)\n{\n}\n"
              "\t * page_to_phys() does not work in 'noinstr' code, like guest\n"
              "static void plain(void)\n{\n}\n")
    assert noinstr_functions(source) == ["tdh_vp_enter", "tdx_vcpu_enter_exit"]


def test_a_directory_of_another_build_is_refused(tmp_path):
    CoverageBuild(BUILD, tmp_path, "key-1").claim(tmp_path)
    CoverageBuild(BUILD, tmp_path, "key-1").claim(tmp_path)  # the same build: fine
    with pytest.raises(CoverageBuildError, match="another kernel build"):
        CoverageBuild(BUILD, tmp_path, "key-2").claim(tmp_path)


def test_a_prebuilt_kernel_outside_its_build_directory_is_refused(tmp_path):
    with pytest.raises(CoverageBuildError, match="in its build directory"):
        CoverageBuild.for_kernel(tmp_path / "bzImage")


# The merge, against gcov's own figures for the stored samples.

def _gcov_files(tmp_path: Path, gcda: Path) -> dict:
    """gcov's JSON (intermediate format) for sample.c with these counters."""
    work = tmp_path / f"gcov-{gcda.stem}"
    work.mkdir()
    shutil.copy(SAMPLES / "sample.gcno", work / "sample.gcno")
    shutil.copy(gcda, work / "sample.gcda")
    command = ["gcov", "--branch-probabilities", "--json-format", "--stdout", "sample.gcda"]
    out = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=60, check=True).stdout
    (entry,) = [f for f in json.loads(out)["files"] if f["file"].endswith("sample.c")]
    return entry


@pytest.fixture
def sample_report(tmp_path):
    """DIR for two scenarios: "ok" (one kernel: ok.gcda) and "fail" (two kernels: fail.gcda, then ok.gcda)."""
    version = subprocess.run(["gcov", "--version"], capture_output=True, text=True, check=False).stdout
    if "12.2" not in version.splitlines()[0]:
        pytest.skip(f"the samples are GCC 12.2 notes; this gcov is {version.splitlines()[0]!r}")
    root = tmp_path / "cov"
    (tmp_path / "build").mkdir()
    shutil.copy(SAMPLES / "sample.gcno", tmp_path / "build")
    shutil.copy(SAMPLES / "sample.c", tmp_path / "sample.c")  # the notes name it ../sample.c
    for scenario, kernels in {"ok": ["ok"], "fail": ["fail", "ok"]}.items():
        for index, run in enumerate(kernels):
            target = root / "raw" / scenario / "machine0" / f"k{index}" / "sample.gcda"
            target.parent.mkdir(parents=True)
            shutil.copy(SAMPLES / f"{run}.gcda", target)
    CoverageBuild(tmp_path / "build", tmp_path, "sample").save(root)
    return root, report.write_report(root, sources=["sample.c"])


def test_the_merged_summary_agrees_with_gcov(tmp_path, sample_report):
    root, written = sample_report
    runs = [_gcov_files(tmp_path, SAMPLES / f"{name}.gcda") for name in ("ok", "fail")]
    lines = {line["line_number"] for line in runs[0]["lines"]}
    covered = {line["line_number"] for run in runs for line in run["lines"] if line["count"]}
    branches = {(line["line_number"], i) for line in runs[0]["lines"] for i, _ in enumerate(line["branches"])}
    branches_covered = {(line["line_number"], i) for run in runs for line in run["lines"]
                        for i, branch in enumerate(line["branches"]) if branch["count"]}
    functions = {f["name"] for f in runs[0]["functions"]}
    functions_covered = {f["name"] for run in runs for f in run["functions"] if f["execution_count"]}
    summary = json.loads(written.read_text())
    (entry,) = summary["files"]
    assert entry["filename"] == "sample.c"
    assert (entry["line_covered"], entry["line_total"]) == (len(covered), len(lines))
    assert (entry["branch_covered"], entry["branch_total"]) == (len(branches_covered), len(branches))
    assert (entry["function_covered"], entry["function_total"]) == (len(functions_covered), len(functions))
    assert covered < lines  # the samples leave code unreached: the check can fail
    assert (root / report.LCOV).read_text().startswith("TN:") and (root / report.HTML).exists()


def test_each_line_is_attributed_to_the_scenarios_whose_runs_reached_it(tmp_path, sample_report):
    root, _ = sample_report
    ok, fail = (_gcov_files(tmp_path, SAMPLES / f"{name}.gcda") for name in ("ok", "fail"))
    reached = {"ok": {line["line_number"] for line in ok["lines"] if line["count"]}}
    reached["fail"] = reached["ok"] | {line["line_number"] for line in fail["lines"] if line["count"]}
    expected = {}
    for scenario in ("fail", "ok"):
        for line in sorted(reached[scenario]):
            expected.setdefault(str(line), []).append(scenario)
    assert json.loads((root / report.LINES_BY_SCENARIO).read_text()) == {"sample.c": expected}
    assert reached["fail"] - reached["ok"], "the fail run reaches lines the ok run does not"


def test_unreached_functions_and_the_comparison(sample_report):
    root, written = sample_report
    cold = report.unreached_functions(root / report.MERGED, 10)
    assert cold == {"sample.c": []}  # the fail scenario entered unwind()
    rows = report.read_summary(written)
    worse = [report.FileFigures(r.file, (r.lines[0] - 1, r.lines[1]), r.branches, r.functions) for r in rows]
    deltas = report.compare(worse, rows)
    assert deltas[0].lines < 0 and deltas[0].status == "changed"
    gone = report.compare(rows[1:], rows)
    assert gone[0].status == "gone" and gone[0].file == "sample.c"


def test_profiled_objects_the_build_lacks_are_blind_spots_of_their_sources_only(tmp_path):
    """A profiled object without notes (its config option off) is listed when the report covers
    one of its sources, and not when the report is of other sources."""
    build_dir = tmp_path / "build"
    tdx_note = build_dir / "arch/x86/virt/vmx/tdx/tdx.gcno"
    tdx_note.parent.mkdir(parents=True)
    tdx_note.write_bytes(b"")
    (tmp_path / "cov" / "raw").mkdir(parents=True)
    build = CoverageBuild(build_dir, tmp_path, "sample")
    everything = report.blind_spots(tmp_path / "cov", build, report.KERNEL_SOURCES)
    assert everything["not_built"] == [obj for obj in report.PROFILED if obj != "arch/x86/virt/vmx/tdx/tdx.o"]
    only_seamldr = report.blind_spots(tmp_path / "cov", build, ["arch/x86/virt/vmx/tdx/seamldr.c"])
    assert only_seamldr["not_built"] == ["arch/x86/virt/vmx/tdx/seamldr.o"]
    assert report.blind_spots(tmp_path / "cov", build, ["sample.c"])["not_built"] == []

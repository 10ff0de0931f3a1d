"""No orphans: a harness process that dies (SIGKILL, SIGTERM) or is interrupted (Ctrl-C) leaves no
QEMU behind; when it can still clean up (Ctrl-C), its sockets go too, else the next machine's
start sweeps them.

A child process starts a real QEMU through the machine layer (orphan_child.py). The guest is a
stand-in "kernel" that spins in real mode: QEMU runs, no kernel build is needed. QEMU is found
by the unique socket directory on its command line, never by name, so other runs on the machine
are left alone.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.deadline import Deadline
from harness.machine.sockdir import sweep_stale

CHILD = Path(__file__).with_name("orphan_child.py")
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0  # QEMU start on a loaded 2-core machine
GONE_TIMEOUT = 15.0  # SIGKILL via the parent-death signal is immediate; stop() allows 5 s for SIGTERM
WORKER_GONE_TIMEOUT = 40.0  # an orphaned xdist worker ends itself within 20 s (5 + 15, execnet)

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or shutil.which("setpriv") is None,
                                reason="needs qemu-system-x86_64 and setpriv")


def spinning_kernel(path: Path) -> Path:
    """A minimal bzImage (boot protocol 2.15 header) whose real-mode entry is ``jmp $``: QEMU's
    loader accepts it and the vCPU spins for ever, quietly."""
    setup_sects = 1
    image = bytearray(512 * (1 + setup_sects) + 4096)
    image[0x1F1] = setup_sects
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x200:0x202] = b"\xeb\xfe"  # jmp $ at the setup entry (segment + 0x20:0)
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)
    image[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", image, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    path.write_bytes(bytes(image))
    return path


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (zombies have none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def gone_within(still_there: Callable[[], object], timeout: float) -> bool:
    """Poll until ``still_there()`` is false; False if it still holds at the deadline."""
    deadline = Deadline.after(timeout)
    while still_there():
        if deadline.expired():
            return False
        time.sleep(0.05)
    return True


@dataclass
class Qemu:
    """A QEMU found by its machine's socket directory (unique per machine: mkdtemp)."""

    sock_dir: Path

    @classmethod
    def of(cls, command_line: str) -> Qemu:
        match = re.search(r"unix:(/\S+)/qmp,", command_line)
        assert match, f"no QMP socket on the QEMU command line {command_line!r}"
        return cls(Path(match.group(1)))

    def alive(self) -> list[int]:
        return pids_mentioning(f"unix:{self.sock_dir}/qmp,")

    def wait_gone(self, timeout: float) -> bool:
        return gone_within(self.alive, timeout)

    def clean_up(self) -> None:
        """After a failed test: this test's QEMU only, and its directory."""
        for pid in self.alive():
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


@dataclass
class Harness:
    """The child harness process and the QEMU it started."""

    proc: subprocess.Popen[bytes]
    run_dir: Path
    qemu: Qemu

    def wait_exit(self, timeout: float) -> bool:
        """Wait for the child to end; if it does not, have it print its threads' stacks to its
        stderr (orphan_child registers faulthandler on SIGUSR1), then kill it. True if it ended."""
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)  # faulthandler writes from the signal handler at once
            self.proc.kill()
            self.proc.wait(10)
            return False


def read_line(proc: subprocess.Popen[bytes], deadline: Deadline) -> bytes:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(deadline.remaining()):
            raise AssertionError(f"the child did not start its machine within {deadline.seconds:.0f}s")
    return proc.stdout.readline()


@pytest.fixture
def harness(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Harness]:
    """The child harness with its machine started; ``request.param`` (indirect) adds child options."""
    options = list(getattr(request, "param", ()))
    kernel, initrd = spinning_kernel(tmp_path / "bzImage"), tmp_path / "initrd"
    initrd.write_bytes(bytes(512))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Its own session, like a shell job: a Ctrl-C goes to its process group only.
    proc = subprocess.Popen([sys.executable, str(CHILD), str(run_dir), str(kernel), str(initrd), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    child: Harness | None = None
    try:
        line = read_line(proc, Deadline.after(START_TIMEOUT))
        if not line:
            proc.wait(10)
            pytest.fail(f"the child failed to start a machine: {proc.stderr.read().decode()[-3000:]}")  # type: ignore[union-attr]
        qemu_pid = json.loads(line)["qemu_pid"]
        child = Harness(proc, run_dir, Qemu.of((run_dir / "qemu.cmdline").read_text()))
        assert child.qemu.alive() == [qemu_pid], "QEMU is not running under its socket directory"
        yield child
    finally:
        # Whatever happened, this test leaves nothing running (its own processes only).
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if child is not None:
            child.qemu.clean_up()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_qemu_dies_with_a_killed_harness(harness: Harness, sig: signal.Signals):
    """No Python code runs: the parent-death signal (setpriv --pdeathsig) must end QEMU."""
    os.kill(harness.proc.pid, sig)
    assert harness.proc.wait(10) == -sig
    assert harness.qemu.wait_gone(GONE_TIMEOUT), f"QEMU {harness.qemu.alive()} outlived its harness"
    # Nothing could remove the socket directory: the next machine's start sweeps it (in a
    # parallel run another worker's machine may already have).
    sweep_stale(harness.qemu.sock_dir.parent)
    assert not harness.qemu.sock_dir.exists()


@pytest.mark.parametrize("harness", [(), ("--no-finally",)], ids=["in_try", "before_try"], indirect=True)
def test_ctrl_c_stops_qemu_and_cleans_up(harness: Harness):
    """Ctrl-C: KeyboardInterrupt in the wait, machine.stop() in the finally, or, when it lands before
    the caller's try (before_try), in the machine layer's exit handler: QEMU ends, the socket
    directory goes, and the run directory keeps the logs."""
    os.killpg(harness.proc.pid, signal.SIGINT)  # what the terminal sends to the foreground job
    assert_interrupted_cleanly(harness)


def test_ctrl_c_taken_by_another_thread_still_interrupts_the_wait(harness: Harness):
    """The kernel may hand a process's SIGINT to any of its threads (here: the console reader's
    or the module server's); and a SIGINT that arrives just before the main thread blocks is
    handled before the wait begins. Either way only the main thread's next bytecode raises
    KeyboardInterrupt: its wait must come back to Python code in slices (deadline.WAIT_SLICE),
    not sleep on to the end of its 3600 s (CI, stop 15: the child still ran 15 s after Ctrl-C)."""
    others = [int(tid) for tid in os.listdir(f"/proc/{harness.proc.pid}/task") if int(tid) != harness.proc.pid]
    assert others, "the child harness has no thread besides its main thread"
    os.kill(others[0], signal.SIGINT)  # kill() names the process; the thread named is the one tried first
    assert_interrupted_cleanly(harness)


def assert_interrupted_cleanly(harness: Harness) -> None:
    exited = harness.wait_exit(GONE_TIMEOUT)
    stderr = harness.proc.stderr.read().decode()  # type: ignore[union-attr]
    assert exited, f"the interrupted child still ran after {GONE_TIMEOUT:.0f}s; its threads then:\n{stderr[-6000:]}"
    assert "KeyboardInterrupt" in stderr, stderr[-2000:]
    assert harness.qemu.wait_gone(GONE_TIMEOUT), f"QEMU {harness.qemu.alive()} outlived an interrupted harness"
    sock_dir = harness.qemu.sock_dir
    assert not sock_dir.exists(), f"{sock_dir} left behind: {list(sock_dir.iterdir())}"
    assert {"qemu.cmdline", "qemu.log", "seamcalls.jsonl"} <= {p.name for p in harness.run_dir.iterdir()}
    assert not [p for p in harness.run_dir.iterdir() if p.is_socket()]


PARKED_TEST = """
import sys
from pathlib import Path
sys.path.insert(0, {unit!r})
from orphan_child import main

def test_parked():
    main(Path({run!r}), Path({kernel!r}), Path({initrd!r}), True)
"""


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def wait_started(proc: subprocess.Popen[bytes], run_dir: Path, deadline: Deadline) -> Qemu:
    """The QEMU the nested run's worker started, once it runs."""
    while True:
        cmdline = run_dir / "qemu.cmdline"
        if cmdline.exists() and (qemu := Qemu.of(cmdline.read_text())).alive():
            return qemu
        assert proc.poll() is None, f"the nested pytest ended ({proc.returncode}) before its machine started"
        assert not deadline.expired(), f"no machine from the nested pytest within {deadline.seconds:.0f} s"
        time.sleep(0.1)


def test_a_killed_parallel_run_leaves_no_worker_and_no_qemu(tmp_path: Path):
    """pytest -n: the emulators are children of xdist workers, not of the pytest that gets killed.
    A worker whose controller is gone ends itself (execnet: SIGINT to itself after 5 s, which
    runs the machines' cleanup, and os._exit after 15 s more), and its emulators die with it."""
    kernel, initrd = spinning_kernel(tmp_path / "bzImage"), tmp_path / "initrd"
    initrd.write_bytes(bytes(512))
    test = tmp_path / "test_parked.py"
    test.write_text(PARKED_TEST.format(unit=str(CHILD.parent), run=str(tmp_path / "run"), kernel=str(kernel),
                                       initrd=str(initrd)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pytest", "-q", "-n", "1", "-p", "no:cacheprovider",
               "-c", os.devnull, "--rootdir", str(tmp_path), str(test)]
    with open(tmp_path / "nested.log", "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
    qemu: Qemu | None = None
    try:
        qemu = wait_started(proc, tmp_path / "run", Deadline.after(START_TIMEOUT))
        [qemu_pid] = qemu.alive()
        worker = parent_of(qemu_pid)
        assert parent_of(worker) == proc.pid, "QEMU's parent is not an xdist worker of the nested pytest"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert gone_within(Path(f"/proc/{worker}").exists, WORKER_GONE_TIMEOUT), \
            f"xdist worker {worker} outlived the killed pytest"
        assert qemu.wait_gone(GONE_TIMEOUT), f"QEMU {qemu.alive()} outlived the killed parallel run"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if qemu is not None:
            qemu.clean_up()


def test_stop_ends_qemu_even_when_a_close_step_fails(tmp_path: Path):
    """stop() closes QMP, the console, the module server and the trace before it ends QEMU: one
    of those failing (or a second Ctrl-C landing in it) must not leave QEMU running until the
    harness exits, nor its sockets."""
    from harness.launch import Images, start_machine
    from harness.machine.qemu import QemuConfig

    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(512))
    machine = start_machine(Images(spinning_kernel(tmp_path / "bzImage"), initrd, None, "spin"),
                            QemuConfig(cpus=1, memory="256M"), tmp_path / "run")
    qemu = Qemu.of(" ".join(machine.command))
    try:
        assert qemu.alive()

        def interrupted() -> None:
            raise KeyboardInterrupt  # as a second Ctrl-C during the closes

        machine.module.trace.close = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            machine.stop()
        assert qemu.wait_gone(GONE_TIMEOUT), "QEMU survived a stop() that was interrupted"
        assert not qemu.sock_dir.exists()
    finally:
        qemu.clean_up()

"""What every machine backend offers (QEMU, Bochs, SSH): the Machine interface, its run state,
its errors. Code above this layer never asks which backend it has."""

from __future__ import annotations

import abc
import atexit
import base64
import enum
import gzip
import hashlib
import logging
import re
import secrets
import subprocess
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TextIO, TypeVar

from harness.deadline import Deadline
from harness.machine.channel import ChannelClosed, ChannelError, ChannelTimeout, ChannelWaitError, show_tail
from harness.machine.console import Console
from harness.machine.shell import CommandResult, Shell

log = logging.getLogger(__name__)
T = TypeVar("T")
PUT_LINE = 3000  # base64 characters a line of put_file()
FOLLOW_STOP_SECONDS = 2.0  # interact: the console follower wakes every WAIT_SLICE

# Every machine that was started, stopped again when the interpreter exits: an interrupt that
# lands between start() and the caller's try/finally (a Ctrl-C at the wrong bytecode) must still
# end the emulator's sockets and logs cleanly; the parent-death signal only covers the process.
_started: list[weakref.ref[Machine]] = []


def _stop_started() -> None:
    for ref in _started:
        machine = ref()
        if machine is not None and machine.state is RunState.RUNNING:
            try:
                machine.stop()
            except Exception:  # one machine's failure must not keep the next one running
                log.exception("stopping %s at exit", machine.run_dir)


atexit.register(_stop_started)


class MachineError(Exception):
    """Root of the machine layer's errors."""


class LaunchError(MachineError):
    """The emulator did not come up: exit code, the exact command line and its output tail."""

    def __init__(self, reason: str, command: str, exitcode: int | None, output: str) -> None:
        super().__init__(f"{reason}\n  command: {command}\n  exit code: {exitcode}\n  output:\n{output}")
        self.command, self.exitcode, self.output = command, exitcode, output


class MachineBroken(MachineError):
    """An earlier failure left the machine unusable; later calls say so and what it was."""


class RunState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"
    BROKEN = "broken"


@dataclass(frozen=True)
class Boot:
    """What to boot: kernel, initramfs and command line."""

    kernel: Path
    initrd: Path
    append: str = ""


class Machine(abc.ABC):
    """A booted guest with the software module attached; a context manager that always stops
    its emulator."""

    state: RunState
    run_dir: Path

    @abc.abstractmethod
    def start(self) -> None: ...

    # The guest's two channels, the same on every emulator: the console (COM1, the kernel's
    # messages) and the command channel (COM4, the shell). A backend sets them once connected, and
    # _broken when a failure leaves the machine unusable.
    _console: Console | None
    _shell: Shell | None
    _broken: BaseException | None
    # The emulator's process (set by start()), its name for messages, its exit code once ended.
    _proc: subprocess.Popen[bytes] | None
    emulator: ClassVar[str]
    exitcode: int | None

    # Called while a kernel still answers, right before something ends it (reboot, kexec, a
    # crash, a machine check, power-off, the end of a scenario): the coverage collector copies
    # the kernel's gcov counters out here. A tuple: machines never share a list.
    _kernel_end_hooks: tuple[Callable[[Machine, str], None], ...] = ()

    def on_kernel_end(self, hook: Callable[[Machine, str], None]) -> None:
        """Call ``hook(machine, why)`` each time the running kernel is about to end."""
        self._kernel_end_hooks = (*self._kernel_end_hooks, hook)

    def kernel_ending(self, why: str) -> None:
        """Tell the hooks that the running kernel is about to end, and why (a short phrase)."""
        for hook in self._kernel_end_hooks:
            hook(self, why)
        self.shell_ready = False

    # True once the running kernel's shell answered (wait_ready), until kernel_ending().
    shell_ready: bool = False

    def _track(self) -> None:
        """Called first in start(): a machine starts once; from here on, interpreter exit stops it."""
        if self.state is not RunState.NEW:
            raise MachineBroken(f"machine already {self.state.value}")
        _started[:] = [ref for ref in _started if ref() is not None]
        _started.append(weakref.ref(self))

    def _require_running(self) -> tuple[Console, Shell]:
        if self._broken is not None:
            raise MachineBroken(f"machine is broken: {self._broken}") from self._broken
        if self.state is not RunState.RUNNING or self._console is None or self._shell is None:
            raise MachineBroken(f"machine is {self.state.value}, not running")
        return self._console, self._shell

    def alive(self) -> bool:
        """Running, not broken, its emulator not exited: a command may still get an answer."""
        return (self.state is RunState.RUNNING and self._broken is None
                and (self._proc is None or self._proc.poll() is None))

    def wait_ready(self, timeout: float) -> str:
        """Wait for the shell's readiness marker; returns the guest's kernel release."""
        _, shell = self._require_running()
        try:
            release = self._diagnosed(lambda: shell.wait_ready(Deadline.after(timeout)))
        except ChannelError as err:
            self._broken = err
            raise
        self.shell_ready = True
        return release

    def expect(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait for ``pattern`` on the console (the kernel's messages), after what earlier waits
        consumed."""
        console, _ = self._require_running()
        return self._diagnosed(lambda: console.expect(pattern, Deadline.after(timeout)))

    def expect_output(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait for ``pattern`` in what the shell printed after the last command: for a command
        sent with `send()` that reports back by itself."""
        _, shell = self._require_running()
        return self._diagnosed(lambda: shell.expect(pattern, Deadline.after(timeout)))

    def wait_quiet(self, period: float, timeout: float) -> None:
        """Wait until the console has been silent for ``period`` seconds."""
        console, _ = self._require_running()
        self._diagnosed(lambda: console.wait_quiet(period, Deadline.after(timeout)))

    def run(self, cmd: str, timeout: float) -> CommandResult:
        """Run a shell command in the guest; its output exactly as it wrote it (stdout and stderr
        together). Later console waits start after what the console held when it was sent."""
        console, shell = self._require_running()
        console.skip()
        return self._diagnosed(lambda: shell.run(cmd, timeout))

    def sync_console(self, timeout: float) -> None:
        """Return once every kernel record so far has reached the console. The console and the
        command channel are separate ports: a command can end before the kernel's console has
        printed what the command made it log. A marker written to /dev/kmsg now (KERN_ALERT, so
        that any console loglevel prints it) comes out after all of them."""
        marker = f"tdxh-console-sync-{secrets.token_hex(4)}"
        deadline = Deadline.after(timeout)
        result = self.run(f"echo '<1>{marker}' > /dev/kmsg", deadline.remaining())
        if result.status != 0:
            raise MachineError(f"writing the console sync marker to /dev/kmsg exited {result.status}: "
                               f"{result.output[-300:]}")
        self.expect(re.compile(re.escape(marker) + r"\n"), deadline.remaining())

    def _diagnosed(self, wait: Callable[[], T]) -> T:
        """``wait()``; when the guest does not answer on the command channel, the console's last
        lines go with the error (a panic or an oops says why); when it does not answer in time,
        what the emulator can tell about its CPUs goes to a file named in the error (the guest may
        be hung, not just slow)."""
        try:
            return wait()
        except ChannelWaitError as err:
            if self._console is not None and err.log_path != self._console.log_path:
                err.add_note(show_tail("console", self._console.log_path, self._console.tail()))
            if isinstance(err, ChannelTimeout) and (report := self.hang_report()) is not None:
                err.add_note(f"guest state at the timeout: {report}")
            raise

    def hang_report(self) -> Path | None:
        """Write what the emulator knows of a guest that stopped answering; the file, or None."""
        return None

    def put_file(self, path: str, data: bytes, timeout: float) -> None:
        """Write ``data`` to ``path`` in the guest over the command channel: gzip, then base64
        in lines the tty takes whole (its line buffer holds 4095 bytes), checked by MD5."""
        encoded = base64.b64encode(gzip.compress(data, mtime=0)).decode()
        staging = f"{path}.b64"
        steps = [f": > {staging}"] + [f"printf %s '{encoded[i:i + PUT_LINE]}' >> {staging}"
                                      for i in range(0, len(encoded), PUT_LINE)]
        steps.append(f"base64 -d {staging} | gunzip > {path} && rm {staging} && md5sum {path}")
        deadline = Deadline.after(timeout)
        for step in steps:
            result = self.run(step, max(deadline.remaining(), 1.0))
            if result.status != 0:
                raise MachineError(f"copying {len(data)} bytes to {path}: `{step[:60]}...` exited "
                                   f"{result.status}: {result.output[-300:]}")
        digest = hashlib.md5(data).hexdigest()
        if not result.output.startswith(digest):
            raise MachineError(f"copying {len(data)} bytes to {path}: MD5 {digest} expected, the guest "
                               f"has {result.output.strip()!r}")

    def send(self, cmd: str) -> None:
        """Send a command line the shell will not answer (reboot, kexec -e, a sysrq crash).
        Later console waits start after what the console held when it was sent."""
        console, shell = self._require_running()
        console.skip()
        shell.send(cmd)

    def interact(self, stdin: TextIO, stdout: TextIO) -> None:
        """Hand the shell to a person: stdin lines go to it; its output and the kernel's
        messages go to stdout as they arrive, until stdin ends or the machine ends."""
        console, shell = self._require_running()
        done = threading.Event()
        follower = threading.Thread(target=console.follow, args=(stdout, done), name="console-follow", daemon=True)
        follower.start()
        try:
            shell.interact(stdin, stdout)
        finally:
            done.set()
            follower.join(FOLLOW_STOP_SECONDS)

    def _close_channels(self) -> None:
        """Close both channels (before waiting for the emulator: QEMU cannot exit while a
        connected socket of it is unread)."""
        for channel in (self._console, self._shell):
            if channel is not None:
                channel.close()

    def console_lines(self) -> list[str]:
        """The console so far: the kernel's messages as printed."""
        return self._console.lines() if self._console else []

    def reboot(self, timeout: float) -> str:
        """Reboot from inside the guest and reset the platform (the module is reloaded, as
        firmware reloads it); returns the new kernel's release once its shell is ready."""
        raise NotImplementedError(f"{type(self).__name__} cannot reboot")

    def power_off(self, timeout: float) -> int | None:
        """``poweroff -f`` in the guest; kills the emulator if it has not ended after ``timeout``.
        Returns the emulator's exit code (as wait_exit())."""
        _, shell = self._require_running()
        self.kernel_ending("power-off")
        try:
            shell.run("poweroff -f", timeout)
        except ChannelClosed:
            pass  # expected: the emulator exits and closes the channel mid-command
        except ChannelTimeout:
            log.warning("guest did not power off within %.0fs", timeout)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` for the emulator to end by itself (power-off; a panic with
        panic=-1), else kill it; then stop(). Returns the exit code stop() recorded."""
        assert self._proc is not None, "wait_exit() before start()"
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not exit within %.0fs: killing it", self.emulator, timeout)
        self.stop()
        return self.exitcode

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the emulator whatever its state (idempotent)."""

    def __enter__(self) -> Machine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""The Bochs backend: a machine with emulated VMX (and EPT), for the KVM scenarios that QEMU TCG
cannot run. A typed config rendered to a bochsrc (pure function), and the process lifecycle
around Bochs: the harness listens first on free TCP ports of 127.0.0.1 (Bochs's serial ports
speak TCP only), Bochs connects COM1 (the console) and COM2 (bridged to the module server's Unix
socket) as a client, runs in its own process group under a pseudo-terminal it draws its display
into, dies with the harness, and is stopped soft then hard.

Bochs 3.0 from Debian trixie runs without being installed (``bochs_install``); the boot medium
is an ISOLINUX image holding the harness's kernel, initramfs and command line (``images.iso``).

Guest time is not wall time: with ``clock: sync=none`` the guest clock advances with the
instructions executed (``ips`` per guest second; halted time is skipped). ``ips`` is set near
what Bochs executes per wall second here and the kernel is told the TSC runs at ``ips`` (see
BochsConfig.clock_append), so guest timeouts stay within a small factor of wall time; host
deadlines are generous all the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pty
import re
import selectors
import shlex
import shutil
import socket
import struct
import subprocess
import termios
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from harness import paths
from harness.deadline import Deadline
from harness.images.iso import IsoError, IsoRequest, build_iso
from harness.kernel.symbols import name_sites
from harness.machine.base import Boot, LaunchError, Machine, RunState
from harness.machine.bochs_install import BochsInstall, BochsUnavailable, bochs_env, fetch_bochs
from harness.machine.channel import UARTS, quickack
from harness.machine.console import Console
from harness.machine.process import DIE_WITH_PARENT, LOOPBACK, connect_channels, end_process_group, loopback_listener
from harness.machine.qemu import parse_size
from harness.machine.shell import Shell
from harness.machine.sockdir import socket_dir
from harness.seam.faults import FaultPlan
from harness.seam.module import TdxModule
from harness.seam.platform import LogicalCpu, PlatformConfig, cmrs_for_ram, qemu_topology
from harness.seam.trace import Trace
from harness.transport.server import SeamServer

if TYPE_CHECKING:  # launch will dispatch to this module: no import cycle at run time
    from harness.launch import Images

log = logging.getLogger("harness.machine.bochs")

# KVM gives a TD the host's TSC rate and TDH.MNG.INIT refuses a virtual TSC below 100 MHz
# (TD_PARAMS.TSC_FREQUENCY, in units of 25 MHz, at least 4). Bochs's TSC runs at ``ips``, so a
# machine that creates TDs needs at least this (its guest clock then runs slower than wall time).
TD_MIN_IPS = 100_000_000
BOOT_TIMEOUT = 1200.0  # Bochs boots take tens of seconds, minutes on a loaded host

# Like QEMU's BASE_APPEND (harness/machine/qemu.py), with three differences:
# - console=ttyS0,115200: Bochs emulates the line rate, and the 8250 console's default 9600 baud
#   would cost about 1 ms of guest time per character of kernel log;
# - no setcpuid=movdir64b: the tigerlake model has MOVDIR64B, so the real instruction runs;
# - reboot=t: every reboot (panic=-1 included) is a triple fault, which Bochs turns into its
#   exit (reset_on_triple_fault=0 with panic: action=fatal): QEMU's -no-reboot.
BASE_APPEND = f"console=ttyS0,115200 {UARTS} nohibernate panic=-1 reboot=t printk.time=1"

CONNECT_TIMEOUT = 120.0  # Bochs loads its plugins and ROMs before it connects its serial ports
STOP_TIMEOUT = 5.0
LOW_RAM_LIMIT = 0xC0000000  # Bochs's BIOS reports RAM below 4 GiB up to 3 GiB (PCI space above)
FOUR_GIB = 1 << 32
TERMINAL_SIZE = (25, 80)  # rows, columns of the pseudo-terminal the term display draws into
OUTPUT_TAIL = 4000
# Bochs reports the guest's ACPI power-off as a panic ("fatal": it exits with status 1), and a
# guest reboot (reboot=t: a triple fault, with reset_on_triple_fault=0) as another.
_PANIC_LINE = re.compile(r">>PANIC<< (.*)")
POWER_OFF_PANIC = "ACPI control: soft power off"
TRIPLE_FAULT_PANIC = "3rd"  # "exception(): 3rd (13) exception with no resolution"
# Characters a bochsrc value cannot hold: the parser splits on commas and whitespace.
_BOCHSRC_UNSAFE = re.compile(r"[\s,\"]")


@dataclass(frozen=True)
class BochsConfig:
    """One Bochs machine. CPUs are ``sockets`` packages of ``cpus // sockets`` cores."""

    memory: str = "1G"
    cpus: int = 1
    sockets: int = 1
    cpu_model: str = "tigerlake"  # VMX+EPT+unrestricted guest+MOVDIR64B; sapphire_rapids fails on 3.0
    # Instructions per guest second (clock: sync=none). About what this emulator executes per
    # wall second on a loaded 2-core host, so guest time stays near wall time: the shim's
    # timeout and the kernel's watchdogs then mean roughly what they say. Lower is a faster
    # wire (a UART byte costs 87 us of guest time): SEAMCALL round trip 11 ms at 10M, 24 ms at
    # 20M, 35 ms at 50M (measured), but guest time then outruns wall time (2.4x at 10M).
    ips: int = 20_000_000
    # SMP: instructions a CPU runs before Bochs switches to the next one; a halted CPU counts as
    # a whole quantum, so while every CPU idles guest time advances only this much per round:
    # the maximum (32) makes idle time pass fastest.
    smp_quantum: int = 32
    base_append: str = BASE_APPEND
    extra_append: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.smp_quantum <= 32:
            raise ValueError(f"Bochs takes an SMP quantum of 1 to 32, not {self.smp_quantum}")
        if self.cpus < 1 or self.sockets < 1 or self.cpus % self.sockets:
            raise ValueError(f"{self.cpus} CPUs cannot be split evenly over {self.sockets} sockets")
        cores = self.cpus // self.sockets
        # Bochs numbers APIC ids 0..n-1 but its CPUID leaf 0xB gives each level a power-of-two
        # field: the two agree (and the module's topology matches the kernel's) only then.
        if cores & (cores - 1):
            raise ValueError(f"Bochs needs a power-of-two number of cores per socket, not {cores}")
        if parse_size(self.memory) % (1 << 20):
            raise ValueError(f"Bochs takes memory in whole MiB, not {self.memory}")
        if self.ips < 1_000_000:
            raise ValueError(f"ips={self.ips} is too low for a kernel's timer tick")

    @property
    def cores_per_socket(self) -> int:
        return self.cpus // self.sockets

    @property
    def memory_mb(self) -> int:
        return parse_size(self.memory) >> 20

    def ram_ranges(self) -> list[tuple[int, int]]:
        """Guest RAM as (base, size), as Bochs lays it out (i440fx, rombios e820): up to 3 GiB
        below 4 GiB, and whatever exceeds 4 GiB of the configured size above 4 GiB; the part of
        the configured size between 3 and 4 GiB is hidden behind the PCI hole."""
        total = parse_size(self.memory)
        ranges = [(0, min(total, LOW_RAM_LIMIT))]
        if total > FOUR_GIB:
            ranges.append((FOUR_GIB, total - FOUR_GIB))
        return ranges

    def topology(self) -> tuple[LogicalCpu, ...]:
        """CPUs with the APIC ids Bochs gives them (consecutive; see __post_init__)."""
        return qemu_topology(self.sockets, self.cores_per_socket)

    def clock_append(self) -> str:
        """The TSC frequency for the kernel: Bochs's TSC counts instructions (``ips`` per guest
        second), but the tigerlake CPUID claims 2.4 GHz; believed, that made every TSC-based
        deadline (the shim's timeout_ms, udelay) about 100x longer than meant."""
        return f"tsc_early_khz={self.ips // 1000}"

    def cmdline(self, boot_append: str = "") -> str:
        parts = (self.base_append, self.clock_append(), boot_append, self.extra_append)
        return " ".join(part for part in parts if part)


@dataclass(frozen=True)
class BochsFiles:
    """The host files and ports a bochsrc points at."""

    bios: Path
    vgabios: Path
    iso: Path
    log: Path
    console_port: int
    seam_port: int | None  # None: COM2 exists but nothing is connected (no module answers)
    command_port: int


def _value(path: Path) -> str:
    text = str(path)
    if _BOCHSRC_UNSAFE.search(text):
        raise ValueError(f"Bochs cannot take the path {text!r} (no spaces, commas or quotes)")
    return text


def render_bochsrc(config: BochsConfig, files: BochsFiles) -> str:
    """The bochsrc for ``config``: headless (term display in a pseudo-terminal), COM1 the
    console, COM2 the module and COM4 the command channel, all TCP clients of the harness."""
    com2 = (f"com2: enabled=1, mode=socket-client, dev={LOOPBACK}:{files.seam_port}" if files.seam_port is not None
            else "com2: enabled=1, mode=null")
    lines = [
        "# Generated by tdx-harness (harness/machine/bochs.py)",
        "display_library: term, options=\"hideIPS\"",  # no status line redrawn every second
        # reset_on_triple_fault=0: a guest reboot ends Bochs (with reboot=t on the command line).
        # ignore_bad_msrs: Linux probes many MSRs Bochs does not model (about 1,600 log lines).
        f"cpu: model={config.cpu_model}, count={config.sockets}:{config.cores_per_socket}:1, ips={config.ips}, "
        f"quantum={config.smp_quantum}, reset_on_triple_fault=0, ignore_bad_msrs=1",
        f"memory: guest={config.memory_mb}, host={config.memory_mb}",
        f"romimage: file={_value(files.bios)}, options=fastboot",
        f"vgaromimage: file={_value(files.vgabios)}",
        "pci: enabled=1, chipset=i440fx",
        "ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14",
        f"ata0-master: type=cdrom, path={_value(files.iso)}, status=inserted",
        "boot: cdrom",
        # Guest time follows the instructions executed: deterministic, and never throttled.
        "clock: sync=none, time0=utc",
        f"com1: enabled=1, mode=socket-client, dev={LOOPBACK}:{files.console_port}",
        com2,
        f"com4: enabled=1, mode=socket-client, dev={LOOPBACK}:{files.command_port}",
        f"log: {_value(files.log)}",
        # A Bochs panic (and a guest triple fault) ends Bochs instead of asking on the terminal.
        "panic: action=fatal",
        "error: action=report",
        "info: action=report",
        "debug: action=ignore",
        "mouse: enabled=0",
    ]
    return "\n".join(lines) + "\n"


def platform_for_bochs(config: BochsConfig, base: PlatformConfig | None = None) -> PlatformConfig:
    """The module's platform for this machine: its CPUs and its RAM as convertible memory."""
    base = base or PlatformConfig()
    return base.replace(cpus=config.topology(), cmrs=cmrs_for_ram(config.ram_ranges()))


def _set_window_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


# Debian's Bochs has the debugger's terminal support: its term display opens a pseudo-terminal
# of its own and draws the screen (and the IPS status line, every second) into it. Nobody reads
# that one unless we do: after a few minutes its buffer is full and Bochs blocks for ever in
# write() (seen as a guest frozen in the middle of a long KVM flow).
SCREEN_PTY = re.compile(rb'Bochs connected to screen "(/dev/pts/\d+)"')


class _TerminalDrain:
    """Reads the pseudo-terminal Bochs writes its stderr into (kept in a log file), and the one
    its term display draws into (discarded), so Bochs never blocks on either."""

    def __init__(self, master: int, log_path: Path) -> None:
        self.master = master
        self.log_path = log_path
        self._screen: int | None = None
        self._threads = [threading.Thread(target=self._run, name="bochs-terminal", daemon=True)]
        self._threads[0].start()

    def _run(self) -> None:
        seen = b""
        with open(self.log_path, "ab") as out:
            for data in _chunks(self.master):
                out.write(data)
                out.flush()
                if self._screen is None:
                    seen = (seen + data)[-4096:]
                    found = SCREEN_PTY.search(seen)
                    if found:
                        self._drain_screen(found.group(1).decode())

    def _drain_screen(self, path: str) -> None:
        try:
            self._screen = os.open(path, os.O_RDONLY | os.O_NOCTTY)
        except OSError as err:
            log.warning("cannot read Bochs's screen %s (%s): Bochs may block on it", path, err)
            return
        thread = threading.Thread(target=_discard, args=(self._screen,), name="bochs-screen", daemon=True)
        self._threads.append(thread)
        thread.start()

    def close(self) -> None:
        for thread in self._threads:
            thread.join(STOP_TIMEOUT)
        for fd in (self.master, self._screen):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _discard(fd: int) -> None:
    for _ in _chunks(fd):
        pass


def _chunks(fd: int) -> Iterator[bytes]:
    """What arrives on ``fd`` until EOF or EIO (every holder of the other side closed it)."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        yield data


class _ModuleBridge:
    """Carries COM2 between Bochs (a TCP client: Bochs serial ports speak TCP only) and the
    module server on a Unix socket, acknowledging Bochs's bytes at once (see process.QuickAckSocket):
    measured SEAMCALL round trip 48 ms without, 12 ms with (ips 10M, loaded 2-core host).
    One connection, both directions on one thread; EOF on either side ends it."""

    def __init__(self, server_path: Path) -> None:
        self.server_path = server_path
        self.listener = loopback_listener()
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bochs-com2-bridge", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                guest, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with guest, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as module:
                try:
                    module.connect(str(self.server_path))
                    self._pump(guest, module)
                except OSError as err:
                    if not self._stop.is_set():
                        log.info("COM2 bridge closed: %s", err)
            return  # Bochs connects its COM2 once

    def _pump(self, guest: socket.socket, module: socket.socket) -> None:
        peers = {guest.fileno(): (guest, module), module.fileno(): (module, guest)}
        with selectors.DefaultSelector() as selector:
            selector.register(guest, selectors.EVENT_READ)
            selector.register(module, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.5):  # wake now and then to see stop()
                    source, sink = peers[key.fd]
                    data = source.recv(65536)
                    if source is guest:
                        quickack(guest)
                    if not data:
                        return
                    sink.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(STOP_TIMEOUT)


@dataclass
class BochsMachine(Machine):
    config: BochsConfig
    boot: Boot
    module: TdxModule
    run_dir: Path
    cache: Path = field(default_factory=paths.cache_dir)
    state: RunState = RunState.NEW
    command: list[str] = field(default_factory=list)
    emulator: ClassVar[str] = "Bochs"
    exitcode: int | None = None
    serve_module: bool = True
    install: BochsInstall | None = None

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.run_dir / "console.log"
        self.commands_log = self.run_dir / "commands.log"
        self.bochs_log = self.run_dir / "bochs.log"
        self.terminal_log = self.run_dir / "terminal.log"
        self.bochsrc = self.run_dir / "bochsrc"
        self._proc: subprocess.Popen[bytes] | None = None
        self._terminal: _TerminalDrain | None = None
        self._console: Console | None = None
        self._shell: Shell | None = None
        self._seam: SeamServer | None = None
        self._bridge: _ModuleBridge | None = None
        self._sock_dir: Path | None = None
        self._broken: BaseException | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._track()
        for stale in (self.console_log, self.commands_log, self.bochs_log, self.terminal_log):
            stale.unlink(missing_ok=True)  # these append: start each machine afresh
        listeners = (loopback_listener(), loopback_listener())  # console, command channel
        try:  # every failure below goes through stop(): sockets, trace file, process group
            install = self._install()
            iso = self._boot_image()
            if self.serve_module:
                self._sock_dir = socket_dir("bochs-")
                self._seam = SeamServer(self.module, self._sock_dir / "seam").start()
                self._bridge = _ModuleBridge(self._sock_dir / "seam")
            files = BochsFiles(install.bios, install.vgabios, iso, self.bochs_log,
                               console_port=listeners[0].getsockname()[1],
                               seam_port=self._bridge.port if self._bridge else None,
                               command_port=listeners[1].getsockname()[1])
            self.bochsrc.write_text(render_bochsrc(self.config, files))
            self.command = DIE_WITH_PARENT + install.command("-q", "-f", str(self.bochsrc))
            shown = f"cd {shlex.quote(str(self.run_dir))} && {install.shell_prefix()} -q -f {self.bochsrc}"
            (self.run_dir / "bochs.cmdline").write_text(shown + "\n")
            log.info("$ %s", shown)
            proc = self._launch(install)
            self.state = RunState.RUNNING
            self._console, self._shell = connect_channels(
                listeners, proc, Deadline.after(CONNECT_TIMEOUT), self.emulator, self.command, self.output_tail,
                (self.console_log, self.commands_log), ack_at_once=True)
        except BaseException as err:
            self._broken = err
            self.stop()
            raise
        finally:
            for listener in listeners:
                listener.close()

    def _install(self) -> BochsInstall:
        if self.install is None:
            try:
                self.install = fetch_bochs(self.cache)
            except BochsUnavailable as err:
                raise LaunchError(f"Bochs is not available: {err}", "", None, "") from err
        return self.install

    def _boot_image(self) -> Path:
        request = IsoRequest(self.boot.kernel, self.boot.initrd, self.config.cmdline(self.boot.append),
                             self.cache / "bochs" / "iso")
        try:
            return build_iso(request)
        except IsoError as err:
            raise LaunchError(f"cannot build the boot image: {err}", "", None, "") from err

    def _launch(self, install: BochsInstall) -> subprocess.Popen[bytes]:
        """Bochs in its own session and process group, its terminal a fresh pseudo-terminal."""
        master, slave = pty.openpty()
        try:
            _set_window_size(slave, *TERMINAL_SIZE)
            env = {**bochs_env(install), "TERM": "xterm"}  # the term display needs a known terminal
            self._terminal = _TerminalDrain(master, self.terminal_log)
            self._proc = subprocess.Popen(self.command, stdin=slave, stdout=slave, stderr=slave, env=env,
                                          cwd=self.run_dir, start_new_session=True)
            return self._proc
        finally:
            os.close(slave)  # Bochs holds it now: its exit ends the drain with EIO

    def output_tail(self) -> str:
        """The end of Bochs's own log and of its terminal: what a failed launch is reported with."""
        parts = []
        for path in (self.bochs_log, self.terminal_log):
            try:
                text = path.read_text(errors="replace")[-OUTPUT_TAIL:]
            except OSError:
                continue
            parts.append(f"--- {path.name} ---\n{text}")
        return "\n".join(parts)

    def exit_reason(self) -> str | None:
        """Why Bochs ended, from its log: "power-off", "reboot" (a guest reboot or panic, as a
        triple fault), "panic: <Bochs's message>", or None if it reported no reason."""
        try:
            panics = _PANIC_LINE.findall(self.bochs_log.read_text(errors="replace"))
        except OSError:
            return None
        if not panics:
            return None
        last = panics[-1].strip()
        if last.startswith(POWER_OFF_PANIC):
            return "power-off"
        if TRIPLE_FAULT_PANIC in last and "exception" in last:
            return "reboot"
        return f"panic: {last}"

    def stop(self) -> None:
        try:
            self._close_channels()
            if self._seam is not None:
                self._seam.stop()
                self._seam = None
            self.module.trace.close()
        finally:
            # As QemuMachine.stop(): a close that raised or a second Ctrl-C must not leave Bochs
            # running until the harness exits, nor its socket directory behind.
            try:
                if self._proc is not None:
                    self.exitcode = end_process_group(self._proc)
                    # Bochs reports a guest power-off as a panic, exit status 1: 0, as under QEMU.
                    if self.exitcode == 1 and self.exit_reason() == "power-off":
                        self.exitcode = 0
            finally:
                if self._sock_dir is not None:
                    shutil.rmtree(self._sock_dir, ignore_errors=True)
                    self._sock_dir = None
        if self._bridge is not None:  # after Bochs is gone: nothing can block its thread now
            self._bridge.close()
            self._bridge = None
        if self._terminal is not None:
            self._terminal.close()
            self._terminal = None
        if self.state is RunState.RUNNING:
            self.state = RunState.BROKEN if self._broken else RunState.STOPPED


def start_bochs_machine(images: Images, config: BochsConfig, run_dir: Path,
                        platform: PlatformConfig | None = None, faults: FaultPlan | None = None,
                        append: str = "", serve_module: bool = True,
                        install: BochsInstall | None = None, cache: Path | None = None) -> BochsMachine:
    """A started Bochs machine whose COM2 is served by a fresh module (unless ``serve_module``
    is False); the trace goes to run_dir. The counterpart of launch.start_machine."""
    run_dir.mkdir(parents=True, exist_ok=True)
    trace_file = open(run_dir / "seamcalls.jsonl", "w")
    module = TdxModule(platform_for_bochs(config, platform), faults or FaultPlan(), Trace(sink=trace_file))
    module.save_config(run_dir)
    name_sites(module, images.kernel)
    machine = BochsMachine(config, Boot(images.kernel, images.initrd, append), module, run_dir,
                           cache=cache or paths.cache_dir(), serve_module=serve_module, install=install)
    machine.start()
    return machine

"""The QEMU backend: a typed machine config turned into a command line, and the process
lifecycle around it (sockets listening first, QEMU in its own process group that dies with the
harness, soft then hard stop).

QEMU comes from Debian bookworm (7.2): installable on a fresh Debian 12 with plain apt, and it
emulates everything the TDX host code needs under TCG (q35, ACPI S3, NUMA, 16550 UARTs, QMP,
MCE injection). Newer QEMU (bookworm-backports 10.0) works too: pass ``--qemu PATH``.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from harness.deadline import Deadline
from harness.machine.base import Boot, LaunchError, Machine, MachineBroken, MachineError, RunState
from harness.machine.channel import UARTS
from harness.machine.console import Console
from harness.machine.process import DIE_WITH_PARENT, LOOPBACK, connect_channels, end_process_group, loopback_listener
from harness.machine.qmp import Qmp
from harness.machine.shell import Shell
from harness.machine.sockdir import socket_dir
from harness.seam.module import TdxModule
from harness.seam.trace import format_record
from harness.transport.server import SeamServer

log = logging.getLogger("harness.machine.qemu")

CONNECT_TIMEOUT = 30.0
SAVE_TIMEOUT = 120.0
# The command line every TDX boot needs under emulation: the 8250 driver's four legacy ports
# (channel.UARTS: the console, the module's COM2 left alone, the command channel), disable
# hibernation (else the kernel refuses TDX), force the MOVDIR64B flag that TCG lacks (the shim
# falls back to plain stores), end the machine on panic, and keep the initramfs readable
# (/sys/firmware/initrd) for kexec from inside the guest. tsc=nowatchdog: on a loaded host the
# 7.3 clocksource watchdog's per-CPU skew check deadlocked a TCG guest at boot (its timeout is
# measured on jiffies while the other CPUs sit in stop_machine with IRQs off; docs/NOTES.md),
# and TCG's TSC against emulated HPET only gives it false skew anyway.
BASE_APPEND = (f"console=ttyS0 {UARTS} nohibernate setcpuid=movdir64b panic=-1 printk.time=1 retain_initrd "
               "tsc=nowatchdog")


@dataclass(frozen=True)
class QemuConfig:
    memory: str = "2G"
    cpus: int = 2
    sockets: int = 1
    numa: tuple[str, ...] = ()  # per-node memory sizes, e.g. ("1G", "3G")
    dimm_slots: int = 0  # memory hotplug: DIMM slots and the most memory they may bring
    maxmem: str | None = None
    cpu_model: str = "max"
    cpu_family_model: tuple[int, int] | None = None  # e.g. (6, 0x8F) for the partial-write erratum
    machine: str = "q35"
    accel: str = "tcg"
    qemu: str = "qemu-system-x86_64"
    ssh_port: int | None = None  # host port forwarded to the guest's SSH server (user network)
    base_append: str = BASE_APPEND  # scenarios about these parameters (nohibernate) replace it
    extra_append: str = ""

    def __post_init__(self) -> None:
        if self.cpus < 1 or self.sockets < 1 or self.cpus % self.sockets:
            raise ValueError(f"{self.cpus} CPUs cannot be split evenly over {self.sockets} sockets")
        if self.numa and len(self.numa) > self.cpus:
            raise ValueError(f"{len(self.numa)} NUMA nodes need at least as many CPUs (have {self.cpus})")
        if bool(self.dimm_slots) != bool(self.maxmem):
            raise ValueError("memory hotplug needs both dimm_slots and maxmem")

    @property
    def cores_per_socket(self) -> int:
        return self.cpus // self.sockets

    def cpu_arg(self) -> str:
        # Intel vendor: TDX detection and MCE decoding take Intel-only paths (TCG's "max" is
        # otherwise AMD-flavoured on AMD hosts); ss = self-snoop, which tdx_enable() requires.
        parts = [self.cpu_model, "vendor=GenuineIntel", "+ss"]
        if self.cpu_family_model:
            parts += [f"family={self.cpu_family_model[0]}", f"model={self.cpu_family_model[1]}"]
        return ",".join(parts)

    def numa_args(self) -> list[str]:
        """One RAM backend and node per entry of ``numa``; CPUs spread evenly, the last node
        taking the remainder."""
        args: list[str] = []
        per_node = self.cpus // len(self.numa) if self.numa else 0
        for node, size in enumerate(self.numa):
            first = node * per_node
            last = self.cpus - 1 if node == len(self.numa) - 1 else first + per_node - 1
            args += ["-object", f"memory-backend-ram,id=ram{node},size={size}",
                     "-numa", f"node,nodeid={node},memdev=ram{node},cpus={first}-{last}"]
        return args

    def ram_ranges(self) -> list[tuple[int, int]]:
        """Guest RAM as (base, size), as QEMU lays it out: q35 keeps 2 GiB below 4 GiB when RAM
        is 2.75 GiB or more (else up to 2.75 GiB), pc keeps 3 GiB (if RAM >= 3.5 GiB), the rest
        goes above 4 GiB."""
        total = sum(parse_size(size) for size in self.numa) if self.numa else parse_size(self.memory)
        if self.machine.startswith("q35"):
            lowmem = 0x80000000 if total >= 0xB0000000 else 0xB0000000
        else:
            lowmem = 0xC0000000 if total >= 0xE0000000 else 0xE0000000
        below = min(total, lowmem)
        return [(0, below)] + ([(1 << 32, total - below)] if total > below else [])

    def network_args(self) -> list[str]:
        """QEMU's user network with 127.0.0.1:ssh_port forwarded to the guest's port 22."""
        if self.ssh_port is None:
            return []
        return ["-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                "-device", "virtio-net-pci,netdev=net0"]

    def memory_arg(self) -> str:
        """-m: with NUMA nodes it must equal the sum of the nodes; hotplug adds slots/maxmem."""
        size = f"{sum(parse_size(size) for size in self.numa) >> 20}M" if self.numa else self.memory
        return f"{size},slots={self.dimm_slots},maxmem={self.maxmem}" if self.dimm_slots else size


def nested_vmx_available(kvm: Path = Path("/dev/kvm"),
                         nested: Path = Path("/sys/module/kvm_intel/parameters/nested")) -> bool:
    """Can QEMU give its guest VMX here: KVM usable and kvm_intel loaded with nested=Y/1."""
    try:
        return os.access(kvm, os.R_OK | os.W_OK) and nested.read_text().strip() in ("Y", "1")
    except OSError:
        return False


def parse_size(text: str) -> int:
    """QEMU-style size: 512M, 2G, 4096 (bytes)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M or 2G)") from None


def qemu_command(config: QemuConfig, boot: Boot, ports: tuple[int, int], seam_sock: Path | None,
                 qmp_sock: Path, incoming: Path | None = None) -> list[str]:
    """The QEMU command line. ``ports``: the harness's console and command channel listeners
    on the loopback.
    ``seam_sock`` None leaves COM2 unconnected: no module answers.
    ``incoming``: start from a machine state saved there (QemuMachine.save) instead of booting."""
    seam = ["-chardev", f"socket,id=seam0,path={seam_sock}", "-serial", "chardev:seam0"] if seam_sock else \
        ["-serial", "null"]
    append = " ".join(part for part in (config.base_append, boot.append, config.extra_append) if part)
    return [
        config.qemu, "-machine", f"{config.machine},accel={config.accel}", "-cpu", config.cpu_arg(),
        "-m", config.memory_arg(),
        "-smp", f"{config.cpus},sockets={config.sockets},cores={config.cores_per_socket},threads=1",
        *config.numa_args(),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(boot.kernel), "-initrd", str(boot.initrd), "-append", append,
        # COM1: console; COM2: the software TDX module; COM4: the command channel. QEMU connects
        # to the harness's sockets. Console and commands go over TCP, not a Unix socket: QEMU
        # sends them one byte per send(), and a Unix socket charges each byte a whole buffer (~270
        # bytes fit), so a reader held up for a moment stopped the UART, and the kernel's console,
        # tired of waiting, overwrote bytes still in its FIFO. TCP queues them by the byte
        # (megabytes); nodelay: no Nagle wait.
        "-chardev", f"socket,id=con0,host={LOOPBACK},port={ports[0]},nodelay=on", "-serial", "chardev:con0",
        *seam,
        "-chardev", f"socket,id=cmd0,host={LOOPBACK},port={ports[1]},nodelay=on",
        "-device", "isa-serial,chardev=cmd0,index=3",
        "-qmp", f"unix:{qmp_sock},server=on,wait=off",
        *config.network_args(),
        *(["-incoming", f"exec:cat {shlex.quote(str(incoming))}"] if incoming else []),
    ]


@dataclass
class QemuMachine(Machine):
    config: QemuConfig
    boot: Boot
    module: TdxModule
    run_dir: Path
    state: RunState = RunState.NEW
    command: list[str] = field(default_factory=list)
    emulator: ClassVar[str] = "QEMU"
    exitcode: int | None = None
    serve_module: bool = True
    incoming: Path | None = None  # a saved machine state to resume instead of booting

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.run_dir / "console.log"
        self.commands_log = self.run_dir / "commands.log"
        self.qemu_log = self.run_dir / "qemu.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: Console | None = None
        self._shell: Shell | None = None
        self._seam: SeamServer | None = None
        self._broken: BaseException | None = None
        self._sock_dir: Path | None = None
        self._qmp: Qmp | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._track()
        for stale in (self.console_log, self.commands_log):
            stale.unlink(missing_ok=True)  # the channels append: start each machine afresh
        self._sock_dir = socket_dir()
        seam_path = self._sock_dir / "seam"
        listeners = (loopback_listener(), loopback_listener())  # console, command channel
        try:  # every failure below goes through stop(): sockets, trace file, process group
            if shutil.which(self.config.qemu) is None:
                raise LaunchError(f"{self.config.qemu} not found (apt-get install qemu-system-x86)",
                                  self.config.qemu, None, "")
            for path, what in ((self.boot.kernel, "kernel"), (self.boot.initrd, "initramfs")):
                if not path.is_file():
                    raise LaunchError(f"{what} {path} does not exist", "", None, "")
            if self.serve_module:
                self._seam = SeamServer(self.module, seam_path).start()
            self.command = qemu_command(self.config, self.boot, tuple(lst.getsockname()[1] for lst in listeners),
                                        seam_path if self.serve_module else None, self._sock_dir / "qmp",
                                        self.incoming)
            (self.run_dir / "qemu.cmdline").write_text(shlex.join(self.command) + "\n")
            log.info("$ %s", shlex.join(self.command))
            with open(self.qemu_log, "wb") as out:
                self._proc = subprocess.Popen(DIE_WITH_PARENT + self.command, stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True)
            self.state = RunState.RUNNING
            self._console, self._shell = connect_channels(
                listeners, self._proc, Deadline.after(CONNECT_TIMEOUT), self.emulator, self.command,
                self._qemu_output, (self.console_log, self.commands_log))
        except BaseException as err:
            self._broken = err
            self.stop()
            raise
        finally:
            for listener in listeners:
                listener.close()

    def _qemu_output(self) -> str:
        try:
            return self.qemu_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def reboot(self, timeout: float) -> str:
        """The guest reboots (``reboot -f``: reboot(2), through the kernel's shutdown path and
        TDH.SYS.DISABLE). QEMU is told to pause instead of resetting, so the module is power-cycled
        while no vCPU runs; then the machine is reset and resumed. Returns the new kernel's
        release once its shell is ready."""
        deadline = Deadline.after(timeout)
        qmp = self.qmp()
        qmp.command("set-action", reboot="shutdown", shutdown="pause")
        qmp.clear_events()
        self.kernel_ending("reboot")
        self.send("reboot -f")
        reason = qmp.wait_event("SHUTDOWN", deadline).get("data", {}).get("reason")
        if reason != "guest-reset":
            raise MachineBroken(f"expected the guest to reset, QEMU reports a shutdown for {reason!r}")
        qmp.wait_status(deadline, "shutdown")
        self.module.power_cycle()
        # With reboot=shutdown (-no-reboot) QEMU would turn system_reset itself into a shutdown;
        # and the firmware resets the machine again early in the next boot (seen with SeaBIOS):
        # resets stay resets until the new kernel is up.
        qmp.command("set-action", reboot="reset", shutdown="poweroff")
        qmp.command("system_reset")
        qmp.wait_event("RESET", deadline)
        qmp.wait_status(deadline, "prelaunch", "paused")  # a reset out of "shutdown" lands in prelaunch
        qmp.command("cont")
        release = self.wait_ready(deadline.remaining())
        qmp.command("set-action", reboot="shutdown")  # back to -no-reboot: a panic ends QEMU
        log.info("guest rebooted into %s; module power-cycled at the reset", release)
        return release

    def save(self, path: Path, timeout: float = SAVE_TIMEOUT) -> None:
        """Save the whole machine to ``path`` (QEMU migration to a file, the guest paused while it
        is written), then let it run on. Take it while the guest is idle at its shell: then no
        SEAMCALL is in flight, and the module's snapshot taken beside it matches."""
        deadline = Deadline.after(timeout)
        qmp = self.qmp()
        qmp.command("stop")
        qmp.command("migrate", uri=f"exec:cat > {shlex.quote(str(path))}")
        while (status := qmp.command("query-migrate").get("status")) not in ("completed", "failed", "cancelled"):
            if deadline.expired():
                raise MachineBroken(f"saving the machine to {path} still {status!r} after {deadline.seconds:.0f}s")
            time.sleep(0.05)
        if status != "completed":
            raise MachineBroken(f"saving the machine to {path} ended {status!r}: see {self.qemu_log}")
        qmp.command("cont")
        log.info("machine saved to %s (%.1f MB)", path, path.stat().st_size / 1e6)

    def resume_saved(self, timeout: float) -> str:
        """For a machine started with ``incoming``: wait until QEMU has loaded the state, let the
        guest run, and check its shell answers; returns the kernel release (as wait_ready)."""
        deadline = Deadline.after(timeout)
        qmp = self.qmp()
        qmp.wait_status(deadline, "paused", "running")  # "inmigrate" while loading
        qmp.command("cont")
        result = self.run("uname -r", deadline.remaining())
        if result.status:
            raise MachineBroken(f"the restored guest's shell answered {result.status}: {result.output[-300:]}")
        self.shell_ready = True
        return result.output.strip()

    def hang_report(self) -> Path | None:
        """QEMU's run state, each vCPU's registers (HMP info registers -a) and the module's last
        SEAMCALL: enough to tell a guest spinning, halted or waiting on COM2 from a slow one."""
        path = self.run_dir / "hang.txt"
        parts = []
        try:
            qmp = self.qmp(timeout=5.0)
            parts += [f"QEMU run state: {qmp.status()}", "== info cpus", qmp.hmp("info cpus"),
                      "== info registers -a", qmp.hmp("info registers -a")]
        except MachineError as err:
            parts.append(f"QMP did not answer: {err}")
        last = self.module.trace.records[-1] if self.module.trace.records else None
        parts.append(f"== SEAMCALLs answered: {len(self.module.trace)}; the last: "
                     f"{format_record(last) if last else 'none'}")
        path.write_text("\n".join(parts) + "\n")
        log.warning("the guest did not answer in time: its CPUs' state is in %s", path)
        return path

    def qmp(self, timeout: float = CONNECT_TIMEOUT) -> Qmp:
        """The machine's QMP monitor (connected on first use, closed by stop())."""
        self._require_running()
        if self._qmp is None:
            assert self._sock_dir is not None  # running machines have one
            self._qmp = Qmp(self._sock_dir / "qmp", Deadline.after(timeout))
        return self._qmp

    def stop(self) -> None:
        try:
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None
            self._close_channels()  # before waiting for QEMU (it may block on them)
            if self._seam is not None:
                self._seam.stop()
                self._seam = None
            self.module.trace.close()
        finally:
            # Even when a close above raised or a second Ctrl-C landed in it: QEMU must not run
            # on until the harness exits, and its sockets' directory must go.
            try:
                if self._proc is not None:
                    self.exitcode = end_process_group(self._proc)
            finally:
                if self._sock_dir is not None:
                    shutil.rmtree(self._sock_dir, ignore_errors=True)
        if self.state is RunState.RUNNING:
            self.state = RunState.BROKEN if self._broken else RunState.STOPPED

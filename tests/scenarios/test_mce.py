"""Machine checks on a TDX host: the partial-write erratum message and its negative cases.

Linux 7.2/7.3 prints "mce: [Hardware Error]: Machine check: TDX private memory error. Possible
kernel bug." only from mce_panic() (a fatal #MC), only on a CPU with X86_BUG_TDX_PW_MCE
(Sapphire/Emerald Rapids), only for a memory error with a usable physical address, and only if
TDH.PHYMEM.PAGE.RDMD succeeds and names a page type other than PT_NDA, where PT_RSVD counts only
for PAMT pages (harness/observe/mce.py follows the chain). So, with a fatal memory error:

- erratum CPU, module initialized: a PAMT page -> message; plain kernel memory -> none; a page
  the module holds for a TD -> message;
- erratum CPU, module init failed: the kernel still asks (X86_FEATURE_TDX_HOST_PLATFORM only needs
  the KeyIDs), but the failed tdx_enable() took every CPU out of VMX operation, so the SEAMCALL
  is #UD (TDX_SEAMCALL_UD; the shim notes it) and never reaches the module; the kernel trusts
  nothing -> none;
- erratum CPU model without TDX KeyIDs: tdx_init() stops before check_tdx_erratum(), so there is
  no X86_BUG_TDX_PW_MCE either -> no RDMD, no message;
- CPU without the erratum: the kernel never asks -> no RDMD, no message;
- a record only logged (mce-inject "sw": mce_log(), no #MC handler): no mce_panic(), no RDMD.

Two ways to raise the #MC: mce-inject "hw" (bank MSRs written in the guest, int $18 on one CPU;
fake_panic keeps the machine alive, so the test reads the log afterwards) and QEMU's HMP `mce -b`
(a real broadcast #MC from the emulator: every CPU enters the handler, the kernel panics, and
with panic=-1 and -no-reboot QEMU exits; the console log is what is left to check).
"""

from __future__ import annotations

import enum
import json
import logging
import re
import time
from dataclasses import dataclass, field

import pytest
from checks import HOLD_APPEND, hold_inside_seamcall, kernel_log, load_tdx_host

from harness.deadline import Deadline
from harness.machine import postmortem
from harness.machine.channel import ChannelTimeout
from harness.machine.mce import InjectFlags, Mce, debugfs_setup_command, uncorrected_memory_error
from harness.machine.qemu import QemuConfig, QemuMachine
from harness.machine.qmp import QmpError
from harness.observe import patterns
from harness.observe.cpuinfo import CpuInfo, parse_cpuinfo
from harness.observe.crash import Crash, classify, unexpected
from harness.observe.dmesg import Timeline
from harness.observe.mce import (
    MceConditions,
    RdmdAnswer,
    has_pw_mce_erratum,
    ordinary_pages,
    pamt_page,
    pamt_ranges,
    rdmd_expected,
    rdmd_reaches_module,
    sets_pw_mce_bug,
    tdx_message_expected,
)
from harness.seam import abi
from harness.seam.abi import Leaf, PageType, Status
from harness.seam.faults import FaultPlan, FaultRule
from harness.seam.tdmr import TdmrInfo
from harness.seam.trace import TraceRecord

log = logging.getLogger("scenarios.mce")

# QEMU 7.2 has no Sapphire Rapids model: `max` with SPR-X's family and model (docs/NOTES.md).
ERRATUM_CPU = QemuConfig(cpu_family_model=(6, 0x8F))
INIT_FAILURES = (Crash.SEAMCALL_FAILED, Crash.TDX_INIT_FAILED)
# An address inside the page, not its start: the kernel must hand RDMD the page (addr & PAGE_MASK).
OFFSET_IN_PAGE = 0x5C0
SETTLE_TIMEOUT = 120.0  # from the injection to the kernel's last word on it, under TCG
READ_BEHIND_TIMEOUT = 10.0  # from the guest's reset to the harness having read its last words
EXIT_TIMEOUT = 60.0
POLL_INTERVAL = 0.5
# Before a real #MC, this long without console output: no CPU is inside the console driver then
# (inject_hmp says why). It must outlast the serial port's runtime-PM autosuspend, which takes
# the port lock (= the nbcon console) SERIAL_PORT_AUTOSUSPEND_DELAY_MS = 500 ms after the last
# transmission (drivers/tty/serial/serial_port.c): 0.5 s injected right into it.
QUIET_SECONDS = 2.0
# mce_reign()'s panic (arch/x86/kernel/cpu/mce/core.c); a CPU that gave up on the monarch panics
# with "Panicing machine check CPU died" instead.
MONARCH_PANIC = "Fatal machine check"


class Target(enum.Enum):
    PAMT = "a PAMT page"
    KERNEL_MEMORY = "plain kernel memory"
    TD_PRIVATE = "a page the module holds for a TD"


@dataclass(frozen=True)
class Case:
    config: QemuConfig
    target: Target
    message: bool  # on a fatal #MC, by the kernel's rules (module docstring)
    faults: tuple[FaultRule, ...] = ()
    platform: dict[str, object] = field(default_factory=dict)  # PlatformConfig fields
    boot_message: re.Pattern[str] = patterns.INITIALIZED  # how TDX ended up at boot
    at_boot: tuple[Crash, ...] = ()  # trouble the boot is expected to report
    host_platform: bool = True  # tdx_init() accepts the platform (enough TDX KeyIDs)

    @property
    def initialized(self) -> bool:
        return self.boot_message is patterns.INITIALIZED


CASES = {
    "pamt_page": Case(ERRATUM_CPU, Target.PAMT, message=True),
    "kernel_memory": Case(ERRATUM_CPU, Target.KERNEL_MEMORY, message=False),
    "td_private_page": Case(ERRATUM_CPU, Target.TD_PRIVATE, message=True),
    # The module would call the page private, but it is not ready: its answer must not count.
    "module_not_initialized": Case(
        ERRATUM_CPU, Target.TD_PRIVATE, message=False,
        faults=(FaultRule(Leaf.TDH_SYS_CONFIG, abi.with_info(Status.TDX_INVALID_TDMR, 0)),),
        boot_message=patterns.INIT_FAILED, at_boot=INIT_FAILURES),
    "no_tdx_keyids": Case(ERRATUM_CPU, Target.TD_PRIVATE, message=False, platform={"nr_tdx_keyids": 0},
                          boot_message=patterns.NOT_SUPPORTED, host_platform=False),
    "no_erratum_cpu": Case(QemuConfig(), Target.PAMT, message=False),
}


class Path(enum.Enum):
    MCE_INJECT_HW = "mce_inject_hw"
    MCE_INJECT_SW = "mce_inject_sw"
    HMP = "hmp"

    @property
    def reaches_panic(self) -> bool:
        """A real #MC goes through do_machine_check() and, when fatal, mce_panic(); a logged-only
        record never does."""
        return self is not Path.MCE_INJECT_SW


@dataclass
class Outcome:
    log: Timeline  # kernel messages from the injection on
    rdmds: list[TraceRecord]  # RDMD calls from the injection on
    injected_at: float  # module trace clock
    facts: dict[str, object] = field(default_factory=dict)


# --- the scenarios ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", [Path.MCE_INJECT_HW, Path.HMP], ids=lambda p: p.value)
def test_fatal_memory_error(boot, platform_config, path, name):
    check_case(boot, platform_config, path, CASES[name])


def test_logged_only_record_never_asks_the_module(boot, platform_config):
    """mce-inject's "sw" mode only logs the record: the #MC handler, mce_panic() and the TDX check
    never run, even on the erratum CPU with the error in a PAMT page."""
    check_case(boot, platform_config, Path.MCE_INJECT_SW, CASES["pamt_page"])


def test_broadcast_mce_with_another_cpu_inside_a_seamcall(boot, platform_config):
    """A broadcast #MC catches CPU 1 in the middle of a SEAMCALL (the module withholds its
    P-SEAMLDR.INFO answer, so CPU 1 holds the shim's wire; on hardware that SEAMCALL would have
    completed first). mce_panic()'s RDMD must still be answered within the #MC rendezvous (about
    1 s, then the other CPUs panic on their own): the shim takes the wire from the stopped CPU
    and the TDX line prints as without the held call."""
    outcome = check_case(boot, platform_config, Path.HMP, CASES["pamt_page"], hold_cpu=1)
    takeover = outcome.log.expect(patterns.SHIM_WIRE_TAKEOVER)
    assert int(takeover["holder"]) == 1, takeover.string
    assert int(takeover["cpu"]) == outcome.rdmds[0].cpu, (takeover.string, outcome.rdmds[0])
    assert outcome.log.expect(patterns.MCE_KERNEL_PANIC)["reason"] == MONARCH_PANIC


def check_case(boot, platform_config, path: Path, case: Case, hold_cpu: int | None = None) -> Outcome:
    """The case on ``path``; with ``hold_cpu``, that CPU sits inside a SEAMCALL (holding the
    shim's wire) when the #MC comes."""
    machine = boot(case.config, platform=platform_config(**case.platform),
                   faults=FaultPlan(list(case.faults)), append=HOLD_APPEND if hold_cpu is not None else "")
    cpu = guest_cpu(machine)
    host_platform = "tdx_host_platform" in cpu.flags
    assert host_platform is case.host_platform, f"X86_FEATURE_TDX_HOST_PLATFORM is {host_platform}: {cpu}"
    assert has_pw_mce_erratum(cpu.vendor, cpu.family, cpu.model) is (case.config.cpu_family_model is not None), \
        f"the CPU is not the one configured: {cpu}"
    erratum = sets_pw_mce_bug(cpu.vendor, cpu.family, cpu.model, host_platform)
    assert ("tdx_pw_mce" in cpu.bugs) is erratum, f"X86_BUG_TDX_PW_MCE should be {erratum}: {cpu}"
    kernel_log(machine, allow=case.at_boot).expect(case.boot_message)

    tdmrs = [tdmr.info for tdmr in machine.module.state.tdmrs]
    mce = uncorrected_memory_error(aim(machine, case.target, tdmrs) + OFFSET_IN_PAGE)
    cond = MceConditions(erratum=erratum, host_platform=host_platform,
                         reaches_panic=path.reaches_panic and mce.is_fatal(), vmx_operation=case.initialized)
    # From the injection on: the #MC itself, a #UD RDMD when the kernel asks outside VMX operation.
    provoked = (Crash.SEAMCALL_UD,) if rdmd_expected(mce, cond) and not cond.vmx_operation else ()
    if hold_cpu is not None:
        load_tdx_host(machine)
        hold_inside_seamcall(machine, hold_cpu)
        provoked += (Crash.WIRE_TAKEOVER,)
    if path is Path.HMP:
        outcome = inject_hmp(machine, mce, allowed=provoked)
    else:
        outcome = inject_debugfs(machine, mce, InjectFlags.HW if path is Path.MCE_INJECT_HW else InjectFlags.SW,
                                 (Crash.MCE, *case.at_boot, *provoked))

    answer = check_rdmd(outcome, mce, cond, case)
    # Measured figures (module trace clock, seconds from the injection): log and run directory.
    log.info("%s: %s", path.value, outcome.facts)
    (machine.run_dir / "mce-facts.json").write_text(json.dumps(outcome.facts, indent=2) + "\n")

    expected = tdx_message_expected(mce, cond, answer, pamt_ranges(tdmrs))
    assert expected is (case.message and path.reaches_panic), "the kernel model disagrees with the case table"
    if path.reaches_panic:
        # mce_panic(): the record, the TDX line when the kernel decided so, then the (fake) panic.
        ending = patterns.MCE_KERNEL_PANIC if path is Path.HMP else patterns.MCE_FAKE_PANIC
        outcome.log.expect_in_order([patterns.MCE_RECORD, *([patterns.MCE_TDX_PRIVATE_LINE] if expected else []),
                                     ending])
        check_record(outcome.log, mce)
    if not expected:
        outcome.log.expect_absent(patterns.MCE_TDX_PRIVATE)
    if path is not Path.HMP:  # fake_panic: the machine lives on
        assert machine.run("echo alive", 30).output.strip() == "alive"
    return outcome


# --- steps --------------------------------------------------------------------------------------

def guest_cpu(machine: QemuMachine) -> CpuInfo:
    result = machine.run("cat /proc/cpuinfo", 30)
    assert result.status == 0, result.output[-500:]
    return parse_cpuinfo(result.output)


def aim(machine: QemuMachine, target: Target, tdmrs: list[TdmrInfo]) -> int:
    """The page to put the error in, computed from what the module received in SYS.CONFIG."""
    if target is Target.PAMT:
        return pamt_page(tdmrs)
    page, tdr = ordinary_pages(machine.config.ram_ranges(), tdmrs, 2)
    if target is Target.TD_PRIVATE:
        # KVM cannot build a TD here yet: the module is told directly that a TD owns the page.
        machine.module.state.assign_page(page, PageType.PT_REG, owner=tdr)
    return page


def inject_debugfs(machine: QemuMachine, mce: Mce, flags: InjectFlags, allowed: tuple[Crash, ...]) -> Outcome:
    """mce-inject with fake_panic (the machine survives mce_panic()) and without the rendezvous
    (mce-inject raises #MC on one CPU only; debugfs_setup_command() says why)."""
    setup = machine.run(debugfs_setup_command(fake_panic=True, rendezvous=False), 60)
    assert setup.status == 0, f"mce-inject setup failed: {setup.output[-500:]}"
    mark = len(kernel_log(machine, allow=allowed).records)
    trace_mark, injected_at = len(machine.module.trace), machine.module.trace.now()
    result = machine.run(mce.debugfs_command(flags), 60)
    assert result.status == 0, f"mce-inject refused the injection: {result.output[-500:]}"
    # The hw injection runs on the target CPU asynchronously: wait for the kernel's last word.
    settled = patterns.MCE_FAKE_PANIC if flags is InjectFlags.HW else patterns.MCE_LOGGED
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        log = kernel_log(machine, allow=allowed).since(mark)
        if log.find(settled) or time.monotonic() > deadline:
            break
        time.sleep(POLL_INTERVAL)
    log.expect(settled)
    return Outcome(log, rdmds_since(machine, trace_mark), injected_at,
                   {"settled_s": round(machine.module.trace.now() - injected_at, 3)})


def inject_hmp(machine: QemuMachine, mce: Mce, allowed: tuple[Crash, ...] = ()) -> Outcome:
    """A real #MC from QEMU; the fatal error panics the guest, which resets itself (panic=-1);
    QEMU holds it paused there (postmortem.hold_at_reset) and is then told to quit. Everything
    is read from the console log the harness kept.

    The 8250 is an nbcon console in Linux 7.3: a CPU that the broadcast #MC catches holding the
    port lock keeps the console, panic() cannot print, and with panic=-1 it reboots before its
    last-resort takeover (nbcon_atomic_flush_unsafe): all the panic text is lost. So the
    injection waits for a console quiet for longer than the port's runtime autosuspend (see
    QUIET_SECONDS): the shell prints on a port of its own (COM4, whose lock is not the console's),
    so only the kernel's own messages keep the console busy (docs/NOTES.md). Should the text
    still be missing, the paused guest's memory says why (silent-panic.txt in the run directory:
    panic CPU, console owner, unprinted log)."""
    machine.kernel_ending("machine check")  # before the quiet wait: a coverage dump prints
    qmp = machine.qmp()
    postmortem.hold_at_reset(qmp)
    machine.wait_quiet(QUIET_SECONDS, SETTLE_TIMEOUT)
    line_mark = len(machine.console_lines())
    trace_mark, injected_at = len(machine.module.trace), machine.module.trace.now()
    reply = qmp.hmp(mce.hmp_command()).strip()
    if "not supported" in reply:
        pytest.skip(f"QEMU cannot inject machine checks into this CPU model: {reply}")
    assert not reply, f"QEMU refused `{mce.hmp_command()}`: {reply}"
    try:
        qmp.wait_status(Deadline.after(SETTLE_TIMEOUT), "shutdown")
    except QmpError as err:
        raise AssertionError(f"QEMU took the HMP mce command but the guest did not reset: {err}") from err
    reset_at = machine.module.trace.now()
    try:  # the text went out before the reset; the reader may still be behind
        machine.expect(patterns.MCE_KERNEL_PANIC, READ_BEHIND_TIMEOUT)
    except ChannelTimeout as err:
        report = machine.run_dir / "silent-panic.txt"
        found = postmortem.examine(qmp, postmortem.kernel_symbols(machine.boot.kernel), machine.run_dir / "memory.bin")
        report.write_text(found.render() + "\n")
        raise AssertionError(f"the guest reset after the #MC without printing its panic; panic_cpu "
                             f"{found.panic_cpu}, serial console {found.console}; see {report}") from err
    qmp.command("quit")
    exitcode = machine.wait_exit(EXIT_TIMEOUT)
    assert exitcode == 0, f"QEMU did not quit when told to (exit code {exitcode})"
    log = Timeline.from_console(machine.console_lines()[line_mark:], machine.console_log)
    surprises = unexpected(classify(log.records), (Crash.MCE, Crash.PANIC, *allowed))
    assert not surprises, "unexpected kernel trouble:\n" + "\n".join(f"  {f}" for f in surprises)
    log.expect(patterns.MCE_KERNEL_PANIC)
    return Outcome(log, rdmds_since(machine, trace_mark), injected_at,
                   {"reset_s": round(reset_at - injected_at, 3)})


def rdmds_since(machine: QemuMachine, trace_mark: int) -> list[TraceRecord]:
    return [r for r in machine.module.trace.of_leaf(Leaf.TDH_PHYMEM_PAGE_RDMD) if r.seq >= trace_mark]


def check_rdmd(outcome: Outcome, mce: Mce, cond: MceConditions, case: Case) -> RdmdAnswer | None:
    """The RDMD calls the kernel made during the MCE: one exactly when its rules say it asks,
    for the page of the error address; returns the answer the kernel got (TDX_SEAMCALL_UD for a
    call that was #UD outside VMX operation and so never reached the module)."""
    reaches = rdmd_reaches_module(mce, cond)
    assert len(outcome.rdmds) == int(reaches), \
        f"expected {int(reaches)} RDMD call(s) in the module's trace after the injection, it has {outcome.rdmds}"
    if rdmd_expected(mce, cond) and not reaches:
        ud = outcome.log.expect(patterns.SHIM_SEAMCALL_UD)
        assert int(ud["fn"], 16) == Leaf.TDH_PHYMEM_PAGE_RDMD, ud.string
        return RdmdAnswer(Status.TDX_SEAMCALL_UD)
    if not reaches:
        return None
    call = outcome.rdmds[0]
    assert call.inputs["rcx"] == mce.page, f"RDMD for {call.inputs['rcx']:#x}, the error is at {mce.addr:#x}"
    assert call.time >= outcome.injected_at
    outcome.facts.update(rdmd_after_injection_s=round(call.time - outcome.injected_at, 3), rdmd_cpu=call.cpu,
                         rdmd_status=call.status_name)
    # On success RCX holds the page type (the trace keeps only outputs that changed).
    answer = RdmdAnswer(call.status) if call.status else RdmdAnswer(0, call.outputs.get("rcx", call.inputs["rcx"]))
    # The module answered what the test arranged.
    arranged = {Target.PAMT: PageType.PT_RSVD, Target.KERNEL_MEMORY: PageType.PT_NDA,
                Target.TD_PRIVATE: PageType.PT_REG}[case.target]
    assert answer == RdmdAnswer(0, arranged), f"module answered {call}, arranged {arranged.name}"
    return answer


def check_record(log: Timeline, mce: Mce) -> None:
    """mce_panic() printed our bank's record: the status as injected, the address at the
    granularity MISC gives (a page)."""
    records = log.matches(patterns.MCE_RECORD)
    ours = [m for m in records if int(m["status"], 16) == mce.status and int(m["bank"]) == mce.bank]
    assert ours, f"no record of bank {mce.bank} with status {mce.status:#x}; records: {[m.string for m in records]}"
    addr = log.expect(patterns.MCE_RECORD_ADDR)
    assert int(addr["addr"], 16) == mce.page, addr.string

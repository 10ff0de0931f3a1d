"""The flows a sweep replays: each starts a machine from nothing with the run's fault plan,
drives the kernel through one piece of the TDX host code, and gathers the evidence the outcome
classifier reads. Written as the scenarios are (the same machine API and observers); a flow
never asserts: what it sees is the run's result, whatever the kernel did."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from harness import paths
from harness.launch import Images, start_machine
from harness.machine.base import Machine, MachineError
from harness.machine.bochs import BOOT_TIMEOUT as BOCHS_BOOT_TIMEOUT
from harness.machine.bochs import TD_MIN_IPS, BochsConfig, BochsMachine, start_bochs_machine
from harness.machine.bochs_install import fetch_bochs
from harness.machine.channel import ChannelError, ChannelTimeout
from harness.machine.qemu import QemuConfig, QemuMachine
from harness.observe import kvm, page_owner, patterns
from harness.observe.dmesg import Record, parse_console, read_kmsg
from harness.observe.page_owner import Stack
from harness.seam.faults import FaultPlan
from harness.seam.module import TdxModule
from harness.seam.state import SysState
from harness.seam.trace import TraceRecord

log = logging.getLogger("harness.sweep")

COMMAND_TIMEOUT = 60.0
POWER_OFF_TIMEOUT = 30.0
PAGE = 4096
# Linux allocates each TDMR's PAMT with alloc_contig_pages() (tdmr_set_up_pamt(), an __init
# function GCC inlines into tdx_enable()).
PAMT_ALLOCATOR = ("alloc_contig",)
PAMT_CALLERS = ("tdmr_set_up_pamt", "tdmrs_set_up_pamt_all", "construct_tdmrs", "init_tdx_module", "tdx_enable")


@dataclass(frozen=True)
class FlowResult:
    """What one run of a flow saw."""

    trace: Sequence[TraceRecord]
    records: Sequence[Record]
    usable: bool
    hang_report: str | None = None
    leaks: Sequence[str] = ()
    inconsistencies: Sequence[str] = ()
    error: str | None = None
    told: Sequence[str] = ()  # what user space was told of a failure (an ioctl's errno, a refused insmod)
    window: int = 0  # the first trace record of the flow's own part: calls before it (a boot) are not swept


@dataclass(frozen=True)
class FlowContext:
    images: Images
    run_dir: Path
    faults: FaultPlan
    timeout: float  # for the flow's long waits (the boot)


class Flow(Protocol):
    name: str
    description: str
    # The kernel lines by which it says a SEAMCALL of this flow failed.
    reported_by: tuple[re.Pattern[str], ...]

    def run(self, context: FlowContext) -> FlowResult: ...


def read_kernel_log(machine: Machine) -> list[Record]:
    """The kernel's whole log from /dev/kmsg over the command channel."""
    result = machine.run("tdxh-kmsg", COMMAND_TIMEOUT)
    if result.status != 0:
        raise MachineError(f"tdxh-kmsg exited {result.status}: {result.output[-300:]}")
    dump = read_kmsg(result.output.splitlines())
    if dump.damage:
        raise MachineError(f"the kernel log from /dev/kmsg is damaged: {'; '.join(dump.damage[:3])}")
    return dump.records


def read_page_owners(machine: Machine) -> list[Stack]:
    result = machine.run(f"cat {page_owner.SHOW_STACKS}", COMMAND_TIMEOUT)
    if result.status != 0:
        raise MachineError(f"reading {page_owner.SHOW_STACKS} exited {result.status} (a kernel without "
                           f"CONFIG_PAGE_OWNER, or booted without {page_owner.APPEND}?): {result.output[-200:]}")
    return page_owner.parse_stacks(result.output.splitlines())


def pamt_pages(module: TdxModule) -> int:
    """The pages of the PAMTs of the TDMRs the kernel configured (TDH.SYS.CONFIG ran): the 4K, 2M
    and 1G parts of each, which Linux allocates as one range (tdmr_get_pamt())."""
    return sum(t.info.pamt_4k_size + t.info.pamt_2m_size + t.info.pamt_1g_size for t in module.state.tdmrs) // PAGE


class BootFlow:
    """TDX module initialization at boot (subsys_initcall tdx_enable()): SYS.INIT and LP.INIT
    from the CPU hotplug callback, the SYS.RD metadata reads, SYS.CONFIG, KEY.CONFIG on each
    package, the TDMR.INIT loop. After a failure the kernel must go on booting, say so
    (seamcall_err(), "TDX-Module initialization failed", "module not loaded"), and give the
    PAMTs back (init_tdx_module()'s err_free_pamts / err_reset_pamts)."""

    name = "boot"
    description = "TDX module initialization at boot"
    reported_by: tuple[re.Pattern[str], ...] = (patterns.SEAMCALL_FAILED, patterns.INIT_FAILED, patterns.NOT_LOADED)

    def __init__(self, config: QemuConfig | None = None) -> None:
        self.config = config or QemuConfig()

    def run(self, context: FlowContext) -> FlowResult:
        machine = start_machine(context.images, self.config, context.run_dir, faults=context.faults,
                                append=page_owner.APPEND)
        try:
            return self._observe(machine, context)
        finally:
            machine.stop()

    def _observe(self, machine: QemuMachine, context: FlowContext) -> FlowResult:
        module = machine.module
        try:
            machine.wait_ready(context.timeout)
            records = read_kernel_log(machine)
            alive = machine.run("echo alive", COMMAND_TIMEOUT).output.strip() == "alive"
        except (ChannelError, MachineError) as err:
            report = machine.hang_report() if isinstance(err, ChannelTimeout) else None
            log.info("%s: the guest did not answer: %s", context.run_dir.name, str(err).splitlines()[0])
            return FlowResult(list(module.trace), parse_console(machine.console_lines()), usable=False,
                              hang_report=str(report) if report else None)
        initialized = any(patterns.INITIALIZED.search(r.text) for r in records)
        try:
            leaks, held = self._pamt_held(machine, pamt_pages(module), initialized)
        except (ChannelError, MachineError) as err:
            return FlowResult(list(module.trace), records, usable=alive, error=f"PAMT check: {err}")
        # Before the power-off, whose TDH.SYS.DISABLE resets the module.
        inconsistencies = [*self._inconsistencies(module, initialized), *held]
        try:
            machine.power_off(POWER_OFF_TIMEOUT)
        except (ChannelError, MachineError) as err:
            log.warning("%s: power-off: %s", context.run_dir.name, err)
        return FlowResult(list(module.trace), records, usable=alive, leaks=leaks, inconsistencies=inconsistencies)

    @staticmethod
    def _inconsistencies(module: TdxModule, initialized: bool) -> list[str]:
        """The kernel said "TDX-Module initialized": the module must be ready with every TDMR
        initialized whole (the kernel would hand out memory the module cannot use)."""
        if not initialized:
            return []
        found = []
        if module.state.sys is not SysState.SYS_READY:
            found.append(f"the kernel printed 'TDX-Module initialized'; the module is {module.state.sys.value}")
        partial = [t for t in module.state.tdmrs if t.initialized < t.info.size]
        if partial:
            t = partial[0]
            found.append(f"the kernel printed 'TDX-Module initialized'; {len(partial)} TDMR(s) not fully initialized "
                         f"(TDMR {t.info.base:#x}: {t.initialized:#x} of {t.info.size:#x} bytes)")
        return found

    @staticmethod
    def _pamt_held(machine: Machine, expected: int, initialized: bool) -> tuple[list[str], list[str]]:
        """The PAMT pages the kernel still holds (page owner: alloc_contig_pages() from the TDX
        init code), as leaks and inconsistencies. Initialized, it holds exactly the PAMTs of the
        TDMRs the module received; after a failed init, none (init_tdx_module() frees them on
        every error path after construct_tdmrs())."""
        held = page_owner.pages_held(read_page_owners(machine), PAMT_ALLOCATOR, PAMT_CALLERS)
        if initialized and held != expected:
            return [], [f"the kernel holds {held} pages allocated for PAMTs (page owner); the TDMRs the module "
                        f"received have {expected} PAMT pages"]
        if not initialized and held:
            return [f"{held} pages ({held * PAGE // 1024} KB) the TDX init code allocated with alloc_contig_pages() "
                    f"are still held after the init failed (page owner)"], []
        return [], []


class KvmCreateFlow:
    """KVM builds a TD up to KVM_TDX_FINALIZE_VM with the agent (Documentation/virt/kvm/x86/
    intel-tdx.rst: INIT_VM, a vCPU, INIT_VCPU, INIT_MEM_REGION, FINALIZE_VM), then the agent exits
    and KVM tears the TD down; kvm_intel is unloaded last. On Bochs (emulated VMX). A failed call
    must come back to user space as an errno (or a refused insmod), and the teardown must leave
    the module holding no TD, no page of one and no guest KeyID (tdx_reclaim_page(),
    tdx_mmu_release_hkid())."""

    name = "kvm-create"
    description = "KVM creates, finalizes and destroys a TD (Bochs)"
    reported_by: tuple[re.Pattern[str], ...] = (patterns.KVM_SEAMCALL_FAILED, patterns.SEAMCALL_FAILED)
    steps = tuple(kvm.FINALIZED)

    def __init__(self, config: BochsConfig | None = None) -> None:
        self.config = config or BochsConfig(cpus=1, memory="1G", ips=TD_MIN_IPS)

    def run(self, context: FlowContext) -> FlowResult:
        install = fetch_bochs(paths.cache_dir())
        machine = start_bochs_machine(context.images, self.config, context.run_dir, faults=context.faults,
                                      install=install)
        try:
            return self._observe(machine, context)
        finally:
            machine.stop()

    def _observe(self, machine: BochsMachine, context: FlowContext) -> FlowResult:
        module = machine.module
        window = 0
        told: list[str] = []
        try:
            machine.wait_ready(BOCHS_BOOT_TIMEOUT)
            window = len(module.trace)
            loaded = machine.run(kvm.LOAD_KVM_INTEL, kvm.KVM_TIMEOUT)
            if loaded.status != 0:
                told.append(f"`{kvm.LOAD_KVM_INTEL}` exited {loaded.status}: {loaded.output.strip()[-200:]}")
            else:
                told += self._agent(machine)
                unloaded = machine.run(kvm.UNLOAD_KVM_INTEL, kvm.KVM_TIMEOUT)
                if unloaded.status != 0:
                    told.append(f"`{kvm.UNLOAD_KVM_INTEL}` exited {unloaded.status}: {unloaded.output.strip()[-200:]}")
            records = read_kernel_log(machine)
        except (ChannelError, MachineError) as err:
            log.info("%s: the guest did not answer: %s", context.run_dir.name, str(err).splitlines()[0])
            return FlowResult(list(module.trace), parse_console(machine.console_lines()), usable=False,
                              told=told, window=window)
        leaks = td_leftovers(module)
        try:
            machine.power_off(POWER_OFF_TIMEOUT)
        except (ChannelError, MachineError) as err:
            log.warning("%s: power-off: %s", context.run_dir.name, err)
        return FlowResult(list(module.trace), records, usable=True, leaks=leaks, told=told, window=window)

    def _agent(self, machine: BochsMachine) -> list[str]:
        try:
            run = kvm.run_agent(machine, self.steps, kvm.KVM_TIMEOUT)
        except kvm.AgentError as err:  # a step that killed the agent: user space saw that too
            return [f"the agent did not finish: {str(err).splitlines()[0]}"]
        return [f"{step.step}: {step.ioctl} returned {step.ret}, errno {step.errno}, hw_error {step.hw_error:#x}"
                for step in run.failed()]


def td_leftovers(module: TdxModule) -> list[str]:
    """What the module still holds for TDs after KVM let go of them all: TDs, pages assigned to
    one, guest KeyIDs (the module's global KeyID stays)."""
    state = module.state
    found = []
    if state.tds:
        found.append(f"{len(state.tds)} TD(s) still in the module (TDR {', '.join(hex(t) for t in state.tds)})")
    if state.pages:
        kinds = sorted({o.page_type.name for o in state.pages.values()})
        found.append(f"{len(state.pages)} page(s) still assigned to TDs ({', '.join(kinds)})")
    keyids = sorted(set(state.kot) - {state.global_keyid})
    if keyids:
        found.append(f"guest KeyID(s) not freed: {keyids}")
    return found


FLOWS: dict[str, Flow] = {flow.name: flow for flow in (BootFlow(), KvmCreateFlow())}

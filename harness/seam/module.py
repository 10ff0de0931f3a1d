"""The software TDX module: the SEAMCALL entry point and its dispatcher (leaf encoding, module
state, then the leaf), fault injection, the trace, and the machine events (boot, snapshot, power
cycle). The leaves live beside it: the host-initialization ones in host_init.py, the TD ones in
td.py, both on the state of state.py; ``_HANDLERS`` below registers them.

Lifecycle (as the real module): SYSINIT_PENDING -TDH.SYS.INIT-> SYSINIT_DONE -TDH.SYS.LP.INIT on
every LP, TDH.SYS.CONFIG-> SYSCONFIG_DONE -TDH.SYS.KEY.CONFIG on every package-> SYS_READY
(TDH.SYS.TDMR.INIT until each TDMR is initialized) -TDH.SYS.DISABLE-> SYS_SHUTDOWN, from which only
TDH.SYS.INIT starts over. A runtime update: SYS_READY -TDH.SYS.SHUTDOWN-> SYS_SHUTDOWN with handoff
data, SEAMLDR.INSTALL on every LP (seamldr.py) loads the new module in SYSINIT_PENDING, then
TDH.SYS.INIT, LP.INIT on every LP and TDH.SYS.UPDATE take it to SYS_READY with the old state.
The state survives guest reboots and kexec, as firmware state does; ``power_cycle()`` models a
machine reset or power-off.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.bounded import FirstReports
from harness.seam import abi, host_init, locks, seamldr, td
from harness.seam.abi import Leaf, OperandId, Status
from harness.seam.call import Call, SeamcallRequest, SeamcallResult, as_loaded, loaded_registers
from harness.seam.exits import ExitScript
from harness.seam.faults import FaultPlan
from harness.seam.memory import MemoryAccessError, PhysicalMemory
from harness.seam.platform import PlatformConfig
from harness.seam.profiles import MAX_LEAF_VERSION
from harness.seam.sites import RawSite, raw_site
from harness.seam.state import Handler, LoaderState, ModuleState, Seam, SysState
from harness.seam.trace import REGISTERS, Trace, TraceRecord

log = logging.getLogger("harness.seam")


@dataclass(frozen=True)
class HelloAck:
    module_present: bool
    nr_mktme_keyids: int
    nr_tdx_keyids: int
    no_seamret_invd_vmcs: bool  # IA32_VMX_BASIC bit 60: P-SEAMLDR calls keep the current VMCS


@dataclass(frozen=True)
class ModuleSnapshot:
    """The module as a saved machine left it: its state, the P-SEAMLDR's, the boots it saw and
    its trace so far (the platform and fault plan belong to the machine's configuration, not to
    the snapshot)."""

    state: ModuleState
    loader: LoaderState
    boots: int
    records: tuple[TraceRecord, ...]


class TdxModule:
    """Dispatches SEAMCALLs against the platform config, the fault plan and the module state."""

    def __init__(self, platform: PlatformConfig | None = None, faults: FaultPlan | None = None,
                 trace: Trace | None = None) -> None:
        self.faults = FaultPlan() if faults is None else faults
        self.trace = Trace() if trace is None else trace  # an empty Trace is falsy
        # The exits are what TDH.VP.ENTER reports: the guest is scripted, not run.
        platform = PlatformConfig() if platform is None else platform
        self.seam = Seam(platform, ModuleState(), LoaderState.for_platform(platform), ExitScript(),
                         clock=self.trace.now)
        self.boots = 0
        self.anomalies: FirstReports[str] = FirstReports()
        self.contention = locks.Contention()
        # Names the CALL sites in the trace: the machine sets the kernel's symbols
        # (harness/kernel/symbols.py SiteResolver.resolve).
        self.resolve_site: Callable[[RawSite], str | None] = raw_site

    @property
    def platform(self) -> PlatformConfig:
        return self.seam.platform

    @property
    def exits(self) -> ExitScript:
        return self.seam.exits

    @property
    def state(self) -> ModuleState:
        return self.seam.state

    @state.setter
    def state(self, state: ModuleState) -> None:
        self.seam.state = state

    # --- machine events ----------------------------------------------------------------------

    def save_config(self, run_dir: Path) -> None:
        """What this module was set up with, beside a run's logs: platform.json, faults.json."""
        # sets (an LP's deviations) as sorted lists
        (run_dir / "platform.json").write_text(json.dumps(dataclasses.asdict(self.platform), indent=2, default=sorted))
        (run_dir / "faults.json").write_text(self.faults.to_json())

    def snapshot(self) -> ModuleSnapshot:
        return ModuleSnapshot(copy.deepcopy(self.state), copy.deepcopy(self.seam.loader), self.boots,
                              tuple(self.trace.records))

    def restore(self, snap: ModuleSnapshot) -> None:
        """Continue from ``snap``: as the firmware state of a machine restored from a file."""
        self.state, self.boots = copy.deepcopy(snap.state), snap.boots
        self.contention.clear()
        self.seam.loader = copy.deepcopy(snap.loader)
        for record in snap.records:
            self.trace.append(record)
        if snap.records:  # the trace's clock goes on from the last call, not from zero
            self.trace.start = time.monotonic() - snap.records[-1].time

    def power_cycle(self) -> None:
        """Machine reset or power-off: the BIOS reloads its module, all state is gone."""
        self.state = ModuleState()
        self.seam.loader = LoaderState.for_platform(self.platform)
        self.contention.clear()

    def hello(self, nr_cpus: int, boot_apic_id: int) -> HelloAck:
        """A kernel started talking (boot, reboot or kexec): record it, answer the partition."""
        self.boots += 1
        self.contention.clear()  # a kernel that starts has no CPU inside a SEAMCALL
        if nr_cpus != len(self.platform.cpus):
            self.anomaly(f"boot {self.boots}: kernel reports {nr_cpus} possible CPUs, platform has "
                         f"{len(self.platform.cpus)}")
        log.info("HELLO boot %d: %d CPUs, boot APIC id %d, module state %s", self.boots, nr_cpus,
                 boot_apic_id, self.state.sys.value)
        return HelloAck(self.platform.module_present, self.platform.nr_mktme_keyids, self.platform.nr_tdx_keyids,
                        not self.platform.seamret_invd_vmcs_erratum)

    def anomaly(self, text: str) -> None:
        if self.anomalies.append(text):
            log.warning("%s", text)
        elif self.anomalies.dropped == 1:
            log.warning("more than %d anomalies: later ones are counted, not kept or logged", self.anomalies.limit)

    def return_refused(self, reason: str) -> str:
        """The guest did not take the last call's RETURN (it arrived corrupted, or the wrong
        size): the kernel saw VMFAILINVALID, whatever the module decided. The record says so,
        and so does an anomaly, which is returned."""
        record = self.trace.amend_last(f"RETURN refused by the guest ({reason}): the kernel saw VMFAILINVALID")
        text = (f"call {record.seq} ({record.leaf}, {record.status_name} in the trace): the guest refused its "
                f"RETURN ({reason}); the kernel saw VMFAILINVALID")
        self.anomaly(text)
        return text

    # --- the SEAMCALL entry point -------------------------------------------------------------

    def call(self, sent: SeamcallRequest, memory: PhysicalMemory) -> SeamcallResult:
        request = as_loaded(sent)
        number = abi.leaf_key(request.fn)
        package = self.platform.package_of(request.cpu)
        call = Call(request, memory, package)
        self.contention.leave(request.cpu)
        nth = self.state.calls_per_leaf.get(number, 0) + 1
        self.state.calls_per_leaf[number] = nth
        rule = self.faults.match(number, nth, request.cpu, package, request.reg("rdx"))
        injected = None if rule is None else rule.describe()
        if rule is not None and not rule.withhold:
            status = int(rule.status)
        else:
            try:
                status = int(self._dispatch(call))
            except Exception as err:
                # The exchange ends without a RETURN (the transport answers ERROR, the shim then
                # returns VMFAILINVALID to the kernel): the trace still shows the call.
                self._record(request, request.regs, Status.TDX_SEAMCALL_VMFAILINVALID, None, f"aborted: {err}")
                raise
        seen = tuple(call.outputs.get(name, value) for name, value in zip(REGISTERS, request.regs))
        self._record(request, seen, status, injected, call.note)
        # The registers the leaf did not write go back as the kernel sent them.
        return SeamcallResult(status, tuple(call.outputs.get(name, value) for name, value in zip(REGISTERS, sent.regs)),
                              withheld=rule is not None and rule.withhold)

    def _dispatch(self, call: Call) -> int:
        """tdx_vmm_dispatcher.c, in its order: the leaf encoding and version, then the module
        state (SYS_SHUTDOWN, then not SYS_READY, for all but the init leaves), then the leaf
        itself (an unknown one is OPERAND_INVALID(RAX) only there)."""
        request = call.request
        if not self.platform.module_present:
            return Status.TDX_SEAMCALL_VMFAILINVALID
        if request.fn & abi.P_SEAMLDR_LEAF_BIT:
            return self._dispatch_seamldr(call)
        if not self.seam.loader.seam_ready:
            call.note = "SEAM_READY is clear: a module update is under way or failed"
            return Status.TDX_SEAMCALL_VMFAILINVALID
        number = request.fn & abi.LEAF_NUMBER_MASK
        version = (request.fn >> abi.LEAF_VERSION_SHIFT) & abi.LEAF_VERSION_MASK
        if request.fn >> 24 or not self.platform.profile.leaf_version_ok(number, version):
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RAX)
        if self.state.disable_calls and number != Leaf.TDH_SYS_DISABLE:
            # A teardown under way locks out new TDH.SYS.* calls (Linux's tdx_sys_disable() comment).
            return Status.TDX_SYS_BUSY if number in abi.SYS_LEAVES else Status.TDX_SYS_SHUTDOWN
        # SYS.INIT after TDH.SYS.DISABLE starts over (the harness's reading of Linux: no public
        # module source implements DISABLE); after TDH.SYS.SHUTDOWN (the handoff is written) the
        # module takes LP.SHUTDOWN only, as the real one, and DISABLE (Linux's reboot path).
        if self.state.sys is SysState.SYS_SHUTDOWN and number not in (
                _DISABLED_LEAVES if self.state.handoff is None else _HANDED_OFF_LEAVES):
            return Status.TDX_SYS_SHUTDOWN
        if self.state.sys is not SysState.SYS_READY and number not in _BEFORE_READY_LEAVES:
            return Status.TDX_SYS_NOT_READY
        handler = _HANDLERS.get(number)
        if handler is None:
            if number in _KNOWN_LEAVES:
                call.note = "leaf not modelled by the software module yet"
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RAX)
        if version > MAX_LEAF_VERSION:  # each versioned leaf's own check
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RAX)
        if version > td.MODELLED_VERSION.get(number, 0):
            # The release takes this version; what it does differently is not modelled, so the
            # call fails rather than run as version 0 (the note says it is the harness's limit).
            call.note = f"version {version} of this leaf not modelled by the software module"
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RAX)
        if call.package is None:
            # Hardware has no LP outside its packages: a CPU the platform config lacks never ran
            # LP.INIT as far as the module knows (a harness set-up error; the note says so).
            call.note = f"APIC id {request.cpu} is not a CPU of the platform config"
            return Status.TDX_SYS_LP_INIT_NOT_DONE if number != Leaf.TDH_SYS_LP_INIT else \
                Status.TDX_SYS_LP_INIT_NOT_PENDING
        locks.zero_on_entry(call, number)
        busy = self.contention.acquire(self.seam, call, number)
        if busy:
            return busy
        try:
            return handler(self.seam, call)
        except MemoryAccessError as err:
            # The real module would read whatever is at that address; the shim refused it.
            call.note = str(err)
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)

    def _dispatch_seamldr(self, call: Call) -> int:
        if not self.platform.seamldr_present:
            call.note = "the platform has no P-SEAMLDR"
            return Status.TDX_SEAMCALL_VMFAILINVALID
        handler = seamldr.HANDLERS.get(abi.leaf_key(call.request.fn))
        if handler is None:
            call.note = "P-SEAMLDR leaf not modelled by the software module"
            return abi.SeamldrStatus.PSEAMLDR_EBADPARAM
        try:
            return handler(self.seam, call)
        except MemoryAccessError as err:
            call.note = str(err)
            return abi.SeamldrStatus.PSEAMLDR_EBADPARAM

    def _record(self, request: SeamcallRequest, regs: tuple[int, ...], status: int, injected: str | None,
                note: str | None) -> None:
        site, caller = [self.resolve_site(s) for s in request.sites] if request.sites else (None, None)
        self.trace.append(TraceRecord(
            seq=len(self.trace), time=round(self.trace.now(), 6), boot=self.boots, cpu=request.cpu,
            fn=request.fn, leaf=abi.leaf_name(request.fn), variant=int(request.variant),
            inputs=dict(zip(REGISTERS[:loaded_registers(request)], request.regs)),
            outputs={name: value for name, value, old in zip(REGISTERS, regs, request.regs) if value != old},
            status=status, status_name=abi.status_name(status, request.fn), injected=injected, note=note,
            site=site, caller=caller))


_HANDLERS: dict[int, Handler] = {**host_init.HANDLERS, **td.HANDLERS}
_KNOWN_LEAVES = frozenset(int(leaf) for leaf in Leaf)
# The leaves tdx_vmm_dispatcher.c lets run before SYS_READY (the rest: TDX_SYS_NOT_READY), and
# those the harness lets run after TDH.SYS.DISABLE.
_BEFORE_READY_LEAVES = frozenset({Leaf.TDH_SYS_INFO, Leaf.TDH_SYS_RD, Leaf.TDH_SYS_RDALL, Leaf.TDH_SYS_INIT,
                                  Leaf.TDH_SYS_LP_INIT, Leaf.TDH_SYS_CONFIG, Leaf.TDH_SYS_KEY_CONFIG,
                                  Leaf.TDH_SYS_LP_SHUTDOWN, Leaf.TDH_SYS_UPDATE, Leaf.TDH_SYS_DISABLE})
_DISABLED_LEAVES = frozenset({Leaf.TDH_SYS_LP_SHUTDOWN, Leaf.TDH_SYS_INIT, Leaf.TDH_SYS_DISABLE})
_HANDED_OFF_LEAVES = frozenset({Leaf.TDH_SYS_LP_SHUTDOWN, Leaf.TDH_SYS_DISABLE})

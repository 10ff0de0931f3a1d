"""The software TDX module: global, per-LP and per-package state, and the host-initialization
leaves Linux calls, with the statuses the real module returns for bad input and bad order. The
TD-management leaves KVM calls live in td.py and are registered in ``_HANDLERS`` below.

Lifecycle (as the real module): SYSINIT_PENDING -TDH.SYS.INIT-> SYSINIT_DONE -TDH.SYS.LP.INIT on
every LP, TDH.SYS.CONFIG-> SYSCONFIG_DONE -TDH.SYS.KEY.CONFIG on every package-> SYS_READY
(TDH.SYS.TDMR.INIT until each TDMR is initialized) -TDH.SYS.DISABLE-> SYS_SHUTDOWN, from which only
TDH.SYS.INIT starts over. The state survives guest reboots and kexec, as firmware state does;
``power_cycle()`` models a machine reset or power-off.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.seam import abi, td
from harness.seam.abi import Field, Leaf, OperandId, PageSize, PageType, Status
from harness.seam.exits import ExitScript
from harness.seam.faults import FaultPlan
from harness.seam.memory import MemoryAccessError, PhysicalMemory
from harness.seam.platform import PlatformConfig
from harness.seam.tdmr import TdmrChecker, TdmrInfo, tdmr_info_size
from harness.seam.trace import REGISTERS, Trace, TraceRecord

log = logging.getLogger("harness.seam")

NR_REGS = len(REGISTERS)
MD_FIELD_ID_NA = (1 << 64) - 1


class Variant(enum.IntEnum):
    """Which kernel entry issued the SEAMCALL (decides which outputs the kernel copies back)."""

    SEAMCALL = 0
    SEAMCALL_RET = 1
    SEAMCALL_SAVED_RET = 2


@dataclass(frozen=True)
class SeamcallRequest:
    cpu: int  # APIC id of the calling logical processor
    fn: int  # RAX: leaf number and version
    regs: tuple[int, ...] = (0,) * NR_REGS  # struct tdx_module_args order
    variant: Variant = Variant.SEAMCALL_RET

    def __post_init__(self) -> None:
        if len(self.regs) != NR_REGS:
            raise ValueError(f"expected {NR_REGS} registers, got {len(self.regs)}")

    def reg(self, name: str) -> int:
        return self.regs[REGISTERS.index(name)]


@dataclass(frozen=True)
class SeamcallResult:
    status: int
    regs: tuple[int, ...]


@dataclass(frozen=True)
class HelloAck:
    module_present: bool
    nr_mktme_keyids: int
    nr_tdx_keyids: int


class SysState(enum.Enum):
    SYSINIT_PENDING = "sysinit-pending"
    SYSINIT_DONE = "sysinit-done"
    SYSCONFIG_DONE = "sysconfig-done"
    SYS_READY = "ready"
    SYS_SHUTDOWN = "shutdown"


@dataclass
class TdmrState:
    info: TdmrInfo
    initialized: int = 0  # bytes from the base already initialized by TDH.SYS.TDMR.INIT

    @property
    def done(self) -> bool:
        return self.initialized >= self.info.size


@dataclass
class PageOwner:
    page_type: PageType
    owner: int = 0  # TDR PA for TD pages


@dataclass
class _Call:
    """One call in flight: request, memory, and the outputs being built."""

    request: SeamcallRequest
    memory: PhysicalMemory
    package: int | None
    outputs: dict[str, int] = field(default_factory=dict)
    note: str | None = None

    def reg(self, name: str) -> int:
        return self.request.reg(name)


Handler = Callable[["TdxModule", _Call], int]


@dataclass
class ModuleState:
    sys: SysState = SysState.SYSINIT_PENDING
    lp_initialized: set[int] = field(default_factory=set)
    packages_configured: set[int] = field(default_factory=set)
    global_keyid: int | None = None
    tdmrs: list[TdmrState] = field(default_factory=list)
    pages: dict[int, PageOwner] = field(default_factory=dict)  # by PFN
    calls_per_leaf: dict[int, int] = field(default_factory=dict)
    # TD management (harness/seam/td.py).
    tds: dict[int, td.Td] = field(default_factory=dict)  # by TDR PA
    vcpus: dict[int, td.Vcpu] = field(default_factory=dict)  # by TDVPR PA
    kot: dict[int, td.KeyState] = field(default_factory=dict)  # KeyIDs not free, by HKID
    wbinvd_pending: dict[int, set[int]] = field(default_factory=dict)  # HKID -> packages to write back
    wbcache: dict[int, td.WbCacheProgress] = field(default_factory=dict)  # by package


@dataclass(frozen=True)
class ModuleSnapshot:
    """The module as a saved machine left it: its state, the boots it saw and its trace so far
    (the platform and fault plan belong to the machine's configuration, not to the snapshot)."""

    state: ModuleState
    boots: int
    records: tuple[TraceRecord, ...]


class TdxModule:
    """Dispatches SEAMCALLs against the platform config, the fault plan and the module state."""

    def __init__(self, platform: PlatformConfig | None = None, faults: FaultPlan | None = None,
                 trace: Trace | None = None) -> None:
        self.platform = PlatformConfig() if platform is None else platform
        self.faults = FaultPlan() if faults is None else faults
        self.exits = ExitScript()  # what TDH.VP.ENTER reports (the guest is scripted, not run)
        self.trace = Trace() if trace is None else trace  # an empty Trace is falsy
        self.state = ModuleState()
        self.boots = 0
        self.anomalies: list[str] = []

    # --- machine events ----------------------------------------------------------------------

    def save_config(self, run_dir: Path) -> None:
        """What this module was set up with, beside a run's logs: platform.json, faults.json."""
        (run_dir / "platform.json").write_text(json.dumps(dataclasses.asdict(self.platform), indent=2))
        (run_dir / "faults.json").write_text(self.faults.to_json())

    def snapshot(self) -> ModuleSnapshot:
        return ModuleSnapshot(copy.deepcopy(self.state), self.boots, tuple(self.trace.records))

    def restore(self, snap: ModuleSnapshot) -> None:
        """Continue from ``snap``: as the firmware state of a machine restored from a file."""
        self.state, self.boots = copy.deepcopy(snap.state), snap.boots
        for record in snap.records:
            self.trace.append(record)
        if snap.records:  # the trace's clock goes on from the last call, not from zero
            self.trace.start = time.monotonic() - snap.records[-1].time

    def power_cycle(self) -> None:
        """Machine reset or power-off: the BIOS reloads the module, all state is gone."""
        self.state = ModuleState()

    def hello(self, nr_cpus: int, boot_apic_id: int) -> HelloAck:
        """A kernel started talking (boot, reboot or kexec): record it, answer the partition."""
        self.boots += 1
        if nr_cpus != len(self.platform.cpus):
            self.anomaly(f"boot {self.boots}: kernel reports {nr_cpus} possible CPUs, platform has "
                         f"{len(self.platform.cpus)}")
        log.info("HELLO boot %d: %d CPUs, boot APIC id %d, module state %s", self.boots, nr_cpus,
                 boot_apic_id, self.state.sys.value)
        return HelloAck(self.platform.module_present, self.platform.nr_mktme_keyids, self.platform.nr_tdx_keyids)

    def anomaly(self, text: str) -> None:
        log.warning("%s", text)
        self.anomalies.append(text)

    # --- page ownership (what TDH.PHYMEM.PAGE.RDMD reports) ----------------------------------------

    def assign_page(self, pa: int, page_type: PageType, owner: int = 0) -> None:
        self.state.pages[pa >> 12] = PageOwner(page_type, owner)

    def free_page(self, pa: int) -> None:
        """The page is back to PT_NDA (reclaimed or removed from a TD)."""
        self.state.pages.pop(pa >> 12, None)

    def page_type(self, pa: int) -> PageType:
        owner = self.state.pages.get(pa >> 12)
        if owner is not None:
            return owner.page_type
        tdmr = self._tdmr_of(pa)
        if tdmr is not None and any(tdmr.info.base + a.offset <= pa < tdmr.info.base + a.offset + a.size
                                    for a in tdmr.info.used_reserved()):
            return PageType.PT_RSVD
        return PageType.PT_NDA

    def _tdmr_of(self, pa: int) -> TdmrState | None:
        for tdmr in self.state.tdmrs:
            if tdmr.info.base <= pa < tdmr.info.end:
                return tdmr
        return None

    # --- the SEAMCALL entry point -------------------------------------------------------------

    def call(self, request: SeamcallRequest, memory: PhysicalMemory) -> SeamcallResult:
        number = request.fn & abi.LEAF_NUMBER_MASK
        package = self.platform.package_of(request.cpu)
        call = _Call(request, memory, package)
        nth = self.state.calls_per_leaf.get(number, 0) + 1
        self.state.calls_per_leaf[number] = nth
        rule = self.faults.match(number, nth, request.cpu, package, request.reg("rdx"))
        if rule is not None:
            status = int(rule.status)
            injected: str | None = rule.describe()
        else:
            injected = None
            try:
                status = int(self._dispatch(call))
            except Exception as err:
                # The exchange ends without a RETURN (the transport answers ERROR, the shim then
                # returns VMFAILINVALID to the kernel): the trace still shows the call.
                self._record(request, request.regs, Status.TDX_SEAMCALL_VMFAILINVALID, None, f"aborted: {err}")
                raise
        regs = tuple(call.outputs.get(name, value) for name, value in zip(REGISTERS, request.regs))
        self._record(request, regs, status, injected, call.note)
        return SeamcallResult(status, regs)

    def _dispatch(self, call: _Call) -> int:
        request = call.request
        if not self.platform.module_present:
            return Status.TDX_SEAMCALL_VMFAILINVALID
        if request.fn & abi.P_SEAMLDR_LEAF_BIT:
            call.note = "no P-SEAMLDR is modelled"
            return Status.TDX_SEAMCALL_VMFAILINVALID
        number = request.fn & abi.LEAF_NUMBER_MASK
        version = (request.fn >> abi.LEAF_VERSION_SHIFT) & abi.LEAF_VERSION_MASK
        handler = _HANDLERS.get(number)
        if handler is None and number in _KNOWN_LEAVES:
            call.note = "leaf not modelled by the software module yet"
        if handler is None or request.fn >> 24 or version > _MAX_VERSION.get(number, 0):
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RAX)
        try:
            return handler(self, call)
        except MemoryAccessError as err:
            # The real module would read whatever is at that address; the shim refused it.
            call.note = str(err)
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)

    def _record(self, request: SeamcallRequest, regs: tuple[int, ...], status: int, injected: str | None,
                note: str | None) -> None:
        self.trace.append(TraceRecord(
            seq=len(self.trace), time=round(self.trace.now(), 6), boot=self.boots, cpu=request.cpu,
            fn=request.fn, leaf=abi.leaf_name(request.fn), variant=int(request.variant),
            inputs=dict(zip(REGISTERS, request.regs)),
            outputs={name: value for name, value, old in zip(REGISTERS, regs, request.regs) if value != old},
            status=status, status_name=abi.status_name(status), injected=injected, note=note))

    # --- shared preconditions ------------------------------------------------------------------

    def _lp_ready(self, call: _Call) -> int:
        if self.state.sys is SysState.SYS_SHUTDOWN:
            return Status.TDX_SYS_SHUTDOWN
        if call.request.cpu not in self.state.lp_initialized:
            if self.platform.package_of(call.request.cpu) is None:
                call.note = f"APIC id {call.request.cpu} is not a CPU of the platform config"
            return Status.TDX_SYS_LP_INIT_NOT_DONE
        return 0

    def _sys_ready(self, call: _Call) -> int:
        """The caller's LP is initialized and every package has its key (TDMR.INIT onwards)."""
        status = self._lp_ready(call)
        if status:
            return status
        return Status.TDX_SYS_NOT_READY if self.state.sys is not SysState.SYS_READY else 0

    # --- host initialization leaves -----------------------------------------------------------------

    def sys_init(self, call: _Call) -> int:
        if self.state.sys not in (SysState.SYSINIT_PENDING, SysState.SYS_SHUTDOWN):
            return Status.TDX_SYS_INIT_NOT_PENDING
        if call.reg("rcx"):
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
        pages = self.state.pages if self.state.sys is SysState.SYSINIT_PENDING else {}
        calls = self.state.calls_per_leaf
        self.state = ModuleState(sys=SysState.SYSINIT_DONE, pages=pages, calls_per_leaf=calls)
        return 0

    def sys_lp_init(self, call: _Call) -> int:
        if self.state.sys is SysState.SYS_SHUTDOWN:
            return Status.TDX_SYS_SHUTDOWN
        if self.state.sys is not SysState.SYSINIT_DONE:
            return Status.TDX_SYS_LP_INIT_NOT_PENDING
        if call.request.cpu in self.state.lp_initialized:
            return Status.TDX_SYS_LP_INIT_DONE
        if call.package is None:
            call.note = f"APIC id {call.request.cpu} is not a CPU of the platform config"
            return Status.TDX_SYS_LP_INIT_NOT_PENDING
        self.state.lp_initialized.add(call.request.cpu)
        return 0

    def sys_rd(self, call: _Call) -> int:
        status = self._lp_ready(call)
        if status:
            return status
        metadata, following_ids = global_metadata(self.platform)
        field_id = call.reg("rdx")
        if field_id not in metadata:
            call.outputs.update(rdx=MD_FIELD_ID_NA, r8=0)
            return abi.with_operand(Status.TDX_METADATA_FIELD_ID_INCORRECT, OperandId.RDX)
        bits = abi.field_element_bits(field_id)
        following = following_ids[field_id]
        call.outputs.update(rdx=following, r8=metadata[field_id] & ((1 << bits) - 1))
        return 0

    def sys_config(self, call: _Call) -> int:
        if self.state.sys is SysState.SYS_SHUTDOWN:
            return Status.TDX_SYS_SHUTDOWN
        if self.state.sys is not SysState.SYSINIT_DONE:
            return Status.TDX_SYS_CONFIG_NOT_PENDING
        if len(self.state.lp_initialized) < len(self.platform.cpus):
            call.note = f"{len(self.state.lp_initialized)} of {len(self.platform.cpus)} LPs initialized"
            return Status.TDX_SYS_CONFIG_NOT_PENDING
        array_pa, count, hkid = call.reg("rcx"), call.reg("rdx"), call.reg("r8")
        if not self._shared_pa_ok(array_pa, abi.TDMR_INFO_PA_ARRAY_ALIGNMENT):
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
        if count < 1 or count > self.platform.max_tdmrs:
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RDX)
        if hkid >> 16 or hkid not in self.platform.tdx_keyids:
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.R8)
        entry_pas = [int.from_bytes(call.memory.read(array_pa + 8 * i, 8), "little") for i in range(count)]
        checker = TdmrChecker(self.platform.max_pa, self.platform.cmrs, self.platform.pamt_entry_sizes)
        size = tdmr_info_size(self.platform.max_reserved_per_tdmr)
        for entry_pa in entry_pas:
            if not self._shared_pa_ok(entry_pa, abi.TDMR_INFO_ALIGNMENT):
                return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
            status = checker.check(TdmrInfo.unpack(call.memory.read(entry_pa, size),
                                                    self.platform.max_reserved_per_tdmr))
            if status:
                return status
        self.state.tdmrs = [TdmrState(info) for info in checker.accepted]
        self.state.global_keyid = hkid
        self.state.kot[hkid] = td.KeyState.ASSIGNED  # the module's own KeyID is never free
        self.state.sys = SysState.SYSCONFIG_DONE
        return 0

    def _shared_pa_ok(self, pa: int, alignment: int) -> bool:
        return pa % alignment == 0 and pa < self.platform.max_pa

    def sys_key_config(self, call: _Call) -> int:
        status = self._lp_ready(call)
        if status:
            return status
        if self.state.sys is not SysState.SYSCONFIG_DONE:
            return Status.TDX_SYS_KEY_CONFIG_NOT_PENDING
        assert call.package is not None  # an initialized LP is a platform CPU
        if call.package in self.state.packages_configured:
            return Status.TDX_KEY_CONFIGURED
        self.state.packages_configured.add(call.package)
        if self.state.packages_configured == set(self.platform.packages):
            self.state.sys = SysState.SYS_READY
        return 0

    def sys_tdmr_init(self, call: _Call) -> int:
        status = self._sys_ready(call)
        if status:
            return status
        base = call.reg("rcx")
        tdmr = next((t for t in self.state.tdmrs if t.info.base == base), None)
        if tdmr is None:
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
        if tdmr.done:
            call.outputs["rdx"] = tdmr.info.end
            return Status.TDX_TDMR_ALREADY_INITIALIZED
        tdmr.initialized = min(tdmr.info.size, tdmr.initialized + self.platform.tdmr_init_chunk)
        call.outputs["rdx"] = tdmr.info.base + tdmr.initialized
        return 0

    def sys_disable(self, call: _Call) -> int:
        self.state.sys = SysState.SYS_SHUTDOWN
        self.state.lp_initialized.clear()
        return 0

    def phymem_page_rdmd(self, call: _Call) -> int:
        status = self._sys_ready(call)
        if status:
            return status
        pa = call.reg("rcx") & ~0xFFF
        tdmr = self._tdmr_of(pa)
        if tdmr is None or pa >= tdmr.info.base + tdmr.initialized:
            return abi.with_operand(Status.TDX_OPERAND_ADDR_RANGE_ERROR, OperandId.RCX)
        owner = self.state.pages.get(pa >> 12)
        call.outputs.update(rcx=int(self.page_type(pa)), rdx=owner.owner if owner else 0,
                            r8=int(PageSize.PT_4KB))
        return 0



def _when_ready(handler: td.Handler) -> td.Handler:
    """TD-management leaves run only once the module is ready and the LP initialized (the
    real dispatcher answers TDX_SYS_NOT_READY before looking at any operand)."""

    @functools.wraps(handler)
    def checked(module: TdxModule, call: _Call) -> int:
        return module._sys_ready(call) or handler(module, call)

    return checked


_HANDLERS: dict[int, Handler] = {
    Leaf.TDH_SYS_INIT: TdxModule.sys_init,
    Leaf.TDH_SYS_LP_INIT: TdxModule.sys_lp_init,
    Leaf.TDH_SYS_RD: TdxModule.sys_rd,
    Leaf.TDH_SYS_CONFIG: TdxModule.sys_config,
    Leaf.TDH_SYS_KEY_CONFIG: TdxModule.sys_key_config,
    Leaf.TDH_SYS_TDMR_INIT: TdxModule.sys_tdmr_init,
    Leaf.TDH_SYS_DISABLE: TdxModule.sys_disable,
    Leaf.TDH_PHYMEM_PAGE_RDMD: TdxModule.phymem_page_rdmd,
    **{leaf: _when_ready(handler) for leaf, handler in td.HANDLERS.items()},
}
_MAX_VERSION: dict[int, int] = dict(td.MAX_VERSION)
_KNOWN_LEAVES = frozenset(int(leaf) for leaf in Leaf)


@functools.lru_cache(maxsize=8)
def global_metadata(platform: PlatformConfig) -> tuple[dict[int, int], dict[int, int]]:
    """TDH.SYS.RD's view of the platform: every global field Linux reads, by field id, and for
    each field id the next one (what TDH.SYS.RD returns in RDX). Read-only: cached per platform."""
    fields: dict[int, int] = {
        Field.MINOR_VERSION: platform.minor_version,
        Field.MAJOR_VERSION: platform.major_version,
        Field.UPDATE_VERSION: platform.update_version,
        Field.TDX_FEATURES0: platform.tdx_features0,
        Field.MAX_TDMRS: platform.max_tdmrs,
        Field.MAX_RESERVED_PER_TDMR: platform.max_reserved_per_tdmr,
        Field.PAMT_4K_ENTRY_SIZE: platform.pamt_entry_sizes[0],
        Field.PAMT_2M_ENTRY_SIZE: platform.pamt_entry_sizes[1],
        Field.PAMT_1G_ENTRY_SIZE: platform.pamt_entry_sizes[2],
        Field.TDR_BASE_SIZE: platform.tdr_base_size,
        Field.TDCS_BASE_SIZE: platform.tdcs_base_size,
        Field.TDVPS_BASE_SIZE: platform.tdvps_base_size,
        Field.ATTRIBUTES_FIXED0: platform.attributes_fixed0,
        Field.ATTRIBUTES_FIXED1: platform.attributes_fixed1,
        Field.XFAM_FIXED0: platform.xfam_fixed0,
        Field.XFAM_FIXED1: platform.xfam_fixed1,
        Field.NUM_CPUID_CONFIG: len(platform.cpuid_config),
        Field.MAX_VCPUS_PER_TD: platform.max_vcpus_per_td,
        Field.MODULE_HV: platform.module_hv,
    }
    fields = {int(field_id): value for field_id, value in fields.items()}
    for i, entry in enumerate(platform.cpuid_config):
        fields[abi.FIELD_CPUID_CONFIG_LEAVES + i] = entry.leaves_field
        values = entry.values_fields
        fields[abi.FIELD_CPUID_CONFIG_VALUES + 2 * i] = values[0]
        fields[abi.FIELD_CPUID_CONFIG_VALUES + 2 * i + 1] = values[1]
    ids = sorted(fields)
    return fields, dict(zip(ids, ids[1:] + [MD_FIELD_ID_NA]))

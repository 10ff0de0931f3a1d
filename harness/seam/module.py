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
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.seam import abi, metadata, td
from harness.seam.abi import Leaf, OperandId, PageSize, PageType, Status
from harness.seam.exits import ExitScript
from harness.seam.faults import FaultPlan
from harness.seam.memory import MemoryAccessError, PhysicalMemory
from harness.seam.platform import PlatformConfig
from harness.seam.tdmr import TdmrChecker, TdmrInfo, tdmr_info_size
from harness.seam.trace import REGISTERS, Trace, TraceRecord

log = logging.getLogger("harness.seam")

NR_REGS = len(REGISTERS)


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


# __seamcall and __seamcall_ret (arch/x86/virt/vmx/tdx/tdxcall.S) load RCX, RDX and R8-R11 from
# struct tdx_module_args; R12-R15, RBX, RDI and RSI then hold whatever the compiler left there.
# The module sees this value in them instead of the struct's, so a leaf that needs them fails
# unless the kernel used __seamcall_saved_ret.
UNLOADED_REGISTER = 0xDEAD_5EA3_CA11_0000
LOADED_BY_EVERY_VARIANT = 6  # rcx, rdx, r8, r9, r10, r11: the first six of REGISTERS


def loaded_registers(request: SeamcallRequest) -> int:
    """How many of REGISTERS (in order) the calling variant loads from the struct."""
    return NR_REGS if request.variant is Variant.SEAMCALL_SAVED_RET else LOADED_BY_EVERY_VARIANT


def as_loaded(request: SeamcallRequest) -> SeamcallRequest:
    """The request as the module receives it from the calling variant."""
    loaded = loaded_registers(request)
    unloaded = tuple(UNLOADED_REGISTER | i for i in range(loaded, NR_REGS))
    return dataclasses.replace(request, regs=request.regs[:loaded] + unloaded) if unloaded else request


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

    @property
    def ready_end(self) -> int:
        """End of the part of the TDMR pages may be used in: whole GiB blocks only
        (pamt_manager.c pamt_get_block(): last_initialized rounded down to 1 GiB)."""
        return self.info.base + (self.initialized & ~(abi.SZ_1G - 1))


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

    def call(self, sent: SeamcallRequest, memory: PhysicalMemory) -> SeamcallResult:
        request = as_loaded(sent)
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
        seen = tuple(call.outputs.get(name, value) for name, value in zip(REGISTERS, request.regs))
        self._record(request, seen, status, injected, call.note)
        # The registers the leaf did not write go back as the kernel sent them.
        return SeamcallResult(status, tuple(call.outputs.get(name, value) for name, value in zip(REGISTERS, sent.regs)))

    def _dispatch(self, call: _Call) -> int:
        """tdx_vmm_dispatcher.c, in its order: the leaf encoding and version, then the module
        state (SYS_SHUTDOWN, then not SYS_READY, for all but the init leaves), then the leaf
        itself (an unknown one is OPERAND_INVALID(RAX) only there)."""
        request = call.request
        if not self.platform.module_present:
            return Status.TDX_SEAMCALL_VMFAILINVALID
        if request.fn & abi.P_SEAMLDR_LEAF_BIT:
            call.note = "no P-SEAMLDR is modelled"
            return Status.TDX_SEAMCALL_VMFAILINVALID
        number = request.fn & abi.LEAF_NUMBER_MASK
        version = (request.fn >> abi.LEAF_VERSION_SHIFT) & abi.LEAF_VERSION_MASK
        if request.fn >> 24 or version > _MAX_VERSION.get(number, 0):
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RAX)
        # SYS.INIT after TDH.SYS.DISABLE starts over (the harness's reading of Linux: no public
        # module source implements DISABLE); the real SYS_SHUTDOWN (leaf 52) takes LP.SHUTDOWN only.
        if self.state.sys is SysState.SYS_SHUTDOWN and number not in _SHUTDOWN_LEAVES:
            return Status.TDX_SYS_SHUTDOWN
        if self.state.sys is not SysState.SYS_READY and number not in _BEFORE_READY_LEAVES:
            return Status.TDX_SYS_NOT_READY
        handler = _HANDLERS.get(number)
        if handler is None:
            if number in _KNOWN_LEAVES:
                call.note = "leaf not modelled by the software module yet"
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RAX)
        if call.package is None:
            # Hardware has no LP outside its packages: a CPU the platform config lacks never ran
            # LP.INIT as far as the module knows (a harness set-up error; the note says so).
            call.note = f"APIC id {request.cpu} is not a CPU of the platform config"
            return Status.TDX_SYS_LP_INIT_NOT_DONE if number != Leaf.TDH_SYS_LP_INIT else \
                Status.TDX_SYS_LP_INIT_NOT_PENDING
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
            inputs=dict(zip(REGISTERS[:loaded_registers(request)], request.regs)),
            outputs={name: value for name, value, old in zip(REGISTERS, regs, request.regs) if value != old},
            status=status, status_name=abi.status_name(status), injected=injected, note=note))

    # --- host initialization leaves -----------------------------------------------------------------

    def sys_init(self, call: _Call) -> int:
        """tdh_sys_init.c: RCX, RDX, R8-R10 zeroed; the attributes in RCX (all reserved in 1.5)
        checked before the state."""
        call.outputs.update(rcx=0, rdx=0, r8=0, r9=0, r10=0)
        if call.reg("rcx"):
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
        if self.state.sys not in (SysState.SYSINIT_PENDING, SysState.SYS_SHUTDOWN):
            return Status.TDX_SYS_INIT_NOT_PENDING
        pages = self.state.pages if self.state.sys is SysState.SYSINIT_PENDING else {}
        calls = self.state.calls_per_leaf
        self.state = ModuleState(sys=SysState.SYSINIT_DONE, pages=pages, calls_per_leaf=calls)
        return 0

    def sys_lp_init(self, call: _Call) -> int:
        if self.state.sys is not SysState.SYSINIT_DONE:
            return Status.TDX_SYS_LP_INIT_NOT_PENDING
        if call.request.cpu in self.state.lp_initialized:
            return Status.TDX_SYS_LP_INIT_DONE
        self.state.lp_initialized.add(call.request.cpu)
        return 0

    def sys_rd(self, call: _Call) -> int:
        """tdh_sys_rd.c: RDX = MD_FIELD_ID_NA and R8 = 0 on entry; the LP must have run
        LP.INIT; the null id answers the first field id (a non-error status); a single-element
        id is looked up on class and field code only (metadata.py); RDX the next element."""
        call.outputs.update(rdx=metadata.MD_FIELD_ID_NA, r8=0)
        if call.request.cpu not in self.state.lp_initialized:
            return Status.TDX_SYS_LP_INIT_NOT_DONE
        table = metadata.global_metadata(self.platform)
        field_id = call.reg("rdx")
        if metadata.is_null_field_id(field_id):
            call.outputs["rdx"] = table.next_element(field_id)
            return Status.TDX_METADATA_FIRST_FIELD_ID_IN_CONTEXT
        entry = table.lookup(field_id)
        if field_id & metadata.SINGLE_ELEMENT_MUST_BE_ZERO or entry is None:
            return Status.TDX_METADATA_FIELD_ID_INCORRECT
        call.outputs.update(rdx=table.next_element(field_id), r8=entry.value(field_id))
        return 0

    def sys_config(self, call: _Call) -> int:
        if self.state.sys is not SysState.SYSINIT_DONE:
            return Status.TDX_SYS_CONFIG_NOT_PENDING
        if len(self.state.lp_initialized) < len(self.platform.cpus):
            call.note = f"{len(self.state.lp_initialized)} of {len(self.platform.cpus)} LPs initialized"
            return Status.TDX_SYS_CONFIG_NOT_PENDING
        array_pa, count, hkid = call.reg("rcx"), call.reg("rdx"), call.reg("r8")
        if not td.shared_page_ok(self, array_pa, abi.TDMR_INFO_PA_ARRAY_ALIGNMENT):
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
        if count < 1 or count > self.platform.max_tdmrs:
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RDX)
        if hkid >> 16 or hkid not in self.platform.tdx_keyids:
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.R8)
        # tdh_sys_config.c reserves the KOT entry before it reads a TDMR: a failed SYS.CONFIG
        # leaves the KeyID taken.
        self.state.global_keyid = hkid
        self.state.kot[hkid] = td.KeyState.ASSIGNED  # the module's own KeyID is never free
        entry_pas = [int.from_bytes(call.memory.read(self.platform.address_of(array_pa) + 8 * i, 8), "little")
                     for i in range(count)]
        checker = TdmrChecker(self.platform.max_pa, self.platform.cmrs, self.platform.pamt_entry_sizes)
        size = tdmr_info_size(self.platform.max_reserved_per_tdmr)
        for entry_pa in entry_pas:
            if not td.shared_page_ok(self, entry_pa, abi.TDMR_INFO_ALIGNMENT):
                return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
            status = checker.check(TdmrInfo.unpack(call.memory.read(self.platform.address_of(entry_pa), size),
                                                    self.platform.max_reserved_per_tdmr))
            if status:
                return status
        self.state.tdmrs = [TdmrState(info) for info in checker.accepted]
        self.state.sys = SysState.SYSCONFIG_DONE
        return 0

    def sys_key_config(self, call: _Call) -> int:
        """tdh_sys_key_config.c: the state, then the caller's package (no LP check)."""
        if self.state.sys is not SysState.SYSCONFIG_DONE:
            return Status.TDX_SYS_KEY_CONFIG_NOT_PENDING
        if call.package in self.state.packages_configured:
            return Status.TDX_KEY_CONFIGURED
        assert call.package is not None  # the dispatcher refuses CPUs outside the platform
        self.state.packages_configured.add(call.package)
        if self.state.packages_configured == set(self.platform.packages):
            self.state.sys = SysState.SYS_READY
        return 0

    def sys_tdmr_init(self, call: _Call) -> int:
        """tdh_sys_tdmr_init.c: RDX zeroed on entry; a 1 GiB-aligned TDMR base without KeyID
        bits; TDMR_4K_PAMT_INIT_COUNT entries (4 MiB) a call; RDX = the next address to
        initialize rounded down to 1 GiB, so most calls return the same RDX."""
        call.outputs["rdx"] = 0
        base = call.reg("rcx")
        if base % abi.SZ_1G or base >= self.platform.max_pa:
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
        tdmr = next((t for t in self.state.tdmrs if t.info.base == base), None)
        if tdmr is None:
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
        if tdmr.done:
            return Status.TDX_TDMR_ALREADY_INITIALIZED
        tdmr.initialized = min(tdmr.info.size, tdmr.initialized + self.platform.tdmr_init_chunk)
        call.outputs["rdx"] = (base + tdmr.initialized) & ~(abi.SZ_1G - 1)
        return 0

    def sys_disable(self, call: _Call) -> int:
        self.state.sys = SysState.SYS_SHUTDOWN
        self.state.lp_initialized.clear()
        return 0

    def phymem_page_rdmd(self, call: _Call) -> int:
        """tdh_phymem_page_rdmd.c: RCX, RDX, R8-R11 zeroed on entry; the PA page-aligned,
        below MAXPA and without KeyID bits; inside an initialized 1 GiB block of a TDMR; R9 the
        blocking epoch for PT_REG and PT_EPT pages."""
        call.outputs.update(rcx=0, rdx=0, r8=0, r9=0, r10=0, r11=0)
        pa = call.reg("rcx")
        if pa % abi.SZ_4K or pa >= self.platform.max_pa:
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
        tdmr = self._tdmr_of(pa)
        if tdmr is None or pa >= tdmr.ready_end:
            return abi.with_operand(Status.TDX_OPERAND_ADDR_RANGE_ERROR, OperandId.RCX)
        owner = self.state.pages.get(pa >> 12)
        page_type = self.page_type(pa)
        call.outputs.update(rcx=int(page_type), rdx=owner.owner if owner else 0, r8=int(PageSize.PT_4KB))
        if owner is not None and page_type in (PageType.PT_REG, PageType.PT_EPT):
            call.outputs["r9"] = self._bepoch(pa, owner.owner)
        return 0

    def _bepoch(self, pa: int, tdr: int) -> int:
        """The TD epoch at which the S-EPT entry mapping ``pa`` was blocked (0: not blocked,
        or an S-EPT page, whose blocking the model does not track)."""
        owner = self.state.tds.get(tdr)
        leaf = next((leaf for leaf in owner.leaves.values() if leaf.pa == pa), None) if owner else None
        return leaf.bepoch if leaf is not None else 0


_HANDLERS: dict[int, Handler] = {
    Leaf.TDH_SYS_INIT: TdxModule.sys_init,
    Leaf.TDH_SYS_LP_INIT: TdxModule.sys_lp_init,
    Leaf.TDH_SYS_RD: TdxModule.sys_rd,
    Leaf.TDH_SYS_CONFIG: TdxModule.sys_config,
    Leaf.TDH_SYS_KEY_CONFIG: TdxModule.sys_key_config,
    Leaf.TDH_SYS_TDMR_INIT: TdxModule.sys_tdmr_init,
    Leaf.TDH_SYS_DISABLE: TdxModule.sys_disable,
    Leaf.TDH_PHYMEM_PAGE_RDMD: TdxModule.phymem_page_rdmd,
    **td.HANDLERS,
}
_MAX_VERSION: dict[int, int] = dict(td.MAX_VERSION)
_KNOWN_LEAVES = frozenset(int(leaf) for leaf in Leaf)
# The leaves tdx_vmm_dispatcher.c lets run before SYS_READY (the rest: TDX_SYS_NOT_READY), and
# those the harness lets run after TDH.SYS.DISABLE.
_BEFORE_READY_LEAVES = frozenset({Leaf.TDH_SYS_INFO, Leaf.TDH_SYS_RD, Leaf.TDH_SYS_RDALL, Leaf.TDH_SYS_INIT,
                                  Leaf.TDH_SYS_LP_INIT, Leaf.TDH_SYS_CONFIG, Leaf.TDH_SYS_KEY_CONFIG,
                                  Leaf.TDH_SYS_LP_SHUTDOWN, Leaf.TDH_SYS_UPDATE, Leaf.TDH_SYS_DISABLE})
_SHUTDOWN_LEAVES = frozenset({Leaf.TDH_SYS_LP_SHUTDOWN, Leaf.TDH_SYS_INIT, Leaf.TDH_SYS_DISABLE})

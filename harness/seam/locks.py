"""Lock contention between LPs: which locks each leaf takes, in what mode and order, the status a
failed acquisition gives, and how long a call holds them (TDX module 1.5.01, tag TDX_1.5.01:
src/common/helpers/tdx_locks.h for the locks, each leaf's src/vmm_dispatcher/api_calls/*.c or
src/td_transitions/tdh_vp_enter.c for what it takes).

The transport carries one SEAMCALL at a time, so two LPs are never inside the module together.
The model stands in for that overlap with time: a call that begins at ``t`` holds its locks until
``t + cost * PlatformConfig.lock_hold_s`` on the module's clock (``Seam.clock``), and a call from
another CPU that needs one of them in an incompatible mode before then fails as the module's
failed acquisition does. A CPU's next call ends its own window (its previous SEAMCALL has
returned), so a CPU never contends with itself. ``lock_hold_s == 0`` turns the model off.

Host-side SEAMCALLs never see TDX_OPERAND_BUSY_HOST_PRIORITY: the host-priority locks
(acquire_sharex_lock_hp_*) return it to guest-side flows (TDCALLs) only, which the harness does
not run. Only 4K pages are modelled, so the 1G and 2M PAMT entries pamt_walk() takes shared on the
way to a 4K entry never conflict and are left out.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from harness.seam import abi, td
from harness.seam.abi import Leaf, OperandId, PageType, SeptLevel, Status
from harness.seam.call import Call
from harness.seam.state import Seam


class Mode(enum.Enum):
    """lock_type_t; mutexes and S-EPT entry locks are exclusive only."""

    SHARED = "shared"
    EXCLUSIVE = "exclusive"


class Resource(enum.Enum):
    """The module's locks, by what they guard."""

    GLOBAL = "global lock"  # tdx_global_data.global_lock (sharex)
    TDMR = "TDMR"  # tdmr_table[i].lock (mutex), one per TDMR
    KOT = "KOT"  # kot.lock (sharex)
    WBT = "WBT entry"  # wbt_entries[package].entry_lock (mutex)
    KET = "KET"  # the package's key tables: PCONFIG answers MKTME_DEVICE_BUSY
    PAMT = "PAMT entry"  # a 4K page's PAMT entry_lock (sharex_hp); a TDR, TDVPR or TD page
    OP_STATE = "OP_STATE"  # TDCS op_state_lock (sharex_hp)
    SEPT_TREE = "S-EPT tree"  # TDCS secure_ept_lock (sharex)
    SEPT_ENTRY = "S-EPT entry"  # the entry's TDEL bit (sept_lock_acquire_host())
    TD_EPOCH = "TD epoch"  # TDCS epoch_tracking.epoch_lock (sharex)


# What a lock is taken on in a call: None when the operand names nothing the module would lock,
# so the leaf's own check of that operand fails first, as in the module.
KeyFn = Callable[[Seam, Call], Hashable | None]


@dataclass(frozen=True)
class Lock:
    """One acquisition: the lock, its mode, what it is taken on, and the operand id a failed
    acquisition puts in TDX_OPERAND_BUSY (None: the global lock's TDX_SYS_BUSY). ``held`` is
    False for a lock the leaf releases before it returns (VP.ENTER's OP_STATE and TD epoch
    locks, released before the TD runs): it contends when taken, but is not held for the
    window."""

    resource: Resource
    mode: Mode
    key: KeyFn
    operand: OperandId | None
    held: bool = True

    def busy_status(self) -> int:
        if self.operand is None:
            return Status.TDX_SYS_BUSY
        return abi.with_operand(Status.TDX_OPERAND_BUSY, self.operand)


@dataclass(frozen=True)
class LeafLocks:
    """What a leaf does before its work: zeroes ``zeroed`` on entry, then takes ``locks`` in
    order. ``cost``: how long it holds them, in units of PlatformConfig.lock_hold_s (the
    harness's estimate of the leaf's length; the source gives none). ``alone``: it fails
    TDX_SYS_BUSY while another LP is inside the module (tdh_sys_shutdown.c's lp_is_busy scan)."""

    source: str
    locks: tuple[Lock, ...] = ()
    zeroed: tuple[str, ...] = ()
    cost: float = 1.0
    alone: bool = False


# --- what a lock is taken on -----------------------------------------------------------------------


def _one(seam: Seam, call: Call) -> Hashable:
    """A lock the module has one of."""
    return ()


def _package(seam: Seam, call: Call) -> Hashable:
    return call.package


def _tdmr(reg: str) -> KeyFn:
    """The TDMR whose base is in ``reg`` (tdh_sys_tdmr_init.c locks it after finding it)."""
    def key(seam: Seam, call: Call) -> Hashable | None:
        base = call.reg(reg)
        return base if any(t.info.base == base for t in seam.state.tdmrs) else None
    return key


def _pamt_key(seam: Seam, pa: int) -> int | None:
    """pamt_get_block() before pamt_walk(): an aligned page in an initialized part of a TDMR."""
    tdmr = seam.state.tdmr_of(pa)
    return pa if pa % abi.SZ_4K == 0 and tdmr is not None and pa < tdmr.ready_end else None


def _page(reg: str, keyed: bool = False) -> KeyFn:
    """The PAMT entry of the page in ``reg``; ``keyed``: the register carries a KeyID above
    the address, which the leaf strips first (tdh_phymem_page_wbinvd.c)."""
    def key(seam: Seam, call: Call) -> Hashable | None:
        pa = call.reg(reg)
        return _pamt_key(seam, seam.platform.address_of(pa) if keyed else pa)
    return key


def _td(reg: str) -> KeyFn:
    """The TD whose TDR is in ``reg`` (its TDCS locks)."""
    def key(seam: Seam, call: Call) -> Hashable | None:
        pa = call.reg(reg)
        return pa if pa in seam.state.tds else None
    return key


def _vcpu_tdr(reg: str) -> KeyFn:
    """The TDR of the vCPU whose TDVPR is in ``reg`` (the owner in the TDVPR's PAMT entry, which
    lock_and_map_implicit_tdr() locks; also the key of that TD's TDCS locks)."""
    def key(seam: Seam, call: Call) -> Hashable | None:
        vcpu = seam.state.vcpus.get(call.reg(reg))
        return None if vcpu is None else vcpu.tdr
    return key


def _owner_tdr(seam: Seam, call: Call) -> Hashable | None:
    """TDH.PHYMEM.PAGE.RECLAIM's implicit TDR: the owner of a page that is not a TDR itself."""
    owner = seam.state.pages.get(call.reg("rcx") >> 12)
    return owner.owner if owner is not None and owner.page_type is not PageType.PT_TDR else None


def _sept_target(seam: Seam, call: Call, min_level: int, max_level: int | None) -> tuple[int, int, int] | None:
    """(TDR, GPA, level) of the S-EPT entry RCX names for the TD in RDX, if the page info is valid
    and private (verify_page_info_input() and check_gpa_validity() come before the tree lock);
    ``max_level`` None: the TD's root level."""
    tdx = seam.state.tds.get(call.reg("rdx"))
    if tdx is None:
        return None
    info = td.page_info(call.reg("rcx"), min_level, tdx.root_level if max_level is None else max_level)
    if info is None or not tdx.private_gpa(info[0]):
        return None
    return tdx.tdr, info[0], info[1]


def _sept_tree(min_level: int, max_level: int | None) -> KeyFn:
    def key(seam: Seam, call: Call) -> Hashable | None:
        target = _sept_target(seam, call, min_level, max_level)
        return None if target is None else target[0]
    return key


def _sept_entry_at(seam: Seam, call: Call, min_level: int, max_level: int | None) -> tuple[int, int, int] | None:
    """The entry itself, locked once the walk reached its level (lock_sept_check_and_walk_*)."""
    target = _sept_target(seam, call, min_level, max_level)
    if target is None or td.sept_walk(seam.state.tds[target[0]], target[1], target[2]) != target[2]:
        return None
    return target


def _sept_entry(min_level: int, max_level: int | None) -> KeyFn:
    return lambda seam, call: _sept_entry_at(seam, call, min_level, max_level)


def _mapped_page(seam: Seam, call: Call) -> Hashable | None:
    """The page TDH.MEM.PAGE.REMOVE takes out: its PAMT entry (pamt_implicit_get_and_lock())."""
    target = _sept_entry_at(seam, call, SeptLevel.LVL_PT, SeptLevel.LVL_PDPT)
    leaf = None if target is None else seam.state.tds[target[0]].leaves.get(target[1])
    return None if leaf is None else leaf.pa


# --- the leaves --------------------------------------------------------------------------------------

_SH, _EX = Mode.SHARED, Mode.EXCLUSIVE
_GLOBAL_EX = Lock(Resource.GLOBAL, _EX, _one, None)
_KOT_EX = Lock(Resource.KOT, _EX, _one, OperandId.KOT)
_KET = Lock(Resource.KET, _EX, _package, OperandId.KET)  # helpers.c program_mktme_keys()
_PT, _PD, _PDPT = SeptLevel.LVL_PT, SeptLevel.LVL_PD, SeptLevel.LVL_PDPT


def _explicit(reg: str, mode: Mode) -> Lock:
    """check_lock_and_map_explicit_tdr(), check_and_lock_explicit_4k_private_hpa(),
    check_and_lock_free_range_hpa(): the PAMT entry of the page in ``reg``, busy with its id."""
    return Lock(Resource.PAMT, mode, _page(reg), OperandId[reg.upper()])


def _implicit_tdr(reg: str) -> Lock:
    """lock_and_map_implicit_tdr(): the TDR of the vCPU in ``reg``, shared, busy with OPERAND_ID_TDR."""
    return Lock(Resource.PAMT, _SH, _vcpu_tdr(reg), OperandId.TDR)


def _op_state(key: KeyFn, held: bool = True) -> Lock:
    """check_state_map_tdcs_and_lock() with a shared OP_STATE lock."""
    return Lock(Resource.OP_STATE, _SH, key, OperandId.OP_STATE, held)


LEAVES: dict[int, LeafLocks] = {
    Leaf.TDH_SYS_INIT: LeafLocks("tdh_sys_init.c", (_GLOBAL_EX,), zeroed=("rcx", "rdx", "r8", "r9", "r10"),
                                 cost=4),
    Leaf.TDH_SYS_LP_INIT: LeafLocks("tdh_sys_lp_init.c", (Lock(Resource.GLOBAL, _SH, _one, None),),
                                    zeroed=("rcx", "rdx", "r8"), cost=2),
    Leaf.TDH_SYS_CONFIG: LeafLocks("tdh_sys_config.c", (_GLOBAL_EX,), cost=4),
    Leaf.TDH_SYS_KEY_CONFIG: LeafLocks("tdh_sys_key_config.c", (_GLOBAL_EX, _KET), cost=2),
    Leaf.TDH_SYS_TDMR_INIT: LeafLocks("tdh_sys_tdmr_init.c",
                                      (Lock(Resource.TDMR, _EX, _tdmr("rcx"), OperandId.RCX),),
                                      zeroed=("rdx",), cost=16),
    Leaf.TDH_SYS_SHUTDOWN: LeafLocks("tdh_sys_shutdown.c", (_GLOBAL_EX,), alone=True),
    Leaf.TDH_SYS_UPDATE: LeafLocks("tdh_sys_update.c", (_GLOBAL_EX,), cost=4),
    # No public source: Linux's tdx_sys_disable() retries TDX_SYS_BUSY from "contention with
    # other TDH.SYS.* SEAMCALLs", which is the global lock taken exclusive.
    Leaf.TDH_SYS_DISABLE: LeafLocks("none (Linux tdx_sys_disable())", (_GLOBAL_EX,)),
    Leaf.TDH_PHYMEM_PAGE_RDMD: LeafLocks("tdh_phymem_page_rdmd.c", (_explicit("rcx", _SH),),
                                         zeroed=("rcx", "rdx", "r8", "r9", "r10", "r11")),
    Leaf.TDH_MNG_CREATE: LeafLocks("tdh_mng_create.c", (_explicit("rcx", _EX), _KOT_EX)),
    Leaf.TDH_MNG_KEY_CONFIG: LeafLocks("tdh_mng_key_config.c", (_explicit("rcx", _EX), _KET), cost=2),
    Leaf.TDH_MNG_ADDCX: LeafLocks("tdh_mng_add_cx.c", (_explicit("rdx", _EX), _explicit("rcx", _EX))),
    Leaf.TDH_MNG_INIT: LeafLocks("tdh_mng_init.c", (_explicit("rcx", _EX),), zeroed=("rcx",), cost=4),
    Leaf.TDH_MNG_RD: LeafLocks("tdh_mng_rd_wr.c", (_explicit("rcx", _SH), _op_state(_td("rcx"))), zeroed=("r8",)),
    Leaf.TDH_VP_CREATE: LeafLocks("tdh_vp_create.c",
                                  (_explicit("rdx", _SH), _op_state(_td("rdx")), _explicit("rcx", _EX))),
    Leaf.TDH_VP_ADDCX: LeafLocks("tdh_vp_addcx.c", (
        _explicit("rdx", _EX), _implicit_tdr("rdx"),
        _op_state(_vcpu_tdr("rdx")), _explicit("rcx", _EX))),
    Leaf.TDH_VP_INIT: LeafLocks("tdh_vp_init.c",
                                (_explicit("rcx", _EX), _implicit_tdr("rcx"), _op_state(_vcpu_tdr("rcx"))),
                                cost=2),
    Leaf.TDH_VP_RD: LeafLocks("tdh_vp_rd_wr.c",
                              (_explicit("rcx", _SH), _implicit_tdr("rcx"), _op_state(_vcpu_tdr("rcx")))),
    Leaf.TDH_VP_WR: LeafLocks("tdh_vp_rd_wr.c",
                              (_explicit("rcx", _SH), _implicit_tdr("rcx"), _op_state(_vcpu_tdr("rcx")))),
    # The TDVPR and TDR stay locked while the TD runs (td_exit.c releases them); the cost stands
    # for that run. The zero-step filter's S-EPT tree lock is not modelled (no EPT violations).
    Leaf.TDH_VP_ENTER: LeafLocks("tdh_vp_enter.c", (
        _explicit("rcx", _SH), _implicit_tdr("rcx"), _op_state(_vcpu_tdr("rcx"), held=False),
        Lock(Resource.TD_EPOCH, _SH, _vcpu_tdr("rcx"), OperandId.TD_EPOCH, held=False)), cost=8),
    Leaf.TDH_MEM_SEPT_ADD: LeafLocks("tdh_mem_sept_add.c", (
        _explicit("rdx", _SH), _op_state(_td("rdx")),
        Lock(Resource.SEPT_TREE, _SH, _sept_tree(_PD, None), OperandId.SEPT),
        Lock(Resource.SEPT_ENTRY, _EX, _sept_entry(_PD, None), OperandId.RCX),
        _explicit("r8", _EX)), zeroed=("rcx", "rdx")),
    Leaf.TDH_MEM_PAGE_ADD: LeafLocks("tdh_mem_page_add.c", (_explicit("rdx", _EX), _explicit("r8", _EX)),
                                     zeroed=("rcx", "rdx"), cost=2),
    Leaf.TDH_MEM_PAGE_AUG: LeafLocks("tdh_mem_page_aug.c", (
        _explicit("rdx", _SH), _op_state(_td("rdx")),
        Lock(Resource.SEPT_TREE, _SH, _sept_tree(_PT, _PT), OperandId.SEPT),
        Lock(Resource.SEPT_ENTRY, _EX, _sept_entry(_PT, _PT), OperandId.RCX),
        _explicit("r8", _EX)), zeroed=("rcx", "rdx")),
    Leaf.TDH_MR_EXTEND: LeafLocks("tdh_mr_extend.c", (_explicit("rdx", _EX),), zeroed=("rcx", "rdx"), cost=2),
    Leaf.TDH_MR_FINALIZE: LeafLocks("tdh_mr_finalize.c", (_explicit("rcx", _EX),)),
    Leaf.TDH_MEM_RANGE_BLOCK: LeafLocks("tdh_mem_range_block.c", (
        _explicit("rdx", _SH), _op_state(_td("rdx")),
        Lock(Resource.SEPT_TREE, _EX, _sept_tree(_PT, _PDPT), OperandId.SEPT),
        Lock(Resource.SEPT_ENTRY, _EX, _sept_entry(_PT, _PDPT), OperandId.RCX)), zeroed=("rcx", "rdx")),
    Leaf.TDH_MEM_TRACK: LeafLocks("tdh_mem_track.c", (
        _explicit("rcx", _SH), _op_state(_td("rcx")),
        Lock(Resource.TD_EPOCH, _EX, _td("rcx"), OperandId.TD_EPOCH))),
    Leaf.TDH_MEM_PAGE_REMOVE: LeafLocks("tdh_mem_page_remove.c", (
        _explicit("rdx", _SH), _op_state(_td("rdx")),
        Lock(Resource.SEPT_TREE, _SH, _sept_tree(_PT, _PDPT), OperandId.SEPT),
        Lock(Resource.SEPT_ENTRY, _EX, _sept_entry(_PT, _PDPT), OperandId.RCX),
        Lock(Resource.PAMT, _EX, _mapped_page, OperandId.RCX)), zeroed=("rcx", "rdx")),
    Leaf.TDH_PHYMEM_PAGE_WBINVD: LeafLocks("tdh_phymem_page_wbinvd.c",
                                           (Lock(Resource.PAMT, _SH, _page("rcx", keyed=True), OperandId.RCX),),
                                           cost=2),
    Leaf.TDH_VP_FLUSH: LeafLocks("tdh_vp_flush.c", (_explicit("rcx", _EX), _implicit_tdr("rcx"))),
    Leaf.TDH_MNG_VPFLUSHDONE: LeafLocks("tdh_mng_vpflushdone.c", (_explicit("rcx", _EX), _KOT_EX)),
    Leaf.TDH_PHYMEM_CACHE_WB: LeafLocks("tdh_phymem_cache_wb.c", (
        Lock(Resource.WBT, _EX, _package, OperandId.WBCACHE),
        Lock(Resource.KOT, _SH, _one, OperandId.KOT)), cost=16),
    Leaf.TDH_MNG_KEY_FREEID: LeafLocks("tdh_mng_key_freeid.c", (_explicit("rcx", _EX), _KOT_EX)),
    Leaf.TDH_PHYMEM_PAGE_RECLAIM: LeafLocks("tdh_phymem_page_reclaim.c", (
        _explicit("rcx", _EX), Lock(Resource.PAMT, _SH, _owner_tdr, OperandId.TDR)),
        zeroed=("rcx", "rdx", "r8", "r9", "r10", "r11")),
}


# A leaf that takes no lock still keeps its LP inside the module for a window (``alone``).
_LOCKLESS = LeafLocks("no lock in the leaf")


def zero_on_entry(call: Call, leaf: int) -> None:
    """The output registers the leaf zeroes before anything else (its source's first lines)."""
    entry = LEAVES.get(leaf)
    if entry is not None:
        call.outputs.update(dict.fromkeys(entry.zeroed, 0))


# --- who holds what ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    resource: Resource
    key: Hashable
    mode: Mode

    def blocks(self, resource: Resource, key: Hashable, mode: Mode) -> bool:
        """Sharex semantics: readers share, a writer excludes everyone."""
        return (self.resource is resource and self.key == key
                and Mode.EXCLUSIVE in (self.mode, mode))


@dataclass(frozen=True)
class Window:
    """What one CPU's last call holds, and until when."""

    leaf: int
    until: float
    held: tuple[Held, ...]

    def blocks(self, resource: Resource, key: Hashable, mode: Mode) -> bool:
        return any(h.blocks(resource, key, mode) for h in self.held)


@dataclass
class Contention:
    """The windows of the CPUs' last calls (not module state: a snapshot, a power cycle or a new
    kernel starts with none)."""

    windows: dict[int, Window] = field(default_factory=dict)

    def leave(self, cpu: int) -> None:
        """``cpu`` issued a new SEAMCALL, so its previous one has returned."""
        self.windows.pop(cpu, None)

    def clear(self) -> None:
        self.windows.clear()

    def acquire(self, seam: Seam, call: Call, leaf: int) -> int:
        """Take the leaf's locks for the calling CPU: the busy status of the first one another
        CPU's open window blocks (0: all taken, and held for the leaf's window)."""
        entry, hold = LEAVES.get(leaf, _LOCKLESS), seam.platform.lock_hold_s
        if not hold:
            return 0
        now, cpu = seam.clock(), call.request.cpu
        others = {c: w for c, w in self.windows.items() if c != cpu and now < w.until}
        taken: list[Held] = []
        for lock in entry.locks:
            key = lock.key(seam, call)
            if key is None:
                continue
            holder = next((c for c, w in others.items() if w.blocks(lock.resource, key, lock.mode)), None)
            if holder is not None:
                return _busy(seam, call, lock, key, holder, others[holder])
            if lock.held:
                taken.append(Held(lock.resource, key, lock.mode))
        if entry.alone and others:
            inside = min(others)
            call.note = f"CPU {inside} is inside the module ({abi.leaf_name(others[inside].leaf)})"
            return Status.TDX_SYS_BUSY
        self.windows[cpu] = Window(leaf, now + entry.cost * hold, tuple(taken))
        return 0


def _busy(seam: Seam, call: Call, lock: Lock, key: Hashable, holder: int, window: Window) -> int:
    """The failed acquisition: its status, the S-EPT entry's details for an entry lock
    (set_arch_septe_details_in_vmm_regs()), and a trace note naming the holder."""
    if lock.resource is Resource.SEPT_ENTRY:
        assert isinstance(key, tuple)  # _sept_entry_at()'s (TDR, GPA, level)
        tdr, gpa, level = key
        td.sept_details(call, seam.state.tds[tdr], gpa, level)
    call.note = (f"{lock.resource.value} held by CPU {holder} ({abi.leaf_name(window.leaf)}) "
                 f"until {window.until:.6f}s")
    return lock.busy_status()

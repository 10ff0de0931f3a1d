"""TD management: the module driven through what Linux 7.3's KVM does (kvm_replay.py), leaf by
leaf, the statuses the real module gives for bad input and bad order, and a teardown that leaves
no TD page and no KeyID behind. Expected values come from the kernel source and the ABI."""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import pytest
from kvm_replay import (
    KVM_SUPPORTED_TDX_TD_ATTRS,
    PAGE,
    RAM,
    TDVPS_CLASS_OTHER_GUEST,
    KvmTd,
    KvmVcpu,
    PageAllocator,
    SeamcallFailed,
    kvm_td_params,
    kvm_tdx_hardware_setup,
    new_td,
    read_sysinfo,
    ready_module,
    seamcall,
)
from linux_replay import call

from harness.seam import abi, exits, measure
from harness.seam.abi import Field, Leaf, OperandId, PageType, SeptState, Status
from harness.seam.faults import FaultPlan, FaultRule, busy
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import CpuidConfig, PlatformConfig, cmrs_for_ram, qemu_topology

M = 1 << 20
TD_TYPES = {PageType.PT_TDR, PageType.PT_TDCX, PageType.PT_TDVPR, PageType.PT_EPT, PageType.PT_REG}


def op(status: Status, operand: OperandId) -> int:
    return abi.with_operand(status, operand)


def source_page(td: KvmTd, seed: int) -> tuple[int, bytes]:
    """A host page holding the initial guest image (KVM_TDX_INIT_MEM_REGION source_addr)."""
    pa = td.pages.alloc()
    data = bytes((seed + i * 7) & 0xFF for i in range(PAGE))
    td.memory.write(pa, data)
    return pa, data


def built_td(module: TdxModule | None = None, vcpus: int = 1) -> KvmTd:
    td = new_td(module or ready_module())
    td.init_vm(attributes=KVM_SUPPORTED_TDX_TD_ATTRS)
    for i in range(vcpus):
        td.init_vcpu(i, cpu=td.module.platform.cpus[i % len(td.module.platform.cpus)].apic_id)
    return td


def td_pages(module: TdxModule) -> dict[int, PageType]:
    return {pfn << 12: owner.page_type for pfn, owner in module.state.pages.items() if owner.page_type in TD_TYPES}


def rdmd(module: TdxModule, pa: int) -> tuple[int, int]:
    result = seamcall(module, SparseMemory(RAM), 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=pa)
    return result.regs[0], result.regs[1]


# --- (a) kvm_intel load ------------------------------------------------------------------------------


def test_kvm_load_needs_only_the_metadata_read_at_boot():
    """tdx_hardware_setup() issues no SEAMCALL: it uses tdx_get_sysinfo(), filled by the host's
    TDH.SYS.RD reads at boot. With the default platform those values make tdx=Y."""
    module = ready_module()
    memory = SparseMemory(RAM)
    before = len(module.trace)
    info = read_sysinfo(module, memory)
    assert {r.number for r in module.trace.records[before:]} == {Leaf.TDH_SYS_RD}
    assert kvm_tdx_hardware_setup(info, present_cpus=len(module.platform.cpus)) == 0
    assert info[Field.TDCS_BASE_SIZE] // PAGE == module.platform.tdcs_pages
    assert info[Field.NUM_CPUID_CONFIG] == len(info.cpuid_leaves) == len(module.platform.cpuid_config)


@pytest.mark.parametrize("changes,present_cpus", [
    ({"attributes_fixed0": abi.TD_ATTR_DEBUG}, 2),  # no SEPT_VE_DISABLE: supported attrs 0
    ({"attributes_fixed1": abi.TD_ATTR_PKS}, 2),  # a fixed-1 attribute KVM cannot support
    ({"xfam_fixed1": 1 << 17 | 1 << 18}, 2),  # AMX forced on, KVM's XCR0 lacks it
    ({"tdx_features0": abi.TDX_FEATURES0_NO_RBP_MOD}, 2),  # no TOPOLOGY_ENUM
    ({"max_vcpus_per_td": 1}, 2),  # MAX_VCPU_PER_TD smaller than the logical CPUs
])
def test_kvm_load_fails_on_unusable_module_metadata(changes, present_cpus):
    module = ready_module(**changes)
    assert kvm_tdx_hardware_setup(read_sysinfo(module, SparseMemory(RAM)), present_cpus) == -22


# --- (b)+(c) the whole life of a TD --------------------------------------------------------------------


@pytest.mark.parametrize("sockets,cores", [(1, 2), (2, 2)])
def test_kvm_builds_measures_runs_and_destroys_a_td(sockets, cores):
    module = ready_module(PlatformConfig(cpus=qemu_topology(sockets, cores), cmrs=cmrs_for_ram(RAM)))
    td = built_td(module, vcpus=2)
    image = [(0xFFFF_0000 + i * PAGE, *source_page(td, i), i % 2 == 0) for i in range(4)]
    for gpa, source, _, measured in image:
        td.add_page(gpa, source, measured)
    td.finalize()

    # PAMT: every page the TD took reports its type and owner (the MCE path reads this).
    assert rdmd(module, td.tdr) == (PageType.PT_TDR, 0)
    assert {rdmd(module, p) for p in td.tdcs} == {(PageType.PT_TDCX, td.tdr)}
    assert {rdmd(module, v.tdvpr) for v in td.vcpus} == {(PageType.PT_TDVPR, td.tdr)}
    assert {rdmd(module, p) for v in td.vcpus for p in v.tdcx} == {(PageType.PT_TDCX, td.tdr)}
    assert {rdmd(module, p) for p in td.sept_pages.values()} == {(PageType.PT_EPT, td.tdr)}
    assert {rdmd(module, p) for p in td.private.values()} == {(PageType.PT_REG, td.tdr)}
    assert len(td.sept_pages) == 3  # one PDPT, PD and PT cover the 4 pages below 4 GiB

    # Keys were programmed on one CPU of every package.
    key_configs = module.trace.of_leaf(Leaf.TDH_MNG_KEY_CONFIG)
    assert sorted(module.platform.package_of(r.cpu) for r in key_configs) == list(range(sockets))

    td.destroy()
    assert td_pages(module) == {}
    assert module.state.tds == {} and module.state.vcpus == {}
    assert module.state.kot == {module.platform.tdx_keyid_start: module.state.kot[module.platform.tdx_keyid_start]}
    assert rdmd(module, td.tdr) == (PageType.PT_NDA, 0)
    # The KeyID is free again: a new TD may take it.
    again = new_td(module, td.memory, td.pages)
    again.hkid = td.hkid
    again.init_vm()


def test_mrtd_is_the_sha384_the_spec_defines():
    td = built_td()
    image = [(0x80_0000 + i * PAGE, *source_page(td, 3 * i), measured)
             for i, measured in enumerate([True, False, True])]
    for gpa, source, _, measured in image:
        td.add_page(gpa, source, measured)
    td.finalize()

    # Independent computation: one 128-byte block per TDH.MEM.PAGE.ADD, and per 256-byte
    # TDH.MR.EXTEND a block naming it followed by the chunk.
    def block(name: bytes, gpa: int) -> bytes:
        return struct.pack("<16sQ104x", name, gpa)

    message = b""
    for gpa, _, data, measured in image:
        message += block(b"MEM.PAGE.ADD", gpa)
        if measured:
            for off in range(0, PAGE, 256):
                message += block(b"MR.EXTEND", gpa + off) + data[off:off + 256]
    assert td.mrtd() == hashlib.sha384(message).digest()


def test_measure_functions():
    assert measure.page_add_blocks(0x1000) == b"MEM.PAGE.ADD" + bytes(4) + (0x1000).to_bytes(8, "little") + bytes(104)
    builder = measure.MrtdBuilder()
    builder.mr_extend(0x2100, bytes(range(256)))
    assert builder.blocks == 3
    expected = hashlib.sha384(b"MR.EXTEND".ljust(16, b"\0") + struct.pack("<Q", 0x2100) + bytes(104)
                              + bytes(range(256)))
    assert builder.finalize() == expected.digest()
    with pytest.raises(ValueError):
        measure.mr_extend_blocks(0, bytes(255))


def test_kvm_sequence_leaf_by_leaf():
    module = ready_module()
    start = len(module.trace)
    td = built_td(module)
    source, _ = source_page(td, 1)
    td.add_page(0x1000, source, measure=True)
    td.finalize()
    L = Leaf
    expected = ([L.TDH_SYS_RD] * (18 + 3 * len(module.platform.cpuid_config))  # read_sysinfo()
                + [L.TDH_MNG_CREATE, L.TDH_MNG_KEY_CONFIG] + [L.TDH_MNG_ADDCX] * 6
                + [L.TDH_MNG_INIT, L.TDH_MNG_RD, L.TDH_MNG_RD]
                + [L.TDH_VP_CREATE] + [L.TDH_VP_ADDCX] * 5 + [L.TDH_VP_INIT] + [L.TDH_VP_WR] * 3
                + [L.TDH_MEM_SEPT_ADD] * 3 + [L.TDH_MEM_PAGE_ADD] + [L.TDH_MR_EXTEND] * 16 + [L.TDH_MR_FINALIZE])
    records = module.trace.records[start:]
    assert [r.number for r in records] == expected
    assert all(r.status == 0 for r in records)
    vp_init = module.trace.of_leaf(L.TDH_VP_INIT)[0]
    assert vp_init.fn == 0x10016 and vp_init.leaf == "TDH.VP.INIT v1"


def test_td_metadata_kvm_reads():
    td = built_td()
    vcpu = td.vcpus[0]
    tsc = td.sc(Leaf.TDH_MNG_RD, rcx=td.tdr, rdx=17 << 56 | abi.TdcsExecField.TSC_MULTIPLIER).regs[2]
    # 2 GHz TD on a 2 GHz host: multiplier 1.0 in 16.48 fixed point.
    assert tsc == 1 << 48
    # KVM_TDX_GET_CPUID: TDH.MNG.RD of CPUID_VALUES (tdx_read_cpuid()).
    leaf7 = 0x9410000300000000 | (7 & 0x7F) << 9 | 0 << 1
    config7 = next(c for c in td.module.platform.cpuid_config if c.leaf == 7)
    ebx_eax = td.sc(Leaf.TDH_MNG_RD, rcx=td.tdr, rdx=leaf7).regs[2]
    # CAPABILITIES offers leaf 7.0's CONFIG_DIRECT bits, none, so KVM configures no ALLOW_DIRECT
    # bit and the TD keeps only the native bits that are neither those nor FIXED0
    # (tdh_mng_init.c read_and_set_cpuid_configurations()).
    assert ebx_eax >> 32 == config7.native.ebx & ~(config7.fixed0.ebx | config7.allow_direct.ebx)
    # metadata_td.c md_td_get_element(): a leaf the TD has no value for cannot be read; a field
    # code with reserved bits (23:17) set is not a field id.
    missing = call(td.module, td.memory, 0, Leaf.TDH_MNG_RD, rcx=td.tdr, rdx=0x9410000300000000 | 0x7E << 9)
    assert (missing.status, missing.regs[2]) == (Status.TDX_METADATA_FIELD_NOT_READABLE, 0)
    reserved = call(td.module, td.memory, 0, Leaf.TDH_MNG_RD, rcx=td.tdr, rdx=leaf7 | 1 << 17)
    assert (reserved.status, reserved.regs[2]) == (Status.TDX_METADATA_FIELD_ID_INCORRECT, 0)
    # TDH.VP.RD/WR: what INIT_VCPU wrote reads back through the host masks.
    pin = td.sc(Leaf.TDH_VP_RD, cpu=vcpu.cpu, rcx=vcpu.tdvpr, rdx=abi.VmcsField.PIN_BASED_VM_EXEC_CONTROL)
    assert pin.regs[2] == abi.PIN_BASED_POSTED_INTR
    nv = td.sc(Leaf.TDH_VP_RD, cpu=vcpu.cpu, rcx=vcpu.tdvpr, rdx=abi.VmcsField.POSTED_INTR_NV)
    assert nv.regs[2] == 0xF2
    details = abi.field_id(abi.TdvpsClass.OTHER_GUEST, abi.TDVPS_VCPU_STATE_DETAILS, non_arch=True)
    assert td.sc(Leaf.TDH_VP_RD, cpu=vcpu.cpu, rcx=vcpu.tdvpr, rdx=details).status == 0
    status = call(td.module, td.memory, vcpu.cpu, Leaf.TDH_VP_WR, rcx=vcpu.tdvpr, rdx=details, r8=1, r9=1).status
    assert status == Status.TDX_METADATA_FIELD_NOT_WRITABLE
    status = call(td.module, td.memory, vcpu.cpu, Leaf.TDH_VP_RD, rcx=vcpu.tdvpr, rdx=0x6C00).status
    assert status == Status.TDX_METADATA_FIELD_ID_INCORRECT
    # Another LP may not touch a vCPU associated elsewhere.
    other = next(c.apic_id for c in td.module.platform.cpus if c.apic_id != vcpu.cpu)
    status = call(td.module, td.memory, other, Leaf.TDH_VP_RD, rcx=vcpu.tdvpr, rdx=abi.VmcsField.POSTED_INTR_NV).status
    assert status == Status.TDX_VCPU_ASSOCIATED


# --- errors and ordering -------------------------------------------------------------------------------


def failing(td: KvmTd, fn: int, cpu: int | None = None, **regs: int) -> tuple[int, tuple[int, ...]]:
    result = call(td.module, td.memory, td.cpus_by_package[0] if cpu is None else cpu, fn, **regs)
    assert result.status != 0, f"{abi.leaf_name(fn)} unexpectedly succeeded"
    return result.status, result.regs


def test_mng_create_operands():
    module = ready_module()
    td = new_td(module)
    tdr = td.pages.alloc()
    first = module.platform.tdx_keyid_start
    keyed_tdr = tdr | 1 << module.platform.hkid_shift
    cases = [
        ({"rcx": tdr, "rdx": first}, Status.TDX_HKID_NOT_FREE),  # the module's own global KeyID
        ({"rcx": tdr, "rdx": first - 1}, op(Status.TDX_OPERAND_INVALID, OperandId.RDX)),  # an MKTME KeyID
        ({"rcx": tdr, "rdx": first + 1 | 1 << 16}, op(Status.TDX_OPERAND_INVALID, OperandId.RDX)),
        ({"rcx": tdr + 8, "rdx": first + 1}, op(Status.TDX_OPERAND_INVALID, OperandId.RCX)),
        ({"rcx": keyed_tdr, "rdx": first + 1}, op(Status.TDX_OPERAND_INVALID, OperandId.RCX)),
        ({"rcx": 3 << 30, "rdx": first + 1}, op(Status.TDX_OPERAND_ADDR_RANGE_ERROR, OperandId.RCX)),
        # The first MiB is a reserved area of TDMR 0.
        ({"rcx": 0x1000, "rdx": first + 1}, op(Status.TDX_PAGE_METADATA_INCORRECT, OperandId.RCX)),
    ]
    for regs, status in cases:
        assert failing(td, Leaf.TDH_MNG_CREATE, **regs)[0] == status, regs
    assert call(module, td.memory, 0, Leaf.TDH_MNG_CREATE, rcx=tdr, rdx=first + 1).status == 0
    other = td.pages.alloc()
    assert failing(td, Leaf.TDH_MNG_CREATE, rcx=other, rdx=first + 1)[0] == Status.TDX_HKID_NOT_FREE
    assert failing(td, Leaf.TDH_MNG_CREATE, rcx=tdr, rdx=first + 2)[0] == op(Status.TDX_PAGE_METADATA_INCORRECT,
                                                                             OperandId.RCX)


def test_td_build_order():
    module = ready_module(PlatformConfig(cpus=qemu_topology(2, 1), cmrs=cmrs_for_ram(RAM)))
    td = new_td(module)
    td.tdr, td.hkid = td.pages.alloc(), module.platform.tdx_keyid_start + 1
    td.sc(Leaf.TDH_MNG_CREATE, rcx=td.tdr, rdx=td.hkid)
    page = td.pages.alloc()
    # Keys on package 0 only: not yet configured for the TD.
    td.sc(Leaf.TDH_MNG_KEY_CONFIG, cpu=0, rcx=td.tdr)
    assert failing(td, Leaf.TDH_MNG_KEY_CONFIG, cpu=0, rcx=td.tdr)[0] == Status.TDX_KEY_CONFIGURED
    assert failing(td, Leaf.TDH_MNG_ADDCX, rcx=page, rdx=td.tdr)[0] == Status.TDX_TD_KEYS_NOT_CONFIGURED
    td.sc(Leaf.TDH_MNG_KEY_CONFIG, cpu=1, rcx=td.tdr)
    assert failing(td, Leaf.TDH_MNG_KEY_CONFIG, cpu=1, rcx=td.tdr)[0] == Status.TDX_LIFECYCLE_STATE_INCORRECT
    td.sc(Leaf.TDH_MNG_ADDCX, rcx=page, rdx=td.tdr)
    td.tdcs.append(page)
    assert failing(td, Leaf.TDH_MNG_INIT, rcx=td.tdr, rdx=0x10000)[0] == Status.TDX_TDCS_NOT_ALLOCATED
    assert failing(td, Leaf.TDH_VP_CREATE, rcx=td.pages.alloc(), rdx=td.tdr)[0] == Status.TDX_TDCS_NOT_ALLOCATED
    assert failing(td, Leaf.TDH_MNG_ADDCX, rcx=page, rdx=td.tdr)[0] == op(Status.TDX_PAGE_METADATA_INCORRECT,
                                                                          OperandId.RCX)
    # tdh_mng_add_cx.c: before MNG.INIT up to MAX_NUM_TDCS_PAGES (9), past the 6 a TD without
    # L2 VMs needs.
    for _ in range(abi.MAX_NUM_TDCS_PAGES - 1):
        td.tdcs.append(td.pages.alloc())
        td.sc(Leaf.TDH_MNG_ADDCX, rcx=td.tdcs[-1], rdx=td.tdr)
    assert failing(td, Leaf.TDH_MNG_ADDCX, rcx=td.pages.alloc(), rdx=td.tdr)[0] == Status.TDX_TDCX_NUM_INCORRECT
    assert failing(td, Leaf.TDH_VP_CREATE, rcx=td.pages.alloc(), rdx=td.tdr)[0] == Status.TDX_OP_STATE_INCORRECT
    assert failing(td, Leaf.TDH_MR_FINALIZE, rcx=td.tdr)[0] == Status.TDX_OP_STATE_INCORRECT


def params_with(td: KvmTd, **edits: tuple[int, bytes]) -> bytes:
    """KVM's TD_PARAMS with bytes patched at offsets of the ABI layout."""
    data = bytearray(kvm_td_params(td.info, KVM_SUPPORTED_TDX_TD_ATTRS, 0x3, 2, 2_000_000))
    for offset, value in edits.values():
        data[offset:offset + len(value)] = value
    return bytes(data)


def q(value: int) -> bytes:
    return value.to_bytes(8, "little")


@pytest.mark.parametrize("edits,status,rcx", [
    ({"attr": (0, q(1 << 1))}, op(Status.TDX_OPERAND_INVALID, OperandId.ATTRIBUTES), 0),
    ({"attr": (0, q(abi.TD_ATTR_MIGRATABLE))}, op(Status.TDX_OPERAND_INVALID, OperandId.ATTRIBUTES), 0),
    ({"xfam": (8, q(0x1))}, op(Status.TDX_OPERAND_INVALID, OperandId.XFAM), 0),  # misses fixed-1 SSE
    ({"xfam": (8, q(0x3 | 1 << 5))}, op(Status.TDX_OPERAND_INVALID, OperandId.XFAM), 0),  # AVX-512 in part
    ({"vcpus": (16, b"\0\0")}, op(Status.TDX_OPERAND_INVALID, OperandId.MAX_VCPUS), 0),
    ({"l2": (18, b"\1")}, Status.TDX_TDCS_NOT_ALLOCATED, 0),  # KVM adds the 6 pages of a TD without L2
    ({"rsvd0": (20, b"\1")}, op(Status.TDX_OPERAND_INVALID, OperandId.RDX), 0),
    ({"flags": (32, q(1 << 5))}, op(Status.TDX_OPERAND_INVALID, OperandId.EXEC_CONTROLS), 0),
    ({"gpaw": (32, q(abi.CONFIG_FLAGS_GPAW | abi.CONFIG_FLAGS_NO_RBP_MOD))},
     op(Status.TDX_OPERAND_INVALID, OperandId.EPTP_CONTROLS), 0),
    ({"pwl5": (24, q(6 | 4 << 3))}, op(Status.TDX_OPERAND_INVALID, OperandId.EPTP_CONTROLS), 0),
    ({"ad": (24, q(6 | 3 << 3 | 1 << 6))}, op(Status.TDX_OPERAND_INVALID, OperandId.EPTP_CONTROLS), 0),
    ({"tsc": (40, b"\3\0")}, op(Status.TDX_OPERAND_INVALID, OperandId.TSC_FREQUENCY), 0),
    ({"tsc": (40, (401).to_bytes(2, "little"))}, op(Status.TDX_OPERAND_INVALID, OperandId.TSC_FREQUENCY), 0),
    ({"rsvd1": (79, b"\1")}, op(Status.TDX_OPERAND_INVALID, OperandId.RDX), 0),
    ({"rsvd2": (255, b"\1")}, op(Status.TDX_OPERAND_INVALID, OperandId.RDX), 0),
    ({"rsvd3": (1023, b"\1")}, op(Status.TDX_OPERAND_INVALID, OperandId.RDX), 0),
    # CPUID_CONFIG entry 2 is leaf 0x80000008: EAX[23:16] (GPAW) is not configurable.
    ({"cpuid": (256 + 16 * 2, struct.pack("<I", 0x30 << 16))},
     op(Status.TDX_OPERAND_INVALID, OperandId.CPUID_CONFIG), 0xFFFFFFFF_80000008),
    ({"tsx": (256 + 16 * 1 + 4, struct.pack("<I", 1 << 4))},  # HLE without RTM
     op(Status.TDX_OPERAND_INVALID, OperandId.CPUID_CONFIG), 0),
])
def test_mng_init_td_params_checks(edits, status, rcx):
    td = new_td(ready_module(cpuid_config=PlatformConfig().cpuid_config[:1] + (
        abi_cpuid_7_with_tsx(),) + PlatformConfig().cpuid_config[2:]))
    with pytest.raises(SeamcallFailed) as failure:
        td.init_vm(params=params_with(td, **edits))
    assert (failure.value.status, failure.value.regs[0]) == (status, rcx)
    # KVM hands OPERAND_INVALID statuses to userspace in hw_error (and returns -EINVAL).
    assert td.hw_error == (status if status & abi.STATUS_MASK == Status.TDX_OPERAND_INVALID else 0)


def test_control_pages_for_l2_vms_and_after_mng_init():
    """td_control_structures.h is_required_tdcs_allocated(): MNG.INIT needs one TDCS page more
    per L2 VM; tdh_mng_add_cx.c: a page past the minimum once MNG.INIT ran is
    TDX_OP_STATE_INCORRECT; tdh_vp_init.c (map_tdvps): a vCPU needs 3 TDVPS pages more per L2 VM."""
    td = built_td()
    assert failing(td, Leaf.TDH_MNG_ADDCX, rcx=td.pages.alloc(), rdx=td.tdr)[0] == Status.TDX_OP_STATE_INCORRECT
    td = td_before_mng_init()
    params_pa = td.pages.alloc()
    td.memory.write(params_pa, params_with(td, l2=(18, b"\1")))
    assert failing(td, Leaf.TDH_MNG_INIT, rcx=td.tdr, rdx=params_pa)[0] == Status.TDX_TDCS_NOT_ALLOCATED
    td.sc(Leaf.TDH_MNG_ADDCX, rcx=td.pages.alloc(), rdx=td.tdr)
    td.sc(Leaf.TDH_MNG_INIT, rcx=td.tdr, rdx=params_pa)
    tdvpr = td.pages.alloc()
    td.sc(Leaf.TDH_VP_CREATE, rcx=tdvpr, rdx=td.tdr)
    for _ in range(td.module.platform.tdcx_pages):
        td.sc(Leaf.TDH_VP_ADDCX, rcx=td.pages.alloc(), rdx=tdvpr)
    v1 = Leaf.TDH_VP_INIT | 1 << abi.LEAF_VERSION_SHIFT
    assert failing(td, v1, rcx=tdvpr, r8=0)[0] == Status.TDX_TDCX_NUM_INCORRECT  # 5 TDCX, 8 needed
    for _ in range(abi.TDVPS_PAGES_PER_L2_VM):
        td.sc(Leaf.TDH_VP_ADDCX, rcx=td.pages.alloc(), rdx=tdvpr)
    td.sc(v1, rcx=tdvpr, r8=0)


def abi_cpuid_7_with_tsx() -> CpuidConfig:
    """Leaf 7 on a CPU with TSX (HLE and RTM are ALLOW_DIRECT), so the HLE/RTM consistency check
    on the TD's value can be reached."""
    base = PlatformConfig().cpuid_config[1]
    return dataclasses.replace(base, native=dataclasses.replace(base.native, ebx=base.native.ebx | 1 << 4 | 1 << 11))


def td_before_mng_init() -> KvmTd:
    """init_vm() by hand, stopping before TDH.MNG.INIT: created, keyed, its TDCS pages added."""
    td = new_td(ready_module())
    td.tdr, td.hkid = td.pages.alloc(), td.module.platform.tdx_keyid_start + 1
    td.sc(Leaf.TDH_MNG_CREATE, rcx=td.tdr, rdx=td.hkid)
    td.sc(Leaf.TDH_MNG_KEY_CONFIG, rcx=td.tdr)
    for _ in range(td.module.platform.tdcs_pages):
        td.sc(Leaf.TDH_MNG_ADDCX, rcx=td.pages.alloc(), rdx=td.tdr)
    return td


def test_td_params_must_be_shared_and_aligned():
    td = td_before_mng_init()
    invalid_rdx = op(Status.TDX_OPERAND_INVALID, OperandId.RDX)
    assert failing(td, Leaf.TDH_MNG_INIT, rcx=td.tdr, rdx=0x10200)[0] == invalid_rdx
    private = 0x10000 | (td.module.platform.tdx_keyid_start << td.module.platform.hkid_shift)
    assert failing(td, Leaf.TDH_MNG_INIT, rcx=td.tdr, rdx=private)[0] == invalid_rdx


def test_vcpu_errors():
    td = built_td(vcpus=1)
    vcpu = td.vcpus[0]
    # x2APIC IDs are unique within a TD; the status carries the duplicate ID.
    dup = td.pages.alloc()
    td.sc(Leaf.TDH_VP_CREATE, rcx=dup, rdx=td.tdr)
    v1 = Leaf.TDH_VP_INIT | 1 << abi.LEAF_VERSION_SHIFT
    assert failing(td, v1, rcx=dup, r8=0)[0] == Status.TDX_TDCX_NUM_INCORRECT
    # tdh_vp_addcx.c: up to MAX_TDVPS_PAGES (15) with the TDVPR, the extra ones for L2 VMs.
    for _ in range(abi.MAX_TDVPS_PAGES - 1):
        td.sc(Leaf.TDH_VP_ADDCX, rcx=td.pages.alloc(), rdx=dup)
    assert failing(td, Leaf.TDH_VP_ADDCX, rcx=td.pages.alloc(), rdx=dup)[0] == Status.TDX_TDCX_NUM_INCORRECT
    assert failing(td, v1, rcx=dup, r8=vcpu.vcpu_id)[0] == Status.TDX_X2APIC_ID_NOT_UNIQUE | vcpu.vcpu_id
    assert failing(td, v1, rcx=dup, r8=1 << 32)[0] == op(Status.TDX_OPERAND_INVALID, OperandId.R8)
    assert failing(td, Leaf.TDH_VP_INIT | 2 << abi.LEAF_VERSION_SHIFT, rcx=dup, r8=1)[0] == op(
        Status.TDX_OPERAND_INVALID, OperandId.RAX)
    assert failing(td, v1, rcx=vcpu.tdvpr, r8=9)[0] == Status.TDX_VCPU_STATE_INCORRECT
    assert failing(td, Leaf.TDH_VP_ADDCX, rcx=td.pages.alloc(), rdx=vcpu.tdvpr)[0] == Status.TDX_VCPU_STATE_INCORRECT
    td.sc(v1, rcx=dup, r8=1)
    # MAX_VCPUS of TD_PARAMS is the number of platform CPUs (2): a third vCPU is refused.
    third = td.pages.alloc()
    td.sc(Leaf.TDH_VP_CREATE, rcx=third, rdx=td.tdr)
    for _ in range(td.module.platform.tdcx_pages):
        td.sc(Leaf.TDH_VP_ADDCX, rcx=td.pages.alloc(), rdx=third)
    assert failing(td, v1, rcx=third, r8=2)[0] == Status.TDX_MAX_VCPUS_EXCEEDED
    assert failing(td, Leaf.TDH_VP_INIT, rcx=td.tdr)[0] == op(Status.TDX_PAGE_METADATA_INCORRECT, OperandId.RCX)


def test_sept_and_page_add_errors():
    td = built_td()
    source, _ = source_page(td, 0)
    gpa = 0x4000_0000
    page = td.pages.alloc()
    status, regs = failing(td, Leaf.TDH_MEM_PAGE_ADD, rcx=gpa, rdx=td.tdr, r8=page, r9=source)
    # The walk stops at the root (PML4, level 3) whose entry is free.
    assert status == op(Status.TDX_EPT_WALK_FAILED, OperandId.RCX)
    assert (regs[0], regs[1]) == (abi.SEPTE_SUPPRESS_VE, 3 | SeptState.FREE << 8)
    status, regs = failing(td, Leaf.TDH_MEM_SEPT_ADD, rcx=gpa | 1, rdx=td.tdr, r8=td.pages.alloc())
    assert status == op(Status.TDX_EPT_WALK_FAILED, OperandId.RCX)
    assert failing(td, Leaf.TDH_MEM_SEPT_ADD, rcx=gpa | 0, rdx=td.tdr, r8=td.pages.alloc())[0] == op(
        Status.TDX_OPERAND_INVALID, OperandId.RCX)  # level 0 is a leaf, not a table
    assert failing(td, Leaf.TDH_MEM_SEPT_ADD, rcx=(gpa + PAGE) | 1, rdx=td.tdr, r8=td.pages.alloc())[0] == op(
        Status.TDX_OPERAND_INVALID, OperandId.RCX)  # not 2 MiB aligned
    assert failing(td, Leaf.TDH_MEM_SEPT_ADD, rcx=gpa | 4, rdx=td.tdr, r8=td.pages.alloc())[0] == op(
        Status.TDX_OPERAND_INVALID, OperandId.RCX)  # above the root of a 4-level S-EPT
    td.add_page(gpa, source, measure=False)
    pdpt = td.sept_pages[(3, 0)]
    status, regs = failing(td, Leaf.TDH_MEM_SEPT_ADD, rcx=0 | 3, rdx=td.tdr, r8=td.pages.alloc())
    assert status == op(Status.TDX_EPT_ENTRY_STATE_INCORRECT, OperandId.RCX)
    assert (regs[0], regs[1]) == (pdpt | 7, 3 | SeptState.MAPPED << 8)
    status, regs = failing(td, Leaf.TDH_MEM_PAGE_ADD, rcx=gpa, rdx=td.tdr, r8=td.pages.alloc(), r9=source)
    assert status == op(Status.TDX_EPT_ENTRY_STATE_INCORRECT, OperandId.RCX)
    assert regs[1] == 0 | SeptState.MAPPED << 8
    shared_gpa = gpa + PAGE | 1 << 47
    assert failing(td, Leaf.TDH_MEM_PAGE_ADD, rcx=shared_gpa, rdx=td.tdr, r8=td.pages.alloc(), r9=source)[0] == op(
        Status.TDX_OPERAND_INVALID, OperandId.RCX)
    keyed_source = source | (td.hkid << td.module.platform.hkid_shift)
    status = failing(td, Leaf.TDH_MEM_PAGE_ADD, rcx=gpa + PAGE, rdx=td.tdr, r8=td.pages.alloc(), r9=keyed_source)[0]
    assert status == op(Status.TDX_OPERAND_INVALID, OperandId.R9)
    assert failing(td, Leaf.TDH_MEM_PAGE_ADD, rcx=gpa + PAGE, rdx=td.tdr, r8=pdpt, r9=source)[0] == op(
        Status.TDX_PAGE_METADATA_INCORRECT, OperandId.R8)
    assert failing(td, Leaf.TDH_MR_EXTEND, rcx=gpa + 0x80, rdx=td.tdr)[0] == op(Status.TDX_OPERAND_INVALID,
                                                                                 OperandId.RCX)
    assert failing(td, Leaf.TDH_MR_EXTEND, rcx=gpa + PAGE, rdx=td.tdr)[0] == op(Status.TDX_EPT_ENTRY_NOT_PRESENT,
                                                                                OperandId.RCX)
    td.finalize()
    assert failing(td, Leaf.TDH_MEM_PAGE_ADD, rcx=gpa + PAGE, rdx=td.tdr, r8=td.pages.alloc(), r9=source)[0] == (
        Status.TDX_OP_STATE_INCORRECT)
    assert failing(td, Leaf.TDH_MR_EXTEND, rcx=gpa, rdx=td.tdr)[0] == Status.TDX_OP_STATE_INCORRECT
    assert failing(td, Leaf.TDH_MR_FINALIZE, rcx=td.tdr)[0] == Status.TDX_OP_STATE_INCORRECT


def test_mr_extend_zeroes_rcx_rdx_and_checks_the_gpa_before_the_walk():
    """tdh_mr_extend.c tdh_mr_extend(): RCX and RDX 0 on entry (no extended error), then the TDR
    (RDX), the TD's state, the GPA 256-byte aligned, check_gpa_validity() private (both
    OPERAND_INVALID(RCX)), and only then the S-EPT walk."""
    td = built_td()
    unmapped = 0x40_0000
    for rcx, rdx, status in ((unmapped, td.tdr + 0x80, op(Status.TDX_OPERAND_INVALID, OperandId.RDX)),
                             (unmapped + 0x80, td.tdr, op(Status.TDX_OPERAND_INVALID, OperandId.RCX)),
                             (unmapped | 1 << 47, td.tdr, op(Status.TDX_OPERAND_INVALID, OperandId.RCX))):
        got, regs = failing(td, Leaf.TDH_MR_EXTEND, rcx=rcx, rdx=rdx)
        assert (got, regs[0], regs[1]) == (status, 0, 0), hex(rcx)
    source, _ = source_page(td, 5)
    td.add_page(unmapped, source, measure=False)
    result = td.sc(Leaf.TDH_MR_EXTEND, rcx=unmapped, rdx=td.tdr)
    assert (result.regs[0], result.regs[1]) == (0, 0)


def test_mr_extend_walk_failure_names_the_entry_where_the_walk_stopped():
    """tdh_mr_extend.c:113-133: check_and_walk_private_gpa_to_leaf() (helpers.c) fails unless the
    walk ends on a leaf with RWX; the module returns that as TDX_EPT_ENTRY_NOT_PRESENT with
    OPERAND_ID_RCX and set_arch_septe_details_in_vmm_regs() (sept_manager.c): RCX the entry (a
    FREE one reads as SUPPRESS_VE alone), RDX its level | state << 8. PENDING entries have no
    access (tdh_mem_page_aug.c: SEPT_PERMISSIONS_NONE), BLOCKED ones lose it
    (tdh_mem_range_block.c), so they fail the walk at level 0 too."""
    not_present = op(Status.TDX_EPT_ENTRY_NOT_PRESENT, OperandId.RCX)
    td = built_td()
    gpa = 0x40_0000
    status, regs = failing(td, Leaf.TDH_MR_EXTEND, rcx=gpa, rdx=td.tdr)  # no table below the root (level 3)
    assert (status, regs[0], regs[1]) == (not_present, abi.SEPTE_SUPPRESS_VE, 3 | SeptState.FREE << 8)
    source, _ = source_page(td, 6)
    td.add_page(gpa, source, measure=False)
    status, regs = failing(td, Leaf.TDH_MR_EXTEND, rcx=gpa + PAGE, rdx=td.tdr)  # a FREE 4K entry
    assert (status, regs[0], regs[1]) == (not_present, abi.SEPTE_SUPPRESS_VE, 0 | SeptState.FREE << 8)
    pending_gpa, page = gpa + 2 * PAGE, td.pages.alloc()
    td.sc(Leaf.TDH_MEM_PAGE_AUG, rcx=pending_gpa, rdx=td.tdr, r8=page)
    status, regs = failing(td, Leaf.TDH_MR_EXTEND, rcx=pending_gpa, rdx=td.tdr)
    assert (status, regs[0] & ~0xFFF, regs[0] & abi.SEPTE_RWX, regs[1]) == (not_present, page, 0,
                                                                            0 | SeptState.PENDING << 8)
    td.sc(Leaf.TDH_MEM_RANGE_BLOCK, rcx=gpa, rdx=td.tdr)
    status, regs = failing(td, Leaf.TDH_MR_EXTEND, rcx=gpa + 0x100, rdx=td.tdr)
    assert (status, regs[0] & ~0xFFF, regs[0] & abi.SEPTE_RWX, regs[1]) == (not_present, td.private[gpa], 0,
                                                                            0 | SeptState.BLOCKED << 8)


def test_finalize_needs_a_vcpu():
    td = new_td(ready_module())
    td.init_vm()
    assert failing(td, Leaf.TDH_MR_FINALIZE, rcx=td.tdr)[0] == Status.TDX_NO_VCPUS


def test_page_aug_after_finalize_is_pending_and_removal_needs_block_and_track():
    td = built_td()
    td.finalize()
    gpa = 0x20_0000
    pfn_page = td.add_page(gpa, source=0, measure=False)  # KVM_PRE_FAULT_MEMORY / EPT violation
    assert module_leaf(td, gpa).state is SeptState.PENDING
    assert rdmd(td.module, pfn_page) == (PageType.PT_REG, td.tdr)
    # A pending page was never reachable by the guest: no TLB tracking needed to remove it.
    td.sc(Leaf.TDH_MEM_PAGE_REMOVE, rcx=gpa, rdx=td.tdr)
    assert rdmd(td.module, pfn_page) == (PageType.PT_NDA, 0)
    del td.private[gpa]
    # A mapped page of a runnable TD: block, then track, then remove.
    source, _ = source_page(td, 0)
    gpa2 = gpa + PAGE
    td.add_page(gpa2, source, measure=False)
    module_leaf(td, gpa2).state = SeptState.MAPPED  # as if the guest accepted it
    assert failing(td, Leaf.TDH_MEM_PAGE_REMOVE, rcx=gpa2, rdx=td.tdr)[0] == op(Status.TDX_GPA_RANGE_NOT_BLOCKED,
                                                                                 OperandId.RCX)
    td.sc(Leaf.TDH_MEM_RANGE_BLOCK, rcx=gpa2, rdx=td.tdr)
    assert call(td.module, td.memory, 0, Leaf.TDH_MEM_RANGE_BLOCK, rcx=gpa2, rdx=td.tdr).status == (
        Status.TDX_GPA_RANGE_ALREADY_BLOCKED)
    assert failing(td, Leaf.TDH_MEM_PAGE_REMOVE, rcx=gpa2, rdx=td.tdr)[0] == op(Status.TDX_TLB_TRACKING_NOT_DONE,
                                                                                 OperandId.RCX)
    assert failing(td, Leaf.TDH_PHYMEM_PAGE_WBINVD, rcx=td.keyed(td.private[gpa2], td.hkid))[0] == op(
        Status.TDX_PAGE_METADATA_INCORRECT, OperandId.RCX)  # still the TD's page
    td.sc(Leaf.TDH_MEM_TRACK, rcx=td.tdr)
    removed = td.sc(Leaf.TDH_MEM_PAGE_REMOVE, rcx=gpa2, rdx=td.tdr)
    assert removed.regs[0] == td.private.pop(gpa2)
    status, regs = failing(td, Leaf.TDH_MEM_RANGE_BLOCK, rcx=gpa2, rdx=td.tdr)
    assert (status, regs[1]) == (op(Status.TDX_EPT_ENTRY_STATE_INCORRECT, OperandId.RCX), 0 | SeptState.FREE << 8)
    td.destroy()
    assert td_pages(td.module) == {}


def module_leaf(td: KvmTd, gpa: int):
    return td.module.state.tds[td.tdr].leaves[gpa]


def test_teardown_order():
    td = built_td(vcpus=2)
    td.finalize()
    tdr = td.tdr
    assert failing(td, Leaf.TDH_MNG_KEY_FREEID, rcx=tdr)[0] == Status.TDX_LIFECYCLE_STATE_INCORRECT
    assert failing(td, Leaf.TDH_PHYMEM_PAGE_RECLAIM, rcx=td.tdcs[0])[0] == Status.TDX_LIFECYCLE_STATE_INCORRECT
    # Nothing released yet: the cache write-back has nothing to do (KVM takes that as done).
    assert failing(td, Leaf.TDH_PHYMEM_CACHE_WB, rcx=0)[0] == Status.TDX_NO_HKID_READY_TO_WBCACHE
    assert failing(td, Leaf.TDH_MNG_VPFLUSHDONE, rcx=tdr)[0] == Status.TDX_FLUSHVP_NOT_DONE
    v0, v1 = td.vcpus
    assert failing(td, Leaf.TDH_VP_FLUSH, cpu=v1.cpu, rcx=v0.tdvpr)[0] == Status.TDX_VCPU_NOT_ASSOCIATED
    td.sc(Leaf.TDH_VP_FLUSH, cpu=v0.cpu, rcx=v0.tdvpr)
    assert failing(td, Leaf.TDH_MNG_VPFLUSHDONE, rcx=tdr)[0] == Status.TDX_FLUSHVP_NOT_DONE
    td.sc(Leaf.TDH_VP_FLUSH, cpu=v1.cpu, rcx=v1.tdvpr)
    td.sc(Leaf.TDH_MNG_VPFLUSHDONE, rcx=tdr)
    assert failing(td, Leaf.TDH_MNG_VPFLUSHDONE, rcx=tdr)[0] == Status.TDX_LIFECYCLE_STATE_INCORRECT
    assert failing(td, Leaf.TDH_MNG_KEY_FREEID, rcx=tdr)[0] == Status.TDX_WBCACHE_NOT_COMPLETE
    assert failing(td, Leaf.TDH_PHYMEM_CACHE_WB, rcx=1)[0] == Status.TDX_WBCACHE_RESUME_ERROR
    assert failing(td, Leaf.TDH_PHYMEM_CACHE_WB, rcx=2)[0] == op(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    td.sc(Leaf.TDH_PHYMEM_CACHE_WB, rcx=0)
    td.sc(Leaf.TDH_MNG_KEY_FREEID, rcx=tdr)
    status, regs = failing(td, Leaf.TDH_PHYMEM_PAGE_RECLAIM, rcx=tdr)
    assert status == Status.TDX_TD_ASSOCIATED_PAGES_EXIST
    assert regs[:3] == (PageType.PT_TDR, 0, 0)
    reclaimed = td.reclaim(v0.tdvpr)
    assert reclaimed.regs[:3] == (PageType.PT_TDVPR, tdr, 0)
    assert failing(td, Leaf.TDH_PHYMEM_PAGE_RECLAIM, rcx=v0.tdvpr)[0] == op(Status.TDX_PAGE_METADATA_INCORRECT,
                                                                             OperandId.RCX)


def test_cache_wb_is_resumable():
    module = ready_module(cache_wb_chunks=3)
    td = built_td(module)
    td.destroy()
    statuses = [r.status for r in module.trace.of_leaf(Leaf.TDH_PHYMEM_CACHE_WB)]
    assert statuses == [Status.TDX_INTERRUPTED_RESUMABLE] * 2 + [0]
    assert [r.inputs["rcx"] for r in module.trace.of_leaf(Leaf.TDH_PHYMEM_CACHE_WB)] == [0, 1, 1]
    assert td_pages(module) == {}


def test_failed_key_config_unwinds_like_kvm():
    """__tdx_td_init() after a TDH.MNG.KEY.CONFIG failure: tdx_mmu_release_hkid() and
    tdx_reclaim_td_control_pages() on a TD that never got its TDCS."""
    platform = PlatformConfig(cpus=qemu_topology(2, 1), cmrs=cmrs_for_ram(RAM))
    module = ready_module(platform)
    module.faults.add(FaultRule(leaf=Leaf.TDH_MNG_KEY_CONFIG, status=Status.TDX_KEY_GENERATION_FAILED, package=1))
    td = new_td(module)
    with pytest.raises(SeamcallFailed) as failure:
        td.init_vm()
    assert failure.value.status == Status.TDX_KEY_GENERATION_FAILED
    td.release_hkid()
    td.reclaim(td.tdr)
    td.sc(Leaf.TDH_PHYMEM_PAGE_WBINVD, rcx=td.keyed(td.tdr, module.platform.tdx_keyid_start))
    assert td_pages(module) == {} and module.state.tds == {}
    assert set(module.state.kot) == {module.platform.tdx_keyid_start}


def test_td_leaves_need_a_ready_module():
    """tdx_vmm_dispatcher.c: before SYS_READY a TD leaf is TDX_SYS_NOT_READY whatever the
    caller's LP did (only SYS.RD, RDALL and INFO check LP.INIT)."""
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram(RAM)))
    memory = SparseMemory(RAM)
    assert call(module, memory, 0, Leaf.TDH_MNG_CREATE, rcx=M, rdx=17).status == Status.TDX_SYS_NOT_READY
    call(module, memory, 0, Leaf.TDH_SYS_INIT)
    call(module, memory, 0, Leaf.TDH_SYS_LP_INIT)
    assert call(module, memory, 0, Leaf.TDH_MNG_CREATE, rcx=M, rdx=17).status == Status.TDX_SYS_NOT_READY
    assert call(module, memory, 0, Leaf.TDH_PHYMEM_CACHE_WB).status == Status.TDX_SYS_NOT_READY


def test_td_state_is_gone_after_sys_disable_and_reinit():
    module = ready_module()
    td = built_td(module)
    call(module, td.memory, 0, Leaf.TDH_SYS_DISABLE)
    assert call(module, td.memory, 0, Leaf.TDH_MNG_RD, rcx=td.tdr, rdx=17 << 56).status == Status.TDX_SYS_SHUTDOWN


# --- fault plans --------------------------------------------------------------------------------------


def test_sept_busy_can_be_injected_with_its_operand():
    plan = FaultPlan([busy(Leaf.TDH_MEM_SEPT_ADD, calls=1, operand=OperandId.SEPT)])
    module = ready_module()
    module.faults = plan
    td = built_td(module)
    source, _ = source_page(td, 0)
    with pytest.raises(SeamcallFailed) as failure:
        td.add_page(0x1000, source, measure=False)
    assert failure.value.status == op(Status.TDX_OPERAND_BUSY, OperandId.SEPT) == 0x8000020000000092
    assert abi.status_name(failure.value.status) == "TDX_OPERAND_BUSY(SEPT)"
    td.add_page(0x1000, source, measure=False)  # KVM retries the fault: now it works
    assert FaultPlan.from_json(plan.to_json()).rules == plan.rules


def test_mr_finalize_busy_maps_to_ebusy():
    module = ready_module()
    td = built_td(module)
    module.faults.add(busy(Leaf.TDH_MR_FINALIZE, calls=1, operand=OperandId.TDR))
    status = call(module, td.memory, 0, Leaf.TDH_MR_FINALIZE, rcx=td.tdr).status
    assert status & abi.STATUS_MASK == Status.TDX_OPERAND_BUSY  # tdx_operand_busy() -> -EBUSY
    td.finalize()


def test_two_tds_have_separate_keys_and_pages():
    module = ready_module()
    pages = PageAllocator()
    memory = SparseMemory(RAM)
    a, b = new_td(module, memory, pages), new_td(module, memory, pages)
    a.init_vm()
    b.hkid = a.hkid + 1
    b.init_vm()
    a.init_vcpu(0, cpu=0)
    b.init_vcpu(0, cpu=1)
    assert failing(a, Leaf.TDH_VP_ADDCX, rcx=pages.alloc(), rdx=b.vcpus[0].tdvpr)[0] == Status.TDX_VCPU_STATE_INCORRECT
    a.destroy()
    assert b.tdr in module.state.tds and a.tdr not in module.state.tds
    b.destroy()
    assert td_pages(module) == {}


# --- (d) TDH.VP.ENTER: scripted exits ---------------------------------------------------------------


def running_td() -> tuple[KvmTd, KvmVcpu]:
    td = built_td()
    td.finalize()
    return td, td.vcpus[0]


def test_vp_enter_returns_each_scripted_exit_in_the_registers_kvm_reads():
    td, vcpu = running_td()
    td.module.exits.add(exits.io(0x3F8, 1, write=True, value=0x41), exits.cpuid(0x1), exits.ept_violation(0x2000))
    status, regs = td.enter(vcpu)
    # tdx_to_vmx_exit_reason(): TDX_SUCCESS, RAX[15:0] = TDCALL; tdvmcall_leaf() = R11; tdx_emulate_io()
    assert status == abi.ExitReason.TDCALL
    assert (regs["r10"], regs["r11"], regs["r12"], regs["r13"], regs["r14"], regs["r15"]) == \
        (0, abi.Tdvmcall.IO_INSTRUCTION, 1, 1, 0x3F8, 0x41)
    assert regs["rcx"] == abi.TDVMCALL_EXPOSE_REGS_MASK and regs["rbx"] == regs["r8"] == 0
    status, regs = td.enter(vcpu, r10=abi.TDVMCALL_STATUS_SUCCESS, r11=0)  # KVM's answer to the out
    assert status == abi.ExitReason.TDCALL and (regs["r11"], regs["r12"], regs["r13"]) == (abi.Tdvmcall.CPUID, 1, 0)
    assert td.module.trace.records[-1].note.startswith("TDVMCALL answered R10=0x0 R11=0x0; exit: TDVMCALL<CPUID>")
    status, regs = td.enter(vcpu, r12=0x806F8, r13=0, r14=0, r15=0)
    # tdx_enter_exit(): exit_qualification = RCX, ext_exit_qualification = RDX, exit_gpa = R8
    assert status == abi.ExitReason.EPT_VIOLATION
    assert (regs["rcx"], regs["rdx"], regs["r8"]) == (abi.EPT_VIOLATION_ACC_WRITE, 0, 0x2000)
    status, regs = td.enter(vcpu)  # nothing left: the guest reports a fatal error, KVM exits to userspace
    assert status == abi.ExitReason.TDCALL
    assert (regs["r11"], regs["r12"]) == (abi.Tdvmcall.REPORT_FATAL_ERROR, exits.SCRIPT_ENDED_ERROR)


def test_hlt_with_an_interrupt_pending_shows_in_vcpu_state_details_until_the_next_entry():
    """tdx_protected_apic_has_interrupt() reads TDVPS VCPU_STATE_DETAILS after a HLT with IRQs on."""
    td, vcpu = running_td()
    td.module.exits.add(exits.hlt(intr_pending=True), exits.hlt(irq_blocked=True))
    details = TDVPS_CLASS_OTHER_GUEST << 56 | abi.FIELD_NON_ARCH | abi.TDVPS_VCPU_STATE_DETAILS

    def state_details() -> int:
        return td.sc(Leaf.TDH_VP_RD, cpu=vcpu.cpu, rcx=vcpu.tdvpr, rdx=details).regs[2]

    status, regs = td.enter(vcpu)
    assert (status, regs["r11"], regs["r12"]) == (abi.ExitReason.TDCALL, abi.Tdvmcall.HLT, 0)
    assert state_details() & abi.VCPU_STATE_DETAILS_INTR_PENDING
    status, regs = td.enter(vcpu)
    assert regs["r12"] == 1 and not state_details() & abi.VCPU_STATE_DETAILS_INTR_PENDING


def test_vp_enter_checks_before_running_anything():
    td = built_td()
    vcpu = td.vcpus[0]
    td.module.exits.add(exits.hlt())
    assert td.enter(vcpu)[0] == Status.TDX_OP_STATE_INCORRECT  # not finalized (KVM refuses KVM_RUN first)
    td.finalize()
    other = next(c.apic_id for c in td.module.platform.cpus if c.apic_id != vcpu.cpu)
    result = call(td.module, td.memory, other, Leaf.TDH_VP_ENTER, rcx=vcpu.tdvpr)
    assert result.status == Status.TDX_VCPU_ASSOCIATED  # still associated with its LP: no VP.FLUSH
    result = call(td.module, td.memory, vcpu.cpu, Leaf.TDH_VP_ENTER, rcx=td.tdr)
    assert result.status == op(Status.TDX_PAGE_METADATA_INCORRECT, OperandId.RCX)
    assert len(td.module.exits.queued) == 1, "the checks that failed consumed no exit"
    assert td.enter(vcpu)[1]["r11"] == abi.Tdvmcall.HLT


def test_busy_vp_entry_consumes_no_exit():
    """Zero-step mitigation: VP.ENTER fails TDX_OPERAND_BUSY(SEPT) and KVM simply enters again."""
    td, vcpu = running_td()
    td.module.faults.add(busy(Leaf.TDH_VP_ENTER, 2, OperandId.SEPT))
    td.module.exits.add(exits.io(0x80, 1, write=True, value=1))
    busy_status = op(Status.TDX_OPERAND_BUSY, OperandId.SEPT)
    assert [td.enter(vcpu)[0] for _ in range(3)] == [busy_status, busy_status, abi.ExitReason.TDCALL]
    assert td.enter(vcpu)[1]["r11"] == abi.Tdvmcall.REPORT_FATAL_ERROR

"""TDH.MNG.INIT's CPUID configuration: which TD_PARAMS CPUID bits the module takes, the F/M/S
rule, and the virtual CPUID it stores (read back as KVM_TDX_GET_CPUID does, TDH.MNG.RD of
CPUID_VALUES). Expected values come from the TDX 1.5.01 module source:
src/vmm_dispatcher/api_calls/tdh_mng_init.c read_and_set_cpuid_configurations(),
include/auto_gen/cpuid_configurations.c (the per-leaf masks, written out here as literals) and
src/common/metadata_handlers/metadata_sys.c (what TDH.SYS.RD reports)."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from kvm_replay import (
    KVM_SUPPORTED_TDX_TD_ATTRS,
    RAM,
    KvmTd,
    SeamcallFailed,
    kvm_td_params,
    new_td,
    read_sysinfo,
    ready_module,
)

from harness.seam import abi
from harness.seam.abi import Leaf, OperandId, Status
from harness.seam.memory import SparseMemory
from harness.seam.platform import CpuidValue, PlatformConfig

# Linux TD_MD_FIELD_ID_CPUID_VALUES (arch/x86/kvm/vmx/tdx_arch.h), the base tdx_read_cpuid() uses.
CPUID_VALUES = 0x9410000300000000
LEAF1_RCX = 0xFFFFFFFF_00000001  # RCX of a refused leaf: subleaf << 32 | leaf
LEAF7_RCX = 0x00000000_00000007
LEAF1, LEAF7, LEAF_PA = 0, 1, 2  # CPUID_CONFIG slots of the modelled leaves
XFAM_SSE = 0x3  # x87 and SSE, what every TD has
XFAM_AVX = 0x7
XFAM_AVX512 = 0xE7
PLATFORM_FMS = 0x000806F8  # the default platform's native CPUID(1).EAX


def td_with(native: dict[int, CpuidValue] | None = None) -> KvmTd:
    """A TD on the default platform, the CPU's native values of some CPUID_CONFIG slots replaced."""
    configs = list(PlatformConfig().cpuid_config)
    for slot, value in (native or {}).items():
        configs[slot] = dataclasses.replace(configs[slot], native=value)
    return new_td(ready_module(cpuid_config=tuple(configs)))


def td_params(td: KvmTd, values: dict[int, CpuidValue], attributes: int = KVM_SUPPORTED_TDX_TD_ATTRS,
              xfam: int = XFAM_SSE, fms: int = 0) -> bytes:
    """KVM's TD_PARAMS (kvm_replay) with the CPUID values of some slots replaced."""
    data = bytearray(kvm_td_params(td.info, attributes, xfam, 2, 2_000_000, fms=fms))
    for slot, value in values.items():
        data[256 + 16 * slot:256 + 16 * slot + 16] = struct.pack("<IIII", *value.regs)
    return bytes(data)


def refused(td: KvmTd, params: bytes) -> tuple[int, int]:
    with pytest.raises(SeamcallFailed) as failure:
        td.init_vm(params=params)
    return failure.value.status, failure.value.regs[0]


def stored(td: KvmTd, leaf: int, subleaf: int = abi.CPUID_NO_SUBLEAF) -> CpuidValue:
    """tdx_read_cpuid(): TDH.MNG.RD of the leaf's two CPUID_VALUES elements."""
    ebx_eax, edx_ecx = (td.sc(Leaf.TDH_MNG_RD, rcx=td.tdr, rdx=CPUID_VALUES | abi.cpuid_field_code(leaf, subleaf, e))
                        .regs[2] for e in (0, 1))
    return CpuidValue(ebx_eax & 0xFFFFFFFF, ebx_eax >> 32, edx_ecx & 0xFFFFFFFF, edx_ecx >> 32)


CPUID_CONFIG_INVALID = abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.CPUID_CONFIG)


def test_sys_rd_reports_the_config_direct_bits_only():
    """metadata_sys.c: CPUID_CONFIG_LEAVES and CPUID_CONFIG_VALUES are cpuid_configurable[]'s
    leaf_subleaf and config_direct; cpuid_configurations.c: leaf 1's config_direct is EAX
    0x0FFF3FFF, EBX 0x00FF0000, leaf 7.0 and 0x80000008 have none (their bits are ALLOW_DIRECT)."""
    module = ready_module()
    info = read_sysinfo(module, SparseMemory(RAM))
    assert info.cpuid_leaves == [LEAF1_RCX, LEAF7_RCX, 0xFFFFFFFF_80000008]
    assert info.cpuid_values == [(0x00FF0000_0FFF3FFF, 0), (0, 0), (0, 0)]


def test_allow_direct_bits_are_taken_and_kept_only_where_the_cpu_has_them():
    """tdh_mng_init.c read_and_set_cpuid_configurations(): a bit set in TD_PARAMS must be
    CONFIG_DIRECT or ALLOW_DIRECT; an ALLOW_DIRECT bit keeps the native value if set, is 0 if
    clear. CPUID(0x80000008).EBX[9] (WBNOINVD) is ALLOW_DIRECT (cpuid_configurable[9])."""
    wbnoinvd = CpuidValue(ebx=1 << 9)
    td = td_with({LEAF_PA: CpuidValue(eax=0x302E)})  # a CPU without WBNOINVD
    td.init_vm(params=td_params(td, {LEAF_PA: wbnoinvd}))
    assert stored(td, 0x80000008).ebx == 0
    td = td_with({LEAF_PA: CpuidValue(eax=0x302E, ebx=1 << 9)})
    td.init_vm(params=td_params(td, {LEAF_PA: wbnoinvd}))
    assert stored(td, 0x80000008).ebx == 1 << 9
    td = td_with({LEAF_PA: CpuidValue(eax=0x302E, ebx=1 << 9)})
    td.init_vm(params=td_params(td, {}))  # KVM passes CAPABILITIES' 0
    assert stored(td, 0x80000008).ebx == 0


@pytest.mark.parametrize("slot,value,rcx", [
    (LEAF7, CpuidValue(ebx=1 << 0), LEAF7_RCX),  # FSGSBASE: fixed by the CPU, not ALLOW_DIRECT
    (LEAF1, CpuidValue(ecx=1 << 0), LEAF1_RCX),  # SSE3: not in ALLOW_DIRECT ECX 0x31044D88
    (LEAF1, CpuidValue(edx=1 << 0), LEAF1_RCX),  # FPU: not in ALLOW_DIRECT EDX 0xB8440000
    (LEAF_PA, CpuidValue(eax=0x30 << 16), 0xFFFFFFFF_80000008),  # GPAW: FIXED0
])
def test_a_bit_neither_config_direct_nor_allow_direct_is_refused_with_the_leaf(slot, value, rcx):
    """tdh_mng_init.c:253-259: OPERAND_INVALID(CPUID_CONFIG), RCX = the leaf and subleaf."""
    td = td_with()
    assert refused(td, td_params(td, {slot: value})) == (CPUID_CONFIG_INVALID, rcx)
    assert td.hw_error == CPUID_CONFIG_INVALID  # tdx_td_init(): -EINVAL, the status to userspace


def test_leaf_1_is_native_less_fixed0_plus_fixed1_configured_and_masked_by_xfam():
    """tdh_mng_init.c:262-276 and 311-316, cpuid_lookup[0] FIXED0_OR_DYNAMIC (0xF000C000,
    0xFF0000FF, 0x08010060, 0x40120400) and FIXED1 (ECX 0x80000000, EDX 0x200), config_direct
    EBX 0x00FF0000, ALLOW_DIRECT ECX 0x31044D88 / EDX 0xB8440000, xfam_mask_0x1_0xffffffff[2]
    ECX 0x30001000 (FMA, AVX, F16C) cleared without XFAM.AVX."""
    native = CpuidValue(PLATFORM_FMS, 0x00800800, 0x7FFEFBFF, 0xBFEBFBFF)
    td = td_with({LEAF1: native})
    td.init_vm(params=td_params(td, {LEAF1: CpuidValue(0, 0x00400000, 0x31044D88, 0)}))
    assert stored(td, 1) == CpuidValue(
        eax=PLATFORM_FMS,
        ebx=0x00800800 & ~0xFF0000FF & ~0x00FF0000 | 0x00400000,
        ecx=(0x7FFEFBFF & ~0x08010060 | 0x80000000) & ~0x30001000,
        edx=(0xBFEBFBFF & ~0x40120400 | 0x200) & ~0xB8440000)
    td = td_with({LEAF1: native})
    td.init_vm(params=td_params(td, {LEAF1: CpuidValue(0, 0, 0x31044D88, 0)}, xfam=XFAM_AVX))
    assert stored(td, 1).ecx == 0x7FFEFBFF & ~0x08010060 | 0x80000000


@pytest.mark.parametrize("fms,verdict", [
    (0, PLATFORM_FMS),  # 0: the platform's
    (PLATFORM_FMS, PLATFORM_FMS),
    (PLATFORM_FMS - 1, None),  # an older stepping
    (0x000C06F2, None),  # another CPU (Emerald Rapids)
    (0x0FFF3FFF, None),  # the CONFIG_DIRECT mask, as CAPABILITIES offers it
])
def test_cpuid_1_eax_of_a_non_migratable_td_is_0_or_the_platform_fms(fms, verdict):
    """tdh_mng_init.c:280-309: a configured CPUID(1).EAX of 0 becomes platform_fms; anything
    but platform_fms is OPERAND_INVALID(CPUID_CONFIG) with RCX = leaf 1."""
    td = td_with()
    params = td_params(td, {}, fms=fms)
    if verdict is None:
        assert refused(td, params) == (CPUID_CONFIG_INVALID, LEAF1_RCX)
    else:
        td.init_vm(params=params)
        assert stored(td, 1).eax == verdict


def test_leaf_1_is_refused_before_a_bad_bit_of_leaf_7():
    """tdh_mng_init.c: one loop over cpuid_lookup[], leaf 1 (index 0) before leaf 7.0 (index 5),
    each leaf's bits then its own checks: the first bad leaf is in RCX."""
    td = td_with()
    assert refused(td, td_params(td, {LEAF7: CpuidValue(ebx=1 << 0)}, fms=1)) == (CPUID_CONFIG_INVALID, LEAF1_RCX)


def test_leaf_7_masked_by_xfam_pks_from_attributes_kl_cleared():
    """tdh_mng_init.c:337-373: xfam_mask_0x7_0x0 (AVX2 EBX[5] needs XFAM[2], AVX512F EBX[16]
    XFAM[7:5], PKU ECX[3] XFAM[9]), ECX.PKS = ATTRIBUTES.PKS, ECX.KL_SUPPORTED = 0."""
    native = CpuidValue(0x2, 1 << 5 | 1 << 16, 1 << 3 | 1 << 23, 0)
    all_allowed = CpuidValue(ebx=0xDC2B9B18, ecx=0x02417F65, edx=0x0005411C)
    td = td_with({LEAF7: native})
    td.init_vm(params=td_params(td, {LEAF7: all_allowed}))
    assert stored(td, 7, 0) == CpuidValue(eax=0x2)
    td = td_with({LEAF7: native})
    td.init_vm(params=td_params(td, {LEAF7: all_allowed}, attributes=KVM_SUPPORTED_TDX_TD_ATTRS | abi.TD_ATTR_PKS,
                                xfam=XFAM_AVX512 | 1 << 9))
    assert stored(td, 7, 0) == CpuidValue(0x2, 1 << 5 | 1 << 16, 1 << 3 | 1 << 31, 0)


def test_hle_without_rtm_is_checked_on_the_tds_value():
    """tdh_mng_init.c:344-349: HLE and RTM must be alike after the configuration; a CPU without
    TSX leaves both 0 whatever TD_PARAMS allows, so HLE alone passes there."""
    hle = CpuidValue(ebx=abi.CPUID_7_0_EBX_HLE)
    td = td_with({LEAF7: CpuidValue(eax=0x2)})
    td.init_vm(params=td_params(td, {LEAF7: hle}))
    assert stored(td, 7, 0).ebx == 0
    tsx = CpuidValue(eax=0x2, ebx=abi.CPUID_7_0_EBX_HLE | abi.CPUID_7_0_EBX_RTM)
    td = td_with({LEAF7: tsx})
    assert refused(td, td_params(td, {LEAF7: hle})) == (CPUID_CONFIG_INVALID, 0)


@pytest.mark.parametrize("ecx,la_bits", [(0, 48), (abi.CPUID_7_0_ECX_LA57, 57)])
def test_linear_address_bits_follow_the_tds_la57(ecx, la_bits):
    """tdh_mng_init.c:482-497: CPUID(0x80000008).EAX[15:8] is 57 with the TD's CPUID(7,0).ECX.LA57
    (ALLOW_DIRECT), else 48; the native PA bits (EAX[7:0]) stay, EAX[31:16] is FIXED0."""
    td = td_with({LEAF7: CpuidValue(eax=0x2, ecx=abi.CPUID_7_0_ECX_LA57),
                  LEAF_PA: CpuidValue(eax=0x00FF392E)})
    td.init_vm(params=td_params(td, {LEAF7: CpuidValue(ecx=ecx)}))
    assert stored(td, 0x80000008).eax == la_bits << 8 | 0x2E


def test_what_the_module_reports_configured_back_is_accepted_but_for_the_fms():
    """KVM 7.3 (arch/x86/kvm/vmx/tdx.c setup_tdparams_cpuids()) copies userspace's CPUID entries
    verbatim; CAPABILITIES (td_init_cpuid_entry2()) offers what TDH.SYS.RD reports. Each
    CONFIG_DIRECT bit is accepted back, but CPUID(1).EAX's mask is no F/M/S
    (tdh_mng_init.c:303-309): a VMM must put 0 or the platform's there."""
    td = td_with()
    configs = PlatformConfig().cpuid_config
    reported = {slot: c.config_direct for slot, c in enumerate(configs)}
    assert refused(td, td_params(td, reported)) == (CPUID_CONFIG_INVALID, LEAF1_RCX)
    td = td_with()
    td.init_vm(params=td_params(td, {**reported, LEAF1: dataclasses.replace(reported[LEAF1], eax=0)}))
    assert stored(td, 1).ebx & 0x00FF0000 == 0x00FF0000


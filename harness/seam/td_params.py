"""TD_PARAMS, the 1024-byte TDH.MNG.INIT input, and the checks the module applies to it.

Layout (TDX module ABI, TDX 1.5; Linux's struct td_params is the same bytes with the 1.5-only
fields folded into its reserved arrays):

  0  ATTRIBUTES (8)          8  XFAM (8)              16 MAX_VCPUS (2)
  18 NUM_L2_VMS (1)          19 MSR_CONFIG_CTLS (1)   20 reserved (4)
  24 EPTP_CONTROLS (8)       32 CONFIG_FLAGS (8)      40 TSC_FREQUENCY (2, units of 25 MHz)
  42 reserved (38)           80 MRCONFIGID (48)       128 MROWNER (48)
  176 MROWNERCONFIG (48)     224 IA32_ARCH_CAPABILITIES_CONFIG (8)
  232 reserved (24)          256 CPUID_CONFIG values, 16 bytes each (EAX, EBX, ECX, EDX), in
                                 the order of the CPUID_CONFIG leaves TDH.SYS.RD reports
  256 + 16 * n .. 1024 reserved
The checks run in the order the module runs them, so the first bad field decides the status.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from harness.seam import abi
from harness.seam.abi import OperandId, Status
from harness.seam.platform import CpuidConfig, CpuidValue, PlatformConfig

_HEADER = struct.Struct("<QQHBB4sQQH38s48s48s48sQ24s")
CpuidKey = tuple[int, int]  # (leaf, subleaf or CPUID_NO_SUBLEAF)
CPUID_VALUES_OFFSET = 256
CPUID_VALUE_SIZE = 16
MSR_CONFIG_CTLS_IA32_ARCH_CAP = 1 << 0


@dataclass(frozen=True)
class TdParams:
    attributes: int
    xfam: int
    max_vcpus: int
    num_l2_vms: int
    msr_config_ctls: int
    reserved0: bytes
    eptp_controls: int
    config_flags: int
    tsc_frequency: int
    reserved1: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    ia32_arch_capabilities_config: int
    reserved2: bytes
    cpuid_values: tuple[CpuidValue, ...]
    reserved3: bytes

    @classmethod
    def unpack(cls, data: bytes, num_cpuid_config: int) -> TdParams:
        if len(data) != abi.TD_PARAMS_SIZE:
            raise ValueError(f"TD_PARAMS is {abi.TD_PARAMS_SIZE} bytes, got {len(data)}")
        (attributes, xfam, max_vcpus, num_l2_vms, msr_config_ctls, reserved0, eptp_controls, config_flags,
         tsc_frequency, reserved1, mrconfigid, mrowner, mrownerconfig, arch_caps, reserved2) = _HEADER.unpack_from(data)
        values = tuple(CpuidValue(*struct.unpack_from("<IIII", data, CPUID_VALUES_OFFSET + CPUID_VALUE_SIZE * i))
                       for i in range(num_cpuid_config))
        return cls(attributes=attributes, xfam=xfam, max_vcpus=max_vcpus, num_l2_vms=num_l2_vms,
                   msr_config_ctls=msr_config_ctls, reserved0=reserved0, eptp_controls=eptp_controls,
                   config_flags=config_flags, tsc_frequency=tsc_frequency, reserved1=reserved1,
                   mrconfigid=mrconfigid, mrowner=mrowner, mrownerconfig=mrownerconfig,
                   ia32_arch_capabilities_config=arch_caps, reserved2=reserved2, cpuid_values=values,
                   reserved3=data[CPUID_VALUES_OFFSET + CPUID_VALUE_SIZE * num_cpuid_config:])

    @property
    def gpaw(self) -> bool:
        return bool(self.config_flags & abi.CONFIG_FLAGS_GPAW)

    @property
    def ept_levels(self) -> int:
        return ((self.eptp_controls >> abi.EPTP_PWL_SHIFT) & abi.EPTP_PWL_MASK) + 1


@dataclass(frozen=True)
class Verdict:
    """The outcome of TDH.MNG.INIT's checks: the status, RCX (the extended error: the CPUID
    leaf/subleaf that was refused, else 0) and, when they pass, the TD's virtual CPUID of each
    CPUID_CONFIG leaf as the module stores it in the TDCS."""

    status: int
    rcx: int = 0
    cpuid: dict[CpuidKey, CpuidValue] = field(default_factory=dict)


def _invalid(operand: OperandId, rcx: int = 0) -> Verdict:
    return Verdict(abi.with_operand(Status.TDX_OPERAND_INVALID, operand), rcx)


def _attributes_ok(attributes: int, platform: PlatformConfig) -> bool:
    if attributes & ~platform.attributes_fixed0:
        return False
    if attributes & platform.attributes_fixed1 != platform.attributes_fixed1:
        return False
    # A migratable TD can be neither a debug TD nor use PERFMON.
    return not (attributes & abi.TD_ATTR_MIGRATABLE
                and attributes & (abi.TD_ATTR_DEBUG | abi.TD_ATTR_PERFMON))


def _all_or_none(value: int, bits: int) -> bool:
    return value & bits in (0, bits)


def _xfam_ok(xfam: int, platform: PlatformConfig) -> bool:
    # XFAM_FIXED0 as TDH.SYS.RD reports it already folds in what the CPU supports.
    if xfam & ~platform.xfam_fixed0 or xfam & platform.xfam_fixed1 != platform.xfam_fixed1:
        return False
    if xfam & abi.XFAM_AVX512 and not xfam & abi.XFAM_AVX:
        return False
    return all(_all_or_none(xfam, bits) for bits in (abi.XFAM_AVX512, abi.XFAM_CET, abi.XFAM_AMX))


def _eptp_ok(eptp: int, gpaw: bool, platform: PlatformConfig) -> bool:
    pwl = (eptp >> abi.EPTP_PWL_SHIFT) & abi.EPTP_PWL_MASK
    max_pwl = abi.EPTP_PWL_5 if platform.ept_pml5_supported else abi.EPTP_PWL_4
    # Only memory type and page-walk length may be set: A/D, SSS, reserved and the base PA
    # (the module points EPTP at its own S-EPT root) must be 0.
    if eptp & abi.EPTP_MT_MASK != abi.EPTP_MT_WB or not abi.EPTP_PWL_4 <= pwl <= max_pwl:
        return False
    if eptp & ~((abi.EPTP_PWL_MASK << abi.EPTP_PWL_SHIFT) | abi.EPTP_MT_MASK):
        return False
    if pwl == abi.EPTP_PWL_5 and platform.max_pa_bits < abi.MIN_PA_FOR_PML5:
        return False
    # A SHARED bit at GPA[51] needs a 5-level S-EPT.
    return not (gpaw and pwl < abi.EPTP_PWL_5)


_VER_INFO: CpuidKey = (abi.CPUID_VER_INFO_LEAF, abi.CPUID_NO_SUBLEAF)
_EXT_FEATURES: CpuidKey = (abi.CPUID_EXT_FEATURES_LEAF, abi.CPUID_EXT_FEATURES_SUBLEAF)
# Bits of a CPUID leaf that XFAM bit n enables (cpuid_configurations.c xfam_mask_0x1_0xffffffff,
# xfam_mask_0x7_0x0): TDH.MNG.INIT clears them when the TD's XFAM lacks bit n.
XFAM_MASKS: dict[CpuidKey, dict[int, CpuidValue]] = {
    _VER_INFO: {2: CpuidValue(ecx=0x30001000)},
    _EXT_FEATURES: {
        2: CpuidValue(ebx=0x20, ecx=0x600),
        **{bit: CpuidValue(ebx=0xDC230000, ecx=0x5842, edx=0x80010C) for bit in (5, 6, 7)},
        8: CpuidValue(ebx=0x2000000),
        9: CpuidValue(ecx=0x8),
        **{bit: CpuidValue(ecx=0x80, edx=0x100000) for bit in (11, 12)},
        14: CpuidValue(edx=0x20),
        15: CpuidValue(edx=0x80000),
        **{bit: CpuidValue(edx=0x3400000) for bit in (17, 18)},
    },
}


def _configured(config: CpuidConfig, value: CpuidValue) -> CpuidValue | None:
    """tdh_mng_init.c read_and_set_cpuid_configurations(), per register: None if TD_PARAMS sets a
    bit that is neither CONFIG_DIRECT nor ALLOW_DIRECT; else the native value with FIXED0 (and
    DYNAMIC) bits cleared, FIXED1 bits set, CONFIG_DIRECT bits as configured and ALLOW_DIRECT
    bits cleared where TD_PARAMS clears them (an allowed bit the CPU lacks stays 0)."""
    regs = []
    for v, native, direct, allow, fixed0, fixed1 in zip(value.regs, config.native.regs, config.config_direct.regs,
                                                        config.allow_direct.regs, config.fixed0.regs,
                                                        config.fixed1.regs):
        if v & ~(direct | allow):
            return None
        final = (native & ~fixed0 | fixed1) & ~direct | v & direct
        regs.append(final & (v | ~allow))
    return CpuidValue(*regs)


def _xfam_masked(value: CpuidValue, key: CpuidKey, xfam: int) -> CpuidValue:
    """apply_cpuid_xfam_masks(): clear what each XFAM bit the TD lacks would enable."""
    regs = list(value.regs)
    for bit, mask in XFAM_MASKS.get(key, {}).items():
        if not xfam & 1 << bit:
            regs = [r & ~m for r, m in zip(regs, mask.regs)]
    return CpuidValue(*regs)


def _fms_verdict(config: CpuidConfig, value: CpuidValue, attributes: int) -> Verdict | CpuidValue:
    """CPUID(1).EAX is the TD's family/model/stepping: 0 means the platform's. A non-migratable TD
    takes only that one; otherwise OPERAND_INVALID(CPUID_CONFIG), RCX = the leaf
    (tdh_mng_init.c:280-309). platform_fms is the lowest stepping of the packages' CPUID(1).EAX
    (tdh_sys_init.c); the packages here are alike, so it is the native EAX."""
    platform_fms = config.native.eax
    fms = value.eax or platform_fms
    # A migratable TD's F/M/S goes through check_fms_config() (cpuid_fms.c: the CPUs the module
    # knows) instead. Not modelled: this platform's ATTRIBUTES_FIXED0 refuses MIGRATABLE anyway.
    if not attributes & abi.TD_ATTR_MIGRATABLE and fms != platform_fms:
        return _invalid(OperandId.CPUID_CONFIG, config.leaves_field)
    return replace(value, eax=fms)


def _ext_features_verdict(value: CpuidValue, params: TdParams) -> Verdict | CpuidValue:
    """CPUID(7,0) after its XFAM masks (tdh_mng_init.c:337-373): HLE and RTM alike, else
    OPERAND_INVALID(CPUID_CONFIG) with no leaf in RCX; PKS as ATTRIBUTES.PKS, KL_SUPPORTED 0.
    Not modelled: TDX_INCORRECT_MSR_VALUE when TSX is on and IA32_ARCH_CAPABILITIES lacks
    TSX_CTRL (no native CPUID here has TSX)."""
    if bool(value.ebx & abi.CPUID_7_0_EBX_HLE) != bool(value.ebx & abi.CPUID_7_0_EBX_RTM):
        return _invalid(OperandId.CPUID_CONFIG)
    ecx = value.ecx & ~(abi.CPUID_7_0_ECX_PKS | abi.CPUID_7_0_ECX_KL_SUPPORTED)
    if params.attributes & abi.TD_ATTR_PKS:
        ecx |= abi.CPUID_7_0_ECX_PKS
    return replace(value, ecx=ecx)


def _with_la_bits(value: CpuidValue, la57: bool) -> CpuidValue:
    """CPUID(0x80000008).EAX.LA_BITS from the TD's CPUID(7,0).ECX.LA57 (tdh_mng_init.c:482-497)."""
    width = abi.LA57_LINEAR_ADDRESS_WIDTH if la57 else abi.LEGACY_LINEAR_ADDRESS_WIDTH
    eax = value.eax & ~abi.CPUID_80000008_EAX_LA_BITS_MASK | width << abi.CPUID_80000008_EAX_LA_BITS_SHIFT
    return replace(value, eax=eax)


def _cpuid_verdict(params: TdParams, platform: PlatformConfig) -> Verdict:
    """read_and_set_cpuid_configurations() for the CPUID_CONFIG leaves. The module loops in
    cpuid_lookup[] order, which for leaves 1, 7.0 and 0x80000008 is their CPUID_CONFIG order, so a
    leaf's refusal comes before any later leaf's. Leaves outside CPUID_CONFIG (which the module
    also virtualizes) are not modelled."""
    stored: dict[CpuidKey, CpuidValue] = {}
    for config, value in zip(platform.cpuid_config, params.cpuid_values):
        key = (config.leaf, config.subleaf)
        final = _configured(config, value)
        if final is None:
            return _invalid(OperandId.CPUID_CONFIG, config.leaves_field)
        final = _xfam_masked(final, key, params.xfam)
        checked: Verdict | CpuidValue = final
        if config.leaf == abi.CPUID_VER_INFO_LEAF:
            checked = _fms_verdict(config, final, params.attributes)
        elif key == _EXT_FEATURES:
            checked = _ext_features_verdict(final, params)
        elif config.leaf == abi.CPUID_GET_MAX_PA_LEAF:
            ext = stored.get(_EXT_FEATURES, CpuidValue())
            checked = _with_la_bits(final, bool(ext.ecx & abi.CPUID_7_0_ECX_LA57))
        if isinstance(checked, Verdict):
            return checked
        stored[key] = checked
    return Verdict(0, cpuid=stored)


def check(params: TdParams, platform: PlatformConfig, tdcs_pages: int) -> Verdict:
    """TDH.MNG.INIT's TD_PARAMS checks (read_and_set_td_configurations, then the CPUID
    configuration), in the module's order. ``tdcs_pages``: TDCS pages the TD has."""
    if not _attributes_ok(params.attributes, platform):
        return _invalid(OperandId.ATTRIBUTES)
    if not _xfam_ok(params.xfam, platform):
        return _invalid(OperandId.XFAM)
    if params.max_vcpus == 0:
        return _invalid(OperandId.MAX_VCPUS)
    if params.num_l2_vms > abi.MAX_L2_VMS:
        return _invalid(OperandId.NUM_L2_VMS)
    # is_required_tdcs_allocated() (td_control_structures.h): one more TDCS page per L2 VM.
    if tdcs_pages < platform.tdcs_base_size // abi.SZ_4K + abi.TDCS_PAGES_PER_L2_VM * params.num_l2_vms:
        return Verdict(Status.TDX_TDCS_NOT_ALLOCATED)
    if any(params.reserved0):
        return _invalid(OperandId.RDX)
    flags = params.config_flags
    if flags & ~abi.CONFIG_FLAGS_FIXED0 or flags & abi.CONFIG_FLAGS_FIXED1 != abi.CONFIG_FLAGS_FIXED1:
        return _invalid(OperandId.EXEC_CONTROLS)
    if not _eptp_ok(params.eptp_controls, params.gpaw, platform):
        return _invalid(OperandId.EPTP_CONTROLS)
    if not abi.VIRT_TSC_FREQUENCY_MIN <= params.tsc_frequency <= abi.VIRT_TSC_FREQUENCY_MAX:
        return _invalid(OperandId.TSC_FREQUENCY)
    if any(params.reserved1) or params.msr_config_ctls & ~MSR_CONFIG_CTLS_IA32_ARCH_CAP or any(params.reserved2):
        return _invalid(OperandId.RDX)
    verdict = _cpuid_verdict(params, platform)
    if verdict.status:
        return verdict
    if any(params.reserved3):
        return _invalid(OperandId.RDX)
    # Without MSR_CONFIG_CTLS.IA32_ARCH_CAP there is nothing to configure.
    if not params.msr_config_ctls & MSR_CONFIG_CTLS_IA32_ARCH_CAP and params.ia32_arch_capabilities_config:
        return _invalid(OperandId.IA32_ARCH_CAPABILITIES_CONFIG)
    return verdict

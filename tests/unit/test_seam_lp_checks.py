"""The platform checks of TDH.SYS.INIT and TDH.SYS.LP.INIT on a platform whose LPs differ
(harness/seam/lp_checks.py), against the TDX module 1.5.01 source:
src/vmm_dispatcher/api_calls/tdh_sys_init.c (check_msrs, check_cpuid_configurations,
check_vmx_msrs, check_key_management_config), tdh_sys_lp_init.c (the compares with the SYS.INIT
LP, in order) and include/auto_gen/cpuid_configurations.c (the verify_same masks)."""

from __future__ import annotations

import pytest
from linux_replay import call, replay_init

from harness.seam.abi import Leaf, Status
from harness.seam.lp_checks import NO_SUBLEAF, LpDeviation
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram, qemu_topology

G = 1 << 30
MEMORY = SparseMemory([(0, 2 * G)])


def module_with(*deviations: LpDeviation, cpus: int = 3) -> TdxModule:
    return TdxModule(PlatformConfig(cpus=qemu_topology(1, cpus), cmrs=cmrs_for_ram([(0, 2 * G)]),
                                    lp_deviations=deviations))


def lp_init(module: TdxModule, cpu: int):
    return call(module, MEMORY, cpu, Leaf.TDH_SYS_LP_INIT, rcx=7, rdx=7, r8=7)


@pytest.mark.parametrize("deviation, status", [
    (LpDeviation(0, msrs=frozenset({0x10A})), Status.TDX_INCORRECT_MSR_VALUE + 0x10A),  # IA32_ARCH_CAPABILITIES
    (LpDeviation(0, boot_nt4=True), Status.TDX_LIMIT_CPUID_MAXVAL_SET),
    (LpDeviation(0, msrs=frozenset({0x48B})), Status.TDX_INCORRECT_MSR_VALUE + 0x48B),  # PROCBASED_CTLS2
    (LpDeviation(0, msrs=frozenset({0x982})), Status.TDX_INCORRECT_MSR_VALUE + 0x982),  # TME_ACTIVATE
    # MSRs SYS.INIT only samples: its LP's value becomes the reference.
    (LpDeviation(0, msrs=frozenset({0x3B, 0x1F2})), 0),
])
def test_sys_init_checks_its_own_lp(deviation, status):
    """check_msrs() (ARCH_CAPABILITIES, XAPIC_DISABLE_STATUS, MISC_PACKAGE_CTLS, PERF_CAPABILITIES)
    before BOOT_NT4 (check_cpuid_configurations()), then the VMX and key-management MSRs: a
    value the module does not accept is TDX_INCORRECT_MSR_VALUE plus the MSR index."""
    module = module_with(deviation)
    assert call(module, MEMORY, 0, Leaf.TDH_SYS_INIT).status == status


def test_sys_init_checks_the_msrs_before_boot_nt4():
    module = module_with(LpDeviation(0, msrs=frozenset({0xBD}), boot_nt4=True))
    assert call(module, MEMORY, 0, Leaf.TDH_SYS_INIT).status == Status.TDX_INCORRECT_MSR_VALUE + 0xBD


def test_lp_init_compares_each_lp_with_the_sysinit_lp():
    """IA32_TSC_ADJUST differing on LP 1: LP.INIT there is TDX_INCONSISTENT_MSR + 0x3B, RCX, RDX
    and R8 zeroed; LP 2, alike with LP 0, initializes; the failed LP can be retried (it is not
    marked initialized)."""
    module = module_with(LpDeviation(1, msrs=frozenset({0x3B})))
    assert call(module, MEMORY, 0, Leaf.TDH_SYS_INIT).status == 0
    failed = lp_init(module, 1)
    assert failed.status == Status.TDX_INCONSISTENT_MSR + 0x3B and failed.regs[:3] == (0, 0, 0)
    assert lp_init(module, 2).status == 0 and lp_init(module, 0).status == 0
    assert lp_init(module, 1).status == Status.TDX_INCONSISTENT_MSR + 0x3B
    assert module.state.lp_initialized == {0, 2}


def test_when_the_sysinit_lp_is_the_odd_one_every_other_lp_differs():
    module = module_with(LpDeviation(0, msrs=frozenset({0x3B})))
    assert call(module, MEMORY, 0, Leaf.TDH_SYS_INIT).status == 0
    assert lp_init(module, 0).status == 0
    assert {lp_init(module, cpu).status for cpu in (1, 2)} == {Status.TDX_INCONSISTENT_MSR + 0x3B}
    alike = module_with(LpDeviation(0, msrs=frozenset({0x3B})), LpDeviation(1, msrs=frozenset({0x3B})))
    call(alike, MEMORY, 0, Leaf.TDH_SYS_INIT)
    assert lp_init(alike, 1).status == 0 and lp_init(alike, 2).status == Status.TDX_INCONSISTENT_MSR + 0x3B


@pytest.mark.parametrize("leaf, rcx, rdx, r8", [
    ((0x1, NO_SUBLEAF), 0xFFFFFFFF_00000001, 0x0000FFFF_F000C000, 0xFFFFFFFF_F7FFFF9F),
    ((0x7, 0), 0x7, 0xFFFFFFFB_FFFFFFFF, 0xFFEBFFFF_BFC1FF6F),
    ((0x1F, 1), 0x1_0000001F, (1 << 64) - 1, 0x00000000_FFFFFFFF),  # another thread/core count
])
def test_lp_init_names_the_cpuid_leaf_that_differs(leaf, rcx, rdx, r8):
    """compare_cpuid_configuration(): TDX_INCONSISTENT_CPUID_FIELD, RCX = leaf | subleaf << 32,
    RDX/R8 = the entry's verify_same mask (EBX:EAX, EDX:ECX)."""
    module = module_with(LpDeviation(2, cpuid=frozenset({leaf})))
    call(module, MEMORY, 0, Leaf.TDH_SYS_INIT)
    result = lp_init(module, 2)
    assert (result.status, result.regs[:3]) == (Status.TDX_INCONSISTENT_CPUID_FIELD, (rcx, rdx, r8))


def test_lp_init_order_msrs_then_boot_nt4_then_cpuid_then_tsc_adjust():
    everything = LpDeviation(1, msrs=frozenset({0x3B, 0xBC}), cpuid=frozenset({(0x7, 0)}), boot_nt4=True)
    steps = [(everything, Status.TDX_INCONSISTENT_MSR + 0xBC),
             (LpDeviation(1, msrs=frozenset({0x3B}), cpuid=frozenset({(0x7, 0)}), boot_nt4=True),
              Status.TDX_LIMIT_CPUID_MAXVAL_SET),
             (LpDeviation(1, msrs=frozenset({0x3B}), cpuid=frozenset({(0x7, 0)})), Status.TDX_INCONSISTENT_CPUID_FIELD),
             (LpDeviation(1, msrs=frozenset({0x3B})), Status.TDX_INCONSISTENT_MSR + 0x3B)]
    for deviation, status in steps:
        module = module_with(deviation)
        call(module, MEMORY, 0, Leaf.TDH_SYS_INIT)
        assert lp_init(module, 1).status == status, deviation


def test_linux_init_stops_at_the_odd_lp():
    """Linux's tdx_enable() sees LP.INIT fail on that CPU and never reaches SYS.CONFIG."""
    result = replay_init(module_with(LpDeviation(1, msrs=frozenset({0x3B}))), [(1 << 20, 2 * G)])
    assert (result.failed_leaf, result.status) == (Leaf.TDH_SYS_LP_INIT, Status.TDX_INCONSISTENT_MSR + 0x3B)


def test_deviations_the_module_cannot_see_are_refused():
    with pytest.raises(ValueError, match="CPUID"):
        LpDeviation(0, cpuid=frozenset({(0x12, 0)}))
    with pytest.raises(ValueError, match="0x1234"):
        LpDeviation(0, msrs=frozenset({0x1234}))
    with pytest.raises(ValueError, match="lp_deviations"):
        module_with(LpDeviation(9))

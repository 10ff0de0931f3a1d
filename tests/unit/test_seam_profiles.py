"""Module-version profiles (harness/seam/profiles.py): the dispatcher's version checks and what
each release reports, against the kernel's use of them.

Sources: src/vmm_dispatcher/tdx_vmm_dispatcher.c of intel/tdx-module TDX_1.5.01 and of the 2.0
line (1666adc) for which leaves take a version above 0; tdh_mng_rd_wr.c, tdh_vp_rd_wr.c,
tdh_mem_sept_add.c (1.5) and tdh_sys_init.c (2.0) for each leaf's own ``version > 1`` check;
src/common/metadata_handlers/metadata_sys.c for TDX_FEATURES0."""

from __future__ import annotations

import pytest
from kvm_replay import RAM, kvm_tdx_hardware_setup, read_sysinfo, ready_module
from linux_replay import call, replay_init

from harness import commands
from harness.cli import build_parser
from harness.seam import abi
from harness.seam.abi import Field, Leaf, OperandId, Status
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import LogicalCpu, PlatformConfig, cmrs_for_ram
from harness.seam.profiles import DEFAULT_PROFILE, PROFILE_ENV, PROFILES

BAD_RAX = abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RAX)
G = 1 << 30


def versioned(leaf: int, version: int) -> int:
    return leaf | version << abi.LEAF_VERSION_SHIFT


def fresh(profile: str) -> TdxModule:
    return TdxModule(PlatformConfig.for_profile(profile, cmrs=cmrs_for_ram(RAM)))


def ready(profile: str) -> TdxModule:
    return ready_module(PlatformConfig.for_profile(profile, cmrs=cmrs_for_ram(RAM)))


@pytest.mark.parametrize("profile,leaf,status", [
    # The version check comes before the state: on a module nobody initialized, a leaf whose
    # version the release refuses is OPERAND_INVALID(RAX), one it takes is SYS_NOT_READY.
    ("1.5.01", Leaf.TDH_VP_INIT, BAD_RAX),
    ("2.0", Leaf.TDH_VP_INIT, Status.TDX_SYS_NOT_READY),
    ("1.5.01", Leaf.TDH_MNG_RD, Status.TDX_SYS_NOT_READY),
    ("2.0", Leaf.TDH_MNG_RD, Status.TDX_SYS_NOT_READY),
    ("1.5.01", Leaf.TDH_MEM_SEPT_ADD, Status.TDX_SYS_NOT_READY),
    ("1.5.01", Leaf.TDH_MNG_INIT, BAD_RAX),  # a leaf of one version only, in both releases
    ("2.0", Leaf.TDH_MNG_INIT, BAD_RAX),
])
def test_the_dispatcher_takes_version_1_only_for_the_releases_versioned_leaves(profile, leaf, status):
    module = fresh(profile)
    assert call(module, SparseMemory(RAM), 0, versioned(leaf, 1)).status == status


def test_sys_init_version_1_is_a_2_0_leaf():
    """2.0's tdh_sys_init(version) takes the fatal-error configuration in R8 with version 1; 1.5's
    dispatcher refuses the version. The software module does not model that configuration: it
    says so instead of running the call as version 0."""
    assert call(fresh("1.5.01"), SparseMemory(RAM), 0, versioned(Leaf.TDH_SYS_INIT, 1)).status == BAD_RAX
    module = fresh("2.0")
    assert call(module, SparseMemory(RAM), 0, versioned(Leaf.TDH_SYS_INIT, 1)).status == BAD_RAX
    assert "not modelled" in (module.trace.records[-1].note or "")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_a_versioned_leaf_refuses_version_2_itself(profile):
    """tdh_mng_rd_wr.c: "TDH.MNG.RD supports version 1" (version > 1: OPERAND_INVALID(RAX)),
    after the dispatcher let the version through; the harness's note is not the reason."""
    module = ready(profile)
    result = call(module, SparseMemory(RAM), 0, versioned(Leaf.TDH_MNG_RD, 2))
    assert result.status == BAD_RAX
    assert module.trace.records[-1].note is None


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_linux_initializes_tdx_on_both_releases(profile):
    """tdx_enable() reads only version fields both releases have and needs NO_RBP_MOD, which both
    report (check_features(), arch/x86/virt/vmx/tdx/tdx.c)."""
    module = fresh(profile)
    assert replay_init(module, [(1 << 20, 2 * G)]).ok
    features = read_sysinfo(module, SparseMemory(RAM))[Field.TDX_FEATURES0]
    assert features & abi.TDX_FEATURES0_NO_RBP_MOD and features & abi.TDX_FEATURES0_TD_PRESERVING


def test_kvm_refuses_tdx_on_1_5_01_and_loads_on_2_0():
    """__tdx_hardware_setup() (arch/x86/kvm/vmx/tdx.c) needs TOPOLOGY_ENUM in TDX_FEATURES0,
    which 1.5.01's metadata_sys.c does not set: kvm_intel tdx=1 fails to load (-EINVAL)."""
    outcomes = {name: kvm_tdx_hardware_setup(read_sysinfo(ready(name), SparseMemory(RAM)), present_cpus=2)
                for name in PROFILES}
    assert outcomes == {"1.5.01": -22, "2.0": 0}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_each_release_reports_its_own_version(profile):
    module = ready(profile)
    info = read_sysinfo(module, SparseMemory(RAM))
    expected = PROFILES[profile]
    assert (info[Field.MAJOR_VERSION], info[Field.MINOR_VERSION]) == (expected.major_version, expected.minor_version)
    assert module.platform.module_profile == profile


def test_the_default_platform_is_the_default_release():
    assert PlatformConfig() == PlatformConfig.for_profile(DEFAULT_PROFILE)


def test_an_unknown_release_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown module profile '1\.4'.*1\.5\.01"):
        PlatformConfig.for_profile("1.4")


@pytest.mark.parametrize("changes, message", [
    ({"cpus": (LogicalCpu(0, 0), LogicalCpu(0, 0))}, "duplicate APIC ids"),
    ({"nr_tdx_keyids": -1}, "KeyID counts"),
    ({"nr_mktme_keyids": 0, "nr_tdx_keyids": 1 << 15}, "fit in 15 bits"),
    ({"tdmr_init_chunk": 1000}, "tdmr_init_chunk"),
    ({"cache_wb_chunks": 0}, "cache_wb_chunks"),
    ({"lock_hold_s": -0.001}, "lock_hold_s"),
    ({"module_profile": "9.9"}, "9.9"),
])
def test_a_platform_config_that_cannot_exist_is_refused_when_made(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PlatformConfig(**changes)  # type: ignore[arg-type]


def test_tdxh_boot_takes_its_default_release_from_the_environment(monkeypatch):
    """`tdxh boot` and `pytest --module-profile` share TDXH_MODULE_PROFILE as their default."""
    monkeypatch.setenv(PROFILE_ENV, "1.5.01")
    assert build_parser().parse_args(["boot"]).module_profile == "1.5.01"
    monkeypatch.delenv(PROFILE_ENV)
    assert build_parser().parse_args(["boot"]).module_profile == DEFAULT_PROFILE


def test_tdxh_boot_refuses_an_unknown_release_before_building(monkeypatch, capsys):
    """A bad profile is reported at once, not after the kernel build images_from() would start."""
    monkeypatch.setenv(PROFILE_ENV, "9.9")
    monkeypatch.setattr(commands, "images_from", lambda *a, **k: pytest.fail("images_from ran before the check"))
    args = build_parser().parse_args(["boot"])
    assert args.func(args) == 1
    assert "unknown module profile '9.9'" in capsys.readouterr().err

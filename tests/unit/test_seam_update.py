"""The runtime update of the TDX module: the P-SEAMLDR (SEAMLDR.INFO, SEAMLDR.INSTALL: the
loader's seamldr_info.c and seamldr_install.c, statuses of intel/tdx-module-loader
IncludePrivate/AsmSeamcall.h), TDH.SYS.SHUTDOWN and TDH.SYS.UPDATE (intel/tdx-module
src/vmm_dispatcher/api_calls/tdh_sys_shutdown.c, tdh_sys_update.c), driven the way Linux 7.3's
seamldr.c does it (update_replay.py)."""

from __future__ import annotations

import errno

import pytest
from kvm_replay import RAM, ready_module
from linux_replay import call
from test_seam_td import built_td, rdmd, td_pages
from update_replay import IMAGE_PA, PARAMS_PA, load_image, read_version, replay_update, seamldr_info

from harness.seam import abi, image
from harness.seam.abi import (
    PSEAMLDR_RECOVERABLE_ERROR,
    PSEAMLDR_UNRECOVERABLE_ERROR,
    Field,
    Leaf,
    OperandId,
    SeamldrLeaf,
    SeamldrStatus,
    Status,
)
from harness.seam.image import ModuleImage
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram
from harness.seam.state import SysState

NEWER = ModuleImage(2, 0, 5, build_num=42)


def platform(**changes: object) -> PlatformConfig:
    return PlatformConfig(cmrs=cmrs_for_ram(RAM), **changes)  # type: ignore[arg-type]


def rd(module: TdxModule, memory: SparseMemory, field_id: int) -> int:
    result = call(module, memory, 0, Leaf.TDH_SYS_RD, rdx=field_id)
    assert result.status == 0, abi.status_name(result.status)
    return result.regs[2]


def test_an_update_replaces_the_version_and_keeps_the_tds():
    """The whole path as Linux runs it: the TD built before the update keeps its pages and can
    be torn down by the new module; SYS.RD reports the new version; one SEAMDB entry fewer."""
    module = ready_module(platform())
    td = built_td(module)
    pages_before = td_pages(module)
    _, before = seamldr_info(module, td.memory)
    result = replay_update(module, td.memory, image.build_image(NEWER))
    assert result.errno == 0, result
    assert read_version(module, td.memory) == NEWER.version
    assert td_pages(module) == pages_before and rdmd(module, td.tdr) == (abi.PageType.PT_TDR, 0)
    _, after = seamldr_info(module, td.memory)
    assert after["num_remaining_updates"] == before["num_remaining_updates"] - 1
    assert module.state.sys is SysState.SYS_READY and module.state.handoff is None
    # The trace is Linux's order: SHUTDOWN on the lead CPU, INSTALL on every CPU, then the
    # new module's SYS.INIT, LP.INIT on every CPU and UPDATE.
    cpus = [cpu.apic_id for cpu in module.platform.cpus]
    update = [(r.leaf, r.cpu) for r in module.trace.records if r.leaf in (
        "TDH.SYS.SHUTDOWN", "SEAMLDR.INSTALL", "TDH.SYS.INIT", "TDH.SYS.LP.INIT", "TDH.SYS.UPDATE")][-7:]
    assert update == [("TDH.SYS.SHUTDOWN", 0), *[("SEAMLDR.INSTALL", c) for c in cpus], ("TDH.SYS.INIT", 0),
                      *[("TDH.SYS.LP.INIT", c) for c in cpus], ("TDH.SYS.UPDATE", 0)]
    td.destroy()
    assert td_pages(module) == {}


def test_shutdown_checks_the_handoff_version_against_the_running_module():
    """tdh_sys_shutdown.c: RCX within [MIN_UPDATE_HV, MODULE_HV], equal to MODULE_HV under
    NO_DOWNGRADE, else OPERAND_INVALID(RCX) with the module still ready."""
    memory = SparseMemory(RAM)
    module = ready_module(platform(module_hv=3, min_update_hv=2))
    invalid_rcx = abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    for hv in (1, 4, 1 << 32 | 3):  # the whole register is compared
        assert call(module, memory, 0, Leaf.TDH_SYS_SHUTDOWN, rcx=hv).status == invalid_rcx
    assert module.state.sys is SysState.SYS_READY
    strict = ready_module(platform(module_hv=3, min_update_hv=2, no_downgrade=True))
    assert call(strict, memory, 0, Leaf.TDH_SYS_SHUTDOWN, rcx=2).status == invalid_rcx
    assert call(module, memory, 0, Leaf.TDH_SYS_SHUTDOWN, rcx=2).status == 0
    assert module.state.handoff is not None and module.state.handoff.hv == 2


def test_shutdown_needs_a_ready_module_and_leaves_only_lp_shutdown():
    """tdx_vmm_dispatcher.c: SHUTDOWN is not an init leaf (TDX_SYS_NOT_READY before SYS_READY);
    after it every leaf but LP.SHUTDOWN is TDX_SYS_SHUTDOWN, SYS.INIT included (the harness also
    lets Linux's SYS.DISABLE run there, for the reboot path)."""
    memory = SparseMemory(RAM)
    fresh = TdxModule(platform())
    assert call(fresh, memory, 0, Leaf.TDH_SYS_SHUTDOWN).status == Status.TDX_SYS_NOT_READY
    module = ready_module(platform())
    assert call(module, memory, 0, Leaf.TDH_SYS_SHUTDOWN).status == 0
    for leaf in (Leaf.TDH_SYS_SHUTDOWN, Leaf.TDH_SYS_INIT, Leaf.TDH_SYS_RD, Leaf.TDH_MNG_CREATE):
        assert call(module, memory, 0, leaf).status == Status.TDX_SYS_SHUTDOWN, leaf.name
    assert call(module, memory, 0, Leaf.TDH_SYS_DISABLE).status == 0
    assert call(module, memory, 0, Leaf.TDH_SYS_INIT).status == 0  # DISABLE discarded the handoff


def install_all(module: TdxModule, memory: SparseMemory, rcx: int = PARAMS_PA) -> list[tuple[int, int]]:
    """SEAMLDR.INSTALL on every CPU in order: (status, RDX) of each."""
    out = []
    for cpu in module.platform.cpus:
        result = call(module, memory, cpu.apic_id, SeamldrLeaf.SEAMLDR_INSTALL, rcx=rcx)
        out.append((result.status, result.regs[1]))
    return out


def shut_down_with(data: bytes, **changes: object) -> tuple[TdxModule, SparseMemory]:
    """A ready module, shut down for an update, with ``data``'s params in memory."""
    memory = SparseMemory(RAM)
    module = ready_module(platform(**changes))
    assert call(module, memory, 0, Leaf.TDH_SYS_SHUTDOWN).status == 0
    assert load_image(memory, data) == 0
    return module, memory


def test_install_runs_on_every_lp_and_only_the_last_one_loads():
    """seamldr_install.c: the first LP clears SEAM_READY (SEAMCALLs to the module fail with
    VMFAILINVALID), every LP but the last returns success at once, a second INSTALL on an LP of
    the session is EBADCALL; the last LP loads the module in SYSINIT_PENDING."""
    module, memory = shut_down_with(image.build_image(NEWER))
    first = call(module, memory, 0, SeamldrLeaf.SEAMLDR_INSTALL, rcx=PARAMS_PA)
    assert (first.status, first.regs[1]) == (SeamldrStatus.PSEAMLDR_SUCCESS, 0)
    assert call(module, memory, 0, Leaf.TDH_SYS_RD).status == Status.TDX_SEAMCALL_VMFAILINVALID
    assert call(module, memory, 0, SeamldrLeaf.SEAMLDR_INSTALL, rcx=PARAMS_PA).status == SeamldrStatus.PSEAMLDR_EBADCALL
    last = call(module, memory, 1, SeamldrLeaf.SEAMLDR_INSTALL, rcx=PARAMS_PA)
    assert (last.status, last.regs[1]) == (SeamldrStatus.PSEAMLDR_SUCCESS, 0)
    assert module.state.sys is SysState.SYSINIT_PENDING and module.seam.loader.running == NEWER
    # The new module before UPDATE: the handoff is there for SYS.RD, and not SYS_READY yet.
    assert call(module, memory, 0, Leaf.TDH_SYS_INIT).status == 0
    for cpu in (0, 1):
        assert call(module, memory, cpu, Leaf.TDH_SYS_LP_INIT).status == 0
    assert (rd(module, memory, Field.HANDOFF_DATA_VALID), rd(module, memory, Field.HANDOFF_DATA_HV)) == (1, 0)
    assert call(module, memory, 0, Leaf.TDH_SYS_KEY_CONFIG).status == Status.TDX_SYS_KEY_CONFIG_NOT_PENDING
    assert call(module, memory, 0, Leaf.TDH_SYS_TDMR_INIT).status == Status.TDX_SYS_NOT_READY
    assert call(module, memory, 0, Leaf.TDH_SYS_UPDATE).status == 0
    assert rd(module, memory, Field.HANDOFF_DATA_VALID) == 0


@pytest.mark.parametrize("edit, status", [
    ({"version": 1}, SeamldrStatus.PSEAMLDR_EBADPARAM),
    ({"scenario": 2}, SeamldrStatus.PSEAMLDR_EBADPARAM),
    ({"reserved": 1}, SeamldrStatus.PSEAMLDR_EBADPARAM),
    ({"module_nr_pages": 0}, SeamldrStatus.PSEAMLDR_EBADPARAM),
    ({"module_nr_pages": 497}, SeamldrStatus.PSEAMLDR_EBADPARAM),
    ({"sigstruct_pa": IMAGE_PA + 8}, SeamldrStatus.PSEAMLDR_EBADPARAM),
])
def test_install_checks_the_params_and_the_old_module_comes_back(edit, status):
    """check_seamldr_params(): version 0, reserved bytes 0, scenario LOAD or UPDATE, 1-496
    module pages, 4K-aligned shared addresses; a failure before the SEAM range is written is
    recoverable (RDX 0): SEAM_READY comes back and the old module answers again."""
    module, memory = shut_down_with(image.build_image(NEWER))
    offsets = {"version": 0, "scenario": 4, "sigstruct_pa": 8, "reserved": 16, "module_nr_pages": 120}
    (name, value), = edit.items()
    memory.write(PARAMS_PA + offsets[name], value.to_bytes(4 if name in ("version", "scenario") else 8, "little"))
    results = install_all(module, memory)
    assert results[-1] == (status, PSEAMLDR_RECOVERABLE_ERROR)
    assert call(module, memory, 0, Leaf.TDH_SYS_RD).status == Status.TDX_SYS_SHUTDOWN  # the old module, shut down
    assert module.seam.loader.running == module.platform.module_image


@pytest.mark.parametrize("data, status", [
    (image.build_image(NEWER, signer=""), SeamldrStatus.PSEAMLDR_EBADSIG),
    (image.build_image(NEWER, corrupt="seal"), SeamldrStatus.PSEAMLDR_EBADSIG),
    (image.build_image(ModuleImage(2, 0, 0)), SeamldrStatus.PSEAMLDR_SUCCESS),  # the same version
    (image.build_image(ModuleImage(1, 9, 99)), SeamldrStatus.PSEAMLDR_EUNSUPPORTED),  # another major
    (image.build_image(ModuleImage(0, 1, 0)), SeamldrStatus.PSEAMLDR_EUNSUPPORTED),
    (image.build_image(ModuleImage(2, 0, 0, min_update_hv=1, module_hv=1)), SeamldrStatus.PSEAMLDR_EBADHANDOFF),
])
def test_install_verifies_the_manifest_and_the_handoff(data, status):
    """verify_manifest(): a seal by an untrusted signer or a broken seal is EBADSIG, major SVN 0
    or a change of major EUNSUPPORTED; init_seam_range_on_update(): the old module's handoff
    version must be within the new module's [MIN_UPDATE_HV, MODULE_HV] (EBADHANDOFF). All
    recoverable."""
    module, memory = shut_down_with(data, major_version=2, minor_version=0, update_version=0)
    results = install_all(module, memory)
    assert results[-1] == (status, 0)
    assert module.seam.loader.seam_ready


def test_install_refuses_a_downgrade_and_an_update_without_entries_left():
    """verify_manifest(): a lower SVN than the running module's is EBADSIG;
    init_seam_range_on_update(): no SEAMDB entry left is EBADCALL."""
    module, memory = shut_down_with(image.build_image(ModuleImage(2, 0, 3)), major_version=2, minor_version=0,
                                    update_version=4)
    assert install_all(module, memory)[-1] == (SeamldrStatus.PSEAMLDR_EBADSIG, 0)
    module, memory = shut_down_with(image.build_image(NEWER), seamldr_updates=0)
    assert install_all(module, memory)[-1] == (SeamldrStatus.PSEAMLDR_EBADCALL, 0)
    _, info = seamldr_info(module, memory)
    assert info["num_remaining_updates"] == 0


def test_install_without_shutdown_gives_the_running_module_back():
    """No TDH.SYS.SHUTDOWN first: no valid handoff data, EBADHANDOFF, recoverable, and the
    module that was running answers as before."""
    memory = SparseMemory(RAM)
    module = ready_module(platform())
    assert load_image(memory, image.build_image(NEWER)) == 0
    assert install_all(module, memory)[-1] == (SeamldrStatus.PSEAMLDR_EBADHANDOFF, 0)
    assert rd(module, memory, Field.MINOR_VERSION) == module.platform.minor_version


def test_a_module_whose_pages_fail_the_hash_is_lost_until_power_cycle():
    """seam_module_load_and_verify() runs after the SEAM range is written: EBADHASH with RDX =
    UNRECOVERABLE, SEAM_READY stays clear (every module SEAMCALL VMFAILINVALID), and Linux's
    update fails in CPU_INSTALL with -EIO; the BIOS loads its module again at a power cycle."""
    memory = SparseMemory(RAM)
    module = ready_module(platform())
    result = replay_update(module, memory, image.build_image(NEWER, corrupt="digest"))
    assert (result.errno, result.failed_state, result.status) == (-errno.EIO, "CPU_INSTALL",
                                                                   SeamldrStatus.PSEAMLDR_EBADHASH)
    assert module.trace.records[-1].outputs["rdx"] == PSEAMLDR_UNRECOVERABLE_ERROR
    assert call(module, memory, 0, Leaf.TDH_SYS_INIT).status == Status.TDX_SEAMCALL_VMFAILINVALID
    module.power_cycle()
    assert call(module, memory, 0, Leaf.TDH_SYS_INIT).status == 0


def test_update_needs_every_lp_initialized_no_sys_config_and_a_handoff():
    """tdh_sys_update.c: SYSINIT_DONE with LP.INIT on every LP (TDX_SYS_STATE_INCORRECT
    otherwise); a valid handoff (a module booted fresh has none: TDX_SYS_INVALID_HANDOFF)."""
    memory = SparseMemory(RAM)
    fresh = TdxModule(platform())
    call(fresh, memory, 0, Leaf.TDH_SYS_INIT)
    call(fresh, memory, 0, Leaf.TDH_SYS_LP_INIT)
    assert call(fresh, memory, 0, Leaf.TDH_SYS_UPDATE).status == Status.TDX_SYS_STATE_INCORRECT
    call(fresh, memory, 1, Leaf.TDH_SYS_LP_INIT)
    assert call(fresh, memory, 0, Leaf.TDH_SYS_UPDATE).status == Status.TDX_SYS_INVALID_HANDOFF
    module, memory = shut_down_with(image.build_image(NEWER))
    install_all(module, memory)
    call(module, memory, 0, Leaf.TDH_SYS_INIT)
    call(module, memory, 0, Leaf.TDH_SYS_LP_INIT)
    assert call(module, memory, 0, Leaf.TDH_SYS_UPDATE).status == Status.TDX_SYS_STATE_INCORRECT
    call(module, memory, 1, Leaf.TDH_SYS_LP_INIT)
    assert call(module, memory, 0, Leaf.TDH_SYS_UPDATE).status == 0
    assert call(module, memory, 0, Leaf.TDH_SYS_UPDATE).status == Status.TDX_SYS_STATE_INCORRECT  # ready now


@pytest.mark.parametrize("corrupt", ["header-version", "signature", "reserved", "size", "sigstruct-pages",
                                     "module-pages"])
def test_linux_refuses_each_broken_image_before_any_seamcall(corrupt):
    """seamldr.c init_seamldr_params(): size, header version, page counts, "TDX-BLOB", reserved
    bytes; each corruption image.py makes breaks exactly one of them."""
    module = ready_module(platform())
    calls = len(module.trace)
    result = replay_update(module, SparseMemory(RAM), image.build_image(NEWER, corrupt=corrupt))
    assert result.errno == -errno.EINVAL and len(module.trace) == calls


def test_seamldr_info_reports_the_loader_and_its_updates_left():
    """seamldr_info.c into Linux's struct seamldr_info: vendor 0x8086, the loader's version
    (update_version where the loader has a reserved field), the updates left, SEAM_READY and
    P_SEAMLDR_READY; a PA not 256-byte aligned is refused."""
    memory = SparseMemory(RAM)
    module = TdxModule(platform(seamldr_version=(1, 5, 3), seamldr_updates=7))
    status, info = seamldr_info(module, memory)
    assert status == 0
    version = (info["major_version"], info["minor_version"], info["update_version"])
    assert (info["vendor_id"], version) == (0x8086, (1, 5, 3))
    assert (info["num_remaining_updates"], info["seam_ready"], info["p_seam_ready"]) == (7, 1, 1)
    assert call(module, memory, 0, SeamldrLeaf.SEAMLDR_INFO, rcx=0x1080).status == SeamldrStatus.PSEAMLDR_EBADPARAM
    absent = TdxModule(platform(seamldr_present=False))
    assert seamldr_info(absent, memory)[0] == Status.TDX_SEAMCALL_VMFAILINVALID


def test_p_seamldr_leaves_are_counted_apart_from_the_module_leaves():
    """SEAMLDR.INSTALL (bit 63 | 1) is not TDH.MNG.ADDCX (1) for fault rules and counters."""
    assert abi.leaf_key(SeamldrLeaf.SEAMLDR_INSTALL) != Leaf.TDH_MNG_ADDCX
    assert abi.leaf_name(SeamldrLeaf.SEAMLDR_INSTALL) == "SEAMLDR.INSTALL"
    assert abi.status_name(SeamldrStatus.PSEAMLDR_EBADPARAM, SeamldrLeaf.SEAMLDR_INFO) == "PSEAMLDR_EBADPARAM"

"""The P-SEAMLDR: SEAMLDR.INFO and SEAMLDR.INSTALL as the persistent SEAM loader implements them
(its seamldr_info.c and seamldr_install.c, which the search index holds without a repository;
the statuses as intel/tdx-module-loader's AsmSeamcall.h lists them), with the layouts of Linux's
arch/x86/include/asm/seamldr.h and seamldr.c.

An update is a session of SEAMLDR.INSTALL calls, one on every LP. The first clears SEAM_READY
(SEAMCALLs to the module fail with VMFAILINVALID from then on); each but the last returns at
once; the last checks the parameters, the SIGSTRUCT and the handoff, then loads the module. A
failure up to the handoff check is recoverable (SEAM_READY comes back and the old module is
as it was); after the loader has written the SEAM range (a module whose pages do not hash to
its SIGSTRUCT's) the old module is gone too. The loader is one resource: the real one admits a
single LP at a time; the transport here already carries one call at a time, so no caller ever
finds it busy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from harness.seam import image
from harness.seam.abi import (
    PSEAMLDR_RECOVERABLE_ERROR,
    PSEAMLDR_UNRECOVERABLE_ERROR,
    SeamldrLeaf,
    SeamldrStatus,
)
from harness.seam.call import Call
from harness.seam.image import PAGE_SIZE, ModuleImage, Sigstruct
from harness.seam.state import Handler, ModuleState, Seam, shared_page_ok

SEAMLDR_INFO_SIZE = 256
SEAMLDR_INFO_VENDOR_ID = 0x8086
SEAMLDR_SCENARIO_LOAD = 0
SEAMLDR_SCENARIO_UPDATE = 1
# struct seamldr_params: u32 version, u32 scenario, u64 sigstruct_pages_pa_list[1],
# u8 reserved[104], u64 module_nr_pages, u64 module_pages_pa_list[496].
SEAMLDR_PARAMS = struct.Struct(f"<IIQ104sQ{image.SEAMLDR_MAX_NR_MODULE_PAGES}Q")
# struct seamldr_info up to seam_info (the loader's SEAMEXTEND starts at 0x20).
_INFO_HEAD = struct.Struct("<IIIIHHHHII")
SEAMEXTEND_OFFSET = 0x20
SEAMEXTEND_SEAM_READY = 0xA0  # seam_ready, then system_under_debug, p_seamldr_ready
SEAMLDR_FEATURES0_OFFSET = 0xA8
SEAMLDR_FEATURES0_CLEANUP_SUPPORTED = 1 << 1


@dataclass(frozen=True)
class SeamldrParams:
    version: int
    scenario: int
    sigstruct_pa: int
    reserved: bytes
    module_nr_pages: int
    module_pages: tuple[int, ...]

    @classmethod
    def parse(cls, data: bytes) -> SeamldrParams:
        version, scenario, sigstruct_pa, reserved, nr_pages, *pages = SEAMLDR_PARAMS.unpack(data)
        return cls(version, scenario, sigstruct_pa, reserved, nr_pages, tuple(pages))


def seamldr_info(seam: Seam, call: Call) -> int:
    """seamldr_info.c: RCX a 256-byte aligned shared HPA (else the loader's address error,
    EBADPARAM); SEAMLDR_INFO written there."""
    pa = call.reg("rcx")
    if not shared_page_ok(seam, pa, SEAMLDR_INFO_SIZE):
        return SeamldrStatus.PSEAMLDR_EBADPARAM
    call.memory.write(pa, info_bytes(seam))
    return SeamldrStatus.PSEAMLDR_SUCCESS


def info_bytes(seam: Seam) -> bytes:
    """SEAMLDR_INFO: the loader's version (offset 0x16 is reserved in the loader's struct, and
    Linux reads it as update_version), the boot LP's x2APIC id, the updates left, SEAMEXTEND's
    SEAM_READY and P_SEAMLDR_READY."""
    platform, loader = seam.platform, seam.loader
    major, minor, update = platform.seamldr_version
    info = bytearray(SEAMLDR_INFO_SIZE)
    _INFO_HEAD.pack_into(info, 0, 0, 0, SEAMLDR_INFO_VENDOR_ID, 0, 0, minor, major, update,
                         platform.cpus[0].apic_id, loader.remaining_updates)
    info[SEAMEXTEND_SEAM_READY] = int(loader.seam_ready)
    info[SEAMEXTEND_SEAM_READY + 2] = 1
    struct.pack_into("<Q", info, SEAMLDR_FEATURES0_OFFSET, SEAMLDR_FEATURES0_CLEANUP_SUPPORTED)
    return bytes(info)


def seamldr_install(seam: Seam, call: Call) -> int:
    """seamldr_install.c: EBADCALL if this LP already ran INSTALL in this session; the first LP
    clears SEAM_READY; all but the last LP return at once; the last one does the update. RDX:
    0 on success, else whether the old module survived (PSEAMLDR_(UN)RECOVERABLE_ERROR)."""
    loader, cpu = seam.loader, call.request.cpu
    if cpu in loader.update_lps:
        call.outputs["rdx"] = 0
        return SeamldrStatus.PSEAMLDR_EBADCALL
    if not loader.update_lps:
        loader.seam_ready_before, loader.seam_ready = loader.seam_ready, False
    loader.update_lps.add(cpu)
    if len(loader.update_lps) < len(seam.platform.cpus):
        call.outputs["rdx"] = 0
        return SeamldrStatus.PSEAMLDR_SUCCESS
    loader.update_lps.clear()
    status, recovery = _install_last(seam, call)
    if status == SeamldrStatus.PSEAMLDR_SUCCESS:
        call.outputs["rdx"] = 0
    else:
        call.outputs["rdx"] = recovery
        loader.seam_ready = loader.seam_ready_before if recovery == PSEAMLDR_RECOVERABLE_ERROR else False
    return status


def _install_last(seam: Seam, call: Call) -> tuple[int, int]:
    """The last LP's work, in the loader's order: the params, the manifest, the SEAM range for
    an update, then the module image itself (from which point a failure is unrecoverable)."""
    recoverable = PSEAMLDR_RECOVERABLE_ERROR
    pa = call.reg("rcx")
    if not shared_page_ok(seam, pa, PAGE_SIZE):
        return SeamldrStatus.PSEAMLDR_EBADPARAM, recoverable
    params = SeamldrParams.parse(call.memory.read(pa, PAGE_SIZE))
    status = _params_status(seam, params)
    if status:
        return status, recoverable
    sigstruct = Sigstruct.parse(call.memory.read(params.sigstruct_pa, PAGE_SIZE))
    status = _manifest_status(seam, sigstruct)
    if status or sigstruct is None:
        return status, recoverable
    if params.scenario == SEAMLDR_SCENARIO_LOAD:
        call.note = "SEAMLDR.INSTALL scenario LOAD (install from scratch) is not modelled: Linux never uses it"
        return SeamldrStatus.PSEAMLDR_EUNSPECERR, recoverable
    status = _handoff_status(seam, sigstruct.module)
    if status:
        return status, recoverable
    pages = b"".join(call.memory.read(page, PAGE_SIZE) for page in params.module_pages[:params.module_nr_pages])
    if image.module_digest(pages) != sigstruct.module_digest:
        call.note = "the module pages do not hash to the SIGSTRUCT's digest: the old module is lost"
        return SeamldrStatus.PSEAMLDR_EBADHASH, PSEAMLDR_UNRECOVERABLE_ERROR
    _start_module(seam, sigstruct.module)
    return SeamldrStatus.PSEAMLDR_SUCCESS, recoverable


def _params_status(seam: Seam, params: SeamldrParams) -> int:
    """check_seamldr_params(): every failure is EBADPARAM."""
    pages = params.module_pages[:params.module_nr_pages]
    if (params.version != 0 or any(params.reserved)
            or params.scenario not in (SEAMLDR_SCENARIO_LOAD, SEAMLDR_SCENARIO_UPDATE)
            or not 1 <= params.module_nr_pages <= image.SEAMLDR_MAX_NR_MODULE_PAGES
            or not all(shared_page_ok(seam, pa, PAGE_SIZE) for pa in (params.sigstruct_pa, *pages))
            or (params.scenario == SEAMLDR_SCENARIO_UPDATE and not seam.loader.seam_ready_before)):
        return SeamldrStatus.PSEAMLDR_EBADPARAM
    return SeamldrStatus.PSEAMLDR_SUCCESS


def _manifest_status(seam: Seam, sigstruct: Sigstruct | None) -> int:
    """verify_manifest(): a SIGSTRUCT the platform's trusted signers did not seal is EBADSIG;
    major SVN 0 or another major than the running module's EUNSUPPORTED; a lower SVN EBADSIG.
    The software module's SVN is its version: major, then (minor, update)."""
    if sigstruct is None or not sigstruct.sealed or sigstruct.signer not in seam.platform.seamldr_signers:
        return SeamldrStatus.PSEAMLDR_EBADSIG
    new, running = sigstruct.module, seam.loader.running
    if new.major_version == 0 or new.major_version != running.major_version:
        return SeamldrStatus.PSEAMLDR_EUNSUPPORTED
    if new.version < running.version:
        return SeamldrStatus.PSEAMLDR_EBADSIG
    return SeamldrStatus.PSEAMLDR_SUCCESS


def _handoff_status(seam: Seam, new: ModuleImage) -> int:
    """init_seam_range_on_update(): an update needs a SEAMDB entry left (EBADCALL) and the old
    module's handoff data, valid and of a version within the new module's [MIN_UPDATE_HV,
    MODULE_HV] (EBADHANDOFF)."""
    if seam.loader.remaining_updates == 0:
        return SeamldrStatus.PSEAMLDR_EBADCALL
    handoff = seam.state.handoff
    if handoff is None or not new.takes_handoff(handoff.hv):
        return SeamldrStatus.PSEAMLDR_EBADHANDOFF
    return SeamldrStatus.PSEAMLDR_SUCCESS


def _start_module(seam: Seam, new: ModuleImage) -> None:
    """install_epilogue(): the new module runs, in SYSINIT_PENDING, with the handoff data the old
    one left in the SEAM range; one SEAMDB entry fewer."""
    loader, old = seam.loader, seam.state
    loader.running, loader.seam_ready = new, True
    loader.remaining_updates -= 1
    seam.state = ModuleState(handoff=old.handoff, calls_per_leaf=old.calls_per_leaf)


HANDLERS: dict[int, Handler] = {
    SeamldrLeaf.SEAMLDR_INFO: seamldr_info,
    SeamldrLeaf.SEAMLDR_INSTALL: seamldr_install,
}

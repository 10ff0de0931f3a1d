"""A Python replay of Linux 7.3's TDX module runtime update against the software module, written
from the kernel source: seamldr.c seamldr_install_module() (init_seamldr_params()'s image checks,
seamldr_params laid out in memory) and do_seamldr_install_module()'s stop_machine states in
order: SHUTDOWN on the lead CPU (tdx.c tdx_module_shutdown(): SYS.RD of MODULE_HV, then
TDH.SYS.SHUTDOWN), INSTALL on every CPU, CPU_INIT on every CPU (tdx_cpu_enable(): SYS.INIT once,
then LP.INIT), RUN_UPDATE on the lead CPU (TDH.SYS.UPDATE, then SYS.RD of the version). Every CPU
does a state's work before any moves on; a failure in a state stops them all after it.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from linux_replay import call

from harness.seam import image
from harness.seam.abi import Field, Leaf, SeamldrLeaf, Status
from harness.seam.image import IMAGE_HEADER, PAGE_SIZE
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.seamldr import SEAMLDR_PARAMS

PARAMS_PA = 0x0100_0000  # kzalloc_obj(*params): one page
IMAGE_PA = 0x0100_1000  # the vmalloc'd firmware buffer, here physically contiguous
STATES = ("SHUTDOWN", "CPU_INSTALL", "CPU_INIT", "RUN_UPDATE")


@dataclass
class UpdateResult:
    errno: int  # what seamldr_install_module() returns: 0 or a negative errno
    failed_state: str | None = None  # the MODULE_UPDATE_* state that failed
    status: int = 0  # the failing SEAMCALL's status


def sc_errno(status: int) -> int:
    """sc_retry_prerr(): VMFAILINVALID is -ENODEV, any other error -EIO."""
    if status == 0:
        return 0
    return -errno.ENODEV if status == Status.TDX_SEAMCALL_VMFAILINVALID else -errno.EIO


def load_image(memory: SparseMemory, data: bytes) -> int:
    """The firmware buffer at IMAGE_PA and, when init_seamldr_params() takes it, its
    seamldr_params at PARAMS_PA: 0 or -EINVAL."""
    params = init_seamldr_params(data)
    if isinstance(params, int):
        return params
    memory.write(IMAGE_PA, data)
    memory.write(PARAMS_PA, params)
    return 0


def init_seamldr_params(data: bytes) -> bytes | int:
    """seamldr.c init_seamldr_params(): the params page for ``data`` loaded at IMAGE_PA, or
    -EINVAL."""
    if len(data) < PAGE_SIZE:
        return -errno.EINVAL
    version, _, signature, sig_pages, mod_pages, reserved = IMAGE_HEADER.unpack_from(data)
    if PAGE_SIZE + (sig_pages + mod_pages) * PAGE_SIZE != len(data):
        return -errno.EINVAL
    if (version != image.TDX_IMAGE_VERSION_2 or sig_pages > image.SEAMLDR_MAX_NR_SIG_PAGES
            or mod_pages > image.SEAMLDR_MAX_NR_MODULE_PAGES or signature != b"TDX-BLOB" or any(reserved)):
        return -errno.EINVAL
    sig_pa = IMAGE_PA + PAGE_SIZE  # the payload after the header
    module_pas = [sig_pa + (sig_pages + i) * PAGE_SIZE for i in range(mod_pages)]
    module_pas += [0] * (image.SEAMLDR_MAX_NR_MODULE_PAGES - mod_pages)
    return SEAMLDR_PARAMS.pack(0, 1, sig_pa, bytes(104), mod_pages, *module_pas)


def seamldr_info(module: TdxModule, memory: SparseMemory, cpu: int = 0) -> tuple[int, dict[str, int]]:
    """seamldr_get_info(): the status and struct seamldr_info's fields (Linux's layout)."""
    pa = 0x0200_0000
    status = call(module, memory, cpu, SeamldrLeaf.SEAMLDR_INFO, rcx=pa).status
    names = ("version", "attributes", "vendor_id", "build_date", "build_num", "minor_version",
             "major_version", "update_version", "acm_x2apicid", "num_remaining_updates")
    values = struct.unpack_from("<IIIIHHHHII", memory.read(pa, 40))
    info = dict(zip(names, values, strict=True))
    info["seam_ready"], _, info["p_seam_ready"] = memory.read(pa + 0xA0, 3)
    return status, info


def read_version(module: TdxModule, memory: SparseMemory, cpu: int = 0) -> tuple[int, int, int]:
    fields = (Field.MAJOR_VERSION, Field.MINOR_VERSION, Field.UPDATE_VERSION)
    major, minor, update = (call(module, memory, cpu, Leaf.TDH_SYS_RD, rdx=f).regs[2] for f in fields)
    return major, minor, update


def replay_update(module: TdxModule, memory: SparseMemory, data: bytes) -> UpdateResult:
    refused = load_image(memory, data)
    if refused:
        return UpdateResult(refused)
    cpus = [cpu.apic_id for cpu in module.platform.cpus]
    lead = cpus[0]  # CPU 0, "always online"
    sysinit: int | None = None  # tdx_module_state.sysinit_{done,ret}, cleared by the shutdown
    for state in STATES:
        statuses: list[int] = []
        for cpu in cpus:
            if state == "SHUTDOWN" and cpu == lead:
                hv = call(module, memory, cpu, Leaf.TDH_SYS_RD, rdx=Field.MODULE_HV)
                statuses.append(hv.status or call(module, memory, cpu, Leaf.TDH_SYS_SHUTDOWN, rcx=hv.regs[2]).status)
            elif state == "CPU_INSTALL":
                statuses.append(call(module, memory, cpu, SeamldrLeaf.SEAMLDR_INSTALL, rcx=PARAMS_PA).status)
            elif state == "CPU_INIT":
                if sysinit is None:
                    sysinit = call(module, memory, cpu, Leaf.TDH_SYS_INIT).status
                statuses.append(sysinit or call(module, memory, cpu, Leaf.TDH_SYS_LP_INIT).status)
            elif state == "RUN_UPDATE" and cpu == lead:
                statuses.append(call(module, memory, cpu, Leaf.TDH_SYS_UPDATE).status)
        failed = next((status for status in statuses if status), None)
        if failed is not None:
            return UpdateResult(sc_errno(failed), state, failed)
    return UpdateResult(0)

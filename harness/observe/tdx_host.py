"""The tdx_host device and the TDX module update as a user drives it: the faux device's sysfs
attributes (drivers/virt/coco/tdx-host/tdx-host.c, Documentation/ABI/testing/
sysfs-devices-faux-tdx-host) and the fw_upload interface it registers as "tdx_module"
(drivers/base/firmware_loader/sysfs_upload.c: loading, data, status, error)."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from harness.images.initramfs import modprobe_command
from harness.machine.base import Machine

TDX_HOST = "/sys/devices/faux/tdx_host"
VERSION = f"{TDX_HOST}/version"
SEAMLDR_VERSION = f"{TDX_HOST}/seamldr_version"
NUM_REMAINING_UPDATES = f"{TDX_HOST}/num_remaining_updates"
FW_UPLOAD = "/sys/class/firmware/tdx_module"
LOAD_TDX_HOST = modprobe_command("tdx-host")
# fw_upload's progress strings (fw_upload_prog_str[]); "idle" once an upload has ended.
IDLE = "idle"
POLL_INTERVAL = 0.2


@dataclass(frozen=True)
class Attribute:
    """A sysfs read: the value, or the shell's error (the errno text of a failed read)."""

    ok: bool
    text: str

    def fails_with(self, err: int) -> bool:
        """The read failed with errno ``err`` (the shell prints its strerror text)."""
        return not self.ok and os.strerror(err) in self.text


def read_attribute(machine: Machine, path: str, timeout: float = 30.0) -> Attribute:
    result = machine.run(f"cat {path} 2>&1", timeout)
    return Attribute(result.status == 0, result.output.strip())


@dataclass(frozen=True)
class Upload:
    """How a module update through fw_upload ended: the command's own status (writing the data
    and ending the load), then `status` and `error` once the upload is idle again (error is
    "<progress>:<error>", e.g. "transferring:firmware-invalid", or empty)."""

    write_status: int
    write_output: str
    status: str
    error: str

    @property
    def ok(self) -> bool:
        return self.write_status == 0 and self.status == IDLE and not self.error


def upload_command(image: str, wait_s: float) -> str:
    """Load ``image`` through fw_upload as a user would, then wait (at most ``wait_s``) for the
    upload to be idle; prints the write's exit status, then status and error."""
    polls = max(1, int(wait_s / POLL_INTERVAL))
    fw = FW_UPLOAD
    return (f"{{ echo 1 > {fw}/loading && cat {shlex.quote(image)} > {fw}/data && echo 0 > {fw}/loading; }} 2>&1; "
            f"echo \"write:$?\"; i=0; while [ \"$(cat {fw}/status)\" != {IDLE} ] && [ $i -lt {polls} ]; "
            f"do sleep {POLL_INTERVAL}; i=$((i+1)); done; echo \"status:$(cat {fw}/status)\"; "
            f"echo \"error:$(cat {fw}/error)\"")


def upload(machine: Machine, image: str, timeout: float) -> Upload:
    result = machine.run(upload_command(image, timeout * 0.8), timeout)
    fields: dict[str, str] = {}
    before: list[str] = []
    for line in result.output.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in ("write", "status", "error") and key not in fields:
            fields[key] = value.strip()
        elif not fields:
            before.append(line)
    missing = {"write", "status", "error"} - fields.keys()
    if result.status != 0 or missing:
        raise AssertionError(f"fw_upload of {image}: the command ended {result.status}, missing {sorted(missing)}: "
                             f"{result.output[-500:]!r}")
    return Upload(int(fields["write"]), "\n".join(before), fields["status"], fields["error"])

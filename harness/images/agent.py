"""Build the harness's own guest programs (images/agent/*.c) as static binaries with the host's
gcc, cached by a hash of the source and the compiler command. They go into the initramfs under
/usr/bin with the name of their source file."""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness.paths import IMAGES
from harness.run import CommandError, run

log = logging.getLogger("harness.images")

AGENT_SOURCES = IMAGES / "agent"
CFLAGS = ("-static", "-Os", "-Wall", "-Wextra", "-Werror")
COMPILE_SECONDS = 120.0


class AgentBuildError(Exception):
    """A guest program did not compile; the message holds the compiler's output."""


@dataclass(frozen=True)
class GuestProgram:
    name: str  # the command name in the guest
    binary: Path  # the built static binary on the host

    @property
    def guest_path(self) -> str:
        return f"/usr/bin/{self.name}"


def build_guest_programs(cache: Path, sources: Path = AGENT_SOURCES, cc: str = "gcc") -> list[GuestProgram]:
    if shutil.which(cc) is None:
        raise AgentBuildError(f"{cc} not found: install build-essential (tdxh setup does)")
    return [_build(source, cache / "agent", cc) for source in sorted(sources.glob("*.c"))]


def _build(source: Path, out_dir: Path, cc: str) -> GuestProgram:
    command = [cc, *CFLAGS]
    digest = hashlib.sha256(source.read_bytes() + " ".join(command).encode()).hexdigest()[:16]
    binary = out_dir / digest / source.stem
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        try:
            run([*command, "-o", str(partial), str(source)], timeout=COMPILE_SECONDS)
        except CommandError as err:
            raise AgentBuildError(f"{source.name} does not compile:\n{err}") from err
        partial.rename(binary)
    return GuestProgram(source.stem, binary)

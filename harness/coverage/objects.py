"""The coverage build: which objects carry gcov counters (images/kernel/coverage/*.patch), and
where a coverage build keeps what gcov needs on the host (the .gcno notes beside the objects,
the source tree they were compiled from)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.kernel.build import BUILT_MARKER, parse_config

BUILD_FILE = "build.json"
COVERAGE_ENV = "TDXH_COVERAGE"  # pytest's --coverage DIR default
GCOV_OPTION = "CONFIG_GCOV_KERNEL"
# Where the guest's debugfs shows the counters: the build directory's absolute path below it.
GUEST_GCOV_ROOT = "/sys/kernel/debug/gcov"

# The profiled objects (build-directory paths) and the sources each one covers: what the patch
# in images/kernel/coverage sets GCOV_PROFILE for. tdx.c #includes tdx_global_metadata.c.
PROFILED: dict[str, tuple[str, ...]] = {
    "arch/x86/virt/vmx/tdx/tdx.o": ("arch/x86/virt/vmx/tdx/tdx.c", "arch/x86/virt/vmx/tdx/tdx_global_metadata.c"),
    "arch/x86/virt/vmx/tdx/seamldr.o": ("arch/x86/virt/vmx/tdx/seamldr.c",),
    "arch/x86/kvm/vmx/tdx.o": ("arch/x86/kvm/vmx/tdx.c",),
    "arch/x86/kvm/vmx/main.o": ("arch/x86/kvm/vmx/main.c",),
    "drivers/virt/coco/tdx-host/tdx-host.o": ("drivers/virt/coco/tdx-host/tdx-host.c",),
}


class CoverageBuildError(Exception):
    """The kernel is not a coverage build, or its notes are gone; the message says what to do."""


@dataclass(frozen=True)
class CoverageBuild:
    """A kernel built with the coverage variant: its build directory (objects and .gcno notes,
    and the absolute path the guest's debugfs shows the counters under) and its source tree."""

    build_dir: Path
    source_tree: Path
    key: str  # the kernel build's key: counters of different builds never merge

    @classmethod
    def from_build_dir(cls, build_dir: Path, key: str = "") -> CoverageBuild:
        """Check that ``build_dir`` holds a coverage build; its source tree is the ``source``
        link Kbuild leaves in an O= build directory."""
        config = build_dir / ".config"
        if not config.is_file():
            raise CoverageBuildError(f"{build_dir} is not a kernel build directory (no .config)")
        if parse_config(config.read_text()).get(GCOV_OPTION) != "y":
            raise CoverageBuildError(f"{build_dir} was built without {GCOV_OPTION}: not a coverage build "
                                     "(build one with --coverage, or boot it with tdxh boot --coverage)")
        source = build_dir / "source"
        tree = source.resolve() if source.exists() else build_dir
        built = build_dir / BUILT_MARKER  # the harness's build key, when the harness built it
        key = key or (built.read_text().strip() if built.is_file() else str(build_dir.resolve()))
        build = cls(build_dir.resolve(), tree, key)
        if not build.notes():
            raise CoverageBuildError(f"{build_dir} has no .gcno notes for the TDX host objects "
                                     f"({', '.join(PROFILED)}): was images/kernel/coverage/*.patch applied?")
        return build

    @classmethod
    def for_kernel(cls, bzimage: Path) -> CoverageBuild:
        """The coverage build a prebuilt ``bzImage`` came from: it must still sit in its build
        directory (``<build>/arch/x86/boot/bzImage``), whose .gcno notes gcov needs."""
        parts = bzimage.resolve().parts
        if parts[-4:] != ("arch", "x86", "boot", "bzImage"):
            raise CoverageBuildError(f"--coverage with --kernel {bzimage}: the kernel must be the bzImage of a "
                                     "coverage build, in its build directory (BUILD/arch/x86/boot/bzImage): the "
                                     ".gcno notes gcov reads are there")
        return cls.from_build_dir(bzimage.resolve().parents[3])

    def notes(self) -> dict[str, Path]:
        """{object path: its .gcno} for the profiled objects this build compiled."""
        found = {}
        for obj in PROFILED:
            note = self.build_dir / Path(obj).with_suffix(".gcno")
            if note.is_file():
                found[obj] = note
        return found

    def guest_prefix(self) -> str:
        """The directory under which the guest's debugfs lists this build's counters."""
        return f"{GUEST_GCOV_ROOT}{self.build_dir}"

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        data = {k: str(v) for k, v in asdict(self).items()}
        (directory / BUILD_FILE).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path) -> CoverageBuild:
        path = directory / BUILD_FILE
        try:
            data = json.loads(path.read_text())
            return cls(Path(data["build_dir"]), Path(data["source_tree"]), data["key"])
        except FileNotFoundError:
            raise CoverageBuildError(f"{directory} holds no coverage run ({BUILD_FILE} is missing)") from None
        except (ValueError, KeyError, TypeError) as err:
            raise CoverageBuildError(f"{path} is damaged: {err}") from err

    def claim(self, directory: Path) -> None:
        """Make ``directory`` this build's: a directory with another build's counters is refused
        (their .gcno notes differ, gcov would merge nonsense)."""
        if (directory / BUILD_FILE).exists():
            other = CoverageBuild.load(directory)
            if other.key != self.key:
                raise CoverageBuildError(f"{directory} holds the counters of another kernel build ({other.key}, "
                                         f"built in {other.build_dir}); this one is {self.key}: use a new directory")
            return
        self.save(directory)


# A function definition marked noinstr: gcc gives it no counters (__no_profile).
_NOINSTR = re.compile(r"^(?![ \t#/*])[^\n;{(]*\bnoinstr\b[^\n;{(]*\b(\w+)\s*\(", re.MULTILINE)


def noinstr_functions(source: str) -> list[str]:
    """The functions a C file defines as ``noinstr``: the compiler leaves them uncounted."""
    return _NOINSTR.findall(source)

"""Module-version profiles: what differs between the TDX module releases whose source is public,
as far as a kernel can see it: the version it reports, TDX_FEATURES0, and which leaves accept a
version above 0.

- "1.5.01": intel/tdx-module tag TDX_1.5.01 (branch tdx_1.5). Its dispatcher
  (src/vmm_dispatcher/tdx_vmm_dispatcher.c) takes version 1 for MEM.PAGE.PROMOTE, MEM.SEPT.ADD,
  MEM.SEPT.REMOVE, MNG.RD and VP.RD only, so it refuses the TDH.VP.INIT v1 Linux 7.3 always
  issues, and its TDX_FEATURES0 (metadata_sys.c; bits in include/tdx_api_defs.h) has no
  TOPOLOGY_ENUM, without which KVM 7.3 refuses TDX.
- "2.0": the 2.0 line of intel/tdx-module (snapshot 1666adc). The dispatcher adds TDH.VP.INIT,
  TDH.SYS.INIT and TDH.MEM.SHARED.SEPT.WR (a leaf the software module does not model);
  TDX_FEATURES0 adds TOPOLOGY_ENUM among others. Only the bits whose position that snapshot's
  tdx_features_enum0_t names are set here (its later bits: VE reduction, event filtering,
  dynamic PAMT... have no position in the sources read).

Every leaf that takes a version above 0 takes at most 1 (each checks ``version > 1`` itself).
The leaves' behaviour otherwise follows the 1.5 source in both profiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from harness.seam.abi import Leaf

MAX_LEAF_VERSION = 1
PROFILE_ENV = "TDXH_MODULE_PROFILE"  # the default of pytest --module-profile and tdxh boot --module-profile


def _bits(*positions: int) -> int:
    return sum(1 << bit for bit in positions)


@dataclass(frozen=True)
class ModuleProfile:
    name: str
    major_version: int
    minor_version: int
    update_version: int
    tdx_features0: int
    versioned_leaves: frozenset[int]  # the dispatcher's leaves with more than one version

    def leaf_version_ok(self, leaf: int, version: int) -> bool:
        """The dispatcher's check: version 0 always, above 0 only for versioned leaves."""
        return version == 0 or leaf in self.versioned_leaves


_VERSIONED_1_5 = frozenset({Leaf.TDH_MEM_PAGE_PROMOTE, Leaf.TDH_MEM_SEPT_ADD, Leaf.TDH_MEM_SEPT_REMOVE,
                            Leaf.TDH_MNG_RD, Leaf.TDH_VP_RD})
# metadata_sys.c (1.5.01): migration 0, TD preserving 1, service TD 2, TDG.VP.RD/WR 3, relaxed
# concurrency 4, CPUID virtualization 5, partitioning 7, entry enhancements 9, host-priority
# locks 10, IA32_ARCH_CAPABILITIES config 11, pending EPT violation v2 16, FMS config 17, no RBP
# modification 18, L2 TLB invalidation 19 (local attestation, bit 8, only with SEAMVERIFYREPORT).
_FEATURES0_1_5 = _bits(0, 1, 2, 3, 4, 5, 7, 9, 10, 11, 16, 17, 18, 19)
# 2.0 adds topology enumeration 20, partitioned TD migration 21, ICSSD 25, fixed counters 1/2
# profiling 26, MAXPA virtualization 27, CPUID leaf 2 virtualization 29.
_FEATURES0_2_0 = _FEATURES0_1_5 | _bits(20, 21, 25, 26, 27, 29)

PROFILES: dict[str, ModuleProfile] = {
    "1.5.01": ModuleProfile("1.5.01", 1, 5, 1, _FEATURES0_1_5, _VERSIONED_1_5),
    "2.0": ModuleProfile("2.0", 2, 0, 0, _FEATURES0_2_0,
                         _VERSIONED_1_5 | {Leaf.TDH_VP_INIT, Leaf.TDH_SYS_INIT}),
}
# Linux 7.3's KVM needs TDH.VP.INIT v1 and TOPOLOGY_ENUM: of the public modules, only 2.0 has them.
DEFAULT_PROFILE = "2.0"


def default_profile() -> str:
    """$TDXH_MODULE_PROFILE when set, else DEFAULT_PROFILE."""
    return os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE


def profile(name: str) -> ModuleProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown module profile {name!r}: one of {', '.join(PROFILES)}") from None

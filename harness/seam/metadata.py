"""Global metadata as TDH.SYS.RD serves it: the module's lookup table (entries of one or more
fields, each of one or more elements) and its lookup, after the TDX module 1.5 source:
include/auto_gen/global_sys_fields_lookup.c (the ids and shapes), src/common/metadata_handlers/
metadata_generic.c (md_find_entry_idx: matched on class and field code only; the next element
in context) and metadata_sys.c (the values).

The table holds the fields Linux reads plus those of the same classes a kernel may read next
(NUM_PKGS, the CMR info, the handoff class); the rest of the module's 65 entries (build info,
migration, service TDs, TD partitioning) are not modelled: reading them is
TDX_METADATA_FIELD_ID_INCORRECT. The version and handoff fields are the running module's: a
runtime update changes them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from harness.seam import abi
from harness.seam.abi import Field
from harness.seam.image import ModuleImage
from harness.seam.platform import PlatformConfig
from harness.seam.state import HANDOFF_PAGES, NO_HANDOFF, HandoffHeader

MD_FIELD_ID_NA = (1 << 64) - 1  # the null field id: "the first field" for a read
FIELD_CODE_MASK = (1 << 24) - 1
CONTEXT_CODE_MASK = 0x7 << 52
CLASS_CODE_SHIFT, CLASS_CODE_MASK = 56, 0x3F
MAX_CMR = 32  # 1.5: NUM_CMRS reads MAX_CMR; CMR_BASE/CMR_SIZE have that many fields
CPUID_CONFIG_FIELDS = 32  # CPUID_CONFIG_LEAVES/VALUES fields in the lookup table


def field_class(field_id: int) -> int:
    return (field_id >> CLASS_CODE_SHIFT) & CLASS_CODE_MASK


def is_null_field_id(field_id: int) -> bool:
    """metadata_generic.h: all ones, whatever the context code."""
    return (field_id | CONTEXT_CODE_MASK) == MD_FIELD_ID_NA


@dataclass(frozen=True)
class Entry:
    """One entry of the lookup table: its first element's id and every element's value."""

    field_id: int
    values: tuple[int, ...]  # element i has field code (field_id's code + i)

    def element_id(self, index: int) -> int:
        return self.field_id + index

    def covers(self, field_id: int) -> bool:
        offset = (field_id & FIELD_CODE_MASK) - (self.field_id & FIELD_CODE_MASK)
        return field_class(field_id) == field_class(self.field_id) and 0 <= offset < len(self.values)

    def value(self, field_id: int) -> int:
        """The element's value masked to the entry's element size (not the one asked for)."""
        bits = abi.field_element_bits(self.field_id)
        return self.values[(field_id & FIELD_CODE_MASK) - (self.field_id & FIELD_CODE_MASK)] & ((1 << bits) - 1)


@dataclass(frozen=True)
class GlobalMetadata:
    entries: tuple[Entry, ...]  # table order: class, then field code

    def lookup(self, field_id: int) -> Entry | None:
        return next((entry for entry in self.entries if entry.covers(field_id)), None)

    @functools.cached_property
    def _element_ids(self) -> tuple[int, ...]:
        """Every element's id, in table order."""
        return tuple(entry.element_id(i) for entry in self.entries for i in range(len(entry.values)))

    @functools.cached_property
    def _next_ids(self) -> dict[int, int]:
        ids = self._element_ids
        return dict(zip(ids, (*ids[1:], MD_FIELD_ID_NA), strict=True))

    def next_element(self, field_id: int) -> int:
        """The id of the element after ``field_id`` in the table (MD_FIELD_ID_NA after the last);
        for the null id, the first."""
        if is_null_field_id(field_id):
            return self._element_ids[0]
        entry = self.lookup(field_id)
        assert entry is not None
        return self._next_ids[entry.element_id((field_id & FIELD_CODE_MASK) - (entry.field_id & FIELD_CODE_MASK))]


@functools.lru_cache(maxsize=8)
def global_metadata(platform: PlatformConfig, module: ModuleImage,
                    handoff: HandoffHeader = NO_HANDOFF) -> GlobalMetadata:
    """The table of ``module`` running on ``platform`` with ``handoff`` in its data region
    (read-only: cached). MODULE_HV, MIN_UPDATE_HV and NO_DOWNGRADE read the module's build
    constants (metadata_sys.c), which the software module takes from its SIGSTRUCT."""
    singles: dict[int, int] = {
        Field.NUM_PKGS: len(platform.packages),
        Field.MINOR_VERSION: module.minor_version,
        Field.MAJOR_VERSION: module.major_version,
        Field.UPDATE_VERSION: module.update_version,
        Field.MODULE_HV: module.module_hv,
        Field.MIN_UPDATE_HV: module.min_update_hv,
        Field.NO_DOWNGRADE: int(module.no_downgrade),
        Field.NUM_HANDOFF_PAGES: HANDOFF_PAGES - 1,
        Field.HANDOFF_DATA_VALID: int(handoff.valid),
        Field.HANDOFF_DATA_HV: handoff.hv,
        Field.HANDOFF_DATA_SIZE: handoff.size,
        Field.TDX_FEATURES0: platform.tdx_features0,
        Field.NUM_CMRS: MAX_CMR,
        Field.MAX_TDMRS: platform.max_tdmrs,
        Field.MAX_RESERVED_PER_TDMR: platform.max_reserved_per_tdmr,
        Field.PAMT_4K_ENTRY_SIZE: platform.pamt_entry_sizes[0],
        Field.PAMT_2M_ENTRY_SIZE: platform.pamt_entry_sizes[1],
        Field.PAMT_1G_ENTRY_SIZE: platform.pamt_entry_sizes[2],
        Field.TDR_BASE_SIZE: platform.tdr_base_size,
        Field.TDCS_BASE_SIZE: platform.tdcs_base_size,
        Field.TDVPS_BASE_SIZE: platform.tdvps_base_size,
        Field.ATTRIBUTES_FIXED0: platform.attributes_fixed0,
        Field.ATTRIBUTES_FIXED1: platform.attributes_fixed1,
        Field.XFAM_FIXED0: platform.xfam_fixed0,
        Field.XFAM_FIXED1: platform.xfam_fixed1,
        Field.NUM_CPUID_CONFIG: len(platform.cpuid_config),
        Field.MAX_VCPUS_PER_TD: platform.max_vcpus_per_td,
    }
    cmrs = [*platform.cmrs, *[(0, 0)] * (MAX_CMR - len(platform.cmrs))][:MAX_CMR]
    configs = list(platform.cpuid_config)[:CPUID_CONFIG_FIELDS]
    spare = CPUID_CONFIG_FIELDS - len(configs)
    # metadata_sys.c: leaves past the module's configurable ones read as all ones, their values 0.
    leaves = [c.leaves_field for c in configs] + [MD_FIELD_ID_NA] * spare
    values = [v for c in configs for v in c.values_fields] + [0] * (2 * spare)
    entries = [Entry(int(field_id), (value,)) for field_id, value in singles.items()]
    entries += [Entry(Field.CMR_BASE, tuple(base for base, _ in cmrs)),
                Entry(Field.CMR_SIZE, tuple(size for _, size in cmrs)),
                Entry(abi.FIELD_CPUID_CONFIG_LEAVES, tuple(leaves)),
                Entry(abi.FIELD_CPUID_CONFIG_VALUES, tuple(values))]
    entries.sort(key=lambda e: (field_class(e.field_id), e.field_id & FIELD_CODE_MASK))
    return GlobalMetadata(tuple(entries))

"""Messages of the Linux TDX host code, as Linux 7.2/7.3 prints them (arch/x86/virt/vmx/tdx/
tdx.c with pr_fmt "virt/tdx: ", seamcall_internal.h, the shim's "tdx-sw-module: "). The one
place tests take message patterns from; named groups pick out the numbers."""

from __future__ import annotations

import re

_HEX = r"0x[0-9a-f]{16}"

BIOS_ENABLED = re.compile(r"virt/tdx: BIOS enabled: private KeyID range \[(?P<start>\d+), (?P<end>\d+)\)")
S3_DISABLED = re.compile(r"virt/tdx: Disable ACPI S3\. Turn off TDX in the BIOS to use ACPI S3\.")
MODULE_VERSION = re.compile(r"virt/tdx: Module version: (?P<major>\d+)\.(?P<minor>\d+)\.(?P<update>\d+)")
PAMT_ALLOCATED = re.compile(r"virt/tdx: (?P<kb>\d+) KB allocated for PAMT")
INITIALIZED = re.compile(r"virt/tdx: TDX-Module initialized")
INIT_FAILED = re.compile(r"virt/tdx: TDX-Module initialization failed \((?P<errno>-?\d+)\)")
NOT_LOADED = re.compile(r"virt/tdx: module not loaded")
NOT_SUPPORTED = re.compile(r"virt/tdx: TDX not supported by the host platform")
SEAMCALL_FAILED = re.compile(rf"virt/tdx: SEAMCALL \((?P<fn>{_HEX})\) failed: (?P<status>{_HEX})")
HIBERNATION_ENABLED = re.compile(r"virt/tdx: initialization failed: Hibernation support is enabled")
TOO_FEW_KEYIDS = re.compile(r"virt/tdx: initialization failed: too few private KeyIDs available\.")
TDMRS_EXHAUSTED = re.compile(r"virt/tdx: initialization failed: TDMRs exhausted\.")
RESERVED_EXHAUSTED = re.compile(r"virt/tdx: initialization failed: TDMR \[0x[0-9a-f]+, 0x[0-9a-f]+\): "
                                r"reserved areas exhausted\.")
RBP_CLOBBER = re.compile(r"virt/tdx: frame pointer \(RBP\) clobber bug present, upgrade TDX module")
SYS_DISABLE_FAILED = re.compile(rf"virt/tdx: TDH\.SYS\.DISABLE failed: (?P<status>{_HEX})")
MCE_TDX_PRIVATE = re.compile(r"TDX private memory error\. Possible kernel bug\.")
SHIM_HELLO = re.compile(r"tdx-sw-module: software TDX module on COM2: (?P<state>module loaded|no module loaded)")
SHIM_NO_ANSWER = re.compile(r"tdx-sw-module: no software TDX module answered on COM2")
SHIM_EXCHANGE_FAILED = re.compile(r"tdx-sw-module: exchange failed: ")

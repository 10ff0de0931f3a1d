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
# seamcall_err() prints with the pr_fmt of its caller: tdx.c's, or seamldr.c's for P-SEAMLDR calls.
SEAMCALL_FAILED = re.compile(rf"(?P<prefix>virt/tdx|seamldr): SEAMCALL \((?P<fn>{_HEX})\) failed: (?P<status>{_HEX})")
HIBERNATION_ENABLED = re.compile(r"virt/tdx: initialization failed: Hibernation support is enabled")
TOO_FEW_KEYIDS = re.compile(r"virt/tdx: initialization failed: too few private KeyIDs available\.")
TDMRS_EXHAUSTED = re.compile(r"virt/tdx: initialization failed: TDMRs exhausted\.")
RESERVED_EXHAUSTED = re.compile(r"virt/tdx: initialization failed: TDMR \[0x[0-9a-f]+, 0x[0-9a-f]+\): "
                                r"reserved areas exhausted\.")
RBP_CLOBBER = re.compile(r"virt/tdx: frame pointer \(RBP\) clobber bug present, upgrade TDX module")
SYS_DISABLE_FAILED = re.compile(rf"virt/tdx: TDH\.SYS\.DISABLE failed: (?P<status>{_HEX})")
KEXEC_STARTING = re.compile(r"kexec_core: Starting new kernel")
# virt/kvm/kvm_main.c kvm_shutdown(): KVM's syscore .shutdown (reboot, kexec) with kvm_intel loaded.
KVM_EXITING_VIRTUALIZATION = re.compile(r"kvm: exiting hardware virtualization")
# arch/x86/kernel/cpu/topology.c: a capture kernel booted on an AP leaves the BSP out.
REAL_BSP_DISABLED = re.compile(r"Crash kernel detected\. Disabling real BSP to prevent machine INIT")
SUSPEND_ENTRY = re.compile(r"PM: suspend entry \((?P<mode>\w+)\)")  # kernel/power/suspend.c
SUSPEND_EXIT = re.compile(r"PM: suspend exit")
CONSOLES_SUSPENDED = re.compile(r"printk: Suspending console\(s\)")  # kernel/printk/printk.c
MCE_TDX_PRIVATE = re.compile(r"TDX private memory error\. Possible kernel bug\.")
# arch/x86/kvm/vmx/tdx.c __TDX_BUG_ON(): after a WARN_ON_ONCE, the VM is bugged.
KVM_SEAMCALL_FAILED = re.compile(r"kvm_intel: SEAMCALL (?P<leaf>TDH_[A-Z_]+) failed: (?P<status>0x[0-9a-f]+)")
# arch/x86/kvm/vmx/tdx.c (kvm_intel): an EPT violation on a private page the guest has not accepted.
# arch/x86/kernel/nmi.c unknown_nmi_error(): an NMI no handler claimed.
UNKNOWN_NMI = re.compile(r"Uhhuh\. NMI received for unknown reason (?P<reason>[0-9a-f]+) on CPU (?P<cpu>\d+)")
# __tdx_hardware_setup(): the one refusal of a module that KVM prints.
KVM_MAX_VCPUS_REFUSED = re.compile(r"Disable TDX: MAX_VCPU_PER_TD \((?P<max>\d+)\) smaller than number of "
                                   r"logical CPUs \((?P<cpus>\d+)\)")
KVM_ACCESS_BEFORE_ACCEPT = re.compile(r"Guest access before accepting (?P<gpa>0x[0-9a-f]+) on vCPU (?P<vcpu>\d+)")
SHIM_HELLO = re.compile(r"tdx-sw-module: software TDX module on COM2: (?P<state>module loaded|no module loaded)")
SHIM_NO_ANSWER = re.compile(r"tdx-sw-module: no software TDX module answered on COM2")
# A HELLO_ACK of another protocol version or size, or KeyID counts that do not fit the KeyID bits.
SHIM_HELLO_REFUSED = re.compile(r"tdx-sw-module: refused the software TDX module's HELLO_ACK: ")
SHIM_EXCHANGE_FAILED = re.compile(r"tdx-sw-module: exchange failed: ")
SHIM_PEER_DEAD = re.compile(r"tdx-sw-module: the software TDX module stopped answering")
# kernel/panic.c __warn() in Linux 7.x: "WARNING: FILE:LINE at FUNC+OFF/LEN, CPU#N: COMM/PID".
WARNING = re.compile(r"^WARNING: (?:(?P<file>\S+):(?P<line>\d+) )?at (?P<func>[\w.]+)\+0x[0-9a-f]+/0x[0-9a-f]+")
# A SEAMCALL from a CPU outside VMX operation: #UD on hardware (TDX_SEAMCALL_UD, often unprinted).
SHIM_SEAMCALL_UD = re.compile(r"tdx-sw-module: SEAMCALL 0x(?P<fn>[0-9a-f]+) on CPU (?P<cpu>\d+) outside VMX operation")
# In #MC, NMI or panic context the shim took COM2 from a CPU stopped in the middle of an exchange.
SHIM_WIRE_TAKEOVER = re.compile(r"tdx-sw-module: CPU (?P<cpu>\d+) took COM2 from CPU (?P<holder>-?\d+), stopped")
# Machine checks (arch/x86/kernel/cpu/mce/core.c, pr_fmt "mce: ", HW_ERR "[Hardware Error]: ").
# __print_mce(): the record's first line (MCG_STATUS, bank and MCi_STATUS in hex) and its TSC
# line, which carries ADDR and MISC when non-zero.
MCE_RECORD = re.compile(r"mce: \[Hardware Error\]: CPU (?P<cpu>\d+): Machine Check(?P<exception> Exception)?: "
                        r"(?P<mcg_status>[0-9a-f]+) Bank (?P<bank>\d+): (?P<status>[0-9a-f]{16})")
MCE_RECORD_ADDR = re.compile(r"mce: \[Hardware Error\]: TSC [0-9a-f]+ ADDR (?P<addr>[0-9a-f]+) ")
# mce_panic(): the severity's explanation and mce_dump_aux_info() (the TDX line) share this form.
MCE_EXPLANATION = re.compile(r"mce: \[Hardware Error\]: Machine check: (?P<text>.+)")
MCE_TDX_PRIVATE_LINE = re.compile(r"mce: \[Hardware Error\]: Machine check: TDX private memory error\. "
                                  r"Possible kernel bug\.")
MCE_FAKE_PANIC = re.compile(r"mce: \[Hardware Error\]: Fake kernel panic: (?P<reason>.+)")
MCE_LOGGED = re.compile(r"mce: \[Hardware Error\]: Machine check events logged")
MCE_KERNEL_PANIC = re.compile(r"Kernel panic - not syncing: (?P<reason>.*[Mm]achine check.*)")

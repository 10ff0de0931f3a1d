/*
 * tdx-agent: drives KVM's TDX ioctls one step at a time, as a VMM would, and prints one JSON
 * line per step on stdout: {"step", "ioctl", "ret", "errno", "hw_error", <the step's outputs>}.
 *
 *   tdx-agent STEP[:key=value...] ...
 *
 * The steps run in the order given, each whatever the previous ones returned, so that a test
 * can walk the documented order (Documentation/virt/kvm/x86/intel-tdx.rst), leave a step out,
 * repeat one or pass bad arguments:
 *
 *   vm_types                    KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) on /dev/kvm
 *   supported_cpuid             KVM_GET_SUPPORTED_CPUID on /dev/kvm: the XCR0 bits KVM supports
 *   create_vm[:type=5]          KVM_CREATE_VM
 *   x2apic_api                  KVM_ENABLE_CAP(KVM_CAP_X2APIC_API, 32-bit ids + no broadcast quirk)
 *   split_irqchip               KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP, 24 pins)
 *   exit_hypercall[:mask=M]     KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, M; default the
 *                               KVM_HC_MAP_GPA_RANGE bit): MapGPA exits to userspace
 *   capabilities[:nent=N]       KVM_TDX_CAPABILITIES (N entries offered; default 256)
 *   init_vm[:attributes=A][:xfam=X][:gpaw=48][:extra_leaf=L]
 *                               KVM_TDX_INIT_VM with the CPUID entries CAPABILITIES returned
 *                               (GPAW put in 0x80000008.EAX[23:16]; extra_leaf adds a leaf no
 *                               CPUID_CONFIG slot holds)
 *   create_vcpu[:id=0]          KVM_CREATE_VCPU
 *   set_cpuid[:maxpa=N]         KVM_SET_CPUID2 with KVM_GET_SUPPORTED_CPUID (x2APIC included);
 *                               maxpa puts N in 0x80000008.EAX[7:0], as a VMM's phys-bits does
 *   init_vcpu[:rcx=R]           KVM_TDX_INIT_VCPU
 *   get_cpuid[:nent=N]          KVM_TDX_GET_CPUID on the vCPU (N entries offered; default 256):
 *                               the nent KVM reports and, on success, the entries
 *   memory[:gpa=G][:size=S][:private=1]
 *                               KVM_CREATE_GUEST_MEMFD, KVM_SET_USER_MEMORY_REGION2 and
 *                               KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) over [G, G+S)
 *   init_mem_region[:gpa=G][:pages=N][:measure=1][:seed=S][:source=1]
 *                               KVM_TDX_INIT_MEM_REGION from a buffer filled by fill_pages()
 *   finalize                    KVM_TDX_FINALIZE_VM
 *   run[:timeout_ms=T][:in=V][:ret=R][:r11=..:r14=..]
 *                               KVM_RUN once; prints the exit (exit_reason, and for port I/O
 *                               port/size/direction/count/data, for MMIO phys_addr/len/is_write/
 *                               data, for a hypercall nr/args/flags, for KVM_EXIT_TDX nr and its
 *                               operands, for a system event type/data, for an internal error
 *                               suberror/ndata/data[0..1], for a failed entry its reason).
 *                               KVM keeps a halted vCPU in KVM_RUN: an alarm every T ms (default
 *                               2000) ends it with EINTR. The answer for the next run:
 *                               V for an "in" port or MMIO read, R as the hypercall's or the
 *                               TDVMCALL's return code (KVM's default stays when R is not given),
 *                               r11-r14 for GetTdVmCallInfo leaf 1.
 *   pause[:timeout_ms=T]        let the host act while the TD exists: create PAUSED_FILE, wait
 *                               (up to T ms, default 600000) until RESUME_FILE exists, remove
 *                               both; ret -1 with ETIMEDOUT if it never came
 *   destroy                     close every fd: KVM tears the TD down
 *
 * Every KVM_MEMORY_ENCRYPT_OP step also takes flags=F and hw_error=H (the kernel refuses a
 * nonzero hw_error on input). Numbers are decimal or 0x-hex. Exit status: 0 when every step
 * ran (whatever KVM answered), 2 on a usage error.
 *
 * Built static against Debian 12's headers (Linux 6.1 UAPI): what 6.1 lacks is defined below,
 * as Linux 7.3 defines it (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <unistd.h>
#include <linux/kvm.h>

#ifndef KVM_CAP_VM_TYPES
#define KVM_CAP_VM_TYPES 235
#endif
#ifndef KVM_X2APIC_DISABLE_BROADCAST_QUIRK
#define KVM_X2APIC_DISABLE_BROADCAST_QUIRK (1ULL << 1)
#endif
#define KVM_X86_TDX_VM 5

#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1UL << 2)
struct kvm_userspace_memory_region2 {
	__u32 slot;
	__u32 flags;
	__u64 guest_phys_addr;
	__u64 memory_size;
	__u64 userspace_addr;
	__u64 guest_memfd_offset;
	__u32 guest_memfd;
	__u32 pad1;
	__u64 pad2[14];
};
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#endif
#ifndef KVM_EXIT_TDX
#define KVM_EXIT_TDX 40
#endif
#define KVM_HC_MAP_GPA_RANGE 12 /* include/uapi/linux/kvm_para.h */
/* The KVM_EXIT_TDX member of struct kvm_run's exit union (7.3), which 6.1's header lacks. */
struct tdx_exit {
	__u64 flags;
	__u64 nr;
	union {
		struct { __u64 ret; __u64 data[5]; } unknown;
		struct { __u64 ret; __u64 gpa; __u64 size; } get_quote;
		struct { __u64 ret; __u64 leaf; __u64 r11, r12, r13, r14; } get_tdvmcall_info;
		struct { __u64 ret; __u64 vector; } setup_event_notify;
	};
};
#define TDVMCALL_GET_TD_VM_CALL_INFO 0x10000
#define TDVMCALL_GET_QUOTE 0x10002
#define TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT 0x10004

#ifndef KVM_MEMORY_ATTRIBUTE_PRIVATE
#define KVM_MEMORY_ATTRIBUTE_PRIVATE (1ULL << 3)
struct kvm_memory_attributes {
	__u64 address;
	__u64 size;
	__u64 attributes;
	__u64 flags;
};
#define KVM_SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)
#endif
#ifndef KVM_CREATE_GUEST_MEMFD
struct kvm_create_guest_memfd {
	__u64 size;
	__u64 flags;
	__u64 reserved[6];
};
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#endif

/* arch/x86/include/uapi/asm/kvm.h (7.3) */
enum kvm_tdx_cmd_id {
	KVM_TDX_CAPABILITIES = 0,
	KVM_TDX_INIT_VM,
	KVM_TDX_INIT_VCPU,
	KVM_TDX_INIT_MEM_REGION,
	KVM_TDX_FINALIZE_VM,
	KVM_TDX_GET_CPUID,
};

struct kvm_tdx_cmd {
	__u32 id;
	__u32 flags;
	__u64 data;
	__u64 hw_error;
};

/* struct kvm_tdx_capabilities and struct kvm_tdx_init_vm end in a struct kvm_cpuid2; these
 * are their fixed parts. */
struct tdx_capabilities_head {
	__u64 supported_attrs;
	__u64 supported_xfam;
	__u64 kernel_tdvmcallinfo_1_r11;
	__u64 user_tdvmcallinfo_1_r11;
	__u64 kernel_tdvmcallinfo_1_r12;
	__u64 user_tdvmcallinfo_1_r12;
	__u64 reserved[250];
};

struct tdx_init_vm_head {
	__u64 attributes;
	__u64 xfam;
	__u64 mrconfigid[6];
	__u64 mrowner[6];
	__u64 mrownerconfig[6];
	__u64 reserved[12];
};

#define KVM_TDX_MEASURE_MEMORY_REGION (1ULL << 0)

struct kvm_tdx_init_mem_region {
	__u64 source_addr;
	__u64 gpa;
	__u64 nr_pages;
};

#define PAGE_SIZE 4096UL
#define MAX_ENTRIES 256
#define MAX_ARGS 8
#define GPAW_SHIFT 16 /* CPUID 0x80000008.EAX[23:16]: KVM's interface for the TD's GPAW */

struct arg {
	char key[32];
	uint64_t value;
};

struct step {
	const char *name;
	int nargs;
	struct arg args[MAX_ARGS];
};

static struct {
	int kvm, vm, vcpu, gmem;
	struct kvm_cpuid_entry2 caps_cpuid[MAX_ENTRIES];
	unsigned caps_nent;
	struct kvm_run *run; /* the vCPU's shared page, mapped by the first run step */
	size_t run_size;
} agent = { .kvm = -1, .vm = -1, .vcpu = -1, .gmem = -1 };

static const struct arg *find_arg(const struct step *s, const char *key)
{
	for (int i = 0; i < s->nargs; i++)
		if (!strcmp(s->args[i].key, key))
			return &s->args[i];
	return NULL;
}

static uint64_t arg_or(const struct step *s, const char *key, uint64_t fallback)
{
	const struct arg *a = find_arg(s, key);
	return a ? a->value : fallback;
}

/* Sets *out to the step's value for key, if it has one. */
static void arg_into(const struct step *s, const char *key, __u64 *out)
{
	const struct arg *a = find_arg(s, key);
	if (a)
		*out = a->value;
}

/* The JSON line of a step: the common fields, then the step's own (", \"k\": v" pieces). */
static void report(const struct step *s, const char *ioctl_name, long ret, int err,
		   uint64_t hw_error, const char *fmt, ...)
{
	printf("{\"step\": \"%s\", \"ioctl\": \"%s\", \"ret\": %ld, \"errno\": %d, "
	       "\"hw_error\": %" PRIu64, s->name, ioctl_name, ret, ret < 0 ? err : 0, hw_error);
	if (fmt) {
		va_list ap;
		va_start(ap, fmt);
		vprintf(fmt, ap);
		va_end(ap);
	}
	printf("}\n");
	fflush(stdout);
}

static long checked_ioctl(int fd, unsigned long request, void *arg, int *err)
{
	long ret = ioctl(fd, request, arg);
	*err = ret < 0 ? errno : 0;
	return ret < 0 ? -1 : ret;
}

static long tdx_op(const struct step *s, int fd, enum kvm_tdx_cmd_id id, void *data,
		   uint64_t *hw_error, int *err)
{
	struct kvm_tdx_cmd cmd = {
		.id = id,
		.flags = (__u32)arg_or(s, "flags", 0),
		.data = (__u64)(uintptr_t)data,
		.hw_error = arg_or(s, "hw_error", 0),
	};
	long ret = checked_ioctl(fd, KVM_MEMORY_ENCRYPT_OP, &cmd, err);
	*hw_error = cmd.hw_error;
	return ret;
}

static int open_kvm(void)
{
	if (agent.kvm < 0)
		agent.kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	return agent.kvm;
}

/* The entries as a JSON array, in a buffer the caller frees. */
static char *entries_json(const struct kvm_cpuid_entry2 *e, unsigned n)
{
	char *text = NULL;
	size_t length;
	FILE *out = open_memstream(&text, &length);
	if (!out) {
		perror("tdx-agent: open_memstream");
		exit(2);
	}
	fputc('[', out);
	for (unsigned i = 0; i < n; i++)
		fprintf(out, "%s{\"function\": %u, \"index\": %u, \"flags\": %u, \"eax\": %u, "
			"\"ebx\": %u, \"ecx\": %u, \"edx\": %u}", i ? ", " : "", e[i].function,
			e[i].index, e[i].flags, e[i].eax, e[i].ebx, e[i].ecx, e[i].edx);
	fputc(']', out);
	fclose(out);
	return text;
}

static void step_vm_types(const struct step *s)
{
	int err = 0;
	long ret = open_kvm() < 0 ? (err = errno, -1) :
		checked_ioctl(agent.kvm, KVM_CHECK_EXTENSION, (void *)(uintptr_t)KVM_CAP_VM_TYPES, &err);
	report(s, "KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)", ret, err, 0, NULL);
}

static void *with_cpuid(size_t head, unsigned n, struct kvm_cpuid2 **cpuid);

static void step_supported_cpuid(const struct step *s)
{
	struct kvm_cpuid2 *cpuid;
	int err = 0;
	uint64_t xcr0 = 0;
	void *buf = with_cpuid(0, MAX_ENTRIES, &cpuid);
	long ret = open_kvm() < 0 ? (err = errno, -1) :
		checked_ioctl(agent.kvm, KVM_GET_SUPPORTED_CPUID, cpuid, &err);
	for (unsigned i = 0; ret == 0 && i < cpuid->nent; i++)
		if (cpuid->entries[i].function == 0xd && cpuid->entries[i].index == 0)
			xcr0 = cpuid->entries[i].eax | (uint64_t)cpuid->entries[i].edx << 32;
	report(s, "KVM_GET_SUPPORTED_CPUID", ret, err, 0, ", \"nent\": %u, \"xcr0\": %" PRIu64,
	       cpuid->nent, xcr0);
	free(buf);
}

static void step_create_vm(const struct step *s)
{
	int err = 0;
	long ret = open_kvm() < 0 ? (err = errno, -1) :
		checked_ioctl(agent.kvm, KVM_CREATE_VM, (void *)(uintptr_t)arg_or(s, "type", KVM_X86_TDX_VM), &err);
	if (ret >= 0)
		agent.vm = (int)ret;
	report(s, "KVM_CREATE_VM", ret, err, 0, NULL);
}

static void enable_cap(const struct step *s, const char *name, __u32 cap, __u64 arg0)
{
	struct kvm_enable_cap enable = { .cap = cap, .args = { arg0 } };
	int err;
	long ret = checked_ioctl(agent.vm, KVM_ENABLE_CAP, &enable, &err);
	report(s, name, ret, err, 0, NULL);
}

static void step_x2apic_api(const struct step *s)
{
	enable_cap(s, "KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)", KVM_CAP_X2APIC_API,
		   KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_DISABLE_BROADCAST_QUIRK);
}

static void step_split_irqchip(const struct step *s)
{
	enable_cap(s, "KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)", KVM_CAP_SPLIT_IRQCHIP, 24);
}

static void step_exit_hypercall(const struct step *s)
{
	enable_cap(s, "KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)", KVM_CAP_EXIT_HYPERCALL,
		   arg_or(s, "mask", 1ULL << KVM_HC_MAP_GPA_RANGE));
}

/* The buffer of a struct ending in a struct kvm_cpuid2 of n entries, zeroed. */
static void *with_cpuid(size_t head, unsigned n, struct kvm_cpuid2 **cpuid)
{
	char *buf = calloc(1, head + sizeof(**cpuid) + n * sizeof((*cpuid)->entries[0]));
	if (!buf) {
		perror("tdx-agent: calloc");
		exit(2);
	}
	*cpuid = (struct kvm_cpuid2 *)(buf + head);
	(*cpuid)->nent = n;
	return buf;
}

static long read_capabilities(const struct step *s, unsigned nent, struct tdx_capabilities_head **head,
			      uint64_t *hw_error, int *err)
{
	struct kvm_cpuid2 *cpuid;
	*head = with_cpuid(sizeof(**head), nent, &cpuid);
	long ret = tdx_op(s, agent.vm, KVM_TDX_CAPABILITIES, *head, hw_error, err);
	if (ret == 0) {
		agent.caps_nent = cpuid->nent < MAX_ENTRIES ? cpuid->nent : MAX_ENTRIES;
		memcpy(agent.caps_cpuid, cpuid->entries, agent.caps_nent * sizeof(cpuid->entries[0]));
	}
	return ret;
}

static void step_capabilities(const struct step *s)
{
	struct tdx_capabilities_head *caps;
	uint64_t hw_error;
	int err;
	long ret = read_capabilities(s, (unsigned)arg_or(s, "nent", MAX_ENTRIES), &caps, &hw_error, &err);
	if (ret == 0) {
		char *cpuid = entries_json(agent.caps_cpuid, agent.caps_nent);
		report(s, "KVM_TDX_CAPABILITIES", ret, err, hw_error,
		       ", \"supported_attrs\": %llu, \"supported_xfam\": %llu, "
		       "\"kernel_tdvmcallinfo_1_r11\": %llu, \"user_tdvmcallinfo_1_r11\": %llu, "
		       "\"kernel_tdvmcallinfo_1_r12\": %llu, \"user_tdvmcallinfo_1_r12\": %llu, "
		       "\"cpuid\": %s", caps->supported_attrs, caps->supported_xfam,
		       caps->kernel_tdvmcallinfo_1_r11, caps->user_tdvmcallinfo_1_r11,
		       caps->kernel_tdvmcallinfo_1_r12, caps->user_tdvmcallinfo_1_r12, cpuid);
		free(cpuid);
	} else {
		report(s, "KVM_TDX_CAPABILITIES", ret, err, hw_error, NULL);
	}
	free(caps);
}

/* Entries of a leaf with more than one subleaf need KVM_CPUID_FLAG_SIGNIFCANT_INDEX, or KVM's
 * lookup by (function, index) finds the first subleaf for all of them. */
static void mark_subleaves(struct kvm_cpuid_entry2 *e, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		for (unsigned j = 0; j < n; j++)
			if (i != j && e[i].function == e[j].function)
				e[i].flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
}

static void step_init_vm(const struct step *s)
{
	struct tdx_init_vm_head *init;
	struct kvm_cpuid2 *cpuid;
	uint64_t hw_error = 0;
	int err = 0;
	long ret;

	if (!agent.caps_nent) {  /* the CPUID entries come from CAPABILITIES, as a VMM's do */
		struct tdx_capabilities_head *caps;
		struct step quiet = { .name = "capabilities" };
		ret = read_capabilities(&quiet, MAX_ENTRIES, &caps, &hw_error, &err);
		free(caps);
		if (ret) {
			report(s, "KVM_TDX_CAPABILITIES (for INIT_VM)", ret, err, hw_error, NULL);
			return;
		}
	}
	uint64_t extra = arg_or(s, "extra_leaf", 0);
	unsigned n = agent.caps_nent + (extra ? 1 : 0);
	init = with_cpuid(sizeof(*init), n, &cpuid);
	memcpy(cpuid->entries, agent.caps_cpuid, agent.caps_nent * sizeof(cpuid->entries[0]));
	if (extra)
		cpuid->entries[n - 1].function = (__u32)extra;
	for (unsigned i = 0; i < n; i++) {
		if (cpuid->entries[i].function == 0x80000008)
			cpuid->entries[i].eax = (cpuid->entries[i].eax & ~(0xffu << GPAW_SHIFT)) |
				((__u32)arg_or(s, "gpaw", 48) & 0xff) << GPAW_SHIFT;
		/* CAPABILITIES offers CPUID(1).EAX's configurable mask, which TDH.MNG.INIT refuses as
		   a family/model/stepping; 0 asks the module for the platform's, as a VMM's vCPU model
		   names its own. */
		if (cpuid->entries[i].function == 1)
			cpuid->entries[i].eax = 0;
	}
	mark_subleaves(cpuid->entries, n);
	init->attributes = arg_or(s, "attributes", 0);
	init->xfam = arg_or(s, "xfam", 0x3);  /* x87 and SSE: the XFAM every TD has */
	ret = tdx_op(s, agent.vm, KVM_TDX_INIT_VM, init, &hw_error, &err);
	report(s, "KVM_TDX_INIT_VM", ret, err, hw_error, ", \"attributes\": %llu, \"xfam\": %llu, \"nent\": %u",
	       init->attributes, init->xfam, n);
	free(init);
}

static void step_create_vcpu(const struct step *s)
{
	int err;
	long ret = checked_ioctl(agent.vm, KVM_CREATE_VCPU, (void *)(uintptr_t)arg_or(s, "id", 0), &err);
	if (ret >= 0)
		agent.vcpu = (int)ret;
	report(s, "KVM_CREATE_VCPU", ret, err, 0, NULL);
}

static void step_set_cpuid(const struct step *s)
{
	struct kvm_cpuid2 *cpuid;
	int err;
	void *buf = with_cpuid(0, MAX_ENTRIES, &cpuid);
	long ret = checked_ioctl(open_kvm(), KVM_GET_SUPPORTED_CPUID, cpuid, &err);
	const struct arg *maxpa = find_arg(s, "maxpa");
	for (unsigned i = 0; ret == 0 && maxpa && i < cpuid->nent; i++)
		if (cpuid->entries[i].function == 0x80000008)
			cpuid->entries[i].eax = (cpuid->entries[i].eax & ~0xffu) | (__u32)(maxpa->value & 0xff);
	if (ret == 0)
		ret = checked_ioctl(agent.vcpu, KVM_SET_CPUID2, cpuid, &err);
	report(s, "KVM_SET_CPUID2", ret, err, 0, ", \"nent\": %u", cpuid->nent);
	free(buf);
}

static void step_init_vcpu(const struct step *s)
{
	uint64_t hw_error;
	int err;
	struct kvm_tdx_cmd cmd;
	long ret;
	/* INIT_VCPU's data is the vCPU's initial RCX, not a pointer. */
	cmd = (struct kvm_tdx_cmd){ .id = KVM_TDX_INIT_VCPU, .flags = (__u32)arg_or(s, "flags", 0),
				    .data = arg_or(s, "rcx", 0), .hw_error = arg_or(s, "hw_error", 0) };
	ret = checked_ioctl(agent.vcpu, KVM_MEMORY_ENCRYPT_OP, &cmd, &err);
	hw_error = cmd.hw_error;
	report(s, "KVM_TDX_INIT_VCPU", ret, err, hw_error, NULL);
}

static void step_get_cpuid(const struct step *s)
{
	struct kvm_cpuid2 *cpuid;
	uint64_t hw_error;
	int err;
	void *buf = with_cpuid(0, (unsigned)arg_or(s, "nent", MAX_ENTRIES), &cpuid);
	long ret = tdx_op(s, agent.vcpu, KVM_TDX_GET_CPUID, cpuid, &hw_error, &err);
	/* On -E2BIG KVM writes back only nent, the count it needs. */
	char *entries = entries_json(cpuid->entries, ret == 0 ? cpuid->nent : 0);
	report(s, "KVM_TDX_GET_CPUID", ret, err, hw_error, ", \"nent\": %u, \"cpuid\": %s", cpuid->nent, entries);
	free(entries);
	free(buf);
}

static void step_memory(const struct step *s)
{
	uint64_t gpa = arg_or(s, "gpa", 0), size = arg_or(s, "size", 2UL << 20);
	struct kvm_create_guest_memfd gmem = { .size = size };
	int err;
	long ret = checked_ioctl(agent.vm, KVM_CREATE_GUEST_MEMFD, &gmem, &err);
	const char *failed = "KVM_CREATE_GUEST_MEMFD";
	if (ret >= 0) {
		agent.gmem = (int)ret;
		/* The shared view of the slot (and INIT_MEM_REGION's source must not be gmem). */
		void *shared = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		struct kvm_userspace_memory_region2 region = {
			.slot = 0, .flags = KVM_MEM_GUEST_MEMFD, .guest_phys_addr = gpa, .memory_size = size,
			.userspace_addr = (__u64)(uintptr_t)shared, .guest_memfd = (__u32)agent.gmem,
		};
		failed = "KVM_SET_USER_MEMORY_REGION2";
		ret = shared == MAP_FAILED ? (err = errno, -1) :
			checked_ioctl(agent.vm, KVM_SET_USER_MEMORY_REGION2, &region, &err);
	}
	if (ret == 0 && arg_or(s, "private", 1)) {
		struct kvm_memory_attributes attrs = {
			.address = gpa, .size = size, .attributes = KVM_MEMORY_ATTRIBUTE_PRIVATE,
		};
		failed = "KVM_SET_MEMORY_ATTRIBUTES";
		ret = checked_ioctl(agent.vm, KVM_SET_MEMORY_ATTRIBUTES, &attrs, &err);
	}
	report(s, ret < 0 ? failed : "KVM_SET_MEMORY_ATTRIBUTES", ret, err, 0,
	       ", \"gpa\": %" PRIu64 ", \"size\": %" PRIu64, gpa, size);
}

/* The pages' bytes: xorshift32 from seed, one 32-bit word at a time, little-endian (the tests
 * regenerate them to compute the measurement on their own). */
static void fill_pages(uint8_t *buf, size_t size, uint32_t seed)
{
	uint32_t x = seed ? seed : 1;
	for (size_t i = 0; i + 4 <= size; i += 4) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		buf[i] = (uint8_t)x;
		buf[i + 1] = (uint8_t)(x >> 8);
		buf[i + 2] = (uint8_t)(x >> 16);
		buf[i + 3] = (uint8_t)(x >> 24);
	}
}

static void step_init_mem_region(const struct step *s)
{
	uint64_t pages = arg_or(s, "pages", 1), gpa = arg_or(s, "gpa", 0);
	uint32_t seed = (uint32_t)arg_or(s, "seed", 1);
	size_t size = pages ? pages * PAGE_SIZE : PAGE_SIZE;
	uint8_t *source = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t hw_error = 0;
	int err = 0;
	long ret = -1;
	if (source == MAP_FAILED) {
		err = errno;
	} else {
		fill_pages(source, size, seed);
		struct kvm_tdx_init_mem_region region = {
			.source_addr = arg_or(s, "source", 1) ? (__u64)(uintptr_t)source : 0,
			.gpa = gpa, .nr_pages = pages,
		};
		struct kvm_tdx_cmd cmd = {
			.id = KVM_TDX_INIT_MEM_REGION,
			.flags = (__u32)arg_or(s, "flags", arg_or(s, "measure", 1) ? KVM_TDX_MEASURE_MEMORY_REGION : 0),
			.data = (__u64)(uintptr_t)&region, .hw_error = arg_or(s, "hw_error", 0),
		};
		ret = checked_ioctl(agent.vcpu, KVM_MEMORY_ENCRYPT_OP, &cmd, &err);
		hw_error = cmd.hw_error;
		/* KVM copies the region back advanced past the pages it added. */
		pages -= region.nr_pages;
		munmap(source, size);
	}
	report(s, "KVM_TDX_INIT_MEM_REGION", ret, err, hw_error,
	       ", \"gpa\": %" PRIu64 ", \"pages_added\": %" PRIu64 ", \"seed\": %u, \"measure\": %d",
	       gpa, pages, seed, (int)arg_or(s, "measure", 1));
}

static void step_finalize(const struct step *s)
{
	uint64_t hw_error;
	int err;
	long ret = tdx_op(s, agent.vm, KVM_TDX_FINALIZE_VM, NULL, &hw_error, &err);
	report(s, "KVM_TDX_FINALIZE_VM", ret, err, hw_error, NULL);
}

static struct kvm_run *map_run(int *err)
{
	if (agent.run)
		return agent.run;
	long size = checked_ioctl(open_kvm(), KVM_GET_VCPU_MMAP_SIZE, NULL, err);
	if (size < 0)
		return NULL;
	void *page = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, agent.vcpu, 0);
	if (page == MAP_FAILED) {
		*err = errno;
		return NULL;
	}
	agent.run_size = (size_t)size;
	return agent.run = page;
}

static void on_alarm(int sig)
{
	(void)sig; /* only to interrupt KVM_RUN */
}

/* KVM_RUN under a repeating alarm: an alarm that fires before the ioctl sleeps is not lost. */
static long run_with_alarm(uint64_t ms, int *err)
{
	struct sigaction action = { .sa_handler = on_alarm }; /* no SA_RESTART: KVM_RUN returns EINTR */
	struct timeval every = { .tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000 };
	struct itimerval timer = { .it_interval = every, .it_value = every }, off = { 0 };
	sigaction(SIGALRM, &action, NULL);
	setitimer(ITIMER_REAL, &timer, NULL);
	long ret = checked_ioctl(agent.vcpu, KVM_RUN, NULL, err);
	setitimer(ITIMER_REAL, &off, NULL);
	return ret;
}

static uint64_t io_value(const struct kvm_run *run)
{
	uint64_t value = 0;
	memcpy(&value, (const uint8_t *)run + run->io.data_offset, run->io.size <= 8 ? run->io.size : 8);
	return value;
}

/* 7.3's hypercall.flags is 6.1's longmode and pad: one u64 at the same offset. */
static unsigned long long hypercall_flags(const struct kvm_run *run)
{
	unsigned long long flags;
	memcpy(&flags, &run->hypercall.longmode, sizeof(flags));
	return flags;
}

static uint64_t mmio_value(const struct kvm_run *run)
{
	uint64_t value = 0;
	memcpy(&value, run->mmio.data, run->mmio.len <= 8 ? run->mmio.len : 8);
	return value;
}

/* KVM_EXIT_TDX: the TDVMCALL and its operands; the answer (ret, r11-r14) for the next run. */
static void report_tdx_exit(const struct step *s, long ret, int err, struct kvm_run *run)
{
	struct tdx_exit *tdx = (struct tdx_exit *)&run->hypercall; /* the exit union's start */
	switch (tdx->nr) {
	case TDVMCALL_GET_QUOTE:
		report(s, "KVM_RUN", ret, err, 0, ", \"exit_reason\": %u, \"nr\": %llu, \"gpa\": %llu, "
		       "\"size\": %llu, \"default_ret\": %llu", run->exit_reason, tdx->nr, tdx->get_quote.gpa,
		       tdx->get_quote.size, tdx->get_quote.ret);
		break;
	case TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT:
		report(s, "KVM_RUN", ret, err, 0, ", \"exit_reason\": %u, \"nr\": %llu, \"vector\": %llu, "
		       "\"default_ret\": %llu", run->exit_reason, tdx->nr, tdx->setup_event_notify.vector,
		       tdx->setup_event_notify.ret);
		break;
	case TDVMCALL_GET_TD_VM_CALL_INFO:
		report(s, "KVM_RUN", ret, err, 0, ", \"exit_reason\": %u, \"nr\": %llu, \"leaf\": %llu, "
		       "\"default_ret\": %llu", run->exit_reason, tdx->nr, tdx->get_tdvmcall_info.leaf,
		       tdx->get_tdvmcall_info.ret);
		arg_into(s, "r11", &tdx->get_tdvmcall_info.r11);
		arg_into(s, "r12", &tdx->get_tdvmcall_info.r12);
		arg_into(s, "r13", &tdx->get_tdvmcall_info.r13);
		arg_into(s, "r14", &tdx->get_tdvmcall_info.r14);
		break;
	default:
		report(s, "KVM_RUN", ret, err, 0, ", \"exit_reason\": %u, \"nr\": %llu, \"default_ret\": %llu",
		       run->exit_reason, tdx->nr, tdx->unknown.ret);
	}
	arg_into(s, "ret", &tdx->unknown.ret); /* ret comes first in every member */
}

static void step_run(const struct step *s)
{
	int err = 0;
	struct kvm_run *run = map_run(&err);
	long ret = run ? run_with_alarm(arg_or(s, "timeout_ms", 2000), &err) : -1;
	if (!run) {
		report(s, "KVM_RUN", ret, err, 0, NULL);
		return;
	}
	switch (run->exit_reason) {
	case KVM_EXIT_IO:
		report(s, "KVM_RUN", ret, err, 0, ", \"exit_reason\": %u, \"port\": %u, \"size\": %u, "
		       "\"direction\": %u, \"count\": %u, \"data\": %" PRIu64, run->exit_reason, run->io.port,
		       run->io.size, run->io.direction, run->io.count,
		       run->io.direction == KVM_EXIT_IO_OUT ? io_value(run) : 0);
		if (run->io.direction == KVM_EXIT_IO_IN) {
			uint64_t value = arg_or(s, "in", 0);
			memcpy((uint8_t *)run + run->io.data_offset, &value, run->io.size <= 8 ? run->io.size : 8);
		}
		break;
	case KVM_EXIT_MMIO:
		report(s, "KVM_RUN", ret, err, 0, ", \"exit_reason\": %u, \"phys_addr\": %llu, \"len\": %u, "
		       "\"is_write\": %u, \"data\": %" PRIu64, run->exit_reason, run->mmio.phys_addr, run->mmio.len,
		       run->mmio.is_write, run->mmio.is_write ? mmio_value(run) : 0);
		if (!run->mmio.is_write) {
			uint64_t value = arg_or(s, "in", 0);
			memcpy(run->mmio.data, &value, run->mmio.len <= 8 ? run->mmio.len : 8);
		}
		break;
	case KVM_EXIT_HYPERCALL:
		report(s, "KVM_RUN", ret, err, 0, ", \"exit_reason\": %u, \"nr\": %llu, \"args\": [%llu, %llu, "
		       "%llu], \"flags\": %llu", run->exit_reason, run->hypercall.nr, run->hypercall.args[0],
		       run->hypercall.args[1], run->hypercall.args[2], hypercall_flags(run));
		arg_into(s, "ret", &run->hypercall.ret);
		break;
	case KVM_EXIT_TDX:
		report_tdx_exit(s, ret, err, run);
		break;
	case KVM_EXIT_SYSTEM_EVENT: {
		char data[16 * 24] = "";
		for (unsigned i = 0, at = 0; i < run->system_event.ndata && i < 16; i++)
			at += (unsigned)snprintf(data + at, sizeof(data) - at, "%s%" PRIu64, i ? ", " : "",
						 (uint64_t)run->system_event.data[i]);
		report(s, "KVM_RUN", ret, err, 0, ", \"exit_reason\": %u, \"type\": %u, \"data\": [%s]",
		       run->exit_reason, run->system_event.type, data);
		break;
	}
	case KVM_EXIT_INTERNAL_ERROR:
		report(s, "KVM_RUN", ret, err, 0, ", \"exit_reason\": %u, \"suberror\": %u, \"ndata\": %u, "
		       "\"data\": [%llu, %llu]", run->exit_reason, run->internal.suberror, run->internal.ndata,
		       run->internal.ndata > 0 ? run->internal.data[0] : 0ULL,
		       run->internal.ndata > 1 ? run->internal.data[1] : 0ULL);
		break;
	case KVM_EXIT_FAIL_ENTRY:
		report(s, "KVM_RUN", ret, err, 0, ", \"exit_reason\": %u, \"hardware_entry_failure_reason\": %"
		       PRIu64, run->exit_reason, (uint64_t)run->fail_entry.hardware_entry_failure_reason);
		break;
	default:
		report(s, "KVM_RUN", ret, err, 0, ", \"exit_reason\": %u", run->exit_reason);
	}
}

static void step_destroy(const struct step *s)
{
	int *fds[] = { &agent.vcpu, &agent.gmem, &agent.vm };
	if (agent.run) { /* the mapping holds the vCPU file: KVM would not tear down */
		munmap(agent.run, agent.run_size);
		agent.run = NULL;
	}
	for (unsigned i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
		if (*fds[i] >= 0) {
			close(*fds[i]);
			*fds[i] = -1;
		}
	report(s, "close", 0, 0, 0, NULL);
}

#define PAUSED_FILE "/tmp/tdx-agent.paused"
#define RESUME_FILE "/tmp/tdx-agent.resume"

static void step_pause(const struct step *s)
{
	uint64_t waited_ms = 0, timeout_ms = arg_or(s, "timeout_ms", 600000);
	int fd = open(PAUSED_FILE, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	long ret = -1;
	int err = errno;

	if (fd >= 0) {
		close(fd);
		err = ETIMEDOUT;
		for (; waited_ms < timeout_ms; waited_ms += 10) {
			if (access(RESUME_FILE, F_OK) == 0) {
				ret = 0;
				break;
			}
			usleep(10000);
		}
		unlink(RESUME_FILE);
		unlink(PAUSED_FILE);
	}
	report(s, "none", ret, err, 0, ", \"waited_ms\": %" PRIu64, waited_ms);
}

static const struct {
	const char *name;
	void (*run)(const struct step *);
} STEPS[] = {
	{ "vm_types", step_vm_types },
	{ "supported_cpuid", step_supported_cpuid },
	{ "create_vm", step_create_vm },
	{ "x2apic_api", step_x2apic_api },
	{ "split_irqchip", step_split_irqchip },
	{ "exit_hypercall", step_exit_hypercall },
	{ "capabilities", step_capabilities },
	{ "init_vm", step_init_vm },
	{ "create_vcpu", step_create_vcpu },
	{ "set_cpuid", step_set_cpuid },
	{ "init_vcpu", step_init_vcpu },
	{ "get_cpuid", step_get_cpuid },
	{ "memory", step_memory },
	{ "init_mem_region", step_init_mem_region },
	{ "finalize", step_finalize },
	{ "run", step_run },
	{ "pause", step_pause },
	{ "destroy", step_destroy },
};

static int usage(const char *why, const char *what)
{
	fprintf(stderr, "tdx-agent: %s: %s\nusage: tdx-agent STEP[:key=value...] ...; steps:", why, what);
	for (unsigned i = 0; i < sizeof(STEPS) / sizeof(STEPS[0]); i++)
		fprintf(stderr, " %s", STEPS[i].name);
	fprintf(stderr, "\n");
	return 2;
}

/* "name:key=value:key=value" into a step; 0 or a usage error. */
static int parse_step(char *word, struct step *s)
{
	char *save = NULL;
	s->name = strtok_r(word, ":", &save);
	s->nargs = 0;
	for (char *kv; (kv = strtok_r(NULL, ":", &save));) {
		char *eq = strchr(kv, '='), *end;
		if (!eq || s->nargs == MAX_ARGS || (size_t)(eq - kv) >= sizeof(s->args[0].key))
			return usage("bad argument", kv);
		errno = 0;
		uint64_t value = strtoull(eq + 1, &end, 0);
		if (errno || *end || end == eq + 1)
			return usage("bad number", kv);
		memcpy(s->args[s->nargs].key, kv, (size_t)(eq - kv));
		s->args[s->nargs].key[eq - kv] = '\0';
		s->args[s->nargs++].value = value;
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct step *steps = calloc((size_t)argc, sizeof(*steps));
	void (**runs)(const struct step *) = calloc((size_t)argc, sizeof(*runs));
	if (argc < 2)
		return usage("no steps", "give at least one");
	/* Everything is parsed before anything runs: a typo never leaves a half-built VM. */
	for (int i = 1; i < argc; i++) {
		if (parse_step(argv[i], &steps[i]))
			return 2;
		for (unsigned j = 0; j < sizeof(STEPS) / sizeof(STEPS[0]); j++)
			if (steps[i].name && !strcmp(steps[i].name, STEPS[j].name))
				runs[i] = STEPS[j].run;
		if (!runs[i])
			return usage("unknown step", argv[i]);
	}
	for (int i = 1; i < argc; i++)
		runs[i](&steps[i]);
	return 0;
}

/*
 * Runs the shim's wire code (sw_module.c, extracted from the patch by tests/unit/test_shim_wire.py)
 * against a simulated module: COM2 delivers the bytes of --rx, then the bytes of --repeat over and
 * over (a flood), and records what the shim sends.  Prints one JSON object: each operation's
 * result and simulated duration, the bytes sent, the kernel log, the RAM afterwards.
 *
 *   wire_driver [--timeout-ms N] [--rx FILE] [--repeat FILE] [--seq N] [--thr-busy]
 *               [--lock-held-ns N] [--watchdog-thresh N] [--unmapped PAGE] [--readonly PAGE] [--nmi]
 *               hello | call:FN:RCX:VARIANT ...
 *
 * A shim that stays past RUNAWAY times its budget is stopped: the JSON then says "runaway".
 * Each call comes from sim_stack: a kernel function (SIM_FUNC in sim_kernel_text) called by a
 * module function (the call at SIM_CALL in sim_module_text); the JSON gives both texts' addresses.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "shim_stubs.h"
#include "sw_module.c"

#define IO_NS		1000	/* an emulated port access */
#define RDTSC_NS	10
#define RELAX_NS	100
#define RUNAWAY		5
#define RAM_BASE	0x100000ULL
#define RAM_PAGES	8
#define PAGE		4096
#define MAX_LOG		8192
#define SIM_TEXT	64
#define SIM_FUNC	16		/* the kernel function's offset in sim_kernel_text */
#define SIM_SITE	(SIM_FUNC + 7)	/* its return address from __seamcall*() */
#define SIM_NOT_CALL	40		/* a text address not after a call */
#define SIM_CALL	8		/* the module's call of the kernel function */

unsigned int tsc_khz = 1000000;	/* 1 GHz: one TSC tick per simulated ns */
struct cpuinfo_x86 boot_cpu_data = { .cpuid_level = 0xd };
bool sim_in_nmi;
int watchdog_thresh;

static u64 now_ns, limit_ns = ~0ULL, lock_held_until;
static u8 *rx, *repeat;
static size_t rx_len, rx_pos, repeat_len, repeat_pos;
static bool thr_busy, dlab;
static u8 *tx;
static size_t tx_len, tx_cap;
static char log_text[MAX_LOG];
static size_t log_len;
static u8 *ram;
static int page_prot[RAM_PAGES];	/* 0 mapped, 1 unmapped, 2 read-only */
static u8 sim_kernel_text[SIM_TEXT], sim_module_text[SIM_TEXT];
static struct module sim_module = { .name = "kvm_intel" };
static unsigned long sim_stack[4];

static bool in_text(unsigned long addr, const u8 *text)
{
	return addr >= (unsigned long)text && addr < (unsigned long)text + SIM_TEXT;
}

int core_kernel_text(unsigned long addr)
{
	return in_text(addr, sim_kernel_text);
}

int kernel_text_address(unsigned long addr)
{
	return in_text(addr, sim_kernel_text) || in_text(addr, sim_module_text);
}

struct module *__module_address(unsigned long addr)
{
	return in_text(addr, sim_module_text) ? &sim_module : NULL;
}

int kallsyms_lookup_size_offset(unsigned long addr, unsigned long *size, unsigned long *offset)
{
	unsigned long func = (unsigned long)sim_kernel_text + SIM_FUNC;

	if (!in_text(addr, sim_kernel_text) || addr < func)
		return 0;
	*size = SIM_TEXT - SIM_FUNC;
	*offset = addr - func;
	return 1;
}

static void sim_sites_init(void)
{
	u8 *call = sim_module_text + SIM_CALL;
	s32 rel = (sim_kernel_text + SIM_FUNC) - (call + CALL_REL32_LEN);

	call[0] = CALL_REL32;
	memcpy(call + 1, &rel, sizeof(rel));
	sim_module.mem[MOD_TEXT].base = sim_module_text;
	sim_module.mem[MOD_TEXT].size = SIM_TEXT;
	sim_stack[0] = (unsigned long)sim_kernel_text + SIM_SITE;
	sim_stack[1] = (unsigned long)sim_kernel_text + SIM_NOT_CALL;
	sim_stack[2] = (unsigned long)call + CALL_REL32_LEN;
}

static void print_hex(const u8 *p, size_t n)
{
	putchar('"');
	while (n--)
		printf("%02x", *p++);
	putchar('"');
}

static void print_json_string(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			printf("\\%c", *s);
		else if (*s == '\n')
			printf("\\n");
		else
			putchar(*s);
	}
	putchar('"');
}

static void finish(const char *ops, bool runaway)
{
	printf("{\"ops\": [%s], \"runaway\": %s, \"now_ns\": %llu, \"tx\": ", ops,
	       runaway ? "true" : "false", (unsigned long long)now_ns);
	print_hex(tx, tx_len);
	printf(", \"kernel_text\": %lu, \"module_text\": %lu, \"log\": ",
	       (unsigned long)sim_kernel_text, (unsigned long)sim_module_text);
	print_json_string(log_text);
	printf(", \"ram\": ");
	mprotect(ram, RAM_PAGES * PAGE, PROT_READ);
	print_hex(ram, RAM_PAGES * PAGE);
	printf("}\n");
	exit(0);
}

static char ops_json[1 << 16];

static void advance(u64 ns)
{
	now_ns += ns;
	if (now_ns > limit_ns)
		finish(ops_json, true);
}

void shim_log(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_len += vsnprintf(log_text + log_len, MAX_LOG - log_len, fmt, ap);
	va_end(ap);
	if (log_len >= MAX_LOG)
		log_len = MAX_LOG - 1;
}

u64 rdtsc(void)
{
	advance(RDTSC_NS);
	return now_ns;
}

void cpu_relax(void)
{
	advance(RELAX_NS);
}

static bool rx_ready(void)
{
	return rx_pos < rx_len || repeat_len;
}

u8 inb(u16 port)
{
	u8 c = 0;

	advance(IO_NS);
	if (port == COM2_BASE + UART_LSR)
		return (rx_ready() ? UART_LSR_DR : 0) | (thr_busy ? 0 : UART_LSR_THRE);
	if (port != COM2_BASE + UART_RBR || !rx_ready())
		return 0;
	if (rx_pos < rx_len)
		return rx[rx_pos++];
	c = repeat[repeat_pos++];
	repeat_pos %= repeat_len;
	return c;
}

void outb(u8 value, u16 port)
{
	advance(IO_NS);
	if (port == COM2_BASE + UART_LCR)
		dlab = value & 0x80;
	/* With DLAB on, uart_init() writes the divisor through THR's port: not data. */
	if (port != COM2_BASE + UART_THR || dlab)
		return;
	if (tx_len == tx_cap) {
		tx_cap = tx_cap ? 2 * tx_cap : 1 << 16;
		tx = realloc(tx, tx_cap);
	}
	tx[tx_len++] = value;
}

bool arch_spin_trylock(arch_spinlock_t *lock)
{
	if (lock->locked || now_ns < lock_held_until)
		return false;
	lock->locked = 1;
	return true;
}

void arch_spin_unlock(arch_spinlock_t *lock)
{
	lock->locked = 0;
}

bool memblock_is_region_memory(u64 base, u64 size)
{
	return base >= RAM_BASE && size <= RAM_PAGES * PAGE && base - RAM_BASE <= RAM_PAGES * PAGE - size;
}

void *__va(u64 pa)
{
	return ram + (pa - RAM_BASE);
}

/* Whether [p, p + size) of RAM is mapped, and writable if @write: what the MMU would say. */
static bool mapped(const void *p, size_t size, bool write)
{
	size_t first, last;

	if ((const u8 *)p < ram || (const u8 *)p >= ram + RAM_PAGES * PAGE)
		return true;	/* the simulated stack and texts */
	first = ((const u8 *)p - ram) / PAGE;
	last = ((const u8 *)p - ram + size - 1) / PAGE;

	for (; first <= last; first++)
		if (page_prot[first] == 1 || (write && page_prot[first] == 2))
			return false;
	return true;
}

long copy_from_kernel_nofault(void *dst, const void *src, size_t size)
{
	if (!mapped(src, size, false))
		return -EFAULT;
	memcpy(dst, src, size);
	return 0;
}

long copy_to_kernel_nofault(void *dst, const void *src, size_t size)
{
	if (!mapped(dst, size, true))
		return -EFAULT;
	memcpy(dst, src, size);
	return 0;
}

static u8 *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	u8 *buf;
	long n;

	if (!f || fseek(f, 0, SEEK_END) || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET))
		exit(2);
	buf = malloc(n + 1);
	if (fread(buf, 1, n, f) != (size_t)n)
		exit(2);
	fclose(f);
	*len = n;
	return buf;
}

int main(int argc, char **argv)
{
	size_t ops_len = 0;
	int i;

	ram = mmap(NULL, RAM_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (i = 0; i < RAM_PAGES * PAGE; i++)
		ram[i] = (u8)(i * 131 + 7);
	for (i = 1; i < argc; i++) {
		const char *arg = argv[i];

		if (!strcmp(arg, "--timeout-ms"))
			timeout_ms = strtoul(argv[++i], NULL, 0);
		else if (!strcmp(arg, "--rx"))
			rx = read_file(argv[++i], &rx_len);
		else if (!strcmp(arg, "--repeat"))
			repeat = read_file(argv[++i], &repeat_len);
		else if (!strcmp(arg, "--seq"))
			next_seq = strtoul(argv[++i], NULL, 0);
		else if (!strcmp(arg, "--thr-busy"))
			thr_busy = true;
		else if (!strcmp(arg, "--lock-held-ns"))
			lock_held_until = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(arg, "--watchdog-thresh"))
			watchdog_thresh = strtol(argv[++i], NULL, 0);
		else if (!strcmp(arg, "--unmapped"))
			page_prot[strtoul(argv[++i], NULL, 0)] = 1;
		else if (!strcmp(arg, "--readonly"))
			page_prot[strtoul(argv[++i], NULL, 0)] = 2;
		else if (!strcmp(arg, "--nmi"))
			sim_in_nmi = true;
		else
			break;
	}
	/* The real faults the shim must not take: an unguarded access kills the driver. */
	for (int page = 0; page < RAM_PAGES; page++)
		if (page_prot[page])
			mprotect(ram + page * PAGE, PAGE, page_prot[page] == 1 ? PROT_NONE : PROT_READ);
	limit_ns = (u64)RUNAWAY * timeout_ms * 1000000ULL;
	tdx_sw_vmxon();
	sim_sites_init();
	for (; i < argc; i++) {
		u64 start = now_ns, ret;
		const char *sep = ops_len ? ", " : "";

		if (!strcmp(argv[i], "hello")) {
			u32 keyid_start = 0, nr_keyids = 0;
			int err = tdx_sw_keyid_partitioning(&keyid_start, &nr_keyids);

			ops_len += snprintf(ops_json + ops_len, sizeof(ops_json) - ops_len,
					    "%s{\"op\": \"hello\", \"ret\": %d, \"keyid_start\": %u, \"nr_keyids\": %u, \"module_present\": %s, \"ns\": %llu}",
					    sep, err, keyid_start, nr_keyids, module_present ? "true" : "false",
					    (unsigned long long)(now_ns - start));
		} else if (!strncmp(argv[i], "call:", 5)) {
			struct tdx_module_args args = {};
			char *p = argv[i] + 5;
			u64 fn = strtoull(p, &p, 0);
			int variant;

			args.rcx = strtoull(p + 1, &p, 0);
			variant = strtol(p + 1, NULL, 0);
			ret = tdx_sw_seamcall(fn, &args, variant, sim_stack);
			ops_len += snprintf(ops_json + ops_len, sizeof(ops_json) - ops_len,
					    "%s{\"op\": \"call\", \"ret\": %llu, \"rcx\": %llu, \"rdx\": %llu, \"ns\": %llu}",
					    sep, (unsigned long long)ret, (unsigned long long)args.rcx,
					    (unsigned long long)args.rdx, (unsigned long long)(now_ns - start));
		} else {
			fprintf(stderr, "unknown operation %s\n", argv[i]);
			return 2;
		}
	}
	finish(ops_json, false);
}

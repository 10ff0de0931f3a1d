/*
 * Just enough of the kernel for the shim (sw_module.c, its #include lines dropped) to run in user
 * space against a simulated COM2, clock, wire lock and RAM: see wire_driver.c. Kernel calls keep
 * their names; the simulation behind them is in wire_driver.c.
 */
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef unsigned long long u64;	/* as the kernel: %llx */
typedef int32_t s32;
typedef long long s64;

#define BIT(n)		(1UL << (n))
#define BIT_ULL(n)	(1ULL << (n))
#define MSEC_PER_SEC	1000L
#define min(a, b)	((a) < (b) ? (a) : (b))
#define min_t(t, a, b)	((t)(a) < (t)(b) ? (t)(a) : (t)(b))
#define READ_ONCE(x)	(x)
#define WRITE_ONCE(x, v)	((x) = (v))
#define __init
#define noinstr
#define instrumentation_begin()	do { } while (0)
#define instrumentation_end()	do { } while (0)
#define module_param(name, type, perm)
#define MODULE_PARM_DESC(name, text)
#define arch_initcall(fn)
#define mb()		__sync_synchronize()

void shim_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#define pr_err(fmt, ...)		shim_log(pr_fmt(fmt), ##__VA_ARGS__)
#define pr_err_ratelimited(fmt, ...)	shim_log(pr_fmt(fmt), ##__VA_ARGS__)
#define pr_warn(fmt, ...)		shim_log(pr_fmt(fmt), ##__VA_ARGS__)
#define pr_info(fmt, ...)		shim_log(pr_fmt(fmt), ##__VA_ARGS__)

/* Time: the TSC counts simulated nanoseconds; I/O and pauses advance it. */
extern unsigned int tsc_khz;
u64 rdtsc(void);
void cpu_relax(void);

/* COM2 */
u8 inb(u16 port);
void outb(u8 value, u16 port);

/* The wire lock: another CPU may hold it until a simulated time. */
typedef struct {
	int locked;
} arch_spinlock_t;
#define __ARCH_SPIN_LOCK_UNLOCKED	{ 0 }
bool arch_spin_trylock(arch_spinlock_t *lock);
void arch_spin_unlock(arch_spinlock_t *lock);

/* RAM: memblock knows it; the direct map may lack pages or map them read-only. */
bool memblock_is_region_memory(u64 base, u64 size);
void *__va(u64 pa);
long copy_from_kernel_nofault(void *dst, const void *src, size_t size);
long copy_to_kernel_nofault(void *dst, const void *src, size_t size);

#define DEFINE_PER_CPU(type, name)	type name
#define this_cpu_read(var)		(var)
#define this_cpu_write(var, value)	((var) = (value))
#define raw_smp_processor_id()		0
#define num_possible_cpus()		2
#define local_irq_save(flags)		((flags) = 0)
#define local_irq_restore(flags)	((void)(flags))
extern bool sim_in_nmi;
#define in_nmi()			sim_in_nmi
#define panic_in_progress()		false
#define X86_FEATURE_VMX			0
#define cpu_feature_enabled(feature)	false
#define X86_CR4_VMXE			BIT(13)
#define __read_cr4()			0UL
struct cpuinfo_x86 {
	int cpuid_level;
};
extern struct cpuinfo_x86 boot_cpu_data;
#define cpuid_ebx(leaf)			0U
#define cpuid_ecx(leaf)			0U
#define cpuid_edx(leaf)			0U
#define MSR_IA32_VMX_BASIC		0x480
#define VMX_BASIC_NO_SEAMRET_INVD_VMCS	BIT_ULL(60)
static inline int rdmsrq_safe(u32 msr, u64 *p) { return -EIO; }
#define movdir64b(dst, src)		memcpy(dst, src, 64)
#define request_region(start, n, name)	((void *)1)
extern int watchdog_thresh;

#define TDX_SEAMCALL_VMFAILINVALID	0x8000FF00FFFF0000ULL
#define TDX_SEAMCALL_UD			0x8000FF0000000006ULL
struct tdx_module_args {
	u64 rcx, rdx, r8, r9, r10, r11, r12, r13, r14, r15, rbx, rdi, rsi;
};

/* x86 is little-endian: unaligned LE accesses are plain copies. */
#define DEFINE_LE(bits)									\
	static inline u##bits get_unaligned_le##bits(const void *p)			\
	{ u##bits v; memcpy(&v, p, sizeof(v)); return v; }				\
	static inline void put_unaligned_le##bits(u##bits v, void *p)			\
	{ memcpy(p, &v, sizeof(v)); }
DEFINE_LE(16)
DEFINE_LE(32)
DEFINE_LE(64)

/* Call sites: a simulated kernel text and one module (wire_driver.c). */
#define CONFIG_MODULES
#define MODULE_NAME_LEN	56
#define SIM_KASLR_OFFSET	0x1000000UL
static inline unsigned long kaslr_offset(void) { return SIM_KASLR_OFFSET; }
enum mod_mem_type { MOD_TEXT, MOD_INIT_TEXT, MOD_MEM_NUM_TYPES };
struct module_memory {
	void *base;
	unsigned int size;
};
struct module {
	char name[MODULE_NAME_LEN];
	struct module_memory mem[MOD_MEM_NUM_TYPES];
};
static inline bool within_module_mem_type(unsigned long addr, const struct module *mod,
					  enum mod_mem_type type)
{
	unsigned long base = (unsigned long)mod->mem[type].base;

	return addr >= base && addr < base + mod->mem[type].size;
}
struct module *__module_address(unsigned long addr);
int core_kernel_text(unsigned long addr);
int kernel_text_address(unsigned long addr);
int kallsyms_lookup_size_offset(unsigned long addr, unsigned long *size, unsigned long *offset);
#define guard(name)		shim_guard_##name
static inline void shim_guard_rcu(void) { }
#define strscpy(dst, src)	((void)snprintf(dst, sizeof(dst), "%s", src))

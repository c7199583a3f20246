"""cffi out-of-line API module hv._kvm: the KVM ABI as the C compiler sees it.

Struct layouts and ioctl numbers come from <linux/kvm.h> at build time (the
cdef uses `...` wherever the compiler fills in the value), never from numbers
copied by hand. Besides the structs, the module offers ioctl(), mmap/munmap,
eventfd, and hv_install_kick_handler(): a no-op handler for the signal hv
sends to a vCPU thread to get it out of KVM_RUN (installed without
SA_RESTART, so the ioctl fails with EINTR).
"""

from cffi import FFI

ffibuilder = FFI()

_IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST KVM_GET_MSR_FEATURE_INDEX_LIST
KVM_CREATE_VCPU KVM_SET_USER_MEMORY_REGION KVM_CREATE_IRQCHIP KVM_CREATE_PIT2
KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR KVM_IRQ_LINE KVM_IRQFD KVM_IOEVENTFD
KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_GET_PIT2 KVM_SET_PIT2 KVM_GET_CLOCK
KVM_SET_CLOCK KVM_GET_DIRTY_LOG KVM_CLEAR_DIRTY_LOG KVM_ENABLE_CAP
KVM_RESET_DIRTY_RINGS KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS
KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU KVM_GET_MSRS KVM_SET_MSRS KVM_GET_LAPIC
KVM_SET_LAPIC KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS KVM_GET_MP_STATE
KVM_SET_MP_STATE KVM_GET_XCRS KVM_SET_XCRS KVM_SET_CPUID2 KVM_GET_CPUID2
KVM_GET_TSC_KHZ KVM_SET_TSC_KHZ KVM_KVMCLOCK_CTRL KVM_GET_DEBUGREGS
KVM_SET_DEBUGREGS
"""

_CONSTANTS = """
KVM_API_VERSION
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG
KVM_EXIT_HLT KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN
KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR KVM_EXIT_SET_TPR KVM_EXIT_TPR_ACCESS
KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT KVM_EXIT_X86_RDMSR
KVM_EXIT_X86_WRMSR KVM_EXIT_DIRTY_RING_FULL
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_INTERNAL_ERROR_EMULATION KVM_INTERNAL_ERROR_SIMUL_EX
KVM_INTERNAL_ERROR_DELIVERY_EV
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_CAP_IRQCHIP KVM_CAP_HLT KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR
KVM_CAP_EXT_CPUID KVM_CAP_NR_VCPUS KVM_CAP_MAX_VCPUS KVM_CAP_NR_MEMSLOTS
KVM_CAP_PIT2 KVM_CAP_PIT_STATE2 KVM_CAP_IOEVENTFD KVM_CAP_IRQFD
KVM_CAP_SET_IDENTITY_MAP_ADDR KVM_CAP_ADJUST_CLOCK KVM_CAP_VCPU_EVENTS
KVM_CAP_XCRS KVM_CAP_XSAVE KVM_CAP_IMMEDIATE_EXIT KVM_CAP_GET_TSC_KHZ
KVM_CAP_TSC_CONTROL KVM_CAP_KVMCLOCK_CTRL KVM_CAP_MP_STATE
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 KVM_CAP_DIRTY_LOG_RING
KVM_CAP_DIRTY_LOG_RING_ACQ_REL KVM_CAP_X86_USER_SPACE_MSR
KVM_CAP_GET_MSR_FEATURES KVM_CAP_INTERNAL_ERROR_DATA KVM_CAP_DEBUGREGS
KVM_MEM_LOG_DIRTY_PAGES KVM_MEM_READONLY
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE KVM_DIRTY_LOG_INITIALLY_SET
KVM_DIRTY_LOG_PAGE_OFFSET KVM_DIRTY_GFN_F_DIRTY KVM_DIRTY_GFN_F_RESET
KVM_IRQFD_FLAG_DEASSIGN KVM_IRQFD_FLAG_RESAMPLE
KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DEASSIGN
KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC
KVM_PIT_SPEAKER_DUMMY KVM_CLOCK_TSC_STABLE
KVM_CPUID_FLAG_SIGNIFCANT_INDEX KVM_MP_STATE_RUNNABLE KVM_MP_STATE_HALTED
KVM_MP_STATE_UNINITIALIZED
KVM_VCPUEVENT_VALID_NMI_PENDING KVM_VCPUEVENT_VALID_SIPI_VECTOR
KVM_VCPUEVENT_VALID_SHADOW KVM_VCPUEVENT_VALID_SMM
KVM_MAX_XCRS KVM_APIC_REG_SIZE
"""

CDEF = """
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    uint64_t interrupt_bitmap[...];
};

struct kvm_fpu { ...; };
struct kvm_lapic_state { char regs[...]; };
struct kvm_vcpu_events { uint32_t flags; ...; };
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_xcr { uint32_t xcr; uint32_t reserved; uint64_t value; };
struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; struct kvm_xcr xcrs[...]; ...; };
struct kvm_debugregs { ...; };

struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
struct kvm_msrs { uint32_t nmsrs; uint32_t pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };

struct kvm_cpuid_entry2 {
    uint32_t function, index, flags, eax, ebx, ecx, edx;
    ...;
};
struct kvm_cpuid2 { uint32_t nent; uint32_t padding; struct kvm_cpuid_entry2 entries[]; };

struct kvm_userspace_memory_region {
    uint32_t slot, flags;
    uint64_t guest_phys_addr, memory_size, userspace_addr;
};

struct kvm_irq_level { uint32_t irq; uint32_t level; };
struct kvm_irqfd { uint32_t fd, gsi, flags, resamplefd; ...; };
struct kvm_ioeventfd {
    uint64_t datamatch, addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    ...;
};
struct kvm_irqchip { uint32_t chip_id; ...; };
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_pit_state2 { uint32_t flags; ...; };
struct kvm_clock_data { uint64_t clock; uint32_t flags; uint64_t realtime; uint64_t host_tsc; ...; };
struct kvm_enable_cap { uint32_t cap; uint32_t flags; uint64_t args[4]; ...; };
struct kvm_dirty_gfn { uint32_t flags; uint32_t slot; uint64_t offset; };

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    ...;
};

/* kvm_run's exit union, seen through accessors (its members are anonymous
   structs, which the C compiler, not cffi, lays out) */
struct hv_exit_io { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; };
struct hv_exit_mmio { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; };
struct hv_exit_internal { uint32_t suberror; uint32_t ndata; uint64_t data[16]; };
struct hv_exit_system_event { uint32_t type; uint32_t ndata; uint64_t data[16]; };
struct hv_exit_fail_entry { uint64_t hardware_entry_failure_reason; uint32_t cpu; };
struct hv_exit_io *hv_run_io(struct kvm_run *run);
struct hv_exit_mmio *hv_run_mmio(struct kvm_run *run);
struct hv_exit_internal *hv_run_internal(struct kvm_run *run);
struct hv_exit_system_event *hv_run_system_event(struct kvm_run *run);
struct hv_exit_fail_entry *hv_run_fail_entry(struct kvm_run *run);
uint64_t hv_run_hw_exit_reason(struct kvm_run *run);

int hv_get_dirty_log(int vmfd, uint32_t slot, void *bitmap);
int hv_clear_dirty_log(int vmfd, uint32_t slot, uint64_t first_page,
                       uint32_t num_pages, void *bitmap);
int hv_install_kick_handler(int signo);
int hv_ioctl(int fd, unsigned long request, void *arg);
int hv_ioctl_val(int fd, unsigned long request, unsigned long arg);

void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int eventfd(unsigned int initval, int flags);
#define PROT_READ ...
#define PROT_WRITE ...
#define MAP_SHARED ...
#define EFD_CLOEXEC ...
#define EFD_NONBLOCK ...
"""

CDEF += "".join(f"#define {name} ...\n" for name in (_IOCTLS + _CONSTANTS).split())

SOURCE = r"""
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>

struct hv_exit_io { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; };
struct hv_exit_mmio { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; };
struct hv_exit_internal { __u32 suberror; __u32 ndata; __u64 data[16]; };
struct hv_exit_system_event { __u32 type; __u32 ndata; __u64 data[16]; };
struct hv_exit_fail_entry { __u64 hardware_entry_failure_reason; __u32 cpu; };

#define HV_SAME_LAYOUT(ours, member) \
    _Static_assert(sizeof(struct ours) == sizeof(((struct kvm_run *)0)->member), #member)
HV_SAME_LAYOUT(hv_exit_io, io);
HV_SAME_LAYOUT(hv_exit_internal, internal);
HV_SAME_LAYOUT(hv_exit_fail_entry, fail_entry);
_Static_assert(offsetof(struct hv_exit_mmio, is_write) ==
               offsetof(struct kvm_run, mmio.is_write) - offsetof(struct kvm_run, mmio), "mmio");
_Static_assert(offsetof(struct hv_exit_system_event, data) ==
               offsetof(struct kvm_run, system_event.data) - offsetof(struct kvm_run, system_event),
               "system_event");

static struct hv_exit_io *hv_run_io(struct kvm_run *r) { return (void *)&r->io; }
static struct hv_exit_mmio *hv_run_mmio(struct kvm_run *r) { return (void *)&r->mmio; }
static struct hv_exit_internal *hv_run_internal(struct kvm_run *r) { return (void *)&r->internal; }
static struct hv_exit_system_event *hv_run_system_event(struct kvm_run *r) { return (void *)&r->system_event; }
static struct hv_exit_fail_entry *hv_run_fail_entry(struct kvm_run *r) { return (void *)&r->fail_entry; }
static uint64_t hv_run_hw_exit_reason(struct kvm_run *r) { return r->hw.hardware_exit_reason; }

static int hv_ioctl(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
static int hv_ioctl_val(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }

static int hv_get_dirty_log(int vmfd, uint32_t slot, void *bitmap)
{
    struct kvm_dirty_log log;
    memset(&log, 0, sizeof log);
    log.slot = slot;
    log.dirty_bitmap = bitmap;
    return ioctl(vmfd, KVM_GET_DIRTY_LOG, &log);
}

static int hv_clear_dirty_log(int vmfd, uint32_t slot, uint64_t first_page,
                              uint32_t num_pages, void *bitmap)
{
    struct kvm_clear_dirty_log log;
    memset(&log, 0, sizeof log);
    log.slot = slot;
    log.first_page = first_page;
    log.num_pages = num_pages;
    log.dirty_bitmap = bitmap;
    return ioctl(vmfd, KVM_CLEAR_DIRTY_LOG, &log);
}

static void hv_kick(int signo) { (void)signo; }

/* No SA_RESTART: a vCPU thread in KVM_RUN returns with EINTR. */
static int hv_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = hv_kick;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    return sigaction(signo, &sa, NULL);
}
"""

ffibuilder.cdef(CDEF)
ffibuilder.set_source("hv._kvm", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

/* hv._pages: the destination's userfaultfd page server (see postcopy.h). */
#define _GNU_SOURCE
#include "postcopy.h"
#include "pages.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

/* hv's wire protocol (hv.migration.protocol): the header and the commands
 * the loop handles itself. */
#define HV_MAGIC "HVMG"
#define HV_HEADER 24
#define CMD_MEMORY 2
#define CMD_ZERO 3
#define CMD_REQUEST 14
#define FAULT_BATCH 64

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

struct pc_priv {
    pthread_mutex_t wlock;
    uint8_t *data;               /* HV_PC_MAX_PAGES pages */
    uint64_t table[2 * HV_PC_MAX_RANGES];
    uint8_t head[HV_HEADER + 8]; /* header, then the table head */
    /* the message being read */
    int phase;                   /* 0 header, 1 table head, 2 table, 3 data */
    size_t want, got;
    uint16_t command;
    uint64_t length, nruns, npages;
    uint64_t zero_hash;
};

static inline int bit(const uint64_t *bm, uint64_t p) { return (bm[p / 64] >> (p % 64)) & 1; }
static inline void set_bit(uint64_t *bm, uint64_t p) { bm[p / 64] |= 1ull << (p % 64); }

/* --------------------------------------------------------------- the uffd */

int hv_uffd_open(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 && (errno == EPERM || errno == ENOSYS)) {
        /* /dev/userfaultfd grants kernel-mode faults by file permission */
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev >= 0) {
            fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
            close(dev);
        }
    }
    if (fd < 0)
        return -errno;
    struct uffdio_api api = { .api = UFFD_API, .features = 0 };
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int hv_uffd_register(int uffd, uint8_t *addr, uint64_t len)
{
    struct uffdio_register reg = {
        .range = { .start = (uint64_t)(uintptr_t)addr, .len = len },
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    uint64_t need = (1ull << _UFFDIO_COPY) | (1ull << _UFFDIO_ZEROPAGE) | (1ull << _UFFDIO_WAKE);
    if ((reg.ioctls & need) != need) {
        hv_uffd_unregister(uffd, addr, len);
        return -ENOTSUP;
    }
    return 0;
}

int hv_uffd_unregister(int uffd, uint8_t *addr, uint64_t len)
{
    struct uffdio_range r = { .start = (uint64_t)(uintptr_t)addr, .len = len };
    return ioctl(uffd, UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

int hv_uffd_wake(int uffd, uint8_t *addr, uint64_t len)
{
    struct uffdio_range r = { .start = (uint64_t)(uintptr_t)addr, .len = len };
    return ioctl(uffd, UFFDIO_WAKE, &r) < 0 ? -errno : 0;
}

int hv_discard_ranges(uint8_t *mem, size_t page_size, const uint64_t *starts,
                      const uint64_t *counts, size_t nruns)
{
    for (size_t i = 0; i < nruns; i++)
        if (madvise(mem + starts[i] * page_size, counts[i] * page_size, MADV_DONTNEED) != 0)
            return -errno;
    return 0;
}

/* Place [pfn, pfn+n) with UFFDIO_COPY from src (copy) or UFFDIO_ZEROPAGE
 * (src NULL). A page that is already there (EEXIST) is stepped over;
 * *skipped counts those. Returns 0 or -errno. */
static int place(int uffd, uint8_t *mem, size_t ps, uint64_t pfn, uint64_t n,
                 const uint8_t *src, uint64_t *skipped)
{
    uint64_t done = 0;
    while (done < n) {
        uint64_t at = (uint64_t)(uintptr_t)(mem + (pfn + done) * ps);
        uint64_t len = (n - done) * ps;
        int64_t r;
        int err = 0;
        if (src) {
            struct uffdio_copy c = { .dst = at, .src = (uint64_t)(uintptr_t)(src + done * ps),
                                     .len = len, .mode = 0 };
            if (ioctl(uffd, UFFDIO_COPY, &c) < 0)
                err = errno;
            r = c.copy;
        } else {
            struct uffdio_zeropage z = { .range = { .start = at, .len = len }, .mode = 0 };
            if (ioctl(uffd, UFFDIO_ZEROPAGE, &z) < 0)
                err = errno;
            r = z.zeropage;
        }
        if (!err) {
            done = n;
            break;
        }
        if (r > 0)
            done += (uint64_t)r / ps;
        if (err == EAGAIN || err == EINTR)
            continue;
        if (err == EEXIST || r == -EEXIST) {
            /* the page at done is there already: step over it */
            done++;
            if (skipped)
                (*skipped)++;
            continue;
        }
        return r < 0 && r != -EAGAIN ? (int)r : -err;
    }
    return 0;
}

/* --------------------------------------------------------------- the loop */

int hv_postcopy_init(struct hv_postcopy *pc)
{
    struct pc_priv *p = calloc(1, sizeof *p);
    if (!p)
        return -ENOMEM;
    p->data = mmap(NULL, HV_PC_MAX_PAGES * pc->page_size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p->data == MAP_FAILED) {
        free(p);
        return -ENOMEM;
    }
    pthread_mutex_init(&p->wlock, NULL);
    memset(p->data, 0, pc->page_size);
    p->zero_hash = hv_hash_page(p->data, pc->page_size);
    p->want = HV_HEADER;
    pc->priv = p;
    return 0;
}

void hv_postcopy_free(struct hv_postcopy *pc)
{
    struct pc_priv *p = pc->priv;
    if (!p)
        return;
    munmap(p->data, HV_PC_MAX_PAGES * pc->page_size);
    pthread_mutex_destroy(&p->wlock);
    free(p);
    pc->priv = NULL;
}

static int write_all_locked(struct hv_postcopy *pc, const uint8_t *buf, size_t len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t r = send(pc->sock, buf + off, len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct pollfd w = { .fd = pc->sock, .events = POLLOUT };
                int pr = poll(&w, 1, pc->timeout_ms);
                if (pr == 0)
                    return -ETIMEDOUT;
                if (pr < 0 && errno != EINTR)
                    return -errno;
                continue;
            }
            return errno == EPIPE ? -ECONNRESET : -errno;
        }
        off += (size_t)r;
    }
    return 0;
}

int hv_postcopy_write(struct hv_postcopy *pc, const uint8_t *buf, size_t len)
{
    struct pc_priv *p = pc->priv;
    pthread_mutex_lock(&p->wlock);
    int e = write_all_locked(pc, buf, len);
    pthread_mutex_unlock(&p->wlock);
    return e;
}

static int fail(struct hv_postcopy *pc, const char *what)
{
    snprintf(pc->error, sizeof pc->error, "%s", what);
    return -EPROTO;
}

static void put_header(uint8_t *h, uint16_t version, uint16_t cmd, uint64_t length)
{
    memcpy(h, HV_MAGIC, 4);
    uint16_t v = version;
    uint32_t zero = 0;
    memcpy(h + 4, &v, 2);
    memcpy(h + 6, &cmd, 2);
    memcpy(h + 8, &zero, 4);
    memcpy(h + 12, &zero, 4);
    memcpy(h + 16, &length, 8);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Send one REQUEST for the pfns (sorted here; duplicates merged). */
static int request(struct hv_postcopy *pc, uint64_t *pfns, size_t n)
{
    uint8_t msg[HV_HEADER + 8 + 16 * FAULT_BATCH];
    uint64_t *t = (uint64_t *)(msg + HV_HEADER + 8);
    qsort(pfns, n, sizeof *pfns, cmp_u64);
    uint32_t runs = 0;
    for (size_t i = 0; i < n; i++) {
        if (runs && t[2 * (runs - 1)] + t[2 * (runs - 1) + 1] == pfns[i]) {
            t[2 * (runs - 1) + 1]++;
        } else if (!runs || t[2 * (runs - 1)] + t[2 * (runs - 1) + 1] < pfns[i]) {
            t[2 * runs] = pfns[i];
            t[2 * runs + 1] = 1;
            runs++;
        }
    }
    uint32_t pattern = 0;
    memcpy(msg + HV_HEADER, &runs, 4);
    memcpy(msg + HV_HEADER + 4, &pattern, 4);
    put_header(msg, pc->version, CMD_REQUEST, 8 + 16 * (uint64_t)runs);
    pc->st.request_msgs++;
    return hv_postcopy_write(pc, msg, HV_HEADER + 8 + 16 * (size_t)runs);
}

/* Read every pending fault event; ask for the pages not asked yet. */
static int serve_faults(struct hv_postcopy *pc)
{
    struct uffd_msg msgs[FAULT_BATCH];
    for (;;) {
        ssize_t r = read(pc->uffd, msgs, sizeof msgs);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (errno == EINTR)
                continue;
            return -errno;
        }
        size_t n = (size_t)r / sizeof msgs[0], want = 0;
        uint64_t pfns[FAULT_BATCH];
        uint64_t now = hv_now_ns();
        for (size_t i = 0; i < n; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            pc->st.faults++;
            uint64_t addr = msgs[i].arg.pagefault.address;
            uint64_t pfn = (addr - (uint64_t)(uintptr_t)pc->mem) / pc->page_size;
            if (pfn >= pc->npages)
                continue;
            if (bit(pc->placed, pfn)) {
                /* counted placed but not mapped: zero or free at the
                 * switch, or placed and then discarded (the balloon). It
                 * reads as zero, as discarded anonymous memory does; a
                 * page placed between the fault and this read is only
                 * woken */
                uint64_t skipped = 0;
                pc->st.refaults++;
                int e = place(pc->uffd, pc->mem, pc->page_size, pfn, 1, NULL, &skipped);
                if (e)
                    return e;
                if (skipped) {
                    struct uffdio_range w = {
                        .start = (uint64_t)(uintptr_t)(pc->mem + pfn * pc->page_size),
                        .len = pc->page_size };
                    ioctl(pc->uffd, UFFDIO_WAKE, &w);
                }
                continue;
            }
            if (bit(pc->requested, pfn))
                continue;       /* asked already: its arrival wakes every waiter */
            set_bit(pc->requested, pfn);
            if (pc->req_ns)
                pc->req_ns[pfn] = now;
            pfns[want++] = pfn;
        }
        if (want) {
            pc->st.requests += want;
            int e = request(pc, pfns, want);
            if (e)
                return e;
        }
        if (n < FAULT_BATCH)
            return 0;
    }
}

/* The message just read completely: place its pages. */
static int place_message(struct hv_postcopy *pc, struct pc_priv *p)
{
    size_t ps = pc->page_size;
    uint64_t off = 0;
    uint64_t now = 0;
    for (uint64_t i = 0; i < p->nruns; i++) {
        uint64_t s = p->table[2 * i], c = p->table[2 * i + 1];
        uint64_t j = 0;
        while (j < c) {
            /* a run of pages not placed yet */
            while (j < c && bit(pc->placed, s + j)) {
                pc->st.duplicates++;
                j++;
            }
            uint64_t k = j;
            while (k < c && !bit(pc->placed, s + k))
                k++;
            if (k == j)
                continue;
            const uint8_t *src = p->command == CMD_MEMORY ? p->data + (off + j) * ps : NULL;
            if (pc->hashes)
                for (uint64_t q = j; q < k; q++)
                    pc->hashes[s + q] = src ? hv_hash_page(src + (q - j) * ps, ps)
                                            : p->zero_hash;
            uint64_t skipped = 0;
            int e = place(pc->uffd, pc->mem, ps, s + j, k - j, src, &skipped);
            if (e)
                return e;
            hv_bitmap_set_range(pc->placed, s + j, k - j);
            pc->missing -= k - j;
            if (src)
                pc->st.placed += k - j;
            else
                pc->st.zero_placed += k - j;
            for (uint64_t q = j; q < k; q++) {
                uint64_t pfn = s + q;
                if (pc->req_ns && pc->req_ns[pfn]) {
                    if (!now)
                        now = hv_now_ns();
                    uint64_t lat = now - pc->req_ns[pfn];
                    pc->req_ns[pfn] = 0;
                    pc->st.latency_count++;
                    pc->st.latency_sum_ns += lat;
                    if (lat > pc->st.latency_max_ns)
                        pc->st.latency_max_ns = lat;
                }
            }
            j = k;
        }
        off += c;
    }
    pc->st.messages++;
    return 0;
}

/* The header just read: a page message to take in, or the end of the loop. */
static int take_header(struct hv_postcopy *pc, struct pc_priv *p, int *done)
{
    uint8_t *h = p->head;
    uint16_t version, cmd;
    uint32_t flags, reserved;
    memcpy(&version, h + 4, 2);
    memcpy(&cmd, h + 6, 2);
    memcpy(&flags, h + 8, 4);
    memcpy(&reserved, h + 12, 4);
    memcpy(&p->length, h + 16, 8);
    if (memcmp(h, HV_MAGIC, 4) != 0 || version != pc->version)
        return fail(pc, "not an hv migration header (bad magic or version)");
    if (cmd != CMD_MEMORY && cmd != CMD_ZERO) {
        memcpy(pc->header, h, HV_HEADER);
        *done = 1;
        return 0;
    }
    if (flags || reserved)
        return fail(pc, "reserved header fields are not zero");
    if (p->length < 8)
        return fail(pc, "page message shorter than its range table");
    p->command = cmd;
    p->phase = 1;
    p->want = 8;
    p->got = 0;
    return 0;
}

static int take_table_head(struct hv_postcopy *pc, struct pc_priv *p)
{
    uint32_t n, pattern;
    memcpy(&n, p->head + HV_HEADER, 4);
    memcpy(&pattern, p->head + HV_HEADER + 4, 4);
    if (n == 0 || n > HV_PC_MAX_RANGES || pattern)
        return fail(pc, "page message: bad range table head");
    if (p->length < 8 + 16 * (uint64_t)n)
        return fail(pc, "page message shorter than its range table");
    p->nruns = n;
    p->phase = 2;
    p->want = 16 * (size_t)n;
    p->got = 0;
    return 0;
}

static int take_table(struct hv_postcopy *pc, struct pc_priv *p)
{
    uint64_t total = 0, end = 0;
    for (uint64_t i = 0; i < p->nruns; i++) {
        uint64_t s = p->table[2 * i], c = p->table[2 * i + 1];
        if (c == 0 || s >= pc->npages || c > pc->npages - s)
            return fail(pc, "page message: range outside guest memory");
        if (i && s < end)
            return fail(pc, "page message: ranges unsorted or overlapping");
        if (s < pc->hole_end && s + c > pc->hole_first)
            return fail(pc, "page message: range in the 32-bit hole");
        end = s + c;
        total += c;
    }
    uint64_t body = p->command == CMD_MEMORY ? total * pc->page_size : 0;
    if (total > HV_PC_MAX_PAGES && p->command == CMD_MEMORY)
        return fail(pc, "page message: more pages than a postcopy batch");
    if (p->length != 8 + 16 * p->nruns + body)
        return fail(pc, "page message: payload length does not match its table");
    p->npages = total;
    p->phase = 3;
    p->want = (size_t)body;
    p->got = 0;
    return 0;
}

/* Read what is there of the current message part; 1 when it is complete. */
static int read_part(struct hv_postcopy *pc, struct pc_priv *p)
{
    uint8_t *dst;
    switch (p->phase) {
    case 0: dst = p->head; break;
    case 1: dst = p->head + HV_HEADER; break;
    case 2: dst = (uint8_t *)p->table; break;
    default: dst = p->data; break;
    }
    while (p->got < p->want) {
        ssize_t r = recv(pc->sock, dst + p->got, p->want - p->got, MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return -errno;
        }
        if (r == 0)
            return -ECONNRESET;
        p->got += (size_t)r;
        pc->st.bytes_in += (uint64_t)r;
    }
    return 1;
}

int hv_postcopy_serve(struct hv_postcopy *pc)
{
    struct pc_priv *p = pc->priv;
    uint64_t last = hv_now_ns();
    pc->error[0] = 0;
    for (;;) {
        struct pollfd fds[3] = {
            { .fd = pc->uffd, .events = POLLIN },
            { .fd = pc->sock, .events = POLLIN },
            { .fd = pc->stop_fd, .events = POLLIN },
        };
        int wait = 1000;
        if (pc->timeout_ms >= 0) {
            uint64_t idle = (hv_now_ns() - last) / 1000000ull;
            if (idle >= (uint64_t)pc->timeout_ms)
                return -ETIMEDOUT;
            if ((uint64_t)pc->timeout_ms - idle < (uint64_t)wait)
                wait = (int)((uint64_t)pc->timeout_ms - idle);
        }
        int r = poll(fds, pc->stop_fd >= 0 ? 3 : 2, wait);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (pc->stop_fd >= 0 && fds[2].revents)
            return -ECANCELED;
        if (fds[0].revents & POLLIN) {
            int e = serve_faults(pc);
            if (e)
                return e;
        }
        if (!(fds[1].revents & (POLLIN | POLLHUP | POLLERR)))
            continue;
        last = hv_now_ns();
        /* as much of the current message as there is; back to the faults
         * between the parts */
        int got = read_part(pc, p);
        if (got < 0)
            return got;
        if (got == 0)
            continue;
        int e = 0, done = 0;
        switch (p->phase) {
        case 0:
            e = take_header(pc, p, &done);
            break;
        case 1:
            e = take_table_head(pc, p);
            break;
        case 2:
            e = take_table(pc, p);
            if (!e && p->want == 0) {
                e = place_message(pc, p);
                p->phase = 0;
                p->want = HV_HEADER;
                p->got = 0;
            }
            break;
        default:
            e = place_message(pc, p);
            p->phase = 0;
            p->want = HV_HEADER;
            p->got = 0;
            break;
        }
        if (e)
            return e;
        if (done) {
            p->phase = 0;
            p->want = HV_HEADER;
            p->got = 0;
            return 0;
        }
    }
}

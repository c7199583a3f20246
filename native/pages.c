/* hv._pages: the per-page loops of live migration (see pages.h). */
#define _GNU_SOURCE
#include "pages.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif
#define HV_IOV_BATCH 1024
#ifdef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE_ MADV_POPULATE_WRITE
#else
#define MADV_POPULATE_WRITE_ 23   /* Linux 5.14 */
#endif

uint64_t hv_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------------------------------------- bitmaps */

uint64_t hv_bitmap_andnot(uint64_t *out, const uint64_t *a, const uint64_t *b, size_t nwords)
{
    uint64_t n = 0;
    for (size_t i = 0; i < nwords; i++) {
        uint64_t w = a[i] & ~b[i];
        out[i] = w;
        n += (uint64_t)__builtin_popcountll(w);
    }
    return n;
}

uint64_t hv_bitmap_or(uint64_t *out, const uint64_t *a, size_t nwords)
{
    uint64_t n = 0;
    for (size_t i = 0; i < nwords; i++) {
        uint64_t w = out[i] | a[i];
        out[i] = w;
        n += (uint64_t)__builtin_popcountll(w);
    }
    return n;
}

uint64_t hv_bitmap_count(const uint64_t *bm, size_t nwords)
{
    uint64_t n = 0;
    for (size_t i = 0; i < nwords; i++)
        n += (uint64_t)__builtin_popcountll(bm[i]);
    return n;
}

void hv_bitmap_trim(uint64_t *bm, size_t npages)
{
    if (npages % 64)
        bm[npages / 64] &= (1ull << (npages % 64)) - 1;
}

void hv_bitmap_set_range(uint64_t *bm, uint64_t start, uint64_t count)
{
    uint64_t p = start, end = start + count;
    while (p < end && (p % 64)) {
        bm[p / 64] |= 1ull << (p % 64);
        p++;
    }
    while (p + 64 <= end) {
        bm[p / 64] = ~0ull;
        p += 64;
    }
    while (p < end) {
        bm[p / 64] |= 1ull << (p % 64);
        p++;
    }
}

static void clear_range(uint64_t *bm, uint64_t start, uint64_t count)
{
    uint64_t p = start, end = start + count;
    while (p < end && (p % 64)) {
        bm[p / 64] &= ~(1ull << (p % 64));
        p++;
    }
    while (p + 64 <= end) {
        bm[p / 64] = 0;
        p += 64;
    }
    while (p < end) {
        bm[p / 64] &= ~(1ull << (p % 64));
        p++;
    }
}

void hv_bitmap_assign_ranges(uint64_t *bm, const uint64_t *starts, const uint64_t *counts,
                             size_t nruns, int value)
{
    for (size_t i = 0; i < nruns; i++) {
        if (value)
            hv_bitmap_set_range(bm, starts[i], counts[i]);
        else
            clear_range(bm, starts[i], counts[i]);
    }
}

/* First bit >= p whose value is `want`, or npages. */
static uint64_t next_bit(const uint64_t *bm, uint64_t p, uint64_t npages, int want)
{
    if (p >= npages)
        return npages;
    uint64_t w = p / 64;
    uint64_t nwords = (npages + 63) / 64;
    uint64_t word = want ? bm[w] : ~bm[w];
    word &= ~0ull << (p % 64);
    while (!word) {
        if (++w >= nwords)
            return npages;
        word = want ? bm[w] : ~bm[w];
    }
    uint64_t r = w * 64 + (uint64_t)__builtin_ctzll(word);
    return r < npages ? r : npages;
}

size_t hv_bitmap_runs(const uint64_t *bm, size_t npages, size_t *pos,
                      uint64_t *starts, uint64_t *counts, size_t max_runs,
                      uint64_t max_len)
{
    size_t n = 0;
    uint64_t p = *pos;
    while (n < max_runs) {
        p = next_bit(bm, p, npages, 1);
        if (p >= npages)
            break;
        uint64_t e = next_bit(bm, p, npages, 0);
        if (max_len && e - p > max_len)
            e = p + max_len;
        starts[n] = p;
        counts[n] = e - p;
        n++;
        p = e;
    }
    *pos = p < npages ? p : npages;
    return n;
}

/* ------------------------------------------------------------------ pages */

int hv_page_is_zero(const uint8_t *p, size_t page_size)
{
    const uint64_t *w = (const uint64_t *)p;
    size_t n = page_size / 8;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7])
            return 0;
    }
    for (; i < n; i++)
        if (w[i])
            return 0;
    return 1;
}

uint64_t hv_classify_pages(const uint8_t *mem, size_t page_size, const uint64_t *bm,
                           size_t npages, uint64_t *data_out, uint64_t *zero_out)
{
    size_t nwords = (npages + 63) / 64;
    uint64_t zeros = 0;
    for (size_t w = 0; w < nwords; w++) {
        uint64_t word = bm[w], data = 0, zero = 0;
        if (w == nwords - 1 && (npages % 64))
            word &= (1ull << (npages % 64)) - 1;
        while (word) {
            unsigned b = (unsigned)__builtin_ctzll(word);
            word &= word - 1;
            uint64_t pfn = (uint64_t)w * 64 + b;
            if (hv_page_is_zero(mem + pfn * page_size, page_size)) {
                zero |= 1ull << b;
                zeros++;
            } else {
                data |= 1ull << b;
            }
        }
        data_out[w] = data;
        zero_out[w] = zero;
    }
    return zeros;
}

static int add_run(uint64_t *s, uint64_t *c, size_t *n, size_t room, uint64_t pfn)
{
    if (*n && s[*n - 1] + c[*n - 1] == pfn) {
        c[*n - 1]++;
        return 0;
    }
    if (*n >= room)
        return -ENOSPC;
    s[*n] = pfn;
    c[*n] = 1;
    (*n)++;
    return 0;
}

int64_t hv_split_zero_runs(const uint8_t *mem, size_t page_size, const uint64_t *starts,
                           const uint64_t *counts, size_t nruns, uint64_t *zs, uint64_t *zc,
                           size_t *nzero, uint64_t *ds, uint64_t *dc, size_t *ndata,
                           size_t room)
{
    int64_t zeros = 0;
    *nzero = *ndata = 0;
    for (size_t i = 0; i < nruns; i++) {
        for (uint64_t p = starts[i]; p < starts[i] + counts[i]; p++) {
            int z = hv_page_is_zero(mem + p * page_size, page_size);
            int e = z ? add_run(zs, zc, nzero, room, p) : add_run(ds, dc, ndata, room, p);
            if (e)
                return e;
            zeros += z;
        }
    }
    return zeros;
}

int hv_ranges_valid(const uint64_t *starts, const uint64_t *counts, size_t nruns,
                    uint64_t npages)
{
    for (size_t i = 0; i < nruns; i++) {
        if (counts[i] == 0 || starts[i] >= npages || counts[i] > npages - starts[i])
            return 0;
    }
    return 1;
}

int hv_fill_ranges(uint8_t *mem, size_t mem_size, size_t page_size,
                   const uint64_t *starts, const uint64_t *counts, size_t nruns,
                   uint32_t pattern, int discard)
{
    if (!hv_ranges_valid(starts, counts, nruns, mem_size / page_size))
        return -ERANGE;
    uint8_t b = (uint8_t)pattern;
    int bytewise = pattern == (uint32_t)b * 0x01010101u;
    uint64_t pat64 = (uint64_t)pattern | ((uint64_t)pattern << 32);
    for (size_t i = 0; i < nruns; i++) {
        uint8_t *p = mem + starts[i] * page_size;
        size_t len = counts[i] * page_size;
        if (pattern == 0 && discard && madvise(p, len, MADV_DONTNEED) == 0)
            continue;
        if (bytewise) {
            memset(p, b, len);
        } else {
            uint64_t *w = (uint64_t *)p;
            for (size_t j = 0; j < len / 8; j++)
                w[j] = pat64;
        }
    }
    return 0;
}

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t fmix(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

uint64_t hv_hash_page(const uint8_t *p, size_t page_size)
{
    const uint64_t K1 = 0x9e3779b97f4a7c15ull, K2 = 0xc2b2ae3d27d4eb4full;
    const uint64_t *w = (const uint64_t *)p;
    size_t n = page_size / 8;
    uint64_t a = K1, b = K2, c = K1 ^ 1, d = K2 ^ 2;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        a = rotl(a ^ (w[i] * K2), 31) * K1;
        b = rotl(b ^ (w[i + 1] * K2), 31) * K1;
        c = rotl(c ^ (w[i + 2] * K2), 31) * K1;
        d = rotl(d ^ (w[i + 3] * K2), 31) * K1;
    }
    for (; i < n; i++)
        a = rotl(a ^ (w[i] * K2), 31) * K1;
    return fmix(a ^ rotl(b, 17) ^ rotl(c, 34) ^ rotl(d, 51) ^ page_size);
}

void hv_page_hashes(const uint8_t *mem, size_t page_size, const uint64_t *starts,
                    const uint64_t *counts, size_t nruns, uint64_t *out)
{
    size_t k = 0;
    for (size_t i = 0; i < nruns; i++)
        for (uint64_t j = 0; j < counts[i]; j++)
            out[k++] = hv_hash_page(mem + (starts[i] + j) * page_size, page_size);
}

/* ---------------------------------------------------------------- sockets */

/* Wait until the fd is ready (after EAGAIN on a non-blocking fd). */
static int wait_fd(int fd, short events, int timeout_ms)
{
    struct pollfd pfd = { .fd = fd, .events = events };
    for (;;) {
        int r = poll(&pfd, 1, timeout_ms);
        if (r > 0)
            return 0;
        if (r == 0)
            return -ETIMEDOUT;
        if (errno != EINTR)
            return -errno;
    }
}

static void rate_wait(struct hv_rate *rate, size_t nbytes)
{
    if (!rate || !rate->bytes_per_sec)
        return;
    uint64_t now = hv_now_ns();
    if (!rate->start_ns)
        rate->start_ns = now;
    /* Idle for a while (between rounds): do not let the saved-up budget
     * turn into a burst above the limit; restart the schedule from now. */
    long double sched = (long double)rate->bytes * 1e9L / (long double)rate->bytes_per_sec;
    if (now > rate->start_ns + (uint64_t)sched + 20000000ull) {
        rate->start_ns = now;
        rate->bytes = 0;
    }
    rate->bytes += nbytes;
    /* Time at which rate->bytes are due at the allowed rate. */
    long double due = (long double)rate->bytes * 1e9L / (long double)rate->bytes_per_sec;
    uint64_t target = rate->start_ns + (uint64_t)due;
    if (target > now) {
        uint64_t d = target - now;
        struct timespec ts = { .tv_sec = (time_t)(d / 1000000000ull),
                               .tv_nsec = (long)(d % 1000000000ull) };
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
        rate->slept_ns += d;
    }
}

/* sendmsg(MSG_NOSIGNAL) so that a closed peer gives EPIPE, not SIGPIPE;
 * writev for fds that are not sockets. */
static ssize_t send_iov(int fd, struct iovec *iov, int cnt)
{
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)cnt;
    ssize_t r = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (r < 0 && errno == ENOTSOCK)
        r = writev(fd, iov, cnt);
    return r;
}

/* Step over n transferred bytes of iov[0..cnt): drop the vectors done, trim
 * the one partly done. */
static void iov_advance(struct iovec **iovp, int *cntp, size_t n)
{
    struct iovec *iov = *iovp;
    int cnt = *cntp;
    while (cnt > 0 && n >= iov->iov_len) {
        n -= iov->iov_len;
        iov++;
        cnt--;
    }
    if (cnt > 0 && n) {
        iov->iov_base = (uint8_t *)iov->iov_base + n;
        iov->iov_len -= n;
    }
    *iovp = iov;
    *cntp = cnt;
}

/* Write all of iov[0..cnt), advancing over partial writes. */
static int writev_all(int fd, struct iovec *iov, int cnt, uint64_t *sent, int timeout_ms)
{
    while (cnt > 0) {
        ssize_t r = send_iov(fd, iov, cnt);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int e = wait_fd(fd, POLLOUT, timeout_ms);
                if (e)
                    return e;
                continue;
            }
            return -errno;
        }
        if (sent)
            *sent += (uint64_t)r;
        iov_advance(&iov, &cnt, (size_t)r);
    }
    return 0;
}

static int readv_all(int fd, struct iovec *iov, int cnt, uint64_t *got, int timeout_ms)
{
    while (cnt > 0) {
        ssize_t r = readv(fd, iov, cnt);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int e = wait_fd(fd, POLLIN, timeout_ms);
                if (e)
                    return e;
                continue;
            }
            return -errno;
        }
        if (r == 0)
            return -EPIPE;          /* the peer closed the stream early */
        if (got)
            *got += (uint64_t)r;
        iov_advance(&iov, &cnt, (size_t)r);
    }
    return 0;
}

int hv_send_all(int fd, const uint8_t *buf, size_t len, struct hv_rate *rate, int timeout_ms)
{
    uint64_t sent = 0;
    size_t chunk = len;
    if (rate && rate->bytes_per_sec) {
        chunk = (size_t)(rate->bytes_per_sec / 50);
        if (chunk < 65536)
            chunk = 65536;
    }
    size_t off = 0;
    while (off < len) {
        size_t n = len - off < chunk ? len - off : chunk;
        rate_wait(rate, n);
        struct iovec iov = { .iov_base = (void *)(buf + off), .iov_len = n };
        int e = writev_all(fd, &iov, 1, &sent, timeout_ms);
        if (e)
            return e;
        off += n;
    }
    return 0;
}

int hv_send_pages(int fd, const uint8_t *mem, size_t mem_size, size_t page_size,
                  const uint64_t *starts, const uint64_t *counts, size_t nruns,
                  struct hv_rate *rate, uint64_t *sent, int timeout_ms)
{
    if (!hv_ranges_valid(starts, counts, nruns, mem_size / page_size))
        return -ERANGE;
    if (rate && rate->bytes_per_sec) {
        for (size_t i = 0; i < nruns; i++) {
            uint64_t before = *sent;
            int e = hv_send_all(fd, mem + starts[i] * page_size, counts[i] * page_size, rate, timeout_ms);
            *sent = before + counts[i] * page_size;
            if (e)
                return e;
        }
        return 0;
    }
    struct iovec iov[HV_IOV_BATCH];
    size_t i = 0;
    while (i < nruns) {
        int cnt = 0;
        for (; i < nruns && cnt < HV_IOV_BATCH; i++, cnt++) {
            iov[cnt].iov_base = (void *)(mem + starts[i] * page_size);
            iov[cnt].iov_len = counts[i] * page_size;
        }
        int e = writev_all(fd, iov, cnt, sent, timeout_ms);
        if (e)
            return e;
    }
    return 0;
}

int hv_recv_all(int fd, uint8_t *buf, size_t len, uint64_t *got, int timeout_ms)
{
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    if (!len)
        return 0;
    return readv_all(fd, &iov, 1, got, timeout_ms);
}

int hv_recv_pages(int fd, uint8_t *mem, size_t mem_size, size_t page_size,
                  const uint64_t *starts, const uint64_t *counts, size_t nruns,
                  uint64_t *got, int timeout_ms)
{
    if (!hv_ranges_valid(starts, counts, nruns, mem_size / page_size))
        return -ERANGE;
    struct iovec iov[HV_IOV_BATCH];
    size_t i = 0;
    while (i < nruns) {
        int cnt = 0;
        for (; i < nruns && cnt < HV_IOV_BATCH; i++, cnt++) {
            iov[cnt].iov_base = mem + starts[i] * page_size;
            iov[cnt].iov_len = counts[i] * page_size;
            /* Fault the destination pages in one call instead of one fault
             * per page during the copy (fresh guest memory); best effort. */
            if (iov[cnt].iov_len >= 16 * page_size)
                madvise(iov[cnt].iov_base, iov[cnt].iov_len, MADV_POPULATE_WRITE_);
        }
        int e = readv_all(fd, iov, cnt, got, timeout_ms);
        if (e)
            return e;
    }
    return 0;
}

/* hv._pages: the per-page loops of live migration.
 *
 * Everything works on raw guest memory (a host pointer to guest physical
 * address 0) and on bitmaps in KVM's layout: little-endian uint64 words, bit
 * (p % 64) of word (p / 64) stands for page frame p. Ranges are (start pfn,
 * page count) pairs held in two parallel uint64 arrays.
 *
 * Functions that do I/O return 0 or a negative errno; they never raise and
 * never call back into Python, so cffi releases the GIL around them.
 */
#ifndef HV_PAGES_H
#define HV_PAGES_H

#include <stddef.h>
#include <stdint.h>

/* Token bucket for max_bandwidth: bytes_per_sec 0 means unlimited. */
struct hv_rate {
    uint64_t bytes_per_sec;
    uint64_t start_ns;     /* set on first use when 0 */
    uint64_t bytes;        /* sent since start_ns */
    uint64_t slept_ns;     /* statistics: time spent waiting */
};

/* Bitmaps ------------------------------------------------------------- */
/* out = a & ~b over nwords words; returns the number of bits set in out. */
uint64_t hv_bitmap_andnot(uint64_t *out, const uint64_t *a, const uint64_t *b, size_t nwords);
/* out |= a; returns the number of bits set in out afterwards. */
uint64_t hv_bitmap_or(uint64_t *out, const uint64_t *a, size_t nwords);
uint64_t hv_bitmap_count(const uint64_t *bm, size_t nwords);
/* Clear the bits past npages in the last word. */
void hv_bitmap_trim(uint64_t *bm, size_t npages);
/* Set bits [start, start+count). */
void hv_bitmap_set_range(uint64_t *bm, uint64_t start, uint64_t count);
/* Set (value 1) or clear (value 0) the bits of every range. */
void hv_bitmap_assign_ranges(uint64_t *bm, const uint64_t *starts, const uint64_t *counts,
                             size_t nruns, int value);

/* Scan bitmap bits [*pos, npages) into runs of set bits, each at most
 * max_len pages long (0 = unlimited), until max_runs runs are found.
 * Returns the number of runs written; *pos is where the scan stopped (npages
 * when done), so a caller can build tables chunk by chunk. */
size_t hv_bitmap_runs(const uint64_t *bm, size_t npages, size_t *pos,
                      uint64_t *starts, uint64_t *counts, size_t max_runs,
                      uint64_t max_len);

/* Pages -------------------------------------------------------------- */
/* 1 if the page_size bytes at p are all zero (word-wise, early exit). */
int hv_page_is_zero(const uint8_t *p, size_t page_size);
/* For every page set in bm: set it in zero_out if it reads as all zero,
 * else in data_out (both bitmaps are overwritten, nwords of npages).
 * Returns the number of zero pages. */
uint64_t hv_classify_pages(const uint8_t *mem, size_t page_size, const uint64_t *bm,
                           size_t npages, uint64_t *data_out, uint64_t *zero_out);
/* Split the pages of the ranges, in order, into runs of zero pages
 * (zs, zc: *nzero runs) and runs of pages with data (ds, dc: *ndata runs);
 * each output has room for `room` runs (the pages of the ranges always
 * fit). Returns the number of zero pages, or -ENOSPC. */
int64_t hv_split_zero_runs(const uint8_t *mem, size_t page_size, const uint64_t *starts,
                           const uint64_t *counts, size_t nruns, uint64_t *zs, uint64_t *zc,
                           size_t *nzero, uint64_t *ds, uint64_t *dc, size_t *ndata,
                           size_t room);
/* Fill the ranges with a 32-bit pattern repeated (little-endian). With
 * pattern 0 and discard set, the pages are dropped with MADV_DONTNEED
 * instead (they read as zero, and a fresh destination stays unallocated).
 * Returns 0 or -errno. */
int hv_fill_ranges(uint8_t *mem, size_t mem_size, size_t page_size,
                   const uint64_t *starts, const uint64_t *counts, size_t nruns,
                   uint32_t pattern, int discard);
/* 64-bit hash of each page in the ranges, in order, into out. */
void hv_page_hashes(const uint8_t *mem, size_t page_size, const uint64_t *starts,
                    const uint64_t *counts, size_t nruns, uint64_t *out);
uint64_t hv_hash_page(const uint8_t *p, size_t page_size);

/* Sockets ------------------------------------------------------------
 * The fd may be blocking or not: on EAGAIN the functions poll() for at most
 * timeout_ms (-1: forever) and fail with -ETIMEDOUT after that. */
/* Write len bytes from buf to fd (loops over partial writes and EINTR). */
int hv_send_all(int fd, const uint8_t *buf, size_t len, struct hv_rate *rate,
                int timeout_ms);
/* Send the pages of the ranges straight from guest memory with writev,
 * up to IOV_MAX ranges per call, in the order of the table. *sent counts the
 * bytes written (also on error). rate may be NULL. Returns 0 or -errno. */
int hv_send_pages(int fd, const uint8_t *mem, size_t mem_size, size_t page_size,
                  const uint64_t *starts, const uint64_t *counts, size_t nruns,
                  struct hv_rate *rate, uint64_t *sent, int timeout_ms);
/* Read exactly len bytes into buf. Returns 0, -errno, or -EPIPE when the
 * peer closed the stream early (*got says how many bytes arrived). */
int hv_recv_all(int fd, uint8_t *buf, size_t len, uint64_t *got, int timeout_ms);
/* Receive the pages of the ranges straight into guest memory with readv.
 * Ranges must lie inside [0, mem_size) (checked: -ERANGE). */
int hv_recv_pages(int fd, uint8_t *mem, size_t mem_size, size_t page_size,
                  const uint64_t *starts, const uint64_t *counts, size_t nruns,
                  uint64_t *got, int timeout_ms);
/* Check that every range lies inside npages pages and does not overflow. */
int hv_ranges_valid(const uint64_t *starts, const uint64_t *counts, size_t nruns,
                    uint64_t npages);

uint64_t hv_now_ns(void);

/* Compression (native/compress.c, libzstd) ------------------------------
 * A context per connection: compression at `level` and decompression with
 * a bounded window. NULL when out of memory or the level is refused. */
struct hv_zstd;
struct hv_zstd *hv_zstd_new(int level);
void hv_zstd_free(struct hv_zstd *z);
/* The most bytes hv_zstd_compress_ranges writes for len bytes of pages. */
size_t hv_zstd_bound(size_t len);
/* The pages of the ranges, copied first (the guest may write them meanwhile),
 * as one zstd frame in out (cap bytes, at least hv_zstd_bound of their
 * size). Returns the frame's length or -errno. */
int64_t hv_zstd_compress_ranges(struct hv_zstd *z, const uint8_t *mem, size_t mem_size,
                                size_t page_size, const uint64_t *starts,
                                const uint64_t *counts, size_t nruns,
                                uint8_t *out, size_t cap);
/* Decompress one frame of in_len bytes straight into the ranges of guest
 * memory; -EBADMSG unless it is a valid frame of exactly their size. */
int hv_zstd_decompress_ranges(struct hv_zstd *z, uint8_t *mem, size_t mem_size,
                              size_t page_size, const uint64_t *starts,
                              const uint64_t *counts, size_t nruns,
                              const uint8_t *in, size_t in_len);

#endif

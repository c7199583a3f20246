/* hv._pages: zstd compression of page batches for the migration stream (see
 * pages.h). One context per connection, reused across batches; the source
 * compresses a copy of the ranges' pages as one frame, the destination decompresses a
 * frame straight into the ranges of guest memory. Nothing here trusts the
 * frame: a frame that yields more or fewer bytes than its ranges hold, fails
 * its content checksum, or asks for a larger window than
 * HV_ZSTD_WINDOW_LOG_MAX, is refused. */
#include "pages.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>
#include <zstd_errors.h>

/* 16 MiB: the most a destination holds for one frame's window. */
#define HV_ZSTD_WINDOW_LOG_MAX 24

struct hv_zstd {
    ZSTD_CCtx *c;
    ZSTD_DCtx *d;
    uint8_t *copy;      /* the batch as it was when compression began */
    size_t copy_cap;
};

struct hv_zstd *hv_zstd_new(int level)
{
    struct hv_zstd *z = calloc(1, sizeof(*z));
    if (!z)
        return NULL;
    z->c = ZSTD_createCCtx();
    z->d = ZSTD_createDCtx();
    if (!z->c || !z->d
        || ZSTD_isError(ZSTD_CCtx_setParameter(z->c, ZSTD_c_compressionLevel, level))
        /* a checksum in every frame: a flipped byte in a stored block is
         * otherwise not noticed by the decompressor */
        || ZSTD_isError(ZSTD_CCtx_setParameter(z->c, ZSTD_c_checksumFlag, 1))
        || ZSTD_isError(ZSTD_DCtx_setParameter(z->d, ZSTD_d_windowLogMax,
                                               HV_ZSTD_WINDOW_LOG_MAX))) {
        hv_zstd_free(z);
        return NULL;
    }
    return z;
}

void hv_zstd_free(struct hv_zstd *z)
{
    if (!z)
        return;
    ZSTD_freeCCtx(z->c);
    ZSTD_freeDCtx(z->d);
    free(z->copy);
    free(z);
}

size_t hv_zstd_bound(size_t len)
{
    /* one-shot compression of len bytes, and a margin */
    return ZSTD_compressBound(len) + 64;
}

int64_t hv_zstd_compress_ranges(struct hv_zstd *z, const uint8_t *mem, size_t mem_size,
                                size_t page_size, const uint64_t *starts,
                                const uint64_t *counts, size_t nruns,
                                uint8_t *out, size_t cap)
{
    if (!hv_ranges_valid(starts, counts, nruns, mem_size / page_size))
        return -ERANGE;
    uint64_t total = 0;
    for (size_t i = 0; i < nruns; i++)
        total += counts[i] * page_size;
    /* The guest runs on while its pages are compressed: zstd reads its input
     * more than once (matching, literals, the checksum), so it compresses a
     * copy, or a page written meanwhile would make a frame that fails its
     * own checksum. A page written after the copy is in the dirty log. */
    if (total > z->copy_cap) {
        uint8_t *bigger = realloc(z->copy, total);
        if (!bigger)
            return -ENOMEM;
        z->copy = bigger;
        z->copy_cap = total;
    }
    uint8_t *p = z->copy;
    for (size_t i = 0; i < nruns; i++) {
        memcpy(p, mem + starts[i] * page_size, counts[i] * page_size);
        p += counts[i] * page_size;
    }
    size_t n = ZSTD_compress2(z->c, out, cap, z->copy, total);
    if (ZSTD_isError(n))
        return ZSTD_getErrorCode(n) == ZSTD_error_dstSize_tooSmall ? -ENOSPC : -EIO;
    return (int64_t)n;
}

int hv_zstd_decompress_ranges(struct hv_zstd *z, uint8_t *mem, size_t mem_size,
                              size_t page_size, const uint64_t *starts,
                              const uint64_t *counts, size_t nruns,
                              const uint8_t *in, size_t in_len)
{
    if (!hv_ranges_valid(starts, counts, nruns, mem_size / page_size))
        return -ERANGE;
    if (ZSTD_isError(ZSTD_DCtx_reset(z->d, ZSTD_reset_session_only)))
        return -EIO;
    ZSTD_inBuffer ib = {in, in_len, 0};
    size_t left = 1;
    for (size_t i = 0; i < nruns; i++) {
        ZSTD_outBuffer ob = {mem + starts[i] * page_size, counts[i] * page_size, 0};
        while (ob.pos < ob.size) {
            size_t in_was = ib.pos, out_was = ob.pos;
            left = ZSTD_decompressStream(z->d, &ob, &ib);
            if (ZSTD_isError(left))
                return -EBADMSG;
            if (left == 0 && ob.pos < ob.size)
                return -EBADMSG;      /* the frame ended before the ranges did */
            if (ib.pos == in_was && ob.pos == out_was)
                return -EBADMSG;      /* truncated: no input left to make progress */
        }
    }
    if (left != 0) {
        /* The ranges are full: the frame must end here, with nothing more. */
        uint8_t spare;
        ZSTD_outBuffer ob = {&spare, 1, 0};
        left = ZSTD_decompressStream(z->d, &ob, &ib);
        if (ZSTD_isError(left) || left != 0 || ob.pos != 0)
            return -EBADMSG;
    }
    return ib.pos == ib.size ? 0 : -EBADMSG;
}

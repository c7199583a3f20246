/* hv._pages: zstd compression of page batches for the migration stream (see
 * pages.h). One context per connection, reused across batches; the source
 * compresses the ranges' pages as one frame, the destination decompresses a
 * frame straight into the ranges of guest memory. Nothing here trusts the
 * frame: a frame that yields more or fewer bytes than its ranges hold, fails
 * its content checksum, or asks for a larger window than
 * HV_ZSTD_WINDOW_LOG_MAX, is refused. */
#include "pages.h"

#include <errno.h>
#include <stdlib.h>
#include <zstd.h>

/* 16 MiB: the most a destination holds for one frame's window. */
#define HV_ZSTD_WINDOW_LOG_MAX 24

struct hv_zstd {
    ZSTD_CCtx *c;
    ZSTD_DCtx *d;
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
    free(z);
}

size_t hv_zstd_bound(size_t len)
{
    /* ZSTD_compressBound is for one-shot compression; streaming adds at most
     * a block header per 128 KiB block on top, covered by the margin. */
    return ZSTD_compressBound(len) + len / (128 << 10) * 8 + 64;
}

int64_t hv_zstd_compress_ranges(struct hv_zstd *z, const uint8_t *mem, size_t mem_size,
                                size_t page_size, const uint64_t *starts,
                                const uint64_t *counts, size_t nruns,
                                uint8_t *out, size_t cap)
{
    if (!hv_ranges_valid(starts, counts, nruns, mem_size / page_size))
        return -ERANGE;
    if (ZSTD_isError(ZSTD_CCtx_reset(z->c, ZSTD_reset_session_only)))
        return -EIO;
    uint64_t total = 0;
    for (size_t i = 0; i < nruns; i++)
        total += counts[i] * page_size;
    ZSTD_CCtx_setPledgedSrcSize(z->c, total);
    ZSTD_outBuffer ob = {out, cap, 0};
    for (size_t i = 0; i < nruns; i++) {
        ZSTD_inBuffer ib = {mem + starts[i] * page_size, counts[i] * page_size, 0};
        ZSTD_EndDirective mode = i + 1 == nruns ? ZSTD_e_end : ZSTD_e_continue;
        for (;;) {
            size_t left = ZSTD_compressStream2(z->c, &ob, &ib, mode);
            if (ZSTD_isError(left))
                return -EIO;
            if (mode == ZSTD_e_end ? left == 0 : ib.pos == ib.size)
                break;
            if (ob.pos == ob.size)
                return -ENOSPC;
        }
    }
    return (int64_t)ob.pos;
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

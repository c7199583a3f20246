/* hv._pages, postcopy part: the destination's userfaultfd page server.
 *
 * After the switch to postcopy the destination's guest RAM is registered
 * with userfaultfd (MISSING mode): a page that has not arrived yet is not
 * mapped, and any touch of it (a vCPU in KVM_RUN, a device thread of the
 * VMM, the kernel on the VMM's behalf) waits in the kernel while the uffd
 * reports the fault. hv_postcopy_serve() is the loop that serves those
 * faults: it reads fault events, asks the source for the missing pages (a
 * REQUEST message on the migration connection, the return path), and places
 * the pages that arrive on the same connection (MEMORY and ZERO messages of
 * hv's protocol, requested or pushed in the background) with UFFDIO_COPY
 * and UFFDIO_ZEROPAGE, whole ranges per call. It runs without the GIL and
 * never calls back into Python, so a Python thread that faults while holding
 * the GIL is served too.
 *
 * The loop reads the connection without blocking and never past the end of
 * a message; at the first message that is not pages it stops and leaves the
 * message's 24-byte header in pc->header (the caller reads the payload).
 * All writes on the connection while a hv_postcopy exists go through
 * hv_postcopy_write(), which serialises them with the loop's requests.
 */
#ifndef HV_POSTCOPY_H
#define HV_POSTCOPY_H

#include <stddef.h>
#include <stdint.h>

/* The largest page message the loop takes (the source sends smaller). */
#define HV_PC_MAX_RANGES 1024
#define HV_PC_MAX_PAGES 1024

struct hv_postcopy_stats {
    uint64_t faults;          /* fault events read from the uffd */
    uint64_t requests;        /* pages asked of the source */
    uint64_t request_msgs;    /* REQUEST messages sent */
    uint64_t placed;          /* pages placed with UFFDIO_COPY */
    uint64_t zero_placed;     /* pages placed with UFFDIO_ZEROPAGE (ZERO messages) */
    uint64_t duplicates;      /* pages that arrived when already placed (skipped) */
    uint64_t refaults;        /* faults on pages counted placed but not mapped (zero or
                                 free at the switch, or discarded since): zero page */
    uint64_t bytes_in;        /* bytes read from the connection */
    uint64_t messages;        /* page messages read */
    uint64_t latency_count;   /* requested pages placed */
    uint64_t latency_sum_ns;  /* their fault-to-placement times */
    uint64_t latency_max_ns;
};

struct hv_postcopy {
    int uffd;                 /* userfaultfd, RAM registered (MISSING) */
    int sock;                 /* the migration connection (either blocking mode) */
    int stop_fd;              /* readable: stop (-ECANCELED); -1: none */
    int timeout_ms;           /* nothing from the source this long: -ETIMEDOUT */
    uint8_t *mem;             /* host address of guest physical address 0 */
    uint64_t page_size;
    uint16_t version;         /* hv.migration.protocol.VERSION: written in each
                                 header, expected in each header read */
    uint64_t npages;          /* pages from GPA 0 to the end of RAM */
    uint64_t hole_first;      /* pfns [hole_first, hole_end) are not RAM */
    uint64_t hole_end;
    uint64_t *placed;         /* bitmap: the page holds its latest contents */
    uint64_t *requested;      /* bitmap: the page was asked of the source */
    uint64_t *req_ns;         /* per page: when it was asked (0: not waiting) */
    uint64_t *hashes;         /* per page: hash of what was placed, or NULL */
    uint64_t missing;         /* RAM pages not placed yet */
    uint8_t header[24];       /* out: the header of the message that ended the loop */
    char error[160];          /* out: what was wrong with the stream (-EPROTO) */
    struct hv_postcopy_stats st;
    void *priv;               /* hv_postcopy_init / hv_postcopy_free */
};

/* A userfaultfd (O_CLOEXEC | O_NONBLOCK) with the API handshake done, or
 * -errno. Faults from kernel mode (KVM's) are reported too, so this needs
 * the privilege for that (root, or vm.unprivileged_userfaultfd=1). */
int hv_uffd_open(void);
/* Register [addr, addr+len) in MISSING mode; -ENOTSUP when the range does
 * not offer UFFDIO_COPY and UFFDIO_ZEROPAGE. */
int hv_uffd_register(int uffd, uint8_t *addr, uint64_t len);
int hv_uffd_unregister(int uffd, uint8_t *addr, uint64_t len);
/* Wake the threads waiting on a fault in [addr, addr+len) without placing
 * anything: each retries its access (and faults again if the page is
 * still missing; a vCPU with a signal pending leaves KVM_RUN first). */
int hv_uffd_wake(int uffd, uint8_t *addr, uint64_t len);
/* Drop the pages of the ranges (MADV_DONTNEED): registered, they are
 * missing afterwards and fault to the uffd. 0 or -errno. */
int hv_discard_ranges(uint8_t *mem, size_t page_size, const uint64_t *starts,
                      const uint64_t *counts, size_t nruns);

/* Set up / release the loop's private part (buffers, the write lock). */
int hv_postcopy_init(struct hv_postcopy *pc);
void hv_postcopy_free(struct hv_postcopy *pc);
/* Serve faults and place arriving pages until a message that is not MEMORY
 * or ZERO arrives (0, its header in pc->header), or an error: -ECONNRESET
 * (the source closed), -ETIMEDOUT, -ECANCELED (stop_fd), -EPROTO
 * (pc->error says what), or another -errno. May be called again after 0. */
int hv_postcopy_serve(struct hv_postcopy *pc);
/* Write len bytes on pc->sock under the loop's write lock. 0 or -errno. */
int hv_postcopy_write(struct hv_postcopy *pc, const uint8_t *buf, size_t len);

#endif

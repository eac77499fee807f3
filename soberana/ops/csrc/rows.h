/* Rows of work shared among torch's OpenMP threads (through GOMP_parallel, whose address
 * ops/cpu/kernels.py passes in): the kernels of cpu_layers.c and encoder_layers.c. Threads
 * claim chunks of rows from one counter, so a thread the OS preempts holds up only its chunk.
 * Included by those kernels (the build cache key in ops/cpu/kernels.py covers this header). */
#ifndef SOBERANA_ROWS_H
#define SOBERANA_ROWS_H

#include <stdint.h>
#include <stdlib.h>

typedef void (*GompParallel)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);

typedef struct Rows {
    void (*fn)(void *args, int64_t row);
    void *args;
    int64_t rows;
    int64_t next; /* the first unclaimed chunk of rows */
    int64_t chunk;
} Rows;

static void rows_worker(void *arg) {
    Rows *r = arg;
    for (;;) {
        const int64_t start = __atomic_fetch_add(&r->next, r->chunk, __ATOMIC_RELAXED);
        if (start >= r->rows) return;
        const int64_t end = start + r->chunk < r->rows ? start + r->chunk : r->rows;
        for (int64_t i = start; i < end; i++) r->fn(r->args, i);
    }
}

/* fn(args, row) for every row; on `threads` of torch's OpenMP team when each thread gets at
 * least `min_per_thread` elements' worth (a parallel region costs a few microseconds). */
static void for_rows(void (*fn)(void *, int64_t), void *args, int64_t rows, int64_t row_elems,
                     int threads, void *gomp_parallel) {
    const int64_t min_per_thread = 32768;
    int64_t useful = rows * row_elems / min_per_thread;
    if (useful < threads) threads = useful < 1 ? 1 : (int)useful;
    if (threads > rows) threads = (int)rows;
    Rows r = {fn, args, rows, 0, 1};
    if (threads <= 1 || gomp_parallel == NULL) {
        for (int64_t i = 0; i < rows; i++) fn(args, i);
        return;
    }
    r.chunk = rows / (threads * 4) > 1 ? rows / (threads * 4) : 1;
    ((GompParallel)gomp_parallel)(rows_worker, &r, (unsigned)threads, 0);
}

/* A thread's scratch of at least `bytes` (64-byte aligned): the buffer *buf (a __thread
 * variable of the caller's, with its *capacity), grown as needed and kept for the next call.
 * NULL when out of memory. */
static inline void *thread_scratch(void **buf, int64_t *capacity, int64_t bytes) {
    if (bytes > *capacity) {
        free(*buf);
        *buf = aligned_alloc(64, (size_t)(bytes + 63) / 64 * 64);
        *capacity = *buf != NULL ? bytes : 0;
    }
    return *buf;
}

#endif

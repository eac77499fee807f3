/* Linear layers in bfloat16 on CPUs with AVX512_BF16: out = x W^T (+ bias), float32 sums.
 *
 * Built and called by soberana/ops/cpu/kernels.py (plain C, compiled at first use). The
 * weight is packed once (pack_bf16) into panels of 64 output columns, each the K / 2 pairs
 * of its columns, [K / 2][64][2]: the order vdpbf16ps multiplies them in. A tile of MR = 6
 * rows of x times one panel keeps its 6 x 64 sums in 24 registers; each pair of x's columns
 * is broadcast once per row and meets four 16-column vectors of the panel. A thread sweeps a
 * chunk of x's rows (MC_BYTES) through a panel while the panel stays in L2, asks for the next
 * panel (from memory) during its first tiles, and takes the chunk through all its panels
 * before the next chunk.
 *
 * Measured on a 2-core Zen 4 (AVX512_BF16, ~450 GFLOP/s at 1 vdpbf16ps per cycle per core)
 * against oneDNN's packed matmul, which PyTorch uses, alternating through a 125M model's 12
 * layers and head with the weights coming from memory (benchmarks/cpu_linear_ab.py): 1 row
 * (batch-1 decode) 0.72x the time, 64 rows (a decode step) 0.97x at ~390 GFLOP/s, 2,048
 * rows 0.98-1.03x. The sums run in a different order from oneDNN's, so about 1 output in
 * 10,000 differs by one bfloat16 ulp.
 *
 * Rows are shared among torch's OpenMP threads (through GOMP_parallel): panels split among
 * them, or, with fewer panels than threads, rows. Each output is summed by one thread in one
 * order whatever the thread count.
 */
#include <stdint.h>
#include <string.h>

#include "dtypes.h"
#include "simd.h"

enum { OK = 0, UNSUPPORTED = 1 };
#define NB 64 /* output columns per panel */
#define MR 6  /* rows of x per tile */
/* Bytes of x's rows a thread takes through its panels at a time: half of a 1 MB L2, so they
 * stay there while the panels stream past (without it, 8,192 rows ran ~10% slower than
 * oneDNN; with it, the same or faster). */
#define MC_BYTES (512 << 10)

/* Which kernel this build has: 1 AVX512_BF16, 2 AVX2 + FMA (bfloat16 widened to float32 in
 * registers), 0 none. */
int linear_bf16_available(void) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    return 1;
#elif defined(SOBERANA_AVX2)
    return 2;
#else
    return 0;
#endif
}

#if (defined(__AVX512F__) && defined(__AVX512BF16__)) || defined(SOBERANA_AVX2)
#define HAVE_BF16_KERNEL 1
#endif
#if defined(__AVX512F__) || defined(SOBERANA_AVX2)
#define HAVE_KERNEL 1 /* the float32 one at least */
#endif

/* Elements of the packed form of an [N, K] weight (K even). */
int64_t linear_bf16_packed_elems(int64_t N, int64_t K) { return (N + NB - 1) / NB * NB * K; }

/* Packs w [N, K] (rows w_stride elements apart, K even) into out (linear_bf16_packed_elems):
 * panel j, pair p, column c at ((j * K / 2 + p) * 64 + c) * 2; columns past N are zero. */
int pack_bf16(const uint16_t *w, int64_t w_stride, int64_t N, int64_t K, uint16_t *out) {
    if (K <= 0 || K % 2 != 0 || N <= 0) return UNSUPPORTED;
    const int64_t P = K / 2, panels = (N + NB - 1) / NB;
    for (int64_t j = 0; j < panels; j++)
        for (int64_t p = 0; p < P; p++)
            for (int c = 0; c < NB; c++) {
                const int64_t n = j * NB + c, at = ((j * P + p) * NB + c) * 2;
                out[at] = n < N ? w[n * w_stride + 2 * p] : 0;
                out[at + 1] = n < N ? w[n * w_stride + 2 * p + 1] : 0;
            }
    return OK;
}

#ifdef HAVE_KERNEL

typedef struct Job Job;
struct Job {
    const void *x, *w, *bias; /* bfloat16 or float32, as `rows` reads them */
    void *out;
    int64_t x_stride, out_stride, M, N, K;
    int threads;
    int next_thread; /* each thread takes the next number as its share */
    int x_bytes;     /* of an element of x */
    /* rows [m0, m1) of x through panels [j0, j1) */
    void (*rows)(const Job *job, int64_t m0, int64_t m1, int64_t j0, int64_t j1);
};

#ifdef SOBERANA_AVX2
/* The AVX2 kernels' walk over panels [j0, j1) for rows [m0, m1): one row (a batch-1 decode)
 * through `row`, which reads each of the panel's lines once; more rows a quarter of the panel
 * (a quarter of each of its lines) at a time through `quarter` and every row of the chunk, so
 * the panel stays in L2 between the quarters. Inlined with its two kernels. */
static inline __attribute__((always_inline)) void panels_avx2(
    const Job *job, int64_t m0, int64_t m1, int64_t j0, int64_t j1,
    void (*row)(const Job *job, int64_t m, int64_t j, int cols),
    void (*quarter)(const Job *job, int64_t m0, int64_t m1, int64_t j, int q, int cols)) {
    for (int64_t j = j0; j < j1; j++) {
        const int cols = job->N - j * NB < NB ? (int)(job->N - j * NB) : NB;
        if (m1 - m0 == 1) {
            row(job, m0, j, cols);
            continue;
        }
        for (int q = 0; q < 4 && 16 * q < cols; q++) quarter(job, m0, m1, j, q, cols);
    }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* Rows [m, m + R) of x times panel j into out, columns [64j, 64j + cols). While it works it
 * prefetches `lines` cache lines of `ahead` (into L2), one per pair. */
static inline __attribute__((always_inline)) void tile(const Job *job, int64_t m, int64_t j,
                                                        int cols, const char *ahead,
                                                        int64_t lines, const int R) {
    const int64_t P = job->K / 2;
    const uint16_t *b = (const uint16_t *)job->w + j * P * NB * 2;
    const uint16_t *a = (const uint16_t *)job->x + m * job->x_stride;
    __m512 acc[MR][4];
    for (int r = 0; r < R; r++)
        for (int q = 0; q < 4; q++) acc[r][q] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; p++) {
        if (p < lines) __builtin_prefetch(ahead + p * 64, 0, 2);
        const uint16_t *bp = b + p * NB * 2;
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + 32);
        const __m512bh b2 = (__m512bh)_mm512_loadu_si512(bp + 64);
        const __m512bh b3 = (__m512bh)_mm512_loadu_si512(bp + 96);
        dpbf16_pair(acc, a, job->x_stride, p, R, b0, b1, b2, b3);
    }
    for (int q = 0; q < 4; q++) {
        const int live = cols - 16 * q;
        if (live <= 0) break;
        __m512 bias = _mm512_setzero_ps();
        if (job->bias != NULL) bias = load16(job->bias, j * NB + 16 * q, DT_BF16); /* padded */
        for (int r = 0; r < R; r++) {
            uint16_t *c = (uint16_t *)job->out + (m + r) * job->out_stride + j * NB + 16 * q;
            const __m512 y = job->bias != NULL ? _mm512_add_ps(acc[r][q], bias) : acc[r][q];
            if (live >= 16)
                store16(c, 0, y, DT_BF16);
            else
                _mm256_mask_storeu_epi16(c, (__mmask16)((1u << live) - 1), to_bf16x16(y));
        }
    }
}

static void rows_bf16(const Job *job, int64_t m0, int64_t m1, int64_t j0, int64_t j1) {
    const int64_t P = job->K / 2, panel_lines = P * NB * 2 * 2 / 64;
    for (int64_t j = j0; j < j1; j++) {
        const int cols = job->N - j * NB < NB ? (int)(job->N - j * NB) : NB;
        const char *next = (const char *)((const uint16_t *)job->w + (j + 1) * P * NB * 2);
        int64_t left = j + 1 < j1 ? panel_lines : 0; /* the next panel's lines to ask for */
        int64_t m = m0;
        for (; m + MR <= m1; m += MR) {
            const int64_t lines = left < P ? left : P;
            tile(job, m, j, cols, next, lines, MR);
            next += lines * 64, left -= lines;
        }
        /* the last, partial tile asks for nothing: where it is the only one (a row or a few:
         * a batch-1 decode, memory-bound), asking for the next panel was 10-12% slower than
         * leaving the stream to the hardware prefetchers */
        switch (m1 - m) {
        case 5: tile(job, m, j, cols, next, 0, 5); break;
        case 4: tile(job, m, j, cols, next, 0, 4); break;
        case 3: tile(job, m, j, cols, next, 0, 3); break;
        case 2: tile(job, m, j, cols, next, 0, 2); break;
        case 1: tile(job, m, j, cols, next, 0, 1); break;
        default: break;
        }
    }
}

#elif defined(SOBERANA_AVX2)
#define MR2 4 /* rows of x per tile: 4 x 16 sums in 8 of the 16 registers */

/* The pair (x[2p], x[2p + 1]) of a bfloat16 row as two broadcast float32 vectors. */
static inline __attribute__((always_inline)) void pair8(const uint16_t *x, int64_t p, __m256 *even,
                                                        __m256 *odd) {
    int32_t pair;
    memcpy(&pair, x + 2 * p, 4);
    const __m256i v = _mm256_set1_epi32(pair);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

/* y (8 sums of columns [c, c + 8) of panel j, bias added here) into a bfloat16 row; `live` of
 * them are real columns. */
static inline void store_cols(const Job *job, uint16_t *row, int64_t j, int c, __m256 y, int live) {
    if (job->bias != NULL) y = _mm256_add_ps(y, load8(job->bias, j * NB + c, DT_BF16)); /* padded */
    if (live >= 8) {
        store8(row, j * NB + c, y, DT_BF16);
    } else if (live > 0) {
        uint16_t h[8];
        _mm_storeu_si128((__m128i *)h, to_bf16x8(y));
        memcpy(row + j * NB + c, h, (size_t)live * 2);
    }
}

/* Rows [m, m + R) of x times columns [16q, 16q + 16) of panel j. A 32-bit lane of the packed
 * pair holds column c's weights of k = 2p (low half) and 2p + 1 (high half): a shift and a mask
 * widen them to float32 in place, so the panel layout is the AVX512_BF16 kernel's. */
static inline __attribute__((always_inline)) void tile_avx2(const Job *job, int64_t m, int64_t j,
                                                            int q, int cols, const int R) {
    const int64_t P = job->K / 2;
    const uint16_t *b = (const uint16_t *)job->w + j * P * NB * 2 + q * 32;
    const uint16_t *a = (const uint16_t *)job->x + m * job->x_stride;
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    /* named sums, not an array: GCC kept an array's registers stored to the stack on every p */
    __m256 c00, c01, c10, c11, c20, c21, c30, c31;
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = _mm256_setzero_ps();
    for (int64_t p = 0; p < P; p++) {
        const uint16_t *bp = b + p * NB * 2;
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)bp);
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(bp + 16));
        const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
        const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(w0, high));
        const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
        const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(w1, high));
#define ROW(r)                                                                    \
        if (R > r) {                                                              \
            __m256 xe, xo;                                                        \
            pair8(a + r * job->x_stride, p, &xe, &xo);                            \
            c##r##0 = _mm256_fmadd_ps(xo, o0, _mm256_fmadd_ps(xe, e0, c##r##0));  \
            c##r##1 = _mm256_fmadd_ps(xo, o1, _mm256_fmadd_ps(xe, e1, c##r##1));  \
        }
        ROW(0) ROW(1) ROW(2) ROW(3)
#undef ROW
    }
    const __m256 acc[MR2][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
    for (int r = 0; r < R; r++) {
        uint16_t *row = (uint16_t *)job->out + (m + r) * job->out_stride;
        store_cols(job, row, j, 16 * q, acc[r][0], cols - 16 * q);
        store_cols(job, row, j, 16 * q + 8, acc[r][1], cols - 16 * q - 8);
    }
}

/* One row of x times all 64 columns of panel j: each pair's line of the panel read once (a
 * batch-1 decode streams the weights from memory). */
static void row_avx2(const Job *job, int64_t m, int64_t j, int cols) {
    const int64_t P = job->K / 2;
    const uint16_t *b = (const uint16_t *)job->w + j * P * NB * 2;
    const uint16_t *a = (const uint16_t *)job->x + m * job->x_stride;
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[8];
    for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t p = 0; p < P; p++) {
        const uint16_t *bp = b + p * NB * 2;
        __m256 xe, xo;
        pair8(a, p, &xe, &xo);
        for (int v = 0; v < 8; v++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(bp + 16 * v));
            acc[v] = _mm256_fmadd_ps(xo, _mm256_castsi256_ps(_mm256_and_si256(w, high)),
                                     _mm256_fmadd_ps(xe, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), acc[v]));
        }
    }
    uint16_t *row = (uint16_t *)job->out + m * job->out_stride;
    for (int v = 0; v < 8; v++) store_cols(job, row, j, 8 * v, acc[v], cols - 8 * v);
}

/* Rows [m0, m1) of x times columns [16q, 16q + 16) of panel j, MR2 rows at a time. */
static inline __attribute__((always_inline)) void quarter_avx2(const Job *job, int64_t m0,
                                                               int64_t m1, int64_t j, int q,
                                                               int cols) {
    int64_t m = m0;
    for (; m + MR2 <= m1; m += MR2) tile_avx2(job, m, j, q, cols, MR2);
    switch (m1 - m) {
    case 3: tile_avx2(job, m, j, q, cols, 3); break;
    case 2: tile_avx2(job, m, j, q, cols, 2); break;
    case 1: tile_avx2(job, m, j, q, cols, 1); break;
    default: break;
    }
}

static void rows_bf16(const Job *job, int64_t m0, int64_t m1, int64_t j0, int64_t j1) {
    panels_avx2(job, m0, m1, j0, j1, row_avx2, quarter_avx2);
}
#endif

/* ---- float32: panels of 64 columns, each four runs of 16, [4][K][16] (pack_f32) ------- */

/* The rows of the next tile of `left`: tiles as even as MR allows (7 rows: 4 + 3, not 6 + 1,
 * whose one-row tile reads the panel again for a sixth of the work). */
static inline int balanced_rows(int64_t left) {
    const int64_t tiles = (left + MR - 1) / MR;
    return (int)((left + tiles - 1) / tiles);
}

#ifdef __AVX512F__
/* Rows [m, m + R) of x times panel j: 6 x 64 sums in 24 registers, each x[r][k] broadcast
 * once and meeting the panel's four 16-column vectors of k. */
static inline __attribute__((always_inline)) void tile_f32(const Job *job, int64_t m, int64_t j,
                                                           int cols, const int R) {
    const int64_t K = job->K;
    const float *b = (const float *)job->w + j * K * NB;
    const float *a = (const float *)job->x + m * job->x_stride;
    const int64_t xs = job->x_stride;
    /* named sums, not an array: GCC kept an array's registers stored to the stack on every k */
    __m512 c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23;
    __m512 c30, c31, c32, c33, c40, c41, c42, c43, c50, c51, c52, c53;
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = c20 = c21 = c22 = c23 = _mm512_setzero_ps();
    c30 = c31 = c32 = c33 = c40 = c41 = c42 = c43 = c50 = c51 = c52 = c53 = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const float *bk = b + k * 16; /* four cache lines, one per run */
        const __m512 b0 = _mm512_loadu_ps(bk), b1 = _mm512_loadu_ps(bk + K * 16);
        const __m512 b2 = _mm512_loadu_ps(bk + 2 * K * 16), b3 = _mm512_loadu_ps(bk + 3 * K * 16);
#define ROW(r)                                              \
        if (R > r) {                                        \
            const __m512 av = _mm512_set1_ps(a[r * xs + k]); \
            c##r##0 = _mm512_fmadd_ps(av, b0, c##r##0);     \
            c##r##1 = _mm512_fmadd_ps(av, b1, c##r##1);     \
            c##r##2 = _mm512_fmadd_ps(av, b2, c##r##2);     \
            c##r##3 = _mm512_fmadd_ps(av, b3, c##r##3);     \
        }
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
    const __m512 acc[MR][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23},
                               {c30, c31, c32, c33}, {c40, c41, c42, c43}, {c50, c51, c52, c53}};
    for (int q = 0; q < 4; q++) {
        const int live = cols - 16 * q;
        if (live <= 0) break;
        const __mmask16 mask = live >= 16 ? 0xffff : (__mmask16)((1u << live) - 1);
        __m512 bias = _mm512_setzero_ps();
        if (job->bias != NULL) bias = _mm512_loadu_ps((const float *)job->bias + j * NB + 16 * q);
        for (int r = 0; r < R; r++) {
            float *c = (float *)job->out + (m + r) * job->out_stride + j * NB + 16 * q;
            _mm512_mask_storeu_ps(c, mask, _mm512_add_ps(acc[r][q], bias));
        }
    }
}

static void rows_f32(const Job *job, int64_t m0, int64_t m1, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        const int cols = job->N - j * NB < NB ? (int)(job->N - j * NB) : NB;
        for (int64_t m = m0; m < m1;) {
            const int R = balanced_rows(m1 - m);
            switch (R) {
            case 6: tile_f32(job, m, j, cols, 6); break;
            case 5: tile_f32(job, m, j, cols, 5); break;
            case 4: tile_f32(job, m, j, cols, 4); break;
            case 3: tile_f32(job, m, j, cols, 3); break;
            case 2: tile_f32(job, m, j, cols, 2); break;
            default: tile_f32(job, m, j, cols, 1); break;
            }
            m += R;
        }
    }
}
#else /* SOBERANA_AVX2 */
/* 8 sums of columns [c, c + 8) of panel j (bias added here) into a float32 row; `live` of
 * them are real columns. */
static inline void store_f32(const Job *job, float *row, int64_t j, int c, __m256 y, int live) {
    if (job->bias != NULL) y = _mm256_add_ps(y, _mm256_loadu_ps((const float *)job->bias + j * NB + c));
    if (live >= 8) {
        _mm256_storeu_ps(row + j * NB + c, y);
    } else if (live > 0) {
        float f[8];
        _mm256_storeu_ps(f, y);
        memcpy(row + j * NB + c, f, (size_t)live * 4);
    }
}

/* Rows [m, m + R) of x times columns [16q, 16q + 16) of panel j: 6 x 16 sums in 12 of the 16
 * registers, two for the panel's vectors, one for x[r][k] broadcast. */
static inline __attribute__((always_inline)) void tile_f32(const Job *job, int64_t m, int64_t j,
                                                           int q, int cols, const int R) {
    const int64_t K = job->K;
    const float *b = (const float *)job->w + (j * 4 + q) * K * 16; /* its run: one line per k */
    const float *a = (const float *)job->x + m * job->x_stride;
    const int64_t xs = job->x_stride;
    /* named sums, not an array: GCC kept an array's registers stored to the stack on every k */
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(b + k * 16), b1 = _mm256_loadu_ps(b + k * 16 + 8);
#define ROW(r)                                                 \
        if (R > r) {                                           \
            const __m256 av = _mm256_broadcast_ss(a + r * xs + k); \
            c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);        \
            c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);        \
        }
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
    const __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int r = 0; r < R; r++) {
        float *row = (float *)job->out + (m + r) * job->out_stride;
        store_f32(job, row, j, 16 * q, acc[r][0], cols - 16 * q);
        store_f32(job, row, j, 16 * q + 8, acc[r][1], cols - 16 * q - 8);
    }
}

/* One row of x times all 64 columns of panel j, each of the panel's lines read once. */
static void row_f32(const Job *job, int64_t m, int64_t j, int cols) {
    const int64_t K = job->K;
    const float *b = (const float *)job->w + j * K * NB;
    const float *a = (const float *)job->x + m * job->x_stride;
    __m256 acc[8];
    for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m256 av = _mm256_broadcast_ss(a + k);
        for (int v = 0; v < 8; v++) /* run v / 2, its half v % 2 */
            acc[v] = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + (v / 2) * K * 16 + k * 16 + 8 * (v % 2)), acc[v]);
    }
    float *row = (float *)job->out + m * job->out_stride;
    for (int v = 0; v < 8; v++) store_f32(job, row, j, 8 * v, acc[v], cols - 8 * v);
}

/* Rows [m0, m1) of x times columns [16q, 16q + 16) of panel j, in tiles as even as MR allows. */
static inline __attribute__((always_inline)) void quarter_f32(const Job *job, int64_t m0,
                                                              int64_t m1, int64_t j, int q,
                                                              int cols) {
    for (int64_t m = m0; m < m1;) {
        const int R = balanced_rows(m1 - m);
        switch (R) {
        case 6: tile_f32(job, m, j, q, cols, 6); break;
        case 5: tile_f32(job, m, j, q, cols, 5); break;
        case 4: tile_f32(job, m, j, q, cols, 4); break;
        case 3: tile_f32(job, m, j, q, cols, 3); break;
        case 2: tile_f32(job, m, j, q, cols, 2); break;
        default: tile_f32(job, m, j, q, cols, 1); break;
        }
        m += R;
    }
}

static void rows_f32(const Job *job, int64_t m0, int64_t m1, int64_t j0, int64_t j1) {
    panels_avx2(job, m0, m1, j0, j1, row_f32, quarter_f32);
}
#endif

/* Rows [m0, m1) of x through panels [j0, j1), all in chunks of rows that stay in L2. */
static void sweep(const Job *job, int64_t m0, int64_t m1, int64_t j0, int64_t j1) {
    int64_t chunk = (MC_BYTES / (job->x_bytes * job->K)) / MR * MR;
    if (chunk < MR) chunk = MR;
    for (int64_t m = m0; m < m1; m += chunk) job->rows(job, m, m + chunk < m1 ? m + chunk : m1, j0, j1);
}

/* One thread's share: a run of panels, or with fewer panels than threads a run of rows. */
static void work(void *arg) {
    Job *job = arg;
    const int t = __atomic_fetch_add(&job->next_thread, 1, __ATOMIC_RELAXED), T = job->threads;
    const int64_t panels = (job->N + NB - 1) / NB;
    if (panels >= T) {
        const int64_t per = (panels + T - 1) / T, j0 = t * per, j1 = j0 + per < panels ? j0 + per : panels;
        if (j0 < j1) sweep(job, 0, job->M, j0, j1);
    } else {
        const int64_t per = ((job->M + T - 1) / T + MR - 1) / MR * MR;
        const int64_t m0 = t * per, m1 = m0 + per < job->M ? m0 + per : job->M;
        if (m0 < m1) sweep(job, m0, m1, 0, panels);
    }
}

typedef void (*GompParallel)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);

/* The job on its threads (one where there is too little work to share). */
static int run(Job *job, void *gomp_parallel) {
    if (job->M == 0) return OK;
    if (job->threads < 1) job->threads = 1;
    const int64_t panels = (job->N + NB - 1) / NB;
    if (job->threads > 1 && panels < job->threads && job->M < 2 * MR * job->threads) job->threads = 1;
    if (job->threads > 1 && gomp_parallel != NULL)
        ((GompParallel)gomp_parallel)(work, job, (unsigned)job->threads, 0);
    else
        sweep(job, 0, job->M, 0, panels);
    return OK;
}

#endif

/* out [M, N] (rows out_stride apart) = x [M, K] (rows x_stride apart) times the packed weight
 * (pack_bf16 of an [N, K] weight), plus bias [padded to a multiple of 64, zeros past N] or
 * NULL, all bfloat16; float32 sums rounded once. Returns OK or UNSUPPORTED (neither AVX512_BF16
 * nor AVX2 + FMA in this build, K odd). */
int linear_bf16(const uint16_t *x, int64_t x_stride, int64_t M, int64_t K, const uint16_t *w,
                int64_t N, const uint16_t *bias, uint16_t *out, int64_t out_stride,
                int32_t threads, void *gomp_parallel) {
#ifdef HAVE_BF16_KERNEL
    if (K <= 0 || K % 2 != 0 || N <= 0 || M < 0) return UNSUPPORTED;
    Job job = {x, w, bias, out, x_stride, out_stride, M, N, K, threads, 0, 2, rows_bf16};
    return run(&job, gomp_parallel);
#else
    (void)x, (void)x_stride, (void)M, (void)K, (void)w, (void)N, (void)bias, (void)out;
    (void)out_stride, (void)threads, (void)gomp_parallel;
    return UNSUPPORTED;
#endif
}

/* Whether this build has the float32 kernel (AVX-512F, or AVX2 + FMA). */
int linear_f32_available(void) {
#ifdef HAVE_KERNEL
    return 1;
#else
    return 0;
#endif
}

/* Elements of the packed form of an [N, K] float32 weight. */
int64_t linear_f32_packed_elems(int64_t N, int64_t K) { return (N + NB - 1) / NB * NB * K; }

/* Packs w [N, K] (rows w_stride elements apart) into out (linear_f32_packed_elems): panel j,
 * row k, column c at ((4j + c / 16) * K + k) * 16 + c % 16: each run of 16 columns is one
 * stream of cache lines down k; columns past N are zero. */
int pack_f32(const float *w, int64_t w_stride, int64_t N, int64_t K, float *out) {
    if (K <= 0 || N <= 0) return UNSUPPORTED;
    const int64_t panels = (N + NB - 1) / NB;
    for (int64_t j = 0; j < panels; j++)
        for (int64_t k = 0; k < K; k++)
            for (int c = 0; c < NB; c++) {
                const int64_t n = j * NB + c;
                out[((j * 4 + c / 16) * K + k) * 16 + c % 16] = n < N ? w[n * w_stride + k] : 0.0f;
            }
    return OK;
}

/* out [M, N] = x [M, K] times the packed weight (pack_f32 of an [N, K] weight), plus bias
 * [padded to a multiple of 64] or NULL, all float32; each sum in k order, one thread's.
 * Returns OK or UNSUPPORTED (neither AVX-512 nor AVX2 + FMA in this build). */
int linear_f32(const float *x, int64_t x_stride, int64_t M, int64_t K, const float *w, int64_t N,
               const float *bias, float *out, int64_t out_stride, int32_t threads,
               void *gomp_parallel) {
#ifdef HAVE_KERNEL
    if (K <= 0 || N <= 0 || M < 0) return UNSUPPORTED;
    Job job = {x, w, bias, out, x_stride, out_stride, M, N, K, threads, 0, 4, rows_f32};
    return run(&job, gomp_parallel);
#else
    (void)x, (void)x_stride, (void)M, (void)K, (void)w, (void)N, (void)bias, (void)out;
    (void)out_stride, (void)threads, (void)gomp_parallel;
    return UNSUPPORTED;
#endif
}

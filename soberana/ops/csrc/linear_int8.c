/* Weight-only int8 linear layers on CPUs: out = (x q^T) * scale (+ bias), float32 sums.
 *
 * Built and called by soberana/quantization/cpu_int8.py (plain C, compiled at first use by
 * soberana/ops/cpu/kernels.py). The int8 weight q [N, K] (per-output-channel scales) is
 * packed once at load into one blob: panels of 64 output columns, each the K / 2 pairs of
 * its columns, [K / 2][64][2] int8 (linear_bf16.c's order), followed by the N scales as
 * float32, padded to the 64 columns of the last panel. The packed weight replaces the
 * row-major one: the layer holds the int8 bytes once.
 *
 * The weight is dequantized in registers, never in memory: int8 -> int32 -> float32 is exact,
 * and so is the step to bfloat16 (|q| <= 127 needs 7 significant bits, bfloat16 has 8), so
 * each product x * q is exact and only the float32 sums differ from `x @ dequantized.T`
 * (by their order, and by the scale being applied once per sum instead of per weight).
 * Chosen over quantizing activations to int8 for VPDPBUSD (W8A8), which would add an
 * activation rounding error that the dequantized reference does not have.
 *
 * Two paths:
 *  - bfloat16 activations on a CPU with AVX512_BF16 (linear_int8_bf16): a tile of up to
 *    MR = 6 rows of x times one panel keeps its 6 x 64 sums in 24 registers; each pair of x's
 *    columns is broadcast once per row and meets four 32-lane bfloat16 vectors of the panel
 *    (vdpbf16ps). With one tile of rows per panel (a one-token decode, memory-bound: half the
 *    bytes of bfloat16) the panel is converted in registers as it is read; with more, a
 *    thread converts the panel once into a bfloat16 buffer that stays in L2 and sweeps its
 *    rows through it, as linear_bf16.c sweeps a packed bfloat16 panel.
 *  - float32 activations, or a CPU without AVX-512 (AVX2 + FMA; linear_int8_f32): 16-column
 *    quarter panels, 2 rows at a time, 8 int8 -> 8 float32 per vector, FMA with the pair
 *    (x[2p], x[2p + 1]) broadcast; the two sums of a column (even and odd k) are added at the
 *    end with hadd.
 *
 * Rows are shared among torch's OpenMP threads (through GOMP_parallel): panels split among
 * them, or, with fewer panels than threads, rows. Each output is summed by one thread in one
 * order whatever the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dtypes.h"
#include "rows.h"
#include "simd.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

enum { OK = 0, UNSUPPORTED = 1, NO_MEMORY = 3 };

/* The W8A8 paths (linear_w8a8_*, at the end of this file): AVX512_VNNI, else AVX2. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define W8A8_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#define W8A8_AVX2 1
#endif
#define NB 64 /* output columns per panel */
#define MR 6  /* rows of x per bfloat16 tile */
/* Bytes of x's rows a thread takes through its panels at a time (linear_bf16.c's MC_BYTES). */
#define MC_BYTES (512 << 10)

/* Which paths this build has: bit 0 bfloat16 activations (AVX512_BF16), bit 1 float32
 * activations (AVX2 + FMA), bit 2 W8A8 on AVX512_VNNI (and its GELU MLP, linear_w8a8_gelu_q8
 * and linear_w8a8_q8), bit 3 W8A8 on AVX2. */
int linear_int8_paths(void) {
    int paths = 0;
#if W8A8_VNNI
    paths |= 4;
#elif W8A8_AVX2
    paths |= 8;
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    paths |= 1;
#endif
#if defined(__AVX2__) && defined(__FMA__)
    paths |= 2;
#endif
    return paths;
}

/* Bytes of the packed form of an [N, K] int8 weight (K even): the panels, then the scales. */
int64_t linear_int8_packed_bytes(int64_t N, int64_t K) {
    const int64_t n_pad = (N + NB - 1) / NB * NB;
    return n_pad * K + n_pad * (int64_t)sizeof(float);
}

/* Packs q [N, K] (rows q_stride bytes apart, K even) and its float32 scales [N] into out
 * (linear_int8_packed_bytes): panel j, pair p, column c at ((j * K / 2 + p) * 64 + c) * 2;
 * columns past N are zero, with scale 0. */
int pack_int8(const int8_t *q, int64_t q_stride, const float *scale, int64_t N, int64_t K,
              int8_t *out) {
    if (K <= 0 || K % 2 != 0 || N <= 0) return UNSUPPORTED;
    const int64_t P = K / 2, panels = (N + NB - 1) / NB;
    for (int64_t j = 0; j < panels; j++)
        for (int64_t p = 0; p < P; p++)
            for (int c = 0; c < NB; c++) {
                const int64_t n = j * NB + c, at = ((j * P + p) * NB + c) * 2;
                out[at] = n < N ? q[n * q_stride + 2 * p] : 0;
                out[at + 1] = n < N ? q[n * q_stride + 2 * p + 1] : 0;
            }
    float *scales = (float *)(out + panels * NB * K);
    for (int64_t n = 0; n < panels * NB; n++) scales[n] = n < N ? scale[n] : 0.0f;
    return OK;
}

typedef struct Job {
    const void *x, *bias;
    const int8_t *w;
    const float *scale;
    void *out;
    int64_t x_stride, out_stride, M, N, K;
    int threads;
    int next_thread; /* each thread takes the next number as its share */
    int dtype;       /* W8A8: of x and out */
    int gelu_q8;     /* W8A8: out is the next linear's quantized rows of GELU(x W^T + b) */
    int64_t row_chunk; /* > 0: threads claim chunks of this many rows (through every panel) */
    int64_t next_row;  /* the first unclaimed row */
} Job;

typedef void (*Sweep)(const Job *job, int64_t m0, int64_t m1, int64_t j0, int64_t j1);

/* Rows [m0, m1) of x through panels [j0, j1) in chunks of `row_bytes`-wide rows that stay in
 * L2 (MC_BYTES), each chunk through all the panels before the next. */
static void sweep_chunks(const Job *job, Sweep sweep, int64_t row_bytes, int64_t m0, int64_t m1,
                         int64_t j0, int64_t j1) {
    int64_t chunk = MC_BYTES / row_bytes / MR * MR;
    if (chunk < MR) chunk = MR;
    for (int64_t m = m0; m < m1; m += chunk) sweep(job, m, m + chunk < m1 ? m + chunk : m1, j0, j1);
}

typedef struct Share {
    Job *job;
    Sweep sweep;
    int64_t row_bytes;
} Share;

/* Weights up to this size stay in a core's L2 (2 MiB on Emerald Rapids and Zen 4) beside a
 * chunk of rows: every thread reads all of them, claiming chunks of rows one at a time
 * (ROW_TASKS per thread), so a thread the OS preempts holds up one chunk, not half the call.
 * With 2 threads, a static half each, a 2-core host running the API process beside the
 * engine lost the preempted thread's rest of the call on the other core. Bigger weights keep
 * a run of panels per thread, each weight byte streamed from memory once per chunk of rows. */
#define SHARED_WEIGHT_BYTES (1 << 20)
#define ROW_TASKS 8

/* One thread's share: chunks of rows claimed in turn, a run of panels, or with fewer panels
 * than threads a run of rows. */
static void work(void *arg) {
    const Share *s = arg;
    Job *job = s->job;
    const int64_t panels = (job->N + NB - 1) / NB;
    if (job->row_chunk > 0) {
        for (;;) {
            const int64_t m0 = __atomic_fetch_add(&job->next_row, job->row_chunk, __ATOMIC_RELAXED);
            if (m0 >= job->M) return;
            const int64_t m1 = m0 + job->row_chunk < job->M ? m0 + job->row_chunk : job->M;
            sweep_chunks(job, s->sweep, s->row_bytes, m0, m1, 0, panels);
        }
    }
    const int t = __atomic_fetch_add(&job->next_thread, 1, __ATOMIC_RELAXED), T = job->threads;
    if (panels >= T) {
        const int64_t per = (panels + T - 1) / T, j0 = t * per, j1 = j0 + per < panels ? j0 + per : panels;
        if (j0 < j1) sweep_chunks(job, s->sweep, s->row_bytes, 0, job->M, j0, j1);
    } else {
        const int64_t per = ((job->M + T - 1) / T + MR - 1) / MR * MR;
        const int64_t m0 = t * per, m1 = m0 + per < job->M ? m0 + per : job->M;
        if (m0 < m1) sweep_chunks(job, s->sweep, s->row_bytes, m0, m1, 0, panels);
    }
}

static void run(Job *job, Sweep sweep, int64_t row_bytes, void *gomp_parallel) {
    const int64_t panels = (job->N + NB - 1) / NB;
    if (job->threads > 1 && panels < job->threads && job->M < 2 * MR * job->threads) job->threads = 1;
    const int64_t tasks = (int64_t)job->threads * ROW_TASKS;
    if (job->threads > 1 && panels * NB * job->K <= SHARED_WEIGHT_BYTES && job->M >= tasks * 2 * MR)
        job->row_chunk = (job->M + tasks - 1) / tasks / MR * MR + MR; /* whole tiles */
    Share share = {job, sweep, row_bytes};
    if (job->threads > 1 && gomp_parallel != NULL)
        ((GompParallel)gomp_parallel)(work, &share, (unsigned)job->threads, 0);
    else
        sweep_chunks(job, sweep, row_bytes, 0, job->M, 0, panels);
}

static int check(int64_t M, int64_t K, int64_t N) {
    if (K <= 0 || K % 2 != 0 || N <= 0 || M < 0) return UNSUPPORTED;
    return OK;
}

/* linear_int8_bf16 and linear_int8_f32: x, bias and out of `dtype` through `sweep` (NULL: no
 * such path in this build). */
static int linear_int8(const void *x, int64_t x_stride, int64_t M, int64_t K, const int8_t *w,
                       int64_t N, const void *bias, void *out, int64_t out_stride, int32_t threads,
                       void *gomp_parallel, int dtype, Sweep sweep) {
    if (sweep == NULL || check(M, K, N) != OK) return UNSUPPORTED;
    if (M == 0) return OK;
    const int64_t n_pad = (N + NB - 1) / NB * NB;
    Job job = {x, bias, w, (const float *)(w + n_pad * K), out, x_stride, out_stride, M, N, K,
               threads < 1 ? 1 : threads, 0, dtype};
    run(&job, sweep, (dtype == DT_F32 ? 4 : 2) * K, gomp_parallel);
    return OK;
}

/* ---------------------------------------------------------------- bfloat16 activations */
#if defined(__AVX512F__) && defined(__AVX512BF16__)

/* 32 int8 as 32 bfloat16, in order (exact). */
static inline __m512bh i8x32_to_bf16(const int8_t *p) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

/* A thread's bfloat16 copy of one panel (K * 128 bytes), grown as needed and kept. */
static __thread void *panel_buffer;
static __thread int64_t panel_capacity;

static uint16_t *panel_space(int64_t elems) {
    return thread_scratch(&panel_buffer, &panel_capacity, elems * 2);
}

/* Rows [m, m + R) of x times panel j into out, columns [64j, 64j + cols): the panel read as
 * int8 and converted in registers (wb NULL, or `fill`: the conversion also written to wb), or
 * read from its bfloat16 copy wb. While it works it prefetches `lines` cache lines of `ahead`
 * (into L2), one per pair. */
static inline __attribute__((always_inline)) void tile_bf16(const Job *job, int64_t m, int64_t j,
                                                             int cols, uint16_t *wb, int fill,
                                                             const char *ahead, int64_t lines,
                                                             const int R) {
    const int64_t P = job->K / 2;
    const int8_t *w = job->w + j * P * NB * 2;
    const uint16_t *a = (const uint16_t *)job->x + m * job->x_stride;
    __m512 acc[MR][4];
    for (int r = 0; r < R; r++)
        for (int q = 0; q < 4; q++) acc[r][q] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; p++) {
        if (p < lines) __builtin_prefetch(ahead + p * 64, 0, 2);
        __m512bh b0, b1, b2, b3;
        if (wb != NULL && !fill) {
            const uint16_t *bp = wb + p * NB * 2;
            b0 = (__m512bh)_mm512_loadu_si512(bp);
            b1 = (__m512bh)_mm512_loadu_si512(bp + 32);
            b2 = (__m512bh)_mm512_loadu_si512(bp + 64);
            b3 = (__m512bh)_mm512_loadu_si512(bp + 96);
        } else {
            const int8_t *bp = w + p * NB * 2;
            b0 = i8x32_to_bf16(bp);
            b1 = i8x32_to_bf16(bp + 32);
            b2 = i8x32_to_bf16(bp + 64);
            b3 = i8x32_to_bf16(bp + 96);
            if (fill && wb != NULL) {
                uint16_t *out = wb + p * NB * 2;
                _mm512_storeu_si512(out, (__m512i)b0);
                _mm512_storeu_si512(out + 32, (__m512i)b1);
                _mm512_storeu_si512(out + 64, (__m512i)b2);
                _mm512_storeu_si512(out + 96, (__m512i)b3);
            }
        }
        dpbf16_pair(acc, a, job->x_stride, p, R, b0, b1, b2, b3);
    }
    for (int q = 0; q < 4; q++) {
        const int live = cols - 16 * q;
        if (live <= 0) break;
        const __m512 scale = _mm512_loadu_ps(job->scale + j * NB + 16 * q); /* padded */
        __m512 bias = _mm512_setzero_ps();
        if (job->bias != NULL) bias = load16(job->bias, j * NB + 16 * q, DT_BF16); /* padded */
        for (int r = 0; r < R; r++) {
            uint16_t *c = (uint16_t *)job->out + (m + r) * job->out_stride + j * NB + 16 * q;
            const __m512 y = _mm512_fmadd_ps(acc[r][q], scale, bias);
            if (live >= 16)
                store16(c, 0, y, DT_BF16);
            else
                _mm256_mask_storeu_epi16(c, (__mmask16)((1u << live) - 1), to_bf16x16(y));
        }
    }
}

static void sweep_bf16(const Job *job, int64_t m0, int64_t m1, int64_t j0, int64_t j1) {
    const int64_t panel_elems = job->K * NB, panel_lines = panel_elems / 64, P = job->K / 2;
    /* More than one tile of rows: the first tile converts the panel (5 instructions per 32
     * weights) and writes it to the thread's copy, which the others read. One tile: convert in
     * registers, nothing written. */
    uint16_t *wb = m1 - m0 > MR ? panel_space(panel_elems) : NULL;
    for (int64_t j = j0; j < j1; j++) {
        const int cols = job->N - j * NB < NB ? (int)(job->N - j * NB) : NB;
        const char *next = (const char *)(job->w + (j + 1) * panel_elems);
        int64_t left = j + 1 < j1 ? panel_lines : 0; /* the next panel's lines to ask for */
        int64_t m = m0;
        for (int fill = 1; m + MR <= m1; m += MR, fill = 0) {
            const int64_t lines = left < P ? left : P;
            tile_bf16(job, m, j, cols, wb, fill, next, lines, MR);
            next += lines * 64, left -= lines;
        }
        /* the last, partial tile asks for nothing (as in linear_bf16.c: where it is the only
         * one, a batch-1 decode, the hardware prefetchers stream the panels faster) */
        const int fill = m == m0;
        switch (m1 - m) {
        case 5: tile_bf16(job, m, j, cols, wb, fill, next, 0, 5); break;
        case 4: tile_bf16(job, m, j, cols, wb, fill, next, 0, 4); break;
        case 3: tile_bf16(job, m, j, cols, wb, fill, next, 0, 3); break;
        case 2: tile_bf16(job, m, j, cols, wb, fill, next, 0, 2); break;
        case 1: tile_bf16(job, m, j, cols, wb, fill, next, 0, 1); break;
        default: break;
        }
    }
}

#define SWEEP_BF16 sweep_bf16
#else
#define SWEEP_BF16 NULL
#endif

/* out [M, N] (rows out_stride apart) = x [M, K] (rows x_stride apart) times the packed weight
 * (pack_int8 of an [N, K] weight and its scales), plus bias [padded to a multiple of 64,
 * zeros past N] or NULL; x, bias and out bfloat16, float32 sums rounded once. The signature
 * of linear_bf16 (linear_bf16.c). Returns OK or UNSUPPORTED (no AVX512_BF16 in this build, K
 * odd). A thread that cannot allocate its panel copy converts in registers instead. */
int linear_int8_bf16(const uint16_t *x, int64_t x_stride, int64_t M, int64_t K, const int8_t *w,
                     int64_t N, const uint16_t *bias, uint16_t *out, int64_t out_stride,
                     int32_t threads, void *gomp_parallel) {
    return linear_int8(x, x_stride, M, K, w, N, bias, out, out_stride, threads, gomp_parallel,
                       DT_BF16, SWEEP_BF16);
}

/* ----------------------------------------------------------------- float32 activations */
#if defined(__AVX2__) && defined(__FMA__)

/* Lanes [c, c + 1] of 8 columns' even and odd sums (lo: columns 0-3, hi: 4-7, each lane pair
 * one column's (even k, odd k)) as the 8 columns' sums, in order. */
static inline __m256 column_sums(__m256 lo, __m256 hi) {
    /* hadd: [c0 c1 c4 c5 | c2 c3 c6 c7]; the 64-bit lanes reordered 0, 2, 1, 3 */
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_hadd_ps(lo, hi)), 0xD8));
}

/* Rows [m, m + R) of x times columns [64j + 16h, + live) (a quarter of panel j). */
static inline __attribute__((always_inline)) void tile_f32(const Job *job, int64_t m, int64_t j,
                                                            int h, int live, const int R) {
    const int64_t P = job->K / 2;
    const int8_t *w = job->w + j * P * NB * 2 + 32 * h;
    const float *a = (const float *)job->x + m * job->x_stride;
    __m256 acc[2][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++) acc[r][v] = _mm256_setzero_ps();
    for (int64_t p = 0; p < P; p++) {
        const int8_t *bp = w + p * NB * 2;
        __m256 b[4];
        for (int v = 0; v < 4; v++)
            b[v] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(bp + 8 * v))));
        for (int r = 0; r < R; r++) {
            const __m256 av = _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(a + r * job->x_stride + 2 * p)));
            for (int v = 0; v < 4; v++) acc[r][v] = _mm256_fmadd_ps(av, b[v], acc[r][v]);
        }
    }
    const int64_t col = j * NB + 16 * h;
    const float *bias = job->bias;
    for (int half = 0; half < 2; half++) {
        const int n = live - 8 * half;
        if (n <= 0) break;
        const __m256 scale = _mm256_loadu_ps(job->scale + col + 8 * half); /* padded */
        for (int r = 0; r < R; r++) {
            float *c = (float *)job->out + (m + r) * job->out_stride + col + 8 * half;
            __m256 y = _mm256_mul_ps(column_sums(acc[r][2 * half], acc[r][2 * half + 1]), scale);
            float lanes[8];
            _mm256_storeu_ps(lanes, y);
            for (int i = 0; i < (n < 8 ? n : 8); i++)
                c[i] = bias != NULL ? lanes[i] + bias[col + 8 * half + i] : lanes[i];
        }
    }
}

static void sweep_f32(const Job *job, int64_t m0, int64_t m1, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        const int cols = job->N - j * NB < NB ? (int)(job->N - j * NB) : NB;
        for (int h = 0; h < 4 && 16 * h < cols; h++) {
            const int live = cols - 16 * h;
            int64_t m = m0;
            for (; m + 2 <= m1; m += 2) tile_f32(job, m, j, h, live, 2);
            if (m < m1) tile_f32(job, m, j, h, live, 1);
        }
    }
}

#define SWEEP_F32 sweep_f32
#else
#define SWEEP_F32 NULL
#endif

/* As linear_int8_bf16 with x, out and bias float32 (bias [N] unpadded, or NULL). Returns OK
 * or UNSUPPORTED (no AVX2 + FMA in this build, K odd). */
int linear_int8_f32(const float *x, int64_t x_stride, int64_t M, int64_t K, const int8_t *w,
                    int64_t N, const float *bias, float *out, int64_t out_stride, int32_t threads,
                    void *gomp_parallel) {
    return linear_int8(x, x_stride, M, K, w, N, bias, out, out_stride, threads, gomp_parallel,
                       DT_F32, SWEEP_F32);
}

/* ================================== W8A8: activations quantized to int8 per block of 32
 *
 * out = sum over blocks b of 32 inputs of (xq_b . q_b) * x_scale_b, times scale (+ bias): each
 * block of 32 values of a row of x is quantized on the fly, symmetric, as llama.cpp's Q8_0
 * quantizes activations: x_scale = max|x| / 127, xq = round_half_even(x * (127 / max|x|)) in
 * [-127, 127] (a block of zeros: scale 0). One scale per row (per token) was measured first:
 * +4.1% perplexity on SmolLM2-135M (a few channels hold outliers that flatten the rest of the
 * row), against +0.41% for weight-only int8; blocks of 32 confine an outlier to its block.
 * The 32-term dot products are exact int32 sums; only the float32 sum over blocks has an
 * order (schemes.int8_w8a8_reference computes the same up to it).
 *
 * AVX512_VNNI: vpdpbusd multiplies unsigned by signed bytes, so the weight is stored as
 * q + 128 (uint8) and multiplied by the signed activations; the 128 * sum(xq_b) this adds is
 * the block's starting value, negated (one number per row and block, from the quantization).
 * Panels of 64 columns, each [K / 4][64][4] bytes, then the scales as float32. Without
 * AVX512_VNNI (Zen 3: AVX2 only) the same bytes, xor 0x80, are q again, and vpmaddubsw
 * multiplies |xq| (unsigned) by q with xq's sign (signed; ggml's Q8_0 x Q8_0 trick): both
 * are at most 127 in magnitude, so a pair sums to at most 2 * 127 * 127 < 2^15 and never
 * saturates, and vpmaddwd with ones adds a column's 4 products into its int32 lane.
 *
 * Every product and sum above is an integer; the block scales are applied with FMA (fixed
 * order: blocks in k order). */

#define QB 32 /* inputs per activation block */
#define MR8 3 /* rows of x per VNNI tile: 12 int32 and 12 float32 sums in registers */

#if W8A8_VNNI || W8A8_AVX2

/* Bytes of the W8A8 packed form of an [N, K] int8 weight (K a multiple of 32). */
int64_t linear_w8a8_packed_bytes(int64_t N, int64_t K) {
    const int64_t n_pad = (N + NB - 1) / NB * NB;
    return n_pad * K + n_pad * (int64_t)sizeof(float);
}

/* Packs q [N, K] (rows q_stride bytes apart, K % 32 == 0) and its float32 scales [N] into out
 * (linear_w8a8_packed_bytes): panel j, quad p, column c, byte i at ((j * K/4 + p) * 64 + c) *
 * 4 + i holds q + 128; then the scales; columns past N are q = 0, scale 0. */
int pack_w8a8(const int8_t *q, int64_t q_stride, const float *scale, int64_t N, int64_t K,
              uint8_t *out) {
    if (K <= 0 || K % QB != 0 || N <= 0) return UNSUPPORTED;
    const int64_t P = K / 4, panels = (N + NB - 1) / NB;
    for (int64_t j = 0; j < panels; j++)
        for (int64_t p = 0; p < P; p++)
            for (int c = 0; c < NB; c++)
                for (int i = 0; i < 4; i++) {
                    const int64_t n = j * NB + c;
                    out[((j * P + p) * NB + c) * 4 + i] = (uint8_t)((n < N ? q[n * q_stride + 4 * p + i] : 0) + 128);
                }
    float *scales = (float *)(out + panels * NB * K);
    for (int64_t n = 0; n < panels * NB; n++) scales[n] = n < N ? scale[n] : 0.0f;
    return OK;
}

/* The activations of one call, quantized: per row K int8 values,
 * then per block its scale (float32) and 128 * sum(xq) (int32); the calling thread's buffer,
 * grown as needed and kept. */
static __thread void *act_buffer;
static __thread int64_t act_capacity;

static void *act_space(int64_t bytes) { return thread_scratch(&act_buffer, &act_capacity, bytes); }

typedef int8_t Act;

/* One row of quantized activations: where its values, block scales and offsets are. */
typedef struct ActRow {
    const Act *q;
    const float *scale;
    const int32_t *offset; /* 128 * sum of the block's xq */
} ActRow;

/* Bytes of one quantized row (64-byte aligned parts). */
static int64_t act_row_bytes(int64_t K) {
    const int64_t blocks = K / QB;
    return (K * (int64_t)sizeof(Act) + 63) / 64 * 64 + (blocks * 8 + 63) / 64 * 64;
}

static ActRow act_row(const char *base, int64_t K, int64_t m) {
    const char *row = base + m * act_row_bytes(K);
    const float *scale = (const float *)(row + (K * (int64_t)sizeof(Act) + 63) / 64 * 64);
    return (ActRow){(const Act *)row, scale, (const int32_t *)(scale + K / QB)};
}

/* 8 values of x from element i (dtype bfloat16 or float32) as float32. */
static inline __m256 load8_x(const void *x, int64_t i, int dtype) {
    if (dtype == DT_F32) return _mm256_loadu_ps((const float *)x + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Block x[0, 32) (dtype) into out; its scale and offset. Rounding: the MXCSR default, to
 * nearest even, as torch.round. */
static void quantize_block(const void *x, int dtype, Act *out, float *scale, int32_t *offset) {
    __m256 v[4], m = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int i = 0; i < 4; i++) {
        v[i] = load8_x(x, 8 * i, dtype);
        m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float amax = _mm_cvtss_f32(m4);
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    __m256i sum = _mm256_setzero_si256(), q[4];
    for (int i = 0; i < 4; i++) {
        q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
        q[i] = _mm256_min_epi32(_mm256_max_epi32(q[i], lo), hi);
        sum = _mm256_add_epi32(sum, q[i]);
    }
    /* the packs interleave 128-bit lanes: dword d of the result holds q[d % 4]'s values
     * 4 * (d / 4) .. + 3; the permute puts them back in order */
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i *)out,
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, sum);
    int32_t total = 0;
    for (int k = 0; k < 8; k++) total += lanes[k];
    *scale = amax / 127.0f;
    *offset = 128 * total;
}

#if W8A8_VNNI
/* GELU(x) = x/2 (1 + erf(x / sqrt 2)), erf as PyTorch's vectorised float erf computes it
 * (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7, with a ~1 ulp exp), the exact GELU that
 * BERT's hidden_act "gelu" names. */
static inline __m512 gelu16(__m512 x) {
    const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752440f));
    const __m512 neg_zero = _mm512_set1_ps(-0.0f), one = _mm512_set1_ps(1.0f);
    const __m512 sign = _mm512_and_ps(neg_zero, z), az = _mm512_abs_ps(z);
    const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), az, one));
    __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
    /* exp(-z^2): 0 past |z| = 9.3 (vec_exp: no subnormal, whose microcode assist is
     * costly), where the term is below float32's resolution of erf anyway */
    const __m512 e = vec_exp(_mm512_xor_ps(neg_zero, _mm512_mul_ps(z, z)));
    const __m512 erf = _mm512_xor_ps(sign, _mm512_fmadd_ps(_mm512_xor_ps(neg_zero, _mm512_mul_ps(e, t)), r, one));
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(one, erf));
}

/* Rows [m, m + R) of the quantized x times panel j into out, columns [64j, 64j + cols). */
static inline __attribute__((always_inline)) void tile_w8a8(const Job *job, int64_t m, int64_t j,
                                                             int cols, const int R) {
    const int64_t K = job->K, P = K / 4;
    const uint8_t *w = (const uint8_t *)job->w + j * P * NB * 4;
    ActRow a[MR8];
    for (int r = 0; r < R; r++) a[r] = act_row((const char *)job->x, K, m + r);
    __m512 acc[MR8][4];
    for (int r = 0; r < R; r++)
        for (int q = 0; q < 4; q++) acc[r][q] = _mm512_setzero_ps();
    for (int64_t b = 0; b < K / QB; b++) {
        __m512i dot[MR8][4];
        for (int r = 0; r < R; r++)
            for (int q = 0; q < 4; q++) dot[r][q] = _mm512_set1_epi32(-a[r].offset[b]);
        for (int64_t p = b * (QB / 4); p < (b + 1) * (QB / 4); p++) {
            const uint8_t *bp = w + p * NB * 4;
            const __m512i b0 = _mm512_loadu_si512(bp), b1 = _mm512_loadu_si512(bp + 64);
            const __m512i b2 = _mm512_loadu_si512(bp + 128), b3 = _mm512_loadu_si512(bp + 192);
            for (int r = 0; r < R; r++) {
                int32_t quad;
                memcpy(&quad, a[r].q + 4 * p, 4);
                const __m512i av = _mm512_set1_epi32(quad);
                dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], b0, av);
                dot[r][1] = _mm512_dpbusd_epi32(dot[r][1], b1, av);
                dot[r][2] = _mm512_dpbusd_epi32(dot[r][2], b2, av);
                dot[r][3] = _mm512_dpbusd_epi32(dot[r][3], b3, av);
            }
        }
        for (int r = 0; r < R; r++) {
            const __m512 s = _mm512_set1_ps(a[r].scale[b]);
            for (int q = 0; q < 4; q++) acc[r][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][q]), s, acc[r][q]);
        }
    }
    /* stored with constant indices, so that the sums stay in registers above (the
     * partial-panel loop below would make GCC keep them on the stack) */
    float sums[MR8][NB] __attribute__((aligned(64)));
    for (int r = 0; r < R; r++)
        for (int q = 0; q < 4; q++) _mm512_store_ps(sums[r] + 16 * q, acc[r][q]);
    const float *bias = job->bias;
    if (job->gelu_q8) { /* whole panels (N % 64 == 0): its 64 columns are 2 blocks of 32 */
        for (int r = 0; r < R; r++) {
            for (int q = 0; q < 4; q++) {
                const int64_t col = j * NB + 16 * q;
                __m512 y = _mm512_mul_ps(_mm512_load_ps(sums[r] + 16 * q), _mm512_loadu_ps(job->scale + col));
                if (bias != NULL) y = _mm512_add_ps(y, _mm512_loadu_ps(bias + col));
                _mm512_store_ps(sums[r] + 16 * q, gelu16(y));
            }
            const ActRow a_out = act_row((const char *)job->out, job->N, m + r);
            for (int half = 0; half < 2; half++)
                quantize_block(sums[r] + QB * half, DT_F32, (Act *)a_out.q + j * NB + QB * half,
                               (float *)a_out.scale + 2 * j + half, (int32_t *)a_out.offset + 2 * j + half);
        }
        return;
    }
    for (int q = 0; q < 4; q++) {
        const int live = cols - 16 * q;
        if (live <= 0) break;
        const int64_t col = j * NB + 16 * q;
        const __m512 scale = _mm512_loadu_ps(job->scale + col); /* padded */
        for (int r = 0; r < R; r++) {
            __m512 y = _mm512_mul_ps(_mm512_load_ps(sums[r] + 16 * q), scale);
            if (bias != NULL) y = _mm512_add_ps(y, _mm512_loadu_ps(bias + col)); /* padded */
            char *c = (char *)job->out + ((m + r) * job->out_stride + col) * (job->dtype == DT_F32 ? 4 : 2);
            if (live >= 16) {
                store16(c, 0, y, job->dtype);
            } else {
                float lanes[16];
                _mm512_storeu_ps(lanes, y);
                for (int i = 0; i < live; i++) store1(c, i, lanes[i], job->dtype);
            }
        }
    }
}

static void sweep_w8a8(const Job *job, int64_t m0, int64_t m1, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        const int cols = job->N - j * NB < NB ? (int)(job->N - j * NB) : NB;
        int64_t m = m0;
        for (; m + MR8 <= m1; m += MR8) tile_w8a8(job, m, j, cols, MR8);
        if (m1 - m == 2) tile_w8a8(job, m, j, cols, 2);
        if (m1 - m == 1) tile_w8a8(job, m, j, cols, 1);
    }
}

#else /* W8A8_AVX2 */

/* 8 outputs of row m, columns [col, col + live) (live >= 1), from float32 y. */
static inline void store_w8a8(const Job *job, int64_t m, int64_t col, __m256 y, int live) {
    char *c = (char *)job->out + (m * job->out_stride + col) * (job->dtype == DT_F32 ? 4 : 2);
    if (live >= 8 && job->dtype == DT_F32) {
        _mm256_storeu_ps((float *)c, y);
        return;
    }
#ifdef SOBERANA_AVX2
    if (live >= 8) {
        store8(c, 0, y, job->dtype);
        return;
    }
#endif
    float lanes[8];
    _mm256_storeu_ps(lanes, y);
    for (int i = 0; i < (live < 8 ? live : 8); i++) store1(c, i, lanes[i], job->dtype);
}

/* Row m times panel j into out, columns [64j, 64j + cols): the panel read once, in order, 8
 * columns x 4 quads' bytes per vector, each column's 4 products summed into its int32 lane
 * (vpmaddubsw, vpmaddwd: see above), each block's sums scaled into float32. One pass over the
 * whole panel: passes over quarters of it (64 of every 256 bytes) streamed at about half the
 * speed. Each quad's 4 lines AHEAD bytes on are asked for: with them the 30 layers' weights of
 * SmolLM2-135M (106 MB, from L3/DRAM) took 5.4-7.0 ms of thread time a token instead of
 * 7.4-11.2 (3 alternating pairs, one thread, shared host). */
#define AHEAD 2048 /* bytes: the weights are one stream in memory (panels in order) */
static void tile_w8a8(const Job *job, int64_t m, int64_t j, int cols) {
    const int64_t K = job->K, P = K / 4;
    const uint8_t *w = (const uint8_t *)job->w + j * P * NB * 4;
    const ActRow a = act_row((const char *)job->x, K, m);
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256 acc[8];
    for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QB; b++) {
        __m256i dot[8];
        for (int v = 0; v < 8; v++) dot[v] = _mm256_setzero_si256();
        for (int64_t p = b * (QB / 4); p < (b + 1) * (QB / 4); p++) {
            const uint8_t *bp = w + p * NB * 4;
            for (int l = 0; l < 4; l++) _mm_prefetch((const char *)bp + AHEAD + 64 * l, _MM_HINT_T0);
            int32_t quad;
            memcpy(&quad, a.q + 4 * p, 4);
            const __m256i av = _mm256_set1_epi32(quad);
            const __m256i au = _mm256_sign_epi8(av, av); /* |xq|: xq >= -127 */
            for (int v = 0; v < 8; v++) {
                const __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(bp + 32 * v)), flip);
                const __m256i pairs = _mm256_maddubs_epi16(au, _mm256_sign_epi8(q, av));
                dot[v] = _mm256_add_epi32(dot[v], _mm256_madd_epi16(pairs, ones));
            }
        }
        const __m256 s = _mm256_set1_ps(a.scale[b]);
        for (int v = 0; v < 8; v++) acc[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[v]), s, acc[v]);
    }
    const float *bias = job->bias;
    for (int v = 0; v < 8 && 8 * v < cols; v++) {
        const int64_t col = j * NB + 8 * v;
        __m256 y = _mm256_mul_ps(acc[v], _mm256_loadu_ps(job->scale + col)); /* padded */
        if (bias != NULL) y = _mm256_add_ps(y, _mm256_loadu_ps(bias + col)); /* padded */
        store_w8a8(job, m, col, y, cols - 8 * v);
    }
}

static void sweep_w8a8(const Job *job, int64_t m0, int64_t m1, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        const int cols = job->N - j * NB < NB ? (int)(job->N - j * NB) : NB;
        for (int64_t m = m0; m < m1; m++) tile_w8a8(job, m, j, cols);
    }
}
#endif

typedef struct QuantizeArgs {
    const void *x;
    int64_t x_stride, K;
    int dtype;
    char *space; /* act_row_bytes(K) per row */
} QuantizeArgs;

/* Row m of x quantized per block into its ActRow (for_rows' task). */
static void quantize_row(void *arg, int64_t m) {
    const QuantizeArgs *q = arg;
    const ActRow a = act_row(q->space, q->K, m);
    const int64_t x_bytes = q->dtype == DT_F32 ? 4 : 2;
    for (int64_t b = 0; b < q->K / QB; b++)
        quantize_block((const char *)q->x + (m * q->x_stride + b * QB) * x_bytes, q->dtype,
                       (Act *)a.q + b * QB, (float *)a.scale + b, (int32_t *)a.offset + b);
}

/* out [M, N] (rows out_stride apart, `dtype`) = x [M, K] (rows x_stride apart, `dtype`:
 * bfloat16 or float32) quantized per block of 32, times the W8A8-packed weight, plus bias
 * (float32, padded to a multiple of 64) or NULL. */
static int linear_w8a8(const void *x, int64_t x_stride, int64_t M, int64_t K, const uint8_t *w,
                       int64_t N, const float *bias, void *out, int64_t out_stride, int dtype,
                       int32_t threads, void *gomp_parallel) {
    if (check(M, K, N) != OK || K % QB != 0) return UNSUPPORTED;
    if (M == 0) return OK;
    const int64_t n_pad = (N + NB - 1) / NB * NB, row_bytes = act_row_bytes(K);
    char *space = act_space(M * row_bytes);
    if (space == NULL) return NO_MEMORY;
    /* on all the threads: on one, it took ~a fifth of a MiniLM layer's int8 linears' time */
    QuantizeArgs q = {x, x_stride, K, dtype, space};
    for_rows(quantize_row, &q, M, K, threads, gomp_parallel);
    Job job = {space, bias, (const int8_t *)w, (const float *)(w + n_pad * K), out, row_bytes,
               out_stride, M, N, K, threads < 1 ? 1 : threads, 0, dtype, 0};
    run(&job, sweep_w8a8, row_bytes, gomp_parallel);
    return OK;
}

/* Bytes of one row of quantized activations of K inputs (linear_w8a8_gelu_q8's output). */
int64_t w8a8_quantized_row_bytes(int64_t K) { return act_row_bytes(K); }

#if W8A8_VNNI
/* The MLP's first half for the second: xq_out [M rows of w8a8_quantized_row_bytes(N)] = the
 * rows of GELU(x W^T + bias) quantized per block of 32 as linear_w8a8 quantizes its x, so
 * that the [M, N] float32 activations never reach memory (for MiniLM's 1536-wide MLP they
 * were written, read and written by GELU, read again to quantize). x float32 or bfloat16
 * (`dtype`); N a multiple of 64. OK, UNSUPPORTED or NO_MEMORY. */
int linear_w8a8_gelu_q8(const void *x, int64_t x_stride, int64_t M, int64_t K, const uint8_t *w,
                        int64_t N, const float *bias, void *xq_out, int32_t dtype, int32_t threads,
                        void *gomp_parallel) {
    if (check(M, K, N) != OK || K % QB != 0 || N % NB != 0 || (dtype != DT_F32 && dtype != DT_BF16))
        return UNSUPPORTED;
    if (M == 0) return OK;
    const int64_t n_pad = N, row_bytes = act_row_bytes(K);
    char *space = act_space(M * row_bytes);
    if (space == NULL) return NO_MEMORY;
    QuantizeArgs q = {x, x_stride, K, dtype, space};
    for_rows(quantize_row, &q, M, K, threads, gomp_parallel);
    Job job = {space, bias, (const int8_t *)w, (const float *)(w + n_pad * K), xq_out, row_bytes,
               0, M, N, K, threads < 1 ? 1 : threads, 0, DT_F32, 1};
    run(&job, sweep_w8a8, row_bytes, gomp_parallel);
    return OK;
}

/* linear_w8a8 of activations already quantized (xq: M rows of w8a8_quantized_row_bytes(K),
 * from linear_w8a8_gelu_q8); out float32 or bfloat16 (`dtype`). */
int linear_w8a8_q8(const void *xq, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                   const float *bias, void *out, int64_t out_stride, int32_t dtype, int32_t threads,
                   void *gomp_parallel) {
    if (check(M, K, N) != OK || K % QB != 0 || (dtype != DT_F32 && dtype != DT_BF16)) return UNSUPPORTED;
    if (M == 0) return OK;
    const int64_t n_pad = (N + NB - 1) / NB * NB, row_bytes = act_row_bytes(K);
    Job job = {xq, bias, (const int8_t *)w, (const float *)(w + n_pad * K), out, row_bytes,
               out_stride, M, N, K, threads < 1 ? 1 : threads, 0, dtype, 0};
    run(&job, sweep_w8a8, row_bytes, gomp_parallel);
    return OK;
}
#endif

#else
int64_t linear_w8a8_packed_bytes(int64_t N, int64_t K) {
    (void)N, (void)K;
    return 0;
}
int pack_w8a8(const int8_t *q, int64_t q_stride, const float *scale, int64_t N, int64_t K,
              uint8_t *out) {
    (void)q, (void)q_stride, (void)scale, (void)N, (void)K, (void)out;
    return UNSUPPORTED;
}
static int linear_w8a8(const void *x, int64_t x_stride, int64_t M, int64_t K, const uint8_t *w,
                       int64_t N, const float *bias, void *out, int64_t out_stride, int dtype,
                       int32_t threads, void *gomp_parallel) {
    (void)x, (void)x_stride, (void)M, (void)K, (void)w, (void)N, (void)bias, (void)out;
    (void)out_stride, (void)dtype, (void)threads, (void)gomp_parallel;
    return UNSUPPORTED;
}
#endif

#if !(W8A8_VNNI || W8A8_AVX2)
int64_t w8a8_quantized_row_bytes(int64_t K) {
    (void)K;
    return 0;
}
#endif
#if !W8A8_VNNI
int linear_w8a8_gelu_q8(const void *x, int64_t x_stride, int64_t M, int64_t K, const uint8_t *w,
                        int64_t N, const float *bias, void *xq_out, int32_t dtype, int32_t threads,
                        void *gomp_parallel) {
    (void)x, (void)x_stride, (void)M, (void)K, (void)w, (void)N, (void)bias, (void)xq_out;
    (void)dtype, (void)threads, (void)gomp_parallel;
    return UNSUPPORTED;
}
int linear_w8a8_q8(const void *xq, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                   const float *bias, void *out, int64_t out_stride, int32_t dtype, int32_t threads,
                   void *gomp_parallel) {
    (void)xq, (void)M, (void)K, (void)w, (void)N, (void)bias, (void)out, (void)out_stride;
    (void)dtype, (void)threads, (void)gomp_parallel;
    return UNSUPPORTED;
}
#endif

/* The W8A8 linear for bfloat16 x and out: the signature of linear_bf16 (the decoder stack's
 * LinearFn, cpu_forward.h), bias float32 padded. OK, UNSUPPORTED (no W8A8 path in this build,
 * K not a multiple of 32) or NO_MEMORY. */
int linear_w8a8_bf16(const uint16_t *x, int64_t x_stride, int64_t M, int64_t K, const uint8_t *w,
                     int64_t N, const float *bias, uint16_t *out, int64_t out_stride,
                     int32_t threads, void *gomp_parallel) {
    return linear_w8a8(x, x_stride, M, K, w, N, bias, out, out_stride, DT_BF16, threads, gomp_parallel);
}

/* As linear_w8a8_bf16 with x and out float32. */
int linear_w8a8_f32(const float *x, int64_t x_stride, int64_t M, int64_t K, const uint8_t *w,
                    int64_t N, const float *bias, float *out, int64_t out_stride, int32_t threads,
                    void *gomp_parallel) {
    return linear_w8a8(x, x_stride, M, K, w, N, bias, out, out_stride, DT_F32, threads, gomp_parallel);
}

/* The layers of a bidirectional encoder (BERT, XLM-R) over a packed batch, one call each:
 * attention of variable-length sequences read straight from the fused QKV projection, and
 * residual add + LayerNorm.
 *
 * A packed batch concatenates its sequences ([T, hidden] rows, no padding). In PyTorch ops the
 * attention needs the sequences apart: a gather into padded groups of similar length, one SDPA
 * per group, a scatter back; with MiniLM's 32-wide heads the gather and scatter cost more than
 * the attention's math. Here each (sequence, head) is one task: its keys, transposed, and its
 * values are copied once into float32 scratch, and blocks of 8 queries meet them with the
 * scores in registers. Sums are float32 in another order than PyTorch's, so results differ
 * from `scaled_dot_product_attention` in the last bits (bfloat16 outputs rounded once).
 *
 * Built and called by soberana/ops/cpu/kernels.py (plain C, compiled at first use); tasks are
 * shared among torch's OpenMP threads (rows.h).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dtypes.h"
#include "rows.h"
#include "simd.h"

enum { OK = 0, UNSUPPORTED = 1, NO_MEMORY = 3 };
#define QR 8 /* queries per block: their scores of one key chunk in 8 registers */

/* 1 where this build has the vectorised attention and LayerNorm (AVX-512 or AVX2 + FMA:
 * simd.h's `vec`), else 0 (the PyTorch path is faster than this file's plain loops there:
 * ops/backend.py chooses it). */
int encoder_attention_simd(void) {
#ifdef SOBERANA_VEC
    return 1;
#else
    return 0;
#endif
}

/* ---- attention of packed sequences --------------------------------------------------- */

typedef struct AttnArgs {
    const void *qkv; /* [T, 3 * H * D]: q heads, then k heads, then v heads */
    void *out;       /* [T, H * D] */
    const int64_t *starts; /* [num_seqs + 1] row offsets of the sequences */
    int64_t qkv_stride, out_stride, num_heads, head_dim;
    int dtype;
    float scale;
    int failed; /* a task found no memory for its scratch */
} AttnArgs;

#ifdef SOBERANA_VEC
enum { KEY_CHUNK = VEC_LANES }; /* keys per score vector; Lp is L rounded up to it */
/* Score vectors (key chunks) per pass of QK^T and value vectors per pass of PV: with AVX-512's
 * 32 registers two of each, 16 accumulators for 8 queries, so that each broadcast query
 * element (or probability) meets two vectors: one load per FMA was the bound, 58 GFLOP/s of
 * MiniLM's attention on one Emerald Rapids thread. AVX2's 16 registers hold one. */
enum { PASS = VEC_LANES == 16 ? 2 : 1 };

/* Queries [i0, i0 + R) of one (sequence, head): qs [L][D] its queries times the scale, kt
 * [D][Lp] keys transposed (zero past L), v [L][D] values, s [QR][Lp] scratch for the
 * probabilities. One body for AVX-512 (16 keys a chunk) and AVX2 (8). */
static inline __attribute__((always_inline)) void query_block(
    const AttnArgs *a, const float *qs, char *out_rows, int64_t i0, int64_t L, int64_t Lp,
    const float *kt, const float *v, float *s, const int R) {
    const int64_t D = a->head_dim, esz = a->dtype == DT_F32 ? 4 : 2;
    const float(*q)[D] = (const float(*)[D])(qs + i0 * D);
    vec top[QR];
    for (int r = 0; r < R; r++) top[r] = vec_set1(-INFINITY);
    const int tail = (int)(L % KEY_CHUNK); /* live keys of the last chunk, where partial */
    int64_t j = 0;
    for (; j + PASS * KEY_CHUNK <= Lp; j += PASS * KEY_CHUNK) {
        vec acc[QR][PASS];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < PASS; c++) acc[r][c] = vec_zero();
        for (int64_t d = 0; d < D; d++) {
            vec k[PASS];
            for (int c = 0; c < PASS; c++) k[c] = vec_loadu(kt + d * Lp + j + c * KEY_CHUNK);
            for (int r = 0; r < R; r++) {
                const vec qd = vec_set1(q[r][d]);
                for (int c = 0; c < PASS; c++) acc[r][c] = vec_fmadd(qd, k[c], acc[r][c]);
            }
        }
        for (int c = 0; c < PASS; c++) {
            const int partial = j + (c + 1) * KEY_CHUNK > L;
            for (int r = 0; r < R; r++) {
                if (partial) acc[r][c] = vec_first_or(acc[r][c], tail, vec_set1(-INFINITY));
                vec_storeu(s + r * Lp + j + c * KEY_CHUNK, acc[r][c]);
                top[r] = vec_max(top[r], acc[r][c]);
            }
        }
    }
    for (; j < Lp; j += KEY_CHUNK) { /* a last single chunk */
        vec acc[QR];
        for (int r = 0; r < R; r++) acc[r] = vec_zero();
        for (int64_t d = 0; d < D; d++) {
            const vec k = vec_loadu(kt + d * Lp + j);
            for (int r = 0; r < R; r++) acc[r] = vec_fmadd(vec_set1(q[r][d]), k, acc[r]);
        }
        const int partial = j + KEY_CHUNK > L;
        for (int r = 0; r < R; r++) {
            if (partial) acc[r] = vec_first_or(acc[r], tail, vec_set1(-INFINITY));
            vec_storeu(s + r * Lp + j, acc[r]);
            top[r] = vec_max(top[r], acc[r]);
        }
    }
    float inv[QR];
    for (int r = 0; r < R; r++) {
        const vec m = vec_set1(vec_reduce_max(top[r]));
        vec sum = vec_zero();
        for (int64_t jj = 0; jj < Lp; jj += KEY_CHUNK) {
            /* the padded keys' -inf gives 0 (vec_exp: never a subnormal, whose microcode
             * assist took ~30% of this kernel's time on Emerald Rapids) */
            const vec p = vec_exp(vec_sub(vec_loadu(s + r * Lp + jj), m));
            vec_storeu(s + r * Lp + jj, p);
            sum = vec_add(sum, p);
        }
        inv[r] = 1.0f / vec_sum(sum);
    }
    for (int64_t c = 0; c < D; c += PASS * VEC_LANES) {
        const int width = D - c >= PASS * VEC_LANES ? PASS : 1; /* D a multiple of 16 */
        vec acc[QR][PASS];
        for (int r = 0; r < R; r++)
            for (int w = 0; w < PASS; w++) acc[r][w] = vec_zero();
        if (width == PASS) {
            for (int64_t jj = 0; jj < L; jj++) {
                vec vj[PASS];
                for (int w = 0; w < PASS; w++) vj[w] = vec_loadu(v + jj * D + c + w * VEC_LANES);
                for (int r = 0; r < R; r++) {
                    const vec p = vec_set1(s[r * Lp + jj]);
                    for (int w = 0; w < PASS; w++) acc[r][w] = vec_fmadd(p, vj[w], acc[r][w]);
                }
            }
        } else {
            for (int64_t jj = 0; jj < L; jj++) {
                const vec vj = vec_loadu(v + jj * D + c);
                for (int r = 0; r < R; r++) acc[r][0] = vec_fmadd(vec_set1(s[r * Lp + jj]), vj, acc[r][0]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int w = 0; w < width; w++)
                vec_store(out_rows + (i0 + r) * a->out_stride * esz, c + w * VEC_LANES,
                          vec_mul(acc[r][w], vec_set1(inv[r])), a->dtype);
    }
}
#else
enum { KEY_CHUNK = 16 };

/* The same steps in plain loops, one query at a time. */
static void query_block(const AttnArgs *a, const float *qs, char *out_rows, int64_t i0,
                        int64_t L, int64_t Lp, const float *kt, const float *v, float *s, int R) {
    const int64_t D = a->head_dim, esz = a->dtype == DT_F32 ? 4 : 2;
    for (int r = 0; r < R; r++) {
        float acc[128];
        const float *q = qs + (i0 + r) * D;
        float top = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < L; j++) {
            float x = 0.0f;
            for (int64_t d = 0; d < D; d++) x += q[d] * kt[d * Lp + j];
            s[j] = x;
            top = x > top ? x : top;
        }
        for (int64_t j = 0; j < L; j++) sum += (s[j] = expf(s[j] - top));
        for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
        for (int64_t j = 0; j < L; j++)
            for (int64_t d = 0; d < D; d++) acc[d] += s[j] * v[j * D + d];
        for (int64_t d = 0; d < D; d++)
            store1(out_rows + (i0 + r) * a->out_stride * esz, d, acc[d] / sum, a->dtype);
    }
}
#endif

/* A thread's scratch for one task, grown as needed and kept (a task is ~L^2 D multiply-adds:
 * a malloc and free each showed in profiles of MiniLM's short sequences). */
static __thread void *attn_scratch;
static __thread int64_t attn_capacity;

/* dst[0, n) = row[at, at + n) (dtype) times scale, as float32 (n a multiple of 16). */
static void copy_row(float *dst, const char *row, int64_t at, int64_t n, float scale, int dtype) {
#ifdef SOBERANA_VEC
    const int64_t esz = dtype == DT_F32 ? 4 : 2;
    for (int64_t d = 0; d < n; d += VEC_LANES)
        vec_storeu(dst + d, vec_mul(vec_load(row + at * esz, d, dtype), vec_set1(scale)));
#else
    for (int64_t d = 0; d < n; d++) dst[d] = load1(row, at + d, dtype) * scale;
#endif
}

/* kt [D][Lp] = k [L][D] transposed, zeros past L (k has room for Lp rows; D a multiple of
 * 16, Lp of the vector width): by blocks in registers, a quarter of the scalar loop's time. */
static void transpose_keys(float *kt, float *k, int64_t L, int64_t Lp, int64_t D) {
    for (int64_t j = L; j < Lp; j++)
        for (int64_t d = 0; d < D; d++) k[j * D + d] = 0.0f;
#if defined(__AVX512F__)
    for (int64_t j = 0; j < Lp; j += 16)
        for (int64_t d = 0; d < D; d += 16) transpose16(kt + d * Lp + j, Lp, k + j * D + d, D);
#elif defined(SOBERANA_AVX2)
    for (int64_t j = 0; j < Lp; j += 8)
        for (int64_t d = 0; d < D; d += 8) transpose8(kt + d * Lp + j, Lp, k + j * D + d, D);
#else
    for (int64_t j = 0; j < Lp; j++)
        for (int64_t d = 0; d < D; d++) kt[d * Lp + j] = k[j * D + d];
#endif
}

/* Task b * H + h: head h of sequence b, all its queries. Its q (scaled), k (transposed) and
 * v are copied first, in one pass down the rows that asks for the lines 8 rows ahead: the
 * rows are 3 H D elements apart, a stride the hardware prefetchers did not follow, and the
 * copy's cache misses were ~20% of the kernel's time (perf, MiniLM, Emerald Rapids). */
static void attend(void *arg, int64_t task) {
    AttnArgs *a = arg;
    const int64_t H = a->num_heads, D = a->head_dim, b = task / H, h = task % H;
    const int64_t first = a->starts[b], L = a->starts[b + 1] - first, Lp = (L + KEY_CHUNK - 1) / KEY_CHUNK * KEY_CHUNK;
    const int64_t esz = a->dtype == DT_F32 ? 4 : 2, stride = a->qkv_stride * esz;
    if (L <= 0) return;
    const int64_t s_floats = QR * Lp > Lp * D ? QR * Lp : Lp * D; /* probabilities, or k rows */
    float *qs = thread_scratch(&attn_scratch, &attn_capacity,
                               (L * D + D * Lp + L * D + s_floats) * (int64_t)sizeof(float));
    if (qs == NULL) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    float *kt = qs + L * D, *v = kt + D * Lp, *s = v + L * D;
    const char *rows = (const char *)a->qkv + first * stride;
    enum { AHEAD = 8 };
    for (int64_t j = 0; j < L; j++) {
        const char *row = rows + j * stride;
        if (j + AHEAD < L)
            for (int part = 0; part < 3; part++)
                for (int64_t byte = 0; byte < D * esz; byte += 64)
                    __builtin_prefetch(row + AHEAD * stride + ((part * H + h) * D) * esz + byte, 0, 3);
        copy_row(qs + j * D, row, h * D, D, a->scale, a->dtype);
        copy_row(v + j * D, row, (2 * H + h) * D, D, 1.0f, a->dtype);
        copy_row(s + j * D, row, (H + h) * D, D, 1.0f, a->dtype); /* k, to transpose below */
    }
    transpose_keys(kt, s, L, Lp, D);
    char *out_rows = (char *)a->out + (first * a->out_stride + h * D) * esz;
    int64_t i = 0;
    for (; i + QR <= L; i += QR) query_block(a, qs, out_rows, i, L, Lp, kt, v, s, QR);
    switch (L - i) {
    case 7: query_block(a, qs, out_rows, i, L, Lp, kt, v, s, 7); break;
    case 6: query_block(a, qs, out_rows, i, L, Lp, kt, v, s, 6); break;
    case 5: query_block(a, qs, out_rows, i, L, Lp, kt, v, s, 5); break;
    case 4: query_block(a, qs, out_rows, i, L, Lp, kt, v, s, 4); break;
    case 3: query_block(a, qs, out_rows, i, L, Lp, kt, v, s, 3); break;
    case 2: query_block(a, qs, out_rows, i, L, Lp, kt, v, s, 2); break;
    case 1: query_block(a, qs, out_rows, i, L, Lp, kt, v, s, 1); break;
    default: break;
    }
}

/* out [T, H * D] = softmax(q k^T * scale) v of every head of every sequence, where sequence b
 * is rows [starts[b], starts[b + 1]) of qkv [T, 3 * H * D] (q, k, v heads in that order) and
 * attends to its own rows only, all of them. Strides in elements. Returns OK, UNSUPPORTED
 * (head_dim not a multiple of 16 or over 128, or float16 without compiler support) or
 * NO_MEMORY. */
int encoder_attention(const void *qkv, int64_t qkv_stride, const int64_t *starts,
                      int64_t num_seqs, int64_t num_heads, int64_t head_dim, int32_t dtype,
                      float scale, void *out, int64_t out_stride, int32_t threads,
                      void *gomp_parallel) {
    if (head_dim <= 0 || head_dim % 16 != 0 || head_dim > 128 || num_heads <= 0) return UNSUPPORTED;
    if (dtype == DT_F16 && !HAVE_F16) return UNSUPPORTED;
    AttnArgs a = {qkv, out, starts, qkv_stride, out_stride, num_heads, head_dim, dtype, scale, 0};
    int64_t longest = 0;
    for (int64_t b = 0; b < num_seqs; b++)
        if (starts[b + 1] - starts[b] > longest) longest = starts[b + 1] - starts[b];
    /* a task's work: ~L^2 D multiply-adds (for_rows shares tasks once they add up) */
    for_rows(attend, &a, num_seqs * num_heads, longest * longest * head_dim / 16, threads,
             gomp_parallel);
    return a.failed ? NO_MEMORY : OK;
}

/* ---- residual add + LayerNorm ------------------------------------------------------------ */

typedef struct LayerNormArgs {
    const void *x, *residual, *weight, *bias;
    void *out;
    int64_t x_stride, res_stride, out_stride, hidden;
    int dtype;
    float eps;
} LayerNormArgs;

/* F.layer_norm(x + residual): the sum rounded to the dtype (PyTorch's add), mean and variance
 * in float32 (two passes over the row), the output rounded once. */
static inline __attribute__((always_inline)) void layer_norm_impl(const LayerNormArgs *a,
                                                                  int64_t row, const int dt) {
    const int64_t H = a->hidden, esz = dt == DT_F32 ? 4 : 2;
    const char *x = (const char *)a->x + row * a->x_stride * esz;
    const char *res = a->residual == NULL ? NULL : (const char *)a->residual + row * a->res_stride * esz;
    char *out = (char *)a->out + row * a->out_stride * esz;
    float buf[H];
    int64_t i = 0;
    float mean = 0.0f, var = 0.0f;
#ifdef SOBERANA_VEC
    if (H % VEC_LANES == 0) {
        vec sum = vec_zero();
        for (; i < H; i += VEC_LANES) {
            vec y = vec_load(x, i, dt);
            if (res != NULL) y = vec_round(vec_add(y, vec_load(res, i, dt)), dt);
            vec_storeu(buf + i, y);
            sum = vec_add(sum, y);
        }
        mean = vec_sum(sum) / (float)H;
        const vec m = vec_set1(mean);
        vec sq = vec_zero();
        for (i = 0; i < H; i += VEC_LANES) {
            const vec c = vec_sub(vec_loadu(buf + i), m);
            sq = vec_fmadd(c, c, sq);
        }
        var = vec_sum(sq) / (float)H;
        const vec rstd = vec_set1(1.0f / sqrtf(var + a->eps));
        for (i = 0; i < H; i += VEC_LANES) {
            const vec c = vec_mul(vec_sub(vec_loadu(buf + i), m), rstd);
            vec_store(out, i, vec_fmadd(c, vec_load(a->weight, i, dt), vec_load(a->bias, i, dt)), dt);
        }
        return;
    }
#endif
    for (i = 0; i < H; i++) {
        float y = load1(x, i, dt);
        if (res != NULL) {
            y += load1(res, i, dt);
            if (dt != DT_F32) y = dt == DT_BF16 ? bf16_to_f32(f32_to_bf16(y)) : f16_to_f32(f32_to_f16(y));
        }
        buf[i] = y;
        mean += y;
    }
    mean /= (float)H;
    for (i = 0; i < H; i++) var += (buf[i] - mean) * (buf[i] - mean);
    const float rstd = 1.0f / sqrtf(var / (float)H + a->eps);
    for (i = 0; i < H; i++)
        store1(out, i, (buf[i] - mean) * rstd * load1(a->weight, i, dt) + load1(a->bias, i, dt), dt);
}

static void layer_norm_row(void *arg, int64_t row) {
    const LayerNormArgs *a = arg;
    if (a->dtype == DT_BF16) layer_norm_impl(a, row, DT_BF16);
    else if (a->dtype == DT_F32) layer_norm_impl(a, row, DT_F32);
    else layer_norm_impl(a, row, a->dtype);
}

/* out[r] = LayerNorm(x[r] + residual[r]) * weight + bias (residual may be NULL) for `rows`
 * rows of `hidden` elements, all in `dtype`; strides in elements; out may be x. */
int add_layer_norm(const void *x, int64_t x_stride, const void *residual, int64_t res_stride,
                   const void *weight, const void *bias, void *out, int64_t out_stride,
                   int64_t rows, int64_t hidden, int32_t dtype, float eps, int32_t threads,
                   void *gomp_parallel) {
    if (dtype == DT_F16 && !HAVE_F16) return UNSUPPORTED;
    if (hidden <= 0 || hidden > 16384) return UNSUPPORTED; /* the row buffer lives on the stack */
    LayerNormArgs a = {x, residual, weight, bias, out, x_stride, res_stride, out_stride, hidden,
                       dtype, eps};
    for_rows(layer_norm_row, &a, rows, 3 * hidden, threads, gomp_parallel);
    return OK;
}

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
#define QR 8 /* queries per block: their scores of 16 keys in 8 registers */

/* 1 where this build has the vectorised attention (AVX-512), else 0 (the PyTorch path is
 * faster than this file's plain loops there: ops/backend.py chooses it). */
int encoder_attention_simd(void) {
#ifdef __AVX512F__
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

#ifdef __AVX512F__
/* Queries [i0, i0 + R) of one (sequence, head): kt [D][Lp] keys transposed (zero past L),
 * v [L][D] values, s [QR][Lp] scratch for the probabilities. */
static inline __attribute__((always_inline)) void query_block(
    const AttnArgs *a, const char *q_rows, char *out_rows, int64_t i0, int64_t L, int64_t Lp,
    const float *kt, const float *v, float *s, const int R) {
    const int64_t D = a->head_dim, esz = a->dtype == DT_F32 ? 4 : 2;
    float q[QR][128];
    for (int r = 0; r < R; r++)
        for (int64_t d = 0; d < D; d++)
            q[r][d] = load1(q_rows + (i0 + r) * a->qkv_stride * esz, d, a->dtype) * a->scale;
    __m512 top[QR];
    for (int r = 0; r < R; r++) top[r] = _mm512_set1_ps(-INFINITY);
    const __mmask16 tail = (__mmask16)((1u << (L % 16)) - 1); /* live keys of the last chunk */
    for (int64_t j = 0; j < Lp; j += 16) {
        __m512 acc[QR];
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d++) {
            const __m512 k = _mm512_loadu_ps(kt + d * Lp + j);
            for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d]), k, acc[r]);
        }
        const int partial = j + 16 > L;
        for (int r = 0; r < R; r++) {
            if (partial) acc[r] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), tail, acc[r]);
            _mm512_storeu_ps(s + r * Lp + j, acc[r]);
            top[r] = _mm512_max_ps(top[r], acc[r]);
        }
    }
    float inv[QR];
    for (int r = 0; r < R; r++) {
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top[r]));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < Lp; j += 16) {
            __m512 p = vec_exp(_mm512_sub_ps(_mm512_loadu_ps(s + r * Lp + j), m));
            if (j + 16 > L) p = _mm512_maskz_mov_ps(tail, p);
            _mm512_storeu_ps(s + r * Lp + j, p);
            sum = _mm512_add_ps(sum, p);
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    for (int64_t c = 0; c < D; c += 16) {
        __m512 acc[QR];
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t j = 0; j < L; j++) {
            const __m512 vj = _mm512_loadu_ps(v + j * D + c);
            for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * Lp + j]), vj, acc[r]);
        }
        for (int r = 0; r < R; r++)
            store16(out_rows + (i0 + r) * a->out_stride * esz, c,
                    _mm512_mul_ps(acc[r], _mm512_set1_ps(inv[r])), a->dtype);
    }
}
#else
/* The same steps in plain loops, one query at a time. */
static void query_block(const AttnArgs *a, const char *q_rows, char *out_rows, int64_t i0,
                        int64_t L, int64_t Lp, const float *kt, const float *v, float *s, int R) {
    const int64_t D = a->head_dim, esz = a->dtype == DT_F32 ? 4 : 2;
    for (int r = 0; r < R; r++) {
        float q[128], acc[128];
        for (int64_t d = 0; d < D; d++)
            q[d] = load1(q_rows + (i0 + r) * a->qkv_stride * esz, d, a->dtype) * a->scale;
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

/* Task b * H + h: head h of sequence b, all its queries. */
static void attend(void *arg, int64_t task) {
    AttnArgs *a = arg;
    const int64_t H = a->num_heads, D = a->head_dim, b = task / H, h = task % H;
    const int64_t first = a->starts[b], L = a->starts[b + 1] - first, Lp = (L + 15) / 16 * 16;
    const int64_t esz = a->dtype == DT_F32 ? 4 : 2;
    if (L <= 0) return;
    float *kt = malloc((size_t)(D * Lp + L * D + QR * Lp) * sizeof(float));
    if (kt == NULL) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    float *v = kt + D * Lp, *s = v + L * D;
    const char *rows = (const char *)a->qkv + first * a->qkv_stride * esz;
    for (int64_t j = 0; j < L; j++) {
        const char *row = rows + j * a->qkv_stride * esz;
        for (int64_t d = 0; d < D; d++) {
            kt[d * Lp + j] = load1(row, (H + h) * D + d, a->dtype);
            v[j * D + d] = load1(row, (2 * H + h) * D + d, a->dtype);
        }
    }
    for (int64_t d = 0; d < D; d++)
        for (int64_t j = L; j < Lp; j++) kt[d * Lp + j] = 0.0f;
    const char *q_rows = rows + h * D * esz;
    char *out_rows = (char *)a->out + (first * a->out_stride + h * D) * esz;
    int64_t i = 0;
    for (; i + QR <= L; i += QR) query_block(a, q_rows, out_rows, i, L, Lp, kt, v, s, QR);
    switch (L - i) {
    case 7: query_block(a, q_rows, out_rows, i, L, Lp, kt, v, s, 7); break;
    case 6: query_block(a, q_rows, out_rows, i, L, Lp, kt, v, s, 6); break;
    case 5: query_block(a, q_rows, out_rows, i, L, Lp, kt, v, s, 5); break;
    case 4: query_block(a, q_rows, out_rows, i, L, Lp, kt, v, s, 4); break;
    case 3: query_block(a, q_rows, out_rows, i, L, Lp, kt, v, s, 3); break;
    case 2: query_block(a, q_rows, out_rows, i, L, Lp, kt, v, s, 2); break;
    case 1: query_block(a, q_rows, out_rows, i, L, Lp, kt, v, s, 1); break;
    default: break;
    }
    free(kt);
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
#ifdef __AVX512F__
    if (H % 16 == 0) {
        __m512 sum = _mm512_setzero_ps();
        for (; i < H; i += 16) {
            __m512 y = load16(x, i, dt);
            if (res != NULL) y = round16(_mm512_add_ps(y, load16(res, i, dt)), dt);
            _mm512_storeu_ps(buf + i, y);
            sum = _mm512_add_ps(sum, y);
        }
        mean = _mm512_reduce_add_ps(sum) / (float)H;
        const __m512 m = _mm512_set1_ps(mean);
        __m512 sq = _mm512_setzero_ps();
        for (i = 0; i < H; i += 16) {
            const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(buf + i), m);
            sq = _mm512_fmadd_ps(c, c, sq);
        }
        var = _mm512_reduce_add_ps(sq) / (float)H;
        const __m512 rstd = _mm512_set1_ps(1.0f / sqrtf(var + a->eps));
        for (i = 0; i < H; i += 16) {
            const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buf + i), m), rstd);
            store16(out, i, _mm512_fmadd_ps(c, load16(a->weight, i, dt), load16(a->bias, i, dt)), dt);
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

/* The small per-token layers of a CPU forward pass in one call each: add + RMSNorm, rotary
 * embedding with the KV-cache write, SiLU-and-mul; and the greedy argmax over the logits.
 *
 * In PyTorch ops each of these is 5-12 ops, each a dispatch (~5-15 us) and a trip through
 * memory: in a decode step of 64 tokens of a 125M model they cost more than the attention's
 * math. They round where soberana/ops/layers.py's torch_* functions (transformers' ops) round:
 * every op of theirs that stores a bfloat16/float16 tensor is a rounding here; sums are float32
 * in a different order, so float32 results can differ in the last bits.
 *
 * Built and called by soberana/ops/cpu/kernels.py (plain C, compiled at first use). Rows are
 * shared among torch's OpenMP threads (through GOMP_parallel) when there are enough of them.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dtypes.h"
#include "rows.h"
#include "simd.h"

/* x as stored in `dtype` and read back: the rounding of a PyTorch op's output. */
static inline float round_to(float x, int dtype) {
    if (dtype == DT_F32) return x;
    return dtype == DT_BF16 ? bf16_to_f32(f32_to_bf16(x)) : f16_to_f32(f32_to_f16(x));
}

/* ---- add + RMSNorm ------------------------------------------------------------------ */

typedef struct NormArgs {
    const void *x, *residual, *weight;
    void *out, *residual_out;
    int64_t x_stride, res_stride, out_stride, res_out_stride, hidden;
    int dtype, weight_dtype;
    float eps;
} NormArgs;

/* torch_rms_norm(x + residual) for one row: the sum rounded to the dtype (PyTorch's add),
 * float32 mean of squares, x * rsqrt(.) rounded, times the weight, rounded again. */
static inline __attribute__((always_inline)) void norm_impl(const NormArgs *a, int64_t row,
                                                            const int dt, const int wdt) {
    const int64_t H = a->hidden;
    const void *x = (const char *)a->x + row * a->x_stride * (dt == DT_F32 ? 4 : 2);
    const int promoted = wdt != dt && dt != DT_F32; /* a float32 weight: out is float32 */
    void *out = (char *)a->out + row * a->out_stride * (dt == DT_F32 || promoted ? 4 : 2);
    float buf[H]; /* the summed row, as stored */
#ifdef SOBERANA_VEC
    if (H % VEC_LANES == 0) {
        const void *res = (const char *)a->residual + row * a->res_stride * (dt == DT_F32 ? 4 : 2);
        void *res_out = (char *)a->residual_out + row * a->res_out_stride * (dt == DT_F32 ? 4 : 2);
        vec squares = vec_zero();
        for (int64_t i = 0; i < H; i += VEC_LANES) {
            vec v = vec_load(x, i, dt);
            if (a->residual != NULL) {
                v = vec_round(vec_add(v, vec_load(res, i, dt)), dt);
                vec_store(res_out, i, v, dt);
            }
            vec_storeu(buf + i, v);
            squares = vec_fmadd(v, v, squares);
        }
        const vec inv = vec_set1(1.0f / sqrtf(vec_sum(squares) / (float)H + a->eps));
        for (int64_t i = 0; i < H; i += VEC_LANES) {
            const vec y = vec_mul(vec_round(vec_mul(vec_loadu(buf + i), inv), dt),
                                  vec_load(a->weight, i, wdt));
            vec_store(out, i, y, promoted ? DT_F32 : dt);
        }
        return;
    }
#endif
    if (a->residual != NULL) {
        const void *res = (const char *)a->residual + row * a->res_stride * (dt == DT_F32 ? 4 : 2);
        void *res_out = (char *)a->residual_out + row * a->res_out_stride * (dt == DT_F32 ? 4 : 2);
        for (int64_t i = 0; i < H; i++) {
            buf[i] = round_to(load1(x, i, dt) + load1(res, i, dt), dt);
            store1(res_out, i, buf[i], dt);
        }
    } else {
        for (int64_t i = 0; i < H; i++) buf[i] = load1(x, i, dt);
    }
    float part[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= H; i += 16)
        for (int l = 0; l < 16; l++) part[l] += buf[i + l] * buf[i + l];
    for (; i < H; i++) part[0] += buf[i] * buf[i];
    float sum = 0.0f;
    for (int l = 0; l < 16; l++) sum += part[l];
    const float inv = 1.0f / sqrtf(sum / (float)H + a->eps);
    if (!promoted) /* out = round(round(x * inv) * w) */
        for (i = 0; i < H; i++)
            store1(out, i, round_to(buf[i] * inv, dt) * load1(a->weight, i, wdt), dt);
    else /* a float32 weight promotes: the product stays float32 */
        for (i = 0; i < H; i++)
            ((float *)out)[i] = round_to(buf[i] * inv, dt) * load1(a->weight, i, wdt);
}

static void norm_row(void *arg, int64_t row) {
    const NormArgs *a = arg;
    if (a->dtype == DT_BF16 && a->weight_dtype == DT_BF16) norm_impl(a, row, DT_BF16, DT_BF16);
    else if (a->dtype == DT_F32 && a->weight_dtype == DT_F32) norm_impl(a, row, DT_F32, DT_F32);
    else norm_impl(a, row, a->dtype, a->weight_dtype);
}

/* out[r] = RMSNorm(x[r] (+ residual[r])) * weight for `rows` rows of `hidden` elements;
 * with residual, residual_out[r] = x[r] + residual[r] (it may be residual itself). Strides
 * are in elements. out is in `dtype`, or float32 where a float32 weight promotes it. */
int add_rms_norm(const void *x, int64_t x_stride, const void *residual, int64_t res_stride,
                 void *residual_out, int64_t res_out_stride, const void *weight, void *out,
                 int64_t out_stride, int64_t rows, int64_t hidden, int32_t dtype,
                 int32_t weight_dtype, float eps, int32_t threads, void *gomp_parallel) {
    if ((dtype == DT_F16 || weight_dtype == DT_F16) && !HAVE_F16) return 1;
    if (hidden <= 0 || hidden > 16384) return 1; /* the row buffer lives on the stack */
    NormArgs a = {x, residual, weight, out, residual_out, x_stride, res_stride, out_stride,
                  res_out_stride, hidden, dtype, weight_dtype, eps};
    for_rows(norm_row, &a, rows, 3 * hidden, threads, gomp_parallel);
    return 0;
}

/* ---- SiLU-and-mul ------------------------------------------------------------------- */

typedef struct SiluArgs {
    const void *gate_up;
    void *out;
    int64_t in_stride, out_stride, inter;
    int dtype;
} SiluArgs;

/* exp(x), ~1 ulp like the Sleef exp PyTorch uses: x = n ln2 + r, Cephes' degree-5 polynomial
 * in r, times 2^n in two halves through the exponent bits, so that it overflows to inf where
 * expf does. x is clamped to [-87.33, 104] (NaN passes) and the result is 0 below -87.33, as
 * vec_exp: never a subnormal (a microcode assist), ~0 next to the 1 it is added to. A plain
 * loop the compiler vectorises (libm's expf does not). */
static inline float exp_poly(float x) {
    const int tiny = x < -87.33f;
    x = tiny ? -87.33f : x;
    x = x > 104.0f ? 104.0f : x;
    /* round to nearest through the float adder (|x log2 e| < 2^22): plain arithmetic, which
     * the compiler vectorises where it does not rintf */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + (r + 1.0f);
    const int32_t half = (int32_t)n >> 1;
    const int32_t bits1 = (half + 127) << 23, bits2 = ((int32_t)n - half + 127) << 23;
    float s1, s2;
    memcpy(&s1, &bits1, 4);
    memcpy(&s2, &bits2, 4);
    return tiny ? 0.0f : p * s1 * s2;
}

/* F.silu(gate).mul_(up): silu rounded to the dtype, the product rounded again. */
static inline __attribute__((always_inline)) void silu_impl(const SiluArgs *a, int64_t row,
                                                            const int dt) {
    const int64_t I = a->inter, esz = dt == DT_F32 ? 4 : 2;
    const char *g = (const char *)a->gate_up + row * a->in_stride * esz;
    const char *u = g + I * esz;
    char *o = (char *)a->out + row * a->out_stride * esz;
    int64_t i = 0;
#ifdef SOBERANA_VEC /* AVX-512 or AVX2 (scalar there before: 4% of a float32 batch's time) */
    for (; i + VEC_LANES <= I; i += VEC_LANES) {
        const vec x = vec_load(g, i, dt);
        const vec silu = vec_round(vec_div(x, vec_add(vec_set1(1.0f), vec_exp(vec_sub(vec_zero(), x)))), dt);
        vec_store(o, i, vec_mul(silu, vec_load(u, i, dt)), dt);
    }
#endif
    for (; i < I; i++) {
        const float x = load1(g, i, dt);
        store1(o, i, round_to(x / (1.0f + exp_poly(-x)), dt) * load1(u, i, dt), dt);
    }
}

static void silu_row(void *arg, int64_t row) {
    const SiluArgs *a = arg;
    if (a->dtype == DT_BF16) silu_impl(a, row, DT_BF16);
    else if (a->dtype == DT_F32) silu_impl(a, row, DT_F32);
    else silu_impl(a, row, a->dtype);
}

/* out[r] = silu(gate_up[r, :I]) * gate_up[r, I:] for `rows` rows; strides in elements. */
int silu_and_mul(const void *gate_up, int64_t in_stride, void *out, int64_t out_stride,
                 int64_t rows, int64_t inter, int32_t dtype, int32_t threads, void *gomp_parallel) {
    if (dtype == DT_F16 && !HAVE_F16) return 1;
    SiluArgs a = {gate_up, out, in_stride, out_stride, inter, dtype};
    for_rows(silu_row, &a, rows, 3 * inter, threads, gomp_parallel);
    return 0;
}

/* ---- rotary embedding + KV-cache write ---------------------------------------------- */

typedef struct RopeArgs {
    const void *qkv;
    const int64_t *positions, *slots;
    const float *cos, *sin; /* [max_positions, D], both halves repeated */
    void *q_out, *k_cache, *v_cache;
    int64_t qkv_stride, max_positions, num_slots;
    int num_heads, num_kv_heads, head_dim, dtype;
    int bad_index; /* a position or slot out of range */
} RopeArgs;

/* rotate-half of one head of D: x * cos + rotate_half(x) * sin, each product rounded to the
 * dtype and the sum rounded, as torch_rotary_embedding computes it in the tensor's dtype. */
static inline void rotate(const void *x, int64_t xi, void *out, int64_t oi, const float *c,
                          const float *s, int D, int dt) {
    const int half = D / 2;
    for (int d = 0; d < D; d++) {
        const float other = d < half ? -load1(x, xi + d + half, dt) : load1(x, xi + d - half, dt);
        const float cs = round_to(c[d], dt), sn = round_to(s[d], dt);
        /* -(x * s) == (-x) * s exactly, so negating x stands for the signed sine */
        store1(out, oi + d, round_to(load1(x, xi + d, dt) * cs, dt) + round_to(other * sn, dt), dt);
    }
}

#ifdef SOBERANA_VEC
/* rotate, VEC_LANES columns of each half at a time (D % (2 VEC_LANES) == 0), with cos and sin
 * already rounded to the dtype. */
static inline __attribute__((always_inline)) void rotate_vec(const void *x, int64_t xi, void *out,
                                                             int64_t oi, const float *cs,
                                                             const float *sn, int D, const int dt) {
    const int half = D / 2;
    for (int d = 0; d < half; d += VEC_LANES) {
        const vec lo = vec_load(x, xi + d, dt), hi = vec_load(x, xi + d + half, dt);
        const vec neg_hi = vec_sub(vec_zero(), hi);
        const vec first = vec_add(vec_round(vec_mul(lo, vec_loadu(cs + d)), dt),
                                  vec_round(vec_mul(neg_hi, vec_loadu(sn + d)), dt));
        const vec second = vec_add(vec_round(vec_mul(hi, vec_loadu(cs + d + half)), dt),
                                   vec_round(vec_mul(lo, vec_loadu(sn + d + half)), dt));
        vec_store(out, oi + d, first, dt);
        vec_store(out, oi + d + half, second, dt);
    }
}
#endif

static inline __attribute__((always_inline)) void rope_impl(RopeArgs *a, int64_t t,
                                                            const int dt) {
    const int D = a->head_dim, Hq = a->num_heads, Hk = a->num_kv_heads;
    const int64_t p = a->positions[t], base = t * a->qkv_stride, slot = a->slots[t];
    if (p < 0 || p >= a->max_positions || slot >= a->num_slots) {
        __atomic_store_n(&a->bad_index, 1, __ATOMIC_RELAXED);
        return;
    }
    const float *c = a->cos + p * D, *s = a->sin + p * D;
    const int64_t k0 = base + (int64_t)Hq * D, v0 = k0 + (int64_t)Hk * D, esz = dt == DT_F32 ? 4 : 2;
    const int64_t row = slot * Hk * D, bytes = (int64_t)Hk * D * esz;
#ifdef SOBERANA_VEC
    const int simd = D % (2 * VEC_LANES) == 0 && D <= 1024;
    float cs[simd ? D : 1], sn[simd ? D : 1]; /* rounded to the dtype once for all the heads */
    for (int d = 0; simd && d < D; d += VEC_LANES) {
        vec_storeu(cs + d, vec_round(vec_loadu(c + d), dt));
        vec_storeu(sn + d, vec_round(vec_loadu(s + d), dt));
    }
#define ROTATE(x, xi, out, oi) \
    (simd ? rotate_vec(x, xi, out, oi, cs, sn, D, dt) : rotate(x, xi, out, oi, c, s, D, dt))
#else
#define ROTATE(x, xi, out, oi) rotate(x, xi, out, oi, c, s, D, dt)
#endif
    for (int h = 0; h < Hq; h++) ROTATE(a->qkv, base + (int64_t)h * D, a->q_out, (t * Hq + h) * (int64_t)D);
    if (slot < 0) return;
    for (int h = 0; h < Hk; h++) ROTATE(a->qkv, k0 + (int64_t)h * D, a->k_cache, row + h * D);
#undef ROTATE
    memcpy((char *)a->v_cache + row * esz, (const char *)a->qkv + v0 * esz, bytes);
}

static void rope_row(void *arg, int64_t t) {
    RopeArgs *a = arg;
    if (a->dtype == DT_BF16) rope_impl(a, t, DT_BF16);
    else if (a->dtype == DT_F32) rope_impl(a, t, DT_F32);
    else rope_impl(a, t, a->dtype);
}

/* For each token t of a fused projection qkv [T, (Hq + 2 Hkv) D] (rows qkv_stride apart):
 * q_out[t] = rope(q) [Hq, D]; k_cache/v_cache slot slots[t] (contiguous [num_slots, Hkv, D])
 * = rope(k), v; slots[t] < 0 writes no slot. positions index the float32 cos/sin tables
 * [max_positions, D]. Returns 0, 1 (unsupported) or 2 (a position or slot out of range:
 * that token's outputs are not written). */
int rope_and_cache(const void *qkv, int64_t qkv_stride, const int64_t *positions,
                   const float *cos, const float *sin, int64_t max_positions, void *q_out,
                   void *k_cache, void *v_cache, const int64_t *slots, int64_t num_slots,
                   int64_t tokens, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
                   int32_t dtype, int32_t threads, void *gomp_parallel) {
    if ((dtype == DT_F16 && !HAVE_F16) || head_dim % 2 != 0) return 1;
    RopeArgs a = {qkv, positions, slots, cos, sin, q_out, k_cache, v_cache, qkv_stride,
                  max_positions, num_slots, num_heads, num_kv_heads, head_dim, dtype, 0};
    for_rows(rope_row, &a, tokens, (int64_t)(num_heads + 2 * num_kv_heads) * head_dim * 2,
             threads, gomp_parallel);
    return a.bad_index ? 2 : 0;
}

/* ---- greedy argmax ------------------------------------------------------------------ */

typedef struct ArgmaxArgs {
    const void *x;
    int64_t *out;
    int64_t stride, cols;
    int dtype;
} ArgmaxArgs;

/* The index of a row's first maximum, or of its first NaN (torch.argmax's answer). */
static inline __attribute__((always_inline)) void argmax_impl(const ArgmaxArgs *a, int64_t row,
                                                              const int dt) {
    const char *x = (const char *)a->x + row * a->stride * (dt == DT_F32 ? 4 : 2);
    const int64_t n = a->cols;
    int64_t i = 0, at = 0;
    float best = n > 0 ? load1(x, 0, dt) : 0.0f;
#ifdef __AVX512F__
    if (n >= 16 && n < INT32_MAX && best == best) {
        /* 16 lanes, each the first maximum of its columns (a strict >), then the smallest
         * index among the lanes that hold the overall maximum */
        __m512 top = _mm512_set1_ps(-INFINITY);
        __m512i where = _mm512_setzero_si512(), index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __mmask16 nan = 0;
        for (; i + 16 <= n; i += 16) {
            const __m512 v = load16(x, i, dt);
            const __mmask16 up = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            top = _mm512_mask_mov_ps(top, up, v);
            where = _mm512_mask_mov_epi32(where, up, index);
            index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
        }
        if (nan) {
            i = 0; /* the scalar loop below finds the first NaN */
        } else {
            best = _mm512_reduce_max_ps(top);
            const __mmask16 tied = _mm512_cmp_ps_mask(top, _mm512_set1_ps(best), _CMP_EQ_OQ);
            at = _mm512_mask_reduce_min_epi32(tied, where);
        }
    }
#endif
    for (; i < n; i++) {
        const float v = load1(x, i, dt);
        if (v != v) {
            at = i;
            break;
        }
        if (v > best || i == 0) best = v, at = i;
    }
    a->out[row] = at;
}

static void argmax_row(void *arg, int64_t row) {
    ArgmaxArgs *a = arg;
    if (a->dtype == DT_F32) argmax_impl(a, row, DT_F32);
    else if (a->dtype == DT_BF16) argmax_impl(a, row, DT_BF16);
    else argmax_impl(a, row, a->dtype);
}

/* out[r] = argmax of row r of x [rows, cols] (rows `stride` elements apart), as torch.argmax
 * answers: the first maximum, or the first NaN. Returns 0, or 1 (unsupported). */
int argmax_rows(const void *x, int64_t stride, int64_t *out, int64_t rows, int64_t cols,
                int32_t dtype, int32_t threads, void *gomp_parallel) {
    if (dtype == DT_F16 && !HAVE_F16) return 1;
    ArgmaxArgs a = {x, out, stride, cols, dtype};
    for_rows(argmax_row, &a, rows, cols, threads, gomp_parallel);
    return 0;
}

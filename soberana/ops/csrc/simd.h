/* SIMD helpers shared by the native CPU kernels. AVX-512: 16 elements of a row in any storage
 * dtype as float32 and back, rounding as the dtype stores. AVX2 + FMA + F16C (CPUs without
 * AVX-512, e.g. Zen 3; SOBERANA_AVX2 is defined): loads and stores of 8 elements rounding as
 * the AVX-512 ones do, and a sum of 8 vectors. Then `vec`, whichever of the two the build has,
 * and exp over it. Included by the kernels in this directory (the build cache key in
 * ops/cpu/kernels.py covers this header); empty with neither. */
#ifndef SOBERANA_SIMD_H
#define SOBERANA_SIMD_H

#ifdef __AVX512F__
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "dtypes.h"

/* 16 bfloat16 as float32 (exact). */
static inline __m512 bf16x16_to_f32(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Elements [i, i + 16) of a row stored in `dtype`, as float32. */
static inline __m512 load16(const void *row, int64_t i, int dtype) {
    if (dtype == DT_F32) return _mm512_loadu_ps((const float *)row + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i));
    if (dtype == DT_BF16) return bf16x16_to_f32(h);
    return _mm512_cvtph_ps(h);
}

/* x rounded to bfloat16 in the high half of each lane, as f32_to_bf16 does (to nearest
 * even; a NaN stays a quiet NaN). */
static inline __m512i bf16_round(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x400000));
}

/* 16 floats as 16 bfloat16 (f32_to_bf16 of each). With AVX512_BF16, vcvtneps2bf16 rounds the
 * same way in one instruction, and a NaN to the same quiet NaN, but it flushes denormals to
 * zero: a vector holding one (below 2^-126, rare in activations) takes the integer path. */
static inline __m256i to_bf16x16(__m512 x) {
#ifdef __AVX512BF16__
    const __m512i u = _mm512_castps_si512(x);
    const __mmask16 tiny = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000)); /* 0, denormal */
    if (_mm512_mask_test_epi32_mask(tiny, u, _mm512_set1_epi32(0x007fffff)) == 0)
        return (__m256i)_mm512_cvtneps_pbh(x);
#endif
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_round(x), 16));
}

/* x as stored in `dtype` and read back (round_to of 16 lanes). */
static inline __m512 round16(__m512 x, int dtype) {
    if (dtype == DT_F32) return x;
    if (dtype == DT_BF16) return bf16x16_to_f32(to_bf16x16(x));
    return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#ifdef __AVX512BF16__
/* One pair step of a bfloat16 tile (linear_bf16.c, linear_int8.c): for rows r < R of x (a,
 * rows a_stride elements apart), the pair (a[r][2p], a[r][2p + 1]) broadcast and multiplied
 * into the sums of the 64 columns of a panel, b0..b3 (vdpbf16ps). Inlined into tiles of a
 * constant R, so acc stays in registers. */
static inline __attribute__((always_inline)) void dpbf16_pair(__m512 (*acc)[4], const uint16_t *a,
                                                              int64_t a_stride, int64_t p, int R,
                                                              __m512bh b0, __m512bh b1,
                                                              __m512bh b2, __m512bh b3) {
    for (int r = 0; r < R; r++) {
        int32_t pair;
        memcpy(&pair, a + r * a_stride + 2 * p, 4);
        const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
        acc[r][2] = _mm512_dpbf16_ps(acc[r][2], av, b2);
        acc[r][3] = _mm512_dpbf16_ps(acc[r][3], av, b3);
    }
}
#endif

/* Elements [i, i + 16) of a row stored in `dtype`: x rounded as store1 rounds. */
static inline void store16(void *row, int64_t i, __m512 x, int dtype) {
    if (dtype == DT_F32) {
        _mm512_storeu_ps((float *)row + i, x);
        return;
    }
    const __m256i h = dtype == DT_BF16
        ? to_bf16x16(x)
        : _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256((__m256i *)((uint16_t *)row + i), h);
}

#endif /* __AVX512F__ */

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SOBERANA_AVX2 1
#include <immintrin.h>
#include <stdint.h>

#include "dtypes.h"

/* Elements [i, i + 8) of a row stored in `dtype`, as float32 (exact). */
static inline __m256 load8(const void *row, int64_t i, int dtype) {
    if (dtype == DT_F32) return _mm256_loadu_ps((const float *)row + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + i));
    if (dtype == DT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* Lane i: the sum of v[i]'s 8 lanes (a hadd tree: 6 hadds, 2 permutes and an add). */
static inline __m256 sum8(const __m256 *v) {
    const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

static inline float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

static inline float hmax8(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

/* 8 bfloat16 (in the low halves of 32-bit lanes' worth: a __m128i) as float32 (exact). */
static inline __m256 bf16x8_to_f32(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* x rounded to bfloat16 in the high half of each lane, as f32_to_bf16 does (to nearest even;
 * a NaN stays a quiet NaN); bf16_round's 8 lanes. */
static inline __m256i bf16_round8(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    /* |u| and 0x7f800000 are below 2^31: the signed compare orders them */
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(rounded, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
}

/* 8 floats as 8 bfloat16 (f32_to_bf16 of each; denormals kept). */
static inline __m128i to_bf16x8(__m256 x) {
    const __m256i r = _mm256_srli_epi32(bf16_round8(x), 16); /* each lane below 2^16 */
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* x as stored in `dtype` and read back (round_to of 8 lanes). */
static inline __m256 round8(__m256 x, int dtype) {
    if (dtype == DT_F32) return x;
    if (dtype == DT_BF16)
        return _mm256_castsi256_ps(_mm256_and_si256(bf16_round8(x), _mm256_set1_epi32((int)0xffff0000u)));
    return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* Elements [i, i + 8) of a row stored in `dtype`: x rounded as store1 rounds. */
static inline void store8(void *row, int64_t i, __m256 x, int dtype) {
    if (dtype == DT_F32) {
        _mm256_storeu_ps((float *)row + i, x);
        return;
    }
    const __m128i h = dtype == DT_BF16
        ? to_bf16x8(x)
        : _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128((__m128i *)((uint16_t *)row + i), h);
}
#endif /* SOBERANA_AVX2 */

/* ---- vec: the build's widest float vector ------------------------------------------------
 * For kernels whose AVX-512 and AVX2 paths are the same steps at 16 and 8 lanes: one body
 * over `vec` and these static inline wrappers, which compile to the intrinsics they wrap.
 * SOBERANA_VEC is defined where there is one (an AVX-512 or an AVX2 + FMA build). Always
 * inlined: with plain `static inline` GCC 12 inlined the extra level less eagerly and the
 * kernels' scalar bookkeeping came out differently; with it, the kernels compile as when
 * they called the intrinsics by name (objdump, -O3, both ISAs). */
#define VEC_FN static inline __attribute__((always_inline))
#if defined(__AVX512F__)
#define SOBERANA_VEC 1
typedef __m512 vec;
enum { VEC_LANES = 16 };
VEC_FN vec vec_zero(void) { return _mm512_setzero_ps(); }
VEC_FN vec vec_set1(float x) { return _mm512_set1_ps(x); }
VEC_FN vec vec_loadu(const float *p) { return _mm512_loadu_ps(p); }
VEC_FN void vec_storeu(float *p, vec x) { _mm512_storeu_ps(p, x); }
VEC_FN vec vec_add(vec a, vec b) { return _mm512_add_ps(a, b); }
VEC_FN vec vec_sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
VEC_FN vec vec_mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
VEC_FN vec vec_div(vec a, vec b) { return _mm512_div_ps(a, b); }
VEC_FN vec vec_max(vec a, vec b) { return _mm512_max_ps(a, b); } /* b where a NaN */
VEC_FN vec vec_min(vec a, vec b) { return _mm512_min_ps(a, b); } /* b where a NaN */
VEC_FN vec vec_fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
VEC_FN vec vec_fnmadd(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }
VEC_FN float vec_sum(vec x) { return _mm512_reduce_add_ps(x); }
VEC_FN float vec_reduce_max(vec x) { return _mm512_reduce_max_ps(x); }
/* x in its first n lanes (0 <= n <= 16), fill in the others. */
VEC_FN vec vec_first_or(vec x, int n, vec fill) {
    return _mm512_mask_mov_ps(fill, (__mmask16)((1u << n) - 1), x);
}
VEC_FN vec vec_load(const void *row, int64_t i, int dtype) { return load16(row, i, dtype); }
VEC_FN void vec_store(void *row, int64_t i, vec x, int dtype) { store16(row, i, x, dtype); }
VEC_FN vec vec_round(vec x, int dtype) { return round16(x, dtype); }
/* The first n (>= 1) lanes of x to p[0, n). */
VEC_FN void vec_storeu_first(float *p, vec x, int n) {
    _mm512_mask_storeu_ps(p, n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1), x);
}
VEC_FN vec vec_rint(vec x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* p * 2^n, n integral: scalef overflows to inf where expf does. */
VEC_FN vec vec_scale_pow2(vec p, vec n) { return _mm512_scalef_ps(p, n); }
/* r, 0 where x < lim (r where x is NaN) */
VEC_FN vec vec_zero_below(vec r, vec x, vec lim) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lim, _CMP_NLT_UQ), r);
}
#elif defined(SOBERANA_AVX2)
#define SOBERANA_VEC 1
typedef __m256 vec;
enum { VEC_LANES = 8 };
VEC_FN vec vec_zero(void) { return _mm256_setzero_ps(); }
VEC_FN vec vec_set1(float x) { return _mm256_set1_ps(x); }
VEC_FN vec vec_loadu(const float *p) { return _mm256_loadu_ps(p); }
VEC_FN void vec_storeu(float *p, vec x) { _mm256_storeu_ps(p, x); }
VEC_FN vec vec_add(vec a, vec b) { return _mm256_add_ps(a, b); }
VEC_FN vec vec_sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
VEC_FN vec vec_mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
VEC_FN vec vec_div(vec a, vec b) { return _mm256_div_ps(a, b); }
VEC_FN vec vec_max(vec a, vec b) { return _mm256_max_ps(a, b); } /* b where a NaN */
VEC_FN vec vec_min(vec a, vec b) { return _mm256_min_ps(a, b); } /* b where a NaN */
VEC_FN vec vec_fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
VEC_FN vec vec_fnmadd(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
VEC_FN float vec_sum(vec x) { return hsum8(x); }
VEC_FN float vec_reduce_max(vec x) { return hmax8(x); }
VEC_FN vec vec_first_or(vec x, int n, vec fill) {
    const __m256i first = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_blendv_ps(fill, x, _mm256_castsi256_ps(first));
}
VEC_FN vec vec_load(const void *row, int64_t i, int dtype) { return load8(row, i, dtype); }
VEC_FN void vec_store(void *row, int64_t i, vec x, int dtype) { store8(row, i, x, dtype); }
VEC_FN vec vec_round(vec x, int dtype) { return round8(x, dtype); }
VEC_FN void vec_storeu_first(float *p, vec x, int n) {
    if (n >= 8) {
        _mm256_storeu_ps(p, x);
        return;
    }
    float tmp[8];
    _mm256_storeu_ps(tmp, x);
    for (int i = 0; i < n; i++) p[i] = tmp[i];
}
VEC_FN vec vec_rint(vec x) {
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* p * 2^n, n integral, 2^n built in the exponent field: n = 128 (x near 88.7 in vec_exp)
 * gives inf as expf does; n = -127 would give 0 (vec_exp keeps n >= -126). */
VEC_FN vec vec_scale_pow2(vec p, vec n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
VEC_FN vec vec_zero_below(vec r, vec x, vec lim) {
    return _mm256_and_ps(r, _mm256_cmp_ps(x, lim, _CMP_NLT_UQ));
}
#endif

/* Float transposes (the attention kernels' keys): 16 x 16 with AVX-512, 8 x 8 with AVX2. */
#ifdef __AVX512F__
/* The 16 x 16 floats at src (rows `stride` apart) transposed to dst (rows dst_stride apart). */
static inline void transpose16(float *restrict dst, int64_t dst_stride, const float *restrict src,
                               int64_t stride) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * stride);
    /* Each step pairs rows so that r[4k + j], 128-bit lane L, holds rows 4k..4k+3, column
     * 4L + j; then the 128-bit lanes of 4 such vectors are gathered. */
    for (int i = 0; i < 16; i += 2) { /* 2 x 2 blocks of floats */
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* 4 x 4 */
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    for (int i = 0; i < 4; i++) { /* 128-bit lanes: rows i, 4 + i, 8 + i, 12 + i */
        t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xdd);
        t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xdd);
    }
    for (int i = 0; i < 4; i++) { /* column c = 4 lane + i gathers lane `lane` of 4 groups */
        const __m512 lo0 = t[i], lo1 = t[4 + i], hi0 = t[8 + i], hi1 = t[12 + i];
        _mm512_storeu_ps(dst + (i) * dst_stride, _mm512_shuffle_f32x4(lo0, hi0, 0x88));
        _mm512_storeu_ps(dst + (i + 8) * dst_stride, _mm512_shuffle_f32x4(lo0, hi0, 0xdd));
        _mm512_storeu_ps(dst + (i + 4) * dst_stride, _mm512_shuffle_f32x4(lo1, hi1, 0x88));
        _mm512_storeu_ps(dst + (i + 12) * dst_stride, _mm512_shuffle_f32x4(lo1, hi1, 0xdd));
    }
}

#endif
#if defined(__AVX512F__) || defined(SOBERANA_AVX2)
/* The 8 x 8 floats at src (rows `stride` apart) transposed to dst (rows dst_stride apart). */
static inline void transpose8(float *restrict dst, int64_t dst_stride, const float *restrict src,
                              int64_t stride) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * stride);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) { /* r[i]: rows 0-3 col i (low) and 4 + i (high); r[4 + i]: rows 4-7 */
        _mm256_storeu_ps(dst + i * dst_stride, _mm256_permute2f128_ps(r[i], r[4 + i], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * dst_stride, _mm256_permute2f128_ps(r[i], r[4 + i], 0x31));
    }
}

#endif

#ifdef SOBERANA_VEC
/* exp(x) (Cephes expf: x = n ln2 + r, a degree-5 polynomial in r; ~1 ulp), and 0 below
 * -87.33, where exp(x) nears FLT_MIN = 2^-126: never a subnormal, each of which costs a
 * microcode assist, ~30x the time of a normal result on Emerald Rapids (-inf, a masked
 * score, gives 0). Every caller adds exp to 1 or more (softmax beside its max term, SiLU's
 * 1 + exp(-x), GELU's erf), where 1e-38 is nothing. max(-87.33, x) (n = -126, r > 0: 2^n
 * and p 2^n normal) and min(88.8, x) keep 2^n in range (n = 128 at most: inf, where a
 * larger n would wrap the AVX2 exponent field) and let a NaN through. */
static inline vec vec_exp(vec x) {
    const vec lo = vec_set1(-87.33f), arg = x;
    x = vec_min(vec_set1(88.8f), vec_max(lo, x));
    const vec n = vec_rint(vec_mul(x, vec_set1(1.44269504088896341f)));
    vec r = vec_fnmadd(n, vec_set1(0.693359375f), x);
    r = vec_fnmadd(n, vec_set1(-2.12194440e-4f), r);
    vec p = vec_set1(1.9875691500e-4f);
    p = vec_fmadd(p, r, vec_set1(1.3981999507e-3f));
    p = vec_fmadd(p, r, vec_set1(8.3334519073e-3f));
    p = vec_fmadd(p, r, vec_set1(4.1665795894e-2f));
    p = vec_fmadd(p, r, vec_set1(1.6666665459e-1f));
    p = vec_fmadd(p, r, vec_set1(5.0000001201e-1f));
    p = vec_fmadd(vec_mul(p, r), r, vec_add(r, vec_set1(1.0f)));
    return vec_zero_below(vec_scale_pow2(p, n), arg, lo);
}
#endif
#undef VEC_FN

#endif

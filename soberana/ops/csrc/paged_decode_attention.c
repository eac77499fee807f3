/* Decode attention over the paged KV cache on CPU: one query token per sequence.
 *
 * Built and called by soberana/ops/cpu_kernels.py (plain C, no torch headers, so it compiles
 * in about a second). A work item is a sequence and a run of its KV heads (all of them
 * unless there are too few sequences to go round the threads). The G = Hq / Hkv query heads
 * of each KV head read every key and value row straight from the pool, once (GQA without
 * repeating K/V), and keep an online softmax (running max, rescaled accumulator) block by
 * block. Only tokens [0, seq_len) are read: pool slots past them may hold stale data or NaN.
 *
 * Math is float32 whatever the storage dtype. The AVX-512 path needs head_dim % 16 == 0;
 * other builds and shapes take the portable path, which the compiler vectorises where it can.
 * bfloat16 with head_dim % 32 == 0 (the common case) reads each block row by row, all the
 * item's heads at once (block_bf16); the others go head by head.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "dtypes.h"
enum { OK = 0, UNSUPPORTED = 1, BAD_BLOCK = 2, NO_MEMORY = 3 };

struct Cursor;

typedef struct Job {
    const char *q, *k, *v;
    char *out;
    const int32_t *block_table, *seq_lens;
    int64_t q_stride, table_stride, num_blocks; /* strides in elements */
    int num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks, dtype;
    int heads_per_item, items_per_seq; /* a work item: one sequence, a run of KV heads */
    float scale;
    void (*fn)(struct Job *, int, struct Cursor *, float *); /* attend, specialised */
    int next_item; /* the first unclaimed item */
    int bad_block;
} Job;

/* Where column i of a head sits in the split layout (the bfloat16 AVX-512 path, below). */
static inline int split_index(int i) { return (i & ~31) | (i & 1) << 4 | (i & 31) >> 1; }

/* ---- portable path ---------------------------------------------------------------- */

/* s[g * bs + t] = q_g . k_t for the n rows of a block. Eight partial sums per dot product,
 * so the compiler may vectorise without reassociating one long chain. */
static inline void scores_portable(const float *restrict q, const char *k, int64_t row_bytes,
                                   int n, int G, int D, int bs, int dtype, float *restrict s) {
    for (int t = 0; t < n; t++) {
        const char *kr = k + t * row_bytes;
        for (int g = 0; g < G; g++) {
            const float *qg = q + g * D;
            float part[8] = {0};
            int c = 0;
            for (; c + 8 <= D; c += 8)
                for (int i = 0; i < 8; i++) part[i] += qg[c + i] * load1(kr, c + i, dtype);
            for (; c < D; c++) part[0] += qg[c] * load1(kr, c, dtype);
            s[g * bs + t] = ((part[0] + part[4]) + (part[1] + part[5])) +
                            ((part[2] + part[6]) + (part[3] + part[7]));
        }
    }
}

/* One block of the online softmax of one query head: with m the new running max,
 * s[t] = exp(s[t] - m) and the denominator is rescaled and extended. Returns the factor for
 * the accumulator (0 on the first block, where the running max is -inf). */
static inline float softmax_portable(float *s, int n, float *max, float *den) {
    float m = *max;
    for (int t = 0; t < n; t++) m = s[t] > m ? s[t] : m;
    const float alpha = expf(*max - m);
    float sum = 0.0f;
    for (int t = 0; t < n; t++) {
        s[t] = expf(s[t] - m);
        sum += s[t];
    }
    *den = *den * alpha + sum;
    *max = m;
    return alpha;
}

/* acc_g += sum_t p[g * bs + t] * v_t */
static inline void values_portable(float *restrict acc, const float *restrict p, const char *v,
                                   int64_t row_bytes, int n, int G, int D, int bs, int dtype) {
    for (int t = 0; t < n; t++) {
        const char *vr = v + t * row_bytes;
        for (int g = 0; g < G; g++) {
            float pg = p[g * bs + t];
            float *ag = acc + g * D;
            for (int c = 0; c < D; c++) ag[c] += pg * load1(vr, c, dtype);
        }
    }
}

/* ---- AVX-512 path ----------------------------------------------------------------- */
#ifdef __AVX512F__

static inline __m512 load16(const char *row, int i, int dtype) {
    if (dtype == DT_F32) return _mm512_loadu_ps((const float *)row + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i));
    if (dtype == DT_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* The 16 lane sums of 16 vectors in one vector: a shuffle-and-add tree (15 adds) instead of a
 * full horizontal reduction per vector. Output lane 4k + j holds the sum of v[4j + k]. */
static inline __m512 sum16(const __m512 *v) {
    __m512 u[8], w[4], x[2];
    for (int i = 0; i < 8; i++) /* 256-bit halves: lanes 0-7 fold v[2i], 8-15 v[2i+1] */
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; i++) /* 128-bit lane k folds v[4i + k] */
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++)
        x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* s[g * bs + t] = q_g . k_t, 16 rows at a time: each row's products stay 16 partial sums
 * until sum16 adds up the 16 rows together. */
static inline void scores_avx512(const float *restrict q, const char *k, int64_t row_bytes, int n,
                                 int G, int D, int bs, int dtype, float *restrict s) {
    for (int g = 0; g < G; g++) {
        const float *qg = q + g * D;
        for (int t0 = 0; t0 < n; t0 += 16) {
            __m512 part[16];
            for (int i = 0; i < 16; i++) {
                __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
                if (t0 + i < n) {
                    const char *kr = k + (t0 + i) * row_bytes;
                    int c = 0;
                    for (; c + 32 <= D; c += 32) {
                        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c), load16(kr, c, dtype), a0);
                        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c + 16),
                                             load16(kr, c + 16, dtype), a1);
                    }
                    if (c < D)
                        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c), load16(kr, c, dtype), a0);
                }
                part[(i & 3) << 2 | i >> 2] = _mm512_add_ps(a0, a1); /* sum16 keeps t's order */
            }
            const int left = n - t0;
            const __mmask16 live = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            _mm512_mask_storeu_ps(s + g * bs + t0, live, sum16(part));
        }
    }
}

/* exp(x) for x <= 0 (Cephes expf: x = n ln2 + r, a degree-5 polynomial in r; ~1 ulp).
 * max(-88, x) keeps 2^n in range and lets a NaN through. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-88.0f), x);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline float softmax_avx512(float *s, int n, float *max, float *den) {
    __m512 mv = _mm512_set1_ps(*max), sum = _mm512_setzero_ps();
    for (int t = 0; t < n; t += 16) {
        __mmask16 live = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1);
        mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(mv, live, s + t));
    }
    const float m = _mm512_reduce_max_ps(mv), alpha = expf(*max - m);
    mv = _mm512_set1_ps(m);
    for (int t = 0; t < n; t += 16) {
        __mmask16 live = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), mv));
        _mm512_mask_storeu_ps(s + t, live, e);
        sum = _mm512_mask_add_ps(sum, live, sum, e);
    }
    *den = *den * alpha + _mm512_reduce_add_ps(sum);
    *max = m;
    return alpha;
}

/* acc_g += sum_t p[g * bs + t] * v_t. Four 16-column accumulators stay in registers across
 * the block's rows: four FMA chains in flight instead of one. */
static inline void values_avx512(float *restrict acc, const float *restrict p, const char *v,
                                 int64_t row_bytes, int n, int G, int D, int bs, int dtype) {
    for (int g = 0; g < G; g++) {
        const float *pg = p + g * bs;
        float *ag = acc + g * D;
        int c = 0;
        for (; c + 64 <= D; c += 64) {
            __m512 a0 = _mm512_loadu_ps(ag + c), a1 = _mm512_loadu_ps(ag + c + 16);
            __m512 a2 = _mm512_loadu_ps(ag + c + 32), a3 = _mm512_loadu_ps(ag + c + 48);
            for (int t = 0; t < n; t++) {
                const char *vr = v + t * row_bytes;
                const __m512 pt = _mm512_set1_ps(pg[t]);
                a0 = _mm512_fmadd_ps(pt, load16(vr, c, dtype), a0);
                a1 = _mm512_fmadd_ps(pt, load16(vr, c + 16, dtype), a1);
                a2 = _mm512_fmadd_ps(pt, load16(vr, c + 32, dtype), a2);
                a3 = _mm512_fmadd_ps(pt, load16(vr, c + 48, dtype), a3);
            }
            _mm512_storeu_ps(ag + c, a0), _mm512_storeu_ps(ag + c + 16, a1);
            _mm512_storeu_ps(ag + c + 32, a2), _mm512_storeu_ps(ag + c + 48, a3);
        }
        for (; c < D; c += 16) {
            __m512 a = _mm512_loadu_ps(ag + c);
            for (int t = 0; t < n; t++)
                a = _mm512_fmadd_ps(_mm512_set1_ps(pg[t]), load16(v + t * row_bytes, c, dtype), a);
            _mm512_storeu_ps(ag + c, a);
        }
    }
}

/* bfloat16 rows without a shuffle: each 32-bit lane of a row holds elements 2i (low half) and
 * 2i + 1 (high half), and a shift or a mask turns either into a float. So q and the
 * accumulators are kept "split", per 32 columns the 16 even ones then the 16 odd ones
 * (split_index), and a row of 32 bfloat16 is one load and two integer ops away from the two
 * float vectors it multiplies; a zero-extending shuffle per 16 values was the kernel's
 * bottleneck. */

static inline __m512 bf16_even(__m512i w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }

static inline __m512 bf16_odd(__m512i w) {
    return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u)));
}

/* One block of an item in the split layout, rows read in memory order: scores of every head
 * of row t, then of row t + 1, ..., then the softmax, then values row by row. The item's
 * heads of a row are one contiguous run of bytes, so a block is read front to back, a
 * stream the hardware prefetchers follow (head by head it is 16 short reads a row apart per
 * head, and the kernel ran at a third of the memory bandwidth). `ahead` (a byte offset, or
 * -1) is the block to prefetch: row t of it, head by head, while row t of this one is scored
 * (in bursts of a row or more, the prefetches stall the core). */
static inline void block_bf16(Job *j, const float *restrict q, float *restrict acc,
                              float *restrict s, float *restrict mx, float *restrict den,
                              __m512 *restrict part, const char *k, const char *v, int64_t ahead,
                              int64_t row_bytes, int n, int heads, int G, int D, int bs) {
    const int rows = heads * G;
    for (int t0 = 0; t0 < n; t0 += 16) {
        for (int i = 0; i < 16; i++) {
            const int t = t0 + i, slot = (i & 3) << 2 | i >> 2; /* sum16 keeps t's order */
            if (t >= n) {
                for (int r = 0; r < rows; r++) part[r * 16 + slot] = _mm512_setzero_ps();
                continue;
            }
            const char *kr = k + t * row_bytes;
            for (int r = 0; r < rows; r++) {
                const int64_t head = (int64_t)(r / G) * D * 2;
                const char *kh = kr + head;
                if (ahead >= 0 && r % G == 0) /* spread among the math, not in bursts */
                    for (int64_t o = 0; o < D * 2; o += 64) {
                        __builtin_prefetch(j->k + ahead + t * row_bytes + head + o);
                        __builtin_prefetch(j->v + ahead + t * row_bytes + head + o);
                    }
                const float *qr = q + r * D;
                __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
                for (int c = 0; c < D; c += 32) {
                    const __m512i w = _mm512_loadu_si512(kh + 2 * c);
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + c), bf16_even(w), a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + c + 16), bf16_odd(w), a1);
                }
                part[r * 16 + slot] = _mm512_add_ps(a0, a1);
            }
        }
        const int left = n - t0;
        const __mmask16 live = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        for (int r = 0; r < rows; r++) _mm512_mask_storeu_ps(s + r * bs + t0, live, sum16(part + r * 16));
    }
    for (int r = 0; r < rows; r++) {
        const float alpha = softmax_avx512(s + r * bs, n, &mx[r], &den[r]);
        if (alpha != 1.0f)
            for (int c = 0; c < D; c++) acc[r * D + c] *= alpha;
    }
    for (int t = 0; t < n; t++) {
        const char *vr = v + t * row_bytes;
        for (int r = 0; r < rows; r++) {
            const char *vh = vr + (int64_t)(r / G) * D * 2;
            const __m512 p = _mm512_set1_ps(s[r * bs + t]);
            float *ar = acc + r * D;
            for (int c = 0; c < D; c += 32) {
                const __m512i w = _mm512_loadu_si512(vh + 2 * c);
                _mm512_storeu_ps(ar + c, _mm512_fmadd_ps(p, bf16_even(w), _mm512_loadu_ps(ar + c)));
                _mm512_storeu_ps(ar + c + 16,
                                 _mm512_fmadd_ps(p, bf16_odd(w), _mm512_loadu_ps(ar + c + 16)));
            }
        }
    }
}
#endif

/* ---- one work item: a sequence and a run of its KV heads ---------------------------- */

/* Rows of one head are num_kv_heads * head_dim apart and blocks are scattered: patterns the
 * hardware prefetchers follow poorly. So while a thread works on one block it asks for the
 * next one it will read, a head at a time (asking for a whole block at once stalls the core
 * until the misses drain). The cursor walks the thread's current item, then the one it has
 * already claimed next. */
typedef struct Cursor {
    int item, block, next; /* next: the thread's claimed next item (-1: none) */
} Cursor;

static inline void item_heads(const Job *j, int item, int *b, int *h0, int *h1) {
    *b = item / j->items_per_seq;
    *h0 = item % j->items_per_seq * j->heads_per_item;
    *h1 = *h0 + j->heads_per_item < j->num_kv_heads ? *h0 + j->heads_per_item : j->num_kv_heads;
}

/* Byte offset in the caches of the block under the cursor, at its item's first head (-1:
 * none); moves the cursor on by one block. */
static inline int64_t next_block(const Job *j, Cursor *c, int64_t esz) {
    if (c->item < 0) return -1;
    int b, h0, h1;
    item_heads(j, c->item, &b, &h0, &h1);
    const int bs = j->block_size, len = j->seq_lens[b];
    int64_t offset = -1;
    if (c->block * bs < len && c->block < j->max_blocks) {
        const int32_t block = j->block_table[b * j->table_stride + c->block];
        if (block >= 0 && block < j->num_blocks)
            offset = (((int64_t)block * bs * j->num_kv_heads) + h0) * j->head_dim * esz;
    }
    if (++c->block * bs >= len) {
        c->item = c->item == c->next ? -1 : c->next;
        c->block = 0;
    }
    return offset;
}

/* Workspace floats per thread, per query head of an item: q and accumulator [D], block
 * scores [block_size], running max and denominator. */
static int64_t workspace_floats(const Job *j) {
    int64_t rows = (int64_t)j->heads_per_item * (j->num_heads / j->num_kv_heads);
    return rows * (16 * 16 + 2 * (int64_t)j->head_dim + j->block_size + 2);
}

/* always_inline with a constant dtype and path: one specialised copy per caller. */
static inline __attribute__((always_inline)) void attend(Job *j, int item, Cursor *pf, float *ws,
                                                         const int dtype, const int simd) {
    (void)simd; /* read only where the AVX-512 path is compiled */
    const int G = j->num_heads / j->num_kv_heads, D = j->head_dim, bs = j->block_size;
    const int64_t esz = dtype == DT_F32 ? 4 : 2, head_bytes = D * esz;
    const int64_t row_bytes = j->num_kv_heads * head_bytes; /* token to token */
    const int split = simd && dtype == DT_BF16 && D % 32 == 0; /* q and acc split (bf16) */
    int b, h0, h1;
    item_heads(j, item, &b, &h0, &h1);
    /* rows: the item's query heads, G per KV head, in q's order */
    const int rows = (h1 - h0) * G, len = j->seq_lens[b];
    /* part: [rows][16] row sums for sum16 (64-byte aligned, as the workspace) */
    float *q = ws + rows * 256, *acc = q + rows * D, *s = acc + rows * D, *mx = s + rows * bs;
    float *den = mx + rows;
#ifdef __AVX512F__
    __m512 *part = (__m512 *)ws;
#endif
    const char *qrow = j->q + (b * j->q_stride + (int64_t)h0 * G * D) * esz;
    for (int i = 0; i < rows * D; i++)
        q[split ? i - i % D + split_index(i % D) : i] = load1(qrow, i, dtype) * j->scale;
    memset(acc, 0, sizeof(float) * rows * D);
    for (int r = 0; r < rows; r++) mx[r] = -INFINITY, den[r] = 0.0f;
    const int32_t *blocks = j->block_table + b * j->table_stride;
    if ((int64_t)len > (int64_t)j->max_blocks * bs) {
        __atomic_store_n(&j->bad_block, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int start = 0; start < len; start += bs) {
        const int64_t ahead = next_block(j, pf, esz);
        const int n = len - start < bs ? len - start : bs;
        const int32_t block = blocks[start / bs];
        if (block < 0 || block >= j->num_blocks) {
            __atomic_store_n(&j->bad_block, 1, __ATOMIC_RELAXED);
            return;
        }
        const int64_t first = (int64_t)block * bs * row_bytes + h0 * head_bytes;
#ifdef __AVX512F__
        if (split) {
            block_bf16(j, q, acc, s, mx, den, part, j->k + first, j->v + first, ahead, row_bytes, n,
                       h1 - h0, G, D, bs);
            continue;
        }
#endif
        for (int kh = 0; kh < h1 - h0; kh++) {
            const char *k = j->k + first + kh * head_bytes, *v = j->v + first + kh * head_bytes;
            float *qh = q + kh * G * D, *ah = acc + kh * G * D, *sh = s + kh * G * bs;
            if (ahead >= 0)
                for (int t = 0; t < n; t++)
                    for (int64_t o = 0; o < head_bytes; o += 64) {
                        __builtin_prefetch(j->k + ahead + kh * head_bytes + t * row_bytes + o);
                        __builtin_prefetch(j->v + ahead + kh * head_bytes + t * row_bytes + o);
                    }
#ifdef __AVX512F__
            if (simd)
                scores_avx512(qh, k, row_bytes, n, G, D, bs, dtype, sh);
            else
#endif
                scores_portable(qh, k, row_bytes, n, G, D, bs, dtype, sh);
            for (int g = 0; g < G; g++) {
                const int r = kh * G + g;
                float alpha;
#ifdef __AVX512F__
                if (simd)
                    alpha = softmax_avx512(sh + g * bs, n, &mx[r], &den[r]);
                else
#endif
                    alpha = softmax_portable(sh + g * bs, n, &mx[r], &den[r]);
                if (alpha != 1.0f)
                    for (int c = 0; c < D; c++) ah[g * D + c] *= alpha;
            }
#ifdef __AVX512F__
            if (simd)
                values_avx512(ah, sh, v, row_bytes, n, G, D, bs, dtype);
            else
#endif
                values_portable(ah, sh, v, row_bytes, n, G, D, bs, dtype);
        }
    }
    char *orow = j->out + ((int64_t)b * j->num_heads + (int64_t)h0 * G) * D * esz;
    for (int r = 0; r < rows; r++) {
        const float inv = len > 0 ? 1.0f / den[r] : 0.0f; /* no keys: zeros, not NaN */
        for (int c = 0; c < D; c++)
            store1(orow, r * D + c, acc[r * D + (split ? split_index(c) : c)] * inv, dtype);
    }
}

#define ATTEND(name, dtype, simd)                                               \
    static void name(Job *j, int item, Cursor *pf, float *ws) {                 \
        attend(j, item, pf, ws, dtype, simd);                                   \
    }
ATTEND(attend_f32, DT_F32, 0)
ATTEND(attend_bf16, DT_BF16, 0)
ATTEND(attend_f16, DT_F16, 0)
#ifdef __AVX512F__
ATTEND(attend_f32_avx512, DT_F32, 1)
ATTEND(attend_bf16_avx512, DT_BF16, 1)
ATTEND(attend_f16_avx512, DT_F16, 1)
#endif

typedef void (*AttendFn)(Job *, int, Cursor *, float *);

static AttendFn pick(int dtype, int head_dim) {
#ifdef __AVX512F__
    if (head_dim % 16 == 0) {
        if (dtype == DT_F32) return attend_f32_avx512;
        if (dtype == DT_BF16) return attend_bf16_avx512;
        if (dtype == DT_F16 && HAVE_F16) return attend_f16_avx512;
    }
#else
    (void)head_dim;
#endif
    if (dtype == DT_F32) return attend_f32;
    if (dtype == DT_BF16) return attend_bf16;
    if (dtype == DT_F16 && HAVE_F16) return attend_f16;
    return NULL;
}

/* ---- threads ---------------------------------------------------------------------- */

static inline int claim(Job *j) {
    int i = __atomic_fetch_add(&j->next_item, 1, __ATOMIC_RELAXED);
    return i < j->num_seqs * j->items_per_seq ? i : -1;
}

/* One thread's share: items claimed one at a time, one ahead (for the prefetch cursor), so a
 * thread that starts late takes fewer. */
static void work(void *arg) {
    Job *j = arg;
    const size_t ws_bytes = (sizeof(float) * workspace_floats(j) + 63) & ~(size_t)63;
    float *ws = aligned_alloc(64, ws_bytes);
    if (ws == NULL) return; /* the others take its share */
    const int64_t esz = j->dtype == DT_F32 ? 4 : 2;
    int item = claim(j);
    Cursor pf = {item, 0, claim(j)};
    next_block(j, &pf, esz); /* the cursor runs one block ahead */
    while (item >= 0) {
        j->fn(j, item, &pf, ws);
        item = pf.next;
        pf.next = item >= 0 ? claim(j) : -1;
        if (pf.item < 0) pf.item = pf.next, pf.block = 0; /* it had covered all of `item` */
    }
    free(ws);
}

static void *work_thread(void *arg) {
    work(arg);
    return NULL;
}

/* libgomp's entry for `#pragma omp parallel`: fn(data) on each thread of a team. */
typedef void (*GompParallel)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);

/* Below this much K/V per extra thread, starting a thread costs more than it saves
 * (~20-50 us to create and join one). */
#define BYTES_PER_THREAD (256 << 10)
#define MAX_THREADS 256

/* out[b] = softmax(q[b] K_b^T * scale) V_b for each of num_seqs sequences, over keys
 * [0, seq_lens[b]). q rows are q_stride elements apart, each [num_heads, head_dim]
 * contiguous; k/v caches are contiguous [num_blocks, block_size, num_kv_heads, head_dim];
 * out is contiguous [num_seqs, num_heads, head_dim]; block_table rows are table_stride
 * int32s apart, with max_blocks entries each. Returns OK, UNSUPPORTED (dtype, head counts),
 * BAD_BLOCK (a block id outside [0, num_blocks), or a seq_len past max_blocks) or
 * NO_MEMORY. */
int paged_decode_attention(const void *q, int64_t q_stride, const void *k_cache,
                           const void *v_cache, int64_t num_blocks, const int32_t *block_table,
                           int64_t table_stride, int32_t max_blocks, const int32_t *seq_lens,
                           void *out, int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads,
                           int32_t head_dim, int32_t block_size, int32_t dtype, float scale,
                           int32_t num_threads, void *gomp_parallel) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || head_dim <= 0 || block_size <= 0)
        return UNSUPPORTED;
    AttendFn fn = pick(dtype, head_dim);
    if (fn == NULL) return UNSUPPORTED;
    int64_t tokens = 0;
    for (int b = 0; b < num_seqs; b++) tokens += seq_lens[b] > 0 ? seq_lens[b] : 0;
    const int64_t bytes = 2 * tokens * num_kv_heads * head_dim * (dtype == DT_F32 ? 4 : 2);
    int threads = num_threads < MAX_THREADS ? num_threads : MAX_THREADS;
    if (threads > 1 + bytes / BYTES_PER_THREAD) threads = 1 + bytes / BYTES_PER_THREAD;
    if (threads < 1) threads = 1;
    /* An item is a sequence with all its KV heads (each block one contiguous read) unless
     * there are too few sequences to share out, as in a single long decode. */
    int heads_per_item = num_kv_heads;
    while (threads > 1 && heads_per_item > 1 &&
           (int64_t)num_seqs * ((num_kv_heads + heads_per_item - 1) / heads_per_item) < 4 * threads)
        heads_per_item = (heads_per_item + 1) / 2;
    const int items_per_seq = (num_kv_heads + heads_per_item - 1) / heads_per_item;
    Job j = {q, k_cache, v_cache, out, block_table, seq_lens, q_stride, table_stride, num_blocks,
             num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks, dtype,
             heads_per_item, items_per_seq, scale, fn, 0, 0};
    if (threads > 1 && gomp_parallel != NULL) {
        ((GompParallel)gomp_parallel)(work, &j, (unsigned)threads, 0);
    } else {
        pthread_t tids[MAX_THREADS];
        int started = 1;
        for (; started < threads; started++)
            if (pthread_create(&tids[started], NULL, work_thread, &j) != 0) break;
        work(&j);
        for (int t = 1; t < started; t++) pthread_join(tids[t], NULL);
    }
    if (j.bad_block) return BAD_BLOCK;
    /* A thread without workspace claims nothing: items are left only if none had one. */
    return j.next_item >= num_seqs * items_per_seq ? OK : NO_MEMORY;
}

/* Attention over the paged KV cache on CPU: decodes (one query per sequence) and prefills
 * (a run of new queries per sequence, causal, after any cached prefix).
 *
 * Built and called by soberana/ops/cpu/kernels.py (plain C, no torch headers, so it compiles
 * in about a second). A work item is a sequence, a tile of its queries (one query for a
 * decode) and a run of its KV heads (all of them for a decode unless there are too few
 * sequences to go round the threads; one for a prefill tile). The rows of an item (each of
 * its queries times the G = Hq / Hkv query heads of each KV head) read every key and value
 * row straight from the pool, once per item (GQA without repeating K/V; a prefill tile's
 * queries share each block they read), and keep an online softmax (running max, rescaled
 * accumulator) block by block. Query i of a sequence with n new queries and seq_len keys
 * sees keys [0, seq_len - n + i]: only those are read, and pool slots past them may hold
 * stale data or NaN.
 *
 * Math is float32 whatever the storage dtype. The AVX-512 path needs head_dim % 16 == 0; the
 * AVX2 + FMA path (builds without AVX-512) head_dim % 8 == 0 and takes every item block by
 * block (scores, online softmax and values vectorised 8 wide; a prefill tile's rows share each
 * block while it is in L1); other builds and shapes take the portable path, which the compiler vectorises where it can.
 * With head_dim % 32 == 0 (the common case) a decode reads each block row by row, all the
 * item's heads at once (block_rows, any dtype); bfloat16 then keeps q and the accumulators in
 * a split layout (below). A prefill item widens chunks of keys and values to float32 and
 * takes its rows four at a time (chunk_rows).
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
#include "simd.h"
enum { OK = 0, UNSUPPORTED = 1, BAD_BLOCK = 2, NO_MEMORY = 3, BAD_QUERIES = 4 };

struct Cursor;

typedef struct Job {
    const char *q, *k, *v;
    char *out;
    const int32_t *block_table, *seq_lens;
    /* [num_seqs + 1]: sequence b's queries are tokens [query_start[b], query_start[b + 1]) of
     * q and out; NULL: one each, token b (decodes) */
    const int32_t *query_start;
    const int *first_item; /* with query_start: [num_seqs + 1], sequence b's first work item */
    int64_t q_stride, table_stride, num_blocks; /* strides in elements */
    int num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks, dtype;
    /* a work item: one sequence, a tile of up to q_tile of its queries, a run of KV heads */
    int heads_per_item, items_per_seq, q_tile, num_items;
    float scale;
    void (*fn)(struct Job *, int, struct Cursor *, float *); /* attend, specialised */
    int next_item; /* the first unclaimed item */
    int bad_block;
} Job;

/* What a work item covers: sequence b, its queries [q0, q0 + nq) (the first is token `token`
 * of q and out), KV heads [h0, h1), and len, the keys its last query sees. Query q0 + i sees
 * len - nq + 1 + i keys. */
typedef struct Span {
    int b, q0, nq, h0, h1, len;
    int64_t token;
} Span;

static inline void item_span(const Job *j, int item, Span *sp) {
    int local = item;
    if (j->query_start == NULL) {
        sp->b = item / j->items_per_seq, local = item % j->items_per_seq;
        sp->q0 = 0, sp->nq = 1, sp->token = sp->b, sp->len = j->seq_lens[sp->b];
    } else {
        int lo = 0, hi = j->num_seqs; /* the last b with first_item[b] <= item */
        while (hi - lo > 1) {
            const int mid = (lo + hi) / 2;
            if (j->first_item[mid] <= item) lo = mid;
            else hi = mid;
        }
        local = item - j->first_item[lo];
        const int tile = local / j->items_per_seq, queries = j->query_start[lo + 1] - j->query_start[lo];
        local %= j->items_per_seq;
        sp->b = lo, sp->q0 = tile * j->q_tile;
        sp->nq = queries - sp->q0 < j->q_tile ? queries - sp->q0 : j->q_tile;
        sp->token = (int64_t)j->query_start[lo] + sp->q0;
        sp->len = j->seq_lens[lo] - queries + sp->q0 + sp->nq;
    }
    sp->h0 = local * j->heads_per_item;
    sp->h1 = sp->h0 + j->heads_per_item < j->num_kv_heads ? sp->h0 + j->heads_per_item
                                                          : j->num_kv_heads;
}

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

/* sum16's input slot for row i, so that its output lanes keep the rows' order. */
static inline int sum_slot(int i) { return (i & 3) << 2 | i >> 2; }
static inline vec sum_rows(const vec *v) { return sum16(v); }

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
        __m512 e = vec_exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), mv));
        _mm512_mask_storeu_ps(s + t, live, e);
        sum = _mm512_mask_add_ps(sum, live, sum, e);
    }
    *den = *den * alpha + _mm512_reduce_add_ps(sum);
    *max = m;
    return alpha;
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

/* Columns [c, c + 32) of a row of K or V as two float vectors, in the layout q and the
 * accumulators use: bfloat16 split (the even columns, then the odd ones: no shuffle), float16
 * and float32 in order. */
static inline __attribute__((always_inline)) void load32(const char *row, int c, int dtype,
                                                         __m512 *lo, __m512 *hi) {
    if (dtype == DT_BF16) {
        const __m512i w = _mm512_loadu_si512(row + 2 * c);
        *lo = bf16_even(w), *hi = bf16_odd(w);
    } else {
        *lo = load16(row, c, dtype), *hi = load16(row, c + 16, dtype);
    }
}

/* One block of a decode item, rows read in memory order (D % 32 == 0; bfloat16 in the split
 * layout): scores of every head
 * of row t, then of row t + 1, ..., then the softmax, then values row by row. The item's
 * heads of a row are one contiguous run of bytes, so a block is read front to back, a
 * stream the hardware prefetchers follow (head by head it is 16 short reads a row apart per
 * head, and the kernel ran at a third of the memory bandwidth). `ahead` (a byte offset, or
 * -1) is the block to prefetch: its keys row by row while this block's are scored, its
 * values four rows at a time while this block's are summed (in bursts of a row or more, the
 * prefetches stall the core). */
static inline __attribute__((always_inline)) void block_rows(Job *j, const float *restrict q, float *restrict acc,
                              float *restrict s, float *restrict mx, float *restrict den,
                              __m512 *restrict part, const char *k, const char *v, int64_t ahead,
                              int64_t row_bytes, int n, int heads, int G, int D, int bs,
                              const int dtype) {
    const int rows = heads * G;
    const int64_t hb = (int64_t)D * (dtype == DT_F32 ? 4 : 2); /* bytes of a head's row */
    for (int t0 = 0; t0 < n; t0 += 16) {
        for (int i = 0; i < 16; i++) {
            const int t = t0 + i, slot = (i & 3) << 2 | i >> 2; /* sum16 keeps t's order */
            if (t >= n) {
                for (int r = 0; r < rows; r++) part[r * 16 + slot] = _mm512_setzero_ps();
                continue;
            }
            const char *kr = k + t * row_bytes;
            for (int r = 0; r < rows; r++) {
                const int64_t head = (r / G) * hb;
                const char *kh = kr + head;
                /* the next block's keys while these are scored (its values follow while
                 * these values are summed: both in one phase asked for 48 KB in a burst and
                 * left the other phase idle on the memory bus); spread among the math;
                 * into L2 (prefetcht1): into L1 they would evict this block's values (Zen 4
                 * has 32 KB of L1 data, a block of 12 heads of 64 is 24 KB of keys) */
                if (ahead >= 0 && r % G == 0)
                    for (int64_t o = 0; o < hb; o += 64)
                        __builtin_prefetch(j->k + ahead + t * row_bytes + head + o, 0, 2);
                const float *qr = q + r * D;
                __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
                for (int c = 0; c < D; c += 32) {
                    __m512 lo, hi;
                    load32(kh, c, dtype, &lo, &hi);
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + c), lo, a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + c + 16), hi, a1);
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
    /* Values four rows at a time: each accumulator is loaded and stored once per four rows
     * (a 512-bit store takes two cycles on Zen 4), summed in the same order as row by row. */
    int t = 0;
    for (; t + 4 <= n; t += 4) {
        const char *vr = v + t * row_bytes;
        for (int r = 0; r < rows; r++) {
            const char *vh = vr + (r / G) * hb;
            if (ahead >= 0 && r % G == 0) /* the next block's values, rows t to t + 3 */
                for (int i = 0; i < 4; i++)
                    for (int64_t o = 0; o < hb; o += 64)
                        __builtin_prefetch(j->v + ahead + (t + i) * row_bytes + (r / G) * hb + o, 0, 2);
            const float *sr = s + r * bs + t;
            const __m512 p0 = _mm512_set1_ps(sr[0]), p1 = _mm512_set1_ps(sr[1]);
            const __m512 p2 = _mm512_set1_ps(sr[2]), p3 = _mm512_set1_ps(sr[3]);
            float *ar = acc + r * D;
            for (int c = 0; c < D; c += 32) {
                __m512 l0, h0, l1, h1, l2, h2, l3, h3;
                load32(vh, c, dtype, &l0, &h0), load32(vh + row_bytes, c, dtype, &l1, &h1);
                load32(vh + 2 * row_bytes, c, dtype, &l2, &h2);
                load32(vh + 3 * row_bytes, c, dtype, &l3, &h3);
                __m512 e = _mm512_fmadd_ps(p0, l0, _mm512_loadu_ps(ar + c));
                __m512 o = _mm512_fmadd_ps(p0, h0, _mm512_loadu_ps(ar + c + 16));
                e = _mm512_fmadd_ps(p1, l1, e), o = _mm512_fmadd_ps(p1, h1, o);
                e = _mm512_fmadd_ps(p2, l2, e), o = _mm512_fmadd_ps(p2, h2, o);
                e = _mm512_fmadd_ps(p3, l3, e), o = _mm512_fmadd_ps(p3, h3, o);
                _mm512_storeu_ps(ar + c, e), _mm512_storeu_ps(ar + c + 16, o);
            }
        }
    }
    for (; t < n; t++) {
        const char *vr = v + t * row_bytes;
        for (int r = 0; r < rows; r++) {
            const char *vh = vr + (r / G) * hb;
            const __m512 p = _mm512_set1_ps(s[r * bs + t]);
            float *ar = acc + r * D;
            for (int c = 0; c < D; c += 32) {
                __m512 lo, hi;
                load32(vh, c, dtype, &lo, &hi);
                _mm512_storeu_ps(ar + c, _mm512_fmadd_ps(p, lo, _mm512_loadu_ps(ar + c)));
                _mm512_storeu_ps(ar + c + 16, _mm512_fmadd_ps(p, hi, _mm512_loadu_ps(ar + c + 16)));
            }
        }
    }
}

/* A block's keys or values, n rows of D columns row_bytes apart, as float32 rows D apart:
 * bfloat16 in the split layout, float16 and float32 as they are. Done once per block and KV
 * head, and shared by all the rows of a prefill tile. */
static inline void widen_block(float *restrict dst, const char *src, int64_t row_bytes, int n,
                               int D, int dtype, int split) {
    for (int t = 0; t < n; t++) {
        const char *row = src + t * row_bytes;
        float *d = dst + t * D;
        if (split)
            for (int c = 0; c < D; c += 32) {
                const __m512i w = _mm512_loadu_si512(row + 2 * c);
                _mm512_storeu_ps(d + c, bf16_even(w));
                _mm512_storeu_ps(d + c + 16, bf16_odd(w));
            }
        else
            for (int c = 0; c < D; c += 16) _mm512_storeu_ps(d + c, load16(row, c, dtype));
    }
}

/* transpose16 as the prefill path's transpose of a group of keys */
enum { KEY_GROUP = 16 };
static inline void transpose_group(float *restrict dst, const float *restrict src, int64_t stride) {
    transpose16(dst, 16, src, stride);
}

/* Keeps a loaded vector in a register: the compiler would otherwise fold the load into each
 * FMA that uses it, one load per use, and the loads, not the FMAs, would set the pace. */
#define in_register(x) __asm__("" : "+v"(x))

/* Scores of up to 4 rows (q[0..3], D floats each) against `groups` groups of 16 keys in kt
 * (per group [D][16]: key t of the group is lane t), into s[r * stride + key]. Two groups at
 * a time: each broadcast q element serves two FMAs, and eight FMA chains are in flight. */
static inline __attribute__((always_inline)) void scores_quad(
    const float *const q[4], const float *restrict kt, int groups, float *restrict s,
    int stride, const int D) {
    int g = 0;
    for (; g + 2 <= groups; g += 2) {
        const float *ka = kt + (int64_t)g * D * 16, *kb = ka + D * 16;
        __m512 a[4], b[4];
        for (int r = 0; r < 4; r++) a[r] = b[r] = _mm512_setzero_ps();
        for (int d = 0; d < D; d++) {
            __m512 x = _mm512_loadu_ps(ka + d * 16), y = _mm512_loadu_ps(kb + d * 16);
            in_register(x);
            in_register(y);
            for (int r = 0; r < 4; r++) {
                const __m512 qd = _mm512_set1_ps(q[r][d]);
                a[r] = _mm512_fmadd_ps(qd, x, a[r]);
                b[r] = _mm512_fmadd_ps(qd, y, b[r]);
            }
        }
        for (int r = 0; r < 4; r++) {
            _mm512_storeu_ps(s + r * stride + g * 16, a[r]);
            _mm512_storeu_ps(s + r * stride + g * 16 + 16, b[r]);
        }
    }
    if (g < groups) {
        const float *ka = kt + (int64_t)g * D * 16;
        __m512 a[4], b[4]; /* even and odd d */
        for (int r = 0; r < 4; r++) a[r] = b[r] = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 2) {
            const __m512 x = _mm512_loadu_ps(ka + d * 16), y = _mm512_loadu_ps(ka + d * 16 + 16);
            for (int r = 0; r < 4; r++) {
                a[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d]), x, a[r]);
                b[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d + 1]), y, b[r]);
            }
        }
        for (int r = 0; r < 4; r++) _mm512_storeu_ps(s + r * stride + g * 16, _mm512_add_ps(a[r], b[r]));
    }
}

/* acc[r] += sum over keys t < m of p[r * stride + t] * v_t for 4 rows, v rows D apart: 64
 * columns at a time, 4 x 4 accumulators in registers. */
static inline __attribute__((always_inline)) void values_quad(
    float *const acc[4], const float *restrict p, int stride, const float *restrict vf, int m,
    const int D) {
    for (int c0 = 0; c0 < D; c0 += 64) {
        const int nv = D - c0 < 64 ? (D - c0) / 16 : 4;
        __m512 a[4][4];
        for (int r = 0; r < 4; r++)
            for (int i = 0; i < nv; i++) a[r][i] = _mm512_loadu_ps(acc[r] + c0 + 16 * i);
        for (int t = 0; t < m; t++) {
            __m512 v[4];
            for (int i = 0; i < nv; i++) {
                v[i] = _mm512_loadu_ps(vf + (int64_t)t * D + c0 + 16 * i);
                in_register(v[i]);
            }
            for (int r = 0; r < 4; r++) {
                const __m512 pr = _mm512_set1_ps(p[r * stride + t]);
                for (int i = 0; i < nv; i++) a[r][i] = _mm512_fmadd_ps(pr, v[i], a[r][i]);
            }
        }
        for (int r = 0; r < 4; r++)
            for (int i = 0; i < nv; i++) _mm512_storeu_ps(acc[r] + c0 + 16 * i, a[r][i]);
    }
}

/* The prefill path's softmax over a row's scores (chunk_rows, below) */
static inline float softmax_row(float *s, int n, float *max, float *den) {
    return softmax_avx512(s, n, max, den);
}
#endif

/* ---- AVX2 + FMA path (CPUs without AVX-512) ---------------------------------------- */
#ifdef SOBERANA_AVX2

static inline int sum_slot(int i) { return i; }
static inline vec sum_rows(const vec *v) { return sum8(v); }

static inline float softmax_avx2(float *s, int n, float *max, float *den) {
    float m = *max;
    int t = 0;
    if (n >= 8) {
        __m256 mv = _mm256_set1_ps(m);
        for (; t + 8 <= n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + t));
        m = hmax8(mv);
    }
    for (; t < n; t++) m = s[t] > m ? s[t] : m;
    const float alpha = expf(*max - m);
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        const __m256 e = vec_exp(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
        _mm256_storeu_ps(s + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    if (t < n) { /* the tail through a padded buffer: -inf lanes give exp 0 */
        float tmp[8];
        for (int i = 0; i < 8; i++) tmp[i] = t + i < n ? s[t + i] : -INFINITY;
        const __m256 e = vec_exp(_mm256_sub_ps(_mm256_loadu_ps(tmp), mv));
        _mm256_storeu_ps(tmp, e);
        for (int i = 0; t + i < n; i++) s[t + i] = tmp[i];
        sum = _mm256_add_ps(sum, e);
    }
    *den = *den * alpha + hsum8(sum);
    *max = m;
    return alpha;
}

/* A prefill tile's keys and values as the AVX-512 path takes them (chunk_rows, below), at 8
 * lanes: a chunk of keys widened to float32 once per KV head, keys transposed in groups of 8
 * (per group [D][8]: key t of the group is lane t), and four rows at a time through their
 * scores, online softmax and values, with the partial sums in registers. */
enum { KEY_GROUP = 8 };

static inline void widen_block(float *restrict dst, const char *src, int64_t row_bytes, int n,
                               int D, int dtype, int split) {
    (void)split; /* bfloat16 has no split layout at 8 lanes */
    for (int t = 0; t < n; t++)
        for (int c = 0; c < D; c += 8) _mm256_storeu_ps(dst + t * D + c, load8(src + t * row_bytes, c, dtype));
}

static inline void transpose_group(float *restrict dst, const float *restrict src, int64_t stride) {
    transpose8(dst, 8, src, stride);
}

#define in_register(x) __asm__("" : "+x"(x))

/* Scores of 4 rows against `groups` groups of 8 keys in kt, into s[r * stride + key]; two
 * groups at a time (8 sums in registers, each broadcast q element serves two FMAs). */
static inline __attribute__((always_inline)) void scores_quad(
    const float *const q[4], const float *restrict kt, int groups, float *restrict s,
    int stride, const int D) {
    int g = 0;
    for (; g + 2 <= groups; g += 2) {
        const float *ka = kt + (int64_t)g * D * 8, *kb = ka + D * 8;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int d = 0; d < D; d++) {
            __m256 x = _mm256_loadu_ps(ka + d * 8), y = _mm256_loadu_ps(kb + d * 8);
            in_register(x);
            in_register(y);
#define ROW(r)                                                 \
            {                                                  \
                const __m256 qd = _mm256_broadcast_ss(q[r] + d); \
                a##r = _mm256_fmadd_ps(qd, x, a##r);           \
                b##r = _mm256_fmadd_ps(qd, y, b##r);           \
            }
            ROW(0) ROW(1) ROW(2) ROW(3)
#undef ROW
        }
        _mm256_storeu_ps(s + g * 8, a0), _mm256_storeu_ps(s + g * 8 + 8, b0);
        _mm256_storeu_ps(s + stride + g * 8, a1), _mm256_storeu_ps(s + stride + g * 8 + 8, b1);
        _mm256_storeu_ps(s + 2 * stride + g * 8, a2), _mm256_storeu_ps(s + 2 * stride + g * 8 + 8, b2);
        _mm256_storeu_ps(s + 3 * stride + g * 8, a3), _mm256_storeu_ps(s + 3 * stride + g * 8 + 8, b3);
    }
    if (g < groups) {
        const float *ka = kt + (int64_t)g * D * 8;
        __m256 a[4], b[4]; /* even and odd d */
        for (int r = 0; r < 4; r++) a[r] = b[r] = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 2) {
            const __m256 x = _mm256_loadu_ps(ka + d * 8), y = _mm256_loadu_ps(ka + d * 8 + 8);
            for (int r = 0; r < 4; r++) {
                a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(q[r] + d), x, a[r]);
                b[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(q[r] + d + 1), y, b[r]);
            }
        }
        for (int r = 0; r < 4; r++) _mm256_storeu_ps(s + r * stride + g * 8, _mm256_add_ps(a[r], b[r]));
    }
}

/* acc[r] += sum over keys t < m of p[r * stride + t] * v_t for 4 rows, v rows D apart: 16
 * columns at a time, 4 x 2 accumulators in registers. */
static inline __attribute__((always_inline)) void values_quad(
    float *const acc[4], const float *restrict p, int stride, const float *restrict vf, int m,
    const int D) {
    for (int c = 0; c < D; c += 16) {
        __m256 a0 = _mm256_loadu_ps(acc[0] + c), a1 = _mm256_loadu_ps(acc[1] + c);
        __m256 a2 = _mm256_loadu_ps(acc[2] + c), a3 = _mm256_loadu_ps(acc[3] + c);
        __m256 b0 = _mm256_loadu_ps(acc[0] + c + 8), b1 = _mm256_loadu_ps(acc[1] + c + 8);
        __m256 b2 = _mm256_loadu_ps(acc[2] + c + 8), b3 = _mm256_loadu_ps(acc[3] + c + 8);
        for (int t = 0; t < m; t++) {
            __m256 x = _mm256_loadu_ps(vf + (int64_t)t * D + c), y = _mm256_loadu_ps(vf + (int64_t)t * D + c + 8);
            in_register(x);
            in_register(y);
#define ROW(r)                                                           \
            {                                                            \
                const __m256 pr = _mm256_broadcast_ss(p + r * stride + t); \
                a##r = _mm256_fmadd_ps(pr, x, a##r);                     \
                b##r = _mm256_fmadd_ps(pr, y, b##r);                     \
            }
            ROW(0) ROW(1) ROW(2) ROW(3)
#undef ROW
        }
        _mm256_storeu_ps(acc[0] + c, a0), _mm256_storeu_ps(acc[0] + c + 8, b0);
        _mm256_storeu_ps(acc[1] + c, a1), _mm256_storeu_ps(acc[1] + c + 8, b1);
        _mm256_storeu_ps(acc[2] + c, a2), _mm256_storeu_ps(acc[2] + c + 8, b2);
        _mm256_storeu_ps(acc[3] + c, a3), _mm256_storeu_ps(acc[3] + c + 8, b3);
    }
}

static inline float softmax_row(float *s, int n, float *max, float *den) {
    return softmax_avx2(s, n, max, den);
}

#endif /* SOBERANA_AVX2 */

#if defined(__AVX512F__) || defined(SOBERANA_AVX2)
/* The rows of one KV head of a prefill item over one chunk of n keys: kt (transposed, per
 * group of KEY_GROUP keys) and vf (rows D apart) widened from the cache; the item's first query sees
 * `first` of them, and row r (query r / G) sees first + r / G. Four rows at a time: their
 * scores, then each row's online softmax over the keys it sees, then their values. */
static inline __attribute__((always_inline)) void chunk_rows(
    const float *q, float *acc, float *mx, float *den, float *s, const float *kt,
    const float *vf, int rows, int G, int first, int n, int stride, const int D) {
    for (int r0 = 0; r0 < rows; r0 += 4) {
        int m[4], most = 0;
        const float *qr[4];
        float *ar[4];
        for (int i = 0; i < 4; i++) {
            const int r = r0 + i < rows ? r0 + i : r0; /* a short last quad repeats its first row */
            const int seen = r0 + i < rows ? first + r / G : 0;
            m[i] = seen < 0 ? 0 : seen < n ? seen : n;
            most = m[i] > most ? m[i] : most;
            qr[i] = q + (int64_t)r * D, ar[i] = acc + (int64_t)r * D;
        }
        if (most == 0) continue;
        scores_quad(qr, kt, (most + KEY_GROUP - 1) / KEY_GROUP, s, stride, D);
        float *sink[4]; /* rows past the end add into a scratch row, not into row r0 */
        for (int i = 0; i < 4; i++) {
            float *sr = s + i * stride;
            sink[i] = r0 + i < rows ? ar[i] : s + 4 * stride;
            if (m[i] > 0) {
                const float alpha = softmax_row(sr, m[i], &mx[r0 + i], &den[r0 + i]);
                if (alpha != 1.0f)
                    for (int c = 0; c < D; c += VEC_LANES)
                        vec_storeu(ar[i] + c, vec_mul(vec_set1(alpha), vec_loadu(ar[i] + c)));
            }
            for (int t = m[i]; t < most; t++) sr[t] = 0.0f; /* keys it does not see */
        }
        values_quad(sink, s, stride, vf, most, D);
    }
}

static void chunk_rows_any(const float *q, float *acc, float *mx, float *den, float *s,
                           const float *kt, const float *vf, int rows, int G, int first, int n,
                           int stride, int D) {
    if (D == 64)
        chunk_rows(q, acc, mx, den, s, kt, vf, rows, G, first, n, stride, 64);
    else if (D == 128)
        chunk_rows(q, acc, mx, den, s, kt, vf, rows, G, first, n, stride, 128);
    else
        chunk_rows(q, acc, mx, den, s, kt, vf, rows, G, first, n, stride, D);
}
#endif


#ifdef SOBERANA_VEC
/* s[g * bs + t] = q_g . k_t, VEC_LANES keys at a time: two FMA chains per key, each key's
 * products kept as VEC_LANES partial sums until sum_rows adds up all the keys' together. */
static inline void scores_vec(const float *restrict q, const char *k, int64_t row_bytes, int n,
                              int G, int D, int bs, int dtype, float *restrict s) {
    const int L = VEC_LANES;
    for (int g = 0; g < G; g++) {
        const float *qg = q + g * D;
        for (int t0 = 0; t0 < n; t0 += L) {
            vec part[VEC_LANES];
            for (int i = 0; i < L; i++) {
                vec a0 = vec_zero(), a1 = vec_zero();
                if (t0 + i < n) {
                    const char *kr = k + (t0 + i) * row_bytes;
                    int c = 0;
                    for (; c + 2 * L <= D; c += 2 * L) {
                        a0 = vec_fmadd(vec_loadu(qg + c), vec_load(kr, c, dtype), a0);
                        a1 = vec_fmadd(vec_loadu(qg + c + L), vec_load(kr, c + L, dtype), a1);
                    }
                    if (c < D) a0 = vec_fmadd(vec_loadu(qg + c), vec_load(kr, c, dtype), a0);
                }
                part[sum_slot(i)] = vec_add(a0, a1);
            }
            vec_storeu_first(s + g * bs + t0, sum_rows(part), n - t0);
        }
    }
}

/* acc_g += sum_t p[g * bs + t] * v_t. Four VEC_LANES-column accumulators stay in registers
 * across the block's rows: four FMA chains in flight instead of one. */
static inline void values_vec(float *restrict acc, const float *restrict p, const char *v,
                              int64_t row_bytes, int n, int G, int D, int bs, int dtype) {
    const int L = VEC_LANES;
    for (int g = 0; g < G; g++) {
        const float *pg = p + g * bs;
        float *ag = acc + g * D;
        int c = 0;
        for (; c + 4 * L <= D; c += 4 * L) {
            vec a0 = vec_loadu(ag + c), a1 = vec_loadu(ag + c + L);
            vec a2 = vec_loadu(ag + c + 2 * L), a3 = vec_loadu(ag + c + 3 * L);
            for (int t = 0; t < n; t++) {
                const char *vr = v + t * row_bytes;
                const vec pt = vec_set1(pg[t]);
                a0 = vec_fmadd(pt, vec_load(vr, c, dtype), a0);
                a1 = vec_fmadd(pt, vec_load(vr, c + L, dtype), a1);
                a2 = vec_fmadd(pt, vec_load(vr, c + 2 * L, dtype), a2);
                a3 = vec_fmadd(pt, vec_load(vr, c + 3 * L, dtype), a3);
            }
            vec_storeu(ag + c, a0), vec_storeu(ag + c + L, a1);
            vec_storeu(ag + c + 2 * L, a2), vec_storeu(ag + c + 3 * L, a3);
        }
        for (; c < D; c += L) {
            vec a = vec_loadu(ag + c);
            for (int t = 0; t < n; t++)
                a = vec_fmadd(vec_set1(pg[t]), vec_load(v + t * row_bytes, c, dtype), a);
            vec_storeu(ag + c, a);
        }
    }
}
#endif

/* ---- one work item: a sequence, a tile of its queries, a run of its KV heads ----------- */

/* Rows of one head are num_kv_heads * head_dim apart and blocks are scattered: patterns the
 * hardware prefetchers follow poorly. So while a thread works on one block it asks for the
 * next one it will read, a head at a time (asking for a whole block at once stalls the core
 * until the misses drain). The cursor walks the thread's current item, then the one it has
 * already claimed next. */
typedef struct Cursor {
    int item, block, next; /* next: the thread's claimed next item (-1: none) */
} Cursor;

/* Byte offset in the caches of the block under the cursor, at its item's first head (-1:
 * none); moves the cursor on by one block. */
static inline int64_t next_block(const Job *j, Cursor *c, int64_t esz) {
    if (c->item < 0) return -1;
    Span sp;
    item_span(j, c->item, &sp);
    const int bs = j->block_size, len = sp.len;
    int64_t offset = -1;
    if (c->block * bs < len && c->block < j->max_blocks) {
        const int32_t block = j->block_table[sp.b * j->table_stride + c->block];
        if (block >= 0 && block < j->num_blocks)
            offset = (((int64_t)block * bs * j->num_kv_heads) + sp.h0) * j->head_dim * esz;
    }
    if (++c->block * bs >= len) {
        c->item = c->item == c->next ? -1 : c->next;
        c->block = 0;
    }
    return offset;
}

/* Keys a prefill item widens at a time: whole blocks, about 128. */
static inline int chunk_keys(int block_size) {
    return block_size * (128 / block_size > 1 ? 128 / block_size : 1);
}

/* Workspace floats per thread: per query head of a decode item, 16 x 16 partial sums; per row
 * of an item (query times query head), q and accumulator [D], block scores [block_size], running max and denominator, the
 * row's key count in the block (an int); then, for a prefill, a chunk of keys (row by row,
 * then transposed; each padded by a group of 16) and values widened to float32, and 5 rows of
 * scores. */
static int64_t workspace_floats(const Job *j) {
    const int64_t D = j->head_dim, heads = (int64_t)j->heads_per_item * (j->num_heads / j->num_kv_heads);
    const int64_t rows = heads * j->q_tile, chunk = j->query_start == NULL ? 0 : chunk_keys(j->block_size);
    const int64_t prefill = chunk == 0 ? 0 : (3 * chunk + 32) * D + 5 * (chunk > D ? chunk : D);
    return heads * 16 * 16 + rows * (2 * D + j->block_size + 3) + prefill;
}

/* always_inline with a constant dtype and path: one specialised copy per caller. */
static inline __attribute__((always_inline)) void attend(Job *j, int item, Cursor *pf, float *ws,
                                                         const int dtype, const int simd) {
    (void)simd; /* read only where the AVX-512 path is compiled */
    const int G = j->num_heads / j->num_kv_heads, D = j->head_dim, bs = j->block_size;
    const int64_t esz = dtype == DT_F32 ? 4 : 2, head_bytes = D * esz;
    const int64_t row_bytes = j->num_kv_heads * head_bytes; /* token to token */
#ifdef __AVX512F__
    const int split = simd && dtype == DT_BF16 && D % 32 == 0; /* q and acc split (bf16) */
#else
    const int split = 0;
#endif
    Span sp;
    item_span(j, item, &sp);
    const int b = sp.b, h0 = sp.h0, h1 = sp.h1, nq = sp.nq, len = sp.len;
    /* rows: per KV head, its RH = nq * G rows, query by query, each query's G heads in q's
     * order (a decode: the item's query heads in q's order) */
    const int RH = nq * G, rows = (h1 - h0) * RH;
    /* part: a decode's [rows][16] row sums for sum16 (64-byte aligned, as the workspace) */
    float *q = ws + j->heads_per_item * G * 256, *acc = q + rows * D, *s = acc + rows * D;
    float *mx = s + rows * bs;
    float *den = mx + rows;
    int *lim = (int *)(den + rows); /* keys of the current block each row sees */
#ifdef __AVX512F__
    __m512 *part = (__m512 *)ws;
#endif
    for (int r = 0; r < rows; r++) {
        const int kh = r / RH, qi = r % RH / G, g = r % G;
        const char *qrow = j->q + ((sp.token + qi) * j->q_stride + ((int64_t)(h0 + kh) * G + g) * D) * esz;
        float *qr = q + r * D;
        mx[r] = -INFINITY, den[r] = 0.0f;
#ifdef __AVX512F__
        if (split) {
            const __m512 scale = _mm512_set1_ps(j->scale);
            for (int c = 0; c < D; c += 32) {
                const __m512i w = _mm512_loadu_si512(qrow + 2 * c);
                _mm512_storeu_ps(qr + c, _mm512_mul_ps(bf16_even(w), scale));
                _mm512_storeu_ps(qr + c + 16, _mm512_mul_ps(bf16_odd(w), scale));
            }
            continue;
        }
#endif
        for (int i = 0; i < D; i++) qr[split ? split_index(i) : i] = load1(qrow, i, dtype) * j->scale;
    }
    memset(acc, 0, sizeof(float) * rows * D);
    const int32_t *blocks = j->block_table + b * j->table_stride;
    if ((int64_t)len > (int64_t)j->max_blocks * bs) {
        __atomic_store_n(&j->bad_block, 1, __ATOMIC_RELAXED);
        return;
    }
    const int first_keys = len - nq + 1; /* the keys the item's first query sees */
#if defined(__AVX512F__) || defined(SOBERANA_AVX2)
    if (simd && nq > 1 && D % 16 == 0) {
        /* A prefill tile: its keys and values, a chunk of blocks at a time, widened once per
         * KV head for all the head's rows (keys transposed, KEY_GROUP to a group, zero past the end) */
        const int chunk = chunk_keys(bs), stride = chunk > D ? chunk : D;
        float *kf = (float *)(lim + rows), *kt = kf + (chunk + 16) * D, *vf = kt + (chunk + 16) * D;
        float *sc = vf + chunk * D; /* 4 rows of scores and a scratch row, `stride` apart */
        for (int c0 = 0; c0 < len; c0 += chunk) {
            const int n = len - c0 < chunk ? len - c0 : chunk;
            for (int start = c0; start < c0 + n; start += bs) {
                next_block(j, pf, esz); /* keeps the prefetch cursor in step */
                if (blocks[start / bs] < 0 || blocks[start / bs] >= j->num_blocks) {
                    __atomic_store_n(&j->bad_block, 1, __ATOMIC_RELAXED);
                    return;
                }
            }
            const int padded = (n + KEY_GROUP - 1) / KEY_GROUP * KEY_GROUP;
            memset(kf + (int64_t)n * D, 0, sizeof(float) * (padded - n) * D);
            for (int kh = 0; kh < h1 - h0; kh++) {
                for (int start = c0; start < c0 + n; start += bs) {
                    const int64_t first = (int64_t)blocks[start / bs] * bs * row_bytes + (h0 + kh) * head_bytes;
                    const int here = len - start < bs ? len - start : bs;
                    widen_block(kf + (int64_t)(start - c0) * D, j->k + first, row_bytes, here, D, dtype, split);
                    widen_block(vf + (int64_t)(start - c0) * D, j->v + first, row_bytes, here, D, dtype, split);
                }
                for (int t0 = 0; t0 < padded; t0 += KEY_GROUP)
                    for (int c = 0; c < D; c += KEY_GROUP)
                        transpose_group(kt + (int64_t)t0 * D + c * KEY_GROUP, kf + (int64_t)t0 * D + c, D);
                chunk_rows_any(q + kh * RH * D, acc + kh * RH * D, mx + kh * RH, den + kh * RH, sc,
                               kt, vf, RH, G, first_keys - c0, n, stride, D);
            }
        }
    } else
#endif
    for (int start = 0; start < len; start += bs) {
        const int64_t ahead = next_block(j, pf, esz);
        const int n = len - start < bs ? len - start : bs;
        const int32_t block = blocks[start / bs];
        if (block < 0 || block >= j->num_blocks) {
            __atomic_store_n(&j->bad_block, 1, __ATOMIC_RELAXED);
            return;
        }
        const int64_t first = (int64_t)block * bs * row_bytes + h0 * head_bytes;
        const int masked = start + n > first_keys; /* some row sees only part of the block */
        for (int r = 0; r < rows; r++) {
            const int m = first_keys + r % RH / G - start;
            lim[r] = m < 0 ? 0 : m < n ? m : n;
        }
#ifdef __AVX512F__
        if (simd && nq == 1 && D % 32 == 0) {
            block_rows(j, q, acc, s, mx, den, part, j->k + first, j->v + first, ahead, row_bytes, n,
                       h1 - h0, G, D, bs, dtype);
            continue;
        }
#endif
        for (int kh = 0; kh < h1 - h0; kh++) {
            const char *k = j->k + first + kh * head_bytes, *v = j->v + first + kh * head_bytes;
            float *qh = q + kh * RH * D, *ah = acc + kh * RH * D, *sh = s + kh * RH * bs;
            if (ahead >= 0)
                for (int t = 0; t < n; t++)
                    for (int64_t o = 0; o < head_bytes; o += 64) {
                        __builtin_prefetch(j->k + ahead + kh * head_bytes + t * row_bytes + o);
                        __builtin_prefetch(j->v + ahead + kh * head_bytes + t * row_bytes + o);
                    }
#ifdef SOBERANA_VEC
            if (simd)
                scores_vec(qh, k, row_bytes, n, RH, D, bs, dtype, sh);
            else
#endif
                scores_portable(qh, k, row_bytes, n, RH, D, bs, dtype, sh);
            for (int i = 0; i < RH; i++) {
                const int r = kh * RH + i, m = lim[r];
                float *sr = sh + i * bs, alpha = 1.0f;
                if (m > 0) {
#ifdef __AVX512F__
                    if (simd)
                        alpha = softmax_avx512(sr, m, &mx[r], &den[r]);
                    else
#elif defined(SOBERANA_AVX2)
                    if (simd)
                        alpha = softmax_avx2(sr, m, &mx[r], &den[r]);
                    else
#endif
                        alpha = softmax_portable(sr, m, &mx[r], &den[r]);
                }
                if (masked) /* keys this row does not see add nothing */
                    for (int t = m; t < n; t++) sr[t] = 0.0f;
                if (alpha != 1.0f)
                    for (int c = 0; c < D; c++) ah[i * D + c] *= alpha;
            }
#ifdef SOBERANA_VEC
            if (simd)
                values_vec(ah, sh, v, row_bytes, n, RH, D, bs, dtype);
            else
#endif
                values_portable(ah, sh, v, row_bytes, n, RH, D, bs, dtype);
        }
    }
    for (int r = 0; r < rows; r++) {
        const int kh = r / RH, qi = r % RH / G, g = r % G;
        char *orow = j->out + (((sp.token + qi) * j->num_heads) + (int64_t)(h0 + kh) * G + g) * D * esz;
        const float inv = len > 0 ? 1.0f / den[r] : 0.0f; /* no keys: zeros, not NaN */
#ifdef __AVX512F__
        if (split) {
            const __m512 scale = _mm512_set1_ps(inv);
            for (int c = 0; c < D; c += 32) {
                const __m512i even = bf16_round(_mm512_mul_ps(_mm512_loadu_ps(acc + r * D + c), scale));
                const __m512i odd = bf16_round(_mm512_mul_ps(_mm512_loadu_ps(acc + r * D + c + 16), scale));
                _mm512_storeu_si512(orow + 2 * c,
                                    _mm512_or_si512(_mm512_and_si512(odd, _mm512_set1_epi32((int)0xffff0000u)),
                                                    _mm512_srli_epi32(even, 16)));
            }
            continue;
        }
#endif
        for (int c = 0; c < D; c++)
            store1(orow, c, acc[r * D + (split ? split_index(c) : c)] * inv, dtype);
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
#elif defined(SOBERANA_AVX2)
ATTEND(attend_f32_avx2, DT_F32, 1)
ATTEND(attend_bf16_avx2, DT_BF16, 1)
ATTEND(attend_f16_avx2, DT_F16, 1)
#endif

typedef void (*AttendFn)(Job *, int, Cursor *, float *);

static AttendFn pick(int dtype, int head_dim) {
#ifdef __AVX512F__
    if (head_dim % 16 == 0) {
        if (dtype == DT_F32) return attend_f32_avx512;
        if (dtype == DT_BF16) return attend_bf16_avx512;
        if (dtype == DT_F16 && HAVE_F16) return attend_f16_avx512;
    }
#elif defined(SOBERANA_AVX2)
    if (head_dim % 8 == 0) {
        if (dtype == DT_F32) return attend_f32_avx2;
        if (dtype == DT_BF16) return attend_bf16_avx2;
        if (dtype == DT_F16 && HAVE_F16) return attend_f16_avx2;
    }
#else
    (void)head_dim;
#endif
    if (dtype == DT_F32) return attend_f32;
    if (dtype == DT_BF16) return attend_bf16;
    if (dtype == DT_F16 && HAVE_F16) return attend_f16;
    return NULL;
}

/* The vector path this build takes: 2 AVX-512, 1 AVX2 + FMA, 0 portable C. */
int simd_level(void) {
#if defined(__AVX512F__)
    return 2;
#elif defined(SOBERANA_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* ---- threads ---------------------------------------------------------------------- */

static inline int claim(Job *j) {
    int i = __atomic_fetch_add(&j->next_item, 1, __ATOMIC_RELAXED);
    return i < j->num_items ? i : -1;
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

/* Below this much K/V read per extra thread, starting a thread costs more than it saves
 * (~20-50 us to create and join one). */
#define BYTES_PER_THREAD (256 << 10)
#define MAX_THREADS 256
/* Rows of a prefill item (its queries times G): the keys and values it widens serve them all. */
#define PREFILL_ROWS 256

/* out[t] = softmax(q[t] K_b^T * scale) V_b for each query token t of each of num_seqs
 * sequences b, over b's keys [0, seq_lens[b] - n_b + i] for its i-th of n_b queries.
 * query_start: NULL (decodes: one query each, token b) or [num_seqs + 1] int32 offsets, n_b =
 * query_start[b + 1] - query_start[b], 0 <= n_b <= seq_lens[b]. q rows are q_stride
 * elements apart, each [num_heads, head_dim] contiguous; k/v caches are contiguous
 * [num_blocks, block_size, num_kv_heads, head_dim]; out is contiguous [tokens, num_heads,
 * head_dim]; block_table rows are table_stride int32s apart, with max_blocks entries each.
 * Returns OK, UNSUPPORTED (dtype, head counts), BAD_BLOCK (a block id outside [0,
 * num_blocks), or a seq_len past max_blocks), BAD_QUERIES (query_start not ascending, or more
 * queries than keys) or NO_MEMORY. */
int paged_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                    int64_t num_blocks, const int32_t *block_table, int64_t table_stride,
                    int32_t max_blocks, const int32_t *seq_lens, const int32_t *query_start,
                    void *out, int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads,
                    int32_t head_dim, int32_t block_size, int32_t dtype, float scale,
                    int32_t num_threads, void *gomp_parallel) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || head_dim <= 0 || block_size <= 0)
        return UNSUPPORTED;
    AttendFn fn = pick(dtype, head_dim);
    if (fn == NULL) return UNSUPPORTED;
    const int G = num_heads / num_kv_heads;
    const int q_tile = query_start == NULL ? 1 : PREFILL_ROWS / G > 1 ? PREFILL_ROWS / G : 1;
    /* K/V rows read: each tile of queries reads its keys once */
    int64_t tokens = 0;
    for (int b = 0; b < num_seqs; b++) {
        const int64_t len = seq_lens[b] > 0 ? seq_lens[b] : 0;
        if (query_start == NULL) {
            tokens += len;
            continue;
        }
        const int64_t queries = (int64_t)query_start[b + 1] - query_start[b];
        if (queries < 0 || (queries > len && len > 0)) return BAD_QUERIES;
        tokens += len * ((queries + q_tile - 1) / q_tile);
    }
    const int64_t bytes = 2 * tokens * num_kv_heads * head_dim * (dtype == DT_F32 ? 4 : 2);
    int threads = num_threads < MAX_THREADS ? num_threads : MAX_THREADS;
    if (threads > 1 + bytes / BYTES_PER_THREAD) threads = 1 + bytes / BYTES_PER_THREAD;
    if (threads < 1) threads = 1;
    /* A decode item is a sequence with all its KV heads (each block one contiguous read)
     * unless there are too few sequences to share out, as in a single long decode; a
     * prefill item is one KV head of a tile, whose rows the tile's blocks serve. */
    int heads_per_item = query_start == NULL ? num_kv_heads : 1;
    while (threads > 1 && heads_per_item > 1 &&
           (int64_t)num_seqs * ((num_kv_heads + heads_per_item - 1) / heads_per_item) < 4 * threads)
        heads_per_item = (heads_per_item + 1) / 2;
    const int items_per_seq = (num_kv_heads + heads_per_item - 1) / heads_per_item;
    int *first_item = NULL;
    int64_t num_items = (int64_t)num_seqs * items_per_seq;
    if (query_start != NULL) {
        first_item = malloc(sizeof(int) * ((size_t)num_seqs + 1));
        if (first_item == NULL) return NO_MEMORY;
        num_items = 0;
        for (int b = 0; b < num_seqs; b++) {
            first_item[b] = (int)num_items;
            const int queries = query_start[b + 1] - query_start[b]; /* no keys: zeros */
            num_items += (int64_t)(queries + q_tile - 1) / q_tile * items_per_seq;
        }
        first_item[num_seqs] = (int)num_items;
        if (num_items > INT32_MAX / 2) {
            free(first_item);
            return UNSUPPORTED;
        }
    }
    Job j = {q, k_cache, v_cache, out, block_table, seq_lens, query_start, first_item, q_stride,
             table_stride, num_blocks, num_seqs, num_heads, num_kv_heads, head_dim, block_size,
             max_blocks, dtype, heads_per_item, items_per_seq, q_tile, (int)num_items, scale, fn,
             0, 0};
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
    free(first_item);
    if (j.bad_block) return BAD_BLOCK;
    /* A thread without workspace claims nothing: items are left only if none had one. */
    return j.next_item >= j.num_items ? OK : NO_MEMORY;
}

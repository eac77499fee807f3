/* The interface of the native decoder stack (cpu_forward.c): the one definition of its
 * structures. soberana/ops/cpu/decoder_stack.py builds its ctypes structures from this file
 * (field names, order and C types) and checks that it fills every field, so the Python side
 * cannot drift from it.
 *
 * Syntax the Python reader accepts in the structs: one declaration per line,
 * `type name, *name;` with int32_t, int64_t, float, pointers or the *Fn typedefs below.
 */
#ifndef SOBERANA_CPU_FORWARD_H
#define SOBERANA_CPU_FORWARD_H

#include <stddef.h>
#include <stdint.h>

typedef int (*NormFn)(const void *x, int64_t x_stride, const void *residual, int64_t res_stride,
                      void *residual_out, int64_t res_out_stride, const void *weight, void *out,
                      int64_t out_stride, int64_t rows, int64_t hidden, int32_t dtype,
                      int32_t weight_dtype, float eps, int32_t threads, void *gomp_parallel);
typedef int (*LinearFn)(const void *x, int64_t x_stride, int64_t M, int64_t K, const void *w,
                        int64_t N, const void *bias, void *out, int64_t out_stride,
                        int32_t threads, void *gomp_parallel);
typedef int (*RopeFn)(const void *qkv, int64_t qkv_stride, const int64_t *positions,
                      const float *cos, const float *sin, int64_t max_positions, void *q_out,
                      void *k_cache, void *v_cache, const int64_t *slots, int64_t num_slots,
                      int64_t tokens, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
                      int32_t dtype, int32_t threads, void *gomp_parallel);
typedef int (*AttentionFn)(const void *q, int64_t q_stride, const void *k_cache,
                           const void *v_cache, int64_t num_blocks, const int32_t *block_table,
                           int64_t table_stride, int32_t max_blocks, const int32_t *seq_lens,
                           const int32_t *query_start, void *out, int32_t num_seqs,
                           int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
                           int32_t block_size, int32_t dtype, float scale, int32_t threads,
                           void *gomp_parallel);
typedef int (*SiluFn)(const void *gate_up, int64_t in_stride, void *out, int64_t out_stride,
                      int64_t rows, int64_t inter, int32_t dtype, int32_t threads,
                      void *gomp_parallel);

typedef struct Kernels {
    NormFn norm;
    RopeFn rope;
    AttentionFn attention;
    SiluFn silu;
    void *gomp_parallel;
} Kernels;

/* Each projection is run by its own kernel (linear_bf16, or linear_w8a8_bf16 / linear_int8_bf16
 * for int8 layers) on its packed weight, with its bias as that kernel reads it, or NULL. */
typedef struct Layer {
    const void *input_norm, *post_norm;   /* [hidden] */
    LinearFn qkv_fn, o_fn, gate_up_fn, down_fn;
    const void *qkv, *qkv_bias;
    const void *o, *o_bias;
    const void *gate_up, *gate_up_bias;
    const void *down, *down_bias;
    void *k_cache, *v_cache;              /* [num_blocks, block_size, num_kv_heads, head_dim] */
} Layer;

typedef struct Model {
    const Kernels *kernels;
    const Layer *layers;
    const void *final_norm;
    const float *cos, *sin; /* [max_positions, head_dim] */
    int64_t max_positions;
    int32_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    int32_t num_blocks, block_size, dtype;
    float eps, scale;
} Model;

typedef struct Step {
    int64_t tokens;
    const int64_t *positions, *slots; /* [tokens] */
    const int32_t *block_table;       /* [num_seqs, max_blocks], rows table_stride apart */
    int64_t table_stride;
    int32_t max_blocks, num_seqs;
    const int32_t *seq_lens;    /* [num_seqs] */
    const int32_t *query_start; /* [num_seqs + 1], or NULL: one query per sequence (decode) */
} Step;

/* `tokens` unit-stride rows each: the embeddings (read only), then scratch buffers. */
typedef struct Workspace {
    const void *embeddings;
    void *residual, *y, *h, *qkv, *q, *attn, *gate_up, *act;
} Workspace;

/* Which kernel failed: the return value is stage << 8 | that kernel's code. */
enum { NORM = 1, LINEAR = 2, ROPE = 3, ATTENTION = 4, SILU = 5 };
/* The final hidden states [tokens, hidden] into `out`; this step's keys and values into the
 * caches. OK (0), or stage << 8 | the failing kernel's code. */
int forward_layers(const Model *m, const Step *s, const Workspace *w, void *out, int32_t threads);

#endif

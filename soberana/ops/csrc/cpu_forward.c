/* The decoder layers of a bfloat16 forward pass on a CPU in one call.
 *
 * Each layer: add + RMSNorm, the fused q/k/v projection, rotary embedding with the KV-cache
 * write, paged attention, the output projection, add + RMSNorm, the fused gate/up projection,
 * SiLU-and-mul and the down projection; then the final add + RMSNorm. These are the kernels
 * the PyTorch modules call one at a time (cpu_layers.c, linear_bf16.c, paged_attention.c), in
 * the same order on the same buffers' contents, so the results are bit-identical to that path.
 * Their addresses come in from soberana/ops/cpu_forward.py; each library stays built on its
 * own. What one call saves is the Python between the kernels: measured, ~6 ms of a ~53 ms
 * decode step of 64 tokens of a 125M model (the kernels themselves took ~47 ms).
 *
 * bfloat16 only: float32 linears run oneDNN's packed matmul, which C cannot reach.
 */
#include <stddef.h>
#include <stdint.h>

enum { OK = 0 };

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

/* Mirrors of the ctypes structures in cpu_forward.py: keep the field order in step. */
typedef struct Kernels {
    NormFn norm;
    LinearFn linear;
    RopeFn rope;
    AttentionFn attention;
    SiluFn silu;
    void *gomp_parallel;
} Kernels;

typedef struct Layer {
    const void *input_norm, *post_norm;   /* [hidden] */
    const void *qkv, *qkv_bias;           /* packed linear_bf16 weights; biases padded or NULL */
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
#define CHECK(stage, call)                      \
    do {                                        \
        const int rc_ = (call);                 \
        if (rc_ != OK) return (stage) << 8 | rc_; \
    } while (0)

/* The final hidden states [tokens, hidden] into `out`; this step's keys and values into the
 * caches. OK, or stage << 8 | the failing kernel's code (the caller may rerun the step on
 * the module path: every cache slot written so far gets the same values again). */
int forward_layers(const Model *m, const Step *s, const Workspace *w, void *out,
                   int32_t threads) {
    const Kernels *k = m->kernels;
    void *gp = k->gomp_parallel;
    const int64_t T = s->tokens, H = m->hidden, I = m->intermediate;
    const int64_t qkv_n = (int64_t)(m->num_heads + 2 * m->num_kv_heads) * m->head_dim;
    const int64_t q_n = (int64_t)m->num_heads * m->head_dim;
    const int64_t slots = (int64_t)m->num_blocks * m->block_size;
    const int dt = m->dtype;
    for (int32_t l = 0; l < m->num_layers; l++) {
        const Layer *L = &m->layers[l];
        /* The residual stream starts as the embeddings, which stay as they are: the first
         * add writes the sum to the residual buffer, later ones update it in place. */
        const void *residual = l == 0 ? w->embeddings : w->residual;
        if (l == 0)
            CHECK(NORM, k->norm(w->embeddings, H, NULL, 0, NULL, 0, L->input_norm, w->h, H, T, H,
                                dt, dt, m->eps, threads, gp));
        else /* the previous layer's output joins the residual stream */
            CHECK(NORM, k->norm(w->y, H, w->residual, H, w->residual, H, L->input_norm, w->h, H,
                                T, H, dt, dt, m->eps, threads, gp));
        CHECK(LINEAR, k->linear(w->h, H, T, H, L->qkv, qkv_n, L->qkv_bias, w->qkv, qkv_n,
                                threads, gp));
        CHECK(ROPE, k->rope(w->qkv, qkv_n, s->positions, m->cos, m->sin, m->max_positions,
                            w->q, L->k_cache, L->v_cache, s->slots, slots, T, m->num_heads,
                            m->num_kv_heads, m->head_dim, dt, threads, gp));
        CHECK(ATTENTION, k->attention(w->q, q_n, L->k_cache, L->v_cache, m->num_blocks,
                                      s->block_table, s->table_stride, s->max_blocks,
                                      s->seq_lens, s->query_start, w->attn, s->num_seqs,
                                      m->num_heads, m->num_kv_heads, m->head_dim, m->block_size,
                                      dt, m->scale, threads, gp));
        CHECK(LINEAR, k->linear(w->attn, q_n, T, q_n, L->o, H, L->o_bias, w->y, H, threads, gp));
        CHECK(NORM, k->norm(w->y, H, residual, H, w->residual, H, L->post_norm, w->h, H, T, H,
                            dt, dt, m->eps, threads, gp));
        CHECK(LINEAR, k->linear(w->h, H, T, H, L->gate_up, 2 * I, L->gate_up_bias, w->gate_up,
                                2 * I, threads, gp));
        CHECK(SILU, k->silu(w->gate_up, 2 * I, w->act, I, T, I, dt, threads, gp));
        CHECK(LINEAR, k->linear(w->act, I, T, I, L->down, H, L->down_bias, w->y, H, threads, gp));
    }
    CHECK(NORM, k->norm(w->y, H, w->residual, H, w->residual, H, m->final_norm, out, H, T, H, dt,
                        dt, m->eps, threads, gp));
    return OK;
}

/* The decoder layers of a bfloat16 forward pass on a CPU in one call.
 *
 * Each layer: add + RMSNorm, the fused q/k/v projection, rotary embedding with the KV-cache
 * write, paged attention, the output projection, add + RMSNorm, the fused gate/up projection,
 * SiLU-and-mul and the down projection; then the final add + RMSNorm. These are the kernels
 * the PyTorch modules call one at a time (cpu_layers.c, linear_bf16.c, paged_attention.c), in
 * the same order on the same buffers' contents, so the results are bit-identical to that path.
 * Their addresses come in from soberana/ops/cpu/decoder_stack.py (the interface: cpu_forward.h); each library stays built on its
 * own. What one call saves is the Python between the kernels: measured, ~6 ms of a ~53 ms
 * decode step of 64 tokens of a 125M model (the kernels themselves took ~47 ms).
 *
 * bfloat16 only: float32 linears run oneDNN's packed matmul, which C cannot reach. The
 * projections may be int8 (each layer names the kernel of each projection): an int8 model runs
 * as one call per step too, bit-identical to its modules.
 */
#include "cpu_forward.h"

enum { OK = 0 };

#define CHECK(stage, call)                      \
    do {                                        \
        const int rc_ = (call);                 \
        if (rc_ != OK) return (stage) << 8 | rc_; \
    } while (0)

/* See cpu_forward.h. A failing kernel stops the step; the caller raises its error. */
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
        CHECK(LINEAR, L->qkv_fn(w->h, H, T, H, L->qkv, qkv_n, L->qkv_bias, w->qkv, qkv_n,
                                threads, gp));
        CHECK(ROPE, k->rope(w->qkv, qkv_n, s->positions, m->cos, m->sin, m->max_positions,
                            w->q, L->k_cache, L->v_cache, s->slots, slots, T, m->num_heads,
                            m->num_kv_heads, m->head_dim, dt, threads, gp));
        CHECK(ATTENTION, k->attention(w->q, q_n, L->k_cache, L->v_cache, m->num_blocks,
                                      s->block_table, s->table_stride, s->max_blocks,
                                      s->seq_lens, s->query_start, w->attn, s->num_seqs,
                                      m->num_heads, m->num_kv_heads, m->head_dim, m->block_size,
                                      dt, m->scale, threads, gp));
        CHECK(LINEAR, L->o_fn(w->attn, q_n, T, q_n, L->o, H, L->o_bias, w->y, H, threads, gp));
        CHECK(NORM, k->norm(w->y, H, residual, H, w->residual, H, L->post_norm, w->h, H, T, H,
                            dt, dt, m->eps, threads, gp));
        CHECK(LINEAR, L->gate_up_fn(w->h, H, T, H, L->gate_up, 2 * I, L->gate_up_bias, w->gate_up,
                                2 * I, threads, gp));
        CHECK(SILU, k->silu(w->gate_up, 2 * I, w->act, I, T, I, dt, threads, gp));
        CHECK(LINEAR, L->down_fn(w->act, I, T, I, L->down, H, L->down_bias, w->y, H, threads, gp));
    }
    CHECK(NORM, k->norm(w->y, H, w->residual, H, w->residual, H, m->final_norm, out, H, T, H, dt,
                        dt, m->eps, threads, gp));
    return OK;
}

/*
 * A whole decode or verify forward of a Llama-family decoder (Llama, Qwen2, Qwen3) in one call:
 * every layer's norm, q/k/v, rotary, K/V write into the slot cache, attention, output
 * projection, norm, gate/up, SiLU gate and down projection, then the final norm.
 *
 * Why: engine/fused_decoder.py drives the same kernels from Python, a dozen calls per layer.
 * A 0.5B draft step is ~100 kernel calls of 20-300 us each, and the Python between them (argument
 * checks, tensor views, output allocations, ctypes marshalling) was a fifth of the step.
 *
 * Numbers: the same kernels in the same order on the same operands as the Python layer loop
 * with the "specserve_cpu" attention, so the output is bit for bit that loop's (the tests hold
 * it to that). Prompts keep the Python loop: their GEMMs and SDPA attention are other kernels.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int specserve_linear_bf16(const void *x, const uint16_t *w, const void *bias, void *y, int64_t M,
                          int64_t N, int64_t K, int bf16_io, int threads);
int specserve_linear_int8(const void *x, const int8_t *w, const float *scale, const void *bias,
                          void *y, int64_t M, int64_t N, int64_t K, int bf16_io, int threads);
int specserve_linear_int4(const void *x, const uint8_t *w, const void *bias, void *y, int64_t M,
                          int64_t N, int64_t K, int bf16_io, int threads);
int specserve_add_rms_norm(uint16_t *x, const uint16_t *delta, const uint16_t *w, uint16_t *out,
                           int64_t rows, int64_t dim, float eps, int threads);
int specserve_rope(uint16_t *x, int64_t ldx, const uint16_t *cos, const uint16_t *sin,
                   int64_t tokens, int64_t heads, int64_t dim, int threads);
int specserve_silu_mul(const uint16_t *gate, const uint16_t *up, int64_t ld, uint16_t *out,
                       int64_t rows, int64_t width, int threads);
int specserve_attention_bf16(const uint16_t *q, int64_t q_sb, int64_t q_sh, int64_t q_st,
                             const uint16_t *k, int64_t k_sb, int64_t k_sh, int64_t k_ss,
                             const uint16_t *v, int64_t v_sb, int64_t v_sh, int64_t v_ss,
                             const float *mask, uint16_t *out, int64_t batch, int64_t heads,
                             int64_t kv_heads, int64_t queries, int64_t keys, int64_t head_dim,
                             float scale, int threads);

/* Per layer, in this order in the pointer table (NULL where absent). A linear is its weight
 * (bf16 row-major [N, K]), when the int8 kernel may take it the packed int8 weight and row
 * scales (cpu_linear.pack_int8), used for inputs of at most sizes[INT8_ROWS] rows, and when it
 * has one its int4 copy (cpu_linear.pack_int4, scales inside), used for inputs of at most
 * sizes[INT4_ROWS] rows: the rules of Int8Linear and Int4Linear, which the Python side applies
 * when it fills the table. */
enum {
    QKV_W, QKV_Q, QKV_S, QKV_Q4, QKV_B,
    O_W, O_Q, O_S, O_Q4,
    GU_W, GU_Q, GU_S, GU_Q4,
    DOWN_W, DOWN_Q, DOWN_S, DOWN_Q4,
    IN_NORM, POST_NORM, Q_NORM, K_NORM,
    K_CACHE, V_CACHE,
    FIELDS
};
/* Sizes: hidden, q width, kv width, intermediate, heads, kv heads, head dim, cache capacity,
 * most rows an int8 linear takes, most rows an int4 linear takes. */
enum {
    HIDDEN, Q_SIZE, KV_SIZE, INTER, HEADS, KV_HEADS, HEAD_DIM, CAPACITY, INT8_ROWS, INT4_ROWS,
    SIZES
};

static int project(void *const *f, int w, const int64_t *sizes, const uint16_t *x, uint16_t *y,
                   int64_t M, int64_t N, int64_t K, const void *bias, int threads) {
    if (f[w + 3] != NULL && M <= sizes[INT4_ROWS])
        return specserve_linear_int4(x, f[w + 3], bias, y, M, N, K, 1, threads);
    if (f[w + 1] != NULL && M <= sizes[INT8_ROWS])
        return specserve_linear_int8(x, f[w + 1], f[w + 2], bias, y, M, N, K, 1, threads);
    return specserve_linear_bf16(x, f[w], bias, y, M, N, K, 1, threads);
}

/* x [rows * width, hidden]: the embedded tokens in, the residual stream after the last layer
 * out; normed gets the final norm's output. cos/sin [rows * width, head_dim]. Token t of row b
 * writes its K/V to (write_slot, write_pos)[b * width + t]; row b attends over the first
 * read_len positions of slot read_slot[b] under mask [rows, width, read_len] (additive fp32).
 * eps: per layer input and post-attention norm epsilons, then q/k norms' (Qwen3). Returns 0, or
 * -1 when a kernel failed or scratch memory could not be allocated. */
int specserve_decoder_step(int64_t layers, const int64_t *sizes, void *const *table,
                           const float *eps, uint16_t *x, uint16_t *normed, const uint16_t *cos,
                           const uint16_t *sin, const int64_t *write_slot,
                           const int64_t *write_pos, const int64_t *read_slot, int64_t rows,
                           int64_t width, int64_t read_len, const float *mask, float scaling,
                           const uint16_t *final_norm, float final_eps, int threads) {
    const int64_t hidden = sizes[HIDDEN], q_size = sizes[Q_SIZE], kv_size = sizes[KV_SIZE];
    const int64_t inter = sizes[INTER], heads = sizes[HEADS], kv_heads = sizes[KV_HEADS];
    const int64_t head_dim = sizes[HEAD_DIM], capacity = sizes[CAPACITY];
    const int64_t tokens = rows * width, qkv_size = q_size + 2 * kv_size;
    const int64_t slot_stride = kv_heads * capacity * head_dim;
    uint16_t *qkv = malloc((size_t)(tokens * qkv_size) * sizeof(uint16_t));
    uint16_t *attn = malloc((size_t)(tokens * q_size) * sizeof(uint16_t));
    uint16_t *delta = malloc((size_t)(tokens * hidden) * sizeof(uint16_t));
    uint16_t *gate_up = malloc((size_t)(tokens * 2 * inter) * sizeof(uint16_t));
    uint16_t *act = malloc((size_t)(tokens * inter) * sizeof(uint16_t));
    int status = (qkv && attn && delta && gate_up && act) ? 0 : -1;
    for (int64_t layer = 0; layer < layers && status == 0; layer++) {
        void *const *f = table + layer * FIELDS;
        const float *layer_eps = eps + layer * 4;
        status |= specserve_add_rms_norm(x, layer ? delta : NULL, f[IN_NORM], normed, tokens,
                                         hidden, layer_eps[0], threads);
        status |= project(f, QKV_W, sizes, normed, qkv, tokens, qkv_size, hidden, f[QKV_B],
                          threads);
        if (f[Q_NORM] != NULL)
            for (int64_t t = 0; t < tokens; t++) {
                uint16_t *q = qkv + t * qkv_size, *k = q + q_size;
                status |= specserve_add_rms_norm(q, NULL, f[Q_NORM], q, heads, head_dim,
                                                 layer_eps[2], threads);
                status |= specserve_add_rms_norm(k, NULL, f[K_NORM], k, kv_heads, head_dim,
                                                 layer_eps[3], threads);
            }
        status |= specserve_rope(qkv, qkv_size, cos, sin, tokens, heads, head_dim, threads);
        status |= specserve_rope(qkv + q_size, qkv_size, cos, sin, tokens, kv_heads, head_dim,
                                 threads);
        uint16_t *k_cache = f[K_CACHE], *v_cache = f[V_CACHE];
        for (int64_t t = 0; t < tokens; t++) {
            const uint16_t *k = qkv + t * qkv_size + q_size, *v = k + kv_size;
            for (int64_t h = 0; h < kv_heads; h++) {
                const int64_t at = write_slot[t] * slot_stride + (h * capacity + write_pos[t]) *
                                                                     head_dim;
                memcpy(k_cache + at, k + h * head_dim, (size_t)head_dim * sizeof(uint16_t));
                memcpy(v_cache + at, v + h * head_dim, (size_t)head_dim * sizeof(uint16_t));
            }
        }
        /* Row by row: each reads its own slot, wherever it lies in the pool. */
        for (int64_t b = 0; b < rows && status == 0; b++) {
            const int64_t slot = read_slot[b] * slot_stride;
            status |= specserve_attention_bf16(
                qkv + b * width * qkv_size, 0, head_dim, qkv_size,
                k_cache + slot, 0, capacity * head_dim, head_dim,
                v_cache + slot, 0, capacity * head_dim, head_dim,
                mask + b * width * read_len, attn + b * width * q_size,
                1, heads, kv_heads, width, read_len, head_dim, scaling, threads);
        }
        status |= project(f, O_W, sizes, attn, delta, tokens, hidden, q_size, NULL, threads);
        status |= specserve_add_rms_norm(x, delta, f[POST_NORM], normed, tokens, hidden,
                                         layer_eps[1], threads);
        status |= project(f, GU_W, sizes, normed, gate_up, tokens, 2 * inter, hidden, NULL,
                          threads);
        status |= specserve_silu_mul(gate_up, gate_up + inter, 2 * inter, act, tokens, inter,
                                     threads);
        status |= project(f, DOWN_W, sizes, act, delta, tokens, hidden, inter, NULL, threads);
    }
    if (status == 0)
        status |= specserve_add_rms_norm(x, delta, final_norm, normed, tokens, hidden, final_eps,
                                         threads);
    free(qkv);
    free(attn);
    free(delta);
    free(gate_up);
    free(act);
    return status ? -1 : 0;
}

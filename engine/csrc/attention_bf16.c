/*
 * Decode/verify attention for bf16 q, k, v with fp32 arithmetic; AVX2 + FMA, OpenMP.
 *
 *   out[b, t, h, :] = softmax_j(scale * q[b, h, t, :] . k[b, h / G, j, :] + mask[b, t, j])
 *                     @ v[b, h / G, j, :]                       (G = query heads per kv head)
 *
 * Why: eager attention in bf16 runs torch's bf16 batched matmul, which without AVX512-BF16
 * costs ~40 ms per extra query token at an 800-token context on a 2-core CPU, so verifying
 * gamma+1 tokens over a long prompt cost as much as gamma+1 decode steps. SDPA is fast but
 * blocks its work by the number of queries, so a query's result depends on how many came
 * with it.
 *
 * Batch invariance: every (b, h, t) is one work item computed by the same code whatever T, B
 * or the thread count: each score is one 8-lane accumulator over d in order, then the same
 * horizontal sum; the softmax sum and every output lane accumulate over j in order. So a query
 * gives bit-identical output alone or next to other queries, which keeps speculative greedy
 * output identical to plain decoding.
 *
 * Without a mask, the T queries are the last T of the S positions and attend causally. Keys
 * whose mask entry is below -1e30 (the additive "invisible" value) are skipped: exp of
 * such a score is exactly 0 in fp32, so skipping them changes no bit of the result.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_HEAD_DIM 256
#define MASKED (-1e30f)

static inline __m256 load_bf16x8(const uint16_t *p) {
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

/* Scores of keys [0, n) against q (fp32, length d), four keys at a time for independent FMA
 * chains. A key's score never depends on which group it fell in. */
static void scores_row(const float *q, const uint16_t *k, int64_t k_stride, int64_t n, int64_t d,
                       float scale, float *out) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const uint16_t *k0 = k + j * k_stride, *k1 = k0 + k_stride, *k2 = k1 + k_stride,
                       *k3 = k2 + k_stride;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        for (int64_t c = 0; c < d; c += 8) {
            __m256 qv = _mm256_loadu_ps(q + c);
            a0 = _mm256_fmadd_ps(qv, load_bf16x8(k0 + c), a0);
            a1 = _mm256_fmadd_ps(qv, load_bf16x8(k1 + c), a1);
            a2 = _mm256_fmadd_ps(qv, load_bf16x8(k2 + c), a2);
            a3 = _mm256_fmadd_ps(qv, load_bf16x8(k3 + c), a3);
        }
        out[j] = hsum(a0) * scale;
        out[j + 1] = hsum(a1) * scale;
        out[j + 2] = hsum(a2) * scale;
        out[j + 3] = hsum(a3) * scale;
    }
    for (; j < n; j++) {
        const uint16_t *k0 = k + j * k_stride;
        __m256 a0 = _mm256_setzero_ps();
        for (int64_t c = 0; c < d; c += 8)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load_bf16x8(k0 + c), a0);
        out[j] = hsum(a0) * scale;
    }
}

/* Returns 0, or -1 when arguments are out of range or scratch memory cannot be had. */
int specserve_attention_bf16(const uint16_t *q, int64_t q_sb, int64_t q_sh, int64_t q_st,
                             const uint16_t *k, int64_t k_sb, int64_t k_sh, int64_t k_ss,
                             const uint16_t *v, int64_t v_sb, int64_t v_sh, int64_t v_ss,
                             const float *mask, /* [B, T, S] contiguous, or NULL: causal */
                             uint16_t *out,     /* [B, T, H, D] contiguous */
                             int64_t batch, int64_t heads, int64_t kv_heads, int64_t queries,
                             int64_t keys, int64_t head_dim, float scale, int threads) {
    if (head_dim <= 0 || head_dim > MAX_HEAD_DIM || head_dim % 8 || kv_heads <= 0 ||
        heads % kv_heads || keys <= 0)
        return -1;
    const int64_t group = heads / kv_heads;
    const int64_t items = batch * heads * queries;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = malloc((size_t)keys * sizeof(float));
        if (scores == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            if (scores == NULL) continue;
            const int64_t t = item % queries;
            const int64_t h = (item / queries) % heads;
            const int64_t b = item / (queries * heads);
            const float *row_mask = mask ? mask + (b * queries + t) * keys : NULL;
            /* Keys past the last visible one contribute nothing: don't even score them. Without
             * a mask the queries are the last T positions, each seeing itself and the past. */
            int64_t n = keys - queries + t + 1;
            if (row_mask)
                for (n = keys; n > 0 && row_mask[n - 1] < MASKED;) n--;
            uint16_t *dst = out + ((b * queries + t) * heads + h) * head_dim;
            if (n == 0) { /* nothing visible: eager would give NaN; zeros are harmless */
                memset(dst, 0, (size_t)head_dim * sizeof(uint16_t));
                continue;
            }
            float qf[MAX_HEAD_DIM];
            const uint16_t *qp = q + b * q_sb + h * q_sh + t * q_st;
            for (int64_t c = 0; c < head_dim; c += 8) _mm256_storeu_ps(qf + c, load_bf16x8(qp + c));
            const uint16_t *kp = k + b * k_sb + (h / group) * k_sh;
            const uint16_t *vp = v + b * v_sb + (h / group) * v_sh;
            scores_row(qf, kp, k_ss, n, head_dim, scale, scores);

            float top = -INFINITY;
            for (int64_t j = 0; j < n; j++) {
                if (row_mask) {
                    if (row_mask[j] < MASKED) {
                        scores[j] = -INFINITY;
                        continue;
                    }
                    scores[j] += row_mask[j];
                }
                if (scores[j] > top) top = scores[j];
            }
            float total = 0.0f;
            for (int64_t j = 0; j < n; j++) {
                scores[j] = scores[j] == -INFINITY ? 0.0f : expf(scores[j] - top);
                total += scores[j];
            }
            const float inv = 1.0f / total;
            /* 32 output lanes per pass over the keys: four accumulators, each summing over j in
             * order, so the lane's result is independent of the pass layout. */
            for (int64_t c = 0; c < head_dim; c += 32) {
                const int64_t width = head_dim - c < 32 ? head_dim - c : 32;
                __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                                 _mm256_setzero_ps()};
                for (int64_t j = 0; j < n; j++) {
                    if (scores[j] == 0.0f) continue;
                    const __m256 p = _mm256_set1_ps(scores[j]);
                    const uint16_t *row = vp + j * v_ss + c;
                    for (int64_t lane = 0; lane < width / 8; lane++)
                        acc[lane] = _mm256_fmadd_ps(p, load_bf16x8(row + 8 * lane), acc[lane]);
                }
                float result[32];
                for (int64_t lane = 0; lane < width / 8; lane++)
                    _mm256_storeu_ps(result + 8 * lane, _mm256_mul_ps(acc[lane], _mm256_set1_ps(inv)));
                for (int64_t i = 0; i < width; i++) dst[c + i] = f32_to_bf16(result[i]);
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

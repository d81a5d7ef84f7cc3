/*
 * Decode/verify attention for bf16 q, k, v with fp32 arithmetic; AVX2 + FMA (scores with
 * AVX512-BF16 where linear_bf16.c's specserve_isa_level selects it), OpenMP.
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
 * Design: a work item is one kv head of one row with a chunk of its G * T queries (all of them
 * unless there are more than MAX_ROWS or too few items for the threads), so each K and V row is
 * read and widened to fp32 once per item and used by every query of the chunk. Per item:
 *  1. scores, 8 keys at a time: the block's keys are widened into a scratch [8][D]; each query
 *     runs 8 accumulators (one per key) of 8 lanes over d, which one hadd tree (sum8x8) turns
 *     into the 8 scores, without a horizontal sum per key. With AVX512-BF16 (scores_avx512),
 *     16 keys at a time with vdpbf16ps on the bf16 q and k as they are, which measured ~20 %
 *     faster overall at 1024 keys;
 *  2. softmax per query in 8-lane vectors: mask, max, a polynomial exp (exp8) and the sum;
 *  3. P @ V in tiles of up to 6 queries x 16 output lanes, each V row widened once per tile.
 *
 * Batch invariance: every (b, h, t) gives bit-identical output whatever T, B, the other
 * queries, their masks or the thread count, because each number it depends on is computed by
 * the same operations whichever item, chunk or tile the query falls in:
 *  - a score: lane l accumulates d = l, l + 8, ... in order, and sum8x8 adds the lanes as
 *    ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)) for every key position in the block, so a
 *    score depends on its q and k only (keys beyond the block's last are zero-filled and their
 *    scores never read); likewise in scores_avx512's order. The two instruction sets sum in
 *    different orders, so, as for the linear kernels, the choice is per process, not per call;
 *  - the query's softmax runs over its own n visible-prefix keys in blocks of 8 from key 0
 *    (lanes past n are masked to -inf, their exp to exactly 0): the max is exact in any order,
 *    exp8 is elementwise, and the sum's lane l adds keys l, l + 8, ... in order, then one
 *    fixed tree;
 *  - output lane c accumulates p_j * v[j, c] with one FMA per key j < n whose p_j is not 0,
 *    in increasing j, then one multiply by 1 / sum. A tile does all its queries' FMAs
 *    unconditionally only below the first key where any of them has p == 0 or runs out of
 *    keys, and tests each query's own p_j beyond, so which other queries share the tile
 *    changes nothing.
 * Keys are never split between threads, and how the queries are chunked follows from the
 * shape and thread count but cannot change a query's operations.
 *
 * Without a mask, the T queries are the last T of the S positions and attend causally. Keys
 * whose mask entry is below -1e30 (the additive "invisible" value) are skipped (p = 0, no FMA),
 * so whatever their K and V hold changes no bit of the result; keys past a query's last visible
 * one are not even scored for it. A query with no visible key gets zeros.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_HEAD_DIM 256
#define MASKED (-1e30f)
#define KEYS 8      /* keys per score block: one per fp32 lane */
#define KEYS16 16   /* the same with AVX512 */
#define MAX_ROWS 32 /* queries per work item: bounds the scores scratch (MAX_ROWS x S) */
#define TILE 6      /* queries per P @ V tile: 6 x 2 accumulators + 2 V rows + p in 16 ymm */

/* Lane l of the result is the sum of a[l]'s lanes, added as ((x0 + x1) + (x2 + x3)) +
 * ((x4 + x5) + (x6 + x7)) for every l (hadd adds neighbours, then neighbouring pairs, then the
 * 128-bit halves), so a sum never depends on which lane it lands in. */
static inline __m256 sum8x8(const __m256 a[8]) {
    const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20),
                         _mm256_permute2f128_ps(s0, s1, 0x31));
}

/* The same tree for one vector's lanes. */
static inline float sum8(__m256 v) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(v, v), _mm256_setzero_ps());
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
}

static inline float max8(__m256 v) { /* exact in any order */
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* e^x per lane, within 2 ulp of expf for normal results (Cephes' expf: x = n ln2 + r with
 * |r| <= ln2 / 2, a degree-7 polynomial for e^r, then 2^n into the exponent). x below
 * ln(FLT_MIN), -inf included, gives 0 instead of a denormal; x above 88.3 gives +inf; NaN
 * stays NaN. The scores only ever need x <= 0. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654475f), hi = _mm256_set1_ps(88.3762626647949f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(hi, _mm256_max_ps(lo, x)); /* max/min return x when it is NaN */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* For the tests: y = exp8(x) elementwise (a tail goes through a zero-padded vector). */
void specserve_exp_f32(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) {
        float in[8] = {0}, res[8];
        const int64_t w = n - i < 8 ? n - i : 8;
        memcpy(in, x + i, (size_t)w * sizeof(float));
        _mm256_storeu_ps(res, exp8(_mm256_loadu_ps(in)));
        memcpy(y + i, res, (size_t)w * sizeof(float));
    }
}

/* Scores of 8 widened keys kf [8][d] against one fp32 query: scale * q . k, one per lane. */
static inline __m256 score_block(const float *q, const float *kf, int64_t d, __m256 scale) {
    __m256 acc[KEYS];
    for (int i = 0; i < KEYS; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 8) {
        const __m256 qv = _mm256_loadu_ps(q + c);
        for (int i = 0; i < KEYS; i++)
            acc[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kf + i * d + c), acc[i]);
    }
    return _mm256_mul_ps(sum8x8(acc), scale);
}

/* Scores of query rows [0, m) (fp32 q [m][d]) against keys [0, n[r]) of K, into s[r][...]
 * (a row's last block may run up to 7 keys past n[r]; those are never read). */
static void scores_avx2(const float *q, const int64_t *n, int m, int64_t longest,
                        const uint16_t *k, int64_t k_ss, int64_t d, float scale, float *kf,
                        float *s, int64_t ld) {
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int64_t j0 = 0; j0 < longest; j0 += KEYS) {
        const int64_t width = longest - j0 < KEYS ? longest - j0 : KEYS;
        for (int64_t i = 0; i < width; i++)
            for (int64_t c = 0; c < d; c += 8)
                _mm256_storeu_ps(kf + i * d + c, load_bf16x8(k + (j0 + i) * k_ss + c));
        if (width < KEYS) memset(kf + width * d, 0, (size_t)((KEYS - width) * d) * sizeof(float));
        for (int r = 0; r < m; r++)
            if (n[r] > j0) _mm256_storeu_ps(s + r * ld + j0, score_block(q + r * d, kf, d, vscale));
    }
}

static const uint16_t zero_row[MAX_HEAD_DIM]; /* stands in for keys past the last */

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
/* scores_avx2 with AVX512-BF16, 16 keys per block: vdpbf16ps multiplies bf16 q and k as they
 * are (no widening, no scratch) and adds neighbouring products into 16 lanes. Lane l of a key's
 * accumulator takes d = 2l, 2l + 1 of each 32-wide step in order (a ragged last step is a
 * zero-masked load); then lane l + 8 is added to lane l, and sum8x8 adds the remaining 8 in its
 * fixed tree: the same operations for every key position. */
static void scores_avx512(const uint16_t *const *q, const int64_t *n, int m, int64_t longest,
                          const uint16_t *k, int64_t k_ss, int64_t d, float scale, float *s,
                          int64_t ld) {
    const __m512 vscale = _mm512_set1_ps(scale);
    const int64_t d32 = d & ~(int64_t)31;
    const __mmask32 tail = (__mmask32)((1ull << (d - d32)) - 1);
    for (int64_t j0 = 0; j0 < longest; j0 += KEYS16) {
        const uint16_t *kr[KEYS16];
        for (int i = 0; i < KEYS16; i++) kr[i] = j0 + i < longest ? k + (j0 + i) * k_ss : zero_row;
        for (int r = 0; r < m; r++) {
            if (n[r] <= j0) continue;
            __m512 acc[KEYS16];
            for (int i = 0; i < KEYS16; i++) acc[i] = _mm512_setzero_ps();
            int64_t c = 0;
            for (; c < d32; c += 32) {
                const __m512bh qv = (__m512bh)_mm512_loadu_si512(q[r] + c);
                for (int i = 0; i < KEYS16; i++)
                    acc[i] = _mm512_dpbf16_ps(acc[i], qv, (__m512bh)_mm512_loadu_si512(kr[i] + c));
            }
            if (c < d) {
                const __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(tail, q[r] + c);
                for (int i = 0; i < KEYS16; i++)
                    acc[i] = _mm512_dpbf16_ps(acc[i], qv,
                                              (__m512bh)_mm512_maskz_loadu_epi16(tail, kr[i] + c));
            }
            __m256 half[KEYS16];
            for (int i = 0; i < KEYS16; i++) {
                const __m512d wide = _mm512_castps_pd(acc[i]);
                half[i] = _mm256_add_ps(_mm512_castps512_ps256(acc[i]),
                                        _mm256_castpd_ps(_mm512_extractf64x4_pd(wide, 1)));
            }
            const __m512 sums = _mm512_castpd_ps(_mm512_insertf64x4(
                _mm512_castpd256_pd512(_mm256_castps_pd(sum8x8(half))),
                _mm256_castps_pd(sum8x8(half + 8)), 1));
            _mm512_storeu_ps(s + r * ld + j0, _mm512_mul_ps(sums, vscale));
        }
    }
}
#pragma GCC pop_options

/* Turns query row's scores s[0, n) into unnormalised probabilities in place; returns their
 * sum and, in *first_zero, the first key whose p is 0 (n if none). Lanes past n (the block's
 * padding, up to the next multiple of 8) become 0. */
static float softmax_row(float *s, const float *mask, int64_t n, int64_t *first_zero) {
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY), masked = _mm256_set1_ps(MASKED);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 top = minus_inf;
    for (int64_t j = 0; j < n; j += 8) {
        /* Lanes j + l >= n are past the query's keys (and maybe past the mask's row). */
        const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - j)), lane);
        __m256 x = _mm256_loadu_ps(s + j);
        __m256 visible = _mm256_castsi256_ps(in);
        if (mask) {
            const __m256 m = _mm256_maskload_ps(mask + j, in);
            x = _mm256_add_ps(x, m);
            visible = _mm256_and_ps(visible, _mm256_cmp_ps(m, masked, _CMP_GE_OQ));
        }
        x = _mm256_blendv_ps(minus_inf, x, visible);
        _mm256_storeu_ps(s + j, x);
        top = _mm256_max_ps(top, x);
    }
    const __m256 t = _mm256_set1_ps(max8(top));
    __m256 total = _mm256_setzero_ps();
    *first_zero = n;
    for (int64_t j = 0; j < n; j += 8) {
        const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), t));
        _mm256_storeu_ps(s + j, p);
        total = _mm256_add_ps(total, p);
        const int zeros = _mm256_movemask_ps(_mm256_cmp_ps(p, _mm256_setzero_ps(), _CMP_EQ_OQ));
        if (zeros && *first_zero == n) {
            const int64_t at = j + __builtin_ctz((unsigned)zeros);
            if (at < n) *first_zero = at;
        }
    }
    return sum8(total);
}

/* out[r][c0, c0 + 8 * W) += sum_j p[r][j] * v[j][c0, ...] for R queries (R, W literal at the
 * call so the accumulators stay in registers). Every query gets one FMA per key j < n[r] with
 * p[r][j] != 0, in increasing j: below `common` (the first key where any of the R has p == 0 or
 * runs out) unconditionally, beyond it tested query by query. */
static inline __attribute__((always_inline)) void pv_tile(const int R, const int W,
                                                         float *const *p, const int64_t *n,
                                                         int64_t common, int64_t last,
                                                         const uint16_t *v, int64_t v_ss,
                                                         int64_t c0, float *const *acc_out) {
    __m256 acc[TILE][2];
    for (int r = 0; r < R; r++)
        for (int w = 0; w < W; w++) acc[r][w] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j < common; j++) {
        const uint16_t *row = v + j * v_ss + c0;
        __m256 vv[2];
        for (int w = 0; w < W; w++) vv[w] = load_bf16x8(row + 8 * w);
        for (int r = 0; r < R; r++) {
            const __m256 pr = _mm256_broadcast_ss(p[r] + j);
            for (int w = 0; w < W; w++) acc[r][w] = _mm256_fmadd_ps(pr, vv[w], acc[r][w]);
        }
    }
    for (; j < last; j++) {
        const uint16_t *row = v + j * v_ss + c0;
        __m256 vv[2];
        for (int w = 0; w < W; w++) vv[w] = load_bf16x8(row + 8 * w);
        for (int r = 0; r < R; r++) {
            if (j >= n[r] || p[r][j] == 0.0f) continue;
            const __m256 pr = _mm256_broadcast_ss(p[r] + j);
            for (int w = 0; w < W; w++) acc[r][w] = _mm256_fmadd_ps(pr, vv[w], acc[r][w]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int w = 0; w < W; w++) _mm256_storeu_ps(acc_out[r] + c0 + 8 * w, acc[r][w]);
}

/* R queries' P @ V over all of d (d a multiple of 8), into acc_out[r][0, d). */
static void pv_rows(int R, float *const *p, const int64_t *n, const int64_t *first_zero,
                    const uint16_t *v, int64_t v_ss, int64_t d, float *const *acc_out) {
    int64_t common = first_zero[0], last = n[0];
    for (int r = 1; r < R; r++) {
        if (first_zero[r] < common) common = first_zero[r];
        if (n[r] > last) last = n[r];
    }
#define PV_CASE(RR)                                                                            \
    case RR:                                                                                   \
        for (c = 0; c + 16 <= d; c += 16) pv_tile(RR, 2, p, n, common, last, v, v_ss, c, acc_out); \
        if (c < d) pv_tile(RR, 1, p, n, common, last, v, v_ss, c, acc_out);                   \
        break;
    int64_t c;
    switch (R) {
        PV_CASE(1) PV_CASE(2) PV_CASE(3) PV_CASE(4) PV_CASE(5) PV_CASE(6)
    }
#undef PV_CASE
}

/* Per-thread scratch. */
typedef struct {
    float *q;      /* [MAX_ROWS][d] the chunk's queries, fp32 */
    float *s;      /* [MAX_ROWS][ld] scores, then probabilities */
    float *kf;     /* [KEYS][d] the score block's keys, fp32 */
    float *result; /* [MAX_ROWS][d] P @ V before normalising */
} scratch;

/* Returns 0, or -1 when arguments are out of range or scratch memory cannot be had. */
int specserve_attention_bf16(const uint16_t *q, int64_t q_sb, int64_t q_sh, int64_t q_st,
                             const uint16_t *k, int64_t k_sb, int64_t k_sh, int64_t k_ss,
                             const uint16_t *v, int64_t v_sb, int64_t v_sh, int64_t v_ss,
                             const float *mask, /* [B, T, S] contiguous, or NULL: causal */
                             uint16_t *out,     /* [B, T, H, D] contiguous */
                             int64_t batch, int64_t heads, int64_t kv_heads, int64_t queries,
                             int64_t keys, int64_t head_dim, float scale, int threads) {
    if (head_dim <= 0 || head_dim > MAX_HEAD_DIM || head_dim % 8 || kv_heads <= 0 ||
        heads % kv_heads || keys <= 0 || queries < 0 || batch < 0)
        return -1;
    const int64_t d = head_dim, group = heads / kv_heads, rows = group * queries;
    if (rows == 0 || batch == 0) return 0;
    if (threads < 1) threads = 1;
    /* Chunks of a kv head's queries: few enough to share each K/V row widely, enough to keep
     * every thread busy. Which chunk a query lands in does not change its bits. */
    const int64_t groups = batch * kv_heads;
    int64_t chunks = (rows + MAX_ROWS - 1) / MAX_ROWS;
    const int64_t wanted = (threads + groups - 1) / groups;
    if (chunks < wanted) chunks = wanted < rows ? wanted : rows;
    const int64_t per_chunk = (rows + chunks - 1) / chunks;
    chunks = (rows + per_chunk - 1) / per_chunk;
    const int64_t items = groups * chunks;
    const int64_t ld = (keys + KEYS16 - 1) / KEYS16 * KEYS16;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        scratch sc = {malloc((size_t)(MAX_ROWS * d) * sizeof(float)),
                      malloc((size_t)(MAX_ROWS * ld) * sizeof(float)),
                      malloc((size_t)(KEYS * d) * sizeof(float)),
                      malloc((size_t)(MAX_ROWS * d) * sizeof(float))};
        const int ok = sc.q && sc.s && sc.kf && sc.result;
        if (!ok) failed = 1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            if (!ok) continue;
            const int64_t chunk = item % chunks, kvh = (item / chunks) % kv_heads,
                          b = item / (chunks * kv_heads);
            const int64_t r0 = chunk * per_chunk;
            const int m = (int)(rows - r0 < per_chunk ? rows - r0 : per_chunk);
            /* Row r of the chunk is query head kvh * G + (r0 + r) / T at position (r0 + r) % T. */
            int64_t n[MAX_ROWS], first_zero[MAX_ROWS], t_of[MAX_ROWS], h_of[MAX_ROWS];
            const uint16_t *qrow[MAX_ROWS];
            int64_t longest = 0;
            for (int r = 0; r < m; r++) {
                const int64_t t = (r0 + r) % queries, h = kvh * group + (r0 + r) / queries;
                t_of[r] = t;
                h_of[r] = h;
                /* Keys past the last visible one contribute nothing: don't score them. Without
                 * a mask the queries are the last T positions, each seeing itself and the past. */
                int64_t len = keys - queries + t + 1;
                if (mask) {
                    const float *row_mask = mask + (b * queries + t) * keys;
                    for (len = keys; len > 0 && row_mask[len - 1] < MASKED;) len--;
                }
                n[r] = len > 0 ? len : 0;
                if (n[r] > longest) longest = n[r];
                qrow[r] = q + b * q_sb + h * q_sh + t * q_st;
                if (specserve_isa_level == 0)
                    for (int64_t c = 0; c < d; c += 8)
                        _mm256_storeu_ps(sc.q + r * d + c, load_bf16x8(qrow[r] + c));
            }
            const uint16_t *kp = k + b * k_sb + kvh * k_sh;
            const uint16_t *vp = v + b * v_sb + kvh * v_sh;

            if (specserve_isa_level > 0)
                scores_avx512(qrow, n, m, longest, kp, k_ss, d, scale, sc.s, ld);
            else
                scores_avx2(sc.q, n, m, longest, kp, k_ss, d, scale, sc.kf, sc.s, ld);

            /* Softmax per query; queries with keys go to P @ V in tiles, in chunk order. */
            float inv[MAX_ROWS];
            float *probs[MAX_ROWS], *acc[MAX_ROWS];
            int64_t live_n[MAX_ROWS], live_zero[MAX_ROWS];
            int live = 0;
            for (int r = 0; r < m; r++) {
                if (n[r] == 0) continue;
                const float *row_mask = mask ? mask + (b * queries + t_of[r]) * keys : NULL;
                inv[r] = 1.0f / softmax_row(sc.s + r * ld, row_mask, n[r], &first_zero[r]);
                probs[live] = sc.s + r * ld;
                acc[live] = sc.result + r * d;
                live_n[live] = n[r];
                live_zero[live] = first_zero[r];
                live++;
            }
            for (int at = 0; at < live; at += TILE) {
                const int tile = live - at < TILE ? live - at : TILE;
                pv_rows(tile, probs + at, live_n + at, live_zero + at, vp, v_ss, d, acc + at);
            }

            for (int r = 0; r < m; r++) {
                uint16_t *dst = out + ((b * queries + t_of[r]) * heads + h_of[r]) * d;
                if (n[r] == 0) { /* nothing visible: eager would give NaN; zeros are harmless */
                    memset(dst, 0, (size_t)d * sizeof(uint16_t));
                    continue;
                }
                const float *res = sc.result + r * d;
                const __m256 scale_r = _mm256_set1_ps(inv[r]);
                for (int64_t c = 0; c < d; c += 8) {
                    float lanes[8];
                    _mm256_storeu_ps(lanes, _mm256_mul_ps(_mm256_loadu_ps(res + c), scale_r));
                    for (int i = 0; i < 8; i++) dst[c + i] = f32_to_bf16(lanes[i]);
                }
            }
        }
        free(sc.q);
        free(sc.s);
        free(sc.kf);
        free(sc.result);
    }
    return failed ? -1 : 0;
}

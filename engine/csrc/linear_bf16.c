/*
 * y[M,N] = x[M,K] @ w[N,K]^T (+ bias[N]) for bf16 weights and fp32 activations, on AVX2 + FMA.
 *
 * Why this exists: without AVX512-BF16, torch's bf16 GEMM costs linearly in M, so verifying
 * gamma+1 speculative tokens costs gamma+1 decode steps. With small M the product is bound by
 * streaming w from memory, so the kernel reads every weight row once and applies it to all M
 * rows of x while it sits in L1; extra tokens then cost FMAs, not bandwidth.
 *
 * Design:
 *  - Threads split N (OpenMP, static), never K: no cross-thread reduction.
 *  - A tile is ROWS weight rows x MB rows of x with one 8-lane accumulator per (row, m);
 *    ROWS=4, MB<=3 keeps 12 accumulators + 3 x vectors + 1 weight vector in 16 ymm registers.
 *    Several rows at once give independent FMA chains even when M=1.
 *  - bf16 -> fp32 is exact: zero-extend to 32 bits and shift into the high half.
 *  - Batch invariance: y[m,n] is always one accumulator fed k = 0, 8, 16, ... in order, then
 *    the same horizontal sum, then + bias. Tile shape, M, the other rows of x and the thread
 *    count change which registers are used, never the order of additions, so a row of x gives
 *    bit-identical output alone or in any batch. Built without -ffast-math for that reason.
 *  - K need not be a multiple of 8: the caller zero-pads x to ldx >= roundup(K, 8) columns, and
 *    the last partial weight chunk is copied to a zero-filled buffer, so the tail is one more
 *    ordinary step.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 12 /* weight rows per work item; divisible by every tile height below */
#define MAX_MB 6
#define MAX_ROWS 12

static inline __m256 bf16x8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* rows and mb are compile-time constants at every call site, so the loops over them unroll and
 * acc[][] lives in registers. */
static inline __attribute__((always_inline)) void tile(
    const float *x, int64_t ldx, const uint16_t *w, int64_t K, const float *bias, float *y,
    int64_t N, const int rows, const int mb) {
    __m256 acc[MAX_ROWS][MAX_MB];
    for (int r = 0; r < rows; r++)
        for (int m = 0; m < mb; m++) acc[r][m] = _mm256_setzero_ps();
    const int64_t k8 = K & ~(int64_t)7;
    for (int64_t k = 0; k < k8; k += 8) {
        for (int r = 0; r < rows; r++) {
            __m256 wv = bf16x8(w + r * K + k);
            for (int m = 0; m < mb; m++)
                acc[r][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k), acc[r][m]);
        }
    }
    if (k8 < K) {
        for (int r = 0; r < rows; r++) {
            uint16_t buf[8] = {0};
            memcpy(buf, w + r * K + k8, (size_t)(K - k8) * sizeof(uint16_t));
            __m256 wv = bf16x8(buf);
            for (int m = 0; m < mb; m++)
                acc[r][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k8), acc[r][m]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int m = 0; m < mb; m++) {
            float v = hsum(acc[r][m]);
            y[m * N + r] = bias ? v + bias[r] : v;
        }
}

/* Tile heights per chunk size: about 12 accumulators, the most that fit beside the x and
 * weight registers. */
static const int ROWS_FOR_MB[MAX_MB + 1] = {0, 6, 6, 4, 3, 2, 2};

#define TILES(R)                                                                   \
    static void tiles_##R(const float *x, int64_t ldx, const uint16_t *w, int64_t K, \
                          const float *b, float *y, int64_t N, int mb) {           \
        switch (mb) {                                                              \
        case 1: tile(x, ldx, w, K, b, y, N, R ? R : 6, 1); break;                 \
        case 2: tile(x, ldx, w, K, b, y, N, R ? R : 6, 2); break;                 \
        case 3: tile(x, ldx, w, K, b, y, N, R ? R : 4, 3); break;                 \
        case 4: tile(x, ldx, w, K, b, y, N, R ? R : 3, 4); break;                 \
        case 5: tile(x, ldx, w, K, b, y, N, R ? R : 2, 5); break;                 \
        default: tile(x, ldx, w, K, b, y, N, R ? R : 2, 6); break;                \
        }                                                                          \
    }
TILES(0) /* full tiles, height ROWS_FOR_MB[mb] */
TILES(1) /* single rows, for the last partial block */

/* Weight rows [n, n + rows) against every row of x in chunks of at most MAX_MB; after the
 * first chunk the block is re-read from L1/L2, not memory. Chunks are balanced (M=8 is 4+4,
 * not 6+2) so that each one keeps enough accumulators busy. */
static void row_block(const float *x, int64_t ldx, const uint16_t *w, const float *bias,
                      float *y, int64_t M, int64_t N, int64_t K, int64_t n, int rows) {
    const int64_t chunks = (M + MAX_MB - 1) / MAX_MB;
    for (int64_t c = 0, m = 0; c < chunks; c++) {
        int mb = (int)((M - m) / (chunks - c) + ((M - m) % (chunks - c) != 0));
        const float *xm = x + m * ldx;
        float *ym = y + m * N + n;
        if (rows == BLOCK) {
            for (int r = 0; r < rows; r += ROWS_FOR_MB[mb])
                tiles_0(xm, ldx, w + (n + r) * K, K, bias ? bias + n + r : NULL, ym + r, N, mb);
        } else {
            for (int r = 0; r < rows; r++)
                tiles_1(xm, ldx, w + (n + r) * K, K, bias ? bias + n + r : NULL, ym + r, N, mb);
        }
        m += mb;
    }
}

void specserve_linear_bf16(const float *x, int64_t ldx, const uint16_t *w, const float *bias,
                           float *y, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t blocks = (N + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n = b * BLOCK;
        int rows = N - n < BLOCK ? (int)(N - n) : BLOCK;
        row_block(x, ldx, w, bias, y, M, N, K, n, rows);
    }
}

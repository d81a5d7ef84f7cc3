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

#define ROWS 4
#define MAX_MB 3

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
    __m256 acc[ROWS][MAX_MB];
    for (int r = 0; r < rows; r++)
        for (int m = 0; m < mb; m++) acc[r][m] = _mm256_setzero_ps();
    const int64_t k8 = K & ~(int64_t)7;
    for (int64_t k = 0; k < k8; k += 8) {
        __m256 xv[MAX_MB];
        for (int m = 0; m < mb; m++) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
        for (int r = 0; r < rows; r++) {
            __m256 wv = bf16x8(w + r * K + k);
            for (int m = 0; m < mb; m++) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
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

/* Weight rows [n, n + rows) against every row of x, in chunks of MAX_MB; after the first chunk
 * the rows come from L1/L2, not memory. */
static void row_block(const float *x, int64_t ldx, const uint16_t *w, const float *bias,
                      float *y, int64_t M, int64_t N, int64_t K, int64_t n, int rows) {
    const uint16_t *wn = w + n * K;
    const float *bn = bias ? bias + n : NULL;
    for (int64_t m = 0; m < M; m += MAX_MB) {
        const float *xm = x + m * ldx;
        float *ym = y + m * N + n;
        int64_t mb = M - m < MAX_MB ? M - m : MAX_MB;
        if (rows == ROWS) {
            if (mb == 3) tile(xm, ldx, wn, K, bn, ym, N, ROWS, 3);
            else if (mb == 2) tile(xm, ldx, wn, K, bn, ym, N, ROWS, 2);
            else tile(xm, ldx, wn, K, bn, ym, N, ROWS, 1);
        } else {
            for (int r = 0; r < rows; r++) {
                const uint16_t *wr = wn + r * K;
                const float *br = bn ? bn + r : NULL;
                if (mb == 3) tile(xm, ldx, wr, K, br, ym + r, N, 1, 3);
                else if (mb == 2) tile(xm, ldx, wr, K, br, ym + r, N, 1, 2);
                else tile(xm, ldx, wr, K, br, ym + r, N, 1, 1);
            }
        }
    }
}

void specserve_linear_bf16(const float *x, int64_t ldx, const uint16_t *w, const float *bias,
                           float *y, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n = b * ROWS;
        int rows = N - n < ROWS ? (int)(N - n) : ROWS;
        row_block(x, ldx, w, bias, y, M, N, K, n, rows);
    }
}

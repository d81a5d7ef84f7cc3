/*
 * y[M,N] = (x[M,K] @ q[N,K]^T) * scale[N] (+ bias[N]) for int8 weights with one fp32 scale per
 * output row; x, bias and y all fp32 or all bf16; fp32 accumulation; AVX2 + FMA, OpenMP.
 *
 * Why: a draft step on a CPU is bound by streaming the draft's weights from memory, so int8
 * weights (half of bf16's bytes) make every draft step cheaper. Only the draft model uses it:
 * its proposals may change a little, the output cannot (the target verifies every token).
 *
 * Design: like linear_bf16.c but simpler, since only small M (draft rows) comes here. Threads
 * split N; a tile is 4 weight rows x up to 3 rows of x, 8 columns per step: 8 int8 weights
 * widen to fp32 in two instructions and feed one FMA per row of x. The per-row scale is
 * applied once to the finished dot product.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define ROWS 4 /* weight rows per tile */
#define MAX_MB 3
#define PF_AHEAD 512 /* bytes ahead in each weight row */


static inline __m256 widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* rows (<= ROWS) weight rows from w against mb (<= MAX_MB) rows of x; K a multiple of 8.
 * out[m * ROWS + r] = dot(x[m], w[r]). */
static void tile(const float *x, int64_t K, const int8_t *w, int rows, int mb, float *out) {
    __m256 acc[ROWS][MAX_MB];
    for (int r = 0; r < ROWS; r++)
        for (int m = 0; m < MAX_MB; m++) acc[r][m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        if ((k & 63) == 0)
            for (int r = 0; r < rows; r++)
                _mm_prefetch((const char *)(w + r * K + k + PF_AHEAD), _MM_HINT_T0);
        __m256 xv[MAX_MB];
        for (int m = 0; m < mb; m++) xv[m] = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < rows; r++) {
            const __m256 wv = widen8(w + r * K + k);
            for (int m = 0; m < mb; m++) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int m = 0; m < mb; m++) out[m * ROWS + r] = hsum(acc[r][m]);
}

/* Returns 0, or -1 for a bad shape or when scratch memory could not be allocated. */
int specserve_linear_int8(const void *x, const int8_t *w, const float *scale, const void *bias,
                          void *y, int64_t M, int64_t N, int64_t K, int bf16_io, int threads) {
    if (M <= 0 || N <= 0 || K <= 0 || K % 8) return -1;
    float *xf = malloc((size_t)(M * K) * sizeof(float));
    if (!xf) return -1;
    for (int64_t i = 0; i < M * K; i++)
        xf[i] = bf16_io ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
    const int64_t tiles = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n = t * ROWS;
        const int rows = N - n < ROWS ? (int)(N - n) : ROWS;
        for (int64_t m = 0; m < M; m += MAX_MB) {
            const int mb = M - m < MAX_MB ? (int)(M - m) : MAX_MB;
            float out[ROWS * MAX_MB];
            tile(xf + m * K, K, w + n * K, rows, mb, out);
            for (int i = 0; i < mb; i++)
                for (int r = 0; r < rows; r++) {
                    const int64_t j = n + r, at = (m + i) * N + j;
                    float v = out[i * ROWS + r] * scale[j];
                    if (bias)
                        v += bf16_io ? bf16_to_f32(((const uint16_t *)bias)[j])
                                     : ((const float *)bias)[j];
                    if (bf16_io) ((uint16_t *)y)[at] = f32_to_bf16(v);
                    else ((float *)y)[at] = v;
                }
        }
    }
    free(xf);
    return 0;
}

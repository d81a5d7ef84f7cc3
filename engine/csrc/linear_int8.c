/*
 * y[M,N] = (x[M,K] @ q[N,K]^T) * scale[N] (+ bias[N]) for int8 weights (packed, see below) with
 * one fp32 scale per output row; x, bias and y all fp32 or all bf16. AVX2, OpenMP.
 *
 * Why: only draft decode steps come here, and their proposals may change a little while the
 * output cannot (the target verifies every token). Widening int8 weights to fp32 for FMAs made
 * the arithmetic, not memory, the bound; multiplying int8 by int8 does 32 products per
 * instruction instead of 8, so the step falls back to streaming the (halved) weight bytes.
 *
 * Design: x is quantised first, in blocks of 32 along K with one fp32 scale per block (as
 * llama.cpp's q8_0 does for activations: a per-row scale would let one outlier channel flatten
 * the rest). A block's dot product is exact in int32: maddubs multiplies |w| (unsigned) by x
 * carrying w's sign, pairs of products stay below 2 * 127 * 127 < 2^15, so nothing saturates.
 * Each block's int32 sum is scaled by the x block's scale into fp32 accumulators, and the weight
 * row's scale is applied once at the end. Threads split N; a tile is 4 weight rows x up to 2
 * rows of x.
 *
 * Weights come packed (cpu_linear.pack_int8): per group of 4 rows, block b of each row in turn,
 * so a tile reads one contiguous stream. Row by row it read 4 short ones (a 896-wide row is 28
 * cache lines), which the hardware prefetcher barely ramps up on: the same products ran at about
 * half this machine's memory bandwidth. N is padded to whole groups; padding rows are never
 * stored.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define ROWS 4 /* weight rows per tile */
#define MAX_MB 2
#define BLOCK 32
#define PF_AHEAD 2048 /* bytes ahead in the packed stream */

/* Row m of x as int8 blocks xq and their scales xd: xd[b] * xq[b*32 + i] ~ x[m*K + b*32 + i].
 * Shared with the int4 kernel (bf16.h), so both quantise activations identically. */
void specserve_quantize_row(const void *x, int bf16_io, int64_t m, int64_t K, int8_t *xq,
                            float *xd) {
    for (int64_t b = 0; b < K / BLOCK; b++) {
        float v[BLOCK], amax = 0.0f;
        for (int i = 0; i < BLOCK; i++) {
            v[i] = load_io(x, m * K + b * BLOCK + i, bf16_io);
            const float a = fabsf(v[i]);
            if (a > amax) amax = a;
        }
        const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        xd[b] = d;
        for (int i = 0; i < BLOCK; i++) xq[b * BLOCK + i] = (int8_t)lrintf(v[i] * inv);
    }
}

/* out[m * ROWS + r] = sum over blocks of xd[m][b] * dot_int(xq[m] block b, w[r] block b), for
 * the packed group of ROWS weight rows at w. */
static void tile(const int8_t *xq, const float *xd, int64_t K, const int8_t *w, int mb,
                 float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[ROWS][MAX_MB];
    for (int r = 0; r < ROWS; r++)
        for (int m = 0; m < MAX_MB; m++) acc[r][m] = _mm256_setzero_ps();
    const int64_t blocks = K / BLOCK;
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t k = b * BLOCK;
        const int8_t *wb = w + b * ROWS * BLOCK;
        _mm_prefetch((const char *)(wb + PF_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(wb + PF_AHEAD + 64), _MM_HINT_T0);
        __m256i xv[MAX_MB];
        __m256 dv[MAX_MB];
        for (int m = 0; m < mb; m++) {
            xv[m] = _mm256_loadu_si256((const __m256i *)(xq + m * K + k));
            dv[m] = _mm256_set1_ps(xd[m * blocks + b]);
        }
        for (int r = 0; r < ROWS; r++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(wb + r * BLOCK));
            const __m256i wabs = _mm256_abs_epi8(wv);
            for (int m = 0; m < mb; m++) {
                const __m256i pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv[m], wv));
                const __m256 block = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                acc[r][m] = _mm256_fmadd_ps(block, dv[m], acc[r][m]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++)
        for (int m = 0; m < mb; m++) out[m * ROWS + r] = hsum(acc[r][m]);
}

int specserve_linear_int8_vnni(const int8_t *xq, const float *xd, const int8_t *w,
                               const float *scale, const void *bias, void *y, int64_t M,
                               int64_t N, int64_t K, int bf16_io, int threads);

/* Returns 0, or -1 for a bad shape or when scratch memory could not be allocated. */
int specserve_linear_int8(const void *x, const int8_t *w, const float *scale, const void *bias,
                          void *y, int64_t M, int64_t N, int64_t K, int bf16_io, int threads) {
    if (M <= 0 || N <= 0 || K <= 0 || K % BLOCK) return -1;
    const int64_t blocks = K / BLOCK;
    int8_t *xq = malloc((size_t)(M * K));
    float *xd = malloc((size_t)(M * blocks) * sizeof(float));
    if (!xq || !xd) {
        free(xq);
        free(xd);
        return -1;
    }
    for (int64_t m = 0; m < M; m++)
        specserve_quantize_row(x, bf16_io, m, K, xq + m * K, xd + m * blocks);
    if (specserve_isa_level > 0) {
        const int status =
            specserve_linear_int8_vnni(xq, xd, w, scale, bias, y, M, N, K, bf16_io, threads);
        free(xq);
        free(xd);
        return status;
    }
    const int64_t tiles = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n = t * ROWS;
        const int rows = N - n < ROWS ? (int)(N - n) : ROWS;
        for (int64_t m = 0; m < M; m += MAX_MB) {
            const int mb = M - m < MAX_MB ? (int)(M - m) : MAX_MB;
            float out[ROWS * MAX_MB];
            tile(xq + m * K, xd + m * blocks, K, w + n * K, mb, out);
            for (int i = 0; i < mb; i++)
                for (int r = 0; r < rows; r++) {
                    const int64_t j = n + r;
                    store_output(y, (m + i) * N + j, out[i * ROWS + r] * scale[j], bias, j,
                                 bf16_io);
                }
        }
    }
    free(xq);
    free(xd);
    return 0;
}

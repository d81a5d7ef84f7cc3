/*
 * y[M,N] = x[M,K] @ w[N,K]^T (+ bias[N]) for bf16 weights, with x, bias and y all fp32 or all
 * bf16, fp32 accumulation; AVX2 + FMA, OpenMP.
 *
 * Why: without AVX512-BF16, torch's bf16 GEMM costs linearly in M, so verifying gamma+1
 * speculative tokens costs gamma+1 decode steps. For small M the product is bound by streaming
 * w from memory, so this kernel reads each weight row once and applies it to all M rows of x
 * while it sits in L1; extra tokens then cost FMAs, not bandwidth.
 *
 * Design:
 *  - Threads split N (static schedule), never K: no cross-thread reduction.
 *  - A tile is R weight rows x MB rows of x, one 8-lane accumulator per (row, m); R*MB is about
 *    12, the most that fit in 16 ymm registers beside the operands. Several rows per tile give
 *    independent FMA chains even for M=1. Larger M runs in chunks of <= MAX_MB rows of x over
 *    a BLOCK of weight rows, so chunks after the first re-read the block from L1/L2; long
 *    prompts go in PANELs of x rows so that the x being reused stays in cache too.
 *  - bf16 -> fp32 costs two ops per 16 weights: a 32-bit lane holds weights 2j and 2j+1, and
 *    shifting left by 16 / masking the low half yields each as an exact fp32. x is permuted
 *    once per call to match (per 16 columns: even ones, then odd ones) and zero-padded to a
 *    multiple of 16, so a ragged K tail is one more ordinary step.
 *  - Software prefetch a fixed distance ahead in each row, continuing into the next tile's
 *    rows near the end: a tile streams only R*K weights, too few for the hardware prefetcher
 *    to ramp up, and without it memory and FMAs barely overlap once M > 1.
 *  - Batch invariance: y[m,n] is always one accumulator fed the same 16-column steps in the
 *    same order, then the same horizontal sum, then + bias. M, the other rows of x, the tile
 *    shape and the thread count change which registers are used, never the order of the
 *    additions, so a row of x gives bit-identical output alone or in any batch. Hence also no
 *    -ffast-math.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define BLOCK 12 /* weight rows per work item; a multiple of every tile height */
#define MAX_MB 6
/* Prefetch distance in weights per row (1 KiB): shorter lets the FMAs stall on memory, and
 * much longer measured slower. */
#define PF_AHEAD 512


/* Left alone, gcc folds the x load into every FMA that uses it, doubling the loads; an empty
 * asm that claims to modify the value makes it load once into a register. */
#define IN_REGISTER(v) __asm__("" : "+x"(v))

/* 16 weights from each of R rows (wp, row stride ws) against columns xk.. of MB rows of the
 * permuted x. Even then odd weights, each x vector loaded once and used for all R rows: that
 * needs R*MB + R + 1 registers and keeps loads well below the FMA rate. */
#define STEP(wp, ws, xk, R, MB)                                                               \
    {                                                                                         \
        __m256 wv[R];                                                                         \
        for (int r = 0; r < R; r++)                                                           \
            wv[r] = _mm256_castsi256_ps(_mm256_slli_epi32(                                    \
                _mm256_loadu_si256((const __m256i *)((wp) + r * (ws))), 16));                 \
        for (int m = 0; m < MB; m++) {                                                        \
            __m256 xv = _mm256_loadu_ps(x + m * ldx + (xk));                                  \
            IN_REGISTER(xv);                                                                  \
            for (int r = 0; r < R; r++) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);    \
        }                                                                                     \
        for (int r = 0; r < R; r++)                                                           \
            wv[r] = _mm256_castsi256_ps(_mm256_and_si256(                                     \
                _mm256_loadu_si256((const __m256i *)((wp) + r * (ws))), hi_mask));            \
        for (int m = 0; m < MB; m++) {                                                        \
            __m256 xv = _mm256_loadu_ps(x + m * ldx + (xk) + 8);                              \
            IN_REGISTER(xv);                                                                  \
            for (int r = 0; r < R; r++) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);    \
        }                                                                                     \
    }

/* A macro so that R and MB are literals: the loops over them unroll and acc stays in
 * registers. Columns go 32 at a time so that each row gets one prefetch per cache line. */
#define DEFINE_TILE(R, MB)                                                                    \
    static void tile_##R##_##MB(const float *x, int64_t ldx, const uint16_t *w, int64_t K,    \
                                float *y, int64_t N) {                                        \
        const __m256i hi_mask = _mm256_set1_epi32(-65536);                                    \
        __m256 acc[R][MB];                                                                    \
        for (int r = 0; r < R; r++)                                                           \
            for (int m = 0; m < MB; m++) acc[r][m] = _mm256_setzero_ps();                     \
        const int64_t k16 = K & ~(int64_t)15;                                                 \
        int64_t k = 0;                                                                        \
        for (; k + 32 <= k16; k += 32) {                                                      \
            for (int r = 0; r < R; r++) {                                                     \
                /* Past K: the same row of the next tile (past w's end is harmless: prefetches \
                 * never fault). */                                                           \
                const int64_t ahead = k + PF_AHEAD;                                           \
                _mm_prefetch((const char *)(w + (ahead < K ? r * K + ahead                    \
                                                           : (R + r) * K + ahead - K)),       \
                             _MM_HINT_T0);                                                    \
            }                                                                                 \
            STEP(w + k, K, k, R, MB);                                                         \
            STEP(w + k + 16, K, k + 16, R, MB);                                               \
        }                                                                                     \
        if (k < k16) STEP(w + k, K, k, R, MB);                                                \
        if (k16 < K) {                                                                        \
            uint16_t tail[R * 16];                                                            \
            memset(tail, 0, sizeof tail);                                                     \
            for (int r = 0; r < R; r++)                                                       \
                memcpy(tail + r * 16, w + r * K + k16, (size_t)(K - k16) * sizeof(uint16_t)); \
            STEP(tail, 16, k16, R, MB);                                                       \
        }                                                                                     \
        for (int r = 0; r < R; r++)                                                           \
            for (int m = 0; m < MB; m++) y[m * N + r] = hsum(acc[r][m]);                      \
    }

typedef void (*tile_fn)(const float *, int64_t, const uint16_t *, int64_t, float *, int64_t);
DEFINE_TILE(6, 1) DEFINE_TILE(4, 2) DEFINE_TILE(3, 3) DEFINE_TILE(2, 4) DEFINE_TILE(2, 5)
DEFINE_TILE(2, 6)
DEFINE_TILE(1, 1) DEFINE_TILE(1, 2) DEFINE_TILE(1, 3) DEFINE_TILE(1, 4) DEFINE_TILE(1, 5)
DEFINE_TILE(1, 6)
/* Per chunk size mb: the tile used inside full blocks, and a one-row tile for the last
 * partial block. Measured on Zen 3 with gcc 12; taller or wider tiles spill or lose more to
 * register shuffling than they gain. 2 x 6 fills all 16 registers (12 accumulators, two
 * weight vectors, x, the mask) and still beat 3 + 3 rows of 3 x 3 at six rows of x (a gamma-5
 * verify) by 7-15 % on the 1.5B target's four products (interleaved runs, best of 15); from
 * 11 rows on the chunking it brings measured level. */
static const int TALL_ROWS[MAX_MB + 1] = {0, 6, 4, 3, 2, 2, 2};
static const tile_fn TALL[MAX_MB + 1] = {0,        tile_6_1, tile_4_2, tile_3_3,
                                         tile_2_4, tile_2_5, tile_2_6};
static const tile_fn SINGLE[MAX_MB + 1] = {0,        tile_1_1, tile_1_2, tile_1_3,
                                           tile_1_4, tile_1_5, tile_1_6};

/* Weight rows w[0, rows) against all M rows of x, in balanced chunks (M=8 is 4+4, not 5+3,
 * so every chunk keeps enough accumulators busy). Writes fp32 y[m * ldy + r]. */
static void row_block(const void *xv, int64_t ldx, const uint16_t *w, float *y, int64_t ldy,
                      int64_t M, int64_t K, int rows) {
    const float *x = xv;
    const int64_t chunks = (M + MAX_MB - 1) / MAX_MB;
    for (int64_t c = 0, m = 0; c < chunks; c++) {
        const int mb = (int)((M - m + chunks - c - 1) / (chunks - c));
        if (rows == BLOCK)
            for (int r = 0; r < rows; r += TALL_ROWS[mb])
                TALL[mb](x + m * ldx, ldx, w + r * K, K, y + m * ldy + r, ldy);
        else
            for (int r = 0; r < rows; r++)
                SINGLE[mb](x + m * ldx, ldx, w + r * K, K, y + m * ldy + r, ldy);
        m += mb;
    }
}

/* Both bf16 kernels' outer loop: x in panels of PANEL rows, each row copied once into the
 * kernel's layout (pack_row: ldx elements of xsize bytes), then blocks of `block` weight rows
 * split across threads, each block multiplied by row_block_fn and stored with the bias. */
int specserve_linear_driver(const void *x, const uint16_t *w, const void *bias, void *y,
                            int64_t M, int64_t N, int64_t K, int bf16_io, int threads,
                            int64_t ldx, size_t xsize, int block, pack_row_fn pack_row,
                            row_block_fn row_block_fn) {
    if (M <= 0 || N <= 0 || K <= 0 || block > MAX_BLOCK) return -1;
    const int64_t nblocks = (N + block - 1) / block;
    char *xp = aligned_alloc(64, (size_t)((M < PANEL ? M : PANEL) * ldx) * xsize);
    if (!xp) return -1;
#pragma omp parallel num_threads(threads < 1 ? 1 : threads)
    for (int64_t p = 0; p < M; p += PANEL) {
        const int64_t mp = M - p < PANEL ? M - p : PANEL;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < mp; m++)
            pack_row(x, (p + m) * K, K, xp + (size_t)(m * ldx) * xsize, ldx, bf16_io);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            const int64_t n = b * block, rows = N - n < block ? N - n : block;
            float out[PANEL * MAX_BLOCK];
            row_block_fn(xp, ldx, w + n * K, out, block, mp, K, (int)rows);
            for (int64_t m = 0; m < mp; m++)
                for (int64_t r = 0; r < rows; r++) {
                    const int64_t j = n + r;
                    store_output(y, (p + m) * N + j, out[m * block + r], bias, j, bf16_io);
                }
        }
    }
    free(xp);
    return 0;
}

/* Row i.. of x as fp32, per 16 columns the even ones then the odd ones (see STEP), zero-padded
 * to ldx. */
static void pack_row_avx2(const void *x, int64_t i, int64_t K, void *out, int64_t ldx,
                          int bf16_io) {
    float *row = out;
    for (int64_t j = 0; j < ldx; j++) {
        const int64_t lane = j & 15;
        const int64_t src = (j - lane) + (lane < 8 ? 2 * lane : 2 * (lane - 8) + 1);
        row[j] = src >= K ? 0.0f : load_io(x, i + src, bf16_io);
    }
}

static int linear_bf16_avx2(const void *x, const uint16_t *w, const void *bias, void *y,
                            int64_t M, int64_t N, int64_t K, int bf16_io, int threads) {
    return specserve_linear_driver(x, w, bias, y, M, N, K, bf16_io, threads,
                                   (K + 15) & ~(int64_t)15, sizeof(float), BLOCK, pack_row_avx2,
                                   row_block);
}

int specserve_linear_bf16_avx512(const void *x, const uint16_t *w, const void *bias, void *y,
                                 int64_t M, int64_t N, int64_t K, int bf16_io, int threads);

/* Which kernels specserve_linear_bf16 and specserve_linear_int8 run: 1 = linear_avx512.c's
 * (AVX512-BF16 and AVX512-VNNI), 0 = the AVX2 ones. */
int specserve_isa_level = 0;

static int has_avx512(void) {
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
}

/* Selects the kernels for this process: 1 asks for AVX512 (granted only where the CPU has both
 * BF16 and VNNI), 0 for AVX2. Returns the level in force. The two bf16 kernels sum in different
 * orders, so a process must not switch while a model is generating: verify and decode logits
 * would no longer be bit-identical. */
int specserve_set_isa(int level) {
    specserve_isa_level = level != 0 && has_avx512();
    return specserve_isa_level;
}

int specserve_isa(void) { return specserve_isa_level; }

/* The best level this CPU has. */
int specserve_best_isa(void) { return has_avx512(); }

/* x, bias (may be NULL) and y are fp32 when bf16_io is 0, else bf16 (uint16). Returns 0, or
 * -1 without writing y for an empty shape or when scratch memory could not be allocated. */
int specserve_linear_bf16(const void *x, const uint16_t *w, const void *bias, void *y, int64_t M,
                          int64_t N, int64_t K, int bf16_io, int threads) {
    if (specserve_isa_level > 0)
        return specserve_linear_bf16_avx512(x, w, bias, y, M, N, K, bf16_io, threads);
    return linear_bf16_avx2(x, w, bias, y, M, N, K, bf16_io, threads);
}

/*
 * y[M,N] = x[M,K] @ W[N,K]^T (+ bias[N]) for 4-bit weights in asymmetric groups of 32 along K
 * (W[n, k] ~ d * q + m with q in 0..15, one fp16 scale d and one fp16 min m per group, as
 * GGUF's Q4_1), M <= 8; x, bias and y all fp32 or all bf16. AVX2 or AVX512-VNNI, OpenMP.
 *
 * Why: a draft decode step is bound by streaming its weights; 4 bits plus 4 bytes of d and m
 * per 32 weights is 0.625 bytes a weight against int8's 1 (the draft's greedy agreement with
 * the target measured unchanged). Only draft steps come here: their proposals may shift a
 * little, the output cannot (the target verifies every token).
 *
 * Design: x is quantised exactly as the int8 kernel does (specserve_quantize_row: int8 blocks
 * of 32 with one fp32 scale xd). For weight row r and block b the integer dot product
 * dot = sum q * xq is exact in int32 (q unsigned 0..15 times xq signed is what vpmaddubsw and
 * vpdpbusd multiply, no sign trick needed), and the block adds
 *     xd * (d * dot + m * sx),   sx = sum of the block's xq (exact too),
 * to row r's result. Per block, the 4 rows' int32 dot vectors are summed horizontally into one
 * vector [dot0..dot3, sx x4]; converted, multiplied by [d0..d3, m0..m3] and fused-multiply-added
 * by xd into one fp32 accumulator per row of x, whose lanes r and 4 + r give row r at the end.
 * Every int32 sum is exact and every fp32 operation the same in both ISAs, so the AVX2 and VNNI
 * versions agree bit for bit; each row of x has its own accumulator, so its result does not
 * depend on the other rows, on M or on the thread count. All M rows share one pass over the
 * weights, but the horizontal sums cost per row of x: at 4 rows and more the int8 kernel is
 * faster, so cpu_linear.Int4Linear sends only one- and two-row inputs here.
 *
 * Packed weights (cpu_linear.pack_int4): rows in groups of 4 (N padded with zero rows), each
 * group stored block by block, 80 bytes per block:
 *     32 bytes  byte i = q[row 0][i] | q[row 1][i] << 4
 *     32 bytes  byte i = q[row 2][i] | q[row 3][i] << 4
 *     8 bytes   d of rows 0..3 (fp16)
 *     8 bytes   m of rows 0..3 (fp16)
 * Pairing two rows per byte lets one 32-byte load, a shift and two masks give two rows' 32
 * values in column order, with no shuffles; a tile reads one contiguous, prefetched stream.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#define GROUP 4         /* weight rows per packed group (cpu_linear.INT4_GROUP) */
#define BLOCK 32        /* columns per group of weights and per activation block */
#define BLOCK_BYTES 80  /* one group's packed block: 64 bytes of nibbles, 4 d, 4 m */
#define MAX_M 8         /* the most rows of x (cpu_linear.Int4Linear.MAX_ROWS) */
#define PF_AHEAD 2048   /* bytes ahead in the packed stream, as the int8 kernel */

/* A tile: one packed group (4 weight rows) against MB rows of quantised x (xq int8 [MB, K],
 * block scales xd [MB, K / 32], block sums sx [MB, K / 32]); out[m * 4 + r]. MB is a literal
 * so the MB accumulators stay in registers. DOT(w, x) is the ISA's 8-lane int32 dot product of
 * 32 unsigned by 32 signed bytes, 4 neighbouring products per lane. */
#define DEFINE_TILE(NAME, MB)                                                                 \
    static void NAME##_##MB(const int8_t *xq, const float *xd, const int32_t *sx, int64_t K,  \
                            const uint8_t *w, float *out) {                                   \
        const int64_t blocks = K / BLOCK;                                                     \
        const __m256i low = _mm256_set1_epi8(0x0f);                                           \
        __m256 acc[MB];                                                                       \
        for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_ps();                            \
        for (int64_t b = 0; b < blocks; b++) {                                                \
            const uint8_t *wb = w + b * BLOCK_BYTES;                                          \
            _mm_prefetch((const char *)(wb + PF_AHEAD), _MM_HINT_T0);                         \
            _mm_prefetch((const char *)(wb + PF_AHEAD + 64), _MM_HINT_T0);                    \
            const __m256i pair01 = _mm256_loadu_si256((const __m256i *)wb);                   \
            const __m256i pair23 = _mm256_loadu_si256((const __m256i *)(wb + 32));            \
            const __m256i q0 = _mm256_and_si256(pair01, low);                                 \
            const __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(pair01, 4), low);           \
            const __m256i q2 = _mm256_and_si256(pair23, low);                                 \
            const __m256i q3 = _mm256_and_si256(_mm256_srli_epi16(pair23, 4), low);           \
            /* [d0..d3, m0..m3] */                                                            \
            const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wb + 64)));   \
            for (int m = 0; m < MB; m++) {                                                    \
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + m * K + b * BLOCK)); \
                /* lanes [r0 r0 r1 r1 | r0 r0 r1 r1] and [r2 r2 r3 r3 | ...], then both */    \
                /* halves of [r0 r1 r2 r3 | r0 r1 r2 r3] added: each row's exact dot */       \
                const __m256i h01 = _mm256_hadd_epi32(DOT(q0, xv), DOT(q1, xv));              \
                const __m256i h23 = _mm256_hadd_epi32(DOT(q2, xv), DOT(q3, xv));              \
                const __m256i h = _mm256_hadd_epi32(h01, h23);                                \
                const __m128i dots =                                                          \
                    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)); \
                const __m256i terms =                                                         \
                    _mm256_set_m128i(_mm_set1_epi32(sx[m * blocks + b]), dots);               \
                acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(terms), dm),        \
                                         _mm256_set1_ps(xd[m * blocks + b]), acc[m]);         \
            }                                                                                 \
        }                                                                                     \
        for (int m = 0; m < MB; m++) {                                                        \
            float lanes[8];                                                                   \
            _mm256_storeu_ps(lanes, acc[m]);                                                  \
            for (int r = 0; r < GROUP; r++) out[m * GROUP + r] = lanes[r] + lanes[GROUP + r]; \
        }                                                                                     \
    }

#define DEFINE_TILES(NAME)                                                                    \
    DEFINE_TILE(NAME, 1) DEFINE_TILE(NAME, 2) DEFINE_TILE(NAME, 3) DEFINE_TILE(NAME, 4)       \
    DEFINE_TILE(NAME, 5) DEFINE_TILE(NAME, 6) DEFINE_TILE(NAME, 7) DEFINE_TILE(NAME, 8)       \
    static const tile_fn NAME[MAX_M + 1] = {0,       NAME##_1, NAME##_2, NAME##_3, NAME##_4,  \
                                            NAME##_5, NAME##_6, NAME##_7, NAME##_8};

typedef void (*tile_fn)(const int8_t *, const float *, const int32_t *, int64_t,
                        const uint8_t *, float *);

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
/* u8 x s8 pairs (at most 2 * 15 * 127, no saturation), then pairs of pairs. */
#define DOT(w, x) _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
DEFINE_TILES(tiles_avx2)
#undef DOT
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
/* vpdpbusd: the same 4 products summed into each int32 lane in one instruction. 256-bit, as
 * the int8 VNNI kernel: zmm loads streamed from memory measured slower on Zen 4. */
#define DOT(w, x) _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
DEFINE_TILES(tiles_vnni)
#undef DOT
#pragma GCC pop_options

/* Returns 0, or -1 for a shape the kernel does not take (M > 8, K not whole blocks) or when
 * scratch memory could not be allocated; then y is untouched. */
int specserve_linear_int4(const void *x, const uint8_t *w, const void *bias, void *y, int64_t M,
                          int64_t N, int64_t K, int bf16_io, int threads) {
    if (M <= 0 || M > MAX_M || N <= 0 || K <= 0 || K % BLOCK) return -1;
    const int64_t blocks = K / BLOCK, groups = (N + GROUP - 1) / GROUP;
    int8_t *xq = malloc((size_t)(M * K));
    float *xd = malloc((size_t)(M * blocks) * sizeof(float));
    int32_t *sx = malloc((size_t)(M * blocks) * sizeof(int32_t));
    if (!xq || !xd || !sx) {
        free(xq);
        free(xd);
        free(sx);
        return -1;
    }
    for (int64_t m = 0; m < M; m++) {
        specserve_quantize_row(x, bf16_io, m, K, xq + m * K, xd + m * blocks);
        for (int64_t b = 0; b < blocks; b++) {
            int32_t sum = 0;
            for (int i = 0; i < BLOCK; i++) sum += xq[m * K + b * BLOCK + i];
            sx[m * blocks + b] = sum;
        }
    }
    const tile_fn tile = (specserve_isa_level > 0 ? tiles_vnni : tiles_avx2)[M];
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t n0 = g * GROUP;
        const int rows = N - n0 < GROUP ? (int)(N - n0) : GROUP;
        float out[MAX_M * GROUP];
        tile(xq, xd, sx, K, w + g * blocks * BLOCK_BYTES, out);
        for (int64_t m = 0; m < M; m++)
            for (int r = 0; r < rows; r++)
                store_output(y, m * N + n0 + r, out[m * GROUP + r], bias, n0 + r, bf16_io);
    }
    free(xq);
    free(xd);
    free(sx);
    return 0;
}

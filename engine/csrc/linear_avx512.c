/*
 * y[M,N] = x[M,K] @ w[N,K]^T (+ bias[N]) for bf16 weights on CPUs with AVX512-BF16 (Zen 4,
 * Cooper Lake and later): the same contract and the same batch invariance as the AVX2 kernel in
 * linear_bf16.c, which specserve_linear_bf16 calls instead on other CPUs.
 *
 * Why a second kernel: vdpbf16ps multiplies 32 bf16 weights by 32 bf16 activations and adds the
 * pairwise sums into 16 fp32 lanes in one instruction, where AVX2 needs two widening ops and two
 * FMAs per 16 weights and each of M rows. A 7-token verify then costs about what one token does
 * (bound by streaming the weights once), instead of 1.6x.
 *
 * Design, as in linear_bf16.c: threads split N; a tile is R weight rows x MB rows of x with one
 * zmm accumulator per (row, m) fed 32-column steps in order, then one fixed horizontal sum, then
 * + bias; so a row of x gives bit-identical output alone or in any batch. x is copied once per
 * call as bf16 (fp32 inputs are rounded, as a bf16 model's activations are) and zero-padded to
 * whole 32-column steps; the weights' ragged tail is a masked load. No permutation is needed:
 * a 32-bit lane of vdpbf16ps takes two neighbouring columns of both operands.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

#define ZBLOCK 24 /* weight rows per work item: a multiple of every tile height below */
#define ZMAX_MB 8
#define ZPF_AHEAD 512 /* prefetch distance in weights per row (1 KiB), as in linear_bf16.c */

/* R and MB literal, so the loops unroll and the R*MB accumulators stay in the 32 zmm registers
 * beside R weight vectors and one x vector. Each step is one cache line of each weight row. A
 * ragged K's last step is written out apart, with masked loads: masking every step measured
 * 15-25 % slower for 5-7 rows. */
#define DEFINE_ZTILE(R, MB)                                                                   \
    static void ztile_##R##_##MB(const uint16_t *x, int64_t ldx, const uint16_t *w,          \
                                 int64_t K, float *y, int64_t ldy) {                          \
        __m512 acc[R][MB];                                                                    \
        for (int r = 0; r < R; r++)                                                           \
            for (int m = 0; m < MB; m++) acc[r][m] = _mm512_setzero_ps();                     \
        const int64_t k32 = K & ~(int64_t)31;                                                 \
        for (int64_t k = 0; k < k32; k += 32) {                                               \
            __m512bh wv[R];                                                                   \
            for (int r = 0; r < R; r++) {                                                     \
                const int64_t ahead = k + ZPF_AHEAD;                                          \
                _mm_prefetch((const char *)(w + (ahead < K ? r * K + ahead                    \
                                                           : (R + r) * K + ahead - K)),       \
                             _MM_HINT_T0);                                                    \
                wv[r] = (__m512bh)_mm512_loadu_si512((const void *)(w + r * K + k));          \
            }                                                                                 \
            for (int m = 0; m < MB; m++) {                                                    \
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * ldx + k);           \
                for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv); \
            }                                                                                 \
        }                                                                                     \
        if (k32 < K) {                                                                        \
            const __mmask32 tail = (__mmask32)((1ull << (K - k32)) - 1);                      \
            __m512bh wv[R];                                                                   \
            for (int r = 0; r < R; r++)                                                       \
                wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + r * K + k32);            \
            for (int m = 0; m < MB; m++) {                                                    \
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * ldx + k32);         \
                for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv); \
            }                                                                                 \
        }                                                                                     \
        for (int r = 0; r < R; r++)                                                           \
            for (int m = 0; m < MB; m++) y[m * ldy + r] = _mm512_reduce_add_ps(acc[r][m]);    \
    }

typedef void (*ztile_fn)(const uint16_t *, int64_t, const uint16_t *, int64_t, float *, int64_t);
DEFINE_ZTILE(8, 1) DEFINE_ZTILE(8, 2) DEFINE_ZTILE(6, 3) DEFINE_ZTILE(4, 4)
DEFINE_ZTILE(4, 5) DEFINE_ZTILE(4, 6) DEFINE_ZTILE(3, 7) DEFINE_ZTILE(3, 8)
DEFINE_ZTILE(1, 1) DEFINE_ZTILE(1, 2) DEFINE_ZTILE(1, 3) DEFINE_ZTILE(1, 4)
DEFINE_ZTILE(1, 5) DEFINE_ZTILE(1, 6) DEFINE_ZTILE(1, 7) DEFINE_ZTILE(1, 8)
static const int ZTALL_ROWS[ZMAX_MB + 1] = {0, 8, 8, 6, 4, 4, 4, 3, 3};
static const ztile_fn ZTALL[ZMAX_MB + 1] = {0,         ztile_8_1, ztile_8_2, ztile_6_3, ztile_4_4,
                                            ztile_4_5, ztile_4_6, ztile_3_7, ztile_3_8};
static const ztile_fn ZSINGLE[ZMAX_MB + 1] = {0,         ztile_1_1, ztile_1_2, ztile_1_3, ztile_1_4,
                                              ztile_1_5, ztile_1_6, ztile_1_7, ztile_1_8};

/* Weight rows w[0, rows) against all M rows of x in balanced chunks of at most ZMAX_MB. */
static void zrow_block(const void *xv, int64_t ldx, const uint16_t *w, float *y, int64_t ldy,
                       int64_t M, int64_t K, int rows) {
    const uint16_t *x = xv;
    const int64_t chunks = (M + ZMAX_MB - 1) / ZMAX_MB;
    for (int64_t c = 0, m = 0; c < chunks; c++) {
        const int mb = (int)((M - m + chunks - c - 1) / (chunks - c));
        if (rows == ZBLOCK)
            for (int r = 0; r < rows; r += ZTALL_ROWS[mb])
                ZTALL[mb](x + m * ldx, ldx, w + r * K, K, y + m * ldy + r, ldy);
        else
            for (int r = 0; r < rows; r++)
                ZSINGLE[mb](x + m * ldx, ldx, w + r * K, K, y + m * ldy + r, ldy);
        m += mb;
    }
}

/* Row i.. of x as bf16 (fp32 rounded), zero-padded to ldx. */
static void zpack_row(const void *x, int64_t i, int64_t K, void *out, int64_t ldx, int bf16_io) {
    uint16_t *row = out;
    if (bf16_io) memcpy(row, (const uint16_t *)x + i, (size_t)K * sizeof(uint16_t));
    else
        for (int64_t j = 0; j < K; j++) row[j] = f32_to_bf16(((const float *)x)[i + j]);
    memset(row + K, 0, (size_t)(ldx - K) * sizeof(uint16_t));
}

int specserve_linear_bf16_avx512(const void *x, const uint16_t *w, const void *bias, void *y,
                                 int64_t M, int64_t N, int64_t K, int bf16_io, int threads) {
    return specserve_linear_driver(x, w, bias, y, M, N, K, bf16_io, threads,
                                   (K + 31) & ~(int64_t)31, sizeof(uint16_t), ZBLOCK, zpack_row,
                                   zrow_block);
}

#pragma GCC pop_options

/*
 * The int8 kernel of linear_int8.c with AVX512-VNNI (same packed weights, same quantised
 * activations, same result bit for bit): vpdpbusd multiplies 64 unsigned by 64 signed bytes and
 * adds each 4 products into an int32 lane, where AVX2 needs a sign flip, maddubs and madd per 32.
 *
 * The weights are signed, so they go in as w ^ 0x80 = w + 128 (unsigned), and each lane starts
 * from -128 times the sum of its 4 activations: the int32 lane then holds exactly what the AVX2
 * kernel's lane holds (the same 4 products), converted, scaled and accumulated in the same order,
 * and the 8 lanes of a row summed by the same hsum.
 */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")

#define QGROUP 4  /* rows per packed group (cpu_linear.INT8_GROUP) */
#define QBLOCK 32 /* columns per activation block (cpu_linear.INT8_BLOCK) */
#define QMAX_MB 5
#define QPF_AHEAD 2048 /* bytes ahead in each group's packed stream */

/* One packed group (4 rows) against MB rows of quantised x: xq int8 [MB, K], lane starts xinit
 * int32 [MB, K / 32, 8], block scales xd [MB, K / 32]. out[m * 4 + row]. 256-bit vectors, as in
 * the AVX2 kernel: with zmm loads (two rows per load) the same products streamed from memory
 * ran 20-30 % slower on Zen 4. */
#define DEFINE_QTILE(MB)                                                                      \
    static void qtile_##MB(const int8_t *xq, const int32_t *xinit, const float *xd, int64_t K,\
                           const int8_t *w, float *out) {                                     \
        const int64_t blocks = K / QBLOCK;                                                    \
        const __m256i flip = _mm256_set1_epi8((char)0x80);                                    \
        __m256 acc[QGROUP][MB];                                                               \
        for (int r = 0; r < QGROUP; r++)                                                      \
            for (int m = 0; m < MB; m++) acc[r][m] = _mm256_setzero_ps();                     \
        for (int64_t b = 0; b < blocks; b++) {                                                \
            const int8_t *wb = w + b * QGROUP * QBLOCK;                                       \
            _mm_prefetch((const char *)(wb + QPF_AHEAD), _MM_HINT_T0);                        \
            _mm_prefetch((const char *)(wb + QPF_AHEAD + 64), _MM_HINT_T0);                   \
            __m256i wv[QGROUP];                                                               \
            for (int r = 0; r < QGROUP; r++)                                                  \
                wv[r] = _mm256_xor_si256(                                                     \
                    _mm256_loadu_si256((const __m256i *)(wb + r * QBLOCK)), flip);            \
            for (int m = 0; m < MB; m++) {                                                    \
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + m * K + b * QBLOCK)); \
                const __m256i start =                                                         \
                    _mm256_loadu_si256((const __m256i *)(xinit + (m * blocks + b) * 8));      \
                const __m256 d = _mm256_set1_ps(xd[m * blocks + b]);                          \
                for (int r = 0; r < QGROUP; r++)                                              \
                    acc[r][m] = _mm256_fmadd_ps(                                              \
                        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(start, wv[r], xv)), d,         \
                        acc[r][m]);                                                           \
            }                                                                                 \
        }                                                                                     \
        for (int r = 0; r < QGROUP; r++)                                                      \
            for (int m = 0; m < MB; m++) out[m * QGROUP + r] = hsum(acc[r][m]);               \
    }

typedef void (*qtile_fn)(const int8_t *, const int32_t *, const float *, int64_t,
                         const int8_t *, float *);
DEFINE_QTILE(1) DEFINE_QTILE(2) DEFINE_QTILE(3) DEFINE_QTILE(4) DEFINE_QTILE(5)
static const qtile_fn QTILE[QMAX_MB + 1] = {0, qtile_1, qtile_2, qtile_3, qtile_4, qtile_5};

/* Same contract as specserve_linear_int8; xq/xd are the activations quantize_row made. */
int specserve_linear_int8_vnni(const int8_t *xq, const float *xd, const int8_t *w,
                               const float *scale, const void *bias, void *y, int64_t M,
                               int64_t N, int64_t K, int bf16_io, int threads) {
    const int64_t blocks = K / QBLOCK, groups = (N + QGROUP - 1) / QGROUP;
    int32_t *xinit = aligned_alloc(32, (size_t)(M * blocks * 8) * sizeof(int32_t));
    if (!xinit) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < blocks; b++)
            for (int lane = 0; lane < 8; lane++) {
                const int8_t *q = xq + m * K + b * QBLOCK + lane * 4;
                xinit[(m * blocks + b) * 8 + lane] = -128 * (q[0] + q[1] + q[2] + q[3]);
            }
    const int64_t chunks = (M + QMAX_MB - 1) / QMAX_MB;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t n0 = g * QGROUP;
        const int rows = N - n0 < QGROUP ? (int)(N - n0) : QGROUP;
        /* Balanced chunks of x rows (8 = 4 + 4), each against the group while it is in L1. */
        for (int64_t c = 0, m = 0; c < chunks; c++) {
            const int mb = (int)((M - m + chunks - c - 1) / (chunks - c));
            float out[QMAX_MB * QGROUP];
            QTILE[mb](xq + m * K, xinit + m * blocks * 8, xd + m * blocks, K, w + n0 * K, out);
            for (int i = 0; i < mb; i++)
                for (int r = 0; r < rows; r++) {
                    const int64_t j = n0 + r;
                    store_output(y, (m + i) * N + j, out[i * QGROUP + r] * scale[j], bias, j,
                                 bf16_io);
                }
            m += mb;
        }
    }
    free(xinit);
    return 0;
}

#pragma GCC pop_options

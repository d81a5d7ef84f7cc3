/* Scalar bf16 <-> fp32 conversions, operand access and the 8-lane horizontal sum shared by the
 * CPU kernels.
 * Each kernel's batch invariance relies on hsum adding the lanes in this one fixed order. */
#ifndef SPECSERVE_BF16_H
#define SPECSERVE_BF16_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* Element i of a kernel operand that is bf16 or fp32 by the call's bf16_io flag. */
static inline float load_io(const void *p, int64_t i, int bf16_io) {
    return bf16_io ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_io(void *p, int64_t i, float v, int bf16_io) {
    if (bf16_io) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* y[at] = v (+ bias[j]): the epilogue every linear kernel ends with. */
static inline void store_output(void *y, int64_t at, float v, const void *bias, int64_t j,
                                int bf16_io) {
    if (bias) v += load_io(bias, j, bf16_io);
    store_io(y, at, v, bf16_io);
}

/* 8 bf16 values as fp32: exact, a bf16 is the top half of its fp32. */
static inline __m256 load_bf16x8(const uint16_t *p) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Which linear kernels run (linear_bf16.c's specserve_set_isa): 0 AVX2, 1 AVX512. */
extern int specserve_isa_level;

/* Activations for the integer kernels (linear_int8.c): row m of x as int8 blocks of 32 columns
 * xq[K] with one fp32 scale each, xd[K / 32]. */
void specserve_quantize_row(const void *x, int bf16_io, int64_t m, int64_t K, int8_t *xq,
                            float *xd);

/* The bf16 linear kernels' shared outer loop (linear_bf16.c). */
#define PANEL 64     /* rows of x per pass over w: bounds scratch and keeps the x in use cached */
#define MAX_BLOCK 24 /* the most weight rows per work item of any bf16 kernel */
typedef void (*pack_row_fn)(const void *x, int64_t i, int64_t K, void *row, int64_t ldx,
                            int bf16_io);
typedef void (*row_block_fn)(const void *xp, int64_t ldx, const uint16_t *w, float *y,
                             int64_t ldy, int64_t M, int64_t K, int rows);
int specserve_linear_driver(const void *x, const uint16_t *w, const void *bias, void *y,
                            int64_t M, int64_t N, int64_t K, int bf16_io, int threads,
                            int64_t ldx, size_t xsize, int block, pack_row_fn pack_row,
                            row_block_fn row_block_fn);

#endif

/*
 * The elementwise steps of a Llama-family decoder layer on bf16 activations: residual add +
 * RMSNorm, rotary embedding, SiLU(gate) * up.
 *
 * Why: written as torch ops these are ~50 small operator calls per layer (casts, pow, mean,
 * rsqrt, cat, neg, ...), each costing microseconds of dispatch on tensors of a few thousand
 * elements. At batch 1 on a 2-core CPU that is a third of a 0.5B draft step. One call per step
 * costs one dispatch.
 *
 * Rounding follows transformers' modules op for op (every bf16 op rounds its result), so a
 * model runs the same numbers as through its modules, up to the order of the RMS sum.
 * Batch invariance: each row is computed alone, in an order that depends only on its width.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

static inline float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

/* Worth starting threads only for prompt-sized inputs. */
#define PARALLEL_MIN 65536

/* Per row m of [rows, dim]: x[m] = bf16(x[m] + delta[m]) when delta is not NULL (the residual
 * add), then out[m] = bf16(w * bf16(x[m] / sqrt(mean(x[m]^2) + eps))). */
int specserve_add_rms_norm(uint16_t *x, const uint16_t *delta, const uint16_t *w, uint16_t *out,
                           int64_t rows, int64_t dim, float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * dim >= PARALLEL_MIN)
    for (int64_t m = 0; m < rows; m++) {
        uint16_t *xr = x + m * dim;
        uint16_t *yr = out + m * dim;
        /* Eight partial sums: a single chain would wait on each add's latency. */
        float partial[8] = {0};
        for (int64_t i = 0; i < dim; i++) {
            float v = bf16_to_f32(xr[i]);
            if (delta) {
                v = round_bf16(v + bf16_to_f32(delta[m * dim + i]));
                xr[i] = f32_to_bf16(v);
            }
            partial[i & 7] += v * v;
        }
        float sum = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
                    ((partial[4] + partial[5]) + (partial[6] + partial[7]));
        float scale = 1.0f / sqrtf(sum / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) {
            float normed = round_bf16(bf16_to_f32(xr[i]) * scale);
            yr[i] = f32_to_bf16(bf16_to_f32(w[i]) * normed);
        }
    }
    return 0;
}

/* Rotary embedding in place on x [tokens, heads, dim] (rows of a token contiguous, token stride
 * ldx elements) with cos/sin [tokens, dim] in bf16, half-split ("rotate_half") layout:
 * x' = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)). */
int specserve_rope(uint16_t *x, int64_t ldx, const uint16_t *cos, const uint16_t *sin,
                   int64_t tokens, int64_t heads, int64_t dim, int threads) {
    int64_t half = dim / 2;
#pragma omp parallel for num_threads(threads) if (tokens * heads * dim >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t *c = cos + t * dim;
        const uint16_t *s = sin + t * dim;
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *v = x + t * ldx + h * dim;
            for (int64_t i = 0; i < half; i++) {
                float lo = bf16_to_f32(v[i]), hi = bf16_to_f32(v[i + half]);
                float new_lo = round_bf16(lo * bf16_to_f32(c[i])) +
                               round_bf16(-hi * bf16_to_f32(s[i]));
                float new_hi = round_bf16(hi * bf16_to_f32(c[i + half])) +
                               round_bf16(lo * bf16_to_f32(s[i + half]));
                v[i] = f32_to_bf16(new_lo);
                v[i + half] = f32_to_bf16(new_hi);
            }
        }
    }
    return 0;
}

/* exp(x) as Cephes' expf: x = n ln2 + r, a degree-7 polynomial for e^r, times 2^n (within
 * ~1 ulp for |x| < 88). One formula in vector and scalar form, the same operations in the same
 * order, so an element's result does not depend on which loop it fell into. */
#define EXP_MAX 88.3762626647949f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_LOG2E 1.44269504088896341f
static const float exp_poly[6] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                                  4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};

static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-EXP_MAX)), _mm256_set1_ps(EXP_MAX));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(exp_poly[0]);
    for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_poly[i]));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
}

static inline float exp_scalar(float x) {
    x = fminf(fmaxf(x, -EXP_MAX), EXP_MAX);
    float n = nearbyintf(x * EXP_LOG2E);
    float r = fmaf(-n, EXP_LN2_HI, x);
    r = fmaf(-n, EXP_LN2_LO, r);
    float p = exp_poly[0];
    for (int i = 1; i < 6; i++) p = fmaf(p, r, exp_poly[i]);
    p = fmaf(p, r * r, r + 1.0f);
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* 8 fp32 -> bf16 with round to nearest even (inputs here are never NaN); load_bf16x8 in
 * bf16.h goes the other way. */
static inline __m256i round8_bf16_bits(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    return _mm256_srli_epi32(u, 16);
}

static inline __m256 round8_bf16(__m256 v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(round8_bf16_bits(v), 16));
}

static inline void store8_bf16(uint16_t *p, __m256 v) {
    __m256i bits = round8_bf16_bits(v); /* 8 x 32-bit lanes, each < 2^16 */
    __m128i packed =
        _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128((__m128i *)p, packed);
}

static inline uint16_t silu_mul_scalar(uint16_t gate, uint16_t up) {
    float g = bf16_to_f32(gate);
    float act = round_bf16(g / (1.0f + exp_scalar(-g)));
    return f32_to_bf16(act * bf16_to_f32(up));
}

/* out[r, i] = bf16(bf16(silu(gate[r, i])) * up[r, i]) for rows r of width elements, with
 * silu(g) = g / (1 + exp(-g)); gate and up rows are ld elements apart (the halves of one fused
 * gate/up product), out is contiguous. */
int specserve_silu_mul(const uint16_t *gate, const uint16_t *up, int64_t ld, uint16_t *out,
                       int64_t rows, int64_t width, int threads) {
    int64_t vectors = width / 8;
#pragma omp parallel for num_threads(threads) if (rows * width >= PARALLEL_MIN)
    for (int64_t job = 0; job < rows * vectors; job++) {
        int64_t r = job / vectors, i = job % vectors * 8;
        __m256 g = load_bf16x8(gate + r * ld + i);
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
        __m256 act = round8_bf16(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
        store8_bf16(out + r * width + i, _mm256_mul_ps(act, load_bf16x8(up + r * ld + i)));
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = vectors * 8; i < width; i++)
            out[r * width + i] = silu_mul_scalar(gate[r * ld + i], up[r * ld + i]);
    return 0;
}

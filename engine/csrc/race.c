/*
 * The noise of the coupled race (engine/sampling.py coupled_sample): for each key k_r (a hash
 * of seed, position and purpose) and each token id i, E[r][i] = -log(u) with u the top 23 bits
 * of splitmix64(k_r ^ i), plus one half, over 2^23: what torch computes there in ~12 passes
 * over the vocabulary, most of them 64-bit integer ops torch does not vectorise on AVX2 (a
 * race over 152k ids cost 2-5 ms a position on a 2-core VM, nine positions a round at gamma 4).
 *
 * The integer part is exact however it is compiled. The logarithm is an 8-lane polynomial,
 * the same operations in every lane and, through a padded vector, for the last few ids, so an
 * id's E does not depend on the row, on where it lies in the call, or on the thread: a token's
 * race entry is the same in the draft's race over a subset of ids and the target's over all.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* -log(x) for x in (0, 1]: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by a polynomial in
 * m - 1 (Cephes' logf coefficients, ~1 ulp), e ln2 split in two parts to keep it exact. */
static inline __m256 neg_log8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256i bits = _mm256_castps_si256(x);
    __m256i exponent = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126));
    bits = _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                           _mm256_set1_epi32(0x3F000000)); /* m in [0.5, 1) */
    __m256 m = _mm256_castsi256_ps(bits);
    __m256 e = _mm256_cvtepi32_ps(exponent);
    const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_sub_ps(e, _mm256_and_ps(one, small));
    m = _mm256_add_ps(_mm256_sub_ps(m, one), _mm256_and_ps(m, small)); /* m - 1, or 2m - 1 */
    const __m256 z = _mm256_mul_ps(m, m);
    __m256 y = _mm256_set1_ps(7.0376836292e-2f);
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
    y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
    __m256 log = _mm256_add_ps(m, y);
    log = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), log);
    return _mm256_sub_ps(_mm256_setzero_ps(), log);
}

/* Eight entries from id index j on: u into out, then E in place. */
static inline void noise8(uint64_t key, const int64_t *ids, int64_t j, int64_t count, float *out) {
    float u[8];
    for (int l = 0; l < 8; l++) {
        const uint64_t id = l < count ? (uint64_t)(ids ? ids[j + l] : j + l) : 0;
        u[l] = ((float)(splitmix64(key ^ id) >> 41) + 0.5f) * (1.0f / 8388608.0f);
    }
    float e[8];
    _mm256_storeu_ps(e, neg_log8(_mm256_loadu_ps(u)));
    memcpy(out, e, (size_t)count * sizeof(float));
}

/* out[r * n + j] = E for key keys[r] and id ids[j] (ids NULL: id j). */
int specserve_race_noise(const int64_t *keys, int64_t rows, const int64_t *ids, int64_t n,
                         float *out, int threads) {
    if (rows < 0 || n < 0) return -1;
    const int64_t blocks = (n + 7) / 8;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static) collapse(2)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t j = b * 8, count = n - j < 8 ? n - j : 8;
            noise8((uint64_t)keys[r], ids, j, count, out + r * n + j);
        }
    return 0;
}

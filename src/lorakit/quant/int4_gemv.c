/* y = W~ x for one row x, W~ in lorakit's 4-bit group-wise form, in float32 with AVX2 and FMA.
 *
 * W~[n, k] = q[n, k] * scale[n, g] + min[n, g] with g = k / G, so
 *
 *     y[n] = sum_g scale[n, g] * (q[n, g] . x_g) + sum_g min[n, g] * sum(x_g):
 *
 * the codes are multiplied as small integers and each group's scale is applied once, to its dot
 * product, instead of to every weight (PyTorch's CPU int4 kernel converts x to bfloat16 and scales
 * every weight; on an AVX2 CPU without bfloat16 arithmetic it took ~1.7-1.9x as long at one row).
 * Integer codes and float32 x multiply exactly; the result differs from de-quantizing and
 * multiplying only in the order of summation, like another float32 matmul kernel.
 *
 * codes (N, K / 2) bytes, as lorakit packs them (groupwise.py): code k = 2i in byte i's low
 * nibble, 2i + 1 in its high one. scales, mins (N, K / G) float32. K a multiple of 64, G of 32.
 * Built and loaded by int4_gemv.py; the output rows are shared out with OpenMP (PyTorch's own
 * runtime, already loaded into the process, so its threads are the ones that run).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

/* The 64 codes in the 32 bytes at p as 8 vectors: w[j] lane l holds code 8l + j (nibble j of the
 * lane's 32 bits), so no code has to cross a lane; x is put into the same order (below). */
static inline void codes64(const uint8_t *p, __m256 w[8]) {
    const __m256i nibble = _mm256_set1_epi32(15);
    __m256i c = _mm256_loadu_si256((const __m256i *)p);
    for (int j = 0; j < 7; j++)
        w[j] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(c, 4 * j), nibble));
    w[7] = _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 28));
}

static inline float horizontal_sum(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* Returns 0, or -1 where it could not allocate its K + K / G floats of scratch (y untouched). */
int int4_gemv(const float *x, int K, const uint8_t *codes, const float *scales, const float *mins,
              int N, int G, float *y, int threads) {
    int groups = K / G;
    float *xt = malloc(sizeof(float) * (size_t)K);            /* x, each block of 64 in codes64's order */
    float *group_sums = malloc(sizeof(float) * (size_t)groups); /* sum(x_g) */
    if (xt == NULL || group_sums == NULL) {
        free(xt);
        free(group_sums);
        return -1;
    }
    for (int k = 0; k < K; k += 64)
        for (int lane = 0; lane < 8; lane++)
            for (int j = 0; j < 8; j++) xt[k + 8 * j + lane] = x[k + 8 * lane + j];
    for (int g = 0; g < groups; g++) {
        float s = 0;
        for (int j = 0; j < G; j++) s += x[g * G + j];
        group_sums[g] = s;
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = codes + (size_t)n * (K / 2);
        const float *row_scales = scales + (size_t)n * groups, *row_mins = mins + (size_t)n * groups;
        __m256 acc = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 64) {
            /* Lanes 0-3 hold inputs k..k+31, lanes 4-7 k+32..k+63: each half takes its group's scale. */
            __m256 scale = _mm256_set_m128(_mm_set1_ps(row_scales[(k + 32) / G]), _mm_set1_ps(row_scales[k / G]));
            __m256 w[8];
            codes64(row + k / 2, w);
            /* Two running sums, so that each FMA waits on the one two before it, not the last. */
            __m256 even = _mm256_mul_ps(w[0], _mm256_loadu_ps(xt + k));
            __m256 odd = _mm256_mul_ps(w[1], _mm256_loadu_ps(xt + k + 8));
            for (int j = 2; j < 8; j += 2) {
                even = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xt + k + 8 * j), even);
                odd = _mm256_fmadd_ps(w[j + 1], _mm256_loadu_ps(xt + k + 8 * j + 8), odd);
            }
            acc = _mm256_fmadd_ps(_mm256_add_ps(even, odd), scale, acc);
        }
        float sum = horizontal_sum(acc);
        for (int g = 0; g < groups; g++) sum += row_mins[g] * group_sums[g];
        y[n] = sum;
    }
    free(xt);
    free(group_sums);
    return 0;
}

/* x W~^T in float32 straight from lorakit's 4-bit group-wise codes, with AVX2 and FMA: one row
 * (int4_gemv, decoding one sequence) and a few (int4_gemm, decoding a batch, short prompts); and
 * W~ itself in one pass (int4_dequantize, for longer inputs and training).
 *
 * W~[n, k] = q[n, k] * scale[n, g] + min[n, g] with g = k / G, so for a row x
 *
 *     y[n] = sum_g scale[n, g] * (q[n, g] . x_g) + sum_g min[n, g] * sum(x_g):
 *
 * the codes are multiplied as small integers and each group's scale is applied once, to its dot
 * product, instead of to every weight (PyTorch's CPU int4 kernel converts x to bfloat16 and scales
 * every weight; on an AVX2 CPU without bfloat16 arithmetic it took 1.1-1.9x as long). Integer
 * codes and float32 x multiply exactly; the result differs from de-quantizing and multiplying only
 * in the order of summation, like another float32 matmul kernel.
 *
 * Output rows are shared out with OpenMP (PyTorch's own runtime, already loaded into the process,
 * so its threads are the ones that run); each output is summed by one thread in one order, so
 * results do not depend on the thread count. Called from int4_float32.py, built and loaded by
 * native.py. The two products return 0, or -1 where they could not allocate their scratch (y
 * untouched).
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

/* One row. codes (N, K / 2) bytes, as lorakit packs them (groupwise.py): code k = 2i in byte i's
 * low nibble, 2i + 1 in its high one. scales, mins (N, K / G) float32. K a multiple of 64, G of 32. */
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

/* Rows up to MAX_ROWS of x at a time, for the output rows of block b (8 of them, one per lane):
 * part[i] sums a group's code * x products, acc[i] the scaled groups. R is a constant where
 * this is inlined, so that the loops unroll and part and acc stay in registers (with R a
 * variable they went through memory: 3-4x the time). */
#define MAX_ROWS 6
static inline __attribute__((always_inline)) void gemm_block(const float *x, int K, const uint32_t *codes,
        const float *scales_t, const float *mins_t, const float *group_sums, int groups, int N, int G, int b,
        float *y, const int R) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i nibble = _mm256_set1_epi32(15);
    __m256 acc[MAX_ROWS];
    for (int i = 0; i < R; i++) acc[i] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256 part[MAX_ROWS];
        for (int i = 0; i < R; i++) part[i] = _mm256_setzero_ps();
        for (int k = g * G; k < (g + 1) * G; k++) {
            /* The 8 output rows' codes at input k, lane j shifted down by 4j. */
            __m256i c = _mm256_srlv_epi32(_mm256_set1_epi32((int)codes[k]), shifts);
            __m256 w = _mm256_cvtepi32_ps(_mm256_and_si256(c, nibble));
            for (int i = 0; i < R; i++)
                part[i] = _mm256_fmadd_ps(w, _mm256_broadcast_ss(x + (size_t)i * K + k), part[i]);
        }
        __m256 scale = _mm256_loadu_ps(scales_t + (size_t)g * N + b * 8);
        __m256 minimum = _mm256_loadu_ps(mins_t + (size_t)g * N + b * 8);
        for (int i = 0; i < R; i++) {
            acc[i] = _mm256_fmadd_ps(part[i], scale, acc[i]);
            acc[i] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(group_sums[i * groups + g]), acc[i]);
        }
    }
    for (int i = 0; i < R; i++) _mm256_storeu_ps(y + (size_t)i * N + b * 8, acc[i]);
}

/* M rows. packed (N / 8, K) 32-bit words: word k of block b holds the codes of output rows
 * 8b..8b+7 at input k, row 8b + j in bits 4j..4j+3. scales_t, mins_t (K / G, N) float32 (the
 * transposes, so that a block's 8 values load as one vector). N a multiple of 8. */
int int4_gemm(const float *x, int M, int K, const uint32_t *packed, const float *scales_t, const float *mins_t,
              int N, int G, float *y, int threads) {
    if (M <= 0) return 0;  /* nothing to multiply (and no runs to cut the rows into) */
    int groups = K / G;
    float *group_sums = malloc(sizeof(float) * (size_t)M * groups);
    if (group_sums == NULL) return -1;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < groups; g++) {
            float s = 0;
            for (int j = 0; j < G; j++) s += x[(size_t)m * K + g * G + j];
            group_sums[m * groups + g] = s;
        }
    /* x's rows cut into near-equal runs of at most MAX_ROWS (8 rows: 4 + 4, not 6 + 2): each run
     * converts the codes once more. */
    int blocks = N / 8, runs = (M + MAX_ROWS - 1) / MAX_ROWS, base = M / runs, longer = M % runs;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < blocks * runs; t++) {
        int b = t / runs, run = t % runs;
        int m0 = run * base + (run < longer ? run : longer), rows = base + (run < longer);
        const float *xm = x + (size_t)m0 * K, *sums = group_sums + (size_t)m0 * groups;
        const uint32_t *codes = packed + (size_t)b * K;
        float *ym = y + (size_t)m0 * N;
        switch (rows) {
            case 6: gemm_block(xm, K, codes, scales_t, mins_t, sums, groups, N, G, b, ym, 6); break;
            case 5: gemm_block(xm, K, codes, scales_t, mins_t, sums, groups, N, G, b, ym, 5); break;
            case 4: gemm_block(xm, K, codes, scales_t, mins_t, sums, groups, N, G, b, ym, 4); break;
            case 3: gemm_block(xm, K, codes, scales_t, mins_t, sums, groups, N, G, b, ym, 3); break;
            case 2: gemm_block(xm, K, codes, scales_t, mins_t, sums, groups, N, G, b, ym, 2); break;
            default: gemm_block(xm, K, codes, scales_t, mins_t, sums, groups, N, G, b, ym, 1); break;
        }
    }
    free(group_sums);
    return 0;
}

/* W~ (N, K) float32 = q * scale + min, rounded as PyTorch's de-quantizing rounds it (groupwise.py:
 * the product, then the sum; -ffp-contract=off keeps them two roundings), so the result is the
 * same bit for bit, in one pass over the output where PyTorch makes three (codes, scale, shift).
 * codes, scales, mins as int4_gemv reads them; K a multiple of 32. */
void int4_dequantize(const uint8_t *codes, const float *scales, const float *mins, int N, int K, int G, float *w,
                     int threads) {
    int groups = K / G;
    const __m128i nibble = _mm_set1_epi8(15);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = codes + (size_t)n * (K / 2);
        float *out = w + (size_t)n * K;
        for (int k = 0; k < K; k += 32) {
            __m256 scale = _mm256_set1_ps(scales[(size_t)n * groups + k / G]);
            __m256 minimum = _mm256_set1_ps(mins[(size_t)n * groups + k / G]);
            __m128i c = _mm_loadu_si128((const __m128i *)(row + k / 2));
            __m128i low = _mm_and_si128(c, nibble), high = _mm_and_si128(_mm_srli_epi16(c, 4), nibble);
            /* codes k..k+15, then k+16..k+31, one byte each and in order */
            __m128i first = _mm_unpacklo_epi8(low, high), second = _mm_unpackhi_epi8(low, high);
            __m128i parts[4] = {first, _mm_srli_si128(first, 8), second, _mm_srli_si128(second, 8)};
            for (int i = 0; i < 4; i++) {
                __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
                _mm256_storeu_ps(out + k + 8 * i, _mm256_add_ps(_mm256_mul_ps(q, scale), minimum));
            }
        }
    }
}

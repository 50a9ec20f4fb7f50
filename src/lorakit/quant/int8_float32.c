/* x W^T in float32 for a weight on an 8-bit block grid (called from int8_head.py, built and loaded
 * by native.py):
 *
 *     W[n, k] = d[n, b] * q[n, k],  b = k / 32,  q an integer in [-127, 127]
 *
 * (GGUF's Q8_0 blocks, as SmolLM2's output head is stored), so
 *
 *     y[r, n] = sum_b d[n, b] * (q[n, b] . x[r, b]):
 *
 * the codes are read as bytes (a quarter of the float weight's memory traffic, which is what a
 * product with few rows is bound by) and each block's scale is applied once, to its dot product.
 * The result differs from the float product only in rounding and order of summation.
 *
 * Output columns are shared out with OpenMP (PyTorch's libgomp); each output is summed by one
 * thread in one order, so results do not depend on the thread count.
 */
#include <immintrin.h>
#include <stdint.h>

#define BLOCK 32
#define RUN 4 /* rows of x multiplied per pass over a weight row: their sums stay in registers */
#define TILE 16 /* weight rows (outputs) per tile */

static inline float horizontal_sum(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* The 32 codes at p as 4 float vectors, in order. */
static inline void codes32(const int8_t *p, __m256 w[4]) {
    __m256i c = _mm256_loadu_si256((const __m256i *)p);
    __m128i low = _mm256_castsi256_si128(c), high = _mm256_extracti128_si256(c, 1);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(low));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(low, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(high));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(high, 8)));
}

/* Output n for R rows of x (R a constant once inlined, so gcc keeps the sums in registers). */
static inline __attribute__((always_inline)) void output_for_rows(const int R, const float *x, int K,
                                                                  const int8_t *codes, const float *scales,
                                                                  int N, int n, float *y) {
    __m256 sums[RUN];
    for (int r = 0; r < R; r++)
        sums[r] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += BLOCK) {
        __m256 w[4];
        codes32(codes + k, w);
        __m256 scale = _mm256_set1_ps(scales[k / BLOCK]);
        for (int r = 0; r < R; r++) {
            const float *xr = x + (size_t)r * K + k;
            __m256 dot = _mm256_mul_ps(w[0], _mm256_loadu_ps(xr));
            dot = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr + 8), dot);
            dot = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + 16), dot);
            dot = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), dot);
            sums[r] = _mm256_fmadd_ps(scale, dot, sums[r]);
        }
    }
    for (int r = 0; r < R; r++)
        y[(size_t)r * N + n] = horizontal_sum(sums[r]);
}

/* Outputs n0 .. n1 - 1 for R rows: the tile's codes and the R rows of x both stay in L1 while it
 * runs (one weight row after another for all rows of x re-read x from L2 for every output: at 16
 * rows 3x the time of 8). */
static inline __attribute__((always_inline)) void tile_for_rows(const int R, const float *x, int K,
                                                                const int8_t *codes, const float *scales,
                                                                int N, int n0, int n1, float *y) {
    for (int n = n0; n < n1; n++)
        output_for_rows(R, x, K, codes + (size_t)n * K, scales + (size_t)n * (K / BLOCK), N, n, y);
}

/* x (M, K) float32 rows; codes (N, K) int8; scales (N, K / 32) float32; y (M, N). K a multiple of 32. */
void int8_matmul(const float *x, int M, int K, const int8_t *codes, const float *scales, int N, float *y,
                 int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n0 = 0; n0 < N; n0 += TILE) {
        int n1 = n0 + TILE < N ? n0 + TILE : N;
        for (int r = 0; r < M; r += RUN) {
            const float *xr = x + (size_t)r * K;
            float *yr = y + (size_t)r * N;
            switch (M - r) {
            case 1: tile_for_rows(1, xr, K, codes, scales, N, n0, n1, yr); break;
            case 2: tile_for_rows(2, xr, K, codes, scales, N, n0, n1, yr); break;
            case 3: tile_for_rows(3, xr, K, codes, scales, N, n0, n1, yr); break;
            default: tile_for_rows(RUN, xr, K, codes, scales, N, n0, n1, yr);
            }
        }
    }
}

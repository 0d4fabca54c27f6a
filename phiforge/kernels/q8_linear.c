/* phiforge's one hand-written CPU kernel: y = x @ (q * scale)^T + bias for int8 weights q, at small batch.
 *
 * Why: batch-1 decoding of an int8 model should stream weights at memory speed, but torch's
 * _weight_int8pack_mm converts every weight to float before its FMA and tops out near 15 GB/s a core, well
 * under what memory gives (measured: bench/serve.py, docs in phiforge/kernels/__init__.py). Here the activation
 * row is quantized to int16 once per call (xq = round(x / sx), sx = max|x| / 32767, a relative error of at most
 * 2^-16 of the row's largest entry: finer than the bf16 rounding torch's kernel applies to x), and each weight
 * row is a sequence of exact integer multiply-adds: AVX-512 VNNI vpdpwssd (32 weights an instruction), AVX-512BW
 * or AVX2 vpmaddwd, or plain C where neither exists. Int32 lane sums are flushed to fp32 every KB inputs, so
 * they cannot overflow. Rows are split over OpenMP threads; loaded after torch, the
 * OpenMP runtime is torch's own, so torch.set_num_threads governs it as well.
 *
 * Layout: x fp32 (M, K) row-major; q int8 (N, K) row-major; scale fp32 (N,); bias fp32 (N,) or NULL;
 * y (M, N) row-major, fp32 or bf16 (round to nearest even) by out_bf16.
 * Returns 0; -1 when out of memory; -2 when x holds inf or NaN (the caller computes those another way).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define KB 2048 /* inputs per int32 flush: each lane then sums <= 256 products of |32767 * 127|, < 2^31 */

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);                                           /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* sum over k < K of xq[k] * q[k]: exact int32 lane sums per KB block, accumulated in fp32 lanes, and one
   horizontal sum at the end (one per block would cost as much as the block's multiply-adds at small K) */
static inline float dot_i16_i8(const int16_t *xq, const int8_t *q, int64_t K) {
    int64_t k = 0;
    float total = 0;
#if defined(__AVX512BW__)
    __m512 facc = _mm512_setzero_ps();
    while (k + 64 <= K) {
        int64_t end = k + KB < K ? k + KB : K;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0;
        for (; k + 64 <= end; k += 64) {
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(q + k)));
            __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(q + k + 32)));
#if defined(__AVX512VNNI__)
            a0 = _mm512_dpwssd_epi32(a0, _mm512_loadu_si512((const void *)(xq + k)), w0);
            a1 = _mm512_dpwssd_epi32(a1, _mm512_loadu_si512((const void *)(xq + k + 32)), w1);
#else
            a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(_mm512_loadu_si512((const void *)(xq + k)), w0));
            a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(_mm512_loadu_si512((const void *)(xq + k + 32)), w1));
#endif
        }
        facc = _mm512_add_ps(facc, _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1)));
    }
    total = _mm512_reduce_add_ps(facc);
#elif defined(__AVX2__)
    __m256 facc = _mm256_setzero_ps();
    while (k + 32 <= K) {
        int64_t end = k + KB < K ? k + KB : K;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0;
        for (; k + 32 <= end; k += 32) {
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + k)));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + k + 16)));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(xq + k)), w0));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(xq + k + 16)), w1));
        }
        facc = _mm256_add_ps(facc, _mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1)));
    }
    float t[8];
    _mm256_storeu_ps(t, facc);
    for (int i = 0; i < 8; i++) total += t[i];
#endif
    int32_t s = 0; /* what no vector loop took (all of it in plain C), in exact blocks of KB */
    for (int64_t n = 0; k < K; k++) {
        s += (int32_t)xq[k] * (int32_t)q[k];
        if (++n == KB) {
            total += (float)s;
            s = 0;
            n = 0;
        }
    }
    return total + (float)s;
}

/* Which instructions this build uses: 3 VNNI, 2 AVX-512BW, 1 AVX2, 0 plain C. */
int q8_isa(void) {
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
    return 3;
#elif defined(__AVX512BW__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

int q8_linear(const float *x, int64_t M, int64_t K, const int8_t *q, const float *scale, const float *bias,
              void *y, int64_t N, int out_bf16) {
    int16_t *xq = (int16_t *)malloc(sizeof(int16_t) * (size_t)(M * K));
    float *sx = (float *)malloc(sizeof(float) * (size_t)M);
    if (!xq || !sx) {
        free(xq);
        free(sx);
        return -1;
    }
    for (int64_t m = 0; m < M; m++) {
        float mx = 0;
        for (int64_t k = 0; k < K; k++) {
            float a = fabsf(x[m * K + k]);
            if (!(a <= 3.0e38f)) { /* inf or NaN */
                free(xq);
                free(sx);
                return -2;
            }
            mx = a > mx ? a : mx;
        }
        sx[m] = mx > 0 ? mx / 32767.0f : 1.0f;
        float inv = 1.0f / sx[m];
        for (int64_t k = 0; k < K; k++) {
            long v = lrintf(x[m * K + k] * inv);
            xq[m * K + k] = (int16_t)(v > 32767 ? 32767 : v < -32767 ? -32767 : v);
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *qn = q + n * K;
        for (int64_t m = 0; m < M; m++) {
            float acc = dot_i16_i8(xq + m * K, qn, K);
            float v = acc * sx[m] * scale[n] + (bias ? bias[n] : 0.0f);
            if (out_bf16)
                ((uint16_t *)y)[m * N + n] = f32_to_bf16(v);
            else
                ((float *)y)[m * N + n] = v;
        }
    }
    free(xq);
    free(sx);
    return 0;
}

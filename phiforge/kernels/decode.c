/* phiforge's one hand-written CPU kernel: y = x @ (q * scale)^T + bias for int8 weights q, at small batch.
 *
 * Why: batch-1 decoding of an int8 model should stream weights at memory speed, but torch's
 * _weight_int8pack_mm converts every weight to float before its FMA and tops out near 15 GB/s a core, well
 * under what memory gives (measured: bench/serve.py, docs in phiforge/kernels/__init__.py). Here the activation
 * row is quantized to int16 once per call (xq = round(x / sx), sx = max|x| / 32767, a relative error of at most
 * 2^-16 of the row's largest entry: finer than the bf16 rounding torch's kernel applies to x), and each weight
 * row is a sequence of exact integer multiply-adds: AVX-512 VNNI vpdpbusd (64 weights an instruction, see
 * below), AVX-512BW or AVX2 vpmaddwd, or plain C where neither exists. Int32 lane sums are flushed to fp32
 * before they can overflow. Rows are split over OpenMP threads; loaded after torch, the OpenMP runtime is
 * torch's own, so torch.set_num_threads governs it as well.
 *
 * VNNI: widening int8 weights to int16 (vpmovsxbw) costs a shuffle per 32 weights, which made the kernel
 * compute-bound near 60 GB/s on 2 Zen cores. vpdpbusd multiplies unsigned by signed bytes without widening, so
 * the int16 activation is split into bytes instead, once per call: xq = 256 hi + lo with hi = xq >> 8 in
 * [-128, 127] and lo = xq & 255 in [0, 255]. Then sum xq w = 256 sum w hi + sum lo w, where sum lo w is one
 * vpdpbusd (lo unsigned, w signed) and sum w hi another with the weight as the unsigned side: w ^ 0x80 = w + 128,
 * so sum (w + 128) hi - 128 sum hi, the last term from the activation alone (per lane, per block, precomputed).
 * Still exact integers, with 4 weight rows sharing each activation load.
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

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define VNNI 1
#define KBV 65536 /* inputs per flush: 2 chains x 512 chunks x 4 products of <= 255 * 128 a lane: < 2^28 */
#define PD 2048    /* prefetch distance in bytes */

/* The activation row split for vpdpbusd (see the top): lo and hi bytes of xq[k] for k < K64 (K rounded down to
   64), and hc[16 b + j] = the sum of hi over lane j's bytes in block b, so that 128 hc corrects the flipped sign */
static void split_row(const int16_t *xq, int64_t K64, uint8_t *lo, int8_t *hi, int32_t *hc) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t k = 0; k < K64; k++) {
        lo[k] = (uint8_t)(xq[k] & 255);
        hi[k] = (int8_t)(xq[k] >> 8); /* arithmetic shift: xq = 256 hi + lo exactly */
    }
    for (int64_t k0 = 0, b = 0; k0 < K64; k0 += KBV, b++) {
        __m512i c = _mm512_setzero_si512();
        for (int64_t k = k0; k < k0 + KBV && k < K64; k += 64)
            c = _mm512_dpbusd_epi32(c, ones, _mm512_loadu_si512((const void *)(hi + k)));
        _mm512_storeu_si512((void *)(hc + 16 * b), c);
    }
}

/* sum over k < K64 of xq[k] q[k] from the split row: exact int32 lanes per block, fp32 across blocks and lanes.
   Two chunks of 64 an iteration (four accumulator chains, so the multiply-adds' latency hides), and weights
   prefetched PD bytes ahead: with it the kernel streams at the rate of a plain vector read of the same bytes
   (without, ~10 % below it, measured on 2 Zen cores); rows are contiguous, so it runs on into the next row. */
static inline float dot_vnni(const uint8_t *lo, const int8_t *hi, const int32_t *hc, const int8_t *q, int64_t K64) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    __m512 facc = _mm512_setzero_ps();
    for (int64_t k0 = 0, b = 0; k0 < K64; k0 += KBV, b++) {
        int64_t end = k0 + KBV < K64 ? k0 + KBV : K64, k = k0;
        __m512i alo0 = zero, alo1 = zero, ahi0 = zero, ahi1 = zero;
        for (; k + 128 <= end; k += 128) {
            _mm_prefetch((const char *)(q + k + PD), _MM_HINT_T0);
            _mm_prefetch((const char *)(q + k + PD + 64), _MM_HINT_T0);
            __m512i w0 = _mm512_loadu_si512((const void *)(q + k)), w1 = _mm512_loadu_si512((const void *)(q + k + 64));
            alo0 = _mm512_dpbusd_epi32(alo0, _mm512_loadu_si512((const void *)(lo + k)), w0);      /* sum lo w */
            alo1 = _mm512_dpbusd_epi32(alo1, _mm512_loadu_si512((const void *)(lo + k + 64)), w1);
            ahi0 = _mm512_dpbusd_epi32(ahi0, _mm512_xor_si512(w0, flip),                          /* (w + 128) hi */
                                       _mm512_loadu_si512((const void *)(hi + k)));
            ahi1 = _mm512_dpbusd_epi32(ahi1, _mm512_xor_si512(w1, flip), _mm512_loadu_si512((const void *)(hi + k + 64)));
        }
        if (k < end) { /* one chunk of 64 left */
            __m512i w0 = _mm512_loadu_si512((const void *)(q + k));
            alo0 = _mm512_dpbusd_epi32(alo0, _mm512_loadu_si512((const void *)(lo + k)), w0);
            ahi0 = _mm512_dpbusd_epi32(ahi0, _mm512_xor_si512(w0, flip), _mm512_loadu_si512((const void *)(hi + k)));
        }
        /* sum w hi = sum (w + 128) hi - 128 sum hi, per lane, exact in int32 */
        __m512i wh = _mm512_sub_epi32(_mm512_add_epi32(ahi0, ahi1),
                                      _mm512_slli_epi32(_mm512_loadu_si512((const void *)(hc + 16 * b)), 7));
        facc = _mm512_add_ps(facc, _mm512_fmadd_ps(_mm512_cvtepi32_ps(wh), _mm512_set1_ps(256.0f),
                                                   _mm512_cvtepi32_ps(_mm512_add_epi32(alo0, alo1))));
    }
    return _mm512_reduce_add_ps(facc);
}
#endif

/* sum over K64 <= k < K of xq[k] q[k] in exact int32 blocks of KB (the VNNI path's remainder) */
static float dot_tail(const int16_t *xq, const int8_t *q, int64_t K64, int64_t K) {
    float total = 0;
    int32_t s = 0;
    for (int64_t k = K64, n = 0; k < K; k++) {
        s += (int32_t)xq[k] * (int32_t)q[k];
        if (++n == KB) {
            total += (float)s;
            s = 0;
            n = 0;
        }
    }
    return total + (float)s;
}

#ifndef VNNI
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
            a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(_mm512_loadu_si512((const void *)(xq + k)), w0));
            a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(_mm512_loadu_si512((const void *)(xq + k + 32)), w1));
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
    return total + dot_tail(xq, q, k, K); /* what no vector loop took (all of it in plain C) */
}
#endif

/* y[i] = v scale + bias, in fp32 or bf16 */
static inline void store(void *y, int64_t i, float v, float scale, float bias, int out_bf16) {
    float o = v * scale + bias;
    if (out_bf16)
        ((uint16_t *)y)[i] = f32_to_bf16(o);
    else
        ((float *)y)[i] = o;
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
#ifdef VNNI
    int64_t K64 = K / 64 * 64, nb = (K64 + KBV - 1) / KBV;
    uint8_t *lo = (uint8_t *)malloc((size_t)(M * K64));
    int8_t *hi = (int8_t *)malloc((size_t)(M * K64));
    int32_t *hc = (int32_t *)malloc(sizeof(int32_t) * (size_t)(M * nb * 16 + 1));
    if (!lo || !hi || !hc) {
        free(lo), free(hi), free(hc), free(xq), free(sx);
        return -1;
    }
    for (int64_t m = 0; m < M; m++) split_row(xq + m * K, K64, lo + m * K64, hi + m * K64, hc + m * nb * 16);
#pragma omp parallel for schedule(static) if (M * N * K > 65536) /* else the fork costs more */
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            float acc = dot_vnni(lo + m * K64, hi + m * K64, hc + m * nb * 16, q + n * K, K64);
            store(y, m * N + n, (acc + dot_tail(xq + m * K, q + n * K, K64, K)) * sx[m], scale[n],
                  bias ? bias[n] : 0.0f, out_bf16);
        }
    free(lo), free(hi), free(hc);
#else
#pragma omp parallel for schedule(static) if (M * N * K > 65536) /* else the fork costs more */
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            store(y, m * N + n, dot_i16_i8(xq + m * K, q + n * K, K) * sx[m], scale[n], bias ? bias[n] : 0.0f,
                  out_bf16);
#endif
    free(xq);
    free(sx);
    return 0;
}

/* ---- one decode step's attention ----------------------------------------------------------------------------
 * For B rows of one new token each, in fp32: rotary on the first rd channels of every q and k head (in place,
 * out = x cos + roll(x, rd/2) sin_signed, each product rounded as torch rounds it: built with
 * -ffp-contract=off), k and v written into the caches at position L, then per query head h (kv head
 * h / (H / KV)): softmax((q scale) . k_t for t <= L) weighted over v_t, into y (B, H hd). Replaces ~20 small torch
 * calls a layer, whose fixed costs weigh as much as the int8 weights at small models.
 * qkv: row b at qkv + b stride, q heads then k then v heads of hd each; kc, vc: (B, KV, max_len, hd). */

#if defined(__AVX512F__)
/* e^x for 16 lanes, ~1 ulp on the range softmax uses (x <= 0): 2^n e^r, |r| <= ln2 / 2, degree-6 polynomial */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f)); /* e^-104 underflows to 0 as expf does */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x); /* ln2 in two parts: r exact-ish */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* s[t] = exp(s[t] - max) / sum, t < T */
static void softmax_row(float *s, int64_t T) {
    float mx = -INFINITY, sum = 0;
    for (int64_t t = 0; t < T; t++) mx = s[t] > mx ? s[t] : mx;
    int64_t t = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps(), m = _mm512_set1_ps(mx);
    for (; t + 16 <= T; t += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), m));
        _mm512_storeu_ps(s + t, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; t < T; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    float inv = 1.0f / sum;
    for (t = 0; t < T; t++) s[t] *= inv;
}

int attend_step(float *qkv, int64_t B, int64_t stride, int64_t H, int64_t KV, int64_t hd, int64_t rd,
                const float *cos, const float *sin_signed, float *kc, float *vc, int64_t max_len, int64_t L,
                float scale, float *y) {
    int64_t T = L + 1, G = H / KV, half = rd / 2;
    float *scores = (float *)malloc(sizeof(float) * (size_t)(B * H * T));
    if (!scores) return -1;
    for (int64_t b = 0; b < B; b++) {
        float *row = qkv + b * stride;
        for (int64_t h = 0; h < H + KV; h++) { /* rotary, q heads then k heads */
            float *x = row + h * hd, tmp[rd > 0 ? rd : 1];
            memcpy(tmp, x, sizeof(float) * (size_t)rd);
            for (int64_t j = 0; j < rd; j++) {
                float a = tmp[j] * cos[j], c = tmp[(j + half) % rd] * sin_signed[j];
                x[j] = a + c;
            }
        }
        for (int64_t j = 0; j < KV; j++) {
            memcpy(kc + ((b * KV + j) * max_len + L) * hd, row + (H + j) * hd, sizeof(float) * (size_t)hd);
            memcpy(vc + ((b * KV + j) * max_len + L) * hd, row + (H + KV + j) * hd, sizeof(float) * (size_t)hd);
        }
    }
#pragma omp parallel for schedule(static) if (B * H * T * hd > 32768)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H, j = h / G;
        const float *q = qkv + b * stride + h * hd;
        const float *K_ = kc + (b * KV + j) * max_len * hd, *V_ = vc + (b * KV + j) * max_len * hd;
        float *s = scores + bh * T, *out = y + b * H * hd + h * hd, qs[hd];
        for (int64_t d = 0; d < hd; d++) qs[d] = q[d] * scale;
        for (int64_t t = 0; t < T; t++) {
            float acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < hd; d++) acc += qs[d] * K_[t * hd + d];
            s[t] = acc;
        }
        softmax_row(s, T);
        for (int64_t d = 0; d < hd; d++) out[d] = 0;
        for (int64_t t = 0; t < T; t++)
            for (int64_t d = 0; d < hd; d++) out[d] += s[t] * V_[t * hd + d];
    }
    free(scores);
    return 0;
}

/* phiforge's one hand-written CPU kernel: y = x @ (q * scale)^T + bias for int8 weights q, at small batch (and
 * prefill's rows on AVX2, AVX-512BW and VNNI builds: q8_tile); int4 weights the same way further down (format
 * "q4", q4_linear); one decode step's attention (fp32 or fp16 KV cache); a whole stack of int8 or int4 layers.
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
 * Still exact integers.
 *
 * Layout: x fp32 (M, K) row-major; q int8 (N, K) row-major; scale fp32 (N,); bias fp32 (N,) or NULL;
 * y (M, N) row-major, fp32 or bf16 (round to nearest even) by out_bf16.
 * Returns 0; -1 when out of memory; -2 when x holds inf or NaN (the caller computes those another way).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define KB 2048 /* inputs per int32 flush: each lane then sums <= 256 products of |32767 * 127|, < 2^31 */

#if defined(__AVX2__) /* explicit multiply-adds (FMA3 where the CPU has it) and a horizontal sum */
#ifdef __FMA__
#define FMADD(a, b, c) _mm256_fmadd_ps(a, b, c)
#else
#define FMADD(a, b, c) _mm256_add_ps(_mm256_mul_ps(a, b), c)
#endif
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif

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
/* Prefetch distance in bytes: 8 KB. One core streams ~45 GB/s here at ~100 ns memory latency, so ~4.5 KB must
   be in flight; at 2 KB the kernel ran at ~0.85 of a plain read of the same bytes on one core, at 8 KB at ~0.98
   (6-10 KB alike, 12 KB and up worse). Two cores on one memory link hide that (the link is the limit), but when
   the VM's two cores sit on separate links each core's own rate is the limit (measured: bench/serve.py).
   Into L2 (prefetcht1), not L1: on a 2-core Zen 4 VM (AVX-512 VNNI) phi-2's int8 decode step took 0.83x the time
   of prefetcht0's (steps interleaved in one process; int4, whose loop shares PREFETCH below, 0.90x). Likely: one
   into L1 holds one of L1's few miss buffers until the line arrives, so fewer lines are in flight; 4 KB ahead was
   slower again, 16 KB the same. */
#define PD 8192
#define KBV_ALL KBV

/* The activation row split for vpdpbusd (see the top), over [k0, k1) (multiples of 32): lo and hi bytes of xq[k] */
static void split_range(const int16_t *xq, int64_t k0, int64_t k1, uint8_t *lo, int8_t *hi) {
    for (int64_t k = k0; k < k1; k += 32) {
        __m512i v = _mm512_loadu_si512((const void *)(xq + k));
        _mm256_storeu_si256((__m256i *)(lo + k), _mm512_cvtepi16_epi8(v)); /* low bytes: xq & 255 */
        _mm256_storeu_si256((__m256i *)(hi + k), _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8))); /* xq >> 8 */
    }
}

/* hc[16 b + j] += the sum of hi over lane j's bytes in block b, over the chunks of 64 in [k0, k1) (multiples of
   64), so that 128 hc corrects the flipped sign. Exact int32 sums: ranges may be added in any order. */
static void hc_add(const int8_t *hi, int64_t k0, int64_t k1, int32_t *hc) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t k = k0; k < k1;) {
        int64_t b = k / KBV, end = (b + 1) * KBV < k1 ? (b + 1) * KBV : k1;
        __m512i c = _mm512_loadu_si512((const void *)(hc + 16 * b));
        for (; k < end; k += 64) c = _mm512_dpbusd_epi32(c, ones, _mm512_loadu_si512((const void *)(hi + k)));
        _mm512_storeu_si512((void *)(hc + 16 * b), c);
    }
}

#define STR_(x) #x
#define STR(x) STR_(x)

/* sum over k < K64 of xq[k] q[k] from the split row: exact int32 lanes per block, fp32 across blocks and lanes.
   Two chunks of 64 an iteration (four accumulator chains, so the multiply-adds' latency hides), and weights
   prefetched PD bytes ahead (rows are contiguous, so it runs on into the next row). The loop is written in
   assembly because GCC 12 compiles the vpdpbusd intrinsics with 8 register copies an iteration (22 instructions
   for 128 weights; here 15): the copies fill the out-of-order window, which then reaches fewer cache lines ahead,
   and when memory is fast the kernel fell to ~0.75 of a plain read of the same bytes (measured on 2 Zen cores). */
static inline float dot_vnni(const uint8_t *lo, const int8_t *hi, const int32_t *hc, const int8_t *q, int64_t K64) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    __m512 facc = _mm512_setzero_ps();
    for (int64_t k0 = 0, b = 0; k0 < K64; k0 += KBV, b++) {
        int64_t end = k0 + KBV < K64 ? k0 + KBV : K64, k = k0, stop = k0 + (end - k0) / 128 * 128;
        __m512i alo0 = zero, alo1 = zero, ahi0 = zero, ahi1 = zero, w0, w1, l0, l1;
        if (k < stop)
            __asm__("1:\n\t"
                    "prefetcht1 " STR(PD) "(%[q],%[k])\n\t"
                    "prefetcht1 " STR(PD) "+64(%[q],%[k])\n\t"
                    "vmovdqu64 (%[q],%[k]), %[w0]\n\t"
                    "vmovdqu64 64(%[q],%[k]), %[w1]\n\t"
                    "vmovdqu64 (%[lo],%[k]), %[l0]\n\t"
                    "vmovdqu64 64(%[lo],%[k]), %[l1]\n\t"
                    "vpdpbusd %[w0], %[l0], %[alo0]\n\t"         /* alo += lo (unsigned) w (signed), per 4 bytes */
                    "vpdpbusd %[w1], %[l1], %[alo1]\n\t"
                    "vpxord %[flip], %[w0], %[w0]\n\t"           /* w + 128, as unsigned */
                    "vpxord %[flip], %[w1], %[w1]\n\t"
                    "vpdpbusd (%[hi],%[k]), %[w0], %[ahi0]\n\t"  /* ahi += (w + 128) hi (signed) */
                    "vpdpbusd 64(%[hi],%[k]), %[w1], %[ahi1]\n\t"
                    "addq $128, %[k]\n\t"
                    "cmpq %[stop], %[k]\n\t"
                    "jb 1b"
                    : [k] "+r"(k), [alo0] "+v"(alo0), [alo1] "+v"(alo1), [ahi0] "+v"(ahi0), [ahi1] "+v"(ahi1),
                      [w0] "=&v"(w0), [w1] "=&v"(w1), [l0] "=&v"(l0), [l1] "=&v"(l1)
                    : [q] "r"(q), [lo] "r"(lo), [hi] "r"(hi), [stop] "r"(stop), [flip] "v"(flip)
                    : "memory", "cc");
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

#ifndef KBV_ALL
#define KBV_ALL 65536
#endif

/* Software prefetch for the AVX2 decode loops (one activation row streaming a weight matrix), PF_AHEAD bytes
   ahead of the weight read (rows are contiguous, so it runs on into the next row). Measured on a 2-core AMD EPYC
   (Zen 3, AVX2) with 420 MB of int8 weights: without it one core streamed 12.1 GB/s against 17.3 GB/s for
   torch's sum over the same bytes; the hardware prefetcher alone keeps too few lines in flight (see PD above).
   Into L2 (T1), as PD: this AVX2 loop built and run on the Zen 4 VM over 840 MB of rows of 10240 (fc2's) streamed
   ~30 GB/s on two cores with T1 against ~15-21 with T0 (rows of 2560: alike); not re-measured on Zen 3. */
#ifndef PF_AHEAD
#define PF_AHEAD 8192
#endif
#define PREFETCH(p) _mm_prefetch((const char *)(p) + PF_AHEAD, _MM_HINT_T1)

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
            PREFETCH(q + k);
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

/* Scratch of the calling thread, kept between calls: q8_linear's and q4_linear's activation buffers. Prefill's are
   tens of MB, and freshly allocated every call they were fresh pages every call (int8, 512 x 10240: ~5,000 page
   faults, most of its quantization's time). Grown as needed, freed when the thread exits. Not for decode_layers,
   whose threads hold several buffers at once. */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static __thread void *scratch_p;
static __thread size_t scratch_n;

static void scratch_key_make(void) {
    pthread_key_create(&scratch_key, free);
}

static void *scratch_get(size_t n) {
    if (n <= scratch_n) return scratch_p;
    pthread_once(&scratch_once, scratch_key_make);
    free(scratch_p);
    scratch_n = 0;
    scratch_p = aligned_alloc(64, n);
    pthread_setspecific(scratch_key, scratch_p);
    if (scratch_p) scratch_n = n;
    return scratch_p;
}

/* One block for several buffers (sizes n[0..k), each 64-byte aligned): the thread's scratch (borrow) or its own
   allocation. Returns the block, or NULL out of memory; p[i] are the buffers. */
static void *carve(const size_t *n, void **p, int k, int borrow) {
    size_t total = 0;
    for (int i = 0; i < k; i++) total += (n[i] + 63) / 64 * 64;
    unsigned char *block = borrow ? scratch_get(total) : aligned_alloc(64, total);
    for (int i = 0, off = 0; block && i < k; i++) {
        p[i] = block + off;
        off += (int)((n[i] + 63) / 64 * 64);
    }
    return block;
}

/* Activation rows quantized for the dot products: xq (and, for VNNI, its split bytes) and the row scales, in one
   block (the caller's scratch where borrowed). */
typedef struct {
    int64_t M, K, K64, nb;
    int16_t *xq;
    float *sx;
    uint8_t *lo;
    int8_t *hi;
    int32_t *hc;
    void *block;
    int borrowed;
} acts_t;

static void acts_free(acts_t *a) {
    if (!a->borrowed) free(a->block);
}

/* Buffers for M rows of K: 0, or -1 out of memory (nothing to free then) */
static int acts_alloc(acts_t *a, int64_t M, int64_t K, int borrow) {
    int64_t K64 = K / 64 * 64, nb = (K64 + KBV_ALL - 1) / KBV_ALL;
    size_t n[5] = {sizeof(int16_t) * (size_t)(M * K) + 1, sizeof(float) * (size_t)M, (size_t)(M * K64) + 1,
                   (size_t)(M * K64) + 1, sizeof(int32_t) * (size_t)(M * nb * 16) + 1};
    void *p[5];
    *a = (acts_t){M, K, K64, nb, NULL, NULL, NULL, NULL, NULL, carve(n, p, 5, borrow), borrow};
    if (!a->block) return -1;
    a->xq = p[0], a->sx = p[1], a->lo = p[2], a->hi = p[3], a->hc = p[4];
    return 0;
}

/* *mx = max(*mx, |x[k]|) over [k0, k1); -2 on inf or NaN. Exact, so any split of a row gives the row's max. */
static int absmax_range(const float *x, int64_t k0, int64_t k1, float *mx) {
    int64_t k = k0;
    float m = *mx;
#if defined(__AVX512BW__) /* the same numbers as the scalar loop below, 16 at a time */
    __m512 vmx = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (; k + 16 <= k1; k += 16) {
        __m512 v = _mm512_abs_ps(_mm512_loadu_ps(x + k));
        bad |= _mm512_cmp_ps_mask(v, _mm512_set1_ps(3.0e38f), _CMP_NLE_UQ); /* inf or NaN */
        vmx = _mm512_max_ps(vmx, v);
    }
    if (bad) return -2;
    float vm = _mm512_reduce_max_ps(vmx);
    m = vm > m ? vm : m;
#elif defined(__AVX2__)
    __m256 vmx = _mm256_setzero_ps(), bad = vmx;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(3.0e38f);
    for (; k + 8 <= k1; k += 8) {
        __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + k), absmask);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, big, _CMP_NLE_UQ)); /* inf or NaN */
        vmx = _mm256_max_ps(vmx, v);
    }
    if (_mm256_movemask_ps(bad)) return -2;
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float vm = _mm_cvtss_f32(h);
    m = vm > m ? vm : m;
#endif
    for (; k < k1; k++) {
        float v = fabsf(x[k]);
        if (!(v <= 3.0e38f)) return -2; /* inf or NaN */
        m = v > m ? v : m;
    }
    *mx = m;
    return 0;
}

/* The row scale for a row whose largest |x| is mx */
static inline float row_scale(float mx) {
    return mx > 0 ? mx / 32767.0f : 1.0f;
}

/* xq[k] = x[k] / sx rounded to nearest even (lrintf's default mode) and clamped to +-32767, k in [k0, k1): each
   element on its own, so any split of a row gives the same codes */
static void quantize_range(const float *x, int64_t k0, int64_t k1, float sx, int16_t *xq) {
    float inv = 1.0f / sx;
    int64_t k = k0;
#if defined(__AVX512BW__)
    for (; k + 16 <= k1; k += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), _mm512_set1_ps(inv)));
        v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(32767)), _mm512_set1_epi32(-32767));
        _mm256_storeu_si256((__m256i *)(xq + k), _mm512_cvtepi32_epi16(v));
    }
#endif
    for (; k < k1; k++) {
        long v = lrintf(x[k] * inv);
        xq[k] = (int16_t)(v > 32767 ? 32767 : v < -32767 ? -32767 : v);
    }
}

/* Quantize a->M rows of a->K (row m at x + m ldx) into a's buffers: 0, or -2 on inf or NaN in x. Prefill's many
   rows go over the threads (each row on its own: the same numbers). */
static int acts_fill(acts_t *a, const float *x, int64_t ldx) {
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (a->M * a->K > 262144)
    for (int64_t m = 0; m < a->M; m++) {
        const float *xm = x + m * ldx;
        float mx = 0;
        if (bad || absmax_range(xm, 0, a->K, &mx)) {
            bad = 1;
            continue;
        }
        a->sx[m] = row_scale(mx);
        quantize_range(xm, 0, a->K, a->sx[m], a->xq + m * a->K);
#ifdef VNNI
        split_range(a->xq + m * a->K, 0, a->K64, a->lo + m * a->K64, a->hi + m * a->K64);
        memset(a->hc + m * a->nb * 16, 0, sizeof(int32_t) * (size_t)(a->nb * 16));
        hc_add(a->hi + m * a->K64, 0, a->K64, a->hc + m * a->nb * 16);
#endif
    }
    return bad ? -2 : 0;
}

/* Quantize M rows of K (row m at x + m ldx): 0, -1 out of memory, -2 inf or NaN in x (nothing to free then) */
static int acts_init(acts_t *a, const float *x, int64_t M, int64_t K, int64_t ldx) {
    if (acts_alloc(a, M, K, 1)) return -1;
    int rc = acts_fill(a, x, ldx);
    if (rc) acts_free(a);
    return rc;
}

/* Row m of the activations . weight row qn (K int8), in x's units (before the weight's scale) */
static inline float acts_dot(const acts_t *a, int64_t m, const int8_t *qn) {
#ifdef VNNI
    float acc = dot_vnni(a->lo + m * a->K64, a->hi + m * a->K64, a->hc + m * a->nb * 16, qn, a->K64) +
                dot_tail(a->xq + m * a->K, qn, a->K64, a->K);
#else
    float acc = dot_i16_i8(a->xq + m * a->K, qn, a->K);
#endif
    return acc * a->sx[m];
}

/* Output r of a linear layer (int8 rows q of K, scales, bias or NULL) for activation row m, in fp32 */
static inline float q8_out(const acts_t *a, int64_t m, const int8_t *q, const float *scale, const float *bias,
                           int64_t r) {
    return acts_dot(a, m, q + r * a->K) * scale[r] + (bias ? bias[r] : 0.0f);
}

#if defined(__AVX2__) && !defined(VNNI)
/* out[r] = activation rows m0..m0+R-1 . weight row qn (R <= 4), in x's units: dot_i16_i8's AVX2 numbers for each
   row (the same int32 lanes per KB block: integer sums, exact in any order; the same fp32 steps after them), with
   the weights widened once for the R rows instead of once a row: prefill's many rows (q8_rows) */
static inline __attribute__((always_inline)) void q8_tile(const acts_t *a, int64_t m0, const int R, const int8_t *qn,
                                                         float *out) {
    const int64_t K = a->K;
    __m256 facc[4];
    for (int r = 0; r < R; r++) facc[r] = _mm256_setzero_ps();
    int64_t k = 0;
    while (k + 32 <= K) {
        int64_t end = k + KB < K ? k + KB : K;
        __m256i acc[4];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_si256();
        for (; k + 32 <= end; k += 32) {
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qn + k)));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qn + k + 16)));
            for (int r = 0; r < R; r++) {
                const int16_t *x = a->xq + (m0 + r) * K + k;
                acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(
                    _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)x), w0),
                    _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(x + 16)), w1)));
            }
        }
        for (int r = 0; r < R; r++) facc[r] = _mm256_add_ps(facc[r], _mm256_cvtepi32_ps(acc[r]));
    }
    for (int r = 0; r < R; r++) {
        float t[8], total = 0;
        _mm256_storeu_ps(t, facc[r]);
        for (int i = 0; i < 8; i++) total += t[i];
        out[r] = (total + dot_tail(a->xq + (m0 + r) * K, qn, k, K)) * a->sx[m0 + r];
    }
}

#define Q8_TILES 1
#elif defined(VNNI)
/* The same for VNNI builds: dot_vnni's numbers for each row (one chain of exact int32 lanes per KBV block where it
   keeps two: integer sums, the same in any order; the same fp32 steps after them), each 64 weights loaded and
   flipped once for the R rows. q8_span: the int32 sums of inputs [k0, end) (within one KBV block) onto alo, ahi. */
static inline __attribute__((always_inline)) void q8_span(const acts_t *a, int64_t m0, const int R, const int8_t *qn,
                                                         int64_t k0, int64_t end, __m512i *alo, __m512i *ahi) {
    const int64_t K64 = a->K64;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    if (R == 4 && k0 < end) { /* prefill's tiles: in assembly, as dot_vnni (GCC copies every accumulator an
                                 iteration and reloads the weights for each row: 0.92x the speed) */
        const uint8_t *l0 = a->lo + m0 * K64, *l1 = l0 + K64, *l2 = l1 + K64, *l3 = l2 + K64;
        const int8_t *h0 = a->hi + m0 * K64, *h1 = h0 + K64, *h2 = h1 + K64, *h3 = h2 + K64;
        int64_t k = k0;
        __asm__("1:\n\t"
                "vmovdqu64 (%[q],%[k]), %%zmm29\n\t"
                "vpxord %[flip], %%zmm29, %%zmm30\n\t"
                "vmovdqu64 (%[l0],%[k]), %%zmm31\n\t"
                "vpdpbusd %%zmm29, %%zmm31, %[a0]\n\t"
                "vpdpbusd (%[h0],%[k]), %%zmm30, %[b0]\n\t"
                "vmovdqu64 (%[l1],%[k]), %%zmm31\n\t"
                "vpdpbusd %%zmm29, %%zmm31, %[a1]\n\t"
                "vpdpbusd (%[h1],%[k]), %%zmm30, %[b1]\n\t"
                "vmovdqu64 (%[l2],%[k]), %%zmm31\n\t"
                "vpdpbusd %%zmm29, %%zmm31, %[a2]\n\t"
                "vpdpbusd (%[h2],%[k]), %%zmm30, %[b2]\n\t"
                "vmovdqu64 (%[l3],%[k]), %%zmm31\n\t"
                "vpdpbusd %%zmm29, %%zmm31, %[a3]\n\t"
                "vpdpbusd (%[h3],%[k]), %%zmm30, %[b3]\n\t"
                "addq $64, %[k]\n\t"
                "cmpq %[end], %[k]\n\t"
                "jb 1b"
                : [k] "+r"(k), [a0] "+v"(alo[0]), [a1] "+v"(alo[1]), [a2] "+v"(alo[2]), [a3] "+v"(alo[3]),
                  [b0] "+v"(ahi[0]), [b1] "+v"(ahi[1]), [b2] "+v"(ahi[2]), [b3] "+v"(ahi[3])
                : [q] "r"(qn), [l0] "r"(l0), [l1] "r"(l1), [l2] "r"(l2), [l3] "r"(l3), [h0] "r"(h0),
                  [h1] "r"(h1), [h2] "r"(h2), [h3] "r"(h3), [end] "r"(end), [flip] "v"(flip)
                : "memory", "cc", "xmm29", "xmm30", "xmm31");
    } else
        for (int64_t k = k0; k < end; k += 64) {
            __m512i w = _mm512_loadu_si512((const void *)(qn + k)), wf = _mm512_xor_si512(w, flip);
            for (int r = 0; r < R; r++) {
                const int64_t o = (m0 + r) * K64 + k;
                alo[r] = _mm512_dpbusd_epi32(alo[r], _mm512_loadu_si512((const void *)(a->lo + o)), w);
                ahi[r] = _mm512_dpbusd_epi32(ahi[r], wf, _mm512_loadu_si512((const void *)(a->hi + o)));
            }
        }
}

/* facc[r] += KBV block b's int32 sums, in fp32 */
static inline __attribute__((always_inline)) void q8_block_add(const acts_t *a, int64_t m0, const int R, int64_t b,
                                                              const __m512i *alo, const __m512i *ahi, __m512 *facc) {
    for (int r = 0; r < R; r++) {
        const int32_t *hc = a->hc + (m0 + r) * a->nb * 16 + 16 * b;
        __m512i wh = _mm512_sub_epi32(ahi[r], _mm512_slli_epi32(_mm512_loadu_si512((const void *)hc), 7));
        facc[r] = _mm512_add_ps(facc[r], _mm512_fmadd_ps(_mm512_cvtepi32_ps(wh), _mm512_set1_ps(256.0f),
                                                         _mm512_cvtepi32_ps(alo[r])));
    }
}

/* out[r] from facc: the lanes' sum, what no vector took, the row scale */
static inline __attribute__((always_inline)) void q8_tile_out(const acts_t *a, int64_t m0, const int R,
                                                             const int8_t *qn, const __m512 *facc, float *out) {
    for (int r = 0; r < R; r++)
        out[r] = (_mm512_reduce_add_ps(facc[r]) + dot_tail(a->xq + (m0 + r) * a->K, qn, a->K64, a->K)) *
                 a->sx[m0 + r];
}

static inline __attribute__((always_inline)) void q8_tile(const acts_t *a, int64_t m0, const int R, const int8_t *qn,
                                                         float *out) {
    const int64_t K64 = a->K64;
    __m512 facc[4];
    for (int r = 0; r < R; r++) facc[r] = _mm512_setzero_ps();
    for (int64_t k0 = 0, b = 0; k0 < K64; k0 += KBV, b++) {
        __m512i alo[4], ahi[4];
        for (int r = 0; r < R; r++) alo[r] = ahi[r] = _mm512_setzero_si512();
        q8_span(a, m0, R, qn, k0, k0 + KBV < K64 ? k0 + KBV : K64, alo, ahi);
        q8_block_add(a, m0, R, b, alo, ahi, facc);
    }
    q8_tile_out(a, m0, R, qn, facc, out);
}

/* q8_span and then (last) the output of a tile whose rows fit one KBV block, for R rows (a constant in each) */
static void q8_span_rows(const acts_t *a, int64_t m0, int R, const int8_t *qn, int64_t k0, int64_t end, __m512i *alo,
                         __m512i *ahi, float *out) {
#define Q8_SPAN(R_)                                                                                                  \
    {                                                                                                                \
        q8_span(a, m0, R_, qn, k0, end, alo, ahi);                                                                   \
        if (out) {                                                                                                   \
            __m512 facc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};   \
            q8_block_add(a, m0, R_, 0, alo, ahi, facc);                                                              \
            q8_tile_out(a, m0, R_, qn, facc, out);                                                                   \
        }                                                                                                            \
        return;                                                                                                      \
    }
    switch (R) {
    case 1: Q8_SPAN(1)
    case 2: Q8_SPAN(2)
    case 3: Q8_SPAN(3)
    default: Q8_SPAN(4)
    }
#undef Q8_SPAN
}
#define Q8_SPANS 1
#define Q8_TILES 1
#endif

#ifdef Q8_TILES
static void q8_dot_rows(const acts_t *a, int64_t m0, int R, const int8_t *qn, float *out) {
    switch (R) { /* R a constant in each: registers */
    case 1: q8_tile(a, m0, 1, qn, out); return;
    case 2: q8_tile(a, m0, 2, qn, out); return;
    case 3: q8_tile(a, m0, 3, qn, out); return;
    default: q8_tile(a, m0, 4, qn, out); return;
    }
}
#endif

/* y (M, N) = the quantized rows times (q scale)^T + bias, rows of q split over threads. More than Q8_FEW rows
   (prefill; AVX2, AVX-512BW and VNNI builds), 4 rows at a time per weight row (q8_tile), weight rows in blocks of
   Q8_NB (<= 160 KB at K = 10240: L2) that meet every activation tile before the next block is read, as q4_rows
   does. */
#define Q8_FEW 16
#define Q8_NB 16
#define Q8_L1 16384 /* bytes of a tile's activations kept in L1 while a block of weight rows passes (as Q4_L1) */
static void q8_rows(const acts_t *a, const int8_t *q, const float *scale, const float *bias, void *y, int64_t N,
                    int out_bf16) {
    int64_t M = a->M, K = a->K;
#ifdef Q8_TILES
    if (M > Q8_FEW) {
        int64_t nblocks = (N + Q8_NB - 1) / Q8_NB;
#pragma omp parallel for schedule(static)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            int64_t n0 = blk * Q8_NB, n1 = n0 + Q8_NB < N ? n0 + Q8_NB : N;
            float o[4];
            for (int64_t m = 0; m < M; m += 4) {
                int R = M - m < 4 ? (int)(M - m) : 4;
#ifdef Q8_SPANS
                /* rows too long for L1 (fc2's 10240 inputs: 80 KB of a tile's lo and hi bytes), within one KBV
                   block: the block's weight rows go over the tile a span of inputs at a time, the exact int32
                   sums kept between spans (integers: the same numbers in any order), as q4_rows */
                const int64_t K64 = a->K64;
                if (K64 <= KBV && 2 * R * K64 > 2 * Q8_L1) {
                    int64_t parts = (2 * R * K64 + Q8_L1 - 1) / Q8_L1, span = (K64 / 64 + parts - 1) / parts * 64;
                    __m512i lo[Q8_NB * 4], hi[Q8_NB * 4];
                    for (int64_t i = 0; i < (n1 - n0) * R; i++) lo[i] = hi[i] = _mm512_setzero_si512();
                    for (int64_t k0 = 0; k0 < K64; k0 += span)
                        for (int64_t n = n0; n < n1; n++) {
                            int64_t k1 = k0 + span < K64 ? k0 + span : K64;
                            q8_span_rows(a, m, R, q + n * K, k0, k1, lo + (n - n0) * R, hi + (n - n0) * R,
                                         k1 == K64 ? o : NULL);
                            for (int r = 0; r < R && k1 == K64; r++)
                                store(y, (m + r) * N + n, o[r], scale[n], bias ? bias[n] : 0.0f, out_bf16);
                        }
                    continue;
                }
#endif
                for (int64_t n = n0; n < n1; n++) {
                    q8_dot_rows(a, m, R, q + n * K, o);
                    for (int r = 0; r < R; r++)
                        store(y, (m + r) * N + n, o[r], scale[n], bias ? bias[n] : 0.0f, out_bf16);
                }
            }
        }
        return;
    }
#endif
#pragma omp parallel for schedule(static) if (M * N * K > 65536) /* else the fork costs more */
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            store(y, m * N + n, acts_dot(a, m, q + n * K), scale[n], bias ? bias[n] : 0.0f, out_bf16);
}

int q8_linear(const float *x, int64_t M, int64_t K, const int8_t *q, const float *scale, const float *bias,
              void *y, int64_t N, int out_bf16) {
    acts_t a;
    int rc = acts_init(&a, x, M, K, K);
    if (rc) return rc;
    q8_rows(&a, q, scale, bias, y, N, out_bf16);
    acts_free(&a);
    return 0;
}

/* ---- int4 weights (format "q4"): y = x @ W^T + bias, W in symmetric 4-bit groups of 32 with an fp16 scale ---
 * Why this layout: Q4_0's (groups of 32 contiguous inputs, codes then a scale per group) makes every group a float
 * step of its own: llama.cpp's AVX2 loop spends ~15 instructions on 32 weights, which is compute-bound on two
 * cores. Here a group's codes sit in one int32 lane of the vector multiply-adds (its 32 consecutive inputs spread
 * over the lane's slots, the activations gathered to match), so the integer products of all eight groups of a
 * block are finished by the same few vector instructions and the float work is one convert and multiply-add per
 * 64 weights and eight groups (~6.5 instructions per 32 weights with AVX2).
 *
 * Weights: row n is Kp / 2 bytes (Kp = K rounded up to 64; the padding codes stand for 0) in vectors of 32 bytes,
 * u = q + 8, q in [-8, 7]: slot p of vector t is the low nibble of byte p, slot 32 + p its high nibble. Vectors
 * come in super-blocks of four (256 slots; a row's last may have fewer, v < 4). Group i (0..7) of a super-block is
 * every slot o with (o % 32) / 4 == i: the bytes 4i..4i+3 of each vector, both nibbles, 8v slots; they hold the 8v
 * consecutive inputs 256b + 8v i ... (slot 64t + 32h + 4i + j holds input 256b + 8v i + 8t + 4h + j), so a
 * group is Q4_0's contiguous run (measured: scattering a group's 32 inputs over the super-block, the layout's first
 * version, cost 7x the perplexity of contiguous groups on a trained Phi, weights alone). Scales: fp16, 8 a
 * super-block, row n at s + n 8 nsb (nsb = super-blocks a row), group i of super-block b at 8b + i;
 * w = scale (u - 8). phiforge/kernels quantize_q4 and q4_slot_positions place the codes.
 * Activations: each row gathered into the same slot order (acts4_gather), then quantized to int8 per block of 64
 * slots (one vector's: 8 consecutive inputs of each group; xq = round(x / sx), sx = max|x_block| / 127, so
 * |x - sx xq| <= sx / 2 = max|x_block| / 254). Per block and group the dot product
 * sum (u - 8) xq = sum u xq - 8 sum xq is exact in int32: AVX2 vpmaddubsw (u unsigned, xq signed: pairs of
 * products, |.| <= 2 15 127, no saturation) and vpmaddwd (int16 pairs -> int32 lanes: lane i is group i), or
 * AVX-512 VNNI / AVX-VNNI vpdpbusd (four products a lane at once), or plain C; the 8 sum xq of each group comes
 * from the activation alone (once per call). Then, in fp32 lanes, acc_i += (int sum) sx scale_i, and the eight
 * lanes are summed at the end of the row. All integer sums are exactly representable in fp32 (< 2^24).
 * Layout of the call: x fp32 (M, K); q uint8 (N, Kp / 2); s fp16 bits (N, 8 nsb); bias fp32 (N,) or NULL;
 * y (M, N) fp32 or bf16. Returns 0; -1 out of memory; -2 inf or NaN in x. */

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define Q4_VNNI 1
#define Q4_DPBUSD(acc, u, x) _mm256_dpbusd_epi32(acc, u, x)
#elif defined(__AVXVNNI__)
#define Q4_VNNI 1
#define Q4_DPBUSD(acc, u, x) _mm256_dpbusd_avx_epi32(acc, u, x)
#endif

/* Which instructions the int4 path uses: 3 AVX-512 VNNI (256-bit), 4 AVX-VNNI, 1 AVX2, 0 plain C. */
int q4_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return 3;
#elif defined(__AVXVNNI__)
    return 4;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 0x3ff, u;
    if (e == 31)
        u = sign | 0x7f800000 | (m << 13); /* inf, NaN */
    else if (e)
        u = sign | ((e + 112) << 23) | (m << 13);
    else if (!m)
        u = sign; /* zero */
    else {        /* subnormal: normalize */
        e = 113;
        while (!(m & 0x400)) m <<= 1, e--;
        u = sign | (e << 23) | ((m & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

typedef struct {
    int64_t M, K, Kp, nv; /* nv = Kp / 64: vectors (activation blocks) a row */
    int8_t *xq;           /* (M, Kp) in slot order (acts4_gather), 0 past K */
    float *sx;            /* (M, nv) block scales */
    float *off;           /* (M, nsb, 8): the -8 offset's share per super-block and group, sum_t sx_t 8 sum xq */
    void *block;          /* all three (the caller's scratch where borrowed, see carve) */
    int borrowed;
} acts4_t;

static void acts4_free(acts4_t *a) {
    if (!a->borrowed) free(a->block);
}

static int acts4_alloc(acts4_t *a, int64_t M, int64_t K, int borrow) {
    int64_t Kp = (K + 63) / 64 * 64;
    size_t n[3] = {(size_t)(M * Kp) + 64, sizeof(float) * (size_t)(M * Kp / 64) + 4,
                   sizeof(float) * (size_t)(M * (Kp + 255) / 256 * 8) + 4};
    void *p[3];
    *a = (acts4_t){M, K, Kp, Kp / 64, NULL, NULL, NULL, carve(n, p, 3, borrow), borrow};
    if (!a->block) return -1;
    a->xq = p[0], a->sx = p[1], a->off = p[2];
    return 0;
}

/* Row xm in slot order (xs, Kp floats), super-blocks [b0, b1): slot 256 b + 64 t + 32 h + 4 i + j of a super-block
   of v vectors holds input 256 b + 8 v i + 8 t + 4 h + j (0 past K), so that group i (lane i) is 8 v consecutive
   inputs, as the
   weights' codes are placed (phiforge/kernels q4_slot_positions): runs of 4 consecutive inputs a copy. */
static void acts4_gather(const acts4_t *a, const float *xm, float *xs, int64_t b0, int64_t b1) {
    const int64_t K = a->K;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t v = a->nv - 4 * b < 4 ? a->nv - 4 * b : 4;
        if (v == 4 && 256 * b + 256 <= K) { /* a whole super-block inside the row: runs of 4 copied as they are */
            for (int64_t i = 0; i < 8; i++)
                for (int64_t t = 0; t < 4; t++) {
                    memcpy(xs + 256 * b + 64 * t + 4 * i, xm + 256 * b + 32 * i + 8 * t, 4 * sizeof(float));
                    memcpy(xs + 256 * b + 64 * t + 32 + 4 * i, xm + 256 * b + 32 * i + 8 * t + 4, 4 * sizeof(float));
                }
            continue;
        }
        for (int64_t i = 0; i < 8; i++)
            for (int64_t t = 0; t < v; t++)
                for (int64_t h = 0; h < 2; h++) {
                    const int64_t p = 256 * b + 8 * v * i + 8 * t + 4 * h, slot = 256 * b + 64 * t + 32 * h + 4 * i;
                    for (int64_t j = 0; j < 4; j++) xs[slot + j] = p + j < K ? xm[p + j] : 0.0f;
                }
    }
}

/* Super-blocks [b0, b1) of row m (xs: scratch of Kp floats): gathered into slot order, then quantized per block
   of 64 slots: 0, or -2 on inf or NaN. Each super-block on its own: any split of a row gives the same numbers. */
static int acts4_part(acts4_t *a, const float *xrow, int64_t m, float *xs, int64_t b0, int64_t b1) {
    acts4_gather(a, xrow, xs, b0, b1);
    const float *xm = xs;
    int8_t *xq = a->xq + m * a->Kp;
    for (int64_t t = 4 * b0; t < a->nv && t < 4 * b1; t++) {
        int64_t k0 = 64 * t, k1 = k0 + 64, k = k0;
        float mx = 0;
        if (absmax_range(xm, k0, k1, &mx)) return -2;
        float sx = mx > 0 ? mx / 127.0f : 1.0f, inv = 1.0f / sx;
        a->sx[m * a->nv + t] = sx;
#if defined(__AVX2__)
        { /* vcvtps2dq rounds to nearest even, as lrintf below */
            const __m256 vi = _mm256_set1_ps(inv);
            const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for (; k < k1; k += 32) {
                __m256i a0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xm + k), vi));
                __m256i a1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xm + k + 8), vi));
                __m256i a2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xm + k + 16), vi));
                __m256i a3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xm + k + 24), vi));
                __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(a0, a1), _mm256_packs_epi32(a2, a3));
                b = _mm256_max_epi8(_mm256_permutevar8x32_epi32(b, order), _mm256_set1_epi8(-127));
                _mm256_storeu_si256((__m256i *)(xq + k), b);
            }
        }
#endif
        for (; k < k1; k++) {
            long v = lrintf(xm[k] * inv);
            xq[k] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
        }
        int32_t c[8] = {0}; /* per group (lane): the sum of the block's codes in its slots */
#if defined(__AVX2__) /* byte pairs, then pairs of pairs: lane i sums bytes 4i..4i+3 of both halves, exactly */
        {
            const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
            __m256i h0 = _mm256_loadu_si256((const __m256i *)(xq + k0));
            __m256i h1 = _mm256_loadu_si256((const __m256i *)(xq + k0 + 32));
            __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(ones8, h0), _mm256_maddubs_epi16(ones8, h1));
            _mm256_storeu_si256((__m256i *)c, _mm256_madd_epi16(pairs, ones16));
        }
#else
        for (int64_t o = 0; o < 64; o++) c[(o & 31) >> 2] += xq[k0 + o];
#endif
        float *off = a->off + (m * ((a->nv + 3) / 4) + t / 4) * 8;
        for (int i = 0; i < 8; i++) off[i] = (t % 4 ? off[i] : 0.0f) + (float)(8 * c[i]) * sx;
    }
    return 0;
}

/* Quantize a->M rows of a->K (row m at x + m ldx) per block of 64 slots: 0, -1 out of memory, -2 inf or NaN */
static int acts4_fill(acts4_t *a, const float *x, int64_t ldx) {
    int bad = 0, oom = 0;
#pragma omp parallel reduction(| : bad, oom) if (a->M * a->K > 262144) /* prefill: rows over threads */
    {
        float *xs = malloc(sizeof(float) * (size_t)a->Kp); /* one gather buffer a thread, not a row */
        oom = !xs;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < a->M; m++)
            if (xs && acts4_part(a, x + m * ldx, m, xs, 0, (a->nv + 3) / 4)) bad = 1;
        free(xs);
    }
    return oom ? -1 : bad ? -2 : 0;
}

static int acts4_init(acts4_t *a, const float *x, int64_t M, int64_t K, int64_t ldx) {
    if (acts4_alloc(a, M, K, 1)) return -1;
    int rc = acts4_fill(a, x, ldx);
    if (rc) acts4_free(a);
    return rc;
}

/* Activation rows a tile takes at most: 8 where the build has 32 vector registers (AVX-512VL: 8 accumulators and 8
   partial sums stay in registers; on 2 Zen 4 cores 512 x 10240 x 2560 ran at ~170 GMAC/s against ~140 with 4 rows,
   fewer calls sharing the super-blocks' bookkeeping), else 4 (16 registers: 8 rows would spill) */
#if defined(__AVX512VL__)
#define Q4_ROWS 8
#else
#define Q4_ROWS 4
#endif

#if defined(__AVX2__)
/* g[r] += sx_t (the int32 products of weight vector t with activation row r's block t, before the -8 offset)
   for R activation rows x (stride Kp): per group (lane), exact integers, then one convert and multiply-add */
static inline __attribute__((always_inline)) void q4_vec(const acts4_t *a, const int8_t *x, const float *sx,
                                                        const int R, const uint8_t *qn, int64_t t, __m256 *g) {
    const __m256i nib = _mm256_set1_epi8(0x0F);
    const int64_t nv = a->nv, Kp = a->Kp;
    __m256i w = _mm256_loadu_si256((const __m256i *)(qn + 32 * t));
    __m256i lo = _mm256_and_si256(w, nib), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), nib);
    for (int r = 0; r < R; r++) {
        const int8_t *xr = x + r * Kp + 64 * t;
        __m256i x0 = _mm256_loadu_si256((const __m256i *)xr), x1 = _mm256_loadu_si256((const __m256i *)(xr + 32));
#ifdef Q4_VNNI
        __m256i i32 = Q4_DPBUSD(Q4_DPBUSD(_mm256_setzero_si256(), lo, x0), hi, x1);
#else
        __m256i i32 = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1)),
                                        _mm256_set1_epi16(1));
#endif
        g[r] = FMADD(_mm256_cvtepi32_ps(i32), _mm256_set1_ps(sx[r * nv + t]), g[r]);
    }
}

/* acc[r] += activation rows m0..m0+R-1 . weight row (codes qn, scales sn) over super-blocks [b0, b1), R <= Q4_ROWS,
   lane i holding group i's share, in x's units; inlined with R a constant so the accumulators live in registers.
   Each row's numbers do not depend on R > 1, nor on how [0, nsb) is split into calls. Per super-block (one set of
   8 scales dw) and row: acc += (sum over its vectors t of sx_t ints_t - the offsets' share, sum_t sx_t 8 sum xq) dw.
   With one row, even and odd vectors go to separate sums: with one chain, the multiply-add's latency was the
   limit. q4_tile: all super-blocks, summed across lanes into out[r]. */
static inline __attribute__((always_inline)) void q4_tile_part(const acts4_t *a, int64_t m0, const int R,
                                                              const uint8_t *qn, const uint16_t *sn, int64_t b0,
                                                              int64_t b1, __m256 *accm) {
    const int64_t nv = a->nv, nsb = (nv + 3) / 4;
    const int8_t *x = a->xq + m0 * a->Kp;
    const float *sx = a->sx + m0 * nv, *off = a->off + m0 * nsb * 8;
    __m256 acc[Q4_ROWS], g[Q4_ROWS], g2[Q4_ROWS];
    for (int r = 0; r < R; r++) acc[r] = accm[r];
    for (int64_t b = b0; b < b1; b++) {
        int64_t t0 = 4 * b, t1 = t0 + 4 < nv ? t0 + 4 : nv, t = t0;
        for (int r = 0; r < R; r++) g[r] = g2[r] = _mm256_setzero_ps();
        if (R == 1)
            for (; t + 2 <= t1; t += 2) {
                PREFETCH(qn + 32 * t); /* one 64-byte line: both vectors */
                q4_vec(a, x, sx, R, qn, t, g);
                q4_vec(a, x, sx, R, qn, t + 1, g2);
            }
        for (; t < t1; t++) q4_vec(a, x, sx, R, qn, t, g);
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sn + 8 * b))); /* 8 scales: groups 0..7 */
        for (int r = 0; r < R; r++) {
            __m256 v = _mm256_sub_ps(R == 1 ? _mm256_add_ps(g[r], g2[r]) : g[r],
                                     _mm256_loadu_ps(off + (r * nsb + b) * 8));
            acc[r] = FMADD(v, dw, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) accm[r] = acc[r];
}

static inline __attribute__((always_inline)) void q4_tile(const acts4_t *a, int64_t m0, const int R,
                                                         const uint8_t *qn, const uint16_t *sn, float *out) {
    __m256 acc[Q4_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    q4_tile_part(a, m0, R, qn, sn, 0, (a->nv + 3) / 4, acc);
    for (int r = 0; r < R; r++) out[r] = hsum8(acc[r]);
}

/* q4_tile_part for R rows (R a constant in each case, as q4_dot) */
static void q4_dot_part(const acts4_t *a, int64_t m0, int R, const uint8_t *qn, const uint16_t *sn, int64_t b0,
                        int64_t b1, __m256 *accm) {
    switch (R) {
    case 1: q4_tile_part(a, m0, 1, qn, sn, b0, b1, accm); return;
    case 2: q4_tile_part(a, m0, 2, qn, sn, b0, b1, accm); return;
    case 3: q4_tile_part(a, m0, 3, qn, sn, b0, b1, accm); return;
#if Q4_ROWS == 8
    case 4: q4_tile_part(a, m0, 4, qn, sn, b0, b1, accm); return;
    default: q4_tile_part(a, m0, 8, qn, sn, b0, b1, accm); return;
#else
    default: q4_tile_part(a, m0, 4, qn, sn, b0, b1, accm); return;
#endif
    }
}
#else
/* The same numbers in plain C (lane i of the vector paths is group i here) */
static void q4_tile_c(const acts4_t *a, int64_t m0, int R, const uint8_t *qn, const uint16_t *sn, float *out) {
    int64_t nv = a->nv, nsb = (nv + 3) / 4;
    for (int r = 0; r < R; r++) {
        const int8_t *x = a->xq + (m0 + r) * a->Kp;
        const float *sx = a->sx + (m0 + r) * nv, *off = a->off + (m0 + r) * nsb * 8;
        float acc[8] = {0};
        for (int64_t b = 0; b < nsb; b++) {
            float g[8] = {0};
            for (int64_t t = 4 * b; t < 4 * b + 4 && t < nv; t++) {
                int32_t s[8] = {0};
                const uint8_t *qt = qn + 32 * t;
                const int8_t *xt = x + 64 * t;
                for (int p = 0; p < 32; p++) s[p >> 2] += (qt[p] & 15) * xt[p] + (qt[p] >> 4) * xt[p + 32];
                for (int i = 0; i < 8; i++) g[i] += (float)s[i] * sx[t];
            }
            for (int i = 0; i < 8; i++) acc[i] += (g[i] - off[8 * b + i]) * f16_to_f32(sn[8 * b + i]);
        }
        float total = 0;
        for (int i = 0; i < 8; i++) total += acc[i];
        out[r] = total;
    }
}
#endif

static inline void q4_dot(const acts4_t *a, int64_t m0, int R, const uint8_t *qn, const uint16_t *sn, float *out) {
#if defined(__AVX2__)
    switch (R) { /* R a constant in each: registers, unrolled row loops */
    case 1: q4_tile(a, m0, 1, qn, sn, out); return;
    case 2: q4_tile(a, m0, 2, qn, sn, out); return;
    case 3: q4_tile(a, m0, 3, qn, sn, out); return;
#if Q4_ROWS == 8
    case 4: q4_tile(a, m0, 4, qn, sn, out); return;
    default: q4_tile(a, m0, 8, qn, sn, out); return;
#else
    default: q4_tile(a, m0, 4, qn, sn, out); return;
#endif
    }
#else
    q4_tile_c(a, m0, R, qn, sn, out);
#endif
}

/* Scales a row: 8 per super-block of 4 vectors */
static inline int64_t q4_scales_per_row(int64_t nv) {
    return 8 * ((nv + 3) / 4);
}

/* y (M, N) = the quantized rows times W^T + bias; rows of W split over threads, activation rows Q4_ROWS at a time
   (then 4, then what is left).
   Up to Q4_FEW activation rows (decoding), each weight row is read from memory once and used for every activation
   row while it sits in L1. More (prefill), the weight rows go in blocks of Q4_NB (<= 160 KB at K = 10240: L2),
   and each block meets every activation tile before the next block is read, so weights stream from memory once
   per call and activations from L2 once per block: y's columns of a block are one thread's. */
#define Q4_FEW 16
#define Q4_NB 32
#define Q4_L1 16384 /* bytes of a tile's activation rows that stay in L1 while a block of weight rows passes, where
                       all of them (over 32 KB: L1 on x86 cores) would not (A/B on Zen 4, K = 10240: 12-16 KB best) */
static void q4_rows(const acts4_t *a, const uint8_t *q, const uint16_t *s, const float *bias, void *y, int64_t N,
                    int out_bf16) {
    int64_t M = a->M, qs = a->Kp / 2, ss = q4_scales_per_row(a->nv), nsb = (a->nv + 3) / 4;
    int64_t nb = M <= Q4_FEW ? 1 : Q4_NB, nblocks = (N + nb - 1) / nb;
#pragma omp parallel for schedule(static) if (M * N * a->Kp > 65536) /* else the fork costs more */
    for (int64_t blk = 0; blk < nblocks; blk++) {
        int64_t n0 = blk * nb, n1 = n0 + nb < N ? n0 + nb : N;
        float o[Q4_ROWS];
        for (int64_t m = 0, R; m < M; m += R) {
            R = M - m >= Q4_ROWS ? Q4_ROWS : M - m >= 4 ? 4 : M - m;
#if defined(__AVX2__)
            /* prefill rows too long for L1 (fc2's 10240 inputs): the block's weight rows go over the tile a span of
               super-blocks at a time, each row's sums kept between spans (the same additions in the same order) */
            int64_t parts = (R * a->Kp + Q4_L1 - 1) / Q4_L1, span = (nsb + parts - 1) / parts;
            if (nb > 1 && R * a->Kp > 2 * Q4_L1) {
                __m256 acc[Q4_NB * Q4_ROWS];
                for (int64_t i = 0; i < (n1 - n0) * R; i++) acc[i] = _mm256_setzero_ps();
                for (int64_t b0 = 0; b0 < nsb; b0 += span)
                    for (int64_t n = n0; n < n1; n++)
                        q4_dot_part(a, m, (int)R, q + n * qs, s + n * ss, b0, b0 + span < nsb ? b0 + span : nsb,
                                    acc + (n - n0) * R);
                for (int64_t n = n0; n < n1; n++)
                    for (int r = 0; r < R; r++)
                        store(y, (m + r) * N + n, hsum8(acc[(n - n0) * R + r]), 1.0f, bias ? bias[n] : 0.0f, out_bf16);
                continue;
            }
#endif
            for (int64_t n = n0; n < n1; n++) {
                q4_dot(a, m, (int)R, q + n * qs, s + n * ss, o);
                for (int r = 0; r < R; r++) store(y, (m + r) * N + n, o[r], 1.0f, bias ? bias[n] : 0.0f, out_bf16);
            }
        }
    }
}

int q4_linear(const float *x, int64_t M, int64_t K, const uint8_t *q, const uint16_t *s, const float *bias,
              void *y, int64_t N, int out_bf16) {
    acts4_t a;
    int rc = acts4_init(&a, x, M, K, K);
    if (rc) return rc;
    q4_rows(&a, q, s, bias, y, N, out_bf16);
    acts4_free(&a);
    return 0;
}

/* ---- one decode step's attention ----------------------------------------------------------------------------
 * For B rows of one new token each, in fp32: rotary on the first rd channels of every q and k head (in place,
 * out = x cos + roll(x, rd/2) sin_signed, each product rounded as torch rounds it: built with
 * -ffp-contract=off), k and v written into the caches at position L, then per query head h (kv head
 * h / (H / KV)): softmax((q scale) . k_t for t <= L) weighted over v_t, into y (B, H hd). Replaces ~20 small torch
 * calls a layer, whose fixed costs weigh as much as the int8 weights at small models.
 * qkv: row b at qkv + b stride, q heads then k then v heads of hd each; kc, vc: (B, KV, max_len, hd), fp32, or
 * fp16 (kv16: half the cache's memory and reads, as llama.cpp's default f16 cache; k and v are rounded to fp16 when
 * written, and attention reads them back in fp32). */

/* One vector of fp32 lanes for the attention and GELU loops below, written once for both widths: 16 lanes with
   AVX-512F, 8 with AVX2 (each with its own e^x below); plain C loops finish what the vectors leave */
#if defined(__AVX512F__)
#define VW 16
typedef __m512 vec_t;
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_STORE(p, v) _mm512_storeu_ps(p, v)
#define V_SET1(x) _mm512_set1_ps(x)
#define V_ADD(a, b) _mm512_add_ps(a, b)
#define V_SUB(a, b) _mm512_sub_ps(a, b)
#define V_MUL(a, b) _mm512_mul_ps(a, b)
#define V_DIV(a, b) _mm512_div_ps(a, b)
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_SUM(v) _mm512_reduce_add_ps(v)
#define V_EXP(x) exp16(x)
#elif defined(__AVX2__)
#define VW 8
typedef __m256 vec_t;
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_STORE(p, v) _mm256_storeu_ps(p, v)
#define V_SET1(x) _mm256_set1_ps(x)
#define V_ADD(a, b) _mm256_add_ps(a, b)
#define V_SUB(a, b) _mm256_sub_ps(a, b)
#define V_MUL(a, b) _mm256_mul_ps(a, b)
#define V_DIV(a, b) _mm256_div_ps(a, b)
#define V_FMA(a, b, c) FMADD(a, b, c)
#define V_SUM(v) hsum8(v)
#define V_EXP(x) exp8(x)
#endif

#ifdef VW
/* e^r for |r| <= ln2 / 2: degree-6 Taylor polynomial, Horner's rule with multiply-adds */
static inline vec_t exp_poly(vec_t r) {
    vec_t p = V_SET1(1.0f / 720);
    p = V_FMA(p, r, V_SET1(1.0f / 120));
    p = V_FMA(p, r, V_SET1(1.0f / 24));
    p = V_FMA(p, r, V_SET1(1.0f / 6));
    p = V_FMA(p, r, V_SET1(0.5f));
    p = V_FMA(p, r, V_SET1(1.0f));
    return V_FMA(p, r, V_SET1(1.0f));
}
#endif

#if defined(__AVX512F__)
/* e^x for 16 lanes, ~1 ulp on the range softmax uses (x <= 0): 2^n e^r, |r| <= ln2 / 2, degree-6 polynomial */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f)); /* e^-104 underflows to 0 as expf does */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x); /* ln2 in two parts: r exact-ish */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    return _mm512_scalef_ps(exp_poly(r), n);
}
#elif defined(__AVX2__)
/* exp16's method for 8 lanes; 2^n built in the exponent bits: x <= -88 gives 0 (expf: a denormal below 1.2e-38,
   which softmax and GELU cannot tell from 0), x >= 88.8 gives inf as expf does */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.8f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); /* in [-127, 128] */
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693145752f))); /* exact: n has <= 8 bits */
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(1.42860677e-6f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(exp_poly(r), _mm256_castsi256_ps(e)); /* n = -127: 0; n = 128: the bits of inf */
}
#endif

/* s[t] = exp(s[t] - max) / sum, t < T */
static void softmax_row(float *s, int64_t T) {
    float mx = -INFINITY, sum = 0;
    for (int64_t t = 0; t < T; t++) mx = s[t] > mx ? s[t] : mx;
    int64_t t = 0;
#ifdef VW
    vec_t acc = V_SET1(0.0f), m = V_SET1(mx);
    for (; t + VW <= T; t += VW) {
        vec_t e = V_EXP(V_SUB(V_LOAD(s + t), m));
        V_STORE(s + t, e);
        acc = V_ADD(acc, e);
    }
    sum = V_SUM(acc);
#endif
    for (; t < T; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    float inv = 1.0f / sum;
    for (t = 0; t < T; t++) s[t] *= inv;
}

/* s[t] = q . K[t] for t < T (rows of hd floats) */
static void scores_row(const float *q, const float *K_, int64_t T, int64_t hd, float *s) {
    int64_t t = 0;
#ifdef VW
    if (hd % VW == 0) { /* four keys at a time: four independent multiply-add chains */
        for (; t + 4 <= T; t += 4) {
            const float *k = K_ + t * hd;
            vec_t a0 = V_SET1(0.0f), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t d = 0; d < hd; d += VW) {
                vec_t qd = V_LOAD(q + d);
                a0 = V_FMA(qd, V_LOAD(k + d), a0);
                a1 = V_FMA(qd, V_LOAD(k + hd + d), a1);
                a2 = V_FMA(qd, V_LOAD(k + 2 * hd + d), a2);
                a3 = V_FMA(qd, V_LOAD(k + 3 * hd + d), a3);
            }
            s[t] = V_SUM(a0), s[t + 1] = V_SUM(a1), s[t + 2] = V_SUM(a2), s[t + 3] = V_SUM(a3);
        }
        for (; t < T; t++) {
            vec_t a0 = V_SET1(0.0f);
            for (int64_t d = 0; d < hd; d += VW) a0 = V_FMA(V_LOAD(q + d), V_LOAD(K_ + t * hd + d), a0);
            s[t] = V_SUM(a0);
        }
    }
#endif
    for (; t < T; t++) {
        float acc = 0;
        for (int64_t d = 0; d < hd; d++) acc += q[d] * K_[t * hd + d];
        s[t] = acc;
    }
}

/* out = sum over t < T of s[t] V[t] (rows of hd floats), one vector of channels at a time in registers */
static void mix_row(const float *s, const float *V_, int64_t T, int64_t hd, float *out) {
    int64_t d = 0;
#ifdef VW
    for (; d + VW <= hd; d += VW) {
        vec_t a0 = V_SET1(0.0f), a1 = a0; /* two chains: the multiply-adds' latency hides */
        int64_t t = 0;
        for (; t + 2 <= T; t += 2) {
            a0 = V_FMA(V_SET1(s[t]), V_LOAD(V_ + t * hd + d), a0);
            a1 = V_FMA(V_SET1(s[t + 1]), V_LOAD(V_ + (t + 1) * hd + d), a1);
        }
        if (t < T) a0 = V_FMA(V_SET1(s[t]), V_LOAD(V_ + t * hd + d), a0);
        V_STORE(out + d, V_ADD(a0, a1));
    }
#endif
    for (; d < hd; d++) {
        float acc = 0;
        for (int64_t t = 0; t < T; t++) acc += s[t] * V_[t * hd + d];
        out[d] = acc;
    }
}

/* fp32 -> fp16 bits, rounded to nearest even as torch's .half() (overflow to inf, subnormals, NaN kept NaN) */
static inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000, a = u & 0x7fffffff;
    if (a >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (a > 0x7f800000 ? 0x200 : 0)); /* inf, NaN */
    if (a >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* >= 65520 rounds to inf */
    if (a < 0x38800000) { /* below 2^-14: a subnormal half, in units of 2^-24 (exact scaling, then RNE) */
        float v;
        memcpy(&v, &a, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(v * 16777216.0f)); /* 1024 is the smallest normal's bits */
    }
    uint32_t h = a - (112u << 23); /* exponent 127 bias -> 15 */
    return (uint16_t)(sign | ((h + 0xfff + ((h >> 13) & 1)) >> 13)); /* mantissa 23 -> 10 bits, nearest even */
}

/* n values between fp16 bits and fp32: F16C where the CPU has it (the same numbers) */
static void f16_row_to_f32(const uint16_t *h, float *f, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__) && defined(__AVX2__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) f[i] = f16_to_f32(h[i]);
}

static void f32_row_to_f16(const float *f, uint16_t *h, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__) && defined(__AVX2__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(f + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) h[i] = f32_to_f16(f[i]);
}

/* Partition [0, N) among nt threads: thread t takes [N t / nt, N (t + 1) / nt) */
static inline void part(int64_t N, int t, int nt, int64_t *lo, int64_t *hi) {
    *lo = N * t / nt, *hi = N * (t + 1) / nt;
}

/* Rotary on the first rd channels of kv head j's G query heads and of k head j in row (q heads, then k, then v);
   x[c] pairs with x[c -+ rd / 2], each product rounded as torch rounds it (-ffp-contract=off) */
static void rope_group(float *row, int64_t j, int64_t G, int64_t H, int64_t hd, int64_t rd, const float *cos,
                       const float *sin_signed) {
    int64_t half = rd / 2;
    for (int64_t i = 0; i <= G; i++) {
        float *x = row + (i < G ? j * G + i : H + j) * hd, tmp[rd > 0 ? rd : 1];
        memcpy(tmp, x, sizeof(float) * (size_t)rd);
        for (int64_t c = 0; c < half; c++) {
            float u = tmp[c] * cos[c], w = tmp[c + half] * sin_signed[c];
            x[c] = u + w;
        }
        for (int64_t c = half; c < rd; c++) {
            float u = tmp[c] * cos[c], w = tmp[c - half] * sin_signed[c];
            x[c] = u + w;
        }
    }
}

/* k and v of kv head j in row written into the caches' head (kh, vh: its max_len x hd rows) at position p:
   rounded to fp16 where kv16 */
static void cache_write(const float *row, int64_t j, int64_t H, int64_t KV, int64_t hd, void *kh, void *vh,
                        int kv16, int64_t p) {
    if (kv16) {
        f32_row_to_f16(row + (H + j) * hd, (uint16_t *)kh + p * hd, hd);
        f32_row_to_f16(row + (H + KV + j) * hd, (uint16_t *)vh + p * hd, hd);
    } else {
        memcpy((float *)kh + p * hd, row + (H + j) * hd, sizeof(float) * (size_t)hd);
        memcpy((float *)vh + p * hd, row + (H + KV + j) * hd, sizeof(float) * (size_t)hd);
    }
}

/* A head's positions 0..T-1 of keys and values in fp32: the cache itself (fp32), or read back into kvbuf (fp16) */
static void cache_read(void *kh, void *vh, int kv16, int64_t T, int64_t hd, float *kvbuf, const float **K_,
                       const float **V_) {
    if (kv16) {
        f16_row_to_f32((const uint16_t *)kh, kvbuf, T * hd);
        f16_row_to_f32((const uint16_t *)vh, kvbuf + T * hd, T * hd);
        *K_ = kvbuf, *V_ = kvbuf + T * hd;
    } else
        *K_ = (const float *)kh, *V_ = (const float *)vh;
}

/* y_h = softmax((q_h scale) . k_t, t < T) weighted over v_t, for query head h of row (scores: T floats) */
static void attend_head(const float *row, int64_t h, int64_t hd, float scale, const float *K_, const float *V_,
                        int64_t T, float *scores, float *y_h) {
    float qs[hd];
    for (int64_t c = 0; c < hd; c++) qs[c] = row[h * hd + c] * scale;
    scores_row(qs, K_, T, hd, scores);
    softmax_row(scores, T);
    mix_row(scores, V_, T, hd, y_h);
}

/* attend_step for the kv heads j in [j0, j1) and their query heads, every row b: the work of one thread.
   scores: T floats of scratch; kv16: the caches hold fp16 (kvbuf: 2 T hd floats of scratch for a head's keys and
   values in fp32), else fp32 (kvbuf unused). */
static void attend_groups(float *qkv, int64_t B, int64_t stride, int64_t H, int64_t KV, int64_t hd, int64_t rd,
                          const float *cos, const float *sin_signed, void *kc, void *vc, int kv16, int64_t max_len,
                          int64_t L, float scale, float *y, int64_t j0, int64_t j1, float *scores, float *kvbuf) {
    int64_t T = L + 1, G = H / KV, el = kv16 ? 2 : 4;
    for (int64_t b = 0; b < B; b++) {
        float *row = qkv + b * stride;
        for (int64_t j = j0; j < j1; j++) {
            rope_group(row, j, G, H, hd, rd, cos, sin_signed);
            int64_t head = (b * KV + j) * max_len * hd * el;
            char *kh = (char *)kc + head, *vh = (char *)vc + head;
            cache_write(row, j, H, KV, hd, kh, vh, kv16, L);
            const float *K_, *V_;
            cache_read(kh, vh, kv16, T, hd, kvbuf, &K_, &V_);
            for (int64_t h = j * G; h < (j + 1) * G; h++)
                attend_head(row, h, hd, scale, K_, V_, T, scores, y + b * H * hd + h * hd);
        }
    }
}

/* The kv heads [j0, j1) of the calling thread of a parallel region (all KV outside one) */
static void thread_heads(int64_t KV, int64_t *j0, int64_t *j1) {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num(), nt = omp_get_num_threads();
#endif
    part(KV, t, nt, j0, j1);
}

int attend_step(float *qkv, int64_t B, int64_t stride, int64_t H, int64_t KV, int64_t hd, int64_t rd,
                const float *cos, const float *sin_signed, void *kc, void *vc, int kv16, int64_t max_len, int64_t L,
                float scale, float *y) {
    int64_t T = L + 1;
    int failed = 0;
    /* kv heads over threads unless the work is tiny: the caches come from memory (a step's weights evicted them),
       which one core reads at a fraction of what two do (phi-2, 48 positions: 150 us a layer on one thread) */
#pragma omp parallel if (B * H * T * hd > 16384)
    {
        int64_t j0, j1;
        thread_heads(KV, &j0, &j1);
        float *scores = (float *)malloc(sizeof(float) * (size_t)T);
        float *kvbuf = kv16 ? (float *)malloc(sizeof(float) * (size_t)(2 * T * hd)) : NULL;
        if (scores && (kvbuf || !kv16))
            attend_groups(qkv, B, stride, H, KV, hd, rd, cos, sin_signed, kc, vc, kv16, max_len, L, scale, y, j0,
                          j1, scores, kvbuf);
        else {
#pragma omp atomic write
            failed = 1;
        }
        free(scores), free(kvbuf);
    }
    return failed ? -1 : 0;
}

#define QT 4 /* query rows a prompt's attention tile computes together */
#ifdef VW
/* Query rows i0..i0+R-1 (R <= QT; row i at position L + i sees keys 0..L+i) of query head h: scores against KT
   (hd x Sp: the head's keys transposed, zero past S), softmax, then the weighted sum of V_ (S x hd) into y. A tile
   reads each key and value once for its rows, and the keys' layout gives VW scores a vector with no horizontal
   sums; 2 vectors of keys (scores) or 2 positions (values) a step: 8 independent multiply-add chains. s: QT x Sp
   scratch, qs: QT x hd. hd a multiple of VW. */
static void attend_tile(const float *qkv, int64_t stride, int64_t i0, int R, int64_t h, int64_t hd, float scale,
                        const float *KT, int64_t Sp, const float *V_, int64_t L, float *s, float *qs, float *y,
                        int64_t yld) {
    int64_t n[QT], nmax = L + i0 + R, nv = (nmax + 2 * VW - 1) / (2 * VW) * (2 * VW);
    for (int r = 0; r < QT; r++) {
        n[r] = L + i0 + r + 1;
        for (int64_t c = 0; c < hd; c++) qs[r * hd + c] = r < R ? qkv[(i0 + r) * stride + h * hd + c] * scale : 0.0f;
    }
    for (int64_t t = 0; t < nv; t += 2 * VW) {
        vec_t a[QT], b[QT];
        for (int r = 0; r < QT; r++) a[r] = b[r] = V_SET1(0.0f);
        for (int64_t c = 0; c < hd; c++) {
            vec_t k0 = V_LOAD(KT + c * Sp + t), k1 = V_LOAD(KT + c * Sp + t + VW);
            for (int r = 0; r < QT; r++) {
                vec_t q = V_SET1(qs[r * hd + c]);
                a[r] = V_FMA(q, k0, a[r]), b[r] = V_FMA(q, k1, b[r]);
            }
        }
        for (int r = 0; r < QT; r++) V_STORE(s + r * Sp + t, a[r]), V_STORE(s + r * Sp + t + VW, b[r]);
    }
    for (int r = 0; r < R; r++) {
        softmax_row(s + r * Sp, n[r]);
        for (int64_t t = n[r]; t < nmax; t++) s[r * Sp + t] = 0.0f; /* keys after the row's own position */
    }
    for (int64_t d = 0; d < hd; d += VW) {
        vec_t a[QT], b[QT];
        for (int r = 0; r < QT; r++) a[r] = b[r] = V_SET1(0.0f);
        int64_t t = 0;
        for (; t + 2 <= nmax; t += 2) {
            vec_t v0 = V_LOAD(V_ + t * hd + d), v1 = V_LOAD(V_ + (t + 1) * hd + d);
            for (int r = 0; r < QT; r++)
                a[r] = V_FMA(V_SET1(s[r * Sp + t]), v0, a[r]), b[r] = V_FMA(V_SET1(s[r * Sp + t + 1]), v1, b[r]);
        }
        if (t < nmax) {
            vec_t v0 = V_LOAD(V_ + t * hd + d);
            for (int r = 0; r < QT; r++) a[r] = V_FMA(V_SET1(s[r * Sp + t]), v0, a[r]);
        }
        for (int r = 0; r < R; r++) V_STORE(y + (i0 + r) * yld + h * hd + d, V_ADD(a[r], b[r]));
    }
}
#endif

/* A prompt's attention: T new tokens of one sequence (rows of qkv, stride apart) at positions L..L+T-1, each as
   attend_step's row at its own position (cos, sin_signed: T rows of rd), the token at L + i seeing positions
   0..L+i: rotary, k and v into the caches (1, KV, max_len, hd), attention into y (T, H hd). kv heads over threads;
   each head's keys and values are read back once for all its queries, which go QT at a time (attend_tile) where
   hd is a multiple of the vector width, else one at a time as attend_step's. 0, or -1 out of memory. */
int attend_prefill(float *qkv, int64_t T, int64_t stride, int64_t H, int64_t KV, int64_t hd, int64_t rd,
                   const float *cos, const float *sin_signed, void *kc, void *vc, int kv16, int64_t max_len,
                   int64_t L, float scale, float *y) {
    int64_t S = L + T, G = H / KV, el = kv16 ? 2 : 4;
    int tiled = 0;
#ifdef VW
    tiled = hd % VW == 0;
    const int64_t Sp = (S + 2 * VW - 1) / (2 * VW) * (2 * VW);
#else
    const int64_t Sp = S;
#endif
    int failed = 0;
#pragma omp parallel if (T * H * S * hd > 16384)
    {
        int64_t j0, j1;
        thread_heads(KV, &j0, &j1);
        float *scores = (float *)malloc(sizeof(float) * (size_t)(QT * Sp + QT * hd)); /* QT rows, and their q */
        float *kvbuf = kv16 ? (float *)malloc(sizeof(float) * (size_t)(2 * S * hd)) : NULL;
        float *KT = tiled ? (float *)aligned_alloc(64, sizeof(float) * (size_t)((hd * Sp + 15) / 16 * 16)) : NULL;
        if (scores && (kvbuf || !kv16) && (KT || !tiled))
            for (int64_t j = j0; j < j1; j++) {
                char *kh = (char *)kc + j * max_len * hd * el, *vh = (char *)vc + j * max_len * hd * el;
                for (int64_t i = 0; i < T; i++) {
                    rope_group(qkv + i * stride, j, G, H, hd, rd, cos + i * rd, sin_signed + i * rd);
                    cache_write(qkv + i * stride, j, H, KV, hd, kh, vh, kv16, L + i);
                }
                const float *K_, *V_;
                cache_read(kh, vh, kv16, S, hd, kvbuf, &K_, &V_);
#ifdef VW
                if (tiled) {
                    for (int64_t c = 0; c < hd; c++)
                        for (int64_t p = 0; p < Sp; p++) KT[c * Sp + p] = p < S ? K_[p * hd + c] : 0.0f;
                    for (int64_t h = j * G; h < (j + 1) * G; h++)
                        for (int64_t i = 0; i < T; i += QT)
                            attend_tile(qkv, stride, i, T - i < QT ? (int)(T - i) : QT, h, hd, scale, KT, Sp, V_, L,
                                        scores, scores + QT * Sp, y, H * hd);
                    continue;
                }
#endif
                for (int64_t h = j * G; h < (j + 1) * G; h++)
                    for (int64_t i = 0; i < T; i++)
                        attend_head(qkv + i * stride, h, hd, scale, K_, V_, L + i + 1, scores, y + i * H * hd + h * hd);
            }
        else {
#pragma omp atomic write
            failed = 1;
        }
        free(scores), free(kvbuf), free(KT);
    }
    return failed ? -1 : 0;
}

/* ---- a decode step's whole stack of int8 or int4 layers (fp32 activations) -------------------------------------
 * Per layer x <- x + dense(attention(rotary(q, k), v)) + fc2(gelu(fc1(h))), h = LayerNorm(x), for B rows of one
 * new token: Phi's parallel block, as DecodePlan.step does it in torch, with LayerNorm and GELU in fp32 here
 * (within a few ulp of torch's). All layers run in one parallel region, each thread on its share of every matmul
 * and of the work between them, so no thread waits while another does serial work, and a thread reads what
 * another wrote only where it must (the full activation rows each matmul needs): when the VM's two cores sit on
 * separate memory links, a core-to-core round trip takes ~0.5 us, and the serial steps between one-layer calls
 * had cost ~10 % of a 100M model's step (this layout gained ~5 % there, nothing measurable at 1.4B). Every
 * thread computes LayerNorm, the residual stream and the quantized rows of h and y itself (cheaper than sharing
 * them). The matmuls' rows are shared out in units (see share_t below: a thread that finishes early takes work
 * from another); GELU runs on each unit of fc1 rows as it is done (units are whole GELU vectors, so the numbers
 * are the whole row's) and records its max |g|; after the barrier each thread quantizes a fixed part of g: int8
 * from the row's max over all units, int4 (fmt 1, the q4 format above) its super-blocks (q4 activation blocks are
 * local), and h and y are quantized per block of 64 slots by every thread, as q4_linear does. Attention is split
 * by kv head. The result does not depend on the number of threads or on who ran which unit. */
typedef struct {
    int64_t d, H, KV, hd, rd, inter, gelu_tanh, fmt; /* fmt 0: int8 rows, fp32 row scales; 1: q4 */
    float eps, scale;
    const float *ln_w, *ln_b;
    const void *q1; /* q, k, v and fc1 fused: ((H + 2 KV) hd + inter, d) codes */
    const void *s1; /* their scales: fp32 a row (int8) or fp16 a group (q4) */
    const float *b1;
    const void *qd, *sd; /* dense: (d, H hd) */
    const float *bd;
    const void *q2, *s2; /* fc2: (d, inter) */
    const float *b2;
} layer_t; /* the caches are decode_layers' arguments */

/* A layer's activation rows quantized for its format (only the one it uses is allocated) */
typedef struct {
    int fmt;
    acts_t a8;
    acts4_t a4;
} qacts_t;

static int qacts_alloc(qacts_t *a, int fmt, int64_t M, int64_t K) {
    a->fmt = fmt;
    return fmt ? acts4_alloc(&a->a4, M, K, 0) : acts_alloc(&a->a8, M, K, 0);
}

static void qacts_free(qacts_t *a) {
    if (a->fmt) acts4_free(&a->a4);
    else acts_free(&a->a8);
}

static int qacts_fill(qacts_t *a, const float *x, int64_t ldx) {
    return a->fmt ? acts4_fill(&a->a4, x, ldx) : acts_fill(&a->a8, x, ldx);
}

/* out[m] = output r of a linear layer (codes q, scales s, bias or NULL) for the B activation rows of a, fp32 */
static inline void q_out(const qacts_t *a, const void *q, const void *s, const float *bias, int64_t r, int64_t B,
                         float *out) {
    float b = bias ? bias[r] : 0.0f;
    if (a->fmt) {
        const acts4_t *a4 = &a->a4;
        const uint8_t *qn = (const uint8_t *)q + r * (a4->Kp / 2);
        const uint16_t *sn = (const uint16_t *)s + r * q4_scales_per_row(a4->nv);
        for (int64_t m = 0, R; m < B; m += R) { /* up to Q4_ROWS rows on one read of the weight row, as q4_rows */
            R = B - m >= Q4_ROWS ? Q4_ROWS : B - m >= 4 ? 4 : B - m;
            q4_dot(a4, m, (int)R, qn, sn, out + m);
            for (int i = 0; i < R; i++) out[m + i] += b;
        }
    } else
        for (int64_t m = 0; m < B; m++) out[m] = q8_out(&a->a8, m, (const int8_t *)q, (const float *)s, bias, r);
}

static void gelu_inplace(float *g, int64_t n, int tanh_approx) {
    const float c = 0.7978845608028654f, kappa = 0.044715f; /* sqrt(2 / pi) */
    int64_t i = 0;
    if (tanh_approx) {
#ifdef VW
        /* tanh(u) = 1 - 2 / (e^{2u} + 1): exact at both tails (e^{2u} -> inf or 0) */
        const vec_t one = V_SET1(1.0f), two = V_SET1(2.0f), half = V_SET1(0.5f);
        for (; i + VW <= n; i += VW) {
            vec_t x = V_LOAD(g + i);
            vec_t u = V_MUL(V_SET1(c), V_ADD(x, V_MUL(V_SET1(kappa), V_MUL(x, V_MUL(x, x)))));
            vec_t t = V_SUB(one, V_DIV(two, V_ADD(V_EXP(V_MUL(two, u)), one)));
            V_STORE(g + i, V_MUL(V_MUL(half, x), V_ADD(one, t)));
        }
#endif
        for (; i < n; i++) {
            float x = g[i];
            g[i] = 0.5f * x * (1.0f + tanhf(c * (x + kappa * x * x * x)));
        }
    } else {
        for (; i < n; i++) g[i] = 0.5f * g[i] * (1.0f + erff(g[i] * 0.70710678118654752f));
    }
}

/* dst (M, N) = GELU of src's rows (row m at src + m ld): prefill's fc1 output read where the fused projection left
   it (beside q, k and v) and written contiguous for fc2, with decode_layers' numbers; rows over threads */
void gelu_rows(const float *src, int64_t ld, int64_t M, int64_t N, float *dst, int tanh_approx) {
#pragma omp parallel for schedule(static) if (M * N > 65536)
    for (int64_t m = 0; m < M; m++) {
        memcpy(dst + m * N, src + m * ld, sizeof(float) * (size_t)N);
        gelu_inplace(dst + m * N, N, tanh_approx);
    }
}

/* LayerNorm of B rows of d: mean and biased variance in two passes, as torch's CPU kernel */
static void layer_norm(const float *x, int64_t B, int64_t d, const float *w, const float *bias, float eps, float *h) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * d;
        float *hb = h + b * d;
        double mean = 0, var = 0;
        for (int64_t k = 0; k < d; k++) mean += xb[k];
        mean /= (double)d;
        for (int64_t k = 0; k < d; k++) var += ((double)xb[k] - mean) * ((double)xb[k] - mean);
        float m = (float)mean, rstd = (float)(1.0 / sqrt(var / (double)d + (double)eps));
        for (int64_t k = 0; k < d; k++) hb[k] = (xb[k] - m) * rstd * w[k] + bias[k];
    }
}

/* Work sharing inside decode_layers. A matmul phase (q|k|v then fc1 rows; dense then fc2 rows) is cut in units of
   UNIT rows; each thread owns a contiguous share of the units and takes them front to back (one stream through
   memory: its software prefetch runs on into the next unit), and a thread whose share is done takes units from
   the back of another's. Owner and thief claim a unit with one compare-and-swap on the share's (front, back) word,
   so every unit runs exactly once, whoever runs it, and gives the same numbers. Why: the shares are equal in
   bytes, but on a VM two cores do not stream equally fast at every moment (another guest, a kernel thread), and
   with fixed shares each of a layer's barriers waits for the slower one. */
#define UNIT 16 /* rows: a multiple of GELU's vector width, so units give the numbers of the whole row */

typedef struct {
    _Alignas(64) uint64_t w; /* units [front, back) not yet taken: front in the low 32 bits, back in the high */
    int64_t a0, na, b0; /* local unit j < na: unit a0 + j of the phase's first matrix, else b0 + j - na of its second */
} share_t;

/* Give thread t of tn its share of a phase: parts of the na units of the first matrix and the nb of the second */
static void share_init(share_t *s, int t, int tn, int64_t na, int64_t nb) {
    int64_t a0, a1, b0, b1;
    part(na, t, tn, &a0, &a1);
    part(nb, t, tn, &b0, &b1);
    s->a0 = a0, s->na = a1 - a0, s->b0 = b0;
    __atomic_store_n(&s->w, (uint64_t)(a1 - a0 + b1 - b0) << 32, __ATOMIC_RELAXED);
}

/* Claim a unit of share s, from its front (its owner) or its back (another thread): the local index, or -1 */
static int64_t share_claim(share_t *s, int front) {
    uint64_t w = __atomic_load_n(&s->w, __ATOMIC_RELAXED);
    for (;;) {
        uint64_t lo = w & 0xffffffffu, hi = w >> 32;
        if (lo >= hi) return -1;
        uint64_t nw = front ? w + 1 : w - ((uint64_t)1 << 32);
        if (__atomic_compare_exchange_n(&s->w, &w, nw, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return (int64_t)(front ? lo : hi - 1);
    }
}

/* Thread t's next unit of a phase: its own share first, then the others' backs. 0 when none is left, else 1 with
   *second (which matrix) and *u (the unit in it). */
static int next_unit(share_t *sh, int t, int tn, int *second, int64_t *u) {
    for (int k = 0; k < tn; k++) {
        share_t *s = sh + (t + k) % tn;
        int64_t j = share_claim(s, k == 0);
        if (j >= 0) {
            *second = j >= s->na;
            *u = *second ? s->b0 + j - s->na : s->a0 + j;
            return 1;
        }
    }
    return 0;
}

/* Layer i reads caches kc[i], vc[i] (B, KV, max_len, hd), fp16 if kv16 else fp32; all layers have the first one's
   shapes and format.
   Returns how many layers ran: n, or i when layer i declined for inf/NaN in an activation (x is as layer i found
   it; its cache slot at L may be written: the caller's torch path rewrites it); -1 out of memory. */
int64_t decode_layers(const layer_t *layers, int64_t n, void *const *kc, void *const *vc, int kv16, int64_t max_len,
                      float *x, int64_t B, int64_t L, const float *cos, const float *sin_signed) {
    if (n <= 0) return 0;
    const layer_t *P0 = layers;
    const int fmt = (int)P0->fmt;
    int64_t d = P0->d, H = P0->H, KV = P0->KV, hd = P0->hd, inter = P0->inter, Hh = H * hd;
    int64_t qkvw = (H + 2 * KV) * hd, N1 = qkvw + inter, T = L + 1;
    int64_t nq = (qkvw + UNIT - 1) / UNIT, ng = (inter + UNIT - 1) / UNIT, nd = (d + UNIT - 1) / UNIT;
    int64_t nsb = (inter + 255) / 256; /* int4: g's super-blocks */
    int par = B * d * (N1 + Hh + inter) > 131072; /* else one thread: a fork costs more than it saves */
    int nt = 1;
#ifdef _OPENMP
    if (par) nt = omp_get_max_threads();
#endif
    /* shared: the projection's output (q, k, v, then g), attention output y, dense and fc2 outputs, g quantized,
       the threads' shares of the two matmul phases */
    float *qkv = malloc(sizeof(float) * (size_t)(B * N1)), *y = malloc(sizeof(float) * (size_t)(B * Hh));
    float *att = malloc(sizeof(float) * (size_t)(B * d)), *f2 = malloc(sizeof(float) * (size_t)(B * d));
    float *gmax = calloc((size_t)(ng * B), sizeof(float)); /* per unit of g, per row: max |g| (int8's row scale) */
    int *bad = calloc((size_t)nt, sizeof(int));             /* per thread: inf/NaN in the units of g it ran */
    share_t *sa = aligned_alloc(64, sizeof(share_t) * (size_t)nt);
    share_t *sb = aligned_alloc(64, sizeof(share_t) * (size_t)nt);
    qacts_t ag = {0};
    int has_ag = qkv && y && att && f2 && gmax && bad && sa && sb && !qacts_alloc(&ag, fmt, B, inter);
    int64_t nb = fmt ? 0 : ag.a8.nb;
    int32_t *hcp = has_ag ? calloc((size_t)(nt * B * nb * 16) + 1, sizeof(int32_t)) : NULL; /* int8 (VNNI), per
                                                                  thread and row: its part's share of ag's hc */
    int ok = has_ag && hcp;
    int64_t ran = n;
    int oom = !ok;
#pragma omp parallel num_threads(nt) if (par && ok)
    {
        int t = 0, tn = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), tn = omp_get_num_threads();
#endif
        /* this thread's own: the residual stream xr (every thread keeps the same numbers: no shared writes), h and
           its quantized rows, y's quantized rows; int8: g's row scales and sign corrections (agt: the shared codes
           with them); int4: a gather buffer for its part of g */
        qacts_t ah, ay, agt = ag;
        float *xr = malloc(sizeof(float) * (size_t)(B * d)), *h = malloc(sizeof(float) * (size_t)(B * d));
        float *sxg = malloc(sizeof(float) * (size_t)B);
        int32_t *hcg = malloc(sizeof(int32_t) * (size_t)(B * nb * 16) + 1);
        float *scores = malloc(sizeof(float) * (size_t)T), *out = malloc(sizeof(float) * (size_t)B);
        float *xs = fmt ? malloc(sizeof(float) * (size_t)ag.a4.Kp) : NULL;
        float *kvbuf = kv16 ? malloc(sizeof(float) * (size_t)(2 * T * hd)) : NULL;
        int mine = ok && xr && h && sxg && hcg && scores && out && (xs || !fmt) && (kvbuf || !kv16) &&
                   !qacts_alloc(&ah, fmt, B, d);
        if (mine && qacts_alloc(&ay, fmt, B, Hh)) {
            qacts_free(&ah);
            mine = 0;
        }
        if (!fmt) agt.a8.sx = sxg, agt.a8.hc = hcg;
        if (mine) {
            memcpy(xr, x, sizeof(float) * (size_t)(B * d));
            share_init(sa + t, t, tn, nq, ng);
            share_init(sb + t, t, tn, nd, nd);
        } else { /* every thread allocates before the first barrier, so a failure is known to all in time */
#pragma omp atomic write
            oom = 1;
        }
#pragma omp barrier
        int64_t g0, g1, s0, s1, j0, j1; /* this thread's static parts: g's elements (int8; in 64s, as VNNI's sign
                                           corrections add them) or super-blocks (int4) to quantize, kv heads */
        part((inter + 63) / 64, t, tn, &g0, &g1);
        g0 *= 64, g1 = g1 * 64 < inter ? g1 * 64 : inter;
        part(nsb, t, tn, &s0, &s1);
        part(KV, t, tn, &j0, &j1);
        int second;
        int64_t u;
        for (int64_t i = 0; i < n && !oom; i++) {
            const layer_t *P = layers + i;
            layer_norm(xr, B, d, P->ln_w, P->ln_b, P->eps, h);
            if (qacts_fill(&ah, h, d)) { /* every thread sees the same h, so all stop here together */
                if (t == 0) ran = i;
                break;
            }
            /* q, k, v rows, then fc1 rows with GELU and the max |g| of each unit */
            bad[t] = 0;
            while (next_unit(sa, t, tn, &second, &u)) {
                int64_t r0 = (second ? qkvw : 0) + u * UNIT, r1 = second ? qkvw + inter : qkvw;
                r1 = r0 + UNIT < r1 ? r0 + UNIT : r1;
                for (int64_t r = r0; r < r1; r++) {
                    q_out(&ah, P->q1, P->s1, P->b1, r, B, out);
                    for (int64_t m = 0; m < B; m++) qkv[m * N1 + r] = out[m];
                }
                for (int64_t m = 0; m < B && second; m++) {
                    float *g = qkv + m * N1;
                    gelu_inplace(g + r0, r1 - r0, (int)P->gelu_tanh);
                    gmax[u * B + m] = 0;
                    bad[t] |= absmax_range(g, r0, r1, gmax + u * B + m) != 0;
                }
            }
#pragma omp barrier
            share_init(sa + t, t, tn, nq, ng); /* for the next layer: nobody claims from sa until then */
            int any = 0;
            for (int v = 0; v < tn; v++) any |= bad[v];
            if (any) { /* inf/NaN in g: every thread read the same flags, so all stop here together */
                if (t == 0) ran = i;
                break;
            }
            for (int64_t m = 0; m < B; m++) { /* g quantized: this thread's static part of it */
                float *g = qkv + m * N1 + qkvw;
                if (fmt) { /* int4: its super-blocks (finite: checked above) */
                    if (s0 < s1) acts4_part(&ag.a4, g, m, xs, s0, s1);
                    continue;
                }
                float mx = 0; /* int8: the row scale from every unit's max */
                for (int64_t v = 0; v < ng; v++) mx = gmax[v * B + m] > mx ? gmax[v * B + m] : mx;
                sxg[m] = row_scale(mx);
                quantize_range(g, g0, g1, sxg[m], ag.a8.xq + m * inter);
#ifdef VNNI
                int64_t k1 = g1 < ag.a8.K64 ? g1 : ag.a8.K64; /* bytes beyond K64 are read from xq (dot_tail) */
                int32_t *hc = hcp + (t * B + m) * nb * 16;
                memset(hc, 0, sizeof(int32_t) * (size_t)(nb * 16));
                if (g0 < k1) {
                    split_range(ag.a8.xq + m * inter, g0, k1, ag.a8.lo + m * ag.a8.K64, ag.a8.hi + m * ag.a8.K64);
                    hc_add(ag.a8.hi + m * ag.a8.K64, g0, k1, hc);
                }
#endif
            }
            attend_groups(qkv, B, N1, H, KV, hd, P->rd, cos, sin_signed, kc[i], vc[i], kv16, max_len, L, P->scale,
                          y, j0, j1, scores, kvbuf);
#pragma omp barrier
#ifdef VNNI
            for (int64_t e = 0; e < B * nb * 16; e++) { /* g's sign corrections: the threads' exact int sums */
                int64_t m = e / (nb * 16), r = e % (nb * 16);
                int32_t c = 0;
                for (int v = 0; v < tn; v++) c += hcp[(v * B + m) * nb * 16 + r];
                hcg[e] = c;
            }
#endif
            if (qacts_fill(&ay, y, Hh)) { /* every thread sees the same y */
                if (t == 0) ran = i;
                break;
            }
            /* dense(y) rows, then fc2(g) rows (a share streams one matrix, then the other) */
            while (next_unit(sb, t, tn, &second, &u)) {
                int64_t r0 = u * UNIT, r1 = r0 + UNIT < d ? r0 + UNIT : d;
                for (int64_t r = r0; r < r1; r++) {
                    if (second) q_out(&agt, P->q2, P->s2, P->b2, r, B, out);
                    else q_out(&ay, P->qd, P->sd, P->bd, r, B, out);
                    for (int64_t m = 0; m < B; m++) (second ? f2 : att)[m * d + r] = out[m];
                }
            }
#pragma omp barrier
            share_init(sb + t, t, tn, nd, nd); /* (the loop runs only when every thread allocated) */
            for (int64_t e = 0; e < B * d; e++) xr[e] = att[e] + f2[e] + xr[e]; /* residual, in the modules' order */
        }
        if (t == 0 && !oom) memcpy(x, xr, sizeof(float) * (size_t)(B * d)); /* x as the last layer run left it */
        if (mine) qacts_free(&ah), qacts_free(&ay);
        free(xr), free(h), free(sxg), free(hcg), free(scores), free(out), free(xs), free(kvbuf);
    }
    if (has_ag) qacts_free(&ag);
    free(qkv), free(y), free(att), free(f2), free(gmax), free(bad), free(sa), free(sb), free(hcp);
    return oom ? -1 : ran;
}

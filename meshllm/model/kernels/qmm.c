/* meshllm's CPU kernels: quantized linears, attention and the small ops of a decoder layer,
 * with one numerics for every shape and every instruction set.
 *
 * The rule that makes a row's result independent of the batch, the chunk and the CPU:
 * every output element is computed by one fixed sequence of IEEE float operations, whatever
 * tile it falls in, whatever the number of rows (M) and threads, and whichever of the paths
 * below computes it (portable C, AVX2, AVX-512, NEON). Integer dot products are exact in any
 * order, so the SIMD paths only have to reproduce the float part of the portable definitions:
 *
 *   activations, per row and block of 32:  d = amax / 127, q = round_even(x * (1 / d)),
 *                                          s = d * sum(q)
 *   int4 weights (w = scale * c + mn, c in 0..15; scale and mn float16) and int8 weights
 *   (w = scale * c; scale float32, one a block or one a row):
 *       lane l of 8, for each block b in order:
 *           I = sum of c[32b + j] * q[32b + j] for j in 4l .. 4l + 3      (exact int32)
 *           acc[l] = fma(scale[b] * d[b], (float) I, acc[l])
 *       int4 also: minacc[b % 8] = fma(mn[b], s[b], minacc[b % 8]) for b < G rounded up to a
 *       multiple of 8, s padded with zeros (mn is read on into the next row, or 8 spare zeros
 *       after the last: finite values times zero);  y = hsum8(acc) (+ hsum8(minacc))
 *   float weights (f32 or f16): acc[k % 8] = fma(x[k], w[k], acc[k % 8]) over k padded to a
 *       multiple of 8 with zeros; y = hsum8(acc)
 *   hsum8(a) = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
 *
 * Attention keeps a fixed order per query position (scores in key order, a sequential
 * softmax sum, values summed in key order), so a position gets the same bits from a KV
 * cache as from a causal chunk. exp is our own polynomial, the same on every CPU.
 *
 * Build: cc -O3 -fPIC -shared -ffp-contract=off [-fopenmp] [-mavx2 -mfma -mf16c]. Without
 * -ffp-contract=off a compiler may fuse a * b + c differently in different paths.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MQ_AVX2 1
/* u8 x s8 dot products of 4 bytes into 8 int32 lanes: VNNI's one instruction, or AVX2's two
 * (maddubs never saturates here: |c| <= 15 or 127 and |q| <= 127), the same integers */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define MQ_ISA "avx512vnni"
#define MQ_AVX512 1
#define MQ_DOT_U8S8(w, x) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (w), (x))
#elif defined(__AVXVNNI__)
#define MQ_ISA "avxvnni"
#define MQ_DOT_U8S8(w, x) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), (w), (x))
#else
#define MQ_ISA "avx2"
#define MQ_DOT_U8S8(w, x) _mm256_madd_epi16(_mm256_maddubs_epi16((w), (x)), _mm256_set1_epi16(1))
#endif
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define MQ_NEON 1
#if defined(__ARM_FEATURE_DOTPROD)
#define MQ_ISA "neon-dotprod"
#else
#define MQ_ISA "neon"
#endif
#else
#define MQ_ISA "portable"
#endif

#ifdef _OPENMP
#include <omp.h>
#define MQ_PARALLEL_FOR(nt, n) _Pragma("omp parallel for num_threads(nt) schedule(static) if(nt > 1)")
#else
#define MQ_PARALLEL_FOR(nt, n)
#endif

#define QK 32

const char *mq_isa(void) { return MQ_ISA; }
int mq_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------------- */
/* scalar building blocks (the definitions)                                                  */

static inline float hsum8_ref(const float *a) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

static inline float exp_ref(float x) {
    if (!(x > -87.0f)) x = -87.0f; /* NaN too: a NaN score would poison the row anyway */
    if (x > 88.0f) x = 88.0f;
    float n = nearbyintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693145751953125f, x);
    r = fmaf(n, -1.428606765330187045e-06f, r);
    float z = r * r;
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    float y = fmaf(p, z, r) + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return y * two_n;
}

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---------------------------------------------------------------------------------------- */
/* activations                                                                               */

static void quantize_row_ref(const float *x, int64_t K, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float db = amax / 127.0f;
        float id = db != 0.0f ? 1.0f / db : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int v = (int)nearbyintf(xb[j] * id);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            q[b * QK + j] = (int8_t)v;
            sum += v;
        }
        d[b] = db;
        s[b] = db * (float)sum;
    }
}

#ifdef MQ_AVX2
static inline float hsum8_avx(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); /* a_i + a_{i+4} */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                           /* (0+4)+(2+6), (1+5)+(3+7) */
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* exp_ref on 8 lanes: the same operations in the same order */
static inline __m256 exp8_avx(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f)); /* NaN -> -87, as exp_ref */
    x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693145751953125f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-1.428606765330187045e-06f), r);
    __m256 z = _mm256_mul_ps(r, r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, z, r), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

static void quantize_row_fast(const float *x, int64_t K, int8_t *q, float *d, float *s) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v0), _mm256_andnot_ps(signbit, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(signbit, v2), _mm256_andnot_ps(signbit, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float db = amax / 127.0f;
        float id = db != 0.0f ? 1.0f / db : 0.0f;
        __m256 mul = _mm256_set1_ps(id);
        const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), rnd));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), rnd));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), rnd));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), rnd));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        /* pack to int8 in order: packs interleaves 128-bit lanes, the permute undoes it */
        __m256i p01 = _mm256_packs_epi32(i0, i1), p23 = _mm256_packs_epi32(i2, i3);
        __m256i p = _mm256_packs_epi16(p01, p23);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + b * QK), p);
        d[b] = db;
        s[b] = db * (float)_mm_cvtsi128_si32(s4);
    }
}
#elif defined(MQ_NEON)
static inline float hsum8_neon(float32x4_t lo, float32x4_t hi) {
    float32x4_t s = vaddq_f32(lo, hi); /* a_i + a_{i+4} */
    float a0 = vgetq_lane_f32(s, 0), a1 = vgetq_lane_f32(s, 1), a2 = vgetq_lane_f32(s, 2), a3 = vgetq_lane_f32(s, 3);
    return (a0 + a2) + (a1 + a3);
}

static void quantize_row_fast(const float *x, int64_t K, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        float32x4_t v[8];
        float32x4_t m = vdupq_n_f32(0.0f);
        for (int i = 0; i < 8; i++) {
            v[i] = vld1q_f32(xb + 4 * i);
            m = vmaxq_f32(m, vabsq_f32(v[i]));
        }
        float amax = vmaxvq_f32(m);
        float db = amax / 127.0f;
        float id = db != 0.0f ? 1.0f / db : 0.0f;
        int32x4_t sum = vdupq_n_s32(0);
        int32_t tmp[32];
        for (int i = 0; i < 8; i++) {
            int32x4_t r = vcvtnq_s32_f32(vmulq_n_f32(v[i], id));
            r = vmaxq_s32(vminq_s32(r, vdupq_n_s32(127)), vdupq_n_s32(-127));
            sum = vaddq_s32(sum, r);
            vst1q_s32(tmp + 4 * i, r);
        }
        for (int j = 0; j < QK; j++) q[b * QK + j] = (int8_t)tmp[j];
        d[b] = db;
        s[b] = db * (float)vaddvq_s32(sum);
    }
}
#endif

static void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, float *d, float *s, int64_t Gs, int nt,
                          int ref) {
    int64_t G = K / QK;
    (void)ref; /* no SIMD path to skip in the portable build */
    MQ_PARALLEL_FOR(nt, M)
    for (int64_t m = 0; m < M; m++) {
#if defined(MQ_AVX2) || defined(MQ_NEON)
        if (!ref) {
            quantize_row_fast(x + m * K, K, q + m * K, d + m * G, s + m * Gs);
            continue;
        }
#endif
        quantize_row_ref(x + m * K, K, q + m * K, d + m * G, s + m * Gs);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* quantized matrix products: reference                                                      */

/* Weight layout: rows in quads, so that the four rows a tile reads are one stream. Block b of
 * row n sits at  c + ((n / 4) * G + b) * 4 * BR + (n % 4) * BR,  BR = 16 bytes (int4: byte j
 * holds value j in its low nibble and value j + 16 in its high one) or 32 (int8, in order);
 * the storage holds the rows rounded up to a multiple of 4. Block scales the same way:
 * sc[((n / 4) * G + b) * 4 + n % 4]; int8 may instead have one scale a row, sc[n]. int4's
 * offsets are row-major: mn[n * G + b]. The functions below take a row's first block (c),
 * the stride from block to block (4 * BR), and the scale's strides. */

static float dot_q4_ref(const int8_t *xq, const float *xd, const float *xs, int64_t G,
                        const uint8_t *c, const uint16_t *sc, const uint16_t *mn) {
    float acc[8] = {0}, macc[8] = {0};
    for (int64_t b = 0; b < G; b++) {
        float d = half_to_float(sc[b * 4]) * xd[b];
        for (int l = 0; l < 8; l++) {
            int32_t I = 0;
            for (int j = 4 * l; j < 4 * l + 4; j++) {
                int v = j < 16 ? (c[b * 64 + j] & 15) : (c[b * 64 + j - 16] >> 4);
                I += v * xq[b * QK + j];
            }
            acc[l] = fmaf(d, (float)I, acc[l]);
        }
    }
    int64_t Gp = (G + 7) & ~(int64_t)7; /* mn and xs are padded with zeros to Gp */
    for (int64_t b = 0; b < Gp; b++) macc[b % 8] = fmaf(half_to_float(mn[b]), xs[b], macc[b % 8]);
    return hsum8_ref(acc) + hsum8_ref(macc);
}

static float dot_q8_ref(const int8_t *xq, const float *xd, int64_t G, const int8_t *c, const float *sc, int64_t sb) {
    float acc[8] = {0};
    for (int64_t b = 0; b < G; b++) {
        float d = sc[b * sb] * xd[b];
        for (int l = 0; l < 8; l++) {
            int32_t I = 0;
            for (int j = 4 * l; j < 4 * l + 4; j++) I += c[b * 4 * QK + j] * xq[b * QK + j];
            acc[l] = fmaf(d, (float)I, acc[l]);
        }
    }
    return hsum8_ref(acc);
}

static float dot_f_ref(const float *x, int64_t K, const void *w, int half) {
    float acc[8] = {0};
    int64_t Kp = (K + 7) & ~(int64_t)7;
    for (int64_t k = 0; k < Kp; k++) {
        float wv = 0.0f, xv = 0.0f;
        if (k < K) {
            wv = half ? half_to_float(((const uint16_t *)w)[k]) : ((const float *)w)[k];
            xv = x[k];
        }
        acc[k % 8] = fmaf(xv, wv, acc[k % 8]);
    }
    return hsum8_ref(acc);
}

/* ---------------------------------------------------------------------------------------- */
/* quantized matrix products: AVX2 tiles (RM activation rows x RN weight rows)               */

#ifdef MQ_AVX2
#define MQ_INLINE static inline __attribute__((always_inline))

MQ_INLINE __m256i unpack_q4(const uint8_t *p) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m128i m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

MQ_INLINE __m256 min_term(const uint16_t *mn, const float *xs, int64_t Gp) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < Gp; b += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mn + b))), _mm256_loadu_ps(xs + b), acc);
    return acc;
}

MQ_INLINE void tile_q4(int RM, int RN, const int8_t *xq, const float *xd, const float *xs, int64_t K,
                       const uint8_t *c, const uint16_t *sc, const uint16_t *mn, float *y, int64_t ldy) {
    const int64_t G = K / QK, Gp = (G + 7) & ~(int64_t)7;
    __m256 acc[4][4];
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < G; b++) {
        __m256i w[4];
        __m256 ws[4];
        _mm_prefetch((const char *)(c + (2 * G + b) * 64), _MM_HINT_T0); /* two quads on */
        for (int j = 0; j < RN; j++) {
            w[j] = unpack_q4(c + b * 64 + j * 16);
            ws[j] = _mm256_set1_ps(_cvtsh_ss(sc[b * 4 + j]));
        }
        for (int i = 0; i < RM; i++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(xq + i * K + b * QK));
            __m256 xdi = _mm256_broadcast_ss(xd + i * G + b);
            for (int j = 0; j < RN; j++) {
                __m256i I = MQ_DOT_U8S8(w[j], x);
                acc[i][j] = _mm256_fmadd_ps(_mm256_mul_ps(ws[j], xdi), _mm256_cvtepi32_ps(I), acc[i][j]);
            }
        }
    }
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++)
            y[i * ldy + j] = hsum8_avx(acc[i][j]) + hsum8_avx(min_term(mn + j * G, xs + i * Gp, Gp));
}

MQ_INLINE void tile_q8(int RM, int RN, const int8_t *xq, const float *xd, int64_t K,
                       const int8_t *c, const float *sc, int64_t sb, float *y, int64_t ldy) {
    const int64_t G = K / QK;
    __m256 acc[4][4];
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < G; b++) {
        __m256i w[4], aw[4];
        __m256 ws[4];
        _mm_prefetch((const char *)(c + (2 * G + b) * 4 * QK), _MM_HINT_T0); /* two quads on */
        _mm_prefetch((const char *)(c + (2 * G + b) * 4 * QK + 64), _MM_HINT_T0);
        for (int j = 0; j < RN; j++) {
            w[j] = _mm256_loadu_si256((const __m256i *)(c + b * 4 * QK + j * QK));
            aw[j] = _mm256_sign_epi8(w[j], w[j]);
            ws[j] = _mm256_broadcast_ss(sc + j + b * sb); /* the rows of a quad side by side */
        }
        for (int i = 0; i < RM; i++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(xq + i * K + b * QK));
            __m256 xdi = _mm256_broadcast_ss(xd + i * G + b);
            for (int j = 0; j < RN; j++) {
                __m256i I = MQ_DOT_U8S8(aw[j], _mm256_sign_epi8(x, w[j]));
                acc[i][j] = _mm256_fmadd_ps(_mm256_mul_ps(ws[j], xdi), _mm256_cvtepi32_ps(I), acc[i][j]);
            }
        }
    }
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) y[i * ldy + j] = hsum8_avx(acc[i][j]);
}

MQ_INLINE __m256 load8_w(const void *w, int64_t k, int half) {
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + k)));
    return _mm256_loadu_ps((const float *)w + k);
}

MQ_INLINE void tile_f(int RM, int RN, const float *x, int64_t K, const void *w, int half, float *y, int64_t ldy) {
    __m256 acc[4][4];
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) acc[i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[4];
        for (int j = 0; j < RN; j++)
            wv[j] = half ? load8_w((const uint16_t *)w + j * K, k, 1) : load8_w((const float *)w + j * K, k, 0);
        for (int i = 0; i < RM; i++) {
            __m256 xv = _mm256_loadu_ps(x + i * K + k);
            for (int j = 0; j < RN; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (k < K) {
        for (int j = 0; j < RN; j++) {
            float wt[8] = {0};
            for (int64_t t = k; t < K; t++)
                wt[t - k] = half ? half_to_float(((const uint16_t *)w)[j * K + t]) : ((const float *)w)[j * K + t];
            __m256 wv = _mm256_loadu_ps(wt);
            for (int i = 0; i < RM; i++) {
                float xt[8] = {0};
                for (int64_t t = k; t < K; t++) xt[t - k] = x[i * K + t];
                acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xt), wv, acc[i][j]);
            }
        }
    }
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) y[i * ldy + j] = hsum8_avx(acc[i][j]);
}

/* The tile shapes: whatever the shape, each output element sees the same operations. */
#define MQ_DISPATCH_TILES(CALL)                                                 \
    if (rm == 4 && rn == 2) { CALL(4, 2); } else if (rm == 1 && rn == 4) { CALL(1, 4); } \
    else if (rm == 3 && rn == 2) { CALL(3, 2); } else if (rm == 2 && rn == 2) { CALL(2, 2); } \
    else if (rm == 1 && rn == 2) { CALL(1, 2); } else if (rm == 4 && rn == 1) { CALL(4, 1); } \
    else if (rm == 3 && rn == 1) { CALL(3, 1); } else if (rm == 2 && rn == 1) { CALL(2, 1); } \
    else { CALL(1, 1); }
/* Every tile of an (M, N) product, the threads splitting the columns: CALL(RM, RN) computes
 * rows [m0, m0 + RM) x columns [n, n + RN) */
#define MQ_FOR_TILES(CALL)                                                              \
    do {                                                                                \
        const int RN = M == 1 ? 4 : 2;                                                  \
        const int64_t tiles = (N + RN - 1) / RN;                                        \
        MQ_PARALLEL_FOR(nt, tiles)                                                      \
        for (int64_t t = 0; t < tiles; t++) {                                           \
            int64_t n0 = t * RN, n1 = n0 + RN < N ? n0 + RN : N;                        \
            for (int64_t n = n0; n < n1;) {                                             \
                int rn = (int)(n1 - n);                                                 \
                if (rn == 3) rn = 2;                                                    \
                for (int64_t m0 = 0; m0 < M; m0 += 4) {                                 \
                    int rm = (int)(M - m0 < 4 ? M - m0 : 4);                            \
                    MQ_DISPATCH_TILES(CALL)                                             \
                }                                                                       \
                n += rn;                                                                \
            }                                                                           \
        }                                                                               \
    } while (0)

#ifdef MQ_AVX512
/* AVX-512 tiles (AVX512-VNNI machines): RM rows x the four columns of a quad, with the same
 * operations on each lane as tile_q4 and tile_q8, in the same order. What differs is where the
 * operands come from: the products scale * d of each block, one per (row, column), are made
 * for MQ_CHUNK blocks at a time, sixteen to a multiply, and each fused multiply-add reads its
 * product from memory as a broadcast (no multiply per (row, column, block), and no shuffle);
 * the integer dot products start from a zero idiom (q4) or from the weights' offset sums (q8),
 * not from a copy; and the tile's horizontal sums are made eight at a time. */
#define MQ_CHUNK 16

/* hsum8_avx of eight vectors at once, each by the same tree: [v0 v1 v2 v3 | v4 v5 v6 v7] */
MQ_INLINE __m256 hsum8_x8(const __m256 *v) {
    /* a_k + a_{k+4} for k < 4: [v_p | v_{p+4}] */
    __m256 s04 = _mm256_add_ps(_mm256_permute2f128_ps(v[0], v[4], 0x20), _mm256_permute2f128_ps(v[0], v[4], 0x31));
    __m256 s15 = _mm256_add_ps(_mm256_permute2f128_ps(v[1], v[5], 0x20), _mm256_permute2f128_ps(v[1], v[5], 0x31));
    __m256 s26 = _mm256_add_ps(_mm256_permute2f128_ps(v[2], v[6], 0x20), _mm256_permute2f128_ps(v[2], v[6], 0x31));
    __m256 s37 = _mm256_add_ps(_mm256_permute2f128_ps(v[3], v[7], 0x20), _mm256_permute2f128_ps(v[3], v[7], 0x31));
    /* t0 = (a0 + a4) + (a2 + a6), t1 = (a1 + a5) + (a3 + a7): [t0 t1 of v0, v1 | of v4, v5] */
    __m256 t01 = _mm256_add_ps(_mm256_shuffle_ps(s04, s15, 0x44), _mm256_shuffle_ps(s04, s15, 0xee));
    __m256 t23 = _mm256_add_ps(_mm256_shuffle_ps(s26, s37, 0x44), _mm256_shuffle_ps(s26, s37, 0xee));
    /* t0 + t1 */
    return _mm256_add_ps(_mm256_shuffle_ps(t01, t23, 0x88), _mm256_shuffle_ps(t01, t23, 0xdd));
}

/* fma(*p, a, acc) on 8 lanes with *p broadcast from memory by the instruction itself (a
 * compiler would forward a value it has just stored through shuffles instead) */
MQ_INLINE __m256 fma_bcast(__m256 a, const float *p, __m256 acc) {
    __asm__("vfmadd231ps %2%{1to8%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*p));
    return acc;
}

/* unpack_q4 from a broadcast load: the 16 bytes in both halves, the upper half shifted by 4 */
MQ_INLINE __m256i unpack_q4_x(const uint8_t *p) {
    __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(15));
}

/* MQ_DOT_U8S8(w, x) into a register zeroed by a zero idiom */
MQ_INLINE __m256i dot_z(__m256i w, __m256i x) {
    __m256i r;
    __asm__("vpxord %0, %0, %0\n\tvpdpbusd %2, %1, %0" : "=&v"(r) : "v"(w), "v"(x));
    return r;
}

/* RN (1, 2 or 4) consecutive scales, float16 or float32 */
MQ_INLINE __m128 scales_h(const uint16_t *p, int RN) {
    if (RN == 4) return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p));
    if (RN == 2) { int32_t v; memcpy(&v, p, 4); return _mm_cvtph_ps(_mm_cvtsi32_si128(v)); }
    return _mm_cvtph_ps(_mm_cvtsi32_si128(p[0]));
}
MQ_INLINE __m128 scales_f(const float *p, int RN) {
    if (RN == 4) return _mm_loadu_ps(p);
    if (RN == 2) return _mm_castpd_ps(_mm_load_sd((const double *)p));
    return _mm_load_ss(p);
}

/* the products scale[b][j] * xd[i][b] of blocks [b0, b1) into dt (row, block - b0, column):
 * the float multiplies of tile_q4 and tile_q8 (ws * xdi), made sixteen at a time; s16 gives
 * the scales of four blocks from b (16 floats, block-major) */
#define MQ_PRODUCTS(RM, RN, b0, b1, s16, ws)                                                          \
    do {                                                                                                \
        int64_t b = (b0);                                                                               \
        if ((RN) == 4)                                                                                  \
            for (; b + 4 <= (b1); b += 4) {                                                             \
                const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3); \
                __m512 s = (s16);                                                                       \
                for (int i = 0; i < (RM); i++) {                                                        \
                    __m512 d = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(xd + i * G + b))); \
                    _mm512_store_ps(dt + (i * MQ_CHUNK + b - (b0)) * 4, _mm512_mul_ps(s, d));           \
                }                                                                                       \
            }                                                                                           \
        for (; b < (b1); b++) {                                                                         \
            __m128 s = (ws);                                                                            \
            for (int i = 0; i < (RM); i++)                                                              \
                _mm_store_ps(dt + (i * MQ_CHUNK + b - (b0)) * 4, _mm_mul_ps(s, _mm_set1_ps(xd[i * G + b]))); \
        }                                                                                               \
    } while (0)

/* y for RM rows x 4 columns: hsum8 of acc, plus hm (two rows a vector) where given */
MQ_INLINE void store_rows4(int RM, __m256 acc[4][4], const __m256 *hm, float *y, int64_t ldy) {
#pragma GCC unroll 2
    for (int p = 0; p < (RM + 1) / 2; p++) {
        __m256 v[8];
        for (int t = 0; t < 2; t++)
            for (int j = 0; j < 4; j++) v[4 * t + j] = 2 * p + t < RM ? acc[2 * p + t][j] : _mm256_setzero_ps();
        __m256 h = hsum8_x8(v);
        if (hm) h = _mm256_add_ps(h, hm[p]);
        _mm_storeu_ps(y + 2 * p * ldy, _mm256_castps256_ps128(h));
        if (2 * p + 1 < RM) _mm_storeu_ps(y + (2 * p + 1) * ldy, _mm256_extractf128_ps(h, 1));
    }
}

MQ_INLINE void tile_q4_x(int RM, int RN, const int8_t *xq, const float *xd, const float *xs, int64_t K,
                         const uint8_t *c, const uint16_t *sc, const uint16_t *mn, float *y, int64_t ldy) {
    const int64_t G = K / QK, Gp = (G + 7) & ~(int64_t)7;
    __m256 acc[4][4], hm[2];
    float dt[4 * MQ_CHUNK * 4] __attribute__((aligned(64))); /* (row, block, column) */
    if (RN == 4) { /* the min terms first (hsum8 of each, two rows a vector), with the cvtph shared */
#pragma GCC unroll 2
        for (int p = 0; p < (RM + 1) / 2; p++) {
            const int two = 2 * p + 1 < RM;
            __m256 v[8];
            for (int t = 0; t < 8; t++) v[t] = _mm256_setzero_ps();
            for (int64_t b = 0; b < Gp; b += 8) {
                __m256 s0 = _mm256_loadu_ps(xs + 2 * p * Gp + b);
                __m256 s1 = two ? _mm256_loadu_ps(xs + (2 * p + 1) * Gp + b) : s0;
                for (int j = 0; j < 4; j++) {
                    __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mn + j * G + b)));
                    v[j] = _mm256_fmadd_ps(m, s0, v[j]);
                    if (two) v[4 + j] = _mm256_fmadd_ps(m, s1, v[4 + j]);
                }
            }
            hm[p] = hsum8_x8(v);
        }
    }
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < G; b0 += MQ_CHUNK) {
        const int64_t b1 = b0 + MQ_CHUNK < G ? b0 + MQ_CHUNK : G;
        MQ_PRODUCTS(RM, RN, b0, b1, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + b * 4))),
                    scales_h(sc + b * 4, RN));
        for (int64_t b = b0; b < b1; b++) {
            __m256i w[4];
            const float *d = dt + (b - b0) * 4;
            _mm_prefetch((const char *)(c + (2 * G + b) * 64), _MM_HINT_T0); /* two quads on */
            for (int j = 0; j < RN; j++) w[j] = unpack_q4_x(c + b * 64 + j * 16);
            for (int i = 0; i < RM; i++) {
                __m256i x = _mm256_loadu_si256((const __m256i *)(xq + i * K + b * QK));
                for (int j = 0; j < RN; j++)
                    acc[i][j] = fma_bcast(_mm256_cvtepi32_ps(dot_z(w[j], x)), d + i * MQ_CHUNK * 4 + j, acc[i][j]);
            }
        }
    }
    if (RN == 4) {
        store_rows4(RM, acc, hm, y, ldy);
        return;
    }
#pragma GCC unroll 4 /* acc stays in registers (a loop over it would keep it in memory) */
    for (int i = 0; i < RM; i++)
#pragma GCC unroll 4
        for (int j = 0; j < RN; j++)
            y[i * ldy + j] = hsum8_avx(acc[i][j]) + hsum8_avx(min_term(mn + j * G, xs + i * Gp, Gp));
}

/* int8: x * w as (x + 128) * w - 128 * w, the u8 x s8 product VNNI has, starting from
 * -128 * (the sum of each four weights): the same integers as tile_q8's sign trick */
MQ_INLINE void tile_q8_x(int RM, int RN, const int8_t *xq, const float *xd, int64_t K,
                         const int8_t *c, const float *sc, int64_t sb, float *y, int64_t ldy) {
    const int64_t G = K / QK;
    const __m256i off = _mm256_set1_epi8((char)0x80);
    __m256 acc[4][4];
    float dt[4 * MQ_CHUNK * 4] __attribute__((aligned(64))); /* (row, block, column) */
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < G; b0 += MQ_CHUNK) {
        const int64_t b1 = b0 + MQ_CHUNK < G ? b0 + MQ_CHUNK : G;
        MQ_PRODUCTS(RM, RN, b0, b1, sb ? _mm512_loadu_ps(sc + b * 4) : _mm512_broadcast_f32x4(_mm_loadu_ps(sc)),
                    scales_f(sc + b * sb, RN));
        for (int64_t b = b0; b < b1; b++) {
            __m256i w[4], nc[4];
            const float *d = dt + (b - b0) * 4;
            _mm_prefetch((const char *)(c + (2 * G + b) * 4 * QK), _MM_HINT_T0); /* two quads on */
            _mm_prefetch((const char *)(c + (2 * G + b) * 4 * QK + 64), _MM_HINT_T0);
            for (int j = 0; j < RN; j++) {
                w[j] = _mm256_loadu_si256((const __m256i *)(c + b * 4 * QK + j * QK));
                nc[j] = _mm256_sub_epi32(_mm256_setzero_si256(), dot_z(off, w[j]));
            }
            for (int i = 0; i < RM; i++) {
                __m256i xu = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(xq + i * K + b * QK)), off);
                for (int j = 0; j < RN; j++)
                    acc[i][j] = fma_bcast(_mm256_cvtepi32_ps(_mm256_dpbusd_epi32(nc[j], xu, w[j])),
                                          d + i * MQ_CHUNK * 4 + j, acc[i][j]);
            }
        }
    }
    if (RN == 4) {
        store_rows4(RM, acc, NULL, y, ldy);
        return;
    }
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) y[i * ldy + j] = hsum8_avx(acc[i][j]);
}

/* the tiles: RM <= 4 rows x a quad's four columns, or the two or one left at the end */
#define MQ_DISPATCH_TILES_X(CALL)                                                                \
    if (rn == 4) {                                                                                \
        if (rm == 4) { CALL(4, 4); } else if (rm == 3) { CALL(3, 4); }                            \
        else if (rm == 2) { CALL(2, 4); } else { CALL(1, 4); }                                    \
    } else if (rn == 2) {                                                                         \
        if (rm == 4) { CALL(4, 2); } else if (rm == 3) { CALL(3, 2); }                            \
        else if (rm == 2) { CALL(2, 2); } else { CALL(1, 2); }                                    \
    } else {                                                                                      \
        if (rm == 4) { CALL(4, 1); } else if (rm == 3) { CALL(3, 1); }                            \
        else if (rm == 2) { CALL(2, 1); } else { CALL(1, 1); }                                    \
    }
#define MQ_FOR_TILES_X(CALL)                                                            \
    do {                                                                                \
        const int64_t tiles = (N + 3) / 4;                                              \
        MQ_PARALLEL_FOR(nt, tiles)                                                      \
        for (int64_t t = 0; t < tiles; t++) {                                           \
            int64_t n0 = t * 4, n1 = n0 + 4 < N ? n0 + 4 : N;                           \
            for (int64_t n = n0; n < n1;) {                                             \
                int rn = (int)(n1 - n);                                                 \
                if (rn == 3) rn = 2;                                                    \
                for (int64_t m0 = 0; m0 < M; m0 += 4) {                                 \
                    int rm = (int)(M - m0 < 4 ? M - m0 : 4);                            \
                    MQ_DISPATCH_TILES_X(CALL)                                           \
                }                                                                       \
                n += rn;                                                                \
            }                                                                           \
        }                                                                               \
    } while (0)
#endif /* MQ_AVX512 */
#endif /* MQ_AVX2 */

/* ---------------------------------------------------------------------------------------- */
/* NEON: the same definitions (lanes 0-3 in lo, 4-7 in hi)                                   */

#ifdef MQ_NEON
static inline int32x4_t dot4_s8(int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(vdupq_n_s32(0), a, b);
#else
    int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    int16x8_t hi = vmull_high_s8(a, b);
    /* pairwise sums keep groups of 4 consecutive bytes together */
    int32x4_t pl = vpaddlq_s16(lo), ph = vpaddlq_s16(hi);
    return vpaddq_s32(pl, ph);
#endif
}

static float dot_q4_neon(const int8_t *xq, const float *xd, const float *xs, int64_t G,
                         const uint8_t *c, const uint16_t *sc, const uint16_t *mn) {
    float32x4_t alo = vdupq_n_f32(0), ahi = vdupq_n_f32(0);
    const uint8x16_t m4 = vdupq_n_u8(15);
    for (int64_t b = 0; b < G; b++) {
        uint8x16_t raw = vld1q_u8(c + b * 64);
        int8x16_t w0 = vreinterpretq_s8_u8(vandq_u8(raw, m4)), w1 = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
        int8x16_t x0 = vld1q_s8(xq + b * QK), x1 = vld1q_s8(xq + b * QK + 16);
        float d = half_to_float(sc[b * 4]) * xd[b];
        alo = vfmaq_n_f32(alo, vcvtq_f32_s32(dot4_s8(w0, x0)), d);
        ahi = vfmaq_n_f32(ahi, vcvtq_f32_s32(dot4_s8(w1, x1)), d);
    }
    float32x4_t mlo = vdupq_n_f32(0), mhi = vdupq_n_f32(0);
    const int64_t Gp = (G + 7) & ~(int64_t)7;
    for (int64_t b = 0; b < Gp; b += 8) {
        float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(mn + b));
        mlo = vfmaq_f32(mlo, vcvt_f32_f16(vget_low_f16(h)), vld1q_f32(xs + b));
        mhi = vfmaq_f32(mhi, vcvt_high_f32_f16(h), vld1q_f32(xs + b + 4));
    }
    return hsum8_neon(alo, ahi) + hsum8_neon(mlo, mhi);
}

static float dot_q8_neon(const int8_t *xq, const float *xd, int64_t G, const int8_t *c, const float *sc, int64_t sb) {
    float32x4_t alo = vdupq_n_f32(0), ahi = vdupq_n_f32(0);
    for (int64_t b = 0; b < G; b++) {
        int8x16_t w0 = vld1q_s8(c + b * 4 * QK), w1 = vld1q_s8(c + b * 4 * QK + 16);
        int8x16_t x0 = vld1q_s8(xq + b * QK), x1 = vld1q_s8(xq + b * QK + 16);
        float d = sc[b * sb] * xd[b];
        alo = vfmaq_n_f32(alo, vcvtq_f32_s32(dot4_s8(w0, x0)), d);
        ahi = vfmaq_n_f32(ahi, vcvtq_f32_s32(dot4_s8(w1, x1)), d);
    }
    return hsum8_neon(alo, ahi);
}
#endif

/* ---------------------------------------------------------------------------------------- */
/* exported products                                                                          */

/* the one-element-at-a-time dot product: NEON's where it exists (ref = 0), else the definition */
#ifdef MQ_NEON
#define MQ_PICK(ref, portable, neon) ((ref) ? (portable) : (neon))
#else
#define MQ_PICK(ref, portable, neon) ((void)(ref), (portable))
#endif

/* y (M, N) with row stride ldy = xq (M, K) @ W.T for int4 weights */
static void gemm_q4(const int8_t *xq, const float *xd, const float *xs, int64_t M, int64_t K,
                    const uint8_t *c, const uint16_t *sc, const uint16_t *mn, int64_t N, float *y, int64_t ldy,
                    int nt, int ref) {
    const int64_t G = K / QK, Gp = (G + 7) & ~(int64_t)7;
#define Q4_ROW(n) (c + ((n) / 4) * G * 64 + ((n) % 4) * 16)
#define Q4_SCALE(n) (sc + ((n) / 4) * G * 4 + (n) % 4)
#ifdef MQ_AVX2
    if (!ref) {
#ifdef MQ_AVX512
#define CALL_Q4(A, B) tile_q4_x(A, B, xq + m0 * K, xd + m0 * G, xs + m0 * Gp, K, Q4_ROW(n), Q4_SCALE(n), mn + n * G, y + m0 * ldy + n, ldy)
        MQ_FOR_TILES_X(CALL_Q4);
#else
#define CALL_Q4(A, B) tile_q4(A, B, xq + m0 * K, xd + m0 * G, xs + m0 * Gp, K, Q4_ROW(n), Q4_SCALE(n), mn + n * G, y + m0 * ldy + n, ldy)
        MQ_FOR_TILES(CALL_Q4);
#endif
#undef CALL_Q4
        return;
    }
#endif
    float (*dot)(const int8_t *, const float *, const float *, int64_t, const uint8_t *, const uint16_t *,
                 const uint16_t *) = MQ_PICK(ref, dot_q4_ref, dot_q4_neon);
    MQ_PARALLEL_FOR(nt, N)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            y[m * ldy + n] = dot(xq + m * K, xd + m * G, xs + m * Gp, G, Q4_ROW(n), Q4_SCALE(n), mn + n * G);
}

static void gemm_q8(const int8_t *xq, const float *xd, int64_t M, int64_t K, const int8_t *c, const float *sc,
                    int row_scale, int64_t N, float *y, int64_t ldy, int nt, int ref) {
    const int64_t G = K / QK, sb = row_scale ? 0 : 4;
#define Q8_ROW(n) (c + ((n) / 4) * G * 4 * QK + ((n) % 4) * QK)
#define Q8_SCALE(n) (row_scale ? sc + (n) : sc + ((n) / 4) * G * 4 + (n) % 4)
#ifdef MQ_AVX2
    if (!ref) {
#ifdef MQ_AVX512
#define CALL_Q8(A, B) tile_q8_x(A, B, xq + m0 * K, xd + m0 * G, K, Q8_ROW(n), Q8_SCALE(n), sb, y + m0 * ldy + n, ldy)
        MQ_FOR_TILES_X(CALL_Q8);
#else
#define CALL_Q8(A, B) tile_q8(A, B, xq + m0 * K, xd + m0 * G, K, Q8_ROW(n), Q8_SCALE(n), sb, y + m0 * ldy + n, ldy)
        MQ_FOR_TILES(CALL_Q8);
#endif
#undef CALL_Q8
        return;
    }
#endif
    float (*dot)(const int8_t *, const float *, int64_t, const int8_t *, const float *, int64_t) =
        MQ_PICK(ref, dot_q8_ref, dot_q8_neon);
    MQ_PARALLEL_FOR(nt, N)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            y[m * ldy + n] = dot(xq + m * K, xd + m * G, G, Q8_ROW(n), Q8_SCALE(n), sb);
}

/* Quantize x (M, K) and multiply: the one call a linear makes. */
/* c and sc in quads of rows, mn (N, G) row-major, all float16, 8 spare zeros after mn */
int mq_linear_q4(const float *x, int64_t M, int64_t K, const uint8_t *c, const uint16_t *sc, const uint16_t *mn,
                 int64_t N, float *y, int nt, int ref) {
    const int64_t G = K / QK, Gp = (G + 7) & ~(int64_t)7;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K) + 64);
    float *xd = (float *)malloc(sizeof(float) * (size_t)(M * G) + 64);
    float *xs = (float *)calloc((size_t)(M * Gp) + 16, sizeof(float));
    if (!xq || !xd || !xs) {
        free(xq);
        free(xd);
        free(xs);
        return -1;
    }
    quantize_rows(x, M, K, xq, xd, xs, Gp, nt, ref);
    gemm_q4(xq, xd, xs, M, K, c, sc, mn, N, y, N, nt, ref);
    free(xq);
    free(xd);
    free(xs);
    return 0;
}

/* row_scale: one scale a row, sc[n]; else one a block, in quads (above) */
int mq_linear_q8(const float *x, int64_t M, int64_t K, const int8_t *c, const float *sc, int row_scale,
                 int64_t N, float *y, int nt, int ref) {
    const int64_t G = K / QK;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K) + 64);
    float *xd = (float *)malloc(sizeof(float) * (size_t)(2 * M * G) + 64);
    if (!xq || !xd) {
        free(xq);
        free(xd);
        return -1;
    }
    float *xs = xd + M * G;
    quantize_rows(x, M, K, xq, xd, xs, G, nt, ref);
    gemm_q8(xq, xd, M, K, c, sc, row_scale, N, y, N, nt, ref);
    free(xq);
    free(xd);
    return 0;
}

/* float weights: f32 (half = 0) or f16 (half = 1), (N, K) row-major */
void mq_linear_f(const float *x, int64_t M, int64_t K, const void *w, int half, int64_t N, float *y, int nt, int ref) {
    const size_t es = half ? 2 : 4;
    (void)ref; /* no SIMD path to skip in the portable build */
#ifdef MQ_AVX2
    if (!ref) {
#define CALL_F(A, B) tile_f(A, B, x + m0 * K, K, (const char *)w + n * K * es, half, y + m0 * N + n, N)
        MQ_FOR_TILES(CALL_F);
#undef CALL_F
        return;
    }
#endif
    MQ_PARALLEL_FOR(nt, N)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) y[m * N + n] = dot_f_ref(x + m * K, K, (const char *)w + n * K * es, half);
}

/* ---------------------------------------------------------------------------------------- */
/* elementwise and row ops                                                                   */

static inline float dot8(const float *a, const float *b, int64_t n) {
#ifdef MQ_AVX2
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    if (k < n) {
        float x[8] = {0}, y[8] = {0};
        for (int64_t t = k; t < n; t++) { x[t - k] = a[t]; y[t - k] = b[t]; }
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(y), acc);
    }
    return hsum8_avx(acc);
#else
    float acc[8] = {0};
    int64_t np = (n + 7) & ~(int64_t)7;
    for (int64_t k = 0; k < np; k++) acc[k % 8] = fmaf(k < n ? a[k] : 0.0f, k < n ? b[k] : 0.0f, acc[k % 8]);
    return hsum8_ref(acc);
#endif
}

/* y = x * (1 / sqrt(mean(x^2) + eps)) * w, row by row; y may be x */
void mq_rmsnorm(const float *x, int64_t M, int64_t H, const float *w, float eps, float *y, int nt) {
    MQ_PARALLEL_FOR(nt, M)
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * H;
        float *yr = y + m * H;
        float ss = dot8(xr, xr, H);
        float r = 1.0f / sqrtf(ss / (float)H + eps);
        for (int64_t h = 0; h < H; h++) yr[h] = (xr[h] * r) * w[h];
    }
}

/* gu (M, 2N): y (M, N) = silu(gu[:, :N]) * gu[:, N:], silu(g) = g / (1 + exp(-g)) */
void mq_silu_mul(const float *gu, int64_t M, int64_t N, float *y, int nt) {
    MQ_PARALLEL_FOR(nt, M)
    for (int64_t m = 0; m < M; m++) {
        const float *g = gu + m * 2 * N, *u = g + N;
        float *yr = y + m * N;
        int64_t n = 0;
#ifdef MQ_AVX2
        const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
        for (; n + 8 <= N; n += 8) {
            __m256 gv = _mm256_loadu_ps(g + n);
            __m256 e = exp8_avx(_mm256_xor_ps(gv, neg));
            _mm256_storeu_ps(yr + n, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + n)));
        }
#endif
        for (; n < N; n++) yr[n] = (g[n] / (1.0f + exp_ref(-g[n]))) * u[n];
    }
}

/* One layer's attention for T new positions starting at `start`, with the rotation and the
 * cache write done here too.
 *   qkv (T, (nq + 2 nkv) D): the fused projection's output, q heads, then k, then v
 *   cos, sin (T, D): the rotary tables of the T positions
 *   kc, vc (nkv, cap, D): the layer's caches; positions [start, start + T) are written
 *   out (T, nq D)
 * Position p = start + t attends to keys [lo, p], lo = p - window + 1 with a window (> 0).
 * rope: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2]). */
void mq_attention(const float *qkv, int64_t T, int64_t nq, int64_t nkv, int64_t D, const float *cos_t,
                  const float *sin_t, float *kc, float *vc, int64_t cap, int64_t start, int64_t window,
                  float scale, float *q_tmp, float *scratch, int64_t scratch_stride, float *out, int nt) {
    const int64_t row = (nq + 2 * nkv) * D, half = D / 2;
    /* rotate q into q_tmp (T, nq, D), k into the cache; copy v */
    MQ_PARALLEL_FOR(nt, T)
    for (int64_t t = 0; t < T; t++) {
        const float *src = qkv + t * row, *cs = cos_t + t * D, *sn = sin_t + t * D;
        for (int64_t h = 0; h < nq + nkv; h++) {
            const float *a = src + h * D;
            float *dst = h < nq ? q_tmp + (t * nq + h) * D : kc + ((h - nq) * cap + start + t) * D;
            for (int64_t i = 0; i < D; i++) {
                float rot = i < half ? -a[i + half] : a[i - half];
                dst[i] = a[i] * cs[i] + rot * sn[i];
            }
        }
        for (int64_t h = 0; h < nkv; h++)
            memcpy(vc + (h * cap + start + t) * D, src + (nq + nkv + h) * D, sizeof(float) * (size_t)D);
    }
    const int64_t group = nq / nkv, pairs = T * nq;
    MQ_PARALLEL_FOR(nt, pairs)
    for (int64_t pi = 0; pi < pairs; pi++) {
        int64_t t = pi / nq, h = pi % nq, kvh = h / group, p = start + t;
        int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
        int64_t n = p + 1 - lo;
#ifdef _OPENMP
        float *scores = scratch + (int64_t)omp_get_thread_num() * scratch_stride; /* >= start + T + 8 + D */
#else
        float *scores = scratch;
#endif
        float *acc = scores + n + 8;
        const float *q = q_tmp + (t * nq + h) * D;
        const float *kb = kc + (kvh * cap + lo) * D, *vb = vc + (kvh * cap + lo) * D;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            float s = dot8(q, kb + j * D, D) * scale;
            scores[j] = s;
            mx = s > mx ? s : mx;
        }
        float sum = 0.0f;
        int64_t j0 = 0;
#ifdef MQ_AVX2
        for (; j0 + 8 <= n; j0 += 8) {
            __m256 e = exp8_avx(_mm256_sub_ps(_mm256_loadu_ps(scores + j0), _mm256_set1_ps(mx)));
            _mm256_storeu_ps(scores + j0, e);
        }
#endif
        for (int64_t j = j0; j < n; j++) scores[j] = exp_ref(scores[j] - mx);
        for (int64_t j = 0; j < n; j++) sum += scores[j];
        for (int64_t i = 0; i < D; i++) acc[i] = 0.0f;
#ifdef MQ_AVX2
        if (D % 8 == 0) { /* 64 values at a time in registers, each summed over the keys in order */
            for (int64_t c = 0; c < D; c += 64) {
                const int w = (int)((D - c) < 64 ? (D - c) / 8 : 8);
                __m256 a8[8];
                for (int i = 0; i < 8; i++) a8[i] = _mm256_setzero_ps();
                for (int64_t j = 0; j < n; j++) {
                    const float *v = vb + j * D + c;
                    __m256 ev = _mm256_set1_ps(scores[j]);
                    for (int i = 0; i < w; i++) a8[i] = _mm256_fmadd_ps(ev, _mm256_loadu_ps(v + 8 * i), a8[i]);
                }
                for (int i = 0; i < w; i++) _mm256_storeu_ps(acc + c + 8 * i, a8[i]);
            }
        } else
#endif
        for (int64_t j = 0; j < n; j++) {
            const float *v = vb + j * D;
            float e = scores[j];
            for (int64_t i = 0; i < D; i++) acc[i] = fmaf(e, v[i], acc[i]);
        }
        float *o = out + t * nq * D + h * D;
        for (int64_t i = 0; i < D; i++) o[i] = acc[i] / sum;
    }
}

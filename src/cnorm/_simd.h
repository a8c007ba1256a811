/* Small inline helpers for the Cython kernels in _kernels.pyx.
 *
 * The kernels are compiled once per ISA level (x86-64, x86-64-v3, x86-64-v4)
 * into sibling extension modules; this header adapts to the level it is
 * compiled for through the compiler's predefined macros (__F16C__, __FMA__).
 * Nothing here changes rounding: the build uses -ffp-contract=off, and the only
 * fused multiply-add is the explicit one in cn_two_prod_err, whose result is
 * exact on every path (Dekker's splitting is used where FMA is missing).
 */
#ifndef CNORM_SIMD_H
#define CNORM_SIMD_H
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define CN_ISA_NAME "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CN_ISA_NAME "avx2"
#else
#define CN_ISA_NAME "baseline"
#endif

/* ---- exact error of a product: a*b == p + err exactly (p = fl(a*b)) ---- */
static inline double cn_two_prod_err(double a, double b, double p) {
#if defined(__FMA__)
    return __builtin_fma(a, b, -p);
#else
    const double split = 134217729.0; /* 2^27 + 1 */
    double t = split * a, ah = t - (t - a), al = a - ah;
    t = split * b;
    double bh = t - (t - b), bl = b - bh;
    return ((ah * bh - p) + ah * bl + al * bh) + al * bl;
#endif
}

/* ---- IEEE binary16 <-> binary32/64 ---- */
static inline float cn_half_to_float_sw(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else { /* subnormal: value = mant * 2^-24, exact in float */
        float f = (float)mant * 5.9604644775390625e-08f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

/* round-to-nearest-even float -> half (the F16C instruction's behaviour) */
static inline uint16_t cn_float_to_half_sw(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u));
    if (ax >= 0x477ff000u) /* rounds to >= 65520: overflow */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) { /* result subnormal or zero: add magic to round at 2^-24 */
        float af, magic = 0.5f;
        memcpy(&af, &ax, 4);
        af += magic; /* ulp of 0.5f is 2^-24: the addition rounds to nearest even */
        uint32_t r;
        memcpy(&r, &af, 4);
        return (uint16_t)(sign | (r - 0x3f000000u));
    }
    uint32_t mant_odd = (ax >> 13) & 1u;
    ax += 0xc8000fffu + mant_odd; /* rebias exponent (-112 << 23) and round */
    return (uint16_t)(sign | (ax >> 13));
}

static inline double cn_half_to_double(uint16_t h) {
#if defined(__F16C__)
    return (double)_cvtsh_ss(h);
#else
    return (double)cn_half_to_float_sw(h);
#endif
}

static inline uint16_t cn_double_to_half(double d) {
    /* via float: the double rounding can cost at most an extra half ulp in rare ties */
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh((float)d, _MM_FROUND_TO_NEAREST_INT);
#else
    return cn_float_to_half_sw((float)d);
#endif
}

/* eight contiguous halves to eight doubles (vector conversion where F16C exists) */
static inline void cn_half8_to_double(const uint16_t *p, double *out) {
#if defined(__AVX512F__)
    __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    _mm512_storeu_pd(out, _mm512_cvtps_pd(f));
#elif defined(__F16C__) && defined(__AVX__)
    __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    _mm256_storeu_pd(out, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
    _mm256_storeu_pd(out + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
#else
    for (int j = 0; j < 8; j++) out[j] = (double)cn_half_to_float_sw(p[j]);
#endif
}

/* eight doubles to eight contiguous halves (round to nearest even, via float) */
static inline void cn_double8_to_half(const double *in, uint16_t *p) {
#if defined(__AVX512F__)
    __m256 f = _mm512_cvtpd_ps(_mm512_loadu_pd(in));
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__) && defined(__AVX__)
    __m128 lo = _mm256_cvtpd_ps(_mm256_loadu_pd(in));
    __m128 hi = _mm256_cvtpd_ps(_mm256_loadu_pd(in + 4));
    __m256 f = _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
#else
    for (int j = 0; j < 8; j++) p[j] = cn_float_to_half_sw((float)in[j]);
#endif
}

static inline const char *cn_isa_name(void) { return CN_ISA_NAME; }

/* Highest ISA level this CPU (and OS) can run: 2 = x86-64-v4 (AVX-512),
 * 1 = x86-64-v3 (AVX2+FMA+F16C), 0 = baseline. */
static inline int cn_cpu_level(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
    int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    return v4 ? 2 : (v3 ? 1 : 0);
#else
    return 0;
#endif
}

#endif

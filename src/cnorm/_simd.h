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
#include <stddef.h>
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
    /* Dekker: split*a overflows above ~2^996, so scale such operands by 2^-60
     * (exact, and p scales with them) and scale the error back. */
    double scale = 1.0;
    if (fabs(a) > 0x1p995) { a *= 0x1p-60; p *= 0x1p-60; scale = 0x1p60; }
    if (fabs(b) > 0x1p995) { b *= 0x1p-60; p *= 0x1p-60; scale *= 0x1p60; }
    const double split = 134217729.0; /* 2^27 + 1 */
    double t = split * a, ah = t - (t - a), al = a - ah;
    t = split * b;
    double bh = t - (t - b), bl = b - bh;
    return (((ah * bh - p) + ah * bl + al * bh) + al * bl) * scale;
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

/* ---- the two passes of a contiguous block row (n elements) ----
 * Sixteen float64 lanes held in two 8-wide GCC vectors (the compiler lowers
 * them to 2 zmm, 4 ymm or 8 xmm registers depending on the ISA level), combined
 * by a fixed pairwise tree: results depend only on n and the data, never on
 * the ISA or the thread.  These are the hot loops of block_moments in
 * _kernels.pyx. */
typedef double cn_v8d __attribute__((vector_size(64)));
typedef float cn_v8f __attribute__((vector_size(32)));

static inline cn_v8d cn_load8_f32(const float *p) {
    cn_v8f f;
    memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, cn_v8d);
}

static inline cn_v8d cn_load8_f64(const double *p) {
    cn_v8d v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline cn_v8d cn_load8_f16(const uint16_t *p) {
    double buf[8];
    cn_v8d v;
    cn_half8_to_double(p, buf);
    memcpy(&v, buf, sizeof v);
    return v;
}

/* the pairwise tree over lanes (a0 = lanes 0-7, a1 = lanes 8-15) */
static inline double cn_tree16v(cn_v8d a0, cn_v8d a1) {
    double a[8];
    cn_v8d s = a0 + a1;
    memcpy(a, &s, sizeof a);
    for (int w = 4; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) a[j] += a[j + w];
    return a[0];
}

/* exact error of the lane products a*b - p */
static inline cn_v8d cn_v8_two_prod_err(cn_v8d a, cn_v8d b, cn_v8d p) {
#if defined(__AVX512F__)
    return (cn_v8d)_mm512_fmsub_pd((__m512d)a, (__m512d)b, (__m512d)p);
#elif defined(__FMA__)
    double r[8], x[8], y[8], z[8];
    memcpy(x, &a, 64); memcpy(y, &b, 64); memcpy(z, &p, 64);
    _mm256_storeu_pd(r, _mm256_fmsub_pd(_mm256_loadu_pd(x), _mm256_loadu_pd(y), _mm256_loadu_pd(z)));
    _mm256_storeu_pd(r + 4, _mm256_fmsub_pd(_mm256_loadu_pd(x + 4), _mm256_loadu_pd(y + 4),
                                            _mm256_loadu_pd(z + 4)));
    cn_v8d out;
    memcpy(&out, r, 64);
    return out;
#else
    double x[8], y[8], z[8];
    memcpy(x, &a, 64); memcpy(y, &b, 64); memcpy(z, &p, 64);
    for (int j = 0; j < 8; j++) x[j] = cn_two_prod_err(x[j], y[j], z[j]);
    cn_v8d out;
    memcpy(&out, x, 64);
    return out;
#endif
}

#define CN_DEFINE_ROW(SUFFIX, T, LOAD8, CONV)                                     \
/* pass 1: plain float64 sum (the pilot mean only needs to be close) */          \
static inline double cn_sum_##SUFFIX(const T *__restrict p, ptrdiff_t n) {        \
    cn_v8d a0 = {0}, a1 = {0};                                                   \
    ptrdiff_t i, nv = n - n % 16;                                                \
    for (i = 0; i < nv; i += 16) {                                               \
        a0 += LOAD8(p + i);                                                      \
        a1 += LOAD8(p + i + 8);                                                  \
    }                                                                            \
    double tail = 0.0;                                                           \
    for (; i < n; i++) tail += CONV(p[i]);                                       \
    return cn_tree16v(a0, a1) + tail;                                            \
}                                                                                \
/* pass 2: S1 += sum(x - c), S2 += sum((x - c)^2) in float64 */                 \
static inline void cn_centred_##SUFFIX(const T *__restrict p, ptrdiff_t n,        \
                                       double c, double *s1, double *s2) {       \
    cn_v8d a0 = {0}, a1 = {0}, q0 = {0}, q1 = {0};                               \
    cn_v8d cv = {c, c, c, c, c, c, c, c};                                        \
    ptrdiff_t i, nv = n - n % 16;                                                \
    for (i = 0; i < nv; i += 16) {                                               \
        cn_v8d d0 = LOAD8(p + i) - cv, d1 = LOAD8(p + i + 8) - cv;               \
        a0 += d0;                                                                \
        a1 += d1;                                                                \
        q0 += d0 * d0;                                                           \
        q1 += d1 * d1;                                                           \
    }                                                                            \
    double t1 = 0.0, t2 = 0.0;                                                   \
    for (; i < n; i++) { double d = CONV(p[i]) - c; t1 += d; t2 += d * d; }       \
    *s1 += cn_tree16v(a0, a1) + t1;                                              \
    *s2 += cn_tree16v(q0, q1) + t2;                                              \
}

#define CN_CONV_F(v) ((double)(v))
#define CN_CONV_H(v) cn_half_to_double(v)
CN_DEFINE_ROW(f16, uint16_t, cn_load8_f16, CN_CONV_H)
CN_DEFINE_ROW(f32, float, cn_load8_f32, CN_CONV_F)
CN_DEFINE_ROW(f64_plain, double, cn_load8_f64, CN_CONV_F)
#define cn_sum_f64 cn_sum_f64_plain

/* pass 2 (float64): the same sums in double-double.  d = x - c exactly as
 * d + de (TwoSum); S1 += d and S2 += d^2 (exact product by FMA/Dekker, plus
 * 2*d*de) accumulated with TwoSum per lane. */
static inline void cn_two_sum(double a, double b, double *s, double *e) {
    double ss = a + b, bb = ss - a;
    *s = ss;
    *e = (a - (ss - bb)) + (b - bb);
}

static inline void cn_dd_add(double *h, double *l, double bh, double bl) {
    double s, e, t;
    cn_two_sum(*h, bh, &s, &e);
    e += *l + bl;
    t = s + e;
    *l = e - (t - s);
    *h = t;
}

#define CN_DD_LANE_STEP(x, h1, l1, h2, l2) do {                                   \
    cn_v8d d_ = (x) - cv, bb_ = d_ - (x);                                        \
    cn_v8d de_ = ((x) - (d_ - bb_)) + (-cv - bb_);                               \
    cn_v8d t_ = h1 + d_, b2_ = t_ - h1;                                          \
    l1 += ((h1 - (t_ - b2_)) + (d_ - b2_)) + de_;                                \
    h1 = t_;                                                                     \
    cn_v8d q_ = d_ * d_;                                                         \
    cn_v8d qe_ = cn_v8_two_prod_err(d_, d_, q_) + two * d_ * de_;                \
    t_ = h2 + q_;                                                                \
    b2_ = t_ - h2;                                                               \
    l2 += ((h2 - (t_ - b2_)) + (q_ - b2_)) + qe_;                                \
    h2 = t_;                                                                     \
} while (0)

static inline void cn_centred_f64(const double *__restrict p, ptrdiff_t n, double c,
                                  double *s1h, double *s1l, double *s2h, double *s2l) {
    cn_v8d h1a = {0}, l1a = {0}, h2a = {0}, l2a = {0};
    cn_v8d h1b = {0}, l1b = {0}, h2b = {0}, l2b = {0};
    cn_v8d cv = {c, c, c, c, c, c, c, c};
    cn_v8d two = {2, 2, 2, 2, 2, 2, 2, 2};
    ptrdiff_t i, nv = n - n % 16;
    for (i = 0; i < nv; i += 16) {
        cn_v8d xa = cn_load8_f64(p + i), xb = cn_load8_f64(p + i + 8);
        CN_DD_LANE_STEP(xa, h1a, l1a, h2a, l2a);
        CN_DD_LANE_STEP(xb, h1b, l1b, h2b, l2b);
    }
    double H1[16], L1[16], H2[16], L2[16];
    memcpy(H1, &h1a, 64); memcpy(H1 + 8, &h1b, 64);
    memcpy(L1, &l1a, 64); memcpy(L1 + 8, &l1b, 64);
    memcpy(H2, &h2a, 64); memcpy(H2 + 8, &h2b, 64);
    memcpy(L2, &l2a, 64); memcpy(L2 + 8, &l2b, 64);
    for (; i < n; i++) {  /* tail into lane 0, same arithmetic */
        double x = p[i], d = x - c, bb = d - x;
        double de = (x - (d - bb)) + (-c - bb);
        double q = d * d;
        cn_dd_add(&H1[0], &L1[0], d, de);
        cn_dd_add(&H2[0], &L2[0], q, cn_two_prod_err(d, d, q) + 2.0 * d * de);
    }
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) {
            cn_dd_add(&H1[j], &L1[j], H1[j + w], L1[j + w]);
            cn_dd_add(&H2[j], &L2[j], H2[j + w], L2[j + w]);
        }
    cn_dd_add(s1h, s1l, H1[0], L1[0]);
    cn_dd_add(s2h, s2l, H2[0], L2[0]);
}

/* ---- one row of a column block: per-column centred sums (channels-last) ----
 * s1[j] += x[j] - c[j], s2[j] += (x[j] - c[j])^2 for j < n, eight columns at a
 * time; float64 input keeps double-double sums (h1, l1, h2, l2). */
static inline cn_v8d cn_ld8d(const double *p) { cn_v8d v; memcpy(&v, p, 64); return v; }
static inline void cn_st8d(double *p, cn_v8d v) { memcpy(p, &v, 64); }

#define CN_DEFINE_COLS(SUFFIX, T, LOAD8, CONV)                                    \
static inline void cn_cols_centred_##SUFFIX(const T *__restrict x, ptrdiff_t n,   \
        const double *__restrict c, double *__restrict s1, double *__restrict s2) { \
    ptrdiff_t j, nv = n - n % 8;                                                 \
    for (j = 0; j < nv; j += 8) {                                                \
        cn_v8d d = LOAD8(x + j) - cn_ld8d(c + j);                                \
        cn_st8d(s1 + j, cn_ld8d(s1 + j) + d);                                    \
        cn_st8d(s2 + j, cn_ld8d(s2 + j) + d * d);                                \
    }                                                                            \
    for (; j < n; j++) { double d = CONV(x[j]) - c[j]; s1[j] += d; s2[j] += d * d; } \
}
CN_DEFINE_COLS(f16, uint16_t, cn_load8_f16, CN_CONV_H)
CN_DEFINE_COLS(f32, float, cn_load8_f32, CN_CONV_F)

static inline void cn_cols_centred_f64(const double *__restrict x, ptrdiff_t n,
        const double *__restrict c, double *__restrict h1, double *__restrict l1,
        double *__restrict h2, double *__restrict l2) {
    const cn_v8d two = {2, 2, 2, 2, 2, 2, 2, 2};
    ptrdiff_t j, nv = n - n % 8;
    for (j = 0; j < nv; j += 8) {
        cn_v8d xv = cn_load8_f64(x + j), cv = cn_ld8d(c + j);
        cn_v8d H1 = cn_ld8d(h1 + j), L1 = cn_ld8d(l1 + j), H2 = cn_ld8d(h2 + j), L2 = cn_ld8d(l2 + j);
        CN_DD_LANE_STEP(xv, H1, L1, H2, L2);
        cn_st8d(h1 + j, H1); cn_st8d(l1 + j, L1); cn_st8d(h2 + j, H2); cn_st8d(l2 + j, L2);
    }
    for (; j < n; j++) {
        double xs = x[j], d = xs - c[j], bb = d - xs;
        double de = (xs - (d - bb)) + (-c[j] - bb);
        double q = d * d;
        cn_dd_add(&h1[j], &l1[j], d, de);
        cn_dd_add(&h2[j], &l2[j], q, cn_two_prod_err(d, d, q) + 2.0 * d * de);
    }
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

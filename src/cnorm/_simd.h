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
#if defined(__F16C__) || defined(__AVX__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
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
 * These are the hot loops of block_moments in _kernels.pyx.
 *
 * Lane layout.  Each row kernel keeps 16 float64 lanes: lane j (0..15)
 * accumulates exactly the elements p[i] with i % 16 == j, in increasing i,
 * for i < n - n % 16; the n % 16 trailing elements go through a scalar tail
 * (a separate sum, or lane 0 for double-double).  The 16 lanes are then
 * combined by a fixed pairwise tree,
 *     lane[j] += lane[j + w]   for w = 8, 4, 2, 1 and j < w,
 * so results depend only on n and the data, never on the ISA or the thread.
 *
 * The lanes are held in CN_NV native vectors of CN_VW doubles each, lane j
 * being element j % CN_VW of vector j / CN_VW:
 *     AVX-512 (x86-64-v4):  CN_VW = 8, CN_NV = 2  (2 zmm per 16 lanes)
 *     AVX     (x86-64-v3):  CN_VW = 4, CN_NV = 4  (4 ymm)
 *     otherwise (SSE2...):  CN_VW = 2, CN_NV = 8  (8 xmm / 128-bit vectors)
 * A vector never exceeds the native width, so the accumulators stay in
 * registers as far as the register file allows (wider GCC vectors were split
 * through the stack on AVX2; the double-double kernel's 64 accumulator
 * doubles still need 16 ymm / 32 xmm, so part of them spills there).  The
 * tree levels with w >= CN_VW are whole-vector additions v[k] += v[k + w/CN_VW];
 * the levels with w < CN_VW run on the elements of v[0].  All of this is the
 * same IEEE operations on the same operands in the same order as one scalar
 * loop per lane. */
/* The 4-wide (256-bit) family, cn_y*: the native vectors of the AVX2 level,
 * and on AVX-512 the vectors of the float32 statistics loops.  Those loops
 * (two conversions, subtraction, product and two additions per element) ran
 * faster in 256-bit than in 512-bit vectors on this AMD EPYC (Zen 4 core
 * layout: a zmm operation takes both halves of the 256-bit pipes), L1-resident,
 * tools/simd_microbench.c, the same AVX-512 build: rows 0.135 -> 0.104
 * ns/element, four-row columns 0.136 -> 0.109; float16 (0.139 -> 0.155) and
 * the float64 double-double loop (0.515 -> 0.60) were slower, so they keep
 * the native width.  On an Intel Xeon (2026-12-06, full-width 512-bit
 * units) the same loops ran faster in zmm: rows 0.138 -> 0.114, four-row
 * columns 0.132 -> 0.119, one-row columns 0.196 -> 0.164; so the AVX-512
 * build has both and picks one at run time (cn_f32_zmm below).  The lanes
 * and the tree are those of the layout above, so the results are the same
 * bits at either width. */
#if defined(__AVX__)
typedef double cn_yd __attribute__((vector_size(32)));

static inline cn_yd cn_ysplat(double c) { return (cn_yd){c, c, c, c}; }
static inline cn_yd cn_yld_f64(const double *p) {
    cn_yd v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void cn_yst_f64(double *p, cn_yd v) { memcpy(p, &v, sizeof v); }
static inline cn_yd cn_yld_f32(const float *p) { return (cn_yd)_mm256_cvtps_pd(_mm_loadu_ps(p)); }
#if defined(__FMA__)   /* a + b and a - b on the multiply-add pipes (see cn_vadd_fu) */
static inline cn_yd cn_yadd_fu(cn_yd a, cn_yd b) {
    return (cn_yd)_mm256_fmadd_pd((__m256d)b, _mm256_set1_pd(1.0), (__m256d)a);
}
static inline cn_yd cn_ysub_fu(cn_yd a, cn_yd b) {
    return (cn_yd)_mm256_fmadd_pd((__m256d)b, _mm256_set1_pd(-1.0), (__m256d)a);
}
#else
static inline cn_yd cn_yadd_fu(cn_yd a, cn_yd b) { return a + b; }
static inline cn_yd cn_ysub_fu(cn_yd a, cn_yd b) { return a - b; }
#endif
/* the 16-lane tree (w = 8, 4 on vectors; w = 2, 1 on elements) */
static inline double cn_ytree16(const cn_yd *a) {
    cn_yd v = (a[0] + a[2]) + (a[1] + a[3]);
    return (v[0] + v[2]) + (v[1] + v[3]);
}
#endif

#if defined(__AVX512F__)
#define CN_VW 8
#elif defined(__AVX__)
#define CN_VW 4
#else
#define CN_VW 2
#endif
#define CN_NV (16 / CN_VW)   /* vectors per 16 lanes */

typedef double cn_vd __attribute__((vector_size(CN_VW * 8)));
typedef float cn_vf __attribute__((vector_size(CN_VW * 4)));

static inline cn_vd cn_vsplat(double c) {
    cn_vd v;
    for (int j = 0; j < CN_VW; j++) v[j] = c;
    return v;
}

/* v with element 0 replaced by x (on a value: an element store into an array
 * of vectors would keep the whole array in memory) */
static inline cn_vd cn_vset0(cn_vd v, double x) { v[0] = x; return v; }

/* CN_VW consecutive elements to doubles (unaligned loads) */
static inline cn_vd cn_vld_f64(const double *p) {
    cn_vd v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void cn_vst_f64(double *p, cn_vd v) { memcpy(p, &v, sizeof v); }

static inline cn_vd cn_vld_f32(const float *p) {
/* (GCC 12 lowers __builtin_convertvector float -> double as two half-width
 * conversions plus an insert, so use the native conversion where there is one) */
#if CN_VW == 8
    return (cn_vd)_mm512_cvtps_pd(_mm256_loadu_ps(p));
#elif CN_VW == 4
    return cn_yld_f32(p);
#elif CN_VW == 2 && defined(__SSE2__)
    return (cn_vd)_mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)p)));
#else
    cn_vf f;
    memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, cn_vd);
#endif
}

static inline cn_vd cn_vld_f16(const uint16_t *p) {
#if CN_VW == 8
    return (cn_vd)_mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
#elif CN_VW == 4 && defined(__F16C__)
    return (cn_vd)_mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p)));
#else
    cn_vd v;
    for (int j = 0; j < CN_VW; j++) v[j] = (double)cn_half_to_float_sw(p[j]);
    return v;
#endif
}

/* a + b, computed on the multiply-add unit where there is one: fma(b, 1, a)
 * is b * 1 + a rounded once, i.e. exactly the rounded sum a + b (the same
 * bits, signed zeros and infinities included).  Only the choice of NaN
 * payload between two NaN operands may differ from a + b, so callers use it
 * where a NaN result is never looked at (the statistics of a block holding a
 * NaN are recomputed by the scalar fallback).  Lanes and order are unchanged.
 *
 * Why: AMD cores issue additions and the precision conversions (vcvtph2ps,
 * vcvtps2pd) to the same two FP-add pipes, while the two multiply-add pipes
 * only see the multiplications.  The float16 statistics loops (sub, add, mul,
 * add and two conversions per element) were bound by the add pipes; taking
 * the S1 addition to the multiply-add pipes moves them from 0.163 to 0.136
 * ns/element on Zen 4 with AVX-512 (0.186 -> 0.168 with AVX2; float32
 * with AVX2 0.137 -> 0.105), tools/simd_microbench.c, L1-resident data.
 * The S2 addition of the row loop and of the four-row column loop went
 * there too later (float16 rows 0.085 -> 0.075 with AVX-512 on Zen 5, 0.155
 * -> 0.143 with AVX2; float32 unchanged); the one-row column loop keeps it
 * on the add pipes: its sums go through memory, and there the longer FMA
 * latency measured slower (0.093 -> 0.107). */
#if CN_VW == 8
static inline cn_vd cn_vadd_fu(cn_vd a, cn_vd b) {
    return (cn_vd)_mm512_fmadd_pd((__m512d)b, _mm512_set1_pd(1.0), (__m512d)a);
}
#elif CN_VW == 4
static inline cn_vd cn_vadd_fu(cn_vd a, cn_vd b) { return cn_yadd_fu(a, b); }
#else
static inline cn_vd cn_vadd_fu(cn_vd a, cn_vd b) { return a + b; }
#endif

/* a - b on the multiply-add pipes: fma(b, -1, a) is a + (-b), which IEEE 754
 * defines a - b to be (the same bits; NaN payloads as for cn_vadd_fu). */
#if CN_VW == 8
static inline cn_vd cn_vsub_fu(cn_vd a, cn_vd b) {
    return (cn_vd)_mm512_fmadd_pd((__m512d)b, _mm512_set1_pd(-1.0), (__m512d)a);
}
#elif CN_VW == 4
static inline cn_vd cn_vsub_fu(cn_vd a, cn_vd b) { return cn_ysub_fu(a, b); }
#else
static inline cn_vd cn_vsub_fu(cn_vd a, cn_vd b) { return a - b; }
#endif

/* The pairwise tree over the 16 lanes held in a[0..CN_NV-1]:
 * lane[j] += lane[j + w] for w = 8, 4, 2, 1 (j < w).  The levels with
 * w >= CN_VW add whole vectors, the others add elements of the remaining
 * vector.  Spelled out without loops so that the lanes stay in registers. */
static inline double cn_vtree16(const cn_vd *a) {
#if CN_VW == 8      /* w = 8 on vectors; w = 4, 2, 1 on elements */
    cn_vd v = a[0] + a[1];
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
#elif CN_VW == 4
    return cn_ytree16(a);
#else               /* w = 8, 4, 2 on vectors; w = 1 on elements */
    cn_vd v = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
    return v[0] + v[1];
#endif
}

/* exact error of the lane products a*b - p */
static inline cn_vd cn_v_two_prod_err(cn_vd a, cn_vd b, cn_vd p) {
#if CN_VW == 8
    return (cn_vd)_mm512_fmsub_pd((__m512d)a, (__m512d)b, (__m512d)p);
#elif CN_VW == 4 && defined(__FMA__)
    return (cn_vd)_mm256_fmsub_pd((__m256d)a, (__m256d)b, (__m256d)p);
#else
    /* Dekker's splitting lane by lane, the operations of cn_two_prod_err.
     * Lanes needing its overflow scaling (|a| or |b| > 2^995) are rare: then
     * every lane goes through the scalar function.  Otherwise its scale is 1
     * and the final multiplication by it is exact, so it is left out. */
    typedef int64_t cn_vi __attribute__((vector_size(CN_VW * 8)));
    cn_vi absmask;
    for (int j = 0; j < CN_VW; j++) absmask[j] = INT64_MAX;
    const cn_vd big = cn_vsplat(0x1p995);
    cn_vi huge = ((cn_vd)((cn_vi)a & absmask) > big) | ((cn_vd)((cn_vi)b & absmask) > big);
    int any = 0;
    for (int j = 0; j < CN_VW; j++) any |= huge[j] != 0;
    if (__builtin_expect(any, 0)) {
        cn_vd r;
        for (int j = 0; j < CN_VW; j++) r[j] = cn_two_prod_err(a[j], b[j], p[j]);
        return r;
    }
    const cn_vd split = cn_vsplat(134217729.0); /* 2^27 + 1 */
    cn_vd t = split * a, ah = t - (t - a), al = a - ah;
    t = split * b;
    cn_vd bh = t - (t - b), bl = b - bh;
    return ((ah * bh - p) + ah * bl + al * bh) + al * bl;
#endif
}

/* Software prefetch of a row loop: the cache lines of the 16 elements of
 * type T at p, pf bytes further on (none when pf == 0).  The callers pass pf
 * when what follows the row in memory is read next (contiguous rows): on this
 * AMD EPYC (family 26) the hardware prefetcher alone left moments over the
 * last axis of 4 KiB rows at 1.1-2.0x the time of np.max on the same bytes,
 * depending on where the rows start within a page (starts at 0, 16 or 256
 * bytes into a page were the slow ones); CN_PF_AHEAD bytes ahead brought every
 * start to 0.7-0.9x (tools/simd_microbench.c is L1-resident: no effect there).
 * A prefetch never faults, so reading ahead past the end needs no check. */
#ifndef CN_PF_AHEAD
#define CN_PF_AHEAD 12288
#endif
/* prefetcht0 as an asm statement on x86: GCC 12 drops __builtin_prefetch
 * from loops it vectorizes, which removed these from the row loops */
static inline void cn_prefetch_line(const char *a) {
#if defined(__x86_64__) && defined(__GNUC__)
    __asm__ volatile("prefetcht0 %0" : : "m"(*a));
#else
    __builtin_prefetch(a, 0, 3);
#endif
}
static inline void cn_prefetch16(const void *p, size_t item, ptrdiff_t pf) {
    if (pf) {
        const char *a = (const char *)p + pf;
        cn_prefetch_line(a);
        if (item == 8) cn_prefetch_line(a + 64);
    }
}

/* The row, column and four-row column loops below are written once for a
 * vector family P (v: native width, y: 4-wide), whose vectors cn_<P>d hold
 * CN_W(P) doubles and whose helpers are cn_<P>splat, cn_<P>ld_<type>,
 * cn_<P>st_f64, cn_<P>add_fu and cn_<P>tree16. */
#define CN_W(P) ((int)(sizeof(cn_##P##d) / sizeof(double)))
#if defined(__AVX512F__)
/* float32 loops on AVX-512: both widths, cn_*_f32_y (256-bit) and cn_*_f32_z
 * (512-bit), chosen per call by cn_f32_zmm (set at import by cnorm._config:
 * 256-bit on AMD cores, where a zmm operation takes both halves of the
 * 256-bit pipes, 512-bit on Intel cores with full-width units; the
 * CNORM_F32_VECTOR_BITS environment variable forces either).  The lanes and
 * the tree are the same, so are the results. */
static int cn_f32_zmm = 0;
#define CN_F32_FAMILY(DEFINE, ...) \
    DEFINE(f32_y, f32, float, y, __VA_ARGS__) DEFINE(f32_z, f32, float, v, __VA_ARGS__)
#elif defined(__AVX__)
#define CN_F32_FAMILY(DEFINE, ...) DEFINE(f32, f32, float, y, __VA_ARGS__)
#else
#define CN_F32_FAMILY(DEFINE, ...) DEFINE(f32, f32, float, v, __VA_ARGS__)
#endif

#define CN_DEFINE_ROW(NAME, SUFFIX, T, P, CONV)                                         \
/* the vector steps of the one pass: elements [0, n - n % 16) into the 16      \
 * lanes (a, q), which start at zero; returns n - n % 16 */                      \
static inline __attribute__((always_inline)) ptrdiff_t cn_centred_##NAME##_lanes(  \
        const T *__restrict p, ptrdiff_t n, double c, cn_##P##d *a, cn_##P##d *q,   \
        ptrdiff_t pf) {                                                          \
    enum { W = CN_W(P), NV = 16 / CN_W(P) };                                     \
    cn_##P##d cv = cn_##P##splat(c);                                             \
    for (int k = 0; k < NV; k++) a[k] = q[k] = cn_##P##splat(0.0);               \
    ptrdiff_t i, nv = n - n % 16;                                                \
    for (i = 0; i < nv; i += 16)                                                 \
        for (int k = 0; k < NV; k++) {                                           \
            if (k == 0 && (sizeof(T) > 2 || i % 32 == 0))                        \
                cn_prefetch16(p + i, sizeof(T), pf);                             \
            cn_##P##d d = cn_##P##ld_##SUFFIX(p + i + k * W) - cv;               \
            a[k] = cn_##P##add_fu(a[k], d);  /* a[k] + d, on the FMA pipes */    \
            q[k] = cn_##P##add_fu(q[k], d * d);                                  \
        }                                                                        \
    return nv;                                                                   \
}                                                                                \
/* the lanes as 16 doubles each: lane k * W + j is element j of vector k */      \
static inline ptrdiff_t cn_centred_##NAME##_lanes16(const T *__restrict p,         \
        ptrdiff_t n, double c, double *A, double *Q, ptrdiff_t pf) {             \
    enum { NV = 16 / CN_W(P) };                                                  \
    cn_##P##d a[NV], q[NV];                                                      \
    ptrdiff_t nv = cn_centred_##NAME##_lanes(p, n, c, a, q, pf);                 \
    memcpy(A, a, sizeof a);                                                      \
    memcpy(Q, q, sizeof q);                                                      \
    return nv;                                                                   \
}                                                                                \
/* the one pass: S1 += sum(x - c), S2 += sum((x - c)^2) in float64 */           \
static inline void cn_centred_##NAME(const T *__restrict p, ptrdiff_t n,          \
                                       double c, double *s1, double *s2,         \
                                       ptrdiff_t pf) {                           \
    enum { NV = 16 / CN_W(P) };                                                  \
    cn_##P##d a[NV], q[NV];                                                      \
    ptrdiff_t i = cn_centred_##NAME##_lanes(p, n, c, a, q, pf);                  \
    double t1 = 0.0, t2 = 0.0;                                                   \
    for (; i < n; i++) { double d = CONV(p[i]) - c; t1 += d; t2 += d * d; }       \
    *s1 += cn_##P##tree16(a) + t1;                                               \
    *s2 += cn_##P##tree16(q) + t2;                                               \
}

#define CN_CONV_F(v) ((double)(v))
#define CN_CONV_H(v) cn_half_to_double(v)
CN_DEFINE_ROW(f16, f16, uint16_t, v, CN_CONV_H)
CN_F32_FAMILY(CN_DEFINE_ROW, CN_CONV_F)

/* float64: the same sums in double-double.  d = x - c exactly as
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

/* cn_dd_add lane by lane (the same operations) */
static inline void cn_vdd_add(cn_vd *h, cn_vd *l, cn_vd bh, cn_vd bl) {
    cn_vd s = *h + bh, bb = s - *h;
    cn_vd e = (*h - (s - bb)) + (bh - bb);
    e += *l + bl;
    cn_vd t = s + e;
    *l = e - (t - s);
    *h = t;
}

/* The double-double tree over 16 lanes (h[k], l[k]): the pairing of
 * cn_vtree16 with cn_dd_add at every node; lane 0's result goes to *H, *L.
 * The levels w >= CN_VW run on whole vectors, the rest on scalars. */
static inline void cn_dd_tree16(cn_vd *h, cn_vd *l, double *H, double *L) {
#if CN_NV == 8      /* w = 8 */
    cn_vdd_add(&h[0], &l[0], h[4], l[4]);
    cn_vdd_add(&h[1], &l[1], h[5], l[5]);
    cn_vdd_add(&h[2], &l[2], h[6], l[6]);
    cn_vdd_add(&h[3], &l[3], h[7], l[7]);
#endif
#if CN_NV >= 4      /* w = 8 (CN_NV == 4) or 4 (CN_NV == 8) */
    cn_vdd_add(&h[0], &l[0], h[2], l[2]);
    cn_vdd_add(&h[1], &l[1], h[3], l[3]);
#endif
    cn_vdd_add(&h[0], &l[0], h[1], l[1]);   /* w = CN_VW */
    double hs[CN_VW], ls[CN_VW];
    memcpy(hs, &h[0], sizeof hs);
    memcpy(ls, &l[0], sizeof ls);
    for (int w = CN_VW / 2; w >= 1; w /= 2)  /* w < CN_VW */
        for (int j = 0; j < w; j++) cn_dd_add(&hs[j], &ls[j], hs[j + w], ls[j + w]);
    *H = hs[0];
    *L = ls[0];
}

/* one element per lane into the double-double sums; needs cn_vd cv (the
 * centre) and two (2.0) in scope.  The operations of cn_two_sum / cn_dd_add
 * in the same order; 10 of the 23 additions go to the multiply-add pipes
 * (cn_vadd_fu / cn_vsub_fu, the same bits): with every addition on the two
 * FP-add pipes this step was bound by them (AMD EPYC family 26, Zen 5:
 * 0.42 -> 0.29-0.32 ns/element with AVX-512, 0.81 -> 0.58 with AVX2,
 * L1-resident, tools/simd_microbench.c). */
#define CN_DD_LANE_STEP(x, h1, l1, h2, l2) do {                                   \
    cn_vd d_ = (x) - cv, bb_ = cn_vsub_fu(d_, (x));                              \
    cn_vd de_ = cn_vsub_fu((x), d_ - bb_) + (-cv - bb_);                          \
    cn_vd t_ = h1 + d_, b2_ = cn_vsub_fu(t_, h1);                                \
    l1 += cn_vadd_fu(cn_vsub_fu(h1, t_ - b2_), d_ - b2_) + de_;                  \
    h1 = t_;                                                                     \
    cn_vd q_ = d_ * d_;                                                          \
    cn_vd qe_ = cn_vadd_fu(cn_v_two_prod_err(d_, d_, q_), two * d_ * de_);       \
    t_ = h2 + q_;                                                                \
    b2_ = cn_vsub_fu(t_, h2);                                                    \
    l2 = cn_vadd_fu(l2, cn_vadd_fu(cn_vsub_fu(h2, t_ - b2_), q_ - b2_) + qe_);   \
    h2 = t_;                                                                     \
} while (0)

/* The vector steps of cn_centred_f64: elements [0, n - n % 16) into the 16
 * lanes (h1, l1, h2, l2), which start at zero; returns n - n % 16. */
static inline __attribute__((always_inline)) ptrdiff_t cn_centred_f64_lanes(
        const double *__restrict p, ptrdiff_t n, double c, cn_vd *h1, cn_vd *l1, cn_vd *h2,
        cn_vd *l2, ptrdiff_t pf) {
    const cn_vd cv = cn_vsplat(c), two = cn_vsplat(2.0);
    for (int k = 0; k < CN_NV; k++) h1[k] = l1[k] = h2[k] = l2[k] = cn_vsplat(0.0);
    ptrdiff_t i, nv = n - n % 16;
    for (i = 0; i < nv; i += 16)
        for (int k = 0; k < CN_NV; k++) {
            if (k == 0) cn_prefetch16(p + i, 8, pf);
            cn_vd x = cn_vld_f64(p + i + k * CN_VW);
            CN_DD_LANE_STEP(x, h1[k], l1[k], h2[k], l2[k]);
        }
    return nv;
}

static inline void cn_centred_f64(const double *__restrict p, ptrdiff_t n, double c,
                                  double *s1h, double *s1l, double *s2h, double *s2l,
                                  ptrdiff_t pf) {
    cn_vd h1[CN_NV], l1[CN_NV], h2[CN_NV], l2[CN_NV];
    ptrdiff_t i = cn_centred_f64_lanes(p, n, c, h1, l1, h2, l2, pf);
    if (i < n) {  /* tail into lane 0 (element 0 of vector 0), scalar cn_dd_add */
        double H1 = h1[0][0], L1 = l1[0][0], H2 = h2[0][0], L2 = l2[0][0];
        for (; i < n; i++) {
            double x = p[i], d = x - c, bb = d - x;
            double de = (x - (d - bb)) + (-c - bb);
            double q = d * d;
            cn_dd_add(&H1, &L1, d, de);
            cn_dd_add(&H2, &L2, q, cn_two_prod_err(d, d, q) + 2.0 * d * de);
        }
        h1[0] = cn_vset0(h1[0], H1); l1[0] = cn_vset0(l1[0], L1);
        h2[0] = cn_vset0(h2[0], H2); l2[0] = cn_vset0(l2[0], L2);
    }
    double H1, L1, H2, L2;
    cn_dd_tree16(h1, l1, &H1, &L1);
    cn_dd_tree16(h2, l2, &H2, &L2);
    cn_dd_add(s1h, s1l, H1, L1);
    cn_dd_add(s2h, s2l, H2, L2);
}

/* ---- one row of a column block: per-column centred sums (channels-last) ----
 * s1[j] += x[j] - c[j], s2[j] += (x[j] - c[j])^2 for j < n; float64 input
 * keeps double-double sums (h1, l1, h2, l2).  Columns are independent, so
 * the vector width does not matter, but the split does: columns below
 * n - n % 8 take the vector step, the rest the scalar tail (for float64 the
 * two differ in rounding), eight columns (8 / CN_W(P) vectors) at a time. */
#define CN_DEFINE_COLS(NAME, SUFFIX, T, P, CONV)                                        \
static inline void cn_cols_centred_##NAME(const T *__restrict x, ptrdiff_t n,     \
        const double *__restrict c, double *__restrict s1, double *__restrict s2) { \
    ptrdiff_t j, nv = n - n % 8;                                                 \
    for (j = 0; j < nv; j += 8)                                                  \
        for (int k = 0; k < 8; k += CN_W(P)) {                                   \
            cn_##P##d d = cn_##P##ld_##SUFFIX(x + j + k) - cn_##P##ld_f64(c + j + k); \
            cn_##P##st_f64(s1 + j + k, cn_##P##add_fu(cn_##P##ld_f64(s1 + j + k), d)); \
            cn_##P##st_f64(s2 + j + k, cn_##P##ld_f64(s2 + j + k) + d * d);     \
        }                                                                        \
    for (; j < n; j++) { double d = CONV(x[j]) - c[j]; s1[j] += d; s2[j] += d * d; } \
}
CN_DEFINE_COLS(f16, f16, uint16_t, v, CN_CONV_H)
CN_F32_FAMILY(CN_DEFINE_COLS, CN_CONV_F)

/* Four rows (byte stride rs) at once: the column sums stay in registers for
 * four additions instead of a load and a store per row.  Each column still
 * adds row 0, 1, 2, 3 in order, so the sums are bitwise those of four calls
 * of the one-row function.
 *
 * pf > 0: prefetch the same columns pf bytes further on (rows ahead) while
 * reading these.  The four rows are four streams that each end after one row
 * (the next four rows start new ones), and the hardware prefetcher kept
 * losing them: moments over axis 0 of a 40 MiB (10240, 1024) float32 array
 * ran at ~2x the read floor, 1.2x with this (rows of 256 bytes 1.6x, 1.0x).  A
 * prefetch never faults, so reading ahead of the last row needs no check. */
static inline void cn_prefetch_rows4(const char *p, ptrdiff_t rs, ptrdiff_t off) {
    for (int r = 0; r < 4; r++) cn_prefetch_line(p + r * rs + off);
}

#define CN_DEFINE_COLS4(NAME, SUFFIX, T, P, CONV)                                       \
static inline void cn_cols_centred4_##NAME(const T *__restrict x, ptrdiff_t rs,   \
        ptrdiff_t n, const double *__restrict c, double *__restrict s1,          \
        double *__restrict s2, ptrdiff_t pf) {                                   \
    const char *b = (const char *)x;                                             \
    ptrdiff_t j, nv = n - n % 8;                                                 \
    for (j = 0; j < nv; j += 8)                                                  \
        for (int k = 0; k < 8; k += CN_W(P)) {                                   \
            if (pf && k == 0) cn_prefetch_rows4(b + pf, rs, j * sizeof(T));     \
            cn_##P##d cv = cn_##P##ld_f64(c + j + k);                            \
            cn_##P##d a = cn_##P##ld_f64(s1 + j + k), q = cn_##P##ld_f64(s2 + j + k); \
            for (int r = 0; r < 4; r++) {                                        \
                cn_##P##d d = cn_##P##ld_##SUFFIX((const T *)(b + r * rs) + j + k) - cv; \
                a = cn_##P##add_fu(a, d);                                        \
                q = cn_##P##add_fu(q, d * d);                                    \
            }                                                                    \
            cn_##P##st_f64(s1 + j + k, a);                                       \
            cn_##P##st_f64(s2 + j + k, q);                                       \
        }                                                                        \
    for (int r = 0; r < 4; r++)                                                  \
        for (ptrdiff_t t = j; t < n; t++) {                                      \
            double d = CONV(((const T *)(b + r * rs))[t]) - c[t];                \
            s1[t] += d;                                                          \
            s2[t] += d * d;                                                      \
        }                                                                        \
}
CN_DEFINE_COLS4(f16, f16, uint16_t, v, CN_CONV_H)
CN_F32_FAMILY(CN_DEFINE_COLS4, CN_CONV_F)

#if defined(__AVX512F__)
static inline void cn_centred_f32(const float *__restrict p, ptrdiff_t n, double c,
                                  double *s1, double *s2, ptrdiff_t pf) {
    if (cn_f32_zmm) cn_centred_f32_z(p, n, c, s1, s2, pf);
    else cn_centred_f32_y(p, n, c, s1, s2, pf);
}
static inline ptrdiff_t cn_centred_f32_lanes16(const float *__restrict p, ptrdiff_t n, double c,
                                               double *A, double *Q, ptrdiff_t pf) {
    return cn_f32_zmm ? cn_centred_f32_z_lanes16(p, n, c, A, Q, pf)
                      : cn_centred_f32_y_lanes16(p, n, c, A, Q, pf);
}
static inline void cn_cols_centred_f32(const float *__restrict x, ptrdiff_t n,
        const double *__restrict c, double *__restrict s1, double *__restrict s2) {
    if (cn_f32_zmm) cn_cols_centred_f32_z(x, n, c, s1, s2);
    else cn_cols_centred_f32_y(x, n, c, s1, s2);
}
static inline void cn_cols_centred4_f32(const float *__restrict x, ptrdiff_t rs, ptrdiff_t n,
        const double *__restrict c, double *__restrict s1, double *__restrict s2,
        ptrdiff_t pf) {
    if (cn_f32_zmm) cn_cols_centred4_f32_z(x, rs, n, c, s1, s2, pf);
    else cn_cols_centred4_f32_y(x, rs, n, c, s1, s2, pf);
}
#endif
/* the float32 vector width in bits: 512 (zmm), 256 (ymm) or that of the
 * build's native vectors */
static inline int cn_f32_vector_bits(void) {
#if defined(__AVX512F__)
    return cn_f32_zmm ? 512 : 256;
#else
    return CN_VW * 64;
#endif
}
/* set it on AVX-512 (bits 512 or 256); elsewhere nothing changes */
static inline void cn_set_f32_vector_bits(int bits) {
#if defined(__AVX512F__)
    cn_f32_zmm = bits == 512;
#else
    (void)bits;
#endif
}

static inline void cn_cols_centred_f64(const double *__restrict x, ptrdiff_t n,
        const double *__restrict c, double *__restrict h1, double *__restrict l1,
        double *__restrict h2, double *__restrict l2) {
    const cn_vd two = cn_vsplat(2.0);
    ptrdiff_t j, nv = n - n % 8;
    for (j = 0; j < nv; j += 8)
        for (int k = j; k < j + 8; k += CN_VW) {
            cn_vd xv = cn_vld_f64(x + k), cv = cn_vld_f64(c + k);
            cn_vd H1 = cn_vld_f64(h1 + k), L1 = cn_vld_f64(l1 + k);
            cn_vd H2 = cn_vld_f64(h2 + k), L2 = cn_vld_f64(l2 + k);
            CN_DD_LANE_STEP(xv, H1, L1, H2, L2);
            cn_vst_f64(h1 + k, H1); cn_vst_f64(l1 + k, L1);
            cn_vst_f64(h2 + k, H2); cn_vst_f64(l2 + k, L2);
        }
    for (; j < n; j++) {
        double xs = x[j], d = xs - c[j], bb = d - xs;
        double de = (xs - (d - bb)) + (-c[j] - bb);
        double q = d * d;
        cn_dd_add(&h1[j], &l1[j], d, de);
        cn_dd_add(&h2[j], &l2[j], q, cn_two_prod_err(d, d, q) + 2.0 * d * de);
    }
}

/* four rows of float64 columns at once (double-double sums kept in registers;
 * each column adds rows 0..3 in order, as four one-row calls would) */
static inline void cn_cols_centred4_f64(const double *__restrict x, ptrdiff_t rs, ptrdiff_t n,
        const double *__restrict c, double *__restrict h1, double *__restrict l1,
        double *__restrict h2, double *__restrict l2, ptrdiff_t pf) {
    const cn_vd two = cn_vsplat(2.0);
    const char *b = (const char *)x;
    ptrdiff_t j, nv = n - n % 8;
    for (j = 0; j < nv; j += 8)
        for (int k = j; k < j + 8; k += CN_VW) {
            if (pf && k == j) cn_prefetch_rows4(b + pf, rs, j * 8);
            cn_vd cv = cn_vld_f64(c + k);
            cn_vd H1 = cn_vld_f64(h1 + k), L1 = cn_vld_f64(l1 + k);
            cn_vd H2 = cn_vld_f64(h2 + k), L2 = cn_vld_f64(l2 + k);
            for (int r = 0; r < 4; r++) {
                cn_vd xv = cn_vld_f64((const double *)(b + r * rs) + k);
                CN_DD_LANE_STEP(xv, H1, L1, H2, L2);
            }
            cn_vst_f64(h1 + k, H1); cn_vst_f64(l1 + k, L1);
            cn_vst_f64(h2 + k, H2); cn_vst_f64(l2 + k, L2);
        }
    for (int r = 0; r < 4; r++)
        for (ptrdiff_t t = j; t < n; t++) {
            double xs = ((const double *)(b + r * rs))[t], d = xs - c[t], bb = d - xs;
            double de = (xs - (d - bb)) + (-c[t] - bb);
            double q = d * d;
            cn_dd_add(&h1[t], &l1[t], d, de);
            cn_dd_add(&h2[t], &l2[t], q, cn_two_prod_err(d, d, q) + 2.0 * d * de);
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

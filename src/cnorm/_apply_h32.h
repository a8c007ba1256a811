/* The apply pass of float16 data in float32 arithmetic.
 *
 * float16 outputs are computed as
 *
 *     y = half(act((((x - m0) - m1) * r0) * w32 + b32))      (every step float32)
 *
 * with m0 = float(mean_hi), m1 = float((mean_hi - m0) + mean_lo) (the mean as
 * a float32 pair), r0 = float(rstd), w32 = float(w), b32 = float(b), when
 * |mean_hi|, rstd, |w| and |b| are at most CN_H32_LIMIT; an element whose
 * statistics or parameters are outside that range (or NaN / inf: a NaN
 * slice, rstd = inf for a constant slice with eps = 0, absurd running
 * statistics or parameters) keeps the float64 expression of _apply_simd.h.
 * Below the limit no step can overflow float32 (|x - m| <= 2^32 + 2^16 for
 * half data, so every intermediate stays under 2^98) and the float32 steps
 * add at most ~2^-22 relative error before the single rounding to float16
 * (2^-11): the normalized output stays within 0.5 ulp + 2^-11 ulp of the
 * exact value (SPEC §3: 1 ulp), a constant slice still gives exactly 0 (x =
 * m0, m1 = 0) and then the bias, and the result is rounded once, float32 to
 * float16, where the float64 expression went through float32 (two
 * roundings).
 *
 * Why: the float64 expression spends four precision conversions per element
 * (half -> float -> double -> float -> half), all on the two FP-add pipes of
 * this AMD core, and processes 8 elements per zmm; float32 needs two
 * conversions and 16 elements per zmm.  1024-element rows in L1, AVX-512
 * (tools/apply_microbench.c): no affine 0.197 -> 0.073 ns/element,
 * per-element affine 0.254 -> 0.100 (with the parameters as float32 arrays
 * made once per call; converting float64 parameters in the loop gave 0.194).
 *
 * The same definition, element by element, is cn_h32_value (the chunked
 * loops of _elementwise.pxi: any activation, any layout) and the Numba
 * backend's _h32_value; every path gives the same bits.
 */
#ifndef CNORM_APPLY_H32_H
#define CNORM_APPLY_H32_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <math.h>
#include "_simd.h"

#define CN_H32_LIMIT 0x1p32

static inline int cn_h32_in_range(double v) { return fabs(v) <= CN_H32_LIMIT; }

/* the float32 statistics of one slice; 0 when they are out of range */
static inline int cn_h32_stats(double mh, double ml, double rs, float *m0, float *m1,
                               float *r0) {
    if (!(cn_h32_in_range(mh) && cn_h32_in_range(rs) && fabs(ml) <= CN_H32_LIMIT))
        return 0;
    const float a = (float)mh;
    *m0 = a;
    *m1 = (float)((mh - (double)a) + ml);
    *r0 = (float)rs;
    return 1;
}

static inline float cn_h32_load1(const uint16_t *p, ptrdiff_t i) {
#if defined(__F16C__)
    return _cvtsh_ss(p[i]);
#else
    return cn_half_to_float_sw(p[i]);
#endif
}

static inline void cn_h32_store1(uint16_t *p, ptrdiff_t i, float v) {
#if defined(__F16C__)
    p[i] = (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
#else
    p[i] = cn_float_to_half_sw(v);
#endif
}

/* one element in float32 (statistics and parameters already float32) */
static inline float cn_h32_one(float x, float m0, float m1, float r0, float w, float b,
                               int relu) {
    const float v = (((x - m0) - m1) * r0) * w + b;
    return (relu && v < 0.0f) ? 0.0f : v;
}

/* The definition, one element, from the float64 statistics and parameters:
 * the float32 expression where they are in range (its value, exact in a
 * double), the float64 expression otherwise; no activation. */
static inline double cn_h32_value(double x, double mh, double ml, double rs, double w,
                                  double b) {
    float m0, m1, r0;
    if (cn_h32_stats(mh, ml, rs, &m0, &m1, &r0) && cn_h32_in_range(w) && cn_h32_in_range(b))
        return (double)cn_h32_one((float)x, m0, m1, r0, (float)w, (float)b, 0);
    return (((x - mh) - ml) * rs) * w + b;
}

/* Float32 copies of the parameters w[0, np) and b[0, np), and of per-element
 * statistics mh/ml/rs[0, ns) (ns = 0: none), made once per call.  Returns 1
 * when every value is in range and the copies exist; 0 otherwise (out of
 * memory too), and then the caller takes the per-element loop
 * (cn_h32_value), which gives the same results. */
typedef struct {
    float *w, *b, *m0, *m1, *r0;
    void *mem;
} cn_h32_prep;

static int cn_h32_prepare(cn_h32_prep *p, const double *w, const double *b, ptrdiff_t np,
                          const double *mh, const double *ml, const double *rs,
                          ptrdiff_t ns) {
    memset(p, 0, sizeof *p);
    for (ptrdiff_t i = 0; i < np; i++)
        if (!(cn_h32_in_range(w[i]) && cn_h32_in_range(b[i]))) return 0;
    float *m = (float *)malloc((size_t)(2 * np + 3 * ns + 1) * sizeof(float));
    if (m == NULL) return 0;
    p->mem = m;
    p->w = m;
    p->b = m + np;
    p->m0 = m + 2 * np;
    p->m1 = p->m0 + ns;
    p->r0 = p->m1 + ns;
    for (ptrdiff_t i = 0; i < np; i++) {
        p->w[i] = (float)w[i];
        p->b[i] = (float)b[i];
    }
    for (ptrdiff_t i = 0; i < ns; i++)
        if (!cn_h32_stats(mh[i], ml[i], rs[i], &p->m0[i], &p->m1[i], &p->r0[i])) {
            free(m);
            memset(p, 0, sizeof *p);
            return 0;
        }
    return 1;
}

static void cn_h32_release(cn_h32_prep *p) {
    free(p->mem);
    memset(p, 0, sizeof *p);
}

/* ---- the vector loops: 16 halves per step in one zmm (AVX-512), two ymm
 * (AVX2 + F16C), or scalar steps (baseline, no F16C) ---- */
#if defined(__AVX512F__)
#define CN_H_STEP 16
typedef __m512 cn_hv;
static inline cn_hv cn_hv_load(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
static inline void cn_hv_store(uint16_t *p, cn_hv v) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
static inline cn_hv cn_hv_splat(float f) { return _mm512_set1_ps(f); }
static inline cn_hv cn_hv_ld(const float *p) { return _mm512_loadu_ps(p); }
/* a - b as fma(b, -1, a) on the multiply-add pipes (the same bits; the
 * conversions occupy the add pipes) */
static inline cn_hv cn_hv_sub(cn_hv a, cn_hv b) {
    return _mm512_fmadd_ps(b, _mm512_set1_ps(-1.0f), a);
}
static inline cn_hv cn_hv_mul(cn_hv a, cn_hv b) { return _mm512_mul_ps(a, b); }
static inline cn_hv cn_hv_add(cn_hv a, cn_hv b) { return _mm512_add_ps(a, b); }
/* negatives to +0; NaN and -0.0 kept (v < 0 is false for them) */
static inline cn_hv cn_hv_relu(cn_hv v) {
    const __m512 z = _mm512_setzero_ps();
    return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, z, _CMP_LT_OQ), z);
}
#elif defined(__AVX__) && defined(__F16C__) && defined(__FMA__)
#define CN_H_STEP 8
typedef __m256 cn_hv;
static inline cn_hv cn_hv_load(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static inline void cn_hv_store(uint16_t *p, cn_hv v) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
static inline cn_hv cn_hv_splat(float f) { return _mm256_set1_ps(f); }
static inline cn_hv cn_hv_ld(const float *p) { return _mm256_loadu_ps(p); }
static inline cn_hv cn_hv_sub(cn_hv a, cn_hv b) {
    return _mm256_fmadd_ps(b, _mm256_set1_ps(-1.0f), a);
}
static inline cn_hv cn_hv_mul(cn_hv a, cn_hv b) { return _mm256_mul_ps(a, b); }
static inline cn_hv cn_hv_add(cn_hv a, cn_hv b) { return _mm256_add_ps(a, b); }
static inline cn_hv cn_hv_relu(cn_hv v) {
    return _mm256_andnot_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ), v);
}
#else
#define CN_H_STEP 0   /* scalar steps only */
#endif

/* One row of n halves.  svec / pvec: statistics / parameters per element
 * (else index 0 for the whole row).  plain: no affine (w = 1, b = 0 for the
 * whole row, decided on the float64 values): the vector steps leave out the
 * exact "* 1 + 0" as the float64 loop does; heads and tails use the whole
 * expression (the float64 loop's tails do too: they differ only in the sign
 * of a zero). */
static inline __attribute__((always_inline)) void cn_apply_row_h32_k(
        const uint16_t *x, uint16_t *y, ptrdiff_t n, const float *m0, const float *m1,
        const float *r0, int svec, const float *w, const float *b, int pvec, int plain,
        int relu) {
    ptrdiff_t i = 0;
#if CN_H_STEP
    const ptrdiff_t nv = n / CN_H_STEP * CN_H_STEP;
    if (!svec) {
        const cn_hv M0 = cn_hv_splat(m0[0]), M1 = cn_hv_splat(m1[0]), R0 = cn_hv_splat(r0[0]);
        if (plain) {
            for (; i < nv; i += CN_H_STEP) {
                cn_hv v = cn_hv_mul(cn_hv_sub(cn_hv_sub(cn_hv_load(x + i), M0), M1), R0);
                cn_hv_store(y + i, relu ? cn_hv_relu(v) : v);
            }
        } else if (!pvec) {
            const cn_hv W = cn_hv_splat(w[0]), B = cn_hv_splat(b[0]);
            for (; i < nv; i += CN_H_STEP) {
                cn_hv v = cn_hv_mul(cn_hv_sub(cn_hv_sub(cn_hv_load(x + i), M0), M1), R0);
                v = cn_hv_add(cn_hv_mul(v, W), B);
                cn_hv_store(y + i, relu ? cn_hv_relu(v) : v);
            }
        } else {
            for (; i < nv; i += CN_H_STEP) {
                cn_hv v = cn_hv_mul(cn_hv_sub(cn_hv_sub(cn_hv_load(x + i), M0), M1), R0);
                v = cn_hv_add(cn_hv_mul(v, cn_hv_ld(w + i)), cn_hv_ld(b + i));
                cn_hv_store(y + i, relu ? cn_hv_relu(v) : v);
            }
        }
    } else {
        const cn_hv W = cn_hv_splat(w[0]), B = cn_hv_splat(b[0]);
        for (; i < nv; i += CN_H_STEP) {
            cn_hv v = cn_hv_sub(cn_hv_sub(cn_hv_load(x + i), cn_hv_ld(m0 + i)), cn_hv_ld(m1 + i));
            v = cn_hv_mul(v, cn_hv_ld(r0 + i));
            v = pvec ? cn_hv_add(cn_hv_mul(v, cn_hv_ld(w + i)), cn_hv_ld(b + i))
                     : cn_hv_add(cn_hv_mul(v, W), B);
            cn_hv_store(y + i, relu ? cn_hv_relu(v) : v);
        }
    }
#else
    (void)plain;
#endif
    for (; i < n; i++)
        cn_h32_store1(y, i, cn_h32_one(cn_h32_load1(x, i), m0[svec ? i : 0], m1[svec ? i : 0],
                                       r0[svec ? i : 0], w[pvec ? i : 0], b[pvec ? i : 0],
                                       relu));
}

static void cn_apply_row_h32(const uint16_t *x, uint16_t *y, ptrdiff_t n, const float *m0,
                             const float *m1, const float *r0, int svec, const float *w,
                             const float *b, int pvec, int plain, int relu) {
    cn_apply_row_h32_k(x, y, n, m0, m1, r0, svec, w, b, pvec, plain, relu);
}

/* Channels last: R rows of L halves back to back, statistics and parameters
 * per element of a row. */
static void cn_apply_rows_percol_h32(const uint16_t *x, uint16_t *y, ptrdiff_t R, ptrdiff_t L,
                                     const float *m0, const float *m1, const float *r0,
                                     const float *w, const float *b, int relu) {
    for (ptrdiff_t r = 0; r < R; r++)
        cn_apply_row_h32_k(x + r * L, y + r * L, L, m0, m1, r0, 1, w, b, 1, 0, relu);
}

#endif

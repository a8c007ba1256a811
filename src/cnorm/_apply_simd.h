/* The apply pass of a contiguous row, fused into one vector loop:
 *
 *     y[i] = act((((x[i] - mh) - ml) * rs) * w + b)
 *
 * with the statistics (mh, ml, rs) and the affine parameters (w, b) either
 * one value for the whole row or one per element (channels-last batch norm
 * has both per element; layer norm with an affine has per-element w, b).
 * The arithmetic is float64 and exactly the expression above, element by
 * element (-ffp-contract=off): the result does not depend on the ISA level
 * or on which of the loops below ran, and it is the same expression as the
 * chunked loop of _elementwise.pxi and the Numba/NumPy backends.
 *
 * act is 0 (none) or 1 (ReLU, NaN kept); other activations use the chunked
 * loop in _elementwise.pxi.
 *
 * Non-temporal stores: when `stream` is set, the aligned body of the row is
 * written with streaming stores that bypass the caches.  A normalization whose
 * output is larger than the last-level cache would otherwise read every output
 * line from memory before overwriting it (read-for-ownership), 1.5x the traffic
 * of a copy; np.copyto (glibc memcpy) streams large copies, so this is what
 * reaching the copy floor needs.  The caller issues cn_store_fence() before
 * the data are used by another thread.  Float16 rows never stream: with eight
 * halves (16 bytes) per store, a 40 MiB batch_norm ran 10x slower streamed.
 */
#ifndef CNORM_APPLY_SIMD_H
#define CNORM_APPLY_SIMD_H
#include <stdint.h>
#include <string.h>
#include <stddef.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include "_simd.h"

/* Eight elements per step, held in native-width vectors: one zmm on AVX-512,
 * two ymm on AVX2, four xmm on SSE2 (a 64-byte GCC vector would be split
 * through memory on the narrower levels). */
#if defined(__AVX512F__)
#define CN_AW 8
#elif defined(__AVX__)
#define CN_AW 4
#else
#define CN_AW 2
#endif
#define CN_AN (8 / CN_AW)
typedef double cn_ad __attribute__((vector_size(CN_AW * 8)));
typedef long long cn_al __attribute__((vector_size(CN_AW * 8)));
typedef struct { cn_ad v[CN_AN]; } cn_a8;

static inline cn_ad cn_a_ld(const double *p) {
    cn_ad v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline cn_ad cn_a_splat(double d) {
    cn_ad v;
    for (int j = 0; j < CN_AW; j++) v[j] = d;
    return v;
}

/* ReLU: negatives to +0, NaN and -0.0 kept (as the scalar v < 0 ? 0 : v) */
static inline cn_ad cn_a_relu(cn_ad v) {
    const cn_ad zero = cn_a_splat(0.0);
    return (cn_ad)((cn_al)v & ~(cn_al)(v < zero));
}

static inline cn_a8 cn_a_load(const void *p, int kind) {
    cn_a8 r;
    if (kind == 2) {                      /* float64 */
        for (int j = 0; j < CN_AN; j++) r.v[j] = cn_a_ld((const double *)p + j * CN_AW);
    } else if (kind == 1) {               /* float32 */
#if defined(__AVX512F__)
        r.v[0] = (cn_ad)_mm512_cvtps_pd(_mm256_loadu_ps((const float *)p));
#elif defined(__AVX__)
        r.v[0] = (cn_ad)_mm256_cvtps_pd(_mm_loadu_ps((const float *)p));
        r.v[1] = (cn_ad)_mm256_cvtps_pd(_mm_loadu_ps((const float *)p + 4));
#else
        __m128 lo = _mm_loadu_ps((const float *)p), hi = _mm_loadu_ps((const float *)p + 4);
        r.v[0] = (cn_ad)_mm_cvtps_pd(lo);
        r.v[1] = (cn_ad)_mm_cvtps_pd(_mm_movehl_ps(lo, lo));
        r.v[2] = (cn_ad)_mm_cvtps_pd(hi);
        r.v[3] = (cn_ad)_mm_cvtps_pd(_mm_movehl_ps(hi, hi));
#endif
    } else {                              /* float16 */
#if defined(__AVX512F__)
        r.v[0] = (cn_ad)_mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX__) && defined(__F16C__)
        __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        r.v[0] = (cn_ad)_mm256_cvtps_pd(_mm256_castps256_ps128(f));
        r.v[1] = (cn_ad)_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
#else
        double buf[8];
        cn_half8_to_double((const uint16_t *)p, buf);
        memcpy(&r, buf, 64);
#endif
    }
    return r;
}

static inline void cn_a_store(void *p, cn_a8 r, int kind, int stream) {
    if (kind == 2) {
        if (stream) {
#if defined(__AVX512F__)
            _mm512_stream_pd((double *)p, (__m512d)r.v[0]);
#elif defined(__AVX__)
            _mm256_stream_pd((double *)p, (__m256d)r.v[0]);
            _mm256_stream_pd((double *)p + 4, (__m256d)r.v[1]);
#else
            for (int j = 0; j < 4; j++) _mm_stream_pd((double *)p + 2 * j, (__m128d)r.v[j]);
#endif
            return;
        }
        for (int j = 0; j < CN_AN; j++) memcpy((double *)p + j * CN_AW, &r.v[j], CN_AW * 8);
    } else if (kind == 1) {
#if defined(__AVX512F__)
        __m256 f = _mm512_cvtpd_ps((__m512d)r.v[0]);
        if (stream) _mm256_stream_ps((float *)p, f); else _mm256_storeu_ps((float *)p, f);
#elif defined(__AVX__)
        __m128 lo = _mm256_cvtpd_ps((__m256d)r.v[0]), hi = _mm256_cvtpd_ps((__m256d)r.v[1]);
        if (stream) { _mm_stream_ps((float *)p, lo); _mm_stream_ps((float *)p + 4, hi); }
        else { _mm_storeu_ps((float *)p, lo); _mm_storeu_ps((float *)p + 4, hi); }
#else
        __m128 lo = _mm_movelh_ps(_mm_cvtpd_ps((__m128d)r.v[0]), _mm_cvtpd_ps((__m128d)r.v[1]));
        __m128 hi = _mm_movelh_ps(_mm_cvtpd_ps((__m128d)r.v[2]), _mm_cvtpd_ps((__m128d)r.v[3]));
        if (stream) { _mm_stream_ps((float *)p, lo); _mm_stream_ps((float *)p + 4, hi); }
        else { _mm_storeu_ps((float *)p, lo); _mm_storeu_ps((float *)p + 4, hi); }
#endif
    } else {
#if defined(__AVX512F__)
        __m128i h = _mm256_cvtps_ph(_mm512_cvtpd_ps((__m512d)r.v[0]), _MM_FROUND_TO_NEAREST_INT);
#elif defined(__AVX__) && defined(__F16C__)
        __m128 lo = _mm256_cvtpd_ps((__m256d)r.v[0]), hi = _mm256_cvtpd_ps((__m256d)r.v[1]);
        __m128i h = _mm256_cvtps_ph(_mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1),
                                    _MM_FROUND_TO_NEAREST_INT);
#else
        double buf[8];
        uint16_t hb[8];
        memcpy(buf, &r, 64);
        cn_double8_to_half(buf, hb);
        __m128i h;
        memcpy(&h, hb, 16);
#endif
        if (stream) _mm_stream_si128((__m128i *)p, h);
        else _mm_storeu_si128((__m128i *)p, h);
    }
}

static inline double cn_a_load1(const void *p, ptrdiff_t i, int kind) {
    if (kind == 2) return ((const double *)p)[i];
    if (kind == 1) return (double)((const float *)p)[i];
    return cn_half_to_double(((const uint16_t *)p)[i]);
}

static inline void cn_a_store1(void *p, ptrdiff_t i, double v, int kind) {
    if (kind == 2) ((double *)p)[i] = v;
    else if (kind == 1) ((float *)p)[i] = (float)v;
    else ((uint16_t *)p)[i] = cn_double_to_half(v);
}

static inline void cn_store_fence(void) {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

/* one element, scalar: the head and tail of a row */
static inline double cn_a_one(double x, double mh, double ml, double rs, double w, double b,
                              int relu) {
    double v = (((x - mh) - ml) * rs) * w + b;
    return (relu && v < 0.0) ? 0.0 : v;
}

/* Elements [i, n) of a row with statistics per element (parameters too with
 * pvec): the vector steps from i, then the scalar tail. */
static inline __attribute__((always_inline)) void cn_apply_percol(
        const void *x, void *y, ptrdiff_t i, ptrdiff_t n, int kind, const double *mh,
        const double *ml, const double *rs, const double *w, const double *b, int pvec,
        int relu, int stream) {
    const size_t item = kind == 2 ? 8 : (kind == 1 ? 4 : 2);
    const ptrdiff_t nv = i + (n - i) / 8 * 8;
    const cn_ad w0 = cn_a_splat(w[0]), b0 = cn_a_splat(b[0]);
    for (; i < nv; i += 8) {
        cn_a8 v = cn_a_load((const char *)x + i * item, kind);
        for (int j = 0; j < CN_AN; j++) {
            const ptrdiff_t k = i + j * CN_AW;
            v.v[j] = (((v.v[j] - cn_a_ld(mh + k)) - cn_a_ld(ml + k)) * cn_a_ld(rs + k)) *
                     (pvec ? cn_a_ld(w + k) : w0) + (pvec ? cn_a_ld(b + k) : b0);
            if (relu) v.v[j] = cn_a_relu(v.v[j]);
        }
        cn_a_store((char *)y + i * item, v, kind, stream);
    }
    for (; i < n; i++)
        cn_a_store1(y, i, cn_a_one(cn_a_load1(x, i, kind), mh[i], ml[i], rs[i],
                                   w[pvec ? i : 0], b[pvec ? i : 0], relu), kind);
}

/* The row loop.  svec / pvec: statistics / parameters per element (else the
 * value at index 0 is used for the whole row).  kind: 0 float16, 1 float32,
 * 2 float64 (input and output have the same dtype; y may be x). */
static inline __attribute__((always_inline)) void cn_apply_row_k(const void *x, void *y, ptrdiff_t n, int kind,
                                const double *mh, const double *ml, const double *rs, int svec,
                                const double *w, const double *b, int pvec, int relu,
                                int stream) {
    const size_t item = kind == 2 ? 8 : (kind == 1 ? 4 : 2);
    ptrdiff_t i = 0, head = 0;
    if (kind == 0) stream = 0;  /* float16: 16-byte streaming stores measured 10x slower here */
    if (stream) {
        uintptr_t mis = (uintptr_t)y % 64;
        if (mis % item) stream = 0;   /* not element-aligned: plain stores */
        else head = mis ? (ptrdiff_t)((64 - mis) / item) : 0;
        if (head > n) head = n;
    }
    for (; i < head; i++)
        cn_a_store1(y, i, cn_a_one(cn_a_load1(x, i, kind), mh[svec ? i : 0], ml[svec ? i : 0],
                                   rs[svec ? i : 0], w[pvec ? i : 0], b[pvec ? i : 0], relu),
                    kind);
    const ptrdiff_t nv = i + (n - i) / 8 * 8;
    if (!svec && !pvec && w[0] == 1.0 && b[0] == 0.0) {
        /* no affine: the same value without the exact "* 1 + 0" (which only
         * turns a -0.0 result, x = -0.0 with mean +0, into +0.0) */
        const cn_ad m0 = cn_a_splat(mh[0]), m1 = cn_a_splat(ml[0]), r0 = cn_a_splat(rs[0]);
        for (; i < nv; i += 8) {
            cn_a8 v = cn_a_load((const char *)x + i * item, kind);
            for (int j = 0; j < CN_AN; j++) {
                v.v[j] = ((v.v[j] - m0) - m1) * r0;
                if (relu) v.v[j] = cn_a_relu(v.v[j]);
            }
            cn_a_store((char *)y + i * item, v, kind, stream);
        }
    } else if (!svec && !pvec) {
        const cn_ad m0 = cn_a_splat(mh[0]), m1 = cn_a_splat(ml[0]), r0 = cn_a_splat(rs[0]);
        const cn_ad w0 = cn_a_splat(w[0]), b0 = cn_a_splat(b[0]);
        for (; i < nv; i += 8) {
            cn_a8 v = cn_a_load((const char *)x + i * item, kind);
            for (int j = 0; j < CN_AN; j++) {
                v.v[j] = (((v.v[j] - m0) - m1) * r0) * w0 + b0;
                if (relu) v.v[j] = cn_a_relu(v.v[j]);
            }
            cn_a_store((char *)y + i * item, v, kind, stream);
        }
    } else if (!svec) {
        const cn_ad m0 = cn_a_splat(mh[0]), m1 = cn_a_splat(ml[0]), r0 = cn_a_splat(rs[0]);
        for (; i < nv; i += 8) {
            cn_a8 v = cn_a_load((const char *)x + i * item, kind);
            for (int j = 0; j < CN_AN; j++) {
                const ptrdiff_t k = i + j * CN_AW;
                v.v[j] = (((v.v[j] - m0) - m1) * r0) * cn_a_ld(w + k) + cn_a_ld(b + k);
                if (relu) v.v[j] = cn_a_relu(v.v[j]);
            }
            cn_a_store((char *)y + i * item, v, kind, stream);
        }
    } else {
        cn_apply_percol(x, y, i, n, kind, mh, ml, rs, w, b, pvec, relu, stream);
        return;
    }
    for (; i < n; i++)
        cn_a_store1(y, i, cn_a_one(cn_a_load1(x, i, kind), mh[svec ? i : 0], ml[svec ? i : 0],
                                   rs[svec ? i : 0], w[pvec ? i : 0], b[pvec ? i : 0], relu),
                    kind);
}

/* Channels last in cache, rows [0, R - R % 4): the arithmetic of cn_apply_percol
 * (the same expression per element, so the same results) four rows per step:
 * each vector of the five per-channel operands (mean hi/lo, rstd, weight, bias)
 * is loaded once for four rows; five float64 loads per eight elements were the
 * binding cost in L1.  Returns the number of rows done. */
static inline __attribute__((always_inline)) ptrdiff_t cn_apply_rows4_percol_k(
        const void *x, void *y, ptrdiff_t R, ptrdiff_t L, int kind, const double *mh,
        const double *ml, const double *rs, const double *w, const double *b, int relu) {
    const size_t item = kind == 2 ? 8 : (kind == 1 ? 4 : 2);
    const ptrdiff_t nv = L / 8 * 8;
    ptrdiff_t r = 0;
    for (; r + 4 <= R; r += 4) {
        const char *xr = (const char *)x + r * L * item;
        char *yr = (char *)y + r * L * item;
        for (ptrdiff_t i = 0; i < nv; i += 8) {
            cn_ad m0[CN_AN], m1[CN_AN], r0[CN_AN], w0[CN_AN], b0[CN_AN];
            for (int j = 0; j < CN_AN; j++) {
                const ptrdiff_t k = i + j * CN_AW;
                m0[j] = cn_a_ld(mh + k);
                m1[j] = cn_a_ld(ml + k);
                r0[j] = cn_a_ld(rs + k);
                w0[j] = cn_a_ld(w + k);
                b0[j] = cn_a_ld(b + k);
            }
            for (int q = 0; q < 4; q++) {
                const ptrdiff_t at = (q * L + i) * (ptrdiff_t)item;
                cn_a8 v = cn_a_load(xr + at, kind);
                for (int j = 0; j < CN_AN; j++) {
                    v.v[j] = (((v.v[j] - m0[j]) - m1[j]) * r0[j]) * w0[j] + b0[j];
                    if (relu) v.v[j] = cn_a_relu(v.v[j]);
                }
                cn_a_store(yr + at, v, kind, 0);
            }
        }
        for (int q = 0; q < 4; q++)
            for (ptrdiff_t i = nv; i < L; i++)
                cn_a_store1(yr + q * L * item, i,
                            cn_a_one(cn_a_load1(xr + q * L * item, i, kind), mh[i], ml[i], rs[i],
                                     w[i], b[i], relu), kind);
    }
    return r;
}

/* Channels last: R rows of L elements back to back, statistics and parameters
 * per element of a row (index i of every row).  The loop of cn_apply_row_k
 * with svec = pvec = 1 (cn_apply_percol), without its per-row set-up (a 64-channel
 * float32 row is 8 vector steps: the set-up cost as much as the work).
 * Streams only when every row starts on a cache line. */
static inline __attribute__((always_inline)) void cn_apply_rows_percol_k(
        const void *x, void *y, ptrdiff_t R, ptrdiff_t L, int kind, const double *mh,
        const double *ml, const double *rs, const double *w, const double *b, int relu,
        int stream) {
    const size_t item = kind == 2 ? 8 : (kind == 1 ? 4 : 2);
    if (kind == 0 || (uintptr_t)y % 64 || (L * item) % 64) stream = 0;
    for (ptrdiff_t r = 0; r < R; r++)
        cn_apply_percol((const char *)x + r * L * item, (char *)y + r * L * item, 0, L, kind,
                        mh, ml, rs, w, b, 1, relu, stream);
}

#define CN_APPLY_ROW(SUFFIX, KIND)                                                 \
static void cn_apply_row_##SUFFIX(const void *x, void *y, ptrdiff_t n, const double *mh,    \
        const double *ml, const double *rs, int svec, const double *w, const double *b,  \
        int pvec, int relu, int stream) {                                                \
    cn_apply_row_k(x, y, n, KIND, mh, ml, rs, svec, w, b, pvec, relu, stream);          \
}                                                                                        \
__attribute__((noinline)) static ptrdiff_t cn_apply_rows4_percol_##SUFFIX(           \
        const void *x, void *y, ptrdiff_t R, ptrdiff_t L, const double *mh,            \
        const double *ml, const double *rs, const double *w, const double *b, int relu) { \
    return cn_apply_rows4_percol_k(x, y, R, L, KIND, mh, ml, rs, w, b, relu);           \
}                                                                                        \
/* outputs up to 1 MiB (in cache) four rows per step, the rest row by row: out of  \
 * cache interleaving the rows measured up to 1.8x slower; the four-row loop is a  \
 * separate function: inlined here it slowed the row loop down as much */           \
static void cn_apply_rows_percol_##SUFFIX(const void *x, void *y, ptrdiff_t R, ptrdiff_t L, \
        const double *mh, const double *ml, const double *rs, const double *w,          \
        const double *b, int relu, int stream) {                                         \
    const size_t item = KIND == 2 ? 8 : (KIND == 1 ? 4 : 2);                             \
    const ptrdiff_t r0 = (stream || R * L * (ptrdiff_t)item > (1 << 20)) ? 0 :          \
        cn_apply_rows4_percol_##SUFFIX(x, y, R, L, mh, ml, rs, w, b, relu);              \
    cn_apply_rows_percol_k((const char *)x + r0 * L * item, (char *)y + r0 * L * item,  \
                           R - r0, L, KIND, mh, ml, rs, w, b, relu, stream);            \
}
CN_APPLY_ROW(f16, 0)
CN_APPLY_ROW(f32, 1)
CN_APPLY_ROW(f64, 2)

#endif

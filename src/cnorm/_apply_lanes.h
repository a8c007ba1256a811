/* The vector loops of the apply pass (see _apply_simd.h) at one vector width:
 * eight elements per step in CN_AN = 8 / CN_AW vectors of CN_AW doubles.
 * This file has no include guard: _apply_simd.h includes it once per width
 * it needs, with CN_AW defined, and every name below is defined as
 * name_w<CN_AW> (cn_apply_row_k is cn_apply_row_k_w8 for CN_AW = 8). */
#define CN_AX(name) CN_AX_(name, CN_AW)
#define CN_AX_(name, w) CN_AX__(name, w)
#define CN_AX__(name, w) name##_w##w
#define cn_ad CN_AX(cn_ad)
#define cn_al CN_AX(cn_al)
#define cn_a8 CN_AX(cn_a8)
#define cn_a_ld CN_AX(cn_a_ld)
#define cn_a_splat CN_AX(cn_a_splat)
#define cn_a_sub CN_AX(cn_a_sub)
#define cn_a_relu CN_AX(cn_a_relu)
#define cn_a_load CN_AX(cn_a_load)
#define cn_a_store CN_AX(cn_a_store)
#define cn_apply_percol CN_AX(cn_apply_percol)
#define cn_apply_row_k CN_AX(cn_apply_row_k)
#define cn_apply_rows4_percol_k CN_AX(cn_apply_rows4_percol_k)
#define cn_apply_rows_percol_k CN_AX(cn_apply_rows_percol_k)
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

/* a - b of the apply expression.  float32 takes it to the multiply-add
 * pipes (cn_vsub_fu: the same bits; a NaN's payload may be the other
 * operand's when both are NaN): its loops are bound by the FP-add pipes,
 * which also run the two conversions per element.  tools/apply_microbench.c,
 * 1024-element rows in L1, AVX-512 build (ns/element, no affine /
 * per-element affine): float32 at CN_AW = 4 0.162 / 0.205 -> 0.133 / 0.187.
 * float64 keeps the add pipes: there the change measured slower (0.069 ->
 * 0.10).  (float16 data has its own float32 loops: _apply_h32.h.) */
static inline cn_ad cn_a_sub(cn_ad a, cn_ad b, int kind) {
    if (kind == 2) return a - b;
#if CN_AW == CN_VW
    return cn_vsub_fu(a, b);
#else
    return cn_ysub_fu(a, b);
#endif
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
    } else {                              /* float32 */
#if CN_AW == 8
        r.v[0] = (cn_ad)_mm512_cvtps_pd(_mm256_loadu_ps((const float *)p));
#elif CN_AW == 4
        r.v[0] = (cn_ad)_mm256_cvtps_pd(_mm_loadu_ps((const float *)p));
        r.v[1] = (cn_ad)_mm256_cvtps_pd(_mm_loadu_ps((const float *)p + 4));
#else
        __m128 lo = _mm_loadu_ps((const float *)p), hi = _mm_loadu_ps((const float *)p + 4);
        r.v[0] = (cn_ad)_mm_cvtps_pd(lo);
        r.v[1] = (cn_ad)_mm_cvtps_pd(_mm_movehl_ps(lo, lo));
        r.v[2] = (cn_ad)_mm_cvtps_pd(hi);
        r.v[3] = (cn_ad)_mm_cvtps_pd(_mm_movehl_ps(hi, hi));
#endif
    }
    return r;
}

static inline void cn_a_store(void *p, cn_a8 r, int kind, int stream) {
    if (kind == 2) {
        if (stream) {
#if CN_AW == 8
            _mm512_stream_pd((double *)p, (__m512d)r.v[0]);
#elif CN_AW == 4
            _mm256_stream_pd((double *)p, (__m256d)r.v[0]);
            _mm256_stream_pd((double *)p + 4, (__m256d)r.v[1]);
#else
            for (int j = 0; j < 4; j++) _mm_stream_pd((double *)p + 2 * j, (__m128d)r.v[j]);
#endif
            return;
        }
        for (int j = 0; j < CN_AN; j++) memcpy((double *)p + j * CN_AW, &r.v[j], CN_AW * 8);
    } else {
#if CN_AW == 8
        __m256 f = _mm512_cvtpd_ps((__m512d)r.v[0]);
        if (stream) _mm256_stream_ps((float *)p, f); else _mm256_storeu_ps((float *)p, f);
#elif CN_AW == 4
        __m128 lo = _mm256_cvtpd_ps((__m256d)r.v[0]), hi = _mm256_cvtpd_ps((__m256d)r.v[1]);
        if (stream) { _mm_stream_ps((float *)p, lo); _mm_stream_ps((float *)p + 4, hi); }
        else { _mm_storeu_ps((float *)p, lo); _mm_storeu_ps((float *)p + 4, hi); }
#else
        __m128 lo = _mm_movelh_ps(_mm_cvtpd_ps((__m128d)r.v[0]), _mm_cvtpd_ps((__m128d)r.v[1]));
        __m128 hi = _mm_movelh_ps(_mm_cvtpd_ps((__m128d)r.v[2]), _mm_cvtpd_ps((__m128d)r.v[3]));
        if (stream) { _mm_stream_ps((float *)p, lo); _mm_stream_ps((float *)p + 4, hi); }
        else { _mm_storeu_ps((float *)p, lo); _mm_storeu_ps((float *)p + 4, hi); }
#endif
    }
}

/* Elements [i, n) of a row with statistics per element (parameters too with
 * pvec): the vector steps from i, then the scalar tail. */
static inline __attribute__((always_inline)) void cn_apply_percol(
        const void *x, void *y, ptrdiff_t i, ptrdiff_t n, int kind, const double *mh,
        const double *ml, const double *rs, const double *w, const double *b, int pvec,
        int relu, int stream) {
    const size_t item = kind == 2 ? 8 : 4;
    const ptrdiff_t nv = i + (n - i) / 8 * 8;
    const cn_ad w0 = cn_a_splat(w[0]), b0 = cn_a_splat(b[0]);
    for (; i < nv; i += 8) {
        cn_a8 v = cn_a_load((const char *)x + i * item, kind);
        for (int j = 0; j < CN_AN; j++) {
            const ptrdiff_t k = i + j * CN_AW;
            v.v[j] = (cn_a_sub(cn_a_sub(v.v[j], cn_a_ld(mh + k), kind), cn_a_ld(ml + k), kind) *
                      cn_a_ld(rs + k)) *
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
 * value at index 0 is used for the whole row).  kind: 1 float32,
 * 2 float64 (input and output have the same dtype; y may be x). */
static inline __attribute__((always_inline)) void cn_apply_row_k(const void *x, void *y, ptrdiff_t n, int kind,
                                const double *mh, const double *ml, const double *rs, int svec,
                                const double *w, const double *b, int pvec, int relu,
                                int stream) {
    const size_t item = kind == 2 ? 8 : 4;
    ptrdiff_t i = 0, head = 0;
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
                v.v[j] = cn_a_sub(cn_a_sub(v.v[j], m0, kind), m1, kind) * r0;
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
                v.v[j] = (cn_a_sub(cn_a_sub(v.v[j], m0, kind), m1, kind) * r0) * w0 + b0;
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
                v.v[j] = (cn_a_sub(cn_a_sub(v.v[j], m0, kind), m1, kind) * r0) * cn_a_ld(w + k) +
                         cn_a_ld(b + k);
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
    const size_t item = kind == 2 ? 8 : 4;
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
                    v.v[j] = (cn_a_sub(cn_a_sub(v.v[j], m0[j], kind), m1[j], kind) * r0[j]) * w0[j] +
                              b0[j];
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
    const size_t item = kind == 2 ? 8 : 4;
    if ((uintptr_t)y % 64 || (L * item) % 64) stream = 0;
    for (ptrdiff_t r = 0; r < R; r++)
        cn_apply_percol((const char *)x + r * L * item, (char *)y + r * L * item, 0, L, kind,
                        mh, ml, rs, w, b, 1, relu, stream);
}

#undef cn_ad
#undef cn_al
#undef cn_a8
#undef cn_a_ld
#undef cn_a_splat
#undef cn_a_sub
#undef cn_a_relu
#undef cn_a_load
#undef cn_a_store
#undef cn_apply_percol
#undef cn_apply_row_k
#undef cn_apply_rows4_percol_k
#undef cn_apply_rows_percol_k
#undef CN_AN
#undef CN_AX
#undef CN_AX_
#undef CN_AX__

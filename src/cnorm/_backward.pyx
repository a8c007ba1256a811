# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""Gradient kernels of the normalization layers.

With ``xhat = ((x - mean_hi) - mean_lo) * rstd``, ``v = xhat * w + b`` and
``gv = dy * act'(v)`` (the activation input is recomputed, never stored):

* ``dbias = Σ gv`` and ``dweight = Σ gv * xhat`` over the axes a parameter is
  broadcast along;
* ``dx = ((w * gv - a) - xhat * bb) * rstd`` with the slice means
  ``a = mean(w * gv)`` and ``bb = mean(w * gv * xhat)`` (``a = 0`` for RMS
  norm, ``a = bb = 0`` for batch norm in eval mode).

Every sum is centred (``xhat`` comes from ``x - mean`` in float64, never from
``E[x*dy] - E[x]E[dy]``) and accumulated in float64 for every dtype, in
``LANES`` independent lanes, over a partition of the work fixed by the shape
alone, so results are bitwise identical for any thread count.  Three kernels:

``rows_backward``
    LayerNorm / RMSNorm: one row (the normalized elements) at a time, fused:
    the row is loaded once into a float64 buffer, reduced, and ``dx`` written
    from the buffer while it is hot.  Parameter sums go to one partial
    accumulator per task (a fixed range of rows), merged by the caller.
``cells_reduce``
    BatchNorm / GroupNorm / InstanceNorm: per-*cell* sums ``Σ (x - m)``,
    ``Σ gv``, ``Σ gv * xhat`` over a canonical ``(O, R1, K, R0)`` view (cells
    are the kept ``(o, k)`` positions), per fixed chunk of ``R1``.
``dx_4d``
    The elementwise ``dx`` pass of those layers over a canonical 4-d view.

Arithmetic is float64 throughout; results are rounded once to the output
dtype (float16 through float32, like the forward pass).
"""
from libc.stdint cimport uint16_t
from libc.stdlib cimport malloc, calloc, free
from cython.parallel cimport prange
cimport numpy as cnp
import numpy as np

cnp.import_array()

cdef extern from "_simd.h" nogil:
    double cn_half_to_double(uint16_t h)
    uint16_t cn_double_to_half(double d)
    void cn_half8_to_double(const uint16_t *p, double *out)
    void cn_double8_to_half(const double *inp, uint16_t *p)
    const char *cn_isa_name()

# Fused inner loops with restrict-qualified pointers (no aliasing between the
# L1 buffers), so that the compiler keeps the lanes in registers and vectorizes
# each loop as one pass.  Plain C99; rounding is exactly the one written.
cdef extern from *:
    """
    #include <string.h>
    #define CNB_LANES 8
    /* whether the four-row blocked pass (cnb_rowB4) is used: its 16 lane
       accumulators are 16 zmm registers on AVX-512, but 32 ymm (twice the
       register file) on AVX2 and 64 xmm on SSE2, where they live on the stack */
    #if defined(__AVX512F__)
    #define CNB_BLOCK_ROWS4 1
    #else
    #define CNB_BLOCK_ROWS4 0
    #endif
    /* eight float64 lanes as one GCC/Clang vector: each lane is its own
       accumulator, with IEEE operations per lane on every ISA (SSE2 splits it
       into four registers, AVX-512 uses one) -- the lanes are the same numbers */
    typedef double cnb_v8 __attribute__((vector_size(64), aligned(8)));
    static inline cnb_v8 cnb_ld(const double *p) { cnb_v8 v; memcpy(&v, p, sizeof v); return v; }
    static inline void cnb_st(double *p, cnb_v8 v) { memcpy(p, &v, sizeof v); }
    /* a in every lane, made once before a loop: a scalar operand inside the
       loops (v - m) was broadcast again on every iteration through the stack
       by GCC on AVX2, whose vectors hold half of cnb_v8 (layer_norm_backward
       float64 on an AMD EPYC Zen 3); the same numbers as the scalar operand */
    static inline cnb_v8 cnb_splat(double a) { cnb_v8 v = {a, a, a, a, a, a, a, a}; return v; }

    /* a1 += w*g, a2 += w*g*xh (lanes); with pvec also pw += g*xh, pb += g */
    static inline void cnb_wsums(const double *restrict xh, const double *restrict g,
                                 const double *restrict w, int pvec,
                                 double *restrict pw, double *restrict pb, Py_ssize_t n,
                                 double *restrict a1, double *restrict a2) {
        cnb_v8 s1 = cnb_ld(a1), s2 = cnb_ld(a2);
        Py_ssize_t i, nv = n - n % CNB_LANES;
        if (pvec) {
            for (i = 0; i < nv; i += CNB_LANES) {
                cnb_v8 gg = cnb_ld(g + i), v = cnb_ld(xh + i), t = cnb_ld(w + i) * gg;
                s1 += t;
                s2 += t * v;
                cnb_st(pw + i, cnb_ld(pw + i) + gg * v);
                cnb_st(pb + i, cnb_ld(pb + i) + gg);
            }
        } else {
            const cnb_v8 w0 = cnb_splat(w[0]);
            for (i = 0; i < nv; i += CNB_LANES) {
                cnb_v8 t = w0 * cnb_ld(g + i);
                s1 += t;
                s2 += t * cnb_ld(xh + i);
            }
        }
        cnb_st(a1, s1);
        cnb_st(a2, s2);
        for (i = nv; i < n; i++) {
            double gg = g[i], v = xh[i], t = (pvec ? w[i] : w[0]) * gg;
            a1[i - nv] += t;
            a2[i - nv] += t * v;
            if (pvec) {
                pw[i] += gg * v;
                pb[i] += gg;
            }
        }
    }
    /* a += c (lanes) */
    static inline void cnb_sum(const double *restrict c, Py_ssize_t n, double *restrict a) {
        cnb_v8 s = cnb_ld(a);
        Py_ssize_t i, nv = n - n % CNB_LANES;
        for (i = 0; i < nv; i += CNB_LANES) s += cnb_ld(c + i);
        cnb_st(a, s);
        for (i = nv; i < n; i++) a[i - nv] += c[i];
    }
    /* a1 += g, a2 += g*xh (lanes) */
    static inline void cnb_gsums(const double *restrict xh, const double *restrict g,
                                 Py_ssize_t n, double *restrict a1, double *restrict a2) {
        cnb_v8 s1 = cnb_ld(a1), s2 = cnb_ld(a2);
        Py_ssize_t i, nv = n - n % CNB_LANES;
        for (i = 0; i < nv; i += CNB_LANES) {
            cnb_v8 gg = cnb_ld(g + i);
            s1 += gg;
            s2 += gg * cnb_ld(xh + i);
        }
        cnb_st(a1, s1);
        cnb_st(a2, s2);
        for (i = nv; i < n; i++) {
            a1[i - nv] += g[i];
            a2[i - nv] += g[i] * xh[i];
        }
    }
    /* ---- the fast row path: no activation, contiguous rows (float16 in CNB_ROW's h) ----
       x and dy are read straight from memory (converted in registers), sums
       in 16 lanes (two vectors: no add-latency chain), dx stored directly. */
    typedef float cnb_v8f __attribute__((vector_size(32), aligned(4)));
    #if defined(__AVX512F__)
    #include <immintrin.h>
    static inline cnb_v8 cnb_ld_f(const float *p) {
        return (cnb_v8)_mm512_cvtps_pd(_mm256_loadu_ps(p));
    }
    #elif defined(__AVX__)
    /* (cnb_v8 loads: the four-row pass cnb_rowB4; the other loops use cnb_wld_*)
       two 256-bit conversions joined into the 8-lane vector: GCC lowered the
       generic convert below through stack copies here (layer_norm_backward of
       (2048, 1024) float32, 1 thread, AMD EPYC Zen 3: 23 ms against 9 ms on
       the SSE2 build); the same exact widening and round-to-nearest narrowing */
    #include <immintrin.h>
    static inline cnb_v8 cnb_ld_f(const float *p) {
        __m256d h[2] = {_mm256_cvtps_pd(_mm_loadu_ps(p)), _mm256_cvtps_pd(_mm_loadu_ps(p + 4))};
        cnb_v8 v; memcpy(&v, h, sizeof v); return v;
    }
    #else
    static inline cnb_v8 cnb_ld_f(const float *p) {
        cnb_v8f v; memcpy(&v, p, sizeof v); return __builtin_convertvector(v, cnb_v8);
    }
    #endif
    static inline cnb_v8 cnb_ld_d(const double *p) { return cnb_ld(p); }

    /* The row loops below in native vectors of CNB_W float64 lanes: the 8 (16)
       lanes of a sum are CNB_N (2 CNB_N) such vectors, sub-vector j holding
       lanes j*CNB_W .. j*CNB_W + CNB_W - 1, so every lane adds the same
       elements in the same order as with cnb_v8 and the results are the same
       bits on every ISA.  On AVX2 GCC lowered the 64-byte cnb_v8 through the
       stack (each splat two registers, the 16 lanes of two sums and four
       splats more than the 16 ymm registers): layer_norm_backward (64, 1024)
       float32 on the AVX2 build of an AMD EPYC Zen 4 ran 2.6x the AVX-512
       build's time.  In native vectors, 1 thread, same machine: AVX2 220 ->
       67 us (AVX-512 65 us), SSE2 155 -> 110 us; batch_norm_backward
       (32, 64, 16, 16) float64 AVX2 2390 -> 756 us. */
    #if defined(__AVX512F__)
    #define CNB_W 8
    #elif defined(__AVX__)
    #define CNB_W 4
    #else
    #define CNB_W 2
    #endif
    #define CNB_N (8 / CNB_W)
    /* for j over the 2 CNB_N sub-vectors of 16 lanes, fully unrolled (the array of
       accumulators then stays in registers) */
    #define CNB_FOR_J _Pragma("GCC unroll 8") for (j = 0; j < 2 * CNB_N; j++)
    typedef double cnb_vw __attribute__((vector_size(CNB_W * 8), aligned(8)));
    /* unaligned loads and stores by intrinsic: through memcpy GCC moved each
       ymm vector through the stack as two xmm halves (a store-forwarding
       stall per access, 3x slower than the cnb_v8 loop) */
    #if CNB_W == 8
    static inline cnb_vw cnb_wld(const double *p) { return (cnb_vw)_mm512_loadu_pd(p); }
    static inline void cnb_wst(double *p, cnb_vw v) { _mm512_storeu_pd(p, (__m512d)v); }
    #elif CNB_W == 4
    static inline cnb_vw cnb_wld(const double *p) { return (cnb_vw)_mm256_loadu_pd(p); }
    static inline void cnb_wst(double *p, cnb_vw v) { _mm256_storeu_pd(p, (__m256d)v); }
    #else
    static inline cnb_vw cnb_wld(const double *p) { cnb_vw v; memcpy(&v, p, sizeof v); return v; }
    static inline void cnb_wst(double *p, cnb_vw v) { memcpy(p, &v, sizeof v); }
    #endif
    static inline cnb_vw cnb_wsplat(double a) {
        cnb_vw v;
        for (int j = 0; j < CNB_W; j++) v[j] = a;
        return v;
    }
    static inline cnb_vw cnb_wld_d(const double *p) { return cnb_wld(p); }
    static inline void cnb_wst_d(double *p, cnb_vw v) { cnb_wst(p, v); }
    #if CNB_W == 8
    static inline cnb_vw cnb_wld_f(const float *p) {
        return (cnb_vw)_mm512_cvtps_pd(_mm256_loadu_ps(p));
    }
    static inline void cnb_wst_f(float *p, cnb_vw v) {
        _mm256_storeu_ps(p, _mm512_cvtpd_ps((__m512d)v));
    }
    #elif CNB_W == 4
    static inline cnb_vw cnb_wld_f(const float *p) {
        return (cnb_vw)_mm256_cvtps_pd(_mm_loadu_ps(p));
    }
    static inline void cnb_wst_f(float *p, cnb_vw v) {
        _mm_storeu_ps(p, _mm256_cvtpd_ps((__m256d)v));
    }
    #else
    static inline cnb_vw cnb_wld_f(const float *p) {
        cnb_vw v = {(double)p[0], (double)p[1]};
        return v;
    }
    static inline void cnb_wst_f(float *p, cnb_vw v) {
        p[0] = (float)v[0];
        p[1] = (float)v[1];
    }
    #endif

    /* float16 (uint16_t bits) in the same loops: decoded exactly to float64, results
       encoded through float32 with round-to-nearest-even, per element as the chunked
       path's cn_half_to_double / cn_double_to_half (F16C where the build has it) */
    static inline double cnb_s_f(float v) { return (double)v; }
    static inline double cnb_s_d(double v) { return v; }
    static inline double cnb_s_h(uint16_t v) { return cn_half_to_double(v); }
    static inline float cnb_t_f(double v) { return (float)v; }
    static inline double cnb_t_d(double v) { return v; }
    static inline uint16_t cnb_t_h(double v) { return cn_double_to_half(v); }
    static inline cnb_v8 cnb_ld_h(const uint16_t *p) {
        double t[8]; cn_half8_to_double(p, t); return cnb_ld(t);
    }
    #if CNB_W == 8
    static inline cnb_vw cnb_wld_h(const uint16_t *p) {
        return (cnb_vw)_mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
    }
    static inline void cnb_wst_h(uint16_t *p, cnb_vw v) {
        _mm_storeu_si128((__m128i *)p,
                         _mm256_cvtps_ph(_mm512_cvtpd_ps((__m512d)v), _MM_FROUND_TO_NEAREST_INT));
    }
    #elif CNB_W == 4 && defined(__F16C__)
    static inline cnb_vw cnb_wld_h(const uint16_t *p) {
        return (cnb_vw)_mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p)));
    }
    static inline void cnb_wst_h(uint16_t *p, cnb_vw v) {
        _mm_storel_epi64((__m128i *)p,
                         _mm_cvtps_ph(_mm256_cvtpd_ps((__m256d)v), _MM_FROUND_TO_NEAREST_INT));
    }
    #else
    static inline cnb_vw cnb_wld_h(const uint16_t *p) {
        cnb_vw v;
        for (int j = 0; j < CNB_W; j++) v[j] = cn_half_to_double(p[j]);
        return v;
    }
    static inline void cnb_wst_h(uint16_t *p, cnb_vw v) {
        for (int j = 0; j < CNB_W; j++) p[j] = cn_double_to_half(v[j]);
    }
    #endif

    /* (x - m) - ml, skipping the exact "- 0.0" when the loop-invariant z says ml == 0
       (x - 0.0 == x for every x, so the result is the same bits; GCC unswitches the loop) */
    #define CNB_C(x, m, ml, z) ((z) ? ((x) - (m)) : (((x) - (m)) - (ml)))
    /* the vector loop of cnb_rowB, once for each value of the loop-invariant z */
    #define CNB_ROWB_STEP(S, PVEC, Z, STORE)                                                \
        for (i = 0; i < nv; i += 16)                                                        \
            CNB_FOR_J {                                                                     \
                const Py_ssize_t k = i + j * CNB_W;                                         \
                cnb_vw v = CNB_C(cnb_wld_##S(x + k), mv, mlv, Z) * rv;                      \
                cnb_vw g = cnb_wld_##S(dy + k), t = PVEC ? cnb_wld(w + k) * g : g;          \
                s1[j] += t; s2[j] += t * v;                                                 \
                if (PVEC) {                                                                 \
                    cnb_wst(pw + k, cnb_wld(pw + k) + g * v);                               \
                    cnb_wst(pb + k, cnb_wld(pb + k) + g);                                   \
                }                                                                           \
                if (STORE) { cnb_wst(vb + k, v); cnb_wst(tb + k, t); }                      \
            }
    #define CNB_ROWB_LOOP(S, PVEC, ZTEST, STORE)                                            \
        if (ZTEST) { CNB_ROWB_STEP(S, PVEC, 1, STORE) } else { CNB_ROWB_STEP(S, PVEC, 0, STORE) }
    #define CNB_ROW(T, S)                                                                   \
    /* a[0:16] += x - m */                                                                  \
    static inline void cnb_rowA_##S(const T *restrict x, Py_ssize_t n, double m,            \
                                    double *restrict a) {                                   \
        cnb_vw s[2 * CNB_N];                                                                \
        const cnb_vw mv = cnb_wsplat(m);                                                    \
        Py_ssize_t i, nv = n - n % 16;                                                      \
        int j;                                                                              \
        CNB_FOR_J s[j] = cnb_wld(a + j * CNB_W);                                            \
        for (i = 0; i < nv; i += 16)                                                        \
            CNB_FOR_J s[j] += cnb_wld_##S(x + i + j * CNB_W) - mv;                          \
        CNB_FOR_J cnb_wst(a + j * CNB_W, s[j]);                                             \
        for (i = nv; i < n; i++) a[i - nv] += cnb_s_##S(x[i]) - m;                          \
    }                                                                                       \
    /* a[0:16] += w*dy, a[16:32] += w*dy*xh, pw += dy*xh, pb += dy (pvec: parameters per  \
       element); without pvec a[0:16] += dy, a[16:32] += dy*xh (w unused: the caller      \
       weighs the segment's sums, fold_segment).  Each loop twice, for ml == 0 (z) and    \
       not: with the test inside, GCC kept it in the loop and, on AVX2, the 16 lanes of  \
       s1 and s2 on the stack (batch_norm_backward float32, AMD EPYC Zen 4).  With vb     \
       (not NULL) also vb = xh and tb = the summed term (w*dy, or dy), for cnb_rowCb. */  \
    static inline void cnb_rowB_##S(const T *restrict x, const T *restrict dy, Py_ssize_t n, \
                                    double m, double ml, double r, const double *restrict w, \
                                    int pvec, double *restrict pw, double *restrict pb,     \
                                    double *restrict a, double *restrict vb,                \
                                    double *restrict tb) {                                  \
        cnb_vw s1[2 * CNB_N], s2[2 * CNB_N];                                                \
        Py_ssize_t i, nv = n - n % 16;                                                      \
        int j;                                                                              \
        const cnb_vw mv = cnb_wsplat(m), mlv = cnb_wsplat(ml), rv = cnb_wsplat(r);          \
        CNB_FOR_J {                                                                         \
            s1[j] = cnb_wld(a + j * CNB_W); s2[j] = cnb_wld(a + 16 + j * CNB_W);            \
        }                                                                                   \
        if (vb != NULL) {                                                                   \
            if (pvec) { CNB_ROWB_LOOP(S, 1, ml == 0.0, 1) }                                 \
            else { CNB_ROWB_LOOP(S, 0, ml == 0.0, 1) }                                      \
        } else {                                                                            \
            if (pvec) { CNB_ROWB_LOOP(S, 1, ml == 0.0, 0) }                                 \
            else { CNB_ROWB_LOOP(S, 0, ml == 0.0, 0) }                                      \
        }                                                                                   \
        CNB_FOR_J {                                                                         \
            cnb_wst(a + j * CNB_W, s1[j]); cnb_wst(a + 16 + j * CNB_W, s2[j]);              \
        }                                                                                   \
        for (i = nv; i < n; i++) {                                                          \
            double v = ((cnb_s_##S(x[i]) - m) - ml) * r, g = cnb_s_##S(dy[i]);              \
            double t = pvec ? w[i] * g : g;                                                 \
            a[i - nv] += t; a[16 + i - nv] += t * v;                                        \
            if (pvec) { pw[i] += g * v; pb[i] += g; }                                       \
            if (vb != NULL) { vb[i] = v; tb[i] = t; }                                       \
        }                                                                                   \
    }                                                                                       \
    /* cnb_rowC from what cnb_rowB stored (vb = xh, tb = w*dy with pvec, else dy): the   \
       same operations on the same values, without reloading and converting x and dy    \
       and recomputing xh (half the arithmetic of the pass) */                          \
    static inline void cnb_rowCb_##S(const double *restrict vb, const double *restrict tb,  \
                                     T *restrict dx, Py_ssize_t n, double r,                \
                                     const double *restrict w, int pvec, double a,          \
                                     double bb) {                                           \
        Py_ssize_t i, nv = n - n % 8;                                                       \
        double w0 = w[0];                                                                   \
        const cnb_vw rv = cnb_wsplat(r), w0v = cnb_wsplat(w0);                              \
        const cnb_vw av = cnb_wsplat(a), bbv = cnb_wsplat(bb);                              \
        if (pvec) {                                                                         \
            for (i = 0; i < nv; i += CNB_W)                                                 \
                cnb_wst_##S(dx + i, ((cnb_wld(tb + i) - av) - cnb_wld(vb + i) * bbv) * rv); \
        } else {                                                                            \
            for (i = 0; i < nv; i += CNB_W)                                                 \
                cnb_wst_##S(dx + i,                                                         \
                            ((w0v * cnb_wld(tb + i) - av) - cnb_wld(vb + i) * bbv) * rv);   \
        }                                                                                   \
        for (i = nv; i < n; i++)                                                            \
            dx[i] = cnb_t_##S((((pvec ? tb[i] : w0 * tb[i]) - a) - vb[i] * bb) * r);        \
    }                                                                                       \
    /* dx = ((w*dy - a) - xh*bb) * r */                                                     \
    static inline void cnb_rowC_##S(const T *restrict x, const T *restrict dy,              \
                                    T *restrict dx, Py_ssize_t n, double m, double ml,      \
                                    double r, const double *restrict w, int pvec,           \
                                    double a, double bb) {                                  \
        Py_ssize_t i, nv = n - n % 8;                                                       \
        double w0 = w[0];                                                                   \
        const int z = ml == 0.0;                                                            \
        const cnb_vw mv = cnb_wsplat(m), mlv = cnb_wsplat(ml), rv = cnb_wsplat(r);          \
        const cnb_vw w0v = cnb_wsplat(w0), av = cnb_wsplat(a), bbv = cnb_wsplat(bb);        \
        for (i = 0; i < nv; i += CNB_W) {                                                   \
            cnb_vw v = CNB_C(cnb_wld_##S(x + i), mv, mlv, z) * rv, g = cnb_wld_##S(dy + i); \
            cnb_vw wg = pvec ? cnb_wld(w + i) * g : w0v * g;                                \
            cnb_wst_##S(dx + i, ((wg - av) - v * bbv) * rv);                                \
        }                                                                                   \
        for (i = nv; i < n; i++) {                                                          \
            double v = ((cnb_s_##S(x[i]) - m) - ml) * r;                                    \
            dx[i] = cnb_t_##S((((pvec ? w[i] : w0) * cnb_s_##S(dy[i]) - a) - v * bb) * r);  \
        }                                                                                   \
    }                                                                                       \
    /* per-cell sums: a[0:16] += (x - mh) - ml, a[16:32] += dy, a[32:48] += dy*xh */        \
    static inline void cnb_cell_##S(const T *restrict x, const T *restrict dy, Py_ssize_t n, \
                                    double mh, double ml, double r, int want_dy,            \
                                    double *restrict a) {                                   \
        cnb_vw c[2 * CNB_N], gs[2 * CNB_N], ps[2 * CNB_N];                                  \
        Py_ssize_t i, nv = n - n % 16;                                                      \
        int j;                                                                              \
        const cnb_vw mhv = cnb_wsplat(mh), mlv = cnb_wsplat(ml), rv = cnb_wsplat(r);        \
        CNB_FOR_J {                                                                         \
            c[j] = cnb_wld(a + j * CNB_W); gs[j] = cnb_wld(a + 16 + j * CNB_W);             \
            ps[j] = cnb_wld(a + 32 + j * CNB_W);                                            \
        }                                                                                   \
        if (want_dy) {                                                                      \
            for (i = 0; i < nv; i += 16)                                                    \
                CNB_FOR_J {                                                                 \
                    const Py_ssize_t k = i + j * CNB_W;                                     \
                    cnb_vw cc = (cnb_wld_##S(x + k) - mhv) - mlv, g = cnb_wld_##S(dy + k);  \
                    c[j] += cc; gs[j] += g; ps[j] += g * (cc * rv);                         \
                }                                                                           \
        } else {                                                                            \
            for (i = 0; i < nv; i += 16)                                                    \
                CNB_FOR_J                                                                   \
                    c[j] += (cnb_wld_##S(x + i + j * CNB_W) - mhv) - mlv;                   \
        }                                                                                   \
        CNB_FOR_J {                                                                         \
            cnb_wst(a + j * CNB_W, c[j]); cnb_wst(a + 16 + j * CNB_W, gs[j]);               \
            cnb_wst(a + 32 + j * CNB_W, ps[j]);                                             \
        }                                                                                   \
        for (i = nv; i < n; i++) {                                                          \
            double c = (cnb_s_##S(x[i]) - mh) - ml;                                         \
            a[i - nv] += c;                                                                 \
            if (want_dy) {                                                                  \
                double g = cnb_s_##S(dy[i]);                                                \
                a[16 + i - nv] += g;                                                        \
                a[32 + i - nv] += g * (c * r);                                              \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    /* column sums over one row of a tile: a0 += (x - mh) - ml, a1 += dy, a2 += dy*xh */    \
    static inline void cnb_cols_##S(const T *restrict x, const T *restrict dy, Py_ssize_t n, \
                                    const double *restrict mh, const double *restrict ml,   \
                                    const double *restrict r, int want_dy,                  \
                                    double *restrict a0, double *restrict a1,               \
                                    double *restrict a2) {                                  \
        Py_ssize_t i;                                                                       \
        if (want_dy && ml == NULL) {  /* no low part of the mean: one subtraction less */   \
            for (i = 0; i < n; i++) {                                                       \
                double c = cnb_s_##S(x[i]) - mh[i], g = cnb_s_##S(dy[i]);                   \
                a0[i] += c; a1[i] += g; a2[i] += g * (c * r[i]);                            \
            }                                                                               \
        } else if (want_dy) {                                                               \
            for (i = 0; i < n; i++) {                                                       \
                double c = (cnb_s_##S(x[i]) - mh[i]) - ml[i], g = cnb_s_##S(dy[i]);         \
                a0[i] += c; a1[i] += g; a2[i] += g * (c * r[i]);                            \
            }                                                                               \
        } else if (ml == NULL) {                                                            \
            for (i = 0; i < n; i++) a0[i] += cnb_s_##S(x[i]) - mh[i];                       \
        } else {                                                                            \
            for (i = 0; i < n; i++) a0[i] += (cnb_s_##S(x[i]) - mh[i]) - ml[i];             \
        }                                                                                   \
    }                                                                                       \
    /* dx with per-element statistics and parameters (channels last) */                     \
    static inline void cnb_dxvec_##S(const T *restrict x, const T *restrict dy,             \
                                     T *restrict dx, Py_ssize_t n,                          \
                                     const double *restrict mh, const double *restrict ml,  \
                                     const double *restrict r, const double *restrict a,    \
                                     const double *restrict bb, const double *restrict w) { \
        Py_ssize_t i;                                                                       \
        if (ml == NULL) {  /* no low part of the mean */                                    \
            for (i = 0; i < n; i++) {                                                       \
                double v = (cnb_s_##S(x[i]) - mh[i]) * r[i];                                \
                dx[i] = cnb_t_##S(((w[i] * cnb_s_##S(dy[i]) - a[i]) - v * bb[i]) * r[i]);   \
            }                                                                               \
            return;                                                                         \
        }                                                                                   \
        for (i = 0; i < n; i++) {                                                           \
            double v = ((cnb_s_##S(x[i]) - mh[i]) - ml[i]) * r[i];                          \
            dx[i] = cnb_t_##S(((w[i] * cnb_s_##S(dy[i]) - a[i]) - v * bb[i]) * r[i]);       \
        }                                                                                   \
    }                                                                                       \
    /* four rows at once, per-element parameters: the parameter sums are loaded and         \
       stored once per four rows (the same additions in the same order as row by row),      \
       each row keeps the 16 lanes of cnb_rowB; a: 4 x 32 lanes */                          \
    static inline void cnb_rowB4_##S(const T *restrict x0, const T *restrict x1,            \
                                     const T *restrict x2, const T *restrict x3,            \
                                     const T *restrict y0, const T *restrict y1,            \
                                     const T *restrict y2, const T *restrict y3,            \
                                     Py_ssize_t n, const double *restrict m,                \
                                     const double *restrict ml, const double *restrict r,   \
                                     const double *restrict w, double *restrict pw,         \
                                     double *restrict pb, double *restrict a) {             \
        const T *xr[4] = {x0, x1, x2, x3}, *yr[4] = {y0, y1, y2, y3};                       \
        cnb_v8 s1a[4], s1b[4], s2a[4], s2b[4];                                              \
        Py_ssize_t i, nv = n - n % 16;                                                      \
        int q;                                                                              \
        const int z = ml[0] == 0.0 && ml[1] == 0.0 && ml[2] == 0.0 && ml[3] == 0.0;         \
        for (q = 0; q < 4; q++) {                                                           \
            s1a[q] = cnb_ld(a + 32 * q); s1b[q] = cnb_ld(a + 32 * q + 8);                   \
            s2a[q] = cnb_ld(a + 32 * q + 16); s2b[q] = cnb_ld(a + 32 * q + 24);             \
        }                                                                                   \
        for (i = 0; i < nv; i += 16) {                                                      \
            cnb_v8 wa = cnb_ld(w + i), wb = cnb_ld(w + i + 8);                              \
            cnb_v8 pwa = cnb_ld(pw + i), pwb = cnb_ld(pw + i + 8);                          \
            cnb_v8 pba = cnb_ld(pb + i), pbb = cnb_ld(pb + i + 8);                          \
            for (q = 0; q < 4; q++) {                                                       \
                cnb_v8 v = CNB_C(cnb_ld_##S(xr[q] + i), m[q], ml[q], z) * r[q];             \
                cnb_v8 g = cnb_ld_##S(yr[q] + i), t = wa * g;                               \
                s1a[q] += t; s2a[q] += t * v; pwa += g * v; pba += g;                       \
                v = CNB_C(cnb_ld_##S(xr[q] + i + 8), m[q], ml[q], z) * r[q];                \
                g = cnb_ld_##S(yr[q] + i + 8); t = wb * g;                                  \
                s1b[q] += t; s2b[q] += t * v; pwb += g * v; pbb += g;                       \
            }                                                                               \
            cnb_st(pw + i, pwa); cnb_st(pw + i + 8, pwb);                                   \
            cnb_st(pb + i, pba); cnb_st(pb + i + 8, pbb);                                   \
        }                                                                                   \
        for (q = 0; q < 4; q++) {                                                           \
            cnb_st(a + 32 * q, s1a[q]); cnb_st(a + 32 * q + 8, s1b[q]);                     \
            cnb_st(a + 32 * q + 16, s2a[q]); cnb_st(a + 32 * q + 24, s2b[q]);               \
        }                                                                                   \
        for (i = nv; i < n; i++)                                                            \
            for (q = 0; q < 4; q++) {                                                       \
                double v = ((cnb_s_##S(xr[q][i]) - m[q]) - ml[q]) * r[q], g = cnb_s_##S(yr[q][i]); \
                double t = w[i] * g;                                                        \
                a[32 * q + i - nv] += t; a[32 * q + 16 + i - nv] += t * v;                  \
                pw[i] += g * v; pb[i] += g;                                                 \
            }                                                                               \
    }
    CNB_ROW(float, f)
    CNB_ROW(double, d)
    CNB_ROW(uint16_t, h)

    /* out = ((w*g - a) - xh*bb) * r with scalar a, bb, r */
    static inline void cnb_dx_scalar(double *restrict out, const double *restrict xh,
                                     const double *restrict g, const double *restrict w,
                                     int pvec, Py_ssize_t n, double a, double bb, double r) {
        Py_ssize_t i;
        if (pvec) {
            for (i = 0; i < n; i++) out[i] = ((w[i] * g[i] - a) - xh[i] * bb) * r;
        } else {
            double w0 = w[0];
            for (i = 0; i < n; i++) out[i] = ((w0 * g[i] - a) - xh[i] * bb) * r;
        }
    }
    /* xh = ((x - m) - ml) * r from contiguous float or double input */
    static inline void cnb_xhat_f32(double *restrict xh, const float *restrict x, Py_ssize_t n,
                                    double m, double ml, double r) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) xh[i] = (((double)x[i] - m) - ml) * r;
    }
    static inline void cnb_xhat_f64(double *restrict xh, const double *restrict x, Py_ssize_t n,
                                    double m, double ml, double r) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) xh[i] = ((x[i] - m) - ml) * r;
    }
    """
    int CNB_BLOCK_ROWS4
    void cnb_wsums(const double* xh, const double* g, const double* w, int pvec, double* pw,
                   double* pb, Py_ssize_t n, double* a1, double* a2) noexcept nogil
    void cnb_sum(const double* c, Py_ssize_t n, double* a) noexcept nogil
    void cnb_gsums(const double* xh, const double* g, Py_ssize_t n, double* a1,
                   double* a2) noexcept nogil
    void cnb_dx_scalar(double* out, const double* xh, const double* g, const double* w,
                       int pvec, Py_ssize_t n, double a, double bb, double r) noexcept nogil
    void cnb_rowA_f(const float* x, Py_ssize_t n, double m, double* a) noexcept nogil
    void cnb_rowA_d(const double* x, Py_ssize_t n, double m, double* a) noexcept nogil
    void cnb_rowB_f(const float* x, const float* dy, Py_ssize_t n, double m, double ml, double r,
                    const double* w, int pvec, double* pw, double* pb, double* a, double* vb,
                    double* tb) noexcept nogil
    void cnb_rowCb_f(const double* vb, const double* tb, float* dx, Py_ssize_t n, double r,
                      const double* w, int pvec, double a, double bb) noexcept nogil
    void cnb_rowB_d(const double* x, const double* dy, Py_ssize_t n, double m, double ml,
                    double r, const double* w, int pvec, double* pw, double* pb,
                    double* a, double* vb,
                    double* tb) noexcept nogil
    void cnb_rowCb_d(const double* vb, const double* tb, double* dx, Py_ssize_t n, double r,
                      const double* w, int pvec, double a, double bb) noexcept nogil
    void cnb_rowC_f(const float* x, const float* dy, float* dx, Py_ssize_t n, double m,
                    double ml, double r, const double* w, int pvec, double a,
                    double bb) noexcept nogil
    void cnb_rowC_d(const double* x, const double* dy, double* dx, Py_ssize_t n, double m,
                    double ml, double r, const double* w, int pvec, double a,
                    double bb) noexcept nogil
    void cnb_cell_f(const float* x, const float* dy, Py_ssize_t n, double mh, double ml,
                    double r, int want_dy, double* a) noexcept nogil
    void cnb_cell_d(const double* x, const double* dy, Py_ssize_t n, double mh, double ml,
                    double r, int want_dy, double* a) noexcept nogil
    void cnb_cols_f(const float* x, const float* dy, Py_ssize_t n, const double* mh,
                    const double* ml, const double* r, int want_dy, double* a0, double* a1,
                    double* a2) noexcept nogil
    void cnb_cols_d(const double* x, const double* dy, Py_ssize_t n, const double* mh,
                    const double* ml, const double* r, int want_dy, double* a0, double* a1,
                    double* a2) noexcept nogil
    void cnb_dxvec_f(const float* x, const float* dy, float* dx, Py_ssize_t n, const double* mh,
                     const double* ml, const double* r, const double* a, const double* bb,
                     const double* w) noexcept nogil
    void cnb_dxvec_d(const double* x, const double* dy, double* dx, Py_ssize_t n,
                     const double* mh, const double* ml, const double* r, const double* a,
                     const double* bb, const double* w) noexcept nogil
    void cnb_rowB4_f(const float* x0, const float* x1, const float* x2, const float* x3,
                     const float* y0, const float* y1, const float* y2, const float* y3,
                     Py_ssize_t n, const double* m, const double* ml, const double* r,
                     const double* w, double* pw, double* pb, double* a) noexcept nogil
    void cnb_rowB4_d(const double* x0, const double* x1, const double* x2, const double* x3,
                     const double* y0, const double* y1, const double* y2, const double* y3,
                     Py_ssize_t n, const double* m, const double* ml, const double* r,
                     const double* w, double* pw, double* pb, double* a) noexcept nogil
    void cnb_rowA_h(const uint16_t* x, Py_ssize_t n, double m, double* a) noexcept nogil
    void cnb_rowB_h(const uint16_t* x, const uint16_t* dy, Py_ssize_t n, double m, double ml,
                    double r, const double* w, int pvec, double* pw, double* pb,
                    double* a, double* vb,
                    double* tb) noexcept nogil
    void cnb_rowCb_h(const double* vb, const double* tb, uint16_t* dx, Py_ssize_t n, double r,
                      const double* w, int pvec, double a, double bb) noexcept nogil
    void cnb_rowC_h(const uint16_t* x, const uint16_t* dy, uint16_t* dx, Py_ssize_t n, double m,
                    double ml, double r, const double* w, int pvec, double a,
                    double bb) noexcept nogil
    void cnb_cell_h(const uint16_t* x, const uint16_t* dy, Py_ssize_t n, double mh, double ml,
                    double r, int want_dy, double* a) noexcept nogil
    void cnb_cols_h(const uint16_t* x, const uint16_t* dy, Py_ssize_t n, const double* mh,
                    const double* ml, const double* r, int want_dy, double* a0, double* a1,
                    double* a2) noexcept nogil
    void cnb_dxvec_h(const uint16_t* x, const uint16_t* dy, uint16_t* dx, Py_ssize_t n,
                     const double* mh, const double* ml, const double* r, const double* a,
                     const double* bb, const double* w) noexcept nogil
    void cnb_rowB4_h(const uint16_t* x0, const uint16_t* x1, const uint16_t* x2,
                     const uint16_t* x3, const uint16_t* y0, const uint16_t* y1,
                     const uint16_t* y2, const uint16_t* y3, Py_ssize_t n, const double* m,
                     const double* ml, const double* r, const double* w, double* pw, double* pb,
                     double* a) noexcept nogil
    void cnb_xhat_f32(double* xh, const float* x, Py_ssize_t n, double m, double ml,
                      double r) noexcept nogil
    void cnb_xhat_f64(double* xh, const double* x, Py_ssize_t n, double m, double ml,
                      double r) noexcept nogil


# The activation derivatives, branch-free (selects, no calls) and with one division each,
# so that a loop over a chunk vectorizes: exp by range reduction and a Taylor polynomial
# (~1 ulp), Cephes' erf/erfc and tanh rationals (~1e-16 relative).  Only IEEE +, -, *, / and integer bit operations: every ISA path gives the
# same numbers.  NaN propagates; +-inf give the limits.
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline int64_t cnb_bits(double d) { int64_t i; memcpy(&i, &d, 8); return i; }
    static inline double cnb_from_bits(int64_t i) { double d; memcpy(&d, &i, 8); return d; }

    /* exp(x) = 2^k exp(r), k = round(x/ln2) through the 1.5*2^52 shifter, r = x - k ln2
       (fdlibm's two-part ln2, |r| <= 0.35), exp(r) by its Taylor polynomial to r^13
       (truncation < 4e-18): no division, so that vectorized loops stay fast */
    static inline double cnb_exp(double x) {
        const double SHIFT = 6755399441055744.0;
        double xc = x < -746.0 ? -746.0 : (x > 710.0 ? 710.0 : x);
        double t = xc * 1.44269504088896338700e+00 + SHIFT;
        double k = t - SHIFT;
        int64_t ki = cnb_bits(t) - cnb_bits(SHIFT);
        double r = (xc - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
        double p = 1.6059043836821614599e-10;                  /* 1/13! */
        p = p * r + 2.0876756987868098979e-09;                  /* 1/12! */
        p = p * r + 2.5052108385441718775e-08;
        p = p * r + 2.7557319223985890653e-07;
        p = p * r + 2.7557319223985890653e-06;
        p = p * r + 2.4801587301587301587e-05;
        p = p * r + 1.9841269841269841270e-04;
        p = p * r + 1.3888888888888888889e-03;
        p = p * r + 8.3333333333333333333e-03;
        p = p * r + 4.1666666666666666667e-02;
        p = p * r + 1.6666666666666666667e-01;
        p = p * r + 0.5;
        p = p * r + 1.0;
        double y = p * r + 1.0;
        int64_t k1 = ki / 2, k2 = ki - k1;          /* two normal scales: 2^k for k in [-1076, 1024] */
        return y * cnb_from_bits((k1 + 1023) << 52) * cnb_from_bits((k2 + 1023) << 52);
    }

    /* Cephes tanh: x + x z P(z)/Q(z) below 0.625, 1 - 2/(exp(2|x|) + 1) above (the two
       quotients share one division) */
    static inline double cnb_tanh(double x) {
        double a = x < 0.0 ? -x : x;
        double z = x * x;
        int small = a < 0.625;
        double p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z
                   - 1.61468768441708447952e3;
        double q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z
                   + 4.84406305325125486048e3;
        double s = cnb_exp(2.0 * (a > 22.0 ? 22.0 : a));
        double quot = (small ? x * z * p : 2.0) / (small ? q : s + 1.0);
        double large = 1.0 - quot;
        return small ? x + quot : (x < 0.0 ? -large : large);
    }

    /* d gelu / dv = Phi(v) + v phi(v): Phi from Cephes' erf (|v|/sqrt2 < 1) or erfc */
    static inline double cnb_dgelu(double v) {
        double x = v * 0.7071067811865476;
        double a = x < 0.0 ? -x : x;
        double z = x * x;
        double e = cnb_exp(-0.5 * v * v);
        double t = (((9.60497373987051638749e0 * z + 9.00260197203842689217e1) * z
                     + 2.23200534594684319226e3) * z + 7.00332514112805075473e3) * z
                   + 5.55923013010394962768e4;
        double u = ((((z + 3.35617141647503099647e1) * z + 5.21357949780152679795e2) * z
                     + 4.59432382970980127987e3) * z + 2.26290000613890934246e4) * z
                   + 4.92673942608635921086e4;
        double ac = a > 40.0 ? 40.0 : a;
        double p = 2.46196981473530512524e-10, q = 1.0, rr = 5.64189583547755073984e-1, ss = 1.0;
        p = p * ac + 5.64189564831068821977e-1;
        p = p * ac + 7.46321056442269912687e0;
        p = p * ac + 4.86371970985681366614e1;
        p = p * ac + 1.96520832956077098242e2;
        p = p * ac + 5.26445194995477358631e2;
        p = p * ac + 9.34528527171957607540e2;
        p = p * ac + 1.02755188689515710272e3;
        p = p * ac + 5.57535335369399327526e2;
        q = q * ac + 1.32281951154744992508e1;
        q = q * ac + 8.67072140885989742329e1;
        q = q * ac + 3.54937778887819891062e2;
        q = q * ac + 9.75708501743205489753e2;
        q = q * ac + 1.82390916687909736289e3;
        q = q * ac + 2.24633760818710981792e3;
        q = q * ac + 1.65666309194161350182e3;
        q = q * ac + 5.57535340817727675546e2;
        rr = rr * ac + 1.27536670759978104416e0;
        rr = rr * ac + 5.01905042251180477414e0;
        rr = rr * ac + 6.16021097993053585195e0;
        rr = rr * ac + 7.40974269950448939160e0;
        rr = rr * ac + 2.97886665372100240670e0;
        ss = ss * ac + 2.26052863220117276590e0;
        ss = ss * ac + 9.39603524938001434673e0;
        ss = ss * ac + 1.20489539808096656605e1;
        ss = ss * ac + 1.70814450747565897222e1;
        ss = ss * ac + 9.60896809063285878198e0;
        ss = ss * ac + 3.36907645100081516050e0;
        int small = a < 1.0, mid = ac < 8.0;
        double quot = (small ? x * t : (mid ? p : rr)) / (small ? u : (mid ? q : ss));
        double erfc = e * quot;
        double cdf_large = x > 0.0 ? 1.0 - 0.5 * erfc : 0.5 * erfc;
        double cdf = small ? 0.5 + 0.5 * quot : cdf_large;
        return cdf + v * 0.3989422804014327 * e;
    }

    static inline double cnb_dgelu_tanh(double v) {
        double u = v * v;
        double t = cnb_tanh(0.7978845608028654 * (v + 0.044715 * u * v));
        return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 0.134145 * u));
    }

    static inline double cnb_dsilu(double v) {
        double s = 1.0 / (1.0 + cnb_exp(-v));
        return s * (1.0 + v * (1.0 - s));
    }

    /* g *= act'(xh * w + b) over a chunk; w, b per element (pvec) or scalar */
    #define CNB_GRAD(NAME, EXPR)                                                              \\
    static inline void NAME(const double *restrict xh, double *restrict g, Py_ssize_t n,       \\
                            const double *restrict w, const double *restrict b, int pvec) {   \\
        Py_ssize_t i;                                                                         \\
        if (pvec) {                                                                           \\
            for (i = 0; i < n; i++) { double v = xh[i] * w[i] + b[i]; g[i] = g[i] * (EXPR); } \\
        } else {                                                                              \\
            double w0 = w[0], b0 = b[0];                                                      \\
            for (i = 0; i < n; i++) { double v = xh[i] * w0 + b0; g[i] = g[i] * (EXPR); }     \\
        }                                                                                     \\
    }
    CNB_GRAD(cnb_grad_relu, (v <= 0.0 ? 0.0 : 1.0))
    CNB_GRAD(cnb_grad_gelu, cnb_dgelu(v))
    CNB_GRAD(cnb_grad_gelu_tanh, cnb_dgelu_tanh(v))
    CNB_GRAD(cnb_grad_silu, cnb_dsilu(v))
    """
    double cnb_exp(double x) noexcept nogil
    double cnb_tanh(double x) noexcept nogil
    double cnb_dgelu(double v) noexcept nogil
    double cnb_dgelu_tanh(double v) noexcept nogil
    double cnb_dsilu(double v) noexcept nogil
    void cnb_grad_relu(const double* xh, double* g, Py_ssize_t n, const double* w,
                       const double* b, int pvec) noexcept nogil
    void cnb_grad_gelu(const double* xh, double* g, Py_ssize_t n, const double* w,
                       const double* b, int pvec) noexcept nogil
    void cnb_grad_gelu_tanh(const double* xh, double* g, Py_ssize_t n, const double* w,
                            const double* b, int pvec) noexcept nogil
    void cnb_grad_silu(const double* xh, double* g, Py_ssize_t n, const double* w,
                       const double* b, int pvec) noexcept nogil


ctypedef fused io_t:
    uint16_t
    float
    double

DEF CHUNK = 256          # elements per L1 chunk
DEF LANES = 8            # independent accumulators of the scalar sums
DEF ROWBUF = 262144      # rows up to this length are kept in a float64 buffer (4 MiB)
DEF TILE = 128           # columns per tile of the column reduction
DEF SERIAL_WORK = 32768  # below this many elements, never start threads
DEF ROWFAST_BUF = 1024   # rows up to this length: row_fast keeps xhat and the summed term

# activation codes (must match _engine.ACTIVATIONS)
DEF ACT_NONE = 0
DEF ACT_RELU = 1
DEF ACT_GELU = 2
DEF ACT_GELU_TANH = 3
DEF ACT_SILU = 4


def isa():
    return cn_isa_name().decode()


# the four-row blocked pass of LayerNorm-like rows (cnb_rowB4): on by default
# where its accumulators fit the registers (CNB_BLOCK_ROWS4)
cdef bint block_rows4 = CNB_BLOCK_ROWS4


def set_block_rows4(bint on):
    """Turn the four-row blocked pass on or off (tests: it must give the bits
    of the row-by-row pass on every ISA); returns the previous setting."""
    global block_rows4
    previous = block_rows4
    block_rows4 = on
    return previous


# ---------------------------------------------------------------- loads and stores
cdef inline void load_chunk(const char* x, Py_ssize_t xs, Py_ssize_t n, double* buf,
                            const io_t* tag) noexcept nogil:
    cdef Py_ssize_t i, nv
    if xs == sizeof(io_t):
        if io_t is uint16_t:
            nv = (n // 8) * 8
            for i in range(0, nv, 8):
                cn_half8_to_double(<const uint16_t*>x + i, buf + i)
            for i in range(nv, n):
                buf[i] = cn_half_to_double((<const uint16_t*>x)[i])
        else:
            for i in range(n):
                buf[i] = <double>(<const io_t*>x)[i]
    else:
        for i in range(n):
            if io_t is uint16_t:
                buf[i] = cn_half_to_double((<const uint16_t*>(x + i * xs))[0])
            else:
                buf[i] = <double>(<const io_t*>(x + i * xs))[0]


cdef inline void store_chunk(char* y, Py_ssize_t ys, Py_ssize_t n, const double* buf,
                             const io_t* tag) noexcept nogil:
    cdef Py_ssize_t i, nv
    if ys == sizeof(io_t):
        if io_t is uint16_t:
            nv = (n // 8) * 8
            for i in range(0, nv, 8):
                cn_double8_to_half(buf + i, <uint16_t*>y + i)
            for i in range(nv, n):
                (<uint16_t*>y)[i] = cn_double_to_half(buf[i])
        else:
            for i in range(n):
                (<io_t*>y)[i] = <io_t>buf[i]
    else:
        for i in range(n):
            if io_t is uint16_t:
                (<uint16_t*>(y + i * ys))[0] = cn_double_to_half(buf[i])
            else:
                (<io_t*>(y + i * ys))[0] = <io_t>buf[i]


cdef inline void load_xhat(const char* x, Py_ssize_t xs, Py_ssize_t n, double* buf, double m,
                           double ml, double r, const io_t* tag) noexcept nogil:
    """buf = ((x - m) - ml) * r in float64 (scalar statistics)."""
    cdef Py_ssize_t i
    if io_t is float:
        if xs == sizeof(float):
            cnb_xhat_f32(buf, <const float*>x, n, m, ml, r)
            return
    elif io_t is double:
        if xs == sizeof(double):
            cnb_xhat_f64(buf, <const double*>x, n, m, ml, r)
            return
    load_chunk(x, xs, n, buf, tag)
    for i in range(n):
        buf[i] = ((buf[i] - m) - ml) * r


# ---------------------------------------------------------------- activation derivatives
cdef inline double dact(double v, int act) noexcept nogil:
    """d act(v) / dv, PyTorch's formulas (relu: 0 at v <= 0)."""
    if act == ACT_RELU:
        return 0.0 if v <= 0.0 else 1.0
    if act == ACT_GELU:
        return cnb_dgelu(v)
    if act == ACT_GELU_TANH:
        return cnb_dgelu_tanh(v)
    if act == ACT_SILU:
        return cnb_dsilu(v)
    return 1.0


def dact_values(const double[::1] v, int act):
    """act'(v) elementwise through the kernels' own formulas (tests)."""
    import numpy as np
    out = np.empty(v.shape[0])
    cdef double[::1] o = out
    cdef Py_ssize_t i
    for i in range(v.shape[0]):
        o[i] = dact(v[i], act)
    return out


# ---------------------------------------------------------------- chunk arithmetic
cdef inline void center_chunk(double* c, Py_ssize_t n, const double* mh, const double* ml,
                              bint svec) noexcept nogil:
    """c = (c - mh) - ml, statistics scalar or per element."""
    cdef Py_ssize_t i
    cdef double m0, m1
    if svec:
        for i in range(n):
            c[i] = (c[i] - mh[i]) - ml[i]
    else:
        m0 = mh[0]
        m1 = ml[0]
        for i in range(n):
            c[i] = (c[i] - m0) - m1


cdef inline void scale_chunk(double* c, Py_ssize_t n, const double* r, bint svec) noexcept nogil:
    cdef Py_ssize_t i
    cdef double r0
    if svec:
        for i in range(n):
            c[i] = c[i] * r[i]
    else:
        r0 = r[0]
        for i in range(n):
            c[i] = c[i] * r0


cdef inline void xhat_chunk(double* c, Py_ssize_t n, const double* mh, const double* ml,
                            const double* r, bint svec) noexcept nogil:
    """c = ((c - mh) - ml) * r, statistics scalar or per element."""
    cdef Py_ssize_t i
    cdef double m0, m1, r0
    if svec:
        for i in range(n):
            c[i] = ((c[i] - mh[i]) - ml[i]) * r[i]
    else:
        m0 = mh[0]
        m1 = ml[0]
        r0 = r[0]
        for i in range(n):
            c[i] = ((c[i] - m0) - m1) * r0


cdef inline void grad_chunk(const double* xh, double* g, Py_ssize_t n, const double* w,
                            const double* b, bint pvec, int act) noexcept nogil:
    """g = dy * act'(xhat * w + b) in place (nothing to do without an activation)."""
    if act == ACT_RELU:
        cnb_grad_relu(xh, g, n, w, b, pvec)
    elif act == ACT_GELU:
        cnb_grad_gelu(xh, g, n, w, b, pvec)
    elif act == ACT_GELU_TANH:
        cnb_grad_gelu_tanh(xh, g, n, w, b, pvec)
    elif act == ACT_SILU:
        cnb_grad_silu(xh, g, n, w, b, pvec)


cdef inline void dx_chunk(double* out, const double* xh, const double* g, Py_ssize_t n,
                          const double* w, bint pvec, const double* a, const double* bb,
                          const double* r, bint svec) noexcept nogil:
    """out = ((w * g - a) - xh * bb) * r."""
    cdef Py_ssize_t i
    cdef double w0, a0, b0, r0
    if not svec and pvec:
        a0 = a[0]
        b0 = bb[0]
        r0 = r[0]
        for i in range(n):
            out[i] = ((w[i] * g[i] - a0) - xh[i] * b0) * r0
    elif not svec:
        w0 = w[0]
        a0 = a[0]
        b0 = bb[0]
        r0 = r[0]
        for i in range(n):
            out[i] = ((w0 * g[i] - a0) - xh[i] * b0) * r0
    elif not pvec:
        w0 = w[0]
        for i in range(n):
            out[i] = ((w0 * g[i] - a[i]) - xh[i] * bb[i]) * r[i]
    else:
        for i in range(n):
            out[i] = ((w[i] * g[i] - a[i]) - xh[i] * bb[i]) * r[i]


cdef inline double lane_total(const double* acc) noexcept nogil:
    cdef double s = 0.0
    cdef int l
    for l in range(LANES):
        s = s + acc[l]
    return s


# ---------------------------------------------------------------- rows: slices laid out as rows
# A row is one statistics slice of K0 * K1 elements (segments k0 of K1 elements):
# a LayerNorm/RMSNorm row, a BatchNorm channel (N segments of H*W), an
# InstanceNorm (sample, channel), a GroupNorm (sample, group) (Cg segments).
# Parameters are per element of a segment (``pvec``: LayerNorm) or one per
# segment (the others); ``w + pk0 * k0`` is segment k0's.
DEF MODE_EVAL = 0     # dx = w*gv*rstd (batch norm with running statistics)
DEF MODE_RMS = 1      # dx = (w*gv - xhat*bb) * rstd
DEF MODE_CENTER = 2   # dx = ((w*gv - a) - xhat*bb) * rstd


cdef inline void fold_segment(const double* g, const double* gv, int nl, double w0, double* s1,
                              double* s2, double* pw, double* pb) noexcept nogil:
    """A segment with one parameter: lanes of Σgv (g) and Σgv*xhat (gv) into the row sums."""
    cdef double sg = 0.0, sgv = 0.0
    cdef int l
    for l in range(nl):
        sg = sg + g[l]
        sgv = sgv + gv[l]
    s1[0] += w0 * sg
    s2[0] += w0 * sgv
    if pw != NULL:
        pw[0] += sgv
        pb[0] += sg


cdef inline void row_coefficients(int mode, double s1, double s2, Py_ssize_t K, double* a,
                                  double* bb) noexcept nogil:
    a[0] = s1 / K if mode == MODE_CENTER else 0.0
    bb[0] = s2 / K if mode != MODE_EVAL else 0.0


# ---- the direct loops of CNB_ROW, one instantiation per input dtype (io_t picks it)
cdef inline void d_rowA(const char* x, Py_ssize_t n, double m, double* a,
                        const io_t* tag) noexcept nogil:
    if io_t is float:
        cnb_rowA_f(<const float*>x, n, m, a)
    elif io_t is double:
        cnb_rowA_d(<const double*>x, n, m, a)
    else:
        cnb_rowA_h(<const uint16_t*>x, n, m, a)


cdef inline void d_rowB(const char* x, const char* dy, Py_ssize_t n, double m, double ml,
                        double r, const double* w, int pvec, double* pw, double* pb, double* a,
                        double* vb, double* tb, const io_t* tag) noexcept nogil:
    if io_t is float:
        cnb_rowB_f(<const float*>x, <const float*>dy, n, m, ml, r, w, pvec, pw, pb, a, vb, tb)
    elif io_t is double:
        cnb_rowB_d(<const double*>x, <const double*>dy, n, m, ml, r, w, pvec, pw, pb, a, vb, tb)
    else:
        cnb_rowB_h(<const uint16_t*>x, <const uint16_t*>dy, n, m, ml, r, w, pvec, pw, pb, a, vb,
                   tb)


cdef inline void d_rowCb(const double* vb, const double* tb, char* dx, Py_ssize_t n, double r,
                         const double* w, int pvec, double a, double bb,
                         const io_t* tag) noexcept nogil:
    if io_t is float:
        cnb_rowCb_f(vb, tb, <float*>dx, n, r, w, pvec, a, bb)
    elif io_t is double:
        cnb_rowCb_d(vb, tb, <double*>dx, n, r, w, pvec, a, bb)
    else:
        cnb_rowCb_h(vb, tb, <uint16_t*>dx, n, r, w, pvec, a, bb)


cdef inline void d_rowC(const char* x, const char* dy, char* dx, Py_ssize_t n, double m,
                        double ml, double r, const double* w, int pvec, double a, double bb,
                        const io_t* tag) noexcept nogil:
    if io_t is float:
        cnb_rowC_f(<const float*>x, <const float*>dy, <float*>dx, n, m, ml, r, w, pvec, a, bb)
    elif io_t is double:
        cnb_rowC_d(<const double*>x, <const double*>dy, <double*>dx, n, m, ml, r, w, pvec, a, bb)
    else:
        cnb_rowC_h(<const uint16_t*>x, <const uint16_t*>dy, <uint16_t*>dx, n, m, ml, r, w, pvec,
                   a, bb)


cdef inline void d_rowB4(const char** x, const char** dy, Py_ssize_t xo, Py_ssize_t yo,
                         Py_ssize_t n, const double* m, const double* ml, const double* r,
                         const double* w, double* pw, double* pb, double* a,
                         const io_t* tag) noexcept nogil:
    """cnb_rowB4 of rows x[q] + xo, dy[q] + yo (q < 4)."""
    if io_t is float:
        cnb_rowB4_f(<const float*>(x[0] + xo), <const float*>(x[1] + xo),
                    <const float*>(x[2] + xo), <const float*>(x[3] + xo),
                    <const float*>(dy[0] + yo), <const float*>(dy[1] + yo),
                    <const float*>(dy[2] + yo), <const float*>(dy[3] + yo),
                    n, m, ml, r, w, pw, pb, a)
    elif io_t is double:
        cnb_rowB4_d(<const double*>(x[0] + xo), <const double*>(x[1] + xo),
                    <const double*>(x[2] + xo), <const double*>(x[3] + xo),
                    <const double*>(dy[0] + yo), <const double*>(dy[1] + yo),
                    <const double*>(dy[2] + yo), <const double*>(dy[3] + yo),
                    n, m, ml, r, w, pw, pb, a)
    else:
        cnb_rowB4_h(<const uint16_t*>(x[0] + xo), <const uint16_t*>(x[1] + xo),
                    <const uint16_t*>(x[2] + xo), <const uint16_t*>(x[3] + xo),
                    <const uint16_t*>(dy[0] + yo), <const uint16_t*>(dy[1] + yo),
                    <const uint16_t*>(dy[2] + yo), <const uint16_t*>(dy[3] + yo),
                    n, m, ml, r, w, pw, pb, a)


cdef inline void d_cell(const char* x, const char* dy, Py_ssize_t n, double mh, double ml,
                        double r, int want_dy, double* a, const io_t* tag) noexcept nogil:
    if io_t is float:
        cnb_cell_f(<const float*>x, <const float*>dy, n, mh, ml, r, want_dy, a)
    elif io_t is double:
        cnb_cell_d(<const double*>x, <const double*>dy, n, mh, ml, r, want_dy, a)
    else:
        cnb_cell_h(<const uint16_t*>x, <const uint16_t*>dy, n, mh, ml, r, want_dy, a)


cdef inline void d_cols(const char* x, const char* dy, Py_ssize_t n, const double* mh,
                        const double* ml, const double* r, int want_dy, double* a0, double* a1,
                        double* a2, const io_t* tag) noexcept nogil:
    if io_t is float:
        cnb_cols_f(<const float*>x, <const float*>dy, n, mh, ml, r, want_dy, a0, a1, a2)
    elif io_t is double:
        cnb_cols_d(<const double*>x, <const double*>dy, n, mh, ml, r, want_dy, a0, a1, a2)
    else:
        cnb_cols_h(<const uint16_t*>x, <const uint16_t*>dy, n, mh, ml, r, want_dy, a0, a1, a2)


cdef inline void d_dxvec(const char* x, const char* dy, char* dx, Py_ssize_t n, const double* mh,
                         const double* ml, const double* r, const double* a, const double* bb,
                         const double* w, const io_t* tag) noexcept nogil:
    if io_t is float:
        cnb_dxvec_f(<const float*>x, <const float*>dy, <float*>dx, n, mh, ml, r, a, bb, w)
    elif io_t is double:
        cnb_dxvec_d(<const double*>x, <const double*>dy, <double*>dx, n, mh, ml, r, a, bb, w)
    else:
        cnb_dxvec_h(<const uint16_t*>x, <const uint16_t*>dy, <uint16_t*>dx, n, mh, ml, r, a, bb,
                    w)


cdef void row_fast(const char* xr, const char* dyr, char* dxr, Py_ssize_t K0, Py_ssize_t K1,
                   Py_ssize_t xs0, Py_ssize_t ds0, Py_ssize_t os0, double m, double r, int mode,
                   bint refine, const double* w, Py_ssize_t pk0, bint pvec, double* pw, double* pb,
                   const io_t* tag) noexcept nogil:
    """row_backward without activation on contiguous segments (any float dtype).

    Rows of up to ROWFAST_BUF elements keep xhat and the summed term of pass B in two
    float64 buffers on the stack (16 KiB), from which pass C computes dx without
    reading x and dy again (cnb_rowCb: the same operations on the same values) --
    for float16 data, and for the others with one parameter per segment (batch,
    group, instance norm).  1 thread, AMD EPYC Zen 4 (AVX2), median over 8 heap
    layouts: layer_norm_backward (64, 1024) float16 97 -> 83 us, but float32 73 -> 82
    and float64 87 -> 92 (with per-element parameters pass B already stores the two
    parameter sums: two more stores per vector made it store-bound); batch / group /
    instance norm backward (4, 64, 16, 16) float16 -17%, float64 -1 to -7%, float32
    -3% to 0."""
    cdef double acc[32]
    cdef double seg[32]
    cdef double vbuf[ROWFAST_BUF]
    cdef double tbuf[ROWFAST_BUF]
    cdef Py_ssize_t K = K0 * K1, k0
    cdef bint buffered = K <= ROWFAST_BUF and (io_t is uint16_t or not pvec)
    cdef double* vb = NULL
    cdef double* tb = NULL
    cdef double ml = 0.0, a, bb, s1 = 0.0, s2 = 0.0, t1 = 0.0, t2 = 0.0
    cdef const double* wk
    cdef int l
    for l in range(32):
        acc[l] = 0.0
    if refine:
        for k0 in range(K0):
            d_rowA(xr + k0 * xs0, K1, m, acc, tag)
        for l in range(16):
            t1 = t1 + acc[l]
            acc[l] = 0.0
        ml = t1 / K
        t1 = 0.0
    for k0 in range(K0):
        wk = w + pk0 * k0
        if buffered:
            vb = vbuf + k0 * K1
            tb = tbuf + k0 * K1
        if pvec:
            d_rowB(xr + k0 * xs0, dyr + k0 * ds0, K1, m, ml, r, wk, 1, pw + pk0 * k0,
                   pb + pk0 * k0, acc, vb, tb, tag)
        else:
            for l in range(32):
                seg[l] = 0.0
            d_rowB(xr + k0 * xs0, dyr + k0 * ds0, K1, m, ml, r, NULL, 0, NULL, NULL, seg, vb, tb,
                   tag)   # no weight: fold_segment weighs the segment's sums
            fold_segment(seg, seg + 16, 16, wk[0], &s1, &s2, pw + pk0 * k0 if pw != NULL else NULL,
                         pb + pk0 * k0 if pw != NULL else NULL)
    for l in range(16):
        t1 = t1 + acc[l]
        t2 = t2 + acc[16 + l]
    row_coefficients(mode, t1 + s1, t2 + s2, K, &a, &bb)
    for k0 in range(K0):
        if buffered:
            d_rowCb(vbuf + k0 * K1, tbuf + k0 * K1, dxr + k0 * os0, K1, r, w + pk0 * k0, pvec,
                    a, bb, tag)
        else:
            d_rowC(xr + k0 * xs0, dyr + k0 * ds0, dxr + k0 * os0, K1, m, ml, r, w + pk0 * k0,
                   pvec, a, bb, tag)


cdef void row_fast4(const char** xr, const char** dyr, char** dxr, Py_ssize_t K0, Py_ssize_t K1,
                    Py_ssize_t xs0, Py_ssize_t ds0, Py_ssize_t os0, const double* m,
                    const double* r, int mode, bint refine, const double* w, Py_ssize_t pk0,
                    double* pw, double* pb, const io_t* tag) noexcept nogil:
    """Four rows of row_fast with per-element parameters, the parameter sums blocked."""
    cdef double acc[128]
    cdef double ml[4]
    cdef double a, bb, t1, t2
    cdef Py_ssize_t K = K0 * K1, k0
    cdef int l, q
    for l in range(128):
        acc[l] = 0.0
    for q in range(4):
        ml[q] = 0.0
        if refine:
            for k0 in range(K0):
                d_rowA(xr[q] + k0 * xs0, K1, m[q], acc, tag)
            t1 = 0.0
            for l in range(16):
                t1 = t1 + acc[l]
                acc[l] = 0.0
            ml[q] = t1 / K
    for k0 in range(K0):
        d_rowB4(xr, dyr, k0 * xs0, k0 * ds0, K1, m, ml, r, w + pk0 * k0, pw + pk0 * k0,
                pb + pk0 * k0, acc, tag)
    for q in range(4):
        t1 = 0.0
        t2 = 0.0
        for l in range(16):
            t1 = t1 + acc[32 * q + l]
            t2 = t2 + acc[32 * q + 16 + l]
        row_coefficients(mode, t1, t2, K, &a, &bb)
        for k0 in range(K0):
            d_rowC(xr[q] + k0 * xs0, dyr[q] + k0 * ds0, dxr[q] + k0 * os0, K1, m[q], ml[q], r[q],
                   w + pk0 * k0, 1, a, bb, tag)


cdef void row_backward(const char* xr, const char* dyr, char* dxr, Py_ssize_t K0, Py_ssize_t K1,
                       const Py_ssize_t* xs, const Py_ssize_t* ds, const Py_ssize_t* os,
                       double m, double r, int mode, bint refine,
                       const double* w, const double* b, Py_ssize_t pk0, bint pvec,
                       double* pw, double* pb, int act, double* xb, double* gb,
                       const io_t* tag) noexcept nogil:
    """One row of K0 * K1 elements (strides xs/ds/os [2], bytes); ``w``, ``b``, ``pw``,
    ``pb`` point at the row's parameters (``pw`` NULL: no parameter sums).

    ``xb``/``gb`` are float64 buffers of the whole row, or NULL (then each
    pass re-reads the row chunk by chunk).
    """
    cdef double xc[CHUNK]
    cdef double gc[CHUNK]
    cdef double tc[CHUNK]
    cdef double acc1[LANES]
    cdef double acc2[LANES]
    cdef double sg1[LANES]
    cdef double sg2[LANES]
    cdef Py_ssize_t K = K0 * K1, k0, c0, n, j, po
    cdef double ml = 0.0, a, bb, s1 = 0.0, s2 = 0.0
    cdef double* xp
    cdef double* gp
    cdef int l
    cdef double zero = 0.0
    if act == ACT_NONE and xs[1] == sizeof(io_t) and ds[1] == sizeof(io_t) and os[1] == sizeof(io_t):
        row_fast(xr, dyr, dxr, K0, K1, xs[0], ds[0], os[0], m, r, mode, refine, w, pk0, pvec,
                 pw, pb, tag)
        return
    for l in range(LANES):
        acc1[l] = 0.0
        acc2[l] = 0.0
    # pass A (float64 only): the exact residual of the mean, mean_lo = mean(x - mean)
    if refine:
        for k0 in range(K0):
            for c0 in range(0, K1, CHUNK):
                n = min(CHUNK, K1 - c0)
                load_chunk(xr + k0 * xs[0] + c0 * xs[1], xs[1], n, xc, tag)
                center_chunk(xc, n, &m, &zero, False)
                cnb_sum(xc, n, acc1)
        ml = lane_total(acc1) / K
        for l in range(LANES):
            acc1[l] = 0.0
    # pass B: slice sums and parameter sums
    for k0 in range(K0):
        po = pk0 * k0
        if not pvec:
            for l in range(LANES):
                sg1[l] = 0.0
                sg2[l] = 0.0
        for c0 in range(0, K1, CHUNK):
            n = min(CHUNK, K1 - c0)
            j = k0 * K1 + c0
            xp = xb + j if xb != NULL else xc
            gp = gb + j if xb != NULL else gc
            load_xhat(xr + k0 * xs[0] + c0 * xs[1], xs[1], n, xp, m, ml, r, tag)
            load_chunk(dyr + k0 * ds[0] + c0 * ds[1], ds[1], n, gp, tag)
            if pvec:
                grad_chunk(xp, gp, n, w + po + c0, b + po + c0, True, act)
                cnb_wsums(xp, gp, w + po + c0, 1, pw + po + c0, pb + po + c0, n, acc1, acc2)
            else:
                grad_chunk(xp, gp, n, w + po, b + po, False, act)
                cnb_gsums(xp, gp, n, sg1, sg2)
        if not pvec:
            fold_segment(sg1, sg2, LANES, w[po], &s1, &s2, pw + po if pw != NULL else NULL,
                         pb + po if pw != NULL else NULL)
    row_coefficients(mode, lane_total(acc1) + s1, lane_total(acc2) + s2, K, &a, &bb)
    # pass C: dx
    for k0 in range(K0):
        po = pk0 * k0
        for c0 in range(0, K1, CHUNK):
            n = min(CHUNK, K1 - c0)
            j = k0 * K1 + c0
            if xb != NULL:
                xp = xb + j
                gp = gb + j
            else:
                xp = xc
                gp = gc
                load_xhat(xr + k0 * xs[0] + c0 * xs[1], xs[1], n, xp, m, ml, r, tag)
                load_chunk(dyr + k0 * ds[0] + c0 * ds[1], ds[1], n, gp, tag)
                grad_chunk(xp, gp, n, w + po + (c0 if pvec else 0), b + po + (c0 if pvec else 0),
                           pvec, act)
            cnb_dx_scalar(tc, xp, gp, w + po + (c0 if pvec else 0), pvec, n, a, bb, r)
            store_chunk(dxr + k0 * os[0] + c0 * os[1], os[1], n, tc, tag)


cdef void rows4(const char* x, const char* dy, char* dx, const Py_ssize_t* sh,
                const Py_ssize_t* xs, const Py_ssize_t* ds, const Py_ssize_t* os,
                const double* mean, const double* rstd, const Py_ssize_t* ss, const double* w,
                const Py_ssize_t* ps, double* pacc, Py_ssize_t Pp, Py_ssize_t q, int mode,
                bint refine, const io_t* tag) noexcept nogil:
    """Rows q .. q+3 through row_fast4 (parameters shared by the rows)."""
    cdef const char* xr[4]
    cdef const char* dyr[4]
    cdef char* dxr[4]
    cdef double m[4]
    cdef double r[4]
    cdef Py_ssize_t i0, i1, so
    cdef int k
    for k in range(4):
        i0 = (q + k) // sh[1]
        i1 = (q + k) % sh[1]
        so = i0 * ss[0] + i1 * ss[1]
        xr[k] = x + i0 * xs[0] + i1 * xs[1]
        dyr[k] = dy + i0 * ds[0] + i1 * ds[1]
        dxr[k] = dx + i0 * os[0] + i1 * os[1]
        m[k] = mean[so]
        r[k] = rstd[so]
    row_fast4(xr, dyr, dxr, sh[2], sh[3], xs[2], ds[2], os[2], m, r, mode, refine, w, ps[2],
              pacc, pacc + Pp, tag)


cdef int rows_nd(const char* x, const char* dy, char* dx, const Py_ssize_t* sh,
                 const Py_ssize_t* xs, const Py_ssize_t* ds, const Py_ssize_t* os,
                 const double* mean, const double* rstd, const Py_ssize_t* ss,
                 const double* w, const double* b, const Py_ssize_t* ps, double* pacc,
                 Py_ssize_t P, Py_ssize_t Pp, Py_ssize_t ntasks, int mode, bint refine, int act, int nthreads,
                 const io_t* tag) noexcept nogil:
    """Rows (b0, b1) of K0 * K1 elements; task t takes rows [t*R/T, (t+1)*R/T) and adds
    its parameter sums to pacc[t] (``P`` sums of gv*xhat at 0, ``P`` of gv at ``Pp``).

    Returns the number of tasks that could not get a row buffer (they ran unbuffered).
    """
    cdef Py_ssize_t R = sh[0] * sh[1], K = sh[2] * sh[3], t, q, q0, q1, i0, i1, so, po
    cdef double* xb
    cdef double* gb
    cdef double* pw
    cdef double* pb
    cdef int nt = nthreads if R * K >= SERIAL_WORK and ntasks > 1 else 1
    cdef int unbuffered = 0
    cdef bint blocked = False, fast = False
    # row_fast reads the rows straight from memory: no row buffer
    fast = (act == ACT_NONE and xs[3] == sizeof(io_t) and ds[3] == sizeof(io_t)
            and os[3] == sizeof(io_t))
    # LayerNorm-like rows: contiguous segments, parameters per element, the same for every row
    blocked = block_rows4 and fast and pacc != NULL and ps[3] == 1 and ps[0] == 0 and ps[1] == 0
    for t in prange(ntasks, nogil=True, num_threads=nt, schedule='static'):
        xb = NULL
        gb = NULL
        if K <= ROWBUF and not fast:
            xb = <double*>malloc(2 * K * sizeof(double))
            if xb != NULL:
                gb = xb + K
            else:
                unbuffered += 1
        q0 = t * R // ntasks
        q1 = (t + 1) * R // ntasks
        if blocked:
            while q0 + 4 <= q1:
                rows4(x, dy, dx, sh, xs, ds, os, mean, rstd, ss, w, ps,
                      pacc + t * 2 * Pp, Pp, q0, mode, refine, tag)
                q0 = q0 + 4
        for q in range(q0, q1):
            i0 = q // sh[1]
            i1 = q % sh[1]
            so = i0 * ss[0] + i1 * ss[1]
            po = i0 * ps[0] + i1 * ps[1]
            pw = NULL
            pb = NULL
            if pacc != NULL:
                pw = pacc + t * 2 * Pp + po
                pb = pw + Pp
            row_backward(x + i0 * xs[0] + i1 * xs[1], dy + i0 * ds[0] + i1 * ds[1],
                         dx + i0 * os[0] + i1 * os[1], sh[2], sh[3], xs + 2, ds + 2, os + 2,
                         mean[so], rstd[so], mode, refine, w + po, b + po, ps[2], ps[3] == 1,
                         pw, pb, act, xb, gb, tag)
        free(xb)
    return unbuffered


cdef inline bint _dtype_code(cnp.ndarray a, int* code) except False:
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_FLOAT64:
        code[0] = 2
    elif t == cnp.NPY_FLOAT32:
        code[0] = 1
    elif t == cnp.NPY_FLOAT16:
        code[0] = 0
    else:
        raise TypeError(f"unsupported dtype {a.dtype}")
    return True


cdef inline void _copy4(object seq, Py_ssize_t* out, int n) except *:
    cdef int i
    for i in range(n):
        out[i] = seq[i]


cdef inline Py_ssize_t _max_index(const Py_ssize_t* shape, const Py_ssize_t* strides,
                                  Py_ssize_t off) noexcept:
    """Largest element index a 4-d strided walk from ``off`` touches (-1 if it goes below 0)."""
    cdef Py_ssize_t lo = off, hi = off
    cdef int i
    for i in range(4):
        if shape[i] > 1:
            if strides[i] > 0:
                hi += (shape[i] - 1) * strides[i]
            else:
                lo += (shape[i] - 1) * strides[i]
    return hi if lo >= 0 else -1


def rows_backward(cnp.ndarray x, Py_ssize_t xoff, cnp.ndarray dy, Py_ssize_t dyoff,
                  cnp.ndarray dx, Py_ssize_t dxoff, shape, xstrides, dystrides, dxstrides,
                  const double[::1] mean, const double[::1] rstd, Py_ssize_t soff, sstrides,
                  const double[::1] w, const double[::1] b, Py_ssize_t poff, pstrides, pacc,
                  int mode, bint refine, int act, int nthreads):
    """Gradients of slices laid out as rows, over a canonical ``(B0, B1, K0, K1)`` view.

    Parameters
    ----------
    x, dy, dx : ndarray
        Same dtype (float16/32/64); ``dx`` is written.  ``*off`` are byte
        offsets of element 0, ``*strides`` the byte strides of the view: rows
        ``(b0, b1)``, each one statistics slice of ``K0 * K1`` elements.
    mean, rstd : float64, per row at ``soff + b0 * sstrides[0] + b1 * sstrides[1]``
    w, b : float64 parameters at ``poff + b0*ps[0] + b1*ps[1] + k0*ps[2] + k1*ps[3]``
        (element strides ``pstrides``; ``ps[3]`` is 1, or 0 for one parameter
        per segment k0).
    pacc : float64 ``(T, 2, Pp)`` with ``Pp >= len(w)``, or None
        Zeroed partial parameter sums, one per task (``T`` tasks, a fixed
        split of the rows), laid out like ``w``: ``[:, 0] += gv * xhat``,
        ``[:, 1] += gv``.  Required when ``ps[3] == 1``.  (Pad ``Pp`` so that
        ``8 * Pp`` is not a multiple of 4096: the two sums of one parameter
        then never alias in the store buffer.)
    mode : int
        0: eval (``dx = w*gv*rstd``), 1: RMS norm, 2: centred (LN/BN/GN/IN).
    refine : bool
        Add the exact residual ``mean(x - mean)`` to the mean (float64 data).

    Returns
    -------
    int
        Tasks that ran without a row buffer (memory): results are the same.
    """
    cdef Py_ssize_t sh[4]
    cdef Py_ssize_t xs[4]
    cdef Py_ssize_t ds[4]
    cdef Py_ssize_t os[4]
    cdef Py_ssize_t ss[4]
    cdef Py_ssize_t ps[4]
    cdef int cx, cd, co
    _copy4(shape, sh, 4)
    _copy4(xstrides, xs, 4)
    _copy4(dystrides, ds, 4)
    _copy4(dxstrides, os, 4)
    _copy4(sstrides, ss, 2)
    ss[2] = 0
    ss[3] = 0
    _copy4(pstrides, ps, 4)
    _dtype_code(x, &cx)
    _dtype_code(dy, &cd)
    _dtype_code(dx, &co)
    if cx != cd or cx != co:
        raise TypeError("rows_backward: x, dy and dx must have the same dtype")
    if ps[3] not in (0, 1):
        raise ValueError("rows_backward: the inner parameter stride must be 0 or 1")
    if mode not in (MODE_EVAL, MODE_RMS, MODE_CENTER):
        raise ValueError(f"rows_backward: unknown mode {mode}")
    cdef Py_ssize_t K = sh[2] * sh[3], R = sh[0] * sh[1]
    if R * K == 0:
        return 0
    cdef Py_ssize_t P = w.shape[0]
    if b.shape[0] != P or _max_index(sh, ps, poff) < 0 or _max_index(sh, ps, poff) >= P:
        raise ValueError("rows_backward: parameter offsets/strides outside w and b")
    if _max_index(sh, ss, soff) < 0 or _max_index(sh, ss, soff) >= min(mean.shape[0], rstd.shape[0]):
        raise ValueError("rows_backward: statistics offsets/strides outside mean and rstd")
    cdef double[:, :, ::1] pv
    cdef double* pp = NULL
    cdef Py_ssize_t ntasks, Pp = P
    if pacc is not None:
        pv = pacc
        if pv.shape[0] < 1 or pv.shape[1] != 2 or pv.shape[2] < P:
            raise ValueError("rows_backward: pacc must have shape (tasks, 2, >= len(w))")
        ntasks = min(pv.shape[0], R)
        Pp = pv.shape[2]
        pp = &pv[0, 0, 0]
    else:
        if ps[3] == 1:
            raise ValueError("rows_backward: per-element parameters need pacc")
        ntasks = max(1, min(R, 64))
    cdef const char* xp = <const char*>cnp.PyArray_DATA(x) + xoff
    cdef const char* dp = <const char*>cnp.PyArray_DATA(dy) + dyoff
    cdef char* op = <char*>cnp.PyArray_DATA(dx) + dxoff
    cdef const double* pm = &mean[0] + soff
    cdef const double* pr = &rstd[0] + soff
    cdef const double* pw = &w[0] + poff
    cdef const double* pb = &b[0] + poff
    cdef double* pa = pp + poff if pp != NULL else NULL
    cdef int res = 0
    with nogil:
        if cx == 2:
            res = rows_nd(xp, dp, op, sh, xs, ds, os, pm, pr, ss, pw, pb, ps, pa, P, Pp, ntasks, mode,
                          refine, act, nthreads, <const double*>NULL)
        elif cx == 1:
            res = rows_nd(xp, dp, op, sh, xs, ds, os, pm, pr, ss, pw, pb, ps, pa, P, Pp, ntasks, mode,
                          refine, act, nthreads, <const float*>NULL)
        else:
            res = rows_nd(xp, dp, op, sh, xs, ds, os, pm, pr, ss, pw, pb, ps, pa, P, Pp, ntasks, mode,
                          refine, act, nthreads, <const uint16_t*>NULL)
    return res


# ---------------------------------------------------------------- the small-call entries
include "_entry_args.pxi"


cdef inline bint _overlap(cnp.ndarray a, cnp.ndarray b) noexcept:
    """The bytes of two C-contiguous arrays overlap (np.may_share_memory's bounds test)."""
    cdef char* pa = <char*>cnp.PyArray_DATA(a)
    cdef char* pb = <char*>cnp.PyArray_DATA(b)
    return pa < pb + cnp.PyArray_NBYTES(b) and pb < pa + cnp.PyArray_NBYTES(a)


cdef bint _stat_shape(object a, Py_ssize_t* shape, int n, Py_ssize_t* alt, int nalt) noexcept:
    """a is a C-contiguous float64 array of shape ``shape[:n]`` or ``alt[:nalt]``."""
    if not rows_eligible(a, cnp.NPY_FLOAT64):
        return False
    cdef int na = cnp.PyArray_NDIM(<cnp.ndarray>a), i
    cdef Py_ssize_t* want = shape if na == n else (alt if na == nalt else NULL)
    if want == NULL:
        return False
    for i in range(na):
        if cnp.PyArray_DIM(<cnp.ndarray>a, i) != want[i]:
            return False
    return True


cdef inline bint _native_or_none(object p) noexcept:
    """p is None, or not an ndarray (param_row declines it), or in native byte order
    (``_small_param`` of backward.py takes native float dtypes only)."""
    return type(p) is not cnp.ndarray or cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>p)


cdef object _params_f64(object weight, object bias, Py_ssize_t n):
    """(w, b, want) for rows_nd: float64 vectors of n (``param_row``: ones / zeros for
    a missing one) when a parameter is given, else one-element placeholders; None
    when a given one is not a native-order float vector of n (``_small_params`` of
    backward.py)."""
    if weight is None and bias is None:
        return np.ones(1), np.zeros(1), False
    if not _native_or_none(weight) or not _native_or_none(bias):
        return None
    cdef object w1 = param_row(weight, n, 1.0), b1 = param_row(bias, n, 0.0)
    if w1 is None or b1 is None:
        return None
    return w1, b1, True


cdef object _params_and_output(object weight, object bias, Py_ssize_t n, object out,
                               cnp.ndarray xa, cnp.ndarray da, int nthreads):
    """(``_params_f64``, ``_output``), or None when either declines."""
    cdef object params = _params_f64(weight, bias, n)
    if params is None:
        return None
    cdef object dx = _output(out, xa, da, nthreads)
    return None if dx is None else (params, dx)


cdef int _input_code(object x, object dy, int min_nd) noexcept:
    """The dtype code (2 float64, 1 float32, 0 float16) of x and dy when both are
    exact C-contiguous, aligned, native-order, non-empty ndarrays of one float dtype
    and shape with at least ``min_nd`` dimensions, else -1."""
    if type(x) is not cnp.ndarray or type(dy) is not cnp.ndarray:
        return -1
    cdef cnp.ndarray xa = <cnp.ndarray>x, da = <cnp.ndarray>dy
    cdef int t = cnp.PyArray_TYPE(xa), nd = cnp.PyArray_NDIM(xa), i
    if nd < min_nd or not rows_eligible(xa, t) or not rows_eligible(da, t) or cnp.PyArray_NDIM(da) != nd \
            or cnp.PyArray_SIZE(xa) <= 0:
        return -1
    for i in range(nd):
        if cnp.PyArray_DIM(da, i) != cnp.PyArray_DIM(xa, i):
            return -1
    return 2 if t == cnp.NPY_FLOAT64 else (1 if t == cnp.NPY_FLOAT32 else
                                           (0 if t == cnp.NPY_FLOAT16 else -1))


cdef object _output(object out, cnp.ndarray xa, cnp.ndarray da, int nthreads):
    """dx: ``output_like`` for x (a new array, its pages faulted in first when
    threads will write it), where ``out`` may also be the dy object itself and must
    otherwise share no memory with x or dy (x itself: the same object); None where
    the general path decides."""
    if out is None:
        return output_like(xa, None, nthreads)
    if out is xa or out is da:
        return out if cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out) else None
    if type(out) is not cnp.ndarray or _overlap(<cnp.ndarray>out, xa) \
            or _overlap(<cnp.ndarray>out, da):
        return None
    return output_like(xa, out, nthreads)


cdef struct Dim:
    Py_ssize_t n
    Py_ssize_t s[5]      # x, dy, dx, statistics, parameter element strides


cdef inline void _dim(Dim* d, Py_ssize_t n, Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t s2,
                      Py_ssize_t s3, Py_ssize_t s4) noexcept:
    d.n = n
    d.s[0] = s0
    d.s[1] = s1
    d.s[2] = s2
    d.s[3] = s3
    d.s[4] = s4


cdef bint _merge_pad(const Dim* d, int nd, Dim* two) noexcept:
    """_merge and _pad of backward.py: the dims of size > 1 (outermost first), merged
    where every stride allows, padded in front to two (size 1, strides 0) into
    ``two``; False when more than two remain."""
    cdef Dim live[4]
    cdef int m = 0, i, k
    cdef bint ok
    for i in range(nd):
        if d[i].n == 1:
            continue
        if m > 0:
            ok = True
            for k in range(5):
                if live[m - 1].s[k] != d[i].s[k] * d[i].n:
                    ok = False
            if ok:
                live[m - 1].n *= d[i].n
                for k in range(5):
                    live[m - 1].s[k] = d[i].s[k]
                continue
        live[m] = d[i]
        m += 1
    if m > 2:
        return False
    for i in range(2 - m):
        _dim(&two[i], 1, 0, 0, 0, 0, 0)
    for i in range(m):
        two[2 - m + i] = live[i]
    return True


cdef object _rows_entry(cnp.ndarray xa, cnp.ndarray da, cnp.ndarray dx, int code,
                        const Dim* rows_in, int nr, const Dim* batch_in, int nb,
                        Py_ssize_t min_segment, object m1, object r1, object params,
                        bint wgiven, bint bgiven, int mode, bint refine, int nthreads):
    """``rows_nd`` with the plan ``_small_rows_plan`` makes from the rows and batch dims
    (element strides; float64 statistics m1/r1 flat, ``params`` from ``_params_f64``), the
    partial parameter sums of ``_param_acc`` and their in-order sum
    (``pacc.sum(axis=0)`` added to zeros), dx written into ``dx``.  Returns ``(dx,
    dweight, dbias)`` (float64 sums, None where not given) or None, with nothing
    written, where the general path would not take the rows kernel."""
    cdef Dim rows[2]
    cdef Dim batch[2]
    if not _merge_pad(rows_in, nr, rows) or not _merge_pad(batch_in, nb, batch):
        return None
    if rows[1].n < min_segment and rows[0].n > 1:
        return None
    cdef Py_ssize_t K = rows[0].n * rows[1].n, item = cnp.PyArray_ITEMSIZE(xa)
    cdef Py_ssize_t R = cnp.PyArray_SIZE(xa) // K
    if not (2 * K * item <= (1 << 20) or R >= 64):
        return None
    cdef Py_ssize_t sh[4]
    cdef Py_ssize_t st[5][4]
    cdef int k, j
    sh[0] = batch[0].n; sh[1] = batch[1].n; sh[2] = rows[0].n; sh[3] = rows[1].n
    for k in range(5):
        for j in range(2):
            st[k][j] = batch[j].s[k] * (item if k < 3 else 1)
            st[k][2 + j] = rows[j].s[k] * (item if k < 3 else 1)
    st[3][2] = 0
    st[3][3] = 0
    cdef const double[::1] mv = m1
    cdef const double[::1] rv = r1
    cdef const double[::1] wv = params[0]
    cdef const double[::1] bv = params[1]
    cdef bint want = params[2]
    cdef Py_ssize_t P = wv.shape[0], Pp = P, T = 0, ntasks, i
    cdef double* pacc = NULL
    if want:
        if (8 * P) % 4096 < 64:
            Pp = P + 8
        T = max(1, min(min(R, 64), R * K // (16 * P)))
        pacc = <double*>calloc(T * 2 * Pp, sizeof(double))
        if pacc == NULL:
            raise MemoryError("backward: partial parameter sums")
        ntasks = min(T, R)
    else:
        ntasks = max(1, min(R, 64))
    cdef const char* xp = <const char*>cnp.PyArray_DATA(xa)
    cdef const char* dp = <const char*>cnp.PyArray_DATA(da)
    cdef char* op = <char*>cnp.PyArray_DATA(dx)
    with nogil:
        if code == 2:
            rows_nd(xp, dp, op, sh, st[0], st[1], st[2], &mv[0], &rv[0], st[3], &wv[0], &bv[0],
                    st[4], pacc, P, Pp, ntasks, mode, refine, ACT_NONE, nthreads,
                    <const double*>NULL)
        elif code == 1:
            rows_nd(xp, dp, op, sh, st[0], st[1], st[2], &mv[0], &rv[0], st[3], &wv[0], &bv[0],
                    st[4], pacc, P, Pp, ntasks, mode, refine, ACT_NONE, nthreads,
                    <const float*>NULL)
        else:
            rows_nd(xp, dp, op, sh, st[0], st[1], st[2], &mv[0], &rv[0], st[3], &wv[0], &bv[0],
                    st[4], pacc, P, Pp, ntasks, mode, refine, ACT_NONE, nthreads,
                    <const uint16_t*>NULL)
    if not want:
        return dx, None, None
    cdef cnp.ndarray dw = np.empty(P), db = np.empty(P)
    cdef double* sp[2]
    sp[0] = <double*>cnp.PyArray_DATA(dw)
    sp[1] = <double*>cnp.PyArray_DATA(db)
    cdef double* dst
    cdef const double* part
    # task by task over all P sums (each sum still adds the tasks in order: the same
    # values; where several partials are NaN, which NaN's sign and payload survives can
    # differ by ISA): one sum at a time over the tasks was a chain of dependent additions,
    # ~9 us of the 67 of a (4, 64, 16, 16) float32 batch_norm_backward (64 tasks x 2
    # x 64 sums, AMD EPYC Zen 4); this order vectorizes
    for k in range(2):
        dst = sp[k]
        part = pacc + k * Pp
        for j in range(P):
            dst[j] = part[j]
        for i in range(1, T):
            part = pacc + (i * 2 + k) * Pp
            for j in range(P):
                dst[j] = dst[j] + part[j]
        for j in range(P):
            dst[j] = dst[j] + 0.0
    free(pacc)
    return dx, (dw if wgiven else None), (db if bgiven else None)


def rows_backward_contig(object x, object dy, object mean, object rstd, object weight,
                         object bias, object out, int mode, int nthreads):
    """layer_norm_backward (``mode`` 2) / rms_norm_backward (``mode`` 1, ``mean``
    None) over the last axis of C-contiguous arrays, with nothing but C between the
    call and ``rows_nd``: the rows, parameter sums and padding of the general path
    (``_rows_backward``, one batch dim of R rows, one row dim of L elements), so
    bitwise its results.

    Eligible: x and dy exact ndarrays of one float dtype and shape, C-contiguous,
    aligned, native order, non-empty; mean/rstd C-contiguous float64 of shape
    ``x.shape[:-1]`` (+ ``(1,)``); weight/bias None or float vectors of length L;
    ``out`` None, x or dy itself (writeable), or a writeable C-contiguous array
    like x that overlaps neither; rows the general path runs in cache (``2 * L *
    itemsize <= 1 MiB`` or at least 64 rows).  Returns ``(dx, dweight, dbias)``
    (None for a parameter not given, else float64 of shape (L,): the caller casts),
    or None when the call is not eligible (the caller takes the general path,
    which validates).
    """
    cdef int code = _input_code(x, dy, 1)
    if code < 0 or (mode != MODE_CENTER and mode != MODE_RMS):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(xa), i
    cdef Py_ssize_t L = cnp.PyArray_DIM(xa, nd - 1), R = cnp.PyArray_SIZE(xa) // L
    cdef Py_ssize_t shape[64]
    for i in range(nd - 1):
        shape[i] = cnp.PyArray_DIM(xa, i)
    shape[nd - 1] = 1
    if not _stat_shape(rstd, shape, nd, shape, nd - 1) or (
            mode == MODE_CENTER and not _stat_shape(mean, shape, nd, shape, nd - 1)):
        return None
    cdef object pd = _params_and_output(weight, bias, L, out, xa, <cnp.ndarray>dy, nthreads)
    if pd is None:
        return None
    cdef object params = pd[0], dx = pd[1]
    cdef Dim rows[1]
    cdef Dim batch[1]
    _dim(&rows[0], L, 1, 1, 1, 0, 1 if params[2] else 0)
    _dim(&batch[0], R, L, L, L, 1, 0)
    return _rows_entry(xa, <cnp.ndarray>dy, dx, code, rows, 1, batch, 1, 1,
                       np.zeros(R) if mode == MODE_RMS else mean.reshape(-1), rstd.reshape(-1),
                       params, weight is not None, bias is not None, mode,
                       code == 2 and mode == MODE_CENTER, nthreads)


def channel_backward_contig(object x, object dy, object mean, object rstd, object weight,
                            object bias, object out, int kind, Py_ssize_t groups,
                            bint training, int nthreads):
    """batch (``kind`` 0), instance (1) or group (2, ``groups`` groups) norm backward of
    NCHW data (channel axis 1), ``_small_channel_backward`` in C: the same rows,
    parameter sums and padding as the general path (or batch norm's per-cell pass),
    so bitwise its results.

    Eligible as ``rows_backward_contig`` (x with 2+ dims for batch norm, 3+ for
    instance and group norm, which need spatial axes), with float64 statistics of
    shape (C,) or (1, C, 1, ...) (batch), (N, C) or (N, C, 1, ...) (instance), (N,
    G) (group), float parameters of C, G dividing C; instance and group norm need
    H*W > 1 and segments of H*W of at least 64 elements where a slice has several
    (batch norm takes its other layouts to the per-cell pass,
    ``batch_cells_backward``, as ``_small_batch_cells`` does).  Returns ``(dx,
    dweight, dbias)`` (float64 sums, the caller casts) or None: the caller then takes
    its Python path (the general path, which validates).
    """
    cdef int code = _input_code(x, dy, 2 if kind == 0 else 3)
    if code < 0 or kind < 0 or kind > 2:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(xa), i
    cdef Py_ssize_t N = cnp.PyArray_DIM(xa, 0), C = cnp.PyArray_DIM(xa, 1)
    cdef Py_ssize_t HW = cnp.PyArray_SIZE(xa) // (N * C)
    cdef Py_ssize_t G = groups if kind == 2 else C
    if (HW == 1 and kind != 0) or G <= 0 or C % G:
        return None
    cdef Py_ssize_t shape[64]
    cdef Py_ssize_t alt[2]
    cdef bint ok
    for i in range(nd):
        shape[i] = 1
    if kind == 0:
        shape[1] = C
        alt[0] = C
        ok = _stat_shape(mean, shape, nd, alt, 1) and _stat_shape(rstd, shape, nd, alt, 1)
    elif kind == 1:
        shape[0] = N
        shape[1] = C
        ok = _stat_shape(mean, shape, nd, shape, 2) and _stat_shape(rstd, shape, nd, shape, 2)
    else:
        alt[0] = N
        alt[1] = G
        ok = _stat_shape(mean, alt, 2, alt, 2) and _stat_shape(rstd, alt, 2, alt, 2)
    if not ok:
        return None
    cdef object pd = _params_and_output(weight, bias, C, out, xa, <cnp.ndarray>dy, nthreads)
    if pd is None:
        return None
    cdef object params = pd[0], dx = pd[1]
    cdef Py_ssize_t pe = 1 if params[2] else 0, Cg = C // G
    cdef Dim rows[2]
    cdef Dim batch[2]
    cdef object res = None
    if kind == 0:   # slice = channel (N segments of HW), parameter per channel
        _dim(&rows[0], N, C * HW, C * HW, C * HW, 0, 0)
        _dim(&rows[1], HW, 1, 1, 1, 0, 0)
        _dim(&batch[0], C, HW, HW, HW, 1, pe)
        if HW > 1:
            res = _rows_entry(xa, <cnp.ndarray>dy, dx, code, rows, 2, batch, 1, 64,
                              mean.reshape(-1), rstd.reshape(-1), params, weight is not None,
                              bias is not None, MODE_CENTER if training else MODE_EVAL,
                              training and code == 2, nthreads)
        if res is not None:
            return res
        # (N, C) input or segments of H*W < 64: the per-cell pass (_small_batch_cells)
        sums = batch_cells_backward(xa, <cnp.ndarray>dy, dx, mean.reshape(-1), rstd.reshape(-1),
                                    None if weight is None else params[0],
                                    None if bias is None else params[1], training,
                                    training and code == 2, nthreads)
        return (dx, sums[0] if weight is not None else None,
                sums[1] if bias is not None else None)
    # slice = (sample, group): Cg segments of HW, parameter per segment
    _dim(&rows[0], Cg, HW, HW, HW, 0, pe)
    _dim(&rows[1], HW, 1, 1, 1, 0, 0)
    _dim(&batch[0], N, C * HW, C * HW, C * HW, G, 0)
    _dim(&batch[1], G, Cg * HW, Cg * HW, Cg * HW, 1, Cg * pe)
    return _rows_entry(xa, <cnp.ndarray>dy, dx, code, rows, 2, batch, 2, 64, mean.reshape(-1),
                       rstd.reshape(-1), params, weight is not None, bias is not None,
                       MODE_CENTER, code == 2, nthreads)


# ---------------------------------------------------------------- cells (BatchNorm, GroupNorm, InstanceNorm)
cdef void cell_rows_task(const char* x, const char* dy, const Py_ssize_t* sh,
                         const Py_ssize_t* xs, const Py_ssize_t* ds, Py_ssize_t o, Py_ssize_t k,
                         Py_ssize_t r0, Py_ssize_t r1, double mh, double ml, double r,
                         double w, double b, int act, bint want_dy, double* out,
                         const io_t* tag) noexcept nogil:
    """Sums of one cell (o, k) over rows [r0, r1) of R1 and all of R0 (the inner axis)."""
    cdef double xc[CHUNK]
    cdef double gc[CHUNK]
    cdef double a0[LANES]
    cdef double a1[LANES]
    cdef double a2[LANES]
    cdef Py_ssize_t q, c0, n
    cdef const char* xrow
    cdef const char* drow
    cdef int l
    cdef double acc[48]
    cdef double t0 = 0.0, t1 = 0.0, t2 = 0.0
    if act == ACT_NONE and xs[3] == sizeof(io_t) and ds[3] == sizeof(io_t):
        for l in range(48):
            acc[l] = 0.0
        for q in range(r0, r1):
            xrow = x + o * xs[0] + q * xs[1] + k * xs[2]
            drow = dy + o * ds[0] + q * ds[1] + k * ds[2]
            d_cell(xrow, drow, sh[3], mh, ml, r, want_dy, acc, tag)
        for l in range(16):
            t0 = t0 + acc[l]
            t1 = t1 + acc[16 + l]
            t2 = t2 + acc[32 + l]
        out[0] += t0
        out[1] += t1
        out[2] += t2
        return
    for l in range(LANES):
        a0[l] = 0.0
        a1[l] = 0.0
        a2[l] = 0.0
    for q in range(r0, r1):
        xrow = x + o * xs[0] + q * xs[1] + k * xs[2]
        drow = dy + o * ds[0] + q * ds[1] + k * ds[2]
        for c0 in range(0, sh[3], CHUNK):
            n = min(CHUNK, sh[3] - c0)
            load_chunk(xrow + c0 * xs[3], xs[3], n, xc, tag)
            center_chunk(xc, n, &mh, &ml, False)
            cnb_sum(xc, n, a0)
            if want_dy:
                scale_chunk(xc, n, &r, False)
                load_chunk(drow + c0 * ds[3], ds[3], n, gc, tag)
                grad_chunk(xc, gc, n, &w, &b, False, act)
                cnb_gsums(xc, gc, n, a1, a2)
    out[0] += lane_total(a0)
    out[1] += lane_total(a1)
    out[2] += lane_total(a2)


cdef void cell_cols_task(const char* x, const char* dy, const Py_ssize_t* sh,
                         const Py_ssize_t* xs, const Py_ssize_t* ds, Py_ssize_t o, Py_ssize_t r0,
                         Py_ssize_t r1, const double* mh, const double* ml, const double* rs,
                         const double* w, const double* b, Py_ssize_t cbase, Py_ssize_t sk,
                         int act, bint want_dy, double* out, double* buf,
                         const io_t* tag) noexcept nogil:
    """Sums of the cells (o, 0..K) over rows [r0, r1) of R1 (R0 == 1: k is the inner axis).

    Whole rows of K elements are read in order; ``buf`` holds 8*K doubles
    (the cells' statistics and the three accumulators).
    """
    cdef double xc[TILE]
    cdef double gc[TILE]
    cdef Py_ssize_t K = sh[2], q, i, ci, k0, kn
    cdef double* mt = buf
    cdef double* lt = buf + K
    cdef double* rt = buf + 2 * K
    cdef double* wt = buf + 3 * K
    cdef double* bt = buf + 4 * K
    cdef double* a0 = buf + 5 * K
    cdef double* a1 = buf + 6 * K
    cdef double* a2 = buf + 7 * K
    cdef const char* xrow
    cdef const char* drow
    cdef bint fast = False
    cdef const double* lfast = NULL   # NULL: every low part is 0 (x - 0.0 == x: same numbers)
    for i in range(K):
        ci = cbase + i * sk
        mt[i] = mh[ci]
        lt[i] = ml[ci]
        if lt[i] != 0.0:
            lfast = lt
        rt[i] = rs[ci]
        wt[i] = w[ci]
        bt[i] = b[ci]
        a0[i] = 0.0
        a1[i] = 0.0
        a2[i] = 0.0
    fast = act == ACT_NONE and xs[2] == sizeof(io_t) and ds[2] == sizeof(io_t)
    for q in range(r0, r1):
        xrow = x + o * xs[0] + q * xs[1]
        drow = dy + o * ds[0] + q * ds[1]
        if fast:
            d_cols(xrow, drow, K, mt, lfast, rt, want_dy, a0, a1, a2, tag)
            continue
        for k0 in range(0, K, TILE):
            kn = min(TILE, K - k0)
            load_chunk(xrow + k0 * xs[2], xs[2], kn, xc, tag)
            center_chunk(xc, kn, mt + k0, lt + k0, True)
            for i in range(kn):
                a0[k0 + i] += xc[i]
            if want_dy:
                scale_chunk(xc, kn, rt + k0, True)
                load_chunk(drow + k0 * ds[2], ds[2], kn, gc, tag)
                grad_chunk(xc, gc, kn, wt + k0, bt + k0, True, act)
                for i in range(kn):
                    a1[k0 + i] += gc[i]
                    a2[k0 + i] += gc[i] * xc[i]
    for i in range(K):
        ci = (cbase + i * sk) * 3
        out[ci] += a0[i]
        out[ci + 1] += a1[i]
        out[ci + 2] += a2[i]


cdef int cells_nd(const char* x, const char* dy, const Py_ssize_t* sh, const Py_ssize_t* xs,
                  const Py_ssize_t* ds, Py_ssize_t so, Py_ssize_t sk, Py_ssize_t coff,
                  const double* mh, const double* ml, const double* rs, const double* w,
                  const double* b, double* out, Py_ssize_t nchunks, Py_ssize_t ncells,
                  int act, bint want_dy, int nthreads, const io_t* tag) noexcept nogil:
    """Tasks: (o, k, chunk) cells of the inner-reduce form, or (o, chunk) of the column form.

    Chunk c covers rows [c*R1/nchunks, (c+1)*R1/nchunks) and writes its own
    slab ``out[c]`` of shape (ncells, 3): no two tasks touch the same numbers.
    Returns -1 when a column task could not allocate its buffer.
    """
    cdef Py_ssize_t O = sh[0], R1 = sh[1], K = sh[2], R0 = sh[3]
    cdef Py_ssize_t ntasks, t, c, o, k, ci, rest
    cdef bint cols = R0 == 1
    cdef double* buf
    cdef int nt, failed = 0
    if cols:
        ntasks = O * nchunks
    else:
        ntasks = O * K * nchunks
    nt = nthreads if O * R1 * K * R0 >= SERIAL_WORK and ntasks > 1 else 1
    for t in prange(ntasks, nogil=True, num_threads=nt, schedule='static'):
        if cols:
            o = t // nchunks
            c = t % nchunks
            buf = <double*>malloc(8 * K * sizeof(double))
            if buf == NULL:
                failed += 1
            else:
                cell_cols_task(x, dy, sh, xs, ds, o, c * R1 // nchunks, (c + 1) * R1 // nchunks,
                               mh, ml, rs, w, b, coff + o * so, sk, act, want_dy,
                               out + c * ncells * 3, buf, tag)
                free(buf)
        else:
            o = t // (K * nchunks)
            rest = t % (K * nchunks)
            k = rest // nchunks
            c = rest % nchunks
            ci = coff + o * so + k * sk
            cell_rows_task(x, dy, sh, xs, ds, o, k, c * R1 // nchunks, (c + 1) * R1 // nchunks,
                           mh[ci], ml[ci], rs[ci], w[ci], b[ci], act, want_dy,
                           out + (c * ncells + ci) * 3, tag)
    return -1 if failed else 0


def cells_reduce(cnp.ndarray x, Py_ssize_t xoff, cnp.ndarray dy, Py_ssize_t dyoff, shape,
                 xstrides, dystrides, Py_ssize_t so, Py_ssize_t sk, Py_ssize_t coff,
                 const double[::1] mh, const double[::1] ml, const double[::1] rstd,
                 const double[::1] w, const double[::1] b, double[:, :, ::1] out,
                 int act, bint want_dy, int nthreads):
    """Per-cell sums over a canonical ``(O, R1, K, R0)`` view, added into ``out``.

    Cells are the kept positions ``(o, k)``; cell ``(o, k)`` has index
    ``coff + o * so + k * sk`` in the per-cell float64 arrays ``mh``, ``ml``
    (mean hi/lo), ``rstd``, ``w``, ``b`` and in ``out`` (shape
    ``(nchunks, ncells, 3)``), which receives, per chunk of ``R1``,
    ``Σ ((x - mh) - ml)``, ``Σ gv`` and ``Σ gv * xhat``.  With ``want_dy``
    false only the first sum is taken (``dy`` is not read).  Offsets and x/dy
    strides are in bytes; the inner-reduce form (``R0 > 1``: a task per cell
    and chunk) or the column form (``R0 == 1``: a task per o and chunk, whole
    rows of K in order) is picked from the shape.
    """
    cdef Py_ssize_t sh[4]
    cdef Py_ssize_t xs[4]
    cdef Py_ssize_t ds[4]
    cdef int cx, cd
    _copy4(shape, sh, 4)
    _copy4(xstrides, xs, 4)
    _copy4(dystrides, ds, 4)
    _dtype_code(x, &cx)
    _dtype_code(dy, &cd)
    if cx != cd:
        raise TypeError("cells_reduce: x and dy must have the same dtype")
    if sh[0] * sh[1] * sh[2] * sh[3] == 0 or out.shape[0] == 0:
        return
    cdef Py_ssize_t nchunks = out.shape[0], ncells = out.shape[1]
    cdef const char* xp = <const char*>cnp.PyArray_DATA(x) + xoff
    cdef const char* dp = <const char*>cnp.PyArray_DATA(dy) + dyoff
    cdef double* op = &out[0, 0, 0]
    cdef int res = 0
    with nogil:
        if cx == 2:
            res = cells_nd(xp, dp, sh, xs, ds, so, sk, coff, &mh[0], &ml[0], &rstd[0], &w[0], &b[0],
                           op, nchunks, ncells, act, want_dy, nthreads, <const double*>NULL)
        elif cx == 1:
            res = cells_nd(xp, dp, sh, xs, ds, so, sk, coff, &mh[0], &ml[0], &rstd[0], &w[0], &b[0],
                           op, nchunks, ncells, act, want_dy, nthreads, <const float*>NULL)
        else:
            res = cells_nd(xp, dp, sh, xs, ds, so, sk, coff, &mh[0], &ml[0], &rstd[0], &w[0], &b[0],
                           op, nchunks, ncells, act, want_dy, nthreads, <const uint16_t*>NULL)
    if res < 0:
        raise MemoryError("cells_reduce: could not allocate a column buffer")


# ---------------------------------------------------------------- the elementwise dx pass
cdef void dx_row(const char* x, Py_ssize_t xs, const char* dy, Py_ssize_t ds, char* dx,
                 Py_ssize_t os, Py_ssize_t n, const double* mh, const double* ml,
                 const double* rs, const double* a, const double* bb, Py_ssize_t ss,
                 const double* w, const double* b, Py_ssize_t ps, int act, bint mlz,
                 const io_t* tag) noexcept nogil:
    cdef double xc[CHUNK]
    cdef double gc[CHUNK]
    cdef double tc[CHUNK]
    cdef Py_ssize_t i0, m, so, po
    cdef bint direct = (act == ACT_NONE and xs == sizeof(io_t) and ds == sizeof(io_t)
                        and os == sizeof(io_t))
    if direct and ss == 0 and ps == 0:
        d_rowC(x, dy, dx, n, mh[0], ml[0], rs[0], w, 0, a[0], bb[0], tag)
        return
    if direct and ss == 1 and ps == 1:
        d_dxvec(x, dy, dx, n, mh, <const double*>NULL if mlz else ml, rs, a, bb, w, tag)
        return
    for i0 in range(0, n, CHUNK):
        m = min(CHUNK, n - i0)
        so = i0 * ss
        po = i0 * ps
        load_chunk(x + i0 * xs, xs, m, xc, tag)
        load_chunk(dy + i0 * ds, ds, m, gc, tag)
        xhat_chunk(xc, m, mh + so, ml + so, rs + so, ss != 0)
        grad_chunk(xc, gc, m, w + po, b + po, ps != 0, act)
        dx_chunk(tc, xc, gc, m, w + po, ps != 0, a + so, bb + so, rs + so, ss != 0)
        store_chunk(dx + i0 * os, os, m, tc, tag)


cdef void dx_nd(const char* x, const char* dy, char* dx, const double* mh, const double* ml,
                const double* rs, const double* a, const double* bb, const double* w,
                const double* b, const Py_ssize_t* sh, const Py_ssize_t* xs,
                const Py_ssize_t* ds, const Py_ssize_t* os, const Py_ssize_t* ss,
                const Py_ssize_t* ps, int act, bint mlz, int nthreads,
                const io_t* tag) noexcept nogil:
    """4-d loop: dims 0..2 outer (flattened across threads), dim 3 the inner row; ``mlz``:
    every low part of the mean is 0."""
    cdef Py_ssize_t nrows = sh[0] * sh[1] * sh[2], r, i0, i1, i2, so, po
    cdef int nt = nthreads if nrows * sh[3] >= SERIAL_WORK and nrows > 1 else 1
    for r in prange(nrows, nogil=True, num_threads=nt, schedule='static'):
        i2 = r % sh[2]
        i1 = (r // sh[2]) % sh[1]
        i0 = r // (sh[2] * sh[1])
        so = i0 * ss[0] + i1 * ss[1] + i2 * ss[2]
        po = i0 * ps[0] + i1 * ps[1] + i2 * ps[2]
        dx_row(x + i0 * xs[0] + i1 * xs[1] + i2 * xs[2], xs[3],
               dy + i0 * ds[0] + i1 * ds[1] + i2 * ds[2], ds[3],
               dx + i0 * os[0] + i1 * os[1] + i2 * os[2], os[3], sh[3],
               mh + so, ml + so, rs + so, a + so, bb + so, ss[3], w + po, b + po, ps[3], act, mlz,
               tag)


def dx_4d(cnp.ndarray x, Py_ssize_t xoff, cnp.ndarray dy, Py_ssize_t dyoff, cnp.ndarray dx,
          Py_ssize_t dxoff, const double[::1] mh, const double[::1] ml, const double[::1] rstd,
          const double[::1] a, const double[::1] bb, Py_ssize_t soff,
          const double[::1] w, const double[::1] b, Py_ssize_t poff,
          shape, xstrides, dystrides, dxstrides, sstrides, pstrides, int act, int nthreads):
    """``dx = ((w * gv - a) - xhat * bb) * rstd`` over a canonical 4-d view.

    x/dy/dx offsets and strides are in bytes; the statistics (``mh``, ``ml``,
    ``rstd``, ``a``, ``bb``: one layout, offset ``soff``) and parameters
    (``w``, ``b``: offset ``poff``) in elements, with inner strides 0 or 1.
    """
    cdef Py_ssize_t sh[4]
    cdef Py_ssize_t xs[4]
    cdef Py_ssize_t ds[4]
    cdef Py_ssize_t os[4]
    cdef Py_ssize_t ss[4]
    cdef Py_ssize_t ps[4]
    cdef int cx, cd, co
    _copy4(shape, sh, 4)
    _copy4(xstrides, xs, 4)
    _copy4(dystrides, ds, 4)
    _copy4(dxstrides, os, 4)
    _copy4(sstrides, ss, 4)
    _copy4(pstrides, ps, 4)
    if ss[3] not in (0, 1) or ps[3] not in (0, 1):
        raise ValueError("dx_4d: inner stat/param strides must be 0 or 1")
    _dtype_code(x, &cx)
    _dtype_code(dy, &cd)
    _dtype_code(dx, &co)
    if cx != cd or cx != co:
        raise TypeError("dx_4d: x, dy and dx must have the same dtype")
    if sh[0] * sh[1] * sh[2] * sh[3] == 0:
        return
    cdef const char* xp = <const char*>cnp.PyArray_DATA(x) + xoff
    cdef const char* dp = <const char*>cnp.PyArray_DATA(dy) + dyoff
    cdef char* op = <char*>cnp.PyArray_DATA(dx) + dxoff
    cdef bint mlz = True
    cdef Py_ssize_t i
    for i in range(ml.shape[0]):
        if ml[i] != 0.0:
            mlz = False
            break
    cdef const double* pmh = &mh[0] + soff
    cdef const double* pml = &ml[0] + soff
    cdef const double* prs = &rstd[0] + soff
    cdef const double* pa = &a[0] + soff
    cdef const double* pbb = &bb[0] + soff
    cdef const double* pw = &w[0] + poff
    cdef const double* pb = &b[0] + poff
    with nogil:
        if cx == 2:
            dx_nd(xp, dp, op, pmh, pml, prs, pa, pbb, pw, pb, sh, xs, ds, os, ss, ps, act, mlz,
                  nthreads, <const double*>NULL)
        elif cx == 1:
            dx_nd(xp, dp, op, pmh, pml, prs, pa, pbb, pw, pb, sh, xs, ds, os, ss, ps, act, mlz,
                  nthreads, <const float*>NULL)
        else:
            dx_nd(xp, dp, op, pmh, pml, prs, pa, pbb, pw, pb, sh, xs, ds, os, ss, ps, act, mlz,
                  nthreads, <const uint16_t*>NULL)


# ---------------------------------------------------------------- the batch norm entry
cdef cnp.ndarray _channel_param(object p, Py_ssize_t C, double fill):
    """A float64 C-contiguous (C,) parameter: ``p`` itself, or ``fill`` everywhere for None."""
    cdef cnp.npy_intp cdim = C
    cdef cnp.ndarray a
    cdef Py_ssize_t i
    if p is None:
        a = cnp.PyArray_EMPTY(1, &cdim, cnp.NPY_FLOAT64, 0)
        for i in range(C):
            (<double*>cnp.PyArray_DATA(a))[i] = fill
        return a
    if (type(p) is not cnp.ndarray or cnp.PyArray_TYPE(<cnp.ndarray>p) != cnp.NPY_FLOAT64
            or cnp.PyArray_NDIM(<cnp.ndarray>p) != 1 or cnp.PyArray_DIM(<cnp.ndarray>p, 0) != C
            or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>p)):
        raise ValueError("batch_cells_backward: weight and bias must be None or float64 "
                         "C-contiguous arrays of the channel count")
    return <cnp.ndarray>p


def batch_cells_backward(cnp.ndarray x, cnp.ndarray dy, cnp.ndarray dx, const double[::1] mean,
                         const double[::1] rstd, object w, object b, bint training,
                         bint refine, int nthreads):
    """Batch norm backward of C-contiguous ``(N, C, ...)`` x and dy (one float dtype,
    no activation) by the per-cell pass, with nothing but C between the call and the
    kernels: ``cells_reduce`` and ``dx_4d`` with the plans ``backward._plan_cells``
    and ``_axes.plan_elementwise`` make for this layout, and the float64 steps of
    ``backward._cells_backward`` between them in the same order (NumPy's empty-axis
    and axis-0 sums add to +0.0 first: so do these), so the results are bitwise the
    general path's.

    ``mean``/``rstd`` per channel (C,); ``w``/``b`` None or float64 (C,) arrays;
    ``refine``: add the mean of ``(x - mean)`` (float64 data in training).  Writes
    ``dx`` (C-contiguous, x's dtype) and returns ``(Σ gv*xhat, Σ gv)`` per channel,
    float64 (C,).  The caller checks the arrays (``backward._small_channel_backward``).
    """
    cdef Py_ssize_t size = cnp.PyArray_SIZE(x)
    if cnp.PyArray_NDIM(x) < 2 or size == 0:
        raise ValueError("batch_cells_backward: x must be a non-empty (N, C, ...) array")
    cdef Py_ssize_t N = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t HW = size // (N * C), it = cnp.PyArray_ITEMSIZE(x)
    cdef Py_ssize_t n = N * HW, i, k, nchunks, per
    cdef Py_ssize_t sh[4]
    cdef Py_ssize_t xs[4]
    cdef Py_ssize_t dsh[4]
    cdef Py_ssize_t dxs[4]
    cdef Py_ssize_t ss[4]
    cdef int cx
    if (mean.shape[0] != C or rstd.shape[0] != C or cnp.PyArray_TYPE(dy) != cnp.PyArray_TYPE(x)
            or cnp.PyArray_TYPE(dx) != cnp.PyArray_TYPE(x) or cnp.PyArray_SIZE(dy) != size
            or cnp.PyArray_SIZE(dx) != size or not cnp.PyArray_IS_C_CONTIGUOUS(x)
            or not cnp.PyArray_IS_C_CONTIGUOUS(dy) or not cnp.PyArray_IS_C_CONTIGUOUS(dx)):
        raise ValueError("batch_cells_backward: x, dy, dx must be C-contiguous arrays of one "
                         "dtype and size, mean and rstd of the channel count")
    _dtype_code(x, &cx)
    cdef cnp.npy_intp cdim = C
    cdef cnp.ndarray wc = _channel_param(w, C, 1.0)
    cdef cnp.ndarray bc = _channel_param(b, C, 0.0)
    cdef cnp.ndarray sgx = cnp.PyArray_EMPTY(1, &cdim, cnp.NPY_FLOAT64, 0)
    cdef cnp.ndarray sg = cnp.PyArray_EMPTY(1, &cdim, cnp.NPY_FLOAT64, 0)
    cdef double* pw = <double*>cnp.PyArray_DATA(wc)
    cdef double* pb = <double*>cnp.PyArray_DATA(bc)
    cdef double* s2 = <double*>cnp.PyArray_DATA(sgx)
    cdef double* s1 = <double*>cnp.PyArray_DATA(sg)
    # _plan_cells: one cell per channel; C == 1 reduces everything as one inner run,
    # HW == 1 (after size-1 axes) gives the column form (R0 == 1)
    for i in range(4):
        sh[i] = 1
        xs[i] = 0
    if C == 1:
        sh[3] = size
        xs[3] = it
    else:
        sh[1], sh[2], sh[3] = N, C, HW
        xs[1], xs[2], xs[3] = C * HW * it, HW * it, (it if HW > 1 else 0)
    per = sh[1] * (sh[3] if sh[3] > 1 else sh[2])
    nchunks = max(1, min(sh[1], (per + 65535) // 65536, max(1, (1 << 22) // C)))
    cdef double* buf = <double*>calloc(nchunks * C * 3 + 3 * C, sizeof(double))
    if buf == NULL:
        raise MemoryError()
    cdef double* out = buf
    cdef double* ml = buf + nchunks * C * 3
    cdef double* a = ml + C
    cdef double* bb = a + C
    cdef double tot[3]
    cdef Py_ssize_t c
    cdef const char* xp = <const char*>cnp.PyArray_DATA(x)
    cdef const char* dp = <const char*>cnp.PyArray_DATA(dy)
    cdef char* op = <char*>cnp.PyArray_DATA(dx)
    cdef double t, delta
    cdef int res = 0
    cdef bint mlz = True
    with nogil:
        if cx == 2:
            res = cells_nd(xp, dp, sh, xs, xs, 0, 1 if C > 1 else 0, 0, &mean[0], ml, &rstd[0],
                           pw, pb, out, nchunks, C, ACT_NONE, True, nthreads,
                           <const double*>NULL)
        elif cx == 1:
            res = cells_nd(xp, dp, sh, xs, xs, 0, 1 if C > 1 else 0, 0, &mean[0], ml, &rstd[0],
                           pw, pb, out, nchunks, C, ACT_NONE, True, nthreads,
                           <const float*>NULL)
        else:
            res = cells_nd(xp, dp, sh, xs, xs, 0, 1 if C > 1 else 0, 0, &mean[0], ml, &rstd[0],
                           pw, pb, out, nchunks, C, ACT_NONE, True, nthreads,
                           <const uint16_t*>NULL)
        if res == 0:
            for i in range(C):   # out.sum(axis=0), then the steps of _cells_backward
                for k in range(3):
                    t = 0.0
                    for c in range(nchunks):
                        t = t + out[(c * C + i) * 3 + k]
                    tot[k] = t
                s1[i] = tot[1]
                s2[i] = tot[2]
                if refine:
                    delta = (tot[0] + 0.0) / n
                    s2[i] = s2[i] - delta * rstd[i] * s1[i]
                    ml[i] = 0.0 + delta
                    if ml[i] != 0.0:
                        mlz = False
                if training:
                    a[i] = (pw[i] * s1[i] + 0.0) / n
                    bb[i] = (pw[i] * s2[i] + 0.0) / n
                else:
                    a[i] = 0.0
                    bb[i] = 0.0
                s1[i] = s1[i] + 0.0
                s2[i] = s2[i] + 0.0
            # the dx plan (plan_elementwise): rows of HW per (n, c); HW == 1: rows of C
            for i in range(4):
                dsh[i] = 1
                dxs[i] = 0
                ss[i] = 0
            if C == 1:
                dsh[3] = size
                dxs[3] = it
            elif HW > 1:
                dsh[1], dsh[2], dsh[3] = N, C, HW
                dxs[1], dxs[2], dxs[3] = C * HW * it, HW * it, it
                ss[2] = 1
            else:
                dsh[2], dsh[3] = N, C
                dxs[2], dxs[3] = C * it, it
                ss[3] = 1
            if cx == 2:
                dx_nd(xp, dp, op, &mean[0], ml, &rstd[0], a, bb, pw, pb, dsh, dxs, dxs, dxs, ss,
                      ss, ACT_NONE, mlz, nthreads, <const double*>NULL)
            elif cx == 1:
                dx_nd(xp, dp, op, &mean[0], ml, &rstd[0], a, bb, pw, pb, dsh, dxs, dxs, dxs, ss,
                      ss, ACT_NONE, mlz, nthreads, <const float*>NULL)
            else:
                dx_nd(xp, dp, op, &mean[0], ml, &rstd[0], a, bb, pw, pb, dsh, dxs, dxs, dxs, ss,
                      ss, ACT_NONE, mlz, nthreads, <const uint16_t*>NULL)
    free(buf)
    if res < 0:
        raise MemoryError("batch_cells_backward: could not allocate a column buffer")
    return sgx, sg

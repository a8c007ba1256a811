/* The apply pass of a contiguous row, fused into one vector loop:
 *
 *     y[i] = act((((x[i] - mh) - ml) * rs) * w + b)
 *
 * with the statistics (mh, ml, rs) and the affine parameters (w, b) either
 * one value for the whole row or one per element (channels-last batch norm
 * has both per element; layer norm with an affine has per-element w, b).
 * Float32 and float64 rows (float16 rows: _apply_h32.h, in float32).  The
 * arithmetic is float64 and exactly the expression above, element by
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
 * halves (16 bytes) per store, a 40 MiB batch_norm ran 10x slower streamed
 * (that was the float64 loop's 8-element step; the float32 loops of
 * _apply_h32.h store 16 or 8 halves and do not stream either).
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

/* Scalar steps: one element, the heads and tails of the rows. */
static inline double cn_a_load1(const void *p, ptrdiff_t i, int kind) {
    if (kind == 2) return ((const double *)p)[i];
    return (double)((const float *)p)[i];
}

static inline void cn_a_store1(void *p, ptrdiff_t i, double v, int kind) {
    if (kind == 2) ((double *)p)[i] = v;
    else ((float *)p)[i] = (float)v;
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

/* The vector loops, in native-width vectors: eight doubles per step in one
 * zmm on AVX-512, two ymm on AVX2, four xmm on SSE2 (a 64-byte GCC vector
 * would be split through memory on the narrower levels).  The AVX-512 build
 * also has them at 256 bits for float32, whose loops ran faster on AMD at
 * that width (as the statistics loops, _simd.h): 1024-element rows in L1,
 * no affine / per-element affine, 0.147 / 0.199 ns/element in zmm, 0.133 /
 * 0.187 in ymm (tools/apply_microbench.c); the same operations at either
 * width, so the same results. */
#if defined(__AVX512F__)
#define CN_AW_NATIVE 8
#elif defined(__AVX__)
#define CN_AW_NATIVE 4
#else
#define CN_AW_NATIVE 2
#endif
#define CN_AW CN_AW_NATIVE
#include "_apply_lanes.h"
#undef CN_AW
#if CN_AW_NATIVE == 8
#define CN_AW 4
#include "_apply_lanes.h"
#undef CN_AW
/* float32: 512-bit or 256-bit loops per call, as the statistics loops
 * (cn_f32_zmm of _simd.h; on the Intel Xeon of 2026-12-06, no affine /
 * per-element affine 0.176 / 0.230 ns/element in ymm, 0.140 / 0.184 in zmm) */
#define CN_APPLY_CALL_f32(name, args) (cn_f32_zmm ? name##_w8 args : name##_w4 args)
#else
#define CN_APPLY_CALL_f32(name, args) CN_APPLY_CALL_(name, CN_AW_NATIVE, args)
#endif
#define CN_APPLY_CALL_f64(name, args) CN_APPLY_CALL_(name, CN_AW_NATIVE, args)
/* name_w<width of SUFFIX's loops> args: direct calls, so the always-inline
 * loops are inlined with KIND a constant.  (Choosing a function pointer,
 * cn_f32_zmm ? name_w8 : name_w4, made GCC emit the loops out of line with
 * the dtype test, the ReLU and the streaming flags inside every step.) */
#define CN_APPLY_CALL(name, SUFFIX, args) CN_APPLY_CALL_##SUFFIX(name, args)
#define CN_APPLY_CALL_(name, w, args) CN_APPLY_CALL__(name, w, args)
#define CN_APPLY_CALL__(name, w, args) name##_w##w args

#define CN_APPLY_ROW(SUFFIX, KIND)                                                 \
static void cn_apply_row_##SUFFIX(const void *x, void *y, ptrdiff_t n, const double *mh,    \
        const double *ml, const double *rs, int svec, const double *w, const double *b,  \
        int pvec, int relu, int stream) {                                                \
    CN_APPLY_CALL(cn_apply_row_k, SUFFIX, (x, y, n, KIND, mh, ml, rs, svec, w, b, pvec,  \
                                           relu, stream));                               \
}                                                                                        \
__attribute__((noinline)) static ptrdiff_t cn_apply_rows4_percol_##SUFFIX(           \
        const void *x, void *y, ptrdiff_t R, ptrdiff_t L, const double *mh,            \
        const double *ml, const double *rs, const double *w, const double *b, int relu) { \
    return CN_APPLY_CALL(cn_apply_rows4_percol_k, SUFFIX, (x, y, R, L, KIND, mh, ml, rs, \
                                                           w, b, relu));                 \
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
    CN_APPLY_CALL(cn_apply_rows_percol_k, SUFFIX, ((const char *)x + r0 * L * item,      \
            (char *)y + r0 * L * item, R - r0, L, KIND, mh, ml, rs, w, b, relu, stream)); \
}                                                                                        \
/* NCHW planes: rows [r0, r1) of L elements back to back (row r at r * L), the      \
 * statistics of row r at index r % smod and its parameters at (r % pmod) * pmul    \
 * (one value per row).  The per-row loop of cn_apply_row_k, as scale_row calls it  \
 * for such rows, without scale_row's per-row divisions and call: (32, 64, 4, 4)   \
 * float32 batch norm spent more in those than in the 16-element rows. */           \
static void cn_apply_rows_perrow_##SUFFIX(const void *x, void *y, ptrdiff_t r0, ptrdiff_t r1, \
        ptrdiff_t L, const double *mh, const double *ml, const double *rs, ptrdiff_t smod, \
        const double *w, const double *b, ptrdiff_t pmod, ptrdiff_t pmul, int relu,      \
        int stream) {                                                                    \
    const size_t item = KIND == 2 ? 8 : 4;                                               \
    ptrdiff_t si = r0 % smod, pi = r0 % pmod;                                            \
    for (ptrdiff_t r = r0; r < r1; r++) {                                                \
        CN_APPLY_CALL(cn_apply_row_k, SUFFIX, ((const char *)x + r * L * item,            \
                (char *)y + r * L * item, L, KIND, mh + si, ml + si, rs + si, 0,          \
                w + pi * pmul, b + pi * pmul, 0, relu, stream));                          \
        if (++si == smod) si = 0;                                                        \
        if (++pi == pmod) pi = 0;                                                        \
    }                                                                                    \
}
CN_APPLY_ROW(f32, 1)
CN_APPLY_ROW(f64, 2)

#endif

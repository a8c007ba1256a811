/* The statistics of short rows, CN_VW rows at a time.
 *
 * A row shorter than one block (BLOCK = 4096 elements of _kernels.pyx) is
 * one block: its statistics are the 16-lane loop of _simd.h (cn_centred_f64:
 * double-double lanes, the tail into lane 0; cn_centred_f32/_f16: float64
 * lanes, the tail summed apart), the lane tree, block_state (block_state_d
 * for float32/float16) and, for the layers (layer/RMS/group/instance norm),
 * norm_row's finalize; for moments over the last axis the state (rows_kernel).
 * After the vector loop every step of that is scalar and dependent on the
 * one before: for float64 ~100 ns per row on AMD EPYC Zen 4, 3x the time of
 * PyTorch's whole layer_norm on rows of 32 elements.  Here the vector loop
 * runs row by row as before (float64 rows of at most CN_RD_SHORT elements:
 * on the group's transposed data), and everything after it on vectors whose
 * lane r is row r of the group: the same operations in the same order, so
 * the same bits as the row-by-row path (-ffp-contract=off; cn_v_two_prod_err is lane
 * by lane cn_two_prod_err).
 *
 * Rows whose shift c (the first element) or centred sum S1 is not finite take
 * block_finish's other branch (inf or NaN data): the entries report them in
 * a bit mask and the caller redoes those rows on the row-by-row path.
 */
#ifndef CNORM_ROWS_DD_H
#define CNORM_ROWS_DD_H
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stddef.h>
#include "_simd.h"

typedef int64_t cn_rdi __attribute__((vector_size(CN_VW * 8)));

/* lane by lane, the Cython helpers of _kernels.pyx */
static inline void cn_rd_div_d(cn_vd ah, cn_vd al, cn_vd b, cn_vd *h, cn_vd *l) {   /* dd_div_d */
    cn_vd q1 = ah / b;
    cn_vd ph = q1 * b;
    cn_vd pl = cn_v_two_prod_err(q1, b, ph);
    cn_vd rh = ah - ph;
    cn_vd rl = (al - pl);
    cn_vd q2 = (rh + rl) / b;
    cn_vd t = q1 + q2;
    *l = q2 - (t - q1);
    *h = t;
}

static inline void cn_rd_sq(cn_vd ah, cn_vd al, cn_vd *h, cn_vd *l) {            /* dd_sq */
    const cn_vd two = cn_vsplat(2.0);
    cn_vd p = ah * ah;
    cn_vd e = cn_v_two_prod_err(ah, ah, p) + two * ah * al;
    cn_vd t = p + e;
    *l = e - (t - p);
    *h = t;
}

static inline cn_vd cn_rd_select(cn_rdi mask, cn_vd a, cn_vd b) {   /* mask ? a : b */
    return (cn_vd)(((cn_rdi)a & mask) | ((cn_rdi)b & ~mask));
}

static inline cn_rdi cn_rd_isfinite(cn_vd v) {
    cn_rdi absmask;
    for (int j = 0; j < CN_VW; j++) absmask[j] = INT64_MAX;
    return (cn_vd)((cn_rdi)v & absmask) <= cn_vsplat(DBL_MAX);
}

static inline cn_vd cn_rd_sqrt(cn_vd v) {
#if CN_VW == 8
    return (cn_vd)_mm512_sqrt_pd((__m512d)v);
#elif CN_VW == 4
    return (cn_vd)_mm256_sqrt_pd((__m256d)v);
#else
    return (cn_vd)_mm_sqrt_pd((__m128d)v);
#endif
}

/* In place, the CN_VW x CN_VW matrix of v[r][j] to v[j][r]: at stage s, rows
 * r and r + s (bit s of r clear) swap the elements whose column has bit s
 * set in one and clear in the other. */
static inline __attribute__((always_inline)) void cn_rd_transpose(cn_vd *v) {
#pragma GCC unroll 4
    for (int s = 1; s < CN_VW; s *= 2) {
        cn_rdi lo, hi;
#pragma GCC unroll 8
        for (int j = 0; j < CN_VW; j++) {
            lo[j] = (j & s) ? CN_VW + j - s : j;
            hi[j] = (j & s) ? CN_VW + j : j + s;
        }
#pragma GCC unroll 8
        for (int r = 0; r < CN_VW; r++)
            if (!(r & s)) {
                cn_vd a = v[r], b = v[r | s];
                v[r] = __builtin_shuffle(a, b, lo);
                v[r | s] = __builtin_shuffle(a, b, hi);
            }
    }
}

/* Columns j0 .. j0 + m - 1 (0 < m <= CN_VW) of rows r < g (row r at x + r *
 * xrs bytes; the rows r >= g repeat row 0) transposed: element r of T[j] is
 * x[r][j0 + j], j < m.  A whole block (m == CN_VW) is CN_VW loads and a
 * transposition; a partial one is gathered element by element, which
 * measured faster than masked loads and a transposition (float64 rows of 4
 * and 100 elements, AMD EPYC Zen 4). */
static inline __attribute__((always_inline)) void cn_rd_columns_f64(
        const double *x, ptrdiff_t xrs, int g, ptrdiff_t j0, int m, cn_vd *T) {
    if (m == CN_VW) {
#pragma GCC unroll 8
        for (int r = 0; r < CN_VW; r++)
            T[r] = cn_vld_f64((const double *)((const char *)x + (r < g ? r : 0) * xrs) + j0);
        cn_rd_transpose(T);
        return;
    }
    for (int j = 0; j < m; j++)
        for (int r = 0; r < CN_VW; r++)
            T[j][r] = ((const double *)((const char *)x + (r < g ? r : 0) * xrs))[j0 + j];
}

/* Rows of at most CN_RD_SHORT elements transpose the group's data first (one
 * CN_VW x CN_VW transposition per CN_VW columns) instead of the four lane
 * sums of every row (4 * 16 / CN_VW transpositions per group). */
#define CN_RD_SHORT 48

/* CN_DD_LANE_STEP from h1 = l1 = h2 = l2 = +0, in 16 operations instead of
 * 27: with h1 = +0 its sum t is d + 0, its correction ((0 - (t - b2)) +
 * (d - b2)) is +0, so l1 = 0 + (0 + de) = de + 0; likewise h2 = q + 0 and
 * l2 = qe + 0 (q = d * d >= +0).  That holds for finite d and q; a row whose
 * d is not finite has a sum S1 that is not finite and goes back to the
 * row-by-row path, and where q = d * d overflows, h2 = +inf and the lane
 * tree's first addition makes both halves of S2 NaN either way. */
#define CN_DD_LANE_FIRST(x, h1, l1, h2, l2) do {                                  \
    cn_vd d_ = (x) - cv, bb_ = cn_vsub_fu(d_, (x));                              \
    cn_vd de_ = cn_vsub_fu((x), d_ - bb_) + (-cv - bb_);                          \
    cn_vd q_ = d_ * d_;                                                          \
    h1 = d_ + zero;                                                              \
    l1 = de_ + zero;                                                             \
    h2 = q_ + zero;                                                              \
    l2 = cn_vadd_fu(cn_v_two_prod_err(d_, d_, q_), two * d_ * de_) + zero;       \
} while (0)

/* The block states of rows r < g (g <= CN_VW) of n elements (0 < n < 4096),
 * row r at x + r * xrs bytes: lane r of (*Mh, *Ml) is the mean, of (*Qh,
 * *Ql) the sum of squared deviations, as block_moments_pf + block_state
 * compute them.  pf: the vector loop's prefetch distance (cn_prefetch16).
 * Returns the mask of rows (bit r) whose c or S1 is not finite (block_finish's
 * other branch): their lanes are meaningless, as are the lanes r >= g. */
static inline __attribute__((always_inline)) int cn_rows_states_dd_f64(
        const double *x, ptrdiff_t xrs, int g, ptrdiff_t n, ptrdiff_t pf, cn_vd *Mh_out,
        cn_vd *Ml_out, cn_vd *Qh_out, cn_vd *Ql_out) {
    const ptrdiff_t nv = n - n % 16;
    const cn_vd two = cn_vsplat(2.0), zero = cn_vsplat(0.0);
    cn_vd H1[16], L1[16], H2[16], L2[16];
    /* X[i - i0]: element i of every row, i0 <= i < n: the whole of a short
     * row (i0 = 0), the tail (i0 = nv) of a longer one */
    const int short_rows = n <= CN_RD_SHORT;
    const ptrdiff_t i0 = short_rows ? 0 : nv;
    cn_vd X[CN_RD_SHORT];
    for (ptrdiff_t j = i0; j < n; j += CN_VW)
        cn_rd_columns_f64(x, xrs, g, j, (int)(n - j < CN_VW ? n - j : CN_VW), X + (j - i0));
    cn_vd c;   /* element r: row r's shift, its first element */
    if (short_rows) {
        c = X[0];
        const cn_vd cv = c;
        /* lane k: elements k, k + 16, ... < nv, the steps of cn_centred_f64_lanes;
         * the first from the zero state is CN_DD_LANE_FIRST (the same bits) */
#pragma GCC unroll 16
        for (int k = 0; k < (nv ? 16 : 1); k++) {
            cn_vd h1 = zero, l1 = zero, h2 = zero, l2 = zero;
            if (nv) CN_DD_LANE_FIRST(X[k], h1, l1, h2, l2);
            for (ptrdiff_t i = k + 16; i < nv; i += 16) CN_DD_LANE_STEP(X[i], h1, l1, h2, l2);
            H1[k] = h1;
            L1[k] = l1;
            H2[k] = h2;
            L2[k] = l2;
        }
    } else {
        /* V[q][k][r]: vector k of row r's lanes (q: h1, l1, h2, l2), then,
         * after the transposition of each CN_VW x CN_VW block, element r of
         * V[q][k][j] is lane k * CN_VW + j of row r */
        cn_vd V[4][CN_NV][CN_VW];
        double cs[CN_VW];
        for (int r = 0; r < CN_VW; r++) {
            const double *p = (const double *)((const char *)x + (r < g ? r : 0) * xrs);
            cs[r] = p[0];
            cn_vd h1[CN_NV], l1[CN_NV], h2[CN_NV], l2[CN_NV];
            if (r < g) {
                cn_centred_f64_lanes(p, n, cs[r], h1, l1, h2, l2, pf);
            } else {
                for (int k = 0; k < CN_NV; k++) h1[k] = l1[k] = h2[k] = l2[k] = zero;
            }
            for (int k = 0; k < CN_NV; k++) {
                V[0][k][r] = h1[k];
                V[1][k][r] = l1[k];
                V[2][k][r] = h2[k];
                V[3][k][r] = l2[k];
            }
        }
        for (int q = 0; q < 4; q++)
            for (int k = 0; k < CN_NV; k++) cn_rd_transpose(V[q][k]);
        for (int k = 0; k < CN_NV; k++)
            for (int j = 0; j < CN_VW; j++) {
                H1[k * CN_VW + j] = V[0][k][j];
                L1[k * CN_VW + j] = V[1][k][j];
                H2[k * CN_VW + j] = V[2][k][j];
                L2[k * CN_VW + j] = V[3][k][j];
            }
        c = cn_vld_f64(cs);
    }
    /* the tail into lane 0: cn_centred_f64's scalar loop */
    for (ptrdiff_t i = nv; i < n; i++) {
        cn_vd xv = X[i - i0];
        cn_vd d = xv - c, bb = d - xv;
        cn_vd de = (xv - (d - bb)) + (-c - bb);
        cn_vd q = d * d;
        cn_vdd_add(&H1[0], &L1[0], d, de);
        cn_vdd_add(&H2[0], &L2[0], q, cn_v_two_prod_err(d, d, q) + two * d * de);
    }
    /* cn_dd_tree16: lane k with lane k + w, w = 8, 4, 2, 1 (rows of fewer
     * than 16 elements: lanes 1-15 are +0 throughout, lane 0 still goes
     * through the four additions) */
    if (nv) {
#pragma GCC unroll 4
        for (int w = 8; w >= 1; w /= 2)
#pragma GCC unroll 8
            for (int k = 0; k < w; k++) {
                cn_vdd_add(&H1[k], &L1[k], H1[k + w], L1[k + w]);
                cn_vdd_add(&H2[k], &L2[k], H2[k + w], L2[k + w]);
            }
    } else {
        for (int w = 8; w >= 1; w /= 2) {
            cn_vdd_add(&H1[0], &L1[0], zero, zero);
            cn_vdd_add(&H2[0], &L2[0], zero, zero);
        }
    }
    /* block_moments_pf's sums start at zero */
    cn_vd s1h = zero, s1l = zero, s2h = zero, s2l = zero;
    cn_vdd_add(&s1h, &s1l, H1[0], L1[0]);
    cn_vdd_add(&s2h, &s2l, H2[0], L2[0]);
    /* block_finish: rows with c or S1 not finite go back to the caller */
    cn_rdi fin = cn_rd_isfinite(s1h) & cn_rd_isfinite(c);
    int bad = 0;
    for (int r = 0; r < g; r++) bad |= (fin[r] == 0) << r;
    /* block_state */
    const cn_vd nn = cn_vsplat((double)n);
    cn_vd th, tl, qh, ql;
    cn_rd_div_d(s1h, s1l, nn, &th, &tl);
    cn_vd Mh = c, Ml = zero;
    cn_vdd_add(&Mh, &Ml, th, tl);
    cn_rd_sq(s1h, s1l, &qh, &ql);
    cn_rd_div_d(qh, ql, nn, &qh, &ql);
    cn_vd Qh = s2h, Ql = s2l;
    cn_vdd_add(&Qh, &Ql, -qh, -ql);
    cn_rdi neg = Qh < zero;
    Qh = cn_rd_select(neg, zero, Qh);
    Ql = cn_rd_select(neg, zero, Ql);
    Qh = cn_rd_select(s2h != s2h, cn_vsplat(NAN), Qh);
    *Mh_out = Mh;
    *Ml_out = Ml;
    *Qh_out = Qh;
    *Ql_out = Ql;
    return bad;
}

/* norm_row's statistics of the states (Mh, Ml, Qh, Ql) of rows r < g of n
 * elements, lane r for row r.  Layer mode (rms == 0): mean[r], var[r] and
 * the apply pass's (mh[r], ml[r], rs[r]); RMS mode: mean[r] = mh[r] = ml[r]
 * = 0 and var[r] = mean(x**2).  Rows whose bit is set in `bad` are skipped. */
static inline __attribute__((always_inline)) void cn_rows_finish(
        int bad, int g, ptrdiff_t n, int rms, double eps, cn_vd Mh, cn_vd Ml, cn_vd Qh,
        cn_vd Ql, double *mh, double *ml, double *rs, double *mean, double *var) {
    const cn_vd nn = cn_vsplat((double)n), zero = cn_vsplat(0.0), two = cn_vsplat(2.0);
    const cn_vd nan = cn_vsplat(NAN);
    cn_vd v, vl, meanv, mhv, mlv;
    cn_rdi mfin = cn_rd_isfinite(Mh);
    cn_rd_div_d(Qh, Ql, nn, &v, &vl);
    if (!rms) {
        v = cn_rd_select(v > zero, v, zero);
        v = cn_rd_select(Qh != Qh, nan, v);
        meanv = cn_rd_select(mfin, Mh + Ml, Mh);
        v = cn_rd_select(mfin, v, nan);
        mhv = Mh;
        mlv = Ml;
    } else {
        v = v + (Mh * Mh + two * Mh * Ml);
        v = cn_rd_select((Qh != Qh) | ~mfin, nan, v);
        meanv = mhv = mlv = zero;
    }
    cn_vd rsv = cn_vsplat(1.0) / cn_rd_sqrt(v + cn_vsplat(eps));
    for (int r = 0; r < g; r++) {
        if (bad >> r & 1) continue;
        mh[r] = mhv[r];
        ml[r] = mlv[r];
        rs[r] = rsv[r];
        mean[r] = meanv[r];
        var[r] = v[r];
    }
}

/* float32 / float16 rows: the plain float64 sums of cn_centred_f32/_f16 (the
 * lane tree of cn_vtree16 / cn_ytree16: lane k += lane k + w, w = 8, 4, 2, 1;
 * the tail summed apart and added after the tree) and block_state_d. */
#define CN_ROWS_PLAIN(NAME, T, CONV)                                                   \
static inline __attribute__((always_inline)) int cn_rows_states_pl_##NAME(            \
        const T *x, ptrdiff_t xrs, int g, ptrdiff_t n, ptrdiff_t pf, cn_vd *Mh_out,    \
        cn_vd *Ml_out, cn_vd *Qh_out, cn_vd *Ql_out) {                                 \
    cn_vd V[2][CN_NV][CN_VW];                                                          \
    double cs[CN_VW];                                                                  \
    const ptrdiff_t nv = n - n % 16;                                                   \
    for (int r = 0; r < CN_VW; r++) {                                                  \
        const T *p = (const T *)((const char *)x + (r < g ? r : 0) * xrs);             \
        cs[r] = r < g ? CONV(p[0]) : 0.0;                                              \
        if (!nv) continue;                                                             \
        double A[16], Q[16];                                                           \
        if (r < g) {                                                                   \
            cn_centred_##NAME##_lanes16(p, n, cs[r], A, Q, pf);                        \
        } else {                                                                       \
            for (int k = 0; k < 16; k++) A[k] = Q[k] = 0.0;                            \
        }                                                                              \
        for (int k = 0; k < CN_NV; k++) {                                              \
            V[0][k][r] = cn_vld_f64(A + k * CN_VW);                                    \
            V[1][k][r] = cn_vld_f64(Q + k * CN_VW);                                    \
        }                                                                              \
    }                                                                                  \
    const cn_vd c = cn_vld_f64(cs), zero = cn_vsplat(0.0);                             \
    cn_vd S1 = zero, S2 = zero;                                                        \
    if (nv) {                                                                          \
        cn_vd a[16], q[16];                                                            \
        for (int k = 0; k < CN_NV; k++) {                                              \
            cn_rd_transpose(V[0][k]);                                                  \
            cn_rd_transpose(V[1][k]);                                                  \
            for (int j = 0; j < CN_VW; j++) {                                          \
                a[k * CN_VW + j] = V[0][k][j];                                         \
                q[k * CN_VW + j] = V[1][k][j];                                         \
            }                                                                          \
        }                                                                              \
        for (int w = 8; w >= 1; w /= 2)                                                \
            for (int k = 0; k < w; k++) {                                              \
                a[k] = a[k] + a[k + w];                                                \
                q[k] = q[k] + q[k + w];                                                \
            }                                                                          \
        S1 = a[0];                                                                     \
        S2 = q[0];                                                                     \
    }                                                                                  \
    /* the tail, summed apart (t1, t2), then *s1 += tree + t1 from *s1 = 0 */          \
    cn_vd t1 = zero, t2 = zero;                                                        \
    for (ptrdiff_t i = nv; i < n; i++) {                                               \
        cn_vd xv;                                                                      \
        for (int r = 0; r < CN_VW; r++)                                                \
            xv[r] = r < g ? CONV(((const T *)((const char *)x + r * xrs))[i]) : 0.0;   \
        cn_vd d = xv - c;                                                              \
        t1 = t1 + d;                                                                   \
        t2 = t2 + d * d;                                                               \
    }                                                                                  \
    S1 = zero + (S1 + t1);                                                             \
    S2 = zero + (S2 + t2);                                                             \
    cn_rdi fin = cn_rd_isfinite(S1) & cn_rd_isfinite(c);                               \
    int bad = 0;                                                                       \
    for (int r = 0; r < g; r++) bad |= (fin[r] == 0) << r;                             \
    /* block_state_d: the mean c + S1/n by TwoSum, M2 = S2 - S1 * (S1/n) >= 0 */        \
    const cn_vd nn = cn_vsplat((double)n);                                             \
    cn_vd qn = S1 / nn, ss = c + qn, bb = ss - c;                                      \
    *Mh_out = ss;                                                                      \
    *Ml_out = (c - (ss - bb)) + (qn - bb);                                             \
    cn_vd Qh = S2 - S1 * (S1 / nn);                                                    \
    *Qh_out = cn_rd_select(Qh < zero, zero, Qh);                                       \
    *Ql_out = zero;                                                                    \
    return bad;                                                                        \
}

/* The entries, NAME = f64, f32, f16: rows r < g of n elements (0 < n < 4096),
 * row r at x + r * xrs bytes; pf: the vector loop's prefetch distance.  Both
 * return the mask of rows (bit r) whose shift c or S1 is not finite
 * (block_finish's other branch), whose outputs are not written.
 *   cn_rows_norm_NAME:   norm_row's statistics (cn_rows_finish)
 *   cn_rows_states_NAME: the block states, mh[r], ml[r], qh[r], ql[r]
 *                        (n elements each) */
#define CN_ROWS_ENTRIES(NAME, T, KIND)                                                 \
static int cn_rows_norm_##NAME(const T *x, ptrdiff_t xrs, int g, ptrdiff_t n, int rms, \
        double eps, ptrdiff_t pf, double *mh, double *ml, double *rs, double *mean,    \
        double *var) {                                                                 \
    cn_vd Mh, Ml, Qh, Ql;                                                              \
    const int bad = cn_rows_states_##KIND##_##NAME(x, xrs, g, n, pf, &Mh, &Ml, &Qh, &Ql); \
    cn_rows_finish(bad, g, n, rms, eps, Mh, Ml, Qh, Ql, mh, ml, rs, mean, var);        \
    return bad;                                                                        \
}                                                                                      \
static int cn_rows_states_##NAME(const T *x, ptrdiff_t xrs, int g, ptrdiff_t n,        \
        ptrdiff_t pf, double *mh, double *ml, double *qh, double *ql) {                \
    cn_vd Mh, Ml, Qh, Ql;                                                              \
    const int bad = cn_rows_states_##KIND##_##NAME(x, xrs, g, n, pf, &Mh, &Ml, &Qh, &Ql); \
    cn_vst_f64(mh, Mh);                                                                \
    cn_vst_f64(ml, Ml);                                                                \
    cn_vst_f64(qh, Qh);                                                                \
    cn_vst_f64(ql, Ql);                                                                \
    return bad;                                                                        \
}

CN_ROWS_PLAIN(f32, float, CN_CONV_F)
CN_ROWS_PLAIN(f16, uint16_t, CN_CONV_H)
CN_ROWS_ENTRIES(f64, double, dd)
CN_ROWS_ENTRIES(f32, float, pl)
CN_ROWS_ENTRIES(f16, uint16_t, pl)

#endif

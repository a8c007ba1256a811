/* Microbenchmark and bit-exactness check for the apply loops of
 * src/cnorm/_apply_simd.h (the normalization pass y = act((x - m) * rstd * w + b)).
 *
 * Build it once per ISA level with the flags setup.py uses, from the repo root:
 *
 *   for m in x86-64 x86-64-v3 x86-64-v4; do
 *       gcc -O3 -ffp-contract=off -fno-math-errno -march=$m -Isrc/cnorm \
 *           tools/apply_microbench.c -o /tmp/apply_mb_$m -lm
 *   done
 *   (setup.py also passes -mprefer-vector-width=512 for x86-64-v4)
 *
 *   /tmp/apply_mb_x86-64-v4          # timings, ns per element, 1024-element rows (L1)
 *   /tmp/apply_mb_x86-64-v4 check    # hex digests of every loop's outputs
 *
 * The `check` digests (all lines but the first) must be identical for every
 * -march level and for any rewrite of the header: the apply pass is the same
 * float64 expression on every path (float16: the float32 expression of
 * _apply_h32.h, the row_f16 / percol_f16 lines).  -DCN_APPLY_HEADER='"path/_apply_simd.h"'
 * builds the driver against another copy of the header (e.g. an older
 * revision; its directory must hold the _simd.h it includes).
 * Run only on a CPU that supports the level it was compiled for.
 */
#ifndef CN_APPLY_HEADER
#define CN_APPLY_HEADER "_apply_simd.h"
#endif
#include CN_APPLY_HEADER
#include "_apply_h32.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "microbench_timing.h"


static uint64_t rng_state = 0x243f6a8885a308d3ull;
static uint64_t rng(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static double unif(void) { return (double)(rng() >> 11) * 0x1p-53; }

static uint64_t fnv_bytes(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

enum { NMAX = 2100 };
static double xd[NMAX], yd[NMAX], mh[NMAX], ml[NMAX], rs[NMAX], w[NMAX], b[NMAX];
static float xf[NMAX], yf[NMAX];
static cn_h32_prep hp;   /* float32 copies of w, b, mh, ml, rs for the float16 loops */
static uint16_t xh[NMAX], yh[NMAX];

/* inputs around 3 with a few negatives, zeros, -0.0 and a NaN; statistics
 * and parameters per element (index 0 is the broadcast value) */
static void gen(void) {
    for (int i = 0; i < NMAX; i++) {
        double v = 3.0 + 4.0 * (unif() - 0.5) * (i % 5 ? 1.0 : 1e-3);
        if (i % 97 == 0) v = -0.0;
        if (i % 89 == 0) v = 0.0;
        if (i == 1500) v = __builtin_nan("");
        xd[i] = v;
        xf[i] = (float)v;
        xh[i] = cn_double_to_half(v);
        mh[i] = 3.0 + (unif() - 0.5) * 1e-3;
        ml[i] = (unif() - 0.5) * 1e-19;
        rs[i] = 0.5 + unif();
        w[i] = unif() - 0.25;
        b[i] = unif() - 0.5;
    }
    cn_h32_release(&hp);
    if (!cn_h32_prepare(&hp, w, b, NMAX, mh, ml, rs, NMAX)) abort();
}

/* the float16 row as _kernels.pyx calls it: statistics per element from the
 * float32 copies, or the row's own converted once */
static void row_h32(const uint16_t *x, uint16_t *y, ptrdiff_t n, int svec, int pvec, int noaff,
                    int relu) {
    float m0, m1, r0, one = 1.0f, zero = 0.0f;
    const float *wp = noaff ? &one : hp.w, *bp = noaff ? &zero : hp.b;
    if (svec) {
        cn_apply_row_h32(x, y, n, hp.m0, hp.m1, hp.r0, 1, wp, bp, pvec, 0, relu);
        return;
    }
    if (!cn_h32_stats(mh[0], ml[0], rs[0], &m0, &m1, &r0)) abort();
    cn_apply_row_h32(x, y, n, &m0, &m1, &r0, 0, wp, bp, pvec, noaff, relu);
}

static int check(void) {
    static const int sizes[] = {0, 1, 7, 8, 9, 15, 16, 17, 31, 63, 64, 65, 100, 255, 256,
                                1000, 1023, 1024, 1031, 2000};
    const char *names[] = {"row_f16", "row_f32", "row_f64", "percol_f16", "percol_f32",
                           "percol_f64"};
    uint64_t h[6];
    const double one = 1.0, zero = 0.0;
    for (int k = 0; k < 6; k++) h[k] = 0xcbf29ce484222325ull;
    gen();
    for (size_t t = 0; t < sizeof sizes / sizeof sizes[0]; t++) {
        const ptrdiff_t n = sizes[t];
        for (int off = 0; off < 3; off++)
            for (int mode = 0; mode < 16; mode++) {
                /* mode bits: svec, pvec, relu, no affine (w = 1, b = 0 broadcast) */
                const int svec = mode & 1, pvec = mode & 2, relu = (mode >> 2) & 1;
                const int noaff = mode & 8;
                if (noaff && pvec) continue;
                const double *wp = noaff ? &one : w, *bp = noaff ? &zero : b;
                for (int stream = 0; stream < 2; stream++) {
                    memset(yh, 0, sizeof yh); memset(yf, 0, sizeof yf); memset(yd, 0, sizeof yd);
                    row_h32(xh + off, yh + off, n, svec, pvec, noaff, relu);
                    cn_apply_row_f32(xf + off, yf + off, n, mh, ml, rs, svec, wp, bp, pvec, relu,
                                     stream);
                    cn_apply_row_f64(xd + off, yd + off, n, mh, ml, rs, svec, wp, bp, pvec, relu,
                                     stream);
                    h[0] = fnv_bytes(h[0], yh, sizeof yh);
                    h[1] = fnv_bytes(h[1], yf, sizeof yf);
                    h[2] = fnv_bytes(h[2], yd, sizeof yd);
                }
            }
        /* channels last: R rows of L = n / 8 + 1 channels, in and out of the four-row loop */
        const ptrdiff_t L = n / 8 + 1, R = NMAX / L < 11 ? NMAX / L : 11;
        for (int relu = 0; relu < 2; relu++) {
            memset(yh, 0, sizeof yh); memset(yf, 0, sizeof yf); memset(yd, 0, sizeof yd);
            cn_apply_rows_percol_h32(xh, yh, R, L, hp.m0, hp.m1, hp.r0, hp.w, hp.b, relu);
            cn_apply_rows_percol_f32(xf, yf, R, L, mh, ml, rs, w, b, relu, 0);
            cn_apply_rows_percol_f64(xd, yd, R, L, mh, ml, rs, w, b, relu, 0);
            h[3] = fnv_bytes(h[3], yh, sizeof yh);
            h[4] = fnv_bytes(h[4], yf, sizeof yf);
            h[5] = fnv_bytes(h[5], yd, sizeof yd);
        }
    }
    printf("isa %s\n", cn_isa_name());
    for (int k = 0; k < 6; k++) printf("%-12s %016llx\n", names[k], (unsigned long long)h[k]);
    return 0;
}


int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "check")) return check();
    enum { N = 1024, L = 64 };
    gen();
    for (int i = 0; i < NMAX; i++) if (xd[i] != xd[i]) xd[i] = xf[i] = 0, xh[i] = 0;
    const double one = 1.0, zero = 0.0;
    const int reps = 200000;
    printf("isa %s, rows of %d, channels-last rows of %d\n", cn_isa_name(), N, L);
    TIME("row_f16", N, reps, row_h32(xh, yh, N, 0, 0, 1, 0));
    TIME("row_f16 affine", N, reps, row_h32(xh, yh, N, 0, 1, 0, 0));
    TIME("row_f32", N, reps, cn_apply_row_f32(xf, yf, N, mh, ml, rs, 0, &one, &zero, 0, 0, 0));
    TIME("row_f32 affine", N, reps, cn_apply_row_f32(xf, yf, N, mh, ml, rs, 0, w, b, 1, 0, 0));
    TIME("row_f64", N, reps, cn_apply_row_f64(xd, yd, N, mh, ml, rs, 0, &one, &zero, 0, 0, 0));
    TIME("row_f64 affine", N, reps, cn_apply_row_f64(xd, yd, N, mh, ml, rs, 0, w, b, 1, 0, 0));
    TIME("rows_percol_f16", N, reps, cn_apply_rows_percol_h32(xh, yh, N / L, L, hp.m0, hp.m1, hp.r0, hp.w, hp.b, 0));
    TIME("rows_percol_f32", N, reps, cn_apply_rows_percol_f32(xf, yf, N / L, L, mh, ml, rs, w, b, 0, 0));
    TIME("rows_percol_f64", N, reps, cn_apply_rows_percol_f64(xd, yd, N / L, L, mh, ml, rs, w, b, 0, 0));
    return 0;
}

/* Microbenchmark and bit-exactness check for the hot loops of src/cnorm/_simd.h.
 *
 * Build it once per ISA level with the flags setup.py uses, from the repo root:
 *
 *   for m in x86-64 x86-64-v3 x86-64-v4; do
 *       gcc -O3 -ffp-contract=off -fno-math-errno -march=$m -Isrc/cnorm \
 *           tools/simd_microbench.c -o /tmp/simd_mb_$m -lm
 *   done
 *   (setup.py also passes -mprefer-vector-width=512 for x86-64-v4)
 *
 *   /tmp/simd_mb_x86-64-v3          # timings, ns per element, 4096 elements (L1-resident)
 *   /tmp/simd_mb_x86-64-v3 check    # hex digests of every kernel's results
 *
 * The `check` digests must be identical for every -march level (and for any
 * rewrite of the header): the kernels promise results that depend only on
 * the data and n.  -DCN_SIMD_HEADER='"path/to/_simd.h"' benchmarks another
 * copy of the header (e.g. an older revision) with the same driver.
 * Run only on a CPU that supports the level it was compiled for.
 */
#ifndef CN_SIMD_HEADER
#define CN_SIMD_HEADER "_simd.h"
#endif
#include CN_SIMD_HEADER
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "microbench_timing.h"


/* deterministic data (xorshift64*) */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}
static double unif(void) { return (double)(rng() >> 11) * 0x1p-53; }

/* ---- digests ---- */
static uint64_t fnv(uint64_t h, double v) {
    uint64_t b;
    if (v != v) v = __builtin_nan("");  /* NaN payloads are not part of the contract */
    memcpy(&b, &v, 8);
    for (int k = 0; k < 8; k++) { h ^= (b >> (8 * k)) & 0xff; h *= 0x100000001b3ull; }
    return h;
}

/* generator g fills n doubles */
static void gen(int g, double *x, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i++) {
        double u = unif();
        switch (g) {
        case 0: x[i] = u; break;                                   /* [0, 1) */
        case 1: x[i] = 1000.0 + (u - 0.5) * 1e-3; break;           /* large offset */
        case 2: x[i] = ldexp(u - 0.5, (int)(rng() % 120) - 60); break; /* wide range */
        case 3: x[i] = ldexp(u + 0.5, 990 + (int)(rng() % 20)) * ((rng() & 1) ? 1 : -1); break;
        case 4: x[i] = ldexp(u, -1060 + (int)(rng() % 30)); break; /* subnormal-ish */
        default: x[i] = (rng() % 7 == 0) ? 65504.0 * (u - 0.5) : (u - 0.5) * 1e-5; break;
        }
    }
}
#define NGEN 6

static int check(void) {
    enum { NMAX = 4200 };
    static double xd[NMAX], c8[NMAX], a[4][NMAX];
    static float xf[NMAX];
    static uint16_t xh[NMAX];
    static const ptrdiff_t extra[] = {127, 128, 129, 255, 256, 1000, 1023, 1024, 1031, 4096, 4111};
    const char *names[] = {"cols4_f16", "cols4_f32", "cols4_f64", "centred_f16", "centred_f32",
                           "centred_f64", "cols_f16", "cols_f32", "cols_f64"};
    uint64_t h[9];
    for (int k = 0; k < 9; k++) h[k] = 0xcbf29ce484222325ull;
    for (int g = 0; g < NGEN; g++) {
        gen(g, xd, NMAX);
        gen(g, c8, NMAX);
        for (int i = 0; i < NMAX; i++) {
            xf[i] = (float)xd[i];
            xh[i] = cn_double_to_half(xd[i]);
        }
        for (int t = 0; t < 100 + (int)(sizeof extra / sizeof extra[0]); t++) {
            ptrdiff_t n = t < 100 ? t : extra[t - 100];
            int off = (int)(rng() % 7);        /* unaligned starts */
            double c = xd[off] * 0.75;
            double s1 = 0.5, s2 = 0.25, s1l = 0, s2l = 0;
            cn_centred_f16(xh + off, n, c, &s1, &s2, 0);
            h[3] = fnv(fnv(h[3], s1), s2);
            s1 = 0.5; s2 = 0.25;
            cn_centred_f32(xf + off, n, c, &s1, &s2, 0);
            h[4] = fnv(fnv(h[4], s1), s2);
            s1 = 0.5; s2 = 0.25;
            cn_centred_f64(xd + off, n, c, &s1, &s1l, &s2, &s2l, 0);
            h[5] = fnv(fnv(fnv(fnv(h[5], s1), s1l), s2), s2l);
            /* columns: three rows of n columns accumulated into the same sums,
             * and four rows at once (byte stride n elements) */
            for (int which = 0; which < 3 && n <= 1000; which++) {
                for (int k = 0; k < 4; k++)
                    for (ptrdiff_t j = 0; j < n; j++) a[k][j] = k == 0 ? 0.125 : 0.0;
                if (which == 0) cn_cols_centred4_f16(xh + off, n * 2, n, c8, a[0], a[1], 0);
                if (which == 1) cn_cols_centred4_f32(xf + off, n * 4, n, c8, a[0], a[1], 0);
                if (which == 2)
                    cn_cols_centred4_f64(xd + off, n * 8, n, c8, a[0], a[1], a[2], a[3], 0);
                for (int k = 0; k < (which == 2 ? 4 : 2); k++)
                    for (ptrdiff_t j = 0; j < n; j++) h[which] = fnv(h[which], a[k][j]);
            }
            if (n > 1400) continue;
            for (int which = 6; which < 9; which++) {
                for (int k = 0; k < 4; k++)
                    for (ptrdiff_t j = 0; j < n; j++) a[k][j] = k == 0 ? 0.125 : 0.0;
                for (int r = 0; r < 3; r++) {
                    ptrdiff_t o = off + r * n;
                    if (which == 6) cn_cols_centred_f16(xh + o, n, c8, a[0], a[1]);
                    if (which == 7) cn_cols_centred_f32(xf + o, n, c8, a[0], a[1]);
                    if (which == 8) cn_cols_centred_f64(xd + o, n, c8, a[0], a[1], a[2], a[3]);
                }
                for (int k = 0; k < (which == 8 ? 4 : 2); k++)
                    for (ptrdiff_t j = 0; j < n; j++) h[which] = fnv(h[which], a[k][j]);
            }
        }
    }
    printf("isa %s\n", cn_isa_name());
    for (int k = 0; k < 9; k++) printf("%-12s %016llx\n", names[k], (unsigned long long)h[k]);
    return 0;
}


int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "check")) return check();
    enum { N = 4096, COLS = 256, ROWS = N / COLS };
    float *xf = aligned_alloc(64, N * sizeof(float));
    double *xd = aligned_alloc(64, N * sizeof(double));
    uint16_t *xh = aligned_alloc(64, N * sizeof(uint16_t));
    double *c = aligned_alloc(64, COLS * sizeof(double));
    double *a[4];
    for (int k = 0; k < 4; k++) { a[k] = aligned_alloc(64, COLS * sizeof(double)); memset(a[k], 0, COLS * 8); }
    for (int i = 0; i < N; i++) { xd[i] = unif(); xf[i] = (float)xd[i]; xh[i] = cn_double_to_half(xd[i]); }
    for (int j = 0; j < COLS; j++) c[j] = 0.5;
    double s1 = 0, s2 = 0, s1l = 0, s2l = 0, acc = 0;
    int reps = 20000;
    printf("isa %s, n = %d\n", cn_isa_name(), N);
    TIME("centred_f16", N, reps, cn_centred_f16(xh, N, 0.5, &s1, &s2, 0));
    TIME("centred_f32", N, reps, cn_centred_f32(xf, N, 0.5, &s1, &s2, 0));
    TIME("centred_f64 (dd)", N, reps / 4, cn_centred_f64(xd, N, 0.5, &s1, &s1l, &s2, &s2l, 0));
    TIME("cols_centred_f16", N, reps,
         for (int r = 0; r < ROWS; r++) cn_cols_centred_f16(xh + r * COLS, COLS, c, a[0], a[1]));
    TIME("cols_centred4_f16", N, reps,
         for (int r = 0; r < ROWS; r += 4)
             cn_cols_centred4_f16(xh + r * COLS, COLS * 2, COLS, c, a[0], a[1], 0));
    TIME("cols_centred4_f32", N, reps,
         for (int r = 0; r < ROWS; r += 4)
             cn_cols_centred4_f32(xf + r * COLS, COLS * 4, COLS, c, a[0], a[1], 0));
    TIME("cols_centred_f32", N, reps,
         for (int r = 0; r < ROWS; r++) cn_cols_centred_f32(xf + r * COLS, COLS, c, a[0], a[1]));
    TIME("cols_centred_f64", N, reps / 4,
         for (int r = 0; r < ROWS; r++)
             cn_cols_centred_f64(xd + r * COLS, COLS, c, a[0], a[1], a[2], a[3]));
    printf("(checksum %g)\n", acc + s1 + s2 + s1l + s2l + a[0][0] + a[1][1] + a[2][2] + a[3][3]);
    return 0;
}

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""Moments kernels: stable mean and variance of strided slices.

The algorithm, shared by every reduction shape and dtype:

1. A slice is cut into *blocks* of at most ``BLOCK`` elements (whole short
   rows are grouped, long rows are split).  A block is read once: with the
   shift ``c`` its first element, it accumulates ``S1 = sum(x - c)`` and
   ``S2 = sum((x - c)**2)`` in ``LANES`` independent lanes.  Float16/float32 inputs accumulate in float64; float64 inputs in
   double-double (TwoSum / exact products), which keeps the float64 variance
   within 2 ulp at any offset.
2. The block state is ``n``, ``mean = c + S1/n`` and ``M2 = S2 - S1**2/n``
   (the corrected two-pass formula; the correction is small because ``c`` is
   close to the mean).
3. Blocks merge left to right into *chunk* states and chunks merge left to
   right into the slice state, with Chan's formula in double-double.  The
   chunk size depends only on the shape, never on the thread count, so the
   result is bitwise identical for any number of threads.

Threads split the (slice, chunk) tasks; the GIL is released throughout.
The module is compiled once per ISA level (see setup.py); ``isa()`` says
which one this copy is.
"""
from libc.stdint cimport uint16_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memset
from libc.math cimport sqrt, isfinite, NAN, INFINITY, erf, tanh, exp
from cython.parallel cimport prange
cimport numpy as cnp
import numpy as np

cnp.import_array()

cdef extern from "_simd.h" nogil:
    double cn_two_prod_err(double a, double b, double p)
    double cn_half_to_double(uint16_t h)
    uint16_t cn_double_to_half(double d)
    void cn_half8_to_double(const uint16_t *p, double *out)
    void cn_double8_to_half(const double *inp, uint16_t *p)
    const char *cn_isa_name()
    int cn_cpu_level()

DEF LANES = 16          # independent accumulators per block (two AVX-512 vectors of doubles)
DEF BLOCK = 4096        # elements per block (one shift c per block)
DEF CHUNK_BLOCKS = 64   # blocks per chunk: the unit of parallel work along a slice
DEF TILE = 1024         # columns per tile in the column kernel (a whole row up to 1024)
DEF COLS_CHUNK_BLOCKS = 2  # column blocks per parallel task
DEF SERIAL_WORK = 131072 # below this many elements, never start threads (wake-up costs more)
DEF SLICE_GROUP = 32   # slices whose block rows the NCHW (block-major) moments interleave


SERIAL_WORK_ELEMENTS = SERIAL_WORK   # for Python callers: below this, calls run serially


def isa():
    """The ISA level this copy of the kernels was compiled for."""
    return cn_isa_name().decode()


def cpu_level():
    """Highest ISA level the CPU supports: 2 = AVX-512 (x86-64-v4), 1 = AVX2 (v3), 0 = baseline."""
    return cn_cpu_level()


# ---------------------------------------------------------------- double-double
cdef inline void two_sum(double a, double b, double* s, double* e) noexcept nogil:
    cdef double ss = a + b
    cdef double bb = ss - a
    s[0] = ss
    e[0] = (a - (ss - bb)) + (b - bb)


cdef inline void dd_add(double* h, double* l, double bh, double bl) noexcept nogil:
    """(h, l) += (bh, bl)"""
    cdef double s, e, t
    two_sum(h[0], bh, &s, &e)
    e = e + (l[0] + bl)
    t = s + e
    l[0] = e - (t - s)
    h[0] = t


cdef inline void dd_mul_d(double ah, double al, double b, double* h, double* l) noexcept nogil:
    """(h, l) = (ah, al) * b"""
    cdef double p = ah * b
    cdef double e = cn_two_prod_err(ah, b, p) + al * b
    cdef double t = p + e
    l[0] = e - (t - p)
    h[0] = t


cdef inline void dd_div_d(double ah, double al, double b, double* h, double* l) noexcept nogil:
    """(h, l) = (ah, al) / b"""
    cdef double q1 = ah / b
    cdef double ph, pl, rh, rl, q2, t
    ph = q1 * b
    pl = cn_two_prod_err(q1, b, ph)
    rh = ah - ph
    rl = (al - pl)
    q2 = (rh + rl) / b
    t = q1 + q2
    l[0] = q2 - (t - q1)
    h[0] = t


cdef inline void dd_sq(double ah, double al, double* h, double* l) noexcept nogil:
    cdef double p = ah * ah
    cdef double e = cn_two_prod_err(ah, ah, p) + 2.0 * ah * al
    cdef double t = p + e
    l[0] = e - (t - p)
    h[0] = t


# ---------------------------------------------------------------- states
cdef void state_merge(State* a, const State* b) noexcept nogil:
    """Merge b into a (Chan et al.), in double-double."""
    cdef double n, dh, dl, th, tl, wh, wl
    if b.n == 0:
        return
    if a.n == 0:
        a[0] = b[0]
        return
    n = a.n + b.n
    if not (isfinite(a.mh) and isfinite(b.mh)):
        # inf or nan somewhere: the mean follows IEEE arithmetic, the spread is undefined
        a.mh = a.mh * (a.n / n) + b.mh * (b.n / n)
        a.ml = 0.0
        a.qh = NAN
        a.ql = 0.0
        a.n = n
        return
    # delta = mean_b - mean_a
    dh = b.mh
    dl = b.ml
    dd_add(&dh, &dl, -a.mh, -a.ml)
    # mean_a += delta * n_b / n
    dd_mul_d(dh, dl, b.n, &th, &tl)
    dd_div_d(th, tl, n, &th, &tl)
    # M2 = M2_a + M2_b + delta^2 * n_a * n_b / n
    dd_sq(dh, dl, &wh, &wl)
    dd_mul_d(wh, wl, a.n, &wh, &wl)
    dd_mul_d(wh, wl, b.n, &wh, &wl)
    dd_div_d(wh, wl, n, &wh, &wl)
    dd_add(&a.mh, &a.ml, th, tl)
    dd_add(&a.qh, &a.ql, b.qh, b.ql)
    dd_add(&a.qh, &a.ql, wh, wl)
    a.n = n


cdef void state_finalize(const State* s, double ddof, double* mean, double* var) noexcept nogil:
    """Mean and variance (M2 / (n - ddof)) of a state, rounded to double."""
    cdef double vh, vl, d = s.n - ddof
    if s.n == 0:
        mean[0] = NAN
    elif isfinite(s.mh):
        mean[0] = s.mh + s.ml
    else:
        mean[0] = s.mh
    if s.qh != s.qh:
        var[0] = NAN
    elif d <= 0:
        # np.var: M2 / max(n - ddof, 0), so inf, or nan when M2 == 0 or n == 0
        var[0] = INFINITY if (s.qh > 0 and s.n > 0) else NAN
    else:
        dd_div_d(s.qh, s.ql, d, &vh, &vl)
        var[0] = vh if vh > 0 else 0.0


cdef inline void block_state(double n, double c, double s1h, double s1l,
                             double s2h, double s2l, State* out) noexcept nogil:
    """State of a block from its shift c and the centred sums S1, S2."""
    cdef double qh, ql, th, tl
    out.n = n
    if not isfinite(c):
        out.mh = c
        out.ml = 0.0
        out.qh = NAN
        out.ql = 0.0
        return
    # mean = c + S1/n
    dd_div_d(s1h, s1l, n, &th, &tl)
    out.mh = c
    out.ml = 0.0
    dd_add(&out.mh, &out.ml, th, tl)
    # M2 = S2 - S1^2/n
    dd_sq(s1h, s1l, &qh, &ql)
    dd_div_d(qh, ql, n, &qh, &ql)
    out.qh = s2h
    out.ql = s2l
    dd_add(&out.qh, &out.ql, -qh, -ql)
    if out.qh < 0:
        out.qh = 0.0
        out.ql = 0.0
    if s2h != s2h:
        out.qh = NAN


cdef inline void block_state_d(double n, double c, double s1, double s2, State* out) noexcept nogil:
    """block_state for float16/float32 inputs: M2 in float64, the mean in
    double-double (c + s1/n without rounding away c's low bits: a float64 mean
    of 1e7 is off by up to 1e-9, too much for outputs near zero)."""
    out.n = n
    out.ql = 0.0
    if not isfinite(c):
        out.mh = c
        out.ml = 0.0
        out.qh = NAN
        return
    two_sum(c, s1 / n, &out.mh, &out.ml)
    out.qh = s2 - s1 * (s1 / n)
    if out.qh < 0:
        out.qh = 0.0


cdef inline void state_merge_d(State* a, const State* b) noexcept nogil:
    """Chan's merge for float16/float32 partial states: M2 in float64, the
    mean in double-double."""
    cdef double n, delta
    if b.n == 0:
        return
    if a.n == 0:
        a[0] = b[0]
        return
    n = a.n + b.n
    if not (isfinite(a.mh) and isfinite(b.mh)):
        a.mh = a.mh * (a.n / n) + b.mh * (b.n / n)
        a.qh = NAN
        a.n = n
        return
    delta = (b.mh - a.mh) + (b.ml - a.ml)
    dd_add(&a.mh, &a.ml, delta * (b.n / n), 0.0)
    a.qh = a.qh + b.qh + delta * delta * (a.n * (b.n / n))
    a.n = n


cdef inline void merge_t(State* a, const State* b, const src_t* tag) noexcept nogil:
    """Merge partial states of one input dtype: double-double for float64 only."""
    if src_t is double:
        state_merge(a, b)
    else:
        state_merge_d(a, b)


# ---------------------------------------------------------------- loads
cdef inline double ld(const src_t* p) noexcept nogil:
    if src_t is uint16_t:
        return cn_half_to_double(p[0])
    else:
        return <double>p[0]


# ---------------------------------------------------------------- block kernel
cdef extern from "_simd.h" nogil:
    Py_ssize_t CN_PF_AHEAD   # bytes the row loops prefetch ahead of contiguous rows
    void cn_centred_f16(const uint16_t *p, Py_ssize_t n, double c, double *s1, double *s2,
                        Py_ssize_t pf)
    void cn_centred_f32(const float *p, Py_ssize_t n, double c, double *s1, double *s2,
                        Py_ssize_t pf)
    void cn_centred_f64(const double *p, Py_ssize_t n, double c,
                        double *s1h, double *s1l, double *s2h, double *s2l, Py_ssize_t pf)
    void cn_cols_centred_f16(const uint16_t *x, Py_ssize_t n, const double *c, double *s1, double *s2)
    void cn_cols_centred_f32(const float *x, Py_ssize_t n, const double *c, double *s1, double *s2)
    void cn_cols_centred_f64(const double *x, Py_ssize_t n, const double *c,
                             double *h1, double *l1, double *h2, double *l2)
    void cn_cols_centred4_f16(const uint16_t *x, Py_ssize_t rs, Py_ssize_t n, const double *c,
                              double *s1, double *s2, Py_ssize_t pf)
    void cn_cols_centred4_f32(const float *x, Py_ssize_t rs, Py_ssize_t n, const double *c,
                              double *s1, double *s2, Py_ssize_t pf)
    void cn_cols_centred4_f64(const double *x, Py_ssize_t rs, Py_ssize_t n, const double *c,
                              double *h1, double *l1, double *h2, double *l2, Py_ssize_t pf)
    int cn_f32_vector_bits()
    void cn_set_f32_vector_bits(int bits)


def set_f32_vector_bits(int bits):
    """Vector width of the float32 statistics and apply loops on the AVX-512
    path: 512 or 256 (the results are the same bits); no effect on other
    paths.  Returns the previous width."""
    if bits != 512 and bits != 256:
        raise ValueError(f"set_f32_vector_bits: bits must be 256 or 512, got {bits!r}")
    cdef int old = cn_f32_vector_bits()
    cn_set_f32_vector_bits(bits)
    return old


def f32_vector_bits():
    """The vector width in bits of this module's float32 loops."""
    return cn_f32_vector_bits()


cdef inline void row_centred(const src_t* p, Py_ssize_t n, double c, double* s1h, double* s1l,
                             double* s2h, double* s2l, Py_ssize_t pf) noexcept nogil:
    """Pass 2 over a contiguous row: S1 += sum(x - c), S2 += sum((x - c)**2),
    prefetching pf bytes ahead (0: none; see cn_prefetch16 in _simd.h)."""
    if src_t is uint16_t:
        cn_centred_f16(p, n, c, s1h, s2h, pf)
    elif src_t is float:
        cn_centred_f32(p, n, c, s1h, s2h, pf)
    else:
        cn_centred_f64(p, n, c, s1h, s1l, s2h, s2l, pf)


cdef inline void centred_add(double x, double c, double* s1h, double* s1l,
                             double* s2h, double* s2l) noexcept nogil:
    """One element of the centred sums in double-double (the scalar twin of cn_centred_f64)."""
    cdef double d = x - c
    cdef double bb = d - x
    cdef double de = (x - (d - bb)) + (-c - bb)
    cdef double q = d * d
    dd_add(s1h, s1l, d, de)
    dd_add(s2h, s2l, q, cn_two_prod_err(d, d, q) + 2.0 * d * de)


cdef extern from *:
    void __builtin_prefetch(const void* p, int rw, int locality) nogil


cdef inline void prefetch_span(const char* p, Py_ssize_t nbytes) noexcept nogil:
    """Ask for the cache lines of the next short row of a block.

    Rows that are not adjacent in memory (NCHW planes of one channel are
    C*H*W elements apart) each start a new stream that the hardware
    prefetcher only picks up after a few misses, and it stops at every 4 KiB
    page: a block of 32x32 float32 planes ran at 3.4x the read floor.  Rows
    longer than 16 KiB are left to the hardware prefetcher.  A prefetch never
    faults, so the row after the last one needs no bounds check.
    """
    cdef Py_ssize_t off
    if nbytes <= 16384:
        for off in range(0, nbytes, 64):
            __builtin_prefetch(p + off, 0, 3)


cdef void block_moments(const src_t* base, Py_ssize_t nrows, Py_ssize_t rowlen,
                        Py_ssize_t rstride, Py_ssize_t estride, State* out) noexcept nogil:
    """State of the nrows x rowlen block at base (byte strides), in one pass
    (block_moments_pf without prefetching ahead: the embedding API)."""
    block_moments_pf(base, nrows, rowlen, rstride, estride, 0, out)


cdef void block_moments_pf(const src_t* base, Py_ssize_t nrows, Py_ssize_t rowlen,
                           Py_ssize_t rstride, Py_ssize_t estride, Py_ssize_t pf,
                           State* out) noexcept nogil:
    """State of the nrows x rowlen block at base (byte strides), in one pass.

    pf: prefetch distance in bytes for contiguous rows that follow each other
    in memory, given by callers whose next read is what follows the block (0:
    none).  Rows that hop (not adjacent) prefetch the next row instead.

    The shift c is the block's first element: since c is one of the block's
    values, (c - mean)**2 <= n * var, so S2 - S1**2/n cancels at most
    log2(BLOCK) = 11 bits, which the float64 (double-double for float64 input)
    sums absorb.  Contiguous rows use the 16-lane loops of _simd.h, strided
    ones the scalar loop below with the same arithmetic.
    """
    cdef double n = <double>(nrows * rowlen)
    cdef double c = ld(base), x
    cdef double s1h = 0.0, s1l = 0.0, s2h = 0.0, s2l = 0.0
    cdef Py_ssize_t r, i
    cdef const char* row
    cdef bint contiguous = estride == sizeof(src_t)
    cdef bint hop = contiguous and nrows > 1 and rstride != rowlen * <Py_ssize_t>sizeof(src_t)
    for r in range(nrows):
        row = <const char*>base + r * rstride
        if hop:
            prefetch_span(row + rstride, rowlen * sizeof(src_t))
        if contiguous:
            row_centred(<const src_t*>row, rowlen, c, &s1h, &s1l, &s2h, &s2l, 0 if hop else pf)
        elif src_t is double:
            for i in range(rowlen):
                centred_add((<const double*>(row + i * estride))[0], c, &s1h, &s1l, &s2h, &s2l)
        else:
            for i in range(rowlen):
                x = ld(<const src_t*>(row + i * estride)) - c
                s1h = s1h + x
                s2h = s2h + x * x
    block_finish(base, nrows, rowlen, rstride, estride, c, s1h, s1l, s2h, s2l, out)


cdef inline void block_finish(const src_t* base, Py_ssize_t nrows, Py_ssize_t rowlen,
                              Py_ssize_t rstride, Py_ssize_t estride, double c, double s1h,
                              double s1l, double s2h, double s2l, State* out) noexcept nogil:
    """The state of a block from its centred sums (the end of block_moments)."""
    cdef double n = <double>(nrows * rowlen), total
    cdef Py_ssize_t r, i
    cdef const char* row
    if not (isfinite(s1h) and isfinite(c)):
        # inf or nan in the block: the mean follows IEEE arithmetic, the spread is undefined
        total = 0.0
        for r in range(nrows):
            row = <const char*>base + r * rstride
            for i in range(rowlen):
                total = total + ld(<const src_t*>(row + i * estride))
        block_state_d(n, total / n, 0.0, 0.0, out)
        out.qh = NAN
        return
    if src_t is double:
        block_state(n, c, s1h, s1l, s2h, s2l, out)
    else:
        block_state_d(n, c, s1h, s2h, out)


cdef void moments_1d_f64(const double* x, Py_ssize_t n, Py_ssize_t stride, State* out) noexcept nogil:
    """State of n float64 values with element stride `stride` (for embedding)."""
    out.n = 0
    out.mh = out.ml = out.qh = out.ql = 0.0
    if n > 0:
        slice_chunk(<const double*>x, 1, n, 0, stride * 8, 0, blocks_in_slice(1, n),
                    CN_PF_AHEAD if stride == 1 else 0, out)


cdef void moments_1d_f32(const float* x, Py_ssize_t n, Py_ssize_t stride, State* out) noexcept nogil:
    """State of n float32 values with element stride `stride` (for embedding)."""
    out.n = 0
    out.mh = out.ml = out.qh = out.ql = 0.0
    if n > 0:
        slice_chunk(<const float*>x, 1, n, 0, stride * 4, 0, blocks_in_slice(1, n),
                    CN_PF_AHEAD if stride == 1 else 0, out)


# ---------------------------------------------------------------- slices (rows kernel)
cdef inline Py_ssize_t blocks_in_slice(Py_ssize_t nrows, Py_ssize_t rowlen) noexcept nogil:
    if rowlen >= BLOCK:
        return nrows * ((rowlen + BLOCK - 1) // BLOCK)
    cdef Py_ssize_t g = BLOCK // rowlen
    return (nrows + g - 1) // g


cdef inline void slice_block(const src_t* base, Py_ssize_t nrows, Py_ssize_t rowlen,
                             Py_ssize_t rstride, Py_ssize_t estride, Py_ssize_t b,
                             Py_ssize_t pf, State* blk) noexcept nogil:
    """State of block b of a slice (nrows x rowlen, byte strides): whole rows
    grouped up to BLOCK elements, or BLOCK-element pieces of long rows
    (pf: see block_moments_pf)."""
    cdef Py_ssize_t per_row, r, k, g
    if rowlen >= BLOCK:
        per_row = (rowlen + BLOCK - 1) // BLOCK
        r = b // per_row
        k = (b % per_row) * BLOCK
        block_moments_pf(<const src_t*>(<const char*>base + r * rstride + k * estride),
                         1, min(BLOCK, rowlen - k), 0, estride, pf, blk)
    else:
        g = BLOCK // rowlen
        block_moments_pf(<const src_t*>(<const char*>base + b * g * rstride),
                         min(g, nrows - b * g), rowlen, rstride, estride, pf, blk)


cdef void slice_chunk(const src_t* base, Py_ssize_t nrows, Py_ssize_t rowlen,
                      Py_ssize_t rstride, Py_ssize_t estride,
                      Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t pf, State* out) noexcept nogil:
    """Merge blocks b0..b1-1 of a slice (nrows x rowlen, byte strides) into out
    (pf: see block_moments_pf)."""
    cdef State blk
    cdef Py_ssize_t b
    out.n = 0
    out.mh = out.ml = out.qh = out.ql = 0.0
    for b in range(b0, b1):
        slice_block(base, nrows, rowlen, rstride, estride, b, pf, &blk)
        merge_t(out, &blk, base)


cdef void blocks_across_slices(const src_t* x, Py_ssize_t R1, Py_ssize_t R0, Py_ssize_t* xs,
                               Py_ssize_t k0, Py_ssize_t k1, Py_ssize_t b0, Py_ssize_t b1,
                               State* part, Py_ssize_t kstep) noexcept nogil:
    """Blocks b0..b1-1 of slices k0..k1-1 (slice k at x + k*xs[2]), block-major:
    block b of slice k merges into part[k * kstep] (one work item of rows_kernel).

    Each slice still merges its blocks in ascending order, but the reads are
    ordered to follow memory: rows shorter than BLOCK row-interleaved (see
    block_rows_interleaved); long rows (pieces of BLOCK elements) one row at
    a time, all its pieces, then the same row of the next slice -- the next
    NCHW plane.  Visiting piece b of every slice before piece b + 1 read 64
    streams at once and ran at ~3x the read floor for 128 x 128 planes."""
    cdef State blk
    cdef Py_ssize_t b, bb, bend, k, per_row
    cdef bint contiguous = xs[3] == sizeof(src_t)
    cdef Py_ssize_t pf = CN_PF_AHEAD if (
        contiguous and xs[2] == R0 * <Py_ssize_t>sizeof(src_t)) else 0
    if R0 < BLOCK and contiguous:
        for b in range(b0, b1):
            block_rows_interleaved(x, R1, R0, xs, k0, k1, b, part, kstep)
        return
    if R0 < BLOCK:
        for b in range(b0, b1):
            for k in range(k0, k1):
                slice_block(<const src_t*>(<const char*>x + k * xs[2]), R1, R0, xs[1], xs[3],
                            b, 0, &blk)
                merge_t(&part[k * kstep], &blk, x)
        return
    per_row = (R0 + BLOCK - 1) // BLOCK
    b = b0
    while b < b1:
        bend = min(b1, (b // per_row + 1) * per_row)   # the pieces of one row
        for k in range(k0, k1):
            for bb in range(b, bend):
                slice_block(<const src_t*>(<const char*>x + k * xs[2]), R1, R0, xs[1], xs[3],
                            bb, pf, &blk)
                merge_t(&part[k * kstep], &blk, x)
        b = bend


cdef void block_rows_interleaved(const src_t* x, Py_ssize_t R1, Py_ssize_t R0, Py_ssize_t* xs,
                                 Py_ssize_t k0, Py_ssize_t k1, Py_ssize_t b,
                                 State* part, Py_ssize_t kstep) noexcept nogil:
    """Block b of slices k0..k1-1 whose contiguous rows (R0 < BLOCK) are grouped
    into blocks, row-interleaved: row r of SLICE_GROUP slices, then row r + 1.

    Each slice adds the same rows in the same order with the same shift as
    block_moments, so the states are bitwise slice_block's; but the reads
    follow memory (row r of slice k + 1 is the next NCHW plane after row r of
    slice k) instead of hopping from one sample to the next within a slice
    (moments of (N, 64, 16, 16) float64 over (0, 2, 3): ~4x -> ~2x the read
    floor, 1 thread).
    """
    cdef Py_ssize_t g = BLOCK // R0
    cdef Py_ssize_t r0 = b * g, nrows = min(g, R1 - r0), kg, kn, k, r
    cdef Py_ssize_t rowbytes = R0 * <Py_ssize_t>sizeof(src_t)
    cdef bint hop = xs[2] != rowbytes
    cdef double c[SLICE_GROUP]
    cdef double s1h[SLICE_GROUP]
    cdef double s1l[SLICE_GROUP]
    cdef double s2h[SLICE_GROUP]
    cdef double s2l[SLICE_GROUP]
    cdef const char* first
    cdef const char* row
    cdef State blk
    for kg in range(k0, k1, SLICE_GROUP):
        kn = min(<Py_ssize_t>SLICE_GROUP, k1 - kg)
        first = <const char*>x + kg * xs[2] + r0 * xs[1]
        for k in range(kn):
            c[k] = ld(<const src_t*>(first + k * xs[2]))
            s1h[k] = s1l[k] = s2h[k] = s2l[k] = 0.0
        for r in range(nrows):
            row = first + r * xs[1]
            for k in range(kn):
                if hop and k + 1 < kn:
                    prefetch_span(row + (k + 1) * xs[2], rowbytes)
                # adjacent planes: read ahead into the next one (not past the group)
                row_centred(<const src_t*>(row + k * xs[2]), R0, c[k],
                            &s1h[k], &s1l[k], &s2h[k], &s2l[k],
                            0 if hop or k + 1 == kn else CN_PF_AHEAD)
        for k in range(kn):
            block_finish(<const src_t*>(first + k * xs[2]), nrows, R0, xs[1], xs[3], c[k],
                         s1h[k], s1l[k], s2h[k], s2l[k], &blk)
            merge_t(&part[(kg + k) * kstep], &blk, x)


cdef extern from "_rows_dd.h" nogil:
    enum: CN_VW   # doubles per native vector: the rows of one group
    int cn_rows_norm_f64(const double *x, Py_ssize_t xrs, int g, Py_ssize_t n, int rms,
                         double eps, Py_ssize_t pf, double *mh, double *ml, double *rs,
                         double *mean, double *var)
    int cn_rows_norm_f32(const float *x, Py_ssize_t xrs, int g, Py_ssize_t n, int rms,
                         double eps, Py_ssize_t pf, double *mh, double *ml, double *rs,
                         double *mean, double *var)
    int cn_rows_norm_f16(const uint16_t *x, Py_ssize_t xrs, int g, Py_ssize_t n, int rms,
                         double eps, Py_ssize_t pf, double *mh, double *ml, double *rs,
                         double *mean, double *var)
    int cn_rows_states_f64(const double *x, Py_ssize_t xrs, int g, Py_ssize_t n,
                           Py_ssize_t pf, double *mh, double *ml, double *qh, double *ql)
    int cn_rows_states_f32(const float *x, Py_ssize_t xrs, int g, Py_ssize_t n,
                           Py_ssize_t pf, double *mh, double *ml, double *qh, double *ql)
    int cn_rows_states_f16(const uint16_t *x, Py_ssize_t xrs, int g, Py_ssize_t n,
                           Py_ssize_t pf, double *mh, double *ml, double *qh, double *ql)


cdef inline int rows_norm(const src_t* x, Py_ssize_t xrs, int g, Py_ssize_t n, int rms,
                          double eps, Py_ssize_t pf, double* mh, double* ml, double* rs,
                          double* mean, double* var) noexcept nogil:
    """cn_rows_norm_<dtype> of _rows_dd.h"""
    if src_t is double:
        return cn_rows_norm_f64(x, xrs, g, n, rms, eps, pf, mh, ml, rs, mean, var)
    elif src_t is float:
        return cn_rows_norm_f32(x, xrs, g, n, rms, eps, pf, mh, ml, rs, mean, var)
    else:
        return cn_rows_norm_f16(x, xrs, g, n, rms, eps, pf, mh, ml, rs, mean, var)


cdef inline int rows_states(const src_t* x, Py_ssize_t xrs, int g, Py_ssize_t n, Py_ssize_t pf,
                            double* mh, double* ml, double* qh, double* ql) noexcept nogil:
    """cn_rows_states_<dtype> of _rows_dd.h"""
    if src_t is double:
        return cn_rows_states_f64(x, xrs, g, n, pf, mh, ml, qh, ql)
    elif src_t is float:
        return cn_rows_states_f32(x, xrs, g, n, pf, mh, ml, qh, ql)
    else:
        return cn_rows_states_f16(x, xrs, g, n, pf, mh, ml, qh, ql)


# rows shorter than BLOCK: statistics CN_VW rows at a time (norm_rows_grouped,
# rows_states_grouped); set_row_groups(False) keeps them row by row, the same
# bits (the tests compare both)
cdef bint row_groups = True


def set_row_groups(bint on):
    """Whether short rows take the grouped statistics (the same results);
    returns the previous setting."""
    global row_groups
    cdef bint old = row_groups
    row_groups = on
    return old


cdef void rows_states_grouped(const src_t* x, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t L,
                              Py_ssize_t rstep, Py_ssize_t pf, State* part) noexcept nogil:
    """part[r] = the state of row r (r0 <= r < r1; L < BLOCK contiguous elements,
    row r at x + r * rstep bytes), what slice_chunk gives for a one-row slice:
    CN_VW rows at a time (_rows_dd.h), rows with inf or NaN through slice_chunk."""
    cdef double mh[CN_VW]
    cdef double ml[CN_VW]
    cdef double qh[CN_VW]
    cdef double ql[CN_VW]
    cdef Py_ssize_t r = r0, j
    cdef int g, bad
    while r < r1:
        g = <int>min(<Py_ssize_t>CN_VW, r1 - r)
        bad = rows_states(<const src_t*>(<const char*>x + r * rstep), rstep, g, L, pf, mh, ml,
                          qh, ql)
        for j in range(g):
            if (bad >> j) & 1:
                slice_chunk(<const src_t*>(<const char*>x + (r + j) * rstep), 1, L, 0,
                            sizeof(src_t), 0, 1, pf, &part[r + j])
            else:
                part[r + j].n = <double>L
                part[r + j].mh = mh[j]
                part[r + j].ml = ml[j]
                part[r + j].qh = qh[j]
                part[r + j].ql = ql[j]
        r += g


cdef void rows_kernel(const src_t* x, Py_ssize_t* shape, Py_ssize_t* xs,
                      Py_ssize_t so, Py_ssize_t sk, State* states, int nthreads) noexcept nogil:
    """Reduce x[o, r1, k, r0] over (r1, r0) into states[o*so + k*sk] (merging).

    The partial state of (slice, chunk) is the left-to-right merge of the
    chunk's blocks, whatever order the work is done in.  Slice-major order
    reads each slice's rows in turn; when the kept axis k is nested inside
    the reduced axis r1 in memory (NCHW batch statistics: channel planes of
    one sample are adjacent, samples are C planes apart), the work goes
    block-major instead -- block b of every slice k, then block b + 1 -- so the
    reads sweep memory in order rather than hopping by C planes (3.4x the
    read floor before, for 32x32 float32 planes).
    """
    cdef Py_ssize_t O = shape[0], R1 = shape[1], K = shape[2], R0 = shape[3]
    cdef Py_ssize_t nslices = O * K
    cdef Py_ssize_t nblocks = blocks_in_slice(R1, R0)
    cdef Py_ssize_t nchunks = (nblocks + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS
    cdef Py_ssize_t ntasks = nslices * nchunks, t, sl, ch, o, k, ngroups, g, k0, k1, rstep
    cdef State* part
    cdef State st
    cdef int nt = nthreads if nslices * R1 * R0 >= SERIAL_WORK else 1
    cdef bint block_major = K > 1 and R1 > 1 and 0 < xs[2] < xs[1]
    # slice-major reads follow memory when x[o, k, r1, r0] is C-contiguous in
    # that order: then the row loops prefetch ahead (see cn_prefetch16)
    cdef Py_ssize_t sz = sizeof(src_t)
    cdef Py_ssize_t pf = CN_PF_AHEAD if (
        xs[3] == sz and (R1 == 1 or xs[1] == R0 * sz) and (K == 1 or xs[2] == R1 * R0 * sz)
        and (O == 1 or xs[0] == K * R1 * R0 * sz)) else 0
    if nslices == 0:
        return
    if nblocks == 0:
        return
    part = <State*>malloc(ntasks * sizeof(State))
    if part == NULL:
        return
    if block_major:
        # work items (o, chunk, group of slices k); the groups only split the work
        ngroups = min(K, <Py_ssize_t>nt)
        for t in range(ntasks):
            part[t].n = 0
            part[t].mh = part[t].ml = part[t].qh = part[t].ql = 0.0
        for t in prange(O * nchunks * ngroups, nogil=True, num_threads=nt, schedule='static'):
            g = t % ngroups
            ch = (t // ngroups) % nchunks
            o = t // (ngroups * nchunks)
            k0 = g * K // ngroups
            k1 = (g + 1) * K // ngroups
            blocks_across_slices(<const src_t*>(<const char*>x + o * xs[0]), R1, R0, xs, k0, k1,
                                 ch * CHUNK_BLOCKS, min(nblocks, (ch + 1) * CHUNK_BLOCKS),
                                 &part[o * K * nchunks + ch], nchunks)
    elif row_groups and R1 == 1 and R0 < BLOCK and xs[3] == sz and (K == 1 or O == 1):
        # one short row per slice, the rows evenly spaced: CN_VW rows at a time
        rstep = xs[0] if K == 1 else xs[2]
        for t in prange(nt, nogil=True, num_threads=nt, schedule='static'):
            rows_states_grouped(x, t * nslices // nt, (t + 1) * nslices // nt, R0, rstep, pf,
                                part)
    else:
        for t in prange(ntasks, nogil=True, num_threads=nt, schedule='static'):
            sl = t // nchunks
            ch = t % nchunks
            o = sl // K
            k = sl % K
            slice_chunk(<const src_t*>(<const char*>x + o * xs[0] + k * xs[2]), R1, R0, xs[1],
                        xs[3], ch * CHUNK_BLOCKS, min(nblocks, (ch + 1) * CHUNK_BLOCKS), pf,
                        &part[t])
    for sl in range(nslices):
        st = part[sl * nchunks]
        for ch in range(1, nchunks):
            state_merge(&st, &part[sl * nchunks + ch])
        o = sl // K
        k = sl % K
        state_merge(&states[o * so + k * sk], &st)
    free(part)


# ---------------------------------------------------------------- columns kernel
cdef void cols_block(const src_t* base, Py_ssize_t nrows, Py_ssize_t ncols,
                     Py_ssize_t rstride, Py_ssize_t cstride, State* out) noexcept nogil:
    """States of ncols (<= TILE) columns over an nrows-row block."""
    cdef double c[TILE]
    cdef double s1h[TILE]
    cdef double s1l[TILE]
    cdef double s2h[TILE]
    cdef double s2l[TILE]
    cdef double x, d, de, t, bb, e, p2, e2
    cdef Py_ssize_t r, j
    cdef const char* row
    cdef bint contiguous = cstride == sizeof(src_t)
    # prefetch distance of the four-row loop (see cn_cols_centred4_*): about
    # 32 KiB, 8 to 256 rows ahead; none for rows under 128 bytes or negative
    # strides.  (Rows of 256 bytes, (163840, 64) float32 over axis 0, 1 thread:
    # 1.55-1.65x -> 0.95-1.05x the read floor; channels-last batch_norm float32
    # 2.0-2.3x -> 1.7x copy.)
    cdef Py_ssize_t rowbytes = ncols * <Py_ssize_t>sizeof(src_t)
    cdef Py_ssize_t pf = rstride * min(256, max(8, 32768 // rstride)) if (
        rowbytes >= 128 and rstride > 0) else 0
    for j in range(ncols):
        c[j] = 0.0
        s1h[j] = 0.0
        s1l[j] = 0.0
        s2h[j] = 0.0
        s2l[j] = 0.0
    # the shift is the block's first row (see block_moments)
    for j in range(ncols):
        c[j] = ld(<const src_t*>(<const char*>base + j * cstride))
    r = 0
    if contiguous:
        while r + 4 <= nrows:
            row = <const char*>base + r * rstride
            if src_t is uint16_t:
                cn_cols_centred4_f16(<const uint16_t*>row, rstride, ncols, c, s1h, s2h, pf)
            elif src_t is float:
                cn_cols_centred4_f32(<const float*>row, rstride, ncols, c, s1h, s2h, pf)
            else:
                cn_cols_centred4_f64(<const double*>row, rstride, ncols, c, s1h, s1l, s2h, s2l, pf)
            r += 4
    for r in range(r, nrows):
        row = <const char*>base + r * rstride
        if contiguous:
            if src_t is uint16_t:
                cn_cols_centred_f16(<const uint16_t*>row, ncols, c, s1h, s2h)
            elif src_t is float:
                cn_cols_centred_f32(<const float*>row, ncols, c, s1h, s2h)
            else:
                cn_cols_centred_f64(<const double*>row, ncols, c, s1h, s1l, s2h, s2l)
        elif src_t is double:
            for j in range(ncols):
                centred_add((<const double*>(row + j * cstride))[0], c[j],
                            &s1h[j], &s1l[j], &s2h[j], &s2l[j])
        else:
            for j in range(ncols):
                d = ld(<const src_t*>(row + j * cstride)) - c[j]
                s1h[j] = s1h[j] + d
                s2h[j] = s2h[j] + d * d
    for j in range(ncols):
        if not (isfinite(s1h[j]) and isfinite(c[j])):
            t = 0.0
            for r in range(nrows):
                t = t + ld(<const src_t*>(<const char*>base + r * rstride + j * cstride))
            block_state_d(<double>nrows, t / nrows, 0.0, 0.0, &out[j])
            out[j].qh = NAN
        elif src_t is double:
            block_state(<double>nrows, c[j], s1h[j], s1l[j], s2h[j], s2l[j], &out[j])
        else:
            block_state_d(<double>nrows, c[j], s1h[j], s2h[j], &out[j])


cdef void cols_task(const src_t* base, Py_ssize_t R, Py_ssize_t kn, Py_ssize_t rstride,
                    Py_ssize_t cstride, Py_ssize_t brows, Py_ssize_t b0, Py_ssize_t b1,
                    State* out) noexcept nogil:
    """Merge row blocks b0..b1-1 of kn (<= TILE) columns into out[0:kn]."""
    cdef State blk[TILE]
    cdef Py_ssize_t b, j, r0
    for j in range(kn):
        out[j].n = 0
        out[j].mh = out[j].ml = out[j].qh = out[j].ql = 0.0
    for b in range(b0, b1):
        r0 = b * brows
        cols_block(<const src_t*>(<const char*>base + r0 * rstride),
                   min(brows, R - r0), kn, rstride, cstride, blk)
        for j in range(kn):
            merge_t(&out[j], &blk[j], base)


cdef void cols_kernel(const src_t* x, Py_ssize_t* shape, Py_ssize_t* xs,
                      Py_ssize_t so, Py_ssize_t sk, State* states, int nthreads) noexcept nogil:
    """Reduce x[o, r1, k] over r1 into states[o*so + k*sk], vectorized across k."""
    cdef Py_ssize_t O = shape[0], R = shape[1], K = shape[2]
    # blocks of ~256k elements and at least 1024 rows (one shift per column per
    # block; merging a block costs one state merge per column: 256-row blocks
    # of 1024 columns spent as long merging as reading, (10240, 1024) float32
    # at 1 thread) and chunks of COLS_CHUNK_BLOCKS blocks
    cdef Py_ssize_t brows = max(1024, BLOCK * 64 // min(K, TILE))
    cdef Py_ssize_t ntiles = (K + TILE - 1) // TILE
    cdef Py_ssize_t nblocks = (R + brows - 1) // brows
    cdef Py_ssize_t nchunks = (nblocks + COLS_CHUNK_BLOCKS - 1) // COLS_CHUNK_BLOCKS
    cdef Py_ssize_t ntasks = O * ntiles * nchunks, t, tile, ch, o, k0, j
    cdef State* part
    cdef State st
    cdef int nt = nthreads if O * R * K >= SERIAL_WORK else 1
    if O * K == 0 or R == 0:
        return
    part = <State*>malloc(ntasks * TILE * sizeof(State))
    if part == NULL:
        return
    for t in prange(ntasks, nogil=True, num_threads=nt, schedule='static'):
        ch = t % nchunks
        tile = (t // nchunks) % ntiles
        o = t // (nchunks * ntiles)
        k0 = tile * TILE
        cols_task(<const src_t*>(<const char*>x + o * xs[0] + k0 * xs[2]), R, min(TILE, K - k0),
                  xs[1], xs[2], brows, ch * COLS_CHUNK_BLOCKS,
                  min(nblocks, (ch + 1) * COLS_CHUNK_BLOCKS), &part[t * TILE])
    for o in range(O):
        for tile in range(ntiles):
            k0 = tile * TILE
            for j in range(min(TILE, K - k0)):
                st = part[((o * ntiles + tile) * nchunks) * TILE + j]
                for ch in range(1, nchunks):
                    state_merge(&st, &part[((o * ntiles + tile) * nchunks + ch) * TILE + j])
                state_merge(&states[o * so + (k0 + j) * sk], &st)
    free(part)


# ---------------------------------------------------------------- fused rows: moments + apply
include "_elementwise.pxi"

cdef extern from "_apply_simd.h" nogil:
    void cn_apply_row_f32(const void *x, void *y, Py_ssize_t n, const double *mh, const double *ml,
                          const double *rs, int svec, const double *w, const double *b, int pvec,
                          int relu, int stream)
    void cn_apply_row_f64(const void *x, void *y, Py_ssize_t n, const double *mh, const double *ml,
                          const double *rs, int svec, const double *w, const double *b, int pvec,
                          int relu, int stream)
    void cn_apply_rows_percol_f32(const void *x, void *y, Py_ssize_t R, Py_ssize_t L,
                                  const double *mh, const double *ml, const double *rs,
                                  const double *w, const double *b, int relu, int stream)
    void cn_apply_rows_percol_f64(const void *x, void *y, Py_ssize_t R, Py_ssize_t L,
                                  const double *mh, const double *ml, const double *rs,
                                  const double *w, const double *b, int relu, int stream)
    void cn_apply_rows_perrow_f32(const void *x, void *y, Py_ssize_t r0, Py_ssize_t r1,
                                  Py_ssize_t L, const double *mh, const double *ml,
                                  const double *rs, Py_ssize_t smod, const double *w,
                                  const double *b, Py_ssize_t pmod, Py_ssize_t pmul, int relu,
                                  int stream)
    void cn_apply_rows_perrow_f64(const void *x, void *y, Py_ssize_t r0, Py_ssize_t r1,
                                  Py_ssize_t L, const double *mh, const double *ml,
                                  const double *rs, Py_ssize_t smod, const double *w,
                                  const double *b, Py_ssize_t pmod, Py_ssize_t pmul, int relu,
                                  int stream)
    void cn_store_fence()

cdef extern from "_apply_h32.h" nogil:
    ctypedef struct cn_h32_prep:
        float *w
        float *b
        float *m0
        float *m1
        float *r0
    int cn_h32_prepare(cn_h32_prep *p, const double *w, const double *b, Py_ssize_t nparams,
                       const double *mh, const double *ml, const double *rs, Py_ssize_t ns)
    void cn_h32_release(cn_h32_prep *p)
    int cn_h32_stats(double mh, double ml, double rs, float *m0, float *m1, float *r0)
    void cn_apply_row_h32(const uint16_t *x, uint16_t *y, Py_ssize_t n, const float *m0,
                          const float *m1, const float *r0, int svec, const float *w,
                          const float *b, int pvec, int plain, int relu)
    void cn_apply_rows_percol_h32(const uint16_t *x, uint16_t *y, Py_ssize_t R, Py_ssize_t L,
                                  const float *m0, const float *m1, const float *r0,
                                  const float *w, const float *b, int relu)

# Outputs of at least this many bytes are written with non-temporal (streaming)
# stores: they cannot stay in the cache anyway, and streaming saves reading
# every output line before overwriting it.  _config sets it to the size of the
# last-level cache; set_stream_threshold changes it (the tests force both paths).
cdef Py_ssize_t stream_min_bytes = 32 * 1024 * 1024


def set_stream_threshold(Py_ssize_t nbytes):
    """Outputs of at least ``nbytes`` bytes use streaming stores; returns the old value."""
    global stream_min_bytes
    cdef Py_ssize_t old = stream_min_bytes
    stream_min_bytes = nbytes if nbytes > 0 else 0
    return old


cdef inline void apply_row(const src_t* x, src_t* y, Py_ssize_t n, const double* mh,
                           const double* ml, const double* rs, bint svec, const double* w,
                           const double* b, bint pvec, bint relu, bint stream) noexcept nogil:
    """The fused vector apply loop of _apply_simd.h for this dtype (float16: scale_row_h32)."""
    if src_t is float:
        cn_apply_row_f32(x, y, n, mh, ml, rs, svec, w, b, pvec, relu, stream)
    elif src_t is double:
        cn_apply_row_f64(x, y, n, mh, ml, rs, svec, w, b, pvec, relu, stream)


cdef inline void apply_rows_percol(const src_t* x, src_t* y, Py_ssize_t R, Py_ssize_t L,
                                   const double* mh, const double* ml, const double* rs,
                                   const double* w, const double* b, bint relu,
                                   bint stream, const cn_h32_prep* hp) noexcept nogil:
    """Channels-last rows back to back, one vector loop over all of them (_apply_simd.h;
    float16: cn_apply_rows_percol_h32, with the float32 copies in hp)."""
    if src_t is uint16_t:
        cn_apply_rows_percol_h32(x, y, R, L, hp.m0, hp.m1, hp.r0, hp.w, hp.b, relu)
    elif src_t is float:
        cn_apply_rows_percol_f32(x, y, R, L, mh, ml, rs, w, b, relu, stream)
    elif src_t is double:
        cn_apply_rows_percol_f64(x, y, R, L, mh, ml, rs, w, b, relu, stream)


cdef inline void apply_rows_perrow(const src_t* x, src_t* y, Py_ssize_t r0, Py_ssize_t r1,
                                   Py_ssize_t L, const double* mh, const double* ml,
                                   const double* rs, Py_ssize_t smod, const double* w,
                                   const double* b, Py_ssize_t pmod, Py_ssize_t pmul, bint relu,
                                   bint stream) noexcept nogil:
    """NCHW planes back to back, rows [r0, r1): statistics per row (index r % smod),
    one parameter per row (index (r % pmod) * pmul), one vector loop over the rows
    (_apply_simd.h; float32 and float64)."""
    if src_t is float:
        cn_apply_rows_perrow_f32(x, y, r0, r1, L, mh, ml, rs, smod, w, b, pmod, pmul, relu,
                                 stream)
    elif src_t is double:
        cn_apply_rows_perrow_f64(x, y, r0, r1, L, mh, ml, rs, smod, w, b, pmod, pmul, relu,
                                 stream)


DEF MODE_LAYER = 0   # centre by the mean, scale by 1/sqrt(var + eps)
DEF MODE_RMS = 1     # no centring, scale by 1/sqrt(mean(x**2) + eps)


cdef void norm_row(const src_t* x, src_t* y, Py_ssize_t L, Py_ssize_t r, double eps, int mode,
                   const double* w, const double* b, Py_ssize_t psub, Py_ssize_t pmod,
                   Py_ssize_t pmul, int act, double* mean_out, double* var_out,
                   bint stream, Py_ssize_t pf, const cn_h32_prep* hp) noexcept nogil:
    """Normalize one contiguous row of L elements (row index r); pf: the
    statistics pass prefetches that far ahead (rows back to back), or 0.

    Statistics as in moments (blocks of BLOCK, Chan merges); then the row,
    still in cache, goes through the apply pass.  The parameters of sub-row
    j (of psub elements) are w[(r % pmod) * pmul + j] when psub > 1, and
    w[i] per element when psub == 1.
    """
    cdef State st
    cdef double mh, ml, var, vl, rs
    slice_chunk(x, 1, L, 0, sizeof(src_t), 0, blocks_in_slice(1, L), pf, &st)
    if mode == MODE_LAYER:
        mh = st.mh
        ml = st.ml
        if st.qh != st.qh:
            var = NAN
        else:
            dd_div_d(st.qh, st.ql, st.n, &var, &vl)
            var = var if var > 0 else 0.0
        mean_out[0] = mh + ml if isfinite(mh) else mh
        if not isfinite(mh):
            var = NAN
    else:
        # mean(x**2) = M2/n + mean**2
        dd_div_d(st.qh, st.ql, st.n, &var, &vl)
        var = var + (st.mh * st.mh + 2.0 * st.mh * st.ml)
        if st.qh != st.qh or not isfinite(st.mh):
            var = NAN
        mh = 0.0
        ml = 0.0
        mean_out[0] = 0.0
    rs = 1.0 / sqrt(var + eps)
    var_out[0] = var
    # the row is still in cache: the apply pass with this row's statistics
    scale_row(x, y, L, r, &mh, &ml, &rs, 1, False, w, b, psub, pmod, pmul, act, stream, hp)


cdef void norm_rows_grouped(const src_t* x, src_t* y, Py_ssize_t r0, Py_ssize_t r1,
                            Py_ssize_t L, Py_ssize_t xrs, Py_ssize_t yrs, double eps, int mode,
                            const double* w, const double* b, Py_ssize_t psub, Py_ssize_t pmod,
                            Py_ssize_t pmul, int act, double* mean, double* var, bint stream,
                            Py_ssize_t pf, const cn_h32_prep* hp) noexcept nogil:
    """norm_row for rows r0..r1-1 of L < BLOCK elements (one block each): the
    statistics of CN_VW rows at a time in vectors across the rows (_rows_dd.h,
    the same bits), then each row's apply pass.  Rows with inf or NaN take
    norm_row."""
    cdef double mh[CN_VW]
    cdef double ml[CN_VW]
    cdef double rs[CN_VW]
    cdef Py_ssize_t r = r0, j
    cdef int g, bad
    while r < r1:
        g = <int>min(<Py_ssize_t>CN_VW, r1 - r)
        bad = rows_norm(<const src_t*>(<const char*>x + r * xrs), xrs, g, L, mode != MODE_LAYER,
                        eps, pf, mh, ml, rs, &mean[r], &var[r])
        for j in range(g):
            if (bad >> j) & 1:
                norm_row(<const src_t*>(<const char*>x + (r + j) * xrs),
                         <src_t*>(<char*>y + (r + j) * yrs), L, r + j, eps, mode, w, b, psub,
                         pmod, pmul, act, &mean[r + j], &var[r + j], stream, pf, hp)
            else:
                scale_row(<const src_t*>(<const char*>x + (r + j) * xrs),
                          <src_t*>(<char*>y + (r + j) * yrs), L, r + j, &mh[j], &ml[j], &rs[j],
                          1, False, w, b, psub, pmod, pmul, act, stream, hp)
        r += g


cdef inline Py_ssize_t param_extent(Py_ssize_t L, Py_ssize_t psub, Py_ssize_t pmod,
                                    Py_ssize_t pmul) noexcept nogil:
    """How many parameters the rows read: w[(r % pmod) * pmul + i] (i < L, or
    i < L // psub for sub-rows of psub elements)."""
    return (pmod - 1) * pmul + (L if psub == 1 else L // psub)


cdef void norm_rows_t(const src_t* x, src_t* y, Py_ssize_t R, Py_ssize_t L, Py_ssize_t xrs,
                      Py_ssize_t yrs, double eps, int mode, const double* w, const double* b,
                      Py_ssize_t psub, Py_ssize_t pmod, Py_ssize_t pmul, int act,
                      double* mean, double* var, int nthreads) noexcept nogil:
    """norm_rows_run; float16 with float32 copies of the parameters (_apply_h32.h)."""
    cdef cn_h32_prep prep
    if src_t is uint16_t:
        if cn_h32_prepare(&prep, w, b, param_extent(L, psub, pmod, pmul), NULL, NULL, NULL, 0):
            norm_rows_run(x, y, R, L, xrs, yrs, eps, mode, w, b, psub, pmod, pmul, act, mean, var,
                          nthreads, &prep)
            cn_h32_release(&prep)
            return
    norm_rows_run(x, y, R, L, xrs, yrs, eps, mode, w, b, psub, pmod, pmul, act, mean, var,
                  nthreads, NULL)


cdef void norm_rows_run(const src_t* x, src_t* y, Py_ssize_t R, Py_ssize_t L, Py_ssize_t xrs,
                        Py_ssize_t yrs, double eps, int mode, const double* w, const double* b,
                        Py_ssize_t psub, Py_ssize_t pmod, Py_ssize_t pmul, int act,
                        double* mean, double* var, int nthreads,
                        const cn_h32_prep* hp) noexcept nogil:
    cdef Py_ssize_t r
    cdef int nt = nthreads if R * L >= SERIAL_WORK and R > 1 else 1
    cdef bint stream = R * L * <Py_ssize_t>sizeof(src_t) >= stream_min_bytes
    cdef int t
    cdef Py_ssize_t pf = CN_PF_AHEAD if xrs == L * <Py_ssize_t>sizeof(src_t) else 0
    # each thread takes one contiguous range of rows and fences its streaming
    # stores at the end (a fence per row would stall on every short row)
    if L < BLOCK and row_groups:
        if nt == 1:
            norm_rows_grouped(x, y, 0, R, L, xrs, yrs, eps, mode, w, b, psub, pmod, pmul, act,
                              mean, var, stream, pf, hp)
            if stream:
                cn_store_fence()
            return
        for t in prange(nt, nogil=True, num_threads=nt, schedule='static'):
            norm_rows_grouped(x, y, t * R // nt, (t + 1) * R // nt, L, xrs, yrs, eps, mode, w, b,
                              psub, pmod, pmul, act, mean, var, stream, pf, hp)
            if stream:
                cn_store_fence()
        return
    if nt == 1:
        for r in range(R):
            norm_row(<const src_t*>(<const char*>x + r * xrs), <src_t*>(<char*>y + r * yrs), L, r,
                     eps, mode, w, b, psub, pmod, pmul, act, &mean[r], &var[r], stream, pf,
                     hp)
        if stream:
            cn_store_fence()
        return
    for t in prange(nt, nogil=True, num_threads=nt, schedule='static'):
        for r in range(t * R // nt, (t + 1) * R // nt):
            norm_row(<const src_t*>(<const char*>x + r * xrs), <src_t*>(<char*>y + r * yrs), L, r,
                     eps, mode, w, b, psub, pmod, pmul, act, &mean[r], &var[r], stream, pf,
                     hp)
        if stream:
            cn_store_fence()


def norm_rows(cnp.ndarray x, cnp.ndarray y, Py_ssize_t R, Py_ssize_t L, Py_ssize_t xrs,
              Py_ssize_t yrs, double eps, int mode, const double[::1] w, const double[::1] b,
              Py_ssize_t psub, Py_ssize_t pmod, Py_ssize_t pmul, int act,
              double[::1] mean, double[::1] var, int nthreads):
    """Fused normalization of R contiguous rows of L elements (row strides in bytes).

    ``mode`` 0 = layer norm (centre, 1/sqrt(var + eps)), 1 = RMS norm.
    Parameters: element i of row r uses ``w[(r % pmod) * pmul + i]`` when
    ``psub == 1``, and sub-row j (of ``psub`` elements) uses
    ``w[(r % pmod) * pmul + j]`` otherwise.  Writes the float64 mean and the
    biased variance (mean of squares for RMS) of every row; the kernel scales
    by ``1.0 / sqrt(var + eps)``, the same expression callers use for rstd.  x and y have the same dtype and may
    be the same array.
    """
    if x.dtype != y.dtype:
        raise TypeError("norm_rows: x and y must have the same dtype")
    if mean.shape[0] < R or var.shape[0] < R:
        raise ValueError("norm_rows: mean/var too short")
    if R == 0 or L == 0:
        return
    cdef const char* xp = <const char*>cnp.PyArray_DATA(x)
    cdef char* yp = <char*>cnp.PyArray_DATA(y)
    cdef int typenum = cnp.PyArray_TYPE(x)
    with nogil:
        if typenum == cnp.NPY_FLOAT64:
            norm_rows_t(<const double*>xp, <double*>yp, R, L, xrs, yrs, eps, mode, &w[0], &b[0],
                        psub, pmod, pmul, act, &mean[0], &var[0], nthreads)
        elif typenum == cnp.NPY_FLOAT32:
            norm_rows_t(<const float*>xp, <float*>yp, R, L, xrs, yrs, eps, mode, &w[0], &b[0],
                        psub, pmod, pmul, act, &mean[0], &var[0], nthreads)
        elif typenum == cnp.NPY_FLOAT16:
            norm_rows_t(<const uint16_t*>xp, <uint16_t*>yp, R, L, xrs, yrs, eps, mode, &w[0], &b[0],
                        psub, pmod, pmul, act, &mean[0], &var[0], nthreads)
        else:
            with gil:
                raise TypeError(f"norm_rows: unsupported dtype {x.dtype}")


cdef void scale_rows_t(const src_t* x, src_t* y, Py_ssize_t R, Py_ssize_t L, Py_ssize_t xrs,
                       Py_ssize_t yrs, const double* mh, const double* ml, const double* rs,
                       Py_ssize_t smod, bint sper, const double* w, const double* b,
                       Py_ssize_t psub, Py_ssize_t pmod, Py_ssize_t pmul, int act,
                       int nthreads) noexcept nogil:
    """scale_rows_run; float16 with float32 copies of the parameters and of
    per-element statistics (_apply_h32.h)."""
    cdef cn_h32_prep prep
    if src_t is uint16_t:
        if cn_h32_prepare(&prep, w, b, param_extent(L, psub, pmod, pmul), mh, ml, rs,
                          L if sper else 0):
            scale_rows_run(x, y, R, L, xrs, yrs, mh, ml, rs, smod, sper, w, b, psub, pmod, pmul,
                           act, nthreads, &prep)
            cn_h32_release(&prep)
            return
    scale_rows_run(x, y, R, L, xrs, yrs, mh, ml, rs, smod, sper, w, b, psub, pmod, pmul, act,
                   nthreads, NULL)


cdef void scale_rows_run(const src_t* x, src_t* y, Py_ssize_t R, Py_ssize_t L, Py_ssize_t xrs,
                         Py_ssize_t yrs, const double* mh, const double* ml, const double* rs,
                         Py_ssize_t smod, bint sper, const double* w, const double* b,
                         Py_ssize_t psub, Py_ssize_t pmod, Py_ssize_t pmul, int act,
                         int nthreads, const cn_h32_prep* hp) noexcept nogil:
    cdef Py_ssize_t r
    cdef int nt = nthreads if R * L >= SERIAL_WORK and R > 1 else 1
    cdef bint stream = R * L * <Py_ssize_t>sizeof(src_t) >= stream_min_bytes
    cdef int t
    cdef Py_ssize_t r0, r1
    cdef Py_ssize_t rowbytes = L * <Py_ssize_t>sizeof(src_t)
    if (sper and psub == 1 and pmul == 0 and xrs == rowbytes and yrs == rowbytes
            and (act == ACT_NONE or act == ACT_RELU) and (src_t is not uint16_t or hp != NULL)):
        # channels last, rows back to back: one loop over all rows of a thread
        if nt == 1:
            apply_rows_percol(x, y, R, L, mh, ml, rs, w, b, act == ACT_RELU, stream, hp)
            if stream:
                cn_store_fence()
            return
        for t in prange(nt, nogil=True, num_threads=nt, schedule='static'):
            r0 = t * R // nt
            r1 = (t + 1) * R // nt
            apply_rows_percol(<const src_t*>(<const char*>x + r0 * rowbytes),
                              <src_t*>(<char*>y + r0 * rowbytes), r1 - r0, L, mh, ml, rs, w, b,
                              act == ACT_RELU, stream, hp)
            if stream:
                cn_store_fence()
        return
    if (not sper and psub == L and L > 1 and xrs == rowbytes and yrs == rowbytes
            and (act == ACT_NONE or act == ACT_RELU) and (src_t is not uint16_t or hp != NULL)):
        # NCHW planes back to back (batch / group / instance norm): scale_row's call
        # for each row, one loop over a thread's rows without its per-row divisions
        if src_t is uint16_t:
            if nt == 1:
                h32_rows_perrow(x, y, 0, R, L, mh, ml, rs, smod, w, b, pmod, pmul, act, hp)
                return
            for t in prange(nt, nogil=True, num_threads=nt, schedule='static'):
                h32_rows_perrow(x, y, t * R // nt, (t + 1) * R // nt, L, mh, ml, rs, smod, w, b,
                                pmod, pmul, act, hp)
            return
        if nt == 1:
            apply_rows_perrow(x, y, 0, R, L, mh, ml, rs, smod, w, b, pmod, pmul,
                              act == ACT_RELU, stream)
            if stream:
                cn_store_fence()
            return
        for t in prange(nt, nogil=True, num_threads=nt, schedule='static'):
            apply_rows_perrow(x, y, t * R // nt, (t + 1) * R // nt, L, mh, ml, rs, smod, w, b,
                              pmod, pmul, act == ACT_RELU, stream)
            if stream:
                cn_store_fence()
        return
    if nt == 1:
        for r in range(R):
            scale_row(<const src_t*>(<const char*>x + r * xrs), <src_t*>(<char*>y + r * yrs), L, r,
                      mh, ml, rs, smod, sper, w, b, psub, pmod, pmul, act, stream, hp)
        if stream:
            cn_store_fence()
        return
    for t in prange(nt, nogil=True, num_threads=nt, schedule='static'):
        for r in range(t * R // nt, (t + 1) * R // nt):
            scale_row(<const src_t*>(<const char*>x + r * xrs), <src_t*>(<char*>y + r * yrs), L, r,
                      mh, ml, rs, smod, sper, w, b, psub, pmod, pmul, act, stream, hp)
        if stream:
            cn_store_fence()


cdef void scale_row(const src_t* x, src_t* y, Py_ssize_t L, Py_ssize_t r,
                    const double* mh, const double* ml, const double* rs, Py_ssize_t smod,
                    bint sper, const double* w, const double* b, Py_ssize_t psub,
                    Py_ssize_t pmod, Py_ssize_t pmul, int act, bint stream,
                    const cn_h32_prep* hp) noexcept nogil:
    """The apply pass over one contiguous row with given statistics: per row
    (index r % smod) or, when ``sper``, per element of the row (channels last).

    No activation or ReLU: the fused vector loop of _apply_simd.h (streaming
    stores when ``stream``: the caller fences after its last row); float16:
    the float32 loop of _apply_h32.h (scale_row_h32) when ``hp`` holds the
    float32 parameters and the row's statistics are in its range.  Other
    activations and the rest: load, scale, activate and store chunks of CHUNK
    elements through a float64 buffer (float16: scale_chunk_h32, the same
    values as the float32 loop)."""
    cdef double buf[CHUNK]
    cdef Py_ssize_t i0, m, j, nsub, pbase = (r % pmod) * pmul, si = r % smod
    if src_t is uint16_t:
        if (hp != NULL and (act == ACT_NONE or act == ACT_RELU)
                and scale_row_h32(x, y, L, si, pbase, mh, ml, rs, sper, w, b, psub,
                                  act == ACT_RELU, hp)):
            return
    elif act == ACT_NONE or act == ACT_RELU:
        if psub == 1 or sper:
            if sper:
                apply_row(x, y, L, mh, ml, rs, True, w + pbase, b + pbase, psub == 1,
                          act == ACT_RELU, stream)
            else:
                apply_row(x, y, L, mh + si, ml + si, rs + si, False, w + pbase, b + pbase, True,
                          act == ACT_RELU, stream)
        else:
            for j in range(L // psub):
                apply_row(x + j * psub, y + j * psub, psub, mh + si, ml + si, rs + si, False,
                          w + pbase + j, b + pbase + j, False, act == ACT_RELU, stream)
        return
    if psub == 1 or sper:
        for i0 in range(0, L, CHUNK):
            m = min(CHUNK, L - i0)
            load_chunk(<const char*>(x + i0), sizeof(src_t), m, buf, x)
            if sper:
                scale_chunk_io(buf, m, mh + i0, ml + i0, rs + i0, True, w + pbase + i0,
                               b + pbase + i0, psub == 1, x)
            else:
                scale_chunk_io(buf, m, mh + si, ml + si, rs + si, False, w + pbase + i0,
                               b + pbase + i0, True, x)
            if act != ACT_NONE:
                activate(buf, m, act)
            store_chunk(<char*>(y + i0), sizeof(src_t), m, buf, x)
    else:
        nsub = L // psub
        for j in range(nsub):
            for i0 in range(0, psub, CHUNK):
                m = min(CHUNK, psub - i0)
                load_chunk(<const char*>(x + j * psub + i0), sizeof(src_t), m, buf, x)
                scale_chunk_io(buf, m, mh + si, ml + si, rs + si, False, w + pbase + j,
                               b + pbase + j, False, x)
                if act != ACT_NONE:
                    activate(buf, m, act)
                store_chunk(<char*>(y + j * psub + i0), sizeof(src_t), m, buf, x)


cdef void h32_rows_perrow(const uint16_t* x, uint16_t* y, Py_ssize_t r0, Py_ssize_t r1,
                          Py_ssize_t L, const double* mh, const double* ml, const double* rs,
                          Py_ssize_t smod, const double* w, const double* b, Py_ssize_t pmod,
                          Py_ssize_t pmul, int act, const cn_h32_prep* hp) noexcept nogil:
    """Float16 NCHW planes back to back, rows [r0, r1), one parameter per row: scale_row's
    scale_row_h32 call for each row without its per-row divisions; a row whose
    statistics are outside the float32 range goes through scale_row (its per-element
    loop), as there."""
    cdef Py_ssize_t r, si = r0 % smod, pi = r0 % pmod
    for r in range(r0, r1):
        if not scale_row_h32(x + r * L, y + r * L, L, si, pi * pmul, mh, ml, rs, False, w, b, L,
                             act == ACT_RELU, hp):
            scale_row(x + r * L, y + r * L, L, r, mh, ml, rs, smod, False, w, b, L, pmod, pmul,
                      act, False, hp)
        si += 1
        if si == smod:
            si = 0
        pi += 1
        if pi == pmod:
            pi = 0


cdef bint scale_row_h32(const uint16_t* x, uint16_t* y, Py_ssize_t L, Py_ssize_t si,
                        Py_ssize_t pbase, const double* mh, const double* ml, const double* rs,
                        bint sper, const double* w, const double* b, Py_ssize_t psub, bint relu,
                        const cn_h32_prep* hp) noexcept nogil:
    """scale_row's vector loops for a float16 row, in float32 (_apply_h32.h), with
    the float32 parameters (and per-element statistics when ``sper``) of ``hp``;
    the same choices of loop as apply_row.  ``si``: the row's statistics index,
    ``pbase``: its first parameter (scale_row's ``r % smod``, ``(r % pmod) * pmul``).
    False when this row's statistics are outside the float32 range: the caller
    then takes the per-element loop."""
    cdef float m0, m1, r0
    cdef Py_ssize_t j
    if sper:
        cn_apply_row_h32(x, y, L, hp.m0, hp.m1, hp.r0, True, hp.w + pbase, hp.b + pbase,
                         psub == 1, False, relu)
        return True
    if not cn_h32_stats(mh[si], ml[si], rs[si], &m0, &m1, &r0):
        return False
    if psub == 1:
        cn_apply_row_h32(x, y, L, &m0, &m1, &r0, False, hp.w + pbase, hp.b + pbase, True, False,
                         relu)
    else:
        for j in range(L // psub):
            cn_apply_row_h32(x + j * psub, y + j * psub, psub, &m0, &m1, &r0, False,
                             hp.w + pbase + j, hp.b + pbase + j, False,
                             w[pbase + j] == 1.0 and b[pbase + j] == 0.0, relu)
    return True


def scale_rows(cnp.ndarray x, cnp.ndarray y, Py_ssize_t R, Py_ssize_t L, Py_ssize_t xrs,
               Py_ssize_t yrs, const double[::1] mh, const double[::1] ml, const double[::1] rs,
               Py_ssize_t smod, bint sper, const double[::1] w, const double[::1] b,
               Py_ssize_t psub, Py_ssize_t pmod, Py_ssize_t pmul, int act, int nthreads):
    """The apply pass over R contiguous rows of L elements with given statistics.

    Row r uses statistic ``r % smod`` (``sper=False``: NCHW batch norm, rows
    are (sample, channel) planes) or statistic i for element i (``sper=True``:
    channels last, rows are pixels).  Parameters are indexed as in norm_rows
    (``psub == 1``: per element; ``sper`` needs ``psub == 1``).
    """
    if x.dtype != y.dtype:
        raise TypeError("scale_rows: x and y must have the same dtype")
    if sper and (psub != 1 or mh.shape[0] < L):
        raise ValueError("scale_rows: per-element statistics need psub == 1 and L statistics")
    if not sper and mh.shape[0] < smod:
        raise ValueError("scale_rows: fewer statistics than smod")
    if R == 0 or L == 0:
        return
    cdef const char* xp = <const char*>cnp.PyArray_DATA(x)
    cdef char* yp = <char*>cnp.PyArray_DATA(y)
    cdef int typenum = cnp.PyArray_TYPE(x)
    with nogil:
        if typenum == cnp.NPY_FLOAT64:
            scale_rows_t(<const double*>xp, <double*>yp, R, L, xrs, yrs, &mh[0], &ml[0], &rs[0],
                         smod, sper, &w[0], &b[0], psub, pmod, pmul, act, nthreads)
        elif typenum == cnp.NPY_FLOAT32:
            scale_rows_t(<const float*>xp, <float*>yp, R, L, xrs, yrs, &mh[0], &ml[0], &rs[0],
                         smod, sper, &w[0], &b[0], psub, pmod, pmul, act, nthreads)
        elif typenum == cnp.NPY_FLOAT16:
            scale_rows_t(<const uint16_t*>xp, <uint16_t*>yp, R, L, xrs, yrs, &mh[0], &ml[0],
                         &rs[0], smod, sper, &w[0], &b[0], psub, pmod, pmul, act, nthreads)
        else:
            with gil:
                raise TypeError(f"scale_rows: unsupported dtype {x.dtype}")


def norm_stats(const double[:, ::1] states, double[::1] mh, double[::1] ml, double[::1] var):
    """Mean (double-double) and biased variance M2/n of each state, for the layers."""
    cdef Py_ssize_t i, n = states.shape[0]
    with nogil:
        for i in range(n):
            state_norm_stats(<const State*>&states[i, 0], &mh[i], &ml[i], &var[i])


cdef inline void state_norm_stats(const State* s, double* mh, double* ml, double* var) noexcept nogil:
    """The layers' statistics of a state: mean (double-double) and M2/n, NaN for
    NaN data or no data, never negative."""
    cdef double vh, vl
    mh[0] = s.mh
    ml[0] = s.ml
    if s.qh != s.qh or s.n == 0:
        var[0] = NAN
    else:
        dd_div_d(s.qh, s.ql, s.n, &vh, &vl)
        var[0] = vh if vh > 0 else 0.0


# ---------------------------------------------------------------- Python entry points
cdef inline void run_moments(const src_t* x, Py_ssize_t* shape, Py_ssize_t* xs,
                             Py_ssize_t so, Py_ssize_t sk, State* states, int nthreads) noexcept nogil:
    if shape[3] == 1 and shape[2] > 1:
        cols_kernel(x, shape, xs, so, sk, states, nthreads)
    else:
        rows_kernel(x, shape, xs, so, sk, states, nthreads)


def moments_4d(cnp.ndarray x, Py_ssize_t offset, shape, strides,
               Py_ssize_t so, Py_ssize_t sk, double[:, ::1] states,
               Py_ssize_t state_offset, int nthreads):
    """Merge the moments of ``x[o, r1, k, r0]`` over ``(r1, r0)`` into ``states``.

    Parameters
    ----------
    x : ndarray of float16, float32 or float64
        Only its data pointer and dtype are used; ``offset``, ``shape`` and
        ``strides`` (bytes) describe the canonical 4-d view of it.
    so, sk : int
        State index strides of the kept axes ``o`` and ``k``.
    states : float64 array of shape (m, 5)
        ``(n, mean_hi, mean_lo, M2_hi, M2_lo)`` per slice; results are merged
        into what is there (start from zeros).
    state_offset : int
        Index of the state of ``o = k = 0``.
    nthreads : int
        Threads to use; the result does not depend on it.
    """
    cdef Py_ssize_t sh[4]
    cdef Py_ssize_t st[4]
    cdef int i
    for i in range(4):
        sh[i] = shape[i]
        st[i] = strides[i]
    if states.shape[1] != 5:
        raise ValueError("states must have 5 columns")
    cdef char* base = <char*>cnp.PyArray_DATA(x) + offset
    cdef State* sp = <State*>&states[0, 0] + state_offset if states.shape[0] > 0 else NULL
    cdef int typenum = cnp.PyArray_TYPE(x)
    if sp == NULL:
        return
    with nogil:
        if typenum == cnp.NPY_FLOAT64:
            run_moments(<const double*>base, sh, st, so, sk, sp, nthreads)
        elif typenum == cnp.NPY_FLOAT32:
            run_moments(<const float*>base, sh, st, so, sk, sp, nthreads)
        elif typenum == cnp.NPY_FLOAT16:
            run_moments(<const uint16_t*>base, sh, st, so, sk, sp, nthreads)
        else:
            with gil:
                raise TypeError(f"moments_4d: unsupported dtype {x.dtype}")


def finalize(double[:, ::1] states, double ddof, double[::1] mean, double[::1] var):
    """Mean and variance (``M2 / (n - ddof)``) of each state, as float64."""
    cdef Py_ssize_t i, n = states.shape[0]
    with nogil:
        for i in range(n):
            state_finalize(<State*>&states[i, 0], ddof, &mean[i], &var[i])


def merge_states(double[:, ::1] a, const double[:, ::1] b):
    """Merge each state of ``b`` into the same row of ``a`` (Chan's formula)."""
    cdef Py_ssize_t i, n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError("merge_states: shapes differ")
    with nogil:
        for i in range(n):
            state_merge(<State*>&a[i, 0], <const State*>&b[i, 0])


# ---------------------------------------------------------------- small calls
include "_small_calls.pxi"

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""The normalization pass: one read of x, one write of y.

``y = act((((x - mean_hi) - mean_lo) * rstd) * weight + bias)``

with per-element statistics and parameters given by broadcast strides, so the
same kernel serves every layer (LayerNorm, RMSNorm, BatchNorm NCHW/NHWC,
GroupNorm, InstanceNorm): the layer only decides which statistic and which
parameter each element uses.  Arithmetic is float64, except for float16 data:
float32 (``_apply_h32.h``); the result is rounded once to the output dtype.  Rows are processed in chunks of
``CHUNK`` elements through an L1 buffer: load/convert, centre and scale,
activation, convert/store, each a simple loop the compiler vectorizes.
"""
from libc.stdint cimport uint16_t
from libc.math cimport erf, tanh, exp, sqrt
from cython.parallel cimport prange
cimport numpy as cnp

cnp.import_array()

cdef extern from "_simd.h" nogil:
    double cn_half_to_double(uint16_t h)
    uint16_t cn_double_to_half(double d)
    void cn_half8_to_double(const uint16_t *p, double *out)
    void cn_double8_to_half(const double *inp, uint16_t *p)
    const char *cn_isa_name()

include "_elementwise.pxi"

DEF SERIAL_WORK = 131072 # below this many elements, never start threads (wake-up costs more)


def isa():
    return cn_isa_name().decode()


cdef void apply_row(const char* x, Py_ssize_t xs, char* y, Py_ssize_t ys, Py_ssize_t n,
                    const double* mh, const double* ml, const double* rs, Py_ssize_t ss,
                    const double* w, const double* b, Py_ssize_t ps, int act,
                    const io_t* xtag, const io_t* ytag) noexcept nogil:
    """One inner row of n elements; ss/ps are 0 (broadcast) or 1 (per element)."""
    cdef double buf[CHUNK]
    cdef Py_ssize_t i0, m
    for i0 in range(0, n, CHUNK):
        m = min(CHUNK, n - i0)
        load_chunk(x + i0 * xs, xs, m, buf, xtag)
        scale_chunk_io(buf, m, mh + i0 * ss, ml + i0 * ss, rs + i0 * ss, ss != 0,
                       w + i0 * ps, b + i0 * ps, ps != 0, xtag)
        if act != ACT_NONE:
            activate(buf, m, act)
        store_chunk(y + i0 * ys, ys, m, buf, ytag)


cdef void apply_nd(const char* x, char* y, const double* mh, const double* ml, const double* rs,
                   const double* w, const double* b, Py_ssize_t* shape, Py_ssize_t* xs,
                   Py_ssize_t* ys, Py_ssize_t* ss, Py_ssize_t* ps, int act, int nthreads,
                   const io_t* tag) noexcept nogil:
    """4-d loop: dims 0..2 outer (flattened across threads), dim 3 the inner row."""
    cdef Py_ssize_t nrows = shape[0] * shape[1] * shape[2], r, i0, i1, i2, so, po
    cdef const char* xr
    cdef char* yr
    cdef int nt = nthreads if nrows * shape[3] >= SERIAL_WORK and nrows > 1 else 1
    for r in prange(nrows, nogil=True, num_threads=nt, schedule='static'):
        i2 = r % shape[2]
        i1 = (r // shape[2]) % shape[1]
        i0 = r // (shape[2] * shape[1])
        so = i0 * ss[0] + i1 * ss[1] + i2 * ss[2]
        po = i0 * ps[0] + i1 * ps[1] + i2 * ps[2]
        apply_row(x + i0 * xs[0] + i1 * xs[1] + i2 * xs[2], xs[3],
                  y + i0 * ys[0] + i1 * ys[1] + i2 * ys[2], ys[3], shape[3],
                  mh + so, ml + so, rs + so, ss[3], w + po, b + po, ps[3], act, tag, tag)


def apply_4d(cnp.ndarray x, Py_ssize_t xoff, cnp.ndarray y, Py_ssize_t yoff,
             const double[::1] mh, const double[::1] ml, const double[::1] rs, Py_ssize_t soff,
             const double[::1] w, const double[::1] b, Py_ssize_t poff,
             shape, xstrides, ystrides, sstrides, pstrides, int act, int nthreads):
    """Normalize a canonical 4-d view of x into y (same dtype).

    Offsets and x/y strides are in bytes; stats (``mh``, ``ml``, ``rs``) and
    parameter (``w``, ``b``) offsets/strides are in elements; the inner (last)
    stat/param stride must be 0 or 1.
    """
    cdef Py_ssize_t sh[4]
    cdef Py_ssize_t xs[4]
    cdef Py_ssize_t ys[4]
    cdef Py_ssize_t ss[4]
    cdef Py_ssize_t ps[4]
    cdef int i
    for i in range(4):
        sh[i] = shape[i]
        xs[i] = xstrides[i]
        ys[i] = ystrides[i]
        ss[i] = sstrides[i]
        ps[i] = pstrides[i]
    if ss[3] not in (0, 1) or ps[3] not in (0, 1):
        raise ValueError("apply_4d: inner stat/param strides must be 0 or 1")
    if x.dtype != y.dtype:
        raise TypeError("apply_4d: x and y must have the same dtype")
    if sh[0] * sh[1] * sh[2] * sh[3] == 0:
        return
    cdef const char* xp = <const char*>cnp.PyArray_DATA(x) + xoff
    cdef char* yp = <char*>cnp.PyArray_DATA(y) + yoff
    cdef const double* pmh = &mh[0] + soff
    cdef const double* pml = &ml[0] + soff
    cdef const double* prs = &rs[0] + soff
    cdef const double* pw = &w[0] + poff
    cdef const double* pb = &b[0] + poff
    cdef int typenum = cnp.PyArray_TYPE(x)
    with nogil:
        if typenum == cnp.NPY_FLOAT64:
            apply_nd(xp, yp, pmh, pml, prs, pw, pb, sh, xs, ys, ss, ps, act, nthreads, <const double*>NULL)
        elif typenum == cnp.NPY_FLOAT32:
            apply_nd(xp, yp, pmh, pml, prs, pw, pb, sh, xs, ys, ss, ps, act, nthreads, <const float*>NULL)
        elif typenum == cnp.NPY_FLOAT16:
            apply_nd(xp, yp, pmh, pml, prs, pw, pb, sh, xs, ys, ss, ps, act, nthreads, <const uint16_t*>NULL)
        else:
            with gil:
                raise TypeError(f"apply_4d: unsupported dtype {x.dtype}")

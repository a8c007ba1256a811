# Elementwise helpers of the normalization pass, shared (textually) by
# _apply.pyx (the generic strided pass) and _kernels.pyx (the fused rows pass).
# Arithmetic is float64, but for float16 data (float32, _apply_h32.h: scale_chunk_h32);
# halves convert with the _simd.h helpers.
cdef extern from "_apply_h32.h" nogil:
    double cn_h32_value(double x, double mh, double ml, double rs, double w, double b)

ctypedef fused io_t:
    uint16_t
    float
    double

DEF CHUNK = 256

# activation codes (must match norms.ACTIVATIONS)
DEF ACT_NONE = 0
DEF ACT_RELU = 1
DEF ACT_GELU = 2
DEF ACT_GELU_TANH = 3
DEF ACT_SILU = 4


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


cdef inline void store_chunk(char* y, Py_ssize_t ys, Py_ssize_t n, double* buf,
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


cdef inline void scale_chunk(double* buf, Py_ssize_t n,
                             const double* mh, const double* ml, const double* rs, bint svec,
                             const double* w, const double* b, bint pvec) noexcept nogil:
    """buf = (((buf - mh) - ml) * rs) * w + b with stats/params scalar or per element."""
    cdef Py_ssize_t i
    cdef double m0, m1, r0, w0, b0
    if not svec and not pvec:
        m0 = mh[0]
        m1 = ml[0]
        r0 = rs[0]
        w0 = w[0]
        b0 = b[0]
        for i in range(n):
            buf[i] = (((buf[i] - m0) - m1) * r0) * w0 + b0
    elif not svec:
        m0 = mh[0]
        m1 = ml[0]
        r0 = rs[0]
        for i in range(n):
            buf[i] = (((buf[i] - m0) - m1) * r0) * w[i] + b[i]
    elif not pvec:
        w0 = w[0]
        b0 = b[0]
        for i in range(n):
            buf[i] = (((buf[i] - mh[i]) - ml[i]) * rs[i]) * w0 + b0
    else:
        for i in range(n):
            buf[i] = (((buf[i] - mh[i]) - ml[i]) * rs[i]) * w[i] + b[i]


cdef inline void scale_chunk_h32(double* buf, Py_ssize_t n,
                                 const double* mh, const double* ml, const double* rs, bint svec,
                                 const double* w, const double* b, bint pvec) noexcept nogil:
    """scale_chunk for float16 data: each element by cn_h32_value (float32 arithmetic
    where the statistics and parameters are in range, see _apply_h32.h)."""
    cdef Py_ssize_t i, s, p
    for i in range(n):
        s = i if svec else 0
        p = i if pvec else 0
        buf[i] = cn_h32_value(buf[i], mh[s], ml[s], rs[s], w[p], b[p])


cdef inline void scale_chunk_io(double* buf, Py_ssize_t n,
                                const double* mh, const double* ml, const double* rs, bint svec,
                                const double* w, const double* b, bint pvec,
                                const io_t* tag) noexcept nogil:
    """scale_chunk, or scale_chunk_h32 for float16 data (``tag``: the dtype)."""
    if io_t is uint16_t:
        scale_chunk_h32(buf, n, mh, ml, rs, svec, w, b, pvec)
    else:
        scale_chunk(buf, n, mh, ml, rs, svec, w, b, pvec)


cdef inline double gelu(double v) noexcept nogil:
    return 0.5 * v * (1.0 + erf(v * 0.7071067811865476))


cdef inline double gelu_tanh(double v) noexcept nogil:
    return 0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))


cdef inline double silu(double v) noexcept nogil:
    return v / (1.0 + exp(-v))


cdef inline void activate(double* buf, Py_ssize_t n, int act) noexcept nogil:
    cdef Py_ssize_t i
    if act == ACT_RELU:
        for i in range(n):
            buf[i] = 0.0 if buf[i] < 0.0 else buf[i]   # NaN stays NaN
    elif act == ACT_GELU:
        for i in range(n):
            buf[i] = gelu(buf[i])
    elif act == ACT_GELU_TANH:
        for i in range(n):
            buf[i] = gelu_tanh(buf[i])
    elif act == ACT_SILU:
        for i in range(n):
            buf[i] = silu(buf[i])



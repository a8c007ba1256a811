# Small-call entries of _kernels.pyx (included there, so compiled once per ISA
# level with the kernels they call): layer/RMS norm and moments of small
# C-contiguous arrays, checked and run from C without the Python planning.
# Each returns None when a call is not eligible; the caller then takes the
# general path, which gives bitwise the same result (tests/test_small_calls.py).


cdef inline bint rows_eligible(object a, int typenum) noexcept:
    """a is an exact, aligned, native-order, C-contiguous ndarray of typenum."""
    return (type(a) is cnp.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)
            and cnp.PyArray_ISALIGNED(<cnp.ndarray>a)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a))


cdef inline object param_row(object p, Py_ssize_t L, double fill):
    """An affine parameter for the small-call path: a float64 (L,) array, or None
    when p is not a plain float64 vector of length L (the caller then takes the
    general path, which validates and converts)."""
    if p is None:
        return np.full(L, fill)
    if (rows_eligible(p, cnp.NPY_FLOAT64) and cnp.PyArray_NDIM(<cnp.ndarray>p) == 1
            and cnp.PyArray_DIM(<cnp.ndarray>p, 0) == L):
        return p
    return None


def norm_rows_small(object x, object out, double eps, int mode, object weight, object bias):
    """Layer (mode 0) / RMS (mode 1) norm over the last axis of a small array, with
    nothing but C between the call and the kernel.

    Eligible: x an exact ndarray, float16/32/64, C-contiguous, aligned, native
    byte order, ``1 <= x.ndim``, ``0 < x.size < SERIAL_WORK`` (so one thread);
    ``out`` None or an array like x that is x itself or does not overlap it;
    ``weight``/``bias`` None or float64 C-contiguous vectors of the last
    axis' length.  Returns the output, or None when the call is not eligible:
    the caller then runs the general path, which gives the same result.
    """
    if type(x) is not cnp.ndarray:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int typenum = cnp.PyArray_TYPE(xa)
    cdef int nd = cnp.PyArray_NDIM(xa)
    if (typenum != cnp.NPY_FLOAT64 and typenum != cnp.NPY_FLOAT32
            and typenum != cnp.NPY_FLOAT16) or nd < 1 or not rows_eligible(xa, typenum):
        return None
    cdef Py_ssize_t size = cnp.PyArray_SIZE(xa), L = cnp.PyArray_DIM(xa, nd - 1)
    if size <= 0 or size >= SERIAL_WORK:
        return None
    cdef Py_ssize_t R = size // L, nbytes = size * cnp.PyArray_ITEMSIZE(xa)
    cdef int i
    cdef cnp.ndarray ya
    cdef char* xp = <char*>cnp.PyArray_DATA(xa)
    cdef char* yp
    if out is None:
        ya = cnp.PyArray_EMPTY(nd, cnp.PyArray_DIMS(xa), typenum, 0)
    else:
        if not rows_eligible(out, typenum) or cnp.PyArray_NDIM(<cnp.ndarray>out) != nd:
            return None
        ya = <cnp.ndarray>out
        if not cnp.PyArray_ISWRITEABLE(ya):
            return None
        for i in range(nd):
            if cnp.PyArray_DIM(ya, i) != cnp.PyArray_DIM(xa, i):
                return None
        yp = <char*>cnp.PyArray_DATA(ya)
        if yp != xp and yp < xp + nbytes and xp < yp + nbytes:
            return None   # partial overlap: the general path copies
    cdef object w1, b1
    cdef Py_ssize_t psub = L
    if weight is None and bias is None:
        w1, b1 = _ONE_ROW, _ZERO_ROW
    else:
        w1 = param_row(weight, L, 1.0)
        b1 = param_row(bias, L, 0.0)
        if w1 is None or b1 is None:
            return None
        psub = 1
    cdef const double[::1] w = w1
    cdef const double[::1] b = b1
    cdef double small_m[64]
    cdef double small_v[64]
    cdef double* mean = small_m
    cdef double* var = small_v
    if R > 64:
        mean = <double*>malloc(2 * R * sizeof(double))
        if mean == NULL:
            raise MemoryError()
        var = mean + R
    yp = <char*>cnp.PyArray_DATA(ya)
    with nogil:
        if typenum == cnp.NPY_FLOAT64:
            norm_rows_t(<const double*>xp, <double*>yp, R, L, L * 8, L * 8, eps, mode, &w[0],
                        &b[0], psub, 1, 0, ACT_NONE, mean, var, 1)
        elif typenum == cnp.NPY_FLOAT32:
            norm_rows_t(<const float*>xp, <float*>yp, R, L, L * 4, L * 4, eps, mode, &w[0],
                        &b[0], psub, 1, 0, ACT_NONE, mean, var, 1)
        else:
            norm_rows_t(<const uint16_t*>xp, <uint16_t*>yp, R, L, L * 2, L * 2, eps, mode, &w[0],
                        &b[0], psub, 1, 0, ACT_NONE, mean, var, 1)
    if R > 64:
        free(mean)
    return ya


def moments_small(object x, bint all_axes, double ddof, bint float64_out=False):
    """Float64 (mean, var) of a small array over its last axis (or over all of it),
    with nothing but C between the call and the kernel.

    Eligible: x an exact, aligned, native-order, C-contiguous float16/32/64
    ndarray with ``0 < x.size < SERIAL_WORK`` and more than ``ddof`` values per
    slice (no warning to give).  The slices are planned as the general path
    plans them (``x[1, 1, R, L]``), so the result is bitwise the same.  Returns
    ``(mean, var)`` of shape ``x.shape[:-1]`` (``()`` with ``all_axes``),
    float32 for float32 input (unless ``float64_out``) and float64 otherwise,
    or None when the call is not eligible.
    """
    if type(x) is not cnp.ndarray:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int typenum = cnp.PyArray_TYPE(xa)
    cdef int nd = cnp.PyArray_NDIM(xa)
    if (typenum != cnp.NPY_FLOAT64 and typenum != cnp.NPY_FLOAT32
            and typenum != cnp.NPY_FLOAT16) or nd < 1 or not rows_eligible(xa, typenum):
        return None
    cdef Py_ssize_t size = cnp.PyArray_SIZE(xa)
    cdef Py_ssize_t L = size if all_axes else cnp.PyArray_DIM(xa, nd - 1)
    if size <= 0 or size >= SERIAL_WORK or not (L > ddof) or not (ddof >= 0):
        return None
    cdef Py_ssize_t R = size // L, i
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(xa)
    cdef Py_ssize_t shape[4]
    cdef Py_ssize_t strides[4]
    shape[0] = 1; shape[1] = 1; shape[2] = R; shape[3] = L
    strides[0] = 0; strides[1] = 0; strides[2] = L * item; strides[3] = item
    # float32 results are rounded here (a C cast rounds once, like numpy's);
    # float16 ones are returned in float64 for numpy to round (directly, not via float32)
    cdef int otype = (cnp.NPY_FLOAT32 if typenum == cnp.NPY_FLOAT32 and not float64_out
                      else cnp.NPY_FLOAT64)
    cdef cnp.ndarray mean = cnp.PyArray_EMPTY(0 if all_axes else nd - 1, cnp.PyArray_DIMS(xa),
                                              otype, 0)
    cdef cnp.ndarray var = cnp.PyArray_EMPTY(0 if all_axes else nd - 1, cnp.PyArray_DIMS(xa),
                                             otype, 0)
    cdef double m, v
    cdef State small[16]
    cdef State* st = small
    if R > 16:
        st = <State*>malloc(R * sizeof(State))
        if st == NULL:
            raise MemoryError()
    cdef char* xp = <char*>cnp.PyArray_DATA(xa)
    cdef double* mp = <double*>cnp.PyArray_DATA(mean)
    cdef double* vp = <double*>cnp.PyArray_DATA(var)
    with nogil:
        memset(st, 0, R * sizeof(State))
        if typenum == cnp.NPY_FLOAT64:
            rows_kernel(<const double*>xp, shape, strides, 0, 1, st, 1)
        elif typenum == cnp.NPY_FLOAT32:
            rows_kernel(<const float*>xp, shape, strides, 0, 1, st, 1)
        else:
            rows_kernel(<const uint16_t*>xp, shape, strides, 0, 1, st, 1)
        for i in range(R):
            if otype == cnp.NPY_FLOAT32:
                state_finalize(&st[i], ddof, &m, &v)
                (<float*>mp)[i] = <float>m
                (<float*>vp)[i] = <float>v
            else:
                state_finalize(&st[i], ddof, &mp[i], &vp[i])
    if R > 16:
        free(st)
    return mean, var


_ONE_ROW = np.ones(1)
_ZERO_ROW = np.zeros(1)

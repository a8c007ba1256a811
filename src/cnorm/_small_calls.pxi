# C entries of _kernels.pyx (included there, so compiled once per ISA level
# with the kernels they call) for the common calls on C-contiguous arrays:
# layer / RMS / group / instance norm, batch norm in training, moments.  They
# check the arguments and run the kernels from C, without the Python planning
# that costs more than the kernels on small arrays.
# Each returns None when a call is not eligible; the caller then takes the
# general path, which gives bitwise the same result (tests/test_small_calls.py).


include "_entry_args.pxi"


cdef int float_input(object x, int min_nd, int max_nd) noexcept:
    """The type number of ``x`` when it is an array the C entries take -- an
    exact, aligned, native-order, C-contiguous float16/32/64 ndarray with
    ``min_nd`` to ``max_nd`` dimensions (no upper bound when ``max_nd < 0``) --
    else -1."""
    if type(x) is not cnp.ndarray:
        return -1
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>x), nd = cnp.PyArray_NDIM(<cnp.ndarray>x)
    if ((t != cnp.NPY_FLOAT64 and t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT16)
            or nd < min_nd or (max_nd >= 0 and nd > max_nd) or not rows_eligible(x, t)):
        return -1
    return t


def prefault_output(cnp.ndarray y, int nthreads):
    """``prefault_pages`` for a new output array of the general path."""
    if cnp.PyArray_IS_C_CONTIGUOUS(y) or cnp.PyArray_IS_F_CONTIGUOUS(y):
        with nogil:
            prefault_pages(<char*>cnp.PyArray_DATA(y), cnp.PyArray_NBYTES(y), nthreads)


def norm_rows_contig(object x, object out, double eps, int mode, object weight, object bias,
                     Py_ssize_t groups, bint want_stats, int nthreads):
    """Layer / RMS / group / instance norm of a C-contiguous array as rows, with
    nothing but C between the call and the fused rows kernel.

    ``groups == 0``: layer (mode 0) or RMS (mode 1) norm over the last axis,
    ``weight``/``bias`` of its length.  ``groups > 0``: group norm (mode 0) of
    ``(N, C, ...)`` with ``groups`` groups of channels (instance norm: ``groups
    == C``): each (sample, group) is one contiguous row, ``weight``/``bias`` of
    length C.  Eligible: x an exact ndarray, float16/32/64, C-contiguous,
    aligned, native byte order, ``0 < x.size``; ``out`` None or an array like x
    that is x itself or does not overlap it; ``weight``/``bias`` None or float
    vectors (``param_row``); ``groups`` dividing C.  The rows and parameter
    indexing are those the general path gives the same kernel, so the result
    is bitwise the same.  ``nthreads``: the thread count the caller resolved
    (results do not depend on it).  Returns the output, or None when the call
    is not eligible: the caller then runs the general path.  With
    ``want_stats``: ``(y, mean, rstd)``, float64 of shape ``(R,)``: what the
    general path returns from its ``_fused_rows`` statistics (the row mean and
    ``1 / sqrt(var + eps)`` of the biased variance; group and instance norm: the
    mean plus 0.0 where finite, the general path's ``_mean(mean, 0)``), computed
    here by the same IEEE operations.
    """
    cdef int typenum = float_input(x, 2 if groups else 1, -1)
    if typenum < 0 or groups < 0:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(xa)
    cdef Py_ssize_t size = cnp.PyArray_SIZE(xa), L, C = 0, hw = 1
    if size <= 0:
        return None
    if groups:
        C = cnp.PyArray_DIM(xa, 1)
        if C % groups:
            return None
        hw = size // (C * cnp.PyArray_DIM(xa, 0))
        L = (C // groups) * hw
    else:
        L = cnp.PyArray_DIM(xa, nd - 1)
    cdef Py_ssize_t R = size // L
    cdef object y = output_like(xa, out, nthreads)
    if y is None:
        return None
    cdef cnp.ndarray ya = <cnp.ndarray>y
    cdef char* xp = <char*>cnp.PyArray_DATA(xa)
    cdef char* yp
    cdef object w1, b1
    # parameter of element i of row r: (r % pmod) * pmul + i // psub
    cdef Py_ssize_t psub = L, pmod = 1, pmul = 0
    if weight is None and bias is None:
        w1, b1 = _ONE_ROW, _ZERO_ROW
    else:
        w1 = param_row(weight, C if groups else L, 1.0)
        b1 = param_row(bias, C if groups else L, 0.0)
        if w1 is None or b1 is None:
            return None
        if groups:
            psub, pmod, pmul = hw, groups, C // groups
        else:
            psub = 1
    cdef const double[::1] w = w1
    cdef const double[::1] b = b1
    cdef double small_m[64]
    cdef double small_v[64]
    cdef double* mean = small_m
    cdef double* var = small_v
    cdef cnp.ndarray mean_a, var_a
    cdef cnp.npy_intp rdim = R
    cdef bint owned = False
    if want_stats:
        mean_a = cnp.PyArray_EMPTY(1, &rdim, cnp.NPY_FLOAT64, 0)
        var_a = cnp.PyArray_EMPTY(1, &rdim, cnp.NPY_FLOAT64, 0)
        mean = <double*>cnp.PyArray_DATA(mean_a)
        var = <double*>cnp.PyArray_DATA(var_a)
    elif R > 64:
        mean = <double*>malloc(2 * R * sizeof(double))
        if mean == NULL:
            raise MemoryError()
        var = mean + R
        owned = True
    yp = <char*>cnp.PyArray_DATA(ya)
    with nogil:
        if typenum == cnp.NPY_FLOAT64:
            norm_rows_t(<const double*>xp, <double*>yp, R, L, L * 8, L * 8, eps, mode, &w[0],
                        &b[0], psub, pmod, pmul, ACT_NONE, mean, var, nthreads)
        elif typenum == cnp.NPY_FLOAT32:
            norm_rows_t(<const float*>xp, <float*>yp, R, L, L * 4, L * 4, eps, mode, &w[0],
                        &b[0], psub, pmod, pmul, ACT_NONE, mean, var, nthreads)
        else:
            norm_rows_t(<const uint16_t*>xp, <uint16_t*>yp, R, L, L * 2, L * 2, eps, mode, &w[0],
                        &b[0], psub, pmod, pmul, ACT_NONE, mean, var, nthreads)
    if owned:
        free(mean)
    cdef Py_ssize_t i
    if want_stats:
        for i in range(R):
            var[i] = 1.0 / sqrt(var[i] + eps)
            if groups and isfinite(mean[i]):
                mean[i] = mean[i] + 0.0   # as _mean(mean, 0) (-0.0 -> +0.0; the kernel gives +0.0)
        return ya, mean_a, var_a
    return ya


DEF MAX_DIMS = 32   # arrays with more dimensions take the general path


cdef int flag_axes(object axis, int nd, bint* red) except -1:
    """Flag in red[0:nd] the axes that ``axis`` names: None (all), an int or a
    tuple of ints, NumPy's negative indices allowed.  0 when ``axis`` is
    anything else, out of range or repeated: the general path then raises its
    error."""
    cdef int i, a
    for i in range(nd):
        red[i] = axis is None
    if axis is None:
        return 1
    cdef tuple items = (axis,) if type(axis) is int else axis if type(axis) is tuple else None
    if items is None:
        return 0
    for item in items:
        if type(item) is not int or not (-nd <= item < nd):
            return 0
        a = <int>item + nd if item < 0 else <int>item
        if red[a]:
            return 0
        red[a] = True
    return 1


cdef bint contiguous_plan(cnp.ndarray xa, const bint* red, Py_ssize_t* shape, Py_ssize_t* strides,
                          Py_ssize_t* so, Py_ssize_t* sk) noexcept:
    """The canonical view ``x[o, r1, k, r0]`` (byte strides; ``so``, ``sk`` the
    state strides of ``o`` and ``k``) of the reduction of C-contiguous ``xa``
    over the flagged axes: the plan ``_axes.plan_reduction`` makes for it.
    Size-1 axes are dropped and neighbours of one kind merge (in C order they
    always can), giving alternating runs of reduced and kept axes; the runs
    fill R0, K, R1, O (innermost run reduced) or K, R1, O (kept) from the
    inside.  False when the runs do not fit (the plan has outer loops)."""
    cdef int nd = cnp.PyArray_NDIM(xa), ax, ng = 0, first, g
    cdef Py_ssize_t n, xstride = cnp.PyArray_ITEMSIZE(xa), sstride = 1
    cdef Py_ssize_t gsize[4]
    cdef Py_ssize_t gstride[4]
    cdef Py_ssize_t gstate[4]
    cdef bint inner_red = False, prev = False
    for ax in range(nd - 1, -1, -1):            # innermost first
        n = cnp.PyArray_DIM(xa, ax)
        if n != 1:
            if ng == 0 or red[ax] != prev:
                if ng == 4:
                    return False
                if ng == 0:
                    inner_red = red[ax]
                gsize[ng] = n
                gstride[ng] = xstride
                gstate[ng] = 0 if red[ax] else sstride
                prev = red[ax]
                ng += 1
            else:
                gsize[ng - 1] *= n
        xstride *= n
        if not red[ax]:
            sstride *= n
    # slots of the runs, innermost first: 3 = R0, 2 = K, 1 = R1, 0 = O
    first = 3 if inner_red else 2
    if ng > first + 1:
        return False
    for g in range(4):
        shape[g] = 1
        strides[g] = 0
    so[0] = 0
    sk[0] = 0
    for g in range(ng):
        shape[first - g] = gsize[g]
        strides[first - g] = gstride[g]
        if first - g == 2:
            sk[0] = gstate[g]
        elif first - g == 0:
            so[0] = gstate[g]
    return True


def moments_contig(object x, object axis, double ddof, bint float64_out, int nthreads):
    """Float64 (mean, var) of a C-contiguous array over ``axis``, with nothing
    but C between the call and the kernel.

    Eligible: x an exact, aligned, native-order, C-contiguous float16/32/64
    ndarray with ``0 < x.size``, at most 32 dimensions, ``axis`` None, an int
    or a tuple of ints that ``_axes.normalize_axes`` accepts, a reduction that
    plans without outer loops (every reduction over one or two runs of
    neighbouring axes: last axis, all axes, axis 0, NCHW ``(0, 2, 3)``...),
    and more than ``ddof`` values per slice (no warning to give).  The
    canonical view is the general path's plan, so the result is bitwise the
    same.  ``nthreads`` is the thread count the caller resolved (results do
    not depend on it).  Returns ``(mean, var)`` of the kept shape, float32 for
    float32 input (unless ``float64_out``) and float64 otherwise, or None when
    the call is not eligible.
    """
    cdef int typenum = float_input(x, 1, MAX_DIMS)
    if typenum < 0:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(xa), ax, nk = 0
    cdef Py_ssize_t size = cnp.PyArray_SIZE(xa), L = 1, R, i
    cdef bint red[MAX_DIMS]
    cdef cnp.npy_intp kept[MAX_DIMS]
    cdef Py_ssize_t shape[4]
    cdef Py_ssize_t strides[4]
    cdef Py_ssize_t so, sk
    if size <= 0 or not flag_axes(axis, nd, red):
        return None
    for ax in range(nd):
        if red[ax]:
            L *= cnp.PyArray_DIM(xa, ax)
        else:
            kept[nk] = cnp.PyArray_DIM(xa, ax)
            nk += 1
    if not (L > ddof) or not (ddof >= 0) or not contiguous_plan(xa, red, shape, strides, &so, &sk):
        return None
    R = size // L
    # float32 results are rounded here (a C cast rounds once, like numpy's);
    # float16 ones are returned in float64 for numpy to round (directly, not via float32)
    cdef int otype = (cnp.NPY_FLOAT32 if typenum == cnp.NPY_FLOAT32 and not float64_out
                      else cnp.NPY_FLOAT64)
    cdef cnp.ndarray mean = cnp.PyArray_EMPTY(nk, kept, otype, 0)
    cdef cnp.ndarray var = cnp.PyArray_EMPTY(nk, kept, otype, 0)
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
            run_moments(<const double*>xp, shape, strides, so, sk, st, nthreads)
        elif typenum == cnp.NPY_FLOAT32:
            run_moments(<const float*>xp, shape, strides, so, sk, st, nthreads)
        else:
            run_moments(<const uint16_t*>xp, shape, strides, so, sk, st, nthreads)
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


def batch_norm_contig(object x, object out, bint channels_last, double eps, object weight,
                      object bias, int nthreads):
    """Batch norm in training mode (batch statistics, no activation) of a
    C-contiguous array, with nothing but C between the call and the kernels.

    Eligible: x an exact, aligned, native-order, C-contiguous float16/32/64
    ndarray with ``2 <= x.ndim <= 32`` and more than one value per channel;
    the channel axis is the last (``channels_last``) or axis 1; ``out`` as in
    ``norm_rows_contig``; ``weight``/``bias`` None or float vectors of the
    channel count (``param_row``).  The statistics are those of
    ``moments_contig`` over every axis but the channel one (the general path's
    plan) and the output pass is the general path's ``scale_rows`` call, so the
    result is bitwise the same.  ``nthreads``: as in ``moments_contig``.

    Returns ``(y, stats)`` with ``stats`` float64 of shape (5, C): per channel
    the mean as a double-double (high, low), the biased variance (from which
    the caller updates running statistics), ``1 / sqrt(var + eps)`` and the
    mean as one double (``high + low`` where finite, else ``high``: the general
    path's ``_mean``); or None when the call is not eligible.
    """
    cdef int typenum = float_input(x, 2, MAX_DIMS)
    if typenum < 0:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(xa), ax
    cdef int c_ax = nd - 1 if channels_last else 1
    cdef Py_ssize_t size = cnp.PyArray_SIZE(xa), C = cnp.PyArray_DIM(xa, c_ax)
    if size <= 0 or size // C <= 1:
        return None
    cdef bint red[MAX_DIMS]
    cdef Py_ssize_t shape[4]
    cdef Py_ssize_t strides[4]
    cdef Py_ssize_t so, sk
    for ax in range(nd):
        red[ax] = ax != c_ax
    if not contiguous_plan(xa, red, shape, strides, &so, &sk):
        return None
    cdef object y = output_like(xa, out, nthreads)
    if y is None:
        return None
    # the output pass as the general path's _scale_rows lays it out
    cdef bint sper = c_ax == nd - 1
    cdef Py_ssize_t L = C if sper else size // (C * cnp.PyArray_DIM(xa, 0)), R = size // L
    cdef Py_ssize_t psub = 1, pmod = 1, pmul = 0
    cdef object w1, b1
    if sper:
        w1 = param_row(weight, C, 1.0)
        b1 = param_row(bias, C, 0.0)
    elif weight is None and bias is None:
        w1, b1, psub = _ONE_ROW, _ZERO_ROW, L
    else:
        w1 = param_row(weight, C, 1.0)
        b1 = param_row(bias, C, 0.0)
        psub, pmod, pmul = L, C, 1
    if w1 is None or b1 is None:
        return None
    cdef const double[::1] w = w1
    cdef const double[::1] b = b1
    cdef cnp.ndarray ya = <cnp.ndarray>y
    cdef cnp.npy_intp sdims[2]
    sdims[0] = 5
    sdims[1] = C
    cdef cnp.ndarray stats = cnp.PyArray_EMPTY(2, sdims, cnp.NPY_FLOAT64, 0)
    cdef double* mh = <double*>cnp.PyArray_DATA(stats)
    cdef double* ml = mh + C
    cdef double* var = mh + 2 * C
    cdef double* rs = mh + 3 * C
    cdef double* mean = mh + 4 * C
    cdef State* st = <State*>calloc(C, sizeof(State))
    if st == NULL:
        raise MemoryError()
    cdef char* xp = <char*>cnp.PyArray_DATA(xa)
    cdef char* yp = <char*>cnp.PyArray_DATA(ya)
    cdef Py_ssize_t rowbytes = L * cnp.PyArray_ITEMSIZE(xa), i
    with nogil:
        if typenum == cnp.NPY_FLOAT64:
            run_moments(<const double*>xp, shape, strides, so, sk, st, nthreads)
        elif typenum == cnp.NPY_FLOAT32:
            run_moments(<const float*>xp, shape, strides, so, sk, st, nthreads)
        else:
            run_moments(<const uint16_t*>xp, shape, strides, so, sk, st, nthreads)
        for i in range(C):
            state_norm_stats(&st[i], &mh[i], &ml[i], &var[i])
            rs[i] = 1.0 / sqrt(var[i] + eps)
            mean[i] = mh[i] + ml[i] if isfinite(mh[i]) else mh[i]
        free(st)
        if typenum == cnp.NPY_FLOAT64:
            scale_rows_t(<const double*>xp, <double*>yp, R, L, rowbytes, rowbytes, mh, ml, rs,
                         C, sper, &w[0], &b[0], psub, pmod, pmul, ACT_NONE, nthreads)
        elif typenum == cnp.NPY_FLOAT32:
            scale_rows_t(<const float*>xp, <float*>yp, R, L, rowbytes, rowbytes, mh, ml, rs,
                         C, sper, &w[0], &b[0], psub, pmod, pmul, ACT_NONE, nthreads)
        else:
            scale_rows_t(<const uint16_t*>xp, <uint16_t*>yp, R, L, rowbytes, rowbytes, mh, ml,
                         rs, C, sper, &w[0], &b[0], psub, pmod, pmul, ACT_NONE, nthreads)
    return ya, stats


_ONE_ROW = np.ones(1)
_ZERO_ROW = np.zeros(1)

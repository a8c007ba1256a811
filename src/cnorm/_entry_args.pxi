# Argument helpers of the small-call C entries, shared by _small_calls.pxi
# (_kernels.pyx) and the backward entries of _backward.pyx: each module includes
# this file, so both are compiled once per ISA level with the same rules.


cdef inline bint rows_eligible(object a, int typenum) noexcept:
    """a is an exact, aligned, native-order, C-contiguous ndarray of typenum."""
    return (type(a) is cnp.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)
            and cnp.PyArray_ISALIGNED(<cnp.ndarray>a)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a))


cdef inline object param_row(object p, Py_ssize_t L, double fill):
    """An affine parameter for the C entries: a C-contiguous float64 (L,) array
    (``fill`` everywhere for None; float16 / float32 vectors converted, exactly, as
    the general path converts them), or None when p is not a float ndarray of shape
    (L,) (the caller then takes the general path, which validates and converts)."""
    if p is None:
        return np.full(L, fill)
    if type(p) is not cnp.ndarray or cnp.PyArray_NDIM(<cnp.ndarray>p) != 1 \
            or cnp.PyArray_DIM(<cnp.ndarray>p, 0) != L:
        return None
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>p)
    if t == cnp.NPY_FLOAT64 and rows_eligible(p, t):
        return p
    if t == cnp.NPY_FLOAT64 or t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT16:
        return np.ascontiguousarray(p, dtype=np.float64)
    return None


DEF PREFAULT_MIN_BYTES = 32 * 1024 * 1024   # glibc's largest mmap threshold


cdef void prefault_pages(char* p, Py_ssize_t nbytes, int nthreads) noexcept nogil:
    """Touch one byte per 4 KiB page of a new output before threads write it.

    Outputs of 32 MiB and more are fresh mmap pages on every call (glibc's mmap
    threshold never grows past 32 MiB), which the kernel's first writes fault in.
    Two threads faulting transparent huge pages of one mapping at once stalled:
    layer_norm of a (5120, 1024) float64 array allocating its output, 2 threads,
    AMD EPYC Zen 4 VM, took 6.5 ms median but 52 ms at the 90th percentile, 9 ms
    with the pages faulted in first by one thread.  One thread faults them as it
    writes anyway: nothing to do then.  (The pages land on the caller's NUMA node.)
    """
    cdef Py_ssize_t off
    if nthreads > 1 and nbytes >= PREFAULT_MIN_BYTES:
        for off in range(0, nbytes, 4096):
            p[off] = 0


cdef object output_like(cnp.ndarray xa, object out, int nthreads):
    """The output array of a small-call entry: a new array like ``xa`` when
    ``out`` is None (its pages faulted in first when threads will write it:
    ``prefault_pages``), else ``out`` when it is an eligible array of xa's dtype
    and shape (aligned, native order, C-contiguous, writeable) that is ``xa``
    itself or does not overlap it.  None otherwise (the general path copies, or
    raises its error)."""
    cdef int typenum = cnp.PyArray_TYPE(xa), nd = cnp.PyArray_NDIM(xa), i
    cdef cnp.ndarray fresh
    if out is None:
        fresh = cnp.PyArray_EMPTY(nd, cnp.PyArray_DIMS(xa), typenum, 0)
        with nogil:
            prefault_pages(<char*>cnp.PyArray_DATA(fresh), cnp.PyArray_NBYTES(fresh), nthreads)
        return fresh
    if not rows_eligible(out, typenum) or cnp.PyArray_NDIM(<cnp.ndarray>out) != nd:
        return None
    cdef cnp.ndarray ya = <cnp.ndarray>out
    if not cnp.PyArray_ISWRITEABLE(ya):
        return None
    for i in range(nd):
        if cnp.PyArray_DIM(ya, i) != cnp.PyArray_DIM(xa, i):
            return None
    cdef Py_ssize_t nbytes = cnp.PyArray_NBYTES(xa)
    cdef char* xp = <char*>cnp.PyArray_DATA(xa)
    cdef char* yp = <char*>cnp.PyArray_DATA(ya)
    if yp != xp and yp < xp + nbytes and xp < yp + nbytes:
        return None   # partial overlap
    return ya

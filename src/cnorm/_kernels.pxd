# Declarations other Cython code may cimport (``from cnorm._kernels cimport ...``).
#
# A moments state holds the statistics of one slice as double-double numbers:
# n (count or sum of weights), the mean (mh + ml) and the sum of squared
# deviations from the mean M2 (qh + ql).  States merge with Chan's formula.
from libc.stdint cimport uint16_t

cdef struct State:
    double n
    double mh
    double ml
    double qh
    double ql

ctypedef fused src_t:
    uint16_t
    float
    double

cdef void state_merge(State* a, const State* b) noexcept nogil
cdef void state_finalize(const State* s, double ddof, double* mean, double* var) noexcept nogil
cdef void block_moments(const src_t* base, Py_ssize_t nrows, Py_ssize_t rowlen,
                        Py_ssize_t rstride, Py_ssize_t estride, State* out) noexcept nogil
cdef void moments_1d_f64(const double* x, Py_ssize_t n, Py_ssize_t stride, State* out) noexcept nogil
cdef void moments_1d_f32(const float* x, Py_ssize_t n, Py_ssize_t stride, State* out) noexcept nogil

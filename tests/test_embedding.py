"""Embedding: cnorm's kernels called from the user's own Numba and Cython code.

* Numba: the ``@njit`` helpers of :mod:`cnorm._numba` (``moments_1d``,
  ``state_merge``, ``state_finalize``, ``merge_states``, ``finalize``,
  ``half_to_f64``) are called from functions compiled here.
* Cython: a small ``.pyx`` written to a temporary directory does
  ``from cnorm._kernels cimport State, moments_1d_f64, ...``, is built with
  ``cythonize`` + setuptools in a subprocess and imported; its functions call
  the kernels inside ``with nogil``.

Every result is checked against exact rational arithmetic (``Fraction``) of
the stored inputs: mean within 1 ulp, variance within 2 ulp (float64), 1 ulp
of float32 for float32/float16 data.
"""
import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import numpy as np
import pytest

import cnorm
from conftest import require

SIZES = [1, 2, 7, 100, 2047, 2048, 2049, 5000]


def exact(values, ddof=0):
    f = [Fraction(float(v)) for v in np.asarray(values).astype(np.float64).ravel()]
    n = len(f)
    m = sum(f) / n
    return m, sum((v - m) ** 2 for v in f) / (n - ddof)


def assert_ulps(got, ex, dt, k):
    """|got - exact| <= k ulp of ``dt`` at |exact| (got is compared in exact arithmetic)."""
    ex_f = float(ex)
    ulp = float(np.spacing(np.array(abs(ex_f), dtype=dt))) if ex_f else 0.0
    ulp = max(ulp, float(np.finfo(dt).smallest_subnormal))
    err = abs(Fraction(float(got)) - ex)
    assert err <= k * Fraction(ulp), f"got {float(got)!r}, exact {ex_f!r}: {float(err) / ulp:.2f} ulp"


def offset_data(rng, n, dt, offset=1e6, scale=1.0):
    return (offset + scale * rng.standard_normal(n)).astype(dt)


# ------------------------------------------------------------------ Numba
@pytest.fixture(scope="module")
def nb():
    numba = require("numba")
    import cnorm._numba as cn

    @numba.njit
    def chunked(x, nchunks, ddof):
        """Moments of x from nchunks pieces merged in the user's own loop."""
        total = np.zeros(5)
        n = x.shape[0]
        for i in range(nchunks):
            lo = i * n // nchunks
            hi = (i + 1) * n // nchunks
            if hi > lo:
                cn.state_merge(total, cn.moments_1d(x[lo:hi]))
        return cn.state_finalize(total, ddof)

    @numba.njit
    def zscore_last(x):
        mean, var = cn.state_finalize(cn.moments_1d(x), 0.0)
        return (x[-1] - mean) / np.sqrt(var)

    @numba.njit(nogil=True)
    def row_moments(x, ddof):
        """Per-row statistics; nogil, so Python threads run it concurrently."""
        states = np.zeros((x.shape[0], 5))
        for r in range(x.shape[0]):
            s = cn.moments_1d(x[r])
            for j in range(5):
                states[r, j] = s[j]
        mean = np.empty(x.shape[0])
        var = np.empty(x.shape[0])
        cn.finalize(states, ddof, mean, var)
        return mean, var

    @numba.njit
    def pairwise(x, ddof):
        """Tree of merges over two halves with merge_states (rows of 5)."""
        half = x.shape[0] // 2
        a = np.empty((1, 5))
        b = np.empty((1, 5))
        a[0] = cn.moments_1d(x[:half])
        b[0] = cn.moments_1d(x[half:])
        cn.merge_states(a, b)
        return cn.state_finalize(a[0], ddof)

    @numba.njit
    def half_sum(bits):
        s = 0.0
        for i in range(bits.shape[0]):
            s += cn.half_to_f64(bits[i])
        return s

    return dict(chunked=chunked, zscore_last=zscore_last, row_moments=row_moments,
                pairwise=pairwise, half_sum=half_sum, cn=cn)


def test_numba_helpers_are_public(nb):
    cn = nb["cn"]
    for name in ("moments_1d", "state_merge", "state_finalize", "merge_states", "finalize",
                 "half_to_f64"):
        assert name in cn.__all__, name


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("nchunks", [1, 3])
def test_numba_user_function_float64(nb, n, nchunks):
    x = offset_data(np.random.default_rng(n), n, np.float64)
    for ddof in (0, 1) if n > 1 else (0,):
        m, v = nb["chunked"](x, nchunks, float(ddof))
        ex_m, ex_v = exact(x, ddof)
        assert_ulps(m, ex_m, np.float64, 1)
        assert_ulps(v, ex_v, np.float64, 2)


@pytest.mark.parametrize("n", [3, 2049, 5000])
def test_numba_strided_float32_and_float16(nb, n):
    rng = np.random.default_rng(100 + n)
    x64 = offset_data(rng, 3 * n, np.float64, offset=300.0)[::3]         # strided view
    m, v = nb["chunked"](x64, 2, 1.0)
    ex_m, ex_v = exact(x64, 1)
    assert_ulps(m, ex_m, np.float64, 1)
    assert_ulps(v, ex_v, np.float64, 2)
    x32 = offset_data(rng, n, np.float32, offset=300.0)
    m, v = nb["chunked"](x32[::-1], 1, 0.0)                             # negative stride
    ex_m, ex_v = exact(x32)
    assert_ulps(np.float32(m), ex_m, np.float32, 1)
    assert_ulps(np.float32(v), ex_v, np.float32, 1)
    x16 = offset_data(rng, n, np.float16, offset=30.0)
    m, v = nb["chunked"](x16.view(np.uint16), 2, 0.0)                   # float16 as its bits
    ex_m, ex_v = exact(x16)
    assert_ulps(np.float16(m), ex_m, np.float16, 1)
    assert_ulps(np.float16(v), ex_v, np.float16, 1)


def test_numba_threads_merge_states_and_halves(nb):
    rng = np.random.default_rng(7)
    x = offset_data(rng, 24 * 300, np.float64, offset=-5e7).reshape(24, 300)
    with ThreadPoolExecutor(4) as pool:      # the user's nogil code on several threads
        parts = list(pool.map(lambda r: nb["row_moments"](x[r:r + 6], 1.0), range(0, 24, 6)))
    mean = np.concatenate([p[0] for p in parts])
    var = np.concatenate([p[1] for p in parts])
    for r in range(x.shape[0]):
        ex_m, ex_v = exact(x[r], 1)
        assert_ulps(mean[r], ex_m, np.float64, 1)
        assert_ulps(var[r], ex_v, np.float64, 2)
    y = offset_data(rng, 4099, np.float64)
    m, v = nb["pairwise"](y, 0.0)
    ex_m, ex_v = exact(y)
    assert_ulps(m, ex_m, np.float64, 1)
    assert_ulps(v, ex_v, np.float64, 2)
    # the same numbers as the library's own numba backend
    assert (m, v) == tuple(float(t) for t in cnorm.moments(y, backend="numba"))
    h = np.array([1.5, -2.25, 65504.0, 2.0 ** -24], dtype=np.float16)
    assert nb["half_sum"](h.view(np.uint16)) == math.fsum(h.astype(np.float64))


def test_numba_docstring_example(nb):
    assert nb["zscore_last"](np.array([1.0, 2.0, 3.0])) == pytest.approx(1.224744871391589,
                                                                          rel=1e-15)


def test_numba_state_edge_cases(nb):
    cn = nb["cn"]
    m, v = cn.state_finalize(np.zeros(5), 0.0)                     # empty
    assert math.isnan(m) and math.isnan(v)
    m, v = cn.state_finalize(cn.moments_1d(np.array([4.0])), 1.0)  # ddof >= n, M2 == 0
    assert m == 4.0 and math.isnan(v)
    m, v = cn.state_finalize(cn.moments_1d(np.full(3000, 0.1)), 0.0)
    assert m == 0.1 and v == 0.0                                     # constant: exactly 0
    m, v = cn.state_finalize(cn.moments_1d(np.array([1.0, np.nan, 2.0])), 0.0)
    assert math.isnan(m) and math.isnan(v)


# ------------------------------------------------------------------ Cython
PYX = '''
# cython: language_level=3, boundscheck=False, wraparound=False
from cnorm._kernels cimport (State, moments_1d_f64, moments_1d_f32, state_finalize,
                             state_merge)


cdef inline void zero(State* s) noexcept nogil:
    s.n = 0.0
    s.mh = s.ml = s.qh = s.ql = 0.0


def merge_each(double[:] x, double ddof):
    """Merge one single-value state per element: exercises state_merge alone."""
    cdef State total, one
    cdef double mean, var
    cdef Py_ssize_t i
    zero(&total)
    with nogil:
        for i in range(x.shape[0]):
            one.n = 1.0
            one.mh = x[i]
            one.ml = one.qh = one.ql = 0.0
            state_merge(&total, &one)
        state_finalize(&total, ddof, &mean, &var)
    return mean, var, total.n


def chunked_f64(double[:] x, Py_ssize_t nchunks, double ddof):
    """moments_1d_f64 over nchunks pieces (any stride), merged, finalized; all nogil."""
    cdef State total, part
    cdef double mean, var
    cdef Py_ssize_t n = x.shape[0], i, lo, hi
    cdef Py_ssize_t stride = x.strides[0] // <Py_ssize_t>sizeof(double)
    zero(&total)
    with nogil:
        for i in range(nchunks):
            lo = i * n // nchunks
            hi = (i + 1) * n // nchunks
            if hi > lo:
                moments_1d_f64(&x[lo], hi - lo, stride, &part)
                state_merge(&total, &part)
        state_finalize(&total, ddof, &mean, &var)
    return mean, var, total.n


def whole_f32(float[:] x, double ddof):
    cdef State s
    cdef double mean, var
    cdef Py_ssize_t stride = x.strides[0] // <Py_ssize_t>sizeof(float)
    with nogil:
        moments_1d_f32(&x[0], x.shape[0], stride, &s)
        state_finalize(&s, ddof, &mean, &var)
    return mean, var, s.n
'''

SETUP = '''
import os, sys
import cnorm
from Cython.Build import cythonize
from setuptools import Extension, setup

pkg_parent = os.path.dirname(os.path.dirname(cnorm.__file__))  # where cnorm/_kernels.pxd is found
setup(name="cnorm_embed_demo", script_args=["build_ext", "--inplace", "-q"],
      ext_modules=cythonize([Extension("cnorm_embed_demo", ["cnorm_embed_demo.pyx"])],
                            include_path=[pkg_parent], quiet=True))
'''


@pytest.fixture(scope="module")
def cy(tmp_path_factory):
    require("Cython")
    d = tmp_path_factory.mktemp("cython_embed")
    (d / "cnorm_embed_demo.pyx").write_text(textwrap.dedent(PYX))
    (d / "setup.py").write_text(textwrap.dedent(SETUP))
    proc = subprocess.run([sys.executable, "setup.py"], cwd=d, capture_output=True, text=True,
                          timeout=600)   # a hang guard
    assert proc.returncode == 0, f"build failed:\n{proc.stdout}\n{proc.stderr}"
    (so,) = [p for p in os.listdir(d) if p.startswith("cnorm_embed_demo.") and
             p.endswith((".so", ".pyd"))]
    spec = importlib.util.spec_from_file_location("cnorm_embed_demo", d / so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pxd_is_installed_with_the_package():
    assert os.path.exists(os.path.join(os.path.dirname(cnorm.__file__), "_kernels.pxd"))


@pytest.mark.parametrize("n", SIZES)
def test_cython_state_merge_and_finalize(cy, n):
    x = offset_data(np.random.default_rng(n), n, np.float64)
    for ddof in (0, 1) if n > 1 else (0,):
        m, v, count = cy.merge_each(x, float(ddof))
        assert count == n
        ex_m, ex_v = exact(x, ddof)
        assert_ulps(m, ex_m, np.float64, 1)
        assert_ulps(v, ex_v, np.float64, 2)


def test_cython_moments_1d_single_value(cy):
    m, v, count = cy.chunked_f64(np.array([3.25]), 1, 0.0)
    assert (m, v, count) == (3.25, 0.0, 1.0)


# Regression: moments_1d_f64/f32 once passed the element count as the block count
# to slice_chunk (wrong counts and NaN variances for any n > 1).

@pytest.mark.parametrize("n", [n for n in SIZES if n > 2])
@pytest.mark.parametrize("nchunks", [1, 3])
def test_cython_moments_1d_f64(cy, n, nchunks):
    x = offset_data(np.random.default_rng(n), n, np.float64)
    for ddof in (0, 1):
        m, v, count = cy.chunked_f64(x, nchunks, float(ddof))
        assert count == n
        ex_m, ex_v = exact(x, ddof)
        assert_ulps(m, ex_m, np.float64, 1)
        assert_ulps(v, ex_v, np.float64, 2)


def test_cython_moments_1d_strided_and_f32(cy):
    rng = np.random.default_rng(5)
    x = offset_data(rng, 3 * 3001, np.float64, offset=-2e5)[::3]
    m, v, count = cy.chunked_f64(x, 2, 1.0)
    ex_m, ex_v = exact(x, 1)
    assert count == x.size
    assert_ulps(m, ex_m, np.float64, 1)
    assert_ulps(v, ex_v, np.float64, 2)
    x32 = offset_data(rng, 2 * 777, np.float32, offset=300.0)[::2]
    m, v, count = cy.whole_f32(x32, 0.0)
    ex_m, ex_v = exact(x32)
    assert count == x32.size
    assert_ulps(np.float32(m), ex_m, np.float32, 1)
    assert_ulps(np.float32(v), ex_v, np.float32, 1)

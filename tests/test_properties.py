"""Hypothesis property tests for moments/mean/var, layer_norm and batch_norm.

Random shapes (0-d, 0-size), random axes (int, tuple, negative, ``None``,
``()``), dtypes float16/32/64 and memory layouts (C, F, transposed views,
negative strides, zero strides from ``np.broadcast_to``, sliced steps) are
checked on every backend against the numpy backend and against float64
NumPy references of well-scaled data, within a few ulps of the dtype.  Shapes
and dtypes must be exactly NumPy's and inputs are never modified.

Budget: every test uses ``@settings(max_examples=60, deadline=None,
derandomize=True)`` (fixed, reproducible examples), so the file runs in a
fixed, short time.
"""
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cnorm

from conftest import BACKENDS, require

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))

DTYPES = [np.float16, np.float32, np.float64]
LAYOUTS = ["C", "F", "T", "neg", "step", "bcast"]


def _backend(name):
    if name == "numba":
        require("numba")
    return name


def _make(shape, dtype, layout, seed, offset=0.0):
    """An array of ``shape``/``dtype`` with the given memory layout, well scaled."""
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    ndim = len(shape)

    def base(s):
        return (rng.standard_normal(s) + offset).astype(dtype)

    if layout == "C" or ndim == 0:
        return np.ascontiguousarray(base(shape))
    if layout == "F":
        return np.asfortranarray(base(shape))
    if layout == "T":
        return base(shape[::-1]).T
    if layout == "neg":
        k = seed % ndim
        return base(shape)[(slice(None),) * k + (slice(None, None, -1),)]
    if layout == "step":
        big = tuple(2 * n + 1 for n in shape)
        a = base(big)[tuple(slice(1, None, 2) for _ in shape)]
        assert a.shape == shape
        return a
    if layout == "bcast":
        k = seed % ndim
        small = list(shape)
        small[k] = 1 if shape[k] else 0
        return np.broadcast_to(base(tuple(small)), shape)
    raise AssertionError(layout)


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@st.composite
def array_and_axis(draw, nonempty=False):
    shape = draw(shapes if not nonempty else
                 st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple))
    ndim = len(shape)
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["none", "int", "tuple"] if ndim else ["none", "empty"]))
    if kind == "none":
        axis = None
    elif kind == "empty":
        axis = ()
    elif kind == "int":
        k = draw(st.integers(0, ndim - 1))
        axis = k - ndim if draw(st.booleans()) else k
    else:
        ks = draw(st.lists(st.integers(0, ndim - 1), min_size=0, max_size=ndim, unique=True))
        axis = tuple(k - ndim if draw(st.booleans()) else k for k in ks)
    return _make(shape, dtype, layout, seed), axis


def _exact_stats(x, axis):
    """Exact (rational) mean and biased variance over ``axis``, keepdims shape,
    as object arrays of Fractions (``None`` for empty slices)."""
    nd = x.ndim
    if axis is None:
        axes = tuple(range(nd))
    elif isinstance(axis, tuple):
        axes = tuple(a % nd for a in axis)
    else:
        axes = (axis % nd,)
    keep = tuple(1 if k in axes else n for k, n in enumerate(x.shape))
    rest = [k for k in range(nd) if k not in axes]
    rows = np.moveaxis(x.astype(np.float64), list(axes), list(range(nd - len(axes), nd)))
    n = int(np.prod([x.shape[k] for k in axes], dtype=np.int64))
    rows = rows.reshape(-1, n) if rows.size else np.zeros((int(np.prod(
        [x.shape[k] for k in rest], dtype=np.int64)), n))
    mus, vs = [], []
    for row in rows:
        if n == 0:
            mus.append(None)
            vs.append(None)
            continue
        fr = [Fraction(float(v)) for v in row]
        mu = sum(fr, Fraction(0)) / n
        mus.append(mu)
        vs.append(sum(((f - mu) ** 2 for f in fr), Fraction(0)) / n)
    mu = np.empty(len(mus), dtype=object)
    mu[:] = mus
    v = np.empty(len(vs), dtype=object)
    v[:] = vs
    return mu.reshape(keep), v.reshape(keep), axes


def _to_float(a, dtype, axes=None, keepdims=True):
    f = np.vectorize(lambda q: math.nan if q is None else float(q), otypes=[np.float64])
    out = f(a) if a.size else np.zeros(a.shape)
    if not keepdims:
        out = out.reshape([n for k, n in enumerate(a.shape) if k not in axes])
    return out.astype(dtype).astype(np.float64)


def _ulps_close(got, ref, dtype, ulps):
    """|got - ref| <= ulps * spacing(dtype at |ref|); NaN-ness must match."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    nan_g, nan_r = np.isnan(got), np.isnan(ref)
    np.testing.assert_array_equal(nan_g, nan_r)
    g, r = got[~nan_r], ref[~nan_r]
    tiny = np.finfo(dtype).smallest_normal
    scale = np.spacing(np.maximum(np.abs(r), tiny).astype(dtype)).astype(np.float64)
    err = np.abs(g - r)
    assert np.all(err <= ulps * scale), (
        f"max error {np.max(err / scale) if err.size else 0} ulps > {ulps}")


def _same_meta(got, ref):
    got = np.asarray(got)
    assert got.shape == np.shape(ref)
    assert got.dtype == np.asarray(ref).dtype


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=array_and_axis())
def test_moments_match_numpy(backend, data):
    backend = _backend(backend)
    x, axis = data
    before = x.copy()
    dt = x.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref_v_np = np.var(x, axis=axis)  # shape/dtype reference
        m, v = cnorm.moments(x, axis=axis, backend=backend)
        mn = cnorm.mean(x, axis=axis, backend=backend)
        vr = cnorm.var(x, axis=axis, backend=backend)
        m_np, v_np = cnorm.moments(x, axis=axis, backend="numpy")
        mk = cnorm.mean(x, axis=axis, keepdims=True, backend=backend)
        mk_ref = np.mean(x, axis=axis, keepdims=True)
    np.testing.assert_array_equal(x, before)
    for got in (m, mn, v, vr):
        _same_meta(got, ref_v_np)
    _same_meta(mk, mk_ref)
    # Against the exact (rational) statistics, rounded to the dtype: a float64
    # np.mean/np.var reference is not good enough when the mean cancels to ~0.
    mu_q, v_q, axes = _exact_stats(x, axis)
    ref_m = _to_float(mu_q, dt, axes, keepdims=False)
    ref_v = _to_float(v_q, dt, axes, keepdims=False)
    # The float64 NumPy results agree to a few ulps of the data scale.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np_m = np.mean(x.astype(np.float64), axis=axis)
    np.testing.assert_allclose(np.asarray(m, np.float64), np_m, rtol=0,
                               atol=8 * float(np.finfo(dt).eps) * (np.max(np.abs(x), initial=0) + 1e-300))
    _ulps_close(m, ref_m, dt, 2)
    _ulps_close(mn, ref_m, dt, 2)
    v_tol = 3
    _ulps_close(v, ref_v, dt, v_tol)
    _ulps_close(vr, ref_v, dt, v_tol)
    # Against the numpy backend (both within 1-2 ulp of exact).
    _ulps_close(m, m_np, dt, 2)
    _ulps_close(v, v_np, dt, 2 * v_tol)
    # Variance is never negative.
    assert not np.any(np.asarray(v) < 0)


@st.composite
def layer_case(draw):
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple))
    ndim = len(shape)
    ks = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    axis = tuple(k - ndim if draw(st.booleans()) else k for k in ks)
    if len(axis) == 1 and draw(st.booleans()):
        axis = axis[0]
    if draw(st.booleans()):  # a zero-size batch axis sometimes
        others = [k for k in range(ndim) if k not in ks]
        if others:
            k = draw(st.sampled_from(others))
            shape = shape[:k] + (0,) + shape[k + 1:]
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**16))
    offset = draw(st.sampled_from([0.0, 3.0]))
    return _make(shape, dtype, layout, seed, offset), axis


def _norm_ref(x, axes, eps):
    """(x - mean)/sqrt(var + eps) from the exact statistics, to ~3 float64 ulps of |y|."""
    mu, v, _ = _exact_stats(x, axes)
    xq = np.empty(x.shape, dtype=object)
    xq[...] = np.vectorize(Fraction, otypes=[object])(x.astype(np.float64)) if x.size else 0
    d = np.vectorize(float, otypes=[np.float64])(xq - mu) if x.size else np.zeros(x.shape)
    s = np.vectorize(lambda q: math.sqrt(float(q + Fraction(eps))), otypes=[np.float64])(v)
    return d / s


def _check_norm(y, ref, dt):
    _same_meta(y, ref.astype(dt))
    y = np.asarray(y, dtype=np.float64)
    scale = np.spacing(np.maximum(np.abs(ref), 2.0**-10).astype(dt)).astype(np.float64)
    ulps = 2 if dt != np.float64 else 8
    err = np.abs(y - ref)
    assert np.all(err <= ulps * scale), f"max {np.max(err / scale)} ulps"


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=layer_case())
def test_layer_norm_matches_reference(backend, data):
    backend = _backend(backend)
    x, axis = data
    before = x.copy()
    y = cnorm.layer_norm(x, axis=axis, backend=backend)
    np.testing.assert_array_equal(x, before)
    _check_norm(y, _norm_ref(x, axis, 1e-5), x.dtype)


@st.composite
def batch_case(draw):
    shape = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4).map(tuple))
    ndim = len(shape)
    c = draw(st.integers(0, ndim - 1))
    assume(int(np.prod(shape)) // shape[c] >= 2)  # BN training needs 2 values per channel
    axis = c - ndim if draw(st.booleans()) else c
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**16))
    offset = draw(st.sampled_from([0.0, 3.0]))
    return _make(shape, dtype, layout, seed, offset), axis


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=batch_case())
def test_batch_norm_matches_reference(backend, data):
    backend = _backend(backend)
    x, axis = data
    before = x.copy()
    y = cnorm.batch_norm(x, axis=axis, backend=backend)
    np.testing.assert_array_equal(x, before)
    red = tuple(k for k in range(x.ndim) if k != axis % x.ndim)
    _check_norm(y, _norm_ref(x, red, 1e-5), x.dtype)

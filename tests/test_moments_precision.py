"""Precision and semantics of mean/var/std/moments against exact rational references.

The contract (SPEC §3): against the exact value for the stored inputs, mean
within 1 ulp and var/std within 1 ulp (float16, float32) or 2 ulp (float64 var
and std), at any offset, scale, length, axes and layout, on every backend and
every ISA path of the Cython kernels.  Results are bitwise identical for any
thread count.  Shapes, dtypes, keepdims, warnings and empty reductions follow
NumPy.

The ``engine`` fixture runs each test once per Cython ISA path and once for
the ``numba`` and ``numpy`` backends (the ISA only switches the Cython
kernels, so crossing every backend with every ISA would repeat the same runs).
"""
from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnorm
from cnorm import _config
from conftest import require
from exact import (CANCELLATION, adversarial_rows, exact_moments, exact_normalized, exact_std,
                   exact_weighted_moments, max_offset, offset_data, round_to_dtype, ulp_error)

ENGINES = [("cython", isa) for isa in _config.isa_runnable] + [("numba", None), ("numpy", None)]
ALL = ("cython", "numba", "numpy")
MEAN_TOL = 1.0
VAR_TOL = {np.dtype(np.float16): 1.0, np.dtype(np.float32): 1.0, np.dtype(np.float64): 2.0}


def _engine_name(engine):
    return f"cython-{_config.isa_selected}" if engine == "cython" else engine


def known_bug(request, engine, engines, reason):
    """Mark this run xfail (strict) when the engine (a backend, or 'cython-<isa>') has the bug."""
    if engine in engines or _engine_name(engine) in engines:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


DEKKER_BUG = ("numpy backend: Dekker's product splitting (two_prod in _reference.py) overflows "
              "for operands above ~1.3e300, so a float64 variance near 1e307 becomes NaN: "
              "var([3.0, 4e153, -4e153], backend='numpy') is nan, exact 1.0667e307")


def _use_engine(request):
    backend, isa = request.param
    if backend == "numba":
        require("numba")
    if isa is None:
        yield backend
        return
    previous = _config.isa_selected
    _config.use_isa(isa)
    try:
        yield backend
    finally:
        _config.use_isa(previous)


def _engine_id(p):
    return p[0] if p[1] is None else f"{p[0]}-{p[1]}"


@pytest.fixture(params=ENGINES, ids=_engine_id)
def engine(request):
    """A backend name; for 'cython', the kernels are switched to one ISA path meanwhile."""
    yield from _use_engine(request)


@pytest.fixture(params=[e for e in ENGINES if e[0] != "numpy"], ids=_engine_id)
def threaded_engine(request):
    """The engines that run threads (the numpy backend is single-threaded)."""
    yield from _use_engine(request)


def _seeded(*key):
    """A Generator seeded from a readable key (same data in every run and process)."""
    return np.random.default_rng([20261125] + [sum(map(ord, str(k))) * 7919 + i
                                               for i, k in enumerate(key)])


def _describe(err, got, exact):
    i = np.unravel_index(int(np.argmax(err)), err.shape)
    g = np.asarray(got)[i] if np.ndim(got) else got
    e = np.asarray(exact, dtype=object)[i] if np.ndim(exact) else np.asarray(exact, dtype=object)[()]
    return f"worst {float(err[i]):.3g} ulp at {i}: got {float(g)!r}, exact {float(e)!r}"


def assert_ulps(got, exact, dtype, tol, what=""):
    """Every element of ``got`` within ``tol`` ulps of ``exact`` (NaN == NaN); returns the worst."""
    err = ulp_error(got, exact, dtype)
    worst = float(err.max()) if err.size else 0.0
    assert worst <= tol, f"{what}: {_describe(err, got, exact)} (tolerance {tol})"
    return worst


def assert_never_negative(var):
    v = np.asarray(var, dtype=np.float64)
    assert not (v < 0).any(), "negative variance"


def check_all(x, axis, backend, ddof=0, what="", **kw):
    """moments/mean/var/std of x over axis, each against the exact values."""
    dt = x.dtype
    em, ev = exact_moments(x, axis, ddof)
    es = exact_std(x, axis, ddof)
    m, v = cnorm.moments(x, axis=axis, ddof=ddof, backend=backend, **kw)
    assert np.asarray(m).dtype == dt and np.asarray(v).dtype == dt
    assert np.shape(m) == em.shape and np.shape(v) == ev.shape
    worst = {"mean": assert_ulps(m, em, dt, MEAN_TOL, f"{what} moments mean"),
             "var": assert_ulps(v, ev, dt, VAR_TOL[dt], f"{what} moments var")}
    assert_ulps(cnorm.mean(x, axis=axis, backend=backend, **kw), em, dt, MEAN_TOL, f"{what} mean")
    assert_ulps(cnorm.var(x, axis=axis, ddof=ddof, backend=backend, **kw), ev, dt, VAR_TOL[dt],
                f"{what} var")
    s = cnorm.std(x, axis=axis, ddof=ddof, backend=backend, **kw)
    worst["std"] = assert_ulps(s, es, dt, VAR_TOL[dt], f"{what} std")
    assert_never_negative(v)
    return worst


# ---------------------------------------------------------------- adversarial data sets
ROW_LEN = 3001   # not a multiple of the 16 lanes: the scalar tail runs too


@functools.lru_cache(maxsize=None)
def _adversarial(dtype_name):
    """(names, rows (R, ROW_LEN), exact mean, var, std per row) for one dtype."""
    dt = np.dtype(dtype_name)
    named = adversarial_rows(dt, ROW_LEN, _seeded("adversarial", dtype_name))
    names = [n for n, _ in named]
    rows = np.stack([r for _, r in named])
    em, ev = exact_moments(rows, axis=1)
    return names, rows, em, ev, exact_std(rows, axis=1)


LAYOUTS_2D = ["rows", "columns", "strided-rows", "strided-columns", "reversed"]


def _layout_2d(rows, layout):
    """The same (R, n) data in another memory layout, plus the axis that reduces each row."""
    if layout == "rows":
        return rows, 1
    if layout == "columns":
        return np.ascontiguousarray(rows.T), 0
    if layout == "strided-rows":
        big = np.zeros((rows.shape[0], 2 * rows.shape[1]), rows.dtype)
        big[:, ::2] = rows
        return big[:, ::2], -1
    if layout == "strided-columns":
        big = np.zeros((rows.shape[1], 3 * rows.shape[0]), rows.dtype)
        big[:, ::3] = rows.T
        return big[:, ::3], 0
    if layout == "reversed":
        return rows[:, ::-1].T[::-1, :], -2   # negative strides on both axes
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", LAYOUTS_2D)
def test_adversarial_sets(engine, dtype, layout):
    """Offsets up to the dtype's limit, tiny/huge scales, cancelling signs, subnormals."""
    names, rows, em, ev, es = _adversarial(dtype.name)
    x, axis = _layout_2d(rows, layout)
    m, v = cnorm.moments(x, axis=axis, backend=engine)
    s = cnorm.std(x, axis=axis, backend=engine)
    assert m.dtype == dtype and v.dtype == dtype and m.shape == (len(names),)
    bad = []
    for name, got, ref, tol, what in [("mean", m, em, MEAN_TOL, "mean"),
                                      ("var", v, ev, VAR_TOL[dtype], "var"),
                                      ("std", s, es, VAR_TOL[dtype], "std")]:
        err = ulp_error(got, ref, dtype)
        if what == "std" and dtype == np.float64:   # see test_std_when_var_is_not_representable
            err[[i for i, n in enumerate(names) if n == "subnormal"]] = 0.0
        bad += [f"{what} of {names[i]!r}: {err[i]:.3g} ulp (got {float(got[i])!r}, "
                f"exact {float(ref[i])!r})" for i in np.flatnonzero(err > tol)]
    assert not bad, "\n".join(bad)
    assert_never_negative(v)


@pytest.mark.parametrize("offset", [1e8, 1e10, 1e12, 1e14, 1e15])
def test_float64_large_offsets_multichunk(engine, offset):
    """offset + N(0,1) in float64, long enough to merge blocks across several chunks."""
    x = offset_data(np.float64, 300_001, offset, 1.0, _seeded("f64 offset", offset))
    check_all(x, None, engine, what=f"offset {offset:g}")
    check_all(x, 0, engine, ddof=1, what=f"offset {offset:g} ddof=1")


def test_offset_at_dtype_limit_columns(engine, dtype):
    """Many columns at the dtype's offset limit (the column kernel, several row chunks)."""
    x = offset_data(dtype, None, max_offset(dtype), 1.0, _seeded("limit cols", dtype.name),
                    shape=(140_000, 3))
    check_all(x, 0, engine, what="columns at the offset limit")


@functools.lru_cache(maxsize=None)
def _long_slice(dtype_name):
    dt = np.dtype(dtype_name)
    off = {"float16": 1e3, "float32": 1e6, "float64": 1e8}[dtype_name]
    x = offset_data(dt, 1 << 22, off, 1.0, _seeded("long", dtype_name))
    return x, exact_moments(x)


def test_long_slice(engine, dtype):
    """A slice of 2**22 elements at a large offset."""
    x, (em, ev) = _long_slice(dtype.name)
    m, v = cnorm.moments(x, backend=engine)
    assert_ulps(m, em, dtype, MEAN_TOL, "mean of 2**22")
    assert_ulps(v, ev, dtype, VAR_TOL[dtype], "var of 2**22")


# ---------------------------------------------------------------- special slices
CONSTANTS = {
    "float16": [0.0, 1.0, 0.1, -3.7, 6.0e4, -6.5e4, 1e-4, 6e-8],
    "float32": [0.0, 1.0, 0.1, -3.7, 1e7 + 1, 3e38, 1e-30, 1e-45],
    "float64": [0.0, 1.0, 0.1, -3.7, 1e15 + 1, 1e150, -1e160, 1e-300, 5e-324],
}


@pytest.mark.parametrize("n", [1, 2, 3, 16, 17, 2048, 2049, 5000])
def test_constant_slices(engine, dtype, n):
    """A constant slice has variance exactly 0.0 (never negative) and its value as mean."""
    vals = np.array(CONSTANTS[dtype.name], dtype=dtype)
    for x, axis in [(np.repeat(vals[:, None], n, axis=1), 1),
                    (np.repeat(vals[None, :], n, axis=0), 0),
                    (np.broadcast_to(vals[:, None], (len(vals), n)), -1)]:
        m, v = cnorm.moments(x, axis=axis, backend=engine)
        assert v.dtype == dtype
        assert (v == 0).all() and not np.signbit(v).any(), f"n={n}, axis={axis}: var {v}"
        assert (cnorm.var(x, axis=axis, ddof=1 if n > 1 else 0, backend=engine) == 0).all()
        assert (cnorm.std(x, axis=axis, backend=engine) == 0).all()
        assert_ulps(m, np.array(vals.astype(np.float64).tolist(), dtype=object), dtype, MEAN_TOL,
                    f"constant mean n={n}")


def test_n_equals_1(engine, dtype):
    x = offset_data(dtype, None, max_offset(dtype), 1.0, _seeded("n1", dtype.name), shape=(5, 1))
    m, v = cnorm.moments(x, axis=1, backend=engine)
    np.testing.assert_array_equal(m, x[:, 0])
    assert (v == 0).all()
    assert cnorm.var(x[0, 0], backend=engine) == 0
    with pytest.warns(RuntimeWarning):
        v1 = cnorm.var(x, axis=1, ddof=1, backend=engine)
    assert v1.dtype == dtype and np.isnan(v1).all()
    with pytest.warns(RuntimeWarning):
        m1, v1 = cnorm.moments(x, axis=-1, ddof=1, backend=engine)
    np.testing.assert_array_equal(m1, x[:, 0])
    assert np.isnan(v1).all()


def test_n_equals_2(engine, dtype):
    rng = _seeded("n2", dtype.name)
    parts = [offset_data(dtype, None, off, 1.0, rng, shape=(20, 2))
             for off in (0.0, 10.0, max_offset(dtype) / 100, max_offset(dtype))]
    x = np.concatenate(parts + [np.array([[1.0, 1.0], [-2.0, 2.0]], dtype=dtype)])
    for ddof in (0, 1):
        check_all(x, 1, engine, ddof=ddof, what=f"n=2 ddof={ddof}")
        check_all(np.asfortranarray(x.T), 0, engine, ddof=ddof, what=f"n=2 columns ddof={ddof}")
    # ddof = n: np.var's rule, M2 / 0 = inf (NaN for an equal pair), with a warning
    with pytest.warns(RuntimeWarning):
        v = cnorm.var(x[-2:], axis=1, ddof=2, backend=engine)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = np.var(x[-2:].astype(np.float64), axis=1, ddof=2)
    np.testing.assert_array_equal(v, expected.astype(dtype))


def test_cancellation(engine, dtype):
    """[1e16, 1, -1e16, 1] (scaled to the dtype) in every order, alone and tiled."""
    base = CANCELLATION[dtype]
    perms = sorted(set(itertools.permutations(base)))
    x = np.array(perms, dtype=dtype)
    check_all(x, 1, engine, what="cancellation")
    check_all(np.ascontiguousarray(x.T), 0, engine, what="cancellation columns")
    tiled = np.tile(x, (1, 1000))
    check_all(tiled, 1, engine, ddof=1, what="cancellation tiled")
    m = cnorm.mean(np.array(base, dtype=dtype), backend=engine)
    assert m == 0.5


def test_nan_and_inf_confined(engine, dtype):
    """NaN makes only its slice NaN; ±inf gives NaN variance (IEEE mean) in its slice only."""
    x = offset_data(dtype, None, max_offset(dtype) / 10, 1.0, _seeded("nan", dtype.name),
                    shape=(7, 5000))
    x[1, 4000] = np.nan
    x[2, 0] = np.inf
    x[3, 2500] = -np.inf
    x[4, 10] = np.inf
    x[4, 4999] = -np.inf
    x[5, 3] = np.nan
    x[5, 7] = np.inf
    em, ev = exact_moments(x, 1)
    assert em[2] == np.inf and em[3] == -np.inf and all(np.isnan(float(e)) for e in ev[1:6])
    for arr, axis in [(x, 1), (np.ascontiguousarray(x.T), 0), (x[:, ::-1], -1)]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")       # no spurious warnings from IEEE specials
            m, v = cnorm.moments(arr, axis=axis, backend=engine)
            s = cnorm.std(arr, axis=axis, backend=engine)
        assert_ulps(m, em, dtype, MEAN_TOL, f"mean axis={axis}")
        assert_ulps(v, ev, dtype, VAR_TOL[dtype], f"var axis={axis}")
        assert np.isnan(s[1:6]).all() and np.isfinite(s[[0, 6]]).all()
    # NaN/inf deep inside a long slice (merged across chunks) and at the very ends
    y = offset_data(dtype, None, 1.0, 1.0, _seeded("nan long", dtype.name), shape=(3, 300_000))
    y[0, 299_999] = np.nan
    y[1, 0] = np.inf
    m, v = cnorm.moments(y, axis=1, backend=engine)
    assert np.isnan(m[0]) and np.isnan(v[0]) and m[1] == np.inf and np.isnan(v[1])
    assert np.isfinite(m[2]) and np.isfinite(v[2])


# ---------------------------------------------------------------- axes and layouts
def _np_shape(x, axis):
    """Shape of NumPy's reduction result."""
    return np.mean(np.zeros(x.shape, dtype=np.float64), axis=axis).shape

SHAPES = {2: (9, 301), 3: (5, 7, 67), 4: (3, 4, 5, 33)}
AXES = {2: [None, 0, 1, -1, -2, (0, 1), (1, 0)],
        3: [None, 0, 1, 2, -1, (0, 2), (1, 2), (-3, -2), (0, 1, 2)],
        4: [None, 0, 3, -3, (0, 1), (1, 3), (0, 2), (2, 3), (0, 1, 3), (-4, -3, -2, -1)]}
LAYOUTS = ["C", "F", "sliced", "negative", "zero-stride"]


@functools.lru_cache(maxsize=None)
def _layout_case(dtype_name, ndim, layout):
    dt = np.dtype(dtype_name)
    shape = SHAPES[ndim]
    rng = _seeded("layout", dtype_name, ndim, layout)
    off = max_offset(dt) / 10
    if layout == "C":
        x = offset_data(dt, None, off, 1.0, rng, shape=shape)
    elif layout == "F":
        x = np.asfortranarray(offset_data(dt, None, off, 1.0, rng, shape=shape))
    elif layout == "sliced":
        big = offset_data(dt, None, off, 1.0, rng, shape=tuple(2 * s + 1 for s in shape))
        x = big[tuple(slice(1, None, 2) for _ in shape)]
    elif layout == "negative":
        x = offset_data(dt, None, off, 1.0, rng, shape=shape)[(slice(None, None, -1),) * ndim]
    else:  # zero strides: broadcast along the first and a middle axis
        small = tuple(1 if i in (0, ndim // 2) else s for i, s in enumerate(shape))
        x = np.broadcast_to(offset_data(dt, None, off, 1.0, rng, shape=small), shape)
    assert x.shape == shape
    return x, {axis: exact_moments(x, axis) for axis in AXES[ndim]}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", [2, 3, 4])
def test_axes_and_layouts(engine, dtype, ndim, layout):
    x, exact = _layout_case(dtype.name, ndim, layout)
    for axis in AXES[ndim]:
        em, ev = exact[axis]
        m, v = cnorm.moments(x, axis=axis, backend=engine)
        assert np.shape(m) == _np_shape(x, axis) == em.shape
        assert np.asarray(m).dtype == dtype and np.asarray(v).dtype == dtype
        assert_ulps(m, em, dtype, MEAN_TOL, f"mean axis={axis}")
        assert_ulps(v, ev, dtype, VAR_TOL[dtype], f"var axis={axis}")
        assert_never_negative(v)
    np.testing.assert_array_equal(x, _layout_case(dtype.name, ndim, layout)[0])  # input untouched


@st.composite
def _strided_case(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    steps = tuple(draw(st.sampled_from([1, 2, -1, -3])) for _ in shape)
    order = draw(st.sampled_from("CF"))
    perm = draw(st.permutations(range(ndim)))
    axis = draw(st.one_of(st.none(), st.integers(-ndim, ndim - 1),
                          st.lists(st.integers(0, ndim - 1), unique=True, min_size=1,
                                   max_size=ndim).map(tuple)))
    return shape, steps, order, perm, axis


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_strided_case(), dname=st.sampled_from(["float16", "float32", "float64"]))
def test_random_strides_and_axes(engine, case, dname):
    shape, steps, order, perm, axis = case
    dt = np.dtype(dname)
    full = tuple(abs(s) * n for s, n in zip(steps, shape))
    base = offset_data(dt, None, max_offset(dt) / 100, 1.0, _seeded("hyp", shape, steps),
                       shape=full)
    base = np.asarray(base, order=order)
    x = base[tuple(slice(None, None, s) for s in steps)].transpose(perm)
    ax = axis if axis is None or isinstance(axis, int) else tuple(perm.index(a) for a in axis)
    em, ev = exact_moments(x, ax)
    m, v = cnorm.moments(x, axis=ax, backend=engine)
    assert np.shape(m) == _np_shape(x, ax)
    assert_ulps(m, em, dt, MEAN_TOL, f"mean {case}")
    assert_ulps(v, ev, dt, VAR_TOL[dt], f"var {case}")


# ---------------------------------------------------------------- NumPy semantics
def _np_ref(fn, x, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with np.errstate(all="warn"):
            r = getattr(np, fn)(x, **kw)
    return r, any(issubclass(w.category, RuntimeWarning) for w in rec)


def _cn(fn, x, backend, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        r = getattr(cnorm, fn)(x, backend=backend, **kw)
    return r, any(issubclass(w.category, RuntimeWarning) for w in rec)


def _same_result(got, ref, rtol):
    assert type(got) is type(ref), (type(got), type(ref))
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), rtol=rtol, atol=0,
                               equal_nan=True)


EMPTY_CASES = [((0,), None), ((0,), 0), ((0, 3), None), ((0, 3), 0), ((0, 3), 1), ((3, 0), 0),
               ((3, 0), 1), ((3, 0), -1), ((2, 0, 4), (0, 2)), ((2, 0, 4), (1,)), ((0, 0), None)]


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("shape,axis", EMPTY_CASES)
def test_empty_reductions_follow_numpy(backend, dtype, shape, axis, keepdims):
    x = np.zeros(shape, dtype=dtype)
    for fn in ("mean", "var", "std"):
        ref, ref_warned = _np_ref(fn, x, axis=axis, keepdims=keepdims)
        got, warned = _cn(fn, x, backend, axis=axis, keepdims=keepdims)
        _same_result(got, ref, 0)
        assert warned == ref_warned, f"{fn}{shape} axis={axis}: warning {warned} vs numpy {ref_warned}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, v = cnorm.moments(x, axis=axis, keepdims=keepdims, backend=backend)
        _same_result(m, np.mean(x, axis=axis, keepdims=keepdims), 0)
        _same_result(v, np.var(x, axis=axis, keepdims=keepdims), 0)


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", [None, 0, -1, (), (0,)])
def test_zero_dim(backend, dtype, axis, keepdims):
    x = np.array(2.5, dtype=dtype)
    for fn in ("mean", "var", "std"):
        if axis in (None, ()):
            ref, _ = _np_ref(fn, x, axis=axis, keepdims=keepdims)
            got, warned = _cn(fn, x, backend, axis=axis, keepdims=keepdims)
            _same_result(got, ref, 0)
            assert not warned
        else:
            with pytest.raises(np.exceptions.AxisError):
                getattr(cnorm, fn)(x, axis=axis, keepdims=keepdims, backend=backend)
    if axis is None:
        m, v = cnorm.moments(x, keepdims=keepdims, backend=backend)
        assert m == 2.5 and v == 0 and np.asarray(m).dtype == dtype


INPUT_DTYPES = ["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "uint64", "bool"]


@pytest.mark.parametrize("in_dtype", INPUT_DTYPES)
def test_shapes_dtypes_keepdims_like_numpy(backend, in_dtype):
    rng = _seeded("np", in_dtype)
    x = rng.integers(0, 5, size=(4, 3, 6)).astype(in_dtype)
    rtol = 4 * float(np.finfo(np.result_type(x.dtype, np.float16) if x.dtype.kind == "f"
                              else np.float64).eps)
    for axis, keepdims, ddof in itertools.product([None, 0, 1, -1, (0, 2), (2, 0, 1), ()],
                                                  [False, True], [0, 1]):
        for fn in ("mean", "var", "std"):
            kw = dict(axis=axis, keepdims=keepdims) | ({} if fn == "mean" else dict(ddof=ddof))
            ref, _ = _np_ref(fn, x, **kw)
            got, _ = _cn(fn, x, backend, **kw)
            _same_result(got, ref, rtol)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # ddof=1 over axis=() divides by zero, like NumPy
            m, v = cnorm.moments(x, axis=axis, keepdims=keepdims, ddof=ddof, backend=backend)
            _same_result(m, np.mean(x, axis=axis, keepdims=keepdims), rtol)
            _same_result(v, np.var(x, axis=axis, keepdims=keepdims, ddof=ddof), rtol)


def test_array_likes_like_numpy(backend):
    for x in ([1, 2, 4], [[1.5, 2.5], [3.0, 5.0]], 3.0, 7, True, (1, 2, 3.5)):
        for fn in ("mean", "var", "std"):
            ref, _ = _np_ref(fn, x)
            got, _ = _cn(fn, x, backend)
            _same_result(got, ref, 1e-15)


@pytest.mark.parametrize("ddof", [0, 1, 2, 0.5, -1, 3.5, np.int64(2), np.float32(1.0)])
def test_ddof(engine, dtype, ddof):
    x = offset_data(dtype, None, max_offset(dtype), 1.0, _seeded("ddof", dtype.name),
                    shape=(6, 11))
    check_all(x, 1, engine, ddof=ddof, what=f"ddof={ddof}")
    check_all(x, (0, 1), engine, ddof=ddof, what=f"ddof={ddof} all")


@pytest.mark.parametrize("ddof", [3, 4, 7.5])
def test_ddof_at_least_n_follows_numpy(backend, dtype, ddof):
    x = np.array([[1, 2, 4], [3, 3, 3], [0, 0, 1]], dtype=dtype)
    for fn in ("var", "std"):
        ref, ref_warned = _np_ref(fn, x, axis=1, ddof=ddof)
        got, warned = _cn(fn, x, backend, axis=1, ddof=ddof)
        _same_result(got, ref, 0)
        assert warned and ref_warned
    with pytest.warns(RuntimeWarning):
        m, v = cnorm.moments(x, axis=1, ddof=ddof, backend=backend)
    np.testing.assert_array_equal(v, np.where(np.ptp(x, axis=1) > 0, np.inf, np.nan).astype(dtype))
    np.testing.assert_array_equal(m, np.mean(x, axis=1))


DTYPE_ARGS = [("float64", "float32"), ("float64", "float16"), ("float32", "float16"),
              ("float16", "float32"), ("int64", "float32"), ("float16", "float64"),
              ("float32", "float64")]


@pytest.mark.parametrize("in_dt,out_dt", DTYPE_ARGS)
def test_dtype_argument(engine, in_dt, out_dt, request):
    """``dtype=`` sets the result dtype; the contract holds in that dtype."""
    dt = np.dtype(out_dt)
    rng = _seeded("dtype arg", in_dt, out_dt)
    if in_dt == "int64":
        x = rng.integers(10**6, 10**6 + 1000, size=(5, 1000))
    else:   # the largest offset that both dtypes cover
        off = min(max_offset(np.dtype(in_dt)), max_offset(dt))
        x = offset_data(np.dtype(in_dt), None, off, 1.0, rng, shape=(5, 1000))
    em, ev = exact_moments(x, 1)
    for fn, ref, tol in (("mean", em, MEAN_TOL), ("var", ev, VAR_TOL[dt])):
        got = getattr(cnorm, fn)(x, axis=1, dtype=dt, backend=engine)
        with np.errstate(all="ignore"):     # NumPy accumulates in dt (float16 overflows)
            assert got.dtype == getattr(np, fn)(x, axis=1, dtype=dt).dtype == dt
        assert_ulps(got, ref, dt, tol, f"{fn} {in_dt}->{out_dt}")
        out = np.empty(x.shape[0], dtype=dt)
        assert getattr(cnorm, fn)(x, axis=1, out=out, backend=engine) is out
        assert_ulps(out, ref, dt, tol, f"{fn} {in_dt}->out {out_dt}")
    m, v = cnorm.moments(x, axis=1, dtype=dt, backend=engine)
    assert m.dtype == v.dtype == dt
    assert_ulps(m, em, dt, MEAN_TOL, "moments mean")
    assert_ulps(v, ev, dt, VAR_TOL[dt], "moments var")


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("out_dt", ["same", "float32", "float64"])
def test_out_argument(engine, dtype, out_dt, keepdims):
    """out= is filled in place and returned; values as with dtype=out.dtype.

    The precision of a float64 result from float16/float32 input is checked in
    test_dtype_argument (a known gap); here only for results in the input dtype
    or float32."""
    odt = dtype if out_dt == "same" else np.dtype(out_dt)
    upcast = odt.itemsize > dtype.itemsize
    x = offset_data(dtype, None, max_offset(dtype), 1.0, _seeded("out", dtype.name),
                    shape=(4, 5, 300))
    em, ev = exact_moments(x, (0, 2))
    es = exact_std(x, (0, 2))
    shape = (1, 5, 1) if keepdims else (5,)
    for fn, ref, tol in (("mean", em, MEAN_TOL), ("var", ev, VAR_TOL[odt]),
                         ("std", es, VAR_TOL[odt])):
        out = np.full(shape, -7.0, dtype=odt)
        r = getattr(cnorm, fn)(x, axis=(0, 2), out=out, keepdims=keepdims, backend=engine)
        assert r is out and out.dtype == odt
        same = getattr(cnorm, fn)(x, axis=(0, 2), dtype=odt, keepdims=keepdims, backend=engine)
        np.testing.assert_array_equal(out, same)
        if not upcast or odt != np.float64:
            assert_ulps(out.reshape(-1), ref, odt, tol, f"{fn} out={odt}")
        np_out = np.full(shape, -7.0, dtype=odt)
        with np.errstate(all="ignore"):     # NumPy's float16 sums overflow here
            assert getattr(np, fn)(x, axis=(0, 2), out=np_out, keepdims=keepdims) is np_out
    # a non-contiguous out view is written in place
    big = np.zeros((5, 3), dtype=odt)
    r = cnorm.var(x, axis=(0, 2), out=big[:, 1], backend=engine)
    assert np.shares_memory(r, big)
    np.testing.assert_array_equal(big[:, 1], cnorm.var(x, axis=(0, 2), dtype=odt, backend=engine))
    assert (big[:, [0, 2]] == 0).all()


# ---------------------------------------------------------------- weights and skipna
@functools.lru_cache(maxsize=None)
def _weighted_case(dtype_name):
    dt = np.dtype(dtype_name)
    rng = _seeded("weights", dtype_name)
    x = offset_data(dt, None, max_offset(dt), 1.0, rng, shape=(4, 60))
    w_int = rng.integers(0, 4, size=x.shape)
    w_float = np.round(rng.random(x.shape) * 3, 3)
    w_float[0, :5] = 0.0
    w_row = rng.random(60) + 0.25          # broadcasts along the last axis
    w_col = (rng.random((4, 1)) * 4).astype(np.float32)
    cases = {}
    for wname, w in (("int", w_int), ("float", w_float), ("row", w_row), ("col", w_col)):
        for axis in (None, 0, 1, (0, 1)):
            for ddof in (0, 1):
                cases[wname, axis, ddof] = (w, exact_weighted_moments(x, w, axis, ddof))
    return x, cases


def test_weights(backend, dtype):
    x, cases = _weighted_case(dtype.name)
    for (wname, axis, ddof), (w, (em, ev)) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # ddof=1 with a weight sum <= 1 in a slice
            m, v = cnorm.moments(x, axis=axis, ddof=ddof, weights=w, backend=backend)
        assert np.asarray(m).dtype == dtype and np.shape(m) == em.shape
        assert_ulps(m, em, dtype, MEAN_TOL, f"weighted mean {wname} axis={axis}")
        assert_ulps(v, ev, dtype, VAR_TOL[dtype], f"weighted var {wname} axis={axis} ddof={ddof}")
        assert_never_negative(v)


def test_integer_weights_equal_repetition(backend, dtype):
    x, cases = _weighted_case(dtype.name)
    w = cases["int", 1, 0][0]
    for i in range(x.shape[0]):
        rep = np.repeat(x[i], w[i])
        em, ev = exact_moments(rep)
        for ddof in (0, 1):
            m, v = cnorm.moments(x[i], weights=w[i], ddof=ddof, backend=backend)
            mr, vr = cnorm.moments(rep, ddof=ddof, backend=backend)
            assert_ulps(m, em, dtype, MEAN_TOL, "weighted vs repeated mean")
            assert_ulps(mr, em, dtype, MEAN_TOL, "repeated mean")
            assert_ulps(v, exact_moments(rep, None, ddof)[1], dtype, VAR_TOL[dtype], "weighted var")
    unit = cnorm.moments(x, axis=1, weights=np.ones(x.shape), backend=backend)
    plain = cnorm.moments(x, axis=1, backend=backend)
    em, ev = exact_moments(x, 1)
    for got, ref, tol in ((unit[0], em, MEAN_TOL), (unit[1], ev, VAR_TOL[dtype]),
                          (plain[0], em, MEAN_TOL), (plain[1], ev, VAR_TOL[dtype])):
        assert_ulps(got, ref, dtype, tol, "unit weights")


def test_skipna(backend, dtype):
    rng = _seeded("skipna", dtype.name)
    x = offset_data(dtype, None, max_offset(dtype), 1.0, rng, shape=(6, 500))
    x[rng.random(x.shape) < 0.1] = np.nan
    x[3, :] = np.nan                     # all NaN: NaN and a warning, like np.nanvar
    x[4, :-1] = np.nan                   # one value left
    x[5, 7] = np.inf                     # inf still counts: NaN variance
    for axis, ddof in itertools.product((1, -1, None), (0, 1)):
        em, ev = exact_moments(x, axis, ddof, skipna=True)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            m, v = cnorm.moments(x, axis=axis, ddof=ddof, skipna=True, backend=backend)
        if axis is not None:
            assert any(issubclass(r.category, RuntimeWarning) for r in rec)
        assert_ulps(m, em, dtype, MEAN_TOL, f"skipna mean axis={axis}")
        assert_ulps(v, ev, dtype, VAR_TOL[dtype], f"skipna var axis={axis} ddof={ddof}")
    y = np.array([[1.0, np.nan, 3.0], [np.nan, np.nan, np.nan], [2.0, 2.0, np.nan]], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, v = cnorm.moments(y, axis=1, skipna=True, keepdims=True, backend=backend)
        _same_result(m, np.nanmean(y, axis=1, keepdims=True), 0)
        _same_result(v, np.nanvar(y, axis=1, keepdims=True), 0)


# ---------------------------------------------------------------- threads
THREAD_CASES = [((600_003,), None), ((3, 300_000), 1), ((60_000, 70), 0), ((8, 16, 4099), (0, 2)),
                ((5000, 300), 0)]


@pytest.mark.parametrize("shape,axis", THREAD_CASES, ids=str)
def test_bitwise_identical_for_any_thread_count(threaded_engine, dtype, shape, axis, monkeypatch):
    engine = threaded_engine
    x = offset_data(dtype, None, max_offset(dtype) / 10, 1.0, _seeded("threads", shape),
                    shape=shape)
    runs = []
    for n in (1, 2):
        runs.append(cnorm.moments(x, axis=axis, num_threads=n, backend=engine))
        runs.append((cnorm.mean(x, axis=axis, num_threads=n, backend=engine),
                     cnorm.var(x, axis=axis, num_threads=n, backend=engine)))
    monkeypatch.setattr(_config, "_num_threads", None)
    for n in (2, 1):
        cnorm.set_num_threads(n)
        assert cnorm.get_num_threads() == n
        runs.append(cnorm.moments(x, axis=axis, backend=engine))
    first = runs[0]
    for r in runs[1:]:
        for a, b in zip(first, r):
            np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8),
                                          np.atleast_1d(b).view(np.uint8))


class TestDefaultThreads:
    @pytest.fixture(autouse=True)
    def clean_env(self, monkeypatch):
        monkeypatch.delenv("CNORM_NUM_THREADS", raising=False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(_config, "_num_threads", None)
        # the default is read from the environment once and cached: start afresh
        monkeypatch.setattr(_config, "_default_cache", None, raising=False)
        monkeypatch.setattr(_config, "_usable_cpus", lambda: 8)

    def test_affinity_mask_by_default(self):
        assert _config._default_threads() == 8 == cnorm.get_num_threads()

    @pytest.mark.parametrize("omp,expected", [("3", 3), ("1", 1), ("64", 8), ("4,2", 4), ("", 8)])
    def test_omp_num_threads_caps(self, monkeypatch, omp, expected):
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
        assert _config._default_threads() == expected == cnorm.get_num_threads()

    @pytest.mark.parametrize("omp", [None, "2", "16"])
    @pytest.mark.parametrize("cnorm_env,expected", [("5", 5), ("1", 1), ("12", 12)])
    def test_cnorm_num_threads_overrides(self, monkeypatch, omp, cnorm_env, expected):
        monkeypatch.setenv("CNORM_NUM_THREADS", cnorm_env)
        if omp is not None:
            monkeypatch.setenv("OMP_NUM_THREADS", omp)
        assert _config._default_threads() == expected == cnorm.get_num_threads()

    @pytest.mark.parametrize("name", ["CNORM_NUM_THREADS", "OMP_NUM_THREADS"])
    @pytest.mark.parametrize("value", ["0", "-2", "abc", "1.5"])
    def test_bad_environment_values(self, monkeypatch, name, value):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=name):
            _config._default_threads()

    def test_set_num_threads_wins(self, monkeypatch):
        monkeypatch.setenv("CNORM_NUM_THREADS", "5")
        cnorm.set_num_threads(3)
        assert cnorm.get_num_threads() == 3
        with pytest.raises(ValueError):
            cnorm.set_num_threads(0)
        with pytest.raises(TypeError):
            cnorm.set_num_threads(1.5)
        assert cnorm.get_num_threads() == 3

    def test_real_affinity_mask(self, monkeypatch):
        monkeypatch.undo()
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
        assert _config._usable_cpus() == 3


@pytest.mark.parametrize("env,expected", [({"CNORM_NUM_THREADS": "3"}, 3),
                                          ({"OMP_NUM_THREADS": "1"}, 1),
                                          ({"OMP_NUM_THREADS": "1", "CNORM_NUM_THREADS": "2"}, 2)])
def test_thread_environment_in_a_fresh_process(env, expected):
    clean = {k: v for k, v in os.environ.items() if k not in ("CNORM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", "import cnorm; print(cnorm.get_num_threads())"],
                         env=clean | env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == expected


# ---------------------------------------------------------------- known gaps (strict xfail)
NEAR_OVERFLOW_BUG = ("float64 data near the overflow threshold: the pilot/block sums or the "
                     "squared deviations overflow although mean and variance are representable")
NEAR_OVERFLOW = {"pair": ([1.5e308, 1.5e308], ("numpy",)),
                 "constant-3000": ([-1.7e308] * 3000, ("numpy",)),
                 "four": ([1e308, 1.2e308, 1.1e308, 1.3e308], ("numpy",)),
                 "outlier-square-overflows": ([0.0, 0.0, 0.0, 2e154], ALL)}


@pytest.mark.parametrize("case", list(NEAR_OVERFLOW))
def test_float64_near_overflow(engine, case, request):
    """Values near the float64 maximum: mean and variance are representable (SPEC §3, any scale)."""
    values, affected = NEAR_OVERFLOW[case]
    known_bug(request, engine, affected, NEAR_OVERFLOW_BUG)
    x = np.array(values, dtype=np.float64)
    em, ev = exact_moments(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, v = cnorm.moments(x, backend=engine)
    assert_ulps(m, em, np.float64, MEAN_TOL, "mean near overflow")
    if np.isfinite(round_to_dtype(ev[()], np.float64)):   # the contract covers representable results
        assert_ulps(v, ev, np.float64, 2.0, "var near overflow")


@pytest.mark.parametrize("n", [16, 17, 2048, 2049, 5000])
def test_constant_huge_float64_slices(engine, n, request):
    """Constant slices of huge float64 values: variance exactly 0 (the pilot mean may be
    off by one ulp; its square must not overflow)."""
    vals = np.array([1e300, 1e200, -3e250], dtype=np.float64)
    for x, axis in [(np.repeat(vals[:, None], n, axis=1), 1),
                    (np.repeat(vals[None, :], n, axis=0), 0)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m, v = cnorm.moments(x, axis=axis, backend=engine)
        assert (v == 0).all(), f"axis={axis}: var {v}"


STD_SCALES = [pytest.param("float64", s, marks=pytest.mark.xfail(strict=True, reason=(
                  "float64 std is sqrt of the variance rounded to float64: when the variance "
                  "underflows (data ~1e-165 or subnormal) or overflows (data ~1e160) the std is "
                  "0/garbage/inf although it is representable")))
              for s in (1e-310, 1e-165, 1e155, 1e160)]
STD_SCALES += [("float32", 1e-40), ("float32", 1e-23), ("float32", 1e25),
               ("float16", 1e-7), ("float16", 3e2)]


@pytest.mark.parametrize("dtype_name,scale", STD_SCALES)
def test_std_when_var_is_not_representable(engine, dtype_name, scale):
    """std within the contract when only the variance under- or overflows the dtype."""
    dt = np.dtype(dtype_name)
    x = offset_data(dt, 1000, 0.0, scale, _seeded("std scale", dtype_name, scale))
    es = exact_std(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = cnorm.std(x, backend=engine)
    assert_ulps(s, es, dt, VAR_TOL[dt], f"std of N(0,1)*{scale:g}")


HUGE_CASES = {"pair-1e150": ([1e150, -1e150], ()),
              "three-1e150": ([1e150, -1e150, 3e150], ()),
              "pair-1e153": ([1e153, -1e153], ()),
              "three-4e153": ([3.0, 4e153, -4e153], ("numpy",)),
              "normal-1e150": ("N(0,1)*1e150 x 3001", ()),
              "offset-1e158": ("1e158 + N(0,1)*1e150 x 3001", ())}


@pytest.mark.parametrize("name", list(HUGE_CASES))
def test_float64_huge_scale(engine, name, request):
    """float64 data whose variance is large but representable (1e300 .. 1e307)."""
    case, affected = HUGE_CASES[name]
    known_bug(request, engine, affected, DEKKER_BUG)
    if isinstance(case, str):
        rng = _seeded("huge", case)
        x = offset_data(np.float64, 3001, 1e158 if case.startswith("1e158") else 0.0, 1e150, rng)
    else:
        x = np.array(case, dtype=np.float64)
    em, ev = exact_moments(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, v = cnorm.moments(x, backend=engine)
    assert_ulps(m, em, np.float64, MEAN_TOL, "mean")
    assert_ulps(v, ev, np.float64, 2.0, "var")


# ---------------------------------------------------------------- the exact reference itself
def _brute(values, ddof=0):
    f = [Fraction(float(v)) for v in values]
    mu = sum(f, Fraction(0)) / len(f)
    return mu, sum(((v - mu) ** 2 for v in f), Fraction(0)) / (len(f) - ddof)


@pytest.mark.parametrize("dtype_name", ["float16", "float32", "float64"])
def test_exact_reference_matches_plain_fractions(dtype_name):
    dt = np.dtype(dtype_name)
    rows = np.stack([r for _, r in adversarial_rows(dt, 23, _seeded("self", dtype_name))])
    em, ev = exact_moments(rows, 1, 1)
    for i, row in enumerate(rows):
        assert (em[i], ev[i]) == _brute(row, 1)
    em0, _ = exact_moments(np.ascontiguousarray(rows.T), 0)
    assert list(em0) == list(em)
    # round_to_dtype agrees with NumPy's correctly rounded float64 -> dtype cast
    vals = np.concatenate([r.astype(np.float64) for r in rows]) * 1.0000001
    for v in vals[np.isfinite(vals)][:300]:
        assert round_to_dtype(Fraction(float(v)), dt) == float(np.float64(v).astype(dt))


def test_exact_normalized_and_ulp_error():
    x = np.array([[1e8 + 1, 1e8 + 2, 1e8 + 4], [3.0, 3.0, 3.0]])
    y = exact_normalized(x, -1, 1e-5)
    mu, var = _brute(x[0])
    assert y[1].tolist() == [0, 0, 0]
    for got, v in zip(y[0], x[0]):
        want = (Fraction(v) - mu) / Fraction(float(np.sqrt(float(var + Fraction(1e-5)))))
        assert abs(float(got) / float(want) - 1) < 1e-15
    one = Fraction(1)
    assert ulp_error(np.nextafter(1.0, 2.0), one, np.float64) == 1.0
    assert ulp_error(np.float32(1.0), one + Fraction(1, 2**24), np.float32) == 0.5
    assert ulp_error(np.float16(6e-8), Fraction(0), np.float16) == 1.0      # subnormal ulp
    assert ulp_error(np.nan, float("nan"), np.float64) == 0
    assert ulp_error(np.inf, float("inf"), np.float64) == 0
    assert ulp_error(np.inf, Fraction(10**400), np.float64) == 0          # rounds to inf
    assert ulp_error(np.nan, one, np.float64) == np.inf
    assert ulp_error(1.0, float("nan"), np.float64) == np.inf

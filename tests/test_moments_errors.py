"""SPEC §5 for moments/mean/var/std: bad input raises a clear error naming the
argument (and the value), before any output is touched."""
from __future__ import annotations

import re

import numpy as np
import pytest
from numpy.exceptions import AxisError

import cnorm

FUNCS = ["moments", "mean", "var", "std"]
REDUCERS = ["mean", "var", "std"]          # the ones with out=
X = np.arange(24, dtype=np.float64).reshape(2, 3, 4)


def call(fn, x=X, **kw):
    return getattr(cnorm, fn)(x, **kw)


def named(word):
    """A regex that finds ``word`` as a whole word in the message."""
    return rf"(?<![A-Za-z_]){re.escape(word)}(?![A-Za-z_])"


# ---------------------------------------------------------------- x
BAD_X = {
    "complex": np.ones(4, dtype=np.complex128),
    "complex64": np.ones((2, 2), dtype=np.complex64),
    "object": np.array([1.0, None, 2.0], dtype=object),
    "object-numbers": np.array([1.0, 2.0], dtype=object),
    "str": np.array(["a", "b"]),
    "bytes": np.array([b"a", b"b"]),
    "str-list": ["1.0", "2.0"],
    "datetime": np.array(["2024-01-01", "2024-01-02"], dtype="datetime64[D]"),
    "timedelta": np.array([1, 2], dtype="timedelta64[s]"),
    "structured": np.zeros(3, dtype=[("a", "f8"), ("b", "f8")]),
}


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("kind", list(BAD_X))
def test_bad_dtype_is_a_type_error_naming_x(fn, kind):
    x = BAD_X[kind]
    with pytest.raises(TypeError, match=named("x")) as info:
        call(fn, x)
    dtype = np.asarray(x).dtype
    assert str(dtype) in str(info.value) or dtype.name in str(info.value)


@pytest.mark.parametrize("fn", FUNCS)
def test_python_complex_scalar(fn):
    with pytest.raises(TypeError, match=named("x")):
        call(fn, 1 + 2j)


# ---------------------------------------------------------------- axis
@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("axis", [3, -4, 10, (0, 3), (-4,), [1, 5]])
def test_axis_out_of_range(fn, axis):
    with pytest.raises(AxisError):
        call(fn, axis=axis)


@pytest.mark.parametrize("fn", FUNCS)
def test_axis_on_zero_dim(fn):
    with pytest.raises(AxisError):
        call(fn, np.float64(1.0), axis=0)


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("axis", [(0, 0), (1, -2), (2, -1, 0), [0, 0]])
def test_repeated_axis(fn, axis):
    with pytest.raises(ValueError, match="axis") as info:
        call(fn, axis=axis)
    assert not isinstance(info.value, AxisError)


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("axis", [1.0, "0", (0, 1.5), True, np.float64(1), (None,), {0}])
def test_non_integer_axis(fn, axis):
    with pytest.raises(TypeError, match="axis"):
        call(fn, axis=axis)


@pytest.mark.parametrize("fn", FUNCS)
def test_numpy_integer_axes_accepted(fn):
    r = call(fn, axis=(np.int64(0), np.int32(-1)))
    assert np.shape(r if fn != "moments" else r[0]) == (3,)


# ---------------------------------------------------------------- ddof, keepdims, dtype
@pytest.mark.parametrize("fn", ["moments", "var", "std"])
@pytest.mark.parametrize("ddof,exc", [(float("nan"), ValueError), (np.float64("nan"), ValueError),
                                      ("1", TypeError), (None, TypeError), ([1], TypeError),
                                      (1 + 0j, TypeError)])
def test_bad_ddof(fn, ddof, exc):
    with pytest.raises(exc, match=named("ddof")):
        call(fn, ddof=ddof)


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("dtype", [np.complex128, np.int32, "U3", object, np.bool_])
def test_bad_result_dtype(fn, dtype):
    with pytest.raises(TypeError, match="dtype"):
        call(fn, dtype=dtype)


@pytest.mark.parametrize("fn", FUNCS)
def test_unknown_dtype_name(fn):
    with pytest.raises(TypeError, match="dtype"):
        call(fn, dtype="float128x")


# ---------------------------------------------------------------- weights (moments)
@pytest.mark.parametrize("weights", [np.ones(5), np.ones((3, 3)), np.ones((2, 3, 4, 1)),
                                     np.ones((4, 3, 2))])
def test_weights_wrong_shape(weights):
    with pytest.raises(ValueError, match=named("weights")):
        cnorm.moments(X, weights=weights)


@pytest.mark.parametrize("bad", [-1.0, -1e-300, np.nan, -np.inf])
def test_weights_negative_or_nan(bad):
    w = np.ones(X.shape)
    w[1, 2, 3] = bad
    with pytest.raises(ValueError, match=named("weights")):
        cnorm.moments(X, axis=-1, weights=w)


def test_weights_infinite():
    w = np.ones(X.shape)
    w[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=named("weights")):
        cnorm.moments(X, weights=w)


@pytest.mark.parametrize("weights", [np.ones(4, dtype=np.complex128), np.array(["a"] * 4)])
def test_weights_wrong_dtype(weights):
    with pytest.raises(TypeError, match=named("weights")):
        cnorm.moments(X, weights=weights)


def test_skipna_must_be_a_bool():
    with pytest.raises(TypeError, match="skipna"):
        cnorm.moments(X, skipna="yes")
    with pytest.raises(TypeError, match="skipna"):
        cnorm.moments(X, skipna=None)


# ---------------------------------------------------------------- out (mean/var/std)
@pytest.mark.parametrize("fn", REDUCERS)
@pytest.mark.parametrize("shape,kw", [((3,), dict(axis=(0, 1))), ((2, 3), dict(axis=(0, 1))),
                                      ((1, 3, 4), dict(axis=0)), ((3, 4), dict(axis=0, keepdims=True)),
                                      ((1,), dict()), ((2,), dict(axis=1))])
def test_out_wrong_shape(fn, shape, kw):
    out = np.full(shape, 7.0)
    with pytest.raises(ValueError, match=named("out")):
        call(fn, out=out, **kw)
    assert (out == 7.0).all()


@pytest.mark.parametrize("fn", REDUCERS)
def test_out_read_only(fn):
    out = np.full((3, 4), 7.0)
    out.flags.writeable = False
    with pytest.raises(ValueError, match=named("out")):
        call(fn, axis=0, out=out)
    assert (out == 7.0).all()


@pytest.mark.parametrize("fn", REDUCERS)
@pytest.mark.parametrize("out", [[0.0] * 4, (0.0,) * 4, 3.0, "out", memoryview(bytearray(32))])
def test_out_not_an_ndarray(fn, out):
    with pytest.raises(TypeError, match=named("out")):
        call(fn, axis=(0, 1), out=out)


@pytest.mark.parametrize("fn", REDUCERS)
@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_out_integer_dtype(fn, dtype):
    out = np.full(4, 7, dtype=dtype)
    before = out.copy()
    with pytest.raises(TypeError, match=named("out")):
        call(fn, axis=(0, 1), out=out)
    np.testing.assert_array_equal(out, before)


# ---------------------------------------------------------------- backend and num_threads
@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("backend", ["bogus", "Cython", "", "torch", None, 1])
def test_unknown_backend(fn, backend):
    with pytest.raises(ValueError, match=named("backend")) as info:
        call(fn, backend=backend)
    assert repr(backend) in str(info.value)


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("n,exc", [(0, ValueError), (-1, ValueError), (np.int64(-3), ValueError),
                                   (1.5, TypeError), (2.0, TypeError), ("2", TypeError),
                                   (True, TypeError)])
def test_bad_num_threads(fn, n, exc):
    with pytest.raises(exc, match=named("num_threads")) as info:
        call(fn, num_threads=n)
    assert str(n) in str(info.value) or repr(n) in str(info.value)


@pytest.mark.parametrize("fn", FUNCS)
def test_numpy_integer_threads_accepted(fn):
    call(fn, num_threads=np.int64(1))


# ---------------------------------------------------------------- nothing touched on failure
FAILING_CALLS = {
    "backend": dict(backend="bogus"),
    "num_threads": dict(num_threads=0),
    "num_threads-float": dict(num_threads=1.5),
    "ddof": dict(ddof=float("nan")),
    "ddof-str": dict(ddof="1"),
    "dtype": dict(dtype=np.complex64),
    "axis-type": dict(axis=(0, 1.0)),
}


@pytest.mark.parametrize("fn,case", [(fn, case) for fn in REDUCERS for case in FAILING_CALLS
                                     if not (fn == "mean" and case.startswith("ddof"))])
def test_out_untouched_when_the_call_fails(fn, case):
    kw = dict(FAILING_CALLS[case])
    out = np.full(4, 7.0)
    before = out.copy()
    with pytest.raises((TypeError, ValueError)):
        call(fn, axis=kw.pop("axis", (0, 1)), out=out, **kw)
    np.testing.assert_array_equal(out, before)


@pytest.mark.parametrize("fn", REDUCERS)
def test_out_untouched_for_bad_x_or_axis(fn):
    out = np.full(4, 7.0)
    with pytest.raises(TypeError):
        call(fn, BAD_X["complex"], out=out)
    with pytest.raises(AxisError):
        call(fn, axis=5, out=out)
    with pytest.raises(ValueError):
        call(fn, axis=(0, 0), out=out)
    assert (out == 7.0).all()


def test_input_never_modified():
    x = X.copy()
    w = np.ones(X.shape)
    cnorm.moments(x, axis=1, weights=w, ddof=1)
    cnorm.moments(x, skipna=True)
    for fn in REDUCERS:
        call(fn, x, axis=(0, 2))
    np.testing.assert_array_equal(x, X)
    assert (w == 1).all()


def test_read_only_input_is_fine():
    x = X.copy()
    x.flags.writeable = False
    m, v = cnorm.moments(x, axis=0)
    assert m.shape == v.shape == (3, 4)

"""RunningMoments against exact rational arithmetic on the stored values."""
import pickle
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.exceptions import AxisError

import cnorm
from cnorm import RunningMoments
from conftest import require


def exact_moments(x, axis, weights=None):
    """Exact (count, mean, M2) per kept position as Fractions (object arrays)."""
    x = np.asarray(x)
    axes = tuple(range(x.ndim)) if axis is None else tuple(
        a % x.ndim for a in (axis if isinstance(axis, tuple) else (axis,)))
    w = np.ones(x.shape) if weights is None else np.broadcast_to(weights, x.shape)
    xt = np.moveaxis(x, axes, tuple(range(len(axes)))).reshape(-1, *[
        s for i, s in enumerate(x.shape) if i not in axes])
    wt = np.moveaxis(w, axes, tuple(range(len(axes)))).reshape(xt.shape)
    kept = xt.shape[1:]
    n, mean, m2 = (np.empty(kept, dtype=object) for _ in range(3))
    for idx in np.ndindex(*kept):
        vals = [Fraction(float(v)) for v in xt[(slice(None),) + idx]]
        ws = [Fraction(float(v)) for v in wt[(slice(None),) + idx]]
        W = sum(ws)
        m = sum(a * b for a, b in zip(ws, vals)) / W if W else None
        n[idx], mean[idx] = W, m
        m2[idx] = sum(b * (a - m) ** 2 for a, b in zip(vals, ws)) if W else None
    return n, mean, m2


def ulps(got, exact, dtype=np.float64):
    """Error of ``got`` (rounded to ``dtype``) against Fraction ``exact``, in ulps of dtype."""
    got = np.atleast_1d(np.asarray(got).astype(dtype))
    exact = np.atleast_1d(exact)
    out = np.empty(got.shape)
    for i in np.ndindex(*got.shape):
        ref = exact[i]
        sp = np.spacing(abs(dtype(float(ref)))) if ref else np.finfo(dtype).smallest_subnormal
        out[i] = float(abs(Fraction(float(got[i])) - ref) / Fraction(float(sp)))
    return out


def check_exact(rm, x, axis, weights=None, ddof=0, mean_ulps=1.0, var_ulps=2.0,
                dtype=np.float64):
    n, mean, m2 = exact_moments(x, axis, weights)
    np.testing.assert_array_equal(rm.count, n.astype(float))
    assert ulps(rm.mean, mean, dtype).max() <= mean_ulps
    var = np.vectorize(lambda q, c: q / (c - ddof), otypes=[object])(m2, n)
    assert ulps(rm.var(ddof), var, dtype).max() <= var_ulps


def offset_data(rng, shape, dtype, offset):
    return (offset + rng.standard_normal(shape) * 3).astype(dtype)


@pytest.mark.parametrize("axis", [0, (0, 2), -1, None])
def test_streaming_matches_exact_float64_at_offset(rng, axis):
    x = offset_data(rng, (23, 3, 4), np.float64, 1e9)
    x[:, 1, :] = 1e9 + 0.5  # a constant column
    rm = RunningMoments(axis)
    split_axis = 0 if axis in (0, (0, 2), None) else 2
    for part in np.array_split(x, [1, 2, 9, 9, 17], axis=split_axis):  # includes n=1 and n=0 chunks
        rm.update(part)
    check_exact(rm, x, axis)
    check_exact(rm, x, axis, ddof=1)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_streaming_low_precision_inputs(rng, dtype):
    x = offset_data(rng, (40, 3), dtype, 1000 if dtype == np.float16 else 1e5)
    rm = RunningMoments()
    for part in np.array_split(x, 13):
        rm.update(part)
    # the contract for 16/32-bit data: 1 ulp of their dtype; float64 accumulation
    # also keeps the float64 results within 2**-40 (2**13 float64 ulps)
    check_exact(rm, x, 0, mean_ulps=1.0, var_ulps=1.0, dtype=dtype)
    check_exact(rm, x, 0, mean_ulps=2.0**13, var_ulps=2.0**13)
    assert rm.mean.dtype == np.float64


def test_constant_and_single_values(rng):
    rm = RunningMoments().update(np.full((1, 3), 7.25))
    assert np.array_equal(rm.var(), np.zeros(3)) and np.array_equal(rm.mean, np.full(3, 7.25))
    with pytest.warns(RuntimeWarning):
        assert np.isnan(rm.var(ddof=1)).all()
    rm.update(np.full((5, 3), 7.25))
    assert np.array_equal(rm.var(ddof=1), np.zeros(3)) and np.array_equal(rm.count, np.full(3, 6.0))


def test_merge_in_any_order_agrees(rng):
    x = offset_data(rng, (60, 4), np.float64, -3e7)
    parts = [RunningMoments().update(p) for p in np.array_split(x, [1, 5, 6, 30, 31])]
    left = parts[0]
    for p in parts[1:]:
        left = left + p
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = p + right
    tree = (parts[0] + parts[3]) + ((parts[5] + parts[1]) + (parts[4] + parts[2]))
    inplace = RunningMoments()
    for p in parts[::-1]:
        inplace.merge(p)
    for rm in (left, right, tree, inplace):
        check_exact(rm, x, 0)
    one_shot_mean, one_shot_var = cnorm.moments(x, axis=0)
    for rm in (left, right, tree, inplace):
        assert np.max(np.abs(rm.mean - one_shot_mean) / np.spacing(one_shot_mean)) <= 1
        assert np.max(np.abs(rm.var() - one_shot_var) / np.spacing(one_shot_var)) <= 2


def test_add_returns_new_object_and_merge_is_in_place(rng):
    a = RunningMoments().update(rng.standard_normal((5, 2)))
    b = RunningMoments().update(rng.standard_normal((7, 2)))
    a_count, b_count = a.count.copy(), b.count.copy()
    c = a + b
    assert c is not a and np.array_equal(a.count, a_count) and np.array_equal(b.count, b_count)
    assert np.array_equal(c.count, a_count + b_count)
    assert a.merge(b) is a and np.array_equal(a.count, c.count)
    a += b
    assert np.array_equal(a.count, a_count + 2 * b_count) and np.array_equal(b.count, b_count)


def test_weights_are_frequency_weights(rng):
    x = offset_data(rng, (12, 3), np.float64, 1e8)
    w = rng.integers(0, 4, size=(12, 1))
    rm = RunningMoments().update(x[:5], weights=w[:5]).update(x[5:], weights=w[5:])
    check_exact(rm, x, 0, weights=np.broadcast_to(w, x.shape))
    repeated = RunningMoments().update(np.repeat(x, w[:, 0], axis=0))
    np.testing.assert_array_equal(rm.count, repeated.count)
    assert np.max(np.abs(rm.var(1) - repeated.var(1)) / np.spacing(repeated.var(1))) <= 2


def test_empty_object_and_empty_chunks():
    rm = RunningMoments(axis=1)
    assert rm.count == 0 and np.isnan(rm.mean) and rm.kept_shape is None
    rm.update(np.empty((3, 0)))
    assert rm.kept_shape == (3,) and np.array_equal(rm.count, np.zeros(3))
    with pytest.warns(RuntimeWarning):
        assert np.isnan(rm.var()).all()
    rm.update(np.arange(6.0).reshape(3, 2))
    np.testing.assert_array_equal(rm.mean, [0.5, 2.5, 4.5])
    assert RunningMoments(axis=-1).merge(rm).kept_shape == (3,)
    assert (rm + RunningMoments(axis=1)).kept_shape == (3,)


def test_scalar_results_for_full_reduction():
    rm = RunningMoments(axis=None).update(np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert np.ndim(rm.mean) == 0 and rm.mean == 2.5 and rm.var() == 1.25 and rm.count == 4
    assert rm.std() == np.sqrt(1.25)


def test_nan_and_inf_stay_in_their_position():
    x = np.array([[1.0, np.nan, np.inf], [2.0, 3.0, 4.0]])
    rm = RunningMoments().update(x).update(np.ones((2, 3)))
    mean, var = rm.mean, rm.var()
    assert np.isfinite(mean[0]) and np.isfinite(var[0])
    assert np.isnan(mean[1]) and np.isnan(var[1]) and mean[2] == np.inf and np.isnan(var[2])
    skipped = RunningMoments().update(x[:, :2], skipna=True)
    np.testing.assert_array_equal(skipped.count, [2.0, 1.0])


def test_integer_bool_and_mixed_dtypes():
    rm = RunningMoments().update(np.array([[1, 2]], dtype=np.int64))
    rm.update(np.array([[True, False]])).update(np.array([[4.0, 6.0]], dtype=np.float32))
    np.testing.assert_array_equal(rm.mean, [2.0, 8 / 3])


def test_bfloat16_chunks():
    ml_dtypes = require("ml_dtypes")
    x = np.array([[1.5, 2.0], [2.5, 4.0]], dtype=ml_dtypes.bfloat16)
    rm = RunningMoments().update(x)
    np.testing.assert_array_equal(rm.mean, [2.0, 3.0])
    np.testing.assert_array_equal(rm.var(), [0.25, 1.0])


def test_pickle_round_trip(rng):
    rm = RunningMoments(axis=(0, -1)).update(rng.standard_normal((4, 3, 5)) + 1e6)
    clone = pickle.loads(pickle.dumps(rm))
    assert clone.axis == (0, 2) and clone.kept_shape == (3,)
    np.testing.assert_array_equal(clone.mean, rm.mean)
    np.testing.assert_array_equal(clone.var(), rm.var())
    more = rng.standard_normal((2, 3, 5))
    np.testing.assert_array_equal(clone.update(more).var(), rm.update(more).var())
    assert pickle.loads(pickle.dumps(RunningMoments(axis=2))).axis == 2


def test_repr():
    assert repr(RunningMoments()) == "RunningMoments(axis=0)"
    rm = RunningMoments().update(np.ones((3, 2)))
    assert repr(rm) == "RunningMoments(axis=(0,), kept_shape=(2,), count=3.0)"
    rm.update(np.ones((1, 2)), weights=np.array([1.0, 0.5]))
    assert "count=[3.5..4.0]" in repr(rm)


def _snapshot(rm):
    return (rm.axis, rm.kept_shape, rm._states.copy())


def _unchanged(rm, snap):
    return (rm.axis, rm.kept_shape) == snap[:2] and np.array_equal(rm._states, snap[2],
                                                                   equal_nan=True)


@pytest.mark.parametrize("bad, kwargs, exc", [
    (np.ones((3, 4)), {}, ValueError),                        # kept shape differs
    (np.ones((3, 2, 1)), {}, ValueError),                     # ndim differs
    (np.ones((3, 2), dtype=complex), {}, TypeError),
    (np.array([["a", "b"]]), {}, TypeError),
    (np.ones((3, 2), dtype=object), {}, TypeError),
    (np.ones((3, 2)), {"weights": -np.ones((3, 1))}, ValueError),
    (np.ones((3, 2)), {"weights": np.full((3, 1), np.nan)}, ValueError),
    (np.ones((3, 2)), {"weights": np.ones(3)}, ValueError),   # does not broadcast
    (np.ones((3, 2)), {"skipna": "yes"}, TypeError),
])
def test_bad_update_leaves_state_unchanged(rng, bad, kwargs, exc):
    rm = RunningMoments().update(rng.standard_normal((5, 2)))
    snap = _snapshot(rm)
    with pytest.raises(exc):
        rm.update(bad, **kwargs)
    assert _unchanged(rm, snap)


def test_bad_merge_leaves_state_unchanged(rng):
    rm = RunningMoments().update(rng.standard_normal((5, 2)))
    snap = _snapshot(rm)
    others = [RunningMoments(axis=1).update(rng.standard_normal((2, 5))),
              RunningMoments().update(rng.standard_normal((5, 3))),
              RunningMoments().update(rng.standard_normal((5, 2, 1))),
              RunningMoments(axis=1)]
    for other in others:
        with pytest.raises(ValueError):
            rm.merge(other)
        with pytest.raises(ValueError):
            rm + other
        assert _unchanged(rm, snap)
    with pytest.raises(TypeError):
        rm.merge(np.ones(2))
    with pytest.raises(TypeError):
        rm + 1
    assert _unchanged(rm, snap)


def test_bad_axis():
    with pytest.raises(TypeError):
        RunningMoments(axis=1.5)
    with pytest.raises(TypeError):
        RunningMoments(axis=(0, True))
    rm = RunningMoments(axis=3)
    with pytest.raises(AxisError):
        rm.update(np.ones((2, 2)))
    assert rm.kept_shape is None
    with pytest.raises(ValueError):
        RunningMoments(axis=(0, -2)).update(np.ones((2, 2)))
    with pytest.raises(TypeError):
        RunningMoments().var(ddof="1")


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), data=st.data())
def test_random_shapes_axes_and_chunkings(shape, data):
    ndim = len(shape)
    axes = data.draw(st.lists(st.integers(-ndim, ndim - 1), min_size=1, max_size=ndim,
                              unique_by=lambda a: a % ndim).map(tuple))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    split = axes[0] % ndim
    full = list(shape)
    full[split] = data.draw(st.integers(1, 9))
    x = offset_data(rng, full, np.float64, data.draw(st.sampled_from([0.0, 1e6, -1e12])))
    cuts = sorted(data.draw(st.lists(st.integers(0, full[split]), max_size=3)))
    rm = RunningMoments(axis=axes)
    for part in np.array_split(x, cuts, axis=split):
        rm.update(part)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        check_exact(rm, x, axes)

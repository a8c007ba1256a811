"""cnorm.dask against exact rational arithmetic, any chunking, and on a process cluster."""
import pickle
from fractions import Fraction

import numpy as np
import pytest
from numpy.exceptions import AxisError

from conftest import require

da = require("dask.array")
dask = require("dask")
cdask = require("cnorm.dask")


@pytest.fixture(autouse=True)
def synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def exact_mean_var(x, axis, ddof=0):
    """Exact mean and var per kept position (Fractions, object arrays)."""
    x = np.asarray(x)
    axes = tuple(range(x.ndim)) if axis is None else tuple(
        a % x.ndim for a in (axis if isinstance(axis, tuple) else (axis,)))
    moved = np.moveaxis(x, axes, tuple(range(len(axes))))
    flat = moved.reshape(-1, *moved.shape[len(axes):])
    mean, var = (np.empty(flat.shape[1:], dtype=object) for _ in range(2))
    for idx in np.ndindex(*flat.shape[1:]):
        col = [Fraction(float(v)) for v in flat[(slice(None),) + idx]]
        m = sum(col) / len(col)
        mean[idx], var[idx] = m, sum((v - m) ** 2 for v in col) / (len(col) - ddof)
    return mean, var


def max_ulps(got, exact, dtype=np.float64):
    got = np.atleast_1d(np.asarray(got))
    exact = np.atleast_1d(exact)
    worst = 0.0
    for g, r in zip(got.ravel(), exact.ravel()):
        sp = np.spacing(abs(dtype(float(r)))) if r else np.finfo(dtype).smallest_subnormal
        worst = max(worst, float(abs(Fraction(float(g)) - r) / Fraction(float(sp))))
    return worst


@pytest.mark.parametrize("chunks", [(1, 2, 5), (7, 3, 2), (30, 4, 5)])
@pytest.mark.parametrize("axis", [None, 0, (0, 2), -1, 1])
def test_moments_exact_for_any_chunking(rng, chunks, axis):
    x = 1e9 + 3 * rng.standard_normal((30, 4, 5))
    x[:, 2, :] = 1e9 + 0.25  # constant slices
    dx = da.from_array(x, chunks=chunks)
    mean, var = cdask.moments(dx, axis, ddof=1, split_every=2)
    assert isinstance(mean, da.Array) and isinstance(var, da.Array)
    m, v = dask.compute(mean, var)
    em, ev = exact_mean_var(x, axis, ddof=1)
    assert np.shape(m) == em.shape and m.dtype == np.float64
    assert max_ulps(m, em) <= 1 and max_ulps(v, ev) <= 2
    if axis == 0:
        assert (v[2] == 0).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda d: np.dtype(d).name)
def test_low_precision_dtypes_keep_dtype_and_precision(rng, dtype):
    x = (200 + rng.standard_normal((50, 3))).astype(dtype)
    m, v = dask.compute(*cdask.moments(da.from_array(x, chunks=(4, 2)), 0))
    assert m.dtype == dtype and v.dtype == dtype
    em, ev = exact_mean_var(x, 0)
    assert max_ulps(m, em, dtype) <= 1 and max_ulps(v, ev, dtype) <= 1


def test_keepdims_dtype_weights_skipna(rng):
    x = 1e6 + rng.standard_normal((12, 3))
    dx = da.from_array(x, chunks=5)
    m, v = dask.compute(*cdask.moments(dx, 0, keepdims=True, dtype=np.float32))
    assert m.shape == (1, 3) and m.dtype == np.float32
    w = rng.integers(0, 3, (12, 1)).astype(float)
    m, v = dask.compute(*cdask.moments(dx, 0, weights=da.from_array(w, chunks=5)))
    em, ev = exact_mean_var(np.repeat(x, w[:, 0].astype(int), axis=0), 0)
    assert max_ulps(m, em) <= 1 and max_ulps(v, ev) <= 2
    x[3, 1] = np.nan
    m, _ = dask.compute(*cdask.moments(da.from_array(x, chunks=5), 0))
    assert np.isnan(m[1]) and np.isfinite(m[[0, 2]]).all()
    m, _ = dask.compute(*cdask.moments(da.from_array(x, chunks=5), 0, skipna=True))
    em, _ = exact_mean_var(np.delete(x[:, 1], 3), 0)
    assert max_ulps(m[1], em) <= 1
    ints = da.arange(10, chunks=3)
    m, v = dask.compute(*cdask.moments(ints))
    assert m == 4.5 and v == 8.25 and np.asarray(m).dtype == np.float64


def test_standardize_lazy_and_exact(rng):
    x = (1e5 + 2 * rng.standard_normal((40, 3))).astype(np.float32)
    x[:, 1] = 7.0
    y = cdask.standardize(da.from_array(x, chunks=(9, 2)))
    assert isinstance(y, da.Array) and y.dtype == np.float32 and y.chunks == ((9,) * 4 + (4,),
                                                                             (2, 1))
    out = y.compute()
    assert out.dtype == np.float32 and (out[:, 1] == 0).all()
    em, ev = exact_mean_var(x, 0)
    for j in (0, 2):
        s = Fraction(float(np.sqrt(float(ev[j]))))  # the float64 root is ~1e-16 off: negligible
        for i in range(40):
            ref = (Fraction(float(x[i, j])) - em[j]) / s
            tol = Fraction(float(np.spacing(np.float32(max(abs(float(ref)), 2**-10)))))
            assert abs(Fraction(float(out[i, j])) - ref) <= tol
    np.testing.assert_array_equal(
        cdask.standardize(da.from_array(x.astype(float), chunks=7), axis=None, ddof=1,
                          eps=0.5).compute(),
        require("cnorm").standardize(x.astype(float), axis=None, ddof=1, eps=0.5))


def test_scaler_fits_dask_arrays(rng):
    X = (1e5 + rng.standard_normal((500, 3))).astype(np.float32)
    X[7, 0] = np.nan
    dX = da.from_array(X, chunks=(37, 3))
    sc = cdask.StandardScaler().fit(dX)
    np.testing.assert_array_equal(sc.n_samples_seen_, [499, 500, 500])
    for j in range(3):
        em, ev = exact_mean_var(X[~np.isnan(X[:, j]), j], 0)
        assert max_ulps(sc.mean_[j], em) <= 1 and max_ulps(sc.var_[j], ev) <= 2
    ref = require("cnorm").StandardScaler().fit(X)
    np.testing.assert_allclose(sc.var_, ref.var_, rtol=1e-15)
    Y = sc.transform(dX)
    assert isinstance(Y, da.Array) and Y.dtype == np.float32
    np.testing.assert_array_equal(Y.compute(), sc.transform(X))
    np.testing.assert_allclose(sc.inverse_transform(Y).compute(), X, rtol=1e-6)
    np.testing.assert_array_equal(sc.transform(X), ref.transform(X))  # NumPy path unchanged


def test_scaler_partial_fit_weights_and_mixing(rng):
    X = 1e8 + rng.standard_normal((60, 2))
    w = rng.integers(0, 4, 60).astype(float)
    sc = cdask.StandardScaler()
    sc.partial_fit(da.from_array(X[:25], chunks=10), sample_weight=w[:25])
    sc.partial_fit(X[25:40], sample_weight=w[25:40])
    sc.partial_fit(da.from_array(X[40:], chunks=6), sample_weight=da.from_array(w[40:], chunks=4))
    rep = np.repeat(X, w.astype(int), axis=0)
    assert sc.n_samples_seen_ == w.sum()
    for j in range(2):
        em, ev = exact_mean_var(rep[:, j], 0)
        assert max_ulps(sc.mean_[j], em) <= 1 and max_ulps(sc.var_[j], ev) <= 2


def test_scaler_errors_leave_state_unchanged(rng):
    sc = cdask.StandardScaler().fit(da.from_array(rng.standard_normal((20, 3)), chunks=7))
    before = pickle.dumps(sc)
    bad = [da.ones((4, 2), chunks=2), da.ones(5, chunks=2), da.ones((0, 3), chunks=2),
           da.from_array(np.array([[1.0, np.inf, 0.0]]))]
    for X in bad:
        with pytest.raises(ValueError):
            sc.partial_fit(X)
    with pytest.raises(ValueError):
        sc.partial_fit(da.ones((4, 3), chunks=2), sample_weight=np.ones(5))
    with pytest.raises(TypeError):
        sc.partial_fit(da.ones((4, 3), chunks=2, dtype=complex))
    assert pickle.dumps(sc) == before


def test_bad_arguments():
    x = da.ones((4, 3), chunks=2)
    with pytest.raises(TypeError):
        cdask.moments(da.ones(3, dtype=complex, chunks=1))
    with pytest.raises(AxisError):
        cdask.moments(x, axis=2)
    with pytest.raises(ValueError):
        cdask.standardize(x, eps=-1.0)
    with pytest.raises(TypeError):
        cdask.moments(x, ddof="0")
    with pytest.raises(TypeError):
        cdask.moments(x, dtype=np.int32)


def test_states_are_small_picklable_records(rng):
    x = da.from_array(rng.standard_normal((10, 4)), chunks=3)
    records = cdask._state_array(x, (0,)).compute()
    assert records.dtype == cdask.STATE_DTYPE and records.shape == (4,)
    again = pickle.loads(pickle.dumps(records))
    np.testing.assert_array_equal(again["n"], np.full(4, 10.0))


def test_on_a_local_process_cluster(rng):
    distributed = require("distributed")
    x = 1e9 + rng.standard_normal((400, 3))
    dx = da.from_array(x, chunks=(50, 3))
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        m, v = client.compute(list(cdask.moments(dx, 0, ddof=1)), sync=True)
        z = client.compute(cdask.standardize(dx), sync=True)
        sc = cdask.StandardScaler().fit(dx)  # uses the client as the default scheduler
        assert len(client.scheduler_info()["workers"]) == 2
    em, ev = exact_mean_var(x, 0, ddof=1)
    assert max_ulps(m, em) <= 1 and max_ulps(v, ev) <= 2
    np.testing.assert_array_equal(z, cdask.standardize(dx).compute())
    np.testing.assert_array_equal(sc.mean_, m)

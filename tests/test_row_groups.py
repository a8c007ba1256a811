"""Short float64 rows of the row layers (layer / RMS / group / instance norm)
and of moments over the last axis: the statistics of CN_VW rows at a time in vectors across the rows
(``_rows_dd.h``).  They must give bitwise what the row-by-row path gives
(``set_row_groups(False)``) on every ISA path, whatever the row length, the
number of rows (partial groups) and the values (rows with NaN or inf in a
group take the row-by-row path), and meet the precision contract against the
exact reference.
"""
import contextlib

import numpy as np
import pytest

import cnorm
from cnorm import _config
from exact import exact_moments, exact_normalized, max_offset, ulp_error

pytestmark = pytest.mark.skipif(not _config.HAVE_EXTENSION, reason="no compiled kernels")

LENGTHS = list(range(1, 20)) + [31, 32, 33, 47, 63, 64, 100, 129, 1000, 4095, 4096]
ROWS = [1, 3, 8, 9, 17]


@contextlib.contextmanager
def isa_and_groups(isa, on):
    """The kernels of one ISA path, short rows grouped (on) or row by row."""
    previous = _config.isa_selected
    _config.use_isa(isa)
    old = _config.kernels.set_row_groups(on)
    try:
        yield
    finally:
        _config.kernels.set_row_groups(old)
        _config.use_isa(previous)


def _data(kind, R, L, rng):
    x = rng.standard_normal((R, L))
    if kind == "offset":
        x = 1e12 + x
    elif kind == "scales":  # each row its own scale and offset
        x = x * 10.0 ** rng.integers(-150, 150, size=(R, 1)) + rng.integers(-9, 9, size=(R, 1)) * 1e6
    elif kind == "constant":
        x[:] = 2.5
        x[1::2] = -0.0
    elif kind == "special":
        x[R // 2, (L - 1) // 2] = np.nan
        if R > 2:
            x[2, 0] = np.inf
        if R > 4:
            x[4, :] = 1.5e308  # finite values whose centred sum overflows for L > 1
        if R > 6:
            x[6, -1] = -np.inf
    return x


def _outputs(x, rng_seed, nt):
    rng = np.random.default_rng(rng_seed)
    L = x.shape[1]
    w, b = rng.standard_normal(L), rng.standard_normal(L)
    out = []
    with np.errstate(all="ignore"):
        for eps in (1e-5, 0.0):
            out += cnorm.layer_norm(x, -1, eps=eps, return_stats=True, num_threads=nt)
            out += cnorm.layer_norm(x, -1, w, b, eps=eps, activation="relu",
                                    return_stats=True, num_threads=nt)
            out += cnorm.rms_norm(x, -1, w, eps=eps, return_stats=True, num_threads=nt)
        # strided rows (a view of every other row) go through the same kernel
        out += cnorm.layer_norm(x[::2], -1, w, b, return_stats=True, num_threads=nt)
        # moments over the last axis: evenly spaced rows, and layouts that are not
        for v in (x, x[::2], x[::-1], x.reshape(1, *x.shape), np.stack([x, x[::-1]], axis=1)):
            for ddof in (0, 1):
                out += cnorm.moments(v, axis=-1, ddof=ddof, num_threads=nt)
        if L % 2 == 0:
            x4 = x.reshape(x.shape[0], 2, L // 2, 1)
            out += cnorm.group_norm(x4, 1, return_stats=True, num_threads=nt)
            out.append(cnorm.instance_norm(x4, np.ones(2), np.zeros(2), axis=1, num_threads=nt))
    return [np.asarray(o) for o in out]


def _same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=what)


@pytest.mark.filterwarnings("ignore:Degrees of freedom:RuntimeWarning")  # ddof=1 of one value
@pytest.mark.parametrize("isa", _config.isa_runnable)
@pytest.mark.parametrize("kind", ["randn", "offset", "scales", "constant", "special"])
def test_grouped_rows_are_bitwise_the_row_by_row_path(isa, kind):
    rng = np.random.default_rng(4096)
    for L in LENGTHS:
        for R in ROWS:
            x = _data(kind, R, L, rng)
            with isa_and_groups(isa, True):
                got = _outputs(x, L * 100 + R, 1)
            with isa_and_groups(isa, False):
                ref = _outputs(x, L * 100 + R, 1)
            assert len(got) == len(ref)
            for i, (g, r) in enumerate(zip(got, ref)):
                _same(g, r, f"{isa} {kind} R={R} L={L} output {i}")


@pytest.mark.parametrize("isa", _config.isa_runnable)
@pytest.mark.parametrize("L", [5, 32, 100])
def test_grouped_rows_with_threads(isa, L):
    """Enough rows for two threads: each thread's range starts its own groups."""
    rng = np.random.default_rng(L)
    x = rng.standard_normal((300000 // L + 3, L)) + 1e6
    x[7, 1] = np.nan
    with isa_and_groups(isa, False):
        ref = cnorm.layer_norm(x, -1, return_stats=True, num_threads=1)
        ref += cnorm.moments(x, axis=-1, num_threads=1)
    for nt in (1, 2):
        with isa_and_groups(isa, True):
            got = cnorm.layer_norm(x, -1, return_stats=True, num_threads=nt)
            got += cnorm.moments(x, axis=-1, num_threads=nt)
        for g, r in zip(got, ref):
            _same(g, r, f"{isa} L={L} threads={nt}")


@pytest.mark.parametrize("isa", _config.isa_runnable)
def test_grouped_rows_meet_the_contract(isa):
    """Outputs within 4 ulp of the exact (x - mean) / sqrt(var), measured relative
    to max(|y|, 2**-10); mean within 1 ulp; a NaN row and a constant row in the
    same group as offset rows of every scale."""
    rng = np.random.default_rng(11)
    for L in (1, 2, 3, 7, 15, 16, 17, 40):
        # rows of scale 10**k and offsets up to the contract's 1e15 times the scale
        scale = 10.0 ** rng.integers(-100, 100, size=(11, 1))
        offset = max_offset(np.float64) * rng.uniform(-1, 1, size=(11, 1)) * 10.0 ** -rng.integers(0, 9, size=(11, 1))
        x = (rng.standard_normal((11, L)) + offset) * scale
        x[3] = 7.0
        x[5, 0] = np.nan
        with isa_and_groups(isa, True), np.errstate(all="ignore"):
            y, mean, _ = cnorm.layer_norm(x, -1, eps=0.0, return_stats=True)
        ref = exact_normalized(x, -1, 0.0)
        if L == 1:
            ok = np.isnan(y) | (y == 0.0)  # var 0, eps 0: 0/0 is NaN, the constant row 0
            assert ok.all()
        else:
            finite = np.isfinite(x).all(axis=1)
            finite[3] = False  # the constant row: 0 / 0
            err = ulp_error(y[finite], ref[finite], np.float64, floor=2.0 ** -10)
            assert err.max() <= 4.0, f"{isa} L={L}: {err.max():.3g} ulp"
        assert np.isnan(y[5]).all() and np.isnan(mean[5])
        assert not np.isnan(np.delete(y, [3, 5], axis=0)).any() or L == 1
        assert (mean[3] == 7.0)
        with isa_and_groups(isa, True), np.errstate(all="ignore"):
            m, v = cnorm.moments(x, axis=-1)
        em, ev = exact_moments(x, -1)
        assert ulp_error(m, em, np.float64).max() <= 1.0, f"{isa} L={L} mean"
        assert ulp_error(v, ev, np.float64).max() <= 2.0, f"{isa} L={L} var"
        assert v[3] == 0.0 and np.isnan(v[5])

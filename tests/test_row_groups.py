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


DTYPES = [np.float16, np.float32, np.float64]
#: largest decimal exponent of a row scale, offset of the "offset" rows
SCALE_EXP = {np.float16: 2, np.float32: 15, np.float64: 150}
OFFSET = {np.float16: 1e2, np.float32: 1e6, np.float64: 1e12}


def _data(kind, R, L, rng, dtype):
    x = rng.standard_normal((R, L))
    e = SCALE_EXP[dtype]
    if kind == "offset":
        x = OFFSET[dtype] + x
    elif kind == "scales":  # each row its own scale and offset
        x = (x + rng.integers(-9, 9, size=(R, 1)) * OFFSET[dtype] / 100) * 10.0 ** rng.integers(-e, e, size=(R, 1))
    elif kind == "constant":
        x[:] = 2.5
        x[1::2] = -0.0
    elif kind == "special":
        x[R // 2, (L - 1) // 2] = np.nan
        if R > 2:
            x[2, 0] = np.inf
        if R > 4:  # finite values whose centred sum overflows for L > 1 (float64)
            x[4, :] = float(np.finfo(dtype).max) * 0.8
        if R > 6:
            x[6, -1] = -np.inf
    return x.astype(dtype)


def _outputs(x, rng_seed, nt):
    rng = np.random.default_rng(rng_seed)
    L = x.shape[1]
    w, b = rng.standard_normal(L), rng.standard_normal(L)  # float64 parameters
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
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["randn", "offset", "scales", "constant", "special"])
def test_grouped_rows_are_bitwise_the_row_by_row_path(isa, dtype, kind):
    rng = np.random.default_rng(4096)
    for L in LENGTHS:
        for R in ROWS:
            x = _data(kind, R, L, rng, dtype)
            with isa_and_groups(isa, True):
                got = _outputs(x, L * 100 + R, 1)
            with isa_and_groups(isa, False):
                ref = _outputs(x, L * 100 + R, 1)
            assert len(got) == len(ref)
            for i, (g, r) in enumerate(zip(got, ref)):
                _same(g, r, f"{isa} {np.dtype(dtype).name} {kind} R={R} L={L} output {i}")


@pytest.mark.parametrize("isa", _config.isa_runnable)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("L", [5, 32, 100])
def test_grouped_rows_with_threads(isa, dtype, L):
    """Enough rows for two threads: each thread's range starts its own groups."""
    rng = np.random.default_rng(L)
    x = (rng.standard_normal((300000 // L + 3, L)) + OFFSET[dtype]).astype(dtype)
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


#: (output, mean, var) tolerances of the contract, in ulp
TOL = {np.float16: (1.0, 1.0, 1.0), np.float32: (1.0, 1.0, 1.0), np.float64: (4.0, 1.0, 2.0)}


@pytest.mark.parametrize("isa", _config.isa_runnable)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_grouped_rows_meet_the_contract(isa, dtype):
    """Outputs within 1 ulp (float16/32) or 4 ulp (float64) of the exact
    (x - mean) / sqrt(var), measured relative to max(|y|, 2**-10); mean and var
    within the moments contract; a NaN row and a constant row in the same
    group as offset rows of every scale."""
    rng = np.random.default_rng(11)
    ytol, mtol, vtol = TOL[dtype]
    e = SCALE_EXP[dtype]
    for L in (1, 2, 3, 7, 15, 16, 17, 40):
        # rows of scale 10**k and offsets up to the contract's limit times the scale
        scale = 10.0 ** rng.integers(-e, e // 2 + 1, size=(11, 1))
        offset = max_offset(dtype) * rng.uniform(-1, 1, size=(11, 1)) * 10.0 ** -rng.integers(0, 4, size=(11, 1))
        x = ((rng.standard_normal((11, L)) + offset) * scale).astype(dtype)
        x[3] = 7.0
        x[5, 0] = np.nan
        with isa_and_groups(isa, True), np.errstate(all="ignore"):
            y, mean, _ = cnorm.layer_norm(x, -1, eps=0.0, return_stats=True)
            m, v = cnorm.moments(x, axis=-1)
        if L == 1:
            assert (np.isnan(y) | (y == 0.0)).all()  # var 0, eps 0: 0/0
        else:
            ref = exact_normalized(x, -1, 0.0)
            rows = [i for i in range(11) if i not in (3, 5) and np.ptp(x[i]) > 0]
            err = ulp_error(y[rows], ref[rows], dtype, floor=2.0 ** -10)
            assert err.max() <= ytol, f"{isa} L={L}: {err.max():.3g} ulp"
        assert np.isnan(y[5]).all() and np.isnan(mean[5])
        assert mean[3] == 7.0
        em, ev = exact_moments(x, -1)
        assert ulp_error(m, em, dtype).max() <= mtol, f"{isa} L={L} mean"
        assert ulp_error(v, ev, dtype).max() <= vtol, f"{isa} L={L} var"
        assert v[3] == 0.0 and np.isnan(v[5])

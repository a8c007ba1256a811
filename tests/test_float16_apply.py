"""float16 outputs in float32 arithmetic (src/cnorm/_apply_h32.h).

The apply pass of float16 data computes ``(((x - m0) - m1) * r0) * w + b`` in
float32 (the mean as a float32 pair) where the statistics and parameters are
at most 2**32 in magnitude, and the float64 expression for the elements where
they are not.  These tests check the definition against exact arithmetic, the
fallback on values a float32 step would overflow, and that every path (the
vector loops of each ISA, their scalar tails, the chunked loop of other
layouts and activations, the Numba backend) gives the same bits.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import cnorm
from cnorm import _config
from conftest import require
from exact import exact_normalized, ulp_error

H = np.float16


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint16)


def _rows(rng, shape, offset=0.0):
    return (offset + rng.standard_normal(shape) * 3.0).astype(H)


@pytest.mark.parametrize("n", [1, 7, 16, 17, 100, 1031])
def test_affine_output_within_one_ulp_of_exact(backend, n, rng):
    """With weight in [0.5, 2] and no bias (no cancellation in the affine step)
    the float16 output stays within 1 ulp of the exact value (measured as the
    normalized-output contract: relative to max(|y|, 2**-10))."""
    x = _rows(rng, (6, n), offset=40.0)
    w = rng.uniform(0.5, 2.0, n)
    y = cnorm.layer_norm(x, -1, w, np.zeros(n), eps=1e-5, backend=backend)
    z = exact_normalized(x, -1, eps=1e-5)
    exact = np.empty(z.shape, object)
    for idx in np.ndindex(z.shape):
        exact[idx] = z[idx] * Fraction(float(w[idx[-1]]))
    err = ulp_error(y, exact, H, floor=2.0 ** -10)
    assert np.max(err) <= 1.0


def test_overflowing_parameters_take_the_float64_expression(rng):
    """w = 1e300 (float32: inf) on a constant slice: the float64 expression gives
    0 * 1e300 + b = b; in float32 it would be 0 * inf = NaN."""
    x = np.full((3, 40), 7.0, H)
    w = np.full(40, 1e300)
    b = np.linspace(-2, 2, 40)
    y = cnorm.layer_norm(x, -1, w, b)
    np.testing.assert_array_equal(y, np.broadcast_to(b.astype(H), y.shape))


def test_tiny_running_variance_takes_the_float64_expression():
    """Eval batch norm with running_var = 1e-300 (rstd 1e150, beyond float32) and
    x equal to the running mean: (x - mean) * rstd is 0, the output the bias."""
    x = np.full((4, 3, 5, 5), 2.0, H)
    bias = np.array([0.5, -1.0, 3.0])
    y = cnorm.batch_norm(x, np.ones(3), bias, training=False, running_mean=np.full(3, 2.0),
                         running_var=np.full(3, 1e-300), eps=0.0)
    np.testing.assert_array_equal(y, np.broadcast_to(bias.astype(H)[None, :, None, None],
                                                     y.shape))
    assert not np.isnan(y).any()


def _mixed_params(rng, n, mixed):
    """Parameters in range (the vector loops), or (mixed) a few beyond 2**32: the
    elements in float64, and the whole call in the per-element loop."""
    w = rng.uniform(-2.0, 2.0, n)
    b = rng.uniform(-1.0, 1.0, n)
    w[7::17] = 1e-3
    if mixed:
        w[3::11] = 2.0 ** 33
        b[5::13] = -1e12
    return w, b


MIXED = pytest.mark.parametrize("mixed", [False, True], ids=["in-range", "mixed"])


def _assert_every_path_gives(ref, run, x):
    """run(x, backend) on every ISA path, on a strided view of x (the chunked
    loop) and with the Numba backend: the bits of ref each time."""
    previous = _config.isa_selected
    try:
        for isa in _config.isa_runnable:
            _config.use_isa(isa)
            np.testing.assert_array_equal(_bits(run(x, "cython")), _bits(ref), err_msg=isa)
    finally:
        _config.use_isa(previous)
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), H)
    big[..., ::2] = x
    np.testing.assert_array_equal(_bits(run(big[..., ::2], "cython")), _bits(ref),
                                  err_msg="strided")
    require("numba")
    np.testing.assert_array_equal(_bits(run(x, "numba")), _bits(ref), err_msg="numba")


CASES = [
    ("layer_norm", lambda x, w, b, **k: cnorm.layer_norm(x, -1, w, b, **k)),
    ("rms_norm", lambda x, w, b, **k: cnorm.rms_norm(x, -1, w, **k)),
    ("layer_norm_relu", lambda x, w, b, **k: cnorm.layer_norm(x, -1, w, b, activation="relu",
                                                               **k)),
    ("layer_norm_gelu", lambda x, w, b, **k: cnorm.layer_norm(x, -1, w, b, activation="gelu",
                                                               **k)),
]


@pytest.mark.parametrize("name,fn", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("n", [5, 16, 67, 1024])
@MIXED
def test_rows_every_path_gives_the_same_bits(name, fn, n, mixed, rng):
    """Contiguous rows (vector loops, tails, per-element fallback), a strided view
    (the chunked loop), every ISA path and the Numba backend: the same bits."""
    if not _config.HAVE_EXTENSION:
        pytest.skip("no compiled kernels")
    x = _rows(rng, (9, n), offset=-20.0)
    x[2, 0] = np.nan
    x[4] = 3.0                       # a constant row
    w, b = _mixed_params(rng, n, mixed)
    ref = fn(x, w, b, backend="cython")
    _assert_every_path_gives(ref, lambda xx, backend: fn(xx, w, b, backend=backend), x)
    assert np.isnan(ref[2]).all() and not np.isnan(np.delete(ref, 2, 0)).any()


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("training", [True, False])
@MIXED
def test_batch_norm_every_path_gives_the_same_bits(layout, training, mixed, rng):
    """Per-channel statistics and parameters (channels last: per element of a
    row), some channels beyond the float32 range: every ISA, Numba, strided."""
    if not _config.HAVE_EXTENSION:
        pytest.skip("no compiled kernels")
    C = 19
    x = _rows(rng, (4, C, 6, 7), offset=5.0)
    axis = 1
    if layout == "NHWC":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        axis = -1
    w, b = _mixed_params(rng, C, mixed)
    rm = rng.uniform(-1, 1, C)
    rv = rng.uniform(0.5, 2, C)
    if mixed:
        rv[4] = 1e-300               # rstd beyond float32: that channel in float64

    def run(xx, backend):
        return cnorm.batch_norm(xx, w, b, axis=axis, training=training,
                                running_mean=rm.copy(), running_var=rv.copy(), eps=0.0,
                                backend=backend)

    _assert_every_path_gives(run(x, "cython"), run, x)


def test_float32_steps_match_a_numpy_float32_model(rng):
    """The definition itself: with the float64 statistics of the kernel
    (return_stats) split into a float32 pair, NumPy float32 arithmetic gives the
    same bits as the kernel for in-range rows (mean_lo recovered as the part of
    the returned float64 mean below float32; the kernel's own lower word is
    below float64 resolution, so the pair matches wherever that word does not
    move the float32 rounding of the residual)."""
    x = _rows(rng, (32, 256), offset=100.0)
    w = rng.uniform(-2, 2, 256)
    b = rng.uniform(-1, 1, 256)
    y, mean, rstd = cnorm.layer_norm(x, -1, w, b, return_stats=True)[:3]
    mean = np.asarray(mean, np.float64).reshape(-1, 1)
    rstd = np.asarray(rstd, np.float64).reshape(-1, 1)
    m0 = mean.astype(np.float32)
    m1 = (mean - m0.astype(np.float64)).astype(np.float32)
    t = ((x.astype(np.float32) - m0) - m1) * rstd.astype(np.float32)
    model = (t * w.astype(np.float32) + b.astype(np.float32)).astype(H)
    same = _bits(model) == _bits(y)
    assert same.mean() > 0.999


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (8, 8)])
@MIXED
def test_group_norm_sub_rows_every_path_gives_the_same_bits(hw, mixed, rng):
    """Group norm: a row per group, a sub-row per channel with its own weight and
    bias (the scalar-parameter loop per sub-row, "* 1 + 0" left out for w = 1,
    b = 0), some channels beyond the float32 range."""
    if not _config.HAVE_EXTENSION:
        pytest.skip("no compiled kernels")
    C = 24
    x = _rows(rng, (3, C) + hw, offset=12.0)
    w, b = _mixed_params(rng, C, mixed)
    w[1], b[1] = 1.0, 0.0

    def run(xx, backend):
        return cnorm.group_norm(xx, 6, w, b, backend=backend)

    _assert_every_path_gives(run(x, "cython"), run, x)

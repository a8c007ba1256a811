"""bfloat16 (``ml_dtypes``) is accepted wherever float16 is, and keeps its dtype.

References are exact: the mean and variance of the *stored* bfloat16 values
in rational arithmetic (``fractions.Fraction``), and for normalized outputs
the float64 value of ``(x - mean) / sqrt(var + eps)`` computed from those
exact statistics (its error, ~1e-16 relative, is invisible at bfloat16's
2**-8).  "Within 1 ulp" means ``|got - exact| <= ulp(exact)`` with bfloat16's
ulp (8 significant bits), for normalized outputs measured relative to
``max(|y|, 2**-10)`` as in SPEC §3.
"""
import math
from fractions import Fraction

import numpy as np
import pytest

import cnorm
from conftest import BACKENDS, require

ml_dtypes = require("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
BF16_EPS = float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)   # 2**-7

# ------------------------------------------------------------------ exact references
def bf16_ulp(v):
    """bfloat16's ulp at |v| (8 significant bits; subnormal spacing below 2**-126)."""
    v = abs(float(v))
    if v < 2.0 ** -126:
        return 2.0 ** -133
    return 2.0 ** (math.frexp(v)[1] - 8)


def _rows(x, axis):
    """Exact Fractions of x as rows (one per kept position) over the reduced axes."""
    x64 = np.asarray(x).astype(np.float64)                  # exact for bfloat16
    axes = tuple(range(x64.ndim)) if axis is None else tuple(
        a % x64.ndim for a in (axis if isinstance(axis, tuple) else (axis,)))
    kept = [a for a in range(x64.ndim) if a not in axes]
    kshape = tuple(x64.shape[a] for a in kept)
    rows = np.transpose(x64, kept + list(axes)).reshape(int(np.prod(kshape)), -1)
    return [[Fraction(float(v)) for v in row] for row in rows], kshape


def exact_moments(x, axis, ddof=0):
    rows, kshape = _rows(x, axis)
    means, vars_ = [], []
    for row in rows:
        n = len(row)
        m = sum(row) / n
        means.append(m)
        vars_.append(sum((v - m) ** 2 for v in row) / (n - ddof))
    return means, vars_, kshape


def assert_within_1ulp(got, exact, what):
    got = np.asarray(got)
    assert got.dtype == BF16, f"{what}: dtype {got.dtype}, expected bfloat16"
    flat = got.astype(np.float64).reshape(-1)
    assert flat.size == len(exact), what
    for g, e in zip(flat, exact):
        err = abs(Fraction(float(g)) - e)
        assert err <= Fraction(bf16_ulp(e)), (
            f"{what}: got {g!r}, exact {float(e)!r} ({float(err / Fraction(bf16_ulp(e))):.2f} ulp)")


def offset_data(rng, shape, offset, scale):
    """bfloat16 data at an offset: most of the 8 bits are spent on the offset."""
    return (offset + scale * rng.standard_normal(shape)).astype(BF16)


OFFSETS = [(0.0, 1.0), (10.0, 1.0), (300.0, 3.0), (4096.0, 64.0), (-1.5e6, 2.0e4), (3e20, 1e19)]


def layouts(x):
    """C order, Fortran order, a strided view and negative strides of the same values."""
    yield "C", x
    yield "F", np.asfortranarray(x)
    big = np.zeros(tuple(2 * s for s in x.shape), dtype=BF16)
    view = big[tuple(slice(None, None, 2) for _ in x.shape)]
    view[...] = x
    yield "strided", view
    yield "reversed", x[::-1, ..., ::-1]


# ------------------------------------------------------------------ moments family
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset,scale", OFFSETS)
@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2)])
def test_moments_within_one_ulp(backend, offset, scale, axis):
    if backend == "numba":
        require("numba")
    rng = np.random.default_rng(20261125)
    base = offset_data(rng, (9, 5, 13), offset, scale)
    for ddof in (0, 1):
        means, vars_, kshape = exact_moments(base, axis, ddof)
        for name, x in layouts(base):
            # reversing permutes the kept positions too: its own reference
            m_ex, v_ex = exact_moments(x, axis, ddof)[:2] if name == "reversed" else (means, vars_)
            m, v = cnorm.moments(x, axis=axis, ddof=ddof, backend=backend)
            assert np.shape(m) == kshape
            assert_within_1ulp(m, m_ex, f"moments mean {name} axis={axis}")
            assert_within_1ulp(v, v_ex, f"moments var ddof={ddof} {name} axis={axis}")


def test_moments_long_slice_and_keepdims():
    rng = np.random.default_rng(1)
    x = offset_data(rng, (4000,), 1000.0, 16.0)
    means, vars_, _ = exact_moments(x, None)
    m, v = cnorm.moments(x, keepdims=True)
    assert m.shape == (1,) and v.shape == (1,)
    assert_within_1ulp(m, means, "long mean")
    assert_within_1ulp(v, vars_, "long var")
    # dtype=bfloat16 on float32 input rounds the float64 statistics once
    x32 = (1000.0 + 16.0 * rng.standard_normal(3000)).astype(np.float32)
    m, v = cnorm.moments(x32, dtype=BF16)
    ex = [Fraction(float(t)) for t in x32]
    mean_ex = sum(ex) / len(ex)
    assert_within_1ulp(m, [mean_ex], "float32 -> bf16 mean")
    assert_within_1ulp(v, [sum((t - mean_ex) ** 2 for t in ex) / len(ex)], "float32 -> bf16 var")


def test_moments_constant_nan_inf_skipna():
    x = np.full((3, 6), 7.5, dtype=BF16)
    x[1, 2] = np.nan
    x[2, 0] = np.inf
    m, v = cnorm.moments(x, axis=1)
    assert m.dtype == BF16 and v.dtype == BF16
    assert m[0] == 7.5 and v[0] == 0.0
    assert np.isnan(float(m[1])) and np.isnan(float(v[1])) and np.isnan(float(v[2]))
    m, v = cnorm.moments(x[:2], axis=1, skipna=True)
    np.testing.assert_array_equal(m.astype(np.float32), [7.5, 7.5])
    np.testing.assert_array_equal(v.astype(np.float32), [0.0, 0.0])


@pytest.mark.parametrize("fn", ["mean", "var", "std"])
def test_mean_var_std_keep_bfloat16(fn):
    x = offset_data(np.random.default_rng(2), (7, 11), 300.0, 3.0)
    r = getattr(cnorm, fn)(x, axis=0)
    assert r.dtype == BF16
    assert getattr(cnorm, fn)(x).dtype == BF16


@pytest.mark.parametrize("offset,scale", OFFSETS)
def test_mean_var_std_within_one_ulp(offset, scale):
    """Values (whatever dtype comes back) match the exact statistics rounded to bfloat16."""
    x = offset_data(np.random.default_rng(3), (17, 6), offset, scale)
    means, vars1, _ = exact_moments(x, 0, ddof=1)
    assert_within_1ulp(cnorm.mean(x, axis=0, dtype=BF16), means, "mean")
    assert_within_1ulp(cnorm.var(x, axis=0, ddof=1, dtype=BF16), vars1, "var")
    std = cnorm.std(x, axis=0, ddof=1, dtype=BF16).astype(np.float64)
    for g, v in zip(std, vars1):
        s = math.sqrt(float(v))                      # float64 sqrt: far below a bf16 ulp
        assert abs(g - s) <= bf16_ulp(s) * (1 + 1e-9), (g, s)


def test_mean_out_bfloat16():
    x = offset_data(np.random.default_rng(4), (5, 4), 10.0, 1.0)
    out = np.empty(4, dtype=BF16)
    assert cnorm.mean(x, axis=0, out=out) is out


def test_bfloat16_weights():
    x = offset_data(np.random.default_rng(5), (6, 3), 10.0, 1.0)
    w = np.array([1, 2, 0, 1, 3, 1], dtype=BF16)[:, None]
    m, _ = cnorm.moments(x, axis=0, weights=w)
    m_ref, _ = cnorm.moments(x, axis=0, weights=w.astype(np.float32))
    np.testing.assert_array_equal(m, m_ref)


def test_weights_on_bfloat16_data():
    rng = np.random.default_rng(6)
    x = offset_data(rng, (6, 3), 300.0, 3.0)
    w = rng.integers(0, 4, size=(6, 1)).astype(np.float32)
    m, v = cnorm.moments(x, axis=0, weights=w)
    rows = np.repeat(x.astype(np.float64), w[:, 0].astype(int), axis=0).astype(BF16)
    means, vars_, _ = exact_moments(rows, 0)
    assert_within_1ulp(m, means, "weighted mean")
    assert_within_1ulp(v, vars_, "weighted var")


def test_running_moments_and_preprocessing():
    rng = np.random.default_rng(7)
    x = offset_data(rng, (40, 3), 4096.0, 64.0)
    rm = cnorm.RunningMoments(axis=0)
    for chunk in np.array_split(x, 3):
        rm.update(chunk)
    means, vars_, _ = exact_moments(x, 0)
    assert_within_1ulp(rm.mean.astype(BF16), means, "RunningMoments.mean")
    assert_within_1ulp(rm.var().astype(BF16), vars_, "RunningMoments.var")
    z = cnorm.standardize(x)
    assert z.dtype == BF16
    z_ref = (x.astype(np.float64) - [float(m) for m in means]) / np.sqrt([float(v) for v in vars_])
    assert_normalized_within_1ulp(z, z_ref, "standardize")
    mm = cnorm.minmax_scale(x)
    assert mm.dtype == BF16
    lo, hi = x.astype(np.float64).min(0), x.astype(np.float64).max(0)
    assert_normalized_within_1ulp(mm, (x.astype(np.float64) - lo) / (hi - lo), "minmax_scale")


def test_normalize_image_to_bfloat16():
    img = np.random.default_rng(8).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    y = cnorm.normalize_image(img, [0.5] * 3, [0.25] * 3, dtype=BF16)
    assert y.dtype == BF16 and y.shape == (3, 4, 5)
    ref = ((img.astype(np.float64) / 255 - 0.5) / 0.25).transpose(2, 0, 1)
    assert_normalized_within_1ulp(y, ref, "normalize_image -> bfloat16")


def test_normalize_image_from_bfloat16():
    img = np.random.default_rng(8).random((4, 5, 3)).astype(BF16)
    y = cnorm.normalize_image(img, [0.5] * 3, [0.25] * 3, scale=1.0, dtype=np.float32)
    ref = ((img.astype(np.float64) - 0.5) / 0.25).transpose(2, 0, 1)
    np.testing.assert_allclose(y, ref, rtol=2e-7, atol=1e-6)


# ------------------------------------------------------------------ normalization layers
def assert_normalized_within_1ulp(got, ref, what, k=1.0):
    got = np.asarray(got)
    assert got.dtype == BF16, f"{what}: dtype {got.dtype}"
    g = got.astype(np.float64)
    mag = np.maximum(np.abs(ref), 2.0 ** -10)
    ulp = 2.0 ** (np.floor(np.log2(mag)) - 7)
    err = np.abs(g - ref) / ulp
    assert np.all(np.isfinite(g) == np.isfinite(ref)), what
    worst = float(np.max(err[np.isfinite(ref)], initial=0.0))
    assert worst <= k * (1 + 1e-9), f"{what}: {worst:.3f} ulp"


def _exact_stats(x, axes):
    """float64 mean and biased var over ``axes`` from exact Fractions (keepdims)."""
    x64 = x.astype(np.float64)
    axes = tuple(a % x.ndim for a in axes)
    means, vars_, kshape = exact_moments(x, axes)
    keep = tuple(1 if i in axes else s for i, s in enumerate(x.shape))
    return (x64, np.array([float(m) for m in means]).reshape(keep),
            np.array([float(v) for v in vars_]).reshape(keep))


def _ref_norm(x, axes, eps, w=None, b=None, act=None):
    x64, m, v = _exact_stats(x, axes)
    y = (x64 - m) / np.sqrt(v + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return np.maximum(y, 0.0) if act == "relu" else y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset,scale", OFFSETS[:5])
def test_layers_keep_bfloat16_within_one_ulp(backend, offset, scale):
    if backend == "numba":
        require("numba")
    rng = np.random.default_rng(9)
    x = offset_data(rng, (3, 4, 5, 6), offset, scale)
    eps = 1e-5 * scale * scale
    kw = dict(eps=eps, backend=backend)
    checks = {
        "layer_norm": (cnorm.layer_norm(x, axis=-1, **kw), _ref_norm(x, (3,), eps)),
        "layer_norm(1,3)": (cnorm.layer_norm(x, axis=(1, 3), **kw), _ref_norm(x, (1, 3), eps)),
        "batch_norm": (cnorm.batch_norm(x, **kw), _ref_norm(x, (0, 2, 3), eps)),
        "batch_norm NHWC": (cnorm.batch_norm(x, axis=-1, **kw), _ref_norm(x, (0, 1, 2), eps)),
        "instance_norm": (cnorm.instance_norm(x, **kw), _ref_norm(x, (2, 3), eps)),
    }
    xg = x.reshape(3, 2, 2, 5, 6)
    checks["group_norm"] = (cnorm.group_norm(x, 2, **kw),
                            _ref_norm(xg, (2, 3, 4), eps).reshape(x.shape))
    for name, (got, ref) in checks.items():
        assert_normalized_within_1ulp(got, ref, f"{name} {backend}")
    # rms_norm: x / sqrt(mean(x**2) + eps)
    x64 = x.astype(np.float64)
    ms = np.array([[[float(sum(Fraction(float(v)) ** 2 for v in row) / len(row))
                     for row in plane] for plane in block] for block in x64])
    ref = x64 / np.sqrt(ms[..., None] + eps)
    assert_normalized_within_1ulp(cnorm.rms_norm(x, eps=eps, backend=backend), ref,
                                  f"rms_norm {backend}")


def test_layers_affine_activation_and_stats():
    rng = np.random.default_rng(10)
    x = offset_data(rng, (4, 6, 7), 300.0, 3.0)
    w = rng.standard_normal(6).astype(BF16)
    b = rng.standard_normal(6).astype(BF16)
    wf, bf = w.astype(np.float64)[:, None], b.astype(np.float64)[:, None]
    y, mean, rstd = cnorm.batch_norm(x, w, b, activation="relu", return_stats=True)
    assert mean.dtype == np.float64 and rstd.dtype == np.float64
    ref = _ref_norm(x, (0, 2), 1e-5, wf, bf, "relu")
    # after an affine, measure against the scale of the terms (no cancellation bonus)
    mag = np.abs(_ref_norm(x, (0, 2), 1e-5) * wf) + np.abs(bf)
    g = y.astype(np.float64)
    assert y.dtype == BF16
    assert np.all(np.abs(g - ref) <= 2.0 ** (np.floor(np.log2(np.maximum(mag, 2.0 ** -10))) - 7))
    _, m_ex, v_ex = _exact_stats(x, (0, 2))
    np.testing.assert_allclose(mean, m_ex, rtol=1e-15)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(v_ex + 1e-5), rtol=1e-14)


def test_rms_norm_default_eps_is_bfloat16_eps():
    """eps=None: ml_dtypes.finfo(bfloat16).eps = 2**-7, not float32's or float16's."""
    assert BF16_EPS == 2.0 ** -7
    x = (0.01 * np.random.default_rng(11).standard_normal((5, 8))).astype(BF16)
    x64 = x.astype(np.float64)
    ms = (x64 ** 2).mean(axis=-1, keepdims=True)
    y = cnorm.rms_norm(x)
    assert y.dtype == BF16
    assert_normalized_within_1ulp(y, x64 / np.sqrt(ms + BF16_EPS), "rms_norm eps=None")
    far = x64 / np.sqrt(ms + float(np.finfo(np.float32).eps))
    assert np.max(np.abs(y.astype(np.float64) - far)) > 0.1      # eps really matters here
    _, rstd = cnorm.rms_norm(x, return_stats=True)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(ms + BF16_EPS), rtol=1e-13)
    # the layer object follows the same rule
    y2 = cnorm.RMSNorm(8, dtype=BF16)(x)
    np.testing.assert_array_equal(y2.astype(np.float32), y.astype(np.float32))


def test_rms_norm_bfloat16_matches_torch_with_the_same_eps():
    """cnorm's eps=None is torch's *documented* default, finfo(bfloat16).eps.

    (torch 2.x on CPU actually uses float32's epsilon, its opmath type, when
    eps=None for bfloat16/float16 input, so the default is compared with an
    explicit eps on the torch side.)
    """
    torch = require("torch")
    xb = (0.01 * np.random.default_rng(12).standard_normal((5, 8))).astype(BF16)
    xt = torch.from_numpy(xb.astype(np.float32)).bfloat16()
    ref = torch.nn.functional.rms_norm(xt, (8,), eps=BF16_EPS).float().numpy()
    got = cnorm.rms_norm(xb).astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=2 * BF16_EPS, atol=0)


@pytest.mark.parametrize("make,shape", [
    (lambda dt: cnorm.LayerNorm((5, 6), dtype=dt), (3, 4, 5, 6)),
    (lambda dt: cnorm.RMSNorm(6, dtype=dt), (3, 4, 5, 6)),
    (lambda dt: cnorm.BatchNorm(4, dtype=dt), (3, 4, 5, 6)),
    (lambda dt: cnorm.GroupNorm(2, 4, dtype=dt), (3, 4, 5, 6)),
    (lambda dt: cnorm.InstanceNorm(4, affine=True, track_running_stats=True, dtype=dt),
     (3, 4, 5, 6)),
], ids=["LayerNorm", "RMSNorm", "BatchNorm", "GroupNorm", "InstanceNorm"])
def test_layer_objects_bfloat16(make, shape):
    """bfloat16 inputs keep their dtype; bfloat16 storage (``dtype=``) works in every mode."""
    rng = np.random.default_rng(13)
    x = offset_data(rng, shape, 10.0, 1.0)
    ref_layer, layer = make(np.float32), make(BF16)
    for k, v in layer.state_dict().items():
        if k != "num_batches_tracked":
            assert v.dtype == BF16, k
    for mode in (True, False):
        ref_layer.train(mode), layer.train(mode)
        y, y_ref = layer(x), ref_layer(x)
        assert y.dtype == BF16 and y_ref.dtype == BF16
        # same parameter values (ones/zeros; running stats differ by storage rounding only)
        np.testing.assert_allclose(y.astype(np.float32), y_ref.astype(np.float32),
                                   rtol=2 * BF16_EPS, atol=2 * BF16_EPS)
    if getattr(layer, "running_mean", None) is not None:
        np.testing.assert_allclose(layer.running_mean.astype(np.float32), ref_layer.running_mean,
                                   rtol=BF16_EPS)
        assert int(layer.num_batches_tracked) == 1
    # bfloat16 torch tensors load (through float32), and the round trip is exact
    torch = require("torch")
    sd = {k: torch.from_numpy(v.astype(np.float32)).bfloat16() if k != "num_batches_tracked"
          else torch.tensor(int(v)) for k, v in layer.state_dict().items()}
    other = make(BF16).load_state_dict(sd)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v.astype(np.float64), layer.state_dict()[k].astype(np.float64))


@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm"])
def test_functional_bfloat16_running_stats(fn):
    x = offset_data(np.random.default_rng(14), (4, 3, 5), 10.0, 1.0)
    rm, rv = np.zeros(3, dtype=BF16), np.ones(3, dtype=BF16)
    getattr(cnorm, fn)(x, running_mean=rm, running_var=rv)
    assert np.all(rm.astype(np.float32) != 0)


@pytest.mark.parametrize("backend", [
    "cython",
    "numba",
    "numpy"])
def test_out_bfloat16(backend):
    if backend == "numba":
        require("numba")
    x = offset_data(np.random.default_rng(15), (4, 16), 10.0, 1.0)
    expect = cnorm.layer_norm(x, backend=backend)
    out = np.empty_like(x)
    assert cnorm.layer_norm(x, out=out, backend=backend) is out
    np.testing.assert_array_equal(out.astype(np.float32), expect.astype(np.float32))
    xx = x.copy()
    assert cnorm.layer_norm(xx, out=xx, backend=backend) is xx
    np.testing.assert_array_equal(xx.astype(np.float32), expect.astype(np.float32))


# ------------------------------------------------------------------ backward
def test_backward_accepts_bfloat16():
    rng = np.random.default_rng(16)
    x = offset_data(rng, (4, 6, 5), 10.0, 1.0)
    dy = rng.standard_normal(x.shape).astype(BF16)
    w = rng.standard_normal(6).astype(BF16)
    b = rng.standard_normal(6).astype(BF16)
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    cases = {
        "batch_norm": lambda a, d: cnorm.batch_norm_backward(
            d, a, *cnorm.batch_norm(a, w, b, return_stats=True)[1:], w, b),
        "group_norm": lambda a, d: cnorm.group_norm_backward(
            d, a, *cnorm.group_norm(a, 2, w, b, return_stats=True)[1:], 2, w, b),
        "instance_norm": lambda a, d: cnorm.instance_norm_backward(
            d, a, *cnorm.instance_norm(a, w, b, return_stats=True)[1:], w, b),
        "layer_norm": lambda a, d: cnorm.layer_norm_backward(
            d, a, *cnorm.layer_norm(a, return_stats=True)[1:]),
        "rms_norm": lambda a, d: cnorm.rms_norm_backward(
            d, a, cnorm.rms_norm(a, return_stats=True)[1]),
    }
    for name, run in cases.items():
        got, ref = run(x, dy), run(x32, dy32)
        for g, r in zip(got, ref):
            if r is None:
                assert g is None
                continue
            assert g.dtype == BF16, name
            scale = max(1.0, float(np.max(np.abs(r))))
            np.testing.assert_allclose(g.astype(np.float32), r, rtol=0, atol=scale * BF16_EPS,
                                       err_msg=name)

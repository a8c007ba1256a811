"""The forward normalization layers against ``torch.nn.functional``.

PyTorch is the semantic reference (SPEC §2): every layer, option, fused
activation and affine/no-affine combination is compared with the matching
``torch.nn.functional`` call in float64 with tight tolerances, on every
backend, every runnable ISA path of the Cython kernels and every memory layout
(C, F, transposed, sliced, negative strides).  Running statistics must be
updated in place exactly like PyTorch updates its buffers.  float32/float16
inputs must agree with PyTorch in the same dtype within a few ulps on
well-conditioned data (cnorm rounds once, PyTorch rounds the normalized value
and again after the activation).

The accuracy contract itself (SPEC §3, against exact arithmetic) is tested in
``test_norms_precision.py``; bad input in ``test_norms_errors.py``.
"""
import numpy as np
import pytest

import cnorm
from conftest import require

torch = require("torch")
F = torch.nn.functional

ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]
LAYERS = ["layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm"]
LAYOUTS = ["C", "F", "transposed", "sliced", "negative", "mixed"]
RTOL = ATOL = 1e-12


# ------------------------------------------------------------------ backends
# ------------------------------------------------------------------ helpers
def call(fn, *args, backend, **kw):
    """Call a cnorm layer on one backend."""
    return fn(*args, backend=backend, **kw)


def t_(a):
    """A torch tensor holding a copy of ``a`` (None stays None)."""
    return None if a is None else torch.from_numpy(np.array(a, copy=True, order="C"))


def t_act(t, act):
    if act is None:
        return t
    if act == "relu":
        return F.relu(t)
    if act == "gelu":
        return F.gelu(t)
    if act == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    assert act == "silu"
    return F.silu(t)


def in_layout(a, layout):
    """The values of ``a`` stored in another memory layout (a view, never a copy of the values' order)."""
    a = np.ascontiguousarray(a)
    if layout == "C":
        return a
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "transposed":  # axis 0 innermost, the others in order
        perm = tuple(range(1, a.ndim)) + (0,)
        return np.ascontiguousarray(a.transpose(perm)).transpose(np.argsort(perm))
    if layout == "sliced":  # every other element, odd offset, NaN in the gaps
        big = np.full(tuple(2 * s + 1 for s in a.shape), np.nan, dtype=a.dtype)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "negative":
        flip = tuple(slice(None, None, -1) for _ in a.shape)
        return np.ascontiguousarray(a[flip])[flip]
    assert layout == "mixed"  # F order, sliced, the last axis reversed
    big = np.full(tuple(3 * s for s in a.shape), np.nan, dtype=a.dtype, order="F")
    view = big[tuple(slice(None, None, 3) for _ in a.shape[:-1]) + (slice(None, None, -3),)]
    view[...] = a
    return view


def close(got, want, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64),
                               rtol=rtol, atol=atol, equal_nan=True)


def close_ulps(got, want, dtype, k=4):
    """|got - want| <= k ulps of the dtype at max(|want|, 1) (well-conditioned data)."""
    dtype = np.dtype(dtype)
    assert got.dtype == dtype
    g = got.astype(np.float64)
    w = np.asarray(want).astype(np.float64)
    tol = k * np.finfo(dtype).eps * np.maximum(np.abs(w), 1.0)
    err = np.abs(g - w)
    assert np.all(err <= tol), f"worst {float((err / tol).max()) * k:.2f} ulps (allowed {k})"


def data(rng, shape, dtype=np.float64, loc=0.5, scale=2.0):
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def params(rng, shape, affine, dtype=np.float64, bias=True):
    """(weight, bias) exactly representable in ``dtype`` (None, None without affine)."""
    if not affine:
        return None, None
    w = (1.0 + 0.5 * rng.standard_normal(shape)).astype(dtype)
    b = (0.3 * rng.standard_normal(shape)).astype(dtype) if bias else None
    return w, b


# ------------------------------------------------------------------ torch references
def ref_layer_norm(x, axis, w, b, eps, act):
    nd = x.ndim
    axes = sorted(a % nd for a in (axis if isinstance(axis, tuple) else (axis,)))
    rest = [a for a in range(nd) if a not in axes]
    xt = np.transpose(x, rest + axes)
    y = F.layer_norm(t_(xt), xt.shape[len(rest):], t_(w), t_(b), eps)
    return np.transpose(t_act(y, act).numpy(), np.argsort(rest + axes))


def ref_layer_stats(x, axis, eps):
    t = t_(x)
    dims = axis if isinstance(axis, tuple) else (axis,)
    mean = t.mean(dim=dims, keepdim=True)
    var = t.var(dim=dims, keepdim=True, unbiased=False)
    return mean.numpy(), torch.rsqrt(var + eps).numpy()


def ref_rms_norm(x, axis, w, eps, act):
    nd = x.ndim
    axes = sorted(a % nd for a in (axis if isinstance(axis, tuple) else (axis,)))
    rest = [a for a in range(nd) if a not in axes]
    xt = np.transpose(x, rest + axes)
    y = F.rms_norm(t_(xt), xt.shape[len(rest):], t_(w), eps)
    return np.transpose(t_act(y, act).numpy(), np.argsort(rest + axes))


def ref_batch_norm(x, axis, w, b, rm, rv, training, momentum, eps, act):
    """(y, running_mean after, running_var after) from F.batch_norm (channel axis moved to 1)."""
    rm_t, rv_t = t_(rm), t_(rv)
    y = F.batch_norm(t_(np.moveaxis(x, axis, 1)), rm_t, rv_t, t_(w), t_(b), training, momentum, eps)
    y = np.moveaxis(t_act(y, act).numpy(), 1, axis)
    return y, (None if rm_t is None else rm_t.numpy()), (None if rv_t is None else rv_t.numpy())


def ref_group_norm(x, G, axis, w, b, eps, act):
    y = F.group_norm(t_(np.moveaxis(x, axis, 1)), G, t_(w), t_(b), eps)
    return np.moveaxis(t_act(y, act).numpy(), 1, axis)


def ref_instance_norm(x, axis, w, b, rm, rv, use_input_stats, momentum, eps, act):
    rm_t, rv_t = t_(rm), t_(rv)
    y = F.instance_norm(t_(np.moveaxis(x, axis, 1)), rm_t, rv_t, t_(w), t_(b), use_input_stats,
                        momentum, eps)
    y = np.moveaxis(t_act(y, act).numpy(), 1, axis)
    return y, (None if rm_t is None else rm_t.numpy()), (None if rv_t is None else rv_t.numpy())


# ------------------------------------------------------------------ layer_norm
LN_AXES = [-1, (-2, -1), 0, 1, (0, 2)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("axis", LN_AXES, ids=str)
def test_layer_norm_matches_torch(backend, axis, activation, rng):
    x = data(rng, (3, 4, 5))
    axes = axis if isinstance(axis, tuple) else (axis,)
    for affine in (False, True):
        w, b = params(rng, tuple(x.shape[a] for a in sorted(a % 3 for a in axes)), affine)
        y = call(cnorm.layer_norm, x, axis, w, b, eps=1e-3, activation=activation, backend=backend)
        assert y.dtype == np.float64 and y.shape == x.shape
        close(y, ref_layer_norm(x, axis, w, b, 1e-3, activation))


@pytest.mark.parametrize("axis", LN_AXES, ids=str)
def test_layer_norm_weight_without_bias_and_bias_without_weight(backend, axis, rng):
    x = data(rng, (3, 4, 5))
    axes = axis if isinstance(axis, tuple) else (axis,)
    w, b = params(rng, tuple(x.shape[a] for a in sorted(a % 3 for a in axes)), True)
    for ww, bb in ((w, None), (None, b)):
        y = call(cnorm.layer_norm, x, axis, ww, bb, backend=backend)
        close(y, ref_layer_norm(x, axis, ww, bb, 1e-5, None))


@pytest.mark.parametrize("axis", LN_AXES, ids=str)
def test_layer_norm_return_stats(backend, axis, rng):
    x = data(rng, (3, 4, 5))
    y, mean, rstd = call(cnorm.layer_norm, x, axis, eps=1e-4, return_stats=True, backend=backend)
    m_ref, r_ref = ref_layer_stats(x, axis, 1e-4)
    assert mean.dtype == rstd.dtype == np.float64
    assert mean.shape == rstd.shape == m_ref.shape
    close(mean, m_ref)
    close(rstd, r_ref)
    close(y, ref_layer_norm(x, axis, None, None, 1e-4, None))


def test_layer_norm_return_stats_match_native_layer_norm(backend, rng):
    x = data(rng, (6, 2, 7), np.float32)
    w, b = params(rng, (2, 7), True, np.float32)
    y, mean, rstd = call(cnorm.layer_norm, x, (1, 2), w, b, return_stats=True, backend=backend)
    ty, tm, tr = torch.native_layer_norm(t_(x), (2, 7), t_(w), t_(b), 1e-5)
    assert mean.dtype == rstd.dtype == np.float64 and mean.shape == tuple(tm.shape) == (6, 1, 1)
    close(mean, tm.numpy(), rtol=1e-6, atol=1e-6)   # torch's float32 statistics
    close(rstd, tr.numpy(), rtol=1e-5, atol=1e-6)
    close_ulps(y, ty.numpy(), np.float32)


def test_layer_norm_integer_input_computes_in_float64(backend, rng):
    xi = rng.integers(-50, 50, size=(4, 9))
    y = call(cnorm.layer_norm, xi, backend=backend)
    assert y.dtype == np.float64
    close(y, ref_layer_norm(xi.astype(np.float64), -1, None, None, 1e-5, None))
    yl = call(cnorm.layer_norm, xi.tolist(), backend=backend)  # any array-like
    np.testing.assert_array_equal(yl, y)


# ------------------------------------------------------------------ rms_norm
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("axis", [-1, (-2, -1), 0, (0, 2)], ids=str)
def test_rms_norm_matches_torch(backend, axis, activation, rng):
    axes = axis if isinstance(axis, tuple) else (axis,)
    for eps in (None, 1e-6):
        # at scale 1e-7, mean(x**2) ~ 1e-14: eps=None (2.2e-16) changes y by ~1%
        x = data(rng, (3, 4, 5)) if eps is not None else data(rng, (3, 4, 5), loc=0.0, scale=1e-7)
        for affine in (False, True):
            w, _ = params(rng, tuple(x.shape[a] for a in sorted(a % 3 for a in axes)), affine)
            y = call(cnorm.rms_norm, x, axis, w, eps=eps, activation=activation, backend=backend)
            assert y.dtype == np.float64 and y.shape == x.shape
            close(y, ref_rms_norm(x, axis, w, eps, activation))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_rms_norm_default_eps_is_finfo_eps_of_the_dtype(backend, dtype):
    # an all-zero slice puts eps alone under the root: rstd = 1/sqrt(finfo(dtype).eps)
    x = np.zeros((2, 8), dtype=dtype)
    x[1] = 1
    y, rstd = call(cnorm.rms_norm, x, return_stats=True, backend=backend)
    e = float(np.finfo(dtype).eps)
    assert rstd.dtype == np.float64 and rstd.shape == (2, 1)
    close(rstd[:, 0], [1 / np.sqrt(e), 1 / np.sqrt(1 + e)], rtol=1e-15, atol=0)
    ty = F.rms_norm(t_(x), (8,))
    close_ulps(y, ty.numpy(), dtype, k=1)


@pytest.mark.parametrize("axis", [-1, (0, 2)], ids=str)
def test_rms_norm_return_stats(backend, axis, rng):
    x = data(rng, (3, 4, 5))
    y, rstd = call(cnorm.rms_norm, x, axis, eps=1e-5, return_stats=True, backend=backend)
    t = t_(x)
    ref = torch.rsqrt(t.pow(2).mean(dim=axis, keepdim=True) + 1e-5).numpy()
    assert rstd.dtype == np.float64 and rstd.shape == ref.shape
    close(rstd, ref)
    close(y, ref_rms_norm(x, axis, None, 1e-5, None))


# ------------------------------------------------------------------ batch_norm
BN_SHAPES = {1: (4, 3, 5, 6), -1: (4, 5, 6, 3)}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("axis", [1, -1], ids=["NCHW", "NHWC"])
def test_batch_norm_matches_torch(backend, axis, training, activation, rng):
    x = data(rng, BN_SHAPES[axis])
    for affine in (False, True):
        w, b = params(rng, (3,), affine)
        rm = rng.standard_normal(3)
        rv = 0.5 + rng.random(3)
        rm0, rv0 = rm.copy(), rv.copy()
        y = call(cnorm.batch_norm, x, w, b, axis=axis, running_mean=rm, running_var=rv,
                 training=training, momentum=0.2, eps=1e-3, activation=activation, backend=backend)
        y_ref, rm_ref, rv_ref = ref_batch_norm(x, axis, w, b, rm0, rv0, training, 0.2, 1e-3,
                                               activation)
        close(y, y_ref)
        close(rm, rm_ref, atol=0, rtol=1e-14)
        close(rv, rv_ref, atol=0, rtol=1e-14)
        if not training:
            np.testing.assert_array_equal(rm, rm0)
            np.testing.assert_array_equal(rv, rv0)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("axis", [1, -1], ids=["NCHW", "NHWC"])
def test_batch_norm_running_stats_updated_like_torch(backend, axis, momentum, rng):
    rm = np.zeros(3)
    rv = np.ones(3)
    rm_t, rv_t = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for step in range(3):  # several batches: the running stats accumulate
        x = data(rng, BN_SHAPES[axis], loc=step)
        ident = (id(rm), id(rv))
        y = call(cnorm.batch_norm, x, axis=axis, running_mean=rm, running_var=rv,
                 momentum=momentum, backend=backend)
        assert (id(rm), id(rv)) == ident
        ty = F.batch_norm(t_(np.moveaxis(x, axis, 1)), rm_t, rv_t, None, None, True, momentum, 1e-5)
        close(y, np.moveaxis(ty.numpy(), 1, axis))
        close(rm, rm_t.numpy(), rtol=1e-14, atol=1e-15)
        close(rv, rv_t.numpy(), rtol=1e-14, atol=1e-15)
    # and eval mode uses them
    x = data(rng, BN_SHAPES[axis])
    y = call(cnorm.batch_norm, x, axis=axis, running_mean=rm, running_var=rv, training=False,
             backend=backend)
    ty = F.batch_norm(t_(np.moveaxis(x, axis, 1)), rm_t, rv_t, None, None, False, momentum, 1e-5)
    close(y, np.moveaxis(ty.numpy(), 1, axis))


def test_batch_norm_float32_running_stats_like_torch(backend, rng):
    x = data(rng, (8, 3, 4, 4), np.float32, loc=3.0)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rm_t, rv_t = torch.zeros(3), torch.ones(3)
    for _ in range(2):
        y = call(cnorm.batch_norm, x, running_mean=rm, running_var=rv, momentum=0.3,
                 backend=backend)
        ty = F.batch_norm(t_(x), rm_t, rv_t, None, None, True, 0.3, 1e-5)
        assert rm.dtype == rv.dtype == np.float32
        close(rm, rm_t.numpy(), rtol=4e-7, atol=1e-7)
        close(rv, rv_t.numpy(), rtol=4e-7, atol=1e-7)
        close_ulps(y, ty.numpy(), np.float32)


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 7), (2, 3, 2, 2, 3)], ids=str)
def test_batch_norm_any_rank(backend, shape, rng):
    x = data(rng, shape)
    w, b = params(rng, (3,), True)
    rm, rv = np.zeros(3), np.ones(3)
    y = call(cnorm.batch_norm, x, w, b, running_mean=rm, running_var=rv, backend=backend)
    y_ref, rm_ref, rv_ref = ref_batch_norm(x, 1, w, b, np.zeros(3), np.ones(3), True, 0.1, 1e-5, None)
    close(y, y_ref)
    close(rm, rm_ref)
    close(rv, rv_ref)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("axis", [1, -1], ids=["NCHW", "NHWC"])
def test_batch_norm_return_stats(backend, axis, training, rng):
    x = data(rng, BN_SHAPES[axis])
    w, b = params(rng, (3,), True)
    rm, rv = rng.standard_normal(3), 0.5 + rng.random(3)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, rstd = call(cnorm.batch_norm, x, w, b, axis=axis, running_mean=rm, running_var=rv,
                         training=training, eps=1e-4, return_stats=True, backend=backend)
    keep = tuple(3 if i == axis % 4 else 1 for i in range(4))
    assert mean.dtype == rstd.dtype == np.float64 and mean.shape == rstd.shape == keep
    if training:
        ty, tm, tr = torch.native_batch_norm(t_(np.moveaxis(x, axis, 1)), t_(w), t_(b), t_(rm0),
                                             t_(rv0), True, 0.1, 1e-4)
        close(mean.reshape(3), tm.numpy())
        close(rstd.reshape(3), tr.numpy())
    else:  # the running statistics it used
        close(mean.reshape(3), rm0, rtol=0, atol=0)
        close(rstd.reshape(3), 1 / np.sqrt(rv0 + 1e-4), rtol=1e-15, atol=0)
    y_ref, _, _ = ref_batch_norm(x, axis, w, b, rm0, rv0, training, 0.1, 1e-4, None)
    close(y, y_ref)


def test_batch_norm_training_without_running_stats(backend, rng):
    x = data(rng, (6, 3, 4))
    y = call(cnorm.batch_norm, x, backend=backend)
    close(y, ref_batch_norm(x, 1, None, None, None, None, True, 0.1, 1e-5, None)[0])


# ------------------------------------------------------------------ group_norm
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("num_groups", [1, 2, 3, 6])
def test_group_norm_matches_torch(backend, num_groups, activation, rng):
    x = data(rng, (2, 6, 3, 4))
    for affine in (False, True):
        w, b = params(rng, (6,), affine)
        y = call(cnorm.group_norm, x, num_groups, w, b, eps=1e-3, activation=activation,
                 backend=backend)
        close(y, ref_group_norm(x, num_groups, 1, w, b, 1e-3, activation))


@pytest.mark.parametrize("num_groups", [1, 2, 4])
@pytest.mark.parametrize("shape,axis", [((3, 4), 1), ((3, 4, 5), 1), ((3, 5, 4), -1),
                                        ((2, 3, 2, 4), 3), ((2, 4, 3, 2, 2), 1)], ids=str)
def test_group_norm_shapes_and_channel_axis(backend, shape, axis, num_groups, rng):
    x = data(rng, shape)
    w, b = params(rng, (4,), True)
    y, mean, rstd = call(cnorm.group_norm, x, num_groups, w, b, axis=axis, return_stats=True,
                         backend=backend)
    close(y, ref_group_norm(x, num_groups, axis, w, b, 1e-5, None))
    xt = np.ascontiguousarray(np.moveaxis(x, axis, 1))
    N, C = xt.shape[:2]
    _, tm, tr = torch.native_group_norm(t_(xt), None, None, N, C, xt.size // (N * C), num_groups, 1e-5)
    assert mean.dtype == rstd.dtype == np.float64
    assert mean.shape == rstd.shape == (N, num_groups)
    close(mean, tm.numpy())
    close(rstd, tr.numpy())


# ------------------------------------------------------------------ instance_norm
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", ["input-stats", "train-running", "eval-running"])
def test_instance_norm_matches_torch(backend, mode, activation, rng):
    x = data(rng, (3, 4, 5, 2))
    running = mode != "input-stats"
    training = mode != "eval-running"
    for affine in (False, True):
        w, b = params(rng, (4,), affine)
        rm = rng.standard_normal(4) if running else None
        rv = 0.5 + rng.random(4) if running else None
        rm0 = None if rm is None else rm.copy()
        rv0 = None if rv is None else rv.copy()
        y = call(cnorm.instance_norm, x, w, b, running_mean=rm, running_var=rv, training=training,
                 momentum=0.3, eps=1e-3, activation=activation, backend=backend)
        y_ref, rm_ref, rv_ref = ref_instance_norm(x, 1, w, b, rm0, rv0, training, 0.3, 1e-3,
                                                  activation)
        close(y, y_ref)
        if running:
            close(rm, rm_ref, rtol=1e-14, atol=1e-15)
            close(rv, rv_ref, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("axis", [1, -1], ids=["NCL", "NLC"])
def test_instance_norm_running_stats_and_return_stats(backend, axis, momentum, rng):
    shape = (3, 4, 6) if axis == 1 else (3, 6, 4)
    rm, rv = np.zeros(4), np.ones(4)
    rm_t, rv_t = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for step in range(2):
        x = data(rng, shape, loc=step)
        y, mean, rstd = call(cnorm.instance_norm, x, axis=axis, running_mean=rm, running_var=rv,
                             momentum=momentum, return_stats=True, backend=backend)
        xt = np.moveaxis(x, axis, 1)
        ty = F.instance_norm(t_(xt), rm_t, rv_t, None, None, True, momentum, 1e-5)
        close(y, np.moveaxis(ty.numpy(), 1, axis))
        close(rm, rm_t.numpy(), rtol=1e-14, atol=1e-15)
        close(rv, rv_t.numpy(), rtol=1e-14, atol=1e-15)
        spatial = 2 if axis == 1 else 1
        keep = tuple(1 if i == spatial else s for i, s in enumerate(shape))
        assert mean.dtype == rstd.dtype == np.float64 and mean.shape == rstd.shape == keep
        t = t_(x)
        close(mean, t.mean(dim=spatial, keepdim=True).numpy())
        close(rstd, torch.rsqrt(t.var(dim=spatial, keepdim=True, unbiased=False) + 1e-5).numpy())
    x = data(rng, shape)
    y = call(cnorm.instance_norm, x, axis=axis, running_mean=rm, running_var=rv, training=False,
             backend=backend)
    ty = F.instance_norm(t_(np.moveaxis(x, axis, 1)), rm_t, rv_t, None, None, False, momentum, 1e-5)
    close(y, np.moveaxis(ty.numpy(), 1, axis))


# ------------------------------------------------------------------ one call per layer
def torch_layer(layer, x, w, b, activation, dtype):
    """torch's result (and updated running stats) for ``run_layer``'s call, computed in ``dtype``."""
    cast = (lambda a: None if a is None else np.asarray(a).astype(dtype))
    xt, wt, bt = t_(cast(x)), t_(cast(w)), t_(cast(b))
    C = x.shape[1]
    if layer == "layer_norm":
        return t_act(F.layer_norm(xt, x.shape[-1:], wt, bt, 1e-5), activation).numpy(), None
    if layer == "rms_norm":
        eps = float(np.finfo(x.dtype).eps)  # cnorm's eps=None follows the input dtype
        return t_act(F.rms_norm(xt, x.shape[-1:], wt, eps), activation).numpy(), None
    if layer == "group_norm":
        return t_act(F.group_norm(xt, 2, wt, bt, 1e-5), activation).numpy(), None
    rm_t, rv_t = t_(np.zeros(C, dtype)), t_(np.ones(C, dtype))
    tfn = F.batch_norm if layer == "batch_norm" else F.instance_norm
    y = t_act(tfn(xt, rm_t, rv_t, wt, bt, True, 0.1, 1e-5), activation).numpy()
    return y, (rm_t.numpy(), rv_t.numpy())


_TORCH_CACHE = {}


def torch_layer_cached(layer, x, w, b, activation, dtype):
    key = (layer, activation, np.dtype(dtype).name, x.shape, np.ascontiguousarray(x).tobytes(),
           None if w is None else w.tobytes(), None if b is None else b.tobytes())
    if key not in _TORCH_CACHE:
        _TORCH_CACHE[key] = torch_layer(layer, x, w, b, activation, dtype)
    return _TORCH_CACHE[key]


def run_layer(layer, x, backend, *, affine=True, activation=None, rng=None, refs=True, **kw):
    """``(y, running, ref, ref64)`` for one layer on x (channel axis 1, last axis for LN/RMS).

    ``y`` is cnorm's result, ``running`` the updated ``(running_mean, running_var)``
    for BN/IN (train mode, else None), ``ref`` torch's result in x's dtype and
    ``ref64`` torch's in float64 on the same stored values, each a ``(y, running)`` pair.
    Parameters are exactly representable in x's dtype.
    """
    rng = rng if rng is not None else np.random.default_rng(7)
    dt = x.dtype
    C = x.shape[1]
    w, b = params(rng, x.shape[-1:] if layer in ("layer_norm", "rms_norm") else (C,), affine, dt)
    running = None
    if layer == "layer_norm":
        y = call(cnorm.layer_norm, x, -1, w, b, activation=activation, backend=backend, **kw)
    elif layer == "rms_norm":
        b = None
        y = call(cnorm.rms_norm, x, -1, w, activation=activation, backend=backend, **kw)
    elif layer == "group_norm":
        y = call(cnorm.group_norm, x, 2, w, b, activation=activation, backend=backend, **kw)
    else:
        rm, rv = np.zeros(C, dt), np.ones(C, dt)
        fn = cnorm.batch_norm if layer == "batch_norm" else cnorm.instance_norm
        y = call(fn, x, w, b, running_mean=rm, running_var=rv, activation=activation,
                 backend=backend, **kw)
        running = (rm, rv)
    if not refs:
        return y, running, None, None
    ref = torch_layer_cached(layer, x, w, b, activation, dt)
    ref64 = ref if dt == np.float64 else torch_layer_cached(layer, x, w, b, activation, np.float64)
    return y, running, ref, ref64


def check_layer(y, running, ref, ref64):
    """float64: tight tolerances against torch.  float16/32: within 1 ulp of torch's float64
    result on the same stored inputs (at max(|y|, 1)) and within 8 ulps of torch in the same dtype."""
    dt = y.dtype
    if dt == np.float64:
        close(y, ref[0])
        if running is not None:
            for got, want in zip(running, ref[1]):
                close(got, want)
        return
    close_ulps(y, ref64[0], dt, k=1)
    close_ulps(y, ref[0], dt, k=8)
    if running is not None:
        tol = 2 * float(np.finfo(dt).eps)
        for got, want64, want in zip(running, ref64[1], ref[1]):
            assert got.dtype == dt
            close(got, want64, rtol=tol, atol=tol)
            close(got, want, rtol=4 * tol, atol=4 * tol)


SHAPE4 = (4, 6, 5, 7)


@pytest.mark.parametrize("dt", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("layer", LAYERS)
def test_low_precision_agrees_with_torch(backend, layer, dt, rng):
    """On well-conditioned data cnorm's float16/32 output is the float64 result rounded once.

    (PyTorch's own float32 gelu is up to ~4.5 ulps off its float64 gelu, its silu and
    gelu_tanh ~2 ulps: hence the looser bound against torch in the same dtype.)
    """
    x = data(rng, SHAPE4, dt, loc=0.25, scale=1.5)
    for activation in ACTIVATIONS:
        y, running, ref, ref64 = run_layer(layer, x, backend, activation=activation, rng=rng)
        assert y.dtype == dt
        check_layer(y, running, ref, ref64)


@pytest.mark.parametrize("dt", [np.float16, np.float32, np.float64], ids=["float16", "float32", "float64"])
@pytest.mark.parametrize("layer", LAYERS)
def test_every_isa_path(isa, layer, dt, rng):
    """The Cython kernels of every runnable ISA level, every layout, against torch."""
    base = data(rng, (3, 8, 5, 33), dt)  # odd inner length: vector bodies and tails
    for layout in LAYOUTS:
        act = "gelu_tanh" if layout in ("F", "negative") else None
        y, running, ref, ref64 = run_layer(layer, in_layout(base, layout), "cython", activation=act)
        check_layer(y, running, ref, ref64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("layer", LAYERS)
def test_memory_layouts(backend, layer, layout, rng):
    base = data(rng, (3, 4, 6, 5))
    x = in_layout(base, layout)
    before = x.copy()
    y, running, ref, ref64 = run_layer(layer, x, backend, activation="silu")
    check_layer(y, running, ref, ref64)
    np.testing.assert_array_equal(x, before)  # the input is not touched
    # the same numbers as for the C-contiguous input (to the last bit or two: the
    # reduction order follows the memory order)
    y_c = run_layer(layer, base, backend, activation="silu", refs=False)[0]
    close(y, y_c, rtol=1e-15, atol=1e-16)


@pytest.mark.parametrize("layout", ["C", "F", "transposed", "negative"])
def test_layer_norm_multi_axis_layouts(backend, layout, rng):
    base = data(rng, (4, 3, 5, 6))
    x = in_layout(base, layout)
    for axis in ((1, 3), (0, 2), (1, 2, 3), (0, 1, 2, 3)):
        w, b = params(rng, tuple(x.shape[a] for a in axis), True)
        y = call(cnorm.layer_norm, x, axis, w, b, activation="relu", backend=backend)
        close(y, ref_layer_norm(base, axis, w, b, 1e-5, "relu"))


# ------------------------------------------------------------------ out=
OUT_MODES = ["C", "F", "sliced", "x", "x-sliced"]


@pytest.mark.parametrize("mode", OUT_MODES)
@pytest.mark.parametrize("layer", LAYERS)
def test_out(backend, layer, mode, rng):
    for dt in (np.float16, np.float32, np.float64):
        check_out(backend, layer, mode, dt, rng)


def check_out(backend, layer, mode, dt, rng):
    base = data(rng, SHAPE4, dt)
    y_ref, running_ref, _, _ = run_layer(layer, base, backend, activation="gelu", refs=False)
    if mode.startswith("x"):
        x = in_layout(base, "sliced" if mode == "x-sliced" else "C")
        out = x
    else:
        x = base.copy()
        out = in_layout(np.zeros(SHAPE4, dt), mode)
    parent = out.base if out.base is not None else out
    gaps = np.isnan(parent).copy()  # the NaN fill between the elements of a sliced view
    y, running, _, _ = run_layer(layer, x, backend, activation="gelu", out=out, refs=False)
    assert y is out
    np.testing.assert_array_equal(out, y_ref)
    if mode == "sliced" or mode == "x-sliced":
        assert np.isnan(parent[gaps]).all() and gaps.sum() == parent.size - out.size
    if running is not None:  # statistics of the input, not of the output written over it
        for got, want in zip(running, running_ref):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layer", LAYERS)
def test_out_overlapping_input_reversed(backend, layer, rng):
    """``out`` sharing x's memory in another order: the result is still f(x)."""
    base = data(rng, SHAPE4)
    y_ref = run_layer(layer, base, backend, refs=False)[0]
    x = base.copy()
    out = x[::-1]  # the same memory, batch order reversed
    y = run_layer(layer, x, backend, out=out, refs=False)[0]
    assert y is out
    np.testing.assert_array_equal(out, y_ref)


def test_return_stats_with_out_and_float16(backend, rng):
    x = data(rng, (2, 4, 6), np.float16)
    out = np.empty_like(x)
    y, mean, rstd = call(cnorm.group_norm, x, 2, out=out, return_stats=True, backend=backend)
    assert y is out and mean.dtype == rstd.dtype == np.float64 and mean.shape == (2, 2)
    _, tm, tr = torch.native_group_norm(t_(x.astype(np.float64)), None, None, 2, 4, 6, 2, 1e-5)
    close(mean, tm.numpy())
    close(rstd, tr.numpy())

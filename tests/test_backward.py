"""The backward passes (SPEC §2 "Backward") against PyTorch autograd and finite differences.

Every layer x fused activation x affine/no-affine x backend is compared with
``torch.autograd`` in float64 (batch norm in training and eval mode, NCHW and
NHWC, multi-axis and non-trailing layer norm), and with central finite
differences of cnorm's own forward pass.  Further: every memory layout (C, F,
sliced, negative strides, dy in another layout than x), float16/float32/
bfloat16 against a float64 computation on the same stored values, bitwise
identical results for any thread count and ISA path, empty and NaN input, and
bad input (a clear error naming the argument).  Precision at large offsets
against exact arithmetic is in ``test_backward_precision.py``.

The forward statistics always come from the default backend: the backward
backends are tested on their own.
"""
import zlib

import numpy as np
import pytest

import cnorm
from cnorm import _config
from cnorm._axes import normalize_axes
from conftest import require

torch = require("torch")
F = torch.nn.functional

ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]
TACT = {None: lambda t: t, "relu": torch.relu, "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu}
EPS = 1e-5
RTOL = 1e-12


def _t(a, grad=False):
    return None if a is None else torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


def _torch_backward(fn, x, dy, params):
    """Gradients of sum(dy * fn(x, *params)) with respect to x and each parameter."""
    xt = _t(x, True)
    pt = [_t(p, True) for p in params]
    fn(xt, *pt).backward(_t(dy))
    return [xt.grad.numpy()] + [None if p is None else p.grad.numpy() for p in pt]


def _close(got, ref, rtol=RTOL, what=""):
    if ref is None:
        assert got is None, what
        return
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == ref.shape, what
    scale = max(float(np.max(np.abs(ref))), 1e-300) if ref.size else 1.0
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------ the layer cases
def _case(name, act, affine, rng):
    """(cnorm gradients as a function of backend, PyTorch gradients) for one layer case."""
    ta = TACT[act]

    def params(c_shape, with_bias=True):
        if not affine:
            return None, None
        return rng.normal(size=c_shape), (rng.normal(size=c_shape) if with_bias else None)

    if name.startswith("ln"):
        x = rng.normal(size={"ln": (3, 4, 6), "ln_multi": (3, 4, 6), "ln_axis02": (4, 3, 5)}[name]) * 2 + 1
        axis = {"ln": -1, "ln_multi": (-2, -1), "ln_axis02": (0, 2)}[name]
        pshape = {"ln": (6,), "ln_multi": (4, 6), "ln_axis02": (4, 5)}[name]
        w, b = params(pshape)
        y, m, r = cnorm.layer_norm(x, axis, w, b, eps=EPS, activation=act, return_stats=True)
        dy = rng.normal(size=x.shape)
        ours = lambda be: cnorm.layer_norm_backward(dy, x, m, r, w, b, axis=axis, activation=act, backend=be)
        if name == "ln_axis02":  # torch normalizes trailing dims: move the batch axis first
            fn = lambda t, w_, b_: ta(F.layer_norm(t.permute(1, 0, 2), pshape, w_, b_, EPS)).permute(1, 0, 2)
        else:
            fn = lambda t, w_, b_: ta(F.layer_norm(t, pshape, w_, b_, EPS))
        return ours, _torch_backward(fn, x, dy, [w, b])
    if name.startswith("rms"):
        x = rng.normal(size=(3, 4, 6)) + 0.5
        axis, pshape = ((-1,), (6,)) if name == "rms" else ((-2, -1), (4, 6))
        w, _ = params(pshape, with_bias=False)
        y, r = cnorm.rms_norm(x, axis, w, eps=EPS, activation=act, return_stats=True)
        dy = rng.normal(size=x.shape)
        ours = lambda be: cnorm.rms_norm_backward(dy, x, r, w, axis=axis, activation=act, backend=be)
        fn = lambda t, w_: ta(F.rms_norm(t, pshape, w_, EPS))
        return ours, _torch_backward(fn, x, dy, [w])
    nhwc = name.endswith("nhwc")
    to_t = (lambda t: t.permute(0, 3, 1, 2)) if nhwc else (lambda t: t)
    from_t = (lambda t: t.permute(0, 2, 3, 1)) if nhwc else (lambda t: t)
    axis = -1 if nhwc else 1
    C = 6
    shape = (3, 4, 5, C) if nhwc else (3, C, 4, 5)
    x = rng.normal(size=shape) * 1.5 - 0.5
    dy = rng.normal(size=shape)
    w, b = params((C,))
    if name.startswith("bn_eval"):
        rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, size=C)
        y, m, r = cnorm.batch_norm(x, w, b, axis=axis, running_mean=rm.copy(), running_var=rv.copy(),
                                   training=False, eps=EPS, activation=act, return_stats=True)
        ours = lambda be: cnorm.batch_norm_backward(dy, x, m, r, w, b, axis=axis, training=False,
                                                    activation=act, backend=be)
        fn = lambda t, w_, b_: from_t(ta(F.batch_norm(to_t(t), _t(rm), _t(rv), w_, b_, False, 0.1, EPS)))
    elif name.startswith("bn"):
        y, m, r = cnorm.batch_norm(x, w, b, axis=axis, eps=EPS, activation=act, return_stats=True)
        ours = lambda be: cnorm.batch_norm_backward(dy, x, m, r, w, b, axis=axis, activation=act, backend=be)
        fn = lambda t, w_, b_: from_t(ta(F.batch_norm(to_t(t), None, None, w_, b_, True, 0.1, EPS)))
    elif name.startswith("gn"):
        y, m, r = cnorm.group_norm(x, 3, w, b, axis=axis, eps=EPS, activation=act, return_stats=True)
        ours = lambda be: cnorm.group_norm_backward(dy, x, m, r, 3, w, b, axis=axis, activation=act, backend=be)
        fn = lambda t, w_, b_: from_t(ta(F.group_norm(to_t(t), 3, w_, b_, EPS)))
    else:
        y, m, r = cnorm.instance_norm(x, w, b, axis=axis, eps=EPS, activation=act, return_stats=True)
        ours = lambda be: cnorm.instance_norm_backward(dy, x, m, r, w, b, axis=axis, activation=act, backend=be)
        fn = lambda t, w_, b_: from_t(ta(F.instance_norm(to_t(t), weight=w_, bias=b_, eps=EPS)))
    return ours, _torch_backward(fn, x, dy, [w, b])


CASES = ["ln", "ln_multi", "ln_axis02", "rms", "rms_multi", "bn_nchw", "bn_nhwc", "bn_eval_nchw",
         "bn_eval_nhwc", "gn_nchw", "gn_nhwc", "in_nchw", "in_nhwc"]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_torch_autograd(case, act, affine, backend):
    rng = np.random.default_rng(zlib.crc32(f"{case}-{act}-{affine}".encode()))
    ours, ref = _case(case, act, affine, rng)
    got = ours(backend)
    assert len(got) == len(ref)
    for name, g, r in zip(("dx", "dweight", "dbias"), got, ref):
        _close(g, r, what=f"{case} {name}")


@pytest.mark.parametrize("act", [None, "relu", "silu"], ids=str)
@pytest.mark.parametrize("case", ["bn_nchw", "bn_eval_nchw", "gn_nchw", "in_nchw"])
def test_cell_path_matches_torch(case, act, backend, monkeypatch):
    """NCHW slices normally take the fused row kernel; the per-cell path (used for
    channels-last and for slices too large to stay in cache) must agree as well."""
    from cnorm import backward as bw
    monkeypatch.setattr(bw, "_rows_fit", lambda xv, row_axes: False)
    rng = np.random.default_rng(zlib.crc32(f"cells-{case}-{act}".encode()))
    ours, ref = _case(case, act, True, rng)
    for name, g, r in zip(("dx", "dweight", "dbias"), ours(backend), ref):
        _close(g, r, what=f"{case} {name}")


# ------------------------------------------------------------------ finite differences
def _fd_check(forward, backward, x, params, rng, h=1e-6, rtol=1e-7):
    """Central differences of L = sum(dy * forward(x, *params)) against backward's gradients."""
    dy = rng.normal(size=forward(x, *params).shape)
    got = backward(dy)
    loss = lambda xx, pp: float(np.sum(dy * forward(xx, *pp)))
    args = [x] + [p for p in params if p is not None]
    grads = [got[0]] + [g for g, p in zip(got[1:], params) if p is not None]
    for k, (a, g) in enumerate(zip(args, grads)):
        num = np.empty(a.shape)
        for idx in np.ndindex(*a.shape):
            def at(delta):
                moved = [v.copy() for v in args]
                moved[k][idx] += delta
                it = iter(moved[1:])
                pp = [None if p is None else next(it) for p in params]
                return loss(moved[0], pp)
            num[idx] = (at(h) - at(-h)) / (2 * h)
        scale = np.max(np.abs(num))
        assert np.max(np.abs(g - num)) <= rtol * scale + 1e-9, f"argument {k}"


@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "silu"], ids=str)
@pytest.mark.parametrize("layer", ["layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm"])
def test_finite_differences(layer, act):
    rng = np.random.default_rng(7)
    C = 4
    if layer == "layer_norm":
        x, w, b = rng.normal(size=(3, 5)), rng.normal(size=5), rng.normal(size=5)
        fwd = lambda xx, ww, bb: cnorm.layer_norm(xx, -1, ww, bb, activation=act)
        stats = cnorm.layer_norm(x, -1, w, b, activation=act, return_stats=True)[1:]
        bwd = lambda dy: cnorm.layer_norm_backward(dy, x, *stats, w, b, activation=act)
        params = [w, b]
    elif layer == "rms_norm":
        x, w = rng.normal(size=(3, 5)), rng.normal(size=5)
        fwd = lambda xx, ww: cnorm.rms_norm(xx, -1, ww, eps=1e-6, activation=act)
        r = cnorm.rms_norm(x, -1, w, eps=1e-6, activation=act, return_stats=True)[1]
        bwd = lambda dy: cnorm.rms_norm_backward(dy, x, r, w, activation=act)
        params = [w]
    else:
        x, w, b = rng.normal(size=(2, C, 3)), rng.normal(size=C), rng.normal(size=C)
        if layer == "batch_norm":
            f = lambda xx, ww, bb, rs=False: cnorm.batch_norm(xx, ww, bb, activation=act, return_stats=rs)
            bwd = lambda dy: cnorm.batch_norm_backward(dy, x, *f(x, w, b, True)[1:], w, b, activation=act)
        elif layer == "group_norm":
            f = lambda xx, ww, bb, rs=False: cnorm.group_norm(xx, 2, ww, bb, activation=act, return_stats=rs)
            bwd = lambda dy: cnorm.group_norm_backward(dy, x, *f(x, w, b, True)[1:], 2, w, b, activation=act)
        else:
            f = lambda xx, ww, bb, rs=False: cnorm.instance_norm(xx, ww, bb, activation=act, return_stats=rs)
            bwd = lambda dy: cnorm.instance_norm_backward(dy, x, *f(x, w, b, True)[1:], w, b, activation=act)
        fwd = f
        params = [w, b]
    _fd_check(fwd, bwd, x, params, rng)


# ------------------------------------------------------------------ layouts
def _layouts(x, rng):
    """(name, view of a copy of x with that layout)."""
    out = [("C", np.ascontiguousarray(x)), ("F", np.asfortranarray(x))]
    big = np.empty(tuple(2 * s for s in x.shape))
    sl = tuple(slice(None, None, 2) for _ in x.shape)
    big[sl] = x
    out.append(("sliced", big[sl]))
    neg = np.ascontiguousarray(x[(slice(None, None, -1),) * x.ndim])
    out.append(("negative", neg[(slice(None, None, -1),) * x.ndim]))
    perm = list(range(x.ndim))[::-1]
    out.append(("transposed", np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))))
    return out


LAYOUT_CASES = [
    ("layer_norm", (4, 6, 10), dict(axis=-1)),
    ("layer_norm", (4, 6, 10), dict(axis=(0, 2))),
    ("layer_norm", (4, 6, 10), dict(axis=None)),
    ("layer_norm", (3, 2, 4, 2, 5, 2), dict(axis=(0, 2, 4))),     # > 2 unmergeable normalized dims
    ("rms_norm", (5, 16), dict(axis=0)),
    ("batch_norm", (4, 3, 5, 6), dict(axis=1)),
    ("batch_norm", (4, 5, 6, 3), dict(axis=-1)),
    ("batch_norm", (6, 3), dict(axis=1)),
    ("batch_norm", (2, 3, 4, 3, 2), dict(axis=2)),
    ("group_norm", (3, 6, 4, 5), dict(axis=1, num_groups=3)),
    ("group_norm", (3, 4, 5, 6), dict(axis=-1, num_groups=2)),
    ("instance_norm", (3, 4, 7, 5), dict(axis=1)),
    ("instance_norm", (3, 7, 5, 4), dict(axis=-1)),
    ("group_norm", (2, 3, 4, 128), dict(axis=-1, num_groups=2)),   # long channel segments: rows
]


def _run_layer(layer, x, dy, kw, act, backend, w=None, b=None, **extra):
    """Forward stats (default backend) then the backward on ``backend``."""
    kw = dict(kw)
    G = kw.pop("num_groups", None)
    fwd = getattr(cnorm, layer)
    bwd = getattr(cnorm, layer + "_backward")
    if layer == "rms_norm":
        stats = fwd(x, kw.get("axis", -1), w, activation=act, return_stats=True)[1:]
        return bwd(dy, x, *stats, w, axis=kw.get("axis", -1), activation=act, backend=backend, **extra)
    if layer == "layer_norm":
        stats = fwd(x, kw["axis"], w, b, activation=act, return_stats=True)[1:]
        return bwd(dy, x, *stats, w, b, axis=kw["axis"], activation=act, backend=backend, **extra)
    if layer == "group_norm":
        stats = fwd(x, G, w, b, activation=act, return_stats=True, **kw)[1:]
        return bwd(dy, x, *stats, G, w, b, activation=act, backend=backend, **kw, **extra)
    stats = fwd(x, w, b, activation=act, return_stats=True, **kw)[1:]
    return bwd(dy, x, *stats, w, b, activation=act, backend=backend, **kw, **extra)


def _pshape(layer, shape, kw):
    if layer in ("layer_norm", "rms_norm"):
        axes = normalize_axes(kw["axis"], len(shape))
        return tuple(shape[a] for a in axes)
    return (shape[kw["axis"]],)


@pytest.mark.parametrize("act", [None, "silu"], ids=str)
@pytest.mark.parametrize("layer,shape,kw", LAYOUT_CASES,
                         ids=[f"{l}-{'x'.join(map(str, s))}-{k}" for l, s, k in LAYOUT_CASES])
def test_layouts(layer, shape, kw, act, backend):
    """Any memory layout of x and of dy (independently) gives the contiguous result."""
    rng = np.random.default_rng(11)
    x0 = rng.normal(size=shape) + 3.0
    dy0 = rng.normal(size=shape)
    ps = _pshape(layer, shape, kw)
    w, b = rng.normal(size=ps), (None if layer == "rms_norm" else rng.normal(size=ps))
    ref = _run_layer(layer, x0, dy0, kw, act, "numpy", w, b)
    dy_layouts = dict(_layouts(dy0, rng))
    for name, x in _layouts(x0, rng):
        for dname in ("C", name, "F"):
            got = _run_layer(layer, x, dy_layouts[dname], kw, act, backend, w, b)
            for g, r in zip(got, ref):
                _close(g, r, rtol=1e-13, what=f"x {name}, dy {dname}")
            assert got[0].shape == x.shape


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("layer,shape,kw", LAYOUT_CASES[:1] + LAYOUT_CASES[4:6] + LAYOUT_CASES[9:12:2],
                         ids=["ln", "rms", "bn", "gn", "in"])
@pytest.mark.parametrize("act", [None, "gelu"], ids=str)
def test_low_precision_dtypes(layer, shape, kw, act, dtype, backend):
    """float16/float32/bfloat16: dx within 1 ulp of the float64 result on the same stored
    values (float64 arithmetic, one rounding); dweight/dbias in the weight's dtype."""
    if dtype == "bfloat16":
        dt = np.dtype(require("ml_dtypes").bfloat16)
        eps_dt = 2.0 ** -7
    else:
        dt = np.dtype(dtype)
        eps_dt = float(np.finfo(dt).eps)
    rng = np.random.default_rng(5)
    x = (rng.normal(size=shape) + 2.0).astype(dt)
    dy = rng.normal(size=shape).astype(dt)
    ps = _pshape(layer, shape, kw)
    w = rng.normal(size=ps).astype(dt)
    b = None if layer == "rms_norm" else rng.normal(size=ps).astype(dt)
    got = _run_layer(layer, x, dy, kw, act, backend, w, b)
    # the reference: float64 arithmetic on the same stored values and the same stats
    kw2 = dict(kw)
    G = kw2.pop("num_groups", None)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    w64 = w.astype(np.float64)
    b64 = None if b is None else b.astype(np.float64)
    fwd = getattr(cnorm, layer)
    if layer == "rms_norm":
        stats = fwd(x, kw["axis"], w, activation=act, return_stats=True)[1:]
        ref = cnorm.rms_norm_backward(dy64, x64, *stats, w64, axis=kw["axis"], activation=act, backend="numpy")
    elif layer == "layer_norm":
        stats = fwd(x, kw["axis"], w, b, activation=act, return_stats=True)[1:]
        ref = cnorm.layer_norm_backward(dy64, x64, *stats, w64, b64, axis=kw["axis"], activation=act,
                                        backend="numpy")
    elif layer == "group_norm":
        stats = fwd(x, G, w, b, activation=act, return_stats=True, **kw2)[1:]
        ref = cnorm.group_norm_backward(dy64, x64, *stats, G, w64, b64, activation=act, backend="numpy", **kw2)
    else:
        stats = fwd(x, w, b, activation=act, return_stats=True, **kw2)[1:]
        ref = getattr(cnorm, layer + "_backward")(dy64, x64, *stats, w64, b64, activation=act,
                                                  backend="numpy", **kw2)
    assert got[0].dtype == dt and got[0].shape == x.shape
    for g, r in zip(got, ref):
        if r is None:
            assert g is None
            continue
        assert g.dtype == dt
        g64 = g.astype(np.float64)
        # one rounding of a float64 value: half an ulp, plus the float64 noise of the
        # reference (up to 2**-40 of the largest gradient)
        ulp = np.maximum(np.abs(r), 2.0 ** -40 * np.max(np.abs(r))) * eps_dt
        assert np.all(np.abs(g64 - r) <= ulp + 1e-300), float(np.max(np.abs(g64 - r) / ulp))


def test_gradient_dtypes_follow_parameters():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 8))
    y, m, r = cnorm.layer_norm(x, -1, np.ones(8, np.float32), np.zeros(8, np.float16), return_stats=True)
    dx, dw, db = cnorm.layer_norm_backward(rng.normal(size=x.shape), x, m, r, np.ones(8, np.float32),
                                           np.zeros(8, np.float16))
    assert dx.dtype == np.float64 and dw.dtype == np.float32 and db.dtype == np.float16
    dx, dw, db = cnorm.layer_norm_backward(np.ones((4, 8), int), x.astype(int), m, r, [1] * 8)
    assert dx.dtype == np.float64 and dw.dtype == np.float64 and db is None


# ------------------------------------------------------------------ threads and ISA paths
THREAD_CASES = [
    ("layer_norm", (96, 1000), dict(axis=-1)),
    ("layer_norm", (40, 200, 50), dict(axis=(0, 2))),
    ("rms_norm", (300, 512), dict(axis=-1)),
    ("batch_norm", (8, 16, 24, 24), dict(axis=1)),
    ("batch_norm", (8, 24, 24, 16), dict(axis=-1)),
    ("batch_norm", (6, 3, 128, 128), dict(axis=1)),
    ("group_norm", (4, 16, 32, 32), dict(axis=1, num_groups=4)),
    ("instance_norm", (4, 32, 32, 16), dict(axis=-1)),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("act", [None, "gelu"], ids=str)
@pytest.mark.parametrize("layer,shape,kw", THREAD_CASES,
                         ids=[f"{l}-{'x'.join(map(str, s))}" for l, s, _ in THREAD_CASES])
def test_threads_bitwise_identical(layer, shape, kw, act, dtype, backend):
    if backend == "numpy":
        pytest.skip("the numpy backend has no threads")
    rng = np.random.default_rng(3)
    x = (rng.normal(size=shape) + 1.0).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    ps = _pshape(layer, shape, kw)
    w = rng.normal(size=ps)
    b = None if layer == "rms_norm" else rng.normal(size=ps)
    runs = [_run_layer(layer, x, dy, kw, act, backend, w, b, num_threads=n) for n in (1, 2, 3)]
    for other in runs[1:]:
        for g1, g2 in zip(runs[0], other):
            if g1 is None:
                assert g2 is None
            else:
                np.testing.assert_array_equal(g1, g2)


@pytest.mark.parametrize("layer,shape,kw", [THREAD_CASES[0], THREAD_CASES[3], THREAD_CASES[4]],
                         ids=["ln", "bn_nchw", "bn_nhwc"])
@pytest.mark.parametrize("act", [None, "gelu", "silu"], ids=str)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_isa_paths_agree(layer, shape, kw, dtype, act, isa):
    """Every compiled ISA path gives the baseline's numbers, bit for bit (the activation
    derivatives included: no libm calls, no contraction into FMA)."""
    rng = np.random.default_rng(4)
    x = (rng.normal(size=shape) + 1.0).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    ps = _pshape(layer, shape, kw)
    w, b = rng.normal(size=ps), rng.normal(size=ps)
    got = _run_layer(layer, x, dy, kw, act, "cython", w, b)
    previous = _config.isa_selected
    _config.use_isa("baseline")
    try:
        ref = _run_layer(layer, x, dy, kw, act, "cython", w, b)
    finally:
        _config.use_isa(previous)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(12, 300), (9, 64), (5, 4, 48)], ids=str)
def test_four_row_pass_is_bitwise_row_by_row(dtype, shape, isa):
    """The blocked four-row pass of LayerNorm-like rows (on by default only
    where its accumulators fit the registers) gives the row-by-row pass's bits,
    gradients of x and of the per-element parameters alike, on every ISA."""
    rng = np.random.default_rng([5, *shape])
    x = (rng.normal(size=shape) * 3.0 + 40.0).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    w, b = rng.normal(size=shape[-1]), rng.normal(size=shape[-1])
    kernels = _config.family("_backward")
    results = {}
    for on in (True, False):
        previous = kernels.set_block_rows4(on)
        try:
            results[on] = _run_layer("layer_norm", x, dy, {"axis": -1}, None, "cython", w, b)
        finally:
            kernels.set_block_rows4(previous)
    for g, r in zip(results[True], results[False]):
        np.testing.assert_array_equal(g, r)


# ------------------------------------------------------------------ special values
def test_empty_input(backend):
    x = np.zeros((0, 5))
    dx, dw, db = cnorm.layer_norm_backward(x, x, np.zeros((0, 1)), np.zeros((0, 1)), np.ones(5),
                                           np.zeros(5), backend=backend)
    assert dx.shape == (0, 5) and np.array_equal(dw, np.zeros(5)) and np.array_equal(db, np.zeros(5))
    x = np.zeros((0, 3, 4))
    dx, dw, db = cnorm.batch_norm_backward(x, x, np.zeros(3), np.ones(3), np.ones(3), np.ones(3),
                                           backend=backend)
    assert dx.shape == x.shape and np.array_equal(dw, np.zeros(3))


def test_nan_stays_in_its_slice(backend):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(4, 6))
    x[1, 2] = np.nan
    y, m, r = cnorm.layer_norm(x, return_stats=True)
    dx, _, _ = cnorm.layer_norm_backward(rng.normal(size=x.shape), x, m, r, backend=backend)
    assert np.isnan(dx[1]).all()
    assert np.isfinite(np.delete(dx, 1, axis=0)).all()
    xb = rng.normal(size=(3, 2, 5))
    xb[0, 1, 0] = np.nan
    y, m, r = cnorm.batch_norm(xb, return_stats=True)
    dx, _, _ = cnorm.batch_norm_backward(rng.normal(size=xb.shape), xb, m, r, backend=backend)
    assert np.isnan(dx[:, 1]).all() and np.isfinite(dx[:, 0]).all()


def test_constant_slice_gives_finite_gradient(backend):
    x = np.full((2, 8), 3.25)
    y, m, r = cnorm.layer_norm(x, return_stats=True)
    dx, dw, db = cnorm.layer_norm_backward(np.ones_like(x), x, m, r, np.ones(8), np.ones(8), backend=backend)
    assert np.isfinite(dx).all() and np.array_equal(dw, np.zeros(8))


def test_missing_parameters_give_none():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 3, 4))
    y, m, r = cnorm.batch_norm(x, return_stats=True)
    assert cnorm.batch_norm_backward(x, x, m, r)[1:] == (None, None)
    dx, dw, db = cnorm.batch_norm_backward(x, x, m, r, bias=np.zeros(3))
    assert dw is None and db.shape == (3,)
    y, r = cnorm.rms_norm(x, return_stats=True)
    assert cnorm.rms_norm_backward(x, x, r)[1] is None


def test_squeezed_statistics_accepted():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(5, 3, 4))
    dy = rng.normal(size=x.shape)
    y, m, r = cnorm.batch_norm(x, return_stats=True)
    a = cnorm.batch_norm_backward(dy, x, m, r)
    b = cnorm.batch_norm_backward(dy, x, m.ravel(), r.ravel())
    np.testing.assert_array_equal(a[0], b[0])
    y, m, r = cnorm.layer_norm(x, axis=1, return_stats=True)
    np.testing.assert_array_equal(cnorm.layer_norm_backward(dy, x, m, r, axis=1)[0],
                                  cnorm.layer_norm_backward(dy, x, m[:, 0], r[:, 0], axis=1)[0])


# ------------------------------------------------------------------ out=
@pytest.mark.parametrize("layer,shape,kw", [LAYOUT_CASES[0], LAYOUT_CASES[4], LAYOUT_CASES[5],
                                            LAYOUT_CASES[6], LAYOUT_CASES[9], LAYOUT_CASES[12]],
                         ids=["ln", "rms", "bn", "bn_nhwc", "gn", "in_nhwc"])
@pytest.mark.parametrize("target", ["new", "dy", "x"])
def test_out(layer, shape, kw, target, backend):
    """dx into a given array, which may be dy or x itself."""
    rng = np.random.default_rng(13)
    x = rng.normal(size=shape) + 1.0
    dy = rng.normal(size=shape)
    ps = _pshape(layer, shape, kw)
    w, b = rng.normal(size=ps), (None if layer == "rms_norm" else rng.normal(size=ps))
    ref = _run_layer(layer, x, dy, kw, "gelu", backend, w, b)
    xs, dys = x.copy(), dy.copy()
    out = {"new": np.full(shape, np.nan), "dy": dys, "x": xs}[target]
    kw2 = dict(kw)
    G = kw2.pop("num_groups", None)
    fwd, bwd = getattr(cnorm, layer), getattr(cnorm, layer + "_backward")
    if layer in ("layer_norm", "rms_norm"):
        stats = (fwd(x, kw["axis"], w, activation="gelu", return_stats=True) if b is None else
                 fwd(x, kw["axis"], w, b, activation="gelu", return_stats=True))[1:]
        params = (w,) if b is None else (w, b)
        got = bwd(dys, xs, *stats, *params, axis=kw["axis"], activation="gelu", out=out, backend=backend)
    elif layer == "group_norm":
        stats = fwd(x, G, w, b, activation="gelu", return_stats=True, **kw2)[1:]
        got = bwd(dys, xs, *stats, G, w, b, activation="gelu", out=out, backend=backend, **kw2)
    else:
        stats = fwd(x, w, b, activation="gelu", return_stats=True, **kw2)[1:]
        got = bwd(dys, xs, *stats, w, b, activation="gelu", out=out, backend=backend, **kw2)
    assert got[0] is out
    for g, r in zip(got, ref):
        _close(g, r, rtol=1e-13)


def test_out_errors():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(4, 6))
    _, m, r = cnorm.layer_norm(x, return_stats=True)
    dy = rng.normal(size=x.shape)
    ln = cnorm.layer_norm_backward
    with pytest.raises(ValueError, match="out has shape"):
        ln(dy, x, m, r, out=np.empty((4, 5)))
    with pytest.raises(TypeError, match="out has dtype"):
        ln(dy, x, m, r, out=np.empty((4, 6), np.float32))
    ro = np.empty((4, 6))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        ln(dy, x, m, r, out=ro)
    big = np.concatenate([dy, dy], axis=1)
    with pytest.raises(ValueError, match="out overlaps dy"):
        ln(big[:, :6], x, m, r, out=big[:, 1:7])


# ------------------------------------------------------------------ bad input
def _bad_cases():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(4, 6, 5))
    _, m, r = cnorm.layer_norm(x, return_stats=True)
    _, bm, br = cnorm.batch_norm(x, return_stats=True)
    _, gm, gr = cnorm.group_norm(x, 3, return_stats=True)
    _, im, ir = cnorm.instance_norm(x, return_stats=True)
    _, rr = cnorm.rms_norm(x, return_stats=True)
    ln, bn = cnorm.layer_norm_backward, cnorm.batch_norm_backward
    gn, inn, rms = cnorm.group_norm_backward, cnorm.instance_norm_backward, cnorm.rms_norm_backward
    return [
        ("dy shape", lambda: ln(x[:3], x, m, r), ValueError, "dy has shape"),
        ("dy dtype", lambda: ln(x.astype(np.float32), x, m, r), TypeError, "dy has dtype float32"),
        ("dy complex", lambda: ln(x.astype(complex), x, m, r), TypeError, "dy"),
        ("x complex", lambda: ln(x, x.astype(complex), m, r), TypeError, "x must be"),
        ("x strings", lambda: ln(x, np.full(x.shape, "a"), m, r), TypeError, "x must be"),
        ("mean shape", lambda: ln(x, x, m[:2], r), ValueError, "mean has shape"),
        ("rstd shape", lambda: ln(x, x, m, r[..., :0]), ValueError, "rstd has shape"),
        ("mean dtype", lambda: ln(x, x, m.astype(complex), r), TypeError, "mean must be"),
        ("bn stats to ln", lambda: ln(x, x, bm, br), ValueError, "mean has shape"),
        ("ln stats to bn", lambda: bn(x, x, m, r), ValueError, "mean has shape"),
        ("gn stats to in", lambda: inn(x, x, gm, gr), ValueError, "mean has shape"),
        ("in stats to gn", lambda: gn(x, x, im, ir, 3), ValueError, "mean has shape"),
        ("rms stats from ln", lambda: rms(x, x, bm), ValueError, "rstd has shape"),
        ("weight shape", lambda: ln(x, x, m, r, np.ones(4)), ValueError, "weight has shape"),
        ("bias shape", lambda: bn(x, x, bm, br, None, np.ones(5)), ValueError, "bias has shape"),
        ("weight dtype", lambda: gn(x, x, gm, gr, 3, np.array(["a"] * 6)), TypeError, "weight must be"),
        ("num_groups", lambda: gn(x, x, gm, gr, 4), ValueError, "num_groups=4"),
        ("num_groups type", lambda: gn(x, x, gm, gr, 3.0), TypeError, "num_groups"),
        ("num_groups <= 0", lambda: gn(x, x, gm, gr, 0), ValueError, "num_groups"),
        ("activation", lambda: ln(x, x, m, r, activation="tanh"), ValueError, "activation"),
        ("activation unhashable", lambda: ln(x, x, m, r, activation=["relu"]), ValueError, "activation"),
        ("backend", lambda: ln(x, x, m, r, backend="cuda"), ValueError, "backend"),
        ("num_threads", lambda: ln(x, x, m, r, num_threads=0), ValueError, "num_threads"),
        ("axis", lambda: ln(x, x, m, r, axis=3), np.exceptions.AxisError, "axis"),
        ("channel axis tuple", lambda: bn(x, x, bm, br, axis=(1, 2)), TypeError, "axis"),
        ("training", lambda: bn(x, x, bm, br, training=1), TypeError, "training"),
        ("in batch axis", lambda: inn(x, x, im, ir, axis=0), ValueError, "batch axis"),
    ]


@pytest.mark.parametrize("name,call,exc,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()

"""The C entries that skip the Python planning: layer / rms / group / instance
norm (``_kernels.norm_rows_contig``), batch norm (``batch_norm_contig``),
moments / mean / var / std (``moments_contig``), the small backward passes.

Small arrays (C-contiguous ones for moments) with the default arguments skip
the Python planning and go to the kernel through one C function.  It must give bitwise the results of the
general path (forced here by a kernel module whose small-call entries decline
every call), fall back to it for everything it does not handle, and keep
every error of the general path.
"""
import contextlib
import numpy as np
import pytest

import cnorm
from cnorm import _config

pytestmark = pytest.mark.skipif(not _config.HAVE_EXTENSION, reason="no compiled kernels")

SHAPES = [(1,), (7,), (4, 16), (32, 64), (3, 5, 33), (130, 1000), (1, 1)]


def _same(a, b):
    """Bitwise equal arrays or scalars, of one dtype and shape."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))


class _Declining:
    """The selected kernel module with both small-call entries declining."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def norm_rows_contig(*args):
        return None

    @staticmethod
    def moments_contig(*args):
        return None

    @staticmethod
    def batch_norm_contig(*args):
        return None


@contextlib.contextmanager
def general_path():
    real = _config.kernels
    _config.kernels = _Declining(real)
    try:
        yield
    finally:
        _config.kernels = real


def G(fn, *args, **kw):
    """fn(*args, **kw) through the general path."""
    with general_path():
        return fn(*args, **kw)


def _data(shape, dtype, rng, offset=0.0):
    return (rng.standard_normal(shape) * 3 + offset).astype(dtype)


def _spy(monkeypatch, entry="norm_rows_contig"):
    """Record, for each call of the small-call kernel entry ``entry``, whether it
    handled the call (returned a result, not None)."""
    handled = []
    real_module = _config.kernels
    real = getattr(real_module, entry)

    def spy(*args):
        r = real(*args)
        handled.append(r is not None)
        return r

    class Spy:
        def __getattr__(self, name):
            return spy if name == entry else getattr(real_module, name)

    monkeypatch.setattr(_config, "kernels", Spy())
    return handled


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_small_path_is_bitwise_the_general_path(isa, name, shape, dtype, rng, monkeypatch):
    fn = getattr(cnorm, name)
    x = _data(shape, dtype, rng, offset=1000.0 if dtype != np.float16 else 10.0)
    general = G(fn, x)
    handled = _spy(monkeypatch)
    fast = fn(x)
    assert handled == [True]
    _same(fast, general)
    out = np.full_like(x, np.nan)
    assert fn(x, out=out) is out
    _same(out, general)
    xi = x.copy()
    assert fn(xi, out=xi) is xi
    _same(xi, general)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("pdtype", ["float16", "float32", "float64", "strided float64"])
def test_small_path_with_affine(isa, dtype, pdtype, rng, monkeypatch):
    """Float parameters of any float dtype and layout take the entry (converted to
    float64 exactly, as the general path converts them)."""
    x = _data((9, 40), dtype, rng)
    w, b = rng.standard_normal(80)[::2], rng.standard_normal(80)[::2]
    if pdtype != "strided float64":
        w, b = w.astype(pdtype), b.astype(pdtype)
    for kw in ({"weight": w}, {"bias": b}, {"weight": w, "bias": b}):
        general = G(cnorm.layer_norm, x, **kw)
        handled = _spy(monkeypatch)
        _same(cnorm.layer_norm(x, **kw), general)
        assert handled == [True]
        monkeypatch.undo()
    general = G(cnorm.rms_norm, x, weight=w)
    _same(cnorm.rms_norm(x, weight=w), general)


STATS_CASES = [
    ("layer_norm", (32, 64), {}), ("layer_norm", (3, 5, 33), {"weight": 33, "bias": 33}),
    ("layer_norm", (1, 1), {}), ("rms_norm", (32, 64), {}), ("rms_norm", (7,), {"weight": 7}),
    ("rms_norm", (4, 16), {"eps": 1e-6}),
    ("batch_norm", (8, 16), {}), ("batch_norm", (8, 16, 4, 4), {"weight": 16, "bias": 16}),
    ("batch_norm", (8, 4, 4, 16), {"axis": -1, "running": 16}),
    ("batch_norm", (2, 3, 100), {"running": 3}),
    ("group_norm", (8, 16, 4, 4), {"num_groups": 4}), ("group_norm", (8, 12), {"num_groups": 12}),
    ("instance_norm", (8, 16, 4, 4), {"weight": 16}), ("instance_norm", (2, 3, 100), {})]


@pytest.mark.parametrize("name,shape,spec", STATS_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
def test_small_calls_return_the_general_path_statistics(isa, name, shape, spec, dtype, rng,
                                                        monkeypatch):
    """return_stats=True takes the entry (the training-loop call before a backward) and
    returns the general path's statistics bit for bit: special values (a NaN, an inf, a
    constant slice, a -0.0 mean) included; running statistics updated the same."""
    x = _data(shape, dtype, rng, offset=300.0 if dtype != np.float16 else 10.0)
    flat = x.reshape(-1)
    flat[0], flat[-1] = np.nan, np.inf
    if x.ndim >= 2:
        x[-1 if x.shape[0] > 1 else 0, ...] = -0.0   # one constant slice of negative zeros
    fn = getattr(cnorm, name)
    args = (spec["num_groups"],) if "num_groups" in spec else ()
    kw = {k: v for k, v in spec.items() if k in ("eps", "axis")}
    for p in ("weight", "bias"):
        if p in spec:
            kw[p] = rng.standard_normal(spec[p]).astype(dtype)
    running = {}
    if "running" in spec:
        running = {"running_mean": rng.standard_normal(spec["running"]),
                   "running_var": rng.random(spec["running"]) + 0.5}
    entry = "batch_norm_contig" if name == "batch_norm" else "norm_rows_contig"
    with np.errstate(all="ignore"):
        ref_running = {k: v.copy() for k, v in running.items()}
        general = G(fn, x, *args, return_stats=True, **kw, **ref_running)
        handled = _spy(monkeypatch, entry)
        fast = fn(x, *args, return_stats=True, **kw, **running)
    assert handled == [True]
    assert type(fast) is tuple and len(fast) == len(general)
    for f, g in zip(fast, general):
        _same(f, g)
    for k in running:
        _same(running[k], ref_running[k])


def test_special_values_stay_in_their_row_on_the_small_path(rng):
    x = _data((5, 24), np.float32, rng)
    x[1, 3], x[2, 0], x[3] = np.nan, np.inf, 7.0
    y = cnorm.layer_norm(x)
    assert np.isnan(y[1]).all() and np.isnan(y[2]).all()
    assert (y[3] == 0).all() and np.isfinite(y[[0, 4]]).all()
    _same(y, G(cnorm.layer_norm, x))


@pytest.mark.parametrize("case", ["int weight", "strided x", "fortran x", "list x",
                                  "axis 0", "partial overlap", "activation",
                                  "int x", "strided out"])
def test_ineligible_calls_take_the_general_path(case, rng, monkeypatch):
    x = _data((16, 32), np.float64, rng)
    kw, call_x = {}, x
    if case == "int weight":
        kw["weight"] = np.ones(32, np.int64)
    elif case == "strided x":
        call_x = _data((16, 64), np.float64, rng)[:, ::2]
    elif case == "fortran x":
        call_x = np.asfortranarray(x)
    elif case == "list x":
        call_x = x.tolist()
    elif case == "axis 0":
        kw["axis"] = 0
    elif case == "partial overlap":
        buf = np.zeros(16 * 32 + 8)
        buf[:512] = x.ravel()
        call_x, kw["out"] = buf[:512].reshape(16, 32), buf[8:].reshape(16, 32)
    elif case == "activation":
        kw["activation"] = "relu"
    elif case == "int x":
        call_x = (x * 100).astype(np.int64)
    elif case == "strided out":
        kw["out"] = np.empty((16, 64))[:, ::2]
    expected_input = np.array(call_x, copy=True)
    ref_kw = dict(kw)
    if "out" in ref_kw:
        ref_kw["out"] = None
    expected = G(cnorm.layer_norm, expected_input, **ref_kw)
    handled = _spy(monkeypatch)
    got = cnorm.layer_norm(call_x, **kw)
    assert True not in handled
    np.testing.assert_array_equal(np.asarray(got, dtype=np.float64),
                                  np.asarray(expected, dtype=np.float64))


@pytest.mark.parametrize("bad", [{"eps": -1.0}, {"eps": float("nan")}, {"eps": "1e-5"},
                                 {"weight": np.ones(31)}, {"axis": 2}, {"backend": "fast"},
                                 {"out": np.empty((4, 8))}])
def test_errors_are_those_of_the_general_path(bad, rng):
    x = _data((4, 16), np.float32, rng)
    out_before = None if "out" not in bad else bad["out"].copy()
    with pytest.raises((TypeError, ValueError)):
        cnorm.layer_norm(x, **bad)
    if out_before is not None:
        np.testing.assert_array_equal(bad["out"], out_before)


def test_read_only_out_is_refused(rng):
    x = _data((4, 16), np.float32, rng)
    out = np.empty_like(x)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        cnorm.layer_norm(x, out=out)


# ------------------------------------------------------------------ moments, mean, var, std
# (shape, axis) of the moments entry: every reduction of C-contiguous arrays that
# plans without outer loops -- rows, all axes, columns, NCHW, two reduced runs
# with kept runs between, size-1 axes anywhere, negative and tuple axes
MOMENT_CASES = ([(s, -1) for s in SHAPES] + [(s, None) for s in SHAPES]
                + [((130, 1000), 0), ((7,), 0), ((1, 1), (0, 1)), ((3, 5, 33), (0, 2)),
                   ((4, 6, 5, 7), (0, 2, 3)), ((4, 6, 5, 7), (1, 3)), ((4, 1, 6, 1, 5), (0, -1, 3)),
                   ((4, 6, 5, 7), (1, 2)), ((2, 3, 4, 5), (0, 1)), ((6, 1, 9), 1),
                   ((2, 70, 3, 300), (1, 3)), ((300, 130), -2), ((5, 4, 3), (2, 0, 1))])


def _n_reduced(shape, axis):
    axes = range(len(shape)) if axis is None else np.atleast_1d(axis)
    return int(np.prod([shape[a] for a in axes]))


@pytest.mark.parametrize("shape,axis", MOMENT_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
def test_small_moments_are_bitwise_the_general_path(isa, shape, dtype, axis, rng, monkeypatch):
    x = _data(shape, dtype, rng, offset=1000.0 if dtype != np.float16 else 10.0)
    n = _n_reduced(shape, axis)
    ddofs = [0, 1, 0.5] if n > 1 else [0]
    general = {}
    for ddof in ddofs:
        general[ddof] = (G(cnorm.moments, x, axis, ddof=ddof),
                         [G(getattr(cnorm, f), x, axis, ddof=ddof) for f in ("var", "std")])
    general_mean = G(cnorm.mean, x, axis)
    handled = _spy(monkeypatch, "moments_contig")
    for ddof in ddofs:
        (gm, gv), (gvar, gstd) = general[ddof]
        m, v = cnorm.moments(x, axis, ddof=ddof)
        _same(m, gm)
        _same(v, gv)
        _same(cnorm.var(x, axis, ddof=ddof), gvar)
        _same(cnorm.std(x, axis, ddof=ddof), gstd)
        if axis is None:
            assert np.ndim(m) == 0 and not isinstance(m, np.ndarray)
    _same(cnorm.mean(x, axis), general_mean)
    assert handled and all(handled)


@pytest.mark.parametrize("num_threads", [None, 1, 2, 3])
@pytest.mark.parametrize("shape,axis", [((256, 1024), -1), ((1024, 256), 0),
                                        ((8, 16, 32, 64), (0, 2, 3))], ids=str)
def test_large_moments_take_the_entry_with_threads(shape, axis, num_threads, rng, monkeypatch):
    """Arrays large enough for threads take the entry too, with the general
    path's thread count, and give its bits."""
    x = _data(shape, np.float32, rng, offset=100.0)
    general = G(cnorm.moments, x, axis, num_threads=num_threads)
    handled = _spy(monkeypatch, "moments_contig")
    m, v = cnorm.moments(x, axis, num_threads=num_threads)
    assert handled == [True]
    _same(m, general[0])
    _same(v, general[1])


def test_small_moments_nan_and_ddof_edge_go_through_their_rules(monkeypatch):
    x = np.array([[1.0, 2.0, np.nan], [4.0, 4.0, 4.0]], np.float32)
    m, v = cnorm.moments(x, -1)
    assert np.isnan(m[0]) and np.isnan(v[0]) and m[1] == 4 and v[1] == 0
    handled = _spy(monkeypatch, "moments_contig")
    with pytest.warns(RuntimeWarning):   # ddof >= n: the general path's warning
        cnorm.var(x, -1, ddof=3)
    assert handled == [False]


@pytest.mark.parametrize("case", ["outer loops", "five runs", "weights", "skipna", "keepdims",
                                  "dtype", "out", "strided", "fortran", "list", "int", "np axis",
                                  "list axis"])
def test_small_moments_ineligible_calls(case, rng, monkeypatch):
    x = _data((8, 12), np.float64, rng)
    xs = _data((8, 24), np.float64, rng)[:, ::2]
    x4 = _data((3, 4, 5, 6), np.float64, rng)
    x5 = _data((2, 3, 4, 5, 6), np.float64, rng)
    handled = _spy(monkeypatch, "moments_contig")
    out = np.empty(8)
    got, expected = {
        "outer loops": lambda: (cnorm.moments(x4, (0, 2))[1], np.var(x4, (0, 2))),
        "five runs": lambda: (cnorm.var(x5, (0, 2, 4)), np.var(x5, (0, 2, 4))),
        "weights": lambda: (cnorm.moments(x, -1, weights=np.ones(12))[1], np.var(x, -1)),
        "skipna": lambda: (cnorm.moments(x, -1, skipna=True)[1], np.var(x, -1)),
        "keepdims": lambda: (cnorm.var(x, -1, keepdims=True), np.var(x, -1, keepdims=True)),
        "dtype": lambda: (cnorm.var(x, -1, dtype=np.float32), np.var(x, -1).astype(np.float32)),
        "out": lambda: (cnorm.var(x, -1, out=out), np.var(x, -1)),
        "strided": lambda: (cnorm.var(xs, -1), np.var(xs, -1)),
        "fortran": lambda: (cnorm.var(np.asfortranarray(x), 0), np.var(x, 0)),
        "list": lambda: (cnorm.var(x.tolist(), -1), np.var(x, -1)),
        "int": lambda: (cnorm.var((x * 10).astype(np.int32), -1),
                        np.var((x * 10).astype(np.int32), -1)),
        "np axis": lambda: (cnorm.var(x, np.int64(0)), np.var(x, 0)),
        "list axis": lambda: (cnorm.var(x4, [0, 2, 3]), np.var(x4, (0, 2, 3))),
    }[case]()
    assert True not in handled
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=1e-6 if got.dtype == np.float32 else 1e-12)
    if case == "out":
        assert got is out


@pytest.mark.parametrize("bad", [{"ddof": True}, {"ddof": "1"}, {"axis": 2}, {"axis": -3},
                                 {"axis": (0, 0)}, {"axis": (0, -2)}, {"axis": (True,)},
                                 {"axis": 1.0}, {"backend": "fast"}, {"num_threads": 0}])
def test_small_moments_errors_are_those_of_the_general_path(bad, rng):
    x = _data((4, 16), np.float32, rng)
    with pytest.raises((TypeError, ValueError)):
        cnorm.var(x, **({"axis": -1} | bad))


def test_explicit_thread_counts_take_the_small_path(rng, monkeypatch):
    x = _data((32, 64), np.float32, rng)
    ref = G(cnorm.layer_norm, x)
    handled = _spy(monkeypatch)
    for n in (1, 2, 4):
        _same(cnorm.layer_norm(x, num_threads=n), ref)
    assert handled == [True] * 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises((TypeError, ValueError)):
            cnorm.layer_norm(x, num_threads=bad)


# ------------------------------------------------------------------ backward
@contextlib.contextmanager
def general_backward():
    """Every backward call through the general path: the small paths decline."""
    from cnorm import backward as B
    saved = B._small_rows_backward, B._small_channel_backward
    B._small_rows_backward = lambda *a: None
    B._small_channel_backward = lambda *a: None
    try:
        yield
    finally:
        B._small_rows_backward, B._small_channel_backward = saved


# the ``out`` arguments a small path takes, made from (x, dy): a new array, x and dy
# themselves (the tests pass copies, so that each call sees the same inputs)
OUTS = (("new", lambda x, dy: np.empty_like(x)), ("x", lambda x, dy: x),
        ("dy", lambda x, dy: dy))


def _same_grads(fast, general):
    assert len(fast) == len(general)
    for f, g in zip(fast, general):
        if g is None:
            assert f is None
        else:
            _same(f, g)


def _check_small_backward(call, x, dy):
    """call(x, dy, out=...) on the small path against the general path: bitwise, with
    out=None and each of OUTS (on copies of x and dy)."""
    with general_backward():
        general = call(x, dy)
    _same_grads(call(x, dy), general)
    for kind, make in OUTS:
        x1, dy1 = x.copy(), dy.copy()
        out = make(x1, dy1)
        fast = call(x1, dy1, out=out)
        assert fast[0] is out, kind
        _same_grads(fast, general)


@pytest.mark.parametrize("shape", [(1,), (4, 16), (32, 64), (3, 5, 33), (100, 1000),
                                   (300, 8), (140, 1000)], ids=str)   # the last: threads
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("name,params", [("layer_norm", "none"), ("layer_norm", "weight"),
                                         ("layer_norm", "bias"), ("layer_norm", "both"),
                                         ("layer_norm", "float16"), ("rms_norm", "none"),
                                         ("rms_norm", "weight")])
def test_small_backward_is_bitwise_the_general_path(isa, name, shape, dtype, params, rng):
    """The small-call backward (the C entry) against the general path, with out=None,
    out a new array, out=x and out=dy."""
    x0 = _data(shape, dtype, rng, offset=30.0)
    dy0 = _data(shape, dtype, rng)
    L = shape[-1]
    pdt = (np.float16 if params == "float16" else
           np.float32 if dtype == np.float32 else np.float64)   # parameters of x's dtype too
    w = rng.standard_normal(L).astype(pdt) if params in ("weight", "both", "float16") else None
    b = rng.standard_normal(L).astype(pdt) if params in ("bias", "both", "float16") else None
    if name == "layer_norm":
        _, mean, rstd = cnorm.layer_norm(x0, -1, w, b, return_stats=True)
        call = (lambda x, dy, **kw: cnorm.layer_norm_backward(dy, x, mean, rstd, w, b, **kw))
    else:
        _, rstd = cnorm.rms_norm(x0, -1, w, return_stats=True)
        call = (lambda x, dy, **kw: cnorm.rms_norm_backward(dy, x, rstd, w, **kw))
    from cnorm import _config
    entry = _config.family("_backward").rows_backward_contig
    mode = 2 if name == "layer_norm" else 1
    assert entry(x0, dy0, mean if mode == 2 else None, rstd, w, b, None, mode, 1) is not None
    _check_small_backward(call, x0, dy0)


@pytest.mark.parametrize("case", ["out view", "read-only out", "out dtype", "strided",
                                  "float32 stats", "stats shape", "int weight", "weight shape",
                                  "list x", "long rows", "dy dtype"])
def test_ineligible_rows_backwards_decline_the_entry(case, rng):
    """What the C entry declines goes to the general path, which gives its result or its
    error, with nothing written."""
    from cnorm import _config
    entry = _config.family("_backward").rows_backward_contig
    shape = (2, 70000) if case == "long rows" else (4, 16)
    x = _data(shape, np.float64, rng)
    dy = _data(shape, np.float64, rng)
    _, mean, rstd = cnorm.layer_norm(x, return_stats=True)
    w = b = out = None
    raises = False
    if case == "out view":
        out = x[...]
    elif case == "read-only out":
        out = np.empty_like(x)
        out.flags.writeable = False
        raises = True
    elif case == "out dtype":
        out = np.empty(shape, np.float32)
        raises = True
    elif case == "strided":
        x = _data((4, 32), np.float64, rng)[:, ::2]
    elif case == "float32 stats":
        mean = mean.astype(np.float32)
    elif case == "stats shape":
        mean = mean.reshape(1, -1)
        raises = True
    elif case == "int weight":
        w = np.ones(16, np.int64)
    elif case == "weight shape":
        w = np.ones(17)
        raises = True
    elif case == "list x":
        x = x.tolist()
    elif case == "dy dtype":
        dy = dy.astype(np.float32)
        raises = True
    assert entry(x, dy, mean, rstd, w, b, out, 2, 1) is None
    before = None if out is None else out.copy()
    if raises:
        with pytest.raises((TypeError, ValueError)):
            cnorm.layer_norm_backward(dy, x, mean, rstd, w, b, out=out)
        if before is not None:
            _same(out, before)
        return
    with general_backward():
        general = cnorm.layer_norm_backward(dy, x, mean, rstd, w, b, out=None if out is None
                                            else np.empty_like(np.asarray(x)))
    _same_grads(cnorm.layer_norm_backward(dy, x, mean, rstd, w, b, out=out), general)


# (kind, shape, groups, taken): whether the small path takes the call (instance and group
# norm decline the layouts the general path runs on the per-cell kernels: short segments
# of several rows, no spatial axes; batch norm takes those to the per-cell pass)
CHANNEL_BACKWARD_CASES = [
    ("batch", (4, 6, 8, 8), None, True), ("batch", (1, 6, 5, 7), None, True),
    ("batch", (2, 1, 9, 9), None, True), ("batch", (3, 64, 16, 16), None, True),
    ("batch", (2, 3, 100), None, True), ("batch", (4, 6, 5, 7), None, True),
    ("batch", (8, 16), None, True), ("batch", (4, 6, 1, 1), None, True),
    ("batch", (2, 5), None, True), ("batch", (7, 1), None, True),
    ("batch", (32, 64, 4, 4), None, True), ("instance", (4, 6, 1, 1), None, False),
    ("batch", (4, 64, 24, 24), None, True), ("batch", (300, 700), None, True),   # threads
    ("batch", (64, 40, 8, 8), None, True), ("instance", (4, 64, 24, 24), None, True),
    ("batch", (70000, 2), None, True), ("batch", (5000, 2, 4, 4), None, True),   # chunks
    ("group", (4, 64, 24, 24), 8, True),
    ("instance", (4, 6, 5, 7), None, True), ("instance", (2, 3, 100), None, True),
    ("instance", (3, 64, 4, 4), None, True),
    ("group", (4, 6, 8, 8), 3, True), ("group", (4, 6, 8, 8), 6, True),
    ("group", (2, 64, 16, 16), 32, True), ("group", (3, 8, 100), 1, True),
    ("group", (4, 6, 5, 7), 3, None)]   # None: taken without parameters only


@pytest.mark.parametrize("kind,shape,groups,taken", CHANNEL_BACKWARD_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("params", ["none", "weight", "bias", "both"])
def test_small_channel_backward_is_bitwise_the_general_path(isa, kind, shape, groups, taken, dtype,
                                                            params, rng):
    """Batch / instance / group norm backward, small path (out=None, a new out, out=x,
    out=dy) against the general path, training and (batch norm) eval mode."""
    from cnorm import backward as B
    x = _data(shape, dtype, rng, offset=30.0)
    dy = _data(shape, dtype, rng)
    C = shape[1]
    pdt = np.float32 if dtype == np.float32 else np.float64
    w = rng.standard_normal(C).astype(pdt) if params in ("weight", "both") else None
    b = rng.standard_normal(C).astype(pdt) if params in ("bias", "both") else None
    fwd = {"batch": lambda: cnorm.batch_norm(x, w, b, return_stats=True),
           "instance": lambda: cnorm.instance_norm(x, w, b, return_stats=True),
           "group": lambda: cnorm.group_norm(x, groups, w, b, return_stats=True)}[kind]
    _, mean, rstd = fwd()
    trainings = [True, False] if kind == "batch" else [True]
    for training in trainings:
        def call(x=x, dy=dy, **kw):
            if kind == "batch":
                return cnorm.batch_norm_backward(dy, x, mean, rstd, w, b, training=training,
                                                 **kw)
            if kind == "instance":
                return cnorm.instance_norm_backward(dy, x, mean, rstd, w, b, **kw)
            return cnorm.group_norm_backward(dy, x, mean, rstd, groups, w, b, **kw)
        direct = B._small_channel_backward(kind, dy, x, mean, rstd, w, b, groups, training, 1,
                                           None, None, "auto", None)
        expect = taken if taken is not None else params == "none"
        assert (direct is not None) == expect
        _check_small_backward(call, x, dy)


@pytest.mark.parametrize("kind,shape,groups,entry_takes", [
    ("batch", (4, 64, 24, 24), None, True), ("batch", (3, 64, 16, 16), None, True),
    ("instance", (4, 6, 5, 7), None, True), ("group", (4, 64, 24, 24), 8, True),
    ("group", (3, 8, 100), 1, True),
    ("batch", (8, 16), None, True), ("batch", (32, 64, 4, 4), None, True),   # per-cell pass
    ("group", (4, 6, 5, 7), 3, False)])   # segments of 35 < 64 in slices of several
def test_channel_backward_entry_takes_its_layouts(kind, shape, groups, entry_takes, rng):
    """channel_backward_contig (C) runs the rows-kernel layouts and batch norm's per-cell
    ones, and declines the rest, which the Python path then takes (all compared with
    the general path above)."""
    from cnorm import _config
    entry = _config.family("_backward").channel_backward_contig
    x = _data(shape, np.float32, rng)
    dy = _data(shape, np.float32, rng)
    C = shape[1]
    w = rng.standard_normal(C).astype(np.float32)
    fwd = {"batch": lambda: cnorm.batch_norm(x, w, None, return_stats=True),
           "instance": lambda: cnorm.instance_norm(x, w, None, return_stats=True),
           "group": lambda: cnorm.group_norm(x, groups, w, None, return_stats=True)}[kind]
    _, mean, rstd = fwd()
    code = {"batch": 0, "instance": 1, "group": 2}[kind]
    res = entry(x, dy, mean, rstd, w, None, None, code, groups or 0, True, 1)
    assert (res is not None) == entry_takes
    if res is not None:
        assert res[0].shape == x.shape and res[1].shape == (C,) and res[2] is None


@pytest.mark.parametrize("case", ["channels last", "activation", "out", "strided", "float32 stats",
                                  "int weight", "np training", "list x"])
def test_ineligible_channel_backwards_take_the_general_path(case, rng):
    from cnorm import backward as B
    x = _data((4, 6, 8, 8), np.float32, rng)
    dy = _data((4, 6, 8, 8), np.float32, rng)
    _, mean, rstd = cnorm.batch_norm(x, return_stats=True)
    args = dict(weight=None, bias=None, training=True, axis=1, activation=None, out=None)
    if case == "channels last":
        x, dy = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x, dy))
        mean, rstd = mean.reshape(-1), rstd.reshape(-1)
        args["axis"] = -1
    elif case == "activation":
        args["activation"] = "relu"
    elif case == "out":   # a view of x that is not x itself: the general path takes it
        x = x.copy()
        args["out"] = x[...]
    elif case == "strided":
        x = _data((4, 12, 8, 8), np.float32, rng)[:, ::2]
    elif case == "float32 stats":
        mean = mean.astype(np.float32)
    elif case == "int weight":
        args["weight"] = np.ones(6, np.int64)
    elif case == "np training":
        args["training"] = np.bool_(True)
    elif case == "list x":
        x, dy = x.tolist(), dy.tolist()
    assert B._small_channel_backward("batch", dy, x, mean, rstd, args["weight"], None, None,
                                     args["training"], args["axis"], args["activation"],
                                     args["out"], "auto", None) is None
    dx = cnorm.batch_norm_backward(dy, x, mean, rstd, **args)[0]
    assert np.asarray(dx).shape == np.asarray(x).shape


@pytest.mark.parametrize("bad", [{"num_groups": 4}, {"num_groups": 0}, {"num_groups": True},
                                 {"num_groups": 2.0}, {"flat_mean": True}, {"weight": np.ones(3)},
                                 {"backend": "fast"}, {"num_threads": 0}, {"axis": 0}])
def test_small_group_backward_errors_are_those_of_the_general_path(bad, rng):
    x = _data((4, 6, 8, 8), np.float32, rng)
    dy = _data((4, 6, 8, 8), np.float32, rng)
    _, mean, rstd = cnorm.group_norm(x, 3, return_stats=True)
    kw = {"num_groups": 3} | bad
    if kw.pop("flat_mean", False):
        mean = mean.reshape(-1)
    with pytest.raises((TypeError, ValueError)):
        cnorm.group_norm_backward(dy, x, mean, rstd, kw.pop("num_groups"), **kw)


# ------------------------------------------------------------------ batch_norm (training)
BN_CASES = [((4, 6, 5, 7), 1), ((4, 5, 7, 6), -1), ((8, 3), 1), ((8, 3), -1), ((2, 6, 9), 1),
            ((1, 6, 5, 5), 1), ((5, 1, 1, 6), 3), ((3, 4, 1, 1), 1), ((64, 4, 33, 33), 1),
            ((64, 33, 33, 4), -1), ((16, 64, 16, 16), 1)]


def _bn_calls(x, axis, rng):
    C = x.shape[axis]
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    return [{}, {"weight": w}, {"bias": b}, {"weight": w, "bias": b},
            {"weight": w.astype(np.float32), "bias": b.astype(np.float16)},
            {"weight": w, "bias": b, "running_mean": "rm", "running_var": "rv"},
            {"running_var": "rv", "momentum": 0.25},
            {"running_mean": "rm32", "running_var": "rv32", "momentum": 0.5}]


def _bn_run(fn, x, axis, kw, rng_seed):
    """fn(x, axis=axis, **kw) with fresh running statistics; returns (y, rm, rv)."""
    C = x.shape[axis]
    r = np.random.default_rng(rng_seed)
    running = {"rm": r.standard_normal(C), "rv": r.random(C) + 0.5}
    running |= {"rm32": running["rm"].astype(np.float32), "rv32": running["rv"].astype(np.float32)}
    kw = {k: (running[v] if isinstance(v, str) else v) for k, v in kw.items()}
    y = fn(x, axis=axis, **kw)
    return (y,) + tuple(running.values())


@pytest.mark.parametrize("shape,axis", BN_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
def test_small_batch_norm_is_bitwise_the_general_path(isa, shape, axis, dtype, rng, monkeypatch):
    x = _data(shape, dtype, rng, offset=300.0 if dtype != np.float16 else 10.0)
    calls = _bn_calls(x, axis, rng)
    general = [G(_bn_run, cnorm.batch_norm, x, axis, kw, 7) for kw in calls]
    handled = _spy(monkeypatch, "batch_norm_contig")
    for kw, ref in zip(calls, general):
        got = _bn_run(cnorm.batch_norm, x, axis, kw, 7)
        for a, b in zip(got, ref):
            _same(a, b)
    assert handled == [True] * len(calls)
    out = np.full_like(x, np.nan)
    assert cnorm.batch_norm(x, axis=axis, out=out) is out
    _same(out, general[0][0])
    xi = x.copy()
    assert cnorm.batch_norm(xi, axis=axis, out=xi) is xi
    _same(xi, general[0][0])


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_large_batch_norm_takes_the_entry_with_threads(num_threads, rng, monkeypatch):
    x = _data((16, 64, 32, 32), np.float32, rng, offset=30.0)
    ref = G(cnorm.batch_norm, x, num_threads=num_threads)
    handled = _spy(monkeypatch, "batch_norm_contig")
    _same(cnorm.batch_norm(x, num_threads=num_threads), ref)
    assert handled == [True]


def test_special_values_stay_in_their_channel_on_the_small_batch_norm(rng):
    x = _data((6, 4, 3, 3), np.float32, rng)
    x[2, 1, 0, 0], x[0, 2, 1, 1], x[:, 3] = np.nan, np.inf, 5.0
    y = cnorm.batch_norm(x)
    assert np.isnan(y[:, 1]).all() and np.isnan(y[:, 2]).all()
    assert (y[:, 3] == 0).all() and np.isfinite(y[:, 0]).all()
    _same(y, G(cnorm.batch_norm, x))


@pytest.mark.parametrize("case", ["eval", "activation", "np return_stats", "axis 2", "int weight",
                                  "strided x", "fortran x", "list x", "int x", "1-d",
                                  "list running", "read-only running", "int momentum",
                                  "partial overlap", "np axis"])
def test_ineligible_batch_norms_take_the_general_path(case, rng, monkeypatch):
    x = _data((6, 4, 5, 5), np.float64, rng)
    rm, rv = np.zeros(4), np.ones(4)
    kw, call_x = {}, x
    if case == "eval":
        kw.update(training=False, running_mean=rm, running_var=rv)
    elif case == "activation":
        kw["activation"] = "relu"
    elif case == "np return_stats":   # a NumPy bool: the general path checks it
        kw["return_stats"] = np.bool_(True)
    elif case == "axis 2":
        kw["axis"] = 2
    elif case == "int weight":
        kw["weight"] = np.ones(4, np.int64)
    elif case == "strided x":
        call_x = _data((6, 8, 5, 5), np.float64, rng)[:, ::2]
    elif case == "fortran x":
        call_x = np.asfortranarray(x)
    elif case == "list x":
        call_x = x.tolist()
    elif case == "int x":
        call_x = (x * 100).astype(np.int64)
    elif case == "1-d":
        call_x = x.ravel()
        kw["axis"] = 0
    elif case == "list running":
        kw["running_mean"] = [0.0] * 4
    elif case == "read-only running":
        rm.flags.writeable = False
        kw["running_mean"] = rm
    elif case == "int momentum":
        kw.update(running_mean=rm, momentum=1)
    elif case == "partial overlap":
        buf = np.zeros(x.size + 8)
        buf[:x.size] = x.ravel()
        call_x, kw["out"] = buf[:x.size].reshape(x.shape), buf[8:].reshape(x.shape)
    elif case == "np axis":
        kw["axis"] = np.int64(1)
    handled = _spy(monkeypatch, "batch_norm_contig")
    try:
        cnorm.batch_norm(call_x, **kw)
    except (TypeError, ValueError):
        assert case in ("read-only running", "list running", "1-d")
    assert True not in handled


@pytest.mark.parametrize("bad", [{"eps": -1.0}, {"eps": float("nan")}, {"weight": np.ones(3)},
                                 {"axis": 4}, {"backend": "fast"}, {"num_threads": 0},
                                 {"momentum": 1.5}, {"running_mean": np.zeros(3)},
                                 {"out": np.empty((6, 4, 5, 4))}])
def test_small_batch_norm_errors_are_those_of_the_general_path(bad, rng):
    x = _data((6, 4, 5, 5), np.float32, rng)
    rm = np.zeros(4)
    kw = {"running_mean": rm} | bad
    with pytest.raises((TypeError, ValueError)):
        cnorm.batch_norm(x, **kw)
    assert not rm.any()


def test_one_value_per_channel_is_the_general_path_error(rng):
    with pytest.raises(ValueError, match="more than 1 value"):
        cnorm.batch_norm(np.ones((1, 4)))


# ------------------------------------------------------------------ rows: large, group, instance
@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "group_norm", "instance_norm"])
def test_large_rows_take_the_entry_with_threads(name, num_threads, rng, monkeypatch):
    x = _data((16, 64, 24, 24), np.float32, rng, offset=30.0)
    call = {"layer_norm": lambda x, **kw: cnorm.layer_norm(x, **kw),
            "rms_norm": lambda x, **kw: cnorm.rms_norm(x, **kw),
            "group_norm": lambda x, **kw: cnorm.group_norm(x, 8, **kw),
            "instance_norm": lambda x, **kw: cnorm.instance_norm(x, **kw)}[name]
    ref = G(call, x, num_threads=num_threads)
    handled = _spy(monkeypatch)
    _same(call(x, num_threads=num_threads), ref)
    assert handled == [True]


GROUP_CASES = [((4, 6, 5, 7), 3), ((4, 6, 5, 7), 6), ((4, 6, 5, 7), 1), ((8, 12), 4), ((8, 12), 12),
               ((2, 4, 3, 3, 3), 2), ((1, 8, 1, 1), 8), ((3, 64, 16, 16), 32), ((2, 30, 70), 5)]


@pytest.mark.parametrize("shape,groups", GROUP_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
def test_small_group_and_instance_norm_are_bitwise_the_general_path(isa, shape, groups, dtype, rng,
                                                                    monkeypatch):
    x = _data(shape, dtype, rng, offset=300.0 if dtype != np.float16 else 10.0)
    C = shape[1]
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    params = [{}, {"weight": w}, {"bias": b}, {"weight": w, "bias": b},
              {"weight": w.astype(x.dtype), "bias": b.astype(x.dtype)}]
    calls = [(cnorm.group_norm, (groups,), kw) for kw in params]
    if groups == C:
        calls += [(cnorm.instance_norm, (), kw) for kw in params]
    general = [G(fn, x, *args, **kw) for fn, args, kw in calls]
    handled = _spy(monkeypatch)
    for (fn, args, kw), ref in zip(calls, general):
        _same(fn(x, *args, **kw), ref)
        out = np.full_like(x, np.nan)
        assert fn(x, *args, out=out, **kw) is out
        _same(out, ref)
    xi = x.copy()
    assert cnorm.group_norm(xi, groups, out=xi) is xi
    _same(xi, general[0])
    assert handled == [True] * (2 * len(calls) + 1)


@pytest.mark.parametrize("case", ["channels last", "activation", "np return_stats", "int weight",
                                  "strided x", "list x", "np groups", "instance running",
                                  "instance eval", "1-d"])
def test_ineligible_group_norms_take_the_general_path(case, rng, monkeypatch):
    x = _data((6, 4, 5, 5), np.float64, rng)
    fn, args, kw, call_x = cnorm.group_norm, (2,), {}, x
    if case == "channels last":
        kw["axis"], call_x = -1, _data((6, 5, 5, 4), np.float64, rng)
    elif case == "activation":
        kw["activation"] = "relu"
    elif case == "np return_stats":   # a NumPy bool: the general path checks it
        kw["return_stats"] = np.bool_(True)
    elif case == "int weight":
        kw["weight"] = np.ones(4, np.int64)
    elif case == "strided x":
        call_x = _data((6, 8, 5, 5), np.float64, rng)[:, ::2]
    elif case == "list x":
        call_x = x.tolist()
    elif case == "np groups":
        args = (np.int64(2),)
    elif case == "instance running":
        fn, args, kw = cnorm.instance_norm, (), {"running_mean": np.zeros(4)}
    elif case == "instance eval":
        fn, args = cnorm.instance_norm, ()
        kw = {"training": False, "running_mean": np.zeros(4), "running_var": np.ones(4)}
    elif case == "1-d":
        call_x = x.ravel()
        kw["axis"] = 0
    handled = _spy(monkeypatch)
    try:
        fn(call_x, *args, **kw)
    except (TypeError, ValueError):
        assert case == "1-d"
    assert True not in handled


@pytest.mark.parametrize("bad", [{"num_groups": 3}, {"num_groups": 0}, {"num_groups": 2.0},
                                 {"num_groups": None}, {"num_groups": -2}, {"num_groups": True},
                                 {"eps": -1.0}, {"weight": np.ones(3)}, {"axis": 0},
                                 {"backend": "fast"}, {"num_threads": 0},
                                 {"out": np.empty((6, 4, 5, 4))}])
def test_small_group_norm_errors_are_those_of_the_general_path(bad, rng):
    x = _data((6, 4, 5, 5), np.float32, rng)
    kw = {"num_groups": 2} | bad
    with pytest.raises((TypeError, ValueError)):
        cnorm.group_norm(x, **kw)


@pytest.mark.parametrize("name", ["batch_norm", "instance_norm"])
@pytest.mark.parametrize("bad", [None, 2.0, -0.5, float("nan"), "0.1", True])
def test_momentum_is_checked_without_running_statistics(name, bad, rng):
    """The general path validates momentum even when there are no running statistics
    to update; the C entries decline such calls, so the same errors come out."""
    x = _data((6, 4, 5, 5), np.float32, rng)
    with pytest.raises((TypeError, ValueError), match="momentum"):
        getattr(cnorm, name)(x, momentum=bad)


@pytest.mark.parametrize("case", ["1-d", "empty", "stats length", "dtype", "weight dtype",
                                  "strided dy"])
def test_batch_cells_entry_refuses_what_it_cannot_read(isa, case):
    """The Cython entry the small batch norm backward calls checks its arrays itself
    (a ValueError, never a read out of bounds)."""
    mod = _config.family("_backward")
    x = np.ones((4, 3, 2), np.float32)
    args = {"x": x, "dy": x.copy(), "dx": np.empty_like(x), "mean": np.zeros(3),
            "rstd": np.ones(3), "w": None}
    if case == "1-d":
        args.update(x=np.ones(3, np.float32), dy=np.ones(3, np.float32),
                    dx=np.ones(3, np.float32))
    elif case == "empty":
        args.update(x=np.ones((0, 3), np.float32), dy=np.ones((0, 3), np.float32),
                    dx=np.ones((0, 3), np.float32))
    elif case == "stats length":
        args["rstd"] = np.ones(4)
    elif case == "dtype":
        args["dy"] = x.astype(np.float64)
    elif case == "weight dtype":
        args["w"] = np.ones(3, np.float32)
    else:
        args["dy"] = np.ones((4, 3, 4), np.float32)[..., ::2]
    with pytest.raises(ValueError, match="batch_cells_backward"):
        mod.batch_cells_backward(args["x"], args["dy"], args["dx"], args["mean"], args["rstd"],
                                 args["w"], None, True, False, 1)

"""Layer objects against torch.nn: trained torch layers loaded through state_dict.

Every test builds a ``torch.nn`` norm layer, gives it non-trivial parameters
and running statistics (random values, a few SGD steps and forward passes in
training mode), loads its ``state_dict()`` into the cnorm object and checks
that both produce the same outputs and running-statistics updates in training
and eval mode.  Tolerances are in units of the dtype's epsilon times the
largest output magnitude (torch is the less accurate of the two; cnorm's own
accuracy is tested against exact arithmetic in test_norms_precision.py).
"""
import numpy as np
import pytest

import cnorm
from conftest import require

torch = require("torch")

DTYPES = [pytest.param((np.float32, torch.float32), id="float32"),
          pytest.param((np.float64, torch.float64), id="float64")]

# tolerance: |cnorm - torch| <= K * eps * max(1, max|torch|)
K = {np.float32: 4, np.float64: 4}


def assert_torch_close(got, ref, dt, k=None, what="output"):
    ref = ref.detach().cpu().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    got = np.asarray(got)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert got.dtype == np.dtype(dt), (what, got.dtype, dt)
    scale = max(1.0, float(np.max(np.abs(ref.astype(np.float64))))) * np.finfo(dt).eps
    err = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) / scale
    assert err <= (k or K[dt]), f"{what}: {err:.2f} eps from torch"


def offset_data(rng, shape, dt, offset=2.0, scale=3.0):
    return (rng.standard_normal(shape) * scale + offset).astype(dt)


def randomize(tlayer, rng):
    """Random weight/bias (and running stats) in a torch layer."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(tlayer, name, None)
            if p is not None:
                p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)) + 1.0))
    return tlayer


def train_torch(tlayer, make_x, rng, steps=3, lr=0.1):
    """A few SGD steps in training mode: parameters and running stats move."""
    tlayer.train()
    params = [p for p in tlayer.parameters()]
    opt = torch.optim.SGD(params, lr=lr) if params else None
    for _ in range(steps):
        x = torch.from_numpy(make_x())
        y = tlayer(x)
        if opt is not None:
            target = torch.from_numpy(rng.standard_normal(tuple(y.shape))).to(y.dtype)
            loss = ((y - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return tlayer


def check_same(clayer, tlayer, x, dt, what):
    y = clayer(x)
    assert_torch_close(y, tlayer(torch.from_numpy(x)), dt, what=what)
    return y


def check_buffers(clayer, tlayer, dt, *, counter=True):
    for name in ("running_mean", "running_var"):
        ref = getattr(tlayer, name)
        if ref is None:
            assert getattr(clayer, name) is None
            continue
        assert_torch_close(getattr(clayer, name), ref, dt, what=name)
    if counter and tlayer.num_batches_tracked is not None:
        assert clayer.num_batches_tracked.dtype == np.int64
        assert clayer.num_batches_tracked.shape == ()
        assert int(clayer.num_batches_tracked) == int(tlayer.num_batches_tracked)


# ------------------------------------------------------------------ LayerNorm / RMSNorm
@pytest.mark.parametrize("dts", DTYPES)
@pytest.mark.parametrize("shape,normalized", [((4, 7, 10), 10), ((3, 5, 4, 6), (4, 6)),
                                              ((2, 3, 2, 3, 4), (2, 3, 4))])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
def test_layer_norm_matches_torch(dts, shape, normalized, affine, bias):
    dt, tdt = dts
    rng = np.random.default_rng(1)
    t = torch.nn.LayerNorm(normalized, eps=1e-5, elementwise_affine=affine, bias=bias, dtype=tdt)
    randomize(t, rng)
    train_torch(t, lambda: offset_data(rng, shape, dt), rng)
    c = cnorm.LayerNorm(normalized, eps=1e-5, elementwise_affine=affine, bias=bias, dtype=dt)
    assert sorted(c.state_dict()) == sorted(t.state_dict())
    c.load_state_dict(t.state_dict())
    x = offset_data(rng, shape, dt)
    for mode in (True, False):
        c.train(mode), t.train(mode)
        check_same(c, t, x, dt, f"LayerNorm training={mode}")
    # strided input, no copy needed by the caller
    xs = offset_data(rng, shape[:-1] + (2 * shape[-1],), dt)[..., ::2]
    if isinstance(normalized, int) or len(normalized) == 1:
        check_same(c, t, xs, dt, "LayerNorm strided")


@pytest.mark.parametrize("dts", DTYPES)
@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_matches_torch(dts, eps, affine):
    dt, tdt = dts
    rng = np.random.default_rng(2)
    t = torch.nn.RMSNorm((3, 8), eps=eps, elementwise_affine=affine, dtype=tdt)
    randomize(t, rng)
    train_torch(t, lambda: offset_data(rng, (5, 3, 8), dt), rng)
    c = cnorm.RMSNorm((3, 8), eps=eps, elementwise_affine=affine, dtype=dt)
    c.load_state_dict(t.state_dict())
    x = offset_data(rng, (6, 3, 8), dt)
    for mode in (True, False):
        c.train(mode), t.train(mode)
        check_same(c, t, x, dt, f"RMSNorm training={mode}")


# ------------------------------------------------------------------ BatchNorm
BN_CASES = [
    pytest.param(torch.nn.BatchNorm2d, (8, 5, 6, 7), id="2d"),
    pytest.param(torch.nn.BatchNorm1d, (16, 5), id="1d-NC"),
    pytest.param(torch.nn.BatchNorm1d, (8, 5, 9), id="1d-NCL"),
    pytest.param(torch.nn.BatchNorm3d, (4, 5, 3, 4, 5), id="3d"),
]


@pytest.mark.parametrize("dts", DTYPES)
@pytest.mark.parametrize("tcls,shape", BN_CASES)
@pytest.mark.parametrize("momentum", [0.1, 0.35, None])
def test_batch_norm_trained_torch_layer(dts, tcls, shape, momentum):
    dt, tdt = dts
    rng = np.random.default_rng(3)
    make_x = lambda: offset_data(rng, shape, dt)  # noqa: E731
    t = randomize(tcls(5, momentum=momentum, dtype=tdt), rng)
    train_torch(t, make_x, rng, steps=3)
    c = cnorm.BatchNorm(5, momentum=momentum, dtype=dt).load_state_dict(t.state_dict())
    check_buffers(c, t, dt)
    assert int(c.num_batches_tracked) == 3
    # training: same outputs, same running-stat updates (momentum=None: cumulative average)
    for _ in range(4):
        check_same(c, t, make_x(), dt, "BatchNorm train")
        check_buffers(c, t, dt)
    assert int(c.num_batches_tracked) == 7
    # eval: running statistics, untouched
    t.eval(), c.eval()
    before = c.state_dict()
    check_same(c, t, make_x(), dt, "BatchNorm eval")
    check_buffers(c, t, dt)
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(c, k), v)


@pytest.mark.parametrize("dts", DTYPES)
def test_batch_norm_cumulative_average_is_the_mean_of_batch_stats(dts):
    dt, tdt = dts
    rng = np.random.default_rng(4)
    c = cnorm.BatchNorm(3, momentum=None, dtype=np.float64)
    xs = [offset_data(rng, (10, 3, 4), np.float64) for _ in range(5)]
    for x in xs:
        c(x)
    means = [x.mean(axis=(0, 2)) for x in xs]
    vars_ = [x.var(axis=(0, 2), ddof=1) for x in xs]
    np.testing.assert_allclose(c.running_mean, np.mean(means, axis=0), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(c.running_var, np.mean(vars_, axis=0), rtol=1e-14)
    assert int(c.num_batches_tracked) == 5


@pytest.mark.parametrize("dts", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_without_running_stats(dts, affine):
    """track_running_stats=False: batch statistics in eval mode too (torch's rule)."""
    dt, tdt = dts
    rng = np.random.default_rng(5)
    t = randomize(torch.nn.BatchNorm2d(4, affine=affine, track_running_stats=False, dtype=tdt), rng)
    c = cnorm.BatchNorm(4, affine=affine, track_running_stats=False, dtype=dt)
    assert sorted(c.state_dict()) == sorted(t.state_dict())
    c.load_state_dict(t.state_dict())
    assert c.running_mean is None and c.running_var is None and c.num_batches_tracked is None
    x = offset_data(rng, (6, 4, 5, 5), dt)
    for mode in (True, False):
        c.train(mode), t.train(mode)
        check_same(c, t, x, dt, f"BatchNorm untracked training={mode}")


@pytest.mark.parametrize("dts", DTYPES)
def test_batch_norm_channels_last(dts):
    dt, tdt = dts
    rng = np.random.default_rng(6)
    t = randomize(torch.nn.BatchNorm2d(5, dtype=tdt), rng)
    c = cnorm.BatchNorm(5, axis=-1, dtype=dt).load_state_dict(t.state_dict())
    for mode in (True, True, False):
        c.train(mode), t.train(mode)
        x = offset_data(rng, (4, 6, 7, 5), dt)                      # NHWC
        ref = t(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        assert_torch_close(c(x), ref, dt, what=f"NHWC training={mode}")
        check_buffers(c, t, dt)


def test_batch_norm_activation_and_out():
    rng = np.random.default_rng(7)
    t = randomize(torch.nn.BatchNorm2d(3, dtype=torch.float64), rng)
    c = cnorm.BatchNorm(3, dtype=np.float64).load_state_dict(t.state_dict())
    x = offset_data(rng, (4, 3, 5, 5), np.float64)
    out = np.empty_like(x)
    y = c(x, out=out, activation="relu")
    assert y is out
    assert_torch_close(y, torch.relu(t(torch.from_numpy(x))), np.float64)
    check_buffers(c, t, np.float64)
    for backend in ("numpy", "numba"):
        if backend == "numba":
            require("numba")
        c2 = cnorm.BatchNorm(3, dtype=np.float64).load_state_dict(c.state_dict()).eval()
        t.eval()
        assert_torch_close(c2(x, backend=backend, num_threads=1), t(torch.from_numpy(x)),
                           np.float64, what=backend)
        t.train()


# ------------------------------------------------------------------ InstanceNorm
@pytest.mark.parametrize("dts", DTYPES)
@pytest.mark.parametrize("affine,track", [(False, False), (True, False), (False, True),
                                          (True, True)])
def test_instance_norm_matches_torch(dts, affine, track):
    dt, tdt = dts
    rng = np.random.default_rng(8)
    make_x = lambda: offset_data(rng, (3, 4, 5, 6), dt)  # noqa: E731
    t = randomize(torch.nn.InstanceNorm2d(4, affine=affine, track_running_stats=track,
                                          momentum=0.2, dtype=tdt), rng)
    train_torch(t, make_x, rng, steps=2)
    c = cnorm.InstanceNorm(4, affine=affine, track_running_stats=track, momentum=0.2, dtype=dt)
    assert sorted(c.state_dict()) == sorted(t.state_dict())
    c.load_state_dict(t.state_dict())
    for _ in range(3):
        check_same(c, t, make_x(), dt, "InstanceNorm train")
        # torch's InstanceNorm never counts batches; cnorm does (documented)
        check_buffers(c, t, dt, counter=False)
    if track:
        assert int(c.num_batches_tracked) == 3
    c.eval(), t.eval()
    check_same(c, t, make_x(), dt, "InstanceNorm eval")
    check_buffers(c, t, dt, counter=False)


def test_instance_norm_cumulative_average():
    rng = np.random.default_rng(9)
    c = cnorm.InstanceNorm(3, momentum=None, track_running_stats=True, dtype=np.float64)
    xs = [offset_data(rng, (4, 3, 10), np.float64) for _ in range(4)]
    for x in xs:
        c(x)
    means = [x.mean(axis=2).mean(axis=0) for x in xs]
    vars_ = [x.var(axis=2, ddof=1).mean(axis=0) for x in xs]
    np.testing.assert_allclose(c.running_mean, np.mean(means, axis=0), rtol=1e-14)
    np.testing.assert_allclose(c.running_var, np.mean(vars_, axis=0), rtol=1e-14)
    assert int(c.num_batches_tracked) == 4


def test_instance_norm_channel_mismatch():
    x = np.ones((2, 5, 4))
    with pytest.warns(UserWarning, match="num_features"):
        cnorm.InstanceNorm(3)(x)                      # unused num_features: torch warns
    with pytest.raises(ValueError, match="num_features=3"):
        cnorm.InstanceNorm(3, affine=True)(x)


# ------------------------------------------------------------------ GroupNorm
@pytest.mark.parametrize("dts", DTYPES)
@pytest.mark.parametrize("groups,shape", [(3, (4, 6, 5, 5)), (1, (3, 6, 7)), (6, (2, 6, 3, 2, 2))])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_torch(dts, groups, shape, affine):
    dt, tdt = dts
    rng = np.random.default_rng(10)
    t = randomize(torch.nn.GroupNorm(groups, 6, affine=affine, dtype=tdt), rng)
    train_torch(t, lambda: offset_data(rng, shape, dt), rng)
    c = cnorm.GroupNorm(groups, 6, affine=affine, dtype=dt).load_state_dict(t.state_dict())
    x = offset_data(rng, shape, dt)
    for mode in (True, False):
        c.train(mode), t.train(mode)
        check_same(c, t, x, dt, f"GroupNorm training={mode}")


def test_group_norm_channels_last():
    rng = np.random.default_rng(11)
    t = randomize(torch.nn.GroupNorm(2, 6, dtype=torch.float64), rng)
    c = cnorm.GroupNorm(2, 6, axis=-1, dtype=np.float64).load_state_dict(t.state_dict())
    x = offset_data(rng, (3, 4, 5, 6), np.float64)
    ref = t(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert_torch_close(c(x), ref, np.float64)


# ------------------------------------------------------------------ state dicts
def _all_layers(dt=np.float32):
    return [cnorm.LayerNorm((3, 4), dtype=dt), cnorm.RMSNorm(4, dtype=dt),
            cnorm.BatchNorm(4, dtype=dt), cnorm.GroupNorm(2, 4, dtype=dt),
            cnorm.InstanceNorm(4, affine=True, track_running_stats=True, dtype=dt)]


def _inputs(layer, rng):
    shape = {cnorm.LayerNorm: (5, 3, 4), cnorm.RMSNorm: (5, 6, 4)}.get(type(layer), (5, 4, 6))
    return offset_data(rng, shape, np.float32)


@pytest.mark.parametrize("index", range(5))
def test_initialisation_like_torch(index):
    c = _all_layers()[index]
    t = [torch.nn.LayerNorm((3, 4)), torch.nn.RMSNorm(4), torch.nn.BatchNorm1d(4),
         torch.nn.GroupNorm(2, 4),
         torch.nn.InstanceNorm1d(4, affine=True, track_running_stats=True)][index]
    sd, tsd = c.state_dict(), t.state_dict()
    assert list(sd) == list(tsd)                     # same keys, same order
    for k in sd:
        ref = tsd[k].numpy()
        assert sd[k].shape == ref.shape, k
        np.testing.assert_array_equal(sd[k], ref)
        assert sd[k].dtype == (np.int64 if k == "num_batches_tracked" else np.float32)
    assert c.training is True
    assert c.train() is c and c.eval() is c and c.training is False
    assert c.train(True) is c and c.training is True
    assert type(c).__name__ in repr(c) and "float32" in repr(c)
    assert [id(p) for p in c.parameters()] == [id(getattr(c, k)) for k in ("weight", "bias")
                                               if k in sd]


@pytest.mark.parametrize("index", range(5))
def test_state_dict_round_trip(index):
    rng = np.random.default_rng(12)
    a = _all_layers(np.float64)[index]
    for k, v in a.state_dict().items():          # non-trivial values
        if k != "num_batches_tracked":
            setattr(a, k, rng.random(v.shape) + 0.5)
    for _ in range(2):
        a(_inputs(a, rng))
    sd = a.state_dict()
    b = _all_layers(np.float64)[index].load_state_dict(sd)
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    # state_dict() returns copies
    for v in sd.values():
        v[...] = 0
    assert all(np.any(v != 0) for k, v in a.state_dict().items() if k != "bias")
    x = _inputs(a, rng)
    for mode in (True, False):
        np.testing.assert_array_equal(a.train(mode)(x), b.train(mode)(x))
    # torch accepts cnorm's state dict, and cnorm accepts torch tensors
    t = [torch.nn.LayerNorm((3, 4)), torch.nn.RMSNorm(4), torch.nn.BatchNorm1d(4),
         torch.nn.GroupNorm(2, 4),
         torch.nn.InstanceNorm1d(4, affine=True, track_running_stats=True)][index].double()
    t.load_state_dict({k: torch.from_numpy(v) for k, v in a.state_dict().items()})
    c = _all_layers(np.float64)[index].load_state_dict(t.state_dict())
    for k, v in c.state_dict().items():
        np.testing.assert_array_equal(v, a.state_dict()[k])


def test_load_state_dict_converts_dtype():
    t = randomize(torch.nn.BatchNorm2d(3), np.random.default_rng(13))   # float32 tensors
    c = cnorm.BatchNorm(3, dtype=np.float64).load_state_dict(t.state_dict())
    assert c.weight.dtype == np.float64 and c.running_var.dtype == np.float64
    np.testing.assert_array_equal(c.weight, t.weight.detach().numpy().astype(np.float64))
    # plain lists and Python ints are accepted too; arrays are updated in place
    weight = c.weight
    c.load_state_dict({"weight": [1, 2, 3], "bias": [0.0] * 3, "running_mean": [0.0] * 3,
                       "running_var": [1.0] * 3, "num_batches_tracked": 4})
    assert int(c.num_batches_tracked) == 4 and c.num_batches_tracked.dtype == np.int64
    np.testing.assert_array_equal(c.weight, [1.0, 2.0, 3.0])
    assert c.weight is weight


def _bad_cases(layer):
    sd = layer.state_dict()
    first = next(iter(sd))
    cases = []
    missing = dict(sd)
    del missing[first]
    cases.append((missing, KeyError, first))
    extra = dict(sd, unexpected_thing=np.zeros(1))
    cases.append((extra, ValueError, "unexpected_thing"))
    last = [k for k in sd if k != "num_batches_tracked"][-1]
    # every key but the last valid (and different): nothing may be copied
    shaped = {k: (v + 3 if k != "num_batches_tracked" else v + 1) for k, v in sd.items()}
    shaped[last] = np.zeros(sd[last].shape + (2,))
    cases.append((shaped, ValueError, last))
    flat = dict(shaped)
    flat[last] = np.zeros(sd[last].size + 1)
    cases.append((flat, ValueError, str(sd[last].shape)))
    cplx = dict(shaped)
    cplx[last] = np.zeros(sd[last].shape, dtype=complex)
    cases.append((cplx, TypeError, last))
    if "num_batches_tracked" in sd:
        neg = {k: v + 3 for k, v in sd.items()}
        neg["num_batches_tracked"] = np.array(-1)
        cases.append((neg, ValueError, "num_batches_tracked"))
    return cases


@pytest.mark.parametrize("index", range(5))
def test_bad_state_dict_leaves_layer_unchanged(index):
    layer = _all_layers()[index]
    layer(_inputs(layer, np.random.default_rng(14)))
    before = layer.state_dict()
    for sd, exc, name in _bad_cases(layer):
        with pytest.raises(exc, match=name.replace("(", r"\(").replace(")", r"\)")):
            layer.load_state_dict(sd)
        after = layer.state_dict()
        assert list(after) == list(before)
        for k, v in before.items():
            np.testing.assert_array_equal(after[k], v)
            assert after[k].dtype == v.dtype
    with pytest.raises(TypeError, match="mapping"):
        layer.load_state_dict([("weight", 1)])


def test_load_state_dict_not_strict():
    c = cnorm.BatchNorm(2)
    c.load_state_dict({"weight": np.array([2.0, 3.0]), "other": np.zeros(3)}, strict=False)
    np.testing.assert_array_equal(c.weight, [2.0, 3.0])
    np.testing.assert_array_equal(c.bias, [0.0, 0.0])
    with pytest.raises(ValueError, match="'bias' has shape"):
        c.load_state_dict({"bias": np.zeros(3)}, strict=False)


# ------------------------------------------------------------------ failures touch nothing
def test_failed_forward_counts_nothing():
    c = cnorm.BatchNorm(3, momentum=None)
    x = offset_data(np.random.default_rng(15), (4, 3, 5), np.float32)
    c(x)
    before = c.state_dict()
    bad = [dict(activation="tanh"), dict(backend="fortran"), dict(num_threads=0),
           dict(out=np.empty((4, 3, 5), dtype=np.float64))]
    for kw in bad:
        with pytest.raises((TypeError, ValueError)):
            c(x, **kw)
    with pytest.raises(ValueError, match="num_features=3"):
        c(np.ones((4, 2, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        c(np.ones((1, 3), dtype=np.float32))
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(c, k), v)


def test_input_shape_errors():
    with pytest.raises(ValueError, match=r"normalized_shape=\(3, 4\)"):
        cnorm.LayerNorm((3, 4))(np.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="normalized_shape"):
        cnorm.LayerNorm((3, 4), elementwise_affine=False)(np.ones(4))
    with pytest.raises(ValueError, match="normalized_shape"):
        cnorm.RMSNorm(5)(np.ones((2, 4)))
    with pytest.raises(ValueError, match="num_channels=6"):
        cnorm.GroupNorm(3, 6)(np.ones((2, 4, 5)))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: cnorm.LayerNorm(0), ValueError, "normalized_shape"),
    (lambda: cnorm.LayerNorm("3"), TypeError, "normalized_shape"),
    (lambda: cnorm.LayerNorm(3, eps=-1.0), ValueError, "eps"),
    (lambda: cnorm.LayerNorm(3, eps=float("nan")), ValueError, "eps"),
    (lambda: cnorm.LayerNorm(3, dtype=np.complex64), TypeError, "dtype"),
    (lambda: cnorm.LayerNorm(3, bias=1), TypeError, "bias"),
    (lambda: cnorm.RMSNorm(3, eps="small"), TypeError, "eps"),
    (lambda: cnorm.BatchNorm(0), ValueError, "num_features"),
    (lambda: cnorm.BatchNorm(3.0), TypeError, "num_features"),
    (lambda: cnorm.BatchNorm(3, momentum=1.5), ValueError, "momentum"),
    (lambda: cnorm.BatchNorm(3, axis=(1,)), TypeError, "axis"),
    (lambda: cnorm.BatchNorm(3, dtype="int32"), TypeError, "dtype"),
    (lambda: cnorm.InstanceNorm(3, momentum=-0.1), ValueError, "momentum"),
    (lambda: cnorm.GroupNorm(4, 6), ValueError, "num_groups=4"),
    (lambda: cnorm.GroupNorm(0, 6), ValueError, "num_groups"),
    (lambda: cnorm.GroupNorm(2, 6, affine=None), TypeError, "affine"),
])
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_train_mode_must_be_bool():
    with pytest.raises(TypeError, match="mode"):
        cnorm.BatchNorm(2).train("no")


@pytest.mark.parametrize("dt", [np.float16, np.float32, np.float64])
def test_storage_dtype_and_output_dtype(dt):
    """Parameters are stored in ``dtype``; the output keeps the input's dtype."""
    rng = np.random.default_rng(16)
    c = cnorm.BatchNorm(3, dtype=dt)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(c, name).dtype == dt
    x32 = offset_data(rng, (4, 3, 5), np.float32)
    assert c(x32).dtype == np.float32
    assert c.running_mean.dtype == dt
    assert c(x32.astype(np.float64)).dtype == np.float64
    assert c(np.arange(24).reshape(2, 3, 4)).dtype == np.float64   # ints compute in float64

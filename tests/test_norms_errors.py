"""SPEC §5 for the normalization layers: bad input gives a clear error, nothing is lost.

Every bad argument raises ``TypeError`` / ``ValueError`` (``AxisError`` for
axes) whose message names the argument and the offending value, and is raised
before anything is written: the input, the ``out`` buffer and the running
statistics are compared bit for bit with copies taken before the call.
Odd strides (zero, overlapping) are valid inputs and give the same numbers as
a contiguous copy.
"""
import numpy as np
import pytest
from numpy.exceptions import AxisError

import cnorm

LAYERS = ["layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm"]
SHAPE = (2, 4, 3, 5)   # channels C = 4 on axis 1; LN/RMS normalize the last axis (5)
C = 4


def layer_call(layer):
    """``f(x, **kw)`` for a layer with its natural axis (LN/RMS: -1, others channel axis 1)."""
    return {
        "layer_norm": lambda x, **kw: cnorm.layer_norm(x, **kw),
        "rms_norm": lambda x, **kw: cnorm.rms_norm(x, **kw),
        "batch_norm": lambda x, **kw: cnorm.batch_norm(x, **kw),
        "group_norm": lambda x, **kw: cnorm.group_norm(x, kw.pop("num_groups", 2), **kw),
        "instance_norm": lambda x, **kw: cnorm.instance_norm(x, **kw),
    }[layer]


def param_shape(layer):
    return (SHAPE[-1],) if layer in ("layer_norm", "rms_norm") else (C,)


def has_running(layer):
    return layer in ("batch_norm", "instance_norm")


def setup(layer, dtype=np.float64):
    """(x, kwargs) with an out buffer filled with a sentinel and, for BN/IN, running stats."""
    rng = np.random.default_rng(11)
    x = (3.0 + rng.standard_normal(SHAPE)).astype(dtype)
    kw = {"out": np.full(SHAPE, 7.25, dtype=dtype)}
    if has_running(layer):
        kw["running_mean"] = np.linspace(-1, 1, C)
        kw["running_var"] = np.linspace(0.5, 2, C)
    return x, kw


def snapshot(*objs):
    return [np.array(o, copy=True) if isinstance(o, np.ndarray) else o for o in objs]


def check_error(layer, exc, words, x=None, **override):
    """Call ``layer`` with the bad ``override`` and check type, message and that nothing changed."""
    x0, kw = setup(layer)
    x = x0 if x is None else x
    kw.update(override)
    watched = [v for v in [x, *kw.values()] if isinstance(v, np.ndarray)]
    before = [(v.tobytes(), v.shape) for v in watched]
    with pytest.raises(exc) as info:
        layer_call(layer)(x, **kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in the message {msg!r}"
    after = [(v.tobytes(), v.shape) for v in watched]
    assert after == before, "an array was modified before the error"
    return msg


# ------------------------------------------------------------------ x
@pytest.mark.parametrize("bad", [np.array([[1 + 1j] * 5] * 4), np.full((4, 5), 1.0, dtype=object),
                                 np.full((4, 5), "a"), np.zeros((4, 5), dtype="datetime64[s]")],
                         ids=["complex", "object", "str", "datetime"])
@pytest.mark.parametrize("layer", LAYERS)
def test_x_of_a_non_real_dtype(layer, bad):
    check_error(layer, TypeError, ["x", str(bad.dtype)], x=bad, out=None,
                **({"running_mean": None, "running_var": None} if has_running(layer) else {}))


# ------------------------------------------------------------------ weight / bias
# (layer, parameter) pairs: rms_norm has no bias
PARAMS = [(layer, name) for layer in LAYERS for name in ("weight", "bias")
          if (layer, name) != ("rms_norm", "bias")]


@pytest.mark.parametrize("layer,name", PARAMS)
def test_weight_and_bias_of_the_wrong_shape(layer, name):
    good = param_shape(layer)
    for shape in [(good[0] + 1,), (1,) + good, ()]:
        check_error(layer, ValueError, [name, str(shape), str(good)], **{name: np.ones(shape)})


@pytest.mark.parametrize("kind", ["complex", "object", "str"])
@pytest.mark.parametrize("layer,name", PARAMS)
def test_weight_and_bias_of_the_wrong_dtype(layer, name, kind):
    shape = param_shape(layer)
    value = {"complex": np.full(shape, 1 + 0j), "object": np.full(shape, 1.0, dtype=object),
             "str": np.full(shape, "one")}[kind]
    check_error(layer, TypeError, [name, str(value.dtype)], **{name: value})


# ------------------------------------------------------------------ running statistics
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layer", ["batch_norm", "instance_norm"])
def test_running_stats_wrong_shape_dtype_or_type(layer, training, name):
    check_error(layer, ValueError, [name, "(3,)", "(4,)"], training=training, **{name: np.zeros(3)})
    check_error(layer, ValueError, [name, "(4, 1)"], training=training, **{name: np.zeros((4, 1))})
    for bad in (np.zeros(C, complex), np.zeros(C, object), np.zeros(C, int), np.full(C, "0")):
        check_error(layer, TypeError, [name, str(bad.dtype)], training=training, **{name: bad})
    check_error(layer, TypeError, [name, "list"], training=training, **{name: [0.0] * C})
    check_error(layer, TypeError, [name, "tuple"], training=training, **{name: (1.0,) * C})


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
@pytest.mark.parametrize("layer", ["batch_norm", "instance_norm"])
def test_read_only_running_stats_in_training(layer, name):
    x, kw = setup(layer)
    ro = kw[name].copy()
    ro.flags.writeable = False
    check_error(layer, ValueError, [name, "read-only"], **{name: ro})
    # a read-only view of writeable memory is read-only too
    check_error(layer, ValueError, [name, "read-only"], **{name: _readonly_view(C)})


def _readonly_view(n):
    base = np.ones(n)
    v = base[:]
    v.flags.writeable = False
    return v


@pytest.mark.parametrize("layer", ["batch_norm", "instance_norm"])
def test_read_only_running_stats_are_fine_in_eval(layer):
    """Eval mode only reads the running statistics: read-only arrays are accepted."""
    x, kw = setup(layer)
    for k in ("running_mean", "running_var"):
        kw[k].flags.writeable = False
    y = layer_call(layer)(x, training=False, **kw)
    assert y is kw["out"] and np.isfinite(y).all()


@pytest.mark.parametrize("missing", [("running_mean",), ("running_var",), ("running_mean", "running_var")],
                         ids=["no-mean", "no-var", "neither"])
@pytest.mark.parametrize("layer", ["batch_norm", "instance_norm"])
def test_eval_without_running_stats(layer, missing):
    msg = check_error(layer, ValueError, ["training=False"], training=False,
                      **{k: None for k in missing})
    assert all(k in msg for k in ("running_mean", "running_var"))


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1)], ids=str)
def test_batch_norm_one_value_per_channel_in_training(shape):
    x = np.ones(shape)
    rm, rv = np.zeros(C), np.ones(C)
    out = np.full(shape, 7.25)
    for kw in ({}, {"running_mean": rm, "running_var": rv}):
        with pytest.raises(ValueError) as info:
            cnorm.batch_norm(x, out=out, **kw)
        assert "more than 1 value per channel" in str(info.value) and str(shape) in str(info.value)
        assert np.all(out == 7.25) and np.all(rm == 0) and np.all(rv == 1)
    # eval mode with one sample is fine
    y = cnorm.batch_norm(x, running_mean=rm, running_var=rv, training=False)
    assert y.shape == shape


def test_instance_norm_one_spatial_value_with_running_stats():
    x, kw = np.ones((2, C, 1, 1)), {"running_mean": np.zeros(C), "running_var": np.ones(C)}
    with pytest.raises(ValueError) as info:
        cnorm.instance_norm(x, **kw)
    assert "(2, 4, 1, 1)" in str(info.value)
    assert np.all(kw["running_mean"] == 0) and np.all(kw["running_var"] == 1)


# ------------------------------------------------------------------ scalars
@pytest.mark.parametrize("layer", LAYERS)
def test_bad_eps(layer):
    for bad in (-1e-5, -np.inf, np.float32(-1.0)):
        check_error(layer, ValueError, ["eps", repr(bad)], eps=bad)
    check_error(layer, ValueError, ["eps", "nan"], eps=float("nan"))
    check_error(layer, ValueError, ["eps", "nan"], eps=np.float64("nan"))
    for bad in ("1e-5", True, [1e-5], 1e-5 + 0j):
        check_error(layer, TypeError, ["eps", repr(bad)], eps=bad)
    if layer != "rms_norm":  # rms_norm: eps=None is the dtype's epsilon
        check_error(layer, TypeError, ["eps", "None"], eps=None)


@pytest.mark.parametrize("layer", ["batch_norm", "instance_norm"])
def test_bad_momentum(layer):
    for bad in (-0.1, 1.5, np.inf, -np.inf):
        check_error(layer, ValueError, ["momentum", repr(bad)], momentum=bad)
    check_error(layer, ValueError, ["momentum", "nan"], momentum=float("nan"))
    check_error(layer, ValueError, ["momentum", "None"], momentum=None)
    for bad in ("0.1", True, [0.1]):
        check_error(layer, TypeError, ["momentum", repr(bad)], momentum=bad)
    # the bounds themselves are fine
    for ok in (0, 0.0, 1, 1.0):
        x, kw = setup(layer)
        layer_call(layer)(x, momentum=ok, **kw)


def test_num_groups():
    check_error("group_norm", ValueError, ["num_groups=3", "4"], num_groups=3)
    check_error("group_norm", ValueError, ["num_groups=8", "4"], num_groups=8)
    for bad in (0, -2, np.int64(-1)):
        check_error("group_norm", ValueError, ["num_groups", repr(bad) if not isinstance(bad, np.integer)
                                               else str(int(bad))], num_groups=bad)
    for bad in (2.0, "2", True, None, [2]):
        check_error("group_norm", TypeError, ["num_groups", repr(bad)], num_groups=bad)
    x, kw = setup("group_norm")
    cnorm.group_norm(x, np.int64(2), **kw)  # NumPy integers are fine


@pytest.mark.parametrize("layer", LAYERS)
def test_bad_activation(layer):
    for bad in ("tanh", "GELU", "", True, 1):
        check_error(layer, ValueError, ["activation", repr(bad)], activation=bad)


@pytest.mark.parametrize("layer", LAYERS)
def test_unhashable_activation_names_the_argument(layer):
    check_error(layer, (TypeError, ValueError), ["activation", "['relu']"], activation=["relu"])


@pytest.mark.parametrize("layer", LAYERS)
def test_bad_backend(layer):
    for bad in ("cuda", "Cython", "", None, ["cython"]):
        check_error(layer, (TypeError, ValueError), ["backend", repr(bad)], backend=bad)


@pytest.mark.parametrize("layer", LAYERS)
def test_bad_num_threads(layer):
    for bad in (0, -1, np.int64(0)):
        check_error(layer, ValueError, ["num_threads", str(int(bad))], num_threads=bad)
    for bad in (2.0, "2", True):
        check_error(layer, TypeError, ["num_threads", repr(bad)], num_threads=bad)


@pytest.mark.parametrize("layer", LAYERS)
def test_bad_flags(layer):
    check_error(layer, TypeError, ["return_stats", "1"], return_stats=1)
    if has_running(layer):
        check_error(layer, TypeError, ["training", "'yes'"], training="yes")


# ------------------------------------------------------------------ out
@pytest.mark.parametrize("layer", LAYERS)
def test_bad_out(layer):
    check_error(layer, ValueError, ["out", "(2, 4, 3)", str(SHAPE)], out=np.zeros((2, 4, 3)))
    check_error(layer, ValueError, ["out", "(2, 4, 3, 5, 1)"], out=np.zeros(SHAPE + (1,)))
    check_error(layer, TypeError, ["out", "float32", "float64"], out=np.zeros(SHAPE, np.float32))
    check_error(layer, TypeError, ["out", "complex128"], out=np.zeros(SHAPE, complex))
    check_error(layer, TypeError, ["out", "list"], out=np.zeros(SHAPE).tolist())
    ro = np.full(SHAPE, 7.25)
    ro.flags.writeable = False
    check_error(layer, ValueError, ["out", "read-only"], out=ro)
    check_error(layer, ValueError, ["out", "read-only"], out=np.broadcast_to(np.float64(1), SHAPE))


@pytest.mark.parametrize("layer", LAYERS)
def test_out_for_integer_input_must_be_float64(layer):
    x = np.arange(np.prod(SHAPE)).reshape(SHAPE) % 7
    check_error(layer, TypeError, ["out", "int64", "float64"], x=x, out=x)
    check_error(layer, TypeError, ["out", "float32"], x=x, out=np.zeros(SHAPE, np.float32))


@pytest.mark.parametrize("layer", LAYERS)
def test_out_is_x_and_a_later_argument_is_bad(layer):
    """``out=x``: a bad weight must leave x (= out) untouched."""
    x, _ = setup(layer)
    check_error(layer, ValueError, ["weight"], x=x, out=x, weight=np.ones(7))


# ------------------------------------------------------------------ axes
@pytest.mark.parametrize("layer", ["layer_norm", "rms_norm"])
def test_bad_normalized_axes(layer):
    for bad in (4, -5, (1, 9)):
        check_error(layer, AxisError, ["axis", str(bad if not isinstance(bad, tuple) else 9)], axis=bad)
    check_error(layer, ValueError, ["axis", "(1, 1)"], axis=(1, 1))
    check_error(layer, ValueError, ["axis", "(-1, 3)"], axis=(-1, 3))
    for bad in (1.5, "1", (0, 1.0)):
        check_error(layer, TypeError, ["axis", repr(bad)], axis=bad)


@pytest.mark.parametrize("layer", ["batch_norm", "group_norm", "instance_norm"])
def test_bad_channel_axis(layer):
    for bad in (4, -5):
        check_error(layer, AxisError, ["axis", str(bad)], axis=bad)
    check_error(layer, TypeError, ["axis", "(1, 2)"], axis=(1, 2))
    check_error(layer, TypeError, ["axis", "1.0"], axis=1.0)
    if layer != "batch_norm":  # axis 0 is the batch
        check_error(layer, ValueError, ["axis", "0"], axis=0)


@pytest.mark.parametrize("layer", ["batch_norm", "group_norm", "instance_norm"])
def test_channel_layers_need_two_dimensions(layer):
    x = np.ones(4)
    with pytest.raises(ValueError) as info:
        layer_call(layer)(x)
    assert "ndim=1" in str(info.value)


# ------------------------------------------------------------------ every backend validates
@pytest.mark.parametrize("layer", LAYERS)
def test_errors_on_every_backend(backend, layer):
    check_error(layer, ValueError, ["weight"], backend=backend, weight=np.ones(9))
    check_error(layer, ValueError, ["eps"], backend=backend, eps=-1.0)
    check_error(layer, TypeError, ["out"], backend=backend, out=np.zeros(SHAPE, np.float32))
    if has_running(layer):
        check_error(layer, ValueError, ["momentum"], backend=backend, momentum=2.0)


# ------------------------------------------------------------------ odd strides are valid input
def _odd_stride_inputs():
    rng = np.random.default_rng(3)
    row = rng.standard_normal(5)
    v = rng.standard_normal(40)
    return {
        "zero-stride": np.broadcast_to(row, SHAPE),
        "zero-stride-channel": np.broadcast_to(rng.standard_normal((2, 1, 3, 5)), SHAPE),
        "overlapping": np.lib.stride_tricks.as_strided(v, shape=SHAPE, strides=(64, 24, 16, 8),
                                                       writeable=False),
    }


@pytest.mark.parametrize("kind", list(_odd_stride_inputs()))
@pytest.mark.parametrize("layer", LAYERS)
def test_zero_and_overlapping_strides(backend, layer, kind):
    x = _odd_stride_inputs()[kind]
    dense = np.ascontiguousarray(x)
    got = layer_call(layer)(x, backend=backend)
    want = layer_call(layer)(dense, backend=backend)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    assert got.flags.writeable and not np.shares_memory(got, x)

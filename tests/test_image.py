"""normalize_image against exact rational arithmetic, every layout, dtype and path."""
import itertools
from fractions import Fraction

import numpy as np
import pytest

from cnorm import normalize_image
from conftest import require

MEAN3, STD3 = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
OUT_DTYPES = [np.float16, np.float32, np.float64]
LAYOUT_PAIRS = [(a, b) for a, b in itertools.product(["HWC", "CHW", "NHWC", "NCHW"], repeat=2)
                if len(a) == len(b)]


def exact(img, mean, std, scale, layout, out_layout):
    """Exact values (Fractions) laid out in out_layout, as an object array."""
    a = np.asarray(img)
    vals = a.astype(np.float64) if a.dtype.kind == "f" or a.dtype.kind == "V" else a
    lay = layout if len(layout) == 4 else "N" + layout
    src = (vals if vals.ndim == 4 else vals[None]).transpose([lay.index(k) for k in "NCHW"])
    out = np.empty(src.shape, dtype=object)
    for n, c, h, w in np.ndindex(*src.shape):
        v = src[n, c, h, w]
        v = Fraction(int(v)) if a.dtype.kind == "u" else Fraction(float(v))
        out[n, c, h, w] = (v * Fraction(scale) - Fraction(mean[c])) / Fraction(std[c])
    olay = out_layout if len(out_layout) == 4 else "N" + out_layout
    out = out.transpose(["NCHW".index(k) for k in olay])
    return out if len(out_layout) == 4 else out[0]


def assert_within_1ulp(got, ref):
    """Every value of ``got`` within 1 ulp (of its dtype, at the exact value) of ``ref``."""
    dt = got.dtype
    assert got.shape == ref.shape
    for g, r in zip(got.ravel(), ref.ravel()):
        ulp = Fraction(float(np.spacing(abs(dt.type(float(r))))))
        assert abs(Fraction(float(g)) - r) <= ulp, (g, float(r))


def image(rng, dtype, shape):
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if dtype == np.uint16:
        return rng.integers(0, 65536, shape, dtype=np.uint16)
    return rng.random(shape).astype(dtype)


@pytest.mark.parametrize("in_dtype", [np.uint8, np.uint16, np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_exact_within_one_ulp(rng, in_dtype, out_dtype):
    img = image(rng, in_dtype, (3, 5, 3))
    scale = {np.uint8: 1 / 255, np.uint16: 1 / 65535}.get(in_dtype, 1.0)
    y = normalize_image(img, MEAN3, STD3, scale=scale, dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (3, 3, 5) and y.flags.c_contiguous
    assert_within_1ulp(y, exact(img, MEAN3, STD3, scale, "HWC", "CHW"))


@pytest.mark.parametrize("layout, out_layout", LAYOUT_PAIRS)
@pytest.mark.parametrize("in_dtype", [np.uint8, np.float32], ids=lambda d: np.dtype(d).name)
def test_every_layout(rng, layout, out_layout, in_dtype):
    dims = {"N": 2, "H": 3, "W": 4, "C": 3}
    img = image(rng, in_dtype, tuple(dims[k] for k in layout))
    y = normalize_image(img, MEAN3, STD3, layout=layout, out_layout=out_layout)
    assert y.shape == tuple(dims[k] for k in out_layout)
    assert_within_1ulp(y, exact(img, MEAN3, STD3, 1 / 255, layout, out_layout))


def test_cancellation_is_exact():
    """mean == fl(77/255): the naive float32 (and float64) formula cancels badly."""
    img = np.array([[[76], [77], [78]]], dtype=np.uint8)
    mean, std = [77 / 255], [1e-12]
    ref = exact(img, mean, std, 1 / 255, "HWC", "CHW")
    for dt in OUT_DTYPES:
        y = normalize_image(img, mean, std, dtype=dt)
        if dt != np.float16:
            assert_within_1ulp(y, ref)
        assert y[0, 0, 1] != 0  # 77 * fl(1/255) - fl(77/255) is not exactly 0
    y = normalize_image(img.astype(np.float32), mean, std, dtype=np.float64)
    assert_within_1ulp(y, ref)
    naive = (img.astype(np.float64) / 255 - mean[0]) / std[0]
    assert abs(Fraction(float(naive[0, 1, 0])) - ref[0, 0, 1]) >= abs(ref[0, 0, 1]) / 2


def test_lookup_table_and_direct_paths_agree(rng):
    big = rng.integers(0, 65536, (512, 512, 3), dtype=np.uint16)   # large: table path
    y = normalize_image(big, MEAN3, STD3, scale=1 / 65535)
    small = big[100:104, 7:12]                                     # small: direct path
    np.testing.assert_array_equal(normalize_image(small, MEAN3, STD3, scale=1 / 65535),
                                  y[:, 100:104, 7:12])
    halves = rng.standard_normal((512, 512, 3)).astype(np.float16)
    yh = normalize_image(halves, MEAN3, STD3, scale=1.0, dtype=np.float16)
    np.testing.assert_array_equal(
        normalize_image(halves[:3, :3], MEAN3, STD3, scale=1.0, dtype=np.float16), yh[:, :3, :3])
    assert_within_1ulp(yh[:, :2, :2], exact(halves[:2, :2], MEAN3, STD3, 1.0, "HWC", "CHW"))


def test_numpy_backend_and_thread_counts_agree(rng):
    img = image(rng, np.float32, (6, 7, 3))
    ref = exact(img, MEAN3, STD3, 1.0, "HWC", "CHW")
    ys = [normalize_image(img, MEAN3, STD3, scale=1.0, num_threads=t) for t in (1, 2, 3)]
    assert all(np.array_equal(ys[0], y) for y in ys)
    assert_within_1ulp(normalize_image(img, MEAN3, STD3, scale=1.0, backend="numpy"), ref)
    assert_within_1ulp(ys[0], ref)


def test_bfloat16_input_and_output(rng):
    ml_dtypes = require("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    img = np.array([[[0.5, -2.0], [1e30, 3.0e-39]]], dtype=bf16)  # incl. a subnormal
    ref = exact(img, [0.25, 0.0], [2.0, 1.0], 1.0, "HWC", "CHW")
    y = normalize_image(img, [0.25, 0.0], [2.0, 1.0], scale=1.0, dtype=np.float64)
    assert_within_1ulp(y, ref)
    y = normalize_image(img, [0.25, 0.0], [2.0, 1.0], scale=1.0, dtype=bf16)
    assert y.dtype == bf16
    for g, r in zip(y.ravel(), ref.ravel()):  # 1 ulp of bfloat16 (8 significant bits)
        assert abs(Fraction(float(g)) - r) <= abs(r) * Fraction(1, 2**7) + Fraction(2.0**-133)
    small = image(rng, np.uint8, (3, 4, 3))
    yb = normalize_image(small, MEAN3, STD3, dtype=bf16, out_layout="HWC")
    for g, r in zip(yb.ravel(), exact(small, MEAN3, STD3, 1 / 255, "HWC", "HWC").ravel()):
        assert abs(Fraction(float(g)) - r) <= abs(r) * Fraction(1, 2**7) + Fraction(2.0**-133)


def test_strided_inputs_and_out(rng):
    base = image(rng, np.uint8, (8, 10, 4))
    img = base[::-2, 1::3, :3]                     # negative and non-unit strides
    ref = normalize_image(np.ascontiguousarray(img), MEAN3, STD3)
    np.testing.assert_array_equal(normalize_image(img, MEAN3, STD3), ref)
    out = np.zeros((3, 4, 6), np.float32)[:, ::-1, ::2]
    assert normalize_image(img, MEAN3, STD3, out=out) is out
    np.testing.assert_array_equal(out, ref)
    hwc = np.empty((4, 3, 3), np.float16)
    normalize_image(img, MEAN3, STD3, out_layout="HWC", dtype=np.float16, out=hwc)
    assert_within_1ulp(hwc, exact(img, MEAN3, STD3, 1 / 255, "HWC", "HWC"))


def test_special_values():
    img = np.array([[[np.nan], [np.inf], [-np.inf], [70000.0]]], dtype=np.float32)
    y = normalize_image(img, [0.0], [1.0], scale=1.0, dtype=np.float16)
    assert np.isnan(y[0, 0, 0]) and y[0, 0, 1] == np.inf and y[0, 0, 2] == -np.inf
    assert y[0, 0, 3] == np.inf  # overflows float16
    huge = np.array([[[1e301], [-1e300], [np.inf], [1e300]]])
    for backend in ("numba", "numpy"):
        y = normalize_image(huge, [0.0], [1e-10], scale=1 / 255, dtype=np.float64,
                            backend=backend).ravel()
        assert y[0] == np.inf and y[2] == np.inf  # overflow, and inf in
        np.testing.assert_allclose(y[[1, 3]], [-1e300 / 255 / 1e-10, 1e300 / 255 / 1e-10],
                                   rtol=4e-16)
    tiny = np.array([[[2.0**-24 * 0.5], [2.0**-24 * 0.75], [-3e-6]]], dtype=np.float64)
    y = normalize_image(tiny, [0.0], [1.0], scale=1.0, dtype=np.float16)
    np.testing.assert_array_equal(y.ravel(), tiny.astype(np.float16).ravel())  # subnormals, RNE


def test_empty_and_single_channel(rng):
    assert normalize_image(np.zeros((0, 5, 3), np.uint8), MEAN3, STD3).shape == (3, 0, 5)
    gray = image(rng, np.uint8, (4, 5, 1))
    assert_within_1ulp(normalize_image(gray, [0.5], [0.25]),
                       exact(gray, [0.5], [0.25], 1 / 255, "HWC", "CHW"))


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"mean": [0.5, 0.5]}, ValueError, "mean has 2 values but the image has 3 channels"),
    ({"std": [0.5] * 4}, ValueError, "std has 4 values"),
    ({"std": [0.5, 0.0, 0.5]}, ValueError, "std must be > 0"),
    ({"std": [0.5, -1.0, 0.5]}, ValueError, "std must be > 0"),
    ({"mean": [0.5, np.nan, 0.5]}, ValueError, "mean must be finite"),
    ({"mean": [[0.5, 0.5, 0.5]]}, ValueError, "mean"),
    ({"mean": ["a", "b", "c"]}, TypeError, "mean"),
    ({"layout": "HCW"}, ValueError, "layout"),
    ({"out_layout": "NCHW"}, ValueError, "out_layout"),
    ({"layout": "NHWC"}, ValueError, "4-d"),
    ({"dtype": np.int32}, TypeError, "dtype"),
    ({"dtype": "nope"}, TypeError, "dtype"),
    ({"scale": np.inf}, ValueError, "scale"),
    ({"scale": "1"}, TypeError, "scale"),
    ({"backend": "cython"}, ValueError, "backend"),
    ({"num_threads": 0}, ValueError, "num_threads"),
    ({"out": np.empty((3, 4, 5), np.float32)}, ValueError, "shape"),
    ({"out": np.empty((3, 5, 4), np.float64)}, TypeError, "dtype"),
    ({"out": np.empty((3, 5, 4), np.float32).tolist()}, TypeError, "ndarray"),
])
def test_errors(kwargs, exc, match):
    img = np.zeros((5, 4, 3), np.uint8)
    args = {"mean": MEAN3, "std": STD3, **kwargs}
    with pytest.raises(exc, match=match):
        normalize_image(img, **args)


def test_bad_image_dtypes_and_read_only_out():
    for dt in (np.int8, np.int32, np.bool_, np.complex64, object):
        with pytest.raises(TypeError, match="img must have dtype"):
            normalize_image(np.zeros((2, 2, 3), dt), MEAN3, STD3)
    out = np.full((3, 2, 2), 7.0, np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        normalize_image(np.zeros((2, 2, 3), np.uint8), MEAN3, STD3, out=out)
    assert (out == 7.0).all()

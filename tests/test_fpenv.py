"""cnorm leaves the floating-point environment alone, and handles subnormals exactly.

A compiled extension built with ``-ffast-math`` (or a kernel that sets
flush-to-zero / denormals-are-zero or changes the rounding mode) would change
the arithmetic of the whole process.  A fresh subprocess imports cnorm first,
calls every public function on every backend, then checks that plain NumPy
still produces subnormals and rounds to nearest.  Subnormal inputs must give
the exact results (checked with ``fractions.Fraction``).
"""
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest

import cnorm
from conftest import BACKENDS, require

FPENV_CHECK = """
import numpy as np
def fpenv_ok():
    assert np.float64(5e-324) * 2 == 1e-323, "float64 subnormal flushed"
    assert np.nextafter(0.0, 1.0) > 0, "nextafter flushed"
    assert np.float32(1e-45) > 0, "float32 subnormal flushed"
    a = np.array([1e-45, 2e-45], np.float32)
    assert np.all(a * np.float32(1) > 0), "float32 vector subnormal flushed (DAZ)"
    assert np.all(a / np.float32(2) >= 0)
    assert np.float64(2.2250738585072014e-308) / 2 > 0, "underflow flushed (FTZ)"
    assert 0.1 + 0.2 == 0.30000000000000004, "rounding mode changed"
    assert np.float64(1.0) + np.float64(2.0 ** -53) == 1.0, "not round-to-nearest-even"
    assert np.float64(1.0) + np.float64(2.0 ** -52) * 0.75 == 1.0 + 2.0 ** -52
    assert -(np.float64(-1.0) - np.float64(2.0 ** -54)) == 1.0, "rounding mode changed"
    assert np.float16(6e-8) > 0, "float16 subnormal flushed"
fpenv_ok()
"""

SCRIPT = FPENV_CHECK + """
import cnorm
fpenv_ok()
rng = np.random.default_rng(0)
backends = ["cython", "numpy"] + (["numba"] if cnorm._config.have_numba() else [])
for dt in (np.float16, np.float32, np.float64):
    x = (rng.standard_normal((4, 6, 5, 7)) + 3).astype(dt)
    img = (rng.random((5, 7, 3)) * 255).astype(np.uint8)
    dy = rng.standard_normal(x.shape).astype(dt)
    w = np.ones(6, dt)
    for be in backends:
        kw = dict(backend=be)
        cnorm.moments(x, axis=(0, 2), **kw); cnorm.mean(x, **kw)
        cnorm.var(x, 1, **kw); cnorm.std(x, -1, **kw)
        y, m, r = cnorm.layer_norm(x, -1, return_stats=True, activation="gelu", **kw)
        cnorm.layer_norm_backward(dy, x, m, r, axis=-1, **kw)
        y, r = cnorm.rms_norm(x, -1, return_stats=True, **kw)
        cnorm.rms_norm_backward(dy, x, r, axis=-1, **kw)
        y, m, r = cnorm.batch_norm(x, w, w, return_stats=True, activation="silu", **kw)
        cnorm.batch_norm_backward(dy, x, m, r, w, w, activation="silu", **kw)
        y, m, r = cnorm.group_norm(x, 3, w, w, return_stats=True, **kw)
        cnorm.group_norm_backward(dy, x, m, r, 3, w, w, **kw)
        y, m, r = cnorm.instance_norm(x, return_stats=True, **kw)
        cnorm.instance_norm_backward(dy, x, m, r, **kw)
        cnorm.standardize(x, **kw); cnorm.minmax_scale(x.reshape(4, -1), **kw)
        # normalize_image has no Cython kernel (it rejects backend="cython").
        cnorm.normalize_image(img, [0.5] * 3, [0.25] * 3,
                              backend="auto" if be == "cython" else be)
        fpenv_ok()
    for isa in cnorm._config.isa_runnable:
        cnorm._config.use_isa(isa)
        cnorm.moments(x, axis=-1); cnorm.layer_norm(x); cnorm.batch_norm(x)
        fpenv_ok()
    rm = cnorm.RunningMoments(axis=0); rm.update(x); rm.var()
    cnorm.StandardScaler().fit(x.reshape(-1, 7).astype(np.float64)).transform(x.reshape(-1, 7))
    for layer in (cnorm.LayerNorm(7, dtype=dt), cnorm.RMSNorm(7, dtype=dt),
                  cnorm.BatchNorm(6, dtype=dt), cnorm.GroupNorm(3, 6, dtype=dt),
                  cnorm.InstanceNorm(6, dtype=dt)):
        layer(x)
    fpenv_ok()
big = rng.standard_normal((4, 64, 32, 32)).astype(np.float32)
cnorm.moments(big, axis=(0, 2, 3), num_threads=2); cnorm.batch_norm(big, num_threads=2)
cnorm.layer_norm(big, num_threads=2)
fpenv_ok()
print("FPENV-OK")
"""


def test_fpenv_unchanged_after_every_function():
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)],
                          capture_output=True, text=True, timeout=900)   # a hang guard: a cold Numba cache compiles every kernel here
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FPENV-OK" in proc.stdout


def test_fpenv_unchanged_in_this_process():
    cnorm.layer_norm(np.ones((2, 3)))
    ns = {}
    exec(FPENV_CHECK, ns)


def _exact_mean_var(values):
    fr = [Fraction(float(v)) for v in values]
    mu = sum(fr, Fraction(0)) / len(fr)
    return mu, sum(((f - mu) ** 2 for f in fr), Fraction(0)) / len(fr)


SUBNORMAL_CASES = {
    "f64": np.array([5e-324, 5e-324, 1e-323], np.float64),
    "f64_mixed": np.array([5e-324, 1e-323, 1.5e-323, 2e-323, 2.5e-323, 3e-323], np.float64),
    "f64_near_normal": np.array([2.225073858507201e-308, 1e-310, 4e-320, 5e-324]),
    "f32": np.array([1e-45, 1e-45, 3e-45, 1e-40], np.float32),
    "f32_signs": np.array([-1e-45, 1e-45, 3e-45, -1.1754942e-38, 1e-39], np.float32),
    "f16": np.array([6e-8, 6e-8, 1.2e-7, 6.1e-5], np.float16),
    "f16_tiny": np.array([6e-8, 1.2e-7, 1.8e-7, 2.4e-7], np.float16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SUBNORMAL_CASES))
def test_subnormal_inputs_exact(backend, case):
    if backend == "numba":
        require("numba")
    x = SUBNORMAL_CASES[case]
    assert np.any((x != 0) & (np.abs(x) < np.finfo(x.dtype).smallest_normal))
    mu, v = _exact_mean_var(x)
    dt = x.dtype.type
    want_m = dt(float(mu))  # float(Fraction) rounds correctly; the subnormal spacing is
    want_v = dt(float(v))   # finer in float64 so the second rounding is exact or a tie
    m = cnorm.mean(x, backend=backend)
    mm, vv = cnorm.moments(x, backend=backend)
    var = cnorm.var(x, backend=backend)
    for got, want in ((m, want_m), (mm, want_m), (vv, want_v), (var, want_v)):
        got = np.asarray(got)
        assert got.dtype == x.dtype
        ulp = np.spacing(np.abs(want)) if want != 0 else np.finfo(x.dtype).smallest_subnormal
        assert abs(float(got) - float(want)) <= float(ulp), (got, want)


def test_subnormal_mean_exact_values():
    x = np.array([5e-324, 5e-324, 1e-323])
    # (1 + 1 + 2) / 3 subnormal units = 4/3 units -> rounds to 1 unit
    assert Fraction(float(cnorm.mean(x))) == Fraction(5e-324)
    y = np.array([5e-324, 1e-323, 1.5e-323])  # mean = 2 units exactly
    assert cnorm.mean(y) == 1e-323
    assert cnorm.var(np.full(5, 5e-324)) == 0.0
    h = np.array([6e-8, 6e-8, 6e-8], np.float16)
    assert cnorm.mean(h) == np.float16(6e-8) and cnorm.var(h) == 0
    assert cnorm.mean(np.array([6e-8, 1.8e-7], np.float16)) == np.float16(1.2e-7)


@pytest.mark.parametrize("dt", [np.float16, np.float32, np.float64])
def test_normalize_subnormal_slices(dt):
    tiny = np.finfo(dt).smallest_subnormal
    x = np.array([[tiny, 2 * tiny, 3 * tiny], [tiny, tiny, tiny]], dtype=dt)
    y = cnorm.layer_norm(x)  # var underflows far below eps: y = (x - mean)/sqrt(eps)
    mu = Fraction(float(tiny)) * 2
    want = [float((Fraction(float(v)) - mu)) / np.sqrt(1e-5) for v in x[0]]
    assert np.all(y[1] == 0)
    assert y.dtype == dt
    np.testing.assert_allclose(y[0].astype(np.float64), np.asarray(want, dt).astype(np.float64),
                               rtol=0, atol=float(tiny))

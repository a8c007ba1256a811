"""The float32 loops of the AVX-512 path run in 256-bit or 512-bit vectors,
picked at import (CNORM_F32_VECTOR_BITS forces one) or by
``_config.set_f32_vector_bits``: both widths give the same bits, and the same
bits as the other ISA paths, for every statistics and apply loop they hold
(rows, one-row and four-row columns, fused rows, channels-last apply)."""
from __future__ import annotations

import numpy as np
import pytest

import cnorm
from cnorm import _config
from test_isa import run_python

pytestmark = pytest.mark.skipif(not _config.HAVE_EXTENSION, reason="no compiled kernels")


def _cases(rng, n):
    x = (rng.standard_normal((7, n)) * 3 + 50).astype(np.float32)
    x[3] = 2.5                                  # a constant row
    w, b = rng.standard_normal(n), rng.standard_normal(n)
    nchw = (rng.standard_normal((3, 5, 4, n)) + 7).astype(np.float32)
    nhwc = np.ascontiguousarray(np.moveaxis(nchw, 1, -1))
    cw, cb = rng.standard_normal(5), rng.standard_normal(5)
    return {
        "moments rows": lambda: cnorm.moments(x, axis=-1),
        "moments axis 0 (four-row columns)": lambda: cnorm.moments(x, axis=0),
        "moments axis 0, 3 rows (one-row columns)": lambda: cnorm.moments(x[:3], axis=0),
        "layer_norm affine relu": lambda: cnorm.layer_norm(x, -1, w, b, activation="relu"),
        "rms_norm": lambda: cnorm.rms_norm(x, -1, w),
        "batch_norm NCHW": lambda: cnorm.batch_norm(nchw, cw, cb, axis=1, training=True),
        "batch_norm NHWC": lambda: cnorm.batch_norm(nhwc, cw, cb, axis=-1, training=True),
        "group_norm": lambda: cnorm.group_norm(nchw, 5, cw, cb),
    }


def _results(cases):
    out = {}
    for name, fn in cases.items():
        r = fn()
        out[name] = [np.asarray(a).copy() for a in (r if isinstance(r, tuple) else (r,))]
    return out


@pytest.mark.parametrize("n", [1, 15, 16, 67, 1027])
def test_both_widths_and_every_path_give_the_same_bits(n):
    cases = _cases(np.random.default_rng(n), n)
    old = _config.set_f32_vector_bits(256)
    try:
        ref = _results(cases)
        _config.set_f32_vector_bits(512)
        runs = {"512 bits": _results(cases)}
        previous = _config.isa_selected
        try:
            for isa in _config.isa_runnable:
                _config.use_isa(isa)
                runs[isa] = _results(cases)
        finally:
            _config.use_isa(previous)
    finally:
        _config.set_f32_vector_bits(old)
    for label, got in runs.items():
        for name in cases:
            for a, b in zip(got[name], ref[name]):
                np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8),
                                              err_msg=f"{name} ({label})")


def test_setter_reports_and_restores():
    old = _config.set_f32_vector_bits(512)
    try:
        wide = _config.kernels.f32_vector_bits()
        assert _config.set_f32_vector_bits(256) == 512
        narrow = _config.kernels.f32_vector_bits()
    finally:
        _config.set_f32_vector_bits(old)
    if _config.isa_selected == "avx512":
        assert (wide, narrow) == (512, 256)
    else:                                       # the native width; no choice there
        assert wide == narrow == (256 if _config.isa_selected == "avx2" else 128)


@pytest.mark.parametrize("bits", [0, 128, 300, "512", 512.0])
def test_setter_rejects_other_widths(bits):
    with pytest.raises(ValueError, match="bits"):
        _config.set_f32_vector_bits(bits)
    with pytest.raises(ValueError, match="bits"):
        _config.kernels.set_f32_vector_bits(128)


@pytest.mark.parametrize("bits", ["256", "512"])
def test_environment_variable_forces_a_width(bits):
    r = run_python("import cnorm; from cnorm import _config; "
                   "print(_config.kernels.f32_vector_bits(), _config.isa_selected)",
                   CNORM_F32_VECTOR_BITS=bits)
    assert r.returncode == 0, r.stderr
    got, isa = r.stdout.split()
    if isa == "avx512":
        assert got == bits


def test_environment_variable_rejects_other_values():
    r = run_python("import cnorm", CNORM_F32_VECTOR_BITS="384")
    assert r.returncode != 0
    assert "CNORM_F32_VECTOR_BITS" in r.stderr and "384" in r.stderr

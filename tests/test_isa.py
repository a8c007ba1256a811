"""The ISA paths of the Cython kernels: each one imports and says what it is,
CNORM_ISA forces one (and rejects an unknown value at import), and all of
them meet the precision contract on offset data."""
from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys

from fractions import Fraction

import numpy as np
import pytest

import cnorm
from cnorm import _config
from exact import exact_moments, exact_std, max_offset, offset_data, ulp_error

pytestmark = pytest.mark.skipif(not _config.HAVE_EXTENSION, reason="no compiled kernels")

ISA_ORDER = ["baseline", "avx2", "avx512"]
FAMILIES = [f for f in ("_kernels", "_apply", "_backward")
            if importlib.util.find_spec(f"cnorm.{f}") is not None]
VAR_TOL = {np.dtype(np.float16): 1.0, np.dtype(np.float32): 1.0, np.dtype(np.float64): 2.0}


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter with CNORM_ISA (etc.) set; returns the CompletedProcess."""
    full = {k: v for k, v in os.environ.items() if k != "CNORM_ISA"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          timeout=600)   # a hang guard


def test_runnable_paths_are_compiled_and_ordered():
    assert "baseline" in _config.isa_compiled
    assert set(_config.isa_runnable) <= set(_config.isa_compiled) <= set(ISA_ORDER)
    level = _config.kernels.cpu_level()
    assert _config.isa_runnable == [n for n in _config.isa_compiled if ISA_ORDER.index(n) <= level]
    # without CNORM_ISA the best runnable path is chosen
    if not os.environ.get("CNORM_ISA"):
        assert _config.isa_selected == _config.isa_runnable[-1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _config.isa_runnable)
def test_each_runnable_path_imports_and_reports_its_name(name, family):
    mod = _config.kernels_for_isa(name, family)
    expected = "cnorm." + family + ("" if name == "baseline" else "_" + name)
    assert mod.__name__ == expected
    if hasattr(mod, "isa"):
        assert mod.isa() == name
    if family == "_kernels":
        assert mod.isa() == name
        assert mod.cpu_level() == _config.kernels.cpu_level()


@pytest.mark.parametrize("name", ["bogus", "AVX2", "sse4", ""])
def test_kernels_for_unknown_isa(name):
    with pytest.raises(ValueError, match="isa") as info:
        _config.kernels_for_isa(name)
    assert repr(name) in str(info.value)


def test_compiled_but_not_runnable_is_refused():
    missing = [n for n in _config.isa_compiled if n not in _config.isa_runnable]
    if not missing:
        pytest.skip("this CPU runs every compiled path")
    with pytest.raises(ValueError, match=missing[0]):
        _config.kernels_for_isa(missing[0])


def test_use_isa_switches_and_restores():
    previous = _config.isa_selected
    try:
        for name in _config.isa_runnable:
            _config.use_isa(name)
            assert _config.isa_selected == name and _config.kernels.isa() == name
            assert cnorm.show_config(file=io.StringIO())["isa_selected"] == name
    finally:
        _config.use_isa(previous)
    assert _config.kernels.isa() == previous


PROBE = """
import io, numpy as np, cnorm
from cnorm import _config
buf = io.StringIO()
info = cnorm.show_config(file=buf)
print(buf.getvalue())
print("SELECTED", info["isa_selected"], _config.kernels.isa())
x = np.arange(10.0) + 1e8
m, v = cnorm.moments(x)
print("MOMENTS", repr(float(m)), repr(float(v)))
"""


@pytest.mark.parametrize("name", _config.isa_runnable)
def test_cnorm_isa_forces_a_path(name):
    proc = run_python(PROBE, CNORM_ISA=name)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"SELECTED {name} {name}" in out
    line = next(ln for ln in out.splitlines() if "ISA path selected" in ln)
    assert name in line and "forced by CNORM_ISA" in line
    assert "MOMENTS 100000004.5 8.25" in out


def test_default_path_in_a_fresh_process():
    proc = run_python(PROBE)
    assert proc.returncode == 0, proc.stderr
    best = _config.isa_runnable[-1]
    assert f"SELECTED {best} {best}" in proc.stdout
    assert "forced" not in proc.stdout


@pytest.mark.parametrize("value", ["bogus", "avx1024", "neon"])
def test_unknown_cnorm_isa_is_a_clear_error_at_import(value):
    proc = run_python("import cnorm", CNORM_ISA=value)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr                # a Python error, not a crash
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError"), last
    assert "CNORM_ISA" in last and value in last
    for name in ISA_ORDER:                           # it lists the valid names
        assert name in last


def test_cnorm_isa_beyond_this_cpu_is_an_error():
    missing = [n for n in ISA_ORDER if n not in _config.isa_runnable]
    if not missing:
        pytest.skip("this CPU runs every ISA path")
    proc = run_python("import cnorm", CNORM_ISA=missing[0])
    assert proc.returncode != 0 and "ValueError" in proc.stderr and missing[0] in proc.stderr


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_paths_agree_within_the_contract(dtype):
    """Every ISA path meets the contract on offset data, so any two agree within twice it."""
    dt = np.dtype(dtype)
    rng = np.random.default_rng(7071)
    cases = []
    for off in (max_offset(dt) / 1000, max_offset(dt)):
        x = offset_data(dt, None, off, 1.0, rng, shape=(6, 5003))
        cases += [(x, 1), (np.ascontiguousarray(x.T), 0), (x[:, ::3], 1)]
    y = offset_data(dt, None, max_offset(dt), 1.0, rng, shape=(3, 4, 5, 67))
    cases += [(y, (0, 2)), (y, (1, 3)), (y[::-1, :, ::2], None)]
    previous = _config.isa_selected
    results = {}
    try:
        for name in _config.isa_runnable:
            _config.use_isa(name)
            results[name] = [cnorm.moments(x, axis=a) + (cnorm.std(x, axis=a),) for x, a in cases]
    finally:
        _config.use_isa(previous)
    for (x, axis), *per_isa in zip(cases, *results.values()):
        em, ev = exact_moments(x, axis)
        es = exact_std(x, axis)
        for name, (m, v, s) in zip(results, per_isa):
            for got, ref, tol, what in ((m, em, 1.0, "mean"), (v, ev, VAR_TOL[dt], "var"),
                                        (s, es, VAR_TOL[dt], "std")):
                err = ulp_error(got, ref, dt)
                assert err.max() <= tol, f"{name} {what} axis={axis}: {err.max():.3g} ulp"
        for (a_name, a), (b_name, b) in zip(list(zip(results, per_isa))[:-1],
                                            list(zip(results, per_isa))[1:]):
            for ga, gb, tol in zip(a, b, (1.0, VAR_TOL[dt], VAR_TOL[dt])):
                ga = np.asarray(ga, dtype=np.float64)
                gb = np.asarray(gb, dtype=np.float64)
                err = ulp_error(ga, np.array([_frac(v) for v in gb.ravel()], dtype=object)
                                .reshape(gb.shape), dt)
                assert err.max() <= 2 * tol, f"{a_name} vs {b_name} axis={axis}"


def _frac(v):
    return Fraction(float(v)) if np.isfinite(v) else float(v)

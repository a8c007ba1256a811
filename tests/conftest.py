"""Shared fixtures: backends, ISA paths, dtypes, seeded RNG, optional deps.

Optional dependencies (torch, sklearn, dask, ml_dtypes, numba) are loaded
with :func:`require`: locally a missing one skips the test, but under CI
(``CI=true``, set by ``.ci/run``) or with ``CNORM_REQUIRE_ALL=1`` it fails, so
CI can never pass by skipping.
"""
import importlib
import os

import numpy as np
import pytest

from cnorm import _config

BACKENDS = ["cython", "numba", "numpy"]
DTYPES = [np.float16, np.float32, np.float64]


def require(module: str):
    """Import an optional dependency; skip without it, unless CNORM_REQUIRE_ALL=1."""
    if os.environ.get("CNORM_REQUIRE_ALL") == "1" or os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(params=BACKENDS + ["cython-stream"])
def backend(request):
    """A backend name; "cython-stream" is the cython backend with every output
    written by the streaming-store path (normally only outputs over half the LLC)."""
    if request.param == "numba":
        require("numba")
    if request.param == "cython-stream":
        if not _config.HAVE_EXTENSION:
            pytest.skip("no compiled kernels")
        previous = _config.set_stream_threshold(0)
        yield "cython"
        _config.set_stream_threshold(previous)
        return
    yield request.param


@pytest.fixture(params=_config.isa_runnable or ["none"])
def isa(request):
    """Run the test on one ISA path of the Cython kernels, then restore the default."""
    if request.param == "none":
        pytest.skip("no compiled kernels")
    previous = _config.isa_selected
    _config.use_isa(request.param)
    yield request.param
    _config.use_isa(previous)


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)

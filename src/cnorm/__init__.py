"""cnorm: accurate, fast CPU statistics for normalization.

Stable Welford/Chan mean and variance over any axes, the normalization layers
built on them (forward and backward), streaming statistics and data
normalization, with a NumPy API.  ``cnorm.show_config()`` prints the build.
"""
import os as _os
from importlib import import_module

__version__ = "0.1.0"

# cnorm's OpenMP workers spin only briefly once a parallel region ends, then
# sleep: on small machines shared with other thread pools (PyTorch, Numba, the
# caller's threads) workers spinning for milliseconds (libgomp's default, 300000
# spins) steal the cores and turn a 0.2 ms call into 8 ms, while workers that
# sleep at once (0 spins) must be woken for every call: ~50 us per call on a
# 2-vCPU VM, which made a (128, 1024) float32 moments call 3x slower with 2
# threads than with 1.  3000 spins (~60 us on an AMD EPYC Zen 4) keep them awake
# between back-to-back calls: that call 68 -> 13 us at 2 threads, a layer_norm
# / torch layer_norm alternation 178 -> 84 us.  Set OMP_WAIT_POLICY or
# GOMP_SPINCOUNT yourself before importing cnorm to override; each OpenMP
# runtime reads them when it loads.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _os.environ.setdefault("GOMP_SPINCOUNT", "3000")

from ._config import get_num_threads, set_num_threads, show_config
from .moments import mean, moments, std, var

# Public names defined in other modules, imported on first use.
_LAZY = {
    "layer_norm": "norms", "rms_norm": "norms", "batch_norm": "norms",
    "group_norm": "norms", "instance_norm": "norms",
    "layer_norm_backward": "backward", "rms_norm_backward": "backward",
    "batch_norm_backward": "backward", "group_norm_backward": "backward",
    "instance_norm_backward": "backward",
    "LayerNorm": "layers", "RMSNorm": "layers", "BatchNorm": "layers",
    "GroupNorm": "layers", "InstanceNorm": "layers",
    "RunningMoments": "running",
    "standardize": "preprocessing", "minmax_scale": "preprocessing",
    "StandardScaler": "preprocessing",
    "normalize_image": "image",
}

__all__ = ["__version__", "moments", "mean", "var", "std",
           "set_num_threads", "get_num_threads", "show_config", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cnorm' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

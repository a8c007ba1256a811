"""cnorm: accurate, fast CPU statistics for normalization.

Stable Welford/Chan mean and variance over any axes, the normalization layers
built on them (forward and backward), streaming statistics and data
normalization, with a NumPy API.  ``cnorm.show_config()`` prints the build.
"""
import os as _os
from importlib import import_module

__version__ = "0.1.0"

# cnorm's OpenMP workers sleep as soon as a parallel region ends instead of
# spinning: on small machines shared with other thread pools (PyTorch, Numba,
# the caller's threads) spinning workers steal the cores and turn a 0.2 ms call
# into 8 ms.  Set OMP_WAIT_POLICY yourself before importing cnorm to override;
# it is read by each OpenMP runtime when that runtime loads.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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

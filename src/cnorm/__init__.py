"""cnorm: accurate, fast CPU statistics for normalization.

Stable Welford/Chan mean and variance over any axes, and the normalization
layers built on them, with a NumPy API.  See ``cnorm.show_config()``.
"""
__version__ = "0.1.0"

from ._config import get_num_threads, set_num_threads, show_config
from .moments import mean, moments, std, var

__all__ = ["__version__", "moments", "mean", "var", "std",
           "set_num_threads", "get_num_threads", "show_config"]

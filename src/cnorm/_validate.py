"""Argument checks and the dtype policy shared by every public function.

Policy: float16, float32 and float64 arrays are used as they are (no copy) and
results keep their dtype; bool and integer inputs compute in float64 (NumPy's
rule); bfloat16 (``ml_dtypes``) computes from a float32 copy and returns
bfloat16; anything else (complex, object, strings, datetimes) is a TypeError.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

NATIVE = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


BFLOAT16 = _bfloat16()


def result_dtype(dt: np.dtype) -> np.dtype:
    """Dtype results take for inputs of dtype ``dt``."""
    if dt in NATIVE or (BFLOAT16 is not None and dt == BFLOAT16):
        return dt
    return np.dtype(np.float64)


def as_float_array(x, argname: str = "x", fn: str = "cnorm"):
    """Return ``(array the kernels read, result dtype)`` for any array-like ``x``."""
    a = np.asarray(x)
    dt = a.dtype
    if dt in NATIVE:
        return a, dt
    if BFLOAT16 is not None and dt == BFLOAT16:
        return a.astype(np.float32), dt
    if dt.kind in "biu":
        return a.astype(np.float64), np.dtype(np.float64)
    raise TypeError(f"{fn}: {argname} must be a real floating, integer or bool array, "
                    f"got dtype {dt}")


def check_dtype_arg(dtype, argname: str = "dtype", fn: str = "cnorm"):
    """Validate a ``dtype=`` argument: None or a real floating dtype."""
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{fn}: {argname}={dtype!r} is not a dtype") from None
    if dt in NATIVE or (BFLOAT16 is not None and dt == BFLOAT16):
        return dt
    raise TypeError(f"{fn}: {argname} must be float16, float32 or float64, got {dt}")


def check_real(value, argname: str, fn: str = "cnorm", *, allow_nan=False,
               minimum=None, maximum=None) -> float:
    """A real scalar (Python or NumPy number), optionally range-checked."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{fn}: {argname} must be a real number, got {value!r}")
    v = float(value)
    if math.isnan(v) and not allow_nan:
        raise ValueError(f"{fn}: {argname} must not be NaN, got {value!r}")
    if minimum is not None and not v >= minimum:
        raise ValueError(f"{fn}: {argname} must be >= {minimum}, got {value!r}")
    if maximum is not None and not v <= maximum:
        raise ValueError(f"{fn}: {argname} must be <= {maximum}, got {value!r}")
    return v


def check_out(out, shape, dtype, argname: str = "out", fn: str = "cnorm"):
    """``out`` must be a writeable ndarray of exactly this shape (and dtype, when given)."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{fn}: {argname} must be a numpy.ndarray, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{fn}: {argname} has shape {out.shape}, expected {tuple(shape)}")
    if dtype is not None and out.dtype != dtype:
        raise TypeError(f"{fn}: {argname} has dtype {out.dtype}, expected {np.dtype(dtype)}")
    if not out.flags.writeable:
        raise ValueError(f"{fn}: {argname} is read-only")
    return out


def check_bool(value, argname: str, fn: str = "cnorm") -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {argname} must be True or False, got {value!r}")
    return bool(value)


def check_num_groups(num_groups, C: int, c_ax: int, fn: str) -> int:
    """``num_groups`` as a positive int that divides the ``C`` channels (axis ``c_ax``)."""
    if isinstance(num_groups, (bool, np.bool_)) or not isinstance(num_groups, (int, np.integer)):
        raise TypeError(f"{fn}: num_groups must be a positive int, got {num_groups!r}")
    G = int(num_groups)
    if G <= 0:
        raise ValueError(f"{fn}: num_groups must be a positive int, got {num_groups!r}")
    if C % G:
        raise ValueError(f"{fn}: num_groups={G} does not divide the {C} channels on axis {c_ax}")
    return G

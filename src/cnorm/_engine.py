"""The moments engine: states of any reduction, on any backend.

A *state* is ``(n, mean_hi, mean_lo, M2_hi, M2_lo)`` in float64; states merge
with Chan's formula.  ``reduce_states`` fills one state per kept position;
everything else in cnorm (moments, the normalization layers, RunningMoments,
the scaler, dask) is built on it.
"""
from __future__ import annotations

import warnings

import numpy as np

from . import _config
from ._axes import plan_reduction

STATE_WIDTH = 5


def backend_module(backend: str):
    """The kernel module of a resolved backend name."""
    if backend == "cython":
        return _config.kernels
    if backend == "numba":
        from . import _numba
        return _numba
    from . import _reference
    return _reference


class _StridedView:
    """Exposes x's memory from a byte offset with given shape/strides (keeps x alive)."""

    def __init__(self, x, offset, shape, strides, typestr):
        self._keep = x
        ptr = x.__array_interface__["data"][0] + offset
        self.__array_interface__ = {"version": 3, "data": (ptr, True), "shape": tuple(shape),
                                    "strides": tuple(strides), "typestr": typestr}


def strided_view(x: np.ndarray, offset: int, shape, strides, as_bits: bool = False) -> np.ndarray:
    """Read-only view of ``x``'s memory starting ``offset`` bytes after its data pointer.

    ``as_bits`` views float16 as uint16 (how the Numba kernels read halves).
    """
    typestr = "<u2" if (as_bits and x.dtype == np.float16) else x.dtype.str
    return np.asarray(_StridedView(x, offset, shape, strides, typestr))


def empty_states(shape) -> np.ndarray:
    return np.zeros(tuple(shape) + (STATE_WIDTH,), dtype=np.float64)


def reduce_states(x: np.ndarray, red_axes, *, backend: str, nthreads: int,
                  states: np.ndarray | None = None) -> np.ndarray:
    """Merge the moments of ``x`` over ``red_axes`` into ``states`` and return them.

    Parameters
    ----------
    x : ndarray of float16, float32 or float64, any strides
    red_axes : tuple of int
        Sorted, non-negative axes to reduce.
    backend : {'cython', 'numba', 'numpy'}
    nthreads : int
    states : ndarray, optional
        C-contiguous float64 array of shape ``kept_shape + (5,)`` to merge into.
    """
    red = set(red_axes)
    kept = [a for a in range(x.ndim) if a not in red]
    kept_shape = tuple(x.shape[a] for a in kept)
    if states is None:
        states = empty_states(kept_shape)
    flat = states.reshape(-1, STATE_WIDTH)
    sstrides = [0] * x.ndim
    acc = 1
    for a in reversed(kept):
        sstrides[a] = acc
        acc *= x.shape[a]
    if backend == "numpy":
        from . import _reference
        if flat.shape[0] or x.ndim == 0:
            part = _reference.states_of(x, tuple(sorted(red))).reshape(-1, STATE_WIDTH)
            _reference.merge_states(flat, part)
        return states
    mod = backend_module(backend)
    plan = plan_reduction(x.shape, x.strides, red, sstrides)
    if plan.shape[0] * plan.shape[1] * plan.shape[2] * plan.shape[3] == 0 and not plan.outer:
        return states
    sizes = [d[0] for d in plan.outer]
    for idx in np.ndindex(*sizes):
        off = plan.offset + sum(i * d[1] for i, d in zip(idx, plan.outer))
        soff = sum(i * d[2] for i, d in zip(idx, plan.outer))
        if backend == "numba":
            view = strided_view(x, off, plan.shape, plan.strides, as_bits=True)
            mod.moments_4d(view, x.dtype == np.float16, plan.so, plan.sk, flat, soff, nthreads)
        else:
            mod.moments_4d(x, off, plan.shape, plan.strides, plan.so, plan.sk, flat, soff, nthreads)
    return states


def finalize(states: np.ndarray, ddof: float, backend: str = "cython"):
    """Float64 ``(mean, var)`` arrays (shape ``states.shape[:-1]``) of states.

    ``var = M2 / (n - ddof)``; empty slices and ``ddof >= n`` follow ``np.var``
    (NaN or inf, with a RuntimeWarning).
    """
    flat = np.ascontiguousarray(states.reshape(-1, STATE_WIDTH))
    mean = np.empty(flat.shape[0])
    var = np.empty(flat.shape[0])
    mod = _config.kernels if _config.HAVE_EXTENSION else backend_module(backend)
    mod.finalize(flat, float(ddof), mean, var)
    n = flat[:, 0]
    if n.size and (n == 0).any():
        warnings.warn("Mean of empty slice", RuntimeWarning, stacklevel=3)
    elif n.size and (n - ddof <= 0).any():
        warnings.warn("Degrees of freedom <= 0 for slice", RuntimeWarning, stacklevel=3)
    shape = states.shape[:-1]
    return mean.reshape(shape), var.reshape(shape)


def merge(a: np.ndarray, b: np.ndarray, backend: str = "cython") -> None:
    """Merge states ``b`` into ``a`` in place (same shapes)."""
    fa = a.reshape(-1, STATE_WIDTH)
    fb = np.ascontiguousarray(b.reshape(-1, STATE_WIDTH))
    mod = _config.kernels if _config.HAVE_EXTENSION else backend_module(backend)
    mod.merge_states(fa, fb)

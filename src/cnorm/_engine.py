"""The moments engine: states of any reduction, on any backend.

A *state* is ``(n, mean_hi, mean_lo, M2_hi, M2_lo)`` in float64; states merge
with Chan's formula.  ``reduce_states`` fills one state per kept position;
everything else in cnorm (moments, the normalization layers, RunningMoments,
the scaler, dask) is built on it.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np

from . import _config
from ._axes import (element_strides, follow_order, layout_order, plan_elementwise,
                    plan_reduction)

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

    def __init__(self, x, offset, shape, strides, typestr, readonly=True):
        self._keep = x
        ptr = x.__array_interface__["data"][0] + offset
        self.__array_interface__ = {"version": 3, "data": (ptr, readonly), "shape": tuple(shape),
                                    "strides": tuple(strides), "typestr": typestr}


def strided_view(x: np.ndarray, offset: int, shape, strides, as_bits: bool = False,
                 writeable: bool = False) -> np.ndarray:
    """View of ``x``'s memory starting ``offset`` bytes after its data pointer.

    ``as_bits`` views float16 as uint16 (how the Numba kernels read halves);
    ``writeable`` only for arrays the caller may write.
    """
    typestr = "<u2" if (as_bits and x.dtype == np.float16) else x.dtype.str
    return np.asarray(_StridedView(x, offset, shape, strides, typestr, readonly=not writeable))


def empty_states(shape) -> np.ndarray:
    return np.zeros(tuple(shape) + (STATE_WIDTH,), dtype=np.float64)


@functools.lru_cache(maxsize=1024)
def _kept_layout(shape, red_axes):
    """``(kept_shape, state_strides)`` of reducing ``shape`` over ``red_axes``:
    the kept axes in order, and each axis's index stride in the C-ordered
    states (0 for reduced axes).  Cached: a training loop asks for the same
    few layouts on every call."""
    kept = [a for a in range(len(shape)) if a not in red_axes]
    sstrides = [0] * len(shape)
    acc = 1
    for a in reversed(kept):
        sstrides[a] = acc
        acc *= shape[a]
    return tuple(shape[a] for a in kept), tuple(sstrides)


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
    kept_shape, sstrides = _kept_layout(x.shape, tuple(red_axes))
    if states is None:
        states = empty_states(kept_shape)
    flat = states.reshape(-1, STATE_WIDTH)
    if backend == "numpy":
        from . import _reference
        if flat.shape[0] or x.ndim == 0:
            part = _reference.states_of(x, tuple(sorted(red_axes))).reshape(-1, STATE_WIDTH)
            _reference.merge_states(flat, part)
        return states
    mod = backend_module(backend)
    plan = plan_reduction(x.shape, x.strides, red_axes, sstrides)
    if plan.shape[0] * plan.shape[1] * plan.shape[2] * plan.shape[3] == 0 and not plan.outer:
        return states
    if backend == "numba" and mod.reduce_planned(x, plan, flat, nthreads):
        return states
    for off, soff in plan.outer_offsets():
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
    flat = states.reshape(-1, STATE_WIDTH)
    if not flat.flags.c_contiguous:
        flat = np.ascontiguousarray(flat)
    mean = np.empty(flat.shape[0])
    var = np.empty(flat.shape[0])
    mod = _config.kernels if _config.HAVE_EXTENSION else backend_module(backend)
    mod.finalize(flat, float(ddof), mean, var)
    if flat.shape[0]:
        nmin = flat[:, 0].min()
        if nmin == 0:
            warnings.warn("Mean of empty slice", RuntimeWarning, stacklevel=3)
        elif nmin - ddof <= 0:
            warnings.warn("Degrees of freedom <= 0 for slice", RuntimeWarning, stacklevel=3)
    shape = states.shape[:-1]
    return mean.reshape(shape), var.reshape(shape)


def merge(a: np.ndarray, b: np.ndarray, backend: str = "cython") -> None:
    """Merge states ``b`` into ``a`` in place (same shapes)."""
    fa = a.reshape(-1, STATE_WIDTH)
    fb = np.ascontiguousarray(b.reshape(-1, STATE_WIDTH))
    mod = _config.kernels if _config.HAVE_EXTENSION else backend_module(backend)
    mod.merge_states(fa, fb)


# ------------------------------------------------------------------ normalization pass
ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


def activation_ref(v: np.ndarray, act: int) -> np.ndarray:
    """The fused activations in float64 NumPy (numpy backend and tests)."""
    if act == 1:
        return np.where(v < 0, 0.0, v)
    if act == 2:
        from math import erf
        return 0.5 * v * (1.0 + np.vectorize(erf, otypes=[float])(v * 0.7071067811865476))
    if act == 3:
        return 0.5 * v * (1.0 + np.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    if act == 4:
        with np.errstate(over="ignore"):
            return v / (1.0 + np.exp(-v))
    return v


def apply(x: np.ndarray, y: np.ndarray, mh, ml, rs, w, b, act: int, *, backend: str,
          nthreads: int) -> None:
    """``y = act((((x - mh) - ml) * rs) * w + b)`` elementwise, one pass.

    ``mh``, ``ml``, ``rs`` (statistics) and ``w``, ``b`` (parameters) are
    float64 arrays with ``x.ndim`` dims broadcastable to ``x.shape``.  ``y``
    has x's shape and dtype; it may be ``x`` itself.
    """
    if backend == "numpy":
        with np.errstate(invalid="ignore", over="ignore"):
            v = (((x.astype(np.float64) - mh) - ml) * rs) * w + b
            y[...] = activation_ref(v, act)
        return
    if x.size == 0:
        return
    if x.ndim == 0:
        one = (lambda a: np.asarray(a, dtype=np.float64).reshape(1))
        return apply(x.reshape(1), y.reshape(1), one(mh), one(ml), one(rs), one(w), one(b), act,
                     backend=backend, nthreads=nthreads)
    if y is not x and np.shares_memory(x, y) and (x.strides != y.strides or
                                                  x.__array_interface__["data"][0]
                                                  != y.__array_interface__["data"][0]):
        x = x.copy()
    order = layout_order(y.shape, y.strides)

    def full_rank(a):
        a = np.asarray(a, dtype=np.float64)
        return a.reshape((1,) * (x.ndim - a.ndim) + a.shape)

    stats = [follow_order(full_rank(a), order) for a in (mh, ml, rs)]
    params = [follow_order(full_rank(a), order) for a in (w, b)]
    ss = element_strides(stats[0])
    if any(element_strides(a) != ss for a in stats[1:]):
        sshape = np.broadcast_shapes(*(a.shape for a in stats))
        stats = [np.ascontiguousarray(np.broadcast_to(a, sshape)) for a in stats]
        stats = [follow_order(a, order) for a in stats]
        ss = element_strides(stats[0])
    pshape = np.broadcast_shapes(params[0].shape, params[1].shape)
    params = [follow_order(np.ascontiguousarray(np.broadcast_to(a, pshape)), order)
              for a in params]
    ps = element_strides(params[0])
    plan = plan_elementwise(x.shape, [x.strides, y.strides, ss, ps], order)
    flat_s = [a.reshape(-1) if a.flags.c_contiguous else a.ravel(order="K") for a in stats]
    flat_p = [a.reshape(-1) if a.flags.c_contiguous else a.ravel(order="K") for a in params]
    # the element offsets of index 0 inside the flattened stats/params
    s0 = _base_offset(stats[0], flat_s[0])
    p0 = _base_offset(params[0], flat_p[0])
    if backend == "cython":
        mod = _config.family("_apply")
    else:
        from . import _numba_apply as mod
    for offs in plan.outer_offsets():
        mod.apply_4d(x, offs[0], y, offs[1], flat_s[0], flat_s[1], flat_s[2], s0 + offs[2],
                     flat_p[0], flat_p[1], p0 + offs[3], plan.shape, plan.strides[0],
                     plan.strides[1], plan.strides[2], plan.strides[3], act, nthreads)


def _base_offset(view: np.ndarray, flat: np.ndarray) -> int:
    """Element offset of view[0, ..., 0] inside the 1-d array ``flat`` sharing its memory."""
    a = view.__array_interface__["data"][0]
    f = flat.__array_interface__["data"][0]
    if not np.shares_memory(view, flat):
        raise AssertionError("stat/param views must share memory with their flat arrays")
    return (a - f) // 8

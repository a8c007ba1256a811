"""The normalization pass (``_apply.pyx``) as a Numba kernel: backend="numba".

``y = act((((x - mean_hi) - mean_lo) * rstd) * weight + bias)`` over the
same canonical 4-d layout as the Cython pass (dims 0-2 outer, split across
threads; dim 3 the inner row), in float64 arithmetic rounded once to the
output dtype.  float16 travels as uint16 bits: decoded through an exact
65536-entry table, encoded with round-to-nearest-even.  The JIT options come
from the one policy in :mod:`cnorm._numba_policy` (no fast-math).
"""
from __future__ import annotations

import math

import numba
import numpy as np

from ._numba_policy import jit

_HALF_TABLE = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64)


@jit
def _f64_to_half_bits(v):
    """Round a float64 to binary16 (via float32, like the F16C path), as uint16 bits."""
    f = np.float32(v)
    x = np.uint32(np.array([f], dtype=np.float32).view(np.uint32)[0])
    sign = (x >> np.uint32(16)) & np.uint32(0x8000)
    ax = x & np.uint32(0x7FFFFFFF)
    if ax >= np.uint32(0x7F800000):
        if ax > np.uint32(0x7F800000):
            return np.uint16(sign | np.uint32(0x7E00))
        return np.uint16(sign | np.uint32(0x7C00))
    if ax >= np.uint32(0x477FF000):
        return np.uint16(sign | np.uint32(0x7C00))
    if ax < np.uint32(0x38800000):
        af = np.float32(np.array([ax], dtype=np.uint32).view(np.float32)[0]) + np.float32(0.5)
        r = np.uint32(np.array([af], dtype=np.float32).view(np.uint32)[0])
        return np.uint16(sign | (r - np.uint32(0x3F000000)))
    odd = (ax >> np.uint32(13)) & np.uint32(1)
    ax = ax + np.uint32(0xC8000FFF) + odd
    return np.uint16(sign | (ax >> np.uint32(13)))


@jit
def _activate(v, act):
    if act == 1:
        return 0.0 if v < 0.0 else v
    if act == 2:
        return 0.5 * v * (1.0 + math.erf(v * 0.7071067811865476))
    if act == 3:
        return 0.5 * v * (1.0 + math.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    if act == 4:
        return v / (1.0 + math.exp(-v))
    return v


@jit
def _scale(v, mh, ml, rs, w, b, act):
    return _activate((((v - mh) - ml) * rs) * w + b, act)


@jit(parallel=True)
def _apply4_float(x, y, mh, ml, rs, w, b, act):
    n0, n1, n2, n3 = x.shape
    for r in numba.prange(n0 * n1 * n2):
        i2 = r % n2
        i1 = (r // n2) % n1
        i0 = r // (n2 * n1)
        for i3 in range(n3):
            y[i0, i1, i2, i3] = _scale(np.float64(x[i0, i1, i2, i3]), mh[i0, i1, i2, i3],
                                       ml[i0, i1, i2, i3], rs[i0, i1, i2, i3],
                                       w[i0, i1, i2, i3], b[i0, i1, i2, i3], act)


@jit(parallel=True)
def _apply4_half(x, y, mh, ml, rs, w, b, act, table):
    n0, n1, n2, n3 = x.shape
    for r in numba.prange(n0 * n1 * n2):
        i2 = r % n2
        i1 = (r // n2) % n1
        i0 = r // (n2 * n1)
        for i3 in range(n3):
            v = _scale(table[x[i0, i1, i2, i3]], mh[i0, i1, i2, i3], ml[i0, i1, i2, i3],
                       rs[i0, i1, i2, i3], w[i0, i1, i2, i3], b[i0, i1, i2, i3], act)
            y[i0, i1, i2, i3] = _f64_to_half_bits(v)


def apply_4d(x, xoff, y, yoff, mh, ml, rs, soff, w, b, poff, shape, xstrides, ystrides,
             sstrides, pstrides, act, nthreads):
    """Same contract as ``cnorm._apply.apply_4d`` (see its docstring)."""
    from ._engine import strided_view
    if x.dtype != y.dtype:
        raise TypeError("apply_4d: x and y must have the same dtype")
    shape = tuple(shape)
    half = x.dtype == np.float16
    xv = strided_view(x, xoff, shape, xstrides, as_bits=True)
    yv = strided_view(y, yoff, shape, ystrides, as_bits=True, writeable=True)
    sb = [s * 8 for s in sstrides]
    pb = [p * 8 for p in pstrides]
    st = [strided_view(a, soff * 8, shape, sb) for a in (mh, ml, rs)]
    pr = [strided_view(a, poff * 8, shape, pb) for a in (w, b)]
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(nthreads, numba.config.NUMBA_NUM_THREADS)))
    try:
        if half:
            _apply4_half(xv, yv, st[0], st[1], st[2], pr[0], pr[1], act, _HALF_TABLE)
        else:
            _apply4_float(xv, yv, st[0], st[1], st[2], pr[0], pr[1], act)
    finally:
        numba.set_num_threads(previous)

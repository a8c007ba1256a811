"""The normalization pass (``_apply.pyx``) as a Numba kernel: backend="numba".

``y = act((((x - mean_hi) - mean_lo) * rstd) * weight + bias)`` over the
same canonical 4-d layout as the Cython pass (dims 0-2 outer, split across
threads; dim 3 the inner row), in float64 arithmetic rounded once to the
output dtype; float16 data in float32 arithmetic (:func:`_h32_value`, the
definition of ``_apply_h32.h``).  float16 travels as uint16 bits: decoded
through an exact 65536-entry table, encoded with round-to-nearest-even from
float32 (as the F16C instructions of the Cython path).  The JIT options come
from the one policy in :mod:`cnorm._numba_policy` (no fast-math).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ._numba import NATIVE_HALF
from ._numba_policy import OVERLOAD_OPTIONS, jit

_HALF_TABLE = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64)


@jit
def _f64_to_half_bits(v):
    """Round a float64 to binary16 (nearest, ties to even), as uint16 bits.

    Rounds once, from float64 (no float32 step): frexp gives v = m * 2**e with
    m in [0.5, 1); rint(m * 2048) is the 11-bit significand.
    """
    if v != v:
        return np.uint16(0x7E00)
    sign = 0x8000 if (v < 0.0 or (v == 0.0 and math.copysign(1.0, v) < 0.0)) else 0
    a = abs(v)
    if a == math.inf:
        return np.uint16(sign | 0x7C00)
    if a < 6.103515625e-05:  # below 2**-14: subnormal grid of 2**-24
        return np.uint16(sign | int(np.rint(a * 16777216.0)))
    m, e = math.frexp(a)
    r = int(np.rint(m * 2048.0))
    if r == 2048:
        r = 1024
        e += 1
    biased = e - 1 + 15
    if biased >= 31:
        return np.uint16(sign | 0x7C00)
    return np.uint16(sign | (biased << 10) | (r - 1024))


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


#: statistics and parameters up to this magnitude: float16 data in float32 arithmetic
H32_LIMIT = 2.0 ** 32


@jit(inline="always")
def _h32_value(v, mh, ml, rs, w, b):
    """One float16 element (``v``, its value as float64) as ``cn_h32_value`` of
    ``_apply_h32.h``: ``(((v - m0) - m1) * r0) * w32 + b32`` in float32 (the mean as
    a float32 pair) where ``|mh|``, ``|ml|``, ``rs``, ``|w|``, ``|b|`` <= 2**32, the
    float64 expression otherwise (NaN / inf included); returned as float64."""
    if (abs(mh) <= H32_LIMIT and abs(ml) <= H32_LIMIT and abs(rs) <= H32_LIMIT
            and abs(w) <= H32_LIMIT and abs(b) <= H32_LIMIT):
        m0 = np.float32(mh)
        m1 = np.float32((mh - np.float64(m0)) + ml)
        t = (((np.float32(v) - m0) - m1) * np.float32(rs)) * np.float32(w) + np.float32(b)
        return np.float64(t)
    return (((v - mh) - ml) * rs) * w + b


@jit(inline="always")
def _h32_stats_ok(mh, ml, rs):
    """Whether a slice's statistics are in the float32 range of :func:`_h32_value`."""
    return abs(mh) <= H32_LIMIT and abs(ml) <= H32_LIMIT and abs(rs) <= H32_LIMIT


@jit(inline="always")
def _h32_f32(x, m0, m1, r0, w32, b32):
    """The float32 steps of :func:`_h32_value` with the float32 constants hoisted."""
    return np.float64((((np.float32(x) - m0) - m1) * r0) * w32 + b32)


@jit
def _row_h32(xr, yr, mr, lr, rr, wr, br, act):
    """:func:`_row` for float16 data (``xr``: its values as float64): :func:`_h32_value`."""
    for i in range(np.uint64(xr.shape[0])):
        yr[i] = _activate(_h32_value(xr[i], mr[i], lr[i], rr[i], wr[i], br[i]), act)


@jit
def _scale(v, mh, ml, rs, w, b, act):
    return _activate((((v - mh) - ml) * rs) * w + b, act)


@jit
def _row(xr, yr, mr, lr, rr, wr, br, act):
    """One inner row; a statistic or parameter with stride 0 is read once.
    Unsigned indices: no wraparound test, so the no-activation loops vectorize."""
    n = np.uint64(xr.shape[0])
    if mr.strides[0] == 0 and wr.strides[0] == 0:
        m0, l0, r0, w0, b0 = mr[0], lr[0], rr[0], wr[0], br[0]
        if act == 0:
            for i in range(n):
                yr[i] = (((np.float64(xr[i]) - m0) - l0) * r0) * w0 + b0
        else:
            for i in range(n):
                yr[i] = _scale(np.float64(xr[i]), m0, l0, r0, w0, b0, act)
    elif mr.strides[0] == 0:
        m0, l0, r0 = mr[0], lr[0], rr[0]
        if act == 0:
            for i in range(n):
                yr[i] = (((np.float64(xr[i]) - m0) - l0) * r0) * wr[i] + br[i]
        else:
            for i in range(n):
                yr[i] = _scale(np.float64(xr[i]), m0, l0, r0, wr[i], br[i], act)
    else:
        if act == 0:
            for i in range(n):
                yr[i] = (((np.float64(xr[i]) - mr[i]) - lr[i]) * rr[i]) * wr[i] + br[i]
        else:
            for i in range(n):
                yr[i] = _scale(np.float64(xr[i]), mr[i], lr[i], rr[i], wr[i], br[i], act)


@jit(parallel=True)
def _apply4_float(x, y, mh, ml, rs, w, b, act):
    n0, n1, n2, n3 = x.shape
    for r in numba.prange(n0 * n1 * n2):
        i2 = r % n2
        i1 = (r // n2) % n1
        i0 = r // (n2 * n1)
        _row(x[i0, i1, i2], y[i0, i1, i2], mh[i0, i1, i2], ml[i0, i1, i2], rs[i0, i1, i2],
             w[i0, i1, i2], b[i0, i1, i2], act)


@jit
def _f32_bits_to_half(x, f):
    """binary32 bits ``x`` (value ``f``) to binary16 bits, nearest-even (integer ops)."""
    sign = (x >> np.uint32(16)) & np.uint32(0x8000)
    ax = x & np.uint32(0x7FFFFFFF)
    if ax >= np.uint32(0x7F800000):
        return np.uint16(sign | (np.uint32(0x7E00) if ax > np.uint32(0x7F800000) else np.uint32(0x7C00)))
    if ax >= np.uint32(0x477FF000):
        return np.uint16(sign | np.uint32(0x7C00))
    if ax < np.uint32(0x38800000):  # subnormal half: a multiple of 2**-24 (exact in float64)
        return np.uint16(sign | np.uint32(np.rint(abs(np.float64(f)) * 16777216.0)))
    odd = (ax >> np.uint32(13)) & np.uint32(1)
    ax = ax + np.uint32(0xC8000FFF) + odd
    return np.uint16(sign | (ax >> np.uint32(13)))


@intrinsic
def _llvm_f32_to_half_bits(typingctx, f):
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return sig, codegen


def _f32_to_half(x, f):
    """binary16 bits of the float32 ``f`` (bits ``x``), nearest-even."""
    return np.uint16(np.float32(f).astype(np.float16).view(np.uint16))


@overload(_f32_to_half, jit_options=OVERLOAD_OPTIONS)
def _f32_to_half_impl(x, f):
    # LLVM's ``fptrunc float to half`` (F16C's vcvtps2ph, vectorizable) where the CPU
    # has it, the integer route otherwise: the same bits, but for the payload of a NaN
    # (a quiet NaN either way; the hardware keeps the payload's top bits, as in Cython)
    if NATIVE_HALF:
        return lambda x, f: _llvm_f32_to_half_bits(np.float32(f))
    return lambda x, f: _f32_bits_to_half(x, f)


@jit
def _store_half(yr, fbuf):
    """yr[i] = float16 bits of the float32 values fbuf[i] (nearest-even, as F16C)."""
    ubuf = fbuf.view(np.uint32)
    for i in range(np.uint64(fbuf.shape[0])):
        yr[i] = _f32_to_half(ubuf[i], fbuf[i])


@jit(parallel=True)
def _apply4_half(x, y, mh, ml, rs, w, b, act, table):
    """float16 via the bits: decode by table, compute as _row_h32 (float32), round
    to float16 from float32 (a row buffer viewed as uint32) like the F16C path."""
    n0, n1, n2, n3 = x.shape
    for r in numba.prange(n0 * n1 * n2):
        i2 = r % n2
        i1 = (r // n2) % n1
        i0 = r // (n2 * n1)
        fbuf = np.empty(n3, np.float32)
        hx = np.empty(n3, np.float64)
        xr = x[i0, i1, i2]
        for i3 in range(n3):
            hx[i3] = table[xr[i3]]
        _row_h32(hx, fbuf, mh[i0, i1, i2], ml[i0, i1, i2], rs[i0, i1, i2], w[i0, i1, i2],
                 b[i0, i1, i2], act)
        _store_half(y[i0, i1, i2], fbuf)


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

"""The ``numba`` backend of the gradient kernels (``_backward.pyx`` as ``@njit`` code).

Same entry points and arguments as the Cython module, so
:mod:`cnorm.backward` drives both alike:

``rows_backward``
    LayerNorm / RMSNorm rows: each row is loaded once into float64 buffers,
    reduced (``Σ w*gv``, ``Σ w*gv*xhat``) and differentiated; parameter sums go
    to one partial row of ``pacc`` per task (a fixed split of the rows).
``cells_reduce``
    Per-cell ``Σ((x - mh) - ml)``, ``Σ gv``, ``Σ gv*xhat`` over a canonical
    ``(O, R1, K, R0)`` view, per fixed chunk of ``R1``.
``dx_4d``
    ``dx = ((w*gv - a) - xhat*bb) * rstd`` over a canonical 4-d view.

The work partition depends on the shape only and every sum is a sequential
float64 sum inside one task, so results do not depend on the thread count.
float16 travels as its ``uint16`` bits (Numba has no CPU float16): it is
decoded exactly, and encoded through float32 with round-to-nearest-even
(what the F16C instructions of the Cython kernels do).  Every kernel is
compiled with the one policy of :mod:`cnorm._numba_policy`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from ._numba_policy import jit

__all__ = ["rows_backward", "cells_reduce", "dx_4d", "half_bits_to_f64", "f64_to_half_bits"]

SERIAL_WORK = 32768   # below this many elements, never start threads


# ---------------------------------------------------------------- float16 bits
@jit
def half_bits_to_f64(h):
    """IEEE binary16 bits -> float64 (exact)."""
    h = int(h)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = m * 5.9604644775390625e-08          # 2**-24
    elif e == 31:
        v = np.inf if m == 0 else np.nan
    else:
        v = (1024 + m) * 2.0 ** (e - 25)
    return -v if h & 0x8000 else v


@jit
def f64_to_half_bits(d):
    """float64 -> binary16 bits, through float32, round to nearest even."""
    a = float(np.float32(d))
    if a != a:
        return np.uint16(0x7E00)
    sign = 0x8000 if (a < 0.0 or (a == 0.0 and math.copysign(1.0, a) < 0.0)) else 0
    a = abs(a)
    if a >= 65520.0:
        return np.uint16(sign | 0x7C00)
    if a < 6.103515625e-05:                      # 2**-14: subnormal (quantum 2**-24)
        return np.uint16(sign | int(np.rint(a * 16777216.0)))
    mant, e = math.frexp(a)                      # a = mant * 2**e, 0.5 <= mant < 1
    E = e - 1
    q = int(np.rint(a * 2.0 ** (10 - E)))        # 1024 .. 2048
    if q == 2048:
        q = 1024
        E += 1
    if E > 15:
        return np.uint16(sign | 0x7C00)
    return np.uint16(sign | ((E + 15) << 10) | (q - 1024))


def _ld(v):
    """A stored element as float64 (float16 arrives as uint16 bits)."""
    return float(v)


@overload(_ld)
def _ld_impl(v):
    if isinstance(v, types.Integer):
        return lambda v: half_bits_to_f64(v)
    return lambda v: float(v)


def _cast(d, arr):
    """float64 -> the element type of ``arr`` (uint16 bits for float16)."""
    return arr.dtype.type(d)


@overload(_cast)
def _cast_impl(d, arr):
    dt = arr.dtype
    if isinstance(dt, types.Integer):
        return lambda d, arr: f64_to_half_bits(d)
    if dt == types.float32:
        return lambda d, arr: np.float32(d)
    return lambda d, arr: d


@jit
def dact(v, act):
    """d act(v)/dv (activation codes of _engine.ACTIVATIONS)."""
    if act == 1:
        return 0.0 if v <= 0.0 else 1.0
    if act == 2:
        return 0.5 * (1.0 + math.erf(v * 0.7071067811865476)) + v * 0.3989422804014327 * math.exp(-0.5 * v * v)
    if act == 3:
        u = v * v
        t = math.tanh(0.7978845608028654 * (v + 0.044715 * u * v))
        return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 0.134145 * u))
    if act == 4:
        s = 1.0 / (1.0 + math.exp(-v))
        return s * (1.0 + v * (1.0 - s))
    return 1.0


# ---------------------------------------------------------------- kernels
# Every array argument is 1-d and C-contiguous (x, dy, dx as flat spans of their
# memory, indexed with element offsets and strides), so each kernel compiles
# once per dtype whatever the layout of the caller's arrays.
@jit(parallel=True)
def _rows_kernel(x, dy, dx, sh, xs, ds, os, mean, rstd, soff, ss0, ss1, w, b, ps, want, pacc,
                 ntasks, mode, refine, act):
    B0, B1, K0, K1 = sh[0], sh[1], sh[2], sh[3]
    R = B0 * B1
    K = K0 * K1
    P = w.shape[0]
    for t in prange(ntasks):
        xb = np.empty(K)
        gb = np.empty(K)
        for q in range(t * R // ntasks, (t + 1) * R // ntasks):
            i0 = q // B1
            i1 = q % B1
            m = mean[soff + i0 * ss0 + i1 * ss1]
            r = rstd[soff + i0 * ss0 + i1 * ss1]
            xo = xs[4] + i0 * xs[0] + i1 * xs[1]
            do = ds[4] + i0 * ds[0] + i1 * ds[1]
            po = ps[4] + i0 * ps[0] + i1 * ps[1]
            j = 0
            for k0 in range(K0):
                for k1 in range(K1):
                    xb[j] = _ld(x[xo + k0 * xs[2] + k1 * xs[3]])
                    gb[j] = _ld(dy[do + k0 * ds[2] + k1 * ds[3]])
                    j += 1
            ml = 0.0
            if refine:
                s = 0.0
                for j in range(K):
                    s += xb[j] - m
                ml = s / K
            s1 = 0.0
            s2 = 0.0
            j = 0
            for k0 in range(K0):
                for k1 in range(K1):
                    p = po + k0 * ps[2] + k1 * ps[3]
                    xh = ((xb[j] - m) - ml) * r
                    xb[j] = xh
                    g = gb[j]
                    if act != 0:
                        g = g * dact(xh * w[p] + b[p], act)
                        gb[j] = g
                    tw = w[p] * g
                    s1 += tw
                    s2 += tw * xh
                    if want:
                        pacc[t, 0, p] += g * xh
                        pacc[t, 1, p] += g
                    j += 1
            a = s1 / K if mode == 2 else 0.0
            bb = s2 / K if mode != 0 else 0.0
            oo = os[4] + i0 * os[0] + i1 * os[1]
            j = 0
            for k0 in range(K0):
                for k1 in range(K1):
                    p = po + k0 * ps[2] + k1 * ps[3]
                    dx[oo + k0 * os[2] + k1 * os[3]] = _cast(((w[p] * gb[j] - a) - xb[j] * bb) * r, dx)
                    j += 1
    return 0


@jit(parallel=True)
def _cells_kernel(x, dy, sh, xs, ds, so, sk, coff, mh, ml, rs, w, b, out, nchunks, act, want_dy):
    """Per-cell sums; inner-reduce form (R0 > 1): one task per (o, k, chunk); column form
    (R0 == 1): one task per (o, chunk), vectorized over k."""
    O, R1, K, R0 = sh[0], sh[1], sh[2], sh[3]
    ncells = out.shape[0] // (3 * nchunks)
    cols = R0 == 1
    ntasks = O * nchunks if cols else O * K * nchunks
    for t in prange(ntasks):
        if cols:
            o = t // nchunks
            c = t % nchunks
            k0, k1 = 0, K
        else:
            o = t // (K * nchunks)
            rest = t % (K * nchunks)
            k0 = rest // nchunks
            k1 = k0 + 1
            c = rest % nchunks
        acc = np.zeros((k1 - k0, 3))
        for q in range(c * R1 // nchunks, (c + 1) * R1 // nchunks):
            for k in range(k0, k1):
                ci = coff + o * so + k * sk
                m0, m1, r = mh[ci], ml[ci], rs[ci]
                xo = xs[4] + o * xs[0] + q * xs[1] + k * xs[2]
                do = ds[4] + o * ds[0] + q * ds[1] + k * ds[2]
                s0 = 0.0
                s1 = 0.0
                s2 = 0.0
                for i in range(R0):
                    cc = (_ld(x[xo + i * xs[3]]) - m0) - m1
                    s0 += cc
                    if want_dy:
                        xh = cc * r
                        g = _ld(dy[do + i * ds[3]])
                        if act != 0:
                            g = g * dact(xh * w[ci] + b[ci], act)
                        s1 += g
                        s2 += g * xh
                acc[k - k0, 0] += s0
                acc[k - k0, 1] += s1
                acc[k - k0, 2] += s2
        for k in range(k0, k1):
            ci = coff + o * so + k * sk
            base = (c * ncells + ci) * 3
            out[base] += acc[k - k0, 0]
            out[base + 1] += acc[k - k0, 1]
            out[base + 2] += acc[k - k0, 2]
    return 0


@jit(parallel=True)
def _dx_kernel(x, dy, dx, sh, xs, ds, os, mh, ml, rs, a, bb, ss, w, b, ps, act):
    n0, n1, n2, n3 = sh[0], sh[1], sh[2], sh[3]
    for rr in prange(n0 * n1 * n2):
        i2 = rr % n2
        i1 = (rr // n2) % n1
        i0 = rr // (n2 * n1)
        so = ss[4] + i0 * ss[0] + i1 * ss[1] + i2 * ss[2]
        po = ps[4] + i0 * ps[0] + i1 * ps[1] + i2 * ps[2]
        xo = xs[4] + i0 * xs[0] + i1 * xs[1] + i2 * xs[2]
        do = ds[4] + i0 * ds[0] + i1 * ds[1] + i2 * ds[2]
        oo = os[4] + i0 * os[0] + i1 * os[1] + i2 * os[2]
        for i in range(n3):
            s = so + i * ss[3]
            p = po + i * ps[3]
            xh = ((_ld(x[xo + i * xs[3]]) - mh[s]) - ml[s]) * rs[s]
            g = _ld(dy[do + i * ds[3]])
            if act != 0:
                g = g * dact(xh * w[p] + b[p], act)
            dx[oo + i * os[3]] = _cast(((w[p] * g - a[s]) - xh * bb[s]) * rs[s], dx)
    return 0


# ---------------------------------------------------------------- views and threads
class _Span:
    """A 1-d view of ``n`` elements of ``base``'s memory from a byte offset."""

    def __init__(self, base, offset, n, writable):
        self._keep = base
        typestr = "<u2" if base.dtype == np.float16 else base.dtype.str
        ptr = base.__array_interface__["data"][0] + offset
        self.__array_interface__ = {"version": 3, "data": (ptr, not writable), "shape": (int(n),),
                                    "strides": None, "typestr": typestr}


def _flat(a, offset, shape, strides, writable=False):
    """(1-d span of a's memory covering the strided view, element strides + start offset).

    Returns the span and an int64 array ``[s0, s1, s2, s3, start]`` in elements.
    """
    isz = a.itemsize
    if any(s % isz for s in strides) or offset % isz:
        raise ValueError("numba backend: strides must be multiples of the item size")
    lo = offset + sum((n - 1) * s for n, s in zip(shape, strides) if s < 0 and n > 0)
    hi = offset + sum((n - 1) * s for n, s in zip(shape, strides) if s > 0 and n > 0)
    span = np.asarray(_Span(a, lo, (hi - lo) // isz + 1, writable))
    st = np.array([s // isz for s in strides] + [(offset - lo) // isz], dtype=np.int64)
    return span, st


def _f64(a):
    """A writeable C-contiguous float64 1-d array (one Numba type for every argument)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    return a if (a.flags.c_contiguous and a.flags.writeable) else a.copy()


@contextmanager
def _threads(n, work):
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)) if work >= SERIAL_WORK else 1
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


# ---------------------------------------------------------------- entry points (Cython's signatures)
def rows_backward(x, xoff, dy, dyoff, dx, dxoff, shape, xstrides, dystrides, dxstrides, mean, rstd,
                  soff, sstrides, w, b, poff, pstrides, pacc, mode, refine, act, nthreads):
    """See ``cnorm._backward.rows_backward`` (``pacc`` is updated in place)."""
    if x.dtype != dy.dtype or x.dtype != dx.dtype:
        raise TypeError("rows_backward: x, dy and dx must have the same dtype")
    if pstrides[3] not in (0, 1):
        raise ValueError("rows_backward: the inner parameter stride must be 0 or 1")
    if pstrides[3] == 1 and pacc is None:
        raise ValueError("rows_backward: per-element parameters need pacc")
    K = shape[2] * shape[3]
    R = shape[0] * shape[1]
    if R * K == 0:
        return 0
    w, b = _f64(w), _f64(b)
    P = w.shape[0]
    ntasks = min(pacc.shape[0], R) if pacc is not None else max(1, min(R, 64))
    if pacc is not None and (pacc.ndim != 3 or pacc.shape[1] != 2 or pacc.shape[2] < P
                             or not pacc.flags.c_contiguous):
        raise ValueError("rows_backward: pacc must be C-contiguous of shape (tasks, 2, >= len(w))")
    acc = np.zeros((1, 2, 0)) if pacc is None else pacc
    xf, xs = _flat(x, xoff, shape, xstrides)
    df, ds = _flat(dy, dyoff, shape, dystrides)
    of, os = _flat(dx, dxoff, shape, dxstrides, writable=True)
    sh = np.array(shape, dtype=np.int64)
    ps = np.array(list(pstrides) + [poff], dtype=np.int64)
    with _threads(nthreads, R * K):
        _rows_kernel(xf, df, of, sh, xs, ds, os, _f64(mean), _f64(rstd), int(soff),
                     int(sstrides[0]), int(sstrides[1]), w, b, ps, pacc is not None, acc,
                     int(ntasks), int(mode), bool(refine), int(act))
    return 0


def cells_reduce(x, xoff, dy, dyoff, shape, xstrides, dystrides, so, sk, coff, mh, ml, rstd, w, b,
                 out, act, want_dy, nthreads):
    """See ``cnorm._backward.cells_reduce`` (``out`` is updated in place)."""
    if x.dtype != dy.dtype:
        raise TypeError("cells_reduce: x and dy must have the same dtype")
    if int(np.prod(shape)) == 0 or out.shape[0] == 0:
        return
    xf, xs = _flat(x, xoff, shape, xstrides)
    df, ds = _flat(dy, dyoff, shape, dystrides)
    flat = out.reshape(-1)
    if not np.shares_memory(flat, out):
        raise ValueError("cells_reduce: out must be C-contiguous")
    sh = np.array(shape, dtype=np.int64)
    with _threads(nthreads, int(np.prod(shape))):
        _cells_kernel(xf, df, sh, xs, ds, int(so), int(sk), int(coff), _f64(mh), _f64(ml),
                      _f64(rstd), _f64(w), _f64(b), flat, int(out.shape[0]), int(act),
                      bool(want_dy))


def dx_4d(x, xoff, dy, dyoff, dx, dxoff, mh, ml, rstd, a, bb, soff, w, b, poff, shape, xstrides,
          dystrides, dxstrides, sstrides, pstrides, act, nthreads):
    """See ``cnorm._backward.dx_4d``."""
    if x.dtype != dy.dtype or x.dtype != dx.dtype:
        raise TypeError("dx_4d: x, dy and dx must have the same dtype")
    if int(np.prod(shape)) == 0:
        return
    xf, xs = _flat(x, xoff, shape, xstrides)
    df, ds = _flat(dy, dyoff, shape, dystrides)
    of, os = _flat(dx, dxoff, shape, dxstrides, writable=True)
    ss = np.array(list(sstrides) + [soff], dtype=np.int64)
    ps = np.array(list(pstrides) + [poff], dtype=np.int64)
    sh = np.array(shape, dtype=np.int64)
    with _threads(nthreads, int(np.prod(shape))):
        _dx_kernel(xf, df, of, sh, xs, ds, os, _f64(mh), _f64(ml), _f64(rstd), _f64(a), _f64(bb),
                   ss, _f64(w), _f64(b), ps, int(act))

"""The rows kernels of ``_kernels`` (``norm_rows``, ``scale_rows``) as Numba code: backend="numba".

Layer/RMS/group/instance norm over rows that are contiguous in memory: the
statistics of a row (the moments blocks and Chan merges of
:mod:`cnorm._numba`, the same algorithm as the Cython kernels) and then,
while the row is still in cache, the output pass.  One read of x and one
write of y instead of a statistics pass plus an apply pass.  Same contract
and same arithmetic as the Cython ``norm_rows`` (see its docstring):

``y = act((((x - mean_hi) - mean_lo) * rstd) * w + b)``, ``rstd = 1/sqrt(var + eps)``,
rounded once to the output dtype; float16 data in float32 arithmetic
(``_h32_value``, the definition of ``_apply_h32.h``), rounded like F16C.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from ._numba import (PF_AHEAD, SERIAL_WORK, _blocks_in_slice, _dd_div_d, _is_half, _ld,
                     _max_threads, _numba_threads, _slice_chunk)
from ._numba_apply import H32_LIMIT, _activate, _h32_f32, _h32_stats_ok, _h32_value, _store_half
from ._numba_policy import jit, read_only


@jit(inline="always")
def _row_stats(xr, L, eps, mode, pf):
    """(mean_hi, mean_lo, stored mean, variance or mean square, rstd) of one row
    (pf: prefetch distance in elements, rows back to back; or 0)."""
    zero = np.int64(0)
    one = np.int64(1)
    st = _slice_chunk(xr, zero, one, L, zero, one, zero, _blocks_in_slice(one, L), pf)
    n, mh, ml, qh, ql = st
    if mode == 0:
        if qh != qh:
            var = np.nan
        else:
            var = _dd_div_d(qh, ql, n)[0]
            var = var if var > 0.0 else 0.0
        mean = mh + ml if math.isfinite(mh) else mh
        if not math.isfinite(mh):
            var = np.nan
    else:
        var = _dd_div_d(qh, ql, n)[0] + (mh * mh + 2.0 * mh * ml)
        if qh != qh or not math.isfinite(mh):
            var = np.nan
        mh = 0.0
        ml = 0.0
        mean = 0.0
    return mh, ml, mean, var, 1.0 / math.sqrt(var + eps)


@jit(inline="always")
def _h32_span(out, xr, u0, n, mh, ml, rs, w, b, w32, b32, wi, act):
    """The float16 case of :func:`_scale_span` in float32 (``_h32_value`` with its
    float32 constants hoisted, no test per element) where the statistics and the
    parameters of the span are all in range; False (nothing written) otherwise."""
    if not _h32_stats_ok(mh, ml, rs):
        return False
    m0 = np.float32(mh)
    m1 = np.float32((mh - np.float64(m0)) + ml)
    r0 = np.float32(rs)
    if wi < 0:
        w0 = w[-wi - 1]
        b0 = b[-wi - 1]
        if not (abs(w0) <= H32_LIMIT and abs(b0) <= H32_LIMIT):
            return False
        w0 = np.float32(w0)
        b0 = np.float32(b0)
        if act == 0:
            for k in range(n):
                i = u0 + k
                out[i] = (((np.float32(_ld(xr, i)) - m0) - m1) * r0) * w0 + b0
        else:
            for k in range(n):
                i = u0 + k
                out[i] = _activate(_h32_f32(_ld(xr, i), m0, m1, r0, w0, b0), act)
        return True
    if w32.shape[0] == 0:   # a parameter out of range: element by element
        return False
    uw = np.uint64(wi)
    if act == 0:
        for k in range(n):
            i = u0 + k
            out[i] = (((np.float32(_ld(xr, i)) - m0) - m1) * r0) * w32[uw + k] + b32[uw + k]
    else:
        for k in range(n):
            i = u0 + k
            out[i] = _activate(_h32_f32(_ld(xr, i), m0, m1, r0, w32[uw + k], b32[uw + k]), act)
    return True


@jit(inline="always")
def _scale_span(xr, out, i0, i1, mh, ml, rs, w, b, w32, b32, wi, act):
    """out[i] = act((((x[i] - mh) - ml) * rs) * w[.] + b[.]) for i in [i0, i1): the
    parameters per element from index wi + i - i0 (``wi >= 0``) or w[-wi-1] for all.
    Unsigned indices: no wraparound test in the loop, which then vectorizes."""
    u0 = np.uint64(i0)
    n = np.uint64(i1 - i0)
    if _is_half(xr) and _h32_span(out, xr, u0, n, mh, ml, rs, w, b, w32, b32, wi, act):
        return
    if _is_half(xr):   # float16 out of the float32 range: element by element
        for k in range(n):
            i = u0 + k
            j = np.uint64(-wi - 1) if wi < 0 else np.uint64(wi) + k
            out[i] = _activate(_h32_value(_ld(xr, i), mh, ml, rs, w[j], b[j]), act)
        return
    if wi < 0:
        w0 = w[-wi - 1]
        b0 = b[-wi - 1]
        if act == 0:
            for k in range(n):
                i = u0 + k
                out[i] = (((_ld(xr, i) - mh) - ml) * rs) * w0 + b0
        else:
            for k in range(n):
                i = u0 + k
                out[i] = _activate((((_ld(xr, i) - mh) - ml) * rs) * w0 + b0, act)
    else:
        uw = np.uint64(wi)
        if act == 0:
            for k in range(n):
                i = u0 + k
                out[i] = (((_ld(xr, i) - mh) - ml) * rs) * w[uw + k] + b[uw + k]
        else:
            for k in range(n):
                i = u0 + k
                out[i] = _activate((((_ld(xr, i) - mh) - ml) * rs) * w[uw + k] + b[uw + k],
                                   act)


@jit(inline="always")
def _row(xr, out, r, eps, mode, w, b, w32, b32, psub, pmod, pmul, act, mean, var, pf):
    """Row r: statistics into mean[r], var[r], normalized values (float64
    arithmetic) into out."""
    L = xr.shape[0]
    mh, ml, mean[r], var[r], rs = _row_stats(xr, L, eps, mode, pf)
    pbase = (r % pmod) * pmul
    if psub == 1:
        _scale_span(xr, out, 0, L, mh, ml, rs, w, b, w32, b32, pbase, act)
    else:
        for j in range(L // psub):
            _scale_span(xr, out, j * psub, (j + 1) * psub, mh, ml, rs, w, b, w32, b32,
                        -(pbase + j) - 1, act)


@jit(inline="always")
def _row_any(xr, yr, fbuf, r, eps, mode, w, b, w32, b32, psub, pmod, pmul, act, mean, var, half,
             pf):
    """_row into y; float16 (bits) through a float32 row, rounded like F16C."""
    if half:
        _row(xr, fbuf, r, eps, mode, w, b, w32, b32, psub, pmod, pmul, act, mean, var, pf)
        _store_half(yr, fbuf)
    else:
        _row(xr, yr, r, eps, mode, w, b, w32, b32, psub, pmod, pmul, act, mean, var, pf)


@jit
def _rows_pf(x):
    """Prefetch distance (elements) for rows back to back in memory, else 0."""
    if x.strides[0] == x.shape[1] * x.itemsize:
        return np.int64(PF_AHEAD // x.itemsize)
    return np.int64(0)


@jit
def _rows_serial(x, y, eps, mode, w, b, w32, b32, psub, pmod, pmul, act, mean, var, half):
    fbuf = np.empty(x.shape[1], np.float32)
    pf = _rows_pf(x)
    for r in range(x.shape[0]):
        _row_any(x[r], y[r], fbuf, r, eps, mode, w, b, w32, b32, psub, pmod, pmul, act, mean,
                 var, half, pf)


@jit(parallel=True)
def _rows_parallel(x, y, eps, mode, w, b, w32, b32, psub, pmod, pmul, act, mean, var, half,
                   nblocks):
    R = x.shape[0]
    pf = _rows_pf(x)
    for k in numba.prange(nblocks):
        fbuf = np.empty(x.shape[1], np.float32)
        for r in range(k * R // nblocks, (k + 1) * R // nblocks):
            _row_any(x[r], y[r], fbuf, r, eps, mode, w, b, w32, b32, psub, pmod, pmul, act,
                     mean, var, half, pf)


def _rows_view(a, R, L, rs, writeable):
    """a as an (R, L) array of rows at byte stride rs (a reshape when a is C-contiguous)."""
    if a.flags.c_contiguous and rs == L * a.itemsize and a.size == R * L:
        return a.reshape(R, L)
    return np.lib.stride_tricks.as_strided(a, shape=(R, L), strides=(rs, a.itemsize),
                                           writeable=writeable)


def _row_views(x, y, R, L, xrs, yrs):
    """(x rows, y rows, half) for the kernels: float16 travels as its bits (uint16),
    as in the other Numba kernels."""
    xv, yv = _rows_view(x, R, L, xrs, False), _rows_view(y, R, L, yrs, True)
    half = x.dtype == np.float16
    if half:
        xv, yv = xv.view(np.uint16), yv.view(np.uint16)
    return xv, yv, half


def _launch(serial, parallel, args, tasks, work, nthreads, min_work=SERIAL_WORK, blocks=False):
    """``serial(*args)`` below ``min_work`` elements of work or for one task, else
    ``parallel(*args)`` on min(nthreads, NUMBA_NUM_THREADS) threads.  With
    ``blocks``, the parallel kernel also gets a block count, 8 per thread, to split
    its independent tasks (rows) into: the split does not change results, and a
    block allocates its float16 row buffer once."""
    nt = max(1, min(int(nthreads), _max_threads())) if work >= min_work and tasks > 1 else 1
    if nt == 1:
        serial(*args)
    else:
        with _numba_threads(nt):
            if blocks:
                parallel(*args, min(tasks, 8 * nt))
            else:
                parallel(*args)


def _f64(a):
    """A read-only C-contiguous float64 array (an input: one Numba type)."""
    return read_only(np.ascontiguousarray(a, dtype=np.float64))


def _params(w, b, half):
    """(w, b, w32, b32) for the kernels: the parameters as float64, and for float16
    data their float32 copies, made once per call as ``cn_h32_prepare`` does, where
    every one is within the range of ``_h32_value`` (empty otherwise: the kernels
    then decide element by element)."""
    w, b = _f64(w), _f64(b)
    empty = np.empty(0, np.float32)
    if not half:
        return w, b, empty, empty
    with np.errstate(invalid="ignore"):
        in_range = bool(np.all(np.abs(w) <= H32_LIMIT) and np.all(np.abs(b) <= H32_LIMIT))
    if not in_range:
        return w, b, empty, empty
    return w, b, read_only(w.astype(np.float32)), read_only(b.astype(np.float32))


def norm_rows(x, y, R, L, xrs, yrs, eps, mode, w, b, psub, pmod, pmul, act, mean, var, nthreads):
    """Same contract as ``cnorm._kernels.norm_rows`` (R rows of L contiguous
    elements at byte row strides xrs / yrs; y may be x)."""
    if x.dtype != y.dtype:
        raise TypeError("norm_rows: x and y must have the same dtype")
    if R == 0 or L == 0:
        return
    xv, yv, half = _row_views(x, y, R, L, xrs, yrs)
    _launch(_rows_serial, _rows_parallel,
            (xv, yv, float(eps), int(mode), *_params(w, b, half), int(psub), int(pmod), int(pmul),
             int(act), mean, var, half), R, R * L, nthreads, blocks=True)


# ------------------------------------------------------------------ scale_rows (batch norm's output pass)
@jit(inline="always")
def _scale_row(xr, out, r, mh, ml, rs, smod, w, b, w32, b32, psub, pmod, pmul, act):
    """NCHW: row r uses statistic r % smod; parameters as in _row."""
    L = xr.shape[0]
    si = r % smod
    pbase = (r % pmod) * pmul
    if psub == 1:
        _scale_span(xr, out, 0, L, mh[si], ml[si], rs[si], w, b, w32, b32, pbase, act)
    else:
        for j in range(L // psub):
            _scale_span(xr, out, j * psub, (j + 1) * psub, mh[si], ml[si], rs[si], w, b, w32, b32,
                        -(pbase + j) - 1, act)


@jit(inline="always")
def _h32_percol_consts(c, mh, ml, rs, w, b):
    """The float32 constants of _h32_value per element (rows m0, m1, r0, w, b of c),
    made once per block as cn_h32_prepare does; whether every element is in range."""
    bad = 0
    for i in range(np.uint64(c.shape[1])):
        ok = (abs(mh[i]) <= H32_LIMIT and abs(ml[i]) <= H32_LIMIT and abs(rs[i]) <= H32_LIMIT
              and abs(w[i]) <= H32_LIMIT and abs(b[i]) <= H32_LIMIT)
        bad += 0 if ok else 1
        m0 = np.float32(mh[i])
        c[0, i] = m0
        c[1, i] = np.float32((mh[i] - np.float64(m0)) + ml[i])
        c[2, i] = np.float32(rs[i])
        c[3, i] = np.float32(w[i])
        c[4, i] = np.float32(b[i])
    return bad == 0


@jit(inline="always")
def _h32_percol_span(xr, out, c, act):
    """_percol_span for float16 rows whose every constant is in range (c from
    _h32_percol_consts): float32 arithmetic, no test per element."""
    L = np.uint64(xr.shape[0])
    m0, m1, r0, w32, b32 = c[0], c[1], c[2], c[3], c[4]
    if act == 0:
        for i in range(L):
            out[i] = (((np.float32(_ld(xr, i)) - m0[i]) - m1[i]) * r0[i]) * w32[i] + b32[i]
    else:
        for i in range(L):
            out[i] = _activate(_h32_f32(_ld(xr, i), m0[i], m1[i], r0[i], w32[i], b32[i]), act)


@jit(inline="always")
def _percol_span(xr, out, mh, ml, rs, w, b, act):
    """out[i] = act((((x[i] - mh[i]) - ml[i]) * rs[i]) * w[i] + b[i]) (inlined into the
    block loop: as a call, its eight array arguments cost more than a short row)."""
    L = np.uint64(xr.shape[0])
    if _is_half(xr):   # float16: float32 arithmetic
        for i in range(L):
            out[i] = _activate(_h32_value(_ld(xr, i), mh[i], ml[i], rs[i], w[i], b[i]), act)
    elif act == 0:
        for i in range(L):
            out[i] = (((_ld(xr, i) - mh[i]) - ml[i]) * rs[i]) * w[i] + b[i]
    else:
        for i in range(L):
            out[i] = _activate((((_ld(xr, i) - mh[i]) - ml[i]) * rs[i]) * w[i] + b[i], act)


@jit
def _percol_block(x, y, fbuf, r0, r1, mh, ml, rs, w, b, act, half):
    """Channels last, rows [r0, r1): statistics and parameters per element, in one
    loop nest (no call per row).  float16 rows go through fbuf as in _scale_row_any."""
    if half:
        c = np.empty((5, x.shape[1]), np.float32)
        in_range = _h32_percol_consts(c, mh, ml, rs, w, b)
        for r in range(r0, r1):
            if in_range:
                _h32_percol_span(x[r], fbuf, c, act)
            else:
                _percol_span(x[r], fbuf, mh, ml, rs, w, b, act)
            _store_half(y[r], fbuf)
        return
    for r in range(r0, r1):
        _percol_span(x[r], y[r], mh, ml, rs, w, b, act)


@jit(inline="always")
def _scale_row_any(xr, yr, fbuf, r, mh, ml, rs, smod, w, b, w32, b32, psub, pmod, pmul, act, half):
    if half:
        _scale_row(xr, fbuf, r, mh, ml, rs, smod, w, b, w32, b32, psub, pmod, pmul, act)
        _store_half(yr, fbuf)
    else:
        _scale_row(xr, yr, r, mh, ml, rs, smod, w, b, w32, b32, psub, pmod, pmul, act)


@jit
def _scale_block(x, y, fbuf, r0, r1, mh, ml, rs, smod, sper, w, b, w32, b32, psub, pmod, pmul,
                 act, half):
    if sper:
        _percol_block(x, y, fbuf, r0, r1, mh, ml, rs, w, b, act, half)
        return
    for r in range(r0, r1):
        _scale_row_any(x[r], y[r], fbuf, r, mh, ml, rs, smod, w, b, w32, b32, psub, pmod, pmul,
                       act, half)


@jit
def _scale_serial(x, y, mh, ml, rs, smod, sper, w, b, w32, b32, psub, pmod, pmul, act, half):
    fbuf = np.empty(x.shape[1], np.float32)
    _scale_block(x, y, fbuf, np.int64(0), x.shape[0], mh, ml, rs, smod, sper, w, b, w32, b32,
                 psub, pmod, pmul, act, half)


@jit(parallel=True)
def _scale_parallel(x, y, mh, ml, rs, smod, sper, w, b, w32, b32, psub, pmod, pmul, act, half,
                    nblocks):
    R = x.shape[0]
    for k in numba.prange(nblocks):
        fbuf = np.empty(x.shape[1], np.float32)
        _scale_block(x, y, fbuf, k * R // nblocks, (k + 1) * R // nblocks, mh, ml, rs, smod,
                     sper, w, b, w32, b32, psub, pmod, pmul, act, half)


def scale_rows(x, y, R, L, xrs, yrs, mh, ml, rs, smod, sper, w, b, psub, pmod, pmul, act,
               nthreads):
    """Same contract as ``cnorm._kernels.scale_rows`` (the apply pass over R rows of
    L contiguous elements with given statistics; y may be x)."""
    if x.dtype != y.dtype:
        raise TypeError("scale_rows: x and y must have the same dtype")
    if R == 0 or L == 0:
        return
    xv, yv, half = _row_views(x, y, R, L, xrs, yrs)
    _launch(_scale_serial, _scale_parallel,
            (xv, yv, _f64(mh), _f64(ml), _f64(rs), int(smod), bool(sper), *_params(w, b, half),
             int(psub), int(pmod), int(pmul), int(act), half), R, R * L, nthreads, blocks=True)

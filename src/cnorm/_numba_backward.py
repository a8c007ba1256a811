"""The ``numba`` backend of the gradient kernels (``_backward.pyx`` as ``@njit`` code).

Same entry points and arguments as the Cython module, so
:mod:`cnorm.backward` drives both alike:

``rows_backward``
    LayerNorm / RMSNorm rows (and the NCHW slices of BatchNorm, GroupNorm,
    InstanceNorm): each row is reduced (``Σ w*gv``, ``Σ w*gv*xhat``) and
    differentiated while it is in cache; parameter sums go to one partial
    row of ``pacc`` per task (a fixed split of the rows).
``cells_reduce``
    Per-cell ``Σ((x - mh) - ml)``, ``Σ gv``, ``Σ gv*xhat`` over a canonical
    ``(O, R1, K, R0)`` view, per fixed chunk of ``R1``.
``dx_4d``
    ``dx = ((w*gv - a) - xhat*bb) * rstd`` over a canonical 4-d view.

Summation order (a fixed lane tree): a sum over a contiguous segment is
taken in ``LANES`` = 16 float64 lanes, lane ``l`` adding the elements ``l,
l + 16, l + 32, ...`` of the segment in order, and the lanes are then added
in order 0..15; the sums of segments and rows follow in order (channels-last
column sums run down each column in row order).  That is the
order of the Cython kernels' direct paths (``row_fast``, ``cnb_cell``: any
float dtype, unit inner stride, no activation), so there the results are
bitwise the Cython backend's; elsewhere (strided inner axes, an activation)
Cython sums in 8 lanes and the two backends agree to the last bits of the
float64 sums.  The work partition depends on the shape only, so
results do not depend on the thread count.

Where x and dy are contiguous along the inner axis and there is no
activation, the loops read them straight from memory (unsigned indices and
no branch inside, so LLVM vectorizes them, the lanes included); otherwise
``CHUNK`` elements at a time are gathered into float64 buffers (``dy``
multiplied by the activation derivative there) and run through the same
loops.  float16 travels as its ``uint16`` bits (Numba has no CPU float16):
decoded exactly by :func:`cnorm._numba._ld`, encoded through float32 with
round-to-nearest-even by :func:`cnorm._numba_apply._store_half` (what the
F16C instructions of the Cython kernels do).  Buffers are O(row) or
O(``CHUNK``), never the size of the input.  Every kernel is compiled with
the one policy of :mod:`cnorm._numba_policy`.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange, types
from numba.extending import overload

from ._numba import _ld, _opaque, _stack_2d
from ._numba_apply import _store_half
from ._numba_policy import OVERLOAD_OPTIONS, jit, read_only
from ._numba_rows import _launch

__all__ = ["rows_backward", "cells_reduce", "dx_4d"]

SERIAL_WORK = 32768   # below this many elements, never start threads (as the Cython kernels)
CHUNK = 256           # elements per gathered chunk and per dx store (the Cython CHUNK)
ROWBUF = 262144       # gathered rows up to this length stay in float64 row buffers
LANES = 16            # float64 lanes of every sum (Cython's row_fast / cnb_cell)
DX_TASKS = 256        # the dx pass: at most this many tasks (ranges of inner rows)
TILE = 256            # columns per tile of the channels-last sums (<= CHUNK)
TILE_ROW = TILE + 8   # the tile's row length: rows not 4 KiB apart (no store/load aliasing)

# Constants reach non-inlined kernels as np.int64(...) values: a bare literal
# (0, CHUNK, or a module global, which Numba freezes into a literal) would
# compile one more copy of the callee for its literal type
# (tests/test_numba_backend.py checks that no kernel has a literal signature).


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


# ---------------------------------------------------------------- lane sums
# A segment x[0:n] (and g[0:n]) is summed in nl lanes: lane j takes the elements
# j, j + nl, j + 2*nl, ... in order.  The main loop takes 4*nl elements at a time
# (the u loop, unrolled: four additions per lane between its loads and stores)
# and is vectorized over the lanes j; the last n % (4*nl) elements go to their
# lanes one by one (the same additions in the same order).
@jit
def _lane_blocks(lanes, n, nl):
    """(lanes[0], lanes[1], lanes[2], the elements of n in whole blocks of 4*nl)."""
    return lanes[0], lanes[1], lanes[2], n - n % (4 * nl)


@jit
def _lanes_center(x, n, mh, ml, lanes, nl):
    """lanes[0][i % nl] += (x[i] - mh) - ml."""
    a0, _, _, nb = _lane_blocks(lanes, n, nl)
    for i in range(0, nb, 4 * nl):
        s = x[i:i + 4 * nl]
        for j in range(nl):
            v0 = a0[j]
            for u in range(4):
                v0 = v0 + ((_ld(s, j + u * nl) - mh) - ml)
            a0[j] = v0
    for i in range(nb, n):
        j = i % nl
        a0[j] = a0[j] + ((_ld(x, i) - mh) - ml)


@jit
def _lanes_cell(x, g, n, mh, ml, r, lanes, nl):
    """With ``c = (x[i] - mh) - ml``: lanes[0] += c, lanes[1] += g[i],
    lanes[2] += g[i] * (c * r) (lane i % nl)."""
    a0, a1, a2, nb = _lane_blocks(lanes, n, nl)
    for i in range(0, nb, 4 * nl):
        xs = x[i:i + 4 * nl]
        gs = g[i:i + 4 * nl]
        for j in range(nl):
            v0 = a0[j]
            v1 = a1[j]
            v2 = a2[j]
            for u in range(4):
                c = (_ld(xs, j + u * nl) - mh) - ml
                gg = _ld(gs, j + u * nl)
                v0 = v0 + c
                v1 = v1 + gg
                v2 = v2 + gg * (c * r)
            a0[j] = v0
            a1[j] = v1
            a2[j] = v2
    for i in range(nb, n):
        j = i % nl
        c = (_ld(x, i) - mh) - ml
        gg = _ld(g, i)
        a0[j] = a0[j] + c
        a1[j] = a1[j] + gg
        a2[j] = a2[j] + gg * (c * r)


@jit
def _lanes_wsums(x, g, n, m, ml, r, w, lanes, nl):
    """Per-element parameters: with ``xh = ((x[i] - m) - ml) * r`` and ``t = w[i] * g[i]``,
    lanes[1] += t, lanes[2] += t * xh (lane i % nl)."""
    _, a1, a2, nb = _lane_blocks(lanes, n, nl)
    for i in range(0, nb, 4 * nl):
        xs = x[i:i + 4 * nl]
        gs = g[i:i + 4 * nl]
        ws = w[i:i + 4 * nl]
        for j in range(nl):
            v1 = a1[j]
            v2 = a2[j]
            for u in range(4):
                k = np.uint64(j + u * nl)
                t = ws[k] * _ld(gs, k)
                v1 = v1 + t
                v2 = v2 + t * (((_ld(xs, k) - m) - ml) * r)
            a1[j] = v1
            a2[j] = v2
    for i in range(nb, n):
        j = i % nl
        t = w[i] * _ld(g, i)
        a1[j] = a1[j] + t
        a2[j] = a2[j] + t * (((_ld(x, i) - m) - ml) * r)


@jit
def _param_sums(x, g, n, m, ml, r, pw, pb):
    """pw[i] += g[i] * xh, pb[i] += g[i] with ``xh = ((x[i] - m) - ml) * r`` (a loop of its
    own: with the lanes in the same loop LLVM does not vectorize it)."""
    for i in range(np.uint64(n)):
        gg = _ld(g, i)
        pw[i] += gg * (((_ld(x, i) - m) - ml) * r)
        pb[i] += gg


@jit
def _lane_total(a, nl):
    """The lanes added in order (0.0 + a[0] + a[1] + ...)."""
    s = 0.0
    for j in range(nl):
        s = s + a[j]
    return s


@jit
def _at(st, i0, i1, i2):
    """Element offset of index (i0, i1, i2, 0) with strides and start ``st`` (5 values)."""
    return st[4] + i0 * st[0] + i1 * st[1] + i2 * st[2]


@jit
def _zero_lanes(lanes):
    for i in range(lanes.shape[0]):
        for j in range(lanes.shape[1]):
            lanes[i, j] = 0.0


# The loops over short rows (channels last: a row is one value per channel) take
# offsets into the arrays, not slices: no array views made per row.
@jit(inline="always")
def _cols_sums(x, xo, g, go, n, tile, want_dy):
    """Column sums of one row of n columns (x, g from xo, go); ``tile`` rows 0-2 hold the
    columns' mh, ml, rs, rows 3-5 their sums: tile[3] += c = (x - mh) - ml and, with
    ``want_dy``, tile[4] += g, tile[5] += g * (c * rs).  Inlined, so that LLVM sees the
    tile is the caller's stack array (no aliasing with x, g: the loops vectorize)."""
    ux, ug = np.uint64(xo), np.uint64(go)
    if want_dy:
        for i in range(np.uint64(n)):
            c = (_ld(x, ux + i) - tile[0, i]) - tile[1, i]
            gg = _ld(g, ug + i)
            tile[3, i] += c
            tile[4, i] += gg
            tile[5, i] += gg * (c * tile[2, i])
    else:
        for i in range(np.uint64(n)):
            tile[3, i] += (_ld(x, ux + i) - tile[0, i]) - tile[1, i]


# ---------------------------------------------------------------- dx of a span
@jit
def _dx_span(x, xo, g, go, out, oo, n, m, ml, r, w, p, pvec, a, bb):
    """out[oo + i] = ((w*g - a) - xh*bb) * r, xh = ((x - m) - ml) * r (x, g from xo, go),
    with w[p + i] (``pvec``) or w[p]; scalar statistics."""
    ux, ug, uo, up = np.uint64(xo), np.uint64(go), np.uint64(oo), np.uint64(p)
    if pvec:
        for i in range(np.uint64(n)):
            out[uo + i] = ((w[up + i] * _ld(g, ug + i) - a)
                           - (((_ld(x, ux + i) - m) - ml) * r) * bb) * r
    else:
        w0 = w[up]
        for i in range(np.uint64(n)):
            out[uo + i] = ((w0 * _ld(g, ug + i) - a) - (((_ld(x, ux + i) - m) - ml) * r) * bb) * r


@jit
def _dx_vec(x, xo, g, go, out, oo, n, mh, ml, rs, a, bb, s, w, p, pvec):
    """_dx_span with statistics per element, from s (channels last)."""
    ux, ug, uo, us, up = np.uint64(xo), np.uint64(go), np.uint64(oo), np.uint64(s), np.uint64(p)
    if pvec:
        for i in range(np.uint64(n)):
            k = us + i
            out[uo + i] = ((w[up + i] * _ld(g, ug + i) - a[k])
                           - (((_ld(x, ux + i) - mh[k]) - ml[k]) * rs[k]) * bb[k]) * rs[k]
    else:
        w0 = w[up]
        for i in range(np.uint64(n)):
            k = us + i
            out[uo + i] = ((w0 * _ld(g, ug + i) - a[k])
                           - (((_ld(x, ux + i) - mh[k]) - ml[k]) * rs[k]) * bb[k]) * rs[k]


# ---------------------------------------------------------------- gathers and stores
@jit
def _gather(src, base, step, n, buf):
    """buf[i] = src[base + i*step] as float64."""
    for i in range(n):
        buf[i] = _ld(src, base + i * step)


@jit
def _scatter(dst, base, step, n, buf):
    """dst[base + i*step] = buf[i]."""
    for i in range(n):
        dst[base + i * step] = buf[i]


@jit
def _load_gv(x, xo, xst, dy, do, dst, n, xb, gb, mh, ml, rs, sst, w, b, pst, act):
    """xb = x, gb = dy * act'(xhat*w + b) (float64) for n strided elements; the statistics
    at i*sst and the parameters at i*pst (stride 0: one value for all)."""
    _gather(x, xo, xst, n, xb)
    _gather(dy, do, dst, n, gb)
    if act != 0:
        for i in range(n):
            s = i * sst
            p = i * pst
            xh = ((xb[i] - mh[s]) - ml[s]) * rs[s]
            gb[i] = gb[i] * dact(xh * w[p] + b[p], act)


def _out_buf(dx, n):
    """Buffer for n dx values: float32 for float16 (rounded once more when stored), else
    dx's dtype."""
    return np.empty(n, np.float32 if dx.dtype == np.uint16 else dx.dtype)


@overload(_out_buf, jit_options=OVERLOAD_OPTIONS)
def _out_buf_impl(dx, n):
    if isinstance(dx.dtype, types.Integer):
        return lambda dx, n: np.empty(n, np.float32)
    return lambda dx, n: np.empty(n, dx.dtype)


def _target(dx, step, ob):
    """(array, direct): where dx values are computed, dx itself (float32/float64, unit
    stride: ``direct``) or the buffer ob (then _flush stores them)."""
    direct = step == 1 and dx.dtype != np.uint16
    return (dx if direct else ob), direct


@overload(_target, jit_options=OVERLOAD_OPTIONS)
def _target_impl(dx, step, ob):
    if isinstance(dx.dtype, types.Integer):
        return lambda dx, step, ob: (ob, False)
    return lambda dx, step, ob: (dx, True) if step == 1 else (ob, False)


def _flush(dx, o, step, n, ob, hb):
    """Store the n values _target put in ob at dx[o + i*step]: float16 through the float32
    values' bits (``hb``: uint16 scratch)."""
    where = o + step * np.arange(n)
    dx[where] = ob[:n].astype(np.float16).view(np.uint16) if dx.dtype == np.uint16 else ob[:n]


@overload(_flush, jit_options=OVERLOAD_OPTIONS)
def _flush_impl(dx, o, step, n, ob, hb):
    if isinstance(dx.dtype, types.Integer):
        def flush_half(dx, o, step, n, ob, hb):
            if step == 1:
                _store_half(dx[o:o + n], ob[:n])
            else:
                _store_half(hb[:n], ob[:n])
                _scatter(dx, o, step, n, hb)
        return flush_half
    return lambda dx, o, step, n, ob, hb: _scatter(dx, o, step, n, ob)


@jit
def _scratch(dx, n):
    """Buffers of one task (allocated once per task, or once for a serial run): x and gv
    as float64 (2, n), CHUNK dx values (_out_buf), their float16 bits, three statistics."""
    return np.empty((2, n)), _out_buf(dx, CHUNK), np.empty(CHUNK, np.uint16), np.empty(3)


# ---------------------------------------------------------------- rows
# A row (one statistics slice) is K0 segments of K1 elements; ``geo`` holds its
# element offsets and strides: (xo, xs2, xs3, do, ds2, ds3, oo, os2, os3, po, ps2, K0, K1).
# Parameters are per element of a segment (``pvec``) or one per segment.
@jit
def _row_mean_lo(x, geo, m, direct, nl, lanes, xb):
    """mean(x - m) over the row: the exact residual of a float64 mean (Cython's pass A)."""
    xo, xs2, xs3 = geo[0], geo[1], geo[2]
    K0, K1 = geo[11], geo[12]
    _zero_lanes(lanes)
    for k0 in range(K0):
        base = xo + k0 * xs2
        if direct:
            _lanes_center(x[base:base + K1], K1, m, 0.0, lanes, nl)
        else:
            for c0 in range(0, K1, CHUNK):
                n = min(CHUNK, K1 - c0)
                _gather(x, base + c0 * xs3, xs3, n, xb)
                _lanes_center(xb, n, m, 0.0, lanes, nl)
    return _lane_total(lanes[0], nl) / (K0 * K1)


@jit
def _row_sums(x, dy, geo, st, w, b, pvec, want, pw, pb, act, direct, rowbuf, nl, lanes, xb, gb):
    """(Σ w*gv, Σ w*gv*xhat) of the row (statistics st = (m, ml, r)); parameter sums
    into pw, pb (per element, or per segment from the segment's lanes)."""
    xo, xs2, xs3, do, ds2, ds3 = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
    po, ps2, K0, K1 = geo[9], geo[10], geo[11], geo[12]
    m, ml, r = st[0], st[1], st[2]
    _zero_lanes(lanes)
    s1 = 0.0
    s2 = 0.0
    for k0 in range(K0):
        p = po + k0 * ps2
        if not pvec:
            _zero_lanes(lanes)
        step = K1 if direct else CHUNK
        for c0 in range(0, K1, step):
            n = min(step, K1 - c0)
            if direct:
                xa = xo + k0 * xs2 + c0
                da = do + k0 * ds2 + c0
                xc = x[xa:xa + n]
                gc = dy[da:da + n]
                if pvec:
                    _lanes_wsums(xc, gc, n, m, ml, r, w[p + c0:], lanes, nl)
                    _param_sums(xc, gc, n, m, ml, r, pw[p + c0:], pb[p + c0:])
                else:
                    _lanes_cell(xc, gc, n, m, ml, r, lanes, nl)
            else:
                j = k0 * K1 + c0 if rowbuf else 0
                xc = xb[j:j + n]
                gc = gb[j:j + n]
                pp = p + c0 if pvec else p
                _load_gv(x, xo + k0 * xs2 + c0 * xs3, xs3, dy, do + k0 * ds2 + c0 * ds3, ds3, n, xc,
                         gc, st[0:1], st[1:2], st[2:3], np.int64(0), w[pp:], b[pp:],
                         np.int64(1 if pvec else 0), act)
                if pvec:
                    _lanes_wsums(xc, gc, n, m, ml, r, w[pp:], lanes, nl)
                    _param_sums(xc, gc, n, m, ml, r, pw[pp:], pb[pp:])
                else:
                    _lanes_cell(xc, gc, n, m, ml, r, lanes, nl)
        if not pvec:
            sg = _lane_total(lanes[1], nl)
            sgv = _lane_total(lanes[2], nl)
            s1 += w[p] * sg
            s2 += w[p] * sgv
            if want:
                pw[p] += sgv
                pb[p] += sg
    if pvec:
        return _lane_total(lanes[1], nl) + s1, _lane_total(lanes[2], nl) + s2
    return 0.0 + s1, 0.0 + s2


@jit
def _row_dx(x, dy, dx, geo, st, w, b, pvec, act, a, bb, direct, rowbuf, xb, gb, ob, hb):
    """dx of the row from its coefficients a, bb (Cython's pass C)."""
    xo, xs2, xs3, do, ds2, ds3 = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
    oo, os2, os3, po, ps2, K0, K1 = geo[6], geo[7], geo[8], geo[9], geo[10], geo[11], geo[12]
    m, ml, r = st[0], st[1], st[2]
    out, in_place = _target(dx, os3, ob)
    for k0 in range(K0):
        p = po + k0 * ps2
        for c0 in range(0, K1, CHUNK):
            n = min(CHUNK, K1 - c0)
            pp = p + c0 if pvec else p
            oa = oo + k0 * os2 + c0 * os3
            ot = oa if in_place else 0
            if direct:
                _dx_span(x, xo + k0 * xs2 + c0, dy, do + k0 * ds2 + c0, out, ot, n, m, ml, r, w, pp,
                         pvec, a, bb)
            else:
                j = k0 * K1 + c0 if rowbuf else 0
                if not rowbuf:
                    _load_gv(x, xo + k0 * xs2 + c0 * xs3, xs3, dy, do + k0 * ds2 + c0 * ds3, ds3, n,
                             xb, gb, st[0:1], st[1:2], st[2:3], np.int64(0), w[pp:], b[pp:],
                             np.int64(1 if pvec else 0), act)
                _dx_span(xb, j, gb, j, out, ot, n, m, ml, r, w, pp, pvec, a, bb)
            if not in_place:
                _flush(dx, oa, os3, n, ob, hb)


# iv of the rows kernel: shape (4), x/dy/dx/param strides + start (5 each), then these
_R_SOFF, _R_SS0, _R_SS1, _R_NTASKS, _R_MODE, _R_REFINE, _R_ACT, _R_WANT = range(24, 32)


@jit
def _row_paths(iv):
    """(direct, rowbuf, buffer length) of the rows kernel: x and dy read straight from
    memory, or gathered into whole-row buffers (rows up to ROWBUF) or CHUNK buffers."""
    K = iv[2] * iv[3]
    direct = iv[_R_ACT] == 0 and iv[7] == 1 and iv[12] == 1   # unit xs[3], ds[3]
    rowbuf = not direct and K <= ROWBUF
    return direct, rowbuf, K if rowbuf else CHUNK


@jit
def _rows_task(t, x, dy, dx, iv, mean, rstd, w, b, pacc, scratch):
    """Rows [t*R/T, (t+1)*R/T) of the (B0, B1, K0, K1) view; parameter sums into pacc[t]."""
    B1, K0, K1 = iv[1], iv[2], iv[3]
    R = iv[0] * B1
    K = K0 * K1
    xs, ds, os, ps = iv[4:9], iv[9:14], iv[14:19], iv[19:24]
    ntasks, mode, refine, act = iv[_R_NTASKS], iv[_R_MODE], iv[_R_REFINE], iv[_R_ACT]
    want = iv[_R_WANT] != 0
    nl = _opaque(LANES)
    pvec = ps[3] == 1
    direct, rowbuf, _ = _row_paths(iv)
    xb, gb = scratch[0][0], scratch[0][1]
    ob, hb, st = scratch[1], scratch[2], scratch[3]
    lanes = _stack_2d(3, 16)
    pt = np.int64(t) if want else np.int64(0)
    pw = pacc[pt, 0]
    pb = pacc[pt, 1]
    for q in range(t * R // ntasks, (t + 1) * R // ntasks):
        i0 = q // B1
        i1 = q % B1
        si = iv[_R_SOFF] + i0 * iv[_R_SS0] + i1 * iv[_R_SS1]
        z = np.int64(0)
        geo = (_at(xs, i0, i1, z), xs[2], xs[3], _at(ds, i0, i1, z), ds[2], ds[3],
               _at(os, i0, i1, z), os[2], os[3], _at(ps, i0, i1, z), ps[2], K0, K1)
        st[0] = mean[si]
        st[2] = rstd[si]
        st[1] = _row_mean_lo(x, geo, st[0], direct, nl, lanes, xb) if refine else 0.0
        s1, s2 = _row_sums(x, dy, geo, st, w, b, pvec, want, pw, pb, act, direct, rowbuf, nl,
                           lanes, xb, gb)
        a = s1 / K if mode == 2 else 0.0
        bb = s2 / K if mode != 0 else 0.0
        _row_dx(x, dy, dx, geo, st, w, b, pvec, act, a, bb, direct, rowbuf, xb, gb, ob, hb)


@jit
def _rows_serial(x, dy, dx, iv, mean, rstd, w, b, pacc):
    scratch = _scratch(dx, _row_paths(iv)[2])
    for t in range(iv[_R_NTASKS]):
        _rows_task(t, x, dy, dx, iv, mean, rstd, w, b, pacc, scratch)


@jit(parallel=True)
def _rows_parallel(x, dy, dx, iv, mean, rstd, w, b, pacc):
    for t in prange(iv[_R_NTASKS]):
        _rows_task(np.int64(t), x, dy, dx, iv, mean, rstd, w, b, pacc,
                   _scratch(dx, _row_paths(iv)[2]))


# ---------------------------------------------------------------- cells
# iv of the cells kernel: shape (4), x/dy strides + start (5 each), then these
_C_SO, _C_SK, _C_COFF, _C_NCHUNKS, _C_ACT, _C_WANT = range(14, 20)


@jit
def _cell_rows(x, dy, iv, o, k, c, mh, ml, rs, w, b, out, xb, gb, lanes):
    """Inner-reduce form (R0 > 1): the sums of cell (o, k) over rows [r0, r1) of chunk c."""
    R1, R0 = iv[1], iv[3]
    xs, ds = iv[4:9], iv[9:14]
    nchunks, act, want_dy = iv[_C_NCHUNKS], iv[_C_ACT], iv[_C_WANT] != 0
    nl = _opaque(LANES)
    ci = iv[_C_COFF] + o * iv[_C_SO] + k * iv[_C_SK]
    m0, m1, r = mh[ci], ml[ci], rs[ci]
    direct = act == 0 and xs[3] == 1 and ds[3] == 1
    _zero_lanes(lanes)
    for q in range(c * R1 // nchunks, (c + 1) * R1 // nchunks):
        xo = _at(xs, o, q, k)
        do = _at(ds, o, q, k)
        if direct:
            if want_dy:
                _lanes_cell(x[xo:xo + R0], dy[do:do + R0], R0, m0, m1, r, lanes, nl)
            else:
                _lanes_center(x[xo:xo + R0], R0, m0, m1, lanes, nl)
            continue
        for c0 in range(0, R0, CHUNK):
            n = min(CHUNK, R0 - c0)
            if want_dy:
                _load_gv(x, xo + c0 * xs[3], xs[3], dy, do + c0 * ds[3], ds[3], n, xb, gb,
                         mh[ci:], ml[ci:], rs[ci:], np.int64(0), w[ci:], b[ci:], np.int64(0),
                         act)
                _lanes_cell(xb, gb, n, m0, m1, r, lanes, nl)
            else:
                _gather(x, xo + c0 * xs[3], xs[3], n, xb)
                _lanes_center(xb, n, m0, m1, lanes, nl)
    base = (c * (out.shape[0] // (3 * nchunks)) + ci) * 3
    for s in range(3):
        out[base + s] += _lane_total(lanes[s], nl)


@jit
def _cell_cols(x, dy, iv, o, c, mh, ml, rs, w, b, out, xb, gb):
    """Column form (R0 == 1): the sums of the cells (o, 0..K) over rows [r0, r1) of
    chunk c, TILE columns at a time (each column's sum still runs over the rows in
    order), their statistics and sums in a stack tile (no aliasing: the loops vectorize)."""
    R1, K = iv[1], iv[2]
    xs, ds = iv[4:9], iv[9:14]
    nchunks, act, want_dy = iv[_C_NCHUNKS], iv[_C_ACT], iv[_C_WANT] != 0
    cbase = iv[_C_COFF] + o * iv[_C_SO]
    sk = iv[_C_SK]
    direct = act == 0 and xs[2] == 1 and ds[2] == 1
    base = c * (out.shape[0] // (3 * nchunks))
    tile = _stack_2d(6, TILE_ROW)
    for k0 in range(0, K, TILE):
        n = min(TILE, K - k0)
        c0 = cbase + k0 * sk
        for i in range(n):
            tile[0, i], tile[1, i], tile[2, i] = mh[c0 + i * sk], ml[c0 + i * sk], rs[c0 + i * sk]
            tile[3, i] = 0.0
            tile[4, i] = 0.0
            tile[5, i] = 0.0
        for q in range(c * R1 // nchunks, (c + 1) * R1 // nchunks):
            xo = _at(xs, o, q, k0)
            do = _at(ds, o, q, k0)
            if direct:
                _cols_sums(x, xo, dy, do, n, tile, want_dy)
                continue
            if want_dy:
                _load_gv(x, xo, xs[2], dy, do, ds[2], n, xb, gb, mh[c0:], ml[c0:], rs[c0:], sk,
                         w[c0:], b[c0:], sk, act)
            else:
                _gather(x, xo, xs[2], n, xb)
            _cols_sums(xb, 0, gb, 0, n, tile, want_dy)
        for i in range(n):
            ci = (base + c0 + i * sk) * 3
            out[ci] += tile[3, i]
            out[ci + 1] += tile[4, i]
            out[ci + 2] += tile[5, i]


@jit
def _cells_task(t, x, dy, iv, mh, ml, rs, w, b, out, scratch):
    """Task t: (o, chunk) of the column form, or (o, k, chunk) of the inner-reduce form."""
    K, R0, nchunks = iv[2], iv[3], iv[_C_NCHUNKS]
    xb, gb = scratch[0][0], scratch[0][1]
    if R0 == 1:
        _cell_cols(x, dy, iv, t // nchunks, t % nchunks, mh, ml, rs, w, b, out, xb, gb)
    else:
        lanes = _stack_2d(3, 16)
        rest = t % (K * nchunks)
        _cell_rows(x, dy, iv, t // (K * nchunks), rest // nchunks, rest % nchunks, mh, ml, rs, w,
                   b, out, xb, gb, lanes)


@jit
def _cells_serial(ntasks, x, dy, iv, mh, ml, rs, w, b, out):
    scratch = _scratch(x, np.int64(CHUNK))
    for t in range(ntasks):
        _cells_task(t, x, dy, iv, mh, ml, rs, w, b, out, scratch)


@jit(parallel=True)
def _cells_parallel(ntasks, x, dy, iv, mh, ml, rs, w, b, out):
    for t in prange(ntasks):
        _cells_task(np.int64(t), x, dy, iv, mh, ml, rs, w, b, out, _scratch(x, np.int64(CHUNK)))


# ---------------------------------------------------------------- the elementwise dx pass
@jit
def _dx_task(t, ntasks, x, dy, dx, iv, mh, ml, rs, a, bb, w, b, scratch):
    """Inner rows [t*N/T, (t+1)*N/T) of the 4-d view (dims 0..2 flattened: N rows)."""
    n1, n2, n3 = iv[1], iv[2], iv[3]
    xs, ds, os, ss, ps = iv[4:9], iv[9:14], iv[14:19], iv[19:24], iv[24:29]
    act = iv[29]
    nrows = iv[0] * n1 * n2
    svec = ss[3] == 1
    pvec = ps[3] == 1
    direct = act == 0 and xs[3] == 1 and ds[3] == 1
    xb, gb = scratch[0][0], scratch[0][1]
    ob, hb = scratch[1], scratch[2]
    out, in_place = _target(dx, os[3], ob)
    for rr in range(t * nrows // ntasks, (t + 1) * nrows // ntasks):
        i2 = rr % n2
        i1 = (rr // n2) % n1
        i0 = rr // (n2 * n1)
        so, po = _at(ss, i0, i1, i2), _at(ps, i0, i1, i2)
        xo, do, oo = _at(xs, i0, i1, i2), _at(ds, i0, i1, i2), _at(os, i0, i1, i2)
        for c0 in range(0, n3, CHUNK):
            n = min(CHUNK, n3 - c0)
            s = so + c0 * ss[3]
            p = po + c0 * ps[3]
            oa = oo + c0 * os[3]
            ot = oa if in_place else 0
            if not direct:
                _load_gv(x, xo + c0 * xs[3], xs[3], dy, do + c0 * ds[3], ds[3], n, xb, gb, mh[s:],
                         ml[s:], rs[s:], ss[3], w[p:], b[p:], ps[3], act)
            if svec and direct:
                _dx_vec(x, xo + c0, dy, do + c0, out, ot, n, mh, ml, rs, a, bb, s, w, p, pvec)
            elif svec:
                z = np.int64(0)
                _dx_vec(xb, z, gb, z, out, ot, n, mh, ml, rs, a, bb, s, w, p, pvec)
            elif direct:
                _dx_span(x, xo + c0, dy, do + c0, out, ot, n, mh[s], ml[s], rs[s], w, p, pvec, a[s],
                         bb[s])
            else:
                z = np.int64(0)
                _dx_span(xb, z, gb, z, out, ot, n, mh[s], ml[s], rs[s], w, p, pvec, a[s], bb[s])
            if not in_place:
                _flush(dx, oa, os[3], n, ob, hb)


@jit
def _dx_serial(ntasks, x, dy, dx, iv, mh, ml, rs, a, bb, w, b):
    scratch = _scratch(dx, np.int64(CHUNK))
    for t in range(ntasks):
        _dx_task(t, ntasks, x, dy, dx, iv, mh, ml, rs, a, bb, w, b, scratch)


@jit(parallel=True)
def _dx_parallel(ntasks, x, dy, dx, iv, mh, ml, rs, a, bb, w, b):
    for t in prange(ntasks):
        _dx_task(np.int64(t), ntasks, x, dy, dx, iv, mh, ml, rs, a, bb, w, b,
                 _scratch(dx, np.int64(CHUNK)))


# ---------------------------------------------------------------- views
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

    Returns the span and a list ``[s0, s1, s2, s3, start]`` in elements.
    """
    isz = a.itemsize
    if any(s % isz for s in strides) or offset % isz:
        raise ValueError("numba backend: strides must be multiples of the item size")
    lo = offset + sum((n - 1) * s for n, s in zip(shape, strides) if s < 0 and n > 0)
    hi = offset + sum((n - 1) * s for n, s in zip(shape, strides) if s > 0 and n > 0)
    span = np.asarray(_Span(a, lo, (hi - lo) // isz + 1, writable))
    return span, [s // isz for s in strides] + [(offset - lo) // isz]


def _f64(a):
    """A read-only C-contiguous float64 1-d array: an input of the kernels, one
    Numba type whether the caller's array is writeable or not."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    return read_only(a if a.flags.c_contiguous else a.copy())


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
    if pacc is not None and (pacc.ndim != 3 or pacc.shape[1] != 2 or pacc.shape[2] < w.shape[0]
                             or not pacc.flags.c_contiguous):
        raise ValueError("rows_backward: pacc must be C-contiguous of shape (tasks, 2, >= len(w))")
    ntasks = min(pacc.shape[0], R) if pacc is not None else max(1, min(R, 64))
    xf, xs = _flat(x, xoff, shape, xstrides)
    df, ds = _flat(dy, dyoff, shape, dystrides)
    of, os = _flat(dx, dxoff, shape, dxstrides, writable=True)
    iv = np.array(list(shape) + xs + ds + os + list(pstrides) + [poff, soff, sstrides[0],
                  sstrides[1], ntasks, mode, bool(refine), act, pacc is not None], dtype=np.int64)
    acc = np.zeros((1, 2, 1)) if pacc is None else pacc
    _launch(_rows_serial, _rows_parallel, (xf, df, of, iv, _f64(mean), _f64(rstd), w, b, acc),
            ntasks, R * K, nthreads, SERIAL_WORK)
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
    O, R1, K, R0 = shape
    nchunks = int(out.shape[0])
    ntasks = O * nchunks if R0 == 1 else O * K * nchunks
    iv = np.array(list(shape) + xs + ds + [so, sk, coff, nchunks, act, bool(want_dy)],
                  dtype=np.int64)
    _launch(_cells_serial, _cells_parallel,
            (ntasks, xf, df, iv, _f64(mh), _f64(ml), _f64(rstd), _f64(w), _f64(b), flat),
            ntasks, O * R1 * K * R0, nthreads, SERIAL_WORK)


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
    iv = np.array(list(shape) + xs + ds + os + list(sstrides) + [soff] + list(pstrides)
                  + [poff, act], dtype=np.int64)
    nrows = shape[0] * shape[1] * shape[2]
    ntasks = min(nrows, DX_TASKS)
    _launch(_dx_serial, _dx_parallel,
            (ntasks, xf, df, of, iv, _f64(mh), _f64(ml), _f64(rstd), _f64(a), _f64(bb), _f64(w),
             _f64(b)), ntasks, nrows * shape[3], nthreads, SERIAL_WORK)

"""Normalization layers, backward: gradients of the five forward layers.

Every layer's backward is "slice statistics and parameter sums, then one
elementwise pass".  With ``xhat = (x - mean) * rstd``, ``v = xhat * w + b`` and
``gv = dy * act'(v)``:

* ``dbias = Σ gv`` and ``dweight = Σ gv * xhat`` over the axes the parameter
  is broadcast along;
* ``dx = ((w * gv - a) - xhat * bb) * rstd`` with the slice means
  ``a = mean(w * gv)`` and ``bb = mean(w * gv * xhat)``; RMS norm has
  ``a = 0`` (and ``xhat = x * rstd``), batch norm in eval mode ``a = bb = 0``.

The sums are *centred*: ``xhat`` comes from ``x - mean`` in float64, never
from ``E[x*dy] - E[x]*E[dy]``, so the gradients keep their accuracy at large
offsets.  For float64 data the mean the forward returned (rounded to float64)
is refined by the exact residual ``mean(x - mean)`` of each slice, so ``xhat``
is the one the forward pass used (its double-double mean) to the last bits.

Layouts: where a statistics slice is a row in memory (LayerNorm / RMSNorm
rows; BatchNorm channels, GroupNorm (sample, group) and InstanceNorm
(sample, channel) slices of NCHW data) a fused row kernel reduces each slice
and differentiates it while it sits in cache, one read of ``dy`` and ``x``
from memory.  Otherwise (channels last, or slices too large for the cache and
too few to share among threads) BatchNorm / GroupNorm / InstanceNorm reduce
per *cell* (sample, channel) over whole rows of channels and finish with one
elementwise pass.  Accumulation is float64 for every dtype, over a partition of
the work fixed by the shape alone: results are bitwise identical for any
``num_threads`` (and for every ISA path of the Cython kernels, except the sign
and payload of a NaN: where two NaNs meet in one operation, which of them
propagates depends on the operand order the compiler chose for that ISA).  ``out=``
writes ``dx`` into a given array (it may be ``dy`` itself).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import _config
from ._axes import (element_strides, follow_order, layout_order, normalize_axes,
                    outer_offsets, plan_elementwise)
from ._engine import ACTIVATIONS, _base_offset
from ._validate import BFLOAT16, NATIVE, as_float_array, check_num_groups, check_out

__all__ = ["layer_norm_backward", "rms_norm_backward", "batch_norm_backward",
           "group_norm_backward", "instance_norm_backward"]

_SMOOTH = (2, 3, 4)           # activation codes whose derivative is not piecewise constant
_TASK_ELEMS = 65536           # elements per reduction task (a shape-only partition)
_F64 = np.dtype(np.float64)


# ------------------------------------------------------------------ validation
def _act(activation, fn):
    if not (activation is None or isinstance(activation, str)) or activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def _inputs(dy, x, fn, backend, num_threads, activation):
    """(x as the kernels read it, result dtype, dy in x's dtype, act code, backend)."""
    xa, rdt = as_float_array(x, "x", fn)
    d = np.asarray(dy)
    if d.dtype.kind in "biu":
        dya = d.astype(xa.dtype)
    elif d.dtype == rdt:
        dya = d if d.dtype == xa.dtype else d.astype(xa.dtype)
    elif d.dtype.kind == "f" or (BFLOAT16 is not None and d.dtype == BFLOAT16):
        raise TypeError(f"{fn}: dy has dtype {d.dtype} but x has dtype {rdt}; pass the gradient "
                        f"in the dtype of x (the forward output's dtype)")
    else:
        raise TypeError(f"{fn}: dy must be a real floating array, got dtype {d.dtype}")
    if d.shape != xa.shape:
        raise ValueError(f"{fn}: dy has shape {d.shape} but x has shape {xa.shape}; they must match")
    act = _act(activation, fn)
    backend = _config.resolve_backend(backend)
    _config.resolve_threads(num_threads)
    return xa, rdt, dya, act, backend


def _stat(a, name, shapes, fn, origin):
    """A saved statistic as a C-contiguous float64 array of shape ``shapes[0]``."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiu" and not (BFLOAT16 is not None and arr.dtype == BFLOAT16):
        raise TypeError(f"{fn}: {name} must be a real floating array, got dtype {arr.dtype}")
    if arr.shape not in shapes:
        alt = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{fn}: {name} has shape {arr.shape}, expected {alt} (what {origin} "
                         f"returns with return_stats=True for these arguments)")
    return np.ascontiguousarray(arr, dtype=np.float64).reshape(shapes[0])


def _param(p, shape, name, fn):
    """(float64 array of ``shape``, dtype of its gradient), or (None, None)."""
    if p is None:
        return None, None
    a = np.asarray(p)
    if BFLOAT16 is not None and a.dtype == BFLOAT16:
        gdt = a.dtype
    elif a.dtype in NATIVE:
        gdt = a.dtype
    elif a.dtype.kind in "iu":
        gdt = _F64
    else:
        raise TypeError(f"{fn}: {name} must be a real floating array, got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{fn}: {name} has shape {a.shape}, expected {tuple(shape)}")
    return np.ascontiguousarray(a, dtype=np.float64), gdt


def _channel_axis(axis, ndim, fn, batch_first=False):
    if ndim < 2:
        raise ValueError(f"{fn}: x must have at least 2 dimensions (batch and channels), "
                         f"got ndim={ndim}")
    if isinstance(axis, (tuple, list)):
        raise TypeError(f"{fn}: axis must be a single int (the channel axis), got {axis!r}")
    (a,) = normalize_axes(axis, ndim)
    if batch_first and a == 0:
        raise ValueError(f"{fn}: axis 0 is the batch axis; the channel axis must differ, got {axis!r}")
    return a


def _grad(g, dt):
    return None if dt is None else np.asarray(g, dtype=np.float64).astype(dt)


def _same_view(a, b):
    ia, ib = a.__array_interface__, b.__array_interface__
    return ia["data"][0] == ib["data"][0] and a.strides == b.strides and a.dtype == b.dtype


def _dx_array(out, xa, dya, rdt, fn):
    """The array dx is computed into: a new one, or ``out`` (checked).

    ``out`` may be x or dy itself (each element is read before its gradient
    is written); any other overlap with them is refused.
    """
    if out is None:
        return np.empty_like(xa, order="K")
    check_out(out, xa.shape, rdt, "out", fn)
    for name, a in (("x", xa), ("dy", dya)):
        if np.may_share_memory(out, a) and not _same_view(out, a):
            raise ValueError(f"{fn}: out overlaps {name} without being the same array; pass "
                             f"{name} itself or a separate array")
    return out if out.dtype == xa.dtype else np.empty_like(xa, order="K")


def _finish_dx(dx, rdt, out):
    if out is not None:
        if out is not dx:
            out[...] = dx
        return out
    return dx if dx.dtype == rdt else dx.astype(rdt)


# ------------------------------------------------------------------ float64 NumPy formulas
def _dact_np(v, act):
    """d act(v)/dv in float64 NumPy (the kernels' formulas)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if act == 1:
            return np.where(v <= 0.0, 0.0, 1.0)
        if act == 2:
            from math import erf
            erfv = np.vectorize(erf, otypes=[float])(v * 0.7071067811865476)
            return 0.5 * (1.0 + erfv) + v * 0.3989422804014327 * np.exp(-0.5 * v * v)
        if act == 3:
            u = v * v
            t = np.tanh(0.7978845608028654 * (v + 0.044715 * u * v))
            return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 0.134145 * u))
        if act == 4:
            s = 1.0 / (1.0 + np.exp(-v))
            return s * (1.0 + v * (1.0 - s))
    return np.ones_like(v)


def _numpy_backward(x, dy, mean, rstd, w, b, act, slice_axes, param_axes, mode, refine):
    """The ``numpy`` backend: every gradient in plain float64 NumPy (allocates).

    ``mean``/``rstd``/``w``/``b`` broadcast against ``x``; ``mode`` is
    MODE_CENTER, MODE_RMS or MODE_EVAL.  Returns ``(dx float64, Σ gv*xhat,
    Σ gv)`` with the sums over ``param_axes`` (keepdims).
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        c = x.astype(np.float64) - mean
        if refine:
            c = c - c.mean(axis=slice_axes, keepdims=True)
        xh = c * rstd
        w_ = 1.0 if w is None else w
        b_ = 0.0 if b is None else b
        gv = dy.astype(np.float64)
        if act:
            gv = gv * _dact_np(xh * w_ + b_, act)
        pw = (gv * xh).sum(axis=param_axes, keepdims=True)
        pb = gv.sum(axis=param_axes, keepdims=True)
        g = w_ * gv
        a = g.mean(axis=slice_axes, keepdims=True) if mode == MODE_CENTER else 0.0
        bb = (g * xh).mean(axis=slice_axes, keepdims=True) if mode != MODE_EVAL else 0.0
        dx = ((g - a) - xh * bb) * rstd
    return dx, pw, pb


# ------------------------------------------------------------------ kernels and views
def _kernels(backend):
    if backend == "cython":
        return _config.family("_backward")
    from . import _numba_backward
    return _numba_backward


def _merge(dims):
    """Merge neighbouring [size, [strides...]] dims (outermost first) where every operand allows."""
    out = []
    for n, st in dims:
        if out and all(ps == s * n for ps, s in zip(out[-1][1], st)):
            out[-1][0] *= n
            out[-1][1] = list(st)
        else:
            out.append([n, list(st)])
    return out


def _pad(dims, k, nops):
    dims = [[1, [0] * nops] for _ in range(max(0, k - len(dims)))] + dims
    return dims[:-k] if len(dims) > k else [], dims[-k:]


# ------------------------------------------------------------------ rows: slices laid out as rows
MODE_EVAL, MODE_RMS, MODE_CENTER = 0, 1, 2
_ROW_CACHE_BYTES = 1 << 20    # a row of x and dy this small is differentiated while in cache


def _expand(p, positions, ndim):
    """Reshape an array laid out over axes ``positions`` to broadcast against ndim dims."""
    shape = [1] * ndim
    for ax, n in zip(positions, p.shape):
        shape[ax] = n
    return p.reshape(shape)


def _plan_rows(shape, row_axes, strides):
    """Canonical rows of x/dy/dx (byte strides), stats and params (element strides).

    Row dims (the statistics slice) and batch dims are each ordered by x's
    strides and merged where every operand allows.  Returns
    ``(rows, batch, outer)`` (2 row dims, 2 batch dims, outer loop dims, each
    ``[size, [5 strides]]``) or None when the slice needs more than 2 dims
    or its inner parameter stride is not 0 or 1.
    """
    xs = strides[0]
    key = (lambda a: -abs(xs[a]))
    rows = _merge([[shape[a], [s[a] for s in strides]] for a in sorted(row_axes, key=key)
                   if shape[a] != 1])
    if len(rows) > 2:
        return None
    _, rows = _pad(rows, 2, 5)
    if rows[1][1][4] not in (0, 1):
        return None
    batch_axes = sorted((a for a in range(len(shape)) if a not in row_axes), key=key)
    batch = _merge([[shape[a], [s[a] for s in strides]] for a in batch_axes if shape[a] != 1])
    outer, batch = _pad(batch, 2, 5)
    return rows, batch, outer


def _layout_params(w_full, b_full, xv):
    """Flat float64 parameter buffers laid out in x's memory order, their element strides
    against x, the offset of element 0, and the full-rank view (None, None: no parameters)."""
    if w_full is None and b_full is None:
        one, zero = np.ones(1), np.zeros(1)
        return one, zero, (0,) * xv.ndim, 0, None
    shape = np.broadcast_shapes(*(p.shape for p in (w_full, b_full) if p is not None))
    w_full = np.ones(shape) if w_full is None else np.broadcast_to(w_full, shape)
    b_full = np.zeros(shape) if b_full is None else np.broadcast_to(b_full, shape)
    order = layout_order(xv.shape, xv.strides)
    wf, bf = follow_order(w_full, order), follow_order(b_full, order)
    flat_w, flat_b = wf.ravel(order="K"), bf.ravel(order="K")
    strides = tuple(s // 8 for s in np.broadcast_to(wf, xv.shape).strides)
    return flat_w, flat_b, strides, _base_offset(wf, flat_w), wf


def _param_acc(R, K, P):
    """Zeroed partial parameter sums of rows_backward for R rows of K elements and P
    parameters: a shape-only split into tasks (partial sums << the work), each
    (2, Pp) with Pp padded so the two sums of a parameter are not 4 KiB apart."""
    Pp = P + 8 if (8 * P) % 4096 < 64 else P
    return np.zeros((max(1, min(R, 64, R * K // (16 * P))), 2, Pp))


def _rows_backward(xv, dyv, dxv, row_axes, mean_full, rstd_full, w_full, b_full, mode, refine,
                   act, backend, nt, *, fallback_copy=False, min_segment=1):
    """Write dx of slices laid out as rows; return the parameter sums (Σ gv*xhat, Σ gv) as
    arrays of w_full's shape (None when no parameters), or False when the layout does not fit.

    ``mean_full``/``rstd_full`` are float64, full rank, of size 1 on the row
    axes.  With ``fallback_copy`` a layout that does not fit is handled on
    (batch..., row...) contiguous copies instead (LayerNorm over > 2
    unmergeable axes).  Rows whose contiguous segments are shorter than
    ``min_segment`` do not fit either (GroupNorm channels last: segments of
    one group's channels; the per-cell path reads whole rows instead).
    """
    if min_segment > 1 and not fallback_copy and _short_segments(xv, row_axes, min_segment):
        return False   # decided before the buffers below are made (small calls: ~30 us)
    ndim = xv.ndim
    mflat = np.ascontiguousarray(mean_full, dtype=np.float64)
    rflat = np.ascontiguousarray(np.broadcast_to(rstd_full, mflat.shape), dtype=np.float64)
    sst = tuple(s // 8 for s in np.broadcast_to(mflat, xv.shape).strides)
    wv, bv, pst, p0, wf = _layout_params(w_full, b_full, xv)
    plan = _plan_rows(xv.shape, row_axes, [xv.strides, dyv.strides, dxv.strides, sst, pst])
    if plan is None:
        if not fallback_copy:
            return False
        batch_axes = [a for a in range(ndim) if a not in row_axes]
        perm = batch_axes + list(row_axes)
        tr = (lambda a: None if a is None else np.ascontiguousarray(a.transpose(perm)))
        xt, dyt = np.ascontiguousarray(xv.transpose(perm)), np.ascontiguousarray(dyv.transpose(perm))
        dxt = np.empty_like(xt)
        res = _rows_backward(xt, dyt, dxt, tuple(range(len(batch_axes), ndim)), tr(mean_full),
                             tr(rstd_full), tr(w_full), tr(b_full), mode, refine, act, backend, nt)
        dxv[...] = dxt.transpose(np.argsort(perm))
        inv = np.argsort(perm)
        return None if res is None else tuple(r.transpose(inv) for r in res)
    rows, batch, outer = plan
    if rows[1][0] < min_segment and rows[0][0] > 1 and not fallback_copy:
        return False
    want = wf is not None
    P = wv.size
    R = batch[0][0] * batch[1][0]
    K = rows[0][0] * rows[1][0]
    shape4 = (batch[0][0], batch[1][0], rows[0][0], rows[1][0])
    st = [(batch[0][1][k], batch[1][1][k], rows[0][1][k], rows[1][1][k]) for k in range(5)]
    mod = _kernels(backend)
    total = np.zeros(_param_acc(R, K, P).shape[1:]) if want else None
    for offs in outer_offsets([(d[0], *d[1]) for d in outer], 5):
        pacc = _param_acc(R, K, P) if want else None
        mod.rows_backward(xv, offs[0], dyv, offs[1], dxv, offs[2], shape4, st[0], st[1], st[2],
                          mflat.reshape(-1), rflat.reshape(-1), offs[3], st[3][:2], wv, bv,
                          p0 + offs[4], st[4], pacc, mode, refine, act, nt)
        if want:
            total += pacc.sum(axis=0)
    if not want:
        return None
    view = (lambda t: np.lib.stride_tricks.as_strided(t[p0:], wf.shape, wf.strides))
    return view(total[0, :P]).copy(), view(total[1, :P]).copy()


def _short_segments(xv, row_axes, min_segment):
    """Whether x's own layout splits a slice into several segments, or into two with the
    inner one shorter than ``min_segment``: the joint plan of all operands only splits
    further, so ``_rows_backward`` would not fit it."""
    xs = xv.strides
    dims = _merge([[xv.shape[a], [xs[a]]] for a in sorted(row_axes, key=lambda a: -abs(xs[a]))
                   if xv.shape[a] != 1])
    return len(dims) > 2 or (len(dims) == 2 and dims[1][0] < min_segment)


def _rows_fit(xv, row_axes):
    """Slices that are rows in memory (innermost x axis is in the slice, contiguous) and
    small enough to stay in cache, or many: the fused row kernel is the faster path."""
    inner = min(range(xv.ndim), key=lambda a: (xv.shape[a] == 1, abs(xv.strides[a])))
    if inner not in row_axes or abs(xv.strides[inner]) != xv.itemsize:
        return False
    K = math.prod(xv.shape[a] for a in row_axes)
    R = xv.size // max(K, 1)
    return 2 * K * xv.itemsize <= _ROW_CACHE_BYTES or R >= 64


# ------------------------------------------------------------------ cells: BatchNorm, GroupNorm, InstanceNorm
@functools.lru_cache(maxsize=512)
def _plan_cells(shape, xs, ds, kept, cstr):
    """A joint (O, R1, K, R0) view of x and dy (cells = kept positions) plus outer loops
    (cached: arguments are tuples, the result is immutable).

    Returns (xoff, dyoff, shape4, xstrides4, dystrides4, so, sk, outer) with
    outer = [(size, xstride, dystride, cell stride)], or None when empty.
    """
    xoff = dyoff = 0
    dims = []
    for a, n in enumerate(shape):
        if n == 0:
            return None
        if n == 1:
            continue
        red = a not in kept
        sx, sd = xs[a], ds[a]
        if red and sx < 0:  # flip reduced axes: the order of a sum does not matter
            xoff += (n - 1) * sx
            dyoff += (n - 1) * sd
            sx, sd = -sx, -sd
        dims.append([n, sx, sd, 0 if red else cstr[a], red])
    dims.sort(key=lambda d: -abs(d[1]) if d[1] != 0 else -np.inf)
    merged = []
    for d in dims:
        if merged:
            p = merged[-1]
            if (p[4] == d[4] and p[1] == d[1] * d[0] and p[2] == d[2] * d[0]
                    and (d[4] or p[3] == d[3] * d[0])):
                p[0] *= d[0]
                p[1], p[2], p[3] = d[1], d[2], d[3]
                continue
        merged.append(list(d))
    slots = {n: (1, 0, 0, 0) for n in ("O", "R1", "K", "R0")}
    order = ["R0", "K", "R1", "O"] if (merged and merged[-1][4]) else ["K", "R1", "O"]
    i = len(merged) - 1
    for name in order:
        if i < 0:
            break
        if merged[i][4] == name.startswith("R"):
            slots[name] = tuple(merged[i][:4])
            i -= 1
    outer = tuple(tuple(d[:4]) for d in merged[: i + 1])
    o, r1, k, r0 = (slots[n] for n in ("O", "R1", "K", "R0"))
    if r0[0] == 1 and k[0] == 1:  # a single cell per o: reduce R1 as the inner axis
        r1, r0 = (1, 0, 0, 0), r1
    return (xoff, dyoff, (o[0], r1[0], k[0], r0[0]), (o[1], r1[1], k[1], r0[1]),
            (o[2], r1[2], k[2], r0[2]), o[3], k[3], outer)


def _cell_sums(xv, dyv, kept, cells, act, want_dy, mod, nt):
    """Per-cell float64 (Σ((x - mh) - ml), Σ gv, Σ gv*xhat), shape kept_shape + (3,), by the
    kernel module ``mod``."""
    cshape = tuple(xv.shape[a] for a in kept)
    ncells = math.prod(cshape)
    cstr = [0] * xv.ndim
    acc = 1
    for a in reversed(kept):
        cstr[a] = acc
        acc *= xv.shape[a]
    plan = _plan_cells(xv.shape, xv.strides, dyv.strides, tuple(kept), tuple(cstr))
    if plan is None:
        return np.zeros(cshape + (3,))
    xoff, dyoff, sh, xs, ds, so, sk, outer = plan
    per = sh[1] * (sh[3] if sh[3] > 1 else sh[2])
    nchunks = max(1, min(sh[1], -(-per // _TASK_ELEMS), max(1, (1 << 22) // max(ncells, 1))))
    out = np.zeros((nchunks, ncells, 3))
    mh, ml, rs, w, b = (np.ascontiguousarray(c, dtype=np.float64).reshape(-1) for c in cells)
    for xo, do, co in outer_offsets(outer, 3):
        mod.cells_reduce(xv, xoff + xo, dyv, dyoff + do, sh, xs, ds, so, sk, co, mh, ml, rs, w,
                         b, out, act, want_dy, nt)
    return out.sum(axis=0).reshape(cshape + (3,))


def _dx_pass(xv, dyv, dxv, stats, params, act, mod, nt):
    """dx = ((w*gv - a) - xhat*bb) * rstd; stats = (mh, ml, rstd, a, bb), params = (w, b),
    each a float64 array of xv.ndim dims broadcastable to xv.shape (one shape per group)."""
    if xv.size == 0:
        return
    order = layout_order(dxv.shape, dxv.strides)
    stats = [follow_order(s, order) for s in stats]
    params = [follow_order(p, order) for p in params]
    ss, ps = element_strides(stats[0]), element_strides(params[0])
    plan = plan_elementwise(xv.shape, [xv.strides, dyv.strides, dxv.strides, ss, ps], order)
    # follow_order's arrays are dense with non-negative strides: their ravel(order="K") is a
    # view that starts at element 0 (offset 0 into the flat buffers)
    fs = [s.ravel(order="K") for s in stats]
    fp = [p.ravel(order="K") for p in params]
    for offs in plan.outer_offsets():
        mod.dx_4d(xv, offs[0], dyv, offs[1], dxv, offs[2], fs[0], fs[1], fs[2], fs[3], fs[4],
                  offs[3], fp[0], fp[1], offs[4], plan.shape, plan.strides[0],
                  plan.strides[1], plan.strides[2], plan.strides[3], plan.strides[4], act, nt)


def _cells_backward(xv, dyv, dxv, kept, mh, rs, w, b, act, slice_axes, param_axes, training,
                    refine, mod, nt):
    """BN/GN/IN gradients on a view whose cells are the ``kept`` positions (kernel module ``mod``).

    ``mh``, ``rs``, ``w``, ``b`` are float64 cell arrays (kept shape; w/b may be
    None); statistics slices are unions of cells along ``slice_axes`` of the
    cell array, parameters are summed along ``param_axes``.  Writes dxv and
    returns the per-parameter (Σ gv*xhat, Σ gv) cell sums.
    """
    cshape = mh.shape
    n = xv.size // max(1, math.prod(cshape)) * math.prod(cshape[a] for a in slice_axes)
    wc = np.ones(cshape) if w is None else w
    bc = np.zeros(cshape) if b is None else b
    ml = np.zeros(cshape)

    def slice_mean(c):
        m = c.sum(axis=slice_axes, keepdims=True) / n
        return m if m.shape == cshape else np.broadcast_to(m, cshape)

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if refine and act in _SMOOTH:  # the activation input needs the exact mean first
            ml = ml + slice_mean(_cell_sums(xv, dyv, kept, (mh, ml, rs, wc, bc), act, False,
                                            mod, nt)[..., 0])
        sums = _cell_sums(xv, dyv, kept, (mh, ml, rs, wc, bc), act, True, mod, nt)
        s1, s2 = sums[..., 1], sums[..., 2]
        if refine:  # Σ gv*(xhat - δ*rstd) = Σ gv*xhat - δ*rstd*Σ gv
            delta = slice_mean(sums[..., 0])
            s2 = s2 - delta * rs * s1
            ml = ml + delta
        if training:
            a = slice_mean(wc * s1)
            bb = slice_mean(wc * s2)
        else:
            a = bb = np.zeros(cshape)
    full = (lambda c: _expand(np.ascontiguousarray(c), kept, xv.ndim))
    _dx_pass(xv, dyv, dxv, [full(c) for c in (mh, ml, rs, a, bb)], [full(wc), full(bc)], act,
             mod, nt)
    return s2.sum(axis=param_axes), s1.sum(axis=param_axes)


# ------------------------------------------------------------------ the driver
def _run(xv, dyv, dxv, row_axes, mean_full, rstd_full, w_full, b_full, mode, refine, act,
         backend, nt, cells=None):
    """dx of every layer into ``dxv``; returns the parameter sums (Σ gv*xhat, Σ gv) with the
    shape of ``w_full``/``b_full`` (full rank, keepdims), or (None, None).

    ``row_axes`` are the axes of one statistics slice; ``mean_full`` and
    ``rstd_full`` float64 with size 1 there.  ``cells`` (batch/group/instance
    norm) runs the per-cell path when the slices are not rows in memory;
    without it (layer/RMS norm) such layouts go through contiguous copies.
    """
    pshape = None
    if w_full is not None or b_full is not None:
        pshape = np.broadcast_shapes(*(p.shape for p in (w_full, b_full) if p is not None))
    if xv.size == 0:
        return (None, None) if pshape is None else (np.zeros(pshape), np.zeros(pshape))
    if backend == "numpy":
        paxes = tuple(range(xv.ndim)) if pshape is None else tuple(
            a for a in range(xv.ndim) if pshape[a] == 1)
        d, pw, pb = _numpy_backward(xv, dyv, mean_full, rstd_full, w_full, b_full, act, row_axes,
                                    paxes, mode, refine)
        dxv[...] = d
        return (None, None) if pshape is None else (pw, pb)
    if cells is None or _rows_fit(xv, row_axes):
        res = _rows_backward(xv, dyv, dxv, row_axes, mean_full, rstd_full, w_full, b_full, mode,
                             refine, act, backend, nt, fallback_copy=cells is None,
                             min_segment=1 if cells is None else 64)
        if res is not False:
            return (None, None) if res is None else res
    return cells()


def _affine(w, b, positions, ndim):
    return tuple(None if p is None else _expand(p, positions, ndim) for p in (w, b))


# ------------------------------------------------------------------ small-call fast path
_NATIVE_F = (np.dtype(np.float16), np.dtype(np.float32), _F64)


def _small_stat(a, shapes):
    """A saved statistic the small paths take as it is: C-contiguous float64 of one of
    ``shapes`` (the shapes the general path accepts)."""
    return (type(a) is np.ndarray and a.dtype == _F64 and a.flags.c_contiguous
            and a.shape in shapes)


def _small_param(p, L):
    return p is None or (type(p) is np.ndarray and p.dtype in _NATIVE_F and p.shape == (L,))


def _small_grad(g, p):
    """A parameter gradient (a new array) in the parameter's dtype (as _grad), None
    without it."""
    return None if p is None else (g.copy() if p.dtype == _F64 else g.astype(p.dtype))


def _small_grad_f64(g, p):
    """A float64 parameter gradient of the C entry in the parameter's dtype."""
    return g if g is None or p.dtype == _F64 else g.astype(p.dtype)


_CHANNEL_KINDS = {"batch": 0, "instance": 1, "group": 2}


def _small_entry(name, x, weight, bias, backend, num_threads, *args):
    """The C entry ``name`` (``rows_backward_contig``, ``channel_backward_contig``) of the
    Cython kernels on ``(x, *args)`` where ``small_call_allowed``: ``(dx, dweight,
    dbias)`` with the gradients in their parameters' dtypes, or None when there is no
    such entry (the Numba backend and the rest) or it declines the call (the Python
    small path or the general path then runs)."""
    if not _config.small_call_allowed(backend, num_threads) or type(x) is not np.ndarray:
        return None
    entry = getattr(_kernels("cython"), name, None)
    res = None if entry is None else _config.run_entry(entry, x, num_threads, *args)
    return None if res is None else (res[0], _small_grad_f64(res[1], weight),
                                     _small_grad_f64(res[2], bias))


def _small_kernels(backend, num_threads):
    """The kernel module of a small call: the Cython one where ``small_call_allowed``,
    the Numba one for ``backend="numba"`` (with a valid thread count: small calls run
    serially, results never depend on threads), else None."""
    if _config.small_call_allowed(backend, num_threads):
        return _config.family("_backward")
    if (type(backend) is str and backend == "numba" and _config.small_threads_allowed(num_threads)
            and _config.have_numba()):
        return _kernels("numba")
    return None


def _small_arrays(dy, x, axis, activation, out, backend, num_threads, min_ndim):
    """The kernel module (``_small_kernels``) when a backward call may take a small
    path, else None: C-contiguous, aligned, non-empty x and dy of one float dtype and
    shape, an int axis, no activation, ``out`` None or one ``_small_out`` takes.  Any
    size: "small" is the Python these paths skip (planning, validation), not the
    array; large arrays run with the thread count the general path would take
    (``_config.run_entry``)."""
    if not (activation is None and type(axis) is int
            and type(x) is np.ndarray and type(dy) is np.ndarray and x.dtype in _NATIVE_F
            and dy.dtype == x.dtype and x.shape == dy.shape and x.ndim >= min_ndim
            and 0 < x.size and x.flags.c_contiguous and dy.flags.c_contiguous
            and x.flags.aligned and dy.flags.aligned and _small_out(out, x, dy)):
        return None
    return _small_kernels(backend, num_threads)


def _small_out(out, x, dy):
    """Whether a small path may write dx into ``out``: None (a new array), or a
    writeable, aligned, C-contiguous ndarray of x's dtype and shape that is the x or
    dy object itself (the kernels read each element before they write its gradient) or
    shares no memory with them.  Anything else (another view of x, say) goes to the
    general path, which refuses what it must (``_dx_array``) and converts what it
    may."""
    if out is None:
        return True
    if out is x or out is dy:
        return out.flags.writeable
    return (type(out) is np.ndarray and out.dtype == x.dtype and out.shape == x.shape
            and out.flags.c_contiguous and out.flags.aligned and out.flags.writeable
            and not np.may_share_memory(out, x) and not np.may_share_memory(out, dy))


def _small_kernel(mod, x, dy, row_dims, batch_dims, mean, rstd, wv, bv, want, mode, refine,
                  weight, bias, num_threads, out, min_segment=1):
    """The rows kernel of ``mod`` on x/dy with the rows and batch dims of the general path
    (``[size, [x, dy, dx, stat, param element strides]]``, outermost first; size-1
    dims are dropped, the rest merged and padded as ``_plan_rows`` does); returns
    ``(dx, dweight, dbias)``, dx written into ``out`` when given, or None when the
    general path would not take the rows kernel for this layout (``_rows_fit`` and
    ``min_segment`` of ``_rows_backward``)."""
    plan = _small_rows_plan(_dims_key(row_dims), _dims_key(batch_dims), x.size, x.itemsize,
                            min_segment)
    if plan is None:
        return None
    shape4, st, R, K = plan
    pacc = _param_acc(R, K, wv.size) if want else None
    dx = np.empty_like(x) if out is None else out
    _config.run_entry(mod.rows_backward, x, num_threads, 0, dy, 0, dx, 0, shape4, st[0], st[1],
                      st[2], mean.reshape(-1), rstd.reshape(-1), 0, st[3][:2], wv, bv, 0, st[4],
                      pacc, mode, refine, 0)
    if not want:
        return dx, None, None
    total = pacc.sum(axis=0)
    total += 0.0   # the general path's zeros + sum, the same bits (a -0.0 sum becomes +0.0)
    P = wv.size
    return dx, _small_grad(total[0, :P], weight), _small_grad(total[1, :P], bias)


def _dims_key(dims):
    """``[[size, [strides]], ...]`` as nested tuples (a cache key)."""
    return tuple((n, tuple(st)) for n, st in dims)


@functools.lru_cache(maxsize=512)
def _small_rows_plan(row_dims, batch_dims, size, item, min_segment):
    """``(shape4, strides per operand, R, K)`` of the rows kernel for ``_small_kernel``
    (cached: a training loop repeats its shapes), or None where the general path
    would not take the rows kernel."""
    live = (lambda dims: [[n, list(st)] for n, st in dims if n != 1])
    _, rows = _pad(_merge(live(row_dims)), 2, 5)
    _, batch = _pad(_merge(live(batch_dims)), 2, 5)
    if rows[1][0] < min_segment and rows[0][0] > 1:
        return None
    K = rows[0][0] * rows[1][0]
    R = size // K
    if not (2 * K * item <= _ROW_CACHE_BYTES or R >= 64):
        return None
    st = tuple(tuple(d[1][k] * (item if k < 3 else 1) for d in batch + rows) for k in range(5))
    return (batch[0][0], batch[1][0], rows[0][0], rows[1][0]), st, R, K


def _small_params(weight, bias, n):
    """(w, b, want) for the rows kernel: float64 vectors of n (ones / zeros for a missing
    one) when a parameter is given, else the one-element placeholders."""
    if weight is None and bias is None:
        return np.ones(1), np.zeros(1), False
    wv = np.ones(n) if weight is None else np.ascontiguousarray(weight, dtype=_F64)
    bv = np.zeros(n) if bias is None else np.ascontiguousarray(bias, dtype=_F64)
    return wv, bv, True


def _small_rows_backward(dy, x, mean, rstd, weight, bias, axis, activation, out, backend,
                         num_threads, mode):
    """The common small call of layer_norm_backward / rms_norm_backward (C-contiguous
    x and dy of one float dtype, last axis, float64 statistics, no activation, ``out``
    None or an array ``_small_out`` takes; float parameters of the last axis' length) straight to
    the rows kernel with the plan the general path makes for it, skipping the
    planning; None when it does not apply.  Same kernel, same arguments, so bitwise
    the same results (tested)."""
    if activation is None and type(axis) is int and axis == -1:
        res = _small_entry("rows_backward_contig", x, weight, bias, backend, num_threads, dy,
                           mean, rstd, weight, bias, out, mode)
        if res is not None:
            return res
    mod = _small_arrays(dy, x, axis, activation, out, backend, num_threads, 1)
    if mod is None or axis != -1:
        return None
    L = x.shape[-1]
    R = x.size // L
    shapes = (x.shape[:-1] + (1,), x.shape[:-1])
    if not (_small_stat(rstd, shapes) and (mode == MODE_RMS or _small_stat(mean, shapes))
            and _small_param(weight, L) and _small_param(bias, L)):
        return None
    wv, bv, want = _small_params(weight, bias, L)
    pe = 1 if want else 0
    m = np.zeros(R) if mode == MODE_RMS else mean
    return _small_kernel(mod, x, dy, [[L, [1, 1, 1, 0, pe]]], [[R, [L, L, L, 1, 0]]], m, rstd, wv,
                         bv, want, mode, x.dtype == _F64 and mode != MODE_RMS, weight, bias,
                         num_threads, out)


def _small_batch_cells(mod, x, dy, mean, rstd, weight, bias, training, num_threads, out):
    """A small batch norm backward the rows kernel declines ((N, C) input, or segments
    of H*W shorter than 64): the general path's per-cell pass, planned and run in C
    (``batch_cells_backward`` of the Cython kernels; the Numba backend: the per-cell
    pass called directly)."""
    C = x.shape[1]
    param = (lambda p: None if p is None else np.ascontiguousarray(p, dtype=_F64))
    dx = np.empty_like(x) if out is None else out
    mh, rs, w, b = mean.reshape(C), rstd.reshape(C), param(weight), param(bias)
    refine = training and x.dtype == _F64
    if hasattr(mod, "batch_cells_backward"):
        pw, pb = _config.run_entry(mod.batch_cells_backward, x, num_threads, dy, dx, mh, rs, w, b,
                                   training, refine)
    else:
        pw, pb = _config.run_entry(
            lambda xx, nt: _cells_backward(xx, dy, dx, (1,), mh, rs, w, b, ACTIVATIONS[None], (),
                                           (), training, refine, mod, nt),
            x, num_threads)
    return dx, _small_grad(pw, weight), _small_grad(pb, bias)


def _small_channel_backward(kind, dy, x, mean, rstd, weight, bias, groups, training, axis,
                            activation, out, backend, num_threads):
    """The common small call of batch / instance / group norm backward (``kind``
    "batch", "instance", "group") on NCHW data (C-contiguous x and dy with spatial
    axes, float64 statistics, float parameters of C, ``out`` as ``_small_out`` takes it,
    defaults otherwise) straight to
    the rows kernel with the plan the general path makes; None when it does not
    apply (the general path then runs, or takes the per-cell kernels for this
    layout).  Bitwise the general path's results (tested)."""
    if (activation is None and type(axis) is int and axis == 1 and type(training) is bool
            and (kind != "group" or type(groups) is int)):
        res = _small_entry("channel_backward_contig", x, weight, bias, backend, num_threads,
                           dy, mean, rstd, weight, bias, out, _CHANNEL_KINDS[kind], groups or 0,
                           training)
        if res is not None:
            return res
    mod = _small_arrays(dy, x, axis, activation, out, backend, num_threads,
                        2 if kind == "batch" else 3)
    if mod is None or axis != 1 or type(training) is not bool:
        return None
    N, C = x.shape[0], x.shape[1]
    HW = x.size // (N * C)
    G = groups if kind == "group" else C
    if ((HW == 1 and kind != "batch") or not _small_param(weight, C) or not _small_param(bias, C)
            or type(G) is not int or G <= 0 or C % G):
        return None
    spatial = (1,) * (x.ndim - 2)
    shapes = {"batch": ((C,), (1, C) + spatial), "instance": ((N, C), (N, C) + spatial),
              "group": ((N, G),)}[kind]
    if not (_small_stat(mean, shapes) and _small_stat(rstd, shapes)):
        return None
    wv, bv, want = _small_params(weight, bias, C)
    pe = 1 if want else 0
    if kind == "batch":   # slice = channel (N segments of HW), parameter per channel
        rows = None if HW == 1 else _small_kernel(
            mod, x, dy, [[N, [C * HW] * 3 + [0, 0]], [HW, [1, 1, 1, 0, 0]]],
            [[C, [HW] * 3 + [1, pe]]], mean, rstd, wv, bv, want,
            MODE_CENTER if training else MODE_EVAL, training and x.dtype == _F64, weight, bias,
            num_threads, out, min_segment=64)
        return rows if rows is not None else _small_batch_cells(mod, x, dy, mean, rstd, weight,
                                                                bias, training, num_threads, out)
    Cg = C // G           # slice = (sample, group): Cg segments of HW, parameter per segment
    return _small_kernel(mod, x, dy, [[Cg, [HW] * 3 + [0, pe]], [HW, [1, 1, 1, 0, 0]]],
                         [[N, [C * HW] * 3 + [G, 0]], [G, [Cg * HW] * 3 + [1, Cg * pe]]],
                         mean, rstd, wv, bv, want, MODE_CENTER, x.dtype == _F64, weight, bias,
                         num_threads, out, min_segment=64)


# ------------------------------------------------------------------ public API
def layer_norm_backward(dy, x, mean, rstd, weight=None, bias=None, *, axis=-1, activation=None,
                        out=None, backend="auto", num_threads=None):
    """Gradients of :func:`cnorm.layer_norm`.

    Parameters
    ----------
    dy : array_like
        Gradient of the output, shape and dtype of ``x``.
    x : array_like
        The forward input.
    mean, rstd : array_like
        What ``layer_norm(x, ..., return_stats=True)`` returned (keepdims
        shapes; the shape without the normalized axes is accepted too).
    weight, bias : array_like, optional
        The forward's parameters (``bias`` is needed only to recompute a
        fused activation's input).
    axis, activation
        As given to the forward.
    out : ndarray, optional
        Written with ``dx`` (x's shape and dtype) instead of a new array; it
        may be ``dy`` or ``x`` itself (each element is read before its
        gradient is written), no other overlap with them.
    backend, num_threads
        See :func:`cnorm.moments`.

    Returns
    -------
    (dx, dweight, dbias)
        ``dx`` in x's dtype; ``dweight``/``dbias`` in the dtype of their
        parameter, ``None`` for a parameter not given.

    Notes
    -----
    ``dx = ((w*gv - mean(w*gv)) - xhat*mean(w*gv*xhat)) * rstd`` with
    ``gv = dy * act'(v)``; centred sums accumulated in float64 (any dtype),
    the float64 mean refined by the exact residual ``mean(x - mean)``.  Each
    row is reduced and differentiated while it is in cache.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> x = np.array([[1., 2., 4.]])
    >>> y, m, r = cnorm.layer_norm(x, eps=0.0, return_stats=True)
    >>> dx, dw, db = cnorm.layer_norm_backward(np.array([[1., 0., 0.]]), x, m, r)
    >>> np.round(dx, 6)
    array([[ 0.229081, -0.343622,  0.114541]])
    >>> dw is None and db is None
    True
    """
    small = _small_rows_backward(dy, x, mean, rstd, weight, bias, axis, activation, out, backend,
                                 num_threads, MODE_CENTER)
    if small is not None:
        return small
    fn = "layer_norm_backward"
    xa, rdt, dya, act, backend = _inputs(dy, x, fn, backend, num_threads, activation)
    axes = normalize_axes(axis, xa.ndim)
    keep = tuple(1 if i in axes else s for i, s in enumerate(xa.shape))
    kept = tuple(s for i, s in enumerate(xa.shape) if i not in axes)
    mean_k = _stat(mean, "mean", (keep, kept), fn, "layer_norm")
    rstd_k = _stat(rstd, "rstd", (keep, kept), fn, "layer_norm")
    pshape = tuple(xa.shape[a] for a in axes)
    w, wdt = _param(weight, pshape, "weight", fn)
    b, bdt = _param(bias, pshape, "bias", fn)
    dx = _dx_array(out, xa, dya, rdt, fn)
    with _config.call_slot(num_threads) as nt:
        pw, pb = _run(xa, dya, dx, axes, mean_k, rstd_k, *_affine(w, b, axes, xa.ndim), MODE_CENTER,
                      xa.dtype == _F64, act, backend, nt)
    flat = (lambda p: None if p is None else p.reshape(pshape))
    return _finish_dx(dx, rdt, out), _grad(flat(pw), wdt), _grad(flat(pb), bdt)


def rms_norm_backward(dy, x, rstd, weight=None, *, axis=-1, activation=None, out=None,
                      backend="auto", num_threads=None):
    """Gradients of :func:`cnorm.rms_norm`: ``(dx, dweight)``.

    ``dx = (w*gv - xhat*mean(w*gv*xhat)) * rstd`` with ``xhat = x * rstd``;
    ``dweight = Σ gv*xhat`` over the batch axes (``None`` without weight).
    Arguments as in :func:`layer_norm_backward`.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> x = np.array([[3., 4.]])
    >>> y, r = cnorm.rms_norm(x, eps=0.0, return_stats=True)
    >>> dx, dw = cnorm.rms_norm_backward(np.array([[1., 0.]]), x, r)
    >>> np.round(dx, 6)
    array([[ 0.181019, -0.135765]])
    """
    small = _small_rows_backward(dy, x, None, rstd, weight, None, axis, activation, out, backend,
                                 num_threads, MODE_RMS)
    if small is not None:
        return small[:2]
    fn = "rms_norm_backward"
    xa, rdt, dya, act, backend = _inputs(dy, x, fn, backend, num_threads, activation)
    axes = normalize_axes(axis, xa.ndim)
    keep = tuple(1 if i in axes else s for i, s in enumerate(xa.shape))
    kept = tuple(s for i, s in enumerate(xa.shape) if i not in axes)
    rstd_k = _stat(rstd, "rstd", (keep, kept), fn, "rms_norm")
    pshape = tuple(xa.shape[a] for a in axes)
    w, wdt = _param(weight, pshape, "weight", fn)
    dx = _dx_array(out, xa, dya, rdt, fn)
    with _config.call_slot(num_threads) as nt:
        pw, _ = _run(xa, dya, dx, axes, np.zeros(keep), rstd_k, *_affine(w, None, axes, xa.ndim),
                     MODE_RMS, False, act, backend, nt)
    return _finish_dx(dx, rdt, out), _grad(None if pw is None else pw.reshape(pshape), wdt)


def _check_training(training, fn):
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"{fn}: training must be True or False, got {training!r}")
    return bool(training)


def _channel_layer(xv, dyv, dxv, kept, mh_cells, rs_cells, w_cells, b_cells, slice_axes,
                   param_axes, mode, refine, act, backend, nt):
    """BN/GN/IN on a view whose cells are the ``kept`` positions (see _cells_backward);
    the parameter sums come back as cell-shaped arrays summed over ``param_axes``."""
    ndim = xv.ndim
    row_axes = tuple(a for a in range(ndim) if a not in kept) + tuple(kept[a] for a in slice_axes)

    def first(c, axes):  # one value per slice / per parameter (constant along ``axes``)
        if c is None:
            return None
        for a in axes:
            c = np.take(c, [0], axis=a)
        return _expand(c, kept, ndim)

    mean_full, rstd_full = first(mh_cells, slice_axes), first(rs_cells, slice_axes)
    w_full, b_full = first(w_cells, param_axes), first(b_cells, param_axes)

    def cells():
        pw, pb = _cells_backward(xv, dyv, dxv, kept, mh_cells, rs_cells, w_cells, b_cells, act,
                                 slice_axes, param_axes, mode == MODE_CENTER, refine, _kernels(backend),
                                 nt)
        return (_expand(np.expand_dims(pw, param_axes), kept, ndim),
                _expand(np.expand_dims(pb, param_axes), kept, ndim))

    pw, pb = _run(xv, dyv, dxv, row_axes, mean_full, rstd_full, w_full, b_full, mode, refine, act,
                  backend, nt, cells=cells)
    return pw, pb


def batch_norm_backward(dy, x, mean, rstd, weight=None, bias=None, *, axis=1, training=True,
                        activation=None, out=None, backend="auto", num_threads=None):
    """Gradients of :func:`cnorm.batch_norm`: ``(dx, dweight, dbias)``.

    ``mean``/``rstd`` are what the forward returned with ``return_stats=True``
    (shape ``(C,)`` is accepted too); in eval mode (``training=False``) those
    are the running statistics, constants: ``dx = w*gv*rstd``.  In training
    mode ``dx = ((w*gv - a) - xhat*bb) * rstd`` with per-channel means ``a``,
    ``bb`` over every other axis.  Arguments as in :func:`layer_norm_backward`.

    Notes
    -----
    NCHW: each channel (N segments of H*W) is reduced and differentiated
    while in cache by the row kernel.  Channels last: per-cell centred float64
    sums over whole rows of channels, then one elementwise pass for ``dx``.
    """
    small = _small_channel_backward("batch", dy, x, mean, rstd, weight, bias, None, training, axis,
                                    activation, out, backend, num_threads)
    if small is not None:
        return small
    fn = "batch_norm_backward"
    xa, rdt, dya, act, backend = _inputs(dy, x, fn, backend, num_threads, activation)
    training = _check_training(training, fn)
    c_ax = _channel_axis(axis, xa.ndim, fn)
    C = xa.shape[c_ax]
    keep = tuple(C if i == c_ax else 1 for i in range(xa.ndim))
    mh = _stat(mean, "mean", (keep, (C,)), fn, "batch_norm").reshape(C)
    rs = _stat(rstd, "rstd", (keep, (C,)), fn, "batch_norm").reshape(C)
    w, wdt = _param(weight, (C,), "weight", fn)
    b, bdt = _param(bias, (C,), "bias", fn)
    dx = _dx_array(out, xa, dya, rdt, fn)
    with _config.call_slot(num_threads) as nt:
        pw, pb = _channel_layer(xa, dya, dx, (c_ax,), mh, rs, w, b, (), (),
                                MODE_CENTER if training else MODE_EVAL,
                                training and xa.dtype == _F64, act, backend, nt)
    flat = (lambda p: None if p is None else p.reshape(C))
    return _finish_dx(dx, rdt, out), _grad(flat(pw), wdt), _grad(flat(pb), bdt)


def instance_norm_backward(dy, x, mean, rstd, weight=None, bias=None, *, axis=1, activation=None,
                           out=None, backend="auto", num_threads=None):
    """Gradients of :func:`cnorm.instance_norm` with instance statistics.

    ``mean``/``rstd`` have shape ``(N, C, 1, ...)`` (``(N, C)`` accepted).
    Returns ``(dx, dweight, dbias)``; the parameter sums run over the batch
    and every spatial axis.  (For the eval mode with running statistics the
    statistics are constants: use ``batch_norm_backward(..., training=False)``
    with the running statistics.)
    """
    small = _small_channel_backward("instance", dy, x, mean, rstd, weight, bias, None, True, axis,
                                    activation, out, backend, num_threads)
    if small is not None:
        return small
    fn = "instance_norm_backward"
    xa, rdt, dya, act, backend = _inputs(dy, x, fn, backend, num_threads, activation)
    c_ax = _channel_axis(axis, xa.ndim, fn, batch_first=True)
    N, C = xa.shape[0], xa.shape[c_ax]
    keep = tuple(xa.shape[i] if i in (0, c_ax) else 1 for i in range(xa.ndim))
    mh = _stat(mean, "mean", (keep, (N, C)), fn, "instance_norm").reshape(N, C)
    rs = _stat(rstd, "rstd", (keep, (N, C)), fn, "instance_norm").reshape(N, C)
    w, wdt = _param(weight, (C,), "weight", fn)
    b, bdt = _param(bias, (C,), "bias", fn)
    bc = (lambda p: None if p is None else np.ascontiguousarray(np.broadcast_to(p, (N, C))))
    dx = _dx_array(out, xa, dya, rdt, fn)
    with _config.call_slot(num_threads) as nt:
        pw, pb = _channel_layer(xa, dya, dx, (0, c_ax), mh, rs, bc(w), bc(b), (), (0,),
                                MODE_CENTER, xa.dtype == _F64, act, backend, nt)
    flat = (lambda p: None if p is None else p.reshape(C))
    return _finish_dx(dx, rdt, out), _grad(flat(pw), wdt), _grad(flat(pb), bdt)


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, bias=None, *, axis=1,
                        activation=None, out=None, backend="auto", num_threads=None):
    """Gradients of :func:`cnorm.group_norm`: ``(dx, dweight, dbias)``.

    ``mean``/``rstd`` have shape ``(N, num_groups)`` as the forward returns
    them.  NCHW: each (sample, group) is reduced and differentiated while in
    cache by the row kernel (one parameter per channel segment); channels
    last: per-(sample, channel) centred sums combined per group and per
    channel, then one elementwise pass.
    """
    small = _small_channel_backward("group", dy, x, mean, rstd, weight, bias, num_groups, True,
                                    axis, activation, out, backend, num_threads)
    if small is not None:
        return small
    fn = "group_norm_backward"
    xa, rdt, dya, act, backend = _inputs(dy, x, fn, backend, num_threads, activation)
    c_ax = _channel_axis(axis, xa.ndim, fn, batch_first=True)
    N, C = xa.shape[0], xa.shape[c_ax]
    G = check_num_groups(num_groups, C, c_ax, fn)
    Cg = C // G
    mh = _stat(mean, "mean", ((N, G),), fn, "group_norm")
    rs = _stat(rstd, "rstd", ((N, G),), fn, "group_norm")
    w, wdt = _param(weight, (C,), "weight", fn)
    b, bdt = _param(bias, (C,), "bias", fn)
    dx = _dx_array(out, xa, dya, rdt, fn)

    def split(a):
        shape = a.shape[:c_ax] + (G, Cg) + a.shape[c_ax + 1:]
        strides = a.strides[:c_ax] + (a.strides[c_ax] * Cg, a.strides[c_ax]) + a.strides[c_ax + 1:]
        return np.lib.stride_tricks.as_strided(a, shape, strides, writeable=a is dx)

    cells = (lambda s: np.ascontiguousarray(np.broadcast_to(s[:, :, None], (N, G, Cg))))
    bc = (lambda p: None if p is None else np.ascontiguousarray(
        np.broadcast_to(p.reshape(1, G, Cg), (N, G, Cg))))
    with _config.call_slot(num_threads) as nt:
        pw, pb = _channel_layer(split(xa), split(dya), split(dx), (0, c_ax, c_ax + 1), cells(mh),
                                cells(rs), bc(w), bc(b), (2,), (0,), MODE_CENTER,
                                xa.dtype == _F64, act, backend, nt)
    flat = (lambda p: None if p is None else p.reshape(C))
    return _finish_dx(dx, rdt, out), _grad(flat(pw), wdt), _grad(flat(pb), bdt)

"""Public moments API: ``moments``, ``mean``, ``var``, ``std``.

All four share one engine (:mod:`cnorm._engine`): a pass over the data that
builds mergeable ``(n, mean, M2)`` states per output position, then a
finalization.  See :func:`moments` for the algorithm and precision.
"""
from __future__ import annotations

import numpy as np

from . import _config, _engine
from ._axes import normalize_axes
from ._validate import (BFLOAT16, as_float_array, check_bool, check_dtype_arg, check_out,
                        check_real)

__all__ = ["moments", "mean", "var", "std"]


def _prepare_weights(weights, x, fn):
    w = np.asarray(weights)
    if BFLOAT16 is not None and w.dtype == BFLOAT16:
        w = w.astype(np.float32)
    if w.dtype.kind not in "biuf":
        raise TypeError(f"{fn}: weights must be a real array, got dtype {w.dtype}")
    try:
        w = np.broadcast_to(w, x.shape)
    except ValueError:
        raise ValueError(f"{fn}: weights of shape {np.shape(weights)} do not broadcast to "
                         f"x of shape {x.shape}") from None
    w = w.astype(np.float64, copy=False)
    if np.isnan(w).any():
        raise ValueError(f"{fn}: weights contain NaN")
    if (w < 0).any():
        raise ValueError(f"{fn}: weights must be non-negative, got a minimum of {w.min()!r}")
    if np.isinf(w).any():
        raise ValueError(f"{fn}: weights must be finite")
    return w


def _weighted_states(x, w, axes, skipna):
    """States of weighted (and/or NaN-skipping) moments, float64 compensated.

    Weighted sums use the corrected two-pass formula with float64 (float16,
    float32) or double-double (float64) accumulation of ``w*(x - c)`` and
    ``w*(x - c)**2`` via the numpy reference's exact sums.
    """
    from ._reference import acc_sum, dd_add, dd_div, dd_sq, two_prod, two_sum
    xd = np.asarray(x, dtype=np.float64)
    if w is None:
        w = np.ones(x.shape)
    if skipna:
        nan = np.isnan(xd)
        w = np.where(nan, 0.0, w)
        xd = np.where(nan, 0.0, xd)
    kept_shape = tuple(s for i, s in enumerate(x.shape) if i not in axes)
    W, Wl = acc_sum(w, axes) if x.size else (np.zeros(kept_shape), np.zeros(kept_shape))
    out = np.zeros(kept_shape + (5,))
    if x.size == 0:
        return out
    finite = np.all(np.isfinite(xd) | (w == 0), axis=axes)
    safe = np.where(np.isfinite(xd), xd, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ph, pl = two_prod(w, safe)
        sh, sl = acc_sum(ph, axes)
        sh, sl = dd_add(sh, sl, *acc_sum(pl, axes))
        c = np.where(W > 0, sh / np.where(W > 0, W, 1.0), 0.0)
        dh, dl = two_sum(safe, -np.expand_dims(c, axes))
        t1h, t1l = two_prod(w, dh)
        s1h, s1l = acc_sum(t1h, axes)
        s1h, s1l = dd_add(s1h, s1l, *acc_sum(t1l + w * dl, axes))
        qh, ql = two_prod(dh, dh)
        ql = ql + 2.0 * dh * dl
        t2h, t2l = two_prod(w, qh)
        s2h, s2l = acc_sum(t2h, axes)
        s2h, s2l = dd_add(s2h, s2l, *acc_sum(t2l + w * ql, axes))
        Wd = np.where(W > 0, W, 1.0)
        mh, ml = dd_div(s1h, s1l, Wd)
        mh, ml = dd_add(c, np.zeros_like(c), mh, ml)
        th, tl = dd_sq(s1h, s1l)
        th, tl = dd_div(th, tl, Wd)
        m2h, m2l = dd_add(s2h, s2l, -th, -tl)
        m2h = np.maximum(m2h, 0.0)
        plain = np.sum(w * xd, axis=axes) / Wd
    out[..., 0] = W + Wl
    out[..., 1] = np.where(finite, mh, plain)
    out[..., 2] = np.where(finite, ml, 0.0)
    out[..., 3] = np.where(finite, m2h, np.nan)
    out[..., 4] = np.where(finite & (m2h > 0), m2l, 0.0)
    return out


def moment_states(x, axis=None, *, weights=None, skipna=False, backend="auto",
                  num_threads=None, fn="moments"):
    """Validated states (``kept_shape + (5,)``) of x over ``axis``; internal helper.

    Returns ``(states, axes, xa, result_dtype)``.
    """
    xa, rdt = as_float_array(x, "x", fn)
    axes = normalize_axes(axis, xa.ndim)
    skipna = check_bool(skipna, "skipna", fn)
    backend = _config.resolve_backend(backend)
    with _config.call_slot(num_threads) as nthreads:
        if weights is not None or skipna:
            w = None if weights is None else _prepare_weights(weights, xa, fn)
            states = _weighted_states(xa, w, axes, skipna)
        else:
            states = _engine.reduce_states(xa, axes, backend=backend, nthreads=nthreads)
    return states, axes, xa, rdt


def _shape_out(arr, axes, ndim, keepdims):
    if keepdims:
        return np.expand_dims(arr, axes) if axes else arr
    return arr


def _small_moments(x, axis, ddof, backend, num_threads, float64_out=False):
    """Float64 (mean, var) from the kernel entry for C-contiguous arrays
    (``moments_contig``) for the common call -- a C-contiguous float array,
    axes whose reduction plans without outer loops, default arguments -- or
    None (the general path then runs).  It skips the Python planning, which
    costs more than the kernel for small arrays; the result is bitwise the
    general path's.  Arrays too small for threads skip the thread bookkeeping
    too."""
    if (_config.small_call_allowed(backend, num_threads)
            and (type(ddof) is int or type(ddof) is float)):
        return _config.run_entry(_config.kernels.moments_contig, x, num_threads, axis, ddof,
                                 float64_out)
    return None


def _small_result(arr, dtype):
    """A result of the small path (float32 for float32 input, else float64) in the
    result dtype (scalar when 0-d)."""
    if arr.dtype == dtype:
        return arr if arr.ndim else arr[()]
    return _cast(arr, dtype)


def _cast(arr, dtype):
    a = np.asarray(arr, dtype=np.float64)
    with np.errstate(over="ignore"):
        out = a.astype(dtype)
    return out if out.ndim else out[()]


def moments(x, axis=None, *, ddof=0, weights=None, skipna=False, keepdims=False, dtype=None,
            backend="auto", num_threads=None):
    """Mean and variance of ``x`` over ``axis`` in one pass, accurately.

    Parameters
    ----------
    x : array_like
        float16, float32 or float64 (kept as the result dtype); integers and
        bools compute in float64.  Any strides; nothing is copied.
    axis : None, int or tuple of int
        Axes to reduce (NumPy semantics; ``None`` = all).
    ddof : float
        Delta degrees of freedom: ``var = M2 / (n - ddof)`` (``Σw - ddof``
        with weights).
    weights : array_like, optional
        Non-negative frequency weights broadcastable to ``x``:
        ``mean = Σwx/Σw``, ``var = Σw(x-mean)²/(Σw - ddof)``.
    skipna : bool
        Ignore NaNs (like ``np.nanmean``/``np.nanvar``).
    keepdims : bool
        Keep reduced axes with length one.
    dtype : dtype, optional
        Result dtype (float16/32/64); accumulation is float64 or better anyway.
    backend : {'auto', 'cython', 'numba', 'numpy'}
    num_threads : int, optional
        Threads (default: :func:`cnorm.get_num_threads`); results do not depend on it.

    Returns
    -------
    mean, var : ndarray or scalar

    Notes
    -----
    Each slice is cut into blocks that are read twice while cached (pilot mean,
    then centred sums); blocks merge with Chan's formula.  float16/float32
    accumulate in float64, float64 in double-double, so mean and variance are
    within 1 ulp (2 ulp for the float64 variance) of the exact values of the
    stored inputs at any offset.  A constant slice gives variance 0; NaN makes
    its slice NaN; ±inf gives a NaN variance.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> x = np.array([1e8 + 1, 1e8 + 2, 1e8 + 3])
    >>> cnorm.moments(x)
    (np.float64(100000002.0), np.float64(0.6666666666666666))
    """
    if weights is None and skipna is False and keepdims is False and dtype is None:
        small = _small_moments(x, axis, ddof, backend, num_threads)
        if small is not None:
            return _small_result(small[0], x.dtype), _small_result(small[1], x.dtype)
    ddof = check_real(ddof, "ddof", "moments")
    keepdims = check_bool(keepdims, "keepdims", "moments")
    dt = check_dtype_arg(dtype, "dtype", "moments")
    states, axes, xa, rdt = moment_states(x, axis, weights=weights, skipna=skipna,
                                          backend=backend, num_threads=num_threads)
    m, v = _engine.finalize(states, ddof)
    odt = dt or rdt
    return (_cast(_shape_out(m, axes, xa.ndim, keepdims), odt),
            _cast(_shape_out(v, axes, xa.ndim, keepdims), odt))


def _reduce(kind, x, axis, dtype, out, ddof, keepdims, backend, num_threads, where_name):
    if out is None and keepdims is False and dtype is None:
        small = _small_moments(x, axis, 0 if kind == "mean" else ddof, backend, num_threads,
                               kind == "std")
        if small is not None:
            r = small[0] if kind == "mean" else (small[1] if kind == "var" else np.sqrt(small[1]))
            return _small_result(r, x.dtype)
    ddof = check_real(ddof, "ddof", where_name)
    keepdims = check_bool(keepdims, "keepdims", where_name)
    dt = check_dtype_arg(dtype, "dtype", where_name)
    xa, rdt = as_float_array(x, "x", where_name)
    axes = normalize_axes(axis, xa.ndim)
    kept = tuple(s for i, s in enumerate(xa.shape) if i not in axes)
    shape = tuple(1 if i in axes else s for i, s in enumerate(xa.shape)) if keepdims else kept
    if out is not None:
        check_out(out, shape, None, "out", where_name)
        if out.dtype.kind not in "fc" and not (BFLOAT16 is not None and out.dtype == BFLOAT16):
            raise TypeError(f"{where_name}: out must have a floating dtype, got {out.dtype}")
    states, axes, xa, _ = moment_states(xa, axes, backend=backend, num_threads=num_threads,
                                        fn=where_name)
    m, v = _engine.finalize(states, ddof if kind != "mean" else 0.0)
    r = m if kind == "mean" else (v if kind == "var" else np.sqrt(v))
    r = _shape_out(r, axes, xa.ndim, keepdims)
    if out is not None:
        out[...] = r
        return out
    return _cast(r, dt or rdt)


def mean(x, axis=None, dtype=None, out=None, keepdims=False, *, backend="auto", num_threads=None):
    """Arithmetic mean, drop-in for ``np.mean`` (stable, compensated; see :func:`moments`).

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> float(cnorm.mean(np.array([1e16, 1.0, -1e16, 1.0])))
    0.5
    """
    return _reduce("mean", x, axis, dtype, out, 0, keepdims, backend, num_threads, "mean")


def var(x, axis=None, dtype=None, out=None, ddof=0, keepdims=False, *, backend="auto",
        num_threads=None):
    """Variance, drop-in for ``np.var`` (stable, compensated; see :func:`moments`)."""
    return _reduce("var", x, axis, dtype, out, ddof, keepdims, backend, num_threads, "var")


def std(x, axis=None, dtype=None, out=None, ddof=0, keepdims=False, *, backend="auto",
        num_threads=None):
    """Standard deviation, drop-in for ``np.std`` (``sqrt`` of :func:`var`, rounded once)."""
    return _reduce("std", x, axis, dtype, out, ddof, keepdims, backend, num_threads, "std")

"""Normalization layers, forward: layer_norm, rms_norm, batch_norm, group_norm, instance_norm.

Every layer is the same four steps:

1. canonicalize the statistics axes (``_axes``),
2. moments states over them (``_engine.reduce_states``: Welford/Chan in
   float64 / double-double),
3. finalize per slice: ``mean`` (double-double) and ``rstd = 1/sqrt(var + eps)``,
4. one apply pass (``_engine.apply``) that centres, scales, applies the affine
   and the activation and converts back to the input dtype.

Semantics follow ``torch.nn.functional`` (biased variance for normalization,
``eps`` inside the square root, running statistics updated with the unbiased
variance); numbers are more accurate than PyTorch's, not less.
"""
from __future__ import annotations

import numpy as np

from . import _config, _engine
from ._axes import normalize_axes
from ._validate import (BFLOAT16, as_float_array, check_bool, check_num_groups, check_out,
                        check_real)

__all__ = ["layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm"]

# ------------------------------------------------------------------ shared checks


def _check_activation(activation, fn):
    if not (activation is None or isinstance(activation, str)) or activation not in _engine.ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {list(_engine.ACTIVATIONS)}, "
                         f"got {activation!r}")
    return _engine.ACTIVATIONS[activation]


def _check_eps(eps, fn):
    return check_real(eps, "eps", fn, minimum=0.0)


def _param(p, shape, name, fn):
    """A weight/bias/running-stat argument as a float64 array of exactly ``shape``."""
    if p is None:
        return None
    a = np.asarray(p)
    if a.dtype.kind not in "iuf" and not (BFLOAT16 is not None and a.dtype == BFLOAT16):
        raise TypeError(f"{fn}: {name} must be a real floating array, got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{fn}: {name} has shape {a.shape}, expected {tuple(shape)}")
    return a.astype(np.float64)


def _running(p, shape, name, fn):
    """Running statistics are updated in place: a writeable float ndarray of ``shape``."""
    if p is None:
        return None
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray (it is updated in place), "
                        f"got {type(p).__name__}")
    if p.dtype.kind != "f" and not (BFLOAT16 is not None and p.dtype == BFLOAT16):
        raise TypeError(f"{fn}: {name} must have a floating dtype, got {p.dtype}")
    if p.shape != tuple(shape):
        raise ValueError(f"{fn}: {name} has shape {p.shape}, expected {tuple(shape)}")
    return p


def _prepare(x, out, fn, backend, num_threads, activation, return_stats):
    """Common validation; returns (xa, result dtype, act code, backend)."""
    xa, rdt = as_float_array(x, "x", fn)
    act = _check_activation(activation, fn)
    backend = _config.resolve_backend(backend)
    _config.resolve_threads(num_threads)
    check_bool(return_stats, "return_stats", fn)
    if out is not None:
        check_out(out, xa.shape, rdt, "out", fn)
    return xa, rdt, act, backend


def _output(xa, rdt, out, nthreads):
    """The array the kernels write: ``out`` itself when its dtype is the working
    dtype; a float32 buffer for bfloat16 (copied into ``out`` by _finish).  A new
    array's pages are faulted in first when ``nthreads`` threads will write it
    (``prefault_output``: concurrent huge-page faults stall)."""
    if out is not None and out.dtype == xa.dtype:
        return out
    if rdt != xa.dtype:  # bfloat16 computed from a float32 copy
        y = np.empty(xa.shape, dtype=xa.dtype)
    else:
        y = np.empty_like(xa, order="K")
    if _config.HAVE_EXTENSION and nthreads > 1:
        _config.kernels.prefault_output(y, nthreads)
    return y


def _finish(xa, y, rdt, out):
    if out is None and rdt != xa.dtype:
        return y.astype(rdt)
    if out is not None and out.dtype != y.dtype:
        out[...] = y
        return out
    return y


def _rstd(var, eps):
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 / np.sqrt(var + eps)


def _states_stats(xa, axes, backend, nthreads):
    """(states, mean_hi, mean_lo, biased var, count) over ``axes``, keepdims shapes."""
    states = _engine.reduce_states(xa, axes, backend=backend, nthreads=nthreads)
    keep = tuple(1 if i in axes else s for i, s in enumerate(xa.shape))
    flat = states.reshape(-1, _engine.STATE_WIDTH)
    out = np.empty((3, flat.shape[0]))
    if _config.HAVE_EXTENSION:
        _config.kernels.norm_stats(flat, out[0], out[1], out[2])
    else:
        from ._reference import dd_div
        with np.errstate(invalid="ignore", divide="ignore"):
            var, _ = dd_div(flat[:, 3], flat[:, 4], np.where(flat[:, 0] > 0, flat[:, 0], 1.0))
        out[0], out[1] = flat[:, 1], flat[:, 2]
        out[2] = np.where(np.isnan(flat[:, 3]) | (flat[:, 0] == 0), np.nan, np.maximum(var, 0.0))
    n = flat[:, 0].reshape(keep)
    return states, out[0].reshape(keep), out[1].reshape(keep), out[2].reshape(keep), n


def _mean(mh, ml):
    return np.where(np.isfinite(mh), mh + ml, mh)


def _run(xa, y, mh, ml, rs, w, b, act, backend, nthreads):
    _engine.apply(xa, y, mh, ml, rs, 1.0 if w is None else w, 0.0 if b is None else b, act,
                  backend=backend, nthreads=nthreads)


# ------------------------------------------------------------------ fused rows fast path
def _rows_layout(a, nlead):
    """(R, L, row stride) when ``a`` is rows of contiguous trailing axes, else None.

    The last ``a.ndim - nlead`` axes must be C-contiguous and the leading axes
    mergeable into one strided dimension.
    """
    expected = a.itemsize
    for ax in range(a.ndim - 1, nlead - 1, -1):
        if a.shape[ax] != 1 and a.strides[ax] != expected:
            return None
        expected *= a.shape[ax]
    L = expected // a.itemsize
    R, rstride = 1, expected
    for ax in range(nlead - 1, -1, -1):
        n = a.shape[ax]
        if n == 1:
            continue
        if R > 1 and a.strides[ax] != rstride * R:
            return None
        if R == 1:
            rstride = a.strides[ax]
        R *= n
    return R, L, rstride


def _rows_pair(xa, y, nlead, backend):
    """(R, L, x row stride, y row stride) when x and y are the same rows in memory
    (or y is x itself) and a compiled backend (Cython, or Numba's fused rows
    kernel in _numba_rows) runs, else None."""
    if backend not in ("cython", "numba") or xa.dtype != y.dtype:
        return None
    lx, ly = _rows_layout(xa, nlead), _rows_layout(y, nlead)
    if lx is None or ly is None or lx[:2] != ly[:2]:
        return None
    if y is not xa and np.shares_memory(xa, y) and (lx[2] != ly[2] or xa.ctypes.data != y.ctypes.data):
        return None
    return lx[0], lx[1], lx[2], ly[2]


def _rows_module(backend):
    """The module with norm_rows / scale_rows for a backend _rows_pair accepted."""
    if backend == "numba":
        from . import _numba_rows
        return _numba_rows
    return _config.kernels


def _param_pair(w, b, n):
    """weight and bias as float64 arrays of n (ones / zeros for a missing one)."""
    w1 = np.ones(n) if w is None else np.ascontiguousarray(w, dtype=np.float64).reshape(-1)
    b1 = np.zeros(n) if b is None else np.ascontiguousarray(b, dtype=np.float64).reshape(-1)
    return w1, b1


def _fused_rows(xa, y, nlead, eps, mode, w, b, psub, pmod, pmul, act, backend, nthreads):
    """Run the fused rows kernel when the layout allows; return (mean, var) rows or None."""
    rows = _rows_pair(xa, y, nlead, backend)
    if rows is None:
        return None
    R, L, xrs, yrs = rows
    mean, var = np.empty(R), np.empty(R)
    if w is None and b is None:
        w1, b1, psub, pmod, pmul = _ONE, _ZERO, max(L, 1), 1, 0
    else:
        w1, b1 = _param_pair(w, b, max(np.size(w) if w is not None else 0,
                                       np.size(b) if b is not None else 0))
    _rows_module(backend).norm_rows(xa, y, R, L, xrs, yrs, eps, mode, w1, b1, psub, pmod, pmul,
                                    act, mean, var, nthreads)
    return mean, var


def _scale_rows(xa, y, nlead, mh, ml, rs, smod, sper, w, b, act, backend, nthreads):
    """The apply pass as contiguous rows with per-channel statistics (batch norm);
    returns False when the layout or backend does not allow it."""
    rows = _rows_pair(xa, y, nlead, backend)
    if rows is None:
        return False
    R, L, xrs, yrs = rows
    mh, ml, rs = (np.ascontiguousarray(a, dtype=np.float64).reshape(-1) for a in (mh, ml, rs))
    if len(mh) != smod or (sper and L != smod):
        return False
    if sper:  # channels last: statistics and parameters per element of a row
        w1, b1 = _param_pair(w, b, L)
        psub, pmod, pmul = 1, 1, 0
    elif w is None and b is None:
        w1, b1, psub, pmod, pmul = _ONE, _ZERO, max(L, 1), 1, 0
    else:  # NCHW: row r is channel r % smod
        w1, b1 = _param_pair(w, b, smod)
        psub, pmod, pmul = max(L, 1), smod, 1
    _rows_module(backend).scale_rows(xa, y, R, L, xrs, yrs, mh, ml, rs, smod, sper, w1, b1, psub,
                                     pmod, pmul, act, nthreads)
    return True


_ONE = np.ones(1)
_ZERO = np.zeros(1)
_ONE.flags.writeable = False
_ZERO.flags.writeable = False


def _view(a, shape, strides, writeable=True):
    """a seen with ``shape``/``strides``: a reshape when that is what they describe
    (a microsecond, against several for as_strided), else as_strided."""
    if a.flags.c_contiguous:
        v = a.reshape(shape)
        if v.strides == tuple(strides):
            return v
    return np.lib.stride_tricks.as_strided(a, shape, strides, writeable=writeable)


def _expand(p, axis_positions, ndim):
    """Reshape a parameter laid out over ``axis_positions`` to broadcast against x."""
    if p is None:
        return None
    shape = [1] * ndim
    for ax, n in zip(axis_positions, p.shape):
        shape[ax] = n
    return p.reshape(shape)


# ------------------------------------------------------------------ small-call fast path
def _small_call(x, axis, out, eps, mode, weight, bias, activation, return_stats, backend,
                num_threads):
    """The common layer/RMS norm call (last axis, defaults, float or no affine)
    straight to ``norm_rows_contig``; None when it does not apply (the general
    path then runs).

    A (32, 64) layer_norm costs a few microseconds of Python in the general path
    (axis planning, validation, allocation of the statistics); here every check is a
    cheap identity/type test and the kernel entry checks the arrays in C.
    """
    if (activation is None and type(return_stats) is bool and type(axis) is int and axis == -1
            and _config.small_call_allowed(backend, num_threads)
            and ((eps is None and mode == 1) or (type(eps) is float and eps >= 0.0))):
        if eps is None:  # rms_norm's default: machine epsilon of the dtype
            if type(x) is not np.ndarray or x.dtype.kind != "f" or x.dtype.itemsize > 8:
                return None
            eps = _RMS_EPS[x.dtype.itemsize]
        done = _rows_entry(x, out, eps, mode, weight, bias, 0, return_stats, num_threads)
        if done is None or not return_stats:
            return done
        y, mean, rs = done   # what the general path returns from its _fused_rows call
        keep = x.shape[:-1] + (1,)
        rs = rs.reshape(keep)
        return (y, rs) if mode == 1 else (y, mean.reshape(keep), rs)
    return None


def _small_group_call(x, groups, axis, out, eps, weight, bias, activation, return_stats, backend,
                      num_threads):
    """The common group/instance norm call (NCHW, defaults, float or no affine;
    ``groups`` is ``_PER_CHANNEL`` for instance norm) straight to
    ``norm_rows_contig``; None when it does not apply (the general path then runs)."""
    if not (activation is None and type(return_stats) is bool and type(axis) is int and axis == 1
            and type(eps) is float and eps >= 0.0 and type(x) is np.ndarray and x.ndim >= 2
            and _config.small_call_allowed(backend, num_threads)):
        return None
    per_channel = groups is _PER_CHANNEL
    if per_channel:
        groups = x.shape[1]
    elif type(groups) is not int or groups <= 0:
        return None
    done = _rows_entry(x, out, eps, 0, weight, bias, groups, return_stats, num_threads)
    if done is None or not return_stats:
        return done
    y, mean, rs = done   # per (sample, group) row: what the general path returns
    if per_channel:   # instance norm: (N, C, 1, ...)
        kshape = x.shape[:2] + (1,) * (x.ndim - 2)
        return y, mean.reshape(kshape), rs.reshape(kshape)
    return y, mean.reshape(x.shape[0], groups), rs.reshape(x.shape[0], groups)


_PER_CHANNEL = object()


def _rows_entry(x, out, eps, mode, weight, bias, groups, want_stats, num_threads):
    return _config.run_entry(_config.kernels.norm_rows_contig, x, num_threads, out, eps, mode,
                             weight, bias, groups, want_stats)


def _plain_momentum(momentum):
    """A float momentum in [0, 1] (anything else: the general path validates it)."""
    return type(momentum) is float and 0.0 <= momentum <= 1.0


_RMS_EPS = {2: float(np.finfo(np.float16).eps), 4: float(np.finfo(np.float32).eps),
            8: float(np.finfo(np.float64).eps)}


# ------------------------------------------------------------------ layer_norm
def layer_norm(x, axis=-1, weight=None, bias=None, *, eps=1e-5, activation=None, out=None,
               return_stats=False, backend="auto", num_threads=None):
    """Layer normalization over the axes ``axis`` (the normalized axes).

    ``y = act((x - mean) / sqrt(var + eps) * weight + bias)`` with mean and
    biased variance over ``axis``, like ``torch.nn.functional.layer_norm``
    (whose normalized axes are the trailing ones; here any axes).

    Parameters
    ----------
    x : array_like
        float16/float32/float64 (kept), integers → float64.
    axis : int or tuple of int
        The normalized axes.
    weight, bias : array_like, optional
        Shape of the normalized axes in the array's own axis order.
    eps : float
        Added to the variance inside the square root (as float64).
    activation : {None, 'relu', 'gelu', 'gelu_tanh', 'silu'}
        Applied after the affine, in the same pass.
    out : ndarray, optional
        Output of x's shape and dtype; may be ``x`` itself.
    return_stats : bool
        Also return float64 ``mean`` and ``rstd`` with keepdims shapes.
    backend, num_threads
        See :func:`cnorm.moments`.

    Returns
    -------
    y or (y, mean, rstd)

    Notes
    -----
    Statistics: Welford/Chan moments (float64 accumulation for float16/32,
    double-double for float64); the output is computed in float64 from the
    double-double mean and rounded once, within 1 ulp (float16/32) / 4 ulp
    (float64) of the exact normalized value at any offset.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> cnorm.layer_norm(np.array([[1., 2., 3.]]), eps=0.0)
    array([[-1.22474487,  0.        ,  1.22474487]])
    """
    y = _small_call(x, axis, out, eps, 0, weight, bias, activation, return_stats, backend,
                    num_threads)
    if y is not None:
        return y
    fn = "layer_norm"
    xa, rdt, act, backend = _prepare(x, out, fn, backend, num_threads, activation, return_stats)
    axes = normalize_axes(axis, xa.ndim)
    eps = _check_eps(eps, fn)
    pshape = tuple(xa.shape[a] for a in axes)
    w0 = _param(weight, pshape, "weight", fn)
    b0 = _param(bias, pshape, "bias", fn)
    keep = tuple(1 if i in axes else s for i, s in enumerate(xa.shape))
    with _config.call_slot(num_threads) as nt:
        y = _output(xa, rdt, out, nt)
        fused = None
        if axes == tuple(range(xa.ndim - len(axes), xa.ndim)):
            fused = _fused_rows(xa, y, xa.ndim - len(axes), eps, 0,
                                None if w0 is None else w0.reshape(-1),
                                None if b0 is None else b0.reshape(-1), 1, 1, 0, act, backend, nt)
        if fused is not None:
            mean, var = fused
            rs = _rstd(var, eps).reshape(keep) if return_stats else None
            mean = mean.reshape(keep)
        else:
            _, mh, ml, var, _ = _states_stats(xa, axes, backend, nt)
            rs = _rstd(var, eps)
            _run(xa, y, mh, ml, rs, _expand(w0, axes, xa.ndim), _expand(b0, axes, xa.ndim),
                 act, backend, nt)
            mean = _mean(mh, ml) if return_stats else None
    y = _finish(xa, y, rdt, out)
    return (y, mean, rs) if return_stats else y


# ------------------------------------------------------------------ rms_norm
def _default_rms_eps(dt):
    if BFLOAT16 is not None and dt == BFLOAT16:
        import ml_dtypes
        return float(ml_dtypes.finfo(dt).eps)
    return float(np.finfo(dt).eps)


def rms_norm(x, axis=-1, weight=None, *, eps=None, activation=None, out=None,
             return_stats=False, backend="auto", num_threads=None):
    """RMS normalization: ``y = act(x / sqrt(mean(x**2) + eps) * weight)``.

    Parameters
    ----------
    x, axis, weight, activation, out, backend, num_threads
        As in :func:`layer_norm`.
    eps : float, optional
        ``None`` means the machine epsilon of the output dtype (PyTorch's rule).
    return_stats : bool
        Also return float64 ``rstd`` (keepdims shape).

    Returns
    -------
    y or (y, rstd)

    Notes
    -----
    ``mean(x**2) = var + mean**2`` from the same double-double states as the
    other layers, so it is accurate for any data.
    """
    y = _small_call(x, axis, out, eps, 1, weight, None, activation, return_stats, backend,
                    num_threads)
    if y is not None:
        return y
    fn = "rms_norm"
    xa, rdt, act, backend = _prepare(x, out, fn, backend, num_threads, activation, return_stats)
    axes = normalize_axes(axis, xa.ndim)
    eps = _default_rms_eps(rdt) if eps is None else _check_eps(eps, fn)
    pshape = tuple(xa.shape[a] for a in axes)
    w0 = _param(weight, pshape, "weight", fn)
    keep = tuple(1 if i in axes else s for i, s in enumerate(xa.shape))
    with _config.call_slot(num_threads) as nt:
        y = _output(xa, rdt, out, nt)
        fused = None
        if axes == tuple(range(xa.ndim - len(axes), xa.ndim)):
            fused = _fused_rows(xa, y, xa.ndim - len(axes), eps, 1,
                                None if w0 is None else w0.reshape(-1), None, 1, 1, 0, act,
                                backend, nt)
        if fused is not None:
            rs = _rstd(fused[1], eps).reshape(keep) if return_stats else None
        else:
            states, mh, ml, var, _ = _states_stats(xa, axes, backend, nt)
            with np.errstate(over="ignore", invalid="ignore"):
                ms = var + (mh * mh + 2.0 * mh * ml)
            rs = _rstd(ms, eps)
            zero = np.zeros((1,) * xa.ndim)
            _run(xa, y, zero, zero, rs, _expand(w0, axes, xa.ndim), None, act, backend, nt)
    y = _finish(xa, y, rdt, out)
    return (y, rs) if return_stats else y


# ------------------------------------------------------------------ batch_norm
def _channel_axis(axis, ndim, fn):
    if ndim < 2:
        raise ValueError(f"{fn}: x must have at least 2 dimensions (batch and channels), "
                         f"got shape with ndim={ndim}")
    (a,) = normalize_axes(axis, ndim) if not isinstance(axis, (tuple, list)) else (None,)
    if a is None:
        raise TypeError(f"{fn}: axis must be a single int (the channel axis), got {axis!r}")
    return a


def _check_momentum(momentum, fn):
    if momentum is None:
        raise ValueError(f"{fn}: momentum=None (cumulative average) is only supported by the "
                         f"layer objects; pass a float in [0, 1]")
    return check_real(momentum, "momentum", fn, minimum=0.0, maximum=1.0)


def _update_running(running_mean, running_var, mean, var_unbiased, momentum):
    """PyTorch's rule: r = (1 - m) * r + m * batch statistic (in the running dtype)."""
    if running_mean is not None:
        running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
    if running_var is not None:
        running_var[...] = ((1.0 - momentum) * running_var.astype(np.float64)
                            + momentum * var_unbiased)


def _small_batch_norm(x, weight, bias, axis, running_mean, running_var, training, momentum, eps,
                      activation, out, return_stats, backend, num_threads):
    """The common training call (C-contiguous x, channel axis 1 or last, float
    or no affine, plain running statistics or none, defaults otherwise) through
    the kernel entry ``batch_norm_contig``; None when it does not apply (the
    general path then runs).  Bitwise the general path's output and running
    statistics: the entry makes the same kernel calls and the running update
    below is the general path's code."""
    if not (training is True and activation is None and type(return_stats) is bool
            and type(x) is np.ndarray and x.ndim >= 2 and type(axis) is int
            and type(eps) is float and eps >= 0.0 and _plain_momentum(momentum)
            and _config.small_call_allowed(backend, num_threads)):
        return None
    if axis == -1 or axis == x.ndim - 1:
        channels_last = True
    elif axis == 1:
        channels_last = False
    else:
        return None
    C = x.shape[-1 if channels_last else 1]
    if not all(r is None or (type(r) is np.ndarray and r.dtype.kind == "f" and r.shape == (C,)
                             and r.flags.writeable) for r in (running_mean, running_var)):
        return None
    done = _config.run_entry(_config.kernels.batch_norm_contig, x, num_threads, out,
                             channels_last, eps, weight, bias)
    if done is None:
        return None
    y, stats = done
    if running_mean is not None or running_var is not None:
        n = x.size // C
        _update_running(running_mean, running_var, stats[4], stats[2] * (n / (n - 1)),
                        momentum)
    if return_stats:   # the general path's keepdims statistics (_mean, _rstd) from the entry
        c_ax = x.ndim - 1 if channels_last else 1
        keep = tuple(C if i == c_ax else 1 for i in range(x.ndim))
        return y, stats[4].reshape(keep), stats[3].reshape(keep)
    return y


def batch_norm(x, weight=None, bias=None, *, axis=1, running_mean=None, running_var=None,
               training=True, momentum=0.1, eps=1e-5, activation=None, out=None,
               return_stats=False, backend="auto", num_threads=None):
    """Batch normalization with statistics per channel over all other axes.

    Parameters
    ----------
    x : array_like
        ``(N, C, ...)`` with ``axis=1`` (NCHW) or ``(N, ..., C)`` with ``axis=-1``.
    weight, bias : array_like, optional
        Shape ``(C,)``.
    axis : int
        The channel axis.
    running_mean, running_var : ndarray, optional
        Shape ``(C,)``, updated in place in training mode
        (``r = (1-momentum)*r + momentum*stat``, unbiased variance), used in eval mode.
    training : bool
        Batch statistics (True) or running statistics (False; both required).
    momentum : float in [0, 1]
    eps, activation, out, return_stats, backend, num_threads
        As in :func:`layer_norm`; in eval mode the returned stats are the
        running ones used.

    Returns
    -------
    y or (y, mean, rstd)
    """
    small = _small_batch_norm(x, weight, bias, axis, running_mean, running_var, training, momentum,
                              eps, activation, out, return_stats, backend, num_threads)
    if small is not None:
        return small
    fn = "batch_norm"
    xa, rdt, act, backend = _prepare(x, out, fn, backend, num_threads, activation, return_stats)
    training = check_bool(training, "training", fn)
    c_ax = _channel_axis(axis, xa.ndim, fn)
    C = xa.shape[c_ax]
    eps = _check_eps(eps, fn)
    momentum = _check_momentum(momentum, fn)
    w = _expand(_param(weight, (C,), "weight", fn), (c_ax,), xa.ndim)
    b = _expand(_param(bias, (C,), "bias", fn), (c_ax,), xa.ndim)
    rm = _running(running_mean, (C,), "running_mean", fn)
    rv = _running(running_var, (C,), "running_var", fn)
    axes = tuple(a for a in range(xa.ndim) if a != c_ax)
    keep = tuple(C if i == c_ax else 1 for i in range(xa.ndim))
    if training:
        n = int(np.prod([xa.shape[a] for a in axes]))
        if n <= 1:
            raise ValueError(f"{fn}: expected more than 1 value per channel when training, "
                             f"got input of shape {xa.shape}")
        for name, r in (("running_mean", rm), ("running_var", rv)):
            if r is not None and not r.flags.writeable:
                raise ValueError(f"{fn}: {name} is read-only (it is updated in place)")
    elif rm is None or rv is None:
        raise ValueError(f"{fn}: eval mode (training=False) needs running_mean and running_var")
    with _config.call_slot(num_threads) as nt:
        if training:
            _, mh, ml, var, cnt = _states_stats(xa, axes, backend, nt)
        else:
            mh = rm.astype(np.float64).reshape(keep)
            ml = np.zeros(keep)
            var = rv.astype(np.float64).reshape(keep)
        rs = _rstd(var, eps)
        y = _output(xa, rdt, out, nt)
        done = False
        if c_ax in (1, xa.ndim - 1) and xa.ndim >= 2:
            sper = c_ax == xa.ndim - 1
            done = _scale_rows(xa, y, xa.ndim - 1 if sper else 2, mh, ml, rs, C, sper,
                               None if w is None else w.reshape(-1),
                               None if b is None else b.reshape(-1), act, backend, nt)
        if not done:
            _run(xa, y, mh, ml, rs, w, b, act, backend, nt)
    if training:
        mean = _mean(mh, ml).reshape(C)
        _update_running(rm, rv, mean, var.reshape(C) * (n / (n - 1)), momentum)
    y = _finish(xa, y, rdt, out)
    return (y, _mean(mh, ml), rs) if return_stats else y


# ------------------------------------------------------------------ instance_norm
def instance_norm(x, weight=None, bias=None, *, axis=1, running_mean=None, running_var=None,
                  training=True, momentum=0.1, eps=1e-5, activation=None, out=None,
                  return_stats=False, backend="auto", num_threads=None):
    """Instance normalization: statistics per (sample, channel) over the other axes.

    Axis 0 is the batch, ``axis`` the channel axis.  Running statistics (when
    given) follow PyTorch: ``(1-m)*r + m*`` the batch average of the
    per-instance mean / unbiased variance, updated in training mode and used
    (broadcast over the batch) in eval mode.

    Returns
    -------
    y or (y, mean, rstd)  (stats with shape ``(N, C, 1, ...)``)
    """
    if (training is True and running_mean is None and running_var is None
            and _plain_momentum(momentum)):
        y = _small_group_call(x, _PER_CHANNEL, axis, out, eps, weight, bias, activation,
                              return_stats, backend, num_threads)
        if y is not None:
            return y
    fn = "instance_norm"
    xa, rdt, act, backend = _prepare(x, out, fn, backend, num_threads, activation, return_stats)
    training = check_bool(training, "training", fn)
    c_ax = _channel_axis(axis, xa.ndim, fn)
    if c_ax == 0:
        raise ValueError(f"{fn}: axis 0 is the batch axis; the channel axis must differ, got {axis!r}")
    C = xa.shape[c_ax]
    eps = _check_eps(eps, fn)
    momentum = _check_momentum(momentum, fn)
    w = _expand(_param(weight, (C,), "weight", fn), (c_ax,), xa.ndim)
    b = _expand(_param(bias, (C,), "bias", fn), (c_ax,), xa.ndim)
    rm = _running(running_mean, (C,), "running_mean", fn)
    rv = _running(running_var, (C,), "running_var", fn)
    axes = tuple(a for a in range(xa.ndim) if a not in (0, c_ax))
    n = int(np.prod([xa.shape[a] for a in axes]))
    if training:
        if (rm is not None or rv is not None) and n <= 1:
            raise ValueError(f"{fn}: expected more than 1 spatial element when training, "
                             f"got input of shape {xa.shape}")
        for name, r in (("running_mean", rm), ("running_var", rv)):
            if r is not None and not r.flags.writeable:
                raise ValueError(f"{fn}: {name} is read-only (it is updated in place)")
    elif rm is None or rv is None:
        raise ValueError(f"{fn}: eval mode (training=False) needs running_mean and running_var")
    keep_c = tuple(C if i == c_ax else 1 for i in range(xa.ndim))
    with _config.call_slot(num_threads) as nt:
        y = _output(xa, rdt, out, nt)
        fused = None
        if training and c_ax == 1:
            fused = _fused_rows(xa, y, 2, eps, 0, None if w is None else w.reshape(-1),
                                None if b is None else b.reshape(-1), max(n, 1), C, 1, act,
                                backend, nt)
        if fused is not None:
            kshape = xa.shape[:2] + (1,) * (xa.ndim - 2)
            mh, var = (a.reshape(kshape) for a in fused)
            ml = np.zeros(kshape)
        elif training:
            _, mh, ml, var, _ = _states_stats(xa, axes, backend, nt)
        else:
            mh = np.broadcast_to(rm.astype(np.float64).reshape(keep_c),
                                 tuple(xa.shape[i] if i in (0, c_ax) else 1 for i in range(xa.ndim)))
            ml = np.zeros((1,) * xa.ndim)
            var = np.broadcast_to(rv.astype(np.float64).reshape(keep_c), mh.shape)
        rs = _rstd(var, eps)
        if fused is None:
            _run(xa, y, mh, ml, rs, w, b, act, backend, nt)
    if training and (rm is not None or rv is not None):
        mean_c = _mean(mh, ml).mean(axis=0).reshape(C)
        var_c = (var * (n / (n - 1))).mean(axis=0).reshape(C)
        _update_running(rm, rv, mean_c, var_c, momentum)
    y = _finish(xa, y, rdt, out)
    if return_stats:
        return y, np.ascontiguousarray(_mean(mh, ml)), np.ascontiguousarray(rs)
    return y


# ------------------------------------------------------------------ group_norm
def group_norm(x, num_groups, weight=None, bias=None, *, axis=1, eps=1e-5, activation=None,
               out=None, return_stats=False, backend="auto", num_threads=None):
    """Group normalization: statistics per (sample, group of channels).

    Axis 0 is the batch and ``axis`` the channel axis, split into
    ``num_groups`` consecutive groups; statistics over each group's channels
    and all other axes.  ``weight``/``bias`` have shape ``(C,)``.

    Returns
    -------
    y or (y, mean, rstd)  (stats with shape ``(N, num_groups)``)
    """
    y = _small_group_call(x, num_groups, axis, out, eps, weight, bias, activation, return_stats,
                          backend, num_threads)
    if y is not None:
        return y
    fn = "group_norm"
    xa, rdt, act, backend = _prepare(x, out, fn, backend, num_threads, activation, return_stats)
    c_ax = _channel_axis(axis, xa.ndim, fn)
    if c_ax == 0:
        raise ValueError(f"{fn}: axis 0 is the batch axis; the channel axis must differ, got {axis!r}")
    C = xa.shape[c_ax]
    G = check_num_groups(num_groups, C, c_ax, fn)
    eps = _check_eps(eps, fn)
    w = _param(weight, (C,), "weight", fn)
    b = _param(bias, (C,), "bias", fn)
    # split the channel axis into (G, C//G): always a view
    gshape = xa.shape[:c_ax] + (G, C // G) + xa.shape[c_ax + 1:]
    gstrides = xa.strides[:c_ax] + (xa.strides[c_ax] * (C // G), xa.strides[c_ax]) + xa.strides[c_ax + 1:]
    xg = _view(xa, gshape, gstrides, writeable=False)
    axes = tuple(a for a in range(xg.ndim) if a not in (0, c_ax))
    wg = _expand(None if w is None else w.reshape(G, C // G), (c_ax, c_ax + 1), xg.ndim)
    bg = _expand(None if b is None else b.reshape(G, C // G), (c_ax, c_ax + 1), xg.ndim)
    N = xa.shape[0]
    with _config.call_slot(num_threads) as nt:
        y = _output(xa, rdt, out, nt)
        fused = None
        if c_ax == 1:
            yg = _view(y, gshape, y.strides[:1] + (y.strides[1] * (C // G),
                                                                             y.strides[1]) + y.strides[2:])
            hw = int(np.prod(xa.shape[2:]))
            fused = _fused_rows(xg, yg, 2, eps, 0, w, b, max(hw, 1), G, C // G, act, backend, nt)
        if fused is not None:
            kshape = (N, G) + (1,) * (xg.ndim - 2)
            mh, var = (a.reshape(kshape) for a in fused)
            ml = np.zeros(kshape)
            rs = _rstd(var, eps)
            y = _finish(xa, y, rdt, out)
            return (y, _mean(mh, ml).reshape(N, G), rs.reshape(N, G)) if return_stats else y
        _, mh, ml, var, _ = _states_stats(xg, axes, backend, nt)
        rs = _rstd(var, eps)
        yg = np.lib.stride_tricks.as_strided(
            y, gshape, y.strides[:c_ax] + (y.strides[c_ax] * (C // G), y.strides[c_ax]) + y.strides[c_ax + 1:])
        if y is xa or (out is not None and out is x):
            xg = yg
        _run(xg, yg, mh, ml, rs, wg, bg, act, backend, nt)
    y = _finish(xa, y, rdt, out)
    if return_stats:
        return y, _mean(mh, ml).reshape(N, G), rs.reshape(N, G)
    return y

"""cnorm on dask arrays: lazy ``moments``, ``standardize`` and a ``StandardScaler``.

Every block is reduced to cnorm moment states ``(n, mean_hi, mean_lo, M2_hi,
M2_lo)`` by the same engine as :func:`cnorm.moments`; dask's tree reduction
then merges states with Chan's formula in double-double (``_engine.merge``),
so nothing is ever accumulated in the input's precision and the result does
not depend on the chunking beyond the last bits of the double-double.  States
travel between workers as small structured NumPy arrays (one record of five
float64 per kept position), so any scheduler works, ``dask.distributed``
clusters included.
"""
from __future__ import annotations

from functools import partial

import dask.array as da
import numpy as np

from . import _config, _engine
from . import preprocessing as _pp
from ._axes import normalize_axes
from ._validate import BFLOAT16, as_float_array, check_bool, check_dtype_arg, check_real
from .moments import moment_states
from .running import RunningMoments

__all__ = ["moments", "standardize", "StandardScaler", "STATE_DTYPE"]

#: One merged state per kept position, as a record (picklable, concatenable).
STATE_DTYPE = np.dtype([("n", "f8"), ("mean_hi", "f8"), ("mean_lo", "f8"),
                        ("m2_hi", "f8"), ("m2_lo", "f8")])


def _to_records(states):
    """``kept + (5,)`` float64 states -> records of shape ``kept`` (no copy when contiguous)."""
    return np.ascontiguousarray(states, dtype=np.float64).view(STATE_DTYPE)[..., 0]


def _to_states(records):
    flat = np.ascontiguousarray(records).reshape(-1)  # (ascontiguousarray makes 0-d 1-d)
    return flat.view(np.float64).reshape(np.shape(records) + (5,))


# ---------------------------------------------------------------- reduction steps
def _chunk(x, weights=None, axis=None, keepdims=True, skipna=False, backend="auto",
           num_threads=None, computing_meta=False):
    """States of one block over ``axis`` (kept as length-1 axes).

    ``skipna='auto'`` (the scaler) treats blocks like
    :class:`cnorm.StandardScaler`'s batches (small float16/float32 blocks are
    reduced from float64 copies) and recomputes a block that holds NaN with
    NaNs skipped, so clean blocks stay on the fast path.
    """
    if computing_meta:
        return np.empty((0,) * x.ndim, dtype=STATE_DTYPE)
    if skipna == "auto":
        x = _pp._mergeable(np.asarray(x))
    fast = skipna is True
    states, *_ = moment_states(x, axis, weights=weights, skipna=fast, backend=backend,
                               num_threads=num_threads, fn="cnorm.dask")
    if skipna == "auto" and np.isnan(states[..., 1]).any():
        states, *_ = moment_states(x, axis, weights=weights, skipna=True, backend=backend,
                                   num_threads=num_threads, fn="cnorm.dask")
    return np.expand_dims(_to_records(states), axis)


def _combine(records, axis=None, keepdims=True):
    """Merge the states along ``axis`` (a fixed, sequential order: deterministic)."""
    st = _to_states(records)
    moved = np.moveaxis(st, axis, tuple(range(len(axis))))
    kept = moved.shape[len(axis):-1]
    parts = moved.reshape((-1,) + kept + (5,))
    acc = parts[0].copy()
    for part in parts[1:]:
        _engine.merge(acc, part)
    out = _to_records(acc)
    return np.expand_dims(out, axis) if keepdims else out


def _state_array(x, axes, *, weights=None, skipna=False, keepdims=False, backend="auto",
                 num_threads=None, split_every=None):
    """Lazy records (STATE_DTYPE) of ``x`` over ``axes``."""
    ndim = x.ndim if keepdims else x.ndim - len(axes)
    chunk = partial(_chunk, skipna=skipna, backend=backend, num_threads=num_threads)
    return da.reduction(x, chunk, _combine, combine=_combine, axis=axes, keepdims=keepdims,
                        dtype=STATE_DTYPE, split_every=split_every, concatenate=True,
                        meta=np.empty((0,) * ndim, dtype=STATE_DTYPE), weights=weights)


def _as_dask(x, fn):
    """``x`` as a dask array plus the result dtype (NumPy's rule; TypeError otherwise)."""
    x = da.asarray(x)
    dt = x.dtype
    if dt.kind == "f" and dt.itemsize in (2, 4, 8) or (BFLOAT16 is not None and dt == BFLOAT16):
        return x, dt
    if dt.kind in "biu":
        return x, np.dtype(np.float64)
    raise TypeError(f"{fn}: x must be a real floating, integer or bool array, got dtype {dt}")


# ---------------------------------------------------------------- finalize steps
def _finalize_block(records, ddof, which, dtype):
    m, v = _engine.finalize(_to_states(records), ddof)
    r = m if which == "mean" else v
    with np.errstate(over="ignore"):
        out = r.astype(dtype)
    return out if out.ndim else out[()]  # NumPy scalars, like dask's own reductions


def moments(x, axis=None, *, ddof=0, weights=None, skipna=False, keepdims=False, dtype=None,
            backend="auto", num_threads=None, split_every=None):
    """Lazy ``(mean, var)`` of a dask array over ``axis`` (see :func:`cnorm.moments`).

    Parameters
    ----------
    x : dask array or array_like
        float16/float32/float64 keep their dtype; integers and bools give float64.
    axis : None, int or tuple of int
        Axes to reduce (NumPy semantics; ``None`` = all).
    ddof : float, default 0
        ``var = M2 / (n - ddof)``.
    weights : dask array or array_like, optional
        Non-negative frequency weights broadcastable to ``x``.
    skipna : bool, default False
        Ignore NaNs.
    keepdims : bool, default False
    dtype : {float16, float32, float64}, optional
        Result dtype.
    backend : {'auto', 'cython', 'numba', 'numpy'}
        Kernels used on each block.
    num_threads : int, optional
        Threads per block (inside dask's own worker threads, cnorm uses one
        thread per call when several calls run at once).
    split_every : int, optional
        Fan-in of dask's reduction tree.

    Returns
    -------
    mean, var : dask arrays
        Sharing one reduction graph: ``dask.compute(mean, var)`` reads ``x`` once.

    Notes
    -----
    Blocks become float64 states (double-double for float64 data), merged
    with Chan's formula in double-double along dask's reduction tree, so the
    result meets :func:`cnorm.moments`' precision contract for any chunking.

    Examples
    --------
    >>> import dask, dask.array as da, numpy as np, cnorm.dask
    >>> x = da.from_array(np.array([1e8 + 1, 1e8 + 2, 1e8 + 3, 1e8 + 4]), chunks=1)
    >>> dask.compute(*cnorm.dask.moments(x, ddof=1), scheduler="sync")
    (np.float64(100000002.5), np.float64(1.6666666666666667))
    """
    ddof = check_real(ddof, "ddof", "cnorm.dask.moments")
    keepdims = check_bool(keepdims, "keepdims", "cnorm.dask.moments")
    skipna = check_bool(skipna, "skipna", "cnorm.dask.moments")
    x, rdt = _as_dask(x, "cnorm.dask.moments")
    odt = check_dtype_arg(dtype, "dtype", "cnorm.dask.moments") or rdt
    axes = normalize_axes(axis, x.ndim)
    st = _state_array(x, axes, weights=weights, skipna=skipna, keepdims=keepdims,
                      backend=backend, num_threads=num_threads, split_every=split_every)
    meta = np.empty((0,) * st.ndim, dtype=odt)
    return tuple(st.map_blocks(_finalize_block, ddof, which, odt, dtype=odt, meta=meta)
                 for which in ("mean", "var"))


def _standardize_block(xb, records, ddof, eps, dtype, backend, num_threads):
    xa, _ = as_float_array(xb, "x", "cnorm.dask.standardize")
    states = _to_states(records)
    _, v = _engine.finalize(states, ddof)
    with _config.call_slot(num_threads) as nthreads:
        return _pp._pass(xa, dtype, None, states[..., 1], states[..., 2],
                         1.0 / _pp._centre_scale(v, eps), 1.0, 0.0, backend, nthreads)


def standardize(x, axis=0, *, ddof=0, eps=0.0, backend="auto", num_threads=None,
                split_every=None):
    """Lazy z-scores of a dask array (see :func:`cnorm.standardize`).

    Same chunks and dtype rule as ``x``; statistics over ``axis`` come from
    the merged states, and each block goes through cnorm's normalization
    pass (float64 arithmetic, rounded once).  A
    zero standard deviation counts as 1 (constant slices map to 0).

    Examples
    --------
    >>> import dask.array as da, numpy as np, cnorm.dask
    >>> x = da.from_array(np.array([[1e8 + 1, 5.0], [1e8 + 3, 5.0]]), chunks=1)
    >>> cnorm.dask.standardize(x).compute(scheduler="sync")
    array([[-1.,  0.],
           [ 1.,  0.]])
    """
    ddof = check_real(ddof, "ddof", "cnorm.dask.standardize")
    eps = check_real(eps, "eps", "cnorm.dask.standardize", minimum=0.0)
    x, rdt = _as_dask(x, "cnorm.dask.standardize")
    axes = normalize_axes(axis, x.ndim)
    backend = _config.resolve_backend(backend)
    _config.resolve_threads(num_threads)
    st = _state_array(x, axes, keepdims=True, backend=backend, num_threads=num_threads,
                      split_every=split_every)
    return da.map_blocks(_standardize_block, x, st, ddof, eps, rdt, backend, num_threads,
                         dtype=rdt, meta=np.empty((0,) * x.ndim, dtype=rdt))


class StandardScaler(_pp.StandardScaler):
    """:class:`cnorm.StandardScaler` that also fits and transforms dask arrays.

    ``fit``/``partial_fit`` on a 2-d dask array build the per-feature states
    with one distributed reduction (NaNs skipped per block; ``sample_weight``
    may be a dask or NumPy array of shape ``(n_samples,)``) and compute them
    eagerly, like scikit-learn's ``fit``; ``transform``/``inverse_transform``
    of a dask array are lazy (one task per block, feature axis in one chunk).
    NumPy input behaves exactly like :class:`cnorm.StandardScaler`.

    Examples
    --------
    >>> import dask, dask.array as da, numpy as np, cnorm.dask
    >>> X = da.from_array(np.array([[1e8 + 1, 0.0], [1e8 + 3, 0.0]]), chunks=1)
    >>> with dask.config.set(scheduler="sync"):
    ...     sc = cnorm.dask.StandardScaler().fit(X)
    >>> sc.mean_, sc.var_
    (array([1.00000002e+08, 0.00000000e+00]), array([1., 0.]))
    """

    def partial_fit(self, X, y=None, sample_weight=None):
        if not isinstance(X, da.Array):
            return super().partial_fit(X, y, sample_weight)
        X, _ = _as_dask(X, "StandardScaler")
        first = not hasattr(self, "_moments_")
        if X.ndim != 2:
            raise ValueError(f"StandardScaler: expected a 2-d dask array, got shape {X.shape}")
        if X.shape[0] == 0:
            raise ValueError("StandardScaler: found an array with 0 samples")
        if not first and X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but StandardScaler is expecting "
                             f"{self.n_features_in_} features as input")
        w = None
        if sample_weight is not None:
            w = da.asarray(sample_weight)
            if w.ndim == 0:
                w = da.broadcast_to(w, (X.shape[0],))
            if w.shape != (X.shape[0],):
                raise ValueError(f"sample_weight.shape == {w.shape}, expected {(X.shape[0],)}")
            w = w.rechunk((X.chunks[0],))[:, None]
        states = _to_states(_state_array(X, (0,), weights=w, skipna="auto").compute())
        if not np.isfinite(states[:, 1][states[:, 0] > 0]).all():
            raise ValueError("StandardScaler: input contains infinity")
        batch = RunningMoments._from_states(states, (0,), 2)
        if first:
            self.n_features_in_ = X.shape[1]
        self._set_from(batch if first else self._moments_ + batch, integral=w is None)
        return self

    def _lazy(self, X, copy, inverse):
        X, rdt = _as_dask(X, "StandardScaler")
        if X.ndim != 2:
            raise ValueError(f"StandardScaler: expected a 2-d dask array, got shape {X.shape}")
        X = X.rechunk({1: -1})
        parent = _pp.StandardScaler.inverse_transform if inverse else _pp.StandardScaler.transform
        return X.map_blocks(_apply_block, self, parent, dtype=rdt,
                            meta=np.empty((0, 0), dtype=rdt))

    def transform(self, X, copy=None):
        if isinstance(X, da.Array):
            return self._lazy(X, copy, inverse=False)
        return super().transform(X, copy)

    def inverse_transform(self, X, copy=None):
        if isinstance(X, da.Array):
            return self._lazy(X, copy, inverse=True)
        return super().inverse_transform(X, copy)


def _apply_block(block, scaler, method):
    return method(scaler, block, copy=True)

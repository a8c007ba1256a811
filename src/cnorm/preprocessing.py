"""Data normalization: ``standardize``, ``minmax_scale`` and ``StandardScaler``.

Each is "statistics, then one pass": the statistics come from cnorm's
mergeable moment states (:mod:`cnorm._engine`), exact to the last bit or two
at any offset; the output comes from the normalization layers' kernel
(``_engine.apply``: float64 arithmetic, rounded once, any strides, ``out``
may be the input), so nothing the size of the input is allocated.
"""
from __future__ import annotations

import warnings

import numpy as np

from . import _config, _engine
from ._axes import normalize_axes
from ._validate import as_float_array, check_out, check_real
from .running import RunningMoments

__all__ = ["standardize", "minmax_scale", "StandardScaler"]

_UPCAST = 1 << 20  # float16/float32 batches up to this size are reduced from float64 copies


def _pass(xa, rdt, out, mh, ml, rs, w, b, backend, nthreads):
    """``(((x - mh) - ml) * rs) * w + b`` by cnorm's normalization pass, as ``rdt``.

    One pass of the Cython/Numba kernel (float64 arithmetic, rounded once);
    writes into ``out`` (which may be ``x``) when given.
    """
    direct = out is not None and out.dtype == xa.dtype
    y = out if direct else np.empty_like(xa, order="K")
    _engine.apply(xa, y, mh, ml, rs, w, b, 0, backend=backend, nthreads=nthreads)
    if out is not None and not direct:  # bfloat16 computed from a float32 copy
        out[...] = y
        return out
    return y if y.dtype == rdt else y.astype(rdt)


def _prepare(x, axis, out, backend, num_threads, fn):
    xa, rdt = as_float_array(x, "x", fn)
    axes = normalize_axes(axis, xa.ndim)
    backend = _config.resolve_backend(backend)
    _config.resolve_threads(num_threads)
    if out is not None:
        check_out(out, xa.shape, rdt, "out", fn)
    keep = tuple(1 if i in axes else s for i, s in enumerate(xa.shape))
    return xa, rdt, axes, keep, backend


def _empty(xa, rdt, out):
    return out if out is not None else np.empty(xa.shape, dtype=rdt)


def _centre_scale(v, eps):
    """``sqrt(v + eps)`` with zeros replaced by 1 (a constant column maps to 0)."""
    with np.errstate(invalid="ignore"):
        s = np.sqrt(v + eps)
    return np.where(s == 0, 1.0, s)


def standardize(x, axis=0, *, ddof=0, eps=0.0, out=None, backend="auto", num_threads=None):
    """Z-scores ``(x - mean) / sqrt(var + eps)`` with statistics over ``axis``.

    Parameters
    ----------
    x : array_like
        float16/float32/float64 keep their dtype; integers and bools give float64.
    axis : None, int or tuple of int, default 0
        Axes the statistics are taken over (0: per column of a 2-d array).
    ddof : float, default 0
        ``var = M2 / (n - ddof)``.
    eps : float, default 0.0
        Non-negative, added to the variance (as a float64) inside the root.
    out : ndarray, optional
        Writeable array of ``x``'s shape and result dtype, any strides; may be ``x``.
    backend : {'auto', 'cython', 'numba', 'numpy'}
    num_threads : int, optional

    Returns
    -------
    ndarray

    Notes
    -----
    One statistics pass (:func:`cnorm.moments`' states: float64 or
    double-double accumulation) and one normalization pass (the kernel of
    the normalization layers): ``((x - mean_hi) - mean_lo) * rstd`` in
    float64 with ``rstd = 1/sqrt(var + eps)``, rounded once, so it stays
    within the normalization precision contract at large offsets.  Like
    scikit-learn, a standard deviation of exactly 0 is replaced by 1: a
    constant slice maps to exactly 0 (not NaN).  NaN makes its slice NaN;
    ``ddof >= n`` follows ``np.var`` (RuntimeWarning).

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> cnorm.standardize(np.array([[1e8 + 1, 5.0], [1e8 + 3, 5.0]]))
    array([[-1.,  0.],
           [ 1.,  0.]])
    """
    ddof = check_real(ddof, "ddof", "standardize")
    eps = check_real(eps, "eps", "standardize", minimum=0.0)
    xa, rdt, axes, keep, backend = _prepare(x, axis, out, backend, num_threads, "standardize")
    if xa.size == 0:
        return _empty(xa, rdt, out)
    with _config.call_slot(num_threads) as nthreads:
        states = _engine.reduce_states(xa, axes, backend=backend, nthreads=nthreads)
        _, v = _engine.finalize(states, ddof)
        rs = 1.0 / _centre_scale(v, eps)
        return _pass(xa, rdt, out, states[..., 1].reshape(keep), states[..., 2].reshape(keep),
                     rs.reshape(keep), 1.0, 0.0, backend, nthreads)


def _check_range(feature_range):
    try:
        lo, hi = feature_range
        lo = check_real(lo, "feature_range[0]", "minmax_scale")
        hi = check_real(hi, "feature_range[1]", "minmax_scale")
    except (TypeError, ValueError) as e:
        raise type(e)(f"minmax_scale: feature_range must be a pair of finite reals (min, max) "
                      f"with min < max, got {feature_range!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"minmax_scale: feature_range must satisfy min < max (finite), "
                         f"got {feature_range!r}")
    return lo, hi


def minmax_scale(x, axis=0, *, feature_range=(0, 1), out=None, backend="auto",
                 num_threads=None):
    """Scale ``x`` linearly so each slice over ``axis`` spans ``feature_range``.

    Parameters
    ----------
    x : array_like
        float16/float32/float64 keep their dtype; integers and bools give float64.
    axis : None, int or tuple of int, default 0
        Axes the minimum and maximum are taken over.
    feature_range : (float, float), default (0, 1)
        ``(lo, hi)`` with ``lo < hi``.
    out : ndarray, optional
        Writeable array of ``x``'s shape and result dtype, any strides; may be ``x``.
    backend : {'auto', 'cython', 'numba', 'numpy'}
        Kernel of the scaling pass.
    num_threads : int, optional

    Returns
    -------
    ndarray

    Notes
    -----
    ``y = (x - min) * ((hi - lo) / (max - min)) + lo`` evaluated in float64
    by the normalization pass (differences first, so no cancellation at
    offsets), rounded once, then clipped to ``[lo, hi]`` in place; the
    minimum maps exactly to ``lo``.  Like
    scikit-learn, a constant slice (``max == min``) maps to ``lo``.  Unlike
    scikit-learn, NaN is not skipped: it makes its slice NaN, as in the rest
    of cnorm.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> cnorm.minmax_scale(np.array([[1.0, 7.0], [3.0, 7.0], [2.0, 7.0]]))
    array([[0. , 0. ],
           [1. , 0. ],
           [0.5, 0. ]])
    """
    lo, hi = _check_range(feature_range)
    xa, rdt, axes, keep, backend = _prepare(x, axis, out, backend, num_threads, "minmax_scale")
    if xa.size == 0:
        return _empty(xa, rdt, out)
    mn = np.min(xa, axis=axes, keepdims=True).astype(np.float64)
    rng = np.max(xa, axis=axes, keepdims=True).astype(np.float64) - mn
    rs = (hi - lo) / np.where(rng == 0, 1.0, rng)
    with _config.call_slot(num_threads) as nthreads:
        y = _pass(xa, rdt, out, mn, 0.0, rs, 1.0, lo, backend, nthreads)
    return np.clip(y, lo, hi, out=y)


# ---------------------------------------------------------------- StandardScaler
try:
    from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
    from sklearn.utils.validation import (FLOAT_DTYPES, _check_sample_weight, check_array,
                                          check_is_fitted, validate_data)
    HAVE_SKLEARN = True
except ImportError:  # scikit-learn (>= 1.6) is optional
    HAVE_SKLEARN = False
    FLOAT_DTYPES = (np.float64, np.float32, np.float16)

    class NotFittedError(ValueError, AttributeError):
        """The estimator is used before ``fit`` (sklearn's exception when installed)."""

    class BaseEstimator:
        """Minimal stand-in: ``get_params``/``set_params``/``repr`` over ``__init__``'s keywords."""

        def get_params(self, deep=True):
            import inspect
            names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
            return {name: getattr(self, name) for name in names}

        def set_params(self, **params):
            valid = self.get_params()
            for key, value in params.items():
                if key not in valid:
                    raise ValueError(f"Invalid parameter {key!r} for {type(self).__name__}")
                setattr(self, key, value)
            return self

        def __repr__(self):
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
            return f"{type(self).__name__}({args})"

    class TransformerMixin:
        def fit_transform(self, X, y=None, **fit_params):
            return self.fit(X, y, **fit_params).transform(X)

    class OneToOneFeatureMixin:
        def get_feature_names_out(self, input_features=None):
            check_is_fitted(self)
            if input_features is None:
                input_features = [f"x{i}" for i in range(self.n_features_in_)]
            return np.asarray(input_features, dtype=object)

    def check_is_fitted(est):
        if not hasattr(est, "_moments_"):
            raise NotFittedError(f"This {type(est).__name__} instance is not fitted yet. "
                                 "Call 'fit' with appropriate arguments first.")

    def check_array(X, *, dtype=None, copy=False, force_writeable=False,
                    ensure_all_finite=True):
        xa = np.asarray(X)
        if xa.dtype.kind in "biu":
            xa = xa.astype(np.float64)
        elif xa.dtype not in FLOAT_DTYPES:
            raise ValueError(f"StandardScaler: X must be a real numeric array, "
                             f"got dtype {xa.dtype}")
        elif copy or (force_writeable and not xa.flags.writeable):
            xa = xa.copy()
        if xa.ndim != 2 or xa.shape[0] < 1:
            raise ValueError(f"StandardScaler: expected a 2-d array with at least one sample, "
                             f"got shape {xa.shape}")
        if np.isinf(np.min(xa)) or np.isinf(np.max(xa)):
            raise ValueError("StandardScaler: input contains infinity")
        return xa

    def validate_data(est, X, reset=True, **check_params):
        xa = check_array(X, **check_params)
        if reset:
            est.n_features_in_ = xa.shape[1]
        elif xa.shape[1] != est.n_features_in_:
            raise ValueError(f"X has {xa.shape[1]} features, but {type(est).__name__} is "
                             f"expecting {est.n_features_in_} features as input")
        return xa

    def _check_sample_weight(sample_weight, X, dtype=None):
        w = np.asarray(sample_weight, dtype=np.float64)
        if w.ndim == 0:
            w = np.full(X.shape[0], float(w))
        if w.shape != (X.shape[0],):
            raise ValueError(f"sample_weight.shape == {w.shape}, expected {(X.shape[0],)}!")
        return w


def _mergeable(x):
    """``x`` itself, or a float64 copy of a small float16/float32 batch.

    States of float64 data carry double-double means, so thousands of small
    batches merge without drift; a large batch is reduced as it is (one
    state, float64 accumulation), where a copy would cost more than it saves.
    """
    return x.astype(np.float64) if x.dtype != np.float64 and x.size <= _UPCAST else x


def _batch_moments(X, w):
    """RunningMoments over the rows of one batch, NaNs skipped."""
    X = _mergeable(X)
    batch = RunningMoments(axis=0).update(X, w)
    if np.isnan(batch._states[:, 1]).any():  # missing values: ignore them
        batch = RunningMoments(axis=0).update(X, w, skipna=True)
    return batch


class StandardScaler(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Standardize features by removing the mean and scaling to unit variance.

    A drop-in for :class:`sklearn.preprocessing.StandardScaler` (dense input)
    whose statistics are exact: ``fit`` and every ``partial_fit`` batch become
    cnorm moment states merged with Chan's formula in double-double, so
    ``mean_`` and ``var_`` are within an ulp or two of the exact values of the
    data seen, however it was batched and whatever its offset.

    Parameters
    ----------
    copy : bool, default True
        If False, ``transform`` and ``inverse_transform`` work in place when
        the input is already a float ndarray.
    with_mean : bool, default True
        Centre the data before scaling.
    with_std : bool, default True
        Scale the data to unit variance.

    Attributes
    ----------
    mean_ : ndarray of float64, shape (n_features,) or None
        None when ``with_mean=False`` and ``with_std=False``.
    var_ : ndarray of float64, shape (n_features,) or None
        Biased (ddof=0) variance; None when ``with_std=False``.
    scale_ : ndarray of float64, shape (n_features,) or None
        ``sqrt(var_)`` with exact zeros replaced by 1; None when ``with_std=False``.
    n_samples_seen_ : int or ndarray
        Samples seen per feature (NaNs excluded; the sum of ``sample_weight``
        when weights were given); one number when it is the same for all.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when fitted on data with string column names (a DataFrame).

    Notes
    -----
    float16/float32 batches of up to 2**20 values are reduced from a float64
    copy, so that many small ``partial_fit`` batches merge without drift
    (about 1 float64 ulp after 1000 batches, where scikit-learn loses 10**3).
    Like scikit-learn, NaNs are ignored by ``fit`` and kept by ``transform``;
    ±inf is rejected; sparse input is not supported.  Unlike scikit-learn,
    only a variance of exactly 0 counts as a constant feature (its scale is
    1): cnorm's variance of a constant column is exactly 0, so no tolerance is
    needed.  ``transform`` computes ``(x - mean_) / scale_`` in float64 and
    rounds once to the input's float dtype (integers give float64).
    scikit-learn's base classes are used when it is installed; without it the
    class works the same with a small built-in ``get_params``/``set_params``.

    Examples
    --------
    >>> import numpy as np
    >>> from cnorm import StandardScaler
    >>> sc = StandardScaler().fit(np.array([[1e8 + 1, 0.0], [1e8 + 3, 0.0]]))
    >>> sc.mean_, sc.var_, sc.n_samples_seen_
    (array([1.00000002e+08, 0.00000000e+00]), array([1., 0.]), np.int64(2))
    >>> sc.transform(np.array([[1e8 + 5, 1.0]]))
    array([[3., 1.]])
    """

    def __init__(self, *, copy=True, with_mean=True, with_std=True):
        self.copy = copy
        self.with_mean = with_mean
        self.with_std = with_std

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _reset(self):
        for name in ("_moments_", "n_samples_seen_", "mean_", "var_", "scale_"):
            self.__dict__.pop(name, None)

    def fit(self, X, y=None, sample_weight=None):
        """Compute the mean and variance of ``X`` (n_samples, n_features) for scaling.

        ``sample_weight`` : array_like of shape (n_samples,), non-negative
        frequency weights.  Returns ``self``.
        """
        self._reset()
        return self.partial_fit(X, y, sample_weight)

    def partial_fit(self, X, y=None, sample_weight=None):
        """Merge the statistics of one more batch ``X`` (exact; Chan's formula).

        Returns ``self``.  On an invalid batch nothing fitted is changed.
        """
        first = not hasattr(self, "_moments_")
        X = validate_data(self, X, dtype=FLOAT_DTYPES, ensure_all_finite="allow-nan",
                          reset=first)
        w = None
        if sample_weight is not None:
            w = _check_sample_weight(sample_weight, X, dtype=np.float64)[:, None]
        batch = _batch_moments(X, w)
        self._set_from(batch if first else self._moments_ + batch, integral=w is None)
        return self

    def _set_from(self, moments, integral=True):
        """Set the fitted attributes from a RunningMoments over axis 0."""
        self._moments_ = moments
        n = np.atleast_1d(moments.count)
        if integral and np.all(n == np.round(n)):
            n = n.astype(np.int64)
        self.n_samples_seen_ = n[0] if n.size and (n == n[0]).all() else n
        if not (self.with_mean or self.with_std):
            self.mean_ = self.var_ = self.scale_ = None
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.mean_ = np.atleast_1d(moments.mean)
            var = np.atleast_1d(moments.var())
        self.var_ = var if self.with_std else None
        self.scale_ = _centre_scale(var, 0.0) if self.with_std else None

    def _apply(self, X, copy, inverse):
        check_is_fitted(self)
        copy = self.copy if copy is None else copy
        if inverse:
            X = check_array(X, copy=copy, dtype=FLOAT_DTYPES, force_writeable=True,
                            ensure_all_finite="allow-nan")
            if X.ndim != 2 or X.shape[1] != self.n_features_in_:
                raise ValueError(f"X has {X.shape[-1]} features, but StandardScaler is "
                                 f"expecting {self.n_features_in_} features as input")
        else:
            X = validate_data(self, X, reset=False, copy=copy, dtype=FLOAT_DTYPES,
                              force_writeable=True, ensure_all_finite="allow-nan")
        m = np.asarray(self.mean_ if self.with_mean else 0.0, dtype=np.float64)
        s = np.asarray(self.scale_ if self.with_std else 1.0, dtype=np.float64)
        args = (0.0, 0.0, 1.0, s, m) if inverse else (m, 0.0, 1.0 / s, 1.0, 0.0)
        with _config.call_slot(None) as nthreads:
            return _pass(X, X.dtype, X, *args, _config.resolve_backend("auto"), nthreads)

    def transform(self, X, copy=None):
        """``(X - mean_) / scale_`` (each part only when enabled).

        ``copy`` : bool, default ``self.copy``; False works in place when it can.
        """
        return self._apply(X, copy, inverse=False)

    def inverse_transform(self, X, copy=None):
        """``X * scale_ + mean_``: back to the original representation."""
        return self._apply(X, copy, inverse=True)

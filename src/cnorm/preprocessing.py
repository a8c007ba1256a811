"""Data normalization: ``standardize``, ``minmax_scale`` and ``StandardScaler``.

The statistics come from cnorm's mergeable moment states (see
:mod:`cnorm._engine`), so they are exact to the last bit or two at any offset;
the element-wise pass runs in float64 over cache-sized buffers (a
``numpy.nditer``), so nothing the size of the input is allocated and every
output is rounded once.
"""
from __future__ import annotations

import warnings

import numpy as np

from . import _engine
from ._axes import normalize_axes
from ._validate import as_float_array, check_out, check_real
from .moments import moment_states
from .running import RunningMoments

__all__ = ["standardize", "minmax_scale", "StandardScaler"]

_BUFFER = 1 << 14  # elements per float64 buffer of the element-wise pass


def _elementwise(fn, x, params, out):
    """``out[...] = fn(x, *params)`` in float64, buffered; params broadcast to x."""
    ops = [x, *params, out]
    flags = [["readonly"]] * (len(ops) - 1) + [["writeonly", "overlap_assume_elementwise"]]
    it = np.nditer(ops, flags=["buffered", "external_loop", "zerosize_ok", "copy_if_overlap",
                               "grow_inner"],
                   op_flags=flags, op_dtypes=[np.float64] * len(ops), casting="unsafe",
                   buffersize=_BUFFER)
    with it:
        for block in it:
            block[-1][...] = fn(*block[:-1])
    return out


def _prepare(x, axis, out, fn):
    xa, rdt = as_float_array(x, "x", fn)
    axes = normalize_axes(axis, xa.ndim)
    if out is not None:
        check_out(out, xa.shape, rdt, "out", fn)
    return xa, rdt, axes, (np.empty(xa.shape, dtype=rdt) if out is None else out)


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
        Writeable array of ``x``'s shape and result dtype; may be ``x`` itself.
    backend : {'auto', 'cython', 'numba', 'numpy'}
        Kernels computing the statistics.
    num_threads : int, optional

    Returns
    -------
    ndarray

    Notes
    -----
    Statistics use :func:`cnorm.moments`' states (float64 or double-double
    accumulation).  The output pass computes ``((x - mean_hi) - mean_lo) /
    sqrt(var + eps)`` in float64 and rounds once to the output dtype, so it
    stays accurate at large offsets.  Like scikit-learn, a standard deviation
    of exactly 0 is replaced by 1: a constant slice maps to exactly 0 (not NaN).
    NaN makes its slice NaN; ``ddof >= n`` follows ``np.var`` (RuntimeWarning).

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> cnorm.standardize(np.array([[1e8 + 1, 5.0], [1e8 + 3, 5.0]]))
    array([[-1.,  0.],
           [ 1.,  0.]])
    """
    ddof = check_real(ddof, "ddof", "standardize")
    eps = check_real(eps, "eps", "standardize", minimum=0.0)
    xa, rdt, axes, res = _prepare(x, axis, out, "standardize")
    if xa.size == 0:
        return res
    states, *_ = moment_states(xa, axes, backend=backend, num_threads=num_threads,
                               fn="standardize")
    _, v = _engine.finalize(states, ddof)
    params = [np.expand_dims(a, axes) for a in (states[..., 1], states[..., 2],
                                                   _centre_scale(v, eps))]
    return _elementwise(lambda a, mh, ml, s: ((a - mh) - ml) / s, xa, params, res)


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


def minmax_scale(x, axis=0, *, feature_range=(0, 1), out=None):
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
        Writeable array of ``x``'s shape and result dtype; may be ``x`` itself.

    Returns
    -------
    ndarray

    Notes
    -----
    ``y = (x - min) / (max - min) * (hi - lo) + lo`` evaluated in float64
    (differences first, so no cancellation at offsets), rounded once and
    clipped to ``[lo, hi]``; the minimum maps exactly to ``lo``.  Like
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
    xa, rdt, axes, res = _prepare(x, axis, out, "minmax_scale")
    if xa.size == 0:
        return res
    mn = np.min(xa, axis=axes, keepdims=True).astype(np.float64)
    rng = np.max(xa, axis=axes, keepdims=True).astype(np.float64) - mn
    rng = np.where(rng == 0, 1.0, rng)
    width = hi - lo

    def fn(a, m, r):
        return np.clip((a - m) / r * width + lo, lo, hi)
    return _elementwise(fn, xa, [mn, rng], res)


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


def _batch_moments(X, w):
    """RunningMoments over the rows of one batch, NaNs skipped.

    Float16/float32 batches are reduced from float64 copies of row blocks of
    ``_BUFFER`` values, so their states carry double-double means like float64
    data and many small ``partial_fit`` batches merge without drift.
    """
    step = X.shape[0] if X.dtype == np.float64 else max(1, _BUFFER // max(1, X.shape[1]))
    total = RunningMoments(axis=0)
    for i in range(0, max(X.shape[0], 1), step):
        xb = X[i:i + step].astype(np.float64, copy=False)
        wb = None if w is None else w[i:i + step]
        part = RunningMoments(axis=0).update(xb, wb)
        if np.isnan(part._states[:, 1]).any():  # missing values: ignore them
            part = RunningMoments(axis=0).update(xb, wb, skipna=True)
        total.merge(part)
    return total


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
        m = self.mean_ if self.with_mean else np.zeros(X.shape[1])
        s = self.scale_ if self.with_std else np.ones(X.shape[1])
        fn = (lambda a, m, s: a * s + m) if inverse else (lambda a, m, s: (a - m) / s)
        return _elementwise(fn, X, [np.asarray(m, np.float64), np.asarray(s, np.float64)], X)

    def transform(self, X, copy=None):
        """``(X - mean_) / scale_`` (each part only when enabled).

        ``copy`` : bool, default ``self.copy``; False works in place when it can.
        """
        return self._apply(X, copy, inverse=False)

    def inverse_transform(self, X, copy=None):
        """``X * scale_ + mean_``: back to the original representation."""
        return self._apply(X, copy, inverse=True)

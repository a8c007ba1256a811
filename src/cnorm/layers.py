"""Normalization layers as objects: parameters and running statistics in NumPy.

``LayerNorm``, ``RMSNorm``, ``BatchNorm``, ``GroupNorm`` and ``InstanceNorm``
hold their parameters (``weight``, ``bias``) and running statistics
(``running_mean``, ``running_var``, ``num_batches_tracked``) as NumPy arrays,
initialised like PyTorch's modules, and call the functional layers of
:mod:`cnorm.norms` in ``__call__``.  ``state_dict()`` / ``load_state_dict()``
use PyTorch's key names, so the norm layers of a trained torch model run in
NumPy with the same numbers::

    bn = cnorm.BatchNorm(64).load_state_dict(torch_bn.state_dict()).eval()
    y = bn(x)          # x: (N, 64, H, W) NumPy array

Decisions where PyTorch leaves a choice:

* ``dtype`` is the dtype parameters and running statistics are *stored* in
  (float32 by default, like torch).  The output keeps the dtype of ``x``;
  the arithmetic is float64 whatever the two dtypes are.
* ``state_dict()`` returns copies (torch returns tensors sharing storage);
  ``load_state_dict()`` copies the values into the existing arrays
  (converted to their dtype), and changes nothing when it raises.
* ``num_batches_tracked`` is incremented only after a forward pass
  succeeded (torch increments it before the pass, even one that fails).
* ``InstanceNorm`` with tracked statistics counts its training batches in
  ``num_batches_tracked`` and ``momentum=None`` is the cumulative average, as
  for ``BatchNorm``; torch's ``InstanceNorm*d`` never increments the counter
  and treats ``momentum=None`` as 0 (running statistics never move).
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np

from . import norms
from ._validate import BFLOAT16, check_bool, check_dtype_arg, check_real

__all__ = ["LayerNorm", "RMSNorm", "BatchNorm", "GroupNorm", "InstanceNorm"]


# ------------------------------------------------------------------ argument checks
def _positive_int(value, argname, cls):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{cls}: {argname} must be a positive int, got {value!r}")
    if int(value) <= 0:
        raise ValueError(f"{cls}: {argname} must be a positive int, got {value!r}")
    return int(value)


def _shape_arg(value, argname, cls):
    """``normalized_shape``: an int or a sequence of positive ints, as a tuple."""
    if isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_)):
        items = (value,)
    else:
        try:
            items = tuple(value)
        except TypeError:
            raise TypeError(f"{cls}: {argname} must be an int or a tuple of ints, "
                            f"got {value!r}") from None
    if not items:
        raise ValueError(f"{cls}: {argname} must name at least one axis, got {value!r}")
    return tuple(_positive_int(n, argname, cls) for n in items)


def _dtype_arg(dtype, cls):
    """Storage dtype; ``None`` is float32 (torch's default dtype)."""
    return check_dtype_arg(np.float32 if dtype is None else dtype, "dtype", cls)


def _eps_arg(eps, cls, allow_none=False):
    if eps is None and allow_none:
        return None
    return check_real(eps, "eps", cls, minimum=0.0)


def _momentum_arg(momentum, cls):
    if momentum is None:
        return None
    return check_real(momentum, "momentum", cls, minimum=0.0, maximum=1.0)


def _axis_arg(axis, cls):
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (numbers.Integral, np.integer)):
        raise TypeError(f"{cls}: axis must be an int (the channel axis), got {axis!r}")
    return int(axis)


def _to_numpy(value):
    """A state-dict value (ndarray, array-like or torch tensor) as a NumPy array."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # NumPy cannot take bfloat16 tensors
            t = t.float()
        return np.asarray(t)
    return np.asarray(value)


# ------------------------------------------------------------------ common base
class _Layer:
    """Shared machinery: parameters, buffers, train/eval, state dicts, repr."""

    _param_names: tuple = ()    # learnable: weight, bias (those that exist)
    _buffer_names: tuple = ()   # running_mean, running_var, num_batches_tracked

    def __init__(self, dtype):
        self.dtype = _dtype_arg(dtype, type(self).__name__)
        self.training = True

    # -------------------------------------------------------------- mode
    def train(self, mode=True):
        """Set training mode (``mode=True``) or evaluation mode; return ``self``."""
        self.training = check_bool(mode, "mode", f"{type(self).__name__}.train")
        return self

    def eval(self):
        """Set evaluation mode (``train(False)``); return ``self``."""
        return self.train(False)

    # -------------------------------------------------------------- parameters
    def parameters(self):
        """The learnable arrays (``weight``, ``bias``, those that exist), as a list."""
        return [getattr(self, name) for name in self._param_names]

    def _keys(self):
        return self._param_names + self._buffer_names

    def state_dict(self):
        """Parameters and buffers under PyTorch's key names, as copies.

        Returns
        -------
        dict of str to ndarray
            ``weight``, ``bias`` (when present), then ``running_mean``,
            ``running_var`` and ``num_batches_tracked`` (an int64 0-d array)
            when running statistics are tracked.
        """
        return {k: np.array(getattr(self, k), copy=True) for k in self._keys()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy parameters and buffers in from a mapping of arrays or torch tensors.

        Parameters
        ----------
        state_dict : mapping of str to array_like or torch.Tensor
            PyTorch's key names (``weight``, ``bias``, ``running_mean``,
            ``running_var``, ``num_batches_tracked``), e.g.
            ``torch_layer.state_dict()``.  Values are converted to this
            layer's ``dtype`` (``num_batches_tracked`` to int64).
        strict : bool
            Like torch: with ``True`` missing and unexpected keys are errors;
            with ``False`` they are ignored (shapes are always checked).

        Returns
        -------
        self

        Raises
        ------
        KeyError
            A key this layer needs is missing (``strict=True``).
        ValueError
            An unexpected key (``strict=True``) or a value of the wrong shape.
        TypeError
            A value that is not a real number array.

        Every check runs before anything is copied: on an error the layer is
        unchanged.
        """
        cls = f"{type(self).__name__}.load_state_dict"
        strict = check_bool(strict, "strict", cls)
        try:
            keys = list(state_dict.keys())
        except AttributeError:
            raise TypeError(f"{cls}: state_dict must be a mapping of names to arrays, "
                            f"got {type(state_dict).__name__}") from None
        expected = self._keys()
        if strict:
            missing = [k for k in expected if k not in state_dict]
            if missing:
                raise KeyError(f"{cls}: missing key(s) {missing} (expected {list(expected)})")
            unexpected = [k for k in keys if k not in expected]
            if unexpected:
                raise ValueError(f"{cls}: unexpected key(s) {unexpected} "
                                 f"(expected {list(expected)})")
        staged = {}
        for k in expected:
            if k not in state_dict:
                continue
            current = getattr(self, k)
            v = _to_numpy(state_dict[k])
            if v.dtype.kind not in "biuf" and not (BFLOAT16 is not None and v.dtype == BFLOAT16):
                raise TypeError(f"{cls}: {k!r} must be a real number array, got dtype {v.dtype}")
            if v.shape != current.shape:
                raise ValueError(f"{cls}: {k!r} has shape {v.shape}, expected {current.shape}")
            if k == "num_batches_tracked":
                if not (np.isfinite(v) and v == np.round(v) and v >= 0):
                    raise ValueError(f"{cls}: 'num_batches_tracked' must be a whole number "
                                     f">= 0, got {v!r}")
                staged[k] = np.array(v, dtype=np.int64)
            else:
                staged[k] = np.array(v, dtype=current.dtype)
        for k, v in staged.items():
            current = getattr(self, k)
            if current.flags.writeable:
                current[...] = v        # in place, like torch: references stay valid
            else:
                setattr(self, k, v)
        return self

    # -------------------------------------------------------------- repr
    def _extra_repr(self):
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self._extra_repr()}, dtype={self.dtype.name})"


def _running_update(layer, call):
    """Run ``call(running_mean, running_var)`` with arrays the functional form can update.

    bfloat16 buffers are passed as float32 copies and written back; others
    are updated in place.
    """
    rm, rv = layer.running_mean, layer.running_var
    if BFLOAT16 is not None and rm.dtype == BFLOAT16:
        rm32, rv32 = rm.astype(np.float32), rv.astype(np.float32)
        y = call(rm32, rv32)
        rm[...] = rm32
        rv[...] = rv32
        return y
    return call(rm, rv)


def _running_for_eval(layer):
    """Running statistics to normalize with (bfloat16 ones as float32 copies)."""
    rm, rv = layer.running_mean, layer.running_var
    if BFLOAT16 is not None and rm.dtype == BFLOAT16:
        return rm.astype(np.float32), rv.astype(np.float32)
    return rm, rv


def _momentum_now(layer):
    """The factor of this training step: ``momentum`` or ``1/(batches seen + 1)``."""
    if layer.momentum is not None:
        return layer.momentum
    return 1.0 / float(int(layer.num_batches_tracked) + 1)


class _RunningStatsMixin:
    """Buffers of BatchNorm / InstanceNorm."""

    def _init_channels(self, num_features, axis, eps, momentum, affine, track_running_stats):
        cls = type(self).__name__
        self.num_features = _positive_int(num_features, "num_features", cls)
        self.axis = _axis_arg(axis, cls)
        self.eps = _eps_arg(eps, cls)
        self.momentum = _momentum_arg(momentum, cls)
        self.affine = check_bool(affine, "affine", cls)
        self.track_running_stats = check_bool(track_running_stats, "track_running_stats", cls)
        self._init_affine(self.num_features, self.affine)
        self._init_running(self.num_features, self.track_running_stats)

    def _init_running(self, num_features, track):
        if track:
            self.running_mean = np.zeros(num_features, dtype=self.dtype)
            self.running_var = np.ones(num_features, dtype=self.dtype)
            self.num_batches_tracked = np.array(0, dtype=np.int64)
            self._buffer_names = ("running_mean", "running_var", "num_batches_tracked")
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
            self._buffer_names = ()

    def reset_running_stats(self):
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0 (when tracked)."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def _init_affine(self, num_features, affine):
        if affine:
            self.weight = np.ones(num_features, dtype=self.dtype)
            self.bias = np.zeros(num_features, dtype=self.dtype)
            self._param_names = ("weight", "bias")
        else:
            self.weight = self.bias = None
            self._param_names = ()

    def _check_channels(self, x, fn):
        a = np.asarray(x) if not isinstance(x, np.ndarray) else x
        if a.ndim < 2:
            return a  # the functional form reports it
        ax = self.axis if -a.ndim <= self.axis < a.ndim else None
        if ax is not None and a.shape[ax] != self.num_features:
            if self.affine or self.track_running_stats or fn == "BatchNorm":
                raise ValueError(f"{fn}: expected x.shape[{self.axis}] == num_features="
                                 f"{self.num_features}, got input of shape {a.shape}")
            warnings.warn(f"{fn}: x.shape[{self.axis}]={a.shape[ax]} does not match "
                          f"num_features={self.num_features} (unused: affine=False and "
                          f"track_running_stats=False)", stacklevel=3)
        return a

    def _running_repr(self):
        return (f"{self.num_features}, axis={self.axis}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


# ------------------------------------------------------------------ LayerNorm
def _trailing(layer, x):
    """``x`` as an array whose trailing axes are ``normalized_shape``, and those axes."""
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    k = len(layer.normalized_shape)
    if a.ndim < k or tuple(a.shape[a.ndim - k:]) != layer.normalized_shape:
        raise ValueError(f"{type(layer).__name__}: x must end with normalized_shape="
                         f"{layer.normalized_shape}, got input of shape {a.shape}")
    return a, tuple(range(-k, 0))


class LayerNorm(_Layer):
    """Layer normalization over the trailing ``len(normalized_shape)`` axes.

    Like ``torch.nn.LayerNorm``: ``y = (x - mean) / sqrt(var + eps) * weight + bias``
    with the mean and biased variance over the last axes of ``x``, which must
    have shape ``normalized_shape``.

    Parameters
    ----------
    normalized_shape : int or tuple of int
        Shape of the trailing axes normalized together.
    eps : float
        Added to the variance inside the square root.
    elementwise_affine : bool
        Learnable ``weight`` (ones) and, with ``bias=True``, ``bias`` (zeros),
        both of shape ``normalized_shape``.
    bias : bool
        Whether the affine has a bias (PyTorch's ``bias=``).
    dtype : dtype
        Storage dtype of the parameters (float32 by default).

    Notes
    -----
    Statistics are computed by :func:`cnorm.layer_norm` (Welford/Chan with
    float64 accumulation, double-double for float64 input); the output has
    the dtype of ``x``.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> ln = cnorm.LayerNorm(3, eps=0.0, dtype=np.float64)
    >>> ln(np.array([[1., 2., 3.]]))
    array([[-1.22474487,  0.        ,  1.22474487]])
    >>> sorted(ln.state_dict())
    ['bias', 'weight']
    """

    def __init__(self, normalized_shape, *, eps=1e-5, elementwise_affine=True, bias=True,
                 dtype=np.float32):
        super().__init__(dtype)
        cls = type(self).__name__
        self.normalized_shape = _shape_arg(normalized_shape, "normalized_shape", cls)
        self.eps = _eps_arg(eps, cls)
        self.elementwise_affine = check_bool(elementwise_affine, "elementwise_affine", cls)
        has_bias = check_bool(bias, "bias", cls)
        names = []
        self.weight = self.bias = None
        if self.elementwise_affine:
            self.weight = np.ones(self.normalized_shape, dtype=self.dtype)
            names.append("weight")
            if has_bias:
                self.bias = np.zeros(self.normalized_shape, dtype=self.dtype)
                names.append("bias")
        self._param_names = tuple(names)

    def __call__(self, x, *, out=None, activation=None, num_threads=None, backend="auto"):
        """Normalize ``x`` over its trailing axes; see :func:`cnorm.layer_norm`.

        Parameters
        ----------
        x : array_like
            ``(..., *normalized_shape)``; float16/bfloat16/float32/float64
            keep their dtype.
        out, activation, num_threads, backend
            As in :func:`cnorm.layer_norm`.

        Returns
        -------
        ndarray
        """
        a, axis = _trailing(self, x)
        return norms.layer_norm(a, axis, self.weight, self.bias, eps=self.eps,
                                activation=activation, out=out, backend=backend,
                                num_threads=num_threads)

    def _extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}")


# ------------------------------------------------------------------ RMSNorm
class RMSNorm(_Layer):
    """RMS normalization over the trailing ``len(normalized_shape)`` axes.

    Like ``torch.nn.RMSNorm``: ``y = x / sqrt(mean(x**2) + eps) * weight``.

    Parameters
    ----------
    normalized_shape : int or tuple of int
        Shape of the trailing axes normalized together.
    eps : float, optional
        ``None``: the machine epsilon of the output dtype (``ml_dtypes.finfo``
        for bfloat16), PyTorch's rule.
    elementwise_affine : bool
        Learnable ``weight`` of shape ``normalized_shape`` (ones).
    dtype : dtype
        Storage dtype of ``weight`` (float32 by default).

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> cnorm.RMSNorm(2, eps=0.0, dtype=np.float64)(np.array([[3., 4.]]))
    array([[0.84852814, 1.13137085]])
    """

    def __init__(self, normalized_shape, *, eps=None, elementwise_affine=True, dtype=np.float32):
        super().__init__(dtype)
        cls = type(self).__name__
        self.normalized_shape = _shape_arg(normalized_shape, "normalized_shape", cls)
        self.eps = _eps_arg(eps, cls, allow_none=True)
        self.elementwise_affine = check_bool(elementwise_affine, "elementwise_affine", cls)
        self.weight = np.ones(self.normalized_shape, dtype=self.dtype) if self.elementwise_affine else None
        self._param_names = ("weight",) if self.elementwise_affine else ()

    def __call__(self, x, *, out=None, activation=None, num_threads=None, backend="auto"):
        """Normalize ``x`` over its trailing axes; see :func:`cnorm.rms_norm`."""
        a, axis = _trailing(self, x)
        return norms.rms_norm(a, axis, self.weight, eps=self.eps,
                              activation=activation, out=out, backend=backend,
                              num_threads=num_threads)

    def _extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


# ------------------------------------------------------------------ BatchNorm
class BatchNorm(_RunningStatsMixin, _Layer):
    """Batch normalization over every axis but the channel axis (any rank).

    Like ``torch.nn.BatchNorm1d/2d/3d`` (``axis=1``), or channels-last with
    ``axis=-1``.  In training mode the batch statistics normalize and, when
    ``track_running_stats``, update the running statistics in place
    (``r = (1 - m) * r + m * stat``, unbiased variance) and increment
    ``num_batches_tracked``.  In eval mode the running statistics normalize,
    or the batch statistics when they are not tracked (as torch does).

    Parameters
    ----------
    num_features : int
        Number of channels ``C`` (``x.shape[axis]``).
    axis : int
        The channel axis.
    eps : float
        Added to the variance inside the square root.
    momentum : float in [0, 1] or None
        Weight of the new batch in the running statistics; ``None`` is the
        cumulative moving average, factor ``1 / num_batches_tracked`` (counted
        with the current batch), PyTorch's rule.
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros) of shape ``(C,)``.
    track_running_stats : bool
        Keep ``running_mean`` (zeros), ``running_var`` (ones) and
        ``num_batches_tracked`` (int64 0-d array).
    dtype : dtype
        Storage dtype of parameters and running statistics (float32).

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> bn = cnorm.BatchNorm(2, eps=0.0, dtype=np.float64)
    >>> bn(np.array([[1., 10.], [3., 30.]]))
    array([[-1., -1.],
           [ 1.,  1.]])
    >>> bn.running_mean, int(bn.num_batches_tracked)
    (array([0.2, 2. ]), 1)
    """

    def __init__(self, num_features, *, axis=1, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32):
        _Layer.__init__(self, dtype)
        self._init_channels(num_features, axis, eps, momentum, affine, track_running_stats)

    def __call__(self, x, *, out=None, activation=None, num_threads=None, backend="auto"):
        """Normalize ``x``; see :func:`cnorm.batch_norm`.

        Parameters
        ----------
        x : array_like
            ``(N, C, ...)`` for ``axis=1``; keeps a float dtype.
        out, activation, num_threads, backend
            As in :func:`cnorm.batch_norm`.

        Returns
        -------
        ndarray
        """
        a = self._check_channels(x, "BatchNorm")
        kw = dict(axis=self.axis, eps=self.eps, activation=activation, out=out,
                  backend=backend, num_threads=num_threads)
        if self.training and self.track_running_stats:
            y = _running_update(self, lambda rm, rv: norms.batch_norm(
                a, self.weight, self.bias, running_mean=rm, running_var=rv, training=True,
                momentum=_momentum_now(self), **kw))
            self.num_batches_tracked += 1
            return y
        if self.training or not self.track_running_stats:
            return norms.batch_norm(a, self.weight, self.bias, training=True, **kw)
        rm, rv = _running_for_eval(self)
        return norms.batch_norm(a, self.weight, self.bias, running_mean=rm, running_var=rv,
                                training=False, **kw)

    def _extra_repr(self):
        return self._running_repr()


# ------------------------------------------------------------------ InstanceNorm
class InstanceNorm(_RunningStatsMixin, _Layer):
    """Instance normalization: statistics per (sample, channel); axis 0 is the batch.

    Like ``torch.nn.InstanceNorm1d/2d/3d`` (``axis=1``), or channels-last with
    ``axis=-1``.  With ``track_running_stats`` the running statistics are the
    moving average of the batch average of the per-instance mean / unbiased
    variance (updated in training mode, used in eval mode).

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    axis : int
        The channel axis (not 0).
    eps : float
    momentum : float in [0, 1] or None
        ``None`` is the cumulative moving average over ``num_batches_tracked``.
    affine : bool
        Learnable ``weight``/``bias`` of shape ``(C,)`` (off by default, like torch).
    track_running_stats : bool
        Off by default, like torch.
    dtype : dtype
        Storage dtype of parameters and running statistics (float32).

    Notes
    -----
    Differences from torch, where torch's behaviour is arguably accidental:
    ``num_batches_tracked`` counts the training batches (torch leaves it at
    0) and ``momentum=None`` is the cumulative average (torch uses 0: the
    running statistics never move).  With a float momentum the running
    statistics and outputs are torch's.  Like torch, a channel count that
    differs from ``num_features`` is an error when the layer has parameters or
    running statistics, and only a warning otherwise.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> cnorm.InstanceNorm(1, eps=0.0)(np.array([[[1., 3.]]]))
    array([[[-1.,  1.]]])
    """

    def __init__(self, num_features, *, axis=1, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, dtype=np.float32):
        _Layer.__init__(self, dtype)
        self._init_channels(num_features, axis, eps, momentum, affine, track_running_stats)

    def __call__(self, x, *, out=None, activation=None, num_threads=None, backend="auto"):
        """Normalize ``x``; see :func:`cnorm.instance_norm`."""
        a = self._check_channels(x, "InstanceNorm")
        kw = dict(axis=self.axis, eps=self.eps, activation=activation, out=out,
                  backend=backend, num_threads=num_threads)
        if not self.track_running_stats:
            return norms.instance_norm(a, self.weight, self.bias, training=True, **kw)
        if self.training:
            y = _running_update(self, lambda rm, rv: norms.instance_norm(
                a, self.weight, self.bias, running_mean=rm, running_var=rv, training=True,
                momentum=_momentum_now(self), **kw))
            self.num_batches_tracked += 1
            return y
        rm, rv = _running_for_eval(self)
        return norms.instance_norm(a, self.weight, self.bias, running_mean=rm, running_var=rv,
                                   training=False, **kw)

    def _extra_repr(self):
        return self._running_repr()


# ------------------------------------------------------------------ GroupNorm
class GroupNorm(_Layer):
    """Group normalization: statistics per (sample, group of channels).

    Like ``torch.nn.GroupNorm``: the ``num_channels`` channels on ``axis``
    (axis 0 is the batch) are split into ``num_groups`` consecutive groups,
    each normalized over its channels and all other axes; then the
    per-channel affine.

    Parameters
    ----------
    num_groups : int
        Must divide ``num_channels``.
    num_channels : int
    eps : float
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros) of shape ``(C,)``.
    dtype : dtype
        Storage dtype of the parameters (float32).
    axis : int
        The channel axis (1, like torch; ``-1`` for channels-last data).
        An extension of torch's signature.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> cnorm.GroupNorm(1, 2, eps=0.0)(np.array([[1., 3.]]))
    array([[-1.,  1.]])
    """

    def __init__(self, num_groups, num_channels, *, eps=1e-5, affine=True, dtype=np.float32,
                 axis=1):
        super().__init__(dtype)
        cls = type(self).__name__
        self.num_groups = _positive_int(num_groups, "num_groups", cls)
        self.num_channels = _positive_int(num_channels, "num_channels", cls)
        if self.num_channels % self.num_groups:
            raise ValueError(f"{cls}: num_groups={self.num_groups} does not divide "
                             f"num_channels={self.num_channels}")
        self.eps = _eps_arg(eps, cls)
        self.affine = check_bool(affine, "affine", cls)
        self.axis = _axis_arg(axis, cls)
        if self.affine:
            self.weight = np.ones(self.num_channels, dtype=self.dtype)
            self.bias = np.zeros(self.num_channels, dtype=self.dtype)
            self._param_names = ("weight", "bias")
        else:
            self.weight = self.bias = None
            self._param_names = ()

    def __call__(self, x, *, out=None, activation=None, num_threads=None, backend="auto"):
        """Normalize ``x``; see :func:`cnorm.group_norm`."""
        a = np.asarray(x) if not isinstance(x, np.ndarray) else x
        if a.ndim >= 2 and -a.ndim <= self.axis < a.ndim and a.shape[self.axis] != self.num_channels:
            raise ValueError(f"GroupNorm: expected x.shape[{self.axis}] == num_channels="
                             f"{self.num_channels}, got input of shape {a.shape}")
        return norms.group_norm(a, self.num_groups, self.weight, self.bias, axis=self.axis,
                                eps=self.eps, activation=activation, out=out, backend=backend,
                                num_threads=num_threads)

    def _extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"affine={self.affine}, axis={self.axis}")

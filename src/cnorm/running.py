"""Streaming statistics: :class:`RunningMoments`.

A running object holds one mergeable state ``(n, mean_hi, mean_lo, M2_hi,
M2_lo)`` per kept position (float64, see :mod:`cnorm._engine`).  Each chunk is
reduced by the same engine as :func:`cnorm.moments` and merged in with Chan's
formula in double-double, so streaming, merging in any order and one-shot
:func:`cnorm.moments` agree within the precision contract.
"""
from __future__ import annotations

from operator import index

import numpy as np

from . import _engine
from ._axes import normalize_axes
from ._validate import as_float_array, check_bool, check_real
from .moments import moment_states

__all__ = ["RunningMoments"]


def _check_axis_arg(axis):
    """Type-check ``axis`` (None, int or tuple of ints) before any chunk is seen."""
    if axis is None:
        return None
    items = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    for a in items:
        if isinstance(a, (bool, np.bool_)):
            raise TypeError(f"RunningMoments: axis must be None, an int or a tuple of ints, "
                            f"got {axis!r}")
        try:
            index(a)
        except TypeError:
            raise TypeError(f"RunningMoments: axis must be None, an int or a tuple of ints, "
                            f"got {axis!r}") from None
    return tuple(index(a) for a in items) if isinstance(axis, (tuple, list)) else index(axis)


def _scalar_or_array(a):
    return a if a.ndim else a[()]


class RunningMoments:
    """Mean and variance of a stream of chunks, over a fixed axis.

    Parameters
    ----------
    axis : int, tuple of int or None, default 0
        Axes reduced in every chunk (negative allowed, ``None`` = all).  They
        are resolved against the first chunk's ``ndim``; every later chunk must
        have that ``ndim`` and the same *kept shape* (the sizes of the other
        axes), while the reduced axes may have any length.

    Attributes
    ----------
    count : ndarray of float64, shape ``kept_shape``
        Number of values seen per kept position (the sum of the weights when
        weights were given).
    mean : ndarray of float64, shape ``kept_shape``
        Running mean (NaN where ``count == 0``).
    axis : tuple of int or the constructor's value
        The normalized reduced axes once a chunk has been seen.
    kept_shape : tuple of int or None
        ``None`` until the first chunk fixes it.

    Notes
    -----
    Every chunk becomes states with the moments engine (float64 accumulation
    for float16/float32, double-double for float64) and is merged in with
    Chan's formula in double-double, so the result does not depend on how the
    data was chunked or in which order objects are merged, beyond the last
    bits of the double-double.  Results are float64 whatever the chunks'
    dtypes (chunks of different float dtypes may be mixed); integer and bool
    chunks count as float64.  A NaN makes its position's mean and variance NaN
    from then on; ±inf makes the variance NaN.

    ``merge`` and ``+=`` update the object in place (and return it); ``a + b``
    returns a new object and leaves both operands unchanged.  A failed call
    (bad dtype, shape, axes or weights) raises before anything is changed.
    Objects pickle with their full state.

    Examples
    --------
    >>> import numpy as np
    >>> from cnorm import RunningMoments
    >>> rm = RunningMoments(axis=0)
    >>> rm.update(np.array([[1e8 + 1, 0.0], [1e8 + 2, 1.0]])).update(np.array([[1e8 + 3, 2.0]]))
    RunningMoments(axis=(0,), kept_shape=(2,), count=3.0)
    >>> rm.mean
    array([1.00000002e+08, 1.00000000e+00])
    >>> rm.var(ddof=1)
    array([1., 1.])
    """

    def __init__(self, axis=0):
        self.axis = _check_axis_arg(axis)
        self.kept_shape = None
        self._ndim = None
        self._states = _engine.empty_states(())

    # ---------------------------------------------------------------- input
    def _resolve(self, ndim: int, what: str):
        """(axes, kept_shape-positions) for a chunk of ``ndim`` dims; checks ndim."""
        if self._ndim is not None and ndim != self._ndim:
            raise ValueError(f"RunningMoments.{what}: chunk has {ndim} dimensions, expected "
                             f"{self._ndim} like the first chunk")
        return normalize_axes(self.axis, ndim)

    def update(self, chunk, weights=None, *, skipna=False, backend="auto", num_threads=None):
        """Add the values of ``chunk`` (and return ``self``).

        Parameters
        ----------
        chunk : array_like
            float16/float32/float64, integer or bool values; any strides.
        weights : array_like, optional
            Non-negative, finite frequency weights broadcastable to ``chunk``
            (a weight of 2 counts a value twice; NumPy broadcasting, so
            per-row weights of a 2-d chunk are ``w[:, None]``).
        skipna : bool, default False
            Ignore NaN values (they count as weight 0).
        backend : {'auto', 'cython', 'numba', 'numpy'}
        num_threads : int, optional

        Returns
        -------
        RunningMoments
            ``self``.
        """
        xa, _ = as_float_array(chunk, "chunk", "RunningMoments.update")
        check_bool(skipna, "skipna", "RunningMoments.update")
        axes = self._resolve(xa.ndim, "update")
        kept = tuple(s for i, s in enumerate(xa.shape) if i not in axes)
        if self.kept_shape is not None and kept != self.kept_shape:
            raise ValueError(f"RunningMoments.update: chunk of shape {xa.shape} has kept shape "
                             f"{kept} over axis={axes}, expected {self.kept_shape}")
        states, *_ = moment_states(xa, axes, weights=weights, skipna=skipna, backend=backend,
                                   num_threads=num_threads, fn="RunningMoments.update")
        new = states if self.kept_shape is None else self._states.copy()
        if self.kept_shape is not None:
            _engine.merge(new, states)
        self.axis, self.kept_shape, self._ndim = axes, kept, xa.ndim
        self._states = np.ascontiguousarray(new)
        return self

    # ---------------------------------------------------------------- merging
    def _check_compatible(self, other):
        if not isinstance(other, RunningMoments):
            raise TypeError(f"RunningMoments.merge: other must be a RunningMoments, "
                            f"got {type(other).__name__}")
        if self.kept_shape is None or other.kept_shape is None:
            known, empty = (other, self) if self.kept_shape is None else (self, other)
            if known.kept_shape is not None:
                axes = empty._resolve(known._ndim, "merge")
                if axes != known.axis:
                    raise ValueError(f"RunningMoments.merge: axis={empty.axis!r} does not match "
                                     f"axis={known.axis!r}")
            return
        if (self.axis, self._ndim, self.kept_shape) != (other.axis, other._ndim, other.kept_shape):
            raise ValueError(
                f"RunningMoments.merge: cannot merge statistics over axis={other.axis} of "
                f"{other._ndim}-d chunks (kept shape {other.kept_shape}) into axis={self.axis} "
                f"of {self._ndim}-d chunks (kept shape {self.kept_shape})")

    def merge(self, other):
        """Merge the statistics of ``other`` into this object (and return ``self``).

        ``other`` is unchanged.  Both must reduce the same axes of chunks with
        the same ``ndim`` and kept shape (an object that has seen no chunk
        merges with anything compatible with its ``axis``).
        """
        self._check_compatible(other)
        if other.kept_shape is None:
            return self
        if self.kept_shape is None:
            self.axis, self.kept_shape, self._ndim = other.axis, other.kept_shape, other._ndim
            self._states = other._states.copy()
            return self
        new = self._states.copy()
        _engine.merge(new, other._states)
        self._states = new
        return self

    def copy(self):
        """An independent copy."""
        new = RunningMoments.__new__(RunningMoments)
        new.__dict__.update(self.__dict__)
        new._states = self._states.copy()
        return new

    def __add__(self, other):
        if not isinstance(other, RunningMoments):
            return NotImplemented
        return self.copy().merge(other)

    def __iadd__(self, other):
        if not isinstance(other, RunningMoments):
            return NotImplemented
        return self.merge(other)

    @classmethod
    def _from_states(cls, states, axis, ndim):
        """An object holding ``states`` (``kept_shape + (5,)``) over normalized ``axis``."""
        new = cls(axis)
        new.axis, new._ndim = tuple(axis), int(ndim)
        new._states = np.array(states, dtype=np.float64, order="C")
        new.kept_shape = new._states.shape[:-1]
        return new

    # ---------------------------------------------------------------- results
    @property
    def count(self):
        return _scalar_or_array(self._states[..., 0].copy())

    @property
    def mean(self):
        with np.errstate(invalid="ignore"):
            m = np.where(np.isfinite(self._states[..., 1]),
                         self._states[..., 1] + self._states[..., 2], self._states[..., 1])
        return _scalar_or_array(np.where(self._states[..., 0] > 0, m, np.nan))

    def var(self, ddof=0):
        """Variance ``M2 / (count - ddof)`` (float64, shape ``kept_shape``).

        ``count - ddof <= 0`` gives NaN or inf with a RuntimeWarning, like ``np.var``.
        """
        ddof = check_real(ddof, "ddof", "RunningMoments.var")
        return _scalar_or_array(_engine.finalize(self._states, ddof)[1])

    def std(self, ddof=0):
        """Standard deviation ``sqrt(var(ddof))`` (float64, shape ``kept_shape``)."""
        return _scalar_or_array(np.sqrt(self.var(ddof)))

    def __repr__(self):
        if self.kept_shape is None:
            return f"RunningMoments(axis={self.axis!r})"
        n = self._states[..., 0]
        cnt = (f"{float(n.flat[0])!r}" if n.size and (n == n.flat[0]).all()
               else (f"[{float(n.min())!r}..{float(n.max())!r}]" if n.size else "[]"))
        return f"RunningMoments(axis={self.axis!r}, kept_shape={self.kept_shape!r}, count={cnt})"

"""Canonicalize (array, reduced axes) into the kernels' 4-d shape.

Every reduction becomes ``x[o, r1, k, r0]`` reduced over ``(r1, r0)``:

* rows     (LayerNorm, ``axis=-1``):             ``O=1, R1=1, K=rows, R0=len``
* columns  (channels-last BatchNorm, ``axis=0``): ``R0=1``, vectorized over k
* NCHW BatchNorm (reduce N, H, W; keep C):       ``R1=N, K=C, R0=H*W``

Axes are sorted by memory stride, size-1 axes dropped, neighbours merged when
their strides allow, and reduced axes with negative strides flipped (the
order of a reduction does not matter; the kept axes keep their index map).
What does not fit four dims (e.g. reduce, keep, reduce, keep) leaves *outer*
dims that the caller loops over, merging into the same states.
"""
from __future__ import annotations

import functools
import itertools

from dataclasses import dataclass, field
from operator import index

import numpy as np
from numpy.exceptions import AxisError

__all__ = ["normalize_axes", "Plan", "plan_reduction"]


def normalize_axes(axis, ndim: int, argname: str = "axis") -> tuple[int, ...]:
    """Return the sorted tuple of non-negative axes named by ``axis``.

    ``None`` means all axes.  Raises ``AxisError`` for an axis out of range
    and ``ValueError`` for a repeated axis, ``TypeError`` for a non-integer.
    """
    if axis is None:
        return tuple(range(ndim))
    if type(axis) is int and -ndim <= axis < ndim:  # fast path for the common case
        return (axis % ndim,)
    items = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    out = []
    for a in items:
        if isinstance(a, (bool, np.bool_)):
            raise TypeError(f"{argname} must be an int or a tuple of ints, got {axis!r}")
        try:
            a = index(a)
        except TypeError:
            raise TypeError(f"{argname} must be an int or a tuple of ints, got {axis!r}") from None
        if not -ndim <= a < ndim:
            raise AxisError(a, ndim, msg_prefix=argname)
        out.append(a % ndim if ndim else a)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in {argname}={axis!r}")
    return tuple(sorted(out))


@dataclass
class Plan:
    """How to run one reduction: a 4-d problem plus outer loops."""
    offset: int                      # bytes from x's data pointer to element 0 of the view
    shape: tuple                     # (O, R1, K, R0)
    strides: tuple                   # byte strides of those four dims
    so: int                          # state strides of O and K
    sk: int
    outer: list = field(default_factory=list)   # [(size, byte stride, state stride)], outermost first

    def outer_offsets(self):
        """Yield ``(byte offset into x, state offset)`` of each outer iteration
        (one ``(offset, 0)`` when there are no outer loops)."""
        return ((self.offset + off, soff) for off, soff in outer_offsets(self.outer, 2))


def plan_reduction(shape, strides, red_axes, state_strides) -> Plan:
    """Plan the reduction of an array (``shape``, byte ``strides``) over ``red_axes``.

    Plans are cached by (shape, strides, axes, state strides): a training
    loop asks for the same few plans on every call, and planning costs more
    than the kernel on small arrays.  The returned Plan is shared: read it,
    do not modify it.
    """
    return _plan_cached(tuple(shape), tuple(strides), tuple(sorted(red_axes)),
                        tuple(state_strides))


@functools.lru_cache(maxsize=1024)
def _plan_cached(shape, strides, red_axes, state_strides) -> Plan:
    return _plan_reduction(shape, strides, red_axes, state_strides)


def _plan_reduction(shape, strides, red_axes, state_strides) -> Plan:
    """Plan the reduction of an array (``shape``, byte ``strides``) over ``red_axes``.

    ``state_strides[i]`` is the index stride of kept axis ``i`` in the state
    array (ignored for reduced axes).
    """
    offset = 0
    dims = []  # [size, xstride, sstride, reduced]
    for ax, (n, s) in enumerate(zip(shape, strides)):
        red = ax in red_axes
        if n == 1:
            continue
        if red and s < 0:
            offset += (n - 1) * s
            s = -s
        dims.append([n, s, 0 if red else state_strides[ax], red])
    if any(d[0] == 0 for d in dims):
        # empty: no work (states stay empty); shape with a zero keeps kernels idle
        return Plan(offset, (0, 0, 0, 0), (0, 0, 0, 0), 0, 0, [])
    # outermost first: large strides first, zero strides (broadcast) outermost
    dims.sort(key=lambda d: -abs(d[1]) if d[1] != 0 else -np.inf)
    merged = []
    for d in dims:
        if merged:
            p = merged[-1]
            if p[3] == d[3] and p[1] == d[1] * d[0] and (d[3] or p[2] == d[2] * d[0]):
                p[0] *= d[0]
                p[1] = d[1]
                p[2] = d[2]
                continue
        merged.append(list(d))
    # peel (O, R1, K, R0) from the inside
    slots = {"R0": (1, 0, 0), "K": (1, 0, 0), "R1": (1, 0, 0), "O": (1, 0, 0)}
    order = ["R0", "K", "R1", "O"] if (merged and merged[-1][3]) else ["K", "R1", "O"]
    i = len(merged) - 1
    for name in order:
        if i < 0:
            break
        want_red = name.startswith("R")
        if merged[i][3] == want_red:
            slots[name] = tuple(merged[i][:3])
            i -= 1
    outer = [tuple(d[:3]) for d in merged[: i + 1]]
    names = ("O", "R1", "K", "R0")
    return Plan(offset,
                tuple(slots[n][0] for n in names),
                tuple(slots[n][1] for n in names),
                slots["O"][2], slots["K"][2], outer)


@dataclass(frozen=True)
class ElementwisePlan:
    """A 4-d loop over arrays of one shape: dims 0-2 outer, dim 3 the inner row
    (immutable: plans are cached and shared between calls)."""
    shape: tuple
    strides: tuple                   # per operand: a 4-tuple of strides
    outer: tuple                     # ((size, per-operand strides), ...), outermost first

    def outer_offsets(self):
        """Yield the per-operand offsets (a list, in each operand's stride unit)
        of each outer iteration (one list of zeros when there are none)."""
        return outer_offsets([(d[0], *d[1]) for d in self.outer], len(self.strides))


def outer_offsets(outer, nops):
    """Per-operand offsets (a list of ``nops``) of each iteration of the loops ``outer``
    (``(size, stride of operand 0, ..., stride of operand nops-1)``, outermost first;
    one list of zeros when there are none, the common case, without the product)."""
    if not outer:
        return iter(([0] * nops,))
    return ([sum(i * d[1 + k] for i, d in zip(idx, outer)) for k in range(nops)]
            for idx in itertools.product(*(range(d[0]) for d in outer)))


def follow_order(a, order):
    """``a`` as a dense float64 array whose memory follows the axis order ``order``
    (outermost first); ``a`` itself when it already is C-contiguous float64 in C order."""
    if order == sorted(order):   # C order, most calls: no transposes (~5 us saved)
        return np.ascontiguousarray(a, dtype=np.float64)
    inv = np.argsort(order)
    return np.ascontiguousarray(np.transpose(a, order), dtype=np.float64).transpose(inv)


def element_strides(a):
    """float64 element strides of ``a`` broadcast against a shape it broadcasts to: 0
    along its size-1 axes (size-1 axes of the target are dropped by the plans)."""
    return tuple(0 if n == 1 else s // 8 for n, s in zip(a.shape, a.strides))


def layout_order(shape, strides):
    """Axes from the largest to the smallest |stride| (size-1 axes last)."""
    return sorted(range(len(shape)),
                  key=lambda a: (shape[a] == 1, -abs(strides[a])))


def plan_elementwise(shape, operand_strides, order=None) -> ElementwisePlan:
    """Jointly canonicalize operands of one shape (strides in any unit, per operand).

    The loop order follows ``order`` (default: the first operand's strides);
    size-1 axes are dropped and neighbours merged when every operand allows.
    Plans are cached by their arguments: a small call repeated with the same
    layout (a training loop) does not plan again (~8 us of Python per call).
    """
    if order is None:
        order = layout_order(shape, operand_strides[0])
    return _plan_elementwise(tuple(shape), tuple(tuple(s) for s in operand_strides),
                             tuple(order))


@functools.lru_cache(maxsize=512)
def _plan_elementwise(shape, operand_strides, order):
    dims = [[shape[a], [s[a] for s in operand_strides]] for a in order if shape[a] != 1]
    merged = []
    for d in dims:
        if merged:
            p = merged[-1]
            if all(ps == ds * d[0] for ps, ds in zip(p[1], d[1])):
                p[0] *= d[0]
                p[1] = list(d[1])
                continue
        merged.append([d[0], list(d[1])])
    nops = len(operand_strides)
    while len(merged) < 4:
        merged.insert(0, [1, [0] * nops])
    outer, inner = merged[:-4], merged[-4:]
    return ElementwisePlan(tuple(d[0] for d in inner),
                           tuple(tuple(d[1][k] for d in inner) for k in range(nops)),
                           tuple((d[0], tuple(d[1])) for d in outer))

"""The one table of speed cases shared by ``python -m cnorm bench`` and ``bench/``.

A case is ``(operation, layout, size, dtype, implementation, threads)``.  This
module says which cases exist (:func:`speed_cases`), builds their data
(:class:`DataCache`) and turns a case into a zero-argument callable
(:func:`make_runner`), or raises :class:`Unavailable` (a layer not written yet,
torch not installed, a dtype a peer does not support) so callers report "n/a".

Implementations
---------------
``cnorm-cython``, ``cnorm-numba``
    cnorm with ``backend=``, ``num_threads=threads`` and ``out=`` (layers).
``cnorm-alloc``
    cnorm (cython) allocating its output, the fair partner of torch.
``numpy-2pass``, ``numpy-1pass``
    what a careful / a naive NumPy user writes: ``np.mean`` + ``np.var``
    (two passes) or ``E[x²] − E[x]²`` (one pass), then normalize into ``out``.
``torch``
    ``torch.nn.functional.*`` / ``torch.var_mean`` / the aten backward ops,
    ``torch.set_num_threads(threads)``, allocating the output
    (:mod:`cnorm._bench_torch`).
``floor``
    the memory-bound floor: ``np.copyto(out, x)`` for layers, a read-only
    reduction (``np.max`` of the same bytes viewed as integers of the same
    width) for statistics, ``np.copyto`` of ``dy`` and of ``x`` for backward.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from . import _config

EPS = 1e-5
CHANNELS = 64          # C of the NCHW/NHWC cases
HIDDEN = 1024          # normalized length of the row cases
GROUPS = 32            # group_norm groups

IMPLS = ("floor", "cnorm-cython", "cnorm-numba", "cnorm-alloc", "numpy-2pass",
         "numpy-1pass", "torch")
#: implementations whose speed does not depend on the thread count
SINGLE_THREADED = ("floor", "numpy-2pass", "numpy-1pass")
DTYPES = ("float16", "float32", "float64")


class Unavailable(Exception):
    """This implementation cannot run this case (reported as n/a)."""


@dataclass(frozen=True)
class Op:
    name: str      # cnorm function name
    layout: str    # short description of shape/axes
    family: str    # "stats", "layer" or "backward"
    kind: str      # "rows", "cols", "nchw", "nhwc": how the data is shaped

    @property
    def key(self) -> str:
        return f"{self.name}[{self.layout}]"


OPS = (
    Op("moments", "axis=-1", "stats", "rows"),
    Op("moments", "axis=0", "stats", "cols"),
    Op("moments", "NCHW (0,2,3)", "stats", "nchw"),
    Op("layer_norm", "last", "layer", "rows"),
    Op("rms_norm", "last", "layer", "rows"),
    Op("batch_norm", "NCHW", "layer", "nchw"),
    Op("batch_norm", "NHWC", "layer", "nhwc"),
    Op("group_norm", "NCHW", "layer", "nchw"),
    Op("instance_norm", "NCHW", "layer", "nchw"),
    Op("layer_norm_backward", "last", "backward", "rows"),
    Op("rms_norm_backward", "last", "backward", "rows"),
    Op("batch_norm_backward", "NCHW", "backward", "nchw"),
    Op("group_norm_backward", "NCHW", "backward", "nchw"),
    Op("instance_norm_backward", "NCHW", "backward", "nchw"),
)
OPS_BY_KEY = {op.key: op for op in OPS}


@dataclass(frozen=True)
class Case:
    op: Op
    size: str      # "cache" or "llc"
    dtype: str
    impl: str
    threads: int

    @property
    def group(self) -> str:
        return f"{self.op.key} {self.dtype} {self.size}"

    @property
    def id(self) -> str:
        return f"{self.op.name}-{self.op.kind}-{self.dtype}-{self.size}-{self.impl}-t{self.threads}"


def speed_cases(*, families=("stats", "layer", "backward"), dtypes=DTYPES, threads=(1, 2),
                sizes=("cache", "llc"), impls=IMPLS):
    """The table: every (operation, size, dtype, implementation, threads).

    Implementations in :data:`SINGLE_THREADED` appear once, with the first
    thread count; ``cnorm-alloc`` only for layers (statistics allocate nothing
    worth measuring).  Ordered so that cases sharing data are adjacent.
    """
    out = []
    for size in sizes:
        for dtype in dtypes:
            for op in OPS:
                if op.family not in families:
                    continue
                for t_i, t in enumerate(threads):
                    for impl in impls:
                        if impl in SINGLE_THREADED and t_i > 0:
                            continue
                        if impl == "cnorm-alloc" and op.family != "layer":
                            continue
                        if impl == "numpy-1pass" and op.family == "backward":
                            continue
                        out.append(Case(op, size, dtype, impl, t))
    return out


# ----------------------------------------------------------------------- sizes
llc_bytes = _config.llc_bytes


def size_bytes(mode: str) -> dict:
    """Input size in bytes of the 'cache' and 'llc' cases for a mode.

    full: 256 KiB and 4x the LLC (at least 64 MiB, at most 1 GiB);
    quick: 256 KiB and 1.25x the LLC (at least 32 MiB, at most 256 MiB: the
    inputs, plus outputs for layers, do not fit in the LLC);
    tiny (smoke tests): 16 KiB and 256 KiB.
    """
    llc = llc_bytes()
    mib = 1 << 20
    if mode == "tiny":
        return {"cache": 16 << 10, "llc": 256 << 10}
    if mode == "quick":
        big = min(max(int(1.25 * llc), 32 * mib), 256 * mib)
    else:
        big = min(max(4 * llc, 64 * mib), 1024 * mib)
    return {"cache": 256 << 10, "llc": big // mib * mib}


def shape_for(kind: str, nelem: int, size: str) -> tuple:
    """Array shape of at most ``nelem`` elements for a data kind."""
    if kind in ("rows", "cols"):
        c = min(HIDDEN, nelem // 2)
        return (nelem // c, c)
    hw = 128 * 128 if size == "llc" else 16 * 16
    while hw > 1 and nelem // (CHANNELS * hw) < 2:
        hw //= 4
    side = int(round(math.sqrt(hw)))
    n = nelem // (CHANNELS * side * side)
    if kind == "nhwc":
        return (n, side, side, CHANNELS)
    return (n, CHANNELS, side, side)


class DataCache:
    """Random inputs for one (dtype, size) at a time, reshaped per operation.

    Every operation of a (dtype, size) reads the same buffer (``x``, and
    ``dy`` for backward), so a whole row of the table builds its data once.
    """

    def __init__(self, mode: str = "full", seed: int = 20261125):
        self.mode = mode
        self.seed = seed
        self.sizes = size_bytes(mode)
        self._key = None
        self._bufs: dict = {}

    def buffers(self, dtype: str, size: str) -> dict:
        key = (dtype, size)
        if key != self._key:
            self._bufs = {}
            self._key = None
            dt = np.dtype(dtype)
            n = self.sizes[size] // dt.itemsize
            rng = np.random.default_rng(self.seed)
            x = rng.standard_normal(n, dtype=np.float32)
            x += np.float32(0.5)
            self._bufs = {"x": x.astype(dt), "out": np.zeros(n, dt), "n": n}
            self._key = key
        return self._bufs

    def dy(self):
        b = self._bufs
        if "dy" not in b:
            rng = np.random.default_rng(self.seed + 1)
            b["dy"] = rng.standard_normal(b["n"], dtype=np.float32).astype(b["x"].dtype)
        return b["dy"]

    def arrays(self, op: Op, dtype: str, size: str) -> dict:
        """x, out, weight, bias, dy shaped for ``op`` plus its axes."""
        b = self.buffers(dtype, size)
        shape = shape_for(op.kind, b["n"], size)
        m = math.prod(shape)
        x = b["x"][:m].reshape(shape)
        out = b["out"][:m].reshape(shape)
        dt = x.dtype
        if op.kind in ("rows", "cols"):
            chan_axis = x.ndim - 1
            red = (1,) if op.kind == "rows" else (0,)
        elif op.kind == "nchw":
            chan_axis = 1
            red = (0, 2, 3)
        else:
            chan_axis = 3
            red = (0, 1, 2)
        nparam = x.shape[chan_axis]
        rng = np.random.default_rng(self.seed + 2)
        w = (1.0 + 0.1 * rng.standard_normal(nparam)).astype(dt)
        bias = (0.1 * rng.standard_normal(nparam)).astype(dt)
        d = {"x": x, "out": out, "weight": w, "bias": bias, "chan_axis": chan_axis,
             "red": red, "shape": shape}
        if op.family == "backward":
            d["dy"] = self.dy()[:m].reshape(shape)
        return d


# -------------------------------------------------------------------- runners
def _cnorm_fn(name):
    import cnorm
    try:
        return getattr(cnorm, name)
    except (AttributeError, ImportError) as e:
        raise Unavailable(f"cnorm.{name} is not available ({type(e).__name__})") from None


def _stat_axes(op: Op, d) -> tuple:
    """Axes the statistics of ``op`` reduce over."""
    nd = d["x"].ndim
    base = op.name.replace("_backward", "")
    if op.name == "moments":
        return d["red"]
    if base in ("layer_norm", "rms_norm"):
        return (nd - 1,)
    if base == "batch_norm":
        return d["red"]
    if base == "instance_norm":
        return (2, 3)
    if base == "group_norm":
        return (2, 3, 4)   # on the (N, G, C/G, H, W) view
    raise ValueError(op.name)


def _cnorm_runner(op: Op, d, backend: str, threads: int, allocate: bool):
    fn = _cnorm_fn(op.name)
    x, w, b = d["x"], d["weight"], d["bias"]
    kw = {"backend": backend, "num_threads": threads}
    if op.family == "layer" and not allocate:
        kw["out"] = d["out"]
    name = op.name
    if name == "moments":
        axis = {"rows": -1, "cols": 0, "nchw": (0, 2, 3)}[op.kind]
        return lambda: fn(x, axis=axis, **kw)
    if name == "layer_norm":
        return lambda: fn(x, -1, w, b, eps=EPS, **kw)
    if name == "rms_norm":
        return lambda: fn(x, -1, w, **kw)
    if name == "batch_norm":
        axis = 1 if op.kind == "nchw" else -1
        return lambda: fn(x, w, b, axis=axis, training=True, eps=EPS, **kw)
    if name == "group_norm":
        return lambda: fn(x, GROUPS, w, b, axis=1, eps=EPS, **kw)
    if name == "instance_norm":
        return lambda: fn(x, w, b, axis=1, eps=EPS, **kw)
    # backward: statistics from the matching forward (cnorm's own)
    fwd = _cnorm_fn(name.replace("_backward", ""))
    dy = d["dy"]
    if name == "layer_norm_backward":
        _, mean, rstd = fwd(x, -1, w, b, eps=EPS, return_stats=True)
        return lambda: fn(dy, x, mean, rstd, w, b, axis=-1, **kw)
    if name == "rms_norm_backward":
        _, rstd = fwd(x, -1, w, return_stats=True)
        return lambda: fn(dy, x, rstd, w, axis=-1, **kw)
    if name == "batch_norm_backward":
        _, mean, rstd = fwd(x, w, b, axis=1, eps=EPS, return_stats=True)
        return lambda: fn(dy, x, mean, rstd, w, b, axis=1, training=True, **kw)
    if name == "group_norm_backward":
        _, mean, rstd = fwd(x, GROUPS, w, b, axis=1, eps=EPS, return_stats=True)
        return lambda: fn(dy, x, mean, rstd, GROUPS, w, b, axis=1, **kw)
    if name == "instance_norm_backward":
        _, mean, rstd = fwd(x, w, b, axis=1, eps=EPS, return_stats=True)
        return lambda: fn(dy, x, mean, rstd, w, b, axis=1, **kw)
    raise ValueError(name)


def _param_shape(d):
    shape = [1] * d["x"].ndim
    shape[d["chan_axis"]] = d["x"].shape[d["chan_axis"]]
    return tuple(shape)


def _numpy_runner(op: Op, d, onepass: bool):
    x, out = d["x"], d["out"]
    if op.name == "moments":
        ax = d["red"]
        if onepass:
            def run():
                m = x.mean(axis=ax)
                return m, (x * x).mean(axis=ax) - m * m
            return run
        return lambda: np.var(x, axis=ax)
    if op.family == "backward":
        if onepass:
            raise Unavailable("no one-pass variant of a backward pass")
        return _numpy_backward(op, d)
    axes = _stat_axes(op, d)
    xv, ov = x, out
    ps = _param_shape(d)
    w = d["weight"].reshape(ps)
    b = d["bias"].reshape(ps)
    if op.name == "group_norm":
        n, c = x.shape[:2]
        xv = x.reshape(n, GROUPS, c // GROUPS, *x.shape[2:])
        ov = out.reshape(xv.shape)
    rms = op.name == "rms_norm"
    if rms and not onepass:
        raise Unavailable("RMSNorm has a single (one-pass) NumPy formula")
    dt = x.dtype.type

    def run():
        if rms:
            r = 1 / np.sqrt((xv * xv).mean(axis=axes, keepdims=True) + np.finfo(dt).eps)
            np.multiply(xv, r, out=ov)
        else:
            m = xv.mean(axis=axes, keepdims=True)
            if onepass:
                v = (xv * xv).mean(axis=axes, keepdims=True) - m * m
            else:
                v = xv.var(axis=axes, keepdims=True)
            np.subtract(xv, m, out=ov)
            np.multiply(ov, 1 / np.sqrt(v + dt(EPS)), out=ov)
        out[...] *= w
        if not rms:
            out[...] += b
        return out
    return run


def _numpy_backward(op: Op, d):
    """Plain NumPy backward (centred formula) in the input dtype."""
    x, dy, out = d["x"], d["dy"], d["out"]
    axes = _stat_axes(op, d)
    ps = _param_shape(d)
    w = d["weight"].reshape(ps)
    pax = tuple(i for i in range(x.ndim) if i != d["chan_axis"])
    rms = op.name.startswith("rms")
    xv, dyv, ov = x, dy, out
    if op.name.startswith("group"):
        n, c = x.shape[:2]
        xv = x.reshape(n, GROUPS, c // GROUPS, *x.shape[2:])
        dyv, ov = dy.reshape(xv.shape), out.reshape(xv.shape)
    eps = x.dtype.type(np.finfo(x.dtype).eps if rms else EPS)

    def run():
        if rms:
            rstd = 1 / np.sqrt((xv * xv).mean(axis=axes, keepdims=True) + eps)
            xhat = xv * rstd
        else:
            m = xv.mean(axis=axes, keepdims=True)
            rstd = 1 / np.sqrt(xv.var(axis=axes, keepdims=True) + eps)
            xhat = (xv - m) * rstd
        g = (dy * w).reshape(xv.shape)
        c2 = (g * xhat).mean(axis=axes, keepdims=True)
        if rms:
            np.subtract(g, xhat * c2, out=ov)
        else:
            np.subtract(g, g.mean(axis=axes, keepdims=True) + xhat * c2, out=ov)
        np.multiply(ov, rstd, out=ov)
        dw = (dyv * xhat).reshape(x.shape).sum(axis=pax)
        db = None if rms else dy.sum(axis=pax)
        return out, dw, db
    return run


def _floor_runner(op: Op, d):
    x, out = d["x"], d["out"]
    if op.family == "stats":
        xi = x.view(np.dtype(f"i{x.dtype.itemsize}"))
        return lambda: np.max(xi)
    if op.family == "backward":
        dy = d["dy"]

        def run():
            np.copyto(out, dy)
            np.copyto(out, x)
        return run
    return lambda: np.copyto(out, x)


def _warm_up(fn):
    """Call ``fn`` once; remember how long that took in ``fn.warm_seconds``."""
    import time
    t0 = time.perf_counter()
    fn()
    fn.warm_seconds = time.perf_counter() - t0


def make_runner(case: Case, d: dict):
    """A zero-argument callable running ``case`` on the arrays ``d`` (from
    :meth:`DataCache.arrays`), called once already (its duration is in the
    callable's ``warm_seconds``); raises :class:`Unavailable`."""
    op, impl = case.op, case.impl
    if impl == "floor":
        fn = _floor_runner(op, d)
    elif impl in ("cnorm-cython", "cnorm-numba", "cnorm-alloc"):
        backend = "numba" if impl == "cnorm-numba" else "cython"
        fn = _cnorm_runner(op, d, backend, case.threads, allocate=impl == "cnorm-alloc")
    elif impl in ("numpy-2pass", "numpy-1pass"):
        fn = _numpy_runner(op, d, onepass=impl == "numpy-1pass")
    elif impl == "torch":
        from ._bench_torch import torch_runner
        return torch_runner(op, d, case.threads, _warm_up)   # already called once
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    try:
        with np.errstate(all="ignore"):
            _warm_up(fn)
    except (AttributeError, ImportError, NotImplementedError) as e:
        raise Unavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:80]}") from None
    except (TypeError, ValueError) as e:
        if impl.startswith("cnorm"):
            raise Unavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:80]}") from None
        raise
    return fn

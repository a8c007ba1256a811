"""The ``numba`` backend: the moments kernels of ``_kernels.pyx`` as ``@njit`` code.

Algorithm (the same as the Cython kernels, block for block and lane for lane,
so both backends give the same numbers):

1. A slice is cut into *blocks* of at most ``BLOCK`` elements (rows of
   length >= ``BLOCK`` are split, shorter rows grouped ``BLOCK // rowlen`` to
   a block).  A block is read once, shifted by its first element ``c``: the
   centred sums ``S1 = Σ(x - c)`` and ``S2 = Σ(x - c)²`` of each contiguous
   row are taken in ``LANES`` lanes and reduced by a fixed pairwise tree.
   float16/float32 inputs accumulate in float64, float64 inputs in
   double-double (TwoSum, exact squares via ``llvm.fma``).
2. Block state: ``n``, ``mean = c + S1/n`` (double-double) and
   ``M2 = S2 - S1²/n`` (float64 for float16/float32, double-double for
   float64; clamped at 0).  As ``c`` is one of the values,
   ``(c - mean)² <= n·var``: the subtraction cancels at most 12 bits.
3. Blocks merge left to right into chunks of ``CHUNK_BLOCKS`` blocks (Chan's
   formula; M2 in float64 for float16/float32), chunks left to right into the
   slice in double-double.  Threads (``numba.prange``) take whole (slice,
   chunk) tasks; the partial states are merged serially in a fixed order, so
   results do not depend on the thread count.

Channels-last reductions (``R0 == 1``) run a column kernel whose loops go
across up to ``TILE`` columns at a time.

A *state* is five float64 ``(n, mean_hi, mean_lo, M2_hi, M2_lo)``.  float16
data travels as its ``uint16`` bits (Numba has no CPU float16) and is
converted exactly by :func:`half_to_f64`.

Embedding
---------
The ``@njit`` functions :func:`moments_1d`, :func:`state_merge`,
:func:`state_finalize`, :func:`merge_states`, :func:`finalize` and
:func:`half_to_f64` can be called from your own ``@njit`` code:

>>> import numpy as np, numba, cnorm._numba as cn
>>> @numba.njit
... def zscore_last(x):
...     mean, var = cn.state_finalize(cn.moments_1d(x), 0.0)
...     return (x[-1] - mean) / np.sqrt(var)
>>> float(zscore_last(np.array([1.0, 2.0, 3.0])))
1.224744871391589

Every kernel is compiled with the one policy of :mod:`cnorm._numba_policy`
(no fast-math flags, ``cache=True``).
"""
from __future__ import annotations

import math
import platform
import struct
from contextlib import contextmanager
from fractions import Fraction

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.arrayobj import make_array, populate_array

from . import _numba_simd
from ._numba_policy import OVERLOAD_OPTIONS, jit

__all__ = ["moments_4d", "moments_1d", "state_merge", "state_finalize", "merge_states",
           "finalize", "half_to_f64", "LANES", "BLOCK", "CHUNK_BLOCKS", "TILE", "SERIAL_WORK"]

LANES = 16            # independent accumulators per row (two AVX-512 vectors of doubles)
BLOCK = 4096          # elements per block (one shift c per block)
CHUNK_BLOCKS = 64     # blocks per chunk: the unit of parallel work along a slice
TILE = 512            # columns per tile in the column kernel (prefetched segments; >= 2 tasks for 1024)
SERIAL_WORK = 131072  # below this many elements, never start threads
SLICE_GROUP = 32      # slices whose block rows the NCHW (block-major) moments interleave
PF_AHEAD = 12288      # bytes the row loops prefetch ahead of contiguous rows (CN_PF_AHEAD)


# ---------------------------------------------------------------- primitives
# Each primitive is a plain Python function (used with NUMBA_DISABLE_JIT=1)
# plus an @overload giving Numba its compiled form (an LLVM intrinsic where
# Python has no counterpart).

def _fma(a, b, c):
    """Correctly rounded ``a*b + c`` (exact rational arithmetic in Python)."""
    if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(c)):
        return a * b + c
    return float(Fraction(a) * Fraction(b) + Fraction(c))


@intrinsic
def _llvm_fma(typingctx, a, b, c):
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        dbl = ir.DoubleType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(dbl, [dbl] * 3),
                                            "llvm.fma.f64")
        return builder.call(fn, args)
    return sig, codegen


@overload(_fma, jit_options=OVERLOAD_OPTIONS)
def _fma_impl(a, b, c):
    return lambda a, b, c: _llvm_fma(np.float64(a), np.float64(b), np.float64(c))


def _bits_to_f64(bits):
    """The float64 whose IEEE bit pattern is the int64 ``bits``."""
    return struct.unpack("<d", struct.pack("<Q", int(bits) & 0xFFFFFFFFFFFFFFFF))[0]


@intrinsic
def _llvm_bitcast_f64(typingctx, bits):
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return sig, codegen


@overload(_bits_to_f64, jit_options=OVERLOAD_OPTIONS)
def _bits_to_f64_impl(bits):
    return lambda bits: _llvm_bitcast_f64(np.int64(bits))


def _prefetch(buf, i):
    """Ask for the cache line of ``buf[i]`` (a hint: no effect on results;
    ``i`` may lie past the end, a prefetch never faults)."""


@intrinsic
def _llvm_prefetch(typingctx, buf, i):
    if not isinstance(buf, types.Array):
        return None
    sig = types.void(buf, types.intp)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        item = context.get_abi_sizeof(context.get_data_type(aryty.dtype))
        addr = builder.add(builder.ptrtoint(ary.data, cgutils.intp_t),
                           builder.mul(args[1], context.get_constant(types.intp, item)))
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        # read, keep in all cache levels, data cache
        builder.call(fn, [builder.inttoptr(addr, i8p), ir.Constant(i32, 0),
                          ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return sig, codegen


@overload(_prefetch, jit_options=OVERLOAD_OPTIONS)
def _prefetch_impl(buf, i):
    return lambda buf, i: _llvm_prefetch(buf, np.intp(i))


_TWO_1008 = 2.0 ** 1008  # 2**(1023 - 15)


@jit
def _half_bits_to_f64(h):
    """float16 bits -> float64 with integer operations (any CPU)."""
    v = np.int64(h)
    sign = (v & 0x8000) << 48
    mag = v & 0x7FFF
    if mag >= 0x7C00:  # inf or NaN
        return _bits_to_f64(sign | 0x7FF0000000000000 | ((mag & 0x3FF) << 42))
    # exponent and mantissa moved into a float64 (a subnormal when exp == 0),
    # then scaled by 2**(1023 - 15): exact, the result is a normal float64
    return _bits_to_f64(sign | (mag << 42)) * _TWO_1008


def _native_half() -> bool:
    """Whether the CPU Numba compiles for converts float16 in hardware (F16C, ARMv8)."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return "+f16c" in (numba.config.CPU_FEATURES or "")
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        import llvmlite.binding as llvm
        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except Exception:  # pragma: no cover - unknown host
        return False


#: float16 loads use LLVM's ``fpext half`` (one instruction, vectorizable)
#: where the CPU has it, the integer route otherwise.
NATIVE_HALF = _native_half()


@intrinsic
def _llvm_half_to_f64(typingctx, h):
    sig = types.float64(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.DoubleType())
    return sig, codegen


def half_to_f64(h):
    """The float64 value of the IEEE binary16 number with bits ``h`` (uint16).

    Exact for every input: normals, subnormals, ±0, ±inf and NaN.  Callable
    from ``@njit`` code.
    """
    return float(np.uint16(h).view(np.float16))


@overload(half_to_f64, jit_options=OVERLOAD_OPTIONS)
def _half_to_f64_impl(h):
    if NATIVE_HALF:
        return lambda h: _llvm_half_to_f64(np.uint16(h))
    return lambda h: _half_bits_to_f64(h)


def _stack_2d_python(rows, cols):
    return np.empty((rows, cols))


@intrinsic(prefer_literal=True)
def _stack_2d_llvm(typingctx, rows, cols):
    if not (isinstance(rows, types.IntegerLiteral) and isinstance(cols, types.IntegerLiteral)):
        return None
    nr, nc = rows.literal_value, cols.literal_value
    arrty = types.Array(types.float64, 2, "C")

    def codegen(context, builder, signature, args):
        # the alloca is emitted into the calling kernel's own frame
        intp = context.get_value_type(types.intp)
        data = cgutils.alloca_once(builder, ir.DoubleType(), size=nr * nc)
        ary = make_array(arrty)(context, builder)
        populate_array(ary, data=data, shape=[ir.Constant(intp, nr), ir.Constant(intp, nc)],
                       strides=[ir.Constant(intp, 8 * nc), ir.Constant(intp, 8)],
                       itemsize=ir.Constant(intp, 8), meminfo=None)
        return ary._getvalue()
    return arrty(rows, cols), codegen


#: ``_stack_2d(rows, cols)``: uninitialised float64 scratch of constant shape
#: on the stack of the calling kernel (an ``alloca``: LLVM knows it aliases no
#: input).  An intrinsic, so it must be called directly in the kernel that
#: uses the array; plain ``np.empty`` with ``NUMBA_DISABLE_JIT=1``.
_stack_2d = _stack_2d_python if numba.config.DISABLE_JIT else _stack_2d_llvm


def _ld(buf, i):
    """Element ``i`` of ``buf`` as float64 (uint16 = float16 bits)."""
    if buf.dtype == np.uint16:
        return half_to_f64(buf[i])
    return float(buf[i])


@overload(_ld, jit_options=OVERLOAD_OPTIONS)
def _ld_impl(buf, i):
    # indices are never negative: an unsigned index skips the wraparound test
    if buf.dtype == types.uint16:
        return lambda buf, i: half_to_f64(buf[np.uint64(i)])
    return lambda buf, i: np.float64(buf[np.uint64(i)])


def _is_f64(buf):
    """Whether ``buf`` holds float64 (double-double accumulation)."""
    return buf.dtype == np.float64


@overload(_is_f64, jit_options=OVERLOAD_OPTIONS)
def _is_f64_impl(buf):
    result = buf.dtype == types.float64
    return lambda buf: result


def _is_half(buf):
    """Whether ``buf`` holds float16 bits (uint16)."""
    return buf.dtype == np.uint16


@overload(_is_half, jit_options=OVERLOAD_OPTIONS)
def _is_half_impl(buf):
    result = buf.dtype == types.uint16
    return lambda buf: result


# ---------------------------------------------------------------- double-double
@jit
def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@jit
def _dd_add(h, l, bh, bl):
    """(h, l) + (bh, bl)"""
    s, e = _two_sum(h, bh)
    e = e + (l + bl)
    t = s + e
    return t, e - (t - s)


@jit
def _dd_mul_d(ah, al, b):
    """(ah, al) * b"""
    p = ah * b
    e = _fma(ah, b, -p) + al * b
    t = p + e
    return t, e - (t - p)


@jit
def _dd_div_d(ah, al, b):
    """(ah, al) / b"""
    q1 = ah / b
    ph = q1 * b
    pl = _fma(q1, b, -ph)
    q2 = ((ah - ph) + (al - pl)) / b
    t = q1 + q2
    return t, q2 - (t - q1)


@jit
def _dd_sq(ah, al):
    """(ah, al) ** 2"""
    p = ah * ah
    e = _fma(ah, ah, -p) + 2.0 * ah * al
    t = p + e
    return t, e - (t - p)


# ---------------------------------------------------------------- states
@jit
def _merge(a, b):
    """Chan's merge of state tuples ``a`` and ``b`` (double-double)."""
    an, amh, aml, aqh, aql = a
    bn, bmh, bml, bqh, bql = b
    if bn == 0:
        return a
    if an == 0:
        return b
    n = an + bn
    if not (math.isfinite(amh) and math.isfinite(bmh)):
        # inf or nan somewhere: the mean follows IEEE arithmetic, the spread is undefined
        return (n, amh * (an / n) + bmh * (bn / n), 0.0, np.nan, 0.0)
    dh, dl = _dd_add(bmh, bml, -amh, -aml)
    th, tl = _dd_mul_d(dh, dl, bn)
    th, tl = _dd_div_d(th, tl, n)
    wh, wl = _dd_sq(dh, dl)
    wh, wl = _dd_mul_d(wh, wl, an)
    wh, wl = _dd_mul_d(wh, wl, bn)
    wh, wl = _dd_div_d(wh, wl, n)
    mh, ml = _dd_add(amh, aml, th, tl)
    qh, ql = _dd_add(aqh, aql, bqh, bql)
    qh, ql = _dd_add(qh, ql, wh, wl)
    return (n, mh, ml, qh, ql)


@jit
def _get(row):
    return (row[0], row[1], row[2], row[3], row[4])


@jit
def _put(row, s):
    row[0] = s[0]
    row[1] = s[1]
    row[2] = s[2]
    row[3] = s[3]
    row[4] = s[4]


@jit
def state_merge(a, b):
    """Merge state ``b`` into state ``a`` in place (Chan's formula, double-double).

    Parameters
    ----------
    a : float64 array of 5, ``(n, mean_hi, mean_lo, M2_hi, M2_lo)``; updated.
    b : float64 array of 5.
    """
    _put(a, _merge(_get(a), _get(b)))


@jit
def state_finalize(s, ddof):
    """``(mean, var)`` of state ``s`` with ``var = M2 / (n - ddof)``, as float64.

    ``n == 0`` gives NaN, NaN; ``n - ddof <= 0`` gives var inf when M2 > 0,
    else NaN (``np.var``'s rule, without the warning).
    """
    n = s[0]
    d = n - ddof
    if n == 0:
        mean = np.nan
    elif math.isfinite(s[1]):
        mean = s[1] + s[2]
    else:
        mean = s[1]
    if s[3] != s[3]:
        var = np.nan
    elif d <= 0:
        var = np.inf if (s[3] > 0 and n > 0) else np.nan
    else:
        vh, vl = _dd_div_d(s[3], s[4], d)
        var = vh if vh > 0 else 0.0
    return mean, var


@jit
def _block_state(n, c, s1h, s1l, s2h, s2l):
    """State of a float64 block from its shift c and the centred sums S1, S2 (double-double)."""
    if not math.isfinite(c):
        return (n, c, 0.0, np.nan, 0.0)
    th, tl = _dd_div_d(s1h, s1l, n)
    mh, ml = _dd_add(c, 0.0, th, tl)
    qh, ql = _dd_sq(s1h, s1l)
    qh, ql = _dd_div_d(qh, ql, n)
    qh, ql = _dd_add(s2h, s2l, -qh, -ql)
    if qh < 0:
        qh = 0.0
        ql = 0.0
    if s2h != s2h:
        qh = np.nan
    return (n, mh, ml, qh, ql)


@jit
def _block_state_d(n, c, s1, s2):
    """State of a float16/float32 block: M2 in float64, the mean ``c + s1/n`` in double-double."""
    if not math.isfinite(c):
        return (n, c, 0.0, np.nan, 0.0)
    mh, ml = _two_sum(c, s1 / n)
    qh = s2 - s1 * (s1 / n)
    if qh < 0:
        qh = 0.0
    return (n, mh, ml, qh, 0.0)


@jit
def _merge_d(a, b):
    """Chan's merge of float16/float32 block states: M2 in float64, the mean in double-double."""
    an, amh, aml, aqh, aql = a
    bn, bmh, bml, bqh, bql = b
    if bn == 0:
        return a
    if an == 0:
        return b
    n = an + bn
    if not (math.isfinite(amh) and math.isfinite(bmh)):
        return (n, amh * (an / n) + bmh * (bn / n), aml, np.nan, aql)
    delta = (bmh - amh) + (bml - aml)
    mh, ml = _dd_add(amh, aml, delta * (bn / n), 0.0)
    return (n, mh, ml, aqh + bqh + delta * delta * (an * (bn / n)), aql)


@jit
def _merge_t(a, b, buf):
    """Merge block states of buf's dtype: double-double for float64 input only."""
    if _is_f64(buf):
        return _merge(a, b)
    return _merge_d(a, b)


# ---------------------------------------------------------------- block kernel (rows)
@jit
def _tree16(acc):
    """Fixed pairwise sum of the 16 lanes (destroys acc)."""
    w = 8
    while w >= 1:
        for j in range(w):
            acc[j] = acc[j] + acc[j + w]
        w = w // 2
    return acc[0]


@jit
def _tree16_dd(h, l):
    """Fixed pairwise double-double sum of 16 (h, l) lanes (destroys them)."""
    w = 8
    while w >= 1:
        for j in range(w):
            h[j], l[j] = _dd_add(h[j], l[j], h[j + w], l[j + w])
        w = w // 2
    return h[0], l[0]


@jit
def _dd_step(a1h, a1l, a2h, a2l, x, c):
    """One lane step: (a1, a2) += (x - c, (x - c)**2), TwoSum accumulation, exact square."""
    d = x - c
    bb = d - x
    de = (x - (d - bb)) + (-c - bb)
    t = a1h + d
    bb = t - a1h
    e = (a1h - (t - bb)) + (d - bb)
    a1h = t
    a1l = a1l + (e + de)
    p2 = d * d
    e2 = _fma(d, d, -p2) + 2.0 * d * de
    t = a2h + p2
    bb = t - a2h
    e = (a2h - (t - bb)) + (p2 - bb)
    return a1h, a1l, t, a2l + (e + e2)


@jit
def _centred_terms(x, c):
    """x - c = d + de exactly, and (x - c)**2 = q + qe (to double-double accuracy)."""
    d = x - c
    bb = d - x
    de = (x - (d - bb)) + (-c - bb)
    q = d * d
    return d, de, q, _fma(d, d, -q) + 2.0 * d * de


def _opaque(n):
    """``n``, hidden from the optimizer (identity in Python)."""
    return n


@intrinsic
def _llvm_opaque(typingctx, n):
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        return builder.asm(ir.FunctionType(i64, [i64]), "", "=r,0", args, side_effect=False)
    return sig, codegen


@overload(_opaque, jit_options=OVERLOAD_OPTIONS)
def _opaque_impl(n):
    return lambda n: _llvm_opaque(np.int64(n))


# The row loops add element i of a contiguous row to lane i % 16 (16
# float64 lanes; double-double lanes for float64 input) and reduce the lanes
# by a fixed pairwise tree: the arithmetic of the 16-lane loops of _simd.h.
# The lane loop itself is LLVM vector code (cnorm._numba_simd), so the lanes
# stay in registers; _lane_sums_loop is its plain definition.

@jit
def _lane_sums_loop(seg, nv, c, lanes):
    """_lane_sums as scalar code (no float16 hardware, or NUMBA_DISABLE_JIT=1)."""
    for i in range(0, nv, LANES):
        for j in range(LANES):
            x = _ld(seg, i + j)
            if _is_f64(seg):
                lanes[0, j], lanes[1, j], lanes[2, j], lanes[3, j] = _dd_step(
                    lanes[0, j], lanes[1, j], lanes[2, j], lanes[3, j], x, c)
            else:
                d = x - c
                lanes[0, j] = lanes[0, j] + d
                lanes[1, j] = lanes[1, j] + d * d


def _lane_sums(seg, nv, c, lanes, pf):
    """Add the centred sums of seg[0:nv] (nv a multiple of 16) to the
    lanes: element i to lane i % 16 of lanes[0] (Σ(x - c)) and lanes[1]
    (Σ(x - c)²), double-double (lanes[0:4] = S1 hi, lo, S2 hi, lo) for
    float64; pf > 0: prefetch pf elements ahead."""
    _lane_sums_loop(seg, nv, c, lanes)


@intrinsic
def _llvm_lane_sums(typingctx, seg, nv, c, lanes, pf):
    ok = (isinstance(seg, types.Array) and seg.ndim == 1 and _numba_simd.supported(seg.dtype)
          and isinstance(lanes, types.Array) and lanes.ndim == 2 and lanes.layout == "C"
          and lanes.dtype == types.float64)
    if not ok:
        return None
    return types.void(seg, types.intp, types.float64, lanes, types.intp), \
        _numba_simd.lane_loop_codegen


@overload(_lane_sums, jit_options=OVERLOAD_OPTIONS)
def _lane_sums_impl(seg, nv, c, lanes, pf):
    if not (_numba_simd.supported(seg.dtype) and (seg.dtype != types.uint16 or NATIVE_HALF)):
        return lambda seg, nv, c, lanes, pf: _lane_sums_loop(seg, nv, c, lanes)
    if seg.layout == "C":
        return lambda seg, nv, c, lanes, pf: _llvm_lane_sums(seg, np.intp(nv), np.float64(c),
                                                             lanes, np.intp(pf))

    def strided(seg, nv, c, lanes, pf):
        # the vector loop reads the data pointer: only for unit stride
        if seg.strides[0] == seg.itemsize:
            _llvm_lane_sums(seg, np.intp(nv), np.float64(c), lanes, np.intp(pf))
        else:
            _lane_sums_loop(seg, nv, c, lanes)
    return strided


@jit
def _row_centred(seg, n, c, lanes, pf):
    """(Σ(x - c), Σ(x - c)²) of a contiguous float16/float32 row, float64 lanes,
    prefetching pf elements ahead (0: none; see cn_prefetch16 in _simd.h)."""
    a1 = lanes[0]
    a2 = lanes[1]
    for j in range(LANES):
        a1[j] = 0.0
        a2[j] = 0.0
    nv = n - n % LANES
    _lane_sums(seg, nv, c, lanes, pf)
    t1 = 0.0
    t2 = 0.0
    for i in range(nv, n):
        d = _ld(seg, i) - c
        t1 = t1 + d
        t2 = t2 + d * d
    return _tree16(a1) + t1, _tree16(a2) + t2


@jit
def _row_centred_dd(seg, n, c, lanes, pf):
    """(S1h, S1l, S2h, S2l) of a contiguous float64 row, double-double lanes
    (pf: as _row_centred)."""
    h1 = lanes[0]
    l1 = lanes[1]
    h2 = lanes[2]
    l2 = lanes[3]
    for j in range(LANES):
        h1[j] = 0.0
        l1[j] = 0.0
        h2[j] = 0.0
        l2[j] = 0.0
    nv = n - n % LANES
    _lane_sums(seg, nv, c, lanes, pf)
    for i in range(nv, n):  # the tail goes to lane 0
        d, de, q, qe = _centred_terms(_ld(seg, i), c)
        h1[0], l1[0] = _dd_add(h1[0], l1[0], d, de)
        h2[0], l2[0] = _dd_add(h2[0], l2[0], q, qe)
    s1h, s1l = _tree16_dd(h1, l1)
    s2h, s2l = _tree16_dd(h2, l2)
    return s1h, s1l, s2h, s2l


@jit(inline="always")
def _add_row(seg, rowlen, c, lanes, pf, s1h, s1l, s2h, s2l):
    """The centred sums (S1 hi, lo, S2 hi, lo) of a block plus those of one contiguous
    row seg (double-double for float64; pf: as _row_centred)."""
    if _is_f64(seg):
        a1h, a1l, a2h, a2l = _row_centred_dd(seg, rowlen, c, lanes, pf)
        s1h, s1l = _dd_add(s1h, s1l, a1h, a1l)
        s2h, s2l = _dd_add(s2h, s2l, a2h, a2l)
        return s1h, s1l, s2h, s2l
    a1, a2 = _row_centred(seg, rowlen, c, lanes, pf)
    return s1h + a1, s1l, s2h + a2, s2l


@jit
def _block_finish(buf, p, nrows, rowlen, rs, es, c, s1h, s1l, s2h, s2l):
    """State of the nrows x rowlen block at element p from its shift c and centred sums."""
    n = np.float64(nrows * rowlen)
    if not (math.isfinite(s1h) and math.isfinite(c)):
        # inf or nan in the block: the mean follows IEEE arithmetic, the spread is undefined
        total = 0.0
        for r in range(nrows):
            for i in range(rowlen):
                total = total + _ld(buf, p + r * rs + i * es)
        st = _block_state_d(n, total / n, 0.0, 0.0)
        return (st[0], st[1], st[2], np.nan, st[4])
    if _is_f64(buf):
        return _block_state(n, c, s1h, s1l, s2h, s2l)
    return _block_state_d(n, c, s1h, s2h)


@jit
def _block_moments(buf, p, nrows, rowlen, rs, es, pf):
    """State of the nrows x rowlen block at element p of buf (element strides rs, es);
    pf: prefetch distance in elements when what follows the block is read next.

    One pass, shifted by the block's first element c: since c is one of the
    values, (c - mean)**2 <= n * var, so S2 - S1**2/n cancels at most
    log2(BLOCK) = 12 bits, which the float64 (double-double for float64
    input) sums absorb.  Contiguous rows use the 16-lane loops, strided ones
    a scalar loop with the same arithmetic.
    """
    lanes = _stack_2d(4, 16)
    c = _ld(buf, p)
    s1h = 0.0
    s1l = 0.0
    s2h = 0.0
    s2l = 0.0
    contiguous = es == 1
    rpf = 0 if nrows > 1 and rs != rowlen else pf   # rows not back to back: none
    for r in range(nrows):
        q = p + r * rs
        if contiguous:
            s1h, s1l, s2h, s2l = _add_row(buf[q:q + rowlen], rowlen, c, lanes, rpf,
                                          s1h, s1l, s2h, s2l)
        elif _is_f64(buf):
            for i in range(rowlen):
                d, de, qq, qe = _centred_terms(_ld(buf, q + i * es), c)
                s1h, s1l = _dd_add(s1h, s1l, d, de)
                s2h, s2l = _dd_add(s2h, s2l, qq, qe)
        else:
            for i in range(rowlen):
                d = _ld(buf, q + i * es) - c
                s1h = s1h + d
                s2h = s2h + d * d
    return _block_finish(buf, p, nrows, rowlen, rs, es, c, s1h, s1l, s2h, s2l)


# ---------------------------------------------------------------- slices (rows kernel)
@jit
def _blocks_in_slice(nrows, rowlen):
    if nrows <= 0 or rowlen <= 0:
        return 0
    if rowlen >= BLOCK:
        return nrows * ((rowlen + BLOCK - 1) // BLOCK)
    g = BLOCK // rowlen
    return (nrows + g - 1) // g


@jit(inline="always")
def _slice_block(buf, p, nrows, rowlen, rs, es, b, pf):
    """State of block b of the nrows x rowlen slice at p (as _slice_chunk cuts it)."""
    if rowlen >= BLOCK:
        per_row = (rowlen + BLOCK - 1) // BLOCK
        r = b // per_row
        k = (b % per_row) * BLOCK
        # int64 values, not literals: one compiled _block_moments per dtype
        return _block_moments(buf, p + r * rs + k * es, np.int64(1), min(BLOCK, rowlen - k),
                              np.int64(0), es, pf)
    g = BLOCK // rowlen
    return _block_moments(buf, p + b * g * rs, min(g, nrows - b * g), rowlen, rs, es, pf)


@jit(inline="always")
def _prefetch_span(buf, i, n):
    """Ask for the cache lines of buf[i:i + n], the next short row of a block
    (rows up to 16 KiB; see prefetch_span in _kernels.pyx)."""
    if n * buf.itemsize <= 16384:
        for j in range(0, n, 64 // buf.itemsize):
            _prefetch(buf, i + j)


@jit
def _block_rows_interleaved(buf, p, R1, R0, xs, k0, k1, b, part, pidx, kstep):
    """Block b of slices k0..k1-1 (slice k at p + k*xs[2]) whose contiguous rows
    (R0 < BLOCK) are grouped into blocks, row-interleaved: row r of SLICE_GROUP
    slices, then row r + 1 (block_rows_interleaved in _kernels.pyx).  Each slice
    adds the same rows in the same order with the same shift as _block_moments,
    so the states are bitwise _slice_block's; block b of slice k merges into
    part[pidx + k*kstep]."""
    g = BLOCK // R0
    r0 = b * g
    nrows = min(g, R1 - r0)
    hop = xs[2] != R0
    ahead = np.int64(PF_AHEAD // buf.itemsize)
    acc = _stack_2d(5, SLICE_GROUP)   # per slice of the group: c, S1 hi, lo, S2 hi, lo
    lanes = _stack_2d(4, 16)
    for kg in range(k0, k1, SLICE_GROUP):
        kn = min(SLICE_GROUP, k1 - kg)
        first = p + kg * xs[2] + r0 * xs[1]
        for k in range(kn):
            acc[0, k] = _ld(buf, first + k * xs[2])
            for i in range(1, 5):
                acc[i, k] = 0.0
        for r in range(nrows):
            row = first + r * xs[1]
            for k in range(kn):
                if hop and k + 1 < kn:
                    _prefetch_span(buf, row + (k + 1) * xs[2], R0)
                q = row + k * xs[2]
                # adjacent planes: read ahead into the next one (not past the group)
                pf = np.int64(0) if hop or k + 1 == kn else ahead
                acc[1, k], acc[2, k], acc[3, k], acc[4, k] = _add_row(
                    buf[q:q + R0], R0, acc[0, k], lanes, pf,
                    acc[1, k], acc[2, k], acc[3, k], acc[4, k])
        for k in range(kn):
            blk = _block_finish(buf, first + k * xs[2], nrows, R0, xs[1], np.int64(1),
                                acc[0, k], acc[1, k], acc[2, k], acc[3, k], acc[4, k])
            row = part[pidx + (kg + k) * kstep]
            _put(row, _merge_t(_get(row), blk, buf))


@jit
def _block_major_item(t, ngroups, buf, base, shape, xs, nblocks, nchunks, part):
    """Work item t = (o, chunk, group of slices k) of the block-major order
    (blocks_across_slices in _kernels.pyx), each slice's blocks merged in
    ascending order into part[(o*K + k)*nchunks + chunk] (zeros first), the
    reads ordered to follow memory: rows shorter than BLOCK row-interleaved
    (_block_rows_interleaved); long rows one row at a time, all its pieces,
    then the same row of the next slice (the next NCHW plane), prefetching
    ahead when the planes are adjacent.  Visiting piece b of every slice
    before piece b + 1 read 64 streams at once (4x Cython's time for float16
    128 x 128 planes on an Intel Xeon)."""
    K, R1, R0 = shape[2], shape[1], shape[3]
    g = t % ngroups
    ch = (t // ngroups) % nchunks
    o = t // (ngroups * nchunks)
    k0 = g * K // ngroups
    k1 = (g + 1) * K // ngroups
    b0 = ch * CHUNK_BLOCKS
    b1 = min(nblocks, (ch + 1) * CHUNK_BLOCKS)
    p = base + o * xs[0]
    pidx = o * K * nchunks + ch
    if R0 < BLOCK and xs[3] == 1:
        for b in range(b0, b1):
            _block_rows_interleaved(buf, p, R1, R0, xs, np.int64(k0), np.int64(k1),
                                    np.int64(b), part, pidx, nchunks)
        return
    if R0 < BLOCK:
        for b in range(b0, b1):
            for k in range(k0, k1):
                blk = _slice_block(buf, p + k * xs[2], R1, R0, xs[1], xs[3], b, np.int64(0))
                row = part[pidx + k * nchunks]
                _put(row, _merge_t(_get(row), blk, buf))
        return
    pf = np.int64(PF_AHEAD // buf.itemsize) if xs[3] == 1 and xs[2] == R0 else np.int64(0)
    per_row = (R0 + BLOCK - 1) // BLOCK
    b = b0
    while b < b1:
        bend = min(b1, (b // per_row + 1) * per_row)   # the pieces of one row
        for k in range(k0, k1):
            row = part[pidx + k * nchunks]
            for bb in range(b, bend):
                blk = _slice_block(buf, p + k * xs[2], R1, R0, xs[1], xs[3], bb, pf)
                _put(row, _merge_t(_get(row), blk, buf))
        b = bend


@jit
def _block_major(shape, xs):
    """Whether the kept axis k is nested inside the reduced axis r1 in memory."""
    return shape[2] > 1 and shape[1] > 1 and 0 < xs[2] < xs[1]


@jit(inline="always")
def _slice_chunk(buf, p, nrows, rowlen, rs, es, b0, b1, pf):
    """State of blocks b0..b1-1 (merged left to right) of the nrows x rowlen slice at p
    (pf: see _block_moments)."""
    out = (0.0, 0.0, 0.0, 0.0, 0.0)
    for b in range(b0, b1):
        out = _merge_t(out, _slice_block(buf, p, nrows, rowlen, rs, es, b, pf), buf)
    return out


@jit
def _slices_pf(buf, shape, xs):
    """Prefetch distance (elements) of the slice-major rows kernel: PF_AHEAD
    bytes when x[o, k, r1, r0] is C-contiguous in that order, else 0."""
    O, R1, K, R0 = shape[0], shape[1], shape[2], shape[3]
    if (xs[3] == 1 and (R1 == 1 or xs[1] == R0) and (K == 1 or xs[2] == R1 * R0)
            and (O == 1 or xs[0] == K * R1 * R0)):
        return np.int64(PF_AHEAD // buf.itemsize)
    return np.int64(0)


@jit
def _rows_task(t, buf, base, shape, xs, nblocks, nchunks, pf, part):
    """Task t = (slice, chunk) of the rows kernel into part[t] (pf: _slices_pf)."""
    K = shape[2]
    sl = t // nchunks
    ch = t % nchunks
    o = sl // K
    k = sl % K
    st = _slice_chunk(buf, base + o * xs[0] + k * xs[2], shape[1], shape[3], xs[1], xs[3],
                      ch * CHUNK_BLOCKS, min(nblocks, (ch + 1) * CHUNK_BLOCKS), pf)
    _put(part[t], st)


@jit
def _rows_merge(part, shape, nchunks, so, sk, states, soff):
    """Merge the chunk states of each slice in order, then into states (double-double)."""
    K = shape[2]
    for sl in range(shape[0] * K):
        st = _get(part[sl * nchunks])
        for ch in range(1, nchunks):
            st = _merge(st, _get(part[sl * nchunks + ch]))
        row = states[soff + (sl // K) * so + (sl % K) * sk]
        _put(row, _merge(_get(row), st))


@jit
def _rows_serial(buf, base, shape, xs, so, sk, states, soff):
    """Reduce buf[base + o*xs0 + r1*xs1 + k*xs2 + r0*xs3] over (r1, r0) into states (merging)."""
    nblocks = _blocks_in_slice(shape[1], shape[3])
    nchunks = (nblocks + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS
    ntasks = shape[0] * shape[2] * nchunks
    if ntasks == 0:
        return
    if _block_major(shape, xs):
        part = np.zeros((ntasks, 5))
        for t in range(shape[0] * nchunks):
            _block_major_item(np.int64(t), np.int64(1), buf, base, shape, xs, nblocks, nchunks,
                              part)
    else:
        part = np.empty((ntasks, 5))
        pf = _slices_pf(buf, shape, xs)
        for t in range(ntasks):
            _rows_task(np.int64(t), buf, base, shape, xs, nblocks, nchunks, pf, part)
    _rows_merge(part, shape, nchunks, so, sk, states, soff)


@jit(parallel=True)
def _rows_parallel(buf, base, shape, xs, so, sk, states, soff):
    """:func:`_rows_serial` with the (slice, chunk) tasks spread over threads."""
    nblocks = _blocks_in_slice(shape[1], shape[3])
    nchunks = (nblocks + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS
    ntasks = shape[0] * shape[2] * nchunks
    if ntasks == 0:
        return
    if _block_major(shape, xs):
        part = np.zeros((ntasks, 5))
        ngroups = min(shape[2], 4)   # only splits the work: results do not depend on it
        for t in prange(shape[0] * nchunks * ngroups):
            _block_major_item(np.int64(t), np.int64(ngroups), buf, base, shape, xs, nblocks,
                              nchunks, part)
    else:
        part = np.empty((ntasks, 5))
        pf = _slices_pf(buf, shape, xs)
        for t in prange(ntasks):
            _rows_task(np.int64(t), buf, base, shape, xs, nblocks, nchunks, pf, part)
    _rows_merge(part, shape, nchunks, so, sk, states, soff)


# ---------------------------------------------------------------- columns kernel
@jit
def _cols_block(buf, p, nrows, ncols, rs, cs, out):
    """Merge the states of ncols (<= TILE) columns over an nrows-row block into out[j].

    Shifted by the block's first row (see :func:`_block_moments`); the loops
    run across the columns, so they vectorize without lanes.
    """
    scratch = _stack_2d(5, TILE)
    c = scratch[0]
    s1h = scratch[1]
    s1l = scratch[2]
    s2h = scratch[3]
    s2l = scratch[4]
    for j in range(ncols):
        c[j] = _ld(buf, p + j * cs)
        s1h[j] = 0.0
        s1l[j] = 0.0
        s2h[j] = 0.0
        s2l[j] = 0.0
    contiguous = cs == 1
    nv = ncols - ncols % 8  # float64: eight-column lane steps, then the dd_add tail (as _simd.h)
    # prefetch the four-row loop's rows ~32 KiB (8-256 rows) ahead when rows are
    # at least 128 bytes apart (cols_block in _kernels.pyx: the hardware
    # prefetcher loses the short per-row streams); one hint per cache line
    item = buf.itemsize
    pf = rs * min(256, max(8, 32768 // (rs * item))) if rs * item >= 128 else 0
    line = 64 // item
    r0 = 0
    if contiguous:
        # four rows per pass with each column's sums in registers; each column still
        # adds rows r, r+1, r+2, r+3 in order (bitwise the one-row loop, as _simd.h)
        while r0 + 4 <= nrows:
            q = p + r0 * rs
            if pf:
                for kp in range(4):  # own names: j is uint64 below
                    for jp in range(0, ncols, line):
                        _prefetch(buf, q + pf + kp * rs + jp)
            a0 = buf[q:q + ncols]
            a1 = buf[q + rs:q + rs + ncols]
            a2 = buf[q + 2 * rs:q + 2 * rs + ncols]
            a3 = buf[q + 3 * rs:q + 3 * rs + ncols]
            if _is_f64(buf):   # double-double steps, then the dd_add tail columns
                for j in range(np.uint64(nv)):
                    cj = c[j]
                    h1, l1, h2, l2 = _dd_step(s1h[j], s1l[j], s2h[j], s2l[j], _ld(a0, j), cj)
                    h1, l1, h2, l2 = _dd_step(h1, l1, h2, l2, _ld(a1, j), cj)
                    h1, l1, h2, l2 = _dd_step(h1, l1, h2, l2, _ld(a2, j), cj)
                    s1h[j], s1l[j], s2h[j], s2l[j] = _dd_step(h1, l1, h2, l2, _ld(a3, j), cj)
                for k in range(4):
                    for j in range(nv, ncols):
                        d, de, qq, qe = _centred_terms(_ld(buf, q + k * rs + j), c[j])
                        s1h[j], s1l[j] = _dd_add(s1h[j], s1l[j], d, de)
                        s2h[j], s2l[j] = _dd_add(s2h[j], s2l[j], qq, qe)
            else:
                for j in range(np.uint64(ncols)):
                    cj = c[j]
                    u = s1h[j]
                    v = s2h[j]
                    for a in (a0, a1, a2, a3):
                        d = _ld(a, j) - cj
                        u = u + d
                        v = v + d * d
                    s1h[j] = u
                    s2h[j] = v
            r0 += 4
    for r in range(r0, nrows):
        q = p + r * rs
        if _is_f64(buf):
            start = 0
            if contiguous:
                seg = buf[q:q + ncols]
                for j in range(nv):
                    s1h[j], s1l[j], s2h[j], s2l[j] = _dd_step(s1h[j], s1l[j], s2h[j], s2l[j],
                                                              _ld(seg, j), c[j])
                start = nv
            for j in range(start, ncols):
                d, de, qq, qe = _centred_terms(_ld(buf, q + j * cs), c[j])
                s1h[j], s1l[j] = _dd_add(s1h[j], s1l[j], d, de)
                s2h[j], s2l[j] = _dd_add(s2h[j], s2l[j], qq, qe)
        elif contiguous:
            seg = buf[q:q + ncols]
            for j in range(ncols):
                d = _ld(seg, j) - c[j]
                s1h[j] = s1h[j] + d
                s2h[j] = s2h[j] + d * d
        else:
            for j in range(ncols):
                d = _ld(buf, q + j * cs) - c[j]
                s1h[j] = s1h[j] + d
                s2h[j] = s2h[j] + d * d
    nr = np.float64(nrows)
    for j in range(ncols):
        if not (math.isfinite(s1h[j]) and math.isfinite(c[j])):
            total = 0.0
            for r in range(nrows):
                total = total + _ld(buf, p + r * rs + j * cs)
            st = _block_state_d(nr, total / nrows, 0.0, 0.0)
            blk = (st[0], st[1], st[2], np.nan, st[4])
        elif _is_f64(buf):
            blk = _block_state(nr, c[j], s1h[j], s1l[j], s2h[j], s2l[j])
        else:
            blk = _block_state_d(nr, c[j], s1h[j], s2h[j])
        _put(out[j], _merge_t(_get(out[j]), blk, buf))


@jit
def _cols_geometry(shape):
    R, K = shape[1], shape[2]
    brows = max(1024, BLOCK * 8 // min(K, TILE))  # >= 1024 rows: see cols_kernel in _kernels.pyx
    ntiles = (K + TILE - 1) // TILE
    nblocks = (R + brows - 1) // brows
    nchunks = (nblocks + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS
    return brows, ntiles, nblocks, nchunks


@jit
def _cols_task(t, buf, base, shape, xs, part):
    """Task t = (o, tile, chunk): row blocks of one chunk of <= TILE columns into part[t]."""
    R, K = shape[1], shape[2]
    brows, ntiles, nblocks, nchunks = _cols_geometry(shape)
    ch = t % nchunks
    tile = (t // nchunks) % ntiles
    o = t // (nchunks * ntiles)
    k0 = tile * TILE
    kn = min(TILE, K - k0)
    out = part[t]
    out[:kn] = 0.0
    p = base + o * xs[0] + k0 * xs[2]
    for b in range(ch * CHUNK_BLOCKS, min(nblocks, (ch + 1) * CHUNK_BLOCKS)):
        r0 = b * brows
        _cols_block(buf, p + r0 * xs[1], min(brows, R - r0), kn, xs[1], xs[2], out)


@jit
def _cols_merge(part, shape, so, sk, states, soff):
    K = shape[2]
    brows, ntiles, nblocks, nchunks = _cols_geometry(shape)
    for o in range(shape[0]):
        for tile in range(ntiles):
            k0 = tile * TILE
            t0 = (o * ntiles + tile) * nchunks
            for j in range(min(TILE, K - k0)):
                st = _get(part[t0, j])
                for ch in range(1, nchunks):
                    st = _merge(st, _get(part[t0 + ch, j]))
                row = states[soff + o * so + (k0 + j) * sk]
                _put(row, _merge(_get(row), st))


@jit
def _cols_serial(buf, base, shape, xs, so, sk, states, soff):
    """Reduce buf[base + o*xs0 + r*xs1 + k*xs2] over r into states, vectorized across k."""
    brows, ntiles, nblocks, nchunks = _cols_geometry(shape)
    ntasks = shape[0] * ntiles * nchunks
    if ntasks == 0:
        return
    part = np.empty((ntasks, TILE, 5))
    for t in range(ntasks):
        _cols_task(np.int64(t), buf, base, shape, xs, part)
    _cols_merge(part, shape, so, sk, states, soff)


@jit(parallel=True)
def _cols_parallel(buf, base, shape, xs, so, sk, states, soff):
    """:func:`_cols_serial` with the (o, tile, chunk) tasks spread over threads."""
    brows, ntiles, nblocks, nchunks = _cols_geometry(shape)
    ntasks = shape[0] * ntiles * nchunks
    if ntasks == 0:
        return
    part = np.empty((ntasks, TILE, 5))
    for t in prange(ntasks):
        _cols_task(np.int64(t), buf, base, shape, xs, part)
    _cols_merge(part, shape, so, sk, states, soff)


# ---------------------------------------------------------------- embedding API
@jit
def moments_1d(x):
    """State ``(n, mean_hi, mean_lo, M2_hi, M2_lo)`` of a 1-d array, as float64[5].

    Parameters
    ----------
    x : 1-d array of float32 or float64 (any stride), or uint16 holding
        IEEE float16 bits (``a.view(np.uint16)``).

    Returns
    -------
    float64 array of 5
        Finalize it with :func:`state_finalize`, merge with :func:`state_merge`.

    Notes
    -----
    The same blocks, chunks and merge order as :func:`moments_4d` on one slice
    (float64 accumulation for float16/float32, double-double for float64), so
    the numbers are the same; runs on the calling thread.

    Examples
    --------
    >>> import numpy as np, cnorm._numba as cn
    >>> s = cn.moments_1d(np.array([1e8 + 1, 1e8 + 2, 1e8 + 4]))
    >>> cn.state_finalize(s, 0.0)
    (100000002.33333333, 1.5555555555555556)
    """
    out = np.zeros((1, 5))
    # int64 variables, not literals: the call reuses moments_4d's compiled tree
    # (a literal 0 or (1, 1, 1, n) would compile a copy of it for those types)
    z, o = np.int64(0), np.int64(1)
    _rows_serial(x, z, (o, o, o, np.int64(x.shape[0])), (z, z, z, o), z, z, out, z)
    return out[0]


@jit
def merge_states(a, b):
    """Merge each state (row of 5) of ``b`` into the same row of ``a`` (Chan's formula)."""
    if a.shape[0] != b.shape[0] or a.shape[1] != 5 or b.shape[1] != 5:
        raise ValueError("merge_states: a and b must both have shape (m, 5)")
    for i in range(a.shape[0]):
        _put(a[i], _merge(_get(a[i]), _get(b[i])))


@jit
def finalize(states, ddof, mean, var):
    """Mean and variance (``M2 / (n - ddof)``) of each state row, as float64.

    Parameters
    ----------
    states : float64 array (m, 5)
    ddof : float
    mean, var : float64 arrays of m, written.
    """
    if states.shape[1] != 5 or mean.shape[0] != states.shape[0] or var.shape[0] != states.shape[0]:
        raise ValueError("finalize: states must be (m, 5) and mean, var of length m")
    for i in range(states.shape[0]):
        m, v = state_finalize(states[i], ddof)
        mean[i] = m
        var[i] = v


# ---------------------------------------------------------------- Python entry point
@contextmanager
def _numba_threads(n: int):
    """Run with ``n`` Numba threads, restoring the previous count afterwards."""
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


class _Memory:
    """Exposes a byte range of an array's memory as a 1-d array (keeps the owner alive).

    The view is flagged writeable although nothing writes through it: the
    kernels then have the type of an ordinary C-contiguous array, so they are
    compiled (and cached) once for both :func:`moments_4d` and users' own
    calls of :func:`moments_1d`.
    """

    def __init__(self, owner, ptr, count, typestr):
        self._keep = owner
        self.__array_interface__ = {"version": 3, "data": (ptr, False), "shape": (count,),
                                    "strides": None, "typestr": typestr}


def _flat(x4: np.ndarray):
    """``(buf, base, element_strides)``: a 1-d array over the memory x4 spans.

    Element ``(o, r1, k, r0)`` of ``x4`` is ``buf[base + Σ i*s]``.  Strides
    that are not a multiple of the item size (never made by cnorm) are
    handled by copying.
    """
    mem = _memory_of(x4)
    if mem is None:
        x4 = np.ascontiguousarray(x4)
        mem = _memory_of(x4)
    return mem[0], mem[1], tuple(s // x4.itemsize for s in x4.strides)


def _max_threads() -> int:
    return numba.config.NUMBA_NUM_THREADS


def moments_4d(x4, is_half, so, sk, states, state_offset, nthreads):
    """Merge the moments of ``x4[o, r1, k, r0]`` over ``(r1, r0)`` into ``states``.

    Parameters
    ----------
    x4 : 4-d ndarray of float32 or float64, or of uint16 holding float16
        bits (``is_half``); any strides, including 0 and negative.
    is_half : bool
        Whether ``x4`` holds float16 data (as uint16 bits or as float16).
    so, sk : int
        State row strides of the kept axes ``o`` and ``k``.
    states : C-contiguous float64 array (m, 5)
        ``(n, mean_hi, mean_lo, M2_hi, M2_lo)`` per slice; the state of
        slice ``(o, k)`` is row ``state_offset + o*so + k*sk`` and results
        are merged into what is there (zeros = empty).
    state_offset : int
    nthreads : int
        Threads to use (at most Numba's ``NUMBA_NUM_THREADS``); the result
        does not depend on it.  Numba's thread count is restored afterwards.

    Notes
    -----
    Accumulation: float64 for float16/float32 inputs, double-double for
    float64.  ``R0 == 1 and K > 1`` (reducing the leading axis of a
    channels-last array) runs the column kernel, vectorized across ``k``.
    """
    x4 = np.asarray(x4)
    if x4.ndim != 4:
        raise ValueError(f"moments_4d: x4 must be 4-d, got {x4.ndim}-d")
    if x4.dtype == np.float16:
        x4 = x4.view(np.uint16)
    elif x4.dtype == np.uint16 and not is_half:
        raise TypeError("moments_4d: uint16 data is read as float16 bits only with is_half=True")
    if x4.dtype not in (np.uint16, np.float32, np.float64):
        raise TypeError(f"moments_4d: unsupported dtype {x4.dtype}")
    if (not isinstance(states, np.ndarray) or states.dtype != np.float64 or states.ndim != 2
            or states.shape[1] != 5 or not states.flags.c_contiguous or not states.flags.writeable):
        raise ValueError("moments_4d: states must be a writeable C-contiguous float64 (m, 5) array")
    O, R1, K, R0 = (int(n) for n in x4.shape)
    if O * K == 0 or R1 * R0 == 0:
        return
    rows = [state_offset + o * so + k * sk for o in (0, O - 1) for k in (0, K - 1)]
    if min(rows) < 0 or max(rows) >= states.shape[0]:
        raise ValueError(f"moments_4d: state rows {min(rows)}..{max(rows)} out of range "
                         f"for {states.shape[0]} states")
    buf, base, xs = _flat(x4)
    _run(buf, base, (O, R1, K, R0), xs, int(so), int(sk), states, int(state_offset),
         int(nthreads))


def _run(buf, base, shape, xs, so, sk, states, soff, nthreads):
    """The kernel call of one 4-d problem: rows or columns, serial or threaded."""
    O, R1, K, R0 = shape
    nt = max(1, min(nthreads, _max_threads())) if O * R1 * K * R0 >= SERIAL_WORK else 1
    cols = R0 == 1 and K > 1
    if nt == 1:
        (_cols_serial if cols else _rows_serial)(buf, base, shape, xs, so, sk, states, soff)
    else:
        with _numba_threads(nt):
            (_cols_parallel if cols else _rows_parallel)(buf, base, shape, xs, so, sk, states,
                                                         soff)


def _memory_of(x: np.ndarray):
    """``(buf, base)``: a writeable-typed 1-d array over x's memory and the element
    of it at x's data pointer (float16 as uint16 bits), or None when a stride is
    not a multiple of the item size."""
    size = x.itemsize
    if any(s % size for s in x.strides):
        return None
    if x.flags.writeable and (x.flags.c_contiguous or x.flags.f_contiguous):
        buf, base = x.ravel(order="K"), 0   # a view, element 0 at the data pointer
    else:
        # read-only or strided: the _Memory view (the same kernel types as above)
        low = sum((n - 1) * s for n, s in zip(x.shape, x.strides) if s < 0)
        high = sum((n - 1) * s for n, s in zip(x.shape, x.strides) if s > 0)
        ptr = x.__array_interface__["data"][0]
        buf = np.asarray(_Memory(x, ptr + low, (high - low) // size + 1, x.dtype.str))
        base = -low // size
    return (buf.view(np.uint16) if x.dtype == np.float16 else buf), base


def reduce_planned(x, plan, states, nthreads):
    """Merge the moments of ``x`` as ``plan`` (:func:`cnorm._axes.plan_reduction`
    of x) cuts them into the (m, 5) ``states``: the engine's entry, without
    :func:`moments_4d`'s checks and per-call views (the plan comes from x
    itself).  Returns False, having done nothing, for strides that are not a
    multiple of the item size (the caller then goes through moments_4d)."""
    mem = _memory_of(x)
    if mem is None:
        return False
    buf, base = mem
    size = x.itemsize
    xs = tuple(s // size for s in plan.strides)
    nthreads = int(nthreads)
    for off, soff in plan.outer_offsets():
        _run(buf, base + off // size, plan.shape, xs, plan.so, plan.sk, states, soff, nthreads)
    return True

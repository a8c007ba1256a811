"""The 16-lane row loops of the Numba backend, written as LLVM vector code.

Numba runs no SLP vectorizer, and its loop vectorizer cannot vectorize a
floating-point sum without re-association (which would change the results).
Written in Numba, the 16 lanes of the row loops therefore live in memory and
make a round trip through it (with aliasing checks) every few elements.  The
loops here are built directly with ``llvmlite.ir``: each lane vector
(``<16 x double>``) is a loop-carried value, kept in registers, and the
arithmetic is the same as that of the Numba code they replace and of the
16-lane loops of ``_simd.h``: element ``i`` of the row goes to lane ``i % 16``,
in order, with the same operations in the same order (no fast-math flag, no
contraction: an FMA only where the double-double square asks for one).

:func:`lane_loop_codegen` builds the body of the ``_lane_sums`` intrinsic of
:mod:`cnorm._numba`, which also holds its plain-Python definition.
"""
from __future__ import annotations

import struct

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils

#: Lanes per accumulator vector (``LANES`` of the kernels).
WIDTH = 16

_DOUBLE = ir.DoubleType()
_VEC = ir.VectorType(_DOUBLE, WIDTH)
_I8P = ir.IntType(8).as_pointer()
_I32 = ir.IntType(32)

#: LLVM element type of each supported input dtype (float16 travels as uint16 bits).
_ELEMENT = {types.float32: ir.FloatType(), types.float64: _DOUBLE, types.uint16: ir.HalfType()}


def _host_has_fma() -> bool:
    """Whether the CPU Numba compiles for has fused multiply-add instructions."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return "+fma" in (numba.config.CPU_FEATURES or "")
    try:
        import llvmlite.binding as llvm
        return bool(llvm.get_host_cpu_features().get("fma", False))
    except Exception:  # pragma: no cover - unknown host
        return False


#: Additions the C kernels issue as ``fma(b, ±1, a)`` (cn_vadd_fu / cn_vsub_fu
#: in _simd.h: AMD cores run vector additions and precision conversions on two
#: FP-add pipes, multiplications on two others) are written the same way here
#: where the CPU has FMA.  ``fma(b, 1, a)`` is ``a + b`` rounded once: the same
#: bits.  The ±1 is hidden from LLVM, which would fold the FMA back to an add.
FMA_PIPES = _host_has_fma()


def supported(seg_dtype) -> bool:
    """Whether the vector loop exists for a row of this Numba dtype."""
    return seg_dtype in _ELEMENT


def _splat(builder, value):
    vec = builder.insert_element(ir.Constant(_VEC, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, ir.Constant(_VEC, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, WIDTH), [0] * WIDTH))


def _load16(builder, data, elem, i, itemsize):
    """Elements data[i:i+16] as <16 x double> (exact conversion; any alignment)."""
    ptr = builder.bitcast(builder.gep(data, [i]), ir.VectorType(elem, WIDTH).as_pointer())
    raw = builder.load(ptr, align=itemsize)
    return raw if elem == _DOUBLE else builder.fpext(raw, _VEC)


def _prefetch(builder, data, i, pf, itemsize):
    """Prefetch the line(s) of data[i + pf : i + pf + 16] (cn_prefetch16)."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32]),
        "llvm.prefetch.p0i8")
    addr = builder.bitcast(builder.gep(data, [builder.add(i, pf)]), _I8P)
    for off in range(0, WIDTH * itemsize, 128 if itemsize < 8 else 64):
        line = addr if off == 0 else builder.gep(addr, [ir.Constant(cgutils.intp_t, off)])
        builder.call(fn, [line, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


class _Ops:
    """Vector arithmetic for one loop: ``add_fu`` / ``sub_fu`` are ``a + b`` /
    ``a - b`` on the multiply-add pipes (FMA_PIPES) or plain otherwise."""

    def __init__(self, builder):
        self.b = builder
        self.fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC] * 3), "llvm.fma.v16f64")
        if FMA_PIPES:
            i64 = ir.IntType(64)
            hide = ir.FunctionType(i64, [i64])
            ones = []
            for v in (1.0, -1.0):
                bits = ir.Constant(i64, struct.unpack("<q", struct.pack("<d", v))[0])
                hidden = builder.asm(hide, "", "=r,0", [bits], side_effect=False)
                ones.append(_splat(builder, builder.bitcast(hidden, _DOUBLE)))
            self.one, self.minus_one = ones

    def add_fu(self, a, b):
        if FMA_PIPES:
            return self.b.call(self.fma, [b, self.one, a])
        return self.b.fadd(a, b)

    def sub_fu(self, a, b):
        if FMA_PIPES:
            return self.b.call(self.fma, [b, self.minus_one, a])
        return self.b.fsub(a, b)


def _step_sums(ops, acc, x, cv):
    """float16/float32 rows: (Σd, Σd²) += (d, d*d) with d = x - c (cn_centred_*)."""
    a1, a2 = acc
    d = ops.b.fsub(x, cv)
    return [ops.add_fu(a1, d), ops.add_fu(a2, ops.b.fmul(d, d))]


def _step_dd(ops, acc, x, cv, ncv, two):
    """float64 rows: the double-double lane step (``_dd_step`` of cnorm._numba;
    CN_DD_LANE_STEP of _simd.h, the same operations on the same pipes)."""
    a1h, a1l, a2h, a2l = acc
    fsub, fadd, fmul = ops.b.fsub, ops.b.fadd, ops.b.fmul
    d = fsub(x, cv)
    bb = ops.sub_fu(d, x)
    de = fadd(ops.sub_fu(x, fsub(d, bb)), fsub(ncv, bb))
    t = fadd(a1h, d)
    b2 = ops.sub_fu(t, a1h)
    a1l = fadd(a1l, fadd(ops.add_fu(ops.sub_fu(a1h, fsub(t, b2)), fsub(d, b2)), de))
    a1h = t
    q = fmul(d, d)
    qe = ops.add_fu(ops.b.call(ops.fma, [d, d, ops.b.fneg(q)]), fmul(fmul(two, d), de))
    t = fadd(a2h, q)
    b2 = ops.sub_fu(t, a2h)
    a2l = ops.add_fu(a2l, fadd(ops.add_fu(ops.sub_fu(a2h, fsub(t, b2)), fsub(q, b2)), qe))
    return [a1h, a1l, t, a2l]


def lane_loop_codegen(context, builder, sig, args):
    """Codegen of ``_lane_sums(seg, nv, c, lanes, pf)``: add the centred sums of
    seg[0:nv] (nv a multiple of 16, elements contiguous) to the lane rows of
    ``lanes`` (a C-contiguous (4, 16) float64 array): rows 0, 1 = Σd, Σd² for
    float16/float32, rows 0-3 = the double-double (Σd, Σd²) for float64.
    pf > 0: prefetch pf elements ahead."""
    segty, _, _, lanesty, _ = sig.args
    seg = context.make_array(segty)(context, builder, args[0])
    lanes = context.make_array(lanesty)(context, builder, args[3])
    nv, c, pf = args[1], args[2], args[4]
    elem = _ELEMENT[segty.dtype]
    itemsize = context.get_abi_sizeof(context.get_data_type(segty.dtype))
    data = builder.bitcast(seg.data, elem.as_pointer())
    dd = segty.dtype == types.float64
    nacc = 4 if dd else 2
    rows = builder.bitcast(lanes.data, _VEC.as_pointer())
    ptrs = [builder.gep(rows, [ir.Constant(_I32, k)]) for k in range(nacc)]
    init = [builder.load(p, align=8) for p in ptrs]
    cv = _splat(builder, c)
    ncv = builder.fneg(cv)
    two = ir.Constant(_VEC, [2.0] * WIDTH)
    ops = _Ops(builder)
    intp = cgutils.intp_t
    zero = ir.Constant(intp, 0)
    entry = builder.basic_block
    choose = builder.append_basic_block("lanes.choose")
    done = builder.append_basic_block("lanes.done")
    builder.cbranch(builder.icmp_signed(">", nv, zero), choose, done)
    ends = [(entry, init)]

    def loop(name, prefetch):
        body = builder.append_basic_block(name)
        builder.position_at_end(body)
        i = builder.phi(intp)
        acc = [builder.phi(_VEC) for _ in range(nacc)]
        i.add_incoming(zero, choose)
        for a, v in zip(acc, init):
            a.add_incoming(v, choose)
        if prefetch:
            _prefetch(builder, data, i, pf, itemsize)
        x = _load16(builder, data, elem, i, itemsize)
        new = _step_dd(ops, acc, x, cv, ncv, two) if dd else _step_sums(ops, acc, x, cv)
        nxt = builder.add(i, ir.Constant(intp, WIDTH))
        i.add_incoming(nxt, body)
        for a, v in zip(acc, new):
            a.add_incoming(v, body)
        builder.cbranch(builder.icmp_signed("<", nxt, nv), body, done)
        ends.append((body, new))
        return body

    with_pf, without_pf = loop("lanes.loop_pf", True), loop("lanes.loop", False)
    builder.position_at_end(choose)
    builder.cbranch(builder.icmp_signed(">", pf, zero), with_pf, without_pf)
    builder.position_at_end(done)
    phis = [builder.phi(_VEC) for _ in range(nacc)]   # all phis first, then the stores
    for k, phi in enumerate(phis):
        for blk, vals in ends:
            phi.add_incoming(vals[k], blk)
    for phi, ptr in zip(phis, ptrs):
        builder.store(phi, ptr, align=8)
    return context.get_dummy_value()


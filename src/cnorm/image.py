"""``normalize_image``: ToTensor + Normalize (+ layout change) in one pass.

The kernels (Numba, ``parallel=True``) walk the *output* in its memory order
and read the input through a strided NCHW view, so the conversion, scaling,
per-channel normalization and transpose happen in one pass with no
temporaries the size of the image.  8- and 16-bit inputs (uint8, uint16,
float16, bfloat16) go through a per-channel lookup table of all their codes,
built by the same element function; float32/float64 inputs are computed
directly.
"""
from __future__ import annotations

import math

import numpy as np

from . import _config
from ._validate import BFLOAT16, check_out, check_real

__all__ = ["normalize_image"]

_LAYOUTS = ("HWC", "CHW", "NHWC", "NCHW")
_OUT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)) + (
    (BFLOAT16,) if BFLOAT16 is not None else ())
_SPLIT = 134217729.0  # 2**27 + 1 (Dekker)
_BIG = 2.0**995  # above this, _SPLIT * x overflows

try:
    import numba
    from numba import njit, prange

    from ._numba_policy import JIT_OPTIONS, jit
except ImportError:  # pragma: no cover - numba is a runtime dependency
    numba = None

# ---------------------------------------------------------------- kernels
if numba is not None:
    # cnorm's one JIT policy (no fast-math: the error-free transforms need exact IEEE)
    @jit
    def _normalize1(v, sh, sl, m, sd):
        """Correctly-rounded-ish float64 of ``(v * scale - m) / sd``.

        ``scale = sh + sl`` is pre-split (Dekker): the product is exact as a
        pair, the subtraction is a TwoSum, and the quotient of the double-double
        by ``sd`` gets one correction step, so the result is within ~0.5 ulp of
        float64 and rounds to float32/float16 within 1 ulp.
        """
        p = v * (sh + sl)
        plain = (p - m) / sd
        if not (abs(v) < _BIG and abs(plain) < _BIG and sd < _BIG):
            return plain  # inf/nan, or beyond 2**995 where Dekker's split overflows
        t = _SPLIT * v
        vh = t - (t - v)
        vl = v - vh
        pe = ((vh * sh - p) + vh * sl + vl * sh) + vl * sl
        s = p - m
        bb = s - p
        e = (p - (s - bb)) + (-m - bb) + pe
        h = s + e
        lo = e - (h - s)
        q1 = h / sd
        t = _SPLIT * q1
        qh = t - (t - q1)
        ql = q1 - qh
        t = _SPLIT * sd
        dh = t - (t - sd)
        dl = sd - dh
        r = q1 * sd
        rl = ((qh * dh - r) + qh * dl + ql * dh) + ql * dl
        return q1 + ((h - r) - rl + lo) / sd

    @jit
    def _dec_half(x):
        b = np.int64(x)
        e = (b >> 10) & 0x1F
        f = np.float64(b & 0x3FF)
        if e == 0x1F:
            v = np.inf if f == 0 else np.nan
        elif e == 0:
            v = f * 5.9604644775390625e-08  # 2**-24
        else:
            v = math.ldexp(f + 1024.0, e - 25)
        return -v if b & 0x8000 else v

    @jit
    def _dec_bf16(x):
        b = np.int64(x)
        e = (b >> 7) & 0xFF
        f = np.float64(b & 0x7F)
        if e == 0xFF:
            v = np.inf if f == 0 else np.nan
        elif e == 0:
            v = math.ldexp(f, -133)
        else:
            v = math.ldexp(f + 128.0, e - 134)
        return -v if b & 0x8000 else v

    @jit
    def _enc_bits(y, mbits, bias):
        """Bits of float64 ``y`` in a 16-bit float with ``mbits`` mantissa bits and
        exponent ``bias`` (float16: 10, 15; bfloat16: 7, 127), round to nearest even."""
        sign = 0x8000 if math.copysign(1.0, y) < 0 else 0
        inf = (2 * bias + 1) << mbits
        a = abs(y)
        if a != a:
            return np.uint16(sign | inf | (1 << (mbits - 1)))
        if a >= math.ldexp(2.0 - math.ldexp(1.0, -mbits - 1), bias):  # rounds past the max
            return np.uint16(sign | inf)
        if a < math.ldexp(1.0, 1 - bias):  # subnormal: in units of the smallest one
            q = math.ldexp(a, bias + mbits - 1)
            base = 0
        else:
            mant, ex = math.frexp(a)  # a = mant * 2**ex, mant in [0.5, 1)
            q = math.ldexp(mant, mbits + 1)
            base = ((ex + bias - 1) << mbits) - (1 << mbits)
        r = math.floor(q)
        d = q - r
        if d > 0.5 or (d == 0.5 and r % 2 == 1):
            r += 1
        return np.uint16(sign | (base + np.int64(r)))

    @njit(inline="always", **JIT_OPTIONS)  # inlined: the loops vectorize around it
    def _elem(x, code, enc, precise, sh, sl, m, sd):
        """One output value: decode ``code`` (0 value, 1 float16 bits, 2 bfloat16 bits),
        normalize, encode ``enc`` (1 float16 bits, 2 bfloat16 bits, 0 the float64 itself
        for the store to round).

        Not ``precise`` (inputs of <= 24 significant bits, output float32 or
        float16): ``v*sh`` and ``v*sl`` are exact and ``v*sh - m`` is exact
        wherever it cancels (Sterbenz), so ``((v*sh - m) + v*sl) / sd`` is
        within ~2 float64 ulps, far inside the output's half ulp.
        """
        if code == 1:
            v = _dec_half(x)
        elif code == 2:
            v = _dec_bf16(x)
        else:
            v = np.float64(x)
        if precise:
            y = _normalize1(v, sh, sl, m, sd)
        elif sl != 0.0:
            y = ((v * sh - m) + v * sl) / sd
        else:  # scale fits 26 bits (e.g. 1.0): v*sh is the exact product
            y = (v * sh - m) / sd
        if enc == 1:
            return _enc_bits(y, 10, 15)
        if enc == 2:
            return _enc_bits(y, 7, 127)
        return y

    # The kernels read and write flat 1-d views with element strides g = (N, C, H, W,
    # src offset, src strides n c h w, dst offset, dst strides n c h w), so one
    # compiled copy per (input, output) dtype serves every layout and stride.
    # Indices are cast to unsigned (they are never negative) to skip wraparound checks.
    @jit(parallel=True)
    def _direct(src, dst, g, code, enc, precise, ah, al, mean, std, channels_last):
        """dst[n, c, h, w] = f(src[n, c, h, w]), walking dst's memory order."""
        N, C, H, W, so, sn, sc, sh, sw = g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8]
        do, dn, dc, dh, dw = g[9], g[10], g[11], g[12], g[13]
        if channels_last:
            for r in prange(N * H):
                n, h = r // H, r % H
                for w in range(W):
                    ps = so + n * sn + h * sh + w * sw
                    pd = do + n * dn + h * dh + w * dw
                    for c in range(C):
                        dst[np.uint64(pd + c * dc)] = _elem(
                            src[np.uint64(ps + c * sc)], code, enc, precise, ah, al,
                            mean[c], std[c])
        else:
            for r in prange(N * C * H):
                n, c, h = r // (C * H), (r // H) % C, r % H
                ps = so + n * sn + c * sc + h * sh
                pd = do + n * dn + c * dc + h * dh
                m, sd = mean[c], std[c]
                for w in range(W):
                    dst[np.uint64(pd + w * dw)] = _elem(src[np.uint64(ps + w * sw)], code,
                                                        enc, precise, ah, al, m, sd)

    @jit(parallel=True)
    def _lookup(codes, dst, g, lut, channels_last):
        """dst[n, c, h, w] = lut[c, codes[n, c, h, w]], walking dst's memory order."""
        N, C, H, W, so, sn, sc, sh, sw = g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8]
        do, dn, dc, dh, dw = g[9], g[10], g[11], g[12], g[13]
        if channels_last:
            for r in prange(N * H):
                n, h = r // H, r % H
                for w in range(W):
                    ps = so + n * sn + h * sh + w * sw
                    pd = do + n * dn + h * dh + w * dw
                    for c in range(C):
                        dst[np.uint64(pd + c * dc)] = lut[c, codes[np.uint64(ps + c * sc)]]
        else:
            for r in prange(N * C * H):
                n, c, h = r // (C * H), (r // H) % C, r % H
                ps = so + n * sn + c * sc + h * sh
                pd = do + n * dn + c * dc + h * dh
                for w in range(W):
                    dst[np.uint64(pd + w * dw)] = lut[c, codes[np.uint64(ps + w * sw)]]

    @jit
    def _fill_table(codes, table, code, enc, precise, ah, al, mean, std):
        """table[c, k] = f(codes[k]) for every channel: the lookup table of 8/16-bit codes."""
        for c in range(table.shape[0]):
            for k in range(codes.shape[0]):
                table[c, k] = _elem(codes[k], code, enc, precise, ah, al, mean[c], std[c])


def _flat(a, writeable):
    """``(1-d view of a's memory span, element offset of a[0, ...], element strides)``."""
    isz = a.itemsize
    low = a[tuple(slice(None, None, -1) if st < 0 else slice(None) for st in a.strides)]
    span = 1 + sum((n - 1) * st for n, st in zip(low.shape, low.strides)) // isz
    flat = np.lib.stride_tricks.as_strided(low, shape=(span,), strides=(isz,),
                                           writeable=writeable)
    offset = (a.__array_interface__["data"][0] - low.__array_interface__["data"][0]) // isz
    return flat, offset, [st // isz for st in a.strides]


# ---------------------------------------------------------------- validation
def _channel_vector(v, name, c):
    a = np.asarray(v)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"normalize_image: {name} must be a sequence of real numbers, got {v!r}")
    if a.ndim != 1 or a.shape[0] != c:
        raise ValueError(f"normalize_image: {name} has {a.size if a.ndim == 1 else a.shape} "
                         f"values but the image has {c} channels")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"normalize_image: {name} must be finite, got {v!r}")
    return np.ascontiguousarray(a)


def _check_layout(value, name):
    if not isinstance(value, str) or value not in _LAYOUTS:
        raise ValueError(f"normalize_image: {name} must be one of {list(_LAYOUTS)}, got {value!r}")
    return value


def _codes_kind(dt):
    """(decoder name, number of codes for a lookup table or 0) of an input dtype."""
    if dt == np.uint8:
        return "value", 256
    if dt == np.uint16:
        return "value", 65536
    if dt == np.float16:
        return "half", 65536
    if BFLOAT16 is not None and dt == BFLOAT16:
        return "bf16", 65536
    if dt in (np.dtype(np.float32), np.dtype(np.float64)):
        return "value", 0
    allowed = "uint8, uint16, float16, float32, float64" + (", bfloat16" if BFLOAT16 else "")
    raise TypeError(f"normalize_image: img must have dtype {allowed}, got {dt}")


def _split(x):
    t = _SPLIT * x
    hi = t - (t - x)
    return hi, x - hi


def _numpy_normalize(v, scale, mean, std):
    """The kernel's element function, vectorized (the 'numpy' backend)."""
    from ._reference import dd_add, dd_div, two_prod
    with np.errstate(all="ignore"):
        plain = (v * scale - mean) / std
        p, pe = two_prod(v, np.float64(scale))
        h, lo = dd_add(p, pe, -mean, np.zeros_like(mean))
        y = dd_div(h, lo, std)[0]
    big = ~((np.abs(v) < _BIG) & (np.abs(plain) < _BIG) & (std < _BIG))
    return np.where(big, plain, y)


def normalize_image(img, mean, std, *, scale=1 / 255, layout="HWC", out_layout="CHW",
                    dtype=np.float32, out=None, backend="auto", num_threads=None):
    """Convert, scale, normalize per channel and re-lay-out an image in one pass.

    Computes ``(img * scale - mean[c]) / std[c]`` for every pixel of channel
    ``c`` (what torchvision's ``ToTensor()`` followed by ``Normalize(mean,
    std)`` do), writing it in ``out_layout``.

    Parameters
    ----------
    img : array_like
        uint8, uint16, float16, float32, float64 (or bfloat16 with ``ml_dtypes``)
        image ("HWC", "CHW") or batch ("NHWC", "NCHW"); any strides.
    mean, std : sequence of float
        One value per channel; ``std`` must be positive, both finite.
    scale : float, default 1/255
        Multiplies the raw values first (use 1.0 for float images in [0, 1],
        1/65535 for 16-bit images).
    layout : {'HWC', 'CHW', 'NHWC', 'NCHW'}, default 'HWC'
        Axis order of ``img``.
    out_layout : {'HWC', 'CHW', 'NHWC', 'NCHW'}, default 'CHW'
        Axis order of the result; same rank as ``layout``.
    dtype : {float16, float32, float64} or bfloat16, default float32
        Output dtype (bfloat16 needs ``ml_dtypes``).
    out : ndarray, optional
        Writeable array of the output shape and dtype, any strides.
    backend : {'auto', 'numba', 'numpy'}
        ``'auto'`` is the Numba kernel (there is no Cython one); ``'numpy'`` a
        vectorized reference that allocates temporaries.
    num_threads : int, optional
        Threads for the kernel (default :func:`cnorm.get_num_threads`).

    Returns
    -------
    ndarray
        Shape of the image in ``out_layout``, dtype ``dtype``.

    Notes
    -----
    Each value is computed in float64 with an exact product (Dekker), a
    TwoSum subtraction and a corrected division, then rounded once to
    ``dtype``: the result is within 1 ulp of the exact ``(img * scale -
    mean) / std`` of the stored values, even where the subtraction cancels.
    8- and 16-bit inputs use a per-channel table of every code (made by the
    same function, so results are identical); 16-bit tables are used only
    for images with at least 4 values per table entry.  The kernel walks the
    output in memory order, reading the input through a strided view.

    Examples
    --------
    >>> import numpy as np, cnorm
    >>> img = np.array([[[0, 255, 255]]], dtype=np.uint8)           # 1x1 RGB, HWC
    >>> cnorm.normalize_image(img, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.25])
    array([[[-1.]],
    <BLANKLINE>
           [[ 1.]],
    <BLANKLINE>
           [[ 2.]]], dtype=float32)
    """
    a = np.asarray(img)
    kind, ncodes = _codes_kind(a.dtype)
    layout = _check_layout(layout, "layout")
    out_layout = _check_layout(out_layout, "out_layout")
    if a.ndim != len(layout):
        raise ValueError(f"normalize_image: layout={layout!r} needs a {len(layout)}-d image, "
                         f"got shape {a.shape}")
    if len(out_layout) != len(layout):
        raise ValueError(f"normalize_image: out_layout={out_layout!r} must have the rank of "
                         f"layout={layout!r}")
    c = a.shape[layout.index("C")]
    mean = _channel_vector(mean, "mean", c)
    std = _channel_vector(std, "std", c)
    if not (std > 0).all():
        raise ValueError(f"normalize_image: std must be > 0, got {std.tolist()}")
    scale = check_real(scale, "scale", "normalize_image")
    if not math.isfinite(scale):
        raise ValueError(f"normalize_image: scale must be finite, got {scale!r}")
    try:
        odt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"normalize_image: dtype={dtype!r} is not a dtype") from None
    if odt not in _OUT_DTYPES:
        raise TypeError(f"normalize_image: dtype must be float16, float32 or float64 "
                        f"(or bfloat16), got {odt}")
    if backend not in ("auto", "numba", "numpy"):
        raise ValueError(f"normalize_image: backend must be 'auto', 'numba' or 'numpy' "
                         f"(there is no Cython kernel), got {backend!r}")
    _config.resolve_threads(num_threads)
    lay4 = layout if len(layout) == 4 else "N" + layout
    olay4 = out_layout if len(out_layout) == 4 else "N" + out_layout
    src = a if a.ndim == 4 else a[None]
    dims = dict(zip(lay4, src.shape))
    oshape = tuple(dims[k] for k in out_layout)
    if out is not None:
        check_out(out, oshape, odt, "out", "normalize_image")
    res = np.empty(oshape, dtype=odt) if out is None else out
    if res.size == 0:
        return res
    src4 = src.transpose([lay4.index(k) for k in "NCHW"])
    dst = res if res.ndim == 4 else res[None]
    dst4 = dst.transpose([olay4.index(k) for k in "NCHW"])

    if backend == "numpy" or numba is None:
        v = src4.astype(np.float32) if kind == "bf16" else src4
        y = _numpy_normalize(v.astype(np.float64), scale, mean[:, None, None], std[:, None, None])
        dst4[...] = y.astype(odt)
        return res

    ah, al = _split(scale)
    codes = src4.view(np.uint16) if kind in ("half", "bf16") else src4
    if any(st % codes.itemsize for st in codes.strides):  # misaligned view: copy it
        codes = np.ascontiguousarray(codes)
    store = dst4.view(np.uint16) if odt.itemsize == 2 else dst4
    target = store if not any(st % store.itemsize for st in store.strides) else np.empty(
        store.shape, store.dtype)
    src_flat, soff, sst = _flat(codes, False)
    dst_flat, doff, dst_st = _flat(target, True)
    g = np.array([*codes.shape, soff, *sst, doff, *dst_st], dtype=np.int64)
    code = {"value": 0, "half": 1, "bf16": 2}[kind]
    enc = 1 if odt == np.float16 else (2 if odt == BFLOAT16 else 0)
    precise = odt == np.float64 or a.dtype == np.float64
    channels_last = olay4[-1] == "C"
    with _config.call_slot(num_threads) as nthreads:
        previous = numba.get_num_threads()
        numba.set_num_threads(max(1, min(nthreads, numba.config.NUMBA_NUM_THREADS)))
        try:
            if ncodes and (ncodes == 256 or a.size >= 4 * c * ncodes):
                lut = np.empty((c, ncodes), dtype=store.dtype)
                table = np.arange(ncodes, dtype=codes.dtype)
                table.flags.writeable = False
                _fill_table(table, lut, code, enc, precise, ah, al, mean, std)
                _lookup(src_flat, dst_flat, g, lut, channels_last)
            else:
                _direct(src_flat, dst_flat, g, code, enc, precise, ah, al, mean, std,
                        channels_last)
        finally:
            numba.set_num_threads(previous)
    if target is not store:
        store[...] = target
    return res

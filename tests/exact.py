"""Exact references for the moments engine, and adversarial data.

Every finite float is ``M * 2**E`` with an integer ``M`` (``|M| < 2**53``), so
sums of stored values and of their squares are exact in Python integers.  To
keep that fast on long slices the integer sums are vectorized: each term is
split into 30-bit *limbs* on a per-slice grid (``2**Emin``) and the limbs are
summed with ``np.bincount``, whose float64 accumulation is exact here because
every partial sum is an integer below ``2**53`` (at most ``2**22`` terms below
``2**30`` per call).  Only the final combination of limbs uses Python ints.

Results are ``Fraction`` objects (exact), or ``float('nan')`` / ``±inf`` for
slices that contain NaN/inf or are empty, in object arrays shaped like NumPy's
reduction result.  :func:`ulp_error` compares a computed array with them.

Data generators return arrays *stored* in the requested dtype: the reference is
always the exact value for the stored inputs, never for the float64 values they
were generated from.
"""
from __future__ import annotations

import math
import operator
from fractions import Fraction

import numpy as np

__all__ = [
    "exact_mean", "exact_var", "exact_std", "exact_moments", "exact_normalized",
    "exact_weighted_moments", "round_to_dtype", "ulp", "ulp_error", "max_ulp_error",
    "offset_data", "adversarial_rows", "max_offset", "CANCELLATION",
]

_CHUNK = 1 << 22        # terms per bincount call: keeps every partial sum below 2**52
_NAN = float("nan")
_INF = float("inf")


# ---------------------------------------------------------------- layout helpers
def _axes_tuple(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    items = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(sorted(a % ndim for a in items)) if ndim else ()


def _rows(x, axis):
    """float64 ``(K, N)`` rows (one per kept position, reduced values last) and the kept shape."""
    x = np.asarray(x)
    axes = _axes_tuple(axis, x.ndim)
    kept = [a for a in range(x.ndim) if a not in axes]
    kept_shape = tuple(x.shape[a] for a in kept)
    n = 1
    for a in axes:
        n *= x.shape[a]
    k = 1
    for s in kept_shape:
        k *= s
    y = np.transpose(x, kept + list(axes)) if x.ndim else x
    return np.asarray(y, dtype=np.float64).reshape(k, n), kept_shape


def _obj(values, shape):
    out = np.empty(len(values), dtype=object)
    out[:] = values if values else []
    return out.reshape(shape)


# ---------------------------------------------------------------- exact integer sums
def _split(v):
    """float64 finite array -> (signed int64 mantissa M, int64 exponent E): v == M * 2**E."""
    m, e = np.frexp(v)
    mant = (m * 9007199254740992.0).astype(np.int64)  # m * 2**53, exact
    return mant, e.astype(np.int64) - 53


def _bincount_exact(keys, weights, nkeys):
    """Exact integer sums of ``weights`` (integers, |w| < 2**30) per key, as int64."""
    acc = np.zeros(nkeys, np.int64)
    for s in range(0, keys.size, _CHUNK):
        acc += np.bincount(keys[s:s + _CHUNK], weights=weights[s:s + _CHUNK],
                           minlength=nkeys).astype(np.int64)
    return acc


def _scaled(i, e):
    """Fraction i * 2**e."""
    return Fraction(i << e) if e >= 0 else Fraction(i, 1 << -e)


def _row_sums(v, present, squares=True):
    """Exact (count, sum, sum of squares) per row of float64 ``v`` over ``present`` entries.

    ``present`` is a boolean mask of finite values to include.  Every value is
    ``M * 2**(emin + s)`` (``emin`` per row); integer pieces of ``M`` and ``M**2``
    below ``2**30`` are summed per ``(row, s)`` key with ``np.bincount`` and the
    few distinct keys are combined with Python ints.  Returns int counts and
    lists of Fractions.
    """
    k, n = v.shape
    counts = present.sum(axis=1).tolist()
    mant, expo = _split(np.where(present, v, 0.0))
    nz = mant != 0
    big = np.int64(1 << 40)
    emin = np.where(nz, expo, big).min(axis=1) if n else np.zeros(k, np.int64)
    emin = np.where(emin == big, 0, emin)
    shift = (expo - emin[:, None])[nz]
    rows = np.nonzero(nz)[0]
    mag = np.abs(mant[nz])
    sign = np.sign(mant[nz]).astype(np.float64)
    span = int(shift.max()) + 1 if shift.size else 1
    keys = rows * span + shift
    nkeys = k * span
    m27 = (1 << 27) - 1
    hi, lo = mag >> 27, mag & m27          # mag = hi * 2**27 + lo, hi < 2**26
    parts1 = [_bincount_exact(keys, sign * lo, nkeys), _bincount_exact(keys, sign * hi, nkeys)]
    parts2 = []
    if squares:
        hh, hl, ll = hi * hi, 2 * hi * lo, lo * lo    # < 2**52, 2**54, 2**54
        for t, cut in ((hh, 26), (hl, 27), (ll, 27)):
            parts2.append(_bincount_exact(keys, (t & ((1 << cut) - 1)).astype(np.float64), nkeys))
            parts2.append(_bincount_exact(keys, (t >> cut).astype(np.float64), nkeys))
    used = np.flatnonzero(np.logical_or.reduce([p != 0 for p in parts1 + parts2]))
    tot1 = [0] * k
    tot2 = [0] * k
    cols1 = [p[used].tolist() for p in parts1]
    cols2 = [p[used].tolist() for p in parts2]
    for j, key in enumerate(used.tolist()):
        r, s = divmod(key, span)
        tot1[r] += (cols1[0][j] + (cols1[1][j] << 27)) << s
        if squares:
            a0, a1, b0, b1, c0, c1 = (c[j] for c in cols2)
            sq = ((a0 + (a1 << 26)) << 54) + ((b0 + (b1 << 27)) << 27) + (c0 + (c1 << 27))
            tot2[r] += sq << (2 * s)
    s1 = [_scaled(tot1[i], int(emin[i])) for i in range(k)]
    if not squares:
        return counts, s1, None
    s2 = [_scaled(tot2[i], 2 * int(emin[i])) for i in range(k)]
    return counts, s1, s2


def _nonfinite_mean(v_row, present_row):
    """IEEE mean of a row holding inf/NaN among its present values (NaN or ±inf)."""
    vals = v_row[present_row]
    if np.isnan(vals).any():
        return _NAN
    pos, neg = bool((vals == _INF).any()), bool((vals == -_INF).any())
    if pos and neg:
        return _NAN
    return _INF if pos else -_INF


def _fraction(v):
    """A Python/NumPy integer or float as an exact Fraction."""
    if isinstance(v, Fraction):
        return v
    try:
        return Fraction(operator.index(v))
    except TypeError:
        return Fraction(float(v))


def _divide_var(m2, count, ddof):
    """M2 / (count - ddof) with np.var's rules for count - ddof <= 0."""
    d = Fraction(count) - _fraction(ddof)
    if count == 0:
        return _NAN
    if d <= 0:
        return _INF if m2 > 0 else _NAN
    return m2 / d


def _moments_rows(x, axis, ddof, skipna, want_var=True):
    v, kept_shape = _rows(x, axis)
    finite = np.isfinite(v)
    present = ~np.isnan(v) if skipna else np.ones(v.shape, bool)
    counts, s1, s2 = _row_sums(v, present & finite, squares=want_var)
    means, varis = [], []
    for i in range(v.shape[0]):
        c = int(present[i].sum())
        bad = bool((present[i] & ~finite[i]).any())
        if c == 0:
            means.append(_NAN)
            varis.append(_NAN)
            continue
        if bad:
            means.append(_nonfinite_mean(v[i], present[i]))
            varis.append(_NAN)
            continue
        mu = s1[i] / c
        means.append(mu)
        if want_var:
            m2 = s2[i] - s1[i] * s1[i] / c
            varis.append(_divide_var(m2, c, ddof))
    return _obj(means, kept_shape), (_obj(varis, kept_shape) if want_var else None)


def exact_mean(x, axis=None, *, skipna=False):
    """Exact mean of the stored values of ``x`` over ``axis`` (object array of Fractions).

    NaN in a slice gives NaN, ±inf gives the IEEE mean (±inf or NaN), an empty
    slice NaN.  ``skipna`` drops NaNs first (like ``np.nanmean``).
    """
    return _moments_rows(x, axis, 0, skipna, want_var=False)[0]


def exact_var(x, axis=None, ddof=0, *, skipna=False):
    """Exact ``Σ(x - mean)² / (n - ddof)`` over ``axis`` (np.var's rules for n - ddof <= 0)."""
    return _moments_rows(x, axis, ddof, skipna)[1]


def exact_moments(x, axis=None, ddof=0, *, skipna=False):
    """``(exact_mean, exact_var)`` in one pass."""
    return _moments_rows(x, axis, ddof, skipna)


def _sqrt_fraction(q, bits=140):
    """sqrt(q) for a Fraction q >= 0, as a Fraction with relative error < 2**-bits."""
    if q == 0:
        return Fraction(0)
    num, den = q.numerator, q.denominator
    # scale so that the integer square root carries at least `bits` bits
    shift = max(0, bits * 2 + den.bit_length() - num.bit_length() + 4)
    shift += shift & 1
    root = math.isqrt((num << shift) // den)
    return Fraction(root, 1 << (shift // 2))


def exact_std(x, axis=None, ddof=0, *, skipna=False):
    """sqrt of :func:`exact_var` to 140 bits (a Fraction; NaN/inf pass through)."""
    var = exact_var(x, axis, ddof, skipna=skipna)
    flat = [_sqrt_fraction(v) if isinstance(v, Fraction) else v for v in var.ravel()]
    return _obj(flat, var.shape)


def exact_weighted_moments(x, weights, axis=None, ddof=0):
    """Exact frequency-weighted ``(mean, var)``: ``Σwx/Σw`` and ``Σw(x-mean)²/(Σw - ddof)``.

    Plain Fraction arithmetic (for the small arrays of the weighted tests).
    Weights broadcast to ``x``; a slice whose weight sum is 0 gives NaN.
    """
    x = np.asarray(x)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), x.shape)
    v, kept_shape = _rows(x, axis)
    ww, _ = _rows(w, axis)
    means, varis = [], []
    for xr, wr in zip(v, ww):
        if not np.isfinite(xr[wr > 0]).all():
            means.append(_nonfinite_mean(xr, wr > 0))
            varis.append(_NAN)
            continue
        fx = [Fraction(float(a)) for a in xr]
        fw = [Fraction(float(b)) for b in wr]
        sw = sum(fw, Fraction(0))
        if sw == 0:
            means.append(_NAN)
            varis.append(_NAN)
            continue
        mu = sum((b * a for a, b in zip(fx, fw)), Fraction(0)) / sw
        m2 = sum((b * (a - mu) ** 2 for a, b in zip(fx, fw)), Fraction(0))
        d = sw - _fraction(ddof)
        means.append(mu)
        varis.append(m2 / d if d > 0 else (_INF if m2 > 0 else _NAN))
    return _obj(means, kept_shape), _obj(varis, kept_shape)


def exact_normalized(x, axes=-1, eps=0.0):
    """``(x - mean) / sqrt(var + eps)`` per element, statistics over ``axes`` (biased var).

    ``eps`` is taken as its float64 value.  Returns an object array shaped like
    ``x`` of Fractions with relative error below 2**-120 (exactly 0 where
    ``x == mean``); slices holding NaN/inf give NaN.
    """
    x = np.asarray(x)
    ax = _axes_tuple(axes, x.ndim)
    kept = [a for a in range(x.ndim) if a not in ax]
    v, kept_shape = _rows(x, ax)
    finite = np.isfinite(v)
    counts, s1, s2 = _row_sums(v, finite)
    mant, expo = _split(np.where(finite, v, 0.0))
    epsf = Fraction(float(eps))
    out = np.empty(v.shape, dtype=object)
    for i in range(v.shape[0]):
        n = v.shape[1]
        if n == 0:
            continue
        if not finite[i].all():
            out[i, :] = _NAN
            continue
        nz = mant[i] != 0
        emin = int(expo[i][nz].min()) if nz.any() else 0
        a = s1[i] * (Fraction(1 << -emin) if emin < 0 else Fraction(1, 1 << emin))
        a = a.numerator  # integer: sum in units of 2**emin
        var = (s2[i] - s1[i] * s1[i] / n) / n
        d = var + epsf
        # y = (n*x_i - A) * 2**emin / (n * sqrt(d)), with c = 2**emin / (n*sqrt(d))
        c2 = _scaled(1, 2 * emin) / (Fraction(n * n) * d) if d > 0 else None
        c = _sqrt_fraction(c2, 160) if c2 is not None else None
        ms = mant[i].tolist()
        sh = (expo[i] - emin).tolist()
        row = []
        for m, s, z in zip(ms, sh, nz.tolist()):
            num = n * (m << s if z else 0) - a
            if num == 0:
                row.append(Fraction(0))
            elif c is None:
                row.append(_NAN)
            else:
                row.append(Fraction(num * c.numerator, c.denominator))
        out[i, :] = row
    # back to x's axis order
    shaped = out.reshape(kept_shape + tuple(x.shape[a] for a in ax))
    inverse = np.argsort(kept + list(ax))
    return np.transpose(shaped, inverse) if x.ndim else shaped.reshape(())


# ---------------------------------------------------------------- rounding and ulps
def _fmt(dtype):
    fi = np.finfo(dtype)
    return fi.nmant + 1, int(fi.minexp), Fraction(float(fi.max))


def _floor_log2(q):
    """floor(log2(q)) for a Fraction q > 0."""
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if _scaled(1, e) > q:
        e -= 1
    elif _scaled(1, e + 1) <= q:
        e += 1
    return e


def round_to_dtype(q, dtype):
    """Correctly round a Fraction (or float) to ``dtype`` (half to even); returns a Python float."""
    if not isinstance(q, Fraction):
        return float(q)
    if q == 0:
        return 0.0
    p, emin, fmax = _fmt(dtype)
    a = abs(q)
    e = max(_floor_log2(a), emin)
    quantum = e - (p - 1)
    k = round(a / _scaled(1, quantum))        # Fraction.__round__: half to even
    val = k * _scaled(1, quantum)
    r = _INF if val > fmax else float(val)
    return r if q > 0 else -r


def ulp(value, dtype):
    """Unit in the last place of a (finite, representable) ``value`` in ``dtype``."""
    p, emin, fmax = _fmt(dtype)
    a = abs(float(value))
    if a == 0:
        return _scaled(1, emin - (p - 1))
    e = max(math.frexp(a)[1] - 1, emin)
    return _scaled(1, e - (p - 1))


def ulp_error(got, exact, dtype, floor=None):
    """``|got - exact| / ulp(exact rounded to dtype)`` elementwise, as a float64 array.

    NaN equals NaN and ±inf equals the same inf (error 0); a NaN/inf where the
    other side is finite, or the reverse, is ``inf``.  An exact value beyond the
    dtype's range that rounds to ±inf counts ``got == ±inf`` as exact.
    ``floor`` measures the error in ulps of ``max(|exact|, floor)`` instead (the
    normalized-output contract uses ``floor=2**-10``).
    """
    got = np.asarray(got)
    exact = np.asarray(exact, dtype=object)
    got, exact = np.broadcast_arrays(got, exact)
    _, _, fmax = _fmt(dtype)
    out = np.empty(got.shape, dtype=np.float64)
    for idx in np.ndindex(got.shape):
        g = float(got[idx])
        e = exact[idx]
        if not isinstance(e, Fraction):
            e = float(e)
            if math.isnan(e):
                out[idx] = 0.0 if math.isnan(g) else _INF
                continue
            if math.isinf(e):
                out[idx] = 0.0 if g == e else _INF
                continue
            e = Fraction(e)
        r = round_to_dtype(e, dtype)
        if math.isnan(g):
            out[idx] = _INF
            continue
        if math.isinf(r):
            if g == r:
                out[idx] = 0.0
                continue
            ref = float(fmax)
        else:
            ref = abs(r)
        if math.isinf(g):
            out[idx] = _INF
            continue
        if floor is not None:
            ref = max(ref, float(floor))
        out[idx] = float(abs(Fraction(g) - e) / ulp(ref, dtype))
    return out


def max_ulp_error(got, exact, dtype, floor=None):
    err = ulp_error(got, exact, dtype, floor)
    return float(err.max()) if err.size else 0.0


# ---------------------------------------------------------------- adversarial data
def max_offset(dtype):
    """Largest offset of unit-spread data the contract covers for this dtype."""
    return {np.dtype(np.float16): 1e3, np.dtype(np.float32): 1e7,
            np.dtype(np.float64): 1e15}[np.dtype(dtype)]


def offset_data(dtype, n, offset, scale=1.0, rng=None, shape=None):
    """``offset + scale * N(0, 1)`` stored in ``dtype`` (clipped to its finite range).

    ``n`` values (or an array of ``shape``); the generator is required so that
    the data are reproducible.
    """
    if rng is None:
        raise ValueError("offset_data needs a seeded numpy Generator")
    shape = (n,) if shape is None else tuple(shape)
    v = offset + scale * rng.standard_normal(shape)
    fmax = float(np.finfo(dtype).max)
    return np.clip(v, -fmax, fmax).astype(dtype)


#: the textbook cancellation set (float64): mean 0.5, var 0.25 + 5e31 - ...
CANCELLATION = {
    np.dtype(np.float16): [1e4, 1.0, -1e4, 1.0],
    np.dtype(np.float32): [1e8, 1.0, -1e8, 1.0],
    np.dtype(np.float64): [1e16, 1.0, -1e16, 1.0],
}


def adversarial_rows(dtype, n, rng):
    """Named 1-d slices of length ``n`` stored in ``dtype``, covering the precision contract.

    Condition numbers from 1 up to the dtype's limit, tiny and huge scales
    (squares that overflow or underflow the dtype), cancelling signs and
    subnormals.  Returns a list of ``(name, array)``.
    """
    dt = np.dtype(dtype)
    lim = max_offset(dt)
    rows = []
    offsets = [0.0] + [10.0 ** k for k in range(1, int(round(math.log10(lim))) + 1)]
    if dt == np.float64:
        offsets = [0.0, 1e4, 1e8, 1e10, 1e12, 1e14, 1e15]
    for off in offsets:
        rows.append((f"offset {off:g}", offset_data(dt, n, off, 1.0, rng)))
        rows.append((f"offset -{off:g}", offset_data(dt, n, -off, 1.0, rng)))
    rows.append((f"offset {lim:g} spread 0.25", offset_data(dt, n, lim, 0.25 * lim * 2.0 ** -(np.finfo(dt).nmant - 2), rng)))
    if dt == np.float64:
        rows += [("tiny 1e-150", offset_data(dt, n, 3e-150, 1e-150, rng)),
                 ("tiny 1e-150 offset 1e8", offset_data(dt, n, 1e-142, 1e-150, rng)),
                 ("huge 1e150", offset_data(dt, n, 3e150, 1e150, rng)),
                 ("huge 1e150 offset 1e8", offset_data(dt, n, 1e158, 1e150, rng)),
                 ("subnormal", offset_data(dt, n, 0.0, 1e-310, rng))]
    elif dt == np.float32:
        rows += [("tiny 1e-30", offset_data(dt, n, 3e-30, 1e-30, rng)),
                 ("tiny 1e-30 offset 1e5", offset_data(dt, n, 1e-25, 1e-30, rng)),
                 ("huge 1e20 (squares overflow)", offset_data(dt, n, 1e20, 1e17, rng)),
                 ("huge 1e30 mean", offset_data(dt, n, 1e30, 1e17, rng)),
                 ("subnormal", offset_data(dt, n, 0.0, 1e-40, rng))]
    else:
        rows += [("tiny 1e-4 (subnormals)", offset_data(dt, n, 1e-4, 1e-4, rng)),
                 ("tiny 1e-4 offset 10", offset_data(dt, n, 1e-3, 1e-4, rng)),
                 ("huge 6e4 (squares overflow)", offset_data(dt, n, 6e4, 1e2, rng)),
                 ("huge -6e4", offset_data(dt, n, -6e4, 1e2, rng))]
    signs = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    big = {np.dtype(np.float16): 1e4, np.dtype(np.float32): 1e8,
           np.dtype(np.float64): 1e16}[dt]
    rows.append(("cancelling signs", (signs * big * (1 + rng.random(n))).astype(dt)))
    mixed = rng.standard_normal(n)
    mixed[::3] *= big
    rows.append(("mixed magnitudes", mixed.astype(dt)))
    return rows

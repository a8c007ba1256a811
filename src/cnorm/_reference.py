"""The ``numpy`` backend: plain vectorized NumPy, float64 and compensated.

It computes the same states as the compiled kernels with different code:
float16/float32 inputs by a corrected two-pass in float64; float64 inputs by
error-free transformations (TwoSum, Dekker products) and Rump-style exact
extraction sums, so it meets the same precision contract.  It allocates
float64 temporaries the size of the input: it is the readable reference, not
the fast path.
"""
from __future__ import annotations

import numpy as np

_SPLIT = 134217729.0  # 2**27 + 1


def two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def two_prod(a, b):
    """p = fl(a*b) and its exact error (Dekker; operands above 2**995 are scaled
    by 2**-60 first so that the splitting cannot overflow)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    p = a * b
    with np.errstate(invalid="ignore"):
        sa = np.where(np.abs(a) > 2.0 ** 995, 2.0 ** -60, 1.0)
        sb = np.where(np.abs(b) > 2.0 ** 995, 2.0 ** -60, 1.0)
    err = _dekker_err(a * sa, b * sb, p * (sa * sb))
    return p, err / (sa * sb)


def _dekker_err(a, b, p):
    t = _SPLIT * a
    ah = t - (t - a)
    al = a - ah
    t = _SPLIT * b
    bh = t - (t - b)
    bl = b - bh
    return ((ah * bh - p) + ah * bl + al * bh) + al * bl


def dd_add(ah, al, bh, bl):
    s, e = two_sum(ah, bh)
    e = e + (al + bl)
    t = s + e
    return t, e - (t - s)


def dd_div(ah, al, b):
    q1 = ah / b
    p, pe = two_prod(q1, b)
    q2 = ((ah - p) + (al - pe)) / b
    t = q1 + q2
    return t, q2 - (t - q1)


def dd_sq(ah, al):
    p, e = two_prod(ah, ah)
    e = e + 2.0 * ah * al
    t = p + e
    return t, e - (t - p)


def _extract(a, axes):
    """Split a = q + r with sum(q) exact; return (sum(q), r)."""
    n = 1
    for ax in axes:
        n *= a.shape[ax]
    m = np.max(np.abs(a), axis=axes, keepdims=True) if a.size else np.zeros(
        [1 if i in axes else s for i, s in enumerate(a.shape)])
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(np.where(m > 0, m, 1.0))) + np.ceil(np.log2(n + 2)) + 1
    sigma = np.ldexp(1.0, e.astype(np.int64))
    q = (sigma + a) - sigma
    return np.sum(q, axis=axes), a - q


def acc_sum(a, axes):
    """Double-double sum of float64 ``a`` over ``axes`` (relative error ~ n^3 eps^3)."""
    s1, r = _extract(a, axes)
    s2, r = _extract(r, axes)
    s3 = np.sum(r, axis=axes)
    h, l = two_sum(s1, s2)
    return dd_add(h, l, s3, np.zeros_like(s3))


def _slice_states(x, axes):
    """(n, mean_hi, mean_lo, M2_hi, M2_lo) of x over axes, all finite values."""
    xd = np.asarray(x, dtype=np.float64)
    n = 1
    for ax in axes:
        n *= xd.shape[ax]
    if xd.dtype == x.dtype:  # float64 input: compensated everywhere
        sh, sl = acc_sum(xd, axes)
        c = np.expand_dims(sh / n, axes)
        dh, dl = two_sum(xd, -c)
        s1h, s1l = acc_sum(dh, axes)
        t = acc_sum(dl, axes)
        s1h, s1l = dd_add(s1h, s1l, *t)
        p, pe = two_prod(dh, dh)
        s2h, s2l = acc_sum(p, axes)
        t = acc_sum(pe + 2.0 * dh * dl, axes)
        s2h, s2l = dd_add(s2h, s2l, *t)
    else:  # float16/float32: corrected two-pass in float64
        c = np.mean(xd, axis=axes, keepdims=True)
        d = xd - c
        s1h, s1l = np.sum(d, axis=axes), 0.0
        s2h, s2l = np.sum(d * d, axis=axes), 0.0
    c = np.squeeze(c, axis=axes) if axes else c
    qh, ql = dd_div(s1h, s1l, float(n))
    mh, ml = dd_add(c, np.zeros_like(c), qh, ql)
    th, tl = dd_sq(s1h, s1l)
    th, tl = dd_div(th, tl, float(n))
    m2h, m2l = dd_add(s2h, s2l, -th, -tl)
    neg = m2h < 0
    m2h = np.where(neg, 0.0, m2h)
    m2l = np.where(neg, 0.0, m2l)
    return np.stack(np.broadcast_arrays(float(n), mh, ml, m2h, m2l), axis=-1)


def states_of(x: np.ndarray, red_axes) -> np.ndarray:
    """States of ``x`` over ``red_axes`` (kept axes in order, then the 5 fields)."""
    axes = tuple(red_axes)
    kept_shape = tuple(s for i, s in enumerate(x.shape) if i not in axes)
    n = 1
    for ax in axes:
        n *= x.shape[ax]
    if n == 0 or x.size == 0:
        return np.zeros(kept_shape + (5,))
    xd = np.asarray(x, dtype=np.float64)
    finite = np.all(np.isfinite(xd), axis=axes)
    if finite.all():
        return _slice_states(x, axes).reshape(kept_shape + (5,))
    # slices with inf/nan: IEEE mean, undefined spread; others as usual
    with np.errstate(invalid="ignore", over="ignore"):
        plain_mean = np.mean(xd, axis=axes)
        safe = np.where(np.expand_dims(finite, axes), x, np.zeros((), x.dtype))
    out = _slice_states(safe, axes).reshape(kept_shape + (5,))
    bad = ~finite
    out[bad, 1] = plain_mean[bad]
    out[bad, 2] = 0.0
    out[bad, 3] = np.nan
    out[bad, 4] = 0.0
    return out


def merge_states(a: np.ndarray, b: np.ndarray) -> None:
    """Merge states b into a (rows of 5), Chan's formula in double-double."""
    na, nb = a[:, 0].copy(), b[:, 0]
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        dh, dl = dd_add(b[:, 1], b[:, 2], -a[:, 1], -a[:, 2])
        th, tl = two_prod(dh, nb)
        tl = tl + dl * nb
        th, tl = dd_div(th, tl, n)
        wh, wl = dd_sq(dh, dl)
        wh, wl = wh * na * nb, wl * na * nb
        wh, wl = dd_div(wh, wl, n)
        mh, ml = dd_add(a[:, 1], a[:, 2], th, tl)
        qh, ql = dd_add(a[:, 3], a[:, 4], b[:, 3], b[:, 4])
        qh, ql = dd_add(qh, ql, wh, wl)
        finite = np.isfinite(a[:, 1]) & np.isfinite(b[:, 1])
        ieee_mean = a[:, 1] * (na / n) + b[:, 1] * (nb / n)
    merged = np.stack([n, np.where(finite, mh, ieee_mean), np.where(finite, ml, 0.0),
                       np.where(finite, qh, np.nan), np.where(finite, ql, 0.0)], axis=-1)
    take_b = (na == 0)[:, None]
    keep_a = (nb == 0)[:, None]
    a[...] = np.where(keep_a, a, np.where(take_b, b, merged))


def finalize(states, ddof, mean, var):
    n = states[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean[...] = np.where(n == 0, np.nan,
                             np.where(np.isfinite(states[:, 1]), states[:, 1] + states[:, 2], states[:, 1]))
        d = n - ddof
        vh, _ = dd_div(states[:, 3], states[:, 4], np.where(d > 0, d, 1.0))
        vh = np.maximum(vh, 0.0)
        deg = np.where((states[:, 3] > 0) & (n > 0), np.inf, np.nan)
        var[...] = np.where(np.isnan(states[:, 3]), np.nan, np.where(d > 0, vh, deg))

"""The Numba backend (``cnorm._numba``): precision, layouts, threads, embedding.

The oracle is exact: sums of the stored values are formed in Python integers
(every float is an integer times a power of two), so the reference mean and
variance are exact rationals, and errors are measured in ulps of the output
dtype at the exact value.
"""
import io
import tokenize
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from cnorm import _config, _reference
from conftest import require

numba = require("numba")
import cnorm  # noqa: E402
from cnorm import _numba as cn  # noqa: E402
from cnorm import _numba_policy  # noqa: E402

DTYPES = [np.float16, np.float32, np.float64]
# (mean, var) ulp budgets of the precision contract (SPEC §3)
BUDGET = {np.float16: (1, 1), np.float32: (1, 1), np.float64: (1, 2)}
need_cython = pytest.mark.skipif(not _config.HAVE_EXTENSION, reason="Cython kernels not built")


# ---------------------------------------------------------------- exact oracle
def _int_sums(x):
    """(n, S, Q, e) with sum(x) = S * 2**e and sum(x**2) = Q * 2**(2e), exactly."""
    x = np.asarray(x, dtype=np.float64).ravel()
    m, ex = np.frexp(x)
    mi = (m * 2.0 ** 53).astype(np.int64)  # x = mi * 2**(ex - 53), exactly
    ex = ex.astype(np.int64) - 53
    e0 = int(ex.min()) if x.size else 0
    S = Q = 0
    for ee in np.unique(ex):
        sel = mi[ex == ee]
        shift = int(ee) - e0
        S += sum(sel.tolist()) << shift
        Q += sum(v * v for v in sel.tolist()) << (2 * shift)
    return x.size, S, Q, e0


def exact_moments(x):
    """Exact (mean, var) of the stored values of x (ddof = 0) as Fractions."""
    n, S, Q, e = _int_sums(x)
    scale = Fraction(2) ** e
    mean = Fraction(S, n) * scale
    var = Fraction(Q * n - S * S, n * n) * scale * scale
    return mean, var


def ulp_error(got, exact, dtype):
    """|got - exact| in ulps of ``dtype`` at the exact value."""
    got = float(got)
    if not np.isfinite(got):
        return np.inf
    ref = np.abs(dtype(float(exact)))  # exact rounded (to float64, then dtype)
    if ref == 0:
        ulp = np.finfo(dtype).smallest_subnormal
    elif ref == np.finfo(dtype).max:
        ulp = ref - np.nextafter(ref, dtype(0))
    else:
        ulp = np.spacing(ref)
    return float(abs(Fraction(got) - exact) / Fraction(float(ulp)))


def assert_max_ulp(got, ref, maxulp, what):
    diff = np.testing.assert_array_max_ulp(got, ref, maxulp=maxulp)  # raises past maxulp
    assert np.all(diff <= maxulp), what


def check_against_exact(x, axis, dtype, mean, var):
    """Every slice of x over `axis` (moved last) within the contract."""
    xm = np.moveaxis(np.asarray(x), axis, -1) if axis is not None else np.asarray(x).reshape(1, -1)
    xm = xm.reshape(-1, xm.shape[-1])
    mean = np.asarray(mean).ravel()
    var = np.asarray(var).ravel()
    bm, bv = BUDGET[dtype]
    for i, row in enumerate(xm):
        em, ev = exact_moments(row)
        assert mean[i].dtype == dtype
        e1 = ulp_error(mean[i], em, dtype)
        e2 = ulp_error(var[i], ev, dtype)
        assert e1 <= bm, f"slice {i}: mean {mean[i]!r} is {e1:.3g} ulp from {float(em)!r}"
        assert e2 <= bv, f"slice {i}: var {var[i]!r} is {e2:.3g} ulp from {float(ev)!r}"
        if ev == 0:
            assert var[i] == 0


def offset_data(rng, dtype, shape):
    """The offsets of SPEC §3: hard for one-pass formulas, fine for cnorm."""
    if dtype == np.float64:
        return 1e8 + rng.standard_normal(shape)
    if dtype == np.float32:
        return (1e4 + rng.standard_normal(shape)).astype(np.float32)
    return (100 + 0.1 * rng.standard_normal(shape)).astype(np.float16)


# ---------------------------------------------------------------- the oracle itself
def test_exact_oracle_small_cases():
    m, v = exact_moments(np.array([1e8 + 1, 1e8 + 2, 1e8 + 4]))
    assert m == Fraction(300000007, 3)
    assert v == Fraction(14, 9)
    assert exact_moments(np.array([0.1, 0.1])) == (Fraction(0.1), 0)


# ---------------------------------------------------------------- precision contract
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n", [1, 2, 3, 15, 16, 17, 100, cn.BLOCK - 1, cn.BLOCK, cn.BLOCK + 1,
                               2 * cn.BLOCK + 21])
def test_precision_at_offset(dtype, n, rng):
    x = offset_data(rng, dtype, (3, n))
    mean, var = cnorm.moments(x, axis=-1, backend="numba")
    check_against_exact(x, -1, dtype, mean, var)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_precision_columns_and_strided(dtype, rng):
    x = offset_data(rng, dtype, (300, 9))
    mean, var = cnorm.moments(x, axis=0, backend="numba")           # column kernel
    check_against_exact(x, 0, dtype, mean, var)
    xs = offset_data(rng, dtype, (40, 30))[::-3, ::2]                # negative, strided rows
    mean, var = cnorm.moments(xs, axis=0, backend="numba")
    check_against_exact(xs, 0, dtype, mean, var)
    mean, var = cnorm.moments(xs, axis=1, backend="numba")
    check_against_exact(xs, 1, dtype, mean, var)
    xg = offset_data(rng, dtype, (3, 500, 20))                       # short rows, grouped in blocks
    mean, var = cnorm.moments(xg, axis=(1, 2), backend="numba")
    check_against_exact(xg.reshape(3, -1), -1, dtype, mean, var)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_precision_long_slice(dtype, rng):
    """2**20 elements: many blocks and chunks, merged in a fixed order."""
    x = offset_data(rng, dtype, 1 << 20)
    mean, var = cnorm.moments(x, backend="numba", num_threads=2)
    check_against_exact(x, None, dtype, mean, var)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_constant_slices_have_zero_variance(dtype):
    for value in (0.1, 100.0, -3.0):
        for shape, axis in [((5, 3000), -1), ((3000, 5), 0), ((7, 13), -1), ((1,), None)]:
            x = np.full(shape, value, dtype=dtype)
            mean, var = cnorm.moments(x, axis=axis, backend="numba")
            assert np.all(var == 0), (value, shape)
            assert np.all(mean == dtype(value))


def test_tiny_and_huge_magnitudes(rng):
    for scale in (1e-150, 1e-30, 1e30, 1e150):
        x = scale * (1 + rng.standard_normal(500))
        mean, var = cnorm.moments(x, backend="numba")
        check_against_exact(x, None, np.float64, mean, var)
    x = (np.float32(1e-30) * (1 + rng.standard_normal(500))).astype(np.float32)
    check_against_exact(x, None, np.float32, *cnorm.moments(x, backend="numba"))


def test_float16_subnormals_and_extremes(rng):
    x = np.array([6e-8, 1.2e-7, 3e-5, -6e-8, 0.5, -0.25, 1.0], dtype=np.float16)
    check_against_exact(x, None, np.float16, *cnorm.moments(x, backend="numba"))
    x = np.array([6e-8, 1.2e-7, 6e-8, 0.0], dtype=np.float16)     # subnormal mean and var
    mean, var = cnorm.moments(x, backend="numba")
    assert ulp_error(mean, exact_moments(x)[0], np.float16) <= 1
    x = np.array([65504.0, 65504.0, 65472.0], dtype=np.float16)   # largest finite halves
    assert ulp_error(cnorm.moments(x, backend="numba")[0], exact_moments(x)[0], np.float16) <= 1


# ---------------------------------------------------------------- NaN and inf
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n", [5, 3000])
def test_nan_and_inf_stay_in_their_slice(dtype, n, rng):
    x = offset_data(rng, dtype, (5, n))
    x[1, n // 2] = np.nan
    x[2, n - 1] = np.inf
    x[3, 0] = np.inf
    x[3, n - 1] = -np.inf
    for axis, xx in [(-1, x), (0, np.ascontiguousarray(x.T))]:
        mean, var = cnorm.moments(xx, axis=axis, backend="numba")
        assert np.isnan(mean[1]) and np.isnan(var[1])
        assert mean[2] == np.inf and np.isnan(var[2])
        assert np.isnan(mean[3]) and np.isnan(var[3])
        good = [0, 4]
        check_against_exact(x[good], -1, dtype, mean[good], var[good])


# ---------------------------------------------------------------- numba vs cython
def _layouts(rng, dtype):
    base = offset_data(rng, dtype, (6, 5, 7, 9))
    yield "C", base
    yield "F", np.asfortranarray(base)
    yield "negative", base[::-1, :, ::-1, :]
    yield "sliced", offset_data(rng, dtype, (8, 11, 9, 20))[1:7, ::2, 1:8, ::-2]
    yield "transposed", np.ascontiguousarray(base.transpose(2, 0, 3, 1)).transpose(1, 3, 0, 2)
    yield "broadcast", np.broadcast_to(base[:, :1], base.shape)


AXES = [None, 0, -1, (0, 2), (0, 2, 3), (1, 3), (1, 2)]


@need_cython
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_matches_cython_on_layouts(dtype, rng):
    for name, x in _layouts(rng, dtype):
        for axis in AXES:
            got = cnorm.moments(x, axis=axis, backend="numba")
            ref = cnorm.moments(x, axis=axis, backend="cython")
            for g, r, budget in zip(got, ref, BUDGET[dtype]):
                # both are within `budget` ulp of the exact value
                assert_max_ulp(g, r, 2 * budget, f"{name} axis={axis}")
        # and the numba numbers are within the contract themselves
        for axis in (None, -1, 0):
            mean, var = cnorm.moments(x, axis=axis, backend="numba")
            check_against_exact(x, axis, dtype, mean, var)


@need_cython
def test_matches_cython_on_large_shapes(rng):
    for dtype in DTYPES:
        x = offset_data(rng, dtype, (130, 700))
        for axis in (0, 1, None):
            for g, r, budget in zip(cnorm.moments(x, axis=axis, backend="numba"),
                                    cnorm.moments(x, axis=axis, backend="cython"), BUDGET[dtype]):
                np.testing.assert_array_max_ulp(g, r, maxulp=2 * budget)


@need_cython
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_memory_views_of_the_engine_entry(dtype, rng):
    """reduce_planned reads x's own memory: a contiguous writeable array through
    a flat view, read-only and strided ones through the span view, strides that
    are not a multiple of the item size through moments_4d's copy; each is
    bitwise the Cython result."""
    base = offset_data(rng, dtype, (9, 30))
    item = np.dtype(dtype).itemsize
    raw = bytearray(9 * (30 * item + 1) + 1)
    odd = np.ndarray((9, 30), dtype=dtype, buffer=raw, offset=1, strides=(30 * item + 1, item))
    odd[...] = base
    ro = base.copy()
    ro.flags.writeable = False
    cases = {"C": base, "F": np.asfortranarray(base), "read-only": ro, "odd strides": odd,
             "strided": base[::2, 1::3], "negative": base[::-1]}
    for name, x in cases.items():
        for axis in (None, 0, 1):
            got = cnorm.moments(x, axis=axis, backend="numba")
            ref = cnorm.moments(x, axis=axis, backend="cython")
            for g, r in zip(got, ref):
                np.testing.assert_array_equal(np.atleast_1d(g).view(np.uint8),
                                              np.atleast_1d(r).view(np.uint8), f"{name} {axis}")


def test_matches_numpy_reference_states(rng):
    x = offset_data(rng, np.float64, (4, 3, 50))
    for axes in [(2,), (0, 2), (0, 1, 2), (1,)]:
        got = cnorm.moments(x, axis=axes, backend="numba")
        ref = cnorm.moments(x, axis=axes, backend="numpy")
        for g, r in zip(got, ref):
            np.testing.assert_array_max_ulp(g, r, maxulp=4)


# ---------------------------------------------------------------- threads
def _states(x, red_axes, nthreads):
    from cnorm import _engine
    return _engine.reduce_states(x, red_axes, backend="numba", nthreads=nthreads)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_threads_give_identical_bits(dtype, rng):
    n_rows = cn.BLOCK * (cn.CHUNK_BLOCKS + 3)          # two chunks per slice
    rows = offset_data(rng, dtype, (2, n_rows))
    brows = cn.BLOCK * 8 // cn.TILE                     # column kernel: two tiles, two chunks
    cols = offset_data(rng, dtype, (brows * (cn.CHUNK_BLOCKS + 2), cn.TILE + 2))
    for x, axes in [(rows, (1,)), (rows, (0, 1)), (cols, (0,)), (cols, (1,))]:
        one = _states(x, axes, 1)
        two = _states(x, axes, 2)
        np.testing.assert_array_equal(one.view(np.int64), two.view(np.int64))


def test_thread_count_is_restored(rng):
    x = rng.standard_normal((4, cn.SERIAL_WORK))          # large enough to start threads
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        cnorm.moments(x, axis=-1, backend="numba", num_threads=2)
        assert numba.get_num_threads() == 1
        cnorm.moments(x, axis=-1, backend="numba", num_threads=10_000)  # capped, not an error
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)


def test_concurrent_calls_from_python_threads(rng):
    """Several Python threads at once: no crash of Numba's thread pool, same numbers."""
    from concurrent.futures import ThreadPoolExecutor
    x = rng.standard_normal((8, cn.SERIAL_WORK // 2)).astype(np.float32)
    ref = [cnorm.moments(x, axis=a, backend="numba", num_threads=1) for a in (0, 1)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: cnorm.moments(x, axis=i % 2, backend="numba", num_threads=2),
                            range(16)))
    for i, (mean, var) in enumerate(got):
        np.testing.assert_array_equal(mean, ref[i % 2][0])
        np.testing.assert_array_equal(var, ref[i % 2][1])


# ---------------------------------------------------------------- moments_4d contract
def test_moments_4d_merges_into_existing_states(rng):
    x = rng.standard_normal((2, 3, 4, 50))
    states = np.zeros((8, 5))
    cn.moments_4d(x, False, 4, 1, states, 0, 1)
    cn.moments_4d(x, False, 4, 1, states, 0, 1)      # the same data again: n doubles
    mean = np.empty(8)
    var = np.empty(8)
    cn.finalize(states, 0.0, mean, var)
    ref = np.concatenate([x, x], axis=1).transpose(0, 2, 1, 3).reshape(8, -1)
    assert np.all(states[:, 0] == 300)
    np.testing.assert_allclose(mean, ref.mean(axis=1), rtol=1e-14)
    np.testing.assert_allclose(var, ref.var(axis=1), rtol=1e-12)


def test_moments_4d_reads_float16_bits_and_float16(rng):
    x = rng.standard_normal((1, 4, 3, 40)).astype(np.float16)
    a = np.zeros((3, 5))
    b = np.zeros((3, 5))
    cn.moments_4d(x.view(np.uint16), True, 0, 1, a, 0, 1)
    cn.moments_4d(x, True, 0, 1, b, 0, 1)
    np.testing.assert_array_equal(a, b)
    for k in range(3):
        em, ev = exact_moments(x[0, :, k, :])
        assert a[k, 0] == 160
        # float64 accumulation: far inside one float16 ulp
        assert abs(Fraction(a[k, 1] + a[k, 2]) - em) <= abs(em) * Fraction(1, 10**13)
        assert abs(Fraction(a[k, 3] / 160) - ev) <= ev * Fraction(1, 10**13)
        assert ulp_error(np.float16(a[k, 1] + a[k, 2]), em, np.float16) <= 1


def test_moments_4d_rejects_bad_arguments():
    x = np.zeros((1, 2, 3, 4), np.float32)
    with pytest.raises(TypeError, match="is_half"):
        cn.moments_4d(x.view(np.uint16)[..., :2], False, 0, 1, np.zeros((3, 5)), 0, 1)
    with pytest.raises(TypeError, match="int32"):
        cn.moments_4d(x.astype(np.int32), False, 0, 1, np.zeros((3, 5)), 0, 1)
    with pytest.raises(ValueError, match="out of range"):
        cn.moments_4d(x, False, 0, 1, np.zeros((2, 5)), 0, 1)
    with pytest.raises(ValueError, match="states"):
        cn.moments_4d(x, False, 0, 1, np.zeros((3, 4)), 0, 1)
    with pytest.raises(ValueError, match="4-d"):
        cn.moments_4d(x[0], False, 0, 1, np.zeros((3, 5)), 0, 1)


# ---------------------------------------------------------------- states: finalize, merge
def _random_states(rng, m):
    x = rng.standard_normal((m, 7)) * 10 + 3
    s = _reference.states_of(x, (1,))
    s[::5, 0] = 1.0                 # n == 1 (M2 == 0)
    s[::5, 3:] = 0.0
    s[1::7] = 0.0                   # empty
    s[2::9, 3] = np.nan             # undefined spread
    return s


@pytest.mark.parametrize("ddof", [0.0, 1.0, 1.5, 7.0, 9.0])
def test_finalize_matches_reference(ddof, rng):
    s = _random_states(rng, 40)
    got = np.empty(40), np.empty(40)
    ref = np.empty(40), np.empty(40)
    cn.finalize(s, ddof, *got)
    _reference.finalize(s, ddof, *ref)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
    assert np.isnan(got[0][1]) and np.isnan(got[1][1])  # n == 0


def test_finalize_degrees_of_freedom():
    s = np.array([[2.0, 1.0, 0.0, 3.0, 0.0],    # n - ddof <= 0 and M2 > 0: inf
                  [2.0, 1.0, 0.0, 0.0, 0.0]])   # n - ddof <= 0 and M2 == 0: nan
    mean, var = np.empty(2), np.empty(2)
    cn.finalize(s, 2.0, mean, var)
    assert var[0] == np.inf and np.isnan(var[1])
    assert np.all(mean == 1.0)


def test_merge_states_matches_reference_and_whole(rng):
    a = _random_states(rng, 30)
    b = _random_states(rng, 30)[::-1].copy()
    ref = a.copy()
    _reference.merge_states(ref, b)
    got = a.copy()
    cn.merge_states(got, b)
    np.testing.assert_allclose(got[:, :2], ref[:, :2], rtol=1e-15)
    np.testing.assert_allclose(got[:, 3], ref[:, 3], rtol=1e-14)
    # merging the states of two halves gives the state of the whole
    x = offset_data(rng, np.float64, 5000)
    h1, h2, whole = cn.moments_1d(x[:1234]), cn.moments_1d(x[1234:]), cn.moments_1d(x)
    cn.state_merge(h1, h2)
    m1, v1 = cn.state_finalize(h1, 0.0)
    m2, v2 = cn.state_finalize(whole, 0.0)
    em, ev = exact_moments(x)
    assert ulp_error(m1, em, np.float64) <= 1 and ulp_error(v1, ev, np.float64) <= 2
    assert ulp_error(m2, em, np.float64) <= 1 and ulp_error(v2, ev, np.float64) <= 2
    with pytest.raises(ValueError):
        cn.merge_states(np.zeros((3, 5)), np.zeros((2, 5)))


# ---------------------------------------------------------------- float16 conversion
def test_half_to_f64_is_exact_for_every_bit_pattern():
    @numba.njit
    def convert(bits):
        out = np.empty((2, bits.shape[0]))
        for i in range(bits.shape[0]):
            out[0, i] = cn.half_to_f64(bits[i])          # the path the kernels use
            out[1, i] = cn._half_bits_to_f64(bits[i])    # the integer route (no F16C)
        return out

    bits = np.arange(1 << 16, dtype=np.uint16)
    ref = bits.view(np.float16).astype(np.float64)
    for got in convert(bits):
        same = (got == ref) & (np.signbit(got) == np.signbit(ref))
        np.testing.assert_array_equal(same | (np.isnan(got) & np.isnan(ref)), True)
    assert cn.half_to_f64(np.uint16(0x0001)) == 2.0 ** -24   # the Python form agrees


def test_half_stores_round_like_numpy_and_agree(rng):
    """Both float16 store routes (_store_half: the F16C instruction where the CPU has it;
    the integer route) against
    NumPy's float32 -> float16 rounding: every value near each float16 (the
    neighbours and midpoints of all 63488 finite halves, nudged by one float32 ulp
    either way), overflow, subnormals, ±0, ±inf, quiet NaN, and random bits."""
    from cnorm import _numba_apply as na
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    h = halves[np.isfinite(halves)].astype(np.float32)
    mids = ((h[:-1].astype(np.float64) + h[1:]) / 2).astype(np.float32)
    near = np.concatenate([h, mids, np.nextafter(mids, np.float32(np.inf)),
                           np.nextafter(mids, np.float32(-np.inf)), np.nextafter(h, np.float32(0))])
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 65519.99, 65520.0, 1e30,
                        -1e30, 2.0 ** -25, 2.0 ** -26, 3 * 2.0 ** -26, 1e-45], np.float32)
    rand = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    f = np.concatenate([near, special, rand[~np.isnan(rand)]])
    with np.errstate(over="ignore"):
        ref = f.astype(np.float16).view(np.uint16)
    @numba.njit
    def integer_route(y, f):
        u = f.view(np.uint32)
        for i in range(f.shape[0]):
            y[i] = na._f32_bits_to_half(u[i], f[i])

    for store in (na._store_half, integer_route):
        got = np.empty(f.shape, np.uint16)
        store(got, f)
        np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------- embedding in user @njit code
def test_callable_from_user_njit_code(rng):
    @numba.njit
    def user_code(x, split):
        # a z-score with cnorm's statistics, in the user's own compiled code
        s = cn.moments_1d(x)
        mean, var = cn.state_finalize(s, 0.0)
        z = (x[-1] - mean) / np.sqrt(var)
        # mergeable states: the two halves give the statistics of the whole
        a = cn.moments_1d(x[:split])
        cn.state_merge(a, cn.moments_1d(x[split:]))
        # any stride (a non-contiguous view)
        strided = cn.state_finalize(cn.moments_1d(x[::3]), 0.0)
        return z, s[0], cn.state_finalize(a, 1.0), strided

    x = offset_data(rng, np.float64, 3000)
    z, n, (mean, var), (smean, _) = user_code(x, 1000)
    em, ev = exact_moments(x)
    assert n == 3000
    # x[-1] - mean cancels 8 digits at offset 1e8: compare loosely
    assert abs(z - float((Fraction(x[-1]) - em) / Fraction(np.sqrt(float(ev))))) < 3e-8
    assert ulp_error(mean, em, np.float64) <= 1
    assert ulp_error(var, ev * 3000 / 2999, np.float64) <= 2
    assert ulp_error(smean, exact_moments(x[::3])[0], np.float64) <= 1
    # float16 data travels as its bits
    h = offset_data(rng, np.float16, 700)
    state = cn.moments_1d(h.view(np.uint16))
    assert ulp_error(np.float16(state[1] + state[2]), exact_moments(h)[0], np.float16) <= 1


def test_moments_1d_agrees_with_moments_4d(rng):
    x = offset_data(rng, np.float64, 200_000)
    states = np.zeros((1, 5))
    cn.moments_4d(x.reshape(1, 1, 1, -1), False, 0, 0, states, 0, 2)
    np.testing.assert_array_equal(cn.moments_1d(x), states[0])
    assert np.all(cn.moments_1d(np.zeros(0)) == 0)


# ---------------------------------------------------------------- the fastmath policy
def _keyword_uses(path, name):
    """Lines where ``name=`` is passed as a keyword (strings and comments ignored)."""
    toks = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
            if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE)]
    return [a.start[0] for a, b in zip(toks, toks[1:])
            if a.type == tokenize.NAME and a.string == name and b.string == "="]


def test_one_fastmath_policy():
    """stumpy's rule: one policy, nobody hard-codes ``fastmath=`` (SPEC/STYLE)."""
    flags = set() if _numba_policy.FASTMATH is False else set(_numba_policy.FASTMATH)
    assert not flags & _numba_policy.FORBIDDEN_FASTMATH
    package = Path(cn.__file__).parent
    for path in sorted(package.glob("*.py")):
        assert _keyword_uses(path, "fastmath") == [], f"{path.name} hard-codes fastmath="
    kernels = [v for v in vars(cn).values() if isinstance(v, numba.core.registry.CPUDispatcher)]
    assert len(kernels) > 20
    for k in kernels:
        assert k.targetoptions["fastmath"] is _numba_policy.FASTMATH, k
        assert k.targetoptions["error_model"] == "numpy", k
        assert type(k._cache).__name__ == "FunctionCache", k



def _dispatchers():
    """(name, dispatcher) of every kernel the numba backend defines."""
    from cnorm import _numba_apply, _numba_backward, _numba_rows
    for mod in (cn, _numba_rows, _numba_apply, _numba_backward):
        for name, v in vars(mod).items():
            if isinstance(v, numba.core.registry.CPUDispatcher) and v.__module__ == mod.__name__:
                yield f"{mod.__name__}.{name}", v


def _compiled():
    return {name: list(d.signatures) for name, d in _dispatchers()}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_read_only_inputs_reuse_the_compiled_kernels(dtype, rng):
    """Numba compiles a kernel per tuple of argument types, and an array's type
    includes its writeable flag: the entry points pass every input (statistics,
    parameters) read-only, so calls with the caller's read-only arrays run the
    kernels that calls with writeable ones compiled -- no second compilation.
    Constants reach the kernels as int64 values, never as literal types (each
    literal would compile one more copy of a kernel)."""
    x = (rng.standard_normal((4, 6, 5, 8)) + 3).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w6, b6 = rng.standard_normal(6), rng.standard_normal(6)
    w8, b8 = rng.standard_normal(8), rng.standard_normal(8)

    def run(inputs):
        kw = dict(backend="numba")
        _, m, r = cnorm.layer_norm(x, -1, inputs(w8), inputs(b8), return_stats=True, **kw)
        cnorm.layer_norm_backward(dy, x, inputs(m), inputs(r), inputs(w8), inputs(b8), **kw)
        cnorm.layer_norm_backward(dy, x, inputs(m), inputs(r), inputs(w8), inputs(b8),
                                  activation="relu", **kw)
        _, m, r = cnorm.batch_norm(x, inputs(w6), inputs(b6), return_stats=True, **kw)
        cnorm.batch_norm(x, inputs(w6), inputs(b6), training=False,
                         running_mean=inputs(m.reshape(-1)), running_var=inputs(r.reshape(-1)),
                         **kw)
        cnorm.batch_norm_backward(dy, x, inputs(m), inputs(r), inputs(w6), inputs(b6), **kw)
        _, m, r = cnorm.group_norm(x, 3, inputs(w6), inputs(b6), return_stats=True, **kw)
        cnorm.group_norm_backward(dy, x, inputs(m), inputs(r), 3, inputs(w6), inputs(b6), **kw)
        cnorm.moments(inputs(x), axis=(0, 2), **kw)
        flat = x.reshape(-1)   # users' own calls keep their types: always writeable here
        cn.moments_1d(flat.view(np.uint16) if dtype == np.float16 else flat)

    def frozen(a):
        a = np.array(a)
        a.flags.writeable = False
        return a

    run(np.array)
    before = _compiled()
    run(frozen)
    grown = {k: v[len(before.get(k, [])):] for k, v in _compiled().items()
             if len(v) != len(before.get(k, []))}
    assert grown == {}, f"read-only inputs compiled new kernels: {grown}"
    literal = [(k, s) for k, sigs in _compiled().items() for s in sigs if "Literal" in str(s)]
    assert literal == [], f"kernels compiled for literal arguments: {literal}"


# ------------------------------------------------------------------ fused rows (_numba_rows)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", ["layer", "layer affine relu", "rms weight", "group", "instance",
                                  "strided rows", "in place", "threads"])
def test_fused_rows_match_cython_bitwise(dtype, case, rng):
    """The Numba fused rows kernel (statistics + output per row) gives bitwise the
    Cython kernel's output and statistics (float16 included: both round via float32)."""
    x = (rng.standard_normal((48, 6, 700)) * 2 + 300).astype(dtype)
    x[3, 2, 5] = np.nan
    x[4, 1] = 7
    w, b = rng.standard_normal(700), rng.standard_normal(700)

    def run(backend):
        xin = x.copy() if case == "in place" else x
        kw = dict(backend=backend)
        if case == "layer":
            return cnorm.layer_norm(xin, return_stats=True, **kw)
        if case == "layer affine relu":
            return cnorm.layer_norm(xin, -1, w, b, activation="relu", return_stats=True, **kw)
        if case == "rms weight":
            return cnorm.rms_norm(xin, -1, w, return_stats=True, **kw)
        if case == "group":
            return cnorm.group_norm(xin, 3, w[:6], b[:6], return_stats=True, **kw)
        if case == "instance":
            return cnorm.instance_norm(xin, return_stats=True, **kw)
        if case == "strided rows":
            return cnorm.layer_norm(xin[::2, ::-1], axis=(-1,), return_stats=True, **kw)
        if case == "in place":
            return (cnorm.layer_norm(xin, out=xin, **kw),)
        return cnorm.layer_norm(xin, num_threads=2, return_stats=True, **kw)

    for got, ref in zip(run("numba"), run("cython")):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_array_equal(np.atleast_1d(got).view(np.uint8),
                                      np.atleast_1d(ref).view(np.uint8))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("affine", [False, True])
def test_batch_norm_rows_apply_matches_cython(dtype, layout, affine, rng):
    """Batch norm's output pass as Numba rows (_numba_rows.scale_rows) against Cython.

    NCHW is bitwise (the statistics are too).  Channels last: the float64
    column statistics of the two backends differ in the low part of the
    double-double mean (both within the contract), so outputs agree to 1 ulp.
    """
    x = (rng.standard_normal((6, 16, 12, 12)) * 3 + 40).astype(dtype)
    ax = 1
    if layout == "NHWC":
        x, ax = np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1
    kw = {}
    if affine:
        kw = dict(weight=rng.standard_normal(16), bias=rng.standard_normal(16), activation="relu")
    got = cnorm.batch_norm(x, axis=ax, backend="numba", **kw)
    ref = cnorm.batch_norm(x, axis=ax, backend="cython", **kw)
    assert got.dtype == ref.dtype
    if layout == "NCHW" or dtype != np.float64:
        np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))
    else:
        np.testing.assert_array_max_ulp(got, ref, maxulp=1)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("sper", [True, False], ids=["channels-last", "nchw"])
@pytest.mark.parametrize("act", [0, 1])
@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_scale_rows_kernel_is_bitwise_cython(dtype, sper, act, nthreads, rng):
    """The Numba scale_rows kernel (serial, and split into row blocks over threads)
    against the Cython one on the same statistics: bitwise."""
    from cnorm import _config, _numba_rows
    R, L, C = (4099, 48, 48) if sper else (1030, 200, 10)
    x = (rng.standard_normal((R, L)) * 3 + 20).astype(dtype)
    n = L if sper else C
    mh, ml = rng.standard_normal(n) + 20, rng.standard_normal(n) * 1e-15
    rs, w, b = rng.random(n) + 0.5, rng.standard_normal(n), rng.standard_normal(n)
    if sper:
        psub, pmod, pmul = 1, 1, 0
    else:
        w, b = w[:C], b[:C]
        psub, pmod, pmul = L, C, 1
    outs = []
    for mod in (_numba_rows, _config.kernels):
        y = np.full_like(x, np.nan)
        mod.scale_rows(x, y, R, L, L * x.itemsize, L * x.itemsize, mh, ml, rs, n, sper, w, b,
                       psub, pmod, pmul, act, nthreads)
        outs.append(y)
    np.testing.assert_array_equal(outs[0].view(np.uint8), outs[1].view(np.uint8))

# ------------------------------------------------------------------ backward (_numba_backward)
def _backward_call(case, x, dy, rng, act=None):
    """(function of backend) for a backward case on x / dy (statistics from the Cython forward)."""
    if case in ("layer", "rms"):
        L = x.shape[-1]
        w, b = rng.standard_normal(L), rng.standard_normal(L)
        if case == "rms":
            r = cnorm.rms_norm(x, -1, w, activation=act, return_stats=True)[1]
            return lambda be, **kw: cnorm.rms_norm_backward(dy, x, r, w, activation=act, backend=be,
                                                            **kw)
        m, r = cnorm.layer_norm(x, -1, w, b, activation=act, return_stats=True)[1:]
        return lambda be, **kw: cnorm.layer_norm_backward(dy, x, m, r, w, b, activation=act,
                                                          backend=be, **kw)
    axis = -1 if case.endswith("nhwc") else 1
    C = x.shape[axis]
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    if case.startswith("group"):
        m, r = cnorm.group_norm(x, 2, w, b, axis=axis, activation=act, return_stats=True)[1:]
        return lambda be, **kw: cnorm.group_norm_backward(dy, x, m, r, 2, w, b, axis=axis,
                                                          activation=act, backend=be, **kw)
    layer = "instance_norm" if case.startswith("instance") else "batch_norm"
    m, r = getattr(cnorm, layer)(x, w, b, axis=axis, activation=act, return_stats=True)[1:]
    bwd = getattr(cnorm, layer + "_backward")
    return lambda be, **kw: bwd(dy, x, m, r, w, b, axis=axis, activation=act, backend=be, **kw)


BACKWARD_SHAPES = {"layer": (37, 203), "rms": (37, 203), "batch": (5, 6, 9, 11),
                   "group": (5, 8, 9, 11), "instance": (5, 6, 9, 11), "batch nhwc": (5, 9, 11, 6),
                   "instance nhwc": (5, 9, 11, 6), "group nhwc": (3, 4, 5, 8),
                   "batch wide nhwc": (4, 3, 5, 300),   # more channels than a column tile
                   "batch cells": (2, 3, 256, 300)}   # few, long channels: the inner-reduce cells


def _bits(a):
    return np.ascontiguousarray(np.atleast_1d(a)).view(np.uint8)


@need_cython
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(BACKWARD_SHAPES))
def test_backward_contiguous_matches_cython_bitwise(dtype, case, rng):
    """Contiguous input, no activation: the Numba loops read x and dy straight from
    memory and sum in the Cython kernels' 16 lanes, so dx, dweight and dbias are bitwise
    Cython's (offset data: the centred sums matter); float16 included, decoded exactly
    and rounded through float32 by both."""
    x = (rng.standard_normal(BACKWARD_SHAPES[case]) * 3 + 50).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    call = _backward_call(case, x, dy, rng)
    for got, ref in zip(call("numba"), call("cython")):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_array_equal(_bits(got), _bits(ref))


def _layouts_of(x0, dy0):
    """(name, x, dy) with the values of x0 / dy0: C order, then layouts whose inner axis is
    strided (the gathered path) with the elements of each slice in the same order."""
    yield "C", x0, dy0
    yield "F", np.asfortranarray(x0), np.asfortranarray(dy0)
    wide = x0.shape[:-1] + (2 * x0.shape[-1],)
    big_x, big_dy = np.zeros(wide, x0.dtype), np.zeros(wide, dy0.dtype)
    big_x[..., ::2], big_dy[..., ::2] = x0, dy0
    yield "every other", big_x[..., ::2], big_dy[..., ::2]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", ["layer", "rms", "batch nhwc", "group nhwc", "batch wide nhwc"])
def test_backward_strided_is_bitwise_the_contiguous_path(dtype, case, rng):
    """A strided inner axis takes the gathered fallback (CHUNK buffers): the same lanes in
    the same order as the direct path, so the same bits (rows: F order and every other
    element; channels-last cells: every other channel)."""
    x0 = (rng.standard_normal(BACKWARD_SHAPES[case]) * 3 + 50).astype(dtype)
    dy0 = rng.standard_normal(x0.shape).astype(dtype)
    ref = None
    for name, x, dy in _layouts_of(x0, dy0):
        if name == "F" and case.endswith("nhwc"):
            continue   # channels first in memory: another plan, another order
        got = _backward_call(case, x, dy, np.random.default_rng(1))("numba")
        if ref is None:
            ref = got
            continue
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(_bits(g), _bits(r), err_msg=name)


@need_cython
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("act", [None, "relu", "gelu", "silu"], ids=str)
@pytest.mark.parametrize("case", ["layer", "rms", "batch", "instance", "batch nhwc", "group nhwc",
                                  "batch wide nhwc", "batch cells"])
def test_backward_matches_cython(dtype, act, case, rng):
    """Every path (float16; activations through the gathered buffers; strided layouts)
    against Cython: dx within 1 ulp of the dtype (float16/float32: one rounding of
    float64 values that agree to the last bits), float64 to 1e-13 of the slice scale."""
    shape = BACKWARD_SHAPES[case] if case != "batch cells" else (2, 3, 64, 600)
    x0 = (rng.standard_normal(shape) * 3 + 20).astype(dtype)
    dy0 = rng.standard_normal(x0.shape).astype(dtype)
    for name, x, dy in _layouts_of(x0, dy0):
        call = _backward_call(case, x, dy, np.random.default_rng(2), act)
        for k, (got, ref) in enumerate(zip(call("numba"), call("cython"))):
            assert got.dtype == ref.dtype and got.shape == ref.shape
            g64, r64 = got.astype(np.float64), ref.astype(np.float64)
            if k == 0 and dtype != np.float64:
                np.testing.assert_array_max_ulp(got, ref, maxulp=1)
            else:
                scale = np.max(np.abs(r64))
                assert np.max(np.abs(g64 - r64)) <= 1e-13 * scale, (name, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", ["layer", "rms"])
def test_backward_small_call_is_bitwise_the_general_path(dtype, case, rng):
    """backend="numba" small calls skip the planning (the small backward entry) and give
    the bits of the general path (taken with out=)."""
    x = (rng.standard_normal((33, 130)) * 3 + 50).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    call = _backward_call(case, x, dy, rng)
    small = call("numba", num_threads=1)
    general = call("numba", out=np.empty_like(x))
    for s, g in zip(small, general):
        np.testing.assert_array_equal(_bits(s), _bits(g))


def test_backward_threads_give_identical_bits(rng):
    """A shape-only work partition: 1 and 2 threads give the same bits (rows, cells, dx)."""
    for case, shape in (("layer", (300, 700)), ("batch nhwc", (40, 30, 20, 16)),
                        ("batch cells", (2, 3, 256, 300))):
        x = (rng.standard_normal(shape) + 4).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        call = _backward_call(case, x, dy, np.random.default_rng(3), "gelu")
        for a, b in zip(call("numba", num_threads=1), call("numba", num_threads=2)):
            np.testing.assert_array_equal(_bits(a), _bits(b))


def test_store_half_hardware_route_matches_integer_route():
    """_store_half (LLVM fptrunc where the CPU has F16C) against the integer route on a
    sample of every float32 bit pattern: the same bits; NaN stays a NaN."""
    from cnorm import _numba_apply as na

    @numba.njit
    def integer_route(y, f):
        u = f.view(np.uint32)
        for i in range(f.shape[0]):
            y[i] = na._f32_bits_to_half(u[i], f[i])

    f = np.arange(0, 2 ** 32, 997, dtype=np.uint64).astype(np.uint32).view(np.float32)
    got, ref = np.empty(f.size, np.uint16), np.empty(f.size, np.uint16)
    na._store_half(got, f)
    integer_route(ref, f)
    nan = np.isnan(f)
    np.testing.assert_array_equal(got[~nan], ref[~nan])
    assert np.all(np.isnan(got[nan].view(np.float16)))

"""The LLVM vector lane loop of the Numba backend (cnorm._numba_simd) against
its scalar definition (_lane_sums_loop): the same lanes, bit for bit, on
adversarial rows, for every dtype, the prefetching and plain loop, unit-stride
views and strided rows (which take the scalar loop)."""
import numpy as np
import pytest

from conftest import require

require("numba")

import numba  # noqa: E402

from cnorm import _numba as cn  # noqa: E402
from cnorm import _numba_simd  # noqa: E402


@numba.njit
def _vector(seg, nv, c, lanes, pf):
    cn._lane_sums(seg, nv, c, lanes, pf)


def _rows(dtype, rng):
    """(name, row) pairs: offsets at the limit of the dtype, tiny and huge
    scales, constants, cancellation, inf and NaN."""
    eps = float(np.finfo(dtype).eps)
    n = 16 * 37
    base = rng.standard_normal(n)
    big = float(np.finfo(dtype).max) / 4 if dtype != np.float64 else 1e300
    rows = {
        "offset": 1.0 / eps + base,
        "tiny": base * float(np.finfo(dtype).tiny) * 8,
        "huge": base * big / 8,
        "constant": np.full(n, 3.0),
        "cancel": np.where(np.arange(n) % 2 == 0, 1.0, -1.0) * (1.0 / eps),
        "inf_nan": np.where(np.arange(n) == 40, np.inf, np.where(np.arange(n) == 77, np.nan, base)),
    }
    return [(k, v.astype(dtype)) for k, v in rows.items()]


def _bits(seg_dtype, row):
    return row.view(np.uint16) if seg_dtype == np.float16 else row


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("pf", [0, 96])
def test_vector_lanes_match_scalar_definition(dtype, pf, rng):
    for name, row in _rows(dtype, rng):
        seg = _bits(dtype, row)
        c = float(row[3])
        for nv in (0, 16, 48, 16 * 37):
            start = rng.standard_normal((4, 16))  # lanes are added to, not overwritten
            got, want = start.copy(), start.copy()
            _vector(seg, nv, c, got, pf)
            cn._lane_sums_loop(seg, nv, c, want)
            np.testing.assert_array_equal(got.view(np.uint64), want.view(np.uint64),
                                          err_msg=f"{name} nv={nv}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_views_unit_stride_and_strided(dtype, rng):
    x = (1e6 + rng.standard_normal((3, 16 * 9))).astype(dtype)
    for seg in (x[1, 5:5 + 16 * 5],      # unit stride, not aligned, 'A' typed when sliced
                np.asfortranarray(x)[0],  # strided: the scalar loop
                x[:, ::1][2]):
        nv = seg.shape[0] - seg.shape[0] % 16
        got, want = np.zeros((4, 16)), np.zeros((4, 16))
        _vector(seg, nv, float(seg[0]), got, 0)
        cn._lane_sums_loop(seg, nv, float(seg[0]), want)
        np.testing.assert_array_equal(got, want)
        assert np.any(got != 0)


def test_vector_loop_covers_the_dtypes_of_the_kernels():
    assert all(_numba_simd.supported(t) for t in (numba.float32, numba.float64, numba.uint16))
    assert not _numba_simd.supported(numba.int32)

"""Read order of the statistics kernels: the orders chosen for memory do not change results.

NCHW batch statistics (moments over (0, 2, 3)) are reduced block-major, and
within a block row by row across the channels (planes under 4096 elements)
or one sample's whole plane at a time (longer planes).  Every channel still
merges the same blocks, with the same shifts, in the same order as when its
rows are read one channel at a time, so the two must agree bit for bit.  The
slice-major reference is the same data copied to (C, N, H*W + pad): rows of
H*W elements at a stride that keeps N and H*W from merging into one run, so
it is cut into the same blocks and reduced one channel after the other.

Column blocks (channels-last statistics) span at least 1024 rows and the
column loop prefetches rows ahead; the column results are checked against
exact values over several blocks and chunks.
"""
import numpy as np
import pytest

import cnorm
from cnorm import _config
from exact import exact_moments, offset_data
from test_moments_precision import MEAN_TOL, VAR_TOL, assert_ulps


def _slice_major_reference(x):
    """moments of each channel of NCHW x, read channel by channel (see module docstring)."""
    n, c, h, w = x.shape
    padded = np.zeros((c, n, h * w + 8), x.dtype)
    padded[:, :, :h * w] = x.transpose(1, 0, 2, 3).reshape(c, n, h * w)
    view = padded[:, :, :h * w]
    assert not view.flags.c_contiguous
    return cnorm.moments(view, axis=(1, 2), backend="cython", num_threads=1)


# (N, C, H, W): planes under 4096 elements (row-interleaved, channel groups of 32
# and a partial one; 200 samples of 8 x 8: four blocks per channel), planes of 5120 and 9000 elements (two and three pieces per
# plane; 90 blocks per channel make two chunks, the second starting mid-plane)
SHAPES = [(16, 70, 8, 8), (3, 40, 15, 17), (200, 40, 8, 8), (40, 3, 64, 80), (30, 3, 90, 100)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_nchw_read_order_is_bitwise_slice_major(isa, dtype, shape, threads):
    rng = np.random.default_rng([7, *shape, threads])
    x = offset_data(dtype, 0, 300.0, rng=rng, shape=shape)
    ref_m, ref_v = _slice_major_reference(x)
    m, v = cnorm.moments(x, axis=(0, 2, 3), backend="cython", num_threads=threads)
    np.testing.assert_array_equal(m.view(np.uint8), ref_m.view(np.uint8))
    np.testing.assert_array_equal(v.view(np.uint8), ref_v.view(np.uint8))


def _nchw_states(x, threads):
    """The double-double states (n, mean hi/lo, M2 hi/lo) of the channels of
    NCHW x from the kernel, as the block-major plan reads them."""
    n, c, h, w = x.shape
    sz = x.itemsize
    st = np.zeros((c, 5))
    _config.kernels.moments_4d(x, 0, (1, n, c, h * w), (0, c * h * w * sz, h * w * sz, sz),
                               0, 1, st, 0, threads)
    return st


def _slice_major_states(x):
    """The same states, channel after channel (rows at a stride of h*w + 8)."""
    n, c, h, w = x.shape
    sz = x.itemsize
    padded = np.zeros((c, n, h * w + 8), x.dtype)
    padded[:, :, :h * w] = x.transpose(1, 0, 2, 3).reshape(c, n, h * w)
    st = np.zeros((c, 5))
    _config.kernels.moments_4d(padded, 0, (c, n, 1, h * w),
                               (n * (h * w + 8) * sz, (h * w + 8) * sz, 0, sz), 1, 0, st, 0, 1)
    return st


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("threads", [1, 2])
def test_nchw_states_are_bitwise_slice_major(isa, dtype, shape, threads):
    """The unrounded states, low parts included: these change with the order
    of the merges or the shifts, where the rounded moments above rarely do."""
    rng = np.random.default_rng([11, *shape, threads])
    x = offset_data(dtype, 0, 300.0, rng=rng, shape=shape)
    got, ref = _nchw_states(x, threads), _slice_major_states(x)
    np.testing.assert_array_equal(got.view(np.uint64), ref.view(np.uint64))
    n, _, h, w = shape
    if dtype != np.float16 and n * h * w > 4096:   # several blocks; float16 sums are exact
        # the test can fail: blocks merged in another order give other low parts
        rev = _slice_major_states(x[::-1].copy())
        assert not np.array_equal(rev.view(np.uint64), ref.view(np.uint64))


@pytest.mark.parametrize("threads", [1, 2])
def test_nchw_planes_not_adjacent(isa, dtype, threads):
    """Every other channel of an NCHW array: the planes of a sample are not
    adjacent, so rows hop (prefetched one row ahead) instead of reading on."""
    rng = np.random.default_rng([8, threads])
    full = offset_data(dtype, 0, -50.0, rng=rng, shape=(12, 80, 9, 11))
    x = full[:, ::2]
    ref_m, ref_v = _slice_major_reference(np.ascontiguousarray(x))
    m, v = cnorm.moments(x, axis=(0, 2, 3), backend="cython", num_threads=threads)
    np.testing.assert_array_equal(m.view(np.uint8), ref_m.view(np.uint8))
    np.testing.assert_array_equal(v.view(np.uint8), ref_v.view(np.uint8))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("threads", [1, 2])
def test_numba_nchw_read_order_is_bitwise_slice_major(dtype, shape, threads):
    """The Numba kernel reads NCHW blocks in the same orders (row-interleaved
    channel groups, whole planes): its states, low parts included, are the
    Cython slice-major ones bit for bit."""
    from cnorm import _numba
    rng = np.random.default_rng([12, *shape, threads])
    x = offset_data(dtype, 0, 300.0, rng=rng, shape=shape)
    n, c, h, w = shape
    st = np.zeros((c, 5))
    _numba.moments_4d(x.reshape(1, n, c, h * w), dtype == np.float16, 0, 1, st, 0, threads)
    np.testing.assert_array_equal(st.view(np.uint64), _slice_major_states(x).view(np.uint64))
    ref_m, ref_v = _slice_major_reference(x)
    m, v = cnorm.moments(x, axis=(0, 2, 3), backend="numba", num_threads=threads)
    np.testing.assert_array_equal(m.view(np.uint8), ref_m.view(np.uint8))
    np.testing.assert_array_equal(v.view(np.uint8), ref_v.view(np.uint8))


@pytest.mark.parametrize("threads", [1, 2])
def test_numba_nchw_planes_not_adjacent(dtype, threads):
    rng = np.random.default_rng([13, threads])
    x = offset_data(dtype, 0, -50.0, rng=rng, shape=(12, 80, 9, 11))[:, ::2]
    ref_m, ref_v = _slice_major_reference(np.ascontiguousarray(x))
    m, v = cnorm.moments(x, axis=(0, 2, 3), backend="numba", num_threads=threads)
    np.testing.assert_array_equal(m.view(np.uint8), ref_m.view(np.uint8))
    np.testing.assert_array_equal(v.view(np.uint8), ref_v.view(np.uint8))


@pytest.mark.parametrize("backend_name", ["cython", "numba"])
@pytest.mark.parametrize("shape", [(2600, 24), (1100, 130), (3000, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_columns_over_several_blocks_exact(dtype, backend_name, shape):
    """moments over axis 0 spanning several >= 1024-row column blocks (and, for
    130 columns of float64, rows of over 512 bytes: the prefetching loop)."""
    rng = np.random.default_rng([9, *shape])
    x = offset_data(dtype, 0, 1000.0, scale=3.0, rng=rng, shape=shape)
    em, ev = exact_moments(x, 0)
    for threads in (1, 2):
        m, v = cnorm.moments(x, axis=0, backend=backend_name, num_threads=threads)
        assert_ulps(m, em, dtype, MEAN_TOL, f"mean {shape} threads={threads}")
        assert_ulps(v, ev, dtype, VAR_TOL[dtype], f"var {shape} threads={threads}")


def test_rows_at_every_page_offset(dtype):
    """Rows of 4 KiB starting at each 16-byte offset of a page (the row loops
    prefetch ahead of contiguous rows): the same results as the rows one by one."""
    rng = np.random.default_rng(10)
    item = np.dtype(dtype).itemsize
    row = 4096 // item
    base = offset_data(dtype, 0, 7.0, rng=rng, shape=(24 * row + 4096 // item,))
    for off in range(0, 4096 // item, 16 // item):
        x = base[off:off + 24 * row].reshape(24, row)
        m, v = cnorm.moments(x, axis=-1, backend="cython", num_threads=1)
        for r in (0, 11, 23):
            m1, v1 = cnorm.moments(x[r].copy(), backend="cython")
            assert m[r] == m1 and v[r] == v1, (off, r)

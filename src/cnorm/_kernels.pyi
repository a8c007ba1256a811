# Stubs for the Cython moments kernels (cnorm._kernels and its ISA siblings
# _kernels_avx2 / _kernels_avx512, which have the same interface).
# The Cython types are given in comments.
import numpy as np
import numpy.typing as npt
from typing import Sequence

SERIAL_WORK_ELEMENTS: int              # calls on fewer elements never start threads

def isa() -> str: ...
def cpu_level() -> int: ...
def moments_4d(
    x: np.ndarray,                       # float16/float32/float64 ndarray (only data pointer and dtype used)
    offset: int,                         # Py_ssize_t, bytes
    shape: Sequence[int],                # (O, R1, K, R0)
    strides: Sequence[int],              # bytes
    so: int,                             # Py_ssize_t, state stride of O
    sk: int,                             # Py_ssize_t, state stride of K
    states: npt.NDArray[np.float64],     # double[:, ::1], shape (m, 5)
    state_offset: int,                   # Py_ssize_t
    nthreads: int,                       # int
) -> None: ...
def finalize(
    states: npt.NDArray[np.float64],     # double[:, ::1]
    ddof: float,                         # double
    mean: npt.NDArray[np.float64],       # double[::1]
    var: npt.NDArray[np.float64],        # double[::1]
) -> None: ...
def merge_states(
    a: npt.NDArray[np.float64],          # double[:, ::1]
    b: npt.NDArray[np.float64],          # const double[:, ::1]
) -> None: ...
def norm_rows(
    x: np.ndarray, y: np.ndarray,        # same float dtype, rows of contiguous elements
    R: int, L: int,                      # Py_ssize_t: rows, row length
    xrs: int, yrs: int,                  # Py_ssize_t: row strides in bytes
    eps: float,                          # double
    mode: int,                           # int: 0 layer norm, 1 RMS norm
    w: npt.NDArray[np.float64],          # const double[::1]
    b: npt.NDArray[np.float64],          # const double[::1]
    psub: int, pmod: int, pmul: int,     # Py_ssize_t: parameter indexing (see docstring)
    act: int,                            # int: activation code
    mean: npt.NDArray[np.float64],       # double[::1], out
    var: npt.NDArray[np.float64],        # double[::1], out
    nthreads: int,
) -> None: ...
def scale_rows(
    x: np.ndarray, y: np.ndarray,        # same float dtype, rows of contiguous elements
    R: int, L: int,                      # Py_ssize_t: rows, row length
    xrs: int, yrs: int,                  # Py_ssize_t: row strides in bytes
    mh: npt.NDArray[np.float64],         # const double[::1]: mean (high part)
    ml: npt.NDArray[np.float64],         # const double[::1]: mean (low part)
    rs: npt.NDArray[np.float64],         # const double[::1]: 1/sqrt(var + eps)
    smod: int,                           # Py_ssize_t: row r uses statistic r % smod
    sper: bool,                          # bint: statistics per element of a row (channels last)
    w: npt.NDArray[np.float64],          # const double[::1]
    b: npt.NDArray[np.float64],          # const double[::1]
    psub: int, pmod: int, pmul: int,     # Py_ssize_t: parameter indexing (as norm_rows)
    act: int,                            # int: activation code
    nthreads: int,
) -> None: ...
def norm_stats(
    states: npt.NDArray[np.float64],     # const double[:, ::1]
    mh: npt.NDArray[np.float64],         # double[::1], out
    ml: npt.NDArray[np.float64],         # double[::1], out
    var: npt.NDArray[np.float64],        # double[::1], out
) -> None: ...
def norm_rows_contig(
    x: object,                           # any object; only C-contiguous float arrays are taken
    out: object,                         # None or an ndarray like x (may be x)
    eps: float,                          # double
    mode: int,                           # int: 0 layer/group norm, 1 RMS norm
    weight: object, bias: object,        # None or float16/32/64 (L,) / (C,) arrays
    groups: int,                         # Py_ssize_t: 0 last axis; > 0 groups of axis 1 (N, C, ...)
    want_stats: bool,                    # bint: also return the float64 (R,) row mean and rstd
    nthreads: int,                       # int: the resolved thread count
) -> np.ndarray | tuple[np.ndarray, npt.NDArray[np.float64], npt.NDArray[np.float64]] | None: ...
# the output (with want_stats: (y, mean, rstd)), or None: not eligible (use the general path)
def batch_norm_contig(
    x: object,                           # any object; only C-contiguous float arrays are taken
    out: object,                         # None or an ndarray like x (may be x)
    channels_last: bool,                 # bint: channel axis last (else axis 1)
    eps: float,                          # double
    weight: object, bias: object,        # None or float16/32/64 (C,) arrays
    nthreads: int,                       # int: the resolved thread count
) -> tuple[np.ndarray, npt.NDArray[np.float64]] | None: ...  # (y, (5, C) mean hi/lo, var, rstd, mean)
def moments_contig(
    x: object,                           # any object; only C-contiguous float arrays are taken
    axis: object,                        # None, int or tuple of ints (as numpy's)
    ddof: float,                         # double
    float64_out: bool,                   # bint: float64 results even for float32 input
    nthreads: int,                       # int: the resolved thread count (results do not depend on it)
) -> tuple[np.ndarray, np.ndarray] | None: ...  # None: not eligible (use the general path)
def prefault_output(y: np.ndarray, nthreads: int) -> None: ...   # fault in a new output's pages
# (one thread, before nthreads > 1 threads write it; outputs of 32 MiB and more)
def set_stream_threshold(nbytes: int) -> int: ...   # outputs >= nbytes use streaming stores
def set_row_groups(on: bool) -> bool: ...   # short float64 rows: grouped statistics (the same bits)
def set_f32_vector_bits(bits: int) -> int: ...   # float32 loops in 256/512-bit vectors (AVX-512)
def f32_vector_bits() -> int: ...

"""Type stubs of the gradient kernels (``_backward.pyx``, one copy per ISA level).

Arguments carry their Cython type as a comment.  Offsets and strides of x, dy
and dx are in bytes; those of the float64 statistics and parameters in
elements.  All float64 arrays are 1-d and C-contiguous.
"""
from typing import Sequence

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

def isa() -> str: ...
def set_block_rows4(on: bool) -> bool: ...   # bint: the four-row blocked pass on/off (tests)
def dact_values(v: F64, act: int) -> F64: ...   # const double[::1], int: act'(v) (tests)
def rows_backward(
    x: np.ndarray,              # cnp.ndarray: float16/float32/float64
    xoff: int,                  # Py_ssize_t
    dy: np.ndarray,             # cnp.ndarray, x's dtype
    dyoff: int,                 # Py_ssize_t
    dx: np.ndarray,             # cnp.ndarray, x's dtype, written
    dxoff: int,                 # Py_ssize_t
    shape: Sequence[int],       # (B0, B1, K0, K1): rows (b0, b1), one slice of K0*K1 each
    xstrides: Sequence[int],    # 4 byte strides
    dystrides: Sequence[int],
    dxstrides: Sequence[int],
    mean: F64,                  # const double[::1], per row
    rstd: F64,                  # const double[::1], per row
    soff: int,                  # Py_ssize_t
    sstrides: Sequence[int],    # 2 element strides (b0, b1)
    w: F64,                     # const double[::1]
    b: F64,                     # const double[::1], same layout as w
    poff: int,                  # Py_ssize_t: element offset of the parameters of element 0
    pstrides: Sequence[int],    # 4 element strides; the last is 1, or 0 (one per segment)
    pacc: npt.NDArray[np.float64] | None,  # double[:, :, ::1] (T, 2, >= len(w)), zeroed; += per task
    mode: int,                  # int: 0 eval, 1 RMS norm, 2 centred
    refine: bool,               # bint: add mean(x - mean) to the mean (float64 data)
    act: int,                   # int: activation code
    nthreads: int,              # int
) -> int: ...
def rows_backward_contig(
    x: object,                  # object: eligible when a C-contiguous float ndarray
    dy: object,                 # object: x's dtype and shape
    mean: object,               # object: float64 of x.shape[:-1] (+ (1,)); None for RMS
    rstd: object,               # object: float64 of x.shape[:-1] (+ (1,))
    weight: object,             # object: None or a float vector of x.shape[-1]
    bias: object,               # object: None or a float vector of x.shape[-1]
    out: object,                # object: None, x, dy, or a new array like x
    mode: int,                  # int: 1 RMS norm, 2 layer norm (centred)
    nthreads: int,              # int
) -> tuple[np.ndarray, F64 | None, F64 | None] | None: ...   # None: not eligible
def channel_backward_contig(
    x: object,                  # object: eligible when a C-contiguous float ndarray (N, C, ...)
    dy: object,                 # object: x's dtype and shape
    mean: object,               # object: float64, (C,) / (1, C, 1..) batch, (N, C) instance, (N, G) group
    rstd: object,               # object: as mean
    weight: object,             # object: None or a float vector of C
    bias: object,               # object: None or a float vector of C
    out: object,                # object: None, x, dy, or a new array like x
    kind: int,                  # int: 0 batch, 1 instance, 2 group norm
    groups: int,                # Py_ssize_t: G (group norm), else ignored
    training: bool,             # bint: batch norm in training mode (else eval)
    nthreads: int,              # int
) -> tuple[np.ndarray, F64 | None, F64 | None] | None: ...   # None: not eligible
def cells_reduce(
    x: np.ndarray,              # cnp.ndarray
    xoff: int,                  # Py_ssize_t
    dy: np.ndarray,             # cnp.ndarray
    dyoff: int,                 # Py_ssize_t
    shape: Sequence[int],       # (O, R1, K, R0)
    xstrides: Sequence[int],
    dystrides: Sequence[int],
    so: int,                    # Py_ssize_t: cell stride of o
    sk: int,                    # Py_ssize_t: cell stride of k
    coff: int,                  # Py_ssize_t: cell offset
    mh: F64,                    # const double[::1], per cell
    ml: F64,                    # const double[::1], per cell
    rstd: F64,                  # const double[::1], per cell
    w: F64,                     # const double[::1], per cell
    b: F64,                     # const double[::1], per cell
    out: npt.NDArray[np.float64],  # double[:, :, ::1] (nchunks, ncells, 3), += sums
    act: int,                   # int
    want_dy: bool,              # bint: False = only Σ((x - mh) - ml)
    nthreads: int,              # int
) -> None: ...
def dx_4d(
    x: np.ndarray, xoff: int, dy: np.ndarray, dyoff: int, dx: np.ndarray, dxoff: int,
    mh: F64, ml: F64, rstd: F64, a: F64, bb: F64,   # const double[::1], one layout
    soff: int,                  # Py_ssize_t
    w: F64, b: F64,             # const double[::1]
    poff: int,                  # Py_ssize_t
    shape: Sequence[int], xstrides: Sequence[int], dystrides: Sequence[int],
    dxstrides: Sequence[int],
    sstrides: Sequence[int],    # element strides, inner 0 or 1
    pstrides: Sequence[int],    # element strides, inner 0 or 1
    act: int, nthreads: int,
) -> None: ...
def batch_cells_backward(
    x: np.ndarray,              # cnp.ndarray: C-contiguous (N, C, ...) float16/32/64
    dy: np.ndarray,             # cnp.ndarray: like x
    dx: np.ndarray,             # cnp.ndarray: like x, written
    mean: F64,                  # const double[::1] (C,)
    rstd: F64,                  # const double[::1] (C,)
    w: F64 | None,              # None or float64 C-contiguous (C,)
    b: F64 | None,              # None or float64 C-contiguous (C,)
    training: bool,             # bint: batch statistics (else running: dx = w*gv*rstd)
    refine: bool,               # bint: add mean(x - mean) to the mean (float64 data)
    nthreads: int,              # int
) -> tuple[F64, F64]: ...       # per channel (Σ gv*xhat, Σ gv); bitwise the per-cell path

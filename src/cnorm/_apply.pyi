# Stubs for the Cython normalization pass (cnorm._apply and its ISA siblings).
# The Cython types are given in comments.
import numpy as np
import numpy.typing as npt
from typing import Sequence

def isa() -> str: ...
def apply_4d(
    x: np.ndarray, xoff: int,            # ndarray, Py_ssize_t byte offset
    y: np.ndarray, yoff: int,            # ndarray (same dtype), Py_ssize_t byte offset
    mh: npt.NDArray[np.float64],         # const double[::1]  mean (high part)
    ml: npt.NDArray[np.float64],         # const double[::1]  mean (low part)
    rs: npt.NDArray[np.float64],         # const double[::1]  1/sqrt(var + eps)
    soff: int,                           # Py_ssize_t, element offset into the stats
    w: npt.NDArray[np.float64],          # const double[::1]
    b: npt.NDArray[np.float64],          # const double[::1]
    poff: int,                           # Py_ssize_t, element offset into the params
    shape: Sequence[int],                # 4 dims
    xstrides: Sequence[int],             # bytes
    ystrides: Sequence[int],             # bytes
    sstrides: Sequence[int],             # elements; the last is 0 or 1
    pstrides: Sequence[int],             # elements; the last is 0 or 1
    act: int,                            # int activation code
    nthreads: int,                       # int
) -> None: ...

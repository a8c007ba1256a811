"""The one JIT policy for every Numba kernel in cnorm.

Every ``@njit`` in cnorm is written ``@jit`` or ``@jit(parallel=True)`` with
the decorator below (or takes ``**JIT_OPTIONS``); nobody passes ``fastmath=``
by hand (``tests/test_numba_backend.py`` scans the package for it).

Fastmath
--------
``FASTMATH`` is ``False``: no LLVM fast-math flag is safe for these kernels.

* ``reassoc`` lets LLVM re-associate sums: it deletes the error terms of
  TwoSum (``(a - (s - bb)) + (b - bb)`` folds to 0) and makes results depend
  on vector width;
* ``contract`` fuses ``a*b + c`` into an FMA on its own, which breaks the
  exact-product error terms and the float16/float32 centred sums;
* ``nnan`` / ``ninf`` let LLVM assume there are no NaN or inf, which breaks
  the NaN/inf propagation the precision contract promises;
* ``arcp`` turns ``a / b`` into ``a * (1/b)`` (one more rounding in every
  mean and in ``M2 / (n - ddof)``); ``afn`` and ``nsz`` buy nothing here.

The explicit fused multiply-add that the double-double arithmetic needs is
the ``llvm.fma`` intrinsic (exact on every CPU: LLVM calls libm's ``fma`` where
the hardware has none), so it needs no fast-math flag either.

Caching
-------
``cache=True``: compiled kernels are stored beside the source
(``__pycache__``) and reused by later processes.
"""
from __future__ import annotations

from numba import njit

__all__ = ["FASTMATH", "FORBIDDEN_FASTMATH", "JIT_OPTIONS", "OVERLOAD_OPTIONS", "jit", "read_only"]

#: The fast-math setting of every cnorm kernel (see the module docstring).
FASTMATH = False

#: Flags that must never appear in ``FASTMATH``.
FORBIDDEN_FASTMATH = frozenset({"fast", "reassoc", "nnan", "ninf", "contract", "arcp"})

#: Options shared by every ``@jit`` kernel.  ``error_model="numpy"``: a
#: division by zero gives inf/NaN like NumPy instead of raising.
JIT_OPTIONS = {"fastmath": FASTMATH, "cache": True, "nogil": True, "error_model": "numpy"}

#: ``jit_options`` of every ``@overload`` implementation (compiled into the
#: calling kernels, which are the ones cached).
OVERLOAD_OPTIONS = {"fastmath": FASTMATH, "error_model": "numpy"}


def _check_policy() -> None:
    flags = set(FASTMATH) if isinstance(FASTMATH, (set, frozenset, list, tuple)) else (
        {"fast"} if FASTMATH else set())
    bad = flags & FORBIDDEN_FASTMATH
    if bad:
        raise RuntimeError(f"cnorm: FASTMATH={FASTMATH!r} contains forbidden flags {sorted(bad)}")


_check_policy()


def jit(func=None, *, parallel: bool = False, inline: str = "never"):
    """``numba.njit`` with cnorm's policy (``JIT_OPTIONS``).

    Use as ``@jit``, ``@jit(parallel=True)`` or ``@jit(inline="always")``;
    fast-math and caching are not negotiable.
    """
    options = dict(JIT_OPTIONS)
    if parallel:
        options["parallel"] = True
    if inline != "never":
        options["inline"] = inline
    decorator = njit(**options)
    return decorator if func is None else decorator(func)


def read_only(a):
    """``a``, or a view of it, that is not writeable.

    Numba compiles a kernel once per tuple of argument types, and an array's
    type includes whether it is writeable: the entry points pass every input
    array through this, so one compiled kernel serves callers' writeable and
    read-only arrays alike (and the suite compiles each kernel once per dtype,
    not once per combination of flags).
    """
    if not a.flags.writeable:
        return a
    v = a.view()
    v.flags.writeable = False
    return v

"""Run-time configuration: threads, the ISA path of the Cython kernels, backends.

Threads
-------
The default thread count is the number of CPUs this process may run on (its
affinity mask), capped by ``OMP_NUM_THREADS`` when set; ``CNORM_NUM_THREADS``
overrides both and ``set_num_threads`` overrides everything.  Results never
depend on the thread count.

To avoid oversubscription, a call made while another cnorm call is already
running in another Python thread uses one thread: the caller has already
parallelised the work.

ISA
---
The Cython kernels exist as three compiled copies (baseline, avx2, avx512);
the best one the CPU supports is chosen at import.  ``CNORM_ISA`` forces one
(``baseline``, ``avx2`` or ``avx512``); asking for one the CPU cannot run is
an error rather than a crash.
"""
from __future__ import annotations

import importlib
import os
import threading

import numpy as np

__all__ = ["set_num_threads", "get_num_threads", "show_config"]

_ISA_MODULES = {"baseline": "cnorm._kernels", "avx2": "cnorm._kernels_avx2",
                "avx512": "cnorm._kernels_avx512"}
_ISA_LEVEL = {"baseline": 0, "avx2": 1, "avx512": 2}
_BACKENDS = ("auto", "cython", "numba", "numpy")

_num_threads: int | None = None
_active_calls = 0
_active_lock = threading.Lock()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        n = int(value.split(",")[0])
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not a positive integer") from None
    if n <= 0:
        raise ValueError(f"environment variable {name}={value!r} is not a positive integer")
    return n


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _default_threads() -> int:
    explicit = _env_int("CNORM_NUM_THREADS")
    if explicit is not None:
        return explicit
    n = _usable_cpus()
    omp = _env_int("OMP_NUM_THREADS")
    return min(n, omp) if omp is not None else n


def check_num_threads(n, name: str = "num_threads") -> int:
    """Validate a thread count (a positive int)."""
    if isinstance(n, bool) or not isinstance(n, (int,)) and not hasattr(n, "__index__"):
        raise TypeError(f"{name} must be a positive integer or None, got {n!r}")
    n = int(n.__index__()) if not isinstance(n, int) else n
    if n <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {n!r}")
    return n


def set_num_threads(n: int) -> None:
    """Set the default number of threads used by cnorm's kernels.

    Parameters
    ----------
    n : int
        A positive thread count.  Results do not depend on it.
    """
    global _num_threads
    _num_threads = check_num_threads(n, "n")


_default_cache: int | None = None


def get_num_threads() -> int:
    """Return the default number of threads used by cnorm's kernels.

    Without :func:`set_num_threads`, the environment (``CNORM_NUM_THREADS``,
    ``OMP_NUM_THREADS``, the affinity mask) is read once, at the first call.
    """
    global _default_cache
    if _num_threads is not None:
        return _num_threads
    if _default_cache is None:
        _default_cache = _default_threads()
    return _default_cache


def resolve_threads(num_threads) -> int:
    """Threads for one call: the argument, else the library default."""
    if num_threads is None:
        return get_num_threads()
    return check_num_threads(num_threads)


class _CallSlot:
    """Context manager counting concurrent cnorm calls; the effective thread
    count is 1 when another call is already in flight (no oversubscription)."""

    __slots__ = ("requested", "threads")

    def __init__(self, requested: int):
        self.requested = requested

    def __enter__(self) -> int:
        global _active_calls
        with _active_lock:
            busy = _active_calls > 0
            _active_calls += 1
        self.threads = 1 if busy else self.requested
        return self.threads

    def __exit__(self, *exc) -> None:
        global _active_calls
        with _active_lock:
            _active_calls -= 1


def call_slot(num_threads) -> _CallSlot:
    return _CallSlot(resolve_threads(num_threads))


def small_call_allowed(backend, num_threads) -> bool:
    """Whether a call may take a C entry that skips the Python planning
    (``norm_rows_contig``, ``batch_norm_contig``, ``moments_contig``, the small
    backward): the compiled backend, by default or by name, and no thread count
    or a valid one (results never depend on threads).  Anything else goes to the
    general path, which validates it."""
    return (HAVE_EXTENSION and type(backend) is str and (backend == "auto" or backend == "cython")
            and small_threads_allowed(num_threads))


def run_entry(entry, x, num_threads, *args):
    """``entry(x, *args, nthreads)``: a C entry of the compiled kernels, with the
    thread count of a call slot when x is large enough for threads (as the
    general path takes it), else 1 without the slot's bookkeeping: below
    ``SERIAL_WORK_ELEMENTS`` (the kernels run serially there anyway), or when
    the call asks for one thread.  Without the compiled kernels (a Numba entry)
    always the slot: the Numba kernels apply their own serial threshold.

    The threshold stays at 131072 elements although warm back-to-back calls of
    32768+ elements run faster with 2 threads (AMD EPYC Zen 4, 2026-12-08, 2
    threads: layer_norm (32, 1024) float64 41.5 -> 25.3 us): a call after a pause
    wakes the sleeping OpenMP workers first: with a threshold of 32768, 2
    threads, each call after a 2 ms pause, (64, 1024) float32 layer_norm took
    270-300 us against 46 us serial, its layer_norm_backward 390-440 against
    94-104."""
    if type(x) is not np.ndarray or (kernels is not None
                                     and x.size < kernels.SERIAL_WORK_ELEMENTS):
        return entry(x, *args, 1)
    requested = resolve_threads(num_threads)
    if kernels is not None and requested == 1:
        return entry(x, *args, 1)
    with _CallSlot(requested) as nthreads:
        return entry(x, *args, nthreads)


def small_threads_allowed(num_threads) -> bool:
    """No thread count or a valid one (what a small-call entry accepts)."""
    return num_threads is None or (type(num_threads) is int and num_threads > 0)


# ------------------------------------------------------------------ caches
def llc_bytes() -> int:
    """Size of the last-level cache from sysfs (32 MiB when unknown)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            digits = text.rstrip("KMG")
            if digits.isdigit():
                best = max(best, int(digits) * mult)
    except OSError:
        pass
    return best or (32 << 20)


def _default_stream_bytes() -> int:
    """Outputs from this size on are written with streaming stores: half the
    LLC (input and output together no longer fit), or ``CNORM_STREAM_MIN_BYTES``."""
    forced = _env_int("CNORM_STREAM_MIN_BYTES")
    return forced if forced is not None else llc_bytes() // 2


_stream_bytes: int | None = None


def set_stream_threshold(nbytes: int | None) -> int:
    """Outputs of at least ``nbytes`` bytes bypass the cache (non-temporal
    stores) in the rows kernels; ``None`` restores the default.  Returns the
    previous threshold.  Results do not depend on it (tests force both paths)."""
    global _stream_bytes
    old = _stream_bytes if _stream_bytes is not None else _default_stream_bytes()
    _stream_bytes = _default_stream_bytes() if nbytes is None else max(int(nbytes), 0)
    for mod in _loaded_kernels():
        mod.set_stream_threshold(_stream_bytes)
    return old


def cpuinfo_field(name: str) -> str:
    """The first ``name`` field of /proc/cpuinfo ("vendor_id", "model name"), or ""."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _default_f32_vector_bits() -> int:
    """Width of the float32 loops on the AVX-512 path: ``CNORM_F32_VECTOR_BITS``
    (256 or 512), else 256 on AMD cores (a zmm operation takes both halves of
    their 256-bit pipes: the float32 loops measured faster in ymm) and 512
    elsewhere (Intel's full-width units: faster in zmm).  Results are the same
    bits at either width."""
    forced = _env_int("CNORM_F32_VECTOR_BITS")
    if forced is not None:
        if forced not in (256, 512):
            raise ValueError(f"environment variable CNORM_F32_VECTOR_BITS={forced!r}: "
                             "expected 256 or 512")
        return forced
    return 256 if cpuinfo_field("vendor_id") == "AuthenticAMD" else 512


_f32_bits: int | None = None


def set_f32_vector_bits(bits: int | None) -> int:
    """Vector width (256 or 512 bits) of the float32 statistics and apply loops
    on the AVX-512 path; ``None`` restores the default.  Returns the previous
    width.  Results do not depend on it (the tests run both)."""
    global _f32_bits
    if bits is not None and (type(bits) is not int or bits not in (256, 512)):
        raise ValueError(f"set_f32_vector_bits: bits must be 256, 512 or None, got {bits!r}")
    old = _f32_bits if _f32_bits is not None else _default_f32_vector_bits()
    _f32_bits = _default_f32_vector_bits() if bits is None else bits
    for mod in _loaded_kernels():
        mod.set_f32_vector_bits(_f32_bits)
    return old


def _loaded_kernels():
    import sys
    return [sys.modules[m] for m in _ISA_MODULES.values() if m in sys.modules]


def _configured(mod):
    """A freshly imported _kernels copy, with this process's stream threshold."""
    global _stream_bytes
    if _stream_bytes is None:
        _stream_bytes = _default_stream_bytes()
    mod.set_stream_threshold(_stream_bytes)
    global _f32_bits
    if _f32_bits is None:
        _f32_bits = _default_f32_vector_bits()
    mod.set_f32_vector_bits(_f32_bits)
    return mod


# ------------------------------------------------------------------ ISA dispatch
def _load_kernels():
    import importlib.util
    base = importlib.import_module(_ISA_MODULES["baseline"])
    level = base.cpu_level()
    # find the compiled copies without importing them: a module built for a
    # higher ISA level may execute its instructions in its module init, which
    # would kill the interpreter (SIGILL) on a CPU without them
    compiled = ["baseline"] + [name for name in ("avx2", "avx512")
                               if importlib.util.find_spec(_ISA_MODULES[name]) is not None]
    forced = os.environ.get("CNORM_ISA", "").strip().lower()
    if forced:
        if forced not in _ISA_MODULES:
            raise ValueError(f"CNORM_ISA={forced!r}: expected one of {sorted(_ISA_MODULES)}")
        if forced not in compiled:
            raise ValueError(f"CNORM_ISA={forced!r}: this build has only {compiled}")
        if _ISA_LEVEL[forced] > level:
            raise ValueError(f"CNORM_ISA={forced!r}: this CPU supports only "
                             f"{[n for n in compiled if _ISA_LEVEL[n] <= level]}")
        chosen = forced
    else:
        chosen = max((n for n in compiled if _ISA_LEVEL[n] <= level), key=_ISA_LEVEL.get)
    runnable = [n for n in compiled if _ISA_LEVEL[n] <= level]
    return _configured(importlib.import_module(_ISA_MODULES[chosen])), chosen, compiled, runnable


try:
    kernels, isa_selected, isa_compiled, isa_runnable = _load_kernels()
    HAVE_EXTENSION = True
except ImportError:  # pragma: no cover - source checkout without a build
    kernels, isa_selected, isa_compiled, isa_runnable = None, None, [], []
    HAVE_EXTENSION = False


def kernels_for_isa(name: str, family: str = "_kernels"):
    """A kernel module (``family`` = '_kernels', '_apply' or '_backward')
    compiled for one ISA level (for tests and benchmarks)."""
    if name not in isa_runnable:
        raise ValueError(f"isa={name!r} is not runnable here; runnable: {isa_runnable}")
    mod = importlib.import_module(_ISA_MODULES[name].replace("_kernels", family))
    return _configured(mod) if family == "_kernels" else mod


_families: dict = {}


def family(name: str):
    """The selected-ISA copy of a kernel module family ('_apply', '_backward', ...)."""
    if name == "_kernels":
        return kernels
    mod = _families.get((name, isa_selected))
    if mod is None:
        mod = importlib.import_module(_ISA_MODULES[isa_selected].replace("_kernels", name))
        _families[(name, isa_selected)] = mod
    return mod


def use_isa(name: str) -> None:
    """Switch every kernel family to one runnable ISA path (tests and benchmarks)."""
    global kernels, isa_selected
    kernels = kernels_for_isa(name)
    isa_selected = name


def have_numba() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend) -> str:
    """Map ``backend`` to one of 'cython', 'numba', 'numpy' (errors name the value)."""
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {list(_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "cython" if HAVE_EXTENSION else ("numba" if have_numba() else "numpy")
    if backend == "cython" and not HAVE_EXTENSION:
        raise ValueError("backend='cython' is not available: the extension is not built")
    if backend == "numba" and not have_numba():
        raise ValueError("backend='numba' needs the numba package (pip install numba)")
    return backend


def show_config(file=None) -> dict:
    """Print and return cnorm's build and run-time configuration.

    Returns
    -------
    dict
        ``version``, ``isa_compiled``, ``isa_runnable``, ``isa_selected``,
        ``f32_vector_bits``, ``num_threads``, ``backends``.
    """
    from . import __version__
    info = {
        "version": __version__,
        "isa_compiled": list(isa_compiled),
        "isa_runnable": list(isa_runnable),
        "isa_selected": isa_selected,
        "f32_vector_bits": kernels.f32_vector_bits() if HAVE_EXTENSION else None,
        "num_threads": get_num_threads(),
        "usable_cpus": _usable_cpus(),
        "backends": [b for b in ("cython", "numba", "numpy")
                     if (b != "cython" or HAVE_EXTENSION) and (b != "numba" or have_numba())],
    }
    lines = [f"cnorm {info['version']}",
             f"  ISA paths compiled : {', '.join(info['isa_compiled']) or 'none'}",
             f"  ISA paths runnable : {', '.join(info['isa_runnable']) or 'none'}",
             f"  ISA path selected  : {info['isa_selected']}"
             + ("  (forced by CNORM_ISA)" if os.environ.get("CNORM_ISA") else ""),
             f"  float32 vectors    : {info['f32_vector_bits']} bits"
             + ("  (CNORM_F32_VECTOR_BITS)" if os.environ.get("CNORM_F32_VECTOR_BITS") else ""),
             f"  threads            : {info['num_threads']} (usable CPUs: {info['usable_cpus']})",
             f"  backends           : {', '.join(info['backends'])}"]
    print("\n".join(lines), file=file)
    return info

"""The case table of the pytest-benchmark suites.

One table, shared with ``python -m cnorm bench``: :func:`cnorm._bench_cases.speed_cases`
lists every (operation, layout, size, dtype, implementation, threads).  The
suites here only pick a family of it.

Sizes: ``cache`` (~256 KiB) and ``llc`` (4x the last-level cache, at least 64 MiB).
With ``--benchmark-disable`` or ``CNORM_BENCH_QUICK=1`` every case runs once on tiny
arrays (a smoke test); ``CNORM_BENCH_MODE=tiny|quick|full`` picks the sizes
explicitly and ``CNORM_BENCH_THREADS=1,2`` the thread counts.
"""
import os

from cnorm._bench_cases import DTYPES, speed_cases


def _threads():
    text = os.environ.get("CNORM_BENCH_THREADS", "1,2")
    return tuple(int(t) for t in text.split(",") if t.strip())


def _dtypes():
    text = os.environ.get("CNORM_BENCH_DTYPES", ",".join(DTYPES))
    return tuple(t.strip() for t in text.split(",") if t.strip())


def cases_for(family: str):
    """Cases of one family ("stats", "layer" or "backward") of the shared table."""
    return speed_cases(families=(family,), dtypes=_dtypes(), threads=_threads())


def case_id(case) -> str:
    return case.id

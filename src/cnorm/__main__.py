"""Command line: ``python -m cnorm bench [...]`` (the main job) and ``python -m cnorm info``."""
from __future__ import annotations

import argparse
import sys

_DTYPES = ("float16", "float32", "float64")


def _dtype_list(text: str):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in _DTYPES]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"--dtypes takes a comma-separated subset of {','.join(_DTYPES)}, got {text!r}")
    return list(dict.fromkeys(items))


def _thread_list(text: str):
    try:
        items = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        items = []
    if not items or any(n <= 0 for n in items):
        raise argparse.ArgumentTypeError(
            f"--threads takes comma-separated positive integers, got {text!r}")
    return list(dict.fromkeys(items))


def _default_threads():
    from ._config import get_num_threads
    return sorted({1, get_num_threads()})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cnorm",
        description="cnorm: accurate, fast CPU statistics for normalization.")
    sub = p.add_subparsers(dest="command", metavar="{bench,info}")
    b = sub.add_parser(
        "bench", help="speed and precision tables (Markdown, JSON, PNG plots)",
        description="Run the benchmark on generated data: a precision table (worst error in "
                    "ulps against exact values, across dtypes and condition numbers) and a "
                    "speed table (cnorm cython/numba, NumPy one-/two-pass, PyTorch, and the "
                    "memory-bound floor), printed and written to --out as report.md, "
                    "report.json, precision.png and speed.png.")
    b.add_argument("--quick", action="store_true",
                   help="fewer rounds, smaller lengths and sizes (about a minute)")
    b.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    b.add_argument("--dtypes", type=_dtype_list, default=list(_DTYPES),
                   help="comma-separated dtypes (default: float16,float32,float64)")
    b.add_argument("--threads", type=_thread_list, default=None,
                   help="comma-separated thread counts (default: 1 and cnorm's default)")
    b.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    b.add_argument("--only", choices=("precision", "speed"), default=None,
                   help="run only one of the two parts")
    b.add_argument("--backward", action="store_true",
                   help="also time the backward functions")
    sub.add_parser("info", help="print cnorm.show_config()",
                   description="Print the version, ISA paths, threads and backends.")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from ._config import show_config
        show_config()
        return 0
    if args.command == "bench":
        if args.threads is None:
            args.threads = _default_threads()
        from . import _bench
        return _bench.main(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

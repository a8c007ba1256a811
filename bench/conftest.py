"""Fixtures of the pytest-benchmark suites (``pytest bench/``).

Every test times one case of the shared table (see ``cases.py``); results are
grouped by operation, dtype and size (``benchmark.group``).  No timing is ever
asserted.  Run ``pytest bench/ --benchmark-disable -q`` for a quick smoke test
(each case once, tiny arrays).
"""
import os

import pytest

from cnorm._bench_cases import DataCache, Unavailable, make_runner


def _mode(config) -> str:
    explicit = os.environ.get("CNORM_BENCH_MODE", "").strip()
    if explicit:
        if explicit not in ("tiny", "quick", "full"):
            raise pytest.UsageError(f"CNORM_BENCH_MODE={explicit!r}: use tiny, quick or full")
        return explicit
    disabled = False
    try:
        disabled = bool(config.getoption("benchmark_disable"))
    except ValueError:      # pytest-benchmark not installed
        disabled = True
    if disabled or os.environ.get("CNORM_BENCH_QUICK") == "1":
        return "tiny"
    return "full"


@pytest.fixture(scope="session")
def bench_data(pytestconfig):
    """Inputs of the current (dtype, size), rebuilt when they change."""
    return DataCache(_mode(pytestconfig))


@pytest.fixture
def run_case(benchmark, bench_data):
    """``run_case(case)``: time one case of the table, or skip it when it cannot run."""
    def run(case):
        d = bench_data.arrays(case.op, case.dtype, case.size)
        try:
            fn = make_runner(case, d)
        except Unavailable as e:
            pytest.skip(str(e))
        benchmark.group = case.group
        benchmark.extra_info.update(op=case.op.key, dtype=case.dtype, size=case.size,
                                    impl=case.impl, threads=case.threads,
                                    shape="x".join(map(str, d["shape"])))
        benchmark(fn)
    return run


try:
    import pytest_benchmark  # noqa: F401
except ImportError:         # run each case once without the plugin
    class _Once:
        def __init__(self):
            self.group = self.name = None
            self.extra_info = {}

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

    @pytest.fixture
    def benchmark():
        return _Once()

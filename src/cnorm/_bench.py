"""``python -m cnorm bench``: the speed and precision tables, as text, JSON and plots.

The speed part runs the case table of :mod:`cnorm._bench_cases`.  For each
(operation, dtype, size, thread count) every implementation is timed in
interleaved rounds (the order rotates each round), so that the ratio to the
memory-bound floor is a median of ratios measured side by side; the machine
being noisy moves both terms of a ratio together.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np

from . import _config
from . import _bench_cases as C
from . import _bench_precision as P
from . import _bench_report as R

#: rounds, minimum seconds per timed measurement, seconds per implementation per group
_TIMING = {"full": (7, 0.02, 1.0), "quick": (5, 0.005, 0.2)}


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _timed(fn, number: int, cap: float = float("inf")) -> float:
    """Seconds per call over ``number`` calls (fewer once ``cap`` seconds are spent)."""
    t0 = time.perf_counter()
    done = 0
    while done < number:
        fn()
        done += 1
        if done < number and time.perf_counter() - t0 > cap:
            break
    return (time.perf_counter() - t0) / done


def measure(runners: dict, mode: str) -> tuple:
    """Time warmed-up runners (see :func:`make_runner`) in interleaved rounds.

    Slow cases are not repeated: a NumPy implementation (no lazy set-up)
    whose warm-up call alone exceeds the per-group budget keeps that call as
    its one measurement; any other implementation makes one more call, kept
    as its one measurement if it exceeds the budget.  Returns ``({impl:
    [seconds per call, per round]}, {impl: True for such single values})``.
    """
    if mode == "tiny":      # smoke test of the machinery: the warm-up call is the measurement
        return ({name: [getattr(fn, "warm_seconds", 0.0)] for name, fn in runners.items()},
                dict.fromkeys(runners, True))
    rounds, min_time, budget = _TIMING[mode]
    number, nrounds, cap = {}, {}, {}
    times = {name: [] for name in runners}
    single = {}
    for name, fn in runners.items():
        w = getattr(fn, "warm_seconds", 0.0)
        if name in C.SINGLE_THREADED and w >= budget:
            times[name], single[name] = [w], True
            continue
        est = _timed(fn, 1)
        if est >= budget:
            times[name], single[name] = [est], True
            continue
        number[name] = max(1, int(min_time / max(est, 1e-7)))
        nrounds[name] = max(1, min(rounds, int(budget / max(est * number[name], 1e-7))))
        cap[name] = max(4 * min_time, 3 * est * number[name])
    names = list(number)
    for r in range(max(nrounds.values(), default=0)):
        k = r % max(len(names), 1)
        for name in names[k:] + names[:k]:
            if r < nrounds[name]:
                times[name].append(_timed(runners[name], number[name], cap[name]))
    return times, single


def _ratio(t: list, floor: list, single: bool) -> float:
    if single or len(t) > len(floor):
        return float(np.median(t) / np.median(floor))
    return float(np.median([a / b for a, b in zip(t, floor)]))


def run_speed(mode: str, dtypes, threads, families=("stats", "layer"), progress=_progress):
    """Records (dicts) for every case of the table; unavailable ones carry a note."""
    table = C.speed_cases(families=families, dtypes=dtypes, threads=threads)
    groups: dict = {}
    for case in table:
        groups.setdefault((case.op.key, case.dtype, case.size), []).append(case)
    cache = C.DataCache(mode)
    records = []
    steps = len(groups) * len(threads)
    step = 0
    for (key, dtype, size), cases in groups.items():
        op = C.OPS_BY_KEY[key]
        d = cache.arrays(op, dtype, size)
        carried = {}    # single-threaded implementations, measured with the first thread count
        for t in threads:
            step += 1
            t0 = time.perf_counter()
            mine = [c for c in cases if c.threads == t]
            runners, notes = {}, {}
            floor_case = C.Case(op, size, dtype, "floor", t)
            for c in [floor_case] + [c for c in mine if c.impl != "floor"]:
                try:
                    with np.errstate(all="ignore"):
                        runners[c.impl] = C.make_runner(c, d)
                except C.Unavailable as e:
                    notes[c.impl] = str(e)
                except Exception as e:  # a failing implementation must not stop the run
                    notes[c.impl] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                    if progress:
                        progress(f"  {c.id}: {notes[c.impl]}")
            with np.errstate(all="ignore"):
                times, single = measure(runners, mode)
            floor = times["floor"]
            group_recs = []
            for impl in C.IMPLS:
                if not any(c.impl == impl for c in cases):
                    continue
                if impl in carried:
                    group_recs.append(dict(carried[impl], threads=t))
                    continue
                rec = {"op": op.name, "layout": op.layout, "key": key, "family": op.family,
                       "dtype": dtype, "size": size, "nbytes": int(d["x"].nbytes),
                       "shape": list(d["shape"]), "threads": t, "impl": impl}
                if impl in times:
                    ts = times[impl]
                    rec.update(ms=float(np.median(ts)) * 1e3, rounds=len(ts),
                               ratio=_ratio(ts, floor, single.get(impl, False)))
                else:
                    rec.update(ms=None, ratio=None, note=notes.get(impl, "not run"))
                if impl in C.SINGLE_THREADED[1:]:
                    carried[impl] = dict(rec, measured_with_threads=t)
                group_recs.append(rec)
            records.extend(group_recs)
            if progress:
                progress(f"[{step:3d}/{steps}] speed {key} {dtype} {size} "
                         f"({d['x'].nbytes / 2**20:.2f} MiB) threads={t}: "
                         + R.speed_progress_cells(group_recs)
                         + f"  ({time.perf_counter() - t0:.1f} s)")
    return records


def _meta(mode, dtypes, threads) -> dict:
    import cnorm
    from . import _config
    meta = {"cnorm": cnorm.__version__, "mode": mode, "dtypes": list(dtypes),
            "threads": list(threads), "python": platform.python_version(),
            "numpy": np.__version__, "machine": platform.machine(),
            "cpu": _cpu_name(), "llc_bytes": C.llc_bytes(), "sizes": C.size_bytes(mode),
            "isa_selected": _config.isa_selected, "usable_cpus": _config._usable_cpus(),
            "load_start": _loadavg()}
    for mod in ("numba", "torch", "matplotlib"):
        try:
            meta[mod] = __import__(mod).__version__
        except ImportError:
            meta[mod] = None
    return meta


def _loadavg():
    """1-minute load average (None where unknown)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    return _config.cpuinfo_field("model name") or platform.processor() or "unknown"


def main(args) -> int:
    """Run the benchmark described by parsed CLI ``args``; return an exit code."""
    mode = "tiny" if args.tiny else ("quick" if args.quick else "full")
    dtypes = args.dtypes
    threads = args.threads
    out = args.out
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    meta = _meta(mode, dtypes, threads)
    _progress(f"cnorm bench: mode={mode} dtypes={','.join(dtypes)} threads="
              f"{','.join(map(str, threads))} sizes: cache {meta['sizes']['cache'] >> 10} KiB, "
              f"> LLC {meta['sizes']['llc'] >> 20} MiB (LLC {meta['llc_bytes'] >> 20} MiB); "
              f"output to {out}/")
    precision, speed = [], []
    if args.only in (None, "precision"):
        precision = P.run_precision(mode, dtypes, progress=_progress)
    if args.only in (None, "speed"):
        families = ("stats", "layer", "backward") if args.backward else ("stats", "layer")
        speed = run_speed(mode, dtypes, threads, families=families)
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    meta["load_end"] = _loadavg()
    text = R.render(meta, precision, speed)
    print(text)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(R.render(meta, precision, speed, markdown=True))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(_jsonable({"meta": meta, "precision": precision, "speed": speed}), f,
                  indent=1)
    for msg in R.plots(out, precision, speed):
        _progress(msg)
    _progress(f"wrote {out}/report.md, {out}/report.json in {meta['seconds']} s")
    return 0


def _jsonable(o):
    """Plain JSON: numpy scalars to Python, inf/NaN to the strings "inf"/"nan"."""
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return "nan" if np.isnan(o) else ("inf" if o > 0 else "-inf")
    return o

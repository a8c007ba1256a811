"""Tables (terminal / Markdown) and plots (PNG, matplotlib Agg) of the bench results."""
from __future__ import annotations

import os

import numpy as np

from . import _bench_precision as P

SPEED_COLS = ("cnorm-cython", "cnorm-numba", "cnorm-alloc", "numpy-2pass", "numpy-1pass",
              "torch")
SPEED_LABELS = {"cnorm-cython": "cython", "cnorm-numba": "numba", "cnorm-alloc": "cy alloc",
                "numpy-2pass": "np 2pass", "numpy-1pass": "np 1pass", "torch": "torch",
                "floor": "floor"}
PLOT_IMPLS = ("cnorm-cython", "cnorm-numba", "numpy-2pass", "numpy-1pass", "torch")


def table(header, rows) -> str:
    """A Markdown table with padded columns (reads well in a terminal too)."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) if i > 0 else c.ljust(w)
                                       for i, (c, w) in enumerate(zip(r, widths))) + " |")
    return "\n".join(lines)


def _kappa(k) -> str:
    return "1" if k == 1 else f"1e{int(round(np.log10(k)))}"


# ------------------------------------------------------------------ precision
def precision_tables(records) -> list:
    parts = []
    names = {"mean": "mean", "var": "variance (biased)",
             "norm": "normalized output (x-mean)/sqrt(var+1e-5), relative to max(|y|, 2^-10)"}
    for q in P.QUANTITIES:
        header = ["dtype", "n", "kappa"] + [P.ALGO_LABELS[a] for a in P.ALGOS] + ["contract"]
        rows = []
        for rec in records:
            errs = rec["errors"][q]
            bound = P.contract(rec["dtype"], q)
            mine = [errs.get(a) for a in ("cnorm-cython", "cnorm-numba")]
            mine = [e for e in mine if e is not None]
            verdict = "n/a" if not mine else ("ok" if max(mine) <= bound else "FAIL")
            rows.append([rec["dtype"], rec["n"], _kappa(rec["kappa"])]
                        + [P.fmt_ulps(errs.get(a)) for a in P.ALGOS]
                        + [f"<={bound:g} {verdict}"])
        parts.append((f"Worst error in ulps: {names[q]}", table(header, rows)))
    return parts


# ---------------------------------------------------------------------- speed
def target(key: str, dtype: str, size: str):
    """SPEC section 4 bound on cnorm's ratio to the floor (None: no target)."""
    if key.startswith("moments"):
        return 1.2
    if "_backward" in key:
        return 2.5
    if key == "batch_norm[NCHW]":
        return 1.6 if size == "llc" else None
    return 1.15 if dtype == "float32" else 1.3


def _fmt_ratio(r) -> str:
    if r is None:
        return "n/a"
    return f"{r:.2f}x" if r < 100 else f"{r:.0f}x"


def _fmt_ms(ms) -> str:
    if ms is None:
        return "n/a"
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def speed_rows(records):
    """{(key, dtype, size, threads): {impl: record}} in table order."""
    groups: dict = {}
    for rec in records:
        groups.setdefault((rec["key"], rec["dtype"], rec["size"], rec["threads"]), {})[
            rec["impl"]] = rec
    return groups


def torch_over_cnorm(recs: dict):
    t = recs.get("torch", {}).get("ms")
    c = recs.get("cnorm-alloc", recs.get("cnorm-cython", {})).get("ms")
    return None if not t or not c else t / c


def speed_table(records) -> str:
    header = (["operation", "dtype", "size", "thr", "floor ms", "cython ms"]
              + [f"{SPEED_LABELS[i]} /floor" for i in SPEED_COLS] + ["torch/cnorm", "target"])
    rows = []
    for (key, dtype, size, t), recs in speed_rows(records).items():
        cy = recs.get("cnorm-cython", {})
        tgt = target(key, dtype, size)
        r = cy.get("ratio")
        verdict = "" if tgt is None else (f"<={tgt:g} " + ("n/a" if r is None else
                                                           ("ok" if r <= tgt else "miss")))
        tc = torch_over_cnorm(recs)
        rows.append([key, dtype, size, t, _fmt_ms(recs["floor"].get("ms")), _fmt_ms(cy.get("ms"))]
                    + [_fmt_ratio(recs[i].get("ratio")) if i in recs else "-" for i in SPEED_COLS]
                    + ["n/a" if tc is None else f"{tc:.2f}", verdict])
    return table(header, rows)


def speed_notes(records) -> list:
    seen = {}
    for rec in records:
        if rec.get("note"):
            seen.setdefault((rec["impl"], rec["note"]), []).append(rec["key"])
    return [f"{impl}: n/a for {', '.join(sorted(set(keys)))} -- {note}"
            for (impl, note), keys in seen.items()]


def speed_progress_cells(recs) -> str:
    cells = []
    for rec in recs:
        label = SPEED_LABELS[rec["impl"]]
        if rec["impl"] == "floor":
            cells.append(f"floor {_fmt_ms(rec['ms'])} ms")
        else:
            cells.append(f"{label} {_fmt_ratio(rec['ratio'])}")
    return " | ".join(cells)


# --------------------------------------------------------------------- report
SPEED_LEGEND = (
    "Times are medians over interleaved rounds; each `/floor` cell is the median of the "
    "per-round ratios to the floor measured beside it: `np.copyto(out, x)` for layers "
    "(read + write), `np.max` over the same bytes viewed as integers for statistics "
    "(read only), `np.copyto` of dy and of x for backward passes. cnorm (cython, numba) runs with `out=` and `num_threads=thr`; `cy alloc` "
    "is cnorm cython allocating its output, the partner of torch (`torch.set_num_threads"
    "(thr)`, allocating): `torch/cnorm` > 1 means cnorm is faster. NumPy does not thread "
    "(measured once, shown at every thread count). `np 2pass` for moments is `np.var` "
    "alone; `np 1pass` is E[x^2]-E[x]^2. `target` checks cnorm cython against SPEC "
    "section 4. Sizes: `cache` ~256 KiB, `llc` larger than the last-level cache.")
PRECISION_LEGEND = (
    "Rows of x = kappa + N(0,1) rounded to the dtype; kappa = offset/std is the condition "
    "number. Errors are the worst over the rows, in ulps of the dtype, against the exact "
    "value for the stored inputs (Python integers/fractions). one-pass and Welford are "
    "sequential loops in the input dtype; NumPy is np.mean/np.var in the input dtype; "
    "PyTorch is torch.var_mean(correction=0) and F.layer_norm; cnorm is moments() and "
    "layer_norm() per backend. inf = overflow, NaN or a negative variance.")


def render(meta, precision, speed, markdown=False) -> str:
    h = "## " if markdown else "== "
    out = []
    if markdown:
        out.append("# cnorm bench report\n")
    out.append(f"cnorm {meta['cnorm']} on {meta['cpu']} ({meta['usable_cpus']} usable CPUs, "
               f"LLC {meta['llc_bytes'] >> 20} MiB, ISA path {meta['isa_selected']}); "
               f"numpy {meta['numpy']}, numba {meta['numba']}, torch {meta['torch']}; "
               f"mode {meta['mode']}, {meta.get('seconds', '?')} s.")
    loads = [v for v in (meta.get("load_start"), meta.get("load_end")) if v is not None]
    if loads and max(loads) > 0.75 * meta["usable_cpus"]:
        out.append(f"WARNING: the machine was busy (load average {max(loads):.1f} on "
                   f"{meta['usable_cpus']} CPUs): other processes compete for the cores, so "
                   "timings, multi-threaded ones above all, are noisy. Rerun on an idle "
                   "machine for numbers to quote.")
    if precision:
        out.append(f"\n{h}Precision: worst error in ulps against the exact value\n")
        out.append(PRECISION_LEGEND + "\n")
        for title, tab in precision_tables(precision):
            out.append(f"{title}\n\n{tab}\n")
        out.append("\n".join(P.summary(precision)) + "\n")
        notes = sorted({f"{a}: {n}" for rec in precision for a, n in rec["notes"].items()})
        if notes:
            out.append("Not measured: " + "; ".join(notes) + "\n")
    if speed:
        out.append(f"\n{h}Speed: milliseconds and ratio to the memory-bound floor\n")
        out.append(SPEED_LEGEND + "\n")
        out.append(speed_table(speed) + "\n")
        notes = speed_notes(speed)
        if notes:
            out.append("Not measured:\n" + "\n".join(f"- {n}" for n in notes) + "\n")
        if markdown:
            out.append(f"\n{h}Speed: milliseconds per call\n")
            out.append(ms_table(speed) + "\n")
    return "\n".join(out)


def ms_table(records) -> str:
    impls = ("floor",) + SPEED_COLS
    header = ["operation", "dtype", "size", "thr", "shape"] + [SPEED_LABELS[i] for i in impls]
    rows = []
    for (key, dtype, size, t), recs in speed_rows(records).items():
        shape = "x".join(map(str, recs["floor"]["shape"]))
        rows.append([key, dtype, size, t, shape]
                    + [_fmt_ms(recs[i].get("ms")) if i in recs else "-" for i in impls])
    return table(header, rows)


# ---------------------------------------------------------------------- plots
def plots(out, precision, speed) -> list:
    """Write precision.png and speed.png; return messages (what was skipped)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except ImportError:
        return ["matplotlib is not installed: no PNG plots (pip install 'cnorm[bench]')"]
    msgs = []
    if precision:
        _precision_png(plt, os.path.join(out, "precision.png"), precision)
        msgs.append(f"wrote {out}/precision.png")
    if speed:
        _speed_png(plt, os.path.join(out, "speed.png"), speed)
        msgs.append(f"wrote {out}/speed.png")
    return msgs


_LO, _HI = 1e-2, 1e36
_STYLE = {"one-pass": ("tab:red", "v"), "numpy-2pass": ("tab:orange", "s"),
          "welford": ("tab:purple", "D"), "torch": ("tab:brown", "^"),
          "cnorm-cython": ("tab:blue", "o"), "cnorm-numba": ("tab:cyan", "x")}


def _precision_png(plt, path, records):
    import matplotlib
    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    fig, axes = plt.subplots(3, len(dtypes), figsize=(4.6 * len(dtypes), 11), squeeze=False)
    names = {"mean": "mean", "var": "variance", "norm": "normalized output"}
    for j, dt in enumerate(dtypes):
        recs = [r for r in records if r["dtype"] == dt]
        kappas = sorted({r["kappa"] for r in recs})
        for i, q in enumerate(P.QUANTITIES):
            ax = axes[i][j]
            for algo in P.ALGOS:
                ys = []
                for k in kappas:
                    vals = [r["errors"][q].get(algo) for r in recs if r["kappa"] == k]
                    vals = [v for v in vals if v is not None]
                    ys.append(max(vals) if vals else np.nan)
                if all(np.isnan(y) for y in ys):
                    continue
                ys = np.clip(np.array(ys, dtype=float), _LO, _HI)
                color, marker = _STYLE[algo]
                ax.plot(kappas, ys, marker=marker, color=color, label=P.ALGO_LABELS[algo],
                        lw=2.2 if algo.startswith("cnorm") else 1.2, ms=5)
            ax.axhline(P.contract(dt, q), color="k", ls="--", lw=0.8, label="contract")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_ylim(_LO / 2, _HI * 50)
            ax.set_yticks([10.0 ** e for e in range(-2, 37, 6)])
            ax.set_title(f"{dt}: {names[q]}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            if i == 2:
                ax.set_xlabel("condition number offset/std")
            if j == 0:
                ax.set_ylabel("worst error (ulps)")
    h, lab = axes[0][0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=len(lab), fontsize=9)
    fig.suptitle("Worst error vs condition number (max over lengths); "
                 f"0 drawn at {_LO:g}, overflow/NaN at {_HI:g}", fontsize=11)
    fig.subplots_adjust(left=0.07, right=0.985, bottom=0.1, top=0.93, hspace=0.3, wspace=0.2)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _speed_png(plt, path, records):
    import matplotlib
    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    panels = list(dict.fromkeys((r["size"], r["threads"]) for r in records))
    keys = list(dict.fromkeys(r["key"] for r in records))
    height = 4.0 * len(panels) + 1.0
    fig, axes = plt.subplots(len(panels), len(dtypes), figsize=(5.5 * len(dtypes), height),
                             squeeze=False)
    width = 0.8 / len(PLOT_IMPLS)
    for i, (size, threads) in enumerate(panels):
        recs = [r for r in records if r["threads"] == threads]
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            for k, impl in enumerate(PLOT_IMPLS):
                ys = []
                for key in keys:
                    r = [x for x in recs if x["key"] == key and x["dtype"] == dt
                         and x["size"] == size and x["impl"] == impl]
                    ys.append(r[0]["ratio"] if r and r[0]["ratio"] is not None else np.nan)
                color = _STYLE.get(impl, ("gray", None))[0]
                ax.bar(np.arange(len(keys)) + (k - (len(PLOT_IMPLS) - 1) / 2) * width, ys,
                       width, color=color, label=SPEED_LABELS[impl])
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xticks(np.arange(len(keys)))
            ax.set_xticklabels(keys, rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{dt}, {size}, {threads} thread(s)", fontsize=10)
            if j == 0:
                ax.set_ylabel("time / floor (log)")
            ax.grid(True, axis="y", which="major", alpha=0.3)
    h, lab = axes[0][0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=len(lab), fontsize=9)
    fig.suptitle("Ratio to the memory-bound floor (copy for layers, read-only reduction "
                 "for moments); 1 = floor, lower is better", fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=1.4 / height, top=1 - 0.8 / height,
                        hspace=0.75, wspace=0.15)
    fig.savefig(path, dpi=90)
    plt.close(fig)

"""The table (markdown) and the plot (PNG) of ``bench/compare.py``, from its list of run results."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

FAMILY_STYLE = {"hf_oto": "-", "baseline": "--", "peer": ":", "dense": "-"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (task, method, kept-FLOPs target): means and spreads over seeds."""
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        cells[(r["task"], r["method"], r["target_kept_flops"])].append(r)
    rows = []
    for (task, method, target), runs in cells.items():
        ok = [r for r in runs if not r.get("error")]
        row = {"task": task, "method": method, "family": runs[0]["family"], "target": target,
               "seeds": sorted(r["seed"] for r in ok), "steps": sorted({r["steps"] for r in runs}),
               "extra_passes": max((r.get("extra_passes", 0) for r in runs), default=0),
               "errors": sorted({r["error"] for r in runs if r.get("error")}),
               "notes": sorted({n for r in ok for n in r.get("notes", [])})}
        if ok:
            for name in ok[0]["metrics"]:
                row[name] = _mean_std([r["metrics"][name] for r in ok])
            row["kept_flops"] = _mean_std([r["kept_flops"] for r in ok])
            row["params"] = statistics.fmean(r["params"] for r in ok)
            row["latency"] = _mean_std([r["latency_ratio"] for r in ok if r.get("latency_ratio")])
            row["seconds"] = statistics.fmean(r["seconds"] for r in ok)
        rows.append(row)
    return rows


def _fmt(pair: tuple[float, float] | None, digits: int) -> str:
    if pair is None or math.isnan(pair[0]):
        return ""
    mean, std = pair
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"


def _digits(metric: str) -> int:
    return 3 if metric in ("cosine", "spearman") else 1


def task_table(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> str:
    """Markdown table of one task: dense first, then by target (high to low), then method order."""
    header = ["method", "kept FLOPs (target)", *metrics, "params", "CPU latency / dense", "steps", "seeds", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        target = "dense" if row["target"] is None else f"{row['target']:.2f}"
        notes = "; ".join(row["errors"] + row["notes"])
        steps = "/".join(str(s) for s in row["steps"]) + (f" (+{row['extra_passes']} scoring passes)"
                                                          if row["extra_passes"] else "")
        if "kept_flops" not in row:
            cells = [row["method"], target, *[""] * len(metrics), "", "", steps, "0", notes]
        else:
            kept = f"{row['kept_flops'][0]:.3f} ({target})"
            cells = [row["method"], kept, *[_fmt(row.get(m), _digits(m)) for m in metrics],
                     f"{row['params'] / 1e6:.2f}M", _fmt(row["latency"], 2), steps, str(len(row["seeds"])), notes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def order_rows(rows: list[dict[str, Any]], method_order: list[str]) -> list[dict[str, Any]]:
    rank = {m: i for i, m in enumerate(["dense", *method_order])}
    return sorted(rows, key=lambda r: (r["target"] is not None, -(r["target"] or 0.0), rank.get(r["method"], 99)))


def plot(rows: list[dict[str, Any]], tasks: list[tuple[str, str]], path: str) -> None:
    """Per task, the primary metric against kept FLOPs and against CPU latency (relative to dense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.8 * len(tasks)), squeeze=False)
    methods = sorted({r["method"] for r in rows if r["method"] != "dense"})
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    for (task, metric), (ax_flops, ax_latency) in zip(tasks, axes):
        mine = [r for r in rows if r["task"] == task and metric in r]
        dense = next((r for r in mine if r["method"] == "dense"), None)
        for method in methods:
            points = sorted((r for r in mine if r["method"] == method), key=lambda r: r["kept_flops"][0])
            if not points:
                continue
            style = FAMILY_STYLE.get(points[0]["family"], "-")
            y = [p[metric][0] for p in points]
            err = [p[metric][1] for p in points]
            for ax, x in ((ax_flops, [p["kept_flops"][0] for p in points]),
                          (ax_latency, [p["latency"][0] for p in points])):
                ax.errorbar(x, y, yerr=err, linestyle=style, marker="o", markersize=4, capsize=2,
                            color=colours[method], label=method)
        for ax, xlabel in ((ax_flops, "kept FLOPs (fraction of dense)"), (ax_latency, "CPU latency / dense")):
            if dense is not None:
                ax.axhline(dense[metric][0], color="black", linewidth=0.8, label="dense")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric)
            ax.set_title(task)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for row in axes:
        for ax in row:
            h, lab = ax.get_legend_handles_labels()
            for hh, ll in zip(h, lab):
                if ll not in labels:
                    handles.append(hh)
                    labels.append(ll)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(labels) / 4) / max(1, len(tasks)), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Pictures of a compression run for the model card: ``training.png`` and ``layers.png``.

``training.png`` shows the training loss, the group sparsity and the kept FLOPs (and parameters)
against the optimizer steps, with the pruning window shaded; ``layers.png`` shows, per layer, how
many heads / neurons / channels were kept and removed (one panel per kind, since a layer's 12
heads and its 1,536 neurons do not share a scale).

matplotlib is optional (``pip install hf_oto[examples]``): without it :func:`save_plots` logs one
line and writes nothing, and the card simply has no pictures. Figures are built with the
object-oriented API (no pyplot), so nothing touches a global backend or opens a window.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .hub import CompressionReport

logger = logging.getLogger(__name__)

TRAINING_PNG = "training.png"
LAYERS_PNG = "layers.png"
# The keys of a training log entry the curves use (the trainer's logs carry them, see OTOTrainer.log).
CURVE_KEYS = ("step", "loss", "group_sparsity", "kept_params", "kept_flops", "kept_params_ratio", "kept_flops_ratio")
_KIND_NAMES = {"head": "attention heads", "neuron": "FFN neurons", "channel": "channels", "hidden": "hidden width"}
_KEPT, _REMOVED, _WINDOW = "#1f77b4", "#d9d9d9", "#ffd8a8"


def training_curve(log_history: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """The training-log entries (those with a ``loss``) reduced to the keys the curves use.

    Example:
        >>> training_curve([{"step": 5, "loss": 2.0, "group_sparsity": 0.1, "learning_rate": 1e-3},
        ...                 {"step": 5, "eval_loss": 1.9}])
        [{'step': 5, 'loss': 2.0, 'group_sparsity': 0.1}]
    """
    return [{k: entry[k] for k in CURVE_KEYS if isinstance(entry.get(k), (int, float))}
            for entry in log_history if "loss" in entry and "step" in entry]


def plot_training(history: Sequence[dict[str, Any]], pruning_window: Sequence[int] | None = None,
                  target_group_sparsity: float | None = None, dense_flops: float | None = None,
                  dense_params: float | None = None) -> "Figure":
    """Loss, group sparsity and kept FLOPs/parameters (% of dense) against steps, one panel each,
    with the pruning window ``(start, end)`` shaded in every panel.

    ``history`` holds training-log entries (``step``, ``loss``, ``group_sparsity``, ``kept_flops``
    or ``kept_flops_ratio``, ...); a panel whose values never appear says so instead of a curve.

    Example:
        >>> log = [{"step": s, "loss": 2.0 / s, "group_sparsity": min(s, 30) / 60} for s in range(1, 50)]
        >>> fig = plot_training(log, pruning_window=(10, 30), target_group_sparsity=0.5)
        >>> [ax.get_ylabel() for ax in fig.axes]
        ['training loss', 'group sparsity', 'kept (% of dense)']
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 6.0), dpi=100, layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    steps_of = lambda key: [(e["step"], e[key]) for e in history if isinstance(e.get(key), (int, float))]  # noqa: E731

    _line(axes[0], steps_of("loss"), "training loss", "loss", color="#333333")
    _line(axes[1], steps_of("group_sparsity"), "group sparsity", "group_sparsity", color="#d62728")
    if target_group_sparsity is not None:
        axes[1].axhline(target_group_sparsity, color="#d62728", linestyle="--", linewidth=1,
                        label=f"target {target_group_sparsity:g}", gid="target")
    axes[1].set_ylim(-0.02, 1.02)
    for what, dense, color in (("flops", dense_flops, "#2ca02c"), ("params", dense_params, "#9467bd")):
        points = [(s, 100 * v) for s, v in steps_of(f"kept_{what}_ratio")]
        if not points and dense:
            points = [(s, 100 * v / dense) for s, v in steps_of(f"kept_{what}")]
        _line(axes[2], points, "kept (% of dense)", f"kept_{what}", color=color,
              label="FLOPs" if what == "flops" else "parameters")
    axes[2].set_ylim(0, 105)
    axes[2].set_xlabel("optimizer step")
    if pruning_window is not None:
        start, end = pruning_window
        for ax in axes:
            ax.axvspan(start, end, color=_WINDOW, alpha=0.6, linewidth=0, zorder=0, label="pruning window",
                       gid="pruning_window")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8, frameon=False)
    return fig


def _line(ax, points: list[tuple[float, float]], ylabel: str, key: str, color: str, label: str | None = None) -> None:
    ax.set_ylabel(ylabel)
    if points:
        xs, ys = zip(*points)
        # gid: the log key drawn, so that the curves can be found again in the figure
        ax.plot(xs, ys, color=color, linewidth=1.5, label=label, gid=key, marker="." if len(xs) < 30 else None)
    elif label is None:
        ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="#888888")


def plot_layers(layers: Sequence[dict[str, Any]]) -> "Figure":
    """Kept and removed groups per layer: one horizontal stacked bar per layer, one panel per
    kind (heads, neurons, channels), from the rows of ``CompressionReport.layers``
    (``{"layer", "kind", "total", "removed"}``).

    Example:
        >>> rows = [{"layer": "encoder.layer.0", "kind": "head", "total": 12, "removed": 5},
        ...         {"layer": "encoder.layer.1", "kind": "head", "total": 12, "removed": 8}]
        >>> fig = plot_layers(rows)
        >>> [int(bar.get_width()) for bar in fig.axes[0].containers[0]]    # kept, top to bottom
        [7, 4]
    """
    from matplotlib.figure import Figure

    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in layers:
        if row["kind"] == "hidden" and not row["removed"]:
            continue  # the residual width is listed only when it was pruned
        by_kind.setdefault(row["kind"], []).append(row)
    if not by_kind:
        raise ValueError("no layer has prunable groups: nothing to plot")
    heights = [len(rows) for rows in by_kind.values()]
    fig = Figure(figsize=(7.0, 1.0 + 0.28 * sum(heights) + 0.5 * len(heights)), dpi=100, layout="constrained")
    axes = fig.subplots(len(by_kind), 1, squeeze=False, height_ratios=heights)[:, 0]
    for i, (ax, (kind, rows)) in enumerate(zip(axes, by_kind.items())):
        names = [row["layer"] or "<model>" for row in rows]
        kept = [row["total"] - row["removed"] for row in rows]
        removed = [row["removed"] for row in rows]
        y = list(range(len(rows)))
        ax.barh(y, kept, color=_KEPT, label="kept")
        ax.barh(y, removed, left=kept, color=_REMOVED, label="removed")
        ax.set_yticks(y, names, fontsize=7)
        ax.invert_yaxis()  # first layer on top
        ax.set_title(f"{_KIND_NAMES.get(kind, kind)}: {sum(kept)} kept, {sum(removed)} removed", fontsize=9)
        if i == 0:  # once, outside the bars
            ax.legend(loc="lower left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False, borderaxespad=0)
        ax.grid(axis="x", alpha=0.3)
    return fig


def save_plots(folder: str | os.PathLike, report: "CompressionReport") -> list[str]:
    """Write ``training.png`` and ``layers.png`` for ``report`` into ``folder``; returns the file
    names written (none without matplotlib, or without a training log or per-layer table).

    Example:
        >>> written = save_plots("out/compressed", trainer.oto_report)    # doctest: +SKIP
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.info("matplotlib is not installed: %s and %s are not written (pip install matplotlib)",
                    TRAINING_PNG, LAYERS_PNG)
        return []
    written = []
    if report.training_log:
        fig = plot_training(report.training_log, report.pruning_window,
                            target_group_sparsity=report.settings.get("target_group_sparsity"),
                            dense_flops=report.flops_before, dense_params=report.params_before)
        fig.savefig(os.path.join(folder, TRAINING_PNG))
        written.append(TRAINING_PNG)
    if any(row["kind"] != "hidden" or row["removed"] for row in report.layers):
        plot_layers(report.layers).savefig(os.path.join(folder, LAYERS_PNG))
        written.append(LAYERS_PNG)
    return written


__all__ = ["plot_training", "plot_layers", "save_plots", "training_curve", "TRAINING_PNG", "LAYERS_PNG"]

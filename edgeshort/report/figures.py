"""PNG figures of a run for papers and tickets: the cluster scatter and the group-accuracy bars.

Matplotlib is the `report` extra: imported on first use, with the Agg backend so figures are
written on machines without a display.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeshort._optional import require
from edgeshort.errors import InputError
from edgeshort.evaluation import KIND_TITLES

logger = logging.getLogger(__name__)

# Colour-blind-safe (Okabe-Ito) colours, cycled when there are more clusters or classes; classes
# take the colours after the clusters' so no class looks like a cluster (up to eight together).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
# What the clusters were found in (metrics.json `cluster_space_used`), for titles and captions.
CLUSTER_SPACE_TITLES = {"pooled": "Pooled features", "class_centred": "Pooled features minus their class's mean"}
KIND_COLOURS = {"original": "#999999", "ablated": "#56B4E9", "dfr": "#0072B2"}


def _pyplot():
    matplotlib = require("matplotlib", "report")
    # Agg only when nothing else was chosen: a notebook's inline backend stays as it is.
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    return require("matplotlib.pyplot", "report")


def cluster_scatter(
    projection: np.ndarray,
    assignments: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    shortcut_cluster: int,
    path: str | Path,
    centroids: np.ndarray | None = None,
    dpi: int = 150,
    space: str = "pooled",
) -> Path:
    """Two panels of the PCA projection (first two components): coloured by cluster, and by class.

    `space` names what was projected: "pooled" features, or "class_centred" ones.
    """
    projection = np.asarray(projection, dtype=np.float64)
    assignments = np.asarray(assignments).astype(int)
    labels = np.asarray(labels).astype(int)
    if projection.ndim != 2 or len(projection) != len(assignments) or len(assignments) != len(labels):
        raise InputError(
            f"expected a (N, d) projection with N cluster assignments and N labels, got {projection.shape}, "
            f"{assignments.shape} and {labels.shape}; pass the arrays of one run (clusters.npz)"
        )
    if projection.shape[1] == 1:  # one PCA component: spread along y at zero so points stay visible
        projection = np.concatenate([projection, np.zeros_like(projection)], axis=1)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharex=True, sharey=True)
    order = np.random.default_rng(0).permutation(len(projection))  # no class painted over the others
    xy = projection[order, :2]
    for ax, values, names, title, offset in (
        (axes[0], assignments[order], None, "by cluster", 0),
        (axes[1], labels[order], list(class_names), "by class", int(assignments.max()) + 1),
    ):
        for v in np.unique(values):
            sel = values == v
            if names is None:
                name = f"cluster {v}" + (" (shortcut)" if v == shortcut_cluster else "")
            else:
                name = names[v] if v < len(names) else str(v)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=9, alpha=0.7, color=PALETTE[(v + offset) % len(PALETTE)], label=name,
                       linewidths=0)
        ax.set_title(title)
        ax.set_xlabel("PC 1")
        ax.grid(alpha=0.25)
        ax.legend(loc="best", fontsize=8, frameon=True, markerscale=1.8)
    if centroids is not None and len(centroids) and np.asarray(centroids).shape[1] >= 2:
        c = np.asarray(centroids)
        axes[0].scatter(c[:, 0], c[:, 1], marker="X", s=110, color="white", edgecolors="black", linewidths=1.2,
                        zorder=5, label="_centres")
    axes[0].set_ylabel("PC 2")
    fig.suptitle(f"{CLUSTER_SPACE_TITLES.get(space, space)} of the validation set (PCA)", fontsize=11)
    fig.tight_layout()
    return _save(fig, plt, path, dpi)


def group_accuracy_bars(tables: dict[str, dict], path: str | Path, intervals: dict[str, dict] | None = None,
                        confidence: float = 0.95, dpi: int = 150) -> Path:
    """Grouped bars: accuracy per (class, group) cell, average and worst group, one bar per prediction kind.

    `intervals` ({kind: {"average": [lo, hi], "worst": [lo, hi]}}, metrics.json
    `group_accuracy_intervals["kinds"]`, at `confidence`) draws error bars on the average and worst-group bars.
    """
    if not tables:
        raise InputError("expected at least one group-accuracy table (metrics.json `group_accuracy`), got none")
    kinds = list(tables)
    cells = tables[kinds[0]]["cells"]
    names = [f"{c['class']}\n{c['group']}\n(n={c['n']})" for c in cells] + ["average", "worst\ngroup"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.15 * len(names) + 1.5), 4.2))
    x = np.arange(len(names))
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        values = [cell["accuracy"] for cell in tables[kind]["cells"]] + [tables[kind]["average"], tables[kind]["worst"]]
        heights = [np.nan if v is None else v for v in values]
        bars = ax.bar(x + (j - (len(kinds) - 1) / 2) * width, heights, width * 0.95,
                      label=KIND_TITLES.get(kind, kind), color=KIND_COLOURS.get(kind, PALETTE[j % len(PALETTE)]))
        bounds = [None] * len(cells) + [(intervals or {}).get(kind, {}).get(key) for key in ("average", "worst")]
        for bar, v, interval in zip(bars, values, bounds):
            if interval and v is not None:
                centre = bar.get_x() + bar.get_width() / 2
                ax.errorbar(centre, v, yerr=[[v - interval[0]], [interval[1] - v]], color="#333333", capsize=2.5,
                            linewidth=0.9)
            if v is not None:  # the value above its error bar, never under it
                top = max(v, interval[1]) if interval else v
                ax.text(bar.get_x() + bar.get_width() / 2, top + 0.01, f"{v:.2f}", ha="center", va="bottom",
                        fontsize=7)
    ax.axvline(len(cells) - 0.5, color="#bbbbbb", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per (class, group) on the test set"
                 + (f" (error bars: {confidence:.0%} CI, paired bootstrap)" if intervals else ""), pad=26)
    ax.grid(axis="y", alpha=0.25)
    # Above the axes, so the legend never hides a bar.
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, ncol=len(kinds), frameon=False)
    fig.tight_layout()
    return _save(fig, plt, path, dpi)


def _save(fig, plt, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    logger.info("wrote %s", path)
    return path

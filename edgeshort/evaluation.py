"""Per-group accuracy: the seed's results table, for any number of classes."""

from __future__ import annotations

import numpy as np


def group_accuracy(
    predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray, class_names, group_names=("no artefact", "artefact")
) -> dict:
    """Accuracy per (class, group) cell, their average (AGA) and the worst cell (WGA).

    AGA is the mean over the cells that have samples, so a balanced test set and an
    imbalanced one are judged alike.
    """
    predictions, labels, groups = (np.asarray(a) for a in (predictions, labels, groups))
    cells = []
    for c, cname in enumerate(class_names):
        for g, gname in enumerate(group_names):
            sel = (labels == c) & (groups == g)
            n = int(sel.sum())
            acc = float((predictions[sel] == c).mean()) if n else None
            cells.append({"class": cname, "group": gname, "n": n, "accuracy": acc})
    accs = [cell["accuracy"] for cell in cells if cell["accuracy"] is not None]
    return {
        "cells": cells,
        "average": float(np.mean(accs)) if accs else None,
        "worst": float(np.min(accs)) if accs else None,
        "overall": float((predictions == labels).mean()) if len(labels) else None,
    }


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table: one row per (class, group) cell, one column per prediction kind."""
    kinds = list(results)
    first = results[kinds[0]]
    header = f"{'class':<12}{'group':<14}{'n':>6}" + "".join(f"{k:>12}" for k in kinds)
    lines = [header, "-" * len(header)]
    for i, cell in enumerate(first["cells"]):
        row = f"{cell['class']:<12}{cell['group']:<14}{cell['n']:>6}"
        for k in kinds:
            acc = results[k]["cells"][i]["accuracy"]
            row += f"{'-' if acc is None else f'{acc:.3f}':>12}"
        lines.append(row)
    lines.append("-" * len(header))
    for label, key in (("average", "average"), ("worst group", "worst")):
        row = f"{label:<32}"
        for k in kinds:
            v = results[k][key]
            row += f"{'-' if v is None else f'{v:.3f}':>12}"
        lines.append(row)
    return "\n".join(lines)

"""Per-group accuracy: the seed's results table, for any number of classes, with confidence intervals."""

from __future__ import annotations

import numpy as np

from edgeshort.errors import InputError

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
# Groups are artefact present or not: from labels when the test set has them, else from the guard's flag.
ARTEFACT_GROUP_NAMES = ("no artefact", "artefact")
FLAG_GROUP_NAMES = ("not flagged", "flagged")
KIND_TITLES = {"original": "original", "ablated": "ablated", "dfr": "ablated + DFR"}


def group_accuracy(
    predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray, class_names, group_names=ARTEFACT_GROUP_NAMES
) -> dict:
    """Accuracy per (class, group) cell, their average (AGA) and the worst cell (WGA), and per class over
    all its images ("classes": a class's recall; with two classes, sensitivity and specificity).

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
        "classes": {cname: float((predictions[labels == c] == c).mean()) if (labels == c).any() else None
                    for c, cname in enumerate(class_names)},
    }


def _cell_indices(labels: np.ndarray, groups: np.ndarray, num_classes: int, num_groups: int) -> list[np.ndarray]:
    """Sample indices of every (class, group) cell, empty ones too, in `group_accuracy`'s order."""
    return [np.flatnonzero((labels == c) & (groups == g)) for c in range(num_classes) for g in range(num_groups)]


def bootstrap_intervals(
    predictions: dict[str, np.ndarray], labels: np.ndarray, groups: np.ndarray, num_classes: int,
    num_groups: int = 2, resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0,
) -> dict:
    """Confidence intervals for AGA and WGA of each prediction kind, and for each step's change.

    A paired bootstrap stratified by (class, group) cell: every resample redraws each cell's test
    images with replacement and judges all kinds on the same draw, so a step's change carries only
    the noise of the images both kinds saw. Redrawing n images of a cell is a multinomial draw over
    which kinds got each image right, so no resample is materialised; scipy.stats.bootstrap
    resamples whole samples and cannot stratify, hence this short version.
    Steps are consecutive kinds in the order given (original -> ablated -> dfr).
    """
    kinds = list(predictions)
    if not kinds:
        raise InputError("expected predictions of at least one kind, got none")
    if not 0 < confidence < 1 or resamples < 100:
        raise InputError(f"expected 0 < confidence < 1 and resamples >= 100, got {confidence} and {resamples}")
    labels, groups = np.asarray(labels), np.asarray(groups)
    sizes = {k: len(predictions[k]) for k in kinds}
    if len(groups) != len(labels) or any(n != len(labels) for n in sizes.values()):
        raise InputError(f"expected one group per prediction, got {len(groups)} groups and {len(labels)} labels "
                         f"for predictions of sizes {sizes}")
    correct = np.stack([np.asarray(predictions[k]) == labels for k in kinds], 1)  # (N, K)
    rng = np.random.default_rng(seed)
    # (K, 2**K): whether kind k is right under each right/wrong pattern across kinds.
    patterns = (np.arange(2 ** len(kinds))[None, :] >> np.arange(len(kinds))[:, None]) & 1
    cell_accuracy = []  # per cell: (resamples, K)
    cells = _cell_indices(labels, groups, num_classes, num_groups)
    for idx in (idx for idx in cells if len(idx)):
        codes = (correct[idx] * (1 << np.arange(len(kinds)))).sum(1)
        freq = np.bincount(codes, minlength=patterns.shape[1]) / len(idx)
        counts = rng.multinomial(len(idx), freq, size=resamples)  # (R, 2**K)
        cell_accuracy.append(counts @ patterns.T / len(idx))
    acc = np.stack(cell_accuracy, 2)  # (R, K, cells)
    stats = {"average": acc.mean(2), "worst": acc.min(2)}  # each (R, K)
    tail = 100 * (1 - confidence) / 2

    def interval(values: np.ndarray) -> list[float]:
        return [round(float(v), 4) for v in np.percentile(values, [tail, 100 - tail])]

    return {
        "confidence": confidence,
        "resamples": resamples,
        "kinds": {k: {name: interval(s[:, i]) for name, s in stats.items()} for i, k in enumerate(kinds)},
        "changes": [
            {"from": a, "to": b, **{f"{name}_interval": interval(s[:, i + 1] - s[:, i]) for name, s in stats.items()},
             # Whether the changed images bear the interval out (change_verdict) is judged at its level.
             "confidence": confidence,
             "changed_per_cell": changed_per_cell(correct[:, i], correct[:, i + 1], cells)}
            for i, (a, b) in enumerate(zip(kinds, kinds[1:]))
        ],
    }


def changed_per_cell(before: np.ndarray, after: np.ndarray, cells: list[np.ndarray]) -> list[list[int]]:
    """[fixed, broken] per cell (index arrays, e.g. `_cell_indices`) from whether each image was right `before`
    and `after` a step: the images the step changed."""
    return [[int((~before[idx] & after[idx]).sum()), int((before[idx] & ~after[idx]).sum())] for idx in cells]


def sign_test(wins: int, losses: int) -> float:
    """One-sided exact sign test (McNemar's exact test on paired predictions): the chance of at least `wins`
    of `wins + losses` changes going one way when each way is equally likely. Exact integers, no scipy: the
    report reads verdicts where only the runtime is installed."""
    changed = wins + losses
    # The shorter tail, each binomial coefficient from the last: one big-integer comb per term took
    # seconds on thousands of changed predictions.
    if 2 * wins > changed:  # P(X >= wins), summed down from X = changed
        total = term = 1
        for k in range(changed, wins, -1):
            term = term * k // (changed - k + 1)
            total += term
        return total / 2**changed
    total, term = 0, 1  # 1 - P(X < wins), summed up from X = 0
    for k in range(wins):
        total += term
        term = term * (changed - k) // (k + 1)
    return 1 - total / 2**changed


# A percentile bootstrap over a cell of a few images has a degenerate interval (three images all
# fixed give +1.000 to +1.000), so below this size a step is not called a gain or a loss.
MIN_CELL_FOR_VERDICT = 10


def change_verdict(change: dict, tables: dict[str, dict], stat: str = "worst") -> str:
    """"gain" or "loss" when the paired interval of the worst (or `stat="average"`) group accuracy's change
    excludes zero and the images it changed bear the direction out, else "noise"; "too few" when the smallest
    (class, group) cell is too small for the interval to mean anything."""
    sizes = [cell["n"] for cell in tables[change["to"]]["cells"] if cell["n"]]
    if not sizes or min(sizes) < MIN_CELL_FOR_VERDICT:
        return "too few"
    lo, hi = change[f"{stat}_interval"]
    called = "gain" if lo > 0 else "loss" if hi < 0 else "noise"
    if called == "noise" or "changed_per_cell" not in change:  # runs saved before the counts: the interval alone
        return called
    return called if _changes_bear_out(change, tables, stat, called) else "noise"


def _changes_bear_out(change: dict, tables: dict[str, dict], stat: str, called: str) -> bool:
    """Whether the changed images show `called` beyond chance, at the interval's own level, in the cell that
    must move for it: a worst-group gain needs the worst cell before the step to gain (the new worst is no
    higher than it), a loss needs the worst cell after it to lose. A percentile bootstrap over a cell with a
    few changed images, all one way, excludes zero on its own (4 fixed of 50 gives +0.02 to +0.16, where the
    exact test gives p = 0.06); an average change needs its changed images, weighted as the average weighs
    them, to lean its way."""
    level = (1 - change["confidence"]) / 2
    gain = called == "gain"
    counts = change["changed_per_cell"]
    if stat == "average":
        sizes = [cell["n"] for cell in tables[change["to"]]["cells"]]
        return _average_sign_flip(counts, sizes, gain) <= level
    table = tables[change["from" if gain else "to"]]["cells"]
    worst = min(cell["accuracy"] for cell in table if cell["accuracy"] is not None)
    # Every cell tied for worst must move, so the weakest evidence among them decides.
    return max(sign_test(*((fixed, broken) if gain else (broken, fixed)))
               for cell, (fixed, broken) in zip(table, counts) if cell["accuracy"] == worst) <= level


# Random sign flips behind the average-group test's p-value.
SIGN_FLIPS = 20000


def _average_sign_flip(counts: list[list[int]], sizes: list[int], gain: bool) -> float:
    """One-sided p-value that the changed images move average group accuracy (each cell weighted equally,
    so an image counts 1/n of its cell) the way observed, when each change is as likely either way: a
    sign-flip test, as a pooled count would let a large cell outvote a small one."""
    cells = [(fixed, broken, n) for (fixed, broken), n in zip(counts, sizes) if n and fixed + broken]
    if not cells:
        return 1.0
    direction = 1 if gain else -1
    observed = direction * sum((fixed - broken) / n for fixed, broken, n in cells)
    rng = np.random.default_rng(0)
    null = sum((2 * rng.binomial(fixed + broken, 0.5, SIGN_FLIPS) - (fixed + broken)) / n
               for fixed, broken, n in cells) * direction
    return float((1 + np.count_nonzero(null >= observed - 1e-12)) / (SIGN_FLIPS + 1))


def describe_change(change: dict, tables: dict[str, dict], confidence: float, titles: dict = KIND_TITLES,
                    stat: str = "worst") -> str:
    """One line: the worst-group (or `stat="average"`) change of a step, its interval, and whether test-set
    noise explains it."""
    delta = tables[change["to"]][stat] - tables[change["from"]][stat]
    lo, hi = change[f"{stat}_interval"]
    called = change_verdict(change, tables, stat)
    verdict = {
        "gain": "a real gain", "loss": "a real loss",
        "noise": ("too few images changed to tell from test-set noise" if lo > 0 or hi < 0
                  else "within test-set noise"),
        "too few": f"too few images in the smallest cell (under {MIN_CELL_FOR_VERDICT}) to tell from noise",
    }[called]
    to, of = (titles.get(k, k) for k in (change["to"], change["from"]))
    return (f"{stat} group, {to} vs {of}: {delta:+.3f} "
            f"({100 * confidence:.0f}% CI {lo:+.3f} to {hi:+.3f}, {verdict})")


def _step_loss(tables: dict[str, dict], intervals: dict, before: str, after: str) -> tuple[str, str] | None:
    """(which accuracy, the description of the step before -> after) when it lowers worst-group or average
    group accuracy beyond test-set noise: a step can lift the worst cell a little while costing every other.

    Only a loss the paired interval puts wholly below zero counts: a step judged on a change the
    test set cannot resolve would be chosen by noise. An average loss beside a real worst-group gain is the
    trade removing a shortcut makes (the cells it carried lose it), not a fault.
    """
    change = step_change(intervals, before, after)
    if change is None:
        return None
    worst = change_verdict(change, tables, "worst")
    for stat in ("worst",) if worst == "gain" else ("worst", "average"):
        if change_verdict(change, tables, stat) == "loss":
            name = "worst-group" if stat == "worst" else "average group"
            return name, describe_change(change, tables, intervals["confidence"], stat=stat)
    return None


def step_change(intervals: dict, before: str, after: str) -> dict | None:
    """The step before -> after among `bootstrap_intervals`' changes, or None."""
    return next((c for c in intervals.get("changes", []) if (c["from"], c["to"]) == (before, after)), None)


# Said of a loss measured on the guard's own flag groups, where the test set has no artefact labels.
BY_FLAG_GROUPS = ", measured on the guard's own flag groups (the test set has no artefact labels)"


def dfr_loss_warning(tables: dict[str, dict], intervals: dict, by_flag: bool = False) -> str | None:
    """A warning when the retrained head lowers worst-group or average group accuracy beyond test-set noise,
    with the fix; `by_flag`: the groups are the guard's own flags."""
    loss = _step_loss(tables, intervals, "ablated", "dfr")
    return loss and (f"the DFR head lowers {loss[0]} accuracy on this test set ({loss[1]}"
                     f"{BY_FLAG_GROUPS if by_flag else ''}); ship the ablated prediction instead: "
                     "`edgeshort export --no-dfr` (ExportOptions(dfr=False))")


# A (class, group) cell a step lowers by at least this much, with its changed images beyond chance, is named
# even where worst-group and average accuracy do not show it: the class may be the one that matters clinically.
CELL_LOSS_DROP = 0.10
CELL_LOSS_P_VALUE = 0.01


def cell_losses(tables: dict[str, dict], intervals: dict, before: str, after: str) -> list[dict]:
    """The cells the step before -> after lowers by CELL_LOSS_DROP or more, where its changed images break
    more than they fix beyond chance (exact sign test): class, group, accuracy before and after, broken, fixed."""
    change = step_change(intervals, before, after)
    if change is None or "changed_per_cell" not in change:
        return []
    lost = []
    for cell_before, cell_after, (fixed, broken) in zip(tables[before]["cells"], tables[after]["cells"],
                                                         change["changed_per_cell"]):
        if cell_before["accuracy"] is None or cell_after["accuracy"] is None:
            continue
        if (cell_before["accuracy"] - cell_after["accuracy"] >= CELL_LOSS_DROP
                and sign_test(broken, fixed) <= CELL_LOSS_P_VALUE):
            lost.append({"class": cell_before["class"], "group": cell_before["group"], "before": cell_before["accuracy"],
                         "after": cell_after["accuracy"], "broken": broken, "fixed": fixed})
    return lost


def _cells_said(cells: list[dict]) -> str:
    return ", ".join(f"{c['class']} / {c['group']} from {c['before']:.3f} to {c['after']:.3f} ({c['broken']} broken, "
                     f"{c['fixed']} fixed)" for c in cells)


def guard_cell_warning(tables: dict[str, dict], intervals: dict) -> str | None:
    """A warning when masking collapses a cell that worst-group and average accuracy let pass: the model leans on
    the artefact there and has little else (a 3-class walkthrough: nevus with a ruler, 1.000 to 0.200), with
    what the DFR head gives there, since leaving it out ships the ablated prediction."""
    cells = cell_losses(tables, intervals, "original", "ablated")
    if not cells:
        return None
    warning = (f"masking lowers {_cells_said(cells)}: the flags there mask what the model needs, an artefact it "
               "leans on for want of anything else, or part of the object (see the flag pictures)")
    if "dfr" in tables:
        index = {(c["class"], c["group"]): c["accuracy"] for c in tables["dfr"]["cells"]}
        repaired = ", ".join(f"{index[(c['class'], c['group'])]:.3f}" for c in cells)
        warning += (f"; the DFR head, the bundle's default final label, gives {repaired} there (`edgeshort export "
                    "--no-dfr` would ship the masked prediction)")
    return warning


def dfr_cell_warning(tables: dict[str, dict], intervals: dict) -> str | None:
    """A warning when the retrained head lowers a cell beyond chance, whatever it does to the worst group: the
    trade DFR makes, which may cost the class that matters (a 3-class walkthrough: clean melanoma 0.973 to 0.853)."""
    cells = cell_losses(tables, intervals, "ablated", "dfr")
    return cells and (f"the DFR head lowers {_cells_said(cells)}: weigh that against its gain before shipping it, "
                      "or ship the ablated prediction (`edgeshort export --no-dfr`)") or None


def one_group_note(with_artefact: bool) -> str:
    """What a test set whose images all carry the artefact, or all lack it, cannot show."""
    unseen = "cost on clean" if with_artefact else "gain on artefact"
    return (f"every test image {'carries' if with_artefact else 'lacks'} the artefact, by its labels: this test set "
            f"shows the guard's effect on such images only, not its {unseen} images, so it cannot settle the run's "
            "verdict; a test set with both kinds can")


def guard_loss_warning(tables: dict[str, dict], intervals: dict, by_flag: bool = False,
                       one_group: bool | None = None) -> str | None:
    """A warning when masking the flagged tokens lowers worst-group or average group accuracy beyond test-set
    noise; `by_flag`: the groups are the guard's own flags; `one_group`: every test image carries the artefact
    (True) or none does (False), so a loss is what the guard costs on such images, to weigh against its gain."""
    loss = _step_loss(tables, intervals, "original", "ablated")
    if loss and one_group is False:
        return (f"the guard lowers {loss[0]} accuracy on these test images without the artefact ({loss[1]}): what its "
                "flags cost on clean images. Weigh it against the guard's gain on images with the artefact (a test "
                "set with both kinds measures both), and look at the flag pictures for what it masks")
    return loss and (f"the guard lowers {loss[0]} accuracy on this test set ({loss[1]}"
                     f"{BY_FLAG_GROUPS if by_flag else ''}): its flags mask what the model needs, or an artefact "
                     "the model does not rely on. Check the key heatmaps and the flag pictures, and do not ship this "
                     "bundle as it is")


def format_table(results: dict[str, dict], intervals: dict | None = None) -> str:
    """A plain-text table: one row per (class, group) cell, one column per prediction kind.

    With `intervals` (from `bootstrap_intervals`) it adds the worst group's confidence interval
    and a line per step saying whether its change exceeds test-set noise.
    """
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

    def summary_row(label: str, values: list) -> str:
        return f"{label:<32}" + "".join(f"{'-' if v is None else f'{v:.3f}':>12}" for v in values)

    for label, key in (("average", "average"), ("worst group", "worst")):
        lines.append(summary_row(label, [results[k][key] for k in kinds]))
    if intervals:
        label = f"{100 * intervals['confidence']:.0f}% CI"
        lines.append(f"{'  ' + label:<32}" + "".join(
            f"{'{:.3f}-{:.3f}'.format(*intervals['kinds'][k]['worst']):>12}" for k in kinds))
    for name in first.get("classes") or {}:  # each class over all its images: its recall
        lines.append(summary_row(f"recall {name}", [results[k]["classes"][name] for k in kinds]))
    if intervals:
        lines += [describe_change(change, results, intervals["confidence"]) for change in intervals["changes"]]
    return "\n".join(lines)

"""Deep feature reweighting: retrain only the last layer on group-balanced, masked features.

Groups are (shortcut present by the KNN flags) x (class), found without group labels. The
default follows Kirichenko et al.: L1-regularised logistic regression on standardised
features, the strength C chosen by worst-group accuracy on one half of the held-out set
(trained on the other half) averaged over several random halvings, then weights averaged over
several balanced subsamples of the whole set. `adam` is the seed notebook's variant (a linear layer trained with Adam).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeshort._progress import progress_bar
from edgeshort.errors import InputError

C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
# Iterations a fit may take: saga (three or more classes) needed up to about 10,000 on a 3-class walkthrough's
# weakest regularisations, at 1.3 s more for the whole DFR stage; liblinear (two) converges far sooner.
DFR_MAX_ITER = 10000
# Random halvings of the validation set the regularisation strength C is judged on.
DFR_TUNING_SPLITS = 5
# Below this many images in its smallest balanced group, a DFR head is fitted on too few to trust.
DFR_MIN_GROUP = 10


@dataclass
class LinearHead:
    """A classification layer as arrays: logits = features @ weight.T + bias."""

    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)
    info: dict

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight.T + self.bias

    def to_torch(self):
        import torch

        layer = torch.nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(self.weight))
            layer.bias.copy_(torch.from_numpy(self.bias))
        return layer.eval()


def dfr_groups(labels: np.ndarray, present: np.ndarray, num_classes: int) -> np.ndarray:
    """Group id = class * 2 + shortcut present."""
    return labels * 2 + present.astype(np.int64)


def balanced_indices(groups: np.ndarray, rng: np.random.Generator, usable: list[int]) -> np.ndarray:
    """A subsample with the same number of samples from each usable group (the smallest's size)."""
    size = min(int((groups == g).sum()) for g in usable)
    return np.concatenate([rng.choice(np.flatnonzero(groups == g), size, replace=False) for g in usable])


def _fit_logreg(x, y, c, seed):
    """L1 logistic regression, and whether it converged within `DFR_MAX_ITER` iterations."""
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    # scikit-learn 1.8 spells the L1 penalty `l1_ratio=1` and deprecates `penalty`.
    modern = tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 8)
    l1 = {"l1_ratio": 1.0} if modern else {"penalty": "l1"}
    solver = "liblinear" if len(np.unique(y)) == 2 else "saga"
    model = LogisticRegression(C=c, solver=solver, max_iter=DFR_MAX_ITER, random_state=seed, **l1)
    # Caught and summarised once per DFR fit: scikit-learn would warn once per C and subsample.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    return model, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _as_multiclass(coef: np.ndarray, intercept: np.ndarray, num_classes: int):
    """scikit-learn's binary model has one row; as a C-logit head, split it symmetrically."""
    if coef.shape[0] == 1 and num_classes == 2:
        return np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    return coef, intercept


def _worst_group_accuracy(pred, labels, groups, usable):
    return min(float((pred[groups == g] == labels[groups == g]).mean()) for g in usable)


def usable_groups(labels: np.ndarray, present: np.ndarray, num_classes: int, min_size: int = 2) -> list[int]:
    groups = dfr_groups(labels, present, num_classes)
    usable = [g for g in range(2 * num_classes) if (groups == g).sum() >= min_size]
    classes = {g // 2 for g in usable}
    if len(classes) < num_classes:
        missing = sorted(set(range(num_classes)) - classes)
        sizes = {c: [int((groups == 2 * c + flag).sum()) for flag in (0, 1)] for c in missing}
        raise InputError(
            f"DFR needs, for every class, a group (shortcut found / not found) of at least {min_size} validation "
            f"images; classes {missing} have groups of {sizes} images. Add validation images of those classes "
            "or skip DFR (dfr='none', --dfr none)"
        )
    return usable


def dfr_fit_warnings(head: LinearHead, class_names: Sequence[str]) -> list[str]:
    """The run's warnings about how its DFR head was fitted: groups without images, fits that did not
    converge, groups too small to trust (fewer than DFR_MIN_GROUP images each)."""
    found = []
    num_classes = len(class_names)
    groups, size = head.info["groups"], head.info["group_size"]
    if len(groups) < 2 * num_classes:
        empty = [f"{class_names[g // 2]!r} with {'a' if g % 2 else 'no'} shortcut found" for g in range(2 * num_classes)
                 if g not in groups]
        found.append(f"DFR: fewer than two validation images of {', '.join(empty)}, so its balancing covers the "
                     f"other {len(groups)} of the {2 * num_classes} (class, shortcut found / not found) groups alone")
    if head.info.get("method") == "logreg" and "selection_wga" in head.info and head.info["selection_wga"] is None:
        found.append(f"DFR: none of {DFR_TUNING_SPLITS} random halvings of the validation images held every class "
                     "on both sides, so the regularisation was not chosen by worst-group accuracy: the head uses the "
                     f"weakest, C = {head.info['C']:g}. Add validation images of the rarest (class, shortcut found / not "
                     "found) groups")
    unconverged = head.info.get("unconverged_fits")
    if unconverged:
        found.append(f"DFR: {unconverged} logistic-regression fits stopped at the {DFR_MAX_ITER}-iteration limit "
                     "before converging; the head averages their last iterates, and its worst-group accuracy on a "
                     "test set (--eval) shows whether that cost anything")
    if size < DFR_MIN_GROUP:
        found.append(
            f"DFR balanced its (class, shortcut found / not found) groups at {size} validation images each, fewer "
            f"than {DFR_MIN_GROUP}: its head is fitted on {size * len(groups)} images per subsample and may be "
            "noise. Add validation images to the smallest group (often a class the guard rarely flags), or leave "
            "DFR out (--dfr none at detect, --no-dfr at export)")
    return found


def fit_dfr_logreg(
    features: np.ndarray, labels: np.ndarray, present: np.ndarray, num_classes: int,
    subsamples: int = 10, seed: int = 0, progress: bool = False,
) -> LinearHead:
    groups = dfr_groups(labels, present, num_classes)
    usable = usable_groups(labels, present, num_classes)
    rng = np.random.default_rng(seed)
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    # Choose C by worst-group accuracy: on each of several random halvings, every C is trained on one
    # balanced subsample of one half and judged on the other; the mean over halvings decides.
    # One subsample per C, or one halving, would let subsample noise (as large as the gaps between Cs) choose.
    fits: list[tuple[float, bool]] = []  # (C, converged)
    judged = {c: [] for c in C_GRID}
    for _ in progress_bar(range(DFR_TUNING_SPLITS), progress, "DFR: choosing the regularisation", DFR_TUNING_SPLITS):
        order = rng.permutation(len(x))
        half_a, half_b = order[: len(x) // 2], order[len(x) // 2 :]
        usable_a = [g for g in usable if (groups[half_a] == g).sum() >= 1]
        # A group of one image would decide the worst group by itself, at 0 or 1.
        usable_b = [g for g in usable if (groups[half_b] == g).sum() >= 2]
        if len({g // 2 for g in usable_a}) < num_classes or not usable_b:
            continue
        idx = half_a[balanced_indices(groups[half_a], rng, usable_a)]
        for c in C_GRID:
            model, converged = _fit_logreg(x[idx], labels[idx], c, seed)
            fits.append((c, converged))
            judged[c].append(_worst_group_accuracy(model.predict(x[half_b]), labels[half_b], groups[half_b], usable_b))
    best_c, best_wga = C_GRID[0], None  # None: no halving could judge any C (see dfr_fit_warnings)
    for c in C_GRID:  # the first best wins: the weakest regularisation among equals
        if judged[c] and (best_wga is None or float(np.mean(judged[c])) > best_wga):
            best_c, best_wga = c, float(np.mean(judged[c]))
    coefs, intercepts = [], []
    for _ in progress_bar(range(subsamples), progress, "DFR: fitting the head on balanced subsamples", subsamples):
        idx = balanced_indices(groups, rng, usable)
        model, converged = _fit_logreg(x[idx], labels[idx], best_c, seed)
        fits.append((best_c, converged))
        coef, intercept = _as_multiclass(model.coef_, model.intercept_, num_classes)
        coefs.append(coef)
        intercepts.append(intercept)
    coef, intercept = np.mean(coefs, 0), np.mean(intercepts, 0)
    unconverged = [c for c, converged in fits if not converged]
    # Fold the standardisation into the layer, so the head consumes raw features.
    weight = coef / std
    bias = intercept - (coef * (mean / std)).sum(1)
    return LinearHead(
        weight.astype(np.float32), bias.astype(np.float32),
        {"method": "logreg", "C": best_c, "selection_wga": best_wga, "groups": usable,
         "group_size": int(min((groups == g).sum() for g in usable)), "subsamples": subsamples,
         "unconverged_fits": len(unconverged)},
    )


def fit_dfr_adam(
    features: np.ndarray, labels: np.ndarray, present: np.ndarray, num_classes: int,
    initial, epochs: int = 5, lr: float = 1e-3, seed: int = 0,
) -> LinearHead:
    """The seed's variant: start from the model's head, train it with Adam on a balanced subset."""
    import torch
    from torch.nn import functional as F

    groups = dfr_groups(labels, present, num_classes)
    usable = usable_groups(labels, present, num_classes)
    rng = np.random.default_rng(seed)
    idx = balanced_indices(groups, rng, usable)
    head = torch.nn.Linear(initial.in_features, initial.out_features)
    head.load_state_dict(initial.state_dict())
    optimiser = torch.optim.Adam(head.parameters(), lr=lr)
    x, y = torch.from_numpy(features[idx]).float(), torch.from_numpy(labels[idx])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).split(16):
            loss = F.cross_entropy(head(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return LinearHead(
        head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy(),
        {"method": "adam", "epochs": epochs, "lr": lr, "groups": usable, "group_size": int(len(idx) // len(usable))},
    )

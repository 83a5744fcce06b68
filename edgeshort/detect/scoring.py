"""The cluster score of the seed (paper section 3.3.1): homogeneity + per-class Brier scores.

Generalised to any number of classes. The notebook scores clusters against the patch labels
it says are only for evaluation; the paper's intent, followed here, is to score them against
the class labels. The notebook also returns 0 for a cluster that lacks a class; here such a
cluster keeps the evidence it has and its missing "other class" term counts 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgeshort.errors import InputError


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def brier_per_class(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Mean multi-class Brier score of the samples of each true class (None where a class is absent)."""
    onehot = np.eye(num_classes)[labels]
    per_sample = ((probs - onehot) ** 2).sum(axis=1)
    return [float(per_sample[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]


def homogeneity(labels: np.ndarray, num_classes: int) -> tuple[float, int]:
    """Share of the majority class, and that class."""
    counts = np.bincount(labels, minlength=num_classes)
    return float(counts.max() / counts.sum()), int(counts.argmax())


@dataclass(frozen=True)
class ClusterScore:
    cluster: int
    size: int
    homogeneity: float
    majority_class: int
    brier: list  # per class, None where absent
    dominant_class: int  # the class with the lowest Brier score
    brier_dominant: float
    brier_other: float | None  # mean Brier of the other classes present
    score: float

    def to_dict(self) -> dict:
        return asdict(self)


def score_cluster(
    probs: np.ndarray, labels: np.ndarray, num_classes: int, cluster: int = 0,
    lambdas: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
) -> ClusterScore:
    """score = l1*homogeneity + l2*exp(-Brier_dominant) + l3*(1 - exp(-Brier_other))."""
    if len(labels) == 0:
        raise InputError(f"cluster {cluster} is empty; use fewer clusters")
    h, majority = homogeneity(labels, num_classes)
    brier = brier_per_class(probs, labels, num_classes)
    present = [c for c in range(num_classes) if brier[c] is not None]
    dominant = min(present, key=lambda c: brier[c])
    others = [brier[c] for c in present if c != dominant]
    brier_other = float(np.mean(others)) if others else None
    l1, l2, l3 = lambdas
    score = l1 * h + l2 * np.exp(-brier[dominant]) + (l3 * (1 - np.exp(-brier_other)) if others else 0.0)
    return ClusterScore(
        cluster=cluster, size=int(len(labels)), homogeneity=h, majority_class=majority, brier=brier,
        dominant_class=int(dominant), brier_dominant=float(brier[dominant]), brier_other=brier_other,
        score=float(score),
    )


def score_clusters(
    probs: np.ndarray, labels: np.ndarray, assignments: np.ndarray, num_classes: int,
    lambdas: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
) -> list[ClusterScore]:
    """One score per cluster id 0..k-1; the highest is the shortcut cluster, unless its tokens do not stand
    apart from the others' while a lower-ranked cluster's do (the detector's `_distinct_cluster`)."""
    k = int(assignments.max()) + 1
    return [
        score_cluster(probs[assignments == c], labels[assignments == c], num_classes, c, lambdas) for c in range(k)
    ]

"""Per-cluster Clever Hans assessment.

A cluster is suspicious when it is a *minority* of its class (a shortcut rarely explains every
sample), *label-pure* (the pattern goes with one label), and its relevance is *localised
differently* from the rest of that class: markedly more concentrated, or displaced to a place
the rest does not look at while its members agree on that place. Each flag names the cluster,
the reasons in words, and the numbers behind them.

Risk, when labels were given and clustering was global:
  high    pure, minority, relevance >= `strong_concentration` x more concentrated
  medium  pure, minority, >= `moderate_concentration` x more concentrated, or displaced
          with its members agreeing on the place
  low     minority, >= `moderate_concentration` x more concentrated, but not label-pure
Inside one class (`per_class=True`, where purity says nothing):
  high    strongly concentrated, displaced and location-consistent
  medium  moderately concentrated, displaced and location-consistent
  low     moderately concentrated (in the place the rest of the class looks: maybe the object)
Without labels:
  medium  strongly concentrated and location-consistent
  low     moderately concentrated
Displacement alone does not flag a mixed-label or label-free cluster: spectral clustering
splits any spread of object positions into location clusters, each displaced from the rest.
Without labels the level never goes above medium; the report says labels would sharpen it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgeshort.spray.focus import centroid_scatter


@dataclass(frozen=True)
class CleverHansCriteria:
    """Thresholds of the per-cluster assessment (defaults tuned on synthetic sets, see docs/spray.md)."""

    max_class_share: float = 0.5  # a cluster holding at least this share of its class is "the class"
    min_purity: float = 0.9
    strong_concentration: float = 2.0  # reference hot area / cluster hot area (medians)
    moderate_concentration: float = 1.5
    min_displacement: float = 0.2  # centroid distance in image-side units
    max_relative_scatter: float = 0.5  # cluster centroid scatter / reference centroid scatter
    min_cluster_size: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


def _plain(value):
    """numpy scalars -> Python, so reports serialise as JSON."""
    return value.item() if isinstance(value, np.generic) else value


def assess_cluster(
    cluster_id: int,
    members: np.ndarray,
    reference: np.ndarray,
    stats: dict[str, np.ndarray],
    criteria: CleverHansCriteria,
    *,
    purity: float | None,
    majority_label,
    class_share: float,
    class_size: int,
    per_class: bool,
    labels_given: bool,
) -> dict | None:
    """Flag for one cluster (a dict) or None.

    `members` and `reference` are boolean masks over samples; the reference is the rest of the
    cluster's class (or of all samples when there are no labels).
    """
    size = int(members.sum())
    if size < criteria.min_cluster_size or reference.sum() < criteria.min_cluster_size:
        return None
    if class_share >= criteria.max_class_share:
        return None

    area_cluster = float(np.median(stats["hot_area"][members]))
    area_reference = float(np.median(stats["hot_area"][reference]))
    concentration = area_reference / max(area_cluster, 1e-12)
    cy, cx = stats["centroid_y"], stats["centroid_x"]
    centre = np.array([cy[members].mean(), cx[members].mean()])
    centre_ref = np.array([cy[reference].mean(), cx[reference].mean()])
    displacement = float(np.linalg.norm(centre - centre_ref))
    scatter = centroid_scatter(stats, members)
    scatter_ref = centroid_scatter(stats, reference)
    relative_scatter = scatter / max(scatter_ref, 1e-12)

    consistent = relative_scatter <= criteria.max_relative_scatter
    strong = concentration >= criteria.strong_concentration
    moderate = concentration >= criteria.moderate_concentration
    displaced = displacement >= criteria.min_displacement and consistent
    pure = purity is not None and purity >= criteria.min_purity
    purity_informative = labels_given and not per_class

    # Displacement alone never raises a mixed-label or label-free cluster: spectral clustering
    # splits any spread of object positions into location clusters, each displaced from the rest.
    if purity_informative:
        if pure and strong:
            level = "high"
        elif pure and (moderate or displaced):
            level = "medium"
        elif moderate:
            level = "low"
        else:
            level = "none"
    elif per_class:
        # Within a class a tight focus on the object itself (a small lesion) is concentrated too: only a
        # focus somewhere the rest of the class does not look rises above low.
        if strong and displaced:
            level = "high"
        elif moderate and displaced:
            level = "medium"
        elif moderate:
            level = "low"
        else:
            level = "none"
    else:
        if strong and consistent:
            level = "medium"
        elif moderate:
            level = "low"
        else:
            level = "none"
    if level == "none":
        return None

    scope = f"class {majority_label}" if (labels_given and majority_label is not None) else "the set"
    rest = f"the rest of {scope}"
    reasons = [f"holds {size} samples, {class_share:.0%} of {scope} (a minority)"]
    if purity is not None and not per_class:
        reasons.append(
            f"{purity:.0%} of its samples have label {majority_label}"
            + (" (label-pure)" if pure else " (not label-pure)")
        )
    if moderate:
        reasons.append(
            f"relevance {concentration:.1f}x more concentrated than {rest} "
            f"(hot area {area_cluster:.1%} vs {area_reference:.1%} of the image)"
        )
    if displacement >= criteria.min_displacement:
        reasons.append(
            f"looks at ({centre[0]:.2f}, {centre[1]:.2f}) (y, x), {displacement:.2f} of the image side away "
            f"from {rest} at ({centre_ref[0]:.2f}, {centre_ref[1]:.2f})"
        )
    if consistent:
        reasons.append(
            f"its samples agree on where to look (centroid scatter {scatter:.3f} vs {scatter_ref:.3f} in {rest})"
        )
    if per_class and displacement < criteria.min_displacement:
        reasons.append(f"it looks where {rest} looks, so its focus may be the object itself")
    return {
        "cluster_id": int(cluster_id),
        "risk_level": level,
        "reasons": reasons,
        "evidence": {
            "size": size,
            "class_share": float(class_share),
            "class_size": int(class_size),
            "purity": None if purity is None else float(purity),
            "majority_label": _plain(majority_label),
            "concentration_ratio": float(concentration),
            "hot_area": area_cluster,
            "reference_hot_area": area_reference,
            "effective_area": float(np.median(stats["effective_area"][members])),
            "reference_effective_area": float(np.median(stats["effective_area"][reference])),
            "displacement": displacement,
            "centroid": [float(centre[0]), float(centre[1])],
            "reference_centroid": [float(centre_ref[0]), float(centre_ref[1])],
            "centroid_scatter": scatter,
            "reference_centroid_scatter": scatter_ref,
        },
    }

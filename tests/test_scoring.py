"""The cluster score against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeshort.detect.scoring import brier_per_class, homogeneity, score_cluster, score_clusters
from edgeshort.errors import InputError


def test_two_class_cluster_matches_hand_computation():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]])
    labels = np.array([0, 0, 1])
    assert brier_per_class(probs, labels, 2) == pytest.approx([0.17, 1.28])
    assert homogeneity(labels, 2) == (pytest.approx(2 / 3), 0)
    s = score_cluster(probs, labels, 2)
    assert s.dominant_class == 0
    assert s.score == pytest.approx((2 / 3 + math.exp(-0.17) + 1 - math.exp(-1.28)) / 3)


def test_three_class_cluster_matches_hand_computation():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8]])
    labels = np.array([0, 1, 2, 2])
    assert brier_per_class(probs, labels, 3) == pytest.approx([0.14, 0.06, 0.15])
    s = score_cluster(probs, labels, 3)
    assert (s.homogeneity, s.majority_class, s.dominant_class) == (pytest.approx(0.5), 2, 1)
    assert s.brier_other == pytest.approx(0.145)
    assert s.score == pytest.approx((0.5 + math.exp(-0.06) + 1 - math.exp(-0.145)) / 3)


def test_cluster_missing_a_class_keeps_its_evidence():
    probs = np.array([[0.9, 0.1], [0.8, 0.2]])
    s = score_cluster(probs, np.array([0, 0]), 2)
    assert s.brier == [pytest.approx(0.05), None]
    assert s.brier_other is None
    assert s.score == pytest.approx((1 + math.exp(-0.05)) / 3)


def test_custom_lambdas_and_cluster_ranking():
    probs = np.array([[0.9, 0.1], [0.95, 0.05], [0.9, 0.1], [0.5, 0.5], [0.4, 0.6], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 0, 1, 1])
    assignments = np.array([0, 0, 0, 1, 1, 1])
    scores = score_clusters(probs, labels, assignments, 2, lambdas=(1.0, 0.0, 0.0))
    assert [s.score for s in scores] == pytest.approx([2 / 3, 2 / 3])
    scores = score_clusters(probs, labels, assignments, 2)
    # Cluster 0: confident and right on its majority, confidently wrong on the other class.
    assert scores[0].score > scores[1].score


def test_empty_cluster_is_an_error():
    with pytest.raises(InputError, match="cluster 3 is empty"):
        score_cluster(np.zeros((0, 2)), np.zeros(0, np.int64), 2, cluster=3)

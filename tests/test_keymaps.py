"""Key heatmaps and the KNN training set: what the artefact's tokens are told apart from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeshort.detect import DetectorConfig, ShortcutDetector
from edgeshort.detect.keymaps import (
    calibrated_positives,
    class_centred,
    cluster_features,
    key_distance_maps,
    knn_training_keys,
    nearest_clean_distance_maps,
)
from edgeshort.errors import InputError
from edgeshort.models.tiny import TinyViT


def _clean_keys(rng, n_images=40, n_patches=3, d=3):
    """Clean images whose tokens are skin (near 0) or, at varying positions, lesion (near 6 on axis 0)."""
    keys = rng.normal(0, 0.1, (n_images, n_patches, d))
    lesion_at = rng.integers(n_patches, size=n_images)
    keys[np.arange(n_images), lesion_at, 0] += 6.0
    return keys


def test_nearest_contrast_cools_lesion_tokens_that_the_mean_contrast_calls_hot():
    rng = np.random.default_rng(0)
    clean = _clean_keys(rng)
    query = np.zeros((1, 3, 3))
    query[0, 1, 0] = 6.0  # a lesion token, like those of clean images
    query[0, 2, 1] = 5.0  # an artefact token, unlike anything clean
    nearest = nearest_clean_distance_maps(query, clean, k=3, seed=0)[0]
    mean = key_distance_maps(query, clean.mean(0))[0]
    assert mean[1] > 3.0 and mean[2] > 3.0  # the seed's contrast: both look anomalous
    assert nearest[1] < 0.5 < 4.0 < nearest[2]  # nearest clean keys: only the artefact does
    assert nearest[0] < 0.5


def test_nearest_contrast_subsamples_a_large_pool_deterministically():
    rng = np.random.default_rng(1)
    clean = rng.normal(size=(300, 100, 2))  # 30,000 keys, above the pool cap
    query = rng.normal(size=(2, 5, 2))
    a = nearest_clean_distance_maps(query, clean, k=5, seed=3)
    b = nearest_clean_distance_maps(query, clean, k=5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 5) and (a >= 0).all()


def test_spread_negatives_cover_the_hot_clean_tokens_closest_leaves_out():
    rng = np.random.default_rng(2)
    keys = rng.normal(size=(4, 10, 2)).astype(np.float32)
    selected = [np.array([0, 1]), np.array([2, 3])]
    maps = [rng.random((2, 10)), np.tile(np.arange(10.0), (2, 1))]
    x_close, y_close = knn_training_keys(keys, selected, maps, 0, count=3, negative_count=4, negatives="closest")
    x_spread, y_spread = knn_training_keys(keys, selected, maps, 0, count=3, negative_count=4, negatives="spread")
    assert (y_close == 0).sum() == (y_spread == 0).sum() == 4 and (y_spread == 1).sum() == 3
    hottest_clean = {tuple(keys[2, 9]), tuple(keys[3, 9])}
    assert not hottest_clean & {tuple(k) for k in x_close[y_close == 0]}
    assert hottest_clean & {tuple(k) for k in x_spread[y_spread == 0]}
    with pytest.raises(InputError, match=r"expected negatives in \('spread', 'closest'\), got 'random'"):
        knn_training_keys(keys, selected, maps, 0, count=3, negatives="random")


def test_seed_contrast_and_negatives_remain_available():
    torch.manual_seed(0)
    model = TinyViT(image_size=32, patch_size=8, dim=32, depth=1, num_heads=2).eval()
    images, labels = torch.randn(12, 3, 32, 32), torch.tensor([0, 1] * 6)
    for heatmap, negatives in (("mean", "closest"), ("nearest", "spread")):
        config = DetectorConfig(num_selected=3, knn_samples=8, heatmap=heatmap, negatives=negatives, progress=False)
        result = ShortcutDetector(config).fit(model, (images, labels))
        assert [h.shape for h in result.heatmaps] == [(len(s), 16) for s in result.selected]
        assert all(np.isfinite(h).all() for h in result.heatmaps)
    with pytest.raises(InputError, match=r"heatmap in \('nearest', 'mean'\), got 'median'"):
        DetectorConfig(heatmap="median")
    with pytest.raises(InputError, match="negatives in"):
        DetectorConfig(negatives="all")


def test_class_centring_lets_a_weaker_artefact_direction_lead_the_clusters():
    rng = np.random.default_rng(0)
    labels, artefact = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    # The class moves the features far along one direction, the artefact less far along another.
    pooled = rng.normal(0, 0.5, (400, 16)).astype(np.float32)
    pooled[:, 0] += 8 * labels
    pooled[:, 1] += 3 * artefact

    def agreement(assignments, truth):  # 1.0 when the clusters are exactly `truth`, either way round
        return max(np.mean(assignments == truth), np.mean(assignments != truth))

    by_class = cluster_features(pooled, 2, 3, seed=0).assignments
    centred = class_centred(pooled, labels)
    by_artefact = cluster_features(centred, 2, 3, seed=0).assignments
    assert agreement(by_class, labels) == 1.0 and agreement(by_class, artefact) < 0.6
    assert agreement(by_artefact, artefact) == 1.0
    for c in (0, 1):
        np.testing.assert_allclose(centred[labels == c].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(centred - pooled, np.where(labels[:, None] == 1, -pooled[labels == 1].mean(0),
                                                          -pooled[labels == 0].mean(0)), atol=1e-5)


def _artefact_keys(rng, clean_images=200, variants=(10.0, 6.0), per_variant=40, tokens=16, d=8):
    """Clean images of N(0, 1) keys, then images carrying one of two artefact variants on 3 tokens."""
    keys = rng.normal(0, 1, (clean_images + per_variant * len(variants), tokens, d)).astype(np.float32)
    variant = np.full(len(keys), -1)
    for v, offset in enumerate(variants):
        images = clean_images + v * per_variant + np.arange(per_variant)
        keys[images, :3, v] += offset  # a strong and a fainter variant, along different directions
        variant[images] = v
    return keys, variant


def test_calibrated_positives_represent_a_fainter_artefact_variant():
    rng = np.random.default_rng(0)
    keys, variant = _artefact_keys(rng)
    assignments = (variant >= 0).astype(np.int64)  # cluster 1: the artefact images
    chosen = calibrated_positives(keys, assignments, cluster=1, count=60, quantile=0.999, k=5, seed=0)
    d = keys.shape[-1]
    strong, faint = chosen.keys[:, 0] > 6, chosen.keys[:, 1] > 3.5
    # Both variants among the positives in about their share (120 tokens each), plain tokens barely.
    assert chosen.candidates >= 240 and chosen.candidates < 240 + 20
    assert strong.sum() >= 20 and faint.sum() >= 20 and (strong | faint).mean() >= 0.9
    # The seed's rule, the hottest tokens by the same heat, takes the strong variant only.
    heat = nearest_clean_distance_maps(keys[assignments == 1], keys[assignments == 0], 5, 0).reshape(-1)
    hottest = keys[assignments == 1].reshape(-1, d)[np.argsort(heat)[-60:]]
    assert (hottest[:, 0] > 6).all()


def test_calibrated_positives_report_a_cluster_without_artefact_tokens():
    rng = np.random.default_rng(1)
    keys = rng.normal(0, 1, (240, 16, 8)).astype(np.float32)  # nothing sets the cluster apart
    assignments = (np.arange(240) >= 200).astype(np.int64)
    chosen = calibrated_positives(keys, assignments, cluster=1, count=60, quantile=0.999, k=5, seed=0)
    assert chosen.candidates < 60 and len(chosen.keys) == 60  # the hottest fill the count
    lone = np.zeros(240, np.int64)
    lone[0] = 1  # one image outside the cluster: no null distribution to calibrate against
    assert calibrated_positives(keys, 1 - lone, cluster=1, count=60, quantile=0.999, k=5, seed=0) is None


def test_positives_are_described_as_drawn():
    from edgeshort.detect.keymaps import describe_positives

    assert describe_positives(5293, 204, 0.999, 0.2411) == (
        "The KNN's positives are spread over the 5,293 shortcut-cluster tokens hotter than 99.9% of held-out clean "
        "tokens (heat 0.241).")
    # Too few tokens pass: the sentence must not claim the positives were spread over them.
    short = describe_positives(12, 163, 0.999, 0.5)
    assert short.startswith("Only 12 shortcut-cluster tokens are hotter") and "the hottest tokens" in short
    assert describe_positives(0, 163, 0.999, 0.5) == (
        "No shortcut-cluster token is hotter than 99.9% of held-out clean tokens (heat 0.500): the 163 KNN positives "
        "are the hottest tokens of the shortcut cluster's images.")


def test_the_guards_tint_builds_its_clean_key_search_once(monkeypatch):
    """predict tints every batch: the nearest-clean-key search is built on the first and reused, with the same
    distances as a search built anew."""
    from edgeshort.detect import keymaps

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(60, 4)).astype(np.float32)
    knn = keymaps.KeyKNN(reference, np.r_[np.zeros(40), np.ones(20)].astype(np.int64), 3)
    built = []
    original = keymaps._nearest_clean_search
    monkeypatch.setattr(keymaps, "_nearest_clean_search", lambda *a, **k: built.append(1) or original(*a, **k))
    batches = [rng.normal(size=(5, 9, 4)).astype(np.float32) for _ in range(3)]
    tints = [keymaps.saliency_distance_maps(b, "nearest", knn, np.zeros((9, 4), np.float32)) for b in batches]
    assert len(built) == 1
    fresh = original(reference[:40], 1, 0, pool_size=None)
    for batch, tint in zip(batches, tints):
        np.testing.assert_array_equal(tint, fresh(batch))

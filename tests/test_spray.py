"""SpRAy detector: planted shortcut groups are isolated and flagged, clean sets are not,
GradCAM heatmaps come out of ViTs and CNNs without changing the model, bad input fails clearly."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from edgeshort.errors import InputError, NotFittedError
from edgeshort.spray.assess import CleverHansCriteria
from edgeshort.spray.choices import risk_rank
from edgeshort.spray.detector import SpRAyDetector
from edgeshort.spray.synthetic import make_spray_heatmaps

N = 600


def best_match(cluster_labels: np.ndarray, planted: np.ndarray) -> tuple[int, float, float]:
    """Cluster that best matches the planted group: (id, purity, recall)."""
    best = (-1, 0.0, 0.0)
    for cid in np.unique(cluster_labels):
        members = cluster_labels == cid
        hits = (members & planted).sum()
        purity, recall = hits / members.sum(), hits / planted.sum()
        if purity * recall > best[1] * best[2]:
            best = (int(cid), float(purity), float(recall))
    return best


def flag_of(detector: SpRAyDetector, cluster_id: int) -> dict | None:
    return next((f for f in detector.clever_hans_["flags"] if f["cluster_id"] == cluster_id), None)


# ---------------------------------------------------------------- planted shortcut groups
@pytest.mark.parametrize(
    ("fraction", "size", "labelled"),
    [
        (0.03, 64, True),
        (0.10, 32, True),
        (0.10, 32, False),
        (0.20, 48, True),
        (0.20, 48, False),
    ],
)
def test_planted_group_is_isolated_and_flagged(fraction: float, size: int, labelled: bool) -> None:
    data = make_spray_heatmaps(N, size, fraction, seed=7)
    detector = SpRAyDetector().fit(data.heatmaps, data.labels if labelled else None)

    cid, purity, recall = best_match(detector.labels_, data.is_artefact)
    assert purity >= 0.9 and recall >= 0.9, (purity, recall)
    flag = flag_of(detector, cid)
    assert flag is not None and risk_rank(flag["risk_level"]) >= risk_rank("medium"), detector.summary()
    assert cid in detector.clever_hans_["flagged_clusters"]
    assert detector.shortcut_detected_ and risk_rank(detector.risk_level_) >= risk_rank("medium")
    # It says why: a concentrated, displaced hot spot; with labels also label-pure.
    assert flag["evidence"]["concentration_ratio"] > 2.0
    assert any("concentrated" in reason for reason in flag["reasons"])
    if labelled:
        assert flag["evidence"]["purity"] >= 0.9 and flag["evidence"]["majority_label"] == 1
    else:
        assert risk_rank(detector.risk_level_) <= risk_rank("medium")
        assert "labels would sharpen" in detector.summary()
    assert f"cluster {cid}" in detector.summary()


@pytest.mark.parametrize("affinity", ["rbf", "knn"])
def test_other_affinities_find_the_group(affinity: str) -> None:
    data = make_spray_heatmaps(N, 32, 0.10, seed=3)
    detector = SpRAyDetector(affinity=affinity).fit(data.heatmaps, data.labels)
    cid, purity, recall = best_match(detector.labels_, data.is_artefact)
    assert purity >= 0.9 and recall >= 0.9
    assert flag_of(detector, cid)["risk_level"] in ("medium", "high")


def test_per_class_clustering_finds_the_group_within_its_class() -> None:
    data = make_spray_heatmaps(N, 32, 0.10, seed=5)
    detector = SpRAyDetector(per_class=True).fit(data.heatmaps, data.labels)
    cid, purity, recall = best_match(detector.labels_, data.is_artefact)
    assert purity >= 0.9 and recall >= 0.9
    assert detector.clusters_[cid]["class"] == 1
    assert flag_of(detector, cid)["risk_level"] in ("medium", "high")
    classes = {c["class"] for c in detector.clusters_}
    assert classes == {0, 1}


def test_per_class_a_tight_focus_where_the_class_looks_stays_low() -> None:
    """A small object explained tightly is concentrated too; within a class only a displaced focus rises."""
    data = make_spray_heatmaps(N, 32, 0.10, corner=(0.5, 0.5), seed=5)
    detector = SpRAyDetector(per_class=True).fit(data.heatmaps, data.labels)
    cid, purity, recall = best_match(detector.labels_, data.is_artefact)
    assert purity >= 0.9 and recall >= 0.9
    assert flag_of(detector, cid)["risk_level"] == "low" and not detector.shortcut_detected_
    assert any("may be the object itself" in reason for reason in flag_of(detector, cid)["reasons"])


@pytest.mark.parametrize(("labelled", "per_class", "affinity"), [(True, False, "cosine"), (False, False, "cosine"),
                                                                  (True, True, "cosine"), (True, False, "rbf")])
def test_clean_sets_get_no_flag_above_low(labelled: bool, per_class: bool, affinity: str) -> None:
    for seed in (11, 12):
        data = make_spray_heatmaps(N, 32, 0.0, seed=seed)
        detector = SpRAyDetector(affinity=affinity, per_class=per_class).fit(
            data.heatmaps, data.labels if labelled else None
        )
        assert risk_rank(detector.risk_level_) <= risk_rank("low"), detector.summary()
        assert not detector.shortcut_detected_


def test_empty_maps_do_not_make_the_rest_of_their_class_look_concentrated() -> None:
    """CAMs that come out empty (all relevance negative) are no reference for focus. Class 0: 60%
    empty maps, the rest a lesion-centred blob; class 1: broad blobs anywhere. Nothing is a shortcut."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]

    def blob(cy, cx, sigma):
        return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))

    maps = np.zeros((400, 32, 32), np.float32)
    labels = np.repeat([0, 1], 200)
    for i in range(120, 200):  # class 0's non-empty 40%: the lesion in the middle
        maps[i] = blob(16 + rng.normal(0, 1), 16 + rng.normal(0, 1), 4)
    for i in range(200, 400):
        maps[i] = blob(*rng.uniform(8, 24, 2), 9)
    detector = SpRAyDetector().fit(maps, labels)
    assert risk_rank(detector.risk_level_) <= risk_rank("low"), detector.summary()


def test_eigengap_never_exceeds_max_clusters() -> None:
    data = make_spray_heatmaps(300, 32, 0.1, seed=2)
    for max_clusters in (2, 3, 5):
        detector = SpRAyDetector(cluster_selection="eigengap", max_clusters=max_clusters).fit(data.heatmaps)
        assert 2 <= detector.n_clusters_ <= max_clusters
    fixed = SpRAyDetector(cluster_selection="fixed", n_clusters=4).fit(data.heatmaps)
    assert fixed.n_clusters_ == 4 and set(np.unique(fixed.labels_)) == {0, 1, 2, 3}
    assert "4 clusters (fixed)" in SpRAyDetector(n_clusters=4).fit(data.heatmaps).summary()  # auto with a count
    assert "clusters (eigengap)" in SpRAyDetector().fit(data.heatmaps).summary()


def test_eigengap_rule() -> None:
    from edgeshort.spray.spectral import eigengap_clusters

    spectrum = np.array([0.0, 0.001, 0.002, 0.5, 0.55, 0.6, 0.9, 0.95, 0.97])
    assert eigengap_clusters(spectrum, max_clusters=8) == 3
    assert eigengap_clusters(spectrum, max_clusters=2) == 2
    assert eigengap_clusters(np.array([0.0, 0.1, 0.2, 0.3, 0.4, 2.0]), max_clusters=3) <= 3


def test_sparse_graph_with_projection_path() -> None:
    """Above the dense limit rbf switches to the kNN graph; the kNN search projects when asked."""
    from edgeshort.spray.spectral import knn_search

    data = make_spray_heatmaps(N, 32, 0.1, seed=4)
    detector = SpRAyDetector(affinity="rbf", dense_max_samples=100).fit(data.heatmaps, data.labels)
    assert detector.spectral_runs_["all"].graph == "knn"
    cid, purity, recall = best_match(detector.labels_, data.is_artefact)
    assert purity >= 0.9 and recall >= 0.9

    from edgeshort.spray.preprocess import normalise, remove_floor

    features = normalise(remove_floor(data.heatmaps))  # 600 x 1024
    exact, _ = knn_search(features, 10, project_above=10_000)
    projected, _ = knn_search(features, 10, project_above=0, projection_dims=64)
    shared = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, projected)])
    assert shared > 0.8, shared
    assert not (exact == np.arange(N)[:, None]).any()  # never its own neighbour


def test_sampled_top_k_is_exact() -> None:
    from edgeshort.spray.spectral import _top_k

    rng = np.random.default_rng(0)
    block = rng.normal(size=(40, 9000)).astype(np.float32)
    block[:5, :200] = 3.0  # ties and a dense top for some rows
    columns = np.sort(rng.choice(9000, 1024, replace=False))
    for sample in (None, columns):
        cols, values = _top_k(block, 12, sample)
        np.testing.assert_array_equal(values, -np.sort(-block, axis=1)[:, :12])
        np.testing.assert_array_equal(np.take_along_axis(block, cols, axis=1), values)


# ---------------------------------------------------------------- preprocessing and focus
def test_area_downsampling_keeps_mass_and_small_hot_spots() -> None:
    from edgeshort.spray.preprocess import downsample

    maps = np.zeros((2, 64, 48), dtype=np.float32)
    maps[0, 5, 7] = 1.0  # one hot pixel: point sampling could miss it entirely
    maps[1] = np.random.default_rng(0).random((64, 48))
    small = downsample(maps, 32)
    assert small.shape == (2, 32, 24)
    np.testing.assert_allclose(small.mean(axis=(1, 2)), maps.mean(axis=(1, 2)), rtol=1e-5)
    assert small[0, 2, 3] == pytest.approx(0.25)
    assert downsample(maps, 100).shape == maps.shape  # never upsampled


def test_focus_statistics_separate_a_hot_spot_from_a_blob() -> None:
    from edgeshort.spray.focus import sample_focus

    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    blob = np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / (2 * 0.15**2))
    spot = np.zeros((32, 32))
    spot[3, 28] = 1.0
    stats = sample_focus(np.stack([blob, spot]))
    assert stats["hot_area"][1] < stats["hot_area"][0] / 10
    assert stats["gini"][1] > stats["gini"][0] and stats["top_mass"][1] == pytest.approx(1.0)
    assert stats["centroid_y"][1] == pytest.approx(3.5 / 32) and stats["centroid_x"][1] == pytest.approx(28.5 / 32)
    assert stats["centroid_y"][0] == pytest.approx(0.5, abs=0.02)


# ---------------------------------------------------------------- report, summary, PNG
def test_report_is_json_with_the_documented_layout(tmp_path) -> None:
    data = make_spray_heatmaps(200, 40, 0.1, seed=1)
    detector = SpRAyDetector().fit(data.heatmaps, data.labels)
    report = detector.get_report()
    text = json.dumps(report)
    assert json.loads(text)["method"] == "spray"
    for key in ("method", "shortcut_detected", "risk_level", "metrics", "metadata", "report"):
        assert key in report
    for key in ("clusters", "clever_hans", "representative_heatmaps"):
        assert key in report["report"]
    assert report["risk_level"] in ("none", "low", "medium", "high")
    assert len(report["report"]["clusters"]) == detector.n_clusters_
    # "Flagged" means at medium risk or above, in the metric as in clever_hans.flagged_clusters: a cluster
    # that cannot be pure enough is a low-risk flag, not a flagged cluster.
    assert report["metrics"]["n_flagged_clusters"] == len(report["report"]["clever_hans"]["flagged_clusters"]) >= 1
    lenient = SpRAyDetector(criteria=CleverHansCriteria(min_purity=1.01)).fit(data.heatmaps, data.labels).get_report()
    assert [f["risk_level"] for f in lenient["report"]["clever_hans"]["flags"]] == ["low"]
    assert lenient["metrics"]["n_flagged_clusters"] == 0
    for cluster in report["report"]["clusters"]:
        for key in ("cluster_id", "size", "fraction", "label_purity", "majority_label", "focus", "risk_level"):
            assert key in cluster
    heatmaps = report["report"]["representative_heatmaps"]
    assert set(heatmaps) == {str(c) for c in range(detector.n_clusters_)}
    assert np.asarray(heatmaps["0"]).shape == tuple(report["metadata"]["processed_shape"]) == (32, 32)
    full = detector.get_report(full_resolution=True)["report"]["representative_heatmaps"]
    assert np.asarray(full["0"]).shape == (40, 40)
    assert detector.representative_heatmaps_[0].shape == (40, 40)

    summary = detector.summary()
    assert isinstance(summary, str) and len(summary.splitlines()) > detector.n_clusters_

    from PIL import Image

    path = detector.save_representative_heatmaps(tmp_path / "grid.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.width > 100


def test_estimator_contract() -> None:
    from sklearn.base import clone

    detector = SpRAyDetector(affinity="rbf", n_clusters=3, downsample_size=16)
    assert detector.get_params()["affinity"] == "rbf"
    assert not [name for name in vars(detector) if name.endswith("_")]
    for method in (detector.get_report, detector.summary):
        with pytest.raises(NotFittedError, match="fit"):
            method()
    with pytest.raises(NotFittedError):
        detector.save_representative_heatmaps("unused.png")
    data = make_spray_heatmaps(60, 16, 0.1, seed=0)
    assert detector.fit(data.heatmaps) is detector
    assert not [name for name in vars(clone(detector)) if name.endswith("_")]


def test_heatmap_generator_callable_and_torch_heatmaps() -> None:
    data = make_spray_heatmaps(120, 24, 0.1, seed=6)
    inputs = np.arange(120)

    def generator(batch):
        return data.heatmaps[batch]

    detector = SpRAyDetector(heatmap_generator=generator).fit(inputs=inputs, labels=data.labels)
    assert detector.heatmap_source_ == "generator:generator"
    assert detector.labels_.shape == (120,)

    torch = pytest.importorskip("torch")
    from_tensor = SpRAyDetector().fit(torch.from_numpy(data.heatmaps), data.labels)
    np.testing.assert_array_equal(from_tensor.labels_, detector.labels_)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heatmaps": np.full((10, 8, 8), np.nan, dtype=np.float32)}, r"expected finite heatmaps, got NaN"),
        ({"heatmaps": np.ones((10, 8), dtype=np.float32)}, r"expected heatmaps of shape \(N, H, W\), got shape"),
        ({"heatmaps": np.ones((10, 1, 8, 8), dtype=np.float32)}, r"squeeze the channel axis"),
        ({"heatmaps": np.random.rand(10, 8, 8), "labels": np.zeros(9)}, r"expected labels of shape \(10,\).*got"),
        ({"heatmaps": np.random.rand(2, 8, 8)}, r"expected at least 3 heatmaps, got 2"),
        ({"heatmaps": np.zeros((10, 8, 8))}, r"expected heatmaps with some positive relevance"),
        ({}, r"expected heatmaps=\(N, H, W\) or inputs"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        SpRAyDetector().fit(**kwargs)


def test_fewer_samples_than_clusters() -> None:
    with pytest.raises(InputError, match=r"expected at least n_clusters=6 heatmaps, got 5; do"):
        SpRAyDetector(cluster_selection="fixed", n_clusters=6).fit(np.random.rand(5, 8, 8))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"affinity": "euclid"}, r"expected affinity in .*got 'euclid'"),
        ({"cluster_selection": "fixed"}, r"expected n_clusters with cluster_selection 'fixed', got none"),
        ({"cluster_selection": "eigengap", "n_clusters": 3}, r"expected no n_clusters with cluster_selection 'eigengap'"),
        ({"max_clusters": 1}, r"expected max_clusters to be an int >= 2, got 1"),
        ({"n_clusters": 1}, r"expected n_clusters to be an int >= 2 or None, got 1"),
        ({"per_class": True}, r"expected labels with per_class=True, got None"),
    ],
)
def test_bad_parameters_fail_in_fit(params: dict, message: str) -> None:
    detector = SpRAyDetector(**params)  # __init__ only stores
    with pytest.raises(InputError, match=message):
        detector.fit(np.random.rand(20, 8, 8))


# ---------------------------------------------------------------- GradCAM on real models
torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_grad_cam")


class SmallCNN(torch.nn.Module):
    def __init__(self, output: str = "tensor") -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, padding=1, stride=2),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(),
        )
        self.dropout = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(16, 3)
        self.output = output

    def forward(self, x):
        logits = self.fc(self.dropout(self.features(x).mean(dim=(2, 3))))
        if self.output == "tuple":
            return (x.mean(), logits)
        if self.output == "dict":
            return {"logits": logits, "aux": x.mean()}
        return logits


def model_snapshot(model) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grad": {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
    }


def assert_unchanged(model, before: dict) -> None:
    after = model_snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    for name, grad in before["grad"].items():
        assert (grad is None and after["grad"][name] is None) or torch.equal(grad, after["grad"][name])
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
        assert not module._forward_pre_hooks and not getattr(module, "_full_backward_hooks", None)


@pytest.fixture(scope="module")
def tiny_vit():
    from edgeshort.models.tiny import TinyViT

    torch.manual_seed(0)
    return TinyViT(num_register_tokens=1)


def test_gradcam_on_tiny_vit_with_register_token(tiny_vit) -> None:
    from edgeshort.spray.heatmaps import GradCAMHeatmaps

    model = tiny_vit
    assert model.num_prefix_tokens == 2
    model.train()
    model.blocks[1].eval()  # mixed modes must come back as they were
    model.cls_token.requires_grad_(False)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    before = model_snapshot(model)

    size = model.config.image_size
    inputs = torch.randn(6, 3, size, size)
    targets = [0, 1, 1, 0, 1, 0]
    maps, used = GradCAMHeatmaps(model, "blocks.3.norm1").generate(inputs, targets=targets)
    assert maps.shape == (6, size, size) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert (maps.reshape(6, -1).max(axis=1) - maps.reshape(6, -1).min(axis=1) > 0.5).all()
    assert used.tolist() == targets
    assert_unchanged(model, before)

    # Different targets explain different things; default targets are the predictions.
    other, _ = GradCAMHeatmaps(model, "blocks.3.norm1").generate(inputs, targets=[1 - t for t in targets])
    assert not np.allclose(other, maps)
    _, predicted = GradCAMHeatmaps(model, "blocks.2").generate(inputs)
    model.eval()
    with torch.no_grad():
        expected = model(inputs).argmax(dim=1).numpy()
    np.testing.assert_array_equal(predicted, expected)


def test_spray_fit_from_a_vit(tiny_vit) -> None:
    size = tiny_vit.config.image_size
    inputs = torch.randn(12, 3, size, size)
    labels = np.array([0, 1] * 6)
    before = model_snapshot(tiny_vit)
    detector = SpRAyDetector(downsample_size=16, max_clusters=3).fit(
        inputs=inputs, labels=labels, model=tiny_vit, target_layer="blocks.3.norm1", targets=labels, batch_size=5
    )
    assert detector.heatmaps_.shape == (12, size, size)
    np.testing.assert_array_equal(detector.targets_, labels)
    assert detector.heatmap_source_ == "gradcam:blocks.3.norm1"
    json.dumps(detector.get_report())
    assert_unchanged(tiny_vit, before)


@pytest.mark.parametrize(("output", "head"), [("tensor", None), ("tuple", 1), ("dict", "logits"),
                                              ("dict", lambda out: out["logits"])])
def test_gradcam_on_a_cnn_with_heads(output: str, head) -> None:
    from edgeshort.spray.heatmaps import GradCAMHeatmaps

    torch.manual_seed(1)
    model = SmallCNN(output)
    model.train()
    before = model_snapshot(model)
    inputs = torch.randn(5, 3, 20, 28)
    maps, used = GradCAMHeatmaps(model, "features.2", head=head, batch_size=2).generate(inputs, targets=[0, 1, 2, 0, 1])
    assert maps.shape == (5, 20, 28)
    assert used.tolist() == [0, 1, 2, 0, 1]
    assert_unchanged(model, before)


def test_gradcam_errors_leave_the_model_unchanged(tiny_vit) -> None:
    from edgeshort.spray.heatmaps import GradCAMHeatmaps

    size = tiny_vit.config.image_size
    inputs = torch.randn(3, 3, size, size)
    tiny_vit.train()
    before = model_snapshot(tiny_vit)
    with pytest.raises(InputError, match=r"expected target_layer to name a submodule of TinyViT, got 'blocks\.9'; do"):
        SpRAyDetector().fit(inputs=inputs, model=tiny_vit, target_layer="blocks.9")
    with pytest.raises(InputError, match=r"expected targets in \[0, 2\), got 5"):
        GradCAMHeatmaps(tiny_vit, "blocks.2").generate(inputs, targets=[0, 1, 5])
    with pytest.raises(InputError, match=r"expected head='scores' to name a field"):
        GradCAMHeatmaps(SmallCNN("dict"), "features.2", head="scores").generate(torch.randn(2, 3, 8, 8))
    with pytest.raises(InputError, match=r"expected inputs of shape \(N, C, H, W\)"):
        GradCAMHeatmaps(tiny_vit, "blocks.2").generate(torch.randn(3, size, size))
    with pytest.raises(InputError, match=r"expected targets as 3 class indices"):
        GradCAMHeatmaps(tiny_vit, "blocks.2").generate(inputs, targets=[0, 1])
    assert_unchanged(tiny_vit, before)


def test_token_reshape_strips_prefix_tokens_by_count() -> None:
    from edgeshort.spray.heatmaps import TokenGridReshape, guess_num_prefix_tokens, token_grid

    batch, dim = 2, 4
    for prefix, (height, width), patch in [(1, (224, 224), 16), (5, (224, 224), 16), (2, (96, 160), 16), (0, (64, 64), 8)]:
        rows, cols = height // patch, width // patch
        grid = torch.arange(rows * cols, dtype=torch.float32).reshape(1, rows * cols, 1).expand(batch, -1, dim)
        tokens = torch.cat([torch.full((batch, prefix, dim), -1.0), grid], dim=1)
        maps = TokenGridReshape(prefix, (height, width))(tokens)
        assert maps.shape == (batch, dim, rows, cols)
        assert maps[0, 0, 0, 0] == 0 and maps[0, 0, -1, -1] == rows * cols - 1 and (maps >= 0).all()
        assert guess_num_prefix_tokens(tokens.shape[1], (height, width)) == prefix
    assert token_grid(196, (224, 224)) == (14, 14) and token_grid(60, (96, 160)) == (6, 10)
    with pytest.raises(InputError, match=r"expected the patch tokens to form a grid"):
        TokenGridReshape(1, (64, 64))(torch.zeros(1, 1 + 7, 4))
    feature_map = torch.zeros(1, 3, 5, 5)
    assert TokenGridReshape(None, (64, 64))(feature_map) is feature_map


# ---------------------------------------------------------------- CLI and imports
def _cli(argv: list[str]) -> int:
    from edgeshort.spray import cli

    parser = argparse.ArgumentParser(prog="edgeshort spray")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def test_cli_writes_report_summary_and_png(tmp_path, capsys) -> None:
    data = make_spray_heatmaps(300, 32, 0.1, seed=9)
    np.save(tmp_path / "h.npy", data.heatmaps)
    np.save(tmp_path / "l.npy", data.labels)
    out = tmp_path / "out"
    code = _cli(["--heatmaps", str(tmp_path / "h.npy"), "--labels", str(tmp_path / "l.npy"), "--out", str(out),
                 "--affinity", "cosine", "--fail-on", "medium"])
    assert code == 1  # the planted group reaches the CI gate
    report = json.loads((out / "report.json").read_text())
    assert report["shortcut_detected"] is True
    assert "Clever Hans flags" in (out / "summary.txt").read_text()
    assert (out / "representative_heatmaps.png").stat().st_size > 0
    assert "Risk:" in capsys.readouterr().out

    code = _cli(["--heatmaps", str(tmp_path / "h.npy"), "-o", str(tmp_path / "fixed"), "--n-clusters", "3"])
    assert code == 0 and json.loads((tmp_path / "fixed" / "report.json").read_text())["metrics"]["n_clusters"] == 3


def test_cli_reports_bad_input(tmp_path, capsys) -> None:
    assert _cli(["--heatmaps", str(tmp_path / "missing.npy"), "--out", str(tmp_path)]) == 2
    assert "expected heatmaps file" in capsys.readouterr().err
    np.save(tmp_path / "flat.npy", np.ones((10, 8)))
    assert _cli(["--heatmaps", str(tmp_path / "flat.npy"), "--out", str(tmp_path)]) == 2
    assert "expected heatmaps of shape (N, H, W)" in capsys.readouterr().err


def test_cli_checks_out_and_flags_before_fitting(tmp_path, capsys, monkeypatch) -> None:
    def no_fit(*args, **kwargs):
        raise AssertionError("fit ran")

    monkeypatch.setattr(SpRAyDetector, "fit", no_fit)
    np.save(tmp_path / "h.npy", np.ones((40, 8, 8)))
    heatmaps = ["--heatmaps", str(tmp_path / "h.npy")]
    (tmp_path / "taken.txt").write_text("x")
    assert _cli([*heatmaps, "-o", str(tmp_path / "taken.txt")]) == 2
    assert "expected --out to be a folder, got the existing file" in capsys.readouterr().err
    assert _cli([*heatmaps, "-o", str(tmp_path / "taken.txt" / "sub")]) == 2
    assert "got the existing file" in capsys.readouterr().err

    out = ["-o", str(tmp_path / "out")]
    for flags, message in [
        (["--per-class"], "expected --labels with --per-class, got none; do pass --labels LABELS.npy or drop --per-class"),
        (["--cluster-selection", "fixed"], "do pass --n-clusters or use --cluster-selection 'auto'"),
        (["--cluster-selection", "eigengap", "--n-clusters", "3"], "do drop --n-clusters"),
        (["--n-clusters", "0"], "expected --n-clusters to be an int >= 2"),
        (["--n-clusters", "41"], "expected at least --n-clusters 41 heatmaps, got 40"),
        (["--max-clusters", "1"], "expected --max-clusters to be an int >= 2"),
        (["--downsample-size", "1"], "expected --downsample-size to be an int >= 2"),
    ]:
        assert _cli([*heatmaps, *out, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and not re.search(r"\w=|_", err), flags  # flags, not Python arguments
    assert not (tmp_path / "out").exists()


def test_cli_explains_folders_and_object_arrays(tmp_path, capsys) -> None:
    folder = tmp_path / "maps"
    folder.mkdir()
    np.save(folder / "heatmaps.npy", np.ones((40, 8, 8)))
    assert _cli(["--heatmaps", str(folder), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "got the folder" in err and "(it holds heatmaps.npy)" in err and "pass the .npy file itself" in err

    np.save(tmp_path / "labels.npy", np.array(["a", 1] * 20, dtype=object), allow_pickle=True)
    argv = ["--heatmaps", str(folder / "heatmaps.npy"), "--labels", str(tmp_path / "labels.npy"), "-o", str(tmp_path)]
    assert _cli(argv) == 2
    assert "do re-save it with np.save(path, labels.astype(str))" in capsys.readouterr().err


def test_imports_stay_light() -> None:
    """The CLI piece and the package import neither torch nor pytorch-grad-cam."""
    code = (
        "import sys, argparse, edgeshort.spray, edgeshort.spray.cli as c; c.add_arguments(argparse.ArgumentParser()); "
        "import edgeshort.spray.detector; "
        "print(sorted(m for m in ('torch', 'pytorch_grad_cam', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"



def test_fit_warnings_reach_the_report_and_summary() -> None:
    """What a fit warns about (here, maps with no positive relevance) is kept with its result, not only logged."""
    data = make_spray_heatmaps(N, 32, 0.10, seed=3)
    maps = data.heatmaps.copy()
    classes = np.where(data.labels == 1, "malignant", "benign")
    maps[np.flatnonzero(classes == "benign")[:30]] = 0.0
    maps[np.flatnonzero(classes == "malignant")[:10]] = 0.0
    detector = SpRAyDetector().fit(maps, classes)
    report = detector.get_report()
    # Which labels the empty maps fall in: a class whose evidence is not localised shows up as most of its maps.
    benign, malignant = (int((classes == name).sum()) for name in ("benign", "malignant"))
    assert report["warnings"] == [f"40 of {N} heatmaps have no positive relevance (30 of {benign} benign, "
                                  f"10 of {malignant} malignant); they cluster together"]
    assert SpRAyDetector().fit(maps).get_report()["warnings"] == [
        f"40 of {N} heatmaps have no positive relevance; they cluster together"]  # no labels, no breakdown
    numbered = SpRAyDetector().fit(maps, (classes == "malignant").astype(int)).get_report()["warnings"]
    assert numbered == [f"40 of {N} heatmaps have no positive relevance (30 of {benign} label 0, 10 of {malignant} "
                        "label 1); they cluster together"]
    assert "Warnings:\n  - 40 of" in detector.summary()
    assert SpRAyDetector().fit(data.heatmaps, data.labels).get_report()["warnings"] == []
    # Kept whatever the logging level: silencing the log does not empty the report.
    import logging

    quiet = logging.getLogger("edgeshort")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        assert len(SpRAyDetector().fit(maps, classes).get_report()["warnings"]) == 1
    finally:
        quiet.setLevel(level)


def test_group_counts_are_kept_per_cluster() -> None:
    data = make_spray_heatmaps(N, 32, 0.10, seed=3)
    groups = np.where(data.is_artefact, "artefact", "no artefact")
    detector = SpRAyDetector().fit(data.heatmaps, data.labels, group_labels=groups)
    for cluster in detector.get_report()["report"]["clusters"]:
        counts = cluster["group_counts"]
        assert sum(counts.values()) == cluster["size"]
        assert counts[cluster["group_majority"]] / cluster["size"] == pytest.approx(cluster["group_purity"])
    assert sum(c["group_counts"].get("artefact", 0) for c in detector.clusters_) == data.is_artefact.sum()


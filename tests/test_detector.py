"""The offline detector: finds the planted shortcut, flags its patches, and ablation + DFR fix it."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from edgeshort.detect import DetectorConfig, ShortcutDetector
from edgeshort.errors import InputError
from edgeshort.models.tiny import TinyViT

REQUIRED_METRICS = (
    "shortcut_cluster", "cluster_scores", "shortcut_cluster_group_purity", "patch_precision", "patch_recall",
    "aga_original", "wga_original", "aga_ablated", "wga_ablated", "aga_dfr", "wga_dfr", "seconds",
)


def assert_shortcut_found_and_ablated(metrics: dict) -> None:
    assert metrics["shortcut_cluster_group_purity"] >= 0.9
    assert metrics["patch_precision"] >= 0.6
    assert metrics["patch_recall"] >= 0.8
    assert metrics["wga_ablated"] > metrics["wga_original"]
    # The run says so on validation alone, and the test set confirms it.
    assert metrics["shortcut_verdict"]["verdict"] == "found" and metrics["shortcut_verdict"]["p_helps"] < 1e-6
    assert metrics["shortcut_verdict_test"]["verdict"] == "found"
    assert metrics["shortcut_verdict_test"]["test_worst_group_change"] == "gain"


def test_demo_shortcut_is_found_flagged_and_mitigated(demo_result):
    metrics = demo_result.metrics
    assert_shortcut_found_and_ablated(metrics)
    # The verdict that stands, read from Python as detect prints it.
    assert demo_result.verdict == "found"
    assert demo_result.verdict_summary == metrics["shortcut_verdict_test"]["summary"]
    assert demo_result.summary().splitlines()[0] == f"verdict: {demo_result.verdict_summary}."
    ablation, dfr = metrics["group_accuracy_intervals"]["changes"]
    assert ablation["worst_interval"][0] > 0.3  # ablation's gain is far beyond test-set noise
    # The KNN finds nearly every patch, so ablation leaves the DFR head little to fix here: its
    # worst-group change is no real loss (the paired interval does not lie wholly below zero, the run's
    # own rule), and it lifts the average.
    assert dfr["from"] == "ablated" and dfr["worst_interval"][1] >= 0
    assert metrics["dfr_warning"] is None  # so nothing advises leaving the head out
    assert metrics["guard_warning"] is None and metrics["val_shortcut_present_rate"] < 0.9
    assert metrics["aga_dfr"] >= metrics["aga_ablated"]
    assert metrics["warnings"] == []
    assert metrics["val_balanced_accuracy_ablated"] > metrics["val_balanced_accuracy_original"]
    assert metrics["shortcut_cluster"] == demo_result.shortcut_cluster
    # The shortcut cluster is the top-scoring one, by the reported margin.
    scores = sorted((s["score"] for s in metrics["cluster_scores"]), reverse=True)
    assert metrics["score_margin"] == pytest.approx(scores[0] - scores[1])


def test_run_folder_holds_everything_and_reloads(demo_result, demo_data):
    run = demo_result.run_dir
    for name in ("config.json", "run.json", "clusters.json", "clusters.npz", "knn.npz", "dfr_head.npz",
                 "metrics.json", "results.csv", "features_val.npz", "model.pt"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "heatmaps").iterdir()) == ["cluster_0", "cluster_1"]
    assert any((run / "patch_grids" / f"cluster_{demo_result.shortcut_cluster}").glob("*.png"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(key in metrics for key in REQUIRED_METRICS)
    csv_rows = (run / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("class,group,n,accuracy_original,accuracy_ablated,accuracy_dfr")
    assert len(csv_rows) == 1 + 4 + 2 + 2 + 4  # cells, average and worst group, each class's recall, interval ends
    assert csv_rows[7].startswith("recall benign,,,")
    low = csv_rows[-2].split(",")
    assert low[:2] == ["worst group 95% CI low", ""]  # the first column names each row once
    assert float(low[3]) == metrics["group_accuracy_intervals"]["kinds"]["original"]["worst"][0]

    reloaded = ShortcutDetector.load(run)
    assert not demo_result.config.progress and reloaded.config.progress  # bars belong to the session, not the run
    subset = demo_data["test"].subset(np.arange(0, 800, 20))
    a, b = demo_result.predict(subset, progress=False), reloaded.predict(subset, progress=False)
    assert np.array_equal(a.flags, b.flags) and np.array_equal(a.present, b.present)
    np.testing.assert_allclose(a.dfr_logits, b.dfr_logits, atol=1e-5)


def test_fitting_again_into_a_run_folder_leaves_nothing_of_the_earlier_run(demo_result, demo_data, demo_vit,
                                                                           tmp_path, monkeypatch):
    import shutil

    from edgeshort.demo import DEMO_DETECTOR
    from edgeshort.report import write_report

    run = tmp_path / "run"
    shutil.copytree(demo_result.run_dir, run)
    assert (run / "dfr_head.npz").is_file() and (run / "test_predictions.npz").is_file()
    (run / "spray").mkdir()
    (run / "spray" / "report.json").write_text("{}")  # SpRAy of the earlier run's model
    # A second run, without DFR and not evaluated yet, into the same folder (features reused from its cache).
    ShortcutDetector(replace(DEMO_DETECTOR, progress=False, dfr="none", n_clusters=3)).fit(
        demo_vit, demo_data["val"], run_dir=run)
    for stale in ("dfr_head.npz", "test_predictions.npz", "results.csv", "spray"):
        assert not (run / stale).exists(), stale
    assert sorted(p.name for p in (run / "heatmaps").iterdir()) == ["cluster_0", "cluster_1", "cluster_2"]
    assert ShortcutDetector.load(run).dfr_head is None
    html = write_report(run).read_text()
    assert "Overall test accuracy" not in html  # the earlier run's test figures are not this run's
    assert "no SpRAy result" in html

    # Interrupted while saving (Ctrl-C as knn.npz is written): the folder is refused, not read back as a
    # mix of two runs, and the next fit clears what is left of the earlier one.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(demo_result.run_dir, interrupted)
    save = np.savez_compressed

    def ctrl_c_at_knn(path, *args, **kwargs):
        if str(path).endswith("knn.npz"):
            raise KeyboardInterrupt
        return save(path, *args, **kwargs)

    monkeypatch.setattr(np, "savez_compressed", ctrl_c_at_knn)
    second = ShortcutDetector(replace(DEMO_DETECTOR, progress=False, dfr="none", n_clusters=3))
    with pytest.raises(KeyboardInterrupt):
        second.fit(demo_vit, demo_data["val"], run_dir=interrupted)
    monkeypatch.undo()
    with pytest.raises(InputError, match="no run.json.*if a fit was interrupted here, fit again"):
        ShortcutDetector.load(interrupted)
    second.fit(demo_vit, demo_data["val"], run_dir=interrupted)
    assert not (interrupted / "test_predictions.npz").exists() and ShortcutDetector.load(interrupted).dfr_head is None

    # A folder that is not a run keeps everything, whatever its files are called.
    from edgeshort.detect.run_io import clear_earlier_run

    project = tmp_path / "project"
    (project / "heatmaps").mkdir(parents=True)
    for name in ("heatmaps/gradcam.npy", "results.csv", "report.html"):
        (project / name).write_text("mine")
    clear_earlier_run(project)
    assert all((project / name).read_text() == "mine" for name in ("heatmaps/gradcam.npy", "results.csv", "report.html"))


def test_a_run_saved_before_newer_settings_reloads_with_the_rules_it_was_fitted_with(demo_result, demo_data,
                                                                                       tmp_path):
    import shutil

    run = tmp_path / "old-run"
    shutil.copytree(demo_result.run_dir, run)
    meta = json.loads((run / "run.json").read_text())
    for key in ("heatmap", "negatives", "positives", "positive_quantile", "cluster_space", "saliency"):
        del meta["config"][key]
    (run / "run.json").write_text(json.dumps(meta))
    old = ShortcutDetector.load(run)
    assert (old.config.heatmap, old.config.negatives, old.config.positives) == ("mean", "closest", "hottest")
    assert old.config.cluster_space == "pooled"  # the only clustering there was
    assert old.config.saliency == "mean"  # tinted by the clean mean key
    subset = demo_data["test"].subset(np.arange(0, 800, 40))
    # The guard itself is stored, not refitted: it flags as before.
    then, now = old.predict(subset, progress=False), demo_result.predict(subset, progress=False)
    assert np.array_equal(then.flags, now.flags)
    with torch.no_grad():
        tokens = old.adapter.embed(torch.from_numpy(subset.preprocessed(old.adapter.preprocessing)))
        keys = old.adapter.keys(tokens, old.config.key_layer).numpy()
    mean_tint = np.linalg.norm(keys - old.clean_keys[None], axis=-1) / old.saliency_scale
    np.testing.assert_allclose(then.saliency, np.clip(mean_tint, 0, 1).reshape(then.saliency.shape), atol=1e-5)
    assert not np.allclose(then.saliency, now.saliency, atol=0.05)


def tint_contrast(result, test) -> float:
    """Median over clean test images of their four hottest patches' tint, over the median artefact patch's tint:
    below 1, the tint is stronger on the artefact than on anything a clean image shows (its lesion)."""
    saliency = np.load(result.run_dir / "test_predictions.npz")["saliency"].reshape(len(test), -1)
    artefact = test.patch_masks(result.adapter.preprocessing, result.grid).reshape(len(test), -1)
    clean = ~artefact.any(1)
    hottest_clean = np.sort(saliency[clean], axis=1)[:, -4:].mean(1)
    return float(np.median(hottest_clean) / np.median(saliency[artefact]))


def test_the_tint_is_stronger_on_the_artefact_than_on_clean_lesions(demo_result, demo_data):
    # Measured 0.33; the clean-mean-key tint of earlier runs gives 0.50.
    assert demo_result.config.saliency == "nearest"
    assert tint_contrast(demo_result, demo_data["test"]) < 0.4


def test_ablation_changes_predictions_only_where_flagged(demo_result, demo_data):
    preds = demo_result.predict(demo_data["test"].subset(np.arange(200)), progress=False)
    clean = ~preds.present
    np.testing.assert_allclose(preds.ablated_logits[clean], preds.logits[clean], atol=1e-4)
    changed = preds.labels("ablated") != preds.labels("original")
    assert changed.any() and not changed[clean].any()



def test_predict_takes_images_without_labels(demo_result, demo_data, tmp_path):
    """A list of images, or a plain folder of them, predicts as the same images in a dataset do."""
    test = demo_data["test"].subset(np.arange(0, 800, 100))
    expected = demo_result.predict(test, progress=False)
    for i in range(len(test)):
        test.image(i).save(tmp_path / f"{i}.png")
    from_list = demo_result.predict([test.image(i) for i in range(len(test))], progress=False)
    from_folder = demo_result.predict(tmp_path, progress=False)
    for got in (from_list, from_folder):
        np.testing.assert_allclose(got.logits, expected.logits, atol=1e-5)
        assert np.array_equal(got.flags, expected.flags)


def test_a_test_set_without_artefact_labels_is_judged_by_the_guards_flags(demo_result, demo_data, tmp_path, capsys):
    import copy

    from edgeshort.data import ImageDataset

    test = demo_data["test"].subset(np.arange(200))
    unlabelled = ImageDataset.from_arrays(test.sources, test.labels, test.class_names)  # no groups, no masks
    result = copy.copy(demo_result)  # evaluate replaces `.metrics`: keep the shared fixture's
    metrics = result.evaluate(unlabelled, out=tmp_path, print_table=True)

    # Nothing of the earlier, labelled test set lingers.
    assert metrics["test_size"] == 200
    assert all(metrics[k] is None for k in ("aga_original", "wga_dfr", "patch_precision", "patch_recall"))
    assert "group_accuracy" not in metrics and "results_table" not in metrics
    preds = result.predict(unlabelled, progress=False)
    for kind in ("original", "ablated", "dfr"):
        assert metrics[f"accuracy_{kind}"] == pytest.approx(float((preds.labels(kind) == test.labels).mean()))
    tables = metrics["flag_group_accuracy"]
    cells = {(c["class"], c["group"]): i for i, c in enumerate(tables["original"]["cells"])}
    assert sum(c["n"] for c in tables["original"]["cells"] if c["group"] == "flagged") == int(preds.present.sum())
    # Ablation acts only on flagged images, and there it lifts the malignant lesions the patch misled.
    for cls in ("benign", "malignant"):
        i = cells[(cls, "not flagged")]
        assert tables["ablated"]["cells"][i]["accuracy"] == tables["original"]["cells"][i]["accuracy"]
    i = cells[("malignant", "flagged")]
    assert tables["ablated"]["cells"][i]["accuracy"] > tables["original"]["cells"][i]["accuracy"] + 0.3
    printed = capsys.readouterr().out
    assert "no artefact labels" in printed and "malignant   flagged" in printed
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[1].startswith("benign,not flagged,") and rows[2].startswith("benign,flagged,")


def test_dfr_that_stops_before_converging_says_so_once(monkeypatch, caplog):
    import logging
    import warnings

    from edgeshort.detect import dfr

    rng = np.random.default_rng(0)
    features = rng.normal(size=(90, 16)).astype(np.float32)
    labels, present = np.arange(90) % 3, (np.arange(90) // 3) % 2 == 1
    monkeypatch.setattr(dfr, "DFR_MAX_ITER", 1)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="edgeshort.detect.dfr"):
        warnings.simplefilter("error")  # scikit-learn's per-fit warnings do not reach the caller
        head = dfr.fit_dfr_logreg(features, labels, present, 3, subsamples=4)
    assert head.info["unconverged_fits"] == dfr.DFR_TUNING_SPLITS * len(dfr.C_GRID) + 4
    assert [w for w in dfr.dfr_fit_warnings(head, ("a", "b", "c")) if "iteration limit" in w] == [
        f"DFR: {dfr.DFR_TUNING_SPLITS * len(dfr.C_GRID) + 4} logistic-regression fits stopped at the "
        f"{dfr.DFR_MAX_ITER}-iteration limit before converging; the head averages their last iterates, and its "
        "worst-group accuracy on a test set (--eval) shows whether that cost anything"]
    assert head.weight.shape == (3, 16) and np.isfinite(head.weight).all()


def test_dfr_judges_every_strength_on_the_same_subsamples_and_averages_over_halvings(monkeypatch):
    from edgeshort.detect import dfr

    rng = np.random.default_rng(0)
    features = rng.normal(size=(120, 8)).astype(np.float32)
    labels, present = np.arange(120) % 2, (np.arange(120) // 2) % 3 == 0
    tuning = []  # (C, the training rows), in call order
    fit = dfr._fit_logreg

    def recording_fit(x, y, c, seed):
        tuning.append((c, x.tobytes()))
        return fit(x, y, c, seed)

    monkeypatch.setattr(dfr, "_fit_logreg", recording_fit)
    judged = {c: [] for c in dfr.C_GRID}  # each C's worst-group accuracy on the held-out halves
    score = dfr._worst_group_accuracy

    def recording_score(*args):
        judged[tuning[-1][0]].append(score(*args))
        return judged[tuning[-1][0]][-1]

    monkeypatch.setattr(dfr, "_worst_group_accuracy", recording_score)
    head = dfr.fit_dfr_logreg(features, labels, present, 2, subsamples=3)
    per_split = [tuning[i:i + len(dfr.C_GRID)] for i in range(0, dfr.DFR_TUNING_SPLITS * len(dfr.C_GRID),
                                                             len(dfr.C_GRID))]
    assert len(per_split) == dfr.DFR_TUNING_SPLITS
    # Within a halving every C learns from the same rows; the halvings differ.
    assert all([c for c, _ in split] == list(dfr.C_GRID) and len({rows for _, rows in split}) == 1
               for split in per_split)
    assert len({split[0][1] for split in per_split}) == dfr.DFR_TUNING_SPLITS
    means = {c: float(np.mean(v)) for c, v in judged.items()}
    assert head.info["C"] == max(dfr.C_GRID, key=lambda c: (means[c], -dfr.C_GRID.index(c)))
    assert head.info["selection_wga"] == pytest.approx(means[head.info["C"]])
    # Four images, two per class: no halving holds a group of two on its judging side, so no C is judged.
    tiny = dfr.fit_dfr_logreg(features[:4], np.array([0, 0, 1, 1]), np.zeros(4, bool), 2, subsamples=2)
    assert tiny.info["selection_wga"] is None and tiny.info["C"] == dfr.C_GRID[0]
    assert any(w.startswith(f"DFR: none of {dfr.DFR_TUNING_SPLITS} random halvings of the validation images held "
                            "every class on both sides") for w in dfr.dfr_fit_warnings(tiny, ("a", "b")))


def test_dfr_on_groups_too_small_to_trust_is_a_run_warning():
    from edgeshort.detect import dfr

    rng = np.random.default_rng(0)
    features = rng.normal(size=(120, 16)).astype(np.float32)
    labels = np.arange(120) % 2
    balanced = (np.arange(120) // 2) % 2 == 1  # 30 images in each (class, flag) group
    assert dfr.dfr_fit_warnings(dfr.fit_dfr_logreg(features, labels, balanced, 2, subsamples=2), ("a", "b")) == []
    rare = np.zeros(120, bool)
    rare[[1, 3, 5, 7]] = True  # the guard flagged four images of class 1 only
    head = dfr.fit_dfr_logreg(features, labels, rare, 2, subsamples=2)
    missing, small = dfr.dfr_fit_warnings(head, ("benign", "malignant"))
    assert head.info["group_size"] == 4
    assert "at 4 validation images each, fewer than 10" in small and "--dfr none" in small
    # No image of class 0 was flagged: its shortcut-found group is empty, and the run says so.
    assert missing.startswith("DFR: fewer than two validation images of 'benign' with a shortcut found, so its balancing covers the "
                              "other 3 of the 4 (class, shortcut found / not found) groups alone")


def test_a_result_refuses_weights_it_was_not_fitted_on_and_leaves_the_models_mode(tmp_path):
    """The result holds the caller's model object: training it further, or loading the run with another
    model, would let an old guard judge new weights. The model's train/eval flags come back as they were."""
    from edgeshort.data import ImageDataset
    from edgeshort.export import export_bundle
    from edgeshort.models.tiny import TinyViT

    torch.manual_seed(0)
    model = TinyViT(image_size=32, patch_size=8, dim=32, depth=1, num_heads=2).train()
    rng = np.random.default_rng(0)
    data = ImageDataset.from_arrays(rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8), np.arange(16) % 2,
                                    ("a", "b"))
    result = ShortcutDetector(DetectorConfig(progress=False, num_selected=4, knn_samples=8)).fit(
        model, data, run_dir=tmp_path / "run")
    assert model.training and all(m.training for m in model.modules())  # as the caller left it
    before = result.predict(data).logits
    assert model.training
    with torch.no_grad():
        model.head.weight.add_(0.1)  # one more training step
    with pytest.raises(InputError, match="weights changed since this result was fitted.*ShortcutDetector.load"):
        result.predict(data)
    with pytest.raises(InputError, match="weights changed since this result was fitted"):
        export_bundle(result, tmp_path / "bundle")
    with pytest.raises(InputError, match=r"other weights \(sha256 .*\) than .* was fitted on"):
        ShortcutDetector.load(tmp_path / "run", model=model)
    np.testing.assert_allclose(ShortcutDetector.load(tmp_path / "run").predict(data).logits, before, atol=1e-6)


@pytest.mark.slow
def test_second_artefact_kind_with_no_parameter_changed(tmp_path):
    from edgeshort.demo import DEMO_DETECTOR, demo_datasets, demo_model

    data = demo_datasets("ruler")
    model = demo_model("ruler", data, progress=False)
    result = ShortcutDetector(replace(DEMO_DETECTOR, progress=False)).fit(model, data["val"], run_dir=tmp_path)
    metrics = result.evaluate(data["test"])
    assert_shortcut_found_and_ablated(metrics)
    ablation, dfr = metrics["group_accuracy_intervals"]["changes"]
    assert ablation["worst_interval"][0] > 0.5
    # As on the patch: the KNN flags nearly every ruler, so DFR's worst-group change is no real loss.
    assert dfr["worst_interval"][1] > 0 and metrics["dfr_warning"] is None
    # The faint ruler is where the clean-mean-key tint failed (1.24: lesions hotter than the ruler).
    assert tint_contrast(result, data["test"]) < 0.8


@pytest.mark.slow
def test_clusters_that_follow_the_classes_are_redone_without_the_class(demo_data):
    from edgeshort.demo import DEMO_DETECTOR, DEMO_TRAIN, demo_data_config
    from edgeshort.models.train import cached_tiny_vit

    # The demo's recipe with training seed 1: this model's pooled features split by class first.
    model = cached_tiny_vit(replace(DEMO_TRAIN, seed=1), demo_data_config("patch"), None, demo_data, progress=False)
    pooled = ShortcutDetector(replace(DEMO_DETECTOR, progress=False, cluster_space="pooled")).fit(
        model, demo_data["val"]).metrics
    assert pooled["cluster_class_nmi"] >= 0.3 and pooled["shortcut_cluster_group_purity"] < 0.6
    assert pooled["cluster_space_used"] == "pooled"
    assert [w for w in pooled["warnings"] if "follow the class labels" in w and "class_centred" in w]

    # The default notices and clusters again without each class's mean; it says so.
    auto = ShortcutDetector(replace(DEMO_DETECTOR, progress=False))
    result = auto.fit(model, demo_data["val"])
    metrics = result.metrics
    assert auto.config.cluster_space == "auto" and metrics["cluster_space_used"] == "class_centred"
    assert metrics["cluster_class_nmi"] < 0.1 and metrics["shortcut_cluster_group_purity"] >= 0.9
    assert [w for w in metrics["warnings"] if f"follow the class labels (normalised mutual information "
            f"{pooled['cluster_class_nmi']:.2f}), so their shortcut cluster would be a class" in w]
    metrics = result.evaluate(demo_data["test"])
    assert metrics["wga_ablated"] > metrics["wga_original"] + 0.3


@pytest.mark.slow
def test_calibrated_positives_find_the_patch_colour_the_hottest_miss(demo_data):
    from edgeshort.demo import DEMO_DETECTOR, DEMO_TRAIN, demo_data_config
    from edgeshort.models.train import cached_tiny_vit

    # The demo's recipe with training seed 3: its blue and cyan patches run hotter than its green ones.
    model = cached_tiny_vit(replace(DEMO_TRAIN, seed=3), demo_data_config("patch"), None, demo_data, progress=False)
    runs = {}
    for rule in ("hottest", "calibrated"):
        result = ShortcutDetector(replace(DEMO_DETECTOR, progress=False, positives=rule)).fit(model, demo_data["val"])
        runs[rule] = result.evaluate(demo_data["test"])
    assert runs["hottest"]["patch_recall"] < 0.7  # one colour in three never flagged
    assert runs["calibrated"]["patch_recall"] >= 0.95 and runs["calibrated"]["patch_precision"] >= 0.6
    assert runs["calibrated"]["wga_ablated"] >= runs["hottest"]["wga_ablated"] + 0.2
    assert runs["calibrated"]["knn_positive_candidates"] > 1000 and runs["hottest"]["knn_positive_candidates"] is None


@pytest.mark.slow
def test_torchvision_vit_b_16_runs_through_fit(tmp_path):
    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    model = vit_b_16(weights=None, num_classes=2).eval()
    images = torch.randn(8, 3, 224, 224)
    labels = torch.tensor([0, 1] * 4)
    config = DetectorConfig(num_selected=3, knn_samples=20, progress=False, batch_size=4)
    result = ShortcutDetector(config).fit(model, (images, labels), run_dir=tmp_path)
    assert result.grid == (14, 14)
    assert result.knn.reference.shape[1] == 64  # 768-dim keys over 12 heads
    assert result.heatmaps[0].shape[1] == 196
    preds = result.predict((images, labels), progress=False)
    assert preds.flags.shape == (8, 14, 14) and preds.logits.shape == (8, 2)


def _small_model():
    torch.manual_seed(0)
    return TinyViT(image_size=32, patch_size=8, dim=32, depth=1, num_heads=2).eval()


def test_cached_features_are_reused_only_for_the_same_model_input(tmp_path, caplog, capsys):
    """Fitting again into a run folder reuses its features, unless the preprocessing or an image changed
    (the fix the chance warning suggests must not be answered from the old cache)."""
    from PIL import Image

    from edgeshort.data import load_images
    from edgeshort.models import load_adapter

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "val" / c / f"{i}.png")
    config = DetectorConfig(progress=False, num_selected=4, knn_samples=8)

    def fit(adapter):
        caplog.clear()
        with caplog.at_level("INFO", logger="edgeshort.detect.extract"):
            ShortcutDetector(config).fit(adapter, load_images(tmp_path / "val"), run_dir=tmp_path / "run")
        with np.load(tmp_path / "run" / "features_val.npz") as cached:
            return cached["logits"], "reusing cached features" in caplog.text

    logits, reused = fit(load_adapter(_small_model()))
    assert not reused
    # Steps without a bar of their own say what runs, so a long fit never sits silent.
    ShortcutDetector(replace(config, progress=True)).fit(load_adapter(_small_model()), load_images(tmp_path / "val"))
    err = capsys.readouterr().err
    assert "clustering 12 images and scoring the clusters" in err and "training the key KNN and flagging" in err
    assert fit(load_adapter(_small_model()))[1]
    for kept_since in ("head_features", "digests"):  # caches written before these were kept are extracted again
        with np.load(tmp_path / "run" / "features_val.npz") as cached:
            older = {k: cached[k] for k in cached.files if k != kept_since}
        np.savez(tmp_path / "run" / "features_val.npz", **older)
        assert not fit(load_adapter(_small_model()))[1]
    other_logits, reused = fit(load_adapter(_small_model()).set_preprocessing(mean=(0.2, 0.3, 0.4)))
    assert not reused and not np.allclose(other_logits, logits)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "val" / "a" / "0.png")  # same name, new pixels
    assert not fit(load_adapter(_small_model()))[1]


def test_dilation_grows_flags_by_the_same_share_of_the_image_on_any_grid():
    config = DetectorConfig()
    # The seed's 1 patch at 14 x 14 (vit_b_16 at 224); a 6 x 6 grid's patch is already a sixth of the image.
    assert [config.dilation_for((g, g)) for g in (4, 6, 7, 8, 14, 24, 37)] == [0, 0, 1, 1, 1, 2, 3]
    assert DetectorConfig(dilation_radius=2).dilation_for((6, 6)) == 2
    with pytest.raises(InputError, match="dilation_radius >= 0 or None"):
        DetectorConfig(dilation_radius=-1)


def test_a_run_keeps_the_preprocessing_it_was_fitted_with(tmp_path):
    from edgeshort.data import ImageDataset
    from edgeshort.models import load_adapter

    model = _small_model()
    rng = np.random.default_rng(0)
    data = ImageDataset.from_arrays(rng.integers(0, 255, (24, 40, 52, 3), dtype=np.uint8), np.arange(24) % 2, ("a", "b"))
    adapter = load_adapter(model).set_preprocessing(mean=(0.2, 0.3, 0.4), std=(0.9, 0.8, 0.7), interpolation="bicubic",
                                                    crop_pct=0.8)
    config = DetectorConfig(progress=False, num_selected=4, knn_samples=8)
    result = ShortcutDetector(config).fit(adapter, data, run_dir=tmp_path)
    reloaded = ShortcutDetector.load(tmp_path)
    assert reloaded.adapter.preprocessing == adapter.preprocessing
    assert result.config.dilation_radius == reloaded.config.dilation_radius == 0  # 4 x 4 grid: the radius it used
    # The run says what it fed the model, so a wrong crop or normalisation shows before the results do.
    assert result.summary().splitlines()[1].startswith(  # beneath the verdict
        "model: tiny ViT, input 32x32 (crop 0.8 (center), bicubic, mean (0.2, 0.3, 0.4), std (0.9, 0.8, 0.7)), 4x4 "
        "patches, flags grown by 0")
    logits = result.predict(data, progress=False).logits
    np.testing.assert_allclose(reloaded.predict(data, progress=False).logits, logits, atol=1e-5)
    # The family's default feeds the model other numbers, so the reload must not fall back to it,
    # not even when handed an adapter that has the default.
    x_run, x_default = (next(data.batches(p))[1] for p in (adapter.preprocessing, load_adapter(model).preprocessing))
    assert not np.allclose(x_run, x_default)
    stretched = load_adapter(model).set_preprocessing(mean=(0.2, 0.3, 0.4), std=(0.9, 0.8, 0.7), interpolation="bicubic")
    assert not np.allclose(x_run, next(data.batches(stretched.preprocessing))[1])
    assert reloaded.adapter.set_preprocessing(interpolation="bilinear").preprocessing.crop_pct == 0.8  # kept
    assert ShortcutDetector.load(tmp_path, model=load_adapter(model)).adapter.preprocessing == adapter.preprocessing
    with pytest.raises(InputError, match="expected std as three finite numbers"):
        load_adapter(model).set_preprocessing(std=(0.5, 0.5))
    with pytest.raises(InputError, match="positive std"):
        load_adapter(model).set_preprocessing(std=(0.5, 0.0, 0.5))
    with pytest.raises(InputError, match="on the 0-1 pixel scale.*divided by 255"):  # ImageNet's, as 0-255
        load_adapter(model).set_preprocessing(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
    for bad in (0.0, 1.5, True, "0.9"):
        with pytest.raises(InputError, match=r"expected crop_pct as a fraction in \[0.1, 1\] or None"):
            load_adapter(model).set_preprocessing(crop_pct=bad)


def test_bad_input_is_a_clear_error(caplog):
    model = _small_model()
    images = torch.randn(6, 3, 32, 32)
    detector = ShortcutDetector(DetectorConfig(progress=False, num_selected=2, knn_samples=4))
    with pytest.raises(InputError, match="at least two classes"), caplog.at_level("WARNING"):
        detector.fit(model, (images, torch.zeros(6, dtype=torch.long)))
    assert "pass fit(..., class_names=[...])" in caplog.text  # tensors carry no class names
    # Settings of the wrong type are refused when made, not deep inside a fit.
    for bad, message in (({"n_clusters": "3"}, "n_clusters as a whole number, got '3'"),
                         ({"num_selected": 20.5}, "num_selected as a whole number, got 20.5"),
                         ({"knn_k": True}, "knn_k as a whole number, got True"),
                         ({"progress": "no"}, "progress as True or False, got 'no'")):
        with pytest.raises(InputError, match=message):
            DetectorConfig(**bad)
    assert DetectorConfig(lambdas=[1, 0, 0], knn_samples=None).lambdas == (1.0, 0.0, 0.0)
    with pytest.raises(InputError, match="at least n_clusters=3 samples, got 2"):
        ShortcutDetector(DetectorConfig(n_clusters=3, progress=False)).fit(model, (images[:2], torch.tensor([0, 1])))
    with pytest.raises(InputError, match=r"expected images of shape \(B, 3, 32, 32\).*got \(6, 3, 40, 40\)"):
        detector.fit(model, (torch.randn(6, 3, 40, 40), torch.tensor([0, 1] * 3)))
    with pytest.raises(InputError, match=r"got \(6, 1, 32, 32\); bring them to 3 channels"):
        detector.fit(model, (torch.randn(6, 1, 32, 32), torch.tensor([0, 1] * 3)))
    with pytest.raises(InputError, match="one label per image, got 6 images and 5 labels"):
        detector.fit(model, (images, torch.tensor([0, 1, 0, 1, 0])))
    with pytest.raises(InputError, match="DetectorConfig: expected n_clusters >= 2"):
        DetectorConfig(n_clusters=1)
    with pytest.raises(InputError, match="DetectorConfig: expected dfr_subsamples >= 1"):
        DetectorConfig(dfr_subsamples=0)
    # Checked before extraction, not found by DFR at the end of the run.
    with pytest.raises(InputError, match=r"at least two validation images of every class, got '1' \(1\).*--dfr none"):
        detector.fit(model, (images, torch.tensor([0, 0, 0, 0, 0, 1])))
    with pytest.raises(InputError, match="key_layer=99 is not an encoder block"):
        ShortcutDetector(DetectorConfig(key_layer=99, progress=False)).fit(model, (images, torch.tensor([0, 1] * 3)))
    torch.manual_seed(0)
    sigmoid_model = TinyViT(image_size=32, patch_size=8, dim=32, depth=1, num_heads=2, num_classes=1).eval()
    with pytest.raises(InputError, match=r"one output \(a sigmoid binary head\).*two logits \[-z/2, z/2\]"):
        detector.fit(sigmoid_model, (images, torch.tensor([0, 1] * 3)), class_names=["benign", "malignant"])


def test_a_guard_that_flags_nearly_every_image_says_so(monkeypatch):
    # An artefact some images carry leaves most unflagged; flags on every image mark the object.
    from edgeshort.detect import keymaps

    torch.manual_seed(0)
    model = TinyViT(image_size=32, patch_size=8, dim=32, depth=1, num_heads=2, num_classes=2).eval()
    images, labels = torch.randn(12, 3, 32, 32), torch.tensor([0, 1] * 6)
    config = DetectorConfig(n_clusters=2, num_selected=2, knn_samples=4, knn_negatives=8, dfr="none", progress=False)
    monkeypatch.setattr(keymaps.KeyKNN, "flags", lambda self, keys: np.ones(keys.shape[:2], bool))
    result = ShortcutDetector(config).fit(model, (images, labels), class_names=["a", "b"])
    assert result.metrics["val_shortcut_present_rate"] == 1.0
    assert any(w.startswith("the guard finds a shortcut in 100% of the validation images") for w in result.metrics["warnings"])


def test_naming_assembles_prompts_with_a_fake_client(tmp_path):
    from edgeshort.detect import name_shortcut
    from edgeshort.detect.naming import CAPTION_PROMPT

    grids = []
    for i in range(3):
        path = tmp_path / f"grid{i}.png"
        path.write_bytes(f"png-{i}".encode())
        grids.append(path)

    class FakeClient:
        def __init__(self):
            self.calls = []

        def caption(self, image_png, prompt):
            self.calls.append(("caption", image_png, prompt))
            return f"a green circle {image_png.decode()}"

        def complete(self, prompt):
            self.calls.append(("complete", prompt))
            return "  Coloured patches on benign lesions.  "

    client = FakeClient()
    named = name_shortcut(client, grids, cluster=1)
    assert [c[1] for c in client.calls[:3]] == [b"png-0", b"png-1", b"png-2"]
    assert all(c[2] == CAPTION_PROMPT for c in client.calls[:3])
    assert "- a green circle png-2" in client.calls[3][1] and "one sentence" in client.calls[3][1]
    assert named.sentence == "Coloured patches on benign lesions." and named.cluster == 1
    with pytest.raises(InputError, match="no patch grids"):
        name_shortcut(client, [], cluster=0)


def test_ablation_that_removes_the_object_is_reported(caplog):
    from types import SimpleNamespace

    from edgeshort.data import ImageDataset
    from edgeshort.detect.detector import _ablation_check

    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    result = SimpleNamespace(adapter=SimpleNamespace(head_linear=lambda: head))
    labels = np.array([0, 1] * 10)
    data = ImageDataset.from_arrays(np.zeros((20, 8, 8, 3), np.uint8), labels, class_names=("a", "b"))
    right = np.eye(2)[labels] * 3.0
    # Ablation that keeps the features: no warning.
    checked, _ = _ablation_check(result, data, right, right)
    assert checked["val_balanced_accuracy_ablated"] == 1.0 and checked["warnings"] == []
    # Ablation after which every image looks like class "a": half the balanced accuracy is lost.
    collapsed = np.tile([1.0, 0.0], (20, 1))
    with caplog.at_level("WARNING"):
        checked, ablated = _ablation_check(result, data, right, collapsed)
    np.testing.assert_array_equal(ablated, np.zeros(20))  # the ablated predictions, for the verdict
    assert checked["val_balanced_accuracy_ablated"] == 0.5
    assert "lowers balanced validation accuracy from 1.000 to 0.500, chance level (0.500)" in checked["warnings"][0]
    assert "or the model learned little besides the artefact (likely when" in caplog.text
    # Above chance, neither cause is favoured.
    half = right.copy()
    half[:6] = [1.0, 0.0]
    checked, _ = _ablation_check(result, data, right, half)
    assert "chance" not in checked["warnings"][0] and "flags parts of the object, or" in checked["warnings"][0]
    # Where no cluster stands apart from clean tokens there is no artefact to blame, nor to retrain without.
    (warning,) = _ablation_check(result, data, right, collapsed, stood_apart=False)[0]["warnings"]
    assert warning.endswith("no cluster's tokens stand apart from clean ones, so the flags fall on what the model "
                            "needs (see the verdict)")


def test_a_model_at_or_below_chance_is_called_out(caplog):
    from edgeshort.detect.detector import _chance_check

    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    names = ("bcc", "melanoma", "nevus")
    right = np.eye(3)[labels] * 2 + rng.normal(0, 1, (300, 3))  # about 80% right
    assert _chance_check(right, labels, names) == []
    # Outputs in another class order: right about the images, wrong about their names. The run would score
    # clusters, count fixes and train DFR against names the model does not mean: refused, with the order that fits.
    with pytest.raises(InputError, match=r"less than chance \(accuracy 0\.\d+, 0\.333 by chance on 300 images\), and in "
                       r"another class order they agree far better \(accuracy 0\.[789]\d+, beyond chance at p < 1e-06\): the data's "
                       r"class order "
                       r"\['bcc', 'melanoma', 'nevus'\] is not the model's output order\. Give the model's order: "
                       r"--classes melanoma,nevus,bcc \(Python: fit\(\.\.\., class_names=\['melanoma', 'nevus', 'bcc'\]\)\)"):
        _chance_check(right[:, [1, 2, 0]], labels, names)
    # Two of three swapped: at chance rather than below it (a 3-class walkthrough: 0.372), and refused all the same.
    with pytest.raises(InputError, match=r"no better than chance .* Give the model's order: --classes melanoma,bcc,nevus"):
        _chance_check(right[:, [1, 0, 2]], labels, names)
    # Two classes swapped: the other order.
    two = np.arange(100) % 2
    with pytest.raises(InputError, match=r"--classes other,melanoma \("):
        _chance_check(np.eye(2)[1 - two], two, ("melanoma", "other"))
    # A test set's labels in another order: a warning that says how they would read.
    with caplog.at_level("WARNING"):
        (warning,) = _chance_check(right[:, [1, 2, 0]], labels, names, "test")
    assert "as the model means them (they agree far better, 0.893, with the model's outputs read as melanoma, nevus, " \
           "bcc)" in warning
    assert warning in caplog.text
    # Outputs unrelated to the images (wrong weights or preprocessing), or one class for all.
    (warning,) = _chance_check(rng.normal(0, 1, (300, 3)), labels, names)
    assert "no better than chance" in warning and "preprocessing" in warning
    (warning,) = _chance_check(np.tile([1.0, 0.0, 0.0], (300, 1)), labels, names)
    assert "accuracy 0.333, 0.333 by chance on 300 images" in warning


def test_predictions_name_the_pixels_they_were_made_on(demo_result, demo_data):
    """A stored prediction can be checked against the image on disk now: an edited image has another digest."""
    from edgeshort.data import ImageDataset

    test = demo_data["test"].subset(np.arange(6))
    preds = demo_result.predict(test, progress=False)
    prep = demo_result.adapter.preprocessing
    assert preds.input_sha256.tolist() == test.input_digests(prep).tolist()
    assert len(set(preds.input_sha256)) == 6
    mirrored = np.stack([np.asarray(test.image(i))[:, ::-1] for i in range(6)])
    edited = ImageDataset.from_arrays(mirrored, test.labels, test.class_names)
    assert not set(edited.input_digests(prep)) & set(preds.input_sha256)


def test_only_images_with_masked_tokens_run_the_encoder_again(demo_result, demo_data, monkeypatch):
    """Masking nothing gives the plain features, so the ablation pass and predict encode only the images whose
    tokens the guard leaves out; the answers are those of masking every image (on vit_b_16 this saves a
    quarter-second per unflagged image)."""
    from edgeshort.detect.detector import _masked_head_features

    adapter, val = demo_result.adapter, demo_data["val"].subset(np.arange(0, 1500, 5))
    encoded_rows = []
    head_features = adapter.head_features

    def counting(tokens, keep=None):
        if keep is not None:
            encoded_rows.append(len(tokens))
        return head_features(tokens, keep)

    monkeypatch.setattr(adapter, "head_features", counting)
    predictions = demo_result.predict(val, progress=False)
    assert 0 < sum(encoded_rows) == predictions.present.sum() < len(val)
    clean = ~predictions.present
    np.testing.assert_array_equal(predictions.ablated_logits[clean], predictions.logits[clean])
    # Against masking every image, as before: the same features, bit for bit.
    with torch.inference_mode():
        tokens = [adapter.embed(torch.from_numpy(x)) for _, x in val.batches(adapter.preprocessing, 64)]
        every = np.concatenate([head_features(t, demo_result.guard_tokens(t)[-1]).numpy() for t in tokens])
        plain = np.concatenate([head_features(t).numpy() for t in tokens])
        keys = np.concatenate([adapter.keys(t, demo_result.config.key_layer).numpy() for t in tokens])
    encoded_rows.clear()
    result = replace(demo_result, val_present=predictions.present)
    np.testing.assert_array_equal(_masked_head_features(result, val, plain, keys), every)
    assert sum(encoded_rows) == predictions.present.sum()


def test_a_test_set_warns_when_its_labels_or_images_are_unlike_the_validation_data(demo_result, demo_data, tmp_path):
    """A site's own test set: swapped labels, or flags on images without the artefact (or, without artefact labels,
    far more images flagged than in validation), warn in metrics.json and so the report; the demo's own test set,
    with or without artefact labels, does not."""
    from edgeshort.data import ArrayDataset
    from edgeshort.detect.detector import _flag_rate_check

    test = demo_data["test"]
    result = replace(demo_result)  # each evaluation replaces its metrics; the shared fixture's are kept
    assert result.evaluate(test, out=tmp_path / "labelled")["test_warnings"] == []
    # Without artefact labels, at the validation set's share of images with the artefact (35%).
    clean, marked = np.flatnonzero(test.groups == 0), np.flatnonzero(test.groups == 1)
    chosen = np.sort(np.concatenate([clean, marked[: round(len(clean) * 35 / 65)]]))
    images = test.subset(chosen).preprocessed(demo_result.adapter.preprocessing)
    plain = ArrayDataset(images, test.labels[chosen], test.class_names)
    metrics = result.evaluate(plain, out=tmp_path / "plain")
    assert metrics["test_warnings"] == [] and metrics["guard_warning"] is None and metrics["dfr_warning"] is None
    swapped = ArrayDataset(images, 1 - plain.labels, test.class_names)
    (warning,) = result.evaluate(swapped, out=tmp_path / "swapped")["test_warnings"]
    assert warning.startswith("the model's test predictions agree with the labels less than chance")
    assert "a label column or --class-map that swaps them inverts every answer" in warning
    assert json.loads((tmp_path / "swapped" / "metrics.json").read_text())["test_warnings"] == [warning]
    # One class, or a few images near chance, say little about the labels: no warning.
    from edgeshort.detect.detector import _chance_check

    names, rng = ("benign", "malignant"), np.random.default_rng(0)
    one_class = np.zeros(200, np.int64)
    logits = np.where(rng.random((200, 1)) < 0.85, [[1.0, 0.0]], [[0.0, 1.0]])
    assert _chance_check(logits, one_class, names, "test") == []
    few = np.repeat([0, 1], 15)
    guesses = np.where(rng.random(30) < 0.7, few, 1 - few)
    assert _chance_check(np.eye(2)[guesses], few, names, "test") == []
    assert _chance_check(np.eye(2)[1 - few], few, names, "test")  # all 30 swapped: below chance
    # A site's images the guard flags far more often: 60% of 300 against 35% in validation ...
    (rise,) = _flag_rate_check(np.arange(300) < 180, 0.35)
    assert rise.startswith("the guard finds a shortcut in 60% of the test images, against 35% of the validation")
    assert _flag_rate_check(np.arange(300) < 120, 0.35) == [] and _flag_rate_check(np.arange(300) < 180, None) == []
    # ... and, with artefact labels, flags on images without the artefact (112 of 231).
    groups = np.repeat([0, 1], [231, 69])
    present = np.r_[np.arange(231) < 112, np.ones(69, bool)]
    (false_flags,) = _flag_rate_check(present, 0.35, groups, 0.02)
    assert false_flags.startswith("the guard finds a shortcut in 48% of the test images without the artefact (112 of "
                                  "231; 2% of such validation images)")
    assert _flag_rate_check(np.r_[np.arange(231) < 10, np.ones(69, bool)], 0.35, groups) == []
    assert _flag_rate_check(present, 0.35, groups, 0.45) == []  # as often as in validation: nothing new here
    few = np.repeat([0, 1], [10, 5])
    assert _flag_rate_check(np.r_[np.arange(10) < 2, np.ones(5, bool)], 0.35, few, 0.05) == []  # 2 of 10: chance
    # Images whose flags cover most of them are counted, as the runtime marks each one.
    from edgeshort.detect.detector import _mostly_flagged_check

    flags = np.zeros((10, 8, 8), bool)
    flags[:3, :5] = True  # 40 of 64 patches
    flags[3] = True
    (most,) = _mostly_flagged_check(flags)
    assert most.startswith("flags cover over 50% of the patches of 4 of the 10 test images (all patches of 1, whose")
    assert _mostly_flagged_check(flags[4:]) == []


def test_the_order_of_the_validation_images_does_not_change_the_run(demo_vit, demo_data):
    """k-means seeds and the fit's random draws pick by index: taken in an order of the images' own features,
    a listing's row order changes nothing (it once flipped a model's clusters between following the classes
    and not)."""
    from edgeshort.demo import DEMO_DETECTOR

    val = demo_data["val"].subset(np.arange(600))
    shuffle = np.random.default_rng(5).permutation(len(val))
    back = np.argsort(shuffle)  # a listed image's index in the shuffled listing
    for space in ("pooled", "class_centred"):  # class means, too, are summed in the images' own order
        config = replace(DEMO_DETECTOR, progress=False, cluster_space=space)
        listed = ShortcutDetector(config).fit(demo_vit, val)
        shuffled = ShortcutDetector(config).fit(demo_vit, val.subset(shuffle))
        np.testing.assert_array_equal(listed.clustering.assignments[shuffle], shuffled.clustering.assignments)
        for mine, theirs in zip(listed.selected, shuffled.selected):
            np.testing.assert_array_equal(back[mine], theirs)
        np.testing.assert_array_equal(listed.clean_keys, shuffled.clean_keys)
        np.testing.assert_array_equal(np.sort(listed.knn.reference, axis=0), np.sort(shuffled.knn.reference, axis=0))
        np.testing.assert_array_equal(listed.val_present[shuffle], shuffled.val_present)
        assert listed.metrics["shortcut_verdict"] == shuffled.metrics["shortcut_verdict"]
        assert listed.metrics["knn_positive_threshold"] == shuffled.metrics["knn_positive_threshold"]
        np.testing.assert_array_equal(listed.dfr_head.weight, shuffled.dfr_head.weight)


def test_flags_on_most_of_the_images_labelled_clean_warn_at_fit():
    """A guard that flags the validation images the artefact labels call clean marks more than the artefact
    (a walkthrough's model: 99 of 135 in one order of its images, its flags ringing the lesion); the demo's flag
    none of 975."""
    from edgeshort.detect.detector import _clean_flag_check

    groups = np.concatenate([np.zeros(135, np.int64), np.ones(105, np.int64)])
    present = np.concatenate([np.arange(135) < 99, np.ones(105, bool)])
    (warning,) = _clean_flag_check(present, groups)
    assert warning.startswith("the guard finds a shortcut in 73% of the validation images the artefact labels call "
                              "clean (99 of 135): its flags fall on more than the artefact")
    # Not beyond chance over 10%: 22 of 135 (16%, p = 0.015), or one of ten (perhaps a mislabelled image).
    assert _clean_flag_check(np.concatenate([np.arange(135) < 22, np.ones(105, bool)]), groups) == []
    assert _clean_flag_check(np.concatenate([np.arange(10) < 1, np.ones(5, bool)]), np.repeat([0, 1], [10, 5])) == []
    assert _clean_flag_check(present, None) == []
    assert _clean_flag_check(present[126:], groups[126:]) == []  # 9 clean images say too little

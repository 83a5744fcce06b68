"""The run's verdict: a shortcut found, unconfirmed, not relied on, or none; and export follows it."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from edgeshort.detect.verdict import confirm_on_test, fit_verdict
from edgeshort.errors import InputError


def _predictions(fixed: int, broken: int, kept_right: int = 100, kept_wrong: int = 10):
    """(original, ablated, labels) with `fixed` wrong-to-right and `broken` right-to-wrong changes."""
    labels = np.zeros(fixed + broken + kept_right + kept_wrong, np.int64)
    original = np.concatenate([np.ones(fixed), np.zeros(broken), np.zeros(kept_right), np.ones(kept_wrong)])
    ablated = np.concatenate([np.zeros(fixed), np.ones(broken), np.zeros(kept_right), np.ones(kept_wrong)])
    return original.astype(np.int64), ablated.astype(np.int64), labels


@pytest.mark.parametrize(("candidates", "fixed", "broken", "verdict", "said"), [
    # Figures from models trained with a learned shortcut, with the artefact absent, and with a validation
    # set where the artefact never disagrees with the label.
    (3836, 49, 5, "found", "Shortcut found: cluster 1's tokens stand apart from clean ones (3,836 of its tokens"),
    (9, 18, 184, "none", "No shortcut found: no cluster's tokens stand apart from clean ones. The best-scored, "
                         "cluster 1, has 9 tokens"),
    (3000, 0, 9, "not_relied_on", "but masking them fixed 0 validation predictions and broke 9"),
    (2761, 1, 3, "unconfirmed", "no difference beyond chance"),
    (None, 49, 5, "found", "Shortcut found: cluster 1's tokens stand apart from clean ones, and masking"),
])
def test_the_verdict_needs_distinct_tokens_and_more_fixed_than_broken(candidates, fixed, broken, verdict, said):
    found = fit_verdict(1, candidates, 200, 0.999, *_predictions(fixed, broken))
    assert found["verdict"] == verdict and said in found["summary"]
    assert (found["fixed"], found["broken"], found["decided_on"]) == (fixed, broken, "validation")
    if verdict in ("none", "not_relied_on"):
        assert "ship the plain model" in found["summary"].lower()
    if verdict == "unconfirmed":
        assert "Confirm it on a test set with artefact labels (edgeshort detect --eval" in found["summary"]
    json.dumps(found)  # it goes into metrics.json and the bundle's manifest as it is


def test_a_test_set_with_artefact_labels_confirms_or_qualifies_the_verdict():
    unconfirmed = fit_verdict(1, 2761, 200, 0.999, *_predictions(1, 3))
    confirmed = confirm_on_test(unconfirmed, "gain")
    assert confirmed["verdict"] == "found" and confirmed["decided_on"] == "test"
    assert confirmed["summary"].startswith("Shortcut found, confirmed on the test set: masking raises worst-group")
    # A test set does not overrule a fit that found nothing; it says what it saw beside it.
    none = fit_verdict(1, 66, 200, 0.999, *_predictions(1, 9))
    beside = confirm_on_test(none, "gain")
    assert beside["verdict"] == "none" and beside["decided_on"] == "validation"
    assert beside["summary"].endswith("yet on the test set masking raises worst-group accuracy beyond test-set noise")
    found = fit_verdict(1, 3836, 200, 0.999, *_predictions(49, 5))
    assert confirm_on_test(found, "loss")["summary"].endswith("masking lowers worst-group accuracy beyond test-set noise")
    assert confirm_on_test(found, "noise")["summary"] == found["summary"]


def _demo_val_without(demo_data, rates: tuple[float, float], size: int = 600):
    """The demo's validation recipe, `size` images, with artefact rates (benign, malignant)."""
    from edgeshort.data import SplitSpec, generate_split
    from edgeshort.demo import DEMO_DATA

    return generate_split(replace(DEMO_DATA, val=SplitSpec(size, rates)), "val")


def test_a_shortcut_the_validation_images_do_not_show_is_not_found_and_not_exported(demo_vit, demo_data, tmp_path):
    from edgeshort.demo import DEMO_DETECTOR
    from edgeshort.detect import ShortcutDetector
    from edgeshort.export import ExportOptions, export_bundle

    clean = _demo_val_without(demo_data, (0.0, 0.0))
    result = ShortcutDetector(replace(DEMO_DETECTOR, progress=False)).fit(demo_vit, clean, run_dir=tmp_path / "run")
    verdict = result.metrics["shortcut_verdict"]
    assert verdict["verdict"] == "none" and verdict["distinct_tokens"] < verdict["knn_positives"]
    assert result.summary().startswith("verdict: No shortcut found")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["shortcut_verdict"] == verdict
    from edgeshort.report.html import write_report

    page = write_report(tmp_path / "run").read_text()
    assert '<p class="headline"><span class="no">No shortcut found</span></p>' in page
    options = ExportOptions(formats=("onnx",), graphs="fused", skl2onnx_check=False, progress=False)
    with pytest.raises(InputError, match="the run's verdict: No shortcut found.* pass --ignore-verdict"):
        export_bundle(tmp_path / "run", tmp_path / "bundle", options, calibration=clean)
    assert not (tmp_path / "bundle").exists()
    # Exported anyway, the bundle carries the verdict, and the runtime logs it with the other warnings.
    bundle = export_bundle(tmp_path / "run", tmp_path / "bundle", replace(options, ignore_verdict=True),
                           calibration=clean)
    assert bundle.manifest["guard"]["verdict"]["verdict"] == "none"
    assert verdict["summary"] in bundle.manifest["guard"]["warnings"]


def test_a_shortcut_validation_cannot_confirm_is_confirmed_by_a_test_set(demo_vit, demo_data, capsys):
    from edgeshort.demo import DEMO_DETECTOR
    from edgeshort.detect import ShortcutDetector

    # As at many hospitals: the artefact sits on benign images only, so masking it has nothing to fix there.
    isic_like = _demo_val_without(demo_data, (0.5, 0.0))
    result = ShortcutDetector(replace(DEMO_DETECTOR, progress=False)).fit(demo_vit, isic_like)
    verdict = result.metrics["shortcut_verdict"]
    assert verdict["verdict"] == "unconfirmed" and verdict["distinct_tokens"] >= verdict["knn_positives"]
    metrics = result.evaluate(demo_data["test"])
    assert metrics["shortcut_verdict_test"]["verdict"] == "found"
    assert metrics["shortcut_verdict"] == verdict  # the fit's own verdict stays as it was
    assert result.summary().startswith("verdict: Shortcut found, confirmed on the test set")
    # Evaluated on images without artefact labels, nothing confirms it: the fit's verdict stands again.
    from edgeshort.data import ImageDataset

    test = demo_data["test"]
    unlabelled = ImageDataset.from_arrays(np.stack([test.array(i) for i in range(200)]), test.labels[:200],
                                          class_names=test.class_names)
    assert result.evaluate(unlabelled)["shortcut_verdict_test"] is None
    assert result.summary().startswith("verdict: Shortcut not confirmed")

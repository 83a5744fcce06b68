"""The run's verdict: a shortcut found, unconfirmed, not relied on, or none; and export follows it."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from edgeshort.detect.verdict import confirm_on_test, fit_verdict, in_light_of_artefact_labels
from edgeshort.errors import InputError


def _predictions(fixed: int, broken: int, kept_right: int = 100, kept_wrong: int = 10):
    """(original, ablated, labels) with `fixed` wrong-to-right and `broken` right-to-wrong changes."""
    labels = np.zeros(fixed + broken + kept_right + kept_wrong, np.int64)
    original = np.concatenate([np.ones(fixed), np.zeros(broken), np.zeros(kept_right), np.ones(kept_wrong)])
    ablated = np.concatenate([np.zeros(fixed), np.ones(broken), np.zeros(kept_right), np.ones(kept_wrong)])
    return original.astype(np.int64), ablated.astype(np.int64), labels


# The demo recipe's shortcut cluster holds about 36,000 tokens: 36 pass the clean tokens' 99.9% quantile by chance.
@pytest.mark.parametrize(("candidates", "tokens", "fixed", "broken", "verdict", "said"), [
    # Figures from models trained with a learned shortcut, with the artefact absent, and with a validation
    # set where the artefact never disagrees with the label.
    (3836, 36032, 49, 5, "found", "Shortcut found: 3,836 of cluster 1's 36,032 tokens are hotter than 99.9% of "
                                  "clean tokens, 106.5 times chance, and masking them fixed 49"),
    (9, 36032, 18, 184, "none", "No shortcut found: no cluster's tokens stand apart from clean ones: 9 of cluster "
                                "1's 36,032 tokens are hotter than 99.9% of clean tokens, 0.2 times chance (a shortcut "
                                "needs 10 times chance, and more than chance would give)"),
    # Enough for the KNN, but no more than a large cluster holds by chance (vit_b_16: 196 patches an image).
    (300, 196000, 1, 9, "none", "300 of cluster 1's 196,000 tokens are hotter than 99.9% of clean tokens, 1.5 times"),
    # So few that chance could hold them, yet masking helps beyond chance: something is relied on.
    (300, 196000, 49, 5, "unconfirmed", "1.5 times chance (a shortcut needs 10 times chance, and more than chance "
                                        "would give), yet masking them fixed 49 validation predictions and broke 5 "
                                        "(sign test p = 1.9e-10): a small artefact, or one that images outside the "
                                        "cluster carry too"),
    # Exactly ten times chance stands apart (in floating point 10 x 0.001 x 78,400 is 784.0000000000007).
    (784, 78400, 49, 5, "found", "784 of cluster 1's 78,400 tokens are hotter than 99.9% of clean tokens, 10.0 times"),
    (783, 78400, 1, 9, "none", "783 of cluster 1's 78,400 tokens"),
    (3000, 36032, 0, 9, "unconfirmed", "broke 9 (sign test p = 0.002 that it harms): either the model does not rely "
                                       "on them, or it relies on little else (masking then leaves it guessing), or the "
                                       "validation images hold none where the artefact"),
    (2761, 36032, 1, 3, "unconfirmed", "no difference beyond chance"),
    (None, 36032, 49, 5, "found", "were not measured against clean ones (positives='hottest'), and masking them fixed"),
])
def test_the_verdict_needs_distinct_tokens_and_more_fixed_than_broken(candidates, tokens, fixed, broken, verdict, said):
    found = fit_verdict(1, candidates, tokens, 200, 0.999, *_predictions(fixed, broken))
    assert found["verdict"] == verdict and said in found["summary"]
    assert (found["fixed"], found["broken"], found["decided_on"]) == (fixed, broken, "validation")
    if verdict == "none":
        assert found["summary"].endswith("Nothing to guard: deploy the model as it is, without the guard. An artefact "
                                         "the validation images "
                                         "do not show cannot be found")
    if verdict == "unconfirmed":
        assert found["summary"].endswith("Settle it on a test set with artefact labels (edgeshort detect --eval TEST "
                                         "with --eval-columns group=COLUMN, or result.evaluate) before shipping the guard")
    json.dumps(found)  # it goes into metrics.json and the bundle's manifest as it is


def test_artefact_labels_replace_a_guess_at_how_many_images_masking_could_fix():
    """A 3-class walkthrough's unconfirmed verdict guessed the validation images might hold none where the
    artefact and the label disagree; its artefact labels put 48 there."""
    original, ablated, labels = _predictions(0, 9)
    groups = (np.arange(len(labels)) < 48).astype(np.int64)
    labels = labels.copy()
    labels[100:] = 1  # a second class, carrying no artefact: the 48 carriers are of class 0, the one carrying it
    judged = fit_verdict(1, 3000, 36032, 200, 0.999, original, ablated, labels, groups=groups)
    assert "hold none where" in judged["summary"]  # all 48 carry it with the class that carries it most
    groups[110:118] = 1  # 8 carriers of class 1: against their class
    judged = fit_verdict(1, 3000, 36032, 200, 0.999, original, ablated, labels, groups=groups)
    assert judged["verdict"] == "unconfirmed" and ("or it relies on little else (masking then leaves it guessing); the "
                                                   "artefact labels put it on 8 validation images against their class, "
                                                   "so masking had predictions to fix. Settle it") in judged["summary"]
    unchanged = fit_verdict(1, 2761, 36032, 200, 0.999, *_predictions(1, 3), groups=np.zeros(114, np.int64))
    assert unchanged["summary"] == fit_verdict(1, 2761, 36032, 200, 0.999, *_predictions(1, 3))["summary"]


def _walkthrough_labels():
    """A walkthrough's validation set: 120 benign (3 with a sticker), 120 malignant (102 with it); its guarded
    cluster held 54 images, 45 of them with the sticker."""
    labels = np.repeat([0, 1], 120)
    groups = np.concatenate([np.arange(120) < 3, np.arange(120) < 102]).astype(np.int64)
    members = np.zeros(240, bool)
    members[np.flatnonzero(groups == 1)[-45:]] = True
    members[np.flatnonzero(groups == 0)[:9]] = True
    return labels, groups, members


def test_artefact_labels_show_when_neither_check_could_see_a_shortcut():
    """`none` rests on both checks failing. With the artefact outside the cluster too, the first measures against
    a reference that carries it; with 3 images carrying it against their class, masking has too little to fix for
    the second. That model had learned the sticker (test worst group 0.000 -> 0.861): unconfirmed, not 'deploy
    without the guard'."""
    from edgeshort.detect.verdict import fewest_changes_to_show

    assert fewest_changes_to_show() == 7 and fewest_changes_to_show(0.05) == 5
    none = fit_verdict(1, 37, 13824, 200, 0.999, *_predictions(3, 0))
    assert none["verdict"] == "none"
    labels, groups, members = _walkthrough_labels()
    judged = in_light_of_artefact_labels(none, 1, members, groups, labels)
    assert judged["verdict"] == "unconfirmed" and judged["title"] == "Shortcut not confirmed"
    assert judged["summary"].startswith(
        "Shortcut not confirmed: 37 of cluster 1's 13,824 tokens are hotter than 99.9% of clean tokens, 2.7 times "
        "chance (a shortcut needs 10 times chance, and more than chance would give), and masking them fixed 3 "
        "validation predictions and broke 0; yet the validation images' artefact labels put the artefact on 45 of "
        "cluster 1's 54 images and on 60 of the 186 outside it, so the clean tokens the cluster is measured against "
        "carry it too; and only 3 images carry it against their class, fewer than the 7 predictions masking would "
        "have to fix for its sign test to show anything: neither check can see a shortcut in these images. Settle "
        "it on a test set")
    assert (judged["artefact_in_cluster"], judged["artefact_outside"], judged["artefact_against_class"]) == (45, 60, 3)
    json.dumps(judged)
    # Every image carrying it: nothing contrasts with it.
    everywhere = in_light_of_artefact_labels(none, 1, members, np.ones(240, np.int64), labels)
    assert everywhere["verdict"] == "unconfirmed" and "every validation image carries it, so nothing there " \
        "contrasts with it: neither check can see a shortcut" in everywhere["summary"]


def test_artefact_labels_leave_none_where_a_check_could_see_a_shortcut():
    none = fit_verdict(1, 18, 29204, 200, 0.999, *_predictions(5, 55))
    labels, groups, members = _walkthrough_labels()
    # The artefact on 30% of each class (the demo recipe's unrelated patch): 36 images carry it against their
    # class, enough for masking to show a shortcut relied on. None stands, and no longer says the validation
    # images do not show an artefact their labels put there.
    unrelated = (np.arange(240) % 10 < 3).astype(np.int64)
    stands = in_light_of_artefact_labels(none, 1, members, unrelated, labels)
    assert stands["verdict"] == "none" and "An artefact the validation images do not show" not in stands["summary"]
    assert ("and 36 carry it against their class, enough for masking to show a shortcut the model relied on. "
            "Nothing to guard: deploy the model as it is, without the guard") in stands["summary"]
    # A guard that flags those images: masking acted on the artefact, and none stands. A guard that flags nearly
    # every image (a 3-class walkthrough's, built on a cluster holding the artefact on 11 of its 237 images)
    # masks what every image has, so masking says nothing about the artefact: blind, like too few images.
    flags_carriers = unrelated.astype(bool) | (np.arange(240) % 50 == 7)
    assert in_light_of_artefact_labels(none, 1, members, unrelated, labels, flags_carriers)["verdict"] == "none"
    everything = np.arange(240) % 20 != 5  # 95% of the images, every one carrying it
    blind = in_light_of_artefact_labels(none, 1, members, unrelated, labels, everything)
    assert blind["verdict"] == "unconfirmed"
    assert ("and the guard finds a shortcut in 100% of the images carrying it and 93% of the others, so it does not "
            "single the artefact out, and what masking does says nothing about it: neither check can see a shortcut "
            "in these images") in blind["summary"]
    # One that flags few images, not those carrying the artefact more than the others, is as blind.
    unrelated_flags = np.arange(240) % 10 == 5
    assert in_light_of_artefact_labels(none, 1, members, unrelated, labels, unrelated_flags)["verdict"] == "unconfirmed"
    # One that masks only 3 of the 36 images carrying it against their class: too few to show anything.
    carried = unrelated.astype(bool)
    most = max(np.unique(labels), key=lambda c: carried[labels == c].mean())
    against = carried & (labels != most)
    few = carried & (labels == most) | against & (np.cumsum(against) <= 3)
    partial = in_light_of_artefact_labels(none, 1, members, unrelated, labels, few)
    assert partial["verdict"] == "unconfirmed" and partial["artefact_against_class_masked"] == 3
    assert ("and of the 36 images carrying it against their class the guard masks only 3, fewer than the 7 "
            "predictions masking would have to fix") in partial["summary"]
    # All of it inside the cluster: the clean reference is clean, so tokens that do not stand apart are evidence.
    inside_only = (members & (groups == 1)).astype(np.int64)
    kept = in_light_of_artefact_labels(none, 1, members, inside_only, labels)
    assert kept["verdict"] == "none"
    assert "on 45 of cluster 1's 54 images and on 0 of the 186 outside it, all of them in it" in kept["summary"]
    # Without artefact labels, or for any other verdict, nothing changes.
    assert in_light_of_artefact_labels(none, 1, members, None, labels) is none
    assert in_light_of_artefact_labels(none, 1, members, np.zeros(240, np.int64), labels) is none
    found = fit_verdict(1, 3836, 36032, 200, 0.999, *_predictions(49, 5))
    assert in_light_of_artefact_labels(found, 1, members, groups, labels) is found


def test_a_quantile_of_too_few_clean_tokens_measures_nothing():
    """Over 300 clean tokens the 99.9% quantile is their maximum: chance alone puts a cluster far past it."""
    from edgeshort.detect.verdict import null_tokens_needed, stands_apart

    assert null_tokens_needed(0.999) == 10_000 and null_tokens_needed(0.99) == 1_000
    assert stands_apart(500, 36032, 0.999, null_tokens=300) is None
    assert stands_apart(100, 36032, 0.999, null_tokens=300) is False  # a threshold too low, and still too few pass
    assert stands_apart(500, 36032, 0.999, null_tokens=10_000) is True
    helps = fit_verdict(1, 500, 36032, 200, 0.999, *_predictions(49, 5), null_tokens=300)
    assert helps["verdict"] == "found" and helps["null_tokens"] == 300
    assert ("13.9 times chance, but that quantile rests on only 300 clean tokens (it needs 10,000), so whether they "
            "stand apart is not measured, and masking them fixed 49") in helps["summary"]
    unmeasured = fit_verdict(1, 500, 36032, 200, 0.999, *_predictions(1, 9), null_tokens=300)
    assert unmeasured["verdict"] == "unconfirmed"
    # One "but" a sentence: the quantile's already stands before the sign test's.
    assert ("so whether they stand apart is not measured, and masking them fixed 1 validation predictions and broke 9, "
            "no difference beyond chance") in unmeasured["summary"] and unmeasured["summary"].count(" but ") == 1


def test_a_test_set_with_both_artefact_groups_settles_the_verdict_or_says_it_cannot():
    unconfirmed = fit_verdict(1, 2761, 36032, 200, 0.999, *_predictions(0, 9))
    confirmed = confirm_on_test(unconfirmed, "gain")
    assert confirmed["verdict"] == "found" and confirmed["decided_on"] == "test"
    assert confirmed["summary"].startswith("Shortcut found, confirmed on the test set: masking raises worst-group")
    assert "On validation: 2,761 of cluster 1's 36,032 tokens" in confirmed["summary"]
    # A real gain or loss settles it, whatever validation said.
    none = fit_verdict(1, 66, 36032, 200, 0.999, *_predictions(1, 9))
    assert confirm_on_test(none, "gain")["verdict"] == "found"
    found = fit_verdict(1, 3836, 36032, 200, 0.999, *_predictions(49, 5))
    harmful = confirm_on_test(found, "loss")
    assert harmful["verdict"] == "harmful" and harmful["summary"].startswith(
        "The guard harms on the test set: masking lowers worst-group accuracy there beyond test-set noise; deploy "
        "the model as it is, without the guard. On validation:")
    assert confirm_on_test(found, "gain")["decided_on"] == "validation and test"
    assert confirm_on_test(found, "gain")["summary"].endswith("the test set confirms it: masking raises worst-group "
                                                              "accuracy there beyond test-set noise")
    # Otherwise the fit's verdict stands, and says the test set could not settle it; no advice to run one.
    for change, said in (("noise", "within test-set noise, so it cannot settle this"),
                         ("too few", "holds too few images to settle this")):
        stands = confirm_on_test(unconfirmed, change)
        assert stands["verdict"] == "unconfirmed" and stands["decided_on"] == "validation" and said in stands["summary"]
        assert "Settle it on a test set" not in stands["summary"]
        assert stands["summary"].endswith("more images where the artefact and the label disagree may settle it")
    assert confirm_on_test(none, "noise")["summary"].endswith("Nothing to guard: deploy the model as it is, without "
                                                              "the guard")


def test_masking_that_fixes_the_images_a_shortcut_misleads_confirms_it_where_the_worst_group_cannot():
    """A 3-class walkthrough: a ruler tied to nevus. Masking fixed keratosis and melanoma with the ruler
    (0.36 -> 0.95, 0.69 -> 0.95) but the worst cell, nevus without it, is one masking never touches."""
    from edgeshort.detect.verdict import artefact_fixes

    labels = np.repeat([0, 1, 2], 150)  # keratosis, melanoma, nevus; each half with the ruler
    groups = np.tile(np.repeat([0, 1], 75), 3)
    original, ablated = labels.copy(), labels.copy()
    cell = {c: np.flatnonzero((labels == c) & (groups == 1)) for c in range(3)}
    original[cell[0][:48]] = original[cell[1][:23]] = 2  # the ruler pulls them to nevus; masking fixes them
    ablated[cell[2][:60]] = 0  # nevus with the ruler, masked, is mostly missed: the model has little else
    original[np.flatnonzero((labels == 2) & (groups == 0))[:55]] = 0  # nevus without it is missed anyway
    ablated[np.flatnonzero((labels == 2) & (groups == 0))[:55]] = 0
    fixes = artefact_fixes(original, ablated, labels, groups)
    assert fixes == {"class": 2, "images": 150, "fixed": 71, "broken": 0, "p_helps": fixes["p_helps"],
                     "along_images": 75, "along_fixed": 0, "along_broken": 60}
    assert fixes["p_helps"] < 1e-20
    unconfirmed = fit_verdict(1, 411, 14016, 200, 0.999, *_predictions(13, 113))
    confirmed = confirm_on_test(unconfirmed, "noise", fixes, ["keratosis", "melanoma", "nevus"])
    assert confirmed["verdict"] == "found" and confirmed["decided_on"] == "test"
    assert confirmed["summary"].startswith(
        "Shortcut found, confirmed on the test set: masking fixed 71 of the 150 test images that carry the artefact "
        "against their class (the model ties it to nevus) and broke 0 (sign test p = ")
    assert ("and broke 0 (sign test p = 4.2e-22); of the 75 nevus images carrying it, it broke 60 and fixed 0: the "
            "model has little else for nevus there; worst-group accuracy moves only within test-set noise. On "
            "validation:") in confirmed["summary"]
    found = fit_verdict(1, 3836, 36032, 200, 0.999, *_predictions(49, 5))
    assert "the test set confirms it: masking fixed 71 of the 150" in confirm_on_test(found, "too few", fixes)["summary"]
    # A loss of the worst group still makes the guard harmful; a gain needs no second look.
    assert confirm_on_test(unconfirmed, "loss", fixes)["verdict"] == "harmful"
    # Masking that does not fix them beyond chance: the fit's verdict stands, with the counts, not advice to
    # find more such images.
    even = {**fixes, "fixed": 5, "broken": 4, "p_helps": 0.5}
    stands = confirm_on_test(unconfirmed, "noise", even)
    assert stands["verdict"] == "unconfirmed" and stands["summary"].endswith(
        "masking fixed 5 of the 150 test images that carry the artefact against their class and broke 4, no "
        "difference beyond chance")
    few = {**even, "images": 5}
    assert confirm_on_test(unconfirmed, "noise", few)["summary"].endswith("may settle it")
    # A model that does not tie the artefact to a class: the class whose predictions rise most, and no fixes.
    unrelated = artefact_fixes(labels, labels, labels, groups)
    assert (unrelated["fixed"], unrelated["broken"], unrelated["p_helps"]) == (0, 0, 1.0)


def _demo_val_without(demo_data, rates: tuple[float, float], size: int = 600):
    """The demo's validation recipe, `size` images, with artefact rates (benign, malignant)."""
    from edgeshort.data import SplitSpec, generate_split
    from edgeshort.demo import DEMO_DATA

    return generate_split(replace(DEMO_DATA, val=SplitSpec(size, rates)), "val")


def test_a_shortcut_the_validation_images_do_not_show_is_not_found_and_not_exported(demo_vit, demo_data, tmp_path,
                                                                                    capsys):
    from edgeshort.demo import DEMO_DETECTOR
    from edgeshort.detect import ShortcutDetector
    from edgeshort.export import ExportOptions, export_bundle

    clean = _demo_val_without(demo_data, (0.0, 0.0))
    result = ShortcutDetector(replace(DEMO_DETECTOR, progress=False)).fit(demo_vit, clean, run_dir=tmp_path / "run")
    verdict = result.metrics["shortcut_verdict"]
    assert verdict["verdict"] == "none" and verdict["over_chance"] < 10
    assert result.summary().startswith("verdict: No shortcut found")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["shortcut_verdict"] == verdict
    # Artefact labels on the validation images (here made up: most of the cluster, a few outside) check the
    # verdict; they do not change the clusters.
    import copy

    labelled = copy.copy(clean)
    members = result.clustering.assignments == result.shortcut_cluster
    labelled.groups = (members | (np.arange(len(clean)) % 10 == 0)).astype(np.int64)
    checked = ShortcutDetector(replace(DEMO_DETECTOR, progress=False)).fit(demo_vit, labelled)
    np.testing.assert_array_equal(checked.clustering.assignments, result.clustering.assignments)
    judged = checked.metrics["shortcut_verdict"]
    assert judged["artefact_in_cluster"] == int(members.sum()) and judged["artefact_outside"] > 0
    # Dozens carry the made-up artefact against their class: masking could have shown a shortcut, so none stands.
    assert judged["verdict"] == "none" and judged["artefact_against_class"] >= 7
    assert f"the validation images' artefact labels put the artefact on {int(members.sum())} of cluster" in \
        judged["summary"]
    from edgeshort.report.html import write_report

    page = write_report(tmp_path / "run").read_text()
    assert '<p class="headline"><span class="no">No shortcut found</span></p>' in page
    # The guard's diagnostics below say they show no shortcut.
    assert page.count("The verdict is &ldquo;No shortcut found&rdquo;") == 2 and "— the guard&#x27;s cluster" in page
    assert "— shortcut cluster" not in page
    options = ExportOptions(formats=("onnx",), graphs="fused", skl2onnx_check=False, progress=False)
    with pytest.raises(InputError, match="the run's verdict: No shortcut found.* pass --ignore-verdict"):
        export_bundle(tmp_path / "run", tmp_path / "bundle", options, calibration=clean)
    assert not (tmp_path / "bundle").exists()
    from edgeshort.cli import main

    # A pipeline tells the refusal from a mistake by its exit code.
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "bundle"), "--formats", "onnx"]) == 4
    assert "edgeshort export: error: the run's verdict: No shortcut found" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()
    # Exported anyway, the bundle carries the verdict, and the runtime logs it with the other warnings.
    bundle = export_bundle(tmp_path / "run", tmp_path / "bundle", replace(options, ignore_verdict=True),
                           calibration=clean)
    assert bundle.manifest["guard"]["verdict"]["verdict"] == "none"
    assert verdict["summary"] in bundle.manifest["guard"]["warnings"]
    # The runtime's own outputs do not call its flags a shortcut.
    from edgeshort.bench import bench_bundle, markdown_table
    from edgeshort.runtime import Guard

    assert Guard.load(bundle.root, backend="onnxruntime").info.verdict == "none"
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        clean.image(i).save(images / f"{i}.png")
    assert main(["predict", str(bundle.root), str(images), "--backend", "onnxruntime", "-o",
                 str(tmp_path / "records.jsonl")]) == 0
    said = capsys.readouterr().err
    assert "with tokens flagged and masked (the bundle's verdict is 'none', not 'found'" in said
    assert "with a shortcut" not in said
    results = bench_bundle(bundle.root, backends=["onnxruntime"], batches=(1,), rounds=1, block=1,
                           seed_pipeline=False, progress=False)
    assert "The bundle's verdict is 'none', not 'found'" in markdown_table(results)
    # A guard a test set shows harmful is refused too.
    from edgeshort.detect.verdict import TEST_VERDICT

    result.metrics[TEST_VERDICT] = confirm_on_test(verdict, "loss")
    with pytest.raises(InputError, match="the run's verdict: The guard harms on the test set"):
        export_bundle(result, tmp_path / "other", options, calibration=clean)


def test_a_cluster_the_score_ranks_second_is_guarded_when_only_its_tokens_stand_apart(demo_vit, demo_data,
                                                                                        monkeypatch, tmp_path):
    """The score knows classes and confidence, not artefacts: where it ranks a clean cluster first (as on an
    ISIC-like validation set, where one of three demo-recipe models then lost worst-group accuracy, 0.255 to
    0.145), the cluster whose tokens stand apart carries the guard."""
    from edgeshort.demo import DEMO_DETECTOR
    from edgeshort.detect import ShortcutDetector, detector

    val = _demo_val_without(demo_data, (0.5, 0.2))
    score = detector.score_clusters
    monkeypatch.setattr(detector, "score_clusters", lambda *args: [replace(s, score=-s.score) for s in score(*args)])
    result = ShortcutDetector(replace(DEMO_DETECTOR, progress=False)).fit(demo_vit, val, run_dir=tmp_path / "run")
    m = result.metrics
    artefact_cluster = int(np.bincount(result.clustering.assignments, weights=val.groups).argmax())
    assert m["shortcut_cluster"] == artefact_cluster != m["shortcut_cluster_by_score"]
    assert m["shortcut_cluster_group_purity"] > 0.9
    verdict = m["shortcut_verdict"]
    assert verdict["verdict"] == "found" and verdict["passed_over"][0]["cluster"] == m["shortcut_cluster_by_score"]
    assert (f"the cluster score ranked cluster {m['shortcut_cluster_by_score']} (") in verdict["summary"]
    assert f"higher, whose tokens do not stand apart, so the guard is built on cluster {artefact_cluster}" in (
        verdict["summary"])
    from edgeshort.report.html import write_report

    page = write_report(tmp_path / "run").read_text()
    assert f"below cluster {m['shortcut_cluster_by_score']}'s" in page and "a margin of <strong>" not in page


def test_a_shortcut_validation_cannot_confirm_is_confirmed_by_a_test_set(demo_vit, demo_data, capsys):
    from edgeshort.demo import DEMO_DETECTOR
    from edgeshort.detect import ShortcutDetector

    # As at many hospitals: the artefact sits on benign images only, so masking it has nothing to fix there.
    isic_like = _demo_val_without(demo_data, (0.5, 0.0))
    result = ShortcutDetector(replace(DEMO_DETECTOR, progress=False)).fit(demo_vit, isic_like)
    verdict = result.metrics["shortcut_verdict"]
    assert verdict["verdict"] == "unconfirmed" and verdict["over_chance"] > 10
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
    # Nor do images of one artefact group alone: their worst group says nothing about the artefact.
    clean = test.subset(np.flatnonzero(test.groups == 0)[:200])
    metrics = result.evaluate(clean)
    assert metrics["shortcut_verdict_test"] is None
    assert any(w.startswith("every test image lacks the artefact, by its labels") for w in metrics["test_warnings"])

"""The results table and its confidence intervals: how sure a small test set lets one be."""

from __future__ import annotations

import numpy as np
import pytest

from edgeshort.errors import InputError
from edgeshort.evaluation import (
    MIN_CELL_FOR_VERDICT,
    bootstrap_intervals,
    change_verdict,
    describe_change,
    dfr_loss_warning,
    format_table,
    group_accuracy,
)


def _balanced(n_per_cell: int, num_classes: int = 2):
    labels = np.repeat(np.arange(num_classes), 2 * n_per_cell)
    groups = np.tile(np.repeat([0, 1], n_per_cell), num_classes)
    return labels, groups


def test_a_step_that_changes_nothing_has_a_zero_interval():
    labels, groups = _balanced(50)
    rng = np.random.default_rng(0)
    guesses = np.where(rng.random(len(labels)) < 0.8, labels, 1 - labels)
    out = bootstrap_intervals({"original": guesses, "ablated": guesses.copy()}, labels, groups, 2)
    (change,) = out["changes"]
    assert change["worst_interval"] == [0.0, 0.0] and change["average_interval"] == [0.0, 0.0]
    worst = group_accuracy(guesses, labels, groups, ("a", "b"))["worst"]
    lo, hi = out["kinds"]["original"]["worst"]
    assert lo <= worst <= hi and lo < hi  # the point estimate lies inside; 50 images per cell leave doubt


def test_interval_separates_a_real_fix_from_noise():
    labels, groups = _balanced(200)
    rng = np.random.default_rng(1)
    before = labels.copy()
    worst_cell = (labels == 1) & (groups == 1)
    before[worst_cell & (rng.random(len(labels)) < 0.5)] = 0  # half the worst cell wrong
    fixed = labels.copy()  # every image right
    jitter = before.copy()
    jitter[np.flatnonzero(worst_cell & (before == labels))[:3]] = 0  # three images newly wrong,
    jitter[np.flatnonzero(worst_cell & (before != labels))[:2]] = 1  # two newly right: noise at 200
    out = bootstrap_intervals({"before": before, "fixed": fixed, "jitter": jitter}, labels, groups, 2)
    gain, loss = out["changes"]
    assert gain["from"] == "before" and gain["to"] == "fixed" and gain["worst_interval"][0] > 0.3
    # fixed -> jitter is a larger drop: fixed is perfect, jitter is half wrong in one cell.
    assert loss["worst_interval"][1] < 0
    # One image net of 200 is not a finding.
    table = {k: group_accuracy(v, labels, groups, ("a", "b")) for k, v in (("before", before), ("jitter", jitter))}
    close = bootstrap_intervals({"before": before, "jitter": jitter}, labels, groups, 2)
    lo, hi = close["changes"][0]["worst_interval"]
    assert lo < table["jitter"]["worst"] - table["before"]["worst"] < hi and lo < 0 < hi
    text = format_table(table, close)
    assert "95% CI" in text and "within test-set noise" in text


def test_three_classes_with_an_empty_cell_and_a_fixed_seed():
    labels, groups = _balanced(30, num_classes=3)
    keep = ~((labels == 2) & (groups == 1))  # class 2 never carries the artefact
    labels, groups = labels[keep], groups[keep]
    preds = labels.copy()
    preds[:7] = 1
    a = bootstrap_intervals({"original": preds, "dfr": labels}, labels, groups, 3, seed=3)
    b = bootstrap_intervals({"original": preds, "dfr": labels}, labels, groups, 3, seed=3)
    assert a == b
    assert a["kinds"]["dfr"]["worst"] == [1.0, 1.0]
    assert a["kinds"]["original"]["worst"][0] < 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"predictions": {}}, "at least one kind"), ({"confidence": 1.5}, "confidence"),
     ({"groups": np.zeros(3, int)}, "one group per prediction"),
     ({"predictions": {"original": np.zeros(3, int)}}, "one group per prediction")],
)
def test_bad_input_is_named(kwargs, match):
    labels, groups = _balanced(5)
    args = {"predictions": {"original": labels}, "labels": labels, "groups": groups, "num_classes": 2} | kwargs
    with pytest.raises(InputError, match=match):
        bootstrap_intervals(**args)


def test_dfr_warning_only_for_a_worst_group_loss_beyond_noise():
    labels, groups = _balanced(200)
    worst_cell = np.flatnonzero((labels == 1) & (groups == 1))
    ablated = labels.copy()
    ablated[worst_cell[:10]] = 0
    names = ("benign", "malignant")

    def warning_for(dfr):
        kinds = {"original": ablated, "ablated": ablated, "dfr": dfr}
        tables = {k: group_accuracy(v, labels, groups, names) for k, v in kinds.items()}
        return dfr_loss_warning(tables, bootstrap_intervals(kinds, labels, groups, 2))

    lost = ablated.copy()
    lost[worst_cell[10:50]] = 0  # 40 more of the worst cell's 200 wrong: far beyond noise
    warning = warning_for(lost)
    assert warning is not None and "ablated + DFR vs ablated: -0.200" in warning and "a real loss" in warning
    assert "edgeshort export --no-dfr" in warning
    noise = ablated.copy()
    noise[worst_cell[10:12]] = 0  # two images: what a test set of 200 per cell cannot resolve
    assert warning_for(noise) is None
    assert warning_for(labels.copy()) is None  # a gain


def test_guard_warning_only_when_masking_loses_beyond_noise():
    # A guard whose flags mask the object lowers worst-group accuracy against the unguarded model.
    from edgeshort.evaluation import guard_loss_warning

    labels, groups = _balanced(200)
    worst_cell = np.flatnonzero((labels == 1) & (groups == 1))
    names = ("benign", "malignant")

    def warning_for(ablated):
        kinds = {"original": labels, "ablated": ablated}
        tables = {k: group_accuracy(v, labels, groups, names) for k, v in kinds.items()}
        return guard_loss_warning(tables, bootstrap_intervals(kinds, labels, groups, 2))

    masked_object = labels.copy()
    masked_object[worst_cell[:40]] = 0
    warning = warning_for(masked_object)
    assert "the guard lowers worst-group accuracy on this test set (worst group, ablated vs original: -0.200" in warning
    assert "or an artefact the model does not rely on" in warning and warning.endswith("do not ship this bundle as it is")
    # On test images that all lack the artefact, a loss is what the guard costs on clean images: a trade-off.
    kinds = {"original": labels, "ablated": masked_object}
    tables = {k: group_accuracy(v, labels, groups, names) for k, v in kinds.items()}
    clean_only = guard_loss_warning(tables, bootstrap_intervals(kinds, labels, groups, 2), one_group=False)
    assert "on these test images without the artefact" in clean_only and "Weigh it against" in clean_only
    assert "do not ship" not in clean_only
    slight = labels.copy()
    slight[worst_cell[:2]] = 0
    assert warning_for(slight) is None and warning_for(labels.copy()) is None


def test_guard_warning_for_an_average_loss_the_worst_cell_hides():
    """A guard that lifts the worst cell by no more than noise while costing every other cell lowers average group
    accuracy beyond noise: that warns too. A real worst-group gain beside it is the trade removing a shortcut
    makes, and does not. On the guard's own flag groups (no artefact labels) the warning says so."""
    from edgeshort.evaluation import guard_loss_warning

    labels, groups = _balanced(200)
    names = ("benign", "malignant")
    original = labels.copy()
    worst = np.flatnonzero((labels == 1) & (groups == 1))
    original[worst[:100]] = 0  # the worst cell at 0.5

    def warning_for(fixed: int, by_flag: bool = False):
        ablated = labels.copy()
        ablated[worst[fixed : 100 + fixed // 2]] = 0  # the worst cell: `fixed` images right, half as many wrong ...
        for cell in [np.flatnonzero((labels == c) & (groups == g)) for c, g in ((0, 0), (0, 1), (1, 0))]:
            ablated[cell[:60]] = 1 - labels[cell[:60]]  # ... while every other cell loses 0.3
        kinds = {"original": original, "ablated": ablated}
        tables = {k: group_accuracy(v, labels, groups, names) for k, v in kinds.items()}
        return guard_loss_warning(tables, bootstrap_intervals(kinds, labels, groups, 2), by_flag)

    warning = warning_for(8)  # 0.50 -> 0.52: within noise
    assert warning.startswith("the guard lowers average group accuracy on this test set (average group, ablated vs "
                              "original: -0.220")
    assert "measured on the guard's own flag groups" in warning_for(8, by_flag=True)
    assert "measured on the guard's own flag groups" not in warning
    assert warning_for(60) is None  # 0.50 -> 0.65, a real gain: the trade a removed shortcut makes


def test_a_cell_of_a_few_images_is_not_called_a_gain():
    """Three images of a cell all fixed give a bootstrap interval of +1 to +1; that is no finding."""
    labels, groups = _balanced(3)
    before = labels.copy()
    before[(labels == 1) & (groups == 1)] = 0
    kinds = {"original": before, "ablated": labels}
    tables = {k: group_accuracy(v, labels, groups, ("a", "b")) for k, v in kinds.items()}
    change = bootstrap_intervals(kinds, labels, groups, 2)["changes"][0]
    assert change["worst_interval"] == [1.0, 1.0]
    assert change_verdict(change, tables) == "too few"
    assert "too few images in the smallest cell" in describe_change(change, tables, 0.95)
    big_labels, big_groups = _balanced(MIN_CELL_FOR_VERDICT)
    big = {"original": np.where((big_labels == 1) & (big_groups == 1), 0, big_labels), "ablated": big_labels}
    big_tables = {k: group_accuracy(v, big_labels, big_groups, ("a", "b")) for k, v in big.items()}
    assert change_verdict(bootstrap_intervals(big, big_labels, big_groups, 2)["changes"][0], big_tables) == "gain"


@pytest.mark.parametrize(("changed", "called"), [(4, "too few changed"), (8, "real")])
def test_a_worst_group_change_needs_enough_changed_images_to_be_real(changed, called):
    """Four images of fifty fixed, none broken: the percentile interval excludes zero, yet the exact test
    gives p = 0.06. A gain or a loss on so few changes would settle the run's verdict on noise."""
    labels, groups = _balanced(50)
    worst = np.flatnonzero((labels == 1) & (groups == 1))
    before = labels.copy()
    before[worst[:25]] = 0  # the worst cell at 25 of 50
    after = before.copy()
    after[worst[:changed]] = 1
    for kinds, direction in (({"original": before, "ablated": after}, "gain"),
                             ({"original": after, "ablated": before}, "loss")):
        tables = {k: group_accuracy(v, labels, groups, ("a", "b")) for k, v in kinds.items()}
        change = bootstrap_intervals(kinds, labels, groups, 2)["changes"][0]
        lo, hi = change["worst_interval"]
        assert (lo > 0) if direction == "gain" else (hi < 0), "the interval alone would call it"
        said = describe_change(change, tables, 0.95)
        if called == "real":
            assert change_verdict(change, tables) == direction and f"a real {direction}" in said
        else:
            assert change_verdict(change, tables) == "noise"
            assert said.endswith("too few images changed to tell from test-set noise)")
        # A run saved before the counts were kept is judged by its interval, as it was.
        del change["changed_per_cell"]
        assert change_verdict(change, tables) == direction


def test_an_average_change_weighs_each_changed_image_as_the_average_does():
    """30 images fixed in a cell of 1,000 and 10 broken in a cell of 20: a pooled count (30 against 10) calls it
    a gain or noise, yet average group accuracy, which weighs every cell alike, falls by 0.12."""
    cells = {(0, 0): 1000, (0, 1): 20, (1, 0): 50, (1, 1): 50}
    labels = np.concatenate([np.full(n, c) for (c, _), n in cells.items()])
    groups = np.concatenate([np.full(n, g) for (_, g), n in cells.items()])
    before, after = labels.copy(), labels.copy()
    before[:30] = 1  # wrong in the big cell, fixed after
    after[1000:1010] = 1  # right in the small cell, broken after
    kinds = {"original": before, "ablated": after}
    tables = {k: group_accuracy(v, labels, groups, ("a", "b")) for k, v in kinds.items()}
    change = bootstrap_intervals(kinds, labels, groups, 2)["changes"][0]
    assert change["average_interval"][1] < 0
    assert change_verdict(change, tables, "average") == "loss"
    assert "a real loss" in describe_change(change, tables, 0.95, stat="average")


def test_the_sign_test_is_exact_on_few_and_many_changes():
    from scipy.stats import binomtest

    from edgeshort.evaluation import sign_test

    for wins, losses in [(0, 0), (4, 0), (65, 5), (5, 65), (20, 20), (10100, 9900), (100, 10000)]:
        expected = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue if wins + losses else 1.0
        assert sign_test(wins, losses) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_each_class_gets_its_recall_over_all_its_images():
    """Sensitivity and specificity (two classes) are what a clinician reads first: per class over all its images,
    whatever the groups."""
    labels, groups = _balanced(10)
    predictions = labels.copy()
    predictions[np.flatnonzero(labels == 1)[:5]] = 0  # 5 of 20 malignant missed
    table = group_accuracy(predictions, labels, groups, ("benign", "malignant"))
    assert table["classes"] == {"benign": 1.0, "malignant": 0.75}
    text = format_table({"original": table})
    assert "recall benign                          1.000" in text and "recall malignant                       0.750" in text


def test_a_cell_a_step_collapses_is_named_where_worst_and_average_let_it_pass():
    """A 3-class walkthrough: masking took nevus with the ruler from 1.000 to 0.200 while the worst group (nevus
    without it, 0.267) moved within noise; DFR repaired it but cost clean melanoma 0.973 -> 0.853."""
    from edgeshort.evaluation import dfr_cell_warning, guard_cell_warning

    labels, groups = _balanced(75, num_classes=3)
    names = ("keratosis", "melanoma", "nevus")
    cell = {(c, g): np.flatnonzero((labels == c) & (groups == g)) for c in range(3) for g in range(2)}
    original, ablated, dfr = labels.copy(), labels.copy(), labels.copy()
    original[cell[(2, 0)][:55]] = ablated[cell[(2, 0)][:55]] = 0  # nevus without the ruler, missed throughout
    original[cell[(0, 1)][:48]] = 2  # the ruler pulls keratosis to nevus; masking fixes it
    ablated[cell[(2, 1)][:60]] = 0  # nevus with the ruler, masked: little else to go on
    dfr[cell[(2, 0)][:14]] = dfr[cell[(2, 1)][:14]] = 0
    dfr[cell[(1, 0)][:9]] = 2  # DFR's trade: clean melanoma called nevus
    kinds = {"original": original, "ablated": ablated, "dfr": dfr}
    tables = {k: group_accuracy(v, labels, groups, names) for k, v in kinds.items()}
    intervals = bootstrap_intervals(kinds, labels, groups, 3)
    assert guard_cell_warning(tables, intervals) == (
        "masking lowers nevus / artefact from 1.000 to 0.200 (60 broken, 0 fixed): the flags there mask what the "
        "model needs, an artefact it leans on for want of anything else, or part of the object (see the flag "
        "pictures); the DFR head, the bundle's default final label, gives 0.813 there (`edgeshort "
        "export --no-dfr` would ship the masked prediction)")
    assert dfr_cell_warning(tables, intervals).startswith(
        "the DFR head lowers melanoma / no artefact from 1.000 to 0.880 (9 broken, 0 fixed): weigh that against its "
        "gain before shipping it")
    # A few images either way, or a drop under 0.10, is not named.
    few = labels.copy()
    few[cell[(1, 0)][:5]] = 2
    calm = {"original": labels, "ablated": few}
    calm_tables = {k: group_accuracy(v, labels, groups, names) for k, v in calm.items()}
    assert guard_cell_warning(calm_tables, bootstrap_intervals(calm, labels, groups, 3)) is None
    assert dfr_cell_warning(tables, {"changes": []}) is None

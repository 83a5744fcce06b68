"""Whether a run found a shortcut worth guarding: the verdict a fit gives, and a test set may settle.

The detector always ranks the clusters and trains a guard on the best one, shortcut or not. Two
checks on the validation images (no artefact labels needed) say whether that guard acts on
something the model relies on:

- *distinct*: the shortcut cluster holds far more tokens hotter than nearly every clean token
  (`positive_quantile`, measured on enough clean tokens) than chance puts there (1 - quantile of
  its tokens). On the demo recipe, three training seeds each: 112 to 158 times
  chance with a learned shortcut (58 to 94 where the artefact never disagrees with the label in the
  validation images); 0.4 to 1.8 times for models trained with the artefact absent or unrelated to
  the label.
- *helps*: masking the flagged tokens fixes more validation predictions than it breaks, beyond
  chance (exact sign test on the predictions it changes, McNemar's exact test). Those models: 49,
  60 and 70 fixed against 3, 19 and 7 broken with the shortcut; 0 to 16 fixed against 9 to 220
  broken without.

Both make a shortcut found; neither, no shortcut. Masking that helps without distinct tokens (a small
artefact, or one images outside the cluster carry too), or distinct tokens whose masking does not
help, leave it unconfirmed. Where distinctness is not measured (too few clean tokens, or
`positives="hottest"`), the sign test alone decides between found and unconfirmed.

Where the artefact never disagrees with the label in the validation images, masking a shortcut the
model relies on has nothing to fix there and can only break, so a loss on validation does not show
that the model ignores the artefact: it leaves the verdict unconfirmed. A test set with both
artefact groups settles it by its worst-group change: a real gain is a shortcut found, a real loss
a harmful guard; where it moves within noise, masking that fixes the test images carrying the
artefact against the class the model ties it to, beyond chance, is a shortcut found
(`artefact_fixes`). Artefact labels on the validation images check a `none` (`in_light_of_artefact_labels`).
"""

from __future__ import annotations

import math

import numpy as np

from edgeshort.evaluation import changed_per_cell, sign_test

# The verdicts.
FOUND = "found"
UNCONFIRMED = "unconfirmed"
NONE_FOUND = "none"
HARMFUL = "harmful"  # masking lowers a labelled test set's worst group beyond noise
# Verdicts under which a bundle's guard would act on no shortcut found, or harm: export refuses them unless told.
DO_NOT_GUARD = (NONE_FOUND, HARMFUL)
# Below this, the sign test's side decides (the run's other tests use the same level).
VERDICT_P_VALUE = 0.01
# A cluster's tokens stand apart when at least this many times as many pass the clean tokens' quantile as
# chance puts there (measured above: 58 to 158 with a learned shortcut, at most 1.8 without).
DISTINCT_OVER_CHANCE = 10
# A cluster passes the clean tokens' quantile test only when this many clean tokens are expected above the
# quantile (10,000 tokens for 99.9%): over a few hundred it is their maximum, and chance alone passes it.
MIN_NULL_EXCEEDANCES = 10
# Share of validation images with a shortcut found from which the flags mark what every image has, not an
# artefact some carry: the fit warns, and masking them says nothing about an artefact.
MOST_FLAGGED_IMAGES = 0.9
VERDICT = "shortcut_verdict"
TEST_VERDICT = "shortcut_verdict_test"
NOTHING_TO_GUARD = "Nothing to guard: deploy the model as it is, without the guard"
CONFIRM_ADVICE = ("Settle it on a test set with artefact labels (edgeshort detect --eval TEST with --eval-columns "
                  "group=COLUMN, or result.evaluate) before shipping the guard")


def null_tokens_needed(quantile: float) -> int:
    """Clean tokens a `quantile` threshold needs to rest on: MIN_NULL_EXCEEDANCES of them above it."""
    return math.ceil(round(MIN_NULL_EXCEEDANCES / (1 - quantile), 6))


def over_chance(candidates: int, tokens: int, quantile: float) -> float:
    """How many times as many of a cluster's `tokens` pass the clean tokens' `quantile` as chance puts there."""
    return candidates / max((1 - quantile) * tokens, 1e-9)


def stands_apart(candidates: int | None, tokens: int, quantile: float, null_tokens: int | None = None) -> bool | None:
    """Whether a cluster's tokens stand apart from clean ones: `candidates` of its `tokens` past the clean
    tokens' `quantile` (estimated on `null_tokens`), against chance; None when not measured, or when they pass
    on too few clean tokens to tell. Over a few hundred clean tokens the quantile is their maximum, below the
    true one, which lets too many pass: a pass needs enough of them, a failure stands regardless."""
    if candidates is None:
        return None
    # Rounded: 10 x 0.001 x 78,400 is 784.0000000000007 in floating point, and 784 must pass.
    apart = candidates >= round(DISTINCT_OVER_CHANCE * (1 - quantile) * tokens, 6)
    if apart:
        from scipy.stats import binom

        # And beyond chance: 2 of a one-image cluster's 196 tokens are 10 times chance, and chance gives that
        # one time in sixty.
        apart = float(binom.sf(candidates - 1, tokens, 1 - quantile)) <= VERDICT_P_VALUE
    if apart and null_tokens is not None and null_tokens < null_tokens_needed(quantile):
        return None
    return apart


def fit_verdict(cluster: int, candidates: int | None, tokens: int, positives: int, quantile: float,
                original: np.ndarray, ablated: np.ndarray, labels: np.ndarray, null_tokens: int | None = None,
                passed_over: list[dict] = (), groups: np.ndarray | None = None) -> dict:
    """The verdict of a fit. `candidates`: the shortcut cluster's tokens hotter than `quantile` of clean
    tokens, of its `tokens` (None when positives are not calibrated, `positives="hottest"`: then only the
    second check runs), the quantile estimated on `null_tokens` clean tokens; `positives`: how many the KNN
    takes; `original`, `ablated`: validation predictions (class indices) before and after masking, against
    `labels`; `passed_over`: clusters the score ranked higher whose tokens did not stand apart; `groups`: the
    validation images' artefact labels, where known, which only say how many images masking could fix."""
    ((fixed, broken),) = changed_per_cell(original == labels, ablated == labels, [np.arange(len(labels))])
    p_helps, p_harms = sign_test(fixed, broken), sign_test(broken, fixed)
    times_chance = None if candidates is None else over_chance(candidates, tokens, quantile)
    distinct = stands_apart(candidates, tokens, quantile, null_tokens)
    changes = f"masking them fixed {fixed} validation predictions and broke {broken}"
    if candidates is None:
        apart = f"cluster {cluster}'s tokens were not measured against clean ones (positives='hottest')"
    else:
        apart = (f"{candidates:,} of cluster {cluster}'s {tokens:,} tokens are hotter than {quantile:.1%} of clean "
                 f"tokens, {times_chance:.1f} times chance")
        if distinct is None:
            apart += (f", but that quantile rests on only {null_tokens:,} clean tokens (it needs "
                      f"{null_tokens_needed(quantile):,}), so whether they stand apart is not measured")
    if passed_over:
        higher = ", ".join(f"{p['cluster']} ({p['over_chance']:.1f} times chance)" for p in passed_over)
        apart += (f"; the cluster score ranked cluster{'s' if len(passed_over) > 1 else ''} {higher} higher, whose "
                  f"tokens do not stand apart, so the guard is built on cluster {cluster}")
    needs = f"a shortcut needs {DISTINCT_OVER_CHANCE} times chance, and more than chance would give"
    advice = ""
    if distinct is False and p_helps > VERDICT_P_VALUE:
        verdict, title = NONE_FOUND, "No shortcut found"
        finding = (f"no cluster's tokens stand apart from clean ones: {apart} ({needs}), so the guard would mask "
                   f"parts of ordinary images ({changes})")
        advice = (f"{NOTHING_TO_GUARD}. An artefact the validation images do not show cannot be found")
    elif distinct is False:
        # Masking helps beyond chance: the flags hold something the model wrongly relies on, however few.
        verdict, title = UNCONFIRMED, "Shortcut not confirmed"
        finding = (f"{apart} ({needs}), yet {changes} (sign test p = {p_helps:.2g}): a small artefact, or one "
                   "that images outside the cluster carry too")
        advice = CONFIRM_ADVICE
    elif p_helps <= VERDICT_P_VALUE:
        verdict, title = FOUND, "Shortcut found"
        finding = f"{apart}, and {changes} (sign test p = {p_helps:.2g})"
    else:
        verdict, title = UNCONFIRMED, "Shortcut not confirmed"
        but = ", and" if distinct is None else ", but"  # "not measured" already ends in a "but" clause
        against = None if groups is None or not (groups == 1).any() else int(against_class(groups, labels).sum())
        if against is not None and against >= fewest_changes_to_show():
            few = (f"; the artefact labels put it on {against} validation images against their class, so masking had "
                   "predictions to fix")
        elif p_harms <= VERDICT_P_VALUE:
            few = (", or the validation images hold none where the artefact and the label disagree, which leaves "
                   "masking nothing to fix")
        else:
            few = "; the validation images may hold few where the artefact and the label disagree"
        if p_harms <= VERDICT_P_VALUE:
            finding = (f"{apart}{but} {changes} (sign test p = {p_harms:.2g} that it harms): either the model does "
                       f"not rely on them, or it relies on little else (masking then leaves it guessing){few}")
        else:
            finding = f"{apart}{but} {changes}, no difference beyond chance{few}"
        advice = CONFIRM_ADVICE
    return {"verdict": verdict, "summary": _summary(title, finding, advice), "title": title, "finding": finding,
            "measured": f"{apart}{f' ({needs})' if distinct is False else ''}, and {changes}",
            "candidates": candidates, "tokens": tokens,
            "over_chance": times_chance, "null_tokens": null_tokens, "passed_over": list(passed_over),
            "knn_positives": positives, "fixed": fixed, "broken": broken, "p_helps": p_helps, "p_harms": p_harms,
            "decided_on": "validation"}


def fewest_changes_to_show(p_value: float = VERDICT_P_VALUE) -> int:
    """The fewest changed predictions, all one way, that an exact sign test calls beyond chance (7 at 0.01)."""
    changes = 1
    while sign_test(changes, 0) > p_value:
        changes += 1
    return changes


def against_class(groups: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The images carrying the artefact (1 in `groups`) of any class but the one carrying it most: those a
    shortcut the model relies on misleads, and masking it could fix."""
    carried = groups == 1
    classes = np.unique(labels)
    most = classes[np.argmax([carried[labels == c].mean() for c in classes])]
    return carried & (labels != most)


def in_light_of_artefact_labels(fit: dict, cluster: int, members: np.ndarray, groups: np.ndarray | None,
                                labels: np.ndarray, present: np.ndarray | None = None) -> dict:
    """A `none` verdict checked against the validation images' artefact labels (1 = the image carries it), which
    neither choose the cluster nor build the guard. `none` rests on both checks failing, and either can be blind:
    - the first measures the cluster's tokens against the other clusters' as clean ones; where the labels put the
      artefact outside the cluster too, that reference carries it, and tokens not standing apart show nothing;
    - the second needs predictions masking could fix: images that carry the artefact against their class (of any
      class but the one carrying it most) and that the guard masks (`present`, where given: a guard built on a
      cluster without the artefact leaves them unmasked). With fewer than its sign test needs all fixed (7 at
      p = 0.01), a shortcut the model relies on could not show.
    Where both are blind, or the artefact is on every image (nothing contrasts with it), the verdict is
    unconfirmed; otherwise `none` stands, and says how the labels spread."""
    if fit["verdict"] != NONE_FOUND or groups is None or not (groups == 1).any():
        return fit
    carried = groups == 1
    inside, outside = int(carried[members].sum()), int(carried[~members].sum())
    size, others = int(members.sum()), int((~members).sum())
    carriers_against = against_class(groups, labels)
    against = int(carriers_against.sum())
    masked = against if present is None else int((carriers_against & present.astype(bool)).sum())
    tracks = present is None or _guard_tracks(present.astype(bool), carried)
    needed = fewest_changes_to_show()
    labelled = (f"the validation images' artefact labels put the artefact on {inside} of cluster {cluster}'s {size} "
                f"images and on {outside} of the {others} outside it")
    counts = {"artefact_in_cluster": inside, "cluster_images": size, "artefact_outside": outside,
              "images_outside": others, "artefact_against_class": against, "artefact_against_class_masked": masked}
    if carried.all():
        blind = f"{labelled}: every validation image carries it, so nothing there contrasts with it"
    elif outside and (masked < needed or not tracks):
        if not tracks:
            rates = (f"{present[carried].mean():.0%} of the images carrying it and {present[~carried].mean():.0%} of "
                     "the others")
            carry = (f"the guard finds a shortcut in {rates}, so it does not single the artefact out, and what "
                     "masking does says nothing about it")
        elif masked == against:
            carry = (f"only {against} image{'' if against == 1 else 's'} carr{'ies' if against == 1 else 'y'} it "
                     f"against their class, fewer than the {needed} predictions masking would have to fix for its "
                     "sign test to show anything")
        else:
            carry = (f"of the {against} images carrying it against their class the guard masks only {masked}, fewer "
                     f"than the {needed} predictions masking would have to fix for its sign test to show anything")
        blind = f"{labelled}, so the clean tokens the cluster is measured against carry it too; and {carry}"
    else:
        masks = "" if masked == against else f", {masked} of them masked by the guard"
        spread = (f"and {against} carry it against their class{masks}, enough for masking to show a shortcut the "
                  "model relied on" if outside else "all of them in it")
        finding = f"{fit['finding']}; {labelled}, {spread}"
        return {**fit, **counts, "finding": finding, "summary": _summary(fit["title"], finding, NOTHING_TO_GUARD)}
    finding = f"{fit['measured']}; yet {blind}: neither check can see a shortcut in these images"
    title = "Shortcut not confirmed"
    return {**fit, **counts, "verdict": UNCONFIRMED, "title": title, "finding": finding,
            "summary": _summary(title, finding, CONFIRM_ADVICE)}


def _guard_tracks(present: np.ndarray, carried: np.ndarray) -> bool:
    """Whether the guard singles out the images carrying the artefact: it finds a shortcut in fewer than
    MOST_FLAGGED_IMAGES of all, and in those carrying it more often than in the others, beyond chance
    (one-sided Fisher exact test at VERDICT_P_VALUE)."""
    from scipy.stats import fisher_exact

    if present.mean() >= MOST_FLAGGED_IMAGES:
        return False
    table = [[int((present & carried).sum()), int((~present & carried).sum())],
             [int((present & ~carried).sum()), int((~present & ~carried).sum())]]
    return bool(fisher_exact(table, alternative="greater").pvalue <= VERDICT_P_VALUE)


def _summary(title: str, finding: str, advice: str = "") -> str:
    return f"{title}: {finding}" + (f". {advice}" if advice else "")


# What a labelled test set's worst-group change (`change_verdict`, original -> ablated) says, and its verdict.
_TEST_OUTCOMES = {
    "gain": (FOUND, "Shortcut found, confirmed on the test set",
             "masking raises worst-group accuracy there beyond test-set noise"),
    "loss": (HARMFUL, "The guard harms on the test set",
             "masking lowers worst-group accuracy there beyond test-set noise; deploy the model as it is, without "
             "the guard"),
    "noise": (None, None, "on the test set masking changes worst-group accuracy within test-set noise, so it cannot "
                          "settle this"),
    "too few": (None, None, "the test set's smallest (class, artefact) cell holds too few images to settle this"),
}


# Why the worst group did not settle it, where the images carrying the artefact against their class do.
_WORST_GROUP_SILENT = {
    "noise": "worst-group accuracy moves only within test-set noise",
    "too few": "the smallest (class, artefact) cell holds too few images for worst-group accuracy to tell",
}


def artefact_fixes(original: np.ndarray, ablated: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict:
    """What masking does to the test images that carry the artefact against the class the model ties it to: the
    class whose share of the model's (original) predictions rises most where the artefact is (1 in `groups`).
    Among the images carrying it of every other class, the predictions masking fixed and broke, with the exact
    sign test that it fixes more: a shortcut misleads exactly there, whichever cell is worst."""
    carried = groups == 1
    classes = np.unique(labels)
    rise = [(original[carried] == c).mean() - (original[~carried] == c).mean() for c in classes]
    tied = int(classes[int(np.argmax(rise))])
    against, along = carried & (labels != tied), carried & (labels == tied)
    (fixed, broken), (along_fixed, along_broken) = changed_per_cell(
        original == labels, ablated == labels, [np.flatnonzero(against), np.flatnonzero(along)])
    return {"class": tied, "images": int(against.sum()), "fixed": fixed, "broken": broken,
            "p_helps": sign_test(fixed, broken), "along_images": int(along.sum()), "along_fixed": along_fixed,
            "along_broken": along_broken}


def confirm_on_test(fit: dict, worst_group_change: str, artefact: dict | None = None,
                    class_names: list[str] | None = None) -> dict:
    """The fit's verdict in the light of a test set with both artefact groups: `worst_group_change` is its
    original-to-ablated worst-group verdict ("gain", "loss", "noise" or "too few", `change_verdict`). A real
    gain or loss settles it, whatever validation said. Where the worst group cannot, masking that fixes the
    images carrying the artefact against the class the model ties it to beyond chance (`artefact_fixes`) is a
    shortcut found: with three classes, the worst cell can be one masking never touches. Otherwise the fit's
    verdict stands, saying so."""
    verdict, title, said = _TEST_OUTCOMES[worst_group_change]
    if verdict is None and artefact is not None and artefact["p_helps"] <= VERDICT_P_VALUE:
        tied = class_names[artefact["class"]] if class_names else artefact["class"]
        verdict, title = FOUND, "Shortcut found, confirmed on the test set"
        said = (f"masking fixed {artefact['fixed']} of the {artefact['images']} test images that carry the artefact "
                f"against their class (the model ties it to {tied}) and broke {artefact['broken']} (sign test p = "
                f"{artefact['p_helps']:.2g})")
        if artefact.get("along_broken", 0) > artefact.get("along_fixed", 0):
            said += (f"; of the {artefact['along_images']} {tied} images carrying it, it broke "
                     f"{artefact['along_broken']} and fixed {artefact['along_fixed']}: the model has little else for "
                     f"{tied} there")
        said += f"; {_WORST_GROUP_SILENT[worst_group_change]}"
    settled = verdict is not None and verdict != fit["verdict"]
    if settled:
        summary = _summary(title, f"{said}. On validation: {fit['finding']}")
    elif fit["verdict"] == FOUND and verdict == FOUND:
        summary = _summary(fit["title"], f"{fit['finding']}; the test set confirms it: {said}")
    else:
        few = artefact is None or artefact["images"] < fewest_changes_to_show()
        if not few:  # enough images where a shortcut would mislead, and masking did not fix them beyond chance
            said += (f"; masking fixed {artefact['fixed']} of the {artefact['images']} test images that carry the "
                     f"artefact against their class and broke {artefact['broken']}, no difference beyond chance")
        more = "A test set with more images where the artefact and the label disagree may settle it"
        advice = {NONE_FOUND: NOTHING_TO_GUARD, UNCONFIRMED: more if few else ""}
        summary = _summary(fit["title"], f"{fit['finding']}; {said}", advice.get(fit["verdict"], ""))
    decided_on = "test" if settled else "validation and test" if verdict == fit["verdict"] else "validation"
    return {**fit, "verdict": verdict if settled else fit["verdict"], "title": title if settled else fit["title"],
            "summary": summary, "decided_on": decided_on, "test_worst_group_change": worst_group_change,
            "test_artefact_fixes": artefact}


def current_verdict(metrics: dict) -> dict | None:
    """The verdict that stands: the test set's where one with both artefact groups was evaluated, else the
    fit's; None for a run saved before verdicts existed."""
    return metrics.get(TEST_VERDICT) or metrics.get(VERDICT)


def verdict_line(verdict: dict | None) -> str | None:
    """The verdict as the one line the CLI prints; None without one."""
    return None if verdict is None else f"verdict: {verdict['summary']}."

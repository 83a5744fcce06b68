"""Whether a run found a shortcut worth guarding: the verdict a fit gives, and a test set may confirm.

The detector always ranks the clusters and trains a guard on the best one, shortcut or not. Two
checks on the validation images (no artefact labels needed) say whether that guard acts on
something the model relies on:

- *distinct*: the shortcut cluster holds at least as many tokens hotter than nearly every clean
  token (`positive_quantile`) as the KNN takes positives. A learned artefact's cluster holds far
  more: on the demo recipe, three training seeds each, 2,374 to 3,836 tokens with a learned
  shortcut, 9 to 55 for models trained with the artefact absent or unrelated to the label.
- *helps*: masking the flagged tokens fixes more validation predictions than it breaks, beyond
  chance (exact sign test on the predictions it changes, McNemar's exact test). Those models: 49,
  61 and 69 fixed against 5, 18 and 7 broken with the shortcut; 0 to 18 fixed against 9 to 184
  broken without.

Validation images where the artefact and the label never disagree give the guard nothing to fix, so
a real shortcut can leave the second check undecided; a test set with artefact labels decides it.
"""

from __future__ import annotations

import numpy as np

# The verdicts, from the fit (validation alone) or confirmed by a test set with artefact labels.
FOUND = "found"
UNCONFIRMED = "unconfirmed"
NOT_RELIED_ON = "not_relied_on"
NONE_FOUND = "none"
# Verdicts under which the guard masks nothing the model relies on: export refuses them unless told.
DO_NOT_GUARD = (NONE_FOUND, NOT_RELIED_ON)
# Below this, the sign test's side decides the verdict (the run's other tests use the same level).
VERDICT_P_VALUE = 0.01
VERDICT = "shortcut_verdict"
TEST_VERDICT = "shortcut_verdict_test"


def _sign_test(fixed: int, broken: int) -> tuple[float, float]:
    """One-sided p-values that masking fixes more predictions than it breaks, and that it breaks more."""
    from scipy.stats import binomtest

    changed = fixed + broken
    if not changed:
        return 1.0, 1.0
    return (float(binomtest(fixed, changed, 0.5, alternative="greater").pvalue),
            float(binomtest(broken, changed, 0.5, alternative="greater").pvalue))


def fit_verdict(cluster: int, candidates: int | None, positives: int, quantile: float, original: np.ndarray,
                ablated: np.ndarray, labels: np.ndarray) -> dict:
    """The verdict of a fit: `candidates` (None when positives are not calibrated) against the `positives`
    the KNN takes, and the validation predictions `original` and `ablated` (class indices) against `labels`."""
    fixed = int(((original != labels) & (ablated == labels)).sum())
    broken = int(((original == labels) & (ablated != labels)).sum())
    p_helps, p_harms = _sign_test(fixed, broken)
    distinct = None if candidates is None else candidates >= positives
    apart = ("" if candidates is None else
             f" ({candidates:,} of its tokens are hotter than {quantile:.1%} of clean tokens; the KNN takes {positives:,})")
    changes = f"masking them fixed {fixed} validation predictions and broke {broken}"
    if distinct is False:
        verdict = NONE_FOUND
        summary = (f"No shortcut found: no cluster's tokens stand apart from clean ones. The best-scored, cluster "
                   f"{cluster}, has {candidates:,} tokens hotter than {quantile:.1%} of clean tokens, where the KNN "
                   f"takes {positives:,}, so the guard would mask parts of ordinary images ({changes}). Nothing to "
                   "guard: ship the plain model. An artefact the validation images do not show cannot be found here")
    elif p_helps <= VERDICT_P_VALUE:
        verdict = FOUND
        summary = (f"Shortcut found: cluster {cluster}'s tokens stand apart from clean ones{apart}, and {changes} "
                   f"(sign test p = {p_helps:.2g})")
    elif p_harms <= VERDICT_P_VALUE:
        verdict = NOT_RELIED_ON
        summary = (f"No shortcut the model relies on: cluster {cluster}'s tokens stand apart from clean ones{apart}, "
                   f"but {changes} (sign test p = {p_harms:.2g} that it harms): the model does not lean on what the "
                   "guard masks. Ship the plain model")
    else:
        verdict = UNCONFIRMED
        summary = (f"Shortcut not confirmed: cluster {cluster}'s tokens stand apart from clean ones{apart}, but "
                   f"{changes}, no difference beyond chance; the validation images may hold few where the artefact "
                   "and the label disagree. Confirm it on a test set with artefact labels (edgeshort detect --eval "
                   "TEST with --eval-columns group=COLUMN, or result.evaluate) before shipping the guard")
    return {"verdict": verdict, "summary": summary, "distinct_tokens": candidates, "knn_positives": positives,
            "fixed": fixed, "broken": broken, "p_helps": p_helps, "p_harms": p_harms, "decided_on": "validation"}


def confirm_on_test(fit: dict, worst_group_change: str) -> dict:
    """The fit's verdict in the light of a test set with artefact labels: `worst_group_change` is the
    ablated-vs-original worst-group verdict there ("gain", "loss" or "noise", `change_verdict`)."""
    verdict, summary = fit["verdict"], fit["summary"]
    if worst_group_change == "gain" and verdict == UNCONFIRMED:
        verdict = FOUND
        summary = ("Shortcut found, confirmed on the test set: masking raises worst-group accuracy there beyond "
                   "test-set noise. On validation: " + summary[0].lower() + summary[1:])
    elif worst_group_change == "gain":
        summary += ("; yet on the test set masking raises worst-group accuracy beyond test-set noise" if verdict !=
                    FOUND else "; the test set confirms it: masking raises worst-group accuracy beyond noise")
    elif worst_group_change == "loss":
        summary += "; on the test set masking lowers worst-group accuracy beyond test-set noise"
    return {**fit, "verdict": verdict, "summary": summary, "decided_on": "test" if verdict != fit["verdict"]
            else fit["decided_on"], "test_worst_group_change": worst_group_change}


def current_verdict(metrics: dict) -> dict | None:
    """The verdict that stands: the test set's where one with artefact labels was evaluated, else the fit's;
    None for a run saved before verdicts existed."""
    return metrics.get(TEST_VERDICT) or metrics.get(VERDICT)


def verdict_line(verdict: dict | None) -> str | None:
    """The verdict as the one line the CLI prints; None without one."""
    return None if verdict is None else f"verdict: {verdict['summary']}."

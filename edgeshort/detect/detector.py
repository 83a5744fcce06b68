"""`ShortcutDetector`: the seed notebook's method on any ViT, batched, as one fit/evaluate API."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgeshort._progress import progress_bar, stage
from edgeshort.data import ImageDataset, as_dataset, as_images, input_digests
from edgeshort.data.dataset import in_model_class_order
from edgeshort.detect.config import ABLATION_HARM_TOLERANCE, CLASS_FOLLOWING_NMI, DetectorConfig
from edgeshort.detect.dfr import LinearHead, dfr_fit_warnings, fit_dfr_adam, fit_dfr_logreg
from edgeshort.detect.extract import Features, extract, weights_fingerprint
from edgeshort.detect.keymaps import (
    Clustering,
    KeyKNN,
    calibrated_positives,
    canonical_order,
    class_centred,
    cluster_features,
    describe_positives,
    in_order,
    key_distance_maps,
    knn_training_keys,
    mean_keys_outside,
    nearest_clean_distance_maps,
    nearest_to_centroids,
    ranks,
    saliency_distance_maps,
)
from edgeshort.detect.scoring import ClusterScore, score_clusters, softmax
from edgeshort.detect.verdict import (
    MOST_FLAGGED_IMAGES,
    TEST_VERDICT,
    VERDICT,
    artefact_fixes,
    confirm_on_test,
    current_verdict,
    fit_verdict,
    in_light_of_artefact_labels,
    over_chance,
    stands_apart,
    verdict_line,
)
from edgeshort.errors import InputError
from edgeshort.evaluation import (
    ARTEFACT_GROUP_NAMES,
    FLAG_GROUP_NAMES,
    MIN_CELL_FOR_VERDICT,
    bootstrap_intervals,
    change_verdict,
    dfr_cell_warning,
    dfr_loss_warning,
    format_table,
    group_accuracy,
    guard_cell_warning,
    guard_loss_warning,
    one_group_note,
    step_change,
)
from edgeshort.models import ViTAdapter, load_adapter
from edgeshort.runtime.guard import MOST_PATCHES
from edgeshort.runtime.masking import dilate, keep_mask

logger = logging.getLogger(__name__)

PREDICTION_KINDS = ("original", "ablated", "dfr")
# What `evaluate` measures on a test set. Each evaluation replaces all of them, so nothing of an
# earlier test set lingers; those here are null until measured (no test set, group labels or masks).
NULLABLE_TEST_METRICS = (
    "patch_precision", "patch_recall", *(f"{m}_{kind}" for kind in PREDICTION_KINDS for m in ("aga", "wga")),
    "dfr_warning", "guard_warning", "dfr_cell_warning", "guard_cell_warning", TEST_VERDICT,
)
# A test set's own warnings (e.g. predictions at chance, far more images flagged than in validation).
TEST_WARNINGS = "test_warnings"
# The guard flagging this much more of a test set than of the validation images (and beyond chance) warns,
# as does flagging this share of the test images an artefact label says are without it.
FLAG_RATE_RISE = 0.10
FALSE_FLAG_SHARE = 0.10
TEST_METRICS = (
    *NULLABLE_TEST_METRICS, TEST_WARNINGS, "test_size", "test_source", "test_sha256", "test_shortcut_present_rate",
    "test_changed_by_ablation_rate",
    *(f"accuracy_{kind}" for kind in PREDICTION_KINDS), "group_accuracy", "group_accuracy_intervals", "results_table",
    "flag_group_accuracy", "flag_group_accuracy_intervals", "flag_results_table",
)


@dataclass
class Predictions:
    """Everything the guarded model says about a set of images."""

    logits: np.ndarray  # (N, C) plain model
    ablated_logits: np.ndarray  # (N, C) flagged tokens excluded (where a shortcut is present)
    dfr_logits: np.ndarray | None  # (N, C) ablated + retrained head
    raw_flags: np.ndarray  # (N, gh, gw) KNN flags
    flags: np.ndarray  # (N, gh, gw) excluded patches: raw flags dilated, where a shortcut is present
    present: np.ndarray  # (N,) shortcut present (>= min_patches raw flags)
    saliency: np.ndarray  # (N, gh, gw) the guard's tint in [0, 1] (DetectionResult.saliency_maps)
    input_sha256: np.ndarray | None = None  # (N,) `input_digests` of the images predicted (sha256 prefixes)

    def labels(self, kind: str) -> np.ndarray:
        logits = {"original": self.logits, "ablated": self.ablated_logits, "dfr": self.dfr_logits}[kind]
        if logits is None:
            raise InputError(f"no {kind!r} predictions: the run has no DFR head")
        return logits.argmax(1)


@dataclass
class DetectionResult:
    """A fitted detector: the shortcut cluster, the key-KNN guard and the DFR head."""

    config: DetectorConfig
    adapter: ViTAdapter
    class_names: tuple[str, ...]
    scores: list[ClusterScore]
    shortcut_cluster: int
    clustering: Clustering
    selected: list[np.ndarray]
    heatmaps: list[np.ndarray]  # per cluster (num_selected, N_patches), normalised jointly to [0, 1]
    knn: KeyKNN
    clean_keys: np.ndarray  # (N_patches, d) mean key of the non-shortcut clusters
    saliency_scale: float
    dfr_head: LinearHead | None
    val_labels: np.ndarray
    val_groups: np.ndarray | None
    val_present: np.ndarray
    metrics: dict = field(default_factory=dict)
    run_dir: Path | None = None
    data_source: str | None = None  # how to reload the validation images (export calibrates on them)
    weights_sha256: str | None = None  # the weights the clusters, KNN and DFR head were fitted on

    @property
    def verdict(self) -> str | None:
        """'found', 'unconfirmed', 'none' or 'harmful': the test set's once one with both artefact groups is
        evaluated, else the fit's (None for a run saved before verdicts existed). `verdict_summary` says why."""
        verdict = current_verdict(self.metrics)
        return None if verdict is None else verdict["verdict"]

    @property
    def verdict_summary(self) -> str | None:
        """The verdict in words, as `detect` prints it and the report heads with it."""
        verdict = current_verdict(self.metrics)
        return None if verdict is None else verdict["summary"]

    def check_weights(self) -> None:
        """Refuse to predict with weights other than those fitted: the result holds the caller's model
        object, and clusters, KNN and DFR head of old weights would judge new ones."""
        if self.weights_sha256 is None:
            return
        now = weights_fingerprint(self.adapter.model)
        if now != self.weights_sha256:
            raise InputError(
                f"the model's weights changed since this result was fitted (sha256 {self.weights_sha256[:12]}... "
                f"then, {now[:12]}... now); its clusters, KNN and DFR head belong to the old weights. Fit again, "
                "or reload the run (ShortcutDetector.load(RUN)) for the weights it was fitted on"
            )

    # -- the guard ------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return self.adapter.grid

    def key_heatmap_grids(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every cluster's key heatmaps as (N, gh, gw) maps, with their class labels and validation
        indices: what `SpRAyDetector().fit(heatmaps=maps, labels=labels)` takes, so both detectors
        can look at one model."""
        maps = np.concatenate([h.reshape(-1, *self.grid) for h in self.heatmaps])
        indices = np.concatenate([s[: len(h)] for s, h in zip(self.selected, self.heatmaps)]).astype(np.int64)
        return maps, self.val_labels[indices], indices

    def flag_keys(self, keys: np.ndarray):
        """Keys (B, N, d) -> raw KNN flags, flags to exclude (B, gh, gw), shortcut present (B,)."""
        b = keys.shape[0]
        raw = self.knn.flags(keys).reshape(b, *self.grid)
        present = raw.reshape(b, -1).sum(1) >= self.config.min_patches
        # The flags are what the ablation excludes: dilated, and only where a shortcut is present.
        flags = dilate(raw, self.config.dilation_radius) & present[:, None, None]
        return raw, flags, present

    def guard_keys(self, keys: np.ndarray):
        """Keys (B, N, d) -> raw KNN flags, flags to exclude (B, gh, gw), shortcut present (B,), saliency."""
        return (*self.flag_keys(keys), self.saliency_maps(keys))

    def keep_tensor(self, flags: np.ndarray, present: np.ndarray):
        """The (B, tokens) torch keep mask of `flags` where a shortcut is `present`, prefix tokens kept."""
        import torch

        return torch.from_numpy(keep_mask(flags, self.adapter.num_prefix, present))

    def saliency_maps(self, keys: np.ndarray) -> np.ndarray:
        """Keys (B, N, d) -> (B, gh, gw) the guard's tint: the key distance of `config.saliency`
        (`saliency_distance_maps`) over `saliency_scale`, its 99.9th percentile over every validation
        patch, clipped to [0, 1]. It is not a flag: the flags are the decision."""
        distances = saliency_distance_maps(keys, self.config.saliency, self.knn, self.clean_keys)
        saliency = np.clip(distances / self.saliency_scale, 0, 1)
        return saliency.reshape(keys.shape[0], *self.grid).astype(np.float32)

    def guard_tokens(self, tokens):
        """Tokens -> (keys, raw flags, flags, present, saliency, keep): the guard and its keep mask tensor."""
        keys = self.adapter.keys(tokens, self.config.key_layer).numpy()
        raw, flags, present, saliency = self.guard_keys(keys)
        return keys, raw, flags, present, saliency, self.keep_tensor(flags, present)

    def predict(self, data, batch_size: int | None = None, progress: bool | None = None) -> Predictions:
        """Plain, ablated and ablated+DFR predictions, flags and saliency for `data`: a dataset, an (images,
        labels) tuple of preprocessed tensors, an image folder or CSV listing (labels not needed), or a list
        of images (PIL images, uint8 arrays or file paths). The model runs in eval mode; its train/eval
        flags are restored afterwards."""
        import torch

        from edgeshort._torch_state import preserved_model_state

        self.check_weights()
        dataset = as_images(data, self.class_names)
        batch_size = batch_size or self.config.batch_size
        progress = self.config.progress if progress is None else progress
        adapter = self.adapter
        head = adapter.head_linear()
        dfr = None if self.dfr_head is None else self.dfr_head.to_torch()
        out: dict[str, list] = {k: [] for k in ("logits", "ablated", "dfr", "raw", "flags", "present", "saliency",
                                                "digests")}
        total = (len(dataset) + batch_size - 1) // batch_size
        with preserved_model_state(adapter.model), torch.inference_mode():
            adapter.model.eval()
            for _, images in progress_bar(dataset.batches(adapter.preprocessing, batch_size), progress,
                                          f"predicting {dataset.name}", total):
                out["digests"].append(input_digests(images))
                tokens = adapter.embed(torch.from_numpy(images))
                _, raw, flags, present, saliency, keep = self.guard_tokens(tokens)
                plain = adapter.head_features(tokens)
                masked = _masked_where_flagged(adapter, tokens, keep, plain)
                out["logits"].append(head(plain).numpy())
                out["ablated"].append(head(masked).numpy())
                if dfr is not None:
                    out["dfr"].append(dfr(masked).numpy())
                for key, value in (("raw", raw), ("flags", flags), ("present", present), ("saliency", saliency)):
                    out[key].append(value)
        cat = {k: (np.concatenate(v) if v else None) for k, v in out.items()}
        return Predictions(cat["logits"], cat["ablated"], cat["dfr"], cat["raw"], cat["flags"], cat["present"],
                           cat["saliency"], cat["digests"])

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, test, out: str | Path | None = None, print_table: bool = False) -> dict:
        """Accuracy of the original, ablated and ablated+DFR predictions on a test set.

        Per (class, artefact group) with worst-group accuracy when the test set has group labels,
        per (class, guard flag) always, and flag precision/recall when it has artefact masks.
        """
        test = as_dataset(test, self.class_names)
        start = time.perf_counter()
        preds = self.predict(test)
        metrics = {k: v for k, v in self.metrics.items() if k not in TEST_METRICS}
        metrics.update(dict.fromkeys(NULLABLE_TEST_METRICS))
        metrics["test_size"] = len(test)
        metrics["test_source"] = test.source  # lets the report reload the test images
        # The test images' content, as the model saw them: a source path alone does not say they are unchanged.
        metrics["test_sha256"] = hashlib.sha256("".join(preds.input_sha256).encode()).hexdigest()
        metrics["test_shortcut_present_rate"] = float(preds.present.mean())
        labels_by_kind = {
            kind: preds.labels(kind) for kind in PREDICTION_KINDS if kind != "dfr" or preds.dfr_logits is not None
        }
        for kind in PREDICTION_KINDS:
            metrics[f"accuracy_{kind}"] = (
                float((labels_by_kind[kind] == test.labels).mean()) if kind in labels_by_kind else None
            )
        metrics["test_changed_by_ablation_rate"] = float((labels_by_kind["ablated"] != labels_by_kind["original"]).mean())
        metrics[TEST_WARNINGS] = (list(test.load_warnings)
                                  + _chance_check(preds.logits, test.labels, self.class_names, "test")
                                  + _flag_rate_check(preds.present, self.metrics.get("val_shortcut_present_rate"),
                                                     test.groups, self._val_clean_flag_rate())
                                  + _mostly_flagged_check(preds.flags))
        # The guard's own flag groups every test set, labelled for artefacts or not. It is chosen by the
        # detector, so not an unbiased worst-group estimate, but it shows what the guard does to the
        # images it acts on: the only per-group view a test set without artefact labels allows.
        flag_tables, flag_intervals = self._group_tables(labels_by_kind, test.labels, preds.present.astype(np.int64),
                                                         FLAG_GROUP_NAMES)
        metrics["flag_group_accuracy"] = flag_tables
        metrics["flag_group_accuracy_intervals"] = flag_intervals
        metrics["flag_results_table"] = format_table(flag_tables, flag_intervals)
        # Without artefact labels the flag groups judge the steps: all a site's own test set may allow.
        by_flag = test.groups is None
        tables, intervals = flag_tables, flag_intervals
        one_group = None  # every test image with the artefact (True), or without it (False)
        if not by_flag:
            tables, intervals = self._group_tables(labels_by_kind, test.labels, test.groups)
            metrics["group_accuracy"] = tables
            for kind in PREDICTION_KINDS:
                metrics[f"aga_{kind}"] = tables[kind]["average"] if kind in tables else None
                metrics[f"wga_{kind}"] = tables[kind]["worst"] if kind in tables else None
            metrics["group_accuracy_intervals"] = intervals
            metrics["results_table"] = format_table(tables, intervals)
            # Both artefact groups, or its worst group says nothing about the artefact; and a run saved before
            # verdicts existed has none to settle.
            if len(np.unique(test.groups)) < 2:
                one_group = bool(test.groups[0])
                metrics[TEST_WARNINGS].append(one_group_note(one_group))
            elif self.metrics.get(VERDICT):
                step = step_change(intervals, "original", "ablated")
                artefact = artefact_fixes(labels_by_kind["original"], labels_by_kind["ablated"], test.labels,
                                          test.groups)
                metrics[TEST_VERDICT] = confirm_on_test(self.metrics[VERDICT], change_verdict(step, tables), artefact,
                                                        list(self.class_names))
        metrics["guard_warning"] = guard_loss_warning(tables, intervals, by_flag, one_group)
        metrics["guard_cell_warning"] = guard_cell_warning(tables, intervals)
        if "dfr" in tables:
            metrics["dfr_warning"] = dfr_loss_warning(tables, intervals, by_flag)
            metrics["dfr_cell_warning"] = dfr_cell_warning(tables, intervals)
        for key in ("guard_warning", "guard_cell_warning", "dfr_warning", "dfr_cell_warning"):
            if metrics[key]:
                logger.warning("%s", metrics[key])
        if print_table:
            if not by_flag:
                print(metrics["results_table"])
            else:
                unread = test.unread_columns
                if unread:
                    print(f"Columns of the test listing that are not read: {', '.join(unread)}. If one holds artefact "
                          "labels (1 = the image carries it), name it: --columns group=HEADER (detect: --eval-columns)"
                          "; Python: columns={'group': HEADER}.")
                print("The test set has no artefact labels: accuracy by the guard's own flag instead "
                      "(the detector chose these groups, so they show its effect, not an unbiased worst group).")
                print(metrics["flag_results_table"])
        truth = test.patch_masks(self.adapter.preprocessing, self.grid)
        if truth is not None:
            tp = int((preds.flags & truth).sum())
            metrics["patch_precision"] = tp / max(int(preds.flags.sum()), 1) if preds.flags.any() else None
            metrics["patch_recall"] = tp / int(truth.sum()) if truth.any() else None
        metrics["seconds"] = {**metrics.get("seconds", {}), "evaluate": round(time.perf_counter() - start, 3)}
        self.metrics = metrics
        target = Path(out) if out is not None else self.run_dir
        if target is not None:
            self._write_metrics(target, metrics)
            np.savez_compressed(
                target / "test_predictions.npz", logits=preds.logits, ablated_logits=preds.ablated_logits,
                dfr_logits=preds.dfr_logits if preds.dfr_logits is not None else np.zeros(0),
                raw_flags=preds.raw_flags, flags=preds.flags, present=preds.present, saliency=preds.saliency,
                labels=test.labels, groups=test.groups if test.groups is not None else np.zeros(0),
                input_sha256=preds.input_sha256,
            )
        return metrics

    def _val_clean_flag_rate(self) -> float | None:
        """The share of validation images without the artefact that the guard flagged; None without labels."""
        if self.val_groups is None or not (self.val_groups == 0).any():
            return None
        return float(self.val_present[self.val_groups == 0].mean())

    def _group_tables(self, labels_by_kind: dict, labels: np.ndarray, groups: np.ndarray,
                      group_names: tuple[str, str] = ARTEFACT_GROUP_NAMES) -> tuple[dict, dict]:
        """Accuracy per (class, group) cell for each prediction kind, with paired bootstrap intervals."""
        tables = {kind: group_accuracy(pred, labels, groups, self.class_names, group_names)
                  for kind, pred in labels_by_kind.items()}
        intervals = bootstrap_intervals(labels_by_kind, labels, groups, len(self.class_names), seed=self.config.seed)
        return tables, intervals

    def _write_metrics(self, run_dir: Path, metrics: dict) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
        # The artefact groups when the test set has labels for them, else the guard's flag groups
        # (the group column names which); no file before an evaluation, so none is ever stale.
        by_artefact = bool(metrics.get("group_accuracy"))
        tables = metrics.get("group_accuracy") or metrics.get("flag_group_accuracy")
        intervals = (metrics.get("group_accuracy_intervals") if by_artefact
                     else metrics.get("flag_group_accuracy_intervals")) or {}
        if not tables:
            (run_dir / "results.csv").unlink(missing_ok=True)
        else:
            with open(run_dir / "results.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                kinds = list(tables)
                writer.writerow(["class", "group", "n", *[f"accuracy_{k}" for k in kinds]])
                for i, cell in enumerate(tables[kinds[0]]["cells"]):
                    writer.writerow([cell["class"], cell["group"], cell["n"],
                                     *[_fmt(tables[k]["cells"][i]["accuracy"]) for k in kinds]])
                writer.writerow(["average", "", "", *[_fmt(tables[k]["average"]) for k in kinds]])
                writer.writerow(["worst group", "", "", *[_fmt(tables[k]["worst"]) for k in kinds]])
                for name in tables[kinds[0]].get("classes") or {}:  # each class over all its images
                    writer.writerow([f"recall {name}", "", "", *[_fmt(tables[k]["classes"][name]) for k in kinds]])
                # The console's 95% intervals (paired bootstrap over each cell), as rows: the columns stay the seed's.
                ranges = intervals.get("kinds", {})
                if all(k in ranges for k in kinds):
                    for row, stat in (("average", "average"), ("worst group", "worst")):
                        for end, name in ((0, "95% CI low"), (1, "95% CI high")):
                            writer.writerow([f"{row} {name}", "", "", *[_fmt(ranges[k][stat][end]) for k in kinds]])

    # -- persistence ----------------------------------------------------------------------
    def save(self, run_dir: str | Path) -> Path:
        """Write this result to a run folder (reloadable with `ShortcutDetector.load`) and return it."""
        from edgeshort.detect import run_io

        self._write_metrics(Path(run_dir), self.metrics)  # before run.json, which marks the run complete
        self.run_dir = run_io.save_result(self, Path(run_dir))
        return self.run_dir

    def summary(self, verdict: bool = True) -> str:
        """The run in a few lines: the verdict (unless `verdict=False`, as before an evaluation that may settle
        it), what the model was fed, the clusters and their scores, the guard's flags; warnings last."""
        prep = self.adapter.preprocessing
        crop = "stretched" if prep.crop_pct is None else f"crop {prep.crop_pct:g} ({prep.crop_mode})"
        lines = [f"model: {self.adapter.family} ViT, input {prep.size[0]}x{prep.size[1]} ({crop}, {prep.interpolation}, "
                 f"mean {tuple(round(m, 3) for m in prep.mean)}, std {tuple(round(v, 3) for v in prep.std)}), "
                 f"{self.grid[0]}x{self.grid[1]} patches, flags grown by {self.config.dilation_radius}",
                 f"shortcut cluster: {self.shortcut_cluster} (margin {self.metrics.get('score_margin', 0):.3f}"
                 + (f"; the score's first, cluster {by_score}, does not stand apart)"
                    if (by_score := self.metrics.get("shortcut_cluster_by_score", self.shortcut_cluster))
                    != self.shortcut_cluster else ")")]
        standing = current_verdict(self.metrics) if verdict else None
        if standing:
            lines.insert(0, verdict_line(standing))
        for s in self.scores:
            lines.append(
                f"  cluster {s.cluster}: size {s.size}, homogeneity {s.homogeneity:.3f}, "
                f"majority {self.class_names[s.majority_class]}, score {s.score:.4f}"
            )
        m = self.metrics
        if m.get("cluster_class_nmi") is not None:
            lines.append(f"  clusters vs classes: normalised mutual information {m['cluster_class_nmi']:.2f} "
                         f"(from {CLASS_FOLLOWING_NMI} they follow the classes; clustered "
                         f"{m.get('cluster_space_used', 'pooled').replace('_', '-')})")
        if m.get("knn_positive_candidates") is not None:
            lines.append("  " + describe_positives(m["knn_positive_candidates"], m.get("knn_positives"),
                                                   self.config.positive_quantile, m["knn_positive_threshold"]))
        lines += [f"WARNING: {w}" for w in m.get("warnings") or []]
        return "\n".join(lines)


def _fmt(value):
    return "" if value is None else f"{value:.4f}"


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class ShortcutDetector:
    """Find the shortcut cluster, train the key-KNN guard and the DFR head on a validation set.

    >>> result = ShortcutDetector(DetectorConfig()).fit(model, val_dataset, run_dir="run/")
    >>> result.evaluate(test_dataset)
    """

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()

    @staticmethod
    def load(run_dir: str | Path, model=None) -> DetectionResult:
        """The result a fit wrote to `run_dir`, with its model (`model.pt`), or with `model` when given:
        the same weights, e.g. already in memory (other weights are refused)."""
        from edgeshort.detect import run_io

        return run_io.load_result(Path(run_dir), model)

    def fit(self, model, val, run_dir: str | Path | None = None, class_names=None) -> DetectionResult:
        """Detect the shortcut `model` learned, on the labelled validation set `val`.

        `model`: a torch ViT (torchvision, timm, transformers, edgeshort's tiny) or its adapter; it runs
        in eval mode, and its train/eval flags are restored afterwards. `val`: an ImageDataset, an image
        folder or CSV path (see `edgeshort.data.load_images`), or an (images, labels) tuple of preprocessed
        tensors. `run_dir`: a folder to write the run to (config, arrays, pictures, KNN, DFR head,
        metrics), reloadable with `ShortcutDetector.load`. `class_names`: the model's classes in output
        order, for tuples (else named 0..C-1) or to order a folder's classes.
        """
        from edgeshort._torch_state import preserved_model_state

        with preserved_model_state(getattr(model, "model", model)):
            return self._fit(model, val, run_dir, class_names)

    def _fit(self, model, val, run_dir, class_names) -> DetectionResult:
        adapter = load_adapter(model)
        weights = weights_fingerprint(adapter.model)
        # Settings that depend on the model are fixed here, so the run, the report and the bundle record them.
        cfg = replace(self.config, dilation_radius=self.config.dilation_for(adapter.grid))
        if class_names is None and isinstance(val, tuple):
            class_names = [str(c) for c in range(adapter.num_classes)]
            logger.warning("the classes are named %s; pass fit(..., class_names=[...]) in the model's output order "
                           "for names the run, report and bundle can show", ", ".join(class_names))
        dataset = as_dataset(val, class_names)
        if class_names is None:  # the model's own names order the data, as in `edgeshort detect`
            dataset, reordered = in_model_class_order(dataset, adapter.class_names)
            if reordered:
                logger.info("classes in the model's output order (its id2label): %s", ", ".join(dataset.class_names))
        _check_dataset(dataset, adapter, cfg)
        preprocessing_warnings = _assumed_preprocessing_check(adapter)
        run_dir = Path(run_dir) if run_dir is not None else None
        seconds: dict[str, float] = {}

        t = time.perf_counter()
        cache = run_dir / "features_val.npz" if run_dir is not None else None
        feats: Features = extract(adapter, dataset, cfg.batch_size, cfg.key_layer, cfg.progress, cache, weights)
        chance_warnings = _chance_check(feats.logits, dataset.labels, dataset.class_names)
        seconds["extract"] = time.perf_counter() - t

        t = time.perf_counter()
        stage(cfg.progress, f"clustering {len(dataset):,} images and scoring the clusters")
        # Draws by index follow the images, not the listing's row order.
        order = canonical_order(feats.digests, dataset.labels)
        rank = ranks(order)
        clustering, class_following = _cluster(feats.pooled, dataset.labels, cfg, order)
        probs = softmax(feats.logits.astype(np.float64))
        scores = score_clusters(probs, dataset.labels, clustering.assignments, dataset.num_classes, cfg.lambdas)
        ranked = sorted(scores, key=lambda s: s.score, reverse=True)
        shortcut = ranked[0].cluster
        seconds["cluster"] = time.perf_counter() - t

        t = time.perf_counter()
        selected = nearest_to_centroids(clustering.distances, clustering.assignments, cfg.num_selected)
        raw_maps = [
            key_heatmaps(feats.keys, clustering.assignments, c, idx, cfg, rank) for c, idx in enumerate(selected)
        ]
        # The seed normalises all heatmaps together, so clusters stay comparable.
        stacked = np.concatenate([m.reshape(-1) for m in raw_maps])
        lo, hi = float(stacked.min()), float(stacked.max())
        heatmaps = [((m - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32) for m in raw_maps]
        seconds["heatmaps"] = time.perf_counter() - t

        t = time.perf_counter()
        stage(cfg.progress, f"training the key KNN and flagging the {len(dataset) * adapter.num_patches:,} validation "
                            "patches")
        count = cfg.knn_sample_count(adapter.num_patches)
        chosen, apart, passed_over = None, None, []
        if cfg.positives == "calibrated":
            shortcut, chosen, apart, passed_over = _distinct_cluster(feats.keys, clustering.assignments, ranked, count,
                                                                     cfg, rank)
        positive_warnings = _positive_check(chosen, cfg)
        x, y = knn_training_keys(
            feats.keys, selected, raw_maps, shortcut, count, cfg.knn_negative_count(adapter.num_patches),
            cfg.negatives, positives=None if chosen is None else chosen.keys,
        )
        knn = KeyKNN(x, y, cfg.knn_k)
        clean_keys = mean_keys_outside(feats.keys, clustering.assignments, shortcut, rank).astype(np.float32)
        saliency_distances = saliency_distance_maps(feats.keys, cfg.saliency, knn, clean_keys)
        saliency_scale = float(np.percentile(saliency_distances, 99.9)) or 1.0
        raw = knn.flags(feats.keys).reshape(len(dataset), *adapter.grid)
        present = raw.reshape(len(dataset), -1).sum(1) >= cfg.min_patches
        seconds["knn"] = time.perf_counter() - t
        present_warnings = []
        if present.mean() >= MOST_FLAGGED_IMAGES:
            # An artefact some images carry leaves most unflagged; one found in nearly all is part of every image.
            present_warnings.append(
                f"the guard finds a shortcut in {present.mean():.0%} of the validation images: an artefact some "
                "images carry would leave most unflagged, so the flags likely mark something every image has (the "
                "object, the background, a border). Check the key heatmaps and the flag pictures before exporting"
            )
            logger.warning("%s", present_warnings[-1])
        else:  # flags on nearly every image say it already
            present_warnings += _clean_flag_check(present, dataset.groups)

        result = DetectionResult(
            config=cfg, adapter=adapter, class_names=dataset.class_names, scores=scores,
            shortcut_cluster=shortcut, clustering=clustering, selected=selected, heatmaps=heatmaps, knn=knn,
            clean_keys=clean_keys, saliency_scale=saliency_scale, dfr_head=None, val_labels=dataset.labels,
            val_groups=dataset.groups, val_present=present, run_dir=run_dir, data_source=dataset.source,
            weights_sha256=weights,
        )

        t = time.perf_counter()
        features = _masked_head_features(result, dataset, feats.head_features, feats.keys)
        candidates, null_tokens = (None, None) if chosen is None else (chosen.candidates, chosen.null_tokens)
        members = clustering.assignments == shortcut
        tokens = int(members.sum()) * adapter.num_patches
        accuracy, ablated = _ablation_check(result, dataset, feats.logits, features, apart)
        verdict = in_light_of_artefact_labels(
            fit_verdict(shortcut, candidates, tokens, count, cfg.positive_quantile, feats.logits.argmax(1), ablated,
                        dataset.labels, null_tokens, passed_over, dataset.groups),
            shortcut, members, dataset.groups, dataset.labels, present)
        accuracy["warnings"] = (list(dataset.load_warnings) + preprocessing_warnings + chance_warnings + class_following["warnings"]
                                + positive_warnings + present_warnings + accuracy["warnings"])
        seconds["ablation_check"] = time.perf_counter() - t

        t = time.perf_counter()
        if cfg.dfr != "none":
            if cfg.dfr == "logreg":
                result.dfr_head = fit_dfr_logreg(features[order], dataset.labels[order], present[order],
                                                 dataset.num_classes, cfg.dfr_subsamples, cfg.seed, cfg.progress)
            else:
                stage(cfg.progress, "retraining the last layer (DFR, Adam)")
                result.dfr_head = fit_dfr_adam(features[order], dataset.labels[order], present[order],
                                               dataset.num_classes, adapter.head_linear(), seed=cfg.seed)
            fit_warnings = dfr_fit_warnings(result.dfr_head, dataset.class_names)
            for warning in fit_warnings:
                logger.warning("%s", warning)
            accuracy["warnings"] += fit_warnings
            accuracy["dfr_fit_warnings"] = fit_warnings  # so a bundle without the head can leave them out
        seconds["dfr"] = time.perf_counter() - t

        guarded_score = next(s.score for s in scores if s.cluster == shortcut)
        result.metrics = {
            "shortcut_cluster": int(shortcut),
            # The score's first choice, when its tokens did not stand apart and a lower-ranked cluster's did.
            "shortcut_cluster_by_score": int(ranked[0].cluster),
            VERDICT: verdict,
            "cluster_scores": [s.to_dict() for s in scores],
            # The shortcut cluster's score over the best other one's: negative when the score's first was passed over.
            "score_margin": float(guarded_score - max(s.score for s in scores if s.cluster != shortcut)),
            "cluster_class_nmi": class_following["nmi"],
            "cluster_space_used": class_following["space"],
            "shortcut_cluster_group_purity": (
                float(dataset.groups[members].mean()) if dataset.groups is not None else None
            ),
            "val_shortcut_present_rate": float(present.mean()),
            **accuracy,
            "knn_reference_size": int(len(x)),
            "knn_positives": int((y == 1).sum()),
            "knn_positive_threshold": None if chosen is None else chosen.threshold,
            "knn_positive_candidates": None if chosen is None else chosen.candidates,
            **dict.fromkeys(NULLABLE_TEST_METRICS),
            "dfr": None if result.dfr_head is None else result.dfr_head.info,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "val_size": len(dataset),
            "model_family": adapter.family,
        }
        if run_dir is not None:
            t = time.perf_counter()
            from edgeshort.detect import run_io

            run_io.clear_earlier_run(run_dir)
            result.save(run_dir)
            run_io.write_pictures(result, dataset, run_dir)
            result.metrics["seconds"]["pictures"] = round(time.perf_counter() - t, 3)
            result._write_metrics(run_dir, result.metrics)
        logger.info("shortcut cluster %d; scores %s", shortcut, [round(s.score, 4) for s in scores])
        logger.info("%s", verdict["summary"])  # the summary's first line; not logged as a warning besides
        return result


def _distinct_cluster(keys: np.ndarray, assignments: np.ndarray, ranked: list, count: int, cfg: DetectorConfig,
                      rank: np.ndarray | None = None):
    """(shortcut cluster, its calibrated positives, whether its tokens stand apart (`stands_apart`), the clusters
    passed over): the score's first cluster unless
    its tokens fail to stand apart from the other clusters' (`stands_apart`) and a lower-ranked cluster's do,
    then the highest-ranked such cluster.

    The cluster score knows classes and confidence, not artefacts. Where the artefact sits on one class only
    (as at hospitals that ruler only benign lesions), a clean cluster of that class can score as high; its
    tokens then stand apart from nothing, and a lower-ranked cluster's may. Passed-over clusters are listed
    with how far their tokens stood above chance."""
    passed_over, first = [], None
    for ranking in ranked:
        chosen = calibrated_positives(keys, assignments, ranking.cluster, count, cfg.positive_quantile, cfg.knn_k,
                                      cfg.seed, rank)
        first = first or (ranking.cluster, chosen)
        tokens = int((assignments == ranking.cluster).sum()) * keys.shape[1]
        candidates = None if chosen is None else chosen.candidates
        apart = stands_apart(candidates, tokens, cfg.positive_quantile, chosen and chosen.null_tokens)
        # Not measured keeps the score's choice; only tokens shown to stand apart overrule it.
        if apart is True or (apart is None and not passed_over):
            return ranking.cluster, chosen, apart, passed_over
        if apart is False:  # a lower-ranked cluster not measured (too few images outside it) is no evidence
            passed_over.append({"cluster": int(ranking.cluster),
                                "over_chance": over_chance(candidates, tokens, cfg.positive_quantile)})
    return first[0], first[1], False, []  # none stands apart: the score's choice, and the verdict says so


def key_heatmaps(keys: np.ndarray, assignments: np.ndarray, cluster: int, selected: np.ndarray,
                 cfg: DetectorConfig, rank: np.ndarray | None = None) -> np.ndarray:
    """Unnormalised key heatmaps of a cluster's selected samples against the other clusters' keys (searched in
    `rank`'s order of the images, when given)."""
    if cfg.heatmap == "mean":
        return key_distance_maps(keys[selected], mean_keys_outside(keys, assignments, cluster, rank))
    clean = in_order(np.flatnonzero(assignments != cluster), rank)
    return nearest_clean_distance_maps(keys[selected], keys[clean], cfg.knn_k, cfg.seed)


def _ablation_check(result: DetectionResult, dataset: ImageDataset, logits: np.ndarray,
                    masked: np.ndarray, stood_apart: bool | None = None) -> tuple[dict, np.ndarray]:
    """Balanced validation accuracy before and after ablation, and a warning when ablation hurts; and the
    ablated predictions (class indices). `stood_apart`: whether the shortcut cluster's tokens stand apart from
    clean ones (`stands_apart`); when they do not, the warning names that cause alone."""
    head = result.adapter.head_linear()
    ablated = (masked @ head.weight.detach().numpy().T + head.bias.detach().numpy()).argmax(1)
    everyone = np.zeros(len(dataset), np.int64)
    before, after = (
        group_accuracy(predicted, dataset.labels, everyone, dataset.class_names, ("all",))["average"]
        for predicted in (logits.argmax(1), ablated)
    )
    warnings = []
    if after < before - ABLATION_HARM_TOLERANCE and stood_apart is False:
        warnings.append(f"ablating the flagged tokens lowers balanced validation accuracy from {before:.3f} to "
                        f"{after:.3f}: no cluster's tokens stand apart from clean ones, so the flags fall on what the "
                        "model needs (see the verdict)")
        logger.warning("%s", warnings[-1])
    elif after < before - ABLATION_HARM_TOLERANCE:
        chance = 1 / dataset.num_classes
        # Two causes look alike here; a model that saw only the artefact falls to chance without it.
        at_chance = after <= chance + ABLATION_HARM_TOLERANCE
        warnings.append(
            f"ablating the flagged tokens lowers balanced validation accuracy from {before:.3f} to {after:.3f}"
            f"{f', chance level ({chance:.3f})' if at_chance else ''}: either the KNN flags parts of the object, "
            "or the model learned little besides the artefact"
            f"{' (likely when ablation leaves it at chance)' if at_chance else ''}. Check the key heatmaps and the "
            "flag pictures before exporting: flags on the object mean this is not an artefact; flags on the artefact "
            "alone mean the model needs retraining without it (DFR only reweights features the model already has)"
        )
        logger.warning("%s", warnings[-1])
    return {"val_balanced_accuracy_original": before, "val_balanced_accuracy_ablated": after,
            "warnings": warnings}, ablated


def _positive_check(chosen, cfg: DetectorConfig) -> list[str]:
    """A warning when calibrated positives could not be drawn. (Too few candidates is the verdict's `none`.)"""
    warnings = []
    if cfg.positives == "calibrated" and chosen is None:
        warnings.append(
            "fewer than two validation images lie outside the shortcut cluster, too few to calibrate the KNN "
            "positives against; the hottest tokens were taken (the seed's rule). Use more validation images"
        )
    for warning in warnings:
        logger.warning("%s", warning)
    return warnings


def _cluster(pooled: np.ndarray, labels: np.ndarray, cfg: DetectorConfig,
             order: np.ndarray | None = None) -> tuple[Clustering, dict]:
    """k-means in the configured space, and how much the clusters follow the class labels.

    The shortcut cluster mixes classes by its nature; clusters that follow the classes (normalised
    mutual information >= CLASS_FOLLOWING_NMI) found the task, not an artefact. `auto` then clusters
    again without the class means; `pooled` keeps them and warns.
    """
    from sklearn.metrics import normalized_mutual_info_score

    def clusters(space: str) -> tuple[Clustering, float]:
        features = class_centred(pooled, labels, order) if space == "class_centred" else pooled
        clustering = cluster_features(features, cfg.n_clusters, cfg.pca_components, cfg.seed, order)
        return clustering, float(normalized_mutual_info_score(labels, clustering.assignments))

    space = "class_centred" if cfg.cluster_space == "class_centred" else "pooled"
    clustering, nmi = clusters(space)
    warnings = []
    if nmi >= CLASS_FOLLOWING_NMI and cfg.cluster_space == "auto":
        pooled_nmi = nmi
        space = "class_centred"
        clustering, nmi = clusters(space)
        warnings.append(
            f"the pooled features' clusters follow the class labels (normalised mutual information {pooled_nmi:.2f}), "
            f"so their shortcut cluster would be a class: clustered without each class's mean instead (now {nmi:.2f}). "
            "An artefact carried by most images of one class follows the class too, and removing the class means "
            "removes much of it: then compare with cluster_space='pooled' (--cluster-space pooled), the seed's "
            "clustering"
        )
    if nmi >= CLASS_FOLLOWING_NMI:
        warnings.append(
            f"the clusters follow the class labels (normalised mutual information {nmi:.2f}), so the shortcut "
            "cluster is likely a class, not an artefact: the features' strongest direction is the class. "
            + ("Try cluster_space='class_centred' (--cluster-space class_centred), which clusters what remains once "
               "each class's mean is removed" if space == "pooled" else
               "Even without the class means they do; more clusters (n_clusters) may separate an artefact")
        )
    for warning in warnings:
        logger.warning("%s", warning)
    return clustering, {"nmi": nmi, "space": space, "warnings": warnings}


# A model whose validation predictions are this likely under chance agreement has not learned the
# task on these images, so its clusters and flags say nothing about shortcuts.
CHANCE_P_VALUE = 0.01
# How far beyond chance another class order must fit for a run to stop and name it.
CLASS_ORDER_P_VALUE = 1e-6
# A test set this large at chance warns; a smaller one warns only below chance (its labels likely swapped).
TEST_CHANCE_MIN_IMAGES = 100


def _flag_rate_check(present: np.ndarray, val_rate: float | None, groups: np.ndarray | None = None,
                     val_clean_rate: float | None = None) -> list[str]:
    """A warning when the guard flags images unlike the validation data (another scanner, colour balance or size),
    drawing flags on what the model needs. With artefact labels: FALSE_FLAG_SHARE more of the test images without
    the artefact flagged than of such validation images (`val_clean_rate`, 0 when unknown), and beyond chance.
    Without: FLAG_RATE_RISE more of the test set flagged than of the validation images (`val_rate`), and beyond
    chance, which a higher artefact prevalence explains too."""
    from scipy.stats import binomtest

    if groups is not None:
        clean = groups == 0
        flagged, baseline = int(present[clean].sum()), val_clean_rate or 0.0
        if (clean.sum() < MIN_CELL_FOR_VERDICT or flagged / clean.sum() - baseline < FALSE_FLAG_SHARE
                or binomtest(flagged, int(clean.sum()), baseline, alternative="greater").pvalue > CHANCE_P_VALUE):
            return []
        warning = (f"the guard finds a shortcut in {flagged / clean.sum():.0%} of the test images without the "
                   f"artefact ({flagged} of {int(clean.sum())}; {baseline:.0%} of such validation images): on these "
                   "images its flags mask what they show. Look at the flag pictures (edgeshort report) before shipping "
                   "the guard for such images")
        logger.warning("%s", warning)
        return [warning]
    if val_rate is None or not len(present):
        return []
    found, rate = int(present.sum()), float(present.mean())
    if rate - val_rate < FLAG_RATE_RISE or binomtest(found, len(present), val_rate, alternative="greater").pvalue > \
            CHANCE_P_VALUE:
        return []
    warning = (f"the guard finds a shortcut in {rate:.0%} of the test images, against {val_rate:.0%} of the validation "
               "images it was fitted on: these images may differ from the validation data (scanner, colour balance, "
               "size) or carry the artefact more often. Look at the flag pictures (edgeshort report) and the accuracy by "
               "flag group before shipping the guard for them")
    logger.warning("%s", warning)
    return [warning]


def _clean_flag_check(present: np.ndarray, groups: np.ndarray | None) -> list[str]:
    """A warning when the guard flags more than FALSE_FLAG_SHARE of the validation images the artefact labels call
    clean, beyond chance (a mislabelled image or two among ten is not it): 0 to 1% on the demo models, 67% on a
    walkthrough's model whose flags ringed the lesion. The test set's own check compares against that rate, so
    without this nothing says it."""
    from scipy.stats import binomtest

    if groups is None:
        return []
    clean = groups == 0
    flagged, images = int(present[clean].sum()), int(clean.sum())
    if images < MIN_CELL_FOR_VERDICT or binomtest(flagged, images, FALSE_FLAG_SHARE,
                                                  alternative="greater").pvalue > CHANCE_P_VALUE:
        return []
    warning = (f"the guard finds a shortcut in {flagged / images:.0%} of the validation images the artefact labels "
               f"call clean ({flagged} of {images}): its flags fall on more than the artefact, or the labels miss "
               "some of it. Look at the flag pictures (edgeshort report) before shipping the guard")
    logger.warning("%s", warning)
    return [warning]


def _mostly_flagged_check(flags: np.ndarray) -> list[str]:
    """A warning counting the test images whose flags cover most of their patches: each of them the runtime marks
    for review (`GuardResult.warning`, by the same bound), and so should a test set's figures."""
    share = flags.reshape(len(flags), -1).mean(1)
    most, every = int((share > MOST_PATCHES).sum()), int((share == 1).sum())
    if not most:
        return []
    warning = (f"flags cover over {MOST_PATCHES:.0%} of the patches of {most} of the {len(flags)} test images"
               + (f" (all patches of {every}, whose guarded prediction saw nothing)" if every else "")
               + ": the runtime marks each of them for review, as images unlike those the guard was fitted on, and "
               "their guarded predictions rest on the few patches left")
    logger.warning("%s", warning)
    return [warning]


def _assumed_preprocessing_check(adapter) -> list[str]:
    """A warning when the model's normalisation is a guess: a wrong one shows the model other images than it
    learned on, and its predictions, clusters and flags suffer without any error."""
    if adapter.preprocessing_assumed is None:
        return []
    prep = adapter.preprocessing
    warning = (f"the model is {adapter.preprocessing_assumed}: it sees images normalised with mean "
               f"{','.join(f'{v:g}' for v in prep.mean)} and std {','.join(f'{v:g}' for v in prep.std)}; if it was "
               "trained with others, give them (CLI: --mean R,G,B --std R,G,B; Python: "
               "adapter.set_preprocessing(mean=..., std=...))")
    logger.warning("%s", warning)
    return [warning]


def _chance_agreement(predictions: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Cohen's chance agreement: the sum over the `k` classes of (share predicted) x (share labelled)."""
    return float((np.bincount(predictions, minlength=k) * np.bincount(labels, minlength=k)).sum() / len(labels) ** 2)


def _fitting_class_order(predictions: np.ndarray, labels: np.ndarray, k: int) -> tuple[list[int], int] | None:
    """The data class each model output means, if another order than the given one makes the predictions
    agree with the labels far beyond chance (CLASS_ORDER_P_VALUE): the one-to-one assignment of outputs to
    classes that gets the most right (on the confusion counts), and how many it gets right; None when that
    order is the given one or does not agree that well. The best of all orders of a model that knows nothing
    beats chance a little: the strict level keeps it from naming one."""
    from scipy.optimize import linear_sum_assignment
    from scipy.stats import binomtest

    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (predictions, labels), 1)
    outputs, classes = linear_sum_assignment(confusion, maximize=True)
    order = classes[np.argsort(outputs)]
    if (order == np.arange(k)).all():
        return None
    relabelled, n = order[predictions], len(labels)
    right = int((relabelled == labels).sum())
    chance = _chance_agreement(relabelled, labels, k)
    if binomtest(right, n, chance, alternative="greater").pvalue >= CLASS_ORDER_P_VALUE:
        return None
    return [int(c) for c in order], right


def _chance_check(logits: np.ndarray, labels: np.ndarray, class_names, split: str = "validation") -> list[str]:
    """A warning when the model's `split` ("validation" or "test") predictions agree with the labels no better
    than chance. A test set warns only below chance, or at chance on TEST_CHANCE_MIN_IMAGES or more: a site's
    test set may be small or hold one class, where chance agreement says little.

    Chance agreement is Cohen's: the sum over classes of (share predicted) x (share labelled), what
    predictions independent of the image would score; the count of right predictions is tested
    against it with a one-sided binomial test. Both tails warn: below chance points at a class order
    that differs from the model's, at chance at the weights or the preprocessing.
    """
    from scipy.stats import binomtest

    predictions, n = logits.argmax(1), len(labels)
    k = len(class_names)
    if len(np.unique(labels)) < 2:  # one class: chance agreement is the accuracy itself
        return []
    chance = _chance_agreement(predictions, labels, k)
    right = int((predictions == labels).sum())
    if chance >= 1.0 or binomtest(right, n, chance, alternative="greater").pvalue <= CHANCE_P_VALUE:
        return []
    below = binomtest(right, n, chance, alternative="less").pvalue <= CHANCE_P_VALUE
    if split == "test" and not below and n < TEST_CHANCE_MIN_IMAGES:
        return []
    agree = (f"the model's {split} predictions agree with the labels {'less' if below else 'no better'} than chance "
             f"(accuracy {right / n:.3f}, {chance:.3f} by chance on {n} images)")
    order = _fitting_class_order(predictions, labels, k)
    if order is not None and split == "validation":
        # Clusters are scored, the verdict's fixed/broken counted and DFR trained against these labels: the run
        # would rest on names the model does not mean.
        named = [class_names[c] for c in order[0]]
        raise InputError(
            f"{agree}, and in another class order they agree far better (accuracy {order[1] / n:.3f}, beyond "
            f"chance at p < {CLASS_ORDER_P_VALUE:g}): the data's "
            f"class order {list(class_names)} is not the model's output order. Give the model's order: --classes "
            f"{','.join(named)} (Python: fit(..., class_names={named})), or fix the --class-map or label column "
            "that swaps them")
    if split == "test":
        swapped = "" if order is None else (
            f" (they agree far better, {order[1] / n:.3f}, with the model's outputs read as "
            f"{', '.join(class_names[c] for c in order[0])})")
        warning = (f"{agree}, so these test results cannot judge the model or its guard. "
                   + (f"Check that the test labels name the model's classes {list(class_names)} as the model means "
                      f"them{swapped}: a label column or --class-map that swaps them inverts every answer" if below else
                      "Check that the test images are of the kind the model was trained on, and that their labels "
                      f"name the model's classes {list(class_names)} as the model means them{swapped}"))
    else:
        warning = (
            f"{agree}, so its clusters and flags cannot point at a shortcut. "
            + (f"Check that the data's class order {list(class_names)} is the model's output order; if not, give "
               f"that order (CLI: --classes {','.join(reversed(class_names)) if k == 2 else 'NAME,NAME,...'})"
               if below else "Check the weights and the preprocessing (image size, mean, std and crop) the model was "
               f"trained with, and that the data's class order {list(class_names)} is the model's output order")
        )
    logger.warning("%s", warning)
    return [warning]


def _masked_head_features(result: DetectionResult, dataset: ImageDataset, plain: np.ndarray,
                          keys: np.ndarray) -> np.ndarray:
    """Head features of the validation images with flagged tokens excluded where a shortcut is present.

    Only those images run through the encoder again: every other image's are its `plain` ones (from
    extraction), which masking nothing would only compute again (on vit_b_16, a quarter-second per image).
    Their flags come from their extracted `keys`, the ones `val_present` was decided on."""
    import torch

    adapter, cfg = result.adapter, result.config
    out = plain.copy()
    flagged = np.flatnonzero(result.val_present)
    batches = dataset.subset(flagged).batches(adapter.preprocessing, cfg.batch_size)
    total = -(-len(flagged) // cfg.batch_size)
    with torch.inference_mode():
        for rows, images in progress_bar(batches, cfg.progress, f"ablating the flagged images of {dataset.name}",
                                         total):
            tokens = adapter.embed(torch.from_numpy(images))
            images_of = flagged[rows]
            _, flags, present = result.flag_keys(keys[images_of])  # no tint: the ablation needs only the flags
            masked = _masked_where_flagged(adapter, tokens, result.keep_tensor(flags, present),
                                           torch.from_numpy(plain[images_of]))
            out[images_of] = masked.numpy()
    return out


def _masked_where_flagged(adapter: ViTAdapter, tokens, keep, plain):
    """Head features with the tokens `keep` leaves out excluded; the encoder runs only for images where it leaves
    one out, the others are `plain` (their unmasked features)."""
    out = plain.clone()
    masking = ~keep.all(dim=1)
    if bool(masking.any()):
        out[masking] = adapter.head_features(tokens[masking], keep[masking])
    return out


def _check_dataset(dataset: ImageDataset, adapter: ViTAdapter, cfg: DetectorConfig) -> None:
    classes = np.unique(dataset.labels)
    if len(classes) < 2:
        raise InputError(
            f"expected labels of at least two classes, got only class {classes.tolist()}; "
            "the cluster score compares classes, so pass a validation set with every class"
        )
    if adapter.num_classes == 1:
        raise InputError(
            "the model has one output (a sigmoid binary head); the detector and DFR need one logit per class. "
            "Wrap its head as two logits [-z/2, z/2] (a softmax over them equals the sigmoid of z) and pass that model"
        )
    if dataset.num_classes != adapter.num_classes:
        raise InputError(
            f"expected {adapter.num_classes} classes (the model's head), got {dataset.num_classes} "
            f"class names {list(dataset.class_names)}; pass the classes the model was trained on"
        )
    if len(dataset) < cfg.n_clusters:
        raise InputError(
            f"expected at least n_clusters={cfg.n_clusters} samples, got {len(dataset)}; "
            "add images or lower n_clusters"
        )
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    if cfg.dfr != "none" and counts.min() < 2:
        # DFR balances (class, shortcut found) groups of at least two images; checked before the long work.
        few = ", ".join(f"{dataset.class_names[c]!r} ({counts[c]})" for c in np.flatnonzero(counts < 2))
        raise InputError(
            f"DFR needs at least two validation images of every class, got {few}; add images of those classes "
            "or skip DFR (dfr='none', --dfr none)"
        )
    try:
        adapter.key_weights(cfg.key_layer)
    except IndexError as exc:
        raise InputError(
            f"key_layer={cfg.key_layer} is not an encoder block of this model; use -1 (the last, the seed's) or "
            "another block index"
        ) from exc

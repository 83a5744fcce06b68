"""The HTML report of a detection run: one page a person reads to judge the detector's verdict.

`write_report(run_dir)` reads only the run folder (JSON, `.npz`, PNG), never the model, so it
needs numpy, Pillow and matplotlib (the `report` extra) but not torch. Pictures go to a folder
beside the page (`report_files/` for `report.html`) or, with `embed=True`, into the page as
data URIs and nowhere else. Every section is always present: when its data is missing it says why and how to
get it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from edgeshort._spacing import evenly_spaced
from edgeshort.detect.config import (
    ABLATION_HARM_TOLERANCE,
    CLASS_FOLLOWING_NMI,
    SETTING_NOTES,
    SETTINGS_OF_EARLIER_RUNS,
)
from edgeshort.detect.keymaps import describe_positives
from edgeshort.detect.verdict import DO_NOT_GUARD, FOUND, current_verdict
from edgeshort.errors import InputError
from edgeshort.evaluation import ARTEFACT_GROUP_NAMES, KIND_TITLES, change_verdict, describe_change
from edgeshort.report.draw import (
    HEAT_ALPHA,
    HOT,
    TINT_ALPHA,
    colourise,
    flag_outline_overlay,
    grid_to_pixels,
    guard_overlay,
    heatmap_overlay,
    patch_grid_crop,
    upscale,
)
from edgeshort.runtime.preprocess import Preprocessing

logger = logging.getLogger(__name__)

# Test images drawn per (artefact, correct) category in the flags section.
SAMPLES_PER_CATEGORY = 4
# Overlays of test images are drawn at least this many pixels on the short side.
OVERLAY_SIDE = 192
STAGE_TITLES = {
    "extract": "extract features, keys and probabilities",
    "cluster": "PCA, k-means and cluster scores",
    "heatmaps": "key-distance heatmaps",
    "knn": "key-KNN guard",
    "ablation_check": "validation accuracy with the flagged tokens ablated",
    "dfr": "DFR last-layer retraining",
    "pictures": "run pictures",
    "evaluate": "evaluation on the test set",
}

CSS = """
:root { --fg: #1c2330; --muted: #5a6576; --line: #dde2e9; --soft: #f4f6f9; --accent: #0b63b6;
        --warn: #b45309; --warn-bg: #fff7eb; --good: #137a3a; --bad: #b42318; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--soft); color: var(--fg);
       font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 28px 36px 72px; background: #fff; min-height: 100vh; }
h1 { font-size: 1.7rem; margin: 0 0 4px; }
h2 { font-size: 1.3rem; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.05rem; margin: 22px 0 8px; }
section { margin-top: 40px; }
p { margin: 6px 0 10px; max-width: 78ch; }
.meta { color: var(--muted); font-size: 0.9rem; }
nav.toc { margin: 16px 0 0; display: flex; flex-wrap: wrap; gap: 6px 16px; font-size: 0.92rem; }
nav.toc a { color: var(--accent); text-decoration: none; }
nav.toc a:hover { text-decoration: underline; }
code { background: var(--soft); padding: 1px 5px; border-radius: 4px; font-size: 0.88em; overflow-wrap: anywhere; }
td.nowrap, td.nowrap code { white-space: nowrap; }
table { border-collapse: collapse; margin: 8px 0 14px; font-variant-numeric: tabular-nums; font-size: 0.92rem; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
tr.highlight td { background: var(--warn-bg); font-weight: 600; }
tr.summary td { border-top: 2px solid var(--line); font-weight: 600; }
td.worst { color: var(--bad); font-weight: 600; }
td.ci { color: var(--muted); font-size: 0.85rem; white-space: nowrap; }
.verdict { border-left: 6px solid var(--warn); background: var(--warn-bg); padding: 14px 20px; margin: 10px 0 16px; }
.verdict .headline { font-size: 1.25rem; font-weight: 650; margin: 0 0 6px; }
.verdict ul { margin: 6px 0 0; padding-left: 20px; }
.empty { border: 1px dashed #b9c2cf; background: var(--soft); padding: 10px 16px; border-radius: 6px; margin: 8px 0; }
.empty p { margin: 4px 0; }
.empty .why { font-weight: 600; }
.figure { margin: 10px 0 18px; }
.figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
.figure .caption, figcaption { color: var(--muted); font-size: 0.85rem; }
.strip { border-collapse: separate; border-spacing: 6px 4px; margin: 0; }
.strip th { background: none; font-weight: 500; color: var(--muted); font-size: 0.8rem; text-align: left;
            border: none; padding: 0 4px; white-space: nowrap; }
.strip td { border: none; padding: 0; text-align: center; }
.strip img { width: 104px; height: 104px; object-fit: contain; image-rendering: pixelated; background: #e8ebef;
             display: block; }
.cluster-row { display: flex; gap: 16px; align-items: flex-start; }
.cluster-row figure.mean { margin: 30px 0 0; width: 124px; flex: none; }
.cluster-row figure.mean img { width: 124px; height: auto; image-rendering: pixelated; display: block; }
.strip .label { font-size: 0.75rem; color: var(--muted); line-height: 1.2; }
.file { word-break: break-all; }
.scroll { overflow-x: auto; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; margin: 8px 0 12px; }
.gallery figure { margin: 0; width: 228px; }
.gallery img { width: 228px; height: auto; image-rendering: pixelated; display: block; border: 1px solid var(--line); }
table.preds { margin: 2px 0; font-size: 0.82rem; }
table.preds td { padding: 0 10px 0 0; border: none; text-align: left; }
.gallery.small figure, .gallery.small img { width: 150px; }
.gallery.pairs figure { width: 340px; }
.gallery.pairs .pair { display: flex; gap: 4px; }
.gallery.pairs img { width: 168px; }
.gallery .changed { height: 168px; display: flex; align-items: center; justify-content: center; text-align: center;
                    border: 1px dashed var(--bad); color: var(--bad); font-size: 0.85rem; padding: 10px; }
figcaption { line-height: 1.35; margin-top: 4px; }
.ok { color: var(--good); font-weight: 600; }
.no { color: var(--bad); font-weight: 600; }
.bar { display: inline-block; height: 10px; background: #7aa7d6; border-radius: 2px; vertical-align: middle; }
.colour-key { display: flex; align-items: center; gap: 8px; margin: 4px 0 8px; font-size: 0.8rem;
              color: var(--muted); flex-wrap: wrap; }
.colour-key .ramp { display: inline-block; width: 180px; height: 12px; border: 1px solid var(--line); }
.colour-key .what { margin-left: 6px; }
.legend-swatch { display: inline-block; width: 12px; height: 12px; border: 2px solid #00e5e5; vertical-align: -1px; }
.risk-high, .risk-medium { color: var(--bad); font-weight: 650; }
.risk-low { color: var(--warn); font-weight: 650; }
.risk-none { color: var(--good); font-weight: 650; }
@media print { body { background: #fff; } main { padding: 0; } nav.toc { display: none; } section { break-inside: avoid-page; } }
"""

# Only for automated checks: marks on <body> how many images decoded. The page reads the same without it.
IMAGE_CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } }
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
});
"""


# ---------------------------------------------------------------------------------------------
# The run folder, read without torch
# ---------------------------------------------------------------------------------------------
@dataclass
class RunData:
    """What a report needs from a run folder; optional parts are None when the run lacks them."""

    run_dir: Path
    meta: dict
    config: dict
    metrics: dict
    arrays: dict[str, np.ndarray]  # clusters.npz
    predictions: dict[str, np.ndarray] | None  # test_predictions.npz
    spray: dict | None
    spray_problem: str | None
    metrics_missing: bool = False  # no metrics.json: its results and warnings cannot be shown
    predictions_problem: str | None = None  # why test_predictions.npz is not used, when the run was evaluated
    # Test images found changed since the evaluation while drawing the flags (the verdict says so too).
    changed_test_images: list[int] = field(default_factory=list)

    @property
    def evaluated(self) -> bool:
        """Whether the run records an evaluation on a test set (in metrics.json or test_predictions.npz)."""
        return self.metrics.get("test_size") is not None or self.predictions is not None

    @property
    def test_source(self) -> str | None:
        return self.metrics.get("test_source") or self.meta.get("test_source")

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta.get("model", {}).get("grid", ())) or (0, 0)

    @property
    def preprocessing(self) -> Preprocessing | None:
        saved = self.meta.get("model", {}).get("preprocessing")
        return Preprocessing.from_dict(saved) if saved else None

    @property
    def n_clusters(self) -> int:
        return len([k for k in self.arrays if k.startswith("selected_")])

    @property
    def val_groups(self) -> np.ndarray | None:
        groups = self.arrays.get("groups")
        return groups if groups is not None and groups.size else None

    def class_name(self, c: int) -> str:
        names = self.class_names
        return names[c] if 0 <= c < len(names) else str(c)


def load_run(run_dir: str | Path) -> RunData:
    """Read a run folder written by `ShortcutDetector.fit(..., run_dir=...)`."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise InputError(
            f"expected a detection run folder with run.json, got {str(run_dir)!r}; "
            "pass the folder `edgeshort detect -o RUN` wrote"
        )
    meta = _read_json(meta_path)
    config = _read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else meta.get("config", {})
    metrics_missing = not (run_dir / "metrics.json").is_file()
    metrics = {} if metrics_missing else _read_json(run_dir / "metrics.json")
    if not (run_dir / "clusters.npz").is_file():
        raise InputError(
            f"expected clusters.npz in the run folder {str(run_dir)!r}, found none; the run did not finish, "
            "run `edgeshort detect` again"
        )
    with np.load(run_dir / "clusters.npz") as z:
        arrays = {name: z[name] for name in z.files}
    predictions, predictions_problem = None, None
    if (run_dir / "test_predictions.npz").is_file():
        with np.load(run_dir / "test_predictions.npz") as z:
            predictions = {name: z[name] for name in z.files}
        size = len(predictions["labels"])
        if not metrics_missing and metrics.get("test_size") != size:  # left by another evaluation
            predictions_problem = (
                f"test_predictions.npz holds the predictions of {size:,} test images, but metrics.json describes "
                + (f"an evaluation on {metrics['test_size']:,}" if metrics.get("test_size") is not None
                   else "no evaluation") + ": the two files come from different evaluations")
            predictions = None
    elif metrics.get("test_size") is not None:
        predictions_problem = (f"test_predictions.npz is missing from the run folder, though metrics.json records an "
                               f"evaluation on {metrics['test_size']:,} test images")
    spray, problem = None, None
    spray_path = run_dir / "spray" / "report.json"
    if spray_path.is_file():
        try:
            spray = json.loads(spray_path.read_text())
        except (OSError, ValueError) as exc:
            problem = f"spray/report.json could not be read ({exc})"
    return RunData(run_dir, meta, config, metrics, arrays, predictions, spray, problem, metrics_missing,
                   predictions_problem)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"expected JSON in {str(path)!r}, got a file that does not parse ({exc}); "
                         "run `edgeshort detect` again to rewrite it") from exc


# ---------------------------------------------------------------------------------------------
# Pictures: to a folder beside the page, or into it
# ---------------------------------------------------------------------------------------------
class Assets:
    """Turns pictures into `src` values: files in `folder` (linked relatively) or data URIs."""

    def __init__(self, folder: Path, page_dir: Path, embed: bool) -> None:
        self.folder = folder
        self.page_dir = page_dir
        self.embed = embed
        self.count = 0

    def _link(self, path: Path) -> str:
        rel = path.resolve().relative_to(self.page_dir.resolve()) if path.resolve().is_relative_to(
            self.page_dir.resolve()) else path.resolve()
        return quote(rel.as_posix()) if not rel.is_absolute() else rel.as_uri()

    def add(self, name: str, picture: Image.Image | np.ndarray | Path) -> str:
        self.count += 1
        if isinstance(picture, Path):
            if self.embed:
                return "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode("ascii")
            target = self.folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(picture, target)
            return self._link(target)
        image = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture))
        if self.embed:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", optimize=True)
            return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        target = self.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, optimize=True)
        return self._link(target)

    def where(self, name: str) -> str:
        """Where a figure's PNG file is, for its caption (HTML)."""
        if self.embed:
            return (f"Embedded in this page; without <code>--embed</code> it is also written as "
                    f"<code>{_e(self.folder.name)}/{_e(name)}</code> beside the page.")
        return f"<code>{_e(self.folder.name)}/{_e(name)}</code> beside this page holds it as a PNG."

    def figure(self, path: Path) -> str:
        """A figure already written as a file (into the folder, or a scratch folder when embedding)."""
        self.count += 1
        if self.embed:
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        return self._link(path)


# ---------------------------------------------------------------------------------------------
# Small HTML helpers
# ---------------------------------------------------------------------------------------------
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _pct(value, digits: int = 0) -> str:
    return "–" if value is None else f"{100 * float(value):.{digits}f}%"


def _img(src: str, alt: str, cls: str | None = None) -> str:
    extra = f' class="{cls}"' if cls else ""
    return f'<img src="{src}" alt="{_e(alt)}"{extra}>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], table_id: str | None = None,
           row_classes: Sequence[str | None] | None = None, text_columns: Sequence[int] = (0,)) -> str:
    """`rows` hold ready HTML (escape with `_e` before); `text_columns` are left-aligned."""
    head = "".join(f'<th class="text">{_e(h)}</th>' if i in text_columns else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cls = row_classes[r] if row_classes else None
        cells = "".join(
            cell if cell.startswith("<td") else (f'<td class="text">{cell}</td>' if i in text_columns else f"<td>{cell}</td>")
            for i, cell in enumerate(row)
        )
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _empty(why: str, how: str) -> str:
    return f'<div class="empty"><p class="why">{why}</p><p>{how}</p></div>'


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{_e(title)}</h2>{body}</section>'


def _figure(src: str, alt: str, caption: str, width: int | None = None) -> str:
    size = f' style="width: {width}px"' if width else ""
    return f'<div class="figure"><img src="{src}" alt="{_e(alt)}"{size}><div class="caption">{caption}</div></div>'


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
def _summary_figures(m: dict) -> tuple[dict, dict]:
    """Worst-group and average accuracy per prediction kind: the per-group table's, else metrics.json's own keys."""
    tables = m.get("group_accuracy") or {}
    wga = {k: tables[k]["worst"] if k in tables else m.get(f"wga_{k}") for k in ("original", "ablated", "dfr")}
    aga = {k: tables[k]["average"] if k in tables else m.get(f"aga_{k}") for k in ("original", "ablated", "dfr")}
    return wga, aga


def _metrics_disagreements(m: dict) -> list[str]:
    """Where metrics.json's summary keys differ from its own per-group table."""
    out = []
    for kind, table in (m.get("group_accuracy") or {}).items():
        for key, summary, words in (("wga", "worst", "worst cell"), ("aga", "average", "average")):
            stored = m.get(f"{key}_{kind}")
            if stored is not None and table.get(summary) is not None and abs(stored - table[summary]) > 1e-9:
                out.append(f"<code>{key}_{_e(kind)}</code> is {_num(stored)} but its table's {words} is "
                           f"{_num(table[summary])}")
    return out


def _describe_source(source: str | None, brief: bool = False) -> str:
    """A dataset's recorded source string in words (HTML), the string itself in full; `brief` gives it in words
    alone: built-in synthetic data by its split, seed and artefact, a listing by its path and columns, a class
    map by its mapping."""
    if not source:
        return "not recorded"
    kind, _, rest = source.partition(":")
    if brief and kind == "synthetic":
        split, _, recipe = rest.partition(":")
        try:
            spec = json.loads(recipe)
            return (f"built-in synthetic data ({_e(split)} split, {_e(spec.get('artefact'))} artefact, seed "
                    f"{_e(spec.get('seed'))}; the whole recipe under Provenance)")
        except ValueError:
            pass
    if brief and kind in ("manifest", "merged", "folder"):
        try:
            if kind == "folder":
                return f"the image folder <code>{_e(rest)}</code>"
            spec = json.loads(rest)
            if kind == "merged":
                mapping = ", ".join(f"{_e(k)} &rarr; {_e(v)}" for k, v in (spec.get("class_map") or {}).items())
                return f"{_describe_source(spec.get('source'), brief=True)}, its classes mapped ({mapping})"
            columns = ", ".join(f"{_e(role)} = {_e(header)}" for role, header in (spec.get("columns") or {}).items())
            return (f"the CSV listing <code>{_e(spec['csv'])}</code>" + (f" (columns {columns})" if columns else ""))
        except (ValueError, KeyError, AttributeError):
            pass
    words = {"folder": "the image folder", "seed": "the seed layout", "manifest": "the CSV listing",
             "synthetic": "built-in synthetic data, generated again from its settings",
             "merged": "images with classes merged by a class map"}.get(kind)
    return (f"{words}: " if words else "") + f"<code>{_e(source)}</code>"


def _eval_argument(source: str | None) -> str | None:
    """The `--eval ...` arguments (a shell fragment) that load a recorded test source again, or None when
    the source is not on disk (synthetic data) or not recorded."""
    if not source:
        return None
    kind, _, rest = source.partition(":")
    if kind == "folder":
        return shlex.quote(rest)
    if kind == "seed":
        split, _, root = rest.partition(":")
        return shlex.quote(str(Path(root) / split))
    if kind == "manifest":
        spec = json.loads(rest)
        columns = ",".join(f"{role}={header}" for role, header in (spec.get("columns") or {}).items())
        return (shlex.quote(spec["csv"]) + (f" --image-root {shlex.quote(spec['root'])}" if spec.get("root") else "")
                + (f" --columns {shlex.quote(columns)}" if columns else ""))
    if kind == "merged":
        spec = json.loads(rest)
        inner = _eval_argument(spec.get("source"))
        mapping = ",".join(f"{k}={v}" for k, v in (spec.get("class_map") or {}).items())
        return None if inner is None else f"{inner} --class-map {shlex.quote(mapping)}"
    return None


def _eval_command(run: RunData) -> str:
    """How to evaluate the run again (HTML): with the recorded test images when they are on disk."""
    folder = shlex.quote(str(run.run_dir))
    try:
        argument = _eval_argument(run.test_source)
    except (ValueError, KeyError):  # a source string this version cannot parse: the generic form
        argument = None
    if argument:
        return f"<code>{_e(f'edgeshort report {folder} --eval {argument}')}</code>"
    if (run.test_source or "").startswith("synthetic:"):
        return ("<code>edgeshort demo</code> or <code>edgeshort detect --demo -o RUN</code> (the built-in test images "
                "are generated, not stored)")
    return (f"<code>{_e(f'edgeshort report {folder} --eval TEST_IMAGES')}</code> (or <code>edgeshort detect … --eval "
            "TEST_IMAGES -o RUN</code>)")


def _missing_metrics_notice(run: RunData) -> str:
    if not run.metrics_missing:
        return ""
    return ('<div class="verdict"><p class="headline">metrics.json is missing from the run folder</p>'
            "<p>It holds the run's warnings, its validation checks (balanced accuracy before and after ablation, how "
            "far the clusters follow the classes, the KNN's calibration), the test results with their intervals and "
            "the timings. None of them can be shown, so the absence of a warning on this page means nothing.</p>"
            f"<p>Evaluating again writes the test results: {_eval_command(run)}. The fit's own checks and warnings "
            "come back only with a new fit (<code>edgeshort detect … -o RUN</code>).</p></div>")


def _verdict(run: RunData, assets: Assets, figures: Path) -> str:
    scores = sorted(run.meta.get("scores", []), key=lambda s: s["score"], reverse=True)
    shortcut = int(run.meta.get("shortcut_cluster", scores[0]["cluster"] if scores else 0))
    m = run.metrics
    parts = [_missing_metrics_notice(run)]
    if scores:
        top = next(s for s in scores if s["cluster"] == shortcut)
        runner = next((s for s in scores if s["cluster"] != shortcut), None)
        margin = m.get("score_margin", top["score"] - runner["score"] if runner else None)
        cluster_line = (
            f"Shortcut cluster: {shortcut} &mdash; {top['size']} validation images, "
            f"{_pct(top['homogeneity'])} {_e(run.class_name(top['majority_class']))}"
        )
        verdict = current_verdict(m)
        # The verdict leads: whether there is a shortcut to guard at all, before which cluster it is.
        headline, points = cluster_line, []
        if verdict is not None:
            title, _, detail = verdict["summary"].partition(": ")
            headline = _e(title) if verdict["verdict"] == FOUND else f'<span class="no">{_e(title)}</span>'
            points = [_e(detail[0].upper() + detail[1:]) + ".", cluster_line + "."]
        if scores[0]["cluster"] != shortcut:  # the score's first was passed over: its tokens do not stand apart
            points.append(f"Cluster score {_num(top['score'], 4)}, below cluster {scores[0]['cluster']}'s "
                          f"{_num(scores[0]['score'], 4)}: the score ranked that one first, but its tokens do not stand "
                          "apart from clean ones (see the verdict).")
        else:
            points.append(f"Cluster score {_num(top['score'], 4)}, a margin of <strong>{_num(margin, 4)}</strong> over "
                          + (f"cluster {runner['cluster']} ({_num(runner['score'], 4)})." if runner
                             else "the other clusters."))
        if m.get("cluster_class_nmi") is not None:
            centred = m.get("cluster_space_used") == "class_centred"
            points.append(f"The clusters share {_num(m['cluster_class_nmi'], 2)} normalised mutual information with "
                          f"the class labels (from {CLASS_FOLLOWING_NMI} up they follow the classes, not an artefact)"
                          + ("; they were found without each class's mean." if centred else "."))
        purity = m.get("shortcut_cluster_group_purity")
        if purity is not None:
            groups = run.val_groups
            # Against all validation images: a cluster no richer in the artefact than they are did not gather it.
            overall = (f", against {_pct(float(np.mean(groups == 1)), 1)} of all validation images"
                       if groups is not None else "")
            points.append(f"{_pct(purity, 1)} of its members carry the artefact{overall} (group labels, used only to "
                          "check the detector)." + (' <span class="no">Most of them do not: this cluster is not the '
                                                    "artefact group; whatever its flags mark, the test set's "
                                                    "per-group accuracy shows what masking them does.</span>"
                                                    if purity < 0.5 else ""))
        if m.get("knn_positive_candidates") is not None:
            points.append(_e(describe_positives(m["knn_positive_candidates"], m.get("knn_positives"),
                                                run.config.get("positive_quantile"), m["knn_positive_threshold"])))
        if m.get("val_shortcut_present_rate") is not None:
            points.append(f"The key-KNN guard finds a shortcut in {_pct(m['val_shortcut_present_rate'], 1)} of the "
                          "validation images.")
        if m.get("wga_original") is not None:
            # The figures the per-group table shows, so the verdict never contradicts it.
            wga, aga = _summary_figures(m)
            chain = [f"original {_num(wga['original'])}", f"ablated {_num(wga.get('ablated'))}"]
            if wga.get("dfr") is not None:
                chain.append(f"ablated + DFR {_num(wga['dfr'])}")
            avg = [_num(aga[k]) for k in ("original", "ablated", "dfr") if aga.get(k) is not None]
            steps = (m.get("group_accuracy_intervals") or {}).get("changes")
            if steps and m.get("group_accuracy"):  # a loss beyond test-set noise, not any lower figure
                losses = [f"{KIND_TITLES[c['to']]} vs {KIND_TITLES[c['from']]}" for c in steps
                          if change_verdict(c, m["group_accuracy"]) == "loss"]
            else:
                losses = [KIND_TITLES[k] for k in ("ablated", "dfr")
                          if wga.get(k) is not None and wga[k] < wga["original"]]
            points.append(f"Worst-group accuracy on the test set: {' &rarr; '.join(chain)} "
                          f"(average {' &rarr; '.join(avg)})."
                          + (f' <span class="no">The guard lowers it{" beyond test-set noise" if steps else ""} '
                             f'({", ".join(losses)}).</span>' if losses else ""))
        elif m.get("accuracy_original") is not None:
            chain = [f"{KIND_TITLES[k]} {_num(m[f'accuracy_{k}'])}" for k in ("original", "ablated", "dfr")
                     if m.get(f"accuracy_{k}") is not None]
            points.append(f"Test accuracy (no artefact labels, so no worst group): {' &rarr; '.join(chain)}. "
                          f"Ablation changed {_pct(m['test_changed_by_ablation_rate'], 1)} of the predictions.")
        if m.get("test_shortcut_present_rate") is not None and m.get("val_shortcut_present_rate") is not None:
            points.append(f"The guard finds a shortcut in {_pct(m['test_shortcut_present_rate'], 1)} of the test images "
                          f"({_pct(m['val_shortcut_present_rate'], 1)} of the validation images).")
        intervals, tables = m.get("group_accuracy_intervals"), m.get("group_accuracy")
        groups = "group"
        if not tables and m.get("flag_group_accuracy"):  # no artefact labels: the guard's own flag groups
            intervals, tables, groups = m.get("flag_group_accuracy_intervals"), m["flag_group_accuracy"], "flag group"
        if intervals and tables:
            steps = [describe_change(c, tables, intervals["confidence"]) for c in intervals["changes"]]
            points.append(f"Each step on the same test images (paired bootstrap over each class and {groups}): "
                          + "; ".join(_e(step[0].upper() + step[1:]) for step in steps) + ".")
        counts = None if run.predictions is None else _unflagged_changes(run.predictions)
        if counts is not None and counts[1]:  # "0 of the 0" says nothing
            points.append(f"The DFR head re-scores every image, flagged or not: it changed the label of {counts[0]:,} "
                          f"of the {counts[1]:,} test images where no shortcut was found.")
        if m.get("val_balanced_accuracy_ablated") is not None:
            before, after = m["val_balanced_accuracy_original"], m["val_balanced_accuracy_ablated"]
            points.append(f"Balanced validation accuracy {_num(before)} before ablation, {_num(after)} after it"
                          + (" (a real shortcut's ablation gains or keeps it)." if after >= before else
                             " (see the warning)." if after < before - ABLATION_HARM_TOLERANCE else
                             " (lower; masking a shortcut the model relies on usually raises it).")
                          + ("" if verdict is None else f" Masking fixed {verdict['fixed']:,} validation predictions "
                             f"and broke {verdict['broken']:,}."))
        for warning in [*(m.get("warnings") or []), *(m.get("test_warnings") or []),
                        *(m[key] for key in ("guard_warning", "guard_cell_warning", "dfr_warning",
                                             "dfr_cell_warning") if m.get(key))]:
            points.append(f'<span class="no">{_e(warning[0].upper() + warning[1:])}.</span>')
        if run.changed_test_images:
            points.append(f'<span class="no">{len(run.changed_test_images)} of the test images drawn under Flags '
                          "differ from those the run evaluated: the images at its test source changed since, so these "
                          f"test results may not describe them. Evaluate again: {_eval_command(run)}.</span>")
        for disagreement in _metrics_disagreements(m):
            points.append(f'<span class="no">metrics.json contradicts itself: {disagreement}; the file was edited or '
                          "mixed from two evaluations, and this page shows the per-group table's figures. Evaluate "
                          f"again: {_eval_command(run)}.</span>")
        if not run.metrics_missing and "warnings" not in m:
            points.append('<span class="no">metrics.json holds no record of the fit\'s warnings (an older edgeshort, '
                          "or the file was rebuilt by an evaluation after the fit's was lost): whether the fit warned "
                          "is unknown. A new fit (<code>edgeshort detect … -o RUN</code>) records them.</span>")
        if m.get("patch_precision") is not None or m.get("patch_recall") is not None:
            points.append(f"Flagged patches against the true artefact patches: precision {_num(m.get('patch_precision'))}, "
                          f"recall {_num(m.get('patch_recall'))}.")
        if run.spray is not None:
            points.append(_spray_verdict_point(run.spray))
            for warning in run.spray.get("warnings") or []:
                points.append(f'<span class="no">SpRAy warned: {_e(warning)}.</span>')
        parts.append(f'<div class="verdict"><p class="headline">{headline}</p><ul>'
                     + "".join(f"<li>{p}</li>" for p in points) + "</ul></div>")
        parts.append(
            "<p>The highest cluster score marks the shortcut cluster, unless its tokens do not stand apart from "
            "clean ones while a lower-ranked cluster's do: nearly one class (homogeneity), predicted "
            "confidently right for its dominant class (the lowest Brier score, which need not be the majority "
            "class) and poorly for the others. A small margin means the clusters look alike to the score; confirm "
            "with the heatmaps below.</p>"
        )
        names = run.class_names
        headers = ["cluster", "size", "homogeneity", "majority class", *[f"Brier {n}" for n in names],
                   "dominant class (lowest Brier)", "score"]
        rows, classes = [], []
        for s in sorted(run.meta.get("scores", []), key=lambda s: s["cluster"]):
            brier = list(s.get("brier") or []) + [None] * (len(names) - len(s.get("brier") or []))
            rows.append([
                f"{s['cluster']}" + (" (shortcut)" if s["cluster"] == shortcut else ""), _num(s["size"]),
                _num(s["homogeneity"]), _e(run.class_name(s["majority_class"])), *[_num(b) for b in brier],
                _e(run.class_name(s["dominant_class"])), _num(s["score"], 4),
            ])
            classes.append("highlight" if s["cluster"] == shortcut else None)
        parts.append(_table(headers, rows, "cluster-scores", classes, text_columns=(0, 3, len(headers) - 2)))
    else:
        parts.append(_empty("The run records no cluster scores.", "Run <code>edgeshort detect</code> again."))

    a = run.arrays
    if {"projection", "assignments", "labels"} <= set(a):
        from edgeshort.report.figures import cluster_scatter

        space = m.get("cluster_space_used") or "pooled"

        path = cluster_scatter(a["projection"], a["assignments"], a["labels"], run.class_names or
                               [str(c) for c in range(int(a["labels"].max()) + 1)], shortcut,
                               figures / "cluster_scatter.png", a.get("centroids"), space=space)
        what = ("pooled last-block features, less their class's mean," if space == "class_centred"
                else "pooled last-block features")
        parts.append(_figure(assets.figure(path), "cluster scatter",
                             f"PCA projection of the {what} of the validation set (the two first "
                             "components), coloured by k-means cluster (crosses: centres) and by class. "
                             + assets.where(path.name), width=960))
    return _section("verdict", "Verdict", "".join(parts))


def _source(file: str | None, index: int) -> str:
    """An image's file name, its full path on hover; its index when it was held in memory."""
    if not file:
        return f"#{index}"
    return f'<span class="file" title="{_e(file)}">{_e(Path(file).name)}</span>'


def _sample_files(run: RunData, c: int) -> dict[int, str | None]:
    """The validation file behind each of cluster c's pictures (rank -> file), as the fit recorded them."""
    path = run.run_dir / "heatmaps" / f"cluster_{c}" / "samples.json"
    if not path.is_file():
        return {}
    return {int(row["rank"]): row.get("file") for row in json.loads(path.read_text())}


def _cluster_pictures(run: RunData, c: int, dataset_loader: Callable[[], object | None]):
    """(image, overlay, patch grid) per sample nearest centre c: the run's PNGs, else drawn from the images."""
    heat_dir = run.run_dir / "heatmaps" / f"cluster_{c}"
    grid_dir = run.run_dir / "patch_grids" / f"cluster_{c}"
    ranks = sorted(int(p.name.split("_")[1]) for p in heat_dir.glob("sample_*_image.png")) if heat_dir.is_dir() else []
    if ranks:
        return [
            (heat_dir / f"sample_{r}_image.png", heat_dir / f"sample_{r}_overlay.png",
             grid_dir / f"sample_{r}_patches.png") for r in ranks
        ], None
    dataset = dataset_loader()
    if dataset is None:
        return [], None
    out = []
    selected, maps = run.arrays[f"selected_{c}"], run.arrays[f"heatmaps_{c}"]
    prep = run.preprocessing
    for i, heat in zip(selected[:8], maps[:8]):
        image = dataset.image(int(i))
        if prep is not None:
            image = prep.model_view(image)
        pixels = np.asarray(image.convert("RGB"))
        heat = heat.reshape(run.grid)
        scale = max(1, -(-112 // max(1, min(pixels.shape[:2]))))
        hottest = np.unravel_index(int(np.argmax(heat)), run.grid)
        out.append((upscale(pixels, scale), upscale(heatmap_overlay(pixels, heat), scale),
                    upscale(np.ascontiguousarray(patch_grid_crop(pixels, run.grid, hottest, span=5)), scale)))
    return out, "drawn from the validation images (the run folder holds no pictures)"


def _verdict_caveat(run: RunData, what: str) -> str:
    """Above the guard's diagnostics, when the verdict says there is no shortcut to guard: the 'shortcut cluster'
    is then only the cluster the guard was built on, and the flags need not mark anything but what the model
    needs."""
    verdict = current_verdict(run.metrics)
    if verdict is None or verdict["verdict"] not in DO_NOT_GUARD:
        return ""
    title = verdict["summary"].partition(": ")[0]
    return _empty(f"The verdict is &ldquo;{_e(title)}&rdquo;: {what}.",
                  "Shown for inspection only: deploy the model as it is, without the guard (see the verdict above).")


def _clusters(run: RunData, assets: Assets, dataset_loader: Callable[[], object | None]) -> str:
    k = run.n_clusters
    if k == 0:
        return _section("clusters", "Clusters", _empty("The run holds no selected samples per cluster.",
                                                       "Run <code>edgeshort detect</code> again."))
    shortcut = int(run.meta.get("shortcut_cluster", 0))
    scores = {s["cluster"]: s for s in run.meta.get("scores", [])}
    labels, groups = run.arrays.get("labels"), run.val_groups
    contrast = (
        "the other clusters' mean key at the same position" if run.config.get("heatmap", SETTINGS_OF_EARLIER_RUNS["heatmap"]) == "mean"
        else "its nearest keys among the other clusters' patches, at any position"
    )
    parts = [
        "<p>For each cluster: the validation images nearest its centre, their key heatmaps (per patch, the distance "
        f"of the image's key to {contrast}; bright = unlike anything there) blended over "
        "the image, and the 5&times;5 patch grid around the hottest patch. In the shortcut cluster the heat should "
        "sit on the artefact, not on the object.</p>",
        caveat := _verdict_caveat(run, "the cluster marked below is the one the guard was built on, not a shortcut"),
    ]
    # Mean heatmaps share one scale (the highest mean of any cluster), so clusters stay comparable but readable.
    means = {}
    for c in range(k):
        maps = run.arrays.get(f"heatmaps_{c}")
        if maps is not None and len(maps) and run.grid[0] > 0:
            means[c] = maps.reshape(len(maps), -1).mean(0).reshape(run.grid)
    top = max((float(m.max()) for m in means.values()), default=1.0) or 1.0
    parts.append(_colour_key(HOT, "0", "1", f"key heatmap, blended at {HEAT_ALPHA:.0%} over the image: key distance over the "
                             "largest among every cluster's samples (one scale for all)")
                 + _colour_key(HOT, "0", _num(top), "mean key heatmap, on that scale"))
    for c in range(k):
        s = scores.get(c, {})
        title = f"Cluster {c}" + ((" — the guard's cluster" if caveat else " — shortcut cluster") if c == shortcut else "")
        desc = ""
        if s:
            desc = (f"{s['size']} images, {_pct(s['homogeneity'])} {_e(run.class_name(s['majority_class']))}, "
                    f"score {_num(s['score'], 4)}")
        parts.append(f"<h3>{_e(title)}</h3><p class=\"meta\">{desc}</p>")
        row_parts = []
        if c in means:
            gh, gw = run.grid
            src = assets.add(f"clusters/cluster_{c}_mean_heatmap.png",
                             colourise(grid_to_pixels(means[c], (168, 168 * gw // gh)), 0.0, top))
            n = len(run.arrays[f"heatmaps_{c}"])
            row_parts.append(f'<figure class="mean">{_img(src, f"cluster {c} mean heatmap")}'
                             f"<figcaption>mean key heatmap of the {n} images nearest the centre</figcaption></figure>")
        selected = run.arrays[f"selected_{c}"]
        pictures, note = _cluster_pictures(run, c, dataset_loader)
        files = _sample_files(run, c)
        if pictures:
            header, row_img, row_overlay, row_grid = [], [], [], []
            for r, (image, overlay, patches) in enumerate(pictures):
                i = int(selected[r]) if r < len(selected) else None
                label = ""
                if i is not None and labels is not None and i < len(labels):
                    label = _e(run.class_name(int(labels[i])))
                    if groups is not None:
                        label += f"<br>{_e(ARTEFACT_GROUP_NAMES[int(groups[i])] if int(groups[i]) < 2 else groups[i])}"
                header.append(f'<td class="label">{_source(files.get(r), i if i is not None else r)}<br>{label}</td>')
                for row, pic, kind in ((row_img, image, "image"), (row_overlay, overlay, "heatmap"),
                                       (row_grid, patches, "patches")):
                    if isinstance(pic, Path) and not pic.is_file():
                        row.append('<td class="label">missing</td>')
                        continue
                    src = assets.add(f"clusters/cluster_{c}_sample_{r}_{kind}.png", pic)
                    row.append(f"<td>{_img(src, f'cluster {c} sample {r} {kind}')}</td>")
            rows = "".join(
                f"<tr><th>{name}</th>{''.join(cells)}</tr>"
                for name, cells in (("sample", header), ("image", row_img), ("key heatmap", row_overlay),
                                    ("patch grid", row_grid))
            )
            row_parts.append(f'<div class="scroll"><table class="strip">{rows}</table></div>')
        else:
            row_parts.append(_empty(
                "No images of this cluster are available: the run folder holds no pictures and its validation "
                "images cannot be reloaded.",
                "Fit with a run folder (<code>edgeshort detect -o RUN</code> writes <code>heatmaps/</code> and "
                "<code>patch_grids/</code>). The mean heatmap needs no images."))
        parts.append(f'<div class="cluster-row">{"".join(row_parts)}</div>')
        if note:
            parts.append(f'<p class="meta">Pictures {note}.</p>')
    return _section("clusters", "Clusters: images nearest each centre", "".join(parts))


def _pick_samples(artefact: np.ndarray, correct: np.ndarray, changed: np.ndarray, per_category: int,
                  seed: int = 0) -> list[tuple[bool, bool, np.ndarray]]:
    """Up to `per_category` indices per (artefact, correct) cell, random but with a changed prediction if any."""
    rng = np.random.default_rng(seed)
    out = []
    for art in (True, False):
        for ok in (True, False):
            members = np.flatnonzero((artefact == art) & (correct == ok))
            pick = rng.permutation(members)[:per_category]
            moved = np.setdiff1d(members[changed[members]], pick)
            if len(pick) and not changed[pick].any() and len(moved):
                pick[-1] = moved[0]  # show what the guard changes when it changes something here
            out.append((art, ok, np.sort(pick)))
    return out


def _mark(run: RunData, predicted: int, truth: int) -> str:
    """A predicted class, green when right and red when wrong."""
    return f'<span class="{"ok" if predicted == truth else "no"}">{_e(run.class_name(int(predicted)))}</span>'


def _flags(run: RunData, assets: Assets, test_dataset, test_problem: str | None,
           per_category: int = SAMPLES_PER_CATEGORY) -> str:
    m = run.metrics
    prep = run.preprocessing
    parts = [
        "<p>The key-KNN guard flags patch tokens whose keys look like the shortcut cluster's most distinctive keys, "
        "grows the flags to their neighbours, and the ablated prediction excludes those tokens.</p>",
        _verdict_caveat(run, "these flags mark no shortcut; they fall on whatever the guard's cluster holds, "
                             "often the object itself"),
    ]
    parts.append(_test_set_line(run))
    pred = run.predictions
    # Flag quality needs artefact masks; say so either way, it is the guard's own measurement.
    if m.get("patch_precision") is not None or m.get("patch_recall") is not None:
        parts.append(f"<p>Against the true artefact patches of the test set: precision "
                     f"<strong>{_num(m.get('patch_precision'))}</strong>, recall "
                     f"<strong>{_num(m.get('patch_recall'))}</strong> (dilated flags).</p>")
    elif pred is not None and run.metrics_missing:
        parts.append(_empty("No flag precision or recall: metrics.json, which holds them, is missing.",
                            f"Evaluate again: {_eval_command(run)}."))
    elif pred is not None:
        parts.append(_empty(
            "No flag precision or recall: the test set has no artefact masks (truth masks).",
            "Masks come with the synthetic data (<code>edgeshort demo</code>); for your own data add a "
            "<code>mask</code> column to the CSV listing (a binary image of the artefact's pixels per row, empty "
            "for none), or pass an <code>ImageDataset</code> with <code>masks=</code> to "
            "<code>result.evaluate()</code>."))
    if pred is None:
        if run.predictions_problem:
            parts.append(_empty(
                f"No flag pictures: {_e(run.predictions_problem)}. The figures in the verdict and under Per-group "
                "accuracy come from metrics.json; the pictures need each test image's stored flags.",
                f"Evaluate again to write both files from one evaluation: {_eval_command(run)}."))
        elif run.metrics_missing:
            parts.append(_empty(
                "No test predictions (test_predictions.npz), and metrics.json is missing too: whether the run was "
                "evaluated on a test set is unknown.",
                f"Evaluate it: {_eval_command(run)} (it evaluates, then reports)."))
        else:
            parts.append(_empty(
                "No test predictions: the run was not evaluated on a test set.",
                "Run <code>edgeshort report RUN --eval TEST_IMAGES</code> (it evaluates, then reports), or "
                "<code>edgeshort detect … --eval TEST_IMAGES</code>, or call <code>result.evaluate(test)</code>."))
        return _section("flags", "Key-KNN flags on test images", "".join(parts))
    if test_dataset is None:
        parts.append(_empty(
            f"The test images are not available{': ' + _e(test_problem) if test_problem else ''}; the predictions "
            f"of {len(pred['labels'])} test images are summarised in the other sections.",
            f"Pass them: {_eval_command(run)} or <code>write_report(run_dir, test_dataset=...)</code>."))
        return _section("flags", "Key-KNN flags on test images", "".join(parts))

    labels = pred["labels"].astype(int)
    guarded_key = "dfr_logits" if pred.get("dfr_logits") is not None and pred["dfr_logits"].size else "ablated_logits"
    guarded = pred[guarded_key].argmax(1)
    original = pred["logits"].argmax(1)
    ablated = pred["ablated_logits"].argmax(1)
    groups = pred.get("groups")
    has_groups = groups is not None and groups.size == len(labels)
    artefact = groups.astype(bool) if has_groups else pred["present"].astype(bool)
    picks = _pick_samples(artefact, guarded == labels, guarded != original, per_category)
    guarded_name = "ablated + DFR" if guarded_key == "dfr_logits" else "ablated"
    parts.append(
        f"<p>{per_category} random test images per cell; “right” and “wrong” refer to the guarded prediction "
        f"({guarded_name}), and where the guard changed a prediction in a cell one such image is included. "
        + ("Rows split by the test set's group labels." if has_groups else
           "The test set has no group labels, so rows split by whether the guard found a shortcut.") + "</p>"
        + _dfr_rescoring(pred)
        + _tint_legend(run))
    changed, check = _changed_since_evaluation(run, test_dataset, np.concatenate([idx for _, _, idx in picks]))
    run.changed_test_images = sorted(changed)
    parts.append(check)
    for art, ok, idx in picks:
        what = ("with the artefact" if art else "without the artefact") if has_groups else (
            "shortcut found" if art else "no shortcut found")
        title = f"{'Artefact-bearing' if art else 'Clean'} images, {'right' if ok else 'wrong'}" if has_groups else (
            f"{what.capitalize()}, {'right' if ok else 'wrong'}")
        count = int(((artefact == art) & ((guarded == labels) == ok)).sum())
        parts.append(f"<h3>{_e(title)}</h3><p class=\"meta\">{_plural(count, 'test image')} {what} "
                     f"{'predicted right' if ok else 'predicted wrong'} by the guarded model.</p>")
        if not len(idx):
            parts.append('<p class="meta">None in this test set.</p>')
            continue
        figures = []
        for i in idx:
            i = int(i)
            if i in changed:  # the stored flags belong to other pixels: drawing them would mislead
                figures.append(f'<figure><div class="changed">image changed since the evaluation: not drawn</div>'
                               f"<figcaption>{_source(test_dataset.file_name(i), i)}</figcaption></figure>")
                continue
            image = test_dataset.image(i).convert("RGB")
            if prep is not None:
                image = prep.seen_part(image)
            if max(image.size) > 2 * OVERLAY_SIDE:  # keep the page light: draw on a copy of at most 2x size
                image.thumbnail((2 * OVERLAY_SIDE, 2 * OVERLAY_SIDE))
            pixels = np.asarray(image)
            scale = max(1, -(-OVERLAY_SIDE // max(1, min(pixels.shape[:2]))))
            # The image as it is, so the artefact's own colour shows, then with the tint.
            outlined = flag_outline_overlay(np.asarray(upscale(pixels, scale)), pred["flags"][i], width=scale)
            plain_src = assets.add(f"flags/test_{i}_outlined.png", outlined)
            picture = guard_overlay(pixels, pred["saliency"][i], pred["flags"][i], scale=scale)
            src = assets.add(f"flags/test_{i}.png", picture)

            head = f"{_source(test_dataset.file_name(i), i)} · true <strong>{_e(run.class_name(labels[i]))}</strong>" + (
                f" · {ARTEFACT_GROUP_NAMES[int(groups[i])]}" if has_groups and int(groups[i]) < 2 else "")
            kinds = [("original", original[i]), ("ablated", ablated[i])]
            if guarded_key == "dfr_logits":
                kinds.append(("ablated + DFR", guarded[i]))
            preds = "".join(f"<tr><td>{name}</td><td>{_mark(run, p, labels[i])}</td></tr>" for name, p in kinds)
            raw = int(pred["raw_flags"][i].sum())
            if pred["present"][i]:
                tail = (f"{_plural(raw, 'patch', 'patches')} flagged ({int(pred['flags'][i].sum())} masked after "
                        "dilation) · shortcut present")
            else:  # too few flags to count as a shortcut: nothing is masked, whatever the raw count
                tail = (f"{_plural(raw, 'patch', 'patches')} flagged, fewer than min_patches "
                        f"{run.config.get('min_patches', '?')}: nothing masked · shortcut absent" if raw
                        else "no patch flagged · shortcut absent")
                if guarded_key == "dfr_logits" and guarded[i] != original[i]:
                    tail += " · the label changed all the same: the retrained DFR head re-scores every image, flagged or not"
            figures.append(f'<figure><div class="pair">{_img(plain_src, f"test image {i} with flag outlines")}'
                           f"{_img(src, f'test image {i} with flags and tint')}</div><figcaption>{head}"
                           f'<table class="preds">{preds}</table>{tail}</figcaption></figure>')
        parts.append(f'<div class="gallery pairs">{"".join(figures)}</div>')
    return _section("flags", "Key-KNN flags on test images", "".join(parts))


def _changed_since_evaluation(run: RunData, test_dataset, indices: np.ndarray) -> tuple[set[int], str]:
    """Which of the test images at `indices` differ from those the run evaluated (by the digest of each
    image as the model saw it, stored at evaluation), and the page's note on the check."""
    stored = run.predictions.get("input_sha256")
    if stored is None or len(stored) != len(run.predictions["labels"]) or run.preprocessing is None:
        return set(), ('<p class="meta">The run stores no digest of its test images (evaluated by an older '
                       "edgeshort), so whether the images below are the ones evaluated cannot be checked. Evaluating "
                       f"again stores them: {_eval_command(run)}.</p>")
    indices = np.unique(indices.astype(np.int64))
    if not len(indices):
        return set(), ""
    current = test_dataset.subset(indices).input_digests(run.preprocessing)
    changed = indices[current != stored[indices]]
    if not len(changed):
        return set(), (f'<p class="meta">Each of the {len(indices)} images drawn below was checked against the digest '
                       "stored at evaluation: the same pixels the stored flags and predictions were made on.</p>")
    names = ", ".join(Path(test_dataset.file_name(int(i)) or f"#{i}").name for i in changed[:8])
    more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
    return {int(i) for i in changed}, _empty(
        f'<span class="no">{len(changed)} of the {len(indices)} test images chosen for the pictures differ from the '
        f"images the run evaluated</span> ({_e(names)}{_e(more)}): their pixels, as the model sees them, changed "
        "since (edited, replaced or reordered files). The stored flags would be drawn on other pixels, so those "
        "pictures are left out, and the run's test results may not describe the images now at its test source.",
        f"Evaluate again on the current images: {_eval_command(run)}.")


def _unflagged_changes(pred: dict[str, np.ndarray]) -> tuple[int, int] | None:
    """(test images with no shortcut found whose label the DFR head changed, such images), None without a head."""
    dfr = pred.get("dfr_logits")
    if dfr is None or not dfr.size:
        return None
    unflagged = ~pred["present"].astype(bool)
    return int((unflagged & (dfr.argmax(1) != pred["logits"].argmax(1))).sum()), int(unflagged.sum())


def _dfr_rescoring(pred: dict[str, np.ndarray] | None) -> str:
    """The sentence that says the DFR head acts on every image, with how often that changed an unflagged label."""
    counts = None if pred is None else _unflagged_changes(pred)
    if counts is None:
        return ""
    changed, unflagged = counts
    return (f"<p>The retrained DFR head re-scores every image, flagged or not: it changed the label of "
            f"<strong>{changed:,} of the {unflagged:,}</strong> test images where no shortcut was found (nothing "
            "masked), so the guarded label can differ from the original one on an image the guard left alone.</p>")


def _tint_legend(run: RunData) -> str:
    """What the flag pictures show: the outlines are the guard's flags; the tint is another measure, said exactly."""
    if run.config.get("saliency", SETTINGS_OF_EARLIER_RUNS["saliency"]) == "mean":
        heatmap = run.config.get("heatmap", SETTINGS_OF_EARLIER_RUNS["heatmap"])
        same = ("the contrast this run's key heatmaps use too (<code>heatmap</code> = <code>mean</code>)"
                if heatmap == "mean" else "not the contrast the detector's key heatmaps use (<code>heatmap</code> = "
                f"<code>{_e(heatmap)}</code>: the distance to the nearest clean keys at any position)")
        measure = ("the distance of its key to the mean key at the same position over the validation images outside "
                   f"the shortcut cluster (<code>saliency</code> = <code>mean</code>). This is {same}. Lesions vary "
                   "from image to image, so they sit far from any mean key and are tinted on clean images too")
        key = "key distance to the clean mean key, over its 99.9th percentile"
    else:
        measure = ("the distance of its key to the nearest of the KNN's clean reference keys (<code>saliency</code> "
                   "= <code>nearest</code>): the key heatmaps' kind of contrast, measured against the clean keys the "
                   "bundle holds rather than every validation patch. A lesion has near neighbours among the clean "
                   "images' lesions, an artefact has none, so the tint is strongest where the image shows what the "
                   "clean images never do")
        key = "key distance to the nearest clean reference key, over its 99.9th percentile"
    return (
        "<p>Each test image is shown twice: <strong>left as it is</strong>, with an outline "
        '(<span class="legend-swatch"></span>) around every patch the guard flagged and masked: the outlines are '
        "its decision, and only they. <strong>Right with a tint</strong> that is not a flag: per patch, "
        f"{measure}; it is divided by the 99.9th percentile of that distance over every validation patch. Read a "
        "tinted patch without an outline as unusual, not as flagged.</p>"
        + _colour_key(HOT, "0", "1 or more", f"tint, blended at {TINT_ALPHA:.0%} over the image: {key}"))


def _test_set_line(run: RunData) -> str:
    """Which test images the figures of a section come from."""
    m = run.metrics
    if m.get("test_size") is None or not run.test_source:
        return ""
    return f'<p class="meta">Test set: {m["test_size"]:,} images, from {_describe_source(run.test_source, brief=True)}.</p>'


def _groups(run: RunData, assets: Assets, figures: Path) -> str:
    m = run.metrics
    tables = m.get("group_accuracy")
    intro = ("<p>Accuracy per (class, group) cell of the test set for the original model, with the flagged tokens "
             "ablated, and ablated with the DFR head; the average (AGA) is the mean over the cells, the worst "
             "group (WGA) the lowest cell. A shortcut shows as a weak cell that the guard lifts.</p>"
             + _test_set_line(run))
    if tables:
        return _section("groups", "Per-group accuracy",
                        intro + _group_table(tables, assets, figures / "group_accuracy.png", "group-accuracy",
                                             m.get("group_accuracy_intervals")))
    if run.metrics_missing:
        why = ("metrics.json is missing from the run folder: the per-group tables and their intervals are in it. "
               + ("The overall accuracy below is computed from test_predictions.npz." if run.predictions is not None
                  else ""))
    elif run.predictions_problem and m.get("test_size") is None:
        why = f"The run's metrics.json records no evaluation, and {_e(run.predictions_problem)}."
    elif m.get("test_size") is None and run.predictions is None:
        why = "The run was not evaluated on a test set."
    else:
        why = ("The test set has no group labels (which images carry the artefact), so accuracy per artefact group "
               "cannot be measured.")
    how = f"Evaluate again: {_eval_command(run)}." if run.metrics_missing else (
           "Evaluate on a test set with group labels: a CSV listing with a <code>group</code> column (1 = the image "
           "carries the artefact; <code>edgeshort report RUN --eval test.csv</code>), the seed layout "
           "<code>ROOT/test_w_patches/</code> + <code>ROOT/test_wo_patches/</code> (<code>--eval ROOT/test</code>), "
           "or an <code>ImageDataset</code> with <code>groups=</code> passed to <code>result.evaluate()</code>.")
    flag_tables = m.get("flag_group_accuracy")
    if flag_tables:
        body = ("<p>Instead, the test images are grouped by the guard's own flag (a shortcut found or not). The "
                "detector chose these groups, so the worst cell is not an unbiased worst group; the table shows "
                "what the guard does to the images it acts on, and whether DFR costs the unflagged ones.</p>"
                + _group_table(flag_tables, assets, figures / "flag_group_accuracy.png", "flag-group-accuracy",
                              m.get("flag_group_accuracy_intervals")))
    elif run.predictions is not None:  # runs evaluated before the flag table existed
        p = run.predictions
        accs = [("original", p["logits"]), ("ablated", p["ablated_logits"])]
        if p.get("dfr_logits") is not None and p["dfr_logits"].size:
            accs.append(("ablated + DFR", p["dfr_logits"]))
        body = "<p>Overall test accuracy (from test_predictions.npz): " + ", ".join(
            f"{name} {_num(float((logits.argmax(1) == p['labels']).mean()))}" for name, logits in accs) + ".</p>"
    else:
        body = ""
    return _section("groups", "Per-group accuracy", intro + _empty(why, how) + body)


def _group_table(tables: dict, assets: Assets, figure_path: Path, table_id: str, intervals: dict | None) -> str:
    """The (class, group) x prediction-kind table with its summary rows and their intervals, and the same as bars."""
    kinds = list(tables)
    headers = ["class", "group", "n", *[KIND_TITLES.get(k, k) for k in kinds]]
    rows = []
    for i, cell in enumerate(tables[kinds[0]]["cells"]):
        row = [_e(cell["class"]), _e(cell["group"]), _num(cell["n"])]
        for k in kinds:
            acc = tables[k]["cells"][i]["accuracy"]
            worst = acc is not None and tables[k]["worst"] is not None and abs(acc - tables[k]["worst"]) < 1e-12
            row.append(f'<td class="worst">{_num(acc)}</td>' if worst else _num(acc))
        rows.append(row)
    classes = [None] * len(rows)
    by_kind = (intervals or {}).get("kinds") or {}
    ci_label = f"{_pct((intervals or {}).get('confidence', 0.95))} CI (paired bootstrap over each (class, group) cell)"
    for label, key in (("average", "average"), ("worst group", "worst"), ("overall", "overall")):
        rows.append([label, "", "", *[_num(tables[k].get(key)) for k in kinds]])
        classes.append("summary" if key == "average" else None)
        if key != "overall" and any(by_kind.get(k, {}).get(key) for k in kinds):
            rows.append([f'<td class="text ci" colspan="3">{_e(ci_label)}</td>',
                         *[f'<td class="ci">{_interval(by_kind.get(k, {}).get(key))}</td>' for k in kinds]])
            classes.append(None)
    for name in tables[kinds[0]].get("classes") or {}:  # a class over all its images (absent in older runs)
        rows.append([f"recall {_e(name)}", "", "", *[_num(tables[k]["classes"][name]) for k in kinds]])
        classes.append(None)
    from edgeshort.report.figures import group_accuracy_bars

    path = group_accuracy_bars(tables, figure_path, by_kind, (intervals or {}).get("confidence", 0.95))
    note = ""
    if by_kind:
        note = (f" The intervals come from {(intervals or {}).get('resamples', 'the')} paired bootstrap resamples of the "
                "test images within each (class, group) cell; all kinds share the resamples.")
    elif intervals is None:
        note = " metrics.json holds no intervals for this table (an older evaluation); evaluate again to get them."
    return (_table(headers, rows, table_id, classes, text_columns=(0, 1))
            + f'<p class="meta">Red: the worst cell of each column.{note}</p>'
            + _figure(assets.figure(path), "group accuracy bars",
                      "Accuracy per group" + (f"; error bars on the average and the worst group: {_e(ci_label)}"
                                              if by_kind else "") + ". " + assets.where(path.name), width=760))


def _interval(bounds) -> str:
    return "–" if not bounds else f"{_num(bounds[0])}–{_num(bounds[1])}"


def _spray_text(value) -> str:
    """A SpRAy label or group as stored: a class index becomes its name only where the caller says so."""
    return "–" if value is None else str(value)


# Group labels that say whether an image carries the known artefact: the detector's 0 / 1 and the
# names the demo gives SpRAy. Other group labels (sites, scanners) are shown as stored.
ARTEFACT_GROUP_VALUES = {"0": False, "1": True, ARTEFACT_GROUP_NAMES[0]: False, ARTEFACT_GROUP_NAMES[1]: True}


def _carries_artefact(group) -> bool | None:
    """True / False when a group label names the artefact's presence, None for any other label."""
    if group is None or isinstance(group, bool):
        return None
    return ARTEFACT_GROUP_VALUES.get(str(group).strip().lower())


def artefact_share(cluster: dict) -> float | None:
    """Share of a SpRAy cluster's images that carry the known artefact, or None when its group labels
    do not say (none given, or labels other than the artefact's presence).

    Exact from the cluster's group counts when stored; otherwise from the majority group and its
    share, the artefact's presence being two-valued.
    """
    counts = cluster.get("group_counts")
    if counts:
        kinds = {key: _carries_artefact(key) for key in counts}
        if None in kinds.values():
            return None
        total = sum(counts.values())
        return sum(n for key, n in counts.items() if kinds[key]) / total if total else None
    share, carries = cluster.get("group_purity"), _carries_artefact(cluster.get("group_majority"))
    if share is None or carries is None:
        return None
    return float(share) if carries else 1.0 - float(share)


def _majority_group(cluster: dict) -> str:
    """A SpRAy cluster's majority group as stored, with its share of the cluster: "no artefact (97.5%)",
    "group 0 (97.5%)" for a bare number."""
    share, group = cluster.get("group_purity"), cluster.get("group_majority")
    if share is None:
        return "–"
    name = f"group {group}" if isinstance(group, (int, float, np.integer)) and not isinstance(group, bool) else group
    return f"{_e(name)} ({_pct(share, 1)})"


def _mostly_empty(cluster: dict) -> bool:
    """Whether at least half a SpRAy cluster's maps are empty: a median Gini of 0 means a flat median map,
    and a map flat after its median is removed holds no relevance."""
    gini = (cluster.get("focus") or {}).get("gini")
    return gini is not None and gini <= 1e-9


def _describe_heatmap_source(source: str | None) -> str:
    """What `metadata.heatmap_source` means, in words (HTML)."""
    if not source:
        return "heatmaps of unrecorded origin"
    kind, _, detail = source.partition(":")
    from edgeshort.spray.heatmaps import CAM_METHODS  # a dict of names: no torch needed

    if kind in CAM_METHODS:
        return (f"{CAM_METHODS[kind]} maps at layer <code>{_e(detail)}</code>, each explaining one class per image "
                "(the class the model predicts, unless the fit was given other targets)")
    if kind == "precomputed":
        return "heatmaps passed to the fit as arrays (for example this run's key heatmaps)"
    if kind == "generator":
        return f"heatmaps from the generator <code>{_e(detail)}</code>"
    return f"heatmaps from <code>{_e(source)}</code>"


def _gradient(table: np.ndarray, stops: int = 9) -> str:
    """A CSS linear gradient through `stops` evenly spaced colours of a (256, 3) colour map."""
    picks = evenly_spaced(table, stops)
    return "linear-gradient(to right, " + ", ".join(f"rgb({r}, {g}, {b})" for r, g, b in picks) + ")"


def _colour_key(table: np.ndarray, low: str, high: str, what: str) -> str:
    """A colour bar drawn by the page itself (no picture to lose), its two ends labelled."""
    return (f'<div class="colour-key"><span class="end">{low}</span><span class="ramp" style="background: '
            f'{_gradient(table)}"></span><span class="end">{high}</span><span class="what">{what}</span></div>')


def _spray_settings(body: dict, clusters: list[dict]) -> str:
    """How the SpRAy heatmaps were made and clustered (`metadata`), as a table."""
    meta = body.get("metadata") or {}
    params = meta.get("params") or {}
    rows = []

    def add(name: str, value: str) -> None:
        rows.append([_e(name), f'<td class="text">{value}</td>'])

    add("heatmaps", _describe_heatmap_source(meta.get("heatmap_source"))
        + (f" (<code>{_e(meta['heatmap_source'])}</code>)" if meta.get("heatmap_source") else ""))
    shape, processed = meta.get("heatmap_shape"), meta.get("processed_shape")
    size = meta.get("downsample_size", params.get("downsample_size"))
    if shape:
        add("map size", f"{_e(' x '.join(map(str, shape)))}"
            + (f", clustered at {_e(' x '.join(map(str, processed)))} (<code>downsample_size</code> {_e(size)})"
               if processed and list(processed) != list(shape) else f" (<code>downsample_size</code> {_e(size)})"))
    if meta.get("n_samples") is not None:
        add("maps", _e(f"{meta['n_samples']:,}"))
    per_class = meta.get("per_class", params.get("per_class"))
    if per_class is not None:
        add("per class", "yes: each class clustered on its own" if per_class else "no: all maps clustered together")
    affinity = meta.get("affinity", params.get("affinity"))
    if affinity is not None:
        add("affinity", f"<code>{_e(affinity)}</code>")
    selection = meta.get("cluster_selection", params.get("cluster_selection"))
    if selection is not None:
        fixed = params.get("n_clusters")
        how = (f"fixed at {_e(fixed)}" if fixed is not None else
               f"largest eigengap of the graph Laplacian, at most {_e(params.get('max_clusters', '?'))}"
               if selection in ("auto", "eigengap") else _e(selection))
        add("cluster count", f"<code>{_e(selection)}</code>: {how}")
    graphs = meta.get("graphs") or {}
    if graphs:
        parts = []
        for scope, graph in graphs.items():
            if not graph:
                parts.append(f"{_e(scope)}: not clustered (too few maps)")
                continue
            k = graph.get("n_neighbors")
            parts.append(f"{_e(scope)}: {_e(graph.get('graph', '?'))} graph"
                         + (f", k = {_e(k)}" if k else "") + f", {_plural(int(graph.get('n_clusters', 0)), 'cluster')}")
        add("graphs" if len(graphs) > 1 else "graph", "; ".join(parts))
    labels_given = meta.get("labels_given")
    if labels_given is not None:
        add("class labels", "given" if labels_given else "not given (the risk is capped at medium)")
    groups_given = any(c.get("group_purity") is not None for c in clusters)
    add("group labels", "given: each cluster's majority group and, where they mark the artefact, its artefact "
        "share" if groups_given else "not given: no cluster can be compared with a known artefact")
    if not rows:
        return ""
    return "<h3>Settings</h3>" + _table(["", "value"], rows, "spray-settings", text_columns=(0, 1))


def _spray_flag(flag: dict, cluster: dict, class_label: str) -> str:
    """One flagged cluster: what it holds, its artefact share when known, and SpRAy's reasons."""
    cid, level = flag.get("cluster_id"), flag.get("risk_level", "?")
    head = (f'<strong>cluster {_e(cid)}</strong> [<span class="risk-{_e(level)}">{_e(level)}</span>]'
            + (f", {_plural(int(cluster['size']), 'image')} of {_e(class_label)}" if cluster.get("size") else ""))
    share = artefact_share(cluster)
    if share is not None:
        head += (f": <strong>{_pct(share, 1)} carry the known artefact</strong>"
                 + (' — <span class="no">most do not: this flag does not follow the artefact</span>'
                    if share < 0.5 else " (group labels, only to check SpRAy)"))
    elif cluster.get("group_purity") is not None:
        head += f": majority group {_majority_group(cluster)}"
    reasons = "; ".join(_e(r) for r in flag.get("reasons", []))
    return f"<li>{head}.<br><span class=\"meta\">Why SpRAy flagged it: {reasons}.</span></li>"


def _spray_verdict_point(body: dict) -> str:
    """The verdict's line on SpRAy: what it suspects, as a hypothesis, with the artefact share of each suspect."""
    report = body.get("report", body)
    hans = report.get("clever_hans") or {}
    by_id = {c.get("cluster_id"): c for c in report.get("clusters") or []}
    risk = body.get("risk_level", hans.get("risk_level", "none"))
    suspects = hans.get("flagged_clusters") or []
    text = (f"SpRAy, a separate check on explanation maps: risk <span class=\"risk-{_e(risk)}\">{_e(risk)}</span>"
            + (f", suspected in {'cluster' if len(suspects) == 1 else 'clusters'} {', '.join(map(str, suspects))}"
               if suspects else ", no cluster suspected")
            + (". Its flags are hypotheses to check against their pictures (SpRAy section), not a confirmation of "
               "the shortcut cluster above" if hans.get("flags") else ""))
    shares = [(cid, artefact_share(by_id.get(cid, {}))) for cid in suspects]
    known = [(cid, share) for cid, share in shares if share is not None]
    if known:
        text += "; " + ", ".join(
            f"cluster {cid}: {_pct(share, 1)} with the known artefact"
            + (' <span class="no">(mostly without it)</span>' if share < 0.5 else "") for cid, share in known)
    return text + "."


def _spray(run: RunData, assets: Assets) -> str:
    intro = ("<p>SpRAy (Lapuschkin et al., 2019) is a second, separate detector: it clusters explanation heatmaps of "
             "the images and flags clusters that may be Clever Hans behaviour: a minority of a class whose "
             "relevance is more concentrated than the rest of the class, or sits where the rest does not look.</p>")
    caution = ("<p><strong>Its flags are hypotheses, not findings.</strong> They come from explanation maps alone: a "
               "tight focus on the object itself (a small lesion) is concentrated too and gets flagged, and SpRAy "
               "never sees the key detector's clusters or flags, so a SpRAy flag neither confirms nor contradicts "
               "the verdict above. Check each flagged cluster against its mean heatmap below and, where group "
               "labels were given, against the share of its images that carry the known artefact.</p>")
    how = ("Fit SpRAy on explanation maps of all the validation images, as <code>edgeshort demo</code> does "
           "(GradCAM: <code>SpRAyDetector(per_class=True).fit(inputs=..., labels=..., model=..., "
           "target_layer=...)</code>), or on maps you have: <code>edgeshort spray --heatmaps h.npy --labels l.npy "
           "--per-class -o RUN/spray</code>, which writes <code>report.json</code> and its heatmap grid PNG where "
           "the report reads them. This run's key heatmaps (<code>ShortcutDetector.load(RUN).key_heatmap_grids()"
           "</code>) cover only the images nearest each cluster centre: too few for SpRAy's clusters to mean much.")
    if run.spray is None:
        why = (f"The SpRAy result could not be read: {_e(run.spray_problem)}." if run.spray_problem
               else "The run folder holds no SpRAy result (<code>spray/report.json</code>).")
        return _section("spray", "SpRAy", intro + _empty(why, how))
    body = run.spray
    report = body.get("report", body)
    clusters = report.get("clusters") or []
    by_id = {c.get("cluster_id"): c for c in clusters}
    hans = report.get("clever_hans") or {}
    risk = body.get("risk_level", hans.get("risk_level", "none"))
    suspects = hans.get("flagged_clusters") or []
    parts = [intro, caution]
    warnings = body.get("warnings") or []
    if warnings:
        parts.append('<div class="verdict"><p class="headline">SpRAy\'s fit warned</p><ul>'
                     + "".join(f'<li><span class="no">{_e(w)}</span></li>' for w in warnings) + "</ul></div>")
    parts.append(f'<div class="verdict"><p class="headline">SpRAy risk: <span class="risk-{_e(risk)}">{_e(risk)}'
                 "</span> — " + (f"a hypothesis to check in {'cluster' if len(suspects) == 1 else 'clusters'} "
                                 f"{', '.join(map(str, suspects))}" if suspects else "no cluster suspected")
                 + "</p>")
    flags = hans.get("flags") or []
    if flags:
        parts.append("<ul>" + "".join(
            _spray_flag(f, by_id.get(f.get("cluster_id"), {}), _spray_class(run, by_id.get(f.get("cluster_id"), {})))
            for f in flags) + "</ul>")
    else:
        parts.append("<p>No cluster was flagged, not even at low risk.</p>")
    parts.append("</div>")
    for note in hans.get("notes") or []:
        parts.append(f'<p class="meta">{_e(note)}</p>')
    parts.append(_spray_settings(body, clusters))
    if clusters:
        with_groups = any(c.get("group_purity") is not None for c in clusters)
        with_artefact = any(artefact_share(c) is not None for c in clusters)
        headers = ["cluster", "class / majority label", "size", "share of all maps", "label purity",
                   *(["majority group (share of cluster)"] if with_groups else []),
                   *(["with the artefact"] if with_artefact else []), "focus", "risk"]
        rows = []
        for c in clusters:
            share = artefact_share(c)
            rows.append([_e(c.get("cluster_id")), _e(_spray_class(run, c)), _num(c.get("size")),
                         _pct(c.get("fraction"), 1), _num(c.get("label_purity")),
                         *([_majority_group(c)] if with_groups else []),
                         *([_pct(share, 1)] if with_artefact else []),
                         _num(c.get("focus_mean")) + (" (mostly empty maps)" if _mostly_empty(c) else ""),
                         f'<td class="risk-{_e(c.get("risk_level", "none"))}">{_e(c.get("risk_level", "none"))}</td>'])
        parts.append("<h3>Clusters</h3>" + _table(headers, rows, "spray-clusters", text_columns=(0, 1)))
        n = (body.get("metadata") or {}).get("n_samples")
        parts.append(
            '<p class="meta">Share of all maps: the cluster\'s size over all '
            + (f"{n:,} " if isinstance(n, int) else "") + "maps (the flags' “share of class” counts its class "
            "only). Focus: the mean over the cluster's maps of 1 &minus; entropy / log(pixels) of the relevance "
            "(0 = spread evenly, 1 = on one pixel)"
            + ("; with the artefact: the share of the cluster's images whose group label marks the artefact"
               if with_artefact else "")
            + ". A cluster of mostly empty maps (no relevance above each map's median) shows where the "
              "explanation failed, not where the model looks.</p>")
    parts.append(_spray_pictures(run, assets, body, clusters, how))
    return _section("spray", "SpRAy", "".join(parts))


def _spray_class(run: RunData, cluster: dict) -> str:
    """The class a SpRAy cluster belongs to (per-class clustering) or its majority label, named."""
    label = cluster.get("class") if cluster.get("class") is not None else cluster.get("majority_label")
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return run.class_name(int(label))
    return _spray_text(label)


def _spray_pictures(run: RunData, assets: Assets, body: dict, clusters: list[dict], how: str) -> str:
    """The clusters' mean heatmaps on one shared scale, then the run's own PNGs with what their scale is."""
    report = body.get("report", body)
    meta = body.get("metadata") or {}
    reps = report.get("representative_heatmaps") or {}
    parts = []
    heats = {}
    for cid, heat in reps.items():
        heat = np.asarray(heat, dtype=np.float64)
        if heat.ndim == 2 and heat.size:
            heats[str(cid)] = heat
    if heats:
        by_id = {str(c.get("cluster_id")): c for c in clusters}
        top = max(float(h.max()) for h in heats.values()) or 1.0
        figures = []
        for cid in sorted(heats, key=_natural_key):
            heat = heats[cid]
            h, w = heat.shape
            picture = colourise(grid_to_pixels(heat, (150, max(1, 150 * w // h))), 0.0, top)
            src = assets.add(f"spray/representative_{cid}.png", picture)
            c = by_id.get(cid, {})
            figures.append(f"<figure>{_img(src, f'SpRAy cluster {cid} mean heatmap')}<figcaption>cluster {_e(cid)}: "
                           f"n={_e(c.get('size', '?'))}, risk {_e(c.get('risk_level', '?'))}</figcaption></figure>")
        processed = list(meta.get("representative_heatmap_shape") or []) == list(meta.get("processed_shape") or [None])
        what = ("the maps as clustered (downsampled, each map's median subtracted)" if processed
                else "the maps at their input resolution")
        parts.append(
            "<h3>Mean heatmap of each cluster</h3>"
            f'<p class="meta">Mean of {what}, in cluster order. <strong>All on one scale</strong>: black 0, white '
            f"{_num(top)} (the highest value of any cluster's mean), so brightness compares across clusters.</p>"
            + _colour_key(HOT, "0", _num(top), "mean relevance, shared by every map here")
            + f'<div class="gallery small">{"".join(figures)}</div>')
    else:
        parts.append(_empty("The SpRAy report holds no representative heatmaps.", how))
    from edgeshort.spray.cli import GRID_NAME
    from edgeshort.spray.render import colour_table

    for png in sorted((run.run_dir / "spray").glob("*.png"), key=lambda p: _natural_key(p.name)):
        src = assets.add(f"spray/{png.name}", png)
        if png.name == GRID_NAME:
            caption = (f"<code>spray/{_e(png.name)}</code> from the run folder: the clusters' mean heatmaps at the "
                       "maps' input resolution, a flagged cluster framed in its risk colour (low yellow, medium "
                       "orange, high red). <strong>Each map is scaled to its own "
                       "minimum and maximum</strong>, so a nearly empty mean looks as bright as a strong one: compare "
                       "places within a map here, brightness across maps above."
                       + _colour_key(colour_table(), "its minimum", "its maximum", "each map on its own scale"))
        else:
            caption = f"<code>spray/{_e(png.name)}</code> from the run folder."
        parts.append(_figure(src, f"SpRAy {png.stem}", caption))
    return "".join(parts)


def _natural_key(text: str) -> list:
    """Sort key that orders the numbers inside names by value: cluster 2 before cluster 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


def _setting(value) -> str:
    """A setting as JSON, floats to 4 significant digits (1/3 reads better than 0.3333333333333333)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_setting(v) for v in value) + "]"
    return json.dumps(value)


def _timings(run: RunData) -> str:
    seconds = {k: float(v) for k, v in (run.metrics.get("seconds") or {}).items()}
    spray_seconds = ((run.spray or {}).get("metrics") or {}).get("fit_seconds")
    if not seconds and spray_seconds is None:
        where = "metrics.json is missing" if run.metrics_missing else "metrics.json has no <code>seconds</code>"
        return _section("timings", "Timings", _empty(f"The run records no timings ({where}).",
                                                     "Run <code>edgeshort detect</code> again; it writes them."))
    stages = [(f"{_e(k)} <span class=\"meta\">— {_e(STAGE_TITLES[k])}</span>" if k in STAGE_TITLES else _e(k), v)
              for k, v in seconds.items()]
    if spray_seconds is not None:  # a separate fit, timed by itself (spray/report.json)
        stages.append(('SpRAy <span class="meta">— heatmaps and spectral clustering, a separate fit '
                       "(<code>spray/report.json</code>)</span>", float(spray_seconds)))
    longest = max(v for _, v in stages) or 1.0
    rows = [[name, _num(v, 2), f'<td class="text"><span class="bar" style="width:{160 * v / longest:.0f}px">'
             "</span></td>"] for name, v in stages]
    rows.append(["total", _num(sum(v for _, v in stages), 2), ""])
    note = "" if seconds else (" The detector's stages are not recorded (metrics.json "
                               + ("is missing" if run.metrics_missing else "has no <code>seconds</code>")
                               + "); run <code>edgeshort detect</code> again to time them.")
    return _section("timings", "Timings",
                    f"<p>Wall-clock seconds per stage of the run.{note}</p>"
                    + _table(["stage", "seconds", ""], rows, "timings", [None] * (len(rows) - 1) + ["summary"]))


def _configuration(run: RunData) -> str:
    parts = []
    if run.config:
        rows = [[f'<td class="text nowrap"><code>{_e(k)}</code></td>', f"<code>{_e(_setting(v))}</code>",
                 _e(SETTING_NOTES.get(k, ""))] for k, v in run.config.items()]
        parts.append("<p>The detector settings (<code>config.json</code>).</p>"
                     + _table(["setting", "value", "meaning"], rows, "configuration", text_columns=(0, 1, 2)))
    else:
        parts.append(_empty("The run folder has no config.json.", "Run <code>edgeshort detect</code> again."))
    model = run.meta.get("model") or {}
    facts = [
        ("model family", model.get("family")), ("token grid", " x ".join(map(str, model.get("grid", [])))),
        ("prefix tokens", model.get("num_prefix")), ("heads", model.get("num_heads")),
        ("embedding size", model.get("embed_dim")), ("classes", ", ".join(run.class_names)),
        ("preprocessing", json.dumps(model.get("preprocessing")) if model.get("preprocessing") else None),
        ("validation images", run.metrics.get("val_size")), ("test images", run.metrics.get("test_size")),
        ("KNN reference keys", run.metrics.get("knn_reference_size")),
        ("DFR", json.dumps(run.meta.get("dfr")) if run.meta.get("dfr") else "none"),
    ]
    rows = [[_e(k), f'<td class="text"><code>{_e(v)}</code></td>'] for k, v in facts if v not in (None, "")]
    parts.append("<h3>Model and data</h3>" + _table(["", "value"], rows, "run-facts", text_columns=(0, 1)))
    parts.append(_provenance(run))
    return _section("configuration", "Configuration", "".join(parts))


# The versions a run records (run.json `versions`); the page says "not recorded" for any it lacks.
RECORDED_VERSIONS = ("edgeshort", "python", "torch", "torchvision", "scikit-learn", "numpy")
NOT_RECORDED = '<span class="no">not recorded</span>'


def _run_created(run: RunData) -> str:
    created = run.meta.get("created")
    return f"{_e(created)} (UTC)" if created else NOT_RECORDED


def _provenance(run: RunData) -> str:
    """Where the run came from (run.json, metrics.json): when, with which software, on which data and weights."""
    versions = run.meta.get("versions")
    if isinstance(versions, dict):
        names = [*RECORDED_VERSIONS, *(k for k in versions if k not in RECORDED_VERSIONS)]
        listed = ", ".join(f"{_e(name)} {_e(versions[name]) if versions.get(name) else 'not installed'}"
                           if name in versions else f"{_e(name)} {NOT_RECORDED}" for name in names)
    else:
        listed = NOT_RECORDED + " (run.json from an older edgeshort)"
    m = run.metrics
    test = _describe_source(run.test_source) if run.evaluated else "none: the run was not evaluated"
    if run.metrics_missing and run.predictions is not None:
        test = "not recorded (metrics.json is missing)"
    weights = run.meta.get("model_sha256")
    rows = [
        ("run created", _run_created(run) + ("" if run.meta.get("created") else " (run.json from an older edgeshort)")),
        ("software of the run", listed),
        ("validation data", _describe_source(run.meta.get("data_source"))),
        ("test data", test + (f", {m['test_size']:,} images" if m.get("test_size") is not None else "")),
        ("model weights sha256", (f"<code>{_e(weights)}</code><br><span class=\"meta\">The sha256 of the weights (the "
                                  "state dict's tensors), not of the model file: <code>sha256sum model.pt</code> "
                                  "gives another value. The same weights saved anew, or loaded from another format, "
                                  "keep it.</span>") if weights else NOT_RECORDED),
    ]
    if m.get("test_sha256"):
        rows.append(("test images sha256", f"<code>{_e(m['test_sha256'])}</code><br><span class=\"meta\">Over the "
                                           "test images as the model saw them (after preprocessing).</span>"))
    from edgeshort._version import __version__

    rows.append(("this page", f"rendered {_e(_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'))} "
                              f"(UTC) by edgeshort {_e(__version__)}, from the run folder's files"))
    return ('<h3 id="provenance">Provenance</h3>'
            + _table(["", "value"], [[_e(k), f'<td class="text">{v}</td>'] for k, v in rows], "run-provenance",
                     text_columns=(0, 1)))


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------
def _test_images(run: RunData, test_dataset) -> tuple[object | None, str | None]:
    """The test images the predictions belong to: given, or reloaded from a recorded source."""
    pred = run.predictions
    if pred is None:
        return None, None
    n = len(pred["labels"])
    if test_dataset is not None:
        if not _same_test_set(test_dataset, pred):
            raise InputError(
                f"expected the test set the run was evaluated on ({n} images), got {len(test_dataset)} images "
                "with other labels; pass the same test images, or evaluate on these first "
                "(`edgeshort report RUN --eval TEST_IMAGES`)"
            )
        return test_dataset, None
    source = run.test_source
    if not source:
        return None, ("metrics.json, which records where the test images are, is missing" if run.metrics_missing
                      else "the run records no test source")
    try:
        from edgeshort.data import dataset_from_source

        dataset = dataset_from_source(source, run.class_names or None)
    except Exception as exc:  # a moved folder or an old source string: the section explains, the report goes on
        logger.warning("could not reload the test images from %r: %s", source, exc)
        return None, f"reloading them from the recorded source failed ({exc})"
    if not _same_test_set(dataset, pred):
        return None, "the images at the recorded source no longer match the predictions"
    return dataset, None


def _same_test_set(dataset, pred: dict[str, np.ndarray]) -> bool:
    """Same size, labels and (when both have them) group labels: the best check the predictions allow."""
    if len(dataset) != len(pred["labels"]) or not np.array_equal(np.asarray(dataset.labels), pred["labels"]):
        return False
    groups = pred.get("groups")
    if dataset.groups is not None and groups is not None and groups.size:
        return bool(np.array_equal(dataset.groups, groups))
    return True


def _val_loader(run: RunData) -> Callable[[], object | None]:
    cache: dict[str, object | None] = {}

    def load():
        if "val" not in cache:
            cache["val"] = None
            source = run.meta.get("data_source")
            if source:
                try:
                    from edgeshort.data import dataset_from_source

                    cache["val"] = dataset_from_source(source, run.class_names or None)
                except Exception as exc:  # pictures are optional: the section says they are missing
                    logger.warning("could not reload the validation images from %r: %s", source, exc)
        return cache["val"]

    return load


# What a rendering writes into its pictures folder, cleared before the next one writes its own.
PICTURE_FOLDERS = ("clusters", "flags", "spray")
FIGURE_NAMES = ("cluster_scatter.png", "group_accuracy.png", "flag_group_accuracy.png")


def _clear_earlier_pictures(folder: Path) -> None:
    """Remove the pictures an earlier rendering wrote into `folder` (flags of another evaluation would stay
    beside the page otherwise), and the folder itself when nothing else is in it. Other files are kept."""
    if not folder.is_dir():
        return
    for name in PICTURE_FOLDERS:
        sub = folder / name
        for png in sub.glob("*.png"):
            png.unlink()
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    for name in FIGURE_NAMES:
        (folder / name).unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def write_report(run_dir, out: str | Path | None = None, test_dataset=None, embed: bool = False) -> Path:
    """Write the HTML report of a run folder and return its path.

    `run_dir` is a run folder (or a fitted `DetectionResult` saved to one); `out` the page
    (default `RUN/report.html`); `test_dataset` the images the run was evaluated on, to draw the
    guard's flags on (otherwise reloaded from the source the run records, when it records one);
    `embed` puts every picture into the page instead of the `<stem>_files/` folder, which is then
    neither written nor left from an earlier rendering. Pictures an earlier rendering left in that
    folder are removed first, so it holds only this page's.
    """
    if not isinstance(run_dir, (str, Path)):
        saved = getattr(run_dir, "run_dir", None)
        if saved is None:
            raise InputError(f"expected a run folder or a DetectionResult saved to one, got {type(run_dir).__name__}; "
                             "fit with run_dir=... or call result.save(RUN)")
        run_dir = saved
    run = load_run(run_dir)
    out = Path(out) if out is not None else run.run_dir / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"expected the report path to end in .html, got {str(out)!r}; rename it")
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.parent / f"{out.stem}_files"
    test_images, test_problem = _test_images(run, test_dataset)
    _clear_earlier_pictures(folder)
    if not embed:
        folder.mkdir(parents=True, exist_ok=True)
    assets = Assets(folder, out.parent, embed)
    # Embedded, the figures are drawn in a scratch folder that goes with the rendering.
    with tempfile.TemporaryDirectory(prefix="edgeshort-report-") as scratch:
        figures = Path(scratch) if embed else folder
        flags = _flags(run, assets, test_images, test_problem)  # first: it checks the images the verdict reports on
        sections = [
            _verdict(run, assets, figures),
            _clusters(run, assets, _val_loader(run)),
            flags,
            _groups(run, assets, figures),
            _spray(run, assets),
            _timings(run),
            _configuration(run),
        ]
    toc = [("verdict", "Verdict"), ("clusters", "Clusters"), ("flags", "Flags on test images"),
           ("groups", "Per-group accuracy"), ("spray", "SpRAy"), ("timings", "Timings"),
           ("configuration", "Configuration")]
    from edgeshort._version import __version__

    model = run.meta.get("model") or {}
    run_version = (run.meta.get("versions") or {}).get("edgeshort")
    title = f"edgeshort report — {run.run_dir.resolve().name}"
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<header>
<h1>{_e(title)}</h1>
<div class="meta">Run folder <code>{_e(run.run_dir.resolve())}</code> · {_e(model.get("family", "model"))} ViT,
{_e(len(run.class_names))} classes ({_e(", ".join(run.class_names))})</div>
<div class="meta">Run created {_run_created(run)}{f" with edgeshort {_e(run_version)}" if run_version else ""}
(<a href="#provenance">provenance</a>) · this page rendered
{_e(_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"))} UTC by edgeshort {_e(__version__)}</div>
<nav class="toc">{"".join(f'<a href="#{i}">{_e(t)}</a>' for i, t in toc)}</nav>
</header>
{"".join(sections)}
</main>
<script>{IMAGE_CHECK_SCRIPT}</script>
</body>
</html>
"""
    out.write_text(page, encoding="utf-8")
    logger.info("wrote %s (%d pictures)", out, assets.count)
    return out

"""The run report: every section present, every picture loads in a real browser, overlays sit on the flag grid."""

from __future__ import annotations

import copy
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeshort.errors import InputError
from edgeshort.report.draw import cell_edges, flag_outline_overlay, guard_overlay
from edgeshort.report.html import SAMPLES_PER_CATEGORY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ("verdict", "clusters", "flags", "groups", "spray", "timings", "configuration")
CYAN = (0, 255, 255)


# ---------------------------------------------------------------------------------------------
# Overlays on the flag grid
# ---------------------------------------------------------------------------------------------
def expected_outline(size: tuple[int, int], flags: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` of the border of a flagged cell, cells laid out as the heat is
    (pixel p in cell floor(p * cells / pixels)), computed without the drawing code."""
    h, w = size

    def position(pixels: int, cells: int):
        cell = np.arange(pixels) * cells // pixels
        start = np.array([np.flatnonzero(cell == c)[0] for c in range(cells)])
        length = np.bincount(cell, minlength=cells)
        offset = np.arange(pixels) - start[cell]
        return cell, (offset < width) | (offset >= length[cell] - width)

    row_cell, row_edge = position(h, flags.shape[0])
    col_cell, col_edge = position(w, flags.shape[1])
    inside = flags[row_cell[:, None], col_cell[None, :]]
    return inside & (row_edge[:, None] | col_edge[None, :])


FLAG_GRID = np.zeros((7, 9), bool)
FLAG_GRID[1, 1] = FLAG_GRID[1, 2] = FLAG_GRID[2, 2] = True  # touching cells
FLAG_GRID[5, 7] = FLAG_GRID[6, 8] = FLAG_GRID[0, 8] = True  # a lone cell and the borders


@pytest.mark.parametrize("size", [(71, 93), (77, 100), (56, 72)])  # uneven and even cell sizes
def test_flag_outlines_fall_exactly_on_flagged_cell_borders(size):
    blank = np.zeros((*size, 3), np.uint8)
    drawn = np.asarray(flag_outline_overlay(blank, FLAG_GRID, colour=CYAN))
    outline = (drawn == CYAN).all(-1)
    assert np.array_equal(outline, expected_outline(size, FLAG_GRID, 1))
    assert not drawn[~outline].any()  # nothing else was drawn


@pytest.mark.parametrize("scale", [1, 3])
def test_guard_overlay_heat_and_outlines_coincide_with_the_flag_grid(scale):
    size = (71, 93)
    blank = np.zeros((*size, 3), np.uint8)
    # Saliency 1 exactly on the flagged cells: the heat must cover those cells and nothing else.
    drawn = np.asarray(guard_overlay(blank, FLAG_GRID.astype(np.float32), FLAG_GRID, scale=scale))
    big = (size[0] * scale, size[1] * scale)
    assert drawn.shape == (*big, 3)
    outline = (drawn == CYAN).all(-1)
    assert np.array_equal(outline, expected_outline(big, FLAG_GRID, scale))
    heat = drawn.any(-1)
    assert np.array_equal(heat, expected_outline(big, FLAG_GRID, max(big)))  # whole flagged cells


def test_cell_edges_match_heat_layout():
    for pixels, cells in ((64, 4), (70, 9), (13, 13), (100, 7)):
        cell_of_pixel = np.arange(pixels) * cells // pixels
        edges = cell_edges(pixels, cells)
        assert edges[0] == 0 and edges[-1] == pixels
        for c in range(cells):
            assert np.array_equal(np.flatnonzero(cell_of_pixel == c), np.arange(edges[c], edges[c + 1]))


def test_overlays_reject_inputs_they_cannot_draw():
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(InputError, match="same patch grid"):
        guard_overlay(image, np.zeros((4, 4)), np.zeros((8, 8), bool))
    with pytest.raises(InputError, match="uint8"):
        guard_overlay(image.astype(np.float32), np.zeros((4, 4)), np.zeros((4, 4), bool))
    with pytest.raises(InputError, match="at least 64x64"):
        flag_outline_overlay(image, np.zeros((64, 64), bool))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def image_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def section(page: str, ident: str) -> str:
    match = re.search(rf'<section id="{ident}">(.*?)</section>', page, re.S)
    assert match, f"section {ident} missing"
    return match.group(1)


def assert_complete(page_path: Path) -> str:
    """Every section present, every image a PNG that exists (file or data URI), nothing from the network."""
    page = page_path.read_text()
    for ident in SECTIONS:
        section(page, ident)
    sources = image_sources(page)
    assert sources
    for src in sources:
        assert not src.startswith(("http:", "https:", "//"))
        if not src.startswith("data:image/png;base64,"):
            assert (page_path.parent / src).is_file(), src
    assert "<link" not in page  # no external style sheets
    return page


def run_chromium(page_path: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", *args,
        page_path.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


# ---------------------------------------------------------------------------------------------
# The demo run
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_report(demo_result, demo_data, tmp_path_factory):
    from edgeshort.report import write_report

    out = tmp_path_factory.mktemp("demo-report") / "report.html"
    return write_report(demo_result.run_dir, out, test_dataset=demo_data["test"])


def test_demo_report_has_every_section_with_data(demo_report, demo_result):
    page = assert_complete(demo_report)
    verdict = section(page, "verdict")
    assert '<p class="headline">Shortcut found</p>' in verdict  # the run's verdict leads, confirmed on the test set
    assert "the test set confirms it: masking raises worst-group accuracy there beyond test-set noise." in verdict
    assert f"Shortcut cluster: {demo_result.shortcut_cluster}" in verdict
    assert 'id="cluster-scores"' in verdict and "(shortcut)" in verdict
    assert f"The clusters share {demo_result.metrics['cluster_class_nmi']:.2f} normalised mutual information" in verdict
    assert (f"spread over the {demo_result.metrics['knn_positive_candidates']:,} shortcut-cluster tokens hotter than "
            "99.9% of held-out clean tokens") in verdict
    assert "cluster_scatter.png" in verdict
    m = demo_result.metrics
    # Purity beside the artefact's share of all validation images, so an unenriched cluster shows as one.
    overall = float(np.mean(demo_result.val_groups == 1))
    assert (f"{m['shortcut_cluster_group_purity']:.1%} of its members carry the artefact, against {overall:.1%} of "
            "all validation images") in verdict and "this cluster is not the artefact group" not in verdict
    assert (f"Balanced validation accuracy {m['val_balanced_accuracy_original']:.3f} before ablation, "
            f"{m['val_balanced_accuracy_ablated']:.3f} after it") in verdict
    # Each step's change comes with its paired interval, so a reader can tell a gain from noise.
    lo, hi = m["group_accuracy_intervals"]["changes"][0]["worst_interval"]
    assert f"Worst group, ablated vs original: {m['wga_ablated'] - m['wga_original']:+.3f} " in verdict
    assert f"95% CI {lo:+.3f} to {hi:+.3f}, a real gain" in verdict
    # Cluster strips: image, heatmap and patch grid for every sample written by the run.
    clusters = section(page, "clusters")
    assert f"Cluster {demo_result.shortcut_cluster} — shortcut cluster" in clusters and "The verdict is" not in page
    written = len(list((demo_result.run_dir / "heatmaps" / "cluster_0").glob("sample_*_image.png")))
    assert clusters.count("cluster 0 sample") == 3 * written
    # The heatmaps' colours come with their scale, as the flag tint's and SpRAy's do.
    assert clusters.count('class="colour-key"') == 2 and "one scale for all" in clusters
    flags = section(page, "flags")
    assert "precision" in flags and flags.count("<figure>") >= 4
    # A caption says what was masked: nothing for an image whose flags stayed under min_patches.
    captions = re.findall(r"</table>([^<]*)</figcaption>", flags)
    assert captions and all(("masked after dilation" in c) == c.endswith("shortcut present") for c in captions)
    assert any("shortcut present" in c for c in captions) and any("shortcut absent" in c for c in captions)
    groups = section(page, "groups")
    assert 'id="group-accuracy"' in groups and "worst group" in groups and "ablated + DFR" in groups
    assert "group_accuracy.png" in groups
    assert 'class="empty"' in section(page, "spray")  # the demo run has no SpRAy result: explained
    assert 'id="timings"' in section(page, "timings") and 'id="configuration"' in section(page, "configuration")
    # Every detector setting the configuration table lists says what it means.
    from dataclasses import fields

    from edgeshort.detect import DetectorConfig
    from edgeshort.detect.config import SETTING_NOTES

    assert {f.name for f in fields(DetectorConfig)} == set(SETTING_NOTES)
    assert SETTING_NOTES["heatmap"] in html.unescape(section(page, "configuration"))
    files = demo_report.parent / "report_files"
    for name in ("cluster_scatter.png", "group_accuracy.png"):
        with Image.open(files / name) as figure:
            assert figure.width >= 600


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_advises_leaving_out_a_dfr_head_the_test_set_condemns(demo_report, demo_result, demo_data, tmp_path):
    import json
    import shutil

    from edgeshort.report import write_report

    run = tmp_path / "run"
    shutil.copytree(demo_result.run_dir, run)
    metrics = json.loads((run / "metrics.json").read_text())
    warning = "the DFR head lowers worst-group accuracy on this test set (...); ship the ablated prediction instead"
    (run / "metrics.json").write_text(json.dumps({**metrics, "dfr_warning": warning}))
    verdict = section(write_report(run, test_dataset=demo_data["test"]).read_text(), "verdict")
    assert html.escape("The DFR head lowers worst-group accuracy on this test set") in verdict
    assert "DFR head lowers" not in section(demo_report.read_text(), "verdict")  # the demo's head is kept
    # A test set's own warnings reach the verdict too, with the test flag rate beside the validation's.
    doubt = "the model's test predictions agree with the labels less than chance (...)"
    (run / "metrics.json").write_text(json.dumps({**metrics, "test_warnings": [doubt]}))
    verdict = section(write_report(run, test_dataset=demo_data["test"]).read_text(), "verdict")
    assert html.escape("The model's test predictions agree with the labels less than chance") in verdict
    assert (f"The guard finds a shortcut in {metrics['test_shortcut_present_rate']:.1%} of the test images "
            f"({metrics['val_shortcut_present_rate']:.1%} of the validation images).") in verdict


def test_verdict_calls_a_loss_only_beyond_noise_and_names_the_clustering_space(demo_result, demo_data, tmp_path):
    import json
    import shutil

    from edgeshort.report import write_report

    run = tmp_path / "run"
    shutil.copytree(demo_result.run_dir, run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["cluster_space_used"] = "class_centred"
    metrics["wga_dfr"] = metrics["wga_original"] - 0.05
    dfr_step = next(c for c in metrics["group_accuracy_intervals"]["changes"] if c["to"] == "dfr")
    dfr_step["worst_interval"] = [-0.2, 0.05]  # lower, but within test-set noise
    (run / "metrics.json").write_text(json.dumps(metrics))
    verdict = section(write_report(run, tmp_path / "noise.html").read_text(), "verdict")
    assert "The guard lowers it" not in verdict
    assert "less their class's mean" in verdict and "pooled last-block features of" not in verdict
    dfr_step["worst_interval"] = [-0.2, -0.05]
    dfr_step["changed_per_cell"] = [[0, 30]] * len(dfr_step["changed_per_cell"])  # and many images broken
    (run / "metrics.json").write_text(json.dumps(metrics))
    verdict = section(write_report(run, tmp_path / "loss.html").read_text(), "verdict")
    assert "The guard lowers it beyond test-set noise (ablated + DFR vs ablated)" in verdict


def test_demo_report_loads_in_a_headless_browser(demo_report, tmp_path):
    done = run_chromium(demo_report, tmp_path, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load script did not run"
    ok, total = map(int, loaded.groups())
    assert total == len(image_sources(demo_report.read_text())) > 0
    assert ok == total, f"{total - ok} of {total} images did not load"
    assert "Shortcut cluster:" in dom and 'id="group-accuracy"' in dom and "worst group" in dom
    shot = tmp_path / "report.png"
    done = run_chromium(demo_report, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400",
                        "--hide-scrollbars")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as picture:
        assert np.asarray(picture.convert("L")).std() > 10  # the page rendered something, not a blank sheet


def test_report_rejects_a_mismatched_test_set_and_bad_paths(demo_result, demo_data, tmp_path):
    from edgeshort.report import write_report

    with pytest.raises(InputError, match="evaluated on"):
        write_report(demo_result.run_dir, tmp_path / "r.html", test_dataset=demo_data["test"].subset(np.arange(10)))
    with pytest.raises(InputError, match=r"\.html"):
        write_report(demo_result.run_dir, tmp_path / "r.txt")
    with pytest.raises(InputError, match="run.json"):
        write_report(tmp_path)


# ---------------------------------------------------------------------------------------------
# A run without group labels or truth masks
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_run(demo_data, demo_vit, tmp_path_factory):
    """The detector fitted on 160 validation images with no group labels or artefact masks."""
    from edgeshort.data import ImageDataset
    from edgeshort.detect import DetectorConfig, ShortcutDetector

    val = demo_data["val"]
    idx = np.linspace(0, len(val) - 1, 160).astype(int)
    plain = ImageDataset.from_arrays(np.stack([val.array(int(i)) for i in idx]), val.labels[idx], val.class_names)
    run_dir = tmp_path_factory.mktemp("plain-run")
    config = DetectorConfig(progress=False, num_selected=5, knn_samples=20)
    return ShortcutDetector(config).fit(demo_vit, plain, run_dir=run_dir)


def plain_test_set(demo_data, n: int = 60):
    from edgeshort.data import ImageDataset

    test = demo_data["test"]
    idx = np.arange(0, len(test), len(test) // n)[:n]
    return ImageDataset.from_arrays(np.stack([test.array(int(i)) for i in idx]), test.labels[idx], test.class_names)


def test_report_without_test_groups_or_masks_explains_each_gap(plain_run, demo_data, tmp_path):
    from edgeshort.report import write_report

    # Not evaluated: the flags and groups sections say so and how to evaluate.
    page = assert_complete(write_report(plain_run, tmp_path / "before.html"))
    assert "not evaluated" in section(page, "flags") and "--eval" in section(page, "flags")
    assert "artefact masks" not in section(page, "flags")  # no test set at all, not one without masks
    assert "not evaluated" in section(page, "groups")
    assert "Shortcut cluster:" in section(page, "verdict")
    assert "<th>sample</th>" in section(page, "clusters")

    test = plain_test_set(demo_data)
    plain_run.evaluate(test)
    page = assert_complete(write_report(plain_run.run_dir, tmp_path / "after.html", test_dataset=test))
    flags, groups = section(page, "flags"), section(page, "groups")
    assert "no artefact masks" in flags and "<figure>" in flags and "<code>mask</code> column" in flags
    assert "no group labels" in flags  # rows split by the guard's own finding instead
    assert "Test accuracy (no artefact labels, so no worst group): original " in section(page, "verdict")
    # No artefact groups to measure, so the table groups by the guard's own flag, and says so.
    assert "no group labels" in groups and 'id="group-accuracy"' not in groups
    assert 'id="flag-group-accuracy"' in groups and "guard's own flag" in groups and '<td class="text">flagged</td>' in groups
    assert "no SpRAy result" in section(page, "spray")
    # How to get one: on all the validation images; the key heatmaps' few nearest-centre maps are too few.
    assert "edgeshort spray --heatmaps h.npy" in section(page, "spray") and "too few" in section(page, "spray")
    assert not (tmp_path / "after_files" / "group_accuracy.png").exists()
    assert (tmp_path / "after_files" / "flag_group_accuracy.png").is_file()

    # A run evaluated before the flag table existed still gets its overall accuracy.
    metrics_path = plain_run.run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics_path.write_text(json.dumps({k: v for k, v in metrics.items() if not k.startswith("flag_")}))
    groups = section(assert_complete(write_report(plain_run.run_dir, tmp_path / "older.html", test_dataset=test)),
                     "groups")
    assert "Overall test accuracy (from test_predictions.npz): original " in groups and 'id="flag-group-accuracy"' not in groups
    metrics_path.write_text(json.dumps(metrics))

    # Predictions without their images: the flags section says the images are missing.
    page = assert_complete(write_report(plain_run.run_dir, tmp_path / "no-images.html"))
    assert "test images are not available" in section(page, "flags")


def test_report_shows_a_spray_result_in_the_run(plain_run, tmp_path):
    from edgeshort.report import write_report
    from edgeshort.spray import SpRAyDetector

    run = tmp_path / "run"
    shutil.copytree(plain_run.run_dir, run)
    from edgeshort.detect import ShortcutDetector

    # The detector's key heatmaps, from the reloaded run, as SpRAy takes them.
    maps, labels, indices = ShortcutDetector.load(run).key_heatmap_grids()
    with np.load(run / "clusters.npz") as z:
        assert np.array_equal(maps, np.concatenate([z["heatmaps_0"], z["heatmaps_1"]]).reshape(-1, *plain_run.grid))
        assert np.array_equal(labels, z["labels"][indices])
        groups = z["present"][indices].astype(int)
    with pytest.raises(InputError, match=r"flat patch grids.*key_heatmap_grids\(\)"):
        SpRAyDetector().fit(heatmaps=maps.reshape(len(maps), -1), labels=labels)
    spray = SpRAyDetector(n_clusters=2, downsample_size=None).fit(heatmaps=maps, labels=labels, group_labels=groups)
    (run / "spray").mkdir()
    (run / "spray" / "report.json").write_text(json.dumps(spray.get_report()))
    spray.save_representative_heatmaps(run / "spray" / "representative_heatmaps.png")
    page = assert_complete(write_report(run, tmp_path / "spray.html", embed=True))
    body = section(page, "spray")
    assert "SpRAy risk:" in body and 'id="spray-clusters"' in body
    assert body.count("SpRAy cluster") == 2 and "representative_heatmaps.png" in body
    assert len(re.findall(r"<td>group [01] \(\d+\.\d%\)</td>", body)) == 2  # the majority group and its share
    assert "SpRAy, a separate check on explanation maps: risk" in section(page, "verdict")
    assert all(src.startswith("data:image/png;base64,") for src in image_sources(page))


def test_report_command_evaluates_then_reports(plain_run, demo_data, tmp_path):
    from edgeshort.cli import main

    folder = tmp_path / "test-images"
    test = plain_test_set(demo_data, 24)
    for i in range(len(test)):  # folders by diagnosis, merged into the model's classes by --class-map
        target = folder / (("BKL" if i % 3 == 0 else "NV"), "MEL")[test.labels[i]]
        target.mkdir(parents=True, exist_ok=True)
        test.image(i).save(target / f"{i:03d}.png")
    run = tmp_path / "run"
    shutil.copytree(plain_run.run_dir, run)
    out = tmp_path / "out" / "page.html"
    assert main(["report", str(run), "-o", str(out), "--eval", str(folder), "--class-map",
                 "MEL=malignant,NV=benign,BKL=benign", "--quiet"]) == 0
    page = assert_complete(out)
    metrics = json.loads((run / "metrics.json").read_text())
    expected = copy.copy(plain_run).evaluate(test, out=tmp_path / "reference")
    assert metrics["test_size"] == 24 and metrics["accuracy_ablated"] == expected["accuracy_ablated"]
    assert metrics["test_source"].startswith("merged:")
    flags = section(page, "flags")
    assert "<figure>" in flags
    shown = re.findall(r'<span class="file" title="([^"]+)">([^<]+)</span>', flags)  # the file, not an index
    assert shown and all(Path(full).is_file() and Path(full).name == name for full, name in shown)
    assert (tmp_path / "out" / "page_files" / "cluster_scatter.png").is_file()
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_a_cropping_models_pictures_show_the_part_it_saw(tmp_path):
    """Non-square images and a centre crop: the report draws flags and heatmaps over the square the model saw."""
    from edgeshort.data import ImageDataset
    from edgeshort.detect import DetectorConfig, ShortcutDetector
    from edgeshort.models import load_adapter
    from edgeshort.models.tiny import TinyViT
    from edgeshort.report import write_report

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    adapter = load_adapter(TinyViT(image_size=32, patch_size=8, dim=32, depth=1, num_heads=2)).set_preprocessing(
        crop_pct=0.8)
    rng = np.random.default_rng(0)
    data = ImageDataset.from_arrays(rng.integers(0, 255, (16, 45, 37, 3), dtype=np.uint8), np.arange(16) % 2,
                                    ("a", "b"))
    result = ShortcutDetector(DetectorConfig(progress=False, num_selected=4, knn_samples=8)).fit(
        adapter, data, run_dir=tmp_path / "run")
    result.evaluate(data)
    assert_complete(write_report(tmp_path / "run", tmp_path / "report.html", test_dataset=data))
    flag_pictures = list((tmp_path / "report_files" / "flags").glob("*.png"))
    heat_pictures = list((tmp_path / "run" / "heatmaps").rglob("sample_*_overlay.png"))
    assert flag_pictures and heat_pictures
    for path in flag_pictures + heat_pictures:
        with Image.open(path) as picture:  # the whole image is 37 wide, 45 high (0.82)
            assert abs(picture.width / picture.height - 1) < 0.05, path


# ---------------------------------------------------------------------------------------------
# SpRAy as a second opinion: hypotheses, warnings, settings, scales
# ---------------------------------------------------------------------------------------------
SPRAY_WARNING = "407 of 1500 CAMs are constant: no gradient reached the target layer's patch positions"


def spray_cluster(cid: int, size: int, class_name: str, group: str | int, group_share: float, risk: str,
                  gini: float = 0.7) -> dict:
    return {"cluster_id": cid, "size": size, "fraction": size / 1500, "class": class_name, "label_purity": 1.0,
            "majority_label": class_name, "label_counts": {class_name: size}, "group_purity": group_share,
            "group_majority": group, "focus_mean": 0.2, "focus_std": 0.05,
            "focus": {"hot_area": 0.02, "effective_area": 0.2, "gini": gini, "top_mass": 0.4, "spread": 0.3,
                      "centroid": [0.5, 0.5], "centroid_scatter": 0.1}, "risk_level": risk}


def spray_report(groups=("artefact", "no artefact"), warnings=(SPRAY_WARNING,), n_clusters: int = 12) -> dict:
    """A SpRAy report as `get_report()` writes it: cluster 1 a high-risk artefact cluster, cluster 9 a
    medium-risk flag on images nearly all without the artefact, cluster 0 of empty maps."""
    artefact, clean = groups
    clusters = [spray_cluster(c, 100, "benign" if c < 6 else "malignant", clean, 0.9, "none")
                for c in range(n_clusters)]
    clusters[0] = spray_cluster(0, 366, "benign", clean, 0.992, "none", gini=0.0)
    clusters[1] = spray_cluster(1, 24, "benign", artefact, 1.0, "high")
    clusters[9] = spray_cluster(9, 163, "malignant", clean, 0.975, "medium")
    flag = {"reasons": ["holds 24 samples, 3% of class benign (a minority)"], "evidence": {}}
    maps = {str(c): np.full((4, 4), 0.01 * c).tolist() for c in range(n_clusters)}
    maps["7"] = np.eye(4).tolist()  # the brightest mean: it sets the shared scale
    return {
        "method": "spray", "warnings": list(warnings), "shortcut_detected": True, "risk_level": "high",
        "metrics": {"n_clusters": n_clusters, "fit_seconds": 25.2576},
        "metadata": {"n_samples": 1500, "heatmap_shape": [64, 64], "processed_shape": [4, 4],
                     "representative_heatmap_shape": [4, 4], "heatmap_source": "gradcam:blocks.2", "labels_given": True,
                     "params": {"affinity": "cosine", "cluster_selection": "auto", "max_clusters": 8, "n_clusters": None,
                                "downsample_size": 32, "per_class": True},
                     "affinity": "cosine", "cluster_selection": "auto", "downsample_size": 32, "per_class": True,
                     "graphs": {"benign": {"graph": "knn", "n_neighbors": 10, "n_clusters": 6},
                                "malignant": {"graph": "knn", "n_neighbors": 11, "n_clusters": n_clusters - 6}}},
        "report": {
            "clusters": clusters,
            "clever_hans": {"shortcut_detected": True, "risk_level": "high", "flagged_clusters": [1, 9],
                            "flags": [{**flag, "cluster_id": 1, "risk_level": "high"},
                                      {**flag, "cluster_id": 9, "risk_level": "medium"}],
                            "labels_used": True, "notes": []},
            "representative_heatmaps": maps,
        },
    }


def run_with_spray(source: Path, target: Path, report: dict, grid_png: bool = True) -> Path:
    shutil.copytree(source, target)
    (target / "spray").mkdir(exist_ok=True)
    (target / "spray" / "report.json").write_text(json.dumps(report))
    if grid_png:
        Image.new("RGB", (8, 8)).save(target / "spray" / "representative_heatmaps.png")
    return target


def test_spray_flags_read_as_hypotheses_with_each_clusters_artefact_share(plain_run, tmp_path):
    from edgeshort.report import write_report

    run = run_with_spray(plain_run.run_dir, tmp_path / "run", spray_report())
    page = write_report(run, tmp_path / "page.html").read_text()
    body = html.unescape(re.sub(r"<[^>]+>", "", section(page, "spray")))
    assert "Its flags are hypotheses, not findings" in body and "tight focus on the object itself" in body
    assert "shortcut detected" not in body.lower()
    # Each flagged cluster says how much of it carries the known artefact, in words.
    assert "cluster 1 [high], 24 images of benign: 100.0% carry the known artefact" in body
    assert "cluster 9 [medium], 163 images of malignant: 2.5% carry the known artefact — most do not" in body
    assert "no artefact (97.5%)" in body and "group no artefact" not in body
    assert body.count("(mostly empty maps)") == 1  # cluster 0: its median map is flat
    verdict = html.unescape(re.sub(r"<[^>]+>", "", section(page, "verdict")))
    assert "SpRAy, a separate check on explanation maps: risk high, suspected in clusters 1, 9" in verdict
    assert "not a confirmation of the shortcut cluster above" in verdict
    assert "cluster 9: 2.5% with the known artefact (mostly without it)" in verdict
    # Nothing flagged: nothing to read as a hypothesis either.
    calm = spray_report()
    calm["risk_level"] = calm["report"]["clever_hans"]["risk_level"] = "none"
    calm["report"]["clever_hans"].update(flagged_clusters=[], flags=[])
    run = run_with_spray(plain_run.run_dir, tmp_path / "calm", calm)
    verdict = page_text(write_report(run, tmp_path / "calm.html").read_text(), "verdict")
    assert "SpRAy, a separate check on explanation maps: risk none , no cluster suspected." in verdict
    assert "hypotheses" not in verdict


def test_spray_groups_stored_as_numbers_still_read(plain_run, tmp_path):
    from edgeshort.report import write_report

    run = run_with_spray(plain_run.run_dir, tmp_path / "run", spray_report(groups=(1, 0)))
    body = html.unescape(re.sub(r"<[^>]+>", "", section(write_report(run, tmp_path / "p.html").read_text(), "spray")))
    assert "group 0 (97.5%)" in body and "2.5% carry the known artefact" in body
    # Groups that do not mark an artefact (sites, scanners) are shown as stored, with no artefact share.
    run = run_with_spray(plain_run.run_dir, tmp_path / "sites", spray_report(groups=("site B", "site A")))
    body = html.unescape(re.sub(r"<[^>]+>", "", section(write_report(run, tmp_path / "s.html").read_text(), "spray")))
    assert "majority group site A (97.5%)" in body and "% carry the known artefact" not in body


def test_spray_warnings_settings_and_fit_time_are_on_the_page(plain_run, tmp_path):
    from edgeshort.report import write_report

    run = run_with_spray(plain_run.run_dir, tmp_path / "run", spray_report())
    page = write_report(run, tmp_path / "page.html").read_text()
    spray, verdict = section(page, "spray"), section(page, "verdict")
    assert html.escape(SPRAY_WARNING, quote=True) in spray and html.escape(SPRAY_WARNING, quote=True) in verdict
    settings = html.unescape(re.sub(r"<[^>]+>", "", spray))
    assert "GradCAM maps at layer blocks.2" in settings and "(gradcam:blocks.2)" in settings
    assert "benign: knn graph, k = 10, 6 clusters; malignant: knn graph, k = 11, 6 clusters" in settings
    assert "64 x 64, clustered at 4 x 4 (downsample_size 32)" in settings and "cosine" in settings
    assert "each class clustered on its own" in settings and "largest eigengap" in settings
    timings = html.unescape(re.sub(r"<[^>]+>", "", section(page, "timings")))
    seconds = plain_run.metrics["seconds"]
    assert "SpRAy — heatmaps and spectral clustering" in timings and "25.26" in timings
    assert f"total{sum(seconds.values()) + 25.2576:.2f}" in timings
    # No warnings key (an older report): nothing invented.
    report = spray_report()
    del report["warnings"]
    run = run_with_spray(plain_run.run_dir, tmp_path / "older", report)
    assert "fit warned" not in write_report(run, tmp_path / "older.html").read_text()


def test_spray_pictures_in_cluster_order_with_their_scales_stated(plain_run, tmp_path):
    from edgeshort.report import write_report

    run = run_with_spray(plain_run.run_dir, tmp_path / "run", spray_report())
    body = section(write_report(run, tmp_path / "page.html").read_text(), "spray")
    order = [int(c) for c in re.findall(r'alt="SpRAy cluster (\d+) mean heatmap"', body)]
    assert order == list(range(12))  # 2 before 10
    text = html.unescape(re.sub(r"<[^>]+>", "", body))
    assert "All on one scale: black 0, white 1.000" in text and 'class="colour-key"' in body
    assert "Each map is scaled to its own minimum and maximum" in text
    # The shared scale: cluster 7 (the brightest) reaches white, cluster 3 stays dark.
    with Image.open(tmp_path / "page_files" / "spray" / "representative_7.png") as bright, \
            Image.open(tmp_path / "page_files" / "spray" / "representative_3.png") as dim:
        assert np.asarray(bright).max() == 255 and np.asarray(dim).max() < 80


# ---------------------------------------------------------------------------------------------
# Missing or inconsistent run files: said plainly, never read as "not evaluated"
# ---------------------------------------------------------------------------------------------
def page_text(page: str, ident: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", section(page, ident))))


def test_a_missing_metrics_file_is_named_with_what_it_held(demo_result, tmp_path):
    from edgeshort.report import write_report

    run = tmp_path / "run"
    shutil.copytree(demo_result.run_dir, run)
    (run / "metrics.json").unlink()
    page = write_report(run, tmp_path / "page.html").read_text()
    assert "not evaluated" not in page
    verdict = page_text(page, "verdict")
    assert "metrics.json is missing from the run folder" in verdict and "run's warnings" in verdict
    assert "absence of a warning on this page means nothing" in verdict
    flags, groups = page_text(page, "flags"), page_text(page, "groups")
    assert "metrics.json, which records where the test images are, is missing" in flags
    assert "no artefact masks" not in flags and "metrics.json, which holds them, is missing" in flags
    assert "Overall test accuracy (from test_predictions.npz): original " in groups
    assert "metrics.json is missing" in page_text(page, "timings")


def test_missing_or_mismatched_predictions_do_not_contradict_the_tables(demo_result, tmp_path):
    from edgeshort.report import write_report

    run = tmp_path / "run"
    shutil.copytree(demo_result.run_dir, run)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "test_predictions.npz").unlink()
    page = write_report(run, tmp_path / "no-npz.html").read_text()
    assert "not evaluated" not in page and 'id="group-accuracy"' in section(page, "groups")
    flags = page_text(page, "flags")
    assert (f"test_predictions.npz is missing from the run folder, though metrics.json records an evaluation on "
            f"{metrics['test_size']} test images") in flags
    assert "edgeshort demo" in flags  # the demo's test images are generated: how to get them back
    # Predictions of another evaluation: named as such, with the command for the recorded test folder.
    with np.load(demo_result.run_dir / "test_predictions.npz") as z:
        np.savez(run / "test_predictions.npz", **{k: z[k][:10] if z[k].ndim else z[k] for k in z.files})
    (run / "metrics.json").write_text(json.dumps({**metrics, "test_source": "folder:/data/isic test"}))
    flags = page_text(write_report(run, tmp_path / "other.html").read_text(), "flags")
    assert (f"test_predictions.npz holds the predictions of 10 test images, but metrics.json describes an evaluation "
            f"on {metrics['test_size']}: the two files come from different evaluations") in flags
    assert f"edgeshort report {run} --eval '/data/isic test'" in flags


def test_summary_figures_that_disagree_with_their_table_are_called_out(demo_result, tmp_path):
    from edgeshort.report import write_report

    run = tmp_path / "run"
    shutil.copytree(demo_result.run_dir, run)
    metrics = json.loads((run / "metrics.json").read_text())
    table_worst = metrics["group_accuracy"]["ablated"]["worst"]
    edited = {k: v for k, v in metrics.items() if k != "warnings"}
    (run / "metrics.json").write_text(json.dumps({**edited, "wga_ablated": 0.99}))
    verdict = page_text(write_report(run, tmp_path / "page.html").read_text(), "verdict")
    assert f"metrics.json contradicts itself: wga_ablated is 0.990 but its table's worst cell is {table_worst:.3f}" in verdict
    assert f"ablated {table_worst:.3f}" in verdict and "ablated 0.990" not in verdict
    assert "holds no record of the fit's warnings" in verdict


def test_the_page_shows_the_runs_provenance_apart_from_its_own(demo_result, tmp_path):
    from edgeshort._version import __version__
    from edgeshort.report import write_report

    run = tmp_path / "run"
    shutil.copytree(demo_result.run_dir, run)
    meta = json.loads((run / "run.json").read_text())
    page = write_report(run, tmp_path / "page.html").read_text()
    header = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page.split("</header>")[0])))
    assert f"Run created {meta['created']} (UTC) with edgeshort {meta['versions']['edgeshort']}" in header
    assert "this page rendered " in header and f"UTC by edgeshort {__version__}" in header
    provenance = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page.split('id="provenance"')[1])))
    for name in ("edgeshort", "python", "torch", "torchvision", "scikit-learn", "numpy"):
        assert f"{name} {meta['versions'][name]}" in provenance
    assert meta["model_sha256"] in provenance and "not of the model file" in provenance
    assert "sha256sum model.pt gives another value" in provenance
    assert "test split, patch artefact, seed 0" in page_text(page, "groups")  # beside the test figures
    # A run from before these were recorded: what is there, and "not recorded" for the rest.
    older = {k: v for k, v in meta.items() if k != "created"}
    older["versions"] = {k: v for k, v in meta["versions"].items() if k != "torchvision"}
    (run / "run.json").write_text(json.dumps(older))
    page = write_report(run, tmp_path / "older.html").read_text()
    provenance = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page.split('id="provenance"')[1])))
    assert "run created not recorded" in provenance and "torchvision not recorded" in provenance
    assert f"torch {meta['versions']['torch']}" in provenance
    header = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page.split("</header>")[0])))
    assert f"Run created not recorded with edgeshort {meta['versions']['edgeshort']} ( provenance )" in header
    # A run from before the tint had a setting was tinted by the clean mean key, and its page says so.
    config = json.loads((run / "config.json").read_text())
    del config["saliency"]
    (run / "config.json").write_text(json.dumps(config))
    text = page_text(write_report(run, tmp_path / "oldest.html").read_text(), "flags")
    assert "to the mean key at the same position over the validation images outside the shortcut cluster" in text
    assert "nearest of the KNN's clean reference keys" not in text


def test_flag_pictures_show_the_image_untinted_and_say_what_the_tint_is(demo_report, demo_result, demo_data):
    page = demo_report.read_text()
    flags = section(page, "flags")
    text = page_text(page, "flags")
    assert demo_result.config.saliency == "nearest"
    assert "the distance of its key to the nearest of the KNN's clean reference keys ( saliency = nearest )" in text
    assert "the outlines are its decision, and only they" in text and 'class="colour-key"' in flags
    outlined = re.findall(r'<img src="([^"]+)" alt="test image (\d+) with flag outlines">', flags)
    assert outlined and len(outlined) == len(re.findall(r'alt="test image \d+ with flags and tint"', flags))
    pred = np.load(demo_result.run_dir / "test_predictions.npz")
    for src, i in outlined:
        with Image.open(demo_report.parent / src) as picture:
            drawn = np.asarray(picture.convert("RGB"))
        image = np.asarray(demo_data["test"].image(int(i)).convert("RGB"))
        plain = np.asarray(Image.fromarray(image).resize(drawn.shape[1::-1], Image.NEAREST))
        assert (drawn == CYAN).all(-1).any() == bool(pred["flags"][int(i)].any())  # outlines where flagged
        # Untinted: every pixel is the image's own, or the outline's colour.
        assert ((drawn == plain).all(-1) | (drawn == CYAN).all(-1)).all()


def test_an_embedded_page_stands_alone_and_a_folder_page_holds_only_its_own_pictures(demo_result, demo_data, tmp_path):
    from edgeshort.report import write_report

    page_path = tmp_path / "report.html"
    page = write_report(demo_result.run_dir, page_path, test_dataset=demo_data["test"]).read_text()
    files = tmp_path / "report_files"
    assert "<code>report_files/cluster_scatter.png</code> beside this page holds it as a PNG" in page
    assert "written beside this page" not in page
    used = {files / src.removeprefix("report_files/") for src in image_sources(page)}
    stale = files / "flags" / "test_99999.png"  # a picture of an earlier evaluation
    stale.write_bytes((files / "cluster_scatter.png").read_bytes())
    (files / "notes.txt").write_text("kept")  # not the report's: left alone
    page = write_report(demo_result.run_dir, page_path, test_dataset=demo_data["test"]).read_text()
    assert not stale.exists() and (files / "notes.txt").is_file()
    assert set(files.rglob("*.png")) == used == {files / s.removeprefix("report_files/") for s in image_sources(page)}

    # Embedded: every picture in the page, no folder written, and the earlier rendering's pictures gone.
    (files / "notes.txt").unlink()
    page = write_report(demo_result.run_dir, page_path, test_dataset=demo_data["test"], embed=True).read_text()
    assert not files.exists() and list(tmp_path.iterdir()) == [page_path]
    assert all(src.startswith("data:image/png;base64,") for src in image_sources(page))
    assert not re.findall(r'(?:src|href)="(?!data:|#)', page)  # nothing outside the page
    assert "Embedded in this page" in section(page, "verdict")


def test_the_page_says_the_dfr_head_rescores_images_the_guard_left_alone(demo_report, demo_result):
    page = demo_report.read_text()
    with np.load(demo_result.run_dir / "test_predictions.npz") as z:
        unflagged = ~z["present"]
        changed = unflagged & (z["dfr_logits"].argmax(1) != z["logits"].argmax(1))
    assert changed.any()  # the demo's head changes some labels where nothing was masked
    sentence = (f"changed the label of {changed.sum():,} of the {unflagged.sum():,} test images where no shortcut "
                "was found")
    assert sentence in page_text(page, "verdict") and sentence in page_text(page, "flags")
    captions = re.findall(r'alt="test image (\d+) with flags and tint"></div><figcaption>.*?</table>([^<]*)</figcaption>',
                          section(page, "flags"))
    noted = [int(i) for i, tail in captions if "the retrained DFR head re-scores every image, flagged or not" in tail]
    assert noted and all(changed[i] for i in noted)
    assert all(int(i) in noted for i, tail in captions if changed[int(i)])


def test_group_tables_and_bars_carry_the_bootstrap_intervals(demo_report, demo_result, tmp_path):
    from edgeshort.report.figures import group_accuracy_bars

    intervals = demo_result.metrics["group_accuracy_intervals"]
    groups = section(demo_report.read_text(), "groups")
    label = "95% CI (paired bootstrap over each (class, group) cell)"
    rows = re.findall(rf'<tr><td class="text ci" colspan="3">{re.escape(html.escape(label))}</td>(.*?)</tr>', groups)
    assert len(rows) == 2  # under the average and under the worst group
    for row, key in zip(rows, ("average", "worst")):
        expected = [f"{lo:.3f}–{hi:.3f}" for lo, hi in (intervals["kinds"][k][key] for k in intervals["kinds"])]
        assert re.findall(r'<td class="ci">([^<]+)</td>', row) == expected
    assert f"error bars on the average and the worst group: {html.escape(label)}" in groups
    tables = demo_result.metrics["group_accuracy"]
    plain = group_accuracy_bars(tables, tmp_path / "plain.png")
    with_bars = group_accuracy_bars(tables, tmp_path / "bars.png", intervals["kinds"])
    with Image.open(plain) as a, Image.open(with_bars) as b:
        assert a.size == b.size and not np.array_equal(np.asarray(a), np.asarray(b))


def test_flags_are_not_drawn_on_images_that_changed_since_the_evaluation(demo_result, demo_data, tmp_path):
    from edgeshort.data import ImageDataset
    from edgeshort.report import write_report

    test = demo_data["test"]
    page = write_report(demo_result.run_dir, tmp_path / "same.html", test_dataset=test).read_text()
    assert "was checked against the digest stored at evaluation" in page_text(page, "flags")
    # The same labels and groups, every image mirrored: the stored flags no longer fit the pixels.
    mirrored = ImageDataset.from_arrays(np.stack([test.array(i)[:, ::-1] for i in range(len(test))]), test.labels,
                                        test.class_names, test.groups)
    page = write_report(demo_result.run_dir, tmp_path / "mirrored.html", test_dataset=mirrored).read_text()
    flags = page_text(page, "flags")
    drawn = len(re.findall(r"test image \d+ with flags and tint", section(page, "flags")))
    assert drawn == 0 and "differ from the images the run evaluated" in flags
    assert flags.count("image changed since the evaluation: not drawn") == 4 * SAMPLES_PER_CATEGORY
    assert (f"{4 * SAMPLES_PER_CATEGORY} of the test images drawn under Flags differ from those the run evaluated"
            in page_text(page, "verdict"))
    # An evaluation that stored no digests: said, not assumed.
    run = tmp_path / "run"
    shutil.copytree(demo_result.run_dir, run)
    with np.load(run / "test_predictions.npz") as z:
        np.savez(run / "test_predictions.npz", **{k: z[k] for k in z.files if k != "input_sha256"})
    page = write_report(run, tmp_path / "older.html", test_dataset=test).read_text()
    assert "stores no digest of its test images" in page_text(page, "flags")


def test_a_test_source_is_described_in_words_not_as_its_recorded_json():
    import json

    from edgeshort.report.html import _describe_source

    listing = "manifest:" + json.dumps({"csv": "/site/test.csv", "columns": {"image": "file_name", "label": "diagnosis"}})
    merged = "merged:" + json.dumps({"class_map": {"Benign": "benign", "<b>": "malignant"}, "source": listing})
    assert _describe_source(listing, brief=True) == ("the CSV listing <code>/site/test.csv</code> (columns image = "
                                                     "file_name, label = diagnosis)")
    assert _describe_source(merged, brief=True).endswith(", its classes mapped (Benign &rarr; benign, &lt;b&gt; &rarr; "
                                                         "malignant)")
    assert "{" in _describe_source(merged)  # in full under Provenance

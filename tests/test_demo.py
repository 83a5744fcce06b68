"""`edgeshort demo`, the README's first command: the whole chain runs and leaves every output."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_chain(demo_vit, tmp_path, capsys):
    from edgeshort.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--quiet"]) == 0  # the fixture trained (and cached) its model
    printed = capsys.readouterr().out
    for stage in ("data", "model", "detect", "spray", "export", "predict", "bench", "report"):
        assert f"== {stage}:" in printed, stage

    metrics = json.loads((out / "run" / "metrics.json").read_text())
    with np.load(out / "run" / "test_predictions.npz") as stored:
        assert len(stored["input_sha256"]) == metrics["test_size"] and len(metrics["test_sha256"]) == 64
    assert metrics["shortcut_cluster_group_purity"] >= 0.9 and metrics["patch_recall"] >= 0.8
    assert metrics["wga_ablated"] > metrics["wga_original"]
    assert "worst group" in printed and f"{metrics['wga_ablated']:.3f}" in printed
    assert (f"positives are spread over the {metrics['knn_positive_candidates']:,} shortcut-cluster tokens hotter "
            "than 99.9%") in printed
    assert f"clusters vs classes: normalised mutual information {metrics['cluster_class_nmi']:.2f}" in printed
    assert json.loads((out / "bundle" / "manifest.json").read_text())["guard"]["has_dfr"]

    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    listing = (out / "test_images.csv").read_text().splitlines()
    assert len(records) == len(listing) - 1 == 16 and listing[0] == "path,label,group"
    assert any(r["shortcut_present"] for r in records) and not all(r["shortcut_present"] for r in records)
    assert "runtime ablated labels equal the offline detector's on 16/16" in printed
    assert len(list((out / "overlays").glob("*.png"))) == 16
    assert json.loads((out / "bench" / "bench.json").read_text())
    assert (out / "run" / "report.html").stat().st_size > 10_000

    # SpRAy, the second detector, flags a cluster of the planted artefact's images, and the report shows it.
    spray = json.loads((out / "run" / "spray" / "report.json").read_text())["report"]
    clusters = {c["cluster_id"]: c for c in spray["clusters"]}
    artefact_share = {i: c["group_counts"].get("artefact", 0) / c["size"] for i, c in clusters.items()}
    flagged = [f["cluster_id"] for f in spray["clever_hans"]["flags"] if f["risk_level"] in ("medium", "high")]
    assert any(artefact_share[i] >= 0.9 for i in flagged), (flagged, artefact_share)
    assert "with the planted artefact" in printed
    assert "no SpRAy result" not in (out / "run" / "report.html").read_text()

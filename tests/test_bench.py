"""The benchmark harness keeps working: structure of its outputs, never a time."""

from __future__ import annotations

import json

import pytest

from edgeshort.bench import bench_bundle, write_outputs
from edgeshort.errors import InputError


def test_bench_writes_json_markdown_and_chart(demo_bundle, tmp_path):
    # 12 is more than the eight images it would otherwise pick: each batch must hold what it says.
    results = bench_bundle(demo_bundle.root, backends=["onnxruntime", "openvino"], batches=(1, 12), rounds=2,
                           block=1, progress=False)
    paths = write_outputs(results, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["machine"]["cpu_count"] and data["size"]["total_bytes"] > 0
    # The ONNX graphs' shared weights are counted once, beside the graphs' own files.
    shared = data["size"]["shared_bytes"]["weights.onnx.data"]
    assert shared == (demo_bundle.root / "weights.onnx.data").stat().st_size
    assert data["size"]["by_graph_bytes"]["guarded.onnx"] < shared < data["size"]["total_bytes"]
    rows = [c for c in data["cases"] if c["backend"] in ("onnxruntime", "openvino")]
    assert {(c["backend"], c["precision"], c["batch"]) for c in rows} >= {
        ("onnxruntime", "f32", 1), ("onnxruntime", "f32", 12), ("openvino", "f32", 1), ("openvino", "f32", 12)}
    # ONNX Runtime also runs on the mapped shared weights file, each row with its private memory.
    assert {c["batch"] for c in rows if c.get("map_weights")} == {1, 12}
    assert all(c["uss_mb"] > 0 for c in rows)
    for case in rows:
        assert set(case["timings"]) >= {"plain", "guarded", "guarded+original (flagged image)"}
        if case["precision"] != "int8":
            assert "Guard.predict (clean image)" in case["timings"]
        assert case["ratio_vs_plain"]["plain"] == 1.0
        assert all(t["n"] == 2 and t["median_ms"] > 0 for t in case["timings"].values())
        assert case["cold_start_s"]["guarded"] > 0
    torch_rows = {name: c["batch"] for c in data["cases"] if c["backend"] == "torch" for name in c["timings"]}
    assert torch_rows == {"seed-style (per image)": 1, "torch eager batch 8": 8}  # the chart divides by the batch
    table = paths["markdown"].read_text()
    assert table.startswith("| backend | precision | batch | case |") and "Cold start" in table
    assert "| onnxruntime (mapped weights) | f32 | 1 | guarded |" in table
    assert "Settings: 2 interleaved rounds of 1 calls per case; threads the backend default;" in table
    assert "OpenVINO performance hint LATENCY" in table and f"onnxruntime {data['machine']['packages']['onnxruntime']}" in table
    # The runtime's memory is named apart from torch's (hundreds of MiB); under pytest torch was loaded before
    # the bench began, so its peak is the process's, and bench.md says so.
    assert data["torch_loaded_before"]
    assert f"peak RSS {data['peak_rss_mb']:.0f} MiB of this process, which had loaded torch before" in table
    from edgeshort.bench import markdown_table

    alone = markdown_table({**data, "torch_loaded_before": False, "peak_rss_mb": 150.0, "peak_rss_with_torch_mb": 700.0})
    assert "peak RSS 150 MiB over the runtime's rows (700 MiB once the torch rows ran)" in alone
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_on_the_core_install_times_the_runtime_and_says_why_torch_rows_are_missing(demo_bundle, tmp_path,
                                                                                           import_blocker):
    """Without torch and scikit-learn the runtime's rows and memory are measured; the seed-style row is
    skipped with a reason, and no peak 'once the torch rows ran' is claimed."""
    import subprocess
    import sys
    import textwrap

    blocked = {"torch", "torchvision", "sklearn", "scipy", "onnx", "onnxscript", "skl2onnx", "pytorch_grad_cam"}
    script = import_blocker(blocked) + textwrap.dedent(f"""
        import json
        from edgeshort.bench import bench_bundle, write_outputs
        results = bench_bundle({str(demo_bundle.root)!r}, backends=["onnxruntime"], batches=(1,), rounds=1, block=1,
                               progress=False)
        write_outputs(results, {str(tmp_path)!r})
        assert not [m for m in BLOCKED if m in sys.modules]
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "the seed-style row needs torch and scikit-learn (pip install 'edgeshort[offline]')" in done.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {c["backend"] for c in data["cases"]} == {"onnxruntime"} and "peak_rss_with_torch_mb" not in data
    assert data["peak_rss_mb"] > 0 and all(c["rss_mb"] > 0 for c in data["cases"])  # psutil is a core dependency
    table = (tmp_path / "bench.md").read_text()
    assert "over the runtime's rows" in table and "torch rows" not in table


@pytest.mark.parametrize("backends, batches", [(["onnx"], (1,)), (["onnxruntime"], (0, 8)), (["onnxruntime"], ())])
def test_bench_refuses_unknown_backends_and_empty_batches(demo_bundle, backends, batches):
    with pytest.raises(InputError, match="expected backends from"):
        bench_bundle(demo_bundle.root, backends=backends, batches=batches, progress=False)


def test_bench_refuses_what_it_cannot_time_before_timing(demo_bundle, tmp_path, capsys):
    from edgeshort.cli import main

    for flag, value in (("--rounds", "0"), ("--block", "0")):
        assert main(["bench", str(demo_bundle.root), flag, value, "-o", str(tmp_path)]) == 2
        assert "expected at least 1 round and 1 call per block" in capsys.readouterr().err
    assert main(["bench", str(demo_bundle.root), "--batch", "1,a", "-o", str(tmp_path)]) == 2
    assert "expected --batch as a comma list of whole numbers" in capsys.readouterr().err
    assert main(["bench", str(demo_bundle.root), "--threads", "0", "-o", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "expected threads to be a positive integer or None, got 0" in captured.err and "batch" not in captured.out
    assert not list(tmp_path.iterdir())
    before = sorted(p.name for p in demo_bundle.root.iterdir())
    for inside in (demo_bundle.root, demo_bundle.root / "timings"):
        assert main(["bench", str(demo_bundle.root), "-o", str(inside)]) == 2
        assert "expected --out apart from the bundle folder" in capsys.readouterr().err
    assert sorted(p.name for p in demo_bundle.root.iterdir()) == before


def test_rows_with_disturbed_timings_are_marked():
    from edgeshort.bench import markdown_table

    def timing(median, p90):
        return {"median_ms": median, "p90_ms": p90}

    results = {"size": {"total_bytes": 2**20}, "peak_rss_mb": 10, "cases": [{
        "backend": "onnxruntime", "precision": "f32", "batch": 1,
        "timings": {"plain": timing(1.0, 1.2), "guarded": timing(1.0, 5.0)},
        "ratio_vs_plain": {"plain": 1.0, "guarded": 1.0}, "images_per_s": {"plain": 1000, "guarded": 1000}}]}
    table = markdown_table(results)
    assert "| guarded * |" in table and "| plain |" in table and "p90 over 2x the median" in table
    from edgeshort.bench import FEW_ROUNDS

    assert "Only" not in markdown_table({**results, "settings": {"rounds": FEW_ROUNDS}})
    assert "Only 1 round: a change in the machine's load" in markdown_table({**results, "settings": {"rounds": 1}})
    results["cases"][0]["timings"]["guarded"] = timing(1.0, 1.5)
    assert "*" not in markdown_table(results)
    # The precisions' side-by-side rows are marked the same way.
    results["precision_cases"] = [{"batch": 8, "timings": {"f32": timing(2.0, 2.2), "int8": timing(1.0, 3.0)},
                                   "ratio_vs_f32": {"f32": 1.0, "int8": 0.5}, "images_per_s": {"f32": 4000, "int8": 8000}}]
    table = markdown_table(results)
    assert "| 8 | int8 * | 1.000 | 3.000 | 0.5 | 8000 |" in table and "p90 over 2x the median" in table
    assert "| 8 | f32 | 2.000 |" in table


def test_bench_times_given_images_and_names_random_stand_ins(demo_bundle, demo_data, tmp_path, monkeypatch):
    import shutil
    import sys

    from edgeshort.bench import markdown_table
    from edgeshort.errors import MissingDependencyError
    from edgeshort.runtime.bundle import write_manifest

    # On another machine the source run is out of reach: random images, and the rows say so.
    far = tmp_path / "far-bundle"
    shutil.copytree(demo_bundle.root, far)
    manifest = json.loads((far / "manifest.json").read_text())
    manifest["source_run"] = str(tmp_path / "not-here")
    write_manifest(far, manifest)
    quick = {"backends": ["onnxruntime"], "batches": (1,), "rounds": 1, "block": 1, "seed_pipeline": False,
             "progress": False}
    results = bench_bundle(far, **quick)
    assert results["inputs"] == {"source": "random images", "clean": "random image", "flagged": "random image"}
    case = results["cases"][0]
    assert {"Guard.predict (random image)", "guarded+original (random image)"} <= set(case["timings"])
    assert "Random images stand in" in markdown_table(results)

    # The user's own images, sorted by the guard's flags.
    folder = tmp_path / "mine"
    folder.mkdir()
    test = demo_data["test"]
    for i in range(0, len(test), len(test) // 12):
        test.image(i).save(folder / f"img_{i}.png")
    results = bench_bundle(far, **quick, images=[str(folder)])
    count = len(list(folder.iterdir()))
    assert results["inputs"] == {"source": f"{count} image files from --images {folder}", "clean": "clean image",
                                 "flagged": "flagged image"}
    assert f"Inputs: {count} image files from --images {folder}." in markdown_table(results)
    assert {"Guard.predict (clean image)", "guarded+original (flagged image)"} <= set(results["cases"][0]["timings"])
    assert results["cases"][0]["clean_inputs_flagged"] == 0.0
    with pytest.raises(InputError, match="expected --images to name image files or folders, got '.*nothing'"):
        bench_bundle(far, **quick, images=[str(tmp_path / "nothing")])

    # Only OpenVINO asked for, and it is not installed: an error, not an empty table.
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingDependencyError, match=r"none of the backends \['openvino'\] can run.*edgeshort\[openvino\]"):
        bench_bundle(far, **{**quick, "backends": ["openvino"]})
    results = bench_bundle(far, **{**quick, "backends": ["onnxruntime", "openvino"]})
    assert results["skipped_backends"] == ["openvino"] and "Not timed: openvino" in markdown_table(results)

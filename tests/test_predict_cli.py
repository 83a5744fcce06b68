"""`edgeshort predict`: records per image (JSONL / CSV), overlays, and bad files reported, not fatal."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeshort.cli import main

NUM_IMAGES = 10


@pytest.fixture(scope="module")
def reference(demo_result, demo_data):
    return demo_result.predict(demo_data["test"].subset(np.arange(NUM_IMAGES)), progress=False)


@pytest.fixture(scope="module")
def image_folder(demo_data, tmp_path_factory) -> Path:
    """Test images as PNGs, half of them in a nested folder, plus a broken image and a non-image file."""
    root = tmp_path_factory.mktemp("images")
    (root / "nested" / "deeper").mkdir(parents=True)
    for i in range(NUM_IMAGES):
        folder = root if i % 2 == 0 else root / "nested" / "deeper"
        Image.fromarray(demo_data["test"].array(i)).save(folder / f"img{i:02d}.png")
    (root / "nested" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "notes.txt").write_text("not an image, and not picked up")
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expected_labels(reference, class_names, path: str) -> tuple[str, str]:
    index = int(Path(path).stem[3:])
    return class_names[reference.labels("original")[index]], class_names[reference.labels("ablated")[index]]


def test_folder_to_jsonl_with_overlays_and_one_bad_file(demo_bundle, image_folder, reference, tmp_path, capsys):
    out, overlays = tmp_path / "results.jsonl", tmp_path / "overlays"
    code = main(["predict", str(demo_bundle.root), str(image_folder), "--backend", "onnxruntime",
                 "--batch-size", "4", "--out", str(out), "--overlays", str(overlays)])
    assert code == 1, "one file failed, so the exit code says so"
    stderr = capsys.readouterr().err
    assert "broken.png" in stderr and "cannot read image" in stderr
    assert "skipped 1 file in the folders that are not images (.txt 1)" in stderr  # notes.txt, not silently
    records = read_jsonl(out)
    flagged = sum(r["shortcut_present"] for r in records if not r["error"])
    assert f"{NUM_IMAGES} images predicted, {flagged} with a shortcut, 1 failed" in stderr  # the verdict is 'found'
    assert len(records) == NUM_IMAGES + 1
    from edgeshort.commands.predict import find_inputs

    # One record per file in the order the files are found, the unreadable one in its place.
    assert [r["path"] for r in records] == [entry.path for entry in find_inputs([str(image_folder)]).files]
    errors = [r for r in records if r["error"]]
    assert len(errors) == 1 and errors[0]["path"].endswith("broken.png") and errors[0]["label"] is None
    assert "cannot read image" in errors[0]["error"]
    # Every record, error or not, names the exact bundle and runtime that produced it.
    from edgeshort.runtime.bundle import sha256_file

    manifest_sha256 = sha256_file(demo_bundle.root / "manifest.json")
    assert {r["bundle_sha256"] for r in records} == {manifest_sha256}
    assert {r["runtime"].split()[0] for r in records} == {"onnxruntime"} and " f32" in records[0]["runtime"]
    names = demo_bundle.class_names
    for record in records:
        if record["error"]:
            continue
        assert (record["label"], record["ablated_label"]) == expected_labels(reference, names, record["path"])
        assert record["flagged_patches"] >= 0 and isinstance(record["shortcut_present"], bool)
        assert len(record["logits"]) == len(names)
        assert (record["dfr_label"] is None) == (not demo_bundle.has_dfr)
        assert record["final_label"] == (record["dfr_label"] or record["ablated_label"])
        final = np.asarray(record["dfr_logits"] or record["ablated_logits"])
        assert record["final_probability"] == pytest.approx(np.exp(final).max() / np.exp(final).sum())
        assert record["warning"] is None or record["warning"].startswith("flags cover")
        picture = Image.open(record["overlay"])
        assert picture.mode == "RGB" and min(picture.size) >= 256
    assert len(list(overlays.rglob("*.png"))) == NUM_IMAGES  # under nested/deeper/ as their images are
    index = {int(Path(r["path"]).stem[3:]): r for r in records if not r["error"]}
    assert [index[i]["shortcut_present"] for i in range(NUM_IMAGES)] == reference.present.tolist()
    assert [index[i]["flagged_patches"] for i in range(NUM_IMAGES)] == reference.flags.sum((1, 2)).tolist()


def test_a_long_run_reports_progress_unless_quiet(demo_bundle, image_folder, tmp_path, capsys, monkeypatch):
    import re

    monkeypatch.setattr("edgeshort.commands.predict.PROGRESS_EVERY_S", 0.0)  # every batch counts as "long"
    argv = ["predict", str(demo_bundle.root), str(image_folder), "--backend", "onnxruntime", "--batch-size", "4",
            "--out", str(tmp_path / "r.jsonl")]
    main(argv)
    lines = re.findall(r"edgeshort predict: (\d+) of 11 inputs \([\d.]+/s, about \d+ s left\)", capsys.readouterr().err)
    assert [int(done) for done in lines] == [4, 8]  # after each full batch; the summary tells the end
    main([*argv, "--quiet"])
    assert "inputs (" not in capsys.readouterr().err


def test_files_to_csv_on_the_split_path(demo_bundle, image_folder, reference, tmp_path):
    files = sorted(str(p) for p in image_folder.rglob("img*.png"))
    out = tmp_path / "results.csv"
    code = main(["predict", str(demo_bundle.root), *files, "--backend", "openvino", "--split", "--drop-tokens",
                 "--out", str(out), "--quiet"])
    assert code == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == NUM_IMAGES
    names = demo_bundle.class_names
    for row in rows:
        assert (row["label"], row["ablated_label"]) == expected_labels(reference, names, row["path"])
        assert row["error"] == ""
        for name in names:
            float(row[f"logit_{name}"])


def test_missing_file_and_empty_folder_are_error_records(demo_bundle, image_folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    good = sorted(image_folder.glob("img*.png"))[0]
    code = main(["predict", str(demo_bundle.root), str(tmp_path / "missing.png"), str(empty), str(good),
                 "--backend", "onnxruntime"])
    assert code == 1
    captured = capsys.readouterr()
    records = read_jsonl_text(captured.out)
    assert [bool(r["error"]) for r in records] == [True, True, False]
    assert "does not exist" in records[0]["error"] and "found none" in records[1]["error"]
    assert "missing.png" in captured.err


def test_json_out_is_one_array(demo_bundle, image_folder, tmp_path):
    good = sorted(image_folder.glob("img*.png"))[:2]
    out = tmp_path / "results.json"
    code = main(["predict", str(demo_bundle.root), *map(str, good), str(tmp_path / "missing.png"), "--backend",
                 "onnxruntime", "-o", str(out), "--quiet"])
    assert code == 1
    records = json.loads(out.read_text())
    assert [Path(r["path"]).name for r in records] == [p.name for p in good] + ["missing.png"]
    assert records[0]["label"] in demo_bundle.class_names and records[2]["error"]


def test_overlays_of_large_photos_stay_screen_sized(demo_bundle, demo_data, tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(demo_data["test"].array(0)).resize((2048, 1536)).save(photo)
    code = main(["predict", str(demo_bundle.root), str(photo), "--backend", "onnxruntime", "--overlays",
                 str(tmp_path / "overlays"), "-o", str(tmp_path / "r.jsonl"), "--quiet"])
    assert code == 0
    assert max(Image.open(tmp_path / "overlays" / "photo.jpg.png").size) == 1024


def test_odd_file_names_and_bad_outputs(demo_bundle, demo_data, tmp_path, capsys, monkeypatch):
    import os

    folder = tmp_path / "odd"
    folder.mkdir()
    pixels = Image.fromarray(demo_data["test"].array(0))
    latin1 = os.fsdecode(bytes(folder) + b"/caf\xe9.png")  # not UTF-8, as old Windows shares write names
    pixels.save(latin1)
    pixels.save(folder / "=cmd.png")
    out = tmp_path / "r.csv"
    assert main(["predict", str(demo_bundle.root), str(folder), "--backend", "onnxruntime", "-o", str(out), "--quiet"]) == 0
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    names = sorted(Path(r["path"].lstrip("'")).name for r in rows)
    assert names == ["=cmd.png", "caf\\xe9.png"]
    monkeypatch.chdir(folder)  # a name given as it is, the cell's first character
    assert main(["predict", str(demo_bundle.root), "=cmd.png", "--backend", "onnxruntime", "-o",
                 str(tmp_path / "one.csv"), "--quiet"]) == 0
    with open(tmp_path / "one.csv", newline="") as fh:
        assert next(csv.DictReader(fh))["path"] == "'=cmd.png"  # text, not a spreadsheet formula
    # An --overlays path that is a file is refused before the earlier results in --out are touched.
    before = out.read_text()
    assert main(["predict", str(demo_bundle.root), str(folder), "--backend", "onnxruntime", "-o", str(out),
                 "--overlays", str(tmp_path / "one.csv")]) == 2
    assert "cannot write the overlays to" in capsys.readouterr().err and out.read_text() == before


def read_jsonl_text(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_unusable_bundle_or_options_exit_2_with_a_message(demo_bundle, image_folder, tmp_path, capsys):
    assert main(["predict", str(tmp_path), str(image_folder)]) == 2
    assert "is not an edgeshort bundle" in capsys.readouterr().err
    assert main(["predict", str(demo_bundle.root), str(image_folder), "--drop-tokens"]) == 2
    assert "add --split" in capsys.readouterr().err
    assert main(["predict", str(demo_bundle.root), str(image_folder), "--out", str(tmp_path / "r.xlsx")]) == 2
    assert "expected --out to end in .jsonl, .json or .csv" in capsys.readouterr().err
    for flag in ("--max-pixels", "--threads", "--batch-size"):  # 0 is refused, not read as "the default"
        assert main(["predict", str(demo_bundle.root), str(image_folder), flag, "0"]) == 2
        assert f"expected {flag} of at least 1, got 0" in capsys.readouterr().err


def test_predict_command_runs_without_torch_sklearn_scipy_or_onnx(demo_bundle, image_folder, tmp_path,
                                                                  import_blocker):
    blocked = {"torch", "torchvision", "sklearn", "scipy", "onnx", "onnxscript", "skl2onnx", "matplotlib"}
    script = import_blocker(blocked) + textwrap.dedent(
        """
        from edgeshort.cli import main

        code = main(sys.argv[1:])
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        sys.exit(3 if leaked else code)
        """
    )
    files = [str(p) for p in sorted(image_folder.glob("img*.png"))[:3]]
    out = tmp_path / "r.jsonl"
    proc = subprocess.run([sys.executable, "-c", script, "predict", str(demo_bundle.root), *files,
                           "--out", str(out), "--overlays", str(tmp_path / "ov"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(read_jsonl(out)) == 3 and len(list((tmp_path / "ov").glob("*.png"))) == 3

"""`edgeshort predict` outputs and inputs: folder search, overlay names and safety, write failures, exit codes,
file names that are not UTF-8, and the Python inputs a web service passes (bytes, file objects, PIL images)."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeshort.cli import main
from edgeshort.commands import predict
from edgeshort.errors import ImageLoadError, InputError
from edgeshort.runtime import Guard
from edgeshort.runtime.preprocess import as_pil, list_image_files, search_folder


def save_png(path: Path, seed: int = 0, size: tuple[int, int] = (40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def locked_folders(monkeypatch):
    """Folders whose listing fails as for a user without read permission (tests may run as root, which
    chmod cannot lock out)."""
    locked: set[str] = set()
    scandir = os.scandir

    def refusing_scandir(path="."):
        if os.fspath(path) in locked:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    return locked


@pytest.fixture
def messy_tree(tmp_path, locked_folders) -> Path:
    """A folder as found on a shared drive: links, hidden files, a broken link, a FIFO, a locked folder."""
    root = tmp_path / "batch"
    save_png(root / "a.png")
    save_png(root / "sub" / "a.png", 1)
    outside = tmp_path / "elsewhere"
    save_png(outside / "linked.png", 2)
    (root / "link_dir").symlink_to(outside, target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # a cycle back to the top
    (root / "dangling.png").symlink_to(tmp_path / "gone.png")
    (root / "dangling.txt").symlink_to(tmp_path / "gone.txt")  # not an image by its name: skipped as such
    (root / ".DS_Store").write_bytes(b"\0")
    save_png(root / "._a.png", 3)
    save_png(root / ".hidden" / "h.png", 4)
    os.mkfifo(root / "pipe.png")
    (root / "device.png").symlink_to("/dev/null")  # a link that can be followed, to no file
    save_png(root / "locked" / "l.png", 5)
    locked_folders.add(str(root / "locked"))
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_search_follows_links_once_and_names_what_it_leaves_out(messy_tree):
    root = messy_tree
    contents = search_folder(root)
    assert contents.images == sorted([root / "a.png", root / "link_dir" / "linked.png", root / "sub" / "a.png"])
    assert contents.others == [root / "dangling.txt", root / "notes.txt"]
    assert sorted(p.name for p in contents.hidden) == [".DS_Store", "._a.png", ".hidden"]
    assert contents.repeated == [root / "sub" / "loop"]  # the cycle is searched once
    problems = dict(contents.problems)
    assert set(problems) == {root / "dangling.png", root / "pipe.png", root / "device.png", root / "locked"}
    assert "is a link that cannot be followed" in problems[root / "dangling.png"]
    assert "fix the link or remove it" in problems[root / "dangling.png"]
    assert "not a regular file" in problems[root / "pipe.png"]
    assert "(a link to '/dev/null') is not a regular file but a FIFO, socket or device" in problems[root / "device.png"]
    assert "Permission denied" in problems[root / "locked"] and "make it readable" in problems[root / "locked"]


def test_data_sets_refuse_a_folder_search_that_loses_images(messy_tree, tmp_path):
    # Training and evaluation data must not silently shrink: a broken image link or a locked folder is an error.
    with pytest.raises(InputError, match=r"cannot use 4 entries under .*batch.*fix the link or remove it"):
        list_image_files(messy_tree, recursive=True)
    clean = tmp_path / "clean"
    save_png(clean / "x.png")
    (clean / "notes.txt").write_text("")
    (clean / ".DS_Store").write_bytes(b"\0")
    (clean / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    images, others = list_image_files(clean, recursive=True)
    assert images == [clean / "more" / "linked.png", clean / "x.png"] and others == [clean / "notes.txt"]


def test_inputs_keep_their_folder_paths_for_overlays_and_report_problems_in_order(messy_tree):
    search = predict.find_inputs([str(messy_tree), str(messy_tree / "sub" / "a.png")])
    assert [(Path(f.path).relative_to(messy_tree).as_posix(), f.overlay_name, f.problem is not None)
            for f in search.files] == [
        ("a.png", "a.png", False), ("dangling.png", None, True), ("device.png", None, True),
        ("link_dir/linked.png", "link_dir/linked.png", False),
        ("locked", None, True), ("pipe.png", None, True), ("sub/a.png", "sub/a.png", False),
        ("sub/a.png", "a.png", False),  # given by name: its own name
    ]
    lines = search.skipped_lines()
    assert lines[0].startswith("skipped 2 files in the folders that are not images (.txt 2)")
    assert "skipped 3 hidden files or folders (names starting with '.'" in lines[1] and ".DS_Store" in lines[1]
    assert lines[1].endswith("pass one by name to include it")
    assert "skipped 1 link to a folder searched already" in lines[2] and "loop" in lines[2]


def test_overlay_names_keep_apart_files_that_differ_only_by_suffix():
    assert predict.overlay_name("sub/t0004.png") == "sub/t0004.png"
    assert predict.overlay_name("a.jpg") == "a.jpg.png"
    assert predict.overlay_name("a.PNG") == "a.PNG.png"


def test_csv_cells_that_a_spreadsheet_would_run_are_text():
    for cell in ("=1+1.png", "+1", "-1", "@SUM(A1)", "\t=1+1.png", "\r=1+1.png"):
        assert predict._spreadsheet_safe(cell) == "'" + cell
    assert predict._spreadsheet_safe("a=1.png") == "a=1.png" and predict._spreadsheet_safe(0.5) == 0.5


def test_printable_leaves_no_lone_surrogate():
    assert predict.printable(os.fsdecode(b"bad\xff.png")) == "bad\\xff.png"
    assert predict.printable("class \ud800") == "class \\ud800"  # e.g. from a JSON escape: no byte behind it
    record = predict.error_record(os.fsdecode(b"x\xff.png"), "cannot read image 'x\udcff.png'")
    assert (record["path"], record["error"]) == ("x\\xff.png", "cannot read image 'x\\xff.png'")


# -- the command, on the demo bundle ---------------------------------------------------------------


@pytest.fixture(scope="module")
def test_pngs(demo_data, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("pngs")
    paths = []
    for i in range(3):
        paths.append(root / f"t{i:04d}.png")
        Image.fromarray(demo_data["test"].array(i)).save(paths[-1])
    return paths


def run_predict(bundle, *args: str) -> int:
    return main(["predict", str(bundle.root), *args, "--backend", "onnxruntime"])


def test_overlays_that_overlap_the_inputs_are_refused_and_the_images_kept(demo_bundle, test_pngs, tmp_path, capsys):
    images = tmp_path / "same"
    for png in test_pngs:
        (images / "sub").mkdir(parents=True, exist_ok=True)
        (images / png.name).write_bytes(png.read_bytes())
    before = {p: digest(p) for p in images.rglob("*.png")}
    for overlays, relation in ((images, "is the input folder"), (images / "sub", "is inside the input folder"),
                               (images / "overlays", "is inside the input folder"),
                               (tmp_path, "contains the input folder")):
        assert run_predict(demo_bundle, str(images), "--overlays", str(overlays), "-o", str(tmp_path / "r.jsonl")) == 2
        err = capsys.readouterr().err
        assert relation in err and "choose an --overlays folder outside the inputs" in err
    # A file given by name that an overlay could replace, and a link in the input folder to the overlays folder.
    assert run_predict(demo_bundle, str(images / test_pngs[0].name), "--overlays", str(images)) == 2
    assert "contains the input file" in capsys.readouterr().err
    overlays = tmp_path / "ov"
    overlays.mkdir()
    (images / "sub" / "ov_link").symlink_to(overlays, target_is_directory=True)
    assert run_predict(demo_bundle, str(images), "--overlays", str(overlays)) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert {p: digest(p) for p in images.rglob("*.png")} == before
    assert not (tmp_path / "r.jsonl").exists()


def test_records_that_would_overwrite_the_bundle_or_an_input_are_refused(demo_bundle, test_pngs, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle.root, bundle)
    named_input = tmp_path / "same.json"
    named_input.write_bytes(test_pngs[0].read_bytes())
    cases = [
        ([str(test_pngs[0]), "-o", str(bundle / "manifest.json")], "is one of the bundle's own files"),
        ([str(test_pngs[0]), "-o", str(bundle / "guarded.onnx")], "is one of the bundle's own files"),
        ([str(named_input), "-o", str(named_input)], "is one of the inputs: it would be emptied before it is read"),
        ([str(test_pngs[0]), "-o", str(tmp_path / "ov"), "--overlays", str(tmp_path / "ov")], "name the same path"),
    ]
    for args, message in cases:
        assert main(["predict", str(bundle), *args, "--backend", "onnxruntime"]) == 2
        err = capsys.readouterr().err
        assert message in err and "choose another --out file" in err
    assert Guard.load(bundle, backend="onnxruntime")  # still verifies
    # A new file beside the bundle's own harms nothing.
    assert main(["predict", str(bundle), str(test_pngs[0]), "--backend", "onnxruntime", "-o", str(bundle / "r.jsonl"),
                 "--quiet"]) == 0
    assert Guard.load(bundle, backend="onnxruntime")
    assert named_input.read_bytes() == test_pngs[0].read_bytes() and not (tmp_path / "ov").exists()


def test_a_batch_keeps_no_decoded_image(demo_bundle, test_pngs, tmp_path, monkeypatch):
    # A 7000 x 7000 upload is 140 MiB decoded; the batch needs only the model's input (and a small overlay picture).
    import gc
    import weakref

    from edgeshort.runtime import preprocess

    decoded, load = [], preprocess.load_image

    def load_and_watch(*args, **kwargs):
        image = load(*args, **kwargs)
        decoded.append(weakref.ref(image))
        return image

    monkeypatch.setattr(preprocess, "load_image", load_and_watch)
    predict_images = Guard.predict

    def predict_after_the_images_are_gone(self, images, **kwargs):
        if len(images):  # not the empty call that checks the options
            gc.collect()
            assert decoded and all(ref() is None for ref in decoded), "decoded images are still held"
        return predict_images(self, images, **kwargs)

    monkeypatch.setattr(Guard, "predict", predict_after_the_images_are_gone)
    for overlays in ([], ["--overlays", str(tmp_path / "ov")]):
        out = tmp_path / f"r{len(overlays)}.jsonl"
        assert run_predict(demo_bundle, *map(str, test_pngs), "-o", str(out), *overlays) == 0
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(records) == 3 and all(r["error"] is None for r in records)
    assert len(list((tmp_path / "ov").glob("*.png"))) == 3


def test_overlays_mirror_the_input_folders(demo_bundle, test_pngs, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        (folder / "sub").mkdir(parents=True)
    pixels = [Image.open(p) for p in test_pngs]
    pixels[0].save(first / "t0004.png")
    pixels[1].save(first / "sub" / "t0004.png")
    pixels[2].convert("RGB").save(first / "t0004.jpg", quality=95)
    pixels[0].save(second / "t0004.png")  # the same relative path as first/t0004.png: a true collision
    out, overlays = tmp_path / "r.jsonl", tmp_path / "overlays"
    assert run_predict(demo_bundle, str(first), str(second), "-o", str(out), "--overlays", str(overlays)) == 0
    records = {Path(r["path"]).relative_to(tmp_path).as_posix(): r for r in read_jsonl(out)}
    assert {path: Path(r["overlay"]).relative_to(overlays).as_posix() for path, r in records.items()} == {
        "first/t0004.jpg": "t0004.jpg.png", "first/t0004.png": "t0004.png", "first/sub/t0004.png": "sub/t0004.png",
        "second/t0004.png": "t0004-2.png",
    }
    assert "1 overlay got a -2, -3, ... suffix" in capsys.readouterr().err
    assert sorted(p.relative_to(overlays).as_posix() for p in overlays.rglob("*.png")) == [
        "sub/t0004.png", "t0004-2.png", "t0004.jpg.png", "t0004.png"]


def test_folder_problems_are_error_records_and_hidden_files_are_counted(demo_bundle, test_pngs, tmp_path,
                                                                        locked_folders, capsys):
    root = tmp_path / "batch"
    (root / "sub").mkdir(parents=True)
    (root / test_pngs[0].name).write_bytes(test_pngs[0].read_bytes())
    (root / "._t0000.png").write_bytes(b"\0\0AppleDouble")
    (root / ".DS_Store").write_bytes(b"\0")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / test_pngs[1].name).write_bytes(test_pngs[1].read_bytes())
    (root / "link_dir").symlink_to(linked, target_is_directory=True)
    (root / "dangling.png").symlink_to(tmp_path / "gone.png")
    (root / "locked").mkdir()
    (root / "locked" / "x.png").write_bytes(test_pngs[2].read_bytes())
    locked_folders.add(str(root / "locked"))
    out = tmp_path / "r.jsonl"
    assert run_predict(demo_bundle, str(root), "-o", str(out)) == 1
    records = read_jsonl(out)
    assert [(Path(r["path"]).relative_to(root).as_posix(), r["error"] is None) for r in records] == [
        ("dangling.png", False), ("link_dir/t0001.png", True), ("locked", False), ("t0000.png", True)]
    err = capsys.readouterr().err
    assert "2 images predicted, " in err and "2 failed" in err
    assert "skipped 2 hidden files or folders (names starting with '.'" in err and "._t0000.png" in err
    assert "pass one by name to include it" in err


def test_unwritable_overlays_are_refused_before_any_prediction(demo_bundle, test_pngs, tmp_path, monkeypatch,
                                                               capsys):
    overlays = tmp_path / "rootonly"
    overlays.mkdir()
    out = tmp_path / "r.json"

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(overlays))

    from edgeshort.runtime import backends

    monkeypatch.setattr(backends.tempfile, "TemporaryFile", refused)
    assert run_predict(demo_bundle, *map(str, test_pngs), "-o", str(out), "--overlays", str(overlays)) == 2
    err = capsys.readouterr().err
    assert "cannot write the overlays to" in err and "Permission denied" in err
    assert "choose an --overlays folder you can write" in err
    assert not out.exists(), "no empty, valid-looking output is left behind"


def test_an_output_failing_part_way_stops_with_exit_3_and_complete_records(demo_bundle, test_pngs, tmp_path,
                                                                           monkeypatch, capsys):
    write = predict.OverlayWriter.write
    calls = []

    def disk_fills_up(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, *args, **kwargs)

    monkeypatch.setattr(predict.OverlayWriter, "write", disk_fills_up)
    out = tmp_path / "r.json"
    code = run_predict(demo_bundle, *map(str, test_pngs), "-o", str(out), "--overlays", str(tmp_path / "ov"),
                       "--batch-size", "1")
    assert code == 3
    err = capsys.readouterr().err
    assert "stopped after 1 of 3 inputs: cannot write the overlay of" in err and "No space left on device" in err
    assert "free space" in err and "Traceback" not in err
    records = json.loads(out.read_text())  # closed properly: a valid array of the records written
    assert len(records) == 1 and records[0]["error"] is None


def test_records_that_cannot_be_flushed_stop_with_exit_3(demo_bundle, test_pngs, tmp_path, capsys):
    full = tmp_path / "full.jsonl"
    full.symlink_to("/dev/full")  # every write fails with "No space left on device", even for root
    assert run_predict(demo_bundle, *map(str, test_pngs), "-o", str(full)) == 3
    err = capsys.readouterr().err
    assert "No space left on device" in err and "stopped after 0 of 3 inputs" in err  # nothing reached the disk


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_a_disk_filling_up_mid_record_leaves_only_whole_records(tmp_path, suffix):
    """The count a stopped run reports is what the file holds, and a .json array still parses."""
    import csv
    import errno

    from edgeshort.commands.predict import RecordWriter, error_record

    class FillsUp:  # the disk takes `room` more bytes, the last record only in part
        def __init__(self, file, room):
            self.file, self.room = file, room

        def write(self, data):
            if len(data) > self.room:
                self.file.write(bytes(data[: self.room]))
                self.room = 0
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

    out = tmp_path / f"records{suffix}"
    writer = RecordWriter(str(out), ("benign", "malignant"))
    writer._file = FillsUp(writer._file, 700)
    with pytest.raises(OSError, match="No space"):
        for i in range(50):
            writer.write(error_record(f"img_{i}.png", "cannot read image"))
    writer._file.room = 10_000  # removing the cut record frees room for the closing bracket
    writer.close()
    assert 0 < writer.written < 50
    text = out.read_text()
    if suffix == ".json":
        records = json.loads(text)
    elif suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines()]
    else:
        records = list(csv.DictReader(text.splitlines()))
    assert [r["path"] for r in records] == [f"img_{i}.png" for i in range(writer.written)]


def test_split_on_a_bundle_without_split_graphs_is_refused_before_any_prediction(demo_bundle, test_pngs, tmp_path,
                                                                                    capsys):
    import shutil

    from edgeshort.runtime.bundle import SPLIT_GRAPHS, write_manifest

    fused_only = tmp_path / "fused_only"
    shutil.copytree(demo_bundle.root, fused_only)
    manifest = json.loads((fused_only / "manifest.json").read_text())
    for graph in SPLIT_GRAPHS:
        for name in manifest["graphs"].pop(graph).get("files", {}).values():
            for file in (name, name[:-4] + ".bin" if name.endswith(".xml") else None):
                if file:
                    (fused_only / file).unlink()
    write_manifest(fused_only, manifest)
    out = tmp_path / "r.jsonl"
    assert main(["predict", str(fused_only), *map(str, test_pngs), "--split", "--backend", "onnxruntime",
                 "-o", str(out)]) == 2
    assert "exported without" in capsys.readouterr().err and not out.exists()


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = capsys.readouterr().out
    for line in ("0  every input was predicted", "1  some inputs could not be read",
                 "2  bad arguments, bundle or outputs", "3  stopped part-way"):
        assert line in text


def test_a_file_name_that_is_not_utf8_reaches_csv_and_jsonl_with_its_overlay(demo_bundle, test_pngs, tmp_path):
    folder = tmp_path / "enc"
    folder.mkdir()
    raw_name = os.fsencode(folder) + b"/bad\xff.png"
    with open(raw_name, "wb") as fh:
        fh.write(test_pngs[0].read_bytes())
    overlays = tmp_path / "ov"
    assert run_predict(demo_bundle, str(folder), "-o", str(tmp_path / "r.csv"), "--overlays", str(overlays)) == 0
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["path"].endswith("bad\\xff.png") and row["overlay"].endswith("bad\\xff.png")
    assert os.path.exists(os.fsencode(overlays) + b"/bad\xff.png")  # the file itself keeps the input's bytes
    assert run_predict(demo_bundle, str(folder), "-o", str(tmp_path / "r.jsonl"), "--overlays", str(overlays)) == 0
    text = (tmp_path / "r.jsonl").read_text(encoding="utf-8")
    (record,) = read_jsonl(tmp_path / "r.jsonl")
    assert "\\udc" not in text
    for value in record.values():
        if isinstance(value, str):
            value.encode("utf-8")  # a lone surrogate would raise here


# -- the Python API: inputs a web service has ------------------------------------------------------


def png_bytes(seed: int = 0, size: tuple[int, int] = (40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_bytes_and_binary_file_objects_decode_as_files_do(tmp_path):
    data = png_bytes()
    path = tmp_path / "x.png"
    path.write_bytes(data)
    expected = np.asarray(as_pil(path))
    with open(path, "rb") as fh:
        for item in (data, bytearray(data), memoryview(data), io.BytesIO(data), fh):
            np.testing.assert_array_equal(np.asarray(as_pil(item)), expected)
    with pytest.raises(ImageLoadError, match=r"expected an image of at most 100 pixels, got image 3 \(.* bytes\) "
                                             "with 40x40"):
        as_pil(data, max_pixels=100, source="image 3")  # from the header, before decoding
    with pytest.raises(ImageLoadError, match=r"cannot read image \(5 bytes\) \(UnidentifiedImageError"):
        as_pil(b"hello")
    with open(path, encoding="latin-1") as text:
        with pytest.raises(InputError, match=r"expected a binary file object, got a text one; open the file with "
                                             r"open\(path, 'rb'\)"):
            as_pil(text)
    with pytest.raises(InputError, match="encoded image bytes or a binary file object"):
        as_pil(42)


def test_a_truncated_image_already_opened_gives_the_file_loaders_error(tmp_path):
    data = png_bytes(size=(200, 200))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cannot read image .*cut\.png.* \(OSError: image file is truncated"):
        as_pil(truncated)
    with pytest.raises(ImageLoadError, match=r"cannot read image 2 \('.*cut\.png'\) \(OSError: image file is "
                                             "truncated"):
        as_pil(Image.open(truncated), source="image 2")
    with pytest.raises(ImageLoadError, match=r"cannot read image \(OSError: image file is truncated"):
        as_pil(Image.open(io.BytesIO(data[: len(data) // 2])))


def test_guard_predicts_uploads_and_names_a_truncated_one(demo_bundle, test_pngs):
    from edgeshort.runtime import Guard

    guard = Guard.load(demo_bundle.root, backend="onnxruntime")
    data = test_pngs[0].read_bytes()
    expected = guard.predict(test_pngs[0]).logits
    with open(test_pngs[0], "rb") as fh:
        results = guard.predict([data, io.BytesIO(data), fh])
    for result in results:
        np.testing.assert_array_equal(result.logits, expected)
    big = Image.open(io.BytesIO(png_bytes(size=(600, 600))))  # on the preprocessing threads, not yet decoded
    twice = guard.predict([big, big])  # listed twice: decoded once, not by two threads at a time
    np.testing.assert_array_equal(twice[0].logits, twice[1].logits)
    upload = io.BytesIO(png_bytes(size=(600, 600)))  # one upload listed four times: one read position
    four = guard.predict([upload] * 4)
    assert all(np.array_equal(r.logits, four[0].logits) for r in four) and upload.tell() == 0
    cut = Image.open(io.BytesIO(data[: len(data) // 2]))
    big = Image.open(io.BytesIO(png_bytes(size=(600, 600))))
    with pytest.raises(ImageLoadError, match=r"cannot read image 1 \(OSError: image file is truncated"):
        guard.predict([big, cut])


def test_map_weights_is_named_in_every_record(demo_bundle, test_pngs, tmp_path):
    out = tmp_path / "r.jsonl"
    assert run_predict(demo_bundle, *map(str, test_pngs), "--map-weights", "-o", str(out), "--quiet") == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(r["runtime"].endswith(" mapped-weights") for r in records)

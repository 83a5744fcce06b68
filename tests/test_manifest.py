"""Images listed in a CSV: labels, artefact groups and masks load as the in-memory data they came from."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeshort.data import (
    dataset_from_source,
    load_images,
    load_manifest,
    load_unlabelled,
    merge_classes,
    parse_class_map,
)
from edgeshort.errors import ImageLoadError, InputError


def write_listed(data, folder, rows=None, mask_column=True, group_column=True, label_text=None):
    """Write `data`'s images (and artefact masks) as PNGs and a CSV listing them; returns the CSV path.

    `label_text(i)` writes another label than the class name (e.g. a diagnosis to merge)."""
    (folder / "img").mkdir(parents=True)
    (folder / "masks").mkdir()
    header = ["path", "label"] + (["group"] if group_column else []) + (["mask"] if mask_column else [])
    lines = []
    for i in range(len(data)) if rows is None else rows:
        data.image(i).save(folder / "img" / f"{i:04d}.png")
        line = [f"img/{i:04d}.png", label_text(i) if label_text else data.class_names[data.labels[i]]]
        if group_column:
            line.append("yes" if data.groups[i] else "no")
        if mask_column:
            if data.masks[i].any():
                Image.fromarray(data.masks[i].astype(np.uint8) * 255).save(folder / "masks" / f"{i:04d}.png")
                line.append(f"masks/{i:04d}.png")
            else:
                line.append("")
        lines.append(line)
    path = folder / "test.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *lines])
    return path


def test_a_listed_test_set_evaluates_as_the_in_memory_one(demo_result, demo_data, tmp_path):
    test = demo_data["test"].subset(np.arange(0, 800, 4))
    listed = load_images(write_listed(test, tmp_path), demo_result.class_names)

    assert listed.class_names == test.class_names and len(listed) == 200
    assert np.array_equal(listed.labels, test.labels) and np.array_equal(listed.groups, test.groups)
    assert all(np.array_equal(listed.array(i), test.array(i)) for i in range(0, 200, 17))
    prep, grid = demo_result.adapter.preprocessing, demo_result.grid
    assert np.array_equal(listed.patch_masks(prep, grid), test.patch_masks(prep, grid))

    # The detector judges the listed files exactly as the arrays they were written from.
    from_files = copy.copy(demo_result).evaluate(listed, out=tmp_path / "files")
    from_arrays = copy.copy(demo_result).evaluate(test, out=tmp_path / "arrays")
    for key in ("wga_original", "wga_ablated", "wga_dfr", "aga_dfr", "patch_precision", "patch_recall"):
        assert from_files[key] == from_arrays[key], key
    assert from_files["patch_recall"] > 0.8 and from_files["wga_ablated"] > from_files["wga_original"]
    # An image listed twice is evaluated twice, and the run's test warnings say so.
    listing = write_listed(test, tmp_path / "repeated")
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join([*lines, lines[1]]) + "\n")
    repeated = copy.copy(demo_result).evaluate(load_images(listing, demo_result.class_names), out=tmp_path / "twice")
    assert repeated["test_size"] == 201 and repeated["test_warnings"][0].startswith(
        f"{listing}: 1 image is listed more than once")
    # As a validation listing, the fit's warnings carry it (the run folder, report and bundle show those).
    from dataclasses import replace

    from edgeshort.detect import ShortcutDetector

    fitted = ShortcutDetector(replace(demo_result.config, progress=False)).fit(
        demo_result.adapter.model, load_images(listing, demo_result.class_names))
    assert fitted.metrics["warnings"][0].startswith(f"{listing}: 1 image is listed more than once")

    # A run records where its test set came from, and the report reloads it from there.
    again = dataset_from_source(from_files["test_source"], listed.class_names)
    assert np.array_equal(again.labels, listed.labels) and [str(p) for p in again.sources] == [
        str(p) for p in listed.sources]


def test_isic_one_hot_ground_truth_lists_image_ids(tmp_path):
    (tmp_path / "images").mkdir()
    rows = [("ISIC_0000000", 0, 1), ("ISIC_0000001", 1, 0), ("ISIC_0000002", 0, 1)]
    for name, *_ in rows:
        Image.new("RGB", (12, 10), (200, 120, 90)).save(tmp_path / "images" / f"{name}.jpg")
    gt = tmp_path / "ISIC_GroundTruth.csv"
    gt.write_text("image,MEL,NV\n" + "".join(f"{n},{a:.1f},{b:.1f}\n" for n, a, b in rows), encoding="utf-8-sig")

    data = load_manifest(gt, image_root=tmp_path / "images")
    assert data.class_names == ("MEL", "NV")  # the columns' order
    assert data.labels.tolist() == [1, 0, 1] and data.groups is None and data.masks is None
    assert [p.name for p in data.sources] == ["ISIC_0000000.jpg", "ISIC_0000001.jpg", "ISIC_0000002.jpg"]
    in_model_order = load_manifest(gt, ["NV", "MEL"], image_root=tmp_path / "images")
    assert in_model_order.labels.tolist() == [0, 1, 0]
    again = dataset_from_source(in_model_order.source, in_model_order.class_names)
    assert np.array_equal(again.labels, in_model_order.labels)


def test_isic_diagnoses_merge_into_the_models_classes(tmp_path):
    (tmp_path / "images").mkdir()
    rows = [("ISIC_0000000", "NV"), ("ISIC_0000001", "MEL"), ("ISIC_0000002", "BKL"), ("ISIC_0000003", "BCC")]
    for name, _ in rows:
        Image.new("RGB", (12, 10), (200, 120, 90)).save(tmp_path / "images" / f"{name}.jpg")
    columns = ["MEL", "NV", "BCC", "BKL", "UNK"]  # ISIC 2019's order, shortened; no image is UNK
    gt = tmp_path / "ISIC_GroundTruth.csv"
    gt.write_text("image," + ",".join(columns) + "\n" + "".join(
        f"{n}," + ",".join("1.0" if c == dx else "0.0" for c in columns) + "\n" for n, dx in rows))
    diagnoses = load_manifest(gt, image_root=tmp_path / "images")
    class_map = parse_class_map("MEL=malignant, BCC=malignant, NV=benign, BKL=benign")

    merged = merge_classes(diagnoses, class_map, ["benign", "malignant"])
    assert merged.class_names == ("benign", "malignant") and merged.labels.tolist() == [0, 1, 0, 1]
    assert [p.name for p in merged.sources] == [p.name for p in diagnoses.sources]
    assert diagnoses.class_names == tuple(columns)  # the dataset merged from is unchanged
    # Runs record the merge, so the report and export reload the merged labels.
    assert np.array_equal(dataset_from_source(merged.source, merged.class_names).labels, merged.labels)
    # Without the model's order the merged classes sort by name; a model listing them otherwise reorders.
    assert merge_classes(diagnoses, class_map).class_names == ("benign", "malignant")
    assert merge_classes(diagnoses, class_map, ["malignant", "benign"]).labels.tolist() == [1, 0, 1, 0]

    # The CLI's --image-root: the ground-truth CSV away from its image folder, merged in one call.
    from edgeshort.cli import build_parser
    from edgeshort.data import load_images

    args = build_parser(only="detect").parse_args(
        ["detect", "--model", "m.pt", "--data", str(gt), "--image-root", str(tmp_path / "images"), "-o", "run"])
    loaded = load_images(args.data, ["benign", "malignant"], class_map, args.image_root)
    assert loaded.labels.tolist() == [0, 1, 0, 1] and loaded.sources[0].parent == (tmp_path / "images").resolve()
    with pytest.raises(InputError, match="is a folder; leave it out"):
        load_images(tmp_path / "images", image_root=tmp_path)

    with pytest.raises(InputError, match=r"does not map: BCC \(1 image\), BKL \(1 image\); map each"):
        merge_classes(diagnoses, {"MEL": "malignant", "NV": "benign"})
    with pytest.raises(InputError, match=r"does not map: MEL \(1 image\)"):  # a misspelt class
        merge_classes(diagnoses, {"MELL": "malignant", "BCC": "malignant", "NV": "benign", "BKL": "benign"})
    assert merge_classes(diagnoses, {**class_map, "SCC": "malignant"}).labels.tolist() == [0, 1, 0, 1]  # no SCC here
    # A class already named as one of the model's needs no entry: a test listing spelling one class otherwise
    # maps that one. Without the model's classes, every class still needs its entry.
    kept = merge_classes(diagnoses, {"MEL": "BCC", "NV": "BKL"}, ["BCC", "BKL"])
    assert kept.class_names == ("BCC", "BKL") and kept.labels.tolist() == [1, 0, 1, 0]
    with pytest.raises(InputError, match=r"does not map: BCC \(1 image\), BKL \(1 image\)"):
        merge_classes(diagnoses, {"MEL": "BCC", "NV": "BKL"})
    with pytest.raises(InputError, match=r"sends classes to \['malign'\], which are not among the classes"):
        merge_classes(diagnoses, {**class_map, "MEL": "malign"}, ["benign", "malignant"])
    with pytest.raises(InputError, match="expected the class map as DATA=MODEL pairs"):
        parse_class_map("MEL:malignant")
    with pytest.raises(InputError, match=r"\['NV='\] are not DATA=MODEL"):
        parse_class_map("MEL=malignant,NV=")
    with pytest.raises(InputError, match="gives 'MEL' twice"):
        parse_class_map("MEL=malignant,MEL=benign")


def test_other_column_names_are_given_by_role(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    listing = tmp_path / "list.csv"
    listing.write_text("scan,finding,sticker\na.png,effusion,0\nb.png,normal,1\n")
    with pytest.raises(InputError, match=r"found no image column among \['scan', 'finding', 'sticker'\].*columns="):
        load_manifest(listing)
    with pytest.raises(InputError) as caught:
        load_manifest(listing, columns={"image": "scan"})
    assert ("rename the label column's header to 'label', or name it (CLI: --columns label=HEADER, for detect's "
            "--eval --eval-columns; Python: columns={'label': ...})") in str(caught.value)
    data = load_manifest(listing, columns={"image": "scan", "label": "finding", "group": "sticker"})
    assert data.class_names == ("effusion", "normal") and data.groups.tolist() == [0, 1]
    assert dataset_from_source(data.source).groups.tolist() == [0, 1]
    listing.write_text("path,label\na.png,3\nb.png,01\n")  # integer labels are the model's output indices
    assert load_manifest(listing).class_names == ("0", "1", "2", "3") and load_manifest(listing).labels.tolist() == [3, 1]
    for separator in (";", "\t"):  # spreadsheet exports
        listing.write_text(f"path{separator}label\na.png{separator}x\nb.png{separator}y\n")
        assert load_manifest(listing).labels.tolist() == [0, 1]


def test_integer_labels_are_output_indices_the_class_names_name(tmp_path):
    for name in ("ISIC_0015719", "ISIC_0052212", "ISIC_0068279"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.jpg")
    # ISIC 2020's ground truth, as downloaded: image ids without a suffix, 0/1 targets.
    gt = tmp_path / "ISIC_2020_Training_GroundTruth.csv"
    gt.write_text(
        "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target\n"
        "ISIC_0015719,IP_3075186,female,45.0,upper extremity,unknown,benign,0\n"
        "ISIC_0052212,IP_2842074,female,50.0,lower extremity,nevus,benign,0\n"
        "ISIC_0068279,IP_6890425,female,45.0,head/neck,melanoma,malignant,1\n"
    )
    data = load_manifest(gt)
    assert data.class_names == ("0", "1") and data.labels.tolist() == [0, 0, 1]
    assert [p.name for p in data.sources] == ["ISIC_0015719.jpg", "ISIC_0052212.jpg", "ISIC_0068279.jpg"]
    named = load_images(gt, ["benign", "malignant"])  # --classes benign,malignant
    assert named.class_names == ("benign", "malignant") and named.labels.tolist() == [0, 0, 1]
    assert dataset_from_source(named.source, named.class_names).labels.tolist() == [0, 0, 1]
    assert load_images(gt, ["malignant", "benign"]).labels.tolist() == [0, 0, 1]  # indices, not names
    # Classes named by the digits themselves map by name: an index reading would flip them silently.
    assert load_images(gt, ["1", "0"]).labels.tolist() == [1, 1, 0]
    assert load_images(gt, ["0", "1"]).labels.tolist() == [0, 0, 1]
    with pytest.raises(InputError, match=r"rows \[4\] have integer labels beyond the 1 classes \['benign'\].*row 4: 1"):
        load_images(gt, ["benign"])


def test_bad_listings_are_named(tmp_path):
    for name, color in (("a.png", (10, 20, 30)), ("b.png", (30, 20, 10))):
        Image.new("RGB", (16, 16), color).save(tmp_path / name)

    def listing(text: str):
        path = tmp_path / "list.csv"
        path.write_text(text)
        return path

    with pytest.raises(InputError, match="expected a CSV file at .* does not exist"):
        load_images(tmp_path / "nowhere.csv")
    with pytest.raises(InputError, match="empty file"):
        load_images(listing(""))
    with pytest.raises(InputError, match=r"1 of 2 listed images do not exist .*\['c.png'\]; paths are relative"):
        load_images(listing("path,label\na.png,x\nc.png,y\n"))
    with pytest.raises(InputError, match=r"rows \[3\] have an empty 'label'"):
        load_images(listing("path,label\na.png,x\nb.png,\n"))
    with pytest.raises(InputError, match=r"labels \['y'\] are not among the classes \['x'\]"):
        load_images(listing("path,label\na.png,x\nb.png,y\n"), ["x"])
    with pytest.raises(InputError, match="no label column .* and no one-hot class columns"):
        load_images(listing("path,note\na.png,blue\nb.png,red\n"))
    with pytest.raises(InputError, match=r"exactly one 1 per row among the class columns \['p', 'q'\], rows \[3\]"):
        load_images(listing("path,p,q\na.png,1,0\nb.png,1,1\n"))
    with pytest.raises(InputError, match=r"row 3: expected 0/1 .* in column 'group', got 'maybe'"):
        load_images(listing("path,label,group\na.png,x,1\nb.png,y,maybe\n"))
    with pytest.raises(InputError, match=r"row 2: mask 'm.png' does not exist"):
        load_images(listing("path,label,mask\na.png,x,m.png\nb.png,y,\n"))
    # csv gives None for a short row's fields and files a long row's extras under None.
    with pytest.raises(InputError, match=r"rows \[3\] have fewer fields .* row 3 has no value for 'label'"):
        load_images(listing("path,label\na.png,x\nb.png\n"))
    with pytest.raises(InputError, match=r"rows \[2\] have fewer fields .* row 2 has no value for 'group', 'mask'"):
        load_images(listing("path,label,group,mask\na.png,x\nb.png,y,0,\n"))
    with pytest.raises(InputError, match=r"rows \[3\] have more fields .* row 3 ends with \['y'\]; quote values"):
        load_images(listing("path,label\na.png,x\nb.png,x,y\n"))
    with pytest.raises(InputError, match=r"expected a column 'dx' for the label"):
        load_manifest(listing("path,label\na.png,x\n"), columns={"label": "dx"})
    with pytest.raises(InputError, match=r"column roles among .*got \['lable'\]"):
        load_manifest(listing("path,label\na.png,x\n"), columns={"lable": "label"})
    # A mask must cover its own image's pixels, and an unreadable one is named.
    Image.new("L", (20, 16)).save(tmp_path / "wide.png")
    data = load_images(listing("path,label,mask\na.png,x,wide.png\nb.png,y,\n"))
    with pytest.raises(InputError, match="mask .*wide.png' is 20x16 but its image .*a.png is 16x16"):
        data.patch_masks(_prep(), (2, 2))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = load_images(listing("path,label,mask\na.png,x,broken.png\nb.png,y,\n"))
    with pytest.raises(ImageLoadError, match="cannot read image .*broken.png"):
        data.patch_masks(_prep(), (2, 2))


def _prep():
    from edgeshort.runtime.preprocess import Preprocessing

    return Preprocessing(size=(16, 16))


def test_detect_command_reads_csv_listings(demo_vit, demo_data, demo_result, tmp_path):
    """`edgeshort detect --data val.csv --eval test.csv`: the demo's figures, from files a CSV lists."""
    import json

    from edgeshort.cli import main
    from edgeshort.models.loading import save_checkpoint

    model = save_checkpoint(demo_vit, tmp_path / "model.pt")
    # Listed by diagnosis, as hospital exports are: benign lesions as two diagnoses, merged back.
    val, test = demo_data["val"], demo_data["test"]
    val_csv = write_listed(val, tmp_path / "val", mask_column=False, label_text=lambda i: ("NV", "MEL")[val.labels[i]])
    test_csv = write_listed(test, tmp_path / "test", label_text=lambda i: ("BKL" if i % 2 else "NV", "MEL")[
        test.labels[i]])
    # The validation export has headers of its own, named by --columns; the test listing keeps the usual ones.
    val_csv.write_text(val_csv.read_text().replace("path,label,group", "File Name,finding,has_patch", 1))
    settings = ["--num-selected", "50", "--knn-samples", "200", "--knn-negatives", "600"]  # the demo's
    assert main(["detect", "--model", str(model), "--data", str(val_csv), "--eval", str(test_csv),
                 "--columns", "image=file name,label=finding,group=has_patch",
                 "--class-map", "MEL=malignant,NV=benign,BKL=benign", "-o", str(tmp_path / "run"), "--quiet",
                 *settings]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("shortcut_cluster_group_purity", "patch_precision", "patch_recall", "wga_original", "wga_ablated",
                "wga_dfr"):
        assert metrics[key] == pytest.approx(demo_result.metrics[key], abs=1e-9), key
    assert metrics["test_source"].startswith("merged:")
    assert np.array_equal(dataset_from_source(metrics["test_source"], demo_result.class_names).labels, test.labels)
    # The cluster pictures name the validation file each one shows.
    samples = json.loads((tmp_path / "run" / "heatmaps" / "cluster_0" / "samples.json").read_text())
    with np.load(tmp_path / "run" / "clusters.npz") as arrays:
        assert [s["index"] for s in samples] == arrays["selected_0"][:len(samples)].tolist()
    assert len(samples) == 8 and all(Path(s["file"]).is_file() for s in samples)


def test_report_evaluates_a_listing_by_its_own_headers_and_says_how_to_again(demo_result, demo_data, tmp_path,
                                                                              capsys):
    """A hospital export keeps its headers: `--columns` names them, and the run records them for the next time."""
    import json
    import shlex
    import shutil

    from edgeshort.cli import main
    from edgeshort.report.html import _eval_argument

    run = tmp_path / "run"
    shutil.copytree(demo_result.run_dir, run)
    listing = write_listed(demo_data["test"], tmp_path / "test", rows=range(0, 800, 10))
    listing.write_text(listing.read_text().replace("path,label,group,mask", "img_file,finding,has_patch,outline", 1))
    assert main(["report", str(run), "--eval", str(listing), "--quiet"]) == 2
    assert "found no image column" in capsys.readouterr().err
    columns = "image=img_file,label=finding,group=has_patch,mask=outline"
    assert main(["report", str(run), "--columns", columns, "--quiet"]) == 2  # nothing to apply them to
    assert ("--columns describes the test images of --eval, and --eval was not given; add --eval TEST_IMAGES, "
            "or leave it out") in capsys.readouterr().err
    assert main(["report", str(run), "--eval", str(listing), "--columns", columns, "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "worst group" in said  # --quiet drops the progress bars, not the results
    assert "replaced the run's earlier evaluation on synthetic:test" in said and "(800 images)" in said
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_size"] == 80 and metrics["patch_recall"] is not None and metrics["wga_ablated"] is not None
    again = _eval_argument(metrics["test_source"])
    assert again == f"{shlex.quote(str(listing))} --columns {columns}"
    assert main(["report", str(run), "--eval", *shlex.split(again), "--quiet"]) == 0  # the report's hint works
    assert f"replaced the run's earlier evaluation on {metrics['test_source']} (80 images)" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["wga_ablated"] == metrics["wga_ablated"]
    with pytest.raises(InputError, match=r"column names apply to a CSV listing, .* is a folder; leave it out \(--columns\)"):
        load_images(tmp_path / "test" / "img", columns={"image": "file_name"})
    # Export's calibration listing takes them too (labels unread), and refuses them without one.
    assert len(load_unlabelled(listing, columns={"image": "Img_File"})) == 80  # any case, as the usual names
    assert main(["export", str(run), "-o", str(tmp_path / "b"), "--columns", columns, "--quiet"]) == 2
    assert "--columns describes the --data listing, and --data was not given" in capsys.readouterr().err
    assert main(["export", str(run), "-o", str(tmp_path / "b"), "--image-root", str(tmp_path), "--columns", columns,
                 "--quiet"]) == 2
    assert ("--image-root and --columns describe the --data listing, and --data was not given; add --data "
            "CALIBRATION.csv, or leave them out (the run's own images") in capsys.readouterr().err
    assert main(["export", str(run), "-o", str(tmp_path / "b"), "--int8-calibration-size", "50", "--quiet"]) == 2
    assert ("--int8-calibration-size describes INT8's calibration, and --int8 was not given; add --int8, "
            "or leave it out") in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["report", str(run), "--eval", str(listing), "--columns", "file_name", "--quiet"]) == 2
    assert "expected the columns as ROLE=HEADER pairs" in capsys.readouterr().err
    # Artefact labels under a header no role reads are named, with the way to read them.
    assert main(["report", str(run), "--eval", str(listing), "--columns", "image=img_file,label=finding", "--quiet"]) == 0
    assert ("Columns of the test listing that are not read: has_patch, outline. If one holds artefact labels (1 = the "
            "image carries it), name it: --columns group=HEADER") in capsys.readouterr().out
    blank = listing.parent / "blank.csv"
    lines = listing.read_text().splitlines()
    cells = lines[1].split(",")
    blank.write_text("\n".join([lines[0], ",".join([*cells[:2], "", *cells[3:]]), *lines[2:]]) + "\n")
    assert main(["report", str(run), "--eval", str(blank), "--columns", columns, "--quiet"]) == 2
    assert "row 2: column 'has_patch' is empty, and artefact labels are needed for every image or none" in \
        capsys.readouterr().err


def test_images_listed_twice_are_named_in_a_warning(tmp_path, caplog):
    """Each listing counts as an image of its own (in clusters, verdict and accuracy), so repeats are named."""
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\na.png,x\nb.png,y\nsub/../a.png,x\nc.png,y\nb.png,y\n")
    (tmp_path / "sub").mkdir()
    with caplog.at_level("WARNING", logger="edgeshort.data.manifest"):
        data = load_manifest(listing)
    assert len(data) == 5  # kept as listed: nothing is dropped
    assert data.load_warnings == (caplog.records[0].getMessage(),)  # a run's warnings carry it too
    assert [r.getMessage() for r in caplog.records] == [
        f"{listing}: 2 images are listed more than once (e.g. 'a.png' on rows 2, 4); each listing counts as an image "
        "of its own in clusters, verdict and accuracy: remove the repeats"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="edgeshort.data.manifest"):
        load_manifest(listing, labelled=False)  # an export's calibration listing
    assert caplog.records[0].getMessage().endswith("as an image of its own in the calibration and its checks: remove "
                                                   "the repeats")
    caplog.clear()
    listing.write_text("path,label\na.png,x\nb.png,y\n")
    with caplog.at_level("WARNING", logger="edgeshort.data.manifest"):
        load_manifest(listing)
    assert caplog.records == []

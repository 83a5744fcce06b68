"""Synthetic shortcut data: deterministic, masks exact, splits as configured; folders round-trip."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from edgeshort.data import (
    ImageDataset,
    SplitSpec,
    SyntheticConfig,
    generate,
    generate_split,
    load_images,
    write_seed_layout,
)
from edgeshort.data.synthetic import render_image
from edgeshort.errors import InputError
from edgeshort.runtime.preprocess import Preprocessing

SMALL = SyntheticConfig().with_sizes(60, 40, 40)


@pytest.mark.parametrize("artefact", ["patch", "ruler"])
def test_same_seed_same_arrays_other_seed_differs(artefact):
    cfg = SyntheticConfig(artefact=artefact).with_sizes(20, 10, 10)
    a, b = generate_split(cfg, "val"), generate_split(cfg, "val")
    assert np.array_equal(a.sources, b.sources) and np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.groups, b.groups)
    other = generate_split(SyntheticConfig(artefact=artefact, seed=1).with_sizes(20, 10, 10), "val")
    assert not np.array_equal(a.sources, other.sources)


@pytest.mark.parametrize("artefact", ["patch", "ruler"])
def test_mask_covers_exactly_the_drawn_artefact(artefact):
    cfg = SyntheticConfig(artefact=artefact)
    for index in range(12):
        label = index % 2
        with_art, mask = render_image(cfg, "test", index, label, True)
        without, empty = render_image(cfg, "test", index, label, False)
        assert not empty.any()
        changed = (with_art != without).any(axis=-1)
        assert mask.sum() > 20
        assert not (changed & ~mask).any(), "pixels outside the mask were changed"
        assert changed[mask].mean() > 0.99, "mask claims pixels the artefact did not change"


def test_split_correlations_follow_the_config():
    cfg = SyntheticConfig(train=SplitSpec(2000, (0.9, 0.0)), val=SplitSpec(10, (0.5, 0.1)), test=SplitSpec(400, (0.5, 0.5)))
    data = generate(cfg.with_sizes(2000, 10, 400))
    train, test = data["train"], data["test"]
    benign = train.labels == 0
    assert abs(train.groups[benign].mean() - 0.9) < 0.03
    assert train.groups[~benign].sum() == 0
    cells = np.bincount(test.labels * 2 + test.groups, minlength=4)
    assert cells.tolist() == [100, 100, 100, 100]
    assert (test.masks.any(axis=(1, 2)) == test.groups.astype(bool)).all()


def test_patch_masks_follow_the_centre_crop():
    """Truth masks go through the model's own geometry: an artefact the crop cuts away flags no token."""
    images = np.zeros((2, 40, 80, 3), np.uint8)
    masks = np.zeros((2, 40, 80), bool)
    masks[0, :, :10] = True  # the left strip, outside a centre crop
    masks[1, 16:24, 36:44] = True  # the centre
    data = ImageDataset.from_arrays(images, [0, 1], ("a", "b"), masks=masks)
    cropped = data.patch_masks(Preprocessing(size=(32, 32), crop_pct=1.0), (4, 4))
    assert not cropped[0].any()
    assert cropped[1, 1:3, 1:3].all() and cropped[1].sum() == 4
    assert data.patch_masks(Preprocessing(size=(32, 32)), (4, 4))[0, :, 0].all()  # stretched, the strip stays


def test_patch_masks_follow_the_grid():
    data = generate_split(SMALL, "test")
    grid = data.patch_masks(Preprocessing(size=(64, 64)), (8, 8))
    assert grid.shape == (40, 8, 8)
    i = int(np.flatnonzero(data.groups)[0])
    ys, xs = np.nonzero(data.masks[i])
    expected = np.zeros((8, 8), bool)
    expected[ys // 8, xs // 8] = True
    assert np.array_equal(grid[i], expected)
    assert not grid[data.groups == 0].any()


def test_seed_layout_round_trip(tmp_path):
    data = generate(SyntheticConfig().with_sizes(4, 12, 8))
    write_seed_layout({"val": data["val"], "test": data["test"]}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_w_patches", "test_wo_patches", "val_w_patches", "val_wo_patches"]
    assert sorted(p.name for p in (tmp_path / "test_w_patches").iterdir()) == ["benign", "malignant"]
    loaded = load_images(tmp_path / "test")
    assert len(loaded) == 8 and loaded.class_names == ("benign", "malignant")
    order = np.lexsort((data["test"].labels, data["test"].groups))
    assert sorted(zip(loaded.groups.tolist(), loaded.labels.tolist())) == sorted(
        zip(data["test"].groups[order].tolist(), data["test"].labels[order].tolist())
    )
    # PNG is lossless: every written image comes back bit-identical.
    originals = {data["test"].array(i).tobytes() for i in range(8)}
    assert {loaded.array(i).tobytes() for i in range(8)} == originals
    folder = load_images(tmp_path / "val_w_patches")
    assert folder.groups is None and len(folder) == int(data["val"].groups.sum())
    # A (class, artefact) cell may be empty in the seed layout (ISIC has no patched malignant lesion).
    for image in (tmp_path / "test_w_patches" / "malignant").iterdir():
        image.unlink()
    cells = load_images(tmp_path / "test")
    assert len(cells) == 8 - int(((data["test"].groups == 1) & (data["test"].labels == 1)).sum())
    # So may a whole group: a split without artefacts has no `_w_patches` folder, or an empty one.
    shutil.rmtree(tmp_path / "test_w_patches")
    clean = load_images(tmp_path / "test")
    assert len(clean) == int((data["test"].groups == 0).sum()) and not clean.groups.any()
    (tmp_path / "test_w_patches").mkdir()
    assert len(load_images(tmp_path / "test")) == len(clean)
    shutil.rmtree(tmp_path / "test_wo_patches")  # every image with the artefact: found by the other folder
    (tmp_path / "test_w_patches" / "benign").mkdir()
    shutil.copy(next((tmp_path / "val_w_patches").rglob("*.png")), tmp_path / "test_w_patches" / "benign")
    assert load_images(tmp_path / "test").groups.tolist() == [1]
    shutil.rmtree(tmp_path / "test_w_patches")
    with pytest.raises(InputError, match="expected an image folder at"):
        load_images(tmp_path / "test")


def test_class_order_follows_the_model_when_given(tmp_path):
    from edgeshort.data import as_dataset, dataset_from_source

    data = generate(SyntheticConfig().with_sizes(4, 12, 8))
    write_seed_layout({"test": data["test"]}, tmp_path)
    in_sorted_order = load_images(tmp_path / "test")
    in_model_order = load_images(tmp_path / "test", ["malignant", "benign"])
    assert in_model_order.class_names == ("malignant", "benign")
    assert np.array_equal(in_model_order.labels, 1 - in_sorted_order.labels)
    # Reloading a run's data from its recorded source keeps the run's order (seed layout and folder).
    for dataset in (in_model_order, load_images(tmp_path / "test_w_patches", ["malignant", "benign"])):
        again = dataset_from_source(dataset.source, dataset.class_names)
        assert again.class_names == dataset.class_names and np.array_equal(again.labels, dataset.labels)
    # A dataset in another order is renumbered by class name, not by position.
    renumbered = as_dataset(in_sorted_order, ("malignant", "benign"))
    assert np.array_equal(renumbered.labels, in_model_order.labels)
    assert renumbered.groups is in_sorted_order.groups and in_sorted_order.class_names == ("benign", "malignant")
    with pytest.raises(InputError, match=r"\['benign'\] not among them; map them to the model's classes \(--class-map"):
        as_dataset(in_sorted_order, ("malignant", "nevus"))
    # Names that differ only in case get the rename that fixes them, for a dataset and for a CSV's labels.
    with pytest.raises(InputError, match=r"they differ only in case: rename the data's with --class-map "
                                         r"benign=Benign,malignant=Malignant \(Python: load_images\(\.\.\., class_map="):
        as_dataset(in_sorted_order, ("Benign", "Malignant"))
    listing = tmp_path / "site.csv"
    listing.write_text("path,label\n" + "".join(f"{p},{'Benign' if i % 2 else 'Malignant'}\n"
                                                for i, p in enumerate(in_sorted_order.sources[:4])))
    with pytest.raises(InputError, match=r"labels \['Benign', 'Malignant'\] are not among the classes \['benign', "
                                         r"'malignant'\]; they differ only in case: rename the data's with --class-map "
                                         r"Benign=benign,Malignant=malignant"):
        load_images(listing, ["benign", "malignant"])
    assert load_images(listing, ["benign", "malignant"], class_map={"Benign": "benign", "Malignant": "malignant"})
    with pytest.raises(InputError, match=r"is not one of the classes .*--class-map benign=malignant,\.\.\..*pass class names that include it"):
        load_images(tmp_path / "test", ["malignant"])
    with pytest.raises(InputError, match="expected at least one class name, got none"):
        load_images(tmp_path / "test", [])
    with pytest.raises(InputError, match="distinct class names"):
        load_images(tmp_path / "test_w_patches", ["benign", "benign"])


def test_bad_input_is_named(tmp_path):
    with pytest.raises(InputError, match="expected artefact in"):
        SyntheticConfig(artefact="sticker")
    with pytest.raises(InputError, match="does not exist"):
        load_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="one sub-folder per class"):
        load_images(tmp_path / "empty")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "scan.png")  # a site's unlabelled images, flat
    with pytest.raises(InputError, match=r"found none; it holds images without class folders, so without labels: list "
                                         r"them with their labels in a CSV \(path,label\), or predict them instead"):
        load_images(tmp_path / "empty")
    from edgeshort.data import ImageDataset

    with pytest.raises(InputError, match="one label per image"):
        ImageDataset.from_arrays(np.zeros((3, 8, 8, 3), np.uint8), [0, 1], ["a", "b"])
    with pytest.raises(InputError, match=r"expected labels in \[0, 1\]"):
        ImageDataset.from_arrays(np.zeros((2, 8, 8, 3), np.uint8), [0, 2], ["a", "b"])
    # Class names label every record and bundle: two alike, or an empty one, would leave answers ambiguous.
    for names in (["a", "a"], ["", "b"], [" ", "b"]):
        with pytest.raises(InputError, match="expected distinct, non-empty class names"):
            ImageDataset.from_arrays(np.zeros((2, 8, 8, 3), np.uint8), [0, 1], names)
    assert ImageDataset.from_arrays(np.zeros((2, 8, 8, 3), np.uint8), [0, 1], [0, 1]).class_names == ("0", "1")
    # A group other than 0 / 1 would fall out of every (class, group) cell and out of worst-group accuracy.
    two = np.zeros((2, 8, 8, 3), np.uint8)
    for groups, said in (([1, 2], "['2']"), ([0, 0.5], "['0.5']"), (["ruler", "none"], "['none', 'ruler']"),
                         ([1, None], "['None']")):
        with pytest.raises(InputError, match=re.escape(f"expected group labels 0 (no artefact) or 1 (artefact), got "
                                                       f"{said}; map them to 0 / 1")):
            ImageDataset.from_arrays(two, [0, 1], ["a", "b"], groups=groups)
    for groups in ([True, False], [1.0, 0.0], np.array([1, 0], np.uint8)):
        assert ImageDataset.from_arrays(two, [0, 1], ["a", "b"], groups=groups).groups.tolist() == [1, 0]


def test_recorded_folder_sources_reload_from_another_directory(tmp_path, monkeypatch):
    from pathlib import Path

    from edgeshort.data import dataset_from_source

    data = generate(SyntheticConfig().with_sizes(4, 12, 8))
    write_seed_layout({"test": data["test"]}, tmp_path / "run-a" / "data")
    # Elsewhere, the same relative path holds other images: a relative source would load those.
    write_seed_layout({"test": data["val"]}, tmp_path / "run-b" / "data")
    monkeypatch.chdir(tmp_path / "run-a")
    datasets = [load_images("data/test_w_patches", ["malignant", "benign"]), load_images("data/test")]
    monkeypatch.chdir(tmp_path / "run-b")
    for dataset in datasets:
        assert Path(dataset.source.rpartition(":")[2]).is_absolute()
        again = dataset_from_source(dataset.source, dataset.class_names)
        assert len(again) == len(dataset) and np.array_equal(again.labels, dataset.labels)
        assert all(np.array_equal(again.array(i), dataset.array(i)) for i in range(len(dataset)))


def test_folders_name_what_they_skip_and_refuse_empty_classes(tmp_path, caplog):
    from PIL import Image

    for cls in ("benign", "malignant"):
        (tmp_path / cls / "more").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "more" / "a.png")
    (tmp_path / "benign" / "b.dcm").write_bytes(b"DICM")
    (tmp_path / "benign" / "notes.txt").write_text("scanned 2021")
    (tmp_path / "benign" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "benign" / "._a.png").write_bytes(b"\0")  # macOS's copy metadata, not an image
    with caplog.at_level("WARNING", logger="edgeshort.data.dataset"):
        data = load_images(tmp_path)
    assert [p.name for p in data.sources] == ["a.png", "a.png"] and data.labels.tolist() == [0, 1]
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "skipped 2 file(s)" in message and "1 .dcm, 1 .txt" in message and str(tmp_path) in message

    (tmp_path / "nevus").mkdir()  # a class without images would silently drop out of the evaluation
    with pytest.raises(InputError, match=r"no images .* in the class folder '.*nevus'; add its images, or remove"):
        load_images(tmp_path)
    (tmp_path / "nevus" / "c.heic").write_bytes(b"\0")
    with pytest.raises(InputError, match=r"class folder '.*nevus' \(1 other files, e.g. 'c.heic'\)"):
        load_images(tmp_path, ["benign", "malignant", "nevus"])


def test_calibration_images_need_no_labels(tmp_path):
    from edgeshort.data import load_unlabelled

    data = generate(SyntheticConfig().with_sizes(4, 12, 8))
    write_seed_layout({"val": data["val"]}, tmp_path / "seed")
    assert len(load_unlabelled(tmp_path / "seed" / "val")) == 12  # ROOT/SPLIT of the seed layout
    assert len(load_unlabelled(tmp_path / "seed")) == 12  # every image under a folder, however nested
    (tmp_path / "seed" / "val_w_patches" / "empty_class").mkdir()  # labels do not matter, so neither does this
    assert len(load_unlabelled(tmp_path / "seed" / "val_w_patches")) == int(data["val"].groups.sum())
    files = sorted((tmp_path / "seed").rglob("*.png"))
    listing = tmp_path / "seed" / "calibration.csv"
    listing.write_text("path\n" + "".join(f"{p.relative_to(tmp_path / 'seed')}\n" for p in files[:5]))
    unlabelled = load_unlabelled(listing)
    assert len(unlabelled) == 5 and unlabelled.class_names == ("unlabelled",)
    (tmp_path / "nothing" / "val_w_patches" / "a").mkdir(parents=True)
    (tmp_path / "nothing" / "val_wo_patches" / "a").mkdir(parents=True)
    with pytest.raises(InputError, match="found no images .* check the split name"):
        load_images(tmp_path / "nothing" / "val")


def test_classes_the_model_does_not_name_are_refused_with_their_fix() -> None:
    """An extra class names its --class-map fix; a missing one is named; neither error leaves a dangling 'or'."""
    from edgeshort.data import ArrayDataset
    from edgeshort.data.dataset import in_model_class_order

    images = np.zeros((6, 3, 8, 8), dtype=np.float32)
    extra = ArrayDataset(images, np.array([0, 1, 2, 0, 1, 2]), ("atypical", "benign", "malignant"))
    with pytest.raises(InputError) as caught:
        in_model_class_order(extra, ("benign", "malignant"))
    assert ("the model names its classes ['benign', 'malignant'] (its id2label), and the data's are ['atypical', "
            "'benign', 'malignant']; ['atypical'] is not among the model's: map it onto one of its classes "
            "(--class-map atypical=CLASS,benign=benign,malignant=malignant; Python") in str(caught.value)
    assert "or leave those images out; or, where they are the same classes under other names" in str(caught.value)
    fewer = ArrayDataset(images, np.array([0, 1, 0, 1, 0, 1]), ("benign", "nevus"))
    with pytest.raises(InputError, match=r"the data's are \['benign', 'nevus'\]; \['nevus'\] is not among the model's"):
        in_model_class_order(fewer, ("benign", "malignant", "bcc"))
    subset = ArrayDataset(images, np.array([0, 1, 0, 1, 0, 1]), ("benign", "malignant"))
    with pytest.raises(InputError, match=r"the data's are \['benign', 'malignant'\]; the data has no images of "
                                         r"\['bcc'\]: add some, or give all the model's classes in its output order "
                                         r"\(--classes benign,malignant,bcc; DFR then needs --dfr none\); or, where"):
        in_model_class_order(subset, ("benign", "malignant", "bcc"))

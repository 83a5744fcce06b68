"""Labelled image sets: in memory (synthetic data) or on disk (ImageFolder trees)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from edgeshort.errors import InputError
from edgeshort.runtime.preprocess import (
    IMAGE_SUFFIXES,
    Preprocessing,
    as_pil,
    list_image_files,
    load_image,
    map_images,
    preprocess_image,
)

logger = logging.getLogger(__name__)


class ImageDataset:
    """Images with class labels; group labels and artefact pixel masks when known.

    `groups[i]` is 1 when image i carries the artefact (used only for evaluation), and
    `masks[i]` is its (H, W) artefact pixel mask at the image's own resolution: an array, the
    path of a mask image (CSV listings, loaded when asked for), or None for no artefact.
    """

    # Whether the caller named the class order (the model's), rather than it following sorted names.
    class_order_given = False
    # A listing's columns that no role read, where it gave no artefact labels: one may hold them under another name.
    unread_columns: tuple[str, ...] = ()
    # What reading the listing warned about (images listed twice): a run's warnings carry them too.
    load_warnings: tuple[str, ...] = ()

    def __init__(
        self,
        sources: Sequence,
        labels: Sequence[int],
        class_names: Sequence[str],
        groups: Sequence[int] | None = None,
        masks: np.ndarray | None = None,
        name: str = "dataset",
        source: str | None = None,
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if len(sources) != len(labels):
            raise InputError(
                f"expected one label per image, got {len(sources)} images and {len(labels)} labels; "
                "pass labels of the same length"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise InputError(
                f"expected labels in [0, {len(class_names) - 1}] for classes {list(class_names)}, "
                f"got values from {labels.min()} to {labels.max()}"
            )
        if groups is not None and len(groups) != len(labels):
            raise InputError(f"expected {len(labels)} group labels, got {len(groups)}")
        if groups is not None:
            groups = _artefact_groups(groups)
        if masks is not None and len(masks) != len(labels):
            raise InputError(f"expected {len(labels)} artefact masks, got {len(masks)}")
        self.sources = sources
        self.labels = labels
        names = [str(name) for name in class_names]  # runs and bundles record them as text
        if len(set(names)) != len(names) or not all(name.strip() for name in names):
            raise InputError(f"expected distinct, non-empty class names, got {list(class_names)}; name each class once "
                             "(the names label every prediction and every bundle)")
        self.class_names = tuple(names)
        self.groups = groups
        self.masks = masks
        self.name = name
        # How to load this set again (see `dataset_from_source`), recorded in run folders.
        self.source = source

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels, class_names, groups=None, masks=None, name="dataset",
                    source=None):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise InputError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
        return cls(images, labels, class_names, groups, masks, name, source)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image(self, index: int) -> Image.Image:
        """Image `index` as an RGB PIL image."""
        return as_pil(self.sources[index], source=f"{self.name}[{index}]")

    def array(self, index: int) -> np.ndarray:
        return np.asarray(self.image(index))

    def file_name(self, index: int) -> str | None:
        """The file image `index` is read from, as listed; None for an image held in memory."""
        source = self.sources[index]
        return str(source) if isinstance(source, (str, Path)) else None

    def batches(self, prep: Preprocessing, batch_size: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices, float32 (B, 3, H, W)) batches preprocessed for a model."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            rows = map_images(lambda j, _, first=start: preprocess_image(self.image(first + j), prep),
                              self.sources[start:stop])
            yield np.arange(start, stop), np.stack(rows)

    def input_digests(self, prep: Preprocessing, batch_size: int = 64) -> np.ndarray:
        """Each image's `input_digests` as the model sees it: what a run's stored predictions were made on."""
        return np.concatenate([input_digests(x) for _, x in self.batches(prep, batch_size)])

    def preprocessed(self, prep: Preprocessing, batch_size: int = 64) -> np.ndarray:
        """Every image preprocessed for a model, as one float32 (N, 3, H, W) array."""
        return np.concatenate([x for _, x in self.batches(prep, batch_size)])

    def patch_masks(self, prep: Preprocessing, grid: tuple[int, int]) -> np.ndarray | None:
        """(N, gh, gw) bool: patch tokens touched by the artefact in the image as `prep` gives it to the model."""
        if self.masks is None:
            return None
        out = np.zeros((len(self), *grid), bool)
        h, w = prep.size
        for i, mask in enumerate(self.masks):
            if mask is None:  # a listed image without an artefact
                continue
            if isinstance(mask, (str, Path)):
                mask = self._mask_file(i, Path(mask))
            mask = np.asarray(prep.model_view(Image.fromarray(mask.astype(np.uint8) * 255), Image.NEAREST)) > 0
            out[i] = mask.reshape(grid[0], h // grid[0], grid[1], w // grid[1]).any(axis=(1, 3))
        return out

    def _mask_file(self, index: int, path: Path) -> np.ndarray:
        """A mask image as a bool array (non-zero = artefact), checked against its image's size."""
        array = np.asarray(load_image(path)).any(-1)
        source = self.sources[index]
        if isinstance(source, (str, Path)):
            with Image.open(source) as img:  # the header is enough
                size = img.size
        else:
            size = self.image(index).size
        if array.shape[::-1] != size:
            raise InputError(
                f"artefact mask {str(path)!r} is {array.shape[1]}x{array.shape[0]} but its image "
                f"{self.sources[index]} is {size[0]}x{size[1]}; masks must match their image's pixels"
            )
        return array

    def subset(self, indices) -> ImageDataset:
        indices = np.asarray(indices, dtype=np.int64)
        sources = self.sources[indices] if isinstance(self.sources, np.ndarray) else [self.sources[i] for i in indices]
        return ImageDataset(
            sources,
            self.labels[indices],
            self.class_names,
            None if self.groups is None else self.groups[indices],
            None if self.masks is None else self.masks[indices],
            name=self.name,
        )

    def __repr__(self) -> str:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return f"ImageDataset({self.name!r}, {len(self)} images, classes={dict(zip(self.class_names, counts.tolist()))})"


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise InputError(f"expected an image folder at {str(root)!r}, but it does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        loose = any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir())
        raise InputError(
            f"expected one sub-folder per class in {str(root)!r}, found none"
            + ("; it holds images without class folders, so without labels: list them with their labels in a CSV "
               "(path,label), or predict them instead (edgeshort predict BUNDLE FOLDER)" if loose else "")
        )
    return folders


def _warn_skipped(skipped: list[Path], where: Path) -> None:
    # A warning, not an error: notes and metadata often sit beside images, but a folder of DICOM or
    # HEIC files read as fewer images must not pass unnoticed.
    if skipped:
        kinds = Counter(p.suffix.lower() or "no suffix" for p in skipped)
        logger.warning(
            "skipped %d file(s) under %r whose suffix is not an image's (%s), e.g. %s; convert them to %s to use them",
            len(skipped), str(where), ", ".join(f"{n} {k}" for k, n in kinds.most_common()),
            [p.name for p in skipped[:3]], ", ".join(sorted(IMAGE_SUFFIXES)),
        )


class ImageFolder(ImageDataset):
    """An ImageFolder-style tree (`root/<class>/<image>`), classes in sorted order as torchvision's.

    `class_names` may be given to fix the label order across several folders.
    """

    def __init__(self, root: str | Path, class_names: Sequence[str] | None = None, group: int | None = None,
                 allow_empty: bool = False):
        root = Path(root).resolve()  # the recorded source must reload from any working directory
        folders = _class_folders(root)
        names = list(class_names) if class_names is not None else [p.name for p in folders]
        if not names:
            raise InputError("expected at least one class name, got none; pass the model's classes in its output "
                             "order (CLI: --classes benign,malignant), or none to use the folder names")
        if len(set(names)) != len(names):
            raise InputError(f"expected distinct class names, got {names}; name each class once")
        paths, labels, skipped = [], [], []
        for folder in folders:
            if folder.name not in names:
                raise InputError(
                    f"folder {str(folder)!r} is not one of the classes {names}; merge it into one of them "
                    f"(CLI: --class-map {folder.name}={names[0]},...), pass class names that include it, in the "
                    "model's output order, or move it out of the tree"
                )
            files, others = list_image_files(folder, recursive=True)
            if not files and not allow_empty:  # as torchvision's: an empty class is a mistake, not zero images
                raise InputError(
                    f"found no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folder {str(folder)!r}"
                    + (f" ({len(others)} other files, e.g. {others[0].name!r})" if others else "")
                    + "; add its images, or remove the folder"
                )
            paths += files
            labels += [names.index(folder.name)] * len(files)
            skipped += others
        _warn_skipped(skipped, root)
        groups = None if group is None else [group] * len(paths)
        super().__init__(paths, labels, names, groups, None, name=root.name, source=f"folder:{root}")


def concat(datasets: Sequence[ImageDataset], name: str | None = None) -> ImageDataset:
    """Concatenate datasets with the same classes."""
    first = datasets[0]
    if any(d.class_names != first.class_names for d in datasets):
        raise InputError(f"expected the same classes in every dataset, got {[d.class_names for d in datasets]}")
    sources = [s for d in datasets for s in (d.sources if not isinstance(d.sources, np.ndarray) else list(d.sources))]
    groups = None if any(d.groups is None for d in datasets) else np.concatenate([d.groups for d in datasets])
    masks = None if any(d.masks is None for d in datasets) else np.concatenate([d.masks for d in datasets])
    return ImageDataset(
        sources, np.concatenate([d.labels for d in datasets]), first.class_names, groups, masks,
        name=name or first.name,
    )


def load_seed_layout(root: str | Path, split: str, class_names: Sequence[str] | None = None) -> ImageDataset:
    """`root/{split}_wo_patches/<class>/…` (group 0) + `root/{split}_w_patches/<class>/…` (group 1).

    Classes are in sorted order unless `class_names` gives the model's order.
    """
    root = Path(root).resolve()  # the recorded source must reload from any working directory
    without, with_ = seed_layout_folders(root, split)
    # A (class, artefact) cell may hold no images, e.g. no patched malignant lesion, as in ISIC; so may a
    # whole group (a split without artefacts): its folder may then be missing or empty.
    present = [(folder, group) for group, folder in enumerate((without, with_))
               if folder.is_dir() and any(folder.iterdir())]
    names = list(class_names) if class_names is not None else sorted(
        {p.name for folder, _ in present for p in _class_folders(folder)}
    )
    groups = [ImageFolder(folder, names, group=group, allow_empty=True) for folder, group in present]
    merged = concat(groups, name=split) if groups else None
    if merged is None or not len(merged):
        raise InputError(f"found no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {str(without)!r} or "
                         f"{str(with_)!r}; check the split name and the folders")
    merged.source = f"seed:{split}:{root}"
    return merged


def seed_layout_folders(root: Path, split: str) -> tuple[Path, Path]:
    """The seed layout's folders of `split`: its images without the artefact (group 0) and with it (group 1)."""
    return root / f"{split}_wo_patches", root / f"{split}_w_patches"


def write_seed_layout(datasets: dict[str, ImageDataset], root: str | Path) -> Path:
    """Write splits as the seed's folders: `{split}_w_patches/` and `{split}_wo_patches/`, one sub-folder per class."""
    root = Path(root)
    for split, data in datasets.items():
        if data.groups is None:
            raise InputError(f"split {split!r} has no group labels; the seed layout needs them")
        for i in range(len(data)):
            folder = root / f"{split}_{'w' if data.groups[i] else 'wo'}_patches" / data.class_names[data.labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            data.image(i).save(folder / f"{i:05d}.png")
    return root


def dataset_from_source(source: str, class_names: Sequence[str] | None = None) -> ImageDataset:
    """Load a dataset again from its recorded `source` string, its classes in `class_names`' order if given."""
    kind, _, rest = source.partition(":")
    if kind == "folder":
        return ImageFolder(rest, class_names)
    if kind == "seed":
        split, _, root = rest.partition(":")
        return load_seed_layout(root, split, class_names)
    if kind == "manifest":
        from edgeshort.data.manifest import manifest_from_source

        return manifest_from_source(rest, class_names)
    if kind == "synthetic":
        from edgeshort.data.synthetic import SplitSpec, SyntheticConfig, generate_split

        split, _, config = rest.partition(":")
        data = json.loads(config)
        for key in ("train", "val", "test"):
            data[key] = SplitSpec(**{**data[key], "artefact_rate": tuple(data[key]["artefact_rate"])})
        synthetic = generate_split(SyntheticConfig(**data), split)
        return synthetic if class_names is None else in_class_order(synthetic, class_names)
    if kind == "merged":
        data = json.loads(rest)
        return merge_classes(dataset_from_source(data["source"]), data["class_map"], class_names)
    raise InputError(f"unknown dataset source {source!r}; pass the images explicitly")


def load_images(
    path: str | Path, class_names: Sequence[str] | None = None, class_map: Mapping[str, str] | None = None,
    image_root: str | Path | None = None, columns: Mapping[str, str] | None = None,
) -> ImageDataset:
    """An ImageFolder tree, a CSV file listing images (see `data/manifest.py`), or the seed layout when
    `path` is `ROOT/SPLIT` with `SPLIT_w(o)_patches` beside it.

    Labels follow the sorted folder names, as torchvision's ImageFolder, unless `class_names` gives
    the order of the model's outputs. `class_map` merges the data's classes into the model's (see
    `merge_classes`); `class_names` then orders the merged classes. `image_root` is the folder a
    CSV listing's paths are relative to (default: the CSV's own folder); `columns` names its headers
    by role where the defaults do not recognise them (see `load_manifest`).
    """
    dataset = _read_images(path, class_names, class_map, image_root, columns)
    dataset.class_order_given = class_names is not None
    return dataset


def _read_images(path, class_names, class_map, image_root, columns) -> ImageDataset:
    if class_map is not None:
        return merge_classes(load_images(path, image_root=image_root, columns=columns), class_map, class_names)
    path = Path(path)
    if path.suffix.lower() == ".csv":
        from edgeshort.data.manifest import load_manifest

        return load_manifest(path, class_names, image_root=image_root, columns=columns)
    _csv_options_only(path, image_root, columns)
    if not path.exists() and any(p.is_dir() for p in seed_layout_folders(path.parent, path.name)):
        return load_seed_layout(path.parent, path.name, class_names)
    return ImageFolder(path, class_names)


def _csv_options_only(path: Path, image_root, columns) -> None:
    for value, what, flag in ((image_root, "an image root applies", "--image-root"),
                              (columns, "column names apply", "--columns")):
        if value is not None:
            raise InputError(f"{what} to a CSV listing, but {str(path)!r} is a folder; leave it out ({flag}), or "
                             "pass the CSV file")


def load_unlabelled(path: str | Path, image_root: str | Path | None = None,
                    columns: Mapping[str, str] | None = None) -> ImageDataset:
    """Images whose labels do not matter (export calibration): every image under a folder (flat, a
    class tree or the seed's layout), or the images a CSV lists, with or without a label column."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        from edgeshort.data.manifest import load_manifest

        return load_manifest(path, image_root=image_root, columns=columns, labelled=False)
    _csv_options_only(path, image_root, columns)
    if not path.is_dir():  # ROOT/SPLIT of the seed's layout, or a path that load_images explains
        return load_images(path)
    files, skipped = list_image_files(path, recursive=True)
    if not files:
        raise InputError(f"found no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {str(path)!r}; check the folder")
    _warn_skipped(skipped, path)
    return unlabelled(files, path.name)


def unlabelled(paths: Sequence, name: str) -> ImageDataset:
    """Images under one placeholder class: for work that needs only their pixels (export calibration)."""
    return ImageDataset(paths, [0] * len(paths), ("unlabelled",), name=name)


def merge_classes(
    dataset: ImageDataset, class_map: Mapping[str, str], class_names: Sequence[str] | None = None
) -> ImageDataset:
    """`dataset` with its classes renamed by `class_map` (data class -> model class), several to one.

    A melanoma model judged on ISIC's nine diagnoses needs e.g. MEL -> malignant and NV, BKL, ... ->
    benign. Every class that has images must be mapped, so none is merged by accident, or already be
    one of `class_names` (a test listing that spells one class otherwise needs that one entry); the
    merged classes follow `class_names` (the model's output order) or else sort by name.
    """
    # Names the map gives beyond this dataset's classes are fine: one map serves every split, and a
    # misspelt class still fails below, as unmapped.
    class_map = {str(k): str(v) for k, v in class_map.items()}
    if class_names is not None:
        class_map = {**{str(c): str(c) for c in class_names if str(c) in dataset.class_names}, **class_map}
    counts = np.bincount(dataset.labels, minlength=len(dataset.class_names))
    unmapped = {c: int(n) for c, n in zip(dataset.class_names, counts) if n and c not in class_map}
    if unmapped:
        raise InputError(
            f"{dataset.name!r} has images of classes the class map does not map: "
            + ", ".join(f"{c} ({n} image{'s' * (n != 1)})" for c, n in unmapped.items())
            + "; map each to one of the model's classes, or list only the images to use"
        )
    targets = sorted(set(class_map.values())) if class_names is None else list(class_names)
    stray = sorted(set(class_map.values()) - set(targets))
    if stray:
        raise InputError(
            f"the class map sends classes to {stray}, which are not among the classes {targets}; "
            "map only to the model's classes"
        )
    relabel = np.array([targets.index(class_map[c]) if c in class_map else -1 for c in dataset.class_names])
    merged = copy.copy(dataset)  # keeps the dataset's kind (files, arrays) and everything else
    merged.labels, merged.class_names = relabel[dataset.labels].astype(np.int64), tuple(targets)
    if dataset.source is not None:
        merged.source = "merged:" + json.dumps({"class_map": class_map, "source": dataset.source})
    return merged


def _parse_pairs(text: str, what: str, form: str, example: str) -> dict[str, str]:
    """'A=x,B=y' -> {'A': 'x', 'B': 'y'}: the command-line form of a mapping, each key once."""
    pairs = [item.strip() for item in text.split(",") if item.strip()]
    malformed = [p for p in pairs if p.count("=") != 1 or not all(side.strip() for side in p.split("="))]
    if not pairs or malformed:
        raise InputError(
            f"expected the {what} as {form} pairs separated by commas, e.g. {example}; "
            f"got {text!r}" + (f" ({malformed} are not {form})" if malformed else "")
        )
    mapping: dict[str, str] = {}
    for key, value in (p.split("=") for p in pairs):
        if key.strip() in mapping:
            raise InputError(f"the {what} gives {key.strip()!r} twice in {text!r}; give each once")
        mapping[key.strip()] = value.strip()
    return mapping


def parse_class_map(text: str) -> dict[str, str]:
    """'MEL=malignant,NV=benign' -> {'MEL': 'malignant', 'NV': 'benign'} (the command-line form)."""
    return _parse_pairs(text, "class map", "DATA=MODEL", "MEL=malignant,NV=benign")


def parse_columns(text: str) -> dict[str, str]:
    """'image=file_name,label=finding' -> {'image': 'file_name', 'label': 'finding'}: a CSV listing's
    headers by role (the command-line form of `load_manifest`'s `columns`)."""
    return _parse_pairs(text, "columns", "ROLE=HEADER", "image=file_name,label=finding,group=has_ruler")


def in_class_order(dataset: ImageDataset, class_names: Sequence[str]) -> ImageDataset:
    """`dataset` with labels renumbered to `class_names`' order (the model's), matched by name."""
    class_names = tuple(class_names)
    relabelled = copy.copy(dataset)  # keeps the dataset's kind (files, arrays) and everything else
    relabelled.class_order_given = True
    if dataset.class_names == class_names:
        return relabelled
    unknown = [c for c in dataset.class_names if c not in class_names]
    if unknown:
        raise InputError(
            f"expected the classes {list(class_names)} (the model's), got {list(dataset.class_names)} with "
            f"{unknown} not among them{rename_hint(dataset.class_names, class_names)}; map them to the model's "
            "classes (--class-map NAME=CLASS,...; Python: load_images(path, class_names, class_map={...}), where "
            "classes already named as one of class_names need no entry), or pass class names in the model's output "
            "order"
        )
    order = np.array([class_names.index(c) for c in dataset.class_names], dtype=np.int64)
    relabelled.labels, relabelled.class_names = order[dataset.labels], class_names
    return relabelled




def rename_hint(data_names: Sequence[str], class_names: Sequence[str]) -> str:
    """"; they differ only in case: rename ... with --class-map ..." when every one of the data's names is one of
    `class_names` in another case, else "" (the fix a case-only difference has, on the CLI and in Python)."""
    by_case = {name.casefold(): name for name in class_names}
    renames = {name: by_case[name.casefold()] for name in data_names if name.casefold() in by_case}
    if not data_names or len(renames) != len(data_names):
        return ""
    mapping = ",".join(f"{old}={new}" for old, new in renames.items())
    return (f"; they differ only in case: rename the data's with --class-map {mapping} "
            f"(Python: load_images(..., class_map={renames!r}))")


def in_model_class_order(dataset: ImageDataset, model_class_names: Sequence[str] | None) -> tuple[ImageDataset, bool]:
    """`dataset` with its labels in the model's output order where the model names its classes (transformers'
    id2label) -> (dataset, whether it was reordered). Data whose classes the model does not name is refused:
    which output is which class would be a guess (sorted order), and a wrong guess inverts every answer.
    Data whose order the caller gave (`class_names`, `--classes`) is left as given."""
    if not model_class_names or tuple(dataset.class_names) == tuple(model_class_names) or dataset.class_order_given:
        return dataset, False
    if set(dataset.class_names) == set(model_class_names):
        return in_class_order(dataset, model_class_names), True
    if dataset.class_names == tuple(str(i) for i in range(len(model_class_names))):
        # Integer labels are the model's output indices: its names name them.
        named = copy.copy(dataset)
        named.class_names = tuple(model_class_names)
        return named, True
    hint = rename_hint(dataset.class_names, model_class_names) if len(dataset.class_names) == len(model_class_names) \
        else ""
    extra = [name for name in dataset.class_names if name not in model_class_names]
    if not hint and extra:
        # A class map must map every class with images, the model's own names too.
        mapping = ",".join(f"{name}=CLASS" if name in extra else f"{name}={name}" for name in dataset.class_names)
        hint = (f"; {extra} {'is' if len(extra) == 1 else 'are'} not among the model's: map "
                f"{'it' if len(extra) == 1 else 'each'} onto one of its classes (--class-map {mapping}; "
                "Python: load_images(..., class_map={...})), or leave those images out")
    missing = [name for name in model_class_names if name not in dataset.class_names]
    if not hint and missing:
        hint = (f"; the data has no images of {missing}: add some, or give all the model's classes in its output "
                f"order (--classes {','.join(model_class_names)}; DFR then needs --dfr none)")
    raise InputError(
        f"the model names its classes {list(model_class_names)} (its id2label), and the data's are "
        f"{list(dataset.class_names)}{hint}; or, where they are the same classes under other names, give the "
        "data's names in the model's output order (--classes A,B,C; Python: load_images(path, class_names) or "
        "fit(..., class_names=[...]))"
    )


class ArrayDataset(ImageDataset):
    """Images already preprocessed for a model: float (N, 3, H, W) arrays or tensors, used as given."""

    def __init__(self, images, labels, class_names=None, groups=None, masks=None, name="arrays"):
        array = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
        if array.ndim != 4 or array.shape[1] not in (1, 3) or not np.issubdtype(array.dtype, np.floating):
            raise InputError(
                f"expected preprocessed float images of shape (N, 3, H, W), got {array.dtype} {array.shape}; "
                "pass an ImageDataset for raw images"
            )
        labels = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels, np.int64)
        if class_names is None:
            class_names = [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
        super().__init__(array.astype(np.float32), labels, class_names, groups, masks, name)

    def image(self, index: int) -> Image.Image:
        # For pictures only: undo nothing, just stretch the array to 0..255.
        x = self.sources[index].transpose(1, 2, 0)
        x = (x - x.min()) / (np.ptp(x) or 1.0)
        return Image.fromarray((x * 255).astype(np.uint8).squeeze())

    def batches(self, prep: Preprocessing, batch_size: int = 64):
        for start in range(0, len(self), batch_size):
            idx = np.arange(start, min(start + batch_size, len(self)))
            yield idx, self.sources[idx]

    def subset(self, indices) -> ArrayDataset:
        indices = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(
            self.sources[indices], self.labels[indices], self.class_names,
            None if self.groups is None else self.groups[indices],
            None if self.masks is None else self.masks[indices], self.name,
        )


def input_digests(images: np.ndarray) -> np.ndarray:
    """(N,) short sha256 of each preprocessed (N, 3, H, W) image: the same pixels give the same digest, so a
    file replaced or edited since its predictions were stored is told apart from the one they describe."""
    return np.array([hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16] for x in images], dtype="U16")


def as_images(data, class_names=None) -> ImageDataset:
    """Images of which only the pixels count (predictions, export calibration): an image folder or CSV
    listing with or without labels, a list of images (PIL, uint8 arrays or paths), or what `as_dataset` takes."""
    if isinstance(data, (str, Path)):
        return load_unlabelled(data)
    if isinstance(data, list):
        return unlabelled(data, "images")
    return as_dataset(data, class_names)


def as_dataset(data, class_names=None) -> ImageDataset:
    """An ImageDataset, a folder path, or an (images, labels) pair of preprocessed arrays."""
    if isinstance(data, ImageDataset):
        return data if class_names is None else in_class_order(data, class_names)
    if isinstance(data, (str, Path)):
        return load_images(data, class_names)
    if isinstance(data, tuple) and len(data) in (2, 3):
        images, labels = data[0], data[1]
        if len(images) != len(labels):
            raise InputError(
                f"expected one label per image, got {len(images)} images and {len(labels)} labels; "
                "pass labels of the same length"
            )
        return ArrayDataset(images, labels, class_names, data[2] if len(data) == 3 else None)
    raise InputError(
        f"expected an ImageDataset, an image folder path or an (images, labels) tuple, got {type(data).__name__}"
    )


def _artefact_groups(groups: Sequence) -> np.ndarray:
    """Group labels as 0 (no artefact) / 1 (artefact): any other value would fall outside every (class, group)
    cell and silently out of worst-group accuracy."""
    values = np.asarray(groups)
    if values.dtype == bool:
        return values.astype(np.int64)
    try:
        numbers = values.astype(np.float64)
    except (TypeError, ValueError):
        numbers = None
    if numbers is None or not np.isin(numbers, (0, 1)).all():
        odd = sorted({str(v) for v in values.ravel().tolist()} - {"0", "1", "0.0", "1.0"})[:5]
        raise InputError(f"expected group labels 0 (no artefact) or 1 (artefact), got {odd}; map them to 0 / 1 "
                         "(e.g. groups=(g == 'ruler').astype(int))")
    return numbers.astype(np.int64)

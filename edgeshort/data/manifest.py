"""Labelled images listed in a CSV file: one row per image, as hospital exports and ISIC ship them.

Two label forms are read:
- a label column holding class names (`path,label[,group][,mask]`), or integers, which are the
  model's output indices (ISIC 2020's `image_name,...,target` with 0/1 targets);
- one-hot class columns, as ISIC's ground-truth files (`image,MEL,NV,BCC,...` with 0/1 values):
  the classes are those columns, in their order.

Paths are relative to the CSV's folder unless `image_root` is given; a path without a suffix
(ISIC's image ids) is looked up with each image suffix. The optional group column (1 = the image
carries the artefact) gives the per-group evaluation, and the optional mask column (a binary
image, non-zero on the artefact's pixels; empty = no artefact) gives patch precision and recall.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeshort.data.dataset import ImageDataset, rename_hint, unlabelled
from edgeshort.errors import InputError
from edgeshort.runtime.preprocess import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

# Header names recognised for each role (compared case-insensitively); `columns=` names others.
COLUMN_NAMES = {
    "image": ("path", "image", "file", "filename", "image_path", "image_id", "image_name", "isic_id", "file_name"),
    "label": ("label", "class", "target", "diagnosis", "dx"),
    "group": ("group", "artefact", "artifact", "shortcut"),
    "mask": ("mask", "artefact_mask", "artifact_mask", "mask_path"),
}
TRUE_WORDS, FALSE_WORDS = ("1", "1.0", "true", "yes", "y"), ("0", "0.0", "false", "no", "n")
# Missing files are listed up to this many in the error; the count covers all.
MISSING_SHOWN = 5


def _find_column(header: list[str], role: str, given: str | None, csv_path: Path) -> str | None:
    lowered = {h.strip().lower(): h for h in header}  # matched as the default names are: any case, spaces aside
    if given is not None:
        if given.strip().lower() not in lowered:
            raise InputError(f"{csv_path}: expected a column {given!r} for the {role}, found columns {header}")
        return lowered[given.strip().lower()]
    return next((lowered[name] for name in COLUMN_NAMES[role] if name in lowered), None)


def _is_binary(values: list[str]) -> bool:
    return all(v.strip() in ("0", "1", "0.0", "1.0") for v in values)


def _flag(value: str, row: int, column: str, csv_path: Path) -> int:
    word = value.strip().lower()
    if not word:
        raise InputError(
            f"{csv_path}, row {row}: column {column!r} is empty, and artefact labels are needed for every image or "
            "none; evaluate the labelled rows from a listing of their own, and the rest without the column"
        )
    if word in TRUE_WORDS:
        return 1
    if word in FALSE_WORDS:
        return 0
    raise InputError(
        f"{csv_path}, row {row}: expected 0/1 (or true/false, yes/no) in column {column!r}, got {value!r}"
    )


def _resolve(name: str, root: Path) -> Path | None:
    path = root / name.strip()
    if path.is_file():
        return path
    if not path.suffix:  # ISIC lists image ids, not file names
        for suffix in sorted(IMAGE_SUFFIXES):
            for candidate in (path.with_suffix(suffix), path.with_suffix(suffix.upper())):
                if candidate.is_file():
                    return candidate
    return None


def _read_rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not csv_path.is_file():
        raise InputError(f"expected a CSV file at {str(csv_path)!r}, but it does not exist")
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: spreadsheet exports start with a BOM
        try:  # European spreadsheet exports separate with ';', some tools with tabs
            dialect = csv.Sniffer().sniff(fh.readline(), delimiters=",;\t")
        except csv.Error:
            dialect = csv.excel
        fh.seek(0)
        reader = csv.DictReader(fh, dialect=dialect)
        header = [h for h in (reader.fieldnames or []) if h is not None]
        rows = list(reader)
    if not header or not rows:
        raise InputError(f"{csv_path}: expected a header row and one row per image, got an empty file")
    # DictReader fills a short row's missing fields with None and files a long row's extra ones under None.
    short = [(i + 2, [h for h in header if row[h] is None]) for i, row in enumerate(rows) if None in row.values()]
    if short:
        raise InputError(
            f"{csv_path}: rows {[r for r, _ in short][:MISSING_SHOWN]} have fewer fields than the header {header}, "
            f"row {short[0][0]} has no value for {', '.join(map(repr, short[0][1]))}; give every row a value for "
            "each column (an empty one for none)"
        )
    long = [(i + 2, row[None]) for i, row in enumerate(rows) if None in row]
    if long:
        raise InputError(
            f"{csv_path}: rows {[r for r, _ in long][:MISSING_SHOWN]} have more fields than the header {header}, "
            f"row {long[0][0]} ends with {long[0][1]}; quote values that hold {dialect.delimiter!r}, or name the "
            "extra columns in the header"
        )
    return header, rows


def _labels(header, rows, label_col, used, class_names, csv_path):
    """Class names per row and the class order, from a label column or one-hot columns."""
    if label_col is not None:
        names = [row[label_col].strip() for row in rows]
        empty = [i + 2 for i, n in enumerate(names) if not n]
        if empty:
            raise InputError(f"{csv_path}: rows {empty[:MISSING_SHOWN]} have an empty {label_col!r}; label every image")
        indices = all(n.isascii() and n.isdigit() for n in names)  # integer labels are the model's output indices
        # ...unless they are the class names themselves (classes named "0" and "1", or a run's recorded names).
        if class_names is not None and indices and not set(names) <= set(class_names):
            order = list(class_names)
            beyond = [(i + 2, n) for i, n in enumerate(names) if int(n) >= len(order)]
            if beyond:
                raise InputError(
                    f"{csv_path}: rows {[r for r, _ in beyond][:MISSING_SHOWN]} have integer labels beyond the "
                    f"{len(order)} classes {order} (row {beyond[0][0]}: {beyond[0][1]}); integer labels are output "
                    "indices from 0, so pass all the model's class names in its output order"
                )
            return [int(n) for n in names], order
        if class_names is not None:
            order = list(class_names)
        elif indices:
            order = [str(i) for i in range(max(int(n) for n in names) + 1)]
            names = [str(int(n)) for n in names]
        else:
            order = sorted(set(names))
        unknown = sorted(set(names) - set(order))
        if unknown:
            raise InputError(
                f"{csv_path}: labels {unknown} are not among the classes {order}{rename_hint(sorted(set(names)), order)}"
                "; map them to those classes (--class-map LABEL=CLASS,...; Python: load_images(path, class_names, "
                "class_map={...}), where classes already named as one of class_names need no entry), or leave those "
                "images out of the listing, or pass class names that include them, in the model's output order"
            )
        return [order.index(n) for n in names], order
    onehot = [h for h in header if h not in used and _is_binary([row[h] for row in rows])]
    if len(onehot) < 2:
        raise InputError(
            f"{csv_path}: found no label column (one of {list(COLUMN_NAMES['label'])}) and no one-hot class columns "
            f"of 0/1 values among {header}; rename the label column's header to 'label', or name it (CLI: "
            "--columns label=HEADER, for detect's --eval --eval-columns; Python: columns={'label': ...})"
        )
    hot = np.array([[float(row[h]) for h in onehot] for row in rows])
    bad = np.flatnonzero(hot.sum(1) != 1)
    if len(bad):
        raise InputError(
            f"{csv_path}: expected exactly one 1 per row among the class columns {onehot}, rows "
            f"{[int(i) + 2 for i in bad[:MISSING_SHOWN]]} have {int(hot[bad[0]].sum())}; fix those rows"
        )
    index = hot.argmax(1)
    if class_names is None:
        return index.tolist(), onehot
    order = list(class_names)
    unknown = [c for c in onehot if c not in order and (index == onehot.index(c)).any()]
    if unknown:
        raise InputError(f"{csv_path}: class columns {unknown} are not among the classes {order}; pass class names "
                         "that include them, in the model's output order")
    return [order.index(onehot[i]) for i in index], order


def _warn_repeats(paths: Sequence[Path], listed: Sequence[str], csv_path: Path, used_for: str) -> tuple[str, ...]:
    """Warn about images listed more than once, and return the warning: each listing counts as an image of its own
    in what the listing is `used_for` (a walkthrough's five repeated rows changed a verdict)."""
    rows_of: dict[Path, list[int]] = {}
    for index, path in enumerate(paths):
        rows_of.setdefault(path.resolve(), []).append(index)  # "sub/../a.png" is "a.png"
    repeated = [indices for indices in rows_of.values() if len(indices) > 1]
    if not repeated:
        return ()
    first = repeated[0]
    warning = (f"{csv_path}: {len(repeated)} image{' is' if len(repeated) == 1 else 's are'} listed more than once "
               f"(e.g. {listed[first[0]].strip()!r} on rows {', '.join(str(i + 2) for i in first)}); each listing "
               f"counts as an image of its own in {used_for}: remove the repeats")
    logger.warning("%s", warning)
    return (warning,)


def load_manifest(
    csv_path: str | Path,
    class_names: Sequence[str] | None = None,
    image_root: str | Path | None = None,
    columns: Mapping[str, str] | None = None,
    labelled: bool = True,
) -> ImageDataset:
    """The images a CSV lists, with their labels (and artefact groups and masks when it has them).

    `columns` maps a role (`image`, `label`, `group`, `mask`) to a header the defaults do not
    recognise. Labels follow sorted class names (one-hot: the columns' order) unless `class_names`
    gives the model's output order. `labelled=False` reads the images only (export calibration).
    """
    csv_path = Path(csv_path).resolve()
    columns = dict(columns or {})
    unknown_roles = sorted(set(columns) - set(COLUMN_NAMES))
    if unknown_roles:
        raise InputError(f"expected column roles among {sorted(COLUMN_NAMES)}, got {unknown_roles}; e.g. "
                         "image=file_name,label=finding (CLI: --columns)")
    header, rows = _read_rows(csv_path)
    found = {role: _find_column(header, role, columns.get(role), csv_path) for role in COLUMN_NAMES}
    if found["image"] is None:
        raise InputError(
            f"{csv_path}: found no image column among {header}; rename its header to one of "
            f"{list(COLUMN_NAMES['image'])}, or name it (CLI: --columns image=HEADER, for detect's --eval "
            "--eval-columns; Python: columns={'image': ...})"
        )
    root = Path(image_root).resolve() if image_root is not None else csv_path.parent
    paths = [_resolve(row[found["image"]], root) for row in rows]
    missing = [row[found["image"]] for row, p in zip(rows, paths) if p is None]
    if missing:
        raise InputError(
            f"{csv_path}: {len(missing)} of {len(rows)} listed images do not exist under {str(root)!r}, e.g. "
            f"{missing[:MISSING_SHOWN]}; paths are relative to the CSV's folder unless an image root (--image-root) is given"
        )
    repeats = _warn_repeats(paths, [row[found["image"]] for row in rows], csv_path,
                            "clusters, verdict and accuracy" if labelled else "the calibration and its checks")
    if not labelled:
        return unlabelled(paths, csv_path.stem)
    used = {c for c in found.values() if c is not None}
    labels, order = _labels(header, rows, found["label"], used, class_names, csv_path)
    groups = None
    if found["group"] is not None:
        groups = [_flag(row[found["group"]], i + 2, found["group"], csv_path) for i, row in enumerate(rows)]
    masks = None
    if found["mask"] is not None:
        masks = np.empty(len(rows), dtype=object)  # paths, loaded when patch masks are asked for
        for i, row in enumerate(rows):
            value = row[found["mask"]].strip()
            if value:
                masks[i] = _resolve(value, root)
                if masks[i] is None:
                    raise InputError(f"{csv_path}, row {i + 2}: mask {value!r} does not exist under {str(root)!r}")
    source = {"csv": str(csv_path)}
    if image_root is not None:
        source["root"] = str(root)
    if columns:
        source["columns"] = columns
    dataset = ImageDataset(paths, labels, order, groups, masks, name=csv_path.stem,
                           source="manifest:" + json.dumps(source))
    if groups is None:
        dataset.unread_columns = tuple(h for h in header if h not in used and h not in order)
    dataset.load_warnings = repeats
    return dataset


def manifest_from_source(spec: str, class_names: Sequence[str] | None = None) -> ImageDataset:
    """Load a CSV-listed dataset again from the JSON its `source` string records."""
    data = json.loads(spec)
    return load_manifest(data["csv"], class_names, data.get("root"), data.get("columns"))

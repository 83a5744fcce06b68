"""`edgeshort predict BUNDLE IMAGES…`: guarded predictions as JSONL/CSV, and overlay PNGs on request.

Torch-free: only the runtime is imported. Images are read and predicted a batch at a time, so
memory stays bounded however many files are given; a file that cannot be read becomes an error
record and the others are still predicted.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

RECORD_FIELDS = ("path", "label", "ablated_label", "dfr_label", "final_label", "final_probability", "shortcut_present",
                 "flagged_patches", "warning", "logits", "ablated_logits", "dfr_logits", "overlay", "error")
# Overlays are drawn at least this many pixels on the short side, so small inputs stay readable, and
# at most this many on the long side, so a 12-MP photo's outlines are not too thin to see on a screen.
OVERLAY_MIN_SIDE = 256
OVERLAY_MAX_SIDE = 1024


def add_arguments(parser) -> None:
    parser.add_argument("bundle", help="bundle folder written by `edgeshort export`")
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "openvino"),
                        help="inference backend (auto: OpenVINO when installed and the bundle has OpenVINO IR, on "
                             "Intel CPUs, for --device GPU/NPU/AUTO or --precision bf16/int8; else ONNX Runtime)")
    parser.add_argument("--device", help="OpenVINO device (CPU, GPU, NPU, AUTO) or ONNX Runtime device (cpu, cuda, "
                                         "coreml, directml); CPU alone leaves the backend to --backend")
    parser.add_argument("--threads", type=int, help="inference threads (default: the backend's choice)")
    parser.add_argument("--precision", default="f32", choices=("f32", "bf16", "int8"),
                        help="OpenVINO inference precision: f32 (default), bf16 on CPUs that have it, or the "
                             "bundle's INT8 guarded graph (export --int8)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per inference call (default 8)")
    parser.add_argument("-o", "--out", help="write records to this .jsonl, .json (one array) or .csv file (default: JSONL on stdout)")
    parser.add_argument("--overlays", help="folder for overlay PNGs: image + saliency + flagged patches")
    parser.add_argument("--split", action="store_true", help="run embed -> guard -> encoder_head instead of the fused graph")
    parser.add_argument("--drop-tokens", action="store_true", help="with --split: remove flagged tokens instead of masking")
    parser.add_argument("--max-pixels", type=int, help="refuse images with more pixels than this (default 50 "
                                                         "million)")
    parser.add_argument("--quiet", action="store_true", help="no summary on stderr")


def image_files(inputs: list[str], skipped: Counter | None = None) -> Iterator[tuple[str, str | None]]:
    """(path, problem) for every input: files as given, folders searched recursively for images.

    Files in those folders that are not images are counted by suffix in `skipped`, for the summary.
    """
    from edgeshort.runtime.preprocess import IMAGE_SUFFIXES, list_image_files

    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found, others = list_image_files(path, recursive=True)
            if skipped is not None:
                skipped.update(p.suffix.lower() or "no suffix" for p in others)
            if not found:
                yield name, (f"expected image files ({', '.join(IMAGE_SUFFIXES)}) under the folder {name!r}, "
                             "found none; check the folder")
            for p in found:
                yield str(p), None
        else:
            # Missing or unreadable files are reported when they are read, with the loader's message.
            yield name, None


class RecordWriter:
    """JSONL, a JSON array (.json) or CSV records, to a file or stdout; CSV has one logit column per class and output."""

    def __init__(self, out: str | None, class_names: tuple[str, ...]) -> None:
        self.path = Path(out) if out else None
        suffix = self.path.suffix.lower() if self.path is not None else ".jsonl"
        if suffix not in (".csv", ".jsonl", ".json"):
            from edgeshort.errors import InputError

            raise InputError(f"expected --out to end in .jsonl, .json or .csv, got {out!r}; rename it")
        self.csv, self.array = suffix == ".csv", suffix == ".json"
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w", newline="") if self.path else sys.stdout
        self._writer = None
        self._written = 0
        if self.csv:
            logit_columns = [f"{kind}_{name}" for kind in ("logit", "ablated_logit", "dfr_logit") for name in class_names]
            columns = [f for f in RECORD_FIELDS if not f.endswith("logits")] + logit_columns
            self._writer = csv.DictWriter(self._fh, fieldnames=columns)
            self._writer.writeheader()
        self.class_names = class_names

    def write(self, record: dict) -> None:
        if self.array:
            # Streamed element by element, so a long run holds no records in memory.
            self._fh.write(("[\n" if self._written == 0 else ",\n") + json.dumps(record))
        elif self._writer is None:
            self._fh.write(json.dumps(record) + "\n")
        else:
            row = {k: v for k, v in record.items() if not k.endswith("logits")}
            for kind, key in (("logit", "logits"), ("ablated_logit", "ablated_logits"), ("dfr_logit", "dfr_logits")):
                for name, value in zip(self.class_names, record.get(key) or []):
                    row[f"{kind}_{name}"] = value
            self._writer.writerow({k: _spreadsheet_safe(v) for k, v in row.items()})
        self._written += 1

    def close(self) -> None:
        if self.array:
            self._fh.write("\n]\n" if self._written else "[]\n")
        if self.path is not None:
            self._fh.close()
        else:
            self._fh.flush()


def _spreadsheet_safe(value):
    """A CSV cell a spreadsheet shows as text: a leading =, +, - or @ would make it a formula."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return value


def printable(path: str) -> str:
    """A file name as text any JSON or CSV reader takes: bytes that are not UTF-8 (Python keeps them as
    lone surrogates) are written as \\xNN escapes instead of stopping the writer."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def error_record(path: str, message: str) -> dict:
    return {**dict.fromkeys(RECORD_FIELDS), "path": printable(path), "error": printable(message)}


def result_record(path: str, result, overlay: str | None) -> dict:
    return {
        "path": printable(path), "label": result.class_name, "ablated_label": result.ablated_class_name,
        "dfr_label": result.dfr_class_name, "final_label": result.final_class_name,
        "final_probability": result.final_probability, "shortcut_present": result.shortcut_present,
        "flagged_patches": result.flagged_patches, "warning": result.warning,
        "logits": np.asarray(result.logits, float).tolist(),
        "ablated_logits": np.asarray(result.ablated_logits, float).tolist(),
        "dfr_logits": None if result.dfr_logits is None else np.asarray(result.dfr_logits, float).tolist(),
        "overlay": overlay, "error": None,
    }


class OverlayWriter:
    """One PNG per image, named after the file; a repeated name gets a numeric suffix."""

    def __init__(self, folder: str, preprocessing) -> None:
        self.preprocessing = preprocessing  # the flags cover only the part of the image the model sees
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._used: set[str] = set()

    def write(self, path: str, image, result) -> str:
        from PIL import Image

        from edgeshort.report.draw import guard_overlay

        seen = self.preprocessing.seen_part(image).convert("RGB")
        if max(seen.size) > OVERLAY_MAX_SIDE:
            seen.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE), Image.Resampling.BILINEAR)
        pixels = np.asarray(seen)
        scale = max(1, -(-OVERLAY_MIN_SIDE // max(1, min(pixels.shape[:2]))))
        picture = guard_overlay(pixels, result.saliency, result.flags, scale=scale)
        stem = Path(path).stem or "image"
        name, n = f"{stem}.png", 1
        while name in self._used:
            n += 1
            name = f"{stem}-{n}.png"
        self._used.add(name)
        target = self.folder / name
        picture.save(target)
        return str(target)


def run(args) -> int:
    from edgeshort.errors import EdgeshortError, InputError
    from edgeshort.runtime import Guard
    from edgeshort.runtime.preprocess import DEFAULT_MAX_PIXELS, load_image, map_images

    if args.drop_tokens and not args.split:
        raise InputError("--drop-tokens works on the split graphs; add --split")
    for flag, value in (("--batch-size", args.batch_size), ("--threads", args.threads),
                        ("--max-pixels", args.max_pixels)):
        if value is not None and value < 1:
            raise InputError(f"expected {flag} of at least 1, got {value}")
    guard = Guard.load(args.bundle, backend=args.backend, device=args.device, threads=args.threads,
                       precision=args.precision, max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels)
    try:  # both outputs are made before either is written, so a bad one costs no earlier results
        overlays = OverlayWriter(args.overlays, guard.preprocessing) if args.overlays else None
        writer = RecordWriter(args.out, guard.class_names)
    except OSError as exc:
        raise InputError(f"cannot write the outputs ({exc}); choose an --out file and an --overlays folder "
                         "you can write, not an existing file for the folder") from exc
    counts = {"images": 0, "shortcut_present": 0, "failed": 0, "warned": 0}

    def fail(path: str, message: str) -> None:
        print(f"edgeshort predict: {path}: {message}", file=sys.stderr)
        writer.write(error_record(path, message))
        counts["failed"] += 1

    def flush(pending: list) -> None:
        """Decode the batch's files on threads, predict the readable ones, write records in file order."""
        if not pending:
            return

        def load(i: int, path: str):
            """-> (image, None), or (None, problem): a file that cannot be read becomes its record's error."""
            if pending[i][1] is not None:
                return None, pending[i][1]
            try:
                return load_image(path, guard.max_pixels), None
            except EdgeshortError as exc:
                return None, str(exc)

        loaded = map_images(load, [path for path, _ in pending], args.threads)
        images = [image for image, _ in loaded if image is not None]
        results = iter(guard.predict(images, batch_size=args.batch_size, path="split" if args.split else None,
                                     drop_tokens=args.drop_tokens) if images else ())
        for (path, _), (image, problem) in zip(pending, loaded):
            if problem is not None:
                fail(path, problem)
                continue
            result = next(results)
            overlay = overlays.write(path, image, result) if overlays else None
            writer.write(result_record(path, result, overlay))
            counts["images"] += 1
            counts["shortcut_present"] += int(result.shortcut_present)
            counts["warned"] += int(result.warning is not None)
        pending.clear()

    pending: list = []
    skipped: Counter = Counter()
    try:
        for entry in image_files(args.images, skipped):
            pending.append(entry)
            if len(pending) >= args.batch_size:
                flush(pending)
        flush(pending)
    finally:
        writer.close()
    if not args.quiet:
        where = f" -> {args.out}" if args.out else ""
        print(f"{counts['images']} images predicted, {counts['shortcut_present']} with a shortcut, "
              f"{counts['failed']} failed{where} ({guard.info.backend}, {guard.info.precision})", file=sys.stderr)
        if counts["warned"]:
            print(f"{counts['warned']} with flags over most of the image: see their records' warning and review "
                  "them by hand", file=sys.stderr)
        if skipped:
            kinds = ", ".join(f"{suffix} {n}" for suffix, n in sorted(skipped.items()))
            total = sum(skipped.values())
            print(f"skipped {total} file{'s' if total != 1 else ''} in the folders that are not images ({kinds}); "
                  "pass a file by name to try it anyway", file=sys.stderr)
    return 1 if counts["failed"] else 0

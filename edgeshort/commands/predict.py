"""`edgeshort predict BUNDLE IMAGES…`: guarded predictions as JSONL/CSV, and overlay PNGs on request.

Torch-free: only the runtime is imported. Images are read and predicted a batch at a time, so
memory stays bounded however many files are given; a file that cannot be read becomes an error
record and the others are still predicted. docs/runtime.md describes the records, exit codes,
overlays and folder search.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edgeshort.detect.verdict import FOUND

RECORD_FIELDS = ("path", "label", "ablated_label", "dfr_label", "final_label", "final_probability", "shortcut_present",
                 "flagged_patches", "warning", "logits", "ablated_logits", "dfr_logits", "overlay", "error",
                 "bundle_sha256", "runtime")
# A long run prints a line on stderr this often (a log file gets lines, not a redrawn bar).
PROGRESS_EVERY_S = 10.0
# Overlays are drawn at least this many pixels on the short side, so small inputs stay readable, and
# at most this many on the long side, so a 12-MP photo's outlines are not too thin to see on a screen.
OVERLAY_MIN_SIDE = 256
OVERLAY_MAX_SIDE = 1024
# Exit codes; 2 (bad arguments, bundle or outputs, before any prediction) comes from edgeshort.cli.
EXIT_INPUTS_FAILED = 1
EXIT_STOPPED = 3
EXIT_CODES = """exit codes:
  0  every input was predicted
  1  some inputs could not be read: their records carry `error`, the others were predicted
  2  bad arguments, bundle or outputs: stopped before any prediction
  3  stopped part-way (an output could not be written, e.g. a full disk): the records written so
     far are complete, the rest are missing"""


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the exit codes' lines
    parser.epilog = EXIT_CODES
    parser.add_argument("bundle", help="bundle folder written by `edgeshort export`")
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively, following links; hidden "
                                               "files are skipped and counted)")
    parser.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "openvino"),
                        help="inference backend (auto: OpenVINO when installed and the bundle has OpenVINO IR, on "
                             "Intel CPUs, for --device GPU/NPU/AUTO or --precision bf16/int8; else ONNX Runtime)")
    parser.add_argument("--device", help="OpenVINO device (CPU, GPU, NPU, AUTO) or ONNX Runtime device (cpu, cuda, "
                                         "coreml, directml); CPU alone leaves the backend to --backend")
    parser.add_argument("--threads", type=int, help="inference threads (default: the backend's choice)")
    parser.add_argument("--precision", default="f32", choices=("f32", "bf16", "int8"),
                        help="OpenVINO inference precision: f32 (default), bf16 on CPUs that have it, or the "
                             "bundle's INT8 guarded and plain graphs (export --int8)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per inference call (default 8)")
    parser.add_argument("-o", "--out", help="write records to this .jsonl, .json (one array) or .csv file (default: JSONL on stdout)")
    parser.add_argument("--overlays", help="folder for overlay PNGs (image + saliency + flagged patches), apart from the "
                                          "inputs; each is named after its input's path, with .png added")
    parser.add_argument("--split", action="store_true", help="run embed -> guard -> encoder_head instead of the fused graph")
    parser.add_argument("--drop-tokens", action="store_true", help="with --split: remove flagged tokens instead of masking")
    parser.add_argument("--max-pixels", type=int, help="refuse images with more pixels than this (default 50 "
                                                         "million)")
    parser.add_argument("--bundle-sha256", metavar="HEX",
                        help="run only the bundle whose manifest.json has this sha256 (records carry it as "
                             "bundle_sha256): a bundle re-exported or re-sealed since you checked it is refused")
    parser.add_argument("--map-weights", action="store_true",
                        help="ONNX Runtime: run on the bundle's weights file as the OS maps it, one copy in memory for "
                             "all graphs and processes, without ONNX Runtime's prepacked copy per graph (see bench)")
    parser.add_argument("--quiet", action="store_true", help="no summary or progress lines on stderr (warnings still show)")


class OutputFailure(Exception):
    """An output could not be written part-way through a run (a full disk, a folder removed)."""


class InputFile(NamedTuple):
    path: str  # as the user gave it, or as found under a folder they gave
    problem: str | None  # why it cannot be read, known before reading it
    overlay_name: str | None  # its overlay's path under --overlays


@dataclass
class InputSearch:
    """The inputs in prediction order, what the folder search left out, and where the inputs really are."""

    files: list[InputFile] = field(default_factory=list)
    other_suffixes: Counter = field(default_factory=Counter)  # files that are not images, by suffix
    hidden: list[str] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)  # links to a folder searched already
    real_folders: list[Path] = field(default_factory=list)
    real_files: list[Path] = field(default_factory=list)  # files given by name and image links' targets

    def skipped_lines(self) -> list[str]:
        """The summary's account of everything in the folders that was not predicted."""
        lines = []
        if self.other_suffixes:
            kinds = ", ".join(f"{suffix} {n}" for suffix, n in sorted(self.other_suffixes.items()))
            total = sum(self.other_suffixes.values())
            lines.append(f"skipped {total} file{'s' if total != 1 else ''} in the folders that are not images "
                         f"({kinds}); pass a file by name to try it anyway")
        if self.hidden:
            lines.append(f"skipped {len(self.hidden)} hidden file{'s' if len(self.hidden) != 1 else ''} or folder"
                         f"{'s' if len(self.hidden) != 1 else ''} (names starting with '.': {_examples(self.hidden)}); "
                         "pass one by name to include it")
        if self.repeated:
            lines.append(f"skipped {len(self.repeated)} link{'s' if len(self.repeated) != 1 else ''} to a folder "
                         f"searched already ({_examples(self.repeated)}); its images are predicted once, under the "
                         "other path")
        return lines


def _examples(paths: list[str], shown: int = 3) -> str:
    return ", ".join(paths[:shown]) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def overlay_name(relative: str) -> str:
    """An input's overlay path under --overlays: its path with .png added, unless it already ends in .png,
    so that a.jpg and a.png beside it keep apart (a.jpg.png, a.png) and each maps back to its input."""
    return relative if relative.endswith(".png") else relative + ".png"


def find_inputs(names: list[str]) -> InputSearch:
    """Every input in order: files as given, folders searched recursively for images (sorted by path).

    A folder's images keep their path under it for their overlay's name; a file given by name keeps its name.
    """
    from edgeshort.runtime.preprocess import IMAGE_SUFFIXES, search_folder

    search = InputSearch()
    for name in names:
        path = Path(name)
        if not path.is_dir():
            # Missing or unreadable files are reported when they are read, with the loader's message.
            search.files.append(InputFile(name, None, overlay_name(path.name or "image")))
            try:
                search.real_files.append(path.resolve())
            except (OSError, RuntimeError):  # a link loop: reading it gives its record's error
                search.real_files.append(path.absolute())
            continue
        contents = search_folder(path)
        search.other_suffixes.update(p.suffix.lower() or "no suffix" for p in contents.others)
        search.hidden += map(str, contents.hidden)
        search.repeated += map(str, contents.repeated)
        search.real_folders += contents.folders
        search.real_files += contents.linked_images
        if not contents.images and not contents.problems:
            search.files.append(InputFile(name, f"expected image files ({', '.join(IMAGE_SUFFIXES)}) under the folder "
                                                f"{name!r}, found none; check the folder", None))
        found = [InputFile(str(p), None, overlay_name(str(p.relative_to(path)))) for p in contents.images]
        found += [InputFile(str(p), problem, None) for p, problem in contents.problems]
        search.files += sorted(found, key=lambda entry: Path(entry.path))
    return search


def check_overlays_apart(folder: str, search: InputSearch) -> None:
    """Refuse an --overlays folder that overlaps the inputs: its PNGs could replace images, or be read as
    inputs by the next run."""
    from edgeshort.errors import InputError

    overlays = Path(folder).resolve()
    fix = "choose an --overlays folder outside the inputs"
    for real in search.real_folders:
        relation = ("is" if overlays == real else "is inside" if overlays.is_relative_to(real)
                    else "contains" if real.is_relative_to(overlays) else None)
        if relation:
            raise InputError(f"--overlays {folder!r} {relation} the input folder {str(real)!r}: overlay PNGs would "
                             f"mix with the images, could replace them, and a later run would read them; {fix}")
    for real in search.real_files:
        if real.is_relative_to(overlays):
            raise InputError(f"--overlays {folder!r} contains the input file {str(real)!r}, which an overlay could "
                             f"replace; {fix}")


def check_records_apart(out: str, search: InputSearch, bundle_root: Path, bundle_files, overlays: str | None) -> None:
    """Refuse an --out that would overwrite one of the bundle's files or an input before it is read, or that is
    the --overlays folder itself."""
    from edgeshort.errors import InputError
    from edgeshort.runtime.bundle import MANIFEST

    try:
        target = Path(out).resolve()
    except (OSError, RuntimeError):  # a link loop: opening it gives its own error
        return
    fix = "choose another --out file"
    own_files = {(bundle_root / name).resolve() for name in (MANIFEST, *bundle_files)}
    if target in own_files:
        raise InputError(f"--out {out!r} is one of the bundle's own files: the records would replace it, and the "
                         f"next load would refuse the bundle; {fix}")
    if target in search.real_files:
        raise InputError(f"--out {out!r} is one of the inputs: it would be emptied before it is read; {fix}")
    if overlays and target == Path(overlays).resolve():
        raise InputError(f"--out {out!r} and --overlays {overlays!r} name the same path; {fix}")


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
        # Unbuffered bytes: a record counts once it is on disk, and a failed one is cut back off.
        self._file = open(self.path, "wb", buffering=0) if self.path else None
        self._good = 0  # bytes of complete records (and the header) in the file
        self._written = 0
        self.class_names = class_names
        self._columns = None
        if self.csv:
            logit_columns = [f"{kind}_{name}" for kind in ("logit", "ablated_logit", "dfr_logit") for name in class_names]
            self._columns = [f for f in RECORD_FIELDS if not f.endswith("logits")] + [printable(c) for c in logit_columns]
            self._emit(self._csv_line(dict(zip(self._columns, self._columns))))

    def _csv_line(self, row: dict) -> str:
        line = io.StringIO()
        csv.DictWriter(line, fieldnames=self._columns).writerow(row)
        return line.getvalue()

    def _emit(self, text: str) -> None:
        """Write `text` whole, or cut the file back to its last complete record and raise."""
        if self._file is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        data = memoryview(text.encode("utf-8"))
        try:
            while data:
                data = data[self._file.write(data):]
        except OSError:
            with contextlib.suppress(OSError):  # a device (/dev/full) cannot be truncated
                os.ftruncate(self._file.fileno(), self._good)
                self._file.seek(self._good)
            raise
        self._good = self._file.tell()

    def write(self, record: dict) -> None:
        if self.array:
            # Streamed element by element, so a long run holds no records in memory.
            text = ("[\n" if self._written == 0 else ",\n") + json.dumps(record)
        elif not self.csv:
            text = json.dumps(record) + "\n"
        else:
            row = {k: v for k, v in record.items() if not k.endswith("logits")}
            for kind, key in (("logit", "logits"), ("ablated_logit", "ablated_logits"), ("dfr_logit", "dfr_logits")):
                for name, value in zip(self.class_names, record.get(key) or []):
                    row[printable(f"{kind}_{name}")] = value
            text = self._csv_line({k: _spreadsheet_safe(v) for k, v in row.items()})
        self._emit(text)
        self._written += 1

    @property
    def written(self) -> int:
        """Records written whole."""
        return self._written

    def close(self) -> None:
        try:
            if self.array:
                self._emit("\n]\n" if self._written else "[]\n")
        finally:
            if self._file is not None:
                self._file.close()


def _spreadsheet_safe(value):
    """A CSV cell a spreadsheet shows as text: a leading =, +, - or @ (or a tab or carriage return before one,
    which some spreadsheets skip) would make it a formula."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def printable(text: str) -> str:
    """Text any JSON or CSV reader takes: bytes of a file name that are not UTF-8 (Python keeps them as
    lone surrogates) are written as \\xNN escapes instead of stopping the writer."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (a JSON \ud800 escape): written as \uXXXX
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _printable_fields(record: dict) -> dict:
    return {key: printable(value) if isinstance(value, str) else value for key, value in record.items()}


def error_record(path: str, message: str) -> dict:
    return _printable_fields({**dict.fromkeys(RECORD_FIELDS), "path": path, "error": message})


def result_record(path: str, result, overlay: str | None) -> dict:
    return _printable_fields({
        "path": path, "label": result.class_name, "ablated_label": result.ablated_class_name,
        "dfr_label": result.dfr_class_name, "final_label": result.final_class_name,
        "final_probability": result.final_probability, "shortcut_present": result.shortcut_present,
        "flagged_patches": result.flagged_patches, "warning": result.warning,
        "logits": np.asarray(result.logits, float).tolist(),
        "ablated_logits": np.asarray(result.ablated_logits, float).tolist(),
        "dfr_logits": None if result.dfr_logits is None else np.asarray(result.dfr_logits, float).tolist(),
        "overlay": overlay, "error": None,
    })


class OverlayWriter:
    """One PNG per image, at its name from `overlay_name`; a name two inputs share gets -2, -3, ... added."""

    def __init__(self, folder: str, preprocessing) -> None:
        self.preprocessing = preprocessing  # the flags cover only the part of the image the model sees
        self.folder = Path(folder)
        from edgeshort.runtime.backends import make_writable_folder

        make_writable_folder(self.folder)
        self._used: set[str] = set()
        self.renamed = 0

    def picture(self, image):
        """The part of a decoded image an overlay shows (the part the model sees), at most OVERLAY_MAX_SIDE."""
        from PIL import Image

        seen = self.preprocessing.seen_part(image).convert("RGB")
        if max(seen.size) > OVERLAY_MAX_SIDE:
            seen.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE), Image.Resampling.BILINEAR)
        return seen

    def write(self, path: str, picture, result, name: str | None = None) -> str:
        """Draw `result` over `picture` (from `picture(image)`) and save it as PNG; returns its path."""
        from edgeshort.report.draw import guard_overlay

        pixels = np.asarray(picture)
        scale = max(1, -(-OVERLAY_MIN_SIDE // max(1, min(pixels.shape[:2]))))
        picture = guard_overlay(pixels, result.saliency, result.flags, scale=scale)
        name = name or overlay_name(Path(path).name or "image")
        unique, n = name, 1
        while unique in self._used:  # e.g. two folders given that hold the same file names
            n += 1
            unique = f"{name[:-len('.png')]}-{n}.png"
        self.renamed += unique != name
        self._used.add(unique)
        target = self.folder / unique
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target, format="PNG")
        return str(target)


def run(args) -> int:
    from edgeshort.errors import EdgeshortError, InputError
    from edgeshort.runtime import Guard
    from edgeshort.runtime.guard import PreparedImage
    from edgeshort.runtime.preprocess import DEFAULT_MAX_PIXELS, load_image, map_images, preprocess_image

    if args.drop_tokens and not args.split:
        raise InputError("--drop-tokens works on the split graphs; add --split")
    for flag, value in (("--batch-size", args.batch_size), ("--threads", args.threads),
                        ("--max-pixels", args.max_pixels)):
        if value is not None and value < 1:
            raise InputError(f"expected {flag} of at least 1, got {value}")
    if args.max_pixels is not None:
        from PIL import Image

        if Image.MAX_IMAGE_PIXELS is not None and args.max_pixels > Image.MAX_IMAGE_PIXELS:
            # This process is the CLI's own: Pillow's decompression-bomb guard moves up to --max-pixels, which
            # edgeshort's header check enforces before any image is decoded.
            Image.MAX_IMAGE_PIXELS = args.max_pixels
    guard = Guard.load(args.bundle, backend=args.backend, device=args.device, threads=args.threads,
                       precision=args.precision, max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels,
                       expected_sha256=args.bundle_sha256, map_weights=args.map_weights)
    predict_options = {"batch_size": args.batch_size, "path": "split" if args.split else None,
                       "drop_tokens": args.drop_tokens}
    guard.predict([], **predict_options)  # no images: only checks the options against the bundle (--split), now
    inputs = find_inputs(args.images)
    # Both outputs are checked before either is written, so a bad one costs no earlier results.
    if args.out:
        check_records_apart(args.out, inputs, guard.bundle.root, guard.bundle.manifest["files"], args.overlays)
    if args.overlays:
        check_overlays_apart(args.overlays, inputs)
        try:
            overlays = OverlayWriter(args.overlays, guard.preprocessing)
        except OSError as exc:
            raise InputError(f"cannot write the overlays to {args.overlays!r} ({exc.strerror or exc}); choose an "
                             "--overlays folder you can write (not an existing file)") from exc
    else:
        overlays = None
    try:
        writer = RecordWriter(args.out, guard.class_names)
    except OSError as exc:
        raise InputError(f"cannot write the records to {args.out!r} ({exc.strerror or exc}); choose an --out file "
                         "you can write") from exc
    counts = {"images": 0, "shortcut_present": 0, "failed": 0, "warned": 0}
    records_at = args.out or "stdout"
    # Every record names what produced it, so records pooled from several runs stay traceable.
    info = guard.info
    produced_by = {"bundle_sha256": info.manifest_sha256,
                   "runtime": " ".join(str(part) for part in (info.backend, info.backend_version, info.precision,
                                                               info.device, info.map_weights and "mapped-weights")
                                       if part)}

    def write_record(record: dict) -> None:
        try:
            writer.write({**record, **produced_by})
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputFailure(f"cannot write the records to {records_at} ({exc.strerror or exc})") from exc

    def fail(path: str, message: str) -> None:
        print(f"edgeshort predict: {path}: {message}", file=sys.stderr)
        write_record(error_record(path, message))
        counts["failed"] += 1

    def flush(pending: list[InputFile]) -> None:
        """Decode the batch's files on threads, predict the readable ones, write records in file order."""
        if not pending:
            return

        def load(i: int, path: str):
            """-> ((model input, overlay picture), None), or (None, problem): a file that cannot be read becomes
            its record's error. The batch keeps no decoded image: a 7000 x 7000 PNG is 140 MiB of pixels."""
            if pending[i].problem is not None:
                return None, pending[i].problem
            try:
                image = load_image(path, guard.max_pixels)
            except EdgeshortError as exc:
                return None, str(exc)
            prepared = PreparedImage(preprocess_image(image, guard.preprocessing), image.size, path)
            return (prepared, overlays.picture(image) if overlays else None), None

        loaded = map_images(load, [entry.path for entry in pending], args.threads)
        prepared = [item[0] for item, _ in loaded if item is not None]
        results = iter(guard.predict(prepared, **predict_options) if prepared else ())
        for entry, (item, problem) in zip(pending, loaded):
            if problem is not None:
                fail(entry.path, problem)
                continue
            result = next(results)
            try:
                overlay = overlays.write(entry.path, item[1], result, entry.overlay_name) if overlays else None
            except OSError as exc:
                raise OutputFailure(f"cannot write the overlay of {entry.path!r} to {args.overlays!r} "
                                    f"({exc.strerror or exc})") from exc
            write_record(result_record(entry.path, result, overlay))
            counts["images"] += 1
            counts["shortcut_present"] += int(result.shortcut_present)
            counts["warned"] += int(result.warning is not None)
        pending.clear()

    started = last_report = time.monotonic()

    def report_progress() -> None:
        nonlocal last_report
        now = time.monotonic()
        if args.quiet or now - last_report < PROGRESS_EVERY_S:
            return
        last_report = now
        done, total = counts["images"] + counts["failed"], len(inputs.files)
        rate = done / max(now - started, 1e-9)
        print(f"edgeshort predict: {done:,} of {total:,} inputs ({rate:.1f}/s, about "
              f"{_duration((total - done) / rate if rate else 0)} left)", file=sys.stderr, flush=True)

    stopped_by = None
    try:
        pending: list[InputFile] = []
        for entry in inputs.files:
            pending.append(entry)
            if len(pending) >= args.batch_size:
                flush(pending)
                report_progress()
        flush(pending)
    except BrokenPipeError:
        raise  # the reader of stdout stopped early (`| head`): edgeshort.cli ends quietly
    except Exception as exc:  # anything that stops the run part-way exits 3: 1 means some inputs failed
        stopped_by = exc
        if not isinstance(exc, (OutputFailure, EdgeshortError)):
            traceback.print_exc()  # not a problem of the outputs or inputs: keep where it happened
    finally:
        try:
            writer.close()
        except BrokenPipeError:
            raise
        except OSError as exc:
            stopped_by = stopped_by or OutputFailure(f"cannot finish the records in {records_at} "
                                                     f"({exc.strerror or exc})")
    if stopped_by is not None:
        if isinstance(stopped_by, OutputFailure):
            cause = f"{stopped_by}; free space, or choose outputs you can write, and run again"
        elif isinstance(stopped_by, EdgeshortError):
            cause = str(stopped_by)  # says what to do itself
        else:
            cause = f"{type(stopped_by).__name__}: {stopped_by} (the trace above shows where)"
        done = writer.written
        print(f"edgeshort predict: error: stopped after {done} of {len(inputs.files)} inputs: {cause}. The records "
              f"of those {done} are in {records_at}", file=sys.stderr)
        return EXIT_STOPPED
    if not args.quiet:
        where = f" -> {args.out}" if args.out else ""
        verdict = guard.info.verdict
        flagged = (f"{counts['shortcut_present']} with a shortcut" if verdict in (None, FOUND) else
                   f"{counts['shortcut_present']} with tokens flagged and masked (the bundle's verdict is "
                   f"'{verdict}', not 'found': the flags need not mark a shortcut)")
        print(f"{counts['images']} images predicted, {flagged}, "
              f"{counts['failed']} failed{where} ({guard.info.backend}, {guard.info.precision})", file=sys.stderr)
        if counts["warned"]:
            print(f"{counts['warned']} with a warning (flags over most of the image, or an image far smaller than "
                  "the model's input): see their records' warning and review them by hand", file=sys.stderr)
        for line in inputs.skipped_lines():
            print(line, file=sys.stderr)
        if overlays is not None and overlays.renamed:
            print(f"{overlays.renamed} overlay{'s' if overlays.renamed != 1 else ''} got a -2, -3, ... suffix, as "
                  "inputs from different folders share a name; each record's overlay field names its own",
                  file=sys.stderr)
    return EXIT_INPUTS_FAILED if counts["failed"] else 0


def _duration(seconds: float) -> str:
    """'45 s', '12 min', '2.5 h': how long is left, to the precision a waiting user needs."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

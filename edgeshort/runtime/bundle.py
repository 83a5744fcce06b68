"""The bundle format: a folder of ONNX / OpenVINO IR graphs and a `manifest.json` describing them.

The runtime owns this format (it is the lower, torch-free layer); export writes bundles
through it. Loading verifies the format version and every file's sha256 before anything runs; the
backends then turn "IR version too new" into a `BundleError` that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgeshort.errors import BundleError, InputError
from edgeshort.runtime.preprocess import Preprocessing

# The newest format this edgeshort reads. 2 added the centre crop (`crop_pct` in the preprocessing).
BUNDLE_FORMAT = 3
MANIFEST = "manifest.json"
# The graphs of a bundle and what they compute; every one is in ONNX and, optionally, OpenVINO IR.
GRAPHS = {
    "guarded": "image -> ablated logits (+ DFR logits), flags, raw flags, shortcut present, saliency",
    "plain": "image -> logits of the unguarded model",
    "embed": "image -> tokens",
    "guard": "tokens -> flags, raw flags, shortcut present, keep mask, saliency",
    "encoder_head": "tokens + keep mask -> logits (+ DFR logits)",
    "guarded_int8": "the guarded graph quantised to INT8 (OpenVINO IR only, optional)",
    "plain_int8": "the plain graph quantised to INT8 (OpenVINO IR only, optional)",
}
# The INT8 twin of each fused graph (`edgeshort export --int8`). Bundles exported before plain_int8
# existed hold guarded_int8 alone; their plain prediction runs in f32.
INT8_GRAPHS = {"guarded": "guarded_int8", "plain": "plain_int8"}
# The two ways to run the guard; a bundle holds either or both (`edgeshort export --graphs`).
FUSED_GRAPHS = ("guarded", "plain")
SPLIT_GRAPHS = ("embed", "guard", "encoder_head")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The manifest's own hash, over its content without this key. The files' hashes cover the graphs;
# this covers what the runtime reads beside them (class names, preprocessing, guard settings), so a
# hand edit that would silently change every answer, such as swapped class names, is refused.
SEAL = "seal"


def manifest_seal(manifest: dict) -> str:
    content = {k: v for k, v in manifest.items() if k != SEAL}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _unreadable(path: Path, exc: OSError) -> BundleError:
    return BundleError(f"cannot read {str(path)!r} ({exc.strerror or exc}); give this user read access to the whole "
                       "bundle (e.g. chmod -R a+rX on the folder)")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder and its manifest."""

    root: Path
    manifest: dict
    manifest_sha256: str = ""  # of the manifest.json bytes this was read from

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.manifest["model"]["preprocessing"])

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["class_names"])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.manifest["model"]["grid"])

    @property
    def num_prefix(self) -> int:
        return int(self.manifest["model"]["num_prefix"])

    @property
    def has_dfr(self) -> bool:
        return bool(self.manifest["guard"].get("has_dfr"))

    def formats(self, graph: str) -> dict[str, str]:
        return self.manifest["graphs"].get(graph, {}).get("files", {})

    def has_graphs(self, graphs: tuple[str, ...]) -> bool:
        return _has_graphs(self.manifest, graphs)

    def int8_graph(self, graph: str) -> str:
        """The graph that runs `graph` at precision int8: its INT8 twin where the bundle holds one, else itself
        (a bundle exported before plain_int8 existed runs its plain graph in f32)."""
        twin = INT8_GRAPHS.get(graph)
        return twin if twin in self.manifest["graphs"] else graph

    def path(self, graph: str, fmt: str) -> Path:
        files = self.formats(graph)
        if graph not in self.manifest["graphs"]:
            raise BundleError(
                f"bundle {str(self.root)!r} has no graph {graph!r} (it has {sorted(self.manifest['graphs'])}); "
                "run it on the graphs it has (fused: guarded + plain, split: embed + guard + encoder_head) or "
                "re-export with `edgeshort export RUN -o BUNDLE --graphs all`"
            )
        if fmt not in files:
            have = ", ".join(f"{g}: {sorted(v.get('files', {}))}" for g, v in self.manifest["graphs"].items())
            raise BundleError(
                f"bundle {str(self.root)!r} has no {fmt} file for graph {graph!r} (it has {have}); "
                f"export it with `edgeshort export RUN -o BUNDLE --formats onnx,openvino`"
            )
        return self.root / files[fmt]

    @property
    def shares_onnx_weights(self) -> bool:
        """Whether its ONNX graphs keep their weights in one shared file (`onnx_external_data`): bundles
        exported before it existed hold them inside each graph."""
        return all(entry.get("onnx_external_data") for entry in self.manifest["graphs"].values()
                   if "onnx" in entry.get("files", {}))

    @property
    def verdict(self) -> str | None:
        """The detection run's verdict: 'found', 'unconfirmed', or 'none' / 'harmful' for a bundle exported
        against it (--ignore-verdict); None for bundles exported before verdicts existed."""
        verdict = self.manifest["guard"].get("verdict")
        return verdict["verdict"] if verdict else None

    def outputs(self, graph: str) -> list[str]:
        return list(self.manifest["graphs"][graph]["outputs"])


def _has_graphs(manifest: dict, graphs: tuple[str, ...]) -> bool:
    return all(g in manifest["graphs"] for g in graphs)


def _format_needed(manifest: dict) -> int:
    """The oldest format that reads this bundle right, so older runtimes keep loading what they can."""
    # Format 2 readers expect the fused graphs; format 1 readers also know no crop and would silently
    # stretch a cropping model's input.
    if not _has_graphs(manifest, FUSED_GRAPHS):
        return 3
    return 2 if manifest["model"]["preprocessing"].get("crop_pct") is not None else 1


def format_file_names(name: str) -> list[str]:
    """A graph file and the file it needs beside it of its own: an OpenVINO IR's weights (`.bin`)."""
    return [name, name[:-4] + ".bin"] if name.endswith(".xml") else [name]


def graph_file_names(graph: dict) -> list[str]:
    """Every file a graph entry runs from: its graph files, an IR's weights (`.bin`), and the ONNX graphs'
    shared weights file (`onnx_external_data`, which the ONNX files name and ONNX Runtime reads beside them)."""
    names = []
    for name in graph.get("files", {}).values():
        names += format_file_names(name)
    if graph.get("onnx_external_data"):
        names.append(graph["onnx_external_data"])
    return names


def write_manifest(root: str | Path, manifest: dict) -> Path:
    """Hash every listed file and write `manifest.json` (the last file written to a bundle)."""
    root = Path(root)
    files = {}
    for graph in manifest["graphs"].values():
        for name in graph_file_names(graph):
            p = root / name
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    for extra in manifest.get("extra_files", []):
        p = root / extra
        files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {**manifest, "format": _format_needed(manifest), "files": files}
    manifest[SEAL] = manifest_seal(manifest)
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    return path


# What the runtime reads from a manifest, checked at load so that a manifest sealed anew by hand (the
# seal has no key) fails with its field named instead of a traceback or a wrong answer mid-run.
def _check_structure(manifest: dict, path: Path) -> None:
    def expect(ok: bool, field: str, expected: str, got) -> None:
        if not ok:
            raise BundleError(f"{str(path)!r}: expected {field} to be {expected}, got {got!r:.120}; "
                              "re-export the bundle (edgeshort export RUN -o BUNDLE)")

    for key in ("model", "class_names", "guard", "graphs", "files"):
        if key not in manifest:
            raise BundleError(f"{str(path)!r} lacks {key!r}; re-export the bundle")
    model, names = manifest["model"], manifest["class_names"]
    for key in ("model", "guard", "graphs", "files"):
        expect(isinstance(manifest[key], dict), key, "an object", manifest[key])
    expect(isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) and n for n in names)
           and len(set(names)) == len(names), "class_names", "a list of two or more distinct names", names)
    expect(model.get("num_classes", len(names)) == len(names), "model.num_classes",
           f"the number of class_names ({len(names)})", model.get("num_classes"))
    for key in ("grid", "num_prefix", "preprocessing"):
        expect(key in model, f"model.{key}", "present", None)
    grid = model["grid"]
    expect(isinstance(grid, list) and len(grid) == 2 and all(_whole(g, 1) for g in grid), "model.grid",
           "two positive whole numbers", grid)
    expect(_whole(model["num_prefix"], 0), "model.num_prefix", "a whole number >= 0", model["num_prefix"])
    try:
        Preprocessing.from_dict(model["preprocessing"])
    except (InputError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{str(path)!r}: its model.preprocessing is unusable ({exc}); re-export the bundle") from exc
    guard = manifest["guard"]
    warnings = guard.get("warnings") or []
    expect(isinstance(warnings, list) and all(isinstance(w, str) for w in warnings), "guard.warnings",
           "a list of texts", warnings)
    verdict = guard.get("verdict")
    expect(verdict is None or (isinstance(verdict, dict) and isinstance(verdict.get("verdict"), str)
                               and isinstance(verdict.get("summary"), str)),
           "guard.verdict", "an object with verdict and summary texts", verdict)
    enlargement = guard.get("calibration_enlargement") or 1.0
    expect(isinstance(enlargement, (int, float)) and not isinstance(enlargement, bool) and enlargement > 0,
           "guard.calibration_enlargement", "a positive number", enlargement)
    for graph, entry in manifest["graphs"].items():
        expect(isinstance(entry, dict) and isinstance(entry.get("files", {}), dict)
               and isinstance(entry.get("outputs", []), list), f"graphs.{graph}",
               "an object with a files object and an outputs list", entry)
        for name in entry.get("files", {}).values():
            expect(_plain_file_name(name), f"graphs.{graph}.files", "file names inside the bundle folder", name)
        if "onnx_external_data" in entry:
            expect(_plain_file_name(entry["onnx_external_data"]), f"graphs.{graph}.onnx_external_data",
                   "a file name inside the bundle folder", entry["onnx_external_data"])
    for name, entry in manifest["files"].items():
        expect(_plain_file_name(name), "files", "file names inside the bundle folder", name)
        expect(isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _whole(entry.get("bytes"), 0),
               f"files.{name}", "an object with a sha256 text and a bytes count", entry)


def _whole(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _plain_file_name(name) -> bool:
    """A bundle is one flat folder (write_manifest writes names only): an absolute path or one with a
    folder part in a manifest would make the runtime read, and report on, files outside it."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not Path(name).is_absolute() and Path(name).name == name)


def load_bundle(root: str | Path, expected_sha256: str | None = None) -> Bundle:
    """Read and verify a bundle; raise `BundleError` naming the problem and the fix.

    `expected_sha256` pins the bundle: the sha256 of its manifest.json bytes, which cover every file's hash.
    The seal alone catches edits, not who made the bundle (anyone who can write it can seal it anew)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.exists():
        raise BundleError(f"bundle folder {str(root)!r} does not exist; check the path, or create the bundle with "
                          "`edgeshort export RUN -o BUNDLE` (Python: edgeshort.export.export_bundle)")
    if root.is_dir() and not os.access(root, os.R_OK | os.X_OK):
        raise BundleError(
            f"{str(root)!r} is not readable by this user; give it read access (e.g. chmod -R a+rX on the folder)"
        )
    if not path.is_file():
        raise BundleError(
            f"{str(root)!r} is not an edgeshort bundle (no {MANIFEST}); create one with `edgeshort export RUN -o BUNDLE` (Python: edgeshort.export.export_bundle)"
        )
    try:
        raw = path.read_bytes()
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise BundleError(f"{str(path)!r} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); "
                          "re-export the bundle") from exc
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    manifest_sha256 = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and not (isinstance(expected_sha256, str)
                                            and re.fullmatch(r"[0-9a-f]{64}", expected_sha256.strip().lower())):
        raise InputError(f"expected the pinned sha256 as 64 hex digits, got {expected_sha256!r:.100}; give only the "
                         "hash (the first field of `sha256sum manifest.json`, or a record's bundle_sha256)")
    if expected_sha256 is not None and manifest_sha256 != expected_sha256.strip().lower():
        raise BundleError(
            f"bundle {str(root)!r} is not the one pinned: its manifest.json has sha256 {manifest_sha256}, expected "
            f"{expected_sha256.strip()}; it was re-exported or changed since it was accepted. Check where it came from, "
            "and pin the new one only once it is accepted (its sha256: `sha256sum manifest.json`, or any record's "
            "bundle_sha256)"
        )
    if not isinstance(manifest, dict):
        raise BundleError(f"{str(path)!r} holds a JSON {type(manifest).__name__}, not a manifest object; "
                          "re-export the bundle")
    version = manifest.get("format")
    if not isinstance(version, int):
        raise BundleError(f"{str(path)!r} has no format version; re-export the bundle")
    if version > BUNDLE_FORMAT:
        raise BundleError(
            f"bundle format {version} is newer than this edgeshort reads (format {BUNDLE_FORMAT}); "
            "upgrade edgeshort to the version that exported it (pip install -U on the package or source you "
            "installed it from)"
        )
    if SEAL not in manifest:
        raise BundleError(f"{str(path)!r} has no seal, so its class names, preprocessing and guard settings cannot be "
                          "verified: it was written by an edgeshort that did not seal bundles, or the seal was "
                          "removed; re-export the bundle (edgeshort export RUN -o BUNDLE), or, where the run is "
                          "out of reach and you have checked the manifest, seal it as it is with "
                          "edgeshort.runtime.bundle.write_manifest(folder, manifest)")
    if manifest[SEAL] != manifest_seal(manifest):
        raise BundleError(
            f"{str(path)!r} was edited after export (its content no longer matches its seal), so its class names, "
            "preprocessing or guard settings may not be those its graphs were exported with; re-export the bundle, "
            "or, for a deliberate change, write it with edgeshort.runtime.bundle.write_manifest(folder, manifest)"
        )
    _check_structure(manifest, path)
    has_dfr = bool(manifest["guard"].get("has_dfr"))
    for graph in ("guarded", "encoder_head"):
        outputs = manifest["graphs"].get(graph, {}).get("outputs")
        if outputs is not None and ("dfr_logits" in outputs) != has_dfr:
            raise BundleError(f"{str(path)!r} says has_dfr {has_dfr}, but its {graph} graph "
                              f"{'lacks' if has_dfr else 'has'} a DFR output: the manifest was edited; re-export the bundle")
    for graph in manifest["graphs"].values():
        for listed in graph_file_names(graph):
            if listed not in manifest["files"]:
                raise BundleError(f"{str(path)!r} lists no hash for its graph file {listed!r}, so it cannot be "
                                  "verified; re-export the bundle")
    for name, entry in manifest["files"].items():
        file = root / name
        if not file.is_file():
            raise BundleError(f"bundle file {name!r} is missing from {str(root)!r}; re-export or copy it whole")
        try:
            size = file.stat().st_size
            if size != entry["bytes"]:  # before hashing: a wrong size needs no read of a file of any size
                raise BundleError(f"bundle file {name!r} holds {size:,} bytes, its manifest says "
                                  f"{entry['bytes']:,}: it was modified, cut short or replaced; re-export the "
                                  "bundle or copy it whole")
            digest = sha256_file(file)
        except OSError as exc:
            raise _unreadable(file, exc) from exc
        if digest != entry["sha256"]:
            raise BundleError(
                f"bundle file {name!r} does not match its manifest hash (sha256 {digest[:12]}… != "
                f"{entry['sha256'][:12]}…): it was modified or corrupted; re-export the bundle"
            )
    return Bundle(root, manifest, manifest_sha256)

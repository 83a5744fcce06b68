"""`Guard`: load a bundle once, then predict with the shortcut guard on any backend.

Two ways through a bundle give the same answers:
- `fused` (default): the `guarded` graph masks flagged tokens out of attention and batches
  naturally; the plain (unguarded) logits are needed separately only for images where a
  shortcut is present, so the `plain` graph runs on those images alone. Elsewhere the keep mask
  is all true and the plain logits are the ablated ones.
- `split`: `embed` -> `guard` -> `encoder_head`, which reuses the tokens for the plain pass and,
  with `drop_tokens`, removes flagged tokens physically (one image at a time, since the token
  count then differs per image).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeshort.errors import BundleError, InputError
from edgeshort.runtime.backends import (
    BACKENDS,
    PRECISIONS,
    Session,
    check_threads,
    choose_backend,
    is_onnxruntime_device,
    open_session,
)
from edgeshort.runtime.bundle import FUSED_GRAPHS, INT8_GRAPHS, SPLIT_GRAPHS, Bundle, load_bundle
from edgeshort.runtime.preprocess import (
    DEFAULT_MAX_PIXELS,
    as_pil,
    check_max_pixels,
    eight_bit_rule,
    map_images,
    preprocess_image,
)

logger = logging.getLogger(__name__)

PATHS = ("fused", "split")
GUARD_PRECISIONS = (*PRECISIONS, "int8")
# How far (as a share of the normalised range) a preprocessed array may stray: bicubic resizing overshoots.
NORMALISED_MARGIN = 0.1


def _frozen(array: np.ndarray, dtype) -> np.ndarray:
    out = np.array(array, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


def log_run_warnings(bundle: Bundle) -> None:
    """Log the detection run's own doubts, which travel in the bundle's manifest."""
    for warning in bundle.manifest["guard"].get("warnings") or []:
        logger.warning("%s: its detection run warned: %s", bundle.root, warning)


# Share of an image's patches flagged above which a result carries a warning.
MOST_PATCHES = 0.5
# Enlargement to the model's input, beyond that of the images the bundle was calibrated on (its manifest's
# guard.calibration_enlargement, when over 1), above which a result carries a warning: a thumbnail becomes
# blocks of one colour per pixel, with none of the detail the model learned from.
MOST_ENLARGEMENT = 4.0


@dataclass(frozen=True, eq=False)
class GuardResult:
    """What the guarded model says about one image.

    `logits`/`label` are the plain model's; `ablated_*` exclude the flagged patches when a shortcut
    is present (equal to the plain ones otherwise); `dfr_*` add the retrained head when the bundle
    has one. `flags` are the dilated flags that were masked, `raw_flags` the KNN's own.
    """

    logits: np.ndarray
    label: int
    class_name: str
    ablated_logits: np.ndarray
    ablated_label: int
    ablated_class_name: str
    dfr_logits: np.ndarray | None
    dfr_label: int | None
    dfr_class_name: str | None
    flags: np.ndarray
    raw_flags: np.ndarray
    saliency: np.ndarray
    shortcut_present: bool
    class_names: tuple[str, ...]
    source: str | None = None
    image_size: tuple[int, int] | None = None  # (width, height) as decoded; None for a preprocessed array
    enlargement: float | None = None  # how many-fold the image was enlarged to the model's input
    enlargement_limit: float = MOST_ENLARGEMENT  # above it, `warning` says so

    @property
    def flagged_patches(self) -> int:
        return int(self.flags.sum())

    @property
    def final_label(self) -> int:
        """The label to act on: the DFR head's when the bundle has one, else the ablated prediction."""
        return self.dfr_label if self.dfr_label is not None else self.ablated_label

    @property
    def final_class_name(self) -> str:
        return self.class_names[self.final_label]

    @property
    def label_changed(self) -> bool:
        """Whether the guard changed the plain model's prediction. With a DFR head this can happen on an
        image with no shortcut found: the retrained head scores every image, flagged or not."""
        return self.final_label != self.label

    @property
    def final_logits(self) -> np.ndarray:
        return self.dfr_logits if self.dfr_logits is not None else self.ablated_logits

    @property
    def final_probability(self) -> float:
        """Softmax probability of the final label: the model's confidence, not a calibrated risk."""
        z = np.asarray(self.final_logits, dtype=np.float64)
        p = np.exp(z - z.max())
        return float(p[self.final_label] / p.sum())

    @property
    def warning(self) -> str | None:
        """Reasons to distrust the guarded prediction ("; " between them), or None."""
        reasons = []
        share = self.flagged_patches / self.flags.size
        if share == 1:
            reasons.append(f"flags cover all {self.flags.size} patches: the guarded prediction saw none of the image, "
                           "so do not use it; the image is likely unlike the images the guard was fitted on")
        elif share > MOST_PATCHES:
            # Artefacts cover a few patches; flags over most of an image point at an image unlike the
            # validation data (another modality, a corrupt scan), and the ablated label rests on few tokens.
            reasons.append(f"flags cover {self.flagged_patches} of {self.flags.size} patches: the image may be unlike "
                           "the images the guard was fitted on, and the guarded prediction rests on the few patches "
                           "left; review it by hand")
        if self.enlargement is not None and self.enlargement > self.enlargement_limit:
            width, height = self.image_size
            reasons.append(f"the image is {width} x {height} pixels, enlarged {self.enlargement:.1f}-fold to the "
                           f"model's input (over {self.enlargement_limit:g}-fold): it lacks the detail the model "
                           "learned from; pass the full-resolution image, not a thumbnail")
        return "; ".join(reasons) or None

    def to_dict(self) -> dict:
        """Plain Python types only, ready for `json.dumps`."""

        def floats(a: np.ndarray | None):
            return None if a is None else np.asarray(a, dtype=float).tolist()

        return {
            "source": self.source,
            "label": self.label, "class_name": self.class_name,
            "ablated_label": self.ablated_label, "ablated_class_name": self.ablated_class_name,
            "dfr_label": self.dfr_label, "dfr_class_name": self.dfr_class_name,
            "final_label": self.final_label, "final_class_name": self.final_class_name,
            "final_probability": self.final_probability, "warning": self.warning,
            "shortcut_present": self.shortcut_present, "flagged_patches": self.flagged_patches,
            "logits": floats(self.logits), "ablated_logits": floats(self.ablated_logits),
            "dfr_logits": floats(self.dfr_logits),
            "flags": self.flags.tolist(), "raw_flags": self.raw_flags.tolist(), "saliency": floats(self.saliency),
            "class_names": list(self.class_names),
            "image_size": None if self.image_size is None else list(self.image_size), "enlargement": self.enlargement,
        }


@dataclass(frozen=True)
class GuardInfo:
    """How a `Guard` runs: what was asked for and what the backend actually does."""

    bundle: str
    backend: str
    precision: str
    device: str | None
    providers: tuple[str, ...] | None
    threads: int | None
    backend_version: str
    load_seconds: float  # manifest check + compile + warm-up of the graphs compiled at load (cold start)
    warmup_seconds: float
    input_size: tuple[int, int]
    class_names: tuple[str, ...]
    has_dfr: bool
    compiled: tuple[str, ...] = field(default_factory=tuple)
    # Names the bundle in audit logs: the manifest holds its files' hashes and its own seal, verified at load.
    manifest_sha256: str = ""
    map_weights: bool = False
    # The detection run's verdict (Bundle.verdict): under any but 'found', flags need not mark a shortcut.
    verdict: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Batch:
    """Raw outputs of one batch, before they become per-image results."""

    logits: np.ndarray
    ablated_logits: np.ndarray
    dfr_logits: np.ndarray | None
    flags: np.ndarray
    raw_flags: np.ndarray
    present: np.ndarray
    saliency: np.ndarray


def unguarded_logits(ablated: np.ndarray, present: np.ndarray,
                     plain_where_present: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The plain model's logits: where no shortcut is present the guarded graph masked nothing, so its
    ablated logits are the plain ones; the plain graph runs only for the rest (`plain_where_present(indices)`)."""
    logits = ablated.copy()
    if present.any():
        idx = np.flatnonzero(present)
        logits[idx] = plain_where_present(idx)
    return logits


@dataclass(frozen=True)
class PreparedImage:
    """An image already brought to the model's input (`preprocess_image`), with its decoded (width, height):
    what a caller that decodes files itself passes to `predict`, so a batch need not keep decoded images."""

    pixels: np.ndarray  # float32 (3, H, W)
    size: tuple[int, int]
    source: str


class Guard:
    """A loaded bundle, compiled for one backend: `Guard.load(bundle).predict(images)`.

    One `Guard` may be shared by several threads; `predict` keeps no state between calls.
    """

    def __init__(self, bundle: Bundle, backend: str | None = None, options: dict | None = None,
                 sessions: dict[str, Session] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not isinstance(bundle, Bundle) or backend is None or options is None or sessions is None:
            raise TypeError("a Guard is made with Guard.load(bundle_folder, backend=..., device=...), which verifies "
                            f"and compiles the bundle; got Guard({bundle!r}, ...)")
        self.bundle = bundle
        self.backend = backend
        self.max_pixels = max_pixels
        self.preprocessing = bundle.preprocessing
        # Images the model was calibrated on may be small themselves (scans upsampled to its input).
        fitted = bundle.manifest["guard"].get("calibration_enlargement") or 1.0
        self.enlargement_limit = MOST_ENLARGEMENT * max(1.0, float(fitted))
        self.class_names = bundle.class_names
        self._options = options
        self._sessions = sessions
        self._lock = threading.RLock()  # compiling a split graph warms it up through `embed`
        self.info: GuardInfo  # set by `load`

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        bundle: str | Path | Bundle,
        backend: str = "auto",
        device: str | None = None,
        threads: int | None = None,
        precision: str = "f32",
        providers: Sequence[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache_dir: str | Path | None = None,
        expected_sha256: str | None = None,
        map_weights: bool = False,
    ) -> Guard:
        """Verify a bundle (format version, sha256 of every file), compile its graphs and warm them up:
        the fused ones, or the split ones in a bundle exported without them (`--graphs split`).

        `backend="auto"` runs OpenVINO when it is installed and the bundle has OpenVINO IR, on an Intel CPU,
        for an OpenVINO-only device ("GPU", "NPU", "AUTO", ...) or for precision bf16 or int8 (on any CPU),
        unless `device` is an ONNX Runtime one; else ONNX Runtime ("CPU" alone decides nothing).
        `device` is an OpenVINO device ("CPU", "GPU", "AUTO", ...) or, for ONNX Runtime, "cpu",
        "cuda" or "coreml"; `providers` sets ONNX Runtime's providers list directly. OpenVINO runs
        f32 unless `precision="bf16"`; `precision="int8"` runs the bundle's INT8 guarded and plain graphs
        (`export --int8`, OpenVINO; a bundle exported before plain_int8 existed runs its plain graph in
        f32). `cache_dir` keeps OpenVINO's compiled graphs between loads. Images over `max_pixels` are
        refused before decoding. `expected_sha256` accepts only the bundle whose manifest.json has that
        sha256 (`Guard.info.manifest_sha256` of a bundle you checked). `map_weights` (ONNX Runtime) runs the
        graphs on their shared weights file as the OS maps it, without ONNX Runtime's own prepacked copy in
        each graph: the graphs, and every process serving the bundle, then share one copy in memory
        (vit_b_16, guarded + plain: 127 MB private instead of 792 MB, at the same latency on a 2-core
        AMD EPYC; `edgeshort bench` times ONNX Runtime both ways).
        """
        start = time.perf_counter()
        if precision not in GUARD_PRECISIONS:
            raise InputError(f"expected precision in {GUARD_PRECISIONS}, got {precision!r}")
        check_threads(threads)
        check_max_pixels(max_pixels)
        if providers is not None and backend == "auto":
            backend = "onnxruntime"  # providers are ONNX Runtime's
        # A `Bundle` object is verified again: its files may have changed since it was loaded.
        loaded = load_bundle(bundle.root if isinstance(bundle, Bundle) else bundle, expected_sha256=expected_sha256)
        graphs = FUSED_GRAPHS if loaded.has_graphs(FUSED_GRAPHS) else SPLIT_GRAPHS
        if precision != "f32" and backend == "auto" and is_onnxruntime_device(device):
            raise InputError(f"precision {precision} runs on OpenVINO only, and {device!r} is an ONNX Runtime "
                             "device; drop the device (CLI: --device) or run precision 'f32'")
        int8 = precision == "int8"
        if int8:
            if INT8_GRAPHS["guarded"] not in loaded.manifest["graphs"]:
                raise BundleError(f"{str(loaded.root)!r} has no INT8 graph; export it with `edgeshort export RUN -o "
                                  "BUNDLE --int8`, or run precision 'f32' (CLI: --precision f32)")
            if backend == "onnxruntime":
                raise InputError("the INT8 graph is OpenVINO IR; use backend 'openvino' (or 'auto') for precision int8")
            backend = "openvino"
        if precision == "bf16" and backend == "auto":  # only OpenVINO runs bf16, on any CPU that has it
            if "openvino" not in loaded.formats(graphs[0]):
                raise InputError(f"{str(loaded.root)!r} has no OpenVINO IR, and only OpenVINO runs bf16; export the "
                                 "bundle with --formats onnx,openvino, or run precision 'f32'")
            backend = "openvino"
        chosen = choose_backend(backend, list(loaded.formats(graphs[0])), device)
        if cache_dir and chosen == "onnxruntime":
            logger.warning("cache_dir %s is not used: ONNX Runtime (the backend chosen) keeps no compiled graphs; "
                           "it applies to OpenVINO (backend='openvino')", cache_dir)
        if map_weights and chosen != "onnxruntime":
            logger.warning("map_weights is not used: it applies to ONNX Runtime (backend='onnxruntime'), and OpenVINO "
                           "(the backend chosen) maps its IR weights itself")
            map_weights = False
        if map_weights and not loaded.shares_onnx_weights:
            logger.warning("map_weights is not used: the ONNX graphs of %s hold their own weights (an older export); "
                           "export the run again for one shared weights file", loaded.root)
            map_weights = False
        fmt = "onnx" if chosen == "onnxruntime" else "openvino"
        options = {"backend": chosen, "device": device, "threads": threads, "precision": "f32" if int8 else precision,
                   "providers": list(providers) if providers else None, "cache_dir": cache_dir, "fmt": fmt,
                   "int8": int8, "map_weights": map_weights}
        guard = cls(loaded, chosen, options, {}, max_pixels)
        warmup = 0.0
        for graph in graphs:
            warmup += guard._compile(graph)
        description = guard._sessions[graphs[0]].description
        guard.info = GuardInfo(
            bundle=str(loaded.root), backend=chosen,
            precision="int8" if int8 else description.get("precision", precision),
            device=description.get("device", device),
            providers=tuple(description["providers"]) if description.get("providers") else None,
            threads=threads, backend_version=str(description.get("version")),
            load_seconds=round(time.perf_counter() - start, 4), warmup_seconds=round(warmup, 4),
            input_size=tuple(guard.preprocessing.size), class_names=guard.class_names, has_dfr=loaded.has_dfr,
            compiled=graphs, manifest_sha256=loaded.manifest_sha256, map_weights=map_weights,
            verdict=loaded.verdict,
        )
        logger.info("loaded %s on %s (%s) in %.2f s", loaded.root, chosen, guard.info.precision,
                    guard.info.load_seconds)
        log_run_warnings(loaded)
        int8_warning = int8 and ((loaded.manifest.get("openvino") or {}).get("int8") or {}).get("warning")
        if int8_warning:
            logger.warning("%s: %s", loaded.root, int8_warning)
        return guard

    def _compile(self, graph: str) -> float:
        """Compile one graph and run it once on zeros; returns the warm-up seconds."""
        o = self._options
        stored = self.bundle.int8_graph(graph) if o["int8"] else graph
        session = open_session(self.bundle.path(stored, o["fmt"]), o["backend"], o["device"], o["threads"],
                               o["precision"], o["providers"], cache_dir=o["cache_dir"],
                               map_weights=o["map_weights"])
        h, w = self.preprocessing.size
        images = np.zeros((1, 3, h, w), np.float32)
        start = time.perf_counter()
        if graph in ("guarded", "plain", "embed"):
            out = session.run({"images": images})
        else:
            tokens = self._session("embed").run({"images": images})["tokens"]
            feed = {"tokens": tokens}
            if graph == "encoder_head":
                feed["keep"] = np.ones(tokens.shape[:2], bool)
            out = session.run(feed)
        widths = {name: out[name].shape[-1] for name in ("logits", "ablated_logits", "dfr_logits") if name in out}
        if any(width != len(self.class_names) for width in widths.values()):
            raise BundleError(f"bundle {str(self.bundle.root)!r}: its {stored} graph scores {widths} classes, but "
                              f"the manifest names {len(self.class_names)} ({list(self.class_names)}); the manifest "
                              "belongs to another model: re-export the bundle")
        self._sessions[graph] = session
        return time.perf_counter() - start

    def _session(self, graph: str) -> Session:
        session = self._sessions.get(graph)
        if session is None:
            # The split graphs compile on first use, once, even when several threads ask together.
            with self._lock:
                if graph not in self._sessions:
                    self._compile(graph)
                    self.info = _with_compiled(self.info, graph)
                session = self._sessions[graph]
        return session

    # -- inputs -----------------------------------------------------------------------------
    def _expand(self, images: Any) -> tuple[list[tuple[Any, str]], bool]:
        """Inputs -> [(item, source name)], one per image, and whether a single image was passed."""
        if isinstance(images, (list, tuple)):
            out: list[tuple[Any, str]] = []
            for i, item in enumerate(images):
                out.extend(self._expand_item(item, f"image {i}"))
            return out, False
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return self._expand_item(images, "images"), False
        return self._expand_item(images, "image"), True

    def _expand_item(self, item: Any, name: str) -> list[tuple[Any, str]]:
        if isinstance(item, (str, Path)):
            return [(item, str(item))]
        if isinstance(item, PreparedImage):
            return [(item, item.source)]
        if isinstance(item, np.ndarray) and item.ndim == 4:
            # A stacked batch: preprocessed float32 (B, 3, H, W) or uint8 images (B, H, W, C).
            if item.dtype == np.uint8 or item.dtype == np.float32:
                return [(item[j], f"{name}[{j}]") for j in range(item.shape[0])]
        return [(item, name)]

    def _to_tensor(self, item: Any, source: str) -> tuple[np.ndarray, tuple[int, int] | None]:
        """One input -> float32 (3, H, W) as the model wants it, and the image's (width, height) (None for an
        array already preprocessed)."""
        if isinstance(item, np.ndarray) and item.dtype != np.uint8:
            return self._check_tensor(item, source), None
        if isinstance(item, PreparedImage):
            return self._check_tensor(item.pixels, source), item.size
        image = as_pil(item, self.max_pixels, source=source)
        return preprocess_image(image, self.preprocessing), image.size

    def _check_tensor(self, x: np.ndarray, source: str) -> np.ndarray:
        h, w = self.preprocessing.size
        if x.dtype.kind == "f" and x.dtype != np.float32:
            raise InputError(
                f"{source}: expected a float32 preprocessed array, got {x.dtype}; convert it with x.astype(np.float32)"
            )
        if x.dtype != np.float32:
            # A 16-bit scan as an array: converted by one rule for every image, as for files.
            hint = (f"convert it to uint8 by {eight_bit_rule(float(x.min()), float(x.max()))}"
                    if x.dtype.kind in "iu" and x.size else "convert it to one of those")
            raise InputError(
                f"{source}: expected a uint8 (H, W, C) image or a float32 preprocessed (3, {h}, {w}) array, got "
                f"dtype {x.dtype} with shape {x.shape}; {hint}"
            )
        if x.ndim != 3:
            raise InputError(
                f"{source}: expected a float32 preprocessed array of shape (3, {h}, {w}) (or (B, 3, {h}, {w})), got "
                f"{x.ndim}-D shape {x.shape}; pass raw pixels as uint8 (H, W, C) to have them preprocessed"
            )
        if x.shape[0] != 3:
            raise InputError(
                f"{source}: expected 3 channels first in a preprocessed array, got shape {x.shape}; "
                "transpose HWC to CHW (and normalise with the bundle's mean and std), or pass raw pixels as uint8 "
                "(H, W, C)"
            )
        if x.shape[1:] != (h, w):
            raise InputError(
                f"{source}: expected a preprocessed array of shape (3, {h}, {w}) (the bundle's input size), got "
                f"{x.shape}; resize first, or pass the image itself (path, PIL image or uint8 array)"
            )
        if not np.isfinite(x).all():
            raise InputError(f"{source}: expected finite values, got NaN or infinity; check the preprocessing")
        # Normalised pixels lie in [(0 - mean) / std, (1 - mean) / std] per channel; a resize filter may
        # overshoot a little. Far outside is an un-normalised (0-255 or 0-1) array: silently near chance.
        mean, std = np.asarray(self.preprocessing.mean), np.asarray(self.preprocessing.std)
        lo, hi = -mean / std, (1 - mean) / std
        margin = NORMALISED_MARGIN * (hi - lo)
        low, high = x.reshape(3, -1).min(1), x.reshape(3, -1).max(1)
        if (low < lo - margin).any() or (high > hi + margin).any():
            raise InputError(
                f"{source}: expected pixels normalised with the bundle's mean {tuple(self.preprocessing.mean)} and std "
                f"{tuple(self.preprocessing.std)} (per channel within {np.round(lo, 2).tolist()} to "
                f"{np.round(hi, 2).tolist()}), got values from {float(low.min()):.3g} to {float(high.max()):.3g}; "
                "normalise as (x / 255 - mean) / std, or pass the uint8 image to have it preprocessed"
            )
        return np.ascontiguousarray(x)

    def preprocess(self, images: Any) -> np.ndarray:
        """Any accepted input -> the float32 (B, 3, H, W) batch the graphs take."""
        return self._tensors(self._expand(images)[0])[0]

    def _tensors(self, items: list[tuple[Any, str]]) -> tuple[np.ndarray, list[tuple[int, int] | None]]:
        """[(input, source name)] -> float32 (B, 3, H, W) and each image's (width, height); files and large
        images on the preprocessing threads."""
        rows = map_images(lambda i, item: self._to_tensor(item, items[i][1]), [item for item, _ in items],
                          self._options["threads"])
        if not rows:
            return np.empty((0, 3, *self.preprocessing.size), np.float32), []
        return np.stack([x for x, _ in rows]), [size for _, size in rows]

    # -- prediction -------------------------------------------------------------------------
    def predict(
        self, images: Any, batch_size: int = 8, path: str | None = None, drop_tokens: bool = False
    ) -> GuardResult | list[GuardResult]:
        """Guarded predictions for one image (-> one result) or a list / stacked batch (-> a list).

        Accepts file paths, PIL images, uint8 (H, W[, C]) arrays, encoded image bytes or binary file
        objects (an upload's io.BytesIO, open(path, "rb")), float32 arrays already preprocessed as
        (3, H, W) / (B, 3, H, W), or `PreparedImage`s (preprocessed pixels with the image's size, so the
        thumbnail check still applies). A PIL image is taken at its current frame. Images are processed
        `batch_size` at a time.
        `path="fused"` runs the fused graphs, `path="split"` embed -> guard -> encoder_head; None
        takes the fused ones when the bundle has them. `drop_tokens=True` (split only) removes
        flagged tokens instead of masking them, one image at a time.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"expected batch_size to be a positive integer, got {batch_size!r}")
        if path is None:
            path = "split" if drop_tokens or not self.bundle.has_graphs(FUSED_GRAPHS) else "fused"
        if path not in PATHS:
            raise InputError(f"expected path in {PATHS} or None, got {path!r}")
        graphs = FUSED_GRAPHS if path == "fused" else SPLIT_GRAPHS
        if not self.bundle.has_graphs(graphs):
            raise BundleError(
                f"path={path!r} needs the graphs {list(graphs)}, which this bundle was exported without (it has "
                f"{sorted(self.bundle.manifest['graphs'])}); use the other path (CLI: with or without --split), or "
                "re-export with `edgeshort export RUN -o BUNDLE --graphs all`"
            )
        if drop_tokens and path != "split":
            raise InputError("drop_tokens=True needs the split graphs; pass path='split' (the fused graph masks tokens)")
        items, single = self._expand(images)
        results: list[GuardResult] = []
        for chunk in _chunks(items, int(batch_size)):
            x, sizes = self._tensors(chunk)
            batch = self._run_fused(x) if path == "fused" else self._run_split(x, drop_tokens)
            results.extend(self._results(batch, [source for _, source in chunk], sizes))
        return results[0] if single else results

    def _run_fused(self, x: np.ndarray) -> _Batch:
        out = self._session("guarded").run({"images": x})
        present = np.asarray(out["present"], bool)
        ablated = out["ablated_logits"]
        logits = unguarded_logits(ablated, present, lambda idx: self._session("plain").run(
            {"images": np.ascontiguousarray(x[idx])})["logits"])
        return _Batch(logits, ablated, out.get("dfr_logits"), out["flags"], out["raw_flags"], present,
                      out["saliency"])

    def _run_split(self, x: np.ndarray, drop_tokens: bool) -> _Batch:
        tokens = self._session("embed").run({"images": x})["tokens"]
        g = self._session("guard").run({"tokens": tokens})
        present, keep = np.asarray(g["present"], bool), np.asarray(g["keep"], bool)
        head = self._session("encoder_head")
        if drop_tokens:
            ablated, dfr = self._head_dropping(head, tokens, keep, present)
        else:
            out = head.run({"tokens": tokens, "keep": keep})
            ablated, dfr = out["logits"], out.get("dfr_logits")

        def plain(idx: np.ndarray) -> np.ndarray:
            sub = np.ascontiguousarray(tokens[idx])
            return head.run({"tokens": sub, "keep": np.ones(sub.shape[:2], bool)})["logits"]

        logits = unguarded_logits(ablated, present, plain)
        return _Batch(logits, ablated, dfr, g["flags"], g["raw_flags"], present, g["saliency"])

    def _head_dropping(self, head: Session, tokens: np.ndarray, keep: np.ndarray, present: np.ndarray):
        """Ablated (and DFR) logits with flagged tokens removed: images with a shortcut one by one."""
        num_classes = len(self.class_names)
        ablated = np.empty((len(tokens), num_classes), np.float32)
        dfr = np.empty_like(ablated) if self.bundle.has_dfr else None
        clean = np.flatnonzero(~present)
        if clean.size:  # nothing is flagged there, so these still batch
            sub = np.ascontiguousarray(tokens[clean])
            out = head.run({"tokens": sub, "keep": np.ones(sub.shape[:2], bool)})
            ablated[clean] = out["logits"]
            if dfr is not None:
                dfr[clean] = out["dfr_logits"]
        for i in np.flatnonzero(present):
            kept = np.ascontiguousarray(tokens[i : i + 1, keep[i]])
            out = head.run({"tokens": kept, "keep": np.ones(kept.shape[:2], bool)})
            ablated[i] = out["logits"][0]
            if dfr is not None:
                dfr[i] = out["dfr_logits"][0]
        return ablated, dfr

    def _results(self, batch: _Batch, sources: list[str], sizes: list[tuple[int, int] | None]) -> list[GuardResult]:
        names = self.class_names
        finite = np.isfinite(batch.logits).all(1) & np.isfinite(batch.ablated_logits).all(1)
        if not finite.all():
            bad = sources[int(np.flatnonzero(~finite)[0])]
            raise InputError(
                f"{bad}: expected inputs the model can score, got non-finite logits (the input values are out "
                "of range); pass the image itself, or float32 arrays normalised with the bundle's mean/std"
            )
        results = []
        for i, source in enumerate(sources):
            label, ablated = int(np.argmax(batch.logits[i])), int(np.argmax(batch.ablated_logits[i]))
            dfr_logits = None if batch.dfr_logits is None else batch.dfr_logits[i]
            dfr_label = None if dfr_logits is None else int(np.argmax(dfr_logits))
            results.append(GuardResult(
                logits=_frozen(batch.logits[i], np.float32), label=label, class_name=names[label],
                ablated_logits=_frozen(batch.ablated_logits[i], np.float32), ablated_label=ablated,
                ablated_class_name=names[ablated],
                dfr_logits=None if dfr_logits is None else _frozen(dfr_logits, np.float32), dfr_label=dfr_label,
                dfr_class_name=None if dfr_label is None else names[dfr_label],
                flags=_frozen(batch.flags[i], bool), raw_flags=_frozen(batch.raw_flags[i], bool),
                saliency=_frozen(batch.saliency[i], np.float32), shortcut_present=bool(batch.present[i]),
                class_names=names, source=source, image_size=sizes[i],
                enlargement=None if sizes[i] is None else self.preprocessing.enlargement(*sizes[i]),
                enlargement_limit=self.enlargement_limit,
            ))
        return results

    def __repr__(self) -> str:
        return f"Guard({str(self.bundle.root)!r}, backend={self.backend!r}, precision={self.info.precision!r})"


def _with_compiled(info: GuardInfo, graph: str) -> GuardInfo:
    from dataclasses import replace

    return replace(info, compiled=(*info.compiled, graph))


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


__all__ = ["BACKENDS", "PATHS", "Guard", "GuardInfo", "GuardResult"]

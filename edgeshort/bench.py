"""Latency, throughput, cold start, memory and size of a bundle's guarded prediction.

Timings on shared machines are noisy, so every comparison is measured side by side in one run,
block-interleaved (A B A B …), and reported as medians, p90 and the ratio of medians; nothing
here passes or fails on absolute seconds.
"""

from __future__ import annotations

import gc
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeshort.detect.verdict import FOUND
from edgeshort.errors import InputError, MissingDependencyError
from edgeshort.runtime.backends import BACKENDS, check_threads, open_session
from edgeshort.runtime.bundle import (
    FUSED_GRAPHS,
    INT8_GRAPHS,
    SPLIT_GRAPHS,
    Bundle,
    format_file_names,
    load_bundle,
)
from edgeshort.runtime.guard import Guard, log_run_warnings

logger = logging.getLogger(__name__)


@dataclass
class Timing:
    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1e3

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.seconds, 90)) * 1e3

    def to_dict(self) -> dict:
        return {"name": self.name, "n": len(self.seconds), "median_ms": round(self.median_ms, 4),
                "p90_ms": round(self.p90_ms, 4)}


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, block: int, warmup: int = 2) -> dict[str, Timing]:
    """Time each case in blocks of `block` calls, alternating cases round by round."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    timings = {name: Timing(name) for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            for _ in range(block):
                start = time.perf_counter()
                fn()
                timings[name].seconds.append(time.perf_counter() - start)
    return timings


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _uss_mb() -> float | None:
    import psutil

    try:
        return psutil.Process().memory_full_info().uss / 2**20
    except (psutil.AccessDenied, AttributeError):  # not every platform reads it
        return None


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows: psutil's peak working set
        import psutil

        peak = getattr(psutil.Process().memory_info(), "peak_wset", None)
        return None if peak is None else peak / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if platform.system() != "Darwin" else peak / 2**20


def machine_info() -> dict:
    from edgeshort.commands.env import collect

    info = collect()
    try:
        import threadpoolctl

        info["blas"] = threadpoolctl.threadpool_info()
    except ImportError:
        pass
    return info


def bundle_size(bundle: Bundle) -> dict:
    """Bytes on disk: the bundle, each graph's own files per format, and the files graphs share (the ONNX
    graphs' weights), counted once under `shared_bytes` rather than in every graph."""
    by_graph, shared = {}, {}
    for graph, entry in bundle.manifest["graphs"].items():
        for fmt, name in entry["files"].items():
            by_graph[f"{graph}.{fmt}"] = sum((bundle.root / file).stat().st_size for file in format_file_names(name))
        if entry.get("onnx_external_data"):
            shared[entry["onnx_external_data"]] = (bundle.root / entry["onnx_external_data"]).stat().st_size
    total = sum(p.stat().st_size for p in bundle.root.iterdir() if p.is_file())
    return {"total_bytes": total, "by_graph_bytes": by_graph, "shared_bytes": shared}


def available_variants(bundle: Bundle, backends: list[str]) -> list[dict]:
    """(backend, precision, graph) combinations this bundle and machine can run; ONNX Runtime also on its
    memory-mapped weights (`Guard.load(map_weights=True)`) where the bundle's ONNX graphs share a weights file."""
    variants = []
    for backend in backends:
        if backend == "onnxruntime":
            variants.append({"backend": "onnxruntime", "precision": "f32", "format": "onnx"})
            if bundle.shares_onnx_weights:
                variants.append({"backend": "onnxruntime", "precision": "f32", "format": "onnx", "map_weights": True})
            continue
        try:
            import openvino as ov
        except ImportError:
            logger.warning("openvino is not installed; skipping its rows")
            continue
        if not bundle.formats("guarded" if bundle.has_graphs(FUSED_GRAPHS) else "embed").get("openvino"):
            continue
        variants.append({"backend": "openvino", "precision": "f32", "format": "openvino"})
        if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            variants.append({"backend": "openvino", "precision": "bf16", "format": "openvino"})
        if INT8_GRAPHS["guarded"] in bundle.manifest["graphs"]:
            variants.append({"backend": "openvino", "precision": "int8", "format": "openvino"})
    return variants


def backend_label(variant: dict) -> str:
    """A variant's (or its case's) backend as the tables and chart name it."""
    return variant["backend"] + (" (mapped weights)" if variant.get("map_weights") else "")


def _session(bundle: Bundle, graph: str, variant: dict, hint: str, threads: int | None):
    if variant["precision"] == "int8":
        graph = bundle.int8_graph(graph)
    precision = "f32" if variant["precision"] == "int8" else variant["precision"]
    kwargs = {"hint": hint} if variant["backend"] == "openvino" else {"map_weights": variant.get("map_weights", False)}
    return open_session(bundle.path(graph, variant["format"]), variant["backend"], precision=precision,
                        threads=threads, **kwargs)


def bench_bundle(
    bundle_dir: str | Path, backends: list[str] | None = None, batches: tuple[int, ...] = (1, 8),
    rounds: int = 10, block: int = 5, threads: int | None = None, seed_pipeline: bool = True,
    progress: bool = True, images: list[str] | None = None,
) -> dict:
    """Every figure for one bundle, as a JSON-able dict; `images` (files or folders) are timed instead
    of the source run's data."""
    backends = backends or list(BACKENDS)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not batches or min(batches) < 1:
        raise InputError(f"expected backends from {BACKENDS} and batch sizes >= 1, got backends {backends} and "
                         f"batches {list(batches)}; e.g. --backends onnxruntime,openvino --batch 1,8")
    check_threads(threads)
    if rounds < 1 or block < 1:  # a median needs timings: checked before the minutes of work
        raise InputError(f"expected at least 1 round and 1 call per block, got rounds {rounds} and block {block}; "
                         "e.g. --rounds 10 --block 5")
    torch_before = "torch" in sys.modules
    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(0)
    results: dict = {"bundle": str(bundle.root), "model": bundle.manifest["model"], "machine": machine_info(),
                     "settings": {"rounds": rounds, "block": block, "threads": threads, "batches": list(batches)},
                     "size": bundle_size(bundle), "verdict": bundle.verdict, "cases": []}
    variants = available_variants(bundle, backends)
    if not variants:
        raise MissingDependencyError(f"none of the backends {backends} can run this bundle here: OpenVINO is not "
                                     "installed or the bundle has no OpenVINO IR; pip install 'edgeshort[openvino]' "
                                     "or add onnxruntime to the backends (--backends onnxruntime)")
    log_run_warnings(bundle)
    # The seed-style row's torch batch takes eight.
    inputs = _pick_images(bundle, rng, max(8, *batches), images)
    results["inputs"] = {"source": inputs.source, "clean": inputs.clean_kind, "flagged": inputs.flagged_kind}
    results["skipped_backends"] = [b for b in backends if b not in {v["backend"] for v in variants}]
    for variant in variants:
        for batch in batches:
            if progress:
                print(f"  {backend_label(variant)} {variant['precision']} batch {batch} ...", flush=True)
            results["cases"].append(_bench_variant(bundle, variant, batch, inputs, rounds, block, threads))
            gc.collect()
    # The runtime's peak, before the torch rows load torch (several hundred MiB no edge box needs). A process
    # that loaded torch earlier (`edgeshort demo`, a notebook) has its own peak in it, and bench.md says so.
    results["peak_rss_mb"] = _peak_rss_mb()
    results["torch_loaded_before"] = torch_before
    seed_rows = _seed_pipeline_cases(bundle, inputs.clean, inputs.flagged, rounds, block, progress) if seed_pipeline else []
    if seed_rows:  # a peak "once the torch rows ran" only where they did
        results["cases"] += seed_rows
        results["peak_rss_with_torch_mb"] = _peak_rss_mb()
    # After both peaks: the comparison holds every precision's graph at once, which no deployment does.
    results["precision_cases"] = _precision_comparison(bundle, variants, batches, inputs, rounds, block, threads,
                                                       progress)
    return results


# Each timed call is one synchronous request: OpenVINO's THROUGHPUT hint splits the cores into
# streams that only a queue of asynchronous requests fills, so a single request runs on one
# stream (measured: vit_b_16 batch 8 took 2.9 s with it, 1.55 s on ONNX Runtime). LATENCY
# gives one request all cores, for batch 1 and batch 8 alike.
OPENVINO_HINT = "LATENCY"


def _compared(timings: dict[str, Timing], base: str, batch: int, ratio_key: str) -> dict:
    """Each case's timing, its ratio of medians to the `base` case's (under `ratio_key`), and images per second."""
    base_ms = timings[base].median_ms
    return {
        "timings": {k: v.to_dict() for k, v in timings.items()},
        ratio_key: {k: round(v.median_ms / base_ms, 4) for k, v in timings.items()},
        "images_per_s": {k: round(batch / (v.median_ms / 1e3), 2) for k, v in timings.items()},
    }


def _bench_variant(bundle, variant, batch, inputs: BenchInputs, rounds, block, threads) -> dict:
    """Plain vs guarded (and guarded + original on a flagged image) for one backend and batch size."""
    hint = OPENVINO_HINT
    images_clean, images_flagged = inputs.clean[:batch], inputs.flagged[:batch]
    graphs = _Graphs(bundle, variant, hint, threads)
    t0 = time.perf_counter()
    graphs.plain(images_clean)
    cold_plain = graphs.compile_seconds(graphs.plain_uses) + time.perf_counter() - t0
    t0 = time.perf_counter()
    clean_present = float(np.mean(graphs.guarded(images_clean)[0]))
    cold_guarded = graphs.compile_seconds(graphs.guarded_uses) + time.perf_counter() - t0

    def guarded_with_original():
        # The original prediction costs a second pass only for images with a shortcut.
        present, tokens = graphs.guarded(images_flagged)
        if present.any():
            graphs.plain(images_flagged[present], None if tokens is None else tokens[present])

    # A bundle exported before plain_int8 existed times its INT8 guarded graph against the f32 plain one.
    f32_plain = variant["precision"] == "int8" and bundle.int8_graph("plain") == "plain"
    plain_name = "plain (f32)" if f32_plain else "plain"
    cases = {
        plain_name: lambda: graphs.plain(images_clean),
        "guarded": lambda: graphs.guarded(images_clean),
        f"guarded+original ({inputs.flagged_kind})": guarded_with_original,
    }
    cold = {plain_name: round(cold_plain, 3), "guarded": round(cold_guarded, 3)}
    # The runtime end to end: its original prediction for a clean image costs no second pass.
    with _quiet_run_warnings():  # bench_bundle has shown the bundle's detection warnings once already
        guard = Guard.load(bundle.root, variant["backend"], threads=threads, precision=variant["precision"],
                           map_weights=variant.get("map_weights", False))
    cold["Guard.load (verify + compile + warm up)"] = round(guard.info.load_seconds, 3)
    cases[f"Guard.predict ({inputs.clean_kind})"] = lambda: guard.predict(images_clean, batch_size=batch)
    timings = interleaved(cases, rounds, block)
    return {
        **variant, "batch": len(images_clean), "hint": hint,
        # Share of the "clean" inputs the guard flags (0 unless they are random images).
        "clean_inputs_flagged": clean_present,
        "cold_start_s": cold,
        **_compared(timings, plain_name, batch, "ratio_vs_plain"),
        "rss_mb": _rss_mb(),
        # The process's private memory after this row (as rss_mb, it only grows over the rows): RSS also counts
        # the pages of a mapped weights file, which processes share.
        "uss_mb": _uss_mb(),
    }


def _precision_comparison(bundle, variants, batches, inputs: BenchInputs, rounds, block, threads,
                          progress) -> list[dict]:
    """OpenVINO's guarded prediction at every precision the bundle and CPU offer, timed side by side.

    Each precision's block above is timed on its own, against its own plain graph; whether INT8 or bf16
    is faster than f32 on this machine needs them interleaved with each other."""
    compared = [v for v in variants if v["backend"] == "openvino"]
    if len(compared) < 2:
        return []
    hint = OPENVINO_HINT
    graphs = {v["precision"]: _Graphs(bundle, v, hint, threads, guarded_only=True) for v in compared}
    rows = []
    for batch in batches:
        if progress:
            print(f"  openvino {' vs '.join(graphs)} batch {batch} ...", flush=True)
        images = inputs.clean[:batch]
        timings = interleaved({precision: (lambda g=g, x=images: g.guarded(x)) for precision, g in graphs.items()},
                              rounds, block)
        rows.append({"backend": "openvino", "case": "guarded", "batch": len(images), "hint": hint,
                     **_compared(timings, "f32", len(images), "ratio_vs_f32")})
    return rows


class _Graphs:
    """The plain and the guarded prediction as the bundle holds them: the fused graphs, or embed ->
    guard -> encoder_head in a bundle exported with --graphs split (the plain pass reuses the tokens)."""

    def __init__(self, bundle: Bundle, variant: dict, hint: str, threads: int | None,
                 guarded_only: bool = False) -> None:
        self.split = not bundle.has_graphs(FUSED_GRAPHS)
        self.plain_uses = ("embed", "encoder_head") if self.split else ("plain",)
        self.guarded_uses = SPLIT_GRAPHS if self.split else ("guarded",)
        self.sessions, self._compiled = {}, {}
        for name in self.guarded_uses if guarded_only else SPLIT_GRAPHS if self.split else FUSED_GRAPHS:
            t0 = time.perf_counter()
            self.sessions[name] = _session(bundle, name, variant, hint, threads)
            self._compiled[name] = time.perf_counter() - t0

    def compile_seconds(self, names: tuple[str, ...]) -> float:
        return sum(self._compiled[name] for name in names)

    def plain(self, images: np.ndarray, tokens: np.ndarray | None = None) -> None:
        if not self.split:
            self.sessions["plain"].run({"images": images})
            return
        tokens = self.sessions["embed"].run({"images": images})["tokens"] if tokens is None else tokens
        self.sessions["encoder_head"].run({"tokens": tokens, "keep": np.ones(tokens.shape[:2], bool)})

    def guarded(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """-> (shortcut present per image, the tokens when split)."""
        if not self.split:
            return np.asarray(self.sessions["guarded"].run({"images": images})["present"], bool), None
        tokens = self.sessions["embed"].run({"images": images})["tokens"]
        found = self.sessions["guard"].run({"tokens": tokens})
        self.sessions["encoder_head"].run({"tokens": tokens, "keep": np.asarray(found["keep"], bool)})
        return np.asarray(found["present"], bool), tokens


@contextmanager
def _quiet_run_warnings():
    """Guard.load logs the bundle's detection warnings on every load; bench shows them once."""
    guard_logger = logging.getLogger("edgeshort.runtime.guard")
    level = guard_logger.level
    guard_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        guard_logger.setLevel(level)


def _random_pixels(rng, count: int, prep) -> np.ndarray:
    """`count` random images, preprocessed as the bundle's model expects (the runtime refuses other ranges)."""
    from PIL import Image

    from edgeshort.runtime.preprocess import preprocess_image

    h, w = prep.size
    return np.stack([preprocess_image(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), prep)
                     for _ in range(count)])


@dataclass
class BenchInputs:
    """The images the cases time, and what they are: "clean image" / "flagged image" when the guard's
    own flags sorted real images, "random image" when none of that kind was at hand."""

    clean: np.ndarray
    flagged: np.ndarray
    clean_kind: str
    flagged_kind: str
    source: str  # where the images came from, for bench.json and bench.md


def _image_paths(images: list[str]) -> list[str]:
    from edgeshort.runtime.preprocess import list_image_files

    paths: list[str] = []
    for name in images:
        if Path(name).is_dir():
            paths += [str(p) for p in list_image_files(Path(name), recursive=True)[0]]
        elif Path(name).is_file():
            paths.append(name)
        else:
            raise InputError(f"expected --images to name image files or folders, got {name!r}, which does not exist")
    if not paths:
        raise InputError(f"expected image files under --images {' '.join(images)}, found none; check the folders")
    return paths


def _pick_images(bundle: Bundle, rng, count: int, images: list[str] | None = None) -> BenchInputs:
    """`count` preprocessed images with no shortcut found, and `count` with one: from `images` when
    given, else from the bundle's source run.

    Images repeat when there are fewer, so every batch is as large as it says. Random images stand
    in for a kind the data lacks, or for both when the run's images are not reachable (another machine).
    """
    from edgeshort.data import dataset_from_source
    from edgeshort.data.dataset import unlabelled

    if images:
        paths = _image_paths(images)
        batches = unlabelled(paths, "--images").batches(bundle.preprocessing, 64)
        named = " ".join(str(i) for i in images[:3]) + (f" and {len(images) - 3:,} more" if len(images) > 3 else "")
        source = f"{len(paths):,} image files from --images {named}"
    else:
        source_run = bundle.manifest.get("source_run")
        try:
            meta = json.loads((Path(source_run) / "run.json").read_text())
            data = dataset_from_source(meta["data_source"], meta.get("class_names"))
        except (TypeError, OSError, KeyError, ValueError):  # no run folder or no recorded data: random inputs
            logger.warning("the bundle's source run %r or its images are not reachable, so the benchmark times "
                           "random images; pass --images (Python: images=) to time your own", source_run)
            pixels = _random_pixels(rng, count, bundle.preprocessing)
            return BenchInputs(pixels, pixels, "random image", "random image", "random images")
        batches, source = data.batches(bundle.preprocessing, 64), f"the source run's data ({meta['data_source']})"
    with _quiet_run_warnings():
        guard = Guard.load(bundle.root, backend="onnxruntime")
    clean, flagged = [], []
    for _, batch in batches:
        present = np.array([r.shortcut_present for r in guard.predict(batch)], bool)
        clean += list(batch[~present])
        flagged += list(batch[present])
        if len(clean) >= count and len(flagged) >= count:
            break

    def exactly_count(found: list, kind: str) -> tuple[np.ndarray, str]:
        if not found:
            return _random_pixels(rng, count, bundle.preprocessing), "random image"
        repeats = -(-count // len(found))
        return np.stack((found * repeats)[:count]), kind

    (clean, clean_kind), (flagged, flagged_kind) = exactly_count(clean, "clean image"), exactly_count(flagged, "flagged image")
    return BenchInputs(clean, flagged, clean_kind, flagged_kind, source)


def _seed_pipeline_cases(bundle, clean, flagged, rounds, block, progress) -> list[dict]:
    """What users do today: the seed's per-image torch + scikit-learn pipeline, beside torch batched."""
    source_run = bundle.manifest.get("source_run")
    if not source_run or not Path(source_run, "run.json").is_file():
        logger.warning("the bundle's source run is not reachable; skipping the seed-style row")
        return []
    try:
        import sklearn  # noqa: F401 (the loaded run's KNN)
        import torch

        from edgeshort.detect import ShortcutDetector
        from edgeshort.runtime.masking import dilate
    except ImportError:
        logger.warning("the seed-style row needs torch and scikit-learn (pip install 'edgeshort[offline]'); "
                       "skipping it (--no-seed-pipeline skips it without this warning)")
        return []
    if progress:
        print("  seed-style torch + scikit-learn pipeline ...", flush=True)
    result = ShortcutDetector.load(source_run)
    adapter, knn = result.adapter, result.knn.classifier
    grid, radius = result.grid, result.config.dilation_radius
    image = torch.from_numpy(flagged[:1])

    def seed_style():
        # As the notebook: one image, model call for tokens, numpy keys, sklearn KNN, Python dilation,
        # then the plain and the ablated forward passes.
        with torch.no_grad():
            tokens = adapter.embed(image)
            keys = adapter.keys(tokens).numpy()[0]
            raw = knn.predict(keys).reshape(grid).astype(bool)
            keep = torch.ones(tokens.shape[1], dtype=torch.bool)
            keep[adapter.num_prefix:] = ~torch.from_numpy(dilate(raw, radius).reshape(-1))
            adapter.forward_tokens(tokens[:, keep])
            adapter.forward_tokens(adapter.embed(image))

    batch8 = torch.from_numpy(clean[:8])

    def torch_batched():
        with torch.no_grad():
            adapter.forward_tokens(adapter.embed(batch8))

    timings = interleaved({"seed-style (per image)": seed_style, "torch eager batch 8": torch_batched},
                          max(2, rounds // 2), block)
    # Measured side by side, reported as two cases so each row's batch (and per-image time) is its own.
    return [{"backend": "torch", "precision": "f32", "batch": batch, "timings": {name: timings[name].to_dict()},
             "images_per_s": {name: round(batch * 1e3 / timings[name].median_ms, 2)}}
            for name, batch in (("seed-style (per image)", 1), ("torch eager batch 8", len(batch8)))]


# A p90 this many times the median means the timings were disturbed (another process, throttling).
NOISY_P90 = 2.0
# Fewer interleaved rounds than this cannot average out a change in load between cases.
FEW_ROUNDS = 3


def _noisy_mark(timing: dict) -> str:
    return " *" if timing["p90_ms"] > NOISY_P90 * timing["median_ms"] else ""


def markdown_table(results: dict) -> str:
    lines = ["| backend | precision | batch | case | median ms | p90 ms | ratio vs plain | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    noisy = 0
    for case in results["cases"]:
        for name, t in case["timings"].items():
            ratio = case.get("ratio_vs_plain", {}).get(name, "")
            mark = _noisy_mark(t)
            noisy += bool(mark)
            lines.append(f"| {backend_label(case)} | {case['precision']} | {case['batch']} | {name}{mark} | "
                         f"{t['median_ms']:.3f} | {t['p90_ms']:.3f} | {ratio} | {case['images_per_s'][name]} |")
    precision_rows = results.get("precision_cases") or []
    lines += _precision_table(precision_rows)
    noisy += sum(bool(_noisy_mark(t)) for row in precision_rows for t in row["timings"].values())
    if noisy:
        lines += ["", f"\\* p90 over {NOISY_P90:g}x the median: the machine was busy; rerun with more --rounds "
                      "on an idle machine before trusting those rows' ratios."]
    cold = [f"{backend_label(c)} {c['precision']} batch {c['batch']}: "
            + ", ".join(f"{name} {sec} s" for name, sec in c["cold_start_s"].items())
            for c in results["cases"] if "cold_start_s" in c]
    inputs = results.get("inputs")
    if inputs:
        lines += ["", f"Inputs: {inputs['source']}." + (
            " Random images stand in where no real image of a kind was at hand; the guard may flag them "
            "(bench.json clean_inputs_flagged)." if "random image" in (inputs["clean"], inputs["flagged"]) else "")]
    if results.get("verdict") not in (None, FOUND):
        lines += ["", f"The bundle's verdict is '{results['verdict']}', not 'found': its guarded rows time masking "
                      "flags that need not mark a shortcut (manifest guard.verdict)."]
    if results.get("skipped_backends"):
        lines += ["", f"Not timed: {', '.join(results['skipped_backends'])} (not installed, or not in the bundle)."]
    lines += ["", "Cold start (load + compile + first call):", *[f"- {c}" for c in cold]]
    lines += ["", _settings_line(results)]
    rounds = (results.get("settings") or {}).get("rounds")
    if rounds is not None and rounds < FEW_ROUNDS:
        lines.append(f"Only {rounds} round{'s' if rounds != 1 else ''}: a change in the machine's load between cases "
                     f"moves their ratios, and too few rounds cannot show it; use --rounds {FEW_ROUNDS} or more "
                     "before trusting a ratio.")
    with_torch = results.get("peak_rss_with_torch_mb")
    if results.get("torch_loaded_before"):
        memory = (f"peak RSS {results.get('peak_rss_mb') or 0:.0f} MiB of this process, which had loaded torch "
                  "before the bench (run `edgeshort bench BUNDLE` on its own for the runtime's)")
    else:
        memory = (f"peak RSS {results.get('peak_rss_mb') or 0:.0f} MiB over the runtime's rows"
                  + (f" ({with_torch:.0f} MiB once the torch rows ran)" if with_torch else ""))
    lines += ["", f"Bundle size: {results['size']['total_bytes'] / 2**20:.1f} MiB; {memory}"]
    return "\n".join(lines)


def _precision_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "OpenVINO's guarded prediction at each precision, timed side by side (ratio under 1: faster than f32):",
             "", "| batch | precision | median ms | p90 ms | ratio vs f32 | images/s |", "|---|---|---|---|---|---|"]
    for row in rows:
        for precision, t in row["timings"].items():
            lines.append(f"| {row['batch']} | {precision}{_noisy_mark(t)} | {t['median_ms']:.3f} | {t['p90_ms']:.3f} | "
                         f"{row['ratio_vs_f32'][precision]} | {row['images_per_s'][precision]} |")
    return lines


def _settings_line(results: dict) -> str:
    """How the figures were taken, in words (bench.json holds the same and more)."""
    settings, machine = results.get("settings", {}), results.get("machine", {})
    cpu = (machine.get("openvino_devices") or {}).get("CPU") or machine.get("processor") or machine.get("machine")
    packages = machine.get("packages") or {}
    versions = ", ".join(f"{name} {packages[name]}" for name in ("onnxruntime", "openvino") if packages.get(name))
    hints = sorted({c["hint"] for c in results.get("cases", []) if c.get("hint") and c["backend"] == "openvino"})
    return (f"Settings: {settings.get('rounds')} interleaved rounds of {settings.get('block')} calls per case; threads "
            f"{settings.get('threads') or 'the backend default'}; {machine.get('usable_cores') or machine.get('cpu_count')}"
            f" usable cores ({cpu})" + (f"; OpenVINO performance hint {', '.join(hints)}" if hints else "")
            + (f"; {versions}" if versions else "") + ".")


def chart(results: dict, path: Path) -> Path | None:
    try:
        from edgeshort._optional import require

        matplotlib = require("matplotlib", "report")
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels, values = [], []
    for case in results["cases"]:
        for name, t in case["timings"].items():
            labels.append(f"{backend_label(case)} {case['precision']} b{case['batch']}\n{name}")
            values.append(t["median_ms"] / case["batch"])
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) + 1.5))
    ax.barh(range(len(labels)), values, color="#3b7dd8")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")  # the seed-style row is far slower than the rest, which a linear axis would hide
    ax.set_xlabel("median ms per image (log scale, lower is better)")
    ax.set_title(f"edgeshort bench: {results['model']['family']} ViT, grid {results['model']['grid']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "chart": out / "bench.png"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str))
    paths["markdown"].write_text(markdown_table(results) + "\n")
    if chart(results, paths["chart"]) is None:
        del paths["chart"]
    return paths

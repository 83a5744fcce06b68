"""Latency of the guarded prediction vs the plain graph, per backend (a measurement, not a test).

For each backend, on preprocessed images (preprocessing is the same for both and left out):
- batch 1: per-image latency of `Guard.predict` (fused graph + the plain pass on images where a
  shortcut is present), of the fused `guarded` graph alone, and of the `plain` graph;
- batch 8: throughput (images/s) of the same three.
Runs are block-interleaved (A B C A B C ...) so drift and noise from other processes hit every
variant alike; the figures are medians and 90th percentiles over all calls of all blocks.

    python benchmarks/runtime_latency.py [BUNDLE] [--backends onnxruntime,openvino] [--json out.json]

Without BUNDLE the demo bundle is built as the tests build it (tiny ViT, cached after the first run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_demo_bundle(out: Path) -> Path:
    """The same steps as the tests' `demo_bundle` fixture."""
    from dataclasses import replace

    from edgeshort.demo import DEMO_DETECTOR, demo_datasets, demo_model
    from edgeshort.detect import ShortcutDetector
    from edgeshort.export import ExportOptions, export_bundle

    data = demo_datasets("patch")
    vit = demo_model("patch", data, progress=False)
    result = ShortcutDetector(replace(DEMO_DETECTOR, progress=False)).fit(vit, data["val"], run_dir=out / "run")
    return export_bundle(result, out / "bundle", ExportOptions(progress=False), calibration=data["val"]).root


def demo_test_images(guard, count: int) -> np.ndarray:
    """Preprocessed demo test images; their shortcut share is the demo's (about half)."""
    from edgeshort.demo import demo_datasets

    test = demo_datasets("patch")["test"]
    idx = np.linspace(0, len(test) - 1, count).round().astype(int)
    return guard.preprocess([test.array(int(i)) for i in idx])


def interleaved(variants: dict, inputs: list, rounds: int, block: int) -> dict[str, np.ndarray]:
    """Seconds per call of each variant, measured in alternating blocks of `block` calls."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # untimed warm-up
        for x in inputs[:3]:
            fn(x)
    for r in range(rounds):
        for name, fn in variants.items():
            for j in range(block):
                x = inputs[(r * block + j) % len(inputs)]
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    return {name: np.asarray(t) for name, t in times.items()}


def summarise(times: dict[str, np.ndarray], batch: int) -> dict:
    out = {}
    for name, t in times.items():
        median, p90 = float(np.median(t)), float(np.percentile(t, 90))
        out[name] = {"batch": batch, "median_ms": median * 1e3, "p90_ms": p90 * 1e3,
                     "per_image_ms": median * 1e3 / batch, "images_per_s": batch / median, "calls": len(t)}
    plain = out["plain"]["median_ms"]
    for name in out:
        out[name]["ratio_vs_plain"] = out[name]["median_ms"] / plain
    return out


def bench_backend(bundle: Path, backend: str, images: np.ndarray | None, rounds: int, block: int,
                  threads: int | None) -> dict:
    from edgeshort.runtime import Guard
    from edgeshort.runtime.backends import open_session

    guard = Guard.load(bundle, backend=backend, threads=threads)
    if images is None:
        images = demo_test_images(guard, 64)
    fmt = "onnx" if backend == "onnxruntime" else "openvino"
    # The same backend settings as the Guard's own sessions.
    plain = open_session(guard.bundle.path("plain", fmt), backend, threads=threads)
    guarded = open_session(guard.bundle.path("guarded", fmt), backend, threads=threads)
    present = np.mean([r.shortcut_present for r in guard.predict(images, batch_size=16)])
    report = {"backend": backend, "precision": guard.info.precision, "threads": threads,
              "cold_start_s": guard.info.load_seconds, "shortcut_share": float(present), "figures": {}}
    for batch in (1, 8):
        inputs = [np.ascontiguousarray(images[i : i + batch]) for i in range(0, len(images) - batch + 1, batch)]
        variants = {
            "guard.predict": lambda x, b=batch: guard.predict(x, batch_size=b),
            "guarded graph": lambda x: guarded.run({"images": x}),
            "plain": lambda x: plain.run({"images": x}),
        }
        report["figures"][f"batch{batch}"] = summarise(interleaved(variants, inputs, rounds, block), batch)
    return report


def print_report(reports: list[dict]) -> None:
    for rep in reports:
        print(f"\n{rep['backend']} ({rep['precision']}, threads={rep['threads']}), cold start "
              f"{rep['cold_start_s']:.2f} s, shortcut present in {rep['shortcut_share']:.0%} of the images")
        print(f"  {'':<15}{'batch':>6}{'median ms':>11}{'p90 ms':>9}{'ms/image':>10}{'images/s':>10}{'x plain':>9}")
        for figures in rep["figures"].values():
            for name, f in figures.items():
                print(f"  {name:<15}{f['batch']:>6}{f['median_ms']:>11.3f}{f['p90_ms']:>9.3f}{f['per_image_ms']:>10.3f}"
                      f"{f['images_per_s']:>10.0f}{f['ratio_vs_plain']:>9.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", help="bundle folder (default: build the demo bundle)")
    parser.add_argument("--backends", default="onnxruntime,openvino")
    parser.add_argument("--rounds", type=int, default=20, help="blocks per variant (default 20)")
    parser.add_argument("--block", type=int, default=25, help="calls per block (default 25)")
    parser.add_argument("--threads", type=int, help="inference threads (default: the backend's choice)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        print("building the demo bundle ...", file=sys.stderr, flush=True)
        bundle = build_demo_bundle(Path(tempfile.mkdtemp(prefix="edgeshort-bench-")))
    images = None
    reports = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        reports.append(bench_backend(bundle, backend, images, args.rounds, args.block, args.threads))
    print_report(reports)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

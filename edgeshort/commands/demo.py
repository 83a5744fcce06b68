"""`edgeshort demo`: the whole chain on the built-in synthetic data and tiny ViT."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("-o", "--out", default="edgeshort-demo", help="output folder (default: edgeshort-demo)")
    parser.add_argument("--artefact", default="patch", choices=("patch", "ruler"), help="shortcut kind to plant")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _stage(name: str):
    print(f"\n== {name} ==", flush=True)
    return time.perf_counter()


def run(args) -> int:

    from edgeshort.demo import DEMO_DETECTOR, demo_datasets, demo_model
    from edgeshort.detect import ShortcutDetector

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet

    t = _stage("data: synthetic ISIC-like images with a planted shortcut")
    datasets = demo_datasets(args.artefact)
    for name, data in datasets.items():
        print(f"  {name:<5} {len(data):>5} images, artefact on {data.groups.mean():.0%}")
    print(f"  ({time.perf_counter() - t:.1f} s)")

    t = _stage("model: tiny ViT trained on the train split (cached after the first run)")
    model = demo_model(args.artefact, datasets, progress=progress)
    print(f"  ({time.perf_counter() - t:.1f} s)")

    t = _stage("detect: cluster, score, key heatmaps, key-KNN, ablation, DFR")
    config = replace(DEMO_DETECTOR, progress=progress)
    result = ShortcutDetector(config).fit(model, datasets["val"], run_dir=out / "run")
    print(result.summary())
    metrics = result.evaluate(datasets["test"])
    print("\nper-group accuracy on the balanced test split (original model / flagged tokens ablated / + DFR head):")
    print(metrics["results_table"])
    print(f"\n  shortcut cluster purity (artefact share): {metrics['shortcut_cluster_group_purity']:.3f}")
    print(f"  patch flags vs true artefact patches: precision {metrics['patch_precision']:.3f}, "
          f"recall {metrics['patch_recall']:.3f}")
    print(f"  run folder: {out / 'run'}  ({time.perf_counter() - t:.1f} s)")
    return 0

"""`edgeshort demo`: the whole chain on the built-in synthetic data and tiny ViT.

data -> tiny ViT -> detect -> SpRAy -> export -> predict (torch-free runtime) -> bench -> report.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from edgeshort.detect.verdict import current_verdict, verdict_line

PREDICT_SAMPLE = 16  # test images written to disk and run through `edgeshort predict`


def add_arguments(parser) -> None:
    parser.add_argument("-o", "--out", default="edgeshort-demo", help="output folder (default: edgeshort-demo)")
    parser.add_argument("--artefact", default="patch", choices=("patch", "ruler"), help="shortcut kind to plant")
    parser.add_argument("--no-bench", action="store_true", help="skip the latency benchmark stage")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


class _Stage:
    """Prints a stage banner on entry and its wall time on exit."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self):
        print(f"\n== {self.name} ==", flush=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        print(f"  ({time.perf_counter() - self.start:.1f} s)", flush=True)


def write_test_images(test, out: Path) -> tuple[Path, Path]:
    """A sample of the test split as PNG files in `out/test_images/`, listed in `out/test_images.csv`
    (path, label, artefact group: the form `edgeshort detect --eval` reads); -> (folder, listing)."""
    import csv

    import numpy as np

    from edgeshort._spacing import evenly_spaced

    folder = out / "test_images"
    folder.mkdir(exist_ok=True)
    rows = [("path", "label", "group")]
    for i in evenly_spaced(np.arange(len(test)), PREDICT_SAMPLE):
        name = f"test_{i:04d}_{test.class_names[test.labels[i]]}.png"
        test.image(int(i)).save(folder / name)
        rows.append((f"{folder.name}/{name}", test.class_names[test.labels[i]], int(test.groups[i])))
    listing = out / "test_images.csv"
    with open(listing, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return folder, listing


def spray_demo(result, val, out: Path) -> None:
    """SpRAy per class on GradCAM maps of the block before the last (the last block's patch outputs
    do not reach a class-token head); written to `RUN/spray/`, where the report shows it."""
    import numpy as np
    import torch

    from edgeshort.evaluation import ARTEFACT_GROUP_NAMES
    from edgeshort.report.html import artefact_share
    from edgeshort.spray import SpRAyDetector
    from edgeshort.spray.cli import GRID_NAME, write_outputs

    model = result.adapter.model
    inputs = torch.from_numpy(val.preprocessed(result.adapter.preprocessing))
    spray = SpRAyDetector(per_class=True).fit(
        inputs=inputs, labels=np.asarray(val.class_names)[val.labels], model=model,
        group_labels=np.asarray(ARTEFACT_GROUP_NAMES)[val.groups], target_layer=f"blocks.{len(model.blocks) - 2}",
    )
    write_outputs(spray, out)
    print(f"  {len(val)} heatmaps, {spray.n_clusters_} clusters; risk {spray.risk_level_.upper()}")
    for flag in spray.clever_hans_["flags"]:
        cluster = spray.clusters_[flag["cluster_id"]]
        artefact = artefact_share(cluster)
        print(f"  cluster {flag['cluster_id']} ({flag['risk_level']}): {cluster['size']} images of class "
              f"{cluster['majority_label']}, {artefact:.0%} with the planted artefact")
    print(f"  {out / 'summary.txt'}, {out / GRID_NAME}")


def run(args) -> int:
    from edgeshort._optional import require

    # Every extra the chain needs, checked before minutes of training rather than when its stage comes.
    for module, extra in (("torch", "offline"), ("sklearn", "offline"), ("pytorch_grad_cam", "offline"),
                          ("matplotlib", "report")):
        require(module, extra)
    from edgeshort.export.exporter import ExportOptions, require_export_extras

    require_export_extras(ExportOptions())  # the demo's export
    from edgeshort.demo import DEMO_DETECTOR, demo_datasets, demo_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet

    with _Stage("data: synthetic ISIC-like images with a planted shortcut"):
        datasets = demo_datasets(args.artefact)
        for name, data in datasets.items():
            print(f"  {name:<5} {len(data):>5} images, artefact on {data.groups.mean():.0%}")

    with _Stage("model: tiny ViT trained on the train split (cached after the first run)"):
        model = demo_model(args.artefact, datasets, progress=progress)

    with _Stage("detect: cluster, score, key heatmaps, key-KNN, ablation, DFR"):
        from edgeshort.detect import ShortcutDetector

        result = ShortcutDetector(replace(DEMO_DETECTOR, progress=progress)).fit(
            model, datasets["val"], run_dir=out / "run"
        )
        print(result.summary(verdict=False))  # the test split settles the verdict: printed once, below
        metrics = result.evaluate(datasets["test"])
        print("\n  per-group accuracy on the balanced test split (original model / flagged tokens ablated / + DFR):")
        print("  " + metrics["results_table"].replace("\n", "\n  "))
        print(f"\n  shortcut cluster purity (artefact share): {metrics['shortcut_cluster_group_purity']:.3f}")
        print(f"  flagged patches vs true artefact patches: precision {metrics['patch_precision']:.3f}, "
              f"recall {metrics['patch_recall']:.3f}")
        print(f"  {verdict_line(current_verdict(metrics))}")
        print(f"  run folder: {out / 'run'}")

    with _Stage("spray: SpRAy, a second detector, on GradCAM heatmaps of the validation images"):
        spray_demo(result, datasets["val"], out / "run" / "spray")

    with _Stage("export: ONNX + OpenVINO IR bundle with a parity check"):
        from edgeshort.export import ExportOptions, export_bundle

        bundle = export_bundle(result, out / "bundle", ExportOptions(progress=progress),
                               calibration=datasets["val"], overwrite=True)
        for backend, graphs in bundle.manifest["parity"]["backends"].items():
            worst = max(v for g in graphs.values() for k, v in g.items() if "logits" in k)
            print(f"  {backend:<12} max |logit diff| vs torch: {worst:.2e}")

    with _Stage("predict: the torch-free runtime on test images (edgeshort predict)"):
        import json

        from edgeshort.cli import main as cli_main
        from edgeshort.data import load_manifest

        images_dir, listing = write_test_images(datasets["test"], out)
        code = cli_main(["predict", str(out / "bundle"), str(images_dir), "-o", str(out / "predictions.jsonl"),
                         "--overlays", str(out / "overlays"), "--quiet"])
        if code:
            return code
        # The offline detector reads the same files through the CSV listing, as it would a hospital export.
        listed = load_manifest(listing, result.class_names)
        offline = result.predict(listed, progress=False)
        records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        by_name = {Path(r["path"]).name: r for r in records}
        agree = sum(by_name[Path(p).name]["ablated_label"] == result.class_names[label]
                    for p, label in zip(listed.sources, offline.labels("ablated")))
        flagged = sum(bool(r["shortcut_present"]) for r in records)
        print(f"  {len(records)} images: shortcut present on {flagged}; runtime ablated labels equal the "
              f"offline detector's on {agree}/{len(records)} (offline: the same files read through {listing.name})")
        print(f"  records: {out / 'predictions.jsonl'}, overlays: {out / 'overlays'}")

    if not args.no_bench:
        with _Stage("bench: plain vs guarded prediction, block-interleaved"):
            from edgeshort.bench import bench_bundle, markdown_table, write_outputs

            results = bench_bundle(out / "bundle", rounds=3, block=3, progress=progress)
            write_outputs(results, out / "bench")
            print("  " + markdown_table(results).replace("\n", "\n  "))

    with _Stage("report: HTML report with pictures"):
        from edgeshort.report.html import write_report

        page = write_report(out / "run", test_dataset=datasets["test"])
        print(f"  open {page}")
    return 0

"""How the demo's story holds across training seeds: shortcut learned, found, ablated, retrained.

For each artefact kind and training seed this trains the demo's tiny ViT (cached like the
demo's own), runs the detector with the demo's settings, evaluates on the balanced test split
and records the figures the detector's tests assert, plus the validation check's warnings.
Writes `detector_seeds.json`, `detector_seeds.md` and `detector_seeds.png` (worst-group
accuracy original / ablated / ablated + DFR per seed).

    nice -n 10 python benchmarks/detector_seeds.py --seeds 0 1 2 3 4 5 -o bench-seeds/
    nice -n 10 python benchmarks/detector_seeds.py --cluster-space pooled -o bench-seeds-pooled/
    nice -n 10 python benchmarks/detector_seeds.py --cluster-space pooled --positives hottest -o bench-seeds-seed/

Each seed trains two models (about a minute each on one thread) unless they are cached.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

KEYS = ("shortcut_cluster_group_purity", "patch_precision", "patch_recall", "wga_original", "wga_ablated",
        "wga_dfr", "aga_original", "aga_ablated", "aga_dfr", "val_balanced_accuracy_original",
        "val_balanced_accuracy_ablated", "cluster_class_nmi", "cluster_space_used")


def measure(artefact: str, seed: int, cluster_space: str = "auto", positives: str = "calibrated") -> dict:
    from edgeshort.demo import DEMO_DETECTOR, DEMO_TRAIN, demo_data_config, demo_datasets
    from edgeshort.detect import ShortcutDetector
    from edgeshort.models.train import cached_tiny_vit

    data = demo_datasets(artefact)
    model = cached_tiny_vit(replace(DEMO_TRAIN, seed=seed), demo_data_config(artefact), None, data, progress=False)
    config = replace(DEMO_DETECTOR, progress=False, cluster_space=cluster_space, positives=positives)
    result = ShortcutDetector(config).fit(model, data["val"])
    metrics = result.evaluate(data["test"])
    row = {"artefact": artefact, "seed": seed, "cluster_space": cluster_space, "positives": positives,
           **{k: metrics[k] for k in KEYS},
           "warnings": metrics["warnings"]}
    row["found"] = (metrics["shortcut_cluster_group_purity"] >= 0.9 and metrics["patch_precision"] >= 0.6
                    and metrics["patch_recall"] >= 0.8)
    row["dfr_adds"] = metrics["wga_dfr"] > metrics["wga_ablated"]
    ablation, dfr = metrics["group_accuracy_intervals"]["changes"]
    row["ablation_change_interval"], row["dfr_change_interval"] = ablation["worst_interval"], dfr["worst_interval"]
    return row


def _dfr_change(r: dict) -> str:
    lo, hi = r["dfr_change_interval"]
    return f"{r['wga_dfr'] - r['wga_ablated']:+.3f} ({lo:+.3f}, {hi:+.3f})"


def markdown(rows: list[dict]) -> str:
    lines = ["| artefact | seed | WGA original | ablated | + DFR | DFR change (95% CI) | purity | precision | recall "
             "| clustered | class NMI | found | warning |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['artefact']} | {r['seed']} | {r['wga_original']:.3f} | {r['wga_ablated']:.3f} | {r['wga_dfr']:.3f} "
            f"| {_dfr_change(r)} "
            f"| {r['shortcut_cluster_group_purity']:.3f} | {r['patch_precision']:.3f} | {r['patch_recall']:.3f} "
            f"| {r.get('cluster_space_used', r['cluster_space']).replace('_', '-')} | {r['cluster_class_nmi']:.2f} "
            f"| {'yes' if r['found'] else 'no'} | {'yes' if r['warnings'] else ''} |"
        )
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    from edgeshort._optional import require

    matplotlib = require("matplotlib", "report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["artefact"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sub = [r for r in rows if r["artefact"] == kind]
        xs = range(len(sub))
        for offset, (key, label) in zip((-0.27, 0, 0.27), (("wga_original", "original"), ("wga_ablated", "ablated"),
                                                           ("wga_dfr", "ablated + DFR"))):
            ax.bar([x + offset for x in xs], [r[key] for r in sub], width=0.27, label=label)
        ax.set_xticks(list(xs), [f"seed {r['seed']}" + (" (warned)" if r["warnings"] else "") for r in sub],
                      rotation=20, fontsize=8)
        ax.set_ylim(0, 1.18)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_title(f"{kind}: worst-group accuracy on the test split")
        ax.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--artefacts", nargs="+", default=["patch", "ruler"], choices=("patch", "ruler"))
    parser.add_argument("--cluster-space", default="auto", choices=("auto", "pooled", "class_centred"))
    parser.add_argument("--positives", default="calibrated", choices=("calibrated", "hottest"))
    parser.add_argument("-o", "--out", default="bench-seeds")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for artefact in args.artefacts:
        for seed in args.seeds:
            rows.append(measure(artefact, seed, args.cluster_space, args.positives))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    (out / "detector_seeds.json").write_text(json.dumps(rows, indent=2))
    (out / "detector_seeds.md").write_text(markdown(rows))
    chart(rows, out / "detector_seeds.png")
    print(f"wrote {out}/detector_seeds.{{json,md,png}}")


if __name__ == "__main__":
    main()

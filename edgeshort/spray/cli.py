"""`edgeshort spray`: SpRAy on precomputed heatmaps, writing report.json, summary.txt and a PNG.

This module stays import-light (argparse only) so `edgeshort --help` does not load numpy's
neighbours; the detector is imported inside `run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RISK_CHOICES = ("none", "low", "medium", "high")
REPORT_NAME, SUMMARY_NAME, GRID_NAME = "report.json", "summary.txt", "representative_heatmaps.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the `spray` subcommand."""
    parser.add_argument("--heatmaps", required=True, type=Path, help="heatmaps (N, H, W) as .npy")
    parser.add_argument("--labels", type=Path, default=None, help="labels (N,) as .npy (sharpens the verdict)")
    parser.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    parser.add_argument("--affinity", choices=("cosine", "rbf", "knn"), default="cosine")
    parser.add_argument("--cluster-selection", choices=("auto", "eigengap", "fixed"), default="auto")
    parser.add_argument("--n-clusters", type=int, default=None, help="number of clusters (default: eigengap)")
    parser.add_argument("--max-clusters", type=int, default=8, help="upper bound of the eigengap choice")
    parser.add_argument("--downsample-size", type=int, default=32, help="processing resolution (longer side)")
    parser.add_argument("--per-class", action="store_true", help="cluster each class separately (needs --labels)")
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument(
        "--fail-on",
        choices=RISK_CHOICES[1:],
        default=None,
        help="exit with status 1 when the risk level is at least this (for CI gates)",
    )
    parser.add_argument("--full-resolution", action="store_true", help="report mean heatmaps at input resolution")


def _load_array(path: Path, what: str):
    import numpy as np

    from edgeshort.errors import InputError

    if not path.is_file():
        raise FileNotFoundError(f"expected {what} file at {path}, got no such file; do check the path")
    if path.suffix != ".npy":
        raise InputError(f"expected {what} as a .npy file, got {path.name}; do save them with numpy.save")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise InputError(f"expected a numeric .npy file for {what}, got one numpy cannot read ({exc}); do re-save it") from exc


def run(args: argparse.Namespace) -> int:
    """Fit SpRAy and write the outputs; 0 on success, 1 when `--fail-on` is reached, 2 on bad input."""
    import json

    from edgeshort.errors import InputError
    from edgeshort.spray.detector import SpRAyDetector

    try:
        heatmaps = _load_array(args.heatmaps, "heatmaps")
        labels = _load_array(args.labels, "labels") if args.labels is not None else None
        detector = SpRAyDetector(
            affinity=args.affinity,
            cluster_selection=args.cluster_selection,
            n_clusters=args.n_clusters,
            max_clusters=args.max_clusters,
            downsample_size=args.downsample_size,
            per_class=args.per_class,
            random_state=args.random_state,
        ).fit(heatmaps=heatmaps, labels=labels)
    except (InputError, FileNotFoundError) as exc:
        print(f"edgeshort spray: {exc}", file=sys.stderr)
        return 2

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = detector.get_report(full_resolution=args.full_resolution)
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    summary = detector.summary()
    (out / SUMMARY_NAME).write_text(summary + "\n", encoding="utf-8")
    detector.save_representative_heatmaps(out / GRID_NAME)
    print(summary)
    print(f"\nwrote {out / REPORT_NAME}, {out / SUMMARY_NAME}, {out / GRID_NAME}")
    if args.fail_on is not None and RISK_CHOICES.index(detector.risk_level_) >= RISK_CHOICES.index(args.fail_on):
        return 1
    return 0

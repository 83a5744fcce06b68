"""`edgeshort spray`: SpRAy on precomputed heatmaps, writing report.json, summary.txt and a PNG.

This module stays import-light (argparse only) so `edgeshort --help` does not load numpy's
neighbours; the detector is imported inside `run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeshort.spray.choices import AFFINITIES, CLUSTER_SELECTIONS, RISK_LEVELS, risk_rank

REPORT_NAME, SUMMARY_NAME, GRID_NAME = "report.json", "summary.txt", "representative_heatmaps.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the `spray` subcommand."""
    parser.add_argument("--heatmaps", required=True, type=Path, help="heatmaps (N, H, W) as .npy")
    parser.add_argument("--labels", type=Path, default=None, help="labels (N,) as .npy (sharpens the verdict)")
    parser.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    parser.add_argument("--affinity", choices=AFFINITIES, default="cosine")
    parser.add_argument("--cluster-selection", choices=CLUSTER_SELECTIONS, default="auto")
    parser.add_argument("--n-clusters", type=int, default=None, help="number of clusters (default: eigengap)")
    parser.add_argument("--max-clusters", type=int, default=8, help="upper bound of the eigengap choice")
    parser.add_argument("--downsample-size", type=int, default=32, help="processing resolution (longer side)")
    parser.add_argument("--per-class", action="store_true", help="cluster each class separately (needs --labels)")
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument(
        "--fail-on",
        choices=RISK_LEVELS[1:],
        default=None,
        help="exit with status 1 when the risk level is at least this (for CI gates)",
    )
    parser.add_argument("--full-resolution", action="store_true", help="report mean heatmaps at input resolution")


# How to re-save an array numpy stored as Python objects, per input.
RESAVE = {
    "heatmaps": "np.save(path, heatmaps.astype(np.float32))",
    "labels": "np.save(path, labels.astype(str)), or labels.astype(int) for class ids",
}


def _load_array(path: Path, what: str):
    import numpy as np

    from edgeshort.errors import InputError

    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.npy"))[:5]
        inside = f" (it holds {', '.join(found)})" if found else ""
        raise InputError(
            f"expected {what} as one .npy file, got the folder {path}{inside}; do pass the .npy file itself"
        )
    if not path.is_file():
        raise FileNotFoundError(f"expected {what} file at {path}, got no such file; do check the path")
    if path.suffix != ".npy":
        raise InputError(f"expected {what} as a .npy file, got {path.name}; do save them with numpy.save")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "Object arrays" in str(exc):
            raise InputError(
                f"expected {what} as a plain array, got {path.name} saved as Python objects (which are not "
                f"loaded, for safety); do re-save it with {RESAVE[what]}"
            ) from None
        raise InputError(f"expected a numeric .npy file for {what}, got one numpy cannot read ({exc}); do re-save it") from exc


FLAG_NAMES = {"n_clusters": "--n-clusters", "cluster_selection": "--cluster-selection", "max_clusters": "--max-clusters",
              "downsample_size": "--downsample-size"}


def _check_flags(args: argparse.Namespace) -> None:
    """The flag combinations the detector would reject, worded as flags (before any loading or fitting)."""
    from edgeshort.errors import InputError

    if args.per_class and args.labels is None:
        raise InputError("expected --labels with --per-class, got none; do pass --labels LABELS.npy or drop --per-class")
    from edgeshort.spray.detector import check_cluster_settings

    check_cluster_settings(args.cluster_selection, args.n_clusters, args.max_clusters, args.downsample_size, FLAG_NAMES)
    # The first existing path up from --out must be a folder, or the outputs cannot be written after the fit.
    existing = next(p for p in (args.out, *args.out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise InputError(
            f"expected --out to be a folder, got the existing file {existing}; do pass a new or existing folder"
        )


def write_outputs(detector, out: Path, full_resolution: bool = False) -> str:
    """A fitted detector's report.json, summary.txt and heatmap grid PNG in `out` (`RUN/spray/` is
    where `edgeshort report` looks); -> the summary."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    report = detector.get_report(full_resolution=full_resolution)
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    summary = detector.summary()
    (out / SUMMARY_NAME).write_text(summary + "\n", encoding="utf-8")
    detector.save_representative_heatmaps(out / GRID_NAME)
    return summary


def run(args: argparse.Namespace) -> int:
    """Fit SpRAy and write the outputs; 0 on success, 1 when `--fail-on` is reached, 2 on bad input."""
    from edgeshort.errors import InputError
    from edgeshort.spray.detector import SpRAyDetector

    try:
        _check_flags(args)
        heatmaps = _load_array(args.heatmaps, "heatmaps")
        labels = _load_array(args.labels, "labels") if args.labels is not None else None
        if args.n_clusters is not None and heatmaps.ndim >= 1 and args.n_clusters > len(heatmaps):
            raise InputError(
                f"expected at least --n-clusters {args.n_clusters} heatmaps, got {len(heatmaps)}; "
                "do pass more heatmaps or a smaller --n-clusters"
            )
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
    summary = write_outputs(detector, out, full_resolution=args.full_resolution)
    print(summary)
    print(f"\nwrote {out / REPORT_NAME}, {out / SUMMARY_NAME}, {out / GRID_NAME}")
    if args.fail_on is not None and risk_rank(detector.risk_level_) >= risk_rank(args.fail_on):
        return 1
    return 0

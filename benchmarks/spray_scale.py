"""SpRAy at scale: fit time, peak RSS and quality on 5,000 and 50,000 synthetic 64x64 heatmaps.

Each size runs in its own subprocess so the peak resident memory of one does not hide the
other's. The peak is the process's high-water mark (VmHWM), reset after the heatmaps are
generated, so it covers `fit` plus the heatmaps already in memory (which a user also holds).

When shortkit-ml (import `shortcut_detect`) is importable its SpRAy runs on the same sets
for comparison; it is not a dependency (it pins torch 2.2 / numpy<2), so elsewhere the
comparison is skipped with a message. Its dense N x N affinity is not attempted at 50,000
(20 GB in float64).

    nice -n 10 python benchmarks/spray_scale.py                  # both sizes
    nice -n 10 python benchmarks/spray_scale.py --sizes 5000     # one size
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGETS = {5000: {"seconds": 5.0}, 50000: {"seconds": 120.0, "peak_gb": 4.0}}
CHUNK = 5000  # heatmaps generated per seed, so generation never holds two full copies


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux), in MB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """High-water mark of resident memory of this process, in MB."""
    peak = _proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    current = _proc_status_mb("VmRSS")
    return current if current is not None else float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_set(n: int, size: int, fraction: float, seed: int):
    from edgeshort.spray.synthetic import make_spray_heatmaps

    heatmaps = np.empty((n, size, size), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    planted = np.empty(n, dtype=bool)
    for index, start in enumerate(range(0, n, CHUNK)):
        stop = min(start + CHUNK, n)
        part = make_spray_heatmaps(stop - start, size, fraction, seed=seed + index)
        heatmaps[start:stop], labels[start:stop], planted[start:stop] = part.heatmaps, part.labels, part.is_artefact
    return heatmaps, labels, planted


def match_quality(cluster_labels: np.ndarray, planted: np.ndarray) -> dict:
    """Best-matching cluster of the planted group: purity and recall."""
    best = {"cluster": None, "purity": 0.0, "recall": 0.0}
    for cid in np.unique(cluster_labels):
        members = cluster_labels == cid
        hits = int((members & planted).sum())
        purity, recall = hits / int(members.sum()), hits / max(int(planted.sum()), 1)
        if purity * recall > best["purity"] * best["recall"]:
            best = {"cluster": int(cid), "purity": round(purity, 4), "recall": round(recall, 4)}
    return best


def run_case(n: int, size: int, fraction: float, seed: int, implementation: str) -> dict:
    heatmaps, labels, planted = make_set(n, size, fraction, seed)
    # Imports are a one-off cost, timed apart from fit.
    started = time.perf_counter()
    if implementation == "edgeshort":
        import scipy.sparse.linalg  # noqa: F401
        import sklearn.cluster  # noqa: F401
        import sklearn.metrics  # noqa: F401
        import sklearn.utils.extmath  # noqa: F401
        import threadpoolctl  # noqa: F401

        from edgeshort.spray.detector import SpRAyDetector
    else:
        from shortcut_detect import SpRAyDetector as ShortkitSpRAy
    import_seconds = time.perf_counter() - started
    rss_data = current_rss_mb()
    exact_peak = reset_peak_rss()
    if implementation == "edgeshort":

        started = time.perf_counter()
        detector = SpRAyDetector(affinity="cosine", cluster_selection="auto", downsample_size=32).fit(heatmaps, labels)
        seconds = time.perf_counter() - started
        quality = match_quality(detector.labels_, planted)
        flags = {f["cluster_id"]: f["risk_level"] for f in detector.clever_hans_["flags"]}
        result = {
            "n_clusters": detector.n_clusters_,
            "graph": detector.spectral_runs_["all"].graph,
            "risk_level": detector.risk_level_,
            "planted_cluster_risk": flags.get(quality["cluster"], "none"),
        }
    else:
        started = time.perf_counter()
        detector = ShortkitSpRAy(affinity="cosine", cluster_selection="auto", downsample_size=32, random_state=0)
        detector.fit(heatmaps=heatmaps, labels=labels)
        seconds = time.perf_counter() - started
        quality = match_quality(np.asarray(detector.cluster_labels_), planted)
        result = {
            "n_clusters": int(len(np.unique(detector.cluster_labels_))),
            "shortcut_detected": bool(getattr(detector, "shortcut_detected_", False)),
        }
    return {
        "implementation": implementation,
        "n": n,
        "size": size,
        "artefact_fraction": fraction,
        "fit_seconds": round(seconds, 2),
        "import_seconds": round(import_seconds, 2),
        "rss_after_data_mb": round(rss_data, 0),
        "peak_rss_mb": round(peak_rss_mb(), 0),
        "peak_is_fit_only": exact_peak,
        "best_match": quality,
        **result,
    }


def child(args: argparse.Namespace) -> int:
    print(json.dumps(run_case(args.case, args.size, args.fraction, args.seed, args.implementation)))
    return 0


def shortkit_available() -> bool:
    try:
        import shortcut_detect  # noqa: F401
    except ImportError as exc:
        print(f"shortkit-ml comparison skipped: `import shortcut_detect` failed ({exc}); install shortkit-ml in a "
              "separate environment (it pins torch 2.2 / numpy<2) and run this script there to compare")
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--size", type=int, default=64, help="heatmap side")
    parser.add_argument("--fraction", type=float, default=0.1, help="planted artefact share")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--implementation", default="edgeshort", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        return child(args)

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, cpus {os.cpu_count()}, "
          f"affinity: {os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else '?'}")
    implementations = ["edgeshort"] + (["shortkit"] if shortkit_available() else [])
    results = []
    for n in args.sizes:
        for implementation in implementations:
            if implementation == "shortkit" and n > 10000:
                print(f"shortkit-ml at n={n} skipped: its dense N x N affinity needs {n * n * 8 / 1e9:.0f} GB")
                continue
            command = [sys.executable, __file__, "--case", str(n), "--size", str(args.size),
                       "--fraction", str(args.fraction), "--seed", str(args.seed), "--implementation", implementation]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{implementation} n={n} failed:\n{done.stderr[-2000:]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            target = TARGETS.get(n, {})
            result["meets_time_target"] = result["fit_seconds"] <= target.get("seconds", float("inf"))
            if "peak_gb" in target:
                result["meets_memory_target"] = result["peak_rss_mb"] / 1024 <= target["peak_gb"]
            results.append(result)
            print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

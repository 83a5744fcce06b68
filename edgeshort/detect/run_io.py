"""The run folder: what a detection run writes, and how it is loaded back (for export and reports).

Arrays go to `.npz`, settings and results to JSON, pictures to PNG; the model itself is kept
as `model.pt` (an edgeshort checkpoint for the tiny ViT, the whole module otherwise).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from edgeshort._version import __version__, package_versions
from edgeshort.detect.config import SETTINGS_OF_EARLIER_RUNS, DetectorConfig
from edgeshort.detect.dfr import LinearHead
from edgeshort.detect.keymaps import Clustering, KeyKNN
from edgeshort.detect.scoring import ClusterScore
from edgeshort.errors import InputError

RUN_FORMAT = 1


# What a fit writes besides the files every save rewrites: an earlier run's copies in the same folder
# would otherwise be read back as this run's (its test predictions, pictures, report). The feature
# cache stays: it is stamped with the model and images it came from.
EARLIER_RUN_FILES = ("dfr_head.npz", "test_predictions.npz", "results.csv", "report.html")
# spray/ described the earlier run's model: the report would show it beside the new run's figures.
EARLIER_RUN_FOLDERS = ("heatmaps/cluster_*", "patch_grids/cluster_*", "report_files", "spray")


def clear_earlier_run(run_dir: Path) -> None:
    """Remove what an earlier detection run wrote here, finished or interrupted (its clusters.npz is
    written before run.json); a folder that is not a run is left alone."""
    if not ((run_dir / "run.json").is_file() or (run_dir / "clusters.npz").is_file()):
        return
    for name in EARLIER_RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for pattern in EARLIER_RUN_FOLDERS:
        for path in run_dir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)


def save_result(result, run_dir: Path) -> Path:
    import torch

    from edgeshort.models import save_checkpoint
    from edgeshort.models.tiny import TinyViT

    run_dir.mkdir(parents=True, exist_ok=True)
    # run.json marks a complete run: gone while the files change, written last, so an interrupted
    # save leaves a folder `load` refuses rather than one that mixes two runs.
    (run_dir / "run.json").unlink(missing_ok=True)
    model = result.adapter.model
    if isinstance(model, TinyViT):
        save_checkpoint(model, run_dir / "model.pt")
    else:
        torch.save(model, run_dir / "model.pt")
    c = result.clustering
    meta = {
        "format": RUN_FORMAT,
        "config": result.config.to_dict(),
        "class_names": list(result.class_names),
        "model": result.adapter.describe(),
        "shortcut_cluster": int(result.shortcut_cluster),
        "scores": [s.to_dict() for s in result.scores],
        "saliency_scale": result.saliency_scale,
        "clustering": {"feature_min": c.feature_min, "feature_max": c.feature_max},
        "dfr": None if result.dfr_head is None else result.dfr_head.info,
        "data_source": result.data_source,
        # Of the weights (the state dict's tensors), not of the model file: the same weights saved
        # anew, or loaded from another format, keep it.
        "model_sha256": result.weights_sha256,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"python": platform.python_version(), "edgeshort": __version__,
                     **package_versions(("torch", "torchvision", "scikit-learn", "numpy", "timm", "transformers"))},
    }
    (run_dir / "config.json").write_text(json.dumps(result.config.to_dict(), indent=2))
    (run_dir / "clusters.json").write_text(json.dumps(
        {"shortcut_cluster": int(result.shortcut_cluster), "scores": meta["scores"],
         "sizes": np.bincount(c.assignments).tolist()}, indent=2))
    np.savez_compressed(
        run_dir / "clusters.npz", assignments=c.assignments, projection=c.projection, distances=c.distances,
        pca_components=c.pca_components, pca_mean=c.pca_mean, centroids=c.centroids,
        labels=result.val_labels, groups=result.val_groups if result.val_groups is not None else np.zeros(0),
        present=result.val_present,
        **{f"selected_{i}": s for i, s in enumerate(result.selected)},
        **{f"heatmaps_{i}": h for i, h in enumerate(result.heatmaps)},
    )
    np.savez_compressed(run_dir / "knn.npz", reference=result.knn.reference, labels=result.knn.labels,
                        k=np.int64(result.knn.k), clean_keys=result.clean_keys)
    if result.dfr_head is not None:
        np.savez_compressed(run_dir / "dfr_head.npz", weight=result.dfr_head.weight, bias=result.dfr_head.bias)
    else:
        (run_dir / "dfr_head.npz").unlink(missing_ok=True)
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2))
    return run_dir


def load_result(run_dir: Path, model=None):
    from edgeshort.detect.detector import DetectionResult
    from edgeshort.models import load_adapter

    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise InputError(f"{str(run_dir)!r} is not a detection run folder (no run.json); fit with run_dir= or "
                         "result.save(RUN) (CLI: edgeshort detect -o RUN), or, if a fit was interrupted here, fit again")
    meta = json.loads(meta_path.read_text())
    if meta.get("format", 0) > RUN_FORMAT:
        raise InputError(f"run format {meta['format']} is newer than this edgeshort reads ({RUN_FORMAT}); upgrade")
    adapter = load_adapter(model if model is not None else run_dir / "model.pt")
    fitted = meta.get("model_sha256")
    if model is not None and fitted:
        from edgeshort.detect.extract import weights_fingerprint

        given = weights_fingerprint(adapter.model)
        if given != fitted:
            raise InputError(
                f"the model given has other weights (sha256 {given[:12]}...) than {str(run_dir)!r} was fitted on "
                f"({fitted[:12]}...); its clusters, KNN and DFR head would judge a model they never saw. Load the "
                "run without a model (its model.pt), or fit this model again"
            )
    saved = meta.get("model", {}).get("preprocessing")
    if saved:  # the run's normalisation, which may differ from the family's default
        adapter.set_preprocessing(saved["mean"], saved["std"], saved["interpolation"], saved.get("crop_pct"),
                                  saved.get("crop_mode", "center"))
    with np.load(run_dir / "clusters.npz") as z:
        k = len([name for name in z.files if name.startswith("selected_")])
        clustering = Clustering(
            assignments=z["assignments"], projection=z["projection"], distances=z["distances"],
            feature_min=meta["clustering"]["feature_min"], feature_max=meta["clustering"]["feature_max"],
            pca_components=z["pca_components"], pca_mean=z["pca_mean"], centroids=z["centroids"],
        )
        selected = [z[f"selected_{i}"] for i in range(k)]
        heatmaps = [z[f"heatmaps_{i}"] for i in range(k)]
        labels, groups, present = z["labels"], z["groups"], z["present"]
    knn_path = run_dir / "knn.npz"
    if not knn_path.is_file():
        raise InputError(f"{str(run_dir)!r} has no knn.npz; the run did not finish, run `edgeshort detect` again")
    with np.load(knn_path) as z:
        knn = KeyKNN(z["reference"], z["labels"], int(z["k"]))
        clean_keys = z["clean_keys"]
    dfr_head = None
    if meta.get("dfr") is not None and (run_dir / "dfr_head.npz").is_file():
        with np.load(run_dir / "dfr_head.npz") as z:
            dfr_head = LinearHead(z["weight"], z["bias"], meta.get("dfr") or {})
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    return DetectionResult(
        # Progress belongs to the session, not the run: a run fitted with --quiet still shows bars when loaded.
        config=DetectorConfig.from_dict({**SETTINGS_OF_EARLIER_RUNS, **meta["config"], "progress": True}),
        adapter=adapter, class_names=tuple(meta["class_names"]),
        scores=[ClusterScore(**s) for s in meta["scores"]], shortcut_cluster=int(meta["shortcut_cluster"]),
        clustering=clustering, selected=selected, heatmaps=heatmaps, knn=knn, clean_keys=clean_keys,
        saliency_scale=float(meta["saliency_scale"]), dfr_head=dfr_head, val_labels=labels,
        val_groups=groups if groups.size else None, val_present=present, metrics=metrics, run_dir=run_dir,
        data_source=meta.get("data_source"), weights_sha256=fitted,
    )


def write_pictures(result, dataset, run_dir: Path, per_cluster: int = 8) -> None:
    """The seed's pictures: images nearest each centroid, their key heatmaps, and patch grids."""
    from PIL import Image

    from edgeshort.report.draw import colourise, grid_to_pixels, heatmap_overlay, patch_grid_crop, upscale

    grid = result.grid
    scale = max(1, 256 // max(result.adapter.image_size))
    for c, (idx, maps) in enumerate(zip(result.selected, result.heatmaps)):
        heat_dir = run_dir / "heatmaps" / f"cluster_{c}"
        grid_dir = run_dir / "patch_grids" / f"cluster_{c}"
        heat_dir.mkdir(parents=True, exist_ok=True)
        grid_dir.mkdir(parents=True, exist_ok=True)
        samples = []  # which validation file each picture shows, so a user can open the original
        for rank, (i, heat) in enumerate(zip(idx[:per_cluster], maps[:per_cluster])):
            samples.append({"rank": rank, "index": int(i), "file": dataset.file_name(int(i))})
            image = np.asarray(result.adapter.preprocessing.model_view(dataset.image(int(i))))
            heat = heat.reshape(grid)
            upscale(image, scale).save(heat_dir / f"sample_{rank}_image.png")
            upscale(heatmap_overlay(image, heat), scale).save(heat_dir / f"sample_{rank}_overlay.png")
            Image.fromarray(colourise(grid_to_pixels(heat, (256, 256)), 0.0, 1.0)).save(
                heat_dir / f"sample_{rank}_heatmap.png"
            )
            hottest = np.unravel_index(int(np.argmax(heat)), grid)
            crop = patch_grid_crop(image, grid, hottest, span=5)
            upscale(crop, scale).save(grid_dir / f"sample_{rank}_patches.png")
        (heat_dir / "samples.json").write_text(json.dumps(samples, indent=2))

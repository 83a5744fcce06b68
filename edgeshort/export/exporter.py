"""Export a detection run to a verified bundle: ONNX + OpenVINO IR graphs, manifest, parity report.

Graphs go through `torch.onnx.export(dynamo=True)` traced with batch 2 and a declared dynamic
batch axis (a batch-1 example silently fixes the batch at 1). OpenVINO IR is converted from the
ONNX file (converting the torch module directly fails on torchvision's ViT) and saved with f32
weights unless FP16 is asked for. The ONNX graphs then share one weights file (`onnx_weights`). Parity is measured with the runtime's own backends, so what
was checked is exactly what will run; a bundle whose parity exceeds tolerance is not written.
OpenVINO graphs with FP16 weights are checked too, within looser limits the manifest records.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgeshort._optional import require
from edgeshort._spacing import evenly_spaced
from edgeshort._version import __version__, package_versions
from edgeshort.detect.verdict import DO_NOT_GUARD, FOUND, current_verdict
from edgeshort.errors import BundleError, InputError, ParityError, VerdictRefusal
from edgeshort.export.graphs import graph_specs
from edgeshort.export.onnx_weights import WEIGHTS_FILE, share_onnx_weights
from edgeshort.runtime.backends import open_session
from edgeshort.runtime.bundle import FUSED_GRAPHS, GRAPHS, MANIFEST, SPLIT_GRAPHS, load_bundle, write_manifest

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
GRAPH_SETS = {"all": FUSED_GRAPHS + SPLIT_GRAPHS, "fused": FUSED_GRAPHS, "split": SPLIT_GRAPHS}
OPSET = 20
# IR 10 (opset <= 21) is read by every onnxruntime since 1.18; onnx's own default may be newer.
IR_VERSION = 10
DEFAULT_TOLERANCE = 1e-4
# FP16 weights keep 11 significant bits, so OpenVINO's outputs move off torch's: measured on the demo,
# logits by 0.002 on its 32 calibration images and up to 0.045 over 800 test images, where one flag
# of 2,048 flipped at the KNN's vote boundary. A larger --tolerance raises this limit too.
FP16_TOLERANCE = 0.1
FP16_MISMATCH_SHARE = 0.02


@dataclass(frozen=True)
class ExportOptions:
    """How `export_bundle` writes a bundle (each option is also an `edgeshort export` flag).

    formats: "onnx" and optionally "openvino" (IR); weights: OpenVINO IR weights "f32" or "fp16"
    (checked within looser limits); int8: add nncf-quantised guarded and plain graphs (OpenVINO),
    calibrated on `int8_calibration_size` images and checked against f32 on others;
    tolerance: the largest |logit difference| from torch accepted; calibration_size: images in the
    parity check; skl2onnx_check: cross-check the KNN graph against skl2onnx's; progress: show
    progress; dfr: ship the run's DFR head; graphs: "all", "fused" or "split" (see GRAPH_SETS);
    ignore_verdict: export a run whose verdict is that no shortcut was found or the guard harms (DO_NOT_GUARD).
    """

    formats: tuple[str, ...] = FORMATS
    weights: str = "f32"  # OpenVINO IR weights: "f32" or "fp16"
    int8: bool = False
    tolerance: float = DEFAULT_TOLERANCE
    calibration_size: int = 32
    int8_calibration_size: int = 300  # images nncf calibrates on (nncf's own default); others check the result
    skl2onnx_check: bool = True
    progress: bool = True
    # False leaves the run's DFR head out: the bundle's final label is then the ablated prediction.
    dfr: bool = True
    # Which graphs to ship (GRAPH_SETS): the ONNX graphs share one weights file, but each OpenVINO IR holds its
    # own, so with OpenVINO "fused" or "split" make a smaller bundle that runs one path only.
    graphs: str = "all"
    # A run whose verdict says the guard masks nothing the model relies on is refused unless this is set.
    ignore_verdict: bool = False

    def __post_init__(self) -> None:
        if self.graphs not in GRAPH_SETS:
            raise InputError(f"expected graphs in {tuple(GRAPH_SETS)}, got {self.graphs!r}")
        if self.int8 and self.graphs == "split":
            raise InputError("INT8 quantises the fused guarded and plain graphs; export with graphs 'all' or 'fused'")
        unknown = set(self.formats) - set(FORMATS)
        if unknown or not self.formats or "onnx" not in self.formats:
            raise InputError(f"expected formats from {FORMATS} including 'onnx', got {self.formats}; e.g. "
                             "--formats onnx,openvino (ONNX is always written: the OpenVINO IR is converted from it)")
        if self.weights not in ("f32", "fp16"):
            raise InputError(f"expected weights 'f32' or 'fp16', got {self.weights!r}")
        if self.int8 and "openvino" not in self.formats:
            raise InputError("INT8 quantisation writes OpenVINO IR; add 'openvino' to the formats "
                             "(CLI: --formats onnx,openvino)")
        if self.weights == "fp16" and "openvino" not in self.formats:
            raise InputError("FP16 weights are OpenVINO IR's (ONNX graphs stay f32); add 'openvino' to the formats "
                             "(CLI: --formats onnx,openvino) or keep f32 weights (--weights f32)")
        for name in ("calibration_size", "int8_calibration_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError(f"expected {name} as a positive whole number, got {value!r}"
                                 + (" (CLI: --int8-calibration-size)" if name.startswith("int8") else ""))
        if not self.tolerance > 0:
            raise InputError(f"expected a tolerance above 0 (the largest |logit difference| to accept), got "
                             f"{self.tolerance}; e.g. 1e-4 (CLI: --tolerance 1e-4)")


def _export_onnx(name, module, example, input_names, output_names, dynamic, path: Path) -> None:
    import torch

    onnx = require("onnx", "offline")
    require("onnxscript", "offline")
    dims = {}
    shapes = {}
    for arg in input_names:
        axes = dynamic.get(arg, {})
        shapes[arg] = {axis: dims.setdefault(label, torch.export.Dim(label, min=1)) for axis, label in axes.items()}
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Shared dynamic axes make the exporter note that it merges their names; nothing to act on.
        warnings.filterwarnings("ignore", message=r"# The axis name")
        torch.onnx.export(
            module, example, str(path), input_names=input_names, output_names=output_names,
            dynamic_shapes=shapes, dynamo=True, opset_version=OPSET, external_data=True, verbose=False,
        )
    # The weights stay in torch's `<graph>.onnx.data` until share_onnx_weights gathers every graph's.
    model = onnx.load(str(path), load_external_data=False)
    model.ir_version = IR_VERSION
    path.write_bytes(model.SerializeToString())
    logger.info("exported %s to %s", name, path.name)


def _to_openvino(onnx_path: Path, xml_path: Path, fp16: bool) -> None:
    ov = require("openvino", "openvino")
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=fp16)


def _skl2onnx_knn(result, path: Path, opset: int = 15) -> None:
    """scikit-learn's KNN through skl2onnx: a cross-check artefact, not the runtime path."""
    skl2onnx = require("skl2onnx", "offline")
    from skl2onnx.common.data_types import FloatTensorType

    d = result.knn.reference.shape[1]
    onx = skl2onnx.convert_sklearn(
        result.knn.classifier, initial_types=[("keys", FloatTensorType([None, d]))],
        target_opset={"": opset, "ai.onnx.ml": 3}, options={id(result.knn.classifier): {"zipmap": False}},
    )
    onx.ir_version = min(onx.ir_version, IR_VERSION)
    # skl2onnx names the graph with a random uuid and lists the opsets in set order: fixed here, so two
    # exports of one run in fresh processes write the same bytes (its node names count per process).
    onx.graph.name = "knn_skl2onnx"
    opsets = sorted((o.domain, o.version) for o in onx.opset_import)
    del onx.opset_import[:]
    for domain, version in opsets:
        onx.opset_import.add(domain=domain, version=version)
    path.write_bytes(onx.SerializeToString())


def _calibration_images(result, dataset, size: int) -> tuple[np.ndarray, float]:
    """The parity images of `dataset` (pixels only, `as_images`), preprocessed, and the median of how
    many-fold they were enlarged to the model's input (the runtime warns on images enlarged far more)."""
    idx = evenly_spaced(np.arange(len(dataset)), size)
    # Keep both flagged and clean images in the batch so the parity covers the masked path.
    subset = dataset.subset(idx)
    prep = result.adapter.preprocessing
    enlargement = float(np.median([prep.enlargement(*subset.image(i).size) for i in range(len(subset))]))
    return subset.preprocessed(prep), enlargement


def _torch_reference(result, images: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    adapter = result.adapter
    with torch.inference_mode():
        x = torch.from_numpy(images)
        tokens = adapter.embed(x)
        keys, raw, flags, present, saliency, keep = result.guard_tokens(tokens)
        features = adapter.head_features(tokens, keep)
        ref = {
            "tokens": tokens.numpy(), "keep": keep.numpy(), "logits": adapter.forward_tokens(tokens).numpy(),
            "ablated_logits": adapter.head_linear()(features).numpy(), "flags": flags, "raw_flags": raw,
            "present": present, "saliency": saliency, "keys": keys,
        }
        if result.dfr_head is not None:
            ref["dfr_logits"] = result.dfr_head.to_torch()(features).numpy()
    return ref


def _compare(graph: str, outputs: dict, ref: dict) -> dict:
    """Max |difference| (or mismatch count, for flags) of each output against torch."""
    report: dict = {}
    for name, value in outputs.items():
        # encoder_head is fed the guard's keep mask, so its "logits" are the ablated ones.
        expected = ref["ablated_logits" if (graph == "encoder_head" and name == "logits") else name]
        if value.dtype == bool or expected.dtype == bool:
            report[f"{name}_mismatches"] = int((value.astype(bool) != expected.astype(bool)).sum())
        else:
            report[f"{name}_max_abs_diff"] = float(np.abs(value.astype(np.float64) - expected).max())
    return report


def _run_graph(session, graph: str, images: np.ndarray, ref: dict, batch: int) -> dict:
    """Run a graph over the calibration images in batches of `batch`; concatenate outputs."""
    outs: dict[str, list] = {}
    for start in range(0, len(images), batch):
        sl = slice(start, start + batch)
        if graph in ("guarded", "plain", "embed"):
            feed = {"images": images[sl]}
        elif graph == "guard":
            feed = {"tokens": ref["tokens"][sl]}
        else:
            feed = {"tokens": ref["tokens"][sl], "keep": ref["keep"][sl]}
        for k, v in session.run(feed).items():
            outs.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def _parity(root: Path, graphs: dict, formats, images, ref: dict, tolerance, fp16_openvino: bool = False) -> dict:
    report: dict = {"tolerance": tolerance, "calibration_size": int(len(images)), "backends": {}}
    if fp16_openvino:
        report["openvino_fp16_limits"] = {"tolerance": max(FP16_TOLERANCE, tolerance),
                                          "mismatch_share": FP16_MISMATCH_SHARE}
    failures = []
    for fmt in formats:
        backend = "onnxruntime" if fmt == "onnx" else "openvino"
        fp16 = fp16_openvino and backend == "openvino"
        per_graph = {}
        for graph, files in graphs.items():
            session = open_session(root / files["files"][fmt], backend, precision="f32")
            figures = {}
            for batch in (1, 3):
                outputs = _run_graph(session, graph, images, ref, batch)
                for key, value in _compare(graph, outputs, ref).items():
                    figures[key] = max(figures.get(key, 0), value)
            per_graph[graph] = figures
            for key, value in figures.items():
                if fp16:
                    limit = (FP16_MISMATCH_SHARE * ref[key.removesuffix("_mismatches")].size
                             if key.endswith("_mismatches") else max(FP16_TOLERANCE, tolerance))
                else:
                    limit = 0 if key.endswith("_mismatches") else (
                        tolerance if "logits" in key or key.startswith("tokens") else max(tolerance, 1e-3))
                if value > limit:
                    failures.append(f"{backend}/{graph}: {key} = {value:.3g} > {limit:g}")
        report["backends"][backend] = per_graph
    report["passed"] = not failures
    report["failures"] = failures
    return report


def _knn_cross_check(root: Path, ref: dict) -> dict:
    session = open_session(root / "knn_skl2onnx.onnx", "onnxruntime")
    keys = ref["keys"].reshape(-1, ref["keys"].shape[-1]).astype(np.float32)
    labels = session.run({"keys": keys})["label"].reshape(ref["raw_flags"].shape).astype(bool)
    report = {"patches": int(labels.size), "mismatches_vs_sklearn": int((labels != ref["raw_flags"]).sum())}
    if (root / "guard.onnx").is_file():
        guard = open_session(root / "guard.onnx", "onnxruntime").run({"tokens": ref["tokens"]})["raw_flags"]
        report["mismatches_vs_guard_graph"] = int((labels != guard).sum())
    return report


def require_export_extras(options: ExportOptions) -> None:
    """Raise naming the extra to install for any package an export with `options` needs, before minutes of export
    rather than when its step comes."""
    needs = [("onnx", "offline"), ("onnxscript", "offline")]
    if "openvino" in options.formats:
        needs.append(("openvino", "openvino"))
    if options.int8:
        needs.append(("nncf", "int8"))
    if options.skl2onnx_check:
        needs.append(("skl2onnx", "offline"))
    for module, extra in needs:
        require(module, extra)


def export_bundle(run, out: str | Path, options: ExportOptions | None = None, calibration=None,
                  overwrite: bool = False):
    """Write a verified bundle for a detection run (a run folder or a `DetectionResult`) to `out`.

    `options`: formats, weights, INT8, tolerance, graphs and DFR (see `ExportOptions`). `calibration`:
    the images the parity check runs (an ImageDataset, an image folder or CSV listing, labels not
    needed, a list of images, or an (images, labels) tuple); by default the run's validation images. `overwrite`
    replaces an existing bundle (never another folder). The bundle is refused, and not written, when
    a backend's outputs differ from torch by more than the tolerance.
    """
    from edgeshort.detect import DetectionResult, ShortcutDetector

    options = options or ExportOptions()
    require_export_extras(options)
    result = run if isinstance(run, DetectionResult) else ShortcutDetector.load(run)
    result.check_weights()  # a bundle of new weights with an old guard would pass its own parity check
    verdict = current_verdict(result.metrics)
    if verdict and verdict["verdict"] in DO_NOT_GUARD and not options.ignore_verdict:
        raise VerdictRefusal(
            f"the run's verdict: {verdict['summary']}. No bundle is written; to export the guard anyway (e.g. to look "
            "at its flags on the edge), pass --ignore-verdict (ExportOptions(ignore_verdict=True))"
        )
    dfr_omitted = not options.dfr and result.dfr_head is not None
    if dfr_omitted:
        result = replace(result, dfr_head=None)
    out = Path(out)
    _check_destination(out, overwrite)
    if calibration is None:
        calibration = _resolve_calibration(result)
    from edgeshort.data import as_images

    calibration = as_images(calibration)  # only the pixels count: the labels may name other classes, or none
    images, enlargement = _calibration_images(result, calibration, options.calibration_size)
    seconds: dict[str, float] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside the destination, so the final rename stays on one filesystem, and made by mkdir
    # (not mkdtemp, whose 0700 would lock out a service reading the bundle as another user).
    staging = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    staging.mkdir()
    try:
        specs = {name: spec for name, spec in graph_specs(result).items() if name in GRAPH_SETS[options.graphs]}
        graphs = {}
        for name, (module, example, input_names, output_names, dynamic) in specs.items():
            t = time.perf_counter()
            if options.progress:  # the line is finished with the time taken: a large model's graph takes minutes
                print(f"  exporting {name:<13} ...", end="", flush=True)
            files = {"onnx": f"{name}.onnx"}
            _export_onnx(name, module, example, input_names, output_names, dynamic, staging / files["onnx"])
            if "openvino" in options.formats:
                files["openvino"] = f"{name}.xml"
                _to_openvino(staging / files["onnx"], staging / files["openvino"], options.weights == "fp16")
            graphs[name] = {"files": files, "inputs": input_names, "outputs": output_names,
                            "description": GRAPHS[name]}
            seconds[f"export_{name}"] = round(time.perf_counter() - t, 3)
            if options.progress:
                print(f" {seconds[f'export_{name}']:.1f} s", flush=True)
        # After the OpenVINO conversions, which read each graph's own weights file, and before the parity
        # check, so that what is checked is what ships.
        shared = share_onnx_weights(staging, [graph["files"]["onnx"] for graph in graphs.values()])
        for graph in graphs.values():
            graph["onnx_external_data"] = WEIGHTS_FILE
        logger.info("ONNX weights: %d tensors, %d distinct, %.1f MB in %s instead of %.1f MB",
                    shared["tensors"], shared["distinct"], shared["bytes_after"] / 1e6, WEIGHTS_FILE,
                    shared["bytes_before"] / 1e6)
        t = time.perf_counter()
        if options.progress:
            print(f"  checking every graph against torch on {len(images)} images ...", end="", flush=True)
        # One torch pass over the calibration images serves the parity and the KNN cross-check.
        ref = _torch_reference(result, images)
        parity = _parity(staging, graphs, options.formats, images, ref, options.tolerance,
                         fp16_openvino=options.weights == "fp16")
        seconds["parity"] = round(time.perf_counter() - t, 3)
        if options.progress:
            print(f" {seconds['parity']:.1f} s", flush=True)
        extra_files = []
        knn_check = None
        if options.skl2onnx_check:
            _skl2onnx_knn(result, staging / "knn_skl2onnx.onnx")
            knn_check = _knn_cross_check(staging, ref)
            extra_files.append("knn_skl2onnx.onnx")
            if knn_check["mismatches_vs_sklearn"]:
                parity["failures"].append(f"skl2onnx KNN: {knn_check['mismatches_vs_sklearn']} flags differ")
        if parity["failures"]:
            fp16_failed = options.weights == "fp16" and any(f.startswith("openvino/") for f in parity["failures"])
            raise ParityError(
                "the exported graphs do not reproduce the torch model within tolerance; bundle not written:\n  "
                + "\n  ".join(parity["failures"])
                + ("\n  the OpenVINO graphs have FP16 weights: export with --weights f32, or accept the difference "
                   "with a larger --tolerance" if fp16_failed else "")
            )
        int8 = None
        if options.int8:
            from edgeshort.export.quantize import quantize_fused

            t = time.perf_counter()
            int8 = quantize_fused(staging, graphs, calibration, result.adapter.preprocessing,
                                  options.int8_calibration_size, result.dfr_head is not None, options.progress)
            seconds["int8"] = round(time.perf_counter() - t, 3)
        manifest = _manifest(result, graphs, options, parity, knn_check, int8, seconds, extra_files, dfr_omitted)
        manifest["guard"]["calibration_enlargement"] = round(enlargement, 4)
        manifest["onnx"]["weights"] = shared  # the file: each graph's onnx_external_data
        write_manifest(staging, manifest)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_bundle(out)


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BundleError(f"{str(out)!r} is a file; choose a folder for the bundle")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise BundleError(f"{str(out)!r} exists and is not empty; choose a new folder or pass overwrite=True (--force)")
    if not (out / MANIFEST).is_file():
        # --force replaces a bundle; a run folder or a home directory is never deleted.
        raise BundleError(
            f"{str(out)!r} holds files but no {MANIFEST}, so it is not a bundle and overwrite (--force) will not "
            "delete it; choose a new or empty folder"
        )


def _versions() -> dict:
    installed = package_versions(("torch", "onnx", "onnxscript", "onnxruntime", "openvino", "skl2onnx", "scikit-learn",
                                  "nncf"))
    installed["sklearn"] = installed.pop("scikit-learn")
    return {"edgeshort": __version__, **installed}


def _dfr_fit_warnings(metrics: dict) -> list[str]:
    """The run's warnings about its DFR head's fit (runs saved before the list held one, under another key)."""
    earlier = metrics.get("dfr_fit_warning")
    return metrics.get("dfr_fit_warnings") or ([earlier] if earlier else [])


def _manifest(result, graphs, options, parity, knn_check, int8, seconds, extra_files, dfr_omitted) -> dict:
    cfg = result.config
    verdict = current_verdict(result.metrics)
    ov_version = _versions()["openvino"]
    return {
        "edgeshort_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": result.adapter.describe(),
        "class_names": list(result.class_names),
        "guard": {
            "key_layer": cfg.key_layer, "knn_k": int(result.knn.k), "knn_reference_size": int(len(result.knn.reference)),
            "dilation_radius": cfg.dilation_radius, "min_patches": cfg.min_patches,
            "saliency": cfg.saliency, "saliency_scale": result.saliency_scale, "has_dfr": result.dfr_head is not None,
            "dfr_omitted": dfr_omitted,
            "shortcut_cluster": int(result.shortcut_cluster),
            # The detection run's own doubts (e.g. ablation that lowers validation accuracy) travel with
            # it, and its test set's verdict on a DFR head the bundle ships.
            # The verdict first: a bundle exported against it (--ignore-verdict) says so before anything else.
            "warnings": ([verdict["summary"]] if verdict and verdict["verdict"] != FOUND else [])
            + [w for w in result.metrics.get("warnings") or []
               if result.dfr_head is not None or w not in _dfr_fit_warnings(result.metrics)]
            + [result.metrics[key] for key in ("dfr_warning", "dfr_cell_warning")
               if result.metrics.get(key) and result.dfr_head is not None]
            + ([result.metrics["guard_warning"]] if result.metrics.get("guard_warning") else [])
            # A cell masking collapses is the final label's only without the DFR head that repairs it.
            + ([result.metrics["guard_cell_warning"]]
               if result.metrics.get("guard_cell_warning") and result.dfr_head is None else []),
            "verdict": verdict,
        },
        "onnx": {"opset": OPSET, "ir_version": IR_VERSION},
        "openvino": ({"version": ov_version, "weights": options.weights, "int8": int8}
                     if "openvino" in options.formats else None),
        "precision": "f32",
        "tools": _versions(),
        "graphs": graphs,
        "parity": parity,
        "knn_cross_check": knn_check,
        "extra_files": extra_files,
        "seconds": seconds,
        "source_run": str(Path(result.run_dir).resolve()) if result.run_dir else None,
        # What ties the bundle to its audited run beyond a path: the weights, data, settings and results.
        "run": {
            "model_sha256": result.weights_sha256, "data_source": result.data_source,
            "test_source": result.metrics.get("test_source"), "config": cfg.to_dict(),
            "worst_group_accuracy": {kind: result.metrics.get(f"wga_{kind}") for kind in ("original", "ablated", "dfr")},
        },
    }


def _resolve_calibration(result):
    if result.run_dir is not None:
        meta = json.loads((Path(result.run_dir) / "run.json").read_text())
        source = meta.get("data_source")
        if source:
            from edgeshort.data import dataset_from_source

            return dataset_from_source(source, result.class_names)
    raise InputError(
        "the run does not record where its validation images are; pass calibration images "
        "(export_bundle(..., calibration=IMAGES); CLI: --data VAL) so the export can check parity"
    )

"""INT8 post-training quantisation of the fused graphs (guarded and plain) with nncf.

nncf calibrates on some of the calibration images; the export then measures what INT8 costs on
others it never saw: agreement of the INT8 labels, shortcut decisions and flags with the f32
graphs', and the largest logit difference. Below `INT8_MIN_AGREEMENT` the bundle carries a warning.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from edgeshort._optional import require
from edgeshort.runtime.backends import open_session
from edgeshort.runtime.bundle import INT8_GRAPHS

# Held-out images the INT8 graphs are checked on, at most.
INT8_CHECK_SIZE = 500
# Final-label agreement with f32 below which an INT8 bundle warns: one image in a hundred.
INT8_MIN_AGREEMENT = 0.99
_CHECK_BATCH = 16


@contextlib.contextmanager
def _quiet_nncf(quiet: bool):
    """nncf draws its progress bars on rich's global console and logs at INFO; --quiet silences both."""
    if not quiet:
        yield
        return
    import rich

    console, logger = rich.get_console(), logging.getLogger("nncf")
    was_quiet, level = console.quiet, logger.level
    console.quiet = True
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        console.quiet = was_quiet
        logger.setLevel(level)


def int8_split(count: int, calibration_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `count` images: up to `calibration_size` evenly spaced for nncf, and up to
    INT8_CHECK_SIZE evenly spaced among the others for the check (none when nothing is left)."""
    calibrate = np.unique(np.linspace(0, count - 1, min(calibration_size, count)).round().astype(np.int64))
    rest = np.setdiff1d(np.arange(count), calibrate)
    check = rest[np.unique(np.linspace(0, len(rest) - 1, min(INT8_CHECK_SIZE, len(rest))).round().astype(np.int64))]
    return calibrate, check


def _batches(images, indices: np.ndarray, prep):
    for start in range(0, len(indices), _CHECK_BATCH):
        yield images.subset(indices[start : start + _CHECK_BATCH]).preprocessed(prep)


def quantize_fused(root: Path, graphs: dict, images, prep, calibration_size: int, has_dfr: bool,
                   progress: bool = True) -> dict:
    """Write the INT8 twins of the guarded and plain graphs into `root` (and `graphs`); return the
    manifest's record of what they cost. `images`: the calibration dataset (pixels only)."""
    nncf = require("nncf", "int8")
    ov = require("openvino", "openvino")
    calibrate, check = int8_split(len(images), calibration_size)
    calibration = np.concatenate(list(_batches(images, calibrate, prep)))
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    for name, int8_name in INT8_GRAPHS.items():
        model = ov.Core().read_model(str(root / graphs[name]["files"]["openvino"]))
        with _quiet_nncf(not progress):
            # Transformer mode keeps the numerically touchy parts (softmax, layer norms) in float.
            quantized = nncf.quantize(model, dataset, subset_size=len(calibration),
                                      model_type=nncf.ModelType.TRANSFORMER)
        xml = root / f"{int8_name}.xml"
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        graphs[int8_name] = {"files": {"openvino": xml.name}, "inputs": graphs[name]["inputs"],
                             "outputs": graphs[name]["outputs"],
                             "description": f"the {name} graph with INT8 weights and activations"}
    held_out = len(check) > 0
    checked = check if held_out else calibrate  # too few images to hold any out: say so
    sessions = {name: open_session(root / graphs[name]["files"]["openvino"], "openvino")
                for name in (*INT8_GRAPHS, *INT8_GRAPHS.values())}
    outputs: dict[str, list] = {}
    for batch in _batches(images, checked, prep):
        for name, session in sessions.items():
            for key, value in session.run({"images": batch}).items():
                outputs.setdefault(f"{name}/{key}", []).append(value)
    out = {k: np.concatenate(v) for k, v in outputs.items()}
    final = "dfr_logits" if has_dfr else "ablated_logits"

    def agreement(a: str, b: str) -> float:
        return float((out[a].argmax(1) == out[b].argmax(1)).mean())

    logit_keys = ["ablated_logits", *(["dfr_logits"] if has_dfr else [])]
    report = {
        "graphs": list(INT8_GRAPHS.values()),
        "calibration_size": int(len(calibrate)),
        "check_size": int(len(checked)),
        "check_held_out": held_out,
        "final_label_agreement": agreement(f"guarded/{final}", f"guarded_int8/{final}"),
        "plain_label_agreement": agreement("plain/logits", "plain_int8/logits"),
        "present_agreement": float((out["guarded/present"] == out["guarded_int8/present"]).mean()),
        "flag_agreement": float((out["guarded/flags"] == out["guarded_int8/flags"]).mean()),
        "max_abs_logit_diff": max(
            [float(np.abs(out[f"guarded/{k}"] - out[f"guarded_int8/{k}"]).max()) for k in logit_keys]
            + [float(np.abs(out["plain/logits"] - out["plain_int8/logits"]).max())]),
        "warning": None,
    }
    agree = report["final_label_agreement"]
    if agree < INT8_MIN_AGREEMENT:
        differ = round((1 - agree) * len(checked))
        report["warning"] = (
            f"INT8 changes the final label of {differ} of {len(checked)} "
            f"{'held-out ' if held_out else ''}images ({1 - agree:.1%}) against f32; check it on labelled test "
            "images before shipping it, calibrate on more images (--int8-calibration-size), or run f32")
    return report

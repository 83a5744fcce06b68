"""INT8 post-training quantisation of the fused graphs (guarded and plain) with nncf; the guard stays f32.

nncf calibrates on some of the calibration images; the export then measures what INT8 costs on
others it never saw: agreement of the INT8 labels, shortcut decisions and flags with the f32 ONNX
graphs', and the largest logit difference. Final labels or shortcut decisions agreeing below
`INT8_MIN_AGREEMENT`, or a check on fewer than `INT8_MIN_CHECK` images, and the bundle carries a warning.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from edgeshort._optional import require
from edgeshort._spacing import evenly_spaced
from edgeshort.runtime.backends import open_session
from edgeshort.runtime.bundle import INT8_GRAPHS
from edgeshort.runtime.guard import unguarded_logits

# Held-out images the INT8 graphs are checked on, at most.
INT8_CHECK_SIZE = 500
# Final-label agreement with f32 below which an INT8 bundle warns: one image in a hundred.
INT8_MIN_AGREEMENT = 0.99
# Fewer held-out images than this, and the agreement is too rough to stand alone: the bundle warns.
INT8_MIN_CHECK = 100
_CHECK_BATCH = 16
# Graph outputs that are the classifier's; the guarded graph's others are the guard's.
LOGIT_OUTPUTS = {"ablated_logits", "dfr_logits", "logits"}


@contextlib.contextmanager
def _nncf_output(progress: bool):
    """nncf logs at INFO every operation it leaves unquantised (the guard's, on purpose), and importing its
    torch parts can log torch's CUDA_HOME guess: both kept to warnings and above. Its progress bars draw on
    rich's global console; without progress they are silenced too."""
    import rich

    console = rich.get_console()
    loggers = {logging.getLogger("nncf"): logging.WARNING, logging.getLogger("torch.utils.cpp_extension"): logging.ERROR}
    was_quiet, levels = console.quiet, {logger: logger.level for logger in loggers}
    console.quiet = was_quiet or not progress
    for logger, floor in loggers.items():
        logger.setLevel(max(logger.getEffectiveLevel(), floor))
    try:
        yield
    finally:
        console.quiet = was_quiet
        for logger, level in levels.items():
            logger.setLevel(level)


def int8_split(count: int, calibration_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `count` images: held out for the check first (up to INT8_CHECK_SIZE, at most half),
    then up to `calibration_size` of the rest for nncf, each evenly spaced. A single image is both."""
    everything = np.arange(count)
    if count < 2:
        return everything, np.empty(0, np.int64)
    check = evenly_spaced(everything, min(INT8_CHECK_SIZE, count // 2))
    return evenly_spaced(np.setdiff1d(everything, check), calibration_size), check


def guard_operations(model, guard_outputs: set[str]) -> list[str]:
    """Names of the operations the guard's outputs (flags, present, saliency) are computed from.

    nncf leaves these in f32: the key-KNN ranks reference keys by distance differences far finer than
    INT8 steps, and quantising its MatMul (and the key projection and patch embedding before it) changed
    whether a shortcut was found on a third of a walkthrough's held-out images. They are a small share of
    the graph's work; the encoder and head, which the flags only mask, stay INT8. nncf's SmoothQuant still
    rescales the guard MatMuls' inputs and weights against each other, an identity in exact arithmetic (on four
    model families the INT8 graph's saliency stayed within 2e-5 of the f32 IR's, and no flag moved).
    """
    stack = [output.get_node() for output in model.outputs if output.get_names() & guard_outputs]
    seen: dict[str, str] = {}
    while stack:
        node = stack.pop()
        if node.get_friendly_name() not in seen:
            seen[node.get_friendly_name()] = node.get_type_name()
            stack.extend(port.get_source_output().get_node() for port in node.inputs())
    return sorted(name for name, kind in seen.items() if kind not in ("Parameter", "Constant", "Result"))


def quantize_fused(root: Path, graphs: dict, images, prep, calibration_size: int, has_dfr: bool,
                   progress: bool = True) -> dict:
    """Write the INT8 twins of the guarded and plain graphs into `root` (and `graphs`); return the
    manifest's record of what they cost. `images`: the calibration dataset (pixels only)."""
    nncf = require("nncf", "int8")
    ov = require("openvino", "openvino")
    calibrate, check = int8_split(len(images), calibration_size)
    calibration = images.subset(calibrate).preprocessed(prep)
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    for name, int8_name in INT8_GRAPHS.items():
        model = ov.Core().read_model(str(root / graphs[name]["files"]["openvino"]))
        guard_ops = guard_operations(model, set(graphs[name]["outputs"]) - LOGIT_OUTPUTS)
        with _nncf_output(progress):
            # Transformer mode keeps the numerically touchy parts (softmax, layer norms) in float.
            quantized = nncf.quantize(model, dataset, subset_size=len(calibration),
                                      model_type=nncf.ModelType.TRANSFORMER,
                                      ignored_scope=nncf.IgnoredScope(names=guard_ops) if guard_ops else None)
        xml = root / f"{int8_name}.xml"
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        graphs[int8_name] = {"files": {"openvino": xml.name}, "inputs": graphs[name]["inputs"],
                             "outputs": graphs[name]["outputs"],
                             "description": f"the {name} graph with INT8 weights and activations"}
    held_out = len(check) > 0
    checked = check if held_out else calibrate  # a single image: nothing to hold out, and it says so
    # The reference is the f32 ONNX graphs: the bundle's OpenVINO IR may carry FP16 weights.
    sessions = {name: open_session(root / graphs[name]["files"]["onnx"], "onnxruntime") for name in INT8_GRAPHS}
    sessions.update({int8: open_session(root / graphs[int8]["files"]["openvino"], "openvino")
                     for int8 in INT8_GRAPHS.values()})
    outputs: dict[str, list] = {}
    for _, batch in images.subset(checked).batches(prep, _CHECK_BATCH):
        for name, session in sessions.items():
            for key, value in session.run({"images": batch}).items():
                outputs.setdefault(f"{name}/{key}", []).append(value)
    out = {k: np.concatenate(v) for k, v in outputs.items()}
    final = "dfr_logits" if has_dfr else "ablated_logits"
    f32_final, int8_final = out[f"guarded/{final}"].argmax(1), out[f"guarded_int8/{final}"].argmax(1)
    # The plain label as the runtime gives it.
    present = out["guarded_int8/present"].astype(bool)
    int8_plain = unguarded_logits(out["guarded_int8/ablated_logits"], present,
                                  lambda idx: out["plain_int8/logits"][idx]).argmax(1)
    f32_plain = out["plain/logits"].argmax(1)
    logit_keys = ["ablated_logits", *(["dfr_logits"] if has_dfr else [])]
    report = {
        "graphs": list(INT8_GRAPHS.values()),
        "reference": "the f32 ONNX graphs",
        "calibration_size": int(len(calibrate)),
        "check_size": int(len(checked)),
        "check_held_out": held_out,
        "final_label_agreement": float((f32_final == int8_final).mean()),
        "plain_label_agreement": float((f32_plain == int8_plain).mean()),
        "label_changed_agreement": float(((f32_final != f32_plain) == (int8_final != int8_plain)).mean()),
        "present_agreement": float((out["guarded/present"] == out["guarded_int8/present"]).mean()),
        "flag_agreement": float((out["guarded/flags"] == out["guarded_int8/flags"]).mean()),
        "max_abs_logit_diff": max(
            [float(np.abs(out[f"guarded/{k}"] - out[f"guarded_int8/{k}"]).max()) for k in logit_keys]
            + [float(np.abs(out["plain/logits"] - out["plain_int8/logits"]).max())]),
        "warning": None,
    }
    report["warning"] = int8_warning(report)
    return report


def int8_warning(report: dict) -> str | None:
    """What an INT8 check (`quantize_fused`'s record) says against shipping it, or None."""
    checked = report["check_size"]
    seen = f"{checked} {'held-out ' if report['check_held_out'] else ''}image{'s' if checked != 1 else ''}"
    problems = []

    def changes(agreement: float, what: str) -> str:
        return f"INT8 changes {what} {round((1 - agreement) * checked)} of {seen} ({1 - agreement:.1%}) against f32"

    if report["final_label_agreement"] < INT8_MIN_AGREEMENT:
        problems.append(changes(report["final_label_agreement"], "the final label of"))
    if report["present_agreement"] < INT8_MIN_AGREEMENT:
        # The final label can hide it: a DFR head scores every image, flagged or not, and held-out images
        # where the artefact disagrees with the label may be few. The guard stays f32 (guard_operations), so
        # this now catches only backend differences; an INT8 guard once flagged 8 of 83 sticker images where
        # f32 flagged 74, at 97.5% final-label agreement.
        problems.append(changes(report["present_agreement"], "whether a shortcut is found on")
                        + ", so its guard masks other images than the f32 guard")
    if checked < INT8_MIN_CHECK:
        problems.append(f"INT8 was checked on only {seen}, too few to trust its agreement figures")
    if not problems:
        return None
    return ("; ".join(problems) + "; check it on labelled test images before shipping it, export with more "
            "calibration images (--data), or run f32")

"""INT8 post-training quantisation of the guarded graph with nncf, on the run's validation images.

The export reports what it costs: top-1 agreement of the INT8 model with the f32 one, and the
share of flag-grid cells that stay the same, on the calibration images.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from edgeshort._optional import require
from edgeshort.runtime.backends import open_session

INT8_GRAPH = "guarded_int8"


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


def quantize_guarded(root: Path, graphs: dict, result, images: np.ndarray, progress: bool = True) -> dict:
    nncf = require("nncf", "int8")
    ov = require("openvino", "openvino")
    model = ov.Core().read_model(str(root / graphs["guarded"]["files"]["openvino"]))
    calibration = nncf.Dataset([images[i : i + 1] for i in range(len(images))])
    with _quiet_nncf(not progress):
        # Transformer mode keeps the numerically touchy parts (softmax, layer norms) in float.
        quantized = nncf.quantize(model, calibration, subset_size=len(images), model_type=nncf.ModelType.TRANSFORMER)
    xml = root / f"{INT8_GRAPH}.xml"
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    graphs[INT8_GRAPH] = {
        "files": {"openvino": xml.name}, "inputs": graphs["guarded"]["inputs"],
        "outputs": graphs["guarded"]["outputs"], "description": "the guarded graph with INT8 weights/activations",
    }
    f32 = open_session(root / graphs["guarded"]["files"]["openvino"], "openvino")
    int8 = open_session(xml, "openvino")
    a, b = f32.run({"images": images}), int8.run({"images": images})
    return {
        "graph": INT8_GRAPH,
        "calibration_size": int(len(images)),
        "top1_agreement_ablated": float((a["ablated_logits"].argmax(1) == b["ablated_logits"].argmax(1)).mean()),
        "flag_agreement": float((a["flags"] == b["flags"]).mean()),
        "present_agreement": float((a["present"] == b["present"]).mean()),
        "max_abs_logit_diff": float(np.abs(a["ablated_logits"] - b["ablated_logits"]).max()),
    }

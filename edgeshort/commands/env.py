"""`edgeshort env`: versions, backends and devices, for bug reports."""

from __future__ import annotations

import importlib
import json
import os
import platform


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def collect() -> dict:
    from edgeshort import __version__

    info: dict = {
        "edgeshort": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "packages": {},
    }
    for name in ("numpy", "PIL", "onnxruntime", "openvino", "onnx", "torch", "torchvision", "sklearn",
                 "skl2onnx", "timm", "transformers", "nncf", "matplotlib"):
        try:
            info["packages"][name] = getattr(importlib.import_module(name), "__version__", "installed")
        except Exception:  # any import failure means "not usable here"
            info["packages"][name] = None
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:
        info["onnxruntime_providers"] = None
    try:
        import openvino as ov

        core = ov.Core()
        info["openvino_devices"] = {d: core.get_property(d, "FULL_DEVICE_NAME") for d in core.available_devices}
    except Exception:
        info["openvino_devices"] = None
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<14} {v if v is not None else 'not installed'}")
        else:
            print(f"{key:<16} {value}")
    return 0

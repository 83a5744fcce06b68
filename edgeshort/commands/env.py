"""`edgeshort env`: versions, backends and devices, for bug reports."""

from __future__ import annotations

import json
import os
import platform


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def collect() -> dict:
    from edgeshort import __version__
    from edgeshort._version import package_versions
    from edgeshort.runtime.preprocess import usable_cores

    info: dict = {
        "edgeshort": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),  # what image preprocessing runs on; a container may allow fewer
        "packages": {},
    }
    info["packages"] = package_versions(("numpy", "Pillow", "onnxruntime", "psutil", "openvino", "onnx", "torch",
                                         "torchvision",
                                         "scikit-learn", "skl2onnx", "timm", "transformers", "nncf", "matplotlib",
                                         "grad-cam"))
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
    info["openvino_telemetry"] = openvino_telemetry()
    return info


def openvino_telemetry() -> str | None:
    """Whether importing OpenVINO reports usage to Intel for this user ("on" unless opted out, or run in CI);
    None without openvino-telemetry, or where its API has changed."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

        # The same check OpenVINO's import makes (no dialog; off in CI).
        consent = OptInChecker().check(enable_opt_in_dialog=False, disable_in_ci=True)
    except Exception:
        return None
    return ("off" if consent == ConsentCheckResult.DECLINED
            else "on (opt out once per user: mkdir -p ~/intel && echo 0 > ~/intel/openvino_telemetry)")


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
            print(f"{key:<16} {'not known' if value is None else value}")
    return 0

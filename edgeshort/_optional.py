"""Lazy imports of optional dependencies, failing with the install line of their extra."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from edgeshort.errors import MissingDependencyError


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise naming `pip install 'edgeshort[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module!r} is needed here but is not importable ({type(exc).__name__}: {exc}); "
            f"install it with: pip install 'edgeshort[{extra}]'"
        ) from exc


# The extra that installs each optional top-level module, for a plain `import` deep in an offline step.
EXTRA_OF_MODULE = {
    "torch": "offline", "torchvision": "offline", "sklearn": "offline", "scipy": "offline", "skl2onnx": "offline",
    "onnx": "offline", "onnxscript": "offline", "tqdm": "offline", "pytorch_grad_cam": "offline",
    "openvino": "openvino", "nncf": "int8", "timm": "timm", "transformers": "transformers",
    "matplotlib": "report",
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # an import hook that refuses it
        return False


def missing_extra(exc: ImportError) -> MissingDependencyError | None:
    """The error naming the extra to install when `exc` is an optional module missing, else None."""
    if isinstance(exc, MissingDependencyError) or not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    if top not in EXTRA_OF_MODULE or _installed(top):
        return None  # installed, but without the part asked for (too old?): its own error says more
    return MissingDependencyError(
        f"this needs {top!r}, which is not installed; install it with: pip install 'edgeshort[{EXTRA_OF_MODULE[top]}]'"
    )

"""The torch-free edge runtime: numpy, Pillow and ONNX Runtime or OpenVINO only.

>>> guard = Guard.load("bundle/")
>>> result = guard.predict("image.png")
>>> result.label, result.ablated_label, result.shortcut_present
"""

from edgeshort.runtime.backends import BACKENDS, choose_backend
from edgeshort.runtime.bundle import BUNDLE_FORMAT, Bundle, load_bundle
from edgeshort.runtime.guard import PATHS, Guard, GuardInfo, GuardResult, PreparedImage
from edgeshort.runtime.preprocess import DEFAULT_MAX_PIXELS, Preprocessing

__all__ = [
    "BACKENDS", "BUNDLE_FORMAT", "DEFAULT_MAX_PIXELS", "PATHS", "Bundle", "Guard", "GuardInfo", "GuardResult",
    "PreparedImage", "Preprocessing", "choose_backend", "load_bundle",
]

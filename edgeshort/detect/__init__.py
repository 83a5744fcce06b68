"""The offline shortcut detector: the seed notebook's method on any ViT.

`DetectorConfig` is plain Python; the detector itself needs torch and scikit-learn
(`pip install 'edgeshort[offline]'`) and is imported on first use, so the torch-free report can
read a run's settings.
"""

from __future__ import annotations

from edgeshort._lazy import lazy_getattr
from edgeshort.detect.config import DetectorConfig

_LAZY = {
    "DetectionResult": "edgeshort.detect.detector",
    "Predictions": "edgeshort.detect.detector",
    "ShortcutDetector": "edgeshort.detect.detector",
    "NamingClient": "edgeshort.detect.naming",
    "ShortcutName": "edgeshort.detect.naming",
    "name_shortcut": "edgeshort.detect.naming",
}

__all__ = ["DetectorConfig", *_LAZY]


__getattr__ = lazy_getattr("edgeshort.detect", _LAZY)

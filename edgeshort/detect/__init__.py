"""The offline shortcut detector: the seed notebook's method on any ViT."""

from edgeshort.detect.config import DetectorConfig
from edgeshort.detect.detector import DetectionResult, Predictions, ShortcutDetector

__all__ = ["DetectionResult", "DetectorConfig", "Predictions", "ShortcutDetector"]

"""edgeshort: find the shortcuts a Vision Transformer has learned and guard it at the edge.

`import edgeshort` stays light (no torch): the heavy parts load on first use.
"""

from __future__ import annotations

from edgeshort._lazy import lazy_getattr
from edgeshort._version import __version__

_LAZY = {
    "ShortcutDetector": "edgeshort.detect",
    "DetectorConfig": "edgeshort.detect",
    "SpRAyDetector": "edgeshort.spray",
    "load_adapter": "edgeshort.models",
    "Guard": "edgeshort.runtime",
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_getattr("edgeshort", _LAZY)

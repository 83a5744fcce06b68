"""edgeshort: find the shortcuts a Vision Transformer has learned and guard it at the edge.

`import edgeshort` stays light (no torch): the heavy parts load on first use.
"""

from __future__ import annotations

from typing import Any

from edgeshort._version import __version__

_LAZY = {
    "ShortcutDetector": "edgeshort.detect",
    "DetectorConfig": "edgeshort.detect",
    "SpRAyDetector": "edgeshort.spray",
    "load_adapter": "edgeshort.models",
    "Guard": "edgeshort.runtime",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeshort' has no attribute {name!r}")

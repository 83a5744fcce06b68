"""Export a detection run to a bundle the torch-free runtime loads.

Exporting needs torch and onnx (`pip install 'edgeshort[offline]'`), imported on first use.
"""

from __future__ import annotations

from edgeshort._lazy import lazy_getattr

_LAZY = {
    "ExportOptions": "edgeshort.export.exporter",
    "export_bundle": "edgeshort.export.exporter",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr("edgeshort.export", _LAZY)

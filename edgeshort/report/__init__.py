"""Pictures of a run: heatmap overlays, patch grids, flag overlays, and the HTML report.

`draw` is numpy + Pillow only (the torch-free runtime uses it); `write_report` and the
figures need matplotlib (`pip install 'edgeshort[report]'`) and are imported on first use.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "write_report": "edgeshort.report.html",
    "load_run": "edgeshort.report.html",
    "cluster_scatter": "edgeshort.report.figures",
    "group_accuracy_bars": "edgeshort.report.figures",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeshort.report' has no attribute {name!r}")

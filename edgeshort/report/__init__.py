"""Pictures of a run: heatmap overlays, patch grids, flag overlays, and the HTML report.

`draw` is numpy + Pillow only (the torch-free runtime uses it); `write_report` and the
figures need matplotlib (`pip install 'edgeshort[report]'`) and are imported on first use.
"""

from __future__ import annotations

from edgeshort._lazy import lazy_getattr

_LAZY = {
    "write_report": "edgeshort.report.html",
    "load_run": "edgeshort.report.html",
    "cluster_scatter": "edgeshort.report.figures",
    "group_accuracy_bars": "edgeshort.report.figures",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr("edgeshort.report", _LAZY)

"""ViT adapters: one small interface over every supported model family.

They need torch (`pip install 'edgeshort[offline]'`), imported on first use, so that a runtime-only
install is told which extra to add rather than that torch is missing.
"""

from __future__ import annotations

from edgeshort._lazy import lazy_getattr

_LAZY = {
    "Preprocessing": "edgeshort.runtime.preprocess",
    "ViTAdapter": "edgeshort.models.base",
    "build_architecture": "edgeshort.models.loading",
    "load_adapter": "edgeshort.models.loading",
    "load_adapter_file": "edgeshort.models.loading",
    "load_model_file": "edgeshort.models.loading",
    "save_checkpoint": "edgeshort.models.loading",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr("edgeshort.models", _LAZY)

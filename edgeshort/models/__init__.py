"""ViT adapters: one small interface over every supported model family."""

from edgeshort.models.base import Preprocessing, ViTAdapter
from edgeshort.models.loading import (
    build_architecture,
    load_adapter,
    load_adapter_file,
    load_model_file,
    save_checkpoint,
)

__all__ = [
    "Preprocessing",
    "ViTAdapter",
    "build_architecture",
    "load_adapter",
    "load_adapter_file",
    "load_model_file",
    "save_checkpoint",
]

"""Pick the adapter for a model, and load models from files. No weights are ever downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeshort.errors import UnsupportedModelError
from edgeshort.models.base import ViTAdapter

SUPPORTED = (
    "edgeshort TinyViT, torchvision VisionTransformer (e.g. vit_b_16), timm VisionTransformer "
    "(incl. register / distillation tokens), transformers ViTForImageClassification"
)


def _module_root(model: Any) -> str:
    return type(model).__module__.split(".")[0]


def load_adapter(model: Any) -> ViTAdapter:
    """Wrap `model` (a module, an adapter, or a path to a saved model) in its family's adapter."""
    from torch import nn

    from edgeshort.models import families
    from edgeshort.models.tiny import TinyViT

    if isinstance(model, ViTAdapter):
        return model
    if isinstance(model, (str, Path)):
        return load_adapter(load_model_file(model))
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"expected a torch nn.Module, a ViTAdapter or a model file path, got {type(model).__name__}; "
            f"supported families: {SUPPORTED}"
        )
    if isinstance(model, TinyViT):
        return families.TinyViTAdapter(model)
    root = _module_root(model)
    if root == "torchvision":
        from torchvision.models import VisionTransformer

        if isinstance(model, VisionTransformer):
            return families.TorchvisionViTAdapter(model)
    if root == "timm":
        from timm.models.vision_transformer import VisionTransformer

        if isinstance(model, VisionTransformer):
            return families.TimmViTAdapter(model)
    if root == "transformers":
        from transformers import ViTForImageClassification

        if isinstance(model, ViTForImageClassification):
            return families.TransformersViTAdapter(model)
    raise UnsupportedModelError(
        f"no adapter for a {type(model).__module__}.{type(model).__name__}; supported families: {SUPPORTED}"
    )


def build_architecture(arch: str, num_classes: int, **kwargs: Any):
    """A randomly initialised model of a named architecture: 'tiny', 'torchvision:vit_b_16', 'timm:NAME'."""
    family, _, name = arch.partition(":")
    if family == "tiny":
        from edgeshort.models.tiny import TinyViT

        return TinyViT(num_classes=num_classes, **kwargs)
    if family == "torchvision":
        import torchvision.models as tvm

        if not name.startswith("vit_") or not hasattr(tvm, name):
            raise UnsupportedModelError(
                f"expected a torchvision ViT builder like 'torchvision:vit_b_16', got {arch!r}"
            )
        return getattr(tvm, name)(weights=None, num_classes=num_classes, **kwargs)
    if family == "timm":
        from edgeshort._optional import require

        timm = require("timm", "timm")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    raise UnsupportedModelError(
        f"expected an architecture 'tiny', 'torchvision:NAME' or 'timm:NAME', got {arch!r}; "
        "for transformers, save the whole module (torch.save(model)) and load that file"
    )


def load_model_file(path: str | Path, arch: str | None = None, **arch_kwargs: Any):
    """Load a model saved as a whole module, an edgeshort checkpoint, or a state dict (+ `arch`)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UnsupportedModelError(
            f"{str(path)!r} is not a torch model file ({type(exc).__name__}: {exc}); "
            "save one with torch.save(model) or torch.save(model.state_dict())"
        ) from exc
    if isinstance(obj, torch.nn.Module):
        return obj.eval()
    if isinstance(obj, dict) and "state_dict" in obj and "arch" in obj:
        model = build_architecture(obj["arch"], **obj.get("arch_kwargs", {}))
        model.load_state_dict(obj["state_dict"])
        return model.eval()
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if arch is None:
            raise UnsupportedModelError(
                f"{str(path)!r} holds a state dict; pass the architecture too, e.g. "
                "arch='torchvision:vit_b_16' (CLI: --arch)"
            )
        head = [v for k, v in obj.items() if k.endswith("head.weight") or k.endswith("classifier.weight")]
        num_classes = int(head[-1].shape[0]) if head else arch_kwargs.pop("num_classes", 1000)
        model = build_architecture(arch, num_classes=num_classes, **arch_kwargs)
        try:
            model.load_state_dict(obj)
        except RuntimeError as exc:
            raise UnsupportedModelError(
                f"the state dict in {str(path)!r} does not fit architecture {arch!r}: {exc}"
            ) from exc
        return model.eval()
    raise UnsupportedModelError(
        f"{str(path)!r} holds a {type(obj).__name__}, not a model; save the module or its state dict"
    )


def save_checkpoint(model, path: str | Path) -> Path:
    """Save a tiny ViT as an edgeshort checkpoint (architecture + config + weights, no pickled code)."""
    import torch

    from edgeshort.models.tiny import TinyViT

    if not isinstance(model, TinyViT):
        raise UnsupportedModelError("save_checkpoint writes TinyViT models; use torch.save(model) for others")
    config = model.config.to_dict()
    num_classes = config.pop("num_classes")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"arch": "tiny", "arch_kwargs": {"num_classes": num_classes, **config}, "state_dict": model.state_dict()},
        path,
    )
    return path

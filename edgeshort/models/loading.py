"""Pick the adapter for a model, and load models from files. No weights are ever downloaded."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

from edgeshort.errors import InputError, UnsupportedModelError
from edgeshort.models.base import ViTAdapter

SUPPORTED = (
    "edgeshort TinyViT, torchvision VisionTransformer (e.g. vit_b_16), timm VisionTransformer "
    "(incl. register / distillation tokens), transformers ViTForImageClassification"
)
TRANSFORMERS_FIX = ("pass the model's save_pretrained folder (config.json + weights: --model DIR), or save the "
                    "whole module with torch.save(model)")


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
        return load_adapter_file(model)
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
            valid = ", ".join(n for n in tvm.list_models(module=tvm) if n.startswith("vit_"))
            raise UnsupportedModelError(
                f"expected a torchvision ViT builder like 'torchvision:vit_b_16', got {arch!r}; "
                f"this torchvision has: {valid}"
            )
        return getattr(tvm, name)(weights=None, num_classes=num_classes, **kwargs)
    if family == "timm":
        from edgeshort._optional import require

        timm = require("timm", "timm")
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UnsupportedModelError(
                f"timm has no model named {name!r} (from {arch!r}); {hint}"
                "list the valid names with python -c \"import timm; print(timm.list_models('vit*'))\""
            )
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    raise UnsupportedModelError(
        f"expected an architecture 'tiny', 'torchvision:NAME' or 'timm:NAME', got {arch!r}; "
        f"for transformers, {TRANSFORMERS_FIX}"
    )


# Where training scripts keep the weights in a checkpoint dict (timm's train.py, common loops).
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
# Added by DataParallel / DistributedDataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _is_state_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _is_edgeshort_checkpoint(obj: dict) -> bool:
    """save_checkpoint's layout: an edgeshort architecture name ('tiny', 'timm:NAME', ...) and its weights."""
    arch = obj.get("arch")
    if not isinstance(arch, str) or not _is_state_dict(obj.get("state_dict")):
        return False
    return arch == "tiny" or (":" in arch and arch.partition(":")[0] in ("torchvision", "timm"))


def _strip_wrapper_prefixes(state: dict) -> dict:
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


# Where each family keeps its position embeddings, and the keyword that sets its input size.
POSITION_EMBEDDINGS = {"timm": ("pos_embed", "img_size"), "torchvision": ("encoder.pos_embedding", "image_size")}


def _trained_image_size(arch: str, state: dict, model, kwargs: dict) -> tuple[str, int] | None:
    """(keyword, size) of the square input the weights' position embeddings were trained at, when it is
    not the size `model` was built for; None when they agree, or the size was given or cannot be told."""
    family = arch.partition(":")[0]
    if family not in POSITION_EMBEDDINGS:
        return None
    key, keyword = POSITION_EMBEDDINGS[family]
    if keyword in kwargs or key not in state or state[key].shape == model.state_dict()[key].shape:
        return None
    if family == "timm":
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        patch = model.patch_embed.patch_size[0]
    else:
        prefix, patch = 1, model.patch_size
    side = math.isqrt(max(int(state[key].shape[1]) - prefix, 0))
    if side < 1 or side * side != int(state[key].shape[1]) - prefix:
        return None  # not a square grid: the shape error below says to give the size
    return keyword, side * patch


def _build_and_load(arch: str, state: dict, arch_kwargs: dict, path: Path):
    """Build `arch` and load `state` into it; the class count comes from the head if not given."""
    state = _strip_wrapper_prefixes(state)
    kwargs = dict(arch_kwargs)
    if "num_classes" not in kwargs:
        head = [v for k, v in state.items() if k.endswith("head.weight") or k.endswith("classifier.weight")]
        kwargs["num_classes"] = int(head[-1].shape[0]) if head else 1000
    model = build_architecture(arch, **kwargs)
    trained_size = _trained_image_size(arch, state, model, kwargs)
    if trained_size is not None:  # fine-tuned at another resolution than the architecture's default
        kwargs[trained_size[0]] = trained_size[1]
        model = build_architecture(arch, **kwargs)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    fix = "check that the architecture (CLI: --arch) is the one the weights were trained as"
    if missing or unexpected:
        raise UnsupportedModelError(
            f"the state dict in {str(path)!r} does not fit architecture {arch!r}: "
            f"{len(missing)} missing keys ({_examples(missing) or 'none'}), "
            f"{len(unexpected)} unexpected keys ({_examples(unexpected) or 'none'}); {fix}"
        )
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
    ]
    if shapes:
        raise UnsupportedModelError(
            f"the state dict in {str(path)!r} does not fit architecture {arch!r}: {len(shapes)} tensors have "
            f"another shape (file vs architecture: {_examples(shapes)}); {fix}, incl. its size and patch size (a square input size is read from the weights; give another one "
            "as --img-size HxW, in Python load_adapter_file(path, arch, image_size=(H, W)))"
        )
    model.load_state_dict(state)
    return model.eval()


# transformers' resample codes (PIL's) for the filters Preprocessing knows.
_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _load_pretrained_folder(path: Path, progress: bool = True):
    """A transformers `save_pretrained` folder (config.json + weights), read from disk only; `progress=False`
    hides transformers' own "Loading weights" bar."""
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(
            f"{str(path)!r} is a folder without config.json; pass a model file, or a transformers "
            "save_pretrained folder"
        )
    from edgeshort._optional import require

    transformers = require("transformers", "transformers")
    bars = transformers.utils.logging
    shown = bars.is_progress_bar_enabled()
    if not progress:
        bars.disable_progress_bar()
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"transformers cannot load the folder {str(path)!r}: {exc}") from exc
    finally:
        if shown:
            bars.enable_progress_bar()
    return model.eval()


def _per_channel(value) -> tuple:
    values = list(value) if isinstance(value, list) else [value]
    return tuple(values * 3) if len(values) == 1 else tuple(values)


def folder_preprocessing(path: str | Path) -> dict | None:
    """set_preprocessing arguments from a transformers folder's preprocessor_config.json, if it has one:
    the normalisation and resize filter its image processor applies (the size is the model's)."""
    config_path = Path(path) / "preprocessor_config.json"
    if not config_path.is_file():
        return None
    import json

    config = json.loads(config_path.read_text())
    prep: dict = {}
    if config.get("do_normalize", True) and "image_mean" in config and "image_std" in config:
        # transformers broadcasts one value (0.5, or [0.5]) over the channels; images here are RGB.
        prep["mean"], prep["std"] = (_per_channel(config[key]) for key in ("image_mean", "image_std"))
    elif not config.get("do_normalize", True):
        prep["mean"], prep["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if config.get("resample") in _RESAMPLE_NAMES:
        prep["interpolation"] = _RESAMPLE_NAMES[config["resample"]]
    return prep


def load_adapter_file(path: str | Path, arch: str | None = None,
                      image_size: int | tuple[int, int] | None = None, progress: bool = True) -> ViTAdapter:
    """The adapter of a saved model, with the preprocessing its folder records (transformers).

    `image_size` is the input size a timm or torchvision state dict was fine-tuned at; a square one
    is read from its position embeddings, so only a non-square size needs giving (CLI: --img-size).
    `progress=False` hides the loading bar transformers draws for a folder.
    """
    adapter = load_adapter(load_model_file(path, arch=arch, progress=progress,
                                           **_image_size_argument(arch, image_size)))
    prep = folder_preprocessing(path)
    try:
        return adapter.set_preprocessing(**prep) if prep else adapter
    except InputError as exc:
        raise InputError(f"{str(Path(path) / 'preprocessor_config.json')!r}: {exc}") from exc


def _image_size_argument(arch: str | None, image_size) -> dict:
    """The architecture keyword that builds `arch` at `image_size` (timm img_size, torchvision image_size)."""
    if image_size is None:
        return {}
    family = (arch or "").partition(":")[0]
    if family not in POSITION_EMBEDDINGS:
        raise InputError(
            f"an input size applies to a timm or torchvision state dict loaded with an architecture (--arch), "
            f"not to {'architecture ' + repr(arch) if arch else 'a file without --arch'}; a saved module, checkpoint "
            "or transformers folder knows its size: drop the size"
        )
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if family == "torchvision":
        if height != width:
            raise InputError(f"torchvision's VisionTransformer takes square inputs only, got {height}x{width}; "
                             "fine-tune it at a square size, or use a timm ViT")
        return {"image_size": height}
    return {"img_size": (height, width)}


def load_model_file(path: str | Path, arch: str | None = None, progress: bool = True, **arch_kwargs: Any):
    """Load a model saved as a whole module, an edgeshort checkpoint, or a state dict (+ `arch`).

    A state dict may sit in a training checkpoint under 'state_dict', 'model_state_dict' or 'model'
    (timm's train.py and most training loops); a DataParallel 'module.' prefix is removed.
    `progress=False` hides the loading bar transformers draws for a folder.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        _refuse_arch_kwargs(path, arch_kwargs)
        return _load_pretrained_folder(path, progress)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist; check the path")
    if path.suffix == ".safetensors":
        raise UnsupportedModelError(f"{str(path)!r} holds weights without their architecture; {TRANSFORMERS_FIX}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UnsupportedModelError(
            f"{str(path)!r} is not a torch model file ({type(exc).__name__}: {exc}); "
            "save one with torch.save(model) or torch.save(model.state_dict())"
        ) from exc
    if isinstance(obj, torch.nn.Module):
        _refuse_arch_kwargs(path, arch_kwargs)
        return obj.eval()
    if isinstance(obj, dict) and _is_edgeshort_checkpoint(obj):
        if arch is not None and arch != obj["arch"]:
            raise UnsupportedModelError(
                f"{str(path)!r} is an edgeshort checkpoint of architecture {obj['arch']!r}, not {arch!r}; "
                "drop --arch, the file names its own"
            )
        return _build_and_load(obj["arch"], obj["state_dict"], {**obj.get("arch_kwargs", {}), **arch_kwargs}, path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), torch.nn.Module):
        _refuse_arch_kwargs(path, arch_kwargs)
        return obj["model"].eval()
    if isinstance(obj, dict):
        state = obj if _is_state_dict(obj) else next((obj[k] for k in STATE_DICT_KEYS if _is_state_dict(obj.get(k))), None)
        if state is not None:
            if any(k.startswith("vit.") for k in _strip_wrapper_prefixes(state)):
                raise UnsupportedModelError(f"{str(path)!r} holds a transformers ViT's state dict; {TRANSFORMERS_FIX}")
            if arch is None:
                named = obj.get("arch")
                example = f"timm:{named}" if isinstance(named, str) and _timm_knows(named) else "torchvision:vit_b_16"
                raise UnsupportedModelError(
                    f"{str(path)!r} holds a state dict; pass the architecture too, e.g. "
                    f"arch={example!r} (CLI: --arch {example})"
                )
            return _build_and_load(arch, state, arch_kwargs, path)
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise UnsupportedModelError(
            f"{str(path)!r} holds a dict with keys {keys}, not a model: no state dict under "
            f"{', '.join(repr(k) for k in STATE_DICT_KEYS)}; save the module (torch.save(model)) or "
            "its state dict (torch.save(model.state_dict()))"
        )
    raise UnsupportedModelError(
        f"{str(path)!r} holds a {type(obj).__name__}, not a model; save the module or its state dict"
    )


def _refuse_arch_kwargs(path: Path, arch_kwargs: dict) -> None:
    """A whole saved model is built already: architecture arguments would be silently ignored."""
    if arch_kwargs:
        raise InputError(
            f"{str(path)!r} holds a whole model, built with its own {', '.join(sorted(arch_kwargs))}; "
            "architecture arguments (CLI: --img-size) apply to state dicts only: drop them"
        )


def _timm_knows(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(name)


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

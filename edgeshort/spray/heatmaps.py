"""GradCAM heatmaps through pytorch-grad-cam, for ViTs (tokens -> grid) and CNNs.

The caller's model comes back as it was: `preserved_model_state` restores every module's
train/eval flag, every parameter's `requires_grad` and `.grad`, and the CAM's hooks are
removed in a `finally`, whatever happens. Errors are never swallowed (pytorch-grad-cam's own
context manager swallows IndexError, so it is not used).

For a ViT the target layer outputs tokens (B, T, D). `TokenGridReshape` drops the prefix
tokens (class, register, distillation) by *count* and derives the grid from the number of
patch tokens and the input's aspect ratio, so any image size, patch size or register count
works without hard-coded 14x14.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from edgeshort._optional import require
from edgeshort._torch_state import preserved_model_state
from edgeshort.errors import InputError
from edgeshort.spray import fit_warnings

logger = logging.getLogger(__name__)

CAM_METHODS = {
    "gradcam": "GradCAM",
    "hirescam": "HiResCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
}
Head = str | int | Callable[[Any], Any] | None


# ---------------------------------------------------------------------- model state
@contextlib.contextmanager
def released(cam: Any) -> Iterator[Any]:
    """Remove the CAM's hooks and drop its tensors on exit, without swallowing errors."""
    try:
        yield cam
    finally:
        cam.activations_and_grads.release()
        cam.outputs = None


# ---------------------------------------------------------------------- ViT tokens
def infer_num_prefix_tokens(model: Any) -> int | None:
    """Class + register + distillation tokens of a ViT, read from the model, or None.

    Looks for timm / edgeshort's `num_prefix_tokens` on the model or any submodule,
    torchvision's `class_token`, and transformers' embeddings (`cls_token`,
    `distillation_token`, `register_tokens`).
    """
    torch = require("torch", "offline")
    for module in model.modules():
        value = getattr(module, "num_prefix_tokens", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    for module in model.modules():
        if type(module).__module__.startswith("torchvision") and isinstance(
            getattr(module, "class_token", None), torch.nn.Parameter
        ):
            return 1
    for module in model.modules():
        if type(module).__name__.endswith("Embeddings") and hasattr(module, "cls_token"):
            count = 1 + int(hasattr(module, "distillation_token"))
            registers = getattr(module, "register_tokens", None)
            if registers is not None:
                count += int(registers.shape[1])
            return count
    return None


def token_grid(num_patches: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) with rows * cols == num_patches whose ratio is closest to the image's."""
    height, width = image_hw
    pairs = [(r, num_patches // r) for r in range(1, num_patches + 1) if num_patches % r == 0]
    rows, cols = min(pairs, key=lambda rc: abs(math.log(rc[0] / rc[1]) - math.log(height / width)))
    if abs(math.log(rows / cols) - math.log(height / width)) > math.log(1.25):
        raise InputError(
            f"expected the patch tokens to form a grid of the {height}x{width} input, got {num_patches} "
            "tokens; do pass num_prefix_tokens= (class + register tokens) explicitly"
        )
    return rows, cols


def guess_num_prefix_tokens(num_tokens: int, image_hw: tuple[int, int], limit: int = 16) -> int:
    """Smallest prefix count whose remaining tokens tile the image with square patches."""
    height, width = image_hw
    for prefix in range(0, min(limit, num_tokens - 1) + 1):
        patches = num_tokens - prefix
        patch = math.sqrt(height * width / patches)
        if abs(patch - round(patch)) < 1e-6 and height % round(patch) == 0 and width % round(patch) == 0:
            return prefix
    raise InputError(
        f"expected {num_tokens} tokens to be prefix tokens plus a patch grid of the {height}x{width} input, "
        "got no consistent split; do pass num_prefix_tokens= explicitly"
    )


class TokenGridReshape:
    """pytorch-grad-cam `reshape_transform`: (B, T, D) tokens -> (B, D, rows, cols) maps.

    Conv feature maps (B, C, H, W) pass through unchanged.
    """

    def __init__(self, num_prefix_tokens: int | None, image_hw: tuple[int, int]) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.image_hw = image_hw

    def __call__(self, tensor: Any) -> Any:
        if not hasattr(tensor, "ndim"):
            raise InputError(
                f"expected the target layer to output a tensor, got {type(tensor).__name__}; do pick a sub-layer "
                "that returns one (for a transformers ViT layer, e.g. its 'layernorm_before')"
            )
        if tensor.ndim == 4:
            return tensor
        if tensor.ndim != 3:
            raise InputError(
                f"expected the target layer output as tokens (B, T, D) or maps (B, C, H, W), got shape "
                f"{tuple(tensor.shape)}; do pick a block or norm layer (ViT) or a conv layer (CNN)"
            )
        prefix = self.num_prefix_tokens
        if prefix is None:
            prefix = self.num_prefix_tokens = guess_num_prefix_tokens(tensor.shape[1], self.image_hw)
            logger.debug("assuming %d prefix tokens from the token count", prefix)
        rows, cols = token_grid(tensor.shape[1] - prefix, self.image_hw)
        patches = tensor[:, prefix:, :]
        return patches.reshape(tensor.shape[0], rows, cols, tensor.shape[2]).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------- model output
def select_output(output: Any, head: Head) -> Any:
    """The logits (B, classes) from whatever the model returns."""
    torch = require("torch", "offline")
    if callable(head):
        selected = head(output)
    elif head is None:
        if isinstance(output, torch.Tensor):
            selected = output
        elif isinstance(getattr(output, "logits", None), torch.Tensor):
            selected = output.logits
        else:
            raise InputError(
                f"expected the model to return a tensor (or an object with .logits), got {type(output).__name__}; "
                "do pass head= (attribute/key name, tuple index, or a callable)"
            )
    elif isinstance(head, int) and not isinstance(head, bool):
        if not isinstance(output, (tuple, list)) or not -len(output) <= head < len(output):
            size = len(output) if isinstance(output, (tuple, list)) else "no"
            raise InputError(
                f"expected head={head} to index the model's tuple output, got {type(output).__name__} with {size} "
                "items; do pass a valid index, a name or a callable"
            )
        selected = output[head]
    elif isinstance(head, str):
        if isinstance(output, Mapping) and head in output:
            selected = output[head]
        elif hasattr(output, head):
            selected = getattr(output, head)
        else:
            keys = list(output.keys()) if isinstance(output, Mapping) else [k for k in dir(output) if not k.startswith("_")]
            raise InputError(
                f"expected head={head!r} to name a field of the model output, got {type(output).__name__} with "
                f"{keys[:10]}; do pass one of those"
            )
    else:
        raise InputError(
            f"expected head as None, a name, an index or a callable, got {type(head).__name__}; do pass one of those"
        )
    if not isinstance(selected, torch.Tensor):
        raise InputError(
            f"expected head to give a logits tensor, got {type(selected).__name__}; do pick the logits output"
        )
    if selected.ndim == 1:
        selected = selected[:, None]
    if selected.ndim != 2:
        raise InputError(
            f"expected logits of shape (B, classes), got {tuple(selected.shape)}; do pick the classification output"
        )
    return selected


class _ClassTarget:
    """pytorch-grad-cam target: the logit of one class, with a clear error when out of range."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, logits: Any) -> Any:
        classes = logits.shape[-1]
        if not 0 <= self.category < classes:
            raise InputError(
                f"expected targets in [0, {classes}), got {self.category}; do pass class indices of the model's output"
            )
        return logits[..., self.category]


def _resolve_layer(model: Any, target_layer: Any) -> Any:
    torch = require("torch", "offline")
    if isinstance(target_layer, torch.nn.Module):
        if not any(module is target_layer for module in model.modules()):
            raise InputError(
                "expected target_layer to be a submodule of the model, got a module outside it; "
                "do pass one of model.named_modules()"
            )
        return target_layer
    if not isinstance(target_layer, str):
        raise InputError(
            f"expected target_layer as a dotted name or a module, got {type(target_layer).__name__}; "
            "do pass e.g. 'blocks.3.norm1'"
        )
    try:
        return model.get_submodule(target_layer)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        close = [n for n in names if n.split(".")[0] == target_layer.split(".")[0]][:8] or names[:8]
        raise InputError(
            f"expected target_layer to name a submodule of {type(model).__name__}, got {target_layer!r}; "
            f"do pick one of model.named_modules(), e.g. {close}"
        ) from None


def _head_model(model: Any, head: Head) -> Any:
    """A module that runs `model` and returns the logits `head` selects (what the CAM explains)."""
    torch = require("torch", "offline")

    class HeadModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, inputs: Any) -> Any:
            return select_output(self.model(inputs), head)

    return HeadModel()


class GradCAMHeatmaps:
    """Heatmap generator: `generate(inputs, targets)` -> ((N, H, W) float32 in [0, 1], targets).

    Parameters
    ----------
    model : torch.nn.Module
    target_layer : dotted submodule name or the module. For a ViT with a class-token head use
        a block before the last one, or the last block's `norm1`: the last block's patch
        outputs do not reach the head, so their gradient is zero.
    head : None (tensor output, or `.logits`), attribute/key name, tuple index, or callable.
    method : one of `CAM_METHODS` (pytorch-grad-cam classes).
    batch_size : images per forward/backward pass.
    num_prefix_tokens : class + register tokens; read from the model when None.
    """

    def __init__(
        self,
        model: Any,
        target_layer: Any,
        head: Head = None,
        method: str = "gradcam",
        batch_size: int = 32,
        num_prefix_tokens: int | None = None,
    ) -> None:
        if method not in CAM_METHODS:
            raise InputError(f"expected method in {sorted(CAM_METHODS)}, got {method!r}; do pick one of them")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"expected batch_size to be a positive int, got {batch_size!r}; do pass e.g. 32")
        self.model = model
        self.target_layer = target_layer
        self.head = head
        self.method = method
        self.batch_size = batch_size
        self.num_prefix_tokens = num_prefix_tokens

    def __call__(self, inputs: Any, targets: Any = None) -> np.ndarray:
        return self.generate(inputs, targets)[0]

    def generate(self, inputs: Any, targets: Any = None) -> tuple[np.ndarray, np.ndarray]:
        torch = require("torch", "offline")
        cam_module = require("pytorch_grad_cam", "offline")
        if not isinstance(self.model, torch.nn.Module):
            raise InputError(
                f"expected model to be a torch.nn.Module, got {type(self.model).__name__}; "
                "do pass the module (or use heatmap_generator= for other frameworks)"
            )
        if isinstance(inputs, np.ndarray):
            inputs = torch.from_numpy(inputs)
        if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4:
            shape = tuple(inputs.shape) if hasattr(inputs, "shape") else type(inputs).__name__
            raise InputError(
                f"expected inputs of shape (N, C, H, W), got {shape}; do stack the images into one tensor"
            )
        n = inputs.shape[0]
        if n == 0:
            raise InputError("expected at least one input, got an empty batch; do pass images")
        if not torch.is_floating_point(inputs):
            raise InputError(f"expected float inputs, got {inputs.dtype}; do preprocess the images to float")
        target_list = self._targets(targets, n)
        layer = _resolve_layer(self.model, self.target_layer)
        prefix = self.num_prefix_tokens if self.num_prefix_tokens is not None else infer_num_prefix_tokens(self.model)
        reshape = TokenGridReshape(prefix, (int(inputs.shape[2]), int(inputs.shape[3])))
        cam_class = getattr(cam_module, CAM_METHODS[self.method])
        head_model = _head_model(self.model, self.head)
        head_module = self.head if isinstance(self.head, torch.nn.Module) else None

        maps = np.empty((n, int(inputs.shape[2]), int(inputs.shape[3])), dtype=np.float32)
        used = np.empty(n, dtype=np.int64)
        with preserved_model_state(self.model, head_module), torch.enable_grad():
            # Gradients are needed w.r.t. activations only: freezing the parameters saves the
            # weight-gradient work and leaves every `.grad` untouched.
            for param in self.model.parameters():
                param.requires_grad_(False)
            cam = cam_class(model=head_model, target_layers=[layer], reshape_transform=reshape)
            with released(cam):
                for start in range(0, n, self.batch_size):
                    stop = min(start + self.batch_size, n)
                    batch = inputs[start:stop].detach().clone().requires_grad_(True)
                    batch_targets = None if target_list is None else [_ClassTarget(t) for t in target_list[start:stop]]
                    maps[start:stop] = self._run(cam, batch, batch_targets)
                    if target_list is None:
                        used[start:stop] = cam.outputs.detach().argmax(dim=-1).cpu().numpy()
                    else:
                        used[start:stop] = target_list[start:stop]
                    cam.outputs = None
        flat = maps.reshape(n, -1)
        constant = flat.max(axis=1) - flat.min(axis=1) <= 1e-6
        if constant.any():
            fit_warnings.warn(
                logger,
                f"{int(constant.sum())} of {n} CAMs are constant: no gradient reached the target layer's patch "
                "positions, or the class evidence there is negative everywhere and the CAM's ReLU zeroes it; "
                "another layer or cam_method (hirescam, layercam) may explain more",
            )
        return maps, used

    @staticmethod
    def _targets(targets: Any, n: int) -> list[int] | None:
        if targets is None:
            return None
        if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
            return [int(targets)] * n
        if hasattr(targets, "detach"):
            targets = targets.detach().cpu().numpy()
        values = np.asarray(targets)
        if values.ndim != 1 or values.shape[0] != n or not np.issubdtype(values.dtype, np.integer):
            raise InputError(
                f"expected targets as {n} class indices (one per input) or one int, got "
                f"{values.dtype} of shape {values.shape}; do pass integer class indices"
            )
        return [int(v) for v in values]

    def _run(self, cam: Any, batch: Any, targets: Sequence[Any] | None) -> np.ndarray:
        try:
            return cam(input_tensor=batch, targets=targets)
        except InputError:
            raise
        except Exception as exc:
            grads = cam.activations_and_grads
            if not grads.activations:
                raise InputError(
                    f"expected the target layer {self.target_layer!r} to run in the forward pass, got no activation; "
                    "do pick a layer the model uses"
                ) from exc
            if not grads.gradients:
                raise InputError(
                    f"expected a gradient at the target layer {self.target_layer!r}, got none; do pick a layer "
                    "between the input and the selected output"
                ) from exc
            raise

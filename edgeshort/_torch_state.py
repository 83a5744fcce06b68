"""A caller's torch modules come back as they were: train/eval flags, requires_grad and grads.

Kept apart from the model code so light modules (SpRAy's heatmaps) can import it without torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from edgeshort._optional import require


@contextlib.contextmanager
def preserved_model_state(*modules: Any) -> Iterator[None]:
    """Restore train/eval flags, `requires_grad` and `.grad` of every (sub)module on exit.

    Exceptions propagate unchanged; the restore runs in `finally`.
    """
    torch = require("torch", "offline")
    modules = tuple(m for m in modules if isinstance(m, torch.nn.Module))
    training = [(sub, sub.training) for module in modules for sub in module.modules()]
    params = {id(p): p for module in modules for p in module.parameters()}
    saved = [(p, p.requires_grad, p.grad) for p in params.values()]
    try:
        yield
    finally:
        for sub, flag in training:
            sub.training = flag  # per module: `train()` would recurse and overwrite children
        for param, requires_grad, grad in saved:
            param.requires_grad_(requires_grad)
            param.grad = grad

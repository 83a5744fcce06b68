"""Lazy imports of optional dependencies, failing with the install line of their extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from edgeshort.errors import MissingDependencyError


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise naming `pip install 'edgeshort[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module!r} is needed here but is not importable ({exc}); "
            f"install it with: pip install 'edgeshort[{extra}]'"
        ) from exc

"""Module-level `__getattr__` that imports a package's heavy names on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """`names` maps each public name to the module that defines it."""

    def __getattr__(name: str) -> Any:
        if name in names:
            from edgeshort._optional import missing_extra

            try:
                module = importlib.import_module(names[name])
            except ImportError as exc:
                missing = missing_extra(exc)
                if missing is None:
                    raise
                raise missing from exc
            return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__

"""A SpRAy fit's warnings: logged, and kept with its result whatever the logging level or other threads do."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_KEPT: ContextVar[list[str] | None] = ContextVar("spray_fit_warnings", default=None)


def warn(logger: logging.Logger, message: str) -> None:
    """Log `message` and keep it for the fit running in this thread, if any."""
    kept = _KEPT.get()
    if kept is not None:
        kept.append(message)
    logger.warning("%s", message)


@contextmanager
def recorded() -> Iterator[list[str]]:
    """The warnings `warn` gives inside the block, in order."""
    kept: list[str] = []
    token = _KEPT.set(kept)
    try:
        yield kept
    finally:
        _KEPT.reset(token)

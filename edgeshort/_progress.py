"""Progress bars that can be turned off, and vanish when tqdm is not installed."""

from __future__ import annotations

import sys


def progress_bar(iterable, enabled: bool, desc: str, total: int | None = None):
    """tqdm when installed and enabled, else the plain iterable."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


def stage(enabled: bool, text: str) -> None:
    """A line on stderr before a step that has no bar of its own, so a long run never sits silent."""
    if enabled:
        print(text, file=sys.stderr, flush=True)

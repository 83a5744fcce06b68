"""Progress bars that can be turned off, and vanish when tqdm is not installed."""

from __future__ import annotations


def progress_bar(iterable, enabled: bool, desc: str, total: int | None = None):
    """tqdm when installed and enabled, else the plain iterable."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)

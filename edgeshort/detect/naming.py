"""Optional naming of a shortcut: patch grids in, one sentence out, behind a small interface.

edgeshort assembles the prompts (as the seed does: caption each patch grid, then ask a
language model for the one most significant shortcut); the concrete model client, e.g. an
OpenAI-compatible endpoint on the hospital network, is supplied by the user.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgeshort.errors import InputError

CAPTION_PROMPT = "What is in this picture? Describe in a few words."
SUMMARY_PROMPT = (
    "I extracted patches from images in my dataset where my model seems to focus on the most. "
    "I let a vision-language model caption these images for you. I am searching for potential shortcuts "
    "in the dataset. Can you identify one or more possible shortcuts in this dataset? Describe it in one "
    "sentence (only!) and pick the most significant. No other explanations are needed. If there isn't any "
    "shortcut obvious to you then just say so. Descriptions:\n"
)


class NamingClient(Protocol):
    """What a naming backend provides: a caption for an image, and a text completion."""

    def caption(self, image_png: bytes, prompt: str) -> str: ...

    def complete(self, prompt: str) -> str: ...


@dataclass(frozen=True)
class ShortcutName:
    cluster: int
    captions: list[str]
    sentence: str
    prompt: str


def summary_prompt(captions: Sequence[str]) -> str:
    """The seed's second-stage prompt: every caption on its own line."""
    if not captions:
        raise InputError("expected at least one caption to summarise, got none; pass patch grids")
    return SUMMARY_PROMPT + "\n".join(f"- {c.strip()}" for c in captions)


def name_shortcut(client: NamingClient, patch_grids: Sequence[str | Path], cluster: int) -> ShortcutName:
    """Caption each patch grid PNG, then ask for the one sentence naming the shortcut."""
    if not patch_grids:
        raise InputError(f"cluster {cluster} has no patch grids to name; run the detector first")
    captions = [client.caption(Path(p).read_bytes(), CAPTION_PROMPT) for p in patch_grids]
    prompt = summary_prompt(captions)
    return ShortcutName(cluster, captions, client.complete(prompt).strip(), prompt)

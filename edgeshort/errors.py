"""The errors edgeshort raises for problems a user can fix.

Each subclasses the builtin a caller would already catch, and its message says what was
expected, what was found, and what to do.
"""

from __future__ import annotations


class EdgeshortError(Exception):
    """Base class of every error edgeshort raises on purpose."""


class InputError(EdgeshortError, ValueError):
    """An argument, array, image or dataset is not what the call needs."""


class UnsupportedModelError(EdgeshortError, TypeError):
    """A model whose family no adapter knows, or a file that holds no model."""


class MissingDependencyError(EdgeshortError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


class NotFittedError(EdgeshortError, AttributeError):
    """A detector was used before `fit`."""


class BundleError(EdgeshortError, ValueError):
    """A bundle is missing, tampered, from a newer format, or does not match this install."""


class VerdictRefusal(InputError):
    """A run whose verdict says its guard has no shortcut to mask, or harms, asked to be exported."""

    # A pipeline tells "nothing to guard" (deploy the model as it is) from a mistake (2).
    exit_code = 4


class ParityError(EdgeshortError, RuntimeError):
    """An exported model does not reproduce the torch model within tolerance."""


class ImageLoadError(InputError):
    """An image file is missing, corrupt, too large or of an unusable mode."""

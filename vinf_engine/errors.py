"""The two ways a generation run ends badly: refused input, or a run that broke."""
from __future__ import annotations

__all__ = ["GenerationError", "GenerationFailed"]


class GenerationError(ValueError):
    """Bad input, refused on every rank before any data-plane collective."""


class GenerationFailed(RuntimeError):
    """The run broke after it started: a peer died or timed out, a write failed."""

"""The recorder's error type (its own module: every part of the recording package raises it)."""

from __future__ import annotations

__all__ = ["RecorderError"]


class RecorderError(ValueError):
    """A recorder used in a way it does not support (the message says how to fix it)."""

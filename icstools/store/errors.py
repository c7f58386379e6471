"""The store's own exception and warning."""

from __future__ import annotations

__all__ = ["StoreError", "StoreLockWarning"]


class StoreError(RuntimeError):
    """A run store cannot be read or written: not an icstools store, corrupt (a damaged or
    missing chunk, an edited commit marker), locked by another writer, or a failed write."""


class StoreLockWarning(UserWarning):
    """A writer took over the lock of a run store that a writer now gone (killed) left behind."""

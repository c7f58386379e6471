"""The recorder's error and warning types (their own module: every part of the recording package
raises them, and nothing here imports the rest)."""

from __future__ import annotations

__all__ = ["RecorderError", "SitesNotRecordedWarning"]


class RecorderError(ValueError):
    """A recorder used in a way it does not support (the message says how to fix it)."""


class SitesNotRecordedWarning(UserWarning):
    """Selected sites that got no floating-point tensor in the first recorded step: they are
    not part of the run (listed in its ``sites_not_recorded`` attribute).

    Examples
    --------
    >>> import warnings, icstools
    >>> warnings.filterwarnings("ignore", category=icstools.SitesNotRecordedWarning)
    """

"""The recorder's error and warning types (their own module: every part of the recording package
raises them, and nothing here imports the rest), and :func:`report_beside`, which reports a
failure to close beside the exception already in flight."""

from __future__ import annotations

import warnings

__all__ = ["RecorderError", "ResumeWarning", "SharedModuleWarning", "SitesNotRecordedWarning"]


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


class SharedModuleWarning(UserWarning):
    """A module instance ran several times in one forward (a ``ReLU`` reused at several places,
    shared weights, a recurrent cell) while ``Recorder(calls=...)`` was not given: its calls are
    pooled into one site. Pass ``calls="separate"`` to record each call as its own site, or
    ``calls="pool"`` to pool without the warning.

    Examples
    --------
    >>> import warnings, icstools
    >>> warnings.filterwarnings("ignore", category=icstools.SharedModuleWarning)
    """


class ResumeWarning(UserWarning):
    """``Recorder(resume=True)`` dropped records of the store (steps at or after the restored
    one, recorded by the killed run after its checkpoint), or found scheduled steps before the
    restored one that were never committed (they stay missing). The message names the steps.

    Examples
    --------
    >>> import warnings, icstools
    >>> warnings.filterwarnings("ignore", category=icstools.ResumeWarning)
    """


def report_beside(exc: BaseException, err: Exception) -> None:
    """Report ``err`` (closing the recorder failed) beside the exception ``exc`` in flight."""
    note = f"icstools: closing the recorder failed as well: {type(err).__name__}: {err}"
    exc.add_note(note)
    try:
        warnings.warn(note, UserWarning, stacklevel=3)
    except Warning:  # warnings are errors here: the note carries it, ``exc`` must propagate
        pass

"""What both integrations share: where the run goes, the step's loss, closing after errors."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from icstools.recording.errors import RecorderError
from icstools.recording.recorder import Recorder

__all__ = ["StepLoss", "finish", "recorder_for", "run_path"]

#: Name of the run's store inside the framework's log directory.
STORE_NAME = "icstools.zarr"


def run_path(path: Any, log_dir: str | Path | None) -> Path | None:
    """The store's path: ``"auto"`` → ``<log_dir>/icstools.zarr``; ``None`` → in memory."""
    if isinstance(path, str) and path == "auto":
        if log_dir is None:
            raise RecorderError(
                "path='auto' writes the run under the trainer's log directory, but it has none; "
                "pass path=... (a directory for the Zarr store) or path=None (in memory)"
            )
        return Path(log_dir) / STORE_NAME
    return None if path is None else Path(path)


def recorder_for(model: torch.nn.Module, optimizer: Any, path: Path | None, **kw: Any) -> Recorder:
    """A recorder of ``model`` counting the steps of ``optimizer`` (unwrapped), attached."""
    for name in ("optimizer", "path"):
        if name in kw:
            raise TypeError(f"{name}= is set by the callback from the trainer; do not pass it")
    rec = Recorder(model, optimizer=optimizer, path=path, **kw)
    rec.attach()
    return rec


class StepLoss:
    """The loss of a step over its micro-batches, logged into the step's record: their mean,
    or their sum when each is a share of the step's loss (``share=True``).

    Tensors are summed on their device: nothing is read until the record closes.
    """

    def __init__(self) -> None:
        self._step: int | None = None
        self._sum: torch.Tensor | None = None
        self._n = 0

    def add(self, rec: Recorder, step: int, loss: Any, share: bool = False) -> None:
        """Add the loss of one micro-batch of ``step`` and log the step's loss so far."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        loss = loss.detach().reshape(()).double()
        if step != self._step:
            self._step, self._sum, self._n = step, loss, 1
        else:
            self._sum, self._n = self._sum + loss, self._n + 1
        rec.log(loss=self._sum if share else self._sum / self._n)


def finish(rec: Recorder | None, exception: BaseException | None = None) -> None:
    """Detach and close ``rec`` (safe to call twice). With ``exception`` in flight, a failure to
    close is added to it as a note and warned about, never raised in its place."""
    if rec is None:
        return
    try:
        rec.detach()
        rec.close()
    except Exception as err:
        if exception is None:
            raise
        note = f"icstools: closing the recorder failed as well: {type(err).__name__}: {err}"
        exception.add_note(note)
        try:
            warnings.warn(note, UserWarning, stacklevel=2)
        except Warning:  # warnings are errors here: the note carries it
            pass

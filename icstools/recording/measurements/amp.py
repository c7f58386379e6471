"""Iterations skipped by an AMP ``GradScaler`` (``Recorder(scaler=...)``).

A scaler that finds non-finite gradients skips ``optimizer.step()`` and lowers its scale, so the
step is not counted. The scale is read at each recorded training forward (one sync): when it
fell within the open record, the previous iteration was skipped, its train data are dropped
from the record and counted in ``skipped``. The scale is also what activation gradients are
divided by (:mod:`~icstools.recording.measurements.site_gradients`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from icstools.recording.measurements.base import Context, Measurement
from icstools.schema import Variable

__all__ = ["LossScale"]

VARIABLES = (
    Variable(
        "skipped",
        ("step",),
        "int64",
        "iterations of the step that the GradScaler skipped (non-finite gradients)",
        "Recorder(scaler=...)",
    ),
)


class LossScale(Measurement):
    """The loss scale of each recorded forward, and the iterations the scaler skipped."""

    name = "amp"
    variables = VARIABLES

    def __init__(self, scaler: Any) -> None:
        super().__init__()
        if not hasattr(scaler, "get_scale"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self._skipped = 0

    @classmethod
    def from_options(cls, options: Any) -> LossScale | None:
        return None if options.scaler is None else cls(options.scaler)

    def train_forward(self, ctx: Context, first: bool) -> None:
        scale = float(ctx.scaler.get_scale())  # one sync per recorded forward
        if not first and ctx.loss_scale is not None and scale < ctx.loss_scale:
            # The scale fell: the scaler skipped this step's previous iteration (non-finite
            # gradients) without an optimizer step. Drop its data, count it.
            ctx.discard_train()
            self._skipped += 1
        ctx.loss_scale = scale

    def reset(self, ctx: Context) -> None:
        self._skipped = 0

    def collect(self, ctx: Context) -> dict[str, np.ndarray]:
        skipped, self._skipped = self._skipped, 0
        return {"skipped": np.int64(skipped)}


MEASUREMENT = LossScale

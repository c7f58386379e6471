"""Gradient-based ICS (Santurkar et al. 2018, Def. 2.1), ``Recorder(ics=..., loss_fn=...)``.

Per layer with weights (execution order), on the step's own batch (the last training forward's
inputs and the target given with ``rec.set_target``) with the step's actual update, read from
the optimizer's step hooks: ``‖G − G'‖``, ``cos(G, G')`` and ``‖G‖``. It costs about one
forward/backward per layer and has no effect on training (see
:func:`icstools.functional.gradients.gradient_ics`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from icstools.recording.errors import RecorderError
from icstools.recording.measurements.base import (
    Context,
    Declaration,
    StepLossMeasurement,
)
from icstools.schema import Coordinate, Variable

__all__ = ["GradientICS"]

_HOW = "Recorder(ics=..., loss_fn=..., optimizer=...)"
_DIMS = ("step", "layer")
VARIABLES = (
    Variable("ics_l2", _DIMS, "float64", "‖G − G'‖₂ (Santurkar et al. Def. 2.1)", _HOW),
    Variable("ics_cos", _DIMS, "float64", "cos(G, G')", _HOW),
    Variable("ics_grad_norm", _DIMS, "float64", "‖G‖", _HOW),
)
COORDINATES = (Coordinate("layer", ("layer",), "modules with trainable weights, in run order"),)


class GradientICS(StepLossMeasurement):
    """Gradient-based ICS per layer at the recorded steps its schedule selects."""

    name = "ics"
    variables = VARIABLES
    coordinates = COORDINATES

    def __init__(self, every: Any, loss_fn: Any) -> None:
        super().__init__(every, loss_fn)
        self.layers: list | None = None  # fixed at the first record
        self._before: dict[str, torch.Tensor] | None = None
        self._out: dict[str, np.ndarray] = {}

    @classmethod
    def from_options(cls, options: Any) -> GradientICS | None:
        every = cls.scheduled(options)
        return None if every is None else cls(every, options.loss_fn)

    def wants_batch(self, ctx: Context) -> bool:
        return self.layers is None or self.due(ctx.step)

    def before_update(self, ctx: Context) -> None:
        if self.layers is None and ctx.batch is not None:
            from icstools.functional.layers import parameter_layers

            with ctx.own_forwards():  # fixes the run's `layer` dimension at the first record
                self.layers = parameter_layers(ctx.model, ctx.batch.inputs())
        if self.due(ctx.step):
            self._before = {
                n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad
            }

    def after_update(self, ctx: Context) -> None:
        before, self._before = self._before, None
        if before is None:
            return
        from icstools.functional.gradients import gradient_ics

        inputs, target = ctx.step_batch("ics")
        after = {n: p.detach() for n, p in ctx.model.named_parameters() if p.requires_grad}
        with ctx.own_forwards(), ctx.batch.replay():
            out = gradient_ics(
                ctx.model, self.loss_fn, inputs, target, after, self.layers, current=before
            )
        self._out = {"ics_l2": out.ics_l2, "ics_cos": out.ics_cos, "ics_grad_norm": out.grad_norm}

    def reset(self, ctx: Context) -> None:
        self._before, self._out = None, {}

    def declare(self, ctx: Context) -> Declaration:
        if self.layers is None:
            raise RecorderError(
                "ics= is set but no optimizer step was seen in the first recorded step, "
                "which fixes the run's layers"
            )
        names = np.array([layer.name for layer in self.layers], dtype=str)
        return Declaration({"layer": ("layer", names)}, VARIABLES)

    def collect(self, ctx: Context) -> dict[str, np.ndarray]:
        out, self._out = self._out, {}
        return {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in out.items()}


MEASUREMENT = GradientICS

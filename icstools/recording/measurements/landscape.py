"""Loss-landscape probes along the gradient (Santurkar et al. 2018, §3),
``Recorder(landscape=..., loss_fn=...)``.

At the recorded steps its schedule selects, before the update, on the step's batch with BN in
train mode: ``L(w − ηg)``, gradient predictiveness ``‖∇L(w) − ∇L(w − ηg)‖``, the loss
variation and the effective β-smoothness, for ``η`` = multipliers × the current learning rate
(see :func:`icstools.functional.gradients.landscape_probe`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from icstools.recording.measurements.base import (
    Context,
    Declaration,
    StepLossMeasurement,
)
from icstools.schema import Coordinate, Variable

__all__ = ["LandscapeProbe"]

_HOW = "Recorder(landscape=..., loss_fn=..., optimizer=...)"
VARIABLES = (
    Variable("landscape_loss", ("step", "eta"), "float64", "L(w − ηg)", _HOW),
    Variable(
        "landscape_grad_diff",
        ("step", "eta"),
        "float64",
        "‖∇L(w) − ∇L(w − ηg)‖ (gradient predictiveness)",
        _HOW,
    ),
    Variable("loss_variation", ("step",), "float64", "range of L(w − ηg) over η", _HOW),
    Variable(
        "beta_smoothness",
        ("step",),
        "float64",
        "max over η of ‖∇L(w − ηg) − ∇L(w)‖ / ‖ηg‖",
        _HOW,
    ),
)
COORDINATES = (Coordinate("eta", ("eta",), "step sizes in units of the learning rate"),)


class LandscapeProbe(StepLossMeasurement):
    """Loss and gradient along the gradient direction, at several step sizes."""

    name = "landscape"
    variables = VARIABLES
    coordinates = COORDINATES

    def __init__(self, every: Any, loss_fn: Any, multipliers: Sequence[float]) -> None:
        super().__init__(every, loss_fn)
        m = np.asarray(multipliers, dtype=np.float64).reshape(-1)
        if m.size == 0 or not (np.isfinite(m) & (m > 0)).all():
            raise ValueError(
                f"landscape_multipliers must be finite numbers > 0, got {list(multipliers)!r}"
            )
        self.multipliers = m
        self._out: dict[str, Any] = {}

    @classmethod
    def from_options(cls, options: Any) -> LandscapeProbe | None:
        every = cls.scheduled(options)
        # the multipliers are checked even when the probes are off, as they always were
        probe = cls(1 if every is None else every, options.loss_fn, options.landscape_multipliers)
        return None if every is None else probe

    def config(self) -> dict[str, Any]:
        return {**super().config(), "landscape_multipliers": self.multipliers.tolist()}

    def wants_batch(self, ctx: Context) -> bool:
        return self.due(ctx.step)

    def before_update(self, ctx: Context) -> None:
        if not self.due(ctx.step):
            return
        from icstools.functional.gradients import landscape_probe

        inputs, target = ctx.step_batch("landscape")
        lr = float(ctx.optimizer.param_groups[0]["lr"]) if ctx.optimizer is not None else 0.0
        with ctx.own_forwards(), ctx.batch.replay():
            probe = landscape_probe(
                ctx.model, self.loss_fn, inputs, target, lr, tuple(self.multipliers.tolist())
            )
        self._out = {
            "landscape_loss": probe.losses,
            "landscape_grad_diff": probe.grad_diff,
            "loss_variation": np.float64(probe.loss_variation),
            "beta_smoothness": np.float64(probe.beta_smoothness),
        }

    def reset(self, ctx: Context) -> None:
        self._out = {}

    def declare(self, ctx: Context) -> Declaration:
        return Declaration({"eta": ("eta", self.multipliers.copy())}, VARIABLES)

    def collect(self, ctx: Context) -> dict[str, np.ndarray]:
        out, self._out = self._out, {}
        sizes = {"eta": len(self.multipliers)}
        return {
            k: np.asarray(v, dtype=np.float64).reshape(VARIABLES_BY_NAME[k].shape(sizes))
            for k, v in out.items()
        }


VARIABLES_BY_NAME = {v.name: v for v in VARIABLES}
MEASUREMENT = LandscapeProbe

"""Activation gradients ``dL/dx`` of every record site (train source), ``Recorder(gradients=True)``.

Taken with a tensor hook registered on the site tensor by the site's forward hook (so in-place
ops after the site, residual adds and repeated calls work; a site tensor that needs no gradient
gets NaN). With AMP the gradients of the scaled loss are divided by the step's loss scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from icstools.functional.gradient_statistics import GradientStatistics
from icstools.recording.measurements.base import Context, Measurement
from icstools.schema import Variable

__all__ = ["SiteGradients"]

_HOW = "Recorder(gradients=True)"
VARIABLES = (
    Variable(
        "grad_norm",
        ("step", "site"),
        "float64",
        "‖dL/dx‖ over all values and calls of the site",
        _HOW,
    ),
    Variable("grad_unit_norm", ("step", "unit"), "float32", "‖dL/dx‖ per unit", _HOW),
    Variable("grad_mean", ("step", "unit"), "float32", "mean of dL/dx per unit", _HOW),
    Variable("grad_var", ("step", "unit"), "float32", "variance (ddof=0) of dL/dx per unit", _HOW),
)


class SiteGradients(Measurement):
    """Per-site and per-unit moments of the activation gradients."""

    name = "site_gradients"
    variables = VARIABLES

    def __init__(self) -> None:
        super().__init__()
        self._stats: dict[str, GradientStatistics] = {}

    @classmethod
    def from_options(cls, options: Any) -> SiteGradients | None:
        return cls() if options.gradients else None

    def site(self, ctx: Context, name: str, x: torch.Tensor, source: str) -> None:
        if source == "train" and x.requires_grad:
            # dL/dx of this very tensor (its value here, before any in-place op after the site)
            ctx.record_hooks.tensor(x, self._hook(name, ctx.units.unit_dims[name]))

    def _hook(self, name: str, unit_dim: int) -> Callable[[torch.Tensor], None]:
        def hook(g: torch.Tensor) -> None:
            stats = self._stats.get(name)
            if stats is None:
                stats = self._stats[name] = GradientStatistics(unit_dim)
            stats.update(g)

        return hook

    @property
    def states(self) -> dict[str, GradientStatistics]:
        """The gradient statistics of the open record by record site."""
        return self._stats

    def discard_train(self, ctx: Context) -> None:
        for stats in self._stats.values():
            stats.reset()

    def stage(self, ctx: Context) -> dict[Any, torch.Tensor]:
        grads = {}
        for name, stats in self._stats.items():
            if stats.n:
                for field, t in stats.compute().items():
                    grads[(name, field)] = t
            stats.reset()
        return grads

    def collect(self, ctx: Context) -> dict[str, np.ndarray]:
        layout = ctx.layout
        out = layout.empty_all(VARIABLES)
        # AMP: gradients of a scaled loss are scaled; divide by this step's scale
        scale = ctx.loss_scale if ctx.scaler is not None and ctx.loss_scale else 1.0
        for (name, field), value in ctx.host.get(self.name, {}).items():
            if name not in layout.widths:
                continue
            if field == "grad_norm":
                out["grad_norm"][layout.site_index(name)] = value / scale
            else:
                unscale = scale * scale if field == "grad_var" else scale
                with np.errstate(over="ignore"):
                    out[field][layout.units_of(name)] = value / unscale
        return out


MEASUREMENT = SiteGradients

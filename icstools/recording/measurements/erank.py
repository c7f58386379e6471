"""Effective rank of each site's activations on the probe (Roy & Vetterli 2007).

``erank (step, site)``: ``exp`` of the entropy of the normalized eigenvalues of the covariance
of the site's units over the probe's positions (examples, and pixels for convolutions; all calls
of the site pooled), see :func:`icstools.functional.erank.effective_rank`. It falls towards 1
when a layer's units collapse onto few directions. Needs a probe; has its own schedule::

    Recorder(model, probe=x, measurements=[EffectiveRank(every=100)])
"""

from __future__ import annotations

import numpy as np
import torch

from icstools.functional.erank import CovarianceState
from icstools.recording.measurements.base import Context, Measurement
from icstools.schema import Variable

__all__ = ["EffectiveRank"]

VARIABLES = (
    Variable(
        "erank",
        ("step", "site"),
        "float64",
        "effective rank of the site's probe activations (exp of the eigenvalue entropy)",
        "Recorder(probe=..., measurements=[EffectiveRank(every=...)])",
    ),
)


class EffectiveRank(Measurement):
    """Effective rank of every record site on the probe, at the steps ``every`` selects."""

    name = "erank"
    variables = VARIABLES
    requires = frozenset({"probe"})

    def __init__(self, every: int | object = 1) -> None:
        super().__init__(every)
        self._states: dict[str, CovarianceState] = {}

    def config(self) -> dict[str, object]:
        return {"erank": repr(self.schedule)}

    def site(self, ctx: Context, name: str, x: torch.Tensor, source: str) -> None:
        if source == "probe" and self.due(ctx.step):
            rows = x.detach().movedim(ctx.units.unit_dims[name], -1)
            state = self._states.setdefault(name, CovarianceState())
            state.update(rows.reshape(-1, rows.shape[-1]))  # [positions, units]

    def reset(self, ctx: Context) -> None:
        self._states = {}

    def collect(self, ctx: Context) -> dict[str, np.ndarray]:
        states, self._states = self._states, {}
        if not states:
            return {}
        ranks = {n: s.effective_rank() for n, s in states.items()}
        return {"erank": ctx.layout.per_site(ranks)}


MEASUREMENT = EffectiveRank

"""Per-unit moments of a site's gradient ``dL/dx``: :class:`GradientStatistics`."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

from icstools.functional import kernels as _kernels  # usable() asked per call (patchable)
from icstools.functional import statistics as _statistics
from icstools.functional.state import StateField, merge_fields
from icstools.functional.statistics import _as_rows, _unit_dim

__all__ = ["GradientStatistics"]


class GradientStatistics:
    """Per-unit moments of a site's gradient ``dL/dx``, streaming and mergeable.

    The state is the number of positions ``n`` and, per unit, the mean and the sum of squared
    deviations ``M2`` of the gradient (float64), declared in :attr:`FIELDS` as one moment group
    of order 2 (:class:`StateField`) and merged with Chan et al.'s formulas, so calls,
    micro-batches and ranks combine exactly. :meth:`compute` gives per unit ``grad_mean``,
    ``grad_var`` (ddof=0) and ``grad_unit_norm`` (``sqrt(Σ g²)`` over the unit's positions), and
    ``grad_norm``, the Euclidean norm of the whole site gradient (all units, positions and
    calls). Non-finite gradients propagate (NaN/inf results), as a diverged run's should.

    Parameters
    ----------
    unit_dim : int
        Dimension of the gradient holding the units (as for the activation).

    Examples
    --------
    >>> g = torch.randn(32, 5)
    >>> s = GradientStatistics(1)
    >>> s.update(g[:10]); s.update(g[10:])
    >>> out = s.compute()
    >>> bool(torch.allclose(out["grad_norm"], g.double().norm()))
    True
    """

    FIELDS: ClassVar[tuple[StateField, ...]] = (
        StateField("n", "moments", (), int),  # positions: one count for all units
        StateField("mean", "moments", dtype=torch.float64),  # [units], the gradient's device
        StateField("m2", "moments", dtype=torch.float64),
    )

    n: int
    mean: torch.Tensor | None  # None until the first update (the units are unknown)
    m2: torch.Tensor | None

    def __init__(self, unit_dim: int) -> None:
        self.unit_dim = unit_dim
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        for f in self.FIELDS:
            setattr(self, f.name, f.empty(None))

    def update(self, g: torch.Tensor) -> None:
        """Add the gradient of one call (any shape with the units on ``unit_dim``)."""
        host = _statistics.on_host(g.device)  # (a test makes it say no: the device paths)
        if g.ndim > 1 and g.numel() and host and _kernels.usable() and g.dtype == torch.float32:
            dim = _unit_dim(g, self.unit_dim)
            g3 = g.detach().reshape(math.prod(g.shape[:dim]), g.shape[dim], -1)  # [pre, u, post]
            # the compiled two passes in float64, no copy of a contiguous gradient
            mean, m2 = _kernels.unit_mean_m2(g3.numpy())
            self.merge_moments(g3.shape[0] * g3.shape[2], *map(torch.from_numpy, (mean, m2)))
            return
        rows = _as_rows(g, self.unit_dim) if g.ndim > 1 else g.detach().view(1, -1)
        n = rows.shape[0]  # rows: [positions, units]
        if n == 0:
            return
        mean = rows.mean(0)
        m2 = (rows - mean).square().sum(0)  # two passes: no cancellation
        self.merge_moments(n, mean.double(), m2.double())

    def merge_moments(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge another state (``n`` positions, per-unit ``mean`` and ``M2``) into this one."""
        self._merge(SimpleNamespace(n=n, mean=mean, m2=m2))

    def merge(self, other: GradientStatistics) -> None:
        """Merge the state of ``other`` (disjoint positions of the same units) into this one."""
        if other.n and other.mean is not None and other.m2 is not None:
            self._merge(other)

    def _merge(self, other: Any) -> None:
        if self.n and self.mean is not None and other.mean.shape != self.mean.shape:
            raise ValueError(
                f"cannot merge gradients of {tuple(other.mean.shape)} units into "
                f"{tuple(self.mean.shape)}"
            )
        for name, value in merge_fields(self.FIELDS, self, other).items():
            setattr(self, name, value)

    def compute(self) -> dict[str, torch.Tensor]:
        """``grad_mean``, ``grad_var``, ``grad_unit_norm`` ``[units]`` and ``grad_norm`` ``[]``
        (float64, on the gradient's device)."""
        if self.mean is None or self.m2 is None or self.n == 0:
            raise ValueError("no gradient was recorded: call update() first")
        sumsq = self.m2 + self.n * self.mean.square()  # [units]
        return {
            "grad_mean": self.mean,
            "grad_var": self.m2 / self.n,
            "grad_unit_norm": sumsq.sqrt(),
            "grad_norm": sumsq.sum().sqrt(),
        }

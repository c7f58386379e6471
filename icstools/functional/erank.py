"""The effective rank of a set of activations (Roy & Vetterli 2007).

For activations ``X [positions, units]`` with covariance ``C`` (ddof=0) and eigenvalues
``λ_1 … λ_d ≥ 0``, let ``p_k = λ_k / Σ λ`` (a distribution over the eigen-directions). The
effective rank is ``exp(H(p)) = exp(−Σ p_k log p_k)`` (``0 log 0 = 0``): 1 when all variance
lies along one direction, ``d`` when it is spread evenly over ``d``. It is NaN when the total
variance is zero or a value is not finite.

:class:`CovarianceState` accumulates the sums the covariance needs, so batches and calls merge
exactly (count, sum of x, sum of x xᵀ in float64 on the tensors' device).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["CovarianceState", "effective_rank"]


def effective_rank(eigenvalues: np.ndarray) -> float:
    """``exp`` of the entropy of the normalized eigenvalues of a covariance matrix.

    Negative eigenvalues (rounding noise of a positive semi-definite matrix) count as zero.

    Examples
    --------
    >>> round(effective_rank(np.array([1.0, 1.0, 1.0])), 9), effective_rank(np.array([2.0, 0.0]))
    (3.0, 1.0)
    """
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    total = lam.sum()
    if not np.isfinite(total) or total <= 0:
        return math.nan
    p = lam[lam > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


class CovarianceState:
    """Mergeable sums for the covariance of ``units`` features (float64, on the device).

    Examples
    --------
    >>> s = CovarianceState()
    >>> x = torch.randn(100, 3)
    >>> s.update(x[:40]); s.update(x[40:])
    >>> np.allclose(s.covariance(), np.cov(x.double().numpy().T, ddof=0))
    True
    """

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None  # [units]
        self.outer: torch.Tensor | None = None  # [units, units]

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows of ``rows [positions, units]``."""
        x = rows.detach().double()
        if self.sum is None or self.outer is None:
            self.sum, self.outer = x.sum(0), x.T @ x
        else:
            self.sum, self.outer = self.sum + x.sum(0), self.outer + x.T @ x
        self.n += x.shape[0]

    def covariance(self) -> np.ndarray:
        """The covariance (ddof=0) of all rows added, ``[units, units]`` on the host."""
        if self.sum is None or self.outer is None or self.n == 0:
            raise ValueError("no rows were added: call update() first")
        mean = self.sum / self.n
        return (self.outer / self.n - torch.outer(mean, mean)).cpu().numpy()

    def effective_rank(self) -> float:
        """:func:`effective_rank` of the covariance (NaN if a value is not finite)."""
        cov = self.covariance()
        if not np.isfinite(cov).all():
            return math.nan
        return effective_rank(np.linalg.eigvalsh(cov))

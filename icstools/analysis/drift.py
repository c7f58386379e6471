"""Drift of per-unit activation distributions between records (DESIGN.md §4).

A *drift metric* compares, for each unit, a reference distribution P (an earlier record, or a
window of them) with the current distribution Q (the record at a step). This module computes
them from raw samples (exactly) and from the summaries a run dataset holds (with bounds), and
learns thresholds that flag drift.

Definitions
-----------
μ, σ² are the mean and the variance (ddof=0) of a distribution, F its CDF and F⁻¹ its quantile
function.

=================  ==========================================================================
``mean_shift``     standardized mean shift (μQ − μP) / σP
``log_var_ratio``  log variance ratio ln(σQ² / σP²)
``gauss_kl``       KL(Q ‖ P) of the fitted normals N(μQ, σQ²) and N(μP, σP²), in nats:
                   ln(σP/σQ) + (σQ² + (μQ − μP)²) / (2σP²) − ½ (current relative to reference)
``w1``             Wasserstein-1 distance ∫|F_P − F_Q| dx = ∫₀¹ |F_P⁻¹(u) − F_Q⁻¹(u)| du
``w1_std``         W1 / σP (in units of the reference's standard deviation)
``ks``             Kolmogorov–Smirnov statistic D = sup_x |F_P(x) − F_Q(x)|
``psi``            population stability index Σ_b (q_b − p_b) ln(q_b / p_b) over bins b, in nats
``js``             Jensen–Shannon *distance* with base-2 logarithms, in [0, 1]: the square root
                   of ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q)/2; equals
                   ``scipy.spatial.distance.jensenshannon(p, q, base=2)``
``hellinger``      Hellinger distance sqrt(½ Σ_b (√p_b − √q_b)²), in [0, 1]
=================  ==========================================================================

Bins of PSI, JS and Hellinger. Edges e_1 ≤ … ≤ e_m give the m + 1 bins (−∞, e_1], (e_1, e_2],
…, (e_m, +∞) (right-closed, so that bin masses are differences of the CDF; the outer bins are
open, so no value falls outside). From samples the edges are, by default, the reference's
quantiles at levels k/10 (deciles, numpy's linear interpolation) or any given edges; from a run
dataset they are the reference's quantiles at the recorded levels (``quantile`` coordinate, the
levels strictly between 0 and 1), for both methods. PSI is infinite when a bin is empty on one
side only, so its probabilities are first floored at ``eps`` (:data:`PSI_EPS` = 1e-4) and
renormalized to sum 1 (p ← max(p, eps) / Σ max(p, eps)); JS and Hellinger take empty bins as they
are (0 · ln 0 = 0).

Special values. A unit whose values (or summaries) hold a NaN or ±inf gets NaN for every metric;
the functions on arrays then warn once per call (one :class:`RuntimeWarning`, whatever the number
of such units), :func:`drift` does not (a diverged run says so in its ``nonfinite`` variable and
``diverged_step`` attribute). A constant reference (σP = 0) gives what the formulas give:
``mean_shift`` ±inf (NaN if μQ = μP), ``log_var_ratio`` +inf (NaN if σQ = 0 too), ``w1_std`` inf
(NaN if W1 = 0); ``gauss_kl`` is the KL of the degenerate normals as measures: +inf unless both
are the same point mass (then 0). No numpy warning is emitted for any of these.

From summaries, with bounds
---------------------------
A run dataset (DESIGN.md §3) keeps per unit ``mean``, ``var``, ``min``, ``max`` and the quantile
grid ``quantile_value`` (numpy-linear quantiles at levels u_1 < … < u_m; with u_0 = 0 ↦ ``min``
and u_{m+1} = 1 ↦ ``max``), and per site a fixed-edge histogram ``hist`` (first and last bins are
under/overflow). Write a_k, b_k for the grid values of P and Q.

* ``mean_shift``, ``log_var_ratio``, ``gauss_kl``: exact, from ``mean`` and ``var``.
* ``w1``: the estimate is W1 between the distributions whose quantile functions interpolate the
  grids linearly (the integral of a piecewise-linear |a(u) − b(u)|, computed exactly), except
  in the tails when the grid has tail levels (the default grid: 0.1%, 0.5%, 1% and 99%, 99.5%,
  99.9%): beyond the 1% and 99% levels each quantile function is a generalized Pareto quantile
  function through the three outermost levels, capped at the extreme, with the extreme value
  holding the last 1/n of the mass (:mod:`icstools.analysis.tails`). A straight line from the
  99th percentile to the maximum gives one value of thousands the weight of the top 1%, and
  overestimated W1 on heavy tails up to 2× (Student t(3), 4,096 values per step). Grids
  without tail levels (runs recorded before they became the default, or custom quantiles)
  keep the linear estimate, and :func:`drift` says which in its ``w1_estimate`` attribute.
  Bracket:
  any quantile functions that are monotone and pass through the grid points satisfy, on
  [u_k, u_{k+1}], max(0, a_k − b_{k+1}, b_k − a_{k+1}) ≤ |F_P⁻¹ − F_Q⁻¹| ≤
  max(a_{k+1} − b_k, b_{k+1} − a_k); integrating gives ``w1_lo`` ≤ W1 ≤ ``w1_hi`` (the upper
  bound is attained by some such pair, so it cannot be lowered without more information).
  Numpy's linear quantiles of n values are the grid of the *interpolated* distribution, not of
  the empirical (step) distribution of the values, and the empirical W1 can leave that bracket
  (values 7, 8 against 1, 0, 8, 0: W1 = 5.25, bracket [5.61, 6.04]). The two distributions are
  at most (max − min) / (2(n − 1)) apart in W1, so when the numbers of values n_P, n_Q are known
  (``count`` in a run) the bracket is widened by (max_P − min_P)/(2(n_P − 1)) +
  (max_Q − min_Q)/(2(n_Q − 1)) and then holds for the empirical distributions of the values
  themselves (what ``scipy.stats.wasserstein_distance`` computes). When the means of the same
  values are known too, W1 ≥ |μQ − μP| raises ``w1_lo`` (tight for a pure shift). The estimate
  is clipped into the bracket.
* ``w1_std``: ``w1``, ``w1_lo``, ``w1_hi`` divided by σP (exact, from ``var``).
* ``ks``: the estimate is D of the interpolated distributions (piecewise-linear CDFs). Bracket:
  for x between consecutive grid values, F(x) ∈ [max{u_k : a_k ≤ x}, min{u_k : a_k > x}] (so the
  CDF is known at the grid points up to the grid spacing); D's lower bound ``ks_lo`` is the
  largest certain gap between the two CDF intervals over x, the upper bound ``ks_hi`` the
  largest possible one. With known n, the empirical CDF is within 1/n of the interpolated one, so
  the bracket is widened by 1/n_P + 1/n_Q (and clipped to [0, 1]).
* ``psi``, ``js``, ``hellinger``: on the bins at P's grid values (tail levels, those within
  0.5% of 0 or 1, are no bin edges: their bins would hold a few values), the bin masses of each
  side are read from its interpolated CDF (P's are the level differences u_{k+1} − u_k unless
  grid values tie). These are estimates without a guaranteed bound: the binned masses of the values
  themselves can differ from the interpolated ones by up to the whole mass of a tie.
* Site level, from ``hist`` (variables ``hist_ks``, ``hist_psi``, ``hist_js``,
  ``hist_hellinger``, dims (step, site)): PSI, JS, Hellinger are exact for the histogram's bins
  (under/overflow included). KS: the cumulative counts are the CDFs at the edges, exactly, so
  ``hist_ks`` = ``hist_ks_lo`` = max over edges of |C_P − C_Q|; within a bin each CDF lies
  between its values at the bin's ends, which gives ``hist_ks_hi``.

The brackets hold for the values the summaries were computed from: for a recorder with
``quantile_sample`` (default 8192) a unit's quantiles come from at most that many values, and
:func:`drift` uses n = min(``count``, ``quantile_sample``). Recorded summaries are float32: the
bounds hold up to that rounding (relative 6e-8 of the values).

Typical tightness, measured by ``tests/test_drift.py`` (which asserts these figures): default
25-level grid 0.001, 0.005, 0.01, 0.05, …, 0.95, 0.99, 0.995, 0.999, n_P = n_Q = 2000 values
per unit, Q = P shifted by 0.5σ or scaled by 1.5, for normal, uniform, 30/70 normal mixtures,
lognormal and 5-level discrete units. Figures are the median and (in brackets) the worst of 8
units.

* W1 estimate: within 0.2–0.8% (1.3%) of the exact value for normal, uniform and mixtures;
  0.8–2.5% (7.6%) for the lognormal (3–6% (36%) with the former 21-level grid and straight
  tails); 4–6% (10%) for discrete values. Bracket, as multiples of W1: for the shift
  [≈ 1, 1.3–1.5] (the lower bound is |μQ − μP|); for the 1.5× scale [0.31, 1.75] (normal),
  [0.56, 1.5] (uniform), [0.51, 1.6] (mixture), [0.7, 1.4] (discrete), [0.31, 2.2] (lognormal;
  [0.27, 3.2] with the former grid): the 5% grid spacing and the open tails set the width.
* KS estimate: within 0.002–0.005 (0.009) of the exact D; discrete 0.014 (0.028). Bracket:
  D − 0.02…0.056 to D + 0.08…0.1: about one grid step on each side, plus 1/n_P + 1/n_Q. The
  tail model does not change the KS estimate: the CDFs beyond the 0.1% and 99.9% levels can
  differ by at most 0.001 there, and D is set in the bulk.
* PSI, JS, Hellinger on the grid's bins, worst of the 8 units of each case: within 0.7–8%,
  0.3–3.7%, 0.3–3.9% of the values of the samples binned at the same edges; for discrete
  values, whose ties fall on the edges, up to 51%, 16%, 22%.

On heavy-tailed units through the whole recording path (``tests/test_drift_tails.py``: Student
t(3), lognormal(0, 1), a two-Gaussian mixture, 1,000 and 4,096 values per step, training
source, no raw samples): the summary W1 of a drifting unit is within 13.2% of
``scipy.stats.wasserstein_distance`` at every step; a unit without drift, whose W1 is only the
sampling noise spread over all levels (≈ 0.07 for t(3) at 4,096 values), within 22.6% (the
grid cannot see noise between its levels; its mean over steps and units within 5%), where the
former grid with straight tails was off by up to 247%.

With n = 200 values per unit the bin-based estimates degrade (PSI up to 33% off for a normal,
the 1% bins then hold 2 values) and the brackets widen by their 1/n terms.

Windows and references
----------------------
:func:`drift` compares each record with a reference: the previous record (``"previous"``; the
first step is NaN), the first record (``"first"``), the record at a given step (an ``int``), or
the k records before it (``("window", k)``; the first k steps are NaN). A window's reference is
their pooled distribution for the moment metrics (the equal-weight mixture: mean of means, mean
of variances plus variance of means; ``w1_std`` divides by its σ), their Wasserstein barycenter
for the quantile-based metrics (the average of their quantile functions: for summaries, the
average of the grids and of min and max; for samples, the average of the sorted samples), and
their pooled histogram (summed counts) for the site-level ``hist_*`` metrics.

Flags
-----
:func:`drift_thresholds` learns, like NannyML, thresholds mean ± 3σ of each metric over the
records of a reference window (per unit, or per site pooling a site's units), and
:func:`flag_drift` flags values beyond them. Distances (everything except ``mean_shift`` and
``log_var_ratio``) are flagged above the upper threshold only. Expected false-flag rates when
nothing drifts (records i.i.d.; measured in ``tests/test_drift.py`` with ``"previous"``, 128
values per unit, thresholds per site from 25 records × 50 units): a Gaussian metric is flagged
at the two-sided 3σ rate 0.27% (``mean_shift``, ``log_var_ratio``: 0.4–0.5%); the distances are
right-skewed, so mean + 3σ is passed more often: ``gauss_kl`` (≈ χ²₂: e⁻⁴ = 1.8%) 2.1%, ``w1``
1.5%, ``ks`` 1.1%, ``psi`` 1.6%, ``js`` 0.24%, ``hellinger`` 0.36%. Thresholds per unit from 25
records have a noisier σ and about twice these rates.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> p, q = rng.normal(size=(500, 3)), rng.normal(0.5, 1.0, size=(400, 3))   # [n, units]
>>> w1(p, q).shape
(3,)
>>> bool(np.allclose(mean_shift(p, q), 0.5, atol=0.2))
True
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr
from scipy.special import rel_entr

from icstools.analysis.tails import TAIL_LEVEL, has_tail_levels, linear_w1, tail_aware_w1

__all__ = [
    "METRICS",
    "PSI_EPS",
    "drift",
    "drift_thresholds",
    "flag_drift",
    "gauss_kl",
    "hellinger",
    "hist_drift",
    "js",
    "ks",
    "log_var_ratio",
    "mean_shift",
    "moment_drift",
    "psi",
    "quantile_drift",
    "site_aggregate",
    "w1",
    "w1_std",
]

#: Metric names, as :func:`drift` takes them and names its variables.
METRICS: tuple[str, ...] = (
    "mean_shift",
    "log_var_ratio",
    "gauss_kl",
    "w1",
    "w1_std",
    "ks",
    "psi",
    "js",
    "hellinger",
)
#: Floor of the bin probabilities in PSI (then renormalized), so empty bins give finite values.
PSI_EPS = 1e-4
#: Metrics with a sign: flagged on both sides; all others are distances, flagged above only.
SIGNED_METRICS: tuple[str, ...] = ("mean_shift", "log_var_ratio")

_MOMENT_METRICS = ("mean_shift", "log_var_ratio", "gauss_kl")
_SHAPE_METRICS = ("w1", "w1_std", "ks", "psi", "js", "hellinger")
_HIST_METRICS = ("ks", "psi", "js", "hellinger")
# Outputs of the kernels, in order.
_QUANTILE_OUT = ("w1", "w1_lo", "w1_hi", "ks", "ks_lo", "ks_hi", "psi", "js", "hellinger")
_HIST_OUT = ("ks", "ks_lo", "ks_hi", "psi", "js", "hellinger")
_SAMPLE_OUT = ("w1", "ks", "psi", "js", "hellinger")
_DECILES = np.arange(1, 10) / 10.0
_HOWS = ("mean", "median", "max", "min")

_DESCRIPTIONS = {
    "mean_shift": "standardized mean shift (mu_Q - mu_P) / sigma_P",
    "log_var_ratio": "log variance ratio ln(sigma_Q^2 / sigma_P^2)",
    "gauss_kl": "KL(Q || P) of the fitted normals, nats",
    "w1": "Wasserstein-1 distance",
    "w1_std": "Wasserstein-1 distance / sigma_P",
    "ks": "Kolmogorov-Smirnov statistic D",
    "psi": f"population stability index, nats (bin probabilities floored at {PSI_EPS})",
    "js": "Jensen-Shannon distance, base 2",
    "hellinger": "Hellinger distance",
}


# ============================================================================================
# Small helpers
# ============================================================================================


def _warn_nonfinite(bad: np.ndarray, stacklevel: int = 3) -> None:
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        warnings.warn(
            f"{n_bad} of {bad.size} units hold NaN or ±inf values; their drift is NaN",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def _as_float(x: Any, name: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}") from err
    return a


def _scalar_or_array(a: np.ndarray) -> Any:
    return a[()] if a.ndim == 0 else a


def _samples_last(p: Any, q: Any, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``p``, ``q`` as float64 with the sample axis last: ``[..., n]`` (batch shapes equal)."""
    pa, qa = _as_float(p, "p"), _as_float(q, "q")
    if pa.ndim == 0 or qa.ndim == 0:
        raise ValueError("p and q must have a sample axis: shape [n] or [n, units]")
    if pa.ndim != qa.ndim:
        raise ValueError(f"p and q must have the same number of dims, got {pa.shape}, {qa.shape}")
    if not -pa.ndim <= axis < pa.ndim:
        raise ValueError(f"axis {axis} is out of range for arrays of {pa.ndim} dims")
    pa, qa = np.moveaxis(pa, axis, -1), np.moveaxis(qa, axis, -1)  # [..., n]
    if pa.shape[:-1] != qa.shape[:-1]:
        raise ValueError(
            f"p and q must have the same units: shapes {pa.shape[:-1]} and {qa.shape[:-1]} "
            "besides the sample axis"
        )
    if pa.shape[-1] == 0 or qa.shape[-1] == 0:
        raise ValueError("p and q need at least one sample each")
    return pa, qa


def _split_bad(*arrays: np.ndarray, core: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mask of units with a non-finite value (over the last ``core`` axes) and the arrays with
    those units' values replaced by 0, so computing on them raises no warning."""
    bad = np.zeros(np.broadcast_shapes(*(a.shape[: a.ndim - core] for a in arrays)), bool)
    for a in arrays:
        fin = np.isfinite(a)
        bad = bad | ~fin.reshape(*fin.shape[: fin.ndim - core], -1).all(-1)
    if not bad.any():
        return bad, list(arrays)
    clean = []
    for a in arrays:
        mask = bad.reshape(bad.shape + (1,) * core)
        clean.append(np.where(mask, 0.0, a))
    return bad, clean


# ============================================================================================
# Kernels (numpy, batched over leading dims, never warn; NaN handling by the callers)
# ============================================================================================


def _moment_kernel(
    mp: np.ndarray, vp: np.ndarray, mq: np.ndarray, vq: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mean_shift``, ``log_var_ratio``, ``gauss_kl`` of (mean, var) pairs (any shapes)."""
    with np.errstate(all="ignore"):
        mp, vp, mq, vq = np.broadcast_arrays(mp, vp, mq, vq)
        d = (mq - mp) / np.sqrt(vp)  # ±inf or NaN (0/0) when σP = 0
        lvr = np.log(vq) - np.log(vp)
        rm1 = (vq - vp) / vp  # σQ²/σP² − 1
        kl = 0.5 * (rm1 - np.log1p(rm1)) + 0.5 * d * d
        # Degenerate P (point mass): KL is 0 against the same point mass, +inf otherwise.
        kl = np.where(vp == 0, np.where((vq == 0) & (mq == mp), 0.0, np.inf), kl)
    return d, lvr, kl


def _merged_cdfs(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled sorted values ``[..., n_p + n_q]`` and both empirical CDFs counted along them
    (within a run of ties the counts are partial; at its last element they are F(x))."""
    n_p, n_q = p.shape[-1], q.shape[-1]
    allv = np.concatenate([p, q], axis=-1)  # [..., N]
    order = np.argsort(allv, axis=-1)  # the order within ties does not matter
    vals = np.take_along_axis(allv, order, axis=-1)
    from_p = order < n_p
    cp = np.cumsum(from_p, axis=-1) / n_p
    cq = np.cumsum(~from_p, axis=-1) / n_q
    return vals, cp, cq


def _w1_ks_kernel(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact W1 and KS D of the empirical distributions of ``p`` ``[..., n_p]`` and ``q``."""
    vals, cp, cq = _merged_cdfs(p, q)
    gap = np.abs(cp - cq)  # [..., N]
    with np.errstate(all="ignore"):
        w = np.sum(gap[..., :-1] * np.diff(vals, axis=-1), axis=-1)
    last = np.ones(vals.shape, bool)  # last element of each run of ties: counts are F(x)
    last[..., :-1] = vals[..., 1:] != vals[..., :-1]
    d = np.max(np.where(last, gap, 0.0), axis=-1)
    return w, d


def _count_le(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """``#{x_i ≤ e_j}`` for values ``x`` ``[..., n]`` and edges ``e`` ``[..., m]``."""
    n, m = x.shape[-1], e.shape[-1]
    batch = np.broadcast_shapes(x.shape[:-1], e.shape[:-1])
    xf = np.broadcast_to(x, (*batch, n)).reshape(-1, n)  # [B, n]
    ef = np.broadcast_to(e, (*batch, m)).reshape(-1, m)  # [B, m]
    out = np.empty(ef.shape, np.int64)
    block = max(1, (1 << 24) // max(1, n * m))  # ≤ 16 MB of comparisons at a time
    for i in range(0, xf.shape[0], block):
        cmp = xf[i : i + block, None, :] <= ef[i : i + block, :, None]  # [b, m, n]
        out[i : i + block] = np.count_nonzero(cmp, axis=-1)
    return out.reshape((*batch, m))


def _bin_probs_samples(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Masses of the bins (−∞, e_1], …, (e_m, ∞) in the sample ``x`` ``[..., n]``."""
    c = _count_le(x, e).astype(np.float64)  # [..., m]
    n = x.shape[-1]
    zeros = np.zeros((*c.shape[:-1], 1))
    return np.diff(np.concatenate([zeros, c, zeros + n], axis=-1), axis=-1) / n  # [..., m + 1]


def _binned_kernel(
    p: np.ndarray, q: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSI, JS distance (base 2) and Hellinger of bin probabilities ``[..., bins]``."""
    with np.errstate(all="ignore"):
        pe, qe = np.maximum(p, eps), np.maximum(q, eps)
        pe, qe = pe / pe.sum(-1, keepdims=True), qe / qe.sum(-1, keepdims=True)
        psi_ = np.sum((qe - pe) * np.log(qe / pe), axis=-1)
        # as scipy.spatial.distance.jensenshannon(p, q, base=2)
        pn, qn = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
        m = (pn + qn) / 2.0
        jsd = (np.sum(rel_entr(pn, m), axis=-1) + np.sum(rel_entr(qn, m), axis=-1)) / np.log(2.0)
        js_ = np.sqrt(np.maximum(jsd, 0.0) / 2.0)
        hel = np.sqrt(0.5 * np.sum((np.sqrt(p) - np.sqrt(q)) ** 2, axis=-1))
    return psi_, js_, hel


def _sample_kernel(
    p: np.ndarray, q: np.ndarray, levels: np.ndarray | None, edges: np.ndarray | None, eps: float
) -> np.ndarray:
    """``[..., 5]``: w1, ks, psi, js, hellinger of samples ``[..., n]``; NaN for bad units."""
    batch = np.broadcast_shapes(p.shape[:-1], q.shape[:-1])
    p = np.broadcast_to(p, batch + p.shape[-1:])
    q = np.broadcast_to(q, batch + q.shape[-1:])
    bad, (p, q) = _split_bad(p, q)
    w, d = _w1_ks_kernel(p, q)
    if edges is None:
        edges = np.moveaxis(np.quantile(p, levels, axis=-1), 0, -1)  # [..., m]
    bp, bq = _bin_probs_samples(p, edges), _bin_probs_samples(q, edges)
    out = np.stack([w, d, *_binned_kernel(bp, bq, eps)], axis=-1)
    return np.where(bad[..., None], np.nan, out)


def _lin_cdf(a: np.ndarray, u: np.ndarray, x: np.ndarray, right: bool = True) -> np.ndarray:
    """CDF at ``x`` ``[..., X]`` of the distribution whose quantile function interpolates
    ``(u_k, a_k)`` linearly (``a`` ``[..., G]`` nondecreasing, ``u`` from 0 to 1): F(x) if
    ``right``, else the left limit F(x−). Ties in ``a`` are jumps of F."""
    g = a.shape[-1]
    if right:
        c = np.sum(a[..., None, :] <= x[..., :, None], axis=-1)  # [..., X]
    else:
        c = np.sum(a[..., None, :] < x[..., :, None], axis=-1)
    i0, i1 = np.clip(c - 1, 0, g - 1), np.clip(c, 0, g - 1)
    a0, a1 = np.take_along_axis(a, i0, -1), np.take_along_axis(a, i1, -1)
    with np.errstate(all="ignore"):
        frac = np.clip((x - a0) / (a1 - a0), 0.0, 1.0)
    f = u[i0] + frac * (u[i1] - u[i0])  # a0 < a1 wherever 0 < c < G
    return np.where(c == 0, 0.0, np.where(c == g, 1.0, f))


def _quantile_kernel(
    u: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    eps_w_p: np.ndarray,
    eps_w_q: np.ndarray,
    eps_k_p: np.ndarray,
    eps_k_q: np.ndarray,
    dmu: np.ndarray,
    n_p: np.ndarray,
    n_q: np.ndarray,
    eps: float,
) -> np.ndarray:
    """``[..., 9]`` (see ``_QUANTILE_OUT``) from grids ``a`` (P), ``b`` (Q) ``[..., G]`` at
    levels ``u`` ``[G]`` (u_0 = 0, u_{G-1} = 1); ``eps_*`` widen the brackets (0: none); ``dmu``
    is |μQ − μP| of the same values, a lower bound of W1 (NaN: unknown); ``n_p``, ``n_q`` the
    numbers of values (NaN: unknown), used by the tail model when the grid has tail levels."""
    bad, (a, b, eps_w_p, eps_w_q, eps_k_p, eps_k_q) = _split_bad(
        *np.broadcast_arrays(a, b),
        *(np.asarray(e, float)[..., None] for e in (eps_w_p, eps_w_q, eps_k_p, eps_k_q)),
    )
    eps_w_p, eps_w_q, eps_k_p, eps_k_q = (e[..., 0] for e in (eps_w_p, eps_w_q, eps_k_p, eps_k_q))
    dmu = np.broadcast_to(np.asarray(dmu, dtype=np.float64), bad.shape)
    a = np.maximum.accumulate(a, axis=-1)  # float rounding must not break monotonicity
    b = np.maximum.accumulate(b, axis=-1)
    du = np.diff(u)  # [G - 1]
    with np.errstate(all="ignore"):
        # W1: generalized Pareto tails beyond the tail levels (icstools.analysis.tails), else
        # the exact integral of |a(u) - b(u)| for the linear interpolants ...
        if has_tail_levels(u):
            w_est = tail_aware_w1(u, a, b, n_p, n_q)
        else:
            w_est = linear_w1(u, a, b)
        # ... and its bracket for any monotone quantile functions through the grid points
        lo_k = np.maximum(0.0, np.maximum(a[..., :-1] - b[..., 1:], b[..., :-1] - a[..., 1:]))
        hi_k = np.maximum(a[..., 1:] - b[..., :-1], b[..., 1:] - a[..., :-1])
        w_lo = np.maximum(np.sum(lo_k * du, axis=-1) - eps_w_p - eps_w_q, 0.0)
        w_lo = np.maximum(w_lo, np.where(np.isnan(dmu), 0.0, dmu))  # W1 ≥ |μQ − μP|
        w_hi = np.sum(hi_k * du, axis=-1) + eps_w_p + eps_w_q
    # KS: estimate at all breakpoints (both sides), bracket from the step-function bounds
    x = np.concatenate([a, b], axis=-1)  # [..., 2G]
    fp_r, fq_r = _lin_cdf(a, u, x, True), _lin_cdf(b, u, x, True)
    fp_l, fq_l = _lin_cdf(a, u, x, False), _lin_cdf(b, u, x, False)
    k_est = np.maximum(np.abs(fp_r - fq_r).max(-1), np.abs(fp_l - fq_l).max(-1))
    cp = np.sum(a[..., None, :] <= x[..., :, None], axis=-1)  # #{a_k ≤ x}  [..., 2G]
    cq = np.sum(b[..., None, :] <= x[..., :, None], axis=-1)
    ulow, uhigh = np.concatenate([[0.0], u]), np.concatenate([u, [1.0]])
    lp, hp, lq, hq = ulow[cp], uhigh[cp], ulow[cq], uhigh[cq]
    k_lo = np.maximum(np.maximum(lp - hq, lq - hp).max(-1), 0.0)
    k_hi = np.maximum(hp - lq, hq - lp).max(-1)
    k_lo = np.clip(k_lo - eps_k_p - eps_k_q, 0.0, 1.0)
    k_hi = np.clip(k_hi + eps_k_p + eps_k_q, 0.0, 1.0)
    # |μQ − μP| may pass the grid's upper bound by rounding (Σ Δu ≠ 1 in float): keep lo ≤ hi.
    w_hi = np.maximum(w_hi, w_lo)
    # the truth is in the bracket, so clipping the estimates into it can only bring them closer
    w_est, k_est = np.clip(w_est, w_lo, w_hi), np.clip(k_est, k_lo, k_hi)
    # PSI/JS/Hellinger on the bins at P's interior grid values, tail levels (within
    # TAIL_LEVEL of 0 or 1) left out: their bins hold a few values each and would make the
    # binned metrics noisy and not comparable with runs recorded without them
    keep = np.flatnonzero((u > TAIL_LEVEL) & (u < 1.0 - TAIL_LEVEL))
    e = a[..., keep]
    zeros, ones = np.zeros((*e.shape[:-1], 1)), np.ones((*e.shape[:-1], 1))
    bp = np.diff(np.concatenate([zeros, _lin_cdf(a, u, e), ones], axis=-1), axis=-1)
    bq = np.diff(np.concatenate([zeros, _lin_cdf(b, u, e), ones], axis=-1), axis=-1)
    binned = _binned_kernel(np.maximum(bp, 0.0), np.maximum(bq, 0.0), eps)
    out = np.stack([w_est, w_lo, w_hi, k_est, k_lo, k_hi, *binned], axis=-1)
    return np.where(bad[..., None], np.nan, out)


def _hist_kernel(hp: np.ndarray, hq: np.ndarray, eps: float) -> np.ndarray:
    """``[..., 6]`` (see ``_HIST_OUT``) from bin counts ``[..., B]`` (under/overflow included)."""
    bad, (hp, hq) = _split_bad(*np.broadcast_arrays(hp, hq))
    n_p, n_q = hp.sum(-1, keepdims=True), hq.sum(-1, keepdims=True)
    bad = bad | (n_p[..., 0] <= 0) | (n_q[..., 0] <= 0)
    with np.errstate(all="ignore"):
        cp, cq = np.cumsum(hp, -1) / n_p, np.cumsum(hq, -1) / n_q  # CDFs at the bins' right ends
        zeros = np.zeros((*cp.shape[:-1], 1))
        cp0 = np.concatenate([zeros, cp[..., :-1]], -1)  # at the left ends
        cq0 = np.concatenate([zeros, cq[..., :-1]], -1)
        k = np.abs(cp - cq).max(-1)
        k_hi = np.maximum(cp - cq0, cq - cp0).max(-1)
        binned = _binned_kernel(hp / n_p, hq / n_q, eps)
    out = np.stack([k, k, np.clip(k_hi, 0.0, 1.0), *binned], axis=-1)
    return np.where(bad[..., None], np.nan, out)


# ============================================================================================
# Public functions on arrays
# ============================================================================================


def _sample_moments(p: Any, q: Any, axis: int) -> tuple[np.ndarray, ...]:
    pa, qa = _samples_last(p, q, axis)
    bad, (pa, qa) = _split_bad(pa, qa)
    _warn_nonfinite(bad, stacklevel=4)
    mp, mq = pa.mean(-1), qa.mean(-1)
    vp = np.mean((pa - mp[..., None]) ** 2, axis=-1)
    vq = np.mean((qa - mq[..., None]) ** 2, axis=-1)
    return bad, mp, vp, mq, vq


def mean_shift(p: Any, q: Any, *, axis: int = 0) -> Any:
    """Standardized mean shift (μQ − μP) / σP per unit (σ with ddof=0).

    Parameters
    ----------
    p, q : array_like
        Reference and current samples, ``[n_p, units]`` and ``[n_q, units]`` (or ``[n]`` for
        one unit); the sample axis is ``axis``.
    axis : int
        The sample axis.

    Returns
    -------
    numpy.ndarray or float
        ``[units]``: ±inf if σP = 0 and the means differ, NaN if σP = 0 and they are equal,
        NaN (and one RuntimeWarning) for units holding NaN or ±inf.

    Examples
    --------
    >>> mean_shift(np.array([0.0, 2.0]), np.array([3.0, 5.0]))
    np.float64(3.0)
    """
    bad, mp, vp, mq, vq = _sample_moments(p, q, axis)
    out = np.where(bad, np.nan, _moment_kernel(mp, vp, mq, vq)[0])
    return _scalar_or_array(out)


def log_var_ratio(p: Any, q: Any, *, axis: int = 0) -> Any:
    """Log variance ratio ln(σQ² / σP²) per unit (ddof=0).

    Parameters
    ----------
    p, q : array_like
        Reference and current samples, ``[n_p, units]`` and ``[n_q, units]`` (or ``[n]``).
    axis : int
        The sample axis.

    Returns
    -------
    numpy.ndarray or float
        ``[units]``: +inf if only σP = 0, −inf if only σQ = 0, NaN if both are 0.

    Examples
    --------
    >>> float(log_var_ratio(np.array([-1.0, 1.0]), np.array([-2.0, 2.0])))  # ln 4
    1.3862943611198906
    """
    bad, mp, vp, mq, vq = _sample_moments(p, q, axis)
    out = np.where(bad, np.nan, _moment_kernel(mp, vp, mq, vq)[1])
    return _scalar_or_array(out)


def gauss_kl(p: Any, q: Any, *, axis: int = 0) -> Any:
    """KL(Q ‖ P) of the normals fitted to the current Q and the reference P, in nats.

    ``ln(σP/σQ) + (σQ² + (μQ − μP)²) / (2σP²) − 1/2``: the information lost when the reference
    normal is used for the current values (direction: current relative to reference).

    Parameters
    ----------
    p, q : array_like
        Reference and current samples, ``[n_p, units]`` and ``[n_q, units]`` (or ``[n]``).
    axis : int
        The sample axis.

    Returns
    -------
    numpy.ndarray or float
        ``[units]``; +inf when either side is constant, except 0 when both are the same constant.

    Examples
    --------
    >>> float(gauss_kl(np.array([-1.0, 1.0]), np.array([0.0, 2.0])))  # (μQ − μP)²/2σP² = 0.5
    0.5
    """
    bad, mp, vp, mq, vq = _sample_moments(p, q, axis)
    out = np.where(bad, np.nan, _moment_kernel(mp, vp, mq, vq)[2])
    return _scalar_or_array(out)


def _w1_ks(p: Any, q: Any, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pa, qa = _samples_last(p, q, axis)
    bad, (pa, qa) = _split_bad(pa, qa)
    _warn_nonfinite(bad, stacklevel=4)
    w, d = _w1_ks_kernel(pa, qa)
    return np.where(bad, np.nan, w), np.where(bad, np.nan, d), pa, bad


def w1(p: Any, q: Any, *, axis: int = 0) -> Any:
    """Exact Wasserstein-1 distance between the empirical distributions, per unit.

    Equals ``scipy.stats.wasserstein_distance(p[:, i], q[:, i])`` for each unit ``i`` (any
    sample sizes, ties included), vectorised over units.

    Parameters
    ----------
    p, q : array_like
        Reference and current samples, ``[n_p, units]`` and ``[n_q, units]`` (or ``[n]``).
    axis : int
        The sample axis.

    Returns
    -------
    numpy.ndarray or float
        ``[units]``; NaN (one RuntimeWarning) for units holding NaN or ±inf.

    Examples
    --------
    >>> float(w1(np.array([0.0, 1.0, 3.0]), np.array([5.0, 6.0, 8.0])))
    5.0
    """
    return _scalar_or_array(_w1_ks(p, q, axis)[0])


def w1_std(p: Any, q: Any, *, axis: int = 0) -> Any:
    """Wasserstein-1 distance divided by the reference's standard deviation σP (ddof=0).

    Parameters
    ----------
    p, q : array_like
        Reference and current samples, ``[n_p, units]`` and ``[n_q, units]`` (or ``[n]``).
    axis : int
        The sample axis.

    Returns
    -------
    numpy.ndarray or float
        ``[units]``; inf if σP = 0 < W1, NaN if σP = W1 = 0.

    Examples
    --------
    >>> float(w1_std(np.array([-1.0, 1.0]), np.array([1.0, 3.0])))
    2.0
    """
    w, _, pa, bad = _w1_ks(p, q, axis)
    with np.errstate(all="ignore"):
        out = np.where(bad, np.nan, w / pa.std(-1))
    return _scalar_or_array(out)


def ks(p: Any, q: Any, *, axis: int = 0) -> Any:
    """Exact two-sample Kolmogorov–Smirnov statistic D = sup |F_P − F_Q| per unit.

    Equals ``scipy.stats.ks_2samp(p[:, i], q[:, i]).statistic`` (any sample sizes, ties).

    Parameters
    ----------
    p, q : array_like
        Reference and current samples, ``[n_p, units]`` and ``[n_q, units]`` (or ``[n]``).
    axis : int
        The sample axis.

    Returns
    -------
    numpy.ndarray or float
        ``[units]`` in [0, 1]; NaN (one RuntimeWarning) for units holding NaN or ±inf.

    Examples
    --------
    >>> float(ks(np.array([0.0, 1.0, 2.0, 3.0]), np.array([2.0, 3.0])))
    0.5
    """
    return _scalar_or_array(_w1_ks(p, q, axis)[1])


def _binned(p: Any, q: Any, bins: int, edges: Any, eps: float, axis: int, which: int) -> Any:
    pa, qa = _samples_last(p, q, axis)
    if edges is None:
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
            raise ValueError(f"bins must be an int ≥ 1, got {bins!r}")
        levels, e = np.arange(1, int(bins)) / int(bins), None
    else:
        e = _as_float(edges, "edges")
        if e.ndim == 1:
            e = np.broadcast_to(e, pa.shape[:-1] + e.shape)  # [..., m]
        elif e.ndim == pa.ndim:
            e = np.moveaxis(e, axis, -1)
            if e.shape[:-1] != pa.shape[:-1]:
                raise ValueError(
                    f"edges of shape {np.moveaxis(e, -1, axis).shape} do not match the units of "
                    f"p ({pa.shape[:-1]}); give [m] edges or [m, units] along axis {axis}"
                )
        else:
            raise ValueError(f"edges must be [m] or [m, units], got shape {e.shape}")
        with np.errstate(invalid="ignore"):
            if np.any(np.diff(e, axis=-1) < 0):
                raise ValueError("edges must be nondecreasing along the bin axis")
        levels = None
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    arrays = (pa, qa) if e is None else (pa, qa, e)
    bad, clean = _split_bad(*arrays)
    _warn_nonfinite(bad, stacklevel=4)
    out = _sample_kernel(clean[0], clean[1], levels, None if e is None else clean[2], eps)
    res = np.where(bad, np.nan, out[..., which])
    return _scalar_or_array(res)


def psi(
    p: Any,
    q: Any,
    *,
    bins: int = 10,
    edges: Any = None,
    eps: float = PSI_EPS,
    axis: int = 0,
) -> Any:
    """Population stability index Σ (q_b − p_b) ln(q_b / p_b) per unit, in nats.

    Parameters
    ----------
    p, q : array_like
        Reference and current samples, ``[n_p, units]`` and ``[n_q, units]`` (or ``[n]``).
    bins : int
        Number of bins with edges at the reference's quantiles at levels k/bins (numpy linear),
        k = 1 … bins − 1; ignored if ``edges`` is given.
    edges : array_like, optional
        Nondecreasing edges ``[m]`` shared by all units, or ``[m, units]`` (edges along ``axis``),
        giving the m + 1 bins (−∞, e_1], (e_1, e_2], …, (e_m, ∞).
    eps : float
        Floor of the bin probabilities (then renormalized to sum 1).
    axis : int
        The sample axis.

    Returns
    -------
    numpy.ndarray or float
        ``[units]``, ≥ 0; NaN (one RuntimeWarning) for units holding NaN or ±inf.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> p, q = rng.normal(size=(1000, 2)), rng.normal(1.0, 1.0, size=(1000, 2))
    >>> bool(np.all(psi(p, q) > 0.5))
    True
    """
    return _binned(p, q, bins, edges, eps, axis, 2)


def js(p: Any, q: Any, *, bins: int = 10, edges: Any = None, axis: int = 0) -> Any:
    """Jensen–Shannon distance (base 2, in [0, 1]) between the binned distributions, per unit.

    Equals ``scipy.spatial.distance.jensenshannon(p_b, q_b, base=2)`` on the bin probabilities.

    Parameters
    ----------
    p, q : array_like
        Reference and current samples, ``[n_p, units]`` and ``[n_q, units]`` (or ``[n]``).
    bins, edges, axis
        As in :func:`psi`.

    Returns
    -------
    numpy.ndarray or float
        ``[units]``; NaN (one RuntimeWarning) for units holding NaN or ±inf.

    Examples
    --------
    >>> float(js(np.array([0.0, 1.0]), np.array([5.0, 6.0]), edges=[2.0]))  # disjoint bins
    1.0
    """
    return _binned(p, q, bins, edges, PSI_EPS, axis, 3)


def hellinger(p: Any, q: Any, *, bins: int = 10, edges: Any = None, axis: int = 0) -> Any:
    """Hellinger distance sqrt(½ Σ (√p_b − √q_b)²) between the binned distributions, per unit.

    Parameters
    ----------
    p, q : array_like
        Reference and current samples, ``[n_p, units]`` and ``[n_q, units]`` (or ``[n]``).
    bins, edges, axis
        As in :func:`psi`.

    Returns
    -------
    numpy.ndarray or float
        ``[units]`` in [0, 1]; NaN (one RuntimeWarning) for units holding NaN or ±inf.

    Examples
    --------
    >>> float(hellinger(np.array([0.0, 1.0]), np.array([5.0, 6.0]), edges=[2.0]))
    1.0
    """
    return _binned(p, q, bins, edges, PSI_EPS, axis, 4)


def moment_drift(mean_p: Any, var_p: Any, mean_q: Any, var_q: Any) -> dict[str, np.ndarray]:
    """Moment metrics from means and variances (exact): the recorded ``mean``/``var`` path.

    Parameters
    ----------
    mean_p, var_p, mean_q, var_q : array_like
        Means and variances (ddof=0) of the reference P and the current Q (broadcastable).

    Returns
    -------
    dict of str to numpy.ndarray
        ``mean_shift``, ``log_var_ratio``, ``gauss_kl`` (see the module docstring); NaN (one
        RuntimeWarning) where an input is NaN or ±inf.

    Examples
    --------
    >>> out = moment_drift(0.0, 1.0, 2.0, 1.0)
    >>> float(out["mean_shift"]), float(out["gauss_kl"])
    (2.0, 2.0)
    """
    arrays = [_as_float(a, "moments") for a in (mean_p, var_p, mean_q, var_q)]
    arrays = list(np.broadcast_arrays(*arrays))
    bad, arrays = _split_bad(*(a[..., None] for a in arrays))
    _warn_nonfinite(bad)
    res = _moment_kernel(*(a[..., 0] for a in arrays))
    out = {}
    for name, r in zip(_MOMENT_METRICS, res, strict=True):
        out[name] = np.where(bad, np.nan, r)
    return out


def _check_levels(levels: Any) -> np.ndarray:
    u = _as_float(levels, "levels")
    if u.ndim != 1 or u.size < 2 or u[0] != 0.0 or u[-1] != 1.0 or np.any(np.diff(u) <= 0):
        raise ValueError(
            "levels must be strictly increasing from 0 (the minimum) to 1 (the maximum), "
            f"got {levels!r}"
        )
    return u


def _eps_w1(lo: np.ndarray, hi: np.ndarray, n: Any) -> np.ndarray:
    """W1 between the empirical distribution of n values and their linear interpolant ≤ this."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(all="ignore"):
        e = (hi - lo) / (2.0 * (n - 1.0))
    return np.where(n == 1, 0.0, np.where(n >= 1, e, np.nan))


def _eps_ks(n: Any) -> np.ndarray:
    """KS distance between the empirical distribution of n values and its interpolant ≤ 1/n."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(all="ignore"):
        return np.where(n >= 1, 1.0 / n, np.nan)


def quantile_drift(
    levels: Any,
    qp: Any,
    qq: Any,
    *,
    n_p: Any = None,
    n_q: Any = None,
    mean_p: Any = None,
    mean_q: Any = None,
    eps: float = PSI_EPS,
) -> dict[str, np.ndarray]:
    """Shape metrics from quantile grids, with brackets for W1 and KS (module docstring).

    Parameters
    ----------
    levels : array_like
        ``[G]`` strictly increasing levels from 0 to 1: the grid with the minimum at 0 and the
        maximum at 1 (e.g. ``[0, 0.01, 0.05, …, 0.99, 1]``).
    qp, qq : array_like
        ``[..., G]`` quantile values of the reference P and the current Q at ``levels``
        (numpy-linear quantiles, plus min and max).
    n_p, n_q : array_like, optional
        ``[...]`` numbers of values the grids were computed from. With them the brackets hold
        for the empirical distributions of those values; without, for every distribution whose
        (monotone) quantile function passes through the grid points.
    mean_p, mean_q : array_like, optional
        ``[...]`` means of the same values: W1 ≥ |μQ − μP| then raises ``w1_lo``.
    eps : float
        PSI's probability floor.

    Returns
    -------
    dict of str to numpy.ndarray
        ``w1``, ``w1_lo``, ``w1_hi``, ``ks``, ``ks_lo``, ``ks_hi``, ``psi``, ``js``,
        ``hellinger``, each ``[...]``; NaN (one RuntimeWarning) where an input is non-finite.

    Examples
    --------
    >>> u = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    >>> a = np.array([-2.0, -0.7, 0.0, 0.7, 2.0]); b = a + 1.0
    >>> out = quantile_drift(u, a, b)
    >>> float(out["w1"]), float(out["w1_lo"]) <= 1.0 <= float(out["w1_hi"])
    (1.0, True)
    """
    u = _check_levels(levels)
    a, b = _as_float(qp, "qp"), _as_float(qq, "qq")
    if a.shape[-1:] != u.shape or b.shape[-1:] != u.shape:
        raise ValueError(
            f"qp and qq must have the levels on their last axis ({u.size}), got shapes "
            f"{a.shape} and {b.shape}"
        )
    with np.errstate(invalid="ignore"):
        if np.any(np.diff(a, axis=-1) < 0) or np.any(np.diff(b, axis=-1) < 0):
            raise ValueError("quantile values must be nondecreasing along the levels")
    a, b = np.broadcast_arrays(a, b)
    zero = np.zeros(a.shape[:-1])
    ew_p = zero if n_p is None else _eps_w1(a[..., 0], a[..., -1], n_p)
    ew_q = zero if n_q is None else _eps_w1(b[..., 0], b[..., -1], n_q)
    ek_p = zero if n_p is None else _eps_ks(n_p)
    ek_q = zero if n_q is None else _eps_ks(n_q)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if (mean_p is None) != (mean_q is None):
        raise ValueError("give both mean_p and mean_q, or neither")
    if mean_p is None:
        dmu = np.full(a.shape[:-1], np.nan)
    else:
        with np.errstate(all="ignore"):
            dmu = np.abs(_as_float(mean_q, "mean_q") - _as_float(mean_p, "mean_p"))
    n_a = np.full(a.shape[:-1], np.nan) if n_p is None else _as_float(n_p, "n_p")
    n_b = np.full(a.shape[:-1], np.nan) if n_q is None else _as_float(n_q, "n_q")
    out = _quantile_kernel(u, a, b, ew_p, ew_q, ek_p, ek_q, dmu, n_a, n_b, eps)
    _warn_nonfinite(np.isnan(out[..., 0]))
    return {name: out[..., i] for i, name in enumerate(_QUANTILE_OUT)}


def hist_drift(hist_p: Any, hist_q: Any, *, eps: float = PSI_EPS) -> dict[str, np.ndarray]:
    """Metrics of two histograms with the same bins (exact for the bins; KS bracketed).

    Parameters
    ----------
    hist_p, hist_q : array_like
        ``[..., bins]`` counts (or weights) of the reference and the current; the first and last
        bins may be under/overflow bins, every bin counts as one category.
    eps : float
        PSI's probability floor.

    Returns
    -------
    dict of str to numpy.ndarray
        ``ks`` (= ``ks_lo``: the largest CDF gap at the bin edges), ``ks_lo``, ``ks_hi`` (the
        largest gap possible within a bin), ``psi``, ``js``, ``hellinger``; NaN for an empty
        histogram (and one RuntimeWarning for non-finite counts).

    Examples
    --------
    >>> out = hist_drift([0, 5, 5, 0], [0, 0, 5, 5])
    >>> float(out["ks_lo"]), float(out["ks_hi"])
    (0.5, 1.0)
    """
    hp, hq = _as_float(hist_p, "hist_p"), _as_float(hist_q, "hist_q")
    if hp.ndim == 0 or hp.shape[-1:] != hq.shape[-1:]:
        raise ValueError(f"histograms need the same bins (last axis), got {hp.shape}, {hq.shape}")
    if np.any(hp < 0) or np.any(hq < 0):
        raise ValueError("histogram counts must be ≥ 0")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    hp, hq = np.broadcast_arrays(hp, hq)
    bad, _ = _split_bad(hp, hq)
    _warn_nonfinite(bad)
    out = _hist_kernel(hp, hq, eps)
    return {name: out[..., i] for i, name in enumerate(_HIST_OUT)}


# ============================================================================================
# Dataset level
# ============================================================================================


def _options(valid: Iterable[Any]) -> str:
    vals = list(valid)
    if len(vals) > 12:
        return "[" + ", ".join(repr(v) for v in vals[:6]) + ", …, " + repr(vals[-1]) + "]"
    return "[" + ", ".join(repr(v) for v in vals) + "]"


def _steps_list(ds: xr.Dataset | xr.DataArray) -> list[int]:
    return [int(s) for s in np.asarray(ds["step"].values)]


def _normalize_reference(reference: Any, steps: list[int]) -> tuple[str, int]:
    if isinstance(reference, str):
        if reference in ("previous", "first"):
            return reference, 0
    elif isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
        if int(reference) not in steps:
            raise ValueError(
                f"Step {int(reference)} is not in the dataset. Expected one of {_options(steps)}"
            )
        return "step", int(reference)
    elif (
        isinstance(reference, tuple)
        and len(reference) == 2
        and reference[0] == "window"
        and isinstance(reference[1], (int, np.integer))
        and not isinstance(reference[1], bool)
    ):
        if reference[1] < 1:
            raise ValueError(f"A window needs k ≥ 1 records, got {reference!r}")
        return "window", int(reference[1])
    raise ValueError(
        f"Reference {reference!r} is not known. Expected 'previous', 'first', a recorded step "
        f"(int, one of {_options(steps)}) or ('window', k)"
    )


def _reference_label(kind: str, value: int) -> str:
    return {"previous": "previous", "first": "first", "step": f"step {value}"}.get(
        kind, f"window of {value} previous records"
    )


def _window_kernel(x: np.ndarray, k: int, how: str) -> np.ndarray:
    """``[..., S]``: for step t, the ``how`` of records t−k … t−1 (NaN for t < k)."""
    out = np.full(x.shape, np.nan)
    s = x.shape[-1]
    if s > k:
        win = np.lib.stride_tricks.sliding_window_view(x[..., : s - 1], k, axis=-1)
        with np.errstate(all="ignore"):
            red = getattr(win, how)(-1)  # mean, sum, max or min
        out[..., k:] = red
    return out


def _window_moments_kernel(m: np.ndarray, v: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the equal-weight mixture of records t−k … t−1 (NaN for t < k)."""
    mo, vo = np.full(m.shape, np.nan), np.full(m.shape, np.nan)
    s = m.shape[-1]
    if s > k:
        wm = np.lib.stride_tricks.sliding_window_view(m[..., : s - 1], k, axis=-1)
        wv = np.lib.stride_tricks.sliding_window_view(v[..., : s - 1], k, axis=-1)
        with np.errstate(all="ignore"):
            mm = wm.mean(-1)
            mo[..., k:] = mm
            vo[..., k:] = wv.mean(-1) + ((wm - mm[..., None]) ** 2).mean(-1)
    return mo, vo


def _apply(
    func: Callable[..., Any],
    *args: xr.DataArray,
    core: Sequence[Sequence[Hashable]],
    out_core: Sequence[Sequence[Hashable]] = ((),),
    sizes: dict[Hashable, int] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """``xr.apply_ufunc``, lazy on dask (one task per chunk), float64 outputs."""
    n_out = len(out_core)
    return xr.apply_ufunc(
        func,
        *args,
        input_core_dims=[list(c) for c in core],
        output_core_dims=[list(c) for c in out_core],
        kwargs=kwargs or {},
        dask="parallelized",
        output_dtypes=[np.float64] * n_out,
        dask_gufunc_kwargs={"allow_rechunk": True, "output_sizes": dict(sizes or {})},
        keep_attrs=False,
    )


def _ref(da: xr.DataArray, kind: str, value: int, how: str = "mean") -> xr.DataArray:
    """The reference of each step (aligned with ``da``'s steps, or without a step dim)."""
    if kind == "previous":
        return da.astype(np.float64).shift(step=1)
    if kind == "first":
        return da.isel(step=0, drop=True)
    if kind == "step":
        return da.sel(step=value, drop=True)
    out = _apply(
        _window_kernel,
        da.astype(np.float64),
        core=[["step"]],
        out_core=[["step"]],
        kwargs={"k": value, "how": how},
    )
    return out.transpose(*da.dims)


def _ref_moments(
    mean: xr.DataArray, var: xr.DataArray, kind: str, value: int
) -> tuple[xr.DataArray, xr.DataArray]:
    if kind != "window":
        return _ref(mean, kind, value), _ref(var, kind, value)
    m, v = _apply(
        _window_moments_kernel,
        mean.astype(np.float64),
        var.astype(np.float64),
        core=[["step"], ["step"]],
        out_core=[["step"], ["step"]],
        kwargs={"k": value},
    )
    return m.transpose(*mean.dims), v.transpose(*var.dims)


def _moment_vars(
    mp: xr.DataArray, vp: xr.DataArray, mq: xr.DataArray, vq: xr.DataArray
) -> dict[str, xr.DataArray]:
    def kernel(mp: Any, vp: Any, mq: Any, vq: Any) -> np.ndarray:
        bad, arrays = _split_bad(*(np.asarray(a, float)[..., None] for a in (mp, vp, mq, vq)))
        out = np.stack(_moment_kernel(*(a[..., 0] for a in arrays)), axis=-1)
        return np.where(bad[..., None], np.nan, out)

    res = _apply(kernel, mp, vp, mq, vq, core=[[]] * 4, out_core=[["_out"]], sizes={"_out": 3})
    return {name: res.isel(_out=i) for i, name in enumerate(_MOMENT_METRICS)}


def _divide_by_sigma(w: xr.DataArray, var_p: xr.DataArray) -> xr.DataArray:
    def kernel(w: Any, v: Any) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.asarray(w, float) / np.sqrt(np.asarray(v, float))

    return _apply(kernel, w, var_p, core=[[], []])


def _quantile_cap(ds: xr.Dataset) -> float:
    try:
        cap = json.loads(ds.attrs.get("recorder_config", "{}")).get("quantile_sample")
    except (TypeError, ValueError, AttributeError):
        cap = None
    return math.inf if cap is None else float(cap)


def _need(ds: xr.Dataset, names: Sequence[str]) -> list[str]:
    return [n for n in names if n not in ds.variables]


def _check_names(what: str, value: Any, valid: Sequence[str], many: bool = True) -> list[str]:
    """``value`` (a name, or several if ``many``) as a list; ValueError naming what is valid."""
    expected = f"Expected {'one or more' if many else 'one'} of {_options(valid)}"
    if isinstance(value, str):
        vals = [value]
    elif many and isinstance(value, Iterable):
        vals = list(value)
    else:
        raise ValueError(f"{what} {value!r} is not known. {expected}")
    if not vals:
        raise ValueError(f"{what} must name at least one of {_options(valid)}")
    for v in vals:
        if not isinstance(v, str) or v not in valid:
            raise ValueError(f"{what} {v!r} is not known. {expected}")
    return vals


def drift(
    ds: xr.Dataset,
    reference: str | int | tuple[str, int] = "previous",
    metrics: str | Sequence[str] | None = None,
    *,
    source: str = "probe",
    method: Literal["auto", "samples", "summary"] = "auto",
    eps: float = PSI_EPS,
) -> xr.Dataset:
    """Drift of every unit (and site) of a run between each record and a reference.

    Parameters
    ----------
    ds : xarray.Dataset
        A run dataset (DESIGN.md §3), in memory or dask-backed (``open_run(path, chunks=...)``;
        the result is then lazy too, nothing is read until ``.compute()``).
    reference : "previous", "first", int or ("window", k)
        Each record against the one before it (the first step is NaN), the first record, the
        record at that step, or the k records before it (pooled as in the module docstring;
        the first k steps are NaN).
    metrics : str or sequence of str, optional
        Among :data:`METRICS`; default all that the dataset allows.
    source : str
        Which activations (``"probe"`` or ``"train"``; a value of the ``source`` coordinate).
    method : {"auto", "samples", "summary"}
        ``"samples"``: exact metrics from the variable ``probe_sample`` (step, sample, unit),
        the probe values kept per unit (same positions every step); ``"summary"``: from
        ``mean``/``var``/``min``/``max``/``quantile_value``, with bounds; ``"auto"``: samples if
        the dataset has them (and ``source="probe"``), else summaries.
    eps : float
        PSI's probability floor.

    Returns
    -------
    xarray.Dataset
        One variable per metric with dims (step, unit) and the unit coordinates (``unit_site``,
        ``unit_index``), so ``groupby("unit_site")`` works; from summaries also the brackets
        ``w1_lo``, ``w1_hi``, ``w1_std_lo``, ``w1_std_hi``, ``ks_lo``, ``ks_hi`` (for the
        recorded values themselves when the dataset has ``count``, else for any distribution
        through the quantile grid; see the module docstring). When the
        dataset has ``hist``, the site-level ``hist_ks`` (+ ``_lo``, ``_hi``), ``hist_psi``,
        ``hist_js``, ``hist_hellinger`` with dims (step, site). Attributes say the reference,
        method and source.

    Raises
    ------
    ValueError
        For an unknown metric, source, method or reference, a step that is not recorded, or a
        dataset that lacks the variables a requested metric needs.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(4, 300, 2)) + np.arange(4)[:, None, None]  # [step, sample, unit]
    >>> run = xr.Dataset({"probe_sample": (("step", "sample", "unit"), x)},
    ...                  coords={"step": [0, 1, 2, 3], "unit_site": ("unit", ["a", "a"])})
    >>> d = drift(run, "first", ["mean_shift", "w1"])
    >>> d["w1"].dims, bool(abs(float(d["w1"].sel(step=3, unit=0)) - 3) < 0.3)
    (('step', 'unit'), True)
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
    if "step" not in ds.dims:
        raise ValueError("ds has no 'step' dimension: is it a run dataset (DESIGN.md §3)?")
    steps = _steps_list(ds)
    kind, value = _normalize_reference(reference, steps)
    requested = list(METRICS) if metrics is None else _check_names("Metric", metrics, METRICS)
    _check_names("Method", method, ("auto", "samples", "summary"), many=False)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if "source" in ds.dims:
        valid = [str(s) for s in np.asarray(ds["source"].values)]
        if source not in valid:
            raise ValueError(f"Source {source!r} is not known. Expected one of {_options(valid)}")
        ds = ds.sel(source=source)
    has_samples = "probe_sample" in ds.variables
    if method == "samples":
        if not has_samples:
            raise ValueError(
                "method='samples' needs the variable 'probe_sample' (step, sample, unit), which "
                "the dataset lacks; use method='summary' (or 'auto')"
            )
        if source != "probe":
            raise ValueError(
                f"method='samples' uses 'probe_sample', the probe's values; source={source!r} "
                "has none. Use source='probe' or method='summary'"
            )
    use_samples = method == "samples" or (method == "auto" and has_samples and source == "probe")

    out: dict[str, xr.DataArray] = {}
    missing: dict[str, list[str]] = {}
    if use_samples:
        _drift_samples(ds, kind, value, requested, eps, out)
    else:
        _drift_summary(ds, kind, value, requested, eps, out, missing)
    if "hist" in ds.variables:
        _drift_hist(ds, kind, value, requested, eps, out)
    else:
        for m in _HIST_METRICS:
            missing.setdefault(m, []).append("hist")
    if metrics is not None:
        for m in requested:
            if m not in out and f"hist_{m}" not in out:
                raise ValueError(
                    f"Metric {m!r} cannot be computed: the dataset lacks "
                    f"{sorted(set(missing.get(m, [])))} (method "
                    f"{'samples' if use_samples else 'summary'}). Present variables: "
                    f"{_options(sorted(str(v) for v in ds.data_vars))}"
                )
    if not out:
        raise ValueError(
            "No drift metric can be computed from this dataset: it needs 'mean'/'var', "
            "'quantile_value'/'min'/'max', 'hist' or 'probe_sample'. Present variables: "
            f"{_options(sorted(str(v) for v in ds.data_vars))}"
        )
    label = _reference_label(kind, value)
    for name, da in out.items():
        base = name.removeprefix("hist_").removesuffix("_lo").removesuffix("_hi")
        desc = _DESCRIPTIONS[base]
        if name.endswith("_lo"):
            desc = "lower bound of " + desc
        elif name.endswith("_hi"):
            desc = "upper bound of " + desc
        if name.startswith("hist_"):
            desc += " (site histogram)"
        da.attrs = {"long_name": desc}
    result = xr.Dataset(out)
    if "site" in ds.coords and "site" not in result.coords:
        result = result.assign_coords(site=ds["site"])  # site_aggregate's order of sites
    result.attrs = {
        "reference": label,
        "method": "samples" if use_samples else "summary",
        "source": source,
    }
    if not use_samples and "w1" in out:
        result.attrs["w1_estimate"] = _w1_estimate_note(ds)
    return result


def _w1_estimate_note(ds: xr.Dataset) -> str:
    """How the summary W1 estimate was made: tail-aware, or linear for a grid without tails."""
    levels = np.asarray(ds["quantile"].values, dtype=np.float64)
    u = np.concatenate([[0.0], levels[(levels > 0) & (levels < 1)], [1.0]])
    if has_tail_levels(u):
        return (
            "tail-aware: generalized Pareto tails beyond the outermost quantile levels "
            "(icstools.analysis.tails), linear interpolation between levels"
        )
    return (
        "linear interpolation between quantile levels up to min and max: this run has no "
        f"levels within {TAIL_LEVEL:g} of 0 and 1 (recorded before the tail levels became "
        "the default, or with custom quantiles), so heavy tails can inflate W1; record with "
        "the default quantiles for the tail-aware estimate. The brackets hold either way"
    )


def _dims_first(da: xr.DataArray, first: Sequence[str]) -> xr.DataArray:
    lead = [d for d in first if d in da.dims]
    return da.transpose(*lead, ...)


def _drift_samples(
    ds: xr.Dataset, kind: str, value: int, requested: list[str], eps: float, out: dict
) -> None:
    x = ds["probe_sample"]
    if "sample" not in x.dims or "unit" not in x.dims:
        raise ValueError(f"probe_sample must have dims (step, sample, unit), got {x.dims}")
    x = x.astype(np.float64)
    if "quantile" in ds.coords:
        q = np.asarray(ds["quantile"].values, dtype=np.float64)
        levels = q[(q > TAIL_LEVEL) & (q < 1 - TAIL_LEVEL)]  # the summary's bins, no tail levels
    else:
        levels = _DECILES
    if levels.size == 0:
        levels = _DECILES

    def moments(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(all="ignore"):
            m = s.mean(-1)
            return m, np.mean((s - m[..., None]) ** 2, axis=-1)

    mean, var = _apply(moments, x, core=[["sample"]], out_core=[[], []])
    mp, vp = _ref_moments(mean, var, kind, value)
    if any(m in requested for m in _MOMENT_METRICS):
        mom = _moment_vars(mp, vp, mean, var)
        for m in _MOMENT_METRICS:
            if m in requested:
                out[m] = _dims_first(mom[m], ("step", "unit"))
    if not any(m in requested for m in _SHAPE_METRICS):
        return
    if kind == "window":  # Wasserstein barycenter: average of the sorted samples
        srt = _apply(lambda s: np.sort(s, axis=-1), x, core=[["sample"]], out_core=[["sample"]])
        p = _ref(srt.transpose(*x.dims), kind, value)
    else:
        p = _ref(x, kind, value)
    p = p.rename(sample="_ref_sample")

    def kernel(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return _sample_kernel(p, q, levels, None, eps)

    res = _apply(
        kernel,
        p,
        x,
        core=[["_ref_sample"], ["sample"]],
        out_core=[["_out"]],
        sizes={"_out": len(_SAMPLE_OUT)},
    )
    for i, name in enumerate(_SAMPLE_OUT):
        if name in requested or (name == "w1" and "w1_std" in requested):
            da = _dims_first(res.isel(_out=i), ("step", "unit"))
            if name in requested:
                out[name] = da
            if name == "w1" and "w1_std" in requested:
                out["w1_std"] = _dims_first(_divide_by_sigma(da, vp), ("step", "unit"))


def _drift_summary(
    ds: xr.Dataset,
    kind: str,
    value: int,
    requested: list[str],
    eps: float,
    out: dict,
    missing: dict[str, list[str]],
) -> None:
    have_moments = not _need(ds, ("mean", "var"))
    if have_moments:
        mean, var = ds["mean"], ds["var"]
        mp, vp = _ref_moments(mean, var, kind, value)
        if any(m in requested for m in _MOMENT_METRICS):
            mom = _moment_vars(mp, vp, mean.astype(np.float64), var.astype(np.float64))
            for m in _MOMENT_METRICS:
                if m in requested:
                    out[m] = _dims_first(mom[m], ("step", "unit"))
    else:
        for m in (*_MOMENT_METRICS, "w1_std"):
            missing[m] = _need(ds, ("mean", "var"))
    shape_req = [m for m in _SHAPE_METRICS if m in requested]
    if not shape_req:
        return
    lack = _need(ds, ("quantile_value", "min", "max"))
    levels = (
        np.asarray(ds["quantile"].values, dtype=np.float64) if "quantile" in ds.coords else None
    )
    if not lack and (levels is None or not np.any((levels > 0) & (levels < 1))):
        lack = ["quantile (levels strictly between 0 and 1)"]
    if lack:
        for m in shape_req:
            missing.setdefault(m, []).extend(lack)
        return
    inner = levels[(levels > 0) & (levels < 1)]
    u = np.concatenate([[0.0], inner, [1.0]])
    qv = ds["quantile_value"].sel(quantile=inner).astype(np.float64)
    grid = xr.concat(
        [
            ds["min"].astype(np.float64).expand_dims(quantile=[0.0]),
            qv,
            ds["max"].astype(np.float64).expand_dims(quantile=[1.0]),
        ],
        dim="quantile",
        coords="minimal",
        compat="override",
        join="override",
    ).transpose(..., "quantile")
    if "count" in ds.variables:
        n = np.minimum(ds["count"].astype(np.float64), _quantile_cap(ds))
        ew = _apply(
            _eps_w1,
            ds["min"].astype(np.float64),
            ds["max"].astype(np.float64),
            n,
            core=[[], [], []],
        )
        ek = _apply(_eps_ks, n, core=[[]])
        n_q = n
    else:
        ew = ek = xr.zeros_like(ds["min"], dtype=np.float64)
        n_q = xr.full_like(ds["min"], np.nan, dtype=np.float64)
    n_p = _ref(n_q, kind, value, "mean")
    gp = _ref(grid.transpose("step", ...), kind, value).transpose(..., "quantile")
    ew_p = _ref(ew, kind, value, "mean")
    ek_p = _ref(ek, kind, value, "max")

    def kernel(a: np.ndarray, b: np.ndarray, *e: np.ndarray) -> np.ndarray:
        return _quantile_kernel(u, a, b, *e, eps)

    if have_moments and "count" in ds.variables:
        # |μQ − μP| bounds W1 below when the means are of the values the grids come from
        def abs_diff(mp: Any, mq: Any, ok_p: Any, ok_q: Any) -> np.ndarray:
            with np.errstate(all="ignore"):
                d = np.abs(np.asarray(mq, float) - np.asarray(mp, float))
            return np.where((np.asarray(ok_p) == 1) & (np.asarray(ok_q) == 1), d, np.nan)

        exact = (ds["count"] <= _quantile_cap(ds)).astype(np.float64)
        dmu = _apply(
            abs_diff,
            mp,
            mean.astype(np.float64),
            _ref(exact, kind, value, "min"),
            exact,
            core=[[], [], [], []],
        )
    else:
        dmu = xr.full_like(ds["min"], np.nan, dtype=np.float64)

    res = _apply(
        kernel,
        gp.rename(quantile="_level"),
        grid.rename(quantile="_level"),
        ew_p,
        ew,
        ek_p,
        ek,
        dmu,
        n_p,
        n_q,
        core=[["_level"], ["_level"], [], [], [], [], [], [], []],
        out_core=[["_out"]],
        sizes={"_out": len(_QUANTILE_OUT)},
    ).drop_vars("_level", errors="ignore")
    for i, name in enumerate(_QUANTILE_OUT):
        base = name.removesuffix("_lo").removesuffix("_hi")
        da = _dims_first(res.isel(_out=i), ("step", "unit"))
        if base in requested:
            out[name] = da
        if base == "w1" and "w1_std" in requested and have_moments:
            out[name.replace("w1", "w1_std")] = _dims_first(
                _divide_by_sigma(da, vp), ("step", "unit")
            )


def _drift_hist(
    ds: xr.Dataset, kind: str, value: int, requested: list[str], eps: float, out: dict
) -> None:
    if not any(m in requested for m in _HIST_METRICS):
        return
    h = ds["hist"].astype(np.float64)
    if "bin" not in h.dims:
        raise ValueError(f"hist must have a 'bin' dimension, got {h.dims}")
    hp = _ref(h.transpose("step", ...), kind, value, "sum").transpose(..., "bin")
    res = _apply(
        lambda a, b: _hist_kernel(a, b, eps),
        hp.rename(bin="_bin"),
        h.transpose(..., "bin").rename(bin="_bin"),
        core=[["_bin"], ["_bin"]],
        out_core=[["_out"]],
        sizes={"_out": len(_HIST_OUT)},
    )
    for i, name in enumerate(_HIST_OUT):
        if name.removesuffix("_lo").removesuffix("_hi") in requested:
            out[f"hist_{name}"] = _dims_first(res.isel(_out=i), ("step", "site"))


# ============================================================================================
# Aggregates and flags
# ============================================================================================


def _site_labels(ds: xr.Dataset) -> tuple[np.ndarray, xr.DataArray]:
    """The sites (in memory) and the ``unit_site`` labels as a bare (possibly lazy) array.

    The sites are the ``site`` coordinate (an index, so in memory) when present; otherwise the
    distinct ``unit_site`` values, which reads that coordinate.
    """
    if "unit_site" not in ds.coords and "unit_site" not in ds.variables:
        raise ValueError(
            "The dataset has no 'unit_site' coordinate: cannot tell which site each unit belongs to"
        )
    labels = xr.DataArray(ds["unit_site"].data, dims=ds["unit_site"].dims)
    if labels.dims != ("unit",):
        raise ValueError(f"unit_site must have the dim ('unit',), got {labels.dims}")
    if "site" in ds.coords:
        sites = np.asarray(ds["site"].values).astype(str)
        if isinstance(labels.data, np.ndarray):  # checked when it costs nothing
            unknown = sorted(set(labels.values.astype(str)) - set(sites))
            if unknown:
                raise ValueError(
                    f"unit_site holds sites {unknown} that are not in the 'site' coordinate "
                    f"{_options(sites)}"
                )
    else:
        sites = np.asarray(pd.unique(pd.Series(np.asarray(labels.values).astype(str))))
    return sites.astype(str), labels


def _codes(labels: np.ndarray, sites: np.ndarray) -> np.ndarray:
    """Index of each unit's site in ``sites`` (−1: none)."""
    index = {s: i for i, s in enumerate(sites)}
    return np.array([index.get(str(s), -1) for s in np.asarray(labels).ravel()], dtype=np.int64)


def _reduce(v: np.ndarray, how: str) -> np.ndarray:
    """NaN-skipping reduction over the last axis without numpy warnings (all-NaN → NaN)."""
    valid = ~np.isnan(v)
    k = valid.sum(-1)
    with np.errstate(all="ignore"):
        if how == "mean":
            r = np.where(valid, v, 0.0).sum(-1) / k
        elif how == "max":
            r = np.where(valid, v, -np.inf).max(-1, initial=-np.inf)
        elif how == "min":
            r = np.where(valid, v, np.inf).min(-1, initial=np.inf)
        else:  # median: NaN sorts last
            srt = np.sort(v, axis=-1)
            lo = np.clip((k - 1) // 2, 0, None)[..., None]
            hi = np.clip(k // 2, 0, None)[..., None]
            if srt.shape[-1] == 0:
                r = np.full(k.shape, np.nan)
            else:
                lo, hi = np.minimum(lo, srt.shape[-1] - 1), np.minimum(hi, srt.shape[-1] - 1)
                r = (np.take_along_axis(srt, lo, -1) + np.take_along_axis(srt, hi, -1))[..., 0] / 2
    return np.where(k > 0, r, np.nan)


def _group_kernel(x: np.ndarray, labels: np.ndarray, sites: np.ndarray, how: str) -> np.ndarray:
    """``[..., unit]`` → ``[..., site]``."""
    codes = _codes(labels, sites)
    out = np.full((*x.shape[:-1], len(sites)), np.nan)
    for g in range(len(sites)):
        out[..., g] = _reduce(x[..., codes == g], how)
    return out


def site_aggregate(drift_ds: xr.Dataset, how: str | Sequence[str] = "mean") -> xr.Dataset:
    """Aggregate the units of each site: mean, median, max or min over units, per step.

    NaN units are skipped (a site whose units are all NaN gives NaN); ±inf count. Applied to the
    brackets (``w1_lo``, ``w1_hi``, …) it gives brackets of the aggregate, as all four are
    monotone. Variables that are already per site (``hist_*``) are kept as they are.

    Parameters
    ----------
    drift_ds : xarray.Dataset
        The result of :func:`drift` (variables with a ``unit`` dim and a ``unit_site``
        coordinate). Works lazily on dask-backed datasets.
    how : {"mean", "median", "max", "min"} or a sequence of them
        One aggregate (dims (step, site)), or several along a new ``how`` dim.

    Returns
    -------
    xarray.Dataset
        The same variables with ``unit`` replaced by ``site``.

    Examples
    --------
    >>> d = xr.Dataset({"w1": (("step", "unit"), [[1.0, 3.0, 5.0]])},
    ...                coords={"unit_site": ("unit", ["a", "a", "b"])})
    >>> site_aggregate(d, "max")["w1"].values.tolist()
    [[3.0, 5.0]]
    """
    if not isinstance(drift_ds, xr.Dataset):
        raise TypeError(f"drift_ds must be an xarray.Dataset, got {type(drift_ds).__name__}")
    hows = _check_names("Aggregate", how, _HOWS)
    sites, labels = _site_labels(drift_ds)
    results = []
    for h in hows:
        data = {}
        for name, da in drift_ds.data_vars.items():
            if "unit" not in da.dims:
                data[name] = da
                continue
            plain = da.drop_vars([c for c in da.coords if "unit" in da[c].dims])
            red = _apply(
                _group_kernel,
                plain,
                labels,
                core=[["unit"], ["unit"]],
                out_core=[["site"]],
                sizes={"site": len(sites)},
                kwargs={"sites": sites, "how": h},
            ).assign_coords(site=sites)
            red.attrs = {**da.attrs, "aggregate": f"{h} over the units of each site"}
            data[name] = _dims_first(red, ("step", "site"))
        results.append(xr.Dataset(data, attrs=dict(drift_ds.attrs)))
    if isinstance(how, str):
        return results[0]
    out = xr.concat(
        results, dim="how", data_vars="all", coords="minimal", compat="override", join="override"
    )
    return out.assign_coords(how=np.array(hows, dtype=str))


def _mean_std_kernel(x: np.ndarray, n_sigma: float) -> np.ndarray:
    """``[..., n]`` → ``[..., 2]``: mean ∓ n_sigma · std (ddof=1) of the finite values."""
    valid = np.isfinite(x)
    k = valid.sum(-1)
    with np.errstate(all="ignore"):
        m = np.where(valid, x, 0.0).sum(-1) / k
        dev = np.where(valid, x - m[..., None], 0.0)
        s = np.sqrt((dev * dev).sum(-1) / (k - 1))
    m = np.where(k >= 2, m, np.nan)
    s = np.where(k >= 2, s, np.nan)
    return np.stack([m - n_sigma * s, m + n_sigma * s], axis=-1)


def _site_mean_std_kernel(
    x: np.ndarray, labels: np.ndarray, sites: np.ndarray, n_sigma: float
) -> np.ndarray:
    """``[..., step, unit]`` → ``[..., site, 2]`` pooling steps and the units of each site."""
    codes = _codes(labels, sites)
    out = np.full((*x.shape[:-2], len(sites), 2), np.nan)
    for g in range(len(sites)):
        v = x[..., codes == g]
        out[..., g, :] = _mean_std_kernel(v.reshape(*v.shape[:-2], -1), n_sigma)
    return out


def drift_thresholds(
    drift_ds: xr.Dataset,
    reference_steps: slice | Sequence[int] | np.ndarray,
    *,
    n_sigma: float = 3.0,
    per: Literal["unit", "site"] = "unit",
) -> xr.Dataset:
    """Thresholds mean ± n_sigma·σ of each drift variable over reference records (NannyML).

    Parameters
    ----------
    drift_ds : xarray.Dataset
        The result of :func:`drift` or :func:`site_aggregate` (variables with a ``step`` dim).
    reference_steps : slice or sequence of int
        The records of the reference window: a label slice (``slice(1, 50)``, inclusive) or the
        steps. Use records without drift; with ``reference="previous"`` the first step is NaN
        and skipped.
    n_sigma : float
        Width in standard deviations (ddof=1) of the metric over the reference records.
    per : {"unit", "site"}
        ``"unit"``: one threshold per unit (per site for site-level variables), from that unit's
        values over the reference steps; ``"site"``: pooled over the reference steps and all
        units of a site (more values, so a steadier σ; units of a site must behave alike).

    Returns
    -------
    xarray.Dataset
        For each variable, its thresholds with a ``limit`` dim (``"lower"``, ``"upper"``) and
        ``unit`` or ``site``. Distances get lower = −inf (flagged above only); ``mean_shift``
        and ``log_var_ratio`` both. Non-finite reference values are ignored; fewer than 2 finite
        ones give NaN thresholds (never flagged).

    Examples
    --------
    >>> d = xr.Dataset({"w1": (("step", "unit"), [[0.1], [0.2], [0.1], [0.2], [1.0]])},
    ...                coords={"step": [0, 1, 2, 3, 4]})
    >>> thr = drift_thresholds(d, slice(0, 3))
    >>> flag_drift(d, thr)["w1"].values.ravel().tolist()
    [False, False, False, False, True]
    """
    if not isinstance(drift_ds, xr.Dataset):
        raise TypeError(f"drift_ds must be an xarray.Dataset, got {type(drift_ds).__name__}")
    if "step" not in drift_ds.dims:
        raise ValueError("drift_ds has no 'step' dimension")
    _check_names("per", per, ("unit", "site"), many=False)
    if not (isinstance(n_sigma, (int, float, np.number)) and n_sigma >= 0):
        raise ValueError(f"n_sigma must be a number ≥ 0, got {n_sigma!r}")
    steps = _steps_list(drift_ds)
    if isinstance(reference_steps, slice):
        ref = drift_ds.sel(step=reference_steps)
    elif isinstance(reference_steps, (str, bytes)) or not isinstance(
        reference_steps, (Sequence, np.ndarray, pd.Index, xr.DataArray)
    ):
        raise TypeError(
            "reference_steps must be a slice of steps or a sequence of steps, got "
            f"{reference_steps!r}"
        )
    else:
        wanted = [int(s) for s in np.asarray(reference_steps).ravel()]
        absent = [s for s in wanted if s not in steps]
        if absent:
            raise ValueError(
                f"Steps {absent} are not in the dataset. Expected steps among {_options(steps)}"
            )
        ref = drift_ds.sel(step=wanted)
    if ref.sizes["step"] < 2:
        raise ValueError(
            f"reference_steps selects {ref.sizes['step']} record(s); thresholds need at least 2"
        )
    sites = labels = None
    if per == "site" and any("unit" in da.dims for da in ref.data_vars.values()):
        sites, labels = _site_labels(ref)
    data = {}
    for name, da in ref.data_vars.items():
        if "step" not in da.dims:
            continue
        if per == "site" and "unit" in da.dims:
            plain = da.drop_vars([c for c in da.coords if "unit" in da[c].dims])
            thr = _apply(
                _site_mean_std_kernel,
                plain.drop_vars("step", errors="ignore"),
                labels,
                core=[["step", "unit"], ["unit"]],
                out_core=[["site", "limit"]],
                sizes={"site": len(sites), "limit": 2},
                kwargs={"sites": sites, "n_sigma": float(n_sigma)},
            ).assign_coords(site=sites)
        else:
            thr = _apply(
                _mean_std_kernel,
                da.drop_vars("step", errors="ignore"),
                core=[["step"]],
                out_core=[["limit"]],
                sizes={"limit": 2},
                kwargs={"n_sigma": float(n_sigma)},
            )
        thr = thr.assign_coords(limit=["lower", "upper"])
        base = str(name).removeprefix("hist_").removesuffix("_lo").removesuffix("_hi")
        if base not in SIGNED_METRICS:
            thr = xr.where(thr["limit"] == "lower", -np.inf, thr).transpose(*thr.dims)
        thr.attrs = {"long_name": f"drift threshold of {name}: mean ± {n_sigma} sd"}
        data[name] = thr
    if not data:
        raise ValueError("drift_ds has no variable with a 'step' dimension")
    return xr.Dataset(
        data,
        attrs={
            "n_sigma": float(n_sigma),
            "per": per,
            "reference_steps": json.dumps(_steps_list(ref)),
        },
    )


def flag_drift(drift_ds: xr.Dataset, thresholds: xr.Dataset) -> xr.Dataset:
    """Flag drift: True where a metric is above its upper or below its lower threshold.

    Parameters
    ----------
    drift_ds : xarray.Dataset
        Drift values (:func:`drift` or :func:`site_aggregate`).
    thresholds : xarray.Dataset
        From :func:`drift_thresholds` (per unit, or per site: then mapped to units through
        ``unit_site``).

    Returns
    -------
    xarray.Dataset
        Booleans, one variable per variable of ``thresholds``; NaN values are never flagged.
        Lazy if ``drift_ds`` is.

    Examples
    --------
    >>> d = xr.Dataset({"ks": (("step", "unit"), [[0.1, 0.1], [0.1, 0.1], [0.1, 0.9]])},
    ...                coords={"step": [0, 1, 2]})
    >>> thr = drift_thresholds(d, [0, 1])
    >>> flag_drift(d, thr)["ks"].sel(step=2).values.tolist()
    [False, True]
    """
    if not isinstance(drift_ds, xr.Dataset) or not isinstance(thresholds, xr.Dataset):
        raise TypeError("drift_ds and thresholds must be xarray.Datasets")
    flags = {}
    for name, thr in thresholds.data_vars.items():
        if name not in drift_ds.data_vars:
            raise ValueError(
                f"Variable {name!r} of thresholds is not in drift_ds. Expected one of "
                f"{_options(list(drift_ds.data_vars))}"
            )
        if "limit" not in thr.dims:
            raise ValueError(f"thresholds[{name!r}] has no 'limit' dimension")
        val = drift_ds[name]
        if "site" in thr.dims and "unit" in val.dims and "site" not in val.dims:
            _, labels = _site_labels(drift_ds)
            thr_sites = np.asarray(thr["site"].values).astype(str)

            def to_units(t: np.ndarray, lab: np.ndarray, ts: np.ndarray = thr_sites) -> Any:
                codes = _codes(lab, ts)  # [unit]
                return np.where(codes >= 0, np.take(t, codes, axis=-1), np.nan)

            thr = _apply(
                to_units,
                thr.drop_vars([c for c in thr.coords if c != "limit"]),
                labels,
                core=[["site"], ["unit"]],
                out_core=[["unit"]],
                sizes={"unit": val.sizes["unit"]},
            )
            if "unit" in val.coords:
                thr = thr.assign_coords(unit=val["unit"].values)
        lower, upper = thr.sel(limit="lower", drop=True), thr.sel(limit="upper", drop=True)
        flag = (val > upper) | (val < lower)
        flag.attrs = {"long_name": f"drift of {name} beyond its thresholds"}
        flags[name] = flag
    return xr.Dataset(flags, attrs=dict(thresholds.attrs))

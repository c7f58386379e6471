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
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import xarray as xr

from icstools.analysis.drift_arrays import (
    _DECILES,
    _DESCRIPTIONS,
    _HIST_METRICS,
    _HIST_OUT,
    _MOMENT_METRICS,
    _QUANTILE_OUT,
    _SAMPLE_OUT,
    _SHAPE_METRICS,
    METRICS,
    PSI_EPS,
    SIGNED_METRICS,
    _apply,
    _check_names,
    _dims_first,
    _eps_ks,
    _eps_w1,
    _options,
    _steps_list,
    gauss_kl,
    hellinger,
    hist_drift,
    js,
    ks,
    log_var_ratio,
    mean_shift,
    moment_drift,
    psi,
    quantile_drift,
    w1,
    w1_std,
)
from icstools.analysis.drift_flags import drift_thresholds, flag_drift, site_aggregate
from icstools.analysis.drift_kernels import (
    _hist_kernel,
    _moment_kernel,
    _quantile_kernel,
    _sample_kernel,
    _split_bad,
)
from icstools.analysis.tails import TAIL_LEVEL, has_tail_levels

__all__ = [
    "METRICS",
    "PSI_EPS",
    "SIGNED_METRICS",
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

# ============================================================================================
# Dataset level
# ============================================================================================


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
    return _drift_result(ds, out, _reference_label(kind, value), use_samples, source)


def _drift_result(
    ds: xr.Dataset, out: dict, label: str, use_samples: bool, source: Any
) -> xr.Dataset:
    """The metrics of ``out`` as a dataset: each variable described, the sites in the run's
    order, the reference and the method in the attributes."""
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
    moments = _summary_moments(ds, kind, value, requested, out, missing)
    shape_req = [m for m in _SHAPE_METRICS if m in requested]
    if not shape_req:
        return
    found = _quantile_grid(ds, shape_req, missing)
    if found is None:
        return
    u, grid = found  # levels [G] with 0 and 1; grid [..., quantile]: min, quantiles, max
    ew, ek, n_q = _grid_radii(ds)
    n_p = _ref(n_q, kind, value, "mean")
    gp = _ref(grid.transpose("step", ...), kind, value).transpose(..., "quantile")
    ew_p = _ref(ew, kind, value, "mean")
    ek_p = _ref(ek, kind, value, "max")

    def kernel(a: np.ndarray, b: np.ndarray, *e: np.ndarray) -> np.ndarray:
        return _quantile_kernel(u, a, b, *e, eps)

    if moments is not None and "count" in ds.variables:
        dmu = _mean_gap(ds, moments[0], kind, value)
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
        if base == "w1" and "w1_std" in requested and moments is not None:
            out[name.replace("w1", "w1_std")] = _dims_first(
                _divide_by_sigma(da, moments[1]), ("step", "unit")
            )


def _summary_moments(
    ds: xr.Dataset,
    kind: str,
    value: int,
    requested: list[str],
    out: dict,
    missing: dict[str, list[str]],
) -> tuple[xr.DataArray, xr.DataArray] | None:
    """The moment metrics requested into ``out``; returns the reference's mean and variance
    (``None``, and the metrics that need them marked missing, without ``mean`` and ``var``)."""
    if _need(ds, ("mean", "var")):
        for m in (*_MOMENT_METRICS, "w1_std"):
            missing[m] = _need(ds, ("mean", "var"))
        return None
    mean, var = ds["mean"], ds["var"]
    mp, vp = _ref_moments(mean, var, kind, value)
    if any(m in requested for m in _MOMENT_METRICS):
        mom = _moment_vars(mp, vp, mean.astype(np.float64), var.astype(np.float64))
        for m in _MOMENT_METRICS:
            if m in requested:
                out[m] = _dims_first(mom[m], ("step", "unit"))
    return mp, vp


def _quantile_grid(
    ds: xr.Dataset, shape_req: list[str], missing: dict[str, list[str]]
) -> tuple[np.ndarray, xr.DataArray] | None:
    """The levels ``[G]`` (0, the stored levels strictly inside (0, 1), 1) and each unit's
    grid of values at them (min, quantile values, max; ``quantile`` last); ``None``, and the
    shape metrics marked missing, when the summaries are not there."""
    lack = _need(ds, ("quantile_value", "min", "max"))
    levels = (
        np.asarray(ds["quantile"].values, dtype=np.float64) if "quantile" in ds.coords else None
    )
    if not lack and (levels is None or not np.any((levels > 0) & (levels < 1))):
        lack = ["quantile (levels strictly between 0 and 1)"]
    if lack:
        for m in shape_req:
            missing.setdefault(m, []).extend(lack)
        return None
    inner = levels[(levels > 0) & (levels < 1)]  # type: ignore[index]
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
    return u, grid


def _grid_radii(ds: xr.Dataset) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """The W1 and KS error radii of each grid, and the values it was taken from (capped at
    the quantile sample; NaN, radii 0, without ``count``)."""
    if "count" not in ds.variables:
        zero = xr.zeros_like(ds["min"], dtype=np.float64)
        return zero, zero, xr.full_like(ds["min"], np.nan, dtype=np.float64)
    n = np.minimum(ds["count"].astype(np.float64), _quantile_cap(ds))
    ew = _apply(
        _eps_w1,
        ds["min"].astype(np.float64),
        ds["max"].astype(np.float64),
        n,
        core=[[], [], []],
    )
    return ew, _apply(_eps_ks, n, core=[[]]), n


def _mean_gap(ds: xr.Dataset, mp: xr.DataArray, kind: str, value: int) -> xr.DataArray:
    """``|μQ − μP|``, a lower bound of W1 where both means are of the values the grids come
    from (every value kept: count within the quantile sample), NaN elsewhere."""

    def abs_diff(mp: Any, mq: Any, ok_p: Any, ok_q: Any) -> np.ndarray:
        with np.errstate(all="ignore"):
            d = np.abs(np.asarray(mq, float) - np.asarray(mp, float))
        return np.where((np.asarray(ok_p) == 1) & (np.asarray(ok_q) == 1), d, np.nan)

    exact = (ds["count"] <= _quantile_cap(ds)).astype(np.float64)
    return _apply(
        abs_diff,
        mp,
        ds["mean"].astype(np.float64),
        _ref(exact, kind, value, "min"),
        exact,
        core=[[], [], [], []],
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

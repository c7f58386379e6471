"""Drift metrics on arrays: the public functions on samples and summaries (their numpy kernels
are in :mod:`icstools.analysis.drift_kernels`).

The definitions, the brackets of the summary estimates and their measured tightness are in
:mod:`icstools.analysis.drift` (which re-exports every public name here); this module holds the
array-level code, :mod:`icstools.analysis.drift` the dataset level (:func:`drift`) and
:mod:`icstools.analysis.drift_flags` the site aggregates and the flags.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from icstools.analysis.drift_kernels import (
    _hist_kernel,
    _moment_kernel,
    _quantile_kernel,
    _sample_kernel,
    _split_bad,
    _w1_ks_kernel,
)

__all__ = [
    "METRICS",
    "PSI_EPS",
    "SIGNED_METRICS",
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
# xarray helpers shared by the dataset-level functions (drift, aggregates and flags)
# ============================================================================================


def _options(valid: Iterable[Any]) -> str:
    vals = list(valid)
    if len(vals) > 12:
        return "[" + ", ".join(repr(v) for v in vals[:6]) + ", …, " + repr(vals[-1]) + "]"
    return "[" + ", ".join(repr(v) for v in vals) + "]"


def _steps_list(ds: xr.Dataset | xr.DataArray) -> list[int]:
    return [int(s) for s in np.asarray(ds["step"].values)]


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


def _dims_first(da: xr.DataArray, first: Sequence[str]) -> xr.DataArray:
    lead = [d for d in first if d in da.dims]
    return da.transpose(*lead, ...)

"""Closed-form confidence intervals over seeds: Welch's t, paired t and Fieller's ratio interval.

These are the intervals :func:`icstools.analysis.compare.compare` uses by default
(``ci_method="t"``) and that the report's verdicts read. Every function works on many rows at
once: ``c`` is ``(rows, n_c)`` (the condition's per-seed values, one row per site or per
simulated repetition), ``r`` is ``(rows, n_r)`` (the reference's), all finite, ``n >= 2``.

Why these and not the bootstrap
-------------------------------
With 3–10 seeds a bootstrap has almost nothing to resample: with 3 seeds, 1 resample in 9 draws
one seed three times and has no spread, so the studentized bootstrap's t distribution gets
enormous tails and its interval can be wider than the metric's range; percentile and BCa
intervals use the plug-in variance and normal quantiles and are too narrow. The t-based
intervals below use the exact small-sample t quantiles instead. Their coverage is measured by
simulation (:mod:`icstools.analysis.calibration`, ``tests/test_intervals.py``,
``bench/interval_calibration.py``) at 3, 5 and 10 seeds per group on normal, skewed (lognormal)
and heavy-tailed (Student t, 3 degrees of freedom) seed distributions.

- **Difference of means, independent seeds: Welch's t.** ``d = mean(c) - mean(r)``,
  ``se = sqrt(s_c²/n_c + s_r²/n_r)``, degrees of freedom by Welch–Satterthwaite; the interval
  is ``d ± t_{df, 1-α/2} se``. Exact for normal seeds with equal variances up to the df
  approximation, which errs on the wide side with 3 seeds.
- **Difference of means, paired seeds: paired t.** The one-sample t interval of the per-pair
  differences, ``n - 1`` degrees of freedom.
- **Ratio of means: Fieller's interval.** The set of ratios ``ρ`` for which
  ``mean(c) - ρ mean(r)`` is not significantly different from 0 by a t test:
  ``(a - ρ b)² <= t² (v_c - 2ρ v_cr + ρ² v_r)`` with ``a, b`` the means, ``v`` the variances of
  the means (``v_cr = 0`` for independent seeds, the covariance of the pair means when
  paired), and ``t`` the t quantile with the Welch–Satterthwaite df of ``v_c + ρ̂² v_r``
  (independent) or ``n - 1`` (paired). It is exact for normal seeds (paired) and does not
  assume the ratio's estimate is normal, which it is not when the reference mean is uncertain.
  When the reference mean is itself not significantly different from 0 at the same level
  (``b² <= t² v_r``), the set is unbounded (the whole line or the outside of an interval):
  the interval is reported as ``[-inf, inf]`` and flagged, since no finite interval covers.

Rows without any spread (every seed of both groups equal) get the point as their interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.stats

__all__ = [
    "INTERVAL_METHODS",
    "fieller_interval",
    "paired_t_interval",
    "t_intervals",
    "welch_interval",
]

#: Names of the closed-form intervals (the ``diff_method``/``ratio_method`` columns of compare).
INTERVAL_METHODS: dict[str, str] = {
    "welch-t": "Welch's t interval (Welch–Satterthwaite degrees of freedom)",
    "paired-t": "paired t interval of the per-seed differences (n − 1 degrees of freedom)",
    "fieller": "Fieller's interval of the ratio of means (Welch–Satterthwaite degrees of freedom)",
    "paired-fieller": "Fieller's interval of the ratio of paired means (n − 1 degrees of freedom)",
}


def _check(c: Any, r: Any, paired: bool) -> tuple[np.ndarray, np.ndarray]:
    c = np.atleast_2d(np.asarray(c, dtype=np.float64))
    r = np.atleast_2d(np.asarray(r, dtype=np.float64))
    if c.shape[0] != r.shape[0]:
        raise ValueError(f"c and r need the same number of rows, got {c.shape} and {r.shape}")
    if min(c.shape[1], r.shape[1]) < 2:
        raise ValueError(f"need at least 2 values per group, got {c.shape[1]} and {r.shape[1]}")
    if paired and c.shape != r.shape:
        raise ValueError(f"paired values need the same shape, got {c.shape} and {r.shape}")
    return c, r


def _t_quantile(confidence_level: float, df: np.ndarray) -> np.ndarray:
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level={confidence_level!r} is not in (0, 1)")
    return scipy.stats.t.ppf(0.5 + confidence_level / 2, df)


def _welch_df(vc: np.ndarray, vr: np.ndarray, nc: int, nr: int) -> np.ndarray:
    """Welch–Satterthwaite degrees of freedom of ``vc + vr`` (variances of two means)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (vc + vr) ** 2 / (vc**2 / (nc - 1) + vr**2 / (nr - 1))
    # 0/0 (no spread anywhere): any df; the interval is the point anyway
    return np.where(np.isfinite(df), df, float(min(nc, nr) - 1))


def welch_interval(c: Any, r: Any, confidence_level: float = 0.95) -> tuple[np.ndarray, ...]:
    """Welch's t interval of ``mean(c) - mean(r)`` per row (independent seeds).

    Parameters
    ----------
    c, r : array_like, (rows, n_c) and (rows, n_r)
        Finite per-seed values of the condition and of the reference, at least 2 each.
    confidence_level : float
        E.g. 0.95.

    Returns
    -------
    lo, hi : numpy.ndarray (rows,)

    Examples
    --------
    >>> lo, hi = welch_interval([[0.48, 0.42, 0.52]], [[0.023, 0.022, 0.024]])
    >>> round(float(lo[0]), 3), round(float(hi[0]), 3)
    (0.325, 0.575)
    """
    c, r = _check(c, r, paired=False)
    scale = _pow2_scale(np.concatenate([c, r], axis=1))[:, None]
    c, r = c / scale, r / scale
    nc, nr = c.shape[1], r.shape[1]
    vc = np.var(c, axis=1, ddof=1) / nc
    vr = np.var(r, axis=1, ddof=1) / nr
    se = np.sqrt(vc + vr)
    t = _t_quantile(confidence_level, _welch_df(vc, vr, nc, nr))
    d = c.mean(axis=1) - r.mean(axis=1)
    s = scale[:, 0]
    return (d - t * se) * s, (d + t * se) * s


def paired_t_interval(c: Any, r: Any, confidence_level: float = 0.95) -> tuple[np.ndarray, ...]:
    """Paired t interval of ``mean(c - r)`` per row (column k of ``c`` and ``r`` is pair k).

    Examples
    --------
    >>> lo, hi = paired_t_interval([[2.0, 3.1, 4.2]], [[1.0, 2.0, 3.0]])
    >>> bool(lo[0] < 1.1 < hi[0])
    True
    """
    c, r = _check(c, r, paired=True)
    scale = _pow2_scale(np.concatenate([c, r], axis=1))[:, None]
    d = (c - r) / scale
    n = d.shape[1]
    se = np.std(d, axis=1, ddof=1) / np.sqrt(n)
    t = _t_quantile(confidence_level, np.full(d.shape[0], float(n - 1)))
    m = d.mean(axis=1)
    s = scale[:, 0]
    return (m - t * se) * s, (m + t * se) * s


def fieller_interval(
    c: Any, r: Any, confidence_level: float = 0.95, *, paired: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fieller's interval of ``mean(c) / mean(r)`` per row.

    Returns
    -------
    lo, hi : numpy.ndarray (rows,)
        ``[-inf, inf]`` where the set is unbounded.
    bounded : numpy.ndarray of bool (rows,)
        False where the reference mean is not significantly different from 0 at this level
        (the confidence set is then the whole line or the outside of an interval).

    Examples
    --------
    >>> lo, hi, ok = fieller_interval([[4.1, 3.8, 4.3, 3.9]], [[2.0, 2.1, 1.9, 2.2]])
    >>> bool(ok[0]), bool(lo[0] < 1.98 < hi[0])
    (True, True)
    """
    c, r = _check(c, r, paired=paired)
    scale = _pow2_scale(np.concatenate([c, r], axis=1))[:, None]
    c, r = c / scale, r / scale  # the ratio is scale-free
    nc, nr = c.shape[1], r.shape[1]
    a, b = c.mean(axis=1), r.mean(axis=1)
    vc = np.var(c, axis=1, ddof=1) / nc
    vr = np.var(r, axis=1, ddof=1) / nr
    with np.errstate(divide="ignore", invalid="ignore"):
        est = a / b
    if paired:
        vcr = np.sum((c - a[:, None]) * (r - b[:, None]), axis=1) / (nc - 1) / nc
        df = np.full(a.shape, float(nc - 1))
    else:
        vcr = np.zeros_like(a)
        est_f = np.where(np.isfinite(est), est, 0.0)
        df = _welch_df(vc, est_f**2 * vr, nc, nr)
    t2 = _t_quantile(confidence_level, df) ** 2
    # (a - ρ b)² - t² (vc - 2ρ vcr + ρ² vr) <= 0  <=>  A ρ² + B ρ + C <= 0
    qa = b**2 - t2 * vr
    qb = -2.0 * (a * b - t2 * vcr)
    qc = a**2 - t2 * vc
    disc = qb**2 - 4.0 * qa * qc
    bounded = (qa > 0) & (disc >= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(np.where(bounded, disc, 0.0))
        lo = (-qb - root) / (2.0 * qa)
        hi = (-qb + root) / (2.0 * qa)
    return np.where(bounded, lo, -np.inf), np.where(bounded, hi, np.inf), bounded


def t_intervals(
    c: Any, r: Any, *, paired: bool, confidence_level: float = 0.95
) -> dict[str, np.ndarray | str]:
    """The difference's and the ratio's intervals per row, as compare uses them.

    Unpaired: Welch's t and Fieller's interval; paired: paired t and paired Fieller.

    Returns
    -------
    dict
        ``diff_lo``, ``diff_hi``, ``ratio_lo``, ``ratio_hi`` (arrays), ``ratio_unbounded``
        (bool array), ``diff_method``, ``ratio_method`` (names of :data:`INTERVAL_METHODS`).

    Examples
    --------
    >>> out = t_intervals([[0.48, 0.42, 0.52]], [[0.023, 0.022, 0.024]], paired=False)
    >>> out["diff_method"], out["ratio_method"]
    ('welch-t', 'fieller')
    """
    if paired:
        d_lo, d_hi = paired_t_interval(c, r, confidence_level)
    else:
        d_lo, d_hi = welch_interval(c, r, confidence_level)
    r_lo, r_hi, bounded = fieller_interval(c, r, confidence_level, paired=paired)
    return {
        "diff_lo": d_lo,
        "diff_hi": d_hi,
        "ratio_lo": r_lo,
        "ratio_hi": r_hi,
        "ratio_unbounded": ~bounded,
        "diff_method": "paired-t" if paired else "welch-t",
        "ratio_method": "paired-fieller" if paired else "fieller",
    }


def _pow2_scale(x: np.ndarray) -> np.ndarray:
    """Per row, the power of two at or above the largest |value| (1 for rows of zeros).

    Dividing by it is exact and keeps squares of huge values (~1e154 and beyond) finite.
    """
    biggest = np.max(np.abs(x), axis=1) if x.shape[1] else np.zeros(x.shape[0])
    _, exponent = np.frexp(biggest)
    return np.where(biggest > 0, np.ldexp(1.0, exponent), 1.0)

"""Rank tests over seeds (Mann–Whitney U, Wilcoxon signed-rank) and multiple-testing
corrections (Benjamini–Hochberg, Benjamini–Yekutieli), as :func:`icstools.analysis.compare.compare`
uses them."""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np
import scipy.stats

__all__ = ["CORRECTIONS", "benjamini_hochberg"]

#: Multiple-testing corrections: Benjamini–Hochberg, Benjamini–Yekutieli.
CORRECTIONS: tuple[str, ...] = ("bh", "by")


def benjamini_hochberg(p: Any, *, method: Literal["bh", "by"] = "bh") -> np.ndarray:
    """Benjamini–Hochberg (or –Yekutieli) adjusted p-values (q-values); NaN stays NaN.

    The correction runs over the finite entries only (NaN marks "no test"), with
    :func:`scipy.stats.false_discovery_control` (an equivalent implementation when scipy lacks
    it). Rejecting every hypothesis with ``q <= alpha`` controls the false discovery rate at
    ``alpha`` (BH: independent or positively dependent tests; BY: any dependence).

    Parameters
    ----------
    p : array_like
        p-values in [0, 1], or NaN.
    method : {"bh", "by"}
        Benjamini–Hochberg or Benjamini–Yekutieli.

    Returns
    -------
    numpy.ndarray
        q-values, same shape as ``p``.

    Examples
    --------
    >>> benjamini_hochberg([0.01, 0.04, 0.03, float("nan")])
    array([0.03, 0.04, 0.04,  nan])
    """
    if method not in CORRECTIONS:
        raise ValueError(f"method={method!r} is not valid. Expected one of {list(CORRECTIONS)}")
    arr = np.asarray(p, dtype=np.float64)
    q = np.full(arr.shape, np.nan)
    ok = ~np.isnan(arr)
    if np.any(ok & ((arr < 0) | (arr > 1))):
        bad = arr[ok & ((arr < 0) | (arr > 1))]
        raise ValueError(f"p-values must be in [0, 1] (or NaN); got {bad[:5].tolist()}")
    if not ok.any():
        return q
    fdc = getattr(scipy.stats, "false_discovery_control", None)
    q[ok] = fdc(arr[ok], method=method) if fdc is not None else _bh(arr[ok], method)
    return q


def _bh(p: np.ndarray, method: str) -> np.ndarray:
    """Step-up BH/BY adjustment (for scipy without false_discovery_control)."""
    m = p.size
    order = np.argsort(p)
    scale = m / np.arange(1, m + 1)
    if method == "by":
        scale = scale * np.sum(1.0 / np.arange(1, m + 1))
    adjusted = np.minimum.accumulate((p[order] * scale)[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


@functools.lru_cache(maxsize=256)
def _min_p(paired: bool, nc: int, nr: int) -> float:
    """The smallest two-sided p the rank test can give with these sizes (no ties)."""
    if paired:
        return float(scipy.stats.wilcoxon(np.arange(1.0, nc + 1), method="auto").pvalue)
    x = np.arange(nr, nr + nc, dtype=np.float64)
    y = np.arange(nr, dtype=np.float64)
    return float(scipy.stats.mannwhitneyu(x, y, alternative="two-sided", method="auto").pvalue)


def _rank_tests(xc: np.ndarray, xr_: np.ndarray, paired: bool) -> list[tuple[float, float, str]]:
    """(statistic, two-sided p, note) per row: Wilcoxon signed-rank (paired) or Mann–Whitney U.

    Mann–Whitney runs vectorised over rows, separately for rows with and without ties, so that
    ``method="auto"`` (which looks at ties) decides for each row as a call on that row alone.
    """
    out: list[tuple[float, float, str]] = []
    if paired:
        for c, r in zip(xc, xr_, strict=True):
            if np.all(c == r):
                out.append((0.0, 1.0, "all paired differences are zero: p set to 1"))
                continue
            res = scipy.stats.wilcoxon(c, r, alternative="two-sided", method="auto")
            out.append((float(res.statistic), float(res.pvalue), ""))
        return out
    stat = np.empty(xc.shape[0])
    p = np.empty(xc.shape[0])
    combined = np.sort(np.concatenate([xc, xr_], axis=1), axis=1)
    ties = np.any(np.diff(combined, axis=1) == 0, axis=1)
    for mask in (ties, ~ties):
        if mask.any():
            res = scipy.stats.mannwhitneyu(
                xc[mask], xr_[mask], alternative="two-sided", method="auto", axis=1
            )
            stat[mask], p[mask] = res.statistic, res.pvalue
    return [(float(a), float(b), "") for a, b in zip(stat, p, strict=True)]

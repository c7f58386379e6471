"""Bootstrap intervals over seeds (``ci_method`` ``"studentized"``, ``"bca"``, ``"percentile"``
of :func:`icstools.analysis.compare.compare`), vectorised over sites.

These are no longer compare's default: with 3–10 seeds the closed-form t intervals of
:mod:`icstools.analysis.intervals` cover as stated and these do not (measured by
``bench/interval_calibration.py``). ``"percentile"`` and ``"bca"`` give exactly what
:func:`scipy.stats.bootstrap` gives for the same random stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import ndtr, ndtri

from icstools.analysis.intervals import _pow2_scale

__all__ = ["bootstrap_intervals"]

# elements per chunk of the gathered bootstrap resamples (sites x resamples x seeds)
_CHUNK_ELEMENTS = 1_000_000


def _row_quantiles(sorted_rows: np.ndarray, q: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Linear-interpolation quantile ``q[i]`` of the first ``counts[i]`` sorted values of row i.

    Infinite values are allowed: an interpolation that touches one returns it.
    """
    q = np.clip(q, 0.0, 1.0)
    pos = q * (counts - 1)
    lo = np.floor(pos).astype(np.int64)
    lo = np.clip(lo, 0, np.maximum(counts - 1, 0))
    hi = np.minimum(lo + 1, np.maximum(counts - 1, 0))
    frac = pos - lo
    rows = np.arange(sorted_rows.shape[0])
    a = sorted_rows[rows, lo]
    b = sorted_rows[rows, hi]
    with np.errstate(invalid="ignore"):
        interp = a + frac * (b - a)
    out = np.where(
        (frac == 0) | (a == b),
        a,
        np.where(np.isinf(a), a, np.where(np.isinf(b), b, interp)),
    )
    return np.where(np.isnan(q) | (counts == 0), np.nan, out)


def _bca_levels(
    theta_hat: np.ndarray,
    theta_b: np.ndarray,
    jackknife: list[np.ndarray],
    alpha: float,
) -> tuple[np.ndarray, np.ndarray]:
    """BCa quantile levels per row, as scipy.stats.bootstrap (Efron & Tibshirani 1993, §14.3)."""
    below = np.count_nonzero(theta_b < theta_hat[:, None], axis=1)
    at_or_below = np.count_nonzero(theta_b <= theta_hat[:, None], axis=1)
    z0 = ndtri((below + at_or_below) / (2.0 * theta_b.shape[1]))
    nums = np.zeros(theta_hat.shape)
    dens = np.zeros(theta_hat.shape)
    for jk in jackknife:  # (sites, n_j) statistic with one observation of sample j left out
        n = float(jk.shape[1])
        u = (n - 1) * (jk.mean(axis=1, keepdims=True) - jk)
        nums += np.sum(u**3, axis=1) / n**3
        dens += np.sum(u**2, axis=1) / n**2
    with np.errstate(invalid="ignore", divide="ignore"):
        a_hat = np.where(dens > 0, nums / 6.0 / dens**1.5, 0.0)
    z_lo, z_hi = float(ndtri(alpha)), float(ndtri(1 - alpha))
    with np.errstate(invalid="ignore", divide="ignore"):
        lvl_lo = ndtr(z0 + (z0 + z_lo) / (1 - a_hat * (z0 + z_lo)))
        lvl_hi = ndtr(z0 + (z0 + z_hi) / (1 - a_hat * (z0 + z_hi)))
    return lvl_lo, lvl_hi


def _studentized_interval(
    est: np.ndarray,
    se: np.ndarray,
    theta_b: np.ndarray,
    se_b: np.ndarray,
    alpha: float,
) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (theta_b - est[:, None]) / se_b
    t = np.where(np.isnan(t), 0.0, t)  # 0/0: a resample equal to the estimate, no spread
    t.sort(axis=1)
    counts = np.full(est.shape, t.shape[1])
    t_lo = _row_quantiles(t, np.full(est.shape, alpha), counts)
    t_hi = _row_quantiles(t, np.full(est.shape, 1 - alpha), counts)
    with np.errstate(invalid="ignore"):
        lo = est - t_hi * se
        hi = est - t_lo * se
    # no spread at all (every run of both conditions equal): the interval is the point
    zero = se == 0
    return np.where(zero, est, lo), np.where(zero, est, hi)


def bootstrap_intervals(
    xc: np.ndarray,
    xr_: np.ndarray,
    *,
    paired: bool,
    method: str,
    n_resamples: int,
    confidence_level: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Intervals of the difference and ratio of means for each row (site) of ``xc``/``xr_``.

    ``xc`` is ``(sites, n_c)``, ``xr_`` is ``(sites, n_r)``, all finite, ``n_c, n_r >= 2``
    (paired: ``n_c == n_r`` and column k of both is pair k).
    """
    n_sites, nc = xc.shape
    nr = xr_.shape[1]
    alpha = (1 - confidence_level) / 2
    # work in units of a power of two near each row's largest |value| (exact, so the results
    # equal scipy's bit for bit): squares of values beyond ~1e154 would overflow otherwise
    scale = _pow2_scale(np.concatenate([xc, xr_], axis=1))
    xc, xr_ = xc / scale[:, None], xr_ / scale[:, None]
    idx_c = rng.integers(0, nc, (n_resamples, nc))
    idx_r = idx_c if paired else rng.integers(0, nr, (n_resamples, nr))

    mc, mr = xc.mean(axis=1), xr_.mean(axis=1)
    est_d = mc - mr
    with np.errstate(divide="ignore", invalid="ignore"):
        est_r = mc / mr
    diff_b = np.empty((n_sites, n_resamples))
    ratio_b = np.empty((n_sites, n_resamples))
    ref_b_sign_ok = np.ones(n_sites, dtype=bool)
    studentized = method == "studentized"
    if studentized:
        se_d_b = np.empty((n_sites, n_resamples))
        se_r_b = np.empty((n_sites, n_resamples))
    chunk = max(1, _CHUNK_ELEMENTS // (n_resamples * max(nc, nr)))
    sign_ref = np.sign(mr)
    for start in range(0, n_sites, chunk):
        sl = slice(start, start + chunk)
        cb = xc[sl][:, idx_c]  # (k, B, n_c)
        rb = xr_[sl][:, idx_r]
        mcb = np.mean(cb, axis=-1)
        mrb = np.mean(rb, axis=-1)
        diff_b[sl] = mcb - mrb
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio_b[sl] = mcb / mrb
        ref_b_sign_ok[sl] = np.all(np.sign(mrb) == sign_ref[sl, None], axis=1)
        if studentized:
            se_d_b[sl], se_r_b[sl] = _standard_errors(cb, rb, mcb, mrb, paired)
    out: dict[str, np.ndarray] = {}
    # jackknife (BCa) also tells whether leaving one run out moves the reference mean across 0
    jk = _jackknife(xc, xr_, paired)
    jk_sign_ok = np.all(np.sign(jk["ref_means"]) == sign_ref[:, None], axis=1)
    # a resampled reference mean of exactly 0 makes ratio resamples inf/NaN; such rows are
    # flagged by ratio_ci_undefined below, and their interval ends are not used
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if method == "percentile":
            for key, theta_b in (("diff", diff_b), ("ratio", ratio_b)):
                lo, hi = np.quantile(theta_b, [alpha, 1 - alpha], axis=1)
                out[f"{key}_lo"], out[f"{key}_hi"] = lo, hi
        elif method == "bca":
            for key, est, theta_b in (("diff", est_d, diff_b), ("ratio", est_r, ratio_b)):
                lvl_lo, lvl_hi = _bca_levels(est, theta_b, jk[key], alpha)
                sorted_b = np.sort(theta_b, axis=1)
                counts = np.full(n_sites, n_resamples)
                out[f"{key}_lo"] = _row_quantiles(sorted_b, lvl_lo, counts)
                out[f"{key}_hi"] = _row_quantiles(sorted_b, lvl_hi, counts)
        else:
            se_d, se_r = _standard_errors(
                xc[:, None], xr_[:, None], mc[:, None], mr[:, None], paired
            )
            out["diff_lo"], out["diff_hi"] = _studentized_interval(
                est_d, se_d[:, 0], diff_b, se_d_b, alpha
            )
            out["ratio_lo"], out["ratio_hi"] = _studentized_interval(
                est_r, se_r[:, 0], ratio_b, se_r_b, alpha
            )
    out["ratio_ci_undefined"] = ~(ref_b_sign_ok & jk_sign_ok) | (mr == 0)
    out["diff_lo"] = out["diff_lo"] * scale
    out["diff_hi"] = out["diff_hi"] * scale
    return out


def _standard_errors(
    cb: np.ndarray, rb: np.ndarray, mcb: np.ndarray, mrb: np.ndarray, paired: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Standard errors of the difference and of the ratio of means of the last axis.

    Unpaired: Welch's ``sqrt(s_c²/n_c + s_r²/n_r)``; ratio ``R = m_c/m_r`` by the delta method,
    ``sqrt(s_c²/n_c + R² s_r²/n_r) / |m_r|``. Paired: the standard error of the mean of
    ``c - r`` and of the linearised ratio ``(c - R r) / m_r``.
    """
    nc, nr = cb.shape[-1], rb.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = mcb / mrb
        if paired:
            se_d = np.std(cb - rb, axis=-1, ddof=1) / np.sqrt(nc)
            lin = (cb - ratio[..., None] * rb) / mrb[..., None]
            se_r = np.std(lin, axis=-1, ddof=1) / np.sqrt(nc)
        else:
            vc = np.var(cb, axis=-1, ddof=1) / nc
            vr = np.var(rb, axis=-1, ddof=1) / nr
            se_d = np.sqrt(vc + vr)
            se_r = np.sqrt(vc + ratio**2 * vr) / np.abs(mrb)
    return se_d, se_r


def _jackknife(xc: np.ndarray, xr_: np.ndarray, paired: bool) -> dict[str, Any]:
    """Leave-one-out statistics (per sample, as scipy.stats.bootstrap), and reference means."""

    def loo_means(x: np.ndarray) -> np.ndarray:
        n = x.shape[1]
        keep = ~np.eye(n, dtype=bool)
        idx = np.broadcast_to(np.arange(n), (n, n))[keep].reshape(n, n - 1)
        return np.mean(x[:, idx], axis=-1)  # (sites, n)

    mc, mr = xc.mean(axis=1, keepdims=True), xr_.mean(axis=1, keepdims=True)
    lc, lr = loo_means(xc), loo_means(xr_)
    with np.errstate(divide="ignore", invalid="ignore"):
        if paired:  # one sample of pairs: leave pair i out of both
            return {"diff": [lc - lr], "ratio": [lc / lr], "ref_means": lr}
        return {
            "diff": [lc - mr, mc - lr],
            "ratio": [lc / mr, mc / lr],
            "ref_means": lr,
        }

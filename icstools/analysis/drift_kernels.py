"""The numpy kernels of the drift metrics, batched over leading dims: they never warn, and
the callers (:mod:`icstools.analysis.drift_arrays` on arrays, :mod:`icstools.analysis.drift`
on datasets) handle non-finite values and name the outputs (``_QUANTILE_OUT``, ``_HIST_OUT``,
``_SAMPLE_OUT`` there).
"""

from __future__ import annotations

import numpy as np
from scipy.special import rel_entr

from icstools.analysis.tails import TAIL_LEVEL, has_tail_levels, linear_w1, tail_aware_w1

__all__: list[str] = []


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

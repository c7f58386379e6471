"""Tests of icstools.analysis.drift against independent references (scipy, numpy, closed forms).

Sample-based metrics are checked against scipy per unit; summary-based brackets are checked to
contain the exact values of the very samples the summaries were computed from (numpy-linear
quantiles, as the recorder computes them); the dataset functions are checked against the array
functions, lazily on dask, and on a real recorded run.
"""

from __future__ import annotations

import doctest
import itertools
import math
import re
import warnings
import zlib

import dask
import dask.array
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

from icstools.analysis import drift as D
from icstools.functional.statistics import DEFAULT_QUANTILES

LEVELS = np.array(DEFAULT_QUANTILES)  # 0.001, 0.005, 0.01, 0.05, 0.10, …, 0.95, 0.99, …, 0.999
BIN_LEVELS = LEVELS[(LEVELS > 0.005) & (LEVELS < 0.995)]  # the summary's bins: no tail levels
GRID = np.concatenate([[0.0], LEVELS, [1.0]])  # with min and max
HYP = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ALL_SAMPLE_FUNCS = [
    D.mean_shift,
    D.log_var_ratio,
    D.gauss_kl,
    D.w1,
    D.w1_std,
    D.ks,
    D.psi,
    D.js,
    D.hellinger,
]


def test_docstring_examples_run() -> None:
    from icstools.analysis import drift_arrays, drift_flags

    attempted = 0
    for module in (D, drift_arrays, drift_flags):
        result = doctest.testmod(module, extraglobs={"np": np, "xr": xr})
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted >= 30


# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------


def draw(rng: np.random.Generator, kind: str, n: int, units: int) -> np.ndarray:
    """``[n, units]`` values of one family of distributions."""
    if kind == "normal":
        return rng.normal(size=(n, units))
    if kind == "uniform":
        return rng.uniform(-1, 1, size=(n, units))
    if kind == "lognormal":
        return rng.lognormal(0.0, 1.0, size=(n, units))
    if kind == "pareto":  # heavy tail (infinite variance for a = 1.5)
        return rng.pareto(1.5, size=(n, units))
    if kind == "discrete":  # many ties
        return rng.integers(0, 5, size=(n, units)).astype(float)
    if kind == "mixture":
        far = rng.random((n, units)) < 0.3
        return np.where(far, rng.normal(3.0, 0.5, (n, units)), rng.normal(size=(n, units)))
    raise AssertionError(kind)


KINDS = ["normal", "uniform", "lognormal", "pareto", "discrete", "mixture"]


def grid_of(x: np.ndarray) -> np.ndarray:
    """``[units, G]`` min, numpy-linear quantiles at LEVELS, max of ``x`` ``[n, units]``."""
    return np.quantile(x, GRID, axis=0).T


def binned(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Masses of (−∞, e_1], …, (e_m, ∞) of one unit's values, via searchsorted."""
    c = np.searchsorted(np.sort(x), edges, side="right")
    return np.diff(np.concatenate([[0], c, [x.size]])) / x.size


def psi_ref(p: np.ndarray, q: np.ndarray, eps: float = D.PSI_EPS) -> float:
    pe, qe = np.maximum(p, eps), np.maximum(q, eps)
    pe, qe = pe / pe.sum(), qe / qe.sum()
    return float(scipy.stats.entropy(pe, qe) + scipy.stats.entropy(qe, pe))


def hellinger_ref(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.linalg.norm(np.sqrt(p) - np.sqrt(q)) / math.sqrt(2))


def ks_ref(p: np.ndarray, q: np.ndarray) -> float:
    """scipy's two-sample KS statistic (its p-value, unused, warns for tiny samples)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(scipy.stats.ks_2samp(p, q).statistic)


def hist_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The recorder's histogram layout: underflow, bins [e_k, e_k+1) (last closed), overflow."""
    inner = np.histogram(values[(values >= edges[0]) & (values <= edges[-1])], edges)[0]
    return np.concatenate([[np.sum(values < edges[0])], inner, [np.sum(values > edges[-1])]])


def tol(*arrays: np.ndarray) -> float:
    """Absolute tolerance for float64 sums over values of this scale."""
    return 1e-12 * (1.0 + max(float(np.max(np.abs(a))) for a in arrays))


@st.composite
def sample_pairs(draw_: st.DrawFn, max_n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Reference and current samples ``[n, units]`` of families, shifted and scaled."""
    kind_p = draw_(st.sampled_from(KINDS))
    kind_q = draw_(st.sampled_from([kind_p, *KINDS]))
    n_p, n_q = draw_(st.integers(1, max_n)), draw_(st.integers(1, max_n))
    units = draw_(st.integers(1, 3))
    seed = draw_(st.integers(0, 2**32 - 1))
    shift = draw_(st.floats(-3, 3))
    scale = draw_(st.floats(0.2, 5))
    coarse = draw_(st.booleans())  # round both: ties across the two samples
    rng = np.random.default_rng(seed)
    p, q = draw(rng, kind_p, n_p, units), draw(rng, kind_q, n_q, units) * scale + shift
    return (np.round(p), np.round(q)) if coarse else (p, q)


# --------------------------------------------------------------------------------------------
# From samples: exact metrics
# --------------------------------------------------------------------------------------------


@HYP
@given(sample_pairs())
def test_w1_and_ks_equal_scipy_for_unequal_sizes_and_ties(pq: tuple) -> None:
    p, q = pq
    w, k = D.w1(p, q), D.ks(p, q)
    assert w.shape == k.shape == (p.shape[1],)
    for i in range(p.shape[1]):
        ref_w = scipy.stats.wasserstein_distance(p[:, i], q[:, i])
        assert abs(w[i] - ref_w) <= tol(p, q) * 10
        assert abs(k[i] - ks_ref(p[:, i], q[:, i])) <= 1e-12


def test_w1_and_ks_on_heavy_ties() -> None:
    rng = np.random.default_rng(3)
    p = rng.integers(0, 3, size=(101, 4)).astype(float)
    q = rng.integers(1, 4, size=(57, 4)).astype(float)
    q[:, 3] = 1.0  # a constant unit
    for i in range(4):
        assert D.w1(p, q)[i] == pytest.approx(
            scipy.stats.wasserstein_distance(p[:, i], q[:, i]), abs=1e-12
        )
        assert D.ks(p, q)[i] == pytest.approx(ks_ref(p[:, i], q[:, i]), abs=1e-12)


@pytest.mark.parametrize("edges_kind", ["deciles", "shared", "per_unit"])
def test_binned_metrics_equal_scipy_on_the_same_bins(edges_kind: str) -> None:
    rng = np.random.default_rng(5)
    p = np.round(rng.normal(size=(300, 3)), 1)  # ties, so bin closure matters
    q = np.round(rng.normal(0.4, 1.3, size=(170, 3)), 1)
    if edges_kind == "deciles":
        kw: dict = {}
        edges = [np.quantile(p[:, i], np.arange(1, 10) / 10) for i in range(3)]
    elif edges_kind == "shared":
        kw = {"edges": np.array([-1.0, -0.2, 0.0, 0.5, 2.0])}
        edges = [kw["edges"]] * 3
    else:
        e = np.quantile(p, LEVELS, axis=0)  # [m, units]
        kw = {"edges": e}
        edges = [e[:, i] for i in range(3)]
    got_psi, got_js, got_h = D.psi(p, q, **kw), D.js(p, q, **kw), D.hellinger(p, q, **kw)
    for i in range(3):
        bp, bq = binned(p[:, i], edges[i]), binned(q[:, i], edges[i])
        assert got_js[i] == pytest.approx(jensenshannon(bp, bq, base=2), abs=1e-12)
        assert got_psi[i] == pytest.approx(psi_ref(bp, bq), abs=1e-12)
        assert got_h[i] == pytest.approx(hellinger_ref(bp, bq), abs=1e-12)


def test_psi_eps_floors_empty_bins() -> None:
    p = np.array([0.0, 0.0, 1.0, 1.0])
    q = np.array([5.0, 5.0, 5.0, 5.0])  # all in the last bin, which is empty for p
    edges = np.array([0.5, 2.0])
    bp, bq = binned(p, edges), binned(q, edges)
    assert float(D.psi(p, q, edges=edges)) == pytest.approx(psi_ref(bp, bq, 1e-4), rel=1e-12)
    assert float(D.psi(p, q, edges=edges, eps=1e-2)) == pytest.approx(psi_ref(bp, bq, 1e-2))
    assert float(D.js(p, q, edges=edges)) == pytest.approx(1.0)  # disjoint supports
    assert float(D.hellinger(p, q, edges=edges)) == pytest.approx(1.0)


def test_moment_metrics_equal_closed_forms_and_kl_direction() -> None:
    rng = np.random.default_rng(7)
    p = rng.normal(1.0, 2.0, size=(400, 2))
    q = rng.normal(-0.5, 0.7, size=(300, 2))
    mp, sp, mq, sq = p.mean(0), p.std(0), q.mean(0), q.std(0)
    np.testing.assert_allclose(D.mean_shift(p, q), (mq - mp) / sp, rtol=1e-12)
    np.testing.assert_allclose(D.log_var_ratio(p, q), np.log(sq**2 / sp**2), rtol=1e-12)
    np.testing.assert_allclose(
        D.w1_std(p, q),
        [scipy.stats.wasserstein_distance(p[:, i], q[:, i]) / sp[i] for i in range(2)],
        rtol=1e-12,
    )
    kl = D.gauss_kl(p, q)
    for i in range(2):
        dq = scipy.stats.norm(mq[i], sq[i])
        dp = scipy.stats.norm(mp[i], sp[i])
        lo, hi = mq[i] - 12 * sq[i], mq[i] + 12 * sq[i]

        def integrand(x: float, dq=dq, dp=dp) -> float:
            return dq.pdf(x) * (dq.logpdf(x) - dp.logpdf(x))

        kl_qp = scipy.integrate.quad(integrand, lo, hi, epsabs=1e-13, epsrel=1e-12)[0]
        assert kl[i] == pytest.approx(kl_qp, rel=1e-8)  # KL(Q ‖ P) ...
        kl_pq = np.log(sq[i] / sp[i]) + (sp[i] ** 2 + (mp[i] - mq[i]) ** 2) / (2 * sq[i] ** 2) - 0.5
        assert abs(kl[i] - kl_pq) > 0.1  # ... not KL(P ‖ Q)


def test_one_dimensional_input_and_axis() -> None:
    rng = np.random.default_rng(8)
    p, q = rng.normal(size=(50, 3)), rng.normal(size=(40, 3))
    for f in ALL_SAMPLE_FUNCS:
        full = f(p, q)
        assert full.shape == (3,)
        np.testing.assert_allclose(f(p.T, q.T, axis=1), full, rtol=1e-12)
        one = f(p[:, 1], q[:, 1])
        assert np.ndim(one) == 0
        assert float(one) == pytest.approx(full[1], rel=1e-12)


def test_nonfinite_unit_gives_nan_and_exactly_one_warning() -> None:
    rng = np.random.default_rng(9)
    p, q = rng.normal(size=(60, 5)), rng.normal(size=(70, 5))
    clean = {f.__name__: f(p, q) for f in ALL_SAMPLE_FUNCS}
    p_bad, q_bad = p.copy(), q.copy()
    p_bad[3, 1] = np.nan
    q_bad[0, 2] = np.inf
    q_bad[5, 4] = np.nan
    for f in ALL_SAMPLE_FUNCS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = f(p_bad, q_bad)
        assert [w.category for w in caught] == [RuntimeWarning], f.__name__
        assert "3 of 5 units" in str(caught[0].message)
        assert np.isnan(got[[1, 2, 4]]).all(), f.__name__
        np.testing.assert_allclose(got[[0, 3]], clean[f.__name__][[0, 3]], rtol=1e-12)


def test_constant_units_give_the_documented_values_without_warnings() -> None:
    # pytest turns every warning into an error: none may leak from numpy here.
    p = np.array([[2.0, 2.0, 1.0], [2.0, 2.0, 3.0], [2.0, 2.0, 5.0]])  # units 0, 1 constant
    q = np.array([[2.0, 5.0, 4.0], [2.0, 7.0, 4.0], [2.0, 9.0, 4.0]])  # units 0, 2 constant
    np.testing.assert_array_equal(D.mean_shift(p, q), [np.nan, np.inf, (4 - 3) / p[:, 2].std()])
    np.testing.assert_array_equal(D.log_var_ratio(p, q), [np.nan, np.inf, -np.inf])
    np.testing.assert_array_equal(D.gauss_kl(p, q), [0.0, np.inf, np.inf])
    np.testing.assert_allclose(D.w1(p, q), [0.0, 5.0, 5 / 3], rtol=1e-12)
    np.testing.assert_array_equal(D.w1_std(p, q)[:2], [np.nan, np.inf])
    np.testing.assert_allclose(D.ks(p, q), [0.0, 1.0, 2 / 3], rtol=1e-12)
    for f in (D.psi, D.js, D.hellinger):
        assert np.all(np.isfinite(f(p, q)))
    assert D.psi(p, q)[0] == 0.0 and D.js(p, q)[0] == 0.0 and D.hellinger(p, q)[0] == 0.0
    out = D.moment_drift([0.0, 1.0], [0.0, 0.0], [0.0, 2.0], [0.0, 0.0])
    np.testing.assert_array_equal(out["gauss_kl"], [0.0, np.inf])
    np.testing.assert_array_equal(out["mean_shift"], [np.nan, np.inf])


def test_array_input_errors() -> None:
    p = np.zeros((5, 2))
    with pytest.raises(ValueError, match="same units"):
        D.w1(p, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least one sample"):
        D.ks(np.zeros((0, 2)), p)
    with pytest.raises(ValueError, match="bins must be an int"):
        D.psi(p, p, bins=0)
    with pytest.raises(ValueError, match="nondecreasing"):
        D.js(p, p, edges=[1.0, 0.0])
    with pytest.raises(ValueError, match="sample axis"):
        D.mean_shift(1.0, 2.0)
    with pytest.raises(TypeError, match="array of numbers"):
        D.w1(["a"], [1.0])
    with pytest.raises(ValueError, match="levels must be strictly increasing"):
        D.quantile_drift([0.1, 0.5, 1.0], [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="nondecreasing"):
        D.quantile_drift([0, 0.5, 1], [0, 2, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="same bins"):
        D.hist_drift([1, 2], [1, 2, 3])


# --------------------------------------------------------------------------------------------
# From summaries: exact moments, bracketed W1 and KS
# --------------------------------------------------------------------------------------------


def test_moment_drift_equals_the_sample_metrics() -> None:
    rng = np.random.default_rng(10)
    p, q = rng.normal(size=(80, 4)), rng.gamma(2.0, size=(90, 4))
    out = D.moment_drift(p.mean(0), p.var(0), q.mean(0), q.var(0))
    np.testing.assert_allclose(out["mean_shift"], D.mean_shift(p, q), rtol=1e-12)
    np.testing.assert_allclose(out["log_var_ratio"], D.log_var_ratio(p, q), rtol=1e-12)
    np.testing.assert_allclose(out["gauss_kl"], D.gauss_kl(p, q), rtol=1e-12)


def check_bracket(p: np.ndarray, q: np.ndarray, out: dict, slack: float = 0.0) -> None:
    w, k = D.w1(p, q), D.ks(p, q)
    t = tol(p, q) * 100
    assert np.all(out["w1_lo"] - t <= w), (out["w1_lo"], w)
    assert np.all(w <= out["w1_hi"] + t), (w, out["w1_hi"])
    assert np.all(out["ks_lo"] - 1e-12 <= k), (out["ks_lo"], k)
    assert np.all(k <= out["ks_hi"] + 1e-12), (k, out["ks_hi"])
    assert np.all((out["w1_lo"] <= out["w1"]) & (out["w1"] <= out["w1_hi"]))
    assert np.all((out["ks_lo"] <= out["ks"]) & (out["ks"] <= out["ks_hi"]))


@HYP
@given(sample_pairs())
def test_summary_brackets_contain_the_exact_values_of_the_same_samples(pq: tuple) -> None:
    p, q = pq
    n_p, n_q = p.shape[0], q.shape[0]
    out = D.quantile_drift(
        GRID, grid_of(p), grid_of(q), n_p=n_p, n_q=n_q, mean_p=p.mean(0), mean_q=q.mean(0)
    )
    check_bracket(p, q, out)
    # without the means the lower bound is the grid's alone: still a bracket
    check_bracket(p, q, D.quantile_drift(GRID, grid_of(p), grid_of(q), n_p=n_p, n_q=n_q))


def test_the_count_correction_is_needed_for_empirical_distributions() -> None:
    # numpy's linear quantiles of a few values are the grid of the interpolated distribution;
    # the empirical one (what scipy measures) can leave the bracket that ignores n.
    p, q = np.array([[7.0, 8.0]]).T, np.array([[1.0, 0.0, 8.0, 0.0]]).T
    bare = D.quantile_drift(GRID, grid_of(p), grid_of(q))
    assert float(D.w1(p, q)[0]) == 5.25 < float(bare["w1_lo"][0])  # 5.61
    check_bracket(p, q, D.quantile_drift(GRID, grid_of(p), grid_of(q), n_p=2, n_q=4))
    p, q = np.array([[5.0, 2.0, 3.0, 0.0]]).T, np.array([[0.0, 0.0, 1.0]]).T
    bare = D.quantile_drift(GRID, grid_of(p), grid_of(q))
    assert float(D.ks(p, q)[0]) == 0.75 < float(bare["ks_lo"][0])  # 0.8
    check_bracket(p, q, D.quantile_drift(GRID, grid_of(p), grid_of(q), n_p=4, n_q=3))


@HYP
@given(st.integers(0, 2**32 - 1), st.sampled_from(["continuous", "jumps", "ties"]))
def test_bracket_holds_for_any_quantile_functions_through_the_grid(seed: int, how: str) -> None:
    # Without counts the bracket is for every distribution whose monotone quantile function
    # passes through the grid points. Build such distributions as 1000 atoms of mass 0.001 (all
    # levels are multiples of 0.001): the atoms of [u_k, u_k+1) lie anywhere in [a_k, a_k+1].
    rng = np.random.default_rng(seed)
    cells = np.round(GRID * 1000).astype(int)  # 0, 1, 5, 10, 50, …, 950, 990, 995, 999, 1000

    def atoms_through(a: np.ndarray) -> np.ndarray:
        vals = [
            np.sort(rng.uniform(a[k], a[k + 1], cells[k + 1] - cells[k])) for k in range(len(a) - 1)
        ]
        v = np.concatenate(vals)
        if how == "jumps":  # all mass of a cell at one end of its interval
            v = np.concatenate(
                [
                    np.full(cells[k + 1] - cells[k], a[k + rng.integers(2)])
                    for k in range(len(a) - 1)
                ]
            )
        return v[:, None]

    def grid() -> np.ndarray:
        steps = rng.exponential(size=GRID.size) * (
            rng.random(GRID.size) < 0.6 if how == "ties" else 1.0
        )
        return np.cumsum(steps) + rng.normal(0, 3)

    a, b = grid(), grid()
    p, q = atoms_through(a), atoms_through(b)
    out = D.quantile_drift(GRID, a, b)
    check_bracket(p, q, {k: np.atleast_1d(v) for k, v in out.items()})


def test_estimates_are_those_of_the_interpolated_distributions() -> None:
    # P: a point mass at 0 (a grid of ties: its CDF jumps); Q: uniform on [-3, 1].
    a, b = np.zeros(GRID.size), 4 * GRID - 3
    out = D.quantile_drift(GRID, a, b)
    # E|X| for X ~ U(-3, 1); the tails beyond 0.01/0.99 are the generalized Pareto quantile
    # function through the tail levels, here linear (ξ = -1, solved from a table: 2e-6)
    assert float(out["w1"]) == pytest.approx(1.25, rel=1e-5)
    assert float(out["ks"]) == pytest.approx(0.75, rel=1e-12)  # F_Q(0) - F_P(0-)
    assert float(out["ks_lo"]) <= 0.75 <= float(out["ks_hi"])
    # 22 bins at P's 21 interior grid values from 0.01 to 0.99 (tail levels are no bin edges),
    # all 0: (-inf, 0], 20 empty ones, (0, inf)
    bins_p, bins_q = np.zeros(22), np.zeros(22)
    bins_p[0], bins_q[0], bins_q[-1] = 1.0, 0.75, 0.25
    assert float(out["js"]) == pytest.approx(jensenshannon(bins_p, bins_q, base=2), rel=1e-12)
    assert float(out["psi"]) == pytest.approx(psi_ref(bins_p, bins_q), rel=1e-12)
    assert float(out["hellinger"]) == pytest.approx(hellinger_ref(bins_p, bins_q), rel=1e-12)


# Measured tightness, as the module docstring states it (n = 2000 values per unit).
TIGHT = {  # kind: (W1 estimate rel. error, PSI, JS, Hellinger rel. errors)
    "normal": (0.04, 0.10, 0.05, 0.05),
    "uniform": (0.04, 0.10, 0.05, 0.05),
    "mixture": (0.04, 0.10, 0.05, 0.05),
    "lognormal": (0.10, 0.10, 0.05, 0.05),  # 0.40 with the 21-level grid and linear tails
    "discrete": (0.12, 0.60, 0.20, 0.25),
}


def tightness(n: int, kind: str, change: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(f"{n}/{kind}/{change}".encode()))
    p, q = draw(rng, kind, n, 8), draw(rng, kind, n, 8)
    q = q + 0.5 * p.std() if change == "shift" else (q - q.mean()) * 1.5 + q.mean()
    out = D.quantile_drift(
        GRID, grid_of(p), grid_of(q), n_p=n, n_q=n, mean_p=p.mean(0), mean_q=q.mean(0)
    )
    w, k = D.w1(p, q), D.ks(p, q)
    e = np.quantile(p, BIN_LEVELS, axis=0)  # the bins of the summary path, on the samples
    return {
        "w1_err": np.abs(out["w1"] / w - 1),
        "w1_lo": out["w1_lo"] / w,
        "w1_hi": out["w1_hi"] / w,
        "ks_err": np.abs(out["ks"] - k),
        "ks_lo": out["ks_lo"] - k,
        "ks_hi": out["ks_hi"] - k,
        "psi_err": np.abs(out["psi"] / D.psi(p, q, edges=e) - 1),
        "js_err": np.abs(out["js"] / D.js(p, q, edges=e) - 1),
        "hel_err": np.abs(out["hellinger"] / D.hellinger(p, q, edges=e) - 1),
    }


@pytest.mark.parametrize("kind", list(TIGHT))
def test_typical_tightness_of_summary_estimates_is_as_documented(kind: str) -> None:
    w_tol, psi_tol, js_tol, h_tol = TIGHT[kind]
    for change in ("shift", "scale"):
        r = tightness(2000, kind, change)
        assert r["w1_err"].max() <= w_tol
        assert r["ks_err"].max() <= 0.03
        assert r["w1_lo"].min() >= 0.25 and r["w1_hi"].max() <= (
            2.5 if kind == "lognormal" else 2.0  # lognormal 3.5 without the tail levels
        )
        if change == "shift" and kind != "discrete":
            assert r["w1_lo"].min() >= 0.9  # W1 ≥ |μQ − μP|: tight for a pure shift
        assert r["ks_lo"].min() >= -0.06 and r["ks_hi"].max() <= 0.11
        assert r["psi_err"].max() <= psi_tol
        assert r["js_err"].max() <= js_tol
        assert r["hel_err"].max() <= h_tol


# --------------------------------------------------------------------------------------------
# Histograms (site level)
# --------------------------------------------------------------------------------------------


@HYP
@given(sample_pairs(max_n=200), st.integers(1, 12), st.floats(0.1, 2.0))
def test_hist_metrics_exact_for_bins_and_ks_bracketed(pq: tuple, bins: int, width: float) -> None:
    p, q = (x.ravel() for x in pq)  # a site pools its units
    lo = float(np.median(p)) - width
    edges = np.linspace(lo, lo + 2 * width, bins + 1)
    hp, hq = hist_counts(p, edges), hist_counts(q, edges)
    out = D.hist_drift(hp, hq)
    k = ks_ref(p, q)
    assert out["ks_lo"] - 1e-12 <= k <= out["ks_hi"] + 1e-12
    assert out["ks"] == out["ks_lo"]
    assert float(out["js"]) == pytest.approx(jensenshannon(hp, hq, base=2), abs=1e-12)
    pp, qq = hp / hp.sum(), hq / hq.sum()
    assert float(out["psi"]) == pytest.approx(psi_ref(pp, qq), abs=1e-12)
    assert float(out["hellinger"]) == pytest.approx(hellinger_ref(pp, qq), abs=1e-12)


def test_hist_ks_bracket_is_the_bin_resolution() -> None:
    out = D.hist_drift([[0, 5, 5, 0], [0, 0, 0, 0]], [[0, 0, 5, 5], [1, 1, 0, 0]])
    np.testing.assert_array_equal(out["ks_lo"], [0.5, np.nan])
    np.testing.assert_array_equal(out["ks_hi"], [1.0, np.nan])  # empty histogram: NaN


# --------------------------------------------------------------------------------------------
# Dataset level
# --------------------------------------------------------------------------------------------


def make_run(x: np.ndarray, bins: int = 12, samples: bool = True) -> xr.Dataset:
    """A run dataset (DESIGN.md §3) whose probe summaries are those of ``x`` [step, n, unit];
    the ``train`` source holds other values (2x + 1) so that selecting the source matters."""
    steps, n, units = x.shape
    sites = np.array(["a"] * (units // 2) + ["b"] * (units - units // 2))
    site_names = ["a", "b"]

    def summaries(v: np.ndarray) -> dict[str, np.ndarray]:
        hist = np.zeros((steps, 2, bins + 2), np.int64)
        for s, (j, name) in itertools.product(range(steps), enumerate(site_names)):
            hist[s, j] = hist_counts(v[s][:, sites == name].ravel(), edges[j])
        return {
            "mean": v.mean(1),
            "var": v.var(1),
            "min": v.min(1),
            "max": v.max(1),
            "count": np.full((steps, units), n, np.int64),
            "quantile_value": np.moveaxis(np.quantile(v, LEVELS, axis=1), 0, -1),
            "hist": hist,
        }

    edges = np.stack(
        [
            np.linspace(x[0][:, sites == s].min() - 0.5, x[0][:, sites == s].max() + 0.5, bins + 1)
            for s in site_names
        ]
    )
    probe, train = summaries(x), summaries(2 * x + 1)
    data = {}
    for name in probe:
        dims = {
            "quantile_value": ("step", "unit", "quantile"),
            "hist": ("step", "site", "bin"),
        }.get(name, ("step", "unit"))
        data[name] = (("source", *dims), np.stack([train[name], probe[name]]))
    if samples:
        data["probe_sample"] = (("step", "sample", "unit"), x)
    coords = {
        "source": ["train", "probe"],
        "step": np.arange(steps, dtype=np.int64) * 10,
        "unit": np.arange(units),
        "unit_site": ("unit", sites),
        "unit_index": ("unit", np.concatenate([np.arange((sites == s).sum()) for s in "ab"])),
        "quantile": LEVELS,
        "site": site_names,
        "bin": np.arange(bins + 2),
        "hist_edges": (("site", "edge"), edges),
    }
    return xr.Dataset(data, coords=coords)


@pytest.fixture(scope="module")
def run() -> xr.Dataset:
    rng = np.random.default_rng(11)
    steps, n, units = 6, 120, 5
    x = rng.normal(size=(steps, n, units)) * (1 + 0.3 * np.arange(steps))[:, None, None]
    x += 0.2 * np.arange(steps)[:, None, None]
    x[..., 4] = np.round(x[..., 4])  # ties
    return make_run(x)


REFERENCES = ["previous", "first", 20, ("window", 2)]


def reference_samples(x: np.ndarray, ref: object, s: int) -> tuple[np.ndarray | None, ...]:
    """(distribution reference [n, units], pooled mean, pooled var) for step index s."""
    if ref == "previous":
        idx = [s - 1] if s >= 1 else None
    elif ref == "first":
        idx = [0]
    elif isinstance(ref, int):
        idx = [ref // 10]
    else:
        k = ref[1]
        idx = list(range(s - k, s)) if s >= k else None
    if idx is None:
        return None, None, None
    xs = x[idx]  # [k, n, units]
    bary = np.sort(xs, axis=1).mean(0)  # Wasserstein barycenter: average quantile functions
    means, var = xs.mean(1), xs.var(1)
    return bary, means.mean(0), var.mean(0) + means.var(0)  # mixture moments


@pytest.mark.parametrize("reference", REFERENCES, ids=str)
def test_drift_from_samples_equals_the_array_functions(run: xr.Dataset, reference) -> None:
    d = D.drift(run, reference)
    assert d.attrs["method"] == "samples"
    x = run["probe_sample"].values
    assert set(d.data_vars) >= set(D.METRICS)
    for s in range(x.shape[0]):
        p, mp, vp = reference_samples(x, reference, s)
        got = d.isel(step=s)
        if p is None:
            assert all(np.isnan(got[m]).all() for m in D.METRICS)
            continue
        q = x[s]
        edges = np.quantile(p, BIN_LEVELS, axis=0)
        exp = {
            "w1": D.w1(p, q),
            "ks": D.ks(p, q),
            "psi": D.psi(p, q, edges=edges),
            "js": D.js(p, q, edges=edges),
            "hellinger": D.hellinger(p, q, edges=edges),
            **D.moment_drift(mp, vp, q.mean(0), q.var(0)),
        }
        exp["w1_std"] = exp["w1"] / np.sqrt(vp)
        for m in D.METRICS:
            np.testing.assert_allclose(got[m].values, exp[m], rtol=1e-9, atol=1e-12, err_msg=m)


@pytest.mark.parametrize("reference", REFERENCES, ids=str)
def test_drift_from_summaries_brackets_drift_from_samples(run: xr.Dataset, reference) -> None:
    smp = D.drift(run, reference, method="samples")
    summ = D.drift(run, reference, method="summary")
    assert summ.attrs["method"] == "summary"
    assert int(smp["w1"].notnull().sum()) >= 4 * 5  # all steps with a reference
    for m in ("w1", "ks", "w1_std"):
        exact, lo, hi = smp[m], summ[f"{m}_lo"], summ[f"{m}_hi"]
        assert (exact.isnull() == lo.isnull()).all() and (exact.isnull() == hi.isnull()).all()
        assert ((lo <= exact + 1e-12) & (exact <= hi + 1e-12) | exact.isnull()).all(), m
    for m in ("mean_shift", "log_var_ratio", "gauss_kl"):  # exact from mean/var
        np.testing.assert_allclose(summ[m].values, smp[m].values, rtol=1e-9, atol=1e-12)
    assert summ["w1"].dims == ("step", "unit") and summ["hist_ks"].dims == ("step", "site")


def test_drift_summary_equals_quantile_drift_by_hand(run: xr.Dataset) -> None:
    d = D.drift(run, ("window", 2), method="summary")
    pr = run.sel(source="probe")
    grid = np.concatenate(
        [pr["min"].values[..., None], pr["quantile_value"].values, pr["max"].values[..., None]],
        axis=-1,
    )
    n = pr["count"].values
    ew = (pr["max"].values - pr["min"].values) / (2 * (n - 1))
    s = 4
    bary = grid[s - 2 : s].mean(0)  # average of the two grids
    out = D.quantile_drift(GRID, bary, grid[s])
    # widen by the count terms as documented: W1 by the average of the window's, KS by 1/n
    lo = np.maximum(out["w1_lo"] - ew[s - 2 : s].mean(0) - ew[s], 0)
    mom = pr["mean"].values
    lo = np.maximum(lo, np.abs(mom[s] - mom[s - 2 : s].mean(0)))
    np.testing.assert_allclose(d["w1_lo"].isel(step=s), lo, rtol=1e-9)
    np.testing.assert_allclose(
        d["w1_hi"].isel(step=s), out["w1_hi"] + ew[s - 2 : s].mean(0) + ew[s], rtol=1e-9
    )
    np.testing.assert_allclose(d["ks_hi"].isel(step=s), np.minimum(out["ks_hi"] + 2 / n[s], 1))
    for m in ("psi", "js", "hellinger"):
        np.testing.assert_allclose(d[m].isel(step=s), out[m], rtol=1e-9)
    h = pr["hist"].values
    hist = D.hist_drift(h[s - 2 : s].sum(0), h[s])  # pooled histogram of the window
    for m in ("ks", "ks_lo", "ks_hi", "psi", "js", "hellinger"):
        np.testing.assert_allclose(d[f"hist_{m}"].isel(step=s), hist[m], rtol=1e-12)


def test_reference_kinds_and_coordinates(run: xr.Dataset) -> None:
    prev = D.drift(run)
    assert prev["w1"].isel(step=0).isnull().all() and prev["hist_js"].isel(step=0).isnull().all()
    assert prev["w1"].notnull().isel(step=slice(1, None)).all()
    first = D.drift(run, "first")
    assert (first.isel(step=0)[["w1", "ks", "mean_shift", "hist_psi"]] == 0).all().to_array().all()
    at = D.drift(run, 30)
    assert (at.sel(step=30)[["w1", "ks", "js"]] == 0).all().to_array().all()
    win = D.drift(run, ("window", 3))
    assert win["w1"].isel(step=slice(0, 3)).isnull().all()
    assert win["w1"].isel(step=slice(3, None)).notnull().all()
    for d in (prev, first, at, win):
        assert d["w1"].dims == ("step", "unit")
        np.testing.assert_array_equal(d["unit_site"], run["unit_site"])
        np.testing.assert_array_equal(d["unit_index"], run["unit_index"])
        np.testing.assert_array_equal(d["step"], run["step"])
        by_site = d["w1"].groupby("unit_site").mean()
        assert set(by_site["unit_site"].values) == {"a", "b"}


def test_source_selects_the_summaries(run: xr.Dataset) -> None:
    train = D.drift(run, "first", source="train")
    assert train.attrs["method"] == "summary"  # no train samples: auto falls back
    probe = D.drift(run, "first", method="summary")
    # train values are 2x + 1 of the probe's: W1 doubles, scale-free metrics don't change
    np.testing.assert_allclose(train["w1"], 2 * probe["w1"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(train["mean_shift"], probe["mean_shift"], rtol=1e-9, atol=1e-12)


def test_drift_errors_name_the_bad_value_and_what_is_valid(run: xr.Dataset) -> None:
    expected = f"Metric 'foo' is not known. Expected one or more of {list(D.METRICS)}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        D.drift(run, metrics=["w1", "foo"])
    expected = "Source 'eval' is not known. Expected one of ['train', 'probe']"
    with pytest.raises(ValueError, match=re.escape(expected)):
        D.drift(run, source="eval")
    expected = "Step 7 is not in the dataset. Expected one of [0, 10, 20, 30, 40, 50]"
    with pytest.raises(ValueError, match=re.escape(expected)):
        D.drift(run, 7)
    for bad in ("last", ("window", 0), ("win", 2), True, 2.5):
        with pytest.raises(ValueError, match=r"Reference|window"):
            D.drift(run, bad)
    with pytest.raises(ValueError, match=r"Method 'exact' is not known\. Expected one of"):
        D.drift(run, method="exact")
    with pytest.raises(ValueError, match="needs the variable 'probe_sample'"):
        D.drift(run.drop_vars("probe_sample"), method="samples")
    with pytest.raises(ValueError, match="source='train' has none"):
        D.drift(run, method="samples", source="train")
    bare = run.drop_vars(["quantile_value", "probe_sample"])
    with pytest.raises(
        ValueError,
        match=r"Metric 'w1' cannot be computed: the dataset lacks "
        r"\['quantile_value'\]",
    ):
        D.drift(bare, metrics="w1")
    only_hist = bare.drop_vars(["mean", "var", "min", "max"])
    assert set(D.drift(only_hist, metrics="ks").data_vars) == {
        "hist_ks",
        "hist_ks_lo",
        "hist_ks_hi",
    }
    with pytest.raises(ValueError, match="No drift metric can be computed"):
        D.drift(only_hist.drop_vars("hist"))
    with pytest.raises(TypeError, match=r"xarray\.Dataset"):
        D.drift(run["mean"])


def _refuse_to_compute(*args: object, **kwargs: object) -> None:
    raise AssertionError("something was computed before .compute()")


@pytest.mark.parametrize(
    ("method", "reference"), [("samples", "previous"), ("summary", ("window", 2))], ids=str
)
def test_dask_backed_runs_stay_lazy_and_give_the_same_values(
    run: xr.Dataset, method: str, reference: object
) -> None:
    chunked = run.chunk({"step": 2, "unit": 3})
    eager = D.drift(run, reference, method=method)
    with dask.config.set(scheduler=_refuse_to_compute):
        lazy = D.drift(chunked, reference, method=method)
        agg = D.site_aggregate(lazy, "median")
        thr = D.drift_thresholds(lazy, [10, 20, 30], per="site")
        flags = D.flag_drift(lazy, thr)
    for ds in (lazy, agg, thr, flags):
        assert all(isinstance(v.data, dask.array.Array) for v in ds.data_vars.values())
    with dask.config.set(scheduler="synchronous"):
        xr.testing.assert_allclose(lazy.compute(), eager, rtol=1e-12, atol=1e-14)
        xr.testing.assert_allclose(agg.compute(), D.site_aggregate(eager, "median"))
        expect = D.flag_drift(eager, D.drift_thresholds(eager, [10, 20, 30], per="site"))
        xr.testing.assert_equal(flags.compute(), expect)


# --------------------------------------------------------------------------------------------
# Aggregates, thresholds, flags
# --------------------------------------------------------------------------------------------


def test_site_aggregate_equals_groupby_and_skips_nan_units(run: xr.Dataset) -> None:
    d = D.drift(run, "first")
    for how in ("mean", "median", "max", "min"):
        agg = D.site_aggregate(d, how)
        ref = getattr(d["w1"].groupby("unit_site"), how)().rename(unit_site="site")
        np.testing.assert_allclose(
            agg["w1"].transpose("step", "site"), ref.transpose("step", "site"), rtol=1e-12
        )
        assert agg["w1"].dims == ("step", "site")
        xr.testing.assert_identical(agg["hist_js"], d["hist_js"])  # already per site
    both = D.site_aggregate(d, ["mean", "max"])
    assert list(both["how"].values) == ["mean", "max"]
    xr.testing.assert_allclose(
        both["w1"].sel(how="max", drop=True), D.site_aggregate(d, "max")["w1"]
    )
    holes = d.copy(deep=True)
    holes["w1"][:, 0] = np.nan  # a NaN unit of site a is skipped ...
    holes["w1"][:, 2:] = np.nan  # ... and an all-NaN site b gives NaN, without warnings
    for how in ("mean", "median", "max"):
        agg = D.site_aggregate(holes, how)["w1"]
        np.testing.assert_allclose(agg.sel(site="a"), d["w1"][:, 1])
        assert agg.sel(site="b").isnull().all()
    with pytest.raises(ValueError, match=r"Aggregate 'sum' is not known\. Expected one or more"):
        D.site_aggregate(d, "sum")
    with pytest.raises(ValueError, match="unit_site"):
        D.site_aggregate(d.drop_vars("unit_site"))


def test_thresholds_are_mean_plus_minus_n_sigma_of_the_reference_records() -> None:
    rng = np.random.default_rng(12)
    vals = rng.normal(size=(8, 4))
    vals[2, 1] = np.nan  # skipped
    d = xr.Dataset(
        {
            "mean_shift": (("step", "unit"), vals),
            "ks": (("step", "unit"), np.abs(vals)),
            "hist_js": (("step", "site"), np.abs(vals[:, :2])),
        },
        coords={
            "step": np.arange(8),
            "unit_site": ("unit", ["a", "a", "b", "b"]),
            "site": ["a", "b"],
        },
    )
    thr = D.drift_thresholds(d, slice(0, 5), n_sigma=2.5)
    ref = d.isel(step=slice(0, 6))
    for name in ("mean_shift", "ks"):
        m, s = ref[name].mean("step"), ref[name].std("step", ddof=1)
        np.testing.assert_allclose(thr[name].sel(limit="upper"), m + 2.5 * s, rtol=1e-12)
        lower = thr[name].sel(limit="lower")
        if name == "mean_shift":  # signed: both sides
            np.testing.assert_allclose(lower, m - 2.5 * s, rtol=1e-12)
        else:  # distances: above only
            assert np.isneginf(lower).all()
    assert thr["hist_js"].dims == ("site", "limit")
    site = D.drift_thresholds(d, [0, 1, 2, 3, 4, 5], per="site")
    pooled = ref["ks"].values[:, :2].ravel()
    pooled = pooled[np.isfinite(pooled)]
    assert float(site["ks"].sel(site="a", limit="upper")) == pytest.approx(
        pooled.mean() + 3 * pooled.std(ddof=1), rel=1e-12
    )
    flags = D.flag_drift(d, site)
    assert flags["ks"].dims == ("step", "unit")
    up = site["ks"].sel(limit="upper")
    expect = d["ks"].values > up.sel(site=["a", "a", "b", "b"]).values
    np.testing.assert_array_equal(flags["ks"].values, expect)
    with pytest.raises(ValueError, match=r"Steps \[99\] are not in the dataset"):
        D.drift_thresholds(d, [0, 99])
    with pytest.raises(ValueError, match="at least 2"):
        D.drift_thresholds(d, [3])
    with pytest.raises(ValueError, match=r"Variable 'w1' of thresholds is not in drift_ds"):
        D.flag_drift(d[["ks"]], thr[["ks"]].rename(ks="w1"))


def null_run(
    seed: int, steps: int, units: int, n: int, change: str | None = None, at: int = 0
) -> xr.Dataset:
    """i.i.d. records, each unit its own normal, optionally shifted 5σ / scaled 3x from ``at``."""
    rng = np.random.default_rng(seed)
    loc, scale = rng.normal(0, 2, units), rng.uniform(0.5, 2, units)
    x = rng.normal(size=(steps, n, units))
    if change == "shift":
        x[at:] += 5.0
    elif change == "scale":
        x[at:] *= 3.0
    return make_run(x * scale + loc, bins=20)


def test_null_calibration_flag_rate_is_near_nominal() -> None:
    # Gaussian-like signed metrics are flagged at their nominal two-sided 3σ level, 0.27%.
    # Distances are right-skewed, so mean + 3σ is exceeded more often: e.g. gauss_kl is about
    # χ²₂-like (exponential: P(X > 4 E[X]) = e⁻⁴ = 1.8%), W1 like a half-normal (0.9%).
    d = D.drift(null_run(0, steps=51, units=100, n=128), "previous")
    thr = D.drift_thresholds(d, slice(10, 250), per="site")  # steps 1 … 25
    flags = D.flag_drift(d.sel(step=slice(260, None)), thr)  # 25 later steps × 100 units
    rate = {k: float(v.mean()) for k, v in flags.data_vars.items() if "unit" in v.dims}
    for m in ("mean_shift", "log_var_ratio"):
        assert 0.0004 <= rate[m] <= 0.008, (m, rate[m])  # 0.27% ± Poisson noise of 2500 trials
    assert 0.008 <= rate["gauss_kl"] <= 0.03, rate["gauss_kl"]
    for m in ("w1", "w1_std", "ks", "psi", "js", "hellinger"):
        assert rate[m] <= 0.025, (m, rate[m])
    assert np.mean(list(rate.values())) >= 0.002  # the test can see flags at all


@pytest.mark.parametrize("method", ["samples", "summary"])
@pytest.mark.parametrize(
    ("change", "metrics"),
    [
        ("shift", ["mean_shift", "gauss_kl", "w1", "w1_std", "ks", "psi", "js", "hellinger"]),
        ("scale", ["log_var_ratio", "gauss_kl", "w1", "w1_std", "psi", "js", "hellinger"]),
    ],
)
def test_a_5_sigma_shift_or_3x_scale_is_flagged_on_every_unit(change, metrics, method) -> None:
    at = 20
    ds = null_run(1, steps=26, units=40, n=128, change=change, at=at)
    d = D.drift(ds, "first", method=method)
    thr = D.drift_thresholds(d, slice(10, 190))  # per unit, steps 1 … 19 (no change yet)
    flags = D.flag_drift(d, thr)
    after = flags.isel(step=slice(at, None))
    for m in metrics:
        assert after[m].all(), (m, float(after[m].mean()))
    # KS on 128 values sees a 3x scale (D ≈ 0.23 vs a null threshold ≈ 0.15) on most units only
    assert float(after["ks"].mean()) >= 0.95
    before = flags.isel(step=slice(1, at))
    assert float(before[metrics].to_array().mean()) < 0.02
    med = D.site_aggregate(d, "median")  # per-site aggregates flag it too
    site = D.flag_drift(med, D.drift_thresholds(med, slice(10, 190)))
    assert all(bool(site[m].isel(step=slice(at, None)).all()) for m in [*metrics, "ks"])


# --------------------------------------------------------------------------------------------
# A real recorded run
# --------------------------------------------------------------------------------------------


def test_drift_of_a_recorded_run_in_memory_and_lazily_from_its_store(tmp_path) -> None:
    import torch

    import icstools

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 3), torch.nn.Tanh()
    )
    opt = torch.optim.SGD(model.parameters(), 0.5)
    probe = torch.randn(256, 4)
    path = tmp_path / "run"
    rec = icstools.Recorder(model, every=1, probe=probe, optimizer=opt, path=path, chunk_steps=2)
    with rec:
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(32, 4)).pow(2).sum().backward()
            opt.step()
    ds = rec.to_dataset()
    d = D.drift(ds, "first")
    assert d.attrs == {
        "reference": "first",
        "method": "summary",
        "source": "probe",
        "w1_estimate": D._w1_estimate_note(ds),
    }
    assert d.attrs["w1_estimate"].startswith("tail-aware")
    assert d["w1"].sizes == {"step": 5, "unit": 11}
    assert d["hist_psi"].sizes == {"step": 5, "site": 2}
    assert np.isfinite(d["w1"].isel(step=slice(1, None))).all()
    assert (d["w1_lo"] <= d["w1"]).all() and (d["w1"] <= d["w1_hi"]).all()
    assert (d[["w1", "ks", "mean_shift"]].isel(step=0) == 0).all().to_array().all()
    assert set(d["w1"].groupby("unit_site").max()["unit_site"].values) == set(ds.site.values)
    agg = D.site_aggregate(d, "max")
    np.testing.assert_array_equal(agg["site"], ds["site"])
    flags = D.flag_drift(d, D.drift_thresholds(d, [1, 2, 3]))
    assert flags["w1"].dtype == bool
    # The store read lazily (its unit_site coordinate is a dask array too): nothing computed.
    lazy_run = icstools.open_run(path, chunks={})
    with dask.config.set(scheduler=_refuse_to_compute):
        lazy = D.drift(lazy_run, "first")
        lazy_agg = D.site_aggregate(lazy, "max")
    with dask.config.set(scheduler="synchronous"):
        xr.testing.assert_allclose(lazy.compute(), d)
        xr.testing.assert_allclose(lazy_agg.compute(), agg)

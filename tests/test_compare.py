"""Tests of icstools.compare against numpy/scipy references, and its calibration.

Synthetic runs are built directly as small xarray datasets (no training), except for one test
that records real runs to Zarr stores. Calibration tests draw many independent "sites" in one
call: every site is an independent repetition of the experiment (its own seeds' values), so the
share of sites whose interval covers the truth estimates the coverage.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import icstools
from icstools.analysis.compare import (
    RUN_LEVEL,
    _bh,
    benjamini_hochberg,
    compare,
    metric_table,
)
from icstools.analysis.metrics import METRICS

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def site_names(n: int) -> list[str]:
    return [f"fc{j}:input" for j in range(n)]


def score_runs(values: np.ndarray, sites: list[str] | None = None) -> list[xr.Dataset]:
    """One dataset per row of ``values`` (runs x sites), variable ``score (site,)``."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    sites = site_names(values.shape[1]) if sites is None else sites
    coords = xr.Coordinates({"site": sites})  # built once: many tests make thousands of runs
    return [xr.Dataset({"score": ("site", row)}, coords=coords) for row in values]


def unit_run(rng: np.random.Generator, n_steps: int = 6) -> xr.Dataset:
    """A run shaped like a Recorder's: (source, step, unit) with unit_site, plus loss (step)."""
    unit_site = ["a"] * 3 + ["b"] * 2
    return xr.Dataset(
        {
            "mean": (("source", "step", "unit"), rng.normal(size=(2, n_steps, 5))),
            "quantile_value": (
                ("source", "step", "unit", "quantile"),
                rng.normal(size=(2, n_steps, 5, 3)),
            ),
            "loss": ("step", rng.normal(size=n_steps)),
        },
        coords={
            "source": ["train", "probe"],
            "step": np.arange(n_steps, dtype=np.int64) * 10,
            "unit": np.arange(5),
            "unit_site": ("unit", unit_site),
            "quantile": [0.15, 0.5, 0.85],
            "site": ["a", "b"],
        },
    )


def naive_bh(p: np.ndarray) -> np.ndarray:
    """q_i = min over p_j >= p_i of m p_j / rank_j, capped at 1 (O(m²), from the definition)."""
    m = len(p)
    ranks = scipy.stats.rankdata(p, method="max")
    return np.array(
        [min(1.0, min(m * p[j] / ranks[j] for j in range(m) if p[j] >= p[i])) for i in range(m)]
    )


def two_conditions(rng, n_sites=3, n_c=8, n_r=8, shift=1.0):
    ref = rng.normal(2.0, 1.0, (n_r, n_sites))
    cond = rng.normal(2.0 + shift, 1.0, (n_c, n_sites))
    return ref, cond


# --------------------------------------------------------------------------------------------
# Against references
# --------------------------------------------------------------------------------------------


def test_means_difference_ratio_match_numpy():
    rng = np.random.default_rng(1)
    ref, cond = two_conditions(rng, n_sites=4, n_c=6, n_r=7)
    other = rng.normal(5.0, 2.0, (5, 4))
    table = compare(
        {"base": score_runs(ref), "BN": score_runs(cond), "BN2": score_runs(other)},
        "score",
        n_resamples=200,
    )
    sites = site_names(4)
    assert list(table["site"]) == [s for s in sites for _ in range(2)]
    assert list(table["condition"]) == ["BN", "BN2"] * 4
    assert (table["reference"] == "base").all()
    for (j, s), (name, vals) in itertools.product(enumerate(sites), (("BN", cond), ("BN2", other))):
        row = table[(table.site == s) & (table.condition == name)].iloc[0]
        assert row.n_cond == len(vals) and row.n_ref == 7
        np.testing.assert_allclose(row.mean_cond, vals[:, j].mean(), rtol=1e-13)
        np.testing.assert_allclose(row.mean_ref, ref[:, j].mean(), rtol=1e-13)
        np.testing.assert_allclose(row.sd_cond, vals[:, j].std(ddof=1), rtol=1e-12)
        np.testing.assert_allclose(row["diff"], vals[:, j].mean() - ref[:, j].mean(), rtol=1e-12)
        np.testing.assert_allclose(row.ratio, vals[:, j].mean() / ref[:, j].mean(), rtol=1e-12)
        assert row.diff_lo < row["diff"] < row.diff_hi
        assert row.ratio_lo < row.ratio < row.ratio_hi
    assert table.note.eq("").all() and table.warning.eq("").all()


def test_reference_argument_and_sign():
    rng = np.random.default_rng(2)
    ref, cond = two_conditions(rng)
    runs = {"base": score_runs(ref), "BN": score_runs(cond)}
    a = compare(runs, "score", n_resamples=500)
    b = compare(runs, "score", reference="BN", n_resamples=500)
    assert (b.condition == "base").all() and (b.reference == "BN").all()
    np.testing.assert_allclose(b["diff"], -a["diff"], rtol=1e-12)
    np.testing.assert_allclose(b["ratio"], 1 / a["ratio"], rtol=1e-12)
    np.testing.assert_allclose(b["p"], a["p"], rtol=1e-12)  # two-sided


def test_mann_whitney_p_equals_scipy():
    rng = np.random.default_rng(3)
    ref, cond = two_conditions(rng, n_sites=5, n_c=6, n_r=9, shift=0.8)
    cond[:, 4] = np.round(cond[:, 4])  # ties in one site: normal approximation path
    ref[:, 4] = np.round(ref[:, 4])
    table = compare({"base": score_runs(ref), "BN": score_runs(cond)}, "score", n_resamples=50)
    for j in range(5):
        expected = scipy.stats.mannwhitneyu(cond[:, j], ref[:, j], alternative="two-sided")
        assert table.p[j] == expected.pvalue
        assert table.statistic[j] == expected.statistic
    assert (table.test == "mannwhitneyu").all()


def test_wilcoxon_p_equals_scipy_when_paired():
    rng = np.random.default_rng(4)
    ref = rng.normal(0, 1, (9, 3))
    cond = ref + rng.normal(0.7, 0.5, (9, 3))  # shared seed effect: pairing matters
    runs = {"base": score_runs(ref), "BN": score_runs(cond)}
    table = compare(runs, "score", paired=True, n_resamples=50)
    for j in range(3):
        expected = scipy.stats.wilcoxon(cond[:, j], ref[:, j], alternative="two-sided")
        assert table.p[j] == expected.pvalue
        assert table.statistic[j] == expected.statistic
    assert (table.test == "wilcoxon").all()
    assert "paired" in table.attrs["resampling"]
    # pairing removes the shared seed effect: the paired test is far stronger here
    unpaired = compare(runs, "score", n_resamples=50)
    assert (table.p < unpaired.p).all()


def test_q_values_equal_naive_bh_across_sites_and_comparisons():
    rng = np.random.default_rng(5)
    n_sites = 15
    base = rng.normal(0, 1, (6, n_sites))
    bn = rng.normal(np.linspace(0, 2, n_sites), 1, (6, n_sites))
    gn = rng.normal(np.linspace(2, 0, n_sites), 1, (6, n_sites))
    table = compare(
        {"base": score_runs(base), "BN": score_runs(bn), "GN": score_runs(gn)},
        "score",
        n_resamples=50,
    )
    assert len(table) == 2 * n_sites
    np.testing.assert_allclose(table.q, naive_bh(table.p.to_numpy()), rtol=1e-12)
    assert table.significant.dtype == "boolean"
    np.testing.assert_array_equal(table.significant.to_numpy(bool), table.q <= 0.05)
    assert table.significant.any() and not table.significant.all()
    by = compare(
        {"base": score_runs(base), "BN": score_runs(bn), "GN": score_runs(gn)},
        "score",
        n_resamples=50,
        correction="by",
    )
    assert (by.q >= table.q).all() and (by.q > table.q).any()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(0.0, 1.0), st.just(float("nan"))),
        min_size=1,
        max_size=40,
    )
)
def test_benjamini_hochberg_matches_naive(ps):
    p = np.array(ps)
    q = benjamini_hochberg(p)
    ok = ~np.isnan(p)
    assert np.isnan(q[~ok]).all()
    if ok.any():
        np.testing.assert_allclose(q[ok], naive_bh(p[ok]), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(_bh(p[ok], "bh"), naive_bh(p[ok]), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(
            _bh(p[ok], "by"),
            scipy.stats.false_discovery_control(p[ok], method="by"),
            rtol=1e-12,
            atol=1e-15,
        )


def _scipy_ci(c, r, stat, *, paired, method, n_resamples, seed):
    res = scipy.stats.bootstrap(
        (c, r),
        stat,
        paired=paired,
        method=method,
        n_resamples=n_resamples,
        rng=np.random.default_rng(seed),
        vectorized=True,
    )
    return res.confidence_interval.low, res.confidence_interval.high


def _diff(a, b, axis=-1):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def _ratio(a, b, axis=-1):
    return np.mean(a, axis=axis) / np.mean(b, axis=axis)


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_ci_equals_scipy_bootstrap(method, paired):
    """Same rng stream -> exactly scipy.stats.bootstrap's interval (difference and ratio)."""
    rng = np.random.default_rng(6)
    c = rng.lognormal(1.0, 0.6, 7)
    r = rng.lognormal(0.5, 0.4, 7 if paired else 5)
    table = compare(
        {"base": score_runs(r[:, None]), "BN": score_runs(c[:, None])},
        "score",
        ci_method=method,
        paired=paired,
        n_resamples=1999,
        seed=11,
    )
    row = table.iloc[0]
    kw = dict(paired=paired, method=method, n_resamples=1999, seed=11)
    np.testing.assert_allclose([row.diff_lo, row.diff_hi], _scipy_ci(c, r, _diff, **kw), rtol=1e-10)
    np.testing.assert_allclose(
        [row.ratio_lo, row.ratio_hi], _scipy_ci(c, r, _ratio, **kw), rtol=1e-10
    )
    assert table.attrs["ci_method"] == method and table.attrs["n_resamples"] == 1999


@pytest.mark.parametrize("paired", [False, True])
def test_studentized_ci_equals_naive_loop(paired):
    """The vectorised bootstrap-t equals a loop over resamples drawing from the same stream."""
    rng = np.random.default_rng(7)
    c = rng.normal(3.0, 1.0, 6)
    r = rng.normal(2.0, 0.5, 6 if paired else 8)
    n_resamples, seed = 999, 12
    table = compare(
        {"base": score_runs(r[:, None]), "BN": score_runs(c[:, None])},
        "score",
        paired=paired,
        n_resamples=n_resamples,
        seed=seed,
        ci_method="studentized",
    )
    row = table.iloc[0]

    def se_diff(a, b):
        if paired:
            return np.std(a - b, ddof=1) / np.sqrt(len(a))
        return np.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))

    def se_ratio(a, b):
        ratio = a.mean() / b.mean()
        if paired:
            return np.std((a - ratio * b) / b.mean(), ddof=1) / np.sqrt(len(a))
        var = np.var(a, ddof=1) / len(a) + ratio**2 * np.var(b, ddof=1) / len(b)
        return np.sqrt(var) / abs(b.mean())

    gen = np.random.default_rng(seed)
    idx_c = [gen.integers(0, len(c), len(c)) for _ in range(n_resamples)]
    idx_r = idx_c if paired else [gen.integers(0, len(r), len(r)) for _ in range(n_resamples)]
    for stat, se, lo, hi in (
        (lambda a, b: a.mean() - b.mean(), se_diff, row.diff_lo, row.diff_hi),
        (lambda a, b: a.mean() / b.mean(), se_ratio, row.ratio_lo, row.ratio_hi),
    ):
        est = stat(c, r)
        t = [(stat(c[i], r[k]) - est) / se(c[i], r[k]) for i, k in zip(idx_c, idx_r, strict=True)]
        t_lo, t_hi = np.quantile(t, [0.025, 0.975])
        s = se(c, r)
        np.testing.assert_allclose([lo, hi], [est - t_hi * s, est - t_lo * s], rtol=1e-10)


def test_seed_makes_the_table_reproducible():
    rng = np.random.default_rng(8)
    ref, cond = two_conditions(rng)
    runs = {"base": score_runs(ref), "BN": score_runs(cond)}
    kw = dict(n_resamples=999, ci_method="studentized")
    a = compare(runs, "score", seed=3, **kw)
    b = compare(runs, "score", seed=3, **kw)
    c = compare(runs, "score", seed=4, **kw)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a.diff_lo, c.diff_lo)
    # Monte-Carlo error of the interval ends with 999 resamples is small against the width
    np.testing.assert_allclose(a.diff_lo, c.diff_lo, atol=0.1 * (a.diff_hi - a.diff_lo).min())
    # the default t intervals draw nothing: the seed does not change them
    t3, t4 = compare(runs, "score", seed=3), compare(runs, "score", seed=4)
    pd.testing.assert_frame_equal(t3, t4)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------

# 8 seeds per condition, seed-to-seed sd 1, true difference 1; 400 independent repetitions
# (sites) in one call. Measured coverage of the nominal 95% interval (seed 0 below):
#   studentized 0.958, bca 0.913, percentile 0.908
# (over six draws of the 400 repetitions: 0.938-0.958, 0.883-0.913, 0.888-0.918).
# Percentile/BCa under-cover with 8 seeds, as theory says: they use the plug-in variance
# ((n-1)/n of the unbiased one) and normal instead of t quantiles, about P(|t_14| < 1.83) = 0.91.
# Bands: studentized must be within ~3 binomial SEs (SE = 0.011) of 0.95; the other two are
# checked to be where theory puts them, so that a change in either direction is noticed.
COVERAGE_BANDS = {"studentized": (0.92, 0.98), "bca": (0.87, 0.94), "percentile": (0.87, 0.94)}


@pytest.mark.parametrize("method", ["studentized", "bca", "percentile"])
def test_ci_coverage_with_eight_seeds(method):
    rng = np.random.default_rng(0)
    n_rep = 400
    ref = rng.normal(0.0, 1.0, (8, n_rep))
    cond = rng.normal(1.0, 1.0, (8, n_rep))
    table = compare(
        {"base": score_runs(ref), "BN": score_runs(cond)},
        "score",
        ci_method=method,
        n_resamples=2000,
    )
    covered = (table.diff_lo <= 1.0) & (1.0 <= table.diff_hi)
    lo, hi = COVERAGE_BANDS[method]
    assert lo <= covered.mean() <= hi, f"{method}: coverage {covered.mean():.3f}"


def test_ratio_ci_coverage_studentized():
    """Ratio of means 2 (means 4 vs 2, sd 0.5, 8 seeds): the delta-method bootstrap-t covers.

    Measured 0.935 here (0.92-0.95 over six draws; BCa 0.86, percentile 0.87): slightly under
    the nominal 0.95, so the band is [0.90, 0.98] (SE of one estimate 0.012).
    """
    rng = np.random.default_rng(1)
    n_rep = 400
    ref = rng.normal(2.0, 0.5, (8, n_rep))
    cond = rng.normal(4.0, 0.5, (8, n_rep))
    table = compare(
        {"base": score_runs(ref), "BN": score_runs(cond)},
        "score",
        n_resamples=2000,
        ci_method="studentized",
    )
    covered = (table.ratio_lo <= 2.0) & (2.0 <= table.ratio_hi)
    assert 0.90 <= covered.mean() <= 0.98, f"ratio coverage {covered.mean():.3f}"


def test_bh_controls_false_discoveries():
    """Average false discovery proportion at or under alpha over repeated tables (20 sites).

    All-null (no effect anywhere, 300 tables): FDP is 1 if anything is significant, so its mean
    is the family-wise error rate, which BH holds at alpha for independent tests (Simes);
    measured 0.030. The unadjusted ``p < 0.05`` flags something in most tables (measured 0.60).
    Mixed (10 of 20 sites with a 2 sd effect, 150 tables): BH's bound is 0.05 * 10/20 = 0.025;
    measured 0.021. Mann–Whitney with 8 vs 8 seeds is exact and discrete, hence conservative.
    Monte-Carlo tolerance: 2 binomial SEs at 0.05 (0.025 for 300 tables, 0.036 for 150).
    """
    rng = np.random.default_rng(2)
    n_sites = 20
    effect = np.r_[np.zeros(10), np.full(10, 2.0)]
    fdp = {"null": [], "mixed": []}
    any_raw = []
    for kind, n_rep, shift in (("null", 300, np.zeros(n_sites)), ("mixed", 150, effect)):
        for _ in range(n_rep):
            ref = rng.normal(0.0, 1.0, (8, n_sites))
            cond = rng.normal(shift, 1.0, (8, n_sites))
            t = compare({"base": score_runs(ref), "BN": score_runs(cond)}, "score", n_resamples=10)
            sig = t.significant.to_numpy(bool)
            fdp[kind].append((sig & (shift == 0)).sum() / max(sig.sum(), 1))
            if kind == "null":
                any_raw.append((t.p < 0.05).any())
    assert np.mean(fdp["null"]) <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 300), np.mean(fdp["null"])
    assert np.mean(fdp["mixed"]) <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 150), np.mean(fdp["mixed"])
    assert np.mean(any_raw) > 0.3, np.mean(any_raw)  # the problem BH solves is real here


# --------------------------------------------------------------------------------------------
# Few seeds, non-finite runs
# --------------------------------------------------------------------------------------------


def test_single_seed_gives_nan_inference_and_a_loud_warning():
    rng = np.random.default_rng(9)
    runs = {"base": score_runs(rng.normal(size=(5, 2))), "BN": score_runs(rng.normal(size=(1, 2)))}
    with pytest.warns(UserWarning, match="fewer than 2 runs with a finite metric"):
        table = compare(runs, "score", n_resamples=100)
    assert len(table) == 2
    assert table[["diff_lo", "diff_hi", "ratio_lo", "ratio_hi", "p", "q"]].isna().all().all()
    assert table.significant.isna().all()
    assert table.warning.str.contains("fewer than 2 runs").all()
    assert table["diff"].notna().all() and (table.n_cond == 1).all()


def test_rank_test_floor_is_warned_and_noted():
    rng = np.random.default_rng(10)
    runs = {
        "base": score_runs(rng.normal(0, 1, (3, 2))),
        "BN": score_runs(rng.normal(9, 1, (3, 2))),
    }
    with pytest.warns(UserWarning, match=r"3 vs 3 seeds .* cannot fall below alpha=0.05"):
        table = compare(runs, "score", n_resamples=100)
    np.testing.assert_allclose(table.min_p, 0.1)  # 2 / C(6, 3)
    np.testing.assert_allclose(table.p, 0.1)  # perfectly separated, still not significant
    assert not table.significant.any()
    assert table.note.str.contains("cannot be significant").all()
    with pytest.warns(UserWarning, match=r"4 pairs .* cannot fall below"):
        paired = compare(
            {
                "base": score_runs(rng.normal(0, 1, (4, 1))),
                "BN": score_runs(rng.normal(size=(4, 1))),
            },
            "score",
            paired=True,
            n_resamples=100,
        )
    np.testing.assert_allclose(paired.min_p, 0.125)  # 2 / 2**4
    # 4 vs 4 independent seeds can reach 2 / C(8, 4) = 0.029 < 0.05: no warning then
    ok = compare(
        {"base": score_runs(rng.normal(5, 1, (4, 1))), "BN": score_runs(rng.normal(size=(4, 1)))},
        "score",
        n_resamples=100,
    )
    np.testing.assert_allclose(ok.min_p, 2 / 70)
    assert ok.note.eq("").all()


def test_two_seeds_studentized_interval_is_unbounded_and_said_so():
    runs = {"base": score_runs([[1.0], [2.0]]), "BN": score_runs([[3.0], [5.0]])}
    with pytest.warns(UserWarning, match="cannot fall below"):
        t = compare(runs, "score", n_resamples=999, ci_method="studentized")
    assert t.diff_lo[0] == -np.inf and t.diff_hi[0] == np.inf
    assert "interval unbounded" in t.note[0]
    with pytest.warns(UserWarning, match="cannot fall below"):
        bca = compare(runs, "score", n_resamples=999, ci_method="bca")
    assert np.isfinite([bca.diff_lo[0], bca.diff_hi[0]]).all()
    assert "unbounded" not in bca.note[0]
    with pytest.warns(UserWarning, match="cannot fall below"):
        welch = compare(runs, "score")  # the default: Welch's t, bounded with 2 seeds
    assert np.isfinite([welch.diff_lo[0], welch.diff_hi[0]]).all()
    assert welch.diff_method[0] == "welch-t" and "interval unbounded" not in welch.note[0]
    # the reference mean 1.5 ± 0.5 is not significantly away from 0 with 1 df: Fieller's set
    # is unbounded, and said so
    assert welch.ratio_lo[0] == -np.inf and welch.ratio_hi[0] == np.inf
    assert "Fieller's ratio interval is unbounded" in welch.note[0]


@pytest.mark.parametrize("method", ["t", "studentized", "bca"])
def test_huge_values_do_not_overflow(method):
    """Intervals scale with the data (exactly, by a power of two) even near float64's limit."""
    rng = np.random.default_rng(20)
    ref, cond = two_conditions(rng, n_sites=2)
    kw = dict(ci_method=method, n_resamples=999)
    small = compare({"base": score_runs(ref), "BN": score_runs(cond)}, "score", **kw)
    big = compare(
        {"base": score_runs(ref * 2.0**1000), "BN": score_runs(cond * 2.0**1000)}, "score", **kw
    )
    for col in ("diff", "diff_lo", "diff_hi", "sd_cond", "sd_ref"):
        np.testing.assert_allclose(big[col], small[col] * 2.0**1000, rtol=1e-12)
    for col in ("ratio", "ratio_lo", "ratio_hi", "p"):
        np.testing.assert_allclose(big[col], small[col], rtol=1e-12)


def test_nonfinite_runs_are_counted_and_excluded():
    rng = np.random.default_rng(11)
    ref = rng.normal(0, 1, (6, 2))
    cond = rng.normal(1, 1, (7, 2))
    cond[2, 0] = np.nan  # a diverged run
    cond[5, 0] = np.inf
    ref[1, 1] = -np.inf
    with pytest.warns(UserWarning, match="non-finite metric"):
        table = compare({"base": score_runs(ref), "BN": score_runs(cond)}, "score", n_resamples=200)
    r0, r1 = table.iloc[0], table.iloc[1]
    assert (r0.n_cond, r0.n_nonfinite_cond, r0.n_ref, r0.n_nonfinite_ref) == (5, 2, 6, 0)
    assert (r1.n_cond, r1.n_nonfinite_cond, r1.n_ref, r1.n_nonfinite_ref) == (7, 0, 5, 1)
    keep = np.isfinite(cond[:, 0])
    np.testing.assert_allclose(r0.mean_cond, cond[keep, 0].mean(), rtol=1e-13)
    assert r0.p == scipy.stats.mannwhitneyu(cond[keep, 0], ref[:, 0]).pvalue
    assert np.isfinite([r0.diff_lo, r0.diff_hi, r1.diff_lo, r1.diff_hi]).all()
    assert "non-finite" in r0.note and "non-finite" in r1.note
    # paired: a pair with one non-finite run is dropped
    ref, cond = rng.normal(0, 1, (10, 2)), rng.normal(1, 1, (10, 2))
    cond[[2, 5], 0] = np.nan, np.inf
    ref[1, 1] = -np.inf
    with pytest.warns(UserWarning, match="non-finite metric"):
        paired = compare(
            {"base": score_runs(ref), "BN": score_runs(cond)},
            "score",
            paired=True,
            n_resamples=200,
        )
    assert paired.n_cond[0] == paired.n_ref[0] == 8 and paired.n_cond[1] == 9
    assert list(paired.n_nonfinite_cond) == [2, 0] and list(paired.n_nonfinite_ref) == [0, 1]
    assert "pair(s) with one non-finite run dropped" in paired.note[0]


def test_divergence_inside_a_run_propagates_to_its_metric():
    """A NaN/inf at one step of one unit makes that run's site metric non-finite (not hidden)."""
    rng = np.random.default_rng(12)
    runs = [unit_run(rng) for _ in range(10)]
    runs[1]["mean"][1, 3, 0] = np.nan  # probe, step 30, unit 0 (site "a")
    runs[7]["mean"][1, 5, 4] = np.inf  # probe, last step, unit 4 (site "b")
    with pytest.warns(UserWarning, match="non-finite"):
        table = compare({"base": runs[:5], "BN": runs[5:]}, "mean", n_resamples=50)
    assert list(table.n_nonfinite_ref) == [1, 0] and list(table.n_nonfinite_cond) == [0, 1]
    # the divergence was after step 20: a window before it is finite
    early = compare({"base": runs[:5], "BN": runs[5:]}, "mean", steps=slice(0, 20), n_resamples=50)
    assert (early.n_nonfinite_ref == 0).all() and (early.n_nonfinite_cond == 0).all()


@pytest.mark.parametrize("method", ["studentized", "bca", "percentile"])
def test_ratio_is_nan_with_a_note_when_the_reference_mean_is_zero(method):
    ref = np.array([[-1.0, 0.0], [1.0, 0.0], [-2.0, 0.0], [2.0, 0.0]])  # mean exactly 0
    cond = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    table = compare(
        {"base": score_runs(ref), "BN": score_runs(cond)},
        "score",
        n_resamples=200,
        ci_method=method,
    )
    assert table.ratio.isna().all() and table.ratio_lo.isna().all()
    assert table.note.str.contains("ratio undefined").all()
    assert np.isfinite(table["diff"]).all()
    # reference mean away from 0 but its bootstrap distribution crosses 0
    ref2 = np.array([[-3.0], [4.0], [-2.0], [2.5]])
    t2 = compare(
        {"base": score_runs(ref2), "BN": score_runs(cond[:, :1])},
        "score",
        n_resamples=200,
        ci_method=method,
    )
    assert np.isfinite(t2.ratio[0]) and np.isnan(t2.ratio_lo[0])
    assert "ratio interval undefined" in t2.note[0]


# --------------------------------------------------------------------------------------------
# Metrics, sites, reductions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", ["mean", "median", "max", "min", "last"])
def test_variable_reductions_match_numpy(reduce):
    rng = np.random.default_rng(13)
    runs = {"base": [unit_run(rng) for _ in range(2)], "BN": [unit_run(rng) for _ in range(2)]}
    df = metric_table(runs, "mean", reduce=reduce, steps=slice(10, 40))
    assert df.attrs["source"] == "probe"
    if reduce == "last":

        def numpy_reduce(a, axis):
            return np.take(a, -1, axis=axis)
    else:
        numpy_reduce = getattr(np, reduce)
    unit_reduce = getattr(np, "mean" if reduce == "last" else reduce)
    for cond, items in runs.items():
        for k, ds in enumerate(items):
            vals = ds["mean"].values[1, 1:5]  # probe, steps 10..40
            per_unit = numpy_reduce(vals, axis=0)
            expected = {"a": unit_reduce(per_unit[:3]), "b": unit_reduce(per_unit[3:])}
            got = df[(df.condition == cond) & (df.run == k)].set_index("site").value
            for s in "ab":
                np.testing.assert_allclose(got[s], expected[s], rtol=1e-12)


def test_source_select_and_run_level_metrics():
    rng = np.random.default_rng(14)
    runs = {"base": [unit_run(rng) for _ in range(4)], "BN": [unit_run(rng) for _ in range(4)]}
    train = metric_table(runs, "mean", source="train", unit_reduce="max")
    ds = runs["BN"][2]
    np.testing.assert_allclose(
        train[(train.condition == "BN") & (train.run == 2) & (train.site == "b")].value,
        ds["mean"].values[0].mean(axis=0)[3:].max(),
    )
    q85 = metric_table(runs, "quantile_value", select={"quantile": 0.85}, reduce="last")
    np.testing.assert_allclose(
        q85[(q85.condition == "BN") & (q85.run == 2) & (q85.site == "a")].value,
        ds["quantile_value"].values[1, -1, :3, 2].mean(),
    )
    loss = compare(runs, "loss", n_resamples=100, reduce="max")
    assert list(loss.site) == [RUN_LEVEL]
    np.testing.assert_allclose(
        loss.mean_cond[0], np.mean([r["loss"].values.max() for r in runs["BN"]])
    )
    with pytest.raises(ValueError, match=r"select=\{'quantile': \.\.\.\}"):
        compare(runs, "quantile_value")


def test_callable_and_registered_metrics():
    rng = np.random.default_rng(15)
    runs = {"base": [unit_run(rng) for _ in range(4)], "BN": [unit_run(rng) for _ in range(4)]}

    def spread(run, scale=1.0):
        per_site = run["mean"].sel(source="probe").std("step").groupby("unit_site").mean()
        return scale * per_site.rename(unit_site="site")

    direct = compare(runs, spread, n_resamples=100)
    assert list(direct.site) == ["a", "b"] and direct.metric[0] == "spread"
    METRICS.register("spread_test", spread, "spread of the probe means over steps", scale=3.0)
    try:
        named = compare(runs, "spread_test", metric_kwargs={"scale": 2.0}, n_resamples=100)
        default = compare(runs, "spread_test", n_resamples=100)  # the registered default
    finally:
        METRICS.unregister("spread_test")
    assert "spread_test" not in METRICS
    np.testing.assert_allclose(named.mean_cond, 2 * direct.mean_cond, rtol=1e-12)
    np.testing.assert_allclose(default.mean_cond, 3 * direct.mean_cond, rtol=1e-12)
    scalar = compare(runs, lambda run: float(run["loss"].values[-1]), n_resamples=100)
    assert list(scalar.site) == [RUN_LEVEL]
    with pytest.raises(ValueError, match="apply to variable metrics only"):
        compare(runs, spread, steps=slice(0, 10))
    with pytest.raises(TypeError, match="returned str"):
        compare(runs, lambda run: "x")


def test_site_selection_and_rename():
    rng = np.random.default_rng(16)
    base = score_runs(rng.normal(size=(4, 3)), ["1:input", "3:input", "5:input"])
    bn = score_runs(rng.normal(size=(4, 2)), ["2:input", "5:input"])
    with pytest.warns(
        UserWarning, match=r"'1:input', '3:input', '2:input'\] are missing from some runs"
    ):
        only_common = compare({"base": base, "BN": bn}, "score", n_resamples=100)
    assert list(only_common.site) == ["5:input"]
    aligned = compare(
        {"base": base, "BN": bn},
        "score",
        site=["1:input", "5:input"],
        rename_sites={"BN": {"2:input": "1:input"}},
        n_resamples=100,
    )
    assert list(aligned.site) == ["1:input", "5:input"]
    assert aligned.mean_cond[0] == np.mean([ds.score.values[0] for ds in bn])
    one = compare({"base": base, "BN": bn}, "score", site="5:input", n_resamples=100)
    assert list(one.site) == ["5:input"]


def test_paths_to_stores(tmp_path):
    """Recorded runs on disk work like datasets in memory."""
    paths = {"base": [], "BN": []}
    for cond in paths:
        for seed in range(2):
            torch.manual_seed(seed)
            layers = [torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 3)]
            if cond == "BN":
                layers.insert(1, torch.nn.BatchNorm1d(8))
            model = torch.nn.Sequential(*layers)
            opt = torch.optim.SGD(model.parameters(), 0.1)
            path = tmp_path / f"{cond}{seed}.zarr"
            rec = icstools.Recorder(
                model,
                torch.nn.Sigmoid,
                role="input",
                every=1,
                probe=torch.randn(64, 4),
                optimizer=opt,
                path=path,
            )
            with rec:
                for _ in range(3):
                    opt.zero_grad()
                    loss = model(torch.randn(16, 4)).pow(2).mean()
                    rec.log(loss=loss)
                    loss.backward()
                    opt.step()
            paths[cond].append(path if seed else str(path))
    rename = {"BN": {"2:input": "1:input"}}
    kw = dict(rename_sites=rename, n_resamples=200, ci_method="bca")
    with pytest.warns(UserWarning, match="cannot fall below"):
        from_paths = compare(paths, "var", **kw)
    datasets = {c: [icstools.open_run(p) for p in ps] for c, ps in paths.items()}
    with pytest.warns(UserWarning, match="cannot fall below"):
        from_memory = compare(datasets, "var", **kw)
    pd.testing.assert_frame_equal(from_paths, from_memory)
    assert list(from_paths.site) == ["1:input"] and from_paths.attrs["source"] == "probe"
    assert np.isfinite(from_paths[["mean_cond", "mean_ref", "diff_lo", "diff_hi"]]).all().all()


def test_attrs_describe_the_method():
    rng = np.random.default_rng(17)
    ref, cond = two_conditions(rng)
    table = compare({"base": score_runs(ref), "BN": score_runs(cond)}, "score", n_resamples=300)
    attrs = table.attrs
    assert attrs["ci_method"] == "t" and attrs["n_resamples"] == 300
    assert set(table.diff_method) == {"welch-t"} and set(table.ratio_method) == {"fieller"}
    assert "Mann-Whitney" in attrs["test"] and "Benjamini-Hochberg" in attrs["correction"]
    assert attrs["seed"] == 0 and attrs["metric"] == "score" and attrs["alpha"] == 0.05
    assert "site" in repr(table)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _good_runs():
    rng = np.random.default_rng(18)
    return {"base": score_runs(rng.normal(size=(3, 2))), "BN": score_runs(rng.normal(size=(3, 2)))}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"reference": "bn"},
            ValueError,
            "reference='bn' is not a condition. Expected one of "
            r"\['base', 'BN'\]",
        ),
        (
            {"metric": "foo"},
            ValueError,
            re.escape("Variable 'foo' does not exist. Expected one of ['score']"),
        ),
        (
            {"site": "fc9"},
            ValueError,
            r"Site 'fc9' does not exist in runs\['base'\]\[0\]. "
            r"Expected one of \['fc0:input', 'fc1:input'\]",
        ),
        ({"site": 3}, TypeError, "site must be"),
        ({"reduce": "sum"}, ValueError, r"reduce='sum' is not valid. Expected one of"),
        ({"ci_method": "bc"}, ValueError, "ci_method='bc' is not valid"),
        ({"alpha": 1.5}, ValueError, r"alpha=1.5 is not valid"),
        ({"n_resamples": 0}, ValueError, "n_resamples=0 is not valid"),
        ({"metric": 3}, TypeError, "metric must be"),
        (
            {"source": "probe", "metric": "score", "steps": slice(0, 3)},
            ValueError,
            "has no 'step' dimension",
        ),
        ({"rename_sites": {"GN": {}}}, ValueError, "condition 'GN' does not exist"),
        ({"select": {"quantile": 0.5}}, ValueError, "has no dimension 'quantile'"),
    ],
)
def test_bad_arguments_name_the_value_and_the_valid_ones(kwargs, error, match):
    kwargs = {"metric": "score", **kwargs}
    metric = kwargs.pop("metric")
    with pytest.raises(error, match=match):
        compare(_good_runs(), metric, **kwargs)


def test_bad_runs():
    runs = _good_runs()
    with pytest.raises(ValueError, match="at least two conditions"):
        compare({"base": runs["base"]}, "score")
    with pytest.raises(ValueError, match=r"runs\['BN'\] is empty"):
        compare({"base": runs["base"], "BN": []}, "score")
    with pytest.raises(TypeError, match="must be a mapping"):
        compare([runs["base"], runs["BN"]], "score")
    with pytest.raises(TypeError, match=r"runs\['BN'\] must be a list of runs"):
        compare({"base": runs["base"], "BN": runs["BN"][0]}, "score")
    with pytest.raises(TypeError, match=r"runs\['BN'\]\[1\] must be an xarray.Dataset or a path"):
        compare({"base": runs["base"], "BN": [runs["BN"][0], 42]}, "score")
    with pytest.raises(ValueError, match="same number of runs"):
        compare({"base": runs["base"], "BN": runs["BN"][:2]}, "score", paired=True)
    with pytest.raises(FileNotFoundError):
        compare({"base": runs["base"], "BN": ["/nonexistent/run.zarr"]}, "score")
    rng = np.random.default_rng(19)
    with pytest.raises(ValueError, match=r"Source 'val' does not exist .* \['train', 'probe'\]"):
        compare({"a": [unit_run(rng)], "b": [unit_run(rng)]}, "mean", source="val")
    with pytest.raises(ValueError, match="selects no record"):
        compare({"a": [unit_run(rng)], "b": [unit_run(rng)]}, "mean", steps=slice(1000, None))


def test_drift_metrics_are_registered_and_compare_recovers_more_drift():
    import icstools.analysis.drift as D

    assert set(D.METRICS) <= set(METRICS)
    rng = np.random.default_rng(11)

    def run(speed):
        steps = np.arange(5)
        x = rng.normal(size=(5, 400, 3)) + speed * steps[:, None, None]  # [step, sample, unit]
        return xr.Dataset(
            {"probe_sample": (("step", "sample", "unit"), x)},
            coords={"step": steps, "unit_site": ("unit", ["a", "a", "b"])},
        )

    runs = {"slow": [run(0.1) for _ in range(4)], "fast": [run(0.5) for _ in range(4)]}
    table = compare(runs, "w1_std", metric_kwargs={"reference": "first", "how": "median"})
    assert list(table["site"]) == ["a", "b"]
    want = []  # by hand: per run, W1/σ vs step 0, median over a site's units, mean over steps
    for ds in runs["fast"]:
        d = D.drift(ds, "first", ["w1_std"])["w1_std"].values  # [step, unit]
        want.append(np.nanmean(np.median(d[:, :2], axis=1)))
    row = table.set_index("site").loc["a"]
    assert row["condition"] == "fast" and row["reference"] == "slow"
    assert row["mean_cond"] == pytest.approx(np.mean(want), rel=1e-9)
    assert (table["ratio"] > 3).all()

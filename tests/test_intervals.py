"""The closed-form intervals of compare (Welch's t, paired t, Fieller) and their calibration.

Calibration: :func:`icstools.analysis.calibration.coverage_table` runs 20,000 simulated
experiments per cell (kind x null family x seeds per condition), through the same code compare
runs. The nulls (see that module): ``normal`` N(10, 1), ``lognormal`` exp(N(0, 0.5)) (skewed),
``t3`` 10 + Student t(3) (heavy tails); the condition's mean and spread are twice the
reference's; paired kinds share a N(0, 1) seed effect.

Every cell must cover 93–97%, except the three cells where the t intervals are conservative on
non-normal seeds with 3 seeds per condition (measured, seed 0): Welch on ``t3`` 0.970, Fieller on
``lognormal`` 0.972 and on ``t3`` 0.976. There Welch–Satterthwaite's degrees of freedom are
underestimated and the tails thicken the t quantile's job; the interval is too wide, never too
narrow, so a verdict errs toward "inconclusive". Those cells must lie in [0.95, 0.98].
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import xarray as xr

import icstools
from icstools.analysis.calibration import coverage, coverage_table, draw
from icstools.analysis.intervals import (
    fieller_interval,
    paired_t_interval,
    t_intervals,
    welch_interval,
)
from icstools.report import assess

# (kind, family, n) cells where the t intervals are conservative beyond 0.97 (docstring)
CONSERVATIVE = {("difference", "t3", 3), ("ratio", "lognormal", 3), ("ratio", "t3", 3)}


@pytest.fixture(scope="module")
def calibration():
    return coverage_table(["t"], reps=20_000, seed=0)


def test_t_intervals_cover_93_to_97_percent_at_3_5_10_seeds(calibration):
    assert len(calibration) == 4 * 3 * 3
    bad = []
    for _, row in calibration.iterrows():
        lo, hi = (0.95, 0.98) if (row.kind, row.family, row.n) in CONSERVATIVE else (0.93, 0.97)
        if not lo <= row.coverage <= hi:
            bad.append(f"{row.kind}/{row.family}/n={row.n}: {row.coverage:.4f} not in [{lo}, {hi}]")
    assert not bad, "\n".join(bad)
    # only Fieller's ratio intervals can be unbounded (reference mean not away from 0): on the
    # lognormal null (CV 53%) with 3 seeds, 24% of them; the misses are on both sides
    diffs = calibration[calibration.kind.str.endswith("difference")]
    assert diffs.unbounded.max() == 0
    assert calibration.unbounded.max() < 0.25
    assert (calibration.below > 0.005).all() and (calibration.above > 0.005).all()


def test_old_bootstrap_t_fails_the_same_harness():
    """Why it was replaced (full table: ``bench/interval_calibration.py``): with 3 seeds the
    bootstrap-t is unbounded (paired) or much wider than Welch's; with 10 seeds on heavy tails
    it under-covers."""
    out = coverage("studentized", "normal", "paired-difference", 3, reps=400)
    assert out["unbounded"] > 0.5  # a resample drawing one pair 3 times has no spread
    welch = coverage("t", "normal", "difference", 3, reps=2000)
    boot = coverage("studentized", "normal", "difference", 3, reps=2000)
    assert boot["coverage"] > 0.965 and boot["median_width"] > 1.3 * welch["median_width"]
    welch = coverage("t", "t3", "difference", 10, reps=4000)
    boot = coverage("studentized", "t3", "difference", 10, reps=4000)
    assert boot["coverage"] < 0.935 < welch["coverage"]


def test_welch_and_paired_t_equal_scipy():
    rng = np.random.default_rng(0)
    for nc, nr in ((3, 3), (3, 5), (10, 4)):
        c, r = rng.lognormal(0, 0.6, (5, nc)), rng.normal(2, 0.5, (5, nr))
        lo, hi = welch_interval(c, r, 0.9)
        for k in range(5):
            ci = scipy.stats.ttest_ind(c[k], r[k], equal_var=False).confidence_interval(0.9)
            np.testing.assert_allclose([lo[k], hi[k]], [ci.low, ci.high], rtol=1e-12)
    c, r = rng.normal(3, 1, (4, 6)), rng.normal(2, 1, (4, 6))
    lo, hi = paired_t_interval(c, r)
    for k in range(4):
        ci = scipy.stats.ttest_rel(c[k], r[k]).confidence_interval(0.95)
        np.testing.assert_allclose([lo[k], hi[k]], [ci.low, ci.high], rtol=1e-12)


def test_fieller_equals_the_inverted_t_test():
    """Fieller's ends are the ratios where the t test of ``c - ρ r`` is exactly at the level."""
    rng = np.random.default_rng(1)
    c, r = rng.normal(4, 0.5, (3, 5)), rng.normal(2, 0.3, (3, 5))
    # paired: one-sample t test of c_i - ρ r_i (exact pivot for bivariate normal seeds)
    lo, hi, ok = fieller_interval(c, r, paired=True)
    assert ok.all()
    for k in range(3):
        p = lambda rho, k=k: scipy.stats.ttest_1samp(c[k] - rho * r[k], 0).pvalue - 0.05  # noqa: E731
        est = c[k].mean() / r[k].mean()
        np.testing.assert_allclose(scipy.optimize.brentq(p, 0.1, est), lo[k], rtol=1e-9)
        np.testing.assert_allclose(scipy.optimize.brentq(p, est, 50), hi[k], rtol=1e-9)
    # unpaired: |a - ρ b| / sqrt(v_c + ρ² v_r) = t_{df}, df Welch–Satterthwaite at ρ = a/b
    lo, hi, ok = fieller_interval(c, r)
    for k in range(3):
        a, b = c[k].mean(), r[k].mean()
        vc, vr = c[k].var(ddof=1) / 5, r[k].var(ddof=1) / 5
        rho = a / b
        df = (vc + rho**2 * vr) ** 2 / (vc**2 / 4 + (rho**2 * vr) ** 2 / 4)
        t = scipy.stats.t.ppf(0.975, df)
        f = lambda x, a=a, b=b, vc=vc, vr=vr, t=t: abs(a - x * b) / np.sqrt(vc + x**2 * vr) - t  # noqa: E731
        np.testing.assert_allclose(scipy.optimize.brentq(f, 0.1, rho), lo[k], rtol=1e-9)
        np.testing.assert_allclose(scipy.optimize.brentq(f, rho, 50), hi[k], rtol=1e-9)


def test_fieller_is_unbounded_when_the_reference_mean_is_not_away_from_zero():
    lo, hi, ok = fieller_interval([[1.0, 2.0, 3.0]], [[-1.0, 0.5, 1.0]])
    assert not ok[0] and lo[0] == -np.inf and hi[0] == np.inf
    # no spread: the point
    out = t_intervals([[2.0, 2.0]], [[1.0, 1.0]], paired=False)
    assert out["diff_lo"][0] == out["diff_hi"][0] == 1.0
    assert out["ratio_lo"][0] == out["ratio_hi"][0] == 2.0


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="at least 2 values per group"):
        welch_interval([[1.0]], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="same shape"):
        paired_t_interval([[1.0, 2.0, 3.0]], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="confidence_level"):
        welch_interval([[1.0, 2.0]], [[1.0, 2.0]], 1.5)
    with pytest.raises(ValueError, match="family"):
        draw("cauchy", "ratio", 3, 10, np.random.default_rng(0))


# Per-seed sat_frac_mean of the saturating preset's tanh networks, reconstructed from the
# published summaries (0.023 ± 0.001 with BN, 0.48 ± 0.05 without, 3 seeds each; the stores
# of those runs were not kept).
TANH_BN = [0.022, 0.023, 0.024]
TANH = [0.43, 0.48, 0.53]


def _sat_run(value: float) -> xr.Dataset:
    """A run whose two tanh-input units saturate a share ``value`` of the time at every step."""
    return xr.Dataset(
        {"sat_frac": (("source", "step", "unit"), np.full((1, 3, 2), value))},
        coords={
            "source": ["train"],
            "step": [0, 10, 20],
            "unit": [0, 1],
            "unit_site": ("unit", ["h:input"] * 2),
            "unit_index": ("unit", [0, 1]),
            "site": ["h:input"],
            "sat_threshold": ("site", [2.993]),
        },
    )


def test_tanh_saturation_verdict_is_decided_by_the_evidence_not_the_method():
    runs = {"tanh": [_sat_run(v) for v in TANH], "tanh-bn": [_sat_run(v) for v in TANH_BN]}
    v = next(x for x in assess("saturating", runs) if x["id"] == "saturating/tanh-saturation")
    assert v["verdict"] == "supported", v
    eff = v["effect"]
    assert eff["method"].startswith("Welch's t interval")
    ci = scipy.stats.ttest_ind(TANH_BN, TANH, equal_var=False).confidence_interval(0.95)
    assert [eff["ci_low"], eff["ci_high"]] == pytest.approx([ci.low, ci.high])
    assert -0.59 < eff["ci_low"] < -0.57 and -0.34 < eff["ci_high"] < -0.32  # excludes 0
    # the old default, the bootstrap-t, straddles 0 on the same numbers
    scores = {
        "tanh": [xr.Dataset({"s": ((), x)}) for x in TANH],
        "tanh-bn": [xr.Dataset({"s": ((), x)}) for x in TANH_BN],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Mann–Whitney's floor with 3 vs 3 seeds
        old = icstools.compare(scores, "s", ci_method="studentized").iloc[0]
        new = icstools.compare(scores, "s").iloc[0]
    assert old.diff_lo < -1 and old.diff_hi > 1
    assert new.diff_method == "welch-t" and new.diff_hi < 0


def test_compare_paired_default_is_paired_t_and_paired_fieller():
    rng = np.random.default_rng(4)
    shared = rng.normal(0, 1, 6)
    c, r = 5 + shared + rng.normal(0, 0.3, 6), 3 + shared + rng.normal(0, 0.3, 6)
    runs = {
        "base": [xr.Dataset({"s": ((), x)}) for x in r],
        "BN": [xr.Dataset({"s": ((), x)}) for x in c],
    }
    row = icstools.compare(runs, "s", paired=True).iloc[0]
    assert row.diff_method == "paired-t" and row.ratio_method == "paired-fieller"
    ci = scipy.stats.ttest_rel(c, r).confidence_interval(0.95)
    np.testing.assert_allclose([row.diff_lo, row.diff_hi], [ci.low, ci.high], rtol=1e-12)
    lo, hi, _ = fieller_interval(c[None], r[None], paired=True)
    np.testing.assert_allclose([row.ratio_lo, row.ratio_hi], [lo[0], hi[0]], rtol=1e-12)


def test_docstring_examples_run():
    import doctest

    from icstools.analysis import calibration, intervals, tails

    for module in (intervals, calibration, tails):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__

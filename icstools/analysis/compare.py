"""Compare conditions (e.g. BatchNorm vs. baseline) across seeds, per site.

:func:`compare` takes a few runs per condition, one run per seed, reduces each run to **one
number per site** (the *metric*), and returns a tidy :class:`pandas.DataFrame` with, for every
site and every condition against the reference condition: the means, their difference and ratio,
confidence intervals over seeds, a rank test and false-discovery-rate adjusted
p-values. :func:`metric_table` returns the per-run numbers themselves (for plots of the seeds).

The statistics, and why
-----------------------
**The seed is the replicate.** Two runs of one condition differ by initialisation and data
order; that seed-to-seed spread is what a difference between conditions must beat. The units
of one run are *not* independent replicates: they share weights, inputs and training history,
and are strongly correlated. A test over units (hundreds of "samples" from a single run) is
pseudo-replication: it answers "do these two particular networks differ?", which is almost
always yes, and its p-values shrink with the width of the layer, not with the evidence. So each
run is first reduced to one number per site (units and steps are averaged, or reduced as asked,
*within* the run), and all uncertainty comes from the spread and ranks of **runs**.

**Confidence intervals over seeds.** For each site the statistic is the difference of means
``mean_cond - mean_ref`` and the ratio ``mean_cond / mean_ref``. Four interval methods
(``ci_method``); every row says which one it used (columns ``diff_method``, ``ratio_method``):

- ``"t"`` (default): closed-form t intervals (:mod:`icstools.analysis.intervals`): **Welch's t**
  for the difference (``"welch-t"``; paired: the **paired t** interval of the per-seed
  differences, ``"paired-t"``) and **Fieller's interval** for the ratio (``"fieller"``,
  ``"paired-fieller"``). Seed counts are small (3–10), and these are the intervals whose
  coverage holds there: measured by simulation at 3, 5 and 10 seeds per condition on normal,
  lognormal and Student-t(3) seed values (:mod:`icstools.analysis.calibration`,
  ``bench/interval_calibration.py``, 20,000 experiments per cell), coverage of the nominal 95%
  is 0.943–0.968 in every cell except three with 3 seeds where they are conservative
  (difference on t3 0.970, ratio on lognormal 0.972 and on t3 0.976). Fieller's interval is
  unbounded (``[-inf, inf]``, said in ``note``) when the reference mean is not significantly
  different from 0 at the confidence level: the data then bound no ratio. Nothing is drawn:
  ``seed`` and ``n_resamples`` do not change these intervals.
- ``"studentized"`` (the bootstrap-t, the default before issue 15): runs are resampled with
  replacement, each condition independently (``paired=False``) or as pairs (``paired=True``),
  ``n_resamples`` times; each resample's deviation from the estimate is divided by its own
  standard error (Welch's ``sqrt(s_c²/n_c + s_r²/n_r)``; for the ratio the delta-method one
  ``sqrt(s_c²/n_c + R² s_r²/n_r) / |mean_ref|``; paired: the standard error of the mean of the
  pairs' linearised values), and the interval is ``[est - t*_{1-α/2} se, est - t*_{α/2} se]``.
  Replaced because with 3 seeds a resample that draws one seed three times has no spread
  (1 in 9) and such resamples set the interval's ends: on the same simulations it covers
  0.97–1.00 at 3 seeds, its intervals of the difference 1.5–2.2 times as wide as Welch's
  (median; paired: unbounded in most experiments), and under-covers on heavy tails at 10
  seeds (0.926). With two seeds in a condition it is often unbounded; that is reported, not
  hidden.
- ``"bca"``: bias-corrected and accelerated percentile interval (Efron & Tibshirani 1993, §14.3;
  multi-sample jackknife as :func:`scipy.stats.bootstrap`);
- ``"percentile"``: the ``α/2`` and ``1-α/2`` quantiles of the resampled statistic. Both use
  the plug-in variance and normal rather than t quantiles, and are too narrow with few seeds:
  coverage 0.71–0.81 at 3 seeds, 0.87–0.93 at 10 on the same simulations.

``"percentile"`` and ``"bca"`` give exactly what :func:`scipy.stats.bootstrap` gives for the
same ``rng`` stream (tested). The random generator is ``numpy.random.default_rng(seed)``
(``seed=0`` by default, so a table is reproducible); per comparison it draws the condition's
resample indices ``(n_resamples, n_cond)`` then the reference's ``(n_resamples, n_ref)`` (one
draw when paired), shared by all sites with the same set of finite runs. All quantiles use
linear interpolation (numpy's default).

**The ratio** is undefined when the reference mean is (numerically) zero; with a bootstrap
method its interval is undefined when the reference mean's bootstrap or jackknife distribution
reaches zero or changes sign; both are set to NaN and said in ``note``. Use the difference
then.

**Rank tests.** Independent seeds (``paired=False``, the default): Mann–Whitney U, two-sided
(:func:`scipy.stats.mannwhitneyu`, ``method="auto"``: exact without ties for small samples,
else the normal approximation with tie correction). ``paired=True`` is for designs where run
``k`` of every condition shares its seed with run ``k`` of the reference (same initialisation
of the shared layers, same data order): the Wilcoxon signed-rank test on the per-pair
differences (:func:`scipy.stats.wilcoxon`, two-sided, zero differences dropped, ``method=
"auto"``), and pairs are resampled together. Pairing removes the shared seed-to-seed variation
and gains power; use it only when runs really share their randomness, and pass the runs in the
same seed order. Rank tests with few seeds have a floor: Mann–Whitney with 3 vs 3 seeds cannot
give a two-sided p below 0.1, Wilcoxon with 5 pairs not below 0.0625. The smallest attainable p
(without ties) is in column ``min_p``; when it exceeds ``alpha`` a ``UserWarning`` says so and
``note`` repeats it: such a row can never be significant, whatever the effect.

**Multiple sites: Benjamini–Hochberg.** One table tests many sites (and several conditions).
At ``alpha = 0.05`` per test, 20 sites with no effect at all give at least one "significant"
site most of the time. ``q`` is the Benjamini–Hochberg adjusted p-value over **all rows of the
table with a p-value** (:func:`scipy.stats.false_discovery_control`); ``significant`` is
``q <= alpha``, so the expected share of false discoveries among the significant rows is at most
``alpha``. BH assumes independent or positively dependent tests (sites of one network are
positively correlated in practice); ``correction="by"`` (Benjamini–Yekutieli) holds under any
dependence, at a loss of power.

**Non-finite runs.** A run whose metric is NaN or ±inf (typically a diverged run; within a run
every reduction propagates NaN/inf on purpose) is counted in ``n_nonfinite_cond`` /
``n_nonfinite_ref`` and excluded from the means, intervals and tests, which use the ``n_cond`` /
``n_ref`` finite runs (paired: the pairs where both are finite). Divergence is a result: a
``UserWarning`` and ``note`` say so, and the share of diverged seeds should be reported beside
the comparison (the survivors of a condition that often diverges are a selected sample).

Rows with fewer than two finite runs in a condition still appear, with NaN intervals and
p-values, a ``warning`` text and a ``UserWarning``.

Metrics
-------
``metric`` is either the name of a variable of the runs, reduced by the documented reductions
(see :func:`compare`), the name of an entry of the run-level metric registry
:data:`icstools.analysis.metrics.METRICS`, or any callable ``run -> float | xarray.DataArray``
(a DataArray with one ``site`` dimension gives one number per site). The registry holds every
drift metric of :mod:`icstools.analysis.drift` (``"w1"``, ``"w1_std"``, ``"ks"``, ``"psi"``,
…: per record against ``reference`` (default ``"first"``), the median over each site's units
(``how``), averaged over the records) and the report's one-number-per-run metrics
(``"drift"``, ``"final_acc"``, ``"sat_frac_mean"``, …); ``metric_kwargs`` override an entry's
keyword defaults::

    compare(runs, "w1_std", metric_kwargs={"reference": "previous", "how": "mean"})

Add your own with ``METRICS.register("name", func, "description", **defaults)``, ``func(run,
**metric_kwargs)``.

A string is looked up among the run's variables first, then in the registry.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from icstools.analysis.bootstrap import bootstrap_intervals
from icstools.analysis.intervals import _pow2_scale, t_intervals
from icstools.analysis.metric_values import (
    REDUCTIONS,
    RUN_LEVEL,
    MetricFunc,
    RunLike,
    _check_runs,
    _metric_values,
    metric_table,
)
from icstools.analysis.rank_tests import (
    CORRECTIONS,
    _bh,  # noqa: F401  (re-exported for tests and callers of the former single module)
    _min_p,
    _rank_tests,
    benjamini_hochberg,
)

__all__ = [
    "CI_METHODS",
    "CORRECTIONS",
    "REDUCTIONS",
    "RUN_LEVEL",
    "MetricFunc",
    "RunLike",
    "benjamini_hochberg",
    "compare",
    "metric_table",
]

#: Confidence-interval methods: ``"t"`` (closed form, the default) and three bootstraps.
CI_METHODS: tuple[str, ...] = ("t", "studentized", "bca", "percentile")

_COLUMNS = [
    "metric",
    "site",
    "condition",
    "reference",
    "n_cond",
    "n_ref",
    "n_nonfinite_cond",
    "n_nonfinite_ref",
    "mean_cond",
    "mean_ref",
    "sd_cond",
    "sd_ref",
    "diff",
    "diff_lo",
    "diff_hi",
    "ratio",
    "ratio_lo",
    "ratio_hi",
    "diff_method",
    "ratio_method",
    "test",
    "statistic",
    "p",
    "min_p",
    "q",
    "significant",
    "note",
    "warning",
]


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------


def compare(
    runs: Mapping[str, Sequence[RunLike]],
    metric: str | MetricFunc,
    *,
    site: str | Sequence[str] | None = None,
    reference: str | None = None,
    paired: bool = False,
    alpha: float = 0.05,
    confidence_level: float = 0.95,
    ci_method: Literal["t", "studentized", "bca", "percentile"] = "t",
    n_resamples: int = 9999,
    seed: int | np.random.Generator | None = 0,
    correction: Literal["bh", "by"] = "bh",
    reduce: str | None = None,
    unit_reduce: str | None = None,
    steps: slice | Sequence[int] | int | None = None,
    source: str | None = None,
    select: Mapping[str, Any] | None = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    rename_sites: Mapping[str, Mapping[str, str]] | None = None,
) -> pd.DataFrame:
    """Compare conditions across seeds, per site: effect sizes, t intervals, rank tests, FDR.

    Each run is one seed. Every run is reduced to one number per site (the metric); then, for
    each site and each condition other than the reference, the condition's runs are compared
    with the reference's runs. The statistics are explained in the module docstring
    (:mod:`icstools.analysis.compare`).

    Parameters
    ----------
    runs : mapping of str to list of (xarray.Dataset or path)
        ``{condition: [run, ...]}``, at least two conditions, one run per seed. Paths are opened
        with :func:`icstools.open_run`.
    metric : str or callable
        The name of a variable of the runs (reduced as described under ``reduce``), the name of
        a metric of :data:`icstools.analysis.metrics.METRICS`, or a callable
        ``run -> float | xarray.DataArray`` (a DataArray with one ``site`` dimension, labelled,
        gives one number per site; a float is one number per run, site label ``"(run)"``).
    site : str, list of str or None
        Sites to compare; None: every site present in all runs.
    reference : str, optional
        The condition the others are compared with; default the first key of ``runs``.
    paired : bool, default False
        False: seeds are independent between conditions (Mann–Whitney U; seeds resampled within
        each condition independently). True: run ``k`` of each condition shares its seed (data
        order, initialisation) with run ``k`` of the reference (Wilcoxon signed-rank; pairs
        resampled together); needs equally many runs per condition.
    alpha : float, default 0.05
        Level of the FDR-adjusted test: ``significant = q <= alpha``.
    confidence_level : float, default 0.95
        Of the intervals.
    ci_method : {"t", "studentized", "bca", "percentile"}
        ``"t"``: Welch's t / paired t for the difference, Fieller's interval for the ratio
        (calibrated for 3–10 seeds); the others are bootstraps. See the module docstring for
        their coverage with few seeds.
    n_resamples : int, default 9999
        Bootstrap resamples (bootstrap methods only).
    seed : int, numpy.random.Generator or None, default 0
        Seeds ``numpy.random.default_rng``; fixed by default so that a table is reproducible.
        None draws fresh entropy.
    correction : {"bh", "by"}, default "bh"
        Benjamini–Hochberg or Benjamini–Yekutieli, over all rows of the table with a p-value.
    reduce : {"mean", "median", "max", "min", "last"}, optional
        Variable metrics only. Reduction of each run's variable over its recorded steps (within
        ``steps``), default ``"mean"``; ``"last"`` takes the last recorded step. Applied before
        ``unit_reduce``. NaN and inf propagate (a diverged run stays non-finite).
    unit_reduce : {"mean", "median", "max", "min"}, optional
        Variable metrics with a ``unit`` dimension only: reduction over the units of each site
        (grouped by the ``unit_site`` coordinate), after the step reduction. Default: the same
        as ``reduce``, ``"mean"`` when ``reduce="last"``.
    steps : slice, list of int or int, optional
        Variable metrics only: steps to keep, by step label (``slice(100, None)``: from step 100
        on, both ends inclusive as in ``Dataset.sel``).
    source : str, optional
        Variable metrics with a ``source`` dimension only: ``"probe"`` or ``"train"``; default
        ``"probe"`` when recorded, else the single recorded source.
    select : mapping, optional
        Variable metrics only: values of other dimensions, e.g. ``{"quantile": 0.85}`` for
        ``quantile_value``, ``{"param": "0.weight"}``.
    metric_kwargs : mapping, optional
        Keyword arguments for a callable or registered metric (over a registered metric's
        defaults, :attr:`icstools.analysis.metrics.Metric.defaults`).
    rename_sites : mapping, optional
        ``{condition: {site: common name}}``, applied to the metric's sites before sites are
        matched across conditions (e.g. a BN model's ``"2:input"`` is the baseline's
        ``"1:input"``).

    Returns
    -------
    pandas.DataFrame
        One row per (site, condition other than the reference), sites in order. Columns:

        - ``metric``, ``site``, ``condition``, ``reference``;
        - ``n_cond``, ``n_ref``: runs with a finite metric used (paired: complete pairs);
          ``n_nonfinite_cond``, ``n_nonfinite_ref``: runs with a NaN/inf metric (excluded);
        - ``mean_cond``, ``mean_ref``, ``sd_cond``, ``sd_ref`` (ddof=1) over those runs;
        - ``diff = mean_cond - mean_ref`` and its interval ``diff_lo``, ``diff_hi``;
        - ``ratio = mean_cond / mean_ref`` and ``ratio_lo``, ``ratio_hi`` (NaN when undefined);
        - ``diff_method``, ``ratio_method``: the interval used (``"welch-t"``, ``"paired-t"``,
          ``"fieller"``, ``"paired-fieller"``, ``"bootstrap-t"``, ``"bca"``, ``"percentile"``;
          ``""`` without an interval);
        - ``test`` (``"mannwhitneyu"`` or ``"wilcoxon"``), ``statistic`` (U of the condition,
          or Wilcoxon's W), ``p`` (two-sided), ``min_p`` (smallest attainable p at these
          sizes), ``q`` (adjusted p), ``significant`` (nullable boolean, NA without a test);
        - ``note`` (caveats), ``warning`` (why a row has no interval or test; "" if none).

        ``attrs`` describe the metric, resampling, interval method, test and correction.

    Raises
    ------
    TypeError
        ``runs``, a run, ``metric``, ``site`` or an option of the wrong type.
    ValueError
        Fewer than two conditions, an empty run list, an unknown reference, variable, site,
        source, step or option value.

    Warns
    -----
    UserWarning
        A condition with fewer than two finite runs at a site; a rank test that cannot reach
        ``p < alpha`` at these sizes; runs with a non-finite metric; sites left out.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> rng = np.random.default_rng(0)
    >>> def run(shift):
    ...     return xr.Dataset({"score": ("site", rng.normal(shift, 1, 2))},
    ...                       coords={"site": ["fc1", "fc2"]})
    >>> table = compare({"baseline": [run(0) for _ in range(8)],
    ...                  "BN": [run(2) for _ in range(8)]}, "score")
    >>> table[["site", "condition", "n_cond", "significant"]]
      site condition  n_cond  significant
    0  fc1        BN       8         True
    1  fc2        BN       8         True

    With recorded runs: ``compare({"BN": bn_paths, "baseline": base_paths}, "sat_frac",
    steps=slice(1000, None), source="probe")``.
    """
    _check_options(paired, alpha, confidence_level, ci_method, correction, n_resamples, seed)
    checked, reference = _check_conditions(runs, reference, paired)
    values, sites, info, site_notes = _metric_values(
        checked,
        metric,
        site=site,
        reduce=reduce,
        unit_reduce=unit_reduce,
        steps=steps,
        source=source,
        select=select,
        metric_kwargs=metric_kwargs,
        rename_sites=rename_sites,
    )
    rng = np.random.default_rng(seed)
    others = [c for c in checked if c != reference]
    interval = {
        "method": ci_method,
        "n_resamples": int(n_resamples),
        "confidence_level": float(confidence_level),
        "rng": rng,
    }
    results: dict[tuple[str, str], dict[str, Any]] = {}
    caveats: dict[str, list[str]] = {"few": [], "floors": [], "diverged": []}
    for cond in others:
        rows = _condition_rows(
            values[cond], values[reference], sites, paired=paired, alpha=alpha, interval=interval
        )
        results.update({(s, cond): row for s, row in zip(sites, rows, strict=True)})
        _note_caveats(caveats, rows, sites, cond, reference, values, paired=paired, alpha=alpha)

    records = [
        {
            "metric": info["metric"],
            "site": s,
            "condition": cond,
            "reference": reference,
            **results[(s, cond)],
        }
        for s in sites
        for cond in others
    ]
    df = pd.DataFrame.from_records(records)
    df["q"] = benjamini_hochberg(df["p"].to_numpy(np.float64), method=correction)
    df["significant"] = pd.array(
        [pd.NA if np.isnan(q) else bool(q <= alpha) for q in df["q"]], dtype="boolean"
    )
    df = df[_COLUMNS]
    _warn_caveats(caveats, site_notes, "wilcoxon" if paired else "mannwhitneyu", alpha)
    df.attrs.update(info)
    df.attrs.update(
        _table_attrs(
            paired, ci_method, confidence_level, n_resamples, seed, correction, alpha, site_notes
        )
    )
    df.attrs["correction"] += f" over all {int(df['p'].notna().sum())} rows with a p-value"
    return df


def _check_options(
    paired: object,
    alpha: object,
    confidence_level: object,
    ci_method: object,
    correction: object,
    n_resamples: object,
    seed: object,
) -> None:
    """Raise on an option of :func:`compare` of the wrong type or value."""
    if not isinstance(paired, bool | np.bool_):
        raise TypeError(f"paired must be True or False, got {paired!r}")
    for name, value in (("alpha", alpha), ("confidence_level", confidence_level)):
        if not isinstance(value, numbers.Real) or not 0 < float(value) < 1:
            raise ValueError(f"{name}={value!r} is not valid: expected a number in (0, 1)")
    if ci_method not in CI_METHODS:
        raise ValueError(
            f"ci_method={ci_method!r} is not valid. Expected one of {list(CI_METHODS)}"
        )
    if correction not in CORRECTIONS:
        raise ValueError(
            f"correction={correction!r} is not valid. Expected one of {list(CORRECTIONS)}"
        )
    if (
        isinstance(n_resamples, bool)
        or not isinstance(n_resamples, numbers.Integral)
        or n_resamples < 1
    ):
        raise ValueError(f"n_resamples={n_resamples!r} is not valid: expected an integer >= 1")
    if not (seed is None or isinstance(seed, np.random.Generator | numbers.Integral)):
        raise TypeError(f"seed must be an int, a numpy Generator or None, got {seed!r}")


def _check_conditions(
    runs: object, reference: str | None, paired: bool
) -> tuple[dict[str, list[Any]], str]:
    """The runs by condition, checked, and the reference (default: the first condition)."""
    checked = _check_runs(runs)
    conditions = list(checked)
    if len(conditions) < 2:
        raise ValueError(
            f"compare needs at least two conditions, got {conditions}; "
            "use metric_table() to look at one condition"
        )
    if reference is None:
        reference = conditions[0]
    elif reference not in checked:
        raise ValueError(
            f"reference={reference!r} is not a condition. Expected one of {conditions}"
        )
    if paired:
        sizes = {c: len(v) for c, v in checked.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"paired=True needs the same number of runs in every condition, got {sizes}"
            )
    return checked, reference


def _condition_rows(
    cond_all: np.ndarray,
    ref_all: np.ndarray,
    sites: list[str],
    *,
    paired: bool,
    alpha: float,
    interval: dict[str, Any],
) -> list[dict[str, Any]]:
    """One row per site of a condition against the reference (``[site, run]`` metrics each):
    means, intervals and rank tests over the runs with a finite metric."""
    fin_c, fin_r = np.isfinite(cond_all), np.isfinite(ref_all)
    if paired:
        fin_c = fin_r = fin_c & fin_r
    # sites with the same set of finite runs share one bootstrap draw
    groups: dict[tuple[bytes, bytes], list[int]] = {}
    for j in range(len(sites)):
        groups.setdefault((fin_c[j].tobytes(), fin_r[j].tobytes()), []).append(j)
    out: list[dict[str, Any] | None] = [None] * len(sites)
    for rows in groups.values():
        mc_, mr_ = fin_c[rows[0]], fin_r[rows[0]]
        xc, xr_ = cond_all[rows][:, mc_], ref_all[rows][:, mr_]  # [sites of the group, runs]
        boot = tests = None
        if xc.shape[1] >= 2 and xr_.shape[1] >= 2:
            tests = _rank_tests(xc, xr_, paired)
            boot = _intervals(xc, xr_, paired=paired, **interval)
        for k, j in enumerate(rows):
            out[j] = _row(
                xc[k],
                xr_[k],
                cond_all[j],
                ref_all[j],
                boot,
                None if tests is None else tests[k],
                k,
                paired,
                alpha,
            )
    return out  # type: ignore[return-value]


def _note_caveats(
    caveats: dict[str, list[str]],
    rows: list[dict[str, Any]],
    sites: list[str],
    cond: str,
    reference: str,
    values: Mapping[str, np.ndarray],
    *,
    paired: bool,
    alpha: float,
) -> None:
    """Add a condition's rows without a test, rows that cannot be significant at their sizes
    and runs with a non-finite metric to ``caveats`` (``few``, ``floors``, ``diverged``)."""
    n_cond, n_ref = values[cond].shape[1], values[reference].shape[1]
    for s, row in zip(sites, rows, strict=True):
        where = f"site {s!r}" if s != RUN_LEVEL else "the run-level metric"
        if row["warning"]:
            caveats["few"].append(
                f"{cond!r} vs {reference!r} at {where} (n={row['n_cond']} vs {row['n_ref']})"
            )
        elif row["min_p"] > alpha:
            caveats["floors"].append(
                f"{row['n_cond']} pairs" if paired else f"{row['n_cond']} vs {row['n_ref']} seeds"
            )
        nn_c, nn_r = row["n_nonfinite_cond"], row["n_nonfinite_ref"]
        if nn_c or nn_r:
            caveats["diverged"].append(
                f"{where}: {nn_c} of {n_cond} runs of {cond!r}, {nn_r} of {n_ref} of {reference!r}"
            )


def _warn_caveats(
    caveats: dict[str, list[str]], site_notes: list[str], test_name: str, alpha: float
) -> None:
    """One warning per kind of caveat of the table (and one per site note)."""
    few, floors, diverged = caveats["few"], caveats["floors"], caveats["diverged"]
    if few:
        warnings.warn(
            "fewer than 2 runs with a finite metric, so no confidence interval or p-value "
            f"(NaN) for: {'; '.join(few[:10])}{' ...' if len(few) > 10 else ''}. Add seeds.",
            UserWarning,
            stacklevel=3,
        )
    if floors:
        sizes_txt = ", ".join(sorted(set(floors)))
        warnings.warn(
            f"with {sizes_txt} the two-sided {test_name} p-value cannot fall below "
            f"alpha={alpha} (see column min_p): these rows can never be significant, whatever "
            "the effect. Add seeds.",
            UserWarning,
            stacklevel=3,
        )
    if diverged:
        warnings.warn(
            "runs with a non-finite metric (diverged?) are excluded from means, intervals and "
            f"tests and counted in n_nonfinite_*: {'; '.join(diverged[:10])}"
            f"{' ...' if len(diverged) > 10 else ''}",
            UserWarning,
            stacklevel=3,
        )
    for msg in site_notes:
        warnings.warn(msg, UserWarning, stacklevel=3)


def _table_attrs(
    paired: bool,
    ci_method: str,
    confidence_level: float,
    n_resamples: int,
    seed: Any,
    correction: str,
    alpha: float,
    site_notes: list[str],
) -> dict[str, Any]:
    """The table's description of its replication, resampling, intervals, test and
    correction (the caller adds the number of rows the correction went over)."""
    return {
        "unit_of_replication": "run (seed)",
        "resampling": (
            "none (closed-form t intervals: "
            + ("paired t, paired Fieller)" if paired else "Welch's t, Fieller)")
            if ci_method == "t"
            else "pairs of runs resampled together"
            if paired
            else "runs resampled with replacement within each condition independently"
        ),
        "ci_method": ci_method,
        "confidence_level": float(confidence_level),
        "n_resamples": int(n_resamples),
        "seed": seed if isinstance(seed, numbers.Integral) or seed is None else repr(seed),
        "test": (
            "Wilcoxon signed-rank, two-sided, zero differences dropped "
            "(scipy.stats.wilcoxon, method='auto')"
            if paired
            else "Mann-Whitney U, two-sided (scipy.stats.mannwhitneyu, method='auto')"
        ),
        "correction": "Benjamini-Hochberg" if correction == "bh" else "Benjamini-Yekutieli",
        "alpha": float(alpha),
        "nonfinite": "runs with a NaN/inf metric excluded, counted in n_nonfinite_*",
        "sites_left_out": "; ".join(site_notes),
    }


#: ``diff_method``/``ratio_method`` of the bootstrap ``ci_method`` values.
_BOOTSTRAP_NAMES = {"studentized": "bootstrap-t", "bca": "bca", "percentile": "percentile"}


def _intervals(
    xc: np.ndarray,
    xr_: np.ndarray,
    *,
    paired: bool,
    method: str,
    n_resamples: int,
    confidence_level: float,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Interval ends of the difference and the ratio per row, and the methods' names."""
    if method == "t":
        out: dict[str, Any] = t_intervals(xc, xr_, paired=paired, confidence_level=confidence_level)
        out["ratio_ci_undefined"] = xr_.mean(axis=1) == 0
        return out
    out = bootstrap_intervals(
        xc,
        xr_,
        paired=paired,
        method=method,
        n_resamples=n_resamples,
        confidence_level=confidence_level,
        rng=rng,
    )
    out["diff_method"] = out["ratio_method"] = _BOOTSTRAP_NAMES[method]
    out["ratio_unbounded"] = np.zeros(xc.shape[0], dtype=bool)
    return out


def _row(
    c: np.ndarray,
    r: np.ndarray,
    c_all: np.ndarray,
    r_all: np.ndarray,
    boot: dict[str, np.ndarray] | None,
    test: tuple[float, float, str] | None,
    k: int,
    paired: bool,
    alpha: float,
) -> dict[str, Any]:
    """Everything of one table row but the correction, from the finite values ``c``, ``r``."""
    nc, nr = c.size, r.size
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean/std of 0 or 1 values -> NaN
        mean_c = float(np.mean(c)) if nc else np.nan
        mean_r = float(np.mean(r)) if nr else np.nan
        sd_c = _sd(c) if nc > 1 else np.nan
        sd_r = _sd(r) if nr > 1 else np.nan
    row: dict[str, Any] = {
        "n_cond": nc,
        "n_ref": nr,
        "n_nonfinite_cond": int(np.sum(~np.isfinite(c_all))),
        "n_nonfinite_ref": int(np.sum(~np.isfinite(r_all))),
        "mean_cond": mean_c,
        "mean_ref": mean_r,
        "sd_cond": sd_c,
        "sd_ref": sd_r,
        "diff": mean_c - mean_r,
        "test": "wilcoxon" if paired else "mannwhitneyu",
    }
    if paired:
        dropped = int(np.sum(np.isfinite(c_all) != np.isfinite(r_all)))
        if dropped:
            notes.append(f"{dropped} pair(s) with one non-finite run dropped")
    if row["n_nonfinite_cond"] or row["n_nonfinite_ref"]:
        notes.append(
            f"{row['n_nonfinite_cond']} run(s) of the condition and {row['n_nonfinite_ref']} of "
            "the reference have a non-finite metric (diverged?): excluded"
        )
    ref_scale = float(np.max(np.abs(r))) if nr else 0.0
    ratio_defined = nr > 0 and abs(mean_r) > np.finfo(np.float64).eps * ref_scale
    row["ratio"] = mean_c / mean_r if ratio_defined else np.nan
    if nr and not ratio_defined:
        notes.append("reference mean is 0 (to rounding): ratio undefined, see diff")
    if boot is None or test is None:
        row.update(
            diff_lo=np.nan,
            diff_hi=np.nan,
            ratio_lo=np.nan,
            ratio_hi=np.nan,
            diff_method="",
            ratio_method="",
            statistic=np.nan,
            p=np.nan,
            min_p=np.nan,
        )
        row["warning"] = (
            f"fewer than 2 runs with a finite metric (condition {nc}, reference {nr}): "
            "no confidence interval or test"
        )
    else:
        _add_intervals(row, notes, boot, k, ratio_defined)
        _add_test(row, notes, test, paired, alpha)
    row["note"] = "; ".join(notes)
    return row


def _add_intervals(
    row: dict[str, Any],
    notes: list[str],
    boot: dict[str, np.ndarray],
    k: int,
    ratio_defined: bool,
) -> None:
    """Row ``k``'s interval ends of the difference and the ratio into ``row``, and notes on
    intervals that are unbounded or undefined."""
    row["diff_lo"], row["diff_hi"] = float(boot["diff_lo"][k]), float(boot["diff_hi"][k])
    row["diff_method"], row["ratio_method"] = boot["diff_method"], boot["ratio_method"]
    ends = [row["diff_lo"], row["diff_hi"]]
    if ratio_defined and not boot["ratio_ci_undefined"][k]:
        row["ratio_lo"] = float(boot["ratio_lo"][k])
        row["ratio_hi"] = float(boot["ratio_hi"][k])
        if boot["ratio_unbounded"][k]:
            notes.append(
                "Fieller's ratio interval is unbounded: the reference mean is not "
                "significantly different from 0 at this confidence level; see diff"
            )
        else:
            ends += [row["ratio_lo"], row["ratio_hi"]]
    else:
        row["ratio_lo"] = row["ratio_hi"] = np.nan
        if ratio_defined:
            notes.append(
                "the reference mean's bootstrap/jackknife distribution reaches 0: "
                "ratio interval undefined, see diff"
            )
    if np.isinf(ends).any():
        notes.append(
            "interval unbounded: resamples without spread (too few seeds or "
            "many equal values); ci_method='t' or 'bca' stays bounded"
        )
    elif np.isnan(ends).any():
        notes.append("interval undefined: degenerate bootstrap distribution")


def _add_test(
    row: dict[str, Any],
    notes: list[str],
    test: tuple[float, float, str],
    paired: bool,
    alpha: float,
) -> None:
    """The rank test's statistic, p-value and smallest attainable p into ``row``, and a note
    where that p cannot reach ``alpha``."""
    stat, p, test_note = test
    row["statistic"], row["p"] = stat, p
    if test_note:
        notes.append(test_note)
    nc, nr = row["n_cond"], row["n_ref"]
    row["min_p"] = _min_p(paired, nc, nr)
    if row["min_p"] > alpha:
        sizes = f"{nc} pairs" if paired else f"{nc} vs {nr} seeds"
        notes.append(
            f"{row['test']} with {sizes} cannot give p below "
            f"{row['min_p']:.3g} > alpha={alpha}: cannot be significant; add seeds"
        )
    row["warning"] = ""


def _sd(x: np.ndarray) -> float:
    """Sample standard deviation (ddof=1), without overflow for huge values."""
    scale = float(_pow2_scale(x[None])[0])
    return float(np.std(x / scale, ddof=1)) * scale

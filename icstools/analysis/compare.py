"""Compare conditions (e.g. BatchNorm vs. baseline) across seeds, per site.

:func:`compare` takes a few runs per condition, one run per seed, reduces each run to **one
number per site** (the *metric*), and returns a tidy :class:`pandas.DataFrame` with, for every
site and every condition against the reference condition: the means, their difference and ratio,
bootstrap confidence intervals over seeds, a rank test and false-discovery-rate adjusted
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
*within* the run), and all uncertainty comes from resampling and ranking **runs**.

**Bootstrap confidence intervals over seeds.** For each site, the ``n_cond`` and ``n_ref``
per-run values are resampled with replacement, each condition independently (``paired=False``),
or as pairs (``paired=True``), ``n_resamples`` times; the statistic is the difference of means
``mean_cond - mean_ref`` and the ratio ``mean_cond / mean_ref``. Three interval methods:

- ``"studentized"`` (default, the bootstrap-t): each resample's deviation from the estimate is
  divided by its own standard error (Welch's ``sqrt(s_c²/n_c + s_r²/n_r)``; for the ratio the
  delta-method one ``sqrt(s_c²/n_c + R² s_r²/n_r) / |mean_ref|``; paired: the standard error of
  the mean of the pairs' linearised values), and the interval is
  ``[est - t*_{1-α/2} se, est - t*_{α/2} se]``. Seed counts are small (3-10); the percentile and
  BCa intervals are then too narrow: they use the plug-in variance (``(n-1)/n`` of the unbiased
  one) and normal rather than t quantiles. Measured (``tests/test_compare.py``; normal seeds,
  true difference 1, seed sd 1, 8 seeds per condition, 400 independent repetitions, six draws
  of those): coverage of the nominal 95% interval of the difference is 0.94-0.96 for
  ``"studentized"``, 0.88-0.91 for ``"bca"`` and 0.89-0.92 for ``"percentile"``. For the ratio
  (means 4 vs 2, sd 0.5): 0.92-0.95 for ``"studentized"`` (a little under nominal), 0.86 for
  ``"bca"`` and 0.87 for ``"percentile"`` (one draw).
  With two seeds in a condition the bootstrap-t interval is often unbounded (a resample that
  draws one seed twice has a zero standard error); that is reported, not hidden.
- ``"bca"``: bias-corrected and accelerated percentile interval (Efron & Tibshirani 1993, §14.3;
  multi-sample jackknife as :func:`scipy.stats.bootstrap`);
- ``"percentile"``: the ``α/2`` and ``1-α/2`` quantiles of the resampled statistic.

``"percentile"`` and ``"bca"`` give exactly what :func:`scipy.stats.bootstrap` gives for the
same ``rng`` stream (tested). The random generator is ``numpy.random.default_rng(seed)``
(``seed=0`` by default, so a table is reproducible); per comparison it draws the condition's
resample indices ``(n_resamples, n_cond)`` then the reference's ``(n_resamples, n_ref)`` (one
draw when paired), shared by all sites with the same set of finite runs. All quantiles use
linear interpolation (numpy's default).

**The ratio** is undefined when the reference mean is (numerically) zero, and its interval is
undefined when the reference mean's bootstrap or jackknife distribution reaches zero or changes
sign; both are set to NaN and said in ``note``. Use the difference then.

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

import functools
import numbers
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.stats
import xarray as xr
from scipy.special import ndtr, ndtri

from icstools.analysis import metrics as _registry
from icstools.store import open_run

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

#: A run: an in-memory dataset, or the path of a store (opened with :func:`icstools.open_run`).
RunLike = xr.Dataset | str | os.PathLike
#: A metric callable: ``func(run, **metric_kwargs) -> float | xarray.DataArray (site,)``.
MetricFunc = Callable[..., Any]

#: Reductions of a variable over steps (and, by default, over the units of a site).
REDUCTIONS: tuple[str, ...] = ("mean", "median", "max", "min", "last")
#: Bootstrap confidence-interval methods.
CI_METHODS: tuple[str, ...] = ("studentized", "bca", "percentile")
#: Multiple-testing corrections: Benjamini–Hochberg, Benjamini–Yekutieli.
CORRECTIONS: tuple[str, ...] = ("bh", "by")
#: Site label of a metric that is one number per run (no site dimension), e.g. ``"loss"``.
RUN_LEVEL = "(run)"

_UNIT_REDUCTIONS = ("mean", "median", "max", "min")
_REDUCERS: dict[str, Callable[..., np.ndarray]] = {
    # plain numpy reductions: NaN and inf propagate (a diverged run stays non-finite)
    "mean": np.mean,
    "median": np.median,
    "max": np.max,
    "min": np.min,
}
# elements per chunk of the gathered bootstrap resamples (sites x resamples x seeds)
_CHUNK_ELEMENTS = 1_000_000

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
# Runs and metrics
# --------------------------------------------------------------------------------------------


def _fmt_list(values: Sequence[Any], limit: int = 30) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return f"[{shown}{more}]"


def _check_runs(runs: Any) -> dict[str, list[Any]]:
    """Validate the ``{condition: [runs...]}`` mapping (types, emptiness), keep the order."""
    if not isinstance(runs, Mapping):
        raise TypeError(
            "runs must be a mapping {condition name: [runs...]}, e.g. "
            f"{{'BN': [ds1, ds2], 'baseline': [ds3, ds4]}}; got {type(runs).__name__}"
        )
    out: dict[str, list[Any]] = {}
    for cond, items in runs.items():
        if not isinstance(cond, str):
            raise TypeError(f"condition names must be str, got {cond!r} ({type(cond).__name__})")
        if isinstance(items, xr.Dataset | str | bytes | os.PathLike) or not isinstance(
            items, Sequence
        ):
            raise TypeError(
                f"runs[{cond!r}] must be a list of runs (xarray.Dataset or store paths), "
                f"got {type(items).__name__}; wrap a single run in a list"
            )
        if len(items) == 0:
            raise ValueError(f"runs[{cond!r}] is empty: give at least one run (one per seed)")
        for i, run in enumerate(items):
            if not isinstance(run, xr.Dataset | str | os.PathLike):
                raise TypeError(
                    f"runs[{cond!r}][{i}] must be an xarray.Dataset or a path to a run store, "
                    f"got {type(run).__name__}"
                )
        out[cond] = list(items)
    if not out:
        raise ValueError("runs is empty: give {condition name: [runs...]}")
    return out


def _load(run: RunLike) -> xr.Dataset:
    return run if isinstance(run, xr.Dataset) else open_run(run)


def _where(cond: str, i: int, run: RunLike) -> str:
    return f"runs[{cond!r}][{i}]" + ("" if isinstance(run, xr.Dataset) else f" ({run})")


def _choose_source(ds: xr.Dataset, source: str | None, where: str) -> str:
    available = [str(s) for s in ds["source"].values] if "source" in ds.coords else []
    if source is not None:
        if source not in available:
            raise ValueError(
                f"Source {source!r} does not exist in {where}. Expected one of {available}"
            )
        return source
    if "probe" in available:
        return "probe"
    if len(available) == 1:
        return available[0]
    raise ValueError(f"{where} has sources {available}; choose one with source=...")


def _variable_metric(
    ds: xr.Dataset,
    name: str,
    *,
    reduce: str,
    unit_reduce: str,
    steps: Any,
    source: str | None,
    select: Mapping[str, Any] | None,
    where: str,
) -> tuple[dict[str, float], str | None]:
    """One number per site (or per run) from variable ``name``; returns it and the source."""
    da = ds[name]
    used_source = None
    if "source" in da.dims:
        used_source = _choose_source(ds, source, where)
        da = da.sel(source=used_source)
    for dim, value in (select or {}).items():
        if dim not in da.dims:
            raise ValueError(
                f"select: variable {name!r} has no dimension {dim!r}. "
                f"Expected one of {list(da.dims)}"
            )
        try:
            da = da.sel({dim: value})
        except KeyError:
            have = da[dim].values.tolist() if dim in da.coords else list(range(da.sizes[dim]))
            raise ValueError(
                f"select: {dim}={value!r} does not exist in {where}. Expected one of "
                f"{_fmt_list(have)}"
            ) from None
    if steps is not None:
        if "step" not in da.dims:
            raise ValueError(
                f"steps= was given but variable {name!r} has no 'step' dimension "
                f"(dims {list(da.dims)})"
            )
        try:
            da = da.sel(step=steps)
        except KeyError as exc:
            raise ValueError(
                f"steps={steps!r} does not exist in {where} (recorded steps "
                f"{_fmt_list(da['step'].values.tolist())}): {exc}"
            ) from None
        if "step" in da.dims and da.sizes["step"] == 0:
            recorded = ds["step"].values
            span = f"{recorded.min()}..{recorded.max()}" if recorded.size else "none"
            raise ValueError(
                f"steps={steps!r} selects no record of {where} (recorded steps: {span})"
            )
    if "step" in da.dims and da.sizes["step"] == 0:
        raise ValueError(f"{where} has no recorded step")
    extra = [d for d in da.dims if d not in ("step", "unit", "site")]
    if extra:
        raise ValueError(
            f"variable {name!r} has dimension(s) {extra} besides step/unit/site; pick one value "
            f"with select={{{extra[0]!r}: ...}} or pass a callable metric"
        )
    if "unit" in da.dims and "site" in da.dims:
        raise ValueError(f"variable {name!r} has both 'unit' and 'site' dimensions")
    arr = np.asarray(da.values, dtype=np.float64)
    dims = list(da.dims)
    with np.errstate(invalid="ignore", over="ignore"):
        if "step" in dims:
            axis = dims.index("step")
            if reduce == "last":
                arr = np.take(arr, -1, axis=axis)
            else:
                arr = _REDUCERS[reduce](arr, axis=axis)
            dims.remove("step")
        if dims == ["unit"]:
            if "unit_site" not in da.coords:
                raise ValueError(
                    f"variable {name!r} has a 'unit' dimension but {where} has no 'unit_site' "
                    "coordinate mapping units to sites"
                )
            labels = np.asarray([str(s) for s in da["unit_site"].values])
            present = list(dict.fromkeys(labels.tolist()))
            if "site" in ds.coords:
                order = [str(s) for s in ds["site"].values]
                present = [s for s in order if s in present] + [
                    s for s in present if s not in order
                ]
            reducer = _REDUCERS[unit_reduce]
            return {s: float(reducer(arr[labels == s])) for s in present}, used_source
    if dims == ["site"]:
        if "site" not in da.coords:
            raise ValueError(f"variable {name!r} has a 'site' dimension without labels")
        return _per_site(da["site"].values, arr, f"variable {name!r} of {where}"), used_source
    return {RUN_LEVEL: float(arr)}, used_source


def _per_site(labels: Any, values: Any, what: str) -> dict[str, float]:
    """``{site: value}`` from labels and values; duplicate labels are an error."""
    keys = [str(x) for x in labels]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"{what} has duplicate sites {dup}")
    return dict(zip(keys, np.asarray(values, dtype=np.float64).tolist(), strict=True))


def _callable_result(result: Any, name: str, where: str) -> dict[str, float]:
    """Normalise what a metric callable returned to ``{site: value}``."""
    what = f"metric {name!r} for {where}"
    if isinstance(result, xr.DataArray):
        if result.ndim == 0:
            return {RUN_LEVEL: float(result.values)}
        if result.dims != ("site",) or "site" not in result.coords:
            raise ValueError(
                f"metric {name!r} returned a DataArray with dims {result.dims} for {where}; "
                "expected a scalar or one 'site' dimension with site labels"
            )
        return _per_site(result["site"].values, result.values, what)
    if isinstance(result, pd.Series):
        return _per_site(result.index, result.values, what)
    if isinstance(result, numbers.Real | np.number) or (
        isinstance(result, np.ndarray) and result.ndim == 0
    ):
        return {RUN_LEVEL: float(result)}
    raise TypeError(
        f"metric {name!r} returned {type(result).__name__} for {where}; expected a float or an "
        "xarray.DataArray with a 'site' dimension"
    )


def _metric_values(
    runs: Any,
    metric: str | MetricFunc,
    *,
    site: str | Sequence[str] | None,
    reduce: str | None,
    unit_reduce: str | None,
    steps: Any,
    source: str | None,
    select: Mapping[str, Any] | None,
    metric_kwargs: Mapping[str, Any] | None,
    rename_sites: Mapping[str, Mapping[str, str]] | None,
) -> tuple[dict[str, np.ndarray], list[str], dict[str, Any], list[str]]:
    """Metric values ``{condition: array (sites, runs)}``, the sites, a description, warnings."""
    runs = _check_runs(runs)
    variable_options = {
        "reduce": reduce,
        "unit_reduce": unit_reduce,
        "steps": steps,
        "source": source,
        "select": select,
    }
    if isinstance(metric, str):
        metric_name = metric
    elif callable(metric):
        metric_name = getattr(metric, "__name__", type(metric).__name__)
    else:
        raise TypeError(
            "metric must be a variable name, a name in icstools.analysis.metrics.METRICS, or a "
            f"callable run -> float | DataArray(site); got {type(metric).__name__}"
        )
    if reduce is not None and reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r} is not valid. Expected one of {list(REDUCTIONS)}")
    if unit_reduce is not None and unit_reduce not in _UNIT_REDUCTIONS:
        raise ValueError(
            f"unit_reduce={unit_reduce!r} is not valid. Expected one of {list(_UNIT_REDUCTIONS)}"
        )
    if select is not None and not isinstance(select, Mapping):
        raise TypeError(f"select must be a mapping {{dim: value}}, got {type(select).__name__}")
    if metric_kwargs is not None and not isinstance(metric_kwargs, Mapping):
        raise TypeError(f"metric_kwargs must be a mapping, got {type(metric_kwargs).__name__}")
    if rename_sites is not None:
        if not isinstance(rename_sites, Mapping):
            raise TypeError("rename_sites must be a mapping {condition: {site: new name}}")
        for cond, mapping in rename_sites.items():
            if cond not in runs:
                raise ValueError(
                    f"rename_sites: condition {cond!r} does not exist. Expected one of {list(runs)}"
                )
            if not isinstance(mapping, Mapping):
                raise TypeError(f"rename_sites[{cond!r}] must be a mapping {{site: new name}}")
    if isinstance(site, str):
        wanted: list[str] | None = [site]
    elif site is None:
        wanted = None
    elif isinstance(site, Sequence) and all(isinstance(s, str) for s in site):
        wanted = list(site)
        if not wanted:
            raise ValueError("site=[] selects nothing; give site names or None for all")
    else:
        raise TypeError(f"site must be a site name, a list of names or None, got {site!r}")

    def _from_callable(func: MetricFunc, ds: xr.Dataset, where: str) -> dict[str, float]:
        used = {k: v for k, v in variable_options.items() if v is not None}
        if used:
            raise ValueError(
                f"{sorted(used)} apply to variable metrics only; metric {metric_name!r} is a "
                "callable: pass its options in metric_kwargs"
            )
        return _callable_result(func(ds, **dict(metric_kwargs or {})), metric_name, where)

    kind = None
    sources: set[str] = set()
    per_run: dict[str, list[tuple[dict[str, float], str]]] = {}
    for cond, items in runs.items():
        per_run[cond] = []
        for i, item in enumerate(items):
            ds = _load(item)
            where = _where(cond, i, item)
            if callable(metric):
                site_values = _from_callable(metric, ds, where)
                kind = "callable"
            elif metric in ds.data_vars or (metric in ds.coords and metric not in ds.dims):
                if metric_kwargs is not None:
                    raise ValueError(
                        f"metric_kwargs apply to callable metrics only; {metric!r} is a variable"
                    )
                site_values, used_source = _variable_metric(
                    ds,
                    metric,
                    reduce=reduce or "mean",
                    unit_reduce=unit_reduce or (reduce if reduce in _UNIT_REDUCTIONS else "mean"),
                    steps=steps,
                    source=source,
                    select=select,
                    where=where,
                )
                if used_source is not None:
                    sources.add(used_source)
                kind = "variable"
            elif metric in _registry.METRICS:
                site_values = _from_callable(_registry.METRICS[metric], ds, where)
                kind = "registered"
            else:
                raise ValueError(
                    f"Variable {metric!r} does not exist. Expected one of "
                    f"{sorted(map(str, ds.data_vars))} (the variables of {where}) or a metric "
                    "registered in icstools.analysis.metrics.METRICS "
                    f"{sorted(_registry.METRICS)}"
                )
            mapping = (rename_sites or {}).get(cond)
            if mapping:
                site_values = _per_site(
                    [mapping.get(k, k) for k in site_values],
                    list(site_values.values()),
                    f"metric {metric_name!r} of {where} after rename_sites[{cond!r}]",
                )
            per_run[cond].append((site_values, where))
    if len(sources) > 1:
        raise ValueError(
            f"the runs were recorded with different sources ({sorted(sources)} chosen "
            "automatically); choose one with source=..."
        )

    all_site_values = [sw for items in per_run.values() for sw in items]
    run_level = [list(s) == [RUN_LEVEL] for s, _ in all_site_values]
    if any(run_level) and not all(run_level):
        raise ValueError(
            f"metric {metric_name!r} is one number per run for some runs and per site for others"
        )
    notes: list[str] = []
    if all(run_level):
        if wanted is not None and wanted != [RUN_LEVEL]:
            raise ValueError(
                f"metric {metric_name!r} is one number per run (no site dimension); "
                f"site={site!r} does not apply (use site=None)"
            )
        sites = [RUN_LEVEL]
    elif wanted is not None:
        for s, w in all_site_values:
            missing = [x for x in wanted if x not in s]
            if missing:
                raise ValueError(
                    f"Site {missing[0]!r} does not exist in {w}. Expected one of "
                    f"{_fmt_list(list(s))}"
                )
        sites = wanted
    else:
        union = list(dict.fromkeys(x for s, _ in all_site_values for x in s))
        sites = [x for x in union if all(x in s for s, _ in all_site_values)]
        partial = [x for x in union if x not in sites]
        if not sites:
            raise ValueError(
                f"no site of metric {metric_name!r} is present in every run (sites seen: "
                f"{_fmt_list(union)}); align differently named sites with rename_sites="
            )
        if partial:
            notes.append(
                f"sites {_fmt_list(partial)} are missing from some runs and were left out "
                "(only sites present in every run are compared; see rename_sites=)"
            )
    values = {
        cond: np.array([[s[x] for x in sites] for s, _ in items], dtype=np.float64).T
        for cond, items in per_run.items()
    }
    info = {
        "metric": metric_name,
        "metric_kind": kind,
        "source": next(iter(sources)) if sources else "n/a",
    }
    if kind == "variable":
        info["reduce_steps"] = reduce or "mean"
        info["reduce_units"] = unit_reduce or (reduce if reduce in _UNIT_REDUCTIONS else "mean")
        info["steps"] = "all" if steps is None else repr(steps)
        if select:
            info["select"] = repr(dict(select))
    return values, sites, info, notes


def metric_table(
    runs: Mapping[str, Sequence[RunLike]],
    metric: str | MetricFunc,
    *,
    site: str | Sequence[str] | None = None,
    reduce: str | None = None,
    unit_reduce: str | None = None,
    steps: slice | Sequence[int] | int | None = None,
    source: str | None = None,
    select: Mapping[str, Any] | None = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    rename_sites: Mapping[str, Mapping[str, str]] | None = None,
) -> pd.DataFrame:
    """The metric of every run: one row per (condition, run, site), non-finite values kept.

    Parameters are those of :func:`compare` (a single condition is allowed here).

    Returns
    -------
    pandas.DataFrame
        Columns ``condition``, ``run`` (position in its condition's list), ``site``, ``value``
        (float; NaN/±inf for diverged runs), ``finite``. ``attrs`` describe the metric.

    Examples
    --------
    >>> import xarray as xr
    >>> run = lambda v: xr.Dataset({"score": ("site", v)}, coords={"site": ["a", "b"]})
    >>> metric_table({"BN": [run([1.0, 2.0])]}, "score")
      condition  run site  value  finite
    0        BN    0    a    1.0    True
    1        BN    0    b    2.0    True
    """
    values, sites, info, notes = _metric_values(
        runs,
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
    for msg in notes:
        warnings.warn(msg, UserWarning, stacklevel=2)
    rows = [
        (cond, k, s, float(arr[j, k]))
        for cond, arr in values.items()
        for k in range(arr.shape[1])
        for j, s in enumerate(sites)
    ]
    df = pd.DataFrame(rows, columns=["condition", "run", "site", "value"])
    df["finite"] = np.isfinite(df["value"].to_numpy())
    df.attrs.update(info)
    return df


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


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


def _bootstrap(
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


def _sd(x: np.ndarray) -> float:
    """Sample standard deviation (ddof=1), without overflow for huge values."""
    scale = float(_pow2_scale(x[None])[0])
    return float(np.std(x / scale, ddof=1)) * scale


def _pow2_scale(x: np.ndarray) -> np.ndarray:
    """Per row, the power of two at or above the largest |value| (1 for rows of zeros)."""
    biggest = np.max(np.abs(x), axis=1) if x.shape[1] else np.zeros(x.shape[0])
    _, exponent = np.frexp(biggest)
    return np.where(biggest > 0, np.ldexp(1.0, exponent), 1.0)


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


# --------------------------------------------------------------------------------------------
# Tests and corrections
# --------------------------------------------------------------------------------------------


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
    ci_method: Literal["studentized", "bca", "percentile"] = "studentized",
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
    """Compare conditions across seeds, per site: effect sizes, bootstrap CIs, rank tests, FDR.

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
        Of the bootstrap intervals.
    ci_method : {"studentized", "bca", "percentile"}
        Bootstrap interval; see the module docstring for their coverage with few seeds.
    n_resamples : int, default 9999
        Bootstrap resamples.
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
    others = [c for c in conditions if c != reference]
    ref_all = values[reference]
    results: dict[tuple[str, str], dict[str, Any]] = {}
    few: list[str] = []
    floors: list[str] = []
    diverged: list[str] = []
    test_name = "wilcoxon" if paired else "mannwhitneyu"

    for cond in others:
        cond_all = values[cond]
        fin_c, fin_r = np.isfinite(cond_all), np.isfinite(ref_all)
        if paired:
            fin_c = fin_r = fin_c & fin_r
        # sites with the same set of finite runs share one bootstrap draw
        groups: dict[tuple[bytes, bytes], list[int]] = {}
        for j in range(len(sites)):
            groups.setdefault((fin_c[j].tobytes(), fin_r[j].tobytes()), []).append(j)
        for rows in groups.values():
            mc_, mr_ = fin_c[rows[0]], fin_r[rows[0]]
            xc, xr_ = cond_all[rows][:, mc_], ref_all[rows][:, mr_]
            nc, nr = xc.shape[1], xr_.shape[1]
            boot = tests = None
            if nc >= 2 and nr >= 2:
                tests = _rank_tests(xc, xr_, paired)
                boot = _bootstrap(
                    xc,
                    xr_,
                    paired=paired,
                    method=ci_method,
                    n_resamples=int(n_resamples),
                    confidence_level=float(confidence_level),
                    rng=rng,
                )
            for k, j in enumerate(rows):
                results[(sites[j], cond)] = _row(
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
        for s in sites:
            row = results[(s, cond)]
            where = f"site {s!r}" if s != RUN_LEVEL else "the run-level metric"
            if row["warning"]:
                few.append(
                    f"{cond!r} vs {reference!r} at {where} (n={row['n_cond']} vs {row['n_ref']})"
                )
            elif row["min_p"] > alpha:
                floors.append(
                    f"{row['n_cond']} pairs"
                    if paired
                    else f"{row['n_cond']} vs {row['n_ref']} seeds"
                )
            nn_c, nn_r = row["n_nonfinite_cond"], row["n_nonfinite_ref"]
            if nn_c or nn_r:
                diverged.append(
                    f"{where}: {nn_c} of {cond_all.shape[1]} runs of {cond!r}, "
                    f"{nn_r} of {ref_all.shape[1]} of {reference!r}"
                )

    records = []
    for s in sites:
        for cond in others:
            records.append(
                {
                    "metric": info["metric"],
                    "site": s,
                    "condition": cond,
                    "reference": reference,
                    **results[(s, cond)],
                }
            )
    df = pd.DataFrame.from_records(records)
    df["q"] = benjamini_hochberg(df["p"].to_numpy(np.float64), method=correction)
    df["significant"] = pd.array(
        [pd.NA if np.isnan(q) else bool(q <= alpha) for q in df["q"]], dtype="boolean"
    )
    df = df[_COLUMNS]

    if few:
        warnings.warn(
            "fewer than 2 runs with a finite metric, so no confidence interval or p-value "
            f"(NaN) for: {'; '.join(few[:10])}{' ...' if len(few) > 10 else ''}. Add seeds.",
            UserWarning,
            stacklevel=2,
        )
    if floors:
        sizes_txt = ", ".join(sorted(set(floors)))
        warnings.warn(
            f"with {sizes_txt} the two-sided {test_name} p-value cannot fall below "
            f"alpha={alpha} (see column min_p): these rows can never be significant, whatever "
            "the effect. Add seeds.",
            UserWarning,
            stacklevel=2,
        )
    if diverged:
        warnings.warn(
            "runs with a non-finite metric (diverged?) are excluded from means, intervals and "
            f"tests and counted in n_nonfinite_*: {'; '.join(diverged[:10])}"
            f"{' ...' if len(diverged) > 10 else ''}",
            UserWarning,
            stacklevel=2,
        )
    for msg in site_notes:
        warnings.warn(msg, UserWarning, stacklevel=2)

    df.attrs.update(info)
    df.attrs.update(
        {
            "unit_of_replication": "run (seed)",
            "resampling": (
                "pairs of runs resampled together"
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
            "correction": ("Benjamini-Hochberg" if correction == "bh" else "Benjamini-Yekutieli")
            + f" over all {int(df['p'].notna().sum())} rows with a p-value",
            "alpha": float(alpha),
            "nonfinite": "runs with a NaN/inf metric excluded, counted in n_nonfinite_*",
            "sites_left_out": "; ".join(site_notes),
        }
    )
    return df


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
            statistic=np.nan,
            p=np.nan,
            min_p=np.nan,
        )
        row["warning"] = (
            f"fewer than 2 runs with a finite metric (condition {nc}, reference {nr}): "
            "no confidence interval or test"
        )
    else:
        row["diff_lo"], row["diff_hi"] = float(boot["diff_lo"][k]), float(boot["diff_hi"][k])
        ends = [row["diff_lo"], row["diff_hi"]]
        if ratio_defined and not boot["ratio_ci_undefined"][k]:
            row["ratio_lo"] = float(boot["ratio_lo"][k])
            row["ratio_hi"] = float(boot["ratio_hi"][k])
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
                "many equal values); ci_method='bca' stays bounded"
            )
        elif np.isnan(ends).any():
            notes.append("interval undefined: degenerate bootstrap distribution")
        stat, p, test_note = test
        row["statistic"], row["p"] = stat, p
        if test_note:
            notes.append(test_note)
        row["min_p"] = _min_p(paired, nc, nr)
        if row["min_p"] > alpha:
            sizes = f"{nc} pairs" if paired else f"{nc} vs {nr} seeds"
            notes.append(
                f"{row['test']} with {sizes} cannot give p below "
                f"{row['min_p']:.3g} > alpha={alpha}: cannot be significant; add seeds"
            )
        row["warning"] = ""
    row["note"] = "; ".join(notes)
    return row

"""Runs to numbers: each run of each condition reduced to one number per site (the metric).

:func:`metric_table` returns those numbers; :func:`icstools.analysis.compare.compare` compares
them across conditions. How a variable, a registered metric or a callable becomes one number per
site is documented in :mod:`icstools.analysis.compare` ("Metrics") and :func:`compare`.
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from icstools.analysis import metrics as _registry
from icstools.store import open_run

__all__ = ["REDUCTIONS", "RUN_LEVEL", "MetricFunc", "RunLike", "metric_table"]

#: A run: an in-memory dataset, or the path of a store (opened with :func:`icstools.open_run`).
RunLike = xr.Dataset | str | os.PathLike
#: A metric callable: ``func(run, **metric_kwargs) -> float | xarray.DataArray (site,)``.
MetricFunc = Callable[..., Any]

#: Reductions of a variable over steps (and, by default, over the units of a site).
REDUCTIONS: tuple[str, ...] = ("mean", "median", "max", "min", "last")
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


def _selected(
    ds: xr.Dataset,
    da: xr.DataArray,
    name: str,
    select: Mapping[str, Any] | None,
    steps: Any,
    where: str,
) -> xr.DataArray:
    """Variable ``name`` (``da``) at the values of ``select`` and the ``steps`` asked for;
    raises, naming what exists, where one is not there."""
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
    return da


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
    da = _selected(ds, da, name, select, steps, where)
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
    metric_name = _metric_name(metric)
    _check_value_options(runs, reduce, unit_reduce, select, metric_kwargs, rename_sites)
    wanted = _wanted_sites(site)
    options = {
        "reduce": reduce,
        "unit_reduce": unit_reduce,
        "steps": steps,
        "source": source,
        "select": select,
    }
    kind = None
    sources: set[str] = set()
    per_run: dict[str, list[tuple[dict[str, float], str]]] = {}
    for cond, items in runs.items():
        per_run[cond] = []
        for i, item in enumerate(items):
            where = _where(cond, i, item)
            site_values, kind, used_source = _run_values(
                _load(item), metric, metric_name, where, options, metric_kwargs
            )
            if used_source is not None:
                sources.add(used_source)
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
    sites, notes = _common_sites(all_site_values, wanted, site, metric_name)
    values = {
        cond: np.array([[s[x] for x in sites] for s, _ in items], dtype=np.float64).T
        for cond, items in per_run.items()
    }  # [site, run] each
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


def _metric_name(metric: object) -> str:
    """The name a metric is reported under (a callable's ``__name__``)."""
    if isinstance(metric, str):
        return metric
    if callable(metric):
        return getattr(metric, "__name__", type(metric).__name__)
    raise TypeError(
        "metric must be a variable name, a name in icstools.analysis.metrics.METRICS, or a "
        f"callable run -> float | DataArray(site); got {type(metric).__name__}"
    )


def _check_value_options(
    runs: Mapping[str, Any],
    reduce: object,
    unit_reduce: object,
    select: object,
    metric_kwargs: object,
    rename_sites: object,
) -> None:
    """Raise on an option of :func:`_metric_values` of the wrong type or value."""
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


def _wanted_sites(site: object) -> list[str] | None:
    """The sites asked for (``None``: every site present in all runs)."""
    if isinstance(site, str):
        return [site]
    if site is None:
        return None
    if isinstance(site, Sequence) and all(isinstance(s, str) for s in site):
        if not site:
            raise ValueError("site=[] selects nothing; give site names or None for all")
        return list(site)
    raise TypeError(f"site must be a site name, a list of names or None, got {site!r}")


def _run_values(
    ds: xr.Dataset,
    metric: str | MetricFunc,
    metric_name: str,
    where: str,
    options: dict[str, Any],
    metric_kwargs: Mapping[str, Any] | None,
) -> tuple[dict[str, float], str, str | None]:
    """One run's metric ``{site: value}``, the metric's kind (``"callable"``, ``"variable"``,
    ``"registered"``) and the source a variable metric was read from."""

    def from_callable(func: MetricFunc) -> dict[str, float]:
        used = {k: v for k, v in options.items() if v is not None}
        if used:
            raise ValueError(
                f"{sorted(used)} apply to variable metrics only; metric {metric_name!r} is a "
                "callable: pass its options in metric_kwargs"
            )
        return _callable_result(func(ds, **dict(metric_kwargs or {})), metric_name, where)

    if callable(metric):
        return from_callable(metric), "callable", None
    if metric in ds.data_vars or (metric in ds.coords and metric not in ds.dims):
        if metric_kwargs is not None:
            raise ValueError(
                f"metric_kwargs apply to callable metrics only; {metric!r} is a variable"
            )
        reduce = options["reduce"]
        site_values, used_source = _variable_metric(
            ds,
            metric,
            reduce=reduce or "mean",
            unit_reduce=options["unit_reduce"]
            or (reduce if reduce in _UNIT_REDUCTIONS else "mean"),
            steps=options["steps"],
            source=options["source"],
            select=options["select"],
            where=where,
        )
        return site_values, "variable", used_source
    if metric in _registry.METRICS:
        return from_callable(_registry.METRICS[metric]), "registered", None
    raise ValueError(
        f"Variable {metric!r} does not exist. Expected one of "
        f"{sorted(map(str, ds.data_vars))} (the variables of {where}) or a metric "
        "registered in icstools.analysis.metrics.METRICS "
        f"{sorted(_registry.METRICS)}"
    )


def _common_sites(
    all_site_values: list[tuple[dict[str, float], str]],
    wanted: list[str] | None,
    site: object,
    metric_name: str,
) -> tuple[list[str], list[str]]:
    """The sites compared (the run level for one number per run) and notes on sites left
    out; raises where a wanted site is missing or no site is in every run."""
    run_level = [list(s) == [RUN_LEVEL] for s, _ in all_site_values]
    if any(run_level) and not all(run_level):
        raise ValueError(
            f"metric {metric_name!r} is one number per run for some runs and per site for others"
        )
    if all(run_level):
        if wanted is not None and wanted != [RUN_LEVEL]:
            raise ValueError(
                f"metric {metric_name!r} is one number per run (no site dimension); "
                f"site={site!r} does not apply (use site=None)"
            )
        return [RUN_LEVEL], []
    if wanted is not None:
        for s, w in all_site_values:
            missing = [x for x in wanted if x not in s]
            if missing:
                raise ValueError(
                    f"Site {missing[0]!r} does not exist in {w}. Expected one of "
                    f"{_fmt_list(list(s))}"
                )
        return wanted, []
    union = list(dict.fromkeys(x for s, _ in all_site_values for x in s))
    sites = [x for x in union if all(x in s for s, _ in all_site_values)]
    partial = [x for x in union if x not in sites]
    if not sites:
        raise ValueError(
            f"no site of metric {metric_name!r} is present in every run (sites seen: "
            f"{_fmt_list(union)}); align differently named sites with rename_sites="
        )
    notes = []
    if partial:
        notes.append(
            f"sites {_fmt_list(partial)} are missing from some runs and were left out "
            "(only sites present in every run are compared; see rename_sites=)"
        )
    return sites, notes


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

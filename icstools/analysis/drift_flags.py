"""Site aggregates of drift and thresholds that flag it (:func:`site_aggregate`,
:func:`drift_thresholds`, :func:`flag_drift`); see "Flags" in :mod:`icstools.analysis.drift`,
which re-exports them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr

from icstools.analysis.drift_arrays import (
    _HOWS,
    SIGNED_METRICS,
    _apply,
    _check_names,
    _dims_first,
    _options,
    _steps_list,
)

__all__ = ["drift_thresholds", "flag_drift", "site_aggregate"]


# ============================================================================================
# Aggregates and flags
# ============================================================================================


def _site_labels(ds: xr.Dataset) -> tuple[np.ndarray, xr.DataArray]:
    """The sites (in memory) and the ``unit_site`` labels as a bare (possibly lazy) array.

    The sites are the ``site`` coordinate (an index, so in memory) when present; otherwise the
    distinct ``unit_site`` values, which reads that coordinate.
    """
    if "unit_site" not in ds.coords and "unit_site" not in ds.variables:
        raise ValueError(
            "The dataset has no 'unit_site' coordinate: cannot tell which site each unit belongs to"
        )
    labels = xr.DataArray(ds["unit_site"].data, dims=ds["unit_site"].dims)
    if labels.dims != ("unit",):
        raise ValueError(f"unit_site must have the dim ('unit',), got {labels.dims}")
    if "site" in ds.coords:
        sites = np.asarray(ds["site"].values).astype(str)
        if isinstance(labels.data, np.ndarray):  # checked when it costs nothing
            unknown = sorted(set(labels.values.astype(str)) - set(sites))
            if unknown:
                raise ValueError(
                    f"unit_site holds sites {unknown} that are not in the 'site' coordinate "
                    f"{_options(sites)}"
                )
    else:
        sites = np.asarray(pd.unique(pd.Series(np.asarray(labels.values).astype(str))))
    return sites.astype(str), labels


def _codes(labels: np.ndarray, sites: np.ndarray) -> np.ndarray:
    """Index of each unit's site in ``sites`` (−1: none)."""
    index = {s: i for i, s in enumerate(sites)}
    return np.array([index.get(str(s), -1) for s in np.asarray(labels).ravel()], dtype=np.int64)


def _reduce(v: np.ndarray, how: str) -> np.ndarray:
    """NaN-skipping reduction over the last axis without numpy warnings (all-NaN → NaN)."""
    valid = ~np.isnan(v)
    k = valid.sum(-1)
    with np.errstate(all="ignore"):
        if how == "mean":
            r = np.where(valid, v, 0.0).sum(-1) / k
        elif how == "max":
            r = np.where(valid, v, -np.inf).max(-1, initial=-np.inf)
        elif how == "min":
            r = np.where(valid, v, np.inf).min(-1, initial=np.inf)
        else:  # median: NaN sorts last
            srt = np.sort(v, axis=-1)
            lo = np.clip((k - 1) // 2, 0, None)[..., None]
            hi = np.clip(k // 2, 0, None)[..., None]
            if srt.shape[-1] == 0:
                r = np.full(k.shape, np.nan)
            else:
                lo, hi = np.minimum(lo, srt.shape[-1] - 1), np.minimum(hi, srt.shape[-1] - 1)
                r = (np.take_along_axis(srt, lo, -1) + np.take_along_axis(srt, hi, -1))[..., 0] / 2
    return np.where(k > 0, r, np.nan)


def _group_kernel(x: np.ndarray, labels: np.ndarray, sites: np.ndarray, how: str) -> np.ndarray:
    """``[..., unit]`` → ``[..., site]``."""
    codes = _codes(labels, sites)
    out = np.full((*x.shape[:-1], len(sites)), np.nan)
    for g in range(len(sites)):
        out[..., g] = _reduce(x[..., codes == g], how)
    return out


def site_aggregate(drift_ds: xr.Dataset, how: str | Sequence[str] = "mean") -> xr.Dataset:
    """Aggregate the units of each site: mean, median, max or min over units, per step.

    NaN units are skipped (a site whose units are all NaN gives NaN); ±inf count. Applied to the
    brackets (``w1_lo``, ``w1_hi``, …) it gives brackets of the aggregate, as all four are
    monotone. Variables that are already per site (``hist_*``) are kept as they are.

    Parameters
    ----------
    drift_ds : xarray.Dataset
        The result of :func:`drift` (variables with a ``unit`` dim and a ``unit_site``
        coordinate). Works lazily on dask-backed datasets.
    how : {"mean", "median", "max", "min"} or a sequence of them
        One aggregate (dims (step, site)), or several along a new ``how`` dim.

    Returns
    -------
    xarray.Dataset
        The same variables with ``unit`` replaced by ``site``.

    Examples
    --------
    >>> d = xr.Dataset({"w1": (("step", "unit"), [[1.0, 3.0, 5.0]])},
    ...                coords={"unit_site": ("unit", ["a", "a", "b"])})
    >>> site_aggregate(d, "max")["w1"].values.tolist()
    [[3.0, 5.0]]
    """
    if not isinstance(drift_ds, xr.Dataset):
        raise TypeError(f"drift_ds must be an xarray.Dataset, got {type(drift_ds).__name__}")
    hows = _check_names("Aggregate", how, _HOWS)
    sites, labels = _site_labels(drift_ds)
    results = []
    for h in hows:
        data = {}
        for name, da in drift_ds.data_vars.items():
            if "unit" not in da.dims:
                data[name] = da
                continue
            plain = da.drop_vars([c for c in da.coords if "unit" in da[c].dims])
            red = _apply(
                _group_kernel,
                plain,
                labels,
                core=[["unit"], ["unit"]],
                out_core=[["site"]],
                sizes={"site": len(sites)},
                kwargs={"sites": sites, "how": h},
            ).assign_coords(site=sites)
            red.attrs = {**da.attrs, "aggregate": f"{h} over the units of each site"}
            data[name] = _dims_first(red, ("step", "site"))
        results.append(xr.Dataset(data, attrs=dict(drift_ds.attrs)))
    if isinstance(how, str):
        return results[0]
    out = xr.concat(
        results, dim="how", data_vars="all", coords="minimal", compat="override", join="override"
    )
    return out.assign_coords(how=np.array(hows, dtype=str))


def _mean_std_kernel(x: np.ndarray, n_sigma: float) -> np.ndarray:
    """``[..., n]`` → ``[..., 2]``: mean ∓ n_sigma · std (ddof=1) of the finite values."""
    valid = np.isfinite(x)
    k = valid.sum(-1)
    with np.errstate(all="ignore"):
        m = np.where(valid, x, 0.0).sum(-1) / k
        dev = np.where(valid, x - m[..., None], 0.0)
        s = np.sqrt((dev * dev).sum(-1) / (k - 1))
    m = np.where(k >= 2, m, np.nan)
    s = np.where(k >= 2, s, np.nan)
    return np.stack([m - n_sigma * s, m + n_sigma * s], axis=-1)


def _site_mean_std_kernel(
    x: np.ndarray, labels: np.ndarray, sites: np.ndarray, n_sigma: float
) -> np.ndarray:
    """``[..., step, unit]`` → ``[..., site, 2]`` pooling steps and the units of each site."""
    codes = _codes(labels, sites)
    out = np.full((*x.shape[:-2], len(sites), 2), np.nan)
    for g in range(len(sites)):
        v = x[..., codes == g]
        out[..., g, :] = _mean_std_kernel(v.reshape(*v.shape[:-2], -1), n_sigma)
    return out


def drift_thresholds(
    drift_ds: xr.Dataset,
    reference_steps: slice | Sequence[int] | np.ndarray,
    *,
    n_sigma: float = 3.0,
    per: Literal["unit", "site"] = "unit",
) -> xr.Dataset:
    """Thresholds mean ± n_sigma·σ of each drift variable over reference records (NannyML).

    Parameters
    ----------
    drift_ds : xarray.Dataset
        The result of :func:`drift` or :func:`site_aggregate` (variables with a ``step`` dim).
    reference_steps : slice or sequence of int
        The records of the reference window: a label slice (``slice(1, 50)``, inclusive) or the
        steps. Use records without drift; with ``reference="previous"`` the first step is NaN
        and skipped.
    n_sigma : float
        Width in standard deviations (ddof=1) of the metric over the reference records.
    per : {"unit", "site"}
        ``"unit"``: one threshold per unit (per site for site-level variables), from that unit's
        values over the reference steps; ``"site"``: pooled over the reference steps and all
        units of a site (more values, so a steadier σ; units of a site must behave alike).

    Returns
    -------
    xarray.Dataset
        For each variable, its thresholds with a ``limit`` dim (``"lower"``, ``"upper"``) and
        ``unit`` or ``site``. Distances get lower = −inf (flagged above only); ``mean_shift``
        and ``log_var_ratio`` both. Non-finite reference values are ignored; fewer than 2 finite
        ones give NaN thresholds (never flagged).

    Examples
    --------
    >>> d = xr.Dataset({"w1": (("step", "unit"), [[0.1], [0.2], [0.1], [0.2], [1.0]])},
    ...                coords={"step": [0, 1, 2, 3, 4]})
    >>> thr = drift_thresholds(d, slice(0, 3))
    >>> flag_drift(d, thr)["w1"].values.ravel().tolist()
    [False, False, False, False, True]
    """
    if not isinstance(drift_ds, xr.Dataset):
        raise TypeError(f"drift_ds must be an xarray.Dataset, got {type(drift_ds).__name__}")
    if "step" not in drift_ds.dims:
        raise ValueError("drift_ds has no 'step' dimension")
    _check_names("per", per, ("unit", "site"), many=False)
    if not (isinstance(n_sigma, (int, float, np.number)) and n_sigma >= 0):
        raise ValueError(f"n_sigma must be a number ≥ 0, got {n_sigma!r}")
    steps = _steps_list(drift_ds)
    if isinstance(reference_steps, slice):
        ref = drift_ds.sel(step=reference_steps)
    elif isinstance(reference_steps, (str, bytes)) or not isinstance(
        reference_steps, (Sequence, np.ndarray, pd.Index, xr.DataArray)
    ):
        raise TypeError(
            "reference_steps must be a slice of steps or a sequence of steps, got "
            f"{reference_steps!r}"
        )
    else:
        wanted = [int(s) for s in np.asarray(reference_steps).ravel()]
        absent = [s for s in wanted if s not in steps]
        if absent:
            raise ValueError(
                f"Steps {absent} are not in the dataset. Expected steps among {_options(steps)}"
            )
        ref = drift_ds.sel(step=wanted)
    if ref.sizes["step"] < 2:
        raise ValueError(
            f"reference_steps selects {ref.sizes['step']} record(s); thresholds need at least 2"
        )
    sites = labels = None
    if per == "site" and any("unit" in da.dims for da in ref.data_vars.values()):
        sites, labels = _site_labels(ref)
    data = {}
    for name, da in ref.data_vars.items():
        if "step" not in da.dims:
            continue
        if per == "site" and "unit" in da.dims:
            plain = da.drop_vars([c for c in da.coords if "unit" in da[c].dims])
            thr = _apply(
                _site_mean_std_kernel,
                plain.drop_vars("step", errors="ignore"),
                labels,
                core=[["step", "unit"], ["unit"]],
                out_core=[["site", "limit"]],
                sizes={"site": len(sites), "limit": 2},
                kwargs={"sites": sites, "n_sigma": float(n_sigma)},
            ).assign_coords(site=sites)
        else:
            thr = _apply(
                _mean_std_kernel,
                da.drop_vars("step", errors="ignore"),
                core=[["step"]],
                out_core=[["limit"]],
                sizes={"limit": 2},
                kwargs={"n_sigma": float(n_sigma)},
            )
        thr = thr.assign_coords(limit=["lower", "upper"])
        base = str(name).removeprefix("hist_").removesuffix("_lo").removesuffix("_hi")
        if base not in SIGNED_METRICS:
            thr = xr.where(thr["limit"] == "lower", -np.inf, thr).transpose(*thr.dims)
        thr.attrs = {"long_name": f"drift threshold of {name}: mean ± {n_sigma} sd"}
        data[name] = thr
    if not data:
        raise ValueError("drift_ds has no variable with a 'step' dimension")
    return xr.Dataset(
        data,
        attrs={
            "n_sigma": float(n_sigma),
            "per": per,
            "reference_steps": json.dumps(_steps_list(ref)),
        },
    )


def flag_drift(drift_ds: xr.Dataset, thresholds: xr.Dataset) -> xr.Dataset:
    """Flag drift: True where a metric is above its upper or below its lower threshold.

    Parameters
    ----------
    drift_ds : xarray.Dataset
        Drift values (:func:`drift` or :func:`site_aggregate`).
    thresholds : xarray.Dataset
        From :func:`drift_thresholds` (per unit, or per site: then mapped to units through
        ``unit_site``).

    Returns
    -------
    xarray.Dataset
        Booleans, one variable per variable of ``thresholds``; NaN values are never flagged.
        Lazy if ``drift_ds`` is.

    Examples
    --------
    >>> d = xr.Dataset({"ks": (("step", "unit"), [[0.1, 0.1], [0.1, 0.1], [0.1, 0.9]])},
    ...                coords={"step": [0, 1, 2]})
    >>> thr = drift_thresholds(d, [0, 1])
    >>> flag_drift(d, thr)["ks"].sel(step=2).values.tolist()
    [False, True]
    """
    if not isinstance(drift_ds, xr.Dataset) or not isinstance(thresholds, xr.Dataset):
        raise TypeError("drift_ds and thresholds must be xarray.Datasets")
    flags = {}
    for name, thr in thresholds.data_vars.items():
        if name not in drift_ds.data_vars:
            raise ValueError(
                f"Variable {name!r} of thresholds is not in drift_ds. Expected one of "
                f"{_options(list(drift_ds.data_vars))}"
            )
        if "limit" not in thr.dims:
            raise ValueError(f"thresholds[{name!r}] has no 'limit' dimension")
        val = drift_ds[name]
        if "site" in thr.dims and "unit" in val.dims and "site" not in val.dims:
            _, labels = _site_labels(drift_ds)
            thr_sites = np.asarray(thr["site"].values).astype(str)

            def to_units(t: np.ndarray, lab: np.ndarray, ts: np.ndarray = thr_sites) -> Any:
                codes = _codes(lab, ts)  # [unit]
                return np.where(codes >= 0, np.take(t, codes, axis=-1), np.nan)

            thr = _apply(
                to_units,
                thr.drop_vars([c for c in thr.coords if c != "limit"]),
                labels,
                core=[["site"], ["unit"]],
                out_core=[["unit"]],
                sizes={"unit": val.sizes["unit"]},
            )
            if "unit" in val.coords:
                thr = thr.assign_coords(unit=val["unit"].values)
        lower, upper = thr.sel(limit="lower", drop=True), thr.sel(limit="upper", drop=True)
        flag = (val > upper) | (val < lower)
        flag.attrs = {"long_name": f"drift of {name} beyond its thresholds"}
        flags[name] = flag
    return xr.Dataset(flags, attrs=dict(thresholds.attrs))

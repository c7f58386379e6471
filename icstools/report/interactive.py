"""The data of a run's interactive panels: :func:`run_payload` turns one run into a JSON-ready
dict that the page's script (``assets/report.js``) draws with uPlot.

What a run's payload holds (every number rounded to a few significant digits, NaN/inf as
``null``):

* ``lines``: multi-line time series, one line per site, parameter or layer, each with its
  legend: drift per site (median over the site's units of W1/σ against the previous record,
  the quantity the drift flags read), activation-gradient norm per site, saturation and dead
  units per site, parameter-gradient norms, gradient ICS per layer;
* ``scalars``: the run's ``(step,)`` variables (loss, test accuracy, learning rate, logged
  values);
* ``units``: the per-unit drill-down: the 15/50/85th percentiles and the mean of every unit
  (at most :data:`MAX_UNITS` per site) at up to :data:`MAX_UNIT_STEPS` records;
* ``hist``: each site's histogram over time (fixed per-site edges, under/overflow bins) at up
  to :data:`MAX_HIST_STEPS` records, each record's counts as shares of its values;
* ``overlays``: per site, the histogram at each flagged step (at most :data:`MAX_OVERLAYS`)
  beside the previous record's (the reference of the drift flags), or, when a site has no
  flag, at its largest drift;
* ``settings``: the run's attributes (``recorder_config`` parsed from its JSON).

Records are thinned evenly (first and last kept) to the caps above, and the time series to
:data:`MAX_STEPS`; the page says when.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from icstools.analysis.drift import site_aggregate

__all__ = [
    "MAX_HIST_STEPS",
    "MAX_OVERLAYS",
    "MAX_STEPS",
    "MAX_UNITS",
    "MAX_UNIT_STEPS",
    "pack",
    "rounded",
    "run_payload",
    "settings",
    "thin",
]

#: Records kept in the time series of a run (evenly thinned beyond).
MAX_STEPS = 1000
#: Records kept in the per-unit drill-down.
MAX_UNIT_STEPS = 100
#: Units per site kept in the per-unit drill-down (evenly chosen beyond).
MAX_UNITS = 64
#: Records kept in the histogram over time.
MAX_HIST_STEPS = 100
#: Flagged steps per site with a reference-vs-current overlay.
MAX_OVERLAYS = 12
#: Percentiles of the drill-down (the paper's Fig. 1).
PERCENTILES = (0.15, 0.5, 0.85)


def rounded(a: Any, digits: int) -> list[Any]:
    """``a`` (any shape) as nested lists of floats with ``digits`` significant digits, None for
    NaN/inf."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 0:
        v = float(arr)
        return float(f"{v:.{digits}g}") if math.isfinite(v) else None  # type: ignore[return-value]
    return (
        [rounded(x, digits) for x in arr]
        if arr.ndim > 1
        else [float(f"{v:.{digits}g}") if math.isfinite(v) else None for v in arr.tolist()]
    )


#: The 64 characters of packed arrays (:func:`pack`): two per value, 4,095 levels and a
#: missing-value code.
_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
_LEVELS = 4094  # values map to 0 … 4094 (log: 0 … 4093, 4094 is zero); 4095 ("__") is NaN/inf


def pack(a: Any, log: bool = False) -> dict[str, Any]:
    """An array as text of two characters per value: each finite value quantized to 4,095
    levels between the array's finite minimum ``lo`` and maximum ``hi``, NaN/inf as missing
    (``"__"``). With ``log``, the positive values are quantized in log10 (4,094 levels, so that
    small values keep their precision beside large ones), exact zeros keep a code of their own
    (``"_-"``) and negative values are missing. The error is at most ``(hi - lo) / 8188`` (in
    log10 units when ``log``). About 4 times smaller than the same numbers as JSON text;
    ``assets/report.js`` unpacks it.

    Examples
    --------
    >>> p = pack([0.0, 0.5, float("nan"), 1.0])
    >>> p["s"], p["lo"], p["hi"], p["shape"]
    ('AAf____-', 0.0, 1.0, [4])
    >>> pack([0.0, 0.01, 100.0], log=True)["s"]
    '_-AA_9'
    """
    x = np.asarray(a, dtype=np.float64)
    levels = _LEVELS - 1 if log else _LEVELS
    zero = np.zeros(x.shape, dtype=bool)
    if log:
        zero = x == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(x > 0, np.log10(np.where(x > 0, x, 1.0)), np.nan)
    finite = np.isfinite(x)
    lo = float(x[finite].min()) if finite.any() else 0.0
    hi = float(x[finite].max()) if finite.any() else 0.0
    k = np.full(x.shape, _LEVELS + 1, dtype=np.int64)
    if hi > lo:
        k[finite] = np.round((x[finite] - lo) / (hi - lo) * levels).astype(np.int64)
    else:
        k[finite] = 0
    k[zero] = _LEVELS
    text = np.char.add(_ALPHABET[k // 64], _ALPHABET[k % 64])
    return {
        "shape": list(x.shape),
        "lo": lo,
        "hi": hi,
        "log": bool(log),
        "s": "".join(text.ravel()),
    }


def _nonnegative(values: np.ndarray) -> bool:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return bool(v.size) and bool((v >= 0).all()) and bool((v > 0).any())


def thin(n: int, cap: int) -> np.ndarray:
    """Indices of ``cap`` records spread evenly over ``n`` (all of them when ``n <= cap``; the
    first and the last are always kept)."""
    if n <= cap:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, cap)).astype(np.int64))


def _source(ds: xr.Dataset) -> str | None:
    sources = [str(s) for s in ds["source"].values] if "source" in ds.coords else []
    return "probe" if "probe" in sources else (sources[0] if sources else None)


def _at_source(da: xr.DataArray, source: str | None) -> xr.DataArray:
    return da.sel(source=source) if "source" in da.dims and source is not None else da


def _per_site_units(ds: xr.Dataset, var: str, source: str | None) -> xr.DataArray:
    """``var`` (unit dimension) at ``source`` grouped into sites: ``[step, site]`` of the
    per-site mean over units."""
    da = _at_source(ds[var], source).astype(np.float64)
    return da.groupby("unit_site").mean("unit").rename(unit_site="site").transpose("step", "site")


def _line_block(
    title: str,
    ylabel: str,
    names: Sequence[str],
    values: np.ndarray,
    idx: np.ndarray,
    log: bool = False,
    note: str = "",
) -> dict[str, Any]:
    """One multi-line panel: ``values`` is ``[step, line]``; ``log``: shown on a log scale
    first."""
    values = np.asarray(values, dtype=np.float64)
    return {
        "title": title,
        "ylabel": ylabel,
        "log": log,
        "names": [str(n) for n in names],
        # positive series are packed in log10 (small values keep their precision), so that the
        # page can switch between linear and log scales
        "values": pack(values[idx].T, log=_nonnegative(values[idx])),
        "note": note,
    }


def _lines(
    ds: xr.Dataset, drift: xr.Dataset | None, source: str | None, idx: np.ndarray
) -> list[dict[str, Any]]:
    """The multi-line panels a run has data for."""
    out = []
    sites = [str(s) for s in ds["site"].values] if "site" in ds.coords else []
    if drift is not None and "w1_std" in drift:
        agg = site_aggregate(drift[["w1_std"]], "median")["w1_std"]
        agg = agg.transpose("step", "site").sel(site=sites)
        out.append(
            _line_block(
                "Drift per site: median over the site's units of W1/σ against the previous record",
                "W1/σ",
                sites,
                agg.values,
                idx,
                log=True,
                note=f"source: {source}; the quantity the drift flags read (zeros are not "
                "drawn on the log scale: switch it off to see them)",
            )
        )
    if "grad_norm" in ds.data_vars and "site" in ds["grad_norm"].dims:
        g = ds["grad_norm"].transpose("step", "site")
        out.append(
            _line_block(
                "Activation-gradient norm per site",
                "‖∂L/∂a‖",
                [str(s) for s in g["site"].values],
                g.values,
                idx,
                log=True,
            )
        )
    if "sat_frac" in ds.data_vars and "sat_threshold" in ds.coords:
        thr = np.asarray(ds["sat_threshold"].values, dtype=np.float64)
        keep = [s for s, t in zip(sites, thr, strict=True) if np.isfinite(t)]
        if keep:
            sources = [str(x) for x in ds["source"].values] if "source" in ds.coords else []
            sat_source = "train" if "train" in sources else source
            sat = _per_site_units(ds, "sat_frac", sat_source).sel(site=keep)
            out.append(
                _line_block(
                    "Saturation per site: share of values where σ' < 0.01, "
                    "mean over units (training batches)",
                    "sat_frac",
                    keep,
                    sat.values,
                    idx,
                )
            )
    if "zero_frac" in ds.data_vars and "unit_site" in ds.coords:
        dead = _at_source(ds["zero_frac"], source) >= 1.0
        share = dead.astype(np.float64).groupby("unit_site").mean("unit")
        share = share.rename(unit_site="site").transpose("step", "site").sel(site=sites)
        out.append(
            _line_block(
                "Dead units per site: share of units with every value 0",
                "share of units",
                sites,
                share.values,
                idx,
            )
        )
    for var, dim, title, log in (
        ("param_grad_norm", "param", "Gradient norm per parameter", True),
        ("ics_cos", "layer", "Gradient ICS: cos(G, G') per layer", False),
        ("ics_l2", "layer", "Gradient ICS: ‖G − G'‖ per layer", True),
    ):
        if var in ds.data_vars and set(ds[var].dims) == {"step", dim}:
            da = ds[var].transpose("step", dim)
            out.append(
                _line_block(title, var, [str(x) for x in da[dim].values], da.values, idx, log=log)
            )
    return out


def _scalars(ds: xr.Dataset, idx: np.ndarray) -> dict[str, list[Any]]:
    out = {}
    for name, da in ds.data_vars.items():
        if da.dims == ("step",) and np.issubdtype(da.dtype, np.number):
            out[str(name)] = rounded(np.asarray(da.values, dtype=np.float64)[idx], 5)
    return out


def _units(ds: xr.Dataset, source: str | None, steps: np.ndarray) -> dict[str, Any] | None:
    """Per-unit percentiles and mean at thinned records, per site."""
    if "quantile_value" not in ds.data_vars or "unit_site" not in ds.coords:
        return None
    idx = thin(steps.size, MAX_UNIT_STEPS)
    qv = _at_source(ds["quantile_value"], source).isel(step=idx)
    qs = np.asarray(qv["quantile"].values, dtype=np.float64)
    picks = [int(np.argmin(np.abs(qs - p))) for p in PERCENTILES]
    mean = _at_source(ds["mean"], source).isel(step=idx) if "mean" in ds.data_vars else None
    unit_site = np.asarray(ds["unit_site"].values).astype(str)
    unit_index = np.asarray(ds["unit_index"].values) if "unit_index" in ds.coords else None
    sites: dict[str, Any] = {}
    q_all = np.asarray(qv.transpose("step", "unit", "quantile").values, dtype=np.float64)
    m_all = (
        None
        if mean is None
        else np.asarray(mean.transpose("step", "unit").values, dtype=np.float64)
    )
    for site in dict.fromkeys(unit_site):
        cols = np.flatnonzero(unit_site == site)
        n_units = cols.size
        cols = cols[thin(cols.size, MAX_UNITS)]
        q = q_all[:, cols][:, :, picks]  # [step, unit, percentile]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN records: NaN, said as null
            site_q = np.nanmedian(q, axis=1).T  # [percentile, step]
        index = unit_index[cols] if unit_index is not None else np.arange(cols.size)
        sites[site] = {
            "n_units": int(n_units),
            "unit_index": [int(u) for u in index],
            "q": pack(np.transpose(q, (1, 2, 0))),  # [unit][percentile][step]
            "mean": None if m_all is None else pack(m_all[:, cols].T),  # [unit][step]
            "site_q": pack(site_q),
        }
    return {
        "steps": [int(s) for s in steps[idx]],
        "percentiles": [float(qs[i]) for i in picks],
        "sites": sites,
    }


def _hist_shares(counts: np.ndarray) -> np.ndarray:
    """Counts ``[..., bin]`` as shares of each histogram's total (NaN where empty)."""
    counts = np.asarray(counts, dtype=np.float64)
    tot = counts.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, counts / tot, np.nan)


def _hist(ds: xr.Dataset, source: str | None, steps: np.ndarray) -> dict[str, Any] | None:
    if "hist" not in ds.data_vars or "hist_edges" not in ds.coords:
        return None
    idx = thin(steps.size, MAX_HIST_STEPS)
    h = _at_source(ds["hist"], source).isel(step=idx).transpose("site", "step", "bin")
    shares = _hist_shares(h.values)
    edges = np.asarray(ds["hist_edges"].transpose("site", ...).values, dtype=np.float64)
    return {
        "steps": [int(s) for s in steps[idx]],
        "edges": rounded(edges, 5),
        # [site][step][bin], bin 0 underflow, the last overflow
        "shares": [pack(x) for x in shares],
    }


def _overlays(
    ds: xr.Dataset, source: str | None, steps: np.ndarray, entry: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Reference (previous record) vs current histograms at each site's flagged steps, or at its
    largest drift when none is flagged (each row's ``_drift``: the site's median W1/σ per
    record, set by :func:`run_payload`)."""
    if "hist" not in ds.data_vars or steps.size < 2:
        return {}
    hist_da = _at_source(ds["hist"], source).transpose("step", "site", "bin")
    site_pos = {str(s): j for j, s in enumerate(hist_da["site"].values)}
    hist = np.asarray(hist_da.values)  # [step, site, bin], read once
    out: dict[str, list[dict[str, Any]]] = {}
    pos = {int(s): i for i, s in enumerate(steps)}
    for row in entry.get("sites", []):
        site = row["site"]
        picks = [(t, True) for t in row.get("flagged_steps", [])[:MAX_OVERLAYS]]
        value = row.get("_drift")
        if not picks and value is not None and np.isfinite(value[1:]).any():
            k = int(np.nanargmax(value[1:])) + 1
            picks = [(int(steps[k]), False)]
        items = []
        for t, flagged in picks:
            i = pos.get(int(t))
            if i is None or i == 0:
                continue
            both = hist[[i - 1, i], site_pos[site]]
            ref, cur = _hist_shares(both)
            w = None if value is None else value[i]
            items.append(
                {
                    "step": int(t),
                    "ref_step": int(steps[i - 1]),
                    "flagged": flagged,
                    "w1_std": rounded(w, 4) if w is not None else None,
                    "threshold": row.get("drift_threshold"),
                    "ref": rounded(ref, 4),
                    "cur": rounded(cur, 4),
                }
            )
        if items:
            out[site] = items
    return out


def settings(ds: xr.Dataset) -> dict[str, Any]:
    """The run's attributes; ``recorder_config`` parsed from JSON (kept as text if it is not
    JSON)."""
    out: dict[str, Any] = {}
    for k, v in ds.attrs.items():
        if k == "recorder_config" and isinstance(v, str):
            try:
                out[k] = json.loads(v)
            except ValueError:
                out[k] = v
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[str(k)] = v if not isinstance(v, float) or math.isfinite(v) else str(v)
        else:
            out[str(k)] = str(v)
    return out


def run_payload(
    ds: xr.Dataset, entry: dict[str, Any], drift: xr.Dataset | None, label: str
) -> dict[str, Any]:
    """The data of one run's interactive panels.

    Parameters
    ----------
    ds : xarray.Dataset
        The run.
    entry : dict
        Its diagnostics (:func:`icstools.report.diagnose_run`), for the flagged steps.
    drift : xarray.Dataset or None
        Its per-unit W1/σ against the previous record (``w1_std``), when computed.
    label : str
        The run's name on the page.

    Returns
    -------
    dict
        JSON-ready (keys described in the module docstring).

    Examples
    --------
    >>> payload = run_payload(ds, entry, drift, "runs/a.zarr")  # doctest: +SKIP
    >>> payload["lines"][0]["names"][:2]  # doctest: +SKIP
    ['1:input', '3:input']
    """
    steps = (
        np.asarray(ds["step"].values, dtype=np.int64)
        if "step" in ds.coords
        else np.array([], dtype=np.int64)
    )
    source = _source(ds)
    idx = thin(steps.size, MAX_STEPS)
    lines = _lines(ds, drift, source, idx) if steps.size and "site" in ds.coords else []
    rows = entry.get("sites", [])
    if drift is not None and "w1_std" in drift and rows:
        agg = site_aggregate(drift[["w1_std"]], "median")["w1_std"].transpose("step", "site")
        for row in rows:
            row["_drift"] = np.asarray(agg.sel(site=row["site"]).values, dtype=np.float64)
    try:
        overlays = _overlays(ds, source, steps, entry)
    finally:
        for row in rows:
            row.pop("_drift", None)
    return {
        "label": label,
        "source": source,
        "steps": [int(s) for s in steps[idx]],
        "thinned": int(steps.size) if idx.size < steps.size else None,
        "sites": [str(s) for s in ds["site"].values] if "site" in ds.coords else [],
        "lines": lines,
        "scalars": _scalars(ds, idx),
        "units": _units(ds, source, steps) if steps.size else None,
        "hist": _hist(ds, source, steps) if steps.size else None,
        "overlays": overlays,
        "settings": settings(ds),
    }

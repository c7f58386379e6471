"""Diagnostics of any run (runs outside a known preset, and single stores).

Per-site drift over time (heatmap), saturation, dead units, gradient norms, gradient ICS,
landscape and Jacobian spectra when recorded (each absent variable of :data:`_DIAG_VARS` is
listed with how to record it, :func:`icstools.schema.how_to_record`), a per-site table at the
last record, and the records where drift was flagged: thresholds mean + 3 sd of the site's
median W1/σ against the previous record, learned on a reference window of the first records
(:func:`icstools.analysis.drift.drift_thresholds`, :func:`icstools.analysis.drift.flag_drift`;
the window is printed).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr

from icstools.analysis import AnalysisError
from icstools.analysis.drift import drift_thresholds, flag_drift, site_aggregate
from icstools.analysis.metrics import diverged_step
from icstools.report.figures import run_figures
from icstools.report.formatting import num
from icstools.schema import how_to_record

__all__ = ["diagnose", "diagnose_run"]

#: The optional variables whose absence the diagnostics list (with how to record them).
_DIAG_VARS = (
    "test_acc",
    "probe_sample",
    "grad_norm",
    "param_grad_norm",
    "ics_cos",
    "beta_smoothness",
    "jac_sv",
)


def _window(n_records: int) -> int:
    """Records in the reference window of the drift thresholds (after the first record)."""
    return max(3, math.ceil(0.2 * n_records))


def diagnose_run(ds: xr.Dataset, path: str = "") -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """Diagnostics of one run: per-site table, drift flags, absent variables, figures.

    Drift flags: the median over a site's units of W1/σ against the previous record (probe
    source when recorded), thresholds mean + 3 sd over a reference window of the first
    records (records 2 … 1 + max(3, ⌈20% of the records⌉); the first record has no
    previous one), flags at later records above the threshold.

    Parameters
    ----------
    ds : xarray.Dataset
        One run.
    path : str
        Its label.

    Returns
    -------
    (dict, list of (title, Figure))
        The JSON entry (``REPORT_SCHEMA["$defs"]["run"]``) and the figures.

    Examples
    --------
    >>> entry, figures = diagnose_run(ds)  # doctest: +SKIP
    >>> entry["drift_flags"]["window_steps"]  # doctest: +SKIP
    [1, 2, 3]
    """
    entry, figures, _ = diagnose(ds, path)
    return entry, figures


def diagnose(
    ds: xr.Dataset, path: str = ""
) -> tuple[dict[str, Any], list[tuple[str, Any]], xr.Dataset | None]:
    """:func:`diagnose_run`, and the per-unit W1/σ against the previous record that its drift
    flags read (None when it cannot be computed), for the interactive panels."""
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
    steps = np.asarray(ds["step"].values, dtype=np.int64) if "step" in ds.coords else np.array([])
    notes: list[str] = []
    entry = _empty_entry(ds, path, steps, notes)
    if not steps.size or "site" not in ds.coords:
        notes.append("the run has no record or no site")
        return entry, [], None
    if entry["diverged_step"] is not None:
        notes.append(
            f"the run diverged at step {entry['diverged_step']}: its statistics after that are "
            "not finite (drift is NaN there and never flagged)"
        )
    sources = [str(s) for s in ds["source"].values] if "source" in ds.coords else []
    entry["source"] = "probe" if "probe" in sources else (sources[0] if sources else None)
    rows = _site_rows(ds, notes)
    drift = _flag_drift(ds, steps, rows, entry["drift_flags"])
    entry["sites"] = list(rows.values())
    figures = run_figures(ds, drift, notes)
    entry["figures"] = [title for title, _ in figures]
    return entry, figures, drift


def _empty_entry(ds: xr.Dataset, path: str, steps: np.ndarray, notes: list[str]) -> dict[str, Any]:
    """The run's JSON entry before its sites, drift flags and figures are filled in."""
    return {
        "path": path,
        "model_class": str(ds.attrs.get("model_class", "")),
        "records": int(steps.size),
        "first_step": int(steps[0]) if steps.size else None,
        "last_step": int(steps[-1]) if steps.size else None,
        "diverged_step": diverged_step(ds),
        "source": None,
        "sites": [],
        "drift_flags": {
            "available": False,
            "metric": "w1_std",
            "reference": "previous record",
            "aggregate": "median over the units of a site",
            "window_steps": [],
        },
        "present": [v for v in _DIAG_VARS if v in ds.data_vars],
        "absent": [
            {"variable": v, "how": how_to_record(v)} for v in _DIAG_VARS if v not in ds.data_vars
        ],
        "figures": [],
        "notes": notes,
    }


def _site_rows(ds: xr.Dataset, notes: list[str]) -> dict[str, dict[str, Any]]:
    """One row per site from the run's summary at the last record (units only, and a note,
    when there is no summary)."""
    sites = ds.ics.sites
    rows: dict[str, dict[str, Any]] = {
        s: {"site": s, "units": 0, "flagged_steps": []} for s in sites
    }
    try:
        table = ds.ics.summary()
        for s, r in table.iterrows():
            row = rows[str(s)]
            row["units"] = int(r["units"])
            for col in ("mean", "std", "sat_frac", "w1_std_median", "w1_std_max", "grad_norm"):
                if col in r:
                    row[col] = num(r[col])
            for col in ("dead_units", "nonfinite_units"):
                row[col] = int(r[col])
    except (AnalysisError, ValueError, KeyError) as exc:
        notes.append(f"no per-site summary: {exc}")
        if "site_units" in ds.coords:
            for s, n in zip(sites, np.asarray(ds["site_units"].values), strict=True):
                rows[s]["units"] = int(n)
    return rows


def _flag_drift(
    ds: xr.Dataset, steps: np.ndarray, rows: dict[str, dict[str, Any]], flags: dict[str, Any]
) -> xr.Dataset | None:
    """Thresholds and flagged steps of each site (into ``rows``; how, into ``flags``); returns
    the per-unit W1/σ against the previous record, or None when it cannot be computed."""
    drift = None
    try:
        drift = ds.ics.drift("previous", ["w1_std"])
        agg = site_aggregate(drift[["w1_std"]], "median")
        k = _window(steps.size)
        if steps.size < k + 2:
            flags["reason"] = f"{steps.size} records: too few to learn thresholds (need {k + 2})"
            return drift
        window = steps[1 : 1 + k]
        thr = drift_thresholds(agg, window, n_sigma=3.0)
        flagged = flag_drift(agg, thr)["w1_std"].transpose("step", "site")
        after = steps > window[-1]
        fl = np.asarray(flagged.values, dtype=bool)
        upper = thr["w1_std"].sel(limit="upper")
        for j, s in enumerate(str(x) for x in flagged["site"].values):
            rows[s]["flagged_steps"] = [int(t) for t in steps[after & fl[:, j]]]
            rows[s]["drift_threshold"] = num(upper.sel(site=s))
        flags.update(available=True, window_steps=[int(t) for t in window], n_sigma=3.0)
    except (AnalysisError, ValueError, KeyError) as exc:
        flags["reason"] = f"drift not computable: {exc}"
    return drift

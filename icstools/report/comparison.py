"""Comparisons of any runs: groups given on the command line (``icstools report A.zarr B/ ...
--label NAME ...``: each input, a run store or a folder of runs, is one group, its runs the
seeds), compared site by site with :func:`icstools.analysis.compare.compare` on metrics of
the registry :data:`icstools.analysis.metrics.METRICS` (and run variables compare reduces),
each other group against the first.

How a comparison's verdict is reached
-------------------------------------
Each run is reduced to one number per site (:data:`COMPARED`); the groups' runs are compared
as seeds (the seed is the replicate, as for the claims: ratio of the means with Fieller's 95%
interval over runs, the difference with Welch's t interval; ``compare(ci_method="t")``,
calibrated for 3–10 seeds). The verdict reads the interval of the ratio (of the
difference when the ratio is undefined) against the equivalence band of ± :data:`MARGIN`
around no change (for a ratio ``[1/(1+m), 1+m]``):

* **higher** / **lower**: the whole interval lies above / below no change (1, or 0 for a
  difference);
* **similar**: the interval lies inside the band (any change is smaller than ±10%);
* **inconclusive**: the interval includes no change and reaches beyond the band, or there is
  no interval: a group with fewer than two runs with a finite metric (a single run gives an
  estimate, never an interval over seeds: give folders of seeds to get one).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from icstools.analysis import AnalysisError
from icstools.analysis.compare import compare
from icstools.analysis.drift import site_aggregate
from icstools.analysis.metrics import METRICS
from icstools.report.claims import CONFIDENCE_LEVEL, band
from icstools.report.formatting import fmt, num
from icstools.report.interactive import MAX_STEPS, rounded, thin
from icstools.report.verdicts import N_RESAMPLES

__all__ = [
    "COMPARED",
    "COMPARISON_VERDICTS",
    "MARGIN",
    "Group",
    "compare_groups",
    "comparison_verdict",
    "drift_traces",
]

#: The verdicts of a comparison.
COMPARISON_VERDICTS = ("higher", "lower", "similar", "inconclusive")
#: Half-width of the equivalence band (a relative change smaller than this is "similar").
MARGIN = 0.1
#: What is compared per site: (metric, keyword arguments, what the number is). A metric name
#: of the registry, or a run variable (``reduce`` over records, mean over the site's units).
COMPARED: tuple[tuple[str, dict[str, Any], str], ...] = (
    (
        "w1_std",
        {"reference": "previous", "how": "median"},
        "drift: W1/σ of each record against the previous one, median over the site's units, "
        "mean over records",
    ),
    (
        "w1_std",
        {"reference": "first", "how": "median"},
        "drift from the start: W1/σ of each record against the first, median over the site's "
        "units, mean over records",
    ),
    (
        "sat_frac",
        {},
        "saturation: share of values where the derivative is below 0.01, mean "
        "over units and records (sites with a threshold)",
    ),
    ("zero_frac", {}, "share of exact zeros, mean over units and records"),
    ("grad_norm", {}, "activation-gradient norm, mean over records"),
)


@dataclass
class Group:
    """One group of runs: its label, the input it came from, its runs ``(path, dataset)``."""

    label: str
    source: str
    runs: list[tuple[str, xr.Dataset]] = field(default_factory=list)


def comparison_verdict(
    statistic: str, lo: float, hi: float, n_cond: int, n_ref: int, margin: float = MARGIN
) -> tuple[str, str]:
    """Verdict and reason from the interval ``[lo, hi]`` of ``statistic`` ("ratio"/"diff").

    Examples
    --------
    >>> comparison_verdict("ratio", 1.5, 2.5, 3, 3)[0]
    'higher'
    >>> comparison_verdict("ratio", 0.95, 1.05, 3, 3)[0]
    'similar'
    >>> comparison_verdict("ratio", float("nan"), float("nan"), 1, 1)[0]
    'inconclusive'
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        if min(n_cond, n_ref) < 2:
            return "inconclusive", (
                f"no interval over seeds: {n_cond} vs {n_ref} runs with a finite value; a group "
                "needs at least 2 runs (give a folder of seeds)"
            )
        return "inconclusive", f"no finite {CONFIDENCE_LEVEL:.0%} interval of the {statistic}"
    null, band_lo, band_hi = band(statistic, margin)
    ci = f"the {CONFIDENCE_LEVEL:.0%} CI [{fmt(lo)}, {fmt(hi)}] of the {statistic}"
    if lo > null:
        return "higher", f"{ci} lies above {null:g}"
    if hi < null:
        return "lower", f"{ci} lies below {null:g}"
    if statistic == "ratio" and band_lo <= lo and hi <= band_hi:
        return "similar", f"{ci} lies inside the band [{band_lo:.3g}, {band_hi:.3g}]"
    return "inconclusive", f"{ci} includes {null:g} and reaches beyond the band"


def _has(ds: xr.Dataset, metric: str) -> bool:
    if metric in METRICS:
        return "quantile_value" in ds.data_vars or "probe_sample" in ds.data_vars
    return metric in ds.data_vars


def _rows(table: Any, name: str, kwargs: dict[str, Any], what: str) -> list[dict[str, Any]]:
    rows = []
    for r in table.to_dict("records"):
        if not (np.isfinite(r["mean_cond"]) or np.isfinite(r["mean_ref"])):
            continue  # the metric is undefined at this site (e.g. saturation of a ReLU input)
        use_ratio = math.isfinite(r["ratio"]) and math.isfinite(r["ratio_lo"])
        stat = "ratio" if use_ratio else "diff"
        lo, hi = (r["ratio_lo"], r["ratio_hi"]) if use_ratio else (r["diff_lo"], r["diff_hi"])
        verdict, reason = comparison_verdict(stat, lo, hi, int(r["n_cond"]), int(r["n_ref"]))
        rows.append(
            {
                "metric": name,
                "metric_kwargs": {k: str(v) for k, v in kwargs.items()},
                "what": what,
                "site": str(r["site"]),
                "group": str(r["condition"]),
                "reference": str(r["reference"]),
                "n_group": int(r["n_cond"]),
                "n_reference": int(r["n_ref"]),
                "mean_group": num(r["mean_cond"]),
                "mean_reference": num(r["mean_ref"]),
                "ratio": num(r["ratio"]),
                "ratio_ci": [num(r["ratio_lo"]), num(r["ratio_hi"])],
                "diff": num(r["diff"]),
                "diff_ci": [num(r["diff_lo"]), num(r["diff_hi"])],
                "statistic": stat,
                "verdict": verdict,
                "reason": reason,
            }
        )
    return rows


def compare_groups(groups: Sequence[Group]) -> dict[str, Any]:
    """Every other group against the first, per site, on each metric of :data:`COMPARED`
    that all runs have.

    Returns
    -------
    dict
        ``REPORT_SCHEMA["$defs"]["comparison"]``: ``groups`` (label, input, runs),
        ``reference``, ``confidence_level``, ``margin``, ``rows`` (one per metric, site and
        group), ``notes``.

    Examples
    --------
    >>> c = compare_groups([Group("A", "a", [("a.zarr", ds_a)]),
    ...                     Group("B", "b", [("b.zarr", ds_b)])])  # doctest: +SKIP
    >>> {r["group"] for r in c["rows"]}  # doctest: +SKIP
    {'B'}
    """
    runs = {g.label: [ds for _, ds in g.runs] for g in groups}
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    for name, kwargs, what in COMPARED:
        if not all(_has(ds, name) for v in runs.values() for ds in v):
            notes.append(f"{name}: not recorded in every run, not compared")
            continue
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")  # each row's verdict says why it has no interval
                table = compare(
                    runs,
                    name,
                    n_resamples=N_RESAMPLES,
                    confidence_level=CONFIDENCE_LEVEL,
                    metric_kwargs=kwargs or None,
                )
        except (AnalysisError, ValueError, KeyError, TypeError) as exc:
            notes.append(f"{name}: not compared: {exc}")
            continue
        rows += _rows(table, name, kwargs, what)
    if any(len(g.runs) < 2 for g in groups):
        notes.append(
            "a group with a single run has no interval over seeds: its verdicts are "
            "inconclusive; give a folder of runs (seeds) per group for intervals"
        )
    return {
        "groups": [
            {"label": g.label, "input": g.source, "runs": [p for p, _ in g.runs]} for g in groups
        ],
        "reference": groups[0].label,
        "confidence_level": CONFIDENCE_LEVEL,
        "margin": MARGIN,
        "rows": rows,
        "notes": notes,
    }


def drift_traces(
    groups: Sequence[Group], drifts: dict[str, xr.Dataset | None]
) -> dict[str, Any] | None:
    """The per-site drift (median W1/σ vs the previous record) of every run of every group
    over steps, on one step axis (for the page's comparison plot); ``drifts`` by run path."""
    per_run = []
    for gi, g in enumerate(groups):
        for path, _ in g.runs:
            d = drifts.get(path)
            if d is None or "w1_std" not in d:
                continue
            agg = site_aggregate(d[["w1_std"]], "median")["w1_std"].transpose("step", "site")
            per_run.append((gi, f"{g.label}: {path}", agg))
    if not per_run:
        return None
    steps = np.unique(np.concatenate([np.asarray(a["step"].values) for _, _, a in per_run]))
    steps = steps[thin(steps.size, MAX_STEPS)]
    sites = list(dict.fromkeys(str(s) for _, _, a in per_run for s in a["site"].values))
    runs = []
    for gi, label, agg in per_run:
        al = agg.reindex(step=steps)
        runs.append(
            {
                "group": gi,
                "label": label,
                "drift": {str(s): rounded(al.sel(site=s).values, 4) for s in al["site"].values},
            }
        )
    return {"steps": [int(s) for s in steps], "sites": sites, "runs": runs}

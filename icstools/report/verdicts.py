"""The statistics that decide a verdict: :func:`assess` evaluates the claims of a preset on its
runs (one number per run from the metric registry, compared across seeds), :func:`_decide`
reads an interval against a claim's rule, :func:`small_sample_note` says when few seeds make an
interval erratic.

How a verdict is reached
------------------------
**The seed is the replicate.** Each run is reduced to one number (its metric, a run-level
metric of :data:`icstools.analysis.metrics.METRICS` called with the claim's keyword
arguments); the condition's runs are compared with the reference's runs by
:func:`icstools.analysis.compare.compare`: the ratio or the difference of the means, with a 95%
confidence interval over seeds, and a Mann–Whitney test. The interval is compare's default
``ci_method="t"``: **Welch's t interval** for a difference, **Fieller's interval** for a ratio
(:mod:`icstools.analysis.intervals`); its coverage at 3, 5 and 10 seeds on normal, skewed and
heavy-tailed seed values is measured by ``bench/interval_calibration.py`` and checked by
``tests/test_intervals.py``. Each verdict's ``effect["method"]`` names the interval it read.
The verdict reads the interval, never the p-value alone:

* ``expect="lower"`` (e.g. BN's drift is lower): **supported** if the whole interval lies
  below the null value (1 for a ratio, 0 for a difference); **not supported** if it lies
  above it (the opposite effect), or if it lies inside the equivalence band of ± ``margin``
  around the null value (any effect is smaller than the smallest one the claim means; for a
  ratio the band is [1/(1+margin), 1+margin]); **inconclusive** otherwise: the interval
  includes the null value and reaches beyond the band (too few seeds, too noisy), or there is
  no interval (a condition with fewer than two finite runs, e.g. a single seed). An interval
  below the null value that also lies inside the band is supported, with a note that the
  effect is small.
* ``expect="higher"``: the mirror image.
* ``expect="equal"`` (e.g. noisy BN trains about as well): supported if the interval lies inside
  the band, not supported if it lies entirely outside it, inconclusive otherwise.
* ``expect="not-higher"`` (e.g. BN does not reduce gradient ICS): supported if the interval's
  upper end is inside the band's upper end, not supported if its lower end is above it.

Until issue 15 the interval was a studentized bootstrap (bootstrap-t). With 3 seeds it was
erratic: a resample that draws one run three times has no spread, and such resamples set the
interval's ends (tanh saturation 0.023 ± 0.001 vs 0.48 ± 0.05 got [−3.4, 3.1], wider than the
metric's range; Welch's t gives [−0.58, −0.33]). With fewer than :data:`FEW_SEEDS` (5) seeds
a verdict's notes say how few degrees of freedom the interval has (:func:`small_sample_note`).

With a single seed in a compared condition nothing can be said about seed-to-seed variation:
those verdicts are inconclusive, and the report says so at the top, in red. Three kinds of
claims need more than one comparison: ``lr-sweep`` (counts of runs that train, per learning
rate: see its rule), ``identity`` (the §3.3 identities, relative errors logged in the runs:
deterministic, so a tolerance and no interval) and ``all-of`` (a claim made of other claims).
An unknown preset, a missing condition or a missing variable gives an inconclusive verdict
with the reason, never an exception.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.stats
import xarray as xr

from icstools.analysis import AnalysisError
from icstools.analysis.compare import compare
from icstools.analysis.intervals import INTERVAL_METHODS
from icstools.analysis.metrics import (
    METRICS,
    MissingVariableError,
    diverged_step,
    finite_steps,
    identity_variables,
)
from icstools.report.claims import (
    CLAIMS,
    CONFIDENCE_LEVEL,
    METRIC_DESCRIPTIONS,
    Claim,
    band,
    rule_text,
)
from icstools.report.formatting import fmt, num

__all__ = ["FEW_SEEDS", "N_RESAMPLES", "assess", "small_sample_note"]

#: Bootstrap resamples, passed to compare (used only by its bootstrap methods; the verdicts
#: read compare's default closed-form t intervals, which draw nothing).
N_RESAMPLES = 9999
#: Below this many finite runs in a compared condition, a verdict's notes say that the interval
#: rests on few degrees of freedom (see :func:`small_sample_note`).
FEW_SEEDS = 5


def _diverged(ds: xr.Dataset) -> bool:
    if diverged_step(ds) is not None:
        return True
    if "loss" in ds.data_vars:
        loss = np.asarray(ds["loss"].values, dtype=np.float64)
        return bool(np.isinf(loss).any())
    return False


def _decide(
    statistic: str, expect: str, margin: float, lo: float, hi: float
) -> tuple[str, str, list[str]]:
    """Verdict, reason and notes from the interval [lo, hi] of the statistic."""
    null, band_lo, band_hi = band(statistic, margin)
    name = "ratio" if statistic == "ratio" else "difference"
    if math.isnan(lo) or math.isnan(hi):
        return (
            "inconclusive",
            f"no confidence interval of the {name} (fewer than 2 runs with a finite metric in "
            "a condition: add seeds)",
            [],
        )
    inside = band_lo <= lo and hi <= band_hi
    ci = f"the {CONFIDENCE_LEVEL:.0%} CI [{fmt(lo)}, {fmt(hi)}]"
    small = [f"the effect is small: {ci} lies inside the band [{band_lo:.3g}, {band_hi:.3g}]"]
    if expect in ("lower", "higher"):
        right = hi < null if expect == "lower" else lo > null
        wrong = lo > null if expect == "lower" else hi < null
        side = "below" if expect == "lower" else "above"
        if right:
            return "supported", f"{ci} of the {name} lies {side} {null:g}", small if inside else []
        if wrong:
            other = "above" if expect == "lower" else "below"
            return "not supported", f"{ci} of the {name} lies {other} {null:g}: the opposite", []
        if inside:
            return (
                "not supported",
                f"{ci} of the {name} lies inside [{band_lo:.3g}, {band_hi:.3g}]: no effect "
                "larger than the margin",
                [],
            )
        return "inconclusive", f"{ci} of the {name} includes {null:g}", []
    if expect == "equal":
        if inside:
            return "supported", f"{ci} lies inside [{band_lo:.3g}, {band_hi:.3g}]", []
        if hi < band_lo or lo > band_hi:
            return "not supported", f"{ci} lies outside [{band_lo:.3g}, {band_hi:.3g}]", []
        return "inconclusive", f"{ci} overlaps the edge of [{band_lo:.3g}, {band_hi:.3g}]", []
    if expect == "not-higher":
        if hi <= band_hi:
            return "supported", f"{ci} ends below {band_hi:.3g}", []
        if lo > band_hi:
            return "not supported", f"{ci} starts above {band_hi:.3g}", []
        return "inconclusive", f"{ci} straddles {band_hi:.3g}", []
    raise ValueError(f"unknown expect {expect!r}")


def _resolve(token: str, conditions: Sequence[str]) -> tuple[str | None, str]:
    """The condition named by ``token`` (see :class:`Claim`), or None and why."""
    if "{max}" in token or "{min}" in token:
        want = "{max}" if "{max}" in token else "{min}"
        pattern = re.escape(token).replace(re.escape(want), r"(\d+(?:\.\d+)?)")
        hits = [(float(m.group(1)), c) for c in conditions if (m := re.fullmatch(pattern, c))]
        if not hits:
            return None, f"no condition matches {token!r}"
        return (max(hits) if want == "{max}" else min(hits))[1], ""
    if token in conditions:
        return token, ""
    return None, f"condition {token!r} has no runs"


@dataclass
class _Runs:
    """The runs of a preset: condition -> list of (path label, dataset); metric values cached
    per (run, metric, keyword arguments)."""

    preset: str
    conditions: dict[str, list[tuple[str, xr.Dataset]]]
    cache: dict[tuple[int, str, Any], float] = field(default_factory=dict)

    def values(self, cond: str, metric: str, **kwargs: Any) -> list[float]:
        """The registry metric ``metric`` of each run of ``cond``, called with ``kwargs``."""
        key_kwargs = tuple(sorted((k, _hashable(v)) for k, v in kwargs.items()))
        out = []
        for _, ds in self.conditions[cond]:
            key = (id(ds), metric, key_kwargs)
            if key not in self.cache:
                self.cache[key] = METRICS[metric](ds, **kwargs)
            out.append(self.cache[key])
        return out


def _hashable(value: Any) -> Any:
    if isinstance(value, (np.ndarray, list, tuple)):
        return tuple(np.asarray(value).tolist())
    return value


def _group(cond: str, values: Sequence[float], runs: Sequence[xr.Dataset]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    fin = a[np.isfinite(a)]
    return {
        "condition": cond,
        "n_runs": len(values),
        "n_finite": int(fin.size),
        "n_diverged": sum(_diverged(ds) for ds in runs),
        "mean": num(fin.mean()) if fin.size else None,
        "sd": num(fin.std(ddof=1)) if fin.size > 1 else None,
        "values": [num(v) for v in values],
    }


def _compare_values(
    cond: str, cvals: Sequence[float], ref: str, rvals: Sequence[float]
) -> dict[str, Any]:
    """compare() on one number per run; the row as a dict (its warnings go into ``note``)."""
    runs = {
        ref: [xr.Dataset({"value": ((), float(v))}) for v in rvals],
        cond: [xr.Dataset({"value": ((), float(v))}) for v in cvals],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the row's note/warning say the same
        table = compare(
            runs,
            "value",
            reference=ref,
            n_resamples=N_RESAMPLES,
            confidence_level=CONFIDENCE_LEVEL,
            seed=0,
        )
    return table.iloc[0].to_dict()


def small_sample_note(cvals: Sequence[float], rvals: Sequence[float]) -> str:
    """With fewer than :data:`FEW_SEEDS` seeds in a condition: how few degrees of freedom the
    t interval has, and what that means ("" otherwise, or without spread).

    The interval is exact for normal seed values and was checked by simulation for skewed and
    heavy-tailed ones (``bench/interval_calibration.py``), but with 2–4 degrees of freedom its t
    quantile is large (4.30 for 2), so it is wide and only a large effect is firm.

    Examples
    --------
    >>> small_sample_note([0.48, 0.42, 0.52], [0.023, 0.022, 0.021])[:48]
    'with 3 vs 3 seeds the t interval of the differen'
    >>> small_sample_note([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    ''
    """
    c = np.asarray(cvals, np.float64)
    r = np.asarray(rvals, np.float64)
    c, r = c[np.isfinite(c)], r[np.isfinite(r)]
    nc, nr = c.size, r.size
    if min(nc, nr) < 2 or min(nc, nr) >= FEW_SEEDS:
        return ""
    vc, vr = np.var(c, ddof=1) / nc, np.var(r, ddof=1) / nr
    if vc + vr == 0:
        return ""  # no spread at all: the interval is the point
    df = (vc + vr) ** 2 / (vc**2 / (nc - 1) + vr**2 / (nr - 1))
    q = float(scipy.stats.t.ppf(0.5 + CONFIDENCE_LEVEL / 2, df))
    return (
        f"with {nc} vs {nr} seeds the t interval of the difference has {df:.1f} degrees of "
        f"freedom (Welch–Satterthwaite; t quantile {q:.2f} against 1.96 for many seeds), so it "
        "is wide; more seeds make the verdict firmer"
    )


def _method(row: Mapping[str, Any], statistic: str) -> str:
    """The interval method of a compare row, in words (what the verdict read)."""
    name = str(row.get("ratio_method" if statistic == "ratio" else "diff_method") or "")
    if not name:
        return "no interval (fewer than 2 finite runs in a condition)"
    return f"{INTERVAL_METHODS.get(name, name)}, over seeds"


def _measurement(groups: list[dict[str, Any]], effect: tuple | None = None) -> str:
    """The numbers in words: per condition mean ± sd (n), then the statistic and its CI
    (``effect`` = (name, estimate, ci_low, ci_high, compare row); ±∞ ends are unbounded)."""
    parts = []
    for g in groups:
        sd = f" ± {fmt(g['sd'])}" if g["sd"] is not None else ""
        extra = f", {g['n_diverged']} diverged" if g["n_diverged"] else ""
        nonfinite = g["n_runs"] - g["n_finite"]
        extra += f", {nonfinite} non-finite" if nonfinite else ""
        parts.append(f"{g['condition']}: {fmt(g['mean'])}{sd} (n={g['n_runs']}{extra})")
    text = "; ".join(parts)
    if effect is not None:
        name, est, lo, hi, row = effect
        text += f". {name} {fmt(est)}, {CONFIDENCE_LEVEL:.0%} CI [{fmt(lo)}, {fmt(hi)}]"
        if num(row.get("p")) is not None:
            text += f", {row['test']} p = {fmt(row['p'], 3)}"
    return text


def _base(claim: Claim) -> dict[str, Any]:
    cond, ref = claim.comparison
    return {
        "id": claim.id,
        "preset": claim.preset,
        "claim": claim.claim,
        "source": claim.source,
        "verdict": "inconclusive",
        "measurement": "",
        "metric": METRIC_DESCRIPTIONS.get(claim.metric, claim.metric) or "the metrics of its parts",
        "comparison": f"{cond} vs {ref}" if cond and ref else (cond or "—"),
        "rule": rule_text(claim),
        "reason": "",
        "effect": None,
        "groups": [],
        "single_seed": False,
        "notes": [],
    }


def _common_acc_steps(runs: _Runs, conds: Sequence[str]) -> np.ndarray:
    common: np.ndarray | None = None
    for c in conds:
        for _, ds in runs.conditions[c]:
            here = finite_steps(ds, "test_acc")
            common = here if common is None else np.intersect1d(common, here)
    return np.array([], np.int64) if common is None else common


def _assess_compare(claim: Claim, runs: _Runs, out: dict[str, Any]) -> None:
    names = list(runs.conditions)
    cond, why_c = _resolve(claim.comparison[0], names)
    ref, why_r = _resolve(claim.comparison[1], names)
    if cond is None or ref is None:
        out["reason"] = f"{why_c or why_r}; conditions found: {names}"
        return
    out["comparison"] = f"{cond} vs {ref}"
    kwargs = dict(claim.metric_kwargs)
    if claim.metric == "mean_acc":
        steps = _common_acc_steps(runs, [cond, ref])
        if not steps.size:
            out["reason"] = "no step where every compared run measured test_acc"
            return
        out["notes"].append(
            f"test_acc compared at {steps.size} steps ({int(steps[0])}…{int(steps[-1])})"
        )
        kwargs["steps"] = steps
    cvals = runs.values(cond, claim.metric, **kwargs)
    rvals = runs.values(ref, claim.metric, **kwargs)
    cruns = [ds for _, ds in runs.conditions[cond]]
    rruns = [ds for _, ds in runs.conditions[ref]]
    out["groups"] = [_group(cond, cvals, cruns), _group(ref, rvals, rruns)]
    out["single_seed"] = min(len(cvals), len(rvals)) < 2
    row = _compare_values(cond, cvals, ref, rvals)
    est_key, lo_key, hi_key = (
        ("ratio", "ratio_lo", "ratio_hi")
        if claim.statistic == "ratio"
        else ("diff", "diff_lo", "diff_hi")
    )
    out["effect"] = {
        "statistic": claim.statistic,
        "estimate": num(row[est_key]),
        "ci_low": num(row[lo_key]),
        "ci_high": num(row[hi_key]),
        "confidence_level": CONFIDENCE_LEVEL,
        "method": _method(row, claim.statistic),
        "test": str(row["test"]),
        "p": num(row["p"]),
        "condition": cond,
        "reference": ref,
    }
    lo, hi = float(row[lo_key]), float(row[hi_key])
    verdict, reason, notes = _decide(claim.statistic, claim.expect, claim.margin, lo, hi)
    if out["single_seed"]:
        reason = "SINGLE SEED: no interval over seeds. " + reason
    out["verdict"], out["reason"] = verdict, reason
    out["notes"] += notes + [
        n for n in (row.get("note"), row.get("warning"), small_sample_note(cvals, rvals)) if n
    ]
    out["measurement"] = _measurement(out["groups"], (claim.statistic, row[est_key], lo, hi, row))


_LR_NAME = re.compile(r"(?:(?P<family>.+)-)?(?P<arch>bn|baseline)-x(?P<mult>\d+(?:\.\d+)?)")


def _lr_family(
    runs: _Runs, family: str, arms: dict[tuple[str, float], str], out: dict[str, Any]
) -> tuple[dict[float, str], list[str], list[dict[str, Any]]]:
    """Outcome per multiplier > 1 of one family of the sweep ("holds", "fails", "unclear")."""
    label = f"{family}: " if family else ""
    base1 = arms.get(("baseline", 1.0))
    ref_acc = []
    if base1 is not None:
        ref_acc = [
            v
            for v, (_, ds) in zip(
                runs.values(base1, "final_acc"), runs.conditions[base1], strict=True
            )
            if math.isfinite(v) and not _diverged(ds)
        ]
    threshold = float(np.mean(ref_acc)) - 0.05 if ref_acc else 0.5
    out["notes"].append(
        f"{label}a run trains if it did not diverge and its final test_acc ≥ {threshold:.4f} ("
        + (f"mean of {base1} − 0.05)" if ref_acc else "absolute: no finite baseline-x1 run)")
    )

    def trains(cond: str) -> list[bool]:
        vals = runs.values(cond, "final_acc")
        return [
            (not _diverged(ds)) and math.isfinite(v) and v >= threshold
            for v, (_, ds) in zip(vals, runs.conditions[cond], strict=True)
        ]

    outcomes: dict[float, str] = {}
    lines: list[str] = []
    groups: list[dict[str, Any]] = []
    mults = sorted(
        {m for (_, m) in arms if m > 1 and ("bn", m) in arms and ("baseline", m) in arms}
    )
    for m in mults:
        bn, base = arms[("bn", m)], arms[("baseline", m)]
        tb, tr = trains(bn), trains(base)
        for cond, t in ((bn, tb), (base, tr)):
            g = _group(cond, runs.values(cond, "final_acc"), [d for _, d in runs.conditions[cond]])
            g["n_trains"] = int(sum(t))
            groups.append(g)
        enough = len(tb) >= 2 and len(tr) >= 2
        if enough and all(tb) and not any(tr):
            outcomes[m] = "holds"
        elif not any(tb) or (len(tr) >= 2 and all(tr)):
            outcomes[m] = "fails"
        else:
            outcomes[m] = "unclear"
        lines.append(
            f"{label}×{m:g}: BN trains in {sum(tb)}/{len(tb)} runs, baseline in "
            f"{sum(tr)}/{len(tr)} ({outcomes[m]})"
        )
    return outcomes, lines, groups


def _assess_lr_sweep(claim: Claim, runs: _Runs, out: dict[str, Any]) -> None:
    families: dict[str, dict[tuple[str, float], str]] = {}
    for name in runs.conditions:
        m = _LR_NAME.fullmatch(name)
        if m:
            arm = (m.group("arch"), float(m.group("mult")))
            families.setdefault(m.group("family") or "", {})[arm] = name
    results = {f: _lr_family(runs, f, arms, out) for f, arms in sorted(families.items())}
    results = {f: r for f, r in results.items() if r[0]}
    if not results:
        out["notes"].clear()
        out["reason"] = (
            "no multiplier m > 1 with both '[<family>-]bn-x<m>' and '[<family>-]baseline-x<m>' "
            f"conditions; found {list(runs.conditions)}"
        )
        return
    out["groups"] = [g for r in results.values() for g in r[2]]
    out["comparison"] = "; ".join(
        f"{f + '-' if f else ''}bn-x<m> vs {f + '-' if f else ''}baseline-x<m>, m in "
        + ", ".join(f"{m:g}" for m in r[0])
        for f, r in results.items()
    )
    out["single_seed"] = any(g["n_runs"] < 2 for g in out["groups"])
    held = [(m, f) for f, r in results.items() for m, o in r[0].items() if o == "holds"]
    if held:
        top, family = max(held, key=lambda x: x[0])
    else:
        family = next(iter(results))
        top = max(results[family][0])
    arms = families[family]
    bn, base = arms[("bn", top)], arms[("baseline", top)]
    bn_vals, base_vals = runs.values(bn, "final_acc"), runs.values(base, "final_acc")
    row = _compare_values(bn, bn_vals, base, base_vals)
    out["effect"] = {
        "statistic": "diff",
        "estimate": num(row["diff"]),
        "ci_low": num(row["diff_lo"]),
        "ci_high": num(row["diff_hi"]),
        "confidence_level": CONFIDENCE_LEVEL,
        "method": _method(row, "diff"),
        "test": str(row["test"]),
        "p": num(row["p"]),
        "condition": bn,
        "reference": base,
    }
    everything = [o for r in results.values() for o in r[0].values()]
    if held:
        out["verdict"] = "supported"
        out["reason"] = f"at ×{top:g} ({bn} vs {base}) every BN run trains and no baseline run does"
    elif all(o == "fails" for o in everything):
        out["verdict"] = "not supported"
        out["reason"] = "at every multiplier > 1 BN does not train, or the baseline trains too"
    else:
        out["reason"] = "no multiplier where every BN run trains and no baseline run does"
        if out["single_seed"]:
            out["reason"] = (
                "SINGLE SEED (at least 2 runs per condition are needed). " + (out["reason"])
            )
    out["measurement"] = "; ".join(line for r in results.values() for line in r[1]) + (
        f". Final test_acc, {bn} − {base}: {fmt(row['diff'])} "
        f"[{fmt(row['diff_lo'])}, {fmt(row['diff_hi'])}]"
    )
    out["notes"] += [
        n for n in (row.get("note"), row.get("warning"), small_sample_note(bn_vals, base_vals)) if n
    ]


_TOL, _FAIL = 1e-3, 1e-2


def _identity_errors(ds: xr.Dataset) -> tuple[int, bool, bool, dict[str, float]]:
    """Of one run: how many identity errors were measured, whether one exceeds ``_FAIL`` /
    ``_TOL`` unexplained by BN's ε, and the worst error of each."""
    eps = (
        np.asarray(ds["si_eps_effect"].values, dtype=np.float64)
        if "si_eps_effect" in ds.data_vars
        else None
    )
    measured, fail, mid, worst = 0, False, False, {}
    for n in identity_variables(ds):
        err = np.asarray(ds[n].values, dtype=np.float64)
        ok = np.isfinite(err)
        if not ok.any():
            continue
        measured += 1
        allowed = np.full(err.shape, _TOL)
        if eps is not None:
            allowed = np.maximum(allowed, 2 * np.where(np.isfinite(eps), eps, 0.0))
        bad = ok & (err > allowed)
        fail |= bool((bad & (err > _FAIL)).any())
        mid |= bool(bad.any())
        worst[n] = float(err[ok].max())
    return measured, fail, mid, worst


def _assess_identity(claim: Claim, runs: _Runs, out: dict[str, Any]) -> None:
    prefix = claim.comparison[0].rstrip("*")
    conds = [c for c in runs.conditions if c.startswith(prefix)]
    if not conds:
        out["reason"] = f"no condition starting with {prefix!r}; found {list(runs.conditions)}"
        return
    worst: dict[str, float] = {}
    unexplained_fail = unexplained_mid = False
    measured = 0
    groups = []
    for cond in conds:
        for _, ds in runs.conditions[cond]:
            m, fail, mid, run_worst = _identity_errors(ds)
            measured += m
            unexplained_fail |= fail
            unexplained_mid |= mid
            for n, e in run_worst.items():
                worst[n] = max(worst.get(n, 0.0), e)
        vals = runs.values(cond, claim.metric, **claim.metric_kwargs)  # worst error per run
        groups.append(_group(cond, vals, [d for _, d in runs.conditions[cond]]))
    out["groups"] = groups
    out["comparison"] = ", ".join(conds)
    if not measured:
        out["reason"] = (
            "no identity error was logged (scalars si_output/si_input_grad/si_weight_grad or "
            "scale_*) or none is finite"
        )
        return
    top = max(worst.values())
    out["effect"] = {
        "statistic": "max-error",
        "estimate": num(top),
        "ci_low": None,
        "ci_high": None,
        "confidence_level": None,
        "method": "largest relative error over runs, records, layers and scales",
    }
    if unexplained_fail:
        out["verdict"] = "not supported"
        out["reason"] = f"a relative error exceeds {_FAIL:g} and is not explained by ε"
    elif not unexplained_mid:
        out["verdict"] = "supported"
        out["reason"] = f"every relative error is ≤ {_TOL:g} or explained by BN's ε"
    else:
        out["reason"] = f"some relative error lies between {_TOL:g} and {_FAIL:g} unexplained"
    out["measurement"] = "worst relative error: " + ", ".join(
        f"{n} {fmt(v, 3)}" for n, v in worst.items()
    )
    if any(g["n_runs"] < 2 for g in groups):
        out["notes"].append("single seed (the identities are deterministic: no interval needed)")


def _assess_all_of(
    claim: Claim, results: Mapping[str, dict[str, Any]], out: dict[str, Any]
) -> None:
    parts = [results[p] for p in claim.parts if p in results]
    verdicts = [p["verdict"] for p in parts]
    if len(parts) == len(claim.parts) and all(v == "supported" for v in verdicts):
        out["verdict"] = "supported"
    elif "not supported" in verdicts:
        out["verdict"] = "not supported"
    out["reason"] = "; ".join(f"{p['id']}: {p['verdict']}" for p in parts)
    out["measurement"] = " | ".join(p["measurement"] for p in parts)
    out["single_seed"] = any(p["single_seed"] for p in parts)


def _as_runs(
    preset: Any, runs: Any, labels: Mapping[str, Sequence[str]] | None
) -> dict[str, list[tuple[str, xr.Dataset]]]:
    """``runs`` checked, as ``{condition: [(label, dataset)]}``."""
    if not isinstance(preset, str):
        raise TypeError(f"preset must be a str, got {type(preset).__name__}")
    if not isinstance(runs, Mapping):
        raise TypeError(f"runs must be a mapping {{condition: [datasets]}}, got {type(runs)}")
    conds: dict[str, list[tuple[str, xr.Dataset]]] = {}
    for cond, items in runs.items():
        if isinstance(items, xr.Dataset) or not isinstance(items, Sequence):
            raise TypeError(f"runs[{cond!r}] must be a list of datasets")
        names = list((labels or {}).get(cond, [f"{cond}[{i}]" for i in range(len(items))]))
        for ds in items:
            if not isinstance(ds, xr.Dataset):
                raise TypeError(f"runs[{cond!r}] holds a {type(ds).__name__}, not a dataset")
        conds[str(cond)] = list(zip(names, items, strict=True))
    return conds


def _unknown_preset(preset: str) -> dict[str, Any]:
    known = sorted({c.preset for c in CLAIMS})
    claim = Claim(
        f"{preset}/unknown",
        preset,
        f"(no claims are defined for preset {preset!r})",
        "—",
        "",
        ("", ""),
        "diff",
        "higher",
        0.0,
        "—",
    )
    return {**_base(claim), "reason": f"unknown preset {preset!r}: claims are defined for {known}"}


def assess(
    preset: str,
    runs: Mapping[str, Sequence[xr.Dataset]],
    *,
    labels: Mapping[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the claims of :data:`~icstools.report.claims.CLAIMS` for ``preset`` on its runs.

    Parameters
    ----------
    preset : str
        The preset's name (``manifest.json``'s ``"preset"``).
    runs : mapping {condition: [datasets]}
        One dataset per seed.
    labels : mapping {condition: [str]}, optional
        A label (path) per run, for messages.

    Returns
    -------
    list of dict
        One verdict per claim (keys as ``REPORT_SCHEMA["$defs"]["verdict"]``). An unknown preset
        gives one inconclusive entry that says so.

    Examples
    --------
    >>> verdicts = assess("fig1", {"baseline": base_runs, "bn": bn_runs})  # doctest: +SKIP
    >>> [v["verdict"] for v in verdicts]  # doctest: +SKIP
    ['supported', 'supported', 'inconclusive']
    """
    data = _Runs(preset, _as_runs(preset, runs, labels))
    claims = [c for c in CLAIMS if c.preset == preset]
    if not claims:
        return [_unknown_preset(preset)]
    results: dict[str, dict[str, Any]] = {}
    for claim in claims:
        out = _base(claim)
        try:
            if claim.statistic == "all-of":
                _assess_all_of(claim, results, out)
            elif claim.statistic == "counts":
                _assess_lr_sweep(claim, data, out)
            elif claim.statistic == "max-error":
                _assess_identity(claim, data, out)
            else:
                _assess_compare(claim, data, out)
        except MissingVariableError as exc:
            out["verdict"], out["reason"] = "inconclusive", f"cannot measure: {exc}"
        except (AnalysisError, ValueError, KeyError, IndexError) as exc:
            out["verdict"] = "inconclusive"
            out["reason"] = f"cannot measure: {type(exc).__name__}: {exc}"
        results[claim.id] = out
    return list(results.values())

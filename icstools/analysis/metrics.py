"""The run-level metric registry: one number per run (or per site) from a run dataset.

:data:`METRICS` maps a name to a :class:`Metric`: a function ``run -> float`` (one number per
run) or ``run -> xarray.DataArray (site,)`` (one number per site), a one-line description, and
its keyword defaults. These defaults are the only ones: the functions behind the entries take
keyword-only arguments without defaults, so a caller that wants another value passes it
explicitly (``METRICS["drift"](run, reference="previous", how="mean")``).

:func:`icstools.analysis.compare.compare` looks a metric name up here (after the run's own
variables, which is why no entry is named like a variable of the run schema), and the drift
report's claims (:data:`icstools.report.CLAIMS`) name entries of it and pass the keyword
arguments they need.

Entries
-------
Per site (one number per site, ``xarray.DataArray (site,)``): every drift metric of
:mod:`icstools.analysis.drift` (``"mean_shift"``, ``"log_var_ratio"``, ``"gauss_kl"``,
``"w1"``, ``"w1_std"``, ``"ks"``, ``"psi"``, ``"js"``, ``"hellinger"``): per record against
``reference`` (default ``"first"``), reduced over each site's units by ``how`` (default
``"median"``; NaN units skipped), averaged over the records (NaN records skipped).

Per run (a float):

- ``"drift"``: a drift metric (``metric``, default ``"w1_std"``) of the units of one site
  (``site``, default the input of the last hidden nonlinearity, :func:`last_hidden_site`), per
  record against ``reference`` (default ``"first"``), reduced over the units by ``how``
  (default ``"median"``), averaged over the records compared with another one (the first
  record is left out for ``"previous"`` and ``"first"``, the record of the reference step for
  an int, the first k records for ``("window", k)``). Unlike the per-site entries NaN and ±inf
  propagate: a diverged run stays non-finite, so a comparison counts it as such;
- ``"final_acc"``, ``"mean_acc"``: ``test_acc`` at the last record where it was measured, and
  its mean over ``steps`` (default: the records where it was measured);
- ``"sat_frac_mean"``: ``sat_frac`` of the saturating sites (sigmoid/tanh inputs);
- ``"ics_cos_mean"``, ``"beta"``, ``"loss_variation_mean"``, ``"jac_near_one"``: means of
  sparsely scheduled measurements over the records where they were measured;
- ``"grad_explosion"``: log10 of the first site's over the last site's ``grad_norm`` at the
  first record;
- ``"identities"``: the largest relative error of the §3.3 identities logged in the run.

A metric whose run lacks a variable it needs raises :class:`MissingVariableError` (an
:class:`~icstools.analysis.AnalysisError`) saying how to record it
(:func:`icstools.schema.how_to_record`).

Examples
--------
>>> sorted(METRICS)[:4]
['beta', 'drift', 'final_acc', 'gauss_kl']
>>> METRICS["drift"].defaults["reference"], METRICS["drift"].defaults["how"]
('first', 'median')
>>> import xarray as xr
>>> run = xr.Dataset({"test_acc": ("step", [0.5, float("nan"), 0.9])},
...                  coords={"step": [0, 10, 20]})
>>> METRICS["final_acc"](run), METRICS["mean_acc"](run), METRICS["mean_acc"](run, steps=[0])
(0.9, 0.7, 0.5)
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import xarray as xr

from icstools.analysis.accessor import AnalysisError
from icstools.analysis.drift import _DESCRIPTIONS as _DRIFT_DESCRIPTIONS
from icstools.analysis.drift import METRICS as DRIFT_METRICS
from icstools.analysis.drift import drift, site_aggregate
from icstools.schema import how_to_record

__all__ = [
    "METRICS",
    "Metric",
    "MetricRegistry",
    "MissingVariableError",
    "UnknownMetricError",
    "diverged_step",
    "finite_steps",
    "identity_variables",
    "last_hidden_site",
]


class MissingVariableError(AnalysisError):
    """A metric needs a variable (or a site) that the run did not record."""


class UnknownMetricError(KeyError):
    """A name that is not in the registry (the message lists the registered names)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Metric:
    """One entry of :data:`METRICS`.

    Attributes
    ----------
    name : str
        The registry name.
    func : callable
        ``func(run, **kwargs) -> float | xarray.DataArray (site,)``.
    description : str
        What the number is, in one line.
    defaults : mapping
        The keyword arguments and their defaults (read-only). Calling the entry merges the
        caller's keyword arguments over these.
    """

    name: str
    func: Callable[..., Any]
    description: str
    defaults: Mapping[str, Any]

    def __call__(self, run: xr.Dataset, **kwargs: Any) -> Any:
        """The metric of ``run``, with ``kwargs`` over :attr:`defaults`."""
        return self.func(run, **{**self.defaults, **kwargs})


class MetricRegistry(Mapping[str, Metric]):
    """Name → :class:`Metric`; a lookup of an unknown name lists the registered ones.

    Examples
    --------
    >>> reg = MetricRegistry()
    >>> _ = reg.register("twice_loss", lambda run, k: k * float(run["loss"][-1]), "k × last loss",
    ...                  k=2.0)
    >>> reg["twice_loss"](xr.Dataset({"loss": ("step", [1.0, 0.5])}))
    1.0
    """

    def __init__(self) -> None:
        self._entries: dict[str, Metric] = {}

    def register(
        self, name: str, func: Callable[..., Any], description: str = "", **defaults: Any
    ) -> Metric:
        """Add (or replace) the metric ``name``: ``func(run, **kwargs)``, with its defaults."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a metric name must be a non-empty str, got {name!r}")
        if not callable(func):
            raise TypeError(f"metric {name!r}: func must be callable, got {type(func).__name__}")
        entry = Metric(name, func, str(description), MappingProxyType(dict(defaults)))
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove the metric ``name``."""
        if name not in self._entries:
            raise UnknownMetricError(
                f"unknown metric {name!r}; registered metrics: {sorted(self._entries)}"
            )
        del self._entries[name]

    def __getitem__(self, name: str) -> Metric:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownMetricError(
                f"unknown metric {name!r}; registered metrics: {sorted(self._entries)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


#: The registry of run-level metrics (see the module docstring for its entries).
METRICS = MetricRegistry()


# ============================================================================================
# Helpers shared with the report
# ============================================================================================


def _require(ds: xr.Dataset, *names: str) -> None:
    missing = [n for n in names if n not in ds.data_vars]
    if missing:
        how = "; ".join(f"{n}: {how_to_record(n) or 'not recorded'}" for n in missing)
        raise MissingVariableError(f"the runs lack {missing} ({how})")


def diverged_step(ds: xr.Dataset) -> int | None:
    """The run's ``diverged_step`` attribute as an int (None when absent or not a number)."""
    value = ds.attrs.get("diverged_step")
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def finite_steps(ds: xr.Dataset, var: str) -> np.ndarray:
    """The steps where the ``(step,)`` variable ``var`` is finite (a
    :class:`MissingVariableError` if the run lacks it)."""
    _require(ds, var)
    steps = np.asarray(ds["step"].values, dtype=np.int64)
    values = np.asarray(ds[var].values, dtype=np.float64)
    return steps[np.isfinite(values)]


def last_hidden_site(ds: xr.Dataset) -> str:
    """The last site that is a sigmoid/tanh input (has a saturation threshold), else the last
    site: the input of the last hidden nonlinearity, Fig. 1(b, c)'s site.

    Examples
    --------
    >>> run = xr.Dataset(coords={"step": [0], "site": ["1:input", "3:input", "5:input"],
    ...                          "sat_threshold": ("site", [4.585, 4.585, float("nan")])})
    >>> last_hidden_site(run)
    '3:input'
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset (a run), got {type(ds).__name__}")
    if "step" not in ds.dims:
        raise ValueError("ds has no 'step' dimension: is it a run dataset (DESIGN.md §3)?")
    sites = ds.ics.sites
    if not sites:
        raise ValueError("the run has no site")
    if "sat_threshold" in ds.coords or "sat_threshold" in ds.data_vars:
        thr = np.asarray(ds["sat_threshold"].values, dtype=np.float64)
        hidden = [s for s, t in zip(sites, thr, strict=True) if np.isfinite(t)]
        if hidden:
            return hidden[-1]
    return sites[-1]


_KNOWN_IDENTITIES = ("si_output", "si_input_grad", "si_weight_grad")


def identity_variables(ds: xr.Dataset) -> list[str]:
    """The logged relative errors of the §3.3 identities: ``si_output``, ``si_input_grad``,
    ``si_weight_grad`` when present, else every ``(step,)`` scalar named ``scale_*`` or
    ``si_*`` (but ``si_eps_effect``)."""
    names = [str(n) for n in ds.data_vars if ds[n].dims == ("step",)]
    known = [n for n in _KNOWN_IDENTITIES if n in names]
    if known:
        return known
    return [n for n in names if n.startswith(("scale_", "si_")) and n != "si_eps_effect"]


def _finite_mean(values: Any) -> float:
    """Mean of the non-NaN values (±inf propagates); NaN if none."""
    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[~np.isnan(a)]
    if not a.size:
        return math.nan
    with np.errstate(invalid="ignore", over="ignore"):
        return float(a.mean())


def _sparse_mean(ds: xr.Dataset, da: xr.DataArray) -> float:
    """Mean over the records where a sparsely scheduled variable was measured; NaN for a run
    that diverged (its later values describe a broken network)."""
    if diverged_step(ds) is not None:
        return math.nan
    return _finite_mean(da.values)


def _norm_layers(ds: xr.Dataset) -> set[str]:
    """Names of normalization modules, from the run's ``model_summary`` (a module repr)."""
    text = ds.attrs.get("model_summary")
    if not isinstance(text, str):
        return set()
    names: set[str] = set()
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = re.match(r"^(\s*)\(([^)]+)\): (\w+)\(", line)
        if not m:
            continue
        indent, name, kind = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        full = ".".join([s for _, s in stack] + [name])
        stack.append((indent, name))
        if "Norm" in kind:
            names.add(full)
    return names


def _default_source(run: xr.Dataset) -> str:
    sources = [str(s) for s in run["source"].values] if "source" in run.dims else ["probe"]
    return "probe" if "probe" in sources else sources[0]


# ============================================================================================
# Drift
# ============================================================================================


def _site_drift(
    name: str, run: xr.Dataset, *, reference: Any, source: str | None, method: str, how: str
) -> xr.DataArray:
    """Drift metric ``name`` per site: per record against ``reference``, reduced over the
    site's units by ``how``, then averaged over the records (NaN records skipped)."""
    if source is None:
        source = _default_source(run)
    per_unit = drift(run, reference, [name], source=source, method=method)
    per_site = site_aggregate(per_unit[[name]], how)[name]  # (step, site)
    return per_site.mean("step", skipna=True)


_UNIT_REDUCERS: dict[str, Callable[..., np.ndarray]] = {
    "median": np.median,
    "max": np.max,
    "min": np.min,
}


def _compared_records(reference: Any, steps: np.ndarray) -> np.ndarray:
    """Records whose drift compares two different records (``drift`` validated the
    reference already)."""
    keep = np.ones(steps.size, dtype=bool)
    if isinstance(reference, str):  # "previous": the first has none; "first": itself
        keep[:1] = False
    elif isinstance(reference, tuple):  # ("window", k): the first k records have none
        keep[: int(reference[1])] = False
    else:  # a step: the record of that step against itself
        keep &= steps != int(reference)
    return keep


def _run_drift(
    run: xr.Dataset,
    *,
    metric: str,
    site: str | None,
    reference: Any,
    how: str,
    source: str | None,
    method: str,
) -> float:
    if how not in ("mean", *_UNIT_REDUCERS):
        raise ValueError(
            f"how={how!r} is not valid. Expected one of ['mean', 'median', 'max', 'min']"
        )
    if "probe_sample" not in run.data_vars:
        _require(run, "quantile_value")
    name = last_hidden_site(run) if site is None else run.ics.resolve_site(site)
    sub = run.ics.site(name)
    d = sub.ics.drift(reference, [metric], source=source, method=method)[metric]
    values = np.asarray(d.transpose("step", "unit").values, dtype=np.float64)
    values = values[_compared_records(reference, np.asarray(d["step"].values))]
    if not values.size:
        return math.nan
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf of a diverged run propagate
        if how == "mean":  # over records and units at once (every record has the same units)
            return float(values.mean())
        return float(_UNIT_REDUCERS[how](values, axis=1).mean())


# ============================================================================================
# Accuracy, saturation, gradients, landscape, spectra, identities
# ============================================================================================


def _test_acc(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    _require(ds, "test_acc")
    steps = np.asarray(ds["step"].values, dtype=np.int64)
    acc = np.asarray(ds["test_acc"].values, dtype=np.float64)
    return steps, acc


def _final_acc(ds: xr.Dataset) -> float:
    acc = _test_acc(ds)[1]
    measured = ~np.isnan(acc)
    return float(acc[measured][-1]) if measured.any() else math.nan


def _mean_acc(ds: xr.Dataset, *, steps: Any) -> float:
    s, acc = _test_acc(ds)
    if steps is None:
        return _finite_mean(acc)
    if not len(steps):
        return math.nan
    return float(acc[np.isin(s, steps)].mean())


def _sat_frac_mean(ds: xr.Dataset) -> float:
    _require(ds, "sat_frac")
    sources = [str(x) for x in ds["source"].values] if "source" in ds.coords else []
    sat = ds.ics.saturation(source="train" if "train" in sources else None)
    if "sat_threshold" in ds.coords:
        has = np.isfinite(np.asarray(ds["sat_threshold"].values, dtype=np.float64))
        sat = sat.isel(site=np.flatnonzero(has))
    if not sat.sizes.get("site", 0):
        raise MissingVariableError("no site has a saturation threshold (sigmoid/tanh inputs)")
    with np.errstate(invalid="ignore"):
        return float(np.asarray(sat.values, dtype=np.float64).mean())


def _ics_cos_mean(ds: xr.Dataset) -> float:
    _require(ds, "ics_cos")
    da = ds["ics_cos"]
    if "layer" in da.dims and "layer" in da.coords:
        norms = _norm_layers(ds)
        keep = [i for i, name in enumerate(da["layer"].values) if str(name) not in norms]
        da = da.isel(layer=keep)
    return _sparse_mean(ds, da)


def _beta(ds: xr.Dataset) -> float:
    _require(ds, "beta_smoothness")
    return _sparse_mean(ds, ds["beta_smoothness"])


def _loss_variation_mean(ds: xr.Dataset) -> float:
    _require(ds, "loss_variation")
    return _sparse_mean(ds, ds["loss_variation"])


def _grad_predictiveness(ds: xr.Dataset) -> float:
    _require(ds, "landscape_grad_diff")
    da = ds["landscape_grad_diff"]
    if "eta" in da.dims:
        da = da.mean("eta", skipna=False)  # a record measured at some η only: not measured
    return _sparse_mean(ds, da)


def _last_logged(ds: xr.Dataset, name: str) -> float:
    """The value of a logged ``(step,)`` scalar at the last record where it is not NaN."""
    _require(ds, name)
    values = np.asarray(ds[name].values, dtype=np.float64)
    measured = ~np.isnan(values)
    return float(values[measured][-1]) if measured.any() else math.nan


def _jac_near_one(ds: xr.Dataset) -> float:
    _require(ds, "jac_frac_near_one")
    da = ds["jac_frac_near_one"]
    if "block" in da.coords:
        keep = [i for i, b in enumerate(da["block"].values) if str(b) != "input->output"]
        da = da.isel(block=keep or list(range(da.sizes["block"])))
    return _sparse_mean(ds, da)


def _grad_explosion(ds: xr.Dataset) -> float:
    _require(ds, "grad_norm")
    g = np.asarray(ds["grad_norm"].transpose("step", "site").values, dtype=np.float64)
    if g.shape[1] < 2:
        raise MissingVariableError("grad_norm has fewer than two sites")
    first, last = g[0, 0], g[0, -1]
    if not (first > 0 and last > 0):
        return math.nan
    return float(np.log10(first / last))


def _identities(ds: xr.Dataset) -> float:
    worst = math.nan
    for name in identity_variables(ds):
        err = np.asarray(ds[name].values, dtype=np.float64)
        ok = np.isfinite(err)
        if ok.any():
            e = float(err[ok].max())
            worst = e if math.isnan(worst) else max(worst, e)
    return worst


# ============================================================================================
# The entries
# ============================================================================================

_DRIFT_DEFAULTS = {"reference": "first", "source": None, "method": "auto", "how": "median"}


def _register_drift() -> None:
    """The drift metrics: one per site-level drift metric, and ``drift`` of one site."""
    for name in DRIFT_METRICS:
        METRICS.register(
            name,
            functools.partial(_site_drift, name),
            f"{_DRIFT_DESCRIPTIONS[name]} per site: each record vs `reference`, `how` over the "
            "site's units, mean over the records (NaN skipped)",
            **_DRIFT_DEFAULTS,
        )
    METRICS.register(
        "drift",
        _run_drift,
        "drift `metric` of each unit of `site` (default: the last hidden nonlinearity's input, "
        "last site with a saturation threshold, else last site), each record vs `reference`, "
        "`how` over the units, mean over the records compared (NaN/inf propagate)",
        metric="w1_std",
        site=None,
        **_DRIFT_DEFAULTS,
    )


#: ``(name, function, description)`` of the metrics without options.
_PLAIN_METRICS = (
    (
        "sat_frac_mean",
        _sat_frac_mean,
        "sat_frac on the training batches, mean over the units of all sites with a saturation "
        "threshold and over records",
    ),
    (
        "ics_cos_mean",
        _ics_cos_mean,
        "ics_cos (cosine of the layer gradient before/after the previous layers' update), mean "
        "over the records where measured and the layers with weights, normalization layers "
        "excluded",
    ),
    (
        "beta",
        _beta,
        "beta_smoothness (effective β-smoothness), mean over the records where measured",
    ),
    (
        "loss_variation_mean",
        _loss_variation_mean,
        "loss_variation (range of the loss along the gradient), mean over records",
    ),
    (
        "grad_predictiveness",
        _grad_predictiveness,
        "landscape_grad_diff (‖∇L(w) − ∇L(w − ηg)‖: smaller means more predictive gradients), "
        "mean over the step sizes η and over the records where measured",
    ),
    (
        "jac_near_one",
        _jac_near_one,
        "jac_frac_near_one (share of singular values in [0.5, 2]), mean over the records where "
        "measured and the segment blocks (the whole network input->output excluded)",
    ),
    (
        "grad_explosion",
        _grad_explosion,
        "log10 of grad_norm at the first site over grad_norm at the last site, at the first "
        "record (> 0: gradients grow towards the input)",
    ),
    (
        "identities",
        _identities,
        "largest finite relative error of the §3.3 identities logged in the run (si_*, "
        "scale_*, over records; NaN if none)",
    ),
)

#: The generalization measure's logged values (``final_<name>``).
_GENERALIZATION = (
    ("gen_gap_acc", "train − test accuracy (eval mode)"),
    ("gen_gap_loss", "test − train loss (eval mode)"),
    ("gen_test_acc", "test accuracy on all 10,000 test images (eval mode)"),
    ("gen_train_acc", "accuracy on the first 10,000 training images (eval mode)"),
)


def _register_builtins() -> None:
    _register_drift()
    METRICS.register("final_acc", _final_acc, "test_acc at the last record where it was measured")
    METRICS.register(
        "mean_acc",
        _mean_acc,
        "mean test_acc over `steps` (default: the records where it was measured)",
        steps=None,
    )
    for name, fn, description in _PLAIN_METRICS:
        METRICS.register(name, fn, description)
    for name, what in _GENERALIZATION:
        METRICS.register(
            f"final_{name}",
            functools.partial(_last_logged, name=name),
            f"{name} ({what}, logged by the generalization measure) at the last record where "
            "it was measured",
        )


_register_builtins()

"""Write a run as TensorBoard event files: per-site scalars and histograms over steps.

The events are written with TensorBoard's own writer (``torch.utils.tensorboard``, which needs
the ``tensorboard`` package: ``pip install icstools[tensorboard]``), one event per recorded
step, at the run's optimizer step. Tags (TensorBoard groups its cards by the part before the
first ``/``, so each site gets its own group):

==================================  ==========================================================
``run/<name>``                      each ``(step,)`` variable: ``loss``, ``lr``, ``test_acc``…
``<site>/<source>/mean``            mean of the site's finite values (all its units pooled):
                                    Σ count·mean / Σ count
``<site>/<source>/std``             their standard deviation (ddof=0), by the law of total
                                    variance from the units' ``count``, ``mean``, ``var``
``<site>/<source>/sat_frac``        share of saturated finite values (sites with a saturation
                                    threshold only), count-weighted over units
``<site>/<source>/zero_frac``       share of exact zeros, count-weighted over units
``<site>/<source>/dead_frac``       share of the site's units with ``zero_frac == 1``
``<site>/<source>/nonfinite``       share of NaN/±inf values (every unit sees as many values)
``<site>/<source>/drift_<metric>``  drift of each unit against the reference record
                                    (:func:`icstools.analysis.drift.drift`, default ``w1_std``
                                    against the first record), mean over the site's units
``<site>/<source>/hist``            the recorded histogram ``hist`` (a histogram, not a scalar)
``<site>/<name>``                   each ``(step, site)`` variable, e.g. ``grad_norm``
``<dim>/<label>/<name>``            each ``(step, <dim>)`` variable of another dimension, e.g.
                                    ``param/0.weight/param_grad_norm``, ``layer/…/ics_l2``
==================================  ==========================================================

A tag whose values are all NaN (e.g. ``sat_frac`` of a ReLU input) is not written; NaN at some
steps is written as NaN (a diverged run is a result). TensorBoard stores scalars as float32.

Histograms are the recorded ones, not re-sampled values: the bucket counts are ``hist`` (under-
flow, the fixed bins, overflow) and the bucket edges the site's ``hist_edges``. TensorBoard's
histogram has one right edge per bucket (``bucket_limit``) and takes the left edge of the first
bucket from ``min`` and the right edge of the last from ``max``; so the underflow bucket spans
[smallest value, first edge], the overflow bucket [last edge, largest value], with the smallest
and largest finite values of the site at that step (``min``/``max`` of its units). ``num``,
``sum`` and ``sum_squares`` come from the units' ``count``, ``mean`` and ``var``. Steps where the
site had no finite value are skipped.

Examples
--------
>>> import torch, icstools
>>> from torch import nn
>>> from icstools.export import export_tensorboard
>>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> with icstools.Recorder(model, every=1, optimizer=opt) as rec:
...     for _ in range(3):
...         opt.zero_grad(); model(torch.randn(16, 4)).sum().backward(); opt.step()
>>> out = export_tensorboard(rec.to_dataset(), tmp_path / "tb")  # doctest: +SKIP
>>> out.histogram_tags  # doctest: +SKIP
['1:input/train/hist']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

__all__ = ["TensorBoardExport", "export_tensorboard"]

_EVENTS_GLOB = "events.out.tfevents.*"


@dataclass
class TensorBoardExport:
    """What :func:`export_tensorboard` wrote.

    Attributes
    ----------
    logdir : Path
        The folder holding the event file.
    scalar_tags, histogram_tags : list of str
        The tags written, in writing order.
    steps : int
        Recorded steps exported.
    notes : list of str
        What was left out and why (e.g. drift that the run cannot give).
    """

    logdir: Path
    scalar_tags: list[str] = field(default_factory=list)
    histogram_tags: list[str] = field(default_factory=list)
    steps: int = 0
    notes: list[str] = field(default_factory=list)


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch's writer imports the tensorboard package
        raise ImportError(
            "TensorBoard export needs the 'tensorboard' package: pip install "
            f"'icstools[tensorboard]' (or pip install tensorboard); {exc}"
        ) from exc
    return SummaryWriter


def _prepare_logdir(logdir: Path, overwrite: bool) -> None:
    if logdir.exists() and not logdir.is_dir():
        raise ValueError(f"logdir {str(logdir)!r} is a file; give a folder (created if missing)")
    old = sorted(logdir.glob(_EVENTS_GLOB)) if logdir.is_dir() else []
    if old and not overwrite:
        raise ValueError(
            f"logdir {str(logdir)!r} already holds {len(old)} TensorBoard event file(s) "
            f"({old[0].name}, …), which TensorBoard would show mixed with this run; give an "
            "empty or new folder, or overwrite=True (--overwrite) to delete those event files"
        )
    for f in old:
        f.unlink()


def site_scalars(ds: xr.Dataset, source: str) -> dict[str, dict[str, np.ndarray]]:
    """Per-site activation scalars over steps, ``{site: {name: values [step]}}``.

    Every unit of a site pools the same values (its batch and positions), so the site's
    statistics follow exactly from the units': ``mean`` and ``std`` of all finite values by
    the law of total variance (weights ``count``), ``sat_frac``/``zero_frac`` count-weighted,
    ``nonfinite`` and ``dead_frac`` averaged over units.

    Examples
    --------
    >>> site_scalars(ds, "train")["1:input"]["std"].shape  # doctest: +SKIP
    (3,)
    """
    sub = ds.sel(source=source)
    unit_site = np.asarray(ds["unit_site"].values).astype(str)
    arrays = {
        v: np.asarray(sub[v].transpose("step", "unit").values, dtype=np.float64)
        for v in ("count", "mean", "var", "sat_frac", "zero_frac", "nonfinite")
        if v in sub
    }
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for site in (str(s) for s in ds["site"].values):
            cols = np.flatnonzero(unit_site == site)
            a = {k: v[:, cols] for k, v in arrays.items()}  # [step, units of the site]
            n = a["count"]
            total = n.sum(axis=1)
            has = n > 0  # a unit without finite values has NaN moments and weight 0

            def weighted(x: np.ndarray, n=n, has=has, total=total) -> np.ndarray:
                return np.where(has, x * n, 0.0).sum(axis=1) / total

            mean = weighted(a["mean"])
            second = weighted(a["var"] + a["mean"] ** 2)  # E[x²] over all the site's values
            stats = {"mean": mean, "std": np.sqrt(np.maximum(second - mean**2, 0.0))}
            if "sat_frac" in a:
                stats["sat_frac"] = weighted(a["sat_frac"])
            if "zero_frac" in a:
                stats["zero_frac"] = weighted(a["zero_frac"])
                stats["dead_frac"] = (a["zero_frac"] == 1).mean(axis=1)
            if "nonfinite" in a:
                stats["nonfinite"] = a["nonfinite"].mean(axis=1)
            out[site] = stats
    return out


def _histogram(ds: xr.Dataset, source: str, site: str) -> list[tuple[int, dict[str, Any]]]:
    """TensorBoard's raw histogram fields for each step of one site (module docstring)."""
    sub = ds.sel(source=source)
    counts = np.asarray(sub["hist"].sel(site=site).transpose("step", "bin").values, np.float64)
    edges = np.asarray(ds["hist_edges"].sel(site=site).values, dtype=np.float64)
    cols = np.flatnonzero(np.asarray(ds["unit_site"].values).astype(str) == site)
    per_unit = {
        v: np.asarray(sub[v].transpose("step", "unit").values[:, cols], np.float64)
        for v in ("count", "mean", "var", "min", "max")
    }
    out = []
    for i, step in enumerate(np.asarray(ds["step"].values)):
        num = float(counts[i].sum())
        if num == 0:
            continue
        n, m, v = per_unit["count"][i], per_unit["mean"][i], per_unit["var"][i]
        has = n > 0
        lo = float(min(np.nanmin(per_unit["min"][i]), edges[0]))
        hi = float(max(np.nanmax(per_unit["max"][i]), edges[-1]))
        out.append(
            (
                int(step),
                {
                    "min": lo,
                    "max": hi,
                    "num": num,
                    "sum": float((n * m)[has].sum()),
                    "sum_squares": float((n * (v + m**2))[has].sum()),
                    # right edges: underflow ends at edges[0], bin k at edges[k+1], overflow
                    # at the largest value (TensorBoard replaces the last one by max)
                    "bucket_limits": [*edges.tolist(), hi],
                    "bucket_counts": counts[i].tolist(),
                },
            )
        )
    return out


def _other_scalars(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """Tags of the ``(step,)`` and ``(step, X)`` numeric variables, values ``[step]``."""
    out: dict[str, np.ndarray] = {}
    for name, da in ds.data_vars.items():
        if "step" not in da.dims or not np.issubdtype(da.dtype, np.number):
            continue
        if da.dims == ("step",):
            out[f"run/{name}"] = np.asarray(da.values, np.float64)
        elif len(da.dims) == 2 and "source" not in da.dims and "unit" not in da.dims:
            other = next(d for d in da.dims if d != "step")
            values = np.asarray(da.transpose("step", other).values, np.float64)
            labels = [str(x) for x in ds[other].values] if other in ds.coords else None
            for j in range(values.shape[1]):
                label = labels[j] if labels else str(j)
                tag = f"{label}/{name}" if other == "site" else f"{other}/{label}/{name}"
                out[tag] = values[:, j]
    return out


def _drift(
    ds: xr.Dataset, source: str, reference: Any, metric: str, notes: list[str]
) -> dict[str, np.ndarray]:
    from icstools.analysis.drift import drift, site_aggregate

    try:
        per_site = site_aggregate(drift(ds, reference, [metric], source=source), "mean")
    except ValueError as exc:
        notes.append(f"drift ({metric}, source {source}) left out: {exc}")
        return {}
    da = per_site[metric].transpose("step", "site")
    return {str(s): np.asarray(da.sel(site=s).values, np.float64) for s in da["site"].values}


def export_tensorboard(
    run: xr.Dataset | str | Path,
    logdir: str | Path,
    *,
    sources: Sequence[str] | None = None,
    drift_reference: Any = "first",
    drift_metric: str | None = "w1_std",
    histograms: bool = True,
    overwrite: bool = False,
) -> TensorBoardExport:
    """Write a run's per-site scalars and histograms over steps as TensorBoard event files.

    Parameters
    ----------
    run : xarray.Dataset or path
        A run dataset (``rec.to_dataset()``) or the path of a run store.
    logdir : str or Path
        Folder for the event file (created if missing); open it with
        ``tensorboard --logdir`` (give each run its own folder to compare runs there).
    sources : sequence of str, optional
        Which activations (``"train"``, ``"probe"``); default all recorded.
    drift_reference : "first", "previous", int or ("window", k)
        Reference of the drift tags (:func:`icstools.analysis.drift.drift`).
    drift_metric : str or None
        Drift metric written per site (mean over its units); ``None``: no drift tags.
    histograms : bool
        Write the recorded histograms (``hist``).
    overwrite : bool
        Delete event files already in ``logdir`` (otherwise they are refused: TensorBoard
        would mix them with this run).

    Returns
    -------
    TensorBoardExport
        The tags written and notes on what was left out.

    Raises
    ------
    ValueError
        ``logdir`` is a file or holds event files (without ``overwrite``), or a source that was
        not recorded.
    ImportError
        The ``tensorboard`` package is missing.

    Examples
    --------
    >>> out = export_tensorboard("data/runs/readme.zarr", "tb/readme")  # doctest: +SKIP
    >>> out.scalar_tags[:2]  # doctest: +SKIP
    ['run/loss', '0:input/train/mean']
    """
    from icstools.store import open_run

    ds = open_run(run) if isinstance(run, (str, Path)) else run
    recorded = [str(s) for s in ds["source"].values] if "source" in ds.coords else []
    chosen = recorded if sources is None else [str(s) for s in sources]
    bad = [s for s in chosen if s not in recorded]
    if bad:
        raise ValueError(f"source(s) {bad} were not recorded; this run has {recorded}")
    logdir = Path(logdir)
    writer_class = _summary_writer()
    _prepare_logdir(logdir, overwrite)
    result = TensorBoardExport(logdir=logdir, steps=int(ds.sizes.get("step", 0)))
    steps = [int(s) for s in np.asarray(ds["step"].values)]
    scalars = _other_scalars(ds)
    histos: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for source in chosen:
        drifts = (
            {}
            if drift_metric is None
            else _drift(ds, source, drift_reference, drift_metric, result.notes)
        )
        for site, stats in site_scalars(ds, source).items():
            for name, values in stats.items():
                scalars[f"{site}/{source}/{name}"] = values
            if site in drifts:
                scalars[f"{site}/{source}/drift_{drift_metric}"] = drifts[site]
            if histograms and "hist" in ds:
                histos[f"{site}/{source}/hist"] = _histogram(ds, source, site)
    writer = writer_class(log_dir=str(logdir))
    try:
        for tag, values in scalars.items():
            if np.isnan(values).all():
                continue
            for step, value in zip(steps, values, strict=True):
                writer.add_scalar(tag, float(value), step)
            result.scalar_tags.append(tag)
        for tag, events in histos.items():
            for step, fields in events:
                writer.add_histogram_raw(tag, global_step=step, **fields)
            if events:
                result.histogram_tags.append(tag)
    finally:
        writer.close()
    return result

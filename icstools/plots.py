"""Figures of run datasets: the paper's Fig. 1, drift, saturation, gradients, ICS, spectra.

Every function takes a run dataset (or several), an optional matplotlib ``ax`` to draw into,
and returns the :class:`~matplotlib.figure.Figure`. Without ``ax`` a new figure is made with
:class:`matplotlib.figure.Figure` directly (not through ``pyplot``): nothing is shown, nothing
is registered with a GUI backend, and the figure is freed when it is no longer referenced (no
``plt.close`` needed). ``fig.savefig(...)`` renders with Agg.

Functions that compare conditions take ``runs``: one dataset, a list of datasets (the seeds of
one condition) or a mapping ``{condition: dataset or [datasets]}``; curves are the mean over
seeds with a band of ± 1 standard deviation (ddof=1; no band with one seed).

Robustness. Diverged runs (NaN, ±inf) are drawn up to where they are finite: ±inf is treated
as missing, the run's ``diverged_step`` attribute is marked with a dotted vertical line, and a
panel without any finite value says so in its middle instead of raising. A variable that the
run did not record gives a panel that says which one and how to record it (again no
exception); :func:`figure_notes` returns these messages, so that a report can repeat them.
Wrong argument types raise :class:`TypeError`, unknown sites or metrics :class:`ValueError`.

Examples
--------
>>> import torch, icstools
>>> from torch import nn
>>> from icstools.plots import plot_saturation
>>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> with icstools.Recorder(model, every=1, optimizer=opt, probe=torch.randn(32, 4)) as rec:
...     for _ in range(3):
...         opt.zero_grad(); model(torch.randn(16, 4)).sum().backward(); opt.step()
>>> fig = plot_saturation(rec.to_dataset())
>>> fig.axes[0].get_ylabel()
'sat_frac (mean over units)'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import icstools.analysis  # noqa: F401  (registers ds.ics)
from icstools.analysis.drift import METRICS as DRIFT_METRICS
from icstools.analysis.drift import site_aggregate
from icstools.analysis.metrics import last_hidden_site
from icstools.plot_parts import (
    _MAX_LEGEND,
    NOTE_GID,
    _absent,
    _as_conditions,
    _cell_edges,
    _check_ds,
    _color_scale,
    _figure,
    _finite,
    _legend,
    _log_if_positive,
    _mark_divergence,
    _note,
    _palette,
    _save_png,
    _seed_band,
    _site_finite_steps,
    _spectra,
    _step_lines,
    _text,
)

__all__ = [
    "NOTE_GID",
    "figure_notes",
    "plot_accuracy",
    "plot_dead_units",
    "plot_drift_heatmap",
    "plot_fig1",
    "plot_grad_norms",
    "plot_ics",
    "plot_jacobian_spectra",
    "plot_landscape",
    "plot_percentiles",
    "plot_saturation",
    "plot_scalar",
    "save_fig1",
    "typical_unit",
]


Runs = xr.Dataset | Sequence[xr.Dataset] | Mapping[str, "xr.Dataset | Sequence[xr.Dataset]"]


# ============================================================================================
# Helpers
# ============================================================================================


def figure_notes(fig: Figure) -> list[str]:
    """The messages that panels of ``fig`` show instead of data (absent or non-finite data).

    Examples
    --------
    >>> import xarray as xr
    >>> run = xr.Dataset({"loss": ("step", [1.0, 0.5])}, coords={"step": [0, 1]})
    >>> figure_notes(plot_ics(run))
    ["'ics_cos' is not in the run (recorded by Recorder(ics=..., loss_fn=..., optimizer=...))"]
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    return [t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid() == NOTE_GID]


def typical_unit(ds: xr.Dataset, site: str | None = None, source: str | None = None) -> int:
    """A typical unit of ``site``: the one whose drift between the first and the last finite
    record (W1 in units of the first record's σ, :func:`icstools.analysis.drift.drift`) is the
    median
    over the site's units (the lower one of the middle two). Unit 0 if that cannot be computed
    (fewer than two finite records).

    Returns
    -------
    int
        The unit's index inside its site (``unit_index``).

    Examples
    --------
    >>> typical_unit(ds, "5:input")  # doctest: +SKIP
    37
    """
    ds = _check_ds(ds)
    site = ds.ics.resolve_site(last_hidden_site(ds) if site is None else site)
    finite = _site_finite_steps(ds, site, source)
    sub = ds.ics.site(site)
    index = np.asarray(sub["unit_index"].values, dtype=np.int64)
    if finite.size < 2 or index.size == 0:
        return int(index[0]) if index.size else 0
    sub = sub.sel(step=[int(finite[0]), int(finite[-1])])
    w1 = sub.ics.drift("first", ["w1_std"], source=source)["w1_std"].isel(step=-1)
    values = np.asarray(w1.values, dtype=np.float64)
    ok = np.isfinite(values)
    if not ok.any():
        return int(index[0])
    order = np.argsort(np.where(ok, values, np.inf), kind="stable")[: int(ok.sum())]
    return int(index[order[(ok.sum() - 1) // 2]])


# ============================================================================================
# Scalars over steps, Fig. 1
# ============================================================================================


def plot_scalar(
    runs: Runs,
    var: str,
    *,
    ax: Axes | None = None,
    log: bool = False,
    ylabel: str | None = None,
) -> Figure:
    """A ``(step,)`` variable over steps, per condition: mean ± 1 sd over seeds.

    Parameters
    ----------
    runs : dataset, list of datasets or mapping {condition: dataset or list}
        The runs; each condition is one curve.
    var : str
        A ``(step,)`` variable: ``loss``, ``lr``, ``test_acc`` or any logged scalar,
        ``loss_variation``, ``beta_smoothness``. Records where it was not measured (NaN) are
        skipped, so a value logged at every k-th record draws a connected curve.
    ax : matplotlib Axes, optional
    log : bool
        Log scale on y (ignored when no value is positive).
    ylabel : str, optional

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = plot_scalar({"BN": bn_runs, "baseline": base_runs}, "loss")  # doctest: +SKIP
    """
    if not isinstance(var, str):
        raise TypeError(f"var must be a variable name (str), got {type(var).__name__}")
    conds = _as_conditions(runs)
    fig, ax = _figure(ax)
    if not any(var in ds.data_vars for items in conds.values() for ds in items):
        return _absent(ax, var, "any of the runs")
    bad = [
        f"{c}: {ds[var].dims}"
        for c, items in conds.items()
        for ds in items
        if var in ds.data_vars and ds[var].dims != ("step",)
    ]
    if bad:
        raise ValueError(f"variable {var!r} must have dims ('step',), got {bad[:3]}")
    colors = _palette(len(conds))
    everything = []
    for (cond, items), color in zip(conds.items(), colors, strict=True):
        steps, mean, sd, _ = _seed_band(items, var)
        if not steps.size:
            continue
        n = len(items)
        label = _text(cond) + (f" (mean ± sd, {n} seeds)" if n > 1 else " (1 seed)")
        ax.plot(steps, mean, color=color, lw=1.5, label=label)
        band = np.isfinite(sd)
        if band.any():
            ax.fill_between(steps, mean - sd, mean + sd, where=band, color=color, alpha=0.25, lw=0)
        everything.append(mean)
        _mark_divergence(ax, items, color)
    values = np.concatenate(everything) if everything else np.array([])
    if not np.isfinite(values).any():
        _note(ax, f"'{var}' has no finite value in these runs (diverged or never measured)")
    elif log:
        _log_if_positive(ax, values)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel or var)
    if everything:
        _legend(ax, len(everything))
    return fig


def plot_accuracy(runs: Runs, var: str = "test_acc", *, ax: Axes | None = None) -> Figure:
    """Test accuracy over steps per condition, mean ± 1 sd over seeds: the paper's Fig. 1(a).

    Examples
    --------
    >>> fig = plot_accuracy({"baseline": base_runs, "bn": bn_runs})  # doctest: +SKIP
    """
    fig = plot_scalar(runs, var, ax=ax, ylabel="test accuracy")
    fig_ax = ax if ax is not None else fig.axes[0]
    fig_ax.set_title("test accuracy", fontsize=10)
    return fig


def plot_percentiles(
    ds: xr.Dataset,
    site: str | None = None,
    unit: int | None = None,
    *,
    q: Sequence[float] = (0.15, 0.5, 0.85),
    source: str | None = None,
    ax: Axes | None = None,
    label: str | None = None,
    color: Any = None,
) -> Figure:
    """The 15th, 50th and 85th percentiles of one unit over steps: Fig. 1(b, c).

    Parameters
    ----------
    ds : xarray.Dataset
        One run.
    site : str, optional
        Default :func:`~icstools.analysis.metrics.last_hidden_site` (the input of the last
        hidden sigmoid).
    unit : int, optional
        Index of the unit in its site; default :func:`typical_unit`.
    q : three floats
        Lower, middle, upper levels (each on the run's quantile grid).
    source : str, optional
        ``"probe"`` (default when recorded) or ``"train"``.
    ax : matplotlib Axes, optional
    label, color : optional
        Title prefix and colour.

    Examples
    --------
    >>> fig = plot_percentiles(ds)  # doctest: +SKIP
    """
    ds = _check_ds(ds)
    levels = list(q)
    if len(levels) != 3:
        raise ValueError(f"q must be three levels (lower, middle, upper), got {levels}")
    fig, ax = _figure(ax, (4.4, 3.4))
    if "quantile_value" not in ds.data_vars:
        return _absent(ax, "quantile_value")
    site = ds.ics.resolve_site(last_hidden_site(ds) if site is None else site)
    if unit is None:
        unit = typical_unit(ds, site, source)
    da = ds.ics.percentiles(site, unit=unit, q=levels, source=source)
    steps = np.asarray(da["step"].values)
    v = _finite(da.transpose("step", "quantile").values)
    color = color if color is not None else _palette(1)[0]
    ok = np.isfinite(v).all(1)
    if ok.any():
        ax.fill_between(
            steps,
            v[:, 0],
            v[:, 2],
            where=ok,
            color=color,
            alpha=0.3,
            lw=0,
            label=f"{levels[0]:g}–{levels[2]:g} quantiles",
        )
        keep = np.isfinite(v[:, 1])
        ax.plot(steps[keep], v[keep, 1], color=color, lw=1.5, label=f"{levels[1]:g} quantile")
        ax.legend(fontsize=7, frameon=False)
    else:
        _note(ax, f"no finite quantile of {site} unit {unit} (diverged run?)")
    if _mark_divergence(ax, [ds]) and ok.any() and not ok.all():
        _note(ax, f"non-finite from step {int(steps[~ok][0])} on (diverged)")
    title = f"{_text(label)}: " if label else ""
    ax.set_title(f"{title}{_text(site)}, unit {unit}", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    return fig


def plot_fig1(
    runs: Mapping[str, xr.Dataset | Sequence[xr.Dataset]],
    *,
    var: str = "test_acc",
    site: str | Mapping[str, str] | None = None,
    source: str | None = None,
    axes: Sequence[Axes] | None = None,
) -> Figure:
    """The paper's Fig. 1: (a) test accuracy per condition (mean ± sd over seeds), then for each
    condition the 15/50/85th percentiles of a typical unit of the last hidden sigmoid input
    (its first run), on a shared y-axis.

    Parameters
    ----------
    runs : mapping {condition: dataset or list of datasets}
        E.g. ``{"baseline": [...], "bn": [...]}``.
    var : str
        The accuracy variable.
    site : str or mapping {condition: site}, optional
        The site per condition; default
        :func:`~icstools.analysis.metrics.last_hidden_site` of each.
    source : str, optional
    axes : sequence of Axes, optional
        ``1 + len(runs)`` axes.

    Examples
    --------
    >>> fig = plot_fig1({"baseline": base_runs, "bn": bn_runs})  # doctest: +SKIP
    >>> len(fig.axes)  # doctest: +SKIP
    3
    """
    if not isinstance(runs, Mapping):
        raise TypeError(
            f"runs must be a mapping {{condition: datasets}}, got {type(runs).__name__}"
        )
    conds = _as_conditions(runs)
    n = 1 + len(conds)
    if axes is None:
        fig = Figure(figsize=(3.9 * n, 3.4), layout="constrained")
        first = fig.add_subplot(1, n, 1)
        rest = [fig.add_subplot(1, n, 2)]
        rest += [fig.add_subplot(1, n, k, sharey=rest[0]) for k in range(3, n + 1)]
        axes = [first, *rest]
    else:
        axes = list(axes)
        if len(axes) != n:
            raise ValueError(f"axes must hold {n} Axes (1 + one per condition), got {len(axes)}")
        fig = _figure(axes[0])[0]
    plot_accuracy(conds, var, ax=axes[0])
    axes[0].set_title("(a) test accuracy", fontsize=10)
    colors = _palette(len(conds))
    for k, ((cond, items), color) in enumerate(zip(conds.items(), colors, strict=True)):
        where = site.get(cond) if isinstance(site, Mapping) else site
        plot_percentiles(
            items[0],
            where,
            source=source,
            ax=axes[k + 1],
            color=color,
            label=f"({chr(ord('b') + k)}) {cond}",
        )
    return fig


def save_fig1(
    runs: Mapping[str, xr.Dataset | Sequence[xr.Dataset]],
    out: str | Path,
    *,
    dpi: int = 110,
    acc_ylim: tuple[float, float] | None = (0.7, 1.0),
) -> list[Path]:
    """Write the paper's Fig. 1 as PNG files into the folder ``out``.

    ``fig1.png`` holds the three panels side by side (:func:`plot_fig1`); ``fig1a.png``,
    ``fig1b.png``, ``fig1c.png`` one panel each: (a) test accuracy per condition over steps
    (mean ± 1 sd over seeds), (b, c) the 15th, 50th and 85th percentiles of a typical unit
    (:func:`typical_unit`) of the last hidden sigmoid input on the probe, over steps, for the
    first and the second condition (their first run), with the same y-range in (b) and (c).

    Parameters
    ----------
    runs : mapping {condition: dataset or list of datasets}
        Two conditions, without and with BN (``{"baseline": [...], "bn": [...]}``).
    out : str or Path
        Folder (created when missing); existing files of the same names are replaced.
    dpi : int
        Resolution.
    acc_ylim : (float, float) or None
        y-range of panel (a); the paper's Fig. 1(a) shows 0.7–1 (``None``: matplotlib's).

    Returns
    -------
    list of Path
        The four files.

    Examples
    --------
    >>> save_fig1({"baseline": base_runs, "bn": bn_runs}, "docs/images")  # doctest: +SKIP
    """
    if not isinstance(runs, Mapping) or len(runs) != 2:
        raise ValueError(
            "runs must be a mapping of two conditions {without BN: runs, with BN: runs}, got "
            f"{list(runs) if isinstance(runs, Mapping) else type(runs).__name__}"
        )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    conds = _as_conditions(runs)
    fig = plot_fig1(conds)
    if acc_ylim is not None:
        fig.axes[0].set_ylim(*acc_ylim)
    ylim = fig.axes[1].get_ylim()
    paths = [_save_png(fig, folder / "fig1.png", dpi)]
    single = plot_accuracy(conds)
    single.axes[0].set_title("(a) test accuracy", fontsize=10)
    if acc_ylim is not None:
        single.axes[0].set_ylim(*acc_ylim)
    paths.append(_save_png(single, folder / "fig1a.png", dpi))
    colors = _palette(len(conds))
    for k, ((cond, items), color) in enumerate(zip(conds.items(), colors, strict=True)):
        panel = chr(ord("b") + k)
        one = plot_percentiles(items[0], color=color, label=f"({panel}) {cond}")
        one.axes[0].set_ylim(*ylim)
        paths.append(_save_png(one, folder / f"fig1{panel}.png", dpi))
    return paths


# ============================================================================================
# Drift, saturation, dead units
# ============================================================================================


def plot_drift_heatmap(
    ds: xr.Dataset,
    metric: str = "w1_std",
    *,
    reference: Any = "previous",
    how: str = "median",
    source: str | None = None,
    drift: xr.Dataset | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Drift per site (rows) and step (columns): the ``how`` over units of ``metric``.

    Parameters
    ----------
    ds : xarray.Dataset
        One run.
    metric : str
        A drift metric (:data:`icstools.analysis.drift.METRICS`), default W1 / σ of the reference.
    reference : "previous", "first", int or ("window", k)
        Reference of each record (see :func:`icstools.analysis.drift.drift`).
    how : {"median", "mean", "max", "min"}
        Aggregate over the units of a site.
    source : str, optional
        ``"probe"`` (default when recorded) or ``"train"``.
    drift : xarray.Dataset, optional
        Already computed ``ds.ics.drift(...)`` (per unit) or its :func:`site_aggregate`, to
        avoid computing it again.
    ax : matplotlib Axes, optional

    Notes
    -----
    Colours are on a log scale when the finite positive values span more than two decades.
    Grey cells are not finite: NaN (the reference itself, e.g. the first record against
    "previous"; a diverged unit) or inf (a constant reference).

    Examples
    --------
    >>> fig = plot_drift_heatmap(ds, "w1_std", reference="first")  # doctest: +SKIP
    """
    ds = _check_ds(ds)
    if metric not in DRIFT_METRICS:
        raise ValueError(
            f"metric {metric!r} is not a drift metric. Expected one of {list(DRIFT_METRICS)}"
        )
    fig, ax = _figure(ax, (7.0, 0.9 + 0.32 * max(len(ds.ics.sites), 2)))
    if drift is None:
        try:
            drift = ds.ics.drift(reference, [metric], source=source)
        except ValueError as exc:
            _note(ax, f"drift '{metric}' cannot be computed: {exc}")
            return fig
    name = metric if metric in drift.data_vars else f"hist_{metric}"
    if name not in drift.data_vars:
        return _absent(ax, metric, "the drift dataset")
    da = drift[name]
    if "unit" in da.dims:
        da = site_aggregate(drift[[name]], how)[name]
    da = da.transpose("site", "step")
    values = np.array(da.values, dtype=np.float64)
    steps = np.asarray(da["step"].values, dtype=np.float64)
    sites = [str(s) for s in da["site"].values]
    finite = values[np.isfinite(values)]
    norm, shown = _color_scale(values)
    xedges, yedges = _cell_edges(steps), np.arange(len(sites) + 1) - 0.5
    cmap = sns.color_palette("rocket_r", as_cmap=True).with_extremes(bad="0.85")
    mesh = ax.pcolormesh(xedges, yedges, shown, cmap=cmap, norm=norm, shading="flat")
    ax.set_yticks(np.arange(len(sites)), [_text(s, 32) for s in sites], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("step")
    label = str(da.attrs.get("long_name", metric))
    fig.colorbar(mesh, ax=ax, label=_text(f"{metric} ({how})", 40), pad=0.01)
    ref = drift.attrs.get("reference", str(reference))
    ax.set_title(_text(f"drift: {how} over units of {metric} vs {ref}", 90), fontsize=9)
    if not finite.size:
        _note(ax, f"no finite drift value ({label})")
    _mark_divergence(ax, [ds], "tab:blue")
    return fig


def plot_saturation(
    ds: xr.Dataset, *, source: str | None = None, how: str = "mean", ax: Axes | None = None
) -> Figure:
    """Share of saturated values (``sat_frac``) per site over steps, for sites with a
    saturation threshold (sigmoid/tanh inputs).

    Examples
    --------
    >>> fig = plot_saturation(ds, how="max")  # doctest: +SKIP
    """
    ds = _check_ds(ds)
    fig, ax = _figure(ax)
    if "sat_frac" not in ds.data_vars:
        return _absent(ax, "sat_frac")
    sat = ds.ics.saturation(source=source, how=how)
    values = _finite(sat.values)
    sites = [str(s) for s in sat["site"].values]
    if "sat_threshold" in ds.coords:
        has = np.isfinite(np.asarray(ds["sat_threshold"].values, dtype=np.float64))
    else:
        has = np.ones(len(sites), bool)
    if not has.any():
        _note(
            ax,
            "no site has a saturation threshold (sat_frac applies to sigmoid/tanh "
            "inputs; set Recorder(saturation=...))",
        )
        return fig
    drawn = _step_lines(
        ax,
        np.asarray(sat["step"].values),
        values[:, has],
        [s for s, h in zip(sites, has, strict=True) if h],
        "site",
    )
    if not drawn:
        _note(ax, "sat_frac has no finite value (diverged run?)")
    _mark_divergence(ax, [ds])
    ax.set_xlabel("step")
    ax.set_ylabel(f"sat_frac ({how} over units)")
    ax.set_title("saturation", fontsize=10)
    return fig


def plot_dead_units(ds: xr.Dataset, *, source: str = "train", ax: Axes | None = None) -> Figure:
    """Share of dead units (``zero_frac == 1``) per site over steps.

    Examples
    --------
    >>> fig = plot_dead_units(ds)  # doctest: +SKIP
    """
    ds = _check_ds(ds)
    fig, ax = _figure(ax)
    if "zero_frac" not in ds.data_vars:
        return _absent(ax, "zero_frac")
    dead = ds.ics.dead_units(source=source)
    frac = dead["dead_frac"]
    values = _finite(frac.values)
    sites = [str(s) for s in frac["site"].values]
    _step_lines(ax, np.asarray(frac["step"].values), values, sites, "site")
    total = int(np.nansum(np.asarray(dead["dead_count"].values)[-1:]))
    ax.set_title(f"dead units ({source}; {total} at the last record)", fontsize=10)
    _mark_divergence(ax, [ds])
    ax.set_xlabel("step")
    ax.set_ylabel("share of dead units")
    return fig


# ============================================================================================
# Gradients, gradient ICS, landscape, Jacobians
# ============================================================================================


def _per_column(ds: xr.Dataset, var: str, ax: Axes, log: bool, ylabel: str) -> Figure:
    da = ds[var]
    other = [d for d in da.dims if d != "step"]
    if "step" not in da.dims or len(other) != 1:
        raise ValueError(f"variable {var!r} must have dims (step, <one other>), got {da.dims}")
    da = da.transpose("step", other[0])
    labels = (
        [str(x) for x in da[other[0]].values]
        if other[0] in da.coords
        else [str(i) for i in range(da.sizes[other[0]])]
    )
    values = _finite(da.values)
    drawn = _step_lines(ax, np.asarray(da["step"].values), values, labels, other[0])
    if not drawn:
        _note(ax, f"'{var}' has no finite value (diverged run, or never measured)")
    elif log:
        _log_if_positive(ax, values)
    if drawn > _MAX_LEGEND:
        ax.set_title(f"{var}: {drawn} {other[0]}s", fontsize=10)
    else:
        ax.set_title(var, fontsize=10)
    _mark_divergence(ax, [ds])
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    return ax.get_figure(root=True)


def plot_grad_norms(ds: xr.Dataset, var: str = "grad_norm", *, ax: Axes | None = None) -> Figure:
    """Gradient norms over steps (log scale): per site (``grad_norm``) or per parameter
    (``param_grad_norm``, ``param_norm``, ``update_ratio``, ``eff_lr``).

    Examples
    --------
    >>> fig = plot_grad_norms(ds, "param_grad_norm")  # doctest: +SKIP
    """
    ds = _check_ds(ds)
    valid = ("grad_norm", "param_grad_norm", "param_norm", "update_norm", "update_ratio", "eff_lr")
    if var not in valid:
        raise ValueError(f"var {var!r} is not a gradient variable. Expected one of {list(valid)}")
    ax = _figure(ax)[1]
    if var not in ds.data_vars:
        return _absent(ax, var)
    return _per_column(ds, var, ax, True, var)


def plot_ics(ds: xr.Dataset, var: str = "ics_cos", *, ax: Axes | None = None) -> Figure:
    """Gradient-based ICS per layer over steps (Santurkar et al. 2018, Def. 2.1): ``ics_cos``
    (cosine of G and G', 1 = no shift) or ``ics_l2`` (‖G − G'‖, log scale).

    Examples
    --------
    >>> fig = plot_ics(ds, "ics_l2")  # doctest: +SKIP
    """
    ds = _check_ds(ds)
    if var not in ("ics_cos", "ics_l2", "ics_grad_norm"):
        raise ValueError(f"var must be 'ics_cos', 'ics_l2' or 'ics_grad_norm', got {var!r}")
    ax = _figure(ax)[1]
    if var not in ds.data_vars:
        return _absent(ax, var)
    return _per_column(ds, var, ax, var != "ics_cos", var)


def plot_landscape(runs: Runs, var: str = "beta_smoothness", *, ax: Axes | None = None) -> Figure:
    """Loss-landscape probes over steps per condition (mean ± sd over seeds, log scale):
    ``beta_smoothness`` (effective β-smoothness) or ``loss_variation``.

    Examples
    --------
    >>> fig = plot_landscape({"bn": bn_runs, "baseline": base_runs})  # doctest: +SKIP
    """
    if var not in ("beta_smoothness", "loss_variation"):
        raise ValueError(f"var must be 'beta_smoothness' or 'loss_variation', got {var!r}")
    fig = plot_scalar(runs, var, ax=ax, log=True)
    (ax if ax is not None else fig.axes[0]).set_title(var.replace("_", " "), fontsize=10)
    return fig


def plot_jacobian_spectra(
    runs: Runs,
    *,
    step: int | None = None,
    blocks: str | Sequence[str] = "segments",
    ax: Axes | None = None,
) -> Figure:
    """Histograms of the Jacobians' singular values σ (``jac_sv``, log scale) with a line at
    σ = 1 and the band [0.5, 2] of ``jac_frac_near_one`` shaded.

    One dataset: one histogram per block. Several conditions: one per condition, pooling the
    blocks and the seeds. Each histogram is a density over log10 σ (area 1), so groups with
    different numbers of values compare.

    Parameters
    ----------
    runs : dataset, list of datasets or mapping {condition: datasets}
    step : int, optional
        The record; default each run's last record with spectra.
    blocks : "segments", "all" or list of str
        ``"segments"``: the maps between sites (not the whole network ``input->output``).
    ax : matplotlib Axes, optional

    Examples
    --------
    >>> fig = plot_jacobian_spectra({"bn": bn_runs, "baseline": base_runs})  # doctest: +SKIP
    """
    conds = _as_conditions(runs)
    if not (
        blocks in ("segments", "all")
        or (
            isinstance(blocks, Sequence)
            and not isinstance(blocks, str)
            and all(isinstance(b, str) for b in blocks)
        )
    ):
        raise TypeError(f"blocks must be 'segments', 'all' or a list of names, got {blocks!r}")
    fig, ax = _figure(ax)
    if not any("jac_sv" in ds.data_vars for items in conds.values() for ds in items):
        return _absent(ax, "jac_sv", "any of the runs")
    groups, steps_used = _spectra(conds, step, blocks)
    pooled = {k: np.concatenate(v) for k, v in groups.items()}
    pooled = {k: v[np.isfinite(v) & (v > 0)] for k, v in pooled.items()}
    allv = np.concatenate(list(pooled.values())) if pooled else np.array([])
    ax.axvspan(0.5, 2.0, color="0.9", lw=0, label="[0.5, 2]")
    ax.axvline(1.0, color="k", ls="--", lw=1, label="σ = 1")
    if not allv.size:
        _note(ax, "no finite positive singular value (diverged run?)")
        return fig
    lo, hi = np.log10(allv.min()), np.log10(allv.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(min(lo, np.log10(0.4)), max(hi, np.log10(2.5)), 41)
    colors = _palette(len(pooled))
    for (key, v), color in zip(pooled.items(), colors, strict=True):
        if not v.size:
            continue
        dens, _ = np.histogram(np.log10(v), edges, density=True)
        ax.stairs(dens, 10**edges, color=color, lw=1.5, label=_text(key))
    ax.set_xscale("log")
    ax.set_xlabel("singular value σ")
    ax.set_ylabel("density over log10 σ")
    where = f"step {min(steps_used)}" if len(steps_used) == 1 else "each run's last record"
    ax.set_title(f"Jacobian spectra ({where})", fontsize=10)
    _legend(ax, len(pooled) + 2)
    return fig

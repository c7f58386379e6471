"""The live view's figure: four panels drawn from a :class:`~icstools.liveview.data.LiveData`.

Top left, Fig. 1 of Ioffe & Szegedy: the 15th, 50th and 85th percentiles of the chosen site
(one unit, or the median over its units of each percentile) over steps. Top right: drift of
every site (W1/σ against the previous record, median over units), the chosen site in bold.
Bottom left: saturation (``sat_frac``, mean over units) and dead units (share with
``zero_frac == 1``) of every site. Bottom right: the activation-gradient norm of every site,
or the loss when gradients are not recorded. A diverged run is drawn up to where it is finite
and its first non-finite step is marked. Made with :class:`matplotlib.figure.Figure` directly
(no ``pyplot``), so it can be drawn on any thread.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from icstools.liveview.data import LiveData

__all__ = ["draw", "png_bytes"]

_MAX_LEGEND = 8
_COLORS = [f"C{i}" for i in range(10)]


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float64)
    x[~np.isfinite(x)] = np.nan
    return x


def _note(ax: Axes, text: str) -> None:
    ax.text(
        0.5,
        0.5,
        text,
        ha="center",
        va="center",
        transform=ax.transAxes,
        fontsize=9,
        color="0.35",
        wrap=True,
    )


def _mark(ax: Axes, data: LiveData) -> None:
    if data.diverged_step is not None:
        ax.axvline(data.diverged_step, color="crimson", ls=":", lw=1.2)


def _site_lines(
    ax: Axes,
    steps: np.ndarray,
    x: np.ndarray,
    data: LiveData,
    site: str,
    sites: list[str] | None = None,
    ls: str = "-",
    label: bool = True,
) -> int:
    """One line per site (columns of ``x [step, site]``), the chosen one bold."""
    drawn = 0
    names = data.sites if sites is None else sites
    for j, name in enumerate(data.sites):
        if name not in names:
            continue
        col = _finite(x[:, j])
        ok = np.isfinite(col)
        if not ok.any():
            continue
        bold = name == site
        ax.plot(
            steps[ok],
            col[ok],
            ls=ls,
            color=_COLORS[j % 10],
            lw=2.2 if bold else 0.9,
            alpha=1.0 if bold else 0.7,
            zorder=3 if bold else 2,
            label=name if label else None,
        )
        drawn += 1
    return drawn


def _legend(ax: Axes, n: int) -> None:
    if 0 < n <= _MAX_LEGEND:
        ax.legend(fontsize=7, frameon=False, loc="best")


def _log_if_positive(ax: Axes, x: np.ndarray) -> None:
    v = x[np.isfinite(x)]
    if v.size and (v > 0).any():
        ax.set_yscale("log")


def _bands(ax: Axes, data: LiveData, site: str, source: str, unit: int | None) -> None:
    steps = data.steps
    which = "median over units" if unit is None else f"unit {unit}"
    ax.set_title(f"{site} ({source}), {which}: percentiles", fontsize=9, y=1.0)
    if "bands" not in data.series:
        _note(ax, "no quantile_value in this run")
        return
    v = _finite(data.band(site, source, unit))  # [step, 3]
    ok = np.isfinite(v).all(1)
    lo, mid, hi = data.levels
    if ok.any():
        ax.fill_between(
            steps, v[:, 0], v[:, 2], where=ok, color="C0", alpha=0.3, lw=0, label=f"{lo:g}–{hi:g}"
        )
        keep = np.isfinite(v[:, 1])
        ax.plot(steps[keep], v[keep, 1], color="C0", lw=1.5, label=f"{mid:g}")
        ax.legend(fontsize=7, frameon=False, loc="best")
    else:
        _note(ax, "no finite value (diverged?)")
    _mark(ax, data)
    ax.set_ylabel("activation")


def _drift(ax: Axes, data: LiveData, site: str, source: str) -> None:
    ax.set_title(f"drift ({source}): W1/σ vs previous record, median over units", fontsize=9, y=1.0)
    x = data.site_series("drift", source)
    if x is None or not np.isfinite(x).any():
        _note(ax, "drift needs two records" if data.n_records < 2 else "no finite drift")
        return
    _legend(ax, _site_lines(ax, data.steps, x, data, site))
    _log_if_positive(ax, _finite(x))
    _mark(ax, data)


def _saturation(ax: Axes, data: LiveData, site: str, source: str) -> None:
    ax.set_title(f"saturation (—) and dead units (- -), {source}", fontsize=9, y=1.0)
    sat, dead = data.site_series("sat", source), data.site_series("dead", source)
    n = 0
    if sat is not None:
        n += _site_lines(ax, data.steps, sat, data, site, data.sat_sites)
    if dead is not None:
        label = sat is None or not data.sat_sites
        n += _site_lines(ax, data.steps, dead, data, site, ls="--", label=label)
    if n == 0:
        _note(ax, "no sat_frac / zero_frac in this run")
        return
    _legend(ax, len(ax.get_legend_handles_labels()[1]))
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("share")
    _mark(ax, data)


def _gradients(ax: Axes, data: LiveData, site: str) -> None:
    g = data.site_series("grad_norm")
    if g is not None and np.isfinite(g).any():
        ax.set_title("activation-gradient norm ‖dL/dx‖ per site", fontsize=9, y=1.0)
        _legend(ax, _site_lines(ax, data.steps, g, data, site))
        _log_if_positive(ax, _finite(g))
    elif "loss" in data.series and np.isfinite(data.series["loss"]).any():
        ax.set_title("loss (gradients not recorded: gradients=True)", fontsize=9, y=1.0)
        loss = _finite(data.series["loss"])
        ok = np.isfinite(loss)
        ax.plot(data.steps[ok], loss[ok], color="0.2", lw=1.2)
    else:
        ax.set_title("gradient norms", fontsize=9, y=1.0)
        _note(ax, "not recorded: Recorder(gradients=True)")
    _mark(ax, data)


def draw(
    data: LiveData,
    site: str | None,
    source: str | None,
    unit: int | None = None,
    status: str = "",
    size: tuple[float, float] = (11.0, 6.6),
) -> Figure:
    """The figure of the live view.

    Parameters
    ----------
    data : LiveData
    site, source : str or None
        The chosen site and source (``None`` before the first record).
    unit : int or None
        Unit of the percentile panel (index inside the site); ``None``: median over units.
    status : str
        Shown above the panels.
    size : (float, float)
        Inches.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = draw(LiveData(), None, None, status="waiting")
    >>> fig.axes[0].texts[0].get_text()
    'waiting for the first record'
    """
    fig = Figure(figsize=size)  # a fixed layout: constrained layout doubles the drawing time
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.08, top=0.9, wspace=0.14, hspace=0.22)
    fig.text(0.01, 0.975, status, fontsize=9, ha="left", va="top", wrap=True)
    axes = fig.subplots(2, 2, sharex=True)
    if not data.ready or data.steps.size == 0 or site is None or source is None:
        for ax in axes.flat:
            ax.set_axis_off()
        _note(axes[0, 0], "waiting for the first record")
        return fig
    _bands(axes[0, 0], data, site, source, unit)
    _drift(axes[0, 1], data, site, source)
    _saturation(axes[1, 0], data, site, source)
    _gradients(axes[1, 1], data, site)
    for ax in axes[1]:
        ax.set_xlabel("step")
    for ax in axes.flat:
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25, lw=0.5)
    return fig


def png_bytes(fig: Figure, dpi: int = 80) -> bytes:
    """The figure rendered to PNG (Agg)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()

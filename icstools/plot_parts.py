"""The drawing parts that :mod:`icstools.plots` builds its figures from: an axes to draw on,
the runs of each condition checked, step lines with a band over seeds, divergence marks, a
palette, legends and labels kept short. Nothing here is public; the figures are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from icstools.analysis.metrics import diverged_step
from icstools.schema import how_to_record

#: Legend entries at most; beyond, the legend is left out.
_MAX_LEGEND = 12

#: ``gid`` of the text artists that say why a panel is empty (see
#: :func:`icstools.plots.figure_notes`).
NOTE_GID = "icstools-note"

_SEGMENT_EXCLUDE = ("input->output",)  # the whole network's block, not a segment


def _figure(ax: Axes | None, size: tuple[float, float] = (6.4, 3.6)) -> tuple[Figure, Axes]:
    """The figure and axes to draw into: ``ax``'s, or a new constrained-layout figure."""
    if ax is None:
        fig = Figure(figsize=size, layout="constrained")
        return fig, fig.add_subplot()
    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax.get_figure(root=True), ax


def _check_ds(ds: Any, name: str = "ds") -> xr.Dataset:
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"{name} must be an xarray.Dataset (a run), got {type(ds).__name__}")
    if "step" not in ds.dims:
        raise ValueError(f"{name} has no 'step' dimension: is it a run dataset (DESIGN.md §3)?")
    return ds


def _as_conditions(runs: Any) -> dict[str, list[xr.Dataset]]:
    """``runs`` as ``{condition: [datasets]}``."""
    if isinstance(runs, xr.Dataset):
        return {"run": [_check_ds(runs, "runs")]}
    if isinstance(runs, Mapping):
        out: dict[str, list[xr.Dataset]] = {}
        for cond, items in runs.items():
            if not isinstance(cond, str):
                raise TypeError(f"condition names must be str, got {cond!r}")
            seq = [items] if isinstance(items, xr.Dataset) else items
            if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
                raise TypeError(
                    f"runs[{cond!r}] must be a dataset or a list of datasets, "
                    f"got {type(items).__name__}"
                )
            out[cond] = [_check_ds(d, f"runs[{cond!r}]") for d in seq]
            if not out[cond]:
                raise ValueError(f"runs[{cond!r}] is empty")
        if not out:
            raise ValueError("runs is empty: give {condition: [datasets]}")
        return out
    if isinstance(runs, Sequence) and not isinstance(runs, (str, bytes)):
        if not runs:
            raise ValueError("runs is empty")
        return {"runs": [_check_ds(d, "runs[i]") for d in runs]}
    raise TypeError(
        "runs must be a dataset, a list of datasets (seeds) or a mapping "
        f"{{condition: datasets}}, got {type(runs).__name__}"
    )


def _text(s: Any, limit: int = 48) -> str:
    """A user string safe for matplotlib: no mathtext (``$``), not hidden from legends (``_``),
    shortened."""
    s = str(s)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    s = s.replace("$", r"\$")
    return " " + s if s.startswith("_") else s


def _finite(values: Any) -> np.ndarray:
    """float64 copy with ±inf replaced by NaN."""
    a = np.array(values, dtype=np.float64)
    a[~np.isfinite(a)] = np.nan
    return a


def _palette(n: int) -> list[Any]:
    return list(sns.color_palette("colorblind", max(n, 1)))


def _mark_divergence(ax: Axes, runs: Sequence[xr.Dataset], color: Any = "0.3") -> bool:
    marked = False
    for ds in runs:
        step = diverged_step(ds)
        if step is not None:
            ax.axvline(step, color=color, ls=":", lw=1.2)
            marked = True
    return marked


def _log_if_positive(ax: Axes, values: np.ndarray, axis: str = "y") -> bool:
    """Log scale when some finite value is > 0 (else matplotlib warns), linear otherwise."""
    v = values[np.isfinite(values)]
    if v.size and (v > 0).any():
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        return True
    return False


def _legend(ax: Axes, n: int, title: str | None = None) -> None:
    if 0 < n <= _MAX_LEGEND:
        ax.legend(fontsize=7, title=title, title_fontsize=7, frameon=False)


def _step_lines(
    ax: Axes, steps: np.ndarray, values: np.ndarray, labels: Sequence[Any], title: str | None
) -> int:
    """One line per column of ``values [step, k]``; steps where a column is NaN are skipped,
    so sparse records (every k-th) connect. Returns the number of lines drawn."""
    colors = _palette(len(labels))
    drawn = 0
    for j, label in enumerate(labels):
        col = values[:, j]
        keep = np.isfinite(col)
        if not keep.any():
            continue
        ax.plot(
            steps[keep], col[keep], marker=".", ms=3, lw=1.2, color=colors[j], label=_text(label)
        )
        drawn += 1
    _legend(ax, drawn, title)
    return drawn


def _seed_band(runs: Sequence[xr.Dataset], var: str) -> tuple[np.ndarray, ...]:
    """Steps (union), mean, sd (ddof=1, NaN with < 2 values) and count over the seeds of the
    (step,) variable ``var``; steps where no seed has a finite value are dropped."""
    series = [
        (np.asarray(ds["step"].values, dtype=np.int64), _finite(ds[var].values).reshape(-1))
        for ds in runs
        if var in ds.data_vars
    ]
    steps = np.unique(np.concatenate([s for s, _ in series])) if series else np.array([], int)
    grid = np.full((len(series), steps.size), np.nan)
    for i, (s, v) in enumerate(series):
        grid[i, np.searchsorted(steps, s)] = v
    valid = np.isfinite(grid)
    count = valid.sum(0)
    with np.errstate(all="ignore"):
        mean = np.where(valid, grid, 0.0).sum(0) / count
        dev = np.where(valid, grid - mean, 0.0)
        sd = np.sqrt((dev * dev).sum(0) / (count - 1))
    sd = np.where(count >= 2, sd, np.nan)
    keep = count > 0
    return steps[keep], mean[keep], sd[keep], count[keep]


def _site_finite_steps(ds: xr.Dataset, site: str, source: str | None) -> np.ndarray:
    da = ds.ics._source(source, "quantile_value")
    da = da.isel(unit=np.flatnonzero(np.asarray(ds["unit_site"].values).astype(str) == site))
    ok = np.isfinite(np.asarray(da.transpose("step", ...).values, dtype=np.float64))
    ok = ok.reshape(ok.shape[0], -1).all(1)
    return np.asarray(ds["step"].values)[ok]


def _save_png(fig: Figure, path: Path, dpi: int) -> Path:
    # no "Software" entry: the bytes depend on the figure, not on matplotlib's version string
    fig.savefig(path, format="png", dpi=dpi, metadata={"Software": None})
    return path


def _last_jac_step(ds: xr.Dataset) -> int | None:
    sv = np.asarray(ds["jac_sv"].transpose("step", ...).values, dtype=np.float64)
    ok = np.isfinite(sv).reshape(sv.shape[0], -1).any(1)
    steps = np.asarray(ds["step"].values)[ok]
    return int(steps[-1]) if steps.size else None


def _note(ax: Axes, message: str) -> None:
    """Say in the middle of ``ax`` why it shows nothing (or what is missing)."""
    ax.text(
        0.5,
        0.5,
        _text(message, 400),
        ha="center",
        va="center",
        wrap=True,
        fontsize=9,
        color="0.25",
        transform=ax.transAxes,
        gid=NOTE_GID,
    )


def _absent(ax: Axes, var: str, where: str = "the run") -> Figure:
    how = how_to_record(var)
    _note(ax, f"'{var}' is not in {where}" + (f" (recorded by {how})" if how else ""))
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.get_figure(root=True)


def _color_scale(values: np.ndarray) -> tuple[Normalize, np.ma.MaskedArray]:
    """A heatmap's colour scale and the values it shows (non-finite ones masked): log when
    the finite positive values span more than two decades (then non-positive ones masked)."""
    finite = values[np.isfinite(values)]
    pos = finite[finite > 0]
    if pos.size and pos.max() / pos.min() > 100:
        norm: Normalize = LogNorm(vmin=pos.min(), vmax=pos.max())
        shown = np.where(values > 0, values, np.nan)
    else:
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 1.0
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)
        shown = values
    return norm, np.ma.masked_invalid(shown)


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """Edges of heatmap cells centred on ``steps`` (``[len(steps) + 1]``)."""
    if steps.size > 1:
        mid = (steps[1:] + steps[:-1]) / 2
        return np.concatenate(
            [[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]]
        )
    return np.array([steps[0] - 0.5, steps[0] + 0.5]) if steps.size else np.array([0, 1])


def _spectra(
    conds: dict[str, list[xr.Dataset]], step: int | None, blocks: str | Sequence[str]
) -> tuple[dict[str, list[np.ndarray]], set[int]]:
    """The singular values to draw, grouped by block (one run) or by condition, and the steps
    they were taken at (``step``, or each run's last record with spectra)."""
    single = len(conds) == 1 and len(next(iter(conds.values()))) == 1
    groups: dict[str, list[np.ndarray]] = {}
    steps_used: set[int] = set()
    for cond, items in conds.items():
        for ds in items:
            if "jac_sv" not in ds.data_vars:
                continue
            at = _last_jac_step(ds) if step is None else int(step)
            if at is None:
                continue
            if at not in np.asarray(ds["step"].values):
                raise ValueError(f"step {at} is not recorded in the run of {cond!r}")
            sv = ds["jac_sv"].sel(step=at)
            steps_used.add(at)
            for b in _chosen_blocks([str(b) for b in sv["block"].values], blocks):
                groups.setdefault(b if single else cond, []).append(
                    np.asarray(sv.sel(block=b).values, dtype=np.float64).ravel()
                )
    return groups, steps_used


def _chosen_blocks(names: list[str], blocks: str | Sequence[str]) -> list[str]:
    """The blocks of a run that ``blocks`` selects (``"segments"``: all but the whole network's,
    unless it is the only one)."""
    if blocks == "segments":
        return [b for b in names if b not in _SEGMENT_EXCLUDE] or names
    if blocks == "all":
        return names
    missing = [b for b in blocks if b not in names]
    if missing:
        raise ValueError(f"blocks {missing} do not exist. Expected some of {names}")
    return list(blocks)

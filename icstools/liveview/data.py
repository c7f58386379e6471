"""The numbers a live view draws, taken in block by block as records arrive.

:class:`LiveData` keeps, per step, what the four panels need and nothing else, so that a long
run costs a bounded amount of memory and each update works only on the new records:

* the 15th, 50th and 85th percentiles of every unit (``quantile_value``; Fig. 1 of Ioffe &
  Szegedy), per source;
* drift per site: W1/σ of each unit against the previous record, from the summaries
  (:func:`icstools.analysis.drift.drift` with ``method="summary"``), median over the site's
  units, per source: the quantity the report's drift flags read;
* saturation per site: ``sat_frac`` averaged over the site's units, and the share of dead units
  (``zero_frac == 1``), per source;
* the activation-gradient norm per site (``grad_norm``) and the loss, when recorded.

Past ``max_records`` records the kept ones are thinned evenly (every 2nd, then every 4th, ...
record, and always the latest); the drift of a record is still against the record before it.
Divergence (a non-finite activation or loss) is kept as data: the values are stored as they
are (±inf, NaN) and :attr:`LiveData.diverged_step` is the first such step.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import xarray as xr

from icstools.analysis.tails import has_tail_levels, linear_w1, tail_aware_w1

__all__ = ["BAND_LEVELS", "NEEDED", "LiveData"]

#: Levels of the percentile band (Fig. 1): lower, middle, upper.
BAND_LEVELS = (0.15, 0.5, 0.85)
#: Variables of a run that a live view reads (the others are never loaded).
NEEDED = (
    "quantile_value",
    "min",
    "max",
    "mean",
    "var",
    "count",
    "sat_frac",
    "zero_frac",
    "nonfinite",
    "grad_norm",
    "loss",
)


def _quantile_cap(block: xr.Dataset) -> float:
    """The recorder's ``quantile_sample`` (values per unit the quantiles come from at most)."""
    try:
        cap = json.loads(block.attrs.get("recorder_config", "{}")).get("quantile_sample")
    except (TypeError, ValueError, AttributeError):
        cap = None
    return math.inf if cap is None else float(cap)


def _summaries(block: xr.Dataset) -> dict[str, np.ndarray]:
    """Per record, source and unit ``[step, source, unit, ...]``: the quantile grid with the
    minimum at level 0 and the maximum at 1 (``grid``, last axis G), the number of values the
    quantiles come from (``n``: ``count`` capped at ``quantile_sample``; NaN unknown), whether
    they are all the values (``exact``), ``mean`` and ``var``."""
    levels = np.asarray(block["quantile"].values, dtype=np.float64)
    inner = np.flatnonzero((levels > 0) & (levels < 1))
    dims = ("step", "source", "unit")

    def get(name: str) -> np.ndarray:
        return np.asarray(block[name].transpose(*dims, ...).values, np.float64)

    lo, hi = get("min")[..., None], get("max")[..., None]
    out = {"grid": np.concatenate([lo, get("quantile_value")[..., inner], hi], axis=-1)}
    out["var"] = get("var")
    out["mean"] = get("mean") if "mean" in block else np.full(out["var"].shape, np.nan)
    if "count" in block:
        count, cap = get("count"), _quantile_cap(block)
        out["n"], out["exact"] = np.minimum(count, cap), count <= cap
    else:
        out["n"], out["exact"] = np.full(out["var"].shape, np.nan), np.zeros(out["var"].shape, bool)
    return out


def _eps_w1(grid: np.ndarray, n: np.ndarray) -> np.ndarray:
    """W1 between the empirical distribution of n values and their interpolant ≤ this (0 when
    n is unknown), as in :mod:`icstools.analysis.drift`."""
    with np.errstate(all="ignore"):
        e = (grid[..., -1] - grid[..., 0]) / (2.0 * (n - 1.0))
    return np.where(np.isnan(n), 0.0, np.where(n == 1, 0.0, np.where(n >= 1, e, np.nan)))


def _w1_std(u: np.ndarray, p: dict[str, np.ndarray], q: dict[str, np.ndarray]) -> np.ndarray:
    """W1/σ_P between the summaries ``p`` and ``q`` (of :func:`_summaries`): the estimate of
    :func:`icstools.analysis.drift.drift` from summaries (tail-aware where the grid has tail
    levels), clipped into its bracket; NaN where an input is not finite."""
    a, b = p["grid"], q["grid"]
    bad = ~(np.isfinite(a).all(-1) & np.isfinite(b).all(-1))
    a, b = np.where(bad[..., None], 0.0, a), np.where(bad[..., None], 0.0, b)
    a, b = np.maximum.accumulate(a, axis=-1), np.maximum.accumulate(b, axis=-1)
    du = np.diff(u)
    with np.errstate(all="ignore"):
        if has_tail_levels(u):
            n_a, n_b = np.where(bad, 1.0, p["n"]), np.where(bad, 1.0, q["n"])
            w = tail_aware_w1(u, a, b, n_a, n_b)
        else:
            w = linear_w1(u, a, b)
        eps = _eps_w1(a, p["n"]) + _eps_w1(b, q["n"])
        lo_k = np.maximum(0.0, np.maximum(a[..., :-1] - b[..., 1:], b[..., :-1] - a[..., 1:]))
        hi_k = np.maximum(a[..., 1:] - b[..., :-1], b[..., 1:] - a[..., :-1])
        w_lo = np.maximum(np.sum(lo_k * du, axis=-1) - eps, 0.0)
        dmu = np.where(p["exact"] & q["exact"], np.abs(q["mean"] - p["mean"]), np.nan)
        w_lo = np.maximum(w_lo, np.where(np.isnan(dmu), 0.0, dmu))  # W1 ≥ |μQ − μP|
        w_hi = np.maximum(np.sum(hi_k * du, axis=-1) + eps, w_lo)
        w = np.clip(w, w_lo, w_hi) / np.sqrt(p["var"])
    return np.where(bad, np.nan, w)


def _site_reduce(x: np.ndarray, groups: list[np.ndarray], how: str) -> np.ndarray:
    """``x [..., unit]`` reduced over each site's units: ``[..., site]``; NaN is skipped, a
    site without a finite value gives NaN (no warning)."""
    out = np.full((*x.shape[:-1], len(groups)), np.nan)
    with np.errstate(all="ignore"):
        for j, idx in enumerate(groups):
            v = x[..., idx].astype(np.float64)
            ok = ~np.isnan(v)
            n = ok.sum(-1)
            if how == "mean":
                out[..., j] = np.where(
                    n > 0, np.where(ok, v, 0.0).sum(-1) / np.maximum(n, 1), np.nan
                )
            else:  # median: NaN sorts last, so take the middle of the first n values
                s = np.sort(v, axis=-1)
                lo = np.take_along_axis(s, np.maximum((n - 1) // 2, 0)[..., None], -1)[..., 0]
                hi = np.take_along_axis(s, np.maximum(n // 2, 0)[..., None], -1)[..., 0]
                out[..., j] = np.where(n > 0, (lo + hi) / 2.0, np.nan)
    return out


class LiveData:
    """Per-step series of one run for the live view, updated block by block.

    Parameters
    ----------
    max_records : int
        At most this many records are kept (about; thinned evenly beyond).

    Examples
    --------
    >>> import torch, icstools
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid())
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with icstools.Recorder(model, every=1, optimizer=opt, probe=torch.randn(32, 4)) as rec:
    ...     for _ in range(3):
    ...         opt.zero_grad(); model(torch.randn(16, 4)).sum().backward(); opt.step()
    >>> data = LiveData()
    >>> data.add(rec.to_dataset())
    3
    >>> data.sites, data.series["drift"].shape  # [step, source, site]
    (['1:input'], (3, 2, 1))
    """

    def __init__(self, max_records: int = 1000) -> None:
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 8:
            raise ValueError(f"max_records must be an int ≥ 8, got {max_records!r}")
        self.max_records = max_records
        self.n_records = 0  # records taken in (before thinning)
        self.stride = 1  # every stride-th record is kept (and the latest)
        self.sites: list[str] = []
        self.sources: list[str] = []
        self.unit_groups: list[np.ndarray] = []  # positions along `unit` of each site's units
        self.levels: tuple[float, ...] = ()  # the band's levels as recorded
        self.sat_sites: list[str] = []  # sites with a saturation threshold
        self.diverged_step: int | None = None
        self.steps = np.empty(0, np.int64)
        self.series: dict[str, np.ndarray] = {}
        self._index = np.empty(0, np.int64)  # record number of each kept row
        self._last_step = -1
        # grid, count and variance of the last record, for the drift against the previous one
        self._prev: dict[str, np.ndarray] | None = None
        self._u = np.empty(0)  # levels of the grids: 0 (min), the recorded ones, 1 (max)

    @property
    def ready(self) -> bool:
        """Whether a first record arrived (the run's sites are known)."""
        return bool(self.sites)

    def _fix_schema(self, block: xr.Dataset) -> None:
        self.sites = [str(s) for s in block["site"].values]
        self.sources = [str(s) for s in block["source"].values] if "source" in block.dims else []
        unit_site = np.asarray(block["unit_site"].values).astype(str)
        self.unit_groups = [np.flatnonzero(unit_site == s) for s in self.sites]
        grid = np.asarray(block["quantile"].values, dtype=np.float64)
        self.levels = tuple(float(grid[np.argmin(np.abs(grid - q))]) for q in BAND_LEVELS)
        inner = grid[(grid > 0) & (grid < 1)]
        self._u = np.concatenate([[0.0], inner, [1.0]])
        if "sat_threshold" in block.coords:
            thr = np.asarray(block["sat_threshold"].values, dtype=np.float64)
            self.sat_sites = [s for s, t in zip(self.sites, thr, strict=True) if np.isfinite(t)]

    def add(self, block: xr.Dataset) -> int:
        """Take in the records of ``block`` (a run dataset) that are newer than the last one.

        Returns the number of records taken in.
        """
        if "step" not in block.dims or block.sizes["step"] == 0:
            return 0
        if not self.ready:
            self._fix_schema(block)
        steps = np.asarray(block["step"].values, dtype=np.int64)
        if self.n_records:
            newer = steps > self._last_step
            if not newer.any():
                return 0
            block, steps = block.isel(step=np.flatnonzero(newer)), steps[newer]
        block = block[[v for v in NEEDED if v in block.data_vars]]
        rows = self._rows(block)
        self._append(steps, rows)
        self._note_divergence(steps, block)
        self._last_step = int(steps[-1])
        return int(steps.size)

    def _rows(self, block: xr.Dataset) -> dict[str, np.ndarray]:
        """The series of the block's records: arrays with ``step`` first."""
        rows: dict[str, np.ndarray] = {}
        n = block.sizes["step"]
        if "quantile_value" in block:
            q = block["quantile_value"].sel(quantile=list(self.levels))
            rows["bands"] = np.asarray(
                q.transpose("step", "source", "unit", "quantile").values, dtype=np.float32
            )  # [step, source, unit, 3]
            rows["drift"] = self._drift(block)  # [step, source, site]
        for var, key, how in (("sat_frac", "sat", "mean"), ("zero_frac", "dead", "dead")):
            if var in block:
                x = np.asarray(block[var].transpose("step", "source", "unit").values)
                if how == "dead":
                    x = np.where(np.isnan(x), np.nan, (x == 1).astype(np.float64))
                rows[key] = _site_reduce(x, self.unit_groups, "mean")  # [step, source, site]
        if "grad_norm" in block:
            g = block["grad_norm"].transpose("step", "site").sel(site=self.sites)
            rows["grad_norm"] = np.asarray(g.values, dtype=np.float64)
        if "loss" in block:
            rows["loss"] = np.asarray(block["loss"].values, dtype=np.float64).reshape(n)
        return rows

    def _drift(self, block: xr.Dataset) -> np.ndarray:
        """W1/σ of each unit against the previous record, median over each site's units."""
        n = block.sizes["step"]
        if not {"quantile_value", "min", "max", "var"} <= set(block.data_vars):
            return np.full((n, len(self.sources), len(self.sites)), np.nan)
        cur = _summaries(block)  # each [step, source, unit, ...]
        if self._prev is None:  # the first record has no previous one
            w = _w1_std(
                self._u, {k: v[:-1] for k, v in cur.items()}, {k: v[1:] for k, v in cur.items()}
            )
            w = np.concatenate([np.full((1, *w.shape[1:]), np.nan), w])
        else:
            ref = {k: np.concatenate([self._prev[k], v[:-1]]) for k, v in cur.items()}
            w = _w1_std(self._u, ref, cur)
        self._prev = {k: v[-1:] for k, v in cur.items()}
        return _site_reduce(w, self.unit_groups, "median")

    def _note_divergence(self, steps: np.ndarray, block: xr.Dataset) -> None:
        if self.diverged_step is not None:
            return
        bad = np.zeros(steps.size, bool)
        if "nonfinite" in block:
            nf = np.asarray(block["nonfinite"].transpose("step", ...).values, dtype=np.float64)
            bad |= (nf.reshape(steps.size, -1) > 0).any(1)
        if "loss" in block:
            bad |= ~np.isfinite(np.asarray(block["loss"].values, dtype=np.float64))
        if bad.any():
            self.diverged_step = int(steps[np.argmax(bad)])

    def _append(self, steps: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        index = self.n_records + np.arange(steps.size)
        self.n_records += int(steps.size)
        self.steps = np.concatenate([self.steps, steps])
        self._index = np.concatenate([self._index, index])
        for key, value in rows.items():
            old = self.series.get(key)
            self.series[key] = value if old is None else np.concatenate([old, value])
        while self._index.size > self.max_records:
            self.stride *= 2
            self._thin()
        if self.stride > 1:
            self._thin()

    def _thin(self) -> None:
        """Keep the records whose number is a multiple of the stride, and the latest."""
        keep = self._index % self.stride == 0
        keep[-1] = True
        if keep.all():
            return
        self.steps, self._index = self.steps[keep], self._index[keep]
        self.series = {k: v[keep] for k, v in self.series.items()}

    def band(self, site: str, source: str, unit: int | None) -> np.ndarray:
        """``[step, 3]`` percentiles of one unit (index inside its site), or with ``unit=None``
        the median over the site's units of each percentile."""
        j, s = self.sites.index(site), self.sources.index(source)
        x = self.series["bands"][:, s, self.unit_groups[j], :].astype(np.float64)
        if unit is not None:
            return x[:, unit, :]
        return _site_reduce(np.moveaxis(x, 1, -1), [np.arange(x.shape[1])], "median")[..., 0]

    def site_series(self, key: str, source: str | None = None) -> np.ndarray | None:
        """``[step, site]`` series ``key`` ("drift", "sat", "dead": of ``source``;
        "grad_norm"), or None when the run does not record it."""
        x = self.series.get(key)
        if x is None:
            return None
        return x if x.ndim == 2 else x[:, self.sources.index(source), :]

    def summary(self) -> dict[str, Any]:
        """What the view holds, as plain values (for status lines and tests)."""
        return {
            "n_records": self.n_records,
            "kept": int(self.steps.size),
            "last_step": int(self.steps[-1]) if self.steps.size else None,
            "diverged_step": self.diverged_step,
            "sites": len(self.sites),
        }

"""The ``ds.ics`` accessor: analysis of a run dataset (DESIGN.md §3) in Jupyter.

Importing :mod:`icstools` registers the accessor on every :class:`xarray.Dataset`. It works
the same on a dataset held in memory (``rec.to_dataset()``) and on a store opened lazily with
``icstools.open_run(path, chunks={...})``: every method builds xarray/dask operations and
reduces before anything is loaded, so a run larger than memory is analysed chunk by chunk (on a
``dask.distributed`` cluster when a client is active, since dask then uses it by default).

Examples
--------
>>> import torch, icstools
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3), nn.Tanh())
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> rec = icstools.Recorder(model, every=1, optimizer=opt, probe=torch.randn(64, 4))
>>> with rec:
...     for _ in range(3):
...         opt.zero_grad(); model(torch.randn(16, 4)).sum().backward(); opt.step()
>>> ds = rec.to_dataset()
>>> ds.ics.sites
['1:input', '3:input']
>>> ds.ics.site("3").sizes["unit"]
3
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

__all__ = ["AnalysisError", "ICSAccessor"]


class AnalysisError(ValueError):
    """An analysis asked of a run that the run cannot answer (the message says what exists)."""


def _expected(kind: str, bad: object, valid: Sequence[object]) -> AnalysisError:
    close = difflib.get_close_matches(str(bad), [str(v) for v in valid], n=3)
    hint = f" Did you mean {close}?" if close else ""
    shown = list(valid)[:30]
    more = f" (and {len(valid) - 30} more)" if len(valid) > 30 else ""
    return AnalysisError(f"{kind} {bad!r} does not exist. Expected one of {shown}{more}.{hint}")


@xr.register_dataset_accessor("ics")
class ICSAccessor:
    """Analysis methods of a run dataset, as ``ds.ics.<method>``.

    Parameters
    ----------
    ds : xarray.Dataset
        A run dataset (from :class:`icstools.Recorder` or :func:`icstools.open_run`).
    """

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    # ------------------------------------------------------------------ selection
    @property
    def sites(self) -> list[str]:
        """The recorded sites, in recording order."""
        if "site" not in self._ds.coords:
            raise AnalysisError(
                "this dataset has no 'site' coordinate: it is not an icstools run dataset "
                f"(coordinates: {sorted(map(str, self._ds.coords))})"
            )
        return [str(s) for s in self._ds["site"].values]

    def resolve_site(self, name: str) -> str:
        """The full site name for ``name``: a site (``"fc3:input"``) or a module name (``"fc3"``)
        when only one of its roles was recorded.

        Examples
        --------
        >>> ds.ics.resolve_site("1")
        '1:input'
        """
        if not isinstance(name, str):
            raise TypeError(f"site must be a str, got {type(name).__name__}")
        sites = self.sites
        if name in sites:
            return name
        matches = [s for s in sites if s.rpartition(":")[0] == name or s.split("#")[0] == name]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise AnalysisError(
                f"Site {name!r} is ambiguous: it matches {matches}; give one of them"
            )
        raise _expected("Site", name, sites)

    def _unit_mask(self, site: str) -> np.ndarray:
        unit_site = np.asarray(self._ds["unit_site"].values).astype(str)
        return unit_site == site

    def site(self, name: str) -> xr.Dataset:
        """The part of the run that belongs to one site: its units and its ``site`` entries.

        Parameters
        ----------
        name : str
            A site name (``"fc3:input"``), or a module name if one role of it was recorded.

        Returns
        -------
        xarray.Dataset
            The dataset restricted to the site's units (``unit`` dim) and to the site on the
            ``site`` dim (kept with length 1). Lazy datasets stay lazy.

        Examples
        --------
        >>> ds.ics.site("1:input")["mean"].sizes["unit"]
        8
        """
        full = self.resolve_site(name)
        out = self._ds
        if "unit" in out.dims:
            out = out.isel(unit=np.flatnonzero(self._unit_mask(full)))
        return out.sel(site=[full])

    def _source(self, source: str | None, var: str) -> xr.DataArray:
        if var not in self._ds.data_vars:
            raise _expected("Variable", var, sorted(map(str, self._ds.data_vars)))
        da = self._ds[var]
        if "source" not in da.dims:
            return da
        sources = [str(s) for s in self._ds["source"].values]
        if source is None:
            source = "probe" if "probe" in sources else sources[0]
        if source not in sources:
            raise _expected("Source", source, sources)
        return da.sel(source=source)

    def _by_site(self, da: xr.DataArray, how: str = "mean") -> xr.DataArray:
        """Reduce a ``(…, unit)`` array over the units of each site → ``(…, site)``."""
        sites = self.sites
        unit_site = np.asarray(self._ds["unit_site"].values).astype(str)
        parts = []
        for s in sites:
            sub = da.isel(unit=np.flatnonzero(unit_site == s))
            if how == "median" and sub.chunks is not None:
                # dask's median needs the whole dimension in one chunk, and another axis
                sub = sub.chunk({"unit": -1}).expand_dims("_one")
                parts.append(sub.median("unit", skipna=True).squeeze("_one", drop=True))
                continue
            parts.append(getattr(sub, how)("unit", skipna=True))
        site_index = pd.Index(np.array(sites, dtype=str), dtype=object, name="site")
        out = xr.concat(parts, dim=site_index, coords="minimal")
        return out.assign_coords(site=np.array(sites, dtype=str))

    # ------------------------------------------------------------------ Fig. 1
    def percentiles(
        self,
        site: str,
        unit: int | Sequence[int] | None = None,
        q: Sequence[float] = (0.15, 0.5, 0.85),
        source: str | None = None,
    ) -> xr.DataArray:
        """Quantiles of one site's units over steps: the paper's Fig. 1 (b, c) quantities.

        Parameters
        ----------
        site : str
            Site (or module) name; Fig. 1 uses the input of the last hidden sigmoid.
        unit : int or sequence of int, optional
            Index of the unit inside the site (``unit_index``); default: all units.
        q : sequence of float
            Levels; each must be on the run's recorded grid (``ds["quantile"]``).
        source : str, optional
            ``"probe"`` (default when recorded: fixed inputs, so only parameters change) or
            ``"train"``.

        Returns
        -------
        xarray.DataArray
            ``(step, quantile)`` for one unit, ``(step, unit, quantile)`` otherwise.

        Examples
        --------
        >>> ds.ics.percentiles("3:input", unit=0).dims
        ('step', 'quantile')
        """
        da = self._source(source, "quantile_value")
        grid = np.asarray(self._ds["quantile"].values, dtype=np.float64)
        levels = np.atleast_1d(np.asarray(q, dtype=np.float64))
        idx = []
        for level in levels:
            hit = np.flatnonzero(np.isclose(grid, level, rtol=0, atol=1e-9))
            if not hit.size:
                raise AnalysisError(
                    f"Quantile {level} was not recorded. Expected one or more of "
                    f"{grid.round(6).tolist()} (set Recorder(quantiles=...) to record others)"
                )
            idx.append(int(hit[0]))
        full = self.resolve_site(site)
        da = da.isel(unit=np.flatnonzero(self._unit_mask(full)), quantile=idx)
        if unit is None:
            return da.transpose("step", "unit", "quantile")
        index = np.asarray(da["unit_index"].values)
        wanted = np.atleast_1d(np.asarray(unit))
        missing = [int(u) for u in wanted if u not in index]
        if missing:
            raise AnalysisError(
                f"Unit(s) {missing} do not exist in site {full!r}. "
                f"Expected unit indices 0..{len(index) - 1}"
            )
        pos = [int(np.flatnonzero(index == u)[0]) for u in wanted]
        out = da.isel(unit=pos[0] if np.ndim(unit) == 0 else pos)
        return out.transpose("step", ..., "quantile")

    # ------------------------------------------------------------------ health
    def saturation(self, source: str | None = None, how: str = "mean") -> xr.DataArray:
        """Share of saturated values per site over steps (``sat_frac`` reduced over units).

        Sites without a saturation threshold (not a sigmoid/tanh input) are NaN.

        Parameters
        ----------
        source : str, optional
            ``"probe"`` (default when recorded) or ``"train"``.
        how : {"mean", "median", "max", "min"}
            Reduction over the units of a site.

        Returns
        -------
        xarray.DataArray
            ``(step, site)``.

        Examples
        --------
        >>> ds.ics.saturation().dims
        ('step', 'site')
        """
        _check_how(how)
        return self._by_site(self._source(source, "sat_frac"), how).transpose("step", "site")

    def dead_units(self, source: str | None = "train") -> xr.Dataset:
        """Dead units (all values exactly zero, ``zero_frac == 1``) per step.

        Parameters
        ----------
        source : str, optional
            ``"train"`` (default: the data the network learns from) or ``"probe"``.

        Returns
        -------
        xarray.Dataset
            ``dead (step, unit)`` booleans, ``dead_count (step, site)`` and
            ``dead_frac (step, site)``.

        Examples
        --------
        >>> int(ds.ics.dead_units()["dead_count"].max())
        0
        """
        dead = self._source(source, "zero_frac") == 1
        dead = dead.rename("dead")
        count = self._by_site(dead.astype(np.int64), "sum").transpose("step", "site")
        frac = self._by_site(dead.astype(np.float64), "mean").transpose("step", "site")
        return xr.Dataset({"dead": dead, "dead_count": count, "dead_frac": frac})

    # ------------------------------------------------------------------ drift
    def drift(
        self,
        reference: Any = "first",
        metrics: Sequence[str] | str | None = None,
        source: str | None = None,
        method: str = "auto",
    ) -> xr.Dataset:
        """Per-unit drift of each record against a reference.

        See :func:`icstools.analysis.drift.drift`.

        Examples
        --------
        >>> float(ds.ics.drift("first", ["w1"])["w1"].isel(step=0).max())
        0.0
        """
        from icstools.analysis.drift import drift as _drift

        if source is None:
            sources = [str(s) for s in self._ds["source"].values]
            source = "probe" if "probe" in sources else sources[0]
        return _drift(self._ds, reference=reference, metrics=metrics, source=source, method=method)

    # ------------------------------------------------------------------ table
    def summary(self, source: str | None = None, step: int | None = None) -> pd.DataFrame:
        """One row per site: a tidy table of the run's state and of its drift.

        Parameters
        ----------
        source : str, optional
            ``"probe"`` (default when recorded) or ``"train"``.
        step : int, optional
            The step described (default: the last record).

        Returns
        -------
        pandas.DataFrame
            Index ``site``; columns: ``units``, ``step``, ``mean`` and ``std`` (averaged over
            units), ``sat_frac`` (mean over units), ``dead_units``, ``nonfinite_units``,
            ``w1_std_median`` / ``w1_std_max`` (drift from the first record, W1 in units of the
            first record's σ, median and max over units), and ``grad_norm`` when recorded.

        Examples
        --------
        >>> ds.ics.summary().loc["1:input", "units"]
        8
        """
        ds = self._ds
        steps = np.asarray(ds["step"].values)
        if step is None:
            step = int(steps[-1])
        if step not in steps:
            raise _expected("Step", step, steps.tolist())
        src = source
        at = {"step": step}
        cols: dict[str, xr.DataArray] = {
            "mean": self._by_site(self._source(src, "mean").sel(at)),
            "std": self._by_site(np.sqrt(self._source(src, "var").sel(at))),
            "sat_frac": self._by_site(self._source(src, "sat_frac").sel(at)),
            "dead_units": self._by_site(
                (self._source("train" if source is None else src, "zero_frac").sel(at) == 1).astype(
                    np.int64
                ),
                "sum",
            ),
            "nonfinite_units": self._by_site(
                (self._source(src, "nonfinite").sel(at) > 0).astype(np.int64), "sum"
            ),
        }
        first = int(steps[0])
        drift = self.drift(reference=first, metrics=["w1_std"], source=src).sel(at)["w1_std"]
        cols["w1_std_median"] = self._by_site(drift, "median")
        cols["w1_std_max"] = self._by_site(drift, "max")
        if "grad_norm" in ds.data_vars and "site" in ds["grad_norm"].dims:
            cols["grad_norm"] = ds["grad_norm"].sel(at)
        cols = {k: v.drop_vars(["source", "step"], errors="ignore") for k, v in cols.items()}
        table = xr.Dataset(cols).compute()  # one pass over the needed chunks
        frame = table.to_dataframe()
        keep = [c for c in cols if c in frame.columns]
        frame = frame[keep]
        frame.insert(0, "units", np.asarray(ds["site_units"].values, dtype=np.int64))
        frame.insert(1, "step", step)
        for c in ("dead_units", "nonfinite_units"):
            frame[c] = frame[c].astype(np.int64)
        frame.index.name = "site"
        return frame


def _check_how(how: str) -> None:
    valid = ("mean", "median", "max", "min")
    if how not in valid:
        raise AnalysisError(f"how={how!r} is not a reduction. Expected one of {list(valid)}")

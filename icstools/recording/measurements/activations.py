"""Per-unit activation statistics of every record site, for each source (DESIGN.md §3, §4).

The recorder's essential measurement: moments, extremes, saturation and dead-unit shares,
quantiles and a fixed-edge histogram per site, from :mod:`icstools.functional.statistics`
(streaming and mergeable, reduced on the tensor's device, one host transfer per record).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from icstools.functional.exact import finish_exact_many, finish_exact_slices, is_wide
from icstools.functional.final import finish_many
from icstools.functional.fused import MODES as FUSED_MODES
from icstools.functional.statistics import (
    ActivationStatistics,
    choose_hist_edges,
    device_parts_many,
)
from icstools.recording.errors import RecorderError
from icstools.recording.layout import Layout, site_option
from icstools.recording.measurements.base import (
    Context,
    Declaration,
    Measurement,
)
from icstools.schema import Coordinate, Variable
from icstools.sites import Site

__all__ = ["UNIT_STATS", "Activations"]

_DEFAULT = "the Recorder's default statistics"
_UNIT = ("source", "step", "unit")

#: The per-unit statistics, ``(source, step, unit)``.
UNIT_STATS = ("mean", "var", "skew", "kurt", "min", "max", "sat_frac", "zero_frac", "nonfinite")

VARIABLES = (
    Variable("mean", _UNIT, "float32", "mean of the unit's finite values", _DEFAULT),
    Variable("var", _UNIT, "float32", "variance (ddof=0) of the finite values", _DEFAULT),
    Variable("skew", _UNIT, "float32", "skewness m3 / m2^1.5 (scipy's biased estimator)", _DEFAULT),
    Variable("kurt", _UNIT, "float32", "excess kurtosis m4 / m2² − 3", _DEFAULT),
    Variable("min", _UNIT, "float32", "smallest finite value", _DEFAULT),
    Variable("max", _UNIT, "float32", "largest finite value", _DEFAULT),
    Variable(
        "sat_frac",
        _UNIT,
        "float32",
        "share of |x| above the site's saturation threshold (sigmoid'/tanh' < 0.01)",
        "a sigmoid/tanh input site, or Recorder(saturation=...)",
    ),
    Variable("zero_frac", _UNIT, "float32", "share of exact zeros (dead when 1)", _DEFAULT),
    Variable("nonfinite", _UNIT, "float32", "share of NaN/±inf among all values", _DEFAULT),
    Variable("count", _UNIT, "int64", "finite values pooled", _DEFAULT),
    Variable(
        "quantile_value",
        ("source", "step", "unit", "quantile"),
        "float32",
        "quantiles of the finite values (linear interpolation)",
        _DEFAULT,
    ),
    Variable(
        "hist",
        ("source", "step", "site", "bin"),
        "int64",
        "site histogram on fixed edges (hist_edges), with under/overflow bins",
        _DEFAULT,
    ),
    Variable("calls", ("source", "step", "site"), "int64", "module calls pooled", _DEFAULT),
)

COORDINATES = (
    Coordinate("quantile", ("quantile",), "levels of quantile_value"),
    Coordinate("bin", ("bin",), "histogram bins: underflow, the bins, overflow"),
    Coordinate("hist_edges", ("site", "edge"), "fixed histogram edges of each site"),
    Coordinate("site_units", ("site",), "units of each site"),
    Coordinate("site_unit_dim", ("site",), "tensor dimension holding the units"),
    Coordinate("sat_threshold", ("site",), "|x| threshold of sat_frac (NaN: none)"),
)


class Activations(Measurement):
    """Activation statistics of every record site, per source (always on)."""

    name = "activations"
    variables = VARIABLES
    coordinates = COORDINATES

    def __init__(
        self,
        sites: list[Site],
        modules: dict[str, Any],
        *,
        quantiles: Sequence[float],
        bins: int,
        hist_range: Any,
        saturation: dict[str, float] | None,
        quantile_sample: int | None,
        seed: int,
        fused: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be an int ≥ 1, got {bins!r}")
        self.quantiles = np.asarray(quantiles, dtype=np.float64)
        self.bins = bins
        self.hist_range = hist_range
        self.saturation = dict(saturation or {})
        self.quantile_sample = quantile_sample
        self.seed = seed
        if fused not in (None, *FUSED_MODES):
            raise ValueError(f"fused must be None, 'compile' or 'eager', got {fused!r}")
        self.fused = fused
        # Validate the options now (not at the first hook call) by resolving them per site.
        self.sat = {s.name: self._saturation_of(s, modules[s.module_name]) for s in sites}
        for s in sites:
            rng = site_option(hist_range, s.name, "hist_range", tuple)
            if rng is not None and not (len(rng) == 2 and float(rng[0]) < float(rng[1])):
                raise ValueError(
                    f"hist_range for {s.name} must be (low, high) with low < high, got {rng!r}"
                )
        ActivationStatistics(
            np.linspace(0, 1, 2), 0, quantiles=self.quantiles, quantile_sample=quantile_sample
        )  # validates the quantile options
        self._stats: dict[tuple[str, str], ActivationStatistics] = {}
        self._edges: dict[str, np.ndarray] = {}
        self._active: list[tuple[tuple[str, str], ActivationStatistics]] = []  # staged
        self._fields: list[list[str]] = []
        self._wide: list[bool] = []  # of the staged sites: finished by slices of units
        self._restored: dict[str, np.ndarray] = {}  # resume=True: the store's edges
        # keep every value of the statistics made from now on (exact mode), so that their
        # histograms can be redone on other edges (rebin): distributed runs agree on the
        # edges after the first record (icstools.recording.distributed)
        self.keep_all = False

    @classmethod
    def from_options(cls, options: Any) -> Activations:
        keywords = ("quantiles", "bins", "hist_range", "saturation", "quantile_sample", "seed")
        keywords += ("fused",)
        return cls(options.sites, options.modules, **{k: getattr(options, k) for k in keywords})

    def _saturation_of(self, site: Site, module: Any) -> float | None:
        value = site_option(self.saturation, site.name, "saturation", float)
        if value is None:
            return site.default_saturation(module)
        if not float(value) > 0:
            raise ValueError(f"saturation threshold for {site.name} must be > 0, got {value!r}")
        return float(value)

    def check(self, ctx: Context) -> None:
        """At attach: also raise if a tensor of the model or the probe has no data (meta)."""
        super().check(ctx)
        tensors = [(f"parameter {n!r}", t) for n, t in ctx.model.named_parameters()]
        tensors += [(f"buffer {n!r}", t) for n, t in ctx.model.named_buffers()]
        probe = ctx.probe
        if isinstance(probe, torch.Tensor):
            tensors.append(("probe", probe))
        elif isinstance(probe, (dict, tuple, list)):
            items = probe.items() if isinstance(probe, dict) else enumerate(probe)
            tensors += [(f"probe[{k!r}]", t) for k, t in items if isinstance(t, torch.Tensor)]
        for what, t in tensors:
            if t.is_meta:
                raise RecorderError(
                    f"the {what} is on the meta device: meta tensors have a shape but "
                    "no data, so there are no activations to record. The recorder takes tensors "
                    "with data, on the CPU or on CUDA (or another accelerator); materialize the "
                    "model first (e.g. model.to_empty(device='cpu'), then initialize or load "
                    "its weights)"
                )

    def config(self) -> dict[str, Any]:
        fused = {} if self.fused is None else {"fused": self.fused}
        return {
            "quantiles": self.quantiles.tolist(),
            "bins": self.bins,
            "hist_range": repr(self.hist_range),
            "saturation": {k: float(v) for k, v in self.saturation.items()},
            "quantile_sample": self.quantile_sample,
        } | fused

    # events ------------------------------------------------------------------------------
    def site(self, ctx: Context, name: str, x: torch.Tensor, source: str) -> None:
        stats = self._stats.get((source, name))
        if stats is None:
            stats = self._new_stats(ctx, name, x, source)
        elif name not in self._edges and x.numel():
            self._fix_edges(ctx, name, x)
        stats.update(x)

    def _fix_edges(self, ctx: Context, name: str, x: torch.Tensor) -> np.ndarray:
        """The site's histogram edges, from its first values (a call without values, e.g. an
        expert that got no token, fixes none: its statistics objects hold no values yet)."""
        rng = site_option(self.hist_range, ctx.units.base[name], "hist_range", tuple)
        if rng is not None:
            edges = np.linspace(float(rng[0]), float(rng[1]), self.bins + 1)
        else:
            edges = choose_hist_edges(x, self.bins)  # no values: a default range
        if rng is not None or x.numel():
            self._set_edges(name, edges)
        return edges

    def _set_edges(self, name: str, edges: np.ndarray) -> None:
        self._edges[name] = edges
        for source in ("train", "probe"):  # objects made before hold no values yet
            if (source, name) in self._stats:
                self._stats[(source, name)].hist_edges = edges

    # for icstools.recording.distributed -----------------------------------------------------
    @property
    def states(self) -> dict[tuple[str, str], ActivationStatistics]:
        """The statistics of the open record by ``(source, record site)``."""
        return self._stats

    def fixed_range(self, ctx: Context, name: str) -> Any:
        """The ``hist_range`` given for a record site (``None``: edges from its values)."""
        return site_option(self.hist_range, ctx.units.base[name], "hist_range", tuple)

    def set_edges(self, name: str, edges: np.ndarray) -> None:
        """Fix the histogram edges of a record site; its statistics are histogrammed again
        on them (they must hold every value: :attr:`keep_all`)."""
        self._edges[name] = edges
        for source in ("train", "probe"):
            if (source, name) in self._stats:
                self._stats[(source, name)].rebin(edges)

    def _new_stats(
        self, ctx: Context, name: str, x: torch.Tensor, source: str
    ) -> ActivationStatistics:
        edges = self._edges.get(name)
        if edges is None:
            edges = self._fix_edges(ctx, name, x)
        seed = zlib.crc32(f"{self.seed}/{source}/{name}".encode())
        stats = ActivationStatistics(
            edges,
            ctx.units.unit_dims[name],
            quantiles=self.quantiles,
            sat_threshold=self.sat[ctx.units.base[name]],
            quantile_sample=None if self.keep_all else self.quantile_sample,
            generator=torch.Generator().manual_seed(seed),
            fused=self.fused,
        )
        self._stats[(source, name)] = stats
        return stats

    def restore(self, ctx: Context, stored: Any) -> None:
        """``Recorder(resume=True)``: the histogram edges are the store's (its first record
        fixed them), not chosen again from the first values after the restart."""
        if "hist_edges" in stored.coords:
            sites, edges_ = stored["site"].values.tolist(), stored["hist_edges"].values
            for name, edges in zip(sites, edges_, strict=True):
                self._restored[name] = np.array(edges)
            self._edges.update(self._restored)

    def discard_train(self, ctx: Context) -> None:
        for (source, _), stats in self._stats.items():
            if source == "train":
                stats.reset()

    def reset(self, ctx: Context) -> None:
        for stats in self._stats.values():
            stats.reset()
        if ctx.layout is None:  # the first record: no edges are fixed yet (but the store's)
            self._stats.clear()
            self._edges = dict(self._restored)

    # the record --------------------------------------------------------------------------
    def declare(self, ctx: Context) -> Declaration:
        layout_sites = ctx.layout.sites
        sat = [self.sat[ctx.units.base[s]] for s in layout_sites]
        coords = {
            "quantile": ("quantile", self.quantiles.astype(np.float64)),
            "bin": ("bin", np.arange(self.bins + 2, dtype=np.int64)),
            "hist_edges": (("site", "edge"), np.stack([self._site_edges(s) for s in layout_sites])),
            "site_units": (
                "site",
                np.array([ctx.units.widths[s] for s in layout_sites], np.int64),
            ),
            "site_unit_dim": (
                "site",
                np.array([ctx.units.unit_dims[s] for s in layout_sites], np.int64),
            ),
            "sat_threshold": ("site", np.array([np.nan if t is None else t for t in sat])),
        }
        return Declaration(coords, self.variables)

    def _site_edges(self, name: str) -> np.ndarray:
        """The edges of a site, fixed at the first record (a default range for a site that
        got no value in it)."""
        if name not in self._edges:
            self._set_edges(name, choose_hist_edges(torch.empty(0), self.bins))
        return self._edges[name]

    def stage(self, ctx: Context) -> dict[Any, torch.Tensor]:
        self._active = [(key, stats) for key, stats in self._stats.items() if stats.calls]
        # wide sites are finished by slices of units in collect (exact.finish_exact_slices)
        self._wide = [is_wide(stats) for _, stats in self._active]
        parts = device_parts_many(_narrow(self._active, self._wide))
        self._fields = [list(p) for p in parts]
        return {(i, f): t for i, p in enumerate(parts) for f, t in p.items()}

    def collect(self, ctx: Context) -> dict[str, np.ndarray]:
        active, self._active = self._active, []
        host = ctx.host.get(self.name, {})
        fields = [{f: host[(i, f)] for f in names} for i, names in enumerate(self._fields)]
        narrow = finish_many(_narrow(active, self._wide), fields)
        return self._record(ctx, active, _with_wide(self._wide, narrow))

    def defer(self, ctx: Context) -> _Taken | None:
        """While every value of the record is kept on the CPU (exact mode, float32): the
        record's statistics objects, for :meth:`collect_many`."""
        if self.keep_all:
            return None
        active = [(key, stats) for key, stats in self._stats.items() if stats.calls]
        widths = ctx.layout.widths
        if not active or not all(
            stats.exact_on_host and stats.units == widths.get(name, stats.units)
            for (_, name), stats in active
        ):
            return None  # (a width that changed is reported by collect, now)
        return _Taken([(key, stats.take()) for key, stats in active])

    def collect_many(self, ctx: Context, taken: list[_Taken]) -> Iterator[dict[str, np.ndarray]]:
        """The records of several steps, all their narrow sites folded in one numpy pass;
        each record's arrays (and its wide sites' statistics) made as it is taken."""
        wide = [[is_wide(stats) for _, stats in t.active] for t in taken]
        outs = finish_exact_many([_narrow(t.active, ws) for t, ws in zip(taken, wide, strict=True)])
        return (
            self._record(ctx, t.active, _with_wide(ws, out))
            for t, ws, out in zip(taken, wide, outs, strict=True)
        )

    def _record(
        self,
        ctx: Context,
        active: list[tuple[tuple[str, str], ActivationStatistics]],
        outs: list[dict[str, np.ndarray] | None],
    ) -> dict[str, np.ndarray]:
        """One record's arrays from its sites' final statistics (``None``: a wide site's,
        computed here by slices) and the objects reset."""
        layout = ctx.layout
        rec = layout.empty_all(self.variables)
        for ((source, name), stats), out in zip(active, outs, strict=True):
            calls = stats.calls
            try:
                if name not in layout.widths or source not in layout.sources:
                    continue
                sat = self.sat[ctx.units.base[name]]
                if out is None:  # wide: its units' statistics a slice at a time
                    width, slices = int(stats.units), finish_exact_slices(stats)  # type: ignore[arg-type]
                else:
                    width, slices = out["mean"].shape[0], [(slice(0, None), out)]
                _check_width(layout, name, width, ctx.step)
                self._write(rec, layout, (source, name), slices, calls, sat)
            finally:
                stats.reset()
        return rec

    def _write(
        self,
        rec: dict[str, np.ndarray],
        layout: Layout,
        key: tuple[str, str],
        slices: Iterable[tuple[slice, dict[str, np.ndarray]]],
        calls: int,
        sat: float | None,
    ) -> None:
        """Write a site's statistics, given as ``(units of the site, statistics)`` slices
        (the histogram of each counts its units' values: they add), into ``rec``."""
        source, name = key
        si = layout.sources.index(source)
        k = layout.site_index(name)
        units = layout.units_of(name)
        hist = 0
        # Statistics are stored as float32: moments beyond its range (a diverging network's
        # variance) become ±inf there, which is what they are.
        with np.errstate(over="ignore"):
            for cols, out in slices:
                lo = units.start + cols.start
                mine = slice(lo, lo + out["mean"].shape[0])  # [units of this slice]
                for field, t in out.items():
                    if field != "hist":
                        rec[field][si, mine] = t
                hist = hist + out["hist"]
        rec["hist"][si, k] = hist
        rec["calls"][si, k] = calls
        if sat is None:
            rec["sat_frac"][si, units] = np.nan  # no threshold: not a saturating input


def _check_width(layout: Layout, name: str, width: int, step: int) -> None:
    if width != layout.widths[name]:
        raise RecorderError(
            f"site {name} has {width} units at step {step}, but {layout.widths[name]} at the "
            f"first record; a site's width must not change (set unit_dim for it if the wrong "
            f"dimension is taken as units)"
        )


def _narrow(
    active: list[tuple[tuple[str, str], ActivationStatistics]], wide: list[bool]
) -> list[ActivationStatistics]:
    """The statistics objects of the sites that are not wide, in order."""
    return [stats for (_, stats), w in zip(active, wide, strict=True) if not w]


def _with_wide(
    wide: list[bool], narrow: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray] | None]:
    """The narrow sites' statistics in the sites' order, ``None`` where a site is wide."""
    it = iter(narrow)
    return [None if w else next(it) for w in wide]


class _Taken:
    """The statistics objects of one deferred record (``(source, site)``, object)."""

    __slots__ = ("active", "nbytes")

    def __init__(self, active: list[tuple[tuple[str, str], ActivationStatistics]]) -> None:
        self.active = active
        self.nbytes = sum(stats.nbytes for _, stats in active)


MEASUREMENT = Activations

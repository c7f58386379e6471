"""The static shape of a run: record sites and their units, coordinates, variables.

:class:`SiteTable` names the sites as records see them (``"<site>#k"`` for the k-th call of a
module with ``calls="separate"``) and fixes each one's unit dimension and width the first time
it is seen. :class:`Layout` is fixed when the first record closes, from the sites seen and the
declarations of the measurements; it makes empty records and turns a list of records into an
``xarray.Dataset`` block (:meth:`Layout.block`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from icstools.recording.errors import (
    RecorderError,
    SharedModuleWarning,
    SitesNotRecordedWarning,
)
from icstools.schema import SOURCES, STEP, Variable
from icstools.sites import Site, default_unit_dim, layout_module

if TYPE_CHECKING:
    from icstools.recording.measurements.base import Context

__all__ = ["Layout", "SiteTable", "site_option", "to_host"]

#: Largest filled array :meth:`Layout.empty` keeps to copy from: a record's variables of
#: ordinary sites are far smaller; a 10⁶-unit site's would hold another record's memory.
EMPTY_CACHE_BYTES = 1 << 20


def site_option(option: Any, site: str, what: str, kind: type) -> Any:
    """The value of a per-site option for ``site``: the option itself, or the first value of a
    ``{site glob: value}`` dict whose glob matches the site or its module (``None``: none)."""
    if option is None:
        return None
    if isinstance(option, dict):
        for pattern, value in option.items():
            if fnmatchcase(site, pattern) or fnmatchcase(site.rpartition(":")[0], pattern):
                return value
        return None
    if kind is int and (isinstance(option, bool) or not isinstance(option, int)):
        raise TypeError(f"{what} must be an int or a dict of site glob -> int, got {option!r}")
    if kind is tuple and not isinstance(option, (tuple, list)):
        raise TypeError(
            f"{what} must be (low, high) or a dict of site glob -> (low, high), got {option!r}"
        )
    return option


def to_host(tensors: dict[Any, torch.Tensor]) -> dict[Any, np.ndarray]:
    """Move a dict of device tensors to numpy with one transfer (float64 for float64 inputs,
    float32 otherwise)."""
    if not tensors:
        return {}
    keys = list(tensors)
    dtype = (
        torch.float64 if any(t.dtype == torch.float64 for t in tensors.values()) else torch.float32
    )
    flat = torch.cat([tensors[k].detach().reshape(-1).to(dtype) for k in keys]).cpu().numpy()
    parts = np.split(flat, np.cumsum([tensors[k].numel() for k in keys])[:-1])
    return {k: p.reshape(tuple(tensors[k].shape)) for k, p in zip(keys, parts, strict=True)}


class SiteTable:
    """Record-site names, unit dimensions and widths, fixed at each site's first sight."""

    def __init__(self, model: nn.Module, unit_dim: Any, calls: str | None) -> None:
        self.model = model
        self.unit_dim_option = unit_dim
        self.separate = calls == "separate"
        # calls not given: pooled, and a module called several times in one forward is
        # reported once (report_shared)
        self.watch_calls = calls is None
        self.shared: dict[str, int] = {}  # site -> most calls seen in one forward
        self.unit_dims: dict[str, int] = {}
        self.widths: dict[str, int] = {}
        self.base: dict[str, str] = {}  # record site -> selected site
        self._calls: dict[tuple[str | None, str], int] = {}
        self.fixed: frozenset[str] | None = None  # the record sites, once the layout is fixed

    def new_forward(self) -> None:
        """A forward starts: call counting (``calls="separate"``) starts again."""
        self._calls.clear()

    def record_name(self, site: Site, source: str | None, x: torch.Tensor) -> str | None:
        """The record site of this call of ``site`` (``None``: not part of the run)."""
        name = site.name
        if self.separate:  # the k-th call of a forward is site "<name>#k"
            k = self._calls.get((source, name), 0)
            self._calls[(source, name)] = k + 1
            name = f"{name}#{k}"
        elif self.watch_calls:
            k = self._calls.get((source, name), 0) + 1
            self._calls[(source, name)] = k
            if k > 1:
                self.shared[name] = max(k, self.shared.get(name, 0))
        if self.fixed is not None:
            return name if name in self.fixed else None  # not seen at the first record
        if name not in self.unit_dims:
            ud = site_option(self.unit_dim_option, site.name, "unit_dim", int)
            if ud is None:
                ud = default_unit_dim(layout_module(self.model, site), x)
            self.unit_dims[name] = int(ud)
            # out of range: the statistics raise a clear error right after
            self.widths[name] = int(x.shape[int(ud)]) if -x.ndim <= int(ud) < x.ndim else 0
            self.base[name] = site.name
        return name

    def report_shared(self) -> None:
        """Warn once (:class:`SharedModuleWarning`) if a module ran several times in one
        forward while ``calls`` was not given: its calls are pooled into one site."""
        if not (self.watch_calls and self.shared):
            return
        self.watch_calls = False
        found = ", ".join(f"{s} ({n} calls)" for s, n in sorted(self.shared.items()))
        warnings.warn(
            f"modules called at several places in one forward: {found}. Their calls are pooled "
            "into one site each (different tensors mixed in one distribution). Pass "
            "calls='separate' to record the k-th call as its own site '<site>#k', or "
            "calls='pool' to keep pooling without this warning",
            SharedModuleWarning,
            stacklevel=2,
        )

    def forget_unfixed(self) -> None:
        """Forget the sites seen so far unless the run's layout fixed them (a failed probe
        forward must not fix widths)."""
        if self.fixed is None:
            self.unit_dims.clear()
            self.widths.clear()
            self.base.clear()

    def ordered(self, sites: Iterable[Site]) -> list[str]:
        """The record sites seen so far, in selection order, calls in call order."""

        def call_index(name: str) -> int:
            return int(name.rpartition("#")[2]) if "#" in name else -1

        return [
            name
            for s in sites
            for name in sorted((n for n, b in self.base.items() if b == s.name), key=call_index)
        ]


class Layout:
    """The static shape of a run: sources, record sites and their units, coordinates and the
    variables of every measurement, fixed at the first record."""

    def __init__(self, sources: tuple[str, ...], sites: list[str], table: SiteTable) -> None:
        self.sources = sources
        self.sites = sites
        self.widths = {s: table.widths[s] for s in sites}
        self.unit_dims = {s: table.unit_dims[s] for s in sites}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name in sites:
            self.offsets[name] = offset
            offset += self.widths[name]
        self.n_units = offset
        # with numpy, not Python lists: a 10⁶-unit site's list of names took ~60 MiB transiently
        wide = [s for s in sites if self.widths[s]]  # (a site of no unit names none)
        widths = [self.widths[s] for s in wide]
        unit_site = np.repeat(np.array(wide, dtype=str), widths)  # [units]
        unit_index = np.arange(self.n_units, dtype=np.int64) - np.repeat(  # [units]
            np.array([self.offsets[s] for s in wide], dtype=np.int64), widths
        )
        self.coords: dict[str, Any] = {
            "source": ("source", np.array(sources, dtype=str)),
            "unit": ("unit", np.arange(self.n_units, dtype=np.int64)),
            "unit_site": ("unit", unit_site),
            "unit_index": ("unit", unit_index),
            "site": ("site", np.array(sites, dtype=str)),
        }
        self.sizes: dict[str, int] = {}
        self.variables: dict[str, Variable] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], np.dtype, Any]] = {}
        self._empty: dict[str, np.ndarray] = {}  # a filled record of each variable, to copy
        self._size_from_coords()

    def _size_from_coords(self) -> None:
        # 1-d coordinates define their dimension's size
        self.sizes = {dims: len(v) for dims, v in self.coords.values() if isinstance(dims, str)}

    def add(self, coords: dict[str, Any], variables: Iterable[Variable], by: str) -> None:
        """Add a measurement's coordinates and variables (``by``: its name, for errors)."""
        for name in coords:
            if name in self.coords:
                raise ValueError(f"coordinate {name!r} of {by!r} is already in the run")
        self.coords.update(coords)
        self._size_from_coords()
        for v in variables:
            if v.name in self.variables or v.name in self.coords:
                raise ValueError(f"variable {v.name!r} of {by!r} is already in the run")
            self.variables[v.name] = v

    def check_dims(self) -> None:
        """Raise if a variable has a dimension that no coordinate defines (and keep each
        variable's record shape and dtype)."""
        self._shapes = {
            name: (v.shape(self.sizes), np.dtype(v.dtype), v.fill)
            for name, v in self.variables.items()
        }
        self._empty = {}

    @classmethod
    def fix(cls, ctx: Context) -> Layout:
        """The run's layout at the first record: the sites seen, then what every measurement
        declares (it may read ``ctx.layout.sites``)."""
        sites = ctx.units.ordered(ctx.sites)
        if not sites and ctx.sites:
            raise RecorderError(
                "no selected site received a floating-point tensor during the first recorded "
                f"step; selected: {[s.name for s in ctx.sites][:10]}. Check the sites (e.g. an "
                "embedding's input is integer: record its output instead)"
            )
        seen = set(ctx.units.base.values())
        missing = [s.name for s in ctx.sites if s.name not in seen]
        if missing:
            warnings.warn(
                f"selected sites not recorded: {missing}: no floating-point tensor reached them "
                "in the first recorded step (their module did not run, or its inputs/outputs "
                "hold none, e.g. an embedding's integer input: record its output instead); the "
                "run leaves them out (attribute sites_not_recorded)",
                SitesNotRecordedWarning,
                stacklevel=2,
            )
        sources = SOURCES if ctx.probe is not None else SOURCES[:1]
        ctx.layout = layout = cls(sources, sites, ctx.units)
        try:
            for m in ctx.measurements:
                declared = m.declare(ctx)
                layout.add(declared.coords, declared.variables, m.name)
            layout.check_dims()
        finally:
            ctx.layout = None  # the caller sets it: a half-built layout is never seen
        ctx.units.fixed = frozenset(sites)
        return layout

    def site_index(self, name: str) -> int:
        return self.sites.index(name)

    def units_of(self, name: str) -> slice:
        """The ``unit`` positions of a record site."""
        lo = self.offsets[name]
        return slice(lo, lo + self.widths[name])

    def per_site(self, values: dict[str, Any], fill: float = np.nan) -> np.ndarray:
        """``[site]`` array from a dict record site -> value (missing: ``fill``)."""
        return np.array([values.get(s, fill) for s in self.sites], dtype=np.float64)

    def empty(self, name: str) -> np.ndarray:
        """One record of variable ``name`` filled with its fill value (a new array)."""
        template = self._empty.get(name)
        if template is not None:  # copying a filled template is ~3x faster than numpy.full
            return template.copy()
        shape, dtype, fill = self._shapes[name]
        filled = np.full(shape, fill, dtype)
        if filled.nbytes <= EMPTY_CACHE_BYTES:  # a wide site's would hold a record's memory
            self._empty[name] = filled.copy()
        return filled

    def empty_all(self, variables: Iterable[Variable]) -> dict[str, np.ndarray]:
        """:meth:`empty` of each of ``variables``, by name."""
        return {v.name: self.empty(v.name) for v in variables}

    def record(self, step: int, results: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """One record from the measurements' ``(name, collected arrays)``: each array checked
        against its declaration and cast to its dtype; variables not returned are filled."""
        rec: dict[str, Any] = {STEP: step}
        for measurement, arrays in results:
            for name, value in arrays.items():
                rec[name] = self._checked(name, value, measurement)
        for name in self.variables:
            if name not in rec:
                rec[name] = self.empty(name)
        return rec

    def _checked(self, name: str, value: Any, measurement: str) -> np.ndarray:
        known = self._shapes.get(name)
        if known is None:
            raise ValueError(
                f"measurement {measurement!r} returned {name!r}, which it did not declare "
                f"(declared in this run: {sorted(self.variables)})"
            )
        shape, dtype, _ = known
        if not (isinstance(value, np.ndarray) and value.dtype == dtype):
            with np.errstate(over="ignore"):  # float32 holds a diverging value as ±inf
                value = np.asarray(value, dtype=dtype)
        if value.shape != shape:
            raise ValueError(
                f"measurement {measurement!r} returned {name!r} of shape {value.shape}; one "
                f"record of {self.variables[name].dims} has shape {shape}"
            )
        return value

    def block(self, records: list[dict[str, Any]], attrs: dict[str, Any]) -> xr.Dataset:
        """Records stacked along ``step`` into a dataset (with the static coordinates); no
        records give a block of zero steps (the run's structure without its memory)."""
        steps = np.array([r[STEP] for r in records], dtype=np.int64)
        data = {}
        for name, v in self.variables.items():
            axis = v.dims.index(STEP)
            if records:
                data[name] = (v.dims, np.stack([r[name] for r in records], axis))
            else:
                shape, dtype, _ = self._shapes[name]
                data[name] = (v.dims, np.moveaxis(np.empty((0, *shape), dtype), 0, axis))
        coords = {STEP: (STEP, steps), **self.coords}
        return xr.Dataset(data, coords=coords, attrs=attrs)

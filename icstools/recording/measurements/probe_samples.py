"""Raw probe values per unit, for exact sample-based drift metrics (:mod:`icstools.analysis.drift`).

The positions (probe example, and pixel for convolutions) are drawn once per site, uniformly
without replacement, and kept for the whole run, so sample ``i`` of a unit is the same input at
every step. With a site called several times per forward, the values of its first call are kept.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from icstools.recording.errors import RecorderError
from icstools.recording.layout import to_host
from icstools.recording.measurements.base import (
    Context,
    Declaration,
    Measurement,
)
from icstools.schema import Coordinate, Variable

__all__ = ["ProbeSamples"]

VARIABLES = (
    Variable(
        "probe_sample",
        ("step", "sample", "unit"),
        "float32",
        "raw probe values per unit, the same positions at every step",
        "Recorder(probe=..., probe_sample=...)",
    ),
)
COORDINATES = (Coordinate("sample", ("sample",), "index of a kept probe position"),)


class ProbeSamples(Measurement):
    """Up to ``size`` raw probe values per unit at each record (``Recorder(probe_sample=)``)."""

    name = "probe_samples"
    variables = VARIABLES
    coordinates = COORDINATES
    requires = frozenset({"probe"})

    def __init__(self, size: int, seed: int) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"probe_sample must be an int or None, got {size!r}")
        if size < 1:
            raise ValueError(f"probe_sample must be ≥ 1, got {size}")
        self.size = size
        self.seed = seed
        self._positions: dict[str, tuple[torch.Tensor, int]] = {}  # site -> positions [m], of n
        self._values: dict[str, torch.Tensor] = {}  # site -> this record's values [m, units]

    @classmethod
    def from_options(cls, options: Any) -> ProbeSamples | None:
        if options.probe_sample is None:
            return None
        measurement = cls(options.probe_sample, options.seed)
        if options.probe is None:
            raise RecorderError("probe_sample needs a probe batch (probe=...)")
        return measurement

    def site(self, ctx: Context, name: str, x: torch.Tensor, source: str) -> None:
        if source != "probe" or name in self._values:
            return  # a later call of the site in the same probe forward
        rows = x.detach().movedim(ctx.units.unit_dims[name], -1)
        rows = rows.reshape(-1, rows.shape[-1])  # [positions, units]
        if name not in self._positions:
            gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/sample/{name}".encode()))
            pos = torch.randperm(rows.shape[0], generator=gen)[: self.size]
            self._positions[name] = (pos.to(rows.device), rows.shape[0])
        pos, n_rows = self._positions[name]
        if rows.shape[0] != n_rows:  # checked on the host: no device sync
            raise RecorderError(
                f"site {name} has {rows.shape[0]} probe positions now but {n_rows} at the first "
                "record; the probe batch must keep its shape"
            )
        self._values[name] = rows.index_select(0, pos).float()  # [m, units], a copy

    def reset(self, ctx: Context) -> None:
        self._values = {}
        if ctx.layout is None:  # the first record: no positions are fixed yet
            self._positions = {}

    def declare(self, ctx: Context) -> Declaration:
        kept = [self._values[n].shape[0] for n in ctx.layout.sites if n in self._values]
        length = min(kept, default=0)  # the fewest positions of any site
        return Declaration({"sample": ("sample", np.arange(length, dtype=np.int64))}, VARIABLES)

    def collect(self, ctx: Context) -> dict[str, np.ndarray]:
        values, self._values = to_host(self._values), {}  # one transfer for all sites
        out = ctx.layout.empty("probe_sample")
        m = out.shape[0]
        for name, v in values.items():
            if name in ctx.layout.widths:
                out[:, ctx.layout.units_of(name)] = v[:m]
        return {"probe_sample": out}


MEASUREMENT = ProbeSamples

"""Final statistics on the host, from the folded fields of a statistics state: the last step
of :meth:`ActivationStatistics.compute <icstools.functional.statistics.ActivationStatistics.
compute>` and of the recorder's records.

The fields (``count, total, mean, m2, m3, m4, min, max, n_sat, n_zero, hist`` and the quantile
values under ``sample``, as :mod:`icstools.functional.state` declares them) arrive as numpy
arrays, one device-to-host transfer for all of a record's sites
(:func:`icstools.functional.statistics.host_arrays`); what is computed from them here is
elementwise per unit, so the fields of many objects are finished in one call on their units
side by side (:func:`finish_many`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from icstools.functional.statistics import ActivationStatistics

__all__ = ["finish_many"]


def finish_many(
    stats: Sequence[ActivationStatistics], host: Sequence[Mapping[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """The second half of :func:`~icstools.functional.statistics.compute_many`: the final
    statistics (numpy) of each object from the host arrays of its
    :func:`~icstools.functional.statistics.device_parts_many`.

    Examples
    --------
    >>> from icstools.functional.statistics import (
    ...     ActivationStatistics, device_parts_many, host_arrays)
    >>> a = ActivationStatistics(np.linspace(-3, 3, 7), 1)
    >>> a.update(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    >>> (parts,) = device_parts_many([a])
    >>> (out,) = finish_many([a], [host_arrays(parts)])
    >>> out["mean"].tolist(), out["var"].tolist(), out["zero_frac"].tolist()
    ([2.0, 0.0], [1.0, 0.0], [0.0, 1.0])
    """
    out: list[dict[str, np.ndarray]] = [{} for _ in stats]
    groups: dict[torch.dtype, list[int]] = {}
    for i, s in enumerate(stats):
        groups.setdefault(s._state.min.dtype, []).append(i)  # type: ignore[union-attr]
    for dtype, members in groups.items():
        # _finish is elementwise per unit: one call on the objects' fields side by side
        parts = [host[i] for i in members]
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        done = _finish(joined, compute_dtype=dtype)
        sizes = [len(p["count"]) for p in parts], [len(p["hist"]) for p in parts]
        _split_into(out, members, done, *sizes)
    return out


def _split_into(
    out: list[dict[str, np.ndarray]],
    members: list[int],
    joined: Mapping[str, np.ndarray],
    units: Sequence[int],
    bins: Sequence[int],
) -> None:
    """``out[members[j]][key]``: object ``j``'s rows of each ``joined`` array (``units[j]``
    rows, ``bins[j]`` for ``"hist"``), as views."""
    bounds = {}
    for name, sizes in (("units", units), ("bins", bins)):
        stops = np.cumsum(sizes).tolist()
        bounds[name] = list(zip([0, *stops[:-1]], stops, strict=True))
    for key, value in joined.items():
        for i, (a, b) in zip(members, bounds["bins" if key == "hist" else "units"], strict=True):
            out[i][key] = value[a:b]


_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def _finish(host: Mapping[str, np.ndarray], compute_dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Final statistics from a state's declared fields on the host, by name (numpy: cheap on
    ``[units]`` vectors); ``host["sample"]`` holds the quantile values."""
    count, mean = host["count"], host["mean"]
    m2, m3, m4 = host["m2"], host["m3"], host["m4"]
    n = count
    safe = np.where(n > 0, n, 1)
    var = m2 / safe
    eps = float(torch.finfo(compute_dtype).eps)  # deviations were formed in the compute dtype
    # Central sums of nearly constant data are rounding noise: a variance below
    # (16·eps·|mean|)² is not resolved, so its shape statistics are undefined.
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        resolved = var > (16 * eps * np.abs(mean)) ** 2 + np.finfo(np.float64).tiny
        v = np.maximum(var, 1e-300)
        skew = np.where(resolved, (m3 / safe) / v**1.5, np.nan)
        kurt = np.where(resolved, (m4 / safe) / v**2 - 3, np.nan)
    empty = n == 0
    cdt = _NP_DTYPE.get(compute_dtype, np.float32)
    out = {
        "mean": np.where(empty, np.nan, mean),
        "var": np.where(empty, np.nan, var),
        "skew": np.where(empty, np.nan, skew),
        "kurt": np.where(empty, np.nan, kurt),
        "min": np.where(empty, np.nan, host["min"]).astype(cdt),
        "max": np.where(empty, np.nan, host["max"]).astype(cdt),
        "sat_frac": np.where(empty, np.nan, host["n_sat"] / safe),
        "zero_frac": np.where(empty, np.nan, host["n_zero"] / safe),
        # no value at all: undefined (NaN), not "every value non-finite"
        "nonfinite": np.where(host["total"] > 0, 1 - n / np.maximum(host["total"], 1), np.nan),
        "count": count.astype(np.int64),
        "hist": host["hist"].astype(np.int64),
        "quantile_value": host["sample"].astype(cdt, copy=False),
    }
    return {k: np.ascontiguousarray(v) for k, v in out.items()}

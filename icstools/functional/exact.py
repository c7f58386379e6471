"""Exact mode: folding the values an :class:`~icstools.functional.statistics.ActivationStatistics`
kept (at most ``quantile_sample`` per unit), many objects at once.

A call of a small site only copies its values (:meth:`ActivationStatistics.update
<icstools.functional.statistics.ActivationStatistics.update>`); when the record closes, the
copies of all its sites are reduced together (:func:`fold_together`: one block of all their
columns per group of equal positions), and the records that
:mod:`icstools.recording.deferred` holds back are reduced many at a time
(:func:`finish_exact_many`). On CPU float32 the fold runs on the host: a sort per column
for the quantiles (numpy), then the moments in float64, the counts and the histograms of all
columns, each group on its own edges, in two compiled passes
(:func:`icstools.functional.kernels.block_fields`), or with numpy where the kernels do not run
(its per-call overhead is a fraction of torch's on small tensors); otherwise (a non-finite
value, another device) torch's reductions (:func:`~icstools.functional.statistics.
summarize`'s).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from icstools.functional import kernels as _kernels  # usable() asked per call (patchable)
from icstools.functional import statistics as _statistics  # its on_host decides, patchable
from icstools.functional.final import _finish, _split_into, finish_many
from icstools.functional.statistics import (
    StatisticsState,
    _histogram,
    _unit_moments,
    device_parts_many,
    host_arrays,
    summarize,
)

if TYPE_CHECKING:
    from icstools.functional.statistics import ActivationStatistics

__all__ = [
    "finish_exact_many",
    "finish_exact_slices",
    "fold_together",
    "is_wide",
    "quantiles_of_sorted_columns",
]


_UNIT_BLOCK = 1 << 16  # units per block: bounds the temporaries of wide sites (~5 MiB each)


def quantiles_of_sorted_columns(srt: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Quantiles ``[units, nq]`` of ascending, finite columns ``srt`` (``[m, units]``, equal
    counts): numpy's linear method, in blocks of units so that a wide site (10⁶ units) needs
    no temporaries of the output's size."""
    # same arithmetic, in the same dtype, as quantiles_from_sorted: equal bits
    pos = levels.astype(srt.dtype) * srt.dtype.type(srt.shape[0] - 1)
    lo_f = np.floor(pos)
    lo = lo_f.astype(np.int64)
    hi = np.minimum(lo + 1, srt.shape[0] - 1)
    frac = (pos - lo_f)[:, None]
    out = np.empty((srt.shape[1], len(levels)), dtype=srt.dtype)  # [units, nq]
    for start in range(0, srt.shape[1], _UNIT_BLOCK):
        cols = srt[:, start : start + _UNIT_BLOCK]  # [m, block]
        out[start : start + cols.shape[1]] = (cols[lo] + (cols[hi] - cols[lo]) * frac).T
    return out


#: Values folded at once by :func:`finish_exact_many`: larger chunks pay the fixed cost per
#: chunk less often (0.113 -> 0.101 ms per record of the paper's MLP from 2**16 to 2**18);
#: numpy's float64 temporaries (~8 of the chunk, without the kernels) stay ~16 MiB.
_FOLD_VALUES = 1 << 18

#: Units from which an object's final statistics are computed a slice of units at a time
#: (:func:`finish_exact_slices`): a site of 10⁶ units held ~250 MiB of temporaries at once.
WIDE_UNITS = 1 << 17
#: Units per slice of :func:`finish_exact_slices` (their quantile values and float64
#: temporaries take ~500 bytes a unit: ~32 MiB), and kept values per slice at most (16 MiB).
SLICE_UNITS = 1 << 16
SLICE_VALUES = 1 << 22


def _cache_sized(
    units: list[list[tuple[int, int]]], records: Sequence[Sequence[ActivationStatistics]]
) -> list[list[list[tuple[int, int]]]]:
    """The units of work in consecutive chunks of about :data:`_FOLD_VALUES` kept values."""
    chunks: list[list[list[tuple[int, int]]]] = [[]]
    size = 0
    for unit in units:
        if chunks[-1] and size >= _FOLD_VALUES:
            chunks.append([])
            size = 0
        chunks[-1].append(unit)
        size += sum(records[r][j]._n_values * (records[r][j].units or 0) for r, j in unit)
    return chunks


def fold_together(stats: list[ActivationStatistics]) -> None:
    """Fold the exact-mode values of several objects with one reduction per group of equal
    positions, dtype and device (e.g. all layers of an MLP, or the records of several steps:
    :func:`finish_exact_many`): the per-op overhead of small tensors is paid once per group
    instead of once per site."""
    groups: dict[tuple, list[ActivationStatistics]] = {}
    for s in stats:
        v = s._values[0]
        groups.setdefault((s._n_values, v.dtype, v.device), []).append(s)
    for (n, dtype, device), group in groups.items():
        vals = [torch.cat(s._values) if len(s._values) > 1 else s._values[0] for s in group]
        if n == 0:
            for s, v in zip(group, vals, strict=True):
                state = summarize(v, 1, hist_edges=s.hist_edges, sat_threshold=s.sat_threshold)
                s._state = state.replace(calls=len(s._values))
                s._values, s._n_values, s._rate = [], 0, 1.0
            continue
        block = torch.cat(vals, dim=1) if len(vals) > 1 else vals[0]  # [positions, all units]
        # host fast path: CPU float32 (float64 data could overflow its 4th powers)
        widths = [v.shape[1] for v in vals]
        host = _statistics.on_host(device) and dtype == torch.float32
        folded = _fold_host(group, widths, block.numpy()) if host else None
        if folded is not None:
            moments, srt, hists, qs = folded
            moments = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in moments.items()}
            _set_folded_numpy(group, vals, block, moments, srt, hists, qs)
        else:
            _set_folded_torch(group, vals, block)


def _numpy_fields(
    group: Sequence[ActivationStatistics], widths: list[int], a: np.ndarray, srt: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
    """What the numpy fold adds to the moments of a finite block ``a`` (``[positions, all
    units]``, the objects' columns side by side, ``srt`` sorted by column), one pass each over
    all columns: saturation counts ``[units]``, each object's histogram, and the quantile
    values ``[units, nq]`` (``None`` if the objects' levels differ)."""
    thresholds = [math.inf if s.sat_threshold is None else s.sat_threshold for s in group]
    thr = np.repeat(np.asarray(thresholds, dtype=a.dtype), widths)
    n_sat = (np.abs(a) > thr).sum(0)
    hists = _histograms_numpy(a, widths, [s.hist_edges for s in group])
    # exact mode: equal counts, so every column interpolates at the same positions
    return n_sat, hists, _quantile_values(group, srt)


def _set_folded_numpy(
    group: list[ActivationStatistics],
    vals: list[torch.Tensor],
    block: torch.Tensor,
    moments: dict[str, torch.Tensor],
    srt: np.ndarray,
    hists: list[np.ndarray],
    qs: np.ndarray | None,
) -> None:
    """Each object's state from the host fold of ``block`` (``[positions, all units]``)."""
    widths = [v.shape[1] for v in vals]
    samples = torch.from_numpy(srt).split(widths, dim=1)
    start = 0
    for i, (s, sample) in enumerate(zip(group, samples, strict=True)):
        stop = start + widths[i]
        mine = {k: t[start:stop] for k, t in moments.items()}
        s._state = StatisticsState(
            **mine,
            hist=torch.from_numpy(hists[i]),
            sample=sample,
            calls=len(s._values),
            sample_sorted=True,
        )
        s._sorted_q = None if qs is None else (s._state, torch.from_numpy(qs[start:stop]))
        s._values, s._n_values, s._rate = [], 0, 1.0
        start = stop


def finish_exact_many(
    records: Sequence[Sequence[ActivationStatistics]],
) -> list[list[dict[str, np.ndarray]]]:
    """The final statistics of the objects of several records, each as :func:`compute_many`
    of that record's objects gives them (to the bit), when every value is kept on the host
    (:attr:`ActivationStatistics.exact_on_host`): the records' columns are folded side by side,
    one host fold per chunk of ~2**18 values (:mod:`icstools.recording.deferred`), with no state
    per object in between. The objects' values are left as they are (the caller resets them).

    Examples
    --------
    >>> from icstools.functional.statistics import ActivationStatistics
    >>> a, b = (ActivationStatistics(np.linspace(-3, 3, 7), 1) for _ in range(2))
    >>> a.update(torch.randn(8, 3)); b.update(torch.randn(8, 5))
    >>> [[r["quantile_value"].shape for r in rec] for rec in finish_exact_many([[a], [b]])]
    [[(3, 25)], [(5, 25)]]
    """
    out: list[list[dict[str, np.ndarray]]] = [[{} for _ in r] for r in records]
    # units of work: one record's objects of equal positions (as fold_together groups them)
    by_n: dict[int, list[list[tuple[int, int]]]] = {}
    for r, objs in enumerate(records):
        groups: dict[int, list[tuple[int, int]]] = {}
        for j, s in enumerate(objs):
            if not s.exact_on_host:
                raise ValueError("finish_exact_many takes objects whose values are on the CPU")
            groups.setdefault(s._n_values, []).append((r, j))
        for n, unit in groups.items():
            by_n.setdefault(n, []).append(unit)
    rest: list[list[tuple[int, int]]] = []
    for units in by_n.values():
        for chunk in _cache_sized(units, records):
            rest += _fold_chunk(chunk, records, out)
    for unit in rest:  # non-finite values: the record's objects as compute_many folds them
        objs = [copy.copy(records[r][j]) for r, j in unit]  # folded copies: the values stay
        parts = device_parts_many(objs)
        host = host_arrays({(i, k): t for i, p in enumerate(parts) for k, t in p.items()})
        fields = [{k: host[(i, k)] for k in p} for i, p in enumerate(parts)]
        for (r, j), result in zip(unit, finish_many(objs, fields), strict=True):
            out[r][j] = result
    return out


def is_wide(stats: ActivationStatistics) -> bool:
    """Whether ``stats`` keeps every value on the host (exact mode) for more than
    :data:`WIDE_UNITS` units: its final statistics are then computed by slices of units
    (:func:`finish_exact_slices`) rather than all at once."""
    return stats.exact_on_host and (stats.units or 0) > WIDE_UNITS


def finish_exact_slices(
    stats: ActivationStatistics,
) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
    """``(units, statistics)`` of an exact-on-host object, one slice of its units at a time,
    each as :func:`finish_exact_many` gives them for all units: to the bit where the values
    are finite (every statistic but the histogram is computed per unit; ``hist`` counts the
    slice's values, and the object's histogram is the sum over the slices); where a unit has
    a non-finite value, torch's reductions take the slice, whose rounding depends on the
    block's width (moments within float32 rounding). The temporaries of one slice of
    :data:`SLICE_VALUES` values live at a time, so a caller that writes each slice where it
    belongs never holds a second copy of a wide site's statistics. The object is left as
    it is.

    Examples
    --------
    >>> from icstools.functional.statistics import ActivationStatistics
    >>> stats = ActivationStatistics(np.linspace(-3, 3, 7), 1)
    >>> stats.update(torch.randn(4, 10))
    >>> [(cols.start, cols.stop, out["mean"].shape) for cols, out in finish_exact_slices(stats)]
    [(0, 10, (10,))]
    """
    if not stats.exact_on_host:
        raise ValueError("finish_exact_slices takes an object whose values are on the CPU")
    units = int(stats.units)  # type: ignore[arg-type]
    width = max(1, min(SLICE_UNITS, SLICE_VALUES // max(stats._n_values, 1)))
    for lo in range(0, units, width):
        cols = slice(lo, min(lo + width, units))
        part = copy.copy(stats)  # the settings shared, the values of these units only
        part._values = [v[:, cols].contiguous() for v in stats._values]  # [positions, width]
        ((out,),) = finish_exact_many([[part]])
        yield cols, out


def _fold_chunk(
    chunk: list[list[tuple[int, int]]],
    records: Sequence[Sequence[ActivationStatistics]],
    out: list[list[dict[str, np.ndarray]]],
) -> list[list[tuple[int, int]]]:
    """Fold the units of work of ``chunk`` with numpy into ``out``; returns the units with a
    non-finite value (or mixed quantile levels), which the caller folds with torch."""
    members = [m for unit in chunk for m in unit]
    group = [records[r][j] for r, j in members]
    vals = [torch.cat(s._values) if len(s._values) > 1 else s._values[0] for s in group]
    block = torch.cat(vals, dim=1) if len(vals) > 1 else vals[0]  # [positions, all units]
    a = block.numpy()
    widths = [v.shape[1] for v in vals]
    levels = group[0].quantiles
    mixed = [not _same_levels(s.quantiles, levels) for s in group]
    bad_cols = ~np.isfinite(a).all(0) | np.repeat(mixed, widths)  # [units]
    if bad_cols.any():
        # the units of work with a bad column go to the caller; the others are folded again
        unit_of = np.repeat([i for i, unit in enumerate(chunk) for _ in unit], widths)
        bad = set(unit_of[bad_cols].tolist())
        good = [unit for i, unit in enumerate(chunk) if i not in bad]
        again = _fold_chunk(good, records, out) if good else []
        return [unit for i, unit in enumerate(chunk) if i in bad] + again
    host, _, hists, qs = _fold_host(group, widths, a, finite=True)  # type: ignore[misc]
    host.update(hist=np.concatenate(hists), sample=qs)
    done = _finish(host, torch.float32)
    flat: list[dict[str, np.ndarray]] = [{} for _ in members]
    _split_into(flat, list(range(len(members))), done, widths, [len(h) for h in hists])
    for (r, j), result in zip(members, flat, strict=True):
        out[r][j] = result
    return []


def _fold_host(
    group: Sequence[ActivationStatistics], widths: list[int], a: np.ndarray, finite: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray, list[np.ndarray], np.ndarray | None] | None:
    """The host fold of a CPU float32 block ``a`` (``[positions, all units]``, the objects'
    columns side by side, ``widths`` each): the state's fields but the histogram and sample
    (``[units]`` each), the columns sorted, each object's histogram and the quantile values
    ``[units, nq]`` (``None`` if the objects' levels differ); ``None`` when a value is not
    finite (the torch path then; ``finite=True``: the caller has checked). The compiled kernel
    (:mod:`icstools.functional.kernels`) where it runs, numpy otherwise."""
    if not _kernels.usable():
        folded = _fold_numpy(a)
        if folded is None:
            return None
        moments, srt = folded
        n_sat, hists, qs = _numpy_fields(group, widths, a, srt)
        return {**moments, "n_sat": n_sat}, srt, hists, qs
    if not finite and not np.isfinite(a).all():
        return None
    srt = np.sort(a, axis=0)  # [positions, units], each column ascending
    thresholds = [math.inf if s.sat_threshold is None else s.sat_threshold for s in group]
    fields, hists = _kernels.block_fields(a, widths, [s.hist_edges for s in group], thresholds)
    count = np.full(a.shape[1], a.shape[0], dtype=np.int64)
    fields.update(count=count, total=count.copy(), min=srt[0], max=srt[-1])
    return fields, srt, hists, _quantile_values(group, srt)


def _same_levels(a: np.ndarray, b: np.ndarray) -> bool:
    # the sites of a recorder share one array of levels: identity first (array_equal is ~3 µs)
    return a is b or np.array_equal(a, b)


def _quantile_values(group: Sequence[ActivationStatistics], srt: np.ndarray) -> np.ndarray | None:
    """The quantiles ``[units, nq]`` of sorted equal-count columns, ``None`` if the objects'
    levels differ."""
    levels = group[0].quantiles
    if not all(_same_levels(s.quantiles, levels) for s in group):
        return None
    return quantiles_of_sorted_columns(srt, levels)


def _set_folded_torch(
    group: list[ActivationStatistics], vals: list[torch.Tensor], block: torch.Tensor
) -> None:
    """Each object's state from one torch reduction of ``block`` (any device, any values)."""
    thresholds = [math.inf if s.sat_threshold is None else s.sat_threshold for s in group]
    widths = [v.shape[1] for v in vals]
    # repeated on the host: a repeat_interleave on the device would sync (its size)
    thr_t = torch.as_tensor(np.repeat(thresholds, widths), dtype=block.dtype)
    thr_t = thr_t.to(block.device, non_blocking=True)  # host to device: no sync
    moments, _ = _unit_moments(block, (0,), [1, block.shape[1]], thr_t)
    start = 0
    for s, v in zip(group, vals, strict=True):
        stop = start + v.shape[1]
        mine = {k: t[start:stop] for k, t in moments.items()}
        finite = torch.where(torch.isfinite(v), v, math.nan)
        hist = _histogram(finite.reshape(-1), s.hist_edges)  # NaN is in no bin
        s._state = StatisticsState(**mine, hist=hist, sample=v, calls=len(s._values))
        s._values, s._n_values, s._rate = [], 0, 1.0
        start = stop


def _fold_numpy(a: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """Moments of a finite CPU block ``[positions, units]`` with numpy, in float64.

    On CPU, numpy's per-call overhead is a fraction of torch's, which dominates for the small
    tensors of exact mode; the two-pass moments in float64 need no rescaling (float32's range
    to the 4th power fits). Returns ``None`` when a value is not finite (torch path then).
    """
    a64 = a.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = a64.mean(0)
    if not np.isfinite(mean).all():
        return None
    srt = np.sort(a, axis=0)  # [positions, units], each column ascending
    d = a64 - mean
    d2 = d * d
    n, units = a.shape
    count = np.full(units, n, dtype=np.int64)
    moments = {
        "count": count,
        "total": count.copy(),
        "mean": mean,
        "m2": d2.sum(0),
        "m3": (d2 * d).sum(0),
        "m4": (d2 * d2).sum(0),
        "min": srt[0],
        "max": srt[-1],
        # booleans summed as bytes into int32 (positions < 2**31): ~3x faster than .sum(0)
        "n_zero": np.add.reduce((a == 0).view(np.uint8), axis=0, dtype=np.int32).astype(np.int64),
    }
    return moments, srt


def _histogram_numpy(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """numpy twin of :func:`_histogram` for finite values: the same arithmetic as
    ``torch.histc``, in the values' dtype, so both give the same bins to the bit."""
    flat = values.reshape(-1)
    t = flat.dtype.type
    lo, hi, bins = t(edges[0]), t(edges[-1]), len(edges) - 1
    inside = (flat >= lo) & (flat <= hi)
    with np.errstate(over="ignore", invalid="ignore"):
        pos = (flat[inside] - lo) * t(bins) / (hi - lo)
    # values inside [lo, hi] give finite positions (the edges fit the dtype): no NaN to clean
    k = np.clip(pos, 0, bins - 1).astype(np.int64)
    counts = np.bincount(k + 1, minlength=bins + 2)
    counts[0] = (flat < lo).sum()
    counts[-1] = (flat > hi).sum()
    return counts.astype(np.int64)


def _histograms_numpy(
    block: np.ndarray, widths: Sequence[int], edges: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """:func:`_histogram_numpy` of each group of columns of a finite ``block`` (``[positions,
    sum(widths)]``, group ``i`` the next ``widths[i]`` columns) on its own ``edges[i]``, in one
    pass over the block: the same float32 arithmetic per value, so the same bins to the bit.
    """
    t = block.dtype.type
    nbins = np.array([len(e) - 1 for e in edges], dtype=np.int64)
    per_col = lambda v: np.repeat(np.asarray(v), widths)  # noqa: E731  [units]
    lo = per_col([t(e[0]) for e in edges]).astype(block.dtype)
    hi = per_col([t(e[-1]) for e in edges]).astype(block.dtype)
    bins_col = per_col(nbins)
    with np.errstate(over="ignore", invalid="ignore"):
        pos = block - lo  # [positions, units]
        pos *= bins_col.astype(block.dtype)
        pos /= hi - lo
    # the bin of a value inside [lo, hi], 1-based (0 and bins + 1: under- and overflow)
    top = int(nbins[0]) - 1 if np.all(nbins == nbins[0]) else (bins_col - 1).astype(pos.dtype)
    np.clip(pos, 0, top, out=pos)
    k = pos.astype(np.int64)
    k += 1
    k[block < lo] = 0
    over = block > hi
    k[over] = np.broadcast_to(bins_col + 1, k.shape)[over]
    starts = np.concatenate([[0], np.cumsum(nbins + 2)[:-1]])  # each group's first bin
    k += per_col(starts)
    counts = np.bincount(k.reshape(-1), minlength=int((nbins + 2).sum()))
    return [counts[a : a + b + 2].astype(np.int64) for a, b in zip(starts, nbins, strict=True)]

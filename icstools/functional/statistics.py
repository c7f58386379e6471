"""Per-unit activation statistics, streaming and mergeable.

A *unit* is one feature of a site: the last dimension of ``[batch, features]`` and
``[batch, time, features]``, the channel of ``[N, C, H, W]`` (values pooled over N, H, W, as
BatchNorm pools them, Ioffe & Szegedy 2015 §3.2). For every unit the state holds

- the count of finite values and of all values,
- the mean and the central moment sums ``M2, M3, M4`` (merged exactly with Pébay's formulas),
- min and max,
- counts of saturated values (``|x| > threshold``), exact zeros and non-finite values,
- a fixed-edge histogram of the whole site with under- and overflow bins,
- a sample of the values for quantiles (all of them up to ``quantile_sample`` per unit).

Every statistic except ``nonfinite`` is taken over the *finite* values of a unit; ``nonfinite``
is the share of NaN and ±inf among all its values (NaN when the unit got no value at all: a call
on an empty tensor, e.g. an expert that received no token, adds a call and changes nothing
else). Values are reduced on the tensor's device in float32 (float64 for float64 inputs),
deviations scaled by each unit's range, and the moment sums kept in float64; nothing leaves the
device until :meth:`ActivationStatistics.compute`.

While a unit's pooled values number at most ``quantile_sample`` (exact mode), a call only copies
them; the copies of all sites are reduced together when the record closes
(:func:`compute_many`; with numpy on CPU float32, where its per-call overhead is far lower).

The state of two :class:`ActivationStatistics` over disjoint values merges exactly
(:meth:`ActivationStatistics.merge`), so batches, repeated calls of a module and ranks combine
to what one pass over all the values gives. Each field of a state is declared once
(:class:`StateField`: name, empty value, reduction; see :class:`StatisticsState`, both in
:mod:`icstools.functional.state` and re-exported here), and merging, folding, the host transfer
and the final statistics go through the declared fields by name. The gradient's per-unit
moments are :class:`icstools.functional.gradient_statistics.GradientStatistics`.

Quantiles are exact while the pooled values of a unit number at most ``quantile_sample``;
beyond that they are taken on a uniform random sample of that many values (drawn with the
object's own generator, never the global RNG). The standard error of such a quantile is about
``sqrt(q(1-q)/m) / f(x_q)`` for a sample of ``m`` values and density ``f``: for ``m = 8192``
and a Gaussian unit, 0.014σ at the median.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from icstools.functional import kernels as _kernels  # usable() asked per call (patchable)
from icstools.functional.final import finish_many
from icstools.functional.fused import fused_state, scaled_moments, unit_scale
from icstools.functional.state import StateField, StatisticsState, merge_fields

__all__ = [
    "DEFAULT_QUANTILES",
    "SIGMOID_SATURATION",
    "TANH_SATURATION",
    "ActivationStatistics",
    "StateField",
    "StatisticsState",
    "choose_hist_edges",
    "compute_many",
    "device_parts_many",
    "host_arrays",
    "merge_fields",
    "merge_states",
    "on_host",
    "quantiles_from_sorted",
    "summarize",
]

# Saturation: where the derivative of the nonlinearity falls below 0.01. These are DESIGN.md's
# thresholds (|x| > 4.6 for sigmoid, > 3.0 for tanh); for tanh that is 1% of its maximum
# derivative, for sigmoid 4% of it (1% of sigmoid's maximum 1/4 would be |x| > 5.99).
#: |x| beyond which sigmoid'(x) = s(1 - s) < 0.01: logit((1 + sqrt(0.96)) / 2) ≈ 4.585.
SIGMOID_SATURATION = float(math.log((1 + math.sqrt(0.96)) / (1 - math.sqrt(0.96))))
#: |x| beyond which tanh'(x) = 1 - tanh(x)² < 0.01: atanh(sqrt(0.99)) ≈ 2.993.
TANH_SATURATION = float(math.atanh(math.sqrt(0.99)))

#: The paper's Fig. 1 percentiles (0.15, 0.5, 0.85) on a 5% grid, plus tail levels 0.1%,
#: 0.5%, 1% and 99%, 99.5%, 99.9%, which the tail-aware drift estimate fits
#: (:mod:`icstools.analysis.tails`).
DEFAULT_QUANTILES: tuple[float, ...] = tuple(
    float(q)
    for q in np.round(
        np.concatenate([[0.001, 0.005, 0.01], np.arange(1, 20) * 0.05, [0.99, 0.995, 0.999]]), 4
    )
)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _unit_dim(x: torch.Tensor, unit_dim: int) -> int:
    if not -x.ndim <= unit_dim < x.ndim:
        raise ValueError(
            f"unit_dim {unit_dim} is out of range for a tensor of shape {tuple(x.shape)}; "
            f"valid: {-x.ndim}..{x.ndim - 1}"
        )
    return unit_dim % x.ndim


def summarize(
    x: torch.Tensor,
    unit_dim: int,
    *,
    hist_edges: np.ndarray,
    sat_threshold: float | None = None,
    sample_rate: float = 1.0,
    generator: torch.Generator | None = None,
    fused: str | None = None,
) -> StatisticsState:
    """Reduce one tensor to the mergeable per-unit state.

    Parameters
    ----------
    x : torch.Tensor
        Activations with at least one dimension; ``x.shape[unit_dim]`` units.
    unit_dim : int
        The dimension that indexes units; every other dimension is pooled.
    hist_edges : numpy.ndarray
        Increasing bin edges of the site histogram (``bins + 1`` values).
    sat_threshold : float, optional
        Values with ``|x| > sat_threshold`` count as saturated; ``None`` counts none.
    sample_rate : float
        Share of the pooled positions kept for quantiles (1.0 keeps all).
    generator : torch.Generator, optional
        CPU generator for the quantile sample; required when ``sample_rate < 1``.
    fused : {None, "compile", "eager"}
        ``"compile"``/``"eager"``: every field but the sample from one fused reduction
        (:func:`icstools.functional.fused.fused_state`, compiled or not); ``None`` (the
        default): CPU float32 values in two compiled passes (:func:`icstools.functional.
        kernels.site_moments`, float64 sums) where numba runs, else the eager reductions
        below (one op per statistic).

    Returns
    -------
    StatisticsState

    Examples
    --------
    >>> x = torch.randn(60, 100)
    >>> s = summarize(x, 1, hist_edges=np.linspace(-4, 4, 9))
    >>> s.mean.shape
    torch.Size([100])
    """
    unit_dim = _unit_dim(x, unit_dim)
    x = x.detach()
    if x.ndim == 1:  # [features]: one value per unit
        x, unit_dim = x.unsqueeze(0), 1
    dtype = _compute_dtype(x)
    if x.dtype != dtype:
        x = x.to(dtype)  # float16/bfloat16 are reduced in float32
    units = x.shape[unit_dim]
    dims = tuple(d for d in range(x.ndim) if d != unit_dim)
    n_total = x.numel() // units if units else 0
    bshape = [1] * x.ndim
    bshape[unit_dim] = units
    bins = len(hist_edges) - 1

    if n_total == 0:
        return StatisticsState.empty(units, bins=bins, dtype=dtype, device=x.device)

    edges = (float(hist_edges[0]), float(hist_edges[-1]), bins)
    out = None
    if fused is None and on_host(x.device) and dtype == torch.float32 and _kernels.usable():
        # the compiled two-pass kernel: ~7x faster than the eager reductions below
        out = {
            k: torch.from_numpy(v)
            for k, v in _kernels.tensor_moments(x, unit_dim, edges, sat_threshold).items()
        }
    elif fused is not None:
        x3 = x.reshape(math.prod(x.shape[:unit_dim]), units, -1)  # [pre, units, post]
        out = fused_state(x3, edges, sat_threshold, mode=fused)
    if out is not None:
        return StatisticsState(**out, sample=_sample_rows(x, unit_dim, sample_rate, generator))
    moments, flat = _unit_moments(x, dims, bshape, sat_threshold)
    hist = _histogram(flat, hist_edges)
    sample = _sample_rows(x, unit_dim, sample_rate, generator)
    return StatisticsState(**moments, hist=hist, sample=sample)


def _unit_moments(
    x: torch.Tensor,
    dims: tuple[int, ...],
    bshape: list[int],
    sat_threshold: float | torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-unit counts, moments and extremes of ``x`` pooled over ``dims``; and its finite
    values, flattened, for the histogram. ``sat_threshold`` may be one value per unit."""
    units = math.prod(bshape)
    n_total = x.numel() // units
    total = torch.full((units,), n_total, dtype=torch.int64, device=x.device)
    if isinstance(sat_threshold, torch.Tensor):
        sat_threshold = sat_threshold.view(bshape)
    # Fast path when every value is finite: a NaN or inf anywhere makes its unit's mean
    # non-finite (so does overflow of the sum, which the masked path then handles correctly).
    # On CPU the test costs nothing; on asynchronous devices it would be a host sync per call,
    # so there the masked path always runs.
    mean = x.mean(dim=dims)  # [units]
    if on_host(x.device) and bool(torch.isfinite(mean).all()):
        finite = None
        count = total
        mn = x.amin(dim=dims)
        mx = x.amax(dim=dims)
        saturated = x.abs() > sat_threshold if sat_threshold is not None else None
        flat = x.reshape(-1)
    else:
        finite = torch.isfinite(x)
        count = torch.count_nonzero(finite, dim=dims)  # [units]
        mean = torch.where(finite, x, 0).sum(dim=dims) / count  # NaN where no finite value
        mn = torch.where(finite, x, math.inf).amin(dim=dims)
        mx = torch.where(finite, x, -math.inf).amax(dim=dims)
        saturated = finite & (x.abs() > sat_threshold) if sat_threshold is not None else None
        flat = torch.where(finite, x, math.nan).reshape(-1)  # NaN is in no bin
    n_zero = torch.count_nonzero(x == 0, dim=dims)
    n_sat = (
        torch.count_nonzero(saturated, dim=dims)
        if saturated is not None
        else torch.zeros_like(n_zero)
    )
    # Central moments from deviations scaled by the unit's range, so that 3rd and 4th powers
    # neither overflow nor underflow in float32 at any scale; the sums are corrected for the
    # rounding error of the mean (corrected two-pass algorithm) and rescaled in float64.
    scale = unit_scale(mn, mx, x.dtype)  # [units]
    z = (x - mean.view(bshape)) * (1 / scale).to(x.dtype).view(bshape)
    if finite is not None:
        z = torch.where(finite, z, 0)
    moments = {
        "count": count,
        "total": total,
        **scaled_moments(z, dims, count, mean, scale),
        "min": mn,
        "max": mx,
        "n_sat": n_sat,
        "n_zero": n_zero,
    }
    return moments, flat


def _histogram(flat: torch.Tensor, edges: np.ndarray) -> torch.Tensor:
    """``[bins + 2]`` counts of ``flat``: underflow, the bins, overflow (NaN in none)."""
    lo, hi = float(edges[0]), float(edges[-1])
    # count_nonzero: a boolean .sum() converts to int64 first, ~10x slower on large tensors
    under = torch.count_nonzero(flat < lo).view(1)
    over = torch.count_nonzero(flat > hi).view(1)
    inner = torch.histc(flat, bins=len(edges) - 1, min=lo, max=hi)
    return torch.cat([under, inner.to(torch.int64), over])


def _as_rows(x: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """A copy of ``x`` as ``[positions, units]`` in the compute dtype."""
    unit_dim = _unit_dim(x, unit_dim)
    rows = x.detach()
    if rows.ndim != 2 or unit_dim != 1:  # [batch, features] is already rows (2.5 µs a call)
        rows = rows.movedim(unit_dim, -1)
        rows = rows.reshape(-1, rows.shape[-1]) if rows.ndim != 1 else rows.view(1, -1)
    dtype = _compute_dtype(x)
    # .to() copies when the dtype changes; otherwise clone: in-place ops may follow.
    return rows.to(dtype) if rows.dtype != dtype else rows.clone()


def _sample_rows(
    x: torch.Tensor, unit_dim: int, rate: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Copy ``rate`` of the pooled positions as ``[m, units]`` (a copy: in-place ops may follow)."""
    rows = x.movedim(unit_dim, -1)  # [..., units], a view
    n = rows.numel() // rows.shape[-1]
    if rate >= 1.0:
        return rows.reshape(n, rows.shape[-1]).clone()  # [n, units]
    if generator is None:
        raise ValueError("a generator is required to sample quantile values (sample_rate < 1)")
    m = max(1, round(n * rate))
    flat_index = torch.randperm(n, generator=generator)[:m].to(x.device, non_blocking=True)
    if rows.is_contiguous():  # units innermost (channels-last): rows of a [n, units] view
        return rows.reshape(n, rows.shape[-1])[flat_index]  # [m, units], a copy
    index = torch.unravel_index(flat_index, rows.shape[:-1])
    return rows[index].clone()  # [m, units]


def merge_states(a: StatisticsState, b: StatisticsState) -> StatisticsState:
    """Merge the states of two disjoint sets of values of the same units (exact).

    Each field merges as declared in :attr:`StatisticsState.FIELDS` (:func:`merge_fields`):
    moments with Pébay's (2008) pairwise formulas; counts, histograms add; extremes take
    fmin/fmax; samples concatenate (the caller keeps their rates equal so the pooled sample
    stays uniform). ``calls`` add.

    Examples
    --------
    >>> e = np.linspace(-3, 3, 7)
    >>> x = torch.randn(100, 4)
    >>> ab = merge_states(summarize(x[:30], 1, hist_edges=e), summarize(x[30:], 1, hist_edges=e))
    >>> torch.allclose(ab.mean, x.double().mean(0))
    True
    """
    if a.mean.shape != b.mean.shape:
        raise ValueError(
            f"cannot merge statistics of {a.mean.shape[0]} and {b.mean.shape[0]} units"
        )
    merged = merge_fields(StatisticsState.FIELDS, a, b)
    return StatisticsState(**merged, calls=a.calls + b.calls)


def quantiles_from_sorted(
    sorted_values: torch.Tensor, count: torch.Tensor, quantiles: torch.Tensor
) -> torch.Tensor:
    """Linear-interpolation quantiles (numpy's default) of the first ``count[u]`` values per unit.

    Parameters
    ----------
    sorted_values : torch.Tensor
        ``[units, m]``, each row ascending with its ``count[u]`` finite values first.
    count : torch.Tensor
        ``[units]`` number of valid values per row.
    quantiles : torch.Tensor
        ``[nq]`` levels in [0, 1].

    Returns
    -------
    torch.Tensor
        ``[units, nq]``; NaN for units without values.

    Examples
    --------
    >>> v = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    >>> quantiles_from_sorted(v, torch.tensor([4]), torch.tensor([0.5]))
    tensor([[2.5000]])
    """
    c = count.to(sorted_values.dtype).unsqueeze(1)  # [units, 1]
    pos = quantiles.to(sorted_values.dtype).unsqueeze(0) * (c - 1).clamp(min=0)  # [units, nq]
    lo = pos.floor()
    frac = pos - lo
    lo_i = lo.long().clamp(0, max(sorted_values.shape[1] - 1, 0))
    hi_i = (lo_i + 1).clamp(max=(count.unsqueeze(1) - 1).clamp(min=0))
    if sorted_values.shape[1] == 0:
        return torch.full(pos.shape, math.nan, dtype=sorted_values.dtype)
    v_lo = sorted_values.gather(1, lo_i)
    v_hi = sorted_values.gather(1, hi_i)
    out = v_lo + (v_hi - v_lo) * frac
    return torch.where(c > 0, out, math.nan)


def choose_hist_edges(x: torch.Tensor, bins: int, margin: float = 0.25) -> np.ndarray:
    """Fixed histogram edges for a site, from the finite range of its first recorded values.

    The range is widened by ``margin`` of its span on both sides; later values outside it land
    in the under/overflow bins, so histograms of all steps share the same edges.

    Examples
    --------
    >>> choose_hist_edges(torch.tensor([0.0, 1.0]), bins=3)
    array([-0.25,  0.25,  0.75,  1.25])
    """
    finite = x.detach()[torch.isfinite(x.detach())]
    if finite.numel() == 0:
        lo, hi = -1.0, 1.0
    else:
        lo, hi = (float(v) for v in torch.aminmax(finite.double()))
    # Halves first, so that ranges near the dtype's limits don't overflow; edges are clipped
    # to what the values' dtype can hold (beyond, values land in the under/overflow bins).
    half_span = max(hi / 2 - lo / 2, 5e-4 * max(abs(lo), abs(hi)), 5e-7)
    center = lo / 2 + hi / 2
    half = half_span * (1 + 2 * margin)
    limit = float(torch.finfo(_compute_dtype(x)).max) / 2
    return np.linspace(max(center - half, -limit), min(center + half, limit), bins + 1)


#: The quantile levels in use, one array per distinct tuple (shared by the objects that use it).
_LEVELS: dict[tuple[float, ...], np.ndarray] = {}


class ActivationStatistics:
    """Streaming per-unit statistics of one site (``update`` / ``merge`` / ``compute`` / ``reset``).

    Parameters
    ----------
    hist_edges : numpy.ndarray
        Fixed site histogram edges (``bins + 1`` increasing values).
    unit_dim : int
        Dimension of the incoming tensors that indexes units.
    quantiles : sequence of float
        Levels reported by :meth:`compute` (linear interpolation).
    sat_threshold : float, optional
        ``|x|`` above which a value counts as saturated.
    quantile_sample : int, optional
        Largest number of values per unit kept for quantiles; ``None`` keeps all (exact).
    generator : torch.Generator, optional
        CPU generator for quantile sampling (seeded from 0 if not given).
    fused : {None, "compile", "eager"}
        How a tensor reduced on arrival (more values than ``quantile_sample``) is reduced:
        see :func:`summarize`.

    Examples
    --------
    >>> stats = ActivationStatistics(np.linspace(-5, 5, 11), unit_dim=1)
    >>> stats.update(torch.randn(60, 100))
    >>> stats.update(torch.randn(60, 100))
    >>> out = stats.compute()
    >>> out["mean"].shape, out["quantile_value"].shape
    (torch.Size([100]), torch.Size([100, 25]))
    """

    def __init__(
        self,
        hist_edges: np.ndarray,
        unit_dim: int,
        *,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        sat_threshold: float | None = None,
        quantile_sample: int | None = 8192,
        generator: torch.Generator | None = None,
        fused: str | None = None,
    ) -> None:
        edges = np.asarray(hist_edges, dtype=np.float64)
        if (
            edges.ndim != 1
            or len(edges) < 2
            or not np.all(np.isfinite(edges))
            or not np.all(np.diff(edges) > 0)
            or not np.allclose(np.diff(edges), (edges[-1] - edges[0]) / (len(edges) - 1), rtol=1e-6)
        ):
            raise ValueError(
                f"hist_edges must be ≥ 2 finite, increasing, evenly spaced values "
                f"(e.g. numpy.linspace(low, high, bins + 1)), got {edges!r}"
            )
        q = np.asarray(quantiles, dtype=np.float64)
        if q.ndim != 1 or len(q) == 0 or np.any((q < 0) | (q > 1)) or np.any(np.isnan(q)):
            raise ValueError(f"quantiles must be a non-empty sequence in [0, 1], got {quantiles!r}")
        if quantile_sample is not None and (
            not isinstance(quantile_sample, int) or quantile_sample < 2
        ):
            raise ValueError(
                f"quantile_sample must be an int ≥ 2 or None (exact), got {quantile_sample!r}"
            )
        self.hist_edges = edges
        self.unit_dim = unit_dim
        # one array per distinct levels: folds compare them by identity first
        self.quantiles = _LEVELS.setdefault(tuple(q.tolist()), q)
        self.sat_threshold = sat_threshold
        self.quantile_sample = quantile_sample
        self.fused = fused
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._state: StatisticsState | None = None
        self._result: dict[str, torch.Tensor] | None = None
        self._rate = 1.0
        self._values: list[torch.Tensor] = []  # exact mode: copies as [positions, units]
        self._n_values = 0
        self._empty_calls = 0  # calls without values, not in the state or the values
        # (state, its quantile values) when a fold computed them with other objects' at once
        self._sorted_q: tuple[StatisticsState, torch.Tensor] | None = None

    @property
    def calls(self) -> int:
        """Number of tensors merged since the last reset."""
        state_calls = 0 if self._state is None else self._state.calls
        return state_calls + len(self._values) + self._empty_calls

    @property
    def state(self) -> StatisticsState | None:
        """The current mergeable state (``None`` before the first update)."""
        self._fold()
        return self._state

    def _fold(self) -> None:
        """Reduce the values kept in exact mode to a state (see :meth:`update`)."""
        if self._values:
            from icstools.functional.exact import fold_together  # (it imports this module)

            fold_together([self])

    def update(self, x: torch.Tensor) -> None:
        """Add the values of one tensor (one call of the module).

        While the pooled values of a unit number at most ``quantile_sample``, they are only
        copied (one cheap op; quantiles need them anyway) and reduced later, several sites at
        once, by :func:`compute_many`; beyond, each tensor is reduced on arrival.
        """
        n = x.numel() // max(x.shape[_unit_dim(x, self.unit_dim)], 1)
        cap = self.quantile_sample
        self._result = None
        if n and self._values and not self._n_values:
            # only calls without values so far: they count as calls, but must not decide the
            # sampling rate (a call without values changes no statistic)
            self._empty_calls += len(self._values)
            self._values = []
        if self._state is None and (cap is None or self._n_values + n <= cap):
            rows = _as_rows(x, self.unit_dim)  # [n, units], a copy
            if self._values and rows.shape[1] != self._values[0].shape[1]:
                raise ValueError(
                    f"a tensor with {rows.shape[1]} units arrived where earlier ones had "
                    f"{self._values[0].shape[1]} (shape {tuple(x.shape)}, unit_dim "
                    f"{self.unit_dim})"
                )
            self._values.append(rows)
            self._n_values += n
            return
        self._fold()
        if self._state is None:
            # The first call of a step fixes the sampling rate, so that later calls are sampled
            # in proportion to their size and the pooled sample stays uniform.
            self._rate = 1.0 if cap is None or n <= cap else cap / n
        new = summarize(
            x,
            self.unit_dim,
            hist_edges=self.hist_edges,
            sat_threshold=self.sat_threshold,
            sample_rate=self._rate,
            generator=self.generator,
            fused=self.fused,
        )
        if self._state is None:
            self._state = new
            return
        if new.mean.shape != self._state.mean.shape:
            raise ValueError(
                f"a tensor with {new.mean.shape[0]} units arrived where earlier ones had "
                f"{self._state.mean.shape[0]} (shape {tuple(x.shape)}, unit_dim {self.unit_dim})"
            )
        self._state = merge_states(self._state, new)
        self._bound_sample()

    def merge(self, other: ActivationStatistics) -> None:
        """Merge another object's state (e.g. another rank's) into this one.

        Quantile samples taken at different rates are thinned to the lower rate first, so the
        merged sample stays uniform over the pooled values.
        """
        self._fold()
        other._fold()
        self._empty_calls += other._empty_calls
        if other._state is None:
            return
        if not np.array_equal(other.hist_edges, self.hist_edges):
            raise ValueError("cannot merge statistics with different histogram edges")
        self._result = None
        if self._state is None:
            self._state, self._rate = other._state, other._rate
            return
        rate = min(self._rate, other._rate)
        mine = self._thin(self._state, rate / self._rate)
        theirs = self._thin(other._state, rate / other._rate)
        self._state, self._rate = merge_states(mine, theirs), rate
        self._bound_sample()

    def _thin(self, state: StatisticsState, keep: float) -> StatisticsState:
        """``state`` with each sample row kept with probability ``keep`` (exactly that share)."""
        if keep >= 1.0:
            return state
        m = state.sample.shape[0]
        rows = torch.randperm(m, generator=self.generator)[: round(m * keep)]
        rows = rows.to(state.sample.device, non_blocking=True)
        return state.replace(sample=state.sample[rows], sample_sorted=False)

    def _bound_sample(self) -> None:
        # Many small calls (an RNN cell, gradient accumulation) would let the pooled sample
        # grow without bound; past twice the cap, thin it and lower the rate for later calls.
        cap = self.quantile_sample
        state = self._state
        if cap is not None and state is not None and state.sample.shape[0] > 2 * cap:
            keep = cap / state.sample.shape[0]
            self._state = self._thin(state, keep)
            self._rate *= keep

    def rebin(self, hist_edges: np.ndarray) -> None:
        """Histogram the values seen so far on new edges (and later values too).

        The histogram is redone from the quantile sample, so every value must have been kept
        (``quantile_sample=None``, or no more values than it); used when several processes
        agree on the edges after their first values (:mod:`icstools.recording.distributed`).
        """
        self._fold()
        edges = np.asarray(hist_edges, dtype=np.float64)
        s = self._state
        if s is not None and s.total.numel():
            if s.sample.shape[0] != int(s.total[0]):
                raise ValueError(
                    f"rebin needs every value kept for the quantiles: {s.sample.shape[0]} of "
                    f"{int(s.total[0])} per unit were (set quantile_sample=None)"
                )
            finite = torch.where(torch.isfinite(s.sample), s.sample, math.nan)  # NaN: no bin
            self._state = s.replace(hist=_histogram(finite.reshape(-1), edges))
        self.hist_edges = edges
        self._result = None

    def to(self, device: torch.device | str) -> ActivationStatistics:
        """A shallow copy with its (folded) state on ``device``: e.g. the CPU, to send it to
        another process, which merges it with :meth:`merge`."""
        self._fold()
        out = copy.copy(self)
        out._values = []  # folded: empty, and not shared with this object's later values
        if self._state is not None:
            moved = {k: v.to(device) for k, v in self._state.fields().items()}
            out._state = self._state.replace(**moved)
        return out

    def reset(self) -> None:
        """Forget all values (the edges, quantiles and thresholds stay)."""
        self._state = None
        self._sorted_q = None
        self._result = None
        self._rate = 1.0
        self._values, self._n_values = [], 0
        self._empty_calls = 0

    @property
    def exact_on_host(self) -> bool:
        """Whether every value so far is kept (exact mode) as CPU float32 copies: then
        folding can wait, and the values of many records fold in one numpy pass
        (:func:`~icstools.functional.exact.finish_exact_many`)."""
        v = self._values
        return (
            self._state is None
            and self._n_values > 0
            and v[0].dtype == torch.float32
            and on_host(v[0].device)
        )

    @property
    def units(self) -> int | None:
        """Units of the values so far (``None`` before the first)."""
        if self._state is not None:
            return int(self._state.mean.shape[0])
        return int(self._values[0].shape[1]) if self._values else None

    @property
    def nbytes(self) -> int:
        """Bytes of the values kept in exact mode (not folded yet)."""
        return sum(v.nbytes for v in self._values)

    def take(self) -> ActivationStatistics:
        """Hand the values so far to a new object (returned) and start afresh: the record's
        state leaves, the settings (edges, levels, threshold, generator) stay shared.

        Examples
        --------
        >>> stats = ActivationStatistics(np.linspace(-3, 3, 7), 1)
        >>> stats.update(torch.randn(8, 3))
        >>> taken = stats.take()
        >>> taken.calls, stats.calls
        (1, 0)
        """
        taken = copy.copy(self)
        self._values, self._n_values, self._empty_calls = [], 0, 0
        self._state = self._result = self._sorted_q = None
        self._rate = 1.0
        return taken

    def compute(self) -> dict[str, torch.Tensor]:
        """Finish the statistics, as CPU tensors (one device-to-host transfer).

        Returns
        -------
        dict
            ``mean, var, skew, kurt, min, max, sat_frac, zero_frac, nonfinite``: ``[units]``;
            ``quantile_value``: ``[units, nq]``; ``hist``: ``[bins + 2]``; ``count`` (finite
            values, ``[units]``). Skewness is ``m3 / m2^1.5`` and kurtosis the excess
            ``m4 / m2² − 3`` (scipy's biased estimators); both NaN where the variance is zero
            or lost to rounding. Units without finite values are NaN everywhere but
            ``count`` (0) and ``nonfinite`` (1 if they had values, all non-finite; NaN if
            they had none). Moments are float64; min, max and quantiles keep the compute dtype.
        """
        return compute_many([self])[0]

    def _device_parts(self) -> dict[str, torch.Tensor]:
        """Every declared field of the state by name, still on the device; the sample as its
        quantile values (``[units, nq]``)."""
        self._fold()
        s = self._state
        if s is None:
            raise ValueError("compute() called before any update()")
        parts = s.fields()
        parts["sample"] = self._quantiles(s)
        return parts

    def _quantiles(self, s: StatisticsState) -> torch.Tensor:
        if self._sorted_q is not None and self._sorted_q[0] is s:
            return self._sorted_q[1]  # computed by the fold, for this very state
        sample = s.sample  # [m, units]
        cap = self.quantile_sample
        if cap is not None and sample.shape[0] > cap:
            keep = torch.randperm(sample.shape[0], generator=self.generator)[:cap]
            sample = sample[keep.to(sample.device, non_blocking=True)]
        if s.sample_sorted and sample.shape[0] == s.sample.shape[0] and sample.shape[0] > 0:
            # exact mode folded with numpy: columns ascending, all finite, equal counts, so
            # every unit interpolates at the same positions (numpy's linear method)
            from icstools.functional.exact import quantiles_of_sorted_columns

            return torch.from_numpy(quantiles_of_sorted_columns(sample.numpy(), self.quantiles))
        finite = torch.isfinite(sample)
        # Non-finite values sort last as +inf and are excluded by the per-unit count.
        rows = torch.where(finite, sample, math.inf).T.contiguous()  # [units, m]
        if on_host(rows.device):
            # numpy sorts short rows ~10x faster than torch on CPU, the radix kernel long
            # float32 rows ~2.5x faster than numpy; the order is the same.
            sorted_rows = torch.from_numpy(_kernels.sort_rows(rows.numpy()))
        else:
            sorted_rows = torch.sort(rows, dim=1).values
        q = torch.as_tensor(self.quantiles, dtype=sorted_rows.dtype, device=sorted_rows.device)
        return quantiles_from_sorted(sorted_rows, finite.sum(0), q)


def compute_many(stats: Sequence[ActivationStatistics]) -> list[dict[str, torch.Tensor]]:
    """:meth:`ActivationStatistics.compute` of several objects with one device-to-host transfer.

    Examples
    --------
    >>> a, b = (ActivationStatistics(np.linspace(-3, 3, 7), 1) for _ in range(2))
    >>> a.update(torch.randn(8, 3)); b.update(torch.randn(8, 5))
    >>> [r["mean"].shape[0] for r in compute_many([a, b])]
    [3, 5]
    """
    todo = [s for s in stats if s._result is None]
    parts = device_parts_many(todo)
    host = host_arrays({(i, k): t for i, p in enumerate(parts) for k, t in p.items()})
    results = finish_many(todo, [{k: host[(i, k)] for k in p} for i, p in enumerate(parts)])
    for s, r in zip(todo, results, strict=True):
        s._result = {k: torch.from_numpy(v) for k, v in r.items()}
    return [s._result for s in stats]  # type: ignore[misc]


def device_parts_many(stats: Sequence[ActivationStatistics]) -> list[dict[str, torch.Tensor]]:
    """The first half of :func:`compute_many`: every object's state folded, as device tensors
    (``{field: tensor}`` per object; quantile values under ``"sample"``). Nothing is read on
    the host, so a caller can move these with other tensors in one transfer
    (:func:`host_arrays`) and finish with :func:`~icstools.functional.final.finish_many`."""
    from icstools.functional.exact import fold_together  # (it imports this module)

    fold_together([s for s in stats if s._state is None and s._values])
    return [s._device_parts() for s in stats]


def on_host(device: torch.device) -> bool:
    """Whether tensors on ``device`` are host memory (CPU): numpy may read them, and reading a
    value is no device synchronisation. The one place that decides it (a test makes it say
    no, to run the accelerator paths on CPU and count their transfers)."""
    return device.type == "cpu"


def host_arrays(tensors: Mapping[Any, torch.Tensor]) -> dict[Any, np.ndarray]:
    """Numpy arrays of ``tensors`` with one device-to-host transfer per device: host tensors
    are read in place (their own dtype); the others are joined as float64 (integer counts are
    exact below 2**53), copied once, and split.

    Examples
    --------
    >>> out = host_arrays({"a": torch.ones(2), "b": torch.zeros((), dtype=torch.int64)})
    >>> out["a"].tolist(), out["b"].dtype
    ([1.0, 1.0], dtype('int64'))
    """
    out: dict[Any, np.ndarray] = {}
    by_device: dict[torch.device, list[Any]] = {}
    for key, t in tensors.items():
        if on_host(t.device):
            out[key] = t.detach().numpy()
        else:
            by_device.setdefault(t.device, []).append(key)
    for keys in by_device.values():
        ts = [tensors[k].detach() for k in keys]
        joined = torch.cat([t.reshape(-1).to(torch.float64) for t in ts])
        values, pos = joined.cpu().numpy(), 0  # the transfer
        for k, t in zip(keys, ts, strict=True):
            out[k] = values[pos : pos + t.numel()].reshape(t.shape)
            pos += t.numel()
    return out

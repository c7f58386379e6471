"""The recorder: hooks on any ``torch.nn.Module`` → per-unit statistics per step → run dataset.

Hooks live here and only here. They are attached by :meth:`Recorder.attach` (or ``with rec:``)
and removed by :meth:`Recorder.detach`, which ``__exit__`` calls in a ``finally`` block, so no
hook outlives the ``with`` block even when training raises.

Step bookkeeping. ``rec.step`` counts optimizer steps (an optimizer step post-hook, or
:meth:`Recorder.step_done` by hand). The record of step ``t`` describes the model with the
weights after ``t`` updates: the ``train`` source pools every training forward made at that
step (gradient accumulation and modules called several times are pooled; ``calls`` counts
them), the ``probe`` source evaluates the fixed probe batch once, right before the first
training forward of the step. A forward counts as training when the model is in train mode
and gradients are enabled; evaluation forwards (``model.eval()`` or ``torch.no_grad()``) are
never recorded as ``train``. A record is closed at the first training forward of a later step,
or by :meth:`Recorder.flush`, :meth:`Recorder.to_dataset` and leaving the ``with`` block.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from icstools import __version__
from icstools.functional.statistics import (
    DEFAULT_QUANTILES,
    ActivationStatistics,
    GradientStatistics,
    choose_hist_edges,
    compute_many,
)
from icstools.schedules import Schedule, as_schedule
from icstools.sites import (
    Selector,
    Site,
    default_unit_dim,
    find_tensor,
    layout_module,
    select_sites,
)
from icstools.store import BackgroundWriter, RunWriter, open_run

__all__ = ["SCHEMA_VERSION", "Recorder", "RecorderError"]

#: Version of the run-dataset layout (DESIGN.md §3) written in every run's attrs.
SCHEMA_VERSION = 1

SOURCES = ("train", "probe")
UNIT_STATS = ("mean", "var", "skew", "kurt", "min", "max", "sat_frac", "zero_frac", "nonfinite")
GRAD_UNIT_STATS = ("grad_unit_norm", "grad_mean", "grad_var")
JAC_STATS = (
    "jac_mean_sq",
    "jac_var_sq",
    "jac_log_std",
    "jac_max",
    "jac_min",
    "jac_frac_near_one",
)
PARAM_STATS = ("param_grad_norm", "param_norm", "update_norm", "update_ratio", "eff_lr")
_RESERVED = {
    *UNIT_STATS,
    *GRAD_UNIT_STATS,
    *PARAM_STATS,
    "quantile_value",
    "hist",
    "calls",
    "count",
    "step",
    "lr",
    "grad_norm",
    "skipped",
    "probe_sample",
    "ics_l2",
    "ics_cos",
    "ics_grad_norm",
    "landscape_loss",
    "landscape_grad_diff",
    "loss_variation",
    "beta_smoothness",
    "jac_sv",
    *JAC_STATS,
}


class RecorderError(ValueError):
    """A recorder used in a way it does not support (the message says how to fix it)."""


@dataclass(frozen=True)
class _VarSpec:
    """A per-step variable of the run beyond the activation statistics.

    ``dims`` include ``"step"``; ``shape`` is one record's shape (``dims`` without ``step``).
    """

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: Any = np.float32
    fill: Any = np.nan


class _Layout:
    """The static shape of a run, fixed at the first record: sites, their units, edges."""

    def __init__(
        self,
        sources: tuple[str, ...],
        sites: list[str],
        widths: dict[str, int],
        unit_dims: dict[str, int],
        edges: dict[str, np.ndarray],
        sat: dict[str, float | None],
        quantiles: np.ndarray,
        log_names: tuple[str, ...],
        extra_vars: dict[str, _VarSpec] | None = None,
        extra_coords: dict[str, Any] | None = None,
    ) -> None:
        self.sources = sources
        self.sites = sites
        self.widths = widths
        self.unit_dims = unit_dims
        self.edges = edges
        self.sat = sat
        self.quantiles = quantiles
        self.log_names = log_names
        self.offsets: dict[str, int] = {}
        offset = 0
        for name in self.sites:
            self.offsets[name] = offset
            offset += widths[name]
        self.n_units = offset
        self.n_bins = len(next(iter(edges.values()))) + 1  # bins + under/overflow
        # Further per-step variables (probe samples, gradients, spectra, …): name -> spec.
        self.extra_vars = dict(extra_vars or {})
        self.extra_coords = dict(extra_coords or {})

    def empty_record(self, step: int) -> dict[str, Any]:
        ns, nu, nsite = len(self.sources), self.n_units, len(self.sites)
        rec: dict[str, Any] = {"step": step}
        for name in UNIT_STATS:
            rec[name] = np.full((ns, nu), np.nan, np.float32)
        rec["count"] = np.zeros((ns, nu), np.int64)
        rec["quantile_value"] = np.full((ns, nu, len(self.quantiles)), np.nan, np.float32)
        rec["hist"] = np.zeros((ns, nsite, self.n_bins), np.int64)
        rec["calls"] = np.zeros((ns, nsite), np.int64)
        for name, spec in self.extra_vars.items():
            rec[name] = np.full(spec.shape, spec.fill, spec.dtype)
        return rec

    def static_coords(self) -> dict[str, Any]:
        unit_site = np.concatenate([[s] * self.widths[s] for s in self.sites]).astype(str)
        unit_index = np.concatenate([np.arange(self.widths[s]) for s in self.sites])
        return {
            "source": ("source", np.array(self.sources, dtype=str)),
            "unit": ("unit", np.arange(self.n_units, dtype=np.int64)),
            "unit_site": ("unit", unit_site),
            "unit_index": ("unit", unit_index.astype(np.int64)),
            "site": ("site", np.array(self.sites, dtype=str)),
            "quantile": ("quantile", self.quantiles.astype(np.float64)),
            "bin": ("bin", np.arange(self.n_bins, dtype=np.int64)),
            "hist_edges": (("site", "edge"), np.stack([self.edges[s] for s in self.sites])),
            "site_units": ("site", np.array([self.widths[s] for s in self.sites], np.int64)),
            "site_unit_dim": ("site", np.array([self.unit_dims[s] for s in self.sites], np.int64)),
            "sat_threshold": (
                "site",
                np.array([np.nan if self.sat[s] is None else self.sat[s] for s in self.sites]),
            ),
            **self.extra_coords,
        }

    def block(self, records: list[dict[str, Any]], attrs: dict[str, Any]) -> xr.Dataset:
        steps = np.array([r["step"] for r in records], dtype=np.int64)
        data: dict[str, Any] = {}
        for name in (*UNIT_STATS, "count"):
            data[name] = (("source", "step", "unit"), np.stack([r[name] for r in records], 1))
        data["quantile_value"] = (
            ("source", "step", "unit", "quantile"),
            np.stack([r["quantile_value"] for r in records], 1),
        )
        data["hist"] = (
            ("source", "step", "site", "bin"),
            np.stack([r["hist"] for r in records], 1),
        )
        data["calls"] = (("source", "step", "site"), np.stack([r["calls"] for r in records], 1))
        for name in ("loss", "lr", *self.log_names):
            data[name] = (("step",), np.array([r.get(name, np.nan) for r in records], np.float64))
        for name, spec in self.extra_vars.items():
            data[name] = (spec.dims, np.stack([r[name] for r in records], spec.dims.index("step")))
        coords = {"step": ("step", steps), **self.static_coords()}
        return xr.Dataset(data, coords=coords, attrs=attrs)


def _spectrum_stats(sv: np.ndarray) -> dict[str, float]:
    """Summaries of the pooled singular values ``sv [examples, n_sv]`` (DESIGN.md §4)."""
    if not np.isfinite(sv).all() or sv.size == 0:
        return dict.fromkeys(JAC_STATS, math.nan)
    sq = np.square(sv)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(sv)
    return {
        "jac_mean_sq": float(sq.mean()),
        "jac_var_sq": float(sq.var()),
        "jac_log_std": float(logs.std()) if np.isfinite(logs).all() else math.nan,
        "jac_max": float(sv.max()),
        "jac_min": float(sv.min()),
        "jac_frac_near_one": float(((sv >= 0.5) & (sv <= 2.0)).mean()),
    }


def _cuda_rng_states() -> list[torch.Tensor]:
    if not torch.cuda.is_initialized():
        return []
    return [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())]


def _to_host(tensors: dict[Any, torch.Tensor]) -> dict[Any, np.ndarray]:
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


class Recorder:
    """Record per-unit activation statistics of any PyTorch model during training.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it is not modified (hooks only).
    sites : selector, optional
        Which tensors to record (see :func:`icstools.sites.select_sites`): a module type,
        a name or glob (``"fc3"``, ``"features.*"``, ``"fc3:input"``), a predicate
        ``(name, module) -> bool``, or a list of these. Default: the inputs of all element-wise
        nonlinearities.
    role : {"input", "output"} or both, optional
        Role for selectors that don't name one (default ``"input"`` for ``sites=None``, else
        ``"output"``).
    every : int or callable
        Schedule in optimizer steps: every N steps, or any ``step -> bool``
        (see :mod:`icstools.schedules`).
    optimizer : torch.optim.Optimizer, optional
        Steps are counted by a post-hook on its ``step()``; its first parameter group's learning
        rate is recorded as ``lr``. Without one, call :meth:`step_done` after each update.
    probe : tensor, tuple of positional args, or dict of keyword args, optional
        A fixed batch evaluated at each recorded step (source ``probe``), with no effect on
        training: no gradient, buffers (BN running statistics) restored, RNG state and module
        modes restored.
    probe_mode : {"train", "eval"}
        Mode of the probe forward: ``"train"`` (BN normalizes with the probe batch's own
        statistics, as the network computes during training) or ``"eval"`` (running statistics).
    probe_sample : int, optional
        Also keep up to this many raw probe values per unit at each record, as
        ``probe_sample (step, sample, unit)``, for exact sample-based drift metrics
        (:mod:`icstools.analysis.drift`). The positions (probe example, and pixel for
        convolutions) are
        drawn once, uniformly without replacement, and kept for the whole run, so sample ``i``
        of a unit is the same input at every step. The length is the smallest number of
        positions of any site, capped at ``probe_sample``. With a site called several times
        per forward, the values of its first call are kept. ``None`` (default): not kept.
    path : str or Path, optional
        Zarr store to stream the run to. Without it everything stays in memory.
    overwrite : bool
        Replace an existing store at ``path``.
    quantiles : sequence of float
        Levels of ``quantile_value`` (default: the paper's 0.15/0.5/0.85 on a 5% grid + 1%/99%).
    bins : int
        Bins of the per-site histogram (plus an underflow and an overflow bin).
    hist_range : (float, float) or dict, optional
        Histogram range for all sites, or per site-name glob; default: the first recorded
        values' range, widened by 25% on each side.
    saturation : dict, optional
        ``|x|`` thresholds of ``sat_frac`` per site-name glob; defaults to 4.585 for sigmoid
        inputs and 2.993 for tanh inputs (derivative below 0.01), none elsewhere.
    unit_dim : int or dict, optional
        Dimension holding units, for all sites or per site-name glob; default: last for
        ``[batch, (time,) features]``, 1 for ``[N, C, H, (W)]``, and 1 for 3-D tensors of
        convolution-like modules (for a nonlinearity: of the module defined just before it,
        see :func:`icstools.sites.layout_module`).
    calls : {"pool", "separate"}
        A module called several times per forward (shared weights, an RNN cell): ``"pool"``
        records all its calls as one distribution (``calls`` counts them); ``"separate"``
        records its k-th call of each forward as site ``"<site>#k"`` (the calls made in the
        first record fix which exist; later extra calls are not recorded).
    quantile_sample : int or None
        Values per unit kept for exact quantiles per step; beyond it a uniform random sample of
        that size is used (see :mod:`icstools.functional.statistics`). ``None``: always exact.
    chunk_steps : int
        Records buffered and written per Zarr chunk along ``step``.
    flush_seconds : float
        Also write buffered records when this much time has passed since the last write, so a
        crash loses at most that much.
    seed : int
        Seed of the recorder's own generator (quantile sampling); never touches the global RNG.
    gradients : bool
        Also record, at the recorder's schedule, the backward half (DESIGN.md §3):

        * activation gradients ``dL/dx`` of every site (train source), taken with a tensor
          hook registered on the site tensor by the forward hook (so in-place ops after the
          site, residual adds and repeated calls work; a site tensor that needs no gradient
          gets NaN): ``grad_norm (step, site)`` (Euclidean norm over all values and calls),
          and per unit ``grad_unit_norm``, ``grad_mean``, ``grad_var (step, unit)``;
        * parameter dynamics per parameter tensor of the optimizer (needs ``optimizer``),
          from optimizer step pre/post hooks, so any ``torch.optim`` optimizer works:
          ``param_grad_norm`` (``‖p.grad‖`` as the optimizer sees it), ``param_norm``
          (``‖w‖`` before the update), ``update_norm`` (``‖Δw‖`` of the step actually taken,
          momentum and weight decay included) and ``update_ratio`` = update_norm / param_norm
          ``(step, param)``; and ``eff_lr`` = lr / ‖w‖² for weights whose output is normalized
          next (the next module run is a BatchNorm/LayerNorm/GroupNorm/InstanceNorm), the
          quantity that matters under scale invariance (paper §3.3); NaN elsewhere.

        The gradient is that of whatever the training loop back-propagates (e.g. a batch mean).
    ics : int or callable, optional
        Schedule (every N steps, or ``step -> bool``) of gradient-based ICS (Santurkar et al.
        2018, Def. 2.1; :func:`icstools.functional.gradients.gradient_ics`), taken at recorded
        steps it
        selects: per layer with weights (execution order), ``ics_l2``, ``ics_cos``,
        ``ics_grad_norm`` (‖G‖) ``(step, layer)``, computed on the step's own batch (the last
        training forward's inputs, and the target given with :meth:`set_target`) with this
        step's actual updates, from the optimizer's step hooks. Needs ``optimizer`` and
        ``loss_fn``. It costs about one forward/backward per layer and has no effect on
        training (parameters, optimizer state, buffers and RNG are untouched).
    landscape : int or callable, optional
        Schedule of loss-landscape probes along the gradient (Santurkar et al. 2018, §3;
        :func:`icstools.functional.gradients.landscape_probe`) at recorded steps it selects,
        before the
        update, on the step's batch with BN in train mode: ``landscape_loss (step, eta)``
        (``L(w − ηg)``), ``landscape_grad_diff (step, eta)`` (gradient predictiveness),
        ``loss_variation`` and ``beta_smoothness (step)``; ``eta`` holds the multipliers of
        the learning rate (``landscape_multipliers``). Needs ``optimizer`` and ``loss_fn``.
    jacobian : int or callable, optional
        Schedule of Jacobian spectra (:mod:`icstools.functional.jacobians`) at recorded steps
        it selects,
        computed right after the probe forward on the first ``jacobian_examples`` probe
        examples (which form the batch whose statistics a train-mode BN uses), with the
        recorder's hooks silent. Stored as ``jac_sv (step, block, sv)``: the singular values of
        the per-example Jacobians of all those examples pooled, descending (NaN-padded to the
        largest block), and summaries over them ``(step, block)``: ``jac_mean_sq`` (mean σ²),
        ``jac_var_sq`` (variance of σ²), ``jac_log_std``, ``jac_max``, ``jac_min`` and
        ``jac_frac_near_one`` (share of σ in [0.5, 2]). Needs ``probe``.
    jacobian_blocks : "segments", list or dict, optional
        The blocks: ``"segments"`` (default) the maps between consecutive recorded sites
        (named ``"<site>-><next site>"``: with the default sites, from one nonlinearity's
        input to the next one's, the transformation of the paper's §3.3 conjecture) plus the
        whole network (``"input->output"``); or a list of ``(from_site, to_site)`` pairs
        (``"input"``/``"output"`` for the model's own), or a dict name → pair.
    jacobian_examples : int
        Probe examples used for spectra (default 64).
    jacobian_k : int, optional
        Singular values per example for blocks with more than 512 (``None``: all of them up
        to 512, the 8 largest beyond, matrix-free).
    jacobian_bn : {"fixed", "full"}
        Train-mode BatchNorm: batch statistics held fixed, or the full per-example block of
        the batch map (see :mod:`icstools.functional.jacobians`).
    loss_fn : callable, optional
        ``loss_fn(output, target) -> scalar``, the training loss, for ``ics`` and
        ``landscape``.
    landscape_multipliers : sequence of float
        Step sizes of the landscape probes in units of the current learning rate.
    scaler : torch.amp.GradScaler, optional
        With AMP: activation gradients are divided by the loss scale of their step, parameter
        gradients are read after the scaler unscaled them; iterations the scaler skips
        (non-finite gradients) are dropped from the record and counted in ``skipped (step)``,
        not recorded as zero updates. Reading the scale syncs once per recorded step.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with Recorder(model, nn.Sigmoid, role="input", every=2, optimizer=opt) as rec:
    ...     for _ in range(4):
    ...         loss = model(torch.randn(16, 4)).pow(2).mean()
    ...         opt.zero_grad(); loss.backward(); opt.step()
    ...         rec.log(loss=loss)
    >>> ds = rec.to_dataset()
    >>> ds["mean"].dims, ds.sizes["step"], list(ds.site.values)
    (('source', 'step', 'unit'), 2, ['1:input'])
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Selector = None,
        *,
        role: str | Sequence[str] | None = None,
        every: int | Schedule = 1,
        optimizer: torch.optim.Optimizer | None = None,
        probe: Any = None,
        probe_mode: str = "train",
        probe_sample: int | None = None,
        path: str | Path | None = None,
        overwrite: bool = False,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        bins: int = 64,
        hist_range: tuple[float, float] | dict[str, tuple[float, float]] | None = None,
        saturation: dict[str, float] | None = None,
        unit_dim: int | dict[str, int] | None = None,
        quantile_sample: int | None = 8192,
        calls: str = "pool",
        chunk_steps: int = 64,
        flush_seconds: float = 30.0,
        seed: int = 0,
        gradients: bool = False,
        ics: int | Schedule | None = None,
        landscape: int | Schedule | None = None,
        jacobian: int | Schedule | None = None,
        jacobian_blocks: Any = "segments",
        jacobian_examples: int = 64,
        jacobian_k: int | None = None,
        jacobian_bn: str = "fixed",
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        landscape_multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
        scaler: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if calls not in ("pool", "separate"):
            raise ValueError(f"calls must be 'pool' or 'separate', got {calls!r}")
        if probe_mode not in ("train", "eval"):
            raise ValueError(f"probe_mode must be 'train' or 'eval', got {probe_mode!r}")
        if probe is not None and find_tensor(probe) is None:
            raise TypeError(
                "probe must be a tensor, a tuple of positional arguments or a dict of keyword "
                f"arguments holding at least one floating-point tensor, got {type(probe).__name__}"
            )
        if probe_sample is not None:
            if isinstance(probe_sample, bool) or not isinstance(probe_sample, int):
                raise TypeError(f"probe_sample must be an int or None, got {probe_sample!r}")
            if probe_sample < 1:
                raise ValueError(f"probe_sample must be ≥ 1, got {probe_sample}")
            if probe is None:
                raise RecorderError("probe_sample needs a probe batch (probe=...)")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be an int ≥ 1, got {bins!r}")
        if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int) or chunk_steps < 2:
            raise ValueError(
                f"chunk_steps must be an int ≥ 2 (a chunk of 1 step is slow), got {chunk_steps!r}"
            )
        if not isinstance(gradients, bool):
            raise TypeError(f"gradients must be True or False, got {gradients!r}")
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if (ics is not None or landscape is not None) and loss_fn is None:
            raise RecorderError(
                "ics= and landscape= need loss_fn= (loss_fn(output, target) -> scalar, to "
                "recompute the loss) and optimizer= (their hooks see the step's update)"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        multipliers = np.asarray(landscape_multipliers, dtype=np.float64).reshape(-1)
        if multipliers.size == 0 or not (np.isfinite(multipliers) & (multipliers > 0)).all():
            raise ValueError(
                "landscape_multipliers must be finite numbers > 0, got "
                f"{list(landscape_multipliers)!r}"
            )
        if jacobian is not None and probe is None:
            raise RecorderError(
                "jacobian= needs a probe batch (probe=...): spectra are taken on it"
            )
        if isinstance(jacobian_examples, bool) or not isinstance(jacobian_examples, int):
            raise TypeError(f"jacobian_examples must be an int, got {jacobian_examples!r}")
        if jacobian_examples < 1:
            raise ValueError(f"jacobian_examples must be ≥ 1, got {jacobian_examples}")
        if jacobian_bn not in ("fixed", "full"):
            raise ValueError(f"jacobian_bn must be 'fixed' or 'full', got {jacobian_bn!r}")
        if jacobian_k is not None and (
            isinstance(jacobian_k, bool) or not isinstance(jacobian_k, int) or jacobian_k < 1
        ):
            raise ValueError(f"jacobian_k must be an int ≥ 1 or None, got {jacobian_k!r}")
        if not flush_seconds > 0:
            raise ValueError(f"flush_seconds must be > 0, got {flush_seconds!r}")
        self.model = model
        self.sites: list[Site] = select_sites(model, sites, role)
        self.schedule: Schedule = as_schedule(every)
        self.optimizer = optimizer
        self.probe = probe
        self.probe_mode = probe_mode
        self.probe_sample = probe_sample
        self.path = None if path is None else Path(path)
        self.quantiles = np.asarray(quantiles, dtype=np.float64)
        self.bins = bins
        self.quantile_sample = quantile_sample
        self.calls = calls
        self.chunk_steps = chunk_steps
        self.flush_seconds = float(flush_seconds)
        self.seed = int(seed)
        self.gradients = gradients
        self.scaler = scaler
        self.ics_schedule = None if ics is None else as_schedule(ics)
        self.landscape_schedule = None if landscape is None else as_schedule(landscape)
        self.loss_fn = loss_fn
        self.jacobian_schedule = None if jacobian is None else as_schedule(jacobian)
        self.jacobian_examples = jacobian_examples
        self.jacobian_k = jacobian_k
        self.jacobian_bn = jacobian_bn
        self._jac_blocks = (
            None if jacobian is None else self._parse_blocks(jacobian_blocks)
        )  # name -> (from_site, to_site)
        self._jac_out: dict[str, np.ndarray] | None = None
        self.landscape_multipliers = multipliers
        self._hist_range = hist_range
        self._saturation = dict(saturation or {})
        self._unit_dim = unit_dim
        self._modules = dict(model.named_modules())
        # Validate the options now (not at the first hook call) by resolving them once per site.
        self._site_sat = {s.name: self._site_saturation(s) for s in self.sites}
        for s in self.sites:
            self._site_option(self._unit_dim, s.name, "unit_dim", int)
            rng = self._site_option(self._hist_range, s.name, "hist_range", tuple)
            if rng is not None and not (len(rng) == 2 and float(rng[0]) < float(rng[1])):
                raise ValueError(
                    f"hist_range for {s.name} must be (low, high) with low < high, got {rng!r}"
                )
        ActivationStatistics(
            np.linspace(0, 1, 2), 0, quantiles=self.quantiles, quantile_sample=quantile_sample
        )  # validates quantile options

        self.step = 0  # optimizer steps completed
        self.diverged_step: int | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._site_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._collect: str | None = None  # source being recorded by the hooks, or None
        self._in_probe = False
        self._pending: int | None = None  # step of the open record
        self._pending_logs: dict[str, Any] = {}
        self._last_forward_step: int | None = None
        self._stats: dict[tuple[str, str], ActivationStatistics] = {}
        self._edges: dict[str, np.ndarray] = {}
        self._unit_dims: dict[str, int] = {}
        self._base_site: dict[str, str] = {}  # record site name -> selected site name
        self._call_index: dict[tuple[str | None, str], int] = {}  # calls="separate"
        self._layout: _Layout | None = None
        # the backward half (gradients=True)
        self._grad_stats: dict[str, GradientStatistics] = {}
        self._scale: float | None = None  # loss scale of the current step's backward (AMP)
        self._skipped = 0  # iterations of the open record skipped by the scaler
        self._params: list[tuple[str, torch.Tensor, dict]] = []  # (name, tensor, param group)
        self._normalized: set[str] = set()  # weights whose output a norm layer takes next
        self._param_before: list[torch.Tensor] | None = None
        self._param_out: dict[str, torch.Tensor] = {}  # this record's per-param results
        self._batch: tuple[tuple, dict] | None = None  # inputs of the step's last training forward
        self._batch_rng: tuple[torch.Tensor, list] | None = None
        self._target: Any = None
        self._target_step: int | None = None
        self._ics_before: dict[str, torch.Tensor] | None = None
        self._ics_layers: list | None = None
        self._ics_out: dict[str, np.ndarray] = {}
        self._order: list[str] = []
        self._order_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._sample_pos: dict[str, tuple[torch.Tensor, int]] = {}  # site -> positions [m], of n
        self._sample_vals: dict[str, torch.Tensor] = {}  # site -> values of this record [m, units]
        self._records: list[dict[str, Any]] = []  # in memory (no path) or buffered for the store
        self._n_records = 0
        self._last_write = time.monotonic()
        self._writer: BackgroundWriter | None = None
        if self.path is not None:
            self._writer = BackgroundWriter(
                RunWriter(self.path, chunk_steps=chunk_steps, overwrite=overwrite)
            )

    # ----------------------------------------------------------------- options per site
    @staticmethod
    def _site_option(option: Any, site: str, what: str, kind: type) -> Any:
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

    def _site_saturation(self, site: Site) -> float | None:
        value = self._site_option(self._saturation, site.name, "saturation", float)
        if value is None:
            return site.default_saturation(self._modules[site.module_name])
        if not float(value) > 0:
            raise ValueError(f"saturation threshold for {site.name} must be > 0, got {value!r}")
        return float(value)

    # ----------------------------------------------------------------- hooks
    def attach(self) -> Recorder:
        """Register the hooks (``with rec:`` does this and :meth:`detach` on exit).

        Only the model's own forward hooks and the optimizer hook stay registered; the sites'
        hooks are added when a scheduled training forward starts and removed when it ends, so
        unscheduled steps run without them (PyTorch's hook dispatch alone costs a few percent
        of a small model's step).
        """
        if self._handles:
            raise RecorderError("this recorder is already attached; use one `with rec:` at a time")
        if (self.ics_schedule or self.landscape_schedule) and self.optimizer is None:
            raise RecorderError(
                "ics= and landscape= need optimizer=: their hooks see the step's actual update"
            )
        try:
            root = self.model
            self._handles.append(
                root.register_forward_pre_hook(self._on_forward_start, with_kwargs=True)
            )
            self._handles.append(root.register_forward_hook(self._on_forward_end, always_call=True))
            if self.optimizer is not None:
                if self.gradients or self.ics_schedule or self.landscape_schedule:
                    self._handles.append(
                        self.optimizer.register_step_pre_hook(self._on_opt_step_start)
                    )
                self._handles.append(self.optimizer.register_step_post_hook(self._on_opt_step))
        except BaseException:
            self.detach()
            raise
        return self

    def _arm(self) -> None:
        """Register the site hooks (for one scheduled forward, and the probe's)."""
        if self._site_handles:
            return
        for site in self.sites:
            module = self._modules[site.module_name]
            if site.role == "input":
                hook = self._make_input_hook(site, module)
                self._site_handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                hook = self._make_output_hook(site, module)
                self._site_handles.append(module.register_forward_hook(hook))

    def _disarm(self) -> None:
        handles, self._site_handles = self._site_handles, []
        for h in handles:
            h.remove()

    def detach(self) -> None:
        """Remove every hook this recorder registered (safe to call twice)."""
        self._disarm()
        for h in self._order_handles:
            h.remove()
        self._order_handles = []
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        self._collect = None

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def __enter__(self) -> Recorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        try:
            self.detach()
        finally:
            self.close()

    def _make_input_hook(self, site: Site, module: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._collect is not None:
                self._observe(site, module, find_tensor(args) if args else find_tensor(kwargs))

        return hook

    def _make_output_hook(self, site: Site, module: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, output: object) -> None:
            if self._collect is not None:
                self._observe(site, module, find_tensor(output))

        return hook

    def _on_forward_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._in_probe:
            return
        if not (module.training and torch.is_grad_enabled()):
            self._collect = None  # evaluation forwards are not training data
            self._disarm()
            return
        step = self.step
        self._last_forward_step = step
        if self._pending is not None and self._pending != step:
            self._close_record()
        if not self.schedule(step):
            self._collect = None
            self._disarm()
            return
        if self.scaler is not None:
            scale = float(self.scaler.get_scale())  # one sync per recorded forward
            if self._pending == step and self._scale is not None and scale < self._scale:
                # The scale fell: the scaler skipped this step's previous iteration (non-finite
                # gradients) without an optimizer step. Drop its data, count it.
                self._discard_train()
                self._skipped += 1
            self._scale = scale
        self._arm()
        if self._pending is None:
            self._pending = step
            if self.probe is not None:
                self._call_index.clear()
                self._run_probe()
                if self.jacobian_schedule is not None and self.jacobian_schedule(step):
                    self._run_jacobian()
        self._call_index.clear()
        self._collect = "train"
        if self._wants_batch(step):  # keep references (no copies) to the step's batch
            self._batch = (args, dict(kwargs))
            # and the RNG state the forward starts from: recomputations use the same dropout
            self._batch_rng = (torch.get_rng_state(), _cuda_rng_states())
        if self.gradients and self._layout is None and not self._normalized:
            self._watch_module_order()

    def _on_forward_end(self, module: nn.Module, args: tuple, output: object) -> None:
        if not self._in_probe:
            self._collect = None
            self._disarm()
            if self._order_handles:
                self._unwatch_module_order()

    def _on_opt_step_start(
        self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict
    ) -> None:
        if self._pending != self.step or self._in_probe:
            return  # not a recorded step
        step = self.step
        if self.ics_schedule is not None and self._ics_layers is None and self._batch is not None:
            self._find_layers()  # fixes the run's `layer` dimension at the first record
        if self.landscape_schedule is not None and self.landscape_schedule(step):
            self._run_landscape(step)
        if self.ics_schedule is not None and self.ics_schedule(step):
            self._ics_before = {
                n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
            }
        if not self.gradients:
            return
        if not self._params:
            self._params = self._optimizer_params()
        tensors = [p for _, p, _ in self._params]
        with torch.no_grad():
            grads = [
                p.grad.detach().norm() if p.grad is not None else p.new_full((), math.nan)
                for p in tensors
            ]
            self._param_out["param_grad_norm"] = torch.stack([g.double() for g in grads])
            self._param_out["param_norm"] = torch.stack(
                [p.detach().norm().double() for p in tensors]
            )
            self._param_before = [p.detach().clone() for p in tensors]

    def _on_opt_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._ics_before is not None:
            try:
                self._run_ics(self.step)
            finally:
                self._ics_before = None
        before, self._param_before = self._param_before, None
        if before is not None:
            tensors = [p for _, p, _ in self._params]
            with torch.no_grad():
                upd = torch.stack(
                    [(p.detach() - b).norm().double() for p, b in zip(tensors, before, strict=True)]
                )
            self._param_out["update_norm"] = upd
            lr = torch.tensor([float(g.get("lr", math.nan)) for _, _, g in self._params])
            self._param_out["lr"] = lr.double()
        self.step += 1

    # ----------------------------------------------------------------- ICS and landscape
    def set_target(self, target: Any) -> None:
        """Give the recorder the target of this step's batch (for ``ics`` and ``landscape``).

        Call it in every step before ``optimizer.step()`` (it only keeps a reference). The
        inputs are taken from the model's last training forward of the step; ``loss_fn(output,
        target)`` recomputes the loss.

        Examples
        --------
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> rec = Recorder(model, every=1, optimizer=opt, ics=1,
        ...                loss_fn=nn.functional.cross_entropy)
        >>> with rec:
        ...     x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     rec.set_target(y); opt.zero_grad(); loss.backward(); opt.step()
        >>> rec.to_dataset()["ics_cos"].sel(layer="0").item()
        1.0
        """
        self._target = target
        self._target_step = self.step

    def _wants_batch(self, step: int) -> bool:
        return bool(
            (
                self.ics_schedule is not None
                and (self._ics_layers is None or self.ics_schedule(step))
            )
            or (self.landscape_schedule is not None and self.landscape_schedule(step))
        )

    def _step_batch(self, step: int, what: str) -> tuple[tuple, dict, Any]:
        if self._batch is None:
            raise RecorderError(f"{what} at step {step}: no training forward was seen in this step")
        if self._target_step != step:
            raise RecorderError(
                f"{what} at step {step} needs this step's target: call rec.set_target(y) before "
                "optimizer.step() in every step"
            )
        args, kwargs = self._batch
        return args, kwargs, self._target

    def _model_inputs(self, args: tuple, kwargs: dict) -> Any:
        if kwargs and not args:
            return kwargs
        if kwargs:
            raise RecorderError(
                "ics/landscape need a model called with positional or keyword arguments, not both"
            )
        return args[0] if len(args) == 1 else tuple(args)

    def _run_landscape(self, step: int) -> None:
        from icstools.functional.gradients import landscape_probe

        args, kwargs, target = self._step_batch(step, "landscape")
        lr = float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else 0.0
        self._in_probe = True
        try:
            with self._training_rng():
                probe = landscape_probe(
                    self.model,
                    self.loss_fn,
                    self._model_inputs(args, kwargs),
                    target,
                    lr,
                    tuple(self.landscape_multipliers.tolist()),
                )
        finally:
            self._in_probe = False
        self._ics_out["landscape_loss"] = probe.losses
        self._ics_out["landscape_grad_diff"] = probe.grad_diff
        self._ics_out["loss_variation"] = np.float64(probe.loss_variation)
        self._ics_out["beta_smoothness"] = np.float64(probe.beta_smoothness)

    @contextlib.contextmanager
    def _training_rng(self) -> Iterator[None]:
        """Run with the RNG state the step's training forward started from (same dropout
        masks), and give the caller's state back after."""
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            if self._batch_rng is not None:
                cpu, cuda_states = self._batch_rng
                torch.set_rng_state(cpu)
                for d, state in enumerate(cuda_states):
                    torch.cuda.set_rng_state(state, d)
            yield

    def _find_layers(self) -> None:
        from icstools.functional.gradients import parameter_layers

        if self._batch is None:
            return
        args, kwargs = self._batch
        self._in_probe = True
        try:
            self._ics_layers = parameter_layers(self.model, self._model_inputs(args, kwargs))
        finally:
            self._in_probe = False

    def _run_ics(self, step: int) -> None:
        from icstools.functional.gradients import gradient_ics

        args, kwargs, target = self._step_batch(step, "ics")
        inputs = self._model_inputs(args, kwargs)
        before = self._ics_before
        after = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        self._in_probe = True
        try:
            with self._training_rng():
                out = gradient_ics(
                    self.model,
                    self.loss_fn,
                    inputs,
                    target,
                    after,
                    self._ics_layers,
                    current=before,
                )
        finally:
            self._in_probe = False
        self._ics_out["ics_l2"] = out.ics_l2
        self._ics_out["ics_cos"] = out.ics_cos
        self._ics_out["ics_grad_norm"] = out.grad_norm

    def _optimizer_params(self) -> list[tuple[str, torch.Tensor, dict]]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        out, seen = [], set()
        for group in self.optimizer.param_groups if self.optimizer is not None else []:
            for p in group["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                out.append((names.get(id(p), f"param_{len(out)}"), p, group))
        return out

    def _watch_module_order(self) -> None:
        """For one forward, note the order in which leaf modules run (for ``eff_lr``)."""
        order: list[str] = []
        self._order = order
        for n, m in self.model.named_modules():
            if not list(m.children()):
                self._order_handles.append(
                    m.register_forward_pre_hook(lambda mod, a, n=n: order.append(n))
                )

    def _unwatch_module_order(self) -> None:
        handles, self._order_handles = self._order_handles, []
        for h in handles:
            h.remove()
        if not self._order:
            return
        norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
        for this, nxt in zip(self._order, self._order[1:], strict=False):
            module = self._modules[this]
            if isinstance(getattr(module, "weight", None), nn.Parameter) and isinstance(
                self._modules[nxt], norm_types
            ):
                self._normalized.add(f"{this}.weight" if this else "weight")
        self._order = []

    def step_done(self) -> None:
        """Count one optimizer step by hand (only when no optimizer was given).

        Examples
        --------
        >>> rec = Recorder(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        >>> rec.step_done(); rec.step
        1
        """
        if self.optimizer is not None:
            raise RecorderError(
                "steps are already counted by the optimizer given to the Recorder; "
                "step_done() would count them twice"
            )
        self.step += 1

    def _observe(self, site: Site, module: nn.Module, x: torch.Tensor | None) -> None:
        if x is None:
            return
        name = site.name
        if self.calls == "separate":  # the k-th call of a forward is site "<name>#k"
            k = self._call_index.get((self._collect, name), 0)
            self._call_index[(self._collect, name)] = k + 1
            name = f"{name}#{k}"
        if self._layout is not None and name not in self._layout.widths:
            return  # not called at the first record, so not in the run's layout
        key = (self._collect, name)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._new_stats(site, module, x, key)
        stats.update(x)
        if self.probe_sample is not None and self._collect == "probe":
            self._keep_sample(name, x)
        if self.gradients and self._collect == "train" and x.requires_grad:
            # dL/dx of this very tensor (its value here, before any in-place op after the site)
            x.register_hook(self._make_grad_hook(name))

    def _make_grad_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        unit_dim = self._unit_dims[name]

        def hook(g: torch.Tensor) -> None:
            stats = self._grad_stats.get(name)
            if stats is None:
                stats = self._grad_stats[name] = GradientStatistics(unit_dim)
            stats.update(g)

        return hook

    def _discard_train(self) -> None:
        """Forget the train-source data of the open record (a scaler-skipped iteration)."""
        for (source, _), stats in self._stats.items():
            if source == "train":
                stats.reset()
        for gs in self._grad_stats.values():
            gs.reset()
        self._param_out = {}
        self._param_before = None

    def _keep_sample(self, name: str, x: torch.Tensor) -> None:
        if name in self._sample_vals:
            return  # a later call of the site in the same probe forward
        rows = x.detach().movedim(self._unit_dims[name], -1)
        rows = rows.reshape(-1, rows.shape[-1])  # [positions, units]
        if name not in self._sample_pos:
            gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/sample/{name}".encode()))
            pos = torch.randperm(rows.shape[0], generator=gen)[: self.probe_sample]
            self._sample_pos[name] = (pos.to(rows.device), rows.shape[0])
        pos, n_rows = self._sample_pos[name]
        if rows.shape[0] != n_rows:  # checked on the host: no device sync
            raise RecorderError(
                f"site {name} has {rows.shape[0]} probe positions now but {n_rows} at the first "
                "record; the probe batch must keep its shape"
            )
        self._sample_vals[name] = rows.index_select(0, pos).float()  # [m, units], a copy

    def _new_stats(
        self, site: Site, module: nn.Module, x: torch.Tensor, key: tuple[str, str]
    ) -> ActivationStatistics:
        name = key[1]  # the site, or "<site>#k" for its k-th call with calls="separate"
        self._base_site[name] = site.name
        if name not in self._unit_dims:
            ud = self._site_option(self._unit_dim, site.name, "unit_dim", int)
            if ud is None:
                ud = default_unit_dim(layout_module(self.model, site), x)
            self._unit_dims[name] = int(ud)
        if name not in self._edges:
            rng = self._site_option(self._hist_range, site.name, "hist_range", tuple)
            if rng is None:
                self._edges[name] = choose_hist_edges(x, self.bins)
            else:
                self._edges[name] = np.linspace(float(rng[0]), float(rng[1]), self.bins + 1)
        seed = zlib.crc32(f"{self.seed}/{key[0]}/{name}".encode())
        stats = ActivationStatistics(
            self._edges[name],
            self._unit_dims[name],
            quantiles=self.quantiles,
            sat_threshold=self._site_sat[site.name],
            quantile_sample=self.quantile_sample,
            generator=torch.Generator().manual_seed(seed),
        )
        self._stats[key] = stats
        return stats

    def _run_probe(self) -> None:
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        self._in_probe, self._collect = True, "probe"
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                if self.probe_mode == "eval":
                    model.eval()
                if isinstance(self.probe, dict):
                    model(**self.probe)
                elif isinstance(self.probe, (tuple, list)):
                    model(*self.probe)
                else:
                    model(self.probe)
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, training in modes:
                m.training = training
            self._in_probe, self._collect = False, None

    # ----------------------------------------------------------------- Jacobian spectra
    def _parse_blocks(self, blocks: Any) -> dict[str, tuple[str, str]]:
        names = [s.name for s in self.sites]
        if isinstance(blocks, str):
            if blocks != "segments":
                raise ValueError(
                    f"jacobian_blocks must be 'segments', a list of (from_site, to_site) or a "
                    f"dict name -> (from_site, to_site), got {blocks!r}"
                )
            pairs = {f"{a}->{b}": (a, b) for a, b in itertools.pairwise(names)}
            pairs["input->output"] = ("input", "output")
            return pairs
        if isinstance(blocks, dict):
            items = list(blocks.items())
        elif isinstance(blocks, (list, tuple)):
            items = [(f"{a}->{b}", (a, b)) for a, b in blocks]
        else:
            raise TypeError(
                "jacobian_blocks must be 'segments', a list of (from_site, to_site) or a dict "
                f"name -> (from_site, to_site), got {type(blocks).__name__}"
            )
        out = {}
        for name, pair in items:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"block {name!r} must be (from_site, to_site), got {pair!r}")
            out[str(name)] = (str(pair[0]), str(pair[1]))
        return out

    def _probe_head(self) -> Any:
        n = self.jacobian_examples
        if isinstance(self.probe, dict):
            return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in self.probe.items()}
        if isinstance(self.probe, (tuple, list)):
            return tuple(v[:n] if isinstance(v, torch.Tensor) else v for v in self.probe)
        return self.probe[:n]

    def _run_jacobian(self) -> None:
        """Spectra of every block on the first probe examples; the hooks stay silent."""
        from icstools.functional.jacobians import jacobian_spectrum, segment, whole

        if self._jac_blocks is None:
            return
        example = self._probe_head()
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        out: dict[str, np.ndarray] = {}  # block -> [examples, n_sv]
        self._in_probe, self._collect = True, None
        try:
            with torch.random.fork_rng(devices=cuda):
                if self.probe_mode == "eval":
                    model.eval()
                for name, (a, b) in self._jac_blocks.items():
                    if (a, b) == ("input", "output"):
                        block, inputs = whole(model), find_tensor(example)
                    else:
                        block = segment(model, a, b, example)
                        inputs = block.inputs
                    k = self.jacobian_k
                    if k is None:  # whole spectrum up to 512 values per example, else top 8
                        with torch.no_grad():
                            out_numel = find_tensor(block(inputs)).shape[1:].numel()
                        if min(inputs[0].numel(), out_numel) > 512:
                            k = 8
                    res = jacobian_spectrum(block, inputs, k=k, bn=self.jacobian_bn)
                    out[name] = res.sv.detach().double().cpu().numpy()  # [B, n_sv]
        finally:
            with torch.no_grad():
                for buf, saved in buffers:
                    buf.copy_(saved)
            for m, training in modes:
                m.training = training
            self._in_probe = False
        self._jac_out = out

    # ----------------------------------------------------------------- records
    def log(self, **scalars: float | torch.Tensor) -> None:
        """Attach scalars (``loss=...``) to the record of the latest training forward.

        Values logged at unscheduled steps are ignored; tensors are read once per record, not
        per call. Names are fixed by the first record (``loss`` always exists).

        Examples
        --------
        >>> rec = Recorder(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        >>> rec.log(loss=0.5, accuracy=0.9)
        """
        for name, value in scalars.items():
            if name in _RESERVED or name.startswith("_"):
                raise RecorderError(
                    f"cannot log {name!r}: the name is used by the run dataset "
                    f"({sorted(_RESERVED)}); choose another"
                )
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise RecorderError(
                        f"log({name}=...) needs a scalar, got a tensor of shape "
                        f"{tuple(value.shape)}"
                    )
            elif not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
                raise TypeError(
                    f"log({name}=...) needs a number or a 1-element tensor, got {value!r}"
                )
        step = self._last_forward_step if self._last_forward_step is not None else self.step
        if self._pending is None:
            if self._pending_logs or not self.schedule(step) or self._last_forward_step is not None:
                return
            self._pending = step  # logs without any forward (e.g. a user-driven loop)
        if step != self._pending:
            return
        for name, value in scalars.items():
            self._pending_logs[name] = value.detach() if isinstance(value, torch.Tensor) else value

    def _close_record(self) -> None:
        step = self._pending
        if step is None:
            return
        self._pending = None
        logs, self._pending_logs = self._pending_logs, {}
        active = [(key, stats) for key, stats in self._stats.items() if stats.calls]
        outs = compute_many([stats for _, stats in active])  # one device -> host transfer
        results = {key: (out, stats.calls) for (key, stats), out in zip(active, outs, strict=True)}
        for _, stats in active:
            stats.reset()
        samples, self._sample_vals = self._sample_vals, {}
        samples = _to_host(samples)  # one transfer for all sites
        grads = {}
        for name, gs in self._grad_stats.items():
            if gs.n:
                for field, t in gs.compute().items():
                    grads[(name, field)] = t
            gs.reset()
        grads = _to_host(grads)
        params, self._param_out = _to_host(self._param_out), {}
        self._param_before = None
        extra = {
            "samples": samples,
            "grads": grads,
            "params": params,
            "skipped": self._skipped,
            "ics": self._ics_out,
        }
        self._ics_out = {}
        self._batch = None
        extra["jacobian"], self._jac_out = self._jac_out, None
        self._skipped = 0
        if self._layout is None:
            if not results and not logs:
                return
            self._layout = self._make_layout(results, logs, extra)
        record = self._assemble(step, results, logs, extra)
        self._check_divergence(record, logs)
        self._emit(record)

    def _make_layout(self, results: dict, logs: dict, extra: dict) -> _Layout:
        seen = {name for (_, name) in results}

        def call_index(name: str) -> int:
            return int(name.rpartition("#")[2]) if "#" in name else -1

        sites = [
            name
            for s in self.sites
            for name in sorted(
                (n for n in seen if self._base_site.get(n) == s.name), key=call_index
            )
        ]
        if not sites and self.sites:
            raise RecorderError(
                "no selected site received a floating-point tensor during the first recorded "
                f"step; selected: {[s.name for s in self.sites][:10]}. Check the sites (e.g. an "
                "embedding's input is integer: record its output instead)"
            )
        widths = {}
        for (_, name), (out, _) in results.items():
            widths[name] = int(out["mean"].shape[0])
        sources = ("train", "probe") if self.probe is not None else ("train",)
        extra_vars: dict[str, _VarSpec] = {}
        extra_coords: dict[str, Any] = {}
        n_units = sum(widths[n] for n in sites)
        if self.probe_sample is not None:
            samples = extra["samples"]
            m = min((samples[n].shape[0] for n in sites if n in samples), default=0)
            extra_vars["probe_sample"] = _VarSpec(("step", "sample", "unit"), (m, n_units))
            extra_coords["sample"] = ("sample", np.arange(m, dtype=np.int64))
        if self.gradients:
            extra_vars["grad_norm"] = _VarSpec(("step", "site"), (len(sites),), np.float64)
            for name in GRAD_UNIT_STATS:
                extra_vars[name] = _VarSpec(("step", "unit"), (n_units,), np.float32)
            if self.optimizer is not None:
                if not self._params:
                    self._params = self._optimizer_params()
                n_params = len(self._params)
                for name in PARAM_STATS:
                    extra_vars[name] = _VarSpec(("step", "param"), (n_params,), np.float64)
                names = [n for n, _, _ in self._params]
                extra_coords["param"] = ("param", np.array(names, dtype=str))
                extra_coords["param_numel"] = (
                    "param",
                    np.array([p.numel() for _, p, _ in self._params], np.int64),
                )
                extra_coords["param_normalized"] = (
                    "param",
                    np.array([n in self._normalized for n in names], bool),
                )
        if self.scaler is not None:
            extra_vars["skipped"] = _VarSpec(("step",), (), np.int64, 0)
        if self.ics_schedule is not None:
            if self._ics_layers is None:
                raise RecorderError(
                    "ics= is set but no optimizer step was seen in the first recorded step, "
                    "which fixes the run's layers"
                )
            k = len(self._ics_layers)
            for name in ("ics_l2", "ics_cos", "ics_grad_norm"):
                extra_vars[name] = _VarSpec(("step", "layer"), (k,), np.float64)
            extra_coords["layer"] = (
                "layer",
                np.array([layer.name for layer in self._ics_layers], dtype=str),
            )
        if self._jac_blocks is not None:
            if extra["jacobian"] is None:
                raise RecorderError(
                    "jacobian= is set but the first recorded step computed no spectra, which "
                    "fix the run's blocks; make the jacobian schedule include the first "
                    "recorded step (e.g. step 0)"
                )
            sizes = [v.size for v in extra["jacobian"].values()]
            names = list(extra["jacobian"])
            extra_vars["jac_sv"] = _VarSpec(("step", "block", "sv"), (len(names), max(sizes)))
            for stat in JAC_STATS:
                extra_vars[stat] = _VarSpec(("step", "block"), (len(names),), np.float64)
            extra_coords["block"] = ("block", np.array(names, dtype=str))
            extra_coords["block_from"] = (
                "block",
                np.array([self._jac_blocks[n][0] for n in names], dtype=str),
            )
            extra_coords["block_to"] = (
                "block",
                np.array([self._jac_blocks[n][1] for n in names], dtype=str),
            )
            extra_coords["sv"] = ("sv", np.arange(max(sizes), dtype=np.int64))
        if self.landscape_schedule is not None:
            k = len(self.landscape_multipliers)
            for name in ("landscape_loss", "landscape_grad_diff"):
                extra_vars[name] = _VarSpec(("step", "eta"), (k,), np.float64)
            for name in ("loss_variation", "beta_smoothness"):
                extra_vars[name] = _VarSpec(("step",), (), np.float64)
            extra_coords["eta"] = ("eta", self.landscape_multipliers.copy())
        return _Layout(
            sources,
            sites,
            widths,
            {n: self._unit_dims[n] for n in sites},
            {n: self._edges[n] for n in sites},
            {n: self._site_sat[self._base_site[n]] for n in sites},
            self.quantiles,
            tuple(sorted(k for k in logs if k != "loss")),
            extra_vars,
            extra_coords,
        )

    def _assemble(self, step: int, results: dict, logs: dict, extra: dict) -> dict[str, Any]:
        if self._layout is None:
            raise RuntimeError("internal: record assembled before the layout was fixed")
        layout = self._layout
        rec = layout.empty_record(step)
        for (source, name), (out, calls) in results.items():
            if name not in layout.widths or source not in layout.sources:
                continue
            if out["mean"].shape[0] != layout.widths[name]:
                raise RecorderError(
                    f"site {name} has {out['mean'].shape[0]} units at step {step}, but "
                    f"{layout.widths[name]} at the first record; a site's width must not change "
                    f"(set unit_dim for it if the wrong dimension is taken as units)"
                )
            si = layout.sources.index(source)
            k = layout.sites.index(name)
            lo = layout.offsets[name]
            hi = lo + layout.widths[name]
            # Statistics are stored as float32: moments beyond its range (a diverging
            # network's variance) become ±inf there, which is what they are.
            with np.errstate(over="ignore"):
                for field, t in out.items():
                    if field == "hist":
                        rec["hist"][si, k] = t.numpy()
                    else:
                        rec[field][si, lo:hi] = t.numpy()
            rec["calls"][si, k] = calls
            if layout.sat[name] is None:
                rec["sat_frac"][si, lo:hi] = np.nan  # no threshold: not a saturating input
        if "probe_sample" in rec:
            m = rec["probe_sample"].shape[0]
            for name, values in extra["samples"].items():
                if name in layout.widths:
                    lo = layout.offsets[name]
                    rec["probe_sample"][:, lo : lo + layout.widths[name]] = values[:m]
        if "grad_norm" in rec:
            # AMP: gradients of a scaled loss are scaled; divide by this step's scale
            scale = self._scale if self.scaler is not None and self._scale else 1.0
            for (name, field), value in extra["grads"].items():
                if name not in layout.widths:
                    continue
                if field == "grad_norm":
                    rec["grad_norm"][layout.sites.index(name)] = value / scale
                else:
                    lo = layout.offsets[name]
                    unscale = scale * scale if field == "grad_var" else scale
                    with np.errstate(over="ignore"):
                        rec[field][lo : lo + layout.widths[name]] = value / unscale
        params = extra["params"]
        if "param_norm" in rec and params:
            for name in ("param_grad_norm", "param_norm", "update_norm"):
                if name in params:
                    rec[name][:] = params[name]
            with np.errstate(divide="ignore", invalid="ignore"):
                rec["update_ratio"][:] = rec["update_norm"] / rec["param_norm"]
                if "lr" in params:
                    eff = params["lr"] / np.square(rec["param_norm"])
                    normalized = [n in self._normalized for n, _, _ in self._params]
                    rec["eff_lr"][:] = np.where(normalized, eff, np.nan)
        if "skipped" in rec:
            rec["skipped"] = np.int64(extra["skipped"])
        if extra.get("jacobian") and "jac_sv" in rec:
            blocks = list(layout.extra_coords["block"][1])
            for name, sv in extra["jacobian"].items():
                if name not in blocks:
                    continue
                i = blocks.index(name)
                pooled = np.sort(sv[np.isfinite(sv)])[::-1]  # all examples, descending
                n = min(pooled.size, rec["jac_sv"].shape[1])
                rec["jac_sv"][i, :n] = pooled[:n]
                for stat, value in _spectrum_stats(sv).items():
                    rec[stat][i] = value
        for name, value in extra["ics"].items():
            if name in rec:
                rec[name] = np.asarray(value, dtype=np.float64).reshape(rec[name].shape)
        scalar_names = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
        if scalar_names:  # one transfer for all logged tensors
            values = torch.stack([logs[k].reshape(()).double() for k in scalar_names]).cpu()
            logs.update(zip(scalar_names, values.tolist(), strict=True))
        for name in ("loss", *layout.log_names):
            rec[name] = float(logs.get(name, math.nan))
        rec["lr"] = (
            float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else math.nan
        )
        return rec

    def _check_divergence(self, rec: dict[str, Any], logs: dict[str, Any]) -> None:
        if self.diverged_step is not None:
            return
        loss_bad = "loss" in logs and not math.isfinite(rec["loss"])
        if loss_bad or bool(np.any(rec["nonfinite"] > 0)):
            self.diverged_step = int(rec["step"])
            if self._writer is not None:
                self._writer.set_attrs(diverged_step=self.diverged_step)

    def _emit(self, record: dict[str, Any]) -> None:
        self._records.append(record)
        self._n_records += 1
        if self._writer is None:
            return
        if (
            len(self._records) >= self.chunk_steps
            or time.monotonic() - self._last_write > self.flush_seconds
        ):
            self._submit()

    def _submit(self) -> None:
        if self._writer is None or not self._records or self._layout is None:
            return
        block = self._layout.block(self._records, self._attrs())
        self._records = []
        self._writer.submit(block)
        self._last_write = time.monotonic()

    def _attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "icstools_version": __version__,
            "schema_version": SCHEMA_VERSION,
            "recorder_config": json.dumps(self.config()),
            "model_summary": str(self.model)[:20000],
            "model_class": type(self.model).__name__,
            "seed": self.seed,
            "sites_not_recorded": json.dumps(
                [
                    s.name
                    for s in self.sites
                    if self._layout and s.name not in self._base_site.values()
                ]
            ),
        }
        if self.diverged_step is not None:
            attrs["diverged_step"] = self.diverged_step
        return attrs

    def config(self) -> dict[str, Any]:
        """The recorder's configuration as JSON-able values (stored in the run's attrs)."""
        probe = find_tensor(self.probe) if self.probe is not None else None
        return {
            "sites": [s.name for s in self.sites],
            "schedule": repr(self.schedule),
            "probe_shape": None if probe is None else list(probe.shape),
            "probe_mode": self.probe_mode,
            "probe_sample": self.probe_sample,
            "quantiles": self.quantiles.tolist(),
            "bins": self.bins,
            "hist_range": repr(self._hist_range),
            "saturation": {k: float(v) for k, v in self._saturation.items()},
            "unit_dim": repr(self._unit_dim),
            "quantile_sample": self.quantile_sample,
            "calls": self.calls,
            "chunk_steps": self.chunk_steps,
            "seed": self.seed,
            "gradients": self.gradients,
            "ics": None if self.ics_schedule is None else repr(self.ics_schedule),
            "landscape": None if self.landscape_schedule is None else repr(self.landscape_schedule),
            "landscape_multipliers": self.landscape_multipliers.tolist(),
            "jacobian": None if self.jacobian_schedule is None else repr(self.jacobian_schedule),
            "jacobian_blocks": self._jac_blocks,
            "jacobian_examples": self.jacobian_examples,
            "jacobian_k": self.jacobian_k,
            "jacobian_bn": self.jacobian_bn,
            "scaler": self.scaler is not None,
            "path": None if self.path is None else str(self.path),
        }

    # ----------------------------------------------------------------- results
    @property
    def n_records(self) -> int:
        """Records closed so far."""
        return self._n_records

    @property
    def n_committed(self) -> int:
        """Records safely on disk (readable by :func:`icstools.open_run` after a crash);
        without a ``path``, the records closed so far."""
        return self._writer.n_committed if self._writer is not None else self._n_records

    def flush(self) -> None:
        """Close the open record and write everything buffered to the store (waits for it)."""
        self._close_record()
        if self._writer is not None:
            self._submit()
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the store; the in-memory record stays available."""
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.close()

    def to_dataset(self) -> xr.Dataset:
        """The run so far as an ``xarray.Dataset`` (DESIGN.md §3).

        With a ``path``, the store is flushed and read back (loaded into memory); without one,
        the dataset is built from the records held in memory.
        """
        self._close_record()
        if self._writer is not None:
            self.flush()
            return open_run(self.path).load()
        if self._layout is None or not self._records:
            raise RecorderError(
                "nothing was recorded yet: the schedule selected no training forward so far "
                f"(step {self.step}, schedule {self.schedule!r})"
            )
        return self._layout.block(self._records, self._attrs())

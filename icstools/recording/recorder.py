"""The :class:`Recorder`: its keywords, mapped onto the core and the built-in measurements.

Each keyword either configures the core (:class:`~icstools.recording.core.RecorderCore`: sites,
schedule, optimizer, probe, store) or enables and configures a built-in measurement
(:mod:`icstools.recording.measurements`, see the table there); ``measurements=[...]`` adds
user-defined ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from icstools.functional.statistics import DEFAULT_QUANTILES
from icstools.recording.compiled import unwrap_compiled
from icstools.recording.core import RecorderCore
from icstools.recording.distributed import detect
from icstools.recording.errors import RecorderError
from icstools.recording.layout import SiteTable
from icstools.recording.measurements import Context, Measurement, build
from icstools.recording.options import check_options, recorder_config
from icstools.recording.resume import resume_run
from icstools.recording.sink import DEFAULT_BUFFER_BYTES, RecordSink
from icstools.recording.steps import unwrap_optimizer
from icstools.schedules import Schedule, as_schedule
from icstools.sites import Selector, select_sites
from icstools.store.writer import DEFAULT_CHUNK_STEPS

__all__ = ["Recorder"]


class Recorder(RecorderCore):
    """Record per-unit activation statistics (and more) of any PyTorch model during training.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it is not modified (hooks only). Its parameters and buffers (and the probe)
        must hold data: CPU or CUDA (accelerator) tensors; ``meta`` tensors are refused when
        the recorder attaches. A ``DistributedDataParallel`` model (its ``.module`` is hooked)
        or one sharded with ``fully_shard`` records one run of the global batch, merged over
        the ranks and written by rank 0 (:mod:`icstools.recording.distributed`).
    sites : selector, optional
        Which tensors to record (:func:`icstools.sites.select_sites`): a module type, a name or
        glob (``"fc3"``, ``"features.*"``, ``"fc3:input"``), a predicate ``(name, module) ->
        bool``, or a list of these. Default: the inputs of all element-wise nonlinearities.
    role : {"input", "output"} or both, optional
        Role for selectors that don't name one (default ``"input"`` for ``sites=None``, else
        ``"output"``).
    every : int or callable
        Schedule in optimizer steps: every N steps, or any ``step -> bool``.
    optimizer : torch.optim.Optimizer, optional
        Steps are counted by a post-hook on its ``step()``; its first parameter group's learning
        rate is recorded as ``lr``. Without one, call :meth:`step_done` after each update.
        ``step()``, ``step(closure)`` (LBFGS: the closure's first evaluation is recorded),
        gradient accumulation and a ``GradScaler`` all work; a wrapped optimizer
        (Accelerate's, Lightning's) is unwrapped (:mod:`icstools.recording.steps`).
    probe : tensor, tuple of positional args, or dict of keyword args, optional
        A fixed batch evaluated at each recorded step (source ``probe``), with no effect on
        training (no gradient; buffers, RNG state and module modes restored). Integer tensors
        are fine (token ids; ``{"input_ids": ..., "attention_mask": ...}``). A probe the
        model cannot take raises :class:`RecorderError` naming its shapes (the model's error
        chained) from the training forward that opens a record; earlier records are kept.
    probe_mode : {"train", "eval"}
        BN normalizes the probe with its own batch statistics, or with the running ones.
    probe_sample : int, optional
        Keep up to this many raw probe values per unit, ``probe_sample (step, sample, unit)``,
        the same positions at every step (:mod:`.measurements.probe_samples`).
    path : str or Path, optional
        Zarr store to stream the run to (crash-safe); without it the run stays in memory.
    overwrite : bool
        Replace an existing store at ``path`` (its records are deleted).
    resume : bool
        Continue the store at ``path`` after a restart from a checkpoint (README, "Resuming
        after a restart"; :mod:`icstools.recording.resume`): the step counter continues from
        the restored step (``start_step``, or the ``"step"`` in the optimizer's state), records
        of later steps already in the store are dropped with a :class:`ResumeWarning` naming
        them (the resumed training records them again), the histogram edges and record sites
        are the store's, and a configuration that differs from the store's is a
        :class:`RecorderError` naming the keys. A missing, never committed or damaged store is
        a :class:`~icstools.store.StoreError`. Create the Recorder after loading the
        checkpoint; call :meth:`flush` before saving each checkpoint. Not with ``overwrite``.
    start_step : int, optional
        The step counter's first value: with ``resume``, the optimizer steps taken by the
        restored checkpoint (required where the optimizer keeps no step count: SGD, LBFGS, or no
        optimizer); without ``resume``, a new run's steps simply start there.
    quantiles, bins, hist_range, saturation, quantile_sample
        Activation statistics (:mod:`.measurements.activations`): quantile levels (default:
        the paper's 0.15/0.5/0.85 on a 5% grid + 1%/99%); histogram bins (plus under- and
        overflow); histogram range for all sites or per site glob (default: the first values'
        range widened by 25% each side); ``|x|`` thresholds of ``sat_frac`` per site glob
        (default 4.585 for sigmoid and 2.993 for tanh inputs: derivative below 0.01); values
        per unit kept for exact quantiles (beyond: a uniform sample; ``None``: always exact).
    fused : {None, "compile", "eager"}
        How a site tensor with more values per unit than ``quantile_sample`` is reduced:
        ``"compile"``, all its statistics in one ``torch.compile``'d pass on its device
        (:mod:`icstools.functional.fused`; each new shape compiles once, seconds to a minute
        on a CPU; if compiling fails, the same reduction eagerly); ``"eager"``, that fused
        reduction uncompiled; ``None`` (default), on the CPU two numba-compiled passes in
        float64 (:mod:`icstools.functional.kernels`; ``ICSTOOLS_KERNELS=0`` turns them off),
        elsewhere one eager op per statistic. Values kept for exact quantiles are folded by
        the same compiled passes when the record closes.
    unit_dim : int or dict, optional
        Dimension holding units, for all sites or per site glob; default: last for
        ``[batch, (time,) features]``, 1 for ``[N, C, H, (W)]`` and for 3-D tensors of
        convolution-like modules (:func:`icstools.sites.layout_module`).
    calls : {"pool", "separate"}, optional
        A module called several times per forward: all calls pooled (``calls`` counts them),
        or its k-th call recorded as site ``"<site>#k"`` (the first record fixes which exist).
        Not given: pooled, and the first such module is reported once
        (:class:`~icstools.recording.errors.SharedModuleWarning`, naming the sites).
    chunk_steps, flush_seconds : int, float
        Records per Zarr chunk along ``step`` (default 256: a store's writer pays per file, so
        short chunks cost it per record; see :data:`icstools.store.writer.DEFAULT_CHUNK_STEPS`);
        also write when this much time has passed (default 30 s).
    buffer_bytes : int
        Bound on the memory of records not yet committed to the store (default 256 MiB): the
        records are written early, and the loop waits for the writer, rather than exceed it.
        With the default statistics a record costs about ``44 + 4 × len(quantiles)`` bytes per
        unit and source (144 MB for a site of 1,000,000 units with the 25 default levels);
        :attr:`record_bytes` tells the exact figure after the first record. A record larger
        than half the bound is written on its own and waited for. In memory (no ``path``)
        every record is kept; a ``ResourceWarning`` says so once the run outgrows the bound.
    seed : int
        Seed of the recorder's own generators (quantile and probe sampling); the global RNG is
        never touched.
    gradients : bool or "activations"
        ``True``: activation gradients ``dL/dx`` per site and unit
        (:mod:`.measurements.site_gradients`) and parameter dynamics ``param_grad_norm``,
        ``param_norm``, ``update_norm``, ``update_ratio``, ``eff_lr``
        (:mod:`.measurements.parameters`), which need ``optimizer`` (a
        :class:`RecorderError` at attach without one). ``"activations"``: the activation
        gradients only (no optimizer needed).
    ics : int or callable, optional
        Schedule of gradient-based ICS per layer (Santurkar et al. 2018, Def. 2.1;
        :mod:`.measurements.ics`). Needs ``optimizer``, ``loss_fn`` and :meth:`set_target`.
    landscape : int or callable, optional
        Schedule of loss-landscape probes along the gradient (:mod:`.measurements.landscape`)
        at ``landscape_multipliers`` × lr. Needs ``optimizer``, ``loss_fn``, :meth:`set_target`.
    jacobian, jacobian_blocks, jacobian_examples, jacobian_k, jacobian_bn
        Schedule of Jacobian spectra on the first ``jacobian_examples`` probe examples
        (:mod:`.measurements.jacobian`); blocks ``"segments"`` (between consecutive sites, and
        ``"input->output"``), a list of ``(from_site, to_site)`` or a dict name → pair;
        singular values per example beyond 512 (``None``: top 8); BN ``"fixed"`` or ``"full"``.
    loss_fn : callable, optional
        ``loss_fn(output, target) -> scalar``, the training loss, for ``ics`` and ``landscape``.
    landscape_multipliers : sequence of float
        Step sizes of the landscape probes in units of the current learning rate.
    scaler : torch.amp.GradScaler, optional
        With AMP: activation gradients are unscaled, iterations the scaler skips are dropped
        and counted in ``skipped (step)`` (:mod:`.measurements.amp`).
    measurements : list of Measurement
        User-defined measurements, called after the built-in ones
        (:class:`icstools.recording.measurements.Measurement`).
    on_record : callable, optional
        ``on_record(ds)`` receives each record as it closes: a one-step ``xarray.Dataset``
        with the run's variables, coordinates and attrs (treat it as read-only), to send to
        W&B, MLflow or anything. It is called on the training thread right after the record
        is closed and handed to the store, so keep it short (or queue the work elsewhere). An
        exception in it never loses a record: the first one is warned about
        (``RuntimeWarning`` naming the error), recording goes on, the callback is still called
        for later records, and :attr:`on_record_errors` counts the failures.

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
    >>> ds["mean"].dims, ds.sizes["step"], ds.site.values.tolist()
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
        resume: bool = False,
        start_step: int | None = None,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        bins: int = 64,
        hist_range: tuple[float, float] | dict[str, tuple[float, float]] | None = None,
        saturation: dict[str, float] | None = None,
        unit_dim: int | dict[str, int] | None = None,
        quantile_sample: int | None = 8192,
        fused: str | None = None,
        calls: str | None = None,
        chunk_steps: int = DEFAULT_CHUNK_STEPS,
        flush_seconds: float = 30.0,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        seed: int = 0,
        gradients: bool | str = False,
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
        measurements: Sequence[Measurement] = (),
        on_record: Callable[[Any], Any] | None = None,
    ) -> None:
        model, wrapper = unwrap_compiled(model)  # torch.compile'd: hook the original
        rank0 = {"probe": probe, "probe_sample": probe_sample, "jacobian": jacobian, "ics": ics}
        ranks = _distributed(model, resume=resume, landscape=landscape, **rank0)  # DDP, FSDP
        model = model if ranks is None else ranks.module  # rank 0's records merge the ranks'
        # every keyword, as given (measurements read theirs in their from_options)
        options = SimpleNamespace(**{k: v for k, v in locals().items() if k != "self"})
        check_options(model, options)
        options.seed = int(seed)
        options.sites = select_sites(model, sites, role)
        options.modules = dict(model.named_modules())
        schedule = as_schedule(every)
        ctx = _context(model, wrapper, options, ranks)
        # rank 0 writes the merged run
        sink = _sink(options, path if ranks is None or ranks.writer else None)
        super().__init__(ctx, schedule, sink)
        self._options = options
        self._dist = ranks
        self._start_at(start_step, resume)

    def _start_at(self, start_step: int | None, resume: bool) -> None:
        """Number the steps from ``start_step``; with ``resume``, continue the store's run."""
        if start_step is not None:
            self._ctx.step = start_step
        if resume:
            try:
                resume_run(self, start_step)
            except BaseException:
                with contextlib.suppress(Exception):  # the error above is the one to report
                    self._sink.close()  # releases the store's lock
                raise

    @property
    def on_record_errors(self) -> int:
        """How many calls of the ``on_record`` callback raised (the first is warned about)."""
        return self._sink.on_record_errors

    @property
    def record_bytes(self) -> int | None:
        """Bytes of the last closed record (``None`` before the first): what each record
        costs in memory until it is written (see ``buffer_bytes``)."""
        return self._sink.last_record_bytes

    def config(self) -> dict[str, Any]:
        """The recorder's configuration as JSON-able values (stored in the run's attrs)."""
        return recorder_config(self._options, self.schedule, self._ctx.measurements)


def _context(model: nn.Module, wrapper: Any, options: SimpleNamespace, ranks: Any) -> Context:
    """The shared context of the core and the measurements, built from the keywords."""
    o = options
    ctx = Context(
        model,
        o.sites,
        SiteTable(model, o.unit_dim, o.calls),
        optimizer=None if o.optimizer is None else unwrap_optimizer(o.optimizer),
        probe=o.probe,
        probe_mode=o.probe_mode,
        loss_fn=o.loss_fn,
        scaler=o.scaler,
        seed=o.seed,
    )
    ctx.wrapper = wrapper
    ctx.measurements = build(o, o.measurements)
    if ranks is not None:
        ctx.measurements = ranks.localize(ctx)
    return ctx


def _sink(options: SimpleNamespace, path: str | Path | None) -> RecordSink:
    """Where the records go: the store at ``path``, or memory (``None``)."""
    o = options
    return RecordSink(
        path,
        overwrite=o.overwrite,
        resume=o.resume,
        chunk_steps=o.chunk_steps,
        flush_seconds=o.flush_seconds,
        on_record=o.on_record,
        buffer_bytes=o.buffer_bytes,
    )


def _distributed(model: nn.Module, *, resume: bool, **rank0_only: Any) -> Any:
    """The ranks of a DDP / ``fully_shard`` model (:mod:`icstools.recording.distributed`), or
    ``None``; a keyword the distributed run cannot support is a :class:`RecorderError`."""
    ranks = detect(model)
    if ranks is None:
        return None
    if resume:
        raise RecorderError(
            "resume=True is not supported on a distributed (DDP / fully_shard) run yet: resume "
            "a single-process run, or start a new store (path=...) after the restart"
        )
    ranks.check(**rank0_only)
    return ranks

"""The recorder: hooks on any ``torch.nn.Module`` → measurements per recorded step → run dataset.

The core below does the lifecycle and nothing else: it counts optimizer steps, evaluates the
schedule, opens records, runs the probe batch and dispatches the events of a recorded step to
the measurements (:mod:`icstools.recording.measurements`); closed records go to the sink
(memory or a Zarr store) through :mod:`icstools.recording.records`. Every hook goes through
:mod:`icstools.recording.hooks`; extra forwards run inside
:func:`icstools.recording.isolation.isolated`.

Step bookkeeping. ``rec.step`` counts optimizer steps (the optimizer's step post-hook, or
:meth:`Recorder.step_done` by hand; how every way of taking a step is handled, closures and
wrapped optimizers included: :mod:`icstools.recording.steps`). The record of step ``t``
describes the model with the weights after ``t`` updates: the ``train`` source pools every
training forward made at that step (gradient accumulation and modules called several times
are pooled; ``calls`` counts them), the ``probe`` source evaluates the fixed probe batch once,
right before the first training forward of the step. A forward counts as training when the
model is in train mode and gradients are enabled; evaluation forwards (``model.eval()`` or
``torch.no_grad()``) are never recorded as ``train``. A loop whose training forward does not
call the model itself (a LightningModule's ``training_step`` calling a submodule) marks each
batch with :meth:`~RecorderCore.begin_batch` / :meth:`~RecorderCore.end_batch` instead. A
record is closed once its step is over: at the first training forward of a later step, by
:meth:`~RecorderCore.flush` and :meth:`~RecorderCore.to_dataset` after ``optimizer.step()``,
or by leaving the ``with`` block (:meth:`~RecorderCore.close`). ``flush`` and ``to_dataset``
in the middle of a step leave its record open, so they never change what is recorded.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from icstools.recording.compiled import NO_BATCH, SiteSwitch, check_stashable
from icstools.recording.deferred import DeferredRecords
from icstools.recording.errors import RecorderError, report_beside
from icstools.recording.hooks import HookGroup
from icstools.recording.isolation import RngState, isolated
from icstools.recording.measurements import Context, Measurement, StepBatch
from icstools.recording.measurements.scalars import check_logged
from icstools.recording.options import call_with_probe
from icstools.recording.records import RunRecords
from icstools.recording.sink import RecordSink
from icstools.recording.steps import OptimizerSteps, unwrap_optimizer
from icstools.schedules import Schedule
from icstools.sites import Site

__all__ = ["RecorderCore"]


class RecorderCore(RunRecords):
    """The recorder's lifecycle: hooks, steps, records, dispatch to the measurements.

    :class:`icstools.recording.recorder.Recorder` builds it from its keywords; the core only
    needs the shared :class:`~icstools.recording.measurements.Context` (model, sites,
    measurements), the schedule and the sink.
    """

    def __init__(self, ctx: Context, schedule: Schedule, sink: RecordSink) -> None:
        self._ctx = ctx
        self.schedule = schedule
        self._sink = sink
        # each event goes only to the measurements that handle it (hooks are the hot path)
        self._to = {event: [m for m in ctx.measurements if _defines(m, event)] for event in _EVENTS}
        self._deferred = DeferredRecords(sink.buffer_bytes)  # records whose host work waits
        self._hooks = HookGroup()  # the model's and the optimizer's, while attached
        self._pending: int | None = None  # step of the open record
        self._last_forward_step: int | None = None
        self._in_train_forward = False
        self._in_batch = False  # between begin_batch and end_batch: the root hooks wait
        self._last: dict[str, Any] | None = None  # the latest closed record
        self._logged_names: set[str] = set()  # names rec.log has accepted
        self._steps = OptimizerSteps(self._before_update, self._after_update, ctx.own_forwards)
        self._switch = SiteSwitch(ctx.model)  # the site hooks, eager or compiled

    # ------------------------------------------------------------------------ attributes
    model = property(lambda self: self._ctx.model, doc="The model.")
    sites = property(lambda self: self._ctx.sites, doc="The selected sites.")
    step = property(lambda self: self._ctx.step, doc="Optimizer steps completed.")
    path = property(lambda self: self._sink.path, doc="The store's path, or None.")
    measurements = property(lambda self: list(self._ctx.measurements), doc="All measurements.")
    attached = property(lambda self: bool(self._hooks), doc="Whether the hooks are registered.")

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose steps are counted (may be set before :meth:`attach`)."""
        return self._ctx.optimizer

    @optimizer.setter
    def optimizer(self, optimizer: Any) -> None:
        if self.attached:
            raise RecorderError("set the optimizer before attaching the recorder")
        self._ctx.optimizer = None if optimizer is None else unwrap_optimizer(optimizer)

    # ------------------------------------------------------------------------ hooks
    def attach(self) -> RecorderCore:
        """Register the hooks (``with rec:`` does this and :meth:`detach` on exit).

        The model's (or its compiled wrapper's) forward hooks, the sites' (idle at unscheduled
        steps, also under ``torch.compile``: :mod:`icstools.recording.compiled`), the optimizer's.
        """
        if self._hooks:
            raise RecorderError("this recorder is already attached; use one `with rec:` at a time")
        ctx = self._ctx
        for m in ctx.measurements:
            m.check(ctx)
        root = ctx.wrapper if ctx.wrapper is not None else ctx.model
        try:
            self._hooks.forward_pre(root, self._on_root_start, with_kwargs=True)
            for site in ctx.sites:
                module = ctx.modules[site.module_name]
                fn = functools.partial(self._switch.site, site)
                self._hooks.site(module, site.role, fn, idle=self._idle)
            self._hooks.forward(root, self._on_root_end, always_call=True)
            if ctx.optimizer is not None:
                self._steps.attach(self._hooks, ctx.optimizer)
        except BaseException:
            self.detach()
            raise
        hooked = [root, *(ctx.modules[s.module_name] for s in ctx.sites)]
        self._switch.attach(self._observe, hooked, compiled=ctx.wrapper is not None)
        self._sync_switch()
        return self

    def detach(self) -> None:
        """Remove every hook this recorder registered (safe to call twice)."""
        ctx = self._ctx
        try:
            self._harvest()  # what compiled forwards left
            self._complete_deferred()
        finally:
            self._switch.detach()
            ctx.forward_hooks.remove()
            ctx.record_hooks.remove()
            self._hooks.remove()
            ctx.source = None
            self._in_batch = self._in_train_forward = False

    def __enter__(self) -> RecorderCore:
        return self.attach()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        """Detach and close. If the ``with`` body raised, its exception propagates unchanged:
        a failure to close (e.g. of the store) is added to it as a note and warned about."""
        try:
            self.detach()
        finally:
            try:
                self.close()
            except Exception as err:
                if exc is None:
                    raise
                report_beside(exc, err)

    def _sync_switch(self) -> None:
        """Compiled forwards stash at scheduled steps (traced root hooks never run)."""
        self._switch.on = bool(self._hooks) and bool(self.schedule(self._ctx.step))

    def _harvest(self) -> None:
        """Feed the site tensors that compiled forwards stashed to the measurements, one
        training forward each (outside the compiled region: at the step, flush or close)."""
        if not self._switch:
            return
        check_stashable(self._switch, self._to["site"])
        for forward in self._switch.take():
            with torch.enable_grad():  # the stash holds training forwards only
                self._forward_start((), {}, stashed=True)
            for site, x in forward:
                self._observe(site, x)
            self._forward_end()

    def _idle(self) -> bool:
        """An eager site hook has nothing to do (as :meth:`_observe` would find); traced, false
        without reading the source (a Dynamo guard on it would recompile per record)."""
        return not torch.compiler.is_compiling() and self._ctx.source is None

    def _observe(self, site: Site, x: torch.Tensor | None) -> None:
        ctx = self._ctx
        if x is None or ctx.source is None:
            return
        name = ctx.units.record_name(site, ctx.source, x)
        if name is not None:
            for m in self._to["site"]:
                m.site(ctx, name, x, ctx.source)

    # ------------------------------------------------------------------------ events
    def _on_root_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():  # traced: no bookkeeping in the graph
            SiteSwitch.mark_forward(module)
            return
        if not self._in_batch:  # within begin_batch/end_batch, the batch is the forward
            self._forward_start(args, kwargs)

    def _on_root_end(self, module: nn.Module, args: tuple, output: object) -> None:
        if torch.compiler.is_compiling():
            return
        if not self._in_batch:
            self._forward_end()

    def begin_batch(self, *args: Any, **kwargs: Any) -> None:
        """A training batch starts whose forward may not call the model itself.

        For loops like Lightning's, whose ``training_step`` may call a submodule rather than
        the model: everything the sites see until :meth:`end_batch` is one training forward
        of the current step (the model's own calls are not counted apart). ``args`` and
        ``kwargs`` are the model's inputs for the batch (kept by reference for ``ics`` and
        ``landscape``, which call ``model(*args, **kwargs)``). Integrations call these.

        Examples
        --------
        >>> from icstools import Recorder
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        >>> wrapper = nn.ModuleDict({"net": net})  # never called itself
        >>> with Recorder(wrapper) as rec:
        ...     x = torch.randn(5, 3)
        ...     rec.begin_batch(x); _ = net(x); rec.end_batch(); rec.step_done()
        >>> rec.to_dataset().site.values.tolist()
        ['net.1:input']
        """
        self._forward_start(args, kwargs)
        self._in_batch = True

    def end_batch(self) -> None:
        """The training batch that :meth:`begin_batch` started ended."""
        if self._in_batch:
            self._in_batch = False
            self._forward_end()

    def _forward_start(self, args: tuple, kwargs: dict, stashed: bool = False) -> None:
        ctx = self._ctx
        if ctx.silent:
            return
        if not (ctx.model.training and torch.is_grad_enabled()):
            ctx.source, self._switch.on = None, False  # evaluation forwards: not training data
            ctx.forward_hooks.remove()
            return
        step = ctx.step
        self._last_forward_step = step
        if self._pending is not None and self._pending != step:
            self._close_record()
        if not self.schedule(step):
            ctx.source, self._switch.on = None, False
            ctx.forward_hooks.remove()
            return
        self._switch.on = True
        first = self._pending is None
        if first:
            self._open_record(step)
        ctx.units.new_forward()
        ctx.source = "train"
        if any(m.wants_batch(ctx) for m in self._to["wants_batch"]):
            if stashed:
                raise RecorderError(NO_BATCH)
            # references (no copies) to the step's batch, and the RNG state the forward
            # starts from: recomputations use the same dropout masks
            ctx.batch = StepBatch(args, dict(kwargs), RngState.capture())
        self._in_train_forward = True
        for m in self._to["train_forward"]:
            m.train_forward(ctx, first)

    def _forward_end(self) -> None:
        ctx = self._ctx
        if ctx.silent:
            return
        if self._switch and ctx.source == "train":  # a compiled forward of the wrapper
            for site, x in (item for fwd in self._switch.take() for item in fwd):
                self._observe(site, x)
        ctx.source = None
        ctx.forward_hooks.remove()
        if self._in_train_forward:
            self._in_train_forward = False
            for m in self._to["train_forward_end"]:
                m.train_forward_end(ctx)
            ctx.units.report_shared()

    def _open_record(self, step: int) -> None:
        """Open the record of ``step``: the probe forward and what follows it. If they fail,
        the record is not opened and what they left is forgotten (earlier records are kept,
        and no later error about this record can hide this one)."""
        ctx = self._ctx
        self._pending = step
        if ctx.probe is None:
            return
        ctx.units.new_forward()
        mode = "eval" if ctx.probe_mode == "eval" else None
        try:
            with ctx.own_forwards("probe"), isolated(ctx.model, mode=mode, grad=False):
                call_with_probe(ctx.model, ctx.probe)
            for m in self._to["after_probe"]:
                m.after_probe(ctx)
        except BaseException:
            self._pending = None
            ctx.forward_hooks.remove()
            for m in ctx.measurements:
                m.reset(ctx)
            ctx.units.forget_unfixed()
            raise

    def _before_update(self) -> None:
        self._harvest()
        ctx = self._ctx
        if self._pending == ctx.step and not ctx.silent:  # a recorded step
            for m in self._to["before_update"]:
                m.before_update(ctx)

    def _after_update(self) -> None:
        ctx = self._ctx
        if self._pending == ctx.step and not ctx.silent:
            for m in self._to["after_update"]:
                m.after_update(ctx)
        ctx.step += 1
        self._sync_switch()

    def set_target(self, target: Any) -> None:
        """Give the recorder the target of this step's batch (for ``ics`` and ``landscape``).

        Call it in every step before ``optimizer.step()`` (it only keeps a reference). The
        inputs are taken from the model's last training forward of the step; ``loss_fn(output,
        target)`` recomputes the loss.

        Examples
        --------
        >>> from icstools import Recorder
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> rec = Recorder(model, optimizer=opt, ics=1, loss_fn=nn.functional.cross_entropy)
        >>> with rec:
        ...     x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     rec.set_target(y); opt.zero_grad(); loss.backward(); opt.step()
        >>> rec.to_dataset()["ics_cos"].sel(layer="0").item()
        1.0
        """
        self._ctx.target, self._ctx.target_step = target, self._ctx.step

    def step_done(self) -> None:
        """Count one optimizer step by hand (only when no optimizer was given).

        Examples
        --------
        >>> from icstools import Recorder
        >>> rec = Recorder(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        >>> rec.step_done(); rec.step
        1
        """
        if self._ctx.optimizer is not None:
            raise RecorderError(
                "steps are already counted by the optimizer given to the Recorder; "
                "step_done() would count them twice"
            )
        self._harvest()
        self._ctx.step += 1
        self._sync_switch()

    def log(self, **scalars: float | torch.Tensor) -> None:
        """Attach scalars (``loss=...``) to the record of the latest training forward.

        Values logged at unscheduled steps are ignored; tensors are read once per record, not
        per call. Names are fixed by the first record (``loss`` always exists). A name becomes
        a variable of the run (a directory of its store): ASCII letters, digits, ``_``, ``.``
        and ``-``, starting with a letter or a digit (no ``/``), at most 128 characters, and
        not a name of the dataset (``mean``, ``step``, ...); another raises
        :class:`RecorderError` at once.

        Examples
        --------
        >>> from icstools import Recorder
        >>> rec = Recorder(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        >>> rec.log(loss=0.5, accuracy=0.9)
        """
        check_logged(scalars, self._logged_names)
        ctx = self._ctx
        if ctx.silent:  # within the closure's later evaluations (LBFGS): not this step's data
            return
        step = self._last_forward_step if self._last_forward_step is not None else ctx.step
        if self._pending is None:
            if ctx.logs or not self.schedule(step) or self._last_forward_step is not None:
                return
            self._pending = step  # logs without any forward (e.g. a user-driven loop)
        if step != self._pending:
            return
        for name, value in scalars.items():
            ctx.logs[name] = value.detach() if isinstance(value, torch.Tensor) else value


_EVENTS = ("site", "wants_batch", "train_forward", "train_forward_end", "after_probe")
_EVENTS += ("before_update", "after_update")


def _defines(measurement: Measurement, event: str) -> bool:
    """Whether a measurement handles ``event`` (overrides the base class's no-op)."""
    return getattr(type(measurement), event, None) is not getattr(Measurement, event, None)

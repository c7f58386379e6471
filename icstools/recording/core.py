"""The recorder: hooks on any ``torch.nn.Module`` → measurements per recorded step → run dataset.

The core below does the lifecycle and nothing else: it counts optimizer steps, evaluates the
schedule, opens and closes records, runs the probe batch, dispatches the events of a recorded
step to the measurements (:mod:`icstools.recording.measurements`) and hands closed records to
the sink (memory or a Zarr store). Every hook goes through :mod:`icstools.recording.hooks`;
extra forwards run inside :func:`icstools.recording.isolation.isolated`.

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

import functools
import json
import math
import warnings
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from icstools import __version__
from icstools.recording.errors import RecorderError
from icstools.recording.hooks import HookGroup
from icstools.recording.isolation import RngState, isolated
from icstools.recording.layout import Layout
from icstools.recording.measurements import Context, Measurement, StepBatch
from icstools.recording.measurements.scalars import check_logged
from icstools.recording.options import call_with_probe
from icstools.recording.sink import RecordSink
from icstools.schedules import Schedule
from icstools.schema import SCHEMA_VERSION
from icstools.sites import Site

__all__ = ["RecorderCore"]


class RecorderCore:
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
        self.diverged_step: int | None = None
        self._hooks = HookGroup()  # the model's and the optimizer's, while attached
        self._pending: int | None = None  # step of the open record
        self._last_forward_step: int | None = None
        self._in_train_forward = False

    # ------------------------------------------------------------------------ attributes
    model = property(lambda self: self._ctx.model, doc="The model.")
    sites = property(lambda self: self._ctx.sites, doc="The selected sites.")
    step = property(lambda self: self._ctx.step, doc="Optimizer steps completed.")
    path = property(lambda self: self._sink.path, doc="The store's path, or None.")
    measurements = property(lambda self: list(self._ctx.measurements), doc="All measurements.")
    n_records = property(lambda self: self._sink.n_records, doc="Records closed so far.")
    n_committed = property(
        lambda self: self._sink.n_committed,
        doc="Records safely on disk (readable after a crash); without a path, closed so far.",
    )
    attached = property(lambda self: bool(self._hooks), doc="Whether the hooks are registered.")

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose steps are counted (may be set before :meth:`attach`)."""
        return self._ctx.optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self.attached:
            raise RecorderError("set the optimizer before attaching the recorder")
        self._ctx.optimizer = optimizer

    # ------------------------------------------------------------------------ hooks
    def attach(self) -> RecorderCore:
        """Register the hooks (``with rec:`` does this and :meth:`detach` on exit).

        Only the model's own forward hooks and the optimizer hooks stay registered; the sites'
        hooks are added when a scheduled training forward starts and removed when it ends, so
        unscheduled steps run without them.
        """
        if self._hooks:
            raise RecorderError("this recorder is already attached; use one `with rec:` at a time")
        ctx = self._ctx
        for m in ctx.measurements:
            m.check(ctx)
        try:
            self._hooks.forward_pre(ctx.model, self._on_forward_start, with_kwargs=True)
            self._hooks.forward(ctx.model, self._on_forward_end, always_call=True)
            if ctx.optimizer is not None:
                if self._to["before_update"]:
                    self._hooks.optimizer_step_pre(ctx.optimizer, self._before_update)
                self._hooks.optimizer_step_post(ctx.optimizer, self._after_update)
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook this recorder registered (safe to call twice)."""
        ctx = self._ctx
        ctx.forward_hooks.remove()
        ctx.record_hooks.remove()
        self._hooks.remove()
        ctx.source = None

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
                _report_beside(exc, err)

    def _arm(self) -> None:
        """Register the site hooks (for one scheduled forward, and the probe's)."""
        hooks = self._ctx.forward_hooks
        if not hooks:
            for site in self._ctx.sites:
                module = self._ctx.modules[site.module_name]
                hooks.site(module, site.role, functools.partial(self._observe, site))

    def _observe(self, site: Site, x: torch.Tensor | None) -> None:
        ctx = self._ctx
        if x is None or ctx.source is None:
            return
        name = ctx.units.record_name(site, ctx.source, x)
        if name is not None:
            for m in self._to["site"]:
                m.site(ctx, name, x, ctx.source)

    # ------------------------------------------------------------------------ events
    def _on_forward_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ctx = self._ctx
        if ctx.silent:
            return
        if not (module.training and torch.is_grad_enabled()):
            ctx.source = None  # evaluation forwards are not training data
            ctx.forward_hooks.remove()
            return
        step = ctx.step
        self._last_forward_step = step
        if self._pending is not None and self._pending != step:
            self._close_record()
        if not self.schedule(step):
            ctx.source = None
            ctx.forward_hooks.remove()
            return
        self._arm()
        first = self._pending is None
        if first:
            self._pending = step
            if ctx.probe is not None:
                self._run_probe()
        ctx.units.new_forward()
        ctx.source = "train"
        if any(m.wants_batch(ctx) for m in self._to["wants_batch"]):
            # references (no copies) to the step's batch, and the RNG state the forward
            # starts from: recomputations use the same dropout masks
            ctx.batch = StepBatch(args, dict(kwargs), RngState.capture())
        self._in_train_forward = True
        for m in self._to["train_forward"]:
            m.train_forward(ctx, first)

    def _on_forward_end(self, module: nn.Module, args: tuple, output: object) -> None:
        ctx = self._ctx
        if ctx.silent:
            return
        ctx.source = None
        ctx.forward_hooks.remove()
        if self._in_train_forward:
            self._in_train_forward = False
            for m in self._to["train_forward_end"]:
                m.train_forward_end(ctx)

    def _run_probe(self) -> None:
        ctx = self._ctx
        ctx.units.new_forward()
        mode = "eval" if ctx.probe_mode == "eval" else None
        try:
            with ctx.own_forwards("probe"), isolated(ctx.model, mode=mode, grad=False):
                call_with_probe(ctx.model, ctx.probe)
        except RecorderError:  # the record is not opened: forget what the probe left
            self._pending = None
            ctx.forward_hooks.remove()
            for m in ctx.measurements:
                m.reset(ctx)
            ctx.units.forget_unfixed()
            raise
        for m in self._to["after_probe"]:
            m.after_probe(ctx)

    def _before_update(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        ctx = self._ctx
        if self._pending == ctx.step and not ctx.silent:  # a recorded step
            for m in self._to["before_update"]:
                m.before_update(ctx)

    def _after_update(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        ctx = self._ctx
        if self._pending == ctx.step and not ctx.silent:
            for m in self._to["after_update"]:
                m.after_update(ctx)
        ctx.step += 1

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
        self._ctx.step += 1

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
        check_logged(scalars)
        ctx = self._ctx
        step = self._last_forward_step if self._last_forward_step is not None else ctx.step
        if self._pending is None:
            if ctx.logs or not self.schedule(step) or self._last_forward_step is not None:
                return
            self._pending = step  # logs without any forward (e.g. a user-driven loop)
        if step != self._pending:
            return
        for name, value in scalars.items():
            ctx.logs[name] = value.detach() if isinstance(value, torch.Tensor) else value

    # ------------------------------------------------------------------------ records
    def _close_record(self) -> None:
        step, self._pending = self._pending, None
        if step is None:
            return
        ctx = self._ctx
        ctx.record_hooks.remove()  # tensor hooks of the record's activations
        ctx.batch = None
        logs = ctx.logs
        if ctx.layout is None and not ctx.units.base and not logs:
            for m in ctx.measurements:  # nothing seen: the record is dropped
                m.reset(ctx)
            return
        if ctx.layout is None:
            ctx.layout = Layout.fix(ctx)
        record = ctx.layout.record(step, [(m.name, m.collect(ctx)) for m in ctx.measurements])
        ctx.logs = {}
        self._check_divergence(record, logs)
        self._sink.emit(record, self._block)

    def _check_divergence(self, record: dict[str, Any], logs: dict[str, Any]) -> None:
        if self.diverged_step is not None:
            return
        loss_bad = "loss" in logs and not math.isfinite(record["loss"])
        if loss_bad or bool(np.any(record["nonfinite"] > 0)):
            self.diverged_step = int(record["step"])
            self._sink.set_attrs(diverged_step=self.diverged_step)

    def _block(self, records: list[dict[str, Any]]) -> xr.Dataset:
        return self._ctx.layout.block(records, self._attrs())

    def _attrs(self) -> dict[str, Any]:
        seen = set(self._ctx.units.base.values())
        attrs: dict[str, Any] = {
            "icstools_version": __version__,
            "schema_version": SCHEMA_VERSION,
            "recorder_config": json.dumps(self.config()),
            "model_summary": str(self.model)[:20000],
            "model_class": type(self.model).__name__,
            "seed": self._ctx.seed,
            "sites_not_recorded": json.dumps(
                [s.name for s in self.sites if self._ctx.layout and s.name not in seen]
            ),
        }
        if self.diverged_step is not None:
            attrs["diverged_step"] = self.diverged_step
        return attrs

    def config(self) -> dict[str, Any]:
        """The configuration as JSON-able values (stored in the run's attrs): here the
        measurements' own; :class:`~icstools.recording.recorder.Recorder` adds its keywords."""
        return {k: v for m in self._ctx.measurements for k, v in m.config().items()}

    def flush(self) -> None:
        """Close the open record and write everything buffered to the store (waits for it)."""
        self._close_record()
        self._sink.flush(self._block if self._ctx.layout is not None else None)

    def close(self) -> None:
        """Flush and close the store; the in-memory record stays available."""
        try:
            self.flush()
        finally:
            self._sink.close()

    def to_dataset(self) -> xr.Dataset:
        """The run so far as an ``xarray.Dataset`` (DESIGN.md §3).

        With a ``path``, the store is flushed and read back (loaded into memory); without one,
        the dataset is built from the records held in memory.
        """
        self._close_record()
        if self._sink.path is not None:
            self.flush()
        ds = self._sink.dataset(self._ctx.layout, self._attrs())
        if ds is None:
            raise RecorderError(
                "nothing was recorded yet: the schedule selected no training forward so far "
                f"(step {self.step}, schedule {self.schedule!r})"
            )
        return ds


_EVENTS = ("site", "wants_batch", "train_forward", "train_forward_end", "after_probe")
_EVENTS += ("before_update", "after_update")


def _defines(measurement: Measurement, event: str) -> bool:
    """Whether a measurement handles ``event`` (overrides the base class's no-op)."""
    return getattr(type(measurement), event, None) is not getattr(Measurement, event, None)


def _report_beside(exc: BaseException, err: Exception) -> None:
    """Report ``err`` (closing the recorder failed) beside the exception ``exc`` in flight."""
    note = f"icstools: closing the recorder failed as well: {type(err).__name__}: {err}"
    exc.add_note(note)
    try:
        warnings.warn(note, UserWarning, stacklevel=3)
    except Warning:  # warnings are errors here: the note carries it, ``exc`` must propagate
        pass

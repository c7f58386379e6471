"""Closing records and reading the run: the half of the recorder that faces the sink.

:class:`RunRecords` is a base of :class:`~icstools.recording.core.RecorderCore`, which owns the
lifecycle (hooks, steps, events) and opens the records; here a record is closed (the layout
fixed at the first one, each measurement collected, divergence checked), handed to the sink
(memory or a Zarr store), and the run is read back as a dataset.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from icstools import __version__
from icstools.functional.statistics import host_arrays
from icstools.recording.deferred import DeferredRecord, DeferredRecords
from icstools.recording.errors import RecorderError
from icstools.recording.layout import Layout
from icstools.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from icstools.recording.distributed import DistributedRun
    from icstools.recording.measurements import Context
    from icstools.recording.sink import RecordSink

__all__ = ["RunRecords"]


class RunRecords:
    """Records of a run: closed from the measurements, sent to the sink, read back.

    Attributes used here and set by the core: ``_ctx`` (the shared context), ``_sink``,
    ``_pending`` (step of the open record, or ``None``), ``schedule``.
    """

    _ctx: Context
    _sink: RecordSink
    _pending: int | None
    _diverged: int | None = None  # the first step with a non-finite loss or value
    _last: dict[str, Any] | None = None  # the latest closed record
    _dist: DistributedRun | None = None  # DDP / fully_shard: the ranks merged into rank 0's
    _deferred: DeferredRecords  # closed records whose host work waits (set by the core)

    def _close_record(self) -> None:
        step, self._pending = self._pending, None
        if step is None:
            return
        ctx = self._ctx
        ctx.record_hooks.remove()  # tensor hooks of the record's activations
        ctx.batch = None
        if self._dist is not None and not self._dist.exchange(ctx):
            return  # another rank's: merged into rank 0's record, which rank 0 writes
        logs = ctx.logs
        if ctx.layout is None and not ctx.units.base and not logs:
            for m in ctx.measurements:  # nothing seen: the record is dropped
                m.reset(ctx)
            return
        first = ctx.layout is None
        if first:
            ctx.layout = Layout.fix(ctx)
        taken = {} if first or not self._may_defer() else self._take_deferrable(ctx)
        if not taken:
            self._complete_deferred()  # the records before go out first, in step order
        parts = self._collect_now(ctx, skip=taken)
        ctx.logs = {}
        if taken:
            size = sum(int(getattr(t, "nbytes", 0)) for t in taken.values())
            if self._deferred.add(DeferredRecord(step, parts, taken, logs, size)):
                self._complete_deferred()
            return
        self._emit(step, parts, logs)

    def _may_defer(self) -> bool:
        """Whether a record's host work may wait for a batch (nothing reads each record as it
        closes, and no ranks merge them): :mod:`icstools.recording.deferred`."""
        sink = self._sink
        return self._dist is None and sink.on_record is None and not sink.taps

    def _take_deferrable(self, ctx: Context) -> dict[str, Any]:
        taken = {}
        for m in ctx.measurements:
            token = m.defer(ctx)
            if token is not None:
                taken[m.name] = token
        return taken

    def _collect_now(
        self, ctx: Context, skip: dict[str, Any]
    ) -> list[tuple[str, dict[str, Any] | None]]:
        """``(name, host arrays)`` of the measurements not in ``skip`` (``None`` for those):
        every measurement's device tensors of the record reach the host in one transfer."""
        now = [m for m in ctx.measurements if m.name not in skip]
        staged = {(m.name, k): t for m in now for k, t in m.stage(ctx).items()}
        ctx.host = {}
        for (name, k), v in host_arrays(staged).items():
            ctx.host.setdefault(name, {})[k] = v
        parts = [(m.name, None if m.name in skip else m.collect(ctx)) for m in ctx.measurements]
        ctx.host = {}
        return parts

    def _complete_deferred(self) -> None:
        """Collect the waiting records' deferred measurements in one pass each, then send
        the records to the sink in step order."""
        items = self._deferred.take()
        if not items:
            return
        # each deferred measurement's records, in step order, taken one record at a time:
        # a batch of wide records is never held at once
        outs: dict[str, Iterator[dict[str, Any]]] = {}
        for m in self._ctx.measurements:
            taken = [item.taken[m.name] for item in items if m.name in item.taken]
            if taken:
                outs[m.name] = iter(m.collect_many(self._ctx, taken))
        for item in items:
            parts = [(n, next(outs[n]) if a is None else a) for n, a in item.parts]
            self._emit(item.step, parts, item.logs)
            del parts  # before the next record's arrays are made

    def _emit(
        self, step: int, parts: list[tuple[str, dict[str, Any] | None]], logs: dict[str, Any]
    ) -> None:
        record = self._ctx.layout.record(step, parts)
        self._check_divergence(record, logs)
        self._last = record
        self._sink.emit(record, self._block)
        # a record written alone (over half the bound) is on disk: last_record() reads it
        # back, so that the next record is never built beside this one
        self._last = None if self._sink.last_written_alone else record

    def _harvest(self) -> None:
        """Feed what compiled forwards stashed to the measurements (the core defines it)."""

    def _close_finished(self) -> None:
        """Close the open record if its step is over (or the recorder is detached)."""
        self._harvest()
        if self._pending is not None and (self._pending < self.step or not self.attached):
            self._close_record()
        self._complete_deferred()

    @property
    def n_records(self) -> int:
        """Records closed so far."""
        self._complete_deferred()
        return self._sink.n_records

    n_committed = property(
        lambda self: self._sink.n_committed,
        doc="Records safely on disk (readable after a crash); without a path, closed so far.",
    )

    @property
    def diverged_step(self) -> int | None:
        """The first recorded step with a non-finite loss or activation (``None``: none)."""
        self._complete_deferred()
        return self._diverged

    @diverged_step.setter
    def diverged_step(self, step: int | None) -> None:
        self._diverged = step

    def _check_divergence(self, record: dict[str, Any], logs: dict[str, Any]) -> None:
        if self._diverged is not None:
            return
        loss_bad = "loss" in logs and not math.isfinite(record["loss"])
        if loss_bad or bool(np.any(record["nonfinite"] > 0)):
            self._diverged = int(record["step"])
            self._sink.set_attrs(diverged_step=self._diverged)

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
        if self._diverged is not None:
            attrs["diverged_step"] = self._diverged
        if self._dist is not None:
            attrs.update(self._dist.attrs())
        return attrs

    def config(self) -> dict[str, Any]:
        """The configuration as JSON-able values (stored in the run's attrs): here the
        measurements' own; :class:`~icstools.recording.recorder.Recorder` adds its keywords."""
        return {k: v for m in self._ctx.measurements for k, v in m.config().items()}

    def flush(self) -> None:
        """Write the records of finished steps to the store (waits for it); the record of a
        step in progress stays open (:meth:`close` closes it)."""
        self._close_finished()
        self._sink.flush(self._block if self._ctx.layout is not None else None)

    def close(self) -> None:
        """Close the open record, flush and close the store; the in-memory records stay."""
        try:
            self._harvest()
            self._close_record()
            self._complete_deferred()
            self._sink.flush(self._block if self._ctx.layout is not None else None)
        finally:
            self._sink.close()

    def last_record(self) -> xr.Dataset | None:
        """The latest closed record as a one-step dataset (``None`` before the first).

        A record over half of ``buffer_bytes`` is not kept once the store has it (so that a
        wide site's next record is never built beside it): it is read back from the store."""
        self._complete_deferred()
        if self._last is None and self._sink.last_written_alone:
            return self._sink.last_stored()
        return None if self._last is None else self._block([self._last])

    def to_dataset(self) -> xr.Dataset:
        """The run so far as an ``xarray.Dataset`` (DESIGN.md §3): the records of finished
        steps. Called in the middle of a step (before its ``optimizer.step()``), it leaves that
        step's record open: the call never changes what is recorded.

        With a ``path``, the store is flushed and read back (loaded into memory); without one,
        the dataset is built from the records held in memory. In a distributed run
        (:mod:`icstools.recording.distributed`) call it on every rank: each gets rank 0's
        merged run.
        """
        self._close_finished()
        if self._dist is not None:
            return self._dist.share(self._dataset)
        return self._dataset()

    def _dataset(self) -> xr.Dataset:
        if self._sink.path is not None:
            self.flush()
        # a resumed store holds records of the run before the restart
        held = self.n_records or self._sink.n_committed
        ds = self._sink.dataset(self._ctx.layout, self._attrs()) if held else None
        if ds is None and self._pending is not None:
            raise RecorderError(
                f"nothing was recorded yet: step {self._pending} is in progress, and its record "
                "closes once the step is over (after its optimizer.step() or step_done()) or "
                "when the recorder closes (leaving `with`, rec.close())"
            )
        if ds is None:
            raise RecorderError(
                "nothing was recorded yet: the schedule selected no training forward so far "
                f"(step {self.step}, schedule {self.schedule!r})"
            )
        return ds

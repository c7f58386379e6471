"""Deferred records: the host work of several closed records done in one pass.

On a small model a record's host work (sorting the kept values for the quantiles, moments,
histograms, the final statistics) is a few dozen small numpy operations whose fixed cost
exceeds a training step. A measurement that can wait (:meth:`Measurement.defer
<icstools.recording.measurements.Measurement.defer>`: the activation statistics while every
value is kept on the CPU) hands its record's state over when the record closes; the states of
up to :data:`MAX_RECORDS` records (or :data:`MAX_BYTES` of kept values, or
:data:`MAX_SECONDS` of training) are then reduced together (:meth:`collect_many
<icstools.recording.measurements.Measurement.collect_many>`), which pays that fixed cost once
per batch instead of once per record. The results are the same as record by record.

A deferred record is not lost and never reordered: the records of a batch go to the sink in
step order, before any later record; everything that reads the run (``to_dataset``,
``flush``, ``last_record``, ``n_records``, ``diverged_step``, ``close``, ``detach``) completes
the batch first. Records are not deferred when something consumes each record as it closes
(``on_record``, a live view) or ranks merge them (distributed runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_BYTES", "MAX_RECORDS", "MAX_SECONDS", "DeferredRecord", "DeferredRecords"]

#: Most records whose host work waits (at every step of the paper's MLP: 32 steps).
MAX_RECORDS = 32
#: Most bytes of kept values waiting (and at most an eighth of the recorder's buffer_bytes).
MAX_BYTES = 4 * 2**20
#: Longest wait, in seconds of wall time since the oldest waiting record closed.
MAX_SECONDS = 2.0


@dataclass
class DeferredRecord:
    """One closed record whose deferred measurements wait.

    ``parts`` are ``(measurement name, host arrays)`` in the measurements' order, with
    ``None`` for a deferred measurement; ``taken`` maps those to what their ``defer``
    returned; ``logs`` are the record's logged scalars (for the divergence check).
    """

    step: int
    parts: list[tuple[str, dict[str, Any] | None]]
    taken: dict[str, Any]
    logs: dict[str, Any]
    nbytes: int = 0


@dataclass
class DeferredRecords:
    """The waiting records, in step order, and when they must be completed."""

    buffer_bytes: int
    items: list[DeferredRecord] = field(default_factory=list)
    nbytes: int = 0
    _since: float = 0.0

    def add(self, item: DeferredRecord) -> bool:
        """Queue a record; ``True`` when the batch is full (complete it now)."""
        if not self.items:
            self._since = time.monotonic()
        self.items.append(item)
        self.nbytes += item.nbytes
        return (
            len(self.items) >= MAX_RECORDS
            or self.nbytes >= min(MAX_BYTES, self.buffer_bytes // 8)
            or time.monotonic() - self._since > MAX_SECONDS
        )

    def take(self) -> list[DeferredRecord]:
        """The waiting records (and none wait any more)."""
        items, self.items, self.nbytes = self.items, [], 0
        return items

    def __len__(self) -> int:
        return len(self.items)

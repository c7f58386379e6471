"""Where closed records go: kept in memory, or buffered and streamed to a Zarr store.

Records are appended in blocks of ``chunk_steps`` (or when ``flush_seconds`` passed since the
last write, so a crash loses at most that much) by the store's background writer
(:class:`icstools.store.BackgroundWriter`); the store module does all the I/O. The training
thread only copies each record into rows of per-variable arrays (a
:class:`~icstools.store.process.StackedBlock`): the dataset is built, encoded and written
elsewhere. When the training loop fills the first block, the writer moves to a child process
(:class:`~icstools.store.process.WriterProcess`) so that zarr's Python does not take the GIL
from the loop; a run whose first block is written by ``flush``/``close`` (a short run) is
written by a thread of this process, which avoids starting a process (~1 s) for it. The
environment variable ``ICSTOOLS_STORE_WRITER`` = ``process`` or ``thread`` forces either
(default ``auto``).

``on_record``: each closed record, as a one-step dataset, is handed to user code (W&B, MLflow,
anything) on the training thread right after the record is closed and queued for the store (so
it is never lost to the callback). A failing callback is warned about once
(:class:`RuntimeWarning` naming its error); recording goes on and the callback keeps being
called for later records.

Memory is bounded in bytes (``buffer_bytes``): the rows of records waiting for the writer, the
latest record and the blocks the writer has not committed yet together stay within the bound.
A block is handed over early once the buffered records reach a quarter of it, and the sink
waits for the writer before buffering a record that would not fit beside the blocks in
flight. A record larger than half the bound is written on its own, from its own arrays, and
the training waits for that write: the sink then holds one record at most. With a writer
process, the child holds its copy of the block it writes (in its own memory). In memory
(``path=None``) every record is kept: the bound cannot apply, and the sink warns once when the
run outgrows it.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from icstools.recording.layout import Layout
from icstools.schema import STEP
from icstools.store import BackgroundWriter, RunWriter, open_run
from icstools.store.process import StackedBlock

__all__ = ["DEFAULT_BUFFER_BYTES", "WRITER_ENV", "RecordSink", "record_nbytes"]

DEFAULT_BUFFER_BYTES = 256 * 2**20
WRITER_ENV = "ICSTOOLS_STORE_WRITER"  # auto (default), process or thread
_WRITERS = ("auto", "process", "thread")


def record_nbytes(record: dict[str, Any]) -> int:
    """Bytes held by one closed record (its arrays; 8 per scalar).

    Examples
    --------
    >>> record_nbytes({"step": 3, "mean": np.zeros((1, 100), np.float32)})
    408
    """
    return sum(int(getattr(v, "nbytes", 8)) for v in record.values())


class RecordSink:
    """The records of one run: in memory (``path=None``) or streamed to the store at ``path``."""

    def __init__(
        self,
        path: str | Path | None,
        *,
        overwrite: bool,
        chunk_steps: int,
        resume: bool = False,
        flush_seconds: float,
        on_record: Callable[[xr.Dataset], Any] | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int) or chunk_steps < 2:
            raise ValueError(
                f"chunk_steps must be an int ≥ 2 (a chunk of 1 step is slow), got {chunk_steps!r}"
            )
        if not flush_seconds > 0:
            raise ValueError(f"flush_seconds must be > 0, got {flush_seconds!r}")
        if on_record is not None and not callable(on_record):
            raise TypeError(
                "on_record must be a callable taking one xarray.Dataset (one record), got "
                f"{type(on_record).__name__}"
            )
        self.on_record = on_record
        self.on_record_errors = 0  # failed calls of on_record (the first one is warned about)
        # in-process viewers (icstools.live): tap(record, block) gets each closed record as it
        # is (no dataset is built for it here) and must only queue it: it runs on the
        # training thread, and building a one-step dataset costs milliseconds
        self.taps: list[Callable[[dict[str, Any], Callable[[list], xr.Dataset]], None]] = []
        if (
            isinstance(buffer_bytes, bool)
            or not isinstance(buffer_bytes, int | np.integer)
            or buffer_bytes < 2**20
        ):
            raise ValueError(
                f"buffer_bytes must be an int ≥ 1 MiB (1048576), got {buffer_bytes!r}; the "
                f"default is {DEFAULT_BUFFER_BYTES} (256 MiB)"
            )
        self.buffer_bytes = int(buffer_bytes)
        self.path = None if path is None else Path(path)
        self.chunk_steps = chunk_steps
        self.flush_seconds = float(flush_seconds)
        self.records: list[dict[str, Any]] = []  # all of them (in memory only)
        self.n_records = 0
        self.buffered_bytes = 0  # of the records not handed to the writer yet
        self.last_record_bytes: int | None = None
        self.peak_bytes = 0  # most bytes held at once: buffered + block + in flight
        self._in_flight: deque[tuple[int, int]] = deque()  # (records up to, bytes) submitted
        self._warned_memory = False
        self._last_write = time.monotonic()
        self._writer: BackgroundWriter | None = None
        self._rows: _Rows | None = None  # the buffered records of a store, stacked
        self._template: xr.Dataset | None = None  # the run's structure: a block of 0 steps
        # the latest record went to the store alone (over half the bound) and is not kept
        self.last_written_alone = False
        self.writer_kind = os.environ.get(WRITER_ENV, "auto") or "auto"
        if self.writer_kind not in _WRITERS:
            raise ValueError(
                f"the environment variable {WRITER_ENV}={self.writer_kind!r} is not valid: "
                f"use one of {_WRITERS}"
            )
        if self.path is not None:
            self._writer = BackgroundWriter(
                RunWriter(self.path, chunk_steps=chunk_steps, overwrite=overwrite, resume=resume)
            )

    @property
    def store_writer(self) -> RunWriter | None:
        """The store's writer (``resumed``, ``drop_from`` with ``resume=True``), or None."""
        return None if self._writer is None else self._writer.writer

    @property
    def n_committed(self) -> int:
        """Records safely on disk (without a store: the records closed so far)."""
        return self._writer.n_committed if self._writer is not None else self.n_records

    def emit(self, record: dict[str, Any], block: Callable[[list], xr.Dataset]) -> None:
        """Take one closed record; ``block(records)`` makes a dataset block of records."""
        self.n_records += 1
        self.last_record_bytes = size = record_nbytes(record)
        if self._writer is None:
            self.records.append(record)
            self.buffered_bytes += size
            self._note_peak(0)
            self._warn_if_outgrown()
        elif 2 * size > self.buffer_bytes:
            self._write_alone(record, size, block)
        else:
            self.last_written_alone = False
            self._buffer(record, size, block)
            if (
                self._rows.n >= self.chunk_steps
                or self.buffered_bytes >= self.buffer_bytes // 4
                or time.monotonic() - self._last_write > self.flush_seconds
            ):
                self.submit(block, by_training=True)
        for tap in self.taps:
            tap(record, block)
        if self.on_record is not None:  # after the record is kept: a failing callback loses none
            self._deliver(block([record]))

    def _buffer(self, record: dict[str, Any], size: int, block: Callable[[list], xr.Dataset]):
        """Copy ``record`` into the rows of the next block (waiting for the writer first if
        that would exceed ``buffer_bytes``: the rows, the record itself, the blocks in flight).
        """
        self._fix_template(block)
        if self._bytes_in_flight() + self.buffered_bytes + 2 * size > self.buffer_bytes:
            self._writer.flush()  # back-pressure: only when wide records fill the bound
            self._in_flight.clear()
        if self._rows is None:
            self._rows = _Rows(record, self.chunk_steps)
        self._rows.add(record)
        self.buffered_bytes += size
        self._note_peak(self._bytes_in_flight() + size)  # the recorder still holds the record

    def _write_alone(
        self, record: dict[str, Any], size: int, block: Callable[[list], xr.Dataset]
    ) -> None:
        """A record larger than half the bound: handed to the writer as a block of its own,
        made of the record's arrays (no copy), and waited for. The sink then never holds more
        than that record (a copy into rows, or the next record beside a block in flight, would
        make two), at the cost of the training waiting for each such write."""
        self._fix_template(block)
        self.submit(block, by_training=True)  # smaller records buffered before it go first
        if self.writer_kind != "thread":  # as submit does for the training loop's blocks
            self._writer.start_process()  # (does nothing once it is a process)
        self._writer.flush()
        self._in_flight.clear()
        arrays = {  # [1, *record shape]: views of the record's arrays
            name: np.asarray(v, np.int64 if name == STEP else None)[None]
            for name, v in record.items()
        }
        self._writer.submit(StackedBlock(self._template, arrays))
        self._note_peak(size)  # the record, held once: by the recorder and by the writer
        self._writer.flush()
        self._last_write = time.monotonic()
        self.last_written_alone = True

    def _fix_template(self, block: Callable[[list], xr.Dataset]) -> None:
        """At the first record to a store: the block's structure (zero steps, no memory) and
        the store's chunks along ``step``."""
        if self._template is None:
            self._template = block([])
            self._fit_chunks()

    def _warn_if_outgrown(self) -> None:
        """In memory every record is kept: say once when the run outgrows ``buffer_bytes``."""
        if self.buffered_bytes > self.buffer_bytes and not self._warned_memory:
            self._warned_memory = True
            warnings.warn(
                f"the records of this in-memory run hold {self.buffered_bytes / 2**20:.0f} "
                f"MiB, more than buffer_bytes ({self.buffer_bytes / 2**20:.0f} MiB), and keep "
                "growing: give the Recorder a path= to stream them to a store with bounded "
                "memory, or record fewer steps or sites",
                ResourceWarning,
                stacklevel=5,
            )

    def _deliver(self, data: xr.Dataset) -> None:
        """Call ``on_record(data)``; its first error is warned about, later ones counted."""
        try:
            self.on_record(data)
        except Exception as exc:
            self.on_record_errors += 1
            if self.on_record_errors == 1:
                name = getattr(self.on_record, "__qualname__", type(self.on_record).__name__)
                warnings.warn(
                    f"on_record callback {name} failed at step {int(data['step'][0])} "
                    f"({type(exc).__name__}: {exc}); the record is kept and recording goes on; "
                    "the callback is still called for later records, and its further errors "
                    "are not warned about again (Recorder.on_record_errors counts them)",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def submit(self, block: Callable[[list], xr.Dataset], *, by_training: bool = False) -> None:
        """Hand the buffered records to the background writer (no wait). The first block
        handed over by the training loop (``by_training``) moves the writer to a process."""
        if self._writer is None or self._rows is None or not self._rows.n:
            return
        if self.writer_kind == "process" or (by_training and self.writer_kind == "auto"):
            self._writer.start_process()  # does nothing once it is a process
        data = StackedBlock(self._template, self._rows.taken())
        self._writer.submit(data)
        self._in_flight.append((self.n_records, self.buffered_bytes))
        self._rows, self.buffered_bytes = None, 0
        self._last_write = time.monotonic()

    def _fit_chunks(self) -> None:
        """Lower the store's chunk length along ``step`` for wide records, so that a chunk row
        fits a quarter of the bound: a block smaller than a chunk rewrites the chunk, and
        wide records are written in small blocks (a record over a quarter of the bound: one
        step per chunk row, and no chunk is ever read back, merged and rewritten)."""
        fit = max(1, (self.buffer_bytes // 4) // max(self.last_record_bytes or 1, 1))
        if fit < self.chunk_steps and self._writer is not None:
            self.chunk_steps = fit
            self._writer.writer.chunk_steps = fit  # read by the writer at its first append

    def _bytes_in_flight(self) -> int:
        """Bytes of submitted blocks the writer has not committed yet."""
        committed = self._writer.n_committed if self._writer is not None else self.n_records
        while self._in_flight and self._in_flight[0][0] <= committed:
            self._in_flight.popleft()
        return sum(size for _, size in self._in_flight)

    def _note_peak(self, other_bytes: int) -> None:
        self.peak_bytes = max(self.peak_bytes, self.buffered_bytes + other_bytes)

    def set_attrs(self, **attrs: Any) -> None:
        """Attributes of the stored run, written with the next commit."""
        if self._writer is not None:
            self._writer.set_attrs(**attrs)

    def flush(self, block: Callable[[list], xr.Dataset] | None) -> None:
        """Write everything buffered and wait until it is committed."""
        if self._writer is not None:
            if block is not None:
                self.submit(block)
            self._writer.flush()

    def close(self) -> None:
        """Close the store (the in-memory records stay)."""
        if self._writer is not None:
            self._writer.close()

    def last_stored(self) -> xr.Dataset:
        """The latest committed record, read back from the store (a one-step dataset)."""
        return open_run(self.path).isel(step=slice(-1, None)).load()

    def dataset(self, layout: Layout | None, attrs: dict[str, Any]) -> xr.Dataset | None:
        """The whole run: read back from the store, or built from memory (``None``: empty)."""
        if self.path is not None:
            return open_run(self.path).load()
        if layout is None or not self.records:
            return None
        return layout.block(self.records, attrs)


class _Rows:
    """Records copied into the rows of per-variable arrays ``[rows, *record shape]``."""

    def __init__(self, first: dict[str, Any], rows: int) -> None:
        self.arrays = {
            name: np.empty((rows, *np.shape(v)), np.int64 if name == STEP else np.asarray(v).dtype)
            for name, v in first.items()
        }
        self.n = 0

    def add(self, record: dict[str, Any]) -> None:
        i = self.n
        for name, rows in self.arrays.items():
            rows[i] = record[name]
        self.n = i + 1

    def taken(self) -> dict[str, np.ndarray]:
        """The filled rows (views): handed to the writer, not written here any more."""
        return {name: rows[: self.n] for name, rows in self.arrays.items()}

"""Where closed records go: kept in memory, or buffered and streamed to a Zarr store.

Records are appended in blocks of ``chunk_steps`` (or when ``flush_seconds`` passed since the
last write, so a crash loses at most that much) by the store's background writer
(:class:`icstools.store.BackgroundWriter`); the store module does all the I/O.

``on_record``: each closed record, as a one-step dataset, is handed to user code (W&B, MLflow,
anything) on the training thread right after the record is closed and queued for the store (so
it is never lost to the callback). A failing callback is warned about once
(:class:`RuntimeWarning` naming its error); recording goes on and the callback keeps being
called for later records.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xarray as xr

from icstools.recording.layout import Layout
from icstools.store import BackgroundWriter, RunWriter, open_run

__all__ = ["RecordSink"]


class RecordSink:
    """The records of one run: in memory (``path=None``) or streamed to the store at ``path``."""

    def __init__(
        self,
        path: str | Path | None,
        *,
        overwrite: bool,
        chunk_steps: int,
        flush_seconds: float,
        on_record: Callable[[xr.Dataset], Any] | None = None,
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
        self.path = None if path is None else Path(path)
        self.chunk_steps = chunk_steps
        self.flush_seconds = float(flush_seconds)
        self.records: list[dict[str, Any]] = []  # all of them (memory), or the buffered ones
        self.n_records = 0
        self._last_write = time.monotonic()
        self._writer: BackgroundWriter | None = None
        if self.path is not None:
            self._writer = BackgroundWriter(
                RunWriter(self.path, chunk_steps=chunk_steps, overwrite=overwrite)
            )

    @property
    def n_committed(self) -> int:
        """Records safely on disk (without a store: the records closed so far)."""
        return self._writer.n_committed if self._writer is not None else self.n_records

    def emit(self, record: dict[str, Any], block: Callable[[list], xr.Dataset]) -> None:
        """Take one closed record; ``block(records)`` makes a dataset block of records."""
        self.records.append(record)
        self.n_records += 1
        if self._writer is not None and (
            len(self.records) >= self.chunk_steps
            or time.monotonic() - self._last_write > self.flush_seconds
        ):
            self.submit(block)
        if self.on_record is not None:  # after the record is kept: a failing callback loses none
            self._deliver(block([record]))

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

    def submit(self, block: Callable[[list], xr.Dataset]) -> None:
        """Hand the buffered records to the background writer (no wait)."""
        if self._writer is None or not self.records:
            return
        data = block(self.records)
        self.records = []
        self._writer.submit(data)
        self._last_write = time.monotonic()

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

    def dataset(self, layout: Layout | None, attrs: dict[str, Any]) -> xr.Dataset | None:
        """The whole run: read back from the store, or built from memory (``None``: empty)."""
        if self.path is not None:
            return open_run(self.path).load()
        if layout is None or not self.records:
            return None
        return layout.block(self.records, attrs)

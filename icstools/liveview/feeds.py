"""Where a live view's records come from: a :class:`~icstools.Recorder` in this process, or a
run store that another process writes.

A feed is polled by the view's thread: :meth:`poll` returns the blocks of records that arrived
since the last call (run datasets with a ``step`` dimension) and a status line; :meth:`done`
says whether no more will come. Neither blocks the training.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xarray as xr

from icstools.liveview.data import NEEDED
from icstools.recording.core import RecorderCore
from icstools.store import StoreError, live_writer, open_run

__all__ = ["RecorderFeed", "StoreFeed", "make_feed"]


class RecorderFeed:
    """The records of a :class:`~icstools.Recorder` in this process, as they close.

    The recorder's sink hands each closed record (a dict of arrays) to :meth:`_tap` on the
    training thread, which only appends it to a deque (O(1), no copy, no dataset built); the
    view's thread stacks the queued records into one dataset per poll. Records closed before
    the feed started are read once with :meth:`~icstools.Recorder.to_dataset`.
    """

    label = "recorder in this kernel"

    def __init__(self, recorder: RecorderCore) -> None:
        self.recorder = recorder
        self._queue: deque[dict[str, Any]] = deque()
        self._block: Callable[[list], xr.Dataset] | None = None
        self._backfill: xr.Dataset | None = None
        self._seen_attached = False
        self._detached_polls = 0

    def start(self) -> None:
        """Tap the recorder; the records it closed already are read now (on this thread)."""
        rec = self.recorder
        if rec.n_records:
            self._backfill = rec.to_dataset()
        # the sink is private to the recorder; its `taps` exist for in-process viewers
        rec._sink.taps.append(self._tap)

    def _tap(self, record: dict[str, Any], block: Callable[[list], xr.Dataset]) -> None:
        # on the training thread: keep it O(1)
        self._block = block
        self._queue.append(record)

    def take(self) -> tuple[list[xr.Dataset], list[dict[str, Any]], Any]:
        """What arrived since the last call: the records closed before the view started (a
        dataset, once), the records queued since, and the sink's block builder."""
        blocks = [] if self._backfill is None else [self._backfill]
        self._backfill = None
        records = []
        while self._queue:
            records.append(self._queue.popleft())
        return blocks, records, self._block

    def status(self) -> str:
        """A status line."""
        attached = self.recorder.attached
        if not self.recorder.n_records:
            return "waiting for the first record" + ("" if attached else " (not attached yet)")
        return "recording" if attached else "recorder detached"

    def done(self) -> bool:
        """Whether the recorder was attached (or recorded) and is detached since: at two calls
        in a row, as its last record closes right after it detaches. Called every
        ``interval`` by the view, which then takes in what is queued one last time."""
        attached = self.recorder.attached
        self._seen_attached |= attached
        self._detached_polls = 0 if attached else self._detached_polls + 1
        started = self._seen_attached or self.recorder.n_records > 0
        return started and self._detached_polls >= 2

    def close(self) -> None:
        """Remove the tap (idempotent)."""
        taps = self.recorder._sink.taps
        if self._tap in taps:
            taps.remove(self._tap)


class StoreFeed:
    """The records of the run store at ``path``, as another process commits them.

    Each poll opens the store lazily (its last commit, a consistent snapshot) and loads only
    the records after those already read, of the variables the view needs. A store that does
    not exist yet, or has no commit yet, is waited for; a store whose step count shrank was
    replaced (``overwrite=True``), and is read again from its start.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser().absolute()
        self.label = f"store {self.path}"
        self.n_read = 0
        self.replaced = 0

    def start(self) -> None:
        """Nothing to set up: the store is read when polled."""

    def poll(self) -> tuple[list[xr.Dataset], str]:
        """The records committed since the last poll, and a status line."""
        if not os.path.isdir(self.path):
            return [], f"waiting for the run store {self.path} (nothing there yet)"
        try:
            ds = open_run(self.path, chunks={})
        except FileNotFoundError:
            return [], f"waiting for the run store {self.path} (nothing there yet)"
        except StoreError as exc:
            if "no commit marker" in str(exc):
                return [], f"waiting for the first commit of {self.path}"
            return [], f"cannot read the store: {exc}"
        n = ds.sizes["step"]
        if n < self.n_read:  # a new run replaced the store
            self.n_read, self.replaced = 0, self.replaced + 1
        status = f"{n} records committed" + (" (store replaced)" if self.replaced else "")
        if n == self.n_read:
            ds.close()
            return [], status
        unused = [v for v in ds.data_vars if v not in NEEDED]
        try:  # the coordinates stay (sites, units, levels), the unused variables are dropped
            new = ds.drop_vars(unused).isel(step=slice(self.n_read, n)).load()
        except StoreError as exc:
            return [], f"cannot read the store: {exc}"
        finally:
            ds.close()
        self.n_read = n
        return [new], status

    def done(self) -> bool:
        """Whether the store exists and no live writer holds it (its writer closed, or was
        killed): the view then reads it one last time."""
        return os.path.isdir(self.path) and live_writer(self.path) is None

    def close(self) -> None:
        """Nothing to release."""


def make_feed(source: Any) -> RecorderFeed | StoreFeed:
    """The feed of ``source``: a Recorder, or the path of a run store (str or PathLike)."""
    if isinstance(source, RecorderCore):
        return RecorderFeed(source)
    if isinstance(source, str | os.PathLike):
        return StoreFeed(source)
    raise TypeError(
        "icstools.live(source): source must be an icstools.Recorder (in this process) or the "
        f"path of a run store (str or os.PathLike), got {type(source).__name__}"
    )

"""Writing runs from a worker thread: :class:`BackgroundWriter` (see :mod:`icstools.store`)."""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

import xarray as xr

from icstools.store.errors import StoreError
from icstools.store.files import _RESERVED_ATTRS, logger
from icstools.store.process import StackedBlock, WriterProcess
from icstools.store.writer import RunWriter, _json_attr

__all__ = ["BackgroundWriter"]

# --------------------------------------------------------------------------------------------
# BackgroundWriter
# --------------------------------------------------------------------------------------------

_STOP = object()


class BackgroundWriter:
    """Wraps a :class:`RunWriter`: ``submit(block)`` returns at once, a worker thread writes.

    A single worker thread appends the submitted blocks in order. :meth:`flush` waits until all
    submitted blocks are committed; :meth:`close` flushes, stops the worker and closes the
    :class:`RunWriter`. If writing a block fails, the exception is re-raised, wrapped in
    :class:`StoreError` naming the path, at the next :meth:`submit`, :meth:`flush`,
    :meth:`set_attrs` or :meth:`close`; blocks submitted after the failing one are discarded,
    everything committed before stays readable, and the writer accepts no more blocks. Also a
    context manager.

    Parameters
    ----------
    writer : RunWriter or str or os.PathLike
        The writer to drive, or a path for a new ``RunWriter(path, **kwargs)``.
    max_pending : int, default 64
        At most this many items wait in the queue; ``submit`` blocks beyond (back-pressure).
    **kwargs
        Passed to :class:`RunWriter` when ``writer`` is a path.

    Notes
    -----
    Do not modify a block after submitting it: it is written later, by the worker.

    Examples
    --------
    >>> with BackgroundWriter(tmp_path / "run.zarr", chunk_steps=64) as bw:  # doctest: +SKIP
    ...     for start in range(0, 640, 64):
    ...         bw.submit(make_block(start, 64))  # returns at once
    ...     bw.flush()  # all 640 steps are committed here
    ...     bw.set_attrs(diverged_step=600)
    """

    def __init__(
        self, writer: RunWriter | str | os.PathLike, *, max_pending: int = 64, **kwargs: Any
    ) -> None:
        if not isinstance(writer, RunWriter):
            writer = RunWriter(writer, **kwargs)
        elif kwargs:
            raise TypeError("RunWriter keyword arguments are only accepted with a path")
        self.writer = writer
        self.path = writer.path
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._error: BaseException | None = None
        self._error_reported = False
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"icstools-writer-{writer.path.name}", daemon=True
        )
        self._thread.start()

    @property
    def n_committed(self) -> int:
        """Number of steps committed so far by the worker."""
        return self.writer.n_committed

    def submit(self, block: xr.Dataset | StackedBlock) -> None:
        """Queue ``block`` for appending and return at once (blocks only if the queue is full).

        A :class:`~icstools.store.process.StackedBlock` is turned into a dataset by the worker
        (or by the writer process), not by the caller."""
        self._raise_if_failed()
        if self._closed:
            raise ValueError(f"BackgroundWriter for {self.path} is closed")
        if not isinstance(block, xr.Dataset | StackedBlock):
            raise TypeError(f"block must be an xarray.Dataset, got {type(block).__name__}")
        if isinstance(self.writer, WriterProcess) and not isinstance(block, StackedBlock):
            raise TypeError("a writer process takes StackedBlock blocks only")
        self._put(("block", block))

    def start_process(self) -> None:
        """Write from now on in a child process (:class:`WriterProcess`) instead of this one:
        the GIL stays with the caller. Waits for the blocks submitted so far; a store that has
        commits (written from this process, or resumed) is continued by the child. Does
        nothing if the writer is already a process."""
        if not isinstance(self.writer, RunWriter):
            return
        self.flush()  # blocks and attrs queued so far are committed or staged: the child
        # adopts the commits and takes the staged attrs
        try:
            self.writer = WriterProcess(self.writer)
        except (OSError, ValueError) as exc:  # no interpreter to start, no pass_fds (Windows)
            logger.warning("%s: no writer process (%r); writing from a thread", self.path, exc)

    def set_attrs(self, **attrs: Any) -> None:
        """Set run attrs, in order with the submitted blocks.

        The worker persists them with the next block's commit, or on their own if no block is
        pending then. See :meth:`RunWriter.set_attrs`.
        """
        self._raise_if_failed()
        if self._closed:
            raise ValueError(f"BackgroundWriter for {self.path} is closed")
        bad = _RESERVED_ATTRS.intersection(attrs)
        if bad:
            raise ValueError(f"attrs {sorted(bad)} are reserved by the store")
        self._put(("attrs", {k: _json_attr(k, v) for k, v in attrs.items()}))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every submitted block is committed.

        Raises
        ------
        TimeoutError
            Not done within ``timeout`` seconds.
        StoreError
            The worker failed (see the class docstring).
        """
        with self._cond:
            target = self._submitted
            ok = self._cond.wait_for(
                lambda: self._done >= target or self._error is not None, timeout=timeout
            )
        self._raise_if_failed()
        if not ok:
            raise TimeoutError(
                f"{self.path}: {target - self._done} submitted items not committed within "
                f"{timeout} s"
            )

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the worker and close the RunWriter.

        Re-raises (as StoreError) a worker failure that was not reported yet; pending attrs are
        still persisted then. Calling it again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self.path}: the writer thread did not finish in {timeout} s")
        try:
            self.writer.close()
        finally:
            if not self._error_reported:
                self._raise_if_failed()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not mask the exception in flight
            self.close()
        except Exception:
            logger.exception("closing %r after an error also failed", self)

    def __repr__(self) -> str:
        return f"BackgroundWriter({str(self.path)!r}, n_committed={self.n_committed})"

    # ---- internals --------------------------------------------------------------------------

    def _put(self, item: Any) -> None:
        with self._cond:
            self._submitted += 1
        self._queue.put(item)

    def _raise_if_failed(self) -> None:
        if self._error is None:
            return
        if self._error_reported:
            raise StoreError(f"writing run {self.path} failed earlier: {self._error!r}")
        self._error_reported = True
        raise StoreError(
            f"writing run {self.path} failed: {self._error!r}; {self.n_committed} steps committed"
        ) from self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            kind, payload = item
            if self._error is None:
                try:
                    if kind == "block":
                        if isinstance(payload, StackedBlock) and isinstance(self.writer, RunWriter):
                            payload = payload.dataset()
                        self.writer.append(payload)
                    elif self._queue.empty():
                        self.writer.set_attrs(**payload)
                    else:  # more is pending: persist them with the next commit
                        self.writer._stage_attrs(payload)
                except BaseException as exc:
                    with self._cond:
                        self._error = exc
            # not kept while waiting for the next item: a wide block would stay alive beside
            # the next record the training builds
            item = payload = None
            with self._cond:
                self._done += 1
                self._cond.notify_all()

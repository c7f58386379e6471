"""The live view's worker process: takes records in, computes the series and draws the figure.

All the view's work runs here, in a process of its own at a lower priority (``nice`` 10), so
that it never holds the training process's interpreter lock: a Python thread in the training
process that draws for a second stalls the training far longer than that, as every torch call
that releases the lock waits for it to come back (measured on 2 busy cores: 0.8 s of drawing
slowed 240 steps from 5 s to 18 s). The training process only queues records and forwards
them through a pipe.

Messages to the worker: ``("schema", ds)`` (a one-step dataset: the run's variables,
coordinates and attrs), ``("records", [record, ...])`` (dicts of arrays, as the recorder's
sink holds them), ``("select", site, activations, unit)``, ``("finish", state)`` and
``("stop",)``. From the worker: ``("frame", png or None, info)`` and, last, ``("end", info)``.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import time
from typing import Any

import numpy as np
import xarray as xr

from icstools.liveview.data import LiveData
from icstools.liveview.feeds import StoreFeed

__all__ = ["Connection", "main", "stack_records"]


def stack_records(schema: xr.Dataset, records: list[dict[str, Any]]) -> xr.Dataset:
    """Records (dicts of arrays without ``step``) stacked into a dataset shaped as ``schema``.

    Examples
    --------
    >>> schema = xr.Dataset({"loss": (("step",), [0.0])}, coords={"step": [0]})
    >>> stack_records(schema, [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5}]).loss.values
    array([1. , 0.5])
    """
    data = {}
    for name in schema.data_vars:
        dims = schema[name].dims
        data[name] = (dims, np.stack([np.asarray(r[name]) for r in records], dims.index("step")))
    coords = {k: v for k, v in schema.coords.items() if "step" not in v.dims}
    coords["step"] = ("step", np.array([int(r["step"]) for r in records], dtype=np.int64))
    return xr.Dataset(data, coords=coords, attrs=schema.attrs)


class _Worker:
    def __init__(self, conn: Any, spec: dict[str, Any]) -> None:
        self.conn = conn
        self.data = LiveData(spec["max_records"])
        self.feed = StoreFeed(spec["path"]) if spec.get("path") else None
        self.label = spec["label"]
        self.interval = spec["interval"]
        self.max_busy = spec["max_busy"]
        self.site, self.activations, self.unit = spec["site"], spec["activations"], None
        self.schema: xr.Dataset | None = None
        self.state, self.feed_status, self.error = "following", "", None
        self.updates = self.draws = 0
        self.replaced = 0
        self.dirty = True
        self.next_draw = 0.0
        self.finishing = False  # no more records: draw once more, then only redraw on request
        self.finished = False
        self.stopping = False  # draw once more and end
        self.pending: list[dict[str, Any]] = []  # records received, not taken in yet

    # ---------------------------------------------------------------- messages
    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "schema":
            self.schema = msg[1]
        elif kind == "records":  # taken in together, once per wake-up
            self.pending.extend(msg[1])
        elif kind == "select":
            self.site, self.activations, self.unit = msg[1:]
            self.dirty, self.next_draw = True, 0.0
        elif kind == "status":
            self.feed_status = msg[1]
        elif kind == "finish":
            self.state, self.finishing = msg[1], True
        elif kind == "stop":
            self.stopping = True
            if not self.finished:
                self.state = "stopped"

    def take_in(self, blocks: list[xr.Dataset]) -> None:
        new = sum(self.data.add(b) for b in blocks)
        if new:
            self.updates += 1
            self.dirty = True
            self.fix_selection()

    def fix_selection(self) -> None:
        d = self.data
        if self.site not in d.sites:
            if self.site is not None and self.error is None:
                self.error = f"no site {self.site!r} in the run; sites: {d.sites}"
            self.site = (d.sat_sites or d.sites)[-1]
        if self.activations not in d.sources:
            self.activations = "probe" if "probe" in d.sources else d.sources[0]
        if self.unit is not None:
            if not 0 <= self.unit < len(d.unit_groups[d.sites.index(self.site)]):
                self.unit = None

    def poll_store(self) -> None:
        blocks, self.feed_status = self.feed.poll()
        if self.feed.replaced != self.replaced:  # a new run replaced the store: start again
            self.replaced = self.feed.replaced
            self.data = LiveData(self.data.max_records)
            self.dirty = True
        self.take_in(blocks)

    # ---------------------------------------------------------------- output
    def status(self) -> str:
        d = self.data
        parts = [self.label, self.state]
        if self.feed_status and self.state != "finished":
            parts.append(self.feed_status)
        if d.n_records:
            parts.append(f"{d.n_records} records, last step {int(d.steps[-1])}")
        if d.diverged_step is not None:
            parts.append(f"DIVERGED at step {d.diverged_step} (non-finite values)")
        if self.error:
            parts.append(f"error: {self.error}")
        return " · ".join(parts)

    def info(self) -> dict[str, Any]:
        d = self.data
        units = len(d.unit_groups[d.sites.index(self.site)]) if self.site in d.sites else 0
        return {
            "updates": self.updates,
            "n_records": d.n_records,
            "draws": self.draws,
            "state": self.state,
            "status": self.status(),
            "error": self.error,
            "diverged_step": d.diverged_step,
            "sites": list(d.sites),
            "sources": list(d.sources),
            "site": self.site,
            "activations": self.activations,
            "unit": self.unit,
            "units": units,
        }

    def draw(self) -> bytes:
        from icstools.liveview.figure import draw, png_bytes

        start = time.process_time()
        site, source = (self.site, self.activations) if self.data.ready else (None, None)
        png = png_bytes(draw(self.data, site, source, self.unit, status=self.status()))
        self.draws += 1
        self.dirty = False
        cost = time.process_time() - start
        if self.draws == 1:  # the first one loads fonts and the backend: not typical
            cost = 0.0
        self.next_draw = time.monotonic() + max(self.interval, cost / self.max_busy)
        return png

    # ---------------------------------------------------------------- loop
    def run(self) -> None:
        while True:
            deadline = time.monotonic() + self.interval
            # messages until the deadline, not until none is left: a worker slower than the
            # messages must still draw
            while not self.stopping and self.conn.poll(max(0.0, deadline - time.monotonic())):
                self.handle(self.conn.recv())
                if time.monotonic() >= deadline:
                    break
            try:
                updates = self.updates
                if self.pending and self.schema is not None:
                    records, self.pending = self.pending, []
                    self.take_in([stack_records(self.schema, records)])
                if self.feed is not None and not self.finished:  # (a store's records)
                    done = self.feed.done()
                    self.poll_store()
                    if done:
                        self.state, self.finishing = "finished", True
                # once more at the end (a finished view's last frame stays: it was drawn)
                final = (self.stopping or self.finishing) and not self.finished
                if final or (self.dirty and time.monotonic() >= self.next_draw):
                    self.conn.send(("frame", self.draw(), self.info()))
                elif self.updates != updates:  # the counts, between two frames
                    self.conn.send(("frame", None, self.info()))
                self.finished |= self.finishing
            except Exception as exc:  # shown in the status line; the view goes on
                self.error = f"{type(exc).__name__}: {exc}"
                self.conn.send(("frame", None, self.info()))
            if self.stopping:
                self.conn.send(("end", self.info()))
                return


class Connection:
    """Messages over a pair of pipe file descriptors (one to read, one to write), framed as
    ``multiprocessing.connection`` frames them."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._in = mpc.Connection(read_fd, writable=False)
        self._out = mpc.Connection(write_fd, readable=False)

    def send(self, obj: Any) -> None:
        self._out.send(obj)

    def recv(self) -> Any:
        return self._in.recv()

    def poll(self, timeout: float = 0.0) -> bool:
        return self._in.poll(timeout)

    def close(self) -> None:
        self._in.close()
        self._out.close()


def main(read_fd: int, write_fd: int) -> None:
    """The worker process's main function: ``python -c`` started by the view, which sends
    the spec first."""
    conn = Connection(read_fd, write_fd)
    try:
        _Worker(conn, conn.recv()).run()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the view's process ended or closed the pipe
    finally:
        conn.close()

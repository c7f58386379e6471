"""The live view in the training process: a light thread that forwards records to the worker
process (:mod:`icstools.liveview.worker`) and shows the frames it sends back, and the widgets.

The thread (``icstools-live``) wakes every ``interval`` seconds: it moves the records the
recorder queued to the worker through a pipe (the arrays as they are, the variables drawn
only), tells it when the recorder has detached, and puts the PNG frames and status lines it
receives into the widget (or the ``save`` file). Nothing is computed or drawn in this process.
"""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from icstools.liveview.data import NEEDED
from icstools.liveview.feeds import RecorderFeed, StoreFeed
from icstools.liveview.worker import Connection

__all__ = ["LiveView", "start_worker"]


def start_worker(spec: dict[str, Any]) -> tuple[Any, subprocess.Popen]:
    """Start the worker process at a lower priority (``nice`` 10 before its imports, which
    would compete with the training too) and connect to it through two pipes."""
    down_r, down_w = os.pipe()  # view -> worker
    up_r, up_w = os.pipe()  # worker -> view
    code = (  # nice first: the imports (torch among them) would compete with the training
        "import os, sys\ntry:\n    os.nice(10)\nexcept OSError:\n    pass\n"
        "from icstools.liveview.worker import main\nmain(int(sys.argv[1]), int(sys.argv[2]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([p for p in sys.path if p])}
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(down_r), str(up_w)],
        pass_fds=(down_r, up_w),
        env=env,
        stdin=subprocess.DEVNULL,
    )
    os.close(down_r)
    os.close(up_w)
    conn = Connection(up_r, down_w)
    conn.send(spec)
    return conn, process


_MEDIAN = "median over units"
_MAX_UNIT_OPTIONS = 512


class LiveView:
    """A running live view (returned by :func:`icstools.live`).

    Attributes
    ----------
    updates : int
        Times the worker took in new records (each one a data update).
    n_records : int
        Records taken in so far.
    draws : int
        Frames drawn.
    png : bytes or None
        The last frame (PNG).
    state : str
        ``"starting"``, ``"following"``, ``"finished"`` (the recorder detached, or no process
        writes the store any more) or ``"stopped"``.
    status : str
        One line: the source, the state, the records and the last step, a divergence.
    error : str or None
        The last error of the view (it keeps running; shown in the status line too).
    """

    def __init__(
        self,
        feed: RecorderFeed | StoreFeed,
        *,
        site: str | None,
        activations: str | None,
        interval: float,
        max_busy: float,
        max_records: int,
        save: str | os.PathLike | None,
        widgets: bool,
    ) -> None:
        self.feed = feed
        self.interval = float(interval)
        self.save_path = None if save is None else Path(save)
        self._spec = {
            "path": str(feed.path) if isinstance(feed, StoreFeed) else None,
            "label": feed.label,
            "interval": self.interval,
            "max_busy": float(max_busy),
            "max_records": max_records,
            "site": site,
            "activations": activations,
        }
        self.updates = self.n_records = self.draws = 0
        self.png: bytes | None = None
        self.state = "starting"
        self.status = f"{feed.label} · starting"
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self.forwarded = 0  # records sent to the worker
        self._schema_sent = False
        self._stop = threading.Event()
        self._ended = threading.Event()  # finished or stopped
        self._first_frame = threading.Event()
        self._worker_gone = threading.Event()
        self._reader: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._process: Any = None
        self._conn: Any = None
        self._send_lock = threading.Lock()
        self.widget: Any = None
        self._w: dict[str, Any] = {}
        self._quiet_widgets = False
        if widgets:
            self._build_widgets()

    # ------------------------------------------------------------------ public
    @property
    def running(self) -> bool:
        """Whether the view still follows its source (not finished, not stopped)."""
        return self._thread is not None and not self._ended.is_set()

    def start(self) -> LiveView:
        """Start the worker process and the thread (:func:`icstools.live` does this)."""
        self._conn, self._process = start_worker(self._spec)
        self._reader = threading.Thread(target=self._read, name="icstools-live-read", daemon=True)
        self._reader.start()
        self.feed.start()
        self.state = "following"
        self._thread = threading.Thread(target=self._run, name="icstools-live", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop: the worker takes in what has arrived, draws once more and ends; the
        recorder's tap is removed. Safe to call twice."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the view has finished (the recorder detached, or no process writes the
        store any more; its last frame drawn) or was stopped; True if it has. A finished view
        still redraws when the selection changes, until :meth:`stop`."""
        return self._ended.wait(timeout)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the worker process shows its first frame (it starts in a few seconds:
        it imports icstools and matplotlib at a low priority); True if it has."""
        return self._first_frame.wait(timeout)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the last frame (PNG) to ``path`` and return the path."""
        if self.png is None:
            raise RuntimeError("the live view has drawn no frame yet")
        path = Path(path)
        path.write_bytes(self.png)
        return path

    def __repr__(self) -> str:
        return f"<icstools LiveView: {self.status}>"

    # ------------------------------------------------------------------ the thread
    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _forward(self) -> None:
        """Records queued by the recorder, to the worker (with the schema first)."""
        if not isinstance(self.feed, RecorderFeed):
            return
        blocks, records, block = self.feed.take()
        if not self._schema_sent and (blocks or records):
            schema = blocks[0] if blocks else block(records[:1])
            keep = [v for v in schema.data_vars if v not in NEEDED]
            self._send(("schema", schema.isel(step=[0]).drop_vars(keep)))
            self._schema_sent = True
        for b in blocks:  # records closed before the view started (read once)
            recs = [
                {"step": s, **{v: b[v].isel(step=i).values for v in b.data_vars if v in NEEDED}}
                for i, s in enumerate(b["step"].values)
            ]
            self._send(("records", recs))
            self.forwarded += len(recs)
        if records:
            self._send(("records", [{k: r[k] for k in r if k in NEEDED or k == "step"}
                                    for r in records]))  # fmt: skip
            self.forwarded += len(records)

    def _read(self) -> None:
        """The reader thread: frames from the worker as they come (a thread of its own, so
        that the worker never waits on a full pipe while this process sends it records)."""
        try:
            while True:
                msg = self._conn.recv()
                self._take_info(msg[-1])
                if msg[0] == "frame" and msg[1] is not None:
                    self._show_frame(msg[1])
                    self._first_frame.set()
                    if self.state in ("finished", "stopped"):
                        self._ended.set()  # its last frame is shown
                if msg[0] == "end":
                    break
        except (EOFError, OSError):
            pass
        finally:
            self._worker_gone.set()

    def _run(self) -> None:
        told = False  # the worker was told that no more records come
        try:
            while True:
                if self._worker_gone.is_set():
                    if self.state not in ("finished", "stopped"):
                        self.error = self.error or "the live view's worker process ended"
                    break
                if not told:
                    self._forward()
                    if isinstance(self.feed, RecorderFeed):
                        self._send(("status", self.feed.status()))
                        if self.feed.done():
                            self._forward()
                            self._send(("finish", "finished"))
                            told = True
                if self._stop.is_set():
                    self._forward()
                    self._send(("stop",))
                    self._stop.clear()
                    told = True
                self._stop.wait(self.interval)
        except (EOFError, BrokenPipeError, OSError) as exc:
            self.error = f"the live view's worker process ended ({type(exc).__name__})"
        finally:
            self.feed.close()
            if self._process is not None:
                try:
                    self._process.wait(10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                self._reader.join(10)
            if self.state != "finished":
                self.state = "stopped"
            self._ended.set()
            self._show_status()

    def _take_info(self, info: dict[str, Any]) -> None:
        self.info = info
        self.updates, self.n_records, self.draws = info["updates"], info["n_records"], info["draws"]
        self.state, self.status, self.error = info["state"], info["status"], info["error"]
        if self.state in ("finished", "stopped") and self.draws:
            self.feed.close()
        if self._w:
            self._update_options()
        self._show_status()

    def _show_frame(self, png: bytes) -> None:
        self.png = png
        if self.save_path is not None:
            tmp = self.save_path.with_name(f".{self.save_path.name}.tmp")
            tmp.write_bytes(png)
            os.replace(tmp, self.save_path)
        if self._w:
            self._w["image"].value = png

    def _show_status(self) -> None:
        if self._w:
            when = _dt.datetime.now().strftime("%H:%M:%S")
            self._w["status"].value = f"{self.status} · {when}"
            self._w["stop"].disabled = self.state in ("finished", "stopped")

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self) -> None:
        import ipywidgets as w

        self._w = {
            "site": w.Dropdown(description="site", options=[], layout=w.Layout(width="360px")),
            "source": w.ToggleButtons(options=[], style={"button_width": "70px"}),
            "unit": w.Dropdown(
                description="unit", options=[_MEDIAN], layout=w.Layout(width="240px")
            ),
            "stop": w.Button(description="stop", icon="stop", layout=w.Layout(width="80px")),
            "image": w.Image(format="png"),
            "status": w.HTML(value="starting"),
        }
        controls = w.HBox([self._w[k] for k in ("site", "source", "unit", "stop")])
        self.widget = w.VBox([controls, self._w["status"], self._w["image"]])
        for key in ("site", "source", "unit"):
            self._w[key].observe(self._on_change, names="value")
        self._w["stop"].on_click(lambda _: self.stop(timeout=0))

    def _update_options(self) -> None:
        info, w = self.info, self._w
        if not info.get("sites"):
            return
        self._quiet_widgets = True
        try:
            if list(w["site"].options) != info["sites"]:
                w["site"].options = info["sites"]
            w["site"].value = info["site"]
            if list(w["source"].options) != info["sources"]:
                w["source"].options = info["sources"]
            w["source"].value = info["activations"]
            units = [_MEDIAN, *range(min(info["units"], _MAX_UNIT_OPTIONS))]
            if list(w["unit"].options) != units:
                w["unit"].options = units
            w["unit"].value = _MEDIAN if info["unit"] is None else info["unit"]
        finally:
            self._quiet_widgets = False

    def _on_change(self, change: dict[str, Any]) -> None:
        if self._quiet_widgets:
            return
        w = self._w
        unit = None if w["unit"].value == _MEDIAN else int(w["unit"].value)
        if change["owner"] is w["site"]:
            unit = None  # another site has other units
        self.select(w["site"].value, w["source"].value, unit)

    def select(self, site: str, activations: str, unit: int | None = None) -> None:
        """Show ``site`` (its ``unit``, or the median over its units) of ``activations``
        (``"probe"`` or ``"train"``): what the widget's selectors do."""
        if self._process is not None and self._process.poll() is None:
            self._send(("select", site, activations, unit))

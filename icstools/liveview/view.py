"""The live view: a thread that takes in new records and redraws, throttled, and its widgets.

The thread wakes every ``interval`` seconds, polls the feed (which never waits for the
training), takes the new records into its :class:`~icstools.liveview.data.LiveData` and redraws
the figure when something changed. Its work holds Python's global interpreter lock, which the
training thread needs too, so the thread keeps its share of the time at most ``max_busy``: after
a wake-up that took ``t`` seconds it sleeps at least ``t / max_busy``. Drawing happens only
there (or, once the thread has ended, on the kernel's thread when a widget changes).
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from icstools.liveview.data import LiveData
from icstools.liveview.feeds import RecorderFeed, StoreFeed
from icstools.liveview.figure import draw, png_bytes

__all__ = ["LiveView"]

_MEDIAN = "median over units"
_MAX_UNIT_OPTIONS = 512


class LiveView:
    """A running live view (returned by :func:`icstools.live`).

    Attributes
    ----------
    updates : int
        Polls that brought new records (each one a data update).
    n_records : int
        Records taken in so far.
    draws : int
        Times the figure was drawn.
    status : str
        What the view is doing: waiting, following, finished or stopped, and the last step.
    error : str or None
        The last error of the view's thread (the view keeps running; it is shown in the
        status line too).
    data : LiveData
        The series drawn.
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
        self.data = LiveData(max_records)
        self.interval = float(interval)
        self.max_busy = float(max_busy)
        self.save_path = None if save is None else Path(save)
        self.site, self.activations, self.unit = site, activations, None
        self.updates = self.n_records = self.draws = 0
        self.busy_seconds = 0.0  # time the thread spent working (polling, taking in, drawing)
        self.state = "starting"
        self.feed_status = ""
        self.error: str | None = None
        self._replaced = 0
        self._dirty = True
        self._now = False  # a widget changed: redraw at once
        self._lock = threading.RLock()  # the data and the figure: one user at a time
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.widget: Any = None
        self._w: dict[str, Any] = {}
        if widgets:
            self._build_widgets()

    # ------------------------------------------------------------------ public
    @property
    def status(self) -> str:
        """One line: the source, the state, the records and the last step."""
        d = self.data
        parts = [self.feed.label, self.state]
        if self.feed_status and self.state != "finished":
            parts.append(self.feed_status)
        if d.n_records:
            parts.append(f"{d.n_records} records, last step {int(d.steps[-1])}")
        if d.diverged_step is not None:
            parts.append(f"DIVERGED at step {d.diverged_step} (non-finite values)")
        if self.error:
            parts.append(f"error: {self.error}")
        return " · ".join(parts)

    @property
    def running(self) -> bool:
        """Whether the view's thread is still following the source."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> LiveView:
        """Start following the source (:func:`icstools.live` does this)."""
        self.feed.start()
        self.state = "following"
        self._thread = threading.Thread(target=self._run, name="icstools-live", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following: the thread takes in what has arrived, draws once more and ends; the
        recorder's tap is removed. Safe to call twice."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.feed.close()
        if self.state != "finished":
            self.state = "stopped"
        self._show()

    def refresh(self) -> LiveView:
        """Take in what has arrived and redraw now, on the calling thread."""
        with self._lock:
            self._take_in()
            self._draw()
        return self

    def figure(self) -> Figure:
        """The current figure (a new :class:`matplotlib.figure.Figure`)."""
        with self._lock:
            return draw(self.data, *self._selection(), status=self.status)

    def save(self, path: str | os.PathLike, dpi: int = 80) -> Path:
        """Write the current figure to ``path`` (PNG) and return the path."""
        path = Path(path)
        path.write_bytes(png_bytes(self.figure(), dpi))
        return path

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the view has finished (the recorder detached, or the store's writer
        closed) or was stopped; True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def __repr__(self) -> str:
        return f"<icstools LiveView: {self.status}>"

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        next_work = 0.0  # the thread's work is spread out so that it takes ≤ max_busy
        while not self._stop.is_set():
            finished = False
            try:
                finished = self.feed.done()  # cheap: a flag, or the store's lock file
                if finished or time.perf_counter() >= next_work or self._now:
                    self._now = False
                    start = time.perf_counter()
                    with self._lock:
                        self._take_in()
                        if finished:
                            self.state = "finished"
                        if self._dirty or finished:
                            self._draw()
                    busy = time.perf_counter() - start
                    self.busy_seconds += busy
                    next_work = start + busy / self.max_busy
            except Exception as exc:  # a view never takes the training down
                self.error = f"{type(exc).__name__}: {exc}"
            if finished:
                break
            self._wake.wait(self.interval)
            self._wake.clear()
        else:  # stopped: what arrived until now, once more
            with self._lock:
                try:
                    self._take_in()
                    self._draw()
                except Exception as exc:
                    self.error = f"{type(exc).__name__}: {exc}"
        self.feed.close()

    def _take_in(self) -> None:
        blocks, self.feed_status = self.feed.poll()
        replaced = getattr(self.feed, "replaced", 0)
        if replaced != self._replaced:  # a new run replaced the store: start again
            self._replaced = replaced
            self.data = LiveData(self.data.max_records)
            self._dirty = True
        new = sum(self.data.add(b) for b in blocks)
        if new:
            self.updates += 1
            self.n_records = self.data.n_records
            self._dirty = True
            self._fix_selection()

    def _fix_selection(self) -> None:
        """Defaults once the sites are known: the input of the last hidden sigmoid/tanh (Fig.
        1's site), else the last site; the probe when recorded."""
        d = self.data
        if self.site not in d.sites:
            if self.site is not None and not getattr(self, "_warned_site", False):
                self.error = f"no site {self.site!r} in the run; sites: {d.sites}"
                self._warned_site = True
            self.site = (d.sat_sites or d.sites)[-1]
        if self.activations not in d.sources:
            self.activations = "probe" if "probe" in d.sources else d.sources[0]
        if self._w:
            self._update_options()

    def _selection(self) -> tuple[str | None, str | None, int | None]:
        if not self.data.ready:
            return None, None, None
        unit = self.unit
        if unit is not None:
            n = len(self.data.unit_groups[self.data.sites.index(self.site)])
            unit = unit if 0 <= unit < n else None
        return self.site, self.activations, unit

    def _draw(self) -> None:
        self._dirty = False
        fig = draw(self.data, *self._selection(), status=self.status)
        png = png_bytes(fig)
        self.draws += 1
        if self.save_path is not None:
            tmp = self.save_path.with_name(f".{self.save_path.name}.tmp")
            tmp.write_bytes(png)
            os.replace(tmp, self.save_path)
        if self._w:
            self._w["image"].value = png
        self._show()

    def _show(self) -> None:
        if self._w:
            when = _dt.datetime.now().strftime("%H:%M:%S")
            self._w["status"].value = f"{self.status} · {when}"
            self._w["stop"].disabled = not self.running and self._stop.is_set()

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
        self._w["stop"].on_click(lambda _: self.stop())

    def _update_options(self) -> None:
        d, w = self.data, self._w
        self._quiet_widgets = True
        try:
            if list(w["site"].options) != d.sites:
                w["site"].options = d.sites
            w["site"].value = self.site
            if list(w["source"].options) != d.sources:
                w["source"].options = d.sources
            w["source"].value = self.activations
            n = len(d.unit_groups[d.sites.index(self.site)])
            units = [_MEDIAN, *range(min(n, _MAX_UNIT_OPTIONS))]
            if list(w["unit"].options) != units:
                w["unit"].options = units
                w["unit"].value = _MEDIAN if self.unit is None or self.unit >= n else self.unit
        finally:
            self._quiet_widgets = False

    def _on_change(self, change: dict[str, Any]) -> None:
        if getattr(self, "_quiet_widgets", False):
            return
        w = self._w
        self.site, self.activations = w["site"].value, w["source"].value
        self.unit = None if w["unit"].value == _MEDIAN else int(w["unit"].value)
        if change["owner"] is w["site"]:
            with self._lock:
                self._update_options()
        self._dirty = True
        if self.running:
            self._now = True
            self._wake.set()  # the thread redraws now
        else:
            with self._lock:
                self._draw()

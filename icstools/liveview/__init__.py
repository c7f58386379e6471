"""Watch a run while it trains: :func:`live` in Jupyter.

``icstools.live(rec)`` follows a :class:`~icstools.Recorder` in this kernel;
``icstools.live("runs/x.zarr")`` follows a run store that another process writes (training in a
script, watching in a notebook). The view shows four panels and updates as records arrive:

* the 15th, 50th and 85th percentiles of a site over steps (Fig. 1 of Ioffe & Szegedy), for
  one unit or the median over the site's units of each percentile;
* drift of every site: W1/σ of each unit against the previous record, median over the site's
  units (the report's estimate from the summaries, :func:`icstools.analysis.drift.drift`);
* saturation (``sat_frac``) and dead units (``zero_frac == 1``) of every site;
* the activation-gradient norm of every site (``gradients=True``), else the loss;

with a site selector, a source selector (``probe`` / ``train``), a unit selector and a stop
button (ipywidgets; ``pip install 'icstools[live]'``). The modules: ``data`` (the series kept,
updated block by block), ``feeds`` (a recorder or a store), ``figure`` (matplotlib, no pyplot),
``view`` (the thread and the widgets).

Cost to the training. With a recorder, the training thread only appends each closed record
(a dict of arrays already made for the store) to a queue: no copy, no dataset. A thread of
the view forwards the queue through a pipe, every ``interval`` seconds, to a worker process
started at ``nice`` 10 (:mod:`icstools.liveview.worker`), which computes the series from the
new records and draws (matplotlib, no pyplot), at most once per ``interval`` and within
``max_busy`` of its own CPU time; the PNG frames come back to the widget. Nothing is computed
or drawn in the training process: a drawing thread there would hold Python's lock, which
every torch call of the training waits for. ``bench/live.py`` measures the cost. A store is
followed by polling its commit marker; only the new records of the variables drawn are read.
The view ends by itself when the recorder detaches (``with rec:`` ends) or when no process
writes the store any more; :meth:`LiveView.stop` ends it at any time.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from icstools.liveview.data import LiveData
from icstools.liveview.feeds import RecorderFeed, StoreFeed, make_feed

if TYPE_CHECKING:
    from icstools.liveview.view import LiveView

__all__ = ["LiveData", "LiveView", "RecorderFeed", "StoreFeed", "in_jupyter", "live"]


def __getattr__(name: str) -> Any:
    if name == "LiveView":  # matplotlib is imported when a view is made, not with icstools
        from icstools.liveview.view import LiveView

        return LiveView
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def in_jupyter() -> bool:
    """Whether this code runs in a Jupyter kernel (an IPython kernel, which can show widgets).

    Examples
    --------
    >>> in_jupyter()
    False
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def live(
    source: Any,
    *,
    site: str | None = None,
    activations: str | None = None,
    interval: float = 1.0,
    max_busy: float = 0.2,
    max_records: int = 1000,
    display: bool | None = None,
    save: str | os.PathLike | None = None,
) -> LiveView:
    """Show a run's statistics live while it trains (in Jupyter), updating as records arrive.

    Parameters
    ----------
    source : Recorder or str or os.PathLike
        A :class:`~icstools.Recorder` in this process (call ``live`` before or during its
        ``with`` block), or the path of a run store written by another process. A store that
        does not exist yet or has no commit yet is waited for ("waiting" in the status line).
    site : str, optional
        The site shown first (default: the input of the last hidden sigmoid/tanh, Fig. 1's
        site, else the last site). The widget's selector changes it.
    activations : {"probe", "train"}, optional
        The source of the activations shown (default ``"probe"`` when recorded).
    interval : float
        Seconds between two looks at the source (and at most one frame each).
    max_busy : float
        Largest share of one CPU the worker process may spend drawing (0 < max_busy ≤ 1):
        after a frame that took ``t`` CPU seconds it draws again ``t / max_busy`` later at
        the earliest.
    max_records : int
        Records kept for drawing; beyond, they are thinned evenly (every 2nd, 4th, ...).
    display : bool, optional
        ``None`` (default): show the widget in Jupyter; outside Jupyter, run without widgets
        if ``save`` is given, else raise. ``True``: show it (Jupyter and ipywidgets needed).
        ``False``: no widgets (use :meth:`LiveView.figure`, :meth:`LiveView.save`).
    save : str or os.PathLike, optional
        A PNG file rewritten at every redraw (atomically): a plain view outside Jupyter.

    Returns
    -------
    LiveView
        Running; ``view.stop()`` ends it (it also ends by itself when the recorder detaches or
        no process writes the store any more). ``view.updates`` counts the updates with new
        records, ``view.n_records`` the records taken in, ``view.draws`` the redraws.

    Raises
    ------
    TypeError
        ``source`` is neither a Recorder nor a path.
    ValueError
        ``interval``, ``max_busy`` or ``max_records`` out of range.
    RuntimeError
        Outside Jupyter without ``save`` and with ``display`` not ``False``.
    ImportError
        Widgets wanted and ipywidgets missing.

    Examples
    --------
    >>> import torch, icstools
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid())
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> rec = icstools.Recorder(model, every=1, optimizer=opt, probe=torch.randn(32, 4))
    >>> view = icstools.live(rec, display=False)     # in Jupyter: icstools.live(rec)
    >>> with rec:
    ...     for _ in range(5):
    ...         opt.zero_grad(); model(torch.randn(16, 4)).sum().backward(); opt.step()
    >>> view.wait(30)                                # ends when the recorder detaches
    True
    >>> view.n_records
    5

    A store written by another process (a script)::

        view = icstools.live("data/runs/mnist.zarr")
    """
    feed = make_feed(source)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval > 0:
        raise ValueError(f"interval must be a number of seconds > 0, got {interval!r}")
    if isinstance(max_busy, bool) or not isinstance(max_busy, int | float):
        raise ValueError(f"max_busy must be a number in (0, 1], got {max_busy!r}")
    if not 0 < max_busy <= 1:
        raise ValueError(f"max_busy must be a number in (0, 1], got {max_busy!r}")
    LiveData(max_records)  # checks it (the worker keeps the data)
    if display not in (None, True, False):
        raise ValueError(f"display must be None, True or False, got {display!r}")
    jupyter = in_jupyter()
    widgets = jupyter if display is None else display
    if widgets and not jupyter:
        raise RuntimeError(
            "icstools.live(display=True) shows a widget in a Jupyter kernel, and this is not "
            "one; pass display=False and use view.figure() / view.save(path), or save='live.png'"
        )
    if display is None and not jupyter and save is None:
        raise RuntimeError(
            "icstools.live shows a widget in a Jupyter notebook, and this is not one (plain "
            "Python); outside Jupyter pass save='live.png' to have the figure rewritten there "
            "at every update, or display=False and call view.figure() / view.save(path)"
        )
    if widgets:
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            raise ImportError(
                "icstools.live needs ipywidgets in Jupyter: pip install 'icstools[live]'"
            ) from None
    from icstools.liveview.view import LiveView

    view = LiveView(
        feed,
        site=site,
        activations=activations,
        interval=float(interval),
        max_busy=float(max_busy),
        max_records=max_records,
        save=save,
        widgets=widgets,
    )
    if widgets:
        from IPython.display import display as show

        show(view.widget)
    return view.start()

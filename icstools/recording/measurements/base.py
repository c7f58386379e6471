"""The measurement interface: what the recorder's core calls, and what it gives a measurement.

A *measurement* is one quantity of the run (activation statistics, site gradients, gradient-based
ICS, a Jacobian spectrum, …). It declares the dataset variables it writes (:class:`Variable`)
and what it needs (``requires``: ``"optimizer"``, ``"loss_fn"``, ``"probe"``, ``"target"``), has
its own schedule (``every``, evaluated at the steps the recorder records), receives the events
of a recorded step and returns its host arrays when the record closes. The core
(:class:`icstools.recording.recorder.Recorder`) is the only caller of these methods.

Events of one recorded step, in order (every method is optional):

1. ``train_forward(ctx, first)``: a scheduled training forward starts (``first``: the record
   was just opened, and the probe has run);
2. ``site(ctx, name, x, source)``: a site tensor was seen (``source`` ``"train"`` or
   ``"probe"``; ``name`` is the record site, ``"<site>#k"`` with ``calls="separate"``);
   only measurements that define it are called (it is the hot path);
3. ``after_probe(ctx)``: right after the probe forward of a new record;
4. ``train_forward_end(ctx)``: the training forward returned;
5. ``before_update(ctx)`` / ``after_update(ctx)``: around ``optimizer.step()``;
6. ``discard_train(ctx)``: an AMP ``GradScaler`` skipped the iteration: forget its data;
7. ``declare(ctx)`` (first record only) then ``collect(ctx)``: the record closes (or
   ``defer(ctx)`` now and ``collect_many(ctx, taken)`` for several records later:
   :mod:`icstools.recording.deferred`).

Examples
--------
A measurement of the largest absolute activation of each site on the probe (``site`` dimension,
so one value per site and record):

>>> import torch
>>> from icstools.schema import Variable
>>> class ProbeAbsMax(Measurement):
...     name = "abs_max"
...     requires = frozenset({"probe"})
...     variables = (Variable("abs_max", ("step", "site"), "float64", "max |x| on the probe"),)
...     def __init__(self, every=1):
...         super().__init__(every)
...         self.seen = {}
...     def site(self, ctx, name, x, source):
...         if source == "probe" and self.due(ctx.step):
...             m = x.detach().abs().max()
...             self.seen[name] = torch.maximum(self.seen.get(name, m), m)
...     def collect(self, ctx):
...         out = ctx.layout.per_site({n: float(v) for n, v in self.seen.items()})
...         self.seen = {}
...         return {"abs_max": out}
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from icstools.recording.errors import RecorderError
from icstools.recording.hooks import HookGroup
from icstools.recording.isolation import RngState, isolated
from icstools.schedules import Schedule, as_schedule
from icstools.schema import Coordinate, Variable
from icstools.sites import Site

if TYPE_CHECKING:
    from icstools.recording.layout import Layout, SiteTable

__all__ = [
    "REQUIREMENTS",
    "Context",
    "Declaration",
    "Measurement",
    "StepBatch",
    "StepLossMeasurement",
]

#: What a measurement can require of the recorder.
REQUIREMENTS = ("optimizer", "loss_fn", "probe", "target")


@dataclass(frozen=True)
class StepBatch:
    """The inputs of a step's last training forward and the RNG state it started from."""

    args: tuple
    kwargs: dict
    rng: RngState

    def inputs(self) -> Any:
        """The model's inputs as one value: a tensor, a tuple of positional args or a dict."""
        if self.kwargs and not self.args:
            return self.kwargs
        if self.kwargs:
            raise RecorderError(
                "ics/landscape need a model called with positional or keyword arguments, not both"
            )
        return self.args[0] if len(self.args) == 1 else tuple(self.args)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run with the RNG state of the training forward (the same dropout masks); the
        caller's RNG state is given back after."""
        with isolated():
            self.rng.restore()
            yield


@dataclass(frozen=True)
class Declaration:
    """What a measurement adds to the run's layout at the first record."""

    coords: dict[str, Any]
    variables: tuple[Variable, ...]


class Context:
    """What the recorder shares with its measurements (read it; the core updates it).

    Attributes
    ----------
    model, optimizer, probe, probe_mode, loss_fn, scaler, seed
        The recorder's own arguments (``optimizer`` may be set after construction).
    wrapper : torch.nn.Module or None
        The ``torch.compile`` wrapper the recorder was given (``model`` is its original
        module), whose forward hooks run outside the compiled graph.
    sites : list of Site
        The selected sites.
    units : SiteTable
        Record-site names, unit dimensions and widths of the sites seen so far.
    layout : Layout or None
        The run's static layout, fixed when the first record closes.
    step : int
        Optimizer steps completed; the open record is that of ``step``.
    batch : StepBatch or None
        The step's batch, kept when a measurement asked for it (``wants_batch``).
    target : any
        The step's target, given by :meth:`Recorder.set_target` (``target_step`` says when).
    logs : dict
        Scalars logged for the open record (``rec.log``).
    host : dict
        While a record closes: ``{measurement name: {key: numpy array}}``, the host copies of
        what each measurement's :meth:`~Measurement.stage` returned (one transfer for all).
    forward_hooks : HookGroup
        Hooks of one scheduled training forward (the sites', and any a measurement adds in
        ``train_forward``), removed by the core when the forward ends or the recorder detaches.
    record_hooks : HookGroup
        Hooks removed when the record closes or the recorder detaches (tensor hooks on the
        step's activations).
    loss_scale : float or None
        The AMP loss scale of the latest recorded forward.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: list[Site],
        units: SiteTable,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        probe: Any = None,
        probe_mode: str = "train",
        loss_fn: Callable[..., Any] | None = None,
        scaler: Any = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.wrapper: nn.Module | None = None
        self.sites = sites
        self.units = units
        self.optimizer = optimizer
        self.probe = probe
        self.probe_mode = probe_mode
        self.loss_fn = loss_fn
        self.scaler = scaler
        self.seed = seed
        self.layout: Layout | None = None
        self.step = 0
        self.batch: StepBatch | None = None
        self.target: Any = None
        self.target_step: int | None = None
        self.logs: dict[str, Any] = {}
        self.host: dict[str, dict[Any, np.ndarray]] = {}  # staged arrays, while a record closes
        self.forward_hooks = HookGroup()
        self.record_hooks = HookGroup()
        self.loss_scale: float | None = None
        self.source: str | None = None  # what the site hooks record into (None: nothing)
        self.silent = False  # the recorder's own forwards: its root hooks ignore them
        self.measurements: list[Measurement] = []

    @contextlib.contextmanager
    def own_forwards(self, source: str | None = None) -> Iterator[None]:
        """Run the recorder's own forwards (probe, ICS, landscape, Jacobian): not counted as
        training; the site hooks record into ``source`` (``None``: they stay silent)."""
        before = (self.silent, self.source)
        self.silent, self.source = True, source
        try:
            yield
        finally:
            self.silent, self.source = before

    def step_batch(self, what: str) -> tuple[Any, Any]:
        """The inputs and the target of this step's batch, or an error saying what is missing."""
        if self.batch is None:
            raise RecorderError(
                f"{what} at step {self.step}: no training forward was seen in this step"
            )
        if self.target_step != self.step:
            raise RecorderError(
                f"{what} at step {self.step} needs this step's target: call rec.set_target(y) "
                "before optimizer.step() in every step"
            )
        return self.batch.inputs(), self.target

    def discard_train(self) -> None:
        """Forget the train-source data of the open record (an iteration AMP skipped)."""
        for m in self.measurements:
            m.discard_train(self)


class Measurement:
    """Base class of the recorder's measurements (see the module docstring for the events).

    Parameters
    ----------
    every : int, callable or None
        The measurement's own schedule, evaluated at the steps the recorder records (an int:
        every N steps; a ``step -> bool``; ``None``: every recorded step). :meth:`due` reads it.

    Attributes
    ----------
    name : str
        The measurement's name (the ``measurement`` of its variables).
    variables : tuple of Variable
        The dataset variables it writes.
    coordinates : tuple of Coordinate
        The static coordinates it adds (their values come from :meth:`declare`).
    requires : frozenset of str
        Among ``"optimizer"``, ``"loss_fn"``, ``"probe"``, ``"target"``: checked when the
        recorder is built (``probe``, ``loss_fn``) or attached (``optimizer``).
    """

    name: ClassVar[str] = ""
    variables: ClassVar[tuple[Variable, ...]] = ()
    coordinates: ClassVar[tuple[Coordinate, ...]] = ()
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, every: int | Schedule | None = None) -> None:
        self.schedule: Schedule | None = None if every is None else as_schedule(every)

    @classmethod
    def from_options(cls, options: Any) -> Measurement | None:
        """The measurement the :class:`Recorder`'s keywords ask for, or ``None`` (built-ins)."""
        return None

    def due(self, step: int) -> bool:
        """Whether the measurement's own schedule selects ``step``."""
        return self.schedule is None or bool(self.schedule(step))

    def check(self, ctx: Context) -> None:
        """Raise :class:`RecorderError` if a requirement is not met (at attach)."""
        missing = [
            r for r in sorted(self.requires) if r != "target" and getattr(ctx, r, None) is None
        ]
        if missing:
            given = ", ".join(f"{r}=..." for r in missing)
            raise RecorderError(f"the {self.name!r} measurement needs {given} in the Recorder")

    def config(self) -> dict[str, Any]:
        """Its settings as JSON-able values (part of the run's ``recorder_config``)."""
        return {}

    def wants_batch(self, ctx: Context) -> bool:
        """Whether the step's batch (inputs, RNG state) must be kept for this measurement."""
        return False

    # events (no-ops by default) --------------------------------------------------------
    def train_forward(self, ctx: Context, first: bool) -> None:
        """A scheduled training forward starts."""

    def train_forward_end(self, ctx: Context) -> None:
        """The scheduled training forward returned."""

    def after_probe(self, ctx: Context) -> None:
        """The probe forward of a new record ran."""

    def before_update(self, ctx: Context) -> None:
        """``optimizer.step()`` of a recorded step is about to run."""

    def after_update(self, ctx: Context) -> None:
        """``optimizer.step()`` of a recorded step ran."""

    def discard_train(self, ctx: Context) -> None:
        """Forget the train-source data of the open record."""

    def reset(self, ctx: Context) -> None:
        """Forget all data of the open record (dropped: no site and no scalar was seen)."""
        self.discard_train(ctx)

    # site: defined by measurements that want site tensors (not here: the core calls only
    # the measurements that define it, on the hot path)

    # the record ------------------------------------------------------------------------
    def declare(self, ctx: Context) -> Declaration:
        """Coordinates and variables it adds to the run, at the first record."""
        return Declaration({}, self.variables)

    def stage(self, ctx: Context) -> dict[Any, torch.Tensor]:
        """The record closes: the device tensors :meth:`collect` will need on the host. The
        recorder moves those of all measurements together, in one device-to-host transfer,
        and gives them to :meth:`collect` as ``ctx.host[self.name]`` (numpy, same keys)."""
        return {}

    def collect(self, ctx: Context) -> dict[str, np.ndarray]:
        """This record's host arrays of its variables (missing ones keep their fill value)."""
        return {}

    def defer(self, ctx: Context) -> Any:
        """The record closes, and its host work may wait to be done for several records at
        once (:mod:`icstools.recording.deferred`): return the record's state, taken over (the
        next record starts afresh), for :meth:`collect_many`; ``None`` (the default) to be
        collected now (:meth:`stage`, :meth:`collect`). An ``nbytes`` attribute of the
        returned object counts towards the bound on what waits."""
        return None

    def collect_many(self, ctx: Context, taken: list[Any]) -> Iterable[dict[str, np.ndarray]]:
        """The host arrays of the records whose states :meth:`defer` took (in step order),
        one dict per record, as :meth:`collect` gives them. May be lazy (a generator): the
        recorder takes each record's arrays as it sends that record to the sink, so that a
        batch of wide records is never built at once."""
        # only reached when a subclass overrides defer() without collect_many()
        raise NotImplementedError(
            f"{type(self).__name__} defines defer() but not collect_many(), which must collect "
            "the records whose states defer() returned"
        )


class StepLossMeasurement(Measurement):
    """Base of the measurements that recompute the training loss on the step's own batch
    (gradient-based ICS, landscape probes): they need the optimizer (its step hooks see the
    update), ``loss_fn(output, target)`` and the step's target (``rec.set_target``).
    Their ``Recorder`` keyword is their ``name`` and holds their schedule."""

    requires = frozenset({"optimizer", "loss_fn", "target"})

    def __init__(self, every: Any, loss_fn: Callable[..., Any]) -> None:
        super().__init__(every)
        self.loss_fn = loss_fn

    @classmethod
    def scheduled(cls, options: Any) -> Any:
        """The schedule given as the keyword ``cls.name`` (``None``: off); ``loss_fn`` checked."""
        every = getattr(options, cls.name)
        if every is not None and options.loss_fn is None:
            raise RecorderError(
                "ics= and landscape= need loss_fn= (loss_fn(output, target) -> scalar, to "
                "recompute the loss) and optimizer= (their hooks see the step's update)"
            )
        return every

    def config(self) -> dict[str, Any]:
        return {self.name: repr(self.schedule)}

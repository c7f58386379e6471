"""Record a Lightning 2.x training with a :class:`~icstools.Recorder`: one callback.

>>> from icstools.integrations.lightning import RecorderCallback      # doctest: +SKIP
>>> trainer = lightning.Trainer(callbacks=[RecorderCallback(probe=x_probe, gradients=True)])
>>> trainer.fit(module, loader)                                        # doctest: +SKIP
>>> ds = trainer.callbacks[0].to_dataset()                             # doctest: +SKIP

How it drives the recorder:

- ``on_fit_start``: a recorder of the ``LightningModule`` (sites named from it, e.g.
  ``"net.1:input"``) counting the steps of the trainer's first optimizer (the real
  ``torch.optim.Optimizer``; Lightning calls ``optimizer.step(closure)``, whose forward and
  backward run inside the step: see :mod:`icstools.recording.steps`), streamed to
  ``<trainer.log_dir>/icstools.zarr``;
- each training batch is one training forward (``on_train_batch_start`` to
  ``on_train_batch_end``, :meth:`~icstools.Recorder.begin_batch`), so ``training_step`` may call
  the module itself or any submodule; with ``accumulate_grad_batches=k`` the ``k`` batches of an
  optimizer step are pooled into its record, and the recorded steps are the trainer's
  ``global_step`` values;
- the target for ``ics=``/``landscape=`` is taken from the batch (``target=``), and the loss
  logged into each record is the mean of ``training_step``'s loss over the step's batches;
- ``teardown`` (end of fit) and ``on_exception`` (a failed fit) detach the recorder and close
  the store, so no hook is left on the model or the optimizer and the run is readable;
- ``log_summaries=True`` logs, per recorded step, the mean absolute standardized mean shift of
  each site's units since the previous record (``icstools/drift/<site>``, probe source when
  there is a probe) and the mean saturated share of each site where it is defined
  (``icstools/sat_frac/<site>``) to the trainer's loggers.

Single-process training only (one device); under a distributed strategy each rank would see its
own shard, so the callback refuses to start there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import xarray as xr

from icstools.integrations._common import StepLoss, finish, recorder_for, run_path
from icstools.recording.errors import RecorderError
from icstools.recording.recorder import Recorder

__all__ = ["RecorderCallback", "batch_inputs", "batch_target", "record_summaries"]

_TARGET_KEYS = ("labels", "label", "target", "targets", "y")


def batch_target(batch: Any) -> Any:
    """The default target of a batch: ``batch[1]`` of an ``(x, y, ...)`` tuple or list, else
    the first of the keys ``labels``, ``label``, ``target``, ``targets``, ``y`` of a dict
    (``None``: no target)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        return next((batch[k] for k in _TARGET_KEYS if k in batch), None)
    return None


def batch_inputs(batch: Any) -> tuple[tuple, dict]:
    """The default model inputs of a batch as ``(args, kwargs)``: ``(batch[0],)`` of a tuple or
    list, else ``(batch,)``. Only ``ics=`` and ``landscape=`` use them (they call
    ``module(*args, **kwargs)``, so the ``LightningModule`` needs a ``forward``)."""
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],), {}
    return (batch,), {}


def record_summaries(record: xr.Dataset, previous: xr.Dataset | None) -> dict[str, float]:
    """Per-site summaries of a one-step record (:meth:`~icstools.Recorder.last_record`).

    ``icstools/drift/<site>``: mean over the site's units of ``|μ_now − μ_prev| / σ_prev``
    (the standardized mean shift since ``previous``; probe source when there is one), and
    ``icstools/sat_frac/<site>``: mean ``sat_frac`` of the train source where it is defined.
    """
    out: dict[str, float] = {}
    source = "probe" if "probe" in record.source.values else "train"
    now = record.isel(step=0)
    unit_site = record.unit_site.values
    shift = None
    if previous is not None:
        before = previous.isel(step=0).sel(source=source)
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.abs(now["mean"].sel(source=source).values - before["mean"].values)
            shift = shift / np.sqrt(before["var"].values)
    sat = now["sat_frac"].sel(source="train").values
    for site in record.site.values.tolist():
        units = unit_site == site
        if shift is not None and np.isfinite(shift[units]).any():
            out[f"icstools/drift/{site}"] = float(np.nanmean(np.where(units, shift, np.nan)))
        if np.isfinite(sat[units]).any():
            out[f"icstools/sat_frac/{site}"] = float(np.nanmean(np.where(units, sat, np.nan)))
    return out


class RecorderCallback(pl.Callback):
    """A Lightning ``Callback`` that records the fit with a :class:`~icstools.Recorder`.

    Parameters
    ----------
    path : "auto", str, Path or None
        Where the run's Zarr store goes: ``"auto"`` → ``<trainer.log_dir>/icstools.zarr``;
        ``None``: in memory only.
    target : callable, optional
        ``batch -> target`` for ``ics=`` and ``landscape=`` (default :func:`batch_target`).
    inputs : callable, optional
        ``batch -> (args, kwargs)`` of the module's forward, for ``ics=`` and ``landscape=``
        (default :func:`batch_inputs`).
    log_summaries : bool
        Log per-site drift and saturation of each record to the trainer's loggers
        (:func:`record_summaries`).
    **recorder_kwargs
        Any :class:`~icstools.Recorder` keyword but ``optimizer`` and ``path`` (``sites``,
        ``every``, ``probe``, ``gradients``, ``ics``, ``loss_fn``, ...).

    Attributes
    ----------
    recorder : Recorder or None
        The recorder of the latest fit.
    """

    def __init__(
        self,
        *,
        path: str | Path | None = "auto",
        target: Callable[[Any], Any] = batch_target,
        inputs: Callable[[Any], tuple[tuple, dict]] = batch_inputs,
        log_summaries: bool = False,
        **recorder_kwargs: Any,
    ) -> None:
        super().__init__()
        self.path, self.target, self.inputs = path, target, inputs
        self.log_summaries = bool(log_summaries)
        self.recorder_kwargs = recorder_kwargs
        self.recorder: Recorder | None = None
        self._open = False
        self._loss = StepLoss()
        self._batch_step = 0
        self._logged = 0  # records whose summaries were logged
        self._previous: xr.Dataset | None = None

    # ------------------------------------------------------------------ fit
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise RecorderError(
                f"RecorderCallback records single-process training; this trainer runs on "
                f"{trainer.world_size} processes (each would see only its shard)"
            )
        if not trainer.optimizers:
            raise RecorderError("RecorderCallback needs the trainer's optimizer; it has none")
        path = run_path(self.path, trainer.log_dir)
        self.recorder = recorder_for(pl_module, trainer.optimizers[0], path, **self.recorder_kwargs)
        self._open, self._logged, self._previous = True, 0, None
        self._loss = StepLoss()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        rec = self.recorder
        if not self._open or rec is None:
            return
        target = self.target(batch)
        if target is not None:
            rec.set_target(target)
        args, kwargs = self.inputs(batch)
        self._batch_step = rec.step
        rec.begin_batch(*args, **kwargs)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        rec = self.recorder
        if not self._open or rec is None:
            return
        rec.end_batch()
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None and pl_module.automatic_optimization:
            # Lightning divides the loss by accumulate_grad_batches; training_step's own loss
            loss = loss * trainer.accumulate_grad_batches
        self._loss.add(rec, self._batch_step, loss)
        if self.log_summaries:
            self._log_new_records(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._open and self.recorder is not None:
            self.recorder.flush()  # the last step is over: its record closes
            if self.log_summaries:
                self._log_new_records(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close(exception)

    # ------------------------------------------------------------------ results
    def to_dataset(self) -> xr.Dataset:
        """The run of the latest fit (:meth:`icstools.Recorder.to_dataset`)."""
        if self.recorder is None:
            raise RecorderError("nothing was recorded: the callback has not seen a fit yet")
        return self.recorder.to_dataset()

    def _close(self, exception: BaseException | None = None) -> None:
        if self._open:
            self._open = False
            finish(self.recorder, exception)

    def _log_new_records(self, trainer: pl.Trainer) -> None:
        rec = self.recorder
        if rec is None or rec.n_records == self._logged:
            return
        self._logged = rec.n_records
        record = rec.last_record()
        if record is None:
            return
        metrics = record_summaries(record, self._previous)
        self._previous = record
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=int(record.step.values[0]))

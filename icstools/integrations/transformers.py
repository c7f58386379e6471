"""Record a Hugging Face ``Trainer``'s training with a :class:`~icstools.Recorder`.

>>> from icstools.integrations.transformers import RecorderCallback   # doctest: +SKIP
>>> trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
>>> callback = RecorderCallback(trainer, probe=token_ids, gradients=True)
>>> trainer.train()                                                    # doctest: +SKIP
>>> ds = callback.to_dataset()                                         # doctest: +SKIP

How it drives the recorder:

- the callback is built with the trainer and adds itself to it: the trainer creates its
  optimizer only when training starts and wraps it (Accelerate's ``AcceleratedOptimizer``),
  and its callbacks are not given it, so the callback reads ``trainer.optimizer`` at
  ``on_train_begin`` and hooks the real ``torch.optim.Optimizer`` inside;
- a recorder of ``trainer.model`` (sites named from it: ``"transformer.h.0.mlp.act:input"``;
  default sites: the inputs of every nonlinearity, Hugging Face's ``NewGELUActivation`` and
  the like included), streamed to ``<args.output_dir>/icstools.zarr``; the trainer's forwards
  ``model(**inputs)`` are the training forwards, so ``gradient_accumulation_steps=k`` pools
  ``k`` micro-batches into each step's record and the recorded steps are ``state.global_step``
  values; the probe may hold token ids (``{"input_ids": ..., "attention_mask": ...}``);
- the loss logged into each record is the step's loss from the model's output ``loss`` (when
  the model returns one, as it does given ``labels``): the mean over the step's micro-batches,
  or their sum when the trainer passes ``num_items_in_batch`` (each micro-batch's loss is then
  its share of the step's, a sum over its tokens divided by the step's token count);
- a ``GradScaler`` of the trainer's accelerator (fp16) is given to the recorder, so skipped
  iterations are dropped and counted (``skipped``);
- ``on_train_end`` detaches the recorder and closes the store. ``Trainer`` has no event for a
  failed training: use the callback as a context manager (``with RecorderCallback(...):``), or
  call :meth:`RecorderCallback.close`, to detach after an exception too.

``ics=`` and ``landscape=`` need the loss recomputed from the step's batch with
``loss_fn(output, target)``; the callback does not set a target, so they are refused here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers

from icstools.integrations._common import StepLoss, finish, recorder_for, run_path
from icstools.recording.errors import RecorderError
from icstools.recording.hooks import HookGroup
from icstools.recording.recorder import Recorder

__all__ = ["RecorderCallback"]


class RecorderCallback(transformers.TrainerCallback):
    """A ``TrainerCallback`` that records ``trainer.train()`` with a :class:`~icstools.Recorder`.

    Parameters
    ----------
    trainer : transformers.Trainer
        The trainer; the callback adds itself to it (``trainer.add_callback``).
    path : "auto", str, Path or None
        Where the run's Zarr store goes: ``"auto"`` → ``<args.output_dir>/icstools.zarr``;
        ``None``: in memory only.
    **recorder_kwargs
        Any :class:`~icstools.Recorder` keyword but ``optimizer``, ``path``, ``ics`` and
        ``landscape`` (``sites``, ``every``, ``probe``, ``gradients``, ``jacobian``, ...).

    Attributes
    ----------
    recorder : Recorder or None
        The recorder of the latest ``train()``.
    """

    def __init__(
        self,
        trainer: transformers.Trainer,
        *,
        path: str | Path | None = "auto",
        **recorder_kwargs: Any,
    ) -> None:
        for name in ("ics", "landscape"):
            if recorder_kwargs.get(name) is not None:
                raise RecorderError(
                    f"{name}= recomputes the loss from the step's batch with loss_fn(output, "
                    "target), which the Hugging Face callback cannot give; record it with a "
                    "Recorder in your own loop"
                )
        self.trainer = trainer
        self.path = path
        self.recorder_kwargs = recorder_kwargs
        self.recorder: Recorder | None = None
        self._open = False
        self._hooks = HookGroup()
        self._loss = StepLoss()
        trainer.add_callback(self)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()  # a previous train() that raised
        trainer = self.trainer
        if trainer.optimizer is None:
            raise RecorderError("the trainer has no optimizer at on_train_begin")
        options = dict(self.recorder_kwargs)
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None:
            options.setdefault("scaler", scaler)
        path = run_path(self.path, args.output_dir)
        model = trainer.model
        self.recorder = recorder_for(model, trainer.optimizer, path, **options)
        self._open, self._loss = True, StepLoss()
        self._hooks.forward(model, self._on_output, with_kwargs=True)

    def _on_output(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        rec = self.recorder
        if rec is None or not (module.training and torch.is_grad_enabled()):
            return
        if isinstance(output, Mapping) and output.get("loss") is not None:
            share = kwargs.get("num_items_in_batch") is not None
            self._loss.add(rec, rec.step, output["loss"], share=share)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self, exception: BaseException | None = None) -> None:
        """Detach the recorder and close its store (safe to call again)."""
        self._hooks.remove()
        if self._open:
            self._open = False
            finish(self.recorder, exception)

    def __enter__(self) -> RecorderCallback:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc)

    def to_dataset(self) -> Any:
        """The run of the latest ``train()`` (:meth:`icstools.Recorder.to_dataset`)."""
        if self.recorder is None:
            raise RecorderError("nothing was recorded: the trainer has not trained yet")
        return self.recorder.to_dataset()

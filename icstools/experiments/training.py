"""The one training loop of the experiments: MNIST mini-batches, SGD or Adam, a recorder.

:func:`train` is the one training loop: MNIST mini-batches in a seeded order, SGD (or Adam),
cross-entropy, test accuracy on a schedule, an optional :class:`~icstools.Recorder` (built from
the model, the optimizer and a probe batch of test images), optional extra measurements logged
into the run, and divergence handled as a result. :func:`train_mnist` is its older, smaller
interface. :func:`record_steps` is the record schedule of a preset's runs.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from icstools.data import batches, mnist_tensors
from icstools.experiments.models import set_noise_step
from icstools.experiments.presets import DATA_SHAPES
from icstools.recording.isolation import isolated
from icstools.recording.recorder import Recorder
from icstools.schedules import Schedule, as_schedule

__all__ = ["TrainResult", "record_steps", "train", "train_mnist"]

_OPTIMIZERS = ("sgd", "adam")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    accuracy : dict of int to float
        Test accuracy by step: during training on the evaluation set (``eval_size`` images),
        measured before the step's update; the last entry, at ``steps_done``, always on the full
        test set.
    final_loss : float
        Training loss of the last step.
    recorder : Recorder or None
        The recorder used (closed).
    steps_done : int
        Optimizer steps taken (fewer than asked when a diverged run stopped).
    diverged_step : int or None
        First step whose training loss was not finite.
    wall_time : float
        Seconds for the whole call (data loading excluded).
    """

    accuracy: dict[int, float] = field(default_factory=dict)
    final_loss: float = float("nan")
    recorder: Recorder | None = None
    steps_done: int = 0
    diverged_step: int | None = None
    wall_time: float = float("nan")

    @property
    def final_accuracy(self) -> float:
        """Test accuracy on the full test set after the last step."""
        return self.accuracy[self.steps_done]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with isolated(model, mode="eval", grad=False, buffers=False):
        correct = sum(
            int((model(x[i : i + 2000]).argmax(1) == y[i : i + 2000]).sum())
            for i in range(0, len(x), 2000)
        )
    return correct / len(x)


def _make_optimizer(
    name: str, params: Iterable[torch.Tensor], lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        if momentum:
            raise ValueError("momentum applies to SGD only; Adam has betas")
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {name!r}")


def _load(data: str, split: str, data_dir: str | Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-ready MNIST, converted once per process (the float training set is 188 MB)."""
    if data not in DATA_SHAPES:
        raise ValueError(f"data must be one of {sorted(DATA_SHAPES)}, got {data!r}")
    where = str(data_dir) if data_dir is not None else os.environ.get("ICSTOOLS_DATA", "")
    return _load_cached(data, split, data_dir, where, os.getcwd())


@functools.lru_cache(maxsize=4)
def _load_cached(
    data: str, split: str, data_dir: str | Path | None, where: str, cwd: str
) -> tuple[torch.Tensor, torch.Tensor]:
    # keyed on where the files are looked for; data.py re-reads files that changed on disk
    return mnist_tensors(split, data_dir, flatten=data == "mnist")


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return int(value)


def train(
    model: nn.Module,
    steps: int,
    *,
    lr: float,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    batch_size: int = 60,
    seed: int = 0,
    data: str = "mnist",
    data_dir: str | Path | None = None,
    eval_at: int | Schedule | None = None,
    eval_size: int | None = None,
    recorder: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], Recorder] | None = None,
    probe_size: int = 1000,
    measure: Callable[[nn.Module, torch.Tensor], Mapping[str, float]] | None = None,
    measure_at: int | Schedule | None = None,
    stop_on_divergence: bool = False,
    progress: Callable[[int], Any] | None = None,
) -> TrainResult:
    """Train ``model`` on MNIST, optionally under a recorder: the one training loop.

    Each step: set the step of any :class:`NoisyBatchNorm1d`; draw the next mini-batch; if
    ``eval_at`` selects the step, measure test accuracy (eval mode, no gradient) on the weights
    the step starts from; if ``measure_at`` does, call ``measure(model, batch)``; forward,
    loss, ``rec.set_target(y)``, backward, optimizer step; ``rec.log(loss=…, test_acc=…,
    **measurements)`` (kept by the recorder at recorded steps). The loss is checked for
    finiteness at every step.

    Parameters
    ----------
    model : torch.nn.Module
        Takes ``[batch, 784]`` (``data="mnist"``) or ``[batch, 1, 28, 28]``
        (``data="mnist-image"``) inputs in [0, 1] and returns class scores.
    steps : int
        Optimizer steps.
    lr : float
        Learning rate.
    optimizer : {"sgd", "adam"}
        With ``momentum`` (SGD only) and ``weight_decay``.
    loss_fn : callable
        ``loss_fn(scores, labels) -> scalar`` (default cross-entropy).
    batch_size : int
        Mini-batch size (the paper: 60).
    seed : int
        Seeds the batch order (its own generator; the model is initialized by the caller).
    data : {"mnist", "mnist-image"}
        Flattened or image-shaped MNIST.
    data_dir : str or Path, optional
        MNIST base directory (see :mod:`icstools.data`; default ``$ICSTOOLS_DATA``).
    eval_at : int or callable, optional
        Schedule (every N steps, or ``step -> bool``) of test accuracy during training; the
        recorder fixes the names it logs at its first record, so include step 0.
    eval_size : int, optional
        Test images used during training (the first ones); ``None``: all 10,000. The final
        accuracy always uses all of them.
    recorder : callable, optional
        ``(model, optimizer, probe) -> Recorder``, attached for the whole run and closed at the
        end. The probe is the first ``probe_size`` test images.
    probe_size : int
        Size of the probe batch.
    measure : callable, optional
        ``measure(model, x) -> {name: float}`` on the step's batch, logged into the run.
    measure_at : int or callable, optional
        Schedule of ``measure`` (default: every step that ``eval_at`` selects, else every step).
    stop_on_divergence : bool
        After the first non-finite loss, go on to the recorder's next scheduled step (the very
        step when it is one; at once without a recorder), take it, and stop.
    progress : callable, optional
        Called with each finished step (e.g. a tqdm bar's ``update``).

    Returns
    -------
    TrainResult

    Examples
    --------
    >>> torch.manual_seed(0)  # doctest: +SKIP
    >>> r = train(paper_mlp(bn=True), 100, lr=1.0, eval_at=50)  # doctest: +SKIP
    >>> sorted(r.accuracy), r.diverged_step  # doctest: +SKIP
    ([0, 50, 100], None)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    steps = _positive_int("steps", steps, 0)
    batch_size = _positive_int("batch_size", batch_size)
    probe_size = _positive_int("probe_size", probe_size)
    if eval_size is not None:
        eval_size = _positive_int("eval_size", eval_size)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if measure is not None and not callable(measure):
        raise TypeError(f"measure must be callable (model, x) -> dict, got {measure!r}")
    x_train, y_train = _load(data, "train", data_dir)
    x_test, y_test = _load(data, "test", data_dir)
    x_eval, y_eval = (
        (x_test, y_test) if eval_size is None else (x_test[:eval_size], y_test[:eval_size])
    )
    evaluate = None if eval_at is None else as_schedule(eval_at, "eval_at")
    if measure_at is not None:
        measuring: Schedule | None = as_schedule(measure_at, "measure_at")
    else:
        measuring = evaluate or as_schedule(1)
    if measure is None:
        measuring = None
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    opt = _make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    probe = x_test[:probe_size]
    rec = recorder(model, opt, probe) if recorder is not None else None
    result = TrainResult(recorder=rec)
    model.train()
    loss_value = math.nan
    if rec is not None:
        rec.attach()
    try:
        it = batches(x_train, y_train, batch_size, generator=gen)
        for step in range(steps):
            set_noise_step(model, step)
            xb, yb = next(it)
            logs: dict[str, float] = {}
            if evaluate is not None and evaluate(step):
                logs["test_acc"] = result.accuracy[step] = _accuracy(model, x_eval, y_eval)
            if measuring is not None and measuring(step):
                logs.update(measure(model, xb))
            loss = loss_fn(model(xb), yb)
            if rec is not None:
                rec.set_target(yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
            if rec is not None:
                rec.log(loss=loss_value, **logs)
            if progress is not None:
                progress(1)
            result.steps_done = step + 1
            if not math.isfinite(loss_value) and result.diverged_step is None:
                result.diverged_step = step
            if (
                stop_on_divergence
                and result.diverged_step is not None
                and (rec is None or rec.schedule(step))
            ):
                break
        result.final_loss = loss_value
    finally:
        if rec is not None:
            rec.detach()
            rec.close()
    result.accuracy[result.steps_done] = _accuracy(model, x_test, y_test)
    result.wall_time = time.perf_counter() - t0
    return result


def train_mnist(
    model: nn.Module,
    steps: int,
    *,
    lr: float,
    batch_size: int = 60,
    seed: int = 0,
    data_dir: str | Path | None = None,
    eval_every: int | None = None,
    recorder: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], Recorder] | None = None,
    probe_size: int = 1000,
    progress: Callable[[int], Any] | None = None,
) -> TrainResult:
    """Train ``model`` on flattened MNIST with plain SGD, optionally under a recorder.

    A shorter interface to :func:`train` (which see): test accuracy every ``eval_every`` steps
    (from step 0) and at the end, logged into the run as ``test_acc`` at recorded steps.

    Examples
    --------
    >>> r = train_mnist(paper_mlp(bn=True), steps=20, lr=0.5)  # doctest: +SKIP
    >>> 0 <= r.accuracy[20] <= 1  # doctest: +SKIP
    True
    """
    return train(
        model,
        steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        data_dir=data_dir,
        eval_at=eval_every or None,
        recorder=recorder,
        probe_size=probe_size,
        progress=progress,
    )


def record_steps(steps: int, records: int, *, early: bool = True) -> list[int]:
    """The recorded steps of a run: ``records`` evenly spaced ones, early ones and the last.

    The spacing is ``max(1, steps // records)``; with ``early``, the steps 1, 2, 5, 10, 20, …
    below the spacing are added (distributions move fastest at the start), and the last step
    ``steps - 1`` always is.

    Examples
    --------
    >>> record_steps(1000, 4)
    [0, 1, 2, 5, 10, 20, 50, 100, 200, 250, 500, 750, 999]
    >>> record_steps(3, 10)
    [0, 1, 2]
    """
    steps = _positive_int("steps", steps)
    records = _positive_int("records", records)
    every = max(1, steps // records)
    chosen = set(range(0, steps, every)) | {steps - 1}
    if early:
        ladder = (10**k * f for k in range(9) for f in (1, 2, 5))
        chosen |= {s for s in ladder if s < every}
    return sorted(s for s in chosen if 0 <= s < steps)

"""Models and training loops of the paper's experiments (Ioffe & Szegedy 2015, §4.1).

``paper_mlp`` builds the MNIST network of §4.1: 784-100-100-100-10, sigmoid hidden layers,
weights drawn from a small Gaussian, optionally with Batch Normalization before each sigmoid
(the layer's bias dropped, as §3.2 notes BN's β takes its role). ``train_mnist`` trains it with
SGD on mini-batches of 60 while a :class:`~icstools.Recorder` watches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icstools.data import batches, mnist_tensors
from icstools.recorder import Recorder

__all__ = ["TrainResult", "paper_mlp", "small_cnn", "train_mnist"]


def paper_mlp(
    bn: bool, *, widths: tuple[int, ...] = (100, 100, 100), init_std: float = 0.1
) -> nn.Sequential:
    """The §4.1 MNIST network: ``784 → widths → 10`` with sigmoid hidden layers.

    Parameters
    ----------
    bn : bool
        Insert ``BatchNorm1d`` between each hidden ``Linear`` (then bias-free) and its sigmoid.
    widths : tuple of int
        Hidden layer widths (the paper: three layers of 100).
    init_std : float
        Standard deviation of the Gaussian weight initialization ("small random Gaussian
        values"; the paper gives no number). Biases start at 0.

    Examples
    --------
    >>> m = paper_mlp(bn=True)
    >>> [type(x).__name__ for x in m][:3]
    ['Linear', 'BatchNorm1d', 'Sigmoid']
    """
    if init_std <= 0:
        raise ValueError(f"init_std must be > 0, got {init_std!r}")
    layers: list[nn.Module] = []
    d = 28 * 28
    for w in widths:
        linear = nn.Linear(d, w, bias=not bn)
        layers.append(linear)
        if bn:
            layers.append(nn.BatchNorm1d(w))
        layers.append(nn.Sigmoid())
        d = w
    layers.append(nn.Linear(d, 10))
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def small_cnn(
    channels: tuple[int, ...] = (32, 64, 64), in_channels: int = 3, classes: int = 10
) -> nn.Sequential:
    """Conv(3×3, no bias) → BatchNorm2d → in-place ReLU blocks, then pooling and a classifier.

    Examples
    --------
    >>> small_cnn()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    layers: list[nn.Module] = []
    c = in_channels
    for out in channels:
        layers += [
            nn.Conv2d(c, out, 3, padding=1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
        ]
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


@dataclass
class TrainResult:
    """What :func:`train_mnist` returns: test accuracy by step and the recorder used."""

    accuracy: dict[int, float] = field(default_factory=dict)
    final_loss: float = float("nan")
    recorder: Recorder | None = None


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            correct = sum(
                int((model(x[i : i + 2000]).argmax(1) == y[i : i + 2000]).sum())
                for i in range(0, len(x), 2000)
            )
    finally:
        model.train(was_training)
    return correct / len(x)


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
    """Train ``model`` on MNIST with plain SGD, optionally under a recorder.

    Parameters
    ----------
    model : torch.nn.Module
        Takes ``[batch, 784]`` inputs in [0, 1].
    steps : int
        Optimizer steps.
    lr : float
        SGD learning rate.
    batch_size : int
        Mini-batch size (the paper: 60).
    seed : int
        Seeds the batch order (its own generator).
    eval_every : int, optional
        Test accuracy every this many steps (and at the end).
    recorder : callable, optional
        ``(model, optimizer, probe) -> Recorder``; the recorder is attached for the whole run.
        The probe is the first ``probe_size`` test images, fixed for the run.
    progress : callable, optional
        Called with each finished step (e.g. a tqdm bar's ``update``).

    Examples
    --------
    >>> r = train_mnist(paper_mlp(bn=True), steps=20, lr=0.5)  # doctest: +SKIP
    >>> 0 <= r.accuracy[20] <= 1  # doctest: +SKIP
    True
    """
    x_train, y_train = mnist_tensors("train", data_dir)  # [60000, 784], [60000]
    x_test, y_test = mnist_tensors("test", data_dir)  # [10000, 784], [10000]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    probe = x_test[:probe_size]
    rec = recorder(model, opt, probe) if recorder is not None else None
    result = TrainResult(recorder=rec)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    if rec is not None:
        rec.attach()
    try:
        it = batches(x_train, y_train, batch_size, generator=gen)
        for step in range(steps):
            if eval_every and step % eval_every == 0:
                result.accuracy[step] = _accuracy(model, x_test, y_test)
            xb, yb = next(it)
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rec is not None:
                rec.log(loss=loss)
            if progress is not None:
                progress(1)
        result.final_loss = float(loss.detach())
    finally:
        if rec is not None:
            rec.detach()
            rec.close()
    result.accuracy[steps] = _accuracy(model, x_test, y_test)
    return result

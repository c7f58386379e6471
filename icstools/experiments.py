"""The paper's experiments: models, one training loop, presets and their runner.

Models
------
``paper_mlp`` builds the MNIST network of Ioffe & Szegedy (2015) §4.1: 784-100-100-100-10,
sigmoid hidden layers, weights drawn from a small Gaussian, optionally with Batch Normalization
before each nonlinearity (the layer's bias dropped, as §3.2 notes BN's β takes its role), or
with the "noisy" BatchNorm of Santurkar et al. (2018) §2 (:class:`NoisyBatchNorm1d`).
``small_cnn`` is a small convolutional network with or without ``BatchNorm2d``.

Training
--------
:func:`train` is the one training loop: MNIST mini-batches in a seeded order, SGD (or Adam),
cross-entropy, test accuracy on a schedule, an optional :class:`~icstools.Recorder` (built from
the model, the optimizer and a probe batch of test images), optional extra measurements logged
into the run, and divergence handled as a result. :func:`train_mnist` is its older, smaller
interface.

Presets
-------
A :class:`Preset` is one experiment: the paper claim(s) it tests, its conditions (a model
factory and optimizer settings each), data, steps, seeds, batch size, evaluation and what to
record. :data:`PRESETS` holds them by name (``icstools list`` prints them) and
:func:`run_preset` runs one, writing::

    <out>/<preset>/manifest.json
    <out>/<preset>/<condition>/seed-<n>.zarr      (one run store per condition and seed)

Each run's record schedule is ``preset.records`` evenly spaced steps plus a few early
log-spaced ones (1, 2, 5, 10, … below the spacing) and the last step; test accuracy is measured
at recorded steps (every ``eval_every``-th record), right before the step's training forward,
i.e. on exactly the weights the record describes, and logged into the run as ``test_acc``.
Seeds: run seed ``n`` seeds the weight initialization (``torch.manual_seed(n)`` before the
model is built), the batch order (its own generator), the recorder's sampling and, through the
initialization RNG, the noise of :class:`NoisyBatchNorm1d`; with one torch thread a run is
bit-for-bit reproducible.

The manifest (JSON) holds: ``preset``, ``description``, ``claims``, ``notes``, ``conditions``
(name → model factory, its keyword arguments, optimizer settings, steps), ``seeds``, ``steps``,
``quick``, ``batch_size``, ``data``, ``probe_size``, ``record`` (record schedule, evaluation,
recorder options), ``icstools_version``, ``torch_version``, ``created``, ``command`` (the
command line, when run from it) and ``call`` (the equivalent Python call), ``complete`` (false
while running or after a failure) and ``runs``: per run ``condition``, ``seed``, ``path``
(relative to the manifest), ``steps``, ``steps_done``, ``wall_time`` (s), ``final_test_acc``
(full test set, after the last step), ``test_acc`` (``{"step": [...], "value": [...]}``, during
training), ``final_loss``, ``diverged``, ``diverged_step`` (first step whose training loss was
not finite, or null), ``recorded_diverged_step`` (the store's ``diverged_step`` attribute: first
*recorded* step with a non-finite loss or activation) and ``records``. Non-finite numbers are
written as null.

Divergence is a result: a run whose training loss becomes non-finite goes on to the next
recorded step (so its store holds the diverged state and ``diverged_step``), stops there and is
reported as diverged.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib
import itertools
import json
import math
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from icstools import __version__
from icstools.data import batches, mnist_tensors
from icstools.recording.recorder import Recorder
from icstools.schedules import Schedule, as_schedule, at_steps
from icstools.store import open_run

__all__ = [
    "CNN_LR",
    "DATA_SHAPES",
    "FIG1_LR",
    "PRESETS",
    "RELU_LR",
    "Condition",
    "Manifest",
    "NoisyBatchNorm1d",
    "Preset",
    "PresetError",
    "RunInfo",
    "TrainResult",
    "fig1_lr_sweep",
    "get_preset",
    "load_factory",
    "load_manifest",
    "normalized_layers",
    "paper_mlp",
    "record_steps",
    "run_preset",
    "scale_invariance",
    "set_noise_step",
    "small_cnn",
    "train",
    "train_condition",
    "train_mnist",
]

#: Shape of one example for each ``data`` value of :func:`train` and :class:`Preset`.
DATA_SHAPES: dict[str, tuple[int, ...]] = {"mnist": (784,), "mnist-image": (1, 28, 28)}

_ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
_OPTIMIZERS = ("sgd", "adam")


class PresetError(ValueError):
    """An unknown preset, or run arguments a preset cannot run with (the message says which)."""


# ============================================================================================
# Models
# ============================================================================================


def _mix_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class NoisyBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm followed by time-varying noise (Santurkar et al. 2018, §2, "noisy BatchNorm").

    In train mode the BN output ``a`` (after γ and β) becomes ``a ← s·a + m``, with, at each
    step ``t`` and for each unit ``j``,

    * ``μ_j ~ U(−mean_range, mean_range)`` and ``σ_j ~ U(scale_range)`` (defaults
      U(−0.5, 0.5) and U(1, 1.25)): the noise *distribution*, redrawn every step;
    * for each activation (example ``i``, unit ``j``, and position for ``[N, C, L]`` inputs)
      ``m_ij ~ U(μ_j − mean_jitter, μ_j + mean_jitter)`` and ``s_ij ~ N(σ_j, scale_jitter²)``
      (defaults 0.1 and 0.1), i.i.d.; with ``per_example=False`` one ``m_j``, ``s_j`` per unit
      is shared by the whole batch instead.

    So each unit's output has a non-zero mean and a non-unit variance that change at every
    step: the distribution shift BN is supposed to remove, injected after it. Eval mode adds no
    noise.

    The noise comes from the module's own generator, not the global RNG: the draws of a forward
    are a function of ``(seed, noise_step, input shape)``. ``noise_step`` is the step counter,
    set by the training loop (:func:`set_noise_step`, which :func:`train` calls before every
    step); every forward of one step (the training forward, a recorder's probe, the
    recomputations of gradient-based ICS and landscape probes) therefore sees the same noise
    distribution, and forwards of the same shape the very same draws, so measurements taken
    during a step describe the network that was trained in it. A loop that never sets it trains
    with one fixed noise distribution.

    Parameters
    ----------
    num_features : int
        Units (BN's ``C``).
    mean_range : float
        Half-width of the uniform distribution of ``μ``.
    scale_range : (float, float)
        Range of the uniform distribution of ``σ``.
    mean_jitter : float
        Half-width of ``m`` around ``μ``.
    scale_jitter : float
        Standard deviation of ``s`` around ``σ``.
    per_example : bool
        Draw ``m`` and ``s`` per activation (default) or once per unit.
    seed : int, optional
        Seed of the noise. Default: drawn from the global torch RNG at construction, so a model
        built after ``torch.manual_seed(n)`` is reproducible and its layers get distinct noise.
    **kwargs
        Passed to :class:`torch.nn.BatchNorm1d` (``eps``, ``momentum``, ``affine``, …).

    Examples
    --------
    >>> bn = NoisyBatchNorm1d(3, seed=0)
    >>> x = torch.randn(8, 3)
    >>> bool(torch.equal(bn(x), bn(x)))  # same step, same shape: same draws
    True
    >>> a = bn(x); bn.noise_step = 1
    >>> bool(torch.equal(a, bn(x)))  # a new step: new noise
    False
    >>> _ = bn.eval(); bool(torch.allclose(bn(x), nn.functional.batch_norm(
    ...     x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)))
    True
    """

    def __init__(
        self,
        num_features: int,
        *,
        mean_range: float = 0.5,
        scale_range: tuple[float, float] = (1.0, 1.25),
        mean_jitter: float = 0.1,
        scale_jitter: float = 0.1,
        per_example: bool = True,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, **kwargs)
        lo, hi = (float(v) for v in scale_range)
        if not (mean_range >= 0 and mean_jitter >= 0 and scale_jitter >= 0 and lo <= hi):
            raise ValueError(
                "need mean_range, mean_jitter, scale_jitter ≥ 0 and scale_range (low, high) with "
                f"low ≤ high; got {mean_range!r}, {mean_jitter!r}, {scale_jitter!r}, "
                f"{scale_range!r}"
            )
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        self.mean_range = float(mean_range)
        self.scale_range = (lo, hi)
        self.mean_jitter = float(mean_jitter)
        self.scale_jitter = float(scale_jitter)
        self.per_example = bool(per_example)
        self.seed = int(seed)
        self.noise_step = 0

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, noise: μ~U(±{self.mean_range}), σ~U{self.scale_range}, "
            f"m~U(μ±{self.mean_jitter}), s~N(σ, {self.scale_jitter}²), "
            f"per_example={self.per_example}, seed={self.seed}"
        )

    def noise(self, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The shift ``m`` and scale ``s`` of this step for an output of ``shape`` (on CPU)."""
        c = self.num_features
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, self.noise_step))
        mu = (torch.rand(c, generator=gen) * 2 - 1) * self.mean_range  # [C]
        lo, hi = self.scale_range
        sigma = lo + (hi - lo) * torch.rand(c, generator=gen)  # [C]
        draw = tuple(shape) if self.per_example else (c,)
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, self.noise_step, draw))
        bcast = (c,) + (1,) * (len(draw) - 2) if self.per_example else (c,)
        m = mu.reshape(bcast) + (torch.rand(draw, generator=gen) * 2 - 1) * self.mean_jitter
        s = sigma.reshape(bcast) + self.scale_jitter * torch.randn(draw, generator=gen)
        if not self.per_example and len(shape) > 2:  # [C] -> [C, 1, ...] against [N, C, L]
            m, s = (t.reshape((c,) + (1,) * (len(shape) - 2)) for t in (m, s))
        return m, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if not self.training:
            return y
        m, s = self.noise(y.shape)
        return y * s.to(y) + m.to(y)


def set_noise_step(model: nn.Module, step: int) -> int:
    """Set ``noise_step`` of every :class:`NoisyBatchNorm1d` in ``model``; return how many.

    Examples
    --------
    >>> set_noise_step(paper_mlp(bn=True, noise=True), 7)
    3
    """
    n = 0
    for m in model.modules():
        if isinstance(m, NoisyBatchNorm1d):
            m.noise_step = int(step)
            n += 1
    return n


def paper_mlp(
    bn: bool,
    *,
    widths: tuple[int, ...] = (100, 100, 100),
    init_std: float = 0.1,
    activation: str = "sigmoid",
    noise: bool = False,
) -> nn.Sequential:
    """The §4.1 MNIST network: ``784 → widths → 10`` with sigmoid hidden layers.

    Parameters
    ----------
    bn : bool
        Insert ``BatchNorm1d`` between each hidden ``Linear`` (then bias-free) and its
        nonlinearity.
    widths : tuple of int
        Hidden layer widths (the paper: three layers of 100).
    init_std : float
        Standard deviation of the Gaussian weight initialization ("small random Gaussian
        values"; the paper gives no number). Biases start at 0.
    activation : {"sigmoid", "tanh", "relu"}
        The hidden nonlinearity (the paper: sigmoid).
    noise : bool
        With ``bn``: use :class:`NoisyBatchNorm1d` (Santurkar et al. 2018's noisy BN).

    Examples
    --------
    >>> m = paper_mlp(bn=True)
    >>> [type(x).__name__ for x in m][:3]
    ['Linear', 'BatchNorm1d', 'Sigmoid']
    >>> type(paper_mlp(bn=True, noise=True, activation="tanh")[2]).__name__
    'Tanh'
    """
    if init_std <= 0:
        raise ValueError(f"init_std must be > 0, got {init_std!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    if noise and not bn:
        raise ValueError("noise=True needs bn=True (the noise is injected after BatchNorm)")
    layers: list[nn.Module] = []
    d = 28 * 28
    for w in widths:
        linear = nn.Linear(d, w, bias=not bn)
        layers.append(linear)
        if bn:
            layers.append(NoisyBatchNorm1d(w) if noise else nn.BatchNorm1d(w))
        layers.append(_ACTIVATIONS[activation]())
        d = w
    layers.append(nn.Linear(d, 10))
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def small_cnn(
    channels: tuple[int, ...] = (32, 64, 64),
    in_channels: int = 3,
    classes: int = 10,
    *,
    bn: bool = True,
    pool: bool = False,
) -> nn.Sequential:
    """Conv(3×3) → BatchNorm2d → in-place ReLU blocks, then pooling and a classifier.

    Parameters
    ----------
    channels : tuple of int
        Output channels of the blocks.
    in_channels : int
        Image channels (1 for MNIST).
    classes : int
        Outputs of the classifier.
    bn : bool
        With ``BatchNorm2d`` after each convolution (then bias-free, §3.2); without, the
        convolutions have a bias.
    pool : bool
        A 2×2 max-pooling after every block but the last (28×28 → 14 → 7 for three blocks),
        which makes a step several times cheaper.

    Examples
    --------
    >>> small_cnn()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> [type(m).__name__ for m in small_cnn((4, 8), in_channels=1, bn=False, pool=True)][:4]
    ['Conv2d', 'ReLU', 'MaxPool2d', 'Conv2d']
    """
    layers: list[nn.Module] = []
    c = in_channels
    for i, out in enumerate(channels):
        layers.append(nn.Conv2d(c, out, 3, padding=1, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        if pool and i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2))
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


# ============================================================================================
# Measurements logged during training
# ============================================================================================


def normalized_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, layer, bn)`` for each weight layer whose output goes straight into a BatchNorm.

    Leaf modules are taken in definition order (exact for ``nn.Sequential`` models): a module
    with a ``weight`` parameter immediately followed by a ``BatchNorm1d/2d/3d``.

    Examples
    --------
    >>> [name for name, _, _ in normalized_layers(paper_mlp(bn=True))]
    ['0', '3', '6']
    """
    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    out = []
    for (name, layer), (_, nxt) in itertools.pairwise(leaves):
        if isinstance(getattr(layer, "weight", None), nn.Parameter) and isinstance(
            nxt, nn.modules.batchnorm._BatchNorm
        ):
            out.append((name, layer, nxt))
    return out


def _layer_inputs(
    model: nn.Module, names: Iterable[str], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The inputs of the named modules in a train-mode forward of ``x``, without side effects
    (no gradient, buffers and the RNG state restored)."""
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
            got.setdefault(name, args[0].detach())

        handles.append(modules[name].register_forward_pre_hook(hook))
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return got


def scale_invariance(
    model: nn.Module, x: torch.Tensor, scales: Sequence[float] = (0.1, 10.0, 1000.0)
) -> dict[str, float]:
    """The §3.3 identities measured on each BN-normalized layer of ``model`` for the batch ``x``.

    For every ``(layer, bn)`` of :func:`normalized_layers`, the layer's input on this batch
    (train-mode forward, no side effects) is passed to
    :func:`icstools.functional.gradients.check_scale_invariance` with the model's own dtype
    (float32: what
    training computes), and the largest relative error over ``scales`` is kept per identity:
    ``output`` (``BN((aW)u)`` vs ``BN(Wu)``), ``input_grad`` (``∂ℓ/∂u``), ``weight_grad``
    (``a·∂ℓ/∂(aW)`` vs ``∂ℓ/∂W``) and ``eps_effect`` (what BN's ε alone predicts). With ε > 0
    the identities are not exact: scaling by ``a`` turns ε into ε/a², which matters at small
    ``a`` where a layer's batch variance is small (for the §4.1 network at initialization,
    1–2% at a = 0.1).

    Returns
    -------
    dict
        ``si_<identity>_<layer>`` per layer (dots in the layer name become ``_``) and
        ``si_<identity>``, the worst over layers; empty when the model has no BN layer.

    Examples
    --------
    >>> r = scale_invariance(paper_mlp(bn=True), torch.rand(60, 784))
    >>> sorted(k for k in r if not k[-1].isdigit())
    ['si_eps_effect', 'si_input_grad', 'si_output', 'si_weight_grad']
    >>> bool(r["si_output"] <= r["si_eps_effect"])  # what BN's ε explains (β = 0 at init)
    True
    """
    from icstools.functional.gradients import check_scale_invariance

    pairs = normalized_layers(model)
    if not pairs:
        return {}
    inputs = _layer_inputs(model, [name for name, _, _ in pairs], x)
    out: dict[str, float] = {}
    idents = ("output", "input_grad", "weight_grad", "eps_effect")
    worst = dict.fromkeys(idents, 0.0)
    for name, layer, bn in pairs:
        res = check_scale_invariance(layer, bn, inputs[name], scales)
        for ident in idents:
            value = float(np.max(getattr(res, ident)))  # NaN propagates (a diverged model)
            out[f"si_{ident}_{name.replace('.', '_')}"] = value
            worst[ident] = max(worst[ident], value) if not math.isnan(value) else math.nan
    out.update({f"si_{k}": v for k, v in worst.items()})
    return out


_MEASURES: dict[str, Callable[[nn.Module, torch.Tensor], dict[str, float]]] = {
    "scale_invariance": scale_invariance,
}


# ============================================================================================
# Training
# ============================================================================================


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


# ============================================================================================
# Presets
# ============================================================================================


@dataclass(frozen=True)
class Condition:
    """One arm of an experiment: a model factory and its optimizer settings.

    Attributes
    ----------
    name : str
        Folder name of its runs (``<out>/<preset>/<name>/seed-<n>.zarr``).
    factory : callable
        Builds the model: ``factory(**kwargs)``, called after ``torch.manual_seed(seed)``.
    kwargs : mapping
        Keyword arguments of ``factory`` (JSON-able: they go into the manifest).
    lr : float
        Learning rate.
    optimizer : {"sgd", "adam"}
    momentum, weight_decay : float
    steps : int, optional
        Steps of this condition when fewer than the preset's (e.g. 1: a measurement at
        initialization).
    record : mapping
        Recorder options overriding the preset's for this condition.
    description : str
        One line.
    """

    name: str
    factory: Callable[..., nn.Module]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    lr: float = 0.5
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    steps: int | None = None
    record: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def build(self) -> nn.Module:
        """The model, freshly initialized from the global torch RNG."""
        return self.factory(**self.kwargs)

    def settings(self) -> dict[str, Any]:
        """JSON-able description (for the manifest)."""
        return {
            "description": self.description,
            "model": f"{self.factory.__module__}:{self.factory.__qualname__}",
            "kwargs": _jsonable(dict(self.kwargs)),
            "optimizer": self.optimizer,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "steps": self.steps,
            "record": _jsonable(dict(self.record)),
        }


@dataclass(frozen=True)
class Preset:
    """One experiment: the claim(s) it tests, its conditions, data, schedule and recording.

    Attributes
    ----------
    name : str
        Name on the command line (``icstools run <name>``).
    description : str
        One line (``icstools list``).
    claims : tuple of str
        The paper claims the experiment tests, with their source.
    conditions : tuple of Condition
        The arms.
    steps : int
        Optimizer steps per run (full scale).
    seeds : tuple of int
        Seeds (one run per condition and seed).
    batch_size : int
        Mini-batch size.
    data : {"mnist", "mnist-image"}
        Flattened (MLPs) or ``[1, 28, 28]`` (CNNs) MNIST.
    records : int
        Evenly spaced records per run (plus early and last ones: :func:`record_steps`).
    eval_every : int
        Test accuracy at every ``eval_every``-th record (always the first and the last).
    eval_size : int, optional
        Test images used for accuracy during training (``None``: all 10,000).
    probe_size : int
        Probe batch: the first ``probe_size`` test images.
    record : mapping
        Further :class:`~icstools.Recorder` options (``sites``, ``role``, ``probe_sample``,
        ``gradients``, ``jacobian_examples``, …).
    ics_every, landscape_every, jacobian_every : int, optional
        Gradient-based ICS, landscape probes, Jacobian spectra at every k-th record (with the
        cross-entropy loss); ``None``: not measured.
    measure : str, optional
        A measurement logged into the run (``"scale_invariance"``: :func:`scale_invariance`),
        at every ``measure_every``-th record.
    measure_every : int
    quick_steps : int
        Steps of ``quick=True`` runs (with one seed).
    quick_records : int
        ``records`` of ``quick=True`` runs (when fewer than ``records``).
    quick_record : mapping
        Recorder options overriding the others in ``quick=True`` runs (e.g. fewer Jacobian
        examples).
    notes : str
        Longer documentation: the set-up's choices and figures measured with it.
    """

    name: str
    description: str
    claims: tuple[str, ...]
    conditions: tuple[Condition, ...]
    steps: int
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 60
    data: str = "mnist"
    records: int = 100
    eval_every: int = 1
    eval_size: int | None = None
    probe_size: int = 1000
    record: Mapping[str, Any] = field(default_factory=dict)
    ics_every: int | None = None
    landscape_every: int | None = None
    jacobian_every: int | None = None
    measure: str | None = None
    measure_every: int = 1
    quick_steps: int = 300
    quick_records: int = 10
    quick_record: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        names = [c.name for c in self.conditions]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"preset {self.name!r} needs conditions with distinct names: {names}")
        if self.data not in DATA_SHAPES:
            raise ValueError(f"data must be one of {sorted(DATA_SHAPES)}, got {self.data!r}")
        if self.measure is not None and self.measure not in _MEASURES:
            raise ValueError(f"measure must be one of {sorted(_MEASURES)}, got {self.measure!r}")

    def condition(self, name: str) -> Condition:
        """The condition called ``name``."""
        for c in self.conditions:
            if c.name == name:
                return c
        raise PresetError(
            f"preset {self.name!r} has no condition {name!r}; conditions: "
            f"{[c.name for c in self.conditions]}"
        )

    def recorder_options(self, condition: Condition, *, quick: bool = False) -> dict[str, Any]:
        """The Recorder options of ``condition``'s runs besides schedules, probe and path."""
        return {**self.record, **condition.record, **(self.quick_record if quick else {})}

    def settings(self) -> dict[str, Any]:
        """JSON-able description of what is recorded and evaluated (for the manifest)."""
        return {
            "records": self.records,
            "schedule": "record_steps(steps, records): evenly spaced + early (1, 2, 5, …) + last",
            "eval": {"every_records": self.eval_every, "eval_size": self.eval_size},
            "probe_size": self.probe_size,
            "recorder": _jsonable(dict(self.record)),
            "ics_every_records": self.ics_every,
            "landscape_every_records": self.landscape_every,
            "jacobian_every_records": self.jacobian_every,
            "measure": self.measure,
            "measure_every_records": self.measure_every,
        }


#: The presets by name, in the order of :func:`preset_names`.
PRESETS: dict[str, Preset] = {}


def _preset(build: Callable[[], Preset]) -> Callable[[], Preset]:
    """Register the preset a function builds; its docstring becomes the preset's notes."""
    preset = build()
    if preset.name in PRESETS:
        raise ValueError(f"duplicate preset {preset.name!r}")
    PRESETS[preset.name] = dataclasses.replace(preset, notes=_dedent(build.__doc__ or ""))
    return build


def _dedent(text: str) -> str:
    lines = text.strip("\n").splitlines()
    return (lines[0].strip() + "\n" + textwrap.dedent("\n".join(lines[1:]))).strip()


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises
    ------
    PresetError
        Unknown name; the message lists the valid ones.

    Examples
    --------
    >>> get_preset("fig1").steps
    50000
    """
    if isinstance(name, Preset):
        return name
    if not isinstance(name, str):
        raise TypeError(f"a preset name must be a string, got {type(name).__name__}")
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


#: The SGD learning rate of the §4.1 network, chosen with :func:`fig1_lr_sweep` (see ``fig1``).
FIG1_LR = 1.0

_CLAIM_41_ACC = (
    "Ioffe & Szegedy 2015 §4.1, Fig. 1(a): the batch-normalized network reaches a higher test "
    "accuracy, and faster."
)
_CLAIM_41_ICS = (
    "Ioffe & Szegedy 2015 §4.1, Fig. 1(b, c): with BN the distribution of the sigmoid inputs "
    "is much more stable during training (less internal covariate shift)."
)
_CLAIM_LR = (
    "Ioffe & Szegedy 2015 §3.3, §4.2.2: BN allows much higher learning rates (×5, ×30) without "
    "divergence; the same increase without BN drives the parameters to machine infinity."
)
_CLAIM_SAT = (
    "Ioffe & Szegedy 2015 §3.3, §4.2.2: BN prevents training from getting stuck in the saturated "
    "regimes of nonlinearities, making deep sigmoid networks trainable."
)
_CLAIM_SCALE = (
    "Ioffe & Szegedy 2015 §3.3: with BN, back-propagation through a layer is invariant to the "
    "scale of its weights (BN((aW)u) = BN(Wu), ∂ℓ/∂u unchanged, ∂ℓ/∂(aW) = ∂ℓ/∂W / a), larger "
    "weights get smaller gradients, and BN stabilizes parameter growth."
)
_CLAIM_JAC = (
    "Ioffe & Szegedy 2015 §3.3 (conjecture): BN keeps the singular values of the layer "
    "Jacobians close to 1."
)
_CLAIM_YANG = (
    "Yang et al. 2019: at initialization, gradients explode with depth in batch-normalized "
    "fully connected networks."
)
_CLAIM_NOISY = (
    "Santurkar et al. 2018 §2: BN's benefit does not come from reducing ICS: a network with "
    "noisy BN (a time-varying distribution shift injected after each BN) trains about as well "
    "as with BN, though its layer inputs are far less stable."
)
_CLAIM_SANT_ICS = (
    "Santurkar et al. 2018 §2.2: measured through gradients (Def. 2.1), BN does not reduce ICS."
)
_CLAIM_SANT_SMOOTH = (
    "Santurkar et al. 2018 §3: BN makes the loss landscape smoother (smaller loss variation, "
    "more predictive gradients, lower effective β-smoothness)."
)
_CLAIM_CNN = (
    "Ioffe & Szegedy 2015 §3.2: in convolutional layers BN normalizes per feature map (over the "
    "batch and all locations), and brings the same benefits as in fully connected ones."
)


def _mlp(name: str, lr: float, description: str, **kwargs: Any) -> Condition:
    return Condition(name, paper_mlp, kwargs, lr=lr, description=description)


@_preset
def _fig1() -> Preset:
    """Paper §4.1, Fig. 1: the 784-100-100-100-10 sigmoid MLP on MNIST, with and without BN.

    Set-up: weights ~ N(0, 0.1²), biases 0 (BN network: no hidden biases), plain SGD, batches
    of 60, 50,000 steps, 3 seeds. Recorded: the inputs of the three sigmoids (the paper's
    Fig. 1(b, c) sites) on the training batch and on a fixed probe of the first 1,000 test
    images, with all 1,000 probe values per unit kept (``probe_sample``) so that W1 and the
    other sample-based drift metrics are exact; activation gradients and parameter dynamics
    (``gradients=True``); test accuracy (all 10,000 images) at every record.

    Learning rate. The paper gives neither the learning rate nor the initialization scale. The
    rate was chosen with ``fig1_lr_sweep(lrs=(0.1, 0.3, 1, 3), steps=5000, seeds=(0,))``,
    run on 2 shared CPU cores with 1 torch thread (2026-11-23); final test accuracy (all
    10,000 test images) after 5,000 steps, seed 0 (seed 1 in parentheses):

    ======  ===============  ===============
    lr      baseline         BN
    ======  ===============  ===============
    0.1     0.9117           0.9552
    0.3     0.9555           0.9643
    1       0.9707 (0.9682)  0.9666 (0.9725)
    3       0.9689 (0.9682)  0.9698 (0.9747)
    ======  ===============  ===============

    No run diverged. The baseline's best rate is 1.0 (3.0 ties on seed 1), and it is used for
    both networks (``FIG1_LR``): the paper compares the two networks in one set-up, and the
    baseline is the one whose rate §4.2.2's multipliers refer to. At 3,000 steps (seed 0) the
    baseline reaches 0.9628 at lr 5 and stays at chance (0.1135) at lr 30; BN reaches 0.9610
    and 0.9292 (see ``lr-sweep``).
    """
    return Preset(
        name="fig1",
        description="§4.1 Fig. 1: sigmoid MLP on MNIST, BN vs none; sigmoid inputs over 50k steps",
        claims=(_CLAIM_41_ACC, _CLAIM_41_ICS),
        conditions=(
            _mlp("baseline", FIG1_LR, "784-100-100-100-10 sigmoid MLP, no BN", bn=False),
            _mlp("bn", FIG1_LR, "the same with BN before each sigmoid (no hidden bias)", bn=True),
        ),
        steps=50_000,
        records=100,
        record={"probe_sample": 1000, "gradients": True},
    )


#: SGD learning rate of the ReLU variant of the §4.1 network in ``lr-sweep``: the best of
#: (0.03, 0.1, 0.3, 0.5) for the no-BN network after 2,000 steps (seed 0: 0.9368, 0.9604, 0.9647,
#: 0.9640; BN: 0.9546, 0.9703, 0.9718, 0.9726).
RELU_LR = 0.3


@_preset
def _lr_sweep() -> Preset:
    """Paper §4.2.2's learning-rate multipliers ×1, ×5, ×30 on the §4.1 network, with ReLU too.

    Two families, each at ×1, ×5 and ×30 of its no-BN network's best rate, with and without BN
    (12 conditions), 10,000 steps, 3 seeds:

    * ``baseline-x<m>``, ``bn-x<m>``: the §4.1 sigmoid network, base rate ``FIG1_LR`` (1.0);
    * ``relu-baseline-x<m>``, ``relu-bn-x<m>``: the same with ReLU (the nonlinearity of the
      paper's Inception runs, where the ×5 rate without BN "caused the model parameters to
      reach machine infinity"), base rate ``RELU_LR`` (0.3).

    Found while choosing the rates (2,000–3,000 steps, seed 0): a sigmoid network cannot reach
    machine infinity (its activations are bounded, so are its gradients), and without BN at ×30
    it stays at chance accuracy instead; the ReLU network without BN diverges at ×5 (non-finite
    loss at step 15) and is dead at ×30 (0.098); with BN the ReLU network trains at ×5
    (0.9721) but not at ×30 (0.098). Whether a run is stuck shows in its accuracy.

    A run whose loss becomes non-finite goes on to the next recorded step, stops there and is
    reported as diverged (its store has ``diverged_step``): that is a result, not an error.
    Recorded: the nonlinearities' inputs (train and probe), activation gradients and parameter
    norms (weight growth at high rates), test accuracy at every record.
    """
    conds = []
    for act, base in (("sigmoid", FIG1_LR), ("relu", RELU_LR)):
        for bn in (False, True):
            for mult in (1, 5, 30):
                prefix = "" if act == "sigmoid" else f"{act}-"
                label = f"{prefix}{'bn' if bn else 'baseline'}-x{mult}"
                desc = f"{'BN' if bn else 'no-BN'} {act} MLP at lr {base * mult:g} (×{mult})"
                conds.append(_mlp(label, base * mult, desc, bn=bn, activation=act))
    return Preset(
        name="lr-sweep",
        description="§4.2.2 on MNIST: lr ×1, ×5, ×30 with and without BN; divergence as a result",
        claims=(_CLAIM_LR,),
        conditions=tuple(conds),
        steps=10_000,
        records=50,
        record={"gradients": True},
    )


@_preset
def _saturating() -> Preset:
    """Deep saturating networks: 8 hidden layers of 100, sigmoid or tanh, with and without BN.

    Same initialization (N(0, 0.1²)) and lr (``FIG1_LR``) as ``fig1``, 20,000 steps, 3 seeds.
    Whether each network trains or stays stuck shows in the test accuracy; ``sat_frac`` (share
    of sigmoid/tanh inputs where the derivative is below 0.01) per unit over time,
    and the activation-gradient norms per layer (``gradients=True``) show why.

    Checked while setting it up (seed 0, test accuracy at steps 1,000 / 2,000 / 3,000): sigmoid
    0.098 / 0.114 / 0.114 and tanh 0.089 / 0.103 / 0.114 without BN (stuck at chance), with BN
    0.923 / 0.949 / 0.951 and 0.938 / 0.964 / 0.964.
    """
    widths = (100,) * 8
    conds = []
    for act in ("sigmoid", "tanh"):
        for bn in (False, True):
            conds.append(
                _mlp(
                    f"{act}{'-bn' if bn else ''}",
                    FIG1_LR,
                    f"784-8×100-10 {act} MLP {'with' if bn else 'without'} BN",
                    bn=bn,
                    widths=widths,
                    activation=act,
                )
            )
    return Preset(
        name="saturating",
        description="8-layer sigmoid and tanh MLPs, BN vs none: trainable or stuck, sat_frac",
        claims=(_CLAIM_SAT,),
        conditions=tuple(conds),
        steps=20_000,
        records=50,
        record={"gradients": True},
    )


@_preset
def _scale_invariance() -> Preset:
    """§3.3 measured during training, on the §4.1 network.

    Conditions: BN at ``FIG1_LR`` and at 5× it, and the no-BN network at ``FIG1_LR`` as the
    control for parameter growth; 20,000 steps, 3 seeds. At every 5th record the BN layers'
    identities are checked on the step's batch with ``scale_invariance`` (scales 0.1, 10, 1000;
    float32, as training computes): ``si_output``, ``si_input_grad``, ``si_weight_grad`` (worst
    relative error over layers and scales) and ``si_eps_effect`` (the part BN's ε explains),
    plus per layer ``si_<identity>_<layer>``. ``gradients=True`` records the parameter norms
    and ``eff_lr`` = lr/‖W‖² of the normalized weights, the effective step size under scale
    invariance.
    """
    return Preset(
        name="scale-invariance",
        description="§3.3 during training: BN's weight-scale invariance, parameter growth, eff_lr",
        claims=(_CLAIM_SCALE,),
        conditions=(
            _mlp("bn", FIG1_LR, "BN sigmoid MLP", bn=True),
            _mlp("bn-x5", 5 * FIG1_LR, "BN sigmoid MLP at 5× the lr", bn=True),
            _mlp("baseline", FIG1_LR, "no-BN sigmoid MLP (parameter growth control)", bn=False),
        ),
        steps=20_000,
        records=50,
        record={"gradients": True},
        measure="scale_invariance",
        measure_every=5,
    )


@_preset
def _jacobian() -> Preset:
    """Jacobian spectra: §3.3's conjecture during training, and Yang et al. 2019 at init.

    Training: the §4.1 network with and without BN, 10,000 steps, 3 seeds; at every 5th record
    the singular values of the per-example Jacobians (64 probe examples) of each segment between
    consecutive sigmoid inputs and of the whole network (``jac_sv``, ``jac_*`` summaries), BN's
    batch statistics held fixed (the linearization §3.3 argues about).

    Initialization: sigmoid MLPs of 2, 4, 8 and 16 hidden layers of 100, with and without BN,
    one step each: the record of step 0 holds the spectra of the untrained network (BN: the
    ``full`` per-example Jacobian, batch statistics' dependence included, as back-propagation
    sees it) and the activation-gradient norms per layer (``grad_norm``), whose growth towards
    the input is Yang et al.'s gradient explosion.
    """
    conds = [
        _mlp("baseline", FIG1_LR, "no-BN sigmoid MLP, trained", bn=False),
        _mlp("bn", FIG1_LR, "BN sigmoid MLP, trained", bn=True),
    ]
    for bn in (True, False):
        for depth in (2, 4, 8, 16):
            label = "bn" if bn else "baseline"
            conds.append(
                Condition(
                    f"init-{label}-depth{depth}",
                    paper_mlp,
                    {"bn": bn, "widths": (100,) * depth},
                    lr=FIG1_LR,
                    steps=1,
                    record={"jacobian_bn": "full"} if bn else {},
                    description=f"{depth} hidden layers, {'BN' if bn else 'no BN'}, at init",
                )
            )
    return Preset(
        name="jacobian",
        description="Jacobian spectra: BN vs none over training, and BN nets at init by depth",
        claims=(_CLAIM_JAC, _CLAIM_YANG),
        conditions=tuple(conds),
        steps=10_000,
        records=50,
        jacobian_every=5,
        record={"gradients": True, "jacobian_examples": 64},
        quick_record={"jacobian_examples": 16},
    )


@_preset
def _noisy_bn() -> Preset:
    """Santurkar et al. 2018 §2–3 on the §4.1 network: BN, noisy BN, no BN.

    Noisy BN is ``NoisyBatchNorm1d`` (a ← s·a + m after each BN; per unit and step
    μ ~ U(−0.5, 0.5), σ ~ U(1, 1.25); per activation m ~ U(μ ± 0.1), s ~ N(σ, 0.1²)).
    20,000 steps, 3 seeds (noisy BN alone, seed 0: test accuracy 0.932, 0.953, 0.963 after
    1,000, 2,000, 3,000 steps). Recorded: sigmoid inputs (train and probe, 1,000 probe values per
    unit for exact drift), gradients, gradient-based ICS (Def. 2.1: ``ics_l2``, ``ics_cos`` per
    layer) and loss-landscape probes along the gradient (``loss_variation``,
    ``beta_smoothness``, ``landscape_*`` at 0.25…4× the lr) at every 5th record, with the
    cross-entropy loss and BN in train mode.
    """
    return Preset(
        name="noisy-bn",
        description="Santurkar et al. 2018: BN vs noisy BN vs none; drift, gradient ICS, landscape",
        claims=(_CLAIM_NOISY, _CLAIM_SANT_ICS, _CLAIM_SANT_SMOOTH),
        conditions=(
            _mlp("bn", FIG1_LR, "BN sigmoid MLP", bn=True),
            _mlp(
                "noisy-bn", FIG1_LR, "BN sigmoid MLP with noise after each BN", bn=True, noise=True
            ),
            _mlp("baseline", FIG1_LR, "no-BN sigmoid MLP", bn=False),
        ),
        steps=20_000,
        records=50,
        record={"probe_sample": 1000, "gradients": True},
        ics_every=5,
        landscape_every=5,
    )


#: SGD learning rate of the ``cnn`` preset: the best of (0.1, 0.3, 1.0) for the no-BN CNN.
CNN_LR = 0.3


@_preset
def _cnn() -> Preset:
    """§3.2: a small CNN on 1×28×28 MNIST images, ``BatchNorm2d`` (per-channel) vs none.

    ``small_cnn((16, 32, 32), in_channels=1, pool=True)``: three 3×3 conv blocks (conv → BN →
    ReLU, 2×2 max-pooling after the first two), global average pooling, a linear classifier; the
    no-BN variant has conv biases instead. PyTorch's default initialization, plain SGD at lr 0.3
    (``CNN_LR``), batches of 60, 5,000 steps, 3 seeds. The rate is the no-BN network's best of
    (0.1, 0.3, 1.0) after 1,500 steps (seed 0, test accuracy on 2,000 images: 0.915, 0.955,
    0.098 (stuck); with BN 0.960 at 0.1 and 0.942 at 0.3), used for both. Recorded: the ReLU
    inputs (units = channels, pooled over batch and locations, as BN does) on the training batch
    and a probe of 256 test images (1,000 sampled positions per channel), gradients; test
    accuracy on 2,000 test images during training (all 10,000 at the end).
    """
    kw = {"channels": (16, 32, 32), "in_channels": 1, "pool": True}
    return Preset(
        name="cnn",
        description="§3.2: small CNN on MNIST images, BatchNorm2d (per channel) vs none",
        claims=(_CLAIM_CNN,),
        conditions=(
            Condition(
                "baseline",
                small_cnn,
                {**kw, "bn": False},
                lr=CNN_LR,
                description="3 conv blocks with bias, no BN",
            ),
            Condition(
                "bn",
                small_cnn,
                {**kw, "bn": True},
                lr=CNN_LR,
                description="3 conv blocks with BatchNorm2d",
            ),
        ),
        steps=5_000,
        data="mnist-image",
        records=50,
        eval_size=2000,
        probe_size=256,
        record={"probe_sample": 1000, "gradients": True},
        quick_steps=100,
    )


# ============================================================================================
# Runner and manifest
# ============================================================================================


def _jsonable(value: Any) -> Any:
    """JSON-able copy: tuples → lists, non-finite floats → None, types/callables → names."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, type(None), str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, Path):
        return str(value)
    return repr(value)


@dataclass
class RunInfo:
    """One run of a preset (a condition and a seed), as listed in the manifest.

    Attributes
    ----------
    condition : str
    seed : int
    path : str
        The run store, relative to the manifest's folder.
    steps : int
        Steps asked for.
    steps_done : int
        Steps taken (fewer when a diverged run stopped).
    wall_time : float
        Seconds.
    final_test_acc : float
        Full test set, after the last step.
    test_acc : dict of int to float
        Test accuracy during training, by step (the eval set of the preset).
    final_loss : float or None
    diverged : bool
    diverged_step : int or None
        First step whose training loss was not finite.
    recorded_diverged_step : int or None
        The store's ``diverged_step``: first recorded step with a non-finite loss or activation.
    records : int
        Records in the store.
    """

    condition: str
    seed: int
    path: str
    steps: int
    steps_done: int
    wall_time: float
    final_test_acc: float
    test_acc: dict[int, float]
    final_loss: float | None
    diverged: bool
    diverged_step: int | None
    recorded_diverged_step: int | None
    records: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``test_acc`` as ``{"step": [...], "value": [...]}``)."""
        d = dict(self.__dict__)
        d["test_acc"] = {
            "step": sorted(self.test_acc),
            "value": [self.test_acc[s] for s in sorted(self.test_acc)],
        }
        return _jsonable(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunInfo:
        """Inverse of :meth:`to_dict`."""
        acc = d.get("test_acc") or {"step": [], "value": []}
        kw = {k: d.get(k) for k in cls.__dataclass_fields__}
        kw["test_acc"] = dict(zip((int(s) for s in acc["step"]), acc["value"], strict=True))
        return cls(**kw)


@dataclass
class Manifest:
    """What a :func:`run_preset` call did: the preset's set-up and every run's outcome.

    Written as ``<out>/<preset>/manifest.json`` after every run (``complete`` turns true at the
    end); :func:`load_manifest` reads it back. The keys are listed in :mod:`icstools.experiments`.
    """

    preset: str
    description: str
    claims: list[str]
    notes: str
    conditions: dict[str, dict[str, Any]]
    seeds: list[int]
    steps: int
    quick: bool
    batch_size: int
    data: str
    probe_size: int
    record: dict[str, Any]
    icstools_version: str
    torch_version: str
    created: str
    command: list[str] | None
    call: str
    complete: bool = False
    runs: list[RunInfo] = field(default_factory=list)
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (without ``path``)."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("runs", "path")}
        d = _jsonable(d)
        d["runs"] = [r.to_dict() for r in self.runs]
        return d

    def write(self, path: str | Path | None = None) -> Path:
        """Write the manifest as JSON (atomically: a temporary file renamed over it)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path: give one, or set Manifest.path")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, target)
        self.path = target
        return target

    def run_path(self, run: RunInfo) -> Path:
        """Absolute path of a run's store."""
        base = self.path.parent if self.path is not None else Path(".")
        return base / run.path

    def open_runs(self) -> dict[str, list[xr.Dataset]]:
        """The runs' datasets by condition, ``{condition: [xarray.Dataset per seed]}``, in
        the manifest's order (opened with :func:`icstools.open_run`).

        Examples
        --------
        >>> runs = run_preset("fig1", quick=True, out="/tmp/r").open_runs()  # doctest: +SKIP
        >>> sorted(runs)  # doctest: +SKIP
        ['baseline', 'bn']
        """
        out: dict[str, list[xr.Dataset]] = {}
        for run in self.runs:
            out.setdefault(run.condition, []).append(open_run(self.run_path(run)))
        return out

    def summary(self) -> str:
        """A table of the runs (accuracy, divergence, wall time) and the mean per condition.

        Examples
        --------
        >>> print(load_manifest("data/runs/fig1").summary())  # doctest: +SKIP
        """
        header = ("condition", "seed", "test acc", "diverged", "steps", "wall time")
        rows = []
        for r in self.runs:
            div = "no" if not r.diverged else f"at step {r.diverged_step}"
            rows.append(
                (
                    r.condition,
                    str(r.seed),
                    f"{r.final_test_acc:.4f}",
                    div,
                    f"{r.steps_done}/{r.steps}",
                    f"{r.wall_time:.1f} s",
                )
            )
        lines = [f"{self.preset}: {self.description}"]
        lines += _table(header, rows)
        by_cond: dict[str, list[RunInfo]] = {}
        for r in self.runs:
            by_cond.setdefault(r.condition, []).append(r)
        if any(len(v) > 1 for v in by_cond.values()):
            lines.append("")
            agg = []
            for cond, runs in by_cond.items():
                acc = np.array([r.final_test_acc for r in runs])
                sd = f" ± {acc.std(ddof=1):.4f}" if len(acc) > 1 else ""
                agg.append(
                    (
                        cond,
                        str(len(runs)),
                        f"{acc.mean():.4f}{sd}",
                        f"{sum(r.diverged for r in runs)}/{len(runs)}",
                        f"{sum(r.wall_time for r in runs):.1f} s",
                    )
                )
            lines += _table(("condition", "runs", "test acc (mean ± sd)", "diverged", "time"), agg)
        return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [
        fmt.format(*r) for r in rows
    ]


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest: ``<out>/<preset>/manifest.json`` or its folder.

    Raises
    ------
    FileNotFoundError
        No manifest there.
    ValueError
        Not a valid manifest (bad JSON or missing keys).

    Examples
    --------
    >>> m = load_manifest("data/runs/fig1")  # doctest: +SKIP
    >>> [r.final_test_acc for r in m.runs]  # doctest: +SKIP
    """
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"no manifest at {p}")
    try:
        d = json.loads(p.read_text())
        runs = [RunInfo.from_dict(r) for r in d.pop("runs")]
        kw = {k: d[k] for k in Manifest.__dataclass_fields__ if k not in ("runs", "path")}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{p} is not a valid icstools manifest: {exc!r}") from None
    return Manifest(**kw, runs=runs, path=p)


def _every_kth(steps: list[int], k: int) -> at_steps:
    """Every k-th of the recorded ``steps`` (the first and the last always)."""
    chosen = set(steps[::k]) | {steps[0], steps[-1]}
    return at_steps(chosen)


def _seeds_arg(seeds: int | Sequence[int] | None, default: tuple[int, ...]) -> list[int]:
    if seeds is None:
        return list(default)
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise PresetError(f"seeds must be ≥ 1 (a number of seeds) or a list, got {seeds}")
        return list(range(int(seeds)))
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise PresetError(f"seeds must be a number of seeds or a list of ints, got {seeds!r}")
    out = list(seeds)
    if not out or any(
        isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in out
    ):
        raise PresetError(f"seeds must be a non-empty list of ints ≥ 0, got {seeds!r}")
    if len(set(out)) != len(out):
        raise PresetError(f"seeds must not repeat, got {out}")
    return [int(s) for s in out]


def _call_repr(name: str, **kwargs: Any) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"icstools.experiments.run_preset({name!r}, {args})"


def run_preset(
    name: str | Preset,
    *,
    steps: int | None = None,
    seeds: int | Sequence[int] | None = None,
    out: str | Path = "data/runs",
    quick: bool = False,
    progress: bool = True,
    data_dir: str | Path | None = None,
    threads: int | None = None,
    conditions: Sequence[str] | None = None,
    command: Sequence[str] | None = None,
) -> Manifest:
    """Run every condition and seed of a preset; write the stores and ``manifest.json``.

    Parameters
    ----------
    name : str or Preset
        A preset name (see :data:`PRESETS`, ``icstools list``) or a :class:`Preset`.
    steps : int, optional
        Steps per run instead of the preset's (conditions with fewer steps keep theirs).
    seeds : int or sequence of int, optional
        A number ``N`` of seeds (0 … N−1) or the seeds themselves; default the preset's.
    out : str or Path
        Base folder: runs go to ``<out>/<preset>/<condition>/seed-<n>.zarr`` (replaced if
        present) and the manifest to ``<out>/<preset>/manifest.json``.
    quick : bool
        A reduced end-to-end version: ``preset.quick_steps`` steps (a few hundred) and the first
        seed, unless ``steps``/``seeds`` say otherwise.
    progress : bool
        A tqdm progress bar per run on stderr, when stderr is a terminal (a log file gets
        none: carriage-return updates would flood it).
    data_dir : str or Path, optional
        MNIST base folder (default ``$ICSTOOLS_DATA``, see :mod:`icstools.data`).
    threads : int, optional
        torch intra-op threads during the runs (restored after).
    conditions : sequence of str, optional
        Run only these conditions (default: all of the preset's).
    command : sequence of str, optional
        The command line that asked for the run, kept in the manifest.

    Returns
    -------
    Manifest
        Also written to ``<out>/<preset>/manifest.json``; ``summary()`` gives a table.

    Raises
    ------
    PresetError
        Unknown preset, or bad ``steps``/``seeds``.
    icstools.data.MNISTError
        MNIST is not found (or invalid).

    Examples
    --------
    >>> m = run_preset("fig1", quick=True, steps=50, out="/tmp/runs")  # doctest: +SKIP
    >>> print(m.summary())  # doctest: +SKIP
    """
    from tqdm import tqdm

    preset = get_preset(name)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise PresetError(f"steps must be an int ≥ 1, got {steps!r}")
        steps = int(steps)
    total = steps if steps is not None else (preset.quick_steps if quick else preset.steps)
    seed_list = _seeds_arg(seeds, preset.seeds[:1] if quick else preset.seeds)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise PresetError(f"threads must be an int ≥ 1, got {threads!r}")
    chosen = list(preset.conditions)
    if conditions is not None:
        if isinstance(conditions, str):
            conditions = [conditions]
        chosen = [preset.condition(c) for c in dict.fromkeys(conditions)]
        if not chosen:
            raise PresetError("conditions must name at least one condition")
    folder = Path(out) / preset.name
    manifest = Manifest(
        preset=preset.name,
        description=preset.description,
        claims=list(preset.claims),
        notes=preset.notes,
        conditions={c.name: c.settings() for c in chosen},
        seeds=seed_list,
        steps=total,
        quick=bool(quick),
        batch_size=preset.batch_size,
        data=preset.data,
        probe_size=preset.probe_size,
        record={
            **preset.settings(),
            "records": min(preset.records, preset.quick_records) if quick else preset.records,
            "recorder": _jsonable({**preset.record, **(preset.quick_record if quick else {})}),
        },
        icstools_version=__version__,
        torch_version=torch.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=None if command is None else [str(c) for c in command],
        call=_call_repr(
            preset.name,
            steps=steps,
            seeds=seeds,
            out=str(out),
            quick=quick,
            threads=threads,
            conditions=conditions,
        ),
    )
    manifest.path = folder / "manifest.json"
    manifest.write()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for cond in chosen:
            n = total if cond.steps is None else min(cond.steps, total)
            for seed in seed_list:
                rel = Path(cond.name) / f"seed-{seed}.zarr"
                with tqdm(
                    total=n,
                    desc=f"{preset.name}/{cond.name}/seed-{seed}",
                    unit="step",
                    file=sys.stderr,
                    disable=None if progress else True,  # None: only on a terminal
                    dynamic_ncols=True,
                ) as bar:
                    info = _run_one(
                        preset, cond, seed, n, folder / rel, data_dir, bar.update, quick=quick
                    )
                    bar.set_postfix(acc=f"{info.final_test_acc:.4f}", diverged=info.diverged)
                info.path = rel.as_posix()
                manifest.runs.append(info)
                manifest.write()
        manifest.complete = True
        manifest.write()
    finally:
        torch.set_num_threads(old_threads)
    return manifest


def train_condition(
    preset: Preset,
    cond: Condition,
    seed: int,
    steps: int,
    recorded: Sequence[int],
    *,
    recorder: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], Recorder] | None = None,
    data_dir: str | Path | None = None,
    progress: Callable[[int], Any] | None = None,
) -> TrainResult:
    """Train condition ``cond`` of ``preset`` with ``seed``, as :func:`run_preset` does.

    The model is built after ``torch.manual_seed(seed)`` (the global RNG is restored after);
    then :func:`train` runs ``steps`` steps with the condition's optimizer, the
    preset's batches, test accuracy at every ``eval_every``-th of the ``recorded`` steps (see
    :func:`record_steps`), the preset's measurement at every ``measure_every``-th of them, and
    divergence handled as a result. With ``recorder=None`` nothing is recorded and the
    measurement, which is logged into the run, is skipped: the same training at the cost of
    training alone (``bench/fig1_wall.py`` compares the two).

    Examples
    --------
    >>> p = get_preset("fig1")  # doctest: +SKIP
    >>> r = train_condition(p, p.condition("bn"), 0, 500, record_steps(500, 10))  # doctest: +SKIP
    >>> r.steps_done  # doctest: +SKIP
    500
    """
    measure = None
    if recorder is not None and preset.measure is not None:
        measure = _MEASURES[preset.measure]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cond.build()
        return train(
            model,
            steps,
            lr=cond.lr,
            optimizer=cond.optimizer,
            momentum=cond.momentum,
            weight_decay=cond.weight_decay,
            batch_size=preset.batch_size,
            seed=seed,
            data=preset.data,
            data_dir=data_dir,
            eval_at=_every_kth(list(recorded), preset.eval_every),
            eval_size=preset.eval_size,
            recorder=recorder,
            probe_size=preset.probe_size,
            measure=measure,
            measure_at=_every_kth(list(recorded), preset.measure_every),
            stop_on_divergence=True,
            progress=progress,
        )


def _run_one(
    preset: Preset,
    cond: Condition,
    seed: int,
    steps: int,
    path: Path,
    data_dir: str | Path | None,
    progress: Callable[[int], Any] | None,
    *,
    quick: bool = False,
) -> RunInfo:
    """One run of ``cond`` with ``seed`` for ``steps`` steps, recorded to ``path``."""
    records = min(preset.records, preset.quick_records) if quick else preset.records
    recorded = record_steps(steps, records)
    schedule = at_steps(recorded)
    options = preset.recorder_options(cond, quick=quick)
    needs_loss = preset.ics_every is not None or preset.landscape_every is not None

    def make(model: nn.Module, opt: torch.optim.Optimizer, probe: torch.Tensor) -> Recorder:
        extra: dict[str, Any] = {}
        if preset.ics_every is not None:
            extra["ics"] = _every_kth(recorded, preset.ics_every)
        if preset.landscape_every is not None:
            extra["landscape"] = _every_kth(recorded, preset.landscape_every)
        if preset.jacobian_every is not None:
            extra["jacobian"] = _every_kth(recorded, preset.jacobian_every)
        if needs_loss:
            extra["loss_fn"] = F.cross_entropy
        return Recorder(
            model,
            **{
                "every": schedule,
                "optimizer": opt,
                "probe": probe,
                "path": path,
                "overwrite": True,
                "seed": seed,
                **extra,
                **options,
            },
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    result = train_condition(
        preset, cond, seed, steps, recorded, recorder=make, data_dir=data_dir, progress=progress
    )
    rec = result.recorder
    accuracy = dict(result.accuracy)
    final = accuracy.pop(result.steps_done)
    return RunInfo(
        condition=cond.name,
        seed=seed,
        path=str(path),
        steps=steps,
        steps_done=result.steps_done,
        wall_time=result.wall_time,
        final_test_acc=final,
        test_acc=accuracy,
        final_loss=result.final_loss if math.isfinite(result.final_loss) else None,
        diverged=result.diverged_step is not None
        or (rec is not None and rec.diverged_step is not None),
        diverged_step=result.diverged_step,
        recorded_diverged_step=None if rec is None else rec.diverged_step,
        records=0 if rec is None else rec.n_records,
    )


# ============================================================================================
# Learning-rate sweep of the §4.1 network
# ============================================================================================


def fig1_lr_sweep(
    lrs: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
    *,
    steps: int = 5000,
    seeds: Sequence[int] = (0,),
    bn: Sequence[bool] = (False, True),
    data_dir: str | Path | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Final test accuracy of the §4.1 network (with/without BN) for a grid of SGD rates.

    Used to choose ``FIG1_LR`` (the paper gives no rate): plain training, no recorder, the
    ``fig1`` set-up otherwise (init N(0, 0.1²), batches of 60).

    Returns
    -------
    list of dict
        One row per network, rate and seed: ``network`` ("baseline"/"bn"), ``lr``, ``seed``,
        ``test_acc`` (full test set after ``steps``), ``diverged_step``, ``wall_time``.

    Examples
    --------
    >>> rows = fig1_lr_sweep((0.3, 1.0), steps=500)  # doctest: +SKIP
    >>> max(rows, key=lambda r: r["test_acc"])["lr"]  # doctest: +SKIP
    1.0
    """
    from tqdm import tqdm

    rows = []
    for use_bn in bn:
        for lr in lrs:
            for seed in seeds:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model = paper_mlp(bn=use_bn)
                    with tqdm(
                        total=steps,
                        desc=f"bn={use_bn} lr={lr:g} seed={seed}",
                        file=sys.stderr,
                        disable=None if progress else True,  # None: only on a terminal
                    ) as bar:
                        r = train(
                            model, steps, lr=lr, seed=seed, data_dir=data_dir, progress=bar.update
                        )
                rows.append(
                    {
                        "network": "bn" if use_bn else "baseline",
                        "lr": float(lr),
                        "seed": seed,
                        "test_acc": r.final_accuracy,
                        "diverged_step": r.diverged_step,
                        "wall_time": r.wall_time,
                    }
                )
    return rows


# ============================================================================================
# Model targets (for `icstools sites`)
# ============================================================================================


def load_factory(target: str) -> Callable[..., nn.Module]:
    """Import ``"package.module:factory"`` and return the callable.

    Raises
    ------
    ValueError
        Malformed target, missing module or attribute, or not callable.

    Examples
    --------
    >>> load_factory("icstools.experiments:paper_mlp") is paper_mlp
    True
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"a model target is 'package.module:factory', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} (from {target!r}): {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{target!r} is not callable")
    return obj

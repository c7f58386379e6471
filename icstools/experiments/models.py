"""The experiments' models: the §4.1 MLP, a small CNN, noisy BatchNorm, and model targets.

``paper_mlp`` builds the MNIST network of Ioffe & Szegedy (2015) §4.1: 784-100-100-100-10,
sigmoid hidden layers, weights drawn from a small Gaussian, optionally with Batch Normalization
before each nonlinearity (the layer's bias dropped, as §3.2 notes BN's β takes its role), or
with the "noisy" BatchNorm of Santurkar et al. (2018) §2 (:class:`NoisyBatchNorm1d`).
``small_cnn`` is a small convolutional network with or without ``BatchNorm2d``; ``vgg_cnn`` a
deeper, VGG-style one. Both MLP and CNNs take an optional dropout.
:func:`normalized_layers` finds the weight layers a BatchNorm normalizes, and
:func:`load_factory` imports a ``package.module:factory`` model target (``icstools sites``).
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "NoisyBatchNorm1d",
    "load_factory",
    "normalized_layers",
    "paper_mlp",
    "set_noise_step",
    "small_cnn",
    "vgg_cnn",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


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
    dropout: float = 0.0,
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
    dropout : float
        Probability of ``nn.Dropout`` after each hidden nonlinearity (0: none, the default;
        §3.4's comparison of BN with dropout).

    Examples
    --------
    >>> m = paper_mlp(bn=True)
    >>> [type(x).__name__ for x in m][:3]
    ['Linear', 'BatchNorm1d', 'Sigmoid']
    >>> type(paper_mlp(bn=True, noise=True, activation="tanh")[2]).__name__
    'Tanh'
    >>> [type(x).__name__ for x in paper_mlp(bn=False, dropout=0.2)][:3]
    ['Linear', 'Sigmoid', 'Dropout']
    """
    if init_std <= 0:
        raise ValueError(f"init_std must be > 0, got {init_std!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    if noise and not bn:
        raise ValueError("noise=True needs bn=True (the noise is injected after BatchNorm)")
    _check_dropout(dropout)
    layers: list[nn.Module] = []
    d = 28 * 28
    for w in widths:
        linear = nn.Linear(d, w, bias=not bn)
        layers.append(linear)
        if bn:
            layers.append(NoisyBatchNorm1d(w) if noise else nn.BatchNorm1d(w))
        layers.append(_ACTIVATIONS[activation]())
        if dropout:
            layers.append(nn.Dropout(dropout))
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
    dropout: float = 0.0,
    flat_input: bool = False,
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
    dropout : float
        Probability of ``nn.Dropout`` after each block's ReLU (0: none, the default).
    flat_input : bool
        Take flattened 28×28 single-channel images (``[batch, 784]``, the ``"mnist"`` data of
        the MLPs) and reshape them first (an ``nn.Unflatten`` module ahead of the blocks).

    Examples
    --------
    >>> small_cnn()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> [type(m).__name__ for m in small_cnn((4, 8), in_channels=1, bn=False, pool=True)][:4]
    ['Conv2d', 'ReLU', 'MaxPool2d', 'Conv2d']
    >>> small_cnn((4,), in_channels=1, flat_input=True, dropout=0.1)(torch.zeros(2, 784)).shape
    torch.Size([2, 10])
    """
    _check_dropout(dropout)
    layers: list[nn.Module] = []
    if flat_input:
        if in_channels != 1:
            raise ValueError(f"flat_input needs in_channels=1 (MNIST), got {in_channels}")
        layers.append(nn.Unflatten(1, (1, 28, 28)))  # [batch, 784] -> [batch, 1, 28, 28]
    c = in_channels
    for i, out in enumerate(channels):
        layers.append(nn.Conv2d(c, out, 3, padding=1, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        if dropout:
            layers.append(nn.Dropout(dropout))
        if pool and i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2))
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


def vgg_cnn(
    stages: tuple[tuple[int, ...], ...] = ((16, 16), (32, 32), (64, 64)),
    in_channels: int = 1,
    classes: int = 10,
    *,
    bn: bool = True,
) -> nn.Sequential:
    """A VGG-style network: stages of 3×3 conv blocks, 2×2 max-pooling after each stage.

    Each block is Conv(3×3, padding 1) → ``BatchNorm2d`` → ReLU (without BN the convolution
    has a bias, initialized to 0); the convolutions' weights get He initialization
    (``kaiming_normal_``, as VGG networks are trained); after the last stage, global average
    pooling and a linear classifier. The default has six convolutions in three stages (28×28
    → 14 → 7 → 3 on MNIST); the ``landscape-cnn`` preset uses eight in four (Santurkar et al.
    2018 used VGG on CIFAR-10).

    Parameters
    ----------
    stages : tuple of tuple of int
        Output channels of each stage's blocks.
    in_channels : int
        Image channels (1 for MNIST).
    classes : int
        Outputs of the classifier.
    bn : bool
        ``BatchNorm2d`` after each convolution.

    Examples
    --------
    >>> vgg_cnn(((4, 4), (8,)))(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> sum(isinstance(m, nn.Conv2d) for m in vgg_cnn())
    6
    """
    if not stages or not all(stages):
        raise ValueError(f"stages must be a non-empty tuple of non-empty tuples, got {stages!r}")
    layers: list[nn.Module] = []
    c = in_channels
    for stage in stages:
        for out in stage:
            layers.append(nn.Conv2d(c, int(out), 3, padding=1, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm2d(int(out)))
            layers.append(nn.ReLU())
            c = int(out)
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    for m in layers:
        if isinstance(m, nn.Conv2d):
            # He initialization: PyTorch's default shrinks the signal by about 2/3 in variance
            # per ReLU layer, and without BN the eight-conv network then stays at chance
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def _check_dropout(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {p!r}")


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

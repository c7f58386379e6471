"""Measurements the experiments log into a run during training.

:func:`scale_invariance` checks the §3.3 identities of BatchNorm (weight-scale invariance of the
output and of back-propagation) on each BN-normalized layer of a model, for the step's batch.
:func:`generalization` measures loss and accuracy on training and test images in eval mode, so
that the gap between them (§3.4) is a measured quantity.
:data:`_MEASURES` names the measurements a :class:`~icstools.experiments.presets.Preset` can
ask for (its ``measure``); each is called as ``measure(model, x, data_dir=...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from icstools.experiments.models import normalized_layers
from icstools.recording.hooks import HookGroup
from icstools.recording.isolation import isolated

__all__ = ["GENERALIZATION_TRAIN_SIZE", "generalization", "scale_invariance"]

#: Training images (the first ones) on which :func:`generalization` measures the training loss
#: and accuracy: enough for a standard error of the accuracy below 0.002 at 97%.
GENERALIZATION_TRAIN_SIZE = 10_000


def _layer_inputs(
    model: nn.Module, names: Iterable[str], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The inputs of the named modules in a train-mode forward of ``x``, without side effects
    (no gradient, buffers and the RNG state restored)."""
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    with HookGroup() as hooks:
        for name in names:

            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                got.setdefault(name, args[0].detach())

            hooks.forward_pre(modules[name], hook)
        with isolated(model, grad=False):
            model(x)
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
    >>> from icstools.experiments.models import paper_mlp
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


def _loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode, in chunks of 2,000 images."""
    loss = 0.0
    correct = 0
    with isolated(model, mode="eval", grad=False, buffers=False):
        for i in range(0, len(x), 2000):
            scores = model(x[i : i + 2000]).double()  # [chunk, classes]
            loss += float(nn.functional.cross_entropy(scores, y[i : i + 2000], reduction="sum"))
            correct += int((scores.argmax(1) == y[i : i + 2000]).sum())
    return loss / len(x), correct / len(x)


def generalization(
    model: nn.Module,
    x: torch.Tensor,
    *,
    data_dir: str | Path | None = None,
    train_size: int = GENERALIZATION_TRAIN_SIZE,
    test_size: int | None = None,
) -> dict[str, float]:
    """Loss and accuracy on training and on test images, in eval mode (the deployed network).

    The model is evaluated as it is deployed (eval mode: BN with its running averages, dropout
    off), without gradients and without side effects, on the first ``train_size`` MNIST
    training images and on all 10,000 test images, so that the gap between training and test
    (§3.4: BN regularizes) is measured on the same network, at the same step, in the same way.
    ``test_size`` uses the first test images only (quick runs).
    ``x`` (the step's batch) only tells the input layout: ``[batch, 784]`` or ``[batch, 1, 28,
    28]``.

    Returns
    -------
    dict
        ``gen_train_loss``, ``gen_train_acc``, ``gen_test_loss``, ``gen_test_acc`` (mean
        cross-entropy, accuracy) and ``gen_gap_acc`` = train − test accuracy, ``gen_gap_loss`` =
        test − train loss.

    Examples
    --------
    >>> from icstools.experiments.models import paper_mlp
    >>> r = generalization(paper_mlp(bn=True), torch.zeros(60, 784))  # doctest: +SKIP
    >>> sorted(r)  # doctest: +SKIP
    ['gen_gap_acc', 'gen_gap_loss', 'gen_test_acc', 'gen_test_loss', 'gen_train_acc', ...]
    """
    from icstools.experiments.training import _load  # training imports the presets

    data = "mnist" if x.dim() == 2 else "mnist-image"
    x_train, y_train = _load(data, "train", data_dir)
    x_test, y_test = _load(data, "test", data_dir)
    train_loss, train_acc = _loss_and_accuracy(model, x_train[:train_size], y_train[:train_size])
    test_loss, test_acc = _loss_and_accuracy(model, x_test[:test_size], y_test[:test_size])
    return {
        "gen_train_loss": train_loss,
        "gen_train_acc": train_acc,
        "gen_test_loss": test_loss,
        "gen_test_acc": test_acc,
        "gen_gap_acc": train_acc - test_acc,
        "gen_gap_loss": test_loss - train_loss,
    }


def _scale_invariance_measure(
    model: nn.Module, x: torch.Tensor, *, data_dir: str | Path | None = None
) -> dict[str, float]:
    return scale_invariance(model, x)


_MEASURES: dict[str, Callable[..., dict[str, float]]] = {
    "scale_invariance": _scale_invariance_measure,
    "generalization": generalization,
}

"""Measurements the experiments log into a run during training.

:func:`scale_invariance` checks the §3.3 identities of BatchNorm (weight-scale invariance of the
output and of back-propagation) on each BN-normalized layer of a model, for the step's batch.
:data:`_MEASURES` names the measurements a :class:`~icstools.experiments.presets.Preset` can
ask for (its ``measure``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from icstools.experiments.models import normalized_layers
from icstools.recording.hooks import HookGroup
from icstools.recording.isolation import isolated

__all__ = ["scale_invariance"]


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


_MEASURES: dict[str, Callable[[nn.Module, torch.Tensor], dict[str, float]]] = {
    "scale_invariance": scale_invariance,
}

"""The layers of a model, in execution order: what the gradient measurements
(:mod:`icstools.functional.gradients`) take as ``W_i``.

A *layer* is a module that directly owns at least one trainable parameter
(``requires_grad=True``) used by the forward pass; BatchNorm's γ and β make BN a layer of its
own. :func:`parameter_layers` lists the layers in execution order: the order in which the
forward pass first uses one of a layer's parameters in a computation (reading ``.shape`` or
``.dtype`` is no use), found by watching one forward with a
``torch.overrides.TorchFunctionMode`` (no hooks, no gradient, no buffer written). A module
called several times counts once, at its first use; parameters never used by the forward are
in no layer; a parameter shared by several modules (tied weights) belongs to the module of its
first name in ``model.named_parameters()``. ``W_i``, the weights of layer ``i``, are all its
trainable parameters, flattened and concatenated in ``named_parameters`` order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from icstools.recording.isolation import isolated

__all__ = ["Inputs", "Layer", "parameter_layers"]

Inputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]


@dataclass(frozen=True)
class Layer:
    """One layer: a module that directly owns trainable parameters used by the forward.

    Attributes
    ----------
    name : str
        The module's qualified name in ``model.named_modules()`` (``""`` for the model itself).
    kind : str
        The module's class name, e.g. ``"Linear"``.
    params : tuple of str
        Names (as in ``model.named_parameters()``) of its trainable parameters, the layer's
        weights ``W_i`` in this order.
    """

    name: str
    kind: str
    params: tuple[str, ...]


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _as_call(inputs: object) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``inputs`` as (args, kwargs) of ``model(...)``."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, Mapping):
        if not all(isinstance(k, str) for k in inputs):
            raise TypeError("inputs given as a mapping must have str keys (keyword arguments)")
        return (), dict(inputs)
    raise TypeError(
        "inputs must be a tensor, a tuple/list of positional arguments or a dict of keyword "
        f"arguments of model(...), got {type(inputs).__name__}"
    )


# Tensor functions that only read metadata (``p.dtype``, ``p.shape``, ``p.size(0)``, ...): a
# forward that inspects a parameter early (``next(self.parameters()).dtype``) does not use it.
_METADATA = frozenset(
    {
        "__get__", "__len__", "__repr__", "__format__", "__hash__", "size", "dim",
        "ndimension", "numel", "nelement", "stride", "storage_offset", "is_floating_point",
        "is_complex", "is_contiguous", "is_sparse", "element_size", "data_ptr", "get_device",
        "untyped_storage",
    }
)  # fmt: skip


class _FirstUse(TorchFunctionMode):
    """Records the order in which given tensors are first passed to a torch function (other
    than a metadata query)."""

    def __init__(self, ids: set[int]) -> None:
        super().__init__()
        self.ids = ids
        self.order: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if len(self.order) < len(self.ids) and getattr(func, "__name__", "") not in _METADATA:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and id(t) in self.ids and id(t) not in self.order:
                    self.order[id(t)] = len(self.order)
        return func(*args, **kwargs)


def _layers(model: nn.Module, args: tuple, kwargs: dict) -> list[Layer]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = {id(p) for _, p in named}
    mode = _FirstUse(ids)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    with torch.no_grad(), mode:
        functional_call(model, buffers, args, kwargs)
    owners: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    for n, p in named:
        if id(p) not in mode.order:
            continue
        owner = n.rpartition(".")[0]
        owners.setdefault(owner, []).append(n)
        first[owner] = min(first.get(owner, len(ids)), mode.order[id(p)])
    modules = dict(model.named_modules(remove_duplicate=False))
    return [
        Layer(name, type(modules[name]).__name__, tuple(owners[name]))
        for name in sorted(owners, key=first.__getitem__)
    ]


def parameter_layers(model: nn.Module, inputs: Inputs) -> list[Layer]:
    """The layers of ``model`` (modules owning trainable parameters), in execution order.

    Runs one forward pass on ``inputs`` (no gradient, on clones of the buffers, in the modules'
    current modes; the caller's RNG state is restored after) and orders the layers by the first
    use of any of their parameters. See the module docstring for the precise definition.

    Parameters
    ----------
    model : torch.nn.Module
        Any model.
    inputs : tensor, tuple or dict
        A tensor, a tuple/list of positional arguments, or a dict of keyword arguments of
        ``model(...)``.

    Returns
    -------
    list of Layer
        In execution order. Frozen parameters and parameters the forward does not use are in
        no layer.

    Examples
    --------
    >>> from icstools.experiments import paper_mlp
    >>> [(x.name, x.kind) for x in parameter_layers(paper_mlp(bn=True), torch.rand(8, 784))]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('0', 'Linear'), ('1', 'BatchNorm1d'), ('3', 'Linear'), ('4', 'BatchNorm1d'),
     ('6', 'Linear'), ('7', 'BatchNorm1d'), ('9', 'Linear')]
    >>> parameter_layers(nn.Linear(3, 2), torch.rand(4, 3))[0].params
    ('weight', 'bias')
    """
    _check_model(model)
    args, kwargs = _as_call(inputs)
    with isolated(model, buffers=False):  # the caller's RNG and modes stay as they are
        return _layers(model, args, kwargs)


def _resolve_layers(model: nn.Module, layers: object, args: tuple, kwargs: dict) -> list[Layer]:
    if layers is None:
        found = _layers(model, args, kwargs)
    else:
        if isinstance(layers, (str, Layer)) or not isinstance(layers, Sequence):
            raise TypeError(
                "layers must be None or a sequence of Layer (e.g. from parameter_layers), "
                f"got {type(layers).__name__}"
            )
        found = list(layers)
        params = dict(model.named_parameters())
        seen: set[str] = set()
        for layer in found:
            if not isinstance(layer, Layer):
                raise TypeError(f"layers must hold Layer objects, got {type(layer).__name__}")
            bad = [n for n in layer.params if n not in params]
            if bad or not layer.params:
                raise ValueError(
                    f"layer {layer.name!r} names no parameters or unknown ones ({bad[:5]}); "
                    "valid names are those of model.named_parameters()"
                )
            twice = seen.intersection(layer.params)
            if twice:
                raise ValueError(f"parameters {sorted(twice)[:5]} are in more than one layer")
            seen.update(layer.params)
    if not found:
        raise ValueError(
            "the model has no layer: no trainable parameter is used by its forward pass"
        )
    return found

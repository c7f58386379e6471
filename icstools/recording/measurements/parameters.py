"""Parameter dynamics per parameter tensor of the optimizer, ``Recorder(gradients=True)``.

Read by optimizer step pre/post hooks, so any ``torch.optim`` optimizer works: ``‖p.grad‖`` as
the optimizer sees it (after a ``GradScaler`` unscaled it), ``‖w‖`` before the update, ``‖Δw‖``
of the step actually taken (momentum and weight decay included), their ratio, and ``lr/‖w‖²``
for weights whose output is normalized next (the quantity that matters under scale invariance,
paper §3.3).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from icstools.recording.errors import RecorderError
from icstools.recording.measurements.base import Context, Declaration, Measurement
from icstools.schema import Coordinate, Variable

__all__ = ["ParameterDynamics"]

_HOW = "Recorder(gradients=True, optimizer=...)"
_DIMS = ("step", "param")
VARIABLES = (
    Variable("param_grad_norm", _DIMS, "float64", "‖p.grad‖ as the optimizer sees it", _HOW),
    Variable("param_norm", _DIMS, "float64", "‖w‖ before the update", _HOW),
    Variable("update_norm", _DIMS, "float64", "‖Δw‖ of the step actually taken", _HOW),
    Variable("update_ratio", _DIMS, "float64", "update_norm / param_norm", _HOW),
    Variable(
        "eff_lr", _DIMS, "float64", "lr / ‖w‖² for weights normalized next (NaN elsewhere)", _HOW
    ),
)
COORDINATES = (
    Coordinate("param", ("param",), "parameter names, in the optimizer's order"),
    Coordinate("param_numel", ("param",), "elements of each parameter"),
    Coordinate("param_normalized", ("param",), "whether a norm layer takes the output next"),
)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class ParameterDynamics(Measurement):
    """Gradient norm, weight norm and update of every parameter the optimizer steps."""

    name = "parameters"
    variables = VARIABLES
    coordinates = COORDINATES

    def __init__(self) -> None:
        super().__init__()
        self._params: list[tuple[str, torch.Tensor, dict]] = []  # (name, tensor, param group)
        self._before: list[torch.Tensor] | None = None
        self._out: dict[str, torch.Tensor] = {}  # this record's per-parameter results
        self._normalized: set[str] = set()  # weights whose output a norm layer takes next
        self._order: list[str] | None = None  # leaf modules in run order, while watched

    @classmethod
    def from_options(cls, options: Any) -> ParameterDynamics | None:
        return cls() if options.gradients is True else None

    def check(self, ctx: Context) -> None:
        if ctx.optimizer is None:
            raise RecorderError(
                "gradients=True records parameter dynamics (param_grad_norm, param_norm, "
                "update_norm, ...), which are read around the optimizer's step: pass "
                "optimizer=... to the Recorder (a torch.optim.Optimizer, or a wrapped one such "
                "as Accelerate's or Lightning's), or set rec.optimizer before attaching; for "
                "activation gradients only, without an optimizer, pass gradients='activations'"
            )

    def _parameters(self, ctx: Context) -> list[tuple[str, torch.Tensor, dict]]:
        if not self._params and ctx.optimizer is not None:
            names = {id(p): n for n, p in ctx.model.named_parameters()}
            seen: set[int] = set()
            for group in ctx.optimizer.param_groups:
                for p in group["params"]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        self._params.append((names.get(id(p), f"param_{len(seen) - 1}"), p, group))
        return self._params

    # the order of modules, for eff_lr -------------------------------------------------------
    def train_forward(self, ctx: Context, first: bool) -> None:
        if ctx.layout is None and not self._normalized:
            order: list[str] = []  # for one forward, the order in which leaf modules run
            self._order = order
            for n, m in ctx.model.named_modules():
                if not list(m.children()):
                    ctx.forward_hooks.forward_pre(m, functools.partial(_seen, ctx, order, n))

    def train_forward_end(self, ctx: Context) -> None:
        order, self._order = self._order, None
        if not order:
            return
        for this, nxt in itertools.pairwise(order):
            module = ctx.modules[this]
            if isinstance(getattr(module, "weight", None), nn.Parameter) and isinstance(
                ctx.modules[nxt], _NORMS
            ):
                self._normalized.add(f"{this}.weight" if this else "weight")

    # the update ------------------------------------------------------------------------------
    def before_update(self, ctx: Context) -> None:
        params = [p for _, p, _ in self._parameters(ctx)]
        tensors = [_local(p).detach() for p in params]
        with torch.no_grad():
            # one fused reduction over all parameters (torch._foreach_norm), not one per tensor
            have = [i for i, p in enumerate(params) if p.grad is not None]
            grads = _norms([_local(params[i].grad).detach() for i in have])
            out = torch.full((len(tensors),), math.nan, dtype=torch.float64, device=grads.device)
            self._out["param_grad_norm"] = out.index_copy(0, _index(have, out.device), grads)
            self._out["param_norm"] = _norms(tensors)
            self._before = torch._foreach_mul(tensors, 1.0)  # copies of the weights

    def after_update(self, ctx: Context) -> None:
        before, self._before = self._before, None
        if before is None:
            return
        tensors = [_local(p).detach() for _, p, _ in self._params]
        with torch.no_grad():
            self._out["update_norm"] = _norms(torch._foreach_sub(tensors, before))
        lr = torch.tensor([float(g.get("lr", math.nan)) for _, _, g in self._params])
        self._out["lr"] = lr.double()

    def discard_train(self, ctx: Context) -> None:
        self._out = {}
        self._before = None

    @property
    def norms(self) -> dict[str, torch.Tensor]:
        """This record's per-parameter results so far (``param_grad_norm``, ``param_norm``,
        ``update_norm``, ``lr``), for :mod:`icstools.recording.distributed`, which sums the
        norms of the shards of sharded (FSDP) parameters."""
        return self._out

    # the record ------------------------------------------------------------------------------
    def declare(self, ctx: Context) -> Declaration:
        if ctx.optimizer is None:
            return Declaration({}, ())
        params = self._parameters(ctx)
        names = [n for n, _, _ in params]
        coords = {
            "param": ("param", np.array(names, dtype=str)),
            "param_numel": ("param", np.array([p.numel() for _, p, _ in params], np.int64)),
            "param_normalized": ("param", np.array([n in self._normalized for n in names], bool)),
        }
        return Declaration(coords, VARIABLES)

    def stage(self, ctx: Context) -> dict[Any, torch.Tensor]:
        out, self._out = self._out, {}
        return out

    def collect(self, ctx: Context) -> dict[str, np.ndarray]:
        params = ctx.host.get(self.name, {})
        self._before = None
        if "param" not in ctx.layout.coords:
            return {}
        out = ctx.layout.empty_all(VARIABLES)
        if not params:
            return out
        for name in ("param_grad_norm", "param_norm", "update_norm"):
            if name in params:
                out[name][:] = params[name]
        with np.errstate(divide="ignore", invalid="ignore"):
            out["update_ratio"][:] = out["update_norm"] / out["param_norm"]
            if "lr" in params:
                eff = params["lr"] / np.square(out["param_norm"])
                normalized = [n in self._normalized for n, _, _ in self._params]
                out["eff_lr"][:] = np.where(normalized, eff, np.nan)
        return out


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Euclidean norms of ``tensors`` as one float64 vector (fused: ``torch._foreach_norm``
    groups tensors by device and dtype, a few kernels for all of them)."""
    if not tensors:
        return torch.empty(0, dtype=torch.float64)
    norms = torch._foreach_norm(tensors)
    if len({(n.dtype, n.device) for n in norms}) == 1:  # one stack, one cast (not one per tensor)
        return torch.stack(norms).double()
    return torch.stack([n.double() for n in norms])


def _index(positions: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(positions, dtype=torch.int64).to(device, non_blocking=True)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's local shard (a ``DTensor`` of ``fully_shard``), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _seen(ctx: Context, order: list[str], name: str, module: nn.Module, args: tuple) -> None:
    if not ctx.silent:  # not the recorder's own forwards, nor a closure's later evaluations
        order.append(name)


MEASUREMENT = ParameterDynamics

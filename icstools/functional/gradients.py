"""Gradient-based measurements: internal covariate shift, loss-landscape probes, scale invariance.

Three measurements of the BatchNorm debate, each computed on one batch without changing the
model:

* :func:`gradient_ics` — Santurkar et al. (2018), Def. 2.1: how much the gradient of a layer
  changes when only the layers *before* it take their optimizer step;
* :func:`landscape_probe` — the same paper's loss-landscape probes along the gradient: loss
  variation, gradient predictiveness and "effective" β-smoothness;
* :func:`check_scale_invariance` — Ioffe & Szegedy (2015) §3.3: a layer followed by BN is
  invariant to the scale of its weights, and its weight gradient scales as ``1/a``.

Layers
------
The layers and their weights ``W_i`` are those of :func:`icstools.functional.layers.
parameter_layers`: modules that own trainable parameters used by the forward, in the order of
first use.

No side effects
---------------
Every function evaluates the model with :func:`torch.func.functional_call` on parameter dicts
(the model's parameters and their ``.grad`` are never touched) and on fresh clones of its
buffers (BatchNorm running statistics and ``num_batches_tracked`` are not updated). Every
forward starts from the same random-number state, the caller's, so Dropout draws the same masks
in each of them, and the caller's RNG state is restored at the end (CPU, and every initialised
CUDA device). Module modes are restored when ``train=True`` switched them. The restoring is
done by the project's one side-effect guard, :func:`icstools.recording.isolation.isolated`, the
replayed random state is an :class:`icstools.recording.isolation.RngState`. Hooks
registered on the model *do* fire during these forwards: a recorder calling these functions
must ignore what its hooks see meanwhile.

Non-finite values are results, not errors: a diverged model yields ``inf``/``NaN`` entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from icstools.functional.layers import (
    Inputs,
    Layer,
    _as_call,
    _check_model,
    _resolve_layers,
)
from icstools.recording.isolation import RngState, isolated

__all__ = [
    "GradientICS",
    "LandscapeProbe",
    "ScaleInvariance",
    "check_scale_invariance",
    "gradient_ics",
    "landscape_probe",
]

LossFn = Callable[[Any, Any], torch.Tensor]


# ----------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class GradientICS:
    """Gradient-based internal covariate shift per layer (Santurkar et al. 2018, Def. 2.1).

    All arrays are float64 of shape ``[layer]``, ordered like ``layers`` (execution order).

    Attributes
    ----------
    layers : tuple of str
        Layer names.
    ics_l2 : numpy.ndarray
        ``‖G − G'‖₂``.
    ics_cos : numpy.ndarray
        ``cos(G, G') = ⟨G, G'⟩ / (‖G‖ ‖G'‖)``, clipped to [-1, 1]; NaN when a norm is 0 or
        non-finite.
    grad_norm : numpy.ndarray
        ``‖G‖₂``, the layer's gradient at the current weights.
    grad_norm_updated : numpy.ndarray
        ``‖G'‖₂``, the layer's gradient once the layers before it have been updated.
    loss : float
        ``L(W^t)`` on the batch.
    """

    layers: tuple[str, ...]
    ics_l2: np.ndarray
    ics_cos: np.ndarray
    grad_norm: np.ndarray
    grad_norm_updated: np.ndarray
    loss: float


@dataclass(frozen=True)
class LandscapeProbe:
    """Loss-landscape probes along the gradient (Santurkar et al. 2018, §3.1, Fig. 4).

    Arrays of shape ``[eta]`` follow ``step_sizes``.

    Attributes
    ----------
    step_sizes : numpy.ndarray
        ``η = m · lr`` for each multiplier ``m``.
    loss : float
        ``L(w)``.
    losses : numpy.ndarray
        ``L(w − η g)``.
    grad_diff : numpy.ndarray
        Gradient predictiveness: ``‖∇L(w) − ∇L(w − η g)‖₂``.
    beta : numpy.ndarray
        ``‖∇L(w − η g) − ∇L(w)‖₂ / ‖η g‖₂`` per step size.
    grad_norm : float
        ``‖g‖₂``.
    loss_variation : float
        ``max − min`` of ``losses``: the range of the loss over the step-size grid (``L(w)``
        itself is not included; it is ``loss``). NaN or inf when a loss is.
    beta_smoothness : float
        Effective β-smoothness: ``max`` of ``beta`` over the grid (NaN if any is NaN).
    """

    step_sizes: np.ndarray
    loss: float
    losses: np.ndarray
    grad_diff: np.ndarray
    beta: np.ndarray
    grad_norm: float
    loss_variation: float
    beta_smoothness: float


@dataclass(frozen=True)
class ScaleInvariance:
    """Measured relative errors of the §3.3 identities, one value per scale ``a``.

    All arrays are float64 of shape ``[scale]``. For tensors ``X`` (reference, at ``W``) and
    ``Y`` (at ``aW``) a relative error is ``‖Y − X‖₂ / ‖X‖₂``.

    Attributes
    ----------
    scales : numpy.ndarray
        The scales ``a``.
    output : numpy.ndarray
        ``BN((aW)u)`` against ``BN(Wu)``.
    input_grad : numpy.ndarray
        ``∂ℓ/∂u`` at ``aW`` against at ``W``.
    weight_grad : numpy.ndarray
        ``a · ∂ℓ/∂(aW)`` against ``∂ℓ/∂W`` (i.e. ``∂ℓ/∂(aW) = (1/a) ∂ℓ/∂W``).
    eps_effect : numpy.ndarray
        What BN's ε alone predicts: scaling ``x = Wu`` by ``a`` turns ε into ``ε/a²``, so
        each normalized unit ``k`` is multiplied by ``r_k = sqrt((σ_k² + ε) / (σ_k² + ε/a²))``;
        this is ``max_k |r_k − 1|`` (σ_k² the batch variance of unit ``k`` at ``W``). With
        β = 0, ``output ≤ eps_effect`` up to rounding.
    """

    scales: np.ndarray
    output: np.ndarray
    input_grad: np.ndarray
    weight_grad: np.ndarray
    eps_effect: np.ndarray


# --------------------------------------------------------------------------------- validation
def _check_loss_fn(loss_fn: object) -> None:
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be a callable (output, target) -> scalar tensor, "
            f"got {type(loss_fn).__name__}"
        )


def _scalar_loss(loss: object) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar (1-element) tensor, got shape {tuple(loss.shape)}"
        )
    if not loss.is_floating_point():
        raise TypeError(f"loss_fn must return a floating-point tensor, got {loss.dtype}")
    return loss.reshape(())


def _tensor_map(
    model: nn.Module, values: object, what: str, needed: Sequence[str], allow_none: bool = False
) -> dict[str, torch.Tensor | None]:
    """Validate a name → tensor mapping against the model's parameters."""
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{what} must be a mapping parameter name -> tensor, got {type(values).__name__}"
        )
    params = dict(model.named_parameters())
    unknown = [k for k in values if k not in params]
    if unknown:
        raise ValueError(
            f"{what} has names that are not parameters of the model: {unknown[:5]}; "
            f"valid names are those of model.named_parameters(), e.g. {list(params)[:5]}"
        )
    missing = [k for k in needed if k not in values]
    if missing:
        raise ValueError(f"{what} lacks parameters {missing[:5]} (it needs {len(needed)} names)")
    out: dict[str, torch.Tensor | None] = {}
    for k, v in values.items():
        p = params[k]
        if v is None and allow_none:
            out[k] = None
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{what}[{k!r}] must be a tensor, got {type(v).__name__}")
        if v.shape != p.shape:
            raise ValueError(
                f"{what}[{k!r}] has shape {tuple(v.shape)}, the parameter has {tuple(p.shape)}"
            )
        out[k] = v.detach().to(device=p.device, dtype=p.dtype)
    return out


def _current(model: nn.Module, current: object) -> dict[str, torch.Tensor]:
    """Name → detached parameter value: the model's own, or those of ``current``."""
    base = {n: p.detach() for n, p in model.named_parameters()}
    if current is not None:
        base.update(_tensor_map(model, current, "current", ()))  # type: ignore[arg-type]
    return base


# --------------------------------------------------------------------------------- machinery
class _Runner:
    """Runs ``loss_fn(functional_call(model, params + fresh buffer clones, inputs), target)``
    from one fixed RNG state: the state when the runner is made."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, args: tuple, kwargs: dict, target: Any
    ) -> None:
        self.model, self.loss_fn, self.args, self.kwargs = model, loss_fn, args, kwargs
        self.target = target
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.rng = RngState.capture()

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.rng.restore()  # every forward draws the same random numbers (dropout masks)
        tensors = {**params, **{n: b.clone() for n, b in self.buffers.items()}}
        out = functional_call(self.model, tensors, self.args, self.kwargs)
        return _scalar_loss(self.loss_fn(out, self.target))

    def grads(
        self, params: Mapping[str, torch.Tensor], wrt: Sequence[str]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss and its gradient with respect to the parameters named ``wrt``."""
        leaves = {n: params[n].detach().requires_grad_(True) for n in wrt}
        loss = self.loss({**params, **leaves})
        if not loss.requires_grad:  # no parameter reaches the loss
            return loss.detach(), [torch.zeros_like(t) for t in leaves.values()]
        g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads = [
            torch.zeros_like(t) if gi is None else gi
            for gi, t in zip(g, leaves.values(), strict=True)
        ]
        return loss.detach(), grads


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    # [sum of numel], float64 so that norms and cosines of near-equal vectors stay accurate
    return torch.cat([t.reshape(-1) for t in tensors]).to(torch.float64)


def _to_numpy(values: list[torch.Tensor]) -> np.ndarray:
    """Stack 0-d tensors and move them to the host once."""
    if not values:
        return np.zeros(0)
    return torch.stack(values).detach().cpu().numpy().astype(np.float64)


# -------------------------------------------------------------------------------------- ICS
def gradient_ics(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    target: Any,
    updated: Mapping[str, torch.Tensor],
    layers: Sequence[Layer] | None = None,
    *,
    current: Mapping[str, torch.Tensor] | None = None,
    train: bool = True,
) -> GradientICS:
    """Gradient-based internal covariate shift of every layer (Santurkar et al. 2018, Def. 2.1).

    For layer ``i`` (execution order) at step ``t``, on the batch ``(inputs, target)``:
    ``G = ∇_{W_i} L(W_1^t, …, W_k^t)`` and
    ``G' = ∇_{W_i} L(W_1^{t+1}, …, W_{i−1}^{t+1}, W_i^t, …, W_k^t)``: only the layers before
    ``i`` take their update. The first layer has none before it, so there ``G' = G`` exactly
    (``ics_l2 = 0``, ``ics_cos = 1``). ``G`` of all layers comes from one forward/backward;
    each other layer costs one more forward and a backward down to that layer.

    Parameters
    ----------
    model : torch.nn.Module
        The model; its parameters are ``W^t`` unless ``current`` is given. Never modified.
    loss_fn : callable
        ``loss_fn(output, target) -> scalar tensor``.
    inputs : tensor, tuple or dict
        The batch: a tensor, positional arguments, or keyword arguments of ``model(...)``.
    target : object
        Passed to ``loss_fn``.
    updated : mapping str → tensor
        ``W^{t+1}``: the parameters after the optimizer step (e.g. copies taken after
        ``optimizer.step()``), keyed like ``model.named_parameters()``. Must hold every
        parameter of every layer but the last; other parameters of the model are ignored.
    layers : sequence of Layer, optional
        The layers in execution order (e.g. :func:`parameter_layers`, computed once and
        reused). Parameters in no layer stay at ``W^t``. Default: found with one extra forward.
    current : mapping str → tensor, optional
        ``W^t`` for the named parameters instead of the model's values (so the function can be
        called after ``optimizer.step()``, with the model at ``W^{t+1}``).
    train : bool
        Run the forwards in train mode (as training does: BN normalizes with batch statistics,
        Dropout is active); modes are restored after. ``False``: the modules' current modes.

    Returns
    -------
    GradientICS
        ``ics_l2``, ``ics_cos``, ``grad_norm``, ``grad_norm_updated`` per layer (``[layer]``).

    Raises
    ------
    TypeError, ValueError
        Bad arguments (not a module, ``updated`` with unknown or missing names or wrong
        shapes, a non-scalar loss, ...).

    Examples
    --------
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.5)
    >>> before = {n: p.detach().clone() for n, p in model.named_parameters()}
    >>> nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    >>> after = {n: p.detach().clone() for n, p in model.named_parameters()}
    >>> r = gradient_ics(model, nn.functional.cross_entropy, x, y, after, current=before)
    >>> r.layers, float(r.ics_l2[0]), float(r.ics_cos[0])
    (('0', '2'), 0.0, 1.0)
    >>> bool(r.ics_l2[1] > 0)
    True
    """
    _check_model(model)
    _check_loss_fn(loss_fn)
    args, kwargs = _as_call(inputs)
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool, got {type(train).__name__}")
    base = _current(model, current)
    # RNGs, modes and grad mode restored at exit; no buffer to copy back (forwards use clones)
    with isolated(model, mode="train" if train else None, grad=True, buffers=False):
        run = _Runner(model, loss_fn, args, kwargs, target)  # saves the caller's RNG
        found = _resolve_layers(model, layers, args, kwargs)
        needed = [n for layer in found[:-1] for n in layer.params]
        new = _tensor_map(model, updated, "updated", needed)
        wrt = [n for layer in found for n in layer.params]
        loss, grads = run.grads(base, wrt)
        g_all = dict(zip(wrt, grads, strict=True))
        l2, cos, norm, norm_upd = [], [], [], []
        params = dict(base)
        for i, layer in enumerate(found):
            g = _flat([g_all[n] for n in layer.params])  # [numel of W_i]
            if i == 0:
                g2 = g
            else:
                for n in found[i - 1].params:  # layers before i: W^{t+1}
                    params[n] = new[n]  # type: ignore[assignment]
                g2 = _flat(run.grads(params, layer.params)[1])
            na, nb = torch.linalg.vector_norm(g), torch.linalg.vector_norm(g2)
            if i == 0:  # G' is G: exactly 1, undefined (NaN) if ‖G‖ is 0 or not finite
                ok = torch.isfinite(na) & (na > 0)
                c = torch.where(ok, torch.ones_like(na), torch.full_like(na, math.nan))
            else:
                c = torch.clamp(torch.dot(g, g2) / (na * nb), -1.0, 1.0)
            l2.append(torch.linalg.vector_norm(g - g2))
            cos.append(c)
            norm.append(na)
            norm_upd.append(nb)
    host = _to_numpy([*l2, *cos, *norm, *norm_upd, loss.to(torch.float64)])
    k = len(found)
    return GradientICS(
        layers=tuple(layer.name for layer in found),
        ics_l2=host[:k],
        ics_cos=host[k : 2 * k],
        grad_norm=host[2 * k : 3 * k],
        grad_norm_updated=host[3 * k : 4 * k],
        loss=float(host[4 * k]),
    )


# -------------------------------------------------------------------------------- landscape
def landscape_probe(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    target: Any,
    lr: float,
    multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    grad: Mapping[str, torch.Tensor | None] | None = None,
    *,
    current: Mapping[str, torch.Tensor] | None = None,
    train: bool = True,
) -> LandscapeProbe:
    """Loss variation, gradient predictiveness and effective β-smoothness along the gradient.

    With ``w`` all trainable parameters, ``g = ∇L(w)`` on the batch and ``η = m · lr`` for
    each multiplier ``m``: ``L(w − ηg)``, ``‖∇L(w) − ∇L(w − ηg)‖₂`` and
    ``‖∇L(w − ηg) − ∇L(w)‖₂ / ‖ηg‖₂`` (Santurkar et al. 2018, §3.1). The loss is the
    training loss: by default the forwards run in **train** mode (BN with batch statistics of
    this batch), not eval mode, which would measure a different function. Costs one
    forward/backward per step size, plus one at ``w`` unless ``grad`` is given.

    Parameters
    ----------
    model : torch.nn.Module
        The model at ``w`` (unless ``current`` is given). Never modified.
    loss_fn : callable
        ``loss_fn(output, target) -> scalar tensor``.
    inputs : tensor, tuple or dict
        The batch (see :func:`gradient_ics`).
    target : object
        Passed to ``loss_fn``.
    lr : float
        The learning rate the grid is relative to (> 0).
    multipliers : sequence of float
        Step sizes in units of ``lr`` (each > 0).
    grad : mapping str → tensor, optional
        ``∇L(w)`` on this batch, keyed like ``model.named_parameters()`` (e.g. the ``.grad``
        left by the training backward); used as the direction *and* as ``∇L(w)``. Must hold
        every trainable parameter; ``None`` values mean zero. Saves the backward at ``w``
        (``L(w)`` is still evaluated, by one forward). Default: computed here.
    current : mapping str → tensor, optional
        Values of ``w`` instead of the model's parameters.
    train : bool
        Train mode for the forwards (modes restored after); ``False``: current modes.

    Returns
    -------
    LandscapeProbe
        Per step size: ``losses``, ``grad_diff``, ``beta``; summaries ``loss_variation``
        (range of ``losses`` over the grid) and ``beta_smoothness`` (max of ``beta``).

    Examples
    --------
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Sigmoid(), nn.Linear(8, 3))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> p = landscape_probe(model, nn.functional.cross_entropy, x, y, lr=0.1)
    >>> p.step_sizes
    array([0.025, 0.05 , 0.1  , 0.2  , 0.4  ])
    >>> p.losses.shape, bool(p.loss_variation >= 0), bool(p.beta_smoothness > 0)
    ((5,), True, True)
    """
    _check_model(model)
    _check_loss_fn(loss_fn)
    args, kwargs = _as_call(inputs)
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.number)):
        raise TypeError(f"lr must be a number, got {type(lr).__name__}")
    if not (math.isfinite(float(lr)) and lr > 0):
        raise ValueError(f"lr must be finite and > 0, got {lr!r}")
    try:
        mult = np.asarray(multipliers, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"multipliers must be a sequence of numbers, got {multipliers!r}") from None
    if mult.ndim != 1 or mult.size == 0 or not np.all(np.isfinite(mult) & (mult > 0)):
        raise ValueError(
            f"multipliers must be a non-empty 1-d sequence of finite numbers > 0, "
            f"got {multipliers!r}"
        )
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool, got {type(train).__name__}")
    etas = mult * float(lr)
    base = _current(model, current)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("the model has no trainable parameter (requires_grad=True)")
    given = None if grad is None else _tensor_map(model, grad, "grad", names, allow_none=True)
    with isolated(model, mode="train" if train else None, grad=True, buffers=False):
        run = _Runner(model, loss_fn, args, kwargs, target)
        if given is None:
            loss, g_list = run.grads(base, names)
        else:
            with torch.no_grad():
                loss = run.loss(base)
            g_list = [
                torch.zeros_like(base[n]) if given[n] is None else given[n]  # type: ignore[misc]
                for n in names
            ]
        g = _flat(g_list)  # [numel of w]
        gnorm = torch.linalg.vector_norm(g)
        losses, diffs = [], []
        for eta in etas:
            with torch.no_grad():
                moved = dict(base)
                for n, gn in zip(names, g_list, strict=True):
                    moved[n] = base[n] - float(eta) * gn
            loss_eta, g_eta = run.grads(moved, names)
            losses.append(loss_eta.to(torch.float64))
            diffs.append(torch.linalg.vector_norm(_flat(g_eta) - g))
        beta = [d / (float(eta) * gnorm) for d, eta in zip(diffs, etas, strict=True)]
    k = len(etas)
    host = _to_numpy([*losses, *diffs, *beta, loss.to(torch.float64), gnorm])
    losses_h, diffs_h, beta_h = host[:k], host[k : 2 * k], host[2 * k : 3 * k]
    with np.errstate(invalid="ignore"):  # inf − inf = NaN: divergence is a result
        variation = float(np.max(losses_h) - np.min(losses_h))
    return LandscapeProbe(
        step_sizes=etas,
        loss=float(host[3 * k]),
        losses=losses_h,
        grad_diff=diffs_h,
        beta=beta_h,
        grad_norm=float(host[3 * k + 1]),
        loss_variation=variation,
        beta_smoothness=float(np.max(beta_h)),
    )


# -------------------------------------------------------------------------- scale invariance
def _scale_invariance_args(
    linear: object, bn: object, inputs: object, scales: object, loss: object, dtype: object
) -> tuple[torch.Tensor, np.ndarray, torch.dtype]:
    """:func:`check_scale_invariance`'s arguments checked: the layer's weight, the scales
    ``[scale]`` (float64) and the compute dtype."""
    weight = getattr(linear, "weight", None)
    if not isinstance(linear, nn.Module) or not isinstance(weight, torch.Tensor):
        raise TypeError(
            "linear must be a module with a weight parameter (e.g. nn.Linear, nn.Conv2d), "
            f"got {type(linear).__name__}"
        )
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(
            f"bn must be a BatchNorm module (BatchNorm1d/2d/3d), got {type(bn).__name__}"
        )
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise TypeError(
            f"inputs must be a floating-point tensor, got {type(inputs).__name__}"
            + (f" of {inputs.dtype}" if isinstance(inputs, torch.Tensor) else "")
        )
    if inputs.ndim < 2 or inputs.shape[0] < 2:
        raise ValueError(
            f"inputs must be a batch of at least 2 examples [N, ...], got shape "
            f"{tuple(inputs.shape)}"
        )
    try:
        a_values = np.asarray(scales, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"scales must be a sequence of numbers, got {scales!r}") from None
    if (
        a_values.ndim != 1
        or a_values.size == 0
        or not np.all(np.isfinite(a_values) & (a_values > 0))
    ):
        raise ValueError(
            f"scales must be a non-empty sequence of finite numbers > 0, got {scales!r}"
        )
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be callable (bn_output) -> scalar, got {type(loss).__name__}")
    dt = weight.dtype if dtype is None else dtype
    if not (isinstance(dt, torch.dtype) and dt.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return weight, a_values, dt


def check_scale_invariance(
    linear: nn.Module,
    bn: nn.Module,
    inputs: torch.Tensor,
    scales: Sequence[float] = (0.1, 10.0, 1000.0),
    *,
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> ScaleInvariance:
    """Measure the §3.3 scale-invariance identities of a layer followed by BatchNorm.

    For a scalar ``a > 0`` Ioffe & Szegedy (2015, §3.3) state ``BN(Wu) = BN((aW)u)``,
    ``∂ℓ/∂u`` unchanged and ``∂ℓ/∂(aW) = (1/a) · ∂ℓ/∂W``. This evaluates both sides on the
    batch ``u = inputs`` with BN in train mode (batch statistics, via
    ``torch.nn.functional.batch_norm`` with BN's γ, β and ε; running statistics untouched)
    and returns their relative errors. The layer's bias, if any, is not scaled (BN's mean
    subtraction cancels it).

    The identities are exact only for ε = 0: with ε > 0, scaling ``x = Wu`` by ``a`` acts as
    replacing ε by ε/a², which matters where ``a²σ²`` is not large against ε (small ``a`` or
    near-constant units). ``eps_effect`` gives the size of that effect. PyTorch refuses ε = 0
    in training; in float64 with e.g. ``eps=1e-30`` (negligible against any σ² ≫ 1e-14) the
    errors are rounding only (~1e-15).

    Parameters
    ----------
    linear : torch.nn.Module
        A module with a ``weight`` parameter, e.g. ``nn.Linear`` or ``nn.Conv2d``.
    bn : torch.nn.modules.batchnorm._BatchNorm
        ``BatchNorm1d/2d/3d`` with ``num_features`` equal to ``linear``'s output channels.
    inputs : torch.Tensor
        The batch ``u`` (at least 2 examples), e.g. ``[N, in_features]`` or ``[N, C, H, W]``.
    scales : sequence of float
        The scales ``a`` (each finite and > 0).
    loss : callable, optional
        ``loss(bn_output) -> scalar``. Default: a fixed random linear readout
        ``ℓ = Σ R ⊙ BN(x)`` with ``R ~ N(0, 1)`` drawn from ``torch.Generator`` seeded with
        ``seed`` (so ``∂ℓ/∂u`` probes a random direction of the Jacobian).
    dtype : torch.dtype, optional
        Compute in this floating dtype (copies of the weights and inputs), e.g.
        ``torch.float64`` for a check free of float32 rounding. Default: ``linear.weight``'s.
    seed : int
        Seed of the default readout.

    Returns
    -------
    ScaleInvariance
        Relative errors ``output``, ``input_grad``, ``weight_grad`` and ``eps_effect``, each
        ``[scale]``.

    Examples
    --------
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> r = check_scale_invariance(nn.Linear(5, 4), nn.BatchNorm1d(4, eps=1e-30),
    ...                            torch.randn(32, 5), dtype=torch.float64)
    >>> bool(max(r.output.max(), r.input_grad.max(), r.weight_grad.max()) < 1e-12)
    True
    """
    weight, a_values, dt = _scale_invariance_args(linear, bn, inputs, scales, loss, dtype)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=weight.device, dtype=dt)

    w0, u0 = cast(weight), cast(inputs)
    others = {n: cast(p) for n, p in linear.named_parameters() if n != "weight"}
    others.update({n: cast(b) for n, b in linear.named_buffers()})
    gamma = None if bn.weight is None else cast(bn.weight)
    beta = None if bn.bias is None else cast(bn.bias)
    with torch.no_grad():
        x0 = functional_call(linear, {"weight": w0, **others}, (u0,))
    if x0.ndim < 2 or x0.shape[1] != bn.num_features:
        raise ValueError(
            f"the layer's output has shape {tuple(x0.shape)}: its dim 1 must equal "
            f"bn.num_features = {bn.num_features}"
        )
    dims = [d for d in range(x0.ndim) if d != 1]
    var = x0.var(dim=dims, unbiased=False).to(torch.float64)  # [C] batch variances at W
    readout = None
    if loss is None:
        gen = torch.Generator().manual_seed(seed)
        readout = torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(x0)

    def side(a: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BN((aW)u), ∂ℓ/∂u, ∂ℓ/∂(aW)."""
        w = (w0 * a).requires_grad_(True)
        u = u0.clone().requires_grad_(True)
        with torch.enable_grad():
            x = functional_call(linear, {"weight": w, **others}, (u,))
            y = F.batch_norm(x, None, None, gamma, beta, training=True, eps=bn.eps)
            ell = (y * readout).sum() if readout is not None else _scalar_loss(loss(y))
            du, dw = torch.autograd.grad(ell, [u, w])
        return y.detach(), du, dw

    def rel(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm((y - x).to(torch.float64)) / torch.linalg.vector_norm(
            x.to(torch.float64)
        )

    y1, du1, dw1 = side(1.0)
    out, dus, dws, effs = [], [], [], []
    for a in a_values:
        ya, dua, dwa = side(float(a))
        out.append(rel(ya, y1))
        dus.append(rel(dua, du1))
        dws.append(rel(dwa * float(a), dw1))
        r = torch.sqrt((var + bn.eps) / (var + bn.eps / float(a) ** 2))
        effs.append(torch.max(torch.abs(r - 1)))
    host = _to_numpy([*out, *dus, *dws, *effs])
    k = len(a_values)
    return ScaleInvariance(
        scales=a_values,
        output=host[:k],
        input_grad=host[k : 2 * k],
        weight_grad=host[2 * k : 3 * k],
        eps_effect=host[3 * k :],
    )

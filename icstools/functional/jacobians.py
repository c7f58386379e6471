"""Singular values of the per-example Jacobians of blocks of a model (DESIGN.md §4).

Which Jacobian
--------------
A *block* ``f`` is a module, the segment of a model between two sites (:func:`segment`), the
whole model (:func:`whole`), or any callable ``tensor -> tensor``. For a batch
``x = [x_1, ..., x_B]`` the **per-example Jacobian** of example ``i`` is

    ``J_i = ∂ f(x)_i / ∂ x_i``,  an ``m × n`` matrix,

with ``n = x_i.numel()`` and ``m = f(x)_i.numel()`` (features of one example, flattened in C
order: a conv block's ``[C, H, W]`` is one axis). :func:`jacobian_spectrum` returns its singular
values ``σ_1 ≥ … ≥ σ_p``, ``p = min(m, n)``, one row per example. Ioffe & Szegedy §3.3
conjecture that for a batch-normalized layer these are all close to 1.

BatchNorm in train mode couples the examples of a batch (the batch mean and variance depend on
every example), so ``f(x)_i`` depends on all of ``x``. Two Jacobians are offered:

* ``bn="fixed"`` (default): the batch statistics are computed on the whole batch, then held
  constant. Every batch-statistics BN becomes the per-example affine map
  ``y = γ (h − μ_B) / sqrt(σ²_B + ε) + β`` (``μ_B`` mean and ``σ²_B`` biased variance of the
  whole batch, as in the paper's Algorithm 1), so ``J_i`` is the Jacobian of a map of ``x_i``
  alone. This is the linearization the paper's §3.3 argument is about.
* ``bn="full"``: the diagonal block ``∂ f(x)_i / ∂ x_i`` of the Jacobian of the whole-batch map,
  which includes the dependence of ``μ_B`` and ``σ²_B`` on ``x_i``. It is what a loop of
  ``torch.autograd.grad`` over the rows of ``f(x)[i]`` gives. Exact path: through the BN
  statistics ``s`` (``D_s`` numbers: mean and variance of every BN call),
  ``J_i = J_fixed,i + (∂f_i/∂s)(∂s/∂x_i)``, which costs ``m + D_s`` batched products instead
  of ``m``. Matrix-free path: each product probes one example at a time (vmapped), ``B`` times
  the work of ``"fixed"``.

For one BN layer the two differ by O(1/B): with ``x̂`` the normalized input,
``(J_full)_i = (J_fixed)_i · (1 − (1 + x̂_i²)/B)`` per feature. Coupling across examples by
anything other than BN (a custom layer mixing the batch) is not separated out by ``bn="fixed"``:
it is detected (a check of one example's gradient) and raises ``ValueError``; ``bn="full"``
handles any coupling. BN modules in eval mode with running statistics are already per-example
affine maps: both modes give the same. Dropout (``nn.Dropout*``) and ``nn.RReLU`` in train mode
are evaluated as in eval mode (a random map has no well-defined spectrum).

Methods
-------
* ``"exact"``: the Jacobians are built with batched vector-Jacobian products
  (``torch.func.vjp`` under ``torch.func.vmap`` over one-hot probes, i.e. ``vmap(jacrev)``; or
  Jacobian-vector products when ``n < m``), then ``torch.linalg.svdvals``. Per-example
  Jacobians of a separable batch map come from products of the batch map with a different
  probe in each example's row (its Jacobian is block-diagonal), so the whole batch is one
  ``vmap``. Costs ``min(m, n)`` batched products
  plus an SVD of ``O(p² max(m, n))`` per example, and ``B·m·n`` numbers of memory (examples are
  processed in chunks when that exceeds 512 MiB).
* ``"matrix_free"``: the ``k`` largest and/or smallest singular values from products ``J v``
  (``torch.func.jvp``, or a double ``vjp`` when that measures faster or forward-mode AD is
  missing) and ``Jᵀ u`` (``torch.func.vjp``), batched over examples and probe vectors with
  ``vmap``, fed to a block Krylov eigensolver for ``JᵀJ`` (or ``JJᵀ``, whichever is smaller)
  run on all examples at once: thick-restarted block Lanczos / Davidson with Rayleigh–Ritz in
  float64 and full re-orthogonalization; the final values are recomputed unsquared as
  ``svdvals(J X)`` on the converged Ritz vectors ``X``. A pair converges when its residual
  ``‖JᵀJ x − θ x‖ ≤ 2·tol·θ`` (relative error of σ at most ``tol``), or is at the floating-point
  floor ``100·eps·θ_max``.
* ``"auto"``: ``"exact"`` when ``k`` is ``None`` (the whole spectrum), when
  ``p ≤ EXACT_MAX_DIM`` (= 512; ``EXACT_MAX_DIM_SMALLEST`` = 2048 when the smallest values are
  asked for), or when the requested values are at least a quarter of ``p``; else
  ``"matrix_free"``. Measured (CPU, one thread) for a Linear+BatchNorm+tanh block and the
  ``k = 8`` largest values: the two cost about the same at ``p = 512`` (38 vs 31 ms per
  example, ``B = 60``); at ``p = 1024`` matrix-free is ~5× faster (0.34 vs 0.06 s). The
  smallest values cost far more matrix-free than exactly up to ``p ≈ 2048`` (see below).

Limits of the matrix-free path: the largest singular values converge fast. The smallest ones of
a Jacobian whose small singular values are crowded near 0 relative to ``σ_max`` (e.g. a square
Gaussian matrix, whose ``σ_min ~ σ_max / n``) converge slowly, since Krylov methods without
shift-invert separate eigenvalues of ``JᵀJ`` by their gaps relative to its whole range; after
``maxiter`` block steps the best estimates are returned, ``converged`` is ``False`` for those
examples and a :class:`JacobianConvergenceWarning` is issued. In float32 the squared operator
limits small singular values to about ``sqrt(100·eps)·σ_max ≈ 3e-3·σ_max`` of absolute accuracy
before the unsquared recomputation; pass ``dtype=torch.float64`` for ill-conditioned blocks.

Side effects: none. Parameters, buffers (BN running statistics), ``training`` flags and the
global RNG state are the same afterwards (buffers are also copied back and modes restored if a
block raises). Other forward hooks on the model — e.g. a recorder's — fire at every product
(hundreds of times per spectrum): disarm them while computing spectra (the ``Recorder`` does).
Tensors stay on the inputs' device.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from icstools.recording.hooks import HookGroup
from icstools.recording.isolation import isolated
from icstools.sites import ACTIVATION_TYPES, Site, SiteSelectionError, find_tensor, select_sites

__all__ = [
    "BLOCK_TYPES",
    "BN_MODES",
    "EXACT_MAX_DIM",
    "EXACT_MAX_DIM_SMALLEST",
    "METHODS",
    "WHICH",
    "JacobianConvergenceWarning",
    "JacobianSpectrum",
    "Segment",
    "jacobian_spectrum",
    "module_blocks",
    "segment",
    "spectrum_summary",
    "whole",
]

METHODS = ("auto", "exact", "matrix_free")
WHICH = ("largest", "smallest", "both")
BN_MODES = ("fixed", "full")

#: ``method="auto"`` computes blocks with ``min(m, n)`` up to this exactly, and up to
#: :data:`EXACT_MAX_DIM_SMALLEST` when the smallest singular values are asked for.
EXACT_MAX_DIM = 512
EXACT_MAX_DIM_SMALLEST = 2048

#: Module types :func:`module_blocks` returns by default.
BLOCK_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    *ACTIVATION_TYPES,
)

_J_BUDGET = 512 * 2**20  # bytes of Jacobians held at once by the exact path
_PROBE_BUDGET = 256 * 2**20  # bytes of probe vectors (and their activations) per vmap chunk
_ACTIVATION_FACTOR = 8  # activations per probe, in units of (n + m) numbers: a guess


class JacobianConvergenceWarning(RuntimeWarning):
    """The matrix-free solver stopped at ``maxiter`` before every singular value converged."""


@dataclass(frozen=True)
class JacobianSpectrum:
    """Singular values of the per-example Jacobians of a block (see the module docstring).

    Attributes
    ----------
    sv : torch.Tensor
        ``[B, n_sv]``, each row descending: the whole spectrum (``k=None``), the ``k`` largest
        (``which="largest"``), the ``k`` smallest (``"smallest"``), or the ``k`` largest followed
        by the ``k`` smallest (``"both"``; when ``2k ≥ p`` the two overlap and ``sv`` is the
        whole spectrum). Rows of examples whose Jacobian is not finite are NaN.
    largest, smallest : torch.Tensor or None
        ``[B, k]`` descending (``None`` when not asked for; the whole spectrum when ``k=None``).
    n_total : int
        ``p = min(m, n)``, the number of singular values each Jacobian has.
    in_shape, out_shape : tuple of int
        Shapes of one example's input and output (``n``, ``m`` are their products).
    method, bn : str
        The method used (``"exact"`` or ``"matrix_free"``) and the BatchNorm mode.
    converged : torch.Tensor
        ``[B]`` bool: the values of the example met the tolerance (``"exact"``: always, except
        for examples with a non-finite Jacobian, which are ``False`` in both methods).
    iterations : int
        Block steps of the matrix-free solver (0 for ``"exact"``).
    """

    sv: torch.Tensor
    largest: torch.Tensor | None
    smallest: torch.Tensor | None
    n_total: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    method: str
    bn: str
    converged: torch.Tensor
    iterations: int = 0

    @property
    def complete(self) -> bool:
        """Whether ``sv`` holds all ``n_total`` singular values of each Jacobian."""
        return self.sv.shape[-1] == self.n_total


# ============================================================================= public API
def jacobian_spectrum(
    block: nn.Module | Callable[[torch.Tensor], Any],
    inputs: torch.Tensor,
    k: int | None = None,
    method: str = "auto",
    which: str = "largest",
    bn: str = "fixed",
    dtype: torch.dtype | None = None,
    *,
    tol: float | None = None,
    maxiter: int = 300,
    seed: int = 0,
) -> JacobianSpectrum:
    """Singular values of the per-example Jacobians ``∂ block(x)_i / ∂ x_i``, largest first.

    Parameters
    ----------
    block : nn.Module or callable
        Maps a batch ``[B, ...]`` to a batch ``[B, ...]`` (a module, :func:`segment`,
        :func:`whole`, or any function; BatchNorm is only found inside ``nn.Module`` blocks).
        A tuple/list/dict output is reduced to its first floating-point tensor.
    inputs : torch.Tensor
        ``[B, ...]``, floating point: the point at which the Jacobians are taken.
    k : int, optional
        How many singular values (per end, for ``which="both"``). ``None``: all of them
        (``"exact"`` only).
    method : {"auto", "exact", "matrix_free"}
        See the module docstring; ``"auto"`` is exact for ``k=None``, for
        ``min(m, n) ≤ EXACT_MAX_DIM`` (``EXACT_MAX_DIM_SMALLEST`` when the smallest values are
        asked for) and when a quarter or more of the spectrum is asked for.
    which : {"largest", "smallest", "both"}
        Which end(s) of the spectrum ``k`` refers to.
    bn : {"fixed", "full"}
        BatchNorm with batch statistics: held fixed at the whole batch's (default), or the full
        per-example block of the whole-batch map (exact: ``m + D_s`` products instead of ``m``;
        matrix-free: ``B`` times the work). See the module docstring.
    dtype : torch.dtype, optional
        Compute in this dtype (``torch.float32`` or ``torch.float64``): inputs, parameters and
        buffers are cast for the computation only. Default: the inputs' dtype (float32 for half
        precision inputs).
    tol : float, optional
        Matrix-free only: bound on the relative error of each singular value (default 1e-4),
        from the residual of its Ritz pair (conservative: the error is typically far smaller).
    maxiter : int
        Matrix-free only: at most this many block Krylov steps.
    seed : int
        Matrix-free only: seed of the random start block (a private generator; the global RNG is
        not touched).

    Returns
    -------
    JacobianSpectrum
        ``.sv`` is ``[B, n_sv]`` on the inputs' device, in the compute dtype; ``.largest`` and
        ``.smallest`` are the two ends.

    Raises
    ------
    TypeError
        ``inputs`` not a floating-point tensor, ``block`` not callable, or returning no tensor.
    ValueError
        An unknown ``method``/``which``/``bn``, ``k`` out of ``1..min(m, n)``, an output whose
        batch size differs from the input's, or (``bn="fixed"``) a block that mixes examples.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> block = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh())
    >>> res = jacobian_spectrum(block, torch.randn(16, 8))
    >>> res.sv.shape, res.method
    (torch.Size([16, 8]), 'exact')
    >>> q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    >>> orth = nn.Linear(6, 6, bias=False).double()
    >>> with torch.no_grad():
    ...     _ = orth.weight.copy_(q)
    >>> jacobian_spectrum(orth, torch.randn(2, 6, dtype=torch.float64), k=2, which="both").sv
    tensor([[1.0000, 1.0000, 1.0000, 1.0000],
            [1.0000, 1.0000, 1.0000, 1.0000]], dtype=torch.float64)
    """
    _check_choice("method", method, METHODS)
    _check_choice("which", which, WHICH)
    _check_choice("bn", bn, BN_MODES)
    if not callable(block):
        raise TypeError(
            f"block must be an nn.Module or a callable tensor -> tensor, got {type(block).__name__}"
        )
    x = _check_inputs(inputs)
    cdtype = _compute_dtype(x, dtype)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise TypeError(f"k must be an int or None, got {type(k).__name__}: {k!r}")
    if not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter must be an int >= 1, got {maxiter!r}")
    if tol is None:
        tol = 1e-4
    elif not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")
    x = x.detach().to(cdtype)

    with _isolated(block, x, bn) as runner:
        op = _PerExampleOperator(runner, x, bn)
        p = min(op.m, op.n)
        if k is not None and not 1 <= k <= p:
            raise ValueError(
                f"k={k} is out of range: this block's per-example Jacobian is {op.m} x {op.n} "
                f"(output x input features), so it has min({op.m}, {op.n}) = {p} singular values;"
                f" pass 1 <= k <= {p}, or k=None for all of them"
            )
        wanted = p if k is None else (min(2 * k, p) if which == "both" else k)
        if method == "auto":
            limit = EXACT_MAX_DIM if which == "largest" else EXACT_MAX_DIM_SMALLEST
            exact = k is None or p <= limit or 4 * wanted >= p
            method = "exact" if exact else "matrix_free"
        if method == "matrix_free" and k is None:
            raise ValueError(
                "method='matrix_free' computes the k largest and/or smallest singular values: "
                "pass k, or use method='exact' (or 'auto') for the whole spectrum"
            )
        if method == "exact":
            full = op.exact_svdvals()  # [B, p]
            conv = ~torch.isnan(full).any(-1)  # False only for non-finite Jacobians
            iterations = 0
            top = full if k is None else full[:, :k]
            bottom = full if k is None else full[:, p - k :]
        else:
            k = cast(int, k)
            k_top = k if which in ("largest", "both") else 0
            k_bot = k if which in ("smallest", "both") else 0
            if k_top + k_bot >= p:  # the two ends overlap: ask for everything from one end
                k_top, k_bot = p, 0
            top, bottom, conv, iterations = op.extreme_svdvals(
                k_top, k_bot, tol=tol, maxiter=maxiter, seed=seed
            )
            if k_bot == 0 and k_top == p:
                full = top
                top, bottom = full[:, :k], full[:, p - k :]
            if bool((~conv & op.finite).any()):  # non-finite examples are NaN, not late
                bad = int((~conv & op.finite).sum())
                warnings.warn(
                    f"jacobian_spectrum: {bad} of {op.B} examples did not converge to "
                    f"tol={tol:g} within maxiter={maxiter} block steps (which={which!r}, k={k}, "
                    f"Jacobian {op.m} x {op.n}); the estimates are returned with "
                    f"converged=False. Raise maxiter, loosen tol, or use method='exact'",
                    JacobianConvergenceWarning,
                    stacklevel=2,
                )
        if k is None:
            sv = full
        elif which == "largest":
            sv = top
        elif which == "smallest":
            sv = bottom
        else:
            sv = full if 2 * k >= p else torch.cat([top, bottom], dim=1)
        keep_top = which in ("largest", "both") or k is None
        keep_bot = which in ("smallest", "both") or k is None
        return JacobianSpectrum(
            sv=sv,
            largest=top if keep_top else None,
            smallest=bottom if keep_bot else None,
            n_total=p,
            in_shape=op.in_shape,
            out_shape=op.out_shape,
            method=method,
            bn=bn,
            converged=conv,
            iterations=iterations,
        )


def module_blocks(
    model: nn.Module, types: type | Sequence[type] | None = None
) -> dict[str, nn.Module]:
    """Every module of ``model`` that is an instance of ``types``, by name, in module order.

    Parameters
    ----------
    model : nn.Module
    types : type or sequence of types, optional
        ``nn.Module`` subclasses, e.g. ``nn.Linear`` or ``(nn.BatchNorm1d, nn.Tanh)``. Default:
        :data:`BLOCK_TYPES` (linear, convolution, normalization layers and activations).

    Returns
    -------
    dict of str to nn.Module
        Each value is a block for :func:`jacobian_spectrum`; its inputs are the tensor at site
        ``"<name>:input"``.

    Raises
    ------
    TypeError
        A type that is not an ``nn.Module`` subclass.
    SiteSelectionError
        No module of these types (the message lists the types present).

    Examples
    --------
    >>> m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> list(module_blocks(m, nn.Linear))
    ['0', '2']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if types is None:
        wanted: tuple[type, ...] = BLOCK_TYPES
    elif isinstance(types, type):
        wanted = (types,)
    else:
        wanted = tuple(types)
    bad = [t for t in wanted if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad or not wanted:
        raise TypeError(
            f"types must be nn.Module subclasses (e.g. nn.Linear or (nn.Conv2d, nn.ReLU)), "
            f"got {bad or types!r}"
        )
    found = {n: m for n, m in model.named_modules() if n and isinstance(m, wanted)}
    if not found:
        present = sorted({type(m).__name__ for n, m in model.named_modules() if n})
        names = [t.__name__ for t in wanted]
        raise SiteSelectionError(
            f"No module of type {names} in the model. Types present: {present}"
        )
    return found


def whole(model: nn.Module) -> nn.Module:
    """The block ``input -> output`` of ``model`` (its first floating-point output tensor).

    The returned module holds ``model`` (no copy); its inputs are the model's inputs.

    Examples
    --------
    >>> m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    >>> jacobian_spectrum(whole(m), torch.randn(4, 3)).sv.shape
    torch.Size([4, 2])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return _Whole(model)


def segment(
    model: nn.Module,
    from_site: str,
    to_site: str,
    example: torch.Tensor | Sequence[Any] | Mapping[str, Any],
) -> Segment:
    """The block mapping the tensor at ``from_site`` to the tensor at a later ``to_site``.

    E.g. ``segment(model, "2:input", "5:input", xb)`` is the map from the input of layer 2 (the
    normalized input of a BN network's layer, paper §3.3) to the input of the next layer. It is
    generic: the model's own ``forward`` runs on the fixed ``example`` batch, a private forward
    pre-hook (``:input``) or forward hook (``:output``) on the module of ``from_site``
    substitutes the tensor given to the segment, and a private hook at ``to_site`` captures the
    tensor there and stops the forward early. Every other input of the rest of the model (skip
    connections, other arguments) comes from ``example``. A module called several times is
    substituted at its first call, and captured at the first call after the substitution.

    Parameters
    ----------
    model : nn.Module
    from_site, to_site : str
        Site names ``"<module name>:input|output"`` (see :mod:`icstools.sites`), with the role.
    example : tensor, tuple of positional arguments, or dict of keyword arguments
        The model's inputs for the batch; kept (detached) by the segment.

    Returns
    -------
    Segment
        An ``nn.Module``; call it with a tensor shaped like the one at ``from_site`` for
        ``example``; its ``inputs`` attribute is that tensor (detached), the natural ``inputs``
        of :func:`jacobian_spectrum`. Calling it directly runs ``model`` as it is (a train-mode BN
        then updates its running statistics); :func:`jacobian_spectrum` runs it without side
        effects. Other forward hooks on ``model`` fire at each call: disarm them while
        computing spectra.

    Raises
    ------
    SiteSelectionError
        A site that does not exist (with the closest names) or matches several modules.
    ValueError
        A site without a role, or ``to_site`` not reached after ``from_site`` in the forward.

    Examples
    --------
    >>> m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    >>> seg = segment(m, "1:input", "3:input", torch.randn(8, 4))
    >>> seg.inputs.shape
    torch.Size([8, 6])
    >>> jacobian_spectrum(seg, seg.inputs).sv.shape
    torch.Size([8, 6])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    src = _one_site(model, from_site, "from_site")
    dst = _one_site(model, to_site, "to_site")
    seg = Segment(model, src, dst, example)
    with _isolated(seg, None, "full"):  # no side effects; BN with batch statistics
        seg.capture_inputs()
    return seg


def spectrum_summary(
    sv: torch.Tensor | JacobianSpectrum, near: tuple[float, float] = (0.5, 2.0)
) -> dict[str, torch.Tensor]:
    """Summaries of singular values along the last dimension (DESIGN.md §4).

    Parameters
    ----------
    sv : torch.Tensor or JacobianSpectrum
        ``[..., n]`` singular values (e.g. ``[B, p]``), or a result of
        :func:`jacobian_spectrum` holding the whole spectrum. For a tensor of top-/bottom-k only,
        all entries but ``max``/``min`` describe those values only.
    near : (float, float)
        The closed interval counted by ``frac_near_one``.

    Returns
    -------
    dict of str to torch.Tensor
        Each of shape ``sv.shape[:-1]`` (float64):

        - ``mean_sq``: mean of σ² (the mean eigenvalue of ``JJᵀ``; 1 for an isometry in the
          mean, the quantity kept at 1 by variance-preserving initializations);
        - ``var_sq``: variance of σ² (ddof=0), the spread random-matrix theory predicts
          (Pennington et al. 2017: ``L`` for a product of ``L`` Gaussian layers);
        - ``log_std``: standard deviation of ``log σ`` (ddof=0), a scale-free spread; NaN when a
          σ is 0;
        - ``max``, ``min``: ``σ_max`` and ``σ_min``;
        - ``frac_near_one``: share of σ in ``[near[0], near[1]]`` (the paper's conjecture: all).

        NaN rows (non-finite Jacobians) give NaN.

    Examples
    --------
    >>> s = spectrum_summary(torch.tensor([[1.0, 1.0], [3.0, 1.0]]))
    >>> s["mean_sq"].tolist(), s["frac_near_one"].tolist()
    ([1.0, 5.0], [1.0, 0.5])
    """
    if isinstance(sv, JacobianSpectrum):
        if not sv.complete:
            raise ValueError(
                f"spectrum_summary needs the whole spectrum; this result holds {sv.sv.shape[-1]} "
                f"of {sv.n_total} singular values (k={sv.sv.shape[-1]}). Use k=None, or summarize "
                f"the tensor res.sv knowingly"
            )
        values = sv.sv
    elif isinstance(sv, torch.Tensor):
        values = sv
    else:
        raise TypeError(f"sv must be a tensor or a JacobianSpectrum, got {type(sv).__name__}")
    if not values.is_floating_point() or values.ndim < 1 or values.shape[-1] == 0:
        raise ValueError(
            f"sv must be a floating-point tensor [..., n] with n >= 1, got dtype "
            f"{values.dtype} and shape {tuple(values.shape)}"
        )
    lo, hi = near
    if not lo < hi:
        raise ValueError(f"near must be an interval (low, high) with low < high, got {near!r}")
    s = values.detach().to(torch.float64)
    sq = s * s
    mean_sq = sq.mean(-1)
    logs = torch.log(s)
    log_std = logs.std(-1, correction=0)
    log_std = torch.where((s == 0).any(-1), torch.full_like(log_std, math.nan), log_std)
    frac = ((s >= lo) & (s <= hi)).to(torch.float64).mean(-1)
    frac = torch.where(s.isnan().any(-1), torch.full_like(frac, math.nan), frac)
    return {
        "mean_sq": mean_sq,
        "var_sq": sq.var(-1, correction=0),
        "log_std": log_std,
        "max": s.amax(-1),
        "min": s.amin(-1),
        "frac_near_one": frac,
    }


# ============================================================================= validation
def _check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {valid}")


def _check_inputs(inputs: object) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor [B, ...], got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(
            f"inputs must be a floating-point tensor (the Jacobian is taken with respect to "
            f"them), got dtype {inputs.dtype}; convert with inputs.float()"
        )
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs must be a batch [B, ...] with B >= 1, got shape {tuple(inputs.shape)}"
        )
    return inputs


def _compute_dtype(x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype!r} is not valid; expected torch.float32 or torch.float64")
    return dtype


def _one_site(model: nn.Module, name: object, arg: str) -> Site:
    if not isinstance(name, str):
        raise TypeError(f"{arg} must be a site name like '2:input', got {type(name).__name__}")
    if ":" not in name:
        raise ValueError(
            f"{arg}={name!r} has no role: name the tensor as '<module>:input' or "
            f"'<module>:output', e.g. {name + ':input'!r}"
        )
    sites = select_sites(model, name)
    if len(sites) != 1:
        raise SiteSelectionError(
            f"{arg}={name!r} matches {len(sites)} sites ({[s.name for s in sites][:5]}); "
            f"name exactly one"
        )
    return sites[0]


# ============================================================================= isolation
_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.RReLU)


def _uses_batch_stats(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and (
        m.training or m.running_mean is None or m.running_var is None
    )


class _BNHooks:
    """Forward hooks replacing the outputs of batch-statistics BN modules (set to eval).

    Modes: ``"full"``: BN with the statistics of its current input (train-mode math, running
    statistics untouched); ``"capture"``: the same, also storing the statistics of each call
    (detached) for ``"fixed"``: BN with those stored statistics, a per-example affine map;
    ``"stats"``: like ``"full"``, recording each call's (differentiable) statistics;
    ``"given"``: BN with per-example statistics ``given [B, D_s]`` (the layout of
    :meth:`stats_vector`). Calls are counted per forward, so a module called twice per forward
    keeps two sets of statistics. The hooks belong to ``hooks``, whose owner removes them.
    """

    def __init__(self, modules: list[nn.Module], hooks: HookGroup) -> None:
        self.mode = "full"
        self.call = 0
        self.fixed: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.given: torch.Tensor | None = None
        self.offsets: list[int] = []
        for m in modules:
            hooks.forward(m, self._hook)

    def begin(self, mode: str) -> None:
        self.mode, self.call, self.recorded = mode, 0, []

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
        bn = cast(nn.modules.batchnorm._BatchNorm, module)
        h = args[0]
        i, self.call = self.call, self.call + 1
        if self.mode == "fixed":
            mean, var = self.fixed[i]
            return F.batch_norm(h, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
        if self.mode == "given":
            given = cast(torch.Tensor, self.given)
            c = h.shape[1]
            shape = (h.shape[0], c) + (1,) * (h.ndim - 2)
            mean = given[:, self.offsets[i] : self.offsets[i] + c].reshape(shape)
            var = given[:, self.offsets[i] + c : self.offsets[i] + 2 * c].reshape(shape)
            y = (h - mean) * torch.rsqrt(var + bn.eps)
            if bn.weight is not None:
                y = y * bn.weight.reshape(shape[1:])
            if bn.bias is not None:
                y = y + bn.bias.reshape(shape[1:])
            return y
        if self.mode in ("capture", "stats"):
            dims = [d for d in range(h.ndim) if d != 1]
            src = h.detach() if self.mode == "capture" else h
            var, mean = torch.var_mean(src, dim=dims, correction=0)
            self.recorded.append((mean, var))
        return F.batch_norm(h, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)

    def freeze(self) -> None:
        """Keep the statistics recorded by the last ``"capture"`` forward for ``"fixed"``."""
        self.fixed = self.recorded
        sizes = [2 * mean.numel() for mean, _ in self.fixed]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    def stats_vector(self) -> torch.Tensor:
        """The statistics recorded by the last forward, ``[D_s]``: (mean, var) per call."""
        return torch.cat([t.reshape(-1) for pair in self.recorded for t in pair])


class _Runner:
    """Calls of a block inside :func:`_isolated`: ``x [B, ...] -> first float tensor [B, ...]``.

    ``call(x, mode)`` runs the block with the BN hooks in ``mode`` (see :class:`_BNHooks`);
    ``has_bn`` tells whether the block has BN modules that use batch statistics.
    """

    def __init__(self, block: Callable[..., Any], dtype: torch.dtype | None) -> None:
        self.block = block
        self.hooks: _BNHooks | None = None
        self.cast: dict[str, torch.Tensor] = {}
        if isinstance(block, nn.Module) and dtype is not None:
            named = [*block.named_parameters(remove_duplicate=False)]
            named += [*block.named_buffers(remove_duplicate=False)]
            self.cast = {
                n: t.to(dtype) for n, t in named if t.is_floating_point() and t.dtype != dtype
            }

    @property
    def has_bn(self) -> bool:
        return self.hooks is not None

    def call(self, x: torch.Tensor, mode: str = "full") -> torch.Tensor:
        if self.hooks is not None:
            self.hooks.begin(mode)
        if self.cast:
            out = functional_call(cast(nn.Module, self.block), self.cast, (x,), strict=False)
        else:
            out = self.block(x)
        y = find_tensor(out)
        if y is None:
            raise TypeError(
                f"the block returned no floating-point tensor (got {type(out).__name__}); a "
                f"block must map a batch [B, ...] to a batch [B, ...]"
            )
        return y

    def stats(self, x: torch.Tensor) -> torch.Tensor:
        """Batch statistics of every BN call as a function of ``x``: ``[D_s]``."""
        self.call(x, "stats")
        return cast(_BNHooks, self.hooks).stats_vector()

    def with_stats(self, x: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        """The block with per-example BN statistics ``given [B, D_s]`` (separable in x, given)."""
        cast(_BNHooks, self.hooks).given = given
        return self.call(x, "given")


@contextlib.contextmanager
def _isolated(block: Callable[..., Any], x: torch.Tensor | None, bn: str) -> Iterator[_Runner]:
    """Run ``block`` without side effects; yields a :class:`_Runner`.

    :func:`~icstools.recording.isolation.isolated` restores modes, buffers, the RNGs and the grad
    mode on exit (gradients off inside: ``torch.func`` transforms need none). On top of it, BN
    modules that use batch statistics and stochastic modules are switched to eval for the
    duration, and the BN hooks (one :class:`~icstools.recording.hooks.HookGroup`, removed on exit)
    implement the BN modes. With ``bn="fixed"`` the batch statistics of ``x`` are captured first.
    """
    module = block if isinstance(block, nn.Module) else None
    modules = list(module.modules()) if module is not None else []
    runner = _Runner(block, x.dtype if x is not None else None)
    with isolated(module, grad=False), HookGroup() as hooks:
        bns = [m for m in modules if _uses_batch_stats(m)]
        for m in modules:
            if isinstance(m, _STOCHASTIC) or m in bns:
                m.train(False)  # (torch's BN, dropout and RReLU modules have no children)
        runner.hooks = _BNHooks(bns, hooks) if bns else None
        if runner.hooks is not None and x is not None:
            runner.call(x, "capture")
            runner.hooks.freeze()
        yield runner


# ============================================================================= the operator
class _PerExampleOperator:
    """Products with the per-example Jacobians ``J_i`` of a block at ``x``, all ``i`` at once.

    ``mv(V)``: ``V [c, B, *in] -> [c, B, m]`` with row ``i`` = ``J_i V[:, i]``;
    ``rmv(U)``: ``U [c, B, *out] -> [c, B, n]`` with row ``i`` = ``J_iᵀ U[:, i]``.

    ``kind == "separable"`` (``bn="fixed"``, or ``"full"`` on a block without batch statistics):
    the batch map's Jacobian is block-diagonal, so one ``jvp``/``vjp`` of the batch map with a
    different probe per example serves all examples. ``kind == "coupled"`` (``bn="full"`` with
    batch statistics): each example's block is isolated by probing with tangents (cotangents)
    that are zero outside its row, vmapped over examples (``B`` times the work). The exact path
    of a coupled block uses instead ``J_i = J_fixed,i + C_i T_i`` through the BN statistics
    ``s`` (``C_i = ∂f_i/∂s`` per example, ``T_i = ∂s/∂x_i``) when that is cheaper.
    """

    def __init__(self, runner: _Runner, x: torch.Tensor, bn: str) -> None:
        self.runner, self.x, self.bn = runner, x, bn
        self.B = x.shape[0]
        self.dtype, self.device = x.dtype, x.device
        mode = "fixed" if bn == "fixed" else "full"
        self.fn: Callable[[torch.Tensor], torch.Tensor] = lambda z: runner.call(z, mode)
        try:
            y, self._vjp_fn = vjp(self.fn, x)  # one forward, kept for every vjp
        except RuntimeError as exc:
            if "mutate a captured tensor" not in str(exc).lower():
                raise
            raise RuntimeError(
                "the block modifies a tensor in place during its forward (e.g. a module "
                "updating one of its buffers), which torch.func transforms refuse. BatchNorm's "
                "running statistics are handled; for other such modules compute the spectrum "
                f"of a block without them, or put them in a mode that does not update state. "
                f"torch says: {exc}"
            ) from exc
        if y.ndim < 1 or y.shape[0] != self.B:
            raise ValueError(
                f"the block must keep the batch dimension: inputs {tuple(x.shape)} gave an output "
                f"of shape {tuple(y.shape)}; expected [{self.B}, ...]"
            )
        self.in_shape = tuple(x.shape[1:])
        self.out_shape = tuple(y.shape[1:])
        self.n = math.prod(self.in_shape)
        self.m = math.prod(self.out_shape)
        self.finite = torch.isfinite(y.reshape(self.B, -1)).all(-1)  # [B]
        self._mv_way: str | None = None
        self._dvjp_fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None
        self.kind = "separable"
        if bn == "full" and runner.has_bn:
            self.kind = "coupled"
        elif self.B > 1 and not self._separable(self._vjp_fn, (self.B, *self.out_shape)):
            if bn == "fixed":
                raise ValueError(
                    "the block mixes the examples of the batch beyond BatchNorm (the gradient "
                    "of example 0's output reaches the inputs of other examples), so bn='fixed' "
                    "has no per-example Jacobian; use bn='full' for the diagonal blocks of the "
                    "whole-batch Jacobian"
                )
            self.kind = "coupled"
        per_probe = self.B * (self.n + self.m) * x.element_size() * _ACTIVATION_FACTOR
        if self.kind == "coupled":
            per_probe *= self.B
        self.chunk = max(1, _PROBE_BUDGET // per_probe)

    def _separable(self, vjp_fn: Callable[..., tuple[torch.Tensor, ...]], shape: tuple) -> bool:
        """Whether the gradient of example 0's output stays in example 0's inputs."""
        gen = torch.Generator(device=self.device).manual_seed(12345)
        u = torch.randn(shape, generator=gen, dtype=self.dtype, device=self.device)
        u[1:] = 0
        for g in vjp_fn(u):
            g = g.reshape(self.B, -1)
            own, leak = g[0].abs().max(), g[1:].abs().max()
            if bool(leak > 1000 * torch.finfo(self.dtype).eps * own.nan_to_num(0.0)):
                return False
        return True

    # ---------------------------------------------------------------- products
    def _jvp(self, t: torch.Tensor) -> torch.Tensor:
        """``J t`` by forward-mode AD (``torch.func.jvp``)."""
        _load_forward_ad()
        return jvp(self.fn, (self.x,), (t,))[1]

    def _dvjp(self, t: torch.Tensor) -> torch.Tensor:
        """``J t`` as the vjp of the linear map ``u -> Jᵀu`` (reverse mode twice)."""
        if self._dvjp_fn is None:
            u0 = torch.zeros((self.B, *self.out_shape), dtype=self.dtype, device=self.device)
            self._dvjp_fn = vjp(lambda u: self._vjp_fn(u)[0], u0)[1]
        return self._dvjp_fn(t)[0]

    def _rvjp(self, u: torch.Tensor) -> torch.Tensor:
        return self._vjp_fn(u)[0]

    def mv(self, V: torch.Tensor) -> torch.Tensor:
        """``[c, B, *in] -> [c, B, m]``.

        ``J v`` is computed by forward mode (``jvp``) or as a double vjp, whichever the block
        supports and, when both work, whichever the first call measures faster (under ``vmap``
        ``jvp`` of a large ``Linear`` is several times slower than the double vjp on CPU, while
        convolutions are faster in forward mode).
        """
        V = V.reshape(V.shape[0], self.B, *self.in_shape)
        if self._mv_way is None:
            out, self._mv_way = self._choose_mv(V)
        else:
            out = self._map(self._jvp if self._mv_way == "jvp" else self._dvjp, V)
        return out.reshape(V.shape[0], self.B, self.m)

    def _choose_mv(self, V: torch.Tensor) -> tuple[torch.Tensor, str]:
        results: dict[str, tuple[float, torch.Tensor]] = {}
        errors: dict[str, BaseException] = {}
        for way, lin in (("jvp", self._jvp), ("dvjp", self._dvjp), ("jvp", self._jvp)):
            if way in errors:
                continue  # it failed once: a second try would fail the same way
            try:
                self._sync()
                t0 = time.perf_counter()
                out = self._map(lin, V)
                self._sync()
                results[way] = (time.perf_counter() - t0, out)  # jvp: the warm second run
            except (RuntimeError, NotImplementedError) as exc:  # no forward AD / double backward
                errors[way] = exc
        if not results:
            raise errors["jvp"]
        way = min(results, key=lambda w: results[w][0])
        return results[way][1], way

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def rmv(self, U: torch.Tensor) -> torch.Tensor:
        """``[c, B, *out] -> [c, B, n]``."""
        U = U.reshape(U.shape[0], self.B, *self.out_shape)
        return self._map(self._rvjp, U).reshape(U.shape[0], self.B, self.n)

    def _map(self, lin: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor) -> torch.Tensor:
        if self.kind == "separable":
            return vmap(lin, chunk_size=self.chunk)(V)
        eye = torch.eye(self.B, dtype=self.dtype, device=self.device)

        def row_i(e: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            shape = (self.B,) + (1,) * (v.ndim - 1)
            out = lin(v * e.reshape(shape))  # only example i's tangent is nonzero
            return (out * e.reshape((self.B,) + (1,) * (out.ndim - 1))).sum(0)  # its row

        per_example = vmap(row_i, in_dims=(0, None))  # [B, *out]: row i from probe i
        return vmap(per_example, in_dims=(None, 0), chunk_size=self.chunk)(eye, V)

    # ---------------------------------------------------------------- exact path
    def exact_svdvals(self) -> torch.Tensor:
        """All singular values ``[B, p]``, descending, via dense per-example Jacobians."""
        B, m, n = self.B, self.m, self.n
        out = torch.full((B, min(m, n)), math.nan, dtype=self.dtype, device=self.device)
        lowrank = None
        if self.kind == "coupled" and self.runner.has_bn:
            lowrank = self._lowrank_parts()
        d_s = 0 if lowrank is None else lowrank[0].shape[0]
        per_example = (m * n + m * d_s + d_s * n) * self.x.element_size()
        step = max(1, min(B, _J_BUDGET // max(per_example, 1)))
        for start in range(0, B, step):
            idx = torch.arange(start, min(B, start + step), device=self.device)
            J = self._dense(idx) if lowrank is None else self._dense_lowrank(idx, *lowrank)
            ok = torch.isfinite(J).flatten(1).all(-1) & self.finite[idx]
            if bool(ok.any()):
                out[idx[ok]] = torch.linalg.svdvals(J[ok])
        return out

    def _onehots(self, idx: torch.Tensor, j0: int, j1: int, width: int) -> torch.Tensor:
        """``[j1 - j0, B, width]``: probe ``j`` is ``e_{j0 + j}`` on the examples ``idx``."""
        probe = torch.zeros((j1 - j0, self.B, width), dtype=self.dtype, device=self.device)
        ar = torch.arange(j1 - j0, device=self.device)
        rows = torch.zeros(self.B, dtype=self.dtype, device=self.device)
        rows[idx] = 1  # other examples' results would be discarded
        probe[ar, :, j0 + ar] = rows
        return probe

    def _dense(self, idx: torch.Tensor) -> torch.Tensor:
        """``J_i`` for the examples ``idx``: ``[len(idx), m, n]``."""
        m, n = self.m, self.n
        J = torch.empty((len(idx), m, n), dtype=self.dtype, device=self.device)
        by_rows = m <= n  # m one-hot cotangents (reverse mode), else n one-hot tangents
        n_probe = m if by_rows else n
        step = self.chunk * 4
        for j0 in range(0, n_probe, step):
            j1 = min(n_probe, j0 + step)
            probe = self._onehots(idx, j0, j1, n_probe)
            if by_rows:
                J[:, j0:j1, :] = self.rmv(probe)[:, idx].transpose(0, 1)  # [b, rows, n]
            else:
                J[:, :, j0:j1] = self.mv(probe)[:, idx].permute(1, 2, 0)  # [b, m, cols]
        return J

    def _lowrank_parts(self) -> tuple[torch.Tensor, Callable[..., Any], Callable[..., Any]] | None:
        """``(s, vjp of (x, s_b) -> f, vjp of x -> s)`` when ``J_fixed + C T`` is exact & cheaper.

        ``s [D_s]`` are the batch statistics of every BN call; ``f(x, s_b)`` is the block with
        per-example statistics ``s_b [B, D_s]``, separable in examples when BN is the only
        coupling (checked). Cost: ``m + D_s`` batch passes instead of ``B·m``.
        """
        runner, x = self.runner, self.x
        s = runner.stats(x)
        if s.numel() + self.m >= self.B * self.m:
            return None
        sb = s.expand(self.B, -1).contiguous()
        _, vjp_f = vjp(runner.with_stats, x, sb)
        if not self._separable(vjp_f, (self.B, *self.out_shape)):
            return None  # other coupling than BN: isolate examples by probing instead
        _, vjp_s = vjp(runner.stats, x)
        return s, vjp_f, vjp_s

    def _dense_lowrank(
        self,
        idx: torch.Tensor,
        s: torch.Tensor,
        vjp_f: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        vjp_s: Callable[..., tuple[torch.Tensor]],
    ) -> torch.Tensor:
        """``J_i = J_fixed,i + C_i T_i`` for the examples ``idx``: ``[len(idx), m, n]``."""
        m, n, d_s, b = self.m, self.n, s.numel(), len(idx)
        J = torch.empty((b, m, n), dtype=self.dtype, device=self.device)
        C = torch.empty((b, m, d_s), dtype=self.dtype, device=self.device)
        per_probe = self.B * (n + m + d_s) * self.x.element_size() * _ACTIVATION_FACTOR
        chunk = max(1, _PROBE_BUDGET // per_probe)
        for j0 in range(0, m, chunk * 4):
            j1 = min(m, j0 + chunk * 4)
            probe = self._onehots(idx, j0, j1, m).reshape(j1 - j0, self.B, *self.out_shape)
            gx, gs = vmap(vjp_f, chunk_size=chunk)(probe)  # [c, B, *in], [c, B, D_s]
            J[:, j0:j1, :] = gx.reshape(j1 - j0, self.B, n)[:, idx].transpose(0, 1)
            C[:, j0:j1, :] = gs[:, idx].transpose(0, 1)
        T = torch.empty((b, d_s, n), dtype=self.dtype, device=self.device)
        eye = torch.eye(d_s, dtype=self.dtype, device=self.device)
        for j0 in range(0, d_s, chunk * 4):
            j1 = min(d_s, j0 + chunk * 4)
            (gx,) = vmap(vjp_s, chunk_size=chunk)(eye[j0:j1])  # [c, B, *in]
            T[:, j0:j1, :] = gx.reshape(j1 - j0, self.B, n)[:, idx].transpose(0, 1)
        return torch.baddbmm(J, C, T)  # [b, m, n]

    # ---------------------------------------------------------------- matrix-free path
    def extreme_svdvals(
        self, k_top: int, k_bot: int, *, tol: float, maxiter: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``k_top`` largest and ``k_bot`` smallest singular values, ``[B, k]`` descending."""
        on_input = self.n <= self.m  # eigenproblem of JᵀJ (n × n) or JJᵀ (m × m)
        p = self.n if on_input else self.m
        bad = ~self.finite

        def gram(X: torch.Tensor) -> torch.Tensor:  # [B, p, c] -> [B, p, c]
            V = X.permute(2, 0, 1)  # [c, B, p]
            W = self.rmv(self.mv(V)) if on_input else self.mv(self.rmv(V))
            W = torch.where(torch.isfinite(W) & ~bad[None, :, None], W, 0.0)
            return W.permute(1, 2, 0)

        gen = torch.Generator(device=self.device).manual_seed(seed)
        Xt, Xb, conv, its = _block_krylov(
            gram, self.B, p, k_top, k_bot, self.dtype, self.device, tol, maxiter, gen
        )

        def unsquared(X: torch.Tensor) -> torch.Tensor:  # σ(J X): [B, p, k] -> [B, k]
            if X.shape[-1] == 0:
                return X.new_zeros((self.B, 0))
            V = X.permute(2, 0, 1)
            img = self.mv(V) if on_input else self.rmv(V)  # [k, B, ·]
            img = torch.where(bad[None, :, None], 0.0, img)
            s = torch.linalg.svdvals(img.permute(1, 2, 0))
            return torch.where(bad[:, None], math.nan, s)

        conv = conv & self.finite
        return unsquared(Xt), unsquared(Xb), conv, its


_FORWARD_AD_LOADED = False


def _load_forward_ad() -> None:
    """Load torch's forward-AD decompositions once, without their import-time warning.

    (torch 2.13 scripts them with ``torch.jit.script``, which warns ``DeprecationWarning`` at
    the first forward-mode AD use in a process: noise for users, an error under
    ``-W error``.)
    """
    global _FORWARD_AD_LOADED
    if _FORWARD_AD_LOADED:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit\.script.*", DeprecationWarning)
        with torch.autograd.forward_ad.dual_level():
            torch.autograd.forward_ad.make_dual(torch.zeros(1), torch.zeros(1))
    _FORWARD_AD_LOADED = True


# ============================================================================= the solver
def _orth_against(Q: torch.Tensor | None, W: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Orthonormal columns spanning ``W`` minus span(``Q``); degenerate columns made random.

    Two block Gram–Schmidt projections and a QR; columns that were (nearly) in the span of
    ``Q`` and the previous columns are replaced by random vectors; one more projection and QR
    restore orthogonality to working precision.
    """
    tiny = torch.finfo(W.dtype).tiny
    W = W / W.norm(dim=-2, keepdim=True).clamp_min(tiny)
    if Q is not None:
        W = W - Q @ (Q.mT @ W)
        W = W - Q @ (Q.mT @ W)
    W, R = torch.linalg.qr(W)
    weak = R.diagonal(dim1=-2, dim2=-1).abs() < 1e-3  # [B, c]
    replaced = bool(weak.any())
    if replaced:
        noise = torch.randn(W.shape, generator=gen, dtype=W.dtype, device=W.device)
        W = torch.where(weak[:, None, :], noise, W)
    for _ in range(2 if replaced else 1):
        if Q is not None:
            W = W - Q @ (Q.mT @ W)
    return torch.linalg.qr(W)[0]


def _block_krylov(
    gram: Callable[[torch.Tensor], torch.Tensor],
    B: int,
    p: int,
    k_top: int,
    k_bot: int,
    dtype: torch.dtype,
    device: torch.device,
    tol: float,
    maxiter: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Extreme eigenvectors of ``B`` symmetric PSD ``p × p`` operators, all at once.

    Thick-restarted block Lanczos with full re-orthogonalization: each step appends the images
    ``G·(last block)`` orthogonalized against the basis; every ``_RR_EVERY`` steps a
    Rayleigh–Ritz step (float64 ``eigh`` of the projected matrix) checks convergence; at
    ``cap`` basis vectors the basis is cut to the Ritz vectors nearest the wanted end(s) and
    the Krylov sequence restarts from their residuals (Krylov–Schur style). Returns the top
    Ritz vectors ``[B, p, k_top]`` (descending), the bottom ones ``[B, p, k_bot]`` (descending),
    the per-example convergence ``[B]`` and the number of block steps.
    """
    nw = k_top + k_bot
    guard = min(max(2, nw // 2), 8)
    b = min(p, nw + guard)
    cap = min(p, max(nw + 6 * b, 128))
    g_top = (guard + 1) // 2 if k_top and k_bot else guard if k_top else 0
    g_bot = guard - g_top if k_bot else 0
    eps = torch.finfo(dtype).eps

    def rayleigh_ritz(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.linalg.eigh((H + H.mT) / 2)  # ascending: [B, d], [B, d, d]

    def pick(d: int) -> tuple[list[int], list[int], list[int]]:
        """Indices (ascending θ) of the wanted top (descending), bottom (descending), guards."""
        top = list(range(d - min(k_top, d), d))[::-1]
        bot = list(range(min(k_bot, d)))[::-1]
        guards = list(range(max(0, d - k_top - g_top), d - k_top))[::-1] if k_top else []
        guards += list(range(k_bot, min(d - k_top, k_bot + g_bot))) if k_bot else []
        return top, bot, guards

    start = torch.randn((B, p, b), generator=gen, dtype=dtype, device=device)
    Q = _orth_against(None, start, gen)
    GQ = gram(Q)
    H = (Q.mT @ GQ).to(torch.float64)  # [B, d, d] = Qᵀ G Q, grown by one block per step
    last = b  # size of the last block appended
    its = 0
    while True:
        d = Q.shape[-1]
        theta, Y = rayleigh_ritz(H)
        top, bot, guards = pick(d)
        want = top + bot
        Yw = Y[:, :, want].to(dtype)
        th = theta[:, want]  # [B, nw]
        R = GQ @ Yw - (Q @ Yw) * th.to(dtype)[:, None, :]
        rnorm = R.norm(dim=-2).to(torch.float64)
        thr = torch.maximum(2 * tol * th.abs(), 100 * eps * theta[:, -1:].clamp_min(0))
        conv = (rnorm <= thr).all(-1)  # [B]
        s = min(b, p - d)  # vectors the next step adds
        if bool(conv.all()) or s == 0 or its >= maxiter:
            break
        its += 1
        if d + s > cap:  # thick restart from the Ritz vectors nearest the wanted end(s)
            room = cap - s
            n_bot = room if not k_top else room // 2 if k_bot else 0
            keep = list(range(n_bot)) + list(range(d - (room - n_bot), d))
            Yk = Y[:, :, keep].to(dtype)
            Q, GQ = Q @ Yk, GQ @ Yk
            theta = theta[:, keep]
            H = torch.diag_embed(theta)  # Qᵀ G Q in the Ritz basis
            top, bot, guards = pick(len(keep))
            sel = (top + bot + guards)[:s]
            W = GQ[:, :, sel] - Q[:, :, sel] * theta[:, sel].to(dtype)[:, None, :]  # residuals
        else:
            W = GQ[:, :, d - last :]  # the block Krylov direction
        W = _orth_against(Q, W[:, :, :s], gen)
        GW = gram(W)
        last = W.shape[-1]
        Q = torch.cat([Q, W], dim=-1)
        GQ = torch.cat([GQ, GW], dim=-1)
        C = (Q.mT @ GW).to(torch.float64)  # [B, d + s, s]: the new columns of Qᵀ G Q
        H = torch.cat([torch.cat([H, C[:, :-last].mT], dim=1), C], dim=2)
    X = Q @ Yw
    return X[:, :, : len(top)], X[:, :, len(top) :], conv, its


# ============================================================================= blocks
class _StopForward(Exception):
    """Raised by a segment's hook at ``to_site`` to end the model's forward early."""


def _replace_first_tensor(obj: Any, new: torch.Tensor) -> tuple[Any, bool]:
    """``obj`` with its first floating tensor (as :func:`find_tensor` finds it) replaced."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.ndim > 0:
            return new, True
        return obj, False
    if isinstance(obj, (tuple, list)):
        items = list(obj)
        for i, item in enumerate(items):
            items[i], done = _replace_first_tensor(item, new)
            if done:
                return (type(obj)(items) if isinstance(obj, tuple) else items), True
        return obj, False
    if isinstance(obj, dict):
        out = dict(obj)
        for key, item in obj.items():
            out[key], done = _replace_first_tensor(item, new)
            if done:
                return out, True
        return obj, False
    return obj, False


class _Whole(nn.Module):
    """``input -> first floating output tensor`` of a model (see :func:`whole`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = find_tensor(self.model(x))
        if out is None:
            raise TypeError(f"{type(self.model).__name__} returned no floating-point tensor")
        return out


class Segment(nn.Module):
    """The map from the tensor at one site to the tensor at a later one; see :func:`segment`.

    Attributes
    ----------
    model : nn.Module
        The model (not a copy).
    src, dst : Site
        The sites the segment goes from and to.
    inputs : torch.Tensor
        The tensor at ``src`` for the example batch (detached).
    """

    inputs: torch.Tensor

    def __init__(self, model: nn.Module, src: Site, dst: Site, example: Any) -> None:
        super().__init__()
        self.model = model
        self.src, self.dst = src, dst
        if isinstance(example, torch.Tensor):
            args, kwargs = (example.detach(),), {}
        elif isinstance(example, Mapping):
            args, kwargs = (), {k: _detach(v) for k, v in example.items()}
        elif isinstance(example, (tuple, list)):
            args, kwargs = tuple(_detach(v) for v in example), {}
        else:
            raise TypeError(
                f"example must be a tensor, a tuple of positional arguments or a dict of keyword "
                f"arguments of the model, got {type(example).__name__}"
            )
        self._example = (args, kwargs)
        self._cast: dict[torch.dtype, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def extra_repr(self) -> str:
        return f"from={self.src.name!r}, to={self.dst.name!r}"

    def _example_as(self, dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The example's floating-point tensors in ``dtype`` (cached)."""
        if dtype not in self._cast:
            args, kwargs = self._example
            self._cast[dtype] = (
                tuple(_to_dtype(a, dtype) for a in args),
                {key: _to_dtype(v, dtype) for key, v in kwargs.items()},
            )
        return self._cast[dtype]

    def _run(self, x: torch.Tensor | None) -> torch.Tensor:
        """Forward of the model; substitute ``x`` at the source (``None``: capture it)."""
        state: dict[str, Any] = {"substituted": False, "out": None, "src": None}
        src_mod = self.model.get_submodule(self.src.module_name)
        dst_mod = self.model.get_submodule(self.dst.module_name)

        def substitute(value: Any, where: str) -> Any:
            if state["substituted"]:
                return value
            found = find_tensor(value)
            if found is None:
                raise ValueError(f"site {self.src.name!r} has no floating-point tensor {where}")
            state["substituted"] = True
            if x is None:  # a copy: an in-place module at or after the site would overwrite it
                state["src"] = found.detach().clone()
                return value
            if tuple(x.shape) != tuple(found.shape):
                raise ValueError(
                    f"the segment's input has shape {tuple(x.shape)} but the tensor at "
                    f"{self.src.name!r} for the segment's example batch has shape "
                    f"{tuple(found.shape)}"
                )
            # a clone, not x: an in-place module at or after the site (ReLU(inplace=True))
            # then writes into the clone (recorded by autograd), never into x, which may be a
            # leaf of the Jacobian's graph or the caller's tensor
            return _replace_first_tensor(value, x.clone())[0]

        def capture(value: Any) -> None:
            if not state["substituted"]:
                if x is None:
                    raise ValueError(
                        f"to_site {self.dst.name!r} is reached before from_site "
                        f"{self.src.name!r} in the model's forward: the segment must go forward"
                    )
                return
            found = find_tensor(value)
            if found is None:
                raise ValueError(f"site {self.dst.name!r} has no floating-point tensor")
            state["out"] = found
            raise _StopForward

        def src_pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self.src.role != "input":
                return None
            new_args, kwargs_new = substitute((args, kwargs), "in its inputs")
            return new_args, kwargs_new

        def src_post(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if self.src.role != "output":
                return None
            return substitute(output, "in its output")

        def dst_pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.dst.role == "input":
                capture((args, kwargs))

        def dst_post(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self.dst.role == "output":
                capture(output)

        args, kwargs = self._example_as(x.dtype) if x is not None else self._example
        with HookGroup() as hooks:  # removed on exit, also when a hook or the model raises
            # order: substitution hooks first, so "m:input" -> "m:output" of one module works
            hooks.forward_pre(src_mod, src_pre, with_kwargs=True, prepend=True)
            hooks.forward_pre(dst_mod, dst_pre, with_kwargs=True)
            hooks.forward(src_mod, src_post, prepend=True)
            hooks.forward(dst_mod, dst_post)
            try:
                self.model(*args, **kwargs)
            except _StopForward:  # raised by capture() at to_site: the forward is done
                pass
        if not state["substituted"]:
            raise ValueError(
                f"from_site {self.src.name!r} was not reached in the model's forward on the example"
            )
        if state["out"] is None:
            raise ValueError(
                f"to_site {self.dst.name!r} was not reached after from_site {self.src.name!r} in "
                f"the model's forward on the example"
            )
        if x is None:
            return state["src"]
        return state["out"]

    def capture_inputs(self) -> None:
        """Store the tensor at ``from_site`` for the example batch as ``inputs``."""
        self.inputs = self._run(None)  # a detached copy, taken when the forward reached the site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


def _to_dtype(v: Any, dtype: torch.dtype) -> Any:
    return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

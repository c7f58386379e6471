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
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from icstools.functional.jacobian_blocks import Segment, _Whole
from icstools.functional.jacobian_operator import _PerExampleOperator
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
    tol = _check_iteration(k, maxiter, tol)
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
            top, bottom, full, conv, iterations = _matrix_free(op, k, which, tol, maxiter, seed)
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


def _check_iteration(k: Any, maxiter: Any, tol: Any) -> float:
    """Check ``k``, ``maxiter`` and ``tol`` of :func:`jacobian_spectrum`; the tolerance to use."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise TypeError(f"k must be an int or None, got {type(k).__name__}: {k!r}")
    if not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter must be an int >= 1, got {maxiter!r}")
    if tol is None:
        return 1e-4
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")
    return float(tol)


def _matrix_free(
    op: _PerExampleOperator, k: int, which: str, tol: float, maxiter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """``(top, bottom, full or None, converged, iterations)``: the ``k`` largest and/or
    smallest singular values of each example by block Krylov iterations (all of them, as
    ``full``, when the two ends overlap); warns for examples that did not converge."""
    p = min(op.m, op.n)
    k_top = k if which in ("largest", "both") else 0
    k_bot = k if which in ("smallest", "both") else 0
    if k_top + k_bot >= p:  # the two ends overlap: ask for everything from one end
        k_top, k_bot = p, 0
    top, bottom, conv, iterations = op.extreme_svdvals(
        k_top, k_bot, tol=tol, maxiter=maxiter, seed=seed
    )
    full = None
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
            stacklevel=3,
        )
    return top, bottom, full, conv, iterations


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

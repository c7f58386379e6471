"""The per-example Jacobian operator of :mod:`icstools.functional.jacobians` and its
block-Krylov solver: exact Jacobians in memory-bounded chunks (``vmap(jacrev)``), or
Jacobian-vector products (forward and reverse mode) for a randomized block Krylov iteration
when the matrices are too large to hold."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.func import jvp, vjp, vmap

if TYPE_CHECKING:
    from icstools.functional.jacobians import _Runner

_J_BUDGET = 512 * 2**20  # bytes of Jacobians held at once by the exact path
_PROBE_BUDGET = 256 * 2**20  # bytes of probe vectors (and their activations) per vmap chunk
_ACTIVATION_FACTOR = 8  # activations per probe, in units of (n + m) numbers: a guess


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

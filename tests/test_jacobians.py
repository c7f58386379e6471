"""Tests of icstools.functional.jacobians: per-example Jacobian spectra, blocks, segments,
summaries."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icstools.functional import jacobians as jac
from icstools.functional.jacobians import (
    JacobianConvergenceWarning,
    JacobianSpectrum,
    jacobian_spectrum,
    module_blocks,
    segment,
    spectrum_summary,
    whole,
)
from icstools.sites import SiteSelectionError

D64 = torch.float64


# ----------------------------------------------------------------------------- references
def dense_sv(fn, x: torch.Tensor) -> np.ndarray:
    """Reference: per-example ``torch.autograd.functional.jacobian`` + ``numpy.linalg.svd``.

    ``fn`` maps one example (no batch dimension) to its output.
    """
    out = []
    for xi in x:
        J = torch.autograd.functional.jacobian(fn, xi)
        J = J.reshape(fn(xi).numel(), xi.numel()).detach().numpy()
        out.append(np.linalg.svd(J, compute_uv=False))
    return np.stack(out)


def dense_sv_full(block: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Reference for ``bn="full"``: diagonal blocks of the whole-batch Jacobian (on a copy)."""
    ref = copy.deepcopy(block)
    J = torch.autograd.functional.jacobian(ref, x)  # [B, *out, B, *in]
    B = x.shape[0]
    J = J.reshape(B, -1, B, x[0].numel())
    return np.stack([np.linalg.svd(J[i, :, i].numpy(), compute_uv=False) for i in range(B)])


def batch_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(h.ndim) if d != 1]
    var, mean = torch.var_mean(h, dim=dims, correction=0)
    return mean, var


def bn_fixed(bn: nn.modules.batchnorm._BatchNorm, h: torch.Tensor, stats) -> torch.Tensor:
    """BN of one example ``h`` ([C] or [C, H, W]) as the affine map with given statistics."""
    mean, var = stats
    shape = (-1,) + (1,) * (h.ndim - 1)
    y = (h - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + bn.eps)
    return y * bn.weight.reshape(shape) + bn.bias.reshape(shape)


def assert_sv_close(got: torch.Tensor, ref: np.ndarray, rtol: float = 1e-9) -> None:
    got_np = got.detach().numpy()
    assert got_np.shape == ref.shape
    scale = np.abs(ref).max(axis=-1, keepdims=True)
    np.testing.assert_allclose(got_np, ref, rtol=rtol, atol=rtol * scale.max())


def seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class Residual(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(d, d), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


# ----------------------------------------------------------------------------- exact path
ELEMENTWISE_BLOCKS = {
    "linear": lambda: nn.Linear(7, 5),
    "linear_wide": lambda: nn.Linear(4, 9),
    "conv2d": lambda: nn.Conv2d(2, 3, 3, padding=1),
    "bn1d_eval": lambda: _bn_eval(),
    "layernorm": lambda: nn.LayerNorm(6),
    "tanh": lambda: nn.Tanh(),
    "residual": lambda: Residual(6),
    "sequential": lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)),
}
IN_SHAPES = {"linear": (7,), "linear_wide": (4,), "conv2d": (2, 4, 4)}


def _bn_eval() -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return bn.eval()


@pytest.mark.parametrize("name", list(ELEMENTWISE_BLOCKS))
def test_exact_matches_autograd_jacobian_and_numpy_svd(name: str) -> None:
    gen = seeded(1)
    block = ELEMENTWISE_BLOCKS[name]().double()
    x = torch.randn(5, *IN_SHAPES.get(name, (6,)), dtype=D64, generator=gen)
    res = jacobian_spectrum(block, x)
    ref = dense_sv(lambda xi: block(xi.unsqueeze(0)).squeeze(0), x)
    assert res.method == "exact" and res.complete
    assert_sv_close(res.sv, ref)
    assert torch.all(res.sv[:, :-1] >= res.sv[:, 1:])  # descending


def test_exact_bn1d_train_fixed_is_affine_map_with_batch_statistics() -> None:
    gen = seeded(2)
    block = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh()).double()
    with torch.no_grad():
        block[1].weight.uniform_(0.5, 2, generator=gen)
    x = torch.randn(8, 6, dtype=D64, generator=gen)
    with torch.no_grad():
        stats = batch_stats(block[0](x))
    ref = dense_sv(lambda xi: torch.tanh(bn_fixed(block[1], block[0](xi), stats)), x)
    assert_sv_close(jacobian_spectrum(block, x, bn="fixed").sv, ref)
    # which is not the full Jacobian (see the closed-form test for the O(1/B) difference)
    full = jacobian_spectrum(block, x, bn="full").sv.numpy()
    assert np.abs(full / ref - 1).max() > 1e-3


def test_exact_bn2d_train_fixed_and_full() -> None:
    gen = seeded(3)
    block = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh()).double()
    x = torch.randn(4, 2, 3, 3, dtype=D64, generator=gen)
    with torch.no_grad():
        stats = batch_stats(block[0](x))

    def fixed(xi: torch.Tensor) -> torch.Tensor:
        return torch.tanh(bn_fixed(block[1], block[0](xi.unsqueeze(0)).squeeze(0), stats))

    assert_sv_close(jacobian_spectrum(block, x).sv, dense_sv(fixed, x))
    assert_sv_close(jacobian_spectrum(block, x, bn="full").sv, dense_sv_full(block, x))


def test_full_mode_bn_alone_matches_closed_form() -> None:
    """For y = BN(x) in train mode: ∂y_i/∂x_i = diag(γ/σ · (1 − 1/B − x̂_i²/B)) (O(1/B) off)."""
    gen = seeded(4)
    B = 6
    bn = nn.BatchNorm1d(5, eps=1e-5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2, generator=gen)
    x = torch.randn(B, 5, dtype=D64, generator=gen) * 3 + 1
    mean, var = batch_stats(x)
    xhat = (x - mean) / torch.sqrt(var + bn.eps)
    diag_full = bn.weight / torch.sqrt(var + bn.eps) * (1 - 1 / B - xhat**2 / B)
    diag_fixed = (bn.weight / torch.sqrt(var + bn.eps)).expand(B, -1)
    full = jacobian_spectrum(bn, x, bn="full").sv
    fixed = jacobian_spectrum(bn, x, bn="fixed").sv
    torch.testing.assert_close(full, diag_full.abs().detach().sort(-1, descending=True)[0])
    torch.testing.assert_close(fixed, diag_fixed.detach().sort(-1, descending=True)[0])


def test_full_mode_paths_agree_with_whole_batch_jacobian(monkeypatch) -> None:
    """Low-rank path (J_fixed + C T), per-example probing path, and the reference agree."""
    gen = seeded(5)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4), nn.BatchNorm1d(4)
    ).double()
    x = torch.randn(7, 5, dtype=D64, generator=gen)
    ref = dense_sv_full(model, x)
    lowrank = jacobian_spectrum(model, x, bn="full")
    assert_sv_close(lowrank.sv, ref)
    monkeypatch.setattr(jac._PerExampleOperator, "_lowrank_parts", lambda self: None)
    assert_sv_close(jacobian_spectrum(model, x, bn="full").sv, ref)


def test_shared_bn_called_twice_keeps_two_sets_of_statistics() -> None:
    gen = seeded(6)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(torch.tanh(self.bn(self.lin(x))))

    m = Twice().double()
    x = torch.randn(6, 4, dtype=D64, generator=gen)
    with torch.no_grad():
        s1 = batch_stats(m.lin(x))
        s2 = batch_stats(torch.tanh(F.batch_norm(m.lin(x), None, None, training=True)))

    def fixed(xi: torch.Tensor) -> torch.Tensor:
        return bn_fixed(m.bn, torch.tanh(bn_fixed(m.bn, m.lin(xi), s1)), s2)

    assert_sv_close(jacobian_spectrum(m, x).sv, dense_sv(fixed, x))
    assert_sv_close(jacobian_spectrum(m, x, bn="full").sv, dense_sv_full(m, x))


def test_block_mixing_examples_is_refused_in_fixed_mode_and_handled_in_full() -> None:
    gen = seeded(7)

    class Center(nn.Module):  # couples the batch without being a BN
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x - x.mean(0, keepdim=True))

    x = torch.randn(5, 4, dtype=D64, generator=gen)
    with pytest.raises(ValueError, match=r"mixes the examples.*bn='full'"):
        jacobian_spectrum(Center(), x)
    assert_sv_close(jacobian_spectrum(Center(), x, bn="full").sv, dense_sv_full(Center(), x))


def test_functions_and_dtype_casting() -> None:
    gen = seeded(8)
    x = torch.randn(3, 5, generator=gen)
    w = torch.randn(4, 5, dtype=D64, generator=gen)

    res = jacobian_spectrum(lambda t: torch.sin(t) * 2, x.double())
    assert_sv_close(res.sv, np.sort(np.abs(2 * np.cos(x.double().numpy())), axis=1)[:, ::-1])

    lin = nn.Linear(5, 4)  # float32 module, float64 computation
    res = jacobian_spectrum(lin, x, dtype=D64)
    assert res.sv.dtype == D64 and lin.weight.dtype == torch.float32
    ref = np.linalg.svd(lin.weight.detach().double().numpy(), compute_uv=False)
    assert_sv_close(res.sv, np.tile(ref, (3, 1)))
    res32 = jacobian_spectrum(lin, x)
    assert res32.sv.dtype == torch.float32
    np.testing.assert_allclose(res32.sv.numpy(), np.tile(ref, (3, 1)), rtol=1e-5)
    with pytest.raises(ValueError, match=r"dtype=torch.float16 is not valid"):
        jacobian_spectrum(lin, x, dtype=torch.float16)
    del w


def test_non_finite_examples_give_nan_rows() -> None:
    gen = seeded(9)
    x = torch.randn(4, 3, dtype=D64, generator=gen)
    x[2, 0] = math.inf
    lin = nn.Linear(3, 3).double()
    ref = torch.linalg.svdvals(lin.weight.detach()).expand(3, -1)
    for method in ("exact", "matrix_free"):
        res = jacobian_spectrum(lin, x, k=1, method=method)
        assert torch.isnan(res.sv[2]).all() and not bool(res.converged[2])
        torch.testing.assert_close(res.sv[[0, 1, 3]], ref[:, :1])


# ----------------------------------------------------------------------------- matrix-free
def test_matrix_free_top_and_bottom_equal_dense_float64() -> None:
    """Restarted solver (p = 160 > basis cap 128): rel. error <= 1e-4 at both ends."""
    gen = seeded(10)
    block = nn.Sequential(nn.Linear(320, 160), nn.BatchNorm1d(160), nn.Tanh()).double()
    x = torch.randn(3, 320, dtype=D64, generator=gen)
    dense = jacobian_spectrum(block, x).sv
    res = jacobian_spectrum(block, x, k=4, which="both", method="matrix_free")
    assert res.method == "matrix_free" and bool(res.converged.all())
    assert res.iterations > (128 - 6) // 6  # the basis was restarted at least once
    assert res.sv.shape == (3, 8)
    torch.testing.assert_close(res.largest, dense[:, :4], rtol=1e-4, atol=0)
    torch.testing.assert_close(res.smallest, dense[:, -4:], rtol=1e-4, atol=0)
    torch.testing.assert_close(
        res.sv, torch.cat([dense[:, :4], dense[:, -4:]], 1), rtol=1e-4, atol=0
    )


def test_matrix_free_largest_tall_jacobian_and_full_mode() -> None:
    gen = seeded(11)
    block = nn.Sequential(nn.Linear(60, 200), nn.BatchNorm1d(200), nn.Tanh()).double()
    x = torch.randn(4, 60, dtype=D64, generator=gen)
    for bn in ("fixed", "full"):
        dense = jacobian_spectrum(block, x, bn=bn).sv
        res = jacobian_spectrum(block, x, k=5, method="matrix_free", bn=bn)
        assert res.smallest is None and res.largest is res.sv
        torch.testing.assert_close(res.sv, dense[:, :5], rtol=1e-4, atol=0)
        res = jacobian_spectrum(block, x, k=3, method="matrix_free", which="smallest", bn=bn)
        torch.testing.assert_close(res.sv, dense[:, -3:], rtol=1e-4, atol=0)


def test_matrix_free_float32_and_conv() -> None:
    gen = seeded(12)
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(4, 3, 8, 8, generator=gen)  # p = 192
    dense = jacobian_spectrum(block, x, dtype=D64).sv
    res = jacobian_spectrum(block, x, k=6, method="matrix_free")
    assert res.sv.dtype == torch.float32 and bool(res.converged.all())
    torch.testing.assert_close(res.sv.double(), dense[:, :6], rtol=2e-4, atol=0)


def test_overlapping_ends_give_the_whole_spectrum() -> None:
    gen = seeded(13)
    lin = nn.Linear(6, 6).double()
    x = torch.randn(2, 6, dtype=D64, generator=gen)
    dense = jacobian_spectrum(lin, x).sv
    for method in ("exact", "matrix_free"):
        res = jacobian_spectrum(lin, x, k=4, which="both", method=method)
        assert res.complete
        torch.testing.assert_close(res.sv, dense)
        torch.testing.assert_close(res.largest, dense[:, :4])
        torch.testing.assert_close(res.smallest, dense[:, 2:])


def test_function_without_forward_mode_ad_uses_double_vjp() -> None:
    class Cube(torch.autograd.Function):  # backward only: no jvp
        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return x**3

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return 3 * x**2 * g

    gen = seeded(14)
    lin = nn.Linear(40, 40).double()
    x = torch.randn(2, 40, dtype=D64, generator=gen)
    block = nn.Sequential(lin)

    def f(t: torch.Tensor) -> torch.Tensor:
        return Cube.apply(block(t))

    dense = jacobian_spectrum(f, x).sv
    res = jacobian_spectrum(f, x, k=3, method="matrix_free")
    torch.testing.assert_close(res.sv, dense[:, :3], rtol=1e-4, atol=0)


def test_convergence_warning_when_maxiter_is_too_small() -> None:
    gen = seeded(15)
    lin = nn.Linear(300, 300).double()
    x = torch.randn(2, 300, dtype=D64, generator=gen)
    with pytest.warns(JacobianConvergenceWarning, match=r"did not converge"):
        res = jacobian_spectrum(lin, x, k=3, which="smallest", method="matrix_free", maxiter=2)
    assert not bool(res.converged.any())


# ----------------------------------------------------------------------------- isometries, RMT
def test_orthogonal_linear_map_has_all_singular_values_one() -> None:
    gen = seeded(16)
    q = torch.linalg.qr(torch.randn(150, 150, dtype=D64, generator=gen))[0]
    lin = nn.Linear(150, 150, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(q)
    x = torch.randn(3, 150, dtype=D64, generator=gen)
    torch.testing.assert_close(jacobian_spectrum(lin, x).sv, torch.ones(3, 150, dtype=D64))
    res = jacobian_spectrum(lin, x, k=5, which="both", method="matrix_free")
    assert bool(res.converged.all())
    torch.testing.assert_close(res.sv, torch.ones(3, 10, dtype=D64))
    s = spectrum_summary(jacobian_spectrum(lin, x))
    torch.testing.assert_close(s["frac_near_one"], torch.ones(3, dtype=D64))
    torch.testing.assert_close(s["var_sq"], torch.zeros(3, dtype=D64))


def _random_chain(width: int, depth: int, relu: bool, gen: torch.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width, bias=False).double()
        with torch.no_grad():
            lin.weight.normal_(0.0, math.sqrt((2.0 if relu else 1.0) / width), generator=gen)
        layers += [lin, nn.ReLU()] if relu else [lin]
    return nn.Sequential(*layers)


def _jjt_moments(width: int, depth: int, relu: bool, draws: int) -> tuple[float, float]:
    """Mean over draws × 2 examples of the mean and variance of the eigenvalues of JJᵀ."""
    means, variances = [], []
    for draw in range(draws):
        gen = torch.Generator().manual_seed(1000 * depth + draw)
        model = _random_chain(width, depth, relu, gen)
        x = torch.randn(2, width, dtype=D64, generator=gen)
        s = spectrum_summary(jacobian_spectrum(whole(model), x))
        means += s["mean_sq"].tolist()
        variances += s["var_sq"].tolist()
    return float(np.mean(means)), float(np.mean(variances))


def _check_rmt(width: int, depths: tuple[int, ...], draws: int, tol: float) -> None:
    """Moments of the spectrum of JJᵀ for J = D_L W_L ⋯ D_1 W_1 at criticality.

    Free probability (Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid",
    σ²_JJᵀ = L(μ₂/μ₁² − 1 − s₁)): the S-transform of a product of free factors is the product of
    theirs, so mean(JJᵀ) = Π m₁ and var/mean² = Σ (m₂/m₁² − 1) over the factors.
    Gaussian W ~ N(0, σ_w²/N): WWᵀ has m₂/m₁² − 1 = 1 (s₁ = −1). Linear (σ_w² = 1, D = I):
    mean 1, variance L (the Fuss–Catalan law, m₂ = L + 1). ReLU with He init (σ_w² = 2): D² is
    Bernoulli(1/2), m₂/m₁² − 1 = 1 (μ₁ = μ₂ = 1/2), so mean (2·½)^L = 1, variance 2L.
    Measured here (width 1000, 8 draws × 2 examples): linear L=4: 1.00, 4.06; L=8: 1.01, 8.24;
    ReLU L=4: 1.02, 8.35; L=8: 1.02, 16.7 (≈ 2.09 L: +4.5%, within the 20% asked).
    """
    for relu in (False, True):
        for depth in depths:
            mean, var = _jjt_moments(width, depth, relu, draws)
            expected_var = (2 if relu else 1) * depth
            assert mean == pytest.approx(1.0, rel=tol / 2), (relu, depth, mean)
            assert var == pytest.approx(expected_var, rel=tol), (relu, depth, var)


def test_random_matrix_theory_small() -> None:
    """Cheap version of :func:`_check_rmt` (width 256, L = 4)."""
    _check_rmt(width=256, depths=(4,), draws=4, tol=0.2)


@pytest.mark.slow
def test_random_matrix_theory_width_1000() -> None:
    """Width 1000, L = 4 and 8, 8 draws × 2 examples each (≈ 1 min)."""
    _check_rmt(width=1000, depths=(4, 8), draws=8, tol=0.2)


# ----------------------------------------------------------------------------- paper §3.3
@pytest.mark.parametrize("bn_mode", ["fixed", "full"])
def test_linear_bn_jacobian_is_invariant_to_weight_scale(bn_mode: str) -> None:
    """Paper §3.3: ∂BN((aW)u)/∂u = ∂BN(Wu)/∂u (exact when ε ≪ a²·Var[Wu]: ε = 1e-12 here)."""
    gen = seeded(17)
    block = nn.Sequential(nn.Linear(12, 10, bias=False), nn.BatchNorm1d(10, eps=1e-12)).double()
    x = torch.randn(16, 12, dtype=D64, generator=gen)
    base = jacobian_spectrum(block, x, bn=bn_mode).sv
    w0 = block[0].weight.detach().clone()
    for a in (0.1, 10.0, 1000.0):
        with torch.no_grad():
            block[0].weight.copy_(a * w0)
        torch.testing.assert_close(jacobian_spectrum(block, x, bn=bn_mode).sv, base)
    # without BN the spectrum scales with a
    with torch.no_grad():
        block[0].weight.copy_(10 * w0)
    scaled = jacobian_spectrum(block[0], x).sv
    torch.testing.assert_close(
        scaled, 10 * torch.linalg.svdvals(w0).expand(16, -1), rtol=1e-10, atol=0
    )


# ----------------------------------------------------------------------------- side effects
def _state(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "rng": torch.get_rng_state(),
        "hooks": _hooks(model),
    }


def _hooks(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Forward pre-hooks and forward hooks per module."""
    return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}


def _assert_same_state(before: dict, after: dict) -> None:
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    assert torch.equal(before["rng"], after["rng"])
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys()
        for n in before[key]:
            assert torch.equal(before[key][n], after[key][n]), (key, n)
    assert before["grads"].keys() == after["grads"].keys()
    for n, g in before["grads"].items():
        assert (g is None) == (after["grads"][n] is None)


class Noise(nn.Module):
    """Draws from the global RNG in every forward (without changing the map)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.0 * torch.rand(x.shape[-1], dtype=x.dtype)


class Counter(nn.Module):
    """Counts its calls in a buffer: an in-place update torch.func refuses under transforms."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def _mixed_model() -> nn.Sequential:
    model = nn.Sequential(
        Noise(),
        nn.Linear(6, 8),
        nn.BatchNorm1d(8),
        nn.Dropout(0.5),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8, momentum=None),
        nn.RReLU(),
        nn.Linear(8, 3),
    ).double()
    model.train()
    model[5].eval()  # a mix of modes must survive as it is
    return model


# functorch has no batching rule for rrelu's backward and says so (RReLU runs in eval mode here)
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("bn_mode", ["fixed", "full"])
@pytest.mark.parametrize("method", ["exact", "matrix_free"])
def test_no_side_effects(bn_mode: str, method: str) -> None:
    gen = seeded(18)
    model = _mixed_model()
    x = torch.randn(5, 6, dtype=D64, generator=gen)
    torch.manual_seed(123)
    before = _state(model)
    res = jacobian_spectrum(model, x, k=2, method=method, bn=bn_mode, which="both")
    assert torch.isfinite(res.sv).all()
    _assert_same_state(before, _state(model))
    seg = segment(model, "2:input", "8:input", x)
    _assert_same_state(before, _state(model))
    jacobian_spectrum(seg, seg.inputs, bn=bn_mode)
    _assert_same_state(before, _state(model))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_no_side_effects_when_the_computation_raises() -> None:
    gen = seeded(19)
    model = _mixed_model()
    x = torch.randn(5, 6, dtype=D64, generator=gen)
    before = _state(model)
    with pytest.raises(ValueError, match=r"k=9 is out of range"):
        jacobian_spectrum(model, x, k=9)
    _assert_same_state(before, _state(model))
    # a module updating a buffer in forward: the first (untransformed) pass increments it,
    # then torch.func refuses the in-place update; the buffer is restored all the same
    model = nn.Sequential(Counter(), _mixed_model())
    before = _state(model)
    with pytest.raises(RuntimeError, match=r"modifies a tensor in place"):
        jacobian_spectrum(model, x)
    _assert_same_state(before, _state(model))


def test_dropout_is_evaluated_as_identity() -> None:
    gen = seeded(20)
    model = nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.9), nn.Tanh()).double().train()
    x = torch.randn(4, 5, dtype=D64, generator=gen)
    ref = jacobian_spectrum(nn.Sequential(model[0], model[2]), x).sv
    torch.testing.assert_close(jacobian_spectrum(model, x).sv, ref)


# ----------------------------------------------------------------------------- blocks
def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(5, 7),
        nn.BatchNorm1d(7),
        nn.Tanh(),
        nn.Linear(7, 6),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).double()


@pytest.mark.parametrize("bn_mode", ["fixed", "full"])
def test_segment_equals_the_sequential_slice(bn_mode: str) -> None:
    gen = seeded(21)
    model = _mlp().train()
    x = torch.randn(9, 5, dtype=D64, generator=gen)
    seg = segment(model, "1:input", "4:input", x)
    with torch.no_grad():
        h = model[0](x)
    torch.testing.assert_close(seg.inputs, h)
    got = jacobian_spectrum(seg, seg.inputs, bn=bn_mode).sv
    ref = jacobian_spectrum(model[1:4], h, bn=bn_mode).sv
    torch.testing.assert_close(got, ref)
    # the same map named by outputs, and up to the model's output
    seg2 = segment(model, "0:output", "3:output", x)
    torch.testing.assert_close(jacobian_spectrum(seg2, seg2.inputs, bn=bn_mode).sv, ref)
    seg3 = segment(model, "1:input", "6:output", x)
    ref3 = jacobian_spectrum(model[1:], h, bn=bn_mode).sv
    torch.testing.assert_close(jacobian_spectrum(seg3, seg3.inputs, bn=bn_mode).sv, ref3)


def _inplace_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 3, 1),
        nn.BatchNorm2d(3),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 5),
    ).double()


@pytest.mark.parametrize("bn_mode", ["fixed", "full"])
def test_segment_from_the_input_of_an_inplace_module(bn_mode: str) -> None:
    """From '2:input' (the input of ReLU(inplace=True)) to the output: the tensor at the site
    is the BN output (not overwritten by the ReLU), and the spectrum is that of a hand-written
    copy of the maths (dense autograd Jacobian, numpy SVD); the caller's tensor is untouched."""
    gen = seeded(25)
    model = _inplace_cnn().train()
    x = torch.randn(4, 2, 5, 5, dtype=D64, generator=gen)
    seg = segment(model, "2:input", "8:output", x)
    c0, bn1, c3, bn4, lin = model[0], model[1], model[3], model[4], model[8]
    with torch.no_grad():
        h0 = F.batch_norm(c0(x), None, None, bn1.weight, bn1.bias, True, 0.0, bn1.eps)
    torch.testing.assert_close(seg.inputs, h0)
    assert bool((h0 < 0).any())  # the ReLU has something to overwrite

    def rest(h: torch.Tensor, stats=None) -> torch.Tensor:  # [B, 4, 5, 5] -> [B, 5]
        z = c3(F.relu(h))
        mean, var = batch_stats(z) if stats is None else stats
        y = (z - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn4.eps)
        y = y * bn4.weight[:, None, None] + bn4.bias[:, None, None]
        return lin(F.relu(y).mean(dim=(2, 3)))

    if bn_mode == "fixed":
        with torch.no_grad():
            stats = batch_stats(c3(F.relu(h0)))
        ref = dense_sv(lambda hi: rest(hi[None], stats)[0], h0)
    else:
        J = torch.autograd.functional.jacobian(rest, h0).reshape(4, 5, 4, 100)
        ref = np.stack([np.linalg.svd(J[i, :, i].numpy(), compute_uv=False) for i in range(4)])
    inputs = seg.inputs
    kept = inputs.clone()
    assert_sv_close(jacobian_spectrum(seg, inputs, bn=bn_mode).sv, ref)
    res = jacobian_spectrum(seg, inputs, k=2, method="matrix_free", bn=bn_mode, tol=1e-10)
    assert_sv_close(res.sv, ref[:, :2], rtol=1e-8)
    assert torch.equal(inputs, kept)


def test_segment_leaves_no_hook_behind_also_when_its_forward_raises() -> None:
    gen = seeded(26)

    class Fail(nn.Module):
        armed = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.armed:
                raise KeyError("fail")
            return x

    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), Fail(), nn.Linear(7, 2))
    model = model.double().train()
    x = torch.randn(6, 5, dtype=D64, generator=gen)
    none = _hooks(model)
    assert set(none.values()) == {(0, 0)}
    seg = segment(model, "1:input", "4:input", x)
    assert _hooks(model) == none  # the forward was stopped at to_site by a hook's exception
    with pytest.raises(ValueError, match=r"has shape"):  # raised inside the substitution hook
        seg(torch.zeros(6, 3, dtype=D64))
    assert _hooks(model) == none
    model[3].armed = True  # the model raises after the substitution
    before = _state(model)
    with pytest.raises(KeyError, match="fail"):
        segment(model, "1:input", "4:input", x)
    _assert_same_state(before, _state(model))
    with pytest.raises(KeyError, match="fail"):
        jacobian_spectrum(seg, seg.inputs)  # with the BN hooks of bn="fixed"
    _assert_same_state(before, _state(model))


def test_segment_takes_other_inputs_from_the_example() -> None:
    """y = l2(tanh(h)) + h: from 'act:input' (h) to the output, the skip h is held fixed."""
    gen = seeded(22)

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.act, self.l2 = nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5)
            self.out = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.l1(x)
            return self.out(self.l2(self.act(h)) + h)

    m = Skip().double()
    x = torch.randn(3, 4, dtype=D64, generator=gen)
    seg = segment(m, "act:input", "out:input", x)
    h = seg.inputs
    ref = dense_sv(lambda hi: m.l2(torch.tanh(hi)), h)
    assert_sv_close(jacobian_spectrum(seg, h).sv, ref)


def test_segment_dtype_and_keyword_example() -> None:
    gen = seeded(23)

    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, *, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.b(torch.tanh(self.a(x) * scale))

    m = KW()
    x = torch.randn(4, 3, generator=gen)
    seg = segment(m, "a:output", "b:output", {"x": x, "scale": 2.0})
    res = jacobian_spectrum(seg, seg.inputs, dtype=D64)
    assert res.sv.dtype == D64 and m.a.weight.dtype == torch.float32
    b64 = copy.deepcopy(m.b).double()
    ref = dense_sv(lambda h: b64(torch.tanh(h * 2.0)), seg.inputs.double())
    assert_sv_close(res.sv, ref, rtol=1e-6)


def test_whole_and_module_blocks() -> None:
    gen = seeded(24)
    model = _mlp().eval()
    x = torch.randn(4, 5, dtype=D64, generator=gen)
    ref = dense_sv(lambda xi: model(xi.unsqueeze(0)).squeeze(0), x)
    assert_sv_close(jacobian_spectrum(whole(model), x).sv, ref)
    assert list(module_blocks(model, nn.Linear)) == ["0", "3", "6"]
    assert list(module_blocks(model, (nn.BatchNorm1d, nn.Tanh))) == ["1", "2", "4", "5"]
    assert list(module_blocks(model)) == [str(i) for i in range(7)]
    assert module_blocks(model, nn.Linear)["3"] is model[3]


# ----------------------------------------------------------------------------- summaries
def test_spectrum_summary_values() -> None:
    sv = torch.tensor([[2.0, 1.0, 0.5, 0.25], [1.0, 1.0, 1.0, 0.0]])
    s = spectrum_summary(sv)
    sq = sv.double() ** 2
    torch.testing.assert_close(s["mean_sq"], sq.mean(1))
    torch.testing.assert_close(s["var_sq"], sq.var(1, correction=0))
    torch.testing.assert_close(s["max"], torch.tensor([2.0, 1.0], dtype=D64))
    torch.testing.assert_close(s["min"], torch.tensor([0.25, 0.0], dtype=D64))
    torch.testing.assert_close(s["frac_near_one"], torch.tensor([0.75, 0.75], dtype=D64))
    assert s["log_std"][0].item() == pytest.approx(np.log([2, 1, 0.5, 0.25]).std())
    assert math.isnan(s["log_std"][1].item())
    assert spectrum_summary(sv[0])["max"].shape == ()


def test_spectrum_summary_rejects_partial_spectra() -> None:
    gen = seeded(25)
    x = torch.randn(2, 6, dtype=D64, generator=gen)
    part = jacobian_spectrum(nn.Linear(6, 6).double(), x, k=2)
    assert isinstance(part, JacobianSpectrum) and not part.complete
    with pytest.raises(ValueError, match=r"needs the whole spectrum"):
        spectrum_summary(part)
    with pytest.raises(TypeError, match=r"tensor or a JacobianSpectrum"):
        spectrum_summary([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"low < high"):
        spectrum_summary(torch.ones(3), near=(2.0, 0.5))


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments_raise_clear_errors() -> None:
    gen = seeded(26)
    lin = nn.Linear(6, 4).double()
    x = torch.randn(3, 6, dtype=D64, generator=gen)
    with pytest.raises(ValueError, match=r"k=5 is out of range.*4 x 6.*min\(4, 6\) = 4"):
        jacobian_spectrum(lin, x, k=5)
    with pytest.raises(ValueError, match=r"k=0 is out of range"):
        jacobian_spectrum(lin, x, k=0)
    with pytest.raises(TypeError, match=r"k must be an int"):
        jacobian_spectrum(lin, x, k=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"method='svd' is not valid.*'auto', 'exact'"):
        jacobian_spectrum(lin, x, method="svd")
    with pytest.raises(ValueError, match=r"which='top' is not valid.*'largest'"):
        jacobian_spectrum(lin, x, which="top")
    with pytest.raises(ValueError, match=r"bn='train' is not valid.*'fixed', 'full'"):
        jacobian_spectrum(lin, x, bn="train")
    with pytest.raises(ValueError, match=r"matrix_free.*pass k"):
        jacobian_spectrum(lin, x, method="matrix_free")
    with pytest.raises(TypeError, match=r"floating-point.*torch.int64"):
        jacobian_spectrum(lin, torch.ones(3, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"must be a torch.Tensor"):
        jacobian_spectrum(lin, [[1.0] * 6])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"B >= 1"):
        jacobian_spectrum(lin, torch.ones(0, 6, dtype=D64))
    with pytest.raises(TypeError, match=r"block must be an nn.Module or a callable"):
        jacobian_spectrum("linear", x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"keep the batch dimension"):
        jacobian_spectrum(lambda t: t.sum(0), x)
    with pytest.raises(TypeError, match=r"no floating-point tensor"):
        jacobian_spectrum(lambda t: None, x)
    with pytest.raises(ValueError, match=r"tol must be"):
        jacobian_spectrum(lin, x, k=1, tol=0)
    with pytest.raises(ValueError, match=r"maxiter must be"):
        jacobian_spectrum(lin, x, k=1, maxiter=0)


def test_bad_sites_and_blocks_raise_clear_errors() -> None:
    gen = seeded(27)
    model = _mlp()
    x = torch.randn(4, 5, dtype=D64, generator=gen)
    with pytest.raises(SiteSelectionError, match=r"No module named '9'"):
        segment(model, "9:input", "4:input", x)
    with pytest.raises(SiteSelectionError, match=r"Role 'inptu'"):
        segment(model, "1:inptu", "4:input", x)
    with pytest.raises(ValueError, match=r"has no role.*'1:input'"):
        segment(model, "1", "4:input", x)
    with pytest.raises(SiteSelectionError, match=r"matches 2 sites"):
        segment(model, "[14]:input", "5:input", x)
    with pytest.raises(ValueError, match=r"reached before from_site"):
        segment(model, "4:input", "1:input", x)
    with pytest.raises(TypeError, match=r"example must be"):
        segment(model, "1:input", "4:input", 3.0)  # type: ignore[arg-type]
    seg = segment(model, "1:input", "4:input", x)
    with pytest.raises(ValueError, match=r"shape"):
        jacobian_spectrum(seg, torch.randn(5, 7, dtype=D64))
    with pytest.raises(TypeError, match=r"nn.Module subclasses"):
        module_blocks(model, int)
    with pytest.raises(SiteSelectionError, match=r"No module of type.*Conv2d.*Types present"):
        module_blocks(model, nn.Conv2d)
    with pytest.raises(TypeError, match=r"model must be an nn.Module"):
        whole(lambda t: t)  # type: ignore[arg-type]


def test_auto_method_choice() -> None:
    gen = seeded(28)
    x = torch.randn(2, 600, generator=gen)
    lin = nn.Linear(600, 600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jacobian_spectrum(lin, x, k=3).method == "matrix_free"
    assert jacobian_spectrum(nn.Linear(600, 50), x, k=3).method == "exact"  # p = 50
    assert jacobian_spectrum(lin, x, k=150).method == "exact"  # a quarter of the spectrum
    assert jacobian_spectrum(lin, x, k=3, which="smallest").method == "exact"

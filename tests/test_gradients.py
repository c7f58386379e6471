"""Tests of icstools.functional.gradients: layers, gradient-based ICS, landscape probes, scale
invariance.

References are independent, naive implementations: deep copies of the model whose weights are
moved by hand under ``torch.no_grad`` and whose gradients come from plain ``loss.backward()``.
"""

from __future__ import annotations

import copy
import doctest

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import icstools.functional.gradients as gradients
from icstools.experiments import paper_mlp, small_cnn
from icstools.functional.gradients import (
    GradientICS,
    LandscapeProbe,
    ScaleInvariance,
    check_scale_invariance,
    gradient_ics,
    landscape_probe,
)
from icstools.functional.layers import Layer, parameter_layers

ce = F.cross_entropy


# ------------------------------------------------------------------------------------ models
def mlp(bn: bool, dropout: float = 0.0, seed: int = 0) -> nn.Sequential:
    """4 weight layers (+ BN layers): 6-8-8-8-3, sigmoid, optional BN before each sigmoid."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    d = 6
    for w in (8, 8, 8):
        mods.append(nn.Linear(d, w, bias=not bn))
        if bn:
            mods.append(nn.BatchNorm1d(w))
        mods.append(nn.Sigmoid())
        if dropout:
            mods.append(nn.Dropout(dropout))
        d = w
    mods.append(nn.Linear(d, 3))
    return nn.Sequential(*mods)


def layer_names(model: nn.Sequential) -> list[str]:
    """Hand-written layer order of a Sequential: the children that own parameters."""
    return [n for n, m in model.named_children() if len(list(m.parameters(recurse=False)))]


def batch(n: int = 16, d: int = 6, classes: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def take_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, steps: int = 3):
    """``steps`` optimizer steps; returns (W^t, W^{t+1}) of the last one; model left at W^t."""
    for _ in range(steps):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        ce(model(x), y).backward()
        opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    return before, after


# -------------------------------------------------------------------------- naive references
def flat_grad(model: nn.Module, names: list[str]) -> torch.Tensor:
    ps = dict(model.named_parameters())
    return torch.cat([ps[n].grad.reshape(-1) for n in names]).double()


def naive_ics(model, x, y, updated, order, seed=None):
    """Def. 2.1 by hand: copies of the model, layers < i set to W^{t+1}, plain backward."""
    params = {name: [n for n, _ in model.get_submodule(name).named_parameters(
        prefix=name, recurse=False)] for name in order}  # fmt: skip
    m = copy.deepcopy(model)
    if seed is not None:
        torch.manual_seed(seed)
    ce(m(x), y).backward()
    out = []
    for i, name in enumerate(order):
        g = flat_grad(m, params[name])
        mi = copy.deepcopy(model)
        with torch.no_grad():
            for before in order[:i]:
                for n in params[before]:
                    mi.get_parameter(n).copy_(updated[n])
        if seed is not None:
            torch.manual_seed(seed)
        ce(mi(x), y).backward()
        g2 = flat_grad(mi, params[name])
        cos = float(g @ g2 / (g.norm() * g2.norm()))
        out.append((float((g - g2).norm()), cos, float(g.norm()), float(g2.norm())))
    return np.array(out)  # [layer, (l2, cos, ‖G‖, ‖G'‖)]


def naive_landscape(model, x, y, etas, train=True):
    m = copy.deepcopy(model)
    m.train(train)
    loss = ce(m(x), y)
    loss.backward()
    g = [p.grad.detach().clone() for p in m.parameters()]
    gflat = torch.cat([t.reshape(-1) for t in g]).double()
    losses, diffs = [], []
    for eta in etas:
        mi = copy.deepcopy(model)
        mi.train(train)
        with torch.no_grad():
            for p, gp in zip(mi.parameters(), g, strict=True):
                p -= eta * gp
        li = ce(mi(x), y)
        li.backward()
        gi = torch.cat([p.grad.reshape(-1) for p in mi.parameters()]).double()
        losses.append(float(li.detach()))
        diffs.append(float((gi - gflat).norm()))
    return float(loss.detach()), np.array(losses), np.array(diffs), float(gflat.norm())


# ------------------------------------------------------------------------------ side effects
def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: (p.detach().clone(), p._version) for n, p in model.named_parameters()},
        "buffers": {n: (b.clone(), b._version) for n, b in model.named_buffers()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    after = snapshot(model)
    for n, (v, version) in snap["params"].items():
        assert torch.equal(after["params"][n][0], v), n
        assert after["params"][n][1] == version, f"{n} was written in place"
    for n, (v, version) in snap["buffers"].items():
        assert torch.equal(after["buffers"][n][0], v), n
        assert after["buffers"][n][1] == version, f"buffer {n} was written in place"
    for n, g in snap["grads"].items():
        if g is None:
            assert after["grads"][n] is None, n
        else:
            assert torch.equal(after["grads"][n], g), n
    assert after["modes"] == snap["modes"]
    assert torch.equal(after["rng"], snap["rng"])


# ------------------------------------------------------------------------------------ layers
class Reordered(nn.Module):
    """Modules defined in an order unlike the execution order; ``shared`` called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.shared = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.stem = nn.Linear(3, 4)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # metadata reads are no use of the head's parameters
        assert self.head.weight.dtype == x.dtype and self.head.weight.size(1) == 4
        h = self.shared(self.frozen(self.stem(x)))
        h = self.shared(torch.sigmoid(h)) * self.scale
        h, _ = self.mha(h[:, None], h[:, None], h[:, None])
        return self.head(h[:, 0])


def test_parameter_layers_paper_mlp_and_cnn():
    got = parameter_layers(paper_mlp(bn=True), torch.rand(8, 784))
    assert [x.name for x in got] == ["0", "1", "3", "4", "6", "7", "9"]
    assert got[1] == Layer("1", "BatchNorm1d", ("1.weight", "1.bias"))
    assert got[0].params == ("0.weight",)  # bias-free before BN
    cnn = parameter_layers(small_cnn(channels=(2, 3), in_channels=1), torch.rand(4, 1, 8, 8))
    assert [(x.name, x.kind) for x in cnn] == [
        ("0", "Conv2d"),
        ("1", "BatchNorm2d"),
        ("3", "Conv2d"),
        ("4", "BatchNorm2d"),
        ("8", "Linear"),
    ]


def test_parameter_layers_execution_order_not_definition_order():
    model, x = Reordered(), torch.rand(5, 3)
    snap = snapshot(model)
    got = parameter_layers(model, x)
    assert_unchanged(model, snap)
    # first use: stem, then shared (its 2nd call does not count again), scale (owned by the
    # model itself, name ""), mha (out_proj is used through mha's functional call), head
    assert [x.name for x in got] == ["stem", "shared", "", "mha", "mha.out_proj", "head"]
    assert got[2].params == ("scale",)
    assert set(got[3].params) == {"mha.in_proj_weight", "mha.in_proj_bias"}
    names = {n for x in got for n in x.params}
    assert not any(n.startswith(("frozen", "unused")) for n in names)


def test_parameter_layers_kwargs_and_bad_inputs():
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x, *, first_b=False):
            return self.a(self.b(x)) if first_b else self.b(self.a(x))

    m, x = KW(), torch.rand(3, 2)
    assert [y.name for y in parameter_layers(m, {"x": x})] == ["a", "b"]
    assert [y.name for y in parameter_layers(m, {"x": x, "first_b": True})] == ["b", "a"]
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        parameter_layers(lambda t: t, x)
    with pytest.raises(TypeError, match="inputs must be a tensor"):
        parameter_layers(m, 3.0)


# --------------------------------------------------------------------------------------- ICS
def adam(model):
    return torch.optim.Adam(model.parameters(), lr=0.05)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("make_opt", [sgd, adam], ids=["sgd", "adam"])
def test_ics_matches_naive(bn, make_opt):
    model = mlp(bn)
    x, y = batch()
    before, after = take_step(model, make_opt(model), x, y)
    order = layer_names(model)
    ref = naive_ics(model, x, y, after, order)
    got = gradient_ics(model, ce, x, y, after)
    assert isinstance(got, GradientICS)
    assert list(got.layers) == order and len(order) == (7 if bn else 4)
    np.testing.assert_allclose(got.ics_l2, ref[:, 0], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.ics_cos, ref[:, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.grad_norm, ref[:, 2], rtol=1e-5)
    np.testing.assert_allclose(got.grad_norm_updated, ref[:, 3], rtol=1e-5)
    assert got.loss == pytest.approx(float(ce(model(x), y).detach()), rel=1e-6)
    assert got.ics_l2[0] == 0.0 and got.ics_cos[0] == 1.0
    assert np.all(got.ics_l2[1:] > 0)  # the step did move the earlier layers
    # the same from the post-step state (model at W^{t+1}) with current=W^t
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(after[n])
    post = gradient_ics(model, ce, x, y, after, current=before)
    np.testing.assert_allclose(post.ics_l2, got.ics_l2, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(post.ics_cos, got.ics_cos, rtol=1e-9)


def test_ics_cnn_matches_naive():
    torch.manual_seed(0)
    model = small_cnn(channels=(2, 3), in_channels=1, classes=3)  # in-place ReLU, BN2d
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 1, 6, 6, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    _, after = take_step(model, sgd(model), x, y)
    ref = naive_ics(model, x, y, after, ["0", "1", "3", "4", "8"])
    got = gradient_ics(model, ce, x, y, after, layers=parameter_layers(model, x))
    np.testing.assert_allclose(got.ics_l2, ref[:, 0], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.ics_cos, ref[:, 1], rtol=1e-5, atol=1e-6)


def test_ics_with_dropout_uses_one_mask_and_matches_naive():
    model = mlp(bn=True, dropout=0.5)
    x, y = batch()
    before, after = take_step(model, sgd(model), x, y)
    torch.manual_seed(123)
    got = gradient_ics(model, ce, x, y, after)
    ref = naive_ics(model, x, y, after, layer_names(model), seed=123)
    np.testing.assert_allclose(got.ics_l2, ref[:, 0], rtol=1e-4, atol=1e-7)
    # a zero step (W^{t+1} = W^t): G' = G in every layer only if every forward draws the
    # same dropout masks
    zero = gradient_ics(model, ce, x, y, before)
    assert zero.ics_l2[0] == 0.0 and zero.ics_cos[0] == 1.0
    np.testing.assert_allclose(zero.ics_l2, 0.0, atol=1e-7 * zero.grad_norm.max())
    np.testing.assert_allclose(zero.ics_cos, 1.0, atol=1e-6)
    np.testing.assert_allclose(zero.grad_norm_updated, zero.grad_norm, rtol=1e-6)


def test_ics_single_layer_is_zero():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    x, y = batch()
    _, after = take_step(model, sgd(model), x, y)
    got = gradient_ics(model, ce, x, y, after)
    assert got.layers == ("",)
    assert got.ics_l2.tolist() == [0.0] and got.ics_cos.tolist() == [1.0]
    assert got.grad_norm[0] == got.grad_norm_updated[0] > 0


def test_ics_selected_layers_keep_others_at_current():
    """Given layers: parameters in none of them stay at W^t (here BN's γ, β)."""
    model = mlp(bn=True)
    x, y = batch()
    _, after = take_step(model, sgd(model), x, y)
    linear = [layer for layer in parameter_layers(model, x) if layer.kind == "Linear"]
    got = gradient_ics(model, ce, x, y, after, layers=linear)
    assert got.layers == ("0", "3", "6", "9")
    # naive: only Linear weights updated, BN parameters left at W^t
    partial = {n: after[n] for layer in linear for n in layer.params}
    ref = naive_ics(model, x, y, partial, ["0", "3", "6", "9"])
    np.testing.assert_allclose(got.ics_l2, ref[:, 0], rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------- landscape
@pytest.mark.parametrize("bn", [False, True])
def test_landscape_matches_naive(bn):
    model = mlp(bn)
    x, y = batch()
    take_step(model, sgd(model), x, y)
    mult = (0.25, 0.5, 1.0, 2.0, 4.0)
    loss, losses, diffs, gnorm = naive_landscape(model, x, y, [m * 0.3 for m in mult])
    got = landscape_probe(model, ce, x, y, lr=0.3, multipliers=mult)
    assert isinstance(got, LandscapeProbe)
    np.testing.assert_allclose(got.step_sizes, np.array(mult) * 0.3)
    assert got.loss == pytest.approx(loss, rel=1e-6)
    assert got.grad_norm == pytest.approx(gnorm, rel=1e-6)
    np.testing.assert_allclose(got.losses, losses, rtol=1e-5)
    np.testing.assert_allclose(got.grad_diff, diffs, rtol=1e-4, atol=1e-7)
    beta = diffs / (np.array(mult) * 0.3 * gnorm)
    np.testing.assert_allclose(got.beta, beta, rtol=1e-4)
    assert got.beta_smoothness == pytest.approx(beta.max(), rel=1e-4)
    assert got.loss_variation == pytest.approx(losses.max() - losses.min(), rel=1e-4, abs=1e-6)
    # the gradient given (e.g. the .grad of the training backward) gives the same probe
    m2 = copy.deepcopy(model)
    ce(m2(x), y).backward()
    given = {n: p.grad for n, p in m2.named_parameters()}
    again = landscape_probe(model, ce, x, y, lr=0.3, multipliers=mult, grad=given)
    np.testing.assert_allclose(again.losses, got.losses, rtol=1e-6)
    np.testing.assert_allclose(again.grad_diff, got.grad_diff, rtol=1e-4, atol=1e-7)


def test_landscape_bn_runs_in_train_mode_unless_asked():
    model = mlp(bn=True)
    x, y = batch()
    take_step(model, sgd(model), x, y)  # running statistics differ from batch statistics
    model.eval()
    snap = snapshot(model)
    train_ref = naive_landscape(model, x, y, [0.1, 0.2], train=True)
    eval_ref = naive_landscape(model, x, y, [0.1, 0.2], train=False)
    assert abs(train_ref[0] - eval_ref[0]) > 1e-3  # the two modes measure different losses
    got = landscape_probe(model, ce, x, y, lr=0.1, multipliers=(1, 2))
    assert got.loss == pytest.approx(train_ref[0], rel=1e-6)
    np.testing.assert_allclose(got.losses, train_ref[1], rtol=1e-5)
    as_is = landscape_probe(model, ce, x, y, lr=0.1, multipliers=(1, 2), train=False)
    np.testing.assert_allclose(as_is.losses, eval_ref[1], rtol=1e-5)
    assert_unchanged(model, snap)  # modes restored to eval


# -------------------------------------------------------------------------- scale invariance
@pytest.mark.parametrize(
    ("linear", "bn", "shape"),
    [
        (lambda: nn.Linear(20, 12), lambda eps: nn.BatchNorm1d(12, eps=eps), (32, 20)),
        (lambda: nn.Conv2d(3, 5, 3), lambda eps: nn.BatchNorm2d(5, eps=eps), (4, 3, 7, 7)),
        (  # no bias (as in the paper), γ and β not at their defaults
            lambda: nn.Linear(20, 12, bias=False),
            lambda eps: nn.BatchNorm1d(12, eps=eps),
            (32, 20),
        ),
    ],
    ids=["linear", "conv", "linear_nobias"],
)
def test_scale_invariance_identities_hold(linear, bn, shape):
    torch.manual_seed(0)
    lin, norm, u = linear(), bn(1e-30), torch.randn(shape)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    snap = {**snapshot(lin), "bn": snapshot(norm)}
    r = check_scale_invariance(lin, norm, u, dtype=torch.float64)
    assert isinstance(r, ScaleInvariance)
    np.testing.assert_array_equal(r.scales, [0.1, 10.0, 1000.0])
    # float64 with a negligible ε: only rounding remains (a few ulps times the condition)
    for field in (r.output, r.input_grad, r.weight_grad):
        assert field.shape == (3,) and np.all(field < 1e-12), field
    np.testing.assert_array_equal(r.eps_effect, 0.0)
    assert_unchanged(lin, snap)
    assert_unchanged(norm, snap["bn"])
    # a custom loss, and float32: rounding ~1e-7 relative
    r32 = check_scale_invariance(lin, norm, u, loss=lambda t: (t.sigmoid() ** 2).mean())
    for field in (r32.output, r32.input_grad, r32.weight_grad):
        assert np.all(field < 1e-5), field


def test_scale_invariance_epsilon_effect_is_what_epsilon_predicts():
    """With ε > 0, scaling x by a turns ε into ε/a²: unit k is multiplied by
    r_k = sqrt((σ_k²+ε)/(σ_k²+ε/a²)). With β = 0 the output error is a norm-weighted mean of
    |r_k − 1|, so it lies between min_k and max_k |r_k − 1| (= eps_effect)."""
    torch.manual_seed(0)
    lin, u = nn.Linear(10, 6, bias=False), torch.randn(64, 10)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 0, 6)[:, None])  # small-variance units: ε matters
    eps = 1e-4
    r = check_scale_invariance(lin, nn.BatchNorm1d(6, eps=eps), u, dtype=torch.float64)
    x = (u.double() @ lin.weight.detach().double().T).var(0, unbiased=False).numpy()  # [6] σ_k²
    for a, out, eff in zip(r.scales, r.output, r.eps_effect, strict=True):
        rk = np.abs(np.sqrt((x + eps) / (x + eps / a**2)) - 1)
        assert eff == pytest.approx(rk.max(), rel=1e-9)
        assert rk.min() * (1 - 1e-6) <= out <= rk.max() * (1 + 1e-6)
    assert r.output[0] > 1e-2  # a = 0.1: ε/a² = 100 ε dominates the smallest unit
    # the gradients change by the same mechanism: 1/s by r_k, the projection by r_k²
    assert np.all(r.input_grad <= 4 * r.eps_effect) and np.all(r.weight_grad <= 4 * r.eps_effect)


# ------------------------------------------------------------------------------ side effects
def test_no_side_effects_anywhere():
    model = mlp(bn=True, dropout=0.3)
    x, y = batch()
    before, after = take_step(model, sgd(model), x, y)
    ce(model(x), y).backward()  # leave .grad set ...
    model[0].weight.grad = None  # ... except on one parameter
    model[3].eval()  # mixed modes: one Dropout in eval mode
    torch.manual_seed(7)
    snap = snapshot(model)
    expected_next = torch.rand(3)
    torch.set_rng_state(snap["rng"])

    layers = parameter_layers(model, x)
    assert_unchanged(model, snap)
    gradient_ics(model, ce, x, y, after, layers=layers)
    assert_unchanged(model, snap)
    gradient_ics(model, ce, x, y, before, current=after, train=False)
    assert_unchanged(model, snap)
    landscape_probe(model, ce, x, y, lr=0.1)
    assert_unchanged(model, snap)
    with torch.no_grad():  # as from an optimizer-step hook: gradients still computed
        r = landscape_probe(model, ce, x, y, lr=0.1, grad={n: None for n in before})
        ics = gradient_ics(model, ce, x, y, after)
        parameter_layers(model, x)
        assert not torch.is_grad_enabled()  # the caller's grad mode is back
    assert np.all(np.isfinite(r.losses)) and np.all(ics.grad_norm > 0)
    assert_unchanged(model, snap)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream goes on


def test_errors_leave_no_side_effects():
    model = mlp(bn=True)
    model.eval()
    x, y = batch()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="scalar"):
        no_reduction = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731
        gradient_ics(model, no_reduction, x, y, dict(model.named_parameters()))
    with pytest.raises(RuntimeError):
        landscape_probe(model, ce, x[:, :3], y, lr=0.1)  # the model's own error
    assert_unchanged(model, snap)


# -------------------------------------------------------------------------------- divergence
def test_diverged_model_gives_nonfinite_results_not_errors():
    model = mlp(bn=False)
    x, y = batch()
    _, after = take_step(model, sgd(model), x, y)
    with torch.no_grad():
        model[-1].weight.fill_(1e38)
        model[-1].weight[0].fill_(-1e38)
    after = {n: v * 1e30 for n, v in after.items()}
    ics = gradient_ics(model, ce, x, y, after)
    assert not np.isfinite(ics.loss)
    assert not np.all(np.isfinite(ics.ics_l2)) or not np.all(np.isfinite(ics.ics_cos))
    probe = landscape_probe(model, ce, x, y, lr=0.1)
    assert not np.isfinite(probe.loss)
    assert not np.isfinite(probe.loss_variation) and not np.isfinite(probe.beta_smoothness)
    # NaN inputs propagate the same way
    bn_model = mlp(bn=True)
    bn_after = {n: p.detach() + 0.1 for n, p in bn_model.named_parameters()}
    nan_ics = gradient_ics(bn_model, ce, torch.full_like(x, np.nan), y, bn_after)
    assert np.all(np.isnan(nan_ics.ics_cos))


# ------------------------------------------------------------------------------- bad inputs
def test_bad_arguments():
    model = mlp(bn=False)
    x, y = batch()
    _, after = take_step(model, sgd(model), x, y)
    with pytest.raises(TypeError, match="model must be"):
        gradient_ics("model", ce, x, y, after)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        gradient_ics(model, "ce", x, y, after)
    with pytest.raises(TypeError, match="inputs must be"):
        gradient_ics(model, ce, x.numpy(), y, after)
    with pytest.raises(TypeError, match="updated must be a mapping"):
        gradient_ics(model, ce, x, y, list(after.values()))
    with pytest.raises(ValueError, match=r"not parameters of the model: \['nope'\]"):
        gradient_ics(model, ce, x, y, {**after, "nope": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"updated lacks parameters \['0.weight'\]"):
        gradient_ics(model, ce, x, y, {k: v for k, v in after.items() if k != "0.weight"})
    # the last layer's update is never used, so it may be left out
    gradient_ics(model, ce, x, y, {k: v for k, v in after.items() if not k.startswith("6.")})
    with pytest.raises(ValueError, match=r"updated\['0.weight'\] has shape \(2,\)"):
        gradient_ics(model, ce, x, y, {**after, "0.weight": torch.zeros(2)})
    with pytest.raises(TypeError, match=r"current\['0.bias'\] must be a tensor"):
        gradient_ics(model, ce, x, y, after, current={"0.bias": 1.0})
    with pytest.raises(TypeError, match="layers must be None or a sequence of Layer"):
        gradient_ics(model, ce, x, y, after, layers="0")
    with pytest.raises(ValueError, match="in more than one layer"):
        gradient_ics(model, ce, x, y, after, layers=[Layer("0", "Linear", ("0.bias",))] * 2)
    with pytest.raises(ValueError, match="no layer"):
        frozen = copy.deepcopy(model).requires_grad_(False)
        gradient_ics(frozen, ce, x, y, after)
    with pytest.raises(TypeError, match="must return a tensor"):
        gradient_ics(model, lambda o, t: 1.0, x, y, after)
    with pytest.raises(TypeError, match="train must be a bool"):
        gradient_ics(model, ce, x, y, after, train="yes")

    for lr in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr must be finite and > 0"):
            landscape_probe(model, ce, x, y, lr=lr)
    with pytest.raises(TypeError, match="lr must be a number"):
        landscape_probe(model, ce, x, y, lr="0.1")
    for mult in ((), (0.5, -1.0), (1.0, float("nan")), [[1.0]]):
        with pytest.raises(ValueError, match="multipliers must be a non-empty"):
            landscape_probe(model, ce, x, y, lr=0.1, multipliers=mult)
    with pytest.raises(TypeError, match="multipliers must be a sequence of numbers"):
        landscape_probe(model, ce, x, y, lr=0.1, multipliers=("a",))
    with pytest.raises(ValueError, match="grad lacks parameters"):
        landscape_probe(model, ce, x, y, lr=0.1, grad={"0.weight": None})

    lin, bn, u = nn.Linear(4, 3), nn.BatchNorm1d(3), torch.randn(8, 4)
    with pytest.raises(TypeError, match="linear must be a module with a weight"):
        check_scale_invariance(nn.ReLU(), bn, u)
    with pytest.raises(TypeError, match="bn must be a BatchNorm module"):
        check_scale_invariance(lin, nn.LayerNorm(3), u)
    with pytest.raises(TypeError, match="inputs must be a floating-point tensor"):
        check_scale_invariance(lin, bn, u.long())
    with pytest.raises(ValueError, match="at least 2 examples"):
        check_scale_invariance(lin, bn, u[:1])
    with pytest.raises(ValueError, match=r"must equal bn\.num_features = 5"):
        check_scale_invariance(lin, nn.BatchNorm1d(5), u)
    for scales in ((), (0.0,), (-1.0, 2.0), (float("inf"),)):
        with pytest.raises(ValueError, match="scales must be a non-empty"):
            check_scale_invariance(lin, bn, u, scales=scales)
    with pytest.raises(TypeError, match="dtype must be a floating"):
        check_scale_invariance(lin, bn, u, dtype=torch.int64)
    with pytest.raises(TypeError, match="loss must be callable"):
        check_scale_invariance(lin, bn, u, loss=3)


def test_docstring_examples():
    result = doctest.testmod(
        gradients, extraglobs={"torch": torch, "nn": nn}, optionflags=doctest.ELLIPSIS
    )
    assert result.attempted > 10 and result.failed == 0

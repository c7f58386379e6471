"""Tests of the recorder's backward half (gradients=True): activation gradients, parameter
dynamics, AMP, against gradients and updates read by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from icstools import Recorder, RecorderError
from icstools.experiments import paper_mlp


class Twice(nn.Module):
    """A shared layer called twice, an in-place ReLU after a site, and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.act(self.shared(h)) + h  # residual
        h = self.act(self.shared(h))
        return self.out(h)


def _naive_site_grads(model, x, y, names):
    """dL/d(site input) by hand: a clone of the model whose modules retain their inputs' grads
    (in-place ReLUs replaced by out-of-place ones, which have the same gradient)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def keep(n):
        def pre(mod, args):
            t = args[0]
            t.retain_grad()
            kept[n].append(t)

        return pre

    hs = [m.get_submodule(n).register_forward_pre_hook(keep(n)) for n in names]
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    for h in hs:
        h.remove()
    for n in names:
        grads[n] = [t.grad.detach().clone() for t in kept[n]]
    return grads


def test_activation_gradients_with_inplace_relu_residual_and_module_called_twice():
    torch.manual_seed(0)
    model = Twice()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    names = ["shared", "act", "out"]
    want = _naive_site_grads(model, x, y, names)
    rec = Recorder(model, names, role="input", every=1, gradients="activations", calls="pool")
    with rec:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    ds = rec.to_dataset()
    assert int(ds.calls.sel(source="train", site="shared:input", step=0)) == 2
    for n in names:
        g = torch.cat(want[n]).double().numpy()  # both calls pooled: [calls * 16, 6]
        site = f"{n}:input"
        np.testing.assert_allclose(
            float(ds.grad_norm.sel(step=0, site=site)), np.linalg.norm(g), rtol=1e-6
        )
        sel = ds.sel(step=0).where(ds.unit_site == site, drop=True)
        np.testing.assert_allclose(sel.grad_unit_norm, np.sqrt((g**2).sum(0)), rtol=1e-5)
        np.testing.assert_allclose(sel.grad_mean, g.mean(0), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(sel.grad_var, g.var(0), rtol=1e-5, atol=1e-12)


def test_site_tensor_without_gradient_gives_nan_not_an_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    rec = Recorder(model, "0", role="input", every=1, gradients="activations")  # data: no grad
    with rec:
        model(torch.randn(8, 3)).sum().backward()
    ds = rec.to_dataset()
    assert np.isnan(ds.grad_norm.values).all()


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_parameter_dynamics_equal_a_manual_before_after_comparison(kind):
    torch.manual_seed(1)
    model = paper_mlp(bn=True, widths=(12, 8))
    opt = OPTIMIZERS[kind](model.parameters())
    rec = Recorder(model, every=2, optimizer=opt, gradients=True)
    gen = torch.Generator().manual_seed(2)
    manual = []
    with rec:
        for step in range(5):
            x, y = torch.rand(20, 784, generator=gen), torch.randint(0, 10, (20,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            grads = {n: p.grad.norm().item() for n, p in model.named_parameters()}
            opt.step()
            if step % 2 == 0:
                manual.append(
                    (before, grads, {n: p.detach().clone() for n, p in model.named_parameters()})
                )
    ds = rec.to_dataset()
    assert ds.step.values.tolist() == [0, 2, 4]
    names = list(ds.param.values)
    assert names == [n for n, _ in model.named_parameters()]
    for i, (before, grads, after) in enumerate(manual):
        r = ds.isel(step=i)
        for n in names:
            w0 = before[n].double()
            upd = (after[n].double() - w0).norm().item()
            p = r.sel(param=n)
            assert float(p.param_grad_norm) == pytest.approx(grads[n], rel=1e-6)
            assert float(p.param_norm) == pytest.approx(w0.norm().item(), rel=1e-6)
            assert float(p.update_norm) == pytest.approx(upd, rel=1e-5, abs=1e-12)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.float64(upd) / np.float64(w0.norm().item())  # inf/NaN at zero init
            np.testing.assert_allclose(float(p.update_ratio), ratio, rtol=1e-5)
    # weights followed by BatchNorm: eff_lr = lr / |w|^2; others NaN
    normalized = dict(zip(names, ds.param_normalized.values.tolist(), strict=True))
    assert [n for n in names if normalized[n]] == ["0.weight", "3.weight"]  # Linear -> BN
    lr = opt.param_groups[0]["lr"]
    w = manual[0][0]["3.weight"].double().norm().item()
    assert float(ds.eff_lr.isel(step=0).sel(param="3.weight")) == pytest.approx(lr / w**2)
    assert np.isnan(ds.eff_lr.sel(param=["1.weight", "6.weight"])).all()


def _train(model, steps, rec=None, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if rec is not None:
        rec.optimizer = opt
        rec.attach()
    try:
        for _ in range(steps):
            x, y = torch.rand(16, 784, generator=gen), torch.randint(0, 10, (16,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        if rec is not None:
            rec.detach()


def test_recording_gradients_never_changes_the_training_trajectory():
    torch.manual_seed(3)
    a = paper_mlp(bn=True, widths=(16, 16))
    b = copy.deepcopy(a)
    _train(a, 7)
    rec = Recorder(b, every=1, gradients=True, probe=torch.rand(10, 784))
    _train(b, 7, rec)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    assert rec.to_dataset().sizes["step"] == 7


def test_amp_gradients_are_unscaled_and_skipped_steps_are_marked():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(10, 6, generator=gen), torch.randint(0, 2, (10,), generator=gen))]
    batches = batches * 4
    # scaler: the first iteration of step 1 has an inf gradient and is skipped
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    rec = Recorder(model, every=1, optimizer=opt, gradients=True, scaler=scaler)
    with rec:
        for i, (x, y) in enumerate(batches):
            loss = nn.functional.cross_entropy(model(x), y)
            if i == 1:
                loss = loss * float("inf")
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    ds = rec.to_dataset()
    assert ds.step.values.tolist() == [0, 1, 2]  # 4 iterations, 3 optimizer steps
    assert ds.skipped.values.tolist() == [0, 1, 0]
    # the same training without the scaler (and without the skipped iteration)
    opt2 = torch.optim.SGD(ref.parameters(), lr=0.1)
    rec2 = Recorder(ref, every=1, optimizer=opt2, gradients=True)
    with rec2:
        for i, (x, y) in enumerate(batches):
            if i == 1:
                continue
            loss = nn.functional.cross_entropy(ref(x), y)
            opt2.zero_grad()
            loss.backward()
            opt2.step()
    want = rec2.to_dataset()
    for name in ("grad_norm", "grad_unit_norm", "param_grad_norm", "update_norm"):
        np.testing.assert_allclose(ds[name].values, want[name].values, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(ds["mean"].values, want["mean"].values, rtol=1e-6)


# ----------------------------------------------------------------------- ICS and landscape
def _dropout_bn_mlp():
    torch.manual_seed(6)
    return nn.Sequential(
        nn.Linear(10, 12, bias=False),
        nn.BatchNorm1d(12),
        nn.Sigmoid(),
        nn.Dropout(0.2),
        nn.Linear(12, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )


def _loop(model, steps, rec=None, *, seed=7, opt_kind="sgd-momentum-wd"):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    opt = OPTIMIZERS[opt_kind](model.parameters())
    snapshots = []
    if rec is not None:
        rec.optimizer = opt
        rec.attach()
    try:
        for _ in range(steps):
            x, y = torch.randn(24, 10, generator=gen), torch.randint(0, 3, (24,), generator=gen)
            state = (copy.deepcopy(model), x, y, torch.get_rng_state())
            loss = nn.functional.cross_entropy(model(x), y)
            if rec is not None:
                rec.set_target(y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            snapshots.append((*state, {n: p.detach().clone() for n, p in model.named_parameters()}))
    finally:
        if rec is not None:
            rec.detach()
    return snapshots


def _naive_grad(model, x, y, rng):
    m = copy.deepcopy(model)  # own buffers: BN running stats of the original stay untouched
    torch.set_rng_state(rng)  # the training step's dropout mask
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def test_ics_and_landscape_recorded_equal_a_naive_implementation_and_training_is_unchanged():
    plain = _dropout_bn_mlp()
    rec_model = copy.deepcopy(plain)
    want = _loop(plain, 4)
    rec = Recorder(
        rec_model,
        every=1,
        ics=2,
        landscape=[1, 3].__contains__,
        loss_fn=nn.functional.cross_entropy,
        gradients=True,
        probe=torch.randn(16, 10),
    )
    _loop(rec_model, 4, rec)
    for (n, p), q in zip(plain.state_dict().items(), rec_model.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"training changed by recording: {n}"
    assert torch.equal(torch.get_rng_state(), _rng_after_plain_loop())
    ds = rec.to_dataset()
    layers = [str(v) for v in ds.layer.values]
    assert layers == ["0", "1", "4", "6"]  # execution order; BN's γ/β form a layer
    owned = {"0": ["0.weight"], "1": ["1.weight", "1.bias"], "4": ["4.weight", "4.bias"]}
    owned["6"] = ["6.weight", "6.bias"]
    for step in (0, 2):
        model, x, y, rng, after = want[step]
        _, g = _naive_grad(model, x, y, rng)
        for i, layer in enumerate(layers):
            moved = copy.deepcopy(model)
            with torch.no_grad():
                for earlier in layers[:i]:
                    for n in owned[earlier]:
                        moved.get_parameter(n).copy_(after[n])
            _, g2 = _naive_grad(moved, x, y, rng)
            a = torch.cat([g[n].reshape(-1) for n in owned[layer]]).double()
            b = torch.cat([g2[n].reshape(-1) for n in owned[layer]]).double()
            r = ds.sel(step=step, layer=layer)
            assert float(r.ics_l2) == pytest.approx((a - b).norm().item(), rel=1e-4, abs=1e-9)
            cos = (a @ b / (a.norm() * b.norm())).item()
            assert float(r.ics_cos) == pytest.approx(cos, rel=1e-6)
            assert float(r.ics_grad_norm) == pytest.approx(a.norm().item(), rel=1e-5)
    assert np.isnan(ds.ics_l2.sel(step=[1, 3])).all()
    lr = 0.05
    for step in (1, 3):
        model, x, y, rng, _ = want[step]
        _, g = _naive_grad(model, x, y, rng)
        flat_g = torch.cat([v.reshape(-1) for v in g.values()]).double()
        losses, diffs = [], []
        for m in ds.eta.values:
            moved = copy.deepcopy(model)
            with torch.no_grad():
                for n, p in moved.named_parameters():
                    p -= m * lr * g[n]
            loss2, g2 = _naive_grad(moved, x, y, rng)
            losses.append(loss2)
            diffs.append((torch.cat([v.reshape(-1) for v in g2.values()]).double() - flat_g).norm())
        r = ds.sel(step=step)
        np.testing.assert_allclose(r.landscape_loss, losses, rtol=1e-5)
        np.testing.assert_allclose(r.landscape_grad_diff, [d.item() for d in diffs], rtol=1e-4)
        assert float(r.loss_variation) == pytest.approx(max(losses) - min(losses), rel=1e-4)
        beta = max(
            d.item() / (m * lr * flat_g.norm().item())
            for d, m in zip(diffs, ds.eta.values, strict=True)
        )
        assert float(r.beta_smoothness) == pytest.approx(beta, rel=1e-4)


def _rng_after_plain_loop():
    _loop(_dropout_bn_mlp(), 4)
    return torch.get_rng_state()


def test_ics_needs_the_target_and_a_loss_function():
    model = _dropout_bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecorderError, match="loss_fn="):
        Recorder(model, optimizer=opt, ics=1)
    with pytest.raises(ValueError, match="landscape_multipliers must be finite numbers > 0"):
        Recorder(
            model,
            optimizer=opt,
            landscape=1,
            loss_fn=nn.functional.mse_loss,
            landscape_multipliers=[0.5, -1],
        )
    rec = Recorder(model, optimizer=opt, ics=1, loss_fn=nn.functional.cross_entropy)
    with rec, pytest.raises(RecorderError, match=r"call rec.set_target\(y\)"):
        x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

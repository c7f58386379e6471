"""Tests of Recorder(jacobian=...): spectra of the blocks between sites, on the probe."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from icstools import Recorder, RecorderError
from icstools.experiments import paper_mlp


def _train(model, steps, rec=None):
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    if rec is not None:
        rec.optimizer = opt
        rec.attach()
    try:
        for _ in range(steps):
            x, y = torch.rand(32, 784, generator=gen), torch.randint(0, 10, (32,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        if rec is not None:
            rec.detach()


def _dense_pooled_svs(f, inputs):
    """Per-example dense Jacobians by autograd + numpy SVD, pooled and sorted descending."""
    svs = []
    for i in range(inputs.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: f(v[None])[0], inputs[i])
        svs.append(np.linalg.svd(jac.numpy(), compute_uv=False))
    return np.sort(np.concatenate(svs))[::-1]


def _mlp(bn: bool) -> nn.Sequential:
    torch.manual_seed(1)
    return paper_mlp(bn=bn, widths=(12, 9, 7))


def test_spectra_of_segments_and_whole_network_equal_dense_svd_by_hand():
    model = _mlp(bn=False)
    probe = torch.rand(10, 784, generator=torch.Generator().manual_seed(2))
    rec = Recorder(model, every=1, probe=probe, jacobian=2, jacobian_examples=6)
    snapshots = {}

    def keep(step):  # a hook-free copy (deepcopy would copy the recorder's hooks too)
        snapshots[step] = _mlp(bn=False)
        snapshots[step].load_state_dict(model.state_dict())

    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    rec.optimizer = opt
    with rec:
        for step in range(3):
            keep(step)
            x, y = torch.rand(32, 784, generator=gen), torch.randint(0, 10, (32,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    ds = rec.to_dataset()
    names = ["1:input->3:input", "3:input->5:input", "input->output"]
    assert list(ds.block.values) == names
    assert ds.jac_sv.sel(step=1).isnull().all()  # not a jacobian step
    for step in (0, 2):
        m = snapshots[step].double()
        xs = probe[:6].double()
        h1 = m[0](xs)  # input of the first sigmoid
        blocks = {
            "1:input->3:input": (nn.Sequential(m[1], m[2]), h1),
            "3:input->5:input": (nn.Sequential(m[3], m[4]), m[2](m[1](h1))),  # → 3rd sigmoid
            "input->output": (m, xs),
        }
        for name, (f, inputs) in blocks.items():
            pooled = _dense_pooled_svs(f, inputs.detach())
            got = ds.jac_sv.sel(step=step, block=name).values
            np.testing.assert_allclose(got[: pooled.size], pooled, rtol=1e-4, atol=1e-7)
            assert np.isnan(got[pooled.size :]).all()
            r = ds.sel(step=step, block=name)
            sq = pooled**2
            assert float(r.jac_mean_sq) == pytest.approx(sq.mean(), rel=1e-4)
            assert float(r.jac_var_sq) == pytest.approx(sq.var(), rel=1e-3)
            assert float(r.jac_max) == pytest.approx(pooled.max(), rel=1e-4)
            assert float(r.jac_min) == pytest.approx(pooled.min(), rel=1e-3, abs=1e-7)
            near = ((pooled >= 0.5) & (pooled <= 2)).mean()
            assert float(r.jac_frac_near_one) == pytest.approx(near, abs=1e-12)


def test_spectra_recording_never_changes_training_and_hooks_stay_silent():
    a = _mlp(bn=True)
    b = copy.deepcopy(a)
    _train(a, 5)
    probe = torch.rand(16, 784, generator=torch.Generator().manual_seed(3))
    rec = Recorder(b, every=1, probe=probe, jacobian=1, jacobian_examples=8, gradients=True)
    _train(b, 5, rec)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"training changed by spectra: {n}"
    ds = rec.to_dataset()
    assert (ds.calls.values == 1).all(), "a site hook fired during a Jacobian probe"
    assert np.isfinite(ds.jac_mean_sq.values).all()
    # BN blocks (train-mode BN, statistics of the 8 examples held fixed): σ near 1 on average
    assert 0.1 < float(ds.jac_mean_sq.sel(block="2:input->5:input").mean()) < 10


def test_jacobian_options_are_checked():
    model = _mlp(bn=False)
    with pytest.raises(RecorderError, match="needs a probe"):
        Recorder(model, jacobian=1)
    probe = torch.rand(4, 784)
    with pytest.raises(ValueError, match="jacobian_bn must be"):
        Recorder(model, probe=probe, jacobian=1, jacobian_bn="batch")
    with pytest.raises(ValueError, match="jacobian_blocks must be 'segments'"):
        Recorder(model, probe=probe, jacobian=1, jacobian_blocks="all")
    with pytest.raises(ValueError, match="jacobian_examples must be ≥ 1"):
        Recorder(model, probe=probe, jacobian=1, jacobian_examples=0)

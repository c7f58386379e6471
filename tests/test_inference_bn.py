"""Algorithm 2 of Ioffe & Szegedy (2015): a trained BN network in eval mode is the paper's
inference network when its BN layers hold the population statistics of the training set.

The reference is computed by hand with numpy, in float64, from the trained weights: the §4.1
network's forward over every mini-batch of 60 training images with batch statistics, the mean
of the batch means ``E[x]`` and ``m/(m−1)`` times the mean of the batch variances ``Var[x]`` per
BN layer, and the inference network ``y = γ/√(Var+ε)·x + (β − γE/√(Var+ε))``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from icstools.experiments import paper_mlp, population_batchnorm, train
from icstools.experiments.training import _load

ROOT = Path(__file__).parents[1]
M = 60  # the paper's mini-batch size


@pytest.fixture(scope="module")
def trained():
    """The §4.1 BN network after 300 SGD steps on MNIST, and the training images."""
    data = os.environ.get("ICSTOOLS_DATA") or str(ROOT.parent / "shared" / "data")
    torch.manual_seed(0)
    model = paper_mlp(bn=True)
    train(model, 300, lr=1.0, data_dir=data)
    x_train, _ = _load("mnist", "train", data)
    x_test, y_test = _load("mnist", "test", data)
    return model, x_train, x_test, y_test, _numpy_population_stats(model, x_train)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _numpy_population_stats(model, x):
    """Per BN layer (E[x], m/(m−1) E_B[σ²_B], biased E_B[σ²_B]) over the batches of M, numpy."""
    layers = list(model)
    sums = {}
    for i in range(0, len(x) - M + 1, M):
        a = x[i : i + M].numpy().astype(np.float64)  # [m, 784]
        for k, mod in enumerate(layers):
            if isinstance(mod, nn.Linear):
                a = a @ mod.weight.detach().double().numpy().T
                if mod.bias is not None:
                    a = a + mod.bias.detach().double().numpy()
            elif isinstance(mod, nn.BatchNorm1d):
                mu, var = a.mean(0), a.var(0)  # batch statistics, biased (ddof=0)
                s = sums.setdefault(k, [0.0, 0.0, 0])
                s[0], s[1], s[2] = s[0] + mu, s[1] + var, s[2] + 1
                gamma, beta = (p.detach().double().numpy() for p in (mod.weight, mod.bias))
                a = gamma * (a - mu) / np.sqrt(var + mod.eps) + beta
            elif isinstance(mod, nn.Sigmoid):
                a = _sigmoid(a)
    return {k: (s[0] / s[2], M / (M - 1) * s[1] / s[2], s[1] / s[2]) for k, s in sums.items()}


def _numpy_inference(model, stats, x):
    """Algorithm 2's inference network: each BN a fixed affine map of its input."""
    a = x.numpy().astype(np.float64)
    for k, mod in enumerate(model):
        if isinstance(mod, nn.Linear):
            a = a @ mod.weight.detach().double().numpy().T
            if mod.bias is not None:
                a = a + mod.bias.detach().double().numpy()
        elif isinstance(mod, nn.BatchNorm1d):
            mean, var = stats[k][0], stats[k][1]
            gamma, beta = (p.detach().double().numpy() for p in (mod.weight, mod.bias))
            scale = gamma / np.sqrt(var + mod.eps)
            a = scale * a + (beta - scale * mean)
        elif isinstance(mod, nn.Sigmoid):
            a = _sigmoid(a)
    return a


def test_eval_mode_with_population_statistics_is_algorithm_2(trained):
    model, x_train, x_test, _, stats = trained
    assert sorted(stats) == [1, 4, 7]  # the three BatchNorm1d layers
    net = population_batchnorm(model, x_train, batch_size=M)
    for k, (mean, var, biased) in stats.items():
        bn = net[k]
        assert int(bn.num_batches_tracked) == len(x_train) // M
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-4)
        # the factor m/(m−1) = 1.017 is there: the biased average is 1.7% off
        assert not np.allclose(bn.running_var.double().numpy(), biased, rtol=1e-2)
    with torch.no_grad():
        got = net(x_test).double().numpy()
    want = _numpy_inference(model, stats, x_test)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the trained model itself is untouched (still in its own mode, own running averages)
    assert model.training and int(model[1].num_batches_tracked) == 300


def test_running_averages_differ_from_the_population_statistics(trained):
    """The running averages of training (EMA, momentum 0.1, over changing weights) are not
    Algorithm 2's statistics; the difference is measured, not assumed small."""
    model, _, x_test, y_test, stats = trained
    for k, (mean, var, _) in stats.items():
        bn = model[k]
        dm = np.abs(bn.running_mean.double().numpy() - mean) / np.sqrt(var)
        dv = np.abs(bn.running_var.double().numpy() / var - 1)
        assert 0 < np.median(dm) < 0.5 and 0 < np.median(dv) < 0.5, (k, dm, dv)
    running = _numpy_inference(model, {k: (model[k].running_mean.double().numpy(),
                                           model[k].running_var.double().numpy()) for k in stats},
                               x_test)  # fmt: skip
    population = _numpy_inference(model, stats, x_test)
    y = y_test.numpy()
    acc_running = (running.argmax(1) == y).mean()
    acc_population = (population.argmax(1) == y).mean()
    assert abs(acc_running - acc_population) < 0.02
    with torch.no_grad():
        eval_scores = model.eval()(x_test).double().numpy()
    model.train()
    np.testing.assert_allclose(eval_scores, running, rtol=1e-4, atol=1e-4)  # eval = running


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"batch_size": 1}, "batch_size must be an int ≥ 2"), ({"batch_size": 601}, "at least one")],
)
def test_population_batchnorm_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        population_batchnorm(paper_mlp(bn=True), torch.rand(600, 784), **kwargs)
    with pytest.raises(ValueError, match="no BatchNorm"):
        population_batchnorm(paper_mlp(bn=False), torch.rand(600, 784))

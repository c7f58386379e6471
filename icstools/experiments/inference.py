"""Inference with population statistics: Algorithm 2 of Ioffe & Szegedy (2015).

A batch-normalized network is trained with mini-batch statistics, but deployed with fixed ones:
Algorithm 2 replaces each BN layer's batch mean and variance by population statistics
computed over the training set with the trained, frozen network,

* ``E[x] = E_B[μ_B]``, the mean over training mini-batches ``B`` of size ``m`` of their means;
* ``Var[x] = m/(m−1) · E_B[σ²_B]``, the mean of their (biased) variances, made unbiased;

so that BN becomes the fixed affine map ``y = γ/√(Var[x]+ε) · x + (β − γ E[x]/√(Var[x]+ε))``.
PyTorch's eval mode computes that map with the layer's ``running_mean`` and ``running_var``,
which training fills with exponential moving averages of the batch statistics (each step's
variance unbiased): an approximation of Algorithm 2's averages, taken over weights that were
still changing. :func:`population_batchnorm` computes the exact ones.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["population_batchnorm"]


def population_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 60) -> nn.Module:
    """A copy of ``model`` in eval mode whose BN layers hold Algorithm 2's population statistics.

    The training inputs ``x`` are cut into consecutive mini-batches of ``batch_size`` (a last,
    smaller batch is left out, so every batch has the same ``m``); each goes through the frozen
    network with its BN layers in train mode (batch statistics, as in training; every other
    module, e.g. dropout, in eval mode) and no gradient. Each BN layer's ``running_mean``
    becomes the mean over the batches of their means, ``E_B[μ_B]``, and ``running_var`` the mean
    of their unbiased variances, ``m/(m−1) · E_B[σ²_B]`` (PyTorch's cumulative average,
    ``momentum=None``, over freshly reset statistics). ``model`` itself is not changed.

    Parameters
    ----------
    model : torch.nn.Module
        A trained network with ``BatchNorm1d/2d/3d`` layers (tracking running statistics).
    x : torch.Tensor
        Training inputs ``[n, ...]``, ``n ≥ batch_size``.
    batch_size : int
        The mini-batch size ``m`` (the paper's MNIST network: 60), at least 2.

    Returns
    -------
    torch.nn.Module
        The copy, in eval mode: the inference network of Algorithm 2.

    Raises
    ------
    ValueError
        No BN layer tracking running statistics, ``batch_size < 2`` or fewer inputs than one
        batch.

    Examples
    --------
    >>> from icstools.experiments.models import paper_mlp
    >>> net = population_batchnorm(paper_mlp(bn=True), torch.rand(600, 784))
    >>> net.training, net[1].num_batches_tracked.item()
    (False, 10)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int ≥ 2 (m/(m−1) needs m ≥ 2), got {batch_size!r}")
    if len(x) < batch_size:
        raise ValueError(f"need at least one batch of {batch_size} inputs, got {len(x)}")
    net = copy.deepcopy(model).eval()
    norms = [
        m
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        raise ValueError("the model has no BatchNorm layer that tracks running statistics")
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: every batch weighs the same
        bn.train()
    with torch.no_grad():
        for i in range(0, len(x) - batch_size + 1, batch_size):
            net(x[i : i + batch_size])
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    return net.eval()

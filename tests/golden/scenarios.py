"""Golden scenarios: recorder runs with every option on, whose datasets and final weights are
kept in ``tests/golden/`` and must not change when the code is restructured.

Run as a script in a fresh process (``tests/test_golden.py`` does) so that the arithmetic is
pinned: one thread, MKL's conditional numerical reproducibility, AVX2 kernels. To regenerate
after a deliberate change of the recorded numbers (say why in the commit)::

    ICSTOOLS_GOLDEN_WRITE=1 .venv/bin/python -m pytest tests/test_golden.py

Usage: ``python tests/golden/scenarios.py OUT_DIR`` writes ``<name>.zarr`` (the dataset, via
``xarray.Dataset.to_zarr``) and ``<name>-weights.npz`` per scenario into ``OUT_DIR``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

#: Environment that pins the float arithmetic of the scenarios' process.
PINNED_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


class SharedMLP(nn.Module):
    """BN, dropout, sigmoid and tanh, and one linear layer called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 10, bias=False)
        self.bn = nn.BatchNorm1d(10)
        self.sig = nn.Sigmoid()
        self.drop = nn.Dropout(0.2)
        self.shared = nn.Linear(10, 10)
        self.tanh = nn.Tanh()
        self.out = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.sig(self.bn(self.inp(x))))
        h = self.tanh(self.shared(h))
        h = self.tanh(self.shared(h))
        return self.out(h)


class SmallConv(nn.Module):
    """Conv + BN2d + in-place ReLU, then a sigmoid head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)
        self.sig = nn.Sigmoid()
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.relu(self.bn(self.conv(x)))).flatten(1)
        return self.head(self.sig(self.fc(h)))


class Steps:
    """A user's schedule callable (with a repr that is the same in every process)."""

    def __init__(self, rule: str) -> None:
        self.rule = rule

    def __call__(self, step: int) -> bool:
        return bool(eval(self.rule, {}, {"s": step}))

    def __repr__(self) -> str:
        return f"Steps({self.rule!r})"


def everything(out: Path) -> tuple:
    """Every option at once, streamed to a store: probe, probe_sample, gradients, ics,
    landscape, jacobian, a GradScaler with one skipped iteration, calls="separate", logs."""
    from icstools import Recorder

    torch.manual_seed(0)
    model = SharedMLP()
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(12, 6, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    rec = Recorder(
        model,
        every=1,
        optimizer=opt,
        probe=probe,
        probe_sample=8,
        gradients=True,
        ics=2,
        landscape=3,
        jacobian=2,
        jacobian_examples=6,
        loss_fn=nn.functional.cross_entropy,
        scaler=scaler,
        calls="separate",
        path="everything-run.zarr",
        chunk_steps=4,
        seed=3,
    )
    with rec:
        for i in range(12):
            x = torch.randn(16, 6, generator=gen)
            y = torch.randint(0, 3, (16,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            if i == 5:
                loss = loss * float("inf")  # the scaler skips this iteration
            rec.set_target(y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            rec.log(loss=loss.detach(), acc=float(i) / 10)
    return rec.to_dataset(), model


def conv_in_memory(out: Path) -> tuple:
    """A convolution in memory: eval-mode probe, sampled quantiles, per-site options, pooled
    calls, explicit Jacobian blocks with the full BN map, a schedule by callable, and a
    learning rate that makes the network diverge."""
    from icstools import Recorder

    torch.manual_seed(4)
    model = SmallConv()
    gen = torch.Generator().manual_seed(5)
    probe = torch.randn(6, 2, 5, 5, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = Recorder(
        model,
        [nn.ReLU, "fc", nn.Sigmoid],
        role=("input", "output"),
        every=Steps("s % 2 == 0 or s == 7"),
        optimizer=opt,
        probe=probe,
        probe_mode="eval",
        quantiles=(0.1, 0.5, 0.9),
        bins=16,
        hist_range={"fc:*": (-3.0, 3.0)},
        saturation={"sig:input": 2.0},
        quantile_sample=40,
        gradients=True,
        jacobian=Steps("s in (0, 4)"),
        jacobian_blocks={"relu-to-fc": ("relu:output", "fc:output"), "net": ("input", "output")},
        jacobian_examples=4,
        jacobian_bn="full",
        seed=9,
    )
    with rec:
        for i in range(12):
            if i == 8:
                for g in opt.param_groups:
                    g["lr"] = 1e30  # diverges: recorded, not raised
            x = torch.randn(8, 2, 5, 5, generator=gen)
            y = torch.randint(0, 2, (8,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss.detach())
    return rec.to_dataset(), model


SCENARIOS = {"everything": everything, "conv_in_memory": conv_in_memory}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    os.chdir(work)  # the store path in the recorder's config is relative: the same everywhere
    for name, scenario in SCENARIOS.items():
        ds, model = scenario(work)
        ds.to_zarr(out / f"{name}.zarr", mode="w", consolidated=True)
        weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        np.savez(out / f"{name}-weights.npz", **weights)


if __name__ == "__main__":
    main(sys.argv[1])

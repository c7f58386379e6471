"""Algorithm 2: how far the running averages of training are from the population statistics.

Trains the §4.1 BN network (``paper_mlp(bn=True)``, SGD at ``FIG1_LR``, batches of 60, seed 0,
the ``fig1`` preset's set-up) for ``--steps`` steps, then computes Algorithm 2's population
statistics over the whole training set (``population_batchnorm``: mean of the batch means,
m/(m−1) times the mean of the batch variances, batches of 60) and compares them with the
running averages PyTorch kept during training (exponential moving averages, momentum 0.1):
per BN layer the median and largest |Δ mean| in population standard deviations and |Δ var| /
var over units, and the test accuracy (all 10,000 images) of the network in eval mode with
either. ``tests/test_inference_bn.py`` checks that eval mode with the population statistics is
Algorithm 2's inference network, against statistics computed by hand with numpy.

Usage::

    .venv/bin/python bench/algorithm2.py                 # 50,000 steps (the fig1 preset)
    .venv/bin/python bench/algorithm2.py --steps 5000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS

from icstools.experiments import FIG1_LR, paper_mlp, population_batchnorm, train
from icstools.experiments.training import _load


def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net.eval()(x).argmax(1) == y).double().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = paper_mlp(bn=True)
    train(model, args.steps, lr=FIG1_LR, seed=args.seed)
    x_train, _ = _load("mnist", "train", None)
    x_test, y_test = _load("mnist", "test", None)
    population = population_batchnorm(model, x_train, batch_size=60)
    rows = []
    layers = [k for k, m in enumerate(model) if isinstance(m, torch.nn.BatchNorm1d)]
    for layer, k in enumerate(layers, start=1):
        mean = population[k].running_mean.double().numpy()
        var = population[k].running_var.double().numpy()
        dmean = np.abs(model[k].running_mean.double().numpy() - mean) / np.sqrt(var)
        dvar = np.abs(model[k].running_var.double().numpy() / var - 1)
        rows.append(
            {
                "layer": layer,
                "dmean_sigma_median": float(np.median(dmean)),
                "dmean_sigma_max": float(dmean.max()),
                "dvar_rel_median": float(np.median(dvar)),
                "dvar_rel_max": float(dvar.max()),
            }
        )
    acc_running = _accuracy(model, x_test, y_test)
    acc_population = _accuracy(population, x_test, y_test)
    elapsed = time.perf_counter() - t0
    print(f"§4.1 BN network, {args.steps} steps at lr {FIG1_LR}, seed {args.seed}")
    print("BN layer  |Δ mean|/σ median  max      |Δ var|/var median  max")
    for r in rows:
        print(
            f"{r['layer']:8d}  {r['dmean_sigma_median']:17.4f}  {r['dmean_sigma_max']:7.4f}  "
            f"{r['dvar_rel_median']:18.4f}  {r['dvar_rel_max']:7.4f}"
        )
    print(
        f"test accuracy in eval mode: running averages {acc_running:.4f}, population "
        f"statistics {acc_population:.4f} (elapsed {elapsed:.0f} s)"
    )
    RESULTS.mkdir(exist_ok=True)
    out = {
        "steps": args.steps,
        "seed": args.seed,
        "layers": rows,
        "test_acc_running": acc_running,
        "test_acc_population": acc_population,
        "elapsed_s": elapsed,
    }
    (RESULTS / "algorithm2.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Learning-rate sweep of the §4.1 network (how ``FIG1_LR`` was chosen)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from icstools.experiments.models import paper_mlp
from icstools.experiments.training import train
from icstools.recording.isolation import isolated

__all__ = ["fig1_lr_sweep"]


def fig1_lr_sweep(
    lrs: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
    *,
    steps: int = 5000,
    seeds: Sequence[int] = (0,),
    bn: Sequence[bool] = (False, True),
    data_dir: str | Path | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Final test accuracy of the §4.1 network (with/without BN) for a grid of SGD rates.

    Used to choose ``FIG1_LR`` (the paper gives no rate): plain training, no recorder, the
    ``fig1`` set-up otherwise (init N(0, 0.1²), batches of 60).

    Returns
    -------
    list of dict
        One row per network, rate and seed: ``network`` ("baseline"/"bn"), ``lr``, ``seed``,
        ``test_acc`` (full test set after ``steps``), ``diverged_step``, ``wall_time``.

    Examples
    --------
    >>> rows = fig1_lr_sweep((0.3, 1.0), steps=500)  # doctest: +SKIP
    >>> max(rows, key=lambda r: r["test_acc"])["lr"]  # doctest: +SKIP
    1.0
    """
    from tqdm import tqdm

    rows = []
    for use_bn in bn:
        for lr in lrs:
            for seed in seeds:
                with isolated():
                    torch.manual_seed(seed)
                    model = paper_mlp(bn=use_bn)
                    with tqdm(
                        total=steps,
                        desc=f"bn={use_bn} lr={lr:g} seed={seed}",
                        file=sys.stderr,
                        disable=None if progress else True,  # None: only on a terminal
                    ) as bar:
                        r = train(
                            model, steps, lr=lr, seed=seed, data_dir=data_dir, progress=bar.update
                        )
                rows.append(
                    {
                        "network": "bn" if use_bn else "baseline",
                        "lr": float(lr),
                        "seed": seed,
                        "test_acc": r.final_accuracy,
                        "diverged_step": r.diverged_step,
                        "wall_time": r.wall_time,
                    }
                )
    return rows

"""The compiled statistics kernels (``icstools.functional.kernels``) against the eager paths.

Two measurements, in one process:

1. one CNN-sized site ``[128, 64, 32, 32]`` (8.4 M values, float32): ``summarize`` with the
   kernels (one thread, then split by units over ``--threads``), and the eager reductions
   (``kernels.ENABLED = False``); best of ``--reps`` calls each;
2. in a training loop, ``small_cnn()`` at batch 128 on random 32×32 inputs: blocks of
   ``--steps`` steps alternating plain / recorded with the split kernel / recorded with one
   thread, ``--rounds`` rounds (median ms per step): whether splitting a site over threads pays
   while torch's own threads run between the hooks;
3. numba's error model: the block fold of the kept values (``_block_kernel``, 60 positions ×
   4,400 columns: ~15 records of the paper MLP's three sites) and the site kernel (one
   ``[128, 64, 1024]`` site, one thread), each compiled with ``error_model="python"`` (a
   check before every division) and ``"numpy"`` (the kernels' setting), called alternately
   ``--reps`` × 3 times (median ms).

    .venv/bin/python bench/kernels.py            # ~3 minutes

Writes ``bench/results/kernels.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, build, machine_info, write_json

from icstools import Recorder
from icstools.functional import kernels
from icstools.functional.statistics import summarize


def _site_ms(x: torch.Tensor, reps: int) -> float:
    edges = np.linspace(-4, 4, 51)
    summarize(x, 1, hist_edges=edges, sat_threshold=2.0)  # compile / load, caches
    best = []
    for _ in range(reps):
        t0 = time.perf_counter()
        summarize(x, 1, hist_edges=edges, sat_threshold=2.0)
        best.append(time.perf_counter() - t0)
    return min(best) * 1e3


def one_site(reps: int) -> dict[str, float]:
    """ms per ``summarize`` of one 8.4 M-value site: split kernel, one-thread kernel, eager."""
    x = torch.randn(128, 64, 32, 32, generator=torch.Generator().manual_seed(0))
    split = _site_ms(x, reps)
    kernels.SPLIT_VALUES, was = 1 << 62, kernels.SPLIT_VALUES
    one = _site_ms(x, reps)
    kernels.SPLIT_VALUES = was
    kernels.ENABLED = False
    try:
        eager = _site_ms(x, max(2, reps // 3))
    finally:
        kernels.ENABLED = True
    return {"kernel_split_ms": split, "kernel_one_thread_ms": one, "eager_ms": eager}


def _fold_args() -> tuple:
    """The block kernel's arguments: 4,400 columns of 60 values, 44 groups of 100."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((60, 4400)) * 2).astype(np.float32)  # [positions, columns]
    widths = np.full(44, 100)
    col = lambda v, dt: np.repeat(np.asarray(v, dtype=dt), widths)  # noqa: E731  [columns]
    starts = np.arange(44, dtype=np.int64) * 52
    return (
        a,
        col([-5.0] * 44, np.float32),
        col([5.0] * 44, np.float32),
        col([50] * 44, np.int64),
        col(starts, np.int64),
        col([4.6] * 44, np.float32),
    )


def error_models(reps: int) -> dict[str, float]:
    """Median ms of the block fold and of the site kernel compiled with each error model."""
    import numba

    fold_in = _fold_args()
    site_x = np.random.default_rng(1).standard_normal((128, 64, 1024)).astype(np.float32)

    def fold(fn: object) -> float:
        units = fold_in[0].shape[1]
        outs = (
            np.zeros(units),
            np.zeros(units, np.int64),
            np.zeros(units, np.int64),
            np.zeros(44 * 52, np.int64),
            np.zeros((4, units)),
        )
        t0 = time.perf_counter()
        fn(*fold_in, *outs)
        return (time.perf_counter() - t0) * 1e3

    def site(fn: object) -> float:
        count, s, mn, mx, n_sat, n_zero, m = kernels._site_outputs(64)
        hist = np.zeros(52, np.int64)
        t0 = time.perf_counter()
        fn(site_x, np.float32(-5), np.float32(5), 50, np.float32(4.6), count, s, mn, mx,
           n_sat, n_zero, hist, m)  # fmt: skip
        return (time.perf_counter() - t0) * 1e3

    compiled = {
        (what, model): numba.njit(nogil=True, error_model=model)(k.fn)
        for what, k in (("fold", kernels._block_kernel), ("site", kernels._site_kernel))
        for model in ("python", "numpy")
    }
    timers = {"fold": fold, "site": site}
    times: dict[str, list[float]] = {f"{w}_{m}_ms": [] for w, m in compiled}
    for (what, _model), fn in compiled.items():
        timers[what](fn)  # compile
    for r in range(3 * reps):
        items = list(compiled.items())
        for (what, model), fn in items if r % 2 == 0 else items[::-1]:
            times[f"{what}_{model}_ms"].append(timers[what](fn))
    return {k: statistics.median(v) for k, v in times.items()}


def training(steps: int, rounds: int) -> dict[str, list[float]]:
    """ms per CNN step: plain, recorded (split kernel), recorded (one thread), alternating."""
    model = build("cnn", bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
    rec = Recorder(model, optimizer=opt)
    split_at = kernels.SPLIT_VALUES

    def block(kind: str, k: int) -> float:
        recorded = kind != "plain"
        if recorded:
            kernels.SPLIT_VALUES = split_at if kind == "split" else 1 << 62
            rec.attach()
        t0 = time.perf_counter()
        for _ in range(k):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if recorded:
                rec.log(loss=loss)
        if recorded:
            rec.flush()
            rec.detach()
        kernels.SPLIT_VALUES = split_at
        return (time.perf_counter() - t0) / k * 1e3

    kinds = ("plain", "split", "one_thread")
    for kind in kinds:  # warm-up: layouts, edges, compiled code
        block(kind, 2)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            times[kind].append(block(kind, steps))
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9, help="calls per site variant (best of)")
    ap.add_argument("--steps", type=int, default=8, help="CNN steps per timed block")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "kernels.json")
    args = ap.parse_args(argv)
    if not kernels.ENABLED:
        print(f"skipped: the kernels do not run here ({kernels.unavailable_reason()})")
        return 0
    torch.set_num_threads(args.threads)
    site = one_site(args.reps)
    print(f"one site [128, 64, 32, 32] (8.4 M values), {args.threads} torch threads:")
    for name, ms in site.items():
        print(f"  {name:22s} {ms:8.1f} ms")
    models = error_models(args.reps)
    print("numba error model, median ms (one thread, alternating):")
    for name, ms in models.items():
        print(f"  {name:22s} {ms:8.2f} ms")
    times = training(args.steps, args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"small_cnn, batch 128, {args.rounds} rounds of {args.steps}-step blocks:")
    for kind, ms in med.items():
        print(f"  {kind:12s} {ms:8.1f} ms/step  ({ms / med['plain']:.3f}x plain)")
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "site": site,
            "error_models": models,
            "ms_per_step": times,
            "median": med,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

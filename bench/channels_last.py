"""Channels-last sites: the row kernel against the unit kernel, and the compiled CNN's stash.

Two measurements, in one process:

1. ``kernels.rows_moments`` (units innermost, read row by row) against ``kernels.site_moments``
   (unit by unit, split over threads from 2²⁰ values) on the same values, best of ``--reps``
   calls each, for a few shapes, the results checked equal to the bit;
2. ``small_cnn()`` compiled with inductor (batch 128, random 32×32 inputs), the recorder
   attached: blocks of ``--steps`` steps alternating, ``--rounds`` rounds (median ms a step):
   ``plain`` (the unrecorded graph), and for each stash format (``channels_last``, the default
   for a convolution network, and ``contiguous``, the traced format used before):
   ``graph_only`` (recorded steps whose stashed copies are dropped: the compiled graph's own
   cost of the copies) and ``recorded`` (the statistics too).

    .venv/bin/python bench/channels_last.py        # ~6 minutes (inductor compiles 3 graphs)

Writes ``bench/results/channels_last.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, build, cnn_batches, machine_info, make_step, write_json

from icstools import Recorder
from icstools.functional import kernels
from icstools.recording import core

SHAPES = [(60, 100), (128, 1000), (4096, 768), (2, 1_000_000), (131072, 64)]
FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.preserve_format}


def _best_ms(fn, reps: int) -> float:
    fn()
    best = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t0)
    return min(best) * 1e3


def kernel_shapes(reps: int) -> list[dict[str, object]]:
    """ms of ``rows_moments`` and ``site_moments`` per shape ``[positions, units]``."""
    rng = np.random.default_rng(0)
    edges = (-3.0, 3.0, 50)
    out = []
    for shape in SHAPES:
        x = rng.normal(size=shape).astype(np.float32)
        x3 = x[:, :, None]  # [pre, units, post = 1]: the same values, unit by unit
        a, b = kernels.rows_moments(x, edges, 2.0), kernels.site_moments(x3, edges, 2.0)
        if any(a[k].tobytes() != b[k].tobytes() for k in a):
            raise SystemExit(f"rows_moments and site_moments differ for {shape}")
        rows = _best_ms(lambda x=x: kernels.rows_moments(x, edges, 2.0), reps)
        site = _best_ms(lambda x3=x3: kernels.site_moments(x3, edges, 2.0), reps)
        out.append({"shape": list(shape), "rows_ms": rows, "site_ms": site})
        print(f"  {shape!s:18s} rows {rows:8.3f} ms   site {site:8.3f} ms")
    return out


def compiled_cnn(steps: int, rounds: int) -> dict[str, list[float]]:
    """ms per compiled CNN step of each variant, ``rounds`` values each."""
    torch._dynamo.reset()
    model = build("cnn", True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = Recorder(model, optimizer=opt)
    recording = {"on": True}
    schedule = rec.schedule
    rec.schedule = lambda step: recording["on"] and schedule(step)  # type: ignore[method-assign]
    rec.attach()  # attach, then compile: the hooks are traced
    step = make_step(torch.compile(model), opt, cnn_batches(), log=lambda x: rec.log(loss=x))
    harvest = core.RecorderCore._harvest

    def drop(self: core.RecorderCore) -> None:  # the stash taken, no statistics
        self._switch.take()

    def block(name: str, k: int) -> float:
        kind, _, fmt = name.partition(":")
        recording["on"] = kind != "plain"
        rec._switch.stash_format = FORMATS.get(fmt, torch.channels_last)
        rec._sync_switch()
        core.RecorderCore._harvest = drop if kind == "graph_only" else harvest
        try:
            t0 = time.perf_counter()
            for _ in range(k):
                step()
            rec.flush()
            return (time.perf_counter() - t0) * 1e3 / k
        finally:
            core.RecorderCore._harvest = harvest

    names = ["plain"] + [f"{kind}:{fmt}" for fmt in FORMATS for kind in ("graph_only", "recorded")]
    for name in names:  # compiles each graph once (the format is guarded: one graph each)
        block(name, 2)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(block(name, steps))
    rec.close()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="calls per kernel and shape (best of)")
    ap.add_argument("--steps", type=int, default=6, help="CNN steps per timed block")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "channels_last.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("rows_moments (one thread) vs site_moments (split over threads from 2**20 values)")
    shapes = kernel_shapes(args.reps)
    print(f"compiled CNN, batch 128, {args.threads} torch threads, median ms a step")
    times = compiled_cnn(args.steps, args.rounds)
    med = {n: statistics.median(v) for n, v in times.items()}
    for name, value in med.items():
        print(f"  {name:28s} {value:8.1f} ms  ({value / med['plain']:.3f}x plain)")
    write_json(
        args.out,
        {"machine": machine_info(), "kernel_shapes": shapes, "ms_per_step": times, "median": med},
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

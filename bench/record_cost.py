"""Where the cost of recording the paper's MLP at every step goes, in one process.

Four timed variants of the same training, alternating in rounds (the median per variant):

- ``plain``: SGD steps, no recorder;
- ``hooks``: the recorder attached, but its schedule records no step: the cost of the hooks
  and the step bookkeeping alone (every forward, every optimizer step);
- ``every1``: the recorder's defaults, a record at every step;
- ``every1_no_fold``: as ``every1``, with the folding of the kept values (sort, moments,
  histograms, quantiles, final statistics: :func:`icstools.functional.exact.
  finish_exact_many`) replaced by a copy of results computed once: what remains is the
  recorder's Python per record (closing it, layout, sink) and the copies in the hooks.

and, apart, the fold itself on 32 records of the MLP's three sites (``[60, 100]`` each): the
floor of the numpy statistics per record. The per-record costs are differences of medians.

    .venv/bin/python bench/record_cost.py            # ~2 minutes
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, build, machine_info, make_step, mlp_batches, write_json

from icstools import Recorder
from icstools.functional import exact
from icstools.functional import statistics as st
from icstools.recording.measurements import activations


def _fold_ms_per_record(records: int = 32, reps: int = 20) -> float:
    """``finish_exact_many`` of ``records`` records of three ``[60, 100]`` sites, per record."""
    gen = torch.Generator().manual_seed(0)
    objs = []
    for _ in range(records):
        rec = []
        for _ in range(3):
            s = st.ActivationStatistics(np.linspace(-5, 5, 51), 1, sat_threshold=4.6)
            s.update(torch.randn(60, 100, generator=gen))
            rec.append(s)
        objs.append(rec)
    exact.finish_exact_many(objs)
    best = []
    for _ in range(reps):
        t0 = time.perf_counter()
        exact.finish_exact_many(objs)
        best.append(time.perf_counter() - t0)
    return min(best) * 1e3 / records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=320, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "record_cost.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build("mlp", bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data, source = mlp_batches("auto")
    recorders = {
        "hooks": Recorder(model, optimizer=opt, every=lambda step: False),
        "every1": Recorder(model, optimizer=opt),
        "every1_no_fold": Recorder(model, optimizer=opt),
    }
    real_fold = exact.finish_exact_many
    cached: dict[str, list] = {}

    def no_fold(records):  # results of the first call, copied: no sort, no moments
        if "out" not in cached:
            cached["out"] = real_fold(records[:1])[0]
        return [
            [copy.copy(cached["out"][j % len(cached["out"])]) for j in range(len(r))]
            for r in records
        ]

    def block(name: str) -> float:
        rec = recorders.get(name)
        step = make_step(model, opt, data, None if rec is None else lambda loss: rec.log(loss=loss))
        if name == "every1_no_fold":
            activations.finish_exact_many = no_fold
        try:
            if rec is not None:
                rec.attach()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            if rec is not None:
                rec.flush()
            return (time.perf_counter() - t0) * 1e3 / args.steps
        finally:
            if rec is not None:
                rec.detach()
            activations.finish_exact_many = real_fold

    names = ["plain", *recorders]
    for name in names:  # warm-up: layouts, edges, caches
        block(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(block(name))
    med = {n: statistics.median(v) for n, v in times.items()}
    fold = _fold_ms_per_record()
    parts = {
        "plain step": med["plain"],
        "hooks and bookkeeping, per step": med["hooks"] - med["plain"],
        "record: Python and copies (every1_no_fold - hooks)": med["every1_no_fold"] - med["hooks"],
        "record: folding (every1 - every1_no_fold)": med["every1"] - med["every1_no_fold"],
        "fold alone, per record (32 records at once)": fold,
    }
    print(f"paper MLP with BN, batch 60, {source} inputs, {args.threads} torch threads")
    for n in names:
        print(f"  {n:16s} {med[n]:.3f} ms/step  ({med[n] / med['plain']:.2f}x plain)")
    for k, v in parts.items():
        print(f"  {k:52s} {v:.3f} ms")
    write_json(
        args.out,
        {"machine": machine_info(), "ms_per_step": times, "median": med, "parts_ms": parts},
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

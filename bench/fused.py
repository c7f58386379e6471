"""One site's statistics: the eager reductions vs the fused one, eager and compiled.

A CNN site of ``small_cnn()`` at batch 128 (``[128, 64, 32, 32]``, 8.4 M values, after a ReLU)
is reduced to its mergeable state (:func:`icstools.functional.statistics.summarize`, every
field but the quantile sample) three ways, in rotating order, ``--reps`` times each:

- ``default``: the eager reductions (one op per statistic; the recorder's default);
- ``fused_eager``: :func:`icstools.functional.fused.fused_state` uncompiled;
- ``fused_compiled``: the same, ``torch.compile``'d (inductor's C++ backend on CPU).

Printed and written to ``bench/results/fused.json``: the median seconds of each, the first
call's seconds of the compiled one (its compile, paid once per shape and process), and the
largest relative difference of the compiled moments from the default ones.

Usage::

    .venv/bin/python bench/fused.py                # 5 repetitions (~2 min, mostly compile)
    .venv/bin/python bench/fused.py --reps 3 --threads 1
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

from _common import RESULTS, machine_info, write_json

from icstools.functional.fused import COMPILE_SECONDS
from icstools.functional.statistics import summarize


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed calls of each way (5)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    p.add_argument("--out", type=Path, default=RESULTS / "fused.json", help="JSON output")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(128, 64, 32, 32).relu_()
    edges = np.linspace(-1.0, 5.0, 65)
    ways = {"default": None, "fused_eager": "eager", "fused_compiled": "compile"}

    def run(mode: str | None) -> object:
        return summarize(x, 1, hist_edges=edges, fused=mode)

    t0 = time.perf_counter()
    compiled = run("compile")  # the first call compiles
    first_call = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in ways}
    for i in range(args.reps):
        names = list(ways)[i % 3 :] + list(ways)[: i % 3]
        for name in names:
            t0 = time.perf_counter()
            run(ways[name])
            times[name].append(time.perf_counter() - t0)
    ref = run(None)
    rel = {
        k: float(
            ((getattr(compiled, k).double() - getattr(ref, k).double()).abs()).max()
            / getattr(ref, k).double().abs().max().clamp(min=1e-300)
        )
        for k in ("mean", "m2", "m3", "m4", "min", "max")
    }
    hist_equal = bool(torch.equal(compiled.hist, ref.hist))
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"site [128, 64, 32, 32] ({x.numel() / 1e6:.1f} M values), {args.threads} threads")
    for k, v in medians.items():
        print(f"  {k:<15} {v * 1e3:9.1f} ms   ({medians['default'] / v:5.1f}x the default)")
    print(f"  compiled first call (compiles): {first_call:.1f} s; {COMPILE_SECONDS}")
    print(f"  compiled vs default, largest relative difference: {rel}; hist equal {hist_equal}")
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "shape": list(x.shape),
            "reps": args.reps,
            "seconds_median": medians,
            "seconds_all": times,
            "compiled_first_call_seconds": first_call,
            "compile_seconds": dict(COMPILE_SECONDS),
            "compiled_vs_default_max_rel_diff": rel,
            "hist_equal": hist_equal,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Overhead of recording on a CUDA GPU: ``bench/overhead.py``'s cases, on the GPU.

Each case of ``overhead.py`` (or those matching ``--cases``) is run with its model, optimizer
and data on ``cuda``: alternating plain and recorded blocks on one model, the median over pairs
of the wall-time ratio (each block ends with ``torch.cuda.synchronize()`` so that queued kernels
are counted in their own block). Without a CUDA device it says so, writes a JSON saying why,
and exits 0.

Usage::

    .venv/bin/python bench/gpu.py                  # every case, 5 pairs
    .venv/bin/python bench/gpu.py --cases cnn --pairs 3
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead
from _common import RESULTS, machine_info, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="", help="regex: only cases whose name matches")
    p.add_argument("--pairs", type=int, default=5, help="pairs of blocks per case (5)")
    p.add_argument("--quick", action="store_true", help="short blocks (overhead.py's quick)")
    p.add_argument("--out", type=Path, default=RESULTS / "gpu.json", help="JSON output")
    args = p.parse_args(argv)
    info = machine_info()
    if not torch.cuda.is_available():
        reason = (
            f"no CUDA device (torch {torch.__version__}, built with CUDA "
            f"{torch.version.cuda or 'none'}): nothing was measured"
        )
        print(f"bench/gpu.py: SKIPPED: {reason}")
        write_json(args.out, {"machine": info, "skipped": True, "reason": reason, "cases": []})
        print(f"wrote {args.out}")
        return 0
    info["gpu"] = torch.cuda.get_device_name(0)
    cases = [c for c in overhead.all_cases() if re.search(args.cases, c.name)]
    if not cases:
        p.error("no case matches")
    block = overhead.Bench.block

    def synced_block(self: overhead.Bench, instrumented: bool, k: int) -> tuple[float, float]:
        torch.cuda.synchronize()
        return block(self, instrumented, k)

    # the step's kernels are asynchronous: sync inside the timed region, at each block's end
    step_done = overhead.make_step

    def make_step(*a, **kw):  # type: ignore[no-untyped-def]
        step = step_done(*a, **kw)

        def synced() -> None:
            step()
            torch.cuda.synchronize()

        return synced

    overhead.Bench.block = synced_block  # type: ignore[method-assign]
    overhead.make_step = make_step
    tmp = Path(tempfile.mkdtemp(prefix="icstools-gpu-"))
    results = []
    try:
        for case in cases:
            k = case.quick_steps if args.quick else case.steps_per_block
            print(f"\n== {case.name} on {info['gpu']}: {args.pairs} pairs of {k}-step blocks")
            results.append(overhead.run_case(case, args.pairs, k, "random", tmp, device="cuda"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    overhead.print_table(results)
    write_json(args.out, {"machine": info, "skipped": False, "cases": results})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Wall time of the full ``fig1`` experiment with recording and without, one seed.

Issue 6 asks for the wall time of the paper's §4.1 experiment (both networks, one seed) with
the preset's recording and without it. For each network (``baseline``, ``bn``) two runs of the
same seed are timed in this one process:

* ``recorded``: :func:`icstools.experiments.run_preset` for that condition and seed, i.e.
  exactly ``icstools run fig1 --seeds 0 --conditions <net>`` (recorder with the preset's
  options: sigmoid inputs on the train batch and the probe, 1,000 probe values per unit,
  gradients; Zarr store written by the background writer; test accuracy on all 10,000 test
  images at every record);
* ``plain``: :func:`icstools.experiments.train_condition` (the training ``run_preset`` does)
  with ``recorder=None``: the same model, seed, learning rate, batches and test-accuracy
  schedule, no recorder (what a user would run to get the accuracy curve alone).

Runs alternate (``plain, recorded`` for one network, ``recorded, plain`` for the other) so
that a slow drift of the machine's load does not favour one side. The figure is the ratio
recorded / plain per network, and for both networks together. Wall time is the whole run as
:func:`~icstools.experiments.train` measures it (data loading excluded, final flush of the
store and final full-test-set accuracy included); process CPU time is given too.

Usage::

    .venv/bin/python bench/fig1_wall.py                 # full: 50,000 steps (~4 min on 2 cores)
    .venv/bin/python bench/fig1_wall.py --steps 2000    # shorter
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, loadavg, machine_info, write_json

from icstools.experiments import get_preset, record_steps, run_preset, train_condition


def plain_run(net: str, steps: int, seed: int, data_dir: str | None) -> dict[str, Any]:
    """The fig1 training of ``net`` with its test-accuracy schedule and no recorder."""
    preset = get_preset("fig1")
    cpu0 = time.process_time()
    recorded = record_steps(steps, preset.records)
    result = train_condition(
        preset, preset.condition(net), seed, steps, recorded, data_dir=data_dir
    )
    return {
        "wall_time": result.wall_time,
        "cpu_time": time.process_time() - cpu0,
        "final_test_acc": result.accuracy[result.steps_done],
        "evaluations": len(result.accuracy),
    }


def recorded_run(net: str, steps: int, seed: int, data_dir: str | None) -> dict[str, Any]:
    """``icstools run fig1 --seeds SEED --conditions NET`` into a temporary folder."""
    cpu0 = time.process_time()
    with tempfile.TemporaryDirectory(prefix="icstools-fig1-wall-") as tmp:
        manifest = run_preset(
            "fig1",
            steps=steps,
            seeds=[seed],
            conditions=[net],
            out=tmp,
            progress=False,
            data_dir=data_dir,
            threads=torch.get_num_threads(),
        )
        run = manifest.runs[0]
        store = manifest.run_path(run)
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    return {
        "wall_time": run.wall_time,
        "cpu_time": time.process_time() - cpu0,
        "final_test_acc": run.final_test_acc,
        "evaluations": len(run.test_acc) + 1,
        "records": run.records,
        "store_bytes": size,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="steps per run (fig1's: 50,000)")
    p.add_argument("--seed", type=int, default=0, help="the seed (0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, as icstools run (1)")
    p.add_argument("--data-dir", default=None, help="MNIST base folder ($ICSTOOLS_DATA)")
    p.add_argument("--out", type=Path, default=RESULTS / "fig1_wall.json", help="JSON output")
    args = p.parse_args(argv)
    steps = args.steps or get_preset("fig1").steps
    if steps < 1:
        p.error(f"--steps must be ≥ 1, got {steps}")
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(
        f"fig1, {steps} steps, seed {args.seed}; torch {info['torch']}, "
        f"{info['torch_threads']} threads, load {info['loadavg_at_start']}",
        flush=True,
    )
    runs: dict[str, dict[str, Any]] = {}
    order = {"baseline": ("plain", "recorded"), "bn": ("recorded", "plain")}
    for net, kinds in order.items():
        runs[net] = {}
        for kind in kinds:
            fn = plain_run if kind == "plain" else recorded_run
            r = fn(net, steps, args.seed, args.data_dir)
            r["loadavg_after"] = loadavg()
            runs[net][kind] = r
            print(
                f"{net:<9} {kind:<9} {r['wall_time']:8.1f} s wall {r['cpu_time']:8.1f} s cpu  "
                f"final test acc {r['final_test_acc']:.4f}",
                flush=True,
            )
    summary = {
        net: {
            "ratio_wall": r["recorded"]["wall_time"] / r["plain"]["wall_time"],
            "ratio_cpu": r["recorded"]["cpu_time"] / r["plain"]["cpu_time"],
            "same_final_test_acc": r["recorded"]["final_test_acc"] == r["plain"]["final_test_acc"],
        }
        for net, r in runs.items()
    }
    total = {k: sum(runs[n][k]["wall_time"] for n in runs) for k in ("plain", "recorded")}
    summary["both"] = {
        "plain_wall_time": total["plain"],
        "recorded_wall_time": total["recorded"],
        "ratio_wall": total["recorded"] / total["plain"],
    }
    print("\nwall time, both networks, one seed:")
    print(
        f"  recorded {total['recorded']:.1f} s, plain {total['plain']:.1f} s "
        f"(ratio {summary['both']['ratio_wall']:.2f}); per network: "
        + ", ".join(f"{n} {summary[n]['ratio_wall']:.2f}" for n in runs)
    )
    for net in runs:
        if not summary[net]["same_final_test_acc"]:
            print(f"  note: {net}: final accuracy differs between the two runs")
    info["loadavg_at_end"] = loadavg()
    write_json(
        args.out,
        {
            "machine": info,
            "steps": steps,
            "seed": args.seed,
            "method": "one process; per network a plain run (train_condition(recorder=None), "
            "same test-accuracy schedule) and a recorded one (run_preset('fig1')), order "
            "alternating",
            "runs": runs,
            "summary": summary,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cost of the live view to the training: step time with and without ``icstools.live``.

One process, one model (the paper's MNIST MLP, ``paper_mlp(bn=True)``, batches of 60), one
``Recorder`` (every 10 steps, a 500-image probe, gradients) attached throughout, and one live
view of it (``icstools.live(rec, display=False)``, default interval and budget) whose worker
process runs throughout. Blocks of ``k`` steps alternate: in a *view* block the recorder's
sink hands each closed record to the view's tap (which queues it; the view's thread forwards
it to the worker, which computes and draws); in a *plain* block the tap is removed, so the
records go nowhere else. Which block of a pair runs first alternates. The figure is the median
over pairs of the pair's ratio view / plain, also the ratio of the fastest blocks and the
process CPU time (the worker's own CPU time is reported apart: it is another process, at
``nice`` 10).

Usage::

    .venv/bin/python bench/live.py            # 12 pairs of 400 steps
    .venv/bin/python bench/live.py --quick    # 4 pairs of 200 steps
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, build, loadavg, machine_info, make_step, mlp_batches, write_json

import icstools

TARGET = 1.05


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        import os

        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "live.json")
    args = parser.parse_args()
    pairs = args.pairs or (4 if args.quick else 12)
    k = args.steps or (200 if args.quick else 400)
    torch.set_num_threads(args.threads)
    info = machine_info()

    model = build("mlp", bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data, kind = mlp_batches("auto")
    probe = torch.rand(500, 784, generator=torch.Generator().manual_seed(1))
    rec = icstools.Recorder(model, every=10, optimizer=opt, probe=probe, gradients=True)
    step = make_step(model, opt, data, log=lambda loss: rec.log(loss=loss))
    rec.attach()
    for _ in range(50):  # warm up (the first record fixes the layout)
        step()
    view = icstools.live(rec, display=False)
    if not view.wait_ready(300):
        raise SystemExit(f"the live view's worker did not start: {view.status}")
    tap = rec._sink.taps[0]
    worker_cpu0 = _cpu_seconds(view._process.pid)

    def block(with_view: bool) -> tuple[float, float]:
        taps = rec._sink.taps
        if with_view and tap not in taps:
            taps.append(tap)
        if not with_view and tap in taps:
            taps.remove(tap)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(k):
            step()
        return time.perf_counter() - wall, time.process_time() - cpu

    rows = []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        times = {w: block(w) for w in order}
        rows.append(
            {
                "plain_s": times[False][0],
                "view_s": times[True][0],
                "plain_cpu_s": times[False][1],
                "view_cpu_s": times[True][1],
                "ratio": times[True][0] / times[False][0],
            }
        )
        print(
            f"pair {i + 1:2d}/{pairs}: plain {times[False][0] / k * 1e3:6.2f} ms/step, "
            f"view {times[True][0] / k * 1e3:6.2f} ms/step, ratio {rows[-1]['ratio']:.3f}, "
            f"view draws {view.draws}, records {view.n_records}",
            flush=True,
        )
    if tap not in rec._sink.taps:
        rec._sink.taps.append(tap)
    rec.detach()
    rec.close()
    view.wait(120)
    worker_cpu = _cpu_seconds(view._process.pid)
    view.stop()
    ratio = statistics.median(r["ratio"] for r in rows)
    fastest = min(r["view_s"] for r in rows) / min(r["plain_s"] for r in rows)
    cpu = sum(r["view_cpu_s"] for r in rows) / sum(r["plain_cpu_s"] for r in rows)
    plain_ms = statistics.median(r["plain_s"] for r in rows) / k * 1e3
    result = {
        "machine": info,
        "loadavg_at_end": loadavg(),
        "data": kind,
        "steps_per_block": k,
        "pairs": pairs,
        "every": 10,
        "plain_ms_per_step": plain_ms,
        "ratio_median": ratio,
        "ratio_fastest": fastest,
        "ratio_cpu": cpu,
        "target": TARGET,
        "view": {
            "draws": view.draws,
            "updates": view.updates,
            "records": view.n_records,
            "worker_cpu_s": None if worker_cpu is None else worker_cpu - (worker_cpu0 or 0.0),
            "status": view.status,
        },
        "rows": rows,
    }
    write_json(args.out, result)
    print(
        f"live view: {plain_ms:.2f} ms/step plain; with the view x{ratio:.3f} (median of "
        f"{pairs} pairs), fastest blocks x{fastest:.3f}, process CPU x{cpu:.3f}; the worker "
        f"drew {view.draws} frames of {view.n_records} records using "
        f"{result['view']['worker_cpu_s']:.1f} s CPU; target < x{TARGET} -> {args.out}"
    )


if __name__ == "__main__":
    main()

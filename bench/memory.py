"""Memory of a long recorded run, and the store's size per recorded step.

1. Trains the paper's MLP (``paper_mlp(bn=True)``, batch 60, SGD lr 0.1) for ``--steps`` steps
   (20,000) under a ``Recorder(every=--every, path=<tmpdir>/run.zarr)`` and samples, every
   ``--sample-every`` steps (1,000), the resident set size (psutil) and the peak RSS
   (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). With a store the recorder keeps only the
   records of the chunk being filled in memory, so peak RSS must stay flat: target ±5% from the
   first sample (step 1,000) to the last (step 20,000).
2. The store's size on disk divided by the number of records, for that MLP run and for a short
   run of ``small_cnn()`` (``--cnn-steps``, 512 = 2 chunks of 256): different sites and unit
   counts (300 sigmoid-input units vs 160 ReLU-input channels).

Usage::

    .venv/bin/python bench/memory.py             # full run (~3-10 min on 2 busy cores)
    .venv/bin/python bench/memory.py --quick     # smoke run
    .venv/bin/python bench/memory.py --every 10
"""

from __future__ import annotations

import argparse
import gc
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    LR,
    RESULTS,
    build,
    cnn_batches,
    loadavg,
    machine_info,
    make_step,
    mlp_batches,
    write_json,
)

from icstools import Recorder, open_run

TARGET_REL_CHANGE = 0.05
MiB = 2**20


def peak_rss() -> int:
    """Peak RSS of this process in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def store_size(path: Path) -> dict[str, int]:
    """Apparent bytes, allocated bytes (what ``du`` counts) and number of files of a store."""
    files = [f for f in path.rglob("*") if f.is_file()]
    by_var: dict[str, int] = {}
    for f in files:
        rel = f.relative_to(path).parts
        name = rel[0] if len(rel) > 1 else "(metadata)"
        by_var[name] = by_var.get(name, 0) + f.stat().st_size
    return {
        "bytes": sum(f.stat().st_size for f in files),
        "allocated_bytes": sum(f.stat().st_blocks * 512 for f in files),
        "files": len(files),
        "bytes_by_variable": dict(sorted(by_var.items(), key=lambda kv: -kv[1])),
    }


def print_by_variable(size: dict[str, Any], records: int) -> None:
    parts = [f"{k} {v / records:.0f}" for k, v in size["bytes_by_variable"].items()]
    print("  B/record by variable: " + ", ".join(parts))


def mlp_run(steps: int, every: int, sample_every: int, data: str, tmp: Path) -> dict[str, Any]:
    proc = psutil.Process()
    model = build("mlp", bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    stream, source = mlp_batches(data)
    path = tmp / "mlp.zarr"
    rec = Recorder(model, every=every, optimizer=opt, path=path)
    step = make_step(model, opt, stream, log=lambda loss: rec.log(loss=loss))
    samples = []

    def sample(s: int, seconds: float) -> None:
        row = {
            "step": s,
            "rss_bytes": proc.memory_info().rss,
            "peak_rss_bytes": peak_rss(),
            "records": rec.n_records,
            "threads": proc.num_threads(),
            "gc_objects": len(gc.get_objects()),
            "seconds": seconds,
        }
        samples.append(row)
        print(
            f"{s:>7} {row['rss_bytes'] / MiB:10.1f} {row['peak_rss_bytes'] / MiB:10.1f} "
            f"{row['records']:>8} {row['threads']:>7} {row['gc_objects']:>10} {seconds:8.1f}",
            flush=True,
        )

    print(f"\nMLP (bn=True), every={every}, {steps} steps, store {path}")
    print(
        f"{'step':>7} {'RSS MiB':>10} {'peak MiB':>10} {'records':>8} {'threads':>7} "
        f"{'gc objs':>10} {'seconds':>8}"
    )
    t0 = time.perf_counter()
    sample(0, 0.0)
    with rec:
        for s in range(1, steps + 1):
            step()
            if s % sample_every == 0:
                sample(s, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    size = store_size(path)
    n_records = rec.n_records
    n_stored = int(open_run(path).sizes["step"])
    ref = next(r for r in samples if r["step"] > 0)
    last = samples[-1]
    rel_peak = last["peak_rss_bytes"] / ref["peak_rss_bytes"] - 1
    rel_rss = last["rss_bytes"] / ref["rss_bytes"] - 1
    return {
        "model": "paper_mlp(bn=True)",
        "data": source,
        "steps": steps,
        "every": every,
        "sample_every": sample_every,
        "samples": samples,
        "reference_step": ref["step"],
        "peak_rss_rel_change": rel_peak,
        "rss_rel_change": rel_rss,
        "target_rel_change": TARGET_REL_CHANGE,
        "meets_target": abs(rel_peak) <= TARGET_REL_CHANGE,
        "records": n_records,
        "records_in_store": n_stored,
        "store": size,
        "store_bytes_per_record": size["bytes"] / n_records,
        "store_allocated_bytes_per_record": size["allocated_bytes"] / n_records,
        "ms_per_step": seconds / steps * 1e3,
    }


def cnn_store_run(steps: int, every: int, batch: int, tmp: Path) -> dict[str, Any]:
    model = build("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    stream = _rebatch(cnn_batches(), batch)
    path = tmp / "cnn.zarr"
    rec = Recorder(model, every=every, optimizer=opt, path=path)
    step = make_step(model, opt, stream, log=lambda loss: rec.log(loss=loss))
    t0 = time.perf_counter()
    with rec:
        for _ in range(steps):
            step()
    seconds = time.perf_counter() - t0
    size = store_size(path)
    ds = open_run(path)
    return {
        "model": "small_cnn()",
        "batch": batch,
        "steps": steps,
        "every": every,
        "units": int(ds.sizes["unit"]),
        "sites": [str(s) for s in ds.site.values],
        "records": rec.n_records,
        "records_in_store": int(ds.sizes["step"]),
        "store": size,
        "store_bytes_per_record": size["bytes"] / rec.n_records,
        "store_allocated_bytes_per_record": size["allocated_bytes"] / rec.n_records,
        "ms_per_step": seconds / steps * 1e3,
        "peak_rss_bytes_after": peak_rss(),
    }


def _rebatch(stream, batch: int):
    for x, y in stream:
        yield x[:batch], y[:batch]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="MLP training steps (20000)")
    p.add_argument("--every", type=int, default=1, help="recording schedule, every N steps (1)")
    p.add_argument("--sample-every", type=int, default=None, help="RSS sampling interval (1000)")
    p.add_argument("--cnn-steps", type=int, default=None, help="CNN steps for the store size (512)")
    p.add_argument(
        "--cnn-batch",
        type=int,
        default=32,
        help="CNN batch for the store-size run (32; the store's size does not depend on it: "
        "units are channels)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 3000 MLP / 128 CNN steps")
    p.add_argument("--out", type=Path, default=RESULTS / "memory.json", help="JSON output")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    p.add_argument("--data", choices=("auto", "random", "mnist"), default="auto")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    steps = args.steps or (3000 if args.quick else 20000)
    sample_every = args.sample_every or (500 if args.quick else 1000)
    cnn_steps = args.cnn_steps if args.cnn_steps is not None else (128 if args.quick else 512)
    if steps < sample_every:
        p.error("--steps must be ≥ --sample-every")
    info = machine_info()
    print(
        f"torch {info['torch']}, {info['torch_threads']} threads, {info['cpu_model']} "
        f"({info['cpu_count']} CPUs), load {info['loadavg_at_start']}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="icstools-bench-mem-"))
    try:
        mlp = mlp_run(steps, args.every, sample_every, args.data, tmp)
        ref = mlp["reference_step"]
        print(
            f"\npeak RSS change step {ref} -> {steps}: {mlp['peak_rss_rel_change']:+.2%} "
            f"(target ±{TARGET_REL_CHANGE:.0%}: {'met' if mlp['meets_target'] else 'MISSED'}); "
            f"RSS change {mlp['rss_rel_change']:+.2%}"
        )
        print(
            f"MLP store: {mlp['records']} records ({mlp['records_in_store']} in the store), "
            f"{mlp['store']['bytes'] / MiB:.1f} MiB in {mlp['store']['files']} files -> "
            f"{mlp['store_bytes_per_record']:.0f} B/record "
            f"({mlp['store_allocated_bytes_per_record']:.0f} B/record allocated on disk); "
            f"{mlp['ms_per_step']:.2f} ms/step"
        )
        print_by_variable(mlp["store"], mlp["records"])
        cnn = None
        if cnn_steps > 0:
            cnn = cnn_store_run(cnn_steps, args.every, args.cnn_batch, tmp)
            print(
                f"CNN store ({cnn['units']} units, {cnn_steps} steps, batch {cnn['batch']}): "
                f"{cnn['records']} records, {cnn['store']['bytes'] / MiB:.2f} MiB in "
                f"{cnn['store']['files']} files -> {cnn['store_bytes_per_record']:.0f} B/record "
                f"({cnn['store_allocated_bytes_per_record']:.0f} B/record allocated on disk); "
                f"{cnn['ms_per_step']:.1f} ms/step"
            )
            print_by_variable(cnn["store"], cnn["records"])
        info["loadavg_at_end"] = loadavg()
        write_json(args.out, {"machine": info, "quick": args.quick, "mlp": mlp, "cnn": cnn})
        print(f"\nwrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

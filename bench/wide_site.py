"""Memory of a very wide site streamed to a store: is the record buffer bounded?

A site of 1,000,000 units (``Linear(4, 1_000_000)`` then ReLU, batch 2, SGD) records about
128 MB per step. Two child processes train the same model for ``--steps`` steps (200): one
plain, one under ``Recorder(path=<tmp>/run.zarr, every=1, buffer_bytes=--buffer-mib)``. Each
reports its peak resident set size (``ru_maxrss``) and its RSS sampled during training. The
recorded child must stay within the plain child's peak (the model's own footprint: weights,
gradients, activations) plus the buffer bound plus the transient memory of computing one
record, which is printed too.

Usage::

    .venv/bin/python bench/wide_site.py               # 200 recorded steps (~5-15 min)
    .venv/bin/python bench/wide_site.py --steps 20    # quick look

Writes ``bench/results/wide_site.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, machine_info, write_json

UNITS = 1_000_000


def _rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(mode: str, steps: int, buffer_mib: int, out: Path) -> None:
    """Train (plain or recorded) and write what memory it took to ``out`` (JSON)."""
    import torch
    from torch import nn

    import icstools

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(4, UNITS), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rss: list[float] = []

    def step() -> None:
        loss = model(torch.randn(2, 4)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    result: dict[str, Any] = {"mode": mode}
    if mode == "plain":
        for i in range(steps):
            step()
            if i % 10 == 0:
                rss.append(_rss_mib())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rec = icstools.Recorder(
                model, "1", role="input", optimizer=opt, path=Path(tmp) / "run.zarr",
                buffer_bytes=buffer_mib * 2**20,
            )  # fmt: skip
            with rec:
                for i in range(steps):
                    step()
                    if i % 10 == 0:
                        rss.append(_rss_mib())
            sink = rec._sink  # what the sink held at most, by its own count
            result |= {
                "record_mib": rec.record_bytes / 2**20,
                "sink_peak_mib": sink.peak_bytes / 2**20,
                "chunk_steps_used": sink.chunk_steps,
                "records_committed": rec.n_committed,
            }
    result |= {
        "seconds_per_step": (time.perf_counter() - t0) / steps,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # the store's writer process (reaped when the recorder closed): its own peak
        "writer_process_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        / 1024,
        "rss_samples_mib": rss,
    }
    out.write_text(json.dumps(result))


def run_child(mode: str, steps: int, buffer_mib: int, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{mode}.json"
    cmd = [sys.executable, __file__, "--child", mode, "--steps", str(steps)]
    subprocess.run([*cmd, "--buffer-mib", str(buffer_mib), "--out", str(out)], check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="training steps, all recorded (200)")
    p.add_argument("--buffer-mib", type=int, default=256, help="Recorder buffer_bytes (256)")
    p.add_argument("--child", choices=("plain", "recorded"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS / "wide_site.json", help="JSON output")
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.steps, args.buffer_mib, args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        plain = run_child("plain", args.steps, args.buffer_mib, Path(tmp))
        recorded = run_child("recorded", args.steps, args.buffer_mib, Path(tmp))
    extra = recorded["peak_rss_mib"] - plain["peak_rss_mib"]
    print(f"site of {UNITS:,} units, batch 2, {args.steps} recorded steps to a store")
    print(f"  one record:              {recorded['record_mib']:8.1f} MiB")
    print(f"  buffer bound:            {args.buffer_mib:8d} MiB")
    print(f"  sink's own peak:         {recorded['sink_peak_mib']:8.1f} MiB (records + block)")
    print(f"  chunk_steps used:        {recorded['chunk_steps_used']:8d}")
    print(f"  plain peak RSS:          {plain['peak_rss_mib']:8.1f} MiB (model's footprint)")
    print(f"  recorded peak RSS:       {recorded['peak_rss_mib']:8.1f} MiB")
    print(f"  recorded − plain:        {extra:8.1f} MiB")
    writer = recorded["writer_process_peak_rss_mib"]
    print(f"  writer process peak RSS: {writer:8.1f} MiB (a process of its own)")
    print(f"  last RSS sample:         {recorded['rss_samples_mib'][-1]:8.1f} MiB")
    print(
        f"  s/step plain, recorded:  {plain['seconds_per_step']:.3f}, "
        f"{recorded['seconds_per_step']:.3f}"
    )
    within = recorded["sink_peak_mib"] <= args.buffer_mib
    print(f"  sink within the bound:   {'yes' if within else 'NO'}")
    write_json(
        args.out,
        {"machine": machine_info(), "buffer_mib": args.buffer_mib, "steps": args.steps,
         "plain": plain, "recorded": recorded, "recorded_minus_plain_mib": extra},
    )  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

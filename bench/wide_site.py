"""Memory of a very wide site streamed to a store: is the record buffer bounded?

A site of 1,000,000 units (``Linear(4, 1_000_000)`` then ReLU, batch 2, SGD) records about
137 MiB per step. Three child processes train the same model for ``--steps`` steps (200):
plain; plain with what a recorder loads once whatever the site (numba's compiled kernels,
zarr, xarray: ~100 MiB); and under ``Recorder(path=<tmp>/run.zarr, every=1,
buffer_bytes=--buffer-mib)``. Each reports its peak resident set size (``ru_maxrss``) and its
RSS sampled during training; the recorded one also its store writer process's own peak
(``VmHWM``). The recorded child should stay within the plain child's peak (the model's own
footprint: weights, gradients, activations) plus the buffer bound; both differences are
printed.

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
    if mode == "libraries":  # what recording loads once, whatever the site: numba's kernels
        _load_libraries()  # compiled, zarr and xarray imported (no record, no store)
    if mode in ("plain", "libraries"):
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
                result["writer_own_peak_rss_mib"] = _writer_peak_mib(rec)
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
        "rss_samples_mib": rss,
    }
    out.write_text(json.dumps(result))


def _load_libraries() -> None:
    """Load what a recorder loads once: the statistics kernels (compiled by numba, run on a
    small tensor), zarr and xarray."""
    import numpy as np
    import xarray  # noqa: F401
    import zarr  # noqa: F401

    from icstools.functional import kernels

    x = np.zeros((2, 4, 3), np.float32)
    kernels.site_moments(x, (0.0, 1.0, 4), None)
    kernels.rows_moments(np.zeros((64, 4), np.float32), (0.0, 1.0, 4), None)
    kernels.block_fields(np.zeros((2, 4), np.float32), [4], [np.linspace(0, 1, 5)], [1.0])
    kernels.sort_rows(np.zeros((2, 4096), np.float32))


def _writer_peak_mib(rec: Any) -> float | None:
    """The store's writer process's own peak RSS (``VmHWM``), read while it runs.

    Not ``RUSAGE_CHILDREN``: a child forked from this process inherits its peak, so that
    figure was this process's RSS at the fork, not the writer's."""
    writer = rec._sink._writer.writer  # a WriterProcess once the training moved it there
    pid = getattr(writer, "pid", None)
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def run_child(mode: str, steps: int, buffer_mib: int, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{mode}.json"
    cmd = [sys.executable, __file__, "--child", mode, "--steps", str(steps)]
    subprocess.run([*cmd, "--buffer-mib", str(buffer_mib), "--out", str(out)], check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="training steps, all recorded (200)")
    p.add_argument("--buffer-mib", type=int, default=256, help="Recorder buffer_bytes (256)")
    p.add_argument("--child", choices=("plain", "libraries", "recorded"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS / "wide_site.json", help="JSON output")
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.steps, args.buffer_mib, args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        plain = run_child("plain", args.steps, args.buffer_mib, Path(tmp))
        libs = run_child("libraries", args.steps, args.buffer_mib, Path(tmp))
        recorded = run_child("recorded", args.steps, args.buffer_mib, Path(tmp))
    extra = recorded["peak_rss_mib"] - plain["peak_rss_mib"]
    extra_libs = recorded["peak_rss_mib"] - libs["peak_rss_mib"]
    print(f"site of {UNITS:,} units, batch 2, {args.steps} recorded steps to a store")
    print(f"  one record:              {recorded['record_mib']:8.1f} MiB")
    print(f"  buffer bound:            {args.buffer_mib:8d} MiB")
    print(f"  sink's own peak:         {recorded['sink_peak_mib']:8.1f} MiB (records + block)")
    print(f"  chunk_steps used:        {recorded['chunk_steps_used']:8d}")
    print(f"  plain peak RSS:          {plain['peak_rss_mib']:8.1f} MiB (model's footprint)")
    print(f"  recorded peak RSS:       {recorded['peak_rss_mib']:8.1f} MiB")
    print(f"  recorded − plain:        {extra:8.1f} MiB")
    print(f"  plain + libraries peak:  {libs['peak_rss_mib']:8.1f} MiB (kernels, zarr, xarray)")
    print(f"  recorded − that:         {extra_libs:8.1f} MiB")
    writer = recorded["writer_own_peak_rss_mib"]
    print(f"  writer process peak RSS: {writer or float('nan'):8.1f} MiB (its own VmHWM)")
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
         "plain": plain, "libraries": libs, "recorded": recorded,
         "recorded_minus_plain_mib": extra, "recorded_minus_libraries_mib": extra_libs},
    )  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

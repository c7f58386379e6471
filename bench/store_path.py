"""The store off the critical path: recording to a Zarr store vs in memory, in one process.

Part 1, *ratios*. For each case one model, optimizer and data stream, and three recorders on
that model: in memory (``path=None``), to a store written by a child process
(``ICSTOOLS_STORE_WRITER=process``) and to a store written by a thread of this process
(``thread``, the previous design, for comparison). Blocks of ``k`` steps are timed in rounds:
plain, memory, store (process), store (thread), in an order that rotates every round, each
instrumented block ending with ``rec.flush()`` inside the timed region (with a store it waits
until the writer has committed everything). Figures: median over rounds of block / plain
block and of store block / memory block of the same round; the time ``flush()`` took at the
end of the store blocks is reported on its own (the training loop waits there for the last
block's write).

Part 2, *GIL*. The main thread runs a pure-Python loop for a few seconds while a
``BackgroundWriter`` appends blocks of 64 paper-MLP records (as a recorder makes them), once by
its thread and once through a writer process; it counts its iterations (against an idle
writer) and the longest pauses between two iterations: the time the writer held the GIL.

Usage::

    .venv/bin/python bench/store_path.py              # ~15 min on 2 loaded cores
    .venv/bin/python bench/store_path.py --quick      # smoke run
    .venv/bin/python bench/store_path.py --cases mlp_every1
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
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

from icstools import Recorder
from icstools.recording.sink import WRITER_ENV
from icstools.store import BackgroundWriter, RunWriter
from icstools.store.process import StackedBlock

VARIANTS = ("plain", "memory", "process", "thread")
TARGET_STORE_VS_MEMORY = 1.05
TARGET_MLP_EVERY1_STORE = 1.30

# name, model, every, steps per block (full, quick)
CASES = [
    ("mlp_every1", "mlp", 1, 1280, 320),
    ("mlp_every10", "mlp", 10, 1280, 320),
    ("cnn_every1", "cnn", 1, 12, 4),
]


def _recorder(model, opt, every: int, path: Path | None, writer: str) -> Recorder:
    os.environ[WRITER_ENV] = writer  # read when the recorder's sink is built
    try:
        return Recorder(model, every=every, optimizer=opt, path=path)
    finally:
        os.environ.pop(WRITER_ENV, None)


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of the live process ``pid`` (Linux ``/proc``; else None)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def run_case(name: str, model_name: str, every: int, k: int, rounds: int, tmp: Path, data: str):
    model = build(model_name, bn=False)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    stream = mlp_batches(data)[0] if model_name == "mlp" else cnn_batches()
    recs = {
        "memory": _recorder(model, opt, every, None, "auto"),
        "process": _recorder(model, opt, every, tmp / f"{name}_p.zarr", "process"),
        "thread": _recorder(model, opt, every, tmp / f"{name}_t.zarr", "thread"),
    }
    plain = make_step(model, opt, stream)
    steps = {
        v: make_step(model, opt, stream, log=lambda loss, r=r: r.log(loss=loss))
        for v, r in recs.items()
    }
    flush_s: dict[str, list[float]] = {"process": [], "thread": []}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}  # the training thread's CPU time
    writer_cpu: list[float] = []  # the writer process's CPU time per block (process variant)

    def block(variant: str, n: int) -> float:
        if variant == "plain":
            c0, t0 = time.thread_time(), time.perf_counter()
            for _ in range(n):
                plain()
            cpu[variant].append(time.thread_time() - c0)
            return time.perf_counter() - t0
        rec = recs[variant]
        writer = rec._sink._writer.writer if rec._sink._writer is not None else None
        pid = getattr(writer, "pid", None)  # a WriterProcess (after the warm-up block)
        w0 = _cpu_seconds(pid) if pid is not None else None
        rec.attach()
        try:
            c0, t0 = time.thread_time(), time.perf_counter()
            for _ in range(n):
                steps[variant]()
            t1 = time.perf_counter()
            rec.flush()
            t2 = time.perf_counter()
            cpu[variant].append(time.thread_time() - c0)
        finally:
            rec.detach()
        w1 = _cpu_seconds(pid) if w0 is not None else None
        if w0 is not None and w1 is not None:
            writer_cpu.append(w1 - w0)
        if variant in flush_s:
            flush_s[variant].append(t2 - t1)
        return t2 - t0

    for v in VARIANTS:  # warm-up: layouts, stores, the writer process
        block(v, max(2 * every, k // 4))
    for f in (*flush_s.values(), *cpu.values(), writer_cpu):
        f.clear()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(rounds):
        order = VARIANTS[i % 4 :] + VARIANTS[: i % 4]
        for v in order:
            times[v].append(block(v, k))
        print(
            f"  {name} round {i + 1}/{rounds}: "
            + ", ".join(f"{v} {times[v][-1] / k * 1e3:.2f}" for v in VARIANTS)
            + " ms/step",
            flush=True,
        )
    for rec in recs.values():
        rec.close()

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    ratio = {
        v: med([t / p for t, p in zip(times[v], times["plain"], strict=True)]) for v in VARIANTS
    }
    vs_mem = {
        v: med([t / m for t, m in zip(times[v], times["memory"], strict=True)])
        for v in ("process", "thread")
    }
    return {
        "case": name,
        "model": model_name,
        "every": every,
        "steps_per_block": k,
        "rounds": rounds,
        "ms_per_step": {v: med(times[v]) / k * 1e3 for v in VARIANTS},
        "ratio_vs_plain": ratio,
        "store_vs_memory": vs_mem,
        "store_vs_memory_rounds": {
            v: [t / m for t, m in zip(times[v], times["memory"], strict=True)]
            for v in ("process", "thread")
        },
        "flush_ms_at_block_end": {v: med(f) * 1e3 for v, f in flush_s.items()},
        # CPU time of the training thread alone (insensitive to other processes' load): what
        # the loop itself does, without the time it waits (for the GIL, or for a core)
        "training_thread_cpu_ms_per_step": {v: med(cpu[v]) / k * 1e3 for v in VARIANTS},
        "training_thread_cpu_vs_memory": {
            v: med([c / m for c, m in zip(cpu[v], cpu["memory"], strict=True)])
            for v in ("process", "thread")
        },
        # CPU time of the writer process (the child) per record it wrote, while the process
        # variant's blocks ran (None without /proc): the work a store adds on other cores
        "writer_process_cpu_ms_per_record": (
            med(writer_cpu) / (k / every) * 1e3 if writer_cpu else None
        ),
        "block_seconds": times,
        "loadavg_after": loadavg(),
    }


# ------------------------------------------------------------------------------------- GIL
def _mlp_blocks(n_blocks: int, data: str) -> list[StackedBlock]:
    """Blocks of 64 paper-MLP records, as the recorder hands them to its writer."""
    model = build("mlp", bn=False)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    stream = mlp_batches(data)[0]
    rec = Recorder(model, every=1, optimizer=opt)
    step = make_step(model, opt, stream, log=lambda loss: rec.log(loss=loss))
    with rec:
        for _ in range(65):
            step()
    records = rec._sink.records[:64]
    template = rec._block(records[:1])
    arrays = {n: np.stack([np.asarray(r[n]) for r in records]) for n in records[0]}
    blocks = []
    for b in range(n_blocks):
        a = dict(arrays, step=arrays["step"] + 1000 * b)
        blocks.append(StackedBlock(template, a))
    return blocks


def _busy(seconds: float) -> tuple[int, list[float]]:
    """Iterations of a pure-Python loop in ``seconds``, and the pauses longer than 0.2 ms."""
    n, gaps = 0, []
    t0 = last = time.perf_counter()
    while True:
        now = time.perf_counter()
        if now - last > 2e-4:
            gaps.append(now - last)
        last = now
        n += 1
        if now - t0 > seconds:
            return n, gaps


def gil_share(tmp: Path, data: str, seconds: float) -> dict[str, Any]:
    blocks = _mlp_blocks(600, data)
    idle, idle_gaps = _busy(seconds)
    print(f"  idle writer: longest pause of the loop {max(idle_gaps, default=0) * 1e3:.1f} ms")
    out: dict[str, Any] = {
        "busy_seconds": seconds,
        "idle_iterations": idle,
        "idle_longest_pause_ms": max(idle_gaps, default=0) * 1e3,
    }
    for kind in ("thread", "process"):
        bw = BackgroundWriter(RunWriter(tmp / f"gil_{kind}.zarr"), max_pending=len(blocks) + 2)
        if kind == "process":
            bw.start_process()
        bw.submit(blocks[0])
        bw.flush()  # the store exists, the child (if any) is up
        for b in blocks[1:]:  # all queued at once: the writer works during the whole loop
            bw.submit(b)
        before = bw.n_committed
        c_all, c_main = time.process_time(), time.thread_time()
        n, gaps = _busy(seconds)
        other_cpu = (time.process_time() - c_all) - (time.thread_time() - c_main)
        written = bw.n_committed - before
        bw.close()
        out[kind] = {
            "iterations_vs_idle": n / idle,
            "records_written_meanwhile": written,
            "pauses_over_1ms": sum(g > 1e-3 for g in gaps),
            "longest_pause_ms": max(gaps, default=0) * 1e3,
            "pause_ms_per_record": sum(gaps) * 1e3 / max(written, 1),
            # CPU time of this process's other threads (the writer, zarr's event loop and
            # pools): an upper bound of the GIL they can hold, whatever the machine's load
            "other_threads_cpu_ms_per_record": other_cpu * 1e3 / max(written, 1),
        }
        print(
            f"  GIL, writer {kind}: main-thread loop at {n / idle:.2f} of idle while "
            f"{written} records were written; {out[kind]['pauses_over_1ms']} pauses > 1 ms, "
            f"longest {out[kind]['longest_pause_ms']:.1f} ms; CPU of this process's other "
            f"threads {out[kind]['other_threads_cpu_ms_per_record']:.3f} ms per record",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds of 4 blocks (7; quick 2)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cases", default="", help="regex on the case names")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", choices=("auto", "random", "mnist"), default="auto")
    p.add_argument("--out", type=Path, default=RESULTS / "store_path.json")
    p.add_argument("--no-gil", action="store_true", help="skip part 2")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 7)
    info = machine_info()
    print(
        f"torch {info['torch']}, {info['torch_threads']} threads, load {info['loadavg_at_start']}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="icstools-store-path-"))
    results, gil = [], None
    try:
        for name, model, every, k_full, k_quick in CASES:
            if not re.search(args.cases, name):
                continue
            k = k_quick if args.quick else k_full
            print(f"\n== {name}: {rounds} rounds of {k}-step blocks", flush=True)
            results.append(run_case(name, model, every, k, rounds, tmp, args.data))
        if not args.no_gil:
            print("\n== GIL held by the writer", flush=True)
            gil = gil_share(tmp, args.data, 2.0 if args.quick else 5.0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nratio = median over rounds; store/memory = store block / memory block, same round")
    head = f"{'case':<12} {'plain':>7} {'memory':>7} {'process':>8} {'thread':>7}   "
    head += (
        f"{'proc/mem':>8} {'thr/mem':>8} {'flush ms (p, t)':>16} {'thread CPU p/mem, t/mem':>24}"
        f" {'writer CPU ms/rec':>18}"
    )
    print(head)
    for r in results:
        ra, sm, fl = r["ratio_vs_plain"], r["store_vs_memory"], r["flush_ms_at_block_end"]
        print(
            f"{r['case']:<12} {r['ms_per_step']['plain']:6.2f}m {ra['memory']:6.3f}x "
            f"{ra['process']:7.3f}x {ra['thread']:6.3f}x   {sm['process']:8.3f} "
            f"{sm['thread']:8.3f} {fl['process']:8.1f} {fl['thread']:7.1f} "
            f"{r['training_thread_cpu_vs_memory']['process']:12.3f} "
            f"{r['training_thread_cpu_vs_memory']['thread']:11.3f} "
            f"{r['writer_process_cpu_ms_per_record'] or float('nan'):18.3f}"
        )
    info["loadavg_at_end"] = loadavg()
    write_json(
        args.out,
        {
            "machine": info,
            "quick": args.quick,
            "targets": {
                "store_vs_memory": TARGET_STORE_VS_MEMORY,
                "mlp_every1_store_vs_plain": TARGET_MLP_EVERY1_STORE,
            },
            "cases": results,
            "gil": gil,
        },
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Overhead of recording: wall time per training step, instrumented / plain, in one process.

For every case one model, one optimizer, one data stream and one ``Recorder`` are built. Then
pairs of blocks are timed *alternately* on that same model (its training simply continues
across blocks):

* plain block: ``k`` SGD steps, no hook attached;
* instrumented block: ``rec.attach()``, ``k`` SGD steps (+ ``rec.log(loss=...)``), then
  ``rec.flush()`` inside the timed region (closes the last record and, with a store, waits until
  the background writer has committed everything: no cost spills into the next block), then
  ``rec.detach()``.

Which block of a pair runs first alternates (plain first on even pairs) so slow drifts of the
machine's load hit both sides equally. The recorder only counts optimizer steps while attached,
so each instrumented block covers ``k`` consecutive steps of its schedule (``k / every``
records). The figure per case is the median over pairs of the pair's ratio; the ratio of the
fastest instrumented to the fastest plain block and the ratio of process CPU time are reported
as well (both less sensitive to other processes on a shared machine).

Usage::

    .venv/bin/python bench/overhead.py                 # full run (~25 min on 2 cores)
    .venv/bin/python bench/overhead.py --quick         # smoke run (~2 min)
    .venv/bin/python bench/overhead.py --cases cnn     # cases whose name matches a regex
    .venv/bin/python bench/overhead.py --profile cnn_every1_mem   # cProfile of instrumented steps
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
from torch._dynamo.utils import counters

from icstools import Recorder
from icstools.functional.fused import COMPILE_SECONDS

# issue 11's targets
TARGET_EVERY10 = 1.03
TARGET_MLP_EVERY1 = 1.25
TARGET_MLP_EVERY1_DISK = 1.30
TARGET_CNN_EVERY1 = 1.15
TARGET_GRAD_EVERY10 = 1.05
TARGET_MLP_GRAD_EVERY1 = 1.6
TARGET_CNN_GRAD_EVERY1 = 1.3
TARGET_COMPILED_EVERY10 = 1.10
TARGET_COMPILED_EVERY1 = 1.3


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "mlp" or "cnn"
    bn: bool
    every: int
    store: bool  # path=<tmpdir> (Zarr on disk) instead of path=None
    target: float
    steps_per_block: int
    quick_steps: int
    gradients: bool = False  # Recorder(gradients=True): activation gradients, param dynamics
    fused: str | None = None  # Recorder(fused=...): the fused (compiled) site reduction
    compiled: bool = False  # torch.compile(model) after attaching; plain = compiled, detached


def all_cases() -> list[Case]:
    cases = []
    for bn in (False, True):
        tag = f"mlp_bn{int(bn)}"
        cases += [
            Case(f"{tag}_every1_mem", "mlp", bn, 1, False, TARGET_MLP_EVERY1, 320, 64),
            # 2560 steps (10 chunks): each block ends with flush(), which waits for the last
            # chunk's write; in a 320-step block that wait alone was ~30% of the block
            Case(f"{tag}_every1_disk", "mlp", bn, 1, True, TARGET_MLP_EVERY1_DISK, 2560, 256),
            Case(f"{tag}_every10_mem", "mlp", bn, 10, False, TARGET_EVERY10, 320, 60),
        ]
    fused = {"fused": "compile"}
    cases += [
        Case("cnn_every1_mem", "cnn", True, 1, False, TARGET_CNN_EVERY1, 10, 3),
        Case("cnn_every1_disk", "cnn", True, 1, True, TARGET_CNN_EVERY1, 10, 3),
        Case("cnn_every10_mem", "cnn", True, 10, False, TARGET_EVERY10, 30, 20),
        Case("cnn_fused_every1_mem", "cnn", True, 1, False, TARGET_CNN_EVERY1, 10, 3, **fused),
        Case("cnn_fused_every10_mem", "cnn", True, 10, False, TARGET_EVERY10, 30, 20, **fused),
    ]
    # the backward half on top: activation gradients of every site + parameter dynamics
    grad = {"gradients": True}
    cases += [
        Case(
            "mlp_bn1_grad_every1_mem",
            "mlp",
            True,
            1,
            False,
            TARGET_MLP_GRAD_EVERY1,
            320,
            64,
            **grad,
        ),
        Case(
            "mlp_bn1_grad_every10_mem", "mlp", True, 10, False, TARGET_GRAD_EVERY10, 320, 60, **grad
        ),
        Case("cnn_grad_every1_mem", "cnn", True, 1, False, TARGET_CNN_GRAD_EVERY1, 10, 3, **grad),
        Case("cnn_grad_every10_mem", "cnn", True, 10, False, TARGET_GRAD_EVERY10, 30, 20, **grad),
    ]
    # torch.compile'd models (attach, then compile); plain blocks run the same compiled model
    # with the recorder's schedule off. The recorder's default statistics (on the CPU, the
    # compiled kernels of icstools.functional.kernels: faster here than fused="compile")
    comp = {"compiled": True}
    e1, e10 = TARGET_COMPILED_EVERY1, TARGET_COMPILED_EVERY10
    cases += [
        Case("mlp_bn1_compiled_every1_mem", "mlp", True, 1, False, e1, 320, 64, **comp),
        Case("mlp_bn1_compiled_every10_mem", "mlp", True, 10, False, e10, 320, 60, **comp),
        Case("cnn_compiled_every1_mem", "cnn", True, 1, False, e1, 10, 3, **comp),
        Case("cnn_compiled_every10_mem", "cnn", True, 10, False, e10, 30, 20, **comp),
    ]
    return cases


class Bench:
    """Model, optimizer, data, recorder of one case, and the two kinds of timed blocks."""

    def __init__(self, case: Case, data: str, tmp: Path, device: str = "cpu") -> None:
        self.case = case
        self.model = build(case.model, case.bn).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        if case.model == "mlp":
            stream, self.data_source = mlp_batches(data)
        else:
            stream, self.data_source = cnn_batches(), "random"
        path = tmp / f"{case.name}.zarr" if case.store else None
        self.path = path
        if device != "cpu":
            stream = (tuple(t.to(device) for t in batch) for batch in stream)
        self.rec = Recorder(
            self.model,
            every=case.every,
            optimizer=self.opt,
            path=path,
            gradients=case.gradients,
            fused=case.fused,
        )
        fwd = self.model
        if case.compiled:
            # Dynamo does not guard on module hooks, so a compiled model keeps its recorder
            # attached for the whole run (see icstools.recording.compiled); its plain blocks
            # run with the schedule off: the compiled graph of unrecorded steps, whose hooks
            # trace to nothing (the optimizer's step hooks still run, a few µs per step)
            # a new model: its graphs must not count against Dynamo's recompile limit (8 per
            # code object) with the earlier cases' (else a later case silently runs eager)
            torch._dynamo.reset()
            self.recording = True
            schedule = self.rec.schedule
            self.rec.schedule = lambda step: self.recording and schedule(step)  # type: ignore[method-assign]
            self.rec.attach()
            fwd = torch.compile(self.model)
        self.plain_step = make_step(fwd, self.opt, stream)
        self.rec_step = make_step(fwd, self.opt, stream, log=lambda loss: self.rec.log(loss=loss))

    def block(self, instrumented: bool, k: int) -> tuple[float, float]:
        """Seconds of wall and process CPU time for ``k`` steps."""
        if self.case.compiled:
            return self._compiled_block(instrumented, k)
        if not instrumented:
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(k):
                self.plain_step()
            return time.perf_counter() - t0, time.process_time() - c0
        self.rec.attach()
        try:
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(k):
                self.rec_step()
            self.rec.flush()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            self.rec.detach()
        return wall, cpu

    def _compiled_block(self, instrumented: bool, k: int) -> tuple[float, float]:
        self.recording = instrumented
        self.rec._sync_switch()
        step = self.rec_step if instrumented else self.plain_step
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(k):
            step()
        if instrumented:
            self.rec.flush()
        return time.perf_counter() - t0, time.process_time() - c0

    def close(self) -> None:
        if self.case.compiled:
            self.rec.detach()
        self.rec.close()


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def run_case(
    case: Case, pairs: int, k: int, data: str, tmp: Path, device: str = "cpu"
) -> dict[str, Any]:
    bench = Bench(case, data, tmp, device)
    warm = max(2 * case.every, k // 4)
    t_warm = time.perf_counter()
    # recorded first: a compiled model is traced with the recorder's hooks in place (Dynamo
    # does not guard on hooks; see icstools.recording.compiled), the fused reduction compiles
    bench.block(True, warm)
    bench.block(False, warm)
    warm_seconds = time.perf_counter() - t_warm
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    records_before = bench.rec.n_records
    plain_wall, rec_wall, plain_cpu, rec_cpu, ratios, cpu_ratios = [], [], [], [], [], []
    t_case = time.perf_counter()
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        res = {inst: bench.block(inst, k) for inst in order}
        (pw, pc), (iw, ic) = res[False], res[True]
        plain_wall.append(pw)
        rec_wall.append(iw)
        plain_cpu.append(pc)
        rec_cpu.append(ic)
        ratios.append(iw / pw)
        cpu_ratios.append(ic / pc)
        print(
            f"  {case.name} pair {i + 1}/{pairs}: plain {pw / k * 1e3:8.2f} ms/step, "
            f"instrumented {iw / k * 1e3:8.2f} ms/step, ratio {iw / pw:6.3f}",
            flush=True,
        )
    records = bench.rec.n_records - records_before
    bench.close()
    graphs_added = counters["stats"]["unique_graphs"] - graphs_after_warmup
    store_bytes = None
    if bench.path is not None and bench.path.exists():
        store_bytes = sum(f.stat().st_size for f in bench.path.rglob("*") if f.is_file())
    q1, q3 = _quartiles(ratios)
    median = statistics.median(ratios)
    return {
        **asdict(case),
        "steps_per_block": k,
        "warmup_steps": warm,
        "pairs": pairs,
        "data": bench.data_source,
        "records_per_instrumented_block": records / pairs,
        "ratio_median": median,
        "ratio_q1": q1,
        "ratio_q3": q3,
        "ratio_pairs": ratios,
        "ratio_of_fastest_blocks": min(rec_wall) / min(plain_wall),
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "cpu_ratio_pairs": cpu_ratios,
        "plain_ms_per_step": statistics.median(plain_wall) / k * 1e3,
        "instrumented_ms_per_step": statistics.median(rec_wall) / k * 1e3,
        "plain_ms_per_step_blocks": [w / k * 1e3 for w in plain_wall],
        "instrumented_ms_per_step_blocks": [w / k * 1e3 for w in rec_wall],
        "overhead_ms_per_step": (statistics.median(rec_wall) - statistics.median(plain_wall))
        / k
        * 1e3,
        "meets_target": median <= case.target,
        "warmup_seconds": warm_seconds,
        "fused_compile_seconds": dict(COMPILE_SECONDS),
        "dynamo_graphs_compiled_after_warmup": graphs_added,
        "store_bytes_at_end": store_bytes,
        "seconds": time.perf_counter() - t_case,
        "loadavg_after": loadavg(),
    }


def profile_case(case: Case, steps: int, data: str, tmp: Path, top: int) -> dict[str, Any]:
    """cProfile of ``steps`` instrumented steps (after a warm-up), top functions by own time."""
    bench = Bench(case, data, tmp)
    warm = max(2 * case.every, 2)
    bench.block(False, warm)
    bench.block(True, warm)
    t_plain, _ = bench.block(False, steps)
    prof = cProfile.Profile()
    prof.enable()  # one instrumented block, as timed (a compiled case keeps its recorder)
    t_rec, _ = bench.block(True, steps)
    prof.disable()
    bench.close()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        where = fn if file == "~" else f"{Path(file).name}:{line}({fn})"
        rows.append({"function": where, "calls": nc, "tottime_s": tt, "cumtime_s": ct})
    for key in ("tottime_s", "cumtime_s"):
        print(f"\n{case.name}: {steps} instrumented steps under cProfile, top {top} by {key}")
        print(f"{'ms/step':>9} {'calls/step':>10}  function")
        for r in sorted(rows, key=lambda r: -r[key])[:top]:
            print(f"{r[key] / steps * 1e3:9.2f} {r['calls'] / steps:10.1f}  {r['function']}")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
    return {
        "case": case.name,
        "steps": steps,
        "plain_ms_per_step_unprofiled": t_plain / steps * 1e3,
        "instrumented_ms_per_step_profiled": t_rec / steps * 1e3,
        "top_tottime": sorted(rows, key=lambda r: -r["tottime_s"])[:top],
        "top_cumtime": sorted(rows, key=lambda r: -r["cumtime_s"])[:top],
    }


def print_table(results: list[dict[str, Any]]) -> None:
    head = (
        f"{'case':<28} {'every':>5} {'store':>5} {'plain':>9} {'instr':>9} "
        f"{'ratio':>7} {'[q1, q3]':>15} {'fastest':>8} {'cpu':>6} {'target':>7}  ok"
    )
    print("\nms/step = median over blocks; ratio = median over pairs of instrumented/plain")
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['name']:<28} {r['every']:>5} {'disk' if r['store'] else 'mem':>5} "
            f"{r['plain_ms_per_step']:9.2f} {r['instrumented_ms_per_step']:9.2f} "
            f"{r['ratio_median']:7.3f} [{r['ratio_q1']:6.3f},{r['ratio_q3']:6.3f}] "
            f"{r['ratio_of_fastest_blocks']:8.3f} {r['cpu_ratio_median']:6.3f} "
            f"{'≤' + format(r['target'], '.2f'):>7}  {'yes' if r['meets_target'] else 'NO'}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=None, help="pairs of blocks per case (11)")
    p.add_argument(
        "--steps-per-block",
        type=int,
        default=None,
        help="steps per block for every case (default per case: MLP 320, CNN 10 / 30 for "
        "every=1 / every=10)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 3 pairs of short blocks")
    p.add_argument("--out", type=Path, default=RESULTS / "overhead.json", help="JSON output")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    p.add_argument("--cases", default="", help="regex: only cases whose name matches")
    p.add_argument(
        "--data",
        choices=("auto", "random", "mnist"),
        default="auto",
        help="MLP inputs: auto = MNIST when ICSTOOLS_DATA is set, else random",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="REGEX",
        help="instead of timing, cProfile instrumented steps of the matching cases",
    )
    p.add_argument("--profile-steps", type=int, default=None, help="steps to profile")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    pairs = args.pairs or (3 if args.quick else 11)
    if pairs < 1:
        p.error("--pairs must be ≥ 1")
    cases = [c for c in all_cases() if re.search(args.cases, c.name)]
    if args.profile:
        cases = [c for c in cases if re.search(args.profile, c.name)]
    if not cases:
        p.error("no case matches")
    info = machine_info()
    print(
        f"torch {info['torch']}, {info['torch_threads']} threads, {info['cpu_model']} "
        f"({info['cpu_count']} CPUs), load {info['loadavg_at_start']}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="icstools-bench-"))
    try:
        if args.profile:
            profiles = []
            for case in cases:
                steps = args.profile_steps or (5 if case.model == "cnn" else 300)
                profiles.append(profile_case(case, steps, args.data, tmp, top=25))
            out = args.out
            if out == RESULTS / "overhead.json":
                out = RESULTS / "overhead_profile.json"
            write_json(out, {"machine": info, "profiles": profiles})
            print(f"\nwrote {out}")
            return 0
        results = []
        for case in cases:
            if args.steps_per_block:
                k = args.steps_per_block
            else:
                k = case.quick_steps if args.quick else case.steps_per_block
            if k < 3 * case.every:
                print(f"[warn] {case.name}: {k}-step blocks span < 3 records (every={case.every})")
            print(f"\n== {case.name}: {pairs} pairs of {k}-step blocks", flush=True)
            results.append(run_case(case, pairs, k, args.data, tmp))
        print_table(results)
        info["loadavg_at_end"] = loadavg()
        write_json(
            args.out,
            {
                "machine": info,
                "method": "alternating plain/instrumented blocks on one model, median of "
                "per-pair wall-time ratios; instrumented blocks include rec.flush()",
                "quick": args.quick,
                "targets": {c.name: c.target for c in cases},
                "cases": results,
            },
        )
        print(f"\nwrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

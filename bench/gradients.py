"""Cost of the gradient measurements, in units of one plain training step, in one process.

For every model one optimizer and one stream of random MNIST-shaped batches are built; then,
for each measurement, *pairs of blocks* are timed alternately on that same model (training
simply continues across plain blocks; the measurements change nothing):

* plain block: ``k`` SGD steps (forward, backward, step) on batches of 60;
* measured block: ``j`` calls of the measurement on the next batch.

The figure is the median over pairs of ``(measured time / j) / (plain time / k)``: the cost of
one measurement in training steps. Which block of a pair goes first alternates; block lengths
are calibrated to a target duration once, after a warm-up (at least one step or call, so
a CNN measured block is one call of several seconds). Measurements:

* ``ics``: :func:`icstools.functional.gradients.gradient_ics`, layers found by its own
  extra forward;
* ``ics_layers_given``: the same with ``layers=parameter_layers(...)`` computed once;
* ``landscape``: :func:`icstools.functional.gradients.landscape_probe`, 5 step sizes,
  gradient computed;
* ``landscape_grad_given``: the same with the training step's gradient given (``grad=``).

Models: ``paper_mlp(bn=False)``, ``paper_mlp(bn=True)`` (784-100-100-100-10, sigmoid) on
``[60, 784]`` inputs in [0, 1], and ``small_cnn(in_channels=1)`` (32-64-64 channels, 3×3 convs,
BN, ReLU) on ``[60, 1, 28, 28]``.

Usage::

    .venv/bin/python bench/gradients.py            # full run (a few minutes on 2 cores)
    .venv/bin/python bench/gradients.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LR, MLP_BATCH, RESULTS, loadavg, machine_info, write_json

from icstools.experiments import paper_mlp, small_cnn
from icstools.functional.gradients import gradient_ics, landscape_probe
from icstools.functional.layers import parameter_layers

MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
MEASUREMENTS = ("ics", "ics_layers_given", "landscape", "landscape_grad_given")


def build(name: str, seed: int = 0) -> tuple[nn.Module, Iterator[tuple[torch.Tensor, ...]]]:
    """Model and an endless stream of random batches (a pool of 16) for one case."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if name.startswith("mlp"):
        model: nn.Module = paper_mlp(bn=name == "mlp_bn1")
        xs = torch.rand(16, MLP_BATCH, 28 * 28, generator=gen)
    elif name == "cnn":
        model = small_cnn(in_channels=1)
        xs = torch.rand(16, MLP_BATCH, 1, 28, 28, generator=gen)
    else:
        raise ValueError(f"unknown case {name!r}")
    ys = torch.randint(0, 10, (16, MLP_BATCH), generator=gen)

    def stream() -> Iterator[tuple[torch.Tensor, ...]]:
        i = 0
        while True:
            yield xs[i], ys[i]
            i = (i + 1) % len(xs)

    return model, stream()


class Bench:
    """One model, its optimizer and data, and the two kinds of timed blocks."""

    def __init__(self, case: str) -> None:
        self.case = case
        self.model, self.data = build(case)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.loss_fn = nn.CrossEntropyLoss()
        x, _ = next(self.data)
        self.layers = parameter_layers(self.model, x)

    def plain(self, k: int) -> tuple[float, float]:
        """Wall and CPU seconds of ``k`` training steps."""
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(k):
            x, y = next(self.data)
            loss = self.loss_fn(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    def measurement(self, what: str) -> Callable[[], object]:
        """A call of one measurement on the next batch; set-up (updated weights, the training
        gradient) is done here, outside the timed region."""
        x, y = next(self.data)
        model, loss_fn = self.model, self.loss_fn
        # stand-in for W^{t+1}: the values only matter for what is measured, not its cost
        updated = {n: p.detach() * 1.001 for n, p in model.named_parameters()}
        if what == "ics":
            return lambda: gradient_ics(model, loss_fn, x, y, updated)
        if what == "ics_layers_given":
            return lambda: gradient_ics(model, loss_fn, x, y, updated, layers=self.layers)
        if what == "landscape":
            return lambda: landscape_probe(model, loss_fn, x, y, LR, MULTIPLIERS)
        if what == "landscape_grad_given":
            self.opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            grad = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            self.opt.zero_grad(set_to_none=True)
            return lambda: landscape_probe(model, loss_fn, x, y, LR, MULTIPLIERS, grad=grad)
        raise ValueError(f"unknown measurement {what!r}")

    def measured(self, what: str, j: int) -> tuple[float, float]:
        """Wall and CPU seconds of ``j`` measurements."""
        calls = [self.measurement(what) for _ in range(j)]
        c0, t0 = time.process_time(), time.perf_counter()
        for call in calls:
            call()
        return time.perf_counter() - t0, time.process_time() - c0


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def passes(bench: Bench, what: str) -> str:
    """Forward/backward passes one measurement makes (for reading the ratios)."""
    k = len(bench.layers)
    if what == "ics":
        return f"{k} fwd+bwd + 1 no-grad fwd"
    if what == "ics_layers_given":
        return f"{k} fwd+bwd"
    if what == "landscape":
        return f"{1 + len(MULTIPLIERS)} fwd+bwd"
    return f"{len(MULTIPLIERS)} fwd+bwd + 1 no-grad fwd"


def run_case(case: str, pairs: int, block_seconds: float) -> dict[str, Any]:
    bench = Bench(case)
    t_case = time.perf_counter()
    # warm-up, then calibrate block lengths to about block_seconds each
    bench.plain(3)
    step_s = bench.plain(5)[0] / 5
    k = max(1, round(block_seconds / step_s))
    out: dict[str, Any] = {
        "case": case,
        "layers": [layer.name for layer in bench.layers],
        "plain_steps_per_block": k,
        "measurements": {},
    }
    for what in MEASUREMENTS:
        bench.measured(what, 1)
        one = bench.measured(what, 2)[0] / 2
        j = max(1, round(block_seconds / one))
        ratios, cpu_ratios, plain_ms, meas_ms = [], [], [], []
        for i in range(pairs):
            order = ("plain", "measured") if i % 2 == 0 else ("measured", "plain")
            res = {
                side: bench.plain(k) if side == "plain" else bench.measured(what, j)
                for side in order
            }
            (pw, pc), (mw, mc) = res["plain"], res["measured"]
            ratios.append((mw / j) / (pw / k))
            cpu_ratios.append((mc / j) / (pc / k))
            plain_ms.append(pw / k * 1e3)
            meas_ms.append(mw / j * 1e3)
            print(
                f"  {case} {what} pair {i + 1}/{pairs}: plain {pw / k * 1e3:8.2f} ms/step, "
                f"measurement {mw / j * 1e3:9.2f} ms, ratio {ratios[-1]:6.2f}",
                flush=True,
            )
        q1, q3 = _quartiles(ratios)
        out["measurements"][what] = {
            "passes": passes(bench, what),
            "calls_per_block": j,
            "ratio_median": statistics.median(ratios),
            "ratio_q1": q1,
            "ratio_q3": q3,
            "ratio_pairs": ratios,
            "ratio_of_fastest_blocks": min(meas_ms) / min(plain_ms),
            "cpu_ratio_median": statistics.median(cpu_ratios),
            "plain_ms_per_step": statistics.median(plain_ms),
            "measurement_ms": statistics.median(meas_ms),
        }
    out["seconds"] = time.perf_counter() - t_case
    out["loadavg_after"] = loadavg()
    return out


def print_table(results: list[dict[str, Any]]) -> None:
    head = (
        f"{'case':<7} {'measurement':<21} {'passes':<26} {'plain ms':>8} {'meas ms':>9} "
        f"{'ratio':>6} {'[q1, q3]':>14} {'fastest':>7} {'cpu':>6}"
    )
    print("\ncost of one measurement in training steps (median over pairs of blocks)")
    print(head)
    print("-" * len(head))
    for r in results:
        for what, m in r["measurements"].items():
            print(
                f"{r['case']:<7} {what:<21} {m['passes']:<26} {m['plain_ms_per_step']:8.2f} "
                f"{m['measurement_ms']:9.2f} {m['ratio_median']:6.2f} "
                f"[{m['ratio_q1']:5.2f},{m['ratio_q3']:6.2f}] "
                f"{m['ratio_of_fastest_blocks']:7.2f} {m['cpu_ratio_median']:6.2f}"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=None, help="pairs of blocks per figure (7)")
    p.add_argument("--block-seconds", type=float, default=None, help="block length (1.0 s)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 pairs of 0.3 s blocks")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    p.add_argument("--cases", default="", help="regex over mlp_bn0, mlp_bn1, cnn")
    p.add_argument("--out", type=Path, default=RESULTS / "gradients.json", help="JSON output")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    pairs = args.pairs or (3 if args.quick else 7)
    block = args.block_seconds or (0.3 if args.quick else 1.0)
    if pairs < 1 or block <= 0:
        p.error("--pairs must be ≥ 1 and --block-seconds > 0")
    cases = [c for c in ("mlp_bn0", "mlp_bn1", "cnn") if re.search(args.cases, c)]
    if not cases:
        p.error("no case matches")
    info = machine_info()
    print(
        f"torch {info['torch']}, {info['torch_threads']} threads, {info['cpu_model']} "
        f"({info['cpu_count']} CPUs), load {info['loadavg_at_start']}"
    )
    results = []
    for case in cases:
        print(f"\n== {case}: {pairs} pairs of ~{block:g} s blocks", flush=True)
        results.append(run_case(case, pairs, block))
    print_table(results)
    info["loadavg_at_end"] = loadavg()
    write_json(
        args.out,
        {
            "machine": info,
            "method": "alternating plain/measured blocks on one model in one process; figure "
            "= median over pairs of (time per measurement) / (time per plain SGD step, "
            "batch 60)",
            "quick": args.quick,
            "multipliers": list(MULTIPLIERS),
            "lr": LR,
            "batch": MLP_BATCH,
            "cases": results,
        },
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

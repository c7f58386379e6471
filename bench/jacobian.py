"""Time per Jacobian spectrum: ``icstools.functional.jacobians`` vs the loop a user would write.

Block: ``Linear(d, d) -> BatchNorm1d(d) (train mode) -> Tanh``, inputs ``[B, d]`` ~ N(0, 1).

* **exact**, widths 100, 512 (``B = 60``, the paper's batch) and 2048 (``B = 16``). The naive
  approach: one forward of the batch with ``x.requires_grad_()``, then for each example ``i`` a
  Python loop of ``torch.autograd.grad(y[i, j], x, retain_graph=True)[0][i]`` over the ``d``
  output rows, then ``numpy.linalg.svd(J)`` (numpy's default, with U and V). With BN in train
  mode this is the diagonal block of the whole-batch Jacobian, i.e. ``bn="full"``, which is the
  like-for-like comparison; ``bn="fixed"`` is timed too. The naive loop is timed on a few
  examples (at 2048 on the first 128 of 2048 rows of one example, extrapolated linearly) and the
  SVD on one Jacobian; both are per spectrum. ``icstools`` is timed on the whole batch (median
  of repeats) and divided by ``B``. Speedup = naive / icstools, measured in the same process.
  The values from both are compared (``max |Δσ| / σ_max``) where the naive loop was complete.
* **matrix_free**: the 8 largest singular values of a 4096-wide block, ``B = 8``
  (``method="matrix_free"``, default tolerance), per batch and per spectrum.

Targets: ≥ 20× faster than the naive loop at width 512; top-8 of a 4096-wide block in < 2 s.

Usage::

    .venv/bin/python bench/jacobian.py            # full run (~2.5 min on 2 quiet cores)
    .venv/bin/python bench/jacobian.py --quick    # smoke run (widths 100 and 512, top-8 at 1024)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, loadavg, machine_info, write_json

from icstools.functional.jacobians import jacobian_spectrum

TARGET_SPEEDUP_512 = 20.0
TARGET_TOP8_4096_S = 2.0


def block(d: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.Tanh()).train()


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall s, process CPU s, result) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def naive(blk: nn.Module, x: torch.Tensor, examples: int, rows: int | None) -> dict[str, Any]:
    """The loop a user would write; per-spectrum seconds (loop extrapolated when ``rows``)."""
    ref = copy.deepcopy(blk)  # its forward updates BN running statistics, as a user's would
    xg = x.clone().requires_grad_(True)
    t_fwd, _, y = timed(lambda: ref(xg))
    d_out = y.shape[1]
    n_rows = d_out if rows is None else min(rows, d_out)
    loop_s, loop_cpu, svd_s, svd_vals_s, sv = [], [], [], [], []
    for i in range(examples):

        def loop(i: int = i) -> torch.Tensor:
            grads = [
                torch.autograd.grad(y[i, j], xg, retain_graph=True)[0][i] for j in range(n_rows)
            ]
            return torch.stack(grads)

        w, c, J = timed(loop)
        loop_s.append(w * d_out / n_rows)
        loop_cpu.append(c * d_out / n_rows)
        if i == 0:
            Jn = J.detach().numpy()
            if n_rows < d_out:  # only the timing matters: complete with random rows
                rng = np.random.default_rng(0)
                extra = rng.normal(size=(d_out - n_rows, Jn.shape[1])).astype(Jn.dtype)
                Jn = np.concatenate([Jn, extra])
            w, _, usv = timed(lambda m=Jn: np.linalg.svd(m))
            svd_s.append(w)
            w, _, _ = timed(lambda m=Jn: np.linalg.svd(m, compute_uv=False))
            svd_vals_s.append(w)
            if n_rows == d_out:
                sv.append(usv[1])
    per = statistics.mean(loop_s) + statistics.mean(svd_s)
    return {
        "examples_timed": examples,
        "rows_timed": n_rows,
        "rows": d_out,
        "extrapolated": n_rows < d_out,
        "forward_s": t_fwd,
        "loop_s_per_spectrum": statistics.mean(loop_s),
        "loop_cpu_s_per_spectrum": statistics.mean(loop_cpu),
        "svd_uv_s": statistics.mean(svd_s),
        "svd_values_only_s": statistics.mean(svd_vals_s),
        "s_per_spectrum": per,
        "s_per_spectrum_values_only_svd": statistics.mean(loop_s) + statistics.mean(svd_vals_s),
        "sv_example0": sv[0] if sv else None,
    }


def ours(blk: nn.Module, x: torch.Tensor, repeats: int, **kw: Any) -> dict[str, Any]:
    walls, cpus = [], []
    res = None
    for _ in range(repeats):
        w, c, res = timed(lambda: jacobian_spectrum(blk, x, **kw))
        walls.append(w)
        cpus.append(c)
    assert res is not None
    B = x.shape[0]
    return {
        "s_per_batch": statistics.median(walls),
        "s_per_batch_all": walls,
        "cpu_s_per_batch": statistics.median(cpus),
        "s_per_spectrum": statistics.median(walls) / B,
        "method": res.method,
        "iterations": res.iterations,
        "converged": bool(res.converged.all()),
        "sv": res.sv,
    }


def exact_case(d: int, B: int, naive_examples: int, rows: int | None, repeats: int) -> dict:
    blk = block(d)
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(1))
    jacobian_spectrum(blk, x[:4], bn="full")  # warm-up (first-call overheads)
    print(f"\n== exact, width {d}, B = {B}", flush=True)
    nv = naive(blk, x, naive_examples, rows)
    full = ours(blk, x, repeats, bn="full", method="exact")
    fixed = ours(blk, x, repeats, bn="fixed", method="exact")
    err = None
    if nv["sv_example0"] is not None:
        ref = torch.as_tensor(nv["sv_example0"], dtype=full["sv"].dtype)
        err = float(((full["sv"][0] - ref).abs().max() / ref[0]).item())
    out = {
        "width": d,
        "batch": B,
        "naive": {k: v for k, v in nv.items() if k != "sv_example0"},
        "icstools_full": {k: v for k, v in full.items() if k != "sv"},
        "icstools_fixed": {k: v for k, v in fixed.items() if k != "sv"},
        "speedup_full": nv["s_per_spectrum"] / full["s_per_spectrum"],
        "speedup_fixed": nv["s_per_spectrum"] / fixed["s_per_spectrum"],
        "speedup_full_vs_values_only_svd": nv["s_per_spectrum_values_only_svd"]
        / full["s_per_spectrum"],
        "max_rel_diff_vs_naive": err,
    }
    ext = f" (loop extrapolated from {nv['rows_timed']} rows)" if nv["extrapolated"] else ""
    print(
        f"naive: loop {nv['loop_s_per_spectrum']:.3f} s + numpy svd {nv['svd_uv_s']:.3f} s "
        f"(values only {nv['svd_values_only_s']:.3f} s) per spectrum{ext}"
    )
    print(
        f"icstools full: {full['s_per_spectrum'] * 1e3:.1f} ms/spectrum, fixed: "
        f"{fixed['s_per_spectrum'] * 1e3:.1f} ms/spectrum; speedup {out['speedup_full']:.1f}× "
        f"(full), {out['speedup_fixed']:.1f}× (fixed); max |Δσ|/σ_max vs naive: {err}",
        flush=True,
    )
    return out


def topk_case(d: int, B: int, k: int, repeats: int) -> dict:
    blk = block(d)
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(2))
    jacobian_spectrum(blk, x, k=k, method="matrix_free", maxiter=2)  # warm-up
    print(f"\n== matrix-free top-{k}, width {d}, B = {B}", flush=True)
    r = ours(blk, x, repeats, k=k, method="matrix_free")
    print(
        f"{r['s_per_batch']:.2f} s per batch of {B} ({r['s_per_spectrum']:.3f} s/spectrum), "
        f"{r['iterations']} block steps, converged: {r['converged']}; runs {r['s_per_batch_all']}",
        flush=True,
    )
    out = {k2: v for k2, v in r.items() if k2 != "sv"}
    out.update(width=d, batch=B, k=k, sv_example0_top3=r["sv"][0, :3].tolist())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (widths 100, 512; top-8 1024)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of icstools per case (3)")
    p.add_argument("--out", type=Path, default=RESULTS / "jacobian.json", help="JSON output")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    info = machine_info()
    print(
        f"torch {info['torch']}, {info['torch_threads']} threads, {info['cpu_model']} "
        f"({info['cpu_count']} CPUs), load {info['loadavg_at_start']}"
    )
    exact = [exact_case(100, 60, 5, None, args.repeats), exact_case(512, 60, 2, None, args.repeats)]
    if not args.quick:
        exact.append(exact_case(2048, 16, 1, 128, max(1, args.repeats - 1)))
    top = topk_case(1024 if args.quick else 4096, 8, 8, args.repeats)
    info["loadavg_at_end"] = loadavg()

    print("\nper spectrum (naive: autograd.grad loop over rows + numpy.linalg.svd with U, V)")
    head = f"{'width':>6} {'B':>3} {'naive s':>9} {'full ms':>9} {'fixed ms':>9}"
    head += f" {'×full':>7} {'×fixed':>7}"
    print(head + "  note")
    print("-" * (len(head) + 6))
    for c in exact:
        note = "naive extrapolated" if c["naive"]["extrapolated"] else ""
        print(
            f"{c['width']:6d} {c['batch']:3d} {c['naive']['s_per_spectrum']:9.3f} "
            f"{c['icstools_full']['s_per_spectrum'] * 1e3:9.1f} "
            f"{c['icstools_fixed']['s_per_spectrum'] * 1e3:9.1f} {c['speedup_full']:7.1f} "
            f"{c['speedup_fixed']:7.1f}  {note}"
        )
    at512 = next(c for c in exact if c["width"] == 512)
    met512 = at512["speedup_full"] >= TARGET_SPEEDUP_512
    print(
        f"\nspeedup at 512 (bn='full', like for like): {at512['speedup_full']:.1f}× "
        f"(target ≥ {TARGET_SPEEDUP_512:.0f}×: {'met' if met512 else 'MISSED'}); "
        f"bn='fixed': {at512['speedup_fixed']:.1f}×; vs a values-only numpy SVD: "
        f"{at512['speedup_full_vs_values_only_svd']:.1f}×"
    )
    met_top = top["s_per_batch"] < TARGET_TOP8_4096_S
    print(
        f"top-8 of a {top['width']}-wide block: {top['s_per_batch']:.2f} s for B = "
        f"{top['batch']} ({top['s_per_spectrum']:.3f} s/spectrum; target < "
        f"{TARGET_TOP8_4096_S:.0f} s at 4096: {'met' if met_top else 'MISSED'} per batch)"
    )
    write_json(
        args.out,
        {
            "machine": info,
            "quick": args.quick,
            "exact": exact,
            "top8": top,
            "targets": {
                "speedup_512": TARGET_SPEEDUP_512,
                "speedup_512_met": met512,
                "top8_4096_s": TARGET_TOP8_4096_S,
                "top8_met": met_top,
            },
        },
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

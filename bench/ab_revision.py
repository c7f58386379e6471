"""Recording overhead of this checkout against an earlier revision, in ONE process.

Comparing two runs of ``overhead.py`` made at different times mixes the change with the
machine's load (on these shared machines a plain MLP step varied from 0.5 to 1.0 ms within
minutes). This script instead imports both versions into one process: the earlier revision's
``icstools`` package is exported with ``git archive`` into a temporary folder and renamed
``icstools_rev`` (every ``icstools`` name in its sources rewritten). For every case of
``overhead.py`` one model, optimizer and data stream are built, and one recorder of each
version; then rounds of three blocks (plain, revision, this checkout) are timed on that model
in rotating order (all 6 orders in turn), and each round gives ``revision/plain``,
``checkout/plain`` and their quotient ``checkout/revision``. Printed and written to JSON: per
case the medians over rounds of both ratios and of the quotient.

Usage::

    .venv/bin/python bench/ab_revision.py --rev 168ad89            # all cases (~35 min)
    .venv/bin/python bench/ab_revision.py --rev HEAD~3 --cases mlp --rounds 12
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    LR,
    RESULTS,
    build,
    cnn_batches,
    machine_info,
    make_step,
    mlp_batches,
    write_json,
)
from overhead import Case, all_cases

REPO = Path(__file__).resolve().parents[1]
ORDERS = list(itertools.permutations(("plain", "rev", "new")))


def export_revision(rev: str, into: Path) -> str:
    """Write ``rev``'s ``icstools`` package to ``into/icstools_rev``; return its commit."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = into / "rev.tar"
    subprocess.run(
        ["git", "archive", "--format=tar", "-o", str(archive), commit, "icstools"],
        cwd=REPO,
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    shutil.move(into / "icstools", into / "icstools_rev")
    for f in (into / "icstools_rev").rglob("*.py"):
        f.write_text(re.sub(r"\bicstools\b", "icstools_rev", f.read_text(encoding="utf-8")))
    return commit


def run_case(case: Case, rev: Any, new: Any, rounds: int, data: str, tmp: Path) -> dict:
    model = build(case.model, case.bn)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    stream = mlp_batches(data)[0] if case.model == "mlp" else cnn_batches()
    recs = {
        tag: mod.Recorder(
            model,
            every=case.every,
            optimizer=opt,
            gradients=case.gradients,
            path=tmp / f"{case.name}-{tag}.zarr" if case.store else None,
        )
        for tag, mod in (("rev", rev), ("new", new))
    }
    steps = {"plain": make_step(model, opt, stream)}
    for tag, rec in recs.items():
        steps[tag] = make_step(model, opt, stream, log=lambda loss, rec=rec: rec.log(loss=loss))

    def block(tag: str, k: int) -> float:
        rec = recs.get(tag)
        if rec is not None:
            rec.attach()
        try:
            t0 = time.perf_counter()
            for _ in range(k):
                steps[tag]()
            if rec is not None:
                rec.flush()  # inside the timed region, as in overhead.py
            return time.perf_counter() - t0
        finally:
            if rec is not None:
                rec.detach()

    k = case.steps_per_block
    for tag in ("plain", "rev", "new"):
        block(tag, max(2 * case.every, k // 4))  # warm-up; fixes each run's layout
    rows = []
    for i in range(rounds):
        t = {tag: block(tag, k) for tag in ORDERS[i % len(ORDERS)]}
        rows.append((t["rev"] / t["plain"], t["new"] / t["plain"], t["new"] / t["rev"]))
        print(
            f"  {case.name} round {i + 1}/{rounds}: rev {rows[-1][0]:.3f}  "
            f"new {rows[-1][1]:.3f}  new/rev {rows[-1][2]:.3f}",
            flush=True,
        )
    for rec in recs.values():
        rec.close()
    return {
        "case": case.name,
        "rounds": rounds,
        "steps_per_block": k,
        "rev_ratio_median": statistics.median(r[0] for r in rows),
        "new_ratio_median": statistics.median(r[1] for r in rows),
        "new_over_rev_median": statistics.median(r[2] for r in rows),
        "rounds_rev_new_quotient": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", required=True, help="the earlier revision (any git revision)")
    p.add_argument("--cases", default="", help="regex: only cases whose name matches")
    p.add_argument("--rounds", type=int, default=10, help="rounds per MLP case (CNN: half)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    p.add_argument("--data", default="auto", choices=("auto", "mnist", "random"))
    p.add_argument("--out", type=Path, default=RESULTS / "ab_revision.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="registration of accessor")  # both register .ics
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        commit = export_revision(args.rev, tmp)
        sys.path.insert(0, str(tmp))
        rev = importlib.import_module("icstools_rev")
        new = importlib.import_module("icstools")
        results = []
        for case in all_cases():
            if args.cases and not re.search(args.cases, case.name):
                continue
            rounds = args.rounds if case.model == "mlp" else max(3, args.rounds // 2)
            print(f"== {case.name}: {rounds} rounds of 3 blocks of {case.steps_per_block} steps")
            results.append(run_case(case, rev, new, rounds, args.data, tmp))
    print(f"\n{'case':<26} {'rev/plain':>10} {'new/plain':>10} {'new/rev':>8}")
    for r in results:
        print(
            f"{r['case']:<26} {r['rev_ratio_median']:10.3f} {r['new_ratio_median']:10.3f} "
            f"{r['new_over_rev_median']:8.3f}"
        )
    write_json(args.out, {"machine": machine_info(), "rev": commit, "cases": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Wall time of ``icstools run PRESET`` serial vs ``--workers N`` (a local dask cluster).

Issue 13 asks for the wall time of ``icstools run fig1 --quick`` and of the full ``noisy-bn``
with ``--workers 2`` vs serial on this 2-core machine. Each case runs the command itself, as a
user types it, in a subprocess (``python -m icstools.cli run PRESET [--quick] --out TMP --quiet
[--workers N]``), timed from start to exit (so the cluster's start-up, each worker's imports and
MNIST loading are included). The two modes alternate (serial first for the first case, workers
first for the next), so that a slow drift of the machine's load does not favour one side; the
load average (1, 5, 15 min) is recorded before and after each command, since the figures mean
little on a machine shared with other work. Afterwards the stores of both modes are compared
bit for bit (every variable's bytes and the attributes), as tests/test_cluster.py does.

Usage::

    .venv/bin/python bench/sweep_wall.py       # fig1 --quick, noisy-bn --quick, full noisy-bn
    .venv/bin/python bench/sweep_wall.py --cases fig1-quick    # one case (~1 min on idle cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, loadavg, machine_info, write_json

from icstools.experiments import load_manifest
from icstools.store import open_run

#: case name → (preset, extra options of ``icstools run``)
CASES = {
    "fig1-quick": ("fig1", ["--quick"]),
    "noisy-bn-quick": ("noisy-bn", ["--quick"]),
    "noisy-bn": ("noisy-bn", []),
}


def timed_run(preset: str, extra: list[str], out: Path, workers: int | None) -> dict[str, Any]:
    """``icstools run PRESET EXTRA --out OUT --quiet [--workers N]`` in a subprocess, timed."""
    cmd = [sys.executable, "-m", "icstools.cli", "run", preset, *extra, "--out", str(out)]
    cmd += ["--quiet"] + ([] if workers is None else ["--workers", str(workers)])
    before = loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    m = load_manifest(out / preset)
    return {
        "command": "icstools " + " ".join(cmd[3:]),
        "wall_time": wall,
        "runs": len(m.runs),
        "sum_of_run_wall_times": sum(r.wall_time for r in m.runs),
        "loadavg_before": before,
        "loadavg_after": loadavg(),
    }


def same_stores(a: Path, b: Path) -> bool:
    """Every run store of manifest ``a`` equals ``b``'s bit for bit (attributes but the path)."""
    ma, mb = load_manifest(a), load_manifest(b)
    if [r.path for r in ma.runs] != [r.path for r in mb.runs]:
        return False
    for ra, rb in zip(ma.runs, mb.runs, strict=True):
        da, db = open_run(ma.run_path(ra)), open_run(mb.run_path(rb))
        ca, cb = (json.loads(d.attrs.pop("recorder_config")) for d in (da, db))
        ca.pop("path"), cb.pop("path")
        if ca != cb or da.attrs != db.attrs or set(da.variables) != set(db.variables):
            return False
        for name in da.variables:
            if da[name].values.tobytes() != db[name].values.tobytes():
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma list of " + str(list(CASES))
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS / "sweep_wall.json", help="output")
    args = parser.parse_args()
    if not os.environ.get("ICSTOOLS_DATA"):
        sys.exit("set ICSTOOLS_DATA to the MNIST folder (see data/README.md)")
    result: dict[str, Any] = {"machine": machine_info(), "workers": args.workers, "cases": {}}
    path = args.json
    for i, case in enumerate(args.cases.split(",")):
        preset, extra = CASES[case]
        with tempfile.TemporaryDirectory(prefix="icstools-sweep-wall-") as tmp:
            modes = [("serial", None), ("workers", args.workers)]
            rows = {}
            for mode, workers in modes if i % 2 == 0 else modes[::-1]:
                rows[mode] = timed_run(preset, extra, Path(tmp) / mode, workers)
                print(f"{case:<10} {mode:<8} {rows[mode]['wall_time']:7.1f} s  "
                      f"({rows[mode]['runs']} runs; load {rows[mode]['loadavg_before']})",
                      flush=True)  # fmt: skip
            rows["speedup"] = rows["serial"]["wall_time"] / rows["workers"]["wall_time"]
            rows["identical_stores"] = same_stores(
                Path(tmp) / "serial" / preset, Path(tmp) / "workers" / preset
            )
        print(f"{case:<10} speed-up {rows['speedup']:.2f}x with --workers {args.workers}; "
              f"stores identical: {rows['identical_stores']}", flush=True)  # fmt: skip
        result["cases"][case] = rows
        write_json(path, result)  # after each case: a long case may be stopped
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

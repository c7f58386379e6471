"""Size of the interactive HTML report of one long run, and what takes the room.

Records one run of a 20-site MLP (20 hidden layers of 32 units, ReLU and sigmoid alternating,
their inputs recorded: 640 units), ``--steps`` steps (1,000) recorded every step with a probe
(64 examples) and gradients, then writes its report with ``icstools.report.write_report`` and
prints the HTML's size, the share of each part of the run's embedded data, and the wall time
of recording and of the report. Writes ``bench/results/report_size.json``.

Usage::

    .venv/bin/python bench/report_size.py              # 1,000 records (~5-10 min on 2 cores)
    .venv/bin/python bench/report_size.py --steps 200  # smoke run
    .venv/bin/python bench/report_size.py --store /tmp/r.zarr  # reuse a recorded store
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import icstools
from icstools.report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info


def record(path: Path, steps: int) -> None:
    """The 20-site run (seed 0), recorded every step."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    d = 16
    for i in range(20):
        layers += [nn.Linear(d, 32), nn.Sigmoid() if i % 2 else nn.ReLU()]
        d = 32
    model = nn.Sequential(*layers, nn.Linear(d, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = icstools.Recorder(
        model,
        (nn.Sigmoid, nn.ReLU),
        role="input",
        every=1,
        optimizer=opt,
        probe=torch.randn(64, 16),
        gradients=True,
        path=path,
    )
    with rec:
        for _ in range(steps):
            x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--store", type=Path, help="an existing store to report on (no recording)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp) / "run.zarr"
        t0 = time.perf_counter()
        if args.store is None:
            record(store, args.steps)
        t_record = time.perf_counter() - t0
        ds = icstools.open_run(store)
        t0 = time.perf_counter()
        result = write_report([store], Path(tmp) / "report.html")
        t_report = time.perf_counter() - t0
        page = result.html_path.read_text(encoding="utf-8")
    blocks = re.findall(r'<script type="application/json" id="ics-data-r0">(.*?)</script>', page)
    parts = {k: len(json.dumps(v, separators=(",", ":"))) for k, v in json.loads(blocks[0]).items()}
    pngs = sum(len(x) for x in re.findall(r"base64,[A-Za-z0-9+/=]+", page))
    out = {
        "records": int(ds.sizes["step"]),
        "sites": int(ds.sizes["site"]),
        "units": int(ds.sizes["unit"]),
        "html_bytes": len(page.encode("utf-8")),
        "data_bytes_by_part": parts,
        "png_base64_bytes": pngs,
        "record_seconds": round(t_record, 1),
        "report_seconds": round(t_report, 1),
        "machine": machine_info(),
    }
    print(f"{out['records']} records, {out['sites']} sites, {out['units']} units")
    print(f"HTML: {out['html_bytes'] / 1e6:.2f} MB (static PNG figures {pngs / 1e6:.2f} MB)")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  data {k:10s} {v / 1e3:8.1f} kB")
    print(f"recording {t_record:.0f} s, report {t_report:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "report_size.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Coverage of compare's 95% intervals at 3, 5 and 10 seeds: the t intervals vs the bootstraps.

Prints, for each interval method, comparison kind (difference, ratio, paired difference, paired
ratio), null family (normal, lognormal, t3; see :mod:`icstools.analysis.calibration`) and seed
count, the share of simulated experiments whose interval covers the truth, and the median width
relative to the truth. Then the tanh saturation comparison of the ``saturating`` preset,
reconstructed from its published per-condition summaries (0.023 ± 0.001 with BN vs
0.48 ± 0.05 without, 3 seeds each; the runs' stores were not kept), under every method.
Writes ``bench/results/interval_calibration.json``.

Usage::

    python bench/interval_calibration.py            # t: 20,000 experiments, bootstraps 4,000
    python bench/interval_calibration.py --quick    # 2,000 / 1,000 (about 20 s)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import xarray as xr

import icstools
from icstools.analysis.calibration import coverage_table

RESULTS = Path(__file__).resolve().parent / "results"

#: Per-seed sat_frac_mean of the tanh networks, reconstructed from README's summary
#: (mean ± sd over 3 seeds): the only information kept from those runs.
TANH_BN = [0.022, 0.023, 0.024]
TANH_BASELINE = [0.43, 0.48, 0.53]


def tanh_check() -> pd.DataFrame:
    runs = {
        "tanh": [xr.Dataset({"sat": ((), v)}) for v in TANH_BASELINE],
        "tanh-bn": [xr.Dataset({"sat": ((), v)}) for v in TANH_BN],
    }
    rows = []
    for method in ("t", "studentized", "bca", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the rank-test floor with 3 vs 3 seeds
            row = icstools.compare(runs, "sat", ci_method=method).iloc[0]
        rows.append(
            {
                "method": method,
                "diff_method": row.diff_method,
                "diff": row["diff"],
                "diff_lo": row.diff_lo,
                "diff_hi": row.diff_hi,
                "excludes_0": bool(row.diff_hi < 0 or row.diff_lo > 0),
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer experiments")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    reps_t, reps_boot = (2000, 1000) if args.quick else (20_000, 4000)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 500)
    t0 = time.perf_counter()
    tables = [coverage_table(["t"], reps=reps_t, seed=args.seed)]
    tables.append(
        coverage_table(
            ["studentized", "bca", "percentile"], reps=reps_boot, seed=args.seed, n_resamples=999
        )
    )
    table = pd.concat(tables, ignore_index=True)
    elapsed = time.perf_counter() - t0
    cov = table.pivot_table(index=["kind", "family"], columns=["method", "n"], values="coverage")
    width = table.pivot_table(
        index=["kind", "family"], columns=["method", "n"], values="median_width"
    )
    print(
        f"Coverage of the nominal 95% interval ({reps_t} experiments per cell for 't', "
        f"{reps_boot} with 999 resamples for the bootstraps; seed {args.seed}):"
    )
    print(cov.round(3).to_string())
    print("\nMedian width / |truth|:")
    print(width.round(2).to_string())
    inside = table[table.method == "t"]
    ok = inside[(inside.coverage >= 0.93) & (inside.coverage <= 0.97)]
    print(f"\n't' cells inside [0.93, 0.97]: {len(ok)} of {len(inside)}")
    for _, r in inside[~inside.index.isin(ok.index)].iterrows():
        print(f"  outside: {r.kind} / {r.family} / n={r.n}: {r.coverage:.5f}")
    for m in ("studentized", "bca", "percentile"):
        sub = table[table.method == m]
        n_in = int(((sub.coverage >= 0.93) & (sub.coverage <= 0.97)).sum())
        print(
            f"'{m}': coverage {sub.coverage.min():.3f}-{sub.coverage.max():.3f}, "
            f"cells inside [0.93, 0.97]: {n_in} of {len(sub)}"
        )
    tanh = tanh_check()
    print(
        "\ntanh sat_frac_mean, tanh-bn vs tanh, 3 seeds each, per-seed values reconstructed "
        f"from the published mean ± sd: BN {TANH_BN}, baseline {TANH_BASELINE}"
    )
    print(tanh.round(4).to_string(index=False))
    print(f"\n(elapsed {elapsed:.1f} s)")
    RESULTS.mkdir(exist_ok=True)
    out = {
        "reps_t": reps_t,
        "reps_bootstrap": reps_boot,
        "seed": args.seed,
        "coverage": table.to_dict(orient="records"),
        "tanh": tanh.to_dict(orient="records"),
        "elapsed_s": elapsed,
    }
    (RESULTS / "interval_calibration.json").write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

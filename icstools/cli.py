"""The ``icstools`` command.

``icstools demo`` trains the paper's MNIST network (784-100-100-100-10, sigmoid) with and
without Batch Normalization, records the inputs of every sigmoid on a fixed probe batch of test
images, writes both runs under ``data/runs/demo/`` and prints, per layer, how the sigmoid
inputs' distribution moved between the first and the last record.

Exit codes: 0 success, 2 a user mistake (bad option, missing data), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import xarray as xr

__all__ = ["demo_table", "main"]


def demo_table(ds: xr.Dataset, source: str = "probe") -> list[dict[str, object]]:
    """Per site, the first and last record's summary of the sigmoid inputs.

    Columns: mean over units of ``|mean|``, of ``var``, of the 15–85th percentile spread and of
    ``sat_frac``.

    Examples
    --------
    >>> rows = demo_table(ds)  # doctest: +SKIP
    """
    src = ds.sel(source=source)
    q15 = src["quantile_value"].sel(quantile=0.15, method="nearest")
    q85 = src["quantile_value"].sel(quantile=0.85, method="nearest")
    rows = []
    for site in ds.site.values:
        in_site = ds.unit_site == site
        for label, i in (("first", 0), ("last", -1)):
            sel = {"step": i}
            rows.append(
                {
                    "site": str(site),
                    "record": f"{label} (step {int(ds.step[i])})",
                    "mean|mean|": float(abs(src["mean"][sel]).where(in_site).mean()),
                    "mean var": float(src["var"][sel].where(in_site).mean()),
                    "q85-q15": float((q85 - q15)[sel].where(in_site).mean()),
                    "sat_frac": float(src["sat_frac"][sel].where(in_site).mean()),
                }
            )
    return rows


def _print_table(rows: list[dict[str, object]]) -> None:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(widths[c]) for c in cols))


def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _demo(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from icstools.experiments import paper_mlp, train_mnist
    from icstools.recorder import Recorder
    from icstools.store import open_run

    # The paper's MLP is small: one intra-op thread is faster than two, and does not thrash
    # when the machine is shared.
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, bn in (("baseline", False), ("bn", True)):
        torch.manual_seed(args.seed)
        model = paper_mlp(bn=bn)
        path = out / f"{name}.zarr"

        def make(model, opt, probe, path=path):
            return Recorder(
                model,
                torch.nn.Sigmoid,
                role="input",
                every=args.every,
                optimizer=opt,
                probe=probe,
                path=path,
                overwrite=True,
                seed=args.seed,
            )

        t0 = time.perf_counter()
        # disable=None: no bar when stderr is not a terminal (logs, CI)
        with tqdm(
            total=args.steps, desc=f"{name:8s}", unit="step", disable=True if args.quiet else None
        ) as bar:
            result = train_mnist(
                model,
                args.steps,
                lr=args.lr,
                seed=args.seed,
                recorder=make,
                progress=bar.update,
            )
        seconds = time.perf_counter() - t0
        ds = open_run(path)
        acc = result.accuracy[args.steps]
        summary[name] = acc
        print(
            f"\n{name}: {args.steps} steps in {seconds:.1f} s, test accuracy {acc:.4f}, "
            f"{ds.sizes['step']} records -> {path}"
        )
        _print_table(demo_table(ds))
    print(
        f"\nTest accuracy after {args.steps} steps: baseline {summary['baseline']:.4f}, "
        f"BN {summary['bn']:.4f}. Inspect the runs with icstools.open_run(path)."
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="icstools", description="Measure internal covariate shift in PyTorch training."
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="train the paper's MNIST MLP with and without BN and summarize its sigmoid inputs",
        description=__doc__.split("\n\n")[1],
    )
    d.add_argument("--steps", type=int, default=3000, help="optimizer steps per network (3000)")
    d.add_argument("--every", type=int, default=50, help="record every N steps (50)")
    d.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (0.5)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="data/runs/demo", help="folder of the two runs")
    d.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``icstools`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    for name in ("steps", "every", "threads"):
        if getattr(args, name, 1) < 1:
            print(
                f"icstools: error: --{name} must be ≥ 1, got {getattr(args, name)}", file=sys.stderr
            )
            return 2
    from icstools.data import MNISTError

    try:
        return args.func(args)
    except (MNISTError, FileNotFoundError) as exc:
        print(f"icstools: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

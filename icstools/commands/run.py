"""``icstools run``, ``list`` and ``demo``: experiment presets, run and listed."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from icstools.commands.common import EXIT_ERROR, EXIT_USAGE, PROG, UsageError, check_output
from icstools.commands.outputs import report

__all__ = ["demo", "list_presets", "parse_seeds", "positive", "run", "steps_list"]


def demo(args: argparse.Namespace) -> int:
    """``icstools run fig1`` at a reduced scale, then ``icstools report`` on its runs."""
    if args.steps < 1 or args.seeds < 1:
        raise UsageError(f"--steps and --seeds must be ≥ 1, got {args.steps} and {args.seeds}")
    out = Path(args.out)
    t0 = time.perf_counter()
    run_args = argparse.Namespace(
        preset="fig1",
        steps=args.steps,
        seeds=args.seeds,
        out=str(out),
        quick=False,
        quiet=args.quiet,
        data_dir=args.data_dir,
        threads=args.threads,
        conditions=None,
        argv=args.argv,
        # an earlier demo's finished runs are kept (same options), its others run again
        resume=not args.force,
        force=args.force,
        workers=None,
        scheduler=None,
    )
    code = run(run_args)
    if code:
        return code
    report_args = argparse.Namespace(
        inputs=[str(out / "fig1")],
        html=str(out / "fig1-report.html"),
        json=str(out / "fig1-report.json"),
    )
    print()
    code = report(report_args)
    print(
        f"demo: {time.perf_counter() - t0:.0f} s; open {report_args.html} in a browser (offline)."
    )
    return code


def parse_seeds(text: str) -> int | list[int]:
    """``"3"`` → 3 (seeds 0, 1, 2); ``"0,4,7"`` or ``"5,"`` → that list."""
    text = text.strip()
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
            if not seeds or any(s < 0 for s in seeds):
                raise ValueError
            return seeds
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of seeds (e.g. 3) or a comma list of seeds ≥ 0 (e.g. 0,4 or 5,), "
            f"got {text!r}"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"the number of seeds must be ≥ 1, got {n}")
    return n


def steps_list(text: str) -> list[int]:
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected steps as a comma list of whole numbers, got {text!r}"
        ) from None
    if not steps or min(steps) < 0:
        raise argparse.ArgumentTypeError(f"expected steps ≥ 0, got {text!r}")
    return steps


def positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {n}")
    return n


def run(args: argparse.Namespace) -> int:
    from icstools.experiments import get_preset, run_preset
    from icstools.experiments.cluster import RunsFailedError

    preset = get_preset(args.preset)  # PresetError (exit 2) before anything is written
    check_output("--out", args.out, file=False, sub=preset.name)
    try:
        manifest = run_preset(
            preset,
            steps=args.steps,
            seeds=args.seeds,
            out=args.out,
            quick=args.quick,
            progress=not args.quiet,
            data_dir=args.data_dir,
            threads=args.threads,
            conditions=args.conditions or None,
            command=[PROG, *args.argv],
            resume=args.resume,
            force=args.force,
            log=lambda line: print(f"{PROG}: {line}", file=sys.stderr),
            workers=args.workers,
            scheduler=args.scheduler,
        )
    except RunsFailedError as exc:  # on a cluster: the other runs finished and are kept
        print(exc.manifest.summary())
        print(f"\nmanifest: {exc.manifest.path}")
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE if exc.user_error else EXIT_ERROR
    print(manifest.summary())
    diverged = sum(r.diverged for r in manifest.runs)
    if diverged:
        print(f"\n{diverged} of {len(manifest.runs)} runs diverged (a result, not an error).")
    print(f"\nmanifest: {manifest.path}")
    return 0


def list_presets(args: argparse.Namespace) -> int:
    from icstools.experiments import PRESETS

    width = max(len(n) for n in PRESETS)
    for name, p in PRESETS.items():
        print(f"{name.ljust(width)}  {p.description}")
        if args.verbose:
            print(
                f"{''.ljust(width)}  {len(p.conditions)} conditions "
                f"({', '.join(c.name for c in p.conditions)}) × {len(p.seeds)} seeds × "
                f"{p.steps:,} steps (quick: {p.quick_steps:,} steps, 1 seed)"
            )
            for claim in p.claims:
                print(f"{''.ljust(width)}  - {claim}")
    return 0

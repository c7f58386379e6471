"""``icstools report``, ``figures`` and ``export``: what is made from recorded runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from icstools.commands.common import (
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    UsageError,
    check_output,
    print_table,
)

__all__ = ["export", "figures", "report"]


def figures(args: argparse.Namespace) -> int:
    """``icstools figures PRESET_DIR``: the paper's figures as PNG files."""
    from icstools.report.figures import write_figures

    folder = Path(args.preset_dir)
    if not (folder / "manifest.json").is_file():
        raise UsageError(
            f"{args.preset_dir!r} is not a preset's run folder (no manifest.json); give the "
            "folder an 'icstools run PRESET' wrote, e.g. data/runs/fig1"
        )
    out = args.out if args.out is not None else str(folder / "figures")
    check_output("--out", out, file=False)
    try:
        paths = write_figures(folder, out)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    for path in paths:
        print(path)
    return 0


def report(args: argparse.Namespace) -> int:
    inputs = [Path(p) for p in args.inputs]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise UsageError(f"no such run or folder: {', '.join(missing)}")
    try:
        from icstools.report import write_report
    except ImportError as exc:
        print(f"{PROG}: error: the drift report is not available: {exc}", file=sys.stderr)
        return 1
    from icstools.store import StoreError

    check_output("--html", args.html, file=True)
    if args.json is not None:
        check_output("--json", args.json, file=True)
        if Path(args.json).absolute() == Path(args.html).absolute():
            raise UsageError(
                f"--html and --json are the same file ({args.html}); give two different paths"
            )
    try:
        result = write_report(
            inputs,
            Path(args.html),
            None if args.json is None else Path(args.json),
            labels=getattr(args, "label", None),
        )
    except (ValueError, TypeError, StoreError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    rows = [
        {
            "verdict": str(v.get("verdict", "")),
            "claim": str(v.get("claim", "")),
            "measurement": str(v.get("measurement", "")),
        }
        for v in getattr(result, "verdicts", [])
    ]
    if rows:
        print_table(rows)
    print(f"\nreport: {args.html}" + (f", {args.json}" if args.json else ""))
    data = getattr(result, "data", {})
    for note in _notes(data, "skipped the run "):
        print(f"{PROG}: note: {' '.join(note.split())}", file=sys.stderr)
    skipped = _unreadable_runs(data)
    for note in skipped:
        print(
            f"{PROG}: error: {' '.join(note.split())}; it is left out of the report",
            file=sys.stderr,
        )
    return EXIT_USAGE if skipped else EXIT_OK


def _unreadable_runs(data: dict[str, Any]) -> list[str]:
    """The report's notes on runs it found but could not read (damaged or not a store)."""
    return _notes(data, "cannot open the run ")


def _notes(data: dict[str, Any], prefix: str) -> list[str]:
    """The report's notes (its own and its presets') that start with ``prefix``."""
    notes = [
        *data.get("notes", []),
        *(n for p in data.get("presets", []) for n in p.get("notes", [])),
    ]
    return [n for n in notes if isinstance(n, str) and n.startswith(prefix)]


def _export_targets(run: Path, logdir: Path) -> list[tuple[Path, Path]]:
    """(store, logdir) pairs: one run store, or each store under a folder of runs, into
    ``logdir/<its path under the folder, without .zarr>`` (one TensorBoard run each)."""
    if not run.exists():
        raise UsageError(f"no such run or folder: {run}")
    if (run / ".zmetadata").exists() or (run / "zarr.json").exists() or run.suffix == ".zarr":
        return [(run, logdir)]
    stores = sorted(p for p in run.rglob("*.zarr") if p.is_dir())
    if not stores:
        raise UsageError(
            f"{run} is neither a run store nor a folder holding run stores (*.zarr); give e.g. "
            "data/runs/readme.zarr or a preset's output folder such as data/runs/fig1"
        )
    return [(s, logdir / s.relative_to(run).with_suffix("")) for s in stores]


def export(args: argparse.Namespace) -> int:
    from icstools.store import StoreError

    try:
        from icstools.export import export_tensorboard
        from icstools.export.tensorboard import _summary_writer

        _summary_writer()  # the tensorboard package is there, before any work
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    targets = _export_targets(Path(args.run), Path(args.tensorboard))
    check_output("--tensorboard", args.tensorboard, file=False)
    for store, logdir in targets:
        try:
            out = export_tensorboard(
                store,
                logdir,
                sources=args.source,
                drift_metric=None if args.drift == "none" else args.drift,
                histograms=not args.no_histograms,
                overwrite=args.overwrite,
            )
        except (ValueError, StoreError) as exc:
            raise UsageError(f"{store}: {exc}") from None
        print(
            f"{store}: {out.steps} steps, {len(out.scalar_tags)} scalar and "
            f"{len(out.histogram_tags)} histogram tags -> {logdir}"
        )
        for note in out.notes:
            print(f"  note: {note}")
    print(f"\nview with: tensorboard --logdir {args.tensorboard}")
    return EXIT_OK

"""``icstools info RUN`` and ``icstools verify RUN...``: what a run store holds, and
whether its bytes are intact."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import xarray as xr

from icstools.commands.common import EXIT_OK, EXIT_USAGE, PROG, UsageError, print_table

__all__ = ["info", "verify"]


def _disk_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _info_manifest(path: Path, at: Sequence[int] = ()) -> int:
    from icstools.experiments import load_manifest

    try:
        manifest = load_manifest(path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"preset folder {path.resolve()} ({_human(_disk_size(path))} on disk)")
    print(
        f"created {manifest.created}, icstools {manifest.icstools_version}, "
        f"{'complete' if manifest.complete else 'INCOMPLETE (still running, or failed)'}"
    )
    if manifest.command:
        print(f"command {' '.join(manifest.command)}")
    print()
    if manifest.runs:
        print(manifest.summary())
    else:
        print(f"{manifest.preset}: no run finished yet")
    if at:
        print(f"\ntest accuracy at steps {', '.join(map(str, at))} (mean ± sd over seeds)")
        rows = []
        for cond in dict.fromkeys(r.condition for r in manifest.runs):
            runs = [r for r in manifest.runs if r.condition == cond]
            row: dict[str, object] = {"condition": cond, "runs": len(runs)}
            for step in at:
                vals = [
                    r.test_acc[step] if step in r.test_acc else r.final_test_acc
                    for r in runs
                    if step in r.test_acc or step == r.steps_done
                ]
                row[f"step {step}"] = (
                    "not evaluated"
                    if not vals
                    else f"{statistics.fmean(vals):.4f} ± "
                    f"{statistics.stdev(vals) if len(vals) > 1 else math.nan:.4f}"
                )
            rows.append(row)
        print_table(rows)
    print("\nstores:")
    for r in manifest.runs:
        print(f"  {manifest.run_path(r)}")
    return 0


def info(args: argparse.Namespace) -> int:
    from icstools.store import StoreError, open_run

    path = Path(args.run)
    if path.is_dir() and (path / "manifest.json").is_file() and not (path / ".zmetadata").exists():
        return _info_manifest(path, args.at or ())
    try:
        ds = open_run(path, chunks={})  # lazy: metadata only
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    try:
        if args.at:
            raise UsageError(
                f"--at applies to a preset folder (with manifest.json), not to the run store "
                f"{path}; give the preset's folder, e.g. data/runs/fig1, or leave out --at"
            )
        _load_shown(path, ds)
        lines = _info_lines(path, ds)  # all of it before printing: no partial output
    finally:
        ds.close()
    print("\n".join(lines))
    return 0


def _load_shown(path: Path, ds: xr.Dataset) -> None:
    """Read the values ``info`` shows (coordinates, loss, test_acc) into ``ds``.

    A damaged chunk becomes a :class:`~icstools.store.StoreError` naming the variable, as in
    :func:`~icstools.store.open_run`; the other variables are not read, so their damage goes
    unnoticed here (``report`` reads them).
    """
    from icstools.store import StoreError

    for name in [*ds.coords, *(n for n in ("loss", "test_acc") if n in ds.data_vars)]:
        try:
            ds.variables[name].load()  # in place
        except Exception as exc:  # zarr/numcodecs/xarray errors on damaged chunks
            raise StoreError(
                f"{path.absolute()} is corrupt: cannot decode its variable {name!r} "
                f"({type(exc).__name__}: {exc}); a file of the store was truncated or "
                "overwritten after it was written: restore the store from a copy or record the "
                "run again"
            ) from None


def _short(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _info_lines(path: Path, ds: xr.Dataset) -> list[str]:
    """What ``info`` prints about the run store at ``path``, one string a line."""
    lines: list[str] = []
    add = lines.append
    steps = ds["step"].values
    attrs = ds.attrs
    add(f"run        {path.resolve()} ({_human(_disk_size(path))} on disk)")
    if len(steps):
        add(f"steps      {int(steps[0])} … {int(steps[-1])}, {len(steps)} records")
    else:
        add("steps      none recorded")
    if "source" in ds.coords:
        add(f"sources    {', '.join(map(str, ds['source'].values))}")
    if "site" in ds.coords:
        sites = [str(s) for s in ds["site"].values]
        units = [int(u) for u in ds["site_units"].values] if "site_units" in ds.coords else None
        per = (
            ", ".join(f"{s} ({u})" for s, u in zip(sites, units, strict=True))
            if units is not None
            else ", ".join(sites)
        )
        n_units = ds.sizes.get("unit", 0)
        add(f"sites      {len(sites)}, {n_units} units: {per}")
    for dim, label in (("param", "params"), ("layer", "layers"), ("block", "blocks")):
        if dim in ds.coords:
            names = [str(v) for v in ds[dim].values]
            add(f"{label:<10} {len(names)}: {', '.join(names)}")
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, var in ds.data_vars.items():
        groups.setdefault(tuple(var.dims), []).append(str(name))
    add("variables")
    for dims, names in sorted(groups.items(), key=lambda kv: (len(kv[0]), kv[0])):
        add(f"  ({', '.join(dims)})".ljust(36) + ", ".join(sorted(names)))
    if "loss" in ds and len(steps):
        loss = ds["loss"].values
        add(f"loss       first {loss[0]:.4g}, last {loss[-1]:.4g}")
    if "test_acc" in ds and len(steps):
        acc = ds["test_acc"].values
        finite = acc[~(acc != acc)]
        if finite.size:
            add(f"test_acc   last measured {finite[-1]:.4f}, best {finite.max():.4f}")
    diverged = attrs.get("diverged_step")
    add(f"diverged   {'no' if diverged is None else f'at recorded step {diverged}'}")
    shown = ("icstools_version", "schema_version", "seed", "model_class", "n_committed")
    add("attrs      " + ", ".join(f"{k}={attrs[k]}" for k in shown if k in attrs))
    config = attrs.get("recorder_config")
    if isinstance(config, str):
        try:
            cfg = json.loads(config)
        except ValueError:
            cfg = None
        if isinstance(cfg, dict):
            keys = (
                "schedule",
                "probe_shape",
                "probe_mode",
                "probe_sample",
                "gradients",
                "ics",
                "landscape",
                "jacobian",
            )
            parts = [_short(f"{k}={cfg[k]}") for k in keys if cfg.get(k) not in (None, False)]
            add("recorder   " + "; ".join(parts))
    return lines


def verify(args: argparse.Namespace) -> int:
    """Check run stores byte for byte; exit 2 if any is damaged or not a run store."""
    from icstools.experiments import load_manifest
    from icstools.store import StoreError, verify_run

    targets: list[Path] = []
    for given in args.runs:
        p = Path(given)
        if not os.path.lexists(p):
            raise UsageError(f"no such run store or preset folder: {given}")
        if p.is_dir() and (p / "manifest.json").is_file() and not (p / ".zmetadata").exists():
            try:
                manifest = load_manifest(p)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            if not manifest.runs:
                print(f"{p}: its manifest lists no finished run")
            targets += [manifest.run_path(r) for r in manifest.runs]
        else:
            targets.append(p)
    bad = 0
    for target in targets:
        try:
            result = verify_run(target)
        except (StoreError, FileNotFoundError) as exc:
            print(f"DAMAGED: {target}: {' '.join(str(exc).split())}")
            bad += 1
            continue
        print(result.summary())
        for problem in result.problems:
            print(f"  {problem}")
        bad += not result.ok
    if bad:
        print(
            f"{PROG}: error: {bad} of {len(targets)} run stores are damaged or not run stores "
            "(listed above); restore them from a copy or record those runs again",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return EXIT_OK

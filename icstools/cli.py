"""The ``icstools`` command.

Subcommands (``icstools <command> --help`` explains each):

* ``run PRESET`` — run an experiment preset (``icstools list``): every condition and seed,
  one run store each, a ``manifest.json`` and a summary table;
* ``list`` — the presets, one line each;
* ``sites TARGET`` — the hookable sites of a model (``package.module:factory`` or a preset):
  module type, tensor shape and unit layout;
* ``info RUN`` — what a run store (or a preset's output folder) holds;
* ``report INPUT...`` — the drift report (HTML + JSON) of runs;
* ``figures PRESET_DIR`` — the paper's figures of a preset's runs as PNG files (``fig1``: the
  paper's Fig. 1 a, b, c);
* ``verify RUN...`` — check every chunk and the commit marker of run stores (checksums);
* ``export RUN --tensorboard LOGDIR`` — a run (or every run of a preset folder) as TensorBoard
  event files: per-site scalars and histograms over steps;
* ``demo`` — ``run fig1`` at a reduced scale (3 seeds × 6,000 steps), then ``report``.

Exit codes (every error is one line on stderr, ``icstools: error: ...``, naming what was wrong,
the value given and what is valid):

=====  =========================================================================================
0      success
1      an unexpected error, i.e. a bug or a failure outside the user's input (``--debug`` shows
       the traceback); ``run --workers/--scheduler``: a run failed in its worker (each failed run
       is named with its error, the others are kept; 2 if every failure is a user mistake)
2      a user mistake: a bad option or argument, an unknown preset or model, a missing file, a
       directory that is not a run store, a corrupt store (a damaged chunk included), an output
       path that cannot be written (checked before any work), missing MNIST data, an ``--out``
       that holds runs of the preset (``run`` without ``--resume``/``--force``), a store that
       another live process writes (its lock). ``report`` also exits 2 when it wrote the report
       without some runs it could not read (one line each), ``verify`` when a store is damaged
130    interrupted (Ctrl-C)
141    stdout was closed early (``icstools info RUN | head -1``): the output stops quietly, no
       message, the status of a command ended by SIGPIPE (128 + 13)
=====  =========================================================================================
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import xarray as xr

__all__ = ["main"]

PROG = "icstools"


EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141


class UsageError(Exception):
    """A user mistake detected by the command (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``icstools: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see {self.prog} --help)"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _print_table(rows: list[dict[str, object]]) -> None:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(widths[c]) for c in cols).rstrip())


def _check_output(option: str, value: str, *, file: bool, sub: str | None = None) -> None:
    """Refuse an output path that cannot be written (:class:`UsageError`), before any work.

    ``file``: ``value`` is a file to write, its missing folders created; else a folder, created
    if missing, in which the command creates ``sub``. Nothing is left behind by the check.
    """
    target = Path(value, sub) if sub else Path(value)
    valid = (
        "give the path of a file in a writable folder (missing folders are created)"
        if file
        else "give a writable folder (created if missing)"
    )
    if file and target.is_dir():
        raise UsageError(
            f"{option} {value!r} is a folder; give the path of a file, e.g. "
            f"{target / ('report.' + option.lstrip('-'))}"
        )
    base = target.parent if file else target
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent  # the folder nearest to the target that exists
    if not base.is_dir():
        what = "is a file, not a folder" if base.is_file() else "is not a folder"
        raise UsageError(f"{option} {value!r}: {base} {what}; {valid}")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise UsageError(
            f"{option} {value!r}: cannot write in {base} ({exc.strerror or exc}); {valid}"
        ) from None
    if file and target.is_file() and not os.access(target, os.W_OK):
        raise UsageError(f"{option} {value!r}: the file exists and is read-only; {valid}")


# ============================================================================================
# demo
# ============================================================================================


def _demo(args: argparse.Namespace) -> int:
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
    code = _run(run_args)
    if code:
        return code
    report = argparse.Namespace(
        inputs=[str(out / "fig1")],
        html=str(out / "fig1-report.html"),
        json=str(out / "fig1-report.json"),
    )
    print()
    code = _report(report)
    print(f"demo: {time.perf_counter() - t0:.0f} s; open {report.html} in a browser (offline).")
    return code


# ============================================================================================
# run, list
# ============================================================================================


def _parse_seeds(text: str) -> int | list[int]:
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


def _steps_list(text: str) -> list[int]:
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected steps as a comma list of whole numbers, got {text!r}"
        ) from None
    if not steps or min(steps) < 0:
        raise argparse.ArgumentTypeError(f"expected steps ≥ 0, got {text!r}")
    return steps


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {n}")
    return n


def _run(args: argparse.Namespace) -> int:
    from icstools.experiments import get_preset, run_preset
    from icstools.experiments.cluster import RunsFailedError

    preset = get_preset(args.preset)  # PresetError (exit 2) before anything is written
    _check_output("--out", args.out, file=False, sub=preset.name)
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


def _list(args: argparse.Namespace) -> int:
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


# ============================================================================================
# sites
# ============================================================================================


def _guess_input_shape(model: Any) -> tuple[int, ...] | None:
    """One example's shape from the first leaf module (Linear / Conv), else None."""
    from torch import nn

    for _, m in model.named_modules():
        if list(m.children()):
            continue
        if isinstance(m, nn.Linear):
            return (m.in_features,)
        if isinstance(m, nn.Conv1d):
            return (m.in_channels, 32)
        if isinstance(m, nn.Conv2d):
            return (m.in_channels, 28, 28)
        if isinstance(m, nn.Conv3d):
            return (m.in_channels, 8, 8, 8)
        return None
    return None


def _site_rows(model: Any, input_shape: tuple[int, ...] | None) -> list[dict[str, str]]:
    """One row per site: name, module type, tensor shape and unit layout, default mark."""
    import torch

    from icstools.recording.hooks import HookGroup
    from icstools.recording.isolation import isolated
    from icstools.sites import (
        Site,
        SiteSelectionError,
        default_unit_dim,
        find_tensor,
        layout_module,
        list_sites,
        select_sites,
    )

    try:
        default = {s.name for s in select_sites(model, None)}
    except SiteSelectionError:
        default = set()
    shapes: dict[str, tuple[int, ...]] = {}
    if input_shape is not None:
        with HookGroup() as hooks:
            for name, module in model.named_modules():
                if not name:
                    continue

                def pre(mod, args, kwargs, name=name):
                    t = find_tensor(args) if args else find_tensor(kwargs)
                    if t is not None:
                        shapes.setdefault(f"{name}:input", tuple(t.shape))

                def post(mod, args, output, name=name):
                    t = find_tensor(output)
                    if t is not None:
                        shapes.setdefault(f"{name}:output", tuple(t.shape))

                hooks.forward_pre(module, pre, with_kwargs=True)
                hooks.forward(module, post)
            try:
                with isolated(model, mode="eval", grad=False):
                    model(torch.rand(2, *input_shape))
            except Exception as exc:
                raise UsageError(
                    f"the model does not accept inputs of shape [batch, "
                    f"{', '.join(map(str, input_shape))}]: {exc} (give one example's shape "
                    "with --input-shape)"
                ) from None
    rows = []
    for site_name in list_sites(model):
        module_name, _, role = site_name.rpartition(":")
        module = model.get_submodule(module_name)
        shape = shapes.get(site_name)
        if shape is None:
            shown, units = "-", "-" if input_shape is not None else "?"
        else:
            x = torch.empty(shape, device="meta")
            ud = default_unit_dim(layout_module(model, Site(module_name, role)), x)
            dims = ["B", *map(str, shape[1:])]
            shown = "[" + ", ".join(dims) + "]"
            pooled = [n for d, n in enumerate(_dim_names(len(shape), ud)) if d != ud]
            units = f"{shape[ud]} (dim {ud}; pooled over {', '.join(pooled)})"
        rows.append(
            {
                "": "*" if site_name in default else "",
                "site": site_name,
                "module": type(module).__name__,
                "shape": shown,
                "units": units,
            }
        )
    return rows


def _dim_names(ndim: int, unit_dim: int) -> list[str]:
    """Conventional names of a site tensor's dimensions (``N`` the batch)."""
    known = {
        2: ["N", "F"],
        3: ["N", "C", "L"] if unit_dim == 1 else ["N", "T", "F"],
        4: ["N", "C", "H", "W"],
        5: ["N", "C", "D", "H", "W"],
    }
    return known.get(ndim, ["N", *(f"d{d}" for d in range(1, ndim))])


def _print_sites(title: str, model: Any, input_shape: tuple[int, ...] | None) -> None:
    shape = "?" if input_shape is None else "[batch, " + ", ".join(map(str, input_shape)) + "]"
    rows = _site_rows(model, input_shape)
    print(f"{title}  (input {shape})")
    if not rows:
        print("  (no submodules: nothing to hook)")
        return
    _print_table(rows)


def _sites(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from icstools.experiments import DATA_SHAPES, PRESETS, get_preset, load_factory
    from icstools.recording.isolation import isolated

    input_shape = args.input_shape
    if ":" in args.target:
        try:
            kwargs = json.loads(args.kwargs) if args.kwargs else {}
        except json.JSONDecodeError as exc:
            raise UsageError(f"--kwargs is not valid JSON: {exc}") from None
        if not isinstance(kwargs, dict):
            raise UsageError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
        try:
            factory = load_factory(args.target)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        try:
            model = factory(**kwargs)
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"calling {args.target}(**{json.dumps(kwargs)}) failed: {exc}"
            ) from None
        if not isinstance(model, nn.Module):
            raise UsageError(f"{args.target} returned a {type(model).__name__}, not an nn.Module")
        if input_shape is None:
            input_shape = _guess_input_shape(model)
        _print_sites(f"{args.target} {json.dumps(kwargs)}", model, input_shape)
    else:
        if args.kwargs:
            raise UsageError("--kwargs applies to a model factory target, not to a preset")
        if args.target not in PRESETS:
            raise UsageError(
                f"unknown preset {args.target!r}; valid presets: {', '.join(PRESETS)}; or give "
                "a model factory as package.module:factory"
            )
        preset = get_preset(args.target)
        input_shape = input_shape or DATA_SHAPES[preset.data]
        seen: dict[str, list[str]] = {}
        for cond in preset.conditions:
            key = json.dumps(cond.settings()["model"]) + json.dumps(cond.settings()["kwargs"])
            seen.setdefault(key, []).append(cond.name)
        first = True
        for names in seen.values():
            cond = preset.condition(names[0])
            with isolated():
                torch.manual_seed(0)
                model = cond.build()
            if not first:
                print()
            first = False
            _print_sites(f"{preset.name} / {', '.join(names)}", model, input_shape)
    print("\n* recorded by default (inputs of element-wise nonlinearities, the paper's sites)")
    return 0


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(
            f"expected one example's shape without the batch, e.g. 784 or 1,28,28; got {text!r}"
        )
    return dims


# ============================================================================================
# info
# ============================================================================================


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
        _print_table(rows)
    print("\nstores:")
    for r in manifest.runs:
        print(f"  {manifest.run_path(r)}")
    return 0


def _info(args: argparse.Namespace) -> int:
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


# ============================================================================================
# verify
# ============================================================================================


def _verify(args: argparse.Namespace) -> int:
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


# ============================================================================================
# report
# ============================================================================================


def _figures(args: argparse.Namespace) -> int:
    """``icstools figures PRESET_DIR``: the paper's figures as PNG files."""
    from icstools.report.figures import write_figures

    folder = Path(args.preset_dir)
    if not (folder / "manifest.json").is_file():
        raise UsageError(
            f"{args.preset_dir!r} is not a preset's run folder (no manifest.json); give the "
            "folder an 'icstools run PRESET' wrote, e.g. data/runs/fig1"
        )
    out = args.out if args.out is not None else str(folder / "figures")
    _check_output("--out", out, file=False)
    try:
        paths = write_figures(folder, out)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    for path in paths:
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
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

    _check_output("--html", args.html, file=True)
    if args.json is not None:
        _check_output("--json", args.json, file=True)
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
        _print_table(rows)
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


# ============================================================================================
# export
# ============================================================================================


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


def _export(args: argparse.Namespace) -> int:
    from icstools.store import StoreError

    try:
        from icstools.export import export_tensorboard
        from icstools.export.tensorboard import _summary_writer

        _summary_writer()  # the tensorboard package is there, before any work
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    targets = _export_targets(Path(args.run), Path(args.tensorboard))
    _check_output("--tensorboard", args.tensorboard, file=False)
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


# ============================================================================================
# parser and entry point
# ============================================================================================

_EPILOG_RUN = """\
Examples:
  icstools run fig1                      the full experiment (10 seeds × 50,000 steps)
  icstools run fig1 --quick              reduced end to end: a few hundred steps, 1 seed
  icstools run lr-sweep --steps 2000 --seeds 0,1 --out /tmp/runs
  icstools run fig1 --resume             finish the runs of an interrupted 'icstools run fig1'
  icstools run fig1 --quick --force      replace the runs already in data/runs/fig1
  icstools run noisy-bn --workers 2      its 9 runs on a local dask cluster of 2 processes
  icstools run fig1 --scheduler tcp://10.0.0.5:8786   on an existing dask cluster

Presets: {presets}.

Runs land in DIR/PRESET/CONDITION/seed-N.zarr, with DIR/PRESET/manifest.json (settings,
accuracy over training, divergence, wall time per run). A diverged run is a result: it is
reported as diverged, not as an error. MNIST is read from $ICSTOOLS_DATA (or --data-dir).

A DIR/PRESET that already holds runs is refused (exit 2, the runs listed): --resume keeps the
finished runs and runs the others again from scratch (the same options are required);
--force removes all runs there first.

--workers N runs the runs on a dask.distributed local cluster of N processes (one torch thread
each); --scheduler ADDRESS on an existing dask cluster whose workers see --out at the same path.
Each run's store is bit for bit the serial run's. One line per finished run on stderr; a run that
fails is reported (condition, seed, error) and the others are kept: exit 1 (2 if every failure
is a user mistake, e.g. missing MNIST), and --resume runs the failed ones. Ctrl-C cancels the
runs not finished (exit 130); the manifest lists the finished ones, for --resume.
"""

_EPILOG_SITES = """\
Examples:
  icstools sites icstools.experiments:paper_mlp --kwargs '{"bn": true}'
  icstools sites icstools.experiments:small_cnn --kwargs '{"in_channels": 1}'
  icstools sites fig1

A site is "<module name>:<role>" (role input or output); units are the entries of the listed
dimension, statistics are pooled over the others (batch, and locations for convolutions).
"""


_EPILOG = """\
Run 'icstools <command> --help' for a command's options.

Exit codes: 0 success; 1 an unexpected error (--debug shows the traceback); 2 a user mistake
(bad option or argument, missing file, not a run store, corrupt store, output path that cannot
be written, missing MNIST data, run: --out holds runs of the preset, a store another process
writes; report: runs it could not read; verify: a damaged store); 130 interrupted; 141 stdout
closed early (e.g. piped into head). Errors are one line on stderr.
"""


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Measure internal covariate shift in PyTorch training.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    for add in (
        _add_run, _add_list, _add_sites, _add_info, _add_report, _add_figures, _add_verify,
        _add_export, _add_demo,
    ):  # fmt: skip
        add(sub)
    return p


def _add_run(sub: Any) -> None:
    """The ``run`` subcommand's options."""
    from icstools.experiments import PRESETS

    fmt = argparse.RawDescriptionHelpFormatter
    r = sub.add_parser(
        "run",
        help="run an experiment preset (see 'icstools list')",
        description="Run every condition and seed of an experiment preset, one run store each,\n"
        "then print a summary table.",
        epilog=_EPILOG_RUN.format(presets=", ".join(PRESETS)),
        formatter_class=fmt,
    )
    r.add_argument("preset", help="preset name (icstools list)")
    r.add_argument(
        "--steps", type=_positive, metavar="N", help="optimizer steps per run (default: preset's)"
    )
    r.add_argument(
        "--seeds",
        type=_parse_seeds,
        metavar="N|LIST",
        help="number of seeds N (0..N-1) or a comma list, e.g. 0,3 or 5, (default: preset's)",
    )
    r.add_argument(
        "--conditions",
        type=lambda t: [c.strip() for c in t.split(",") if c.strip()],
        metavar="LIST",
        help="run only these conditions, a comma list (default: all)",
    )
    r.add_argument(
        "--out", default="data/runs", metavar="DIR", help="base output folder (data/runs)"
    )
    r.add_argument("--quick", action="store_true", help="reduced end-to-end run: 1 seed, few steps")
    r.add_argument(
        "--threads", type=_positive, default=1, metavar="N", help="torch intra-op threads (1)"
    )
    r.add_argument(
        "--data-dir", metavar="DIR", help="MNIST base folder (default: $ICSTOOLS_DATA, ./data)"
    )
    r.add_argument(
        "--quiet", action="store_true", help="no progress bars (shown on terminals only)"
    )
    again = r.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="DIR/PRESET holds runs: keep the finished ones, run the others (same options)",
    )
    again.add_argument(
        "--force",
        action="store_true",
        help="DIR/PRESET holds runs: remove them all first, then run",
    )
    where = r.add_mutually_exclusive_group()
    where.add_argument(
        "--workers",
        type=_positive,
        metavar="N",
        help="run the runs on a local dask cluster of N processes (pip install icstools[cluster])",
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run the runs on the dask cluster at ADDRESS (tcp://host:8786), whose workers see"
        " --out at the same path",
    )
    r.set_defaults(func=_run)


def _add_list(sub: Any) -> None:
    """The ``list`` subcommand's options."""
    ls = sub.add_parser(
        "list",
        help="list the experiment presets",
        description="List the experiment presets with one-line descriptions.",
    )
    ls.add_argument(
        "-v", "--verbose", action="store_true", help="also conditions, size and claims tested"
    )
    ls.set_defaults(func=_list)


def _add_sites(sub: Any) -> None:
    """The ``sites`` subcommand's options."""
    fmt = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser(
        "sites",
        help="list the hookable sites of a model or a preset's models",
        description="List the sites (module inputs and outputs) a Recorder can hook, with the\n"
        "module type, the tensor shape for one batch and which dimension holds the units.",
        epilog=_EPILOG_SITES,
        formatter_class=fmt,
    )
    s.add_argument("target", help="package.module:factory, or a preset name")
    s.add_argument(
        "--kwargs", metavar="JSON", help="JSON object of keyword arguments for the factory"
    )
    s.add_argument(
        "--input-shape",
        type=_shape,
        metavar="SHAPE",
        help="one example's shape, e.g. 784 or 1,28,28 (default: from the first layer)",
    )
    s.set_defaults(func=_sites)


def _add_info(sub: Any) -> None:
    """The ``info`` subcommand's options."""
    i = sub.add_parser(
        "info",
        help="describe a run store (or a preset's output folder)",
        description="Describe what a run store holds: steps, sources, sites and units, "
        "variables, attributes (e.g. diverged_step), size on disk. Given a preset's output "
        "folder (with manifest.json), summarize its runs.",
    )
    i.add_argument("run", help="path of a run store (…/seed-0.zarr) or of a preset folder")
    i.add_argument(
        "--at",
        type=_steps_list,
        metavar="STEPS",
        help="preset folder: also the test accuracy at these steps, e.g. 5000,10000,50000",
    )
    i.set_defaults(func=_info)


def _add_report(sub: Any) -> None:
    """The ``report`` subcommand's options."""
    rp = sub.add_parser(
        "report",
        help="write the drift report (HTML + JSON) of runs",
        description="Write the drift report of runs: each claim, its measurement and verdict; "
        "per-run interactive plots (one offline HTML file); and, with two inputs or more that "
        "are runs or folders of runs (not preset folders), a per-site comparison of the groups "
        "with intervals over runs and verdicts.",
        epilog="Examples:\n"
        "  icstools report data/runs/fig1 --html fig1.html --json fig1.json\n"
        "  icstools report a.zarr b.zarr --label baseline --label bn --html ab.html\n"
        "  icstools report runs/lr0.1/ runs/lr1/ --label 'lr 0.1' --label 'lr 1' --html lr.html\n"
        "\nEach input that is a run store or a folder of runs is one group (a folder's runs "
        "are its seeds); every group is compared with the first.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rp.add_argument(
        "inputs", nargs="+", help="run stores, folders of runs, or preset output folders"
    )
    rp.add_argument(
        "--label",
        action="append",
        metavar="NAME",
        help="name of the group of each input, in order (repeat once per input; default: the "
        "input's name)",
    )
    rp.add_argument("--html", required=True, metavar="PATH", help="path of the HTML report")
    rp.add_argument("--json", metavar="PATH", help="path of the JSON report (optional)")
    rp.set_defaults(func=_report)


def _add_figures(sub: Any) -> None:
    """The ``figures`` subcommand's options."""
    fp = sub.add_parser(
        "figures",
        help="write the paper's figures of a preset's runs as PNG files",
        description="Write the paper's figures of the finished runs of a preset folder as PNG "
        "files. fig1: the paper's Fig. 1, fig1.png (three panels) and fig1a.png, fig1b.png, "
        "fig1c.png: (a) test accuracy over steps, mean ± sd over seeds; (b, c) the 15th, 50th "
        "and 85th percentiles of a typical unit of the last hidden sigmoid input on the probe "
        "over steps, without and with BN (first seed).",
        epilog="Examples:\n"
        "  icstools figures data/runs/fig1                    PNGs in data/runs/fig1/figures\n"
        "  icstools figures data/runs/fig1 --out docs/images  the README's images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fp.add_argument("preset_dir", metavar="PRESET_DIR", help="folder of an 'icstools run'")
    fp.add_argument(
        "--out", metavar="DIR", help="folder of the PNG files (default: PRESET_DIR/figures)"
    )
    fp.set_defaults(func=_figures)


def _add_verify(sub: Any) -> None:
    """The ``verify`` subcommand's options."""
    v = sub.add_parser(
        "verify",
        help="check run stores for damage (checksums of every chunk and the commit marker)",
        description="Read every chunk of each run store and check it against its checksum, and "
        "the commit marker against its own; list every damaged or missing chunk by variable and "
        "records. A preset folder (with manifest.json) checks the runs its manifest lists. "
        "Exit 0 if all are sound, 2 if any is damaged or not a run store. Stores of format 1 "
        "(written before checksums) are checked for missing and undecodable chunks only.",
    )
    v.add_argument("runs", nargs="+", metavar="RUN", help="run stores or preset folders")
    v.set_defaults(func=_verify)


def _add_export(sub: Any) -> None:
    """The ``export`` subcommand's options."""
    from icstools.analysis.drift import METRICS

    e = sub.add_parser(
        "export",
        help="write a run (or a folder of runs) as TensorBoard event files",
        description="Write a run's per-site scalars (mean, std, sat_frac, zero_frac, "
        "dead_frac, nonfinite, drift; grad_norm and the other per-step variables it holds) and "
        "its recorded histograms over steps as TensorBoard event files. A folder of runs (a "
        "preset's output) gives one TensorBoard run per store, LOGDIR/CONDITION/seed-N.",
    )
    e.add_argument("run", help="a run store (…/seed-0.zarr) or a folder holding run stores")
    e.add_argument(
        "--tensorboard", required=True, metavar="LOGDIR", help="folder for the event files"
    )
    e.add_argument(
        "--source",
        action="append",
        metavar="SOURCE",
        help="train or probe; repeat for both (default: every recorded source)",
    )
    e.add_argument(
        "--drift",
        default="w1_std",
        choices=[*METRICS, "none"],
        metavar="METRIC",
        help="drift metric against the first record, per site (w1_std; none: no drift tags)",
    )
    e.add_argument("--no-histograms", action="store_true", help="scalars only")
    e.add_argument("--overwrite", action="store_true", help="delete event files already in LOGDIR")
    e.set_defaults(func=_export)


def _add_demo(sub: Any) -> None:
    """The ``demo`` subcommand's options."""
    d = sub.add_parser(
        "demo",
        help="the paper's Fig. 1 experiment at a reduced scale, then its drift report",
        description="Run the fig1 preset (MNIST, 784-100-100-100-10 sigmoid MLP, with and "
        "without BN) at a reduced scale, then write the drift report of its runs and print the "
        "claims' verdicts. The same as 'icstools run fig1 --steps N --seeds K --out DIR' "
        "followed by 'icstools report DIR/fig1 --html ... --json ...'.",
    )
    d.add_argument("--steps", type=int, default=6000, help="optimizer steps per run (6000)")
    d.add_argument("--seeds", type=int, default=3, help="seeds per network (3)")
    d.add_argument("--out", default="data/runs/demo", help="base output folder (data/runs/demo)")
    d.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    d.add_argument(
        "--data-dir", metavar="DIR", help="MNIST base folder (default: $ICSTOOLS_DATA, ./data)"
    )
    d.add_argument(
        "--quiet", action="store_true", help="no progress bars (shown on terminals only)"
    )
    d.add_argument(
        "--force",
        action="store_true",
        help="remove the runs of an earlier demo in DIR/fig1 first (default: keep its finished "
        "runs if the options are the same, else stop)",
    )
    d.set_defaults(func=_demo)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``icstools`` command; returns the exit code (module docstring).

    Examples
    --------
    >>> main(["list"])  # doctest: +SKIP
    0
    """
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe must fail where it is caught
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_PIPE
    return code


def _stdout_to_devnull() -> None:
    """After the reader of stdout went away (``| head``): send the rest to ``os.devnull``, so
    that the interpreter's last flush at exit does not fail again (Python's documented recipe).
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (e.g. captured in a test)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad option (2, message already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.argv = argv
    from icstools.data import MNISTError
    from icstools.experiments import PresetError
    from icstools.store import StoreError

    try:
        return args.func(args)
    except BrokenPipeError:
        raise  # stdout closed by its reader: main() ends quietly
    except (UsageError, PresetError, MNISTError, StoreError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"{PROG}: error: {type(exc).__name__}: {' '.join(str(exc).split())} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

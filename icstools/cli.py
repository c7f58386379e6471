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
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from icstools.commands import info, outputs, run, sites
from icstools.commands.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PIPE,
    EXIT_USAGE,
    PROG,
    UsageError,
)

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PIPE", "EXIT_USAGE", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``icstools: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see {self.prog} --help)"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


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
        "--steps",
        type=run.positive,
        metavar="N",
        help="optimizer steps per run (default: preset's)",
    )
    r.add_argument(
        "--seeds",
        type=run.parse_seeds,
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
        "--threads", type=run.positive, default=1, metavar="N", help="torch intra-op threads (1)"
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
        type=run.positive,
        metavar="N",
        help="run the runs on a local dask cluster of N processes (pip install icstools[cluster])",
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run the runs on the dask cluster at ADDRESS (tcp://host:8786), whose workers see"
        " --out at the same path",
    )
    r.set_defaults(func=run.run)


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
    ls.set_defaults(func=run.list_presets)


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
        type=sites.shape,
        metavar="SHAPE",
        help="one example's shape, e.g. 784 or 1,28,28 (default: from the first layer)",
    )
    s.set_defaults(func=sites.sites)


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
        type=run.steps_list,
        metavar="STEPS",
        help="preset folder: also the test accuracy at these steps, e.g. 5000,10000,50000",
    )
    i.set_defaults(func=info.info)


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
    rp.set_defaults(func=outputs.report)


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
    fp.set_defaults(func=outputs.figures)


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
    v.set_defaults(func=info.verify)


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
    e.set_defaults(func=outputs.export)


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
    d.set_defaults(func=run.demo)


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

"""The runner of the presets: :func:`run_preset`, its runs and their manifest.

:func:`run_preset` runs every condition and seed of a
:class:`~icstools.experiments.presets.Preset` (each with :func:`train_condition`: a seeded
model build, then :func:`~icstools.experiments.training.train` under a recorder), writing::

    <out>/<preset>/manifest.json
    <out>/<preset>/<condition>/seed-<n>.zarr      (one run store per condition and seed)

Each run's record schedule is ``preset.records`` evenly spaced steps plus a few early
log-spaced ones (1, 2, 5, 10, … below the spacing) and the last step; test accuracy is measured
at recorded steps (every ``eval_every``-th record), right before the step's training forward,
i.e. on exactly the weights the record describes, and logged into the run as ``test_acc``.
Seeds: run seed ``n`` seeds the weight initialization (``torch.manual_seed(n)`` before the
model is built), the batch order (its own generator), the recorder's sampling and, through the
initialization RNG, the noise of :class:`~icstools.experiments.models.NoisyBatchNorm1d`;
with one torch thread a run is bit-for-bit reproducible.

The manifest (JSON) holds: ``preset``, ``description``, ``claims``, ``notes``, ``conditions``
(name → model factory, its keyword arguments, optimizer settings, steps), ``seeds``, ``steps``,
``quick``, ``batch_size``, ``data``, ``probe_size``, ``record`` (record schedule, evaluation,
recorder options), ``icstools_version``, ``torch_version``, ``created``, ``command`` (the
command line, when run from it) and ``call`` (the equivalent Python call), ``complete`` (false
while running or after a failure) and ``runs``: per run ``condition``, ``seed``, ``path``
(relative to the manifest), ``steps``, ``steps_done``, ``wall_time`` (s), ``final_test_acc``
(full test set, after the last step), ``test_acc`` (``{"step": [...], "value": [...]}``, during
training), ``final_loss``, ``diverged``, ``diverged_step`` (first step whose training loss was
not finite, or null), ``recorded_diverged_step`` (the store's ``diverged_step`` attribute: first
*recorded* step with a non-finite loss or activation) and ``records``. Non-finite numbers are
written as null.

Divergence is a result: a run whose training loss becomes non-finite goes on to the next
recorded step (so its store holds the diverged state and ``diverged_step``), stops there and is
reported as diverged.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from icstools import __version__
from icstools.experiments.measures import _MEASURES
from icstools.experiments.presets import Condition, Preset, PresetError, _jsonable, get_preset
from icstools.experiments.rerun import plan_rerun
from icstools.experiments.training import TrainResult, record_steps, train
from icstools.recording.isolation import isolated
from icstools.recording.recorder import Recorder
from icstools.schedules import at_steps
from icstools.store import open_run

logger = logging.getLogger(__name__)

__all__ = [
    "Manifest",
    "RunInfo",
    "load_manifest",
    "run_preset",
    "train_condition",
]


@dataclass
class RunInfo:
    """One run of a preset (a condition and a seed), as listed in the manifest.

    Attributes
    ----------
    condition : str
    seed : int
    path : str
        The run store, relative to the manifest's folder.
    steps : int
        Steps asked for.
    steps_done : int
        Steps taken (fewer when a diverged run stopped).
    wall_time : float
        Seconds.
    final_test_acc : float
        Full test set, after the last step.
    test_acc : dict of int to float
        Test accuracy during training, by step (the eval set of the preset).
    final_loss : float or None
    diverged : bool
    diverged_step : int or None
        First step whose training loss was not finite.
    recorded_diverged_step : int or None
        The store's ``diverged_step``: first recorded step with a non-finite loss or activation.
    records : int
        Records in the store.
    """

    condition: str
    seed: int
    path: str
    steps: int
    steps_done: int
    wall_time: float
    final_test_acc: float
    test_acc: dict[int, float]
    final_loss: float | None
    diverged: bool
    diverged_step: int | None
    recorded_diverged_step: int | None
    records: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``test_acc`` as ``{"step": [...], "value": [...]}``)."""
        d = dict(self.__dict__)
        d["test_acc"] = {
            "step": sorted(self.test_acc),
            "value": [self.test_acc[s] for s in sorted(self.test_acc)],
        }
        return _jsonable(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunInfo:
        """Inverse of :meth:`to_dict`."""
        acc = d.get("test_acc") or {"step": [], "value": []}
        kw = {k: d.get(k) for k in cls.__dataclass_fields__}
        kw["test_acc"] = dict(zip((int(s) for s in acc["step"]), acc["value"], strict=True))
        return cls(**kw)


@dataclass
class Manifest:
    """What a :func:`run_preset` call did: the preset's set-up and every run's outcome.

    Written as ``<out>/<preset>/manifest.json`` after every run (``complete`` turns true at the
    end); :func:`load_manifest` reads it back. The keys are listed in
    :mod:`icstools.experiments.runner`.
    """

    preset: str
    description: str
    claims: list[str]
    notes: str
    conditions: dict[str, dict[str, Any]]
    seeds: list[int]
    steps: int
    quick: bool
    batch_size: int
    data: str
    probe_size: int
    record: dict[str, Any]
    icstools_version: str
    torch_version: str
    created: str
    command: list[str] | None
    call: str
    complete: bool = False
    runs: list[RunInfo] = field(default_factory=list)
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (without ``path``)."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("runs", "path")}
        d = _jsonable(d)
        d["runs"] = [r.to_dict() for r in self.runs]
        return d

    def write(self, path: str | Path | None = None) -> Path:
        """Write the manifest as JSON (atomically: a temporary file renamed over it)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path: give one, or set Manifest.path")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, target)
        self.path = target
        return target

    def run_path(self, run: RunInfo) -> Path:
        """Absolute path of a run's store."""
        base = self.path.parent if self.path is not None else Path(".")
        return base / run.path

    def open_runs(self) -> dict[str, list[xr.Dataset]]:
        """The runs' datasets by condition, ``{condition: [xarray.Dataset per seed]}``, in
        the manifest's order (opened with :func:`icstools.open_run`).

        Examples
        --------
        >>> runs = run_preset("fig1", quick=True, out="/tmp/r").open_runs()  # doctest: +SKIP
        >>> sorted(runs)  # doctest: +SKIP
        ['baseline', 'bn']
        """
        out: dict[str, list[xr.Dataset]] = {}
        for run in self.runs:
            out.setdefault(run.condition, []).append(open_run(self.run_path(run)))
        return out

    def summary(self) -> str:
        """A table of the runs (accuracy, divergence, wall time) and the mean per condition.

        Examples
        --------
        >>> print(load_manifest("data/runs/fig1").summary())  # doctest: +SKIP
        """
        header = ("condition", "seed", "test acc", "diverged", "steps", "wall time")
        rows = []
        for r in self.runs:
            div = "no" if not r.diverged else f"at step {r.diverged_step}"
            rows.append(
                (
                    r.condition,
                    str(r.seed),
                    f"{r.final_test_acc:.4f}",
                    div,
                    f"{r.steps_done}/{r.steps}",
                    f"{r.wall_time:.1f} s",
                )
            )
        lines = [f"{self.preset}: {self.description}"]
        lines += _table(header, rows)
        by_cond: dict[str, list[RunInfo]] = {}
        for r in self.runs:
            by_cond.setdefault(r.condition, []).append(r)
        if any(len(v) > 1 for v in by_cond.values()):
            lines.append("")
            agg = []
            for cond, runs in by_cond.items():
                acc = np.array([r.final_test_acc for r in runs])
                sd = f" ± {acc.std(ddof=1):.4f}" if len(acc) > 1 else ""
                agg.append(
                    (
                        cond,
                        str(len(runs)),
                        f"{acc.mean():.4f}{sd}",
                        f"{sum(r.diverged for r in runs)}/{len(runs)}",
                        f"{sum(r.wall_time for r in runs):.1f} s",
                    )
                )
            lines += _table(("condition", "runs", "test acc (mean ± sd)", "diverged", "time"), agg)
        return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [
        fmt.format(*r) for r in rows
    ]


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest: ``<out>/<preset>/manifest.json`` or its folder.

    Raises
    ------
    FileNotFoundError
        No manifest there.
    ValueError
        Not a valid manifest (bad JSON or missing keys).

    Examples
    --------
    >>> m = load_manifest("data/runs/fig1")  # doctest: +SKIP
    >>> [r.final_test_acc for r in m.runs]  # doctest: +SKIP
    """
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"no manifest at {p}")
    try:
        d = json.loads(p.read_text())
        runs = [RunInfo.from_dict(r) for r in d.pop("runs")]
        kw = {k: d[k] for k in Manifest.__dataclass_fields__ if k not in ("runs", "path")}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{p} is not a valid icstools manifest: {exc!r}") from None
    return Manifest(**kw, runs=runs, path=p)


def _every_kth(steps: list[int], k: int) -> at_steps:
    """Every k-th of the recorded ``steps`` (the first and the last always)."""
    chosen = set(steps[::k]) | {steps[0], steps[-1]}
    return at_steps(chosen)


def _seeds_arg(seeds: int | Sequence[int] | None, default: tuple[int, ...]) -> list[int]:
    if seeds is None:
        return list(default)
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise PresetError(f"seeds must be ≥ 1 (a number of seeds) or a list, got {seeds}")
        return list(range(int(seeds)))
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise PresetError(f"seeds must be a number of seeds or a list of ints, got {seeds!r}")
    out = list(seeds)
    if not out or any(
        isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in out
    ):
        raise PresetError(f"seeds must be a non-empty list of ints ≥ 0, got {seeds!r}")
    if len(set(out)) != len(out):
        raise PresetError(f"seeds must not repeat, got {out}")
    return [int(s) for s in out]


def _call_repr(name: str, **kwargs: Any) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"icstools.experiments.run_preset({name!r}, {args})"


def _new_manifest(
    preset: Preset,
    chosen: Sequence[Condition],
    seed_list: list[int],
    total: int,
    *,
    quick: bool,
    command: Sequence[str] | None,
    call: str,
) -> Manifest:
    """The manifest of a :func:`run_preset` call before its first run."""
    return Manifest(
        preset=preset.name,
        description=preset.description,
        claims=list(preset.claims),
        notes=preset.notes,
        conditions={c.name: c.settings() for c in chosen},
        seeds=seed_list,
        steps=total,
        quick=bool(quick),
        batch_size=preset.batch_size,
        data=preset.data,
        probe_size=preset.probe_size,
        record={
            **preset.settings(),
            "records": min(preset.records, preset.quick_records) if quick else preset.records,
            "recorder": _jsonable({**preset.record, **(preset.quick_record if quick else {})}),
        },
        icstools_version=__version__,
        torch_version=torch.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=None if command is None else [str(c) for c in command],
        call=call,
    )


def run_preset(
    name: str | Preset,
    *,
    steps: int | None = None,
    seeds: int | Sequence[int] | None = None,
    out: str | Path = "data/runs",
    quick: bool = False,
    progress: bool = True,
    data_dir: str | Path | None = None,
    threads: int | None = None,
    conditions: Sequence[str] | None = None,
    command: Sequence[str] | None = None,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], Any] | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
) -> Manifest:
    """Run every condition and seed of a preset; write the stores and ``manifest.json``.

    Parameters
    ----------
    name : str or Preset
        A preset name (see :data:`PRESETS`, ``icstools list``) or a :class:`Preset`.
    steps : int, optional
        Steps per run instead of the preset's (conditions with fewer steps keep theirs).
    seeds : int or sequence of int, optional
        A number ``N`` of seeds (0 … N−1) or the seeds themselves; default the preset's.
    out : str or Path
        Base folder: runs go to ``<out>/<preset>/<condition>/seed-<n>.zarr`` and the manifest
        to ``<out>/<preset>/manifest.json``. A folder that already holds runs of the preset is
        refused (:class:`~icstools.experiments.rerun.RunsExistError`, listing them) unless
        ``resume`` or ``force`` says what to do with them.
    quick : bool
        A reduced end-to-end version: ``preset.quick_steps`` steps (a few hundred) and the first
        seed, unless ``steps``/``seeds`` say otherwise.
    progress : bool
        A tqdm progress bar per run on stderr, when stderr is a terminal (a log file gets
        none: carriage-return updates would flood it). On a cluster (``workers``,
        ``scheduler``): one ``log`` line per finished run instead.
    data_dir : str or Path, optional
        MNIST base folder (default ``$ICSTOOLS_DATA``, see :mod:`icstools.data`).
    threads : int, optional
        torch intra-op threads during the runs (restored after).
    conditions : sequence of str, optional
        Run only these conditions (default: all of the preset's).
    command : sequence of str, optional
        The command line that asked for the run, kept in the manifest.
    resume : bool
        Keep the finished runs already in the folder and run the others (from scratch); the
        configuration must be the earlier call's (:mod:`icstools.experiments.rerun`).
    force : bool
        Remove every run store already in the folder first, then run all.
    log : callable, optional
        Receives one line per run kept, run again or removed (default: the logger), and on a
        cluster one per run finished or failed.
    workers : int, optional
        Run the runs on a ``dask.distributed`` local cluster of this many worker processes,
        one torch thread each (``threads`` if given), instead of one after the other here; each
        run's store is bit-for-bit the serial run's (:mod:`icstools.experiments.cluster`).
    scheduler : str, optional
        The address of an existing dask cluster to run the runs on (its workers must see
        ``out`` at the same path); instead of ``workers``.

    Returns
    -------
    Manifest
        Also written to ``<out>/<preset>/manifest.json``; ``summary()`` gives a table.

    Raises
    ------
    PresetError
        Unknown preset, bad ``steps``/``seeds``, runs already in the folder
        (:class:`~icstools.experiments.rerun.RunsExistError`), or ``resume`` with another
        configuration.
    icstools.store.StoreError
        A run store of the folder is being written by another process.
    icstools.data.MNISTError
        MNIST is not found (or invalid).
    icstools.experiments.cluster.ClusterError
        Bad ``workers``/``scheduler``, or a scheduler that does not answer.
    icstools.experiments.cluster.RunsFailedError
        On a cluster: some runs failed (each named with its error); the others are kept.

    Examples
    --------
    >>> m = run_preset("fig1", quick=True, steps=50, out="/tmp/runs")  # doctest: +SKIP
    >>> print(m.summary())  # doctest: +SKIP
    >>> m = run_preset("fig1", quick=True, out="/tmp/runs", force=True, workers=2)  # doctest: +SKIP
    """

    preset = get_preset(name)
    steps, total, seed_list, chosen = _checked(preset, steps, seeds, quick, threads, conditions)
    folder = Path(out) / preset.name
    call = _call_repr(
        preset.name,
        steps=steps,
        seeds=seeds,
        out=str(out),
        quick=quick,
        threads=threads,
        conditions=conditions,
        **({"resume": True} if resume else {}),
        **({"force": True} if force else {}),
        **({"workers": workers} if workers is not None else {}),
        **({"scheduler": scheduler} if scheduler is not None else {}),
    )
    manifest = _new_manifest(
        preset, chosen, seed_list, total, quick=quick, command=command, call=call
    )
    planned = [f"{c.name}/seed-{s}.zarr" for c in chosen for s in seed_list]
    say = log if log is not None else logger.info
    if workers is not None or scheduler is not None:
        from icstools.experiments import cluster

        jobs = [
            cluster.Job(rel, c, s, total if c.steps is None else min(c.steps, total))
            for rel, (c, s) in zip(planned, itertools.product(chosen, seed_list), strict=True)
        ]
        with cluster.connect(workers, scheduler) as client:  # before anything is touched
            keep = _plan(folder, manifest, planned, resume=resume, force=force, log=say)
            return cluster.run_on_cluster(
                client, manifest, preset, jobs, keep,
                data_dir=data_dir, threads=threads, quick=quick, log=say,
            )  # fmt: skip
    keep = _plan(folder, manifest, planned, resume=resume, force=force, log=say)
    serial = (preset, chosen, seed_list, total, folder, data_dir)
    return _run_serial(*serial, manifest, keep, threads=threads, quick=quick, progress=progress)


def _checked(
    preset: Preset,
    steps: Any,
    seeds: Any,
    quick: bool,
    threads: Any,
    conditions: Any,
) -> tuple[int | None, int, list[int], list[Condition]]:
    """:func:`run_preset`'s arguments checked: ``(steps, total steps, seeds, conditions)``."""
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise PresetError(f"steps must be an int ≥ 1, got {steps!r}")
        steps = int(steps)
    total = steps if steps is not None else (preset.quick_steps if quick else preset.steps)
    seed_list = _seeds_arg(seeds, preset.seeds[:1] if quick else preset.seeds)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise PresetError(f"threads must be an int ≥ 1, got {threads!r}")
    chosen = list(preset.conditions)
    if conditions is not None:
        if isinstance(conditions, str):
            conditions = [conditions]
        chosen = [preset.condition(c) for c in dict.fromkeys(conditions)]
        if not chosen:
            raise PresetError("conditions must name at least one condition")
    return steps, total, seed_list, chosen


def _run_serial(
    preset: Preset,
    chosen: list[Condition],
    seed_list: list[int],
    total: int,
    folder: Path,
    data_dir: Any,
    manifest: Manifest,
    keep: dict[str, RunInfo],
    *,
    threads: int | None,
    quick: bool,
    progress: bool,
) -> Manifest:
    """The runs of :func:`run_preset` one after the other in this process (a progress bar
    each; the manifest written after every run, complete at the end)."""
    from tqdm import tqdm

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for cond in chosen:
            n = total if cond.steps is None else min(cond.steps, total)
            for seed in seed_list:
                rel = Path(cond.name) / f"seed-{seed}.zarr"
                if rel.as_posix() in keep:  # resume: finished before
                    manifest.runs.append(keep[rel.as_posix()])
                    manifest.write()
                    continue
                with tqdm(
                    total=n,
                    desc=f"{preset.name}/{cond.name}/seed-{seed}",
                    unit="step",
                    file=sys.stderr,
                    disable=None if progress else True,  # None: only on a terminal
                    dynamic_ncols=True,
                ) as bar:
                    info = _run_one(
                        preset, cond, seed, n, folder / rel, data_dir, bar.update, quick=quick
                    )
                    bar.set_postfix(acc=f"{info.final_test_acc:.4f}", diverged=info.diverged)
                info.path = rel.as_posix()
                manifest.runs.append(info)
                manifest.write()
        manifest.complete = True
        manifest.write()
    finally:
        torch.set_num_threads(old_threads)
    return manifest


def _plan(
    folder: Path,
    manifest: Manifest,
    planned: list[str],
    *,
    resume: bool,
    force: bool,
    log: Callable[[str], Any],
) -> dict[str, RunInfo]:
    """:func:`plan_rerun`, then the new manifest written (without runs): the runs to keep."""
    keep = plan_rerun(
        folder, manifest.to_dict(), planned, resume=bool(resume), force=bool(force), log=log
    )
    manifest.path = folder / "manifest.json"
    manifest.write()
    return keep


def train_condition(
    preset: Preset,
    cond: Condition,
    seed: int,
    steps: int,
    recorded: Sequence[int],
    *,
    recorder: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], Recorder] | None = None,
    data_dir: str | Path | None = None,
    progress: Callable[[int], Any] | None = None,
    quick: bool = False,
) -> TrainResult:
    """Train condition ``cond`` of ``preset`` with ``seed``, as :func:`run_preset` does.

    The model is built after ``torch.manual_seed(seed)`` (the global RNG is restored after);
    then :func:`train` runs ``steps`` steps with the condition's optimizer, the
    preset's batches, test accuracy at every ``eval_every``-th of the ``recorded`` steps (see
    :func:`record_steps`), the preset's measurement at every ``measure_every``-th of them, and
    divergence handled as a result. With ``recorder=None`` nothing is recorded and the
    measurement, which is logged into the run, is skipped: the same training at the cost of
    training alone (``bench/fig1_wall.py`` compares the two). ``quick`` applies the preset's
    ``quick_measure_kwargs``.

    Examples
    --------
    >>> p = get_preset("fig1")  # doctest: +SKIP
    >>> r = train_condition(p, p.condition("bn"), 0, 500, record_steps(500, 10))  # doctest: +SKIP
    >>> r.steps_done  # doctest: +SKIP
    500
    """
    measure = None
    if recorder is not None and preset.measure is not None:
        kwargs = {**preset.measure_kwargs, **(preset.quick_measure_kwargs if quick else {})}
        measure = functools.partial(_MEASURES[preset.measure], data_dir=data_dir, **kwargs)
    with isolated():
        torch.manual_seed(seed)
        model = cond.build()
        return train(
            model,
            steps,
            lr=cond.lr,
            optimizer=cond.optimizer,
            momentum=cond.momentum,
            weight_decay=cond.weight_decay,
            batch_size=preset.batch_size,
            seed=seed,
            data=preset.data,
            data_dir=data_dir,
            eval_at=_every_kth(list(recorded), preset.eval_every),
            eval_size=preset.eval_size,
            recorder=recorder,
            probe_size=preset.probe_size,
            measure=measure,
            measure_at=_every_kth(list(recorded), preset.measure_every),
            stop_on_divergence=True,
            progress=progress,
        )


def _run_one(
    preset: Preset,
    cond: Condition,
    seed: int,
    steps: int,
    path: Path,
    data_dir: str | Path | None,
    progress: Callable[[int], Any] | None,
    *,
    quick: bool = False,
) -> RunInfo:
    """One run of ``cond`` with ``seed`` for ``steps`` steps, recorded to ``path``."""
    records = min(preset.records, preset.quick_records) if quick else preset.records
    recorded = record_steps(steps, records)
    schedule = at_steps(recorded)
    options = preset.recorder_options(cond, quick=quick)
    needs_loss = preset.ics_every is not None or preset.landscape_every is not None

    def make(model: nn.Module, opt: torch.optim.Optimizer, probe: torch.Tensor) -> Recorder:
        extra: dict[str, Any] = {}
        if preset.ics_every is not None:
            extra["ics"] = _every_kth(recorded, preset.ics_every)
        if preset.landscape_every is not None:
            extra["landscape"] = _every_kth(recorded, preset.landscape_every)
        if preset.jacobian_every is not None:
            extra["jacobian"] = _every_kth(recorded, preset.jacobian_every)
        if needs_loss:
            extra["loss_fn"] = F.cross_entropy
        return Recorder(
            model,
            **{
                "every": schedule,
                "optimizer": opt,
                "probe": probe,
                "path": path,
                "overwrite": True,
                "seed": seed,
                **extra,
                **options,
            },
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    result = train_condition(
        preset,
        cond,
        seed,
        steps,
        recorded,
        recorder=make,
        data_dir=data_dir,
        progress=progress,
        quick=quick,
    )
    rec = result.recorder
    accuracy = dict(result.accuracy)
    final = accuracy.pop(result.steps_done)
    return RunInfo(
        condition=cond.name,
        seed=seed,
        path=str(path),
        steps=steps,
        steps_done=result.steps_done,
        wall_time=result.wall_time,
        final_test_acc=final,
        test_acc=accuracy,
        final_loss=result.final_loss if math.isfinite(result.final_loss) else None,
        diverged=result.diverged_step is not None
        or (rec is not None and rec.diverged_step is not None),
        diverged_step=result.diverged_step,
        recorded_diverged_step=None if rec is None else rec.diverged_step,
        records=0 if rec is None else rec.n_records,
    )

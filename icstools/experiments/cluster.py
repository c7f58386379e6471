"""The runs of a preset on a ``dask.distributed`` cluster (``icstools run --workers/--scheduler``).

:func:`~icstools.experiments.run_preset` hands its runs (conditions × seeds) to
:func:`run_on_cluster` when it is given ``workers=N`` (a :class:`distributed.LocalCluster` of
``N`` worker processes on this machine, one torch thread each) or ``scheduler=ADDRESS`` (an
existing cluster, e.g. started with ``dask scheduler`` and ``dask worker ADDRESS``, whose workers
see the output folder at the same path: a shared file system).

* **Same runs.** A run is the same function call as in the serial loop (``_run_one``: the seeded
  model build, the training, the recorder), in a worker process with ``threads`` torch threads
  (default 1, as ``icstools run``): its store is bit-for-bit the serial run's store of the same
  seed. A worker process runs one run at a time, whatever its number of dask threads, because
  torch's RNG and thread settings belong to the process.
* **Manifest.** The client (this process) writes ``manifest.json``: after each finished run, in
  the serial order (conditions, then seeds), whatever order the runs finish in. ``complete``
  turns true when every run finished.
* **Failures.** A run that raises in its worker is reported (condition, seed, the error) and the
  others go on; at the end :class:`RunsFailedError` lists the failed runs, the manifest listing
  the others (``--resume`` runs the failed ones again).
* **Progress.** One line per finished or failed run on the log (``icstools run``: stderr):
  ``run 3/8 finished: bn/seed-1.zarr (…)``.
* **Ctrl-C.** The runs not started are cancelled and the local cluster is shut down (its
  workers stop, a run half-written stays unlisted); the manifest lists the finished runs, so
  ``--resume`` keeps them and runs the others. On an existing cluster (``scheduler=``) dask
  cannot stop a run already started: it finishes on its worker, unlisted, and ``--resume`` runs
  it again (after it ended: its store's lock says it is being written until then).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from icstools import __version__
from icstools.experiments.presets import Condition, Preset, PresetError

if TYPE_CHECKING:
    from icstools.experiments.runner import Manifest, RunInfo

__all__ = ["ClusterError", "Job", "RunFailure", "RunsFailedError", "connect", "run_on_cluster"]

#: One run at a time per worker process (torch's RNG and thread count are per process).
_ONE_RUN_PER_PROCESS = threading.Lock()


class ClusterError(PresetError):
    """The cluster cannot run the preset: bad ``workers``/``scheduler``, a scheduler that does not
    answer, a worker that does not see the output folder or runs other versions."""


@dataclass(frozen=True)
class Job:
    """One run to do: condition ``cond`` with ``seed`` for ``steps`` steps, into ``rel``
    (``<condition>/seed-<n>.zarr``, relative to the preset's folder)."""

    rel: str
    cond: Condition
    seed: int
    steps: int


@dataclass(frozen=True)
class RunFailure:
    """A run that raised in its worker.

    Attributes
    ----------
    condition : str
    seed : int
    path : str
        Its store, relative to the manifest's folder (not listed in the manifest).
    error : str
        ``"<exception type>: <message>"``.
    user_error : bool
        The error is a user mistake (bad preset option, missing MNIST data, a store error, a
        folder the worker cannot see), not a bug.
    """

    condition: str
    seed: int
    path: str
    error: str
    user_error: bool

    def __str__(self) -> str:
        return f"{self.condition}/seed-{self.seed} ({self.path}): {self.error}"


class RunsFailedError(RuntimeError):
    """Some runs failed in their workers; the others finished and are in the manifest.

    Attributes
    ----------
    manifest : Manifest
        The written manifest (``complete`` false), listing the finished runs.
    failures : list of RunFailure
    """

    def __init__(self, manifest: Manifest, failures: Sequence[RunFailure]) -> None:
        self.manifest = manifest
        self.failures = list(failures)
        total = len(self.failures) + len(manifest.runs)
        super().__init__(
            f"{len(self.failures)} of {total} runs of {manifest.preset!r} failed: "
            + "; ".join(map(str, self.failures))
            + f"; the {len(manifest.runs)} others are kept in {manifest.path} (run again with"
            " --resume, resume=True, to run the failed ones)"
        )

    @property
    def user_error(self) -> bool:
        """Every failure is a user mistake (``icstools run`` exits 2 then, else 1)."""
        return all(f.user_error for f in self.failures)


def check_args(workers: Any, scheduler: Any) -> None:
    """Validate ``workers`` and ``scheduler`` (before anything is written).

    Raises
    ------
    ClusterError
        ``workers`` not an int ≥ 1, ``scheduler`` not a non-empty string, or both given.
    """
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ClusterError(f"workers must be an int ≥ 1, got {workers!r}")
    if scheduler is not None and (not isinstance(scheduler, str) or not scheduler.strip()):
        raise ClusterError(
            f"scheduler must be a dask scheduler address such as 'tcp://host:8786', got"
            f" {scheduler!r}"
        )
    if workers is not None and scheduler is not None:
        raise ClusterError(
            "give either workers (--workers, a local cluster) or scheduler (--scheduler, an"
            " existing cluster), not both"
        )


@contextlib.contextmanager
def connect(workers: int | None, scheduler: str | None) -> Iterator[Any]:
    """A :class:`distributed.Client` of a new local cluster or of the one at ``scheduler``.

    The local cluster (``workers`` processes, one thread each, distributed's logging silenced:
    :func:`run_on_cluster` reports the failed runs) and the client are closed on exit, also
    after an error or Ctrl-C: the local workers stop then.

    Raises
    ------
    ClusterError
        ``distributed`` is not installed, or the scheduler does not answer.

    Examples
    --------
    >>> with connect(2, None) as client:  # doctest: +SKIP
    ...     client.submit(sum, [1, 2]).result()
    3
    """
    check_args(workers, scheduler)
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ClusterError(
            "running presets on a cluster needs dask.distributed: pip install 'icstools[cluster]'"
            f" ({exc})"
        ) from None
    if scheduler is not None:
        try:
            client = Client(scheduler)  # timeout: distributed.comm.timeouts.connect
        except (OSError, ValueError, TypeError) as exc:  # TimeoutError is an OSError
            raise ClusterError(
                f"cannot connect to the dask scheduler at {scheduler!r}: {exc}; start one with"
                " 'dask scheduler' (and workers with 'dask worker ADDRESS'), or use --workers N"
                " for a local cluster"
            ) from None
        with client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # any free port: 8787 may be taken (by another cluster)
            silence_logs=logging.CRITICAL,  # a failed run is reported once, below
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _versions() -> dict[str, str]:
    return {"icstools": __version__, "torch": torch.__version__}


def _run_task(
    preset: Preset,
    job: Job,
    folder: str,
    cwd: str,
    data_dir: str | None,
    threads: int,
    quick: bool,
    versions: dict[str, str],
) -> RunInfo:
    """The body of one run, in a worker process (see the module docstring).

    ``folder`` is the preset's folder as the client names it (relative to the client's ``cwd``
    or absolute): a worker in the same working directory uses it as it is, so that the store's
    ``recorder_config`` names the path the serial run names; another one uses it absolute.
    """
    from icstools.experiments.runner import _run_one

    if os.getcwd() != cwd:
        folder = os.path.join(cwd, folder)

    here = _versions()
    if here != versions:
        raise ClusterError(
            f"the worker on {socket.gethostname()} runs {here}, this client {versions}: the runs"
            " would not be comparable; install the same versions on every worker"
        )
    if not (Path(folder) / "manifest.json").is_file():
        raise ClusterError(
            f"the worker on {socket.gethostname()} does not see the output folder {folder}: the"
            " workers of --scheduler must see the --out path (a shared file system)"
        )
    with _ONE_RUN_PER_PROCESS:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            info = _run_one(
                preset,
                job.cond,
                job.seed,
                job.steps,
                Path(folder) / job.rel,
                data_dir,
                None,
                quick=quick,
            )
        finally:
            torch.set_num_threads(old)
    info.path = job.rel
    return info


def _user_error(exc: BaseException) -> bool:
    from icstools.data import MNISTError
    from icstools.store import StoreError

    return isinstance(exc, (PresetError, MNISTError, StoreError, FileNotFoundError))


def _describe(info: RunInfo) -> str:
    diverged = f", diverged at step {info.diverged_step}" if info.diverged else ""
    return f"test acc {info.final_test_acc:.4f}{diverged}, {info.wall_time:.1f} s"


def run_on_cluster(
    client: Any,
    manifest: Manifest,
    preset: Preset,
    jobs: Sequence[Job],
    keep: dict[str, RunInfo],
    *,
    data_dir: str | Path | None,
    threads: int | None,
    quick: bool,
    log: Callable[[str], Any],
) -> Manifest:
    """Run ``jobs`` on the cluster of ``client``; write ``manifest`` after each finished run.

    Parameters
    ----------
    client : distributed.Client
        From :func:`connect`.
    manifest : Manifest
        Written already (``manifest.path`` set), without runs.
    preset : Preset
    jobs : sequence of Job
        Every planned run, in the serial order.
    keep : dict
        Runs finished before (``resume``), by ``Job.rel``: listed, not run again.
    data_dir : str or Path, optional
        MNIST base folder, as the workers see it (default: their ``$ICSTOOLS_DATA``).
    threads : int, optional
        torch threads per run (default 1).
    quick : bool
    log : callable
        Receives one line per finished or failed run, and the set-up.

    Returns
    -------
    Manifest
        Complete.

    Raises
    ------
    RunsFailedError
        Some runs failed (the others are kept in the manifest).
    KeyboardInterrupt
        After cancelling the runs not finished (the manifest lists the finished ones).
    """
    from distributed import as_completed

    order = {job.rel: i for i, job in enumerate(jobs)}
    done: dict[str, RunInfo] = {rel: info for rel, info in keep.items() if rel in order}
    folder = str(Path(manifest.path).parent)
    todo = [job for job in jobs if job.rel not in done]
    where = _where(client)
    log(f"running {len(todo)} of {len(jobs)} runs on {where}")
    _write(manifest, done, order)
    token = uuid.uuid4().hex[:8]
    futures = {
        client.submit(
            _run_task,
            preset,
            job,
            folder,
            os.getcwd(),
            None if data_dir is None else str(Path(data_dir).expanduser().absolute()),
            threads or 1,
            quick,
            _versions(),
            key=f"icstools-{preset.name}/{job.rel}-{token}",
            pure=False,
        ): job
        for job in todo
    }
    failures: list[RunFailure] = []
    finished = 0
    t0 = time.perf_counter()
    try:
        for future in as_completed(list(futures)):
            job = futures[future]
            finished += 1
            try:
                exc = future.exception()
            except Exception as lost:  # cancelled by the scheduler (e.g. its workers left)
                exc = lost
            count = f"run {finished}/{len(todo)}"
            if exc is None:
                info = future.result()
                done[job.rel] = info
                _write(manifest, done, order)
                log(f"{count} finished: {job.rel} ({_describe(info)})")
            else:
                failures.append(
                    RunFailure(
                        job.cond.name,
                        job.seed,
                        job.rel,
                        f"{type(exc).__name__}: {' '.join(str(exc).split())}",
                        _user_error(exc),
                    )
                )
                log(f"{count} FAILED: {failures[-1]}")
    except BaseException as exc:  # Ctrl-C (or the manifest cannot be written): nothing more
        client.cancel(list(futures), force=True)
        if isinstance(exc, KeyboardInterrupt):
            log(
                f"interrupted after {finished} of {len(todo)} runs: the manifest lists the"
                f" {len(done)} finished; --resume (resume=True) runs the others"
            )
        raise
    log(f"{len(todo)} run(s) in {time.perf_counter() - t0:.1f} s on {where}")
    if failures:
        raise RunsFailedError(manifest, sorted(failures, key=lambda f: order[f.path]))
    manifest.complete = True
    manifest.write()
    return manifest


def _write(manifest: Manifest, done: dict[str, RunInfo], order: dict[str, int]) -> None:
    """The manifest with the finished runs in the serial order."""
    manifest.runs = [done[rel] for rel in sorted(done, key=order.__getitem__)]
    manifest.write()


def _where(client: Any) -> str:
    n = len(client.nthreads())
    return f"the dask cluster at {client.scheduler.address} ({n} worker{'s' * (n != 1)})"

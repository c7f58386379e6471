"""Running a preset into a folder that already holds runs of it: refuse, resume or force.

:func:`~icstools.experiments.run_preset` (``icstools run``) calls :func:`plan_rerun` before
it writes anything to ``<out>/<preset>``:

* by default a folder that holds runs of the preset (a ``manifest.json`` or run stores
  ``<condition>/seed-<n>.zarr``) is refused with :class:`RunsExistError`, which lists them;
* ``resume=True`` (``--resume``) keeps the *finished* runs and runs the others. It needs the
  configuration of the earlier call (conditions, seeds, steps, quick, batch size, data, probe,
  record schedule and recorder options, compared with the manifest; a difference is an error
  naming the keys). A run is finished if the earlier manifest lists it and its store is
  complete: sound (:func:`icstools.store.verify_run`) with the records the manifest says. An
  unfinished run (a store without an entry, a damaged or short store, or no store) is run again
  from scratch: ``Recorder(resume=True)`` continues a store only from a checkpoint of the
  training (model, optimizer and RNG states), and the presets save none;
* ``force=True`` (``--force``) removes every run store of the folder first (each under its
  lock: a store a live writer holds is an error, nothing is removed then), so the folder holds
  only the runs the new manifest lists.

In every case nothing is touched while another process writes one of the stores (its lock).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icstools.experiments.presets import PresetError
from icstools.store import StoreError, StoreLock, live_writer, verify_run

__all__ = ["CONFIG_KEYS", "RunsExistError", "plan_rerun"]

#: Manifest keys that must be equal for ``resume=True``.
CONFIG_KEYS = (
    "conditions",
    "seeds",
    "steps",
    "quick",
    "batch_size",
    "data",
    "probe_size",
    "record",
)


class RunsExistError(PresetError):
    """The output folder already holds runs of the preset (neither resume nor force given)."""


@dataclass
class _Found:
    folder: Path
    manifest: Any = None  # Manifest
    manifest_error: str | None = None
    stores: list[str] = field(default_factory=list)  # "<condition>/seed-<n>.zarr"

    def __bool__(self) -> bool:
        return bool(self.manifest is not None or self.manifest_error is not None or self.stores)


def _find(folder: Path) -> _Found:
    from icstools.experiments.runner import load_manifest

    found = _Found(folder)
    if (folder / "manifest.json").is_file():
        try:
            found.manifest = load_manifest(folder)
        except ValueError as exc:
            found.manifest_error = str(exc)
    if folder.is_dir():
        found.stores = sorted(
            p.relative_to(folder).as_posix()
            for p in folder.glob("*/*.zarr")
            if p.is_dir() and not p.name.startswith(".")
        )
    return found


def _listed(found: _Found) -> dict[str, Any]:
    """The runs the earlier manifest lists, by relative store path."""
    return {} if found.manifest is None else {r.path: r for r in found.manifest.runs}


def _listing(found: _Found) -> str:
    listed = _listed(found)
    parts = [
        f"{rel} ({'listed in the manifest' if rel in listed else 'unfinished: not listed'})"
        for rel in found.stores
    ]
    parts += [f"{rel} (listed, its store is missing)" for rel in listed if rel not in found.stores]
    if found.manifest_error is not None:
        parts.append(f"an unreadable manifest.json ({found.manifest_error})")
    elif found.manifest is not None and not parts:
        parts.append("a manifest.json without finished runs")
    return ", ".join(parts)


def _config(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: d.get(k) for k in CONFIG_KEYS}))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _config(old), _config(new)
    out = []
    for key in CONFIG_KEYS:
        if a[key] == b[key]:
            continue
        if isinstance(a[key], dict) and isinstance(b[key], dict):
            sub = sorted(k for k in a[key].keys() | b[key].keys() if a[key].get(k) != b[key].get(k))
            out.append(f"{key} ({', '.join(map(str, sub))})")
        else:
            out.append(f"{key} ({json.dumps(a[key])} there, {json.dumps(b[key])} now)")
    return out


def _check_no_live_writer(folder: Path, rels: list[str]) -> None:
    for rel in rels:
        who = live_writer(folder / rel)
        if who is not None:
            raise StoreError(
                f"{folder / rel} is being written: {who}; wait until that run is finished (or"
                " stop it) before running the preset into this folder again"
            )


def _finished(folder: Path, info: Any) -> tuple[bool, str]:
    """Whether the run ``info`` of the earlier manifest is complete on disk, and why not."""
    path = folder / info.path
    if not path.exists():
        return False, "its store is missing"
    try:
        result = verify_run(path)
    except (StoreError, OSError) as exc:
        return False, f"its store cannot be read ({exc})"
    if not result.ok:
        return False, f"its store is damaged ({result.problems[0]})"
    if result.records != info.records:
        return False, f"its store holds {result.records} of {info.records} records"
    return True, ""


def plan_rerun(
    folder: Path,
    new: dict[str, Any],
    planned: list[str],
    *,
    resume: bool,
    force: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Decide what to do with the runs already in ``folder``; see the module docstring.

    Parameters
    ----------
    folder : Path
        ``<out>/<preset>``.
    new : dict
        The new manifest (``Manifest.to_dict()``).
    planned : list of str
        The new runs' store paths, relative to ``folder``, in order.
    resume, force : bool
    log : callable
        Receives one line per decision (kept, run again, removed).

    Returns
    -------
    dict
        The finished runs to keep (``resume``): relative store path → ``RunInfo``.

    Raises
    ------
    RunsExistError
        ``folder`` holds runs and neither ``resume`` nor ``force`` was given.
    PresetError
        Both given, or ``resume`` with another configuration or without a readable manifest.
    StoreError
        A store of ``folder`` is being written by a live writer.
    """
    if resume and force:
        raise PresetError("give either resume (--resume) or force (--force), not both")
    found = _find(folder)
    if not found:
        return {}
    _check_no_live_writer(folder, sorted(set(found.stores) | set(planned)))
    name = new["preset"]
    if not resume and not force:
        raise RunsExistError(
            f"{folder} already holds runs of the preset {name!r}: {_listing(found)}; pass"
            " --resume (resume=True) to finish the unfinished runs and keep the finished ones"
            " (same configuration required), or --force (force=True) to replace them all (runs"
            " the new manifest does not list are removed), or choose another --out"
        )
    if force:
        for rel in found.stores:
            _remove_store(folder / rel)
            log(f"removed {rel} (--force)")
        for cond in {Path(rel).parent for rel in found.stores}:
            try:
                (folder / cond).rmdir()  # only if empty
            except OSError:
                pass
        return {}
    if found.manifest is None:
        raise PresetError(
            f"cannot resume the runs in {folder}: "
            + (found.manifest_error or "it has no manifest.json")
            + "; without it the finished runs are unknown: use --force to replace them"
        )
    diffs = _differences(found.manifest.to_dict(), new)
    if diffs:
        raise PresetError(
            f"cannot resume the runs in {folder}: the configuration differs in "
            f"{'; '.join(diffs)}; resume with the same options as before, or use --force to"
            " replace the runs"
        )
    keep: dict[str, Any] = {}
    listed = _listed(found)
    for rel in planned:
        info = listed.get(rel)
        if info is not None:
            done, why = _finished(folder, info)
            if done:
                keep[rel] = info
                log(f"kept {rel}: finished ({info.steps_done} steps, {info.records} records)")
                continue
            log(f"running {rel} again from scratch: {why}")
        elif rel in found.stores:
            log(
                f"running {rel} again from scratch: its run did not finish (the presets save no"
                " training checkpoints to resume it from)"
            )
    return keep


def _remove_store(path: Path) -> None:
    """Delete the run store ``path`` under its lock (a live writer's store is an error)."""
    with warnings.catch_warnings():
        # a killed run's lock is taken over silently here: the store goes anyway
        warnings.simplefilter("ignore")
        lock = StoreLock.acquire(path)
    try:
        shutil.rmtree(path)
    finally:
        lock.release()

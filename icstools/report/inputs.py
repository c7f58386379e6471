"""Finding the runs a report reads: preset directories (``manifest.json`` and
``<condition>/seed-<n>.zarr`` stores), directories of run stores (searched recursively), single
stores. Stores are opened with :func:`icstools.open_run` (:mod:`icstools.store` is the only
module that reads runs); a store that cannot be opened becomes a note, not an error."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xarray as xr

from icstools.store import StoreError, open_run

__all__ = ["Inputs", "as_paths", "find_inputs", "group_labels", "open_store", "preset_runs"]


def as_paths(inputs: Any) -> list[Path]:
    """``inputs`` (a path or a non-empty list of paths) as a list of :class:`~pathlib.Path`."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not isinstance(inputs, Sequence) or not inputs:
        raise TypeError(
            "inputs must be a non-empty list of paths (preset directories, directories of run "
            f"stores, or run stores), got {inputs!r}"
        )
    out = []
    for p in inputs:
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"inputs must hold paths, got {type(p).__name__}")
        out.append(Path(p))
    return out


def _is_store(path: Path) -> bool:
    return path.is_dir() and any(
        (path / n).exists() for n in (".zmetadata", ".zgroup", "zarr.json")
    )


def _seed_of(path: Path) -> int | None:
    m = re.fullmatch(r"seed-(-?\d+)\.zarr", path.name)
    return int(m.group(1)) if m else None


@dataclass
class Inputs:
    """What :func:`collect` found: preset directories (directory, preset name, notes), run
    stores outside presets, and notes."""

    presets: list[tuple[Path, str, list[str]]] = field(default_factory=list)  # dir, name, notes
    stores: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _discover(path: Path, found: Inputs, depth: int = 0) -> None:
    if _is_store(path):
        found.stores.append(path)
        return
    manifest = path / "manifest.json"
    if manifest.is_file():
        notes: list[str] = []
        name = None
        try:
            meta = json.loads(manifest.read_text())
            name = meta.get("preset") if isinstance(meta, dict) else None
        except (OSError, ValueError) as exc:
            notes.append(f"cannot read {manifest}: {exc}")
        if not isinstance(name, str) or not name:
            notes.append(f'{manifest} has no "preset" name: its runs are treated as any runs')
            found.notes += notes
            for child in sorted(path.iterdir()):
                if child.is_dir():
                    _discover(child, found, depth + 1)
            return
        found.presets.append((path, name, notes))
        return
    if depth > 4:
        return
    for child in sorted(path.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            _discover(child, found, depth + 1)


def find_inputs(inputs: Sequence[Path]) -> Inputs:
    """The preset directories and run stores in ``inputs`` (each must be a directory)."""
    found = Inputs()
    for p in inputs:
        if not p.exists():
            raise FileNotFoundError(f"input {str(p)!r} does not exist")
        if not p.is_dir():
            raise ValueError(
                f"input {str(p)!r} is not a run store, a preset directory (with manifest.json) "
                "or a directory of run stores"
            )
        before = (len(found.presets), len(found.stores))
        _discover(p, found)
        if (len(found.presets), len(found.stores)) == before:
            found.notes.append(f"no run store or preset directory found in {p}")
    return found


def open_store(path: Path, notes: list[str]) -> xr.Dataset | None:
    """The run at ``path``, or None and a note saying why it cannot be opened."""
    try:
        return open_run(path)
    except (StoreError, FileNotFoundError, OSError, ValueError) as exc:
        notes.append(f"cannot open the run {path}: {exc}")
        return None


def _listed_runs(directory: Path) -> set[Path] | None:
    """The run stores ``directory``'s manifest lists (absolute), or None if it lists none."""
    try:
        runs = json.loads((directory / "manifest.json").read_text()).get("runs")
        listed = {(directory / r["path"]).absolute() for r in runs}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return listed


def preset_runs(
    directory: Path, notes: list[str]
) -> dict[str, list[tuple[str, int | None, xr.Dataset]]]:
    """The runs of a preset directory: ``{condition: [(path, seed, dataset)]}``, by seed.

    Only the runs its ``manifest.json`` lists are used: a store it does not list (left by an
    earlier or interrupted run of the preset) is skipped, with a note saying so.
    """
    listed = _listed_runs(directory)
    out: dict[str, list[tuple[str, int | None, xr.Dataset]]] = {}
    for cond_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        stores = [p for p in cond_dir.iterdir() if p.suffix == ".zarr" and _is_store(p)]
        stores.sort(key=lambda p: (_seed_of(p) is None, _seed_of(p) or 0, p.name))
        for store in stores:
            if listed is not None and store.absolute() not in listed:
                notes.append(
                    f"skipped the run {store}: {directory / 'manifest.json'} does not list it "
                    "(left by an earlier or unfinished run of the preset)"
                )
                continue
            ds = open_store(store, notes)
            if ds is not None:
                out.setdefault(cond_dir.name, []).append((str(store), _seed_of(store), ds))
    for path in sorted(listed or ()):
        if not _is_store(path):
            notes.append(f"cannot open the run {path}: the manifest lists it but it is missing")
    return out


def group_labels(
    paths: Sequence[Path], labels: Sequence[str] | None, is_preset: Sequence[bool]
) -> list[str]:
    """The group name of each input: ``labels`` (checked: one non-empty, distinct name per
    input, none for a preset folder), else the input's name without ``.zarr`` (its whole path
    where two inputs share a name)."""
    if labels is None:
        names = [p.name[: -len(".zarr")] if p.name.endswith(".zarr") else p.name for p in paths]
        return [
            n if names.count(n) == 1 and n else str(p) for n, p in zip(names, paths, strict=True)
        ]
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise TypeError(f"labels must be a list of str (one per input), got {labels!r}")
    if len(labels) != len(paths):
        raise ValueError(
            f"{len(labels)} label(s) {list(labels)!r} for {len(paths)} input(s) "
            f"{[str(p) for p in paths]}: give one label per input, in the same order"
        )
    for label, path, preset in zip(labels, paths, is_preset, strict=True):
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"label {label!r} of {str(path)!r}: a label is a non-empty name")
        if preset:
            raise ValueError(
                f"label {label!r}: {str(path)!r} is a preset folder (its conditions are "
                "compared by its claims); labels name run stores or folders of runs"
            )
    repeated = sorted({x for x in labels if list(labels).count(x) > 1})
    if repeated:
        raise ValueError(f"labels must be distinct, {repeated!r} repeated in {list(labels)!r}")
    return list(labels)

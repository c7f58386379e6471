"""Continuing a store after a restart: the ``resume=True`` half of :class:`RunWriter`.

A resumed writer *adopts* the last commit of an existing store instead of creating one: the
schema (variables, dims, dtypes, the values of the static variables) and the steps are read
from it, so every later append is checked against the store's own first block, and appended
after its last record. :meth:`ResumableWriter.drop_from` then removes the records of the steps
the resumed training will record again (a metadata-only commit that shortens every step array;
the chunk files past the new length are rewritten by the next appends).

What is read and checked on adoption: the commit marker (its checksum), the static variables
and the ``step`` coordinate (each chunk's checksum), and the last chunk along ``step`` of every
step array, the one the next append rewrites. The chunks of older records are not read (a
store can be large): ``icstools verify`` checks all of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
import zarr

from icstools.schema import STEP
from icstools.store.checksums import unseal_marker
from icstools.store.errors import StoreError
from icstools.store.files import _MARKER, STORE_FORMAT, _atomic_write_bytes, _AtomicLocalStore
from icstools.store.owners import _NEW_TAG
from icstools.store.reader import _open_commit

if TYPE_CHECKING:
    from icstools.store.writer import _VarSpec

__all__ = ["ResumableWriter", "describe_steps"]


def describe_steps(steps: Any) -> str:
    """``steps 3, 5, 7`` or, for many, ``40 records, steps 100, 102, 104, …, 176, 178``."""
    steps = [int(s) for s in np.asarray(steps).reshape(-1)]
    if len(steps) <= 8:
        return "step" + ("s " if len(steps) != 1 else " ") + ", ".join(map(str, steps))
    head, tail = ", ".join(map(str, steps[:3])), ", ".join(map(str, steps[-2:]))
    return f"{len(steps)} records, steps {head}, …, {tail}"


def _nothing_to_resume(path: Path) -> StoreError:
    started = sorted(path.parent.glob(f".{path.name}{_NEW_TAG}*")) if path.parent.is_dir() else []
    why = (
        f"a run that was killed before its first commit left only {started[0].name} (no record"
        " was ever committed)"
        if started
        else "no such file or directory"
    )
    return StoreError(
        f"resume=True: there is no run to continue at {path}: {why}. Start a new run without "
        "resume=True (or check the path)"
    )


class ResumableWriter:
    """The resume half of :class:`~icstools.store.RunWriter` (a base class of it).

    Attributes set by :meth:`_adopt` on a resumed writer
    ----------------------------------------------------
    resumed : xarray.Dataset or None
        The store as adopted: its static variables (loaded) and attrs, without records.
    resumed_steps : numpy.ndarray or None
        The steps of its committed records (after :meth:`drop_from`: the kept ones).
    """

    resumed: xr.Dataset | None = None
    resumed_steps: np.ndarray | None = None

    # provided by RunWriter
    path: Path
    fsync: bool
    _specs: dict[str, _VarSpec] | None
    _arrays: dict[str, zarr.AsyncArray]
    _zmeta: dict[str, Any]
    _n: int
    _last_step: int | None

    def _adopt(self) -> None:
        """Take the last commit of the store at ``self.path`` as this writer's own."""
        from icstools.store.writer import _static_values, _VarSpec

        if not self.path.exists():
            raise _nothing_to_resume(self.path)
        snapshot, attrs = _open_commit(self.path)  # StoreError: no commit, damaged marker
        fmt = attrs.get("icstools_store_format")
        if fmt != STORE_FORMAT:
            raise StoreError(
                f"resume=True: {self.path} has store format {fmt} (no checksums), written by an "
                f"older icstools; only format {STORE_FORMAT} stores can be continued: record "
                "the run again, or write the resumed part to a new path"
            )
        zmeta, _ = unseal_marker(snapshot._snapshot[_MARKER], str(self.path))
        meta = zmeta["metadata"]
        try:
            ds = xr.open_dataset(
                snapshot,
                engine="zarr",
                consolidated=True,
                zarr_format=2,
                chunks=None,  # lazy: only what is read below is loaded (and checked)
                decode_times=False,
                decode_timedelta=False,
                mask_and_scale=False,
            )
            specs: dict[str, _VarSpec] = {}
            for name, var in ds.variables.items():
                name = str(name)
                dtype = np.dtype(meta[f"{name}/.zarray"]["dtype"])
                if STEP in var.dims:
                    axis = var.dims.index(STEP)
                    shape = tuple(-1 if i == axis else n for i, n in enumerate(var.shape))
                    specs[name] = _VarSpec(name, var.dims, dtype, shape, axis, name in ds.coords)
                else:
                    values = _static_values(name, var)
                    specs[name] = _VarSpec(
                        name, var.dims, values.dtype, values.shape, None, name in ds.coords, values
                    )
            steps = np.asarray(ds[STEP].values, dtype=np.int64)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(
                f"resume=True: cannot read the run store {self.path}: {exc!r}"
            ) from exc
        n = int(attrs.get("n_committed", -1))
        if steps.size != n or (n > 1 and not bool(np.all(np.diff(steps) > 0))):
            raise StoreError(
                f"resume=True: {self.path} is corrupt: {n} committed records, but its steps are"
                f" {describe_steps(steps)}"
            )
        self._specs = specs
        self._open_arrays(_AtomicLocalStore(self.path, fsync=self.fsync))
        self._n = n
        self._last_step = int(steps[-1]) if n else None
        static = {k: (v.dims, v.values) for k, v in specs.items() if v.values is not None}
        self.resumed = xr.Dataset(
            {k: v for k, v in static.items() if k not in ds.coords},
            coords={k: v for k, v in static.items() if k in ds.coords},
            attrs=dict(attrs),
        )
        self.resumed_steps = steps
        ds.close()
        self._check_tail(snapshot)

    def _check_tail(self, snapshot: Any) -> None:
        """Raise :class:`StoreError` if a chunk that the next append rewrites is damaged."""
        checker = snapshot._checker
        if checker is None or self._n == 0:
            return
        assert self._specs is not None
        for name, spec in self._specs.items():
            if spec.step_axis is None or name not in checker.arrays:
                continue
            info = checker.arrays[name]
            last = (self._n - 1) // info["chunks"][spec.step_axis]
            for key in checker.chunk_keys(name):
                index = key.rpartition("/")[2].split(info["sep"])
                if int(index[spec.step_axis]) == last:
                    try:
                        data: bytes | None = (self.path / key).read_bytes()
                    except FileNotFoundError:
                        data = None
                    checker.check(key, data)

    def drop_from(self, step: int) -> np.ndarray:
        """Remove the committed records of steps ``>= step``; return their steps.

        One metadata-only commit shortens every step array (a reader sees the records before
        ``step`` only); the run attr ``diverged_step`` is dropped with them if it is among
        them. Nothing is written if no record is dropped.
        """
        steps = self.resumed_steps
        if steps is None:
            raise ValueError("drop_from is for a writer made with resume=True")
        k = int(np.searchsorted(steps, step, side="left"))
        dropped = steps[k:].copy()
        if not dropped.size:
            return dropped
        specs = self._specs
        assert specs is not None
        meta = self._zmeta["metadata"]
        for name, arr in list(self._arrays.items()):
            axis = specs[name].step_axis
            assert axis is not None
            shape = list(arr.shape)
            shape[axis] = k
            self._arrays[name] = zarr.AsyncArray(
                metadata=arr.metadata.update_shape(tuple(shape)),
                store_path=arr.store_path,
                config=arr.config,
            )
            zarray = dict(meta[f"{name}/.zarray"], shape=shape)
            _atomic_write_bytes(
                self.path / name / ".zarray", json.dumps(zarray).encode(), fsync=self.fsync
            )
        root = dict(meta.get(".zattrs", {}))
        diverged = root.get("diverged_step")
        if isinstance(diverged, int) and diverged >= step:
            del root["diverged_step"]
        self._zmeta = {**self._zmeta, "metadata": {**meta, ".zattrs": root}}
        self._commit(n=k)
        self._n = k
        self._last_step = int(steps[k - 1]) if k else None
        self.resumed_steps = steps[:k].copy()
        if self.resumed is not None:
            self.resumed.attrs = dict(root, n_committed=k)
        return dropped

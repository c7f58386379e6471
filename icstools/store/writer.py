"""Writing runs: :class:`RunWriter` (one commit per append), see :mod:`icstools.store`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.core.sync import sync as _zarr_sync

from icstools.schema import STEP
from icstools.store.checksums import chunk_encoding, seal_marker
from icstools.store.errors import StoreError
from icstools.store.files import (
    _MARKER,
    _OWNER_FILE,
    _RESERVED_ATTRS,
    _STATIC_KINDS,
    _STEP_KINDS,
    STORE_FORMAT,
    _atomic_write_bytes,
    _AtomicLocalStore,
    _fsync_dir,
    logger,
)
from icstools.store.owners import (
    _NEW_TAG,
    StoreLock,
    _check_writable_location,
    _owner_record,
    _remove_leftovers,
    _remove_owned_dir,
)
from icstools.store.resume import ResumableWriter

__all__ = ["DEFAULT_CHUNK_STEPS", "RunWriter"]

#: Records per chunk along ``step`` unless told otherwise. Each append of a chunk writes one
#: file per array (~1 ms of the writer's CPU each on ext4 here, whatever its size), so short
#: chunks cost the writer per record what long ones do per chunk: the paper MLP's 16 arrays at
#: every step took ~0.4 ms of the writer's CPU per record in chunks of 64 and ~0.1 ms in chunks
#: of 256 (``bench/README.md``, *Issue 11: the store's writer*). Wide records get shorter chunks
#: (the recorder's bound).
DEFAULT_CHUNK_STEPS = 256
#: Bytes of a block from which its arrays are written one after the other, not all at once.
SEQUENTIAL_BYTES = 16 * 2**20

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _json_attr(name: str, value: Any) -> Any:
    """``value`` as a JSON-able Python object (numpy scalars/arrays converted), else TypeError."""
    if isinstance(value, np.generic | np.ndarray):
        value = value.tolist()
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"attr {name!r}={value!r} is not JSON-serialisable: {exc}") from None
    return value


def _chunk_shape(
    shape: tuple[int, ...],
    itemsize: int,
    step_axis: int | None,
    chunk_steps: int,
    max_bytes: int,
) -> tuple[int, ...]:
    """Chunk shape: ``chunk_steps`` along step, other dims halved (largest first) to fit."""
    chunks = [max(1, int(n)) for n in shape]
    if step_axis is not None:
        chunks[step_axis] = chunk_steps
    while math.prod(chunks) * itemsize > max_bytes:
        free = [i for i, c in enumerate(chunks) if i != step_axis and c > 1]
        if not free:
            break
        i = max(free, key=lambda j: chunks[j])
        chunks[i] = -(-chunks[i] // 2)
    return tuple(chunks)


@dataclass(frozen=True)
class _VarSpec:
    name: str
    dims: tuple[str, ...]
    dtype: np.dtype
    shape: tuple[int, ...]  # the step entry is meaningless (-1)
    step_axis: int | None  # None for static variables
    is_coord: bool
    values: np.ndarray | None = None  # static variables only


def _static_values(name: str, var: xr.Variable) -> np.ndarray:
    values = np.asarray(var.values)
    if values.dtype.kind == "O":
        # object arrays are written with object codecs by zarr; store str as fixed width instead
        if not all(isinstance(v, str) for v in values.ravel().tolist()):
            raise ValueError(
                f"static variable {name!r} has dtype object with non-str items; "
                "only numbers, bools and strings can be stored"
            )
        values = values.astype(str)
    if values.dtype.kind not in _STATIC_KINDS:
        raise ValueError(
            f"static variable {name!r} has unsupported dtype {values.dtype}; "
            "use bool, int, uint, float or str"
        )
    return values


def _array_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def _check_steps(steps: np.ndarray, after: int | None) -> np.ndarray:
    if steps.ndim != 1 or steps.dtype.kind not in "iu":
        raise ValueError(f"the 'step' coordinate must be 1-D integer, got dtype {steps.dtype}")
    steps = steps.astype(np.int64, copy=False)
    if steps.size > 1 and not bool(np.all(np.diff(steps) > 0)):
        raise ValueError("steps must increase strictly within a block")
    if after is not None and steps.size and steps[0] <= after:
        raise ValueError(
            f"steps must increase strictly across appends: block starts at step {int(steps[0])}"
            f" but step {after} is already written"
        )
    return steps


def _remove_abandoned(store: _AtomicLocalStore) -> None:
    """Delete a store under construction after a failure.

    zarr (and xarray through it) may still be finishing concurrent writes of the failed
    operation; the store refuses new ones, and removal is retried until they have drained.
    """
    store.abandoned.set()
    for _ in range(20):
        _remove_owned_dir(store.root)
        if not os.path.lexists(store.root):
            return
        time.sleep(0.05)
    logger.warning("could not remove the abandoned store directory %s", store.root)


_VALID_TARGETS = (
    "a run is created at a path where nothing exists, or replaces an icstools run store or an"
    " empty directory with overwrite=True"
)


def _check_replaceable(path: Path) -> None:
    """Raise unless ``path`` (existing) is an icstools store or an empty directory.

    Only those may be replaced with ``overwrite=True``; anything else is refused with or without.
    """
    if not path.is_dir():
        raise FileExistsError(
            f"{path} exists and is not an icstools run store (it is not a directory); refusing"
            f" to touch it: {_VALID_TARGETS}"
        )
    if not any(path.iterdir()):
        return
    for name in (_MARKER, ".zattrs"):
        try:
            raw = (path / name).read_bytes()
            meta = json.loads(raw)
            attrs = meta["metadata"].get(".zattrs", {}) if name == _MARKER else meta
            if "icstools_store_format" in attrs:
                return
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    raise FileExistsError(
        f"{path} exists and is not an icstools run store; refusing to touch it: {_VALID_TARGETS}"
    )


# --------------------------------------------------------------------------------------------
# RunWriter
# --------------------------------------------------------------------------------------------


class RunWriter(ResumableWriter):
    """Appends blocks of records to a Zarr store on disk, crash-safely.

    Each :meth:`append` is one *commit*: once it returns, the block is on disk (in the page cache;
    pass ``fsync=True`` to also survive power loss) and a reader (:func:`open_run`, in any
    process) sees it. If the writing process dies at any moment, :func:`open_run` returns exactly
    the records of the last completed commit. See the module docstring for the protocol.

    Parameters
    ----------
    path : str or os.PathLike
        Directory of the store. It is created by the first :meth:`append` (atomically, by renaming
        a hidden sibling directory built next to it); until then it does not exist. Its parent
        directory must exist or be creatable, and be writable: the constructor tries that (it
        creates and removes a test directory there) and raises at once if not.
    chunk_steps : int, default 256 (:data:`DEFAULT_CHUNK_STEPS`)
        Chunk length along ``step`` (at least 1), fixed by the first append.
    overwrite : bool, default False
        If False, an existing ``path`` raises FileExistsError. If True, an existing icstools store
        (or empty directory) at ``path`` is replaced at the first commit; any other existing path
        still raises FileExistsError.
    resume : bool, default False
        Continue the store at ``path`` (it must exist and hold a commit): its schema and steps
        are adopted, so appends continue after its last record and must match its first block
        (:mod:`icstools.store.resume`; :meth:`drop_from` removes records the resumed run will
        write again). A missing, never committed or damaged store is a StoreError. Not with
        ``overwrite``.

    Raises
    ------
    FileExistsError
        Something exists at ``path``: anything but an icstools store or an empty directory, or
        anything at all without ``overwrite``.
    StoreError
        No store can be created at ``path``: its parent is not a directory or cannot be
        created, is not writable (permissions, read-only filesystem), or the name is too long.
    max_chunk_bytes : int, default 4 MiB
        Upper bound on the uncompressed size of a chunk; the largest non-step dims are split
        (halved) until a chunk fits. It is exceeded only if ``chunk_steps`` times the item size
        alone does not fit.
    fsync : bool, default False
        fsync every written file and its directory. Not needed for crash safety against a killed
        process (the OS keeps the data), only against power loss or a kernel crash; costly.

    Notes
    -----
    The first block fixes the schema: variable names, dims (in order), dtypes, the sizes of all
    non-step dims, and the values of all static (step-less) variables, which are written once.
    Every later block must match it; :meth:`append` raises ValueError naming the offending
    variable otherwise, before writing anything. Step variables must be bool, int, uint or float;
    static ones may also be strings (stored as fixed-width unicode). Attrs of later blocks are
    merged into the run's attrs (added or updated, never removed), like :meth:`set_attrs`.
    Only one writer may write a given store at a time.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> def block(steps):
    ...     return xr.Dataset(
    ...         {"loss": ("step", np.asarray(steps, dtype="f8") / 10)},
    ...         coords={"step": np.asarray(steps, dtype="i8")},
    ...     )
    >>> with RunWriter(tmp_path / "run.zarr", chunk_steps=16) as w:  # doctest: +SKIP
    ...     w.append(block([0, 1, 2]))
    ...     w.append(block([3, 4]))
    ...     w.set_attrs(diverged_step=4)
    ...     w.n_committed
    5
    >>> open_run(tmp_path / "run.zarr").loss.values  # doctest: +SKIP
    array([0. , 0.1, 0.2, 0.3, 0.4])
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        chunk_steps: int = DEFAULT_CHUNK_STEPS,
        overwrite: bool = False,
        max_chunk_bytes: int = 4 * 2**20,
        fsync: bool = False,
        resume: bool = False,
    ) -> None:
        self.path = Path(path).expanduser().absolute()
        if resume and overwrite:
            raise ValueError(
                "resume=True continues the store at path and overwrite=True deletes it: pass one"
            )
        if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int | np.integer):
            raise TypeError(f"chunk_steps must be an int, got {chunk_steps!r}")
        if chunk_steps < 1:
            raise ValueError(f"chunk_steps must be at least 1, got {chunk_steps}")
        if max_chunk_bytes <= 0:
            raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")
        self.chunk_steps = int(chunk_steps)
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.overwrite = bool(overwrite)
        self.fsync = bool(fsync)
        if os.path.lexists(self.path) and not resume:
            _check_replaceable(self.path)  # anything but a store or an empty directory: refused
            if not overwrite:
                raise FileExistsError(
                    f"{self.path} already exists: pass resume=True to continue its run after a"
                    " restart, or overwrite=True to delete it (and its records) for a new run"
                )
        _check_writable_location(self.path)
        # one writer per store: a live writer's lock is a StoreError, also with overwrite=True
        self._lock = StoreLock.acquire(self.path)
        self._release_lock = weakref.finalize(self, self._lock.release)  # also if never closed
        _remove_leftovers(self.path)
        self._specs: dict[str, _VarSpec] | None = None
        self._arrays: dict[str, zarr.AsyncArray] = {}
        self._store: _AtomicLocalStore | None = None
        self._zmeta: dict[str, Any] = {}
        self._n = 0
        self._last_step: int | None = None
        self._pending_attrs: dict[str, Any] = {}
        self._closed = False
        self._broken: BaseException | None = None
        if resume:
            try:
                self._adopt()
            except BaseException:
                self._closed = True
                self._release_lock()
                raise

    @classmethod
    def _adopt_lock(
        cls,
        path: str | os.PathLike,
        lock: StoreLock,
        *,
        chunk_steps: int,
        overwrite: bool,
        max_chunk_bytes: int,
        fsync: bool,
    ) -> RunWriter:
        """A writer of ``path`` under a lock taken by another writer, which made the checks of
        the constructor and cleaned the leftovers (a writer process under its parent's lock,
        see :mod:`icstools.store.process`). Releasing ``lock`` is the owner's business."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.chunk_steps, self.max_chunk_bytes = int(chunk_steps), int(max_chunk_bytes)
        self.overwrite, self.fsync = bool(overwrite), bool(fsync)
        self._lock = lock
        self._release_lock = weakref.finalize(self, lock.release)
        self._specs = None
        self._arrays = {}
        self._store = None
        self._zmeta = {}
        self._n = 0
        self._last_step = None
        self._pending_attrs = {}
        self._closed = False
        self._broken = None
        return self

    # ---- public API -------------------------------------------------------------------------

    @property
    def n_committed(self) -> int:
        """Number of steps (records) committed so far."""
        return self._n

    def append(self, block: xr.Dataset) -> None:
        """Append ``block`` (a Dataset with a ``step`` dim) and commit it; synchronous.

        Parameters
        ----------
        block : xarray.Dataset
            Records to append. Its steps must be strictly increasing and greater than every step
            already written; it must match the schema fixed by the first block.

        Raises
        ------
        ValueError
            The block does not match the schema, or its steps do not increase strictly.
            Nothing is written in that case and the writer stays usable.
        StoreError
            Writing failed (e.g. disk full). What was committed before stays readable; the
            writer cannot be used any more.

        Examples
        --------
        >>> w.append(xr.Dataset({"loss": ("step", [0.5, 0.4])}, coords={"step": [10, 11]}))
        ... # doctest: +SKIP
        """
        self._check_usable()
        if not isinstance(block, xr.Dataset):
            raise TypeError(f"block must be an xarray.Dataset, got {type(block).__name__}")
        if STEP not in block.dims or STEP not in block.variables:
            raise ValueError(f"block must have a {STEP!r} dimension and coordinate")
        steps = _check_steps(np.asarray(block[STEP].values), self._last_step)
        if self._specs is None:
            specs = self._make_specs(block)
            if steps.size == 0:
                return
            self._create(block, specs, steps)
            return
        data = self._validated_step_data(block, steps)
        self._stage_attrs(self._changed_attrs(block.attrs))
        if steps.size == 0:
            return
        try:
            self._write(data, steps.size)
            self._commit(n=self._n + steps.size)
        except BaseException as exc:
            self._fail(exc)
            if not isinstance(exc, Exception):
                raise
            raise StoreError(f"appending to {self.path} failed: {exc!r}") from exc
        self._n += steps.size
        self._last_step = int(steps[-1])

    def set_attrs(self, **attrs: Any) -> None:
        """Set run attrs (JSON-able scalars/strings/lists), e.g. ``diverged_step=123``.

        They are persisted at once (a metadata-only commit) if the store exists, else with the
        first :meth:`append`. The reserved names ``icstools_store_format`` and ``n_committed``
        raise ValueError; values that are not JSON-serialisable raise TypeError.

        Examples
        --------
        >>> w.set_attrs(diverged_step=1234, note="lr too high")  # doctest: +SKIP
        """
        self._stage_attrs(attrs)
        if self._specs is not None:
            self._check_usable()
            try:
                self._commit(n=self._n)
            except BaseException as exc:
                self._fail(exc)
                if not isinstance(exc, Exception):
                    raise
                raise StoreError(f"writing attrs to {self.path} failed: {exc!r}") from exc

    def close(self) -> None:
        """Persist pending attrs and release the store; further appends raise ValueError.

        Attrs set before any append are lost if nothing was ever appended (no store exists).
        Calling close twice is fine.
        """
        if self._closed:
            return
        try:
            if self._specs is not None and self._broken is None and self._store is not None:
                if self._pending_attrs:
                    self._commit(n=self._n)
                self._write_zarrays()
        finally:
            self._closed = True
            self._arrays = {}
            self._release_lock()

    def _hand_over(self) -> None:
        """Another writer (a writer process) continues this one's commits under its lock:
        from now on this one writes nothing, not even at :meth:`close` (its metadata and
        staged attrs are out of date), and only releases the lock when closed."""
        self._specs = None
        self._arrays = {}
        self._store = None
        self._pending_attrs = {}

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunWriter({str(self.path)!r}, n_committed={getattr(self, '_n', 0)})"

    # ---- internals --------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError(f"RunWriter for {self.path} is closed")
        if self._broken is not None:
            raise StoreError(
                f"RunWriter for {self.path} is unusable after a failed write: {self._broken!r}"
            )
        try:
            self._lock.check()
        except StoreError as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: BaseException) -> None:
        """After a failed write: nothing more is written by this writer, its lock is released."""
        self._broken = exc
        self._release_lock()

    def _stage_attrs(self, attrs: Mapping[str, Any]) -> None:
        bad = _RESERVED_ATTRS.intersection(attrs)
        if bad:
            raise ValueError(f"attrs {sorted(bad)} are reserved by the store")
        self._pending_attrs.update({k: _json_attr(k, v) for k, v in attrs.items()})

    def _changed_attrs(self, attrs: Mapping[Any, Any]) -> dict[str, Any]:
        """The entries of ``attrs`` (of a later block) that differ from the run's attrs."""
        if not attrs:
            return {}
        current = {**self._zmeta["metadata"].get(".zattrs", {}), **self._pending_attrs}
        changed = {}
        for key, value in attrs.items():
            key = str(key)
            if key in _RESERVED_ATTRS or key == "coordinates":
                continue
            value = _json_attr(key, value)
            if key not in current or current[key] != value:
                changed[key] = value
        return changed

    def _make_specs(self, block: xr.Dataset) -> dict[str, _VarSpec]:
        specs: dict[str, _VarSpec] = {}
        for name, var in block.variables.items():
            name = str(name)
            if STEP in var.dims:
                if var.dims.count(STEP) != 1:
                    raise ValueError(f"variable {name!r} has the {STEP!r} dim more than once")
                dtype = np.dtype(np.int64) if name == STEP else var.dtype
                if dtype.kind not in _STEP_KINDS:
                    raise ValueError(
                        f"step variable {name!r} has unsupported dtype {var.dtype}; "
                        "use bool, int, uint or float"
                    )
                axis = var.dims.index(STEP)
                shape = tuple(-1 if i == axis else n for i, n in enumerate(var.shape))
                specs[name] = _VarSpec(name, var.dims, dtype, shape, axis, name in block.coords)
            else:
                values = _static_values(name, var).copy()  # the caller may reuse its arrays
                specs[name] = _VarSpec(
                    name, var.dims, values.dtype, values.shape, None, name in block.coords, values
                )
        return specs

    def _validated_step_data(self, block: xr.Dataset, steps: np.ndarray) -> dict[str, np.ndarray]:
        """Check ``block`` against the schema; return the arrays of its step variables."""
        specs = self._specs
        assert specs is not None
        if len(block.variables) != len(specs) or any(n not in specs for n in block.variables):
            names = {str(n) for n in block.variables}
            missing = sorted(set(specs) - names)
            extra = sorted(names - set(specs))
            raise ValueError(
                f"block variables differ from the run's: missing {missing}, unexpected {extra}"
            )
        data: dict[str, np.ndarray] = {}
        for name, var in block.variables.items():
            spec = specs[name]
            if var.dims != spec.dims:
                raise ValueError(f"variable {name!r} has dims {var.dims}, expected {spec.dims}")
            if (name in block.coords) != spec.is_coord:
                kind = "a coordinate" if spec.is_coord else "a data variable"
                raise ValueError(f"variable {name!r} must be {kind}, as in the first block")
            if spec.step_axis is None:
                values = _static_values(name, var)
                if values.dtype != spec.dtype or not _array_equal(values, spec.values):
                    resumed = "" if self.resumed is None else " (of the resumed store)"
                    raise ValueError(
                        f"static variable {name!r} differs from the first block's{resumed} "
                        "(static variables and coordinates are written once and must not change)"
                    )
                continue
            values = steps if name == STEP else np.asarray(var.values)
            if values.dtype != spec.dtype:
                raise ValueError(
                    f"variable {name!r} has dtype {values.dtype}, expected {spec.dtype}"
                )
            shape = tuple(-1 if i == spec.step_axis else n for i, n in enumerate(values.shape))
            if shape != spec.shape:
                raise ValueError(
                    f"variable {name!r} has shape {values.shape}; its non-step dims must keep "
                    f"the sizes of the first block {dict(zip(spec.dims, spec.shape, strict=True))}"
                )
            data[name] = values
        return data

    def _create(self, block: xr.Dataset, specs: dict[str, _VarSpec], steps: np.ndarray) -> None:
        """First commit: build the store in a hidden sibling directory, then rename it."""
        block = block.drop_encoding()
        variables: dict[str, xr.Variable] = {}
        encoding: dict[str, dict[str, Any]] = {}
        for name, spec in specs.items():
            var = block.variables[name]
            if spec.step_axis is None:
                values = spec.values
                itemsize = values.dtype.itemsize
            else:
                empty = [slice(None)] * len(spec.dims)
                empty[spec.step_axis] = slice(0, 0)
                values = np.asarray(var.values)[tuple(empty)].astype(spec.dtype, copy=False)
                itemsize = spec.dtype.itemsize
            variables[name] = xr.Variable(spec.dims, values, attrs=var.attrs)
            chunks = _chunk_shape(
                values.shape, itemsize, spec.step_axis, self.chunk_steps, self.max_chunk_bytes
            )
            encoding[name] = {"chunks": chunks, **chunk_encoding()}
        coords = {n: v for n, v in variables.items() if specs[n].is_coord}
        data_vars = {n: v for n, v in variables.items() if not specs[n].is_coord}
        attrs = {k: _json_attr(k, v) for k, v in block.attrs.items() if k not in _RESERVED_ATTRS}
        attrs.update(self._pending_attrs)
        attrs.update(icstools_store_format=STORE_FORMAT, n_committed=0)
        schema = xr.Dataset(data_vars, coords=coords, attrs=attrs)
        tmp = self.path.parent / f".{self.path.name}{_NEW_TAG}{uuid.uuid4().hex[:12]}"
        store = _AtomicLocalStore(tmp, fsync=self.fsync)
        try:
            self._specs = specs
            data = self._validated_step_data(block, steps)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(tmp)
            _atomic_write_bytes(
                tmp / _OWNER_FILE, json.dumps(_owner_record()).encode(), mkdirs=False
            )
            schema.to_zarr(
                store,
                mode="w-",
                zarr_format=2,
                consolidated=True,
                encoding=encoding,
                write_empty_chunks=True,
            )
            self._open_arrays(store)
            self._write(data, steps.size)
            self._commit(n=steps.size)
            self._write_zarrays()  # in the hidden directory: published with the first commit
            self._publish(tmp)
        except BaseException as exc:
            self._specs = None
            self._arrays = {}
            _remove_abandoned(store)
            if not isinstance(exc, ValueError | TypeError):
                self._fail(exc)  # a schema error leaves the writer usable, anything else not
            if not isinstance(exc, Exception) or isinstance(
                exc, FileExistsError | ValueError | TypeError
            ):
                raise
            raise StoreError(f"creating the run store {self.path} failed: {exc!r}") from exc
        self._open_arrays(_AtomicLocalStore(self.path, fsync=self.fsync))
        self._n = steps.size
        self._last_step = int(steps[-1])

    def _publish(self, tmp: Path) -> None:
        """Atomically move the complete first commit from ``tmp`` to ``self.path``."""
        old = None
        if os.path.lexists(self.path):
            if not self.overwrite:
                raise FileExistsError(f"{self.path} was created by someone else meanwhile")
            _check_replaceable(self.path)
            old = self.path.parent / f".{self.path.name}.icstools-old-{uuid.uuid4().hex[:12]}"
            os.rename(self.path, old)
        os.rename(tmp, self.path)
        with contextlib.suppress(OSError):  # the ownership record is for the hidden directory only
            os.unlink(self.path / _OWNER_FILE)
        if self.fsync:
            _fsync_dir(self.path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _open_arrays(self, store: _AtomicLocalStore) -> None:
        self._store = store
        self._zmeta = json.loads((store.root / _MARKER).read_bytes())
        group = zarr.open_group(store, mode="r+", zarr_format=2, use_consolidated=True)
        config = {"write_empty_chunks": True}
        assert self._specs is not None
        self._arrays = {
            name: group[name].with_config(config).async_array  # type: ignore[union-attr]
            for name, spec in self._specs.items()
            if spec.step_axis is not None
        }

    def _write(self, data: dict[str, np.ndarray], k: int) -> None:
        """Grow every step array by ``k`` steps and write the new region (not yet committed).

        The arrays are resized in memory only: their new shapes are committed by the marker
        (:meth:`_commit`), and their ``.zarray`` files are rewritten by :meth:`close`, not here.
        Each file costs ~1 ms of the writer's CPU on ext4 (temporary file, write, rename); one
        per array per append had been ~40% of the writer's CPU at every step, and that CPU
        competes with the training process for the cores. All arrays are written concurrently
        on zarr's event loop.
        """
        n0 = self._n
        specs = self._specs
        assert specs is not None

        async def one(name: str) -> tuple[str, zarr.AsyncArray]:
            arr = self._arrays[name]
            axis = specs[name].step_axis
            assert axis is not None
            shape = list(arr.shape)
            shape[axis] = n0 + k
            arr = zarr.AsyncArray(
                metadata=arr.metadata.update_shape(tuple(shape)),
                store_path=arr.store_path,
                config=arr.config,
            )
            region = [slice(None)] * len(shape)
            region[axis] = slice(n0, n0 + k)
            await arr.setitem(tuple(region), data[name])
            return name, arr

        async def all_arrays() -> list[Any]:
            # return_exceptions: let every write finish before reporting a failure, so nothing
            # is still writing when the caller cleans up
            if sum(np.asarray(a).nbytes for a in data.values()) <= SEQUENTIAL_BYTES:
                return await asyncio.gather(
                    *(one(name) for name in self._arrays), return_exceptions=True
                )
            # a wide block: one array at a time (each still with zarr's concurrent chunks); all
            # at once held the read, decoded, merged and encoded copies of every array's chunks
            # together (~5 blocks of memory)
            done: list[Any] = []
            for name in self._arrays:
                try:
                    done.append(await one(name))
                except Exception as exc:
                    done.append(exc)
            return done

        results = _zarr_sync(all_arrays())
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self._arrays.update(results)

    def _write_zarrays(self) -> None:
        """Rewrite each step array's ``.zarray`` with its committed shape (the marker's).

        Only for readers that ignore the commit marker (``zarr.open_array`` on one array): until
        the writer closes they see the shape of the first commit or of the previous close, a
        prefix of the committed records. Written by the first commit and by :meth:`close`.
        """
        assert self._store is not None
        meta = self._zmeta["metadata"]
        for name in self._arrays:
            _atomic_write_bytes(
                self._store.root / name / ".zarray",
                json.dumps(meta[f"{name}/.zarray"]).encode(),
                fsync=self.fsync,
                mkdirs=False,
            )

    def _commit(self, n: int) -> None:
        """Commit ``n`` steps: write the root .zattrs, then the commit marker .zmetadata.

        The marker is the last file written by an append: an append that raised is not
        committed. The root ``.zattrs`` is for readers that do not use ``.zmetadata`` for attrs
        (zarr-python reads it even with consolidated metadata; :func:`open_run` never does), so
        during an append it may run one commit ahead of the marker.
        """
        assert self._store is not None and self._specs is not None
        meta = dict(self._zmeta["metadata"])
        for name, arr in self._arrays.items():
            meta[f"{name}/.zarray"] = dict(meta[f"{name}/.zarray"], shape=list(arr.shape))
        attrs = {**meta.get(".zattrs", {}), **self._pending_attrs, "n_committed": n}
        meta[".zattrs"] = attrs
        zmeta = {**self._zmeta, "metadata": meta}
        root = self._store.root
        _atomic_write_bytes(root / ".zattrs", json.dumps(attrs).encode(), fsync=self.fsync)
        self._lock.check()  # still the one writer: else nothing is committed
        _atomic_write_bytes(root / _MARKER, seal_marker(zmeta), fsync=self.fsync)
        self._zmeta = zmeta
        self._pending_attrs = {}

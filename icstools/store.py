"""Crash-safe on-disk storage of runs: the only module of icstools that reads or writes runs.

A *run* is an :class:`xarray.Dataset` with a ``step`` dimension (an int64 coordinate holding the
optimizer step of each record) plus *static* variables and coordinates without ``step`` (e.g.
``unit_site (unit)`` strings, ``quantile`` floats, ``hist_edges (site, edge)``) and attrs.

:class:`RunWriter` appends blocks of records to a Zarr store, :class:`BackgroundWriter` does the
same from a worker thread, and :func:`open_run` reads a run back, up to its last commit.

Store layout and commit protocol
--------------------------------
The store is a plain Zarr *format 2* group that xarray can open by itself
(``xr.open_zarr(path, consolidated=True)``): one array per variable with ``_ARRAY_DIMENSIONS``,
chunked ``chunk_steps`` along ``step``, Blosc-compressed, no object/pickle codecs (strings are
fixed-width unicode, dtype ``<U``). Zarr format 2 is used because format 3 has neither a
specified fixed-width string type nor specified consolidated metadata (zarr-python warns about
both).

* Every key is written atomically: to a temporary file in the same directory, then
  ``os.replace`` d over the key (optionally fsync'ed, see ``fsync=``). A reader therefore sees
  each chunk either wholly before or wholly after any rewrite.
* An append grows the step arrays, writes the new region (rewriting the partly filled last chunk
  of each array; its already committed records keep their values) and each array's ``.zarray``,
  then the root ``.zattrs``, and *last* the consolidated metadata ``.zmetadata``. That file is
  the **commit marker**: it holds the shape of every array and the root attrs
  (``icstools_store_format`` = 1, ``n_committed`` = committed steps) as of the last completed
  commit. Static variables are written once, by the first append.
* The first commit is a directory rename: the store is built in a hidden sibling directory and
  renamed to ``path`` once the first block is complete, so ``path`` exists only with a commit.
* :func:`open_run` reads ``.zmetadata`` once and serves *all* metadata (group attrs, array shapes)
  from that snapshot, so it sees exactly the arrays of the last commit, whatever a writer is doing
  at the time, and after a writer was killed at any moment (SIGKILL) as well. (Plain
  ``xr.open_zarr`` also uses ``.zmetadata`` for shapes but reads the root attrs from ``.zattrs``,
  which may be one append ahead while an append is under way or after a crash.)

Leftovers of a killed writer (hidden ``.*.tmp`` files, chunks past the committed length, a hidden
``.<name>.icstools-new-*`` directory if it died before its first commit) are ignored by readers.

Leftover directories and their owners
-------------------------------------
A writer creates two kinds of hidden directories next to ``path``: the ``.<name>.icstools-new-<12
hex digits>`` directory of the first commit, and a ``.<name>.icstools-probe-<10 hex digits>``
directory that :class:`RunWriter` creates and removes at once to check that the location is
writable. Right after creating either, the writer puts in it an *ownership record*, the JSON file
``.icstools-owner``: ``{"pid", "host"`` (``socket.gethostname()``), ``"boot_id"`` (Linux's
``/proc/sys/kernel/random/boot_id``), ``"pid_ns"`` (the ``/proc/self/ns/pid`` link: the PID
namespace, i.e. the container), ``"start_ticks"`` (field 22 of ``/proc/<pid>/stat``: the
process's start time in clock ticks after boot, against PID reuse), ``"created"}`` (a Unix time,
for people); the Linux-only entries are ``null`` elsewhere. The first commit's rename carries the
record into ``path``; the writer deletes it from there at once (a kill in between leaves it
there, harmless: readers ignore it).

Each new :class:`RunWriter` removes the leftover directories of its own path whose owner is
known to be gone; readers (:func:`open_run`) never write. An owner is gone if the record names
this host, boot and PID namespace, and no process has its pid, or the process with that pid
started at another time (the pid was reused), or is a zombie; where ``/proc/<pid>`` is missing
(no ``/proc``, or hidden by the ``hidepid`` mount option) ``os.kill(pid, 0)`` decides whether the
pid exists. Leftovers of a live owner are kept. A leftover
whose owner cannot be judged -- no record (written by an older icstools, or killed between the
directory's creation and its record's), an unreadable record, or a record from another host,
boot or PID namespace -- is left alone with a warning in the log: remove it by hand once no
writer is using it. A removal deletes the record last, so a writer killed while removing a
leftover leaves one that the next writer removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import queue
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync as _zarr_sync
from zarr.storage import LocalStore

from icstools.schema import SCHEMA_VERSION, STEP

__all__ = ["STORE_FORMAT", "BackgroundWriter", "RunWriter", "StoreError", "open_run"]

logger = logging.getLogger(__name__)

#: Version of the on-disk layout, stored as the root attribute ``icstools_store_format``.
STORE_FORMAT = 1
_MARKER = ".zmetadata"  # zarr v2 consolidated metadata, our commit marker
_OWNER_FILE = ".icstools-owner"  # ownership record in a hidden directory (module docstring)
_RESERVED_ATTRS = frozenset({"icstools_store_format", "n_committed"})
_STEP_KINDS = "biuf"  # bool, signed/unsigned int, float
_STATIC_KINDS = "biufUS"


class StoreError(RuntimeError):
    """A run store cannot be read or written: not an icstools store, corrupt, or a failed write."""


# --------------------------------------------------------------------------------------------
# Atomic file writes / zarr stores
# --------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(
    path: Path, data: Any, *, fsync: bool = False, exclusive: bool = False, mkdirs: bool = True
) -> None:
    """Write ``data`` (bytes-like) to ``path`` atomically (temp file + rename in the same dir)."""
    if mkdirs:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if exclusive:  # like zarr's set_if_not_exists: fail if the key exists
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)


class _AtomicLocalStore(LocalStore):
    """LocalStore whose every key write is atomic: temp file in the same directory + os.replace.

    zarr's own LocalStore happens to do something similar today; this subclass makes the property
    the commit protocol relies on explicit, independent of zarr's internals, and adds ``fsync``.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        read_only: bool = False,
        fsync: bool = False,
        _abandoned: threading.Event | None = None,
    ):
        super().__init__(root, read_only=read_only)
        self.fsync = fsync
        # set after a failure to refuse the writes still in flight; shared with the copies
        # zarr makes through with_read_only
        self.abandoned = threading.Event() if _abandoned is None else _abandoned

    def with_read_only(self, read_only: bool = False) -> _AtomicLocalStore:
        return type(self)(
            self.root, read_only=read_only, fsync=self.fsync, _abandoned=self.abandoned
        )

    def _check_not_abandoned(self) -> None:
        if self.abandoned.is_set():
            raise StoreError(f"{self.root} was abandoned after a failed write")

    def _put(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        if not isinstance(value, Buffer):
            raise TypeError(f"value must be a zarr Buffer, got {type(value)}")
        self._check_not_abandoned()
        path = self.root / key
        # create missing directories below the root only: a write still in flight after
        # _remove_abandoned must fail, not recreate the removed root
        missing = []
        parent = path.parent
        while parent != self.root and not parent.is_dir():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            directory.mkdir(exist_ok=True)
        _atomic_write_bytes(
            path, value.as_buffer_like(), fsync=self.fsync, exclusive=exclusive, mkdirs=False
        )

    async def _open(self, *, mode: Any = None) -> None:
        self._check_not_abandoned()
        await super()._open(mode=mode)

    def _ensure_open_sync(self) -> None:
        self._check_not_abandoned()
        super()._ensure_open_sync()

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        self._check_not_abandoned()
        if not self._is_open:
            await self._open()
        self._check_writable()
        await asyncio.to_thread(self._put, key, value, exclusive)

    def set_sync(self, key: str, value: Buffer) -> None:
        self._ensure_open_sync()
        self._check_writable()
        self._put(key, value)

    # the ownership record in the directory of a first commit is no key of the store: zarr
    # would refuse to create a group in a non-empty store otherwise

    async def list(self) -> AsyncIterator[str]:
        async for key in super().list():
            if key != _OWNER_FILE:
                yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        async for key in super().list_prefix(prefix):
            if key != _OWNER_FILE:
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        async for key in super().list_dir(prefix):
            if prefix.strip("/") or key != _OWNER_FILE:
                yield key


def _is_metadata_key(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return name in (".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json")


class _SnapshotStore(LocalStore):
    """Read-only LocalStore serving every metadata key from one consolidated-metadata snapshot.

    zarr-python reads the root ``.zattrs`` of a format-2 group from its own file even when it opens
    the group with consolidated metadata; serving it (and everything else) from the snapshot of
    ``.zmetadata`` makes attrs and shapes come from the same commit. Chunks come from disk.
    """

    def __init__(self, root: Path | str, *, read_only: bool = True, snapshot: dict[str, bytes]):
        super().__init__(root, read_only=True)
        self._snapshot = snapshot

    def with_read_only(self, read_only: bool = False) -> _SnapshotStore:
        return type(self)(self.root, snapshot=self._snapshot)

    def _from_snapshot(self, key: str, prototype: BufferPrototype | None, byte_range: Any):
        data = self._snapshot.get(key)
        if data is None:
            return None
        if byte_range is not None:  # never done for metadata; supported for completeness
            return None
        return (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    async def get(self, key: str, prototype=None, byte_range=None) -> Buffer | None:
        if _is_metadata_key(key):
            return self._from_snapshot(key, prototype, byte_range)
        return await super().get(key, prototype=prototype, byte_range=byte_range)

    def get_sync(self, key: str, *, prototype=None, byte_range=None) -> Buffer | None:
        if _is_metadata_key(key):
            return self._from_snapshot(key, prototype, byte_range)
        return super().get_sync(key, prototype=prototype, byte_range=byte_range)

    async def exists(self, key: str) -> bool:
        if _is_metadata_key(key):
            return key in self._snapshot
        return await super().exists(key)


def _snapshot_from_zmetadata(raw: bytes) -> dict[str, bytes]:
    """All metadata keys of a store from its ``.zmetadata`` bytes."""
    meta = json.loads(raw)["metadata"]
    snap = {key: json.dumps(value).encode() for key, value in meta.items()}
    snap[_MARKER] = raw
    return snap


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


_NEW_TAG = ".icstools-new-"  # hidden sibling of the first commit: .<name>.icstools-new-<12 hex>
_PROBE_TAG = ".icstools-probe-"  # same length with 10 hex digits
_LEFTOVER_SUFFIX = re.compile(r"\.icstools-(?:new-[0-9a-f]{12}|probe-[0-9a-f]{10})")


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of process ``pid`` from /proc, or None."""
    raw = _read_text(f"/proc/{pid}/stat")
    if not raw:
        return None
    try:
        fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold ")"
        return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime) of proc(5)
    except (ValueError, IndexError):
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _owner_record() -> dict[str, Any]:
    """The ownership record of this process (see the module docstring)."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
        "start_ticks": None if stat is None else stat[1],
        "created": time.time(),
    }


def _owner_alive(owner: Any) -> tuple[bool | None, str]:
    """Whether the owner of a hidden directory lives (None: cannot tell), and a description."""
    pid = owner.get("pid") if isinstance(owner, dict) else None
    host = owner.get("host") if isinstance(owner, dict) else None
    if type(pid) is not int or pid <= 0 or not isinstance(host, str):
        return None, "unreadable ownership record (no valid pid and host)"
    me = _owner_record()
    who = f"process {pid} on host {host!r}"
    if host != me["host"]:
        return None, f"owned by {who}, another host"
    for key, where in (
        ("boot_id", "another boot of this host (or another machine of the same name)"),
        ("pid_ns", "another PID namespace (container)"),
    ):
        if owner.get(key) is not None and me[key] is not None and owner.get(key) != me[key]:
            return None, f"owned by {who} in {where}"
    stat = _proc_stat(pid)
    if stat is not None:
        state, ticks = stat
        if state in ("Z", "X"):
            return False, f"its owner {who} is gone (a zombie)"
        recorded = owner.get("start_ticks")
        if type(recorded) is int and recorded != ticks:
            return False, f"its owner {who} is gone (the pid now belongs to another process)"
        return True, f"its owner {who} is running"
    # no /proc here, or /proc/<pid> missing (or hidden: mount option hidepid): ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, f"its owner {who} is gone"
    except PermissionError:
        return True, f"its owner {who} is running"
    except OSError as exc:
        return None, f"owned by {who}, whose state is unknown: {exc}"
    return True, f"its owner {who} is running"


def _remove_owned_dir(directory: Path) -> None:
    """Delete ``directory``, its ownership record last (so a kill meanwhile leaves it judgeable)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        entries = []
    for entry in entries:
        if entry.name == _OWNER_FILE:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.unlink(directory / _OWNER_FILE)
    shutil.rmtree(directory, ignore_errors=True)  # with whatever appeared meanwhile


def _remove_leftovers(path: Path) -> None:
    """Remove the hidden directories next to ``path`` left by writers that are gone.

    See the module docstring; never raises (a failure is logged).
    """
    prefix = f".{path.name}"
    try:
        entries = [
            e
            for e in os.scandir(path.parent)
            if e.name.startswith(prefix) and _LEFTOVER_SUFFIX.fullmatch(e.name[len(prefix) :])
        ]
    except OSError as exc:
        logger.warning("cannot look for leftovers of killed writers of %s: %s", path, exc)
        return
    for entry in entries:
        try:
            _remove_leftover(path, entry)
        except Exception:  # never let the clean-up stop a writer
            logger.exception("looking at the leftover %s failed", entry.path)


def _remove_leftover(path: Path, entry: os.DirEntry) -> None:
    """Remove one hidden directory of a writer of ``path`` if its owner is gone (else log)."""
    leftover = Path(entry.path)
    if not entry.is_dir(follow_symlinks=False):
        return
    try:
        owner = json.loads((leftover / _OWNER_FILE).read_bytes())
    except FileNotFoundError:
        if not leftover.is_dir():  # removed meanwhile (by its writer, or another cleaner)
            return
        alive, why = None, "no ownership record"
    except (OSError, ValueError) as exc:
        alive, why = None, f"unreadable ownership record ({exc})"
    else:
        alive, why = _owner_alive(owner)
    if alive is False:
        _remove_owned_dir(leftover)
        if os.path.lexists(leftover):
            logger.warning("could not remove the leftover %s (%s)", leftover, why)
        else:
            logger.info("removed the leftover %s of a writer of %s: %s", leftover, path, why)
    elif alive:
        logger.debug("kept %s: %s", leftover, why)
    else:
        logger.warning(
            "left alone %s, a leftover of a writer of %s: %s; remove it by hand if no writer is"
            " using it",
            leftover,
            path,
            why,
        )


def _check_writable_location(path: Path) -> None:
    """Raise :class:`StoreError` unless a store can be created at ``path``.

    Really tries what the first commit will do, rather than predicting it from permission bits
    (which root ignores and read-only filesystems override): creates the missing parent
    directories and, in the parent, a directory named as long as the hidden sibling the first
    commit builds, with a small file in it; then removes all that again.
    """
    parent = path.parent
    probe = parent / f".{path.name}{_PROBE_TAG}{uuid.uuid4().hex[:10]}"
    created: list[Path] = []
    made_probe = made_file = False
    action = f"creating a test directory {probe.name!r} in {parent}"
    try:
        missing = []
        ancestor = parent
        while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
            missing.append(ancestor)
            ancestor = ancestor.parent
        for directory in reversed(missing):
            action = f"creating the parent directory {directory}"
            try:
                os.mkdir(directory)
            except FileExistsError:  # created by someone else meanwhile
                if not directory.is_dir():
                    raise
                continue
            created.append(directory)
        action = f"creating a test directory {probe.name!r} in {parent}"
        os.mkdir(probe)
        made_probe = True
        action = f"creating a test file in {probe}"
        fd = os.open(probe / _OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        made_file = True
        try:
            os.write(fd, json.dumps(_owner_record()).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        reason = exc.strerror or repr(exc)
        hint = ""
        if exc.errno == errno.ENAMETOOLONG:
            hint = (
                f" (the name, {len(path.name)} characters, must leave room for the hidden"
                f" sibling directory '.<name>{_NEW_TAG}<12 hex digits>' of the first commit,"
                f" {len(_NEW_TAG) + 13} characters longer)"
            )
        raise StoreError(
            f"cannot create a run store at {path}: {action} failed: {reason}{hint}. The parent"
            " directory must be a writable directory that exists or can be created (the first"
            " commit builds the store in a hidden directory next to the path and renames it)"
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            if made_file:
                os.unlink(probe / _OWNER_FILE)
            if made_probe:
                os.rmdir(probe)
        for directory in reversed(created):  # only if still empty: another writer may use it
            with contextlib.suppress(OSError):
                os.rmdir(directory)


# --------------------------------------------------------------------------------------------
# RunWriter
# --------------------------------------------------------------------------------------------


class RunWriter:
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
    chunk_steps : int, default 64
        Chunk length along ``step`` (at least 2), fixed by the first append.
    overwrite : bool, default False
        If False, an existing ``path`` raises FileExistsError. If True, an existing icstools store
        (or empty directory) at ``path`` is replaced at the first commit; any other existing path
        still raises FileExistsError.

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
        chunk_steps: int = 64,
        overwrite: bool = False,
        max_chunk_bytes: int = 4 * 2**20,
        fsync: bool = False,
    ) -> None:
        self.path = Path(path).expanduser().absolute()
        if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int | np.integer):
            raise TypeError(f"chunk_steps must be an int, got {chunk_steps!r}")
        if chunk_steps < 2:
            raise ValueError(f"chunk_steps must be at least 2, got {chunk_steps}")
        if max_chunk_bytes <= 0:
            raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")
        self.chunk_steps = int(chunk_steps)
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.overwrite = bool(overwrite)
        self.fsync = bool(fsync)
        if os.path.lexists(self.path):
            _check_replaceable(self.path)  # anything but a store or an empty directory: refused
            if not overwrite:
                raise FileExistsError(f"{self.path} already exists (pass overwrite=True?)")
        _check_writable_location(self.path)
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
            self._broken = exc
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
                self._broken = exc
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
            if self._pending_attrs and self._specs is not None and self._broken is None:
                self._commit(n=self._n)
        finally:
            self._closed = True
            self._arrays = {}

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunWriter({str(self.path)!r}, n_committed={self._n})"

    # ---- internals --------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError(f"RunWriter for {self.path} is closed")
        if self._broken is not None:
            raise StoreError(
                f"RunWriter for {self.path} is unusable after a failed write: {self._broken!r}"
            )

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
                    raise ValueError(
                        f"static variable {name!r} differs from the first block's (static "
                        "variables and coordinates are written once and must not change)"
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
            encoding[name] = {"chunks": chunks}
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
            self._publish(tmp)
        except BaseException as exc:
            self._specs = None
            self._arrays = {}
            _remove_abandoned(store)
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

        The arrays are resized in memory and their ``.zarray`` rewritten with the new shape (for
        readers that ignore ``.zmetadata``); unlike ``zarr.Array.resize`` this skips rewriting
        the unchanged ``.zattrs`` of every array, which would cost one file per array. All arrays
        are written concurrently on zarr's event loop.
        """
        n0 = self._n
        specs = self._specs
        store = self._store
        assert specs is not None and store is not None
        meta = self._zmeta["metadata"]

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
            zarray = dict(meta[f"{name}/.zarray"], shape=shape)
            await asyncio.to_thread(
                _atomic_write_bytes,
                store.root / name / ".zarray",
                json.dumps(zarray).encode(),
                fsync=self.fsync,
                mkdirs=False,
            )
            return name, arr

        async def all_arrays() -> list[Any]:
            # return_exceptions: let every write finish before reporting a failure, so nothing
            # is still writing when the caller cleans up
            return await asyncio.gather(
                *(one(name) for name in self._arrays), return_exceptions=True
            )

        results = _zarr_sync(all_arrays())
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self._arrays.update(results)

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
        _atomic_write_bytes(root / _MARKER, json.dumps(zmeta).encode(), fsync=self.fsync)
        self._zmeta = zmeta
        self._pending_attrs = {}


# --------------------------------------------------------------------------------------------
# BackgroundWriter
# --------------------------------------------------------------------------------------------

_STOP = object()


class BackgroundWriter:
    """Wraps a :class:`RunWriter`: ``submit(block)`` returns at once, a worker thread writes.

    A single worker thread appends the submitted blocks in order. :meth:`flush` waits until all
    submitted blocks are committed; :meth:`close` flushes, stops the worker and closes the
    :class:`RunWriter`. If writing a block fails, the exception is re-raised, wrapped in
    :class:`StoreError` naming the path, at the next :meth:`submit`, :meth:`flush`,
    :meth:`set_attrs` or :meth:`close`; blocks submitted after the failing one are discarded,
    everything committed before stays readable, and the writer accepts no more blocks. Also a
    context manager.

    Parameters
    ----------
    writer : RunWriter or str or os.PathLike
        The writer to drive, or a path for a new ``RunWriter(path, **kwargs)``.
    max_pending : int, default 64
        At most this many items wait in the queue; ``submit`` blocks beyond (back-pressure).
    **kwargs
        Passed to :class:`RunWriter` when ``writer`` is a path.

    Notes
    -----
    Do not modify a block after submitting it: it is written later, by the worker.

    Examples
    --------
    >>> with BackgroundWriter(tmp_path / "run.zarr", chunk_steps=64) as bw:  # doctest: +SKIP
    ...     for start in range(0, 640, 64):
    ...         bw.submit(make_block(start, 64))  # returns at once
    ...     bw.flush()  # all 640 steps are committed here
    ...     bw.set_attrs(diverged_step=600)
    """

    def __init__(
        self, writer: RunWriter | str | os.PathLike, *, max_pending: int = 64, **kwargs: Any
    ) -> None:
        if not isinstance(writer, RunWriter):
            writer = RunWriter(writer, **kwargs)
        elif kwargs:
            raise TypeError("RunWriter keyword arguments are only accepted with a path")
        self.writer = writer
        self.path = writer.path
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._error: BaseException | None = None
        self._error_reported = False
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"icstools-writer-{writer.path.name}", daemon=True
        )
        self._thread.start()

    @property
    def n_committed(self) -> int:
        """Number of steps committed so far by the worker."""
        return self.writer.n_committed

    def submit(self, block: xr.Dataset) -> None:
        """Queue ``block`` for appending and return at once (blocks only if the queue is full)."""
        self._raise_if_failed()
        if self._closed:
            raise ValueError(f"BackgroundWriter for {self.path} is closed")
        if not isinstance(block, xr.Dataset):
            raise TypeError(f"block must be an xarray.Dataset, got {type(block).__name__}")
        self._put(("block", block))

    def set_attrs(self, **attrs: Any) -> None:
        """Set run attrs, in order with the submitted blocks.

        The worker persists them with the next block's commit, or on their own if no block is
        pending then. See :meth:`RunWriter.set_attrs`.
        """
        self._raise_if_failed()
        if self._closed:
            raise ValueError(f"BackgroundWriter for {self.path} is closed")
        bad = _RESERVED_ATTRS.intersection(attrs)
        if bad:
            raise ValueError(f"attrs {sorted(bad)} are reserved by the store")
        self._put(("attrs", {k: _json_attr(k, v) for k, v in attrs.items()}))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every submitted block is committed.

        Raises
        ------
        TimeoutError
            Not done within ``timeout`` seconds.
        StoreError
            The worker failed (see the class docstring).
        """
        with self._cond:
            target = self._submitted
            ok = self._cond.wait_for(
                lambda: self._done >= target or self._error is not None, timeout=timeout
            )
        self._raise_if_failed()
        if not ok:
            raise TimeoutError(
                f"{self.path}: {target - self._done} submitted items not committed within "
                f"{timeout} s"
            )

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the worker and close the RunWriter.

        Re-raises (as StoreError) a worker failure that was not reported yet; pending attrs are
        still persisted then. Calling it again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self.path}: the writer thread did not finish in {timeout} s")
        try:
            self.writer.close()
        finally:
            if not self._error_reported:
                self._raise_if_failed()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not mask the exception in flight
            self.close()
        except Exception:
            logger.exception("closing %r after an error also failed", self)

    def __repr__(self) -> str:
        return f"BackgroundWriter({str(self.path)!r}, n_committed={self.n_committed})"

    # ---- internals --------------------------------------------------------------------------

    def _put(self, item: Any) -> None:
        with self._cond:
            self._submitted += 1
        self._queue.put(item)

    def _raise_if_failed(self) -> None:
        if self._error is None:
            return
        if self._error_reported:
            raise StoreError(f"writing run {self.path} failed earlier: {self._error!r}")
        self._error_reported = True
        raise StoreError(
            f"writing run {self.path} failed: {self._error!r}; {self.n_committed} steps committed"
        ) from self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            kind, payload = item
            if self._error is None:
                try:
                    if kind == "block":
                        self.writer.append(payload)
                    elif self._queue.empty():
                        self.writer.set_attrs(**payload)
                    else:  # more is pending: persist them with the next commit
                        self.writer._stage_attrs(payload)
                except BaseException as exc:
                    with self._cond:
                        self._error = exc
            with self._cond:
                self._done += 1
                self._cond.notify_all()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def open_run(path: str | os.PathLike, *, chunks: Any = None) -> xr.Dataset:
    """Open the run stored at ``path``, as of its last completed commit.

    Safe to call while another process (or thread) appends to the run, and after a writer was
    killed: the result holds exactly the records of the last completed commit.

    Parameters
    ----------
    path : str or os.PathLike
        Store directory written by :class:`RunWriter`.
    chunks : None, {}, "auto" or dict, optional
        ``None`` (default): every variable is loaded into memory (numpy), a snapshot that stays
        valid whatever happens to the store later. Anything else is passed to
        :func:`xarray.open_dataset` and gives lazy dask arrays: ``{}`` uses the store's chunks,
        ``"auto"`` lets dask choose. Lazy arrays keep reading the store; committed records never
        change, so that is safe while a writer appends (not if the store is deleted/overwritten).

    Returns
    -------
    xarray.Dataset
        With attrs ``icstools_store_format`` and ``n_committed`` (== ``sizes["step"]``) besides
        the run's own. The encoding of the variables is dropped, so the dataset can be written
        elsewhere with any chunking.

    Notes
    -----
    netCDF export goes through xarray: ``open_run(p).to_netcdf(out, engine="scipy")`` (netCDF3,
    scipy is a dependency) writes the store's types: strings become char arrays, bools int8,
    and int64/uint variables are cast to int32/int16 if their values fit (xarray raises
    otherwise). netCDF attrs cannot be ``None`` or dicts, so a run with such attrs must drop or
    convert them first. With netCDF4 or h5netcdf installed, ``engine="h5netcdf"`` (NETCDF4)
    keeps int64.

    Raises
    ------
    FileNotFoundError
        Nothing exists at ``path``.
    StoreError
        ``path`` is not an icstools store, has no commit, or is corrupt.

    Examples
    --------
    >>> ds = open_run("runs/mnist.zarr")  # doctest: +SKIP
    >>> ds.mean.sel(source="train").isel(step=-1)  # doctest: +SKIP
    >>> lazy = open_run("runs/mnist.zarr", chunks={})  # dask-backed  # doctest: +SKIP
    >>> open_run("runs/mnist.zarr").to_netcdf("mnist.nc", engine="scipy")  # doctest: +SKIP
    """
    p = Path(path).expanduser().absolute()
    if not os.path.lexists(p):
        raise FileNotFoundError(f"no icstools run at {p}: no such file or directory")
    if not p.is_dir():
        raise StoreError(f"{p} is not an icstools run store: not a directory")
    try:
        raw = (p / _MARKER).read_bytes()
    except FileNotFoundError:
        raise StoreError(
            f"{p} is not an icstools run store: it has no commit marker {_MARKER!r}"
        ) from None
    except OSError as exc:
        raise StoreError(f"cannot read the commit marker of {p}: {exc}") from exc
    try:
        snapshot = _snapshot_from_zmetadata(raw)
        attrs = json.loads(snapshot[".zattrs"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(f"{p}: corrupt commit marker {_MARKER!r}: {exc!r}") from exc
    fmt = attrs.get("icstools_store_format") if isinstance(attrs, dict) else None
    if fmt is None:
        raise StoreError(f"{p} is a Zarr store but not an icstools run store (no format attr)")
    if fmt != STORE_FORMAT:
        raise StoreError(f"{p} has icstools store format {fmt!r}; this version reads only 1")
    schema = attrs.get("schema_version", SCHEMA_VERSION)
    if isinstance(schema, int) and schema > SCHEMA_VERSION:
        raise StoreError(
            f"{p} holds a run of schema version {schema}, newer than this icstools reads "
            f"({SCHEMA_VERSION}): upgrade icstools"
        )
    store = _SnapshotStore(p, snapshot=snapshot)
    try:
        ds = xr.open_dataset(
            store,
            engine="zarr",
            consolidated=True,
            zarr_format=2,
            chunks=chunks,
            decode_times=False,
            decode_timedelta=False,
        )
        if chunks is None:
            ds = ds.load()
            ds.close()
    except Exception as exc:  # zarr/numcodecs/xarray errors on damaged chunks or metadata
        raise StoreError(f"cannot read the run store {p}: {exc!r}") from exc
    n = attrs.get("n_committed")
    if STEP not in ds.dims or ds.sizes[STEP] != n:
        raise StoreError(
            f"{p} is corrupt: {n!r} committed steps recorded but {ds.sizes.get(STEP)} stored"
        )
    return ds.drop_encoding()

"""Files of a run store: atomic writes, the zarr stores the writer and the readers use.

Every write of a key is atomic (a temporary file renamed over it); readers serve all metadata
from one snapshot of the commit marker and verify each chunk they read (see
:mod:`icstools.store.checksums`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from icstools.store.checksums import ChunkChecker
from icstools.store.errors import StoreError

logger = logging.getLogger("icstools.store")

#: Version of the on-disk layout written, stored as the root attribute ``icstools_store_format``:
#: 2 adds checksums (every chunk, the commit marker); 1 (before) is still read.
STORE_FORMAT = 2
READABLE_FORMATS = (1, 2)
_MARKER = ".zmetadata"  # zarr v2 consolidated metadata, our commit marker
_OWNER_FILE = ".icstools-owner"  # ownership record in a hidden directory (module docstring)
_RESERVED_ATTRS = frozenset({"icstools_store_format", "n_committed"})
_STEP_KINDS = "biuf"  # bool, signed/unsigned int, float
_STATIC_KINDS = "biufUS"


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
    ``.zmetadata`` makes attrs and shapes come from the same commit. Chunks come from disk, each
    checked by ``checker`` (missing, checksum) before zarr decodes it.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        read_only: bool = True,
        snapshot: dict[str, bytes],
        checker: ChunkChecker | None = None,
    ):
        super().__init__(root, read_only=True)
        self._snapshot = snapshot
        self._checker = checker

    def with_read_only(self, read_only: bool = False) -> _SnapshotStore:
        return type(self)(self.root, snapshot=self._snapshot, checker=self._checker)

    def _from_snapshot(self, key: str, prototype: BufferPrototype | None, byte_range: Any):
        data = self._snapshot.get(key)
        if data is None:
            return None
        if byte_range is not None:  # never done for metadata; supported for completeness
            return None
        return (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    def _checked(self, key: str, data: Buffer | None, byte_range: Any) -> Buffer | None:
        # zarr reads whole chunks of format-2 arrays: a byte range is never asked for here
        if self._checker is not None and byte_range is None and self._checker.is_chunk(key):
            self._checker.check(key, None if data is None else data.as_numpy_array())
        return data

    async def get(self, key: str, prototype=None, byte_range=None) -> Buffer | None:
        if _is_metadata_key(key):
            return self._from_snapshot(key, prototype, byte_range)
        data = await super().get(key, prototype=prototype, byte_range=byte_range)
        return self._checked(key, data, byte_range)

    def get_sync(self, key: str, *, prototype=None, byte_range=None) -> Buffer | None:
        if _is_metadata_key(key):
            return self._from_snapshot(key, prototype, byte_range)
        data = super().get_sync(key, prototype=prototype, byte_range=byte_range)
        return self._checked(key, data, byte_range)

    async def exists(self, key: str) -> bool:
        if _is_metadata_key(key):
            return key in self._snapshot
        return await super().exists(key)


def _snapshot_from_zmetadata(zmeta: dict[str, Any], raw: bytes) -> dict[str, bytes]:
    """All metadata keys of a store from its parsed ``.zmetadata`` (and its bytes)."""
    meta = zmeta["metadata"]
    snap = {key: json.dumps(value).encode() for key, value in meta.items()}
    snap[_MARKER] = raw
    return snap

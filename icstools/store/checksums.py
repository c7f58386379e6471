"""Checksums of store format 2: every chunk and the commit marker carry a CRC32C.

* **Chunks**: the codec pipeline of every array is ``filters=[Blosc]``, ``compressor=CRC32C``
  (numcodecs), so the checksum is the outermost layer: the last 4 bytes of each chunk file are
  the CRC32C (little endian) of the compressed bytes before them. Plain Zarr readers
  (``xr.open_zarr``) verify it too (numcodecs' ``crc32c`` codec); :func:`icstools.open_run`
  checks it before zarr decodes anything, so a damaged chunk is a :class:`StoreError` naming the
  variable and the chunk, and damaged bytes never reach the decompressor.
* **Missing chunks**: a writer writes every chunk of the committed region
  (``write_empty_chunks``), so a chunk file missing there is damage, not fill values.
* **Commit marker** (``.zmetadata``): JSON whose last member is
  ``"icstools_checksum": "crc32c:<8 hex digits>"``, the CRC32C of the exact bytes of the marker
  without that member (i.e. ``raw[:start of ', "icstools_checksum"'] + b"}"``). Any change of
  any byte is detected; the member is ignored by zarr.

Format 1 stores (written before checksums) carry neither; they are read as before (a missing
chunk is still an error).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import CRC32C, Blosc

from icstools.store.errors import StoreError

__all__ = ["ChunkChecker", "chunk_encoding", "crc32c", "seal_marker", "unseal_marker"]

MARKER_CHECKSUM_KEY = "icstools_checksum"
_TRAILER = re.compile(rb', "icstools_checksum": "crc32c:([0-9a-f]{8})"\}\s*\Z')
_CRC_ID = CRC32C.codec_id


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """CRC32C (Castagnoli) of ``data``, as numcodecs' ``crc32c`` codec computes it."""
    return int(google_crc32c.value(bytes(memoryview(data).cast("B"))))


def chunk_encoding() -> dict[str, Any]:
    """Zarr (format 2) encoding of a checksummed array: Blosc (lz4, byte shuffle, as zarr's
    default compressor), then CRC32C over the compressed bytes."""
    return {
        "filters": [Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)],
        "compressors": [CRC32C()],
    }


def seal_marker(zmeta: Mapping[str, Any]) -> bytes:
    """The bytes of a commit marker holding ``zmeta`` and, last, its checksum member."""
    body = {k: v for k, v in zmeta.items() if k != MARKER_CHECKSUM_KEY}
    raw = json.dumps(body).encode()
    assert raw.endswith(b"}")
    trailer = f', "{MARKER_CHECKSUM_KEY}": "crc32c:{crc32c(raw):08x}"}}'.encode()
    return raw[:-1] + trailer


def unseal_marker(raw: bytes, where: str) -> tuple[dict[str, Any], bool]:
    """Parse a commit marker; verify its checksum if it has one.

    Returns the parsed JSON and whether it carried a (valid) checksum; a marker without one is
    only valid in a format 1 store (the caller checks). Raises :class:`StoreError` naming
    ``where`` if the checksum does not match or the marker is not valid JSON.
    """
    m = _TRAILER.search(raw)
    if m is not None:
        body = raw[: m.start()] + b"}"
        stored, computed = int(m.group(1), 16), crc32c(body)
        if stored != computed:
            raise StoreError(
                f"{where}: the commit marker .zmetadata is corrupt: its checksum does not match"
                f" (stored crc32c {stored:08x}, computed {computed:08x}); the store cannot be"
                " trusted: restore it from a copy or record the run again"
            )
    try:
        parsed = json.loads(raw)
    except ValueError as exc:
        raise StoreError(f"{where}: the commit marker .zmetadata is corrupt: {exc}") from None
    if not isinstance(parsed, dict):
        raise StoreError(f"{where}: the commit marker .zmetadata is corrupt: not a JSON object")
    if m is None and MARKER_CHECKSUM_KEY in parsed:
        raise StoreError(
            f"{where}: the commit marker .zmetadata is corrupt: its checksum member is not the"
            " last one or is malformed"
        )
    return parsed, m is not None


class ChunkChecker:
    """Checks the chunk files a reader gets, from the metadata of one commit.

    Parameters
    ----------
    metadata : mapping
        The ``metadata`` member of the commit marker (``"<name>/.zarray"`` etc.).
    where : str
        The store, for messages.
    """

    def __init__(self, metadata: Mapping[str, Any], where: str) -> None:
        self.where = where
        self.arrays: dict[str, dict[str, Any]] = {}
        for key, zarray in metadata.items():
            if not key.endswith("/.zarray") or not isinstance(zarray, dict):
                continue
            name = key[: -len("/.zarray")]
            attrs = metadata.get(f"{name}/.zattrs") or {}
            compressor = zarray.get("compressor") or {}
            self.arrays[name] = {
                "shape": tuple(zarray.get("shape") or ()),
                "chunks": tuple(zarray.get("chunks") or ()),
                "dims": tuple(attrs.get("_ARRAY_DIMENSIONS") or ()),
                "sep": zarray.get("dimension_separator") or ".",
                "crc": isinstance(compressor, dict) and compressor.get("id") == _CRC_ID,
            }

    def chunk_keys(self, name: str) -> list[str]:
        """Every chunk key of array ``name`` within its committed shape."""
        info = self.arrays[name]
        shape, chunks = info["shape"], info["chunks"]
        if any(n == 0 for n in shape):
            return []
        grid = [range(-(-n // c)) for n, c in zip(shape, chunks, strict=True)] or [range(1)]
        return [f"{name}/{info['sep'].join(map(str, idx))}" for idx in np.ndindex(*map(len, grid))]

    def describe(self, key: str) -> str:
        """``variable 'mean', chunk 0.2.0 (records 128–191)`` for a chunk key."""
        name, _, index = key.rpartition("/")
        info = self.arrays.get(name)
        text = f"variable {name!r}, chunk {index} (file {key})"
        if info is None or "step" not in info["dims"]:
            return text
        axis = info["dims"].index("step")
        try:
            c = int(index.split(info["sep"])[axis])
        except (ValueError, IndexError):
            return text
        size = info["chunks"][axis]
        lo, hi = c * size, min(info["shape"][axis], (c + 1) * size) - 1
        return f"variable {name!r}, chunk {index} (records {lo}–{hi}; file {key})"

    def is_chunk(self, key: str) -> bool:
        return key.rpartition("/")[0] in self.arrays

    def check(self, key: str, data: bytes | memoryview | None) -> None:
        """Raise :class:`StoreError` if the chunk ``key`` is missing or fails its checksum."""
        problem = self.problem(key, data)
        if problem is not None:
            raise StoreError(
                f"{self.where} is corrupt: {self.describe(key)} {problem}; restore the store from"
                f" a copy or record the run again ('icstools verify {self.where}' checks all of"
                " it)"
            )

    def problem(self, key: str, data: bytes | memoryview | None) -> str | None:
        """What is wrong with the chunk ``key`` holding ``data`` (None: missing), or None."""
        if data is None:
            return "is missing (a committed chunk must exist)"
        info = self.arrays.get(key.rpartition("/")[0])
        if info is None or not info["crc"]:
            return None
        view = memoryview(data).cast("B")
        if len(view) < 4:
            return f"is truncated ({len(view)} bytes, shorter than its checksum)"
        stored = int.from_bytes(view[-4:], "little")
        computed = crc32c(view[:-4])
        if stored != computed:
            return (
                f"fails its checksum (stored crc32c {stored:08x}, computed {computed:08x}:"
                f" truncated, overwritten or bit-flipped, {len(view)} bytes)"
            )
        return None

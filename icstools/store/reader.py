"""Reading runs: :func:`open_run` (as of the last commit, checked) and :func:`verify_run`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xarray as xr

from icstools.schema import SCHEMA_VERSION, STEP
from icstools.store.checksums import MARKER_CHECKSUM_KEY, ChunkChecker, unseal_marker
from icstools.store.errors import StoreError
from icstools.store.files import (
    _MARKER,
    READABLE_FORMATS,
    _snapshot_from_zmetadata,
    _SnapshotStore,
)

__all__ = ["Verification", "open_run", "verify_run"]

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
        ``path`` is not an icstools store, has no commit, or is corrupt: the commit marker fails
        its checksum, or a chunk read is missing or fails its checksum (the message names the
        variable and the chunk). With ``chunks`` (lazy), chunks are checked when they are
        computed, so the error comes from ``.load()``/``.compute()``.

    Examples
    --------
    >>> ds = open_run("runs/mnist.zarr")  # doctest: +SKIP
    >>> ds.mean.sel(source="train").isel(step=-1)  # doctest: +SKIP
    >>> lazy = open_run("runs/mnist.zarr", chunks={})  # dask-backed  # doctest: +SKIP
    >>> open_run("runs/mnist.zarr").to_netcdf("mnist.nc", engine="scipy")  # doctest: +SKIP
    """
    p = Path(path).expanduser().absolute()
    store, attrs = _open_commit(p)
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
    except StoreError:
        raise  # a missing or damaged chunk, named by the checker
    except Exception as exc:  # zarr/numcodecs/xarray errors on damaged chunks or metadata
        raise StoreError(f"cannot read the run store {p}: {exc!r}") from exc
    n = attrs.get("n_committed")
    if STEP not in ds.dims or ds.sizes[STEP] != n:
        raise StoreError(
            f"{p} is corrupt: {n!r} committed steps recorded but {ds.sizes.get(STEP)} stored"
        )
    return ds.drop_encoding()


def _open_commit(p: Path) -> tuple[_SnapshotStore, dict[str, Any]]:
    """The snapshot store of the last commit of the store at ``p`` and its root attrs."""
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
    zmeta, sealed = unseal_marker(raw, str(p))
    try:
        attrs = zmeta["metadata"][".zattrs"]
        snapshot = _snapshot_from_zmetadata(zmeta, raw)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(f"{p}: corrupt commit marker {_MARKER!r}: {exc!r}") from exc
    fmt = attrs.get("icstools_store_format") if isinstance(attrs, dict) else None
    if fmt is None:
        raise StoreError(f"{p} is a Zarr store but not an icstools run store (no format attr)")
    if fmt not in READABLE_FORMATS:
        raise StoreError(
            f"{p} has icstools store format {fmt!r}; this version reads formats"
            f" {', '.join(map(str, READABLE_FORMATS))}: upgrade icstools"
        )
    if fmt >= 2 and not sealed:
        raise StoreError(
            f"{p}: the commit marker {_MARKER} is corrupt: a format {fmt} store's marker ends"
            f" with its checksum member {MARKER_CHECKSUM_KEY!r}, this one does not"
        )
    schema = attrs.get("schema_version", SCHEMA_VERSION)
    if isinstance(schema, int) and schema > SCHEMA_VERSION:
        raise StoreError(
            f"{p} holds a run of schema version {schema}, newer than this icstools reads "
            f"({SCHEMA_VERSION}): upgrade icstools"
        )
    checker = ChunkChecker(zmeta["metadata"], str(p))
    return _SnapshotStore(p, snapshot=snapshot, checker=checker), attrs


@dataclass
class Verification:
    """What :func:`verify_run` found in one store.

    Attributes
    ----------
    path : Path
    format : int
        ``icstools_store_format`` (1: no checksums, 2: checksums).
    records : int
        Committed records.
    chunks : int
        Chunk files checked.
    problems : list of str
        One line per damage found (empty: the store is sound).
    """

    path: Path
    format: int
    records: int
    chunks: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: ``ok: PATH (...)`` or ``DAMAGED: PATH (n problems)``."""
        what = f"format {self.format}, {self.records} records, {self.chunks} chunks" + (
            " with checksums"
            if self.format >= 2
            else ", no checksums (format 1): each chunk present and decodable"
        )
        if self.ok:
            return f"ok: {self.path} ({what})"
        return f"DAMAGED: {self.path} ({what}; {len(self.problems)} problems)"


def verify_run(path: str | os.PathLike) -> Verification:
    """Check a whole run store: its commit marker, and every chunk of the last commit.

    Every chunk file of every variable is read: present, and its CRC32C matches (format 2);
    then every variable is decoded. Unlike :func:`open_run` it does not stop at the first
    damage: all of it is listed in ``problems``.

    Raises
    ------
    FileNotFoundError
        Nothing exists at ``path``.
    StoreError
        ``path`` is not an icstools store, or its commit marker is damaged (nothing else can be
        checked then).

    Examples
    --------
    >>> v = verify_run("runs/mnist.zarr")  # doctest: +SKIP
    >>> v.ok, v.problems  # doctest: +SKIP
    (True, [])
    """
    p = Path(path).expanduser().absolute()
    store, attrs = _open_commit(p)
    checker = store._checker
    assert checker is not None
    problems: list[str] = []
    n_chunks = 0
    for name in sorted(checker.arrays):
        for key in checker.chunk_keys(name):
            n_chunks += 1
            try:
                data: bytes | None = (p / key).read_bytes()
            except FileNotFoundError:
                data = None
            except OSError as exc:
                problems.append(f"{checker.describe(key)} cannot be read: {exc}")
                continue
            problem = checker.problem(key, data)
            if problem is not None:
                problems.append(f"{checker.describe(key)} {problem}")
    if not problems:  # decode everything (format 1: the only check of the bytes)
        try:
            ds = open_run(p, chunks={})
            for name in ds.variables:
                ds.variables[name].load()
            ds.close()
        except Exception as exc:
            problems.append(f"cannot be decoded: {exc}")
    return Verification(
        p, int(attrs["icstools_store_format"]), int(attrs.get("n_committed", 0)), n_chunks, problems
    )

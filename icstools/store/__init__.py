"""Crash-safe on-disk storage of runs: the only module of icstools that reads or writes runs.

A *run* is an :class:`xarray.Dataset` with a ``step`` dimension (an int64 coordinate holding the
optimizer step of each record) plus *static* variables and coordinates without ``step`` (e.g.
``unit_site (unit)`` strings, ``quantile`` floats, ``hist_edges (site, edge)``) and attrs.

:class:`RunWriter` appends blocks of records to a Zarr store, :class:`BackgroundWriter` does the
same from a worker thread (which may drive a RunWriter in a child process,
:meth:`BackgroundWriter.start_process`, so that zarr's Python does not take the caller's GIL),
:func:`open_run` reads a run back, up to its last commit, and :func:`verify_run` checks every
byte of a store. The package's modules: ``writer`` (RunWriter), ``background``
(BackgroundWriter), ``process`` (the writer process and the blocks it takes), ``reader``
(open_run, verify_run), ``resume`` (a writer that continues an existing store:
``RunWriter(path, resume=True)``), ``files`` (atomic writes, zarr stores), ``checksums``
(format 2's CRC32C of chunks and commit marker), ``owners`` (ownership records, leftovers, the
one-writer lock), ``errors``.

Store layout and commit protocol
--------------------------------
The store is a plain Zarr *format 2* group that xarray can open by itself
(``xr.open_zarr(path, consolidated=True)``): one array per variable with ``_ARRAY_DIMENSIONS``,
chunked ``chunk_steps`` along ``step``, Blosc-compressed (a filter) then checksummed (the
``crc32c`` compressor: last 4 bytes of every chunk, see :mod:`icstools.store.checksums`), no
object/pickle codecs (strings are
fixed-width unicode, dtype ``<U``). Zarr format 2 is used because format 3 has neither a
specified fixed-width string type nor specified consolidated metadata (zarr-python warns about
both).

* Every key is written atomically: to a temporary file in the same directory, then
  ``os.replace`` d over the key (optionally fsync'ed, see ``fsync=``). A reader therefore sees
  each chunk either wholly before or wholly after any rewrite.
* An append grows the step arrays, writes the new region (rewriting the partly filled last chunk
  of each array; its already committed records keep their values), then the root ``.zattrs``,
  and *last* the consolidated metadata ``.zmetadata``. That file is the **commit marker**: it
  holds the shape of every array and the root attrs (``icstools_store_format`` = 2,
  ``n_committed`` = committed steps) as of the last completed commit, and ends with its own
  checksum. Static variables are written once, by the first append. Each array's own
  ``.zarray`` is written by the first commit and rewritten by ``close()`` only (one file per
  array per append cost ~1 ms each of the writer's CPU): a reader that skips the marker
  (``zarr.open_array`` on one array) sees a committed prefix until the writer closes. Format 1
  stores (no checksums) are still read.
* The first commit is a directory rename: the store is built in a hidden sibling directory and
  renamed to ``path`` once the first block is complete, so ``path`` exists only with a commit.
* :func:`open_run` reads ``.zmetadata`` once and serves *all* metadata (group attrs, array shapes)
  from that snapshot, so it sees exactly the arrays of the last commit, whatever a writer is doing
  at the time, and after a writer was killed at any moment (SIGKILL) as well. (Plain
  ``xr.open_zarr`` also uses ``.zmetadata`` for shapes but reads the root attrs from ``.zattrs``,
  which may be one append ahead while an append is under way or after a crash.)

* Readers check every chunk they read: a chunk of the committed region that is missing, or
  fails its checksum, is a :class:`StoreError` naming the variable and the chunk; a damaged
  commit marker is one too. Damage never reads back as fill values or garbage.
* One writer per store: a :class:`RunWriter` takes the lock ``.<name>.icstools-lock`` (next to
  the store) when it is constructed and releases it when closed (:mod:`icstools.store.owners`);
  a second writer of a store whose writer lives gets a :class:`StoreError`, with or without
  ``overwrite=True``; the lock of a killed writer is taken over with a
  :class:`StoreLockWarning`.

Leftovers of a killed writer (hidden ``.*.tmp`` files, chunks past the committed length, a hidden
``.<name>.icstools-new-*`` directory if it died before its first commit, its lock) are ignored by
readers.

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

from icstools.store.background import BackgroundWriter
from icstools.store.checksums import crc32c
from icstools.store.errors import StoreError, StoreLockWarning
from icstools.store.files import (
    _MARKER,
    _OWNER_FILE,
    READABLE_FORMATS,
    STORE_FORMAT,
    _atomic_write_bytes,
    _AtomicLocalStore,
)
from icstools.store.owners import StoreLock, live_writer, lock_file
from icstools.store.reader import Verification, open_run, verify_run
from icstools.store.writer import RunWriter

__all__ = [
    "READABLE_FORMATS",
    "STORE_FORMAT",
    "BackgroundWriter",
    "RunWriter",
    "StoreError",
    "StoreLock",
    "StoreLockWarning",
    "Verification",
    "crc32c",
    "live_writer",
    "lock_file",
    "open_run",
    "verify_run",
]

# private names kept importable for the tests
_ = (_MARKER, _OWNER_FILE, _atomic_write_bytes, _AtomicLocalStore)

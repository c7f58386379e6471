"""Writing runs from a separate process: :class:`StackedBlock` and :class:`WriterProcess`.

Why a process: zarr, xarray and the codecs spend ~0.5 ms of Python per record (the paper MLP,
blocks of 64 records) and hold the GIL for most of it; from a thread that time is taken from
the training loop, whose own step is largely Python too. A writer process has its own GIL.

* The training thread copies each closed record into rows of per-variable arrays (a
  :class:`StackedBlock`, a few µs per record); no xarray object is built there after the first
  record.
* :class:`~icstools.store.BackgroundWriter`'s thread hands each block to :class:`WriterProcess`,
  which sends its raw bytes through a pipe to a child interpreter and waits for the child's
  answer (in system calls, without the GIL); the child builds the dataset and appends it with
  an ordinary :class:`~icstools.store.RunWriter`. Everything the store guarantees is the
  RunWriter's: commit marker, checksums, crash safety.
* One writer per store: the parent's :class:`~icstools.store.RunWriter` takes the lock (and
  makes every check of the path) when the recorder is built; the child writes under that lock
  (:meth:`RunWriter._adopt_lock`), and the parent releases it when the child is done. The lock
  names the child (:meth:`~icstools.store.StoreLock.add_helper`): if the parent is killed, the
  child finishes the block it is writing and exits, and a new writer of the store (a resumed
  run) waits for it instead of taking the lock over in the middle of that commit.
* The child is a fresh interpreter (``sys.executable``), not a ``multiprocessing`` child: it
  never imports the user's ``__main__`` nor torch (it loads ``icstools.store`` alone, ~1 s), it
  ignores SIGINT (a Ctrl-C reaches the parent, which closes the run in order) and it exits when
  the parent's end of the pipe closes (the parent died). A child that dies is a
  :class:`~icstools.store.StoreError` at the parent; what it committed stays readable.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import xarray as xr

from icstools.schema import STEP
from icstools.store.errors import StoreError
from icstools.store.owners import StoreLock
from icstools.store.writer import RunWriter

__all__ = ["StackedBlock", "WriterProcess"]

_HEADER = struct.Struct("<Q")  # a length in the framing (below)

# The child's first lines: the package ``icstools`` without its __init__ (which imports torch),
# so that ``icstools.store`` loads alone; then the parent's sys.path.
_BOOT = """\
import json, sys, types
root, path = sys.argv[1], json.loads(sys.argv[2])
sys.path[:] = path
pkg = types.ModuleType("icstools")
pkg.__path__ = [root]
sys.modules["icstools"] = pkg
from icstools.store.process import _child_main
_child_main(sys.argv[3:])
"""


@dataclass
class StackedBlock:
    """Records stacked along a first axis, and a one-record dataset for the rest.

    ``arrays[name]`` is ``[n, *record shape]`` for every step variable (``step`` included);
    ``template`` is a one-record block of the run: it gives each variable's dims (where ``step``
    goes), the static coordinates and the attrs. :meth:`dataset` is the block as
    :meth:`~icstools.recording.layout.Layout.block` makes it.

    Examples
    --------
    >>> t = xr.Dataset({"loss": ("step", [0.5])}, coords={"step": [0]})
    >>> b = StackedBlock(t, {"step": np.array([3, 4]), "loss": np.array([0.2, 0.1])})
    >>> b.dataset().loss.values.tolist()
    [0.2, 0.1]
    """

    template: xr.Dataset
    arrays: dict[str, np.ndarray]

    @property
    def n(self) -> int:
        return len(self.arrays[STEP])

    def dataset(self) -> xr.Dataset:
        """The block as an ``xarray.Dataset`` (views of the arrays, no copy)."""
        data = {}
        for name, var in self.template.data_vars.items():
            axis = var.dims.index(STEP)
            data[name] = (var.dims, np.moveaxis(self.arrays[str(name)], 0, axis))
        coords: dict[Any, Any] = {STEP: (STEP, self.arrays[STEP])}
        coords.update({n: c.variable for n, c in self.template.coords.items() if n != STEP})
        return xr.Dataset(data, coords=coords, attrs=self.template.attrs)


# --------------------------------------------------------------------------------------------
# framing: the 8-byte lengths of the pickled message, of its out-of-band buffers and of each,
# the message, its buffers, then (blocks) the raw bytes of each array
# --------------------------------------------------------------------------------------------


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]  # releases the GIL while the kernel copies


def _send(fd: int, message: Any, arrays: list[np.ndarray] = ()) -> None:  # type: ignore[assignment]
    # the message's own arrays (a template's coordinates: 45 MiB for a 10⁶-unit site) go out
    # of band (pickle protocol 5), written from their memory: in the pickle, and again in a
    # header + pickle concatenation, they had been copied twice
    buffers: list[pickle.PickleBuffer] = []
    raw = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]
    sizes = [len(raw), len(views), *(v.nbytes for v in views)]
    _write_all(fd, b"".join(_HEADER.pack(n) for n in sizes))
    for data in (raw, *views):
        _write_all(fd, data)
    for a in arrays:
        _write_all(fd, memoryview(np.ascontiguousarray(a)))


def _read_exact(f: BinaryIO, buf: memoryview) -> None:
    buf = buf.cast("B")
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])  # type: ignore[attr-defined]
        if not n:
            raise EOFError("the pipe closed")
        got += n


def _receive(f: BinaryIO) -> Any:
    n_raw, n_buffers = (_read_size(f) for _ in range(2))
    sizes = [_read_size(f) for _ in range(n_buffers)]
    raw, *buffers = (bytearray(n) for n in (n_raw, *sizes))
    for data in (raw, *buffers):
        _read_exact(f, memoryview(data))
    return pickle.loads(raw, buffers=buffers)


def _read_size(f: BinaryIO) -> int:
    head = bytearray(_HEADER.size)
    _read_exact(f, memoryview(head))
    return int(_HEADER.unpack(head)[0])


# --------------------------------------------------------------------------------------------
# the parent's side
# --------------------------------------------------------------------------------------------


class WriterProcess:
    """A :class:`RunWriter` in a child process, driven like one (by one thread at a time).

    ``local`` is the parent's RunWriter of the path: it made the checks and holds the lock, and
    is closed (the lock released) by :meth:`close`. :meth:`append` takes a
    :class:`StackedBlock`; every call waits for the child's answer and raises what the child
    raised (a dead child: :class:`StoreError`).

    Examples
    --------
    >>> wp = WriterProcess(RunWriter(tmp_path / "run.zarr"))  # doctest: +SKIP
    >>> wp.append(block)  # doctest: +SKIP
    >>> wp.close()  # doctest: +SKIP
    """

    def __init__(self, local: RunWriter) -> None:
        self.local = local
        self.path = local.path
        self.chunk_steps = local.chunk_steps
        self._n = local.n_committed
        self._template_sent = False
        self._closed = False
        self._dead: str | None = None
        lock = local._lock
        spec = {
            "path": str(local.path),
            "chunk_steps": local.chunk_steps,
            "overwrite": local.overwrite,
            "max_chunk_bytes": local.max_chunk_bytes,
            "fsync": local.fsync,
            "lock": [str(lock.file), lock.token, lock._data.decode()],
            "attrs": local._pending_attrs,  # staged, not yet committed
            # a store with commits (written by ``local``, or resumed): the child adopts them
            "resume": local.n_committed > 0,
        }
        to_child, self._out = os.pipe()  # parent -> child
        self._in, from_child = os.pipe()  # child -> parent
        self._stderr = tempfile.TemporaryFile()
        root = str(Path(__file__).resolve().parents[1])
        argv = [sys.executable, "-c", _BOOT, root, json.dumps(sys.path), str(to_child)]
        argv += [str(from_child), json.dumps(spec)]
        try:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
                pass_fds=(to_child, from_child),
                close_fds=True,
            )
        except BaseException:
            for fd in (self._out, self._in):
                os.close(fd)
            self._stderr.close()
            raise
        finally:
            os.close(to_child)
            os.close(from_child)
        self.pid = self.process.pid
        self._reader = os.fdopen(self._in, "rb", buffering=0)
        try:
            # if this process is killed, the child finishes the block it is writing: the lock
            # names it, so that the next writer of the store waits for it
            lock.add_helper(self.pid)
        except BaseException:
            _stop_child(self.process, self._out, self._reader, self._stderr)
            raise
        local._hand_over()  # the child writes from now on: ``local`` keeps only the lock
        # not closed (garbage collected, interpreter exit): the child is stopped and reaped
        self._finalizer = weakref.finalize(
            self, _stop_child, self.process, self._out, self._reader, self._stderr
        )

    @property
    def n_committed(self) -> int:
        """Steps committed by the child, as of its last answer."""
        return self._n

    def append(self, block: StackedBlock) -> None:
        """Send ``block`` to the child, which appends and commits it; wait for its answer."""
        if not isinstance(block, StackedBlock):
            raise TypeError(f"block must be a StackedBlock, got {type(block).__name__}")
        template = None if self._template_sent else block.template
        names = list(block.arrays)
        fields = [(k, block.arrays[k].dtype.str, block.arrays[k].shape[1:]) for k in names]
        self._call(("block", (block.n, fields, template)), [block.arrays[k] for k in names])
        self._template_sent = True

    def set_attrs(self, **attrs: Any) -> None:
        """:meth:`RunWriter.set_attrs` in the child."""
        self._call(("attrs", attrs))

    def _stage_attrs(self, attrs: dict[str, Any]) -> None:
        """:meth:`RunWriter._stage_attrs` in the child (persisted with its next commit)."""
        self._call(("stage", attrs))

    def close(self) -> None:
        """Let the child persist pending attrs and exit; release the lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._dead is None:
                self._call(("close", None))
        finally:
            self._finalizer()
            self.local.close()

    def _call(self, message: tuple[str, Any], arrays: list[np.ndarray] = ()) -> None:  # type: ignore[assignment]
        if self._dead is not None:
            raise StoreError(self._dead)
        try:
            _send(self._out, message, arrays)
            answer = _receive(self._reader)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self._dead = self._death_note(exc)
            raise StoreError(self._dead) from exc
        kind, n, error = answer
        self._n = n
        if kind == "error":
            raise error

    def _death_note(self, exc: BaseException) -> str:
        """Why the child stopped answering: its exit status and the end of its output."""
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            tail = self._stderr.read()[-2000:].decode(errors="replace").strip()
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        note = (
            f"the writer process (pid {self.pid}) of {self.path} {how} ({exc!r}); "
            f"{self._n} steps were committed and stay readable, later records are not written"
        )
        if tail:
            note += f"; its output ended with: {tail}"
        return note

    def __repr__(self) -> str:
        return f"WriterProcess({str(self.path)!r}, pid={self.pid}, n_committed={self._n})"


def _stop_child(process: subprocess.Popen, out: int, reader: BinaryIO, stderr: BinaryIO) -> None:
    """Close the pipes (the child exits on their end), reap the child, kill it if it hangs."""
    with contextlib.suppress(OSError):
        os.close(out)
    with contextlib.suppress(OSError):
        reader.close()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with contextlib.suppress(OSError):
        stderr.close()


# --------------------------------------------------------------------------------------------
# the child's side
# --------------------------------------------------------------------------------------------


class _BorrowedLock(StoreLock):
    """The parent's lock of the store, checked before each commit, released by the parent."""

    def release(self) -> None:
        self.released = True


def _child_main(argv: list[str]) -> None:
    """Serve one parent: append blocks, set attrs, close; exit when the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    rfd, wfd, spec = int(argv[0]), int(argv[1]), json.loads(argv[2])
    file, token, data = spec.pop("lock")
    path = Path(spec.pop("path"))
    lock = _BorrowedLock(path, Path(file), token, data.encode())
    attrs = spec.pop("attrs")
    resume = spec.pop("resume", False)
    writer = RunWriter._adopt_lock(path, lock, **spec)
    if resume:  # continue the parent's commits (see WriterProcess)
        writer._adopt()
    writer._stage_attrs(attrs)
    template: xr.Dataset | None = None
    with os.fdopen(rfd, "rb", buffering=0) as rf:
        while True:
            try:
                op, payload = _receive(rf)
            except EOFError:  # the parent is gone: what is committed stays
                return
            error: BaseException | None = None
            try:
                if op == "block":
                    n, fields, new_template = payload
                    arrays = {}
                    for name, dtype, shape in fields:
                        arrays[name] = np.empty((n, *shape), dtype=np.dtype(dtype))
                        _read_exact(rf, memoryview(arrays[name]))
                    template = new_template if new_template is not None else template
                    assert template is not None
                    writer.append(StackedBlock(template, arrays).dataset())
                elif op == "attrs":
                    writer.set_attrs(**payload)
                elif op == "stage":
                    writer._stage_attrs(payload)
                elif op == "close":
                    writer.close()
            except EOFError:
                return
            except BaseException as exc:
                error = exc
            _answer(wfd, writer.n_committed, error)
            if op == "close":
                return


def _answer(fd: int, n: int, error: BaseException | None) -> None:
    if error is None:
        _send(fd, ("ok", n, None))
        return
    try:
        pickle.loads(pickle.dumps(error))  # it must arrive as itself, or as a StoreError
    except Exception:
        error = StoreError(f"{type(error).__name__}: {error}")
    error.__traceback__ = None
    _send(fd, ("error", n, error))

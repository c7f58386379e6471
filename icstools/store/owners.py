"""Who writes a store: ownership records, leftovers of killed writers, the one-writer lock.

Ownership record
    ``{"pid", "host", "boot_id", "pid_ns", "start_ticks", "created"}`` of a process (see
    :mod:`icstools.store`); :func:`_owner_alive` judges from it whether that process still runs
    (True), is gone (False), or cannot be judged from here (None: another host, boot or PID
    namespace, or an unreadable record). The leftover directories of killed writers and the
    lock below are judged by this one function.

Lock (one writer per store)
    A :class:`RunWriter` takes the lock of its path when it is constructed: the file
    ``.<name>.icstools-lock`` next to the store, created atomically (a complete temporary file
    hard-linked to the name, which fails if it exists) and holding an ownership record plus a
    random ``token``. If the file exists, its owner is judged: a live owner (another process, or
    another open writer in this process) is a :class:`StoreError`, with or without
    ``overwrite``; an owner that cannot be judged is a :class:`StoreError` that says how to
    remove the lock by hand; a gone owner's lock (a killed writer) is taken over with a
    :class:`StoreLockWarning`: renamed aside (only if it is still the file judged: same content),
    then created anew. The writer checks at every commit that the lock is still its own (by its
    token) and releases it (deletes the file) when it is closed, fails, or is garbage-collected.
    A writer that writes from a child process names it in the lock (``helpers``, ownership
    records): while a helper runs the lock is held, even if its owner is gone, and a new writer
    waits up to ``_HELPER_WAIT`` seconds for a killed owner's helper to finish its commit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from icstools.store.errors import StoreError, StoreLockWarning
from icstools.store.files import _OWNER_FILE

logger = logging.getLogger("icstools.store")

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


def _owner_record(pid: int | None = None) -> dict[str, Any]:
    """The ownership record of process ``pid`` of this host (default: this process); see the
    module docstring."""
    pid = os.getpid() if pid is None else int(pid)
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
# The lock: one writer per store
# --------------------------------------------------------------------------------------------

_LOCK_SUFFIX = ".icstools-lock"
# tokens of the locks held by the writers of this process: a lock of this process whose token
# is not here was left by a writer that no longer writes
_HELD: set[str] = set()
_HELD_GUARD = threading.Lock()
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)
# how long a new writer waits for the writer process of a killed owner to finish its commit
# (one block: seconds at most) before it calls the lock held
_HELPER_WAIT = 60.0


def lock_file(path: Path) -> Path:
    """The lock file of the store at ``path``: ``.<name>.icstools-lock`` next to it."""
    return path.parent / f".{path.name}{_LOCK_SUFFIX}"


def _create_exclusive(file: Path, data: bytes) -> bool:
    """Create ``file`` holding ``data``, atomically; False if it exists."""
    fd, tmp = tempfile.mkstemp(
        prefix=f".{file.name[1 : -len(_LOCK_SUFFIX)]}.icstools-lk-", dir=file.parent
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, file)  # a complete file under the name, or nothing
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # no hard links on this filesystem: exclusive create, then write (a kill in
            # between leaves an empty lock, judged unreadable: removed by hand)
            try:
                fd2 = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd2, "wb") as f:
                f.write(data)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _judge_lock(owner: Any) -> tuple[bool | None, str]:
    """Whether the owner of a lock, or a writer process it started, still writes (None: cannot
    tell), and who it is."""
    alive, why = _judge_owner(owner)
    if alive is False:
        running = _running_helpers(owner)
        if running:
            return True, (
                f"{why}, but its writer process {', '.join(map(str, running))} still runs (it"
                " commits the records it was given, then exits)"
            )
    return alive, why


def _running_helpers(owner: Any) -> list[int]:
    """The pids of the writer processes named in a lock's ``helpers`` that still run."""
    helpers = owner.get("helpers") if isinstance(owner, dict) else None
    if not isinstance(helpers, list):
        return []
    return [h["pid"] for h in helpers if isinstance(h, dict) and _owner_alive(h)[0]]


def _judge_owner(owner: Any) -> tuple[bool | None, str]:
    """:func:`_judge_lock` for the process that took the lock alone."""
    alive, why = _owner_alive(owner)
    if alive and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        with _HELD_GUARD:
            held = owner.get("token") in _HELD
        if held:
            return True, (
                f"another writer of this process (pid {os.getpid()}) holds it: close that writer"
                " (RunWriter.close(), or Recorder.close() / the end of its 'with' block) first"
            )
        return False, f"its owner, a writer of this process (pid {os.getpid()}), no longer writes"
    return alive, why


class StoreLock:
    """The lock of one store, held by one writer; see the module docstring.

    Examples
    --------
    >>> lock = StoreLock.acquire(Path("runs/a.zarr"))  # doctest: +SKIP
    >>> lock.check()  # before each commit: still ours?  # doctest: +SKIP
    >>> lock.release()  # doctest: +SKIP
    """

    def __init__(self, path: Path, file: Path, token: str, data: bytes) -> None:
        self.path, self.file, self.token, self._data = path, file, token, data
        self._created_parents: list[Path] = []
        self.released = False

    @classmethod
    def acquire(cls, path: Path) -> StoreLock:
        """Take the lock of the store at ``path``; :class:`StoreError` if a live writer has it."""
        file = lock_file(path)
        created = _make_parents(file.parent)
        token = uuid.uuid4().hex
        data = json.dumps({**_owner_record(), "token": token, "store": str(path)}).encode()
        try:
            for _ in range(5):
                if _create_exclusive(file, data):
                    with _HELD_GUARD:
                        _HELD.add(token)
                    lock = cls(path, file, token, data)
                    lock._created_parents = created
                    return lock
                _take_over_if_stale(path, file)
        except BaseException:
            _remove_empty(created)
            raise
        _remove_empty(created)
        raise StoreError(
            f"cannot take the lock {file} of {path}: other writers keep taking it; one writer"
            " per store"
        )

    def add_helper(self, pid: int) -> None:
        """Name process ``pid`` in the lock as a writer process of its owner: while it runs,
        the lock is not stale even if the owner is gone (a killed parent's writer process
        finishes the commit it is in; the next writer waits for it)."""
        self.check()
        data = json.loads(self._data)
        data.setdefault("helpers", []).append(_owner_record(pid))
        new = json.dumps(data).encode()
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.file.name[1 : -len(_LOCK_SUFFIX)]}.icstools-lk-", dir=self.file.parent
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(new)
            os.replace(tmp, self.file)  # the owner lives: nobody takes the lock over meanwhile
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._data = new

    def check(self) -> None:
        """Raise :class:`StoreError` unless the lock file is still this writer's."""
        ours = self._is_ours()
        if not ours or self.released:
            raise StoreError(
                f"the writer of {self.path} lost its lock {self.file}: another writer removed"
                " or took it over; nothing more is written by this one (the store keeps what was"
                " committed)"
            )

    def release(self) -> None:
        """Delete the lock file if it is still this writer's; calling it again does nothing."""
        if self.released:
            return
        self.released = True
        with _HELD_GUARD:
            _HELD.discard(self.token)
        if self._is_ours():
            with contextlib.suppress(OSError):
                os.unlink(self.file)
        _remove_empty(self._created_parents)

    def _is_ours(self) -> bool:
        # by its random token (the owner may add helpers to the file), not by inode: a new file
        # may reuse a freed inode
        try:
            with open(self.file, "rb") as f:
                return json.loads(f.read()).get("token") == self.token
        except (OSError, ValueError, AttributeError):
            return False


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; the ones created, outermost first."""
    missing = []
    d = directory
    while not os.path.lexists(d) and d != d.parent:
        missing.append(d)
        d = d.parent
    created = []
    for m in reversed(missing):
        try:
            os.mkdir(m)
        except FileExistsError:
            continue
        except OSError as exc:
            _remove_empty(created)
            raise StoreError(f"cannot create the parent directory {m}: {exc}") from exc
        created.append(m)
    return created


def _remove_empty(directories: list[Path]) -> None:
    for d in reversed(directories):  # only if still empty: another writer may use it
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _take_over_if_stale(path: Path, file: Path) -> None:
    """The lock ``file`` exists: raise if its owner writes (or cannot be judged), else move it
    aside (if it is still the file judged) with a :class:`StoreLockWarning`."""
    try:
        with open(file, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return  # released meanwhile: try again
    except OSError as exc:
        raise StoreError(f"cannot read the lock {file} of {path}: {exc}") from exc
    try:
        owner = json.loads(raw)
    except ValueError:
        alive, why = None, "its lock file is unreadable (not an ownership record)"
    else:
        _wait_for_helpers(owner)
        alive, why = _judge_lock(owner)
    if alive:
        raise StoreError(
            f"{path} is locked by another writer: {why}; a store has one writer at a time, with"
            f" or without overwrite=True: wait until that writer is closed, or write to another"
            f" path (lock file {file})"
        )
    if alive is None:
        raise StoreError(
            f"{path} is locked ({file}) and whether its writer still runs cannot be told from"
            f" here: {why}; if no writer uses the store, remove {file} by hand"
        )
    aside = file.with_name(f"{file.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(file, aside)
    except FileNotFoundError:
        return  # taken over or released by someone else meanwhile: try again
    try:
        with open(aside, "rb") as f:
            moved = f.read()
        if moved != raw:
            # another writer took it over between our judgement and the rename: put it back
            with contextlib.suppress(OSError):
                os.link(aside, file)
            return
    finally:
        with contextlib.suppress(OSError):
            os.unlink(aside)
    message = (
        f"{path}: took over the lock {file.name} left by a writer that is gone ({why}); the"
        " store keeps what that writer committed last (replaced only with overwrite=True)"
    )
    # a warning only (no log record too: without logging set up both would print)
    warnings.warn(message, StoreLockWarning, stacklevel=4)


def _wait_for_helpers(owner: Any) -> None:
    """If the owner of a lock is gone but a writer process it started runs (it commits the
    block it was given, then exits), wait up to ``_HELPER_WAIT`` seconds for it to end."""
    deadline = time.monotonic() + _HELPER_WAIT
    while _judge_owner(owner)[0] is False and _running_helpers(owner):
        if time.monotonic() > deadline:
            return  # judged alive by the caller: an error naming the process
        time.sleep(0.05)


def live_writer(path: Path) -> str | None:
    """Who holds the lock of the store at ``path``, if a writer that may still run holds it.

    None if there is no lock or its owner is gone (a stale lock, which the next writer takes
    over); else a description of the owner (alive, or cannot be judged from here).

    Examples
    --------
    >>> live_writer(Path("runs/fig1/bn/seed-0.zarr")) is None  # doctest: +SKIP
    True
    """
    file = lock_file(Path(path))
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"its lock {file} cannot be read: {exc}"
    try:
        alive, why = _judge_lock(json.loads(raw))
    except ValueError:
        alive, why = None, f"its lock {file} is unreadable"
    return None if alive is False else why

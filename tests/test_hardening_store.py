"""Hardening of icstools.store: unusable paths fail at construction, leftovers are cleaned up."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from icstools import store as store_mod
from icstools.store import RunWriter, StoreError, open_run
from icstools.store import owners as store_owners

REPO = Path(__file__).resolve().parents[1]


def block(start: int, k: int) -> xr.Dataset:
    steps = np.arange(start, start + k, dtype=np.int64)
    return xr.Dataset(
        {"loss": ("step", steps / 10.0), "edges": ("edge", np.linspace(0.0, 1.0, 3))},
        coords={"step": steps},
        attrs={"model": "mlp"},
    )


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------- 4: late store errors


def _bad_paths(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    tag = uuid.uuid4().hex[:8]
    return {
        # a regular file as the parent: mkdir/open fail with ENOTDIR, also for root
        "parent is a file": a_file / "sub.zarr",
        "ancestor is a file": a_file / "a" / "b" / "run.zarr",
        "inside /dev/null": Path("/dev/null") / "run.zarr",
        # procfs refuses new entries (ENOENT), sysfs too (EPERM), whoever asks
        "under /proc": Path("/proc") / f"icstools-{tag}" / "run.zarr",
        "in /sys": Path("/sys") / f"icstools-{tag}.zarr",
        # the name itself fits (245 < 255) but the hidden sibling of the first commit does not
        "hidden sibling name too long": tmp_path / ("r" * 240 + ".zarr"),
    }


BAD = [
    "parent is a file",
    "ancestor is a file",
    "inside /dev/null",
    "under /proc",
    "in /sys",
    "hidden sibling name too long",
]


@pytest.mark.parametrize("case", BAD)
def test_unwritable_path_is_refused_at_construction(tmp_path, case):
    path = _bad_paths(tmp_path)[case]
    if case in ("under /proc", "in /sys") and not path.parents[-2].is_dir():
        pytest.skip(f"{path.parents[-2]} is not mounted here")
    before = listing(tmp_path)
    with pytest.raises(StoreError) as info:
        RunWriter(path, chunk_steps=4)
    message = str(info.value)
    assert str(path) in message or str(path.parent) in message, message
    assert "writable directory" in message, message  # says what is valid
    assert isinstance(info.value.__cause__, OSError)  # the OS's own reason is kept
    if case == "hidden sibling name too long":
        assert "must leave room for the hidden sibling directory" in message
    assert listing(tmp_path) == before  # the check leaves nothing behind
    assert not os.path.lexists(path)


def test_read_only_filesystem_is_refused_at_construction(tmp_path, monkeypatch):
    """EROFS cannot be set up without privileges: the OS is made to answer it for one dir."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir, real_open = os.mkdir, os.open

    def refuse(path) -> None:
        if Path(os.fsdecode(path)).parent == ro:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(StoreError, match="Read-only file system") as info:
        RunWriter(ro / "run.zarr")
    assert str(ro) in str(info.value)
    monkeypatch.undo()
    assert listing(ro) == []


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_an_existing_non_store_is_refused_with_a_clear_error(tmp_path, kind):
    path = tmp_path / "notes"
    if kind == "file":
        path.write_text("keep me")
    else:
        path.mkdir()
        (path / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="is not an icstools run store") as info:
            RunWriter(path, overwrite=overwrite)
        assert str(path) in str(info.value)
        # overwrite=True would not help: the message must not suggest it
        assert "pass overwrite=True?" not in str(info.value)
    assert (path if kind == "file" else path / "precious.txt").read_text() == "keep me"


def test_existing_stores_keep_todays_behaviour(tmp_path):
    path = tmp_path / "run.zarr"
    with RunWriter(path, chunk_steps=4) as w:
        w.append(block(0, 3))
    with pytest.raises(FileExistsError, match=r"already exists: pass resume=True.*overwrite=True"):
        RunWriter(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        RunWriter(empty)
    for target in (path, empty):
        with RunWriter(target, overwrite=True, chunk_steps=4) as w:
            w.append(block(10, 2))
        assert open_run(target)["step"].values.tolist() == [10, 11]


def test_missing_parents_are_checked_and_not_left_behind(tmp_path):
    path = tmp_path / "a" / "b" / "run.zarr"
    w = RunWriter(path, chunk_steps=4)
    assert listing(path.parent) == [".run.zarr.icstools-lock"]  # parents made for the lock
    w.close()
    assert listing(tmp_path) == []  # closed without a commit: lock and parents removed again
    w = RunWriter(path, chunk_steps=4)
    w.append(block(0, 3))
    w.close()
    assert listing(path.parent) == ["run.zarr"]
    assert open_run(path)["step"].values.tolist() == [0, 1, 2]


def test_recorder_with_an_unwritable_path_raises_at_construction(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    import icstools

    (tmp_path / "file").write_text("")
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    for bad in (tmp_path / "file" / "sub.zarr", Path("/dev/null/run.zarr")):
        with pytest.raises(StoreError, match="writable directory"):
            icstools.Recorder(model, nn.Sigmoid, path=bad)
    # no hooks were left on the model by the failed construction
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.is_tensor(model(torch.randn(2, 4)))


# ------------------------------------------------------------- 9: leftovers of killed writers

# The child imports icstools.store without icstools/__init__ (which imports torch: seconds), as
# in tests/test_store.py. It stops (sleeps) inside its first append, at ``where``: just before
# the rename that publishes the first commit, or after a few file writes of the store's build.
CHILD = f"""
import sys, time, types
_pkg = types.ModuleType("icstools")
_pkg.__path__ = [{str(REPO / "icstools")!r}]
sys.modules["icstools"] = _pkg
import numpy as np
import xarray as xr
from icstools import store as store_mod
from icstools.store import RunWriter

path, where = sys.argv[1], sys.argv[2]

def stop(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(600)

if where == "publish":
    RunWriter._publish = stop
else:
    real_put = store_mod._AtomicLocalStore._put
    n_puts = [0]

    def put(self, *args, **kwargs):
        n_puts[0] += 1
        if n_puts[0] == 4:
            stop()
        return real_put(self, *args, **kwargs)

    store_mod._AtomicLocalStore._put = put
steps = np.arange(5, dtype=np.int64)
block = xr.Dataset({{"loss": ("step", steps / 10.0)}}, coords={{"step": steps}})
RunWriter(path, chunk_steps=4, overwrite=True).append(block)
"""


def start_writer(tmp_path: Path, path: Path, where: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), where],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )


def wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line == b"ready\n", f"writer ended early: {proc.stderr.read().decode()}"


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def wait_zombie(pid: int) -> bool:
    """Wait until the killed, unreaped child ``pid`` is a zombie; False without /proc."""
    stat = Path(f"/proc/{pid}/stat")
    for _ in range(3000):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state == "Z":
            return True
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not die")


def hidden(directory: Path, name: str = "run.zarr") -> list[str]:
    """The hidden directories of writers of ``name`` (not its lock file)."""
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.name.startswith(f".{name}.icstools-") and p.is_dir()
    )


@pytest.mark.parametrize("where", ["publish", "build"])
@pytest.mark.parametrize("existing_store", [False, True])
def test_leftover_of_a_killed_writer_is_removed_by_the_next_writer(tmp_path, existing_store, where):
    """A writer SIGKILLed before its first commit: while it lives its hidden directory is kept
    and its lock refuses other writers; once it is dead the next writer takes over its lock
    (with a warning) and removes the directory; readers never do."""
    path = tmp_path / "run.zarr"
    if existing_store:  # the killed writer was replacing it (overwrite=True)
        with RunWriter(path, chunk_steps=4) as w:
            w.append(block(0, 3))
    procs = [start_writer(tmp_path, path, where)]
    try:
        wait_ready(procs[0])
        leftovers = hidden(tmp_path)
        assert len(leftovers) == 1 and ".icstools-new-" in leftovers[0], leftovers
        assert (tmp_path / ".run.zarr.icstools-lock").is_file()
        # its owner is alive: a new writer is refused, also with overwrite=True
        with pytest.raises(StoreError, match=f"locked by another writer: .*{procs[0].pid}"):
            RunWriter(path, chunk_steps=4, overwrite=True)
        assert hidden(tmp_path) == leftovers
        procs[0].send_signal(signal.SIGKILL)
        # it stays a zombie (not reaped) until the clean-up ran, where /proc shows it
        if not wait_zombie(procs[0].pid):
            procs[0].wait(timeout=30)
        assert hidden(tmp_path) == leftovers  # nothing removes it by itself
        if existing_store:  # a reader does not write: it leaves it too
            assert open_run(path)["step"].values.tolist() == [0, 1, 2]
        else:
            with pytest.raises(FileNotFoundError):
                open_run(path)
        assert hidden(tmp_path) == leftovers
        with pytest.warns(store_mod.StoreLockWarning, match="took over the lock .* gone"):
            w = RunWriter(path, chunk_steps=4, overwrite=True)
        assert hidden(tmp_path) == [], "the leftover of the dead writer was not removed"
        w.append(block(10, 2))
        w.close()
        assert open_run(path)["step"].values.tolist() == [10, 11]
        assert listing(tmp_path) == ["run.zarr"]
        procs[0].wait(timeout=30)
        assert procs[0].returncode == -signal.SIGKILL
    finally:
        stop_all(procs)


@pytest.fixture
def live_leftover(tmp_path, monkeypatch):
    """A writer of this process (a thread) stopped just before publishing its first commit:
    yields its hidden directory, then lets it finish."""
    path = tmp_path / "run.zarr"
    ready, go = threading.Event(), threading.Event()
    real_publish = RunWriter._publish
    errors = []

    def publish(self, tmp):
        ready.set()
        assert go.wait(60)
        return real_publish(self, tmp)

    def write():
        try:
            with RunWriter(path, chunk_steps=4) as w:
                w.append(block(0, 3))
        except BaseException as exc:  # reported by the fixture
            errors.append(exc)

    monkeypatch.setattr(RunWriter, "_publish", publish)
    thread = threading.Thread(target=write)
    thread.start()
    try:
        assert ready.wait(60), errors
        (leftover,) = [tmp_path / n for n in hidden(tmp_path)]
        yield leftover
    finally:
        go.set()
        thread.join(60)
    assert not errors, errors


def test_leftover_of_a_live_writer_of_this_process_is_kept(tmp_path, live_leftover):
    before = listing(live_leftover)
    with pytest.raises(StoreError, match="another writer of this process"):
        RunWriter(tmp_path / "run.zarr", chunk_steps=4)  # its lock is held
    store_owners._remove_leftovers(tmp_path / "run.zarr")  # what a writer with the lock does
    assert live_leftover.is_dir() and listing(live_leftover) == before


def test_published_store_holds_no_ownership_record(tmp_path):
    """The ownership record lives only in the hidden directory: the layout does not change."""
    with RunWriter(tmp_path / "run.zarr", chunk_steps=4) as w:
        w.append(block(0, 3))
    reference = tmp_path / "reference.zarr"
    block(0, 3).to_zarr(reference, zarr_format=2, consolidated=True)
    assert listing(tmp_path / "run.zarr") == listing(reference)


def _fake_leftover(
    tmp_path: Path, template: Path, owner: dict | str | None, name: str | None = None
) -> Path:
    fake = tmp_path / (name or f".run.zarr.icstools-new-{uuid.uuid4().hex[:12]}")
    shutil.copytree(template, fake)
    record = fake / store_mod._OWNER_FILE
    if owner is None:
        record.unlink()
    else:
        record.write_text(owner if isinstance(owner, str) else json.dumps(owner))
    return fake


def test_ownership_decides_what_is_removed(tmp_path, live_leftover, caplog):
    """Ownership record: pid, host, boot, pid namespace and start ticks of the owner process."""
    owner = json.loads((live_leftover / store_mod._OWNER_FILE).read_text())
    assert owner["pid"] == os.getpid()
    assert isinstance(owner["host"], str) and owner["host"]
    removed, kept = [], {}
    # pid reused: the pid is alive, but it is another process (other start time)
    if owner.get("start_ticks") is not None:
        removed.append(_fake_leftover(tmp_path, live_leftover, {**owner, "start_ticks": 1}))
    # a pid that is free (no process has it)
    free_pid = 2**22 + 12345  # above Linux's largest pid_max: no process has it
    dead = {**owner, "pid": free_pid}
    removed.append(_fake_leftover(tmp_path, live_leftover, dead))
    # the test directory of a writer killed while its constructor checked the location
    probe = f".run.zarr.icstools-probe-{uuid.uuid4().hex[:10]}"
    removed.append(_fake_leftover(tmp_path, live_leftover, dead, name=probe))
    # dead writers' leftovers of other paths are not this writer's business
    others = [
        _fake_leftover(tmp_path, live_leftover, dead, name=f".run.zarr2.icstools-new-{'a' * 12}"),
        _fake_leftover(tmp_path, live_leftover, dead, name=".run.zarr.icstools-new-mine"),
    ]
    other = {**owner, "pid": free_pid, "host": "elsewhere.invalid"}
    kept["another host"] = _fake_leftover(tmp_path, live_leftover, other)
    kept["unreadable"] = _fake_leftover(tmp_path, live_leftover, "{not json")
    kept["no ownership record"] = _fake_leftover(tmp_path, live_leftover, None)
    with caplog.at_level(logging.INFO, logger="icstools.store"):
        store_owners._remove_leftovers(tmp_path / "run.zarr")  # as a writer with the lock does
    assert live_leftover.is_dir()
    for fake in removed:
        assert not fake.exists(), fake
    for why, fake in kept.items():
        assert fake.is_dir() and (fake / ".zmetadata").is_file(), why
        (message,) = [r.getMessage() for r in caplog.records if fake.name in r.getMessage()]
        assert "left alone" in message and why in message, message
    assert len(removed) >= 2
    for fake in others:
        assert fake.is_dir() and not any(fake.name in r.getMessage() for r in caplog.records)

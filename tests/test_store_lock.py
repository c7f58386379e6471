"""One writer per store (issue 13, item 4): the lock taken when a writer is created.

The issue's failure: two writers of one path with overwrite=True both said "finished" and the
store held a mix of both. Here the second writer gets a clear StoreError, in this process and
from another process, and the first writer's run is intact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from icstools.store import RunWriter, StoreError, StoreLockWarning, lock_file, open_run

REPO = Path(__file__).resolve().parents[1]


def block(start: int, k: int, writer: int = 0) -> xr.Dataset:
    steps = np.arange(start, start + k, dtype=np.int64)
    return xr.Dataset(
        {"loss": ("step", steps / 10.0 + writer), "edges": ("edge", np.linspace(0.0, 1.0, 3))},
        coords={"step": steps},
    )


def test_second_writer_of_a_path_is_refused_and_the_first_is_intact(tmp_path):
    path = tmp_path / "run.zarr"
    first = RunWriter(path, chunk_steps=4, overwrite=True)
    first.append(block(0, 6, writer=0))
    with pytest.raises(StoreError) as info:
        RunWriter(path, chunk_steps=4, overwrite=True)
    message = str(info.value)
    assert "locked by another writer" in message and "another writer of this process" in message
    assert "with or without overwrite=True" in message and str(path) in message
    with pytest.raises(FileExistsError):  # without overwrite: the store exists, as before
        RunWriter(path, chunk_steps=4)
    first.append(block(6, 5, writer=0))  # the first writer goes on, untouched
    first.close()
    ds = open_run(path)
    assert ds["step"].values.tolist() == list(range(11))
    np.testing.assert_array_equal(ds["loss"].values, np.arange(11) / 10.0)
    assert not lock_file(path).exists()  # released at close
    # once the first writer is closed, the path can be written again
    with RunWriter(path, chunk_steps=4, overwrite=True) as w:
        w.append(block(0, 2, writer=1))
    assert open_run(path)["loss"].values.tolist() == [1.0, 1.1]


def test_second_writer_before_the_first_commit_is_refused(tmp_path):
    """The lock is taken when the writer is created, before the store exists."""
    path = tmp_path / "run.zarr"
    first = RunWriter(path, chunk_steps=4)
    assert not path.exists() and lock_file(path).is_file()
    with pytest.raises(StoreError, match="locked by another writer"):
        RunWriter(path, chunk_steps=4, overwrite=True)
    first.append(block(0, 3))
    first.close()
    assert open_run(path)["step"].values.tolist() == [0, 1, 2]


def test_lock_record_names_host_pid_and_start_time(tmp_path):
    path = tmp_path / "run.zarr"
    w = RunWriter(path)
    record = json.loads(lock_file(path).read_text())
    assert record["pid"] == os.getpid()
    assert record["host"] and record["store"] == str(path)
    if Path("/proc/self/stat").exists():
        assert isinstance(record["start_ticks"], int)
    w.close()


def test_writer_garbage_collected_without_close_releases_its_lock(tmp_path):
    path = tmp_path / "run.zarr"
    w = RunWriter(path, chunk_steps=4)
    w.append(block(0, 2))
    del w  # never closed (e.g. a notebook cell run again)
    with RunWriter(path, chunk_steps=4, overwrite=True) as w2:
        w2.append(block(5, 2))
    assert open_run(path)["step"].values.tolist() == [5, 6]


def test_failed_writer_releases_its_lock(tmp_path, monkeypatch):
    path = tmp_path / "run.zarr"
    w = RunWriter(path, chunk_steps=4)
    w.append(block(0, 3))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    from icstools.store import writer as store_writer

    monkeypatch.setattr(store_writer, "_atomic_write_bytes", disk_full)
    with pytest.raises(StoreError, match="No space left"):
        w.append(block(3, 2))
    monkeypatch.undo()
    assert not lock_file(path).exists()  # a broken writer writes nothing more
    with RunWriter(path, chunk_steps=4, overwrite=True) as w2:
        w2.append(block(0, 1))


def test_writer_that_lost_its_lock_commits_nothing(tmp_path):
    """Someone removed the lock (by hand) and a second writer took the path: the first writer's
    next append fails instead of writing into the second writer's store."""
    path = tmp_path / "run.zarr"
    first = RunWriter(path, chunk_steps=4, overwrite=True)
    first.append(block(0, 3))
    lock_file(path).unlink()
    second = RunWriter(path, chunk_steps=4, overwrite=True)
    second.append(block(100, 2, writer=1))
    with pytest.raises(StoreError, match="lost its lock"):
        first.append(block(3, 2))
    with pytest.raises(StoreError, match="unusable"):
        first.set_attrs(note="x")
    first.close()
    assert lock_file(path).is_file()  # the second writer's lock is left alone
    second.append(block(102, 1, writer=1))
    second.close()
    ds = open_run(path)
    assert ds["step"].values.tolist() == [100, 101, 102]


def _fake_lock(path: Path, **changes) -> None:
    probe = RunWriter(path.with_name("probe.zarr"))
    record = json.loads(lock_file(probe.path).read_text())
    probe.close()
    lock_file(path).write_text(json.dumps({**record, "store": str(path), **changes}))


def test_lock_of_a_gone_process_is_taken_over_with_a_warning(tmp_path):
    path = tmp_path / "run.zarr"
    _fake_lock(path, pid=2**22 + 4321, token="x")  # above Linux's pid_max: no such process
    with pytest.warns(StoreLockWarning, match=r"took over the lock .* 4198625 .* gone"):
        w = RunWriter(path, chunk_steps=4)
    w.append(block(0, 2))
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.zarr"]


def _helper_lock(path: Path, helper: subprocess.Popen) -> None:
    """A lock whose owner is gone but names ``helper`` as its writer process."""
    from icstools.store.owners import _owner_record

    _fake_lock(path, pid=2**22 + 4321, token="x", helpers=[_owner_record(helper.pid)])


def test_a_gone_owners_running_writer_process_holds_the_lock_until_it_exits(tmp_path):
    """A killed training's writer process finishes the commit it is in: the next writer (a
    resumed run) waits for it, then takes the lock over; live_writer names it meanwhile."""
    from icstools.store import live_writer

    path = tmp_path / "run.zarr"
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _helper_lock(path, helper)
        who = live_writer(path)
        assert who is not None and f"its writer process {helper.pid} still runs" in who
        ended = threading.Timer(0.5, helper.kill)
        ended.start()
        t0 = time.monotonic()
        with pytest.warns(StoreLockWarning, match="took over the lock"):
            w = RunWriter(path, chunk_steps=4)
        assert time.monotonic() - t0 >= 0.4  # it waited for the helper
        assert helper.poll() is not None
    finally:
        helper.kill()
        helper.wait()
    w.append(block(0, 2))
    w.close()
    assert live_writer(path) is None


def test_a_writer_process_that_does_not_end_is_a_clear_error(tmp_path, monkeypatch):
    from icstools.store import owners

    monkeypatch.setattr(owners, "_HELPER_WAIT", 0.2)
    path = tmp_path / "run.zarr"
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _helper_lock(path, helper)
        with pytest.raises(StoreError, match=rf"locked by another writer.*{helper.pid} still runs"):
            RunWriter(path, chunk_steps=4)
    finally:
        helper.kill()
        helper.wait()
    assert json.loads(lock_file(path).read_text())["token"] == "x"  # not taken over


def test_the_lock_names_the_writer_process_and_stays_the_writers(tmp_path):
    """WriterProcess adds its child to the lock; the parent's and the child's checks hold."""
    from icstools.store.process import WriterProcess

    path = tmp_path / "run.zarr"
    wp = WriterProcess(RunWriter(path, chunk_steps=4))
    try:
        record = json.loads(lock_file(path).read_text())
        assert [h["pid"] for h in record["helpers"]] == [wp.pid]
        wp.local._lock.check()  # still ours after the rewrite
    finally:
        wp.close()
    assert not lock_file(path).exists()


def test_lock_of_a_reused_pid_is_taken_over(tmp_path):
    if not Path("/proc/self/stat").exists():
        pytest.skip("start times come from /proc")
    path = tmp_path / "run.zarr"
    # our own pid, but another start time: the process that took the lock is gone
    _fake_lock(path, start_ticks=1, token="x")
    with pytest.warns(StoreLockWarning, match="pid now belongs to another process"):
        RunWriter(path).close()


def test_lock_left_by_a_writer_of_this_process_that_no_longer_writes(tmp_path):
    path = tmp_path / "run.zarr"
    _fake_lock(path, token="not-held-by-anyone")
    with pytest.warns(StoreLockWarning, match="this process .* no longer writes"):
        RunWriter(path).close()


@pytest.mark.parametrize(
    "content, why",
    [
        ({"host": "elsewhere.invalid"}, "another host"),
        ("{not json", "unreadable"),
    ],
)
def test_lock_that_cannot_be_judged_is_an_error_saying_how_to_remove_it(tmp_path, content, why):
    path = tmp_path / "run.zarr"
    if isinstance(content, dict):
        _fake_lock(path, **content)
    else:
        lock_file(path).write_text(content)
    with pytest.raises(StoreError, match=f"cannot be told from here: .*{why}") as info:
        RunWriter(path, overwrite=True)
    assert f"remove {lock_file(path)} by hand" in str(info.value)
    assert lock_file(path).exists()


# ---------------------------------------------------------------------- across processes

CHILD = textwrap.dedent(
    """
    import sys, types
    _pkg = types.ModuleType("icstools")
    _pkg.__path__ = [{pkg!r}]
    sys.modules["icstools"] = _pkg
    import numpy as np
    import xarray as xr
    from icstools.store import RunWriter, StoreError

    path, writer = sys.argv[1], int(sys.argv[2])

    def block(start, k):
        steps = np.arange(start, start + k, dtype=np.int64)
        return xr.Dataset({{"loss": ("step", steps / 10.0 + writer)}}, coords={{"step": steps}})

    try:
        w = RunWriter(path, chunk_steps=4, overwrite=True)
    except StoreError as exc:
        print("refused", exc, flush=True)
        sys.exit(3)
    print("locked", flush=True)
    n = 0
    for line in sys.stdin:  # one block per line from the parent
        w.append(block(n, 5))
        n += 5
        print("committed", n, flush=True)
    w.close()
    print("finished", n, flush=True)
    """
)


def _start(tmp_path: Path, path: Path, writer: int) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD.format(pkg=str(REPO / "icstools")), str(path), str(writer)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
        text=True,
    )


def _close(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()


def test_two_writer_processes_one_path_overwrite(tmp_path):
    """The issue's case across processes: the second writer fails at once, clearly; the first
    finishes and its run is exactly its own."""
    path = tmp_path / "run.zarr"
    first = _start(tmp_path, path, writer=0)
    second = None
    try:
        assert first.stdout.readline() == "locked\n", first.stderr.read()
        first.stdin.write("go\n")
        first.stdin.flush()
        assert first.stdout.readline() == "committed 5\n", first.stderr.read()
        second = _start(tmp_path, path, writer=1)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 3, err
        assert out.startswith("refused ") and "locked by another writer" in out
        assert f"process {first.pid}" in out and "is running" in out
        first.stdin.write("go\ngo\n")
        first.stdin.close()
        rest = first.stdout.read().split("\n")
        assert first.wait(timeout=120) == 0, first.stderr.read()
        assert rest[:3] == ["committed 10", "committed 15", "finished 15"]
    finally:
        _close(first)
        if second is not None:
            _close(second)
    ds = open_run(path)
    assert ds["step"].values.tolist() == list(range(15))
    np.testing.assert_array_equal(ds["loss"].values, np.arange(15) / 10.0)  # writer 0's only
    assert not lock_file(path).exists()


def test_lock_of_a_killed_writer_process_is_taken_over(tmp_path):
    path = tmp_path / "run.zarr"
    proc = _start(tmp_path, path, writer=0)
    try:
        assert proc.stdout.readline() == "locked\n", proc.stderr.read()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "committed 5\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        _close(proc)
    assert lock_file(path).is_file()  # left behind by the killed writer
    assert open_run(path)["step"].values.tolist() == list(range(5))  # its commits are kept
    with pytest.warns(StoreLockWarning, match=f"process {proc.pid} .* is gone"):
        w = RunWriter(path, chunk_steps=4, overwrite=True)
    w.append(block(0, 2, writer=1))
    w.close()
    assert open_run(path)["loss"].values.tolist() == [1.0, 1.1]
    assert not lock_file(path).exists()


def test_two_recorders_one_path(tmp_path):
    """The user-facing case: a second Recorder on the path of a live one fails at creation."""
    torch = pytest.importorskip("torch")
    from torch import nn

    import icstools

    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.zarr"
    with icstools.Recorder(model, path=path, overwrite=True, optimizer=opt):
        with pytest.raises(StoreError, match="locked by another writer"):
            icstools.Recorder(model, path=path, overwrite=True, optimizer=opt)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(5, 4)).sum().backward()
            opt.step()
    assert open_run(path).sizes["step"] == 3

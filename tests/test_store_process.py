"""The store off the training loop's critical path (issue 11, item 4).

The training thread only copies records into rows; the dataset is built, encoded and written by
a child process (:class:`icstools.store.process.WriterProcess`) once the loop fills a block. A
dead child is a StoreError that keeps the committed records; no process outlives its run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from numcodecs import CRC32C, Blosc
from torch import nn

import icstools
from icstools import Recorder, open_run
from icstools.recording.layout import Layout
from icstools.recording.sink import WRITER_ENV
from icstools.store import BackgroundWriter, RunWriter, StoreError, lock_file
from icstools.store.process import StackedBlock, WriterProcess


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3), nn.Sigmoid())


def _train(rec, model, opt, steps, gen, after=None):
    for i in range(steps):
        loss = model(torch.randn(8, 6, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.log(loss=loss)
        if after is not None:
            after(i)


def _run(path, steps=20, chunk_steps=4, after=None):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    rec = Recorder(model, optimizer=opt, path=path, chunk_steps=chunk_steps)
    with rec:
        _train(rec, model, opt, steps, gen, after)
    return rec


def _gone(pid: int) -> bool:
    """The process ``pid`` no longer exists (it was reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _child_pid(rec) -> int:
    writer = rec._sink._writer.writer
    assert isinstance(writer, WriterProcess), type(writer)
    return writer.pid


def test_the_training_thread_neither_builds_datasets_nor_encodes(tmp_path, monkeypatch):
    """Fails before the change: each block was built (Layout.block) on the training thread and
    encoded (Blosc, CRC32C) in this process by the writer thread."""
    encodes, blocks = [], []
    for codec in (Blosc, CRC32C):
        original = codec.encode

        def counting(self, buf, _original=original):
            encodes.append(threading.current_thread().name)
            return _original(self, buf)

        monkeypatch.setattr(codec, "encode", counting)
    block = Layout.block

    def counting_block(self, records, attrs):
        blocks.append(len(records))
        return block(self, records, attrs)

    monkeypatch.setattr(Layout, "block", counting_block)
    rec = _run(tmp_path / "run.zarr", steps=20, chunk_steps=4)
    assert rec.n_committed == 20
    assert encodes == []  # nothing was compressed or checksummed in this process
    assert blocks == [0]  # once, with no record: the shape of every block, not its memory
    memory = _run(None, steps=20).to_dataset().drop_attrs(deep=False)
    xr.testing.assert_identical(open_run(tmp_path / "run.zarr").drop_attrs(deep=False), memory)
    xr.testing.assert_identical(rec.to_dataset().drop_attrs(deep=False), memory)


def test_a_short_run_is_written_without_a_process(tmp_path):
    rec = _run(tmp_path / "run.zarr", steps=3, chunk_steps=64)
    assert isinstance(rec._sink._writer.writer, RunWriter)  # no block filled by the loop
    xr.testing.assert_identical(
        open_run(tmp_path / "run.zarr").drop_attrs(deep=False),
        _run(None, steps=3).to_dataset().drop_attrs(deep=False),
    )


def test_a_flush_before_the_first_chunk_does_not_keep_the_run_on_a_thread(tmp_path):
    """Fails before the change: the first block, written by a thread at ``flush()``, kept every
    later block of the run on that thread (a process only started before the first block)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    rec = Recorder(model, optimizer=opt, path=tmp_path / "run.zarr", chunk_steps=4)

    def early_flush(i):
        if i == 1:
            rec.flush()  # 2 records: written by a thread, committed
            assert isinstance(rec._sink._writer.writer, RunWriter)
            assert rec.n_committed == 2
            rec._sink.set_attrs(note="staged")  # as the recorder sets diverged_step

    with rec:
        _train(rec, model, opt, 20, gen, early_flush)
    assert isinstance(rec._sink._writer.writer, WriterProcess)
    ds = open_run(tmp_path / "run.zarr")
    assert ds.attrs["note"] == "staged"  # staged by the thread, committed by the child
    memory = _run(None, steps=20).to_dataset().drop_attrs(deep=False)
    xr.testing.assert_identical(ds.drop_attrs(deep=False), memory)
    # the thread's writer, handed over, wrote nothing after the child: not its stale shapes
    loss = zarr.open_array(str(tmp_path / "run.zarr" / "loss"), mode="r", zarr_format=2)
    assert loss.shape == (20,)


def test_the_writer_can_be_forced_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(WRITER_ENV, "process")
    rec = _run(tmp_path / "p.zarr", steps=3, chunk_steps=64)
    assert isinstance(rec._sink._writer.writer, WriterProcess)
    monkeypatch.setenv(WRITER_ENV, "thread")
    rec = _run(tmp_path / "t.zarr", steps=12, chunk_steps=4)
    assert isinstance(rec._sink._writer.writer, RunWriter)
    monkeypatch.setenv(WRITER_ENV, "fork")
    with pytest.raises(ValueError, match=r"ICSTOOLS_STORE_WRITER='fork'.*'process', 'thread'"):
        Recorder(_model(), path=tmp_path / "x.zarr")


def test_a_killed_writer_process_is_a_store_error_that_keeps_the_committed_records(tmp_path):
    """Fails without the process: there is none to kill (WriterProcess is missing)."""
    path = tmp_path / "run.zarr"
    pids = []

    def kill_after_8(i):
        if i == 7:
            rec.flush()
            assert rec.n_committed == 8
            pids.append(_child_pid(rec))
            os.kill(pids[0], signal.SIGKILL)

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    rec = Recorder(model, optimizer=opt, path=path, chunk_steps=4)
    with pytest.raises(StoreError, match=r"writer process .* killed by signal 9.*8 steps"):
        with rec:
            _train(rec, model, opt, 16, gen, kill_after_8)
    assert _gone(pids[0])
    ds = open_run(path)
    assert ds.sizes["step"] == 8
    reference = _run(None, steps=16).to_dataset().isel(step=slice(0, 8))
    for name in ("mean", "var", "hist", "loss"):
        np.testing.assert_array_equal(ds[name].values, reference[name].values, err_msg=name)
    assert not lock_file(path).exists()  # the lock was released
    _run(tmp_path / "again.zarr")  # and the store can be written again
    with RunWriter(path, overwrite=True):
        pass


@pytest.mark.parametrize("how", ["close", "exception", "keyboard"])
def test_no_process_outlives_its_run(tmp_path, how):
    pids = []
    error = {"close": None, "exception": ValueError("bug"), "keyboard": KeyboardInterrupt()}[how]

    def fail(i):
        if i == 9:
            assert rec.n_records == 9  # read: the closed records go to the store (not deferred)
            pids.append(_child_pid(rec))
            if error is not None:
                raise error

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    rec = Recorder(model, optimizer=opt, path=tmp_path / "run.zarr", chunk_steps=4)
    if error is None:
        with rec:
            _train(rec, model, opt, 12, gen, fail)
    else:
        with pytest.raises(type(error)), rec:
            _train(rec, model, opt, 12, gen, fail)
    assert _gone(pids[0])
    assert open_run(tmp_path / "run.zarr").sizes["step"] == (12 if error is None else 10)
    assert not lock_file(tmp_path / "run.zarr").exists()


def test_an_error_in_the_child_arrives_as_itself(tmp_path):
    with BackgroundWriter(RunWriter(tmp_path / "run.zarr", chunk_steps=4)) as bw:
        bw.start_process()
        template = xr.Dataset({"x": ("step", [0.0])}, coords={"step": [0]})
        bw.submit(StackedBlock(template, {"step": np.array([0, 1]), "x": np.array([1.0, 2.0])}))
        bw.flush()
        bw.submit(StackedBlock(template, {"step": np.array([1]), "x": np.array([3.0])}))
        with pytest.raises(StoreError, match=r"ValueError.*steps must increase") as info:
            bw.flush()
        assert isinstance(info.value.__cause__, ValueError)
    assert open_run(tmp_path / "run.zarr").x.values.tolist() == [1.0, 2.0]


CHILD = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import icstools
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = icstools.Recorder(model, optimizer=opt, path=sys.argv[1], chunk_steps=2)
    rec.attach()
    for i in range(10**9):
        loss = model(torch.randn(4, 4)).square().mean()
        opt.zero_grad(); loss.backward(); opt.step()
        if i == 5:
            rec.flush()
            print(rec._sink._writer.writer.pid, flush=True)
    """
)


def test_the_writer_process_exits_when_its_parent_is_killed(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run.zarr")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as parent:
        try:
            writer_pid = int(parent.stdout.readline())
        finally:
            parent.kill()
    for _ in range(200):  # it is not our child: it is gone once it exited and was reaped
        if _gone(writer_pid) or _zombie(writer_pid):
            break
        time.sleep(0.05)
    assert _gone(writer_pid) or _zombie(writer_pid)
    assert icstools.open_run(tmp_path / "run.zarr").sizes["step"] >= 6


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_without_a_process_the_run_is_written_from_a_thread(tmp_path, monkeypatch, caplog):
    def no_process(*args, **kwargs):
        raise OSError("no interpreter here")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    rec = _run(tmp_path / "run.zarr", steps=12, chunk_steps=4)
    assert isinstance(rec._sink._writer.writer, RunWriter)
    assert "no writer process" in caplog.text and "no interpreter here" in caplog.text
    assert open_run(tmp_path / "run.zarr").sizes["step"] == 12


def _through_a_pipe(message, receive):
    """``_send(message)`` into a pipe whose other end ``receive(file)`` reads in a thread."""
    from icstools.store import process

    rfd, wfd = os.pipe()
    got = []

    def read() -> None:
        with os.fdopen(rfd, "rb") as f:
            got.append(receive(f))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        process._send(wfd, message)
    finally:
        os.close(wfd)
        reader.join(timeout=60)
    return got[0]


def test_a_message_s_arrays_cross_the_pipe_without_a_copy():
    """Fails before the change: the pickle held a copy of the message's arrays (a template's
    coordinates, 45 MiB for a 10⁶-unit site), and the header + pickle concatenation another."""
    import tracemalloc

    from icstools.store import process

    coords = np.arange(4_000_000, dtype=np.int64)  # 32 MB
    template = xr.Dataset(coords={"unit": coords, "name": ("unit", coords.astype("U3"))})
    message = ("block", (1, [], template))

    def drain(f) -> int:  # reads it all, 64 KiB at a time, keeping nothing
        return sum(len(chunk) for chunk in iter(lambda: f.read(1 << 16), b""))

    tracemalloc.start()
    try:
        sent = _through_a_pipe(message, drain)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent > 80e6  # the coordinates' bytes did cross
    assert peak < 4 * 2**20, peak / 2**20  # no copy of them was made to send them
    _, (_, _, received) = _through_a_pipe(message, process._receive)
    xr.testing.assert_identical(received, template)

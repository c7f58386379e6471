"""``Recorder(..., path=P, resume=True)``: continuing a store after a restart (issue 13 item 3).

The reference is always an uninterrupted run of the same seeded training written to its own
store: a resumed store must hold exactly its records (every variable, coordinate and attr but
the store's own path).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import icstools
from icstools.store import (
    RunWriter,
    StoreError,
    StoreLockWarning,
    live_writer,
    open_run,
    verify_run,
)
from icstools.store.process import WriterProcess

# A seeded training (BN, dropout: the global RNG matters; Adam: the optimizer's state holds the
# step) that saves model, optimizer and both RNG states every K steps, after rec.flush(), and
# prints the step count after every step. With a checkpoint at CKPT it resumes from it.
TRAIN = textwrap.dedent(
    """
    import os, signal, sys, torch
    from torch import nn
    import icstools

    torch.set_num_threads(1)
    PROBE = torch.randn(16, 6, generator=torch.Generator().manual_seed(5))
    KW = dict(every=2, probe=PROBE, probe_sample=5, gradients=True, chunk_steps=2)

    def run(path, ckpt, total, k, report=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Dropout(0.2),
                              nn.Linear(10, 3))
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(1)
        resume = ckpt is not None and os.path.exists(ckpt)
        if resume:
            state = torch.load(ckpt)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            torch.set_rng_state(state["rng"])
        rec = icstools.Recorder(model, optimizer=opt, path=path, resume=resume, **KW)
        with rec:
            for _ in range(rec.step, total):
                x = torch.randn(8, 6, generator=gen)
                y = torch.randint(0, 3, (8,), generator=gen)
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step(); rec.log(loss=loss)
                if ckpt is not None and rec.step % k == 0:
                    rec.flush()  # the store holds every record up to the checkpoint
                    state = {"step": rec.step, "model": model.state_dict(), "opt": opt.state_dict(),
                             "gen": gen.get_state(), "rng": torch.get_rng_state()}
                    torch.save(state, ckpt + ".tmp")
                    os.replace(ckpt + ".tmp", ckpt)
                if report is not None:
                    report(rec)
        return rec

    def report(rec):
        print(rec.step, flush=True)
        if rec.step == KILL_AT:  # kill itself, once the records given to the writer are on disk
            rec.n_records  # read: every closed record goes to the writer (none waits deferred)
            rec._sink._writer.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    if __name__ == "__main__":
        KILL_AT = int(sys.argv[5]) if len(sys.argv) > 5 else None
        run(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), report)
    """
)
TOTAL, K = 30, 6


@pytest.fixture
def train(tmp_path):
    script = tmp_path / "resume_child.py"
    script.write_text(TRAIN)
    sys.path.insert(0, str(tmp_path))
    try:
        import resume_child

        yield resume_child
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("resume_child", None)


def _assert_same_run(resumed, reference) -> None:
    """Every record, coordinate and attr equal (but the path inside recorder_config)."""
    xr.testing.assert_identical(resumed.drop_attrs(), reference.drop_attrs())
    for key in set(resumed.attrs) | set(reference.attrs):
        a, b = resumed.attrs.get(key), reference.attrs.get(key)
        if key == "recorder_config":
            a, b = ({k: v for k, v in json.loads(c).items() if k != "path"} for c in (a, b))
        assert a == b, key


def _kill_at(script, path, ckpt, step, rng) -> int:
    """Run the training in a child and SIGKILL it once it reported ``step``; its last step."""
    with subprocess.Popen(
        [sys.executable, str(script), str(path), str(ckpt), str(TOTAL), str(K)],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            seen = 0
            while seen < step:
                line = child.stdout.readline()
                assert line, f"the child ended early: rc={child.poll()}"
                seen = int(line)
            time.sleep(float(rng.uniform(0, 0.03)))  # a random moment of a later step
            os.kill(child.pid, signal.SIGKILL)
            rest = child.stdout.read().split()
        finally:
            child.kill()
    # its writer process may still be committing the block it was given: the store is read
    # (for the records after the checkpoint) once that process is gone, as the resume waits too
    deadline = time.monotonic() + 60
    while live_writer(path) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_writer(path) is None, live_writer(path)
    return max([seen, *map(int, rest)])


def _resume_in_process(train, path, ckpt) -> bool:
    """Restart from the checkpoint; whether records after it were dropped (and warned about)."""
    restored = torch.load(ckpt)["step"]
    after = [s for s in open_run(path).step.values.tolist() if s >= restored]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.run(str(path), str(ckpt), TOTAL, K)
    kinds = [w.category for w in caught]
    # the killed child's lock is taken over; the records it made after its checkpoint (if any
    # were committed) are dropped, with a warning naming them
    assert kinds.count(StoreLockWarning) == 1
    dropped = [str(w.message) for w in caught if w.category is icstools.ResumeWarning]
    assert len(kinds) == 1 + len(dropped) and len(dropped) == bool(after)
    if after:
        steps = ", ".join(map(str, after))
        assert f"at step {restored}" in dropped[0] and f"(steps {steps})" in dropped[0]
    return bool(after)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_resume_after_sigkill_equals_the_uninterrupted_run(train, tmp_path, seed):
    """Killed (SIGKILL) at a random step, restarted from the last checkpoint with resume=True:
    the store equals the uninterrupted run's, and every checksum holds."""
    rng = np.random.default_rng(seed)
    reference = tmp_path / "reference.zarr"
    train.run(str(reference), None, TOTAL, K)
    path, ckpt = tmp_path / "run.zarr", tmp_path / "ckpt.pt"
    killed = _kill_at(tmp_path / "resume_child.py", path, ckpt, int(rng.integers(K + 1, 24)), rng)
    assert killed < TOTAL  # killed in the middle
    _resume_in_process(train, path, ckpt)
    _assert_same_run(open_run(path), open_run(reference))
    assert verify_run(path).ok


def test_records_the_killed_run_committed_after_its_checkpoint_are_recorded_again(train, tmp_path):
    """The child kills itself (SIGKILL) once the records of two steps after its last checkpoint
    are committed: the restart drops them, warns naming them, and records them again."""
    m = int(np.random.default_rng(3).integers(1, 4))
    checkpoint = K * m
    reference = tmp_path / "reference.zarr"
    train.run(str(reference), None, TOTAL, K)
    path, ckpt = tmp_path / "run.zarr", tmp_path / "ckpt.pt"
    args = [path, ckpt, TOTAL, K, checkpoint + 5]  # killed after step checkpoint + 4
    child = subprocess.run(
        [sys.executable, str(tmp_path / "resume_child.py"), *map(str, args)],
        capture_output=True,
        text=True,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    steps = open_run(path).step.values.tolist()
    assert steps[-2:] == [checkpoint, checkpoint + 2]  # committed after the checkpoint
    assert _resume_in_process(train, path, ckpt)
    _assert_same_run(open_run(path), open_run(reference))
    assert verify_run(path).ok


@pytest.mark.slow
def test_resume_after_several_sigkills_in_a_row(train, tmp_path):
    """Killed three times, each restart a new process resuming from the last checkpoint."""
    rng = np.random.default_rng(7)
    reference = tmp_path / "reference.zarr"
    train.run(str(reference), None, TOTAL, K)
    path, ckpt = tmp_path / "run.zarr", tmp_path / "ckpt.pt"
    last = 0
    for low in (K + 1, 12, 19):
        last = _kill_at(
            tmp_path / "resume_child.py", path, ckpt, int(rng.integers(low, low + 5)), rng
        )
        assert last < TOTAL
        ds = open_run(path)  # readable after every kill, steps in order
        assert list(ds.step.values) == list(range(0, 2 * ds.sizes["step"], 2))
    _resume_in_process(train, path, ckpt)
    _assert_same_run(open_run(path), open_run(reference))
    assert verify_run(path).ok


# ---- in one process: checkpoint = a deep copy of the states -------------------------------


def _make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Dropout(0.2), nn.Tanh(), nn.Linear(10, 3))
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


_PROBE = torch.randn(16, 6, generator=torch.Generator().manual_seed(5))
_KW = dict(every=2, probe=_PROBE, probe_sample=5, chunk_steps=4)


def _steps(rec, model, opt, gen, n, checkpoint_at=None):
    """Train ``n`` steps under ``rec``; the states after ``checkpoint_at`` steps (flushed)."""
    saved = None
    with rec:
        for _ in range(n):
            x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
            if rec.step == checkpoint_at:
                rec.flush()
                states = (model.state_dict(), opt.state_dict(), gen.get_state())
                saved = copy.deepcopy((*states, torch.get_rng_state()))
    return saved


def _restored(saved):
    model, opt = _make()
    gen = torch.Generator()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    gen.set_state(saved[2])
    torch.set_rng_state(saved[3])
    return model, opt, gen


def _reference(path, n):
    model, opt = _make()
    rec = icstools.Recorder(model, optimizer=opt, path=path, **_KW)
    _steps(rec, model, opt, torch.Generator().manual_seed(1), n)
    return open_run(path)


def _killed_run(path, n, checkpoint_at):
    """A run that went on ``n`` steps after its checkpoint (the records are in the store)."""
    model, opt = _make()
    rec = icstools.Recorder(model, optimizer=opt, path=path, **_KW)
    return _steps(rec, model, opt, torch.Generator().manual_seed(1), n, checkpoint_at)


def test_records_after_the_restored_step_are_dropped_with_a_warning_naming_them(tmp_path):
    reference = _reference(tmp_path / "reference.zarr", 20)
    path = tmp_path / "run.zarr"
    saved = _killed_run(path, 13, checkpoint_at=7)
    assert open_run(path).step.values.tolist() == [0, 2, 4, 6, 8, 10, 12]
    model, opt, gen = _restored(saved)
    with pytest.warns(icstools.ResumeWarning, match=r"at step 7.*dropped \(steps 8, 10, 12\)"):
        rec = icstools.Recorder(model, optimizer=opt, path=path, resume=True, **_KW)
    assert rec.step == 7  # from Adam's state
    # dropped at once: a reader sees the records of the restored trajectory only
    assert open_run(path).step.values.tolist() == [0, 2, 4, 6]
    _steps(rec, model, opt, gen, 13)
    # the resumed run's blocks went to a writer process, which adopted the store's commits
    assert isinstance(rec._sink._writer.writer, WriterProcess)
    _assert_same_run(open_run(path), reference)
    assert verify_run(path).ok


def test_the_step_comes_from_start_step_or_the_optimizer(tmp_path):
    path = tmp_path / "run.zarr"
    saved = _killed_run(path, 8, checkpoint_at=8)
    model, opt, _ = _restored(saved)
    with icstools.Recorder(model, optimizer=opt, path=path, resume=True, **_KW) as rec:
        assert rec.step == 8  # Adam keeps "step" in its state
        assert rec.to_dataset().step.values.tolist() == [0, 2, 4, 6]  # the store's records
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd.state[next(model.parameters())]["momentum_buffer"] = torch.zeros(1)  # restored state
    for optimizer in (torch.optim.SGD(model.parameters(), lr=0.1), sgd):
        with pytest.raises(icstools.RecorderError, match=r"keeps no step count.*pass start_step="):
            icstools.Recorder(model, optimizer=optimizer, path=path, resume=True, **_KW)
        with icstools.Recorder(
            model, optimizer=optimizer, path=path, resume=True, start_step=8, **_KW
        ) as rec:
            assert rec.step == 8
    fresh = torch.optim.Adam(model.parameters())  # its state_dict was not loaded
    with pytest.raises(icstools.RecorderError, match="holds none: load its state_dict"):
        icstools.Recorder(model, optimizer=fresh, path=path, resume=True, **_KW)
    with pytest.raises(icstools.RecorderError, match="pass start_step="):
        icstools.Recorder(model, path=path, resume=True, **_KW)  # no optimizer
    assert open_run(path).step.values.tolist() == [0, 2, 4, 6]  # nothing was dropped


def test_start_step_without_resume_numbers_a_new_run_from_there():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    with icstools.Recorder(model, start_step=40, every=5) as rec:
        for _ in range(6):
            model(torch.randn(5, 3))
            rec.step_done()
    assert rec.to_dataset().step.values.tolist() == [40, 45]
    for bad, kind in ((-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(kind, match="start_step"):
            icstools.Recorder(model, start_step=bad)


def test_steps_never_committed_before_the_restored_one_are_warned_about(tmp_path):
    path = tmp_path / "run.zarr"
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    with icstools.Recorder(model, path=path, chunk_steps=4) as rec:
        for _ in range(6):
            model(torch.randn(5, 3))
            rec.step_done()
    with pytest.warns(icstools.ResumeWarning, match=r"ends at step 5, so steps 6, 7, 8 were"):
        rec = icstools.Recorder(model, path=path, resume=True, start_step=9, chunk_steps=4)
    with rec:
        model(torch.randn(5, 3))
        rec.step_done()
    assert open_run(path).step.values.tolist() == [0, 1, 2, 3, 4, 5, 9]


def test_a_configuration_that_differs_is_an_error_naming_the_keys(tmp_path):
    path = tmp_path / "run.zarr"
    saved = _killed_run(path, 8, checkpoint_at=8)
    model, opt, _ = _restored(saved)
    before = sorted(os.listdir(path))
    with pytest.raises(icstools.RecorderError) as info:
        icstools.Recorder(
            model, optimizer=opt, path=path, resume=True, **{**_KW, "bins": 10, "every": 3}
        )
    message = str(info.value)
    assert "['bins', 'schedule']" in message
    assert "bins: the store has 64, this Recorder 10" in message
    assert "'every(2, start=0)', this Recorder 'every(3, start=0)'" in message
    assert sorted(os.listdir(path)) == before and open_run(path).sizes["step"] == 4
    # the lock was released: the right configuration resumes
    with icstools.Recorder(model, optimizer=opt, path=path, resume=True, **_KW) as rec:
        assert rec.step == 8


def test_a_callable_schedule_is_compared_by_its_name(tmp_path):
    path = tmp_path / "run.zarr"
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())

    def even(step):
        return step % 2 == 0

    with icstools.Recorder(model, path=path, every=even) as rec:
        model(torch.randn(5, 3))
        rec.step_done()
    with icstools.Recorder(model, path=path, every=even, resume=True, start_step=1):
        pass  # the same function in another process has another address
    with pytest.raises(icstools.RecorderError, match="schedule"):
        icstools.Recorder(model, path=path, every=lambda s: True, resume=True, start_step=1)


def test_resume_of_a_missing_or_never_committed_store_is_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    with pytest.raises(StoreError, match=r"no run to continue.*no such file"):
        icstools.Recorder(model, path=tmp_path / "missing.zarr", resume=True, start_step=3)
    # killed before its first commit: only the hidden directory of the first commit exists
    (tmp_path / ".run.zarr.icstools-new-0123456789ab").mkdir()
    with pytest.raises(StoreError, match="killed before its first commit"):
        icstools.Recorder(model, path=tmp_path / "run.zarr", resume=True, start_step=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no commit marker"):
        icstools.Recorder(model, path=tmp_path / "empty", resume=True, start_step=3)
    assert not list(tmp_path.glob(".*icstools-lock"))  # every failed attempt released its lock


def test_resume_of_a_damaged_store_is_a_clear_error(tmp_path):
    path = tmp_path / "run.zarr"
    _killed_run(path, 12, checkpoint_at=None)  # 6 records: chunks 0 (full) and 1 of step
    marker = path / ".zmetadata"
    raw = marker.read_bytes()
    marker.write_bytes(raw.replace(b'"n_committed": 6', b'"n_committed": 7'))
    model, opt = _make()
    with pytest.raises(StoreError, match=r"commit marker .zmetadata is corrupt"):
        icstools.Recorder(model, optimizer=opt, path=path, resume=True, start_step=12, **_KW)
    marker.write_bytes(raw)
    chunk = path / "mean" / "0.1.0"  # (source, step, unit): the last chunk along step
    chunk.write_bytes(chunk.read_bytes()[:-3])
    with pytest.raises(StoreError, match=r"variable 'mean', chunk 0\.1\.0.*truncated|checksum"):
        icstools.Recorder(model, optimizer=opt, path=path, resume=True, start_step=12, **_KW)
    assert not list(tmp_path.glob(".*icstools-lock"))


def test_resume_with_overwrite_is_an_error(tmp_path):
    path = tmp_path / "run.zarr"
    _killed_run(path, 4, checkpoint_at=None)
    model, opt = _make()
    for kw in ({"optimizer": opt}, {"start_step": 4}):
        with pytest.raises(ValueError, match=r"resume=True continues.*overwrite=True deletes"):
            icstools.Recorder(model, path=path, resume=True, overwrite=True, **kw)
    with pytest.raises(ValueError, match=r"resume=True continues.*overwrite=True deletes"):
        RunWriter(path, resume=True, overwrite=True)
    with pytest.raises(ValueError, match="give the Recorder its path="):
        icstools.Recorder(model, resume=True, start_step=4)
    assert open_run(path).sizes["step"] == 2  # untouched


def test_the_exists_error_names_resume_and_says_overwrite_deletes(tmp_path):
    path = tmp_path / "run.zarr"
    _killed_run(path, 4, checkpoint_at=None)
    model, opt = _make()
    with pytest.raises(FileExistsError) as info:
        icstools.Recorder(model, optimizer=opt, path=path, **_KW)
    assert "pass resume=True to continue" in str(info.value)
    assert "overwrite=True to delete it" in str(info.value)


def test_a_resumed_store_is_locked_like_a_new_one(tmp_path):
    path = tmp_path / "run.zarr"
    saved = _killed_run(path, 8, checkpoint_at=8)
    model, opt, _ = _restored(saved)
    with icstools.Recorder(model, optimizer=opt, path=path, resume=True, **_KW):
        with pytest.raises(StoreError, match="lock"):
            RunWriter(path, resume=True)
        with pytest.raises(StoreError, match="lock"):
            RunWriter(path, overwrite=True)
    assert open_run(path).sizes["step"] == 4


def test_the_run_writer_resumes_and_drops(tmp_path):
    def block(steps):
        steps = np.asarray(steps, dtype=np.int64)
        return xr.Dataset(
            {"loss": ("step", steps / 10), "flag": ("step", steps % 2 == 0)},
            coords={"step": steps, "site": ("site", np.array(["a", "bb"]))},
        )

    path = tmp_path / "run.zarr"
    with RunWriter(path, chunk_steps=4) as w:
        w.append(block([0, 1, 2]))
        w.append(block([3, 4, 5, 6]))
    with RunWriter(path, resume=True) as w:
        assert w.n_committed == 7 and w.resumed_steps.tolist() == list(range(7))
        assert w.drop_from(5).tolist() == [5, 6]
        assert open_run(path).step.values.tolist() == [0, 1, 2, 3, 4]
        with pytest.raises(ValueError, match="step 4 is already written"):
            w.append(block([4, 5]))
        with pytest.raises(ValueError, match="static variable 'site' differs"):
            w.append(block([5]).assign_coords(site=("site", np.array(["a", "c"]))))
        w.append(block([5, 6, 7, 8, 9]))
    whole = tmp_path / "whole.zarr"
    with RunWriter(whole, chunk_steps=4) as w:
        w.append(block(range(10)))
    xr.testing.assert_identical(open_run(path), open_run(whole))
    assert verify_run(path).ok


def test_the_readme_example_resumes_as_it_says(tmp_path, monkeypatch):
    """README's "Resuming after a restart" example: a run stopped at step 150 (checkpoint at
    100) and started again equals an uninterrupted run."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Resuming after a restart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    stopped = code.replace("range(rec.step, 300)", "range(rec.step, 150)")
    assert stopped != code

    def run(folder, *codes):
        folder.mkdir()
        monkeypatch.chdir(folder)
        torch.manual_seed(0)
        for c in codes:
            exec(compile(c, "README.md", "exec"), {})
        return open_run(folder / "data" / "runs" / "resumable.zarr")

    reference = run(tmp_path / "uninterrupted", code)
    with pytest.warns(icstools.ResumeWarning, match=r"at step 100.*steps 100, 110, 120, 130, 140"):
        resumed = run(tmp_path / "restarted", stopped, code)
    xr.testing.assert_identical(resumed, reference)
    assert resumed.sizes["step"] == 30

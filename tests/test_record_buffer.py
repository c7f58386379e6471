"""The record buffer is bounded in bytes (``buffer_bytes``): wide records are written early, in
small chunks, and the store holds the same run as memory."""

from __future__ import annotations

import tracemalloc
import warnings

import pytest
import torch
import xarray as xr
import zarr
from torch import nn

from icstools import Recorder, open_run
from icstools.recording.sink import DEFAULT_BUFFER_BYTES, record_nbytes

UNITS = 40_000  # ~5 MB per record with the default statistics and quantiles


def _train(path=None, buffer_bytes=DEFAULT_BUFFER_BYTES, steps=12):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, UNITS), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = Recorder(model, "1", role="input", optimizer=opt, path=path, buffer_bytes=buffer_bytes)
    with rec:
        for _ in range(steps):
            loss = model(torch.randn(2, 3)).square().mean()
            rec.log(loss=loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return rec


def _step_chunk(path) -> int:
    return zarr.open_group(path, mode="r")["mean"].chunks[1]  # [source, step, unit]


def test_wide_records_stay_within_the_bound_and_read_back_whole(tmp_path):
    bound = 16 * 2**20
    rec = _train(tmp_path / "run.zarr", buffer_bytes=bound)
    per_record = rec.record_bytes
    assert 4e6 < per_record < 8e6  # ~44 + 4 × 21 bytes per unit, plus small fields
    sink = rec._sink
    assert sink.peak_bytes <= bound  # records + the block made of them + blocks in flight
    assert sink.peak_bytes >= 2 * per_record  # it did hold a record and its block
    # a chunk row of 64 steps (~330 MB) would not fit a quarter of the bound, nor would 2:
    # one step per chunk row, so that no block rewrites a chunk another block wrote
    assert sink.chunk_steps == 1
    stored = open_run(tmp_path / "run.zarr")
    assert stored.sizes["step"] == 12
    assert _step_chunk(tmp_path / "run.zarr") == 1
    memory = _train(None).to_dataset()  # the same training, kept in memory
    xr.testing.assert_identical(stored.drop_attrs(deep=False), memory.drop_attrs(deep=False))


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_a_record_over_half_the_bound_is_written_alone_without_a_copy(
    tmp_path, monkeypatch, writer
):
    """Two such records never sit in the sink at once: each is handed to the writer as a block
    of its own made of the record's arrays (no rows are filled), and waited for."""
    from icstools.recording import sink as sink_module

    monkeypatch.setenv(sink_module.WRITER_ENV, writer)
    made = []
    real = sink_module._Rows.__init__

    def counted(self, first, rows):
        made.append(rows)
        real(self, first, rows)

    monkeypatch.setattr(sink_module._Rows, "__init__", counted)
    bound = 8 * 2**20
    rec = _train(tmp_path / "run.zarr", buffer_bytes=bound)
    per_record = rec.record_bytes
    assert 2 * per_record > bound  # every record is over half the bound
    assert rec._sink.peak_bytes == per_record  # held once, never beside another or a copy
    assert not made  # no record was copied into rows
    stored = open_run(tmp_path / "run.zarr")
    assert stored.sizes["step"] == 12 and rec.n_committed == 12
    memory = _train(None).to_dataset()
    xr.testing.assert_identical(stored.drop_attrs(deep=False), memory.drop_attrs(deep=False))


def test_narrow_records_keep_the_configured_chunks(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Recorder(model, optimizer=opt, path=tmp_path / "r.zarr", chunk_steps=16) as rec:
        for _ in range(3):
            loss = model(torch.randn(4, 3)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert rec._sink.chunk_steps == 16
    assert _step_chunk(tmp_path / "r.zarr") == 16


def test_an_in_memory_run_that_outgrows_the_bound_warns_once():
    with pytest.warns(ResourceWarning, match=r"give the Recorder a path=") as caught:
        rec = _train(None, buffer_bytes=2**20, steps=3)
    assert len([w for w in caught if w.category is ResourceWarning]) == 1
    assert rec.to_dataset().sizes["step"] == 3  # nothing dropped: memory keeps every record


def test_a_narrow_in_memory_run_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(None, steps=2)


@pytest.mark.parametrize("bad", [0, 2**20 - 1, 1.5e9, True, "256MiB", None])
def test_buffer_bytes_must_be_an_int_of_at_least_one_mib(bad):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(ValueError, match=r"buffer_bytes must be an int ≥ 1 MiB.*got"):
        Recorder(model, buffer_bytes=bad)


def test_record_nbytes_counts_arrays_and_scalars():
    import numpy as np

    record = {"step": 1, "mean": np.zeros((2, 10), np.float32), "hist": np.zeros(5, np.int64)}
    assert record_nbytes(record) == 8 + 80 + 40


def _train_traced(path, monkeypatch, writer: str, steps: int = 10) -> tuple[Recorder, int, int]:
    """``_train`` to a store with records written alone, the wide path taken (slices of 3,000
    units); returns the recorder, the most numpy memory traced from the third step on above
    what was held then, and what the run holds after its last step (both in bytes)."""
    from icstools.functional import exact
    from icstools.recording import sink as sink_module

    monkeypatch.setenv(sink_module.WRITER_ENV, writer)
    monkeypatch.setattr(exact, "WIDE_UNITS", 1000)
    monkeypatch.setattr(exact, "SLICE_UNITS", 3000)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, UNITS), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = Recorder(model, "1", role="input", optimizer=opt, path=path, buffer_bytes=8 * 2**20)
    tracemalloc.start()
    try:
        with rec:
            for i in range(steps):
                if i == 2:
                    base = tracemalloc.get_traced_memory()[0]
                    tracemalloc.reset_peak()
                loss = model(torch.randn(2, 3)).square().mean()
                rec.log(loss=loss.detach())
                opt.zero_grad()
                loss.backward()
                opt.step()
            rec.flush()
            current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return rec, peak - base, current - base


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_a_wide_record_is_held_once_while_it_is_computed_and_not_after(
    tmp_path, monkeypatch, writer
):
    """Fails before the change: the sink's template kept the first record's data, the layout
    a filled copy of every variable, the recorder the latest record, the writer thread the
    latest block, and finishing the statistics of all units at once held their float64
    temporaries and quantile values beside the record (~4 records at the peak)."""
    rec, peak, held = _train_traced(tmp_path / "run.zarr", monkeypatch, writer)
    per_record = rec.record_bytes
    assert 2 * per_record > rec._sink.buffer_bytes  # written alone
    if writer == "process":  # (a writer thread encodes in this process: its chunks count)
        assert peak < 1.5 * per_record, peak / per_record
    assert held < 0.2 * per_record, (held / per_record, writer)
    assert rec._sink._template.sizes["step"] == 0


def test_a_wide_site_finished_by_slices_gives_the_same_run(tmp_path, monkeypatch):
    from icstools.functional import exact

    slices = []
    real = exact.finish_exact_slices

    def spy(stats):
        for cols, out in real(stats):
            slices.append(cols)
            yield cols, out

    monkeypatch.setattr(
        "icstools.recording.measurements.activations.finish_exact_slices", spy, raising=True
    )
    whole = _train(None, steps=10).to_dataset().drop_attrs(deep=False)  # 40,000 units: not wide
    assert not slices
    _train_traced(tmp_path / "run.zarr", monkeypatch, "process")  # wide from 1,000 units
    assert len(slices) == 10 * 14 and slices[13] == slice(39000, 40000)  # 13 × 3,000 + 1,000
    sliced = open_run(tmp_path / "run.zarr").drop_attrs(deep=False)
    xr.testing.assert_identical(sliced, whole)


def test_last_record_of_a_record_written_alone_is_read_back(tmp_path, monkeypatch):
    rec, _, _ = _train_traced(tmp_path / "run.zarr", monkeypatch, "process", steps=4)
    assert rec._last is None  # not kept: it is on disk
    last = rec.last_record()
    assert last.step.values.tolist() == [3]
    stored = open_run(tmp_path / "run.zarr").isel(step=[-1])
    xr.testing.assert_identical(last.drop_attrs(deep=False), stored.drop_attrs(deep=False))

"""Deferred records (:mod:`icstools.recording.deferred`): several records' activation
statistics folded in one numpy pass give the very same run as record by record, in step
order, and nothing that reads the run sees a record missing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from icstools import Recorder
from icstools.functional import exact
from icstools.functional import statistics as st
from icstools.recording import deferred
from icstools.recording.records import RunRecords


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Sigmoid(), nn.Linear(16, 8), nn.Tanh()
    )


def _run(steps=40, nan_at=None, probe=False, **kwargs) -> tuple[xr.Dataset, Recorder]:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    extra = {"probe": torch.randn(10, 6, generator=gen)} if probe else {}
    rec = Recorder(model, optimizer=opt, **extra, **kwargs)
    with rec:
        for t in range(steps):
            x = torch.randn(12, 6, generator=gen)
            if t == nan_at:
                x[0, 0] = float("nan")
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
    return rec.to_dataset(), rec


def _batch_sizes(monkeypatch) -> list[int]:
    """The number of waiting records at each completion, from now on (appended as they come)."""
    sizes: list[int] = []
    real = RunRecords._complete_deferred

    def counted(self):
        sizes.append(len(self._deferred))
        real(self)

    monkeypatch.setattr(RunRecords, "_complete_deferred", counted)
    return sizes


def _immediate(monkeypatch, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(RunRecords, "_may_defer", lambda self: False)
        return _run(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"probe": True}, {"every": 3}, {"nan_at": 17}, {"quantile_sample": 8}],
    ids=["train", "probe", "every3", "nan", "sampled"],
)
def test_deferred_records_equal_record_by_record(monkeypatch, kwargs):
    calls = _batch_sizes(monkeypatch)
    got, rec = _run(**kwargs)
    want, _ = _immediate(monkeypatch, **kwargs)
    xr.testing.assert_identical(got, want)
    batched = max(calls)
    if kwargs.get("quantile_sample") == 8:
        assert batched == 0  # 12 values per unit > 8: reduced on arrival, nothing waits
    else:
        assert batched > 1  # several records were folded together
    if "nan_at" in kwargs:
        assert rec.diverged_step == got.attrs["diverged_step"] == 17


def test_records_are_never_missing_when_read(monkeypatch):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, optimizer=opt)
    with rec:
        for t in range(5):
            model(torch.randn(12, 6)).sum().backward()
            opt.step()
            model(torch.randn(12, 6))  # the next forward closes step t's record
            assert len(rec._deferred) == (t > 0)  # the first record is never deferred
            assert rec.n_records == t + 1  # reading completes the waiting records
            assert len(rec._deferred) == 0
            assert int(rec.last_record().step[0]) == t
    assert rec.to_dataset().sizes["step"] == 6


def test_waiting_records_are_bounded(monkeypatch):
    monkeypatch.setattr(deferred, "MAX_RECORDS", 4)
    sizes = _batch_sizes(monkeypatch)
    _run(steps=20)
    assert max(sizes) == 4


def test_a_consumer_of_each_record_gets_it_at_once():
    seen = []
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, optimizer=opt, on_record=lambda ds: seen.append(int(ds.step[0]))) as rec:
        for t in range(4):
            model(torch.randn(12, 6)).sum().backward()
            opt.step()
            model(torch.randn(12, 6))
            assert seen[-1] == t and len(rec._deferred) == 0


def _objects(widths, n, edges, rng, values=None):
    out = []
    for i, w in enumerate(widths):
        s = st.ActivationStatistics(edges[i], 1, sat_threshold=1.5, quantile_sample=None)
        x = values[i] if values is not None else rng.standard_normal((n, w)) * (i + 1)
        s.update(torch.as_tensor(x, dtype=torch.float32))
        out.append(s)
    return out


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_finish_exact_many_equals_object_by_object(bad):
    rng = np.random.default_rng(3)
    widths = [3, 7, 1, 5]
    edges = [np.linspace(-2, 2, 9), np.linspace(-1, 3, 5), np.linspace(0, 1, 3)] * 2
    values = [rng.standard_normal((9, w)).astype(np.float32) for w in widths]
    values[1][0] = 0.0  # exact zeros
    values[2][:, 0] = [0.0, 1.0, 0.5, -1.0, 2.0, 3.0, 1.0, 0.0, 0.25]  # on the edges, outside
    if bad is not None:
        values[3][4, 2] = bad  # that object's group falls back to the torch fold
    objs = _objects(widths, 9, edges, rng, values)
    # records [0, 1] and [2, 3]: a non-finite value sends its whole record to the torch fold
    got = [g for rec in exact.finish_exact_many([objs[:2], objs[2:]]) for g in rec]
    for i, g in enumerate(got):
        same = _objects(widths, 9, edges, rng, values)
        want = st.compute_many(same[:2] if i < 2 else same[2:])[i % 2]
        assert g.keys() == want.keys()
        for k in g:
            np.testing.assert_array_equal(g[k], want[k].numpy(), err_msg=k)


def test_histograms_numpy_equals_one_site_at_a_time():
    rng = np.random.default_rng(5)
    widths = [4, 1, 6]
    edges = [np.linspace(-1, 1, 11), np.linspace(0, 3, 4), np.linspace(-5, 5, 21)]
    block = (rng.standard_normal((50, 11)) * 2).astype(np.float32)
    block[0, :4] = [-1.0, 1.0, 0.2, -0.2]  # exactly on edges
    got = exact._histograms_numpy(block, widths, edges)
    start = 0
    for w, e, g in zip(widths, edges, got, strict=True):
        np.testing.assert_array_equal(g, exact._histogram_numpy(block[:, start : start + w], e))
        start += w


@pytest.mark.parametrize("bad", [False, True])
def test_finish_exact_slices_gives_finish_exact_many_bits_slice_by_slice(monkeypatch, bad):
    """Every statistic of a wide site by slices of units equals the all-at-once fold to the
    bit; with NaN and ±inf in some columns (``bad``: torch's reductions, whose rounding
    depends on the block's width) within float32 rounding, counts and extremes exact. The
    slices' histograms add up to the site's."""
    from icstools.functional import exact
    from icstools.functional.statistics import ActivationStatistics

    monkeypatch.setattr(exact, "SLICE_UNITS", 7)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 50, generator=g) * 2
    x[:, 3] = 0.0
    if bad:
        x[1, 10], x[2, 11], x[0, 40] = math.nan, math.inf, -math.inf
    stats = ActivationStatistics(np.linspace(-3, 3, 9), 1, sat_threshold=1.5)
    stats.update(x[:2])
    stats.update(x[2:])
    ((whole,),) = exact.finish_exact_many([[stats]])
    slices = list(exact.finish_exact_slices(stats))
    assert [c.start for c, _ in slices] == list(range(0, 50, 7))
    for field, value in whole.items():
        if field == "hist":
            got = sum(out["hist"] for _, out in slices)
        else:
            got = np.concatenate([out[field] for _, out in slices])
        if bad and field in ("mean", "var", "skew", "kurt"):
            np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6, err_msg=field)
        else:
            np.testing.assert_array_equal(got.view(np.uint8), value.view(np.uint8), err_msg=field)
    assert stats.calls == 2 and stats.exact_on_host  # left as it was

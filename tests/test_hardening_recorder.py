"""Hardening of the recorder: empty site tensors, logged names, the user's exception, meta
tensors, sites that never get a floating-point tensor, a probe of the wrong shape."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import icstools
import icstools.store
from icstools import Recorder
from icstools.functional.statistics import ActivationStatistics

STATS = ("mean", "var", "skew", "kurt", "min", "max", "zero_frac", "nonfinite", "quantile_value")


# --------------------------------------------------------------------------------------------
# 1. a site that sees no values in a step (an expert without tokens, a zero-size batch)
# --------------------------------------------------------------------------------------------


class _Experts(nn.Module):
    """Two experts: a token goes to expert 1 when its first feature is positive (a mixture of
    experts with a hard router). ``empty_call``: expert 1 is first called on no tokens."""

    def __init__(self, empty_call: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.experts = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.out = nn.Linear(8, 2)
        self.empty_call = empty_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.inp(x))
        to_1 = x[:, 0] > 0
        if self.empty_call:
            self.experts[1](h[:0])  # a call with no tokens, pooled with the real one
        y = torch.zeros_like(h)
        y[~to_1] = self.experts[0](h[~to_1])
        y[to_1] = self.experts[1](h[to_1])
        return self.out(y)


def _batches(steps: int, empty_at: set[int]) -> list[torch.Tensor]:
    """Batches of 12 tokens; at ``empty_at`` steps no token goes to expert 1."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for t in range(steps):
        x = torch.randn(12, 4, generator=gen)
        x[:, 0] = x[:, 0].abs() * (-1 if t in empty_at else 1)
        if t not in empty_at:
            x[::3, 0] *= -1  # both experts get tokens
        out.append(x)
    return out


def _run_experts(model: nn.Module, batches: list[torch.Tensor], **kwargs) -> Recorder:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, ["experts.0", "experts.1"], optimizer=opt, **kwargs)
    with rec:
        for x in batches:
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
    return rec


def test_a_step_without_values_at_a_site_is_undefined_not_diverged(tmp_path):
    torch.manual_seed(0)
    model = _Experts()
    batches = _batches(3, empty_at={1})
    rec = _run_experts(model, batches, path=tmp_path / "run.zarr")
    ds = icstools.open_run(tmp_path / "run.zarr")
    assert np.isfinite(ds.loss.values).all()
    assert "diverged_step" not in ds.attrs and rec.diverged_step is None
    e1 = ds.sel(source="train", step=1).isel(unit=ds.unit_site.values == "experts.1:output")
    assert (e1["count"].values == 0).all()
    for k in STATS:  # undefined over no values (nonfinite too: not "all values non-finite")
        assert np.isnan(e1[k].values).all(), (k, e1[k].values)
    assert (e1["hist"].sel(site="experts.1:output").values == 0).all()
    assert int(e1["calls"].sel(site="experts.1:output")) == 1
    # the other expert, and the other steps, are unaffected: 12 tokens in all, all finite
    e0 = ds.sel(source="train").isel(unit=ds.unit_site.values == "experts.0:output")
    e1_all = ds.sel(source="train").isel(unit=ds.unit_site.values == "experts.1:output")
    assert (e0["count"].sel(step=1).values == 12).all()
    assert (e0["count"] + e1_all["count"] == 12).all()
    assert (ds["nonfinite"].sel(step=[0, 2]).values == 0).all()


@pytest.mark.parametrize("quantile_sample", [8192, 4])
def test_an_empty_call_pooled_with_a_real_one_changes_nothing_but_calls(quantile_sample):
    batches = _batches(3, empty_at=set())
    runs = {}
    for empty_call in (False, True):
        torch.manual_seed(0)
        model = _Experts(empty_call=empty_call)
        runs[empty_call] = _run_experts(
            model, batches, quantile_sample=quantile_sample, calls="pool"
        )
    alone, pooled = (runs[k].to_dataset() for k in (False, True))
    for k in (*STATS, "count", "hist", "hist_edges", "sat_frac", "loss"):
        np.testing.assert_array_equal(pooled[k].values, alone[k].values, err_msg=k)
    calls = pooled["calls"].sel(source="train")
    np.testing.assert_array_equal(
        calls.sel(site="experts.1:output").values,
        alone["calls"].sel(source="train").sel(site="experts.1:output").values + 1,
    )


def test_statistics_of_no_values_are_nan_with_count_zero():
    stats = ActivationStatistics(np.linspace(-2, 2, 5), 1)
    stats.update(torch.empty(0, 3))
    out = {k: v.numpy() for k, v in stats.compute().items()}
    assert (out["count"] == 0).all() and (out["hist"] == 0).all()
    for k in STATS:
        assert np.isnan(out[k]).all(), (k, out[k])


@pytest.mark.parametrize("quantile_sample", [None, 8192, 5])
@pytest.mark.parametrize("empty_first", [True, False])
def test_statistics_pooling_an_empty_call_equal_the_values_alone(quantile_sample, empty_first):
    # three calls of 8 values per unit (beyond quantile_sample=5: sampled at a rate that the
    # first call with values fixes), and a call without values before or after them
    x = torch.randn(24, 3, generator=torch.Generator().manual_seed(1))
    kw = {"quantile_sample": quantile_sample}
    alone = ActivationStatistics(np.linspace(-2, 2, 5), 1, **kw)
    for part in x.split(8):
        alone.update(part)
    pooled = ActivationStatistics(np.linspace(-2, 2, 5), 1, **kw)
    empty = [torch.empty(0, 3)]
    for t in (empty + list(x.split(8))) if empty_first else (list(x.split(8)) + empty):
        pooled.update(t)
    want, got = alone.compute(), pooled.compute()
    for k in want:
        np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=k)
    assert pooled.calls == 4


# --------------------------------------------------------------------------------------------
# 2. names given to rec.log() must be able to be variables of the stored run
# --------------------------------------------------------------------------------------------


def _train_logging(rec: Recorder, model: nn.Module, opt, steps: int, **extra: float) -> None:
    gen = torch.Generator().manual_seed(3)
    with rec:
        for _ in range(steps):
            loss = model(torch.randn(8, 4, generator=gen)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss, **extra)


@pytest.mark.parametrize(
    "name",
    ["acc/train", ".zattrs", "/abs", "a//b", "..", ".hidden", "", "a b", "x\\y", "é", "a" * 129],
)
def test_log_rejects_a_name_that_cannot_be_a_variable_at_once(tmp_path, name):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, optimizer=opt, path=tmp_path / "run.zarr", chunk_steps=2)
    with rec:
        loss = model(torch.randn(8, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with pytest.raises(icstools.RecorderError, match="letters, digits") as info:
            rec.log(loss=loss, **{name: 0.5})
        assert repr(name) in str(info.value)
        rec.log(loss=loss)  # the run goes on
    ds = icstools.open_run(tmp_path / "run.zarr")  # and its store was written
    assert ds.sizes["step"] == 1 and np.isfinite(ds.loss.values).all()


def test_valid_logged_names_round_trip_through_the_store(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, optimizer=opt, path=tmp_path / "run.zarr", chunk_steps=2)
    names = {"acc_train": 0.25, "test-acc": 0.5, "lr2": 0.75, "val.acc": 1.5, "Top1": 2.0}
    names["n" * 128] = 3.0
    _train_logging(rec, model, opt, 3, **names)
    ds = icstools.open_run(tmp_path / "run.zarr")
    assert ds.sizes["step"] == 3
    for name, value in names.items():
        assert ds[name].dims == ("step",), name
        np.testing.assert_array_equal(ds[name].values, [value] * 3, err_msg=name)


# --------------------------------------------------------------------------------------------
# 3. the training loop's exception is never replaced by a failure of the store
# --------------------------------------------------------------------------------------------


def _train_until_store_breaks(tmp_path, fail: BaseException | None) -> Recorder:
    """Two steps committed, then the store directory is replaced by a file (its disk is gone),
    two more steps, then the loop raises ``fail`` (or ends normally)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.zarr"
    rec = Recorder(model, optimizer=opt, path=path, chunk_steps=2)
    with rec:
        for step in range(4):
            loss = model(torch.randn(8, 4)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
            if step == 1:
                rec.flush()
                assert rec.n_committed == 2
                shutil.rmtree(path)
                path.write_text("not a directory any more")
        if fail is not None:
            raise fail
    return rec


def test_the_loops_exception_propagates_when_the_store_failed_too(tmp_path):
    bug = ValueError("the training loop's own bug")
    with (
        pytest.raises(ValueError, match="the training loop's own bug") as info,
        pytest.warns(UserWarning, match=r"StoreError") as warned,
    ):
        _train_until_store_breaks(tmp_path, bug)
    assert info.value is bug
    notes = getattr(bug, "__notes__", [])
    assert any("StoreError" in n and "run.zarr" in n for n in notes), notes
    assert any("run.zarr" in str(w.message) for w in warned)


def test_a_store_failure_still_raises_when_the_loop_did_not(tmp_path):
    with pytest.raises(icstools.store.StoreError, match=r"run\.zarr"):
        _train_until_store_breaks(tmp_path, None)


def test_the_loops_exception_propagates_even_with_warnings_as_errors(tmp_path):
    bug = KeyError("the loop's key")
    with warnings.catch_warnings(), pytest.raises(KeyError) as info:
        warnings.simplefilter("error")
        _train_until_store_breaks(tmp_path, bug)
    assert info.value is bug and any("StoreError" in n for n in bug.__notes__)


# --------------------------------------------------------------------------------------------
# 5. tensors on the meta device have no data: refused at attach, naming the tensor
# --------------------------------------------------------------------------------------------


class _MetaBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(3, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x)) * self.scale


@pytest.mark.parametrize(
    ("make", "offender"),
    [
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.Sigmoid()).to("meta"), "parameter '0.weight'"),
        (_MetaBuffer, "buffer 'scale'"),
    ],
)
@pytest.mark.parametrize("how", ["with", "attach"])
def test_a_model_on_the_meta_device_is_refused_at_attach(make, offender, how):
    model = make()
    rec = Recorder(model, "*", role="output", probe=(torch.randn(2, 4),))
    with pytest.raises(icstools.RecorderError) as info:
        if how == "with":
            with rec:
                model(torch.randn(2, 4, device="meta"))
        else:
            rec.attach()
    msg = str(info.value)
    assert offender in msg and "meta" in msg and "CPU" in msg, msg
    assert not rec.attached and not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize(
    ("probe", "offender"),
    [
        (torch.randn(2, 4, device="meta"), "the probe is"),
        ((torch.randn(2, 4, device="meta"),), "the probe[0] is"),
        ({"input": torch.randn(2, 4, device="meta")}, "the probe['input'] is"),
    ],
)
def test_a_probe_on_the_meta_device_is_refused_at_attach(probe, offender):
    model = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid())
    rec = Recorder(model, probe=probe)
    with pytest.raises(icstools.RecorderError, match="meta") as info, rec:
        pass
    assert offender in str(info.value) and "CPU" in str(info.value)
    # the same probe on the CPU is fine
    with Recorder(model, probe=torch.randn(2, 4)):
        pass


# --------------------------------------------------------------------------------------------
# 6. a selected site that never gets a floating-point tensor is named in a warning
# --------------------------------------------------------------------------------------------


class _Branchy(nn.Module):
    """An embedding (integer input) and a branch that never runs in training."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(self.emb(tokens)))


def test_sites_without_a_floating_point_tensor_are_warned_about_once():
    model = _Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sites = ["emb:input", "emb:output", "fc:input", "unused:input"]
    rec = Recorder(model, sites, optimizer=opt)
    gen = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match="emb:input") as warned, rec:
        for _ in range(4):
            loss = model(torch.randint(0, 10, (8,), generator=gen)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
    ours = [w for w in warned if "not recorded" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in warned]  # at the first record only
    msg = str(ours[0].message)
    assert "'emb:input'" in msg and "'unused:input'" in msg and "fc:input" not in msg
    assert "floating-point" in msg and "output" in msg  # why, and what to do
    ds = rec.to_dataset()
    assert json.loads(ds.attrs["sites_not_recorded"]) == ["emb:input", "unused:input"]
    assert list(ds.site.values) == ["emb:output", "fc:input"] and ds.sizes["step"] == 4


def test_no_warning_when_every_selected_site_is_recorded():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    rec = Recorder(model)
    with rec:  # pytest turns any warning into an error
        model(torch.randn(5, 4))
    assert json.loads(rec.to_dataset().attrs["sites_not_recorded"]) == []


# --------------------------------------------------------------------------------------------
# 7. a probe the model cannot take: an error naming the probe, nothing recorded lost
# --------------------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))


def _steps(rec: Recorder, model: nn.Module, opt, steps: range) -> None:
    for t in steps:
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(t))
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.log(loss=loss)


SITES = ["0:input", "1:input", "2:input"]
GOOD = torch.randn(6, 4, generator=torch.Generator().manual_seed(9))
BAD = torch.randn(6, 3, generator=torch.Generator().manual_seed(9))


def _reference(steps: int, **kwargs) -> object:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, SITES, optimizer=opt, probe=GOOD, probe_sample=4, **kwargs)
    with rec:
        _steps(rec, model, opt, range(steps))
    return rec.to_dataset()


def _assert_same_records(got, want) -> None:
    assert got.sizes == want.sizes
    for k in want.data_vars:
        np.testing.assert_array_equal(got[k].values, want[k].values, err_msg=k)
    for k in ("hist_edges", "site_units"):
        np.testing.assert_array_equal(got[k].values, want[k].values, err_msg=k)


def test_a_probe_of_the_wrong_shape_is_named_and_the_run_can_go_on():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = [BAD]  # positional arguments, fixed by the user after the error
    rec = Recorder(model, SITES, optimizer=opt, probe=probe, probe_sample=4)
    with rec:
        with pytest.raises(icstools.RecorderError, match="probe") as info:
            _steps(rec, model, opt, range(1))
        msg = str(info.value)
        assert "(6, 3)" in msg and "mat1 and mat2" in msg, msg
        assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error
        assert rec.step == 0 and rec.n_records == 0
        probe[0] = GOOD
        _steps(rec, model, opt, range(3))
    _assert_same_records(rec.to_dataset(), _reference(3))


def test_a_probe_failing_later_loses_no_record(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = {"input": GOOD}  # keyword arguments of nn.Sequential.forward
    rec = Recorder(model, SITES, optimizer=opt, probe=probe, probe_sample=4, path=tmp_path / "r")
    with rec:
        _steps(rec, model, opt, range(2))
        probe["input"] = BAD
        with pytest.raises(icstools.RecorderError, match=r"probe.*'input': \(6, 3\)"):
            _steps(rec, model, opt, range(2, 3))
        _assert_same_records(rec.to_dataset(), _reference(2))  # the earlier records
        probe["input"] = GOOD
        _steps(rec, model, opt, range(2, 4))
    _assert_same_records(
        icstools.open_run(tmp_path / "r").drop_vars(
            ["icstools_store_format", "n_committed"], errors="ignore"
        ),
        _reference(4),
    )

"""Recorder: hooks, steps, sources, schedule, pooling, side effects, divergence, lifetime."""

from __future__ import annotations

import copy
import gc
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

import icstools
from icstools import Recorder, RecorderError
from icstools.experiments import paper_mlp, small_cnn


def _train(model, steps, rec=None, *, lr=0.1, batch=16, din=784, seed=0, log=True, shape=None):
    """Plain SGD on random data; the data stream depends only on ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if rec is not None:
        rec.optimizer = opt
        rec.attach()
    try:
        for _ in range(steps):
            x = torch.rand(*(shape or (batch, din)), generator=gen)
            y = torch.randint(0, 10, (x.shape[0],), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if rec is not None and log:
                rec.log(loss=loss)
    finally:
        if rec is not None:
            rec.detach()
    return opt


def _capture(model, names, role="input"):
    """Independent capture of site tensors with our own hooks: {name: [tensor per call]}."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for n in names:
        m = model.get_submodule(n)
        if role == "input":
            handles.append(
                m.register_forward_pre_hook(
                    lambda mod, a, n=n: store[n].append(a[0].detach().clone())
                )
            )
        else:
            handles.append(
                m.register_forward_hook(lambda mod, a, o, n=n: store[n].append(o.detach().clone()))
            )
    return store, handles


def _np_units(t: torch.Tensor, unit_dim: int) -> np.ndarray:
    return t.movedim(unit_dim, -1).reshape(-1, t.shape[unit_dim]).double().numpy()  # [n, units]


def _close(got, want, rtol, atol, what):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    bad = ~(np.abs(got - want) <= atol + rtol * np.abs(want))
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} mismatches, e.g. got {got[bad][:3]} want {want[bad][:3]}"
    )


def _check_against_numpy(ds, source, step, site, values: np.ndarray, rtol=2e-4):
    """Recorded statistics of one site at one step equal numpy/scipy on the captured values."""
    sel = ds.sel(source=source, step=step).where(ds.unit_site == site, drop=True)
    scale = np.maximum(np.abs(values).max(0), 1e-6)
    _close(sel["mean"], values.mean(0), rtol, 1e-5 * scale, "mean")
    _close(sel["var"], values.var(0), rtol, 1e-6 * scale**2, "var")
    _close(sel["min"], values.min(0), 1e-6, 0, "min")
    _close(sel["max"], values.max(0), 1e-6, 0, "max")
    resolved = values.std(0) > 1e-3 * scale
    skew, kurt = scipy.stats.skew(values, axis=0), scipy.stats.kurtosis(values, axis=0)
    _close(sel["skew"].values[resolved], skew[resolved], 1e-3, 1e-3, "skew")
    _close(sel["kurt"].values[resolved], kurt[resolved], 1e-3, 1e-3, "kurt")
    q = ds["quantile"].values
    want_q = np.quantile(values, q, axis=0).T  # [units, nq]
    _close(sel["quantile_value"].values, want_q, 1e-5, 1e-5 * scale[:, None], "quantile_value")
    _close(sel["zero_frac"], (values == 0).mean(0), 0, 1e-7, "zero_frac")
    assert int(sel["count"].values[0]) == values.shape[0]


# --------------------------------------------------------------------------- steps & sources
def test_records_match_numpy_on_captured_tensors_for_train_and_probe():
    torch.manual_seed(0)
    model = paper_mlp(bn=True, widths=(32, 16))
    probe = torch.rand(50, 784, generator=torch.Generator().manual_seed(9))
    rec = Recorder(model, nn.Sigmoid, role="input", every=2, probe=probe)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Sigmoid)]
    captured, handles = _capture(model, names)
    try:
        _train(model, 5, rec)
    finally:
        for h in handles:
            h.remove()
    ds = rec.to_dataset()
    assert ds.step.values.tolist() == [0, 2, 4]
    assert list(ds.source.values) == ["train", "probe"]
    # Per step: the probe forward runs first, then the training forward (record steps only).
    # Calls captured at step t: unscheduled steps have 1 call (train), scheduled ones 2.
    calls_per_step = [2, 1, 2, 1, 2]
    it = 0
    for step, n_calls in enumerate(calls_per_step):
        for name in names:
            site = f"{name}:input"
            if n_calls == 2:
                probe_vals = _np_units(captured[name][it], 1)
                train_vals = _np_units(captured[name][it + 1], 1)
                _check_against_numpy(ds, "probe", step, site, probe_vals)
                _check_against_numpy(ds, "train", step, site, train_vals)
        it += n_calls
    assert (ds.calls.values == 1).all()
    assert np.isfinite(ds.loss.values).all() and (ds.lr.values == 0.1).all()


def test_probe_has_no_side_effect_on_training_bit_identical():
    def build():
        torch.manual_seed(1)
        m = paper_mlp(bn=True, widths=(32, 32))
        m.insert(2, nn.Dropout(0.3))  # consumes the RNG in train mode
        return m

    plain = build()
    _train(plain, 12)
    for mode in ("train", "eval"):
        watched = build()
        rec = Recorder(watched, every=3, probe=torch.rand(40, 784), probe_mode=mode)
        torch.manual_seed(1234)  # both runs use the same global RNG stream from here
        _train(watched, 12, rec)
        torch.manual_seed(1234)
        plain = build()
        torch.manual_seed(1234)
        _train(plain, 12)
        for (n, a), (_, b) in zip(
            plain.state_dict().items(), watched.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), f"{n} differs with the probe in {mode} mode"
        assert watched.training and all(m.training for m in watched.modules())
        assert rec.to_dataset().sizes["step"] == 4


def test_eval_and_no_grad_forwards_are_not_recorded_as_train():
    model = paper_mlp(bn=True, widths=(8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(10, 784)
    with Recorder(model, every=1, optimizer=opt) as rec:
        for _ in range(3):
            loss = model(x).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.eval()
            model(x)
            model.train()
            with torch.no_grad():
                model(x)
    ds = rec.to_dataset()
    assert ds.calls.sel(source="train").values.ravel().tolist() == [1, 1, 1]


def test_gradient_accumulation_and_module_called_twice_are_pooled_not_overwritten():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.act(self.fc(self.act(self.fc(x))))

    torch.manual_seed(0)
    model = Twice()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    captured, handles = _capture(model, ["fc"], role="output")
    rec = Recorder(model, "fc", every=1, optimizer=opt, calls="pool")
    with rec:
        for _ in range(2):
            opt.zero_grad()
            for _ in range(2):  # two micro-batches per optimizer step
                model(torch.randn(5, 6)).sum().backward()
            opt.step()
    for h in handles:
        h.remove()
    ds = rec.to_dataset()
    assert ds.calls.sel(source="train").values.ravel().tolist() == [4, 4]
    for step in (0, 1):
        values = np.concatenate([_np_units(t, 1) for t in captured["fc"][4 * step : 4 * step + 4]])
        _check_against_numpy(ds, "train", step, "fc:output", values)


def test_calls_separate_keeps_each_call_of_a_shared_module_apart():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    torch.manual_seed(0)
    model = Twice()
    captured, handles = _capture(model, ["fc"], role="output")
    rec = Recorder(model, "fc", every=1, calls="separate")
    with rec:
        for _ in range(2):
            model(torch.randn(7, 4)).sum().backward()
            rec.step_done()
    for h in handles:
        h.remove()
    ds = rec.to_dataset()
    assert list(ds.site.values) == ["fc:output#0", "fc:output#1"]
    assert (ds.calls.values == 1).all()
    for step in (0, 1):
        for k in (0, 1):
            values = _np_units(captured["fc"][2 * step + k], 1)
            _check_against_numpy(ds, "train", step, f"fc:output#{k}", values)
    with pytest.raises(ValueError, match="calls"):
        Recorder(model, "fc", calls="split")


def test_schedule_callable_and_manual_steps_without_optimizer():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    rec = Recorder(model, every=lambda s: s in (1, 4))
    with rec:
        for _ in range(6):
            model(torch.randn(2, 3)).sum().backward()
            rec.step_done()
            rec.log(loss=1.0)
    ds = rec.to_dataset()
    assert ds.step.values.tolist() == [1, 4]
    assert ds.loss.values.tolist() == [1.0, 1.0]
    assert rec.step == 6
    with pytest.raises(RecorderError, match="twice"):
        Recorder(model, optimizer=torch.optim.SGD(model.parameters(), lr=1)).step_done()


def test_log_before_or_after_optimizer_step_lands_on_the_same_record():
    for after in (True, False):
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with Recorder(model, every=2, optimizer=opt) as rec:
            for i in range(4):
                loss = model(torch.randn(2, 3)).sum()
                loss.backward()
                if not after:
                    rec.log(loss=float(i), extra=torch.tensor(2.0 * i))
                opt.step()
                if after:
                    rec.log(loss=float(i), extra=torch.tensor(2.0 * i))
        ds = rec.to_dataset()
        assert ds.loss.values.tolist() == [0.0, 2.0]
        assert ds.extra.values.tolist() == [0.0, 4.0]


# --------------------------------------------------------------------------- model zoo
class Residual(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, d), nn.Linear(d, d), nn.ReLU()

    def forward(self, x):
        return self.act(x + self.fc2(self.act(self.fc1(x))))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 7, batch_first=True)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        out, (_h, _c) = self.lstm(x)
        return self.head(torch.tanh(out[:, -1]))


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.GELU())
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.body(x)
        return {"logits": self.head(h), "features": h, "aux": None}


def _transformer():
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


ZOO = {
    "mlp": (lambda: paper_mlp(bn=False, widths=(16, 16)), (8, 784), None, nn.Sigmoid, "input"),
    "mlp-bn": (lambda: paper_mlp(bn=True, widths=(16, 16)), (8, 784), None, nn.Sigmoid, "input"),
    "cnn-bn-inplace-relu": (
        lambda: small_cnn((4, 6), in_channels=1),
        (4, 1, 12, 12),
        None,
        [nn.ReLU, nn.Conv2d],
        ("input", "output"),
    ),
    "residual": (lambda: nn.Sequential(Residual(), Residual()), (5, 8), None, nn.ReLU, "input"),
    "lstm": (LSTMNet, (3, 4, 5), None, ["lstm", "head"], ("input", "output")),
    "transformer": (
        _transformer,
        (3, 5, 8),
        None,
        ["layers.*.linear1", "layers.*.norm2"],
        "output",
    ),
    "dict-output": (DictNet, (5, 4), "logits", ["body.*", "head"], ("input", "output")),
}


@pytest.mark.parametrize("kind", list(ZOO))
def test_model_zoo_without_changes(kind):
    build, shape, key, sites, role = ZOO[kind]
    torch.manual_seed(0)
    model = build()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # the residual blocks reuse one ReLU: pooled on purpose here
    calls = "pool" if kind == "residual" else None
    rec = Recorder(model, sites, role=role, every=1, optimizer=opt, calls=calls)
    captured = {}
    handles = []
    for site in rec.sites:
        m = model.get_submodule(site.module_name)
        captured[site.name] = []
        if site.role == "input":
            handles.append(
                m.register_forward_pre_hook(
                    lambda mod, a, n=site.name: captured[n].append(a[0].detach().clone())
                )
            )
        else:
            handles.append(
                m.register_forward_hook(
                    lambda mod, a, o, n=site.name: captured[n].append(
                        icstools.sites.find_tensor(o).detach().clone()
                    )
                )
            )
    with rec:
        for _ in range(3):
            out = model(torch.randn(*shape))
            loss = (out[key] if key else out).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
    for h in handles:
        h.remove()
    ds = rec.to_dataset()
    assert set(ds.site.values) == {s.name for s in rec.sites}
    assert ds.sizes["step"] == 3
    assert np.isfinite(ds["mean"].values).all() and np.isfinite(ds["loss"].values).all()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # Each site's last step equals numpy on the tensors captured independently (pooled calls).
    for site in rec.sites:
        calls = int(ds.calls.sel(source="train", site=site.name)[-1])
        tensors = captured[site.name][-calls:]
        ud = int(ds.site_unit_dim.sel(site=site.name))
        values = np.concatenate([_np_units(t, ud) for t in tensors])
        _check_against_numpy(ds, "train", 2, site.name, values)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inplace_relu_input_and_conv_output_are_taken_before_the_relu():
    torch.manual_seed(0)
    model = small_cnn((3,), in_channels=1)
    rec = Recorder(model, ["0:output", "2:input", "2:output"], every=1)
    with rec:
        model(torch.randn(4, 1, 6, 6)).sum().backward()
        rec.step_done()
    ds = rec.to_dataset().sel(source="train", step=0)
    conv_min = float(ds["min"].where(ds.unit_site == "0:output", drop=True).min())
    relu_in_min = float(ds["min"].where(ds.unit_site == "2:input", drop=True).min())
    relu_out_min = float(ds["min"].where(ds.unit_site == "2:output", drop=True).min())
    assert conv_min < 0 and relu_in_min < 0 and relu_out_min == 0


# --------------------------------------------------------------------------- divergence
def test_divergence_is_recorded_not_raised():
    torch.manual_seed(0)
    # Unbounded ReLUs and a huge learning rate: weights, activations and loss overflow to inf/NaN.
    model = nn.Sequential(
        nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    rec = Recorder(model, nn.ReLU, role="input", every=1)
    _train(model, 30, rec, lr=1e6)
    ds = rec.to_dataset()
    assert ds.sizes["step"] == 30
    assert rec.diverged_step is not None and ds.attrs["diverged_step"] == rec.diverged_step
    first_bad = int(
        np.argmax(~np.isfinite(ds.loss.values) | (ds.nonfinite.max(("source", "unit")) > 0).values)
    )
    assert rec.diverged_step == int(ds.step[first_bad])
    assert (ds.nonfinite.isel(step=-1) > 0).any()


# --------------------------------------------------------------------------- lifetime
def test_hooks_removed_after_normal_exit_and_after_exception():
    model = paper_mlp(bn=True, widths=(8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def no_hooks():
        return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()) and not (
            opt._optimizer_step_post_hooks
        )

    with Recorder(model, every=1, optimizer=opt) as rec:
        assert not no_hooks() and rec.attached
        model(torch.rand(4, 784)).sum().backward()
        opt.step()
    assert no_hooks() and not rec.attached
    with pytest.raises(RuntimeError, match="boom"), Recorder(model, every=1, optimizer=opt) as rec:
        model(torch.rand(4, 784)).sum().backward()
        opt.step()
        raise RuntimeError("boom")
    assert no_hooks()
    assert rec.to_dataset().sizes["step"] == 1  # what was recorded before the error is kept


def test_no_activations_or_graphs_retained_over_many_steps(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))
    rec = Recorder(model, every=1, path=tmp_path / "run.zarr", chunk_steps=256)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec.optimizer = opt

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    counts = {}
    out_ref = None
    with rec:
        for step in range(5000):
            x = torch.randn(16, 20)
            out = model(x)
            loss = out.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
            if step in (500, 4999):
                counts[step] = live_tensors()
            if step == 100:
                import weakref

                out_ref = weakref.ref(out)
    assert out_ref is not None and out_ref() is None, "an activation of step 100 is still alive"
    assert counts[4999] <= counts[500] + 5, counts
    ds = icstools.open_run(tmp_path / "run.zarr")
    assert ds.sizes["step"] == 5000


# --------------------------------------------------------------------------- errors
def test_user_errors_are_clear():
    model = paper_mlp(bn=False, widths=(8,))
    with pytest.raises(
        icstools.SiteSelectionError, match=r"No module named '11'.*Closest modules: \['1'"
    ):
        Recorder(model, "11:input")
    with pytest.raises(icstools.SiteSelectionError, match=r"Role 'inptu'.*Expected one of"):
        Recorder(model, "1:inptu")
    with pytest.raises(ValueError, match="probe_mode"):
        Recorder(model, probe_mode="test")
    with pytest.raises(TypeError, match="probe"):
        Recorder(model, probe="not a tensor")
    with pytest.raises(ValueError, match="bins"):
        Recorder(model, bins=0)
    with pytest.raises(ValueError, match="chunk_steps"):
        Recorder(model, chunk_steps=1)
    with pytest.raises(TypeError, match="every"):
        Recorder(model, every="often")
    with pytest.raises(ValueError, match="every"):
        Recorder(model, every=0)
    with pytest.raises(ValueError, match="hist_range"):
        Recorder(model, hist_range=(1.0, -1.0))
    rec = Recorder(model)
    with pytest.raises(RecorderError, match="nothing was recorded"):
        rec.to_dataset()
    with pytest.raises(RecorderError, match="used by the run dataset"):
        rec.log(mean=1.0)
    with pytest.raises(RecorderError, match="scalar"):
        rec.log(loss=torch.ones(3))
    with rec, pytest.raises(RecorderError, match="already attached"):
        rec.attach()


def test_site_width_change_is_a_clear_error_and_keeps_earlier_records():
    model = nn.Sequential(nn.Identity(), nn.ReLU())
    rec = Recorder(model, "1:input", every=1)
    with pytest.raises(RecorderError, match="units"), rec:
        model(torch.randn(4, 3)).sum()
        rec.step_done()
        model(torch.randn(4, 5)).sum()
        rec.step_done()
        model(torch.randn(4, 5)).sum()  # closes the previous record -> width check
    assert rec.to_dataset().sizes["step"] == 1


def test_options_hist_range_saturation_unit_dim_quantiles():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Sigmoid())
    rec = Recorder(
        model,
        [nn.Tanh, nn.Sigmoid, "0"],
        role="input",
        every=1,
        hist_range={"1:*": (-2.0, 2.0)},
        saturation={"3:input": 0.5},
        quantiles=(0.25, 0.75),
        bins=8,
    )
    with rec:
        x = torch.randn(50, 5) * 3
        model(x)
        rec.step_done()
    ds = rec.to_dataset()
    np.testing.assert_allclose(ds.hist_edges.sel(site="1:input"), np.linspace(-2, 2, 9))
    assert ds.sat_threshold.sel(site="3:input") == 0.5
    assert math.isclose(
        float(ds.sat_threshold.sel(site="1:input")), icstools.functional.statistics.TANH_SATURATION
    )
    assert np.isnan(ds.sat_threshold.sel(site="0:input"))
    assert ds["quantile"].values.tolist() == [0.25, 0.75]
    assert ds.sizes["bin"] == 10
    x1 = model[0](x).detach().numpy()
    sat = (np.abs(x1) > icstools.functional.statistics.TANH_SATURATION).mean(0)
    got = ds.sat_frac.sel(source="train", step=0).where(ds.unit_site == "1:input", drop=True)
    np.testing.assert_allclose(got, sat)
    no_threshold = ds.sat_frac.where(ds.unit_site == "0:input", drop=True)
    assert no_threshold.isnull().all(), "sat_frac of a site without threshold is NaN, not 0"
    hist = ds.hist.sel(source="train", step=0, site="1:input").values
    inner, _ = np.histogram(x1.ravel(), bins=np.linspace(-2, 2, 9))
    assert hist[0] == (x1 < -2).sum() and hist[-1] == (x1 > 2).sum()
    np.testing.assert_array_equal(hist[1:-1], inner)


def test_store_and_memory_paths_give_the_same_dataset(tmp_path):
    results = []
    for path in (None, tmp_path / "r.zarr"):
        torch.manual_seed(0)
        model = paper_mlp(bn=True, widths=(16,))
        rec = Recorder(model, every=2, path=path, probe=torch.rand(20, 784), chunk_steps=4)
        _train(model, 11, rec)
        rec.close()
        results.append(rec.to_dataset())
    mem, disk = results
    assert disk.sizes["step"] == 6
    for name in mem.data_vars:
        np.testing.assert_array_equal(mem[name].values, disk[name].values, err_msg=name)
    reopened = icstools.open_run(tmp_path / "r.zarr")
    assert reopened.attrs["schema_version"] == 1 and "recorder_config" in reopened.attrs
    assert list(reopened.unit_site.values[:2]) == ["2:input", "2:input"]


def test_units_of_3d_tensors_follow_the_layout_of_the_producing_module():
    conv = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3))
    seq = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
    for model, x, site, units, unit_dim in (
        (conv, torch.randn(3, 2, 8), "1:input", 4, 1),  # [N, C, L]: channels
        (seq, torch.randn(3, 7, 5), "1:input", 6, 2),  # [batch, time, features]: features
    ):
        rec = Recorder(model, every=1)
        with rec:
            model(x).sum().backward()
            rec.step_done()
        ds = rec.to_dataset()
        assert int(ds.site_units.sel(site=site)) == units
        assert int(ds.site_unit_dim.sel(site=site)) == unit_dim
    rec = Recorder(conv, every=1, unit_dim={"1:input": 2})
    with rec:
        conv(torch.randn(3, 2, 8)).sum().backward()
        rec.step_done()
    assert int(rec.to_dataset().site_units.sel(site="1:input")) == 6


def test_activation_checkpoint_recomputation_is_not_recorded_twice():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(checkpoint(self.block, x, use_reentrant=False))

    torch.manual_seed(0)
    model = Checkpointed()
    captured, handles = _capture(model, ["block.1"])
    rec = Recorder(model, nn.Tanh, role="input", every=1)
    with rec:
        model(torch.randn(5, 6)).sum().backward()  # backward recomputes block (hooks fire)
        rec.step_done()
    for h in handles:
        h.remove()
    assert len(captured["block.1"]) == 2  # the forward and its recomputation
    ds = rec.to_dataset()
    assert ds.calls.sel(source="train").values.ravel().tolist() == [1]
    _check_against_numpy(ds, "train", 0, "block.1:input", _np_units(captured["block.1"][0], 1))


def test_site_hooks_stay_registered_and_idle_at_unscheduled_steps():
    """Registered once at attach (so that torch.compile traces them), removed at detach; an
    unscheduled step records nothing."""
    model = paper_mlp(bn=False, widths=(8,))
    sigmoid = model[1]
    seen = []
    model[0].register_forward_hook(lambda m, a, o: seen.append(len(sigmoid._forward_pre_hooks)))
    with Recorder(model, every=2) as rec:
        for _ in range(4):
            model(torch.rand(3, 784)).sum().backward()
            rec.step_done()
    assert seen == [1, 1, 1, 1]
    assert not sigmoid._forward_pre_hooks  # removed at detach
    assert rec.to_dataset().step.values.tolist() == [0, 2]


def test_probe_sample_keeps_the_same_probe_positions_of_every_unit_at_every_step():
    torch.manual_seed(0)
    model = small_cnn(channels=(4, 8), in_channels=1)
    probe = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    sites = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    rec = Recorder(model, sites, role="output", every=2, probe=probe, probe_sample=4)
    captured, handles = _capture(model, sites, role="output")
    try:
        _train(model, 3, rec, shape=(8, 1, 12, 12))
    finally:
        for h in handles:
            h.remove()
    ds = rec.to_dataset()
    assert ds["probe_sample"].dims == ("step", "sample", "unit")
    assert ds.sizes["sample"] == 4  # capped by probe_sample (fewest positions: 6 probe rows)
    calls = {0: 0, 2: 3}  # index of the probe call in the captured calls of each record step
    rows_seen: dict[str, set] = {}
    for step, call in calls.items():
        for name in sites:
            site = f"{name}:output"
            act = captured[name][call]
            rows = _np_units(act, 1).astype(np.float32)  # [positions, units]
            got = ds["probe_sample"].sel(step=step).where(ds.unit_site == site, drop=True).values
            # every kept sample is one whole position (all units of the site from one input)
            idx = []
            for sample in got:
                hit = np.flatnonzero((rows == sample).all(1))
                assert hit.size >= 1, f"{site} step {step}: sample is not a probe position"
                idx.append(int(hit[0]))
            assert len(set(idx)) == len(idx), "positions are drawn without replacement"
            rows_seen.setdefault(site, set()).add(tuple(idx))
    assert all(len(v) == 1 for v in rows_seen.values()), "positions must stay fixed over steps"


def test_probe_sample_options_are_checked():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(RecorderError, match="needs a probe"):
        Recorder(model, probe_sample=5)
    with pytest.raises(ValueError, match="≥ 1"):
        Recorder(model, probe=torch.randn(3, 2), probe_sample=0)
    with pytest.raises(TypeError, match="int or None"):
        Recorder(model, probe=torch.randn(3, 2), probe_sample=2.5)

"""Experiment presets, the training loop and the runner (icstools.experiments).

Every preset runs end to end on real MNIST (``$ICSTOOLS_DATA``, set by the Makefile; else
``../shared/data`` beside the checkout) in quick mode with a handful of steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import torch
from torch import nn

import icstools
from icstools.experiments import (
    DATA_SHAPES,
    PRESETS,
    NoisyBatchNorm1d,
    PresetError,
    fig1_lr_sweep,
    get_preset,
    load_factory,
    load_manifest,
    normalized_layers,
    paper_mlp,
    record_steps,
    run_preset,
    scale_invariance,
    set_noise_step,
    small_cnn,
    train,
    vgg_cnn,
)
from icstools.experiments.measures import generalization

ROOT = Path(__file__).parents[1]

MANIFEST_KEYS = {
    "preset",
    "description",
    "claims",
    "notes",
    "conditions",
    "seeds",
    "steps",
    "quick",
    "batch_size",
    "data",
    "probe_size",
    "record",
    "icstools_version",
    "torch_version",
    "created",
    "command",
    "call",
    "complete",
    "runs",
}
RUN_KEYS = {
    "condition",
    "seed",
    "path",
    "steps",
    "steps_done",
    "wall_time",
    "final_test_acc",
    "test_acc",
    "final_loss",
    "diverged",
    "diverged_step",
    "recorded_diverged_step",
    "records",
}
BASE_VARS = {"mean", "var", "quantile_value", "hist", "sat_frac", "loss", "lr", "test_acc"}

#: Variables each preset's runs must hold besides BASE_VARS.
PRESET_VARS = {
    "fig1": {"probe_sample", "grad_norm", "param_norm", "eff_lr"},
    "lr-sweep": {"grad_norm", "param_norm", "update_ratio"},
    "saturating": {"grad_norm"},
    "scale-invariance": {"si_output", "si_input_grad", "si_weight_grad", "si_eps_effect", "eff_lr"},
    "jacobian": {"jac_sv", "jac_mean_sq", "jac_frac_near_one", "grad_norm"},
    "noisy-bn": {"probe_sample", "ics_l2", "ics_cos", "loss_variation", "beta_smoothness"},
    "cnn": {"probe_sample", "grad_norm"},
    "regularization": {
        "gen_train_loss", "gen_train_acc", "gen_test_loss", "gen_test_acc", "gen_gap_acc",
        "gen_gap_loss",
    },
    "landscape-cnn": {"loss_variation", "beta_smoothness", "landscape_grad_diff"},
}  # fmt: skip
#: Steps of the quick test runs (seconds each).
QUICK_STEPS = {"cnn": 2, "jacobian": 3, "regularization": 2, "landscape-cnn": 2}


@pytest.fixture(autouse=True)
def _mnist(monkeypatch):
    """Real MNIST: $ICSTOOLS_DATA, else ../shared/data beside the checkout (as the Makefile)."""
    if not os.environ.get("ICSTOOLS_DATA"):
        monkeypatch.setenv("ICSTOOLS_DATA", str(ROOT.parent / "shared" / "data"))


def _strict_json(path: Path) -> dict:
    def no_constants(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


# ------------------------------------------------------------------------------------ presets
def test_presets_are_complete_definitions():
    assert list(PRESETS) == [
        "fig1",
        "lr-sweep",
        "saturating",
        "scale-invariance",
        "jacobian",
        "noisy-bn",
        "cnn",
        "regularization",
        "landscape-cnn",
    ]
    for name, p in PRESETS.items():
        assert p.name == name and "\n" not in p.description and len(p.description) <= 90
        assert p.claims and all(isinstance(c, str) and c for c in p.claims)
        assert p.notes, f"{name}: the preset's docstring documents it"
        assert p.seeds == tuple(range(10 if name == "fig1" else 5)), name
        assert p.steps > p.quick_steps >= 2
        shape = DATA_SHAPES[p.data]
        for cond in p.conditions:
            torch.manual_seed(0)
            model = cond.build()
            assert model(torch.rand(4, *shape)).shape == (4, 10), (name, cond.name)
            settings = cond.settings()
            json.dumps(settings, allow_nan=False)
            assert load_factory(settings["model"]) is cond.factory


def test_fig1_preset_is_the_papers_set_up():
    p = get_preset("fig1")
    assert p.steps == 50_000 and p.batch_size == 60 and p.probe_size == 1000
    assert [c.name for c in p.conditions] == ["baseline", "bn"]
    assert p.record["probe_sample"] == 1000 and p.record["gradients"] is True
    base, bn = (c.build() for c in p.conditions)
    assert [type(m).__name__ for m in bn[:3]] == ["Linear", "BatchNorm1d", "Sigmoid"]
    assert bn[0].bias is None and base[0].bias is not None
    assert [m.out_features for m in base if isinstance(m, nn.Linear)] == [100, 100, 100, 10]
    assert "fig1_lr_sweep" in p.notes and "0.9707" in p.notes  # the sweep's figures


def test_lr_sweep_rates_are_multiples_of_the_base_rates():
    p = get_preset("lr-sweep")
    rates = {c.name: c.lr for c in p.conditions}
    for act, base in (
        ("sigmoid", icstools.experiments.FIG1_LR),
        ("relu", icstools.experiments.RELU_LR),
    ):
        for label in ("baseline", "bn"):
            prefix = "" if act == "sigmoid" else f"{act}-"
            assert [rates[f"{prefix}{label}-x{m}"] for m in (1, 5, 30)] == pytest.approx(
                [base, 5 * base, 30 * base]
            )


def test_get_preset_unknown_lists_the_valid_ones():
    with pytest.raises(PresetError, match="valid presets: fig1, lr-sweep") as info:
        get_preset("fig2")
    assert isinstance(info.value, ValueError)
    with pytest.raises(TypeError):
        get_preset(3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"seeds": []}, "seeds"),
        ({"seeds": 0}, "seeds"),
        ({"seeds": [1, 1]}, "repeat"),
        ({"conditions": ["nope"]}, "no condition 'nope'"),
        ({"threads": 0}, "threads"),
    ],
)
def test_run_preset_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(PresetError, match=match):
        run_preset("fig1", out=tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "fig1" / "baseline").exists()


def test_record_steps():
    assert record_steps(1000, 4) == [0, 1, 2, 5, 10, 20, 50, 100, 200, 250, 500, 750, 999]
    assert record_steps(1000, 4, early=False) == [0, 250, 500, 750, 999]
    assert record_steps(50_000, 100)[-3:] == [49_000, 49_500, 49_999]
    assert len(record_steps(50_000, 100)) == 109
    assert record_steps(1, 10) == [0]
    with pytest.raises(ValueError):
        record_steps(0, 10)


# ------------------------------------------------------------------------- quick runs, e2e
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_runs_end_to_end_in_quick_mode(tmp_path, name):
    preset = get_preset(name)
    steps = QUICK_STEPS.get(name, 4)
    manifest = run_preset(name, quick=True, steps=steps, out=tmp_path, progress=False)
    folder = tmp_path / name
    data = _strict_json(folder / "manifest.json")
    assert set(data) == MANIFEST_KEYS
    assert data["preset"] == name and data["complete"] is True and data["quick"] is True
    assert data["seeds"] == [preset.seeds[0]] and data["steps"] == steps
    assert data["icstools_version"] == icstools.__version__
    assert set(data["conditions"]) == {c.name for c in preset.conditions}
    assert len(data["runs"]) == len(preset.conditions)
    assert manifest.complete and load_manifest(folder).to_dict() == data
    expected = BASE_VARS | PRESET_VARS[name]
    for run in data["runs"]:
        assert set(run) == RUN_KEYS
        cond = preset.condition(run["condition"])
        n = steps if cond.steps is None else min(cond.steps, steps)
        assert run["path"] == f"{cond.name}/seed-{preset.seeds[0]}.zarr"
        assert run["steps"] == run["steps_done"] == n and run["diverged"] is False
        assert 0.0 <= run["final_test_acc"] <= 1.0 and run["wall_time"] > 0
        ds = icstools.open_run(folder / run["path"])
        missing = expected - set(ds.data_vars)
        if name == "scale-invariance" and cond.name == "baseline":
            missing -= {"si_output", "si_input_grad", "si_weight_grad", "si_eps_effect", "eff_lr"}
        assert not missing, (cond.name, missing)
        assert run["records"] == ds.sizes["step"] and list(ds.step.values) == record_steps(
            n, min(preset.records, preset.quick_records)
        )
        assert "diverged_step" not in ds.attrs and run["recorded_diverged_step"] is None
        # test accuracy over training: in the manifest and, at the same steps, in the run
        if name == "cnn":  # units are channels, pooled over the batch and locations (§3.2)
            assert list(ds.site_units.values) == [16, 32, 32]
            count = ds["count"].sel(source="probe").isel(step=0, unit=0)
            assert int(count) == preset.probe_size * 28 * 28
        acc = dict(zip(run["test_acc"]["step"], run["test_acc"]["value"], strict=True))
        assert 0 in acc
        logged = ds["test_acc"].to_series().dropna()
        assert {int(s): v for s, v in logged.items()} == pytest.approx(acc)


def test_jacobian_preset_at_init_by_depth(tmp_path):
    names = ["init-bn-depth2", "init-bn-depth4", "init-baseline-depth2"]
    m = run_preset("jacobian", quick=True, steps=5, conditions=names, out=tmp_path, progress=False)
    assert [r.steps_done for r in m.runs] == [1, 1, 1]  # at initialization: one step
    blocks = {}
    for r in m.runs:
        ds = icstools.open_run(m.run_path(r))
        assert list(ds.step.values) == [0]
        blocks[r.condition] = list(ds.block.values)
        assert np.isfinite(ds["jac_mean_sq"].values).all() and "grad_norm" in ds
    assert blocks["init-bn-depth4"][-1] == "input->output"
    assert len(blocks["init-bn-depth4"]) == len(blocks["init-bn-depth2"]) + 2
    assert (
        json.loads(icstools.open_run(m.run_path(m.runs[0])).attrs["recorder_config"])["jacobian_bn"]
        == "full"
    )


def test_diverging_condition_is_a_result_not_an_error(tmp_path):
    """The ReLU network without BN at ×5 its best rate reaches machine infinity (§4.2.2)."""
    m = run_preset(
        "lr-sweep",
        quick=True,
        steps=60,
        conditions=["relu-baseline-x5"],
        out=tmp_path,
        progress=False,
    )
    (run,) = m.runs
    assert run.diverged and run.diverged_step is not None
    assert run.diverged_step < run.steps_done <= 60
    # it stopped at the first recorded step at or after the divergence, which the store holds
    ds = icstools.open_run(m.run_path(run))
    assert int(ds.step[-1]) == run.steps_done - 1 >= run.diverged_step
    assert ds.attrs["diverged_step"] == run.recorded_diverged_step
    assert run.diverged_step <= run.recorded_diverged_step <= int(ds.step[-1])
    data = _strict_json(tmp_path / "lr-sweep" / "manifest.json")
    assert data["complete"] is True and data["runs"][0]["diverged"] is True
    assert "diverged" in m.summary() and f"at step {run.diverged_step}" in m.summary()


def test_runs_are_reproducible_per_seed(tmp_path):
    p = get_preset("noisy-bn")
    kw = {"quick": True, "steps": 4, "conditions": ["noisy-bn"], "progress": False}
    a = run_preset(p, out=tmp_path / "a", **kw)
    b = run_preset(p, out=tmp_path / "b", **kw)
    c = run_preset(p, out=tmp_path / "c", seeds=[1], **kw)
    da, db, dc = (icstools.open_run(m.run_path(m.runs[0])) for m in (a, b, c))
    for var in ("loss", "test_acc", "mean", "quantile_value", "ics_l2", "param_norm"):
        np.testing.assert_array_equal(da[var].values, db[var].values, err_msg=var)
    assert not np.array_equal(da["loss"].values, dc["loss"].values)
    assert a.runs[0].final_test_acc == b.runs[0].final_test_acc


def test_summary_and_manifest_of_several_seeds(tmp_path):
    m = run_preset(
        "fig1",
        steps=2,
        seeds=2,
        conditions=["bn"],
        out=tmp_path,
        progress=False,
        command=["icstools", "run", "fig1"],
    )
    assert [r.seed for r in m.runs] == [0, 1] and not m.quick
    text = m.summary()
    assert "test acc (mean ± sd)" in text and "bn" in text
    data = _strict_json(m.path)
    assert data["command"] == ["icstools", "run", "fig1"]
    assert data["call"].startswith("icstools.experiments.run_preset('fig1'")
    assert data["record"]["records"] == 100  # not quick: the preset's own schedule
    assert [r["path"] for r in data["runs"]] == ["bn/seed-0.zarr", "bn/seed-1.zarr"]
    assert sorted(p.name for p in (tmp_path / "fig1").iterdir()) == ["bn", "manifest.json"]
    runs = load_manifest(m.path).open_runs()
    assert list(runs) == ["bn"] and [int(ds.attrs["seed"]) for ds in runs["bn"]] == [0, 1]
    assert all(ds.sizes["step"] == 2 for ds in runs["bn"])


# ------------------------------------------------------------------------------ training loop
def test_train_logs_test_accuracy_at_recorded_steps():
    torch.manual_seed(0)
    model = paper_mlp(bn=True)

    def make(model, opt, probe):
        return icstools.Recorder(model, every=2, optimizer=opt, probe=probe[:50])

    r = train(model, 6, lr=1.0, eval_at=2, eval_size=500, recorder=make, probe_size=50)
    assert sorted(r.accuracy) == [0, 2, 4, 6] and r.steps_done == 6
    ds = r.recorder.to_dataset()
    assert list(ds.step.values) == [0, 2, 4]
    np.testing.assert_allclose(ds["test_acc"].values, [r.accuracy[s] for s in (0, 2, 4)])
    assert r.diverged_step is None and math.isfinite(r.final_loss)


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"lr": 0.0}, ValueError),
        ({"lr": float("nan")}, ValueError),
        ({"lr": 0.1, "optimizer": "rmsprop"}, ValueError),
        ({"lr": 0.1, "data": "cifar"}, ValueError),
        ({"lr": 0.1, "batch_size": 0}, ValueError),
        ({"lr": 0.1, "measure": 3}, TypeError),
    ],
)
def test_train_rejects_bad_input(kwargs, exc):
    with pytest.raises(exc):
        train(paper_mlp(bn=False), 2, **kwargs)


def test_fig1_lr_sweep_rows():
    rows = fig1_lr_sweep((0.5,), steps=3, bn=(True,))
    assert len(rows) == 1
    assert set(rows[0]) == {"network", "lr", "seed", "test_acc", "diverged_step", "wall_time"}
    assert rows[0]["network"] == "bn" and rows[0]["lr"] == 0.5


# ------------------------------------------------------------------------------------ models
def test_paper_mlp_variants():
    m = paper_mlp(bn=False, widths=(8,) * 6, activation="tanh")
    assert sum(isinstance(x, nn.Tanh) for x in m) == 6
    assert isinstance(paper_mlp(bn=True, noise=True)[1], NoisyBatchNorm1d)
    with pytest.raises(ValueError, match="activation"):
        paper_mlp(bn=False, activation="gelu")
    with pytest.raises(ValueError, match="noise"):
        paper_mlp(bn=False, noise=True)


def test_dropout_flat_input_and_vgg_models():
    m = paper_mlp(bn=True, dropout=0.2)
    assert [type(x).__name__ for x in m[:4]] == ["Linear", "BatchNorm1d", "Sigmoid", "Dropout"]
    assert sum(isinstance(x, nn.Dropout) for x in m) == 3 and m[3].p == 0.2
    assert not any(isinstance(x, nn.Dropout) for x in paper_mlp(bn=True))
    for bad in (-0.1, 1.0, True, "0.2"):
        with pytest.raises(ValueError, match="dropout must be a probability"):
            paper_mlp(bn=False, dropout=bad)
    # the flat-input CNN is the image CNN after a reshape: same weights, same outputs
    torch.manual_seed(0)
    flat = small_cnn((4, 8), in_channels=1, pool=True, flat_input=True, dropout=0.1).eval()
    torch.manual_seed(0)
    image = small_cnn((4, 8), in_channels=1, pool=True, dropout=0.1).eval()
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(flat(x.reshape(3, 784)), image(x))
    assert sum(isinstance(y, nn.Dropout) for y in flat) == 2
    with pytest.raises(ValueError, match="in_channels=1"):
        small_cnn(in_channels=3, flat_input=True)
    # VGG-style: 8 convs in 4 stages, He-initialized (std √(2/fan_in)), BN or conv biases
    torch.manual_seed(0)
    v = vgg_cnn(((8, 8), (16, 16), (32, 32), (32, 32)), bn=False)
    convs = [c for c in v if isinstance(c, nn.Conv2d)]
    assert len(convs) == 8 and all(c.bias is not None and not c.bias.any() for c in convs)
    w = convs[-1].weight.detach()  # fan_in 32 × 9: std √(2/288) = 0.083
    assert float(w.std()) == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.05)
    assert sum(isinstance(c, nn.BatchNorm2d) for c in vgg_cnn()) == 6
    assert v(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="stages"):
        vgg_cnn(())


def test_generalization_measure_matches_numpy_and_has_no_side_effects():
    """Train/test loss and accuracy in eval mode against numpy on the same images."""
    from icstools.experiments.training import _load

    torch.manual_seed(0)
    model = paper_mlp(bn=True, dropout=0.5)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(torch.rand(60, 784))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(60, 784)
    rng = torch.get_rng_state()
    r = generalization(model, x, train_size=500, test_size=300)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k

    def reference(x, y):  # eval mode: running statistics, no dropout; numpy float64
        a = x.numpy().astype(np.float64)
        for mod in model:
            if isinstance(mod, nn.Linear):
                a = a @ mod.weight.detach().double().numpy().T
                if mod.bias is not None:
                    a = a + mod.bias.detach().double().numpy()
            elif isinstance(mod, nn.BatchNorm1d):
                mean, var = mod.running_mean.double().numpy(), mod.running_var.double().numpy()
                w, b = mod.weight.detach().double().numpy(), mod.bias.detach().double().numpy()
                a = w * (a - mean) / np.sqrt(var + mod.eps) + b
            elif isinstance(mod, nn.Sigmoid):
                a = 1 / (1 + np.exp(-a))
        y = y.numpy()
        logp = a - scipy.special.logsumexp(a, axis=1, keepdims=True)
        return -logp[np.arange(len(y)), y].mean(), (a.argmax(1) == y).mean()

    x_train, y_train = _load("mnist", "train", None)
    x_test, y_test = _load("mnist", "test", None)
    train_loss, train_acc = reference(x_train[:500], y_train[:500])
    test_loss, test_acc = reference(x_test[:300], y_test[:300])
    assert r["gen_train_loss"] == pytest.approx(train_loss, rel=1e-5)
    assert r["gen_test_loss"] == pytest.approx(test_loss, rel=1e-5)
    assert r["gen_train_acc"] == pytest.approx(train_acc) and r["gen_test_acc"] == pytest.approx(
        test_acc
    )
    assert r["gen_gap_acc"] == pytest.approx(train_acc - test_acc)
    assert r["gen_gap_loss"] == pytest.approx(test_loss - train_loss, rel=1e-4)


def test_small_cnn_without_bn_has_conv_biases():
    m = small_cnn((4, 8), in_channels=1, bn=False, pool=True)
    convs = [x for x in m if isinstance(x, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m)
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert all(c.bias is None for c in small_cnn((4,), in_channels=1) if isinstance(c, nn.Conv2d))


# --------------------------------------------------------------------------------- noisy BN
def test_noisy_batchnorm_distribution():
    """a ← s·a + m: per unit μ ~ U(±0.5), σ ~ U(1, 1.25); per activation m ~ U(μ ± 0.1),
    s ~ N(σ, 0.1²)."""
    bn = NoisyBatchNorm1d(200, seed=3)
    x = torch.randn(4000, 200) * 3 + 1
    plain = nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    y = bn(x)
    m, s = bn.noise(y.shape)
    torch.testing.assert_close(y, plain * s + m)
    mu, sigma = m.mean(0), s.mean(0)  # [units], estimates of μ and σ
    assert mu.abs().max() <= 0.5 + 0.01 and mu.std() > 0.2  # spread over U(-0.5, 0.5)
    assert (m - mu).abs().max() <= 0.1 + 0.01  # m within μ ± 0.1
    assert sigma.min() >= 1 - 0.01 and sigma.max() <= 1.25 + 0.01
    assert (s - sigma).std(0).mean().item() == pytest.approx(0.1, rel=0.05)
    # output statistics per unit: mean ≈ μ, std ≈ σ (BN output has mean 0, std 1)
    torch.testing.assert_close(y.mean(0), mu, atol=0.02, rtol=0)


def test_noisy_batchnorm_steps_seeds_and_modes():
    torch.manual_seed(0)
    a = NoisyBatchNorm1d(5)
    torch.manual_seed(0)
    b = NoisyBatchNorm1d(5)
    assert a.seed == b.seed  # drawn from the global RNG: reproducible from the run's seed
    x = torch.randn(16, 5)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x))  # same step: same draws
    first = a(x)
    assert set_noise_step(nn.Sequential(a, nn.Sigmoid()), 1) == 1
    assert not torch.equal(a(x), first)  # a new step: new distribution
    running = a.running_mean.clone()
    a.eval()
    torch.testing.assert_close(
        a(x),
        nn.functional.batch_norm(
            x, a.running_mean, a.running_var, a.weight, a.bias, False, 0, a.eps
        ),
    )
    assert torch.equal(a.running_mean, running)
    shared = NoisyBatchNorm1d(5, per_example=False, seed=0)
    y = shared(x)
    plain = nn.functional.batch_norm(x, None, None, shared.weight, shared.bias, True, 0, shared.eps)
    ratio = (y[1:] - y[:1]) / (plain[1:] - plain[:1])  # one s per unit for the whole batch
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-4, atol=1e-4)
    assert NoisyBatchNorm1d(3, seed=0)(torch.randn(4, 3, 7)).shape == (4, 3, 7)
    with pytest.raises(ValueError):
        NoisyBatchNorm1d(3, scale_range=(2.0, 1.0))


# ---------------------------------------------------------------------- scale invariance
def test_scale_invariance_measure_has_no_side_effects():
    torch.manual_seed(0)
    model = paper_mlp(bn=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(60, 784)
    rng = torch.get_rng_state()
    r = scale_invariance(model, x, scales=(10.0, 1000.0))
    assert [n for n, _, _ in normalized_layers(model)] == ["0", "3", "6"]
    assert set(r) == {
        f"si_{i}{suffix}"
        for i in ("output", "input_grad", "weight_grad", "eps_effect")
        for suffix in ("", "_0", "_3", "_6")
    }
    # large scales: BN's ε is negligible, the identities hold to float32 rounding
    assert r["si_weight_grad"] < 1e-3 and r["si_output"] < 1e-3
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert scale_invariance(paper_mlp(bn=False), torch.rand(8, 784)) == {}


def test_preset_is_frozen_and_copyable():
    p = get_preset("fig1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.steps = 3
    q = dataclasses.replace(p, name="mine", steps=10)
    assert q.conditions == p.conditions and "mine" not in PRESETS

"""Tests of icstools.report: verdicts on synthetic seeds with known effects, reports of recorded
preset-like runs and of any runs (a user's residual CNN with a hostile module name, a diverged
run), the JSON schema, escaping, self-containedness, and rendering in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import xarray as xr
from torch import nn

import icstools
from icstools import report
from icstools.analysis.metrics import METRICS
from icstools.report import CLAIMS, REPORT_SCHEMA, VERDICTS, assess, diagnose_run, write_report
from icstools.report.verdicts import _decide

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema validates the report's JSON")

EVIL = "<script>alert(1)</script>"
COND = '<b onclick="x">cond'  # a condition folder name (no "/")


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def _data(seed: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.randn(4, 12, generator=torch.Generator().manual_seed(7)) * 1.5
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    return centers[y] + torch.randn(n, 12, generator=gen), y


def record_mlp(bn: bool, seed: int, path: Path) -> None:
    """A preset-like run (sigmoid MLP, test_acc logged) with probe samples, gradients, ICS,
    landscape probes and Jacobian spectra, streamed to ``path``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = 12
    for w in (16, 16):
        layers += [nn.Linear(d, w, bias=not bn), *([nn.BatchNorm1d(w)] if bn else []), nn.Sigmoid()]
        d = w
    model = nn.Sequential(*layers, nn.Linear(d, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data(seed)
    x_test, y_test = _data(99)
    rec = icstools.Recorder(
        model,
        nn.Sigmoid,
        role="input",
        every=2,
        optimizer=opt,
        probe=x_test[:64],
        probe_sample=32,
        gradients=True,
        ics=4,
        landscape=4,
        jacobian=4,
        jacobian_examples=8,
        loss_fn=loss_fn,
        seed=seed,
        path=path,
    )
    gen = torch.Generator().manual_seed(seed)
    with rec:
        for _ in range(24):
            idx = torch.randint(0, len(x), (32,), generator=gen)
            model.eval()
            with torch.no_grad():
                acc = (model(x_test).argmax(1) == y_test).float().mean()
            model.train()
            rec.set_target(y[idx])
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss, test_acc=acc)


class ResidualCNN(nn.Module):
    """A user's model: conv + BN + ReLU, a residual block whose nonlinearity has a hostile
    name (added with add_module), global pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.add_module(EVIL, nn.Tanh())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.conv1(x)))
        h = h + getattr(self, EVIL)(self.conv2(h))
        return self.head(h.mean((2, 3)))


def record_cnn(path: Path) -> None:
    torch.manual_seed(0)
    model = ResidualCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    rec = icstools.Recorder(
        model, every=2, optimizer=opt, probe=torch.randn(32, 1, 8, 8, generator=gen), path=path
    )
    with rec:
        for _ in range(24):
            x, y = (
                torch.randn(16, 1, 8, 8, generator=gen),
                torch.randint(0, 3, (16,), generator=gen),
            )
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss)


def record_diverging(path: Path) -> None:
    """lr far too high: the loss and activations reach inf, then NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e3)
    gen = torch.Generator().manual_seed(0)
    rec = icstools.Recorder(
        model,
        every=1,
        optimizer=opt,
        probe=torch.randn(64, 5, generator=gen),
        gradients=True,
        path=path,
    )
    with rec:
        for _ in range(12):
            loss = (model(torch.randn(16, 5, generator=gen)) - 1e3).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    fig1 = root / "fig1"
    for cond, bn in (("baseline", False), ("bn", True)):
        for seed in (0, 1):
            record_mlp(bn, seed, fig1 / cond / f"seed-{seed}.zarr")
    (fig1 / "manifest.json").write_text(json.dumps({"preset": "fig1", "other": [1, 2]}))
    mine = root / "mine"
    record_cnn(mine / "cnn.zarr")
    record_diverging(mine / "nested" / "diverged.zarr")
    odd = root / "odd"  # an unknown preset with a hostile name and condition
    (odd / COND).mkdir(parents=True)
    os.symlink(fig1 / "bn" / "seed-0.zarr", odd / COND / "seed-0.zarr")
    (odd / "manifest.json").write_text(json.dumps({"preset": '<img src=x onerror="alert(1)">'}))
    single = root / "single" / "fig1"  # one seed per condition
    for cond in ("baseline", "bn"):
        (single / cond).mkdir(parents=True)
        os.symlink(fig1 / cond / "seed-0.zarr", single / cond / "seed-0.zarr")
    (single / "manifest.json").write_text(json.dumps({"preset": "fig1"}))
    return {"root": root, "fig1": fig1, "mine": mine, "odd": odd, "single": single}


@pytest.fixture(scope="module")
def full(stores, tmp_path_factory):
    """One report of a preset, a directory of any runs and an unknown preset."""
    out = tmp_path_factory.mktemp("report")
    result = write_report(
        [stores["fig1"], stores["mine"], stores["odd"]], out / "r.html", out / "sub" / "r.json"
    )
    return result, result.html_path.read_text(), json.loads(result.json_path.read_text())


# --------------------------------------------------------------------------------------------
# Synthetic seeds with known effects (no training)
# --------------------------------------------------------------------------------------------


def acc_run(final: float, *, diverged: int | None = None, extra: dict | None = None) -> xr.Dataset:
    """test_acc over 5 records rising to ``final`` (NaN = not measured at step 10)."""
    acc = np.linspace(0.1, final, 5)
    acc[1] = np.nan
    ds = xr.Dataset(
        {"test_acc": ("step", acc), "loss": ("step", np.linspace(2, 0.1, 5))},
        coords={"step": np.arange(5) * 10},
    )
    for name, values in (extra or {}).items():
        ds[name] = ("step", np.asarray(values, dtype=float))
    if diverged is not None:
        ds.attrs["diverged_step"] = diverged
        ds["loss"][diverged // 10 :] = np.inf
    return ds


def drift_run(speed: float, seed: int) -> xr.Dataset:
    """Probe values of one sigmoid-input site whose units shift by ``speed`` σ per record."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(200, 3))
    samples = np.stack([base + k * speed + rng.normal(0, 0.01, base.shape) for k in range(5)])
    return xr.Dataset(
        {"probe_sample": (("step", "sample", "unit"), samples)},
        coords={
            "step": np.arange(5) * 10,
            "unit": np.arange(3),
            "unit_site": ("unit", ["h:input"] * 3),
            "unit_index": ("unit", np.arange(3)),
            "site": ["h:input"],
            "sat_threshold": ("site", [4.585]),
            "source": ["probe"],
        },
    )


def _by_id(verdicts):
    return {v["id"]: v for v in verdicts}


@pytest.mark.parametrize(
    ("bn", "base", "verdict", "why"),
    [
        ((0.95, 0.96, 0.94, 0.955, 0.945), (0.80, 0.82, 0.78, 0.81, 0.79), "supported", "above"),
        ((0.80, 0.82, 0.78, 0.81, 0.79), (0.95, 0.96, 0.94, 0.955, 0.945), "not supported", "opp"),
        ((0.900, 0.901, 0.899, 0.9005, 0.8995), (0.9, 0.9, 0.9, 0.9, 0.9005), "not supported",
         "inside"),
        ((0.9, 0.5, 0.99, 0.6, 0.95), (0.8, 0.99, 0.5, 0.9, 0.7), "inconclusive", "includes"),
    ],
)  # fmt: skip
def test_accuracy_verdicts_follow_the_interval_over_seeds(bn, base, verdict, why):
    runs = {"baseline": [acc_run(a) for a in base], "bn": [acc_run(a) for a in bn]}
    v = _by_id(assess("fig1", runs))["fig1/higher-accuracy"]
    assert v["verdict"] == verdict, v
    assert why in v["reason"]
    eff = v["effect"]
    assert eff["statistic"] == "diff" and eff["confidence_level"] == 0.95
    assert eff["estimate"] == pytest.approx(np.mean(bn) - np.mean(base))
    assert eff["ci_low"] <= eff["estimate"] <= eff["ci_high"]
    assert [g["n_runs"] for g in v["groups"]] == [5, 5]
    assert "n=5" in v["measurement"]
    faster = _by_id(assess("fig1", runs))["fig1/faster"]
    assert "test_acc compared at 4 steps" in faster["notes"][0]  # step 10 was not measured
    assert faster["groups"][0]["values"][0] == pytest.approx(
        np.mean(np.linspace(0.1, bn[0], 5)[[0, 2, 3, 4]])
    )


def test_drift_claim_compares_drift_against_the_previous_record():
    slow = [drift_run(0.05, s) for s in range(4)]
    fast = [drift_run(0.5, s + 10) for s in range(4)]
    v = _by_id(assess("fig1", {"baseline": fast, "bn": slow}))["fig1/ics-drift"]
    assert v["verdict"] == "supported", v
    bn_drift = v["groups"][0]["mean"]
    assert bn_drift == pytest.approx(0.05, rel=0.15)  # W1/σ of a 0.05σ shift per record
    assert v["groups"][1]["mean"] == pytest.approx(0.5, rel=0.15)
    assert v["effect"]["ci_high"] < 1
    v = _by_id(assess("fig1", {"baseline": slow, "bn": fast}))["fig1/ics-drift"]
    assert v["verdict"] == "not supported" and "opposite" in v["reason"]
    # accuracy is absent from these runs: those claims are inconclusive, with the reason
    acc = _by_id(assess("fig1", {"baseline": slow, "bn": fast}))["fig1/higher-accuracy"]
    assert acc["verdict"] == "inconclusive" and "test_acc" in acc["reason"]


@pytest.mark.parametrize(
    ("statistic", "expect", "lo", "hi", "verdict"),
    [
        ("ratio", "lower", 0.2, 0.5, "supported"),
        ("ratio", "lower", 0.95, 0.99, "supported"),  # small, but below 1
        ("ratio", "lower", 1.2, 3.0, "not supported"),
        ("ratio", "lower", 0.95, 1.05, "not supported"),  # inside [1/1.1, 1.1]
        ("ratio", "lower", 0.5, 1.5, "inconclusive"),
        ("ratio", "lower", -np.inf, np.inf, "inconclusive"),
        ("ratio", "lower", np.nan, np.nan, "inconclusive"),
        ("diff", "higher", 0.01, 0.2, "supported"),
        ("diff", "higher", -0.2, -0.01, "not supported"),
        ("diff", "higher", -0.05, 0.2, "inconclusive"),
        ("diff", "equal", -0.05, 0.08, "supported"),
        ("diff", "equal", 0.2, 0.3, "not supported"),
        ("diff", "equal", 0.05, 0.3, "inconclusive"),
        ("diff", "not-higher", -0.3, 0.08, "supported"),
        ("diff", "not-higher", 0.2, 0.3, "not supported"),
        ("diff", "not-higher", 0.05, 0.3, "inconclusive"),
    ],
)
def test_decision_rules(statistic, expect, lo, hi, verdict):
    margin = 0.1
    assert _decide(statistic, expect, margin, lo, hi)[0] == verdict


def test_few_seeds_note_gives_the_degrees_of_freedom_of_the_t_interval():
    import scipy.stats

    c, r = [0.488, 0.422, 0.517], [0.0237, 0.0223, 0.0220]
    note = report.small_sample_note(c, r)
    # Welch–Satterthwaite df as scipy computes it for the same interval
    res = scipy.stats.ttest_ind(c, r, equal_var=False)
    assert f"with 3 vs 3 seeds the t interval of the difference has {res.df:.1f} degrees" in note
    assert f"t quantile {scipy.stats.t.ppf(0.975, res.df):.2f}" in note
    # 4 vs 4 gets the note; 5 seeds in both, or 5 in one and 4 in the other... min < 5: note
    assert "with 4 vs 4 seeds" in report.small_sample_note([1, 2, 3, 4], [2, 3, 4, 6])
    assert report.small_sample_note([1, 2, 3, 4, 5], [2, 3, 4, 5, 7]) == ""
    # non-finite runs do not count; no spread at all (the interval is the point): no note
    assert report.small_sample_note([1.0, np.nan], [2.0, 3.0]) == ""
    assert report.small_sample_note([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]) == ""
    # the verdict's notes carry it, and its effect names the interval it read
    runs = {
        "baseline": [acc_run(a) for a in (0.90, 0.91, 0.92)],
        "bn": [acc_run(a) for a in (0.95, 0.96, 0.94)],
    }
    v = _by_id(assess("fig1", runs))["fig1/higher-accuracy"]
    assert sum("degrees of freedom" in n for n in v["notes"]) == 1, v["notes"]
    assert v["effect"]["method"].startswith("Welch's t interval")
    ci = scipy.stats.ttest_ind([0.95, 0.96, 0.94], [0.90, 0.91, 0.92], equal_var=False)
    ci = ci.confidence_interval(0.95)
    assert [v["effect"]["ci_low"], v["effect"]["ci_high"]] == pytest.approx([ci.low, ci.high])


def test_every_claim_states_metric_comparison_and_rule():
    ids = [c.id for c in CLAIMS]
    assert len(ids) == len(set(ids))
    presets = {c.preset for c in CLAIMS}
    assert {"fig1", "lr-sweep", "saturating", "noisy-bn", "jacobian", "scale-invariance"} <= presets
    for c in CLAIMS:
        text = report.rule_text(c)
        assert "supported" in text and "inconclusive" in text, c.id
        if c.statistic in ("ratio", "diff"):
            assert c.metric in report.METRIC_DESCRIPTIONS and all(c.comparison), c.id
        if c.metric:  # a name of the run-level registry, with keywords it takes
            assert set(c.metric_kwargs) <= set(METRICS[c.metric].defaults), c.id
    drift = [c for c in CLAIMS if c.metric == "drift"]
    assert len(drift) == 3  # fig1, noisy-bn, cnn: W1/σ vs the previous record, mean over units
    assert all(dict(c.metric_kwargs) == {"reference": "previous", "how": "mean"} for c in drift)
    with pytest.raises(ValueError, match="takes no"):
        report.Claim("x/y", "x", "", "", "drift", ("a", "b"), "diff", "higher", 0.0,
                     metric_kwargs={"refrence": "previous"})  # fmt: skip
    with pytest.raises(KeyError, match="registered metrics"):
        report.Claim("x/y", "x", "", "", "no-such-metric", ("a", "b"), "diff", "higher", 0.0)


def test_verdict_code_does_not_import_presentation_code():
    import ast

    root = Path(report.__file__).parent
    for name in ("claims", "verdicts", "json_schema", "formatting", "inputs"):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {
            f"{node.module}.{alias.name}" if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        presentation = (
            "icstools.plots",
            "icstools.plot_parts",
            "matplotlib",
            "seaborn",
            "icstools.report.figures",
        )
        bad = {m for m in imported if m.startswith(presentation)}
        assert not bad, (name, bad)


def test_lr_sweep_counts_runs_that_train():
    def arm(acc, div=None):
        return [acc_run(a, diverged=d) for a, d in zip(acc, div or [None] * len(acc), strict=True)]

    runs = {
        "baseline-x1": arm([0.90, 0.91, 0.92]),
        "baseline-x5": arm([0.89, 0.90, 0.91]),
        "baseline-x30": arm([0.10, 0.10, 0.11], [20, 30, 20]),
        "bn-x1": arm([0.95, 0.96, 0.95]),
        "bn-x5": arm([0.96, 0.96, 0.97]),
        "bn-x30": arm([0.95, 0.94, 0.96]),
    }
    v = assess("lr-sweep", runs)[0]
    assert v["verdict"] == "supported" and "×30" in v["reason"], v
    assert "×30: BN trains in 3/3 runs, baseline in 0/3" in v["measurement"]
    assert "×5: BN trains in 3/3 runs, baseline in 3/3 (fails)" in v["measurement"]
    top = {g["condition"]: g for g in v["groups"]}
    assert top["baseline-x30"]["n_diverged"] == 3 and top["bn-x30"]["n_trains"] == 3
    runs["bn-x30"] = arm([0.1, 0.1, 0.1], [20, 20, 30])
    runs["bn-x5"] = arm([0.1, 0.1, 0.1], [20, 20, 30])
    assert assess("lr-sweep", runs)[0]["verdict"] == "not supported"
    runs["bn-x30"] = arm([0.95, 0.1, 0.95], [None, 20, None])  # one BN seed diverges
    assert assess("lr-sweep", runs)[0]["verdict"] == "inconclusive"
    # a second family (relu-…) is assessed on its own: it holds there at ×5
    runs |= {
        "relu-baseline-x1": arm([0.95, 0.96, 0.95]),
        "relu-baseline-x5": arm([0.1, 0.1, 0.1], [10, 10, 20]),
        "relu-bn-x5": arm([0.97, 0.96, 0.97]),
    }
    v = assess("lr-sweep", runs)[0]
    assert v["verdict"] == "supported" and "relu-bn-x5 vs relu-baseline-x5" in v["reason"]
    assert "relu: ×5: BN trains in 3/3 runs, baseline in 0/3 (holds)" in v["measurement"]
    assert any("relu: a run trains if" in n and "0.9033" in n for n in v["notes"])
    assert "no multiplier" in assess("lr-sweep", {"bn": arm([0.9])})[0]["reason"]


def test_scale_identities_use_a_tolerance_and_eps():
    def run(err, eps=1e-6):
        return acc_run(
            0.9,
            extra={
                "si_output": err,
                "si_input_grad": [1e-6] * 5,
                "si_weight_grad": [2e-6] * 5,
                "si_eps_effect": [eps] * 5,
            },
        )

    ok = {"bn": [run([1e-6, np.nan, 2e-5, np.nan, 3e-7])], "baseline": [acc_run(0.9)]}
    v = assess("scale-invariance", ok)[0]
    assert v["verdict"] == "supported" and v["effect"]["estimate"] == pytest.approx(2e-5)
    assert v["comparison"] == "bn"
    explained = {"bn": [run([1e-6, 0.03, 0, 0, 0], eps=0.02)]}  # ε explains 0.03 ≤ 2·0.02
    assert assess("scale-invariance", explained)[0]["verdict"] == "supported"
    broken = {"bn": [run([1e-6, 0.5, 0, 0, 0])], "bn-x5": [run([0.0] * 5)]}
    v = assess("scale-invariance", broken)[0]
    assert v["verdict"] == "not supported" and v["comparison"] == "bn, bn-x5"
    generic = {"bn": [acc_run(0.9, extra={"scale_my_check": [1e-7] * 5})]}
    assert assess("scale-invariance", generic)[0]["verdict"] == "supported"
    assert assess("scale-invariance", {"bn": [acc_run(0.9)]})[0]["verdict"] == "inconclusive"


def test_noisy_bn_compound_claim_and_missing_variables():
    runs = {
        "bn": [acc_run(a) for a in (0.95, 0.951, 0.949, 0.95)],
        "noisy-bn": [acc_run(a) for a in (0.948, 0.95, 0.951, 0.949)],
        "baseline": [acc_run(a) for a in (0.90, 0.91, 0.9, 0.89)],
    }
    for name, speed in (("bn", 0.05), ("noisy-bn", 0.5)):
        runs[name] = [r.merge(drift_run(speed, i)) for i, r in enumerate(runs[name])]
    v = _by_id(assess("noisy-bn", runs))
    assert v["noisy-bn/noisy-drifts-more"]["verdict"] == "supported"
    assert v["noisy-bn/noisy-trains-as-well"]["verdict"] == "supported"
    assert v["noisy-bn/not-ics"]["verdict"] == "supported"
    assert "noisy-bn/noisy-drifts-more: supported" in v["noisy-bn/not-ics"]["reason"]
    for cid, var in (
        ("noisy-bn/gradient-ics", "ics_cos"),
        ("noisy-bn/smoother-beta", "beta_smoothness"),
    ):
        assert v[cid]["verdict"] == "inconclusive" and var in v[cid]["reason"]
        assert "Recorder(" in v[cid]["reason"]  # says how to record it
    runs["noisy-bn"] = [r.assign(test_acc=r["test_acc"] * 0.5) for r in runs["noisy-bn"]]
    v = _by_id(assess("noisy-bn", runs))
    assert v["noisy-bn/noisy-trains-as-well"]["verdict"] == "not supported"
    assert v["noisy-bn/not-ics"]["verdict"] == "not supported"


def _gen_run(gap: float, test: float) -> xr.Dataset:
    """A run whose generalization measure was logged at 3 of 5 records, ending at ``gap`` and
    ``test`` (train − test accuracy, test accuracy)."""
    nan = np.nan
    return acc_run(
        test,
        extra={
            "gen_gap_acc": [0.0, nan, gap / 2, nan, gap],
            "gen_test_acc": [0.1, nan, test - 0.01, nan, test],
        },
    )


def test_regularization_claims_read_the_measured_gap_and_test_accuracy():
    gaps = {"bn": (0.010, 0.011, 0.009, 0.0105, 0.0095), "baseline": (0.020, 0.022, 0.018, 0.021,
            0.019)}  # fmt: skip
    tests = {"bn": (0.981, 0.982, 0.980, 0.981, 0.982), "baseline-dropout": (0.978, 0.979,
             0.977, 0.978, 0.980)}  # fmt: skip
    runs = {
        "bn": [_gen_run(g, t) for g, t in zip(gaps["bn"], tests["bn"], strict=True)],
        "baseline": [_gen_run(g, 0.97) for g in gaps["baseline"]],
        "baseline-dropout": [_gen_run(0.005, t) for t in tests["baseline-dropout"]],
    }
    v = _by_id(assess("regularization", runs))
    gap = v["regularization/bn-narrows-gap"]
    assert gap["verdict"] == "supported", gap
    ci = scipy.stats.ttest_ind(gaps["bn"], gaps["baseline"], equal_var=False)
    ci = ci.confidence_interval(0.95)
    assert [gap["effect"]["ci_low"], gap["effect"]["ci_high"]] == pytest.approx([ci.low, ci.high])
    drop = v["regularization/bn-replaces-dropout"]
    assert drop["verdict"] == "supported", drop  # dropout's network not better
    est = np.mean(tests["baseline-dropout"]) - np.mean(tests["bn"])
    assert drop["effect"]["estimate"] == pytest.approx(est)
    for cid in ("regularization/cnn-bn-narrows-gap", "regularization/cnn-bn-replaces-dropout"):
        assert v[cid]["verdict"] == "inconclusive" and "has no runs" in v[cid]["reason"]
    # dropout generalizing better by a point: BN without dropout does not replace it
    runs["baseline-dropout"] = [_gen_run(0.005, t + 0.01) for t in tests["baseline-dropout"]]
    drop = _by_id(assess("regularization", runs))["regularization/bn-replaces-dropout"]
    assert drop["verdict"] == "not supported", drop


def test_landscape_cnn_claims_compare_the_three_landscape_measures():
    def run(scale: float, seed: int) -> xr.Dataset:
        rng = np.random.default_rng(seed)
        nan = np.nan
        ds = acc_run(0.95)
        noise = 1 + 0.05 * rng.standard_normal()
        ds["loss_variation"] = ("step", np.array([1.0, nan, 0.8, nan, 0.6]) * scale * noise)
        ds["beta_smoothness"] = ("step", np.array([10.0, nan, 8.0, nan, 6.0]) * scale * noise)
        diff = np.full((5, 3), np.nan)
        diff[[0, 2, 4]] = np.array([[1.0, 2.0, 3.0]]) * scale * noise
        ds["landscape_grad_diff"] = (("step", "eta"), diff)
        return ds

    runs = {"bn": [run(0.5, i) for i in range(5)], "baseline": [run(1.0, 10 + i) for i in range(5)]}
    v = _by_id(assess("landscape-cnn", runs))
    for cid in ("smoother-loss", "predictive-gradients", "smoother-beta"):
        got = v[f"landscape-cnn/{cid}"]
        assert got["verdict"] == "supported", got
        assert got["effect"]["statistic"] == "ratio"
        assert got["effect"]["estimate"] == pytest.approx(0.5, rel=0.1)
        assert got["effect"]["method"].startswith("Fieller")
    runs["bn"] = [run(1.0, 20 + i) for i in range(5)]
    v = _by_id(assess("landscape-cnn", runs))
    assert v["landscape-cnn/smoother-beta"]["verdict"] != "supported"


def test_unknown_preset_and_missing_condition_are_inconclusive_not_errors():
    (v,) = assess("mystery", {"a": [acc_run(0.9)]})
    assert v["verdict"] == "inconclusive" and "unknown preset 'mystery'" in v["reason"]
    v = _by_id(assess("fig1", {"baseline": [acc_run(0.9)] * 2}))["fig1/higher-accuracy"]
    assert v["verdict"] == "inconclusive" and "condition 'bn' has no runs" in v["reason"]
    with pytest.raises(TypeError, match="mapping"):
        assess("fig1", [acc_run(0.9)])


def test_drift_flags_find_a_jump_after_the_reference_window():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 4))
    shifts = [0.0] * 12 + [3.0] + [3.0] * 3  # a jump at the 13th record, stable otherwise
    samples = np.stack([base + s + rng.normal(0, 0.05, base.shape) for s in shifts])
    ds = xr.Dataset(
        {"probe_sample": (("step", "sample", "unit"), samples)},
        coords={
            "step": np.arange(16) * 5,
            "unit": np.arange(4),
            "unit_site": ("unit", ["h:input"] * 4),
            "unit_index": ("unit", np.arange(4)),
            "site": ["h:input"],
            "source": ["probe"],
        },
    )
    entry, _ = diagnose_run(ds, "jump")
    flags = entry["drift_flags"]
    assert flags["available"] and flags["window_steps"] == [5, 10, 15, 20]  # 4 = ⌈20% of 16⌉
    assert entry["sites"][0]["flagged_steps"] == [60]  # only the jump, vs the previous record
    assert entry["figures"][0].startswith("Drift per site")
    assert {a["variable"] for a in entry["absent"]} >= {"grad_norm", "ics_cos", "jac_sv"}
    short = ds.isel(step=slice(0, 4))
    assert "too few" in diagnose_run(short)[0]["drift_flags"]["reason"]


# --------------------------------------------------------------------------------------------
# Reports written from stores
# --------------------------------------------------------------------------------------------


def test_report_of_preset_and_any_runs_validates_and_holds_every_section(full, stores):
    result, page, data = full
    jsonschema.Draft202012Validator.check_schema(REPORT_SCHEMA)
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(data)
    assert result.data == data and result.verdicts == data["verdicts"]
    fig1 = [v for v in data["verdicts"] if v["preset"] == "fig1"]
    assert [v["id"] for v in fig1] == [c.id for c in CLAIMS if c.preset == "fig1"]
    for v in fig1:
        assert v["verdict"] in VERDICTS and v["measurement"] and v["effect"] is not None
        assert [g["n_runs"] for g in v["groups"]] == [2, 2]
        assert v["effect"]["method"]  # which interval the verdict read
    drift = next(v for v in fig1 if v["id"] == "fig1/ics-drift")
    assert drift["groups"][0]["condition"] == "bn" and drift["effect"]["statistic"] == "ratio"
    (preset, odd) = data["presets"]
    assert not any(v["single_seed"] for v in fig1) and not preset["single_seed_conditions"]
    assert data["single_seed"] and odd["single_seed_conditions"] == [COND]  # 1 run there
    assert preset["preset"] == "fig1" and preset["known"]
    assert [c["name"] for c in preset["conditions"]] == ["baseline", "bn"]
    assert [r["seed"] for r in preset["conditions"][1]["runs"]] == [0, 1]
    assert preset["figures"][0].startswith("Fig. 1")
    assert not odd["known"] and odd["conditions"][0]["name"] == COND
    paths = [Path(r["path"]).name for r in data["runs"]]
    assert paths == ["seed-0.zarr", "cnn.zarr", "diverged.zarr"]  # odd's run is diagnosed too
    cnn = data["runs"][1]
    assert [s["site"] for s in cnn["sites"]] == ["act1:input", f"{EVIL}:input"]
    assert {a["variable"] for a in cnn["absent"]} >= {"grad_norm", "ics_cos", "jac_sv"}
    diverged = data["runs"][2]
    assert diverged["diverged_step"] is not None and diverged["sites"][0]["nonfinite_units"] > 0
    # the HTML says the same
    assert '<table id="verdicts">' in page and "<table id='claims'>" in page
    n_figures = sum(len(p["figures"]) for p in data["presets"])
    assert page.count("<img ") == n_figures + sum(len(r["figures"]) for r in data["runs"])
    assert f"Diverged at step {diverged['diverged_step']}" in page
    assert "reference window of records at steps" in page
    assert "Not recorded (skipped)" in page and "Recorder(ics=..." in page


def test_html_escapes_site_preset_and_condition_names(full):
    _, page, _ = full
    assert EVIL not in page and COND not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;:input" in page
    assert "&lt;b onclick=&quot;x&quot;&gt;cond" in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page


class _Elements(HTMLParser):
    """Every start tag with its attributes, the text of <style> elements and of executable
    <script> elements (no type)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.styles: list[str] = []
        self.scripts: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = tag if tag == "style" or (tag == "script" and not dict(attrs)) else None
        if self._in == "script":
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "style":
            self.styles.append(data)
        elif self._in == "script":
            self.scripts[-1] += data


def test_html_is_self_contained(full):
    import base64
    import hashlib

    _, page, _ = full
    parsed = _Elements()
    parsed.feed(page)
    tags = [t for t, _ in parsed.tags]
    assert "link" not in tags and "iframe" not in tags and "object" not in tags
    csp = [
        a
        for t, a in parsed.tags
        if t == "meta" and (a.get("http-equiv") or "").lower() == "content-security-policy"
    ]
    assert csp and csp[0]["content"].startswith("default-src 'none'; img-src data:;")
    # scripts: inline only, either data (application/json) or allowed by their SHA-256 hash
    for t, a in parsed.tags:
        if t == "script":
            assert a in ({}, {"type": "application/json", "id": a.get("id")}), a
    assert len(parsed.scripts) == 2  # uPlot and the report's own
    allowed = re.findall(r"'sha256-([A-Za-z0-9+/=]+)'", csp[0]["content"])
    digests = [
        base64.b64encode(hashlib.sha256(js.encode()).digest()).decode() for js in parsed.scripts
    ]
    assert sorted(allowed) == sorted(digests)
    urls = [
        (t, k, v)
        for t, attrs in parsed.tags
        for k, v in attrs.items()
        if k in ("src", "href", "action", "srcset", "poster", "data", "background")
    ]
    assert urls and all(v.startswith("data:image/png;base64,") for _, _, v in urls), urls[:3]
    styles = " ".join(parsed.styles) + " ".join(a.get("style") or "" for _, a in parsed.tags)
    assert "url(" not in styles.replace(" ", "") and "@import" not in styles
    assert "http://" not in page and "https://" not in page


def test_single_seed_is_said_loudly(stores, tmp_path):
    result = write_report([stores["single"]], tmp_path / "one.html", tmp_path / "one.json")
    page = result.html_path.read_text()
    assert "id='single-seed'" in page and "SINGLE SEED" in page
    assert result.data["single_seed"]
    assert result.data["presets"][0]["single_seed_conditions"] == ["baseline", "bn"]
    for v in result.verdicts:
        assert v["single_seed"] and v["verdict"] == "inconclusive"
        assert v["reason"].startswith("SINGLE SEED")
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(
        json.loads(result.json_path.read_text())
    )
    assert (
        write_report(stores["single"] / "bn" / "seed-0.zarr", tmp_path / "x.html").json_path is None
    )


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "r.html")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="is not a run store"):
        write_report([tmp_path / "f.txt"], tmp_path / "r.html")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable run found"):
        write_report([tmp_path / "empty"], tmp_path / "r.html")
    with pytest.raises(TypeError, match="non-empty list of paths"):
        write_report([], tmp_path / "r.html")
    with pytest.raises(TypeError, match="inputs must hold paths"):
        write_report([3], tmp_path / "r.html")


# --------------------------------------------------------------------------------------------
# Headless Chromium: opens offline, no console message, no request but file:
# --------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=127.0.0.1:9",
    "--enable-logging=stderr",
    "--v=1",
]


def _page_requests(netlog: Path) -> set[str]:
    """URLs of the requests the page itself started (network isolation key of the file://
    page); Chromium's own background requests have another key and are ignored."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return {
        e["params"]["url"]
        for e in log["events"]
        if e["type"] == start
        and "file://" in str(e.get("params", {}).get("network_isolation_key", ""))
    }


def _chromium(page: Path, work: Path) -> tuple[int, str, list[str], set[str]]:
    netlog = work / f"{page.stem}.netlog.json"
    proc = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={work / 'profile'}", f"--log-net-log={netlog}",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.returncode, proc.stdout, console, _page_requests(netlog)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian package 'chromium': apt-get install -y chromium)",
)
def test_html_opens_offline_in_headless_chromium(full, tmp_path):
    # control: the checks see an external image, a stylesheet and a console message
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<html><head><link rel="stylesheet" href="https://cdn.invalid/x.css"></head><body>'
        '<img src="http://example.invalid/x.png"><script>console.log("hi")</script></body></html>'
    )
    rc, _, console, requests = _chromium(bad, tmp_path)
    assert rc == 0 and console
    assert requests == {"http://example.invalid/x.png", "https://cdn.invalid/x.css"}
    result = full[0]
    rc, dom, console, requests = _chromium(result.html_path, tmp_path)
    assert rc == 0
    assert console == [] and requests == set()
    assert '<table id="verdicts">' in dom and "icstools drift report" in dom
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', dom)
    assert len(images) == full[1].count("<img ") > 5
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom

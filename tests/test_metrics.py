"""Tests of icstools.analysis.metrics, the run-level metric registry: every entry on a small
recorded run, the drift entries against values computed independently from
``icstools.analysis.drift.drift`` and numpy (the per-site ones as ``compare`` computed them, the
run-level one as the report computes it), one set of defaults per entry, and clear errors."""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import icstools
import icstools.analysis.metrics as M
from icstools.analysis.compare import compare
from icstools.analysis.drift import drift
from icstools.analysis.metrics import METRICS, MissingVariableError, UnknownMetricError
from icstools.schema import variables

STEPS = 6


def record(seed: int) -> xr.Dataset:
    """A tiny sigmoid MLP with every measurement a registry entry reads, test_acc and §3.3
    identity errors logged."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    rec = icstools.Recorder(
        model,
        nn.Sigmoid,
        role="input",
        every=1,
        optimizer=opt,
        probe=torch.randn(32, 4, generator=gen),
        probe_sample=16,
        gradients=True,
        ics=2,
        landscape=2,
        jacobian=2,
        jacobian_examples=4,
        loss_fn=loss_fn,
        seed=seed,
    )
    with rec:
        for k in range(STEPS):
            idx = torch.randint(0, 64, (16,), generator=gen)
            rec.set_target(y[idx])
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                acc = (model(x).argmax(1) == y).float().mean()
            rec.log(loss=loss, test_acc=acc, si_output=1e-6 * (k + 1))
            # what the generalization measure logs (the regularization preset)
            rec.log(gen_train_acc=acc, gen_test_acc=0.9 * acc, gen_gap_acc=0.1 * acc)
            rec.log(gen_gap_loss=0.1)
    return rec.to_dataset()


@pytest.fixture(scope="module")
def runs() -> list[xr.Dataset]:
    return [record(seed) for seed in range(3)]


def _w1_std(ds: xr.Dataset, reference) -> np.ndarray:
    """W1/σ of every unit of the last hidden sigmoid input ("3:input"), [step, unit]."""
    d = drift(ds, reference, ["w1_std"], source="probe")["w1_std"].transpose("step", "unit")
    units = np.asarray(ds["unit_site"].values).astype(str) == "3:input"
    return np.asarray(d.values, dtype=np.float64)[:, units]


# --------------------------------------------------------------------------------------------
# Every entry
# --------------------------------------------------------------------------------------------


def test_every_entry_is_callable_on_a_recorded_run(runs):
    ds = runs[0]
    assert {"drift", "final_acc", "mean_acc", "sat_frac_mean", "ics_cos_mean", "beta"} <= set(
        METRICS
    )
    assert {"loss_variation_mean", "jac_near_one", "grad_explosion", "identities"} <= set(METRICS)
    per_site = set(icstools.analysis.drift.METRICS)
    for name, metric in METRICS.items():
        assert metric.name == name and metric.description, name
        value = metric(ds)
        if name in per_site:
            assert isinstance(value, xr.DataArray) and value.dims == ("site",), name
            assert list(value["site"].values) == ["1:input", "3:input"], name
            assert np.isfinite(value.values).all(), name
        else:
            assert isinstance(value, float) and math.isfinite(value), (name, value)


def test_each_entry_has_one_set_of_defaults():
    """The functions behind the entries take their keywords without defaults: the registry's
    are the only ones."""
    for name, metric in METRICS.items():
        params = inspect.signature(metric.func).parameters
        for key in metric.defaults:
            assert key in params, (name, key)
            assert params[key].default is inspect.Parameter.empty, (name, key)


def test_no_entry_is_shadowed_by_a_run_variable():
    """compare looks a name up among the run's variables first."""
    assert not set(METRICS) & set(variables())


def test_simple_entries_against_numpy(runs):
    ds = runs[1]
    acc = ds["test_acc"].values
    assert METRICS["final_acc"](ds) == acc[-1]
    assert METRICS["mean_acc"](ds) == pytest.approx(acc.mean(), rel=1e-12)
    assert METRICS["mean_acc"](ds, steps=[1, 3]) == pytest.approx(acc[[1, 3]].mean(), rel=1e-12)
    sat = ds["sat_frac"].sel(source="train").values  # both sites are sigmoid inputs
    assert METRICS["sat_frac_mean"](ds) == pytest.approx(sat.mean(), rel=1e-12)
    g = ds["grad_norm"].transpose("step", "site").values
    assert METRICS["grad_explosion"](ds) == pytest.approx(np.log10(g[0, 0] / g[0, -1]))
    assert METRICS["identities"](ds) == pytest.approx(1e-6 * STEPS)
    assert METRICS["beta"](ds) == pytest.approx(np.nanmean(ds["beta_smoothness"].values))


def test_landscape_and_generalization_entries_against_numpy():
    nan = np.nan
    diff = np.array([[1.0, 2.0], [nan, nan], [3.0, 5.0], [nan, nan]])  # (step, eta)
    gap = np.array([0.0, nan, 0.02, nan])
    ds = xr.Dataset(
        {"landscape_grad_diff": (("step", "eta"), diff), "gen_gap_acc": ("step", gap)},
        coords={"step": [0, 10, 20, 30], "eta": [0.5, 1.0]},
    )
    assert METRICS["grad_predictiveness"](ds) == pytest.approx(np.mean([1.5, 4.0]))
    assert METRICS["final_gen_gap_acc"](ds) == 0.02  # the last measured record
    with pytest.raises(MissingVariableError, match="gen_test_acc"):
        METRICS["final_gen_test_acc"](ds)
    ds.attrs["diverged_step"] = 20
    assert np.isnan(METRICS["grad_predictiveness"](ds))


# --------------------------------------------------------------------------------------------
# Drift: as compare computed it, as the report computes it
# --------------------------------------------------------------------------------------------


def test_per_site_drift_entry_equals_the_compare_metric(runs):
    """w1_std per site with the defaults: vs the first record, median over the site's units,
    mean over the records."""
    ds = runs[0]
    want = np.nanmean(np.median(_w1_std(ds, "first"), axis=1))
    got = METRICS["w1_std"](ds)
    assert float(got.sel(site="3:input")) == pytest.approx(want, rel=1e-12)
    with pytest.warns(UserWarning, match="cannot fall below"):  # 2 vs 2 seeds
        table = compare({"a": runs[:2], "b": runs[1:]}, "w1_std", n_resamples=50)
    row = table.set_index("site").loc["3:input"]
    expected = [np.nanmean(np.median(_w1_std(r, "first"), axis=1)) for r in runs[1:]]
    assert row["mean_cond"] == pytest.approx(np.mean(expected), rel=1e-12)
    kw = {"reference": "previous", "how": "mean"}
    with pytest.warns(UserWarning, match="cannot fall below"):
        table = compare({"a": runs[:2], "b": runs[1:]}, "w1_std", metric_kwargs=kw, n_resamples=50)
    expected = [np.mean(np.mean(_w1_std(r, "previous")[1:], axis=1)) for r in runs[1:]]
    row = table.set_index("site").loc["3:input"]
    assert row["mean_cond"] == pytest.approx(np.mean(expected), rel=1e-12)


def test_run_drift_with_the_reports_keywords_equals_the_reports_value(runs):
    """The report's drift claims pass reference="previous", how="mean": W1/σ of the last hidden
    sigmoid input's units, each record vs the previous one, mean over records and units."""
    for ds in runs:
        want = _w1_std(ds, "previous")[1:].mean()
        got = METRICS["drift"](ds, reference="previous", how="mean")
        assert got == pytest.approx(want, rel=1e-12)
    # the defaults: vs the first record (itself left out), median over units, mean over records
    ds = runs[2]
    want = np.median(_w1_std(ds, "first")[1:], axis=1).mean()
    assert METRICS["drift"](ds) == pytest.approx(want, rel=1e-12)
    assert METRICS["drift"](ds, site="1:input", metric="ks") > 0


def test_run_drift_stays_non_finite_for_a_diverged_run(runs):
    """NaN/inf of a broken record propagate into the run-level drift (a comparison counts the
    run as non-finite), while the per-site entries skip NaN records, as compare always did."""
    ds = runs[0].copy(deep=True)
    ds["probe_sample"][STEPS - 1] = np.nan
    assert math.isnan(METRICS["drift"](ds, reference="previous", how="mean"))
    per_site = METRICS["w1_std"](ds)
    want = np.nanmean(np.median(_w1_std(runs[0].isel(step=slice(0, -1)), "first"), axis=1))
    assert float(per_site.sel(site="3:input")) == pytest.approx(want, rel=1e-12)


# --------------------------------------------------------------------------------------------
# Registry and errors
# --------------------------------------------------------------------------------------------


def test_unknown_names_raise_and_list_the_registered_metrics(runs):
    with pytest.raises(UnknownMetricError) as info:
        METRICS["w2_std"]
    assert isinstance(info.value, KeyError)
    text = str(info.value)
    assert text.startswith("unknown metric 'w2_std'; registered metrics: [")
    assert all(repr(name) in text for name in METRICS)
    with pytest.raises(UnknownMetricError, match="registered metrics"):
        METRICS.unregister("w2_std")
    with pytest.raises(ValueError, match=r"registered in icstools.analysis.metrics.METRICS \["):
        compare({"a": runs[:2], "b": runs[1:]}, "w2_std")


def test_register_call_and_unregister():
    run = xr.Dataset({"loss": ("step", [2.0, 1.0])}, coords={"step": [0, 1]})
    entry = METRICS.register("loss_times", lambda ds, *, k: k * float(ds["loss"][-1]), "k×", k=3)
    try:
        assert METRICS["loss_times"] is entry and dict(entry.defaults) == {"k": 3}
        assert entry(run) == 3.0 and entry(run, k=5) == 5.0
        with pytest.raises(TypeError):
            entry.defaults["k"] = 4  # read-only: one set of defaults
    finally:
        METRICS.unregister("loss_times")
    assert "loss_times" not in METRICS


def test_missing_variables_say_how_to_record_them():
    run = xr.Dataset({"loss": ("step", [1.0])}, coords={"step": [0]})
    with pytest.raises(MissingVariableError, match=r"rec\.log\(test_acc=\.\.\.\)"):
        METRICS["final_acc"](run)
    with pytest.raises(MissingVariableError, match=r"Recorder\(ics=\.\.\."):
        METRICS["ics_cos_mean"](run)
    assert math.isnan(METRICS["identities"](run))  # nothing logged: no error, no number


def test_last_hidden_site_and_layering():
    run = xr.Dataset(
        coords={"step": [0], "site": ["a", "b", "c"], "sat_threshold": ("site", [1.0, 1.0, np.nan])}
    )
    assert M.last_hidden_site(run) == "b"
    assert M.last_hidden_site(run.assign_coords(sat_threshold=("site", [np.nan] * 3))) == "c"
    with pytest.raises(TypeError):
        M.last_hidden_site("run.zarr")
    tree = ast.parse(Path(M.__file__).read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in modules if m and ("plots" in m or "report" in m or "matplotlib" in m)}

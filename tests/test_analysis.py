"""Tests of the ``ds.ics`` accessor on recorder datasets and on stores, in memory and lazily."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import icstools
from icstools import AnalysisError, Recorder

STEPS = 12


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 10), nn.Sigmoid(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3), nn.Tanh()
    )


def _record(path=None) -> xr.Dataset:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(40, 6, generator=gen) * 3
    rec = Recorder(
        model,
        every=1,
        optimizer=opt,
        probe=probe,
        probe_sample=40,
        path=path,
        chunk_steps=4,
        saturation={"5": 1.0},
    )
    with rec:
        for _ in range(STEPS):
            x = torch.randn(32, 6, generator=gen) * 3
            loss = model(x).pow(2).mean() - model[3](model[2](model[1](model[0](x)))).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
    return rec.to_dataset()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "run.zarr"
    memory = _record()
    _record(path)
    lazy = icstools.open_run(path, chunks={"step": 4})
    return {"memory": memory, "lazy": lazy}


@pytest.fixture(params=["memory", "lazy"])
def ds(request, runs):
    return runs[request.param]


def _units(ds, site):
    return np.flatnonzero(np.asarray(ds.unit_site.values).astype(str) == site)


def test_lazy_store_is_dask_backed_and_equals_the_in_memory_run(runs):
    lazy, memory = runs["lazy"], runs["memory"]
    assert lazy["mean"].chunks is not None
    xr.testing.assert_equal(lazy["mean"].compute(), memory["mean"])


def test_sites_and_site_selection(ds):
    assert ds.ics.sites == ["1:input", "3:input", "5:input"]
    sub = ds.ics.site("3")  # module name of the one recorded role
    assert sub.sizes["unit"] == 7 and list(sub.site.values) == ["3:input"]
    np.testing.assert_array_equal(sub["mean"].values, ds["mean"].values[..., _units(ds, "3:input")])
    np.testing.assert_array_equal(sub["hist"].values, ds["hist"].sel(site=["3:input"]).values)
    with pytest.raises(AnalysisError, match=r"Site 'fc3' does not exist. Expected one of"):
        ds.ics.site("fc3")
    with pytest.raises(TypeError, match="must be a str"):
        ds.ics.site(3)


def test_percentiles_are_the_recorded_quantiles_of_one_unit(ds):
    got = ds.ics.percentiles("5:input", unit=2)
    assert got.dims == ("step", "quantile")
    np.testing.assert_allclose(got["quantile"].values, [0.15, 0.5, 0.85])
    values = ds["probe_sample"].values[:, :, _units(ds, "5:input")[2]]  # [step, 40]: all probe rows
    want = np.quantile(values.astype(np.float64), [0.15, 0.5, 0.85], axis=1).T
    np.testing.assert_allclose(got.values, want, rtol=1e-5, atol=1e-6)
    assert ds.ics.percentiles("5:input").dims == ("step", "unit", "quantile")
    with pytest.raises(AnalysisError, match=r"Quantile 0.33 was not recorded. Expected"):
        ds.ics.percentiles("5:input", q=[0.33])
    with pytest.raises(AnalysisError, match=r"Unit\(s\) \[3\] do not exist"):
        ds.ics.percentiles("5:input", unit=3)
    with pytest.raises(AnalysisError, match=r"Source 'val' does not exist"):
        ds.ics.percentiles("5:input", source="val")


def test_saturation_and_dead_units_equal_numpy_on_the_probe_sample(ds):
    sat = ds.ics.saturation(source="probe")
    assert sat.dims == ("step", "site")
    sample = ds["probe_sample"].values  # [step, 40, unit]: the whole probe batch
    for site, thr in (
        ("1:input", icstools.functional.statistics.SIGMOID_SATURATION),
        ("5:input", 1.0),
    ):
        u = _units(ds, site)
        want = (np.abs(sample[:, :, u]) > thr).mean(axis=(1, 2))
        np.testing.assert_allclose(sat.sel(site=site).values, want, rtol=1e-6)
    assert sat.sel(site="3:input").isnull().all()  # ReLU input: no threshold
    assert float(sat.sel(site="5:input").max()) > 0
    dead = ds.ics.dead_units(source="probe")
    relu = sample[:, :, _units(ds, "3:input")]  # [step, 40, 7]: the whole probe batch
    want = (relu == 0).all(1).sum(1)
    np.testing.assert_array_equal(dead["dead_count"].sel(site="3:input").values, want)
    zero = ds["zero_frac"].sel(source="train").values
    np.testing.assert_array_equal(ds.ics.dead_units()["dead"].values, zero == 1)
    with pytest.raises(AnalysisError, match="how='mode' is not a reduction"):
        ds.ics.saturation(how="mode")


def test_dead_units_counts_units_that_are_all_zero():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].bias[:2] = -100.0  # units 0 and 1 never fire
    rec = Recorder(model, "1", role="output", every=1)
    with rec:
        model(torch.randn(20, 3))
    ds = rec.to_dataset()
    dead = ds.ics.dead_units()
    assert dead["dead"].values[0].tolist() == [True, True, False, False]
    assert int(dead["dead_count"].sel(site="1:output", step=0)) == 2
    assert float(dead["dead_frac"].sel(site="1:output", step=0)) == 0.5


def test_summary_is_a_tidy_table_with_numbers_from_the_run(ds):
    table = ds.ics.summary()
    assert list(table.index) == ["1:input", "3:input", "5:input"]
    last = int(ds.step.values[-1])
    u = _units(ds, "1:input")
    probe = ds.sel(source="probe", step=last)
    row = table.loc["1:input"]
    assert row["units"] == 10 and row["step"] == last
    assert row["mean"] == pytest.approx(float(probe["mean"].values[u].mean()), rel=1e-6)
    assert row["std"] == pytest.approx(float(np.sqrt(probe["var"].values[u]).mean()), rel=1e-6)
    assert row["sat_frac"] == pytest.approx(float(probe["sat_frac"].values[u].mean()), rel=1e-6)
    assert table.loc["1:input", "dead_units"] == 0
    assert np.isfinite(table["w1_std_median"]).all()
    with pytest.raises(AnalysisError, match=r"Step 999 does not exist"):
        ds.ics.summary(step=999)


def test_drift_through_the_accessor_is_lazy_on_a_store_and_equals_in_memory(runs):
    lazy, memory = runs["lazy"], runs["memory"]
    for method in ("samples", "summary"):
        got = lazy.ics.drift("first", ["w1", "ks", "mean_shift"], method=method)
        assert got["w1"].chunks is not None, "drift of a lazy run must stay lazy"
        want = memory.ics.drift("first", ["w1", "ks", "mean_shift"], method=method)
        xr.testing.assert_allclose(got.compute(), want)
    # the summary's drift column is the median over the site's units of that drift
    table = memory.ics.summary()
    w1s = memory.ics.drift(int(memory.step[0]), ["w1_std"]).isel(step=-1)["w1_std"]
    u = _units(memory, "5:input")
    assert table.loc["5:input", "w1_std_median"] == pytest.approx(
        float(np.median(w1s.values[u])), rel=1e-6
    )


def test_drift_and_summary_run_on_a_dask_distributed_cluster(runs):
    distributed = pytest.importorskip("distributed")
    lazy, memory = runs["lazy"], runs["memory"]
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
        distributed.get_task_stream(client) as tasks,
    ):
        got = lazy.ics.drift("previous", ["w1", "psi"]).compute()
        table = lazy.ics.summary()
    assert len(tasks.data) > 0, "the computation did not run on the cluster"
    xr.testing.assert_allclose(got, memory.ics.drift("previous", ["w1", "psi"]))
    want = memory.ics.summary()
    np.testing.assert_allclose(table.to_numpy(float), want.to_numpy(float), rtol=1e-6)

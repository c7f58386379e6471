"""Export (issue 14 item 2): TensorBoard event files read back with TensorBoard's own
EventAccumulator hold the run's values; ``Recorder(on_record=...)`` hands each record over."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import icstools
from icstools import cli
from icstools.analysis.drift import drift, site_aggregate
from icstools.export import export_tensorboard

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

PROBE = 24  # probe_sample keeps every probe value of a unit: an independent reference


def _record(path: Path | None = None, steps: int = 6, **kw) -> icstools.Recorder:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.Sigmoid(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rec = icstools.Recorder(
        model,
        every=1,
        optimizer=opt,
        probe=torch.randn(PROBE, 5),
        probe_sample=PROBE,
        gradients=True,
        path=path,
        chunk_steps=4,
        **kw,
    )
    with rec:
        for _ in range(steps):
            opt.zero_grad()
            loss = model(torch.randn(16, 5) * 3).pow(2).mean()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
    return rec


@pytest.fixture(scope="module")
def run() -> xr.Dataset:
    return _record().to_dataset()


def _read(logdir: Path) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={"scalars": 0, "histograms": 0}
    )
    acc.Reload()
    return acc


def _scalar(acc, tag: str) -> tuple[list[int], np.ndarray]:
    events = acc.Scalars(tag)
    return [e.step for e in events], np.array([e.value for e in events], dtype=np.float32)


def test_tags_are_the_documented_ones(run, tmp_path):
    out = export_tensorboard(run, tmp_path / "tb")
    acc = _read(tmp_path / "tb")
    tags = acc.Tags()
    assert sorted(tags["scalars"]) == sorted(out.scalar_tags)
    assert sorted(tags["histograms"]) == sorted(out.histogram_tags)
    for source in ("train", "probe"):
        for stat in ("mean", "std", "zero_frac", "dead_frac", "nonfinite", "drift_w1_std"):
            assert f"1:input/{source}/{stat}" in tags["scalars"]
            assert f"3:input/{source}/{stat}" in tags["scalars"]
        assert f"1:input/{source}/sat_frac" in tags["scalars"]  # a sigmoid input
        assert f"3:input/{source}/sat_frac" not in tags["scalars"]  # a ReLU input: all NaN
        assert {f"1:input/{source}/hist", f"3:input/{source}/hist"} <= set(tags["histograms"])
    assert {"run/loss", "run/lr", "1:input/grad_norm", "3:input/grad_norm"} <= set(tags["scalars"])
    assert "param/0.weight/param_grad_norm" in tags["scalars"]
    assert "param/0.weight/eff_lr" not in tags["scalars"]  # all NaN (no norm layer follows)


def test_scalars_equal_the_dataset_and_raw_values(run, tmp_path):
    export_tensorboard(run, tmp_path)
    acc = _read(tmp_path)
    steps = run.step.values.tolist()
    f32 = np.float32
    for tag, ref in [
        ("run/loss", run["loss"].values),
        ("run/lr", run["lr"].values),
        ("3:input/grad_norm", run["grad_norm"].sel(site="3:input").values),
        ("param/2.weight/update_ratio", run["update_ratio"].sel(param="2.weight").values),
    ]:
        got_steps, got = _scalar(acc, tag)
        assert got_steps == steps
        np.testing.assert_array_equal(got, ref.astype(f32))
    # probe: the site's statistics from every raw value of the site (numpy on probe_sample)
    sample = run["probe_sample"]  # (step, sample, unit), all PROBE values of each unit
    for site in ("1:input", "3:input"):
        raw = sample.isel(unit=run.unit_site.values == site).values.reshape(len(steps), -1)
        _, mean = _scalar(acc, f"{site}/probe/mean")
        _, std = _scalar(acc, f"{site}/probe/std")
        np.testing.assert_allclose(mean, raw.mean(axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(std, raw.std(axis=1), rtol=1e-4, atol=1e-6)
        _, zero = _scalar(acc, f"{site}/probe/zero_frac")
        np.testing.assert_allclose(zero, (raw == 0).mean(axis=1), atol=1e-6)
        units = sample.isel(unit=run.unit_site.values == site).values  # [step, sample, unit]
        _, dead = _scalar(acc, f"{site}/probe/dead_frac")
        np.testing.assert_allclose(dead, (units == 0).all(axis=1).mean(axis=1), atol=1e-7)
    raw = sample.isel(unit=run.unit_site.values == "1:input").values.reshape(len(steps), -1)
    _, sat = _scalar(acc, "1:input/probe/sat_frac")
    np.testing.assert_allclose(sat, (np.abs(raw) > 4.585).mean(axis=1), atol=1e-6)
    # drift: the analysis layer's value, mean over the site's units
    ref = site_aggregate(drift(run, "first", ["w1_std"], source="train"), "mean")["w1_std"]
    _, got = _scalar(acc, "3:input/train/drift_w1_std")
    np.testing.assert_array_equal(got, ref.sel(site="3:input").values.astype(f32))
    assert got[0] == 0 and got[-1] > 0


def test_histograms_are_the_recorded_ones(run, tmp_path):
    export_tensorboard(run, tmp_path)
    acc = _read(tmp_path)
    sample = run["probe_sample"]
    for site in ("1:input", "3:input"):
        events = acc.Histograms(f"{site}/probe/hist")
        assert [e.step for e in events] == run.step.values.tolist()
        edges = run["hist_edges"].sel(site=site).values.astype(np.float64)
        raw = sample.isel(unit=run.unit_site.values == site).values.reshape(len(events), -1)
        for i, e in enumerate(events):
            h = e.histogram_value
            counts = run["hist"].sel(source="probe", site=site).isel(step=i).values
            np.testing.assert_array_equal(h.bucket, counts)
            np.testing.assert_array_equal(h.bucket_limit[:-1], edges)
            assert h.num == raw[i].size
            # independent: numpy's histogram of all raw values on the same edges
            inner = np.histogram(raw[i][(raw[i] >= edges[0]) & (raw[i] <= edges[-1])], edges)[0]
            np.testing.assert_array_equal(np.asarray(h.bucket)[1:-1], inner)
            assert h.bucket[0] == (raw[i] < edges[0]).sum()
            assert h.min == pytest.approx(min(raw[i].min(), edges[0]))
            assert h.max == pytest.approx(max(raw[i].max(), edges[-1]))
            assert h.sum == pytest.approx(raw[i].astype(np.float64).sum(), rel=1e-5, abs=1e-4)
            assert h.sum_squares == pytest.approx((raw[i].astype(np.float64) ** 2).sum(), rel=1e-5)


def test_logdir_with_events_is_refused_unless_overwrite(run, tmp_path):
    export_tensorboard(run, tmp_path, sources=["probe"], histograms=False, drift_metric=None)
    with pytest.raises(ValueError, match="already holds 1 TensorBoard event file"):
        export_tensorboard(run, tmp_path)
    out = export_tensorboard(run, tmp_path, sources=["train"], overwrite=True)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    assert not any("/probe/" in t for t in _read(tmp_path).Tags()["scalars"])
    assert out.histogram_tags == ["1:input/train/hist", "3:input/train/hist"]
    with pytest.raises(ValueError, match=r"source\(s\) \['test'\] were not recorded"):
        export_tensorboard(run, tmp_path / "x", sources=["test"])


def test_cli_export_of_a_store_and_a_folder_of_runs(tmp_path, capsys):
    for seed in ("a/seed-0.zarr", "b/seed-0.zarr"):
        _record(tmp_path / "runs" / seed, steps=3)
    code = cli.main(
        ["export", str(tmp_path / "runs/a/seed-0.zarr"), "--tensorboard", str(tmp_path / "tb1")]
    )
    out = capsys.readouterr().out
    assert code == 0 and "3 steps" in out and "tensorboard --logdir" in out
    acc = _read(tmp_path / "tb1")
    stored = icstools.open_run(tmp_path / "runs/a/seed-0.zarr")
    np.testing.assert_array_equal(
        _scalar(acc, "run/loss")[1], stored["loss"].values.astype(np.float32)
    )
    code = cli.main(
        [
            "export",
            str(tmp_path / "runs"),
            "--tensorboard",
            str(tmp_path / "tb2"),
            "--source",
            "probe",
        ]
    )
    assert code == 0, capsys.readouterr()
    assert {p.name for p in (tmp_path / "tb2").iterdir()} == {"a", "b"}
    assert "1:input/probe/hist" in _read(tmp_path / "tb2" / "b" / "seed-0").Tags()["histograms"]
    # user mistakes: exit 2, one line naming the problem
    assert cli.main(["export", str(tmp_path / "nope"), "--tensorboard", str(tmp_path / "t")]) == 2
    assert "no such run or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["export", str(tmp_path / "empty"), "--tensorboard", str(tmp_path / "t")]) == 2
    assert "neither a run store nor a folder" in capsys.readouterr().err
    args = ["export", str(tmp_path / "runs/a/seed-0.zarr"), "--tensorboard", str(tmp_path / "tb1")]
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*args, "--overwrite"]) == 0


# ------------------------------------------------------------------ on_record


def test_on_record_gets_each_record_as_a_one_step_dataset(tmp_path):
    got: list[xr.Dataset] = []
    rec = _record(tmp_path / "run.zarr", on_record=got.append)
    full = rec.to_dataset()
    assert [int(d.step[0]) for d in got] == full.step.values.tolist()
    for i, d in enumerate(got):
        assert d.sizes["step"] == 1
        xr.testing.assert_identical(d.drop_attrs(), full.isel(step=[i]).drop_attrs())
    assert rec.on_record_errors == 0


def test_on_record_in_memory_is_called_as_records_close():
    seen: list[int] = []
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with icstools.Recorder(
        model, every=2, optimizer=opt, on_record=lambda d: seen.append(d.step.item())
    ) as rec:
        for step in range(5):
            opt.zero_grad()
            model(torch.randn(8, 3)).sum().backward()
            opt.step()
            # the record of step s closes at the next training forward (or the end)
            assert seen == list(range(0, step, 2))
    assert seen == [0, 2, 4] and rec.n_records == 3


def test_a_failing_on_record_is_warned_once_and_loses_no_record(tmp_path):
    calls = []

    def flaky(ds: xr.Dataset) -> None:
        calls.append(ds.step.item())
        raise ConnectionError("tracking server unreachable")

    with pytest.warns(
        RuntimeWarning,
        match=r"callback .*flaky failed at step 0 \(ConnectionError: tracking server unreachable",
    ) as caught:
        rec = _record(tmp_path / "run.zarr", on_record=flaky)
    assert len([w for w in caught if "on_record" in str(w.message)]) == 1
    assert calls == list(range(6)) and rec.on_record_errors == 6
    stored = icstools.open_run(tmp_path / "run.zarr")
    assert stored.step.values.tolist() == list(range(6))
    np.testing.assert_array_equal(stored["loss"].values, rec.to_dataset()["loss"].values)


def test_on_record_must_be_callable(tmp_path):
    with pytest.raises(TypeError, match=r"on_record must be a callable taking one xarray\.Dataset"):
        icstools.Recorder(
            nn.Sequential(nn.Linear(2, 2), nn.ReLU()), on_record="wandb", path=tmp_path / "r.zarr"
        )
    assert not (tmp_path / "r.zarr").exists()


def test_readme_on_record_example_runs(tmp_path, monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Export: TensorBoard, W&B, MLflow", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "README lost its export example"
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)  # warnings are errors here
    rows = namespace["rows"]
    ds = namespace["rec"].to_dataset()
    assert [r["step"] for r in rows] == ds.step.values.tolist()
    acc = _read(tmp_path / "tb" / "readme")
    assert "run/loss" in acc.Tags()["scalars"] and acc.Tags()["histograms"]


def test_a_diverged_run_exports_nan_scalars_and_skips_empty_histograms(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e6)  # diverges within a few steps
    with icstools.Recorder(model, every=1, optimizer=opt) as rec:
        for _ in range(8):
            opt.zero_grad()
            loss = model(torch.randn(16, 4) * 100).pow(2).mean()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
    ds = rec.to_dataset()
    assert ds.attrs["diverged_step"] < 7  # the scenario did diverge
    export_tensorboard(ds, tmp_path)  # no warning, no error: warnings are errors here
    acc = _read(tmp_path)
    counts = ds["hist"].sel(source="train", site="1:input").sum("bin").values
    assert [e.step for e in acc.Histograms("1:input/train/hist")] == ds.step.values[
        counts > 0
    ].tolist()
    _, mean = _scalar(acc, "1:input/train/mean")
    assert len(mean) == 8 and np.isnan(mean[-1]) and np.isfinite(mean[0])

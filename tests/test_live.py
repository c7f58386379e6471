"""The live view (issue 14 item 1): ``icstools.live(source)`` follows a Recorder in this process
or a store another process writes.

The series it draws are compared with the whole run computed independently (xarray groupby,
the analysis layer's drift on the full dataset, numpy); the feeds with what was written;
training with and without the view is compared bit for bit. Two notebooks run in a real
Jupyter kernel (nbclient): one trains with ``icstools.live(rec)``, one follows a store that a
subprocess writes; both count the view's updates as records commit.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import icstools
from icstools.analysis.drift import drift, site_aggregate
from icstools.liveview import LiveData, StoreFeed
from icstools.liveview.figure import draw, png_bytes
from icstools.liveview.view import LiveView

ROOT = Path(__file__).parents[1]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, 16), nn.Sigmoid(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    )


def _train(rec_kwargs=None, steps=40, view=None, lr=0.5, seed=0):
    """Train a small model (recording every 2 steps, gradients on); with ``view(rec)`` a live
    view is made before training. Returns the model, the recorder and the view."""
    model = _model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    probe = torch.randn(64, 10, generator=gen)
    rec = icstools.Recorder(
        model, every=2, optimizer=opt, probe=probe, gradients=True, **(rec_kwargs or {})
    )
    v = view(rec) if view is not None else None
    with rec:
        for _ in range(steps):
            x, y = torch.randn(32, 10, generator=gen), torch.randint(0, 3, (32,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
    return model, rec, v


@pytest.fixture(scope="module")
def run() -> xr.Dataset:
    return _train(steps=60)[1].to_dataset()


def _site_groupby(ds: xr.Dataset, var: str, source: str, fn) -> np.ndarray:
    da = ds[var].sel(source=source)
    out = da.groupby("unit_site").map(fn).transpose("step", "unit_site")
    return out.sel(unit_site=list(ds.site.values)).values


@pytest.mark.parametrize("sizes", [[30], [1, 2, 7, 20], [5] * 6])
def test_live_data_equals_the_whole_run_computed_at_once(run, sizes):
    data = LiveData()
    start = 0
    for n in sizes:
        assert data.add(run.isel(step=slice(start, start + n))) == n
        start += n
    assert data.add(run.isel(step=slice(0, start))) == 0  # nothing newer: nothing taken in
    ds = run.isel(step=slice(0, start))
    np.testing.assert_array_equal(data.steps, ds.step.values)
    assert data.sites == ["1:input", "3:input"] and data.sat_sites == ["1:input"]
    for source in data.sources:
        ref = site_aggregate(
            drift(ds, "previous", ["w1_std"], source=source, method="summary")[["w1_std"]],
            "median",
        )["w1_std"].transpose("step", "site")
        np.testing.assert_allclose(data.site_series("drift", source), ref.values, rtol=1e-12)
        sat = _site_groupby(ds, "sat_frac", source, lambda g: g.mean("unit"))
        np.testing.assert_allclose(data.site_series("sat", source), sat, rtol=1e-6)
        dead = _site_groupby(ds, "zero_frac", source, lambda g: (g == 1).mean("unit"))
        np.testing.assert_allclose(data.site_series("dead", source), dead)
        q = ds.quantile_value.sel(source=source, quantile=[0.15, 0.5, 0.85])
        for site in data.sites:
            unit0 = q.where(q.unit_site == site, drop=True).isel(unit=0)
            np.testing.assert_array_equal(data.band(site, source, 0), unit0.values)
            per_unit = q.where(q.unit_site == site, drop=True).values  # [step, unit, 3]
            np.testing.assert_allclose(data.band(site, source, None), np.median(per_unit, 1))
    np.testing.assert_allclose(data.series["grad_norm"], ds.grad_norm.sel(site=data.sites))
    np.testing.assert_allclose(data.series["loss"], ds.loss.values)
    assert data.diverged_step is None


def test_thinning_keeps_every_kth_record_and_the_latest(run):
    data = LiveData(max_records=8)
    for start in range(0, 30, 3):
        data.add(run.isel(step=slice(start, start + 3)))
    assert data.n_records == 30 and data.stride == 8  # 0, 8, 16, 24 and 29
    index = np.arange(30)
    keep = (index % 8 == 0) | (index == 29)
    np.testing.assert_array_equal(data.steps, run.step.values[:30][keep])
    # the drift of a kept record is still against the record just before it
    ref = site_aggregate(
        drift(run.isel(step=slice(0, 30)), "previous", ["w1_std"], method="summary")[["w1_std"]],
        "median",
    )["w1_std"].transpose("step", "site")
    np.testing.assert_allclose(data.site_series("drift", "probe"), ref.values[keep], rtol=1e-12)


def test_a_diverged_run_is_kept_and_drawn(run):
    """As a diverged run records them: ±inf and NaN activations from step 20, NaN loss."""
    ds = run.isel(step=slice(0, 16)).copy(deep=True)
    late = ds.step >= 20
    for var in ("quantile_value", "min", "max", "mean", "var", "grad_norm"):
        ds[var] = ds[var].where(~late, np.inf if var in ("max", "var") else np.nan)
    ds["nonfinite"] = ds["nonfinite"].where(~late, 1.0)
    ds["loss"] = ds["loss"].where(~late, np.nan)
    data = LiveData()
    for start in range(0, 16, 4):
        data.add(ds.isel(step=slice(start, start + 4)))
    assert data.diverged_step == 20 and data.n_records == 16
    assert np.isnan(data.site_series("drift", "probe")[10:]).all()
    for site, unit in (("3:input", None), ("1:input", 2)):
        fig = draw(data, site, "probe", unit, status="diverged")
        assert png_bytes(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_figure_follows_the_selection(run):
    data = LiveData()
    data.add(run)
    titles = [
        draw(data, site, source, unit).axes[0].get_title()
        for site, source, unit in [("1:input", "probe", None), ("3:input", "train", 5)]
    ]
    assert titles == [
        "1:input (probe), median over units: percentiles",
        "3:input (train), unit 5: percentiles",
    ]
    empty = draw(LiveData(), None, None)
    assert empty.axes[0].texts[0].get_text() == "waiting for the first record"


def test_store_feed_waits_then_reads_only_the_new_commits(tmp_path, run):
    path = tmp_path / "run.zarr"
    feed = StoreFeed(path)
    blocks, status = feed.poll()
    assert blocks == [] and "waiting for the run store" in status and not feed.done()
    writer = icstools.store.RunWriter(path, chunk_steps=4)
    seen = []
    for start in (0, 5, 11):
        writer.append(run.isel(step=slice(start, start + [5, 6, 9][len(seen)])))
        blocks, status = feed.poll()
        assert len(blocks) == 1 and not feed.done()  # the writer still holds the store
        seen.append(blocks[0].step.values.tolist())
        assert feed.poll()[0] == []  # nothing new since
    writer.close()
    assert seen == [run.step.values[a:b].tolist() for a, b in [(0, 5), (5, 11), (11, 20)]]
    assert feed.done() and feed.n_read == 20


def test_recorder_view_follows_stops_on_detach_and_changes_nothing():
    views = []

    def watch(rec):
        views.append(icstools.live(rec, display=False, interval=0.05))
        assert views[-1].wait_ready(120), views[-1].status  # the worker process is up
        return views[-1]

    plain_model, plain_rec, _ = _train(steps=40)
    model, rec, view = _train(steps=40, view=watch)
    assert view.wait(120), view.status
    assert view.state == "finished" and view.error is None, view.status
    assert view.n_records == rec.n_records == 20 == view.forwarded
    assert view.updates >= 1 and view.draws >= 2 and view.png[:4] == b"\x89PNG"
    assert rec._sink.taps == []  # the tap is removed when the view ends
    for a, b in zip(plain_model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    xr.testing.assert_identical(plain_rec.to_dataset(), rec.to_dataset())
    view.stop()
    assert view._process.wait(60) == 0 and not view.running
    # a view of a recorder that never records waits, and stops on request
    idle = icstools.Recorder(_model(), every=1, probe=torch.randn(8, 10))
    waiting = icstools.live(idle, display=False, interval=0.05)
    assert waiting.wait_ready(120) and waiting.running
    deadline = time.monotonic() + 60
    while "waiting for the first record" not in waiting.status and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "waiting for the first record (not attached yet)" in waiting.status
    waiting.stop()
    assert waiting.state == "stopped" and not waiting.running and idle._sink.taps == []
    waiting.stop()  # twice is fine


def test_outside_jupyter_an_error_says_what_to_do_or_a_png_is_written(tmp_path):
    rec = icstools.Recorder(_model(), every=1)
    with pytest.raises(RuntimeError, match=r"save=.live\.png."):
        icstools.live(rec)
    with pytest.raises(RuntimeError, match="not one"):
        icstools.live(rec, display=True)
    with pytest.raises(TypeError, match=r"Recorder .* or the path of a run store"):
        icstools.live(42)
    for bad in ({"interval": 0}, {"max_busy": 1.5}, {"max_records": 2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            icstools.live(rec, display=False, **bad)
    png = tmp_path / "live.png"
    view = icstools.live(tmp_path / "none.zarr", save=png, interval=0.05)
    assert view.wait_ready(120)
    view.stop()
    assert png.read_bytes()[:4] == b"\x89PNG" and "waiting for the run store" in view.status


@pytest.mark.slow  # ~15 s on 2 idle cores: a worker process, redraws for each selection
def test_widgets_select_site_source_and_unit(run, tmp_path):
    pytest.importorskip("ipywidgets")
    path = tmp_path / "run.zarr"
    writer = icstools.store.RunWriter(path, chunk_steps=8)
    writer.append(run)
    writer.close()
    view = LiveView(
        StoreFeed(path),
        site=None,
        activations=None,
        interval=0.05,
        max_busy=1.0,
        max_records=100,
        save=None,
        widgets=True,
    )
    view.start()
    assert view.wait(120) and view.n_records == run.sizes["step"], view.status
    w = view._w
    assert list(w["site"].options) == ["1:input", "3:input"] and w["site"].value == "1:input"
    assert w["source"].value == "probe" and "finished" in w["status"].value
    draws = view.draws
    w["site"].value = "3:input"  # a finished view still redraws for another selection
    w["source"].value = "train"
    w["unit"].value = 3
    deadline = time.monotonic() + 60
    while view.info.get("unit") != 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (view.info["site"], view.info["activations"], view.info["unit"]) == (
        "3:input",
        "train",
        3,
    )
    assert view.draws > draws and w["image"].value == view.png
    view.stop()


# ------------------------------------------------------------------------------ notebooks


def _execute(cells: list[str], tmp: Path, timeout: int = 300):
    """Run ``cells`` in a fresh ipykernel of this interpreter; the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipywidgets")
    spec = tmp / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "test", "language": "python"})
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
        mp.setenv("JUPYTER_PLATFORM_DIRS", "1")
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        mp.delenv("MPLBACKEND", raising=False)
        client = nbclient.NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(tmp)}}
        )
        client.execute()
    return nb


def _result(nb) -> dict:
    text = "".join(
        o.get("text", "") for c in nb.cells for o in c.outputs if o.get("name") == "stdout"
    )
    line = [x for x in text.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


def _widget_views(nb) -> int:
    return sum(
        "application/vnd.jupyter.widget-view+json" in o.get("data", {})
        for c in nb.cells
        for o in c.outputs
    )


TRAIN = """
import json, time, torch, icstools
from torch import nn

def train(watch, steps=240):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    rec = icstools.Recorder(model, every=2, optimizer=opt, probe=torch.randn(64, 10, generator=gen),
                            gradients=True)
    view = icstools.live(rec, interval=0.1) if watch else None
    if watch:
        assert view.wait_ready(120), view.status  # the worker process is up
    seen = []
    with rec:
        for step in range(steps):
            x, y = torch.randn(32, 10, generator=gen), torch.randint(0, 3, (32,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step(); rec.log(loss=loss)
            if watch and step % 80 == 79:  # the view catches up (its worker runs at nice 10)
                deadline = time.monotonic() + 120
                while view.n_records < rec.n_records and time.monotonic() < deadline:
                    time.sleep(0.05)
                seen.append([view.updates, view.n_records, rec.n_records])
    return model, rec, view, seen
"""


@pytest.mark.slow  # a Jupyter kernel and the view's worker: 30-130 s on 2 shared cores
@pytest.mark.timeout(600)
def test_notebook_trains_with_a_live_view_of_the_recorder(tmp_path):
    nb = _execute(
        [
            TRAIN,
            "model, rec, view, seen = train(watch=True)",
            textwrap.dedent("""
            finished = view.wait(60)
            plain_model, plain_rec, _, _ = train(watch=False)
            identical = all(torch.equal(a, b) for a, b in
                            zip(model.state_dict().values(), plain_model.state_dict().values()))
            same_data = rec.to_dataset().identical(plain_rec.to_dataset())
            print("RESULT " + json.dumps(dict(
                seen=seen, finished=finished, updates=view.updates, n_records=view.n_records,
                recorded=rec.n_records, draws=view.draws, error=view.error, state=view.state,
                identical=identical, same_data=same_data, taps=len(rec._sink.taps))))
            """),
        ],
        tmp_path,
    )
    r = _result(nb)
    assert _widget_views(nb) == 1  # the widget was shown in the cell that trains
    assert r["finished"] and r["state"] == "finished" and r["error"] is None
    assert r["n_records"] == r["recorded"] == 120 and r["taps"] == 0
    # while training, the view took in every record closed so far: 40, 80, 120
    assert [s[1:] for s in r["seen"]] == [[40, 40], [80, 80], [120, 120]], r["seen"]
    updates = [u for u, _, _ in r["seen"]]
    assert 1 <= updates[0] < updates[1] < updates[2] <= r["updates"] and r["draws"] >= 2
    assert r["identical"] and r["same_data"]


WRITER = """
import sys, time, torch, icstools
from pathlib import Path
from torch import nn
torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(10, 32), nn.Sigmoid(), nn.Linear(32, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.5)
time.sleep(1.0)  # the notebook's view starts before the store exists
rec = icstools.Recorder(model, every=2, optimizer=opt, probe=torch.randn(64, 10), path=sys.argv[1],
                        chunk_steps=8, flush_seconds=0.2)
with rec:
    for step in range(240):
        loss = nn.functional.cross_entropy(model(torch.randn(32, 10)), torch.randint(0, 3, (32,)))
        opt.zero_grad(); loss.backward(); opt.step(); rec.log(loss=loss)
        if step % 80 == 79 and step < 239:  # commit, then wait for the notebook's go-ahead
            rec.flush()
            go = Path(sys.argv[1] + f".go{step // 80}")
            deadline = time.monotonic() + 120
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
"""


@pytest.mark.slow  # a Jupyter kernel, the view's worker and a training subprocess
@pytest.mark.timeout(600)
def test_notebook_follows_a_store_written_by_a_subprocess(tmp_path):
    (tmp_path / "writer.py").write_text(WRITER)
    nb = _execute(
        [
            textwrap.dedent(f"""
            import json, subprocess, sys, time, icstools
            path = {str(tmp_path / "run.zarr")!r}
            view = icstools.live(path, interval=0.1)
            assert view.wait_ready(120), view.status
            waiting = view.status
            proc = subprocess.Popen([sys.executable, {str(tmp_path / "writer.py")!r}, path])
            seen = []
            for phase in range(2):  # the view takes in each commit while the writer waits
                deadline = time.monotonic() + 120
                while view.n_records < 40 * (phase + 1) and time.monotonic() < deadline:
                    time.sleep(0.05)
                seen.append([view.updates, view.n_records, view.running])
                open(path + f".go{{phase}}", "w").close()
            proc.wait(300)
            finished = view.wait(120)
            total = icstools.open_run(path).sizes["step"]
            print("RESULT " + json.dumps(dict(
                waiting=waiting, seen=seen, finished=finished, updates=view.updates,
                n_records=view.n_records, total=total, rc=proc.returncode, error=view.error)))
            """)
        ],
        tmp_path,
    )
    r = _result(nb)
    assert _widget_views(nb) == 1
    assert r["rc"] == 0 and r["finished"] and r["error"] is None
    assert "waiting for the run store" in r["waiting"]
    assert [s[1:] for s in r["seen"]] == [[40, True], [80, True]], r["seen"]
    assert 1 <= r["seen"][0][0] < r["seen"][1][0] < r["updates"]
    assert r["n_records"] == r["total"] == 120

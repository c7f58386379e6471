"""Presets on a dask cluster (issue 13, item 7): ``icstools run PRESET --workers N`` and
``--scheduler ADDRESS`` give each run bit for bit the serial run's store; a run that fails in
its worker is reported and the others kept; progress on stderr; Ctrl-C leaves a manifest that
``--resume`` finishes.

Before: ``icstools run`` had neither option (argparse: "unrecognized arguments: --workers 2").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import dask
import numpy as np
import pytest

from icstools import cli
from icstools.experiments import PRESETS, get_preset, load_manifest, run_preset
from icstools.experiments.cluster import ClusterError, RunsFailedError
from icstools.store import live_writer, open_run

distributed = pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parents[1]
# 2 conditions × 2 seeds of 3 steps: 4 small runs
ARGV = ["run", "fig1", "--steps", "3", "--seeds", "2", "--quiet", "--out", "runs"]


@pytest.fixture(autouse=True)
def _mnist(monkeypatch):
    if not os.environ.get("ICSTOOLS_DATA"):
        monkeypatch.setenv("ICSTOOLS_DATA", str(ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def cluster():
    """A dask cluster of 2 worker processes started here, as a user's ``dask scheduler``."""
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.CRITICAL,
    ) as c:
        yield c


def run_cli(capsys, cwd: Path, *argv: str) -> tuple[int, str, str]:
    cwd.mkdir(parents=True, exist_ok=True)
    old = Path.cwd()
    os.chdir(cwd)  # the same relative --out everywhere: the stores' attributes name it
    try:
        code = cli.main(list(argv))
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    return code, out, err


def config_path(ds) -> str:
    """The store path the recorder's configuration names (popped from ``ds.attrs``)."""
    config = json.loads(ds.attrs["recorder_config"])
    path = config.pop("path")
    ds.attrs["recorder_config"] = json.dumps(config)
    return path


def assert_same_runs(folder_a: Path, folder_b: Path, *, same_path: bool = True) -> None:
    """The manifests list the same runs, whose stores hold the same dataset bit for bit.

    ``same_path=False``: the recorder configurations may name the store differently (a worker
    in another working directory names it by its absolute path).
    """
    a, b = load_manifest(folder_a), load_manifest(folder_b)
    assert a.complete and b.complete
    assert [r.path for r in a.runs] == [r.path for r in b.runs]
    for ra, rb in zip(a.runs, b.runs, strict=True):
        da, db = open_run(a.run_path(ra)), open_run(b.run_path(rb))
        if not same_path:
            assert config_path(da) == f"runs/fig1/{ra.path}"
            assert Path(config_path(db)) == b.run_path(rb).absolute()
        assert da.attrs == db.attrs  # recorder configuration, seed, n_committed...
        assert set(da.variables) == set(db.variables) and da.sizes == db.sizes
        for name in da.variables:  # coordinates and data variables, NaN payloads included
            x, y = da[name].values, db[name].values
            assert x.dtype == y.dtype and x.shape == y.shape, (ra.path, name)
            assert x.tobytes() == y.tobytes(), (ra.path, name)
        fields = {**ra.to_dict(), "wall_time": None}
        assert fields == {**rb.to_dict(), "wall_time": None}  # accuracy, loss, records...


def test_workers_2_equals_the_serial_sweep_bit_for_bit(tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path / "serial", *ARGV)
    assert code == 0, err
    code, out, err = run_cli(capsys, tmp_path / "cluster", *ARGV, "--workers", "2")
    assert code == 0, err
    assert_same_runs(tmp_path / "serial/runs/fig1", tmp_path / "cluster/runs/fig1")
    # progress: one line per finished run, on stderr, k/total
    done = re.findall(r"icstools: run (\d)/4 finished: (\w+/seed-\d\.zarr) \(test acc", err)
    assert [k for k, _ in done] == ["1", "2", "3", "4"]
    assert sorted(rel for _, rel in done) == [
        "baseline/seed-0.zarr", "baseline/seed-1.zarr", "bn/seed-0.zarr", "bn/seed-1.zarr"
    ]  # fmt: skip
    assert "running 4 of 4 runs on the dask cluster at tcp://" in err and "(2 workers)" in err
    assert "manifest: runs/fig1/manifest.json" in out
    m = load_manifest(tmp_path / "cluster/runs/fig1")
    assert m.command[-2:] == ["--workers", "2"] and "workers=2" in m.call


def test_scheduler_runs_on_an_existing_cluster(tmp_path, capsys, cluster):
    argv = [*ARGV[:5], "1", *ARGV[6:]]  # --seeds 1: 2 runs
    code, _, err = run_cli(capsys, tmp_path / "serial", *argv)
    assert code == 0, err
    address = cluster.scheduler_address
    code, _, err = run_cli(capsys, tmp_path / "cluster", *argv, "--scheduler", address)
    assert code == 0, err
    assert f"running 2 of 2 runs on the dask cluster at {address} (2 workers)" in err
    # the workers run elsewhere (the repository): the stores name their absolute path
    assert_same_runs(tmp_path / "serial/runs/fig1", tmp_path / "cluster/runs/fig1", same_path=False)
    # --resume on the cluster keeps them all; --workers and --scheduler exclude each other
    code, _, err = run_cli(capsys, tmp_path / "cluster", *argv, "--scheduler", address, "--resume")
    assert code == 0 and err.count("icstools: kept ") == 2 and "running 0 of 2 runs" in err
    code, _, err = run_cli(capsys, tmp_path, *argv, "--scheduler", address, "--workers", "2")
    assert code == 2 and "not allowed with argument" in err


def test_a_failed_run_is_reported_and_the_others_kept(tmp_path, capsys, cluster, monkeypatch):
    fig1 = get_preset("fig1")
    broken = dataclasses.replace(
        fig1.condition("bn"), name="broken", kwargs={"bn": True, "no_such_option": 1}
    )
    preset = dataclasses.replace(fig1, name="broken", conditions=(fig1.condition("bn"), broken))
    monkeypatch.setitem(PRESETS, "broken", preset)
    argv = ["run", "broken", "--steps", "3", "--seeds", "2", "--quiet", "--out", "runs"]
    code, out, err = run_cli(capsys, tmp_path, *argv, "--scheduler", cluster.scheduler_address)
    assert code == 1  # a bug in the model factory, not a user mistake
    for seed in (0, 1):
        assert re.search(
            rf"icstools: run \d/4 FAILED: broken/seed-{seed} \(broken/seed-{seed}\.zarr\): "
            r"TypeError: .*unexpected keyword argument 'no_such_option'",
            err,
        ), err
    last = err.strip().splitlines()[-1]
    assert last.startswith("icstools: error: 2 of 4 runs of 'broken' failed: broken/seed-0")
    assert "the 2 others are kept in runs/broken/manifest.json" in last and "--resume" in last
    m = load_manifest(tmp_path / "runs/broken")
    assert not m.complete and [r.path for r in m.runs] == ["bn/seed-0.zarr", "bn/seed-1.zarr"]
    assert re.search(r"^bn +0 ", out, re.M) and re.search(r"^bn +1 ", out, re.M)  # summary
    for run in m.runs:
        ds = open_run(m.run_path(run))
        assert ds.sizes["step"] == 3 and np.isfinite(ds["loss"].values).all()
    # every run fails on a user mistake (no MNIST there): exit 2
    with pytest.raises(RunsFailedError) as info:
        run_preset(
            "fig1", steps=3, seeds=1, out=tmp_path / "nodata", progress=False,
            data_dir=tmp_path / "empty", scheduler=cluster.scheduler_address,
        )  # fmt: skip
    assert info.value.user_error and len(info.value.failures) == 2
    assert all(f.error.startswith("MNISTNotFoundError: MNIST") for f in info.value.failures)


@pytest.mark.slow  # its own local cluster, then a serial --resume: ~90 s on 2 busy cores
def test_ctrl_c_leaves_a_manifest_that_resume_finishes(tmp_path):
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if " finished: " in line:
            raise KeyboardInterrupt  # Ctrl-C once the first run is done

    kw = {"steps": 3, "seeds": 2, "out": tmp_path, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        run_preset("fig1", workers=2, log=log, **kw)
    first = re.search(r"run 1/4 finished: (\S+)", lines[-2]).group(1)
    assert lines[-1].startswith("interrupted after 1 of 4 runs: the manifest lists the 1")
    folder = tmp_path / "fig1"
    m = load_manifest(folder)
    assert not m.complete and [r.path for r in m.runs] == [first]
    # the local workers are gone: no store is still being written
    assert all(live_writer(p) is None for p in folder.glob("*/*.zarr"))
    kept = {p: p.read_bytes() for p in (folder / first).rglob("*") if p.is_file()}
    lines.clear()
    m = run_preset("fig1", resume=True, log=lines.append, threads=1, **kw)
    assert m.complete and len(m.runs) == 4
    assert f"kept {first}: finished (3 steps, 3 records)" in lines
    assert {p: p.read_bytes() for p in (folder / first).rglob("*") if p.is_file()} == kept


def test_bad_cluster_options_are_errors_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(ClusterError, match="workers must be an int ≥ 1, got 0"):
        run_preset("fig1", steps=3, out=tmp_path, workers=0)
    with pytest.raises(ClusterError, match="not both"):
        run_preset("fig1", steps=3, out=tmp_path, workers=1, scheduler="tcp://127.0.0.1:1")
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):  # nothing on port 1
        code, _, err = run_cli(capsys, tmp_path, *ARGV, "--scheduler", "tcp://127.0.0.1:1")
    assert code == 2
    assert err.startswith("icstools: error: cannot connect to the dask scheduler at")
    assert not (tmp_path / "runs").exists()
    code, _, err = run_cli(capsys, tmp_path, *ARGV, "--workers", "0")
    assert code == 2 and "expected a whole number ≥ 1, got 0" in err
    assert not (tmp_path / "runs").exists()

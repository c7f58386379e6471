"""Running a preset into an --out that holds runs (issue 13, item 6): refused by default,
--resume finishes unfinished runs and keeps finished ones, --force replaces them all; report
uses only the runs a manifest lists.

Before: ``icstools run`` into such a folder exited 0, replaced seed 0 with a shorter run, left
the old seed 1 behind, and ``report`` pooled both as seeds of one condition.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from icstools import cli
from icstools.experiments import PresetError, RunsExistError, load_manifest, run_preset
from icstools.store import RunWriter, StoreError, open_run

ROOT = Path(__file__).resolve().parents[1]
KW = {"steps": 2, "conditions": ["bn"], "progress": False}


@pytest.fixture(autouse=True)
def _mnist(monkeypatch):
    if not os.environ.get("ICSTOOLS_DATA"):
        monkeypatch.setenv("ICSTOOLS_DATA", str(ROOT.parent / "shared" / "data"))


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes (to show nothing was touched)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_refuses_an_out_that_holds_runs_and_lists_them(tmp_path, capsys):
    m = run_preset("fig1", seeds=2, out=tmp_path, **KW)
    folder = tmp_path / "fig1"
    before = files_of(folder)
    with pytest.raises(RunsExistError) as info:
        run_preset("fig1", seeds=1, out=tmp_path, **KW)
    message = str(info.value)
    for rel in ("bn/seed-0.zarr", "bn/seed-1.zarr"):
        assert f"{rel} (listed in the manifest)" in message
    assert "--resume" in message and "--force" in message
    assert files_of(folder) == before  # nothing touched, the manifest neither
    # the command: exit 2, one line naming the runs
    argv = ["run", "fig1", "--steps", "2", "--seeds", "1", "--conditions", "bn", "--quiet"]
    code, out, err = run_cli(capsys, *argv, "--out", str(tmp_path))
    assert code == 2 and out == ""
    assert err.startswith(f"icstools: error: {folder} already holds runs of the preset 'fig1'")
    assert "bn/seed-1.zarr (listed in the manifest)" in err and err.count("\n") == 1
    assert files_of(folder) == before
    assert [r.seed for r in load_manifest(folder).runs] == [r.seed for r in m.runs] == [0, 1]


def _interrupt(folder: Path, seed: int) -> None:
    """The state a run killed during ``seed`` leaves: its store holds fewer records, the
    manifest does not list it and is not complete."""
    data = json.loads((folder / "manifest.json").read_text())
    data["runs"] = [r for r in data["runs"] if r["seed"] != seed]
    data["complete"] = False
    (folder / "manifest.json").write_text(json.dumps(data))


def test_resume_keeps_finished_runs_and_runs_the_others_again(tmp_path, capsys):
    reference = run_preset("fig1", seeds=3, out=tmp_path / "ref", **KW)
    out = tmp_path / "runs"
    run_preset("fig1", seeds=3, out=out, **KW)
    folder = out / "fig1"
    _interrupt(folder, seed=2)  # killed during seed 2
    (folder / "bn" / "seed-1.zarr" / "loss" / "0").unlink()  # seed 1's store is damaged
    kept = files_of(folder / "bn" / "seed-0.zarr")
    argv = ["run", "fig1", "--steps", "2", "--seeds", "3", "--conditions", "bn", "--quiet"]
    code, _, err = run_cli(capsys, *argv, "--out", str(out), "--resume")
    assert code == 0, err
    assert "icstools: kept bn/seed-0.zarr: finished (2 steps" in err
    assert "icstools: running bn/seed-1.zarr again from scratch: its store is damaged" in err
    assert (
        "icstools: running bn/seed-2.zarr again from scratch: its run did not finish (the "
        "presets save no training checkpoints to resume it from)" in err
    )
    assert files_of(folder / "bn" / "seed-0.zarr") == kept  # not rewritten
    m = load_manifest(folder)
    assert m.complete and [r.seed for r in m.runs] == [0, 1, 2]
    assert m.command[-1] == "--resume"
    for run, ref in zip(m.runs, reference.runs, strict=True):  # as an uninterrupted run
        ds, dr = open_run(m.run_path(run)), open_run(reference.run_path(ref))
        for var in ("loss", "mean", "quantile_value", "test_acc"):
            np.testing.assert_array_equal(ds[var].values, dr[var].values, err_msg=var)
        assert run.final_test_acc == ref.final_test_acc
    # resuming a finished folder runs nothing
    code, _, err = run_cli(capsys, *argv, "--out", str(out), "--resume")
    assert code == 0 and err.count("kept bn/") == 3 and "again" not in err


def test_resume_needs_the_same_configuration(tmp_path):
    run_preset("fig1", seeds=1, out=tmp_path, **KW)
    folder = tmp_path / "fig1"
    before = files_of(folder)
    with pytest.raises(PresetError, match=r"configuration differs in steps \(2 there, 3 now\)"):
        run_preset("fig1", seeds=1, out=tmp_path, resume=True, **{**KW, "steps": 3})
    with pytest.raises(PresetError, match=r"seeds \(\[0\] there, \[0, 1\] now\)"):
        run_preset("fig1", seeds=2, out=tmp_path, resume=True, **KW)
    with pytest.raises(PresetError, match="not both"):
        run_preset("fig1", seeds=1, out=tmp_path, resume=True, force=True, **KW)
    assert files_of(folder) == before


def test_resume_without_a_manifest_is_refused(tmp_path):
    run_preset("fig1", seeds=1, out=tmp_path, **KW)
    (tmp_path / "fig1" / "manifest.json").unlink()
    with pytest.raises(PresetError, match=r"it has no manifest\.json.*use --force"):
        run_preset("fig1", seeds=1, out=tmp_path, resume=True, **KW)


def test_force_replaces_the_runs_and_removes_unlisted_ones(tmp_path, capsys):
    run_preset("fig1", seeds=2, out=tmp_path, steps=3, conditions=["bn"], progress=False)
    folder = tmp_path / "fig1"
    shutil.copytree(folder / "bn" / "seed-1.zarr", folder / "bn" / "seed-7.zarr")  # a stray
    argv = ["run", "fig1", "--steps", "2", "--seeds", "1", "--conditions", "baseline,bn"]
    code, _, err = run_cli(capsys, *argv, "--quiet", "--out", str(tmp_path), "--force")
    assert code == 0, err
    assert "icstools: removed bn/seed-7.zarr (--force)" in err
    m = load_manifest(folder)
    assert [(r.condition, r.seed) for r in m.runs] == [("baseline", 0), ("bn", 0)]
    stores = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*.zarr"))
    assert stores == ["baseline/seed-0.zarr", "bn/seed-0.zarr"]  # only what the manifest lists
    assert open_run(folder / "bn" / "seed-0.zarr")["step"].values.max() < 2  # the new, shorter


def test_a_run_being_written_is_never_touched(tmp_path):
    run_preset("fig1", seeds=1, out=tmp_path, **KW)
    folder = tmp_path / "fig1"
    before = files_of(folder)
    writer = RunWriter(folder / "bn" / "seed-0.zarr", overwrite=True)  # a live writer's lock
    try:
        for flags in ({"force": True}, {"resume": True}, {}):
            with pytest.raises(StoreError, match="is being written: another writer"):
                run_preset("fig1", seeds=1, out=tmp_path, **flags, **KW)
    finally:
        writer.close()
    assert files_of(folder) == before


def test_report_uses_only_the_runs_the_manifest_lists(tmp_path, capsys):
    pytest.importorskip("icstools.report")
    run_preset("fig1", seeds=2, out=tmp_path, **KW)
    folder = tmp_path / "fig1"
    stray = folder / "bn" / "seed-5.zarr"
    shutil.copytree(folder / "bn" / "seed-1.zarr", stray)  # e.g. left by an earlier run
    html, js = tmp_path / "r.html", tmp_path / "r.json"
    code, _, err = run_cli(capsys, "report", str(folder), "--html", str(html), "--json", str(js))
    assert code == 0, err
    assert (
        f"icstools: note: skipped the run {stray}: {folder / 'manifest.json'} does not list it"
        in err
    )
    report = json.loads(js.read_text())
    (preset,) = report["presets"]
    (cond,) = preset["conditions"]
    assert [r["seed"] for r in cond["runs"]] == [0, 1]
    assert any("skipped the run" in n and "seed-5.zarr" in n for n in preset["notes"])

"""The ``icstools`` command: subcommands, their output, exit codes and error messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import icstools
from icstools import cli
from icstools.experiments import PRESETS, run_preset

ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def _mnist(monkeypatch):
    """Real MNIST: $ICSTOOLS_DATA, else ../shared/data beside the checkout (as the Makefile)."""
    if not os.environ.get("ICSTOOLS_DATA"):
        monkeypatch.setenv("ICSTOOLS_DATA", str(ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short fig1 run per condition (2 steps), shared by the read-only tests."""
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("ICSTOOLS_DATA"):
            mp.setenv("ICSTOOLS_DATA", str(ROOT.parent / "shared" / "data"))
        return run_preset("fig1", quick=True, steps=2, out=out, progress=False)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("icstools: error: ") and "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------ help, list
@pytest.mark.parametrize("command", ["run", "list", "sites", "info", "report", "figures", "demo"])
def test_every_subcommand_has_help(capsys, command):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: icstools {command}") and len(out.splitlines()) > 4


def test_top_level_help_lists_the_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "list", "sites", "info", "report", "demo"):
        assert command in out


def test_list(capsys):
    code, out, err = _run(capsys, "list")
    assert code == 0 and not err
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    assert all(PRESETS[line.split()[0]].description in line for line in lines)
    code, out, _ = _run(capsys, "list", "--verbose")
    assert code == 0 and "Ioffe & Szegedy 2015 §4.1" in out and "50,000 steps" in out


# ------------------------------------------------------------------------- user mistakes: 2
@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["run", "fig2"], "unknown preset 'fig2'; valid presets: fig1, lr-sweep, saturating"),
        (["run", "fig1", "--steps", "0"], "--steps: expected a whole number ≥ 1, got 0"),
        (["run", "fig1", "--steps", "many"], "--steps"),
        (["run", "fig1", "--seeds", "x"], "--seeds: expected a number of seeds"),
        (["run", "fig1", "--seeds", "0"], "the number of seeds must be ≥ 1"),
        (["run", "fig1", "--threads", "-1"], "--threads"),
        (["run", "fig1", "--conditions", "bn,nope"], "no condition 'nope'"),
        (["run"], "the following arguments are required: preset"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["sites", "fig2"], "unknown preset 'fig2'"),
        (["sites", "icstools.experiments:nothing"], "has no attribute 'nothing'"),
        (["sites", "nowhere.at_all:model"], "cannot import 'nowhere.at_all'"),
        (["sites", "icstools.experiments:paper_mlp", "--kwargs", "{bn: 1"], "not valid JSON"),
        (["sites", "icstools.experiments:paper_mlp", "--kwargs", "[1]"], "JSON object"),
        (["sites", "icstools.experiments:paper_mlp", "--kwargs", '{"bm": 1}'], "failed"),
        (["sites", "icstools.experiments:DATA_SHAPES"], "not callable"),
        (["sites", "fig1", "--kwargs", "{}"], "--kwargs applies to a model factory"),
        (
            [
                "sites",
                "icstools.experiments:paper_mlp",
                "--kwargs",
                '{"bn": 0}',
                "--input-shape",
                "1,28,28",
            ],
            "does not accept inputs of shape [batch, 1, 28, 28]",
        ),
        (["sites", "icstools.experiments:paper_mlp"], "missing 1 required positional argument"),
        (["sites", "icstools.experiments:paper_mlp", "--input-shape", "0"], "--input-shape"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(capsys, argv, match):
    code, out, err = _run(capsys, *argv)
    assert code == 2, (out, err)
    assert match in _one_line_error(err)
    assert not out


def test_unknown_preset_runs_nothing(capsys, tmp_path):
    code, _, _ = _run(capsys, "run", "fig2", "--out", str(tmp_path))
    assert code == 2 and not any(tmp_path.iterdir())


def test_info_missing_store(capsys, tmp_path):
    code, _, err = _run(capsys, "info", str(tmp_path / "nope.zarr"))
    assert code == 2
    assert "no icstools run at" in _one_line_error(err) and "no such file" in err


def test_info_directory_that_is_not_a_run(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = _run(capsys, "info", str(tmp_path))
    assert code == 2 and "not an icstools run store" in _one_line_error(err)
    code, _, err = _run(capsys, "info", str(tmp_path / "notes.txt"))
    assert code == 2 and "not a directory" in _one_line_error(err)


def test_info_truncated_commit_marker(capsys, runs, tmp_path):
    store = tmp_path / "broken.zarr"
    shutil.copytree(runs.run_path(runs.runs[0]), store)
    marker = store / ".zmetadata"
    marker.write_bytes(marker.read_bytes()[:100])
    code, _, err = _run(capsys, "info", str(store))
    assert code == 2 and "corrupt" in _one_line_error(err)


def test_info_corrupt_manifest(capsys, tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    code, _, err = _run(capsys, "info", str(tmp_path))
    assert code == 2 and "not a valid icstools manifest" in _one_line_error(err)


def test_missing_mnist_is_a_user_mistake(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ICSTOOLS_DATA", str(tmp_path / "empty"))
    code, _, err = _run(capsys, "run", "fig1", "--steps", "1", "--out", str(tmp_path), "--quiet")
    assert code == 2 and "MNIST 'train' files not found" in _one_line_error(err)


def test_unexpected_errors_exit_1_without_traceback(capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("icstools.experiments.run_preset", boom)
    code, _, err = _run(capsys, "run", "fig1")
    assert code == 1
    line = _one_line_error(err)
    assert "RuntimeError: disk on fire" in line and "--debug" in line
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["--debug", "run", "fig1"])


# ------------------------------------------------------------------------------------ sites
def test_sites_of_a_factory(capsys):
    code, out, err = _run(
        capsys, "sites", "icstools.experiments:paper_mlp", "--kwargs", '{"bn": true}'
    )
    assert code == 0 and not err
    assert out.splitlines()[0] == (
        'icstools.experiments:paper_mlp {"bn": true}  (input [batch, 784])'
    )
    rows = {
        line.split()[1] if line.startswith("*") else line.split()[0]: line
        for line in out.splitlines()[2:]
        if ":" in line
    }
    assert len(rows) == 20  # 10 modules × (input, output)
    sig = rows["2:input"]
    assert sig.startswith("*") and "Sigmoid" in sig and "[B, 100]" in sig
    assert "100 (dim 1; pooled over N)" in sig
    assert not rows["1:input"].startswith("*") and "BatchNorm1d" in rows["1:input"]
    assert "10 (dim 1" in rows["9:output"]
    assert "* recorded by default" in out


def test_sites_of_a_cnn_pool_over_locations(capsys):
    code, out, _ = _run(
        capsys, "sites", "icstools.experiments:small_cnn", "--kwargs", '{"in_channels": 1}'
    )
    assert code == 0 and "(input [batch, 1, 28, 28])" in out
    line = next(x for x in out.splitlines() if " 2:input " in x)
    assert line.startswith("*") and "ReLU" in line and "[B, 32, 28, 28]" in line
    assert "32 (dim 1; pooled over N, H, W)" in line


def test_sites_with_explicit_input_shape(capsys):
    code, out, _ = _run(
        capsys,
        "sites",
        "icstools.experiments:paper_mlp",
        "--kwargs",
        '{"bn": false, "widths": [7]}',
        "--input-shape",
        "784",
    )
    assert code == 0 and "[B, 7]" in out and "1:input" in out


def test_sites_of_a_preset(capsys):
    code, out, _ = _run(capsys, "sites", "saturating")
    assert code == 0
    titles = [line for line in out.splitlines() if line.startswith("saturating / ")]
    assert titles == [
        f"saturating / {c}  (input [batch, 784])"
        for c in ("sigmoid", "sigmoid-bn", "tanh", "tanh-bn")
    ]
    assert out.count("Tanh ") >= 16


# ------------------------------------------------------------------------------------- info
def test_info_of_a_run(capsys, runs):
    run = runs.runs[1]
    path = runs.run_path(run)
    code, out, err = _run(capsys, "info", str(path))
    assert code == 0 and not err
    text = dict(
        (line[:11].strip(), line[11:]) for line in out.splitlines() if not line.startswith(" ")
    )
    assert text["run"].startswith(str(path.resolve())) and "on disk" in text["run"]
    ds = icstools.open_run(path)
    steps = list(ds.step.values)
    assert text["steps"] == f"{steps[0]} … {steps[-1]}, {len(steps)} records"
    assert text["sources"] == "train, probe"
    assert text["sites"] == "3, 300 units: 2:input (100), 5:input (100), 8:input (100)"
    assert text["diverged"] == "no"
    assert "seed=0" in text["attrs"] and "icstools_version=" in text["attrs"]
    assert "probe_sample=1000" in text["recorder"] and "gradients=True" in text["recorder"]
    assert "(source, step, unit)" in out and "quantile_value" in out and "test_acc" in out


def test_info_of_a_diverged_run(capsys, tmp_path):
    m = run_preset(
        "lr-sweep",
        quick=True,
        steps=60,
        conditions=["relu-baseline-x5"],
        out=tmp_path,
        progress=False,
    )
    code, out, _ = _run(capsys, "info", str(m.run_path(m.runs[0])))
    assert code == 0
    assert f"diverged   at recorded step {m.runs[0].recorded_diverged_step}" in out


def test_info_of_a_preset_folder(capsys, runs):
    code, out, _ = _run(capsys, "info", str(runs.path.parent))
    assert code == 0
    assert "fig1: §4.1 Fig. 1" in out and "baseline" in out and "complete" in out
    assert str(runs.run_path(runs.runs[0])) in out


# ----------------------------------------------------------------------------------- report
def test_report_missing_input_is_a_user_mistake(capsys, tmp_path):
    code, _, err = _run(
        capsys, "report", str(tmp_path / "nope.zarr"), "--html", str(tmp_path / "r.html")
    )
    assert code == 2 and "no such run or folder" in _one_line_error(err)


def test_report(capsys, runs, tmp_path):
    pytest.importorskip("icstools.report")
    html, js = tmp_path / "r.html", tmp_path / "r.json"
    code, out, err = _run(
        capsys, "report", str(runs.path.parent), "--html", str(html), "--json", str(js)
    )
    assert code == 0, err
    assert html.is_file() and js.is_file() and "report:" in out


# -------------------------------------------------------------------------------------- run
def test_run_in_process_prints_the_summary(capsys, tmp_path):
    code, out, err = _run(
        capsys,
        "run",
        "scale-invariance",
        "--quick",
        "--steps",
        "2",
        "--conditions",
        "bn",
        "--out",
        str(tmp_path),
        "--quiet",
    )
    assert code == 0, err
    assert "condition  seed  test acc  diverged  steps  wall time" in out
    assert f"manifest: {tmp_path / 'scale-invariance' / 'manifest.json'}" in out
    data = json.loads((tmp_path / "scale-invariance" / "manifest.json").read_text())
    assert data["command"] == [
        "icstools",
        "run",
        "scale-invariance",
        "--quick",
        "--steps",
        "2",
        "--conditions",
        "bn",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    assert list(data["conditions"]) == ["bn"]


def test_run_entry_point_in_a_subprocess(tmp_path):
    exe = Path(sys.executable).with_name("icstools")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "icstools.cli"]
    env = {**os.environ, "ICSTOOLS_DATA": os.environ["ICSTOOLS_DATA"]}
    proc = subprocess.run(
        [
            *cmd,
            "run",
            "fig1",
            "--quick",
            "--steps",
            "3",
            "--conditions",
            "bn",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "condition  seed  test acc" in proc.stdout and "manifest:" in proc.stdout
    assert "fig1/bn/seed-0" not in proc.stderr  # progress bars only on a terminal
    assert icstools.open_run(tmp_path / "fig1" / "bn" / "seed-0.zarr").sizes["step"] == 3
    proc = subprocess.run(
        [*cmd, "run", "nope"], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"icstools: error: unknown preset 'nope'; valid presets: {', '.join(PRESETS)}"
    ]


def test_demo_runs_fig1_reduced_and_writes_the_report(capsys, tmp_path):
    pytest.importorskip("icstools.report")
    code, out, err = _run(
        capsys, "demo", "--steps", "60", "--seeds", "1", "--out", str(tmp_path), "--quiet"
    )
    assert code == 0, err
    assert (tmp_path / "fig1" / "baseline" / "seed-0.zarr").is_dir()
    assert (tmp_path / "fig1" / "bn" / "seed-0.zarr").is_dir()
    assert (tmp_path / "fig1-report.html").is_file() and (tmp_path / "fig1-report.json").is_file()
    assert "inconclusive" in out  # one seed: no verdict can be reached, and it says so
    assert f"report: {tmp_path / 'fig1-report.html'}" in out
    code, _, err = _run(capsys, "demo", "--steps", "0")
    assert code == 2 and "--steps and --seeds must be ≥ 1" in _one_line_error(err)


def test_info_of_a_preset_folder_gives_test_accuracy_at_steps(capsys, runs):
    code, out, err = _run(capsys, "info", str(runs.path.parent), "--at", "0,2,7")
    assert code == 0, err
    table = out.split("test accuracy at steps 0, 2, 7", 1)[1]
    for r in runs.runs:
        row = next(ln for ln in table.splitlines() if ln.startswith(r.condition))
        assert f"{r.test_acc[0]:.4f}" in row  # evaluated at step 0
        assert f"{r.final_test_acc:.4f}" in row  # step 2 is the last: the final accuracy
        assert "not evaluated" in row  # step 7 was never reached


# ------------------------------------------------------------------------------------ figures
def test_figures_writes_the_papers_fig1_as_pngs(capsys, runs, tmp_path):
    from matplotlib.image import imread

    folder = runs.path.parent
    code, out, err = _run(capsys, "figures", str(folder), "--out", str(tmp_path / "img"))
    assert code == 0 and not err, err
    names = ["fig1.png", "fig1a.png", "fig1b.png", "fig1c.png"]
    assert out.split() == [str(tmp_path / "img" / n) for n in names]
    shapes = {}
    for name in names:
        data = (tmp_path / "img" / name).read_bytes()
        assert data.startswith(b"\x89PNG")
        shapes[name] = imread(tmp_path / "img" / name).shape
    # three panels side by side: the combined figure is about three single panels wide
    assert shapes["fig1.png"][1] > 2.5 * shapes["fig1b.png"][1]
    assert shapes["fig1b.png"] == shapes["fig1c.png"]
    # the default folder is PRESET_DIR/figures; the same figure gives the same bytes
    code, out, _ = _run(capsys, "figures", str(folder))
    assert code == 0 and out.split()[0] == str(folder / "figures" / "fig1.png")
    assert (folder / "figures" / "fig1b.png").read_bytes() == (
        tmp_path / "img" / "fig1b.png"
    ).read_bytes()


def test_figures_refuses_folders_without_fig1_runs(capsys, tmp_path):
    code, _, err = _run(capsys, "figures", str(tmp_path))
    assert code == 2 and "no manifest.json" in _one_line_error(err)
    run_preset("cnn", quick=True, steps=2, conditions=["bn"], out=tmp_path, progress=False)
    code, _, err = _run(capsys, "figures", str(tmp_path / "cnn"))
    assert code == 2 and "no paper figure is drawn for preset 'cnn'" in _one_line_error(err)
    run_preset("fig1", quick=True, steps=2, conditions=["bn"], out=tmp_path, progress=False)
    code, _, err = _run(capsys, "figures", str(tmp_path / "fig1"))
    assert code == 2 and "no finished run of condition(s) ['baseline']" in _one_line_error(err)

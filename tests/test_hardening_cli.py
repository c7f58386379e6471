"""Hardening of the ``icstools`` command: exit codes and one-line errors on bad input.

Real inputs: a small run recorded with :class:`icstools.Recorder`, then damaged on disk
(a truncated or overwritten data chunk); output paths under a regular file, under
``/dev/null`` or in ``/sys`` (not writable, even for root); a reader that closes the pipe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import icstools
from icstools import cli
from icstools.commands import info as info_command

ROOT = Path(__file__).parents[1]
EXE = Path(sys.executable).with_name("icstools")


@pytest.fixture(autouse=True)
def _mnist(monkeypatch):
    if not os.environ.get("ICSTOOLS_DATA"):
        monkeypatch.setenv("ICSTOOLS_DATA", str(ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A real run store: a 6-8-2 sigmoid MLP, 5 recorded steps (loss and sigmoid inputs)."""
    path = tmp_path_factory.mktemp("store") / "run.zarr"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with icstools.Recorder(model, nn.Sigmoid, role="input", optimizer=opt, path=path) as rec:
            for _ in range(5):
                x, y = torch.randn(4, 6), torch.randint(0, 2, (4,))
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.log(loss=loss)
    return path


def _damaged(store: Path, dest: Path, chunk: str = "loss/0", how: str = "truncate") -> Path:
    """A copy of ``store`` with one data chunk damaged: cut in half, or its header overwritten."""
    shutil.copytree(store, dest)
    f = dest / chunk
    assert f.is_file(), sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\xff" * 16 + data[16:])
    return dest


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXE), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("icstools: error: ") and "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------- corrupt store: 2
@pytest.mark.parametrize("how", ["truncate", "overwrite"])
def test_info_on_a_store_with_a_damaged_chunk_exits_2_without_partial_output(store, tmp_path, how):
    bad = _damaged(store, tmp_path / "bad.zarr", "loss/0", how)
    proc = _cli("info", str(bad))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = _one_line_error(proc.stderr)
    assert str(bad) in line and "'loss'" in line and "corrupt" in line
    assert not proc.stdout  # nothing printed before the error


def test_info_damaged_chunk_in_process(capsys, store, tmp_path):
    bad = _damaged(store, tmp_path / "bad.zarr", "loss/0")
    code, out, err = _run(capsys, "info", str(bad))
    assert code == 2 and not out
    assert "cannot decode its variable 'loss'" in _one_line_error(err)


def test_info_bug_while_formatting_is_still_exit_1(capsys, store, monkeypatch):
    """Only reading the store is a user-input error; a bug in info's own code stays exit 1."""

    def bug(*args, **kwargs):
        raise TypeError("unsupported format string")

    monkeypatch.setattr(info_command, "_info_lines", bug)
    code, out, err = _run(capsys, "info", str(store))
    assert code == 1 and not out
    assert "TypeError: unsupported format string" in _one_line_error(err)
    with pytest.raises(TypeError):
        cli.main(["--debug", "info", str(store)])


def test_info_at_applies_to_preset_folders_only(capsys, store):
    code, out, err = _run(capsys, "info", str(store), "--at", "2")
    assert code == 2 and not out
    assert "--at applies to a preset folder" in _one_line_error(err)


def test_report_of_a_damaged_store_exits_2(capsys, store, tmp_path):
    bad = _damaged(store, tmp_path / "bad.zarr", "mean/0.0.0")
    html = tmp_path / "r.html"
    code, out, err = _run(capsys, "report", str(bad), "--html", str(html))
    assert code == 2 and not out and not html.exists()
    line = _one_line_error(err)
    assert "no readable run found" in line and str(bad) in line


def test_report_skipping_a_damaged_store_says_so_and_exits_2(capsys, store, tmp_path):
    """The report is written without the damaged run; stderr names it, the exit code is 2."""
    pytest.importorskip("icstools.report")
    runs = tmp_path / "runs"
    shutil.copytree(store, runs / "good.zarr")
    bad = _damaged(store, runs / "bad.zarr", "mean/0.0.0")
    html = tmp_path / "r.html"
    code, out, err = _run(capsys, "report", str(runs), "--html", str(html))
    assert code == 2, err
    assert html.is_file() and f"report: {html}" in out
    line = _one_line_error(err)
    assert "cannot open the run" in line and str(bad) in line and "left out" in line


def test_report_of_a_preset_folder_with_a_damaged_store(capsys, tmp_path):
    pytest.importorskip("icstools.report")
    from icstools.experiments import run_preset

    m = run_preset(
        "scale-invariance",
        quick=True,
        steps=2,
        conditions=["bn"],
        seeds=2,
        out=tmp_path,
        progress=False,
    )
    bad = m.run_path(m.runs[1])
    f = bad / "mean" / "0.0.0"
    f.write_bytes(f.read_bytes()[:10])
    code, out, err = _run(capsys, "report", str(m.path.parent), "--html", str(tmp_path / "r.html"))
    assert code == 2 and (tmp_path / "r.html").is_file() and "report:" in out
    assert str(bad) in _one_line_error(err)


@pytest.mark.parametrize("command", ["info", "report"])
def test_a_directory_that_is_not_a_store_and_a_plain_file(capsys, tmp_path, command):
    (tmp_path / "notes.txt").write_text("hello")
    extra = ["--html", str(tmp_path / "r.html")] if command == "report" else []
    for target in (tmp_path, tmp_path / "notes.txt", tmp_path / "missing"):
        code, out, err = _run(capsys, command, str(target), *extra)
        assert code == 2 and not out, err
        assert str(target.name) in _one_line_error(err)
    assert not (tmp_path / "r.html").exists()


# ------------------------------------------------------------------ unwritable outputs: 2
def test_run_out_under_a_regular_file_exits_2(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    proc = _cli("run", "fig1", "--quick", "--steps", "1", "--quiet", "--out", f"{blocker}/sub")
    assert proc.returncode == 2, proc.stderr
    line = _one_line_error(proc.stderr)
    assert f"--out '{blocker}/sub'" in line and f"{blocker} is a file, not a folder" in line
    assert not proc.stdout


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["run", "fig1", "--out", "{f}"], "--out '{f}': {f} is a file, not a folder"),
        (["run", "fig1", "--out", "{f}/x/y"], "--out '{f}/x/y': {f} is a file, not a folder"),
        (["demo", "--out", "{f}"], "--out '{f}': {f} is a file, not a folder"),
        (["run", "fig1", "--out", "/dev/null/runs"], "/dev/null is not a folder"),
        (["run", "fig1", "--out", "/sys/icstools-runs"], "cannot write in /sys"),
        (["run", "fig1", "--out", "{d}"], "{d}/fig1 is a file, not a folder"),
    ],
)
def test_run_unwritable_out_exits_2_before_running(capsys, tmp_path, argv, match):
    if "/sys/" in argv[-1] and os.access("/sys", os.W_OK) and _can_create_in("/sys"):
        pytest.skip("/sys is writable here")
    f = tmp_path / "afile"
    f.write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "fig1").write_text("x")  # the preset's folder is a file
    fill = {"f": str(f), "d": str(tmp_path / "d")}
    argv = [a.format(**fill) for a in argv]
    code, out, err = _run(capsys, *argv, "--quiet", "--steps", "1")
    assert code == 2 and not out, err
    line = _one_line_error(err)
    assert match.format(**fill) in line
    assert "folder" in line.split(";", 1)[1]  # says what is valid


def _can_create_in(folder: str) -> bool:
    try:
        os.mkdir(os.path.join(folder, ".icstools-probe"))
    except OSError:
        return False
    os.rmdir(os.path.join(folder, ".icstools-probe"))
    return True


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("--html", "/dev/null/x.html", "--html '/dev/null/x.html': /dev/null is not a folder"),
        ("--json", "/dev/null/x.json", "--json '/dev/null/x.json': /dev/null is not a folder"),
        ("--html", "{f}/r.html", "--html '{f}/r.html': {f} is a file, not a folder"),
        ("--html", "{t}", "--html '{t}' is a folder; give the path of a file"),
        ("--json", "{t}", "--json '{t}' is a folder; give the path of a file"),
        ("--html", "/sys/r.html", "--html '/sys/r.html': cannot write in /sys"),
    ],
)
def test_report_unwritable_outputs_exit_2_and_write_nothing(
    capsys, store, tmp_path, option, value, match
):
    if value.startswith("/sys") and _can_create_in("/sys"):
        pytest.skip("/sys is writable here")
    f = tmp_path / "afile"
    f.write_text("x")
    fill = {"f": str(f), "t": str(tmp_path)}
    value = value.format(**fill)
    html, js = tmp_path / "ok.html", tmp_path / "ok.json"
    outputs = {"--html": str(html), "--json": str(js), option: value}
    argv = ["report", str(store)] + [x for kv in outputs.items() for x in kv]
    code, out, err = _run(capsys, *argv)
    assert code == 2 and not out, err
    line = _one_line_error(err)
    assert match.format(**fill) in line and "File exists" not in line
    assert not html.exists() and not js.exists()  # checked before anything is written


def test_report_html_and_json_the_same_file(capsys, store, tmp_path):
    p = str(tmp_path / "r.out")
    code, _, err = _run(capsys, "report", str(store), "--html", p, "--json", p)
    assert code == 2 and "--html and --json are the same file" in _one_line_error(err)


def test_report_html_under_dev_null_in_a_subprocess(store):
    proc = _cli("report", str(store), "--html", "/dev/null/x.html")
    assert proc.returncode == 2
    assert "/dev/null is not a folder" in _one_line_error(proc.stderr)


# -------------------------------------------------------------------------- closed pipe
@pytest.mark.parametrize("buffered", [False, True])
def test_info_into_head_ends_quietly(store, buffered):
    """``icstools info STORE | head -1``: the first line, nothing on stderr, exit 0 or 141."""
    env = {**os.environ}
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run(
        ["bash", "-c", f'"{EXE}" info "{store}" | head -1; echo "rc=${{PIPESTATUS[0]}}" >&2'],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.stdout.startswith("run        ") and len(proc.stdout.splitlines()) == 1
    assert proc.stderr.strip() in ("rc=0", "rc=141"), proc.stderr


@pytest.mark.parametrize("buffered", [False, True])
@pytest.mark.parametrize("argv", [["info", "{store}"], ["list"], ["--help"]])
def test_a_reader_that_closes_the_pipe_gives_141_and_no_traceback(store, argv, buffered):
    """The reader is gone before anything is written (``true`` exits at once, the command
    needs seconds to start): every write fails, deterministically. (``--help`` may end 0:
    argparse ignores failed writes of help, then nothing is left to flush when unbuffered.)"""
    env = {**os.environ}
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    args = " ".join(f'"{a.format(store=store)}"' for a in argv)
    proc = subprocess.run(
        ["bash", "-c", f'"{EXE}" {args} | true; echo "rc=${{PIPESTATUS[0]}}" >&2'],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    expected = ("rc=141", "rc=0") if argv == ["--help"] else ("rc=141",)
    assert proc.stderr.strip() in expected, proc.stderr


def test_closed_stdout_in_process_returns_141_quietly(capsys, monkeypatch, store):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["info", str(store)]) == cli.EXIT_PIPE == 141
    assert cli.main(["--debug", "list"]) == 141  # not a bug: no traceback with --debug either
    assert not capsys.readouterr().err


# ------------------------------------------------------------------ the codes, documented
def test_exit_codes_are_documented_alike(capsys):
    codes = {cli.EXIT_OK, cli.EXIT_ERROR, cli.EXIT_USAGE, cli.EXIT_INTERRUPTED, cli.EXIT_PIPE}
    assert codes == {0, 1, 2, 130, 141}
    assert cli.main(["--help"]) == 0
    epilog = capsys.readouterr().out.split("Exit codes:", 1)[1]
    readme = (ROOT / "README.md").read_text().split("Exit codes of `icstools`:", 1)[1]
    readme = readme.split("\n\n", 1)[0]
    for code in codes:
        assert f"\n{code} " in cli.__doc__ or f"\n{code}  " in cli.__doc__
        assert f"{code} " in epilog and f"{code} " in readme

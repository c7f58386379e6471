"""README's "Attach to your own model" example runs as written, so it cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text.split("## Attach to your own model", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README lost its 'Attach to your own model' python example"
    return match.group(1)


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the example writes data/runs/readme.zarr relative to cwd
    namespace: dict[str, object] = {}
    exec(compile(_example(), str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "['0:input', '0:output', '1:input', '1:output']" in out
    ds = namespace["ds"]
    assert ds.sizes["step"] == 10 and list(ds.source.values) == ["train", "probe"]
    assert (tmp_path / "data" / "runs" / "readme.zarr").is_dir()
    q = namespace["sigmoid_in"]["quantile_value"].sel(quantile=[0.15, 0.5, 0.85]).values
    assert np.isfinite(q).all() and (np.diff(q, axis=-1) >= 0).all()


def test_readme_analysis_example_runs_on_the_first_examples_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(_example(), str(README), "exec"), namespace)
    section = README.read_text().split("## Analysis in Jupyter", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "README lost its analysis example"
    # compare() needs runs of two conditions, which the first example does not make
    lines = [ln for ln in code.group(1).splitlines() if "icstools.compare(" not in ln]
    exec(compile("\n".join(lines), str(README), "exec"), namespace)
    d = namespace["d"]
    assert d["w1_std"].chunks is not None  # lazy on the store
    assert set(d.compute().data_vars) >= {"w1_std", "ks", "psi"}


def test_readme_user_defined_measurement_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(_example(), str(README), "exec"), namespace)
    section = README.read_text().split("## Your own measurement", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "README lost its user-defined measurement example"
    snippet = code.group(1)
    assert len([ln for ln in snippet.splitlines() if ln.strip()]) <= 32
    exec(compile(snippet, str(README), "exec"), namespace)
    assert "site_rms" in capsys.readouterr().out
    ds = namespace["rec"].to_dataset()
    rms = ds["site_rms"].values  # [step, site]; its own schedule: every 20th step
    steps = ds.step.values
    assert np.isfinite(rms[steps % 20 == 0]).all() and np.isnan(rms[steps % 20 != 0]).all()
    # the RMS of a sigmoid input is at least |mean| of its units (Jensen), from the statistics
    mean = ds["mean"].sel(source="train").values[steps % 20 == 0]
    assert (rms[steps % 20 == 0, 0] + 1e-6 >= np.abs(mean).max(axis=1)).all()
    erank = ds["erank"].values[steps % 50 == 0]
    assert ((erank >= 1) & (erank <= 64)).all()

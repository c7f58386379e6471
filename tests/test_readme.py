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

"""README's "Use with Lightning" and "Use with the Hugging Face Trainer" run as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).parents[1] / "README.md"


def _snippet(title: str) -> str:
    section = README.read_text().split(f"## {title}\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"README lost its {title!r} python example"
    return match.group(1)


def _run(title: str) -> dict:
    namespace: dict[str, object] = {}
    exec(compile(_snippet(title), str(README), "exec"), namespace)
    return namespace


# Lightning's own warnings (its use of torch's pytree API, a small CPU loader, and the logging
# interval of a short run) are not ours
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers")
@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_readme_lightning_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    ns = _run("Use with Lightning")
    assert "8 8" in capsys.readouterr().out
    ds, trainer = ns["ds"], ns["trainer"]
    assert ds.step.values.tolist() == list(range(8))
    assert (ds.calls.sel(source="train").values == 2).all()  # two batches per step
    assert np.isfinite(ds.param_grad_norm.values).all()
    assert (Path(trainer.log_dir) / "icstools.zarr").is_dir()


def test_readme_transformers_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    ns = _run("Use with the Hugging Face Trainer")
    out = capsys.readouterr().out
    assert "['transformer.h.0.mlp.act:input', 'transformer.h.1.mlp.act:input']" in out
    ds = ns["ds"]
    assert ds.step.values.tolist() == list(range(8)) == list(range(ns["trainer"].state.global_step))
    assert np.isfinite(ds.param_grad_norm.values).all()
    assert (tmp_path / "data" / "hf" / "icstools.zarr").is_dir()

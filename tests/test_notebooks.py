"""Every notebook in notebooks/ runs top to bottom in a real Jupyter kernel, so none can rot.

Each notebook is executed once per session by ``nbclient`` in an ipykernel started from *this*
interpreter: a ``python3`` kernelspec whose argv is ``sys.executable`` is written to a temporary
folder put first on ``JUPYTER_PATH``, so a stray user-level ``python3`` kernelspec cannot swap
the environment (a cell injected first checks it). The kernel's cwd is ``notebooks/``, as when
opened in Jupyter. Runs are kept short the papermill way: a cell overriding a few parameters is
inserted right after the cell tagged ``parameters`` (every notebook must have one), and runs are
written to a temporary folder rather than ``data/``.
"""

from __future__ import annotations

import base64
import copy
import inspect
import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))

#: Values injected after the ``parameters`` cell, for the names that cell defines; ``OUT`` is
#: set per run to a temporary folder.
FAST_PARAMETERS = {
    "STEPS": 300,
    "EVERY": 50,
    "EVAL_EVERY": 100,
    "SEED": 0,
    "SEEDS": 2,
    "THREADS": 1,
}

_KERNEL_CHECK = (
    "import json as _json, sys as _sys\n"
    "print('KERNEL ' + _json.dumps({'executable': _sys.executable, 'prefix': _sys.prefix}))"
)


def _data_dir() -> Path:
    env = os.environ.get("ICSTOOLS_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def _parameters_index(nb: nbformat.NotebookNode) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


def _parametrize(nb: nbformat.NotebookNode, out: Path) -> nbformat.NotebookNode:
    """A copy of ``nb``: a kernel check first, overrides after the parameters cell."""
    nb = copy.deepcopy(nb)
    i = _parameters_index(nb)
    defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*=", nb.cells[i].source, re.M))
    values = {**FAST_PARAMETERS, "OUT": str(out)}
    lines = [f"{k} = {v!r}" for k, v in values.items() if k in defined]
    injected = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected"]})
    nb.cells.insert(i + 1, injected)
    nb.cells.insert(0, nbformat.v4.new_code_cell(_KERNEL_CHECK, metadata={"tags": ["injected"]}))
    return nb


def _kernelspec(tmp: Path) -> None:
    """A ``python3`` kernelspec for this interpreter under ``tmp/jupyter`` (put first on
    ``JUPYTER_PATH``: it wins over user, environment and system kernelspecs)."""
    spec = tmp / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3 (test venv)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))


def _execute_all(names: list[str], tmp: Path) -> dict[str, nbformat.NotebookNode]:
    """The notebooks ``names`` after a run each, executed at the same time: each kernel is its
    own process (one torch thread each, ``THREADS``), so on two cores the three default
    notebooks take about as long as the two longest one after the other, not as all three."""
    import asyncio

    from nbclient import NotebookClient

    _kernelspec(tmp)
    nbs = {
        n: _parametrize(nbformat.read(NOTEBOOK_DIR / n, as_version=4), tmp / Path(n).stem)
        for n in names
    }
    clients = [
        NotebookClient(
            nb,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
        )
        for nb in nbs.values()
    ]

    async def run_all() -> None:
        # every kernel runs to its end (or its first failing cell) before any error is raised
        results = await asyncio.gather(
            *(c.async_execute() for c in clients), return_exceptions=True
        )
        for name, result in zip(nbs, results, strict=True):
            if isinstance(result, BaseException):
                raise RuntimeError(f"notebook {name} failed") from result

    with pytest.MonkeyPatch.context() as mp:  # read by the kernel manager; the kernel inherits it
        mp.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
        mp.setenv("JUPYTER_PLATFORM_DIRS", "1")
        mp.setenv("ICSTOOLS_DATA", str(_data_dir()))
        mp.delenv("MPLBACKEND", raising=False)  # ipykernel then uses the inline backend
        asyncio.run(run_all())  # raises on the first failing cell of any notebook
    return nbs


def _wanted(session: pytest.Session) -> list[str]:
    """The notebooks the selected tests of this module execute: a test's ``name`` parameter,
    and the notebooks its body passes to ``executed``."""
    names: set[str] = set()
    for item in session.items:
        if item.module.__name__ != __name__ or "executed" not in item.fixturenames:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "name" in params:
            names.add(params["name"])
        source = inspect.getsource(item.function)
        names.update(re.findall(r'executed\("([^"]+\.ipynb)"\)', source))
        if "executed(_SLOW_NOTEBOOK)" in source:
            names.add(_SLOW_NOTEBOOK)
    return sorted(names)


@pytest.fixture(scope="module")
def executed(request, tmp_path_factory):
    """``executed(name)``: the notebook after a run. At the first call, every notebook the
    selected tests need is executed at once (:func:`_execute_all`); each runs once."""
    cache: dict[str, nbformat.NotebookNode] = {}

    def run(name: str) -> nbformat.NotebookNode:
        if name not in cache:
            todo = [n for n in _wanted(request.session) if n not in cache] or [name]
            if name not in todo:
                todo.append(name)
            cache.update(_execute_all(todo, tmp_path_factory.mktemp("notebooks")))
        return cache[name]

    return run


def _outputs(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(o.text for o in _outputs(nb) if o.get("name") == "stdout")


def test_there_are_notebooks():
    assert "01-activations-over-time.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    _parameters_index(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the outputs"


# Notebook 03 takes about 3 minutes at test scale: `make test` leaves it to `test-all` (`make docs`,
# which CI runs after `make test`, still executes it and fails on an error in any cell).
_SLOW_NOTEBOOK = "03-santurkar-counter-claims.ipynb"


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == _SLOW_NOTEBOOK else n for n in NOTEBOOKS],
)
def test_notebook_runs_and_draws(executed, name):
    nb = executed(name)
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    kernel = json.loads(re.search(r"^KERNEL (.*)$", _stdout(nb), re.M).group(1))
    assert Path(kernel["prefix"]) == Path(sys.prefix), "kernel runs another environment"
    assert Path(kernel["executable"]).is_relative_to(sys.prefix)
    stderr = "".join(o.text for o in outputs if o.get("name") == "stderr")
    assert "Warning" not in stderr, stderr
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert images, "no figure was drawn"
    for image in images:
        assert base64.b64decode(image.data["image/png"]).startswith(b"\x89PNG")


def test_activations_over_time_reports_results(executed):
    nb = executed("01-activations-over-time.ipynb")
    out = _stdout(nb)
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) == 2, "Fig. 1(a) and Fig. 1(b, c)"
    accuracy = dict(re.findall(r"^final test accuracy (\w+): ([0-9.]+)", out, re.M))
    assert set(accuracy) == {"baseline", "BN"}, out
    for value in accuracy.values():
        assert 0.2 < float(value) <= 1.0  # 300 steps are far above chance (0.1)
    assert re.search(r"^baseline +300 steps in .*: 6 records \(steps 0\.\.250\)", out, re.M), out
    assert re.search(r"^BN +site 8:input: .* typical unit \d+ ", out, re.M), out
    tables = [o.data["text/html"] for o in _outputs(nb) if "text/html" in o.get("data", {})]
    assert len(tables) == 4 and all("Δ median" in t for t in tables[:3])
    # Algorithm 2: eval mode with the population statistics is the inference network by hand
    diff = re.search(r"^eval mode vs Algorithm 2 by hand: .* scores ([0-9.e+-]+)$", out, re.M)
    assert diff and float(diff.group(1)) < 1e-4, out
    assert "|Δ var| / var, median" in tables[3]
    acc = re.search(r"^test accuracy with the running averages ([0-9.]+), with the population "
                    r"statistics ([0-9.]+)$", out, re.M)  # fmt: skip
    assert acc and abs(float(acc.group(1)) - float(acc.group(2))) < 0.05, out


def test_saturation_and_learning_rates_reports_results(executed):
    nb = executed("02-saturation-and-learning-rates.ipynb")
    out = _stdout(nb)
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) == 2, "accuracy + saturation, learning rates + weight growth"
    found = dict(
        re.findall(r"^(sigmoid|sigmoid-bn|tanh|tanh-bn) +final test accuracy ([0-9.]+);", out, re.M)
    )
    assert set(found) == {"sigmoid", "sigmoid-bn", "tanh", "tanh-bn"}, out
    for act in ("sigmoid", "tanh"):
        # 300 steps: the BN networks are well above chance, the 8-layer ones without BN are not
        assert float(found[f"{act}-bn"]) > 0.5 > 0.2 > float(found[act]), out
    rates = re.findall(r"^lr x(\d+) (BN|baseline): final test accuracy ([0-9.]+)", out, re.M)
    assert {(int(m), net) for m, net, _ in rates} == {
        (m, net) for m in (1, 5, 30) for net in ("BN", "baseline")
    }, out
    acc = {(int(m), net): float(a) for m, net, a in rates}
    assert acc[(30, "BN")] > acc[(30, "baseline")], out
    tables = [o for o in _outputs(nb) if "text/html" in o.get("data", {})]
    assert any("grad_norm" in t.data["text/html"] for t in tables)  # the per-layer table
    assert any("diff_lo" in t.data["text/html"] for t in tables)  # the compare table


@pytest.mark.slow
def test_santurkar_counter_claims_reports_results(executed):
    nb = executed(_SLOW_NOTEBOOK)
    out = _stdout(nb)
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) == 3, "drift + accuracy, percentiles, landscape"
    number = r"([0-9.e+-]+)"
    line = rf"^(.+?): (\S+) {number} vs (\S+) {number}, (?:ratio|diff) "
    lines = re.findall(line, out, re.M)
    found = {(q, c, r): (float(a), float(b)) for q, c, a, r, b in lines}
    expected = {
        ("mean drift (W1/σ)", "noisy-bn", "bn"),
        ("final test accuracy", "noisy-bn", "bn"),
        ("ics_cos (Linear layers 2-4)", "bn", "baseline"),
        ("loss_variation", "bn", "baseline"),
        ("beta_smoothness", "bn", "baseline"),
    }
    assert expected <= set(found), out
    noisy, bn = found[("mean drift (W1/σ)", "noisy-bn", "bn")]
    assert noisy > 2 * bn > 0, out  # the injected noise moves the distributions
    cos_bn, cos_base = found[("ics_cos (Linear layers 2-4)", "bn", "baseline")]
    assert -1 <= cos_bn <= 1 and -1 <= cos_base <= 1
    tables = [o for o in _outputs(nb) if "text/html" in o.get("data", {})]
    assert any("ics_l2" in t.data["text/html"] for t in tables)  # per-layer ICS tables


def test_scale_invariance_and_jacobians_reports_results(executed):
    nb = executed("04-scale-invariance-and-jacobians.ipynb")
    out = _stdout(nb)
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) == 3, "identities + weights, spectra, gradients at init"
    worst = float(re.search(r"^largest relative error in float64 .*: (\S+)$", out, re.M).group(1))
    assert worst < 1e-12, out  # rounding only
    grew = dict(re.findall(r"^(bn|bn-x5): ‖W‖ grew ([0-9.]+)x", out, re.M))
    assert set(grew) == {"bn", "bn-x5"} and float(grew["bn-x5"]) > float(grew["bn"]) > 1, out
    near = dict(re.findall(r"^trained (\w+): share of segment .* at the end ([0-9.]+)$", out, re.M))
    assert set(near) == {"baseline", "bn"} and all(0 <= float(v) <= 1 for v in near.values())
    init = re.findall(r"^init (bn|baseline) depth (\d+): grad first / last (\S+),", out, re.M)
    ratio = {(net, int(d)): float(r) for net, d, r in init}
    assert {d for _, d in ratio} == {2, 4, 8, 16}, out
    # without BN the sigmoid network's gradient vanishes towards the input, deeper = more
    assert ratio[("baseline", 16)] < ratio[("baseline", 2)] < 1, out
    assert ratio[("bn", 16)] > ratio[("baseline", 16)], out

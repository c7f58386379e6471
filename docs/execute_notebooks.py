"""Execute the notebooks of notebooks/ for the documentation site (``make docs``).

The committed notebooks carry no outputs (tests/test_notebooks.py checks it), so the site's
copies are executed here, at the same reduced scale as the tests (``tests/test_notebooks.py``'s
parameters: 300 steps, 2 seeds), in an ipykernel of this interpreter, with the runs written to
``build/docs/runs``. A markdown cell and the overriding code cell are inserted after the cell
tagged ``parameters``, so each page says at which scale it was run. The executed copies go to
``build/docs/notebooks`` (``docs/hooks.py`` adds them to the site); a copy newer than its source
notebook and than every module of icstools is reused.

Usage: ``python docs/execute_notebooks.py [--force]``
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
OUT = ROOT / "build" / "docs" / "notebooks"
RUNS = ROOT / "build" / "docs" / "runs"

#: The tests' reduced scale (tests/test_notebooks.py FAST_PARAMETERS), for the names a
#: notebook's parameters cell defines.
PARAMETERS = {"STEPS": 300, "EVERY": 50, "EVAL_EVERY": 100, "SEED": 0, "SEEDS": 2, "THREADS": 1}


def _parametrized(nb: nbformat.NotebookNode, runs: Path) -> nbformat.NotebookNode:
    nb = copy.deepcopy(nb)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise SystemExit("a notebook needs exactly one cell tagged 'parameters'")
    i = tagged[0]
    defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*=", nb.cells[i].source, re.M))
    values = {**PARAMETERS, "OUT": os.path.relpath(runs, NOTEBOOKS)}  # the kernel's cwd
    lines = [f"{k} = {v!r}" for k, v in values.items() if k in defined]
    note = nbformat.v4.new_markdown_cell(
        "*Rendered for the documentation at a reduced scale (the test suite's): the next cell "
        "overrides the parameters above. Run the notebook itself for its full-size results.*"
    )
    code = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected"]})
    nb.cells[i + 1 : i + 1] = [note, code]
    return nb


def _stale(src: Path, dst: Path) -> bool:
    if not dst.exists():
        return True
    newest = max(p.stat().st_mtime for p in (ROOT / "icstools").rglob("*.py"))
    return dst.stat().st_mtime < max(src.stat().st_mtime, newest)


def execute(src: Path, dst: Path) -> float:
    """Execute ``src`` (parametrized) into ``dst``; the seconds it took."""
    from nbclient import NotebookClient

    start = time.perf_counter()
    # the notebook's runs are made again with it: runs of an earlier execution would be
    # refused by its run_preset calls (RunsExistError)
    shutil.rmtree(RUNS / src.stem, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp, "kernels", "python3")  # this interpreter's kernel, whatever is installed
        spec.mkdir(parents=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        kernel = {"argv": argv, "display_name": "Python 3", "language": "python"}
        (spec / "kernel.json").write_text(json.dumps(kernel))
        os.environ["JUPYTER_PATH"] = tmp
        os.environ["JUPYTER_PLATFORM_DIRS"] = "1"
        os.environ.pop("MPLBACKEND", None)  # the inline backend draws the figures
        nb = _parametrized(nbformat.read(src, as_version=4), RUNS / src.stem)
        client = NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
        )
        client.execute()  # raises CellExecutionError on the first failing cell
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    force = "--force" in argv
    for src in sorted(NOTEBOOKS.glob("*.ipynb")):
        dst = OUT / src.name
        if not force and not _stale(src, dst):
            print(f"{src.name}: up to date ({dst.relative_to(ROOT)})")
            continue
        print(f"{src.name}: executed in {execute(src, dst):.0f} s -> {dst.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Execute the notebooks of notebooks/ for the documentation site (``make docs``).

The committed notebooks carry no outputs (tests/test_notebooks.py checks it), so the site's
copies are executed here, at the same reduced scale as the tests (``tests/test_notebooks.py``'s
parameters: 300 steps, 2 seeds), each in its own ipykernel of this interpreter and all at the
same time (one torch thread each), with the runs written to ``build/docs/runs``. A markdown
cell and the overriding code cell are inserted after the cell tagged ``parameters``, so each
page says at which scale it was run. The executed copies go to
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


def execute_all(pairs: list[tuple[Path, Path]]) -> dict[Path, float]:
    """Execute each ``src`` (parametrized) into its ``dst``, all at the same time, a kernel
    each (one torch thread each: the tests' ``THREADS``); the seconds each took. Every
    notebook runs to its end (or its first failing cell) and the ones that succeeded are
    written before a failure is raised, naming the notebooks that failed."""
    import asyncio

    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp, "kernels", "python3")  # this interpreter's kernel, whatever is installed
        spec.mkdir(parents=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        kernel = {"argv": argv, "display_name": "Python 3", "language": "python"}
        (spec / "kernel.json").write_text(json.dumps(kernel))
        os.environ["JUPYTER_PATH"] = tmp
        os.environ["JUPYTER_PLATFORM_DIRS"] = "1"
        os.environ.pop("MPLBACKEND", None)  # the inline backend draws the figures
        nbs = []
        for src, _ in pairs:
            # the notebook's runs are made again with it: runs of an earlier execution would be
            # refused by its run_preset calls (RunsExistError)
            shutil.rmtree(RUNS / src.stem, ignore_errors=True)
            nbs.append(_parametrized(nbformat.read(src, as_version=4), RUNS / src.stem))

        async def one(nb: nbformat.NotebookNode) -> float:
            start = time.perf_counter()
            resources = {"metadata": {"path": str(NOTEBOOKS)}}
            client = NotebookClient(nb, timeout=900, kernel_name="python3", resources=resources)
            await client.async_execute()  # raises CellExecutionError on the first failing cell
            return time.perf_counter() - start

        async def run_all() -> list[float | BaseException]:
            return await asyncio.gather(*(one(nb) for nb in nbs), return_exceptions=True)

        results = asyncio.run(run_all())
    seconds, failed = {}, []
    for (src, dst), nb, result in zip(pairs, nbs, results, strict=True):
        if isinstance(result, BaseException):
            failed.append((src.name, result))
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, dst)
        seconds[src] = result
    if failed:
        names = ", ".join(name for name, _ in failed)
        raise RuntimeError(f"notebooks failed: {names}") from failed[0][1]
    return seconds


def main(argv: list[str]) -> int:
    force = "--force" in argv
    pairs = []
    for src in sorted(NOTEBOOKS.glob("*.ipynb")):
        dst = OUT / src.name
        if not force and not _stale(src, dst):
            print(f"{src.name}: up to date ({dst.relative_to(ROOT)})")
        else:
            pairs.append((src, dst))
    if pairs:
        start = time.perf_counter()
        for src, took in execute_all(pairs).items():
            print(f"{src.name}: executed in {took:.0f} s -> {(OUT / src.name).relative_to(ROOT)}")
        took = time.perf_counter() - start
        print(f"{len(pairs)} notebooks executed at the same time in {took:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

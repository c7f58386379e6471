"""The documentation site (issue 14 item 4): every public name has an API entry, every page's
generated part has its source, and (slow, or ``make docs`` in CI) the strict offline build.

``make docs`` itself fails when a public name of ``icstools.__all__`` lacks an entry in the
built site's inventory or a page loads an asset from the network (``docs/hooks.py``); the fast
tests here check the sources, so a missing entry is caught by ``make test`` too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

import icstools

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("icstools_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _directives() -> set[str]:
    return {
        m.group(1)
        for page in (DOCS / "api").glob("*.md")
        for m in re.finditer(r"^::: ([\w.]+)", page.read_text(), re.M)
    }


def test_every_public_name_has_an_api_entry():
    entries = _directives()
    missing = [n for n in icstools.__all__ if f"icstools.{n}" not in entries]
    assert not missing, f"add '::: icstools.NAME' to docs/api/index.md for {missing}"


def test_api_entries_name_objects_that_exist():
    for entry in _directives():
        parts = entry.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                obj = getattr(obj, attr)  # AttributeError: the entry names nothing
            break


def _nav_files(nav) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_files(value) if isinstance(value, list) else [value]
    return out


def test_nav_pages_exist_and_notebooks_are_all_listed():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    files = _nav_files(config["nav"])
    notebooks = sorted(f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(f for f in files if f.endswith(".ipynb")) == notebooks
    for f in files:
        if not f.endswith(".ipynb"):  # notebooks are added by docs/hooks.py after execution
            assert (DOCS / f).is_file(), f
    assert config["strict"] is True and config["theme"]["font"] is False


def test_generated_parts_of_the_pages_have_their_sources():
    hooks = _hooks()
    titles = [
        m.group(1)
        for page in DOCS.rglob("*.md")
        for m in re.finditer(r"<!-- readme: (.+?) -->", page.read_text())
    ]
    assert "The run dataset" in titles and len(titles) >= 8
    for title in titles:
        assert hooks._readme_section(title), f"README.md lost its section '## {title}'"
    cli = hooks._cli_help()
    for command in ("run", "list", "sites", "info", "report", "figures", "export", "demo"):
        assert f"### icstools {command}\n" in cli
    table = hooks._claims_table()
    from icstools.report import CLAIMS

    assert table.count("\n") == len(CLAIMS) + 2


def test_offline_check_finds_remote_assets(tmp_path):
    hooks = _hooks()
    (tmp_path / "a.html").write_text(
        '<a href="https://xarray.dev">ok: a link</a><script src="../js/x.js"></script>'
        '<link rel="stylesheet" href="assets/s.css">'
    )
    assert hooks.external_assets(tmp_path) == []
    (tmp_path / "b.html").write_text(
        '<script src="https://cdn.example/require.js"></script><img src=//x.org/i.png>'
        "<style>@import url('https://fonts.example/css');</style>"
        '<script type="module">const m = await import("https://cdn.example/m.esm.min.mjs");</script>'
    )
    assert len(hooks.external_assets(tmp_path)) == 4


@pytest.mark.slow
def test_make_docs_builds_strict_and_offline(tmp_path):
    """The whole build, as ``make docs`` runs it (executes the notebooks if needed)."""
    pytest.importorskip("mkdocs")
    subprocess.run([sys.executable, str(DOCS / "execute_notebooks.py")], check=True, cwd=ROOT)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        check=True,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    names = _hooks().inventory(site)
    assert {f"icstools.{n}" for n in icstools.__all__} <= names
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        html = (site / "notebooks" / nb.stem / "index.html").read_text()
        assert "data:image/png;base64" in html, f"{nb.name} rendered without its figures"


def _write_inventory(site: Path, names: list[str]) -> None:
    header = b"# Sphinx inventory version 2\n# Project: icstools\n# Version: 0.0.0\n"
    header += b"# The remainder of this file is compressed using zlib.\n"
    body = "".join(f"{n} py:function 1 api/#{n} -\n" for n in names).encode()
    site.mkdir(exist_ok=True)
    (site / "objects.inv").write_bytes(header + zlib.compress(body))


def test_the_build_fails_without_an_api_entry_or_with_a_remote_asset(tmp_path):
    from mkdocs.exceptions import PluginError

    hooks = _hooks()
    site = tmp_path / "site"
    everything = [f"icstools.{n}" for n in icstools.__all__]
    _write_inventory(site, everything)
    assert hooks.inventory(site) == set(everything)
    hooks.on_post_build({"site_dir": str(site)})  # complete and offline: passes
    _write_inventory(site, [n for n in everything if n != "icstools.compare"])
    with pytest.raises(PluginError, match=r"without an entry in the API reference: \['compare'\]"):
        hooks.on_post_build({"site_dir": str(site)})
    _write_inventory(site, everything)
    (site / "page.html").write_text('<script src="https://cdn.example/x.js"></script>')
    with pytest.raises(PluginError, match="the site must work offline"):
        hooks.on_post_build({"site_dir": str(site)})

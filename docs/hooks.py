"""MkDocs hooks of the documentation site (mkdocs.yml ``hooks:``).

- The executed notebooks (``build/docs/notebooks``, written by ``docs/execute_notebooks.py``)
  become the pages ``notebooks/*.ipynb``, rendered by mkdocs-jupyter with their outputs.
- Markers in the pages are replaced by text generated from the single source it lives in, so
  the site cannot drift from it:
  ``<!-- readme: TITLE -->`` a section of README.md (the ``## TITLE...`` heading's body);
  ``<!-- cli -->`` the ``--help`` of ``icstools`` and of each subcommand;
  ``<!-- claims -->`` the table of the report's claims (:data:`icstools.report.CLAIMS`).
  A marker whose source is missing is a warning, so the strict build fails.
- After the build, no page may load anything from the network (a script, stylesheet, image or
  font with an ``http(s)://`` address): the site must work offline.
- After the build, every public name of ``icstools.__all__`` must have an entry in the API
  reference (the site's ``objects.inv``, which mkdocstrings writes): the build fails otherwise.
"""

from __future__ import annotations

import logging
import re
import zlib
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = ROOT / "build" / "docs" / "notebooks"
log = logging.getLogger("mkdocs.hooks.icstools")


@event_priority(50)  # before mkdocs-jupyter (priority 0) turns .ipynb files into pages
def on_files(files, config):
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for src in notebooks:
        executed = EXECUTED / src.name
        if not executed.exists():
            log.warning(
                "notebook %s was not executed for the site: run "
                "'python docs/execute_notebooks.py' first (make docs does)",
                src.name,
            )
            continue
        files.append(
            File(
                f"notebooks/{src.name}",
                src_dir=str(EXECUTED.parent),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files


def _readme_section(title: str) -> str | None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.M)
    for part in parts[1:]:
        heading, _, body = part.partition("\n")
        if heading.strip().startswith(title):
            return body.strip() + "\n"
    return None


def _cli_help() -> str:
    import argparse

    from icstools.cli import _parser

    parser = _parser()
    out = ["```text", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        out += [f"### icstools {name}", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def _claims_table() -> str:
    from icstools.report import CLAIMS
    from icstools.report.claims import rule_text

    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    rows = [
        "| claim | preset | source | measured by | decision rule |",
        "|---|---|---|---|---|",
    ]
    for c in CLAIMS:
        rows.append(
            f"| **{cell(c.id)}**: {cell(c.claim)} | `{c.preset}` | {cell(c.source)} | "
            f"`{c.metric}` | {cell(rule_text(c))} |"
        )
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown, page, config, files):
    def readme(match: re.Match) -> str:
        section = _readme_section(match.group(1).strip())
        if section is None:
            log.warning("%s: README.md has no section '## %s'", page.file.src_path, match.group(1))
            return ""
        # README's links into docs/ (its images) are relative to the repository root; the
        # pages that embed a README section are at the root of docs/
        depth = page.file.src_path.count("/")
        return section.replace("](docs/", "](" + "../" * depth)

    markdown = re.sub(r"<!-- readme: (.+?) -->", readme, markdown)
    if "<!-- cli -->" in markdown:
        markdown = markdown.replace("<!-- cli -->", _cli_help())
    if "<!-- claims -->" in markdown:
        markdown = markdown.replace("<!-- claims -->", _claims_table())
    return markdown


# nbconvert's page template has a mermaid loader that imports mermaid from a CDN when a page has
# a mermaid diagram (ours have none) and an empty MathJax <script src="">: both are removed.
_MERMAID = re.compile(
    r'<script type="module">(?:(?!</script>).)*?mermaid(?:(?!</script>).)*</script>', re.S
)
_EMPTY_SCRIPT = re.compile(r'<script src="">\s*</script>')


def on_post_page(output, page, config):
    if page.file.src_path.endswith(".ipynb"):
        output = _EMPTY_SCRIPT.sub("", _MERMAID.sub("", output))
    return output


def inventory(site_dir: Path) -> set[str]:
    """The object names of the site's ``objects.inv`` (Sphinx inventory format, version 2)."""
    raw = (Path(site_dir) / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):  # four text lines, then the zlib-compressed entries
        header_end = raw.index(b"\n", header_end) + 1
    lines = zlib.decompress(raw[header_end:]).decode("utf-8").splitlines()
    return {line.split(" ", 1)[0] for line in lines if line.strip()}


@event_priority(-100)  # after mkdocstrings wrote objects.inv
def on_post_build(config):
    import icstools

    names = inventory(config["site_dir"])
    missing = [n for n in icstools.__all__ if f"icstools.{n}" not in names]
    if missing:
        raise PluginError(
            f"public names of icstools.__all__ without an entry in the API reference: {missing}; "
            "add '::: icstools.NAME' to docs/api/index.md"
        )
    remote = external_assets(config["site_dir"])
    if remote:
        raise PluginError(
            f"pages load assets from the network (the site must work offline): {remote[:5]}"
        )
    log.info("API reference: all %d names of icstools.__all__ have an entry", len(icstools.__all__))


_ASSET = re.compile(
    r"<(?:script|img|iframe|source|audio|video)\b[^>]*\bsrc=[\"']?(https?:)?//[^\"' >]+"
    r"|<link\b[^>]*\bhref=[\"']?(https?:)?//[^\"' >]+"
    r"|@import\s+url\([\"']?(https?:)?//|url\([\"']?https?://"
    r"|[\"']https?://[^\"']+\.(?:m?js|css)[\"']",  # a script that loads another from the web
    re.I,
)


def external_assets(site_dir: Path) -> list[str]:
    """``page: tag`` for each asset a page of the site would fetch from the network."""
    found = []
    for page in sorted(Path(site_dir).rglob("*.html")):
        for m in _ASSET.finditer(page.read_text(encoding="utf-8", errors="replace")):
            found.append(f"{page.relative_to(site_dir)}: {m.group(0)[:120]}")
    return found

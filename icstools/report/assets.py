"""The page's scripts and styles, inlined: the vendored plotting library (uPlot 1.6.32, MIT,
``assets/uPlot.iife.min.js`` and ``uPlot.min.css``, byte-identical to the npm package's
``dist/`` files; its license in ``assets/uPlot.LICENSE`` is repeated at the end of each page),
the report's own script (``assets/report.js``) and style (``assets/report.css``).

Nothing is loaded from anywhere at view time: every script is inline, and the page's
Content-Security-Policy allows exactly these scripts by their SHA-256 hashes
(:func:`content_security_policy`), no other script, and no network load of any kind. Data is
embedded as JSON in ``<script type="application/json">`` blocks (not executed), escaped so
that no text inside can close the block (:func:`json_block`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
from importlib import resources
from typing import Any

__all__ = [
    "UPLOT_VERSION",
    "content_security_policy",
    "json_block",
    "license_html",
    "scripts",
    "styles",
]

#: The vendored uPlot release.
UPLOT_VERSION = "1.6.32"
# The minified file's first line is a banner with the project's address; the page names the
# project and carries its license instead, so that the page holds no URL at all.
_BANNER = f"/*! https://github.com/leeoniya/uPlot (v{UPLOT_VERSION}) */"


@functools.cache
def _asset(name: str) -> str:
    return resources.files("icstools.report").joinpath("assets", name).read_text("utf-8")


def _uplot_js() -> str:
    js = _asset("uPlot.iife.min.js")
    if js.startswith(_BANNER):
        note = f"/*! uPlot v{UPLOT_VERSION}, MIT License, (c) Leon Sorokin: see the page's end */"
        js = note + js[len(_BANNER) :]
    return js


def scripts() -> list[str]:
    """The page's executable scripts, in order (uPlot, then the report's script)."""
    out = [_uplot_js(), _asset("report.js")]
    for js in out:  # inlined as is: nothing may end the <script> element early
        if "</script" in js.lower() or "<!--" in js:
            raise RuntimeError("an inlined script holds '</script' or '<!--'")
    return out


def styles() -> str:
    """uPlot's style and the report's interactive panels' style."""
    return _asset("uPlot.min.css") + "\n" + _asset("report.css")


def license_html() -> str:
    """uPlot's license, as the page's last section."""
    return (
        "<details class='small' id='licenses'><summary>Third-party license: uPlot "
        f"{UPLOT_VERSION} (plots)</summary><pre>{html.escape(_asset('uPlot.LICENSE'))}"
        "</pre></details>"
    )


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def content_security_policy(inline_scripts: list[str]) -> str:
    """The page's policy: nothing from anywhere (``default-src 'none'``), images only as
    ``data:`` URLs, inline styles, and only the given inline scripts (by SHA-256 hash)."""
    hashes = " ".join(f"'sha256-{_sha256(s)}'" for s in inline_scripts)
    return f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {hashes}"


def json_block(element_id: str, value: Any) -> str:
    """``value`` as a non-executed JSON ``<script>`` block with id ``element_id``. ``<``, ``>``,
    ``&`` and line separators are written as ``\\uXXXX`` escapes, so no string inside (a site
    called ``</script>``, say) can end the block; JSON.parse restores them.

    Examples
    --------
    >>> json_block("d", {"site": "</script>"})
    '<script type="application/json" id="d">{"site":"\\\\u003c/script\\\\u003e"}</script>'
    """
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{html.escape(element_id)}">{text}</script>'

"""The interactive parts of the page: a run's panels (a container and its JSON data, drawn by
``assets/report.js``), its settings (``recorder_config`` and the other attributes), and the
comparison of groups of runs (table of verdicts, and a plot of every run's drift). Every text
from runs, paths, labels or presets is escaped (HTML) or JSON-escaped (data blocks)."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

from icstools.report.assets import json_block
from icstools.report.claims import CONFIDENCE_LEVEL
from icstools.report.comparison import COMPARISON_VERDICTS, MARGIN
from icstools.report.formatting import fmt

__all__ = ["comparison_section", "interactive_block", "settings_block"]


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def interactive_block(run_id: str, payload: dict[str, Any]) -> str:
    """The container of a run's interactive panels and its data."""
    data_id = f"ics-data-{run_id}"
    return (
        json_block(data_id, payload)
        + f'<div class="ics-run" id="ics-run-{_e(run_id)}" data-run="{_e(run_id)}" '
        f'data-src="{_e(data_id)}"><noscript>The interactive plots need JavaScript.</noscript>'
        "</div>"
    )


def settings_block(attrs: dict[str, Any]) -> str:
    """The run's settings: ``recorder_config`` (JSON, indented) and its other attributes."""
    if not attrs:
        return ""
    config = attrs.get("recorder_config")
    rows = "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>"
        for k, v in attrs.items()
        if k not in ("recorder_config", "model_summary")
    )
    parts = ["<details class='settings' open><summary>Run settings</summary>"]
    if config is not None:
        text = json.dumps(config, indent=2) if not isinstance(config, str) else config
        parts.append(
            "<p class='small'>The recorder's configuration (attribute <code>recorder_config"
            f"</code>):</p><pre class='settings'>{_e(text)}</pre>"
        )
    if rows:
        parts.append(f"<table class='attrs'><tbody>{rows}</tbody></table>")
    if attrs.get("model_summary"):
        parts.append(
            "<details><summary>Model</summary><pre class='settings'>"
            f"{_e(attrs['model_summary'])}</pre></details>"
        )
    parts.append("</details>")
    return "".join(parts)


def _ci(pair: Sequence[Any]) -> str:
    lo, hi = pair
    return "no interval" if lo is None or hi is None else f"[{fmt(lo, 3)}, {fmt(hi, 3)}]"


def _badge(v: str) -> str:
    return f'<span class="v verdict-{_e(v)}">{_e(v)}</span>'


def comparison_section(comparison: dict[str, Any], traces: dict[str, Any] | None) -> str:
    """The comparison of groups: who was compared, the verdict counts, one table per metric
    (rows: site × group), and every run's drift per site over steps."""
    groups = comparison["groups"]
    ref = comparison["reference"]
    parts = [
        "<h2 id='comparison'>Comparison of runs</h2>",
        "<table class='groups'><thead><tr><th>group</th><th>input</th><th>runs</th></tr>"
        "</thead><tbody>"
        + "".join(
            f"<tr><td><b>{_e(g['label'])}</b>{' (reference)' if g['label'] == ref else ''}"
            f"</td><td>{_e(g['input'])}</td><td>{len(g['runs'])}: "
            f"{_e(', '.join(g['runs']))}</td></tr>"
            for g in groups
        )
        + "</tbody></table>",
        f"<p>Each group is compared with <b>{_e(ref)}</b>, site by site: each run reduced to "
        "one number per site, the ratio of the groups' means with Fieller's "
        f"{CONFIDENCE_LEVEL:.0%} interval over runs (seeds; the difference with Welch's t "
        "interval). Verdict: <i>higher</i> / "
        "<i>lower</i> when the whole interval lies above / below no change, <i>similar</i> "
        f"when it lies inside ±{MARGIN:.0%}, <i>inconclusive</i> otherwise or without an "
        "interval (a group of one run).</p>",
    ]
    rows = comparison["rows"]
    counts = {v: sum(r["verdict"] == v for r in rows) for v in COMPARISON_VERDICTS}
    parts.append("<p>" + ", ".join(f"{n} {_badge(v)}" for v, n in counts.items()) + "</p>")
    by_metric: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_metric.setdefault((r["metric"], r["what"]), []).append(r)
    for (metric, what), items in by_metric.items():
        body = "".join(
            f"<tr><td>{_e(r['site'])}</td><td>{_e(r['group'])}</td>"
            f"<td>{_e(fmt(r['mean_group']))} ({r['n_group']})</td>"
            f"<td>{_e(fmt(r['mean_reference']))} ({r['n_reference']})</td>"
            f"<td>{_e(fmt(r['ratio'], 3))} {_e(_ci(r['ratio_ci']))}</td>"
            f"<td>{_e(fmt(r['diff'], 3))} {_e(_ci(r['diff_ci']))}</td>"
            f"<td>{_badge(r['verdict'])}</td><td class='small'>{_e(r['reason'])}</td></tr>"
            for r in items
        )
        parts.append(
            f"<h3>{_e(metric)}: {_e(what)}</h3><table class='comparison' data-metric="
            f"'{_e(metric)}'><thead><tr><th>site</th><th>group</th><th>group mean (runs)</th>"
            f"<th>{_e(ref)} mean (runs)</th><th>ratio, {CONFIDENCE_LEVEL:.0%} CI</th>"
            f"<th>difference, CI</th><th>verdict</th><th>why</th></tr></thead><tbody>{body}"
            "</tbody></table>"
        )
    if comparison["notes"]:
        parts.append(
            "<ul class='note'>"
            + "".join(f"<li>{_e(n)}</li>" for n in comparison["notes"])
            + "</ul>"
        )
    if traces is not None:
        parts.append(
            "<h3>Drift of each site in every run</h3>"
            + json_block("ics-compare-data", traces)
            + '<div class="ics-compare" id="ics-compare" data-src="ics-compare-data"></div>'
        )
    return "".join(parts)

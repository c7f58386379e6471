"""The report's HTML page: one self-contained file (CSS inline, static figures embedded as
base64 PNG, the interactive panels drawn by inline scripts from inline JSON data, no URL of
any kind: a Content-Security-Policy forbids every network load and every script but the
page's own, :mod:`icstools.report.assets`), built from the JSON document of
:func:`icstools.report.write_report`, the drawn figures and the interactive sections
(:mod:`icstools.report.sections`). Every text from runs, paths or presets is escaped."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

from icstools.report.assets import content_security_policy, license_html, scripts, styles
from icstools.report.claims import (
    CLAIMS,
    CONFIDENCE_LEVEL,
    METRIC_DESCRIPTIONS,
    VERDICTS,
    rule_text,
)
from icstools.report.formatting import fmt

__all__ = ["page", "preset_section", "run_section"]


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ccc;margin-top:2em}
h3{font-size:1.1em}table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .5em;vertical-align:top;text-align:left}
th{background:#f3f3f3}.v{font-weight:bold;white-space:nowrap;padding:.1em .4em;border-radius:3px}
.supported{background:#d4f4d4;color:#064}.not-supported{background:#f8d7d7;color:#800}
.inconclusive{background:#fff1c2;color:#664d00}.alert{background:#b00020;color:#fff;
padding:.8em 1em;font-weight:bold;margin:1em 0;border-radius:4px}
.note{color:#555;font-size:.85em}.figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:.5em 0;max-width:100%}figcaption{font-size:.9em;max-width:480px}
img{max-width:100%;height:auto}
code{background:#f3f3f3;padding:0 .2em}.small{font-size:.8em;color:#555}
"""


def _verdict_badge(v: str) -> str:
    return f'<span class="v {_e(v.replace(" ", "-"))}">{_e(v)}</span>'


def _list(items: Sequence[str]) -> str:
    if not items:
        return ""
    return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def _figure_html(title: str, fig: Any) -> str:
    data = _png(fig)
    return (
        f'<figure><img alt="{_e(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(title)}</figcaption></figure>"
    )


def _figures_html(figures: Sequence[tuple[str, Any]]) -> str:
    if not figures:
        return ""
    return "<div class='figs'>" + "".join(_figure_html(t, f) for t, f in figures) + "</div>"


def _verdict_rows(verdicts: Sequence[dict[str, Any]]) -> str:
    rows = []
    for v in verdicts:
        eff = v["effect"]
        if eff is None:
            effect = "—"
        elif eff["statistic"] == "max-error":
            effect = _e(f"max error {fmt(eff['estimate'], 3)}")
        else:
            lo, hi = eff["ci_low"], eff["ci_high"]
            ci = "no finite CI" if lo is None or hi is None else f"[{fmt(lo)}, {fmt(hi)}]"
            effect = f"{_e(eff['statistic'])} {_e(fmt(eff['estimate']))}<br>{_e(ci)}"
            if eff.get("method"):
                effect += f"<div class='small'>{_e(eff['method'])}</div>"
        seed = ' <span class="v not-supported">SINGLE SEED</span>' if v["single_seed"] else ""
        notes = f'<div class="note">{_list(v["notes"])}</div>' if v["notes"] else ""
        rows.append(
            "<tr>"
            f"<td>{_e(v['claim'])}<div class='small'>{_e(v['source'])} · {_e(v['id'])}</div></td>"
            f"<td>{_e(v['measurement'])}<div class='small'>metric: {_e(v['metric'])}</div></td>"
            f"<td>{_e(v['comparison'])}</td>"
            f"<td>{effect}</td>"
            f"<td>{_verdict_badge(v['verdict'])}{seed}</td>"
            f"<td>{_e(v['reason'])}{notes}</td>"
            "</tr>"
        )
    return (
        '<table id="verdicts"><thead><tr><th>Claim</th><th>Measurement</th><th>Comparison</th>'
        f"<th>Effect ({CONFIDENCE_LEVEL:.0%} CI over seeds)</th><th>Verdict</th><th>Why</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _claims_table(presets: Sequence[str]) -> str:
    rows = []
    for c in CLAIMS:
        if c.preset not in presets:
            continue
        rows.append(
            f"<tr><td>{_e(c.id)}</td><td>{_e(c.claim)}</td>"
            f"<td>{_e(METRIC_DESCRIPTIONS.get(c.metric, '—'))}</td>"
            f"<td>{_e(' vs '.join(x for x in c.comparison if x) or '—')}</td>"
            f"<td>{_e(rule_text(c))}</td></tr>"
        )
    if not rows:
        return ""
    return (
        "<h2>Claims and decision rules</h2><table id='claims'><thead><tr><th>Id</th>"
        "<th>Claim</th><th>Metric (one number per run)</th><th>Comparison</th>"
        "<th>Decision rule</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def run_section(
    entry: dict[str, Any], figures: Sequence[tuple[str, Any]], interactive: str = ""
) -> str:
    """The section of one run's diagnostics (``entry`` as ``REPORT_SCHEMA["$defs"]["run"]``);
    ``interactive``: its interactive panels and settings (:mod:`icstools.report.sections`)."""
    parts = [f"<h3>Run {_e(entry['path'])}</h3>"]
    div = entry["diverged_step"]
    parts.append(
        f"<p>{entry['records']} records, steps {_e(entry['first_step'])}…"
        f"{_e(entry['last_step'])}; model {_e(entry.get('model_class', '') or '?')}; "
        f"source of the activation statistics: {_e(entry['source'])}. "
        + (f"<b>Diverged at step {div}.</b>" if div is not None else "No divergence recorded.")
        + "</p>"
    )
    flags = entry["drift_flags"]
    if flags["available"]:
        w = flags["window_steps"]
        parts.append(
            f"<p>Drift flags: {_e(flags['aggregate'])} of {_e(flags['metric'])} against the "
            f"{_e(flags['reference'])}; threshold mean + {flags['n_sigma']:g} sd learned on "
            f"the reference window of records at steps {w[0]}…{w[-1]} ({len(w)} records); "
            "steps after the window where a site exceeds it:</p>"
        )
    else:
        parts.append(f"<p>Drift flags: not available ({_e(flags.get('reason', ''))}).</p>")
    cols = [
        ("units", "units"),
        ("mean", "mean"),
        ("std", "std"),
        ("sat_frac", "sat_frac"),
        ("dead_units", "dead units"),
        ("nonfinite_units", "non-finite units"),
        ("w1_std_median", "W1/σ vs first (median)"),
        ("grad_norm", "grad_norm"),
        ("drift_threshold", "drift threshold"),
    ]
    head = "".join(f"<th>{_e(t)}</th>" for _, t in cols)
    body = []
    for s in entry["sites"]:
        cells = "".join(
            f"<td>{_e(fmt(s.get(k)) if k != 'units' else s['units'])}</td>" for k, _ in cols
        )
        flagged = s["flagged_steps"]
        shown = ", ".join(str(t) for t in flagged[:40]) + (" …" if len(flagged) > 40 else "")
        body.append(f"<tr><td>{_e(s['site'])}</td>{cells}<td>{_e(shown or 'none')}</td></tr>")
    parts.append(
        f"<table class='sites'><thead><tr><th>site</th>{head}<th>flagged steps</th></tr>"
        f"</thead><tbody>{''.join(body)}</tbody></table>"
        "<p class='small'>Values at the last record; W1/σ against the first record.</p>"
    )
    parts.append(interactive)
    if entry["absent"]:
        parts.append(
            "<p class='note'>Not recorded (skipped): "
            + "; ".join(f"{_e(a['variable'])} ({_e(a['how'])})" for a in entry["absent"])
            + "</p>"
        )
    if entry["notes"]:
        parts.append(f"<div class='note'>{_list(entry['notes'])}</div>")
    parts.append(_figures_html(figures))
    return "".join(parts)


def preset_section(
    entry: dict[str, Any], figures: Sequence[tuple[str, Any]], interactive: str = ""
) -> str:
    """The section of one preset directory (``entry`` as ``REPORT_SCHEMA["$defs"]["preset"]``);
    ``interactive``: the interactive panels of its diagnosed runs (an unknown preset's)."""
    parts = [f"<h2>Preset {_e(entry['preset'])}</h2><p class='small'>{_e(entry['path'])}</p>"]
    if not entry["known"]:
        parts.append(
            f"<p class='alert'>Unknown preset {_e(entry['preset'])}: no claims are defined for "
            "it; its runs get the diagnostics of any run (first seed of each condition).</p>"
        )
    rows = []
    for c in entry["conditions"]:
        for r in c["runs"]:
            div = r["diverged_step"]
            rows.append(
                f"<tr><td>{_e(c['name'])}</td><td>{_e(r['seed'])}</td>"
                f"<td>{r['records']}</td><td>{_e(r['last_step'])}</td>"
                f"<td>{_e('no' if div is None else f'at step {div}')}</td>"
                f"<td>{_e(fmt(r['final_test_acc']))}</td></tr>"
            )
    parts.append(
        "<table class='runs'><thead><tr><th>condition</th><th>seed</th><th>records</th>"
        "<th>last step</th><th>diverged</th><th>final test_acc</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )
    if entry["single_seed_conditions"]:
        parts.append(
            "<p class='alert'>SINGLE SEED in "
            + _e(", ".join(entry["single_seed_conditions"]))
            + ": no confidence interval over seeds; the verdicts that need one are "
            "inconclusive.</p>"
        )
    if entry["notes"]:
        parts.append(f"<div class='note'>{_list(entry['notes'])}</div>")
    parts.append(_figures_html(figures))
    parts.append(interactive)
    return "".join(parts)


def page(
    data: dict[str, Any],
    preset_sections: Sequence[str],
    run_sections: Sequence[str],
    comparison: str = "",
) -> str:
    """The whole page: verdicts, claims and rules, the comparison of groups of runs, the preset
    and run sections, notes, then the inline scripts that draw the interactive panels."""
    verdicts = data["verdicts"]
    presets = [p["preset"] for p in data["presets"]]
    inline = scripts()
    head = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' "
        f'content="{_e(content_security_policy(inline))}">'
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>icstools drift report</title>"
        f"<style>{_CSS}{styles()}</style></head><body>"
    )
    parts = [
        head,
        "<h1>icstools drift report</h1>",
        f"<p class='small'>icstools {_e(data['icstools_version'])}, written {_e(data['created'])}"
        f"; inputs: {_e(', '.join(data['inputs']))}</p>",
    ]
    if data["single_seed"]:
        parts.append(
            "<div class='alert' id='single-seed'>SINGLE SEED: some compared condition has a "
            "single run. Without several seeds there is no confidence interval over seeds, and "
            "every verdict that needs one is inconclusive. Run more seeds.</div>"
        )
    if verdicts:
        counts = {k: sum(v["verdict"] == k for v in verdicts) for k in VERDICTS}
        parts.append(
            "<h2>Verdicts</h2><p>"
            + ", ".join(f"{n} {_e(k)}" for k, n in counts.items())
            + f". Effects are {CONFIDENCE_LEVEL:.0%} confidence intervals over seeds (each run "
            "reduced to one number): Welch's t interval for a difference, Fieller's interval "
            "for a ratio, as each effect says.</p>" + _verdict_rows(verdicts)
        )
        parts.append(_claims_table(presets))
    parts.append(comparison)
    parts += preset_sections
    if run_sections:
        parts.append(
            "<h2>Runs</h2><p>Diagnostics of runs outside presets: drift per site over time, "
            "saturation, dead units, gradients, gradient ICS, landscape and Jacobian spectra "
            "when recorded, and the steps where drift was flagged.</p>"
        )
        parts += run_sections
    if data["notes"]:
        parts.append(f"<h2>Notes</h2>{_list(data['notes'])}")
    parts.append(license_html())
    parts += [f"<script>{js}</script>" for js in inline]
    parts.append("</body></html>")
    return "\n".join(parts)

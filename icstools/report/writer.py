""":func:`write_report`: find the runs, assess the claims of each preset, diagnose the other
runs, draw the figures, and write the HTML page and the JSON document."""

from __future__ import annotations

import datetime
import json as _json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr

from icstools import __version__
from icstools.analysis.metrics import METRICS, diverged_step
from icstools.report.claims import CLAIMS, CONFIDENCE_LEVEL
from icstools.report.comparison import Group, compare_groups, drift_traces
from icstools.report.diagnostics import diagnose
from icstools.report.figures import preset_figures
from icstools.report.formatting import num
from icstools.report.html import page, preset_section, run_section
from icstools.report.inputs import as_paths, find_inputs, group_labels, open_store, preset_runs
from icstools.report.interactive import run_payload, settings
from icstools.report.json_schema import SCHEMA_ID
from icstools.report.sections import comparison_section, interactive_block, settings_block
from icstools.report.verdicts import assess

__all__ = ["ReportResult", "write_report"]


@dataclass
class ReportResult:
    """What :func:`write_report` returns.

    Attributes
    ----------
    verdicts : list of dict
        One per claim: ``id``, ``preset``, ``claim``, ``source``, ``verdict`` (one of
        :data:`~icstools.report.VERDICTS`), ``measurement`` (str), ``metric``, ``comparison``,
        ``rule``, ``reason``, ``effect`` (statistic, estimate, CI) or None, ``groups`` (per
        condition: runs, diverged, mean, sd, values), ``single_seed``, ``notes``.
    html_path : Path
    json_path : Path or None
    data : dict
        The whole JSON document (valid against :data:`~icstools.report.REPORT_SCHEMA`).
    """

    verdicts: list[dict[str, Any]]
    html_path: Path
    json_path: Path | None
    data: dict[str, Any]


def write_report(
    inputs: Sequence[str | os.PathLike[str]],
    html: str | os.PathLike[str],
    json: str | os.PathLike[str] | None = None,
    *,
    labels: Sequence[str] | None = None,
) -> ReportResult:
    """Write the drift report: one self-contained HTML file and, optionally, JSON.

    Each input that holds runs but no preset (a run store, or a folder of runs: its seeds) is
    a **group**; with two groups or more, every group is compared with the first, site by site
    (:mod:`icstools.report.comparison`: ratio with Fieller's interval over runs, and a
    verdict).

    Parameters
    ----------
    inputs : list of paths
        Preset directories (``<dir>/<preset>/`` with ``manifest.json`` and
        ``<condition>/seed-<n>.zarr`` stores), directories of run stores (searched
        recursively; preset directories inside are recognized), or single run stores.
    html : path
        The HTML file to write (its directory is created).
    json : path, optional
        The JSON file to write (same numbers; schema :data:`~icstools.report.REPORT_SCHEMA`).
    labels : list of str, optional
        One name per input, for the groups (default: each input's name without ``.zarr``).
        Only for inputs that are runs or folders of runs, not preset folders.

    Returns
    -------
    ReportResult

    Raises
    ------
    TypeError
        ``inputs`` is not a list of paths.
    FileNotFoundError
        An input does not exist.
    ValueError
        An input is a file, no run was found in any input, or ``labels`` do not match the
        inputs (count, empty or repeated names, a preset folder).

    Examples
    --------
    >>> r = write_report(["data/runs/fig1"], "fig1.html", "fig1.json")  # doctest: +SKIP
    >>> r.verdicts[0]["verdict"]  # doctest: +SKIP
    'supported'
    """
    paths = as_paths(inputs)
    if not isinstance(html, (str, os.PathLike)):
        raise TypeError(f"html must be a path, got {type(html).__name__}")
    if json is not None and not isinstance(json, (str, os.PathLike)):
        raise TypeError(f"json must be a path or None, got {type(json).__name__}")
    html_path = Path(html)
    json_path = Path(json) if json is not None else None
    found_each = [find_inputs([p]) for p in paths]
    names = group_labels(paths, labels, [bool(f.presets) for f in found_each])
    notes = [n for f in found_each for n in f.notes]
    verdicts: list[dict[str, Any]] = []
    preset_entries: list[dict[str, Any]] = []
    run_entries: list[dict[str, Any]] = []
    sections: list[str] = []
    run_sections: list[str] = []
    groups: list[Group] = []
    drifts: dict[str, xr.Dataset | None] = {}
    ids = iter(f"r{i}" for i in range(1_000_000))
    for found in found_each:  # presets first: their diagnosed runs lead the run entries
        for directory, name, pnotes in found.presets:
            entry, pv, diagnosed, figs, panels = _preset(directory, name, pnotes, ids)
            verdicts += pv
            run_entries += diagnosed
            preset_entries.append(entry)
            sections.append(preset_section(entry, figs, panels))
    for path, found, label in zip(paths, found_each, names, strict=True):
        group = Group(label, str(path)) if not found.presets else None
        for store in found.stores:
            ds = open_store(store, notes)
            if ds is None:
                continue
            run_entry, figs, drift = diagnose(ds, str(store))
            panels = _panels(ds, run_entry, drift, str(store), next(ids))
            if group is not None:
                run_entry["group"] = group.label
                group.runs.append((str(store), ds))
                drifts[str(store)] = drift
            run_entries.append(run_entry)
            run_sections.append(run_section(run_entry, figs, panels))
        if group is not None and group.runs:
            groups.append(group)
    if not preset_entries and not run_entries:
        raise ValueError(
            f"no readable run found in {[str(p) for p in paths]}" + (f": {notes}" if notes else "")
        )
    comparison = compare_groups(groups) if len(groups) >= 2 else None
    comparison_html = (
        comparison_section(comparison, drift_traces(groups, drifts)) if comparison else ""
    )
    single = any(v["single_seed"] for v in verdicts) or any(
        e["single_seed_conditions"] for e in preset_entries
    )
    data = {
        "schema": SCHEMA_ID,
        "icstools_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [str(p) for p in paths],
        "confidence_level": CONFIDENCE_LEVEL,
        "single_seed": bool(single),
        "verdicts": verdicts,
        "presets": preset_entries,
        "runs": run_entries,
        "comparison": comparison,
        "notes": notes,
    }
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(page(data, sections, run_sections, comparison_html), encoding="utf-8")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(_json.dumps(data, indent=2, allow_nan=False), encoding="utf-8")
    return ReportResult(verdicts=verdicts, html_path=html_path, json_path=json_path, data=data)


def _run_brief(path: str, seed: int | None, ds: xr.Dataset) -> dict[str, Any]:
    """A run of a preset, as ``REPORT_SCHEMA["$defs"]["run_brief"]``."""
    return {
        "path": path,
        "seed": seed,
        "records": int(ds.sizes.get("step", 0)),
        "last_step": int(ds["step"].values[-1]) if ds.sizes.get("step") else None,
        "diverged_step": diverged_step(ds),
        "final_test_acc": num(METRICS["final_acc"](ds)) if "test_acc" in ds.data_vars else None,
    }


def _panels(
    ds: xr.Dataset, entry: dict[str, Any], drift: xr.Dataset | None, label: str, run_id: str
) -> str:
    """A run's interactive panels and settings."""
    return interactive_block(run_id, run_payload(ds, entry, drift, label)) + settings_block(
        settings(ds)
    )


def _preset(
    directory: Path, name: str, pnotes: list[str], ids: Iterator[str]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], list[tuple[str, Any]], str]:
    """One preset directory: its JSON entry, its verdicts, the diagnostics of its runs (an
    unknown preset's first seed of each condition), its figures and their interactive
    panels."""
    runs = preset_runs(directory, pnotes)
    known = any(c.preset == name for c in CLAIMS)
    entry: dict[str, Any] = {
        "path": str(directory),
        "preset": name,
        "known": known,
        "conditions": [
            {"name": cond, "runs": [_run_brief(p, seed, ds) for p, seed, ds in items]}
            for cond, items in runs.items()
        ],
        "single_seed_conditions": [c for c, v in runs.items() if len(v) == 1],
        "figures": [],
        "notes": pnotes,
    }
    if not runs:
        pnotes.append(f"no readable run store in {directory}/<condition>/*.zarr")
    conds = {c: [ds for _, _, ds in v] for c, v in runs.items()}
    verdicts = assess(name, conds, labels={c: [p for p, _, _ in v] for c, v in runs.items()})
    figs = preset_figures(name, conds, known, pnotes)
    entry["figures"] = [title for title, _ in figs]
    diagnosed = []
    panels = []
    if not known:
        for cond, items in runs.items():
            p, _, ds = items[0]
            run_entry, run_figs, drift = diagnose(ds, p)
            diagnosed.append(run_entry)
            figs += [(f"{cond}: {t}", f) for t, f in run_figs]
            panels.append(_panels(ds, run_entry, drift, f"{cond}: {p}", next(ids)))
    return entry, verdicts, diagnosed, figs, "".join(panels)

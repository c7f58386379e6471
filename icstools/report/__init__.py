"""The drift report: each claim, its measurement and its verdict, as one HTML file and JSON.

:func:`write_report` reads runs (a preset's directory, a directory of run stores, or single
stores), evaluates the claims that apply, diagnoses every run, compares groups of runs (each
input that is a run store or a folder of runs is a group; ``labels`` name them), and writes

* one **self-contained HTML file**: CSS inline, static figures embedded as base64 PNG,
  interactive plots drawn by two inline scripts (the vendored uPlot library and the report's
  own) from inline JSON data, no URL of any kind; a Content-Security-Policy forbids every
  network load and every script but those two (by hash), so it opens offline and can be
  mailed around;
* a **JSON file** with the same numbers, described by :data:`REPORT_SCHEMA` (JSON Schema, draft
  2020-12). Non-finite numbers are written as ``null``.

Structure, one job per module:

- :mod:`~icstools.report.claims`: the :class:`Claim` type, the table :data:`CLAIMS` (each claim
  names a metric of the run-level registry :data:`icstools.analysis.metrics.METRICS` and the
  keyword arguments it passes), :data:`METRIC_DESCRIPTIONS`, :func:`rule_text`;
- :mod:`~icstools.report.verdicts`: the statistics deciding a verdict (:func:`assess`,
  :func:`small_sample_note`, and how a verdict is reached);
- :mod:`~icstools.report.comparison`: comparisons of groups of any runs, per site (through
  :func:`icstools.analysis.compare.compare`), and their verdicts;
- :mod:`~icstools.report.diagnostics`: :func:`diagnose_run`, the diagnostics and drift flags of
  any run;
- :mod:`~icstools.report.interactive`: the data of a run's interactive panels (series,
  per-unit drill-down, histograms over time, reference-vs-current overlays, settings);
- :mod:`~icstools.report.inputs`: finding preset directories and run stores on disk (opened
  with :func:`icstools.open_run`), and the groups' labels;
- :mod:`~icstools.report.figures`: the report's static figures, from :mod:`icstools.plots`;
- :mod:`~icstools.report.html`: the page (CSS, escaping, embedded PNGs, the policy);
- :mod:`~icstools.report.sections`: the interactive sections (panels, settings, comparison);
- :mod:`~icstools.report.assets`: the inlined scripts and styles (``assets/``), the policy's
  hashes, JSON data blocks;
- :mod:`~icstools.report.json_schema`: :data:`REPORT_SCHEMA`, :data:`SCHEMA_ID`;
- :mod:`~icstools.report.formatting`: numbers as JSON values and as text;
- :mod:`~icstools.report.writer`: :func:`write_report` and :class:`ReportResult`.

Examples
--------
>>> from icstools.report import write_report
>>> result = write_report(["runs/fig1"], "report.html", "report.json")  # doctest: +SKIP
>>> [(v["claim"][:30], v["verdict"]) for v in result.verdicts]  # doctest: +SKIP
>>> r = write_report(["runs/a", "runs/b"], "ab.html", labels=["A", "B"])  # doctest: +SKIP
>>> {row["verdict"] for row in r.data["comparison"]["rows"]}  # doctest: +SKIP
"""

from icstools.report.claims import (
    CLAIMS,
    CONFIDENCE_LEVEL,
    METRIC_DESCRIPTIONS,
    VERDICTS,
    Claim,
    rule_text,
)
from icstools.report.diagnostics import diagnose_run
from icstools.report.json_schema import REPORT_SCHEMA
from icstools.report.json_schema import SCHEMA_ID as SCHEMA_ID
from icstools.report.verdicts import FEW_SEEDS as FEW_SEEDS
from icstools.report.verdicts import N_RESAMPLES as N_RESAMPLES
from icstools.report.verdicts import assess, small_sample_note
from icstools.report.writer import ReportResult, write_report

__all__ = [
    "CLAIMS",
    "CONFIDENCE_LEVEL",
    "METRIC_DESCRIPTIONS",
    "REPORT_SCHEMA",
    "VERDICTS",
    "Claim",
    "ReportResult",
    "assess",
    "diagnose_run",
    "rule_text",
    "small_sample_note",
    "write_report",
]

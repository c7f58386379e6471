"""The JSON report's schema: :data:`REPORT_SCHEMA` (JSON Schema, draft 2020-12) and the value of
its ``schema`` field, :data:`SCHEMA_ID`. Non-finite numbers are written as ``null``."""

from __future__ import annotations

from typing import Any

from icstools.report.claims import VERDICTS
from icstools.report.comparison import COMPARISON_VERDICTS

__all__ = ["REPORT_SCHEMA", "SCHEMA_ID"]

#: ``schema`` value of the JSON report.
SCHEMA_ID = "icstools-report/1"

_NUM = {"type": ["number", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"]}
_STRS = {"type": "array", "items": {"type": "string"}}

#: JSON Schema (draft 2020-12) of the JSON report.
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "icstools-report-1",
    "title": "icstools drift report",
    "description": (
        "Claims, measurements and verdicts of an icstools report, and diagnostics of runs "
        "outside presets. Non-finite numbers are null."
    ),
    "type": "object",
    "required": [
        "schema",
        "icstools_version",
        "created",
        "inputs",
        "confidence_level",
        "single_seed",
        "verdicts",
        "presets",
        "runs",
        "comparison",
        "notes",
    ],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "icstools_version": {"type": "string"},
        "created": {"type": "string", "description": "ISO 8601 time of writing"},
        "inputs": _STRS,
        "confidence_level": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "single_seed": {
            "type": "boolean",
            "description": "some compared condition has a single run (no interval over seeds)",
        },
        "verdicts": {"type": "array", "items": {"$ref": "#/$defs/verdict"}},
        "presets": {"type": "array", "items": {"$ref": "#/$defs/preset"}},
        "runs": {"type": "array", "items": {"$ref": "#/$defs/run"}},
        "comparison": {
            "description": "groups of runs compared site by site (null: fewer than 2 groups)",
            "oneOf": [{"type": "null"}, {"$ref": "#/$defs/comparison"}],
        },
        "notes": _STRS,
    },
    "$defs": {
        "comparison": {
            "type": "object",
            "required": ["groups", "reference", "confidence_level", "margin", "rows", "notes"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 2,
                    "items": {
                        "type": "object",
                        "required": ["label", "input", "runs"],
                        "additionalProperties": False,
                        "properties": {
                            "label": {"type": "string"},
                            "input": {"type": "string"},
                            "runs": _STRS,
                        },
                    },
                },
                "reference": {"type": "string", "description": "label of the reference group"},
                "confidence_level": {"type": "number"},
                "margin": {"type": "number", "description": "half-width of the equivalence band"},
                "rows": {"type": "array", "items": {"$ref": "#/$defs/comparison_row"}},
                "notes": _STRS,
            },
        },
        "comparison_row": {
            "type": "object",
            "required": [
                "metric",
                "metric_kwargs",
                "what",
                "site",
                "group",
                "reference",
                "n_group",
                "n_reference",
                "mean_group",
                "mean_reference",
                "ratio",
                "ratio_ci",
                "diff",
                "diff_ci",
                "statistic",
                "verdict",
                "reason",
            ],
            "additionalProperties": False,
            "properties": {
                "metric": {"type": "string", "description": "registry metric or run variable"},
                "metric_kwargs": {"type": "object", "additionalProperties": {"type": "string"}},
                "what": {"type": "string"},
                "site": {"type": "string"},
                "group": {"type": "string"},
                "reference": {"type": "string"},
                "n_group": {"type": "integer", "minimum": 0},
                "n_reference": {"type": "integer", "minimum": 0},
                "mean_group": _NUM,
                "mean_reference": _NUM,
                "ratio": _NUM,
                "ratio_ci": {"type": "array", "items": _NUM, "minItems": 2, "maxItems": 2},
                "diff": _NUM,
                "diff_ci": {"type": "array", "items": _NUM, "minItems": 2, "maxItems": 2},
                "statistic": {"enum": ["ratio", "diff"]},
                "verdict": {"enum": list(COMPARISON_VERDICTS)},
                "reason": {"type": "string"},
            },
        },
        "verdict": {
            "type": "object",
            "required": [
                "id",
                "preset",
                "claim",
                "source",
                "verdict",
                "measurement",
                "metric",
                "comparison",
                "rule",
                "reason",
                "effect",
                "groups",
                "single_seed",
                "notes",
            ],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string"},
                "preset": {"type": "string"},
                "claim": {"type": "string"},
                "source": {"type": "string"},
                "verdict": {"enum": list(VERDICTS)},
                "measurement": {"type": "string", "description": "the numbers, in words"},
                "metric": {"type": "string", "description": "what one number per run is"},
                "comparison": {"type": "string"},
                "rule": {"type": "string", "description": "the decision rule"},
                "reason": {"type": "string", "description": "why this verdict"},
                "effect": {"oneOf": [{"type": "null"}, {"$ref": "#/$defs/effect"}]},
                "groups": {"type": "array", "items": {"$ref": "#/$defs/group"}},
                "single_seed": {"type": "boolean"},
                "notes": _STRS,
            },
        },
        "effect": {
            "type": "object",
            "description": (
                "the statistic and its interval over seeds; null ends: unbounded or undefined "
                "interval (the measurement text shows ±∞)"
            ),
            "required": ["statistic", "estimate", "ci_low", "ci_high", "confidence_level"],
            "additionalProperties": False,
            "properties": {
                "statistic": {"enum": ["ratio", "diff", "max-error"]},
                "estimate": _NUM,
                "ci_low": _NUM,
                "ci_high": _NUM,
                "confidence_level": {"type": ["number", "null"]},
                "method": {"type": "string"},
                "test": {"type": "string"},
                "p": _NUM,
                "condition": {"type": "string"},
                "reference": {"type": "string"},
            },
        },
        "group": {
            "type": "object",
            "required": ["condition", "n_runs", "n_finite", "n_diverged", "mean", "sd", "values"],
            "additionalProperties": False,
            "properties": {
                "condition": {"type": "string"},
                "n_runs": {"type": "integer", "minimum": 0},
                "n_finite": {"type": "integer", "minimum": 0},
                "n_diverged": {"type": "integer", "minimum": 0},
                "n_trains": {"type": "integer", "minimum": 0},
                "mean": _NUM,
                "sd": _NUM,
                "values": {"type": "array", "items": _NUM},
            },
        },
        "preset": {
            "type": "object",
            "required": [
                "path",
                "preset",
                "known",
                "conditions",
                "single_seed_conditions",
                "notes",
            ],
            "additionalProperties": False,
            "properties": {
                "path": {"type": "string"},
                "preset": {"type": "string"},
                "known": {"type": "boolean", "description": "claims are defined for it"},
                "conditions": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "runs"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            "runs": {"type": "array", "items": {"$ref": "#/$defs/run_brief"}},
                        },
                    },
                },
                "single_seed_conditions": _STRS,
                "figures": _STRS,
                "notes": _STRS,
            },
        },
        "run_brief": {
            "type": "object",
            "required": ["path", "seed", "records", "last_step", "diverged_step", "final_test_acc"],
            "additionalProperties": False,
            "properties": {
                "path": {"type": "string"},
                "seed": _INT_OR_NULL,
                "records": {"type": "integer", "minimum": 0},
                "last_step": _INT_OR_NULL,
                "diverged_step": _INT_OR_NULL,
                "final_test_acc": _NUM,
            },
        },
        "site": {
            "type": "object",
            "required": ["site", "units", "flagged_steps"],
            "additionalProperties": False,
            "properties": {
                "site": {"type": "string"},
                "units": {"type": "integer", "minimum": 0},
                "mean": _NUM,
                "std": _NUM,
                "sat_frac": _NUM,
                "dead_units": _INT_OR_NULL,
                "nonfinite_units": _INT_OR_NULL,
                "w1_std_median": _NUM,
                "w1_std_max": _NUM,
                "grad_norm": _NUM,
                "drift_threshold": _NUM,
                "flagged_steps": {"type": "array", "items": {"type": "integer"}},
            },
        },
        "run": {
            "type": "object",
            "required": [
                "path",
                "records",
                "first_step",
                "last_step",
                "diverged_step",
                "sites",
                "drift_flags",
                "present",
                "absent",
                "figures",
                "notes",
            ],
            "additionalProperties": False,
            "properties": {
                "path": {"type": "string"},
                "group": {"type": "string", "description": "label of the run's group"},
                "model_class": {"type": "string"},
                "records": {"type": "integer", "minimum": 0},
                "first_step": _INT_OR_NULL,
                "last_step": _INT_OR_NULL,
                "diverged_step": _INT_OR_NULL,
                "source": {"type": ["string", "null"]},
                "sites": {"type": "array", "items": {"$ref": "#/$defs/site"}},
                "drift_flags": {
                    "type": "object",
                    "required": ["available", "metric", "reference", "aggregate", "window_steps"],
                    "additionalProperties": False,
                    "properties": {
                        "available": {"type": "boolean"},
                        "metric": {"type": "string"},
                        "reference": {"type": "string"},
                        "aggregate": {"type": "string"},
                        "window_steps": {"type": "array", "items": {"type": "integer"}},
                        "n_sigma": {"type": "number"},
                        "reason": {"type": "string"},
                    },
                },
                "present": _STRS,
                "absent": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["variable", "how"],
                        "additionalProperties": False,
                        "properties": {"variable": {"type": "string"}, "how": {"type": "string"}},
                    },
                },
                "figures": _STRS,
                "notes": _STRS,
            },
        },
    },
}

"""The recorder's own keywords: their checks and the run's ``recorder_config``.

Keywords that belong to a measurement are checked by that measurement
(:mod:`icstools.recording.measurements`); this module checks the rest and writes the
configuration stored in every run's attrs, key by key in a fixed order.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from icstools.recording.errors import RecorderError
from icstools.recording.measurements import Measurement
from icstools.recording.steps import unwrap_optimizer

__all__ = [
    "call_with_probe",
    "check_options",
    "describe_probe",
    "first_tensor",
    "recorder_config",
]


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor of any dtype in ``obj`` (depth-first through tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj
    items = obj.values() if isinstance(obj, dict) else obj
    if isinstance(obj, (dict, tuple, list)):
        for item in items:
            if (found := first_tensor(item)) is not None:
                return found
    return None


def check_options(model: Any, o: SimpleNamespace) -> None:
    """Raise ``TypeError``/``ValueError`` naming a recorder keyword with a bad value."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if o.optimizer is not None:
        unwrap_optimizer(o.optimizer)  # TypeError unless it is (or wraps) a torch optimizer
    if o.calls not in (None, "pool", "separate"):
        raise ValueError(f"calls must be 'pool' or 'separate' (or not given), got {o.calls!r}")
    if o.probe_mode not in ("train", "eval"):
        raise ValueError(f"probe_mode must be 'train' or 'eval', got {o.probe_mode!r}")
    if o.probe is not None and first_tensor(o.probe) is None:
        raise TypeError(
            "probe must be a tensor, a tuple of positional arguments or a dict of keyword "
            f"arguments holding at least one tensor, got {type(o.probe).__name__}"
        )
    if not (
        isinstance(o.gradients, bool)
        or (isinstance(o.gradients, str) and o.gradients == "activations")
    ):
        raise TypeError(f"gradients must be True, False or 'activations', got {o.gradients!r}")
    if o.start_step is not None:
        if isinstance(o.start_step, bool) or not isinstance(o.start_step, int):
            raise TypeError(f"start_step must be an int (or not given), got {o.start_step!r}")
        if o.start_step < 0:
            raise ValueError(f"start_step must be ≥ 0, got {o.start_step}")
    if o.resume and o.overwrite:
        raise ValueError(
            "resume=True continues the store at path and overwrite=True deletes it (with its "
            "records): pass one of them"
        )
    if o.resume and o.path is None:
        raise ValueError("resume=True continues a store: give the Recorder its path=")
    if o.loss_fn is not None and not callable(o.loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(o.loss_fn).__name__}")


def recorder_config(
    o: SimpleNamespace, schedule: Any, measurements: list[Measurement]
) -> dict[str, Any]:
    """The recorder's configuration as JSON-able values (the run's ``recorder_config``)."""
    probe = first_tensor(o.probe) if o.probe is not None else None
    config: dict[str, Any] = {
        "sites": [s.name for s in o.sites],
        "schedule": repr(schedule),
        "probe_shape": None if probe is None else list(probe.shape),
        "probe_mode": o.probe_mode,
        "probe_sample": o.probe_sample,
        "quantiles": None,  # the measurements' own keys keep these places
        "bins": None,
        "hist_range": None,
        "saturation": None,
        "unit_dim": repr(o.unit_dim),
        "quantile_sample": None,
        "calls": o.calls or "pool",
        "chunk_steps": o.chunk_steps,
        "seed": o.seed,
        "gradients": o.gradients,
        "ics": None,
        "landscape": None,
        "landscape_multipliers": np.asarray(o.landscape_multipliers, np.float64)
        .reshape(-1)
        .tolist(),
        "jacobian": None,
        "jacobian_blocks": None,
        "jacobian_examples": o.jacobian_examples,
        "jacobian_k": o.jacobian_k,
        "jacobian_bn": o.jacobian_bn,
        "scaler": o.scaler is not None,
        "path": None if o.path is None else str(Path(o.path)),
    }
    for m in measurements:
        config.update(m.config())
    if o.measurements:  # user-defined ones
        config["measurements"] = [m.name for m in o.measurements]
    return config


def describe_probe(probe: Any) -> str:
    """The probe's structure and shapes, for messages: ``a tensor of shape (6, 3)``,
    ``positional arguments [(6, 3)]``, ``keyword arguments {'x': (6, 3)}``."""

    def shape(v: Any) -> Any:
        return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__

    if isinstance(probe, torch.Tensor):
        return f"a tensor of shape {shape(probe)}"
    if isinstance(probe, dict):
        return f"keyword arguments {dict((k, shape(v)) for k, v in probe.items())}"
    if isinstance(probe, (tuple, list)):
        return f"positional arguments {[shape(v) for v in probe]}"
    return type(probe).__name__


def call_with_probe(model: nn.Module, probe: Any) -> None:
    """``model(probe)``, ``model(*probe)`` or ``model(**probe)``; if the model raises, a
    :class:`RecorderError` naming the probe and its shapes, the model's error chained."""
    try:
        if isinstance(probe, dict):
            model(**probe)
        elif isinstance(probe, (tuple, list)):
            model(*probe)
        else:
            model(probe)
    except Exception as exc:
        raise RecorderError(
            f"the probe batch failed in the model's forward ({type(exc).__name__}: {exc}); the "
            f"probe, {describe_probe(probe)}, is passed to the model at every recorded step "
            "like a training batch (a tensor: model(probe); a tuple: model(*probe); a dict: "
            "model(**probe)), so it must have the shapes a training batch has"
        ) from exc

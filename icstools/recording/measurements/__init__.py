"""The recorder's measurements: one module per quantity, each a :class:`Measurement`.

Every ``Recorder`` keyword maps onto a built-in measurement (its ``from_options``):

=====================  ==================================================  =====================
module                 what it records                                     enabled by
=====================  ==================================================  =====================
``activations``        per-unit statistics, quantiles, site histograms     always
``scalars``            ``loss``, ``lr``, logged scalars                    always
``probe_samples``      raw probe values per unit                           ``probe_sample=``
``site_gradients``     ``dL/dx`` per site and unit                         ``gradients=True``
``parameters``         ‖grad‖, ‖w‖, ‖Δw‖ per parameter                     ``gradients=True``
``amp``                iterations a ``GradScaler`` skipped                 ``scaler=``
``ics``                gradient-based ICS per layer                        ``ics=``
``landscape``          loss-landscape probes                               ``landscape=``
``jacobian``           Jacobian spectra of blocks                          ``jacobian=``
``erank``              effective rank of each site on the probe            ``measurements=[...]``
=====================  ==================================================  =====================

User-defined measurements subclass :class:`Measurement` and are passed as
``Recorder(..., measurements=[...])`` (see :mod:`~icstools.recording.measurements.base`).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from icstools.recording.errors import RecorderError
from icstools.recording.measurements.base import (
    Context,
    Declaration,
    Measurement,
    StepBatch,
)

__all__ = [
    "BUILTIN",
    "Context",
    "Declaration",
    "Measurement",
    "StepBatch",
    "build",
]

#: The built-in measurements, in the order the recorder calls them; one line registers one.
BUILTIN: tuple[type[Measurement], ...] = tuple(
    import_module(f"{__name__}.{module}").MEASUREMENT
    for module in (
        "activations",
        "scalars",
        "probe_samples",
        "site_gradients",
        "parameters",
        "amp",
        "ics",
        "landscape",
        "jacobian",
        "erank",
    )
)


def build(options: Any, extra: Any) -> list[Measurement]:
    """The measurements of a recorder: the built-ins its keywords ask for, then ``extra``."""
    if isinstance(extra, Measurement) or not isinstance(extra, (list, tuple)):
        raise TypeError(
            "measurements must be a list of Measurement instances (e.g. "
            f"[EffectiveRank(every=10)]), got {type(extra).__name__}"
        )
    out = [m for cls in BUILTIN if (m := cls.from_options(options)) is not None]
    names = {m.name for m in out}
    variables = {v.name for m in out for v in m.variables}
    for m in extra:
        if not isinstance(m, Measurement):
            raise TypeError(f"measurements must hold Measurement instances, got {m!r}")
        if m.name in names or not m.name:
            raise ValueError(
                f"measurement name {m.name!r} is empty or already used by this recorder "
                f"(in use: {sorted(names)})"
            )
        clash = variables.intersection(v.name for v in m.variables)
        if clash:
            raise ValueError(
                f"measurement {m.name!r} declares {sorted(clash)}, already written by another "
                "measurement of this recorder; choose other variable names"
            )
        variables.update(v.name for v in m.variables)
        if "probe" in m.requires and options.probe is None:
            raise RecorderError(f"the {m.name!r} measurement needs a probe batch (probe=...)")
        names.add(m.name)
        out.append(m)
    return out

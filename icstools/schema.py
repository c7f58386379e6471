"""The run dataset's schema: every variable and coordinate, its dimensions, dtype and origin.

A run (DESIGN.md §3) is one ``xarray.Dataset``. Each per-step variable is produced by exactly
one *measurement* of the recorder (:mod:`icstools.recording.measurements`) and is declared
once, as a :class:`Variable`, in that measurement's module, next to the code that computes it;
each static coordinate likewise as a :class:`Coordinate`. This module holds the declaration
types, the dimensions and coordinates that belong to no single measurement (``step``,
``source``, ``site``, ``unit``), and the lookups that the recorder, the store, the plots and the
report use: :func:`variables`, :func:`coordinates`, :func:`how_to_record`,
:func:`reserved_names`.

Examples
--------
>>> v = variable("ics_cos")
>>> v.dims, v.dtype, v.measurement
(('step', 'layer'), 'float64', 'ics')
>>> how_to_record("jac_sv")
'Recorder(jacobian=..., probe=...)'
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "SCHEMA_VERSION",
    "SOURCES",
    "STEP",
    "Coordinate",
    "Variable",
    "coordinate",
    "coordinates",
    "how_to_record",
    "reserved_names",
    "variable",
    "variables",
]

#: Version of the run-dataset layout, written in every run's attrs as ``schema_version``.
SCHEMA_VERSION = 1

#: The append dimension: one record per recorded optimizer step.
STEP = "step"

#: Where activations come from: the training batch itself, or the fixed probe batch.
SOURCES = ("train", "probe")


@dataclass(frozen=True)
class Variable:
    """One per-step variable of the run dataset.

    Parameters
    ----------
    name : str
        The variable's name in the dataset (the contract: never renamed).
    dims : tuple of str
        Its dimensions, ``"step"`` included (it is the append dimension).
    dtype : str
        numpy dtype name of the stored values.
    description : str
        What it is, with its unit or definition.
    how : str
        How to make the recorder record it (shown where it is missing from a run).
    fill : float or int, optional
        Value of a record in which the measurement did not run (NaN for floats, 0 for
        integers by default).
    measurement : str
        Name of the measurement that produces it (filled in by :func:`variables`).

    Examples
    --------
    >>> Variable("grad_norm", ("step", "site"), "float64", "‖dL/dx‖", "gradients=True").shape(
    ...     {"site": 3})
    (3,)
    """

    name: str
    dims: tuple[str, ...]
    dtype: str
    description: str
    how: str = ""
    fill: Any = None
    measurement: str = ""

    def __post_init__(self) -> None:
        if STEP not in self.dims:
            raise ValueError(f"variable {self.name!r} must have the 'step' dimension: {self.dims}")
        if self.fill is None:
            kind = np.dtype(self.dtype).kind
            object.__setattr__(self, "fill", np.nan if kind == "f" else 0)

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """Shape of one record (every dimension but ``step``), from the run's ``sizes``."""
        try:
            return tuple(sizes[d] for d in self.dims if d != STEP)
        except KeyError as exc:
            raise ValueError(
                f"variable {self.name!r} has dimension {exc.args[0]!r}, which no coordinate of "
                f"the run defines (defined: {sorted(sizes)})"
            ) from None

    def empty(self, sizes: dict[str, int]) -> np.ndarray:
        """One record filled with :attr:`fill`."""
        return np.full(self.shape(sizes), self.fill, dtype=self.dtype)


@dataclass(frozen=True)
class Coordinate:
    """A static coordinate of the run (written once, no ``step``)."""

    name: str
    dims: tuple[str, ...]
    description: str
    measurement: str = field(default="")


#: Coordinates that belong to no single measurement: the record's own axes.
CORE_COORDINATES = (
    Coordinate(STEP, (STEP,), "optimizer step of the record (int64)"),
    Coordinate("source", ("source",), "'train' (the training batch) or 'probe' (fixed batch)"),
    Coordinate("site", ("site",), "'<module>:input' / '<module>:output' ('#k': k-th call)"),
    Coordinate("unit", ("unit",), "units of all sites stacked"),
    Coordinate("unit_site", ("unit",), "the site of each unit"),
    Coordinate("unit_index", ("unit",), "index of each unit inside its site"),
)


def _measurement_classes() -> tuple[type, ...]:
    from icstools.recording.measurements import BUILTIN

    return BUILTIN


@functools.cache
def variables() -> dict[str, Variable]:
    """Every variable a built-in measurement can write, by name, in the order of declaration.

    Examples
    --------
    >>> variables()["mean"].dims
    ('source', 'step', 'unit')
    """
    out: dict[str, Variable] = {}
    for cls in _measurement_classes():
        for v in cls.variables:
            if v.name in out:
                raise RuntimeError(f"variable {v.name!r} is declared twice ({cls.name})")
            out[v.name] = Variable(**{**v.__dict__, "measurement": cls.name})
    return out


@functools.cache
def coordinates() -> dict[str, Coordinate]:
    """Every static coordinate, by name (the core's and the built-in measurements')."""
    out = {c.name: c for c in CORE_COORDINATES}
    for cls in _measurement_classes():
        for c in cls.coordinates:
            out[c.name] = Coordinate(c.name, c.dims, c.description, cls.name)
    return out


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    if name not in table:
        raise KeyError(f"{name!r} is not a {what} of the run schema; declared: {sorted(table)}")
    return table[name]


def variable(name: str) -> Variable:
    """The declaration of variable ``name`` (a ``KeyError`` lists the declared names)."""
    return _lookup(variables(), name, "variable")


def coordinate(name: str) -> Coordinate:
    """The declaration of coordinate ``name`` (a ``KeyError`` lists the declared names)."""
    return _lookup(coordinates(), name, "coordinate")


#: Scalars that are not measured but logged by convention (``rec.log(test_acc=...)``).
CONVENTIONAL_LOGS = {"test_acc": "rec.log(test_acc=...)"}


def how_to_record(name: str) -> str:
    """How to make the recorder record ``name`` ('' if it is not a known variable).

    Examples
    --------
    >>> how_to_record("test_acc"), how_to_record("grad_norm")
    ('rec.log(test_acc=...)', 'Recorder(gradients=True)')
    """
    if name in CONVENTIONAL_LOGS:
        return CONVENTIONAL_LOGS[name]
    v = variables().get(name)
    return v.how if v is not None else ""


@functools.cache
def reserved_names() -> frozenset[str]:
    """Names a logged scalar cannot take: every variable (but the logged ``loss``), coordinate
    and dimension of the schema."""
    names = set(variables()) | set(coordinates())
    for v in variables().values():
        names.update(v.dims)
    for c in coordinates().values():
        names.update(c.dims)
    return frozenset(names - {"loss"})

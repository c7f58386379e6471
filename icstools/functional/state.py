"""Mergeable states declared field by field: :class:`StateField`, :class:`StatisticsState`.

Each field of a state is declared once (:class:`StateField`: name, empty value, reduction; cf.
torchmetrics' ``add_state``), and merging two states over disjoint values goes through the
declarations (:func:`merge_fields`): sums, NaN-ignoring extremes, concatenated samples, and one
moment group (count, mean, ``M2 .. M4``) merged with Pébay's (2008) pairwise formulas. The
activation statistics (:mod:`icstools.functional.statistics`) and the gradient statistics
(:mod:`icstools.functional.gradient_statistics`) declare their states here.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = ["StateField", "StatisticsState", "merge_fields"]


#: Field-by-field reductions of two states over disjoint values (``"moments"``: see
#: :func:`_merge_moments`).
_REDUCTIONS: dict[str, Callable[[Any, Any], Any]] = {
    "sum": operator.add,
    "min": torch.fmin,  # fmin/fmax ignore the NaN of a unit without values on one side
    "max": torch.fmax,
    "cat": lambda a, b: torch.cat([a, b.to(a.dtype)]),
}


@dataclass(frozen=True)
class StateField:
    """The declaration of one field of a mergeable state (cf. torchmetrics' ``add_state``).

    Parameters
    ----------
    name : str
        Attribute name of the field.
    reduce : str
        How the field of two states over disjoint values combines (see :func:`merge_fields`):
        ``"sum"``, ``"min"``/``"max"`` (NaN-ignoring ``fmin``/``fmax``: NaN marks a unit
        without values), ``"cat"`` (concatenation along the first dimension) or
        ``"moments"``: the fields so declared form *one* group merged jointly, in declaration
        order the count, the mean and the central moment sums ``M2 .. Mp`` (Pébay 2008).
    shape : tuple
        Shape of the empty value: ints and the sizes ``"units"`` and ``"bins+2"``.
    dtype : torch.dtype, type or None
        ``None`` for the compute dtype of the values; ``int`` for a host-side Python int (one
        count for all units).
    fill : float
        Every element of the empty value (the field's value over no values).

    Notes
    -----
    The reductions map onto ``torch.distributed`` for a later multi-rank merge: ``"sum"`` is
    ``all_reduce(SUM)``; ``"min"``/``"max"`` are ``all_reduce(MIN/MAX)`` once the NaN of empty
    units is replaced by ``+inf``/``-inf`` (MIN/MAX do not ignore NaN); ``"cat"`` needs an
    ``all_gather`` of samples of unequal length (padded, or ``all_gather_object``); the moment
    group needs an ``all_gather`` of all its fields followed by the pairwise merge (a rank's
    count, mean and sums cannot be reduced field by field).
    """

    name: str
    reduce: str
    shape: tuple[int | str, ...] = ("units",)
    dtype: torch.dtype | type | None = None
    fill: float = 0

    def __post_init__(self) -> None:
        if self.reduce not in (*_REDUCTIONS, "moments"):
            raise ValueError(f"field {self.name!r}: unknown reduction {self.reduce!r}")

    def empty(
        self,
        units: int | None,
        *,
        bins: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor | int | None:
        """The field over no values; ``None`` for a per-unit field while ``units`` is unknown."""
        if self.dtype is int:
            return int(self.fill)
        if units is None:
            return None
        sizes = {"units": units, "bins+2": bins + 2}
        shape = tuple(sizes.get(d, d) for d in self.shape)
        return torch.full(shape, self.fill, dtype=self.dtype or dtype, device=device)


def merge_fields(fields: Sequence[StateField], a: Any, b: Any) -> dict[str, Any]:
    """Merge two states over disjoint values, declared field by field (exact).

    ``a`` and ``b`` hold the declared fields as attributes; returns ``{name: merged value}``
    for every declared field. The ``"moments"`` fields are merged as one group.
    """
    out: dict[str, Any] = {}
    group = []
    for f in fields:
        if f.reduce == "moments":
            group.append(f.name)
        else:
            out[f.name] = _REDUCTIONS[f.reduce](getattr(a, f.name), getattr(b, f.name))
    if group:
        merged = _merge_moments([getattr(a, k) for k in group], [getattr(b, k) for k in group])
        out.update(zip(group, merged, strict=True))
    return out


def _merge_moments(a: list[Any], b: list[Any]) -> list[Any]:
    """Pébay's (2008) pairwise merge of ``[count, mean, M2, .., Mp]`` (``p`` ≤ 4).

    Per-unit integer counts (tensors): a side without values (count 0, NaN moments)
    contributes nothing. One Python int count for all units (``p`` = 2): Chan et al.'s form,
    with the weights taken once in double precision; an empty ``a`` gives ``b``.
    """
    order = len(a) - 1
    if not 2 <= order <= 4 or len(b) != len(a):
        raise ValueError(f"a moment group is count, mean, M2 .. M4; got {len(a)} and {len(b)}")
    if isinstance(a[0], int):
        if order != 2:
            raise ValueError("a moment group with one count for all units has order 2")
        (na, mean_a, m2_a), (nb, mean_b, m2_b) = a, b
        if na == 0:
            return list(b)
        total = na + nb
        delta = mean_b - mean_a
        m2 = m2_a + m2_b + delta.square() * (na * nb / total)
        return [total, mean_a + delta * (nb / total), m2]
    na, nb = a[0].double(), b[0].double()
    n = na + nb
    safe_n = torch.where(n > 0, n, 1)
    delta = b[1] - a[1]
    merged = [
        a[1] + delta * nb / safe_n,
        a[2] + b[2] + delta**2 * na * nb / safe_n,
    ]
    if order >= 3:
        merged.append(
            a[3]
            + b[3]
            + delta**3 * na * nb * (na - nb) / safe_n**2
            + 3 * delta * (na * b[2] - nb * a[2]) / safe_n
        )
    if order >= 4:
        merged.append(
            a[4]
            + b[4]
            + delta**4 * na * nb * (na * na - na * nb + nb * nb) / safe_n**3
            + 6 * delta**2 * (na * na * b[2] + nb * nb * a[2]) / safe_n**2
            + 4 * delta * (na * b[3] - nb * a[3]) / safe_n
        )
    # A side without finite values (NaN moments) contributes nothing: take the other side.
    a_empty, b_empty = na == 0, nb == 0
    return [
        a[0] + b[0],
        *(
            torch.where(a_empty, tb, torch.where(b_empty, ta, t))
            for t, ta, tb in zip(merged, a[1:], b[1:], strict=True)
        ),
    ]


class StatisticsState:
    """Mergeable state of one site's units (tensors on the activations' device).

    Every field is declared once in :attr:`FIELDS`, with its reduction and its empty value;
    merging (:func:`~icstools.functional.statistics.merge_states`), folding, the host transfer
    and the final statistics (:func:`~icstools.functional.statistics.compute_many`) go through
    the declared fields by name:

    ==========  ==========  ===============  ============================================
    field       reduce      empty            meaning
    ==========  ==========  ===============  ============================================
    count       moments     0 int64          finite values per unit
    total       sum         0 int64          all values per unit
    mean        moments     NaN float64      mean of the finite values
    m2, m3, m4  moments     NaN float64      central moment sums
    min, max    min, max    NaN compute      extremes (compute dtype: float32 or float64)
    n_sat       sum         0 int64          saturated values per unit
    n_zero      sum         0 int64          exact zeros per unit
    hist        sum         0 int64          ``[bins + 2]``: underflow, bins, overflow
    sample      cat         ``[0, units]``   ``[m, units]`` raw values for the quantiles
    ==========  ==========  ===============  ============================================

    ``calls`` (tensors merged; added by a merge) and ``sample_sorted`` (each column of
    ``sample`` ascending; false after a merge) are bookkeeping, not statistics.
    """

    FIELDS: ClassVar[tuple[StateField, ...]] = (
        StateField("count", "moments", dtype=torch.int64),
        StateField("total", "sum", dtype=torch.int64),
        StateField("mean", "moments", dtype=torch.float64, fill=math.nan),
        StateField("m2", "moments", dtype=torch.float64, fill=math.nan),
        StateField("m3", "moments", dtype=torch.float64, fill=math.nan),
        StateField("m4", "moments", dtype=torch.float64, fill=math.nan),
        StateField("min", "min", fill=math.nan),
        StateField("max", "max", fill=math.nan),
        StateField("n_sat", "sum", dtype=torch.int64),
        StateField("n_zero", "sum", dtype=torch.int64),
        StateField("hist", "sum", ("bins+2",), torch.int64),
        StateField("sample", "cat", (0, "units"), fill=math.nan),
    )
    _NAMES: ClassVar[frozenset[str]] = frozenset(f.name for f in FIELDS)
    __slots__ = (*(f.name for f in FIELDS), "calls", "sample_sorted")

    def __init__(
        self, *, calls: int = 1, sample_sorted: bool = False, **fields: torch.Tensor
    ) -> None:
        if fields.keys() != self._NAMES:
            missing, unknown = self._NAMES - fields.keys(), fields.keys() - self._NAMES
            raise TypeError(
                f"StatisticsState takes exactly the declared fields: missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}"
            )
        for name, value in fields.items():
            setattr(self, name, value)
        self.calls = calls
        self.sample_sorted = sample_sorted

    @classmethod
    def empty(
        cls, units: int, *, bins: int, dtype: torch.dtype, device: torch.device | str | None
    ) -> StatisticsState:
        """The state of one call without values (``calls`` 1)."""
        return cls(
            **{f.name: f.empty(units, bins=bins, dtype=dtype, device=device) for f in cls.FIELDS}
        )

    def fields(self) -> dict[str, torch.Tensor]:
        """The declared fields, by name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in self.FIELDS}

    def replace(self, **changes: Any) -> StatisticsState:
        """A shallow copy with some fields or bookkeeping changed (as ``dataclasses.replace``)."""
        kwargs = {**self.fields(), "calls": self.calls, "sample_sorted": self.sample_sorted}
        return type(self)(**{**kwargs, **changes})

    def __repr__(self) -> str:
        parts = [f"{k}={tuple(v.shape)} {v.dtype}" for k, v in self.fields().items()]
        return f"StatisticsState({', '.join(parts)}, calls={self.calls})"

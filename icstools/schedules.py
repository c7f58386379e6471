"""Schedules: which optimizer steps a quantity is measured at.

A schedule is any callable ``step -> bool`` over optimizer steps (0 is the first training
batch, before any update). Every quantity of the recorder takes one, so that no
``if step % n`` is scattered around.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable

__all__ = ["Schedule", "as_schedule", "at_steps", "every", "log_spaced"]

Schedule = Callable[[int], bool]


class every:
    """Every ``n`` steps, from ``start`` on (``step >= start and (step - start) % n == 0``).

    Examples
    --------
    >>> [s for s in range(25) if every(10)(s)]
    [0, 10, 20]
    """

    def __init__(self, n: int, start: int = 0) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"every needs a whole number of steps ≥ 1, got {n!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a whole number ≥ 0, got {start!r}")
        self.n, self.start = n, start

    def __call__(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.n == 0

    def __repr__(self) -> str:
        return f"every({self.n}, start={self.start})"


class at_steps:
    """Exactly the given steps.

    Examples
    --------
    >>> at_steps([0, 5])(5), at_steps([0, 5])(6)
    (True, False)
    """

    def __init__(self, steps: Iterable[int]) -> None:
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise TypeError(f"at_steps needs an iterable of whole step numbers, got {steps!r}")
        values = list(steps)
        bad = [s for s in values if isinstance(s, bool) or not isinstance(s, numbers.Integral)]
        if bad:
            raise TypeError(f"steps must be whole numbers, got {bad[:5]!r}")
        self.steps = frozenset(int(s) for s in values)
        if any(s < 0 for s in self.steps):
            raise ValueError(f"steps must be ≥ 0, got {sorted(self.steps)[:5]}")

    def __call__(self, step: int) -> bool:
        return step in self.steps

    def __repr__(self) -> str:
        return f"at_steps({sorted(self.steps)})"


def log_spaced(last: int, per_decade: int = 10) -> at_steps:
    """About ``per_decade`` steps per factor of 10 up to ``last``, plus step 0: dense early,
    where distributions move fastest.

    Examples
    --------
    >>> sorted(log_spaced(100, per_decade=2).steps)
    [0, 1, 3, 10, 32, 100]
    """
    if last < 0 or per_decade < 1:
        raise ValueError(f"need last ≥ 0 and per_decade ≥ 1, got {last}, {per_decade}")
    n = int(math.log10(last) * per_decade) + 1 if last >= 1 else 0
    steps = {0} | {round(10 ** (i / per_decade)) for i in range(n)} | ({last} if last else set())
    return at_steps(s for s in steps if s <= last)


def as_schedule(spec: int | Schedule, name: str = "every") -> Schedule:
    """Turn an ``int`` (every N steps) or a ``step -> bool`` callable into a schedule.

    Examples
    --------
    >>> as_schedule(50)(100)
    True
    """
    if isinstance(spec, bool):
        raise TypeError(
            f"{name} must be an int (every N steps) or a callable step -> bool, got {spec!r}"
        )
    if isinstance(spec, int):
        return every(spec)
    if callable(spec):
        return spec
    raise TypeError(
        f"{name} must be an int (every N steps) or a callable step -> bool, "
        f"got {type(spec).__name__}: {spec!r}"
    )

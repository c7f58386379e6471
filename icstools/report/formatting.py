"""Numbers for the report: as JSON values (:func:`num`) and as text (:func:`fmt`)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["fmt", "num"]


def num(x: Any) -> float | None:
    """A JSON number: finite float, else None."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt(x: Any, digits: int = 4) -> str:
    """``x`` with ``digits`` significant digits; "n/a" for None/NaN, "∞"/"−∞" for ±inf."""
    if x is None:
        return "n/a"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.{digits}g}"

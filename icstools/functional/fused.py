"""All per-unit statistics of a site in one fused reduction, compiled where a compiler works.

:func:`fused_state` computes every field of :class:`~icstools.functional.statistics.
StatisticsState` but the quantile sample (counts, corrected two-pass moments on range-scaled
deviations, extremes, saturated and zero counts, and the fixed-edge histogram) from a tensor
``[pre, units, post]`` with no data-dependent Python branch and no host read, so that
``torch.compile`` (inductor: C++/OpenMP on CPU, Triton on GPU) turns it into a couple of passes
over memory instead of the ~15 of the eager path. The same function runs eagerly where no
compiler works (``mode="eager"``), with the same results within float tolerance (the compiled
sums are reordered). The first call of each input shape compiles; its cost is kept in
:data:`COMPILE_SECONDS` (paid once per process and shape).

Examples
--------
>>> x = torch.randn(8, 3, 5)
>>> out = fused_state(x, (-4.0, 4.0, 8), 3.0, mode="eager")
>>> out["count"].tolist(), int(out["hist"].sum())
([40, 40, 40], 120)
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch

__all__ = ["COMPILE_SECONDS", "MODES", "fused_state", "scaled_moments"]

#: ``fused=`` modes: ``"compile"`` (torch.compile, eager if it fails), ``"eager"``.
MODES = ("compile", "eager")

#: Seconds spent by the first (compiling) call of each input signature, in this process.
COMPILE_SECONDS: dict[str, float] = {}

_compiled: Any = None
_failed: str | None = None  # why compiling failed (then the eager function runs)
_seen: set[tuple] = set()


def unit_scale(mn: torch.Tensor, mx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each unit's range ``max − min`` in float64, the scale of :func:`scaled_moments`'s
    deviations: 1 where the range is 0 or not finite, and never so small that ``1 / scale``
    overflows ``dtype``."""
    scale = mx.double() - mn.double()  # [units]
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, 1.0)
    return scale.clamp(min=float(torch.finfo(dtype).tiny))


def scaled_moments(
    z: torch.Tensor, dims: tuple[int, ...], count: torch.Tensor, mean: torch.Tensor, scale: Any
) -> dict[str, torch.Tensor]:
    """Mean and central moment sums ``m2``–``m4`` per unit (float64) from the deviations
    ``z = (x − mean) / scale`` (0 where ``x`` is not finite), reduced over ``dims``.

    Scaling by the unit's range keeps the 3rd and 4th powers from overflowing or underflowing
    in float32 at any scale; the sums are corrected for the rounding error of ``mean``
    (corrected two-pass algorithm) and rescaled in float64. The one place of this maths, for
    :func:`fused_state` and :func:`icstools.functional.statistics.summarize`.

    Examples
    --------
    >>> x = torch.tensor([[1.0], [2.0], [4.0]])  # [values, units]
    >>> m = scaled_moments((x - x.mean(0)) / 3.0, (0,), torch.tensor([3]), x.mean(0), 3.0)
    >>> round(float(m["m2"][0] / 3), 6)  # the variance (ddof=0)
    1.555556
    """
    z2 = z * z  # same shape as z
    s1, s2 = z.sum(dims).double(), z2.sum(dims).double()  # [units]
    s3, s4 = (z2 * z).sum(dims).double(), (z2 * z2).sum(dims).double()
    n = count.double()
    c = torch.where(n > 0, s1 / n.clamp(min=1), 0)  # mean error, in units of scale
    return {
        "mean": mean.double() + c * scale,
        "m2": (s2 - n * c**2) * scale**2,
        "m3": (s3 - 3 * c * s2 + 2 * n * c**3) * scale**3,
        "m4": (s4 - 4 * c * s3 + 6 * c**2 * s2 - 3 * n * c**4) * scale**4,
    }


def _state(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, thr: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The fused reduction of ``x`` ``[pre, units, post]`` (float32 or float64)."""
    dims = (0, 2)
    finite = torch.isfinite(x)
    count = finite.sum(dims)  # [units] int64
    total = torch.full_like(count, x.shape[0] * x.shape[2])
    xf = torch.where(finite, x, 0)
    mean = xf.sum(dims) / count  # NaN where no finite value
    mn = torch.where(finite, x, math.inf).amin(dims)
    mx = torch.where(finite, x, -math.inf).amax(dims)
    n_zero = (x == 0).sum(dims)
    n_sat = (finite & (x.abs() > thr)).sum(dims)
    scale = unit_scale(mn, mx, x.dtype)  # moments of deviations scaled by the unit's range
    inv = (1 / scale).to(x.dtype)[None, :, None]
    z = torch.where(finite, (x - mean[None, :, None]) * inv, 0)
    # the histogram's outer bins (its inner bins: torch.histc, outside, see fused_state)
    under = (finite & (x < lo)).sum().view(1)
    over = (finite & (x > hi)).sum().view(1)
    return {
        "count": count,
        "total": total,
        **scaled_moments(z, dims, count, mean, scale),
        "min": mn,
        "max": mx,
        "n_sat": n_sat,
        "n_zero": n_zero,
        "under": under,
        "over": over,
    }


def fused_state(
    x: torch.Tensor,
    edges: tuple[float, float, int],
    thr: float | None,
    mode: str = "compile",
) -> dict[str, torch.Tensor]:
    """Every non-sample field of a site's state, in one fused reduction.

    Parameters
    ----------
    x : torch.Tensor
        ``[pre, units, post]``: the units on dimension 1, every other position pooled.
    edges : (float, float, int)
        The histogram's outer edges and its number of bins (``torch.histc``'s arithmetic:
        the same bins as the eager path).
    thr : float or None
        ``|x| > thr`` counts as saturated (``None``: none).
    mode : {"compile", "eager"}
        ``"compile"``: ``torch.compile``'d (the eager function if compiling fails).

    Returns
    -------
    dict
        ``count, total, mean, m2, m3, m4, min, max, n_sat, n_zero`` ``[units]`` and ``hist``
        ``[bins + 2]``, on ``x``'s device.
    """
    if mode not in MODES:
        raise ValueError(f"fused must be one of {MODES}, got {mode!r}")
    lo, hi, bins = edges
    # tensors (not constants): sites with other edges or thresholds share the compiled code
    args = [torch.tensor(v, dtype=x.dtype).to(x.device, non_blocking=True) for v in (lo, hi)]
    args.append(torch.tensor(math.inf if thr is None else thr, dtype=x.dtype).to(x.device))
    out = _run(x, *args) if mode == "compile" else _state(x, *args)
    inner = torch.histc(x, bins=bins, min=lo, max=hi)  # NaN and ±inf in no bin
    out["hist"] = torch.cat([out.pop("under"), inner.to(torch.int64), out.pop("over")])
    return out


def _run(x: torch.Tensor, *args: torch.Tensor) -> dict[str, torch.Tensor]:
    """The compiled reduction (compiled at the first call of each shape; eager if compiling
    fails, from then on)."""
    global _compiled, _failed
    if _failed is not None:
        return _state(x, *args)
    if _compiled is None:
        _compiled = torch.compile(_state, dynamic=False)
    key = (tuple(x.shape), x.dtype, x.device.type)
    start = time.perf_counter() if key not in _seen else None
    try:
        with warnings.catch_warnings():  # inductor's own deprecation warnings
            warnings.simplefilter("ignore", DeprecationWarning)
            out = _compiled(x, *args)
    except Exception as err:  # no working compiler here: the eager function, from now on
        _failed = f"{type(err).__name__}: {err}"[:500]
        return _state(x, *args)
    if start is not None:
        _seen.add(key)
        name = f"{tuple(x.shape)} {x.dtype} {x.device.type}"
        COMPILE_SECONDS[name] = round(time.perf_counter() - start, 3)
    return out


def compile_failure() -> str | None:
    """Why compiling the fused reduction failed in this process (``None``: it did not)."""
    return _failed

"""Compiled two-pass reductions of activations on the CPU (numba), with the numpy/torch paths as
their fallback and reference.

The eager statistics of a site (:func:`icstools.functional.statistics.summarize`) run ~15 torch
reductions, each a pass over the activations; the exact-mode fold (:mod:`icstools.functional.
exact`) runs a few dozen small numpy operations per chunk. Here each is one compiled function
that reads every value twice (the extremes, counts and histogram with the sum, then the central
moments about the mean: the corrected two-pass algorithm, in float64), in a
fixed order (a large site is split by units over threads, each unit reduced by one), so its
results do not depend on the number of threads.

Only CPU float32 values take these paths (float64 data could overflow a 4th power in float64,
and other devices keep their own reductions). The kernels need numba; without it, or with the
environment variable ``ICSTOOLS_KERNELS=0``, :data:`ENABLED` is false and the callers run the
eager paths, which give the same statistics within float tolerance (the sums are ordered
differently) and the same counts and histograms exactly. The first call of each kernel compiles
it (or loads it from numba's on-disk cache); :data:`COMPILE_SECONDS` keeps what that cost.

Examples
--------
>>> import numpy as np
>>> x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)  # [pre, units, post]
>>> out = site_moments(x, (0.0, 12.0, 4), None)
>>> out["count"].tolist(), out["mean"].tolist(), int(out["hist"].sum())
([4, 4, 4], [3.5, 5.5, 7.5], 12)
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

__all__ = [
    "COMPILE_SECONDS",
    "ENABLED",
    "RADIX_MIN",
    "ROWS_MIN",
    "block_fields",
    "rows_moments",
    "site_moments",
    "sort_rows",
    "tensor_moments",
    "unavailable_reason",
    "unit_mean_m2",
    "usable",
]

# numba is imported at the first kernel call, not with icstools: importing it costs ~90 MiB
# and loading the compiled code ~150 MiB more, which a process that computes no statistics
# (the store's writer process, a DataLoader worker) should not pay
_REASON: str | None = (
    None if importlib.util.find_spec("numba") is not None else "numba is not installed"
)
if _REASON is None and os.environ.get("ICSTOOLS_KERNELS", "1") == "0":
    _REASON = "ICSTOOLS_KERNELS=0 in the environment"

#: Whether the compiled kernels run (numba importable and not switched off). Tests set it to
#: ``False`` to run the eager paths.
ENABLED: bool = _REASON is None

#: Seconds spent by the first call of each kernel in this process (compiling, or loading numba's
#: cache).
COMPILE_SECONDS: dict[str, float] = {}


def unavailable_reason() -> str | None:
    """Why the kernels do not run in this process (``None``: they do, unless
    :data:`ENABLED` was set to ``False``)."""
    return _REASON


_LOADED = False


def usable() -> bool:
    """Whether the kernels run here: :data:`ENABLED`, and numba imports (tried at the first
    call; if it fails, e.g. a numba too old for this numpy, the kernels are switched off with
    a :class:`RuntimeWarning` that says why, and the eager paths run)."""
    global ENABLED, _LOADED, _REASON
    if ENABLED and not _LOADED:
        try:
            import numba  # noqa: F401
        except Exception as err:  # ImportError, or numba's own check of numpy's version
            ENABLED, _REASON = False, f"numba failed to import ({type(err).__name__}: {err})"
            warnings.warn(
                f"icstools: {_REASON}; the statistics run without the compiled kernels",
                RuntimeWarning,
                stacklevel=2,
            )
        _LOADED = True
    return ENABLED


class _Kernel:
    """A function compiled by numba at its first call (``cache=True``: the machine code is
    kept beside this module, in ``__pycache__``, so a new process loads it in ~0.1 s instead
    of compiling it for ~1-2 s; ``nogil``: threads may run it at once; ``error_model="numpy"``:
    a division by zero gives inf or NaN instead of raising, so that no division carries a
    check and a branch: with the check, the histogram's float32 division kept the block
    fold's branchless row loops from vectorizing (``bench/kernels.py``: 0.78 against 0.58 ms
    for 264k values of the paper MLP's records; the site kernel, whose loops branch, 27.6
    against 28.1 ms: no gain). No kernel divides by a value that may be zero: histogram
    widths are positive, counts are checked first)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self._compiled: Any = None

    def __call__(self, *args: Any) -> Any:
        if self._compiled is None:
            import numba

            self._compiled = numba.njit(cache=True, nogil=True, error_model="numpy")(self.fn)
        return self._compiled(*args)


def _jit(fn: Any) -> _Kernel:
    return _Kernel(fn)


@_jit
def _site_kernel(
    x, lo, hi, bins, thr, count, s, mn, mx, n_sat, n_zero, hist, m
):  # pragma: no cover
    # x: [pre, units, post] float32; per-unit outputs [units]; hist [bins + 2]; m [4, units]
    pre, units, post = x.shape
    fb = np.float32(bins)
    width = hi - lo
    for u in range(units):  # pass 1: finite count, sum, extremes, counts, histogram
        c = 0
        acc = 0.0
        lo_u = np.float32(np.inf)
        hi_u = np.float32(-np.inf)
        zeros = 0
        sat = 0
        for p in range(pre):
            for q in range(post):
                v = x[p, u, q]
                if v == 0:
                    zeros += 1
                if not np.isfinite(v):
                    continue
                c += 1
                acc += v
                lo_u = min(lo_u, v)
                hi_u = max(hi_u, v)
                if abs(v) > thr:
                    sat += 1
                if v < lo:
                    hist[0] += 1
                elif v > hi:
                    hist[bins + 1] += 1
                else:  # torch.histc's arithmetic, in float32: the same bin to the bit
                    k = int((v - lo) * fb / width)
                    hist[min(max(k, 0), bins - 1) + 1] += 1
        count[u] = c
        s[u] = acc
        mn[u] = lo_u
        mx[u] = hi_u
        n_sat[u] = sat
        n_zero[u] = zeros
    for u in range(units):  # pass 2: central moment sums about the float64 mean
        if count[u] == 0:
            continue
        mean = s[u] / count[u]
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        s4 = 0.0
        for p in range(pre):
            for q in range(post):
                v = x[p, u, q]
                if np.isfinite(v):
                    d = np.float64(v) - mean
                    d2 = d * d
                    s1 += d
                    s2 += d2
                    s3 += d2 * d
                    s4 += d2 * d2
        m[0, u] = s1
        m[1, u] = s2
        m[2, u] = s3
        m[3, u] = s4


@_jit
def _rows_kernel(
    x, lo, hi, bins, thr, count, s, mn, mx, n_sat, n_zero, hist, m
):  # pragma: no cover
    # x: [positions, units] float32, the units innermost (channels-last data); per-unit
    # outputs [units], hist [bins + 2] (added to). Each unit's
    # values are visited in the order _site_kernel visits them in the [pre, units, post] view
    # of the same tensor: the same sums, extremes, counts and bins to the bit. The loops over
    # a row's units have no branches, so that the compiler vectorizes them: the per-unit
    # accumulators are local arrays, a non-finite value adds +0.0 (which changes no sum), and
    # the bins are computed first (torch.histc's float32 arithmetic, clamped in float32, which
    # truncates to the same bin), then counted in 4 interleaved histograms.
    rows, nu = x.shape
    fb = np.float32(bins)
    top = np.float32(bins - 1)
    width = hi - lo
    inf = np.float32(np.inf)
    cnt = np.zeros(nu, np.int64)
    acc = np.zeros(nu, np.float64)
    lo_a = np.full(nu, inf, np.float32)
    hi_a = np.full(nu, -inf, np.float32)
    zeros = np.zeros(nu, np.int64)
    sat = np.zeros(nu, np.int64)
    idx = np.empty(nu, np.int32)
    h = np.zeros((4, bins + 3), np.int64)  # the last bin: non-finite values, dropped
    for r in range(rows):  # pass 1: finite count, sum, extremes, counts, histogram
        row = x[r]
        for j in range(nu):
            v = row[j]
            fin = abs(v) < inf
            zeros[j] += v == 0
            cnt[j] += fin
            acc[j] += v if fin else np.float32(0.0)
            lo_a[j] = min(lo_a[j], v) if fin else lo_a[j]
            hi_a[j] = max(hi_a[j], v) if fin else hi_a[j]
            sat[j] += fin and abs(v) > thr
            t = min(max((v - lo) * fb / width, np.float32(0.0)), top)
            b = np.int32(t) + np.int32(1)
            b = np.int32(0) if v < lo else b
            b = np.int32(bins + 1) if v > hi else b
            idx[j] = b if fin else np.int32(bins + 2)
        for j in range(nu):
            h[j & 3, idx[j]] += 1
    for lane in range(4):
        for b in range(bins + 2):
            hist[b] += h[lane, b]
    mean = np.zeros(nu, np.float64)
    for j in range(nu):
        if cnt[j] > 0:
            mean[j] = acc[j] / cnt[j]
    m0 = np.zeros(nu)
    m1 = np.zeros(nu)
    m2 = np.zeros(nu)
    m3 = np.zeros(nu)
    for r in range(rows):  # pass 2: central moment sums about the float64 mean
        row = x[r]
        for j in range(nu):
            v = row[j]
            d = np.float64(v) - mean[j] if abs(v) < inf else 0.0
            d2 = d * d
            m0[j] += d
            m1[j] += d2
            m2[j] += d2 * d
            m3[j] += d2 * d2
    count[:], s[:], mn[:], mx[:] = cnt, acc, lo_a, hi_a
    n_sat[:], n_zero[:] = sat, zeros
    m[0], m[1], m[2], m[3] = m0, m1, m2, m3


@_jit
def _radix_rows(a, out):  # pragma: no cover
    # a, out: [rows, n] float32, C-contiguous; each row of a sorted into out by an LSD radix
    # sort of the float bits (4 passes of 8 bits) mapped to unsigned keys in the float order:
    # negatives get all bits flipped, the rest the sign bit set; NaN becomes the largest key
    # (last, as numpy sorts it) and comes back as a NaN
    rows, n = a.shape
    keys = np.empty(n, np.uint32)
    tmp = np.empty(n, np.uint32)
    count = np.empty(257, np.int64)
    sign = np.uint32(0x80000000)
    ones = np.uint32(0xFFFFFFFF)
    for r in range(rows):
        bits = a[r].view(np.uint32)
        for i in range(n):
            u = bits[i]
            if (u & ~sign) > np.uint32(0x7F800000):  # NaN
                keys[i] = ones
            else:
                keys[i] = u ^ ones if u & sign else u | sign
        src, dst = keys, tmp
        for shift in range(0, 32, 8):
            count[:] = 0
            for i in range(n):
                count[((src[i] >> np.uint32(shift)) & np.uint32(0xFF)) + 1] += 1
            for b in range(256):
                count[b + 1] += count[b]
            for i in range(n):
                d = (src[i] >> np.uint32(shift)) & np.uint32(0xFF)
                dst[count[d]] = src[i]
                count[d] += 1
            src, dst = dst, src
        o = out[r].view(np.uint32)
        for i in range(n):
            u = src[i]
            o[i] = u ^ sign if u & sign else u ^ ones


@_jit
def _block_kernel(a, lo, hi, bins, start, thr, s, n_sat, n_zero, hist, m):  # pragma: no cover
    # a: [positions, units] float32, finite; per-column settings lo, hi, bins, start (the
    # column's first histogram bin in hist), thr: [units]; s, n_sat, n_zero [units]. Each
    # row's loops over the columns have no branches (they vectorize): the sums and counts,
    # then each column's bin (torch.histc's float32 arithmetic, clamped in float32, which
    # truncates to the same bin), then the bins counted
    rows, units = a.shape
    idx = np.empty(units, np.int64)
    fb = np.empty(units, np.float32)
    top = np.empty(units, np.float32)
    width = np.empty(units, np.float32)
    for u in range(units):
        fb[u] = np.float32(bins[u])
        top[u] = np.float32(bins[u] - 1)
        width[u] = hi[u] - lo[u]
    for r in range(rows):  # pass 1, row by row: each row's columns are contiguous
        row = a[r]
        for u in range(units):
            v = row[u]
            s[u] += v
            n_zero[u] += v == 0
            n_sat[u] += abs(v) > thr[u]
        for u in range(units):
            v = row[u]
            t = min(max((v - lo[u]) * fb[u] / width[u], np.float32(0.0)), top[u])
            k = np.int32(t) + np.int32(1)
            k = np.int32(0) if v < lo[u] else k
            k = np.int32(bins[u] + 1) if v > hi[u] else k
            idx[u] = start[u] + k
        for u in range(units):
            hist[idx[u]] += 1
    for u in range(units):
        s[u] /= rows  # now the mean
    for r in range(rows):  # pass 2: central moment sums about the float64 mean
        row = a[r]
        for u in range(units):
            d = np.float64(row[u]) - s[u]
            d2 = d * d
            m[0, u] += d
            m[1, u] += d2
            m[2, u] += d2 * d
            m[3, u] += d2 * d2


@_jit
def _mean_m2_kernel(x, mean, m2):  # pragma: no cover
    # x: [pre, units, post] float32 -> per unit mean and Σ(x - mean)² in float64, two passes;
    # non-finite values propagate (a diverged gradient's statistics are NaN/inf)
    pre, units, post = x.shape
    n = pre * post
    for u in range(units):
        acc = 0.0
        for p in range(pre):
            for q in range(post):
                acc += x[p, u, q]
        mu = acc / n
        s1 = 0.0
        s2 = 0.0
        for p in range(pre):
            for q in range(post):
                d = np.float64(x[p, u, q]) - mu
                s1 += d
                s2 += d * d
        c = s1 / n  # the rounding error of mu (corrected two-pass)
        mean[u] = mu + c
        m2[u] = s2 - n * c * c


#: Positions from which a site whose units are innermost in memory is reduced by
#: :func:`rows_moments` (row by row, vectorized over the units) rather than by
#: :func:`site_moments` (unit by unit, strided): ``bench/channels_last.py`` measured rows
#: 0.34 against 0.62 ms for ``[128, 1000]``, 7.3 against 11.2 ms for ``[4096, 768]`` and
#: 0.023 against 0.052 ms for ``[60, 100]``, but 84 against 24 ms (split over 2 threads) for
#: ``[2, 10⁶]``, where its per-unit arrays outweigh two rows.
ROWS_MIN = 32

#: Values of a site from which :func:`site_moments` splits its units over threads.
SPLIT_VALUES = 1 << 20

_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (the process that made it, the pool)


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _parts(size: int, units: int) -> list[tuple[int, int]]:
    """Bounds of the unit ranges a site of ``size`` values is reduced in (one per thread)."""
    n = min(_threads(), units) if size >= SPLIT_VALUES else 1
    if n <= 1:  # most sites (np.linspace costs ~8 µs a call, per site and step)
        return [(0, units)]
    edges = np.linspace(0, units, n + 1).round().astype(int).tolist()
    return list(itertools.pairwise(edges))


def _pool() -> ThreadPoolExecutor:
    """The threads of the split kernels (made again in a forked child, where the parent's
    threads do not exist)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(_threads(), thread_name_prefix="icstools"))
    return _POOL[1]


def _split(part: Any, n: int) -> None:
    """``part(i)`` for ``i < n``: the first in this thread, the others in the pool at once."""
    rest = [_pool().submit(part, i) for i in range(1, n)]
    part(0)
    for future in rest:
        future.result()


def _timed(name: str, fn: Any, *args: Any) -> None:
    if name in COMPILE_SECONDS:
        fn(*args)
        return
    t0 = time.perf_counter()
    fn(*args)
    COMPILE_SECONDS[name] = round(time.perf_counter() - t0, 3)


@_jit
def _correct(n, mean, m):  # pragma: no cover
    # m [4, units]: sums of d = x - mean, d², d³, d⁴ -> mean + c and the central sums about
    # it (corrected two-pass: c = Σd / n is mean's rounding error); in place
    for u in range(mean.shape[0]):
        if n[u] == 0:
            continue
        c = m[0, u] / n[u]
        c2 = c * c
        s2, s3, s4 = m[1, u], m[2, u], m[3, u]
        mean[u] += c
        m[1, u] = s2 - n[u] * c2
        m[2, u] = s3 - 3 * c * s2 + 2 * n[u] * c2 * c
        m[3, u] = s4 - 4 * c * s3 + 6 * c2 * s2 - 3 * n[u] * c2 * c2


def _corrected(n: np.ndarray, mean: np.ndarray, m: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and central sums ``m2``-``m4`` from sums ``m`` (``[4, units]``) of the deviations
    about ``mean``, corrected for the rounding error of ``mean``."""
    _correct(n, mean, m)
    return {"mean": mean, "m2": m[1], "m3": m[2], "m4": m[3]}


def site_moments(
    x: np.ndarray, edges: tuple[float, float, int], thr: float | None
) -> dict[str, np.ndarray]:
    """Every non-sample field of a site's state from float32 values ``x`` (``[pre, units,
    post]``; copied if not C-contiguous), in two compiled passes.

    Parameters
    ----------
    x : numpy.ndarray
        float32 ``[pre, units, post]``: the units on dimension 1, every other position pooled;
        non-finite values count in ``total`` only (and ``n_zero`` never).
    edges : (float, float, int)
        The histogram's outer edges and its number of bins: ``torch.histc``'s bins, plus an
        underflow and an overflow bin.
    thr : float or None
        ``|x| > thr`` counts as saturated (``None``: none).

    Returns
    -------
    dict
        ``count, total, n_sat, n_zero`` (int64), ``mean, m2, m3, m4`` (float64), ``min, max``
        (float32) ``[units]`` and ``hist`` ``[bins + 2]``: the fields of
        :class:`~icstools.functional.state.StatisticsState` but the sample. A unit without a
        finite value has count 0, mean NaN, zero central sums, min ``+inf`` and max ``-inf``,
        as the eager reduction gives them.

    Examples
    --------
    >>> x = np.array([[[1.0], [2.0]], [[3.0], [np.nan]]], dtype=np.float32)  # [2, 2, 1]
    >>> out = site_moments(x, (0.0, 4.0, 4), 2.5)
    >>> out["count"].tolist(), out["mean"].tolist(), out["n_sat"].tolist(), out["hist"].tolist()
    ([2, 1], [2.0, 2.0], [1, 0], [0, 0, 1, 1, 1, 0])
    """
    if x.dtype != np.float32 or x.ndim != 3:
        raise ValueError(
            f"site_moments takes float32 [pre, units, post], got {x.dtype} with shape {x.shape}"
        )
    x = np.ascontiguousarray(x)  # [pre, units, post], as the kernel reads it
    lo, hi, bins = edges
    units = x.shape[1]
    count, s, mn, mx, n_sat, n_zero, m = _site_outputs(units)
    t = np.float32(math.inf if thr is None else thr)
    # a large site is split by units over threads (the kernel releases the GIL, and torch's
    # own threads wait while a hook runs); each part has its own histogram, summed after
    bounds = _parts(x.size, units)
    hists = np.zeros((len(bounds), int(bins) + 2), np.int64)
    settings = (np.float32(lo), np.float32(hi), int(bins), t)

    def part(i: int) -> None:
        a, b = bounds[i]
        outs = (count[a:b], s[a:b], mn[a:b], mx[a:b], n_sat[a:b], n_zero[a:b], hists[i])
        _site_kernel(x[:, a:b], *settings, *outs, m[:, a:b])

    _timed("site", _split, part, len(bounds))
    return _site_fields(count, s, m, mn, mx, n_sat, n_zero, hists.sum(0), x.shape[0] * x.shape[2])


def _site_outputs(units: int) -> tuple[np.ndarray, ...]:
    """The per-unit output arrays of a site kernel: ``count, s, mn, mx, n_sat, n_zero``
    (``[units]``) and ``m`` (``[4, units]``), the sums zeroed."""
    return (
        np.zeros(units, np.int64),
        np.zeros(units, np.float64),
        np.empty(units, np.float32),
        np.empty(units, np.float32),
        np.zeros(units, np.int64),
        np.zeros(units, np.int64),
        np.zeros((4, units), np.float64),
    )


def _site_fields(
    count: np.ndarray,
    s: np.ndarray,
    m: np.ndarray,
    mn: np.ndarray,
    mx: np.ndarray,
    n_sat: np.ndarray,
    n_zero: np.ndarray,
    hist: np.ndarray,
    total: int,
) -> dict[str, np.ndarray]:
    """The state's fields from a site kernel's outputs (``s``: the sums, ``m``: the central
    sums about ``s / count``)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, s / np.maximum(count, 1), np.nan)
    return {
        "count": count,
        "total": np.full(count.shape[0], total, np.int64),
        **_corrected(count, mean, m),
        "min": mn,
        "max": mx,
        "n_sat": n_sat,
        "n_zero": n_zero,
        "hist": hist,
    }


def rows_moments(
    x: np.ndarray, edges: tuple[float, float, int], thr: float | None
) -> dict[str, np.ndarray]:
    """:func:`site_moments` of values whose units are innermost in memory: ``x`` is float32
    ``[positions, units]``, C-contiguous (a channels-last activation ``[N, H, W, C]`` viewed
    as ``[N·H·W, C]``, as a compiled convolution network keeps it): read in memory order,
    where :func:`site_moments` would need a transposed copy. Each unit's values are summed in
    the same order as :func:`site_moments` sums them in the ``[N, C, H·W]`` view of the same
    tensor, so the results are the same to the bit.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, np.nan]], dtype=np.float32)  # [positions, units]
    >>> out = rows_moments(x, (0.0, 4.0, 4), 2.5)
    >>> out["count"].tolist(), out["mean"].tolist(), out["n_sat"].tolist(), out["hist"].tolist()
    ([2, 1], [2.0, 2.0], [1, 0], [0, 0, 1, 1, 1, 0])
    """
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError(
            f"rows_moments takes C-contiguous float32 [positions, units], got {x.dtype} with "
            f"shape {x.shape} (C-contiguous: {x.flags.c_contiguous})"
        )
    lo, hi, bins = edges
    units = x.shape[1]
    count, s, mn, mx, n_sat, n_zero, m = _site_outputs(units)
    t = np.float32(math.inf if thr is None else thr)
    hist = np.zeros(int(bins) + 2, np.int64)
    settings = (np.float32(lo), np.float32(hi), int(bins), t)
    # one thread (splitting the units over the pool, as site_moments does, did not pay): in
    # a training step of the CNN of bench/overhead.py, compiled or channels-last eager,
    # summarizing its three sites (21 M values) took 41-51 ms in one thread against 92-97 ms
    # split over two, although the split was faster alone (7-12 against 12 ms for one
    # [131072, 64] site)
    _timed("rows", _rows_kernel, x, *settings, count, s, mn, mx, n_sat, n_zero, hist, m)
    return _site_fields(count, s, m, mn, mx, n_sat, n_zero, hist, x.shape[0])


def tensor_moments(
    x: torch.Tensor, unit_dim: int, edges: tuple[float, float, int], thr: float | None
) -> dict[str, np.ndarray]:
    """:func:`site_moments` of a CPU float32 tensor whose units are on ``unit_dim`` (≥ 0),
    read in its memory order: with the units innermost (``[batch, units]``, channels-last
    activations as compiled convolutions leave them) and at least :data:`ROWS_MIN` positions,
    as ``[positions, units]`` rows (:func:`rows_moments`); otherwise as ``[pre, units,
    post]`` (a copy if that view is not contiguous). Both give the same bits.

    Examples
    --------
    >>> x = torch.arange(64.0).reshape(2, 2, 4, 4).contiguous(memory_format=torch.channels_last)
    >>> tensor_moments(x, 1, (0.0, 64.0, 4), None)["mean"].tolist()
    [23.5, 39.5]
    """
    units = x.shape[unit_dim]
    rows = x.movedim(unit_dim, -1)  # [..., units], a view
    if rows.is_contiguous() and rows.numel() >= ROWS_MIN * units:
        return rows_moments(rows.reshape(-1, units).numpy(), edges, thr)
    x3 = x.reshape(math.prod(x.shape[:unit_dim]), units, -1)  # [pre, units, post]
    return site_moments(x3.numpy(), edges, thr)


#: Values per row from which :func:`sort_rows` sorts with the compiled radix sort rather than
#: ``numpy.sort`` (measured here for 100 rows: 0.58 against 0.53 ms at 1024 values, 4.4
#: against 2.2 ms at 4096; 0.03 against 0.17 ms at 256).
RADIX_MIN = 2048


def sort_rows(a: np.ndarray) -> np.ndarray:
    """Each row of ``a`` (``[rows, n]``) sorted ascending, as ``numpy.sort(a, axis=1)`` gives
    the values (NaN last; ``-0.0`` before ``0.0`` where numpy may order them either way).

    float32 rows of at least :data:`RADIX_MIN` values are sorted by a compiled radix sort
    (four passes over the values: ~2.5x faster than numpy's sort for the 8192 values of a
    quantile sample), others by numpy.

    Examples
    --------
    >>> sort_rows(np.array([[3.0, -1.0, np.nan, 0.5]], dtype=np.float32)).tolist()
    [[-1.0, 0.5, 3.0, nan]]
    """
    if a.ndim != 2:
        raise ValueError(f"sort_rows takes [rows, n], got shape {a.shape}")
    if a.dtype != np.float32 or a.shape[1] < RADIX_MIN or not usable():
        return np.sort(a, axis=1)
    a = np.ascontiguousarray(a)
    out = np.empty_like(a)
    _timed("radix", _radix_rows, a, out)
    return out


def unit_mean_m2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit mean and sum of squared deviations (float64, ``[units]``) of float32 values
    ``x`` ``[pre, units, post]`` (copied if not C-contiguous), in two compiled passes; a
    non-finite value makes its unit's results non-finite.

    Examples
    --------
    >>> x = np.array([[[1.0], [2.0]], [[3.0], [6.0]]], dtype=np.float32)  # [2, 2, 1]
    >>> mean, m2 = unit_mean_m2(x)
    >>> mean.tolist(), m2.tolist()
    ([2.0, 4.0], [2.0, 8.0])
    """
    if x.dtype != np.float32 or x.ndim != 3 or x.shape[0] * x.shape[2] == 0:
        raise ValueError(
            f"unit_mean_m2 takes float32 [pre, units, post] with values, got {x.dtype} with "
            f"shape {x.shape}"
        )
    x = np.ascontiguousarray(x)
    mean = np.empty(x.shape[1], np.float64)
    m2 = np.empty(x.shape[1], np.float64)
    bounds = _parts(x.size, x.shape[1])  # split by units over threads, as site_moments

    def part(i: int) -> None:
        a, b = bounds[i]
        _mean_m2_kernel(x[:, a:b], mean[a:b], m2[a:b])

    _timed("mean_m2", _split, part, len(bounds))
    return mean, m2


def block_fields(
    a: np.ndarray, widths: list[int], edges: list[np.ndarray], thresholds: list[float]
) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Moments, counts and histograms of a finite float32 block ``[positions, units]`` whose
    columns are groups (group ``i``: the next ``widths[i]`` columns, histogrammed on its own
    ``edges[i]``, saturated above ``thresholds[i]``), in two compiled passes.

    Returns ``({"mean", "m2", "m3", "m4", "n_sat", "n_zero"}: [units], [each group's
    histogram, bins + 2])``: what :mod:`icstools.functional.exact`'s numpy fold computes, the
    counts and bins to the bit, the moments within float64 rounding.

    Examples
    --------
    >>> a = np.array([[0.0, 1.0, 5.0], [2.0, 3.0, -5.0]], dtype=np.float32)
    >>> fields, hists = block_fields(a, [2, 1], [np.linspace(0, 4, 5)] * 2, [2.5, 1.0])
    >>> fields["mean"].tolist(), fields["n_sat"].tolist(), [h.tolist() for h in hists]
    ([1.0, 2.0, 0.0], [0, 1, 2], [[0, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 1]])
    """
    if a.dtype != np.float32 or a.ndim != 2:
        raise ValueError(
            f"block_fields takes float32 [positions, units], got {a.dtype} with shape {a.shape}"
        )
    a = np.ascontiguousarray(a)  # rows of contiguous columns, as the kernel reads them
    nbins = np.array([len(e) - 1 for e in edges], dtype=np.int64)
    col = lambda v, dt: np.repeat(np.asarray(v, dtype=dt), widths)  # noqa: E731  [units]
    lo = col([e[0] for e in edges], np.float32)
    hi = col([e[-1] for e in edges], np.float32)
    starts = np.concatenate([[0], np.cumsum(nbins + 2)[:-1]]).astype(np.int64)
    units = a.shape[1]
    s = np.zeros(units, np.float64)
    n_sat = np.zeros(units, np.int64)
    n_zero = np.zeros(units, np.int64)
    hist = np.zeros(int((nbins + 2).sum()), np.int64)
    m = np.zeros((4, units), np.float64)
    thr = col(thresholds, np.float32)
    args = (a, lo, hi, col(nbins, np.int64), col(starts, np.int64), thr)
    _timed("block", _block_kernel, *args, s, n_sat, n_zero, hist, m)
    n = np.full(units, a.shape[0], np.int64)
    fields = {**_corrected(n, s, m), "n_sat": n_sat, "n_zero": n_zero}
    hists = [hist[b : b + k + 2] for b, k in zip(starts.tolist(), nbins.tolist(), strict=True)]
    return fields, hists

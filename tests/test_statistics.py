"""Tests of icstools.functional.statistics against independent numpy/scipy references.

Every reference is computed with numpy/scipy in float64 on the *same* values the code sees: a
float16/bfloat16 tensor is rounded to its dtype first, and the reference takes that rounded
tensor upcast to float64. Tolerances follow from the float32 (float64 for float64 inputs)
compute precision and the scale of each unit's data.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
import zlib

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from icstools.functional import kernels
from icstools.functional.final import _finish
from icstools.functional.gradient_statistics import GradientStatistics
from icstools.functional.statistics import (
    DEFAULT_QUANTILES,
    SIGMOID_SATURATION,
    TANH_SATURATION,
    ActivationStatistics,
    StateField,
    StatisticsState,
    choose_hist_edges,
    merge_fields,
    merge_states,
    quantiles_from_sorted,
    summarize,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
QUANTILES = (0.0, *DEFAULT_QUANTILES, 1.0)
HYP = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------------------------
# Independent reference
# --------------------------------------------------------------------------------------------


def unit_rows(x: torch.Tensor, unit_dim: int) -> np.ndarray:
    """``[units, pooled values]`` in float64, via numpy (not the code's movedim/reshape)."""
    a = x.detach().to(torch.float64).numpy()
    a = np.moveaxis(a, unit_dim, 0)
    return a.reshape(a.shape[0], -1)


def tol_unit(dtype: torch.dtype) -> float:
    """Relative accuracy we hold the code to: ~80 ulp of its compute dtype."""
    return 1e-12 if dtype == torch.float64 else 1e-5


def tiny_unit(dtype: torch.dtype) -> float:
    """Absolute floor: results below the compute dtype's normal range are not held to ``t``."""
    return 1e3 * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny


def sd_floor(dtype: torch.dtype) -> float:
    """Smallest standard deviation whose 4th powers stay normal in the compute dtype (skew and
    kurt below it are covered separately by test_shape_statistics_..._at_extreme_scales)."""
    return 1e-70 if dtype == torch.float64 else 1e-8


def reference(
    rows: np.ndarray,
    edges: np.ndarray,
    sat: float | None,
    quantiles: tuple[float, ...] = QUANTILES,
) -> dict[str, np.ndarray]:
    """numpy/scipy statistics of each row's finite values (float64)."""
    units = rows.shape[0]
    keys = [
        "mean",
        "var",
        "skew",
        "kurt",
        "min",
        "max",
        "sat_frac",
        "zero_frac",
        "nonfinite",
        "count",
        "scale",
    ]
    out = {k: np.full(units, np.nan) for k in keys}
    out["quantile_value"] = np.full((units, len(quantiles)), np.nan)
    for u, row in enumerate(rows):
        fin = row[np.isfinite(row)]
        out["count"][u] = fin.size
        out["nonfinite"][u] = (row.size - fin.size) / row.size
        if fin.size == 0:
            out["scale"][u] = 0.0
            continue
        out["mean"][u] = fin.mean()
        out["var"][u] = fin.var()  # ddof=0
        out["min"][u] = fin.min()
        out["max"][u] = fin.max()
        out["scale"][u] = np.abs(fin).max()
        out["sat_frac"][u] = 0.0 if sat is None else np.mean(np.abs(fin) > sat)
        out["zero_frac"][u] = np.mean(fin == 0)
        out["quantile_value"][u] = np.quantile(fin, quantiles, method="linear")
        if fin.var() > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scipy warns on near-constant data
                out["skew"][u] = scipy.stats.skew(fin, bias=True)
                out["kurt"][u] = scipy.stats.kurtosis(fin, fisher=True, bias=True)
    fin_all = rows[np.isfinite(rows)]
    inner, _ = np.histogram(fin_all, bins=edges)
    out["hist"] = np.concatenate(
        [[np.sum(fin_all < edges[0])], inner, [np.sum(fin_all > edges[-1])]]
    )
    out["near_edge"] = near_edge_count(fin_all, edges)
    return out


def near_edge_count(values: np.ndarray, edges: np.ndarray, eps: float = 2.0**-23) -> int:
    """Values within float32 rounding of an edge: numpy may legitimately bin them either side."""
    if values.size == 0:
        return 0
    span = np.abs(edges).max()
    dist = np.abs(values[:, None] - edges[None, :]).min(axis=1)
    return int(np.sum(dist <= 16 * eps * (span + np.abs(values))))


def assert_matches_reference(
    out: dict[str, torch.Tensor], ref: dict[str, np.ndarray], dtype: torch.dtype, what: str = ""
) -> None:
    t = tol_unit(dtype)
    floor = tiny_unit(dtype)
    got = {k: v.detach().to(torch.float64).cpu().numpy() for k, v in out.items()}
    scale = ref["scale"]
    empty = ref["count"] == 0

    np.testing.assert_array_equal(got["count"], ref["count"], err_msg=f"{what} count")
    for k in ("min", "max"):  # exact: min/max of the same (upcast) values
        np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{what} {k}")
    for k in ("sat_frac", "zero_frac", "nonfinite"):
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-6, err_msg=f"{what} {k}")
    ok = ~empty
    # mean / var, tolerances scaled by the unit's largest |value|
    assert np.all(np.isnan(got["mean"][empty])) and np.all(np.isnan(got["var"][empty])), what
    d_mean = np.abs(got["mean"][ok] - ref["mean"][ok])
    assert np.all(d_mean <= t * scale[ok] + floor), (what, "mean", got["mean"], ref["mean"])
    sd = np.sqrt(ref["var"][ok])
    var_tol = 10 * t * ref["var"][ok] + 4 * t * scale[ok] * sd + (t * scale[ok]) ** 2 + floor
    d_var = np.abs(got["var"][ok] - ref["var"][ok])
    assert np.all(d_var <= var_tol), (what, "var", got["var"], ref["var"])
    # skew / kurt: NaN for constant (and empty) units; compared where the reference variance is
    # well resolved in the compute precision (sd > 100 t · max|x|).
    constant = ok & (ref["var"] == 0)
    for k in ("skew", "kurt"):
        assert np.all(np.isnan(got[k][constant | empty])), (what, k, "constant/empty", got[k])
    with np.errstate(divide="ignore", invalid="ignore"):
        r = scale / np.sqrt(ref["var"])  # max|x| / sd
    resolved = ok & (ref["var"] > sd_floor(dtype) ** 2) & (r < 1 / (100 * t))
    for k, base in (("skew", 1.0), ("kurt", 3.0)):
        g, e = got[k][resolved], ref[k][resolved]
        tol = t * (10 + 10 * r[resolved]) * (base + np.abs(e))
        assert np.all(np.isfinite(g)), (what, k, "should be finite", g, e)
        assert np.all(np.abs(g - e) <= tol), (what, k, g, e, tol)
    # quantiles
    q_tol = 10 * t * scale[:, None] + floor
    gq, eq = got["quantile_value"], ref["quantile_value"]
    assert np.array_equal(np.isnan(gq), np.isnan(eq)), (what, "quantile NaN pattern", gq, eq)
    assert np.all(
        np.abs(gq - eq)[~np.isnan(eq)] <= np.broadcast_to(q_tol, eq.shape)[~np.isnan(eq)]
    ), (
        what,
        "quantiles",
        gq,
        eq,
    )
    # histogram: exact, except values within rounding of an edge may sit on either side
    gh = got["hist"].astype(np.int64)
    assert gh.sum() == ref["hist"].sum(), (what, "hist total", gh, ref["hist"])
    if ref["near_edge"] == 0:
        np.testing.assert_array_equal(gh, ref["hist"], err_msg=f"{what} hist")
    else:
        assert np.abs(gh - ref["hist"]).sum() <= 2 * ref["near_edge"], (what, gh, ref["hist"])


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


@st.composite
def layouts(draw, min_batch: int = 1, max_batch: int = 6) -> tuple[tuple[int, ...], int]:
    kind = draw(st.sampled_from(["2d", "3d", "4d"]))
    b = draw(st.integers(min_batch, max_batch))
    if kind == "2d":  # [batch, features]
        return (b, draw(st.integers(1, 5))), 1
    if kind == "3d":  # [batch, time, features], units on the last dim
        return (b, draw(st.integers(1, 4)), draw(st.integers(1, 4))), 2
    # [N, C, H, W], units are channels
    return (b, draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))), 1


@st.composite
def activations(
    draw, *, finite_only: bool = False, min_batch: int = 1, max_batch: int = 6
) -> tuple[torch.Tensor, int]:
    shape, unit_dim = draw(layouts(min_batch=min_batch, max_batch=max_batch))
    dtype = draw(st.sampled_from(DTYPES))
    center = draw(st.sampled_from([0.0, 0.0, 3.0, -100.0, 700.0]))
    width = draw(st.sampled_from([1e-2, 1.0, 50.0, 1e3]))
    elements = st.floats(center - width, center + width, allow_nan=False, allow_infinity=False)
    data = draw(hnp.arrays(np.float64, shape, elements=elements))
    units = shape[unit_dim]
    if draw(st.booleans()):  # one unit constant
        idx = [slice(None)] * len(shape)
        idx[unit_dim] = draw(st.integers(0, units - 1))
        data[tuple(idx)] = draw(elements)
    if not finite_only and draw(st.booleans()):
        codes = draw(hnp.arrays(np.int8, shape, elements=st.integers(0, 9)))
        data = np.where(codes == 1, np.nan, data)
        data = np.where(codes == 2, np.inf, data)
        data = np.where(codes == 3, -np.inf, data)
        if draw(st.booleans()):  # one unit with no finite value at all
            idx = [slice(None)] * len(shape)
            idx[unit_dim] = draw(st.integers(0, units - 1))
            data[tuple(idx)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return torch.from_numpy(data).to(dtype), unit_dim


def edges_for(kind: str, x: torch.Tensor, bins: int) -> np.ndarray:
    if kind == "dyadic":
        return np.linspace(-4.0, 4.0, 17)
    if kind == "wide":
        return np.linspace(-1024.0, 1024.0, 9)
    return choose_hist_edges(x, bins)


edge_kinds = st.sampled_from(["dyadic", "wide", "auto"])
sat_thresholds = st.sampled_from([None, 0.5, 2.0, 100.0])


# --------------------------------------------------------------------------------------------
# One tensor: ActivationStatistics / summarize against numpy/scipy
# --------------------------------------------------------------------------------------------


@HYP
@given(
    xa=activations(),
    edge_kind=edge_kinds,
    bins=st.integers(1, 12),
    sat=sat_thresholds,
    cap=st.sampled_from([None, 8192]),
)
def test_one_tensor_matches_numpy_scipy(xa, edge_kind, bins, sat, cap):
    x, unit_dim = xa
    edges = edges_for(edge_kind, x, bins)
    ref = reference(unit_rows(x, unit_dim), edges, sat)
    stats = ActivationStatistics(
        edges, unit_dim, quantiles=QUANTILES, sat_threshold=sat, quantile_sample=cap
    )
    stats.update(x)
    assert stats.calls == 1
    assert_matches_reference(stats.compute(), ref, x.dtype, f"{tuple(x.shape)} {x.dtype}")

    # the fused reduction (the eager twin of the compiled one) against the same reference
    fused = ActivationStatistics(
        edges, unit_dim, quantiles=QUANTILES, sat_threshold=sat, quantile_sample=None
    )
    fused._state = summarize(x, unit_dim, hist_edges=edges, sat_threshold=sat, fused="eager")
    assert_matches_reference(fused.compute(), ref, x.dtype, f"fused {tuple(x.shape)} {x.dtype}")

    # the eager paths the compiled kernels replace (numba absent or ICSTOOLS_KERNELS=0)
    was, kernels.ENABLED = kernels.ENABLED, False
    try:
        eager = ActivationStatistics(
            edges, unit_dim, quantiles=QUANTILES, sat_threshold=sat, quantile_sample=cap
        )
        eager.update(x)
        assert_matches_reference(eager.compute(), ref, x.dtype, f"eager {tuple(x.shape)}")
        eager._state = summarize(x, unit_dim, hist_edges=edges, sat_threshold=sat)
        eager._values, eager._result = [], None
        assert_matches_reference(eager.compute(), ref, x.dtype, f"eager state {tuple(x.shape)}")
    finally:
        kernels.ENABLED = was

    # summarize's raw state agrees with the same reference
    s = summarize(x, unit_dim, hist_edges=edges, sat_threshold=sat)
    rows = unit_rows(x, unit_dim)
    np.testing.assert_array_equal(s.count.numpy(), ref["count"])
    np.testing.assert_array_equal(s.total.numpy(), np.full(rows.shape[0], rows.shape[1]))
    n = np.maximum(ref["count"], 1)
    np.testing.assert_allclose(
        s.n_zero.numpy() / n, np.nan_to_num(ref["zero_frac"]), rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(
        s.n_sat.numpy() / n, np.nan_to_num(ref["sat_frac"]), rtol=0, atol=1e-12
    )
    ok = ref["count"] > 0
    np.testing.assert_array_equal(s.min.double().numpy()[ok], ref["min"][ok])
    np.testing.assert_array_equal(s.max.double().numpy()[ok], ref["max"][ok])
    assert s.sample.shape == (rows.shape[1], rows.shape[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("dist", "shape", "unit_dim"),
    [
        ("normal", (4000, 3), 1),
        ("offset", (200, 10, 3), 2),  # N(1000, 1): mean far from zero relative to the spread
        ("exponential", (50, 3, 8, 10), 1),  # skewed
        ("student_t", (4000, 3), -1),  # heavy tails (kurtosis far from 0)
        ("relu", (50, 3, 8, 10), 1),  # half exact zeros
    ],
)
def test_larger_samples_match_numpy_scipy(dtype, dist, shape, unit_dim):
    rng = np.random.default_rng(zlib.crc32(f"{dist} {dtype}".encode()))
    if dist == "normal":
        data = rng.normal(0.5, 2.0, shape)
    elif dist == "offset":
        data = rng.normal(1000.0, 1.0, shape)
    elif dist == "exponential":
        data = rng.exponential(3.0, shape)
    elif dist == "student_t":
        data = rng.standard_t(5, shape)
    else:
        data = np.maximum(rng.normal(0, 1, shape), 0)
    x = torch.from_numpy(data).to(dtype)
    edges = choose_hist_edges(x, 30)
    stats = ActivationStatistics(
        edges, unit_dim, quantiles=QUANTILES, sat_threshold=2.0, quantile_sample=None
    )
    stats.update(x)
    ref = reference(unit_rows(x, unit_dim % x.ndim), edges, 2.0)
    out = stats.compute()
    assert_matches_reference(out, ref, dtype, f"{dist} {dtype}")
    assert out["mean"].shape == (x.shape[unit_dim],)
    assert out["quantile_value"].shape == (x.shape[unit_dim], len(QUANTILES))
    assert out["hist"].shape == (len(edges) + 1,)
    if dist == "relu":
        assert np.all(out["zero_frac"].numpy() > 0.4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_units_and_constant_units(dtype):
    x = torch.randn(50, 6, dtype=torch.float64).to(dtype)
    x[:, 0] = math.nan  # entirely non-finite units
    x[:, 1] = math.inf
    x[:25, 2] = -math.inf
    x[25:, 2] = math.nan
    x[:, 3] = 0.1  # constant (not representable) unit
    x[:, 4] = 1000.0
    x[7, 4] = math.nan  # constant with a non-finite value (masked path)
    x[3, 5] = math.inf  # one non-finite value
    stats = ActivationStatistics(
        np.linspace(-3, 3, 7), 1, quantiles=QUANTILES, sat_threshold=1.0, quantile_sample=None
    )
    stats.update(x)
    out = stats.compute()
    for u in (0, 1, 2):
        assert out["nonfinite"][u].item() == 1.0
        assert out["count"][u].item() == 0
        for k in ("mean", "var", "skew", "kurt", "min", "max", "sat_frac", "zero_frac"):
            assert math.isnan(out[k][u].item()), (k, u)
        assert torch.isnan(out["quantile_value"][u]).all()
    for u in (3, 4):
        assert out["var"][u].item() == pytest.approx(0.0, abs=1e-9 * 1000**2)
        assert math.isnan(out["skew"][u].item()) and math.isnan(out["kurt"][u].item())
        assert out["min"][u].item() == out["max"][u].item() == x[0, u].double().item()
    assert out["nonfinite"][4].item() == pytest.approx(1 / 50)
    assert out["nonfinite"][5].item() == pytest.approx(1 / 50)
    ref = reference(unit_rows(x, 1), np.linspace(-3, 3, 7), 1.0)
    assert_matches_reference(out, ref, dtype, "nonfinite")


def test_batch_of_one_gives_nan_shape_statistics():
    x = torch.tensor([[1.5, -2.0, 0.0]])
    stats = ActivationStatistics(np.linspace(-3, 3, 4), 1, quantile_sample=None)
    stats.update(x)
    out = stats.compute()
    assert out["var"].tolist() == [0.0, 0.0, 0.0]
    assert torch.isnan(out["skew"]).all() and torch.isnan(out["kurt"]).all()
    assert out["zero_frac"].tolist() == [0.0, 0.0, 1.0]
    assert torch.equal(out["quantile_value"], x.T.expand(3, len(DEFAULT_QUANTILES)))


@pytest.mark.parametrize("scale", [1.0, 3e8, 1e-11])
def test_shape_statistics_of_float32_data_at_extreme_scales(scale):
    """Finite float32 activations of large (diverging training) or tiny scale: skew/kurt are
    scale-invariant, so they must equal scipy's (or at worst be NaN, "lost to rounding"), never
    inf or a wrong number. (m4 = sum of d**4 overflows/underflows float32 at these scales.)"""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(20000, 2, generator=g, dtype=torch.float64) * scale).float()
    stats = ActivationStatistics(np.linspace(-1, 1, 3), 1, quantile_sample=None)
    stats.update(x)
    out = stats.compute()
    rows = unit_rows(x, 1)
    for k, fn in (("skew", scipy.stats.skew), ("kurt", scipy.stats.kurtosis)):
        exp = np.array([fn(r) for r in rows])
        got = out[k].double().numpy()
        assert np.all(np.isnan(got) | np.isclose(got, exp, rtol=0, atol=1e-3)), (k, got, exp)


# --------------------------------------------------------------------------------------------
# Merging: batches, repeated calls, ranks
# --------------------------------------------------------------------------------------------


def _assert_same_exact_fields(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in (
        "count",
        "min",
        "max",
        "hist",
        "sat_frac",
        "zero_frac",
        "nonfinite",
        "quantile_value",
    ):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)


@st.composite
def split_plan(draw, *, finite_only: bool):
    x, unit_dim = draw(activations(finite_only=finite_only, min_batch=2, max_batch=8))
    b = x.shape[0]
    cuts = sorted(draw(st.sets(st.integers(1, b - 1), max_size=b - 1)))
    bounds = [0, *cuts, b]
    chunks = [x[s:e] for s, e in itertools.pairwise(bounds)]
    ranks = draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    return x, unit_dim, chunks, ranks


def _check_split(x, unit_dim, chunks, ranks, edge_kind, sat):
    edges = edges_for(edge_kind, x, 7)
    kw = dict(quantiles=QUANTILES, sat_threshold=sat, quantile_sample=None)
    one = ActivationStatistics(edges, unit_dim, **kw)
    one.update(x)
    seq = ActivationStatistics(edges, unit_dim, **kw)
    for c in chunks:
        seq.update(c)
    assert seq.calls == len(chunks)
    rank_a = ActivationStatistics(edges, unit_dim, **kw)
    rank_b = ActivationStatistics(edges, unit_dim, **kw)
    for c, on_a in zip(chunks, ranks, strict=True):
        (rank_a if on_a else rank_b).update(c)
    rank_a.merge(rank_b)
    assert rank_a.calls == len(chunks)
    ref = reference(unit_rows(x, unit_dim), edges, sat)
    o1, o2, o3 = one.compute(), seq.compute(), rank_a.compute()
    _assert_same_exact_fields(o1, o2)
    _assert_same_exact_fields(o1, o3)
    assert_matches_reference(o2, ref, x.dtype, f"calls {[len(c) for c in chunks]}")
    assert_matches_reference(o3, ref, x.dtype, f"ranks {[len(c) for c in chunks]} {ranks}")


@HYP
@given(plan=split_plan(finite_only=True), edge_kind=edge_kinds, sat=sat_thresholds)
def test_merge_of_batches_calls_and_ranks_equals_one_shot_finite(plan, edge_kind, sat):
    _check_split(*plan, edge_kind, sat)


@HYP
@given(plan=split_plan(finite_only=False), edge_kind=edge_kinds, sat=sat_thresholds)
def test_merge_of_batches_calls_and_ranks_equals_one_shot_with_nonfinite(plan, edge_kind, sat):
    _check_split(*plan, edge_kind, sat)


@pytest.mark.parametrize("first", [math.nan, math.inf])
def test_merge_when_a_unit_has_no_finite_value_in_the_first_batch(first):
    """A unit whose first batch is all NaN/inf (e.g. a transient overflow), then finite."""
    edges = np.linspace(-10, 10, 5)
    stats = ActivationStatistics(edges, 1, quantile_sample=None)
    a = torch.tensor([[first, 1.0], [first, 2.0]])
    b = torch.tensor([[5.0, 1.0], [7.0, 2.0]])
    c = torch.tensor([[9.0, 3.0]])
    stats.update(a)
    stats.update(b)
    out = stats.compute()
    assert out["mean"][0].item() == pytest.approx(6.0), out["mean"]
    assert out["var"][0].item() == pytest.approx(1.0)
    stats.update(c)
    out = stats.compute()
    assert out["mean"][0].item() == pytest.approx(7.0), out["mean"]
    assert out["var"][0].item() == pytest.approx(np.var([5.0, 7.0, 9.0])), out["var"]
    # the same through merge_states directly
    s = merge_states(summarize(a, 1, hist_edges=edges), summarize(b, 1, hist_edges=edges))
    assert s.mean[0].item() == pytest.approx(6.0), s.mean


def test_merge_states_pebay_against_numpy_on_skewed_float64_chunks():
    rng = np.random.default_rng(7)
    data = np.concatenate(
        [rng.exponential(1.0, (300, 2)), rng.normal(5, 0.1, (13, 2)), rng.standard_t(3, (1, 2))]
    )
    x = torch.from_numpy(data)
    e = np.linspace(-5, 10, 16)
    s = summarize(x[:300], 1, hist_edges=e)
    s = merge_states(s, summarize(x[300:313], 1, hist_edges=e))
    s = merge_states(summarize(x[313:], 1, hist_edges=e), s)  # order must not matter
    n = data.shape[0]
    np.testing.assert_allclose(s.mean.numpy(), data.mean(0), rtol=1e-13)
    for k, p in (("m2", 2), ("m3", 3), ("m4", 4)):
        exp = ((data - data.mean(0)) ** p).sum(0)
        np.testing.assert_allclose(getattr(s, k).numpy(), exp, rtol=1e-11, err_msg=k)
    assert s.count.tolist() == [n, n] and s.calls == 3


def test_merge_rejects_mismatches():
    a = ActivationStatistics(np.linspace(-1, 1, 5), 1)
    b = ActivationStatistics(np.linspace(-2, 2, 5), 1)
    a.update(torch.randn(4, 3))
    b.update(torch.randn(4, 3))
    with pytest.raises(ValueError, match="histogram edges"):
        a.merge(b)
    c = ActivationStatistics(np.linspace(-1, 1, 5), 1)
    c.update(torch.randn(4, 2))
    with pytest.raises(ValueError, match="3 and 2 units"):
        a.merge(c)
    before = a.compute()
    a.merge(ActivationStatistics(np.linspace(-1, 1, 5), 1))  # empty other: no-op
    torch.testing.assert_close(a.compute(), before, equal_nan=True)


def test_reset_forgets_values():
    s = ActivationStatistics(np.linspace(-1, 1, 5), 1, quantile_sample=None)
    s.update(torch.full((3, 2), 100.0))
    s.reset()
    assert s.calls == 0 and s.state is None
    with pytest.raises(ValueError, match="before any update"):
        s.compute()
    x = torch.randn(5, 2, dtype=torch.float64)
    s.update(x)
    np.testing.assert_allclose(s.compute()["mean"].numpy(), x.numpy().mean(0), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Quantile sampling
# --------------------------------------------------------------------------------------------


def _normal_se(q: np.ndarray, m: int, sd: float = 1.0) -> np.ndarray:
    return np.sqrt(q * (1 - q) / m) / (scipy.stats.norm.pdf(scipy.stats.norm.ppf(q)) / sd)


@pytest.mark.parametrize("calls", [1, 10])
def test_sampled_quantiles_within_standard_errors_of_exact(calls):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(50000, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0])
    m = 2000
    q = np.asarray(DEFAULT_QUANTILES)
    stats = ActivationStatistics(
        np.linspace(-5, 5, 11), 1, quantile_sample=m, generator=torch.Generator().manual_seed(5)
    )
    for chunk in x.chunk(calls):
        stats.update(chunk)
    got = stats.compute()["quantile_value"].double().numpy()
    exact = np.quantile(x.double().numpy(), q, axis=0).T  # [units, nq]
    sd = np.array([1.0, 2.0, 0.5, 3.0])[:, None]
    se = _normal_se(q, m)[None, :] * sd
    assert np.all(np.abs(got - exact) <= 5 * se), np.max(np.abs(got - exact) / se)
    assert not np.allclose(got, exact, atol=1e-6)  # it did sample


def test_sampling_leaves_global_rng_alone_and_is_deterministic():
    x = torch.randn(30000, 3)
    y = torch.randn(20000, 3)

    def run(seed):
        s = ActivationStatistics(
            np.linspace(-3, 3, 7),
            1,
            quantile_sample=500,
            generator=None if seed is None else torch.Generator().manual_seed(seed),
        )
        s.update(x)
        s.update(y)
        return s.compute()["quantile_value"]

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a, b, c = run(1), run(1), run(2)
    d, e = run(None), run(None)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert torch.equal(d, e)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("small_first", [False, True])
def test_pooled_calls_of_different_sizes_are_sampled_proportionally(small_first):
    g = torch.Generator().manual_seed(2)
    big = torch.randn(100_000, 1, generator=g)
    small = torch.randn(1000, 1, generator=g) + 10.0
    levels = np.linspace(0, 1, 1001)
    stats = ActivationStatistics(np.linspace(-5, 15, 21), 1, quantiles=levels, quantile_sample=4000)
    for t in (small, big) if small_first else (big, small):
        stats.update(t)
    qv = stats.compute()["quantile_value"][0].double().numpy()
    _check_pooled(qv, levels, big, small, m=4000)


@pytest.mark.parametrize("small_first", [False, True])
def test_merged_ranks_of_different_sizes_are_sampled_proportionally(small_first):
    """Two ranks (or two objects) with very different numbers of values, merged."""
    g = torch.Generator().manual_seed(2)
    big = torch.randn(100_000, 1, generator=g)
    small = torch.randn(1000, 1, generator=g) + 10.0
    levels = np.linspace(0, 1, 1001)

    def rank(t):
        s = ActivationStatistics(np.linspace(-5, 15, 21), 1, quantiles=levels, quantile_sample=4000)
        s.update(t)
        return s

    a, b = (rank(small), rank(big)) if small_first else (rank(big), rank(small))
    a.merge(b)
    qv = a.compute()["quantile_value"][0].double().numpy()
    _check_pooled(qv, levels, big, small, m=4000)


def _check_pooled(qv, levels, big, small, m):
    pooled = np.concatenate([big.double().numpy()[:, 0], small.double().numpy()[:, 0]])
    w_small = small.shape[0] / pooled.size
    # share of the sample coming from the small call (all of its values are > 5, none of big's)
    share = np.mean(qv > 5.0)
    assert abs(share - w_small) <= 5 * math.sqrt(w_small / m) + 2e-3, (share, w_small)
    # central quantiles within 5 standard errors of the pooled ones
    for q in (0.1, 0.5, 0.9, 0.97):
        exact = np.quantile(pooled, q)
        pdf = (1 - w_small) * scipy.stats.norm.pdf(exact) + w_small * scipy.stats.norm.pdf(
            exact - 10
        )
        se = math.sqrt(q * (1 - q) / m) / pdf
        got = qv[round(q * 1000)]
        assert abs(got - exact) <= 5 * se, (q, got, exact, se)


def test_exact_quantiles_when_values_fit_in_the_sample():
    x = torch.randn(100, 3, 4, 5, dtype=torch.float64)  # 100*4*5 = 2000 per unit
    s = ActivationStatistics(np.linspace(-3, 3, 7), 1, quantiles=QUANTILES, quantile_sample=2000)
    s.update(x)
    exp = np.quantile(unit_rows(x, 1), QUANTILES, axis=1).T
    np.testing.assert_allclose(s.compute()["quantile_value"].numpy(), exp, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The stored sample is a copy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [None, 300])
@pytest.mark.parametrize(
    ("shape", "unit_dim"), [((600, 3), 1), ((20, 6, 3), 2), ((6, 3, 10, 10), 1)]
)
def test_inplace_change_after_update_does_not_change_compute(cap, shape, unit_dim):
    x = torch.randn(*shape)
    pristine = x.clone()

    def fresh():
        return ActivationStatistics(
            np.linspace(-3, 3, 7),
            unit_dim,
            quantiles=QUANTILES,
            quantile_sample=cap,
            generator=torch.Generator().manual_seed(0),
        )

    s = fresh()
    s.update(x)
    x.mul_(-7.0).add_(100.0)  # e.g. a following in-place ReLU/add on the activation
    x.view(-1)[::2] = math.nan
    out = s.compute()
    t = fresh()
    t.update(pristine)
    torch.testing.assert_close(out, t.compute(), rtol=0, atol=0, equal_nan=True)
    if cap is None:
        ref = reference(unit_rows(pristine, unit_dim), np.linspace(-3, 3, 7), None)
        assert_matches_reference(out, ref, torch.float32, "in-place")


@pytest.mark.parametrize("rate", [1.0, 0.3])
@pytest.mark.parametrize("shape", [(5, 3, 7, 6), (40, 4, 1, 1), (2, 8, 3, 3)])
def test_channels_last_tensors_give_the_bits_of_their_contiguous_copy(shape, rate):
    """A channels-last activation (as compiled convolutions keep them) is read in its memory
    order, by another kernel on the CPU: every field and the sampled rows to the bit."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 2
    x[0, 1, 0, 0], x[1, 0, 0, 0], x[0, 2, 0, 0] = math.nan, math.inf, 0.0
    cl = x.contiguous(memory_format=torch.channels_last)
    assert cl.movedim(1, -1).is_contiguous()  # [N, H, W, C] in memory
    edges = np.linspace(-4, 4, 9)

    def state(t: torch.Tensor) -> object:
        gen = torch.Generator().manual_seed(1)
        return summarize(t, 1, hist_edges=edges, sat_threshold=1.5, sample_rate=rate, generator=gen)

    got, want = state(cl), state(x)
    for name in (f.name for f in StatisticsState.FIELDS):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.contiguous().numpy().tobytes() == b.contiguous().numpy().tobytes(), name


# --------------------------------------------------------------------------------------------
# quantiles_from_sorted / choose_hist_edges / saturation thresholds
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=0, max_size=12),
        min_size=1,
        max_size=5,
    ),
    qs=st.lists(st.floats(0, 1), min_size=1, max_size=6),
)
def test_quantiles_from_sorted_matches_numpy(rows, qs):
    m = max(len(r) for r in rows)
    padded = np.full((len(rows), m), np.inf)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = np.sort(r)
    count = torch.tensor([len(r) for r in rows])
    got = quantiles_from_sorted(
        torch.from_numpy(padded), count, torch.tensor(qs, dtype=torch.float64)
    )
    assert got.shape == (len(rows), len(qs))
    for i, r in enumerate(rows):
        if not r:
            assert torch.isnan(got[i]).all()
        else:
            exp = np.quantile(np.asarray(r), qs, method="linear")
            np.testing.assert_allclose(got[i].numpy(), exp, rtol=1e-12, atol=1e-9)


def test_quantiles_from_sorted_edge_cases():
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert quantiles_from_sorted(v, torch.tensor([4]), torch.tensor([0.5])).tolist() == [[2.5]]
    q = torch.tensor([0.0, 0.3, 1.0])
    # a single valid value, padding after it never leaks in (q = 1 included)
    one = quantiles_from_sorted(torch.tensor([[7.0, math.inf, math.inf]]), torch.tensor([1]), q)
    assert one.tolist() == [[7.0, 7.0, 7.0]]
    two = quantiles_from_sorted(torch.tensor([[1.0, 3.0, math.inf]]), torch.tensor([2]), q)
    np.testing.assert_allclose(two.numpy(), [[1.0, 1.6, 3.0]])
    # no valid values, or no columns at all: NaN of shape [units, nq]
    none = quantiles_from_sorted(torch.full((2, 3), math.inf), torch.tensor([0, 0]), q)
    assert none.shape == (2, 3) and torch.isnan(none).all()
    empty = quantiles_from_sorted(torch.empty(2, 0), torch.tensor([0, 0]), q)
    assert empty.shape == (2, 3) and torch.isnan(empty).all()
    # rows with different counts at once
    mixed = quantiles_from_sorted(
        torch.tensor([[0.0, 10.0, math.inf], [5.0, math.inf, math.inf], [math.inf] * 3]),
        torch.tensor([2, 1, 0]),
        torch.tensor([0.5]),
    )
    assert mixed[0].item() == 5.0 and mixed[1].item() == 5.0 and math.isnan(mixed[2].item())


@pytest.mark.parametrize(
    "values",
    [
        [0.0, 1.0],
        [5.0, 5.0, 5.0],  # constant
        [0.0],  # single zero
        [-1e-30, 1e-30],
        [1000.0, 1001.0],
        [math.nan, -2.0, math.inf, 3.0, -math.inf],  # non-finite ignored
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_choose_hist_edges_covers_the_data(values, dtype):
    x = torch.tensor(values, dtype=torch.float64).to(dtype)[:, None]  # [n, 1 unit]
    edges = choose_hist_edges(x, bins=10)
    assert edges.shape == (11,)
    assert np.all(np.isfinite(edges)) and np.all(np.diff(edges) > 0)
    fin = x[torch.isfinite(x)].double().numpy()
    assert edges[0] < fin.min() and edges[-1] > fin.max()
    np.testing.assert_allclose(np.diff(edges), np.diff(edges)[0], rtol=1e-9)  # uniform
    # every value of the tensor lands inside the histogram (no under/overflow)
    s = ActivationStatistics(edges, 1, quantile_sample=None)
    s.update(x)
    h = s.compute()["hist"]
    assert h[0].item() == 0 and h[-1].item() == 0 and h.sum().item() == fin.size


def test_choose_hist_edges_values():
    np.testing.assert_allclose(
        choose_hist_edges(torch.tensor([0.0, 1.0]), bins=3), [-0.25, 0.25, 0.75, 1.25]
    )
    np.testing.assert_allclose(
        choose_hist_edges(torch.tensor([0.0, 4.0]), 2, margin=0.0), [0, 2, 4]
    )
    # no finite value: a default range around zero
    for x in (torch.tensor([math.nan, math.inf]), torch.empty(0)):
        e = choose_hist_edges(x, 2)
        assert np.all(np.isfinite(e)) and np.all(np.diff(e) > 0) and e[0] < 0 < e[-1]
    # constant data: a range around the constant, relative to its size
    e = choose_hist_edges(torch.tensor([1000.0, 1000.0]), 4)
    assert e[0] < 1000 < e[-1] and e[-1] - e[0] < 10


@pytest.mark.parametrize(
    ("values", "dtype"),
    [([-3e38, 3e38, 1.0], torch.float32), ([-1e308, 1e308, 1.0], torch.float64)],
)
def test_choose_hist_edges_near_the_dtype_limits(values, dtype):
    """Finite values near the dtype's limit (diverging training) must still give usable edges."""
    x = torch.tensor(values, dtype=dtype)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edges = choose_hist_edges(x, bins=4)
    assert np.all(np.isfinite(edges)) and np.all(np.diff(edges) > 0), edges
    s = ActivationStatistics(edges, 1, quantile_sample=None)
    s.update(x)
    assert s.compute()["hist"].sum().item() == 3


def test_saturation_thresholds_are_where_the_derivative_is_one_percent():
    for fn, thr in ((torch.sigmoid, SIGMOID_SATURATION), (torch.tanh, TANH_SATURATION)):
        x = torch.tensor(
            [-thr, thr, thr - 1e-3, thr + 1e-3], dtype=torch.float64, requires_grad=True
        )
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
        np.testing.assert_allclose(grad[:2].numpy(), [0.01, 0.01], rtol=1e-12)
        assert grad[2].item() > 0.01 > grad[3].item()
    # DESIGN.md's rounded values
    assert SIGMOID_SATURATION == pytest.approx(4.6, abs=0.02)
    assert TANH_SATURATION == pytest.approx(3.0, abs=0.01)


def test_saturation_fraction_uses_strict_threshold_and_finite_values():
    x = torch.tensor([[-5.0], [4.0], [2.0], [-2.0], [2.5], [math.inf], [math.nan]])
    s = ActivationStatistics(np.linspace(-3, 3, 7), 1, sat_threshold=2.0)
    s.update(x)
    out = s.compute()
    assert out["sat_frac"].item() == pytest.approx(3 / 5)  # -5, 4, 2.5 of 5 finite values
    assert out["nonfinite"].item() == pytest.approx(2 / 7)
    h = out["hist"].tolist()
    assert h[0] == 1 and h[-1] == 1 and sum(h) == 5


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_on_the_edges_are_binned_like_numpy(dtype):
    """numpy's convention: bins are [e_i, e_i+1), the last one closed; x == lo is inside,
    x == hi is in the last bin; only x < lo / x > hi go to under/overflow."""
    edges = np.linspace(-4.0, 4.0, 17)
    values = np.concatenate([edges, edges[:3], [edges[-1]], [-4.5, 4.5, np.nan, np.inf, -np.inf]])
    x = torch.from_numpy(values).to(dtype)[:, None]
    s = ActivationStatistics(edges, 1)
    s.update(x)
    fin = values[np.isfinite(values)]
    inner, _ = np.histogram(fin, edges)
    expected = [int(np.sum(fin < edges[0])), *inner.tolist(), int(np.sum(fin > edges[-1]))]
    assert s.compute()["hist"].tolist() == expected
    assert expected[0] == 1 and expected[-1] == 1 and expected[1] == 2 and expected[-2] == 3


def test_non_uniform_hist_edges_are_rejected_not_binned_as_uniform():
    # The histogram is binned with torch.histc (uniform bins): uneven edges would be binned
    # wrongly, so they are refused up front.
    with pytest.raises(ValueError, match="evenly spaced"):
        ActivationStatistics(np.array([-1.0, 0.0, 0.1, 5.0]), 1)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _named(value) -> str:
    return re.escape(repr(value))


@pytest.mark.parametrize(
    "edges",
    [
        [],
        [1.0],
        [0.0, 0.0],
        [1.0, 0.0],
        [0.0, 2.0, 1.0],
        [[0.0, 1.0], [2.0, 3.0]],
        [0.0, math.nan, 1.0],
    ],
)
def test_bad_hist_edges(edges):
    with pytest.raises(ValueError, match="hist_edges") as err:
        ActivationStatistics(edges, 1)
    assert repr(np.asarray(edges, dtype=np.float64)) in str(err.value)


@pytest.mark.parametrize("edges", [[-math.inf, 0.0, math.inf], [0.0, 1.0, math.inf]])
def test_infinite_hist_edges_rejected_at_construction(edges):
    with pytest.raises(ValueError, match="hist_edges"):
        ActivationStatistics(edges, 1)


@pytest.mark.parametrize("q", [[], [1.5], [-0.1], [math.nan], [[0.5]], 0.5])
def test_bad_quantiles(q):
    with pytest.raises(ValueError, match="quantiles") as err:
        ActivationStatistics(np.linspace(0, 1, 3), 1, quantiles=q)
    assert repr(q) in str(err.value)


@pytest.mark.parametrize("cap", [0, 1, -5, 2.5, "100", True])
def test_bad_quantile_sample(cap):
    with pytest.raises(ValueError, match=f"quantile_sample.*{_named(cap)}"):
        ActivationStatistics(np.linspace(0, 1, 3), 1, quantile_sample=cap)


def test_compute_before_update():
    with pytest.raises(ValueError, match="before any update"):
        ActivationStatistics(np.linspace(0, 1, 3), 1).compute()


def test_unit_count_change_between_updates():
    s = ActivationStatistics(np.linspace(0, 1, 3), 1)
    s.update(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"2 units.*5"):
        s.update(torch.randn(4, 2))
    # the earlier state is intact
    assert s.calls == 1 and s.compute()["mean"].shape == (5,)


def test_unit_dim_out_of_range_and_sampling_without_generator():
    with pytest.raises(ValueError, match="unit_dim 2"):
        ActivationStatistics(np.linspace(0, 1, 3), 2).update(torch.randn(4, 5))
    with pytest.raises(ValueError, match="generator"):
        summarize(torch.randn(10, 2), 1, hist_edges=np.linspace(0, 1, 3), sample_rate=0.5)


def test_one_dimensional_tensor_each_value_is_a_unit():
    """``[features]`` tensors (unit_dim 0, sites.default_unit_dim's rule for 1-D): one value per
    unit, so mean = the value, var = 0, count = 1."""
    x = torch.tensor([1.0, -2.0, 3.0, math.nan])
    s = ActivationStatistics(np.linspace(-4, 4, 9), 0, quantiles=QUANTILES, quantile_sample=None)
    s.update(x)
    s.update(x)
    out = s.compute()
    ref = reference(np.stack([x.double().numpy()] * 2, axis=1), np.linspace(-4, 4, 9), None)
    assert_matches_reference(out, ref, torch.float32, "1-D")


# --------------------------------------------------------------------------------------------
# The CPU fast path (numpy, exact mode) agrees with the generic torch path
# --------------------------------------------------------------------------------------------


def test_numpy_histogram_twin_bins_like_torch_histc_to_the_bit():
    from icstools.functional.exact import _histogram_numpy
    from icstools.functional.statistics import _histogram

    rng = np.random.default_rng(0)
    for _ in range(300):
        lo = float(rng.normal())
        hi = lo + float(rng.uniform(1e-3, 10))
        edges = np.linspace(lo, hi, int(rng.integers(1, 70)) + 1)
        e32 = edges.astype(np.float32)
        x = np.concatenate(
            [
                rng.uniform(lo - 1, hi + 1, 50),
                edges,
                np.nextafter(e32, np.float32(np.inf)),
                np.nextafter(e32, np.float32(-np.inf)),
            ]
        ).astype(np.float32)
        np.testing.assert_array_equal(
            _histogram_numpy(x, edges), _histogram(torch.from_numpy(x), edges).numpy()
        )


def test_batched_numpy_fold_equals_per_site_torch_reduction():
    from icstools.functional.statistics import compute_many, summarize

    gen = torch.Generator().manual_seed(3)
    edges = np.linspace(-3, 3, 13)
    xs = [torch.randn(40, w, generator=gen) * (1 + i) + i for i, w in enumerate((5, 7, 3))]
    stats = [ActivationStatistics(edges, 1, sat_threshold=1.5) for _ in xs]
    for s, x in zip(stats, xs, strict=True):
        s.update(x)
    batched = compute_many(stats)  # exact mode, folded together with numpy
    for x, out in zip(xs, batched, strict=True):
        ref = summarize(x.double(), 1, hist_edges=edges, sat_threshold=1.5)  # torch, float64
        n = x.shape[0]
        np.testing.assert_allclose(out["mean"], ref.mean, rtol=1e-6)
        np.testing.assert_allclose(out["var"], ref.m2 / n, rtol=1e-5)
        np.testing.assert_allclose(
            out["skew"], (ref.m3 / n) / (ref.m2 / n) ** 1.5, rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            out["kurt"], (ref.m4 / n) / (ref.m2 / n) ** 2 - 3, rtol=1e-4, atol=1e-6
        )
        np.testing.assert_array_equal(out["hist"], ref.hist)
        np.testing.assert_array_equal(out["sat_frac"] * n, ref.n_sat)
        np.testing.assert_allclose(
            out["quantile_value"],
            np.quantile(x.numpy(), DEFAULT_QUANTILES, axis=0).T,
            rtol=1e-6,
            atol=1e-6,
        )


# --------------------------------------------------------------------------------------------
# The declared state: every field merges, travels to the host and is finished by name
# --------------------------------------------------------------------------------------------


def _moment_group(cls) -> list[str]:
    return [f.name for f in cls.FIELDS if f.reduce == "moments"]


def _awkward_block(rng: np.random.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n, 6]``: no finite value in unit 0's first half (an empty side for min/max and the
    moments), ±inf in unit 1, zeros in unit 2, saturated values in 3, skewed 4, constant 5."""
    a = rng.normal(0.5, 2.0, (n, 6))
    a[: n // 2, 0] = np.nan
    a[rng.random(n) < 0.2, 1] = np.inf
    a[rng.random(n) < 0.2, 1] = -np.inf
    a[rng.random(n) < 0.4, 2] = 0.0
    a[:, 3] *= 5
    a[:, 4] = rng.exponential(3.0, n)
    a[:, 5] = 1.25
    return torch.from_numpy(a).to(dtype)


def _assert_close_per_unit(got, want, rtol: float, atol: np.ndarray, what: str) -> None:
    """``|got - want| <= atol[u] + rtol·|want|`` for every unit ``u`` (NaN where NaN)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all(), f"{what}: NaN at {np.isnan(got)}, want {nan}"
    err = np.abs(np.where(nan, 0, got - want))
    bad = err > atol + rtol * np.abs(np.where(nan, 0, want))
    assert not bad.any(), f"{what}: units {np.flatnonzero(bad)} off by {err[bad]}: {got} {want}"


def _random_tree_merge(states: list, merge, rng: np.random.Generator):
    """Merge ``states`` pairwise in a random order and pairing (not only a left fold)."""
    states = list(states)
    while len(states) > 1:
        i, j = rng.choice(len(states), size=2, replace=False)
        merged = merge(states[i], states[j])
        states = [s for k, s in enumerate(states) if k not in (i, j)] + [merged]
    return states[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(6))
def test_merge_of_random_splits_equals_one_pass_in_every_declared_field(dtype, seed):
    rng = np.random.default_rng(seed)
    n = 97
    x = _awkward_block(rng, n, dtype)
    edges = np.linspace(-6, 6, 9)
    kw = dict(hist_edges=edges, sat_threshold=3.0)
    # the first chunk has no finite value of unit 0; repeated cuts give chunks without rows
    cuts = [rng.integers(1, n // 2), *rng.integers(0, n + 1, size=rng.integers(1, 6))]
    bounds = [0, *sorted(cuts), n]
    chunks = [x[s:e] for s, e in itertools.pairwise(bounds)] + [x[:0]]
    merged = _random_tree_merge([summarize(c, 1, **kw) for c in chunks], merge_states, rng)
    one = summarize(x, 1, **kw)
    assert merged.calls == len(chunks)

    finite = np.where(np.isfinite(unit_rows(x, 1)), np.abs(unit_rows(x, 1)), 0)
    scale = finite.max(1)  # per unit
    tol = 1e-7 if dtype == torch.float32 else 1e-14  # both sides sum in float64
    group = _moment_group(StatisticsState)

    def exact(name, got, want):
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=name)
        assert got.dtype == want.dtype, name

    def same_multiset(name, got, want):  # concatenation: the rows of all chunks, any order
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_array_equal(np.sort(got.numpy(), 0), np.sort(want.numpy(), 0), name)

    def moments(name, got, want):
        p = group.index(name)  # 0: the count, 1: the mean, p >= 2: the central sum M_p
        if p == 0:
            return exact(name, got, want)
        atol = tol * scale**p * (1 if p == 1 else n)  # per unit
        _assert_close_per_unit(got, want, tol, atol, name)

    check = {"sum": exact, "min": exact, "max": exact, "cat": same_multiset, "moments": moments}
    for f in StatisticsState.FIELDS:  # a field with an unknown reduction fails here
        check[f.reduce](f.name, getattr(merged, f.name), getattr(one, f.name))
    assert np.isfinite(merged.min[0].item()) and merged.count[0] == (n + 1) // 2


def test_every_declared_field_is_merged_transferred_and_finished():
    names = [f.name for f in StatisticsState.FIELDS]
    for cls in (StatisticsState, GradientStatistics):
        declared = [f.name for f in cls.FIELDS]
        assert len(set(declared)) == len(declared), cls
        assert {f.reduce for f in cls.FIELDS} <= {"sum", "min", "max", "cat", "moments"}
        assert 3 <= len(_moment_group(cls)) <= 5  # count, mean, M2 [, M3, M4]
    with pytest.raises(ValueError, match="unknown reduction"):
        StateField("n_neg", "mean")
    # the state holds exactly the declared fields (and its bookkeeping), no other
    assert set(StatisticsState.__slots__) == {*names, "calls", "sample_sorted"}
    x = _awkward_block(np.random.default_rng(0), 40, torch.float32)
    edges = np.linspace(-6, 6, 9)
    a = summarize(x[:25], 1, hist_edges=edges, sat_threshold=3.0)
    b = summarize(x[25:], 1, hist_edges=edges, sat_threshold=3.0)
    with pytest.raises(TypeError, match=r"missing \['hist'\]"):
        StatisticsState(**{k: v for k, v in a.fields().items() if k != "hist"})
    with pytest.raises(TypeError, match=r"unknown \['n_neg'\]"):
        StatisticsState(**a.fields(), n_neg=a.n_zero)
    empty = StatisticsState.empty(6, bins=8, dtype=torch.float32, device="cpu")
    assert list(empty.fields()) == names

    # merge: every declared field, from both sides
    assert set(merge_fields(StatisticsState.FIELDS, a, b)) == set(names)

    # host transfer: every declared field by name (the sample as its quantile values)
    stats = ActivationStatistics(edges, 1, sat_threshold=3.0, quantile_sample=None)
    stats.update(x[:, 2:5])  # finite, not constant: every finished statistic is a number
    parts = stats._device_parts()
    assert list(parts) == names
    host = {k: v.numpy() for k, v in parts.items()}

    # finish: each declared field changes the result
    base = _finish(host, compute_dtype=torch.float32)
    assert all(np.isfinite(v).all() for v in base.values())
    for name in names:
        changed = _finish({**host, name: host[name] + 1}, compute_dtype=torch.float32)
        assert any(changed[k].tobytes() != base[k].tobytes() for k in base), (
            f"field {name!r} does not reach the statistics"
        )

    # GradientStatistics: merge and the final statistics cover n, mean and M2 the same way
    g = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    ga, gb = GradientStatistics(1), GradientStatistics(1)
    ga.update(g[:5])
    gb.update(g[5:])
    grad_names = [f.name for f in GradientStatistics.FIELDS]
    assert set(merge_fields(GradientStatistics.FIELDS, ga, gb)) == set(grad_names)
    base_g = ga.compute()
    for name in grad_names:
        other = GradientStatistics(1)
        other.merge(ga)
        setattr(other, name, getattr(ga, name) + 1)
        out = other.compute()
        assert any(not torch.equal(out[k], base_g[k]) for k in base_g), name
    ga.reset()
    assert [getattr(ga, n) for n in grad_names] == [0, None, None]


@pytest.mark.parametrize("seed", range(5))
def test_gradient_merge_of_random_splits_equals_one_pass(seed):
    rng = np.random.default_rng(seed)
    # [batch, 4, 3]: units on the last dimension, at three scales
    g = torch.from_numpy(rng.normal(0.3, 2.0, (57, 4, 3)) * [1e-3, 1.0, 1e3]).float()
    cuts = np.sort(rng.integers(1, 57, size=rng.integers(1, 6)))
    chunks = [g[s:e] for s, e in itertools.pairwise([0, *cuts.tolist(), 57]) if e > s]
    ranks = [GradientStatistics(-1) for _ in range(rng.integers(1, 4) + 1)]  # some stay empty
    for c in chunks:
        ranks[rng.integers(len(ranks))].update(c)

    def merge(a, b):
        a.merge(b)
        return a

    merged = _random_tree_merge(ranks, merge, rng)
    one = GradientStatistics(-1)
    one.update(g)
    rows = g.double().reshape(-1, 3).numpy()
    scale = np.abs(rows).max(0)
    m = rows.shape[0]
    atol = {"mean": 1e-6 * scale, "m2": 1e-6 * m * scale**2}  # float32 gradients
    for f in GradientStatistics.FIELDS:
        got, want = getattr(merged, f.name), getattr(one, f.name)
        if f.name == "n":
            assert got == want == m
        else:
            _assert_close_per_unit(got, want, 1e-6, atol[f.name], f.name)
    out = merged.compute()
    mean = rows.mean(0)
    _assert_close_per_unit(out["grad_mean"], mean, 1e-6, atol["mean"], "grad_mean")
    _assert_close_per_unit(out["grad_var"], rows.var(0), 1e-6, atol["m2"] / m, "grad_var")
    np.testing.assert_allclose(out["grad_unit_norm"], np.sqrt((rows**2).sum(0)), rtol=1e-6)
    np.testing.assert_allclose(out["grad_norm"], np.sqrt((rows**2).sum()), rtol=1e-6)

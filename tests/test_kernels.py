"""The compiled kernels (:mod:`icstools.functional.kernels`) against float64 numpy references
and against the eager paths they replace, and the switch that turns them off.

The hypothesis tests of :mod:`tests.test_statistics` run both paths through the public
statistics against numpy/scipy; here each kernel is checked on its own, field by field.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icstools.functional import kernels
from icstools.functional.fused import fused_state
from icstools.functional.gradient_statistics import GradientStatistics

pytestmark = pytest.mark.skipif(not kernels.ENABLED, reason=str(kernels.unavailable_reason()))


@st.composite
def blocks(draw: st.DrawFn) -> np.ndarray:
    """float32 ``[pre, units, post]`` with some zeros, large offsets and non-finite values."""
    shape = tuple(draw(st.integers(1, n)) for n in (9, 6, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(
        draw(st.sampled_from([0.0, 3.0, 1e4])), draw(st.sampled_from([1e-3, 1.0, 50.0])), shape
    )
    x = x.astype(np.float32)
    for _ in range(draw(st.integers(0, 3))):
        idx = tuple(int(rng.integers(0, n)) for n in shape)
        x[idx] = draw(st.sampled_from([0.0, np.nan, np.inf, -np.inf]))
    return x


def _reference(x: np.ndarray, lo: float, hi: float, bins: int, thr: float) -> dict[str, np.ndarray]:
    """The site's fields in float64 numpy, unit by unit (histc's float32 bins)."""
    out: dict[str, list] = {f"abs_{k}": [] for k in ("mean", "m1", "m2", "m3", "m4")}
    out |= {k: [] for k in ("count", "mean", "m2", "m3", "m4", "min", "max", "n_sat", "n_zero")}
    hist = np.zeros(bins + 2, np.int64)
    for u in range(x.shape[1]):
        v = x[:, u, :].reshape(-1)
        f = v[np.isfinite(v)]
        d = f.astype(np.float64) - (f.astype(np.float64).mean() if f.size else 0.0)
        out["count"].append(f.size)
        out["mean"].append(f.astype(np.float64).mean() if f.size else np.nan)
        out["abs_m1"].append(np.abs(d).sum())
        for k in (2, 3, 4):
            out[f"m{k}"].append((d**k).sum())
            out[f"abs_m{k}"].append((np.abs(d) ** k).sum())
        out["abs_mean"].append(np.abs(f.astype(np.float64)).mean() if f.size else 0.0)
        out["min"].append(f.min() if f.size else np.inf)
        out["max"].append(f.max() if f.size else -np.inf)
        out["n_sat"].append(int((np.abs(f) > thr).sum()))
        out["n_zero"].append(int((v == 0).sum()))
        t = np.float32
        for value in f:
            if value < t(lo):
                hist[0] += 1
            elif value > t(hi):
                hist[-1] += 1
            else:
                k = int((value - t(lo)) * t(bins) / (t(hi) - t(lo)))
                hist[min(max(k, 0), bins - 1) + 1] += 1
    ref = {k: np.asarray(v) for k, v in out.items()}
    ref["hist"] = hist
    return ref


@settings(max_examples=60, deadline=None)
@given(x=blocks(), bins=st.integers(1, 12), thr=st.sampled_from([0.5, 2.0, math.inf]))
def test_site_moments_match_a_float64_reference(x: np.ndarray, bins: int, thr: float) -> None:
    got = kernels.site_moments(x, (-2.0, 6.0, bins), None if math.isinf(thr) else thr)
    ref = _reference(x, -2.0, 6.0, bins, thr)
    for k in ("count", "n_sat", "n_zero", "hist", "min", "max"):
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    np.testing.assert_array_equal(got["total"], np.full(x.shape[1], x.shape[0] * x.shape[2]))
    for k in ("mean", "m2", "m3", "m4"):
        # float64 sums of float32 data: a few ulps of the sum of the terms' magnitudes, plus
        # what a few ulps of error in the mean move a central sum by (d/dmean m_k = -k m_k-1)
        err = np.abs(got[k] - ref[k])
        bound = 1e-12 * ref["abs_" + k] + 1e-9 * np.abs(ref[k])
        if k != "mean":
            order = int(k[1])
            bound += order * 1e-14 * ref["abs_mean"] * ref[f"abs_m{order - 1}"]
        ok = (err <= bound) | (np.isnan(got[k]) & np.isnan(ref[k]))
        assert ok.all(), f"{k}: {got[k][~ok]} vs {ref[k][~ok]}"


@settings(max_examples=40, deadline=None)
@given(x=blocks(), bins=st.integers(1, 12))
def test_site_moments_equal_the_eager_reduction(x: np.ndarray, bins: int) -> None:
    """Counts, extremes and bins to the bit; moments within the eager path's float32 error."""
    got = kernels.site_moments(x, (-2.0, 6.0, bins), 2.0)
    want = {
        k: v.numpy()
        for k, v in fused_state(torch.from_numpy(x), (-2.0, 6.0, bins), 2.0, mode="eager").items()
    }
    for k in ("count", "total", "n_sat", "n_zero", "hist", "min", "max"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    spread = np.nan_to_num(np.abs(got["max"].astype(np.float64)), posinf=0.0, neginf=0.0)
    np.testing.assert_allclose(
        got["mean"], want["mean"], rtol=1e-5, atol=1e-5 * spread.max() + 1e-30
    )


@settings(max_examples=60, deadline=None)
@given(x=blocks(), bins=st.integers(1, 12), thr=st.sampled_from([0.5, 2.0, math.inf]))
def test_rows_moments_give_the_bits_of_site_moments(x: np.ndarray, bins: int, thr: float) -> None:
    """The same values with the units innermost ([pre, post, units] as [positions, units]):
    every field equal to the bit, the non-finite values and zeros included."""
    t = None if math.isinf(thr) else thr
    rows = np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(-1, x.shape[1])
    got = kernels.rows_moments(rows, (-2.0, 6.0, bins), t)
    want = kernels.site_moments(x, (-2.0, 6.0, bins), t)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes(), (k, got[k], v)


@pytest.mark.parametrize("fill", [0.0, math.nan, math.inf, -math.inf, 6.0, -2.0, 1e30])
def test_rows_moments_bin_the_edges_and_extremes_as_torch_histc(fill: float) -> None:
    """Values on the outer edges, beyond them and non-finite: the bins of torch.histc (finite
    values) with the under/overflow bins, as site_moments counts them."""
    x = np.linspace(-3.0, 7.0, 41, dtype=np.float32).reshape(41, 1).repeat(3, 1)  # [41, 3]
    x[::5, 1] = fill
    got = kernels.rows_moments(np.ascontiguousarray(x), (-2.0, 6.0, 8), 1.0)
    finite = x[np.isfinite(x)]
    inner = torch.histc(torch.from_numpy(finite), bins=8, min=-2.0, max=6.0).long().numpy()
    want = [int((finite < -2.0).sum()), *inner.tolist(), int((finite > 6.0).sum())]
    assert got["hist"].tolist() == want
    np.testing.assert_array_equal(got["count"], np.isfinite(x).sum(0))


def test_rows_moments_refuse_what_they_cannot_read() -> None:
    with pytest.raises(
        ValueError, match=r"C-contiguous float32 \[positions, units\], got float32 "
    ):
        kernels.rows_moments(np.ones((4, 3), np.float32).T, (0.0, 1.0, 2), None)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 300),
    rows=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    specials=st.lists(
        st.sampled_from(
            [0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1e-45, -1e-45, 3.4e38]
        ),
        max_size=8,
    ),
)
def test_the_radix_sort_orders_rows_as_numpy(n: int, rows: int, seed: int, specials) -> None:
    """Rows with signed zeros, subnormals, infinities and NaN: numpy's order (NaN last, a
    -0.0 and a 0.0 equal either way)."""
    rng = np.random.default_rng(seed)
    a = (rng.normal(0, 10, (rows, n)) * rng.choice([1e-30, 1.0, 1e30], (rows, n))).astype(
        np.float32
    )
    for k, v in enumerate(specials):
        a[k % rows, int(rng.integers(0, n))] = v
    was, kernels.RADIX_MIN = kernels.RADIX_MIN, 1  # the radix sort for every row length
    try:
        got = kernels.sort_rows(a)
    finally:
        kernels.RADIX_MIN = was
    np.testing.assert_array_equal(got, np.sort(a, axis=1))  # NaN equal to NaN, -0.0 to 0.0
    assert got.dtype == np.float32 and a.shape == got.shape


def test_a_quantile_sample_is_sorted_by_the_radix_kernel() -> None:
    a = np.random.default_rng(5).normal(size=(3, 8192)).astype(np.float32)
    assert a.shape[1] >= kernels.RADIX_MIN
    np.testing.assert_array_equal(kernels.sort_rows(a), np.sort(a, axis=1))
    assert "radix" in kernels.COMPILE_SECONDS
    with pytest.raises(ValueError, match=r"sort_rows takes \[rows, n\], got shape \(4,\)"):
        kernels.sort_rows(np.ones(4, np.float32))


def test_block_fields_match_the_numpy_fold() -> None:
    from icstools.functional import exact

    rng = np.random.default_rng(4)
    a = rng.normal(0.5, 2.0, (60, 13)).astype(np.float32)
    a[3, 2] = 0.0
    widths, edges = [5, 8], [np.linspace(-4, 4, 17), np.linspace(-1, 9, 6)]
    fields, hists = kernels.block_fields(a, widths, edges, [1.0, math.inf])
    want, _ = exact._fold_numpy(a)
    for k in ("mean", "m2", "m3", "m4"):
        np.testing.assert_allclose(fields[k], want[k], rtol=1e-9, atol=1e-12, err_msg=k)
    np.testing.assert_array_equal(fields["n_zero"], want["n_zero"])
    want_hists = exact._histograms_numpy(a, widths, edges)
    for h, w in zip(hists, want_hists, strict=True):
        np.testing.assert_array_equal(h, w)
    np.testing.assert_array_equal(fields["n_sat"][:5], (np.abs(a[:, :5]) > 1.0).sum(0))
    assert not fields["n_sat"][5:].any()


@pytest.mark.parametrize("shape", [(4, 3, 6), (60, 100, 1), (1, 2, 1)])
def test_gradient_statistics_equal_their_eager_path(shape: tuple[int, ...]) -> None:
    g = torch.from_numpy(np.random.default_rng(1).normal(1e3, 1.0, shape).astype(np.float32))
    fast, eager = GradientStatistics(1), GradientStatistics(1)
    fast.update(g)
    was, kernels.ENABLED = kernels.ENABLED, False
    try:
        eager.update(g)
    finally:
        kernels.ENABLED = was
    rows = g.numpy().transpose(0, 2, 1).reshape(-1, shape[1]).astype(np.float64)
    assert fast.n == eager.n == rows.shape[0]
    np.testing.assert_allclose(fast.mean.numpy(), rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        fast.m2.numpy(), ((rows - rows.mean(0)) ** 2).sum(0), rtol=1e-9, atol=1e-9
    )
    np.testing.assert_allclose(eager.m2.numpy(), fast.m2.numpy(), rtol=1e-3)


def test_a_nonfinite_gradient_propagates() -> None:
    g = torch.ones(4, 3)
    g[1, 2] = math.nan
    s = GradientStatistics(1)
    s.update(g)
    out = s.compute()
    mean = out["grad_mean"].numpy()
    assert np.isnan(mean[2]) and np.isfinite(mean[:2]).all()
    assert math.isnan(float(out["grad_norm"]))


def test_the_kernels_report_their_first_call_and_can_be_switched_off() -> None:
    kernels.site_moments(np.ones((2, 2, 2), np.float32), (0.0, 1.0, 2), None)
    assert kernels.COMPILE_SECONDS["site"] >= 0
    code = "from icstools.functional import kernels as k; print(k.ENABLED, k.unavailable_reason())"
    env = {"ICSTOOLS_KERNELS": "0", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False ICSTOOLS_KERNELS=0 in the environment"


def test_bad_input_is_refused_with_what_was_given() -> None:
    with pytest.raises(ValueError, match=r"float32 \[pre, units, post\], got float64"):
        kernels.site_moments(np.ones((2, 2, 2)), (0.0, 1.0, 2), None)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        kernels.unit_mean_m2(np.ones((2, 2), np.float32))


def test_a_site_split_over_threads_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(2).normal(0.3, 2.0, (16, 7, 33)).astype(np.float32)
    x[3, 4, 5] = np.nan
    whole = kernels.site_moments(x, (-3.0, 3.0, 9), 1.5)
    monkeypatch.setattr(kernels, "SPLIT_VALUES", 1)
    monkeypatch.setattr(kernels, "_threads", lambda: 3)
    assert kernels._parts(x.size, 7) == [(0, 2), (2, 5), (5, 7)]
    split = kernels.site_moments(x, (-3.0, 3.0, 9), 1.5)
    for k, v in whole.items():
        np.testing.assert_array_equal(split[k], v, err_msg=k)
    monkeypatch.setattr(kernels, "SPLIT_VALUES", 1 << 40)
    whole_grad = kernels.unit_mean_m2(x)
    monkeypatch.setattr(kernels, "SPLIT_VALUES", 1)
    for a, b in zip(kernels.unit_mean_m2(x), whole_grad, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_numba_that_fails_to_import_switches_the_kernels_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from icstools.functional.statistics import summarize

    monkeypatch.setattr(kernels, "_LOADED", False)
    monkeypatch.setattr(kernels, "ENABLED", True)
    monkeypatch.setattr(kernels, "_REASON", None)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="numba failed to import"):
        s = summarize(x, 1, hist_edges=np.linspace(-3, 3, 7))
    assert not kernels.ENABLED and "import of numba halted" in str(kernels.unavailable_reason())
    # the eager path's float32 sums: within float32 rounding of the values' magnitude
    np.testing.assert_allclose(s.mean.numpy(), x.double().mean(0).numpy(), rtol=0, atol=1e-6)

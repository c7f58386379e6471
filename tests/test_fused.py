"""The fused reduction of a site's statistics: compiled against eager, eager against the
reference path, the fallback when compiling fails, and the recorder's ``fused=`` keyword.

The hypothesis test of :mod:`tests.test_statistics` checks the eager fused reduction against
numpy/scipy over shapes and dtypes; here the compiled one is checked against it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import icstools.functional.fused as fused_mod
from icstools import Recorder
from icstools.experiments.models import small_cnn
from icstools.functional.fused import COMPILE_SECONDS, fused_state
from icstools.functional.statistics import summarize

STATS = ("mean", "var", "skew", "kurt", "min", "max", "zero_frac", "quantile_value", "count")


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 5, 7, generator=g) * 3 + 1
    a[0, 1, 2], a[2, 3, 0], a[1, 1, 1] = math.nan, math.inf, 0.0
    b = torch.rand(4, 5, 7, generator=g, dtype=torch.float64).pow(3) * 1e3
    return [a, b]


@pytest.mark.slow  # inductor compiles two shapes: ~30-60 s on 2 busy cores
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_equals_eager_within_float_tolerance() -> None:
    for x in _tensors():
        eager = fused_state(x, (-2.0, 6.0, 16), 2.5, mode="eager")
        compiled = fused_state(x, (-2.0, 6.0, 16), 2.5, mode="compile")
        assert fused_mod.compile_failure() is None
        for k, v in eager.items():
            c = compiled[k]
            assert c.dtype == v.dtype and c.shape == v.shape, k
            if v.is_floating_point():
                torch.testing.assert_close(c, v, rtol=1e-5, atol=1e-6 * v.abs().max().item())
            else:
                assert torch.equal(c, v), k
    assert len(COMPILE_SECONDS) >= 2 and all(s > 0 for s in COMPILE_SECONDS.values())


def test_eager_fused_equals_the_reference_path() -> None:
    for x in _tensors():
        edges = np.linspace(-2.0, 6.0, 17)
        ref = summarize(x, 1, hist_edges=edges, sat_threshold=2.5)
        got = summarize(x, 1, hist_edges=edges, sat_threshold=2.5, fused="eager")
        for k, v in ref.fields().items():
            g = getattr(got, k)
            if k == "sample":
                torch.testing.assert_close(g, v, rtol=0, atol=0, equal_nan=True)
            elif v.is_floating_point():
                scale = float(v.abs().nan_to_num(posinf=0).max())
                torch.testing.assert_close(g, v, rtol=1e-5, atol=1e-6 * scale, equal_nan=True)
            else:
                assert torch.equal(g, v), k


def test_a_failing_compiler_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn, **kwargs):  # type: ignore[no-untyped-def]
        def call(*args):  # type: ignore[no-untyped-def]
            raise RuntimeError("no C++ compiler")

        return call

    monkeypatch.setattr(fused_mod, "_compiled", None)
    monkeypatch.setattr(fused_mod, "_failed", None)
    monkeypatch.setattr(torch, "compile", broken)
    x = _tensors()[0]
    got = fused_state(x, (-2.0, 6.0, 16), None, mode="compile")
    want = fused_state(x, (-2.0, 6.0, 16), None, mode="eager")
    assert "no C++ compiler" in (fused_mod.compile_failure() or "")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True)


def _record(**options: object) -> object:
    torch.manual_seed(0)
    model = small_cnn((4, 8), in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    # 8·12·12 = 1152 positions per channel > quantile_sample: reduced on arrival
    with Recorder(model, optimizer=opt, quantile_sample=256, **options) as rec:
        for _ in range(3):
            x = torch.randn(8, 1, 12, 12, generator=g)
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,), generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return rec.to_dataset()


def test_recorder_fused_records_the_same_statistics() -> None:
    ref, got = _record(), _record(fused="eager")
    # float32 sums err by ~eps times the values' magnitude, not the mean's (~0 after BN)
    magnitude = float(np.nanmax(np.abs([ref["min"].values, ref["max"].values])))
    for name in STATS:
        a, b = ref[name].values, got[name].values
        atol = 1e-6 * (magnitude if name == "mean" else np.nanmax(np.abs(a)))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol, err_msg=name)
    np.testing.assert_array_equal(got["hist"].values, ref["hist"].values)
    assert '"fused": "eager"' in got.attrs["recorder_config"]
    with pytest.raises(ValueError, match="fused must be"):
        Recorder(small_cnn((4,), in_channels=1), fused="yes")

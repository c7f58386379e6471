"""The recorder under ``torch.compile``: both orders, no graph break, eager's statistics.

Dynamo's ``aot_eager`` backend traces exactly what inductor would (graph breaks, guards,
recompiles) without generating code, so most tests use it to stay fast on 2 cores; one test
compiles with inductor (its C++ backend on CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from icstools import Recorder
from icstools.experiments.models import paper_mlp, small_cnn
from icstools.recording.errors import RecorderError

STATS = ("mean", "var", "skew", "kurt", "min", "max", "zero_frac", "sat_frac", "quantile_value")


def _mlp() -> nn.Module:
    return paper_mlp(bn=True, widths=(16, 16))


def _cnn() -> nn.Module:
    return small_cnn((4, 8), in_channels=1)


def _train(
    kind: str,
    order: str,
    *,
    steps: int = 6,
    every: int = 2,
    backend: str = "aot_eager",
    fullgraph: bool = True,
) -> tuple[object, torch.nn.Module]:
    """Train ``steps`` SGD steps recorded, the model eager or compiled in ``order``."""
    torch.manual_seed(0)
    model = _mlp() if kind == "mlp" else _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(7)
    shape = (12, 784) if kind == "mlp" else (4, 1, 8, 8)
    data = [
        (torch.randn(shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g))
        for _ in range(steps)
    ]
    fwd: nn.Module = model
    if order == "compile_then_attach":
        fwd = torch.compile(model, backend=backend, fullgraph=fullgraph)
        with torch.no_grad():
            fwd(data[0][0])  # compiled and run before the recorder exists
        rec = Recorder(fwd, optimizer=opt, every=every)
    else:
        rec = Recorder(model, optimizer=opt, every=every)
        if order == "attach_then_compile":
            fwd = torch.compile(model, backend=backend, fullgraph=fullgraph)
    with rec:
        for x, y in data:
            loss = nn.functional.cross_entropy(fwd(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss.detach())
    return rec.to_dataset(), model


def _assert_same(eager: object, compiled: object, rtol: float = 1e-5) -> None:
    assert eager.sizes == compiled.sizes
    np.testing.assert_array_equal(eager["step"].values, compiled["step"].values)
    spread = float(np.sqrt(np.nanmax(eager["var"].values)))
    for name in STATS:
        a, b = eager[name].values, compiled[name].values
        # relative to the values' scale (a BN output's mean is 0 up to rounding: its spread)
        finite = np.abs(a[np.isfinite(a)])
        scale = spread if name == "mean" else float(finite.max()) if finite.size else 1.0
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * scale, err_msg=name)
    np.testing.assert_array_equal(eager["count"].values, compiled["count"].values)
    np.testing.assert_array_equal(eager["calls"].values, compiled["calls"].values)
    np.testing.assert_allclose(compiled["loss"].values, eager["loss"].values, rtol=rtol)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("order", ["attach_then_compile", "compile_then_attach"])
def test_compiled_records_what_eager_records_without_graph_break(kind: str, order: str) -> None:
    eager, _ = _train(kind, "eager")
    counters.clear()
    compiled, _ = _train(kind, order)  # fullgraph=True: a graph break would raise
    assert dict(counters["graph_break"]) == {}
    assert eager.sizes["step"] == 3
    _assert_same(eager, compiled)


def test_a_convolution_network_stashes_channels_last_copies(monkeypatch) -> None:
    """Inductor runs a convolution network channels-last: the stash copies its 4-d site
    tensors in that format (a contiguous copy made every fused kernel transpose), and the
    statistics read them in memory order; an MLP's copies keep their format."""
    from icstools.recording import compiled as compiled_mod

    stashed: list[torch.Tensor] = []
    take = compiled_mod.SiteSwitch.take

    def spy(self):
        forwards = take(self)
        stashed.extend(x for forward in forwards for _, x in forward)
        return forwards

    monkeypatch.setattr(compiled_mod.SiteSwitch, "take", spy)
    eager, _ = _train("cnn", "eager")
    compiled, _ = _train("cnn", "attach_then_compile")
    four_d = [x for x in stashed if x.ndim == 4]
    assert four_d and all(x.is_contiguous(memory_format=torch.channels_last) for x in four_d)
    assert all(not x.is_contiguous() for x in four_d if x.shape[2] * x.shape[3] > 1)
    _assert_same(eager, compiled)
    assert compiled_mod.SiteSwitch(_mlp()).stash_format == torch.preserve_format


def test_recorded_and_plain_steps_are_two_cached_graphs() -> None:
    _train("mlp", "attach_then_compile", steps=4, every=2)
    early = counters["stats"]["unique_graphs"]
    _train("mlp", "attach_then_compile", steps=30, every=3)
    # the 30-step run compiles its own model: the same handful of graphs, none per step
    assert 0 < counters["stats"]["unique_graphs"] - early <= early
    assert early <= 4


def test_without_the_flag_guard_every_step_would_record() -> None:
    """The recorded dataset has only the scheduled steps: the switch reaches the graph."""
    ds, _ = _train("mlp", "attach_then_compile", steps=7, every=3)
    assert ds["step"].values.tolist() == [0, 3, 6]
    assert (ds["calls"].values == 1).all()


def test_compiled_eval_forwards_are_not_recorded() -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fwd = torch.compile(model, backend="aot_eager", fullgraph=True)
    with Recorder(model, optimizer=opt) as rec:
        x = torch.randn(12, 784)
        loss = fwd(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            fwd(torch.randn(5, 784) + 100)  # would change max and count
        model.train()
    ds = rec.to_dataset()
    assert (ds["count"].values == 12).all()


def test_gradients_under_compile_say_what_to_do() -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fwd = torch.compile(model, backend="aot_eager")
    rec = Recorder(model, optimizer=opt, gradients=True)
    with pytest.raises(RecorderError, match="gradients=True"), rec:
        fwd(torch.randn(12, 784)).pow(2).mean().backward()
        opt.step()
    assert not rec.attached and len(model[2]._forward_pre_hooks) == 0


@pytest.mark.slow  # inductor's C++ compile of forward and backward: ~80 s on 2 busy cores
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_matches_eager_within_float_tolerance() -> None:
    """Inductor's C++ code reorders float sums: equal within 1e-5 relative."""
    eager, _ = _train("mlp", "eager", steps=4)
    compiled, _ = _train("mlp", "attach_then_compile", steps=4, backend="inductor")
    assert dict(counters["graph_break"]) == {}
    _assert_same(eager, compiled)

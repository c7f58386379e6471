"""The measurement interface: the effective rank (a built-in added through it) against numpy,
user-defined measurements, and the errors a wrong measurement gets."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import torch
from torch import nn

import icstools
from icstools import Recorder, RecorderError
from icstools.functional.erank import CovarianceState, effective_rank
from icstools.recording.measurements import BUILTIN, Measurement
from icstools.recording.measurements.erank import EffectiveRank
from icstools.schema import Variable


def _numpy_erank(x: np.ndarray) -> float:
    """Roy & Vetterli's effective rank of the covariance of ``x [positions, units]``, by hand."""
    cov = np.cov(x.astype(np.float64), rowvar=False, ddof=0)
    lam = np.clip(np.linalg.eigvalsh(np.atleast_2d(cov)), 0, None)
    p = lam[lam > 0] / lam.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


# ----------------------------------------------------------------------- the maths
def test_effective_rank_of_known_spectra() -> None:
    assert effective_rank(np.ones(7)) == pytest.approx(7.0)
    assert effective_rank(np.array([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(np.array([1.0, 1.0, -1e-18])) == pytest.approx(2.0)  # rounding noise
    assert np.isnan(effective_rank(np.zeros(3)))
    assert np.isnan(effective_rank(np.array([1.0, np.nan])))


def test_covariance_state_merges_batches_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen) @ torch.randn(6, 6, generator=gen) + 3.0
    state = CovarianceState()
    for part in x.split([13, 100, 87]):
        state.update(part)
    np.testing.assert_allclose(
        state.covariance(), np.cov(x.double().numpy(), rowvar=False, ddof=0), rtol=1e-10
    )
    assert state.effective_rank() == pytest.approx(_numpy_erank(x.numpy()), rel=1e-10)
    with pytest.raises(ValueError, match="no rows"):
        CovarianceState().covariance()


# ----------------------------------------------------------------------- erank in the recorder
def _train(model: nn.Module, rec: Recorder, steps: int, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rec.optimizer = opt
    with rec:
        for _ in range(steps):
            x = torch.randn(16, *shape, generator=gen)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.parametrize("conv", [False, True])
def test_erank_equals_numpy_on_the_probe_values(conv: bool) -> None:
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.BatchNorm2d(5), nn.Tanh(), nn.Flatten())
        shape: tuple[int, ...] = (2, 6, 6)
    else:
        model = nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9), nn.Sigmoid(), nn.Linear(9, 4))
        shape = (6,)
    probe = torch.randn(20, *shape, generator=torch.Generator().manual_seed(2))
    positions = 20 * (16 if conv else 1)
    rec = Recorder(
        model,
        every=2,
        probe=probe,
        probe_sample=positions,  # every probe position, as raw values: the reference
        measurements=[EffectiveRank(every=4)],
    )
    _train(model, rec, 9, shape)
    ds = rec.to_dataset()
    assert ds["erank"].dims == ("step", "site")
    assert ds.step.values.tolist() == [0, 2, 4, 6, 8]
    for step in ds.step.values:
        for site in ds.site.values:
            got = float(ds["erank"].sel(step=step, site=site))
            if step % 4:
                assert np.isnan(got)  # its own schedule: every 4th step
                continue
            values = ds["probe_sample"].sel(step=step).values[:, ds.unit_site.values == site]
            assert got == pytest.approx(_numpy_erank(values), rel=1e-6)
    assert 1.0 <= float(ds["erank"].max()) <= max(ds.site_units.values)
    assert '"erank": "every(4, start=0)"' in ds.attrs["recorder_config"]


def test_erank_needs_a_probe() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh())
    with pytest.raises(RecorderError, match="'erank' measurement needs a probe"):
        Recorder(model, measurements=[EffectiveRank()])


# ----------------------------------------------------------------------- user measurements
class SiteMaxAbs(Measurement):
    """Largest |x| of each site on the training batch (a user-defined measurement)."""

    name = "site_max_abs"
    variables = (Variable("site_max_abs", ("step", "site"), "float64", "max |x| of a site"),)

    def __init__(self, every=None, shape=None) -> None:
        super().__init__(every)
        self.seen: dict[str, torch.Tensor] = {}
        self.shape = shape  # a wrong shape on purpose, for the error test

    def site(self, ctx, name, x, source) -> None:
        if source == "train" and self.due(ctx.step):
            m = x.detach().abs().max()
            self.seen[name] = torch.maximum(self.seen.get(name, m), m)

    def collect(self, ctx):
        seen, self.seen = self.seen, {}
        if self.shape is not None:
            return {"site_max_abs": np.zeros(self.shape)}
        return {"site_max_abs": ctx.layout.per_site({n: float(v) for n, v in seen.items()})}


def test_a_user_measurement_records_its_variable_on_its_schedule() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Tanh())
    seen: list[np.ndarray] = []
    hooks = [
        model[i].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().abs().max()))
        for i in (1, 3)
    ]
    rec = Recorder(model, measurements=[SiteMaxAbs(every=2)])
    _train(model, rec, 4, (4,))
    for h in hooks:
        h.remove()
    ds = rec.to_dataset()
    want = np.array([float(v) for v in seen]).reshape(4, 2)
    np.testing.assert_allclose(ds["site_max_abs"].values[[0, 2]], want[[0, 2]], rtol=1e-7)
    assert np.isnan(ds["site_max_abs"].values[[1, 3]]).all()
    assert '"measurements": ["site_max_abs"]' in ds.attrs["recorder_config"]


def test_user_measurement_errors_name_the_measurement() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
    with pytest.raises(TypeError, match="list of Measurement"):
        Recorder(model, measurements=SiteMaxAbs())
    with pytest.raises(TypeError, match="Measurement instances"):
        Recorder(model, measurements=["erank"])
    with pytest.raises(ValueError, match="already used"):
        Recorder(model, measurements=[SiteMaxAbs(), SiteMaxAbs()])

    class Clash(SiteMaxAbs):
        name = "clash"
        variables = (Variable("mean", ("step", "site"), "float64", "clashes"),)

    with pytest.raises(ValueError, match=r"declares \['mean'\]"):
        Recorder(model, measurements=[Clash()])
    rec = Recorder(model, measurements=[SiteMaxAbs(shape=(7,))])
    with pytest.raises(ValueError, match=r"'site_max_abs' returned 'site_max_abs' of shape \(7,\)"):
        _train(model, rec, 2, (4,))


def test_a_user_measurement_that_needs_an_optimizer_says_so_at_attach() -> None:
    class NeedsOpt(SiteMaxAbs):
        name = "needs_opt"
        requires = frozenset({"optimizer"})

    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
    rec = Recorder(model, measurements=[NeedsOpt()])
    with pytest.raises(RecorderError, match="'needs_opt' measurement needs optimizer="):
        rec.attach()
    assert not rec.attached


# ----------------------------------------------------------------------- registry, docs
def test_every_builtin_variable_is_declared_with_a_description_and_how() -> None:
    names = [v.name for cls in BUILTIN for v in cls.variables]
    assert len(names) == len(set(names))
    for cls in BUILTIN:
        assert cls.name and cls.__doc__, cls
        for v in cls.variables:
            assert v.description and v.how, v.name
    assert icstools.schema.variable("erank").measurement == "erank"
    with pytest.raises(KeyError, match="not a variable of the run schema"):
        icstools.schema.variable("nope")


@pytest.mark.parametrize(
    "module",
    [
        "icstools.schema",
        "icstools.functional.erank",
        "icstools.functional.kernels",
        "icstools.functional.statistics",
        "icstools.functional.exact",
        "icstools.recording.hooks",
        "icstools.recording.isolation",
        "icstools.recording.core",
        "icstools.recording.recorder",
        "icstools.recording.measurements.base",
    ],
)
def test_docstring_examples_run(module: str) -> None:
    mod = importlib.import_module(module)
    result = doctest.testmod(
        mod,
        extraglobs={"torch": torch, "nn": nn, "np": np},
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    )
    assert result.attempted > 0 and result.failed == 0

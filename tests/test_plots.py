"""Tests of icstools.plots on recorded runs (BN vs baseline, seeds), synthetic runs with known
drift, and a run that really diverges (NaN/inf)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import xarray as xr
from matplotlib.collections import PolyCollection, QuadMesh
from matplotlib.figure import Figure
from torch import nn

import icstools
from icstools import plots
from icstools.analysis.drift import site_aggregate
from icstools.analysis.metrics import last_hidden_site

STEPS, EVERY = 24, 2


def _data(seed: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.randn(4, 12, generator=torch.Generator().manual_seed(7)) * 1.5
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    return centers[y] + torch.randn(n, 12, generator=gen), y


def _mlp(bn: bool, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = 12
    for w in (16, 16):
        layers += [nn.Linear(d, w, bias=not bn), *([nn.BatchNorm1d(w)] if bn else []), nn.Sigmoid()]
        d = w
    return nn.Sequential(*layers, nn.Linear(d, 4))


def record(bn: bool, seed: int) -> xr.Dataset:
    """A small run with everything: probe samples, gradients, ICS, landscape, spectra, test_acc."""
    model = _mlp(bn, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data(seed)
    x_test, y_test = _data(99)
    rec = icstools.Recorder(
        model,
        nn.Sigmoid,
        role="input",
        every=EVERY,
        optimizer=opt,
        probe=x_test[:64],
        probe_sample=32,
        gradients=True,
        ics=4,
        landscape=4,
        jacobian=4,
        jacobian_examples=8,
        loss_fn=loss_fn,
        seed=seed,
    )
    gen = torch.Generator().manual_seed(seed)
    with rec:
        for _ in range(STEPS):
            idx = torch.randint(0, len(x), (32,), generator=gen)
            model.eval()
            with torch.no_grad():
                acc = (model(x_test).argmax(1) == y_test).float().mean()
            model.train()
            rec.set_target(y[idx])
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss, test_acc=acc)
    return rec.to_dataset()


def diverging_run() -> xr.Dataset:
    """A run whose loss and activations reach inf, then NaN (lr far too high)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e3)
    rec = icstools.Recorder(
        model, every=1, optimizer=opt, probe=torch.randn(64, 5), probe_sample=32, gradients=True
    )
    gen = torch.Generator().manual_seed(0)
    with rec:
        for _ in range(14):
            loss = (model(torch.randn(16, 5, generator=gen)) - 1e3).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
    return rec.to_dataset()


def synthetic_run(samples: np.ndarray, sites: list[str], thresholds: list[float]) -> xr.Dataset:
    """A run dataset from raw probe values ``samples [step, n, unit]`` (one probe source):
    moments, the quantile grid and the samples themselves, with ``sites`` splitting the units
    evenly."""
    n_steps, _, n_units = samples.shape
    per = n_units // len(sites)
    q = np.array([0.01, 0.05, 0.15, 0.25, 0.5, 0.75, 0.85, 0.95, 0.99])
    stats = {
        "mean": samples.mean(1),
        "var": samples.var(1),
        "min": samples.min(1),
        "max": samples.max(1),
        "sat_frac": np.zeros((n_steps, n_units)),
        "zero_frac": np.zeros((n_steps, n_units)),
    }
    data = {k: (("source", "step", "unit"), v[None]) for k, v in stats.items()}
    data["quantile_value"] = (
        ("source", "step", "unit", "quantile"),
        np.moveaxis(np.quantile(samples, q, axis=1), 0, -1)[None],
    )
    data["probe_sample"] = (("step", "sample", "unit"), samples)
    return xr.Dataset(
        data,
        coords={
            "source": ["probe"],
            "step": np.arange(n_steps) * 10,
            "unit": np.arange(n_units),
            "unit_site": ("unit", np.repeat(sites, per)),
            "unit_index": ("unit", np.tile(np.arange(per), len(sites))),
            "site": sites,
            "site_units": ("site", [per] * len(sites)),
            "sat_threshold": ("site", thresholds),
            "quantile": q,
        },
    )


@pytest.fixture(scope="module")
def runs() -> dict[str, list[xr.Dataset]]:
    return {"baseline": [record(False, s) for s in (0, 1)], "bn": [record(True, s) for s in (0, 1)]}


@pytest.fixture(scope="module")
def diverged() -> xr.Dataset:
    ds = diverging_run()
    assert ds.attrs["diverged_step"] is not None
    return ds


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Fig. 1
# --------------------------------------------------------------------------------------------


def test_fig1_accuracy_is_the_seed_mean_and_panels_show_the_last_hidden_sigmoid(runs):
    fig = plots.plot_fig1(runs)
    a, b, c = fig.axes[:3]
    for line, cond in zip(a.lines, ("baseline", "bn"), strict=True):
        accs = np.stack([ds["test_acc"].values for ds in runs[cond]])
        np.testing.assert_allclose(line.get_ydata(), accs.mean(0))
        np.testing.assert_array_equal(line.get_xdata(), runs[cond][0]["step"].values)
        assert "2 seeds" in line.get_label()
    assert sum(isinstance(c_, PolyCollection) for c_ in a.collections) == 2  # the ± sd bands
    for ax, cond, site in ((b, "baseline", "3:input"), (c, "bn", "5:input")):
        ds = runs[cond][0]
        unit = plots.typical_unit(ds, site)
        assert f"{site}, unit {unit}" in ax.get_title()
        want = ds.ics.percentiles(site, unit=unit).sel(quantile=0.5).values
        np.testing.assert_allclose(ax.lines[0].get_ydata(), want)
    assert b.get_ylim() == c.get_ylim()  # shared y-axis: the two networks compare
    assert _png(fig).startswith(b"\x89PNG")


def test_typical_unit_is_the_unit_of_median_drift_and_last_hidden_site():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 400, 5))
    shift = np.array([0.0, 3.0, 1.0, 4.0, 2.0])  # W1/σ ≈ the shift: median is unit 4
    samples = np.concatenate([base, base + shift], axis=0)
    ds = synthetic_run(samples, ["a:input"], [4.585])
    assert plots.typical_unit(ds, "a:input") == 4
    ds2 = synthetic_run(
        np.concatenate([samples] * 2, axis=2), ["h:input", "out:input"], [4.585, np.nan]
    )
    assert last_hidden_site(ds2) == "h:input"
    assert last_hidden_site(ds2.assign_coords(sat_threshold=("site", [np.nan] * 2))) == "out:input"


# --------------------------------------------------------------------------------------------
# Drift, health, gradients, ICS, landscape, spectra
# --------------------------------------------------------------------------------------------


def test_drift_heatmap_shows_the_site_median_of_the_drift(runs):
    ds = runs["baseline"][0]
    fig = plots.plot_drift_heatmap(ds)
    mesh = next(c for c in fig.axes[0].collections if isinstance(c, QuadMesh))
    want = site_aggregate(ds.ics.drift("previous", ["w1_std"]), "median")["w1_std"]
    got = np.ma.filled(mesh.get_array().reshape(len(ds.ics.sites), -1).astype(float), np.nan)
    np.testing.assert_allclose(got, want.transpose("site", "step").values, equal_nan=True)
    assert np.isnan(got[:, 0]).all()  # the first record has no previous one
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ds.ics.sites
    fig = plots.plot_drift_heatmap(ds, "ks", reference="first", how="max")
    assert "ks" in fig.axes[0].get_title() and "first" in fig.axes[0].get_title()


def test_line_plots_draw_one_line_per_site_param_layer_with_the_recorded_values(runs):
    ds = runs["bn"][0]
    sat = plots.plot_saturation(ds).axes[0]
    assert len(sat.lines) == 2
    np.testing.assert_allclose(
        sat.lines[1].get_ydata(), ds.ics.saturation().sel(site="5:input").values
    )
    dead = plots.plot_dead_units(ds).axes[0]
    assert len(dead.lines) == 2 and "0 at the last record" in dead.get_title()
    grad = plots.plot_grad_norms(ds).axes[0]
    np.testing.assert_allclose(grad.lines[0].get_ydata(), ds["grad_norm"].isel(site=0).values)
    assert grad.get_yscale() == "log"
    par = plots.plot_grad_norms(ds, "param_grad_norm").axes[0]
    assert len(par.lines) == ds.sizes["param"]
    ics = plots.plot_ics(ds).axes[0]
    measured = ds["ics_cos"].isel(layer=1).dropna("step")
    assert len(ics.lines) == ds.sizes["layer"]
    np.testing.assert_allclose(ics.lines[1].get_ydata(), measured.values)
    np.testing.assert_array_equal(ics.lines[1].get_xdata(), measured["step"].values)
    assert plots.plot_ics(ds, "ics_l2").axes[0].get_yscale() == "log"
    land = plots.plot_landscape(runs).axes[0]
    assert len(land.lines) == 2 and land.get_yscale() == "log"


def test_jacobian_spectra_are_densities_with_a_line_at_one(runs):
    fig = plots.plot_jacobian_spectra(runs)
    ax = fig.axes[0]
    assert any(np.allclose(line.get_xdata(), 1.0) for line in ax.lines)  # σ = 1
    stairs = [p for p in ax.patches if type(p).__name__ == "StepPatch"]
    assert [s.get_label() for s in stairs] == ["baseline", "bn"]
    for s in stairs:
        dens, edges = s.get_data().values, np.log10(s.get_data().edges)
        assert np.sum(dens * np.diff(edges)) == pytest.approx(1.0)
    one = plots.plot_jacobian_spectra(runs["bn"][0], blocks="all").axes[0]
    blocks = [str(b) for b in runs["bn"][0]["block"].values]
    assert [p.get_label() for p in one.patches if type(p).__name__ == "StepPatch"] == blocks
    assert ax.get_xscale() == "log"
    # the default draws the segments: every block but the whole network's
    segments = plots.plot_jacobian_spectra(runs["bn"][0]).axes[0]
    drawn = [p.get_label() for p in segments.patches if type(p).__name__ == "StepPatch"]
    assert "input->output" in blocks
    assert drawn == [b for b in blocks if b != "input->output"]
    picked = plots.plot_jacobian_spectra(runs["bn"][0], blocks=blocks[:1]).axes[0]
    assert [p.get_label() for p in picked.patches if type(p).__name__ == "StepPatch"] == blocks[:1]
    with pytest.raises(ValueError, match=r"blocks \['nope'\] do not exist"):
        plots.plot_jacobian_spectra(runs["bn"][0], blocks=["nope"])


def test_scalar_band_is_plus_minus_one_sd_and_single_seed_has_none(runs):
    fig = plots.plot_scalar(runs, "loss")
    ax = fig.axes[0]
    losses = np.stack([ds["loss"].values for ds in runs["bn"]])
    band = [c for c in ax.collections if isinstance(c, PolyCollection)][1]
    ys = band.get_paths()[0].vertices[:, 1]
    top = losses.mean(0) + losses.std(0, ddof=1)
    assert np.isclose(ys.max(), top.max())
    single = plots.plot_scalar(runs["bn"][0], "loss").axes[0]
    assert not [c for c in single.collections if isinstance(c, PolyCollection)]
    assert "1 seed" in single.lines[0].get_label()


# --------------------------------------------------------------------------------------------
# Absent variables, diverged runs, user text, arguments
# --------------------------------------------------------------------------------------------


def test_absent_variables_are_said_in_the_panel_not_raised(diverged):
    bare = diverged.drop_vars(["grad_norm", "param_grad_norm"])
    cases = {
        "ics_cos": plots.plot_ics(bare),
        "grad_norm": plots.plot_grad_norms(bare),
        "jac_sv": plots.plot_jacobian_spectra(bare),
        "beta_smoothness": plots.plot_landscape(bare),
        "test_acc": plots.plot_accuracy(bare),
    }
    for var, fig in cases.items():
        notes = plots.figure_notes(fig)
        assert len(notes) == 1 and f"'{var}' is not in" in notes[0], (var, notes)
        _png(fig)
    assert "Recorder(gradients=True)" in plots.figure_notes(cases["grad_norm"])[0]


def test_diverged_run_renders_every_plot(diverged):
    step = int(diverged.attrs["diverged_step"])
    figs = [
        plots.plot_fig1({"a": diverged, "b": [diverged]}, var="loss"),
        plots.plot_drift_heatmap(diverged),
        plots.plot_drift_heatmap(diverged, "mean_shift", reference="first"),
        plots.plot_saturation(diverged),
        plots.plot_dead_units(diverged),
        plots.plot_grad_norms(diverged),
        plots.plot_grad_norms(diverged, "update_ratio"),
        plots.plot_scalar(diverged, "loss", log=True),
    ]
    for fig in figs:
        _png(fig)
    notes = plots.figure_notes(figs[0])
    assert notes and all("non-finite from step" in n for n in notes)
    assert any(np.allclose(line.get_xdata(), step) for line in figs[1].axes[0].lines)
    nan_only = diverged.assign(loss=diverged["loss"] * np.nan)
    assert "no finite value" in plots.figure_notes(plots.plot_scalar(nan_only, "loss"))[0]


def test_user_text_cannot_break_matplotlib():
    rng = np.random.default_rng(1)
    samples = rng.normal(size=(3, 50, 4)) + np.arange(3)[:, None, None]
    ds = synthetic_run(samples, ["$x^{", "_hidden"], [4.585, 4.585])
    fig = plots.plot_saturation(ds)
    _png(fig)  # mathtext would raise on an unbalanced "$x^{"
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [r"\$x^{", " _hidden"]  # a leading "_" would hide it from the legend
    _png(plots.plot_drift_heatmap(ds))
    _png(plots.plot_percentiles(ds, "$x^{"))


def test_given_axes_are_drawn_into(runs):
    fig = Figure()
    ax1, ax2 = fig.subplots(1, 2)
    assert plots.plot_saturation(runs["bn"][0], ax=ax2) is fig
    assert len(ax2.lines) == 2 and not ax1.lines
    fig3 = Figure()
    axes = fig3.subplots(1, 3)
    assert plots.plot_fig1(runs, axes=axes) is fig3


def test_bad_arguments_raise_clear_errors(runs):
    ds = runs["bn"][0]
    with pytest.raises(TypeError, match=r"must be an xarray\.Dataset"):
        plots.plot_saturation("run.zarr")
    with pytest.raises(TypeError, match="runs must be a dataset"):
        plots.plot_scalar(3, "loss")
    with pytest.raises(ValueError, match="not a drift metric"):
        plots.plot_drift_heatmap(ds, "w2")
    with pytest.raises(ValueError, match="not a gradient variable"):
        plots.plot_grad_norms(ds, "loss")
    with pytest.raises(icstools.AnalysisError, match="does not exist"):
        plots.plot_percentiles(ds, "fc9")
    with pytest.raises(ValueError, match="axes must hold 3"):
        plots.plot_fig1(runs, axes=Figure().subplots(1, 2))
    with pytest.raises(TypeError, match="matplotlib Axes"):
        plots.plot_saturation(ds, ax="left")

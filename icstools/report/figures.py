"""The report's figures, drawn with :mod:`icstools.plots`: those of a preset (by preset name,
:func:`preset_figures`) and those of any run (:func:`run_figures`). A figure that cannot be
drawn becomes a note; the messages that panels show instead of data
(:func:`icstools.plots.figure_notes`) are repeated as notes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from icstools import plots
from icstools.analysis import AnalysisError
from icstools.analysis.metrics import identity_variables

__all__ = ["preset_figures", "run_figures", "write_figures"]

#: Errors of a figure that cannot be drawn (said in a note instead).
_FIGURE_ERRORS = (AnalysisError, ValueError, KeyError, IndexError)


def preset_figures(
    preset: str, conds: dict[str, list[xr.Dataset]], known: bool, notes: list[str]
) -> list[tuple[str, Any]]:
    """The figures of a preset's runs ``{condition: [datasets]}``: those of a known preset, or
    the test accuracy of an unknown one; each figure's notes (or why it was not drawn) are
    appended to ``notes``."""
    makers = _preset_makers(preset, conds) if conds and known else []
    if conds and not known and any("test_acc" in d.data_vars for v in conds.values() for d in v):
        makers = [("Test accuracy (mean ± sd over seeds)", lambda c=conds: plots.plot_accuracy(c))]
    figs: list[tuple[str, Any]] = []
    for title, make in makers:
        try:
            fig = make()
        except _FIGURE_ERRORS as exc:
            notes.append(f"figure '{title}' not drawn: {exc}")
            continue
        figs.append((title, fig))
        notes += [f"{title}: {n}" for n in plots.figure_notes(fig)]
    return figs


#: The paper figures :func:`write_figures` draws, by preset.
PAPER_FIGURES = {"fig1": ("baseline", "bn")}


def write_figures(preset_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the paper's figures of a preset's runs as PNG files (``icstools figures``).

    ``preset_dir`` is the folder of an ``icstools run`` (``<out>/<preset>`` with its
    ``manifest.json``); only the runs the manifest lists as finished are drawn. For ``fig1``:
    the paper's Fig. 1 (a, b, c), see :func:`icstools.plots.save_fig1`.

    Parameters
    ----------
    preset_dir : str or Path
        The preset's run folder.
    out : str or Path, optional
        Folder of the PNG files; default ``<preset_dir>/figures``.

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    FileNotFoundError
        No manifest in ``preset_dir``.
    ValueError
        A preset without paper figures, or runs missing a condition the figure needs.

    Examples
    --------
    >>> write_figures("data/runs/fig1", "docs/images")  # doctest: +SKIP
    """
    from icstools.experiments.runner import load_manifest

    manifest = load_manifest(preset_dir)
    needs = PAPER_FIGURES.get(manifest.preset)
    if needs is None:
        raise ValueError(
            f"no paper figure is drawn for preset {manifest.preset!r} ({preset_dir}); presets "
            f"with figures: {sorted(PAPER_FIGURES)}"
        )
    conds = manifest.open_runs()
    missing = [c for c in needs if c not in conds]
    if missing:
        raise ValueError(
            f"{preset_dir} has no finished run of condition(s) {missing}; it has {sorted(conds)}"
        )
    folder = Path(preset_dir) / "figures" if out is None else Path(out)
    return plots.save_fig1({c: conds[c] for c in needs}, folder)


def _preset_makers(
    preset: str, conds: dict[str, list[xr.Dataset]]
) -> list[tuple[str, Callable[[], Any]]]:
    """(title, make) of each figure of a known preset's runs."""

    def pick(*names: str) -> dict[str, list[xr.Dataset]]:
        return {n: conds[n] for n in names if n in conds}

    has = lambda var: any(var in ds.data_vars for v in conds.values() for ds in v)  # noqa: E731
    out: list[tuple[str, Callable[[], Any]]] = []
    main = {n: v for n, v in conds.items() if not n.startswith("init-")}
    if preset == "fig1" and pick("baseline", "bn"):
        out.append(
            (
                "Fig. 1: (a) test accuracy; (b, c) 15/50/85th percentiles of a typical "
                "unit of the last hidden sigmoid input",
                lambda: plots.plot_fig1(pick("baseline", "bn")),
            )
        )
    elif has("test_acc") and main:
        out.append(("Test accuracy (mean ± sd over seeds)", lambda: plots.plot_accuracy(main)))
    if has("loss") and main:
        out.append(("Training loss", lambda: plots.plot_scalar(main, "loss", log=True)))
    for cond, items in main.items():
        if "quantile_value" in items[0].data_vars:
            out.append(
                (
                    f"Drift per site, {cond} (first seed)",
                    lambda items=items: plots.plot_drift_heatmap(items[0]),
                )
            )
    if preset == "saturating":
        for cond, items in main.items():
            out.append(
                (
                    f"Saturation, {cond} (first seed)",
                    lambda items=items: plots.plot_saturation(items[0], source="train"),
                )
            )
    if has("ics_cos"):
        for cond, items in main.items():
            if "ics_cos" in items[0].data_vars:
                out.append(
                    (
                        f"Gradient ICS cos(G, G'), {cond} (first seed)",
                        lambda items=items: plots.plot_ics(items[0]),
                    )
                )
    if has("beta_smoothness"):
        out.append(("Effective β-smoothness", lambda: plots.plot_landscape(main)))
        out.append(
            (
                "Loss variation along the gradient",
                lambda: plots.plot_landscape(main, "loss_variation"),
            )
        )
    if has("jac_sv"):
        trained = {n: v for n, v in main.items() if any("jac_sv" in d.data_vars for d in v)}
        if trained:
            out.append(
                (
                    "Jacobian spectra of the segments (last record with spectra)",
                    lambda: plots.plot_jacobian_spectra(trained),
                )
            )
    scalars = sorted({str(n) for v in main.values() for ds in v for n in identity_variables(ds)})
    for name in scalars:
        out.append(
            (
                f"Logged {name}",
                lambda name=name: plots.plot_scalar(
                    {k: v for k, v in main.items() if any(name in d for d in v)}, name, log=True
                ),
            )
        )
    return out  # fmt: skip


def _has_threshold(ds: xr.Dataset) -> bool:
    return (
        "sat_threshold" in ds.coords
        and np.isfinite(np.asarray(ds["sat_threshold"].values, dtype=np.float64)).any()
    )


def run_figures(
    ds: xr.Dataset, drift: xr.Dataset | None, notes: list[str]
) -> list[tuple[str, Any]]:
    """The static diagnostic figures of one run (``drift``: its W1/σ against the previous record,
    when computed): the drift heatmap (an overview of every site at once), the landscape and the
    Jacobian spectra; the time series are the page's interactive panels. Why a figure is
    absent or not drawn, and each figure's notes, go to ``notes``."""
    figures: list[tuple[str, Any]] = []

    def add(title: str, make: Callable[[], Any]) -> None:
        try:
            fig = make()
        except _FIGURE_ERRORS as exc:
            notes.append(f"figure '{title}' not drawn: {exc}")
            return
        figures.append((title, fig))

    add(
        "Drift per site (median W1/σ vs previous record)",
        lambda: (
            plots.plot_drift_heatmap(ds, drift=drift)
            if drift is not None
            else plots.plot_drift_heatmap(ds)
        ),
    )
    # loss, accuracy, saturation, dead units, gradient norms and gradient ICS are interactive
    # panels of the page (icstools.report.interactive); these have no interactive counterpart
    if "sat_frac" in ds.data_vars and not _has_threshold(ds):
        notes.append("saturation: no site has a threshold (sigmoid/tanh inputs only)")
    if "beta_smoothness" in ds.data_vars:
        add("Landscape: effective β-smoothness", lambda: plots.plot_landscape(ds))
    if "jac_sv" in ds.data_vars:
        add("Jacobian spectra per block", lambda: plots.plot_jacobian_spectra(ds))
    for title, fig in figures:
        notes += [f"{title}: {n}" for n in plots.figure_notes(fig)]
    return figures

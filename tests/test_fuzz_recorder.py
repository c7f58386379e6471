"""Fuzzing the Recorder: arguments, model shapes, dtypes and step patterns (empty batches,
changing call counts, NaN/inf, integer sites). Every outcome must be a recorded result or one of
icstools' own errors with a message, never a raw error from inside a hook or a foreign
warning; a recorded run must hold consistent data (empty units NaN, no divergence without a
non-finite loss, the logged losses, a store that reads back what the recorder holds); and no
hook may be left behind, whatever happened. Bounded to about a minute (``max_examples``, no
deadline)."""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import icstools
from icstools import Recorder, RecorderError, SiteSelectionError
from icstools.store import StoreError, open_run

OWN_ERRORS = (RecorderError, SiteSelectionError, StoreError)
# Warnings a run may give: ours, each saying what happened and what to do.
OWN_WARNINGS = (icstools.SitesNotRecordedWarning,)


class Fuzzed(nn.Module):
    """An embedding (its integer input computed inside), a gate that may route no example to an
    expert, a module called a varying number of times, and an activation chosen by the test."""

    def __init__(self, width: int, act: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, width)
        self.inp = nn.Linear(width, width)
        self.expert = nn.Linear(width, width)
        self.shared = nn.Linear(width, width)
        self.act = {"sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "relu": nn.ReLU()}[act]
        self.out = nn.Linear(width, 3)
        self.repeats = 1
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x.abs() * 3).nan_to_num(0).long().clamp(0, 6)[:, 0]  # an integer site: emb's input
        h = self.act(self.inp(x) + self.emb(ids))  # [batch, width]
        routed = h[h[:, 0] > 10.0]  # usually no example: an expert without tokens
        h = h + self.expert(routed).sum(0) if routed.shape[0] else h
        for _ in range(self.repeats):
            h = self.act(self.shared(h))
        return self.out(h)


def _no_hooks_left(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


steps_strategy = st.lists(
    st.tuples(
        st.integers(0, 9),  # batch size (0: an empty batch)
        st.integers(0, 3),  # calls of the shared module
        st.sampled_from(["none", "nan", "inf", "eval"]),  # what else happens in the step
    ),
    min_size=1,
    max_size=6,
)


log_names = st.one_of(
    st.sampled_from(["acc", "acc/train", ".zattrs", "/abs", "a//b", "..", "mean", "step", "lr.0"]),
    st.text(alphabet="ab._-/ ", min_size=0, max_size=5),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    width=st.integers(1, 6),
    act=st.sampled_from(["sigmoid", "tanh", "relu"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    sites=st.sampled_from([None, "emb", "emb:input", ["inp", "shared"], "expert", "act"]),
    role=st.sampled_from([None, "input", "output", ("input", "output")]),
    every=st.integers(1, 3),
    calls=st.sampled_from(["pool", "separate"]),
    quantile_sample=st.sampled_from([None, 2, 5, 8192]),
    bins=st.integers(1, 8),
    probe=st.sampled_from([None, (0, 0), (1, 0), (4, 0), (4, 1)]),  # (rows, width - model's)
    gradients=st.booleans(),
    log_name=log_names,
    to_store=st.booleans(),
    steps=steps_strategy,
)
def test_every_outcome_is_a_result_or_our_error_and_no_hook_is_left(
    width, act, dtype, sites, role, every, calls, quantile_sample, bins, probe, gradients,
    log_name, to_store, steps,
) -> None:  # fmt: skip
    torch.manual_seed(0)
    model = Fuzzed(width, act, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe_x = None if probe is None else torch.randn(probe[0], width + probe[1], dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.zarr" if to_store else None
        try:
            rec = Recorder(
                model, sites, role=role, every=every, optimizer=opt, calls=calls, bins=bins,
                quantile_sample=quantile_sample, probe=probe_x, gradients=gradients, path=path,
            )  # fmt: skip
        except (*OWN_ERRORS, ValueError, TypeError) as exc:  # argument checks at construction
            assert str(exc), "an error without a message"
            event(f"construction: {type(exc).__name__}")
            _no_hooks_left(model, opt)
            return
        try:
            losses = _train(model, opt, rec, dtype, width, steps, log_name)
            ds = rec.to_dataset()
        except OWN_ERRORS as exc:
            assert str(exc), "an error without a message"
            event(f"recording: {type(exc).__name__}: {str(exc)[:60]}")
        else:
            event("recorded")
            _check_result(ds, losses)
            if path is not None:  # the store reads back what the recorder holds
                xr.testing.assert_identical(
                    open_run(path).drop_attrs(deep=False), ds.drop_attrs(deep=False)
                )
        finally:
            _no_hooks_left(model, opt)


def _train(model, opt, rec, dtype, width, steps, log_name) -> dict[int, float]:
    """The fuzzed loop: a step per entry of ``steps`` (batch size, calls, what else), logging
    the loss under ``log_name`` too. Returns the loss of every optimizer step; fails on a
    warning that is not one of icstools' own."""
    losses = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with rec:
            for step, (batch, repeats, what) in enumerate(steps):
                model.repeats = repeats
                x = torch.randn(batch, width, dtype=dtype)
                out = model(x)
                if what == "nan":
                    out = out * math.nan
                elif what == "inf":
                    out = out * math.inf
                elif what == "eval":
                    with torch.no_grad():
                        model.eval()
                        model(x)
                        model.train()
                loss = out.sum()
                losses[step] = loss.item()
                rec.log(loss=loss.detach())
                try:
                    rec.log(**{log_name: loss.detach()})
                except RecorderError as exc:  # a name that cannot be a variable: said at once
                    assert repr(log_name) in str(exc) or log_name in str(exc)
                opt.zero_grad()
                loss.backward()
                opt.step()
    foreign = [w for w in caught if not issubclass(w.category, OWN_WARNINGS)]
    assert not foreign, f"a warning that is not ours: {foreign[0].message!r}"
    return losses


def _check_result(ds: xr.Dataset, losses: dict[int, float]) -> None:
    """What any recorded run must satisfy, whatever was fuzzed."""
    assert ds.sizes["step"] >= 1
    assert set(ds["mean"].dims) == {"source", "step", "unit"}
    assert set(ds.site.values).isdisjoint(json.loads(ds.attrs["sites_not_recorded"]))
    count = ds["count"].values
    assert (count >= 0).all()
    none_finite = count == 0  # count: finite values
    assert np.isnan(ds["mean"].values[none_finite]).all()
    nonfinite = ds["nonfinite"].values
    # NaN: the unit saw no value at all (an empty batch, an expert without tokens), which is
    # neither finite nor non-finite; otherwise a share, 1 when every value was NaN/inf
    assert (none_finite | ~np.isnan(nonfinite)).all(), "a unit with values has no nonfinite"
    seen = ~np.isnan(nonfinite)
    assert ((nonfinite[seen] >= 0) & (nonfinite[seen] <= 1)).all()
    assert (nonfinite[none_finite & seen] == 1).all()
    recorded = [int(s) for s in ds.step.values]
    np.testing.assert_array_equal(ds["loss"].values, [losses[s] for s in recorded])
    if all(math.isfinite(v) for v in losses.values()):
        # nothing diverged: with finite losses, weights and activations stayed finite
        assert "diverged_step" not in ds.attrs, ds.attrs.get("diverged_step")
        assert (nonfinite[seen] == 0).all()


def test_icstools_errors_are_what_the_fuzz_test_accepts() -> None:
    assert issubclass(icstools.RecorderError, ValueError)
    with pytest.raises(RecorderError, match="nothing was recorded"):
        Recorder(nn.Sequential(nn.Linear(2, 2), nn.ReLU())).to_dataset()

"""The step lifecycle for every way a step is taken (``step()``, ``step(closure)`` with LBFGS
evaluating the closure several times, accumulation with the last micro-batch in the closure,
wrapped optimizers), and the silent traps it removes: ``to_dataset()`` in the middle of a step,
a module reused at several places, ``gradients=True`` without an optimizer, integer probes and
their Jacobian blocks, an error hidden by a later one."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import icstools
from icstools import Recorder, RecorderError
from icstools.recording.steps import unwrap_optimizer
from icstools.store import open_run

PARAM_VARS = ("param_grad_norm", "param_norm", "update_norm")


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 4, generator=gen), torch.randn(32, 1, generator=gen)


def _norms(tensors) -> np.ndarray:
    return np.array([t.detach().double().norm().item() for t in tensors])


# ---------------------------------------------------------------------------- closures
def test_lbfgs_records_the_first_closure_evaluation_of_each_step():
    x, y = _data()
    model, reference = _mlp(), _mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    rec = Recorder(model, every=1, optimizer=opt, gradients=True, probe=x[:8])
    evaluations, want = [], []
    with rec:
        for _ in range(3):

            def closure():
                evaluations.append(1)
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                rec.log(loss=loss)  # at intermediate weights after the first: ignored
                return loss

            # the reference: gradient and weights at w_t, computed apart
            ref = copy.deepcopy(model)
            nn.functional.mse_loss(ref(x), y).backward()
            before = [p.detach().clone() for p in model.parameters()]
            pre_act = ref[0](x).detach().double()  # the tanh input at w_t: [32, 8]
            first_loss = nn.functional.mse_loss(ref(x), y).item()
            opt.step(closure)
            upd = [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]
            want.append((_norms(q.grad for q in ref.parameters()), _norms(before), _norms(upd)))
            want[-1] += (pre_act.mean(0).numpy(), first_loss)
    ds = rec.to_dataset()
    assert len(evaluations) > 3 * 2  # LBFGS evaluated the closure several times per step
    assert ds.step.values.tolist() == [0, 1, 2]
    assert (ds.calls.values == 1).all()  # only the first evaluation is the step's data
    for t, (grad, weight, update, mean, loss) in enumerate(want):
        r = ds.sel(step=t)
        assert float(r["loss"]) == pytest.approx(loss, rel=1e-6)  # the first evaluation's
        np.testing.assert_allclose(r.param_grad_norm.values, grad, rtol=1e-6)
        np.testing.assert_allclose(r.param_norm.values, weight, rtol=1e-6)
        np.testing.assert_allclose(r.update_norm.values, update, rtol=1e-5)
        np.testing.assert_allclose(r["mean"].sel(source="train").values, mean, rtol=1e-5)
    # the same training without the recorder
    opt2 = torch.optim.LBFGS(reference.parameters(), lr=0.5, max_iter=4)
    for _ in range(3):

        def closure2():
            opt2.zero_grad()
            loss = nn.functional.mse_loss(reference(x), y)
            loss.backward()
            return loss

        opt2.step(closure2)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def _sgd_run(style: str) -> tuple[xr.Dataset, nn.Module]:
    """SGD with momentum, two micro-batches per step, taken as ``style``: ``plain`` (both
    before ``step()``), or ``closure`` (the second inside ``step(closure)``, as Lightning
    does with gradient accumulation)."""
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = Recorder(model, every=1, optimizer=opt, gradients=True, probe=x[:8])
    with rec:
        for t in range(3):
            halves = (x[: 16 - t], y[: 16 - t]), (x[16:], y[16:])
            opt.zero_grad()
            nn.functional.mse_loss(model(halves[0][0]), halves[0][1]).backward()

            def second_half(h=halves[1]):
                loss = nn.functional.mse_loss(model(h[0]), h[1])
                loss.backward()
                return loss

            if style == "closure":
                opt.step(second_half)
            else:
                second_half()
                opt.step()
    return rec.to_dataset(), model


def test_closure_and_accumulation_record_what_a_plain_step_records():
    plain, model_a = _sgd_run("plain")
    closure, model_b = _sgd_run("closure")
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (closure.calls.sel(source="train").values == 2).all()  # both micro-batches
    for name in (*PARAM_VARS, "mean", "var", "grad_norm", "grad_unit_norm"):
        assert np.isfinite(closure[name].values).all(), name
        np.testing.assert_array_equal(closure[name].values, plain[name].values, err_msg=name)


# ---------------------------------------------------------------------------- wrappers
class AcceleratedLike(torch.optim.Optimizer):
    """Like Accelerate's ``AcceleratedOptimizer``: a ``torch.optim.Optimizer`` subclass that
    skips ``Optimizer.__init__`` (no step hooks of its own) and wraps ``.optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)


class LightningLike:
    """Like Lightning's ``LightningOptimizer``: keeps the optimizer as ``._optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer

    def step(self, closure=None):
        return self._optimizer.step(closure)


def test_wrapped_optimizers_are_unwrapped_and_their_steps_counted():
    x, y = _data()
    model = _mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = LightningLike(AcceleratedLike(inner))
    assert unwrap_optimizer(wrapped) is inner
    rec = Recorder(model, every=1, optimizer=wrapped, gradients=True)
    assert rec.optimizer is inner
    with rec:
        for _ in range(3):
            inner.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            wrapped.step()
    ds = rec.to_dataset()
    assert ds.step.values.tolist() == [0, 1, 2] and rec.step == 3
    for name in PARAM_VARS:
        assert np.isfinite(ds[name].values).all(), name
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        Recorder(model, optimizer=object())


# ---------------------------------------------------------------------------- to_dataset
def _run_with_reads(read: bool, path) -> xr.Dataset:
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = Recorder(model, every=1, optimizer=opt, gradients=True, probe=x[:8], path=path)
    with rec:
        for t in range(4):
            out = model(x)
            if read and t > 0:
                rec.to_dataset()  # after the forward
            loss = nn.functional.mse_loss(out, y)
            opt.zero_grad()
            loss.backward()
            if read and t > 0:
                assert rec.to_dataset().step.values.tolist() == list(range(t))
                rec.flush()
            if read and t == 0:  # nothing finished yet: said, and nothing changes
                with pytest.raises(RecorderError, match="step 0 is in progress"):
                    rec.to_dataset()
            opt.step()
            rec.log(loss=loss)
    return open_run(path) if path is not None else rec.to_dataset()


@pytest.mark.parametrize("store", [False, True], ids=["memory", "store"])
def test_to_dataset_in_the_middle_of_a_step_never_changes_what_is_recorded(tmp_path, store):
    with_reads = _run_with_reads(True, tmp_path / "a.zarr" if store else None)
    without = _run_with_reads(False, tmp_path / "b.zarr" if store else None)
    ignore = ("recorder_config",)  # holds the store's path
    xr.testing.assert_identical(
        with_reads.drop_attrs(deep=False).assign_attrs(
            {k: v for k, v in with_reads.attrs.items() if k not in ignore}
        ),
        without.drop_attrs(deep=False).assign_attrs(
            {k: v for k, v in without.attrs.items() if k not in ignore}
        ),
    )
    assert with_reads.sizes["step"] == 4
    for name in (*PARAM_VARS, "loss", "grad_norm"):
        assert np.isfinite(with_reads[name].values).all(), name


# ---------------------------------------------------------------------------- shared modules
class SharedReLU(nn.Module):
    """A residual block that reuses one ReLU, as torchvision's ResNet does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.fc1(x))
        return self.relu(self.fc2(h) + 3.0)  # the second call sees other values


def _shared_run(**kwargs) -> xr.Dataset:
    torch.manual_seed(0)
    model = SharedReLU()
    rec = Recorder(model, every=1, **kwargs)
    with rec:
        for _ in range(2):
            model(torch.randn(16, 6))
            rec.step_done()
    return rec.to_dataset()


def test_a_module_called_at_several_places_is_reported_once_when_calls_is_not_given():
    with pytest.warns(icstools.SharedModuleWarning) as caught:
        pooled = _shared_run()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "relu:input (2 calls)" in message and "calls='separate'" in message
    assert (pooled.calls.sel(source="train").values == 2).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        separate = _shared_run(calls="separate")
        again = _shared_run(calls="pool")  # said on purpose: no warning
    xr.testing.assert_identical(again.drop_attrs(), pooled.drop_attrs())
    first, second = (
        float(separate["mean"].sel(source="train", step=0).where(separate.unit_site == s).mean())
        for s in ("relu:input#0", "relu:input#1")
    )
    assert second - first > 2  # two different distributions were pooled


# ---------------------------------------------------------------------------- gradients
def test_gradients_true_without_an_optimizer_is_an_error_that_says_what_it_needs():
    model = _mlp()
    rec = Recorder(model, gradients=True)
    with pytest.raises(RecorderError, match=re.escape("optimizer=")) as err:
        rec.attach()
    assert "gradients='activations'" in str(err.value)
    assert not rec.attached and not model._forward_pre_hooks
    rec = Recorder(model, gradients="activations")
    with rec:
        nn.functional.mse_loss(model(_data()[0]), _data()[1]).backward()
    ds = rec.to_dataset()
    assert np.isfinite(ds.grad_norm.values).all() and "param_norm" not in ds
    with pytest.raises(TypeError, match="gradients"):
        Recorder(model, gradients="yes")


# ---------------------------------------------------------------------------- token ids
class Tokens(nn.Module):
    """Token ids in: an embedding, then two tanh layers; takes an attention mask."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.act1 = nn.Tanh()
        self.fc = nn.Linear(8, 8)
        self.act2 = nn.Tanh()
        self.head = nn.Linear(8, 20)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.emb(input_ids)  # [batch, time, 8]
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.head(self.act2(self.fc(self.act1(h))))


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 20, (n, 5), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("as_dict", [False, True], ids=["ids", "dict"])
def test_token_id_probes_and_jacobian_blocks_from_the_first_site(as_dict):
    torch.manual_seed(0)
    model = Tokens()
    ids = _ids(6, 2)
    probe = {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if as_dict else ids
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(
        model, probe=probe, optimizer=opt, gradients=True, jacobian=1, jacobian_examples=2
    )
    with rec:
        for t in range(2):
            x = _ids(8, 10 + t)
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    ds = rec.to_dataset()
    assert ds.site.values.tolist() == ["act1:input", "act2:input"]
    assert list(ds.source.values) == ["train", "probe"]
    # the probe's statistics: the embedding rows of its ids
    emb0 = ds["mean"].sel(source="probe", step=0).where(ds.unit_site == "act1:input", drop=True)
    assert np.isfinite(emb0.values).all()
    # no Jacobian from integer inputs: the block starts at the first site
    assert ds.block.values.tolist() == ["act1:input->act2:input"]
    assert np.isfinite(ds.jac_mean_sq.values).all()
    assert json_probe_shape(ds) == [6, 5]
    with pytest.raises(RecorderError, match="integer"):
        Recorder(model, probe=ids, jacobian=1, jacobian_blocks=[("input", "act2:input")])


def json_probe_shape(ds: xr.Dataset) -> list[int]:
    import json

    return json.loads(ds.attrs["recorder_config"])["probe_shape"]


def test_an_error_at_the_probe_is_not_hidden_by_a_later_one():
    """A Jacobian block that cannot be computed fails the record's probe; closing the recorder
    afterwards must not raise a second, misleading error about that record."""
    model = _mlp()
    rec = Recorder(
        model, probe=_data()[0][:4], jacobian=1, jacobian_blocks=[("1:input", "0:input")]
    )
    rec.attach()
    with pytest.raises(ValueError, match="reached before from_site"):
        model(_data()[0])
    rec.close()  # nothing left open: no error of its own
    with pytest.raises(RecorderError, match="nothing was recorded yet"):
        rec.to_dataset()
    rec.detach()
    assert not model._forward_pre_hooks


# ---------------------------------------------------------------------------- sites
def test_hugging_face_activation_classes_are_nonlinearities_by_their_module():
    def named(name: str) -> type[nn.Module]:
        cls = type(name, (nn.Module,), {"forward": lambda self, x: x * torch.sigmoid(x)})
        cls.__module__ = "transformers.activations"
        return cls

    new_gelu, linear = named("NewGELUActivation"), named("LinearActivation")
    model = nn.Sequential(nn.Linear(3, 4), new_gelu(), nn.Linear(4, 4), linear(), nn.Linear(4, 2))
    assert [s.name for s in icstools.select_sites(model)] == ["1:input"]
    assert icstools.sites.is_nonlinearity(type("Sub", (new_gelu,), {})())
    assert not icstools.sites.is_nonlinearity(nn.Linear(2, 2))


@pytest.mark.parametrize("module", ["icstools.recording.steps", "icstools.sites"])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(
        importlib.import_module(module),
        extraglobs={"torch": torch, "nn": nn},
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    )
    assert result.attempted > 0 and result.failed == 0

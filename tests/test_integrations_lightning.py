"""The Lightning callback with a real ``lightning.Trainer`` on CPU: plain, gradient
accumulation and bf16 mixed precision; parameter statistics finite at every record, recorded
steps equal to the trainer's ``global_step`` values, training bit-identical with and without
the callback, the run under the trainer's log directory, summaries in the logger, and no hook
left after a failed fit."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")
from icstools.integrations.lightning import RecorderCallback  # noqa: E402
from icstools.store import open_run  # noqa: E402

# Lightning (with torch 2.13) warns about its own use of torch's pytree API and about a
# small CPU loader; neither is ours
pytestmark = [
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers"),
]

PARAM_VARS = ("param_grad_norm", "param_norm", "update_norm")


class Net(L.LightningModule):
    """``training_step`` calls the submodule, not ``self``: the batch is the training forward."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 3))
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the probe goes through it
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("a failing training step")
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class GlobalSteps(L.Callback):
    """The trainer's ``global_step`` at the start of every training batch, and the gradient
    and weight norms Lightning hands to ``on_before_optimizer_step`` (the reference)."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.norms: list[tuple[list[float], list[float]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = list(pl_module.parameters())
        grads = [p.grad.double().norm().item() for p in params]
        self.norms.append((grads, [p.detach().double().norm().item() for p in params]))


def _data(n: int = 48) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _fit(model, tmp_path, callbacks, **trainer_kwargs):
    torch.manual_seed(1)  # dropout masks: the same in every fit
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    trainer.fit(model, _data())
    return trainer


@pytest.mark.parametrize(
    ("accumulate", "precision"), [(1, "32-true"), (2, "32-true"), (1, "bf16-mixed")]
)
def test_lightning_fit_records_every_step_and_trains_bit_identically(
    tmp_path, accumulate, precision
):
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    probe = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    callback = RecorderCallback(probe=probe, gradients=True, log_summaries=True)
    steps = GlobalSteps()
    kwargs = {"accumulate_grad_batches": accumulate, "precision": precision}
    trainer = _fit(model, tmp_path / "rec", [callback, steps], **kwargs)
    _fit(reference, tmp_path / "plain", [], **kwargs)

    want = reference.state_dict()
    for name, a in model.state_dict().items():
        assert torch.equal(a, want[name]), f"recording changed the training: {name}"
    ds = callback.to_dataset()
    # one record per optimizer step, at the trainer's global_step values
    assert trainer.global_step == 6 // accumulate
    assert ds.step.values.tolist() == sorted(set(steps.seen)) == list(range(trainer.global_step))
    assert callback.recorder.step == trainer.global_step
    for name in PARAM_VARS:
        assert np.isfinite(ds[name].values).all(), name
    nonzero = ds.param_norm.values > 0  # zero-initialised biases: update_ratio is inf
    assert np.isfinite(ds.update_ratio.values[nonzero]).all()
    # the step's complete gradients and weights, as Lightning sees them before the update
    grads, weights = (np.array([n[i] for n in steps.norms]) for i in (0, 1))
    np.testing.assert_allclose(ds.param_grad_norm.values, grads, rtol=1e-6)
    np.testing.assert_allclose(ds.param_norm.values, weights, rtol=1e-6)
    # each record pools the accumulated batches: `calls` counts them
    assert (ds.calls.sel(source="train").values == accumulate).all()
    assert ds.site.values.tolist() == ["net.1:input"]
    assert np.isfinite(ds["loss"].values).all()
    # the run is in the trainer's log directory
    assert callback.recorder.path == Path(trainer.log_dir) / "icstools.zarr"
    assert open_run(callback.recorder.path).sizes["step"] == trainer.global_step
    # summaries in the logger: drift from the second record on, saturation of the tanh input
    with open(tmp_path / "rec" / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    drift = [r["icstools/drift/net.1:input"] for r in rows if r["icstools/drift/net.1:input"]]
    assert len(drift) == trainer.global_step - 1
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in drift)


def test_lightning_loss_is_the_training_step_loss_averaged_over_accumulated_batches(tmp_path):
    torch.manual_seed(0)
    model = Net()
    model.net[2].p = 0.0  # no dropout: the loss can be recomputed
    initial = copy.deepcopy(model)
    callback = RecorderCallback(path=None)
    _fit(model, tmp_path, [callback], accumulate_grad_batches=2)
    ds = callback.to_dataset()
    batches = list(_data())
    # step 0: the mean loss of the first two batches at the initial weights
    with torch.no_grad():
        want = np.mean([nn.functional.cross_entropy(initial(x), y).item() for x, y in batches[:2]])
    assert float(ds["loss"].sel(step=0)) == pytest.approx(want, rel=1e-6)


def test_lightning_ics_takes_its_target_from_the_batch(tmp_path):
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    seen = []

    def target(batch):  # a configured target: the labels, noted to check it is called
        seen.append(batch[1])
        return batch[1]

    callback = RecorderCallback(
        path=None, target=target, ics=2, loss_fn=nn.functional.cross_entropy
    )
    _fit(model, tmp_path / "rec", [callback])
    _fit(reference, tmp_path / "plain", [])
    want = reference.state_dict()
    for name, a in model.state_dict().items():
        assert torch.equal(a, want[name]), f"ICS changed the training: {name}"
    ds = callback.to_dataset()
    assert len(seen) == 6
    ics = ds.ics_cos.sel(step=[0, 2, 4]).values
    assert np.isfinite(ics).all() and (np.abs(ics) <= 1 + 1e-6).all()
    # the first layer has nothing before it: its gradient does not change (cos = 1)
    np.testing.assert_allclose(ds.ics_cos.sel(step=[0, 2, 4], layer="net.0").values, 1.0)


def test_lightning_optimizer_wrapper_is_unwrapped():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    from icstools.recording.steps import unwrap_optimizer

    opt = torch.optim.SGD(Net().parameters(), lr=0.1)
    assert unwrap_optimizer(LightningOptimizer(opt)) is opt


def test_lightning_failed_fit_detaches_and_keeps_the_records(tmp_path):
    torch.manual_seed(0)
    model = Net(fail_at=3)
    callback = RecorderCallback(gradients=True)
    with pytest.raises(RuntimeError, match="a failing training step"):
        _fit(model, tmp_path, [callback])
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"
    opt = callback.recorder.optimizer
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    ds = open_run(callback.recorder.path)  # readable: steps 0-2 done, step 3 failed
    # the record of step 3, open when it failed, is closed as it stood: the training step
    # raised before its forward, so it holds no values
    assert ds.step.values.tolist() == [0, 1, 2, 3]
    assert (ds["count"].sel(source="train").values[:3] > 0).all()
    assert (ds["count"].sel(source="train", step=3).values == 0).all()
    assert np.isfinite(ds["param_norm"].sel(step=[0, 1, 2]).values).all()

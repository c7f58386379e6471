"""Transformers: the Hugging Face ``Trainer`` callback on a tiny randomly initialised GPT-2 (no
download), and GPT-2 recorded in a plain loop with token-id probes (default sites are its GELU
inputs; LayerNorm and attention outputs by name)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from icstools import Recorder  # noqa: E402
from icstools.store import open_run  # noqa: E402

PARAM_VARS = ("param_grad_norm", "param_norm", "update_norm")
VOCAB, LENGTH = 48, 10


def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    transformers.logging.set_verbosity_error()
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))


class Tokens(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model, tmp_path, accumulate: int = 2):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulate,
        max_steps=3,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(_ids(32)))


def test_hf_trainer_records_every_step_and_trains_bit_identically(tmp_path):
    from icstools.integrations.transformers import RecorderCallback

    model = _gpt2()
    reference = copy.deepcopy(model)
    ids = _ids(4, seed=2)
    probe = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    trainer = _trainer(model, tmp_path / "rec")
    callback = RecorderCallback(trainer, probe=probe, gradients=True)
    out = trainer.train()
    _trainer(reference, tmp_path / "plain").train()

    want = reference.state_dict()
    for name, a in model.state_dict().items():
        assert torch.equal(a, want[name]), f"recording changed the training: {name}"
    # the trainer's optimizer is Accelerate's wrapper: the real one inside is hooked
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert callback.recorder.optimizer is trainer.optimizer.optimizer
    ds = callback.to_dataset()
    assert ds.step.values.tolist() == list(range(trainer.state.global_step)) == [0, 1, 2]
    for name in PARAM_VARS:
        assert np.isfinite(ds[name].values).all(), name
    nonzero = ds.param_norm.values > 0  # zero-initialised biases: update_ratio is inf
    assert np.isfinite(ds.update_ratio.values[nonzero]).all()
    # default sites: the GELU inputs; two micro-batches pooled per step
    assert ds.site.values.tolist() == [f"transformer.h.{i}.mlp.act:input" for i in (0, 1)]
    assert (ds.calls.sel(source="train").values == 2).all()
    # the logged loss is the step's loss: its mean is the trainer's own train_loss
    assert float(ds["loss"].mean()) == pytest.approx(out.training_loss, rel=1e-5)
    assert callback.recorder.path == tmp_path / "rec" / "icstools.zarr"
    assert open_run(callback.recorder.path).sizes["step"] == 3
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"


def test_gpt2_sites_token_probe_gradients_and_summary():
    model = _gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = _ids(4, seed=2)  # token ids: an integer probe
    sites = ["*.mlp.act:input", "*ln_*:output", "transformer.ln_f:output", "*.attn:output"]
    rec = Recorder(model, sites, probe=probe, gradients=True, optimizer=opt)
    # the reference: the probe's tensors at two sites, captured by plain hooks at step 0
    seen: dict[str, torch.Tensor] = {}
    act, ln = model.transformer.h[0].mlp.act, model.transformer.h[1].ln_2

    def keep(key: str, x: torch.Tensor) -> None:
        seen.setdefault(key, x.detach().clone())

    hooks = [
        act.register_forward_pre_hook(lambda m, a: keep("act", a[0])),
        ln.register_forward_hook(lambda m, a, o: keep("ln", o)),
    ]
    with rec:
        for step in range(2):
            ids = _ids(8, seed=10 + step)
            out = model(input_ids=ids, labels=ids)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            rec.log(loss=out.loss)
            for h in hooks:  # only the first forward (step 0's probe) is the reference
                h.remove()
    ds = rec.to_dataset()
    want = {
        *(f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("mlp.act:input", "attn:output")),
        *(f"transformer.h.{i}.ln_{j}:output" for i in (0, 1) for j in (1, 2)),
        "transformer.ln_f:output",
    }
    assert set(ds.site.values.tolist()) == want
    assert ds.sizes["step"] == 2 and list(ds.source.values) == ["train", "probe"]
    for name, key, site in (
        ("act", "act", "transformer.h.0.mlp.act:input"),
        ("ln", "ln", "transformer.h.1.ln_2:output"),
    ):
        x = seen[key].reshape(-1, seen[key].shape[-1]).double().numpy()  # [B*T, units]
        got = ds["mean"].sel(source="probe", step=0).where(ds.unit_site == site, drop=True)
        np.testing.assert_allclose(got.values, x.mean(0), rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.isfinite(ds.grad_norm.values).all()
    assert np.isfinite(ds.param_grad_norm.values).all()
    summary = ds.ics.summary()
    assert set(summary.index) == want


def test_hf_callback_as_context_manager_detaches_after_a_failed_train(tmp_path):
    from icstools.integrations.transformers import RecorderCallback

    model = _gpt2()
    trainer = _trainer(model, tmp_path, accumulate=1)

    class Boom(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("stop here")

    trainer.add_callback(Boom())
    with (
        pytest.raises(RuntimeError, match="stop here"),
        RecorderCallback(trainer, path=None) as callback,
    ):
        trainer.train()
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"
    assert callback.to_dataset().step.values.tolist() == [0, 1]


def test_hf_callback_refuses_ics_which_it_cannot_feed(tmp_path):
    from icstools import RecorderError
    from icstools.integrations.transformers import RecorderCallback

    with pytest.raises(RecorderError, match="ics="):
        RecorderCallback(_trainer(_gpt2(), tmp_path), ics=1, loss_fn=nn.functional.mse_loss)


def test_hf_activation_modules_are_default_sites_without_a_warning():
    model = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = Recorder(model, probe=_ids(2))
    assert [s.name for s in rec.sites] == [
        "transformer.h.0.mlp.act:input",
        "transformer.h.1.mlp.act:input",
    ]

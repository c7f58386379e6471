"""Tests of the side-effect guard (icstools.recording.isolation) and of the one hook module
(icstools.recording.hooks), each against a direct check: module flags, buffer values, the RNG
state and the next draw, the grad mode, whether a hook still fires."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icstools.recording.hooks import HookGroup
from icstools.recording.isolation import RngState, isolated


class Boom(Exception):
    """Raised by a test body."""


def _model() -> nn.Sequential:
    """BN (with running stats and ``num_batches_tracked``), dropout, a nested block; mixed modes."""
    model = nn.Sequential(
        nn.Linear(3, 4),
        nn.BatchNorm1d(4),
        nn.Dropout(0.5),
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None)),
    )
    model.train()
    model[2].eval()
    model[3][1].eval()
    return model


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def _assert_buffers_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def _side_effects(model: nn.Module) -> None:
    """Everything the guard must undo: modes, BN statistics, RNG draws, grad mode."""
    model.train()  # every module, also those in eval mode outside
    model[3][1].training = True
    model(torch.randn(8, 3))  # BN running stats and num_batches_tracked updated; dropout draws
    model(torch.randn(8, 3))
    torch.rand(7)
    model.eval()
    model[0].training = True
    torch.set_grad_enabled(not torch.is_grad_enabled())


# ----------------------------------------------------------------------------- restoring
@pytest.mark.parametrize("grad_outside", [True, False])
@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
def test_restores_modes_buffers_rng_and_grad_mode(raises: bool, grad_outside: bool) -> None:
    torch.manual_seed(0)
    model = _model()
    model(torch.randn(8, 3))  # non-trivial running statistics, num_batches_tracked = 1
    modes, buffers = _modes(model), _buffers(model)
    assert int(buffers["1.num_batches_tracked"]) == 1
    torch.manual_seed(1)
    expected_draw = torch.rand(3)  # what the caller's RNG gives next
    torch.manual_seed(1)
    rng = torch.get_rng_state()
    torch.set_grad_enabled(grad_outside)

    def body() -> None:
        with isolated(model):
            _side_effects(model)
            if raises:
                raise Boom

    try:
        if raises:
            with pytest.raises(Boom):
                body()
        else:
            body()
        assert torch.is_grad_enabled() is grad_outside
        assert _modes(model) == modes
        _assert_buffers_equal(_buffers(model), buffers)
        assert torch.equal(torch.get_rng_state(), rng)
        assert torch.equal(torch.rand(3), expected_draw)
    finally:
        torch.set_grad_enabled(True)


def test_the_body_changes_what_the_guard_restores() -> None:
    """Without the guard the same body leaves every change behind (the check above is live)."""
    torch.manual_seed(0)
    model = _model()
    modes, buffers, rng = _modes(model), _buffers(model), torch.get_rng_state()
    try:
        _side_effects(model)
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)
    assert _modes(model) != modes
    after = _buffers(model)
    assert not torch.equal(after["1.running_mean"], buffers["1.running_mean"])
    assert int(after["1.num_batches_tracked"]) == int(buffers["1.num_batches_tracked"]) + 2
    assert not torch.equal(torch.get_rng_state(), rng)


def test_without_a_model_guards_rng_and_grad_mode() -> None:
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    with pytest.raises(Boom), isolated(grad=False):
        assert not torch.is_grad_enabled()
        torch.rand(100)
        raise Boom
    assert torch.is_grad_enabled()
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_restores_the_cuda_rng() -> None:
    torch.cuda.init()
    torch.cuda.manual_seed_all(3)
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(3)
    with isolated():
        for d in range(torch.cuda.device_count()):
            torch.rand(10, device=f"cuda:{d}")
    assert torch.equal(torch.rand(4, device="cuda"), expected)


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mode_is_applied_to_every_module_inside(mode: str) -> None:
    model = _model()
    modes = _modes(model)
    with isolated(model, mode=mode):
        assert _modes(model) == [mode == "train"] * len(modes)
    assert _modes(model) == modes


def test_mode_none_leaves_the_modes_inside() -> None:
    model = _model()
    modes = _modes(model)
    assert len(set(modes)) == 2  # mixed
    with isolated(model):
        assert _modes(model) == modes


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("outside", [True, False])
def test_grad_argument_sets_the_grad_mode_inside(grad: bool, outside: bool) -> None:
    try:
        torch.set_grad_enabled(outside)
        with isolated(grad=grad):
            assert torch.is_grad_enabled() is grad
        with isolated():
            assert torch.is_grad_enabled() is outside
        assert torch.is_grad_enabled() is outside
    finally:
        torch.set_grad_enabled(True)


def test_buffers_false_leaves_buffer_writes_but_restores_the_rest() -> None:
    torch.manual_seed(0)
    model = _model()
    modes, buffers = _modes(model), _buffers(model)
    with isolated(model, mode="train", buffers=False):
        model(torch.randn(8, 3))
    after = _buffers(model)
    assert not torch.equal(after["1.running_mean"], buffers["1.running_mean"])
    assert not torch.equal(after["1.running_var"], buffers["1.running_var"])
    assert int(after["1.num_batches_tracked"]) == 1
    assert int(after["3.1.num_batches_tracked"]) == 1
    assert _modes(model) == modes


@pytest.mark.parametrize("bad", ["training", "Train", True, 1])
def test_a_bad_mode_raises_naming_the_valid_values(bad: object) -> None:
    model = _model()
    modes = _modes(model)
    with pytest.raises(ValueError, match=r"None, 'train' or 'eval'") as info:
        with isolated(model, mode=bad):  # type: ignore[arg-type]
            pytest.fail("the body must not run")
    assert repr(bad) in str(info.value)
    assert _modes(model) == modes


# ----------------------------------------------------------------------------- RngState
def test_rng_state_replays_the_same_dropout_mask() -> None:
    torch.manual_seed(0)
    drop = nn.Dropout(0.5).train()
    x = torch.ones(200)
    state = RngState.capture()
    assert torch.equal(state.cpu, torch.get_rng_state())
    first = drop(x)
    other = drop(x)  # the generator moved on: another mask
    assert not torch.equal(first, other)
    state.restore()
    assert torch.equal(drop(x), first)
    state.restore()  # a state can be restored again
    assert torch.equal(drop(x), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_state_replays_cuda_draws() -> None:
    torch.cuda.init()
    state = RngState.capture()
    assert {d for d, _ in state.cuda} == set(range(torch.cuda.device_count()))
    a = torch.rand(5, device="cuda")
    state.restore()
    assert torch.equal(torch.rand(5, device="cuda"), a)


# ----------------------------------------------------------------------------- HookGroup
def _counting_hooks(group: HookGroup, model: nn.Sequential, calls: list[str]) -> None:
    group.forward_pre(model[0], lambda mod, args: calls.append("pre"))
    group.forward_pre(model[1], lambda mod, args, kwargs: calls.append("pre_kw"), with_kwargs=True)
    group.forward(model[1], lambda mod, args, out: calls.append("post"))
    group.forward(model[1], lambda mod, args, out: calls.append("always"), always_call=True)


def _no_module_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
def test_hook_group_removes_its_hooks_on_leaving_with(raises: bool) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    calls: list[str] = []
    try:
        with HookGroup() as group:
            _counting_hooks(group, model, calls)
            assert len(group) == 4 and group
            model(torch.zeros(1, 2))
            assert calls == ["pre", "pre_kw", "post", "always"]
            if raises:
                raise Boom
    except Boom:
        pass
    assert len(group) == 0 and not group
    assert _no_module_hooks(model)
    calls.clear()
    model(torch.zeros(1, 2))
    assert calls == []


def test_hook_group_removes_hooks_when_a_hook_raises() -> None:
    """A hook raising to stop the forward (as a segment's does) leaves no hook behind."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2))

    def stop(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        raise Boom

    with pytest.raises(Boom), HookGroup() as group:
        group.forward(model[1], stop)
        group.forward_pre(model[2], lambda mod, args: pytest.fail("not reached"))
        model(torch.zeros(1, 2))
    assert _no_module_hooks(model)


def test_hook_group_remove_twice_is_safe_and_the_group_is_reusable() -> None:
    model = nn.Linear(2, 2)
    calls: list[int] = []
    group = HookGroup()
    group.forward(model, lambda mod, args, out: calls.append(1))
    group.remove()
    group.remove()
    assert len(group) == 0
    model(torch.zeros(1, 2))
    assert calls == []
    group.forward(model, lambda mod, args, out: calls.append(2))
    model(torch.zeros(1, 2))
    group.remove()
    model(torch.zeros(1, 2))
    assert calls == [2]
    assert _no_module_hooks(model)


def test_hook_group_removes_tensor_hooks() -> None:
    w = torch.ones(3, requires_grad=True)
    seen: list[torch.Tensor] = []
    with HookGroup() as group:
        group.tensor(w, lambda g: seen.append(g.clone()))
        (2 * w).sum().backward()
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((3,), 2.0))
    (3 * w).sum().backward()
    assert len(seen) == 1  # the hook is gone
    assert not w._backward_hooks


def test_hook_group_removes_optimizer_step_hooks() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    calls: list[str] = []
    with pytest.raises(Boom), HookGroup() as group:
        group.optimizer_step_pre(opt, lambda o, a, k: calls.append("pre"))
        group.optimizer_step_post(opt, lambda o, a, k: calls.append("post"))
        p.grad = torch.ones(2)
        opt.step()
        raise Boom
    assert calls == ["pre", "post"]
    opt.step()
    assert calls == ["pre", "post"]

"""The side-effect guard: run extra forwards on a model without changing its training.

Everything icstools runs on a model besides the user's own training forwards (the probe batch,
gradient-based ICS, landscape probes, Jacobian spectra, the experiments' measurements, the
CLI's shape discovery) runs inside :func:`isolated`, which restores on exit, also after an
exception:

- the ``training`` flag of every submodule (so ``model.eval()`` inside is undone);
- every buffer, copied back in place (BatchNorm running statistics, ``num_batches_tracked``);
- the random number generators: the CPU generator and that of every CUDA device once CUDA is
  initialised (a train-mode forward with dropout draws on the device of its tensors, so all of
  them are saved, never only the CPU's);
- the grad mode.

:class:`RngState` is the same RNG snapshot as a value, for replaying the random draws of a
training forward (the same dropout masks) in a recomputation.

Examples
--------
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5))
>>> before = model[1].running_mean.clone(); state = torch.get_rng_state()
>>> with isolated(model, mode="train", grad=False):
...     _ = model(torch.randn(8, 3))
>>> torch.equal(model[1].running_mean, before), torch.equal(torch.get_rng_state(), state)
(True, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["RngState", "isolated", "rng_devices"]

_MODES = (None, "train", "eval")


def rng_devices() -> list[int]:
    """CUDA devices whose generators the guard saves: all of them once CUDA is initialised
    (none before: a process that never touched CUDA has drawn nothing there)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return list(range(torch.cuda.device_count()))


@dataclass(frozen=True)
class RngState:
    """The state of the CPU generator and of every initialised CUDA device's generator.

    Examples
    --------
    >>> s = RngState.capture(); a = torch.rand(2); s.restore(); torch.equal(a, torch.rand(2))
    True
    """

    cpu: torch.Tensor
    cuda: tuple[tuple[int, torch.Tensor], ...] = ()

    @classmethod
    def capture(cls) -> RngState:
        """The generators' current states (reading them needs no device sync)."""
        cuda = tuple((d, torch.cuda.get_rng_state(d)) for d in rng_devices())
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        """Put the generators back into this state."""
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda:
            torch.cuda.set_rng_state(state, device)


@contextlib.contextmanager
def isolated(
    model: nn.Module | None = None,
    *,
    mode: str | None = None,
    grad: bool | None = None,
    buffers: bool = True,
) -> Iterator[None]:
    """Run the body with no lasting effect on ``model``, the RNGs or the grad mode.

    Parameters
    ----------
    model : torch.nn.Module, optional
        The model whose module modes (and buffers) are restored; without one, only the RNGs and
        the grad mode are guarded (a seeded section that leaves the caller's RNG alone).
    mode : {None, "train", "eval"}
        Put the whole model in this mode for the body (``None``: leave the modes as they are).
    grad : bool, optional
        Run the body with gradients enabled (``True``) or disabled (``False``); ``None`` keeps
        the caller's grad mode.
    buffers : bool
        Also restore the buffers' values (in place). ``False`` for code that never writes them
        (e.g. ``torch.func.functional_call`` on buffer clones).

    Examples
    --------
    >>> _ = torch.manual_seed(0); a = torch.rand(1)
    >>> _ = torch.manual_seed(0)
    >>> with isolated():
    ...     _ = torch.rand(5)  # draws inside leave no trace outside
    >>> torch.equal(torch.rand(1), a)
    True
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be None, 'train' or 'eval', got {mode!r}")
    modules = list(model.modules()) if model is not None else []
    saved_modes = [(m, m.training) for m in modules]
    saved_buffers = (
        [(b, b.detach().clone()) for b in model.buffers()] if model is not None and buffers else []
    )
    grad_before = torch.is_grad_enabled()
    rng = RngState.capture()
    try:
        if model is not None and mode is not None:
            model.train(mode == "train")
        if grad is not None:
            torch.set_grad_enabled(grad)
        yield
    finally:
        torch.set_grad_enabled(grad_before)
        rng.restore()
        with torch.no_grad():
            for b, value in saved_buffers:
                b.copy_(value)
        for m, training in saved_modes:
            m.training = training

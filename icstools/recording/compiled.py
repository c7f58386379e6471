"""Site hooks that also run inside ``torch.compile``: a switch Dynamo guards on, and a stash.

The recorder registers its site hooks once, when it attaches, and keeps them for the whole run.
In eager mode a hook hands the site tensor to the recorder at once (:attr:`SiteSwitch.observe`).
Inside a graph that Dynamo traces (``torch.compiler.is_compiling()``), a hook does nothing that
could break the graph: when :attr:`SiteSwitch.on` is set (a Python bool: Dynamo guards on it,
so recorded and unrecorded steps are two cached graphs, never a recompile per step), and the
forward is a training forward (grad mode and the model's ``training`` flag, both guarded too),
it stashes a detached copy of the site tensor (a copy: an in-place op may follow the site);
otherwise it traces to nothing. The root pre-hook marks where each forward starts. The recorder
feeds the stash to its measurements outside the compiled region: after the forward (when the
root hooks run eagerly, i.e. the recorder was given the compiled module) or at the optimizer
step (:meth:`~icstools.recording.core.RecorderCore.step_done`, ``flush``, ``close``).

Two orders of use:

- *attach, then compile* (``Recorder(model)``, then ``torch.compile(model)``): the hooks are in
  place when Dynamo traces; the model's own forward hooks are traced too, so the records are
  opened and fed at the optimizer step;
- *compile, then attach* (``Recorder(torch.compile(model))``): :func:`unwrap_compiled` finds the
  original module, whose sites are hooked, while the step bookkeeping hooks the compiled
  wrapper, which runs eagerly. Code that Dynamo compiled before the hooks existed would not call
  them (Dynamo does not guard on module hooks), so the first attach resets Dynamo's caches
  (``torch._dynamo.reset()``): the next call recompiles, once.

Because Dynamo does not guard on module hooks (``torch._dynamo.config.
skip_nnmodule_hook_guards``), code traced while the hooks were absent keeps running without
them: keep the recorder attached for the whole compiled run (a ``detach()`` then ``attach()``,
or another model of the same code traced without hooks in the same process, needs
``torch._dynamo.reset()`` first). While attached, the hooked modules carry the switch
(attribute ``_icstools_switch``), so compiled code finds the switch of the model it runs.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from icstools.recording.errors import RecorderError
from icstools.sites import Site

#: The attribute of a hooked module that holds its recorder's switch while attached.
ATTRIBUTE = "_icstools_switch"

__all__ = ["NO_BATCH", "SiteSwitch", "check_stashable", "unwrap_compiled"]

#: Why ``ics=``/``landscape=`` cannot record when the model was compiled after attaching.
NO_BATCH = (
    "ics= and landscape= need the step's batch, which the recorder takes from the model's "
    "forward hooks; a torch.compile'd forward does not run them: pass the compiled module to "
    "the Recorder (Recorder(torch.compile(model), ...)), whose hooks run outside the graph"
)


def unwrap_compiled(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(module, wrapper)``: the original module of a ``torch.compile``d one and the compiled
    wrapper (``OptimizedModule``), or ``(model, None)`` for a plain module.

    Examples
    --------
    >>> net = nn.Linear(2, 2)
    >>> unwrap_compiled(net) == (net, None)
    True
    """
    wrapper = None
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) and hasattr(model, "dynamo_ctx"):
        wrapper = wrapper or model
        model = model._orig_mod
    return model, wrapper


def check_stashable(switch: SiteSwitch, site_measurements: list[Any]) -> None:
    """Raise (and forget the stash) if a measurement needs more of a site than its values."""
    if switch and any(m.name == "site_gradients" for m in site_measurements):
        switch.clear()
        raise RecorderError(
            "gradients=True/'activations' needs the sites' gradient hooks, which a "
            "torch.compile'd forward does not run; record gradients on the eager model, or "
            "pass gradients=False to record the compiled model"
        )


def _stash_format(model: nn.Module) -> torch.memory_format:
    """The memory format of the stashed copies of 4-d site tensors: channels-last in a model
    with 2-d convolutions, which inductor runs channels-last (its layout optimization); there
    a copy in the traced (contiguous) format made every fused kernel of a recorded forward
    transpose its tiles: ``bench/channels_last.py`` measured the CNN of ``bench/overhead.py``
    at +96 ms a recorded step (statistics skipped) over the unrecorded graph's 348 ms, +40 ms
    with channels-last copies. The statistics read either
    format in memory order (:func:`icstools.functional.statistics.summarize`). Inductor's
    configuration is read only if something imported it already (importing it costs ~1.6 s):
    with its layout optimization switched off, the traced format is kept."""
    config = sys.modules.get("torch._inductor.config")
    if config is not None and not getattr(config, "layout_optimization", True):
        return torch.preserve_format
    convs = any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules())
    return torch.channels_last if convs else torch.preserve_format


class SiteSwitch:
    """What the site hooks do: observe eagerly, or stash inside a compiled graph.

    Parameters
    ----------
    model : torch.nn.Module
        The (original) model; its ``training`` flag marks training forwards.

    Attributes
    ----------
    on : bool
        Whether compiled forwards stash their site tensors now (the recorder sets it at the
        step boundaries and around the forwards it sees).
    observe : callable or None
        ``observe(site, x)``, the recorder's eager handler (``None``: detached).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.on = False
        self.attached = False  # guarded too: detached, traced root hooks mark nothing
        self.observe: Any = None
        self._stash: list[Any] = []  # None marks a forward's start; else (site, tensor)
        self._modules: list[nn.Module] = []  # those carrying the switch
        self.dynamo_reset = False  # whether attaching to a compiled module reset Dynamo once
        # how a compiled forward stashes a 4-d site tensor (guarded by Dynamo as a constant)
        self.stash_format = _stash_format(model)

    def attach(self, observe: Any, modules: list[nn.Module], *, compiled: bool) -> None:
        """The recorder attached: ``observe(site, x)`` takes the eager calls; the hooked
        ``modules`` carry the switch while attached (compiled code finds it through the module
        it runs: another model of the same code, compiled with its own recorder, gets its own
        switch). ``compiled``: the recorder was given a compiled module, whose code compiled
        before the hooks existed would not call them (Dynamo does not guard on module hooks):
        reset Dynamo, once."""
        self.observe, self.attached = observe, True
        self._modules = modules
        for m in modules:
            m.__dict__[ATTRIBUTE] = self
        if compiled and not self.dynamo_reset:
            torch._dynamo.reset()
            self.dynamo_reset = True

    def detach(self) -> None:
        """The recorder detached: the hooks stay idle, the stash is forgotten."""
        self.observe, self.on, self.attached = None, False, False
        for m in self._modules:
            if m.__dict__.get(ATTRIBUTE) is self:
                del m.__dict__[ATTRIBUTE]
        self._modules = []
        self.clear()

    def site(self, site: Site, module: nn.Module, x: torch.Tensor | None) -> None:
        """The body of every site hook."""
        if torch.compiler.is_compiling():
            switch = getattr(module, ATTRIBUTE, None)  # this model's, not the hook's closure
            if switch is not None and switch.wants(x):
                fmt = switch.stash_format if x.ndim == 4 else torch.preserve_format
                switch._stash.append((site, x.detach().clone(memory_format=fmt)))  # type: ignore[union-attr]
            return
        observe = self.observe
        if observe is not None:
            observe(site, x)

    def wants(self, x: torch.Tensor | None) -> bool:
        """Whether a compiled forward stashes ``x`` (every test here is guarded by Dynamo)."""
        return self.on and x is not None and torch.is_grad_enabled() and self.model.training

    @staticmethod
    def mark_forward(module: nn.Module) -> None:
        """A compiled training forward of ``module`` starts (called by the traced root
        pre-hook): also at unscheduled steps, so the recorder sees every forward's step."""
        switch = getattr(module, ATTRIBUTE, None)
        if switch is not None and torch.is_grad_enabled() and switch.model.training:
            switch._stash.append(None)

    def __bool__(self) -> bool:
        return bool(self._stash)

    def take(self) -> list[list[tuple[Site, torch.Tensor]]]:
        """The stashed site tensors grouped by forward, in order (the stash is emptied)."""
        # emptied in place: compiled code appends to this very list (a new list would fail
        # Dynamo's guards and recompile)
        stash = list(self._stash)
        self._stash.clear()
        forwards: list[list[tuple[Site, torch.Tensor]]] = []
        for item in stash:
            if item is None or not forwards:
                forwards.append([])
            if item is not None:
                forwards[-1].append(item)
        return forwards

    def clear(self) -> None:
        """Forget the stash."""
        self._stash.clear()

"""The one place where icstools registers hooks.

Every forward hook, tensor (gradient) hook and optimizer step hook that any part of icstools
adds goes through a :class:`HookGroup`, which keeps the handles and removes them together
(:meth:`HookGroup.remove`, or leaving ``with group:``), also after an exception. A test checks
that no other module of the package calls a ``register_*hook`` function, so a hook can never
be left behind by a code path that forgot its handle.

Examples
--------
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
>>> seen = []
>>> with HookGroup() as hooks:
...     _ = hooks.forward(model[1], lambda mod, args, out: seen.append(tuple(out.shape)))
...     _ = model(torch.zeros(4, 2))
>>> seen, len(model[1]._forward_hooks)
([(4, 3)], 0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from icstools.sites import find_tensor

__all__ = ["HookGroup"]


class HookGroup:
    """Hooks registered together and removed together.

    Each ``add`` method registers one hook with PyTorch's own API (same arguments, same
    semantics) and keeps its handle. :meth:`remove` removes every hook of the group (safe to
    call again); the group can then be reused.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    # ------------------------------------------------------------------ module hooks
    def forward_pre(
        self,
        module: nn.Module,
        fn: Callable[..., Any],
        *,
        with_kwargs: bool = False,
        prepend: bool = False,
    ) -> RemovableHandle:
        """``module.register_forward_pre_hook(fn, ...)``, kept in the group."""
        return self._keep(
            module.register_forward_pre_hook(fn, with_kwargs=with_kwargs, prepend=prepend)
        )

    def forward(
        self,
        module: nn.Module,
        fn: Callable[..., Any],
        *,
        prepend: bool = False,
        always_call: bool = False,
        with_kwargs: bool = False,
    ) -> RemovableHandle:
        """``module.register_forward_hook(fn, ...)``, kept in the group."""
        return self._keep(
            module.register_forward_hook(
                fn, prepend=prepend, always_call=always_call, with_kwargs=with_kwargs
            )
        )

    def site(
        self,
        module: nn.Module,
        role: str,
        fn: Callable[..., None],
        idle: Callable[[], bool] | None = None,
    ) -> RemovableHandle:
        """A hook that calls ``fn(module, x)`` with the first floating-point tensor ``x`` of the
        module's inputs (``role="input"``, a pre-hook) or output (``role="output"``), or
        ``None``; not while ``idle()`` is true (checked first: a site hook runs at every
        forward, recorded or not)."""
        if role == "input":

            def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                if idle is None or not idle():
                    fn(mod, find_tensor(args) if args else find_tensor(kwargs))

            return self.forward_pre(module, pre, with_kwargs=True)

        def post(mod: nn.Module, args: tuple, output: Any) -> None:
            if idle is None or not idle():
                fn(mod, find_tensor(output))

        return self.forward(module, post)

    # ------------------------------------------------------------------ tensor hooks
    def tensor(self, tensor: torch.Tensor, fn: Callable[[torch.Tensor], Any]) -> RemovableHandle:
        """``tensor.register_hook(fn)``: ``fn`` receives the gradient of ``tensor``."""
        return self._keep(tensor.register_hook(fn))

    # ------------------------------------------------------------------ optimizer hooks
    def optimizer_step_pre(
        self, optimizer: torch.optim.Optimizer, fn: Callable[..., Any]
    ) -> RemovableHandle:
        """``optimizer.register_step_pre_hook(fn)``, kept in the group."""
        return self._keep(optimizer.register_step_pre_hook(fn))

    def optimizer_step_post(
        self, optimizer: torch.optim.Optimizer, fn: Callable[..., Any]
    ) -> RemovableHandle:
        """``optimizer.register_step_post_hook(fn)``, kept in the group."""
        return self._keep(optimizer.register_step_post_hook(fn))

    # ------------------------------------------------------------------ the group
    def remove(self) -> None:
        """Remove every hook of the group (in reverse order of registration)."""
        handles, self._handles = self._handles, []
        for handle in reversed(handles):
            handle.remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __bool__(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> HookGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _keep(self, handle: RemovableHandle) -> RemovableHandle:
        self._handles.append(handle)
        return handle

"""The optimizer side of a step: which optimizer is hooked, and when the update happens.

Every way a step is taken goes through the real ``torch.optim.Optimizer``'s ``step()``, whose
pre- and post-hooks bracket the update:

- ``optimizer.step()``: the gradients are complete at the pre-hook;
- ``optimizer.step(closure)`` (LBFGS, Lightning, ``torch.optim`` with a closure): the forward
  and backward run *inside* the step, in the closure. The pre-hook wraps the closure, and the
  parameters are read right after its **first** evaluation (the gradients of the weights of
  this step). An optimizer that evaluates the closure again within the same step (LBFGS's
  iterations and line search, at intermediate weights) does so unrecorded: those forwards are
  neither training data of the record nor counted, and ``rec.log`` calls made there are
  ignored (log the loss ``step(closure)`` returns);
- gradient accumulation: the forwards and backwards before the step are pooled into its
  record (nothing special here: the step counter only moves at the post-hook);
- AMP with a ``GradScaler``: ``scaler.step(opt)`` unscales before it calls ``opt.step()`` and
  does not call it for an iteration with non-finite gradients (that step is not counted);
- wrapped optimizers (Accelerate's ``AcceleratedOptimizer``, Lightning's
  ``LightningOptimizer``) are unwrapped (:func:`unwrap_optimizer`) and the real optimizer is
  hooked: the wrappers call its ``step()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from icstools.recording.hooks import HookGroup

__all__ = ["OptimizerSteps", "unwrap_optimizer"]

#: Attributes under which optimizer wrappers keep the optimizer they wrap (Accelerate's
#: ``AcceleratedOptimizer.optimizer``, Lightning's ``LightningOptimizer._optimizer``).
_WRAPPED = ("optimizer", "_optimizer")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` whose ``step()`` really runs, inside any wrappers.

    Wrappers keep the optimizer they wrap as ``.optimizer`` (Accelerate) or ``._optimizer``
    (Lightning) and call its ``step()``; some subclass ``torch.optim.Optimizer`` without its
    step hooks, so the innermost optimizer is the one to hook.

    Raises
    ------
    TypeError
        When no ``torch.optim.Optimizer`` with step hooks is found.

    Examples
    --------
    >>> opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    >>> class Wrapper:
    ...     def __init__(self, optimizer):
    ...         self.optimizer = optimizer
    >>> unwrap_optimizer(Wrapper(opt)) is opt
    True
    """
    found, seen = optimizer, set()
    while id(found) not in seen:
        seen.add(id(found))
        inner = next(
            (
                getattr(found, a)
                for a in _WRAPPED
                if isinstance(getattr(found, a, None), torch.optim.Optimizer)
            ),
            None,
        )
        if inner is None:
            break
        found = inner
    if not (
        isinstance(found, torch.optim.Optimizer) and hasattr(found, "_optimizer_step_pre_hooks")
    ):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer, or a wrapper of one that keeps it as "
            f"`.optimizer` or `._optimizer` (Accelerate's, Lightning's); got "
            f"{type(optimizer).__name__}"
        )
    return found


class OptimizerSteps:
    """Step hooks on one optimizer: ``before()`` once the step's gradients are complete,
    ``after()`` once its parameters were updated.

    ``quiet()`` is a context manager in which the closure's later evaluations run (the
    recorder's hooks ignore them).
    """

    def __init__(
        self,
        before: Callable[[], None],
        after: Callable[[], None],
        quiet: Callable[[], contextlib.AbstractContextManager[Any]],
    ) -> None:
        self._before, self._after, self._quiet = before, after, quiet

    def attach(self, hooks: HookGroup, optimizer: torch.optim.Optimizer) -> None:
        """Register the pre- and post-hook of ``optimizer.step`` in ``hooks``."""
        hooks.optimizer_step_pre(optimizer, self._pre)
        hooks.optimizer_step_post(optimizer, self._post)

    def _pre(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # args are step()'s: (optimizer, closure?, ...)
        if len(args) > 1 and callable(args[1]):
            return (args[0], self._wrap(args[1]), *args[2:]), kwargs
        if callable(kwargs.get("closure")):
            return args, {**kwargs, "closure": self._wrap(kwargs["closure"])}
        self._before()  # no closure: the gradients are complete now
        return None

    def _post(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        self._after()

    def _wrap(self, closure: Callable[..., Any]) -> Callable[..., Any]:
        calls = 0

        def first_evaluation_recorded(*a: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:  # e.g. LBFGS, at intermediate weights: not this step's record
                with self._quiet():
                    return closure(*a, **kw)
            result = closure(*a, **kw)
            self._before()  # the gradients of this step's weights are complete now
            return result

        return first_evaluation_recorded

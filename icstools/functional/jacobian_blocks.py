"""The blocks whose Jacobians :mod:`icstools.functional.jacobians` takes: a whole model
(:class:`_Whole`) or a segment between two sites (:class:`Segment`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from icstools.recording.hooks import HookGroup
from icstools.sites import Site, find_tensor

__all__ = ["Segment"]


class _StopForward(Exception):
    """Raised by a segment's hook at ``to_site`` to end the model's forward early."""


def _replace_first_tensor(obj: Any, new: torch.Tensor) -> tuple[Any, bool]:
    """``obj`` with its first floating tensor (as :func:`find_tensor` finds it) replaced."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.ndim > 0:
            return new, True
        return obj, False
    if isinstance(obj, (tuple, list)):
        items = list(obj)
        for i, item in enumerate(items):
            items[i], done = _replace_first_tensor(item, new)
            if done:
                return (type(obj)(items) if isinstance(obj, tuple) else items), True
        return obj, False
    if isinstance(obj, dict):
        out = dict(obj)
        for key, item in obj.items():
            out[key], done = _replace_first_tensor(item, new)
            if done:
                return out, True
        return obj, False
    return obj, False


class _Whole(nn.Module):
    """``input -> first floating output tensor`` of a model (see :func:`whole`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = find_tensor(self.model(x))
        if out is None:
            raise TypeError(f"{type(self.model).__name__} returned no floating-point tensor")
        return out


class _SegmentPass:
    """One forward of a :class:`Segment`'s model: its hooks substitute ``x`` at the source site
    (``x=None``: capture the tensor there as ``src``) and stop the forward at the destination
    site, keeping its tensor as ``out``."""

    def __init__(self, seg: Segment, x: torch.Tensor | None) -> None:
        self.seg, self.x = seg, x
        self.substituted = False
        self.out: torch.Tensor | None = None
        self.src: torch.Tensor | None = None

    def substitute(self, value: Any, where: str) -> Any:
        if self.substituted:
            return value
        name, x = self.seg.src.name, self.x
        found = find_tensor(value)
        if found is None:
            raise ValueError(f"site {name!r} has no floating-point tensor {where}")
        self.substituted = True
        if x is None:  # a copy: an in-place module at or after the site would overwrite it
            self.src = found.detach().clone()
            return value
        if tuple(x.shape) != tuple(found.shape):
            raise ValueError(
                f"the segment's input has shape {tuple(x.shape)} but the tensor at "
                f"{name!r} for the segment's example batch has shape {tuple(found.shape)}"
            )
        # a clone, not x: an in-place module at or after the site (ReLU(inplace=True)) then
        # writes into the clone (recorded by autograd), never into x, which may be a leaf of
        # the Jacobian's graph or the caller's tensor
        return _replace_first_tensor(value, x.clone())[0]

    def capture(self, value: Any) -> None:
        src, dst = self.seg.src.name, self.seg.dst.name
        if not self.substituted:
            if self.x is None:
                raise ValueError(
                    f"to_site {dst!r} is reached before from_site {src!r} in the model's "
                    f"forward: the segment must go forward"
                )
            return
        found = find_tensor(value)
        if found is None:
            raise ValueError(f"site {dst!r} has no floating-point tensor")
        self.out = found
        raise _StopForward

    def src_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.seg.src.role != "input":
            return None
        return self.substitute((args, kwargs), "in its inputs")

    def src_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if self.seg.src.role != "output":
            return None
        return self.substitute(output, "in its output")

    def dst_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.seg.dst.role == "input":
            self.capture((args, kwargs))

    def dst_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.seg.dst.role == "output":
            self.capture(output)


class Segment(nn.Module):
    """The map from the tensor at one site to the tensor at a later one; see :func:`segment`.

    Attributes
    ----------
    model : nn.Module
        The model (not a copy).
    src, dst : Site
        The sites the segment goes from and to.
    inputs : torch.Tensor
        The tensor at ``src`` for the example batch (detached).
    """

    inputs: torch.Tensor

    def __init__(self, model: nn.Module, src: Site, dst: Site, example: Any) -> None:
        super().__init__()
        self.model = model
        self.src, self.dst = src, dst
        if isinstance(example, torch.Tensor):
            args, kwargs = (example.detach(),), {}
        elif isinstance(example, Mapping):
            args, kwargs = (), {k: _detach(v) for k, v in example.items()}
        elif isinstance(example, (tuple, list)):
            args, kwargs = tuple(_detach(v) for v in example), {}
        else:
            raise TypeError(
                f"example must be a tensor, a tuple of positional arguments or a dict of keyword "
                f"arguments of the model, got {type(example).__name__}"
            )
        self._example = (args, kwargs)
        self._cast: dict[torch.dtype, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def extra_repr(self) -> str:
        return f"from={self.src.name!r}, to={self.dst.name!r}"

    def _example_as(self, dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The example's floating-point tensors in ``dtype`` (cached)."""
        if dtype not in self._cast:
            args, kwargs = self._example
            self._cast[dtype] = (
                tuple(_to_dtype(a, dtype) for a in args),
                {key: _to_dtype(v, dtype) for key, v in kwargs.items()},
            )
        return self._cast[dtype]

    def _run(self, x: torch.Tensor | None) -> torch.Tensor:
        """Forward of the model; substitute ``x`` at the source (``None``: capture it)."""
        run = _SegmentPass(self, x)
        args, kwargs = self._example_as(x.dtype) if x is not None else self._example
        src_mod = self.model.get_submodule(self.src.module_name)
        dst_mod = self.model.get_submodule(self.dst.module_name)
        with HookGroup() as hooks:  # removed on exit, also when a hook or the model raises
            # order: substitution hooks first, so "m:input" -> "m:output" of one module works
            hooks.forward_pre(src_mod, run.src_pre, with_kwargs=True, prepend=True)
            hooks.forward_pre(dst_mod, run.dst_pre, with_kwargs=True)
            hooks.forward(src_mod, run.src_post, prepend=True)
            hooks.forward(dst_mod, run.dst_post)
            try:
                self.model(*args, **kwargs)
            except _StopForward:  # raised by capture() at to_site: the forward is done
                pass
        if not run.substituted:
            raise ValueError(
                f"from_site {self.src.name!r} was not reached in the model's forward on the example"
            )
        if run.out is None:
            raise ValueError(
                f"to_site {self.dst.name!r} was not reached after from_site {self.src.name!r} in "
                f"the model's forward on the example"
            )
        return run.src if x is None else run.out

    def capture_inputs(self) -> None:
        """Store the tensor at ``from_site`` for the example batch as ``inputs``."""
        self.inputs = self._run(None)  # a detached copy, taken when the forward reached the site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


def _to_dtype(v: Any, dtype: torch.dtype) -> Any:
    return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

"""Scalars per record: the loss and any value the training loop logs (``rec.log``), and the
learning rate of the optimizer's first parameter group."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch

from icstools.recording.errors import RecorderError
from icstools.recording.measurements.base import Context, Declaration, Measurement
from icstools.schema import Variable, reserved_names

__all__ = ["LOGGED_NAME_RULE", "Scalars", "check_logged"]

#: What a name given to ``rec.log`` may be: it becomes a variable of the run, and in a store a
#: directory of that name (a ``/`` would nest a group, ``.zattrs`` or ``..`` would clash with
#: the store's own keys).
LOGGED_NAME_RULE = (
    "ASCII letters, digits, '_', '.' and '-', starting with a letter or a digit (so no '/', "
    "no leading '.' or '_'), at most 128 characters"
)
_LOGGED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")

VARIABLES = (
    Variable("loss", ("step",), "float64", "the training loss, as logged", "rec.log(loss=...)"),
    Variable(
        "lr",
        ("step",),
        "float64",
        "learning rate of the first parameter group",
        "Recorder(optimizer=...)",
    ),
)


def check_logged(scalars: dict[str, Any], valid: set[str] | None = None) -> None:
    """Raise if a logged name or value cannot be a scalar variable of the run.

    ``valid``: names already checked (their values are still checked); the names that pass
    are added to it. The schema's names are gathered from every measurement module, ~3 µs a
    call, which the recorder pays once per name rather than at every ``rec.log``.
    """
    unchecked = [name for name in scalars if valid is None or name not in valid]  # in order
    if unchecked:
        _check_names(unchecked)
        if valid is not None:
            valid.update(unchecked)
    for name, value in scalars.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise RecorderError(
                    f"log({name}=...) needs a scalar, got a tensor of shape {tuple(value.shape)}"
                )
        elif not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
            raise TypeError(f"log({name}=...) needs a number or a 1-element tensor, got {value!r}")


def _check_names(names: list[str]) -> None:
    reserved = reserved_names()
    for name in names:
        if not _LOGGED_NAME.fullmatch(name):
            raise RecorderError(
                f"cannot log {name!r}: a logged name becomes a variable of the run (a directory "
                f"of its store); use {LOGGED_NAME_RULE}, e.g. 'acc_train' or 'test-acc'"
            )
        if name in reserved:
            raise RecorderError(
                f"cannot log {name!r}: the name is used by the run dataset "
                f"({sorted(reserved)}); choose another"
            )


class Scalars(Measurement):
    """``loss``, ``lr`` and the logged scalars (their names are fixed by the first record)."""

    name = "scalars"
    variables = VARIABLES

    def __init__(self) -> None:
        super().__init__()
        self.logged: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, options: Any) -> Scalars:
        return cls()

    def declare(self, ctx: Context) -> Declaration:
        self.logged = tuple(sorted(k for k in ctx.logs if k != "loss"))
        extra = tuple(
            Variable(name, ("step",), "float64", "logged with rec.log", f"rec.log({name}=...)")
            for name in self.logged
        )
        return Declaration({}, (*VARIABLES, *extra))

    def stage(self, ctx: Context) -> dict[Any, torch.Tensor]:
        # logged tensors: read once per record, with the other measurements' (one transfer)
        return {
            k: v.detach().reshape(()) for k, v in ctx.logs.items() if isinstance(v, torch.Tensor)
        }

    def collect(self, ctx: Context) -> dict[str, np.ndarray]:
        logs = dict(ctx.logs)
        logs.update((k, float(v)) for k, v in ctx.host.get(self.name, {}).items())
        out = {name: np.float64(logs.get(name, math.nan)) for name in ("loss", *self.logged)}
        lr = ctx.optimizer.param_groups[0]["lr"] if ctx.optimizer is not None else math.nan
        out["lr"] = np.float64(float(lr))
        return out


MEASUREMENT = Scalars

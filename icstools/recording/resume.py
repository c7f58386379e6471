"""Resuming a run after a restart: ``Recorder(..., path=P, resume=True)``.

The training process was killed (or stopped) and restarted from a checkpoint that holds the
model, the optimizer and the RNG states after ``S`` optimizer steps. The resumed recorder

1. takes the store's lock and adopts its last commit (:mod:`icstools.store.resume`): a missing,
   never committed or damaged store is a :class:`~icstools.store.StoreError`;
2. compares its configuration (``recorder_config``) with the store's: any difference is a
   :class:`~icstools.recording.errors.RecorderError` naming each key and both values (the
   store's path is not compared: a moved store can be resumed; a callable schedule is compared
   by its name, as its ``repr`` holds an address);
3. starts counting at ``S``: ``start_step=S``, or the ``"step"`` the optimizer keeps in its
   state (Adam, AdamW, RMSprop, Adagrad, …; the largest over the parameters). SGD (with or
   without momentum) and LBFGS keep no step count: ``start_step`` is required for them, and
   without an optimizer;
4. drops the store's records of steps ``>= S`` with a :class:`ResumeWarning` naming them: they
   were recorded after the checkpoint, by the run that was killed, and the resumed training
   records those steps again (from the restored state; a researcher who restores an older
   checkpoint on purpose gets the store of that trajectory, not a mix of two). The store is
   shortened at once (one metadata commit), before anything else is recorded. Scheduled steps
   between the store's last record and ``S`` were recorded but never committed before the
   kill: they cannot be recorded again, and a :class:`ResumeWarning` names them (call
   ``rec.flush()`` before saving each checkpoint so that the store holds every record up to
   it);
5. takes from the store what its first record fixed: the histogram edges of every site, the
   record sites with their units and unit dimensions, and the divergence step if it is kept.
   The quantile levels, bins, probe-sample size and seed are part of the configuration and
   must match; the probe-sample positions are drawn from the seed and the probe's shape, so
   they are the store's.

Records then continue the store; every static variable of the first resumed block must equal
the store's (the writer checks it). Quantiles are exact (bit-identical to an uninterrupted run)
while a unit's values per record stay within ``quantile_sample``; beyond, the resumed records
sample from a fresh random stream (the generator's position at the checkpoint is not stored),
so they are the same estimate from other samples.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from icstools.recording.errors import RecorderError, ResumeWarning
from icstools.store.resume import describe_steps

if TYPE_CHECKING:
    from icstools.recording.recorder import Recorder

__all__ = ["optimizer_step", "resume_run"]

_UNCOMPARED = ("path",)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_GAP = 10**6  # scheduled steps looked for between the store's last record and the restart


def optimizer_step(optimizer: Any) -> int | None:
    """The number of steps an optimizer took, from its state (``None``: it keeps none).

    Examples
    --------
    >>> import torch
    >>> w = torch.zeros(2, requires_grad=True)
    >>> opt = torch.optim.Adam([w], lr=0.1)
    >>> w.sum().backward(); opt.step(); opt.step()
    >>> optimizer_step(opt)
    2
    >>> optimizer_step(torch.optim.SGD([w], lr=0.1)) is None
    True
    """
    steps = [
        int(state["step"])
        for state in optimizer.state.values()
        if isinstance(state, dict) and "step" in state
    ]
    return max(steps) if steps else None


def _start_step(rec: Recorder, start_step: int | None) -> int:
    if start_step is not None:
        return start_step
    opt = rec.optimizer
    if opt is None:
        raise RecorderError(
            "resume=True needs the step to continue from: pass start_step= (the optimizer steps "
            "taken by the checkpoint you restored), or optimizer= with its restored state"
        )
    step = optimizer_step(opt)
    if step is not None:
        return step
    name = type(opt).__name__
    if isinstance(opt, torch.optim.SGD | torch.optim.LBFGS) or opt.state:
        raise RecorderError(
            f"resume=True: {name} keeps no step count in its state (SGD, with or without "
            "momentum, and LBFGS do not, unlike Adam): pass start_step= (the optimizer steps "
            "taken by the checkpoint you restored)"
        )
    raise RecorderError(
        f"resume=True reads the step to continue from the optimizer's state, but this {name} "
        "holds none: load its state_dict from the checkpoint before creating the Recorder, or "
        "pass start_step="
    )


def _comparable(value: Any) -> Any:
    """A configuration value as compared: object addresses in reprs removed."""
    if isinstance(value, str):
        return _ADDRESS.sub("", value)
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    return value


def _check_config(rec: Recorder, attrs: dict[str, Any]) -> None:
    raw = attrs.get("recorder_config")
    if not isinstance(raw, str):
        raise RecorderError(
            f"resume=True: the store at {rec.path} was not written by a Recorder (it has no "
            "recorder_config attribute): only a Recorder's run can be resumed by one"
        )
    stored = json.loads(raw)
    current = json.loads(json.dumps(rec.config()))  # as it would be stored
    keys = sorted((set(stored) | set(current)) - set(_UNCOMPARED))
    missing = object()
    differ = [
        k
        for k in keys
        if _comparable(stored.get(k, missing)) != _comparable(current.get(k, missing))
    ]
    if differ:
        lines = "; ".join(
            f"{k}: the store has {stored.get(k, '(not set)')!r}, this Recorder "
            f"{current.get(k, '(not set)')!r}"
            for k in differ
        )
        raise RecorderError(
            f"resume=True: the Recorder's configuration differs from the store's at {rec.path} "
            f"in {differ}: {lines}. A resumed run must record what the store holds: give the "
            "Recorder the same keywords as the run that wrote it (or record to a new path)"
        )


def _warn_dropped(rec: Recorder, dropped: np.ndarray, start: int) -> None:
    if dropped.size:
        warnings.warn(
            f"resume=True at step {start}: the store at {rec.path} held records after it, which "
            f"the killed run made after the checkpoint; they are dropped ({describe_steps(dropped)}"
            ") and the resumed training records these steps again",
            ResumeWarning,
            stacklevel=4,
        )


def _warn_gap(rec: Recorder, kept: np.ndarray, start: int) -> None:
    """Scheduled steps between the store's last record and ``start`` were never committed
    (a store without records says nothing about where its run began: no warning)."""
    if not kept.size:
        return
    first = int(kept[-1]) + 1
    if start - first > _MAX_GAP:
        lost = f"the scheduled steps of {first}–{start - 1}"
    else:
        missing = [s for s in range(first, start) if rec.schedule(s)]
        if not missing:
            return
        lost = f"{describe_steps(missing)}"
    warnings.warn(
        f"resume=True at step {start}: the store at {rec.path} ends at step {first - 1}, "
        f"so {lost} were recorded but not committed before the restart and stay missing "
        "(call rec.flush() before saving each checkpoint to keep every record up to it)",
        ResumeWarning,
        stacklevel=4,
    )


def _restore_layout(rec: Recorder, stored: Any) -> None:
    """Fix the record sites, their units and the histogram edges as the store's first record
    did (the layout of the first resumed record is then the store's)."""
    ctx = rec._ctx
    units = ctx.units
    if "site" in stored.coords and "site_units" in stored.coords:
        for name, width, dim in zip(
            stored["site"].values.tolist(),
            stored["site_units"].values.tolist(),
            stored["site_unit_dim"].values.tolist(),
            strict=True,
        ):
            units.widths[name] = int(width)
            units.unit_dims[name] = int(dim)
            units.base[name] = (name.rpartition("#")[0] or name) if units.separate else name
    for m in ctx.measurements:
        restore = getattr(m, "restore", None)
        if restore is not None:
            restore(ctx, stored)


def resume_run(rec: Recorder, start_step: int | None) -> None:
    """Continue the store of ``rec`` (made with ``resume=True``); see the module docstring."""
    writer = rec._sink.store_writer
    if writer is None or writer.resumed is None or writer.resumed_steps is None:
        raise RecorderError("resume=True continues a store: give the Recorder its path=")
    stored = writer.resumed
    _check_config(rec, stored.attrs)
    start = _start_step(rec, start_step)
    dropped = writer.drop_from(start)
    _warn_dropped(rec, dropped, start)
    _warn_gap(rec, writer.resumed_steps, start)
    _restore_layout(rec, stored)
    diverged = writer.resumed.attrs.get("diverged_step")
    if isinstance(diverged, int):
        rec.diverged_step = diverged
    rec._ctx.step = start

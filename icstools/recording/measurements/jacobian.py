"""Jacobian spectra of blocks on the probe head, ``Recorder(jacobian=..., probe=...)``.

At the recorded steps its schedule selects, right after the probe forward, on the first
``examples`` probe examples (which form the batch whose statistics a train-mode BN uses), with
the recorder's hooks silent and no side effect: the singular values of the per-example
Jacobians of every block (:mod:`icstools.functional.jacobians`), pooled over the examples and
sorted descending (NaN-padded to the largest block), and summaries over them.

A model whose input is integer (token ids: the probe holds no floating-point tensor) has no
Jacobian from its input: its blocks start at the first floating-point site. The default
``"segments"`` then holds the segments between consecutive sites and, in place of
``"input->output"``, the block from the first site to the last; a block given from
``"input"`` is refused.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch

from icstools.recording.errors import RecorderError
from icstools.recording.isolation import isolated
from icstools.recording.measurements.base import (
    Context,
    Declaration,
    Measurement,
)
from icstools.schema import Coordinate, Variable
from icstools.sites import Site, find_tensor

__all__ = ["JacobianSpectra", "spectrum_stats"]

_HOW = "Recorder(jacobian=..., probe=...)"
_STATS = (
    ("jac_mean_sq", "mean of σ² over the pooled singular values"),
    ("jac_var_sq", "variance of σ²"),
    ("jac_log_std", "standard deviation of log σ"),
    ("jac_max", "largest σ"),
    ("jac_min", "smallest σ"),
    ("jac_frac_near_one", "share of σ in [0.5, 2]"),
)
VARIABLES = (
    Variable(
        "jac_sv",
        ("step", "block", "sv"),
        "float32",
        "singular values of the per-example Jacobians, pooled, descending (NaN-padded)",
        _HOW,
    ),
    *(Variable(name, ("step", "block"), "float64", text, _HOW) for name, text in _STATS),
)
COORDINATES = (
    Coordinate("block", ("block",), "'<from>-><to>' blocks (and 'input->output')"),
    Coordinate("block_from", ("block",), "site where a block starts ('input': the model's)"),
    Coordinate("block_to", ("block",), "site where a block ends ('output': the model's)"),
    Coordinate("sv", ("sv",), "index of a pooled singular value"),
)


def spectrum_stats(sv: np.ndarray) -> dict[str, float]:
    """Summaries of the pooled singular values ``sv [examples, n_sv]`` (DESIGN.md §4)."""
    if not np.isfinite(sv).all() or sv.size == 0:
        return dict.fromkeys((name for name, _ in _STATS), math.nan)
    sq = np.square(sv)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(sv)
    return {
        "jac_mean_sq": float(sq.mean()),
        "jac_var_sq": float(sq.var()),
        "jac_log_std": float(logs.std()) if np.isfinite(logs).all() else math.nan,
        "jac_max": float(sv.max()),
        "jac_min": float(sv.min()),
        "jac_frac_near_one": float(((sv >= 0.5) & (sv <= 2.0)).mean()),
    }


def parse_blocks(
    blocks: Any, sites: list[Site], float_input: bool = True
) -> dict[str, tuple[str, str]]:
    """``jacobian_blocks`` as a dict name -> (from_site, to_site); ``float_input=False``: the
    model's input is integer, so blocks start at sites (see the module docstring)."""
    if isinstance(blocks, str):
        if blocks != "segments":
            raise ValueError(
                f"jacobian_blocks must be 'segments', a list of (from_site, to_site) or a "
                f"dict name -> (from_site, to_site), got {blocks!r}"
            )
        names = [s.name for s in sites]
        pairs = {f"{a}->{b}": (a, b) for a, b in itertools.pairwise(names)}
        if float_input:
            pairs["input->output"] = ("input", "output")
        elif len(names) > 2:
            pairs[f"{names[0]}->{names[-1]}"] = (names[0], names[-1])
        if not pairs:
            raise RecorderError(
                "jacobian= on a model whose input is integer (the probe holds no floating-point "
                f"tensor, e.g. token ids) takes blocks between sites, and {names} has one; select "
                "two sites or more, or pass jacobian_blocks=[(from_site, to_site)]"
            )
        return pairs
    if isinstance(blocks, dict):
        items = list(blocks.items())
    elif isinstance(blocks, (list, tuple)):
        items = [(f"{a}->{b}", (a, b)) for a, b in blocks]
    else:
        raise TypeError(
            "jacobian_blocks must be 'segments', a list of (from_site, to_site) or a dict "
            f"name -> (from_site, to_site), got {type(blocks).__name__}"
        )
    out = {}
    for name, pair in items:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"block {name!r} must be (from_site, to_site), got {pair!r}")
        if not float_input and pair[0] == "input":
            raise RecorderError(
                f"block {name!r} starts at the model's input, which is integer here (the probe "
                "holds no floating-point tensor, e.g. token ids): no Jacobian exists from it; "
                "start the block at a floating-point site (e.g. an embedding's output)"
            )
        out[str(name)] = (str(pair[0]), str(pair[1]))
    return out


class JacobianSpectra(Measurement):
    """Singular values of the Jacobians of blocks, per probe example, pooled."""

    name = "jacobian"
    variables = VARIABLES
    coordinates = COORDINATES
    requires = frozenset({"probe"})

    def __init__(
        self,
        every: Any,
        blocks: dict[str, tuple[str, str]],
        examples: int,
        k: int | None,
        bn: str,
    ) -> None:
        super().__init__(every)
        if isinstance(examples, bool) or not isinstance(examples, int):
            raise TypeError(f"jacobian_examples must be an int, got {examples!r}")
        if examples < 1:
            raise ValueError(f"jacobian_examples must be ≥ 1, got {examples}")
        if bn not in ("fixed", "full"):
            raise ValueError(f"jacobian_bn must be 'fixed' or 'full', got {bn!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"jacobian_k must be an int ≥ 1 or None, got {k!r}")
        self.blocks, self.examples, self.k, self.bn = blocks, examples, k, bn
        self._out: dict[str, np.ndarray] | None = None  # block -> [examples, n_sv]

    @classmethod
    def from_options(cls, options: Any) -> JacobianSpectra | None:
        if options.jacobian is None:
            return None
        if options.probe is None:
            raise RecorderError(
                "jacobian= needs a probe batch (probe=...): spectra are taken on it"
            )
        return cls(
            options.jacobian,
            parse_blocks(
                options.jacobian_blocks, options.sites, find_tensor(options.probe) is not None
            ),
            options.jacobian_examples,
            options.jacobian_k,
            options.jacobian_bn,
        )

    def config(self) -> dict[str, Any]:
        return {
            "jacobian": repr(self.schedule),
            "jacobian_blocks": self.blocks,
            "jacobian_examples": self.examples,
            "jacobian_k": self.k,
            "jacobian_bn": self.bn,
        }

    def after_probe(self, ctx: Context) -> None:
        if self.due(ctx.step):
            with ctx.own_forwards(), isolated(ctx.model, mode=_mode(ctx)):
                self._out = {name: self._spectrum(ctx, pair) for name, pair in self.blocks.items()}

    def _spectrum(self, ctx: Context, pair: tuple[str, str]) -> np.ndarray:
        from icstools.functional.jacobians import jacobian_spectrum, segment, whole

        example = _head(ctx.probe, self.examples)
        if pair == ("input", "output"):
            block, inputs = whole(ctx.model), find_tensor(example)
        else:
            block = segment(ctx.model, pair[0], pair[1], example)
            inputs = block.inputs
        k = self.k
        if k is None:  # the whole spectrum up to 512 values per example, else the top 8
            with torch.no_grad():
                out_numel = find_tensor(block(inputs)).shape[1:].numel()
            if min(inputs[0].numel(), out_numel) > 512:
                k = 8
        res = jacobian_spectrum(block, inputs, k=k, bn=self.bn)
        return res.sv.detach().double().cpu().numpy()  # [B, n_sv]

    def reset(self, ctx: Context) -> None:
        self._out = None

    def declare(self, ctx: Context) -> Declaration:
        if self._out is None:
            raise RecorderError(
                "jacobian= is set but the first recorded step computed no spectra, which fix "
                "the run's blocks; make the jacobian schedule include the first recorded step "
                "(e.g. step 0)"
            )
        names = list(self._out)
        n_sv = max(v.size for v in self._out.values())
        coords = {
            "block": ("block", np.array(names, dtype=str)),
            "block_from": ("block", np.array([self.blocks[n][0] for n in names], dtype=str)),
            "block_to": ("block", np.array([self.blocks[n][1] for n in names], dtype=str)),
            "sv": ("sv", np.arange(n_sv, dtype=np.int64)),
        }
        return Declaration(coords, VARIABLES)

    def collect(self, ctx: Context) -> dict[str, np.ndarray]:
        spectra, self._out = self._out, None
        if not spectra:
            return {}
        out = ctx.layout.empty_all(VARIABLES)
        blocks = ctx.layout.coords["block"][1].tolist()
        for name, sv in spectra.items():
            if name not in blocks:
                continue
            i = blocks.index(name)
            pooled = np.sort(sv[np.isfinite(sv)])[::-1]  # all examples, descending
            n = min(pooled.size, out["jac_sv"].shape[1])
            out["jac_sv"][i, :n] = pooled[:n]
            for stat, value in spectrum_stats(sv).items():
                out[stat][i] = value
        return out


def _mode(ctx: Context) -> str | None:
    return "eval" if ctx.probe_mode == "eval" else None


def _head(probe: Any, n: int) -> Any:
    """The first ``n`` examples of the probe batch."""
    if isinstance(probe, dict):
        return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in probe.items()}
    if isinstance(probe, (tuple, list)):
        return tuple(v[:n] if isinstance(v, torch.Tensor) else v for v in probe)
    return probe[:n]


MEASUREMENT = JacobianSpectra

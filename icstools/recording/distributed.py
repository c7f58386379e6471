"""Distributed training: one run from all the ranks of a DDP or ``fully_shard`` (FSDP2) model.

``Recorder(model, ..., path=P)`` is the same line on every rank, ``model`` being the
``DistributedDataParallel`` wrapper (its ``.module`` is hooked) or a module that
``torch.distributed.fsdp.fully_shard`` sharded. Each rank records its local batch as usual;
when a record closes, every rank sends the mergeable state of its record to rank 0 (one
``gather_object`` per record), which merges it into its own with the states' declared merges
(:meth:`~icstools.functional.statistics.ActivationStatistics.merge`,
:meth:`~icstools.functional.gradient_statistics.GradientStatistics.merge_moments`: counts,
moment sums, extremes, histograms, quantile samples thinned to a common rate), so the record
describes the global batch; rank 0 writes ``P`` (attrs ``world_size``, ``ranks_merged``,
``distributed``), the other ranks write nothing, and :meth:`to_dataset` gives rank 0's dataset
on every rank (a broadcast: call it on every rank, like torchmetrics' ``compute()``).

What is merged and what runs once:

- activation statistics and site gradients: merged over ranks. Site gradients are those of the
  loss DDP optimizes, the mean of the ranks' losses (each rank's ``dL/dx`` divided by the world
  size, as DDP averages parameter gradients), so a DDP run records what one process gives on
  the concatenated batch. Logged scalars (``rec.log``) are averaged over the ranks that logged
  them. ``calls`` counts the module calls of all ranks.
- histogram edges: fixed at the first record from the range of rank 0's probe values, or
  without a probe of the training values all ranks saw (unless ``hist_range`` is given): with
  one forward per step, the edges one process takes from the probe or the concatenated batch.
  Until the ranks agree, each keeps every value of its first record (as
  ``quantile_sample=None``).
- DDP: the probe forward, ``probe_sample``, the Jacobian spectra, parameter dynamics
  (gradients are already averaged and the weights equal), ``ics``, ``landscape`` and
  user-defined measurements run on rank 0 only, on its underlying module (no collective inside
  them: no DDP buffer broadcast, nothing another rank waits for); ``ics`` and ``landscape``
  evaluate rank 0's local batch with the global update.
- ``fully_shard`` (a 1-D mesh of all ranks): parameter norms (``param_norm``,
  ``param_grad_norm``, ``update_norm``) are taken on each rank's shards and summed over the
  shards (in quadrature); user-defined measurements run on rank 0, as with DDP. A forward of a
  sharded model gathers parameters on every rank, so rank 0 cannot run one alone: ``probe``,
  ``probe_sample``, ``jacobian``, ``ics`` and ``landscape`` raise :class:`RecorderError`.

Rank 0's recorder holds the run (``n_records``, ``last_record()``, ``diverged_step``, the
``on_record`` callback); on the other ranks these stay empty, and only ``to_dataset()``
gives them the merged run.

Every collective uses the model's process group (DDP's ``process_group``; the default group
for ``fully_shard``), whose timeout bounds a wait for a rank that failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from icstools.functional.gradient_statistics import GradientStatistics
from icstools.functional.statistics import choose_hist_edges
from icstools.recording.errors import RecorderError
from icstools.recording.layout import Layout

if TYPE_CHECKING:
    from icstools.recording.measurements import Context, Measurement
    from icstools.recording.measurements.activations import Activations
    from icstools.recording.measurements.parameters import ParameterDynamics
    from icstools.recording.measurements.site_gradients import SiteGradients

__all__ = ["DistributedRun", "detect"]

#: Measurements whose data every rank contributes; all others run on rank 0 only.
_MERGED = frozenset({"activations", "site_gradients", "amp"})
#: Recorder keywords that need a forward or a backward on rank 0 alone.
_RANK0_ALONE = ("probe", "probe_sample", "jacobian", "ics", "landscape")
_SUPPORTED = (
    "supported with fully_shard: activation statistics and gradients=True (site gradients "
    "merged over ranks, parameter norms summed over shards); with DistributedDataParallel the "
    "probe, probe_sample, jacobian, ics and landscape run on rank 0"
)


def detect(model: nn.Module) -> DistributedRun | None:
    """The distributed run a model takes part in (``None``: a model of one process).

    A ``DistributedDataParallel`` wrapper, or a module of which a submodule or itself was
    sharded by ``fully_shard``; the legacy ``FullyShardedDataParallel`` wrapper raises.
    """
    if not isinstance(model, nn.Module) or not torch.distributed.is_available():
        return None
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DistributedRun("ddp", model.module, model.process_group)
    from torch.distributed import fsdp

    if isinstance(model, fsdp.FullyShardedDataParallel):
        raise RecorderError(
            "the legacy FullyShardedDataParallel wrapper is not supported: its flat parameters "
            "hide the modules' own. Shard the model with torch.distributed.fsdp.fully_shard "
            f"(FSDP2) or wrap it in DistributedDataParallel; {_SUPPORTED}"
        )
    if any(isinstance(m, fsdp.FSDPModule) for m in model.modules()):
        run = DistributedRun("fsdp", model, None)
        meshes = {getattr(p, "device_mesh", None) for p in model.parameters()} - {None}
        for mesh in meshes:
            if mesh.ndim != 1 or mesh.size() != run.world_size:
                raise RecorderError(
                    f"fully_shard over a device mesh of shape {tuple(mesh.shape)} is not "
                    f"supported: the recorder merges the {run.world_size} ranks of the default "
                    "process group and sums parameter norms over their shards, which needs a "
                    f"1-D mesh of all of them (fully_shard(model) without a mesh); {_SUPPORTED}"
                )
        return run
    return None


class DistributedRun:
    """The ranks of one distributed run; rank 0 of the group writes the merged records.

    Parameters
    ----------
    kind : {"ddp", "fsdp"}
        How the model is distributed.
    module : torch.nn.Module
        The module the recorder hooks (DDP's ``.module``; the sharded model itself).
    group : ProcessGroup or None
        The group of the collectives (``None``: the default group).
    """

    def __init__(self, kind: str, module: nn.Module, group: Any) -> None:
        dist = torch.distributed
        if not dist.is_initialized():
            raise RecorderError(
                f"the model is distributed ({kind}) but no process group is initialized: call "
                "torch.distributed.init_process_group(...) on every rank first"
            )
        self.kind, self.module, self.group = kind, module, group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.writer = self.rank == 0
        self._root = dist.get_global_rank(group, 0) if group is not None else 0
        self._edges_agreed = False

    # ---------------------------------------------------------------------- set-up
    def check(self, **options: Any) -> None:
        """Raise :class:`RecorderError` for a keyword the run cannot support (``fully_shard``:
        anything that needs a forward on rank 0 alone)."""
        if self.kind != "fsdp":
            return
        given = [k for k in _RANK0_ALONE if options.get(k) is not None]
        if given:
            raise RecorderError(
                f"{', '.join(f'{k}=' for k in given)} cannot be recorded on a model sharded with "
                "fully_shard: a forward of a sharded model gathers its parameters on every "
                f"rank, so rank 0 cannot run one alone; {_SUPPORTED}"
            )

    def localize(self, ctx: Context) -> list[Measurement]:
        """This rank's measurements: all of them on rank 0; elsewhere only the merged ones
        (and, with ``fully_shard``, the parameter norms of the local shards). Other ranks run
        no probe. Until the ranks agree on histogram edges, every value is kept."""
        for m in ctx.measurements:
            if m.name == "activations":
                m.keep_all = True  # type: ignore[attr-defined]
        if self.writer:
            return list(ctx.measurements)
        ctx.probe = None
        merged = _MERGED | ({"parameters"} if self.kind == "fsdp" else set())
        return [m for m in ctx.measurements if m.name in merged]

    def attrs(self) -> dict[str, Any]:
        """Attributes of the merged run."""
        return {
            "world_size": self.world_size,
            "ranks_merged": self.world_size,
            "distributed": self.kind,
        }

    # ---------------------------------------------------------------------- each record
    def exchange(self, ctx: Context) -> bool:
        """Merge the open record's states of all ranks into rank 0's (on every rank, when a
        record closes). Returns whether this rank closes the record (rank 0); the others
        have sent and forgotten theirs."""
        found = {m.name: m for m in ctx.measurements}
        act: Activations | None = found.get("activations")  # type: ignore[assignment]
        grads: SiteGradients | None = found.get("site_gradients")  # type: ignore[assignment]
        params: ParameterDynamics | None = (
            found.get("parameters") if self.kind == "fsdp" else None  # type: ignore[assignment]
        )
        if act is not None and not self._edges_agreed:
            self._agree_edges(ctx, act)
        payload = {
            # rank 0 merges into its own objects: it sends none
            "act": {k: s.to("cpu") for k, s in act.states.items() if s.calls}
            if act is not None and not self.writer
            else {},
            "grad": {
                name: (g.unit_dim, g.n, g.mean.cpu(), g.m2.cpu())
                for name, g in (grads.states.items() if grads else ())
                if g.n and g.mean is not None and g.m2 is not None
            },
            "logs": {k: float(v) for k, v in ctx.logs.items()},
            "norms": {k: v.double().cpu() for k, v in params.norms.items()} if params else {},
        }
        gathered: list[Any] | None = [None] * self.world_size if self.writer else None
        torch.distributed.gather_object(payload, gathered, dst=self._root, group=self.group)
        if gathered is None:
            self._forget(ctx)
            return False
        if act is not None:
            _merge_activations(act, gathered)
        if grads is not None:
            self._merge_gradients(grads, gathered)
        if params is not None:
            _sum_norms(params, gathered)
        ctx.logs = _mean_logs(gathered)
        return True

    def _forget(self, ctx: Context) -> None:
        """After sending (ranks other than 0): forget the record, as rank 0 does once it is
        written; the first record fixes the sites here too."""
        if ctx.layout is None and (ctx.units.base or ctx.logs):
            ctx.layout = Layout.fix(ctx)
        for m in ctx.measurements:
            m.reset(ctx)
        ctx.logs = {}

    def _agree_edges(self, ctx: Context, act: Activations) -> None:
        """Fix each site's histogram edges from the range of the values all ranks saw (one
        ``all_gather_object``), and histogram the kept values again on them."""
        local: dict[str, dict[str, tuple[float, float, str]]] = {}
        for (source, name), stats in act.states.items():
            state = stats.state
            if state is None or act.fixed_range(ctx, name) is not None:
                continue
            valid = state.count > 0
            if bool(valid.any()):
                lo, hi = float(state.min[valid].min()), float(state.max[valid].max())
                local.setdefault(name, {})[source] = (lo, hi, str(state.min.dtype))
        seen_any = any(s.calls for s in act.states.values())
        ranges: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(ranges, (local, seen_any), group=self.group)
        for name in dict.fromkeys(n for r, _ in ranges for n in r):
            # the probe's values when rank 0 has them (one process takes the probe's, which
            # run first), else those of the training batches of all ranks
            by_rank = [r[name] for r, _ in ranges if name in r]
            source = "probe" if any("probe" in s for s in by_rank) else "train"
            seen = [s[source] for s in by_rank if source in s]
            dtype = getattr(torch, seen[0][2].removeprefix("torch."))
            span = torch.tensor([min(s[0] for s in seen), max(s[1] for s in seen)], dtype=dtype)
            act.set_edges(name, choose_hist_edges(span, act.bins))
        if any(flag for _, flag in ranges):  # the same decision on every rank
            self._edges_agreed = True
            act.keep_all = False
            for stats in act.states.values():
                stats.quantile_sample = act.quantile_sample

    def _merge_gradients(self, grads: SiteGradients, gathered: list[dict[str, Any]]) -> None:
        """Site gradients of all ranks, each divided by the world size (the gradient of the
        mean of the ranks' losses, which DDP's averaged parameter gradients descend)."""
        w = self.world_size
        merged: dict[str, GradientStatistics] = {}
        for payload in gathered:
            for name, (unit_dim, n, mean, m2) in payload["grad"].items():
                mine = grads.states.get(name)
                device = mine.mean.device if mine is not None and mine.mean is not None else "cpu"
                g = merged.setdefault(name, GradientStatistics(unit_dim))
                g.merge_moments(n, mean.to(device) / w, m2.to(device) / (w * w))
        grads.states.update(merged)

    # ---------------------------------------------------------------------- reading the run
    def share(self, make: Callable[[], Any]) -> Any:
        """``make()`` on rank 0, broadcast to every rank (its exception raised on all)."""
        box: list[Any] = [None]
        if self.writer:
            try:
                box[0] = (True, make())
            except Exception as err:
                box[0] = (False, err)
        torch.distributed.broadcast_object_list(box, src=self._root, group=self.group)
        ok, value = box[0]
        if not ok:
            if not self.writer:
                value.add_note("icstools: raised on rank 0, which reads the merged run")
            raise value
        return value


def _merge_activations(act: Activations, gathered: list[dict[str, Any]]) -> None:
    """Merge the other ranks' activation statistics into rank 0's, in rank order."""
    states = act.states
    for payload in gathered[1:]:
        for key, other in payload["act"].items():
            mine = states.get(key)
            if mine is None:
                states[key] = other
                continue
            state = mine.state
            mine.merge(other if state is None else other.to(state.mean.device))


def _sum_norms(params: ParameterDynamics, gathered: list[dict[str, Any]]) -> None:
    """Norms of whole parameters from the norms of their shards: ``sqrt(Σ shard²)``."""
    out = params.norms
    for key in ("param_grad_norm", "param_norm", "update_norm"):
        parts = [p["norms"][key] for p in gathered if key in p["norms"]]
        if parts and key in out:
            whole = torch.stack(parts).square().sum(0).sqrt()
            out[key] = whole.to(out[key].device)


def _mean_logs(gathered: list[dict[str, Any]]) -> dict[str, float]:
    """Logged scalars averaged over the ranks that logged them (rank 0's names first)."""
    names = list(dict.fromkeys(k for p in gathered for k in p["logs"]))
    out = {}
    for name in names:
        values = [p["logs"][name] for p in gathered if name in p["logs"]]
        out[name] = sum(values) / len(values)
    return out

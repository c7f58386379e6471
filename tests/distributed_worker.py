"""One rank of the distributed tests (tests/test_distributed.py), and their one-process twins.

Run as ``python distributed_worker.py RANK WORLD_SIZE RENDEZVOUS_FILE OUT_DIR``: joins a gloo
process group (timeout 60 s, so a bug fails instead of hanging), runs every scenario and
pickles what the test compares to ``OUT_DIR/rank{RANK}.pkl``. The test imports this file to
run the same scenarios in one process on the concatenated batch.
"""

from __future__ import annotations

import datetime
import pickle
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icstools import Recorder

STEPS, BATCH, WORLD = 3, 8, 2  # BATCH examples per rank


class Counter(nn.Module):
    """Identity that counts its forwards (probe, Jacobian, ICS, ... included)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def make_model(bn: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [Counter(), nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 10)]
    layers += [nn.BatchNorm1d(10)] if bn else []
    layers += [nn.ReLU(), nn.Linear(10, 3)]
    return nn.Sequential(*layers)


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batch of each step (``WORLD * BATCH`` examples); rank r takes its r-th part."""
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(WORLD * BATCH, 6, generator=g) * 2 + 0.5, torch.randn(WORLD * BATCH, 3))
        for _ in range(STEPS)
    ]


PROBE = torch.linspace(-3, 3, 5 * 6).reshape(5, 6)


def train(
    wrapped: nn.Module, inner: nn.Module, rank: int, world: int, path: Any = None, **opts: Any
) -> dict[str, Any]:
    """``STEPS`` SGD steps of ``wrapped`` on this rank's share of the global batches."""
    opt = torch.optim.SGD(inner.parameters(), lr=0.1, momentum=0.5)
    rec = Recorder(wrapped, optimizer=opt, path=path, **opts)
    with rec:
        for x, y in global_batches():
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            loss = nn.functional.mse_loss(wrapped(x), y)
            rec.set_target(y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
        ds = rec.to_dataset()
    return {"ds": ds, "path": rec.path, "n_records": rec.n_records, "calls": inner[0].calls}


DDP_OPTS: dict[str, Any] = dict(
    probe=PROBE,
    gradients=True,
    jacobian=1,
    ics=2,
    landscape=2,
    loss_fn=nn.functional.mse_loss,
)


def ddp_run(rank: int, world: int, out: Path) -> dict[str, Any]:
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    return train(ddp, model, rank, world, path=out / "ddp.zarr", **DDP_OPTS)


def ddp_buffers(rank: int, world: int, recorded: bool) -> dict[str, torch.Tensor]:
    """Weights and BN buffers after training a DDP model with BN, with or without a recorder
    whose probe runs in train mode (its forward must leave no trace, on any rank)."""
    model = make_model(bn=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(ddp, optimizer=opt, probe=PROBE, jacobian=1) if recorded else None
    if rec is not None:
        rec.attach()
    for x, y in global_batches():
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rec is not None:
        rec.detach()
        rec.close()
    return {k: v.clone() for k, v in model.state_dict().items()}


def nothing_recorded(rank: int, world: int) -> dict[str, Any]:
    """``to_dataset()`` before any record: the same error on every rank (not a hang)."""
    rec = Recorder(nn.parallel.DistributedDataParallel(make_model()))
    try:
        rec.to_dataset()
    except Exception as err:
        return {"error_raised": f"{type(err).__name__}: {err}"}
    return {"error_raised": None}


def fsdp_run(rank: int, world: int, out: Path) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model[1])
    fully_shard(model)
    result = train(model, model, rank, world, path=out / "fsdp.zarr", gradients=True)
    try:
        Recorder(model, probe=PROBE)
    except Exception as err:
        result["probe_error"] = f"{type(err).__name__}: {err}"
    return result


def main() -> None:
    start = time.perf_counter()
    rank, world, rendezvous, out = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:5]
    out = Path(out)
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    print(f"rank {rank}: started in {time.perf_counter() - start:.1f} s", flush=True)
    results: dict[str, Any] = {}
    for name, run in (
        ("ddp", lambda: ddp_run(rank, world, out)),
        ("bn_plain", lambda: ddp_buffers(rank, world, recorded=False)),
        ("bn_recorded", lambda: ddp_buffers(rank, world, recorded=True)),
        ("nothing", lambda: nothing_recorded(rank, world)),
        ("fsdp", lambda: fsdp_run(rank, world, out)),
    ):
        start = time.perf_counter()
        try:
            results[name] = run()
            print(f"rank {rank}: {name} {time.perf_counter() - start:.1f} s", flush=True)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

"""Shared helpers of the benchmarks: machine info, models, data and one training step.

Imported by ``bench/overhead.py`` and ``bench/memory.py`` (run as scripts, so ``bench/`` is on
``sys.path``). Not part of the ``icstools`` package.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import icstools
from icstools.experiments import paper_mlp, small_cnn

RESULTS = Path(__file__).resolve().parent / "results"

MLP_BATCH = 60
CNN_BATCH = 128
LR = 0.1


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def source_fingerprint() -> dict[str, Any]:
    """sha256 of the ``icstools`` sources as loaded (the package changes; figures belong to one
    version), and the time of the newest source file."""
    root = Path(icstools.__file__).resolve().parent
    files = sorted(root.glob("*.py"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    newest = max(f.stat().st_mtime for f in files)
    return {
        "icstools_sources_sha256": digest.hexdigest()[:16],
        "icstools_newest_source_utc": _dt.datetime.fromtimestamp(
            newest, _dt.timezone.utc
        ).isoformat(timespec="seconds"),
    }


def machine_info() -> dict[str, Any]:
    """What the figures depend on: versions, threads, CPU, load, package sources."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "icstools": icstools.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_at_start": load,
        **source_fingerprint(),
    }


def loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------------ data
def mnist_wanted(choice: str) -> bool:
    """``auto``: real MNIST when ``ICSTOOLS_DATA`` is set (as ``make bench`` does)."""
    if choice == "mnist":
        return True
    if choice == "random":
        return False
    return bool(os.environ.get("ICSTOOLS_DATA"))


def mlp_batches(choice: str, seed: int = 0) -> tuple[Iterator[tuple[torch.Tensor, ...]], str]:
    """Endless ``([60, 784] in [0, 1], labels)`` batches: MNIST if wanted and found, else random.

    Random batches come from a fixed pool of 64 (generated once, so drawing a batch costs the
    same as slicing MNIST does, and both timed variants see the same kind of data).
    """
    gen = torch.Generator().manual_seed(seed)
    if mnist_wanted(choice):
        from icstools.data import MNISTError, batches, mnist_tensors

        try:
            x, y = mnist_tensors("train")
        except MNISTError as exc:
            if choice == "mnist":
                raise
            print(f"[bench] MNIST not usable ({type(exc).__name__}); using random inputs")
        else:
            return batches(x, y, MLP_BATCH, generator=gen), "mnist"
    xs = torch.rand(64, MLP_BATCH, 28 * 28, generator=gen)
    ys = torch.randint(0, 10, (64, MLP_BATCH), generator=gen)
    return _cycle(xs, ys), "random"


def cnn_batches(seed: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless random ``[128, 3, 32, 32]`` batches (a pool of 4) with labels."""
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(4, CNN_BATCH, 3, 32, 32, generator=gen)
    ys = torch.randint(0, 10, (4, CNN_BATCH), generator=gen)
    return _cycle(xs, ys)


def _cycle(xs: torch.Tensor, ys: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    i = 0
    while True:
        yield xs[i], ys[i]
        i = (i + 1) % len(xs)


# ------------------------------------------------------------------------------------ models
def build(model: str, bn: bool = True, seed: int = 0) -> nn.Module:
    """``"mlp"``: ``paper_mlp(bn)``; ``"cnn"``: ``small_cnn()``; parameters seeded."""
    torch.manual_seed(seed)
    if model == "mlp":
        return paper_mlp(bn=bn)
    if model == "cnn":
        return small_cnn()
    raise ValueError(f"unknown model {model!r}")


def make_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Iterator[tuple[torch.Tensor, ...]],
    log: Callable[[torch.Tensor], None] | None = None,
) -> Callable[[], None]:
    """One SGD step on the next batch; ``log(loss)`` after it (e.g. ``rec.log``)."""
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        xb, yb = next(data)
        loss = loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None:
            log(loss)

    return step

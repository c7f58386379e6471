"""GPU-ready by construction: no host synchronisation inside the hooks, one device-to-host
transfer per record.

There is no GPU here, so the test runs the accelerator code paths on CPU: the one function that
decides whether a tensor lives in host memory (:func:`icstools.functional.statistics.on_host`)
is made to say no, which turns off every CPU shortcut (numpy folds, the finite check that reads
a value). Then every call that reads device memory from the host is counted: ``.cpu()``,
``.to(cpu)`` (a blocking copy), ``.numpy()`` (of anything but the one transferred buffer),
``.item()``, ``.tolist()``, ``bool()``/``float()``/``int()`` of a tensor and
``torch.cuda.synchronize``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import icstools.functional.statistics as statistics
from icstools import Recorder
from icstools.experiments.models import paper_mlp, small_cnn

_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


class Where:
    """The counter that host reads go to now (switched while a record closes)."""

    def __init__(self, counts: Counter) -> None:
        self.counts = counts

    def update(self, names: list[str]) -> None:
        self.counts.update(names)

    def __getitem__(self, name: str) -> int:
        return self.counts[name]

    def __setitem__(self, name: str, value: int) -> None:
        self.counts[name] = value


@contextlib.contextmanager
def _counting(counts: Counter | Where) -> Iterator[None]:
    """Count host reads of tensors while active (``counts["transfer"]``: ``.cpu()`` and
    blocking ``.to(cpu)``; the others by method name)."""
    originals = {name: getattr(torch.Tensor, name) for name in (*_READS, "cpu", "numpy", "to")}
    transferred: set[int] = set()  # .numpy() of a buffer just copied to the host is free

    def read(name: str):  # type: ignore[no-untyped-def]
        def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            counts[name] += 1
            return originals[name](self, *args, **kwargs)

        return wrapper

    def cpu(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        counts["transfer"] += 1
        out = originals["cpu"](self, *args, **kwargs)
        transferred.add(id(out))
        return out

    def numpy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if id(self) not in transferred:
            counts["numpy"] += 1
        return originals["numpy"](self, *args, **kwargs)

    def to(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
            if not kwargs.get("non_blocking", False):
                counts["transfer"] += 1
        return originals["to"](self, *args, **kwargs)

    patched = {name: read(name) for name in _READS} | {"cpu": cpu, "numpy": numpy, "to": to}
    sync = torch.cuda.synchronize
    try:
        for name, fn in patched.items():
            setattr(torch.Tensor, name, fn)
        torch.cuda.synchronize = lambda *a, **k: counts.update(["synchronize"])  # type: ignore[assignment]
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.cuda.synchronize = sync


@pytest.fixture
def accelerator_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statistics, "on_host", lambda device: False)


def _train_counting(model: nn.Module, shape: tuple[int, ...], steps: int, **options: object):
    """Counts during the hooks of ``steps`` training steps, and during the closing of their
    records (each record closes at the next step's first forward)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.rand(shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g))
        for _ in range(steps + 1)
    ]
    rec = Recorder(model, optimizer=opt, **options)
    closing, other = Counter(), Counter()
    where = Where(Counter())  # the first step: not counted
    close = rec._close_record

    def counted_close() -> None:
        before, where.counts = where.counts, closing
        try:
            close()
        finally:
            where.counts = before

    rec._close_record = counted_close  # type: ignore[method-assign]
    with _counting(where), rec:
        for i, (x, y) in enumerate(batches):
            if i == 1:
                where.counts = other
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss.detach())
    return rec, closing, other


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("mlp", {}),
        ("mlp", {"gradients": True}),
        ("mlp", {"quantile_sample": 16}),  # reduced on arrival, sampled for quantiles
        ("cnn", {"gradients": True}),
    ],
)
@pytest.mark.usefixtures("accelerator_paths")
def test_one_transfer_per_record_and_no_sync_in_hooks(kind: str, options: dict) -> None:
    torch.manual_seed(0)
    if kind == "mlp":
        model, shape = paper_mlp(bn=True, widths=(16, 16)), (20, 784)
    else:
        model, shape = small_cnn((4, 8), in_channels=1), (4, 1, 8, 8)
    steps = 4
    rec, closing, other = _train_counting(model, shape, steps, **options)
    # hooks, backward, optimizer steps of every step after the first: no read at all
    # (the record closes inside _close_record, counted apart)
    assert other == Counter(), other
    # steps + 1 records closed; each read its device tensors in exactly one transfer
    assert rec.n_records == steps + 1
    assert closing == Counter(transfer=steps + 1), closing


def test_the_counter_sees_a_host_read_in_a_hook() -> None:
    """The check can fail: a measurement that reads a value per call is caught."""
    counts = Counter()
    with _counting(counts):
        x = torch.ones(3)
        float(x.sum())
        x.max().item()
        x.cpu()
    assert counts == Counter(__float__=1, item=1, transfer=1)

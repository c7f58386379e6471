"""icstools vs Cockpit's economy configuration vs plain training, side by side in one process.

Issue 11 asks for this comparison on the paper's MLP: the same training steps (SGD, batch 60,
real MNIST when ``ICSTOOLS_DATA`` has it) timed in blocks that alternate between

- ``plain``: no instrumentation;
- ``icstools_every{1,10}``: ``Recorder(model, optimizer=opt, every=K)`` with its defaults;
- ``cockpit_every{1,10}``: ``Cockpit(model.parameters(), quantities=configuration("economy",
  track_schedule=schedules.linear(K)))`` with BackPACK's ``extend`` on the model and the loss,
  as Cockpit's documentation sets it up (its cheapest configuration).

Each ratio is the median over rounds of instrumented / plain ms per step, printed with the
smallest and largest round (Cockpit's step time drifts by 2-3x from block to block and from
run to run; the cause was not looked into). Cockpit is not a dependency of icstools:
``make bench-cockpit`` installs it into ``bench/.cockpit`` (``pip install --target``, with
``setuptools<70`` for its ``pkg_resources``, and without ``torchvision``, which BackPACK lists
but does not import for this). Without it the script says so and exits 0.

    make bench-cockpit        # installs Cockpit beside the venv, then runs this (~3 min)
    .venv/bin/python bench/vs_cockpit.py --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, build, machine_info, make_step, mlp_batches, write_json

from icstools import Recorder

COCKPIT_DIR = Path(__file__).resolve().parent / ".cockpit"


def _import_cockpit() -> tuple[object, object, object, object] | str:
    """``(Cockpit, configuration, schedules, extend)``, or why Cockpit cannot be used."""
    if COCKPIT_DIR.is_dir():
        sys.path.append(str(COCKPIT_DIR))  # after the venv: only what the venv lacks
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pkg_resources' deprecation warning
            from backpack import extend
            from cockpit import Cockpit
            from cockpit.utils import schedules
            from cockpit.utils.configuration import configuration
    except ImportError as exc:
        return (
            f"Cockpit is not installed ({exc}); `make bench-cockpit` installs it into "
            f"{COCKPIT_DIR} and runs this benchmark"
        )
    return Cockpit, configuration, schedules, extend


def _cockpit_step(model, opt, data, every: int, api) -> Callable[[], None]:
    """One step as Cockpit's documentation writes it (BackPACK-extended model and loss)."""
    cockpit_cls, configuration, schedules, extend = api
    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    individual = nn.CrossEntropyLoss(reduction="none")
    quantities = configuration("economy", track_schedule=schedules.linear(every))
    cockpit = cockpit_cls(model.parameters(), quantities=quantities)
    state = {"step": 0}

    def step() -> None:
        x, y = next(data)
        out = model(x)  # [batch, classes]
        loss = loss_fn(out, y)
        losses = individual(out, y)  # [batch]
        opt.zero_grad(set_to_none=True)
        info = {"batch_size": x.shape[0], "individual_losses": losses, "loss": loss}
        with cockpit(state["step"], info={**info, "optimizer": opt}), warnings.catch_warnings():
            # BackPACK's full backward hook on the first layer, whose input needs no gradient
            warnings.filterwarnings("ignore", "Full backward hook", UserWarning)
            loss.backward(create_graph=cockpit.create_graph(state["step"]))
        opt.step()
        state["step"] += 1

    return step


def _time(step: Callable[[], None], steps: int, rec: Recorder | None) -> float:
    """ms per step of ``steps`` steps (the recorder attached only for the block)."""
    if rec is not None:
        rec.attach()
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if rec is not None:
            rec.flush()
        return (time.perf_counter() - t0) * 1e3 / steps
    finally:
        if rec is not None:
            rec.detach()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bn", type=int, choices=(0, 1), default=0, help="the MLP with BN")
    ap.add_argument("--out", type=Path, default=RESULTS / "vs_cockpit.json")
    args = ap.parse_args(argv)
    api = _import_cockpit()
    if isinstance(api, str):
        print(f"skipped: {api}")
        return 0
    torch.set_num_threads(args.threads)
    base = build("mlp", bn=bool(args.bn))
    data, source = mlp_batches("auto")
    variants: dict[str, tuple[Callable[[], None], Recorder | None]] = {}
    kinds = ("plain", "icstools_every1", "icstools_every10", "cockpit_every1", "cockpit_every10")
    for name in kinds:
        model = copy.deepcopy(base)  # each its own copy: BackPACK extends the modules in place
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        every = 10 if name.endswith("every10") else 1
        if name == "plain":
            variants[name] = (make_step(model, opt, data), None)
        elif name.startswith("icstools"):  # the plain step, with the recorder attached per block
            rec = Recorder(model, optimizer=opt, every=every)
            variants[name] = (make_step(model, opt, data), rec)
        else:
            variants[name] = (_cockpit_step(model, opt, data, every, api), None)
    names = list(variants)
    for name in names:  # warm-up
        _time(variants[name][0], max(10, args.steps // 5), variants[name][1])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            step, rec = variants[name]
            times[name].append(_time(step, args.steps, rec))
    ratios = {
        n: statistics.median(t / p for t, p in zip(times[n], times["plain"], strict=True))
        for n in names
    }
    records = {n: rec.n_records for n, (_, rec) in variants.items() if rec is not None}
    print(
        f"paper MLP ({'with' if args.bn else 'no'} BN), batch 60, {source} inputs, "
        f"{args.threads} torch threads, {args.rounds} rounds of {args.steps} steps"
    )
    for n in names:
        held = f"  ({records[n]} records)" if n in records else ""
        each = [t / p for t, p in zip(times[n], times["plain"], strict=True)]
        spread = f"[{min(each):.2f}, {max(each):.2f}]"
        print(
            f"  {n:18s} {statistics.median(times[n]):8.3f} ms/step  {ratios[n]:6.2f}x plain "
            f"{spread:>16s}{held}"
        )
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "bn": bool(args.bn),
            "source": source,
            "ms_per_step": times,
            "ratio_median": ratios,
            "icstools_records": records,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

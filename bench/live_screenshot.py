"""The live view's screenshot in README and docs (docs/images/live-view.png).

Trains the paper's MNIST MLP without BN (784-100-100-100-10 sigmoid, batches of 60, SGD lr
0.5) for 3,000 steps with a recorder (every 20 steps, 500 probe images, gradients) and a live
view that rewrites its frame to the PNG (``icstools.live(rec, save=...)``); the file holds the
last frame. Usage: ``.venv/bin/python bench/live_screenshot.py [OUT.png]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import build, make_step, mlp_batches

import icstools

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "images" / "live-view.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model = build("mlp", bn=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data, kind = mlp_batches("auto")
    probe = next(mlp_batches(kind, seed=7)[0])[0]
    probe = torch.cat([probe] + [next(data)[0] for _ in range(7)])[:480]
    rec = icstools.Recorder(model, every=20, optimizer=opt, probe=probe, gradients=True)
    view = icstools.live(rec, save=out)
    step = make_step(model, opt, data, log=lambda loss: rec.log(loss=loss))
    with rec:
        for _ in range(3000):
            step()
    view.wait(600)
    view.stop()
    print(f"{kind} data; {view.status}; {view.draws} frames -> {out}")


if __name__ == "__main__":
    main()

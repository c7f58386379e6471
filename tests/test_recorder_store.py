"""Recorder + store across processes: SIGKILL mid-training, reading another process's run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

import icstools

# The child trains a seeded model under a Recorder writing to a store, and prints how many
# records are committed after every step. The parent can replay the same run in memory.
TRAIN = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import icstools

    torch.set_num_threads(1)

    def run(path, steps, on_step=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.Sigmoid(), nn.Linear(24, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        gen = torch.Generator().manual_seed(1)
        probe = torch.randn(32, 12, generator=gen)
        rec = icstools.Recorder(model, nn.Sigmoid, role="input", every=2, optimizer=opt,
                                probe=probe, path=path, chunk_steps=4, flush_seconds=0.05)
        with rec:
            for _ in range(steps):
                x = torch.randn(20, 12, generator=gen)
                y = torch.randint(0, 3, (20,), generator=gen)
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step(); rec.log(loss=loss)
                if on_step is not None:
                    on_step(rec)
        return rec

    if __name__ == "__main__":
        run(sys.argv[1], 10**6, lambda rec: print(rec.n_committed, flush=True))
    """
)


def _replay(tmp_path, steps):
    sys.path.insert(0, str(tmp_path))
    try:
        import train_child

        return train_child.run(None, steps).to_dataset()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("train_child", None)


def test_sigkill_mid_training_leaves_a_readable_prefix(tmp_path):
    script = tmp_path / "train_child.py"
    script.write_text(TRAIN)
    rng = np.random.default_rng(0)
    longest = 0
    for attempt in range(4):
        path = tmp_path / f"run{attempt}.zarr"
        with subprocess.Popen(
            [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True
        ) as child:
            try:
                target = 2 + 3 * attempt  # kill after a few commits, at a random moment
                committed = 0
                while committed < target:
                    line = child.stdout.readline()
                    assert line, f"child ended early: rc={child.poll()}"
                    committed = int(line)
                time.sleep(float(rng.uniform(0, 0.05)))
                os.kill(child.pid, signal.SIGKILL)
                # everything printed before the kill was committed before it
                rest = child.stdout.read().split()
                committed = max([committed, *map(int, rest)])
            finally:
                child.kill()
        ds = icstools.open_run(path)
        n = ds.sizes["step"]
        assert n >= committed > 0
        assert ds.step.values.tolist() == list(range(0, 2 * n, 2))
        longest = max(longest, n)
        reference = _replay(tmp_path, 2 * n)
        for name in ("mean", "var", "quantile_value", "hist", "loss"):
            np.testing.assert_array_equal(
                ds[name].values, reference[name].isel(step=slice(0, n)).values, err_msg=name
            )
    assert longest >= 8


def test_a_run_written_by_one_process_is_read_by_another(tmp_path):
    script = tmp_path / "train_child.py"
    script.write_text(TRAIN)
    path = tmp_path / "run.zarr"
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import train_child; "
        f"train_child.run({str(path)!r}, 9)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    ds = icstools.open_run(path)
    reference = _replay(tmp_path, 9)
    assert ds.sizes["step"] == 5
    for name in reference.data_vars:
        np.testing.assert_array_equal(ds[name].values, reference[name].values, err_msg=name)
    assert ds.attrs["schema_version"] == 1
    nc = tmp_path / "run.nc"
    ds.to_netcdf(nc, engine="scipy")
    assert nc.stat().st_size > 0

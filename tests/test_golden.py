"""The golden test: recorder runs with every option on must give the very same dataset and the
very same trained weights as the committed golden copies (``tests/golden/``).

It guards restructurings of the recorder: behaviour and data formats stay exactly as they are.
The scenarios run in a fresh process with pinned arithmetic (see ``tests/golden/scenarios.py``,
which also says how to regenerate the copies after a deliberate change).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from scenarios import PINNED_ENV, SCENARIOS  # noqa: E402

sys.path.remove(str(GOLDEN))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("golden")
    env = {**os.environ, **PINNED_ENV}
    done = subprocess.run(
        [sys.executable, str(GOLDEN / "scenarios.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        pytest.fail(f"the golden scenarios failed:\n{done.stdout}\n{done.stderr}")
    if os.environ.get("ICSTOOLS_GOLDEN_WRITE") == "1":
        for name in SCENARIOS:
            shutil.rmtree(GOLDEN / f"{name}.zarr", ignore_errors=True)
            shutil.copytree(out / f"{name}.zarr", GOLDEN / f"{name}.zarr")
            shutil.copy(out / f"{name}-weights.npz", GOLDEN / f"{name}-weights.npz")
    return out


def _without_version(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs.pop("icstools_version", None)
    # the on-disk layout's version (2: checksums) is the store's, not the recorder's output
    ds.attrs.pop("icstools_store_format", None)
    return ds


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_dataset_is_identical_to_the_golden_copy(fresh: Path, name: str) -> None:
    want = _without_version(xr.open_zarr(GOLDEN / f"{name}.zarr").load())
    got = _without_version(xr.open_zarr(fresh / f"{name}.zarr").load())
    # the configuration first: a clearer message than a long attrs diff
    assert json.loads(got.attrs["recorder_config"]) == json.loads(want.attrs["recorder_config"])
    xr.testing.assert_identical(got, want)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_weights_are_bit_identical_to_the_golden_copy(fresh: Path, name: str) -> None:
    with np.load(GOLDEN / f"{name}-weights.npz", allow_pickle=False) as f:
        want = dict(f)
    with np.load(fresh / f"{name}-weights.npz", allow_pickle=False) as f:
        got = dict(f)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].tobytes() == value.tobytes(), f"{key} differs"


def test_the_golden_scenarios_cover_every_option() -> None:
    everything = xr.open_zarr(GOLDEN / "everything.zarr")
    for var in (
        "probe_sample",
        "grad_norm",
        "param_grad_norm",
        "eff_lr",
        "ics_l2",
        "landscape_loss",
        "jac_sv",
        "skipped",
        "acc",
    ):
        assert var in everything.data_vars, var
    assert any("#1" in s for s in everything.site.values.tolist())  # calls="separate"
    assert int(everything.skipped.sum()) == 1
    conv = xr.open_zarr(GOLDEN / "conv_in_memory.zarr")
    assert "diverged_step" in conv.attrs
    assert set(conv.source.values.tolist()) == {"train", "probe"}

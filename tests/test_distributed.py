"""Distributed training (icstools.recording.distributed): 2 gloo ranks on the CPU vs one process
on the concatenated batch.

Two worker processes (tests/distributed_worker.py) run every scenario once (a DDP run with
probe, Jacobian, gradients, ICS and landscape; a DDP model with BatchNorm trained with and
without a recorder; a ``fully_shard`` run); the tests compare what they returned with the same
scenarios run here in one process. The process group has a 60 s timeout and the workers are
killed after 240 s, so a deadlock fails the tests rather than hanging them.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

from icstools.recording.errors import RecorderError
from icstools.store import open_run

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("distributed_worker", HERE / "distributed_worker.py")
worker = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(worker)  # type: ignore[union-attr]

EXACT = ("count", "min", "max", "hist", "quantile_value", "sat_frac", "zero_frac", "nonfinite")
COUNTS = ("count", "hist", "zero_frac", "nonfinite")
MOMENTS = ("mean", "var", "skew", "kurt")
GRADS = ("grad_mean", "grad_var", "grad_unit_norm", "grad_norm")
PARAMS = ("param_grad_norm", "param_norm", "update_norm", "update_ratio")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of the 2 ranks returned, by scenario."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    script = str(HERE / "distributed_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(r), "2", str(out / "rendezvous"), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"
    results = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    for r, res in enumerate(results):
        errors = {k: v["error"] for k, v in res.items() if "error" in v}
        assert not errors, f"rank {r}: {errors}"
    return results


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    """The DDP scenario in one process, on the concatenated batch of each step."""
    model = worker.make_model()
    return worker.train(model, model, 0, 1, **worker.DDP_OPTS)


def _compare(
    got: xr.Dataset, want: xr.Dataset, names: tuple[str, ...], rtol: float, atol: float = 1e-9
) -> None:
    for name in names:
        a, b = got[name].values, want[name].values
        if rtol == 0:
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


def _compare_statistics(got: xr.Dataset, want: xr.Dataset) -> None:
    """Step 0 (equal weights): counts, extremes, histograms and exact quantiles equal, moments
    within 1e-6. Later steps: the weights of the two runs differ by rounding (DDP averages the
    ranks' gradients, one process takes the gradient of the whole batch), so values agree to
    1e-5 (or 1e-6 absolute, near 0); counts and histograms stay equal."""
    assert got.sizes == want.sizes
    first, first_want = got.isel(step=0), want.isel(step=0)
    _compare(first, first_want, EXACT, 0)
    _compare(first, first_want, MOMENTS, 1e-6)
    _compare(got, want, COUNTS, 0)
    _compare(got, want, ("min", "max", "quantile_value", *MOMENTS), 1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["hist_edges"].values, want["hist_edges"].values)


def test_ddp_records_the_global_batch(ranks: list[dict], one_process: dict) -> None:
    got, want = ranks[0]["ddp"]["ds"], one_process["ds"]
    _compare_statistics(got, want)
    _compare(got, want, GRADS, 1e-6)  # dL/dx of the mean of the ranks' losses
    _compare(got, want, (*PARAMS, "loss"), 1e-6)
    # every module call of both ranks is pooled
    calls = got["calls"].sel(source="train").values
    np.testing.assert_array_equal(calls, 2 * want["calls"].sel(source="train").values)


def test_ddp_probe_and_jacobian_run_once_on_rank_0(ranks: list[dict], one_process: dict) -> None:
    got, want = ranks[0]["ddp"]["ds"], one_process["ds"]
    # rank 1 ran its training forwards only; rank 0 also the probe, the Jacobian, ICS, ...
    assert ranks[1]["ddp"]["calls"] == worker.STEPS
    assert ranks[0]["ddp"]["calls"] > worker.STEPS
    probe = tuple(v for v in got.data_vars if "source" in got[v].dims)
    _compare(got.sel(source="probe", step=0), want.sel(source="probe", step=0), probe, 0)
    jac = tuple(v for v in got.data_vars if v.startswith("jac_"))
    _compare(got, want, jac, 1e-5)
    # ICS and landscape ran on rank 0's local batch: recorded, not equal to the global ones
    for name in ("ics_cos", "ics_l2", "landscape_loss"):
        values = got[name].dropna("step", how="all")
        assert values.sizes["step"] == 2 and np.isfinite(values).all(), name


def test_ddp_rank_0_writes_and_every_rank_reads_the_merged_run(ranks: list[dict]) -> None:
    r0, r1 = ranks[0]["ddp"], ranks[1]["ddp"]
    assert r1["path"] is None and r1["n_records"] == 0  # rank 1 wrote nothing
    assert r0["n_records"] == worker.STEPS
    xr.testing.assert_identical(r1["ds"], r0["ds"])
    stored = open_run(r0["path"]).load()
    xr.testing.assert_identical(stored, r0["ds"])
    assert stored.attrs["world_size"] == 2 and stored.attrs["ranks_merged"] == 2
    assert stored.attrs["distributed"] == "ddp"


def test_ddp_probe_leaves_no_trace(ranks: list[dict]) -> None:
    """A train-mode probe through BatchNorm on rank 0 alone: the weights and BN buffers of
    both ranks end as in the same DDP training without a recorder (bit for bit)."""
    for res in ranks:
        plain, recorded = res["bn_plain"], res["bn_recorded"]
        assert plain.keys() == recorded.keys()
        for k in plain:
            assert torch.equal(plain[k], recorded[k]), k


def test_ddp_errors_of_rank_0_reach_every_rank(ranks: list[dict]) -> None:
    for res in ranks:  # to_dataset() before any record: rank 0's error, raised on each rank
        assert res["nothing"]["error_raised"].startswith("RecorderError: nothing was recorded")


def test_fully_shard_merges_ranks_and_sums_parameter_norms(ranks: list[dict]) -> None:
    model = worker.make_model()
    want = worker.train(model, model, 0, 1, gradients=True)["ds"]
    got = ranks[0]["fsdp"]["ds"]
    xr.testing.assert_identical(ranks[1]["fsdp"]["ds"], got)
    assert got.attrs["distributed"] == "fsdp"
    _compare_statistics(got, want)
    _compare(got, want, GRADS, 1e-6)
    # norms of whole parameters, from each rank's shards
    _compare(got, want, PARAMS, 1e-6)
    assert ranks[1]["fsdp"]["path"] is None


def test_fully_shard_refuses_what_needs_a_forward_on_rank_0(ranks: list[dict]) -> None:
    for res in ranks:
        message = res["fsdp"]["probe_error"]
        assert message.startswith("RecorderError: probe= cannot be recorded")
        assert "fully_shard" in message and "supported with fully_shard" in message


def test_a_distributed_model_needs_a_process_group() -> None:
    from icstools.recording.distributed import DistributedRun

    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RecorderError, match="init_process_group"):
        DistributedRun("ddp", torch.nn.Linear(2, 2), None)


@pytest.mark.slow
def test_readme_distributed_example_runs_with_torchrun(tmp_path: Path) -> None:
    """README's "Distributed training" script, with the command it names (2 gloo ranks)."""
    import re

    section = (HERE.parent / "README.md").read_text().split("## Distributed training", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "README lost its distributed training example"
    (tmp_path / "train_ddp.py").write_text(code.group(1))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*run, "train_ddp.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 2 50 128" in done.stdout  # what README says it prints
    ds = open_run(tmp_path / "data" / "runs" / "ddp.zarr")
    assert ds.attrs["world_size"] == 2 and ds.sizes["step"] == 50
    assert np.isfinite(ds["jac_max"].dropna("step", how="all")).all()


def test_rebin_histograms_the_kept_values_on_new_edges() -> None:
    from icstools.functional.statistics import ActivationStatistics

    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) * 2
    s = ActivationStatistics(np.linspace(-1, 1, 5), 1, quantile_sample=None)
    s.update(x[:20])
    s.update(x[20:])
    edges = np.linspace(-3, 3, 7)
    s.rebin(edges)
    inner = np.histogram(x.numpy().ravel(), edges)[0]
    under, over = int((x < -3).sum()), int((x > 3).sum())
    np.testing.assert_array_equal(s.compute()["hist"].numpy(), [under, *inner, over])
    sampled = ActivationStatistics(np.linspace(-1, 1, 5), 1, quantile_sample=8)
    sampled.update(x)  # 50 values per unit, 8 kept: the histogram cannot be redone
    with pytest.raises(ValueError, match="every value kept"):
        sampled.rebin(edges)


def test_a_statistics_copy_on_the_cpu_merges_like_the_original() -> None:
    from icstools.functional.statistics import ActivationStatistics

    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(1))
    a, b, whole = (ActivationStatistics(np.linspace(-4, 4, 9), 1) for _ in range(3))
    a.update(x[:10])
    b.update(x[10:])
    whole.update(x)
    a.merge(pickle.loads(pickle.dumps(b.to("cpu"))))  # as sent to another process
    got, want = a.compute(), whole.compute()
    for k in ("count", "min", "max", "hist", "quantile_value"):
        np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=k)
    np.testing.assert_allclose(got["var"].numpy(), want["var"].numpy(), rtol=1e-12)


def test_the_legacy_fsdp_wrapper_is_refused_with_what_is_supported() -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from icstools.recording.distributed import detect

    # an instance without a process group: detect() decides by its type alone
    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    with pytest.raises(RecorderError, match=r"fully_shard.*DistributedDataParallel"):
        detect(wrapper)
    assert detect(torch.nn.Linear(2, 2)) is None  # one process: nothing to merge

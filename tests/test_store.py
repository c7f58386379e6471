"""Tests of icstools.store: round trips, schema validation, BackgroundWriter, crash safety."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icstools import store as store_mod
from icstools.store import BackgroundWriter, RunWriter, StoreError, open_run
from icstools.store import files as store_files
from icstools.store import writer as store_writer

REPO = Path(__file__).resolve().parents[1]
STORE_ATTRS = ("icstools_store_format", "n_committed")


def make_block(start, k, n_unit=7):
    """Records ``start .. start+k-1`` of a deterministic run: every value is a function of the
    record index, so any prefix can be rebuilt with ``make_block(0, n)``. ``step`` is not the
    first axis of most variables. Self-contained: the crash test's child process runs its source.
    """
    i = np.arange(start, start + k)
    steps = (3 * i + 5).astype(np.int64)
    src = np.arange(2)[:, None, None]
    unit = np.arange(n_unit)[None, None, :]
    s = steps[None, :, None]
    mean = (s * 0.5 + unit * 0.25 + src * 1000).astype(np.float32)
    quantile_value = (mean[..., None] + np.array([-1.0, 0.0, 1.0], dtype=np.float32)).astype(
        np.float32
    )
    hist = (s * 10 + np.arange(3)[None, None, :] + src).astype(np.int64)[..., None] + np.arange(4)
    calls = (s % 7 + np.arange(3)[None, None, :] + src).astype(np.int32)
    site_names = np.array(["0:input", "1:output", "2:Ünïcode-Ω"])
    return xr.Dataset(
        {
            "mean": (("source", "step", "unit"), mean),
            "quantile_value": (("source", "step", "unit", "quantile"), quantile_value),
            "hist": (("source", "step", "site", "bin"), hist),
            "calls": (("source", "step", "site"), calls),
            "loss": ("step", 1.0 / (steps + 1.0)),
            "nonfinite": (("step", "site"), (steps[:, None] + np.arange(3)) % 5 == 0),
            "hist_edges": (("site", "edge"), np.linspace(-3.0, 3.0, 15).reshape(3, 5)),
        },
        coords={
            "step": steps,
            "source": ["train", "probe"],
            "unit_site": (
                "unit",
                np.array([f"{u % 3}:{site_names[u % 3]}" for u in range(n_unit)]),
            ),
            "quantile": [0.1, 0.5, 0.9],
            "site_name": ("site", site_names),
            "wall_time": ("step", steps * 0.125),
        },
        attrs={"model": "mlp", "seed": 3, "lr": 0.01},
    )


def concat(blocks):
    return xr.concat(
        blocks, dim="step", data_vars="minimal", coords="minimal", compat="equals", join="exact"
    )


def assert_same_run(ds, expected):
    """``ds`` (from open_run) equals ``expected`` in values, dtypes, dims and attrs."""
    assert ds.attrs["icstools_store_format"] == store_mod.STORE_FORMAT == 2
    assert ds.attrs["n_committed"] == expected.sizes["step"]
    xr.testing.assert_identical(ds.drop_attrs(deep=False), expected.drop_attrs(deep=False))
    assert {k: v for k, v in ds.attrs.items() if k not in STORE_ATTRS} == expected.attrs
    assert set(ds.data_vars) == set(expected.data_vars)
    assert set(ds.coords) == set(expected.coords)
    for name, var in expected.variables.items():
        assert ds[name].dtype == var.dtype, name
        assert ds[name].dims == var.dims, name


def write_run(path, sizes, **kwargs):
    blocks, start = [], 0
    for k in sizes:
        blocks.append(make_block(start, k))
        start += k
    with RunWriter(path, **kwargs) as w:
        for b in blocks:
            w.append(b)
        assert w.n_committed == start
    return blocks


def zarray_files(path):
    return sorted(Path(path).glob("*/.zarray"))


# ------------------------------------------------------------------------------- round trip


def test_round_trip_equals_concat_of_blocks(tmp_path):
    path = tmp_path / "run.zarr"
    blocks = write_run(path, [10, 64, 3, 20], chunk_steps=16)
    expected = concat(blocks)
    ds = open_run(path)
    assert ds.sizes["step"] == 97
    assert_same_run(ds, expected)
    assert ds["unit_site"].values.tolist() == blocks[0]["unit_site"].values.tolist()
    assert ds["site_name"].values[2] == "2:Ünïcode-Ω"
    # the step dim is chunked chunk_steps long in every step array, whatever its axis
    group = zarr.open_group(str(path), mode="r", zarr_format=2)
    for name, var in expected.variables.items():
        if "step" in var.dims:
            assert group[name].chunks[var.dims.index("step")] == 16, name
            assert group[name].shape == var.shape, name


def test_static_variables_written_once(tmp_path):
    path = tmp_path / "run.zarr"
    w = RunWriter(path, chunk_steps=8)
    w.append(make_block(0, 5))

    def stat(rel):
        st_ = os.stat(path / rel)
        return st_.st_ino, st_.st_mtime_ns

    static = ["unit_site/0", "unit_site/.zarray", "hist_edges/0.0", "quantile/0", "source/0"]
    before = {rel: stat(rel) for rel in static}
    step_chunk = stat("mean/0.0.0")
    w.append(make_block(5, 6))
    w.append(make_block(11, 30))
    w.close()
    assert {rel: stat(rel) for rel in static} == before
    assert stat("mean/0.0.0") != step_chunk  # the partly filled chunk was rewritten
    assert_same_run(open_run(path), make_block(0, 41))


def test_no_object_or_pickle_codecs(tmp_path):
    path = tmp_path / "run.zarr"
    write_run(path, [3])
    files = zarray_files(path)
    assert len(files) == len(make_block(0, 1).variables)
    for f in files:
        meta = json.loads(f.read_text())
        assert "O" not in meta["dtype"], f
        # Blosc (a filter), then the chunk's CRC32C (the compressor: outermost, format 2)
        assert [c["id"] for c in meta["filters"]] == ["blosc"], f
        assert meta["compressor"] == {"id": "crc32c"}, f
    assert json.loads((path / "unit_site" / ".zarray").read_text())["dtype"].startswith("<U")


def test_per_array_readers_see_a_committed_prefix_then_all_after_close(tmp_path):
    """Readers that skip the commit marker (zarr.open_array on one array) read the .zarray
    files, rewritten by close only: before it a committed prefix, after it every record."""
    path = tmp_path / "run.zarr"
    w = RunWriter(path, chunk_steps=4)
    w.append(make_block(0, 5))
    w.append(make_block(5, 6))
    mean = zarr.open_array(str(path / "mean"), mode="r", zarr_format=2)
    assert mean.shape[1] == 5  # (source, step, unit): the first commit's shape
    np.testing.assert_array_equal(mean[:], make_block(0, 5)["mean"].values)
    assert open_run(path).sizes["step"] == 11  # the marker has both commits
    w.close()
    expected = concat([make_block(0, 5), make_block(5, 6)])
    for name in ("mean", "loss", "step", "hist"):
        arr = zarr.open_array(str(path / name), mode="r", zarr_format=2)
        np.testing.assert_array_equal(arr[:], expected[name].values)
    unconsolidated = xr.open_zarr(path, consolidated=False)
    np.testing.assert_array_equal(unconsolidated["mean"].values, expected["mean"].values)


def test_chunks_limited_by_max_chunk_bytes(tmp_path):
    path = tmp_path / "run.zarr"
    n_unit = 1000
    block = make_block(0, 5, n_unit=n_unit)
    max_bytes = 20_000
    with RunWriter(path, chunk_steps=16, max_chunk_bytes=max_bytes) as w:
        w.append(block)
        w.append(make_block(5, 40, n_unit=n_unit))
    group = zarr.open_group(str(path), mode="r", zarr_format=2)
    for name, var in block.variables.items():
        chunks = group[name].chunks
        if "step" in var.dims:
            assert chunks[var.dims.index("step")] == 16, name
        if "unit" in var.dims and var.ndim > 1:
            assert chunks[var.dims.index("unit")] < n_unit, name  # the largest dim was split
        assert np.prod(chunks) * var.dtype.itemsize <= max_bytes, name
    assert_same_run(open_run(path), make_block(0, 45, n_unit=n_unit))


@pytest.mark.parametrize("chunk_steps", [0, -4])
def test_chunk_steps_must_be_at_least_one(tmp_path, chunk_steps):
    with pytest.raises(ValueError, match="chunk_steps"):
        RunWriter(tmp_path / "run.zarr", chunk_steps=chunk_steps)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=6),
    chunk_steps=st.integers(min_value=1, max_value=24),
)
def test_any_block_sizes_round_trip(sizes, chunk_steps):
    with tempfile.TemporaryDirectory() as tmp:
        blocks = write_run(Path(tmp) / "run.zarr", sizes, chunk_steps=chunk_steps)
        assert_same_run(open_run(Path(tmp) / "run.zarr"), concat(blocks))


def test_step_first_axis_and_bool_int_float(tmp_path):
    path = tmp_path / "run.zarr"

    def blk(steps):
        steps = np.asarray(steps, dtype=np.int64)
        return xr.Dataset(
            {
                "a": (("step", "x"), np.outer(steps, [1, 2]).astype(np.uint8)),
                "b": (("x", "step"), np.outer([True, False], steps % 2 == 0)),
                "c": ("step", steps.astype(np.float32) / 3),
            },
            coords={"step": steps, "x": ["p", "qq"]},
        )

    blocks = [blk([2, 3]), blk(np.arange(4, 40)), blk([41])]
    with RunWriter(path, chunk_steps=4) as w:
        for b in blocks:
            w.append(b)
    assert_same_run(open_run(path), concat(blocks))


def test_int32_steps_are_stored_as_int64(tmp_path):
    path = tmp_path / "run.zarr"
    ds = xr.Dataset({"v": ("step", [1.0, 2.0])}, coords={"step": np.array([1, 2], np.int32)})
    with RunWriter(path) as w:
        w.append(ds)
        w.append(ds.assign_coords(step=np.array([7, 9], np.int32)))
    out = open_run(path)
    assert out["step"].dtype == np.int64
    assert out["step"].values.tolist() == [1, 2, 7, 9]


# ------------------------------------------------------------------------------------ attrs


def test_attrs_persisted(tmp_path):
    path = tmp_path / "run.zarr"
    w = RunWriter(path, chunk_steps=8)
    w.set_attrs(note="before the first append")  # held until the store exists
    assert not path.exists()
    w.append(make_block(0, 5))
    assert open_run(path).attrs["note"] == "before the first append"
    w.set_attrs(diverged_step=np.int64(17), note="changed")  # committed at once
    ds = open_run(path)
    assert ds.attrs["diverged_step"] == 17
    assert ds.attrs["note"] == "changed"
    assert ds.attrs["n_committed"] == 5
    w.append(make_block(5, 3).assign_attrs(extra=[1, 2]))  # later block attrs are merged
    w.close()
    ds = open_run(path)
    assert ds.attrs == {
        "model": "mlp",
        "seed": 3,
        "lr": 0.01,
        "note": "changed",
        "diverged_step": 17,
        "extra": [1, 2],
        "icstools_store_format": 2,
        "n_committed": 8,
    }


def test_attrs_validation(tmp_path):
    w = RunWriter(tmp_path / "run.zarr")
    with pytest.raises(ValueError, match="n_committed"):
        w.set_attrs(n_committed=3)
    with pytest.raises(TypeError, match="bad"):
        w.set_attrs(bad=object())


# ------------------------------------------------------------------------------- validation


def _drop(b):
    return b.drop_vars("loss")


def _extra(b):
    return b.assign(extra=("step", np.zeros(b.sizes["step"])))


def _transpose(b):
    return b.assign(mean=b["mean"].transpose("step", "source", "unit"))


def _dtype(b):
    return b.assign(calls=b["calls"].astype(np.int64))


def _unit_size(b):
    return make_block(20, 4, n_unit=6)


def _static_coord(b):
    return b.assign_coords(unit_site=("unit", np.array([f"u{u}" for u in range(7)])))


def _static_var(b):
    return b.assign(hist_edges=b["hist_edges"] + 1)


def _coord_to_var(b):
    return b.reset_coords("wall_time")


@pytest.mark.parametrize(
    ("mutate", "name"),
    [
        (_drop, "loss"),
        (_extra, "extra"),
        (_transpose, "mean"),
        (_dtype, "calls"),
        (_unit_size, "mean"),
        (_static_coord, "unit_site"),
        (_static_var, "hist_edges"),
        (_coord_to_var, "wall_time"),
    ],
)
def test_mismatched_blocks_rejected(tmp_path, mutate, name):
    path = tmp_path / "run.zarr"
    w = RunWriter(path, chunk_steps=8)
    w.append(make_block(0, 10))
    with pytest.raises(ValueError, match=name):
        w.append(mutate(make_block(10, 4)))
    w.append(make_block(10, 4))  # nothing was written, the writer is still usable
    w.close()
    assert_same_run(open_run(path), make_block(0, 14))


def test_steps_must_increase(tmp_path):
    path = tmp_path / "run.zarr"
    w = RunWriter(path)
    with pytest.raises(ValueError, match="within a block"):
        w.append(make_block(0, 3).isel(step=[0, 2, 1]))
    w.append(make_block(0, 3))
    with pytest.raises(ValueError, match="across appends"):
        w.append(make_block(2, 3))  # overlaps the last step
    with pytest.raises(ValueError, match="across appends"):
        w.append(make_block(0, 1))
    with pytest.raises(ValueError, match="integer"):
        w.append(make_block(3, 2).assign_coords(step=[100.0, 101.0]))
    with pytest.raises(ValueError, match="step"):
        w.append(make_block(3, 2).rename(step="time"))
    w.append(make_block(3, 2))
    w.close()
    assert_same_run(open_run(path), make_block(0, 5))
    with pytest.raises(ValueError, match="closed"):
        w.append(make_block(5, 1))


def test_unsupported_step_dtype_rejected(tmp_path):
    ds = xr.Dataset({"phase": ("step", ["a", "b"])}, coords={"step": [0, 1]})
    with pytest.raises(ValueError, match="phase"):
        RunWriter(tmp_path / "run.zarr").append(ds)
    assert not (tmp_path / "run.zarr").exists()


def test_existing_path_and_overwrite(tmp_path):
    path = tmp_path / "run.zarr"
    write_run(path, [5])
    with pytest.raises(FileExistsError):
        RunWriter(path)
    w = RunWriter(path, overwrite=True)
    assert open_run(path).sizes["step"] == 5  # replaced only at the first commit
    w.append(make_block(0, 2))
    w.close()
    assert_same_run(open_run(path), make_block(0, 2))
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an icstools"):
        RunWriter(other, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- open errors


def test_open_run_missing_path(tmp_path):
    missing = tmp_path / "nope.zarr"
    with pytest.raises(FileNotFoundError, match=r"nope\.zarr"):
        open_run(missing)


def test_open_run_not_a_store(tmp_path):
    d = tmp_path / "random"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match="not an icstools"):
        open_run(d)
    with pytest.raises(StoreError, match="not a directory"):
        open_run(d / "notes.txt")
    plain = tmp_path / "plain.zarr"
    make_block(0, 3).to_zarr(plain, zarr_format=2, consolidated=True)
    with pytest.raises(StoreError, match="not an icstools"):
        open_run(plain)


def test_open_run_corrupt_store(tmp_path):
    path = tmp_path / "run.zarr"
    write_run(path, [4])
    (path / ".zmetadata").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        open_run(path)
    path2 = tmp_path / "run2.zarr"
    write_run(path2, [4])
    (path2 / "mean" / "0.0.0").write_bytes(b"garbage")
    with pytest.raises(StoreError, match=r"run2\.zarr"):
        open_run(path2)


# ------------------------------------------------------------------------ BackgroundWriter


def test_background_writer_order_and_flush(tmp_path):
    path = tmp_path / "run.zarr"
    sizes = [5, 1, 17, 64, 2, 9, 30, 3]
    blocks, start = [], 0
    bw = BackgroundWriter(RunWriter(path, chunk_steps=16))
    for k in sizes:
        blocks.append(make_block(start, k))
        bw.submit(blocks[-1])
        start += k
    bw.flush(timeout=60)
    assert bw.n_committed == start
    assert_same_run(open_run(path), concat(blocks))
    bw.set_attrs(diverged_step=99)
    bw.submit(make_block(start, 4))
    bw.close()
    bw.close()  # idempotent
    ds = open_run(path)
    assert ds.attrs["diverged_step"] == 99
    xr.testing.assert_identical(ds.drop_attrs(), make_block(0, start + 4).drop_attrs())
    with pytest.raises(ValueError, match="closed"):
        bw.submit(make_block(start + 4, 1))


def test_background_writer_context_manager(tmp_path):
    path = tmp_path / "run.zarr"
    with BackgroundWriter(path, chunk_steps=8) as bw:
        for i in range(0, 50, 10):
            bw.submit(make_block(i, 10))
    assert bw.n_committed == 50
    assert_same_run(open_run(path), make_block(0, 50))


def test_background_writer_error_propagates(tmp_path):
    path = tmp_path / "run.zarr"
    bw = BackgroundWriter(path, chunk_steps=8)
    bw.submit(make_block(0, 6))
    bw.submit(make_block(6, 6))
    bw.submit(make_block(12, 6).assign(bogus=("step", np.zeros(6))))
    bw.submit(make_block(18, 6))  # discarded: comes after the failure
    with pytest.raises(StoreError, match=re.escape(str(path))) as info:
        bw.flush(timeout=60)
    assert isinstance(info.value.__cause__, ValueError)
    assert "bogus" in str(info.value)
    assert_same_run(open_run(path), make_block(0, 12))
    with pytest.raises(StoreError, match=re.escape(str(path))):
        bw.submit(make_block(24, 1))
    bw.close()  # already reported: closes quietly
    assert_same_run(open_run(path), make_block(0, 12))


def test_background_writer_error_raised_at_close(tmp_path):
    path = tmp_path / "run.zarr"
    bw = BackgroundWriter(path)
    bw.submit(make_block(0, 3))
    bw.submit(make_block(0, 3))  # steps do not increase
    with pytest.raises(StoreError, match="strictly"):
        bw.close()
    assert_same_run(open_run(path), make_block(0, 3))


# ----------------------------------------------------------------------- lazy and netCDF


def test_lazy_open_gives_dask_arrays(tmp_path):
    path = tmp_path / "run.zarr"
    write_run(path, [10, 64, 3], chunk_steps=16)
    eager = open_run(path)
    for chunks in ({}, "auto"):
        lazy = open_run(path, chunks=chunks)
        for name, var in lazy.data_vars.items():
            assert var.chunks is not None, name
            assert type(var.data).__module__.startswith("dask"), name
        assert lazy["mean"].chunks[1][0] == 16 or chunks == "auto"
        xr.testing.assert_identical(lazy.load(), eager)
    assert all(isinstance(v.data, np.ndarray) for v in eager.variables.values())


def test_netcdf_export_round_trip(tmp_path):
    path = tmp_path / "run.zarr"
    write_run(path, [10, 20], chunk_steps=16)
    ds = open_run(path)
    nc = tmp_path / "run.nc"
    ds.to_netcdf(nc, engine="scipy")
    with xr.open_dataset(nc, engine="scipy") as back:
        back = back.load()
    xr.testing.assert_equal(back, ds)
    assert back.attrs == ds.attrs
    assert back["unit_site"].values.tolist() == ds["unit_site"].values.tolist()
    assert back["step"].values.tolist() == ds["step"].values.tolist()


# ------------------------------------------------------------- interrupted writes, in process


class _Died(BaseException):
    """Stands for the writing process dying: raised instead of the k-th file write."""


def _die_at_write(monkeypatch, k):
    """Make the k-th atomic file write of the store (0-based) raise _Died; return the counter.

    The function is patched where it is called: the writer's and the zarr store's modules."""
    real = store_files._atomic_write_bytes
    calls = {"n": 0}

    def write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] - 1 == k:
            raise _Died
        return real(*args, **kwargs)

    monkeypatch.setattr(store_files, "_atomic_write_bytes", write)
    monkeypatch.setattr(store_writer, "_atomic_write_bytes", write)
    return calls


def small_block(start, k):
    """A run with fewer variables than make_block's, for tests that create many stores."""
    return make_block(start, k)[["mean", "loss", "unit_site"]]


def test_writer_dying_before_any_file_write_keeps_last_commit(tmp_path, monkeypatch):
    """Every prefix of an append's file writes leaves exactly the previous commit readable."""
    w = RunWriter(tmp_path / "count.zarr", chunk_steps=4)
    w.append(small_block(0, 5))
    calls = _die_at_write(monkeypatch, -1)
    w.append(small_block(5, 6))
    n_writes = calls["n"]
    monkeypatch.undo()
    # 4 step arrays (mean, loss, step, wall_time) x 2 chunks + .zattrs + .zmetadata (the arrays'
    # .zarray files are rewritten by close, not by each append)
    assert n_writes == 10
    for k in range(n_writes):
        path = tmp_path / f"run{k}.zarr"
        w = RunWriter(path, chunk_steps=4)
        w.append(small_block(0, 5))
        _die_at_write(monkeypatch, k)
        with pytest.raises(_Died):
            w.append(small_block(5, 6))
        monkeypatch.undo()
        assert_same_run(open_run(path), small_block(0, 5))
        with pytest.raises(StoreError, match="unusable"):
            w.append(small_block(11, 1))


def test_writer_dying_in_first_append_leaves_no_run(tmp_path, monkeypatch):
    calls = _die_at_write(monkeypatch, -1)
    RunWriter(tmp_path / "count.zarr").append(small_block(0, 5))
    n_writes = calls["n"]
    monkeypatch.undo()
    # ~55 writes (xarray creating the arrays, then the block): sample them, with the last ones
    for k in sorted({*range(0, n_writes, 5), n_writes - 3, n_writes - 2, n_writes - 1}):
        path = tmp_path / "run.zarr"
        _die_at_write(monkeypatch, k)
        with pytest.raises(_Died):
            RunWriter(path).append(small_block(0, 5))
        monkeypatch.undo()
        with pytest.raises(FileNotFoundError):
            open_run(path)
        leftovers = sorted(p.name for p in tmp_path.iterdir())
        assert leftovers == ["count.zarr"], (k, leftovers)


# ------------------------------------------------------------------ multiple processes


def _child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# Child processes import icstools.store through the real package path, but with a bare package
# module registered first: icstools/__init__ imports torch (seconds per process), which the
# store does not need.
CHILD_PRELUDE = f"""
import sys, types
_pkg = types.ModuleType("icstools")
_pkg.__path__ = [{str(REPO / "icstools")!r}]
sys.modules["icstools"] = _pkg
"""


def test_store_read_by_another_process(tmp_path):
    path = tmp_path / "run.zarr"
    write_run(path, [10, 7], chunk_steps=8)
    out = tmp_path / "seen.pkl"
    script = CHILD_PRELUDE + (
        "import pickle, sys\n"
        "from icstools.store import open_run\n"
        "ds = open_run(sys.argv[1])\n"
        "with open(sys.argv[2], 'wb') as f:\n"
        "    pickle.dump(ds, f)\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(path), str(out)],
        check=True,
        env=_child_env(),
        cwd=tmp_path,
        timeout=120,
    )
    with open(out, "rb") as f:
        seen = pickle.load(f)  # written just now by the child, from our own data
    xr.testing.assert_identical(seen, open_run(path))


CHILD = """
{prelude}
import numpy as np
import xarray as xr
from icstools.store import RunWriter

{make_block}

path, sizes = sys.argv[1], [int(k) for k in sys.argv[2].split(",")]
sys.stdin.readline()  # start together with the parent's clock
w = RunWriter(path, chunk_steps=16)
n, j = 0, 0
while True:
    k = sizes[j % len(sizes)]
    j += 1
    print("begin", n + k, flush=True)
    w.append(make_block(n, k, n_unit=150))
    n += k
    print("committed", n, flush=True)
"""


def _read_event(proc):
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"writer exited early: {proc.stderr.read().decode()}")
    kind, n = line.split()
    return kind.decode(), int(n)


def test_sigkill_at_any_moment_leaves_last_commit(tmp_path):
    """Kill a writing process with SIGKILL mid-write; open_run gives exactly a committed prefix."""
    sizes = [7, 16, 1, 40, 5, 16, 23]
    boundaries = set(np.cumsum(sizes * 200).tolist())
    script = tmp_path / "child.py"
    source = textwrap.dedent(inspect.getsource(make_block))
    script.write_text(CHILD.format(prelude=CHILD_PRELUDE, make_block=source))
    # (commits to wait for, delay after a "begin" line before SIGKILL, read while writing?)
    plans = [
        (2, 0.0, False),
        (3, 0.001, True),
        (5, 0.003, False),
        (4, 0.006, True),
        (6, 0.02, False),
    ]
    procs = []
    for i, _ in enumerate(plans):  # start all children at once: imports take seconds
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    str(tmp_path / f"run{i}.zarr"),
                    ",".join(map(str, sizes)),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_child_env(),
                cwd=tmp_path,
            )
        )
    try:
        for i, ((n_commits, delay, read_meanwhile), proc) in enumerate(
            zip(plans, procs, strict=True)
        ):
            path = tmp_path / f"run{i}.zarr"
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            committed, commits, began = 0, 0, 0
            while commits < n_commits:
                kind, n = _read_event(proc)
                if kind == "begin":
                    began = n
                else:
                    committed, commits = n, commits + 1
                    if read_meanwhile:  # another process is appending right now
                        seen = open_run(path)
                        m = seen.sizes["step"]
                        assert m >= committed and m in boundaries
                        xr.testing.assert_identical(
                            seen.drop_attrs(), make_block(0, m, n_unit=150).drop_attrs()
                        )
            while True:  # kill during an append (when the delay is shorter than an append)
                kind, n = _read_event(proc)
                if kind == "begin":
                    began = n
                    break
            if delay:
                time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            for line in proc.stdout.read().splitlines():
                kind, n = line.split()
                if kind == b"committed":
                    committed = max(committed, int(n))
                else:
                    began = max(began, int(n))
            ds = open_run(path)
            m = ds.sizes["step"]
            assert m >= committed, (i, m, committed)
            assert m in boundaries, (i, m)  # a whole number of blocks: no torn record
            assert m <= began
            assert ds.attrs["n_committed"] == m
            assert_same_run(ds, make_block(0, m, n_unit=150))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()


def test_a_run_of_a_newer_schema_is_refused_with_a_clear_error(tmp_path):
    from icstools.schema import SCHEMA_VERSION

    path = tmp_path / "newer.zarr"
    with RunWriter(path, chunk_steps=4) as writer:
        block = make_block(0, 3)
        block.attrs["schema_version"] = SCHEMA_VERSION + 1
        writer.append(block)
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        open_run(path)
    with RunWriter(tmp_path / "same.zarr", chunk_steps=4) as writer:
        block = make_block(0, 3)
        block.attrs["schema_version"] = SCHEMA_VERSION
        writer.append(block)
    assert open_run(tmp_path / "same.zarr").sizes["step"] == 3


@pytest.mark.parametrize("sequential_bytes", [0, 1 << 40])
def test_a_wide_block_writes_its_arrays_one_at_a_time(tmp_path, monkeypatch, sequential_bytes):
    """Blocks over SEQUENTIAL_BYTES write one array after the other (all at once held every
    array's chunks being read, merged and encoded together); the store is the same."""
    monkeypatch.setattr(store_writer, "SEQUENTIAL_BYTES", sequential_bytes)
    busy, most = [0], [0]
    real = zarr.AsyncArray.setitem

    async def counted(self, *args, **kwargs):
        busy[0] += 1
        most[0] = max(most[0], busy[0])
        try:
            return await real(self, *args, **kwargs)
        finally:
            busy[0] -= 1

    monkeypatch.setattr(zarr.AsyncArray, "setitem", counted)
    blocks = write_run(tmp_path / "run.zarr", [5, 3, 4], chunk_steps=4)
    assert_same_run(open_run(tmp_path / "run.zarr"), concat(blocks))
    assert (most[0] == 1) == (sequential_bytes == 0), most[0]

"""Checksums of run stores (issue 13, item 5): every chunk and the commit marker carry a CRC32C,
checked on every read; damage is a StoreError naming the variable and chunk, never fill values
or garbage; ``icstools verify`` checks a whole store; format 1 stores are still read.

Before (format 1): a deleted ``step`` chunk read back as duplicate step 0s, a truncated chunk
gave garbage in about half of the reads, 3 of 6 bit flips in chunks and 2 of 4 in the commit
marker were accepted. Here every damage of each kind, at many positions, raises.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from icstools import store as store_mod
from icstools.cli import main
from icstools.store import RunWriter, StoreError, crc32c, open_run, verify_run

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def make_block(start: int, k: int) -> xr.Dataset:
    i = np.arange(start, start + k)
    steps = (3 * i + 5).astype(np.int64)
    unit = np.arange(6)
    return xr.Dataset(
        {
            "mean": (("step", "unit"), (steps[:, None] * 0.5 + unit).astype(np.float32)),
            "hist": (("step", "bin"), (steps[:, None] + np.arange(4)).astype(np.int64)),
            "loss": ("step", 1.0 / (steps + 1.0)),
            "hist_edges": ("edge", np.linspace(-3.0, 3.0, 5)),
        },
        coords={"step": steps, "unit_site": ("unit", [f"{u % 3}:input" for u in unit])},
        attrs={"model": "mlp", "recorder_config": json.dumps({"every": 1, "bins": 64})},
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "run.zarr"
    with RunWriter(path, chunk_steps=4) as w:
        w.append(make_block(0, 6))
        w.append(make_block(6, 7))  # 13 records: chunks 0-3 along step, the last partly full
    return path


@pytest.fixture
def run(pristine, tmp_path) -> Path:
    path = tmp_path / "run.zarr"
    shutil.copytree(pristine, path)
    return path


def chunk_files(path: Path) -> list[Path]:
    return sorted(
        p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and p != path
    )


def assert_damage_raises(path: Path, variable: str, chunk: str) -> None:
    """open_run (eager and lazy) and verify_run all name ``variable`` and ``chunk``."""
    with pytest.raises(StoreError) as info:
        open_run(path)
    message = str(info.value)
    assert f"variable {variable!r}, chunk {chunk}" in message, message
    # lazy (dask): index coordinates (step) are read at open, the others when computed
    with pytest.raises(StoreError, match=f"variable '{variable}', chunk {chunk}"):
        with open_run(path, chunks={}) as lazy:
            lazy[variable].load()
    v = verify_run(path)
    assert not v.ok and any(f"variable {variable!r}, chunk {chunk}" in p for p in v.problems)


def test_pristine_store_is_sound_and_plain_zarr_reads_it(pristine):
    expected = xr.concat([make_block(0, 6), make_block(6, 7)], "step", data_vars="minimal")
    ds = open_run(pristine)
    xr.testing.assert_equal(ds.drop_attrs(), expected.drop_attrs())
    v = verify_run(pristine)
    assert v.ok and v.format == 2 and v.records == 13
    # 3 step arrays of 4 chunks + mean/hist (one chunk across units/bins) + 2 static arrays
    assert v.chunks == len(chunk_files(pristine)) == 4 * 4 + 2
    with xr.open_zarr(pristine, consolidated=True) as plain:  # plain xarray + numcodecs
        xr.testing.assert_equal(plain.load().drop_attrs(), expected.drop_attrs())


def test_every_chunk_ends_with_the_crc32c_of_its_bytes(pristine):
    """Independent reference: google-crc32c over the file's bytes, numcodecs' layout."""
    import google_crc32c

    for f in chunk_files(pristine):
        raw = f.read_bytes()
        assert int.from_bytes(raw[-4:], "little") == google_crc32c.value(raw[:-4]), f
    assert crc32c(b"123456789") == 0xE3069283  # the CRC32C check value (RFC 3720)


@pytest.mark.parametrize(
    "variable, chunk",
    [("step", "0"), ("step", "2"), ("mean", "1.0"), ("loss", "3"), ("unit_site", "0")],
)
def test_deleted_chunk_raises_naming_it(run, variable, chunk):
    (run / variable / chunk).unlink()
    assert_damage_raises(run, variable, chunk)


def test_deleted_step_chunk_is_not_read_as_duplicate_zeros(run):
    """The issue's case: a deleted step chunk read back as fill values (step 0s)."""
    (run / "step" / "1").unlink()
    with pytest.raises(StoreError, match=r"variable 'step', chunk 1 \(records 4–7"):
        open_run(run)


@pytest.mark.parametrize("seed", range(8))
def test_truncated_chunk_raises(run, seed):
    rng = np.random.default_rng(seed)
    files = chunk_files(run)
    f = files[rng.integers(len(files))]
    raw = f.read_bytes()
    keep = int(rng.integers(0, len(raw)))  # 0 .. size-1 bytes kept
    f.write_bytes(raw[:keep])
    variable, chunk = f.parent.name, f.name
    assert_damage_raises(run, variable, chunk)


def test_bit_flip_anywhere_in_a_chunk_raises(pristine, tmp_path):
    """Every byte of a step chunk and of a mean chunk, one bit each (bit chosen by position)."""
    for rel in ("step/1", "mean/2.0"):
        raw = (pristine / rel).read_bytes()
        for pos in range(len(raw)):
            path = tmp_path / f"flip-{rel.replace('/', '-')}-{pos}.zarr"
            shutil.copytree(pristine, path)
            damaged = bytearray(raw)
            damaged[pos] ^= 1 << (pos % 8)
            (path / rel).write_bytes(bytes(damaged))
            variable, chunk = rel.split("/")
            with pytest.raises(StoreError, match=f"variable '{variable}', chunk {chunk}"):
                open_run(path)
            shutil.rmtree(path)


@pytest.mark.parametrize("seed", range(6))
def test_random_bit_flips_in_random_chunks_raise(run, seed):
    rng = np.random.default_rng(100 + seed)
    files = chunk_files(run)
    f = files[rng.integers(len(files))]
    raw = bytearray(f.read_bytes())
    pos = int(rng.integers(len(raw)))
    raw[pos] ^= 1 << int(rng.integers(8))
    f.write_bytes(bytes(raw))
    assert_damage_raises(run, f.parent.name, f.name)


def test_bit_flip_anywhere_in_the_commit_marker_raises(pristine, tmp_path):
    """Every byte of .zmetadata, one bit each (the bit rotates with the position)."""
    raw = (pristine / ".zmetadata").read_bytes()
    path = tmp_path / "run.zarr"
    shutil.copytree(pristine, path)
    accepted = []
    for pos in range(len(raw)):
        damaged = bytearray(raw)
        damaged[pos] ^= 1 << (pos % 8)
        (path / ".zmetadata").write_bytes(bytes(damaged))
        try:
            open_run(path, chunks={}).close()
        except StoreError:
            continue
        accepted.append(pos)
    assert accepted == [], f"{len(accepted)} of {len(raw)} flipped bytes accepted: {accepted[:10]}"
    assert len(raw) > 1000


def test_edited_commit_marker_raises(run):
    """A valid-JSON edit (a changed recorder_config, as in the issue) without its checksum."""
    raw = (run / ".zmetadata").read_bytes()
    zmeta = json.loads(raw)
    zmeta["metadata"][".zattrs"]["recorder_config"] = json.dumps({"every": 2, "bins": 64})
    (run / ".zmetadata").write_bytes(json.dumps(zmeta).encode())
    with pytest.raises(StoreError, match=r"commit marker \.zmetadata is corrupt: its checksum"):
        open_run(run)
    # without its checksum member at all: a format 2 marker must have one
    del zmeta["icstools_checksum"]
    (run / ".zmetadata").write_bytes(json.dumps(zmeta).encode())
    with pytest.raises(StoreError, match="does not"):
        open_run(run)
    with pytest.raises(StoreError):
        verify_run(run)


def test_verify_lists_every_damage(run):
    (run / "step" / "0").unlink()
    (run / "mean" / "3.0").write_bytes((run / "mean" / "3.0").read_bytes()[:-1])
    v = verify_run(run)
    assert len(v.problems) == 2
    assert "variable 'mean', chunk 3.0 (records 12–12" in v.problems[0]
    assert "variable 'step', chunk 0 (records 0–3" in v.problems[1]
    assert "missing" in v.problems[1]


def test_verify_command_exit_codes(run, tmp_path, capsys):
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {run} (format 2, 13 records, 18 chunks with checksums)")
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(run, damaged)
    f = damaged / "hist" / "1.0"
    raw = bytearray(f.read_bytes())
    raw[3] ^= 0x10
    f.write_bytes(bytes(raw))
    assert main(["verify", str(run), str(damaged)]) == 2
    captured = capsys.readouterr()
    assert f"DAMAGED: {damaged}" in captured.out
    assert "variable 'hist', chunk 1.0 (records 4–7" in captured.out
    assert captured.err.startswith("icstools: error: 1 of 2 run stores are damaged")
    assert main(["verify", str(tmp_path / "missing.zarr")]) == 2
    assert "no such run store" in capsys.readouterr().err
    (damaged / ".zmetadata").write_bytes(b"{}")
    assert main(["verify", str(damaged)]) == 2
    assert "DAMAGED" in capsys.readouterr().out


def test_report_and_info_refuse_a_damaged_store(run, tmp_path, capsys):
    (run / "step" / "1").unlink()
    assert main(["info", str(run)]) == 2
    assert "variable 'step', chunk 1" in capsys.readouterr().err


# ------------------------------------------------------------------ format 1 (before checksums)


def fixture_block(start: int, k: int) -> xr.Dataset:
    """tests/fixtures/make_store_format1.py's records (rebuilt here, independently)."""
    steps = np.arange(start, start + k, dtype=np.int64) * 10
    unit = np.arange(3)
    return xr.Dataset(
        {
            "mean": (("step", "unit"), (steps[:, None] * 0.5 + unit).astype(np.float32)),
            "loss": ("step", 1.0 / (steps + 1.0)),
        },
        coords={"step": steps, "unit_site": ("unit", ["0:input", "0:input", "2:input"])},
    )


def test_format1_store_written_by_the_old_code_is_still_read(tmp_path):
    old = tmp_path / "old.zarr"
    shutil.copytree(FIXTURES / "store_format1.zarr", old)
    assert "icstools_checksum" not in json.loads((old / ".zmetadata").read_bytes())
    ds = open_run(old)
    assert ds.attrs["icstools_store_format"] == 1 and ds.attrs["n_committed"] == 9
    expected = xr.concat([fixture_block(0, 6), fixture_block(6, 3)], "step", data_vars="minimal")
    xr.testing.assert_identical(ds.drop_attrs(), expected)
    lazy = open_run(old, chunks={})
    xr.testing.assert_identical(lazy.load().drop_attrs(), expected)
    v = verify_run(old)
    assert v.ok and v.format == 1 and "no checksums" in v.summary()
    assert main(["verify", str(old)]) == 0
    # without checksums a missing chunk is still detected (every committed chunk is written)
    (old / "step" / "1").unlink()
    with pytest.raises(StoreError, match=r"variable .step., chunk 1 .* missing"):
        open_run(old)
    assert not verify_run(old).ok


def test_newer_format_is_refused(run):
    zmeta = json.loads((run / ".zmetadata").read_bytes())
    zmeta["metadata"][".zattrs"]["icstools_store_format"] = 3
    from icstools.store.checksums import seal_marker

    (run / ".zmetadata").write_bytes(seal_marker(zmeta))
    with pytest.raises(StoreError, match="format 3; this version reads formats 1, 2"):
        open_run(run)


def test_store_format_constant():
    assert store_mod.STORE_FORMAT == 2 and store_mod.READABLE_FORMATS == (1, 2)
    assert zarr.__version__.startswith("3.1")

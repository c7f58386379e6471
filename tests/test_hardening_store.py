"""Hardening of icstools.store: unusable paths fail at construction, leftovers are cleaned up."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from icstools.store import RunWriter, StoreError, open_run


def block(start: int, k: int) -> xr.Dataset:
    steps = np.arange(start, start + k, dtype=np.int64)
    return xr.Dataset(
        {"loss": ("step", steps / 10.0), "edges": ("edge", np.linspace(0.0, 1.0, 3))},
        coords={"step": steps},
        attrs={"model": "mlp"},
    )


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------- 4: late store errors


def _bad_paths(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    tag = uuid.uuid4().hex[:8]
    return {
        # a regular file as the parent: mkdir/open fail with ENOTDIR, also for root
        "parent is a file": a_file / "sub.zarr",
        "ancestor is a file": a_file / "a" / "b" / "run.zarr",
        "inside /dev/null": Path("/dev/null") / "run.zarr",
        # procfs refuses new entries (ENOENT), sysfs too (EPERM), whoever asks
        "under /proc": Path("/proc") / f"icstools-{tag}" / "run.zarr",
        "in /sys": Path("/sys") / f"icstools-{tag}.zarr",
        # the name itself fits (245 < 255) but the hidden sibling of the first commit does not
        "hidden sibling name too long": tmp_path / ("r" * 240 + ".zarr"),
    }


BAD = [
    "parent is a file",
    "ancestor is a file",
    "inside /dev/null",
    "under /proc",
    "in /sys",
    "hidden sibling name too long",
]


@pytest.mark.parametrize("case", BAD)
def test_unwritable_path_is_refused_at_construction(tmp_path, case):
    path = _bad_paths(tmp_path)[case]
    if case in ("under /proc", "in /sys") and not path.parents[-2].is_dir():
        pytest.skip(f"{path.parents[-2]} is not mounted here")
    before = listing(tmp_path)
    with pytest.raises(StoreError) as info:
        RunWriter(path, chunk_steps=4)
    message = str(info.value)
    assert str(path) in message or str(path.parent) in message, message
    assert "writable directory" in message, message  # says what is valid
    assert isinstance(info.value.__cause__, OSError)  # the OS's own reason is kept
    if case == "hidden sibling name too long":
        assert "must leave room for the hidden sibling directory" in message
    assert listing(tmp_path) == before  # the check leaves nothing behind
    assert not os.path.lexists(path)


def test_read_only_filesystem_is_refused_at_construction(tmp_path, monkeypatch):
    """EROFS cannot be set up without privileges: the OS is made to answer it for one dir."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir, real_open = os.mkdir, os.open

    def refuse(path) -> None:
        if Path(os.fsdecode(path)).parent == ro:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(StoreError, match="Read-only file system") as info:
        RunWriter(ro / "run.zarr")
    assert str(ro) in str(info.value)
    monkeypatch.undo()
    assert listing(ro) == []


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_an_existing_non_store_is_refused_with_a_clear_error(tmp_path, kind):
    path = tmp_path / "notes"
    if kind == "file":
        path.write_text("keep me")
    else:
        path.mkdir()
        (path / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="is not an icstools run store") as info:
            RunWriter(path, overwrite=overwrite)
        assert str(path) in str(info.value)
        # overwrite=True would not help: the message must not suggest it
        assert "pass overwrite=True?" not in str(info.value)
    assert (path if kind == "file" else path / "precious.txt").read_text() == "keep me"


def test_existing_stores_keep_todays_behaviour(tmp_path):
    path = tmp_path / "run.zarr"
    with RunWriter(path, chunk_steps=4) as w:
        w.append(block(0, 3))
    with pytest.raises(FileExistsError, match=r"already exists \(pass overwrite=True\?\)"):
        RunWriter(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        RunWriter(empty)
    for target in (path, empty):
        with RunWriter(target, overwrite=True, chunk_steps=4) as w:
            w.append(block(10, 2))
        assert open_run(target)["step"].values.tolist() == [10, 11]


def test_missing_parents_are_checked_and_not_left_behind(tmp_path):
    path = tmp_path / "a" / "b" / "run.zarr"
    w = RunWriter(path, chunk_steps=4)
    assert listing(tmp_path) == []  # created for the check, removed again
    w.append(block(0, 3))
    w.close()
    assert listing(path.parent) == ["run.zarr"]
    assert open_run(path)["step"].values.tolist() == [0, 1, 2]


def test_recorder_with_an_unwritable_path_raises_at_construction(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    import icstools

    (tmp_path / "file").write_text("")
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    for bad in (tmp_path / "file" / "sub.zarr", Path("/dev/null/run.zarr")):
        with pytest.raises(StoreError, match="writable directory"):
            icstools.Recorder(model, nn.Sigmoid, path=bad)
    # no hooks were left on the model by the failed construction
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.is_tensor(model(torch.randn(2, 4)))

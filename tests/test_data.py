"""Tests of icstools.data: the MNIST loader (on the real files) and the mini-batch iterator."""

from __future__ import annotations

import gzip
import itertools
import os
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from icstools import data
from icstools.data import (
    MIRRORS,
    MNISTChecksumError,
    MNISTDownloadError,
    MNISTError,
    MNISTFormatError,
    MNISTNotFoundError,
    batches,
    load_mnist,
    mnist_tensors,
)

NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_NAMES = NAMES["train"] + NAMES["test"]
COUNTS = {
    "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}
FIRST_LABELS = {  # the well-known first ten labels of each split
    "train": [5, 0, 4, 1, 9, 2, 1, 3, 1, 4],
    "test": [7, 2, 1, 0, 4, 1, 4, 9, 5, 9],
}


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


def _real_data_dir() -> Path:
    env = os.environ.get("ICSTOOLS_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


# read once at import, before any test modifies the environment
REAL_DATA_DIR = _real_data_dir()


@pytest.fixture(scope="session")
def real_files() -> dict[str, Path]:
    """The real gzipped MNIST files, by base name. Fails (does not skip) when they are absent."""
    base = REAL_DATA_DIR
    found: dict[str, Path] = {}
    for name in ALL_NAMES:
        for directory in (base / "mnist", base):
            if (directory / f"{name}.gz").is_file():
                found[name] = directory / f"{name}.gz"
                break
    missing = [name for name in ALL_NAMES if name not in found]
    if missing:
        pytest.fail(
            f"real MNIST data not found: {missing} (as <name>.gz) missing from {base}/mnist and "
            f"{base}. Set ICSTOOLS_DATA to the folder holding mnist/ (the Makefile sets it to "
            "../shared/data when present).",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="session")
def real_contents(real_files: dict[str, Path]) -> dict[str, bytes]:
    """Decompressed content of the test-split files (small enough to keep around)."""
    return {name: gzip.decompress(real_files[name].read_bytes()) for name in NAMES["test"]}


@pytest.fixture
def real_dir(real_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Base directory of the real data, also exported as ICSTOOLS_DATA."""
    base = real_files[ALL_NAMES[0]].parent
    base = base.parent if base.name == "mnist" else base
    monkeypatch.setenv("ICSTOOLS_DATA", str(base))
    return base


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the caller's ICSTOOLS_DATA or ./data unless it sets them itself."""
    monkeypatch.delenv("ICSTOOLS_DATA", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


def _link_split(real_files: dict[str, Path], directory: Path, split: str = "test") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in NAMES[split]:
        (directory / f"{name}.gz").symlink_to(real_files[name])
    return directory


def _idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + payload


# --------------------------------------------------------------------------------------------
# The real data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_real_load(real_dir: Path, split: str, n: int) -> None:
    mnist = load_mnist(split)  # located through $ICSTOOLS_DATA
    assert mnist.split == split
    assert len(mnist) == n
    assert mnist.source.name == f"{NAMES[split][0]}.gz"
    assert mnist.source.is_relative_to(real_dir)
    assert mnist.images.shape == (n, 28, 28)
    assert mnist.images.dtype == torch.uint8
    assert mnist.labels.shape == (n,)
    assert mnist.labels.dtype == torch.int64
    assert torch.bincount(mnist.labels, minlength=10).tolist() == COUNTS[split]
    assert mnist.labels[:10].tolist() == FIRST_LABELS[split]
    assert int(mnist.images.min()) == 0
    assert int(mnist.images.max()) == 255
    # the digit is drawn in the middle: the border is much darker than the centre
    assert mnist.images[:, 0, :].float().mean() < mnist.images[:, 10:18, 10:18].float().mean()


def test_mnist_tensors(real_dir: Path) -> None:
    x, y = mnist_tensors("train")
    assert x.shape == (60000, 784)
    assert x.dtype == torch.float32
    assert float(x.min()) == 0.0
    assert float(x.max()) == 1.0
    assert y.shape == (60000,)
    assert y.dtype == torch.int64

    images = load_mnist("test").images
    x4, y4 = mnist_tensors("test", flatten=False, dtype=torch.float64)
    assert x4.shape == (10000, 1, 28, 28)
    assert x4.dtype == torch.float64
    assert torch.equal(x4[:, 0], images.double() / 255)
    assert torch.bincount(y4, minlength=10).tolist() == COUNTS["test"]
    xf, _ = mnist_tensors("test", real_dir)
    assert torch.equal(xf, x4.reshape(10000, 784).float())

    with pytest.raises(TypeError, match="floating-point"):
        mnist_tensors("test", dtype=torch.int64)


def test_cache_cannot_be_corrupted_and_is_used(real_dir: Path) -> None:
    first = load_mnist("test")
    reference = first.images[0].clone()
    first.images.zero_()
    first.labels.fill_(3)
    hits = data._read_idx_cached.cache_info().hits
    second = load_mnist("test")
    assert data._read_idx_cached.cache_info().hits == hits + 2  # images and labels from cache
    assert torch.equal(second.images[0], reference)
    assert second.labels[:10].tolist() == FIRST_LABELS["test"]


# --------------------------------------------------------------------------------------------
# Where the files are found
# --------------------------------------------------------------------------------------------


def test_resolution_order(
    real_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arg = _link_split(real_files, tmp_path / "arg" / "mnist")
    env = _link_split(real_files, tmp_path / "env" / "mnist")
    default = _link_split(real_files, Path.cwd() / "data" / "mnist")

    monkeypatch.setenv("ICSTOOLS_DATA", str(tmp_path / "env"))
    assert load_mnist("test", tmp_path / "arg").source.parent == arg  # argument beats env var
    assert load_mnist("test", str(tmp_path / "arg")).source.parent == arg  # str works too
    assert load_mnist("test").source.parent == env  # env var beats ./data
    monkeypatch.setenv("ICSTOOLS_DATA", "")  # empty counts as unset
    assert load_mnist("test").source.parent == default
    monkeypatch.delenv("ICSTOOLS_DATA")
    assert load_mnist("test").source.parent == default  # ./data relative to the cwd


def test_explicit_directory_does_not_fall_back(
    real_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _link_split(real_files, tmp_path / "env" / "mnist")
    monkeypatch.setenv("ICSTOOLS_DATA", str(tmp_path / "env"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MNISTNotFoundError):
        load_mnist("test", tmp_path / "empty")


def test_bare_folder_and_subfolder_precedence(real_files: dict[str, Path], tmp_path: Path) -> None:
    bare = _link_split(real_files, tmp_path / "bare")
    assert load_mnist("test", bare).source.parent == bare
    sub = _link_split(real_files, bare / "mnist")
    assert load_mnist("test", bare).source.parent == sub  # mnist/ is searched first


def test_pair_must_come_from_one_folder(real_files: dict[str, Path], tmp_path: Path) -> None:
    # images only in mnist/, both in the base folder: the base folder wins as a pair
    images = NAMES["test"][0]
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / f"{images}.gz").symlink_to(real_files[images])
    _link_split(real_files, tmp_path)
    assert load_mnist("test", tmp_path).source.parent == tmp_path


def test_uncompressed_files(real_contents: dict[str, bytes], tmp_path: Path) -> None:
    for name, content in real_contents.items():
        (tmp_path / name).write_bytes(content)
    mnist = load_mnist("test", tmp_path)
    assert mnist.source == tmp_path / NAMES["test"][0]
    assert torch.bincount(mnist.labels, minlength=10).tolist() == COUNTS["test"]


def test_missing_files(real_files: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "nowhere"
    with pytest.raises(MNISTNotFoundError) as info:
        load_mnist("train", base)
    err = info.value
    assert isinstance(err, FileNotFoundError)
    assert isinstance(err, MNISTError)
    message = str(err)
    listed = [
        line.strip().removeprefix("- ").removesuffix("(does not exist)").strip()
        for line in message.splitlines()
        if line.strip().startswith("- ")
    ]
    assert listed == [str(base / "mnist"), str(base)]
    assert err.searched == (base / "mnist", base)
    for hint in ("data_dir", "ICSTOOLS_DATA", "download=True", "train-images-idx3-ubyte"):
        assert hint in message

    # labels present but images missing is still "not found"
    (tmp_path / "half").mkdir()
    labels = NAMES["test"][1]
    (tmp_path / "half" / f"{labels}.gz").symlink_to(real_files[labels])
    with pytest.raises(MNISTNotFoundError, match="t10k-images"):
        load_mnist("test", tmp_path / "half")


def test_missing_default_directory_is_reported() -> None:
    with pytest.raises(MNISTNotFoundError) as info:
        load_mnist("test")
    assert str(Path.cwd() / "data" / "mnist") in str(info.value)
    assert "ICSTOOLS_DATA" in str(info.value)


@pytest.mark.parametrize("split", ["validation", "TRAIN", "", None, 0])
def test_bad_split(split: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"valid splits are \['train', 'test'\]") as info:
        load_mnist(split, tmp_path)  # type: ignore[arg-type]
    assert repr(split) in str(info.value)
    with pytest.raises(ValueError, match="unknown MNIST split"):
        mnist_tensors(split, tmp_path)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Checksums and format errors
# --------------------------------------------------------------------------------------------


def _write_test_split(
    directory: Path,
    real_files: dict[str, Path],
    labels_content: bytes | None = None,
    images_content: bytes | None = None,
) -> Path:
    """Test split in ``directory``: real files unless replacement contents are given (gzipped)."""
    directory.mkdir(parents=True, exist_ok=True)
    images, labels = NAMES["test"]
    for name, content in ((images, images_content), (labels, labels_content)):
        target = directory / f"{name}.gz"
        if content is None:
            target.symlink_to(real_files[name])
        else:
            target.write_bytes(gzip.compress(content))
    return directory


def test_checksum_mismatch(
    real_files: dict[str, Path], real_contents: dict[str, bytes], tmp_path: Path
) -> None:
    labels = NAMES["test"][1]
    content = bytearray(real_contents[labels])
    assert content[8] == 7  # first test label
    content[8] = 3  # still a valid label: only the checksum can notice
    directory = _write_test_split(tmp_path, real_files, labels_content=bytes(content))

    with pytest.raises(MNISTChecksumError) as info:
        load_mnist("test", tmp_path)
    err = info.value
    assert isinstance(err, ValueError)
    actual = data._md5(bytes(content))
    assert err.expected == "27ae3e4e09519cfbb04c329615203637"
    assert err.actual == actual
    assert err.path == directory / f"{labels}.gz"
    for part in (err.expected, actual, f"{labels}.gz", "verify=False"):
        assert part in str(err)

    mnist = load_mnist("test", tmp_path, verify=False)
    assert mnist.labels[0] == 3
    assert mnist.labels[1:10].tolist() == FIRST_LABELS["test"][1:]
    # the unverified load was cached, but verification still applies to the next call
    with pytest.raises(MNISTChecksumError):
        load_mnist("test", tmp_path)


def test_file_replaced_on_disk_is_reread(
    real_files: dict[str, Path], real_contents: dict[str, bytes], tmp_path: Path
) -> None:
    labels = NAMES["test"][1]
    _write_test_split(tmp_path, real_files, labels_content=real_contents[labels])
    assert load_mnist("test", tmp_path).labels[0] == 7
    content = bytearray(real_contents[labels])
    content[8] = 1
    (tmp_path / f"{labels}.gz").write_bytes(gzip.compress(bytes(content)))
    os.utime(tmp_path / f"{labels}.gz", ns=(1, 1))  # a different mtime even on coarse clocks
    with pytest.raises(MNISTChecksumError):
        load_mnist("test", tmp_path)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda c: (0x00000802).to_bytes(4, "big") + c[4:], "magic number 0x00000802"),
        (lambda c: c[:-1], "header"),
        (lambda c: c + b"\x00", "header"),
        (lambda c: c[:6], "too short"),
        (lambda c: c[:8] + b"\x0a" + c[9:], "label 10 at index 0"),
        (lambda c: _idx(0x00000801, (9999,), c[8:-1]), "disagree"),
    ],
    ids=["magic", "truncated", "trailing", "short-header", "label-range", "count-mismatch"],
)
def test_malformed_labels(
    real_files: dict[str, Path],
    real_contents: dict[str, bytes],
    tmp_path: Path,
    corrupt: Callable[[bytes], bytes],
    message: str,
    verify: bool,
) -> None:
    labels = NAMES["test"][1]
    _write_test_split(tmp_path, real_files, labels_content=corrupt(real_contents[labels]))
    # format problems are reported as such, before (and regardless of) the checksum
    with pytest.raises(MNISTFormatError, match=message) as info:
        load_mnist("test", tmp_path, verify=verify)
    assert isinstance(info.value, ValueError)
    assert labels in str(info.value)


def test_malformed_images(tmp_path: Path, real_files: dict[str, Path]) -> None:
    wrong_side = _idx(0x00000803, (2, 27, 28), bytes(2 * 27 * 28))
    _write_test_split(tmp_path / "side", real_files, images_content=wrong_side)
    with pytest.raises(MNISTFormatError, match="27x28 pixels"):
        load_mnist("test", tmp_path / "side", verify=False)

    labels_magic = _idx(0x00000801, (2,), bytes(2))
    _write_test_split(tmp_path / "magic", real_files, images_content=labels_magic)
    with pytest.raises(MNISTFormatError, match="magic number 0x00000801, expected 0x00000803"):
        load_mnist("test", tmp_path / "magic")


def test_bad_gzip_stream(real_files: dict[str, Path], tmp_path: Path) -> None:
    images, labels = NAMES["test"]
    (tmp_path / f"{images}.gz").symlink_to(real_files[images])
    (tmp_path / f"{labels}.gz").write_bytes(real_files[labels].read_bytes()[:100])  # truncated
    with pytest.raises(MNISTFormatError, match="not a valid gzip stream"):
        load_mnist("test", tmp_path)


# --------------------------------------------------------------------------------------------
# Downloading (through a fake fetch: this machine has no internet)
# --------------------------------------------------------------------------------------------


class FakeFetch:
    """Stands in for ``data._fetch_url``: serves the real files, optionally broken per mirror."""

    def __init__(self, real_files: dict[str, Path], broken: dict[str, str] | None = None) -> None:
        self.real_files = real_files
        self.broken = broken or {}  # mirror -> "offline" | "corrupt" | "html"
        self.calls: list[str] = []

    def __call__(self, url: str, *, timeout: float) -> bytes:
        assert timeout > 0
        self.calls.append(url)
        mirror, _, filename = url.rpartition("/")
        mode = self.broken.get(mirror + "/")
        if mode == "offline":
            raise urllib.error.URLError("no route to host")
        if mode == "html":
            return b"<html>503 Service Unavailable</html>"
        payload = self.real_files[filename.removesuffix(".gz")].read_bytes()
        if mode == "corrupt":
            content = bytearray(gzip.decompress(payload))
            content[-1] ^= 0xFF  # still a well-formed file, wrong content
            payload = gzip.compress(bytes(content))
        return payload


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def test_download_success(
    real_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeFetch(real_files)
    monkeypatch.setattr(data, "_fetch_url", fake)
    base = tmp_path / "fresh"
    with pytest.raises(MNISTNotFoundError):  # download is opt-in
        load_mnist("test", base)
    assert fake.calls == []

    mnist = load_mnist("test", base, download=True)
    assert fake.calls == [MIRRORS[0] + f"{name}.gz" for name in NAMES["test"]]
    assert _leftovers(base / "mnist") == sorted(f"{name}.gz" for name in NAMES["test"])
    assert mnist.source == base / "mnist" / "t10k-images-idx3-ubyte.gz"
    assert torch.bincount(mnist.labels, minlength=10).tolist() == COUNTS["test"]
    for name in NAMES["test"]:  # kept byte for byte as served
        assert (base / "mnist" / f"{name}.gz").read_bytes() == real_files[name].read_bytes()

    # files present now: nothing more is fetched
    load_mnist("test", base, download=True)
    assert len(fake.calls) == 2


def test_download_only_missing_file(
    real_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeFetch(real_files)
    monkeypatch.setattr(data, "_fetch_url", fake)
    images, labels = NAMES["test"]
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / f"{images}.gz").symlink_to(real_files[images])
    assert len(load_mnist("test", tmp_path, download=True)) == 10000
    assert fake.calls == [MIRRORS[0] + f"{labels}.gz"]


@pytest.mark.parametrize("first_mirror", ["offline", "corrupt", "html"])
def test_download_falls_back_to_next_mirror(
    real_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_mirror: str
) -> None:
    fake = FakeFetch(real_files, broken={MIRRORS[0]: first_mirror})
    monkeypatch.setattr(data, "_fetch_url", fake)
    mnist = load_mnist("test", tmp_path, download=True, verify=False)
    assert [url.rpartition("/")[0] + "/" for url in fake.calls] == list(MIRRORS) * 2
    assert torch.bincount(mnist.labels, minlength=10).tolist() == COUNTS["test"]
    # verify=False only affects loading; what was kept is the verified download
    assert len(load_mnist("test", tmp_path)) == 10000


def test_corrupted_download_is_rejected_and_not_kept(
    real_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeFetch(real_files, broken=dict.fromkeys(MIRRORS, "corrupt"))
    monkeypatch.setattr(data, "_fetch_url", fake)
    with pytest.raises(MNISTDownloadError) as info:
        load_mnist("test", tmp_path, download=True, verify=False)
    message = str(info.value)
    assert isinstance(info.value, OSError)
    assert "t10k-images-idx3-ubyte.gz" in message
    assert "2646ac647ad5339dbf082846283269ea" in message  # the expected md5
    for mirror in MIRRORS:
        assert mirror in message
    assert fake.calls == [mirror + "t10k-images-idx3-ubyte.gz" for mirror in MIRRORS]
    assert _leftovers(tmp_path / "mnist") == []  # neither the file nor a temporary was kept


def test_download_offline(
    real_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeFetch(real_files, broken=dict.fromkeys(MIRRORS, "offline"))
    monkeypatch.setattr(data, "_fetch_url", fake)
    with pytest.raises(MNISTDownloadError, match="no route to host"):
        load_mnist("train", tmp_path, download=True)
    assert _leftovers(tmp_path / "mnist") == []


# --------------------------------------------------------------------------------------------
# Mini-batches
# --------------------------------------------------------------------------------------------


def _epochs(n: int, batch_size: int, seed: int, n_epochs: int) -> list[list[torch.Tensor]]:
    x = torch.arange(n).repeat_interleave(2).reshape(n, 2)  # [n, 2], row i = (i, i)
    y = torch.arange(n)  # [n]
    it = batches(x, y, batch_size, generator=torch.Generator().manual_seed(seed))
    per_epoch = n // batch_size
    out: list[list[torch.Tensor]] = []
    for _ in range(n_epochs):
        epoch = []
        for xb, yb in itertools.islice(it, per_epoch):
            assert xb.shape == (batch_size, 2)
            assert yb.shape == (batch_size,)
            assert torch.equal(xb[:, 0], yb)  # pairs stay together
            epoch.append(yb)
        out.append(epoch)
    return out


@pytest.mark.parametrize(("n", "batch_size"), [(12, 3), (12, 12), (7, 1), (100, 60)])
def test_batches_epochs_are_permutations(n: int, batch_size: int) -> None:
    epochs = _epochs(n, batch_size, seed=0, n_epochs=5)
    orders = []
    for epoch in epochs:
        seen = torch.cat(epoch)
        assert seen.numel() == (n // batch_size) * batch_size
        assert seen.unique().numel() == seen.numel()  # nobody twice within an epoch
        if n % batch_size == 0:
            assert sorted(seen.tolist()) == list(range(n))  # everybody exactly once
        orders.append(seen.tolist())
    if n > 1:
        assert len({tuple(o) for o in orders}) > 1  # reshuffled between epochs


def test_batches_skip_partial_batch_but_nobody_permanently() -> None:
    n, batch_size = 10, 4  # 2 batches per epoch, 2 examples skipped each epoch
    epochs = _epochs(n, batch_size, seed=1, n_epochs=20)
    assert all(len(epoch) == 2 for epoch in epochs)
    assert set(torch.cat([torch.cat(e) for e in epochs]).tolist()) == set(range(n))


def test_batches_deterministic_from_generator() -> None:
    a = _epochs(50, 7, seed=123, n_epochs=3)
    b = _epochs(50, 7, seed=123, n_epochs=3)
    c = _epochs(50, 7, seed=124, n_epochs=3)
    flat = [torch.cat([yb for epoch in e for yb in epoch]) for e in (a, b, c)]
    assert torch.equal(flat[0], flat[1])
    assert not torch.equal(flat[0], flat[2])


def test_batches_leave_global_rng_alone() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    x, y = torch.zeros(30, 3), torch.arange(30)
    gen = torch.Generator().manual_seed(5)
    for _ in itertools.islice(batches(x, y, 4, generator=gen), 25):  # several epochs
        pass
    assert torch.equal(torch.get_rng_state(), before)

    # and the batches do not depend on the global RNG either
    torch.manual_seed(99)
    first = [yb for _, yb in itertools.islice(batches(x, y, 4, generator=torch.Generator()), 9)]
    torch.manual_seed(7)
    second = [yb for _, yb in itertools.islice(batches(x, y, 4, generator=torch.Generator()), 9)]
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))


def test_batches_on_real_data(real_dir: Path) -> None:
    x, y = mnist_tensors("test")
    it = batches(x, y, 60, generator=torch.Generator().manual_seed(0))
    xb, yb = next(it)
    assert xb.shape == (60, 784)
    assert yb.shape == (60,)
    assert xb.dtype == torch.float32


def test_batches_validate_arguments() -> None:
    x, y = torch.zeros(10, 2), torch.zeros(10)
    gen = torch.Generator()
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        batches(x, y, 2, generator=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same length"):
        batches(x, torch.zeros(9), 2, generator=gen)
    for bad in (0, -1, 11):
        with pytest.raises(ValueError, match=r"batch_size must be in 1\.\.10"):
            batches(x, y, bad, generator=gen)
    for bad_type in (2.0, True):
        with pytest.raises(TypeError, match="batch_size must be an int"):
            batches(x, y, bad_type, generator=gen)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tensors"):
        batches(x.numpy(), y, 2, generator=gen)  # type: ignore[arg-type]

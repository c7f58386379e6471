"""MNIST loading and mini-batching (the data of Ioffe & Szegedy 2015, §4.1).

The four standard IDX files are looked up on disk, parsed strictly, checked against the md5 of
their *decompressed* content and cached in-process. Nothing is downloaded unless asked for with
``download=True``.

Where the files are looked for
------------------------------
One base directory ``D`` is chosen, first match wins:

1. the ``data_dir`` argument;
2. the environment variable ``ICSTOOLS_DATA`` (ignored when unset or empty);
3. ``./data``, relative to the current working directory.

The files are then looked for in ``D/mnist/`` and then in ``D/`` itself; the first of the two that
holds both files of the split (images and labels) is used. Each file may be gzipped
(``train-images-idx3-ubyte.gz``) or not (``train-images-idx3-ubyte``); when both are present the
gzipped one is read. Whether a file is gzipped is decided from its first bytes, not its name.

Errors
------
Every error raised for a problem with the data derives from :class:`MNISTError` and from the
matching built-in exception, so ``except FileNotFoundError`` / ``except ValueError`` work too:

* :class:`MNISTNotFoundError` (``FileNotFoundError``): files missing; the message lists every
  directory searched and how to fix it.
* :class:`MNISTFormatError` (``ValueError``): not a valid MNIST IDX file (bad gzip stream, magic
  number, dimensions, size, label values, or image/label counts that disagree).
* :class:`MNISTChecksumError` (``ValueError``): the decompressed content's md5 is not the
  published one.
* :class:`MNISTDownloadError` (``OSError``): ``download=True`` and no mirror served a file with
  the right checksum.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

__all__ = [
    "CHECKSUMS",
    "ENV_VAR",
    "MIRRORS",
    "MNIST",
    "SPLITS",
    "MNISTChecksumError",
    "MNISTDownloadError",
    "MNISTError",
    "MNISTFormatError",
    "MNISTNotFoundError",
    "batches",
    "load_mnist",
    "mnist_tensors",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the data directory (used when ``data_dir`` is not given).
ENV_VAR = "ICSTOOLS_DATA"

#: Valid values of ``split``.
SPLITS: tuple[str, ...] = ("train", "test")

#: Base names (without ``.gz``) of the (images, labels) files of each split.
_FILES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
)

#: md5 of the decompressed content of each file, keyed by base name.
CHECKSUMS: Mapping[str, str] = MappingProxyType(
    {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }
)

#: Public mirrors of the gzipped files, tried in order by ``download=True``.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_IMAGES_MAGIC = 0x00000803  # IDX, unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # IDX, unsigned byte, 1 dimension
_SIDE = 28
_N_CLASSES = 10
_GZIP_MAGIC = b"\x1f\x8b"
_DOWNLOAD_TIMEOUT = 60.0  # seconds, per URL


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class MNISTError(Exception):
    """Base class of every MNIST data error raised by this module."""


class MNISTNotFoundError(MNISTError, FileNotFoundError):
    """The MNIST files of a split are not in any of the searched directories.

    Attributes
    ----------
    searched : tuple of Path
        The directories that were searched, in order.
    """

    def __init__(self, message: str, searched: tuple[Path, ...] = ()) -> None:
        super().__init__(message)
        self.searched = searched

    def __str__(self) -> str:
        return str(self.args[0])


class MNISTFormatError(MNISTError, ValueError):
    """A file is not a valid MNIST IDX file (or an images/labels pair does not match)."""


class MNISTChecksumError(MNISTError, ValueError):
    """The md5 of a file's decompressed content is not the published one.

    Attributes
    ----------
    path : Path
        The offending file.
    expected, actual : str
        The published md5 and the md5 that was computed (hex digests).
    """

    def __init__(self, path: Path, expected: str, actual: str) -> None:
        super().__init__(
            f"MNIST file {path} has the wrong content: md5 of the decompressed content is "
            f"{actual}, expected {expected}. The file is corrupt, truncated or not the original "
            "MNIST file; replace it (or pass verify=False to load it anyway)."
        )
        self.path = path
        self.expected = expected
        self.actual = actual


class MNISTDownloadError(MNISTError, OSError):
    """``download=True`` could not fetch a file with the right checksum from any mirror."""


# --------------------------------------------------------------------------------------------
# Data container
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MNIST:
    """One split of MNIST, as returned by :func:`load_mnist`.

    Attributes
    ----------
    images : torch.Tensor
        ``torch.uint8`` tensor of shape ``[N, 28, 28]``, pixel values 0..255 (0 = background).
    labels : torch.Tensor
        ``torch.int64`` tensor of shape ``[N]``, digit classes 0..9.
    split : str
        ``"train"`` (N = 60000) or ``"test"`` (N = 10000).
    source : Path
        Absolute path of the images file that was read.
    """

    images: torch.Tensor  # [N, 28, 28] uint8
    labels: torch.Tensor  # [N] int64
    split: str
    source: Path

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"MNIST(split={self.split!r}, n={len(self)}, source={str(self.source)!r})"


# --------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------


def _check_split(split: object) -> str:
    if not isinstance(split, str) or split not in _FILES:
        raise ValueError(f"unknown MNIST split {split!r}; valid splits are {list(SPLITS)}")
    return split


def _base_dir(data_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """The base directory and a description of where it came from."""
    if data_dir is not None:
        return Path(data_dir).expanduser().absolute(), "the data_dir argument"
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser().absolute(), f"${ENV_VAR}"
    return Path.cwd() / "data", f"the default ./data (${ENV_VAR} is not set)"


def _candidate_dirs(base: Path) -> tuple[Path, ...]:
    return (base / "mnist", base)


def _find_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _locate(base: Path, names: tuple[str, ...]) -> tuple[Path, ...] | None:
    """Paths of all ``names`` from the first candidate directory holding all of them."""
    for directory in _candidate_dirs(base):
        found = tuple(_find_file(directory, name) for name in names)
        if all(path is not None for path in found):
            return found  # type: ignore[return-value]
    return None


def _not_found(split: str, base: Path, origin: str, names: tuple[str, ...]) -> MNISTNotFoundError:
    dirs = _candidate_dirs(base)
    lines = [
        f"MNIST {split!r} files not found. Looked for "
        + " and ".join(f"{n}[.gz]" for n in names)
        + f" in (base directory from {origin}):"
    ]
    for directory in dirs:
        state = "" if directory.is_dir() else "  (does not exist)"
        lines.append(f"  - {directory}{state}")
    lines.append(
        "To fix: pass data_dir=<folder holding the files or a mnist/ subfolder>, or set "
        f"{ENV_VAR}=<that folder>, or call with download=True on a machine with internet "
        f"access (files go to {dirs[0]})."
    )
    return MNISTNotFoundError("\n".join(lines), searched=dirs)


# --------------------------------------------------------------------------------------------
# Reading and parsing IDX files
# --------------------------------------------------------------------------------------------


def _decompress(raw: bytes, path: Path) -> bytes:
    """Gunzip ``raw`` when it starts with the gzip magic number, else return it unchanged."""
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise MNISTFormatError(f"MNIST file {path} is not a valid gzip stream: {exc}") from exc


def _md5(content: bytes) -> str:
    return hashlib.md5(content, usedforsecurity=False).hexdigest()


def _parse_idx(content: bytes, path: Path, *, magic: int, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file; return a read-only uint8 array of the header's shape."""
    header_len = 4 + 4 * ndim
    if len(content) < 4:
        raise MNISTFormatError(
            f"MNIST file {path} is too short for an IDX header: {len(content)} bytes, need at "
            f"least {header_len}"
        )
    found_magic = int.from_bytes(content[:4], "big")
    if found_magic != magic:
        raise MNISTFormatError(
            f"MNIST file {path} has magic number 0x{found_magic:08X}, expected 0x{magic:08X} "
            f"(IDX, unsigned byte, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    if len(content) < header_len:
        raise MNISTFormatError(
            f"MNIST file {path} is too short for an IDX header: {len(content)} bytes, need at "
            f"least {header_len}"
        )
    # big-endian uint32 dimension sizes
    dims = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_len = header_len + int(np.prod(dims, dtype=np.int64))
    if len(content) != expected_len:
        raise MNISTFormatError(
            f"MNIST file {path} has {len(content)} bytes but its header (dimensions {dims}) "
            f"implies {expected_len} bytes"
        )
    array = np.frombuffer(content, dtype=np.uint8, offset=header_len).reshape(dims)
    array.flags.writeable = False  # frombuffer of bytes is read-only already; make it explicit
    return array


def _validate_images(array: np.ndarray, path: Path) -> None:
    if array.shape[1:] != (_SIDE, _SIDE):
        raise MNISTFormatError(
            f"MNIST file {path} holds images of {array.shape[1]}x{array.shape[2]} pixels, "
            f"expected {_SIDE}x{_SIDE}"
        )


def _validate_labels(array: np.ndarray, path: Path) -> None:
    if array.size and int(array.max()) >= _N_CLASSES:
        bad = int(np.flatnonzero(array >= _N_CLASSES)[0])
        raise MNISTFormatError(
            f"MNIST file {path} has label {int(array[bad])} at index {bad}; labels must be 0..9"
        )


@functools.lru_cache(maxsize=8)
def _read_idx_cached(
    resolved: str, stamp: tuple[int, int, int, int], magic: int, ndim: int
) -> tuple[np.ndarray, str]:
    """Read, decompress and parse one IDX file; return (read-only array, md5 of content).

    Keyed on the resolved path plus ``(st_dev, st_ino, st_size, st_mtime_ns)``, so a file that
    is replaced on disk is read again. Errors are not cached.
    """
    path = Path(resolved)
    content = _decompress(path.read_bytes(), path)
    digest = _md5(content)
    array = _parse_idx(content, path, magic=magic, ndim=ndim)
    if ndim == 3:
        _validate_images(array, path)
    else:
        _validate_labels(array, path)
    return array, digest


def _read_idx(path: Path, *, magic: int, ndim: int) -> tuple[np.ndarray, str]:
    """Cached parse of ``path``: (read-only array, md5 of the decompressed content).

    The array is shared with the cache: callers copy it before handing it out.
    """
    resolved = path.resolve()
    st = resolved.stat()
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return _read_idx_cached(str(resolved), stamp, magic, ndim)


# --------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------


def _fetch_url(url: str, *, timeout: float = _DOWNLOAD_TIMEOUT) -> bytes:
    """Return the body of ``url``; raises ``OSError`` (e.g. ``urllib.error.URLError``) on failure.

    This is the only function that touches the network: tests replace it (monkeypatch
    ``icstools.data._fetch_url``) to serve local bytes.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "icstools"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _download_one(name: str, target_dir: Path) -> Path:
    """Fetch ``name + ".gz"`` from the first mirror serving the right content; keep it atomically.

    The md5 of the decompressed download is always checked (whatever ``verify`` says) before
    anything is written; the bytes go to a temporary file in ``target_dir`` that is renamed to
    its final name only once complete.
    """
    filename = f"{name}.gz"
    failures: list[str] = []
    for mirror in MIRRORS:
        url = mirror + filename
        logger.info("downloading %s", url)
        try:
            payload = _fetch_url(url, timeout=_DOWNLOAD_TIMEOUT)
        except (OSError, http.client.HTTPException) as exc:
            failures.append(f"  - {url}: {type(exc).__name__}: {exc}")
            continue
        try:
            content = gzip.decompress(payload)
        except (OSError, EOFError, zlib.error) as exc:
            failures.append(f"  - {url}: not a valid gzip file ({exc}); discarded")
            continue
        digest = _md5(content)
        if digest != CHECKSUMS[name]:
            failures.append(
                f"  - {url}: md5 of decompressed content is {digest}, expected "
                f"{CHECKSUMS[name]}; discarded"
            )
            continue
        final = target_dir / filename
        fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=f".{filename}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        logger.info("saved %s (%d bytes)", final, len(payload))
        return final
    raise MNISTDownloadError(
        f"could not download {filename} into {target_dir}; every mirror failed:\n"
        + "\n".join(failures)
        + "\nCheck the internet connection, or copy the MNIST files there by hand."
    )


def _download(base: Path, names: tuple[str, ...]) -> None:
    target_dir = base / "mnist"
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        if _find_file(target_dir, name) is None:
            _download_one(name, target_dir)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_mnist(
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    verify: bool = True,
) -> MNIST:
    """Load one MNIST split from the IDX files on disk.

    Parameters
    ----------
    split : {"train", "test"}
        ``"train"``: 60000 examples; ``"test"``: the 10000 ``t10k`` examples.
    data_dir : str or path-like, optional
        Base directory. When omitted, ``$ICSTOOLS_DATA`` is used, else ``./data``. The files are
        looked for in ``<base>/mnist/`` and then ``<base>/``, gzipped or not.
    download : bool, default False
        When the files are not found, download the missing ones into ``<base>/mnist/`` from
        :data:`MIRRORS` (tried in order). Downloads are always checksum-verified before they are
        kept, and are written to a temporary file that is renamed only when complete.
    verify : bool, default True
        Check the md5 of each file's decompressed content against :data:`CHECKSUMS`. Pass
        ``False`` to load a modified or non-standard file that is still well-formed IDX (format
        checks always apply).

    Returns
    -------
    MNIST
        ``images`` uint8 ``[N, 28, 28]``, ``labels`` int64 ``[N]``, ``split``, ``source``. The
        tensors are fresh copies: modifying them does not affect later loads.

    Raises
    ------
    ValueError
        ``split`` is not ``"train"`` or ``"test"``.
    MNISTNotFoundError
        The files are missing (and ``download`` is false). The message lists the directories
        searched.
    MNISTFormatError
        A file is malformed, or the images and labels counts differ. Checked before the
        checksum, so a malformed file raises this even when ``verify`` is true.
    MNISTChecksumError
        ``verify`` is true and a file's content md5 is not the published one.
    MNISTDownloadError
        ``download`` is true and no mirror served a file with the right checksum.

    Notes
    -----
    Parsed files are cached in-process (keyed on the resolved path and the file's size,
    mtime and inode), so repeated loads only copy the arrays.

    Examples
    --------
    >>> from icstools.data import load_mnist
    >>> train = load_mnist("train")  # doctest: +SKIP
    >>> train.images.shape, train.images.dtype, train.labels.shape  # doctest: +SKIP
    (torch.Size([60000, 28, 28]), torch.uint8, torch.Size([60000]))
    """
    split = _check_split(split)
    names = _FILES[split]
    base, origin = _base_dir(data_dir)
    found = _locate(base, names)
    if found is None:
        if not download:
            raise _not_found(split, base, origin, names)
        _download(base, names)
        found = _locate(base, names)
        if found is None:  # pragma: no cover - only if the files vanish right after download
            raise _not_found(split, base, origin, names)
    images_path, labels_path = found
    # format checks (both files, then their agreement) come before the checksums
    images, images_md5 = _read_idx(images_path, magic=_IMAGES_MAGIC, ndim=3)
    labels, labels_md5 = _read_idx(labels_path, magic=_LABELS_MAGIC, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise MNISTFormatError(
            f"MNIST {split!r} files disagree: {images_path} holds {images.shape[0]} images but "
            f"{labels_path} holds {labels.shape[0]} labels"
        )
    if verify:
        for path, name, digest in zip(found, names, (images_md5, labels_md5), strict=True):
            if digest != CHECKSUMS[name]:
                raise MNISTChecksumError(path, CHECKSUMS[name], digest)
    return MNIST(
        images=torch.from_numpy(images.copy()),  # [N, 28, 28] uint8, private copy
        labels=torch.from_numpy(labels.astype(np.int64)),  # [N] int64, astype copies
        split=split,
        source=images_path.absolute(),
    )


def mnist_tensors(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    flatten: bool = True,
    dtype: torch.dtype = torch.float32,
    download: bool = False,
    verify: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as model-ready tensors: pixels scaled to [0, 1] and int64 labels.

    Parameters
    ----------
    split : {"train", "test"}
        Which split to load.
    data_dir : str or path-like, optional
        Base directory, resolved as in :func:`load_mnist`.
    flatten : bool, default True
        ``x`` of shape ``[N, 784]`` (for the paper's fully connected network) when true, else
        ``[N, 1, 28, 28]`` (channels-first, for convolutions).
    dtype : torch.dtype, default torch.float32
        Floating-point dtype of ``x``.
    download, verify : bool
        As in :func:`load_mnist`.

    Returns
    -------
    x : torch.Tensor
        ``[N, 784]`` or ``[N, 1, 28, 28]`` of ``dtype``, values ``pixel / 255`` in [0, 1].
    y : torch.Tensor
        ``[N]`` int64 labels 0..9.

    Raises
    ------
    TypeError
        ``dtype`` is not a floating-point ``torch.dtype``.

    Examples
    --------
    >>> from icstools.data import mnist_tensors
    >>> x, y = mnist_tensors("test")  # doctest: +SKIP
    >>> x.shape, x.dtype, y.shape  # doctest: +SKIP
    (torch.Size([10000, 784]), torch.float32, torch.Size([10000]))
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    data = load_mnist(split, data_dir, download=download, verify=verify)
    x = data.images.to(dtype).div_(255.0)  # [N, 28, 28] in [0, 1]
    x = x.reshape(x.shape[0], _SIDE * _SIDE) if flatten else x.unsqueeze(1)  # [N,784]|[N,1,28,28]
    return x, data.labels


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled mini-batches ``(x[idx], y[idx])``, epoch after epoch.

    Each epoch draws a fresh permutation of ``range(N)`` from ``generator`` (never from the
    global RNG) and yields its consecutive chunks of ``batch_size`` indices. Every batch has
    exactly ``batch_size`` examples, like the paper's fixed 60-example mini-batches: when
    ``batch_size`` does not divide ``N``, the last ``N % batch_size`` examples of each epoch's
    permutation are skipped. Since every epoch is reshuffled, which examples are skipped changes
    from epoch to epoch, and within an epoch no example appears twice.

    Parameters
    ----------
    x : torch.Tensor
        Inputs, ``[N, ...]``.
    y : torch.Tensor
        Targets, ``[N, ...]`` (same ``N``).
    batch_size : int
        Examples per batch, ``1 <= batch_size <= N``.
    generator : torch.Generator
        Source of all randomness; two generators in the same state give the same batches.

    Yields
    ------
    xb : torch.Tensor
        ``[batch_size, ...]`` slice of ``x``.
    yb : torch.Tensor
        ``[batch_size, ...]`` matching slice of ``y``.

    Raises
    ------
    TypeError
        ``generator`` is not a ``torch.Generator``, or ``x``/``y`` are not tensors, or
        ``batch_size`` is not an int.
    ValueError
        ``x`` and ``y`` have different lengths, or ``batch_size`` is not in ``1..N``.

    Examples
    --------
    >>> import itertools, torch
    >>> from icstools.data import batches
    >>> x, y = torch.randn(100, 784), torch.randint(0, 10, (100,))
    >>> gen = torch.Generator().manual_seed(0)
    >>> for xb, yb in itertools.islice(batches(x, y, 60, generator=gen), 3):
    ...     print(tuple(xb.shape), tuple(yb.shape))
    (60, 784) (60,)
    (60, 784) (60,)
    (60, 784) (60,)
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__}, {type(y).__name__}")
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same length along dim 0, got shapes {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    n = int(x.shape[0])
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in 1..{n} (the number of examples), got {batch_size}")
    return _batch_iter(x, y, batch_size, generator)


def _batch_iter(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = int(x.shape[0])
    n_full = n // batch_size  # batches per epoch; the n % batch_size leftovers are skipped
    while True:
        perm = torch.randperm(n, generator=generator, device=generator.device)  # [N]
        for b in range(n_full):
            idx = perm[b * batch_size : (b + 1) * batch_size]  # [batch_size]
            yield x[idx.to(x.device)], y[idx.to(y.device)]

"""Readers for the data sets of the built-in tasks: IDX (MNIST), CIFAR-10 (python pickles), text.

Every reader returns plain tensors (or strings) held in memory; the tasks turn them into batches.
Nothing here downloads anything: the repository bundles MNIST and a Shakespeare corpus under
``data/`` (see ``data/README.md``), and CIFAR-10 is read from a folder the user supplies.

- :func:`read_idx` reads one IDX file (gzip or raw, any element type, any rank).
- :func:`load_mnist` reads the four MNIST IDX files (also Fashion-MNIST or any data so named).
- :func:`load_cifar10` reads the CIFAR-10 "python version" with a restricted unpickler.
- :func:`load_text_corpus` reads ``*.txt`` / ``*.txt.gz`` files of a folder, sorted by name.
- :func:`default_data_dir` and :func:`cache_dir` resolve the data and cache folders
  (environment variables ``LARGEBATCH_DATA`` and ``LARGEBATCH_CACHE`` override them).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "IDX_DTYPES",
    "read_idx",
    "load_mnist",
    "load_cifar10",
    "load_text_corpus",
    "default_data_dir",
    "cache_dir",
]

# IDX element type code (third byte of the magic number) -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The largest IDX rank read_idx accepts: the most dimensions a numpy array can have.
IDX_MAX_RANK = 32 if np.lib.NumpyVersion(np.__version__) < "2.0.0" else 64

_GZIP_MAGIC = b"\x1f\x8b"


def default_data_dir() -> Path:
    """The folder holding the bundled data sets.

    ``$LARGEBATCH_DATA`` when set, else the ``data/`` folder at the repository root (beside the
    ``largebatch`` package). The folder is not checked for existence here; the loaders raise a
    clear ``FileNotFoundError`` naming what they looked for.
    """
    env = os.environ.get("LARGEBATCH_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "data"


def cache_dir() -> Path:
    """The folder for derived files (trained tokenizers, token ids): ``$LARGEBATCH_CACHE`` or
    ``~/.cache/largebatch``. Created on first use."""
    env = os.environ.get("LARGEBATCH_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "largebatch"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic (whatever its name)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc
    return raw


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file into a tensor of its element type and shape.

    The IDX format (LeCun et al.) is a 4-byte magic number ``0x00 0x00 <type> <rank>``, then
    ``rank`` big-endian uint32 dimension sizes, then the elements in row-major order, big-endian.
    Type codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.
    The file may be gzip-compressed (detected from its content, not its name).

    Raises:
        ValueError: the magic number is wrong, the type code unknown, the rank above
            ``IDX_MAX_RANK``, or the data size does not match the header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes, the header needs at least 4)")
    zero0, zero1, code, rank = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000 followed by a type code "
            f"and the rank)"
        )
    if code not in IDX_DTYPES:
        allowed = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX element type code 0x{code:02X} (allowed: {allowed})")
    if rank > IDX_MAX_RANK:
        raise ValueError(f"{path}: IDX rank {rank} is not supported (allowed: 0 to {IDX_MAX_RANK} dimensions)")
    header = 4 + 4 * rank
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, rank {rank} needs {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=rank, offset=4))
    dtype = IDX_DTYPES[code]
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: a huge header cannot overflow
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX size mismatch: header says shape {shape} of {dtype.name} "
            f"({expected} bytes with the header), file has {len(raw)} bytes"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    # Native byte order, writable copy (torch does not accept big-endian or read-only buffers).
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


# ---------------------------------------------------------------------------------------------
# MNIST

_MNIST_FILES = {
    ("train", "images"): ("train-images", "idx3-ubyte"),
    ("train", "labels"): ("train-labels", "idx1-ubyte"),
    ("test", "images"): ("t10k-images", "idx3-ubyte"),
    ("test", "labels"): ("t10k-labels", "idx1-ubyte"),
}


def _mnist_candidates(stem: str, kind: str) -> list[str]:
    names = [f"{stem}-{kind}", f"{stem}.{kind}"]  # standard and the dotted variant
    return [n + suffix for n in names for suffix in (".gz", "")]


def mnist_file(folder: Path, split: str, kind: str) -> Path | None:
    """The file of ``split`` ("train"/"test") and ``kind`` ("images"/"labels") in ``folder``, or None."""
    stem, suffix = _MNIST_FILES[(split, kind)]
    return next((folder / c for c in _mnist_candidates(stem, suffix) if (folder / c).is_file()), None)


def load_mnist(folder: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read MNIST-format IDX files from ``folder``.

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte``, each optionally gzip-compressed (``.gz``) and also accepted
    in the dotted spelling (``train-images.idx3-ubyte``). Fashion-MNIST, KMNIST or any data with
    these names and shapes load the same way.

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}`` with images uint8 ``[N, H, W]``
        and labels int64 ``[N]``.

    Raises:
        FileNotFoundError: the folder or a file is missing (the message names the files expected).
        ValueError: a file is not valid IDX, images and labels disagree, images are not bytes,
            labels are not integers >= 0, or a split is empty.
    """
    folder = Path(folder)
    expected = ", ".join(f"{stem}-{kind}[.gz]" for stem, kind in _MNIST_FILES.values())
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST folder {folder} does not exist; expected it to contain {expected}")
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    for key, (stem, kind) in _MNIST_FILES.items():
        candidates = _mnist_candidates(stem, kind)
        found = mnist_file(folder, *key)
        if found is None:
            raise FileNotFoundError(
                f"MNIST file {stem}-{kind}[.gz] not found in {folder} (looked for {', '.join(candidates)}); "
                f"the folder must contain {expected}"
            )
        tensors[key] = read_idx(found)
    out = {}
    for split in ("train", "test"):
        images, labels = tensors[(split, "images")], tensors[(split, "labels")]
        if images.ndim != 3 or labels.ndim != 1:
            raise ValueError(
                f"{folder}: {split} images must have rank 3 and labels rank 1, got shapes "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{folder}: {split} has {images.shape[0]} images but {labels.shape[0]} labels"
            )
        if images.dtype != torch.uint8:
            raise ValueError(f"{folder}: {split} images must be unsigned bytes (IDX type 0x08), got {images.dtype}")
        if labels.is_floating_point():
            raise ValueError(f"{folder}: {split} labels must be integers, got {labels.dtype}")
        if images.shape[0] == 0:
            raise ValueError(f"{folder}: the {split} split has no examples")
        if int(labels.min()) < 0:
            raise ValueError(f"{folder}: {split} labels must be class indices >= 0, got {int(labels.min())}")
        out[split] = (images, labels.to(torch.int64))
    return out


# ---------------------------------------------------------------------------------------------
# CIFAR-10

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)


def _numpy_reconstruct():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray._reconstruct


def _numpy_frombuffer():
    try:
        from numpy._core import numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import numeric
    return numeric._frombuffer


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``, limited to latin-1."""
    if encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that only builds what the CIFAR-10 batch files contain.

    Unrestricted ``pickle.load`` runs arbitrary code named in the file. The CIFAR-10 batches hold
    only a dict of bytes/str keys, lists of ints and bytes, and numpy arrays, so the only globals
    allowed are numpy's array-reconstruction helpers, ``numpy.ndarray``, ``numpy.dtype`` and a
    latin-1-only ``_codecs.encode`` (how protocol-2 pickles store bytes). Anything else raises
    ``pickle.UnpicklingError`` (which ``_load_cifar_batch`` turns into a ``ValueError`` naming the file).
    """

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            return _numpy_frombuffer()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: CIFAR-10 batch files contain only dicts, "
            f"lists, bytes and numpy arrays"
        )


CIFAR10_CLASSES = 10


def _is_cifar_label(value) -> bool:
    """An integer (or integral float) in [0, CIFAR10_CLASSES); bools, bytes and text are not."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return 0 <= value < CIFAR10_CLASSES and float(value).is_integer()


def _cifar_labels(path: Path, labels) -> np.ndarray:
    """``labels`` as int64, refused (naming ``path``) unless every one is a class index 0..9."""
    try:
        array = np.asarray(labels)
    except (TypeError, ValueError) as exc:  # e.g. a ragged list
        raise ValueError(f"{path}: 'labels' must be a list of integers 0..9 ({exc})") from exc
    if array.dtype.kind in "iu":
        bad = (array < 0) | (array >= CIFAR10_CLASSES)
    elif array.dtype.kind == "f":
        bad = ~np.isfinite(array) | (array != np.floor(array)) | (array < 0) | (array >= CIFAR10_CLASSES)
    else:  # bools, bytes, text, mixed objects: look at each value
        bad = np.array([not _is_cifar_label(v) for v in array.reshape(-1)], dtype=bool).reshape(array.shape)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        value = array[where]
        value = value.item() if isinstance(value, np.generic) else value
        index = where[0] if len(where) == 1 else where
        raise ValueError(
            f"{path}: {int(bad.sum())} label(s) are not CIFAR-10 classes, the first {value!r} at index "
            f"{index}; labels must be integers 0..{CIFAR10_CLASSES - 1} (the model has {CIFAR10_CLASSES} classes)"
        )
    return array.astype(np.int64)


def _load_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        content = f.read()
    try:
        obj = _CifarUnpickler(io.BytesIO(content), encoding="bytes").load()
    except Exception as exc:  # a refused global (pickle.UnpicklingError), truncated, or not a pickle at all
        raise ValueError(f"{path}: not a CIFAR-10 python batch file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")

    def field(name: str):
        for key in (name.encode(), name):
            if key in obj:
                return obj[key]
        raise ValueError(f"{path}: the batch dict has no {name!r} entry (keys: {sorted(map(str, obj))})")

    data = np.asarray(field("data"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    labels = _cifar_labels(path, field("labels"))
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # rows are R, G, B planes
    return images, torch.from_numpy(labels.copy())


def load_cifar10(folder: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read the CIFAR-10 "python version" (https://www.cs.toronto.edu/~kriz/cifar.html).

    ``folder`` holds ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (each a pickled dict
    with ``b"data"``, uint8 ``[N, 3072]`` in R, G, B plane order, and ``b"labels"``), or holds the
    unpacked ``cifar-10-batches-py`` folder. The pickles are read with a restricted unpickler that
    only admits dicts, lists, bytes, ints and numpy arrays (see ``_CifarUnpickler``), so a
    tampered file cannot run code. Labels must be class indices 0..9 (integers, or integral floats).

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}`` with images uint8
        ``[N, 3, 32, 32]`` and labels int64 ``[N]``.

    Raises:
        FileNotFoundError: the folder or a batch file is missing (the message names the files).
        ValueError: a file is not a CIFAR-10 batch (not a pickle, truncated, names a global outside
            the allowed set, wrong shapes, or labels that are not integers 0..9); the message names
            the file.
    """
    folder = Path(folder)
    names = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES
    expected = ", ".join(names)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 folder {folder} does not exist; expected it (or its cifar-10-batches-py "
            f"subfolder) to contain {expected}"
        )
    if not (folder / names[0]).is_file() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 files missing in {folder}: {', '.join(missing)}; expected {expected} "
            f"(the python version, cifar-10-python.tar.gz, unpacked)"
        )
    out = {}
    for split, files in (("train", CIFAR10_TRAIN_FILES), ("test", CIFAR10_TEST_FILES)):
        parts = [_load_cifar_batch(folder / n) for n in files]
        out[split] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return out


# ---------------------------------------------------------------------------------------------
# Text


def load_text_corpus(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """All ``*.txt`` and ``*.txt.gz`` files directly in ``folder``, sorted by file name.

    Returns:
        ``[(name, text), ...]`` where ``name`` is the file name without ``.txt``/``.txt.gz``.
        Text is decoded as UTF-8 (undecodable bytes become U+FFFD).

    Raises:
        FileNotFoundError: the folder does not exist or holds no such file.
        ValueError: two files give the same name (``a.txt`` and ``a.txt.gz``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"text corpus folder {folder} does not exist; expected *.txt or *.txt.gz files in it")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and (p.name.endswith(".txt") or p.name.endswith(".txt.gz"))
    )
    if not files:
        raise FileNotFoundError(f"no *.txt or *.txt.gz files in {folder}")
    corpus: list[tuple[str, str]] = []
    seen: dict[str, Path] = {}
    for path in files:
        name = path.name[: -len(".txt.gz")] if path.name.endswith(".txt.gz") else path.name[: -len(".txt")]
        if name in seen:
            raise ValueError(f"{folder}: both {seen[name].name} and {path.name} give the work name {name!r}")
        seen[name] = path
        corpus.append((name, _read_bytes(path).decode("utf-8", errors="replace")))
    corpus.sort(key=lambda item: item[0])
    return corpus

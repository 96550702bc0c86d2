"""Data readers: IDX, MNIST, CIFAR-10 pickles, text corpora, data/cache folders."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from largebatch.train.data import (
    IDX_MAX_RANK,
    cache_dir,
    default_data_dir,
    load_cifar10,
    load_mnist,
    load_text_corpus,
    read_idx,
)

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}
MNIST_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
# Canonical MNIST training-set label counts, digits 0..9.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def idx_bytes(array: np.ndarray) -> bytes:
    code = IDX_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


# ---------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "dtype,shape",
    [(np.uint8, (5, 3, 4)), (np.int8, (7,)), (np.int16, (2, 3)), (np.int32, (3, 2, 2, 2)), (np.float32, (4, 5)), (np.float64, (3,))],
)
def test_idx_round_trip(tmp_path, dtype, shape, compress):
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        array = rng.standard_normal(shape).astype(dtype)
    path = write_idx(tmp_path / ("a.idx.gz" if compress else "a.idx"), array, compress)
    out = read_idx(path)
    assert out.shape == shape
    assert out.dtype == torch.from_numpy(array).dtype
    np.testing.assert_array_equal(out.numpy(), array)


def test_idx_gzip_is_detected_from_content(tmp_path):
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    path = write_idx(tmp_path / "no-suffix", array, compress=True)
    np.testing.assert_array_equal(read_idx(path).numpy(), array)


def test_idx_bad_magic(tmp_path):
    data = bytearray(idx_bytes(np.zeros((2, 2), np.uint8)))
    data[0] = 0x12
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad IDX magic"):
        read_idx(tmp_path / "bad")


def test_idx_unknown_type_code(tmp_path):
    data = bytearray(idx_bytes(np.zeros((2, 2), np.uint8)))
    data[2] = 0x0A
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="unknown IDX element type code 0x0A"):
        read_idx(tmp_path / "bad")


def test_idx_size_mismatch(tmp_path):
    data = idx_bytes(np.zeros((4, 4), np.int32))
    (tmp_path / "short").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="size mismatch"):
        read_idx(tmp_path / "short")
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "tiny")


def test_idx_size_mismatch_of_a_huge_header_is_exact(tmp_path):
    """A header whose size overflows int64 reports the exact byte count and the dimensions."""
    path = tmp_path / "huge"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 4_000_000_000, 4_000_000_000, 4_000_000_000))
    with pytest.raises(ValueError) as info:
        read_idx(path)
    assert str(info.value) == (
        f"{path}: IDX size mismatch: header says shape (4000000000, 4000000000, 4000000000) of uint8 "
        f"({4_000_000_000**3 + 16} bytes with the header), file has 16 bytes"
    )


def test_idx_rank_above_the_limit(tmp_path):
    path = tmp_path / "rank255"
    path.write_bytes(bytes([0, 0, 0x08, 255]) + b"\x00" * (4 * 255))
    with pytest.raises(ValueError) as info:
        read_idx(path)
    assert str(info.value) == f"{path}: IDX rank 255 is not supported (allowed: 0 to {IDX_MAX_RANK} dimensions)"
    assert IDX_MAX_RANK >= 32
    array = np.arange(2, dtype=np.uint8).reshape((1,) * (IDX_MAX_RANK - 1) + (2,))
    assert read_idx(write_idx(tmp_path / "deepest", array)).shape == array.shape  # the limit itself reads


# ---------------------------------------------------------------------------------------------
# MNIST


def test_load_bundled_mnist():
    data = load_mnist(default_data_dir() / "mnist")
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    assert x_train.shape == (60000, 28, 28) and x_train.dtype == torch.uint8
    assert x_test.shape == (10000, 28, 28) and x_test.dtype == torch.uint8
    assert y_train.shape == (60000,) and y_train.dtype == torch.int64
    assert y_test.shape == (10000,) and y_test.dtype == torch.int64
    assert int(y_train.min()) == 0 and int(y_train.max()) == 9
    assert y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert y_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(y_train, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert int(x_train.max()) == 255


def write_fake_mnist(folder: Path, n_train=6, n_test=4, dotted=False, compress=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, 28, 28)).astype(np.uint8),
        "train-labels": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images": rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8),
        "t10k-labels": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for stem, array in arrays.items():
        kind = "idx3-ubyte" if array.ndim == 3 else "idx1-ubyte"
        name = f"{stem}.{kind}" if dotted else f"{stem}-{kind}"
        write_idx(folder / (name + (".gz" if compress else "")), array, compress)
    return arrays


@pytest.mark.parametrize("dotted,compress", [(True, False), (False, False), (True, True)])
def test_load_mnist_name_variants(tmp_path, dotted, compress):
    arrays = write_fake_mnist(tmp_path, dotted=dotted, compress=compress)
    data = load_mnist(tmp_path)
    np.testing.assert_array_equal(data["train"][0].numpy(), arrays["train-images"])
    np.testing.assert_array_equal(data["test"][1].numpy(), arrays["t10k-labels"].astype(np.int64))


def test_load_mnist_missing_folder_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message
    for name in MNIST_NAMES:
        assert name in message


def test_load_mnist_missing_file(tmp_path):
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_mnist(tmp_path)
    assert "t10k-labels.idx1-ubyte" in str(info.value)  # the dotted variant it looked for


def test_load_mnist_count_mismatch(tmp_path):
    write_fake_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        load_mnist(tmp_path)


@pytest.mark.parametrize(
    "name,array,message",
    [
        ("train-labels-idx1-ubyte", np.full(6, -1, np.int8), "train labels must be class indices >= 0, got -1"),
        ("train-labels-idx1-ubyte", np.zeros(6, np.float32), "train labels must be integers, got torch.float32"),
        ("t10k-images-idx3-ubyte", np.zeros((4, 28, 28), np.float32), r"test images must be unsigned bytes \(IDX type 0x08\)"),
    ],
)
def test_load_mnist_rejects_what_a_classifier_cannot_use(tmp_path, name, array, message):
    write_fake_mnist(tmp_path)
    write_idx(tmp_path / name, array)
    with pytest.raises(ValueError, match=message):
        load_mnist(tmp_path)


def test_load_mnist_rejects_an_empty_split(tmp_path):
    write_fake_mnist(tmp_path, n_test=0)
    with pytest.raises(ValueError, match="the test split has no examples"):
        load_mnist(tmp_path)


def test_mnist_task_follows_the_image_size(tmp_path):
    """LeNet-5 is built for the data's image size (32x32 here); below 12x12 the task refuses."""
    from largebatch.train.tasks import get_task

    for stem, n in (("train", 6), ("t10k", 4)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte", np.zeros((n, 32, 32), np.uint8))
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8))
    task = get_task("mnist-lenet", data_dir=str(tmp_path))
    batch = task.get_batch("train", torch.arange(3))
    loss, _ = task.loss(task.build_model(), batch)
    assert batch.tensors["x"].shape == (3, 1, 32, 32) and torch.isfinite(loss)
    small = tmp_path / "small"
    small.mkdir()
    for stem, n in (("train", 6), ("t10k", 4)):
        write_idx(small / f"{stem}-images-idx3-ubyte", np.zeros((n, 11, 11), np.uint8))
        write_idx(small / f"{stem}-labels-idx1-ubyte", np.zeros(n, np.uint8))
    with pytest.raises(ValueError, match="LeNet-5 needs images of at least 12x12, got 11x11"):
        get_task("mnist-lenet", data_dir=str(small))


@pytest.mark.parametrize(
    "split,n_train,largest",
    [("train", 6, 6), ("t10k", 6, 1000), ("train", 6, 2_000_000_000)],
)
def test_mnist_task_refuses_labels_that_are_not_class_indices(tmp_path, split, n_train, largest):
    """The model has max(label) + 1 outputs: a label not below the number of training examples
    (it would build a huge classifier) is refused, naming the file."""
    from largebatch.train.tasks import get_task

    write_fake_mnist(tmp_path, n_train=n_train)
    for stem, n in (("train", n_train), ("t10k", 4)):
        labels = np.arange(n, dtype=np.int32) % 3
        if stem == split:
            labels[1] = largest
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", labels)
    with pytest.raises(ValueError) as info:
        get_task("mnist-lenet", data_dir=str(tmp_path))
    assert str(info.value) == (
        f"{tmp_path / f'{split}-labels-idx1-ubyte'}: label {largest} is not less than the number of training "
        f"examples ({n_train}); labels must be class indices 0..C-1 for C classes, remap them"
    )


def test_mnist_task_accepts_labels_below_the_number_of_training_examples(tmp_path):
    from largebatch.train.tasks import get_task

    write_fake_mnist(tmp_path, n_train=12)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(12, dtype=np.uint8))  # 0..11: 12 classes
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(4, dtype=np.uint8))
    task = get_task("mnist-lenet", data_dir=str(tmp_path), train_subset=3)  # the bound is the full split
    assert task.num_classes == 4 and task.build_model().fc3.out_features == 10  # at least 10 outputs, as before
    assert get_task("mnist-lenet", data_dir=str(tmp_path)).num_classes == 12


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def write_fake_cifar(folder: Path, per_batch=4, n_test=6, protocol=2) -> dict[str, np.ndarray]:
    """Batches in the layout of the official python release (bytes keys, uint8 data, int list)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    all_data, all_labels = [], []
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        all_data.append(data)
        all_labels.append(labels)
    return {
        "train_data": np.concatenate(all_data[:5]),
        "train_labels": np.concatenate(all_labels[:5]),
        "test_data": all_data[5],
        "test_labels": np.array(all_labels[5]),
    }


@pytest.mark.parametrize("protocol", [2, 5])
def test_load_cifar10_standard_pickles(tmp_path, protocol):
    expected = write_fake_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    data = load_cifar10(tmp_path)  # finds the cifar-10-batches-py subfolder
    x, y = data["train"]
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == expected["train_labels"].tolist()
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
    n, c, r, col = 7, 1, 5, 30
    assert int(x[n, c, r, col]) == int(expected["train_data"][n, c * 1024 + r * 32 + col])
    assert data["test"][0].shape == (6, 3, 32, 32)
    assert data["test"][1].tolist() == expected["test_labels"].tolist()
    assert load_cifar10(tmp_path / "cifar-10-batches-py")["train"][0].equal(x)


class _Exploit:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_load_cifar10_refuses_malicious_pickle(tmp_path):
    write_fake_cifar(tmp_path)
    target = tmp_path / "pwned"
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Exploit(str(target)), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_3: not a CIFAR-10 python batch file \(UnpicklingError: "
                       r"refusing to load global (io|builtins)\.open"):
        load_cifar10(tmp_path)
    assert not target.exists()


def test_load_cifar10_truncated_pickle_is_a_value_error(tmp_path):
    write_fake_cifar(tmp_path)
    content = (tmp_path / "data_batch_2").read_bytes()
    (tmp_path / "data_batch_2").write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError) as info:
        load_cifar10(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'data_batch_2'}: not a CIFAR-10 python batch file (UnpicklingError: pickle data was truncated)"
    )


@pytest.mark.parametrize(
    "name,labels,bad,value,index",
    [
        ("data_batch_1", [3, 10, 0, 10], 2, "10", 1),
        ("data_batch_5", [-1, 0, 1, 2], 1, "-1", 0),
        ("test_batch", [0, 1, 2, 12, 4, 5], 1, "12", 3),
        ("data_batch_2", [3.5, 1.0, 2.0, 0.0], 1, "3.5", 0),
        ("data_batch_2", np.array([1, 2, 3, 200], np.uint8), 1, "200", 3),
        ("data_batch_3", [b"3", b"1", b"2", b"0"], 4, "b'3'", 0),
        ("data_batch_3", [1, 2, 3, 2**70], 1, str(2**70), 3),
        ("data_batch_4", [True, False, True, False], 4, "True", 0),
    ],
)
def test_load_cifar10_refuses_labels_that_are_not_classes(tmp_path, name, labels, bad, value, index):
    write_fake_cifar(tmp_path)
    with open(tmp_path / name, "wb") as f:
        pickle.dump({b"data": np.zeros((len(labels), 3072), np.uint8), b"labels": labels}, f, protocol=2)
    with pytest.raises(ValueError) as info:
        load_cifar10(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / name}: {bad} label(s) are not CIFAR-10 classes, the first {value} at index {index}; "
        f"labels must be integers 0..9 (the model has 10 classes)"
    )


def test_load_cifar10_accepts_integral_float_labels(tmp_path):
    expected = write_fake_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [9.0, 0.0, 4.0]}, f, protocol=2)
    data = load_cifar10(tmp_path)
    assert data["test"][1].dtype == torch.int64 and data["test"][1].tolist() == [9, 0, 4]
    assert data["train"][1].tolist() == expected["train_labels"].tolist()


def test_load_cifar10_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1, data_batch_2.*test_batch"):
        load_cifar10(tmp_path / "nowhere")
    write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="missing in .*: data_batch_4;"):
        load_cifar10(tmp_path)


def test_load_cifar10_wrong_shape(tmp_path):
    write_fake_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"uint8 \[N, 3072\]"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------------------------------------
# Text, folders


def test_load_text_corpus(tmp_path):
    (tmp_path / "b.txt").write_text("bee\n")
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress("ay\u00e9\n".encode()))
    (tmp_path / "c.md").write_text("ignored")
    assert load_text_corpus(tmp_path) == [("a", "ay\u00e9\n"), ("b", "bee\n")]
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"again"))
    with pytest.raises(ValueError, match="same work name 'b'|give the work name 'b'"):
        load_text_corpus(tmp_path)


def test_load_text_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_corpus(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no \*\.txt"):
        load_text_corpus(tmp_path)


def test_bundled_shakespeare():
    works = load_text_corpus(default_data_dir() / "shakespeare" / "works")
    names = [n for n, _ in works]
    assert len(works) == 42 and names == sorted(names)
    assert "hamlet" in names and "sonnets" in names
    assert 4_900_000 < sum(len(t) for _, t in works) < 5_200_000


def test_default_data_dir_and_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("LARGEBATCH_DATA", raising=False)
    assert (default_data_dir() / "mnist" / "train-images-idx3-ubyte.gz").is_file()
    assert (default_data_dir() / "README.md").is_file()
    monkeypatch.setenv("LARGEBATCH_DATA", str(tmp_path / "elsewhere"))
    assert default_data_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" and (tmp_path / "cache").is_dir()

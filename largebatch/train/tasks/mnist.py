"""``mnist-lenet``: LeNet-5 on MNIST (the paper's MNIST comparison of optimizers).

The model is LeNet-5 (LeCun et al. 1998) in its common modern form: conv 6@5x5 (padding 2, so
28x28 inputs keep the classic 32x32 geometry) -> ReLU -> 2x2 max-pool -> conv 16@5x5 -> ReLU ->
2x2 max-pool -> fc 120 -> ReLU -> fc 84 -> ReLU -> fc 10. The original used scaled tanh units,
subsampling layers with trainable coefficients and a partially connected C3 layer; ReLU, max
pooling and a fully connected C3 are what the large-batch literature runs.

Images are normalised once at construction (mean 0.1307, std 0.3081, the MNIST training-set
statistics) and kept in memory as float32 ``[N, 1, H, W]`` (28x28 for MNIST; the model follows the
size of the data, at least 12x12). No augmentation, so ``get_batch``
ignores its generator.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import default_data_dir, load_mnist, mnist_file
from ..task import Batch, Task
from .common import check_split, classification_loss, subset_size

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def lenet_feature_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """The spatial size LeNet-5's second pooling leaves of ``H x W`` inputs (5x5 for 28x28)."""
    h, w = (((d + 4 - 4) // 2 - 4) // 2 for d in image_size)  # conv1 keeps the size (padding 2)
    if h < 1 or w < 1:
        raise ValueError(f"LeNet-5 needs images of at least 12x12, got {image_size[0]}x{image_size[1]}")
    return h, w


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling, for ``1 x H x W`` inputs (28x28 by default, at least
    12x12) and ``num_classes`` outputs."""

    def __init__(self, num_classes: int = 10, image_size: tuple[int, int] = (28, 28)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        h, w = lenet_feature_size(image_size)
        self.fc1 = nn.Linear(16 * h * w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def check_label_range(folder: str | os.PathLike, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Refuse a largest label (train or test) that is not less than the number of training examples.

    The model has ``max(label) + 1`` outputs, so labels must be class indices ``0..C-1``; a label
    like 2e9 would try to build a classifier of billions of outputs. (A bound, not a proof: a stray
    label below the number of training examples, 250 in a 3-class set of 300, still passes.)"""
    n_train = data["train"][1].shape[0]
    split = max(("train", "test"), key=lambda s: int(data[s][1].max()))
    largest = int(data[split][1].max())
    if largest >= n_train:
        path = mnist_file(Path(folder), split, "labels") or Path(folder)
        raise ValueError(
            f"{path}: label {largest} is not less than the number of training examples ({n_train}); "
            f"labels must be class indices 0..C-1 for C classes, remap them"
        )


class MnistLeNetTask(Task):
    """LeNet-5 on MNIST (or any data in the MNIST IDX layout).

    Args:
        data_dir: folder with the four MNIST IDX files; default ``default_data_dir() / "mnist"``
            (the bundled copy). Fashion-MNIST in the same layout works unchanged.
        train_subset: use only the first N training examples (fast tests and demos).
        eval_subset: use only the first N test examples.

    Splits: "train" is the 60,000 training images, "eval" the 10,000 test images. Batches hold
    ``x`` (float32 ``[B, 1, H, W]``, normalised) and ``y`` (int64 ``[B]``); weight = B.
    Metric "accuracy": correct predictions, a sum that ``evaluate`` divides by the weight.
    Labels must be class indices 0..C-1: the model has ``max(10, C)`` outputs, and a label not
    less than the number of training examples is refused (see :func:`check_label_range`).
    """

    name = "mnist-lenet"
    metric = "accuracy"

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        train_subset: int | None = None,
        eval_subset: int | None = None,
    ):
        folder = default_data_dir() / "mnist" if data_dir is None else data_dir
        data = load_mnist(folder)
        check_label_range(folder, data)
        self.data_dir = str(folder)
        self._x: dict[str, torch.Tensor] = {}
        self._y: dict[str, torch.Tensor] = {}
        for split, source, subset, option in (
            ("train", "train", train_subset, "train_subset"),
            ("eval", "test", eval_subset, "eval_subset"),
        ):
            images, labels = data[source]
            n = subset_size(subset, images.shape[0], option)
            x = images[:n].unsqueeze(1).to(torch.float32).div_(255.0)
            self._x[split] = x.sub_(MNIST_MEAN).div_(MNIST_STD).contiguous()
            self._y[split] = labels[:n].clone()
        self.num_classes = int(max(self._y["train"].max(), self._y["eval"].max())) + 1
        self.image_size = tuple(self._x["train"].shape[-2:])
        if self._x["eval"].shape[-2:] != self._x["train"].shape[-2:]:
            raise ValueError(
                f"{folder}: train images are {self.image_size[0]}x{self.image_size[1]} but test images "
                f"{self._x['eval'].shape[-2]}x{self._x['eval'].shape[-1]}; both splits need one size"
            )
        lenet_feature_size(self.image_size)  # a size LeNet-5 cannot take fails here, before training

    def build_model(self) -> nn.Module:
        return LeNet5(num_classes=max(10, self.num_classes), image_size=self.image_size)

    def num_examples(self, split: str) -> int:
        return self._y[check_split(split, self.name)].shape[0]

    def get_batch(self, split: str, indices: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        split = check_split(split, self.name)
        indices = torch.as_tensor(indices, dtype=torch.long)
        return Batch({"x": self._x[split][indices], "y": self._y[split][indices]}, int(indices.numel()))

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return classification_loss(model, batch)

"""``cifar10-resnet``: the DavidNet ResNet-9 on CIFAR-10 (the paper's CIFAR-10 experiment).

The model is the ResNet-9 of D. Page's "How to train your ResNet" (DAWNBench 2018, "DavidNet"),
the network behind the paper's CIFAR-10 comparison:

    prep:   conv_bn(3 -> 64)
    layer1: conv_bn(64 -> 128), max-pool 2, + residual(conv_bn(128 -> 128), conv_bn(128 -> 128))
    layer2: conv_bn(128 -> 256), max-pool 2
    layer3: conv_bn(256 -> 512), max-pool 2, + residual(conv_bn(512 -> 512), conv_bn(512 -> 512))
    head:   global max-pool, linear 512 -> 10 (no bias), output multiplied by 0.125

where conv_bn is a 3x3 convolution (no bias) -> BatchNorm -> ReLU. ``width`` scales every channel
count (1.0 is the original; small values make fast tests).

Data: CIFAR-10's python release, read with :func:`largebatch.train.data.load_cifar10` from a
user-supplied folder (no package registry ships it). Images stay uint8 in memory and are
normalised per batch with the training-set channel mean/std. Training batches are augmented as in
DavidNet: a random 32x32 crop of the image padded by 4 pixels (reflection padding, as DavidNet;
torchvision's ``RandomCrop(padding=4)`` pads with zeros) and a horizontal flip with probability
1/2, both drawn only from the generator passed to ``get_batch``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import CIFAR10_TEST_FILES, CIFAR10_TRAIN_FILES, default_data_dir, load_cifar10
from ..task import Batch, Task, example_generators
from .common import bool_option, check_split, classification_loss, float_option, subset_size

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
PAD = 4


class ConvBN(nn.Module):
    """3x3 convolution (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    """x + conv_bn(conv_bn(x))."""

    def __init__(self, channels: int):
        super().__init__()
        self.res1 = ConvBN(channels, channels)
        self.res2 = ConvBN(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res2(self.res1(x))


class ResNet9(nn.Module):
    """DavidNet ResNet-9; ``width`` multiplies the channel counts 64/128/256/512."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, output_scale: float = 0.125):
        super().__init__()
        c = [max(1, round(base * width)) for base in (64, 128, 256, 512)]
        self.prep = ConvBN(3, c[0])
        self.layer1 = nn.Sequential(ConvBN(c[0], c[1]), nn.MaxPool2d(2), Residual(c[1]))
        self.layer2 = nn.Sequential(ConvBN(c[1], c[2]), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(ConvBN(c[2], c[3]), nn.MaxPool2d(2), Residual(c[3]))
        self.fc = nn.Linear(c[3], num_classes, bias=False)
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        x = torch.amax(x, dim=(2, 3))
        return self.fc(x) * self.output_scale


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator | None, pad: int = PAD, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """Random ``H x W`` crops of the reflection-padded ``images`` ``[B, C, H, W]``, each flipped
    horizontally with probability 1/2. Draws, in order: crop offsets ``[B, 2]`` in [0, 2*pad],
    then flip bits ``[B]``. With ``keys`` (one example index per image), image i draws its offsets
    ``[2]`` and flip ``[1]`` from its own generator (:func:`largebatch.train.task.example_generators`),
    independently of the other images of the batch."""
    b, c, h, w = images.shape
    if keys is None:
        offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
        flip = torch.randint(0, 2, (b,), generator=generator).bool()
    else:
        draws = [(torch.randint(0, 2 * pad + 1, (2,), generator=g), torch.randint(0, 2, (1,), generator=g))
                 for g in example_generators(generator, keys)]  # fmt: skip
        offsets = torch.stack([o for o, _ in draws]) if draws else torch.zeros((0, 2), dtype=torch.long)
        flip = torch.cat([f for _, f in draws]).bool() if draws else torch.zeros(0, dtype=torch.bool)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    rows = offsets[:, :1] + torch.arange(h)  # [B, H]
    cols = offsets[:, 1:] + torch.where(flip[:, None], torch.arange(w - 1, -1, -1), torch.arange(w))  # [B, W]
    return padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


class Cifar10ResNetTask(Task):
    """ResNet-9 (DavidNet) on CIFAR-10.

    Args:
        data_dir: folder with the CIFAR-10 python batches (``data_batch_1`` ... ``data_batch_5``,
            ``test_batch``) or their ``cifar-10-batches-py`` folder. When omitted, the task looks
            for ``cifar-10-batches-py`` or ``cifar10`` under :func:`default_data_dir` and raises
            ``ValueError`` if neither exists (CIFAR-10 is not bundled).
        width: channel multiplier of the model (1.0 = DavidNet; e.g. 0.125 for quick tests).
        augment: random crop + flip on training batches (default True); a bool, or the text
            true/false, 1/0, yes/no, on/off in any case.
        train_subset, eval_subset: use only the first N examples of a split.

    Batches hold ``x`` (float32 ``[B, 3, 32, 32]``, normalised) and ``y`` (int64 ``[B]``);
    weight = B; metric "accuracy" (correct predictions, summed).
    """

    name = "cifar10-resnet"
    metric = "accuracy"

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        width: float = 1.0,
        augment: bool = True,
        train_subset: int | None = None,
        eval_subset: int | None = None,
    ):
        width = float_option(width, "width")
        if not width > 0:
            raise ValueError(f"width must be a positive channel multiplier, got {width}")
        augment = bool_option(augment, "augment")  # before the (slow) data load
        if data_dir is None:
            data_dir = self._default_folder()
        data = load_cifar10(data_dir)
        self.data_dir = str(data_dir)
        self.width = width
        self.augment = augment
        self._x: dict[str, torch.Tensor] = {}
        self._y: dict[str, torch.Tensor] = {}
        for split, source, subset, option in (
            ("train", "train", train_subset, "train_subset"),
            ("eval", "test", eval_subset, "eval_subset"),
        ):
            images, labels = data[source]
            n = subset_size(subset, images.shape[0], option)
            self._x[split] = images[:n].contiguous()
            self._y[split] = labels[:n].clone()
        self._mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) * 255.0

    @staticmethod
    def _default_folder() -> Path:
        root = default_data_dir()
        for candidate in (root / "cifar-10-batches-py", root / "cifar10"):
            if candidate.is_dir():
                return candidate
        files = ", ".join(CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES)
        raise ValueError(
            "cifar10-resnet needs the CIFAR-10 python release, which is not bundled: pass "
            f"data_dir=<folder with {files}> (unpack cifar-10-python.tar.gz from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html), or put it in {root / 'cifar10'}"
        )

    def build_model(self) -> nn.Module:
        return ResNet9(num_classes=10, width=self.width)

    def num_examples(self, split: str) -> int:
        return self._y[check_split(split, self.name)].shape[0]

    def get_batch(self, split: str, indices: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        split = check_split(split, self.name)
        indices = torch.as_tensor(indices, dtype=torch.long)
        x = self._x[split][indices].to(torch.float32)
        if split == "train" and self.augment:
            x = random_crop_flip(x, generator, keys=indices)
        x = (x - self._mean) / self._std
        return Batch({"x": x, "y": self._y[split][indices]}, int(indices.numel()))

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return classification_loss(model, batch)

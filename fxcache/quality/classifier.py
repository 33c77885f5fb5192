"""A small digit classifier of our own: class accuracy of samples (our stand-in for a CLIP score) and the
features for a Frechet distance (our stand-in for FID's Inception features)."""

from __future__ import annotations

import os

import torch
from torch import nn

from .reference import CHECKPOINTS

WEIGHTS = os.path.join(CHECKPOINTS, "classifier.safetensors")
REAL_STATS = os.path.join(CHECKPOINTS, "real_digit_features.safetensors")


class DigitClassifier(nn.Module):
    """32x32 digits in [-1, 1] -> 10 logits; `features` gives the 128-d penultimate activations.

    Frechet distances use the 10 logits (`fd_features`): a harness compares sets of 40-100 samples, too few for
    a stable 128 x 128 covariance.
    """

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.GELU(),
        )
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.clamp(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def fd_features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 8, seed: int = 0,
                     holdout: int = 500) -> tuple[DigitClassifier, float]:
    """Train on all but `holdout` random digits (with small shifts as augmentation); returns (model, holdout acc)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(images.shape[0], generator=g)
    test, train = perm[:holdout], perm[holdout:]
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        model.train()
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            x = images[idx]
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    return model, acc


def load_weights(model: nn.Module, path: str, what: str, command: str) -> nn.Module:
    """`model` with the safetensors weights at `path`, in eval mode; a missing file names the training command."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"no {what} at {path}; train it with python benchmarks/train_reference.py {command}")
    model.load_state_dict(load_file(path))
    return model.eval()


def load_classifier(path: str = WEIGHTS) -> DigitClassifier:
    return load_weights(DigitClassifier(), path, "digit classifier", "classifier")


def save_classifier(model: DigitClassifier, images: torch.Tensor, path: str = WEIGHTS,
                    stats_path: str = REAL_STATS) -> None:
    """Weights, and the (mean, covariance) of its features on `images` (the real digits) for Frechet distances."""
    from safetensors.torch import save_file

    from .metrics import feature_stats

    save_file(model.state_dict(), path)
    with torch.no_grad():
        mu, cov = feature_stats(model.eval().fd_features(images))
    save_file({"mean": mu, "cov": cov}, stats_path)


def real_feature_stats(path: str = REAL_STATS) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"no real-digit feature statistics at {path}; train the classifier with "
                                "benchmarks/train_reference.py classifier")
    d = load_file(path)
    return d["mean"], d["cov"]

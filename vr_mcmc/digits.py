"""The digits Bayesian neural net: the posterior that `vr-mcmc demo`, the reference and the benchmarks share.

scikit-learn's digits (1797 images of 8×8 pixels, 10 classes; bundled, no download), a stratified
75/25 train/test split (1347/450, ``random_state=0``), features standardized with the training set's
statistics. Model: MLP 64-``hidden``-10 with tanh; likelihood softmax cross-entropy; prior
N(0, ``prior_std``²) on every weight and bias; target π(θ) ∝ exp(−U(θ)/T) with
U(θ) = −log p(θ) − Σ_i log p(y_i | x_i, θ) (DESIGN §2). ``num_train`` < 1347 keeps a stratified
subset of the training set (``random_state=1``), so N varies with the test set fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import mlp

__all__ = ["DigitsBNN", "load_digits_split"]

NUM_CLASSES = 10
FULL_TRAIN = 1347


def load_digits_split(test_size: int = 450, seed: int = 0, device: Any = "cpu"):
    """scikit-learn's digits: (X_train, y_train, X_test, y_test) as float32/long tensors on ``device``,
    a stratified split, features standardized with the training set's statistics."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise SystemExit("the digits problem needs scikit-learn (its bundled digits data set): pip install "
                         "scikit-learn") from exc
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # pixels that are always 0 in the training set stay 0

    def tensor(a, dtype):
        return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)

    return (tensor((x_train - mean) / std, torch.float32), tensor(y_train, torch.long),
            tensor((x_test - mean) / std, torch.float32), tensor(y_test, torch.long))


@dataclass(frozen=True)
class DigitsBNN:
    """One posterior of the family: width, prior, temperature and training-set size."""

    hidden: int = 32
    prior_std: float = 0.5
    temperature: float = 1.0
    num_train: int = FULL_TRAIN
    test_size: int = 450

    def __post_init__(self):
        if not 10 <= self.num_train <= FULL_TRAIN:
            raise ValueError(f"num_train must lie in [10, {FULL_TRAIN}], got {self.num_train}")
        if self.temperature <= 0 or self.prior_std <= 0 or self.hidden < 1:
            raise ValueError("temperature and prior_std must be > 0 and hidden >= 1")

    @property
    def name(self) -> str:
        """A short key for files: ``digits-h32-n1347-T1``."""
        return f"digits-h{self.hidden}-n{self.num_train}-T{self.temperature:g}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def data(self, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(X_train, y_train, X_test, y_test); the training set subsampled to ``num_train``."""
        x, y, xt, yt = load_digits_split(self.test_size, device=device)
        if self.num_train < len(x):
            from sklearn.model_selection import train_test_split

            keep, _ = train_test_split(np.arange(len(x)), train_size=self.num_train, random_state=1,
                                       stratify=y.cpu().numpy())
            keep = torch.as_tensor(np.sort(keep), device=x.device)
            x, y = x[keep], y[keep]
        return x, y, xt, yt

    def model(self, device: Any = "cpu") -> nn.Module:
        return mlp((64, self.hidden, NUM_CLASSES), activation=nn.Tanh).to(device)

    @property
    def num_params(self) -> int:
        return 64 * self.hidden + self.hidden + self.hidden * NUM_CLASSES + NUM_CLASSES

    def unflatten(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """The flat parameter vector as the model's [W1, b1, W2, b2] (``nn.Linear`` layouts)."""
        shapes = [(self.hidden, 64), (self.hidden,), (NUM_CLASSES, self.hidden), (NUM_CLASSES,)]
        out, start = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            out.append(theta[..., start:start + size].reshape(*theta.shape[:-1], *shape))
            start += size
        return out

    def flatten(self, model: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, 10] for a flat θ [P] (or [C, B, 10] for stacked θ [C, P])."""
        w1, b1, w2, b2 = self.unflatten(theta)
        h = torch.tanh(x @ w1.transpose(-1, -2) + b1.unsqueeze(-2))
        return h @ w2.transpose(-1, -2) + b2.unsqueeze(-2)

    def log_density(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """θ ↦ log p(θ) + Σ_i log p(y_i | x_i, θ) = −U(θ), for the full-data samplers (HMC) on a flat θ;
        give the sampler ``temperature=T``."""
        inv_var = 1.0 / self.prior_std**2

        def log_density(theta: torch.Tensor) -> torch.Tensor:
            return -F.cross_entropy(self.logits(theta, x), y, reduction="sum") - 0.5 * inv_var * (theta * theta).sum()

        return log_density

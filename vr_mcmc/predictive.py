"""Scoring a sampler's posterior predictive against a reference one (Izmailov et al. 2021).

A neural-net posterior has many symmetric modes, so samplers are compared in predictive space: for
each test point the class probabilities averaged over draws, p(k | x) = mean_s softmax(f(x; θ_s))_k.

- **total variation** ``TV = mean_x ½ Σ_k |p_k(x) − p_ref,k(x)|`` (0: the same predictive);
- **agreement** ``mean_x [argmax p(x) = argmax p_ref(x)]`` (1: the same top class everywhere);
- the predictive's test log-likelihood ``mean_x log p_{y(x)}(x)`` and accuracy.

`PredictiveReference` holds a reference predictive (from long full-batch HMC, see
``benchmarks/bnn_reference.py``), shipped with the package for the digits BNN posteriors
(`load_reference`), and refuses predictives of another shape or class count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PredictiveReference", "agreement", "available_references", "load_reference", "predictive_scores",
           "total_variation"]

REFERENCE_PACKAGE = "vr_mcmc.references"


def _as_probs(p: Any, name: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim < 2:
        raise ValueError(f"{name} must hold class probabilities [..., test points, classes], got shape {p.shape}")
    return p


def total_variation(probs: Any, reference: Any) -> np.ndarray:
    """½ Σ_k |p_k − p_ref,k| averaged over test points (the last two axes: points, classes); leading axes kept."""
    p, q = _as_probs(probs, "probs"), _as_probs(reference, "reference")
    return 0.5 * np.abs(p - q).sum(-1).mean(-1)


def agreement(probs: Any, reference: Any) -> np.ndarray:
    """Share of test points whose most probable class equals the reference's (last two axes: points, classes)."""
    p, q = _as_probs(probs, "probs"), _as_probs(reference, "reference")
    return (p.argmax(-1) == q.argmax(-1)).mean(-1)


def predictive_scores(probs: Any, labels: Any) -> dict[str, np.ndarray]:
    """Test log-likelihood (mean log p of the true class) and accuracy of a predictive [..., points, classes]."""
    p = _as_probs(probs, "probs")
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != p.shape[-2:-1]:
        raise ValueError(f"labels has shape {y.shape}, the predictive {p.shape[-2]} test points")
    p_true = np.take_along_axis(p, np.broadcast_to(y[:, None], (*p.shape[:-1], 1)), axis=-1)[..., 0]
    return {"loglik": np.log(np.clip(p_true, 1e-300, None)).mean(-1), "accuracy": (p.argmax(-1) == y).mean(-1)}


@dataclass
class PredictiveReference:
    """A reference posterior predictive: ``probs`` [points, classes] (all draws), ``chain_probs``
    [chains, points, classes] (each chain's draws), the test ``labels``, and ``meta`` (the posterior's
    settings, how it was made and its own checks)."""

    probs: np.ndarray
    chain_probs: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        return self.probs.shape[0]

    @property
    def num_classes(self) -> int:
        return self.probs.shape[1]

    def check(self, probs: Any, what: str = "the predictive") -> np.ndarray:
        """``probs`` as float64 if it matches the reference's test points and classes, else a clear error."""
        p = _as_probs(probs, what)
        if p.shape[-2:] != self.probs.shape:
            raise ValueError(
                f"{what} has {p.shape[-2]} test points × {p.shape[-1]} classes but the reference "
                f"'{self.meta.get('name', '?')}' has {self.num_points} × {self.num_classes}: score it against the "
                "reference of the same model and test set (see vr_mcmc.predictive.available_references())"
            )
        return p

    def total_variation(self, probs: Any) -> np.ndarray:
        return total_variation(self.check(probs), self.probs)

    def agreement(self, probs: Any) -> np.ndarray:
        return agreement(self.check(probs), self.probs)

    def scores(self, probs: Any) -> dict[str, np.ndarray]:
        """TV, agreement, test log-likelihood and accuracy of a predictive [..., points, classes]."""
        p = self.check(probs)
        return {"tv": total_variation(p, self.probs), "agreement": agreement(p, self.probs),
                **predictive_scores(p, self.labels)}

    def save(self, path: str | Path) -> None:
        """As a compressed ``.npz``, probabilities as 16-bit integers in units of 1/65535 (resolution 1.5e-5;
        the many near-zero probabilities become 0 and compress to almost nothing)."""
        np.savez_compressed(path, probs=_pack(self.probs), chain_probs=_pack(self.chain_probs),
                            labels=self.labels.astype(np.int8), meta=np.array(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: str | Path) -> PredictiveReference:
        try:
            with np.load(path, allow_pickle=False) as f:
                probs, chain_probs = _unpack(f["probs"]), _unpack(f["chain_probs"])
                labels, meta = f["labels"].astype(np.int64), json.loads(str(f["meta"]))
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path} is not a predictive reference file ({exc}); rebuild it with "
                             "benchmarks/bnn_reference.py") from exc
        if probs.ndim != 2 or chain_probs.shape[1:] != probs.shape or labels.shape != probs.shape[:1]:
            raise ValueError(f"{path}: inconsistent shapes probs {probs.shape}, chain_probs {chain_probs.shape}, "
                             f"labels {labels.shape}")
        return cls(probs, chain_probs, labels, meta)


def _pack(p: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(p, 0.0, 1.0) * 65535).astype(np.uint16)


def _unpack(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float64) / 65535 if q.dtype == np.uint16 else q.astype(np.float64)


def available_references() -> list[str]:
    """Names of the references shipped with the package (e.g. ``digits-h32-n1347-T1``)."""
    root = resources.files(REFERENCE_PACKAGE)
    return sorted(p.name[:-4] for p in root.iterdir() if p.name.endswith(".npz"))


def load_reference(problem: Any) -> PredictiveReference:
    """The shipped reference of a posterior: its name, or a `vr_mcmc.digits.DigitsBNN` (whose settings must
    equal the reference's)."""
    name = problem if isinstance(problem, str) else problem.name
    path = resources.files(REFERENCE_PACKAGE) / f"{name}.npz"
    if not path.is_file():
        raise ValueError(f"no shipped reference for '{name}'; available: {available_references()}. Build one with "
                         f"python benchmarks/bnn_reference.py")
    with resources.as_file(path) as p:
        ref = PredictiveReference.load(p)
    if not isinstance(problem, str):
        mine, theirs = problem.as_dict(), ref.meta.get("problem", {})
        changed = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if changed:
            raise ValueError(f"the reference '{name}' was made for other settings: {changed} (reference, asked)")
    return ref

"""Posterior ensembles: the parameter draws a run kept (``vr_mcmc.sample(..., keep_params=k)`` or a `Recorder`
with ``keep_params``), loaded in turn into one model, and the posterior predictive they give (DESIGN.md §15).

::

    ensemble = vr_mcmc.PosteriorEnsemble("runs/cnn", model_fn())   # the checkpoint directory, a model to load into
    len(ensemble); ensemble[0]                                      # draws (chains in order); a state dict
    probs = ensemble.predict(x_test)                                # [n, K] posterior predictive
    ensemble.evaluate((x_test, y_test))                             # log_likelihood, accuracy, ece, brier
    az.loo(ensemble.to_arviz((x_test, y_test)))                     # log_likelihood group over (chain, draw, obs)

Conventions, for S draws θ_1..θ_S (every kept draw of every chain) and inputs x_i with targets y_i, i = 1..n:

- ``likelihood="categorical"`` (the default): the model returns logits f(x; θ) [n, K], p_s(k | x) =
  softmax(f(x; θ_s))_k, and the posterior predictive is their Monte Carlo mean p̄(k | x) = (1/S) Σ_s p_s(k | x).
  Predictive entropy H[p̄] = −Σ_k p̄_k log p̄_k (nats); split as H[p̄] = (1/S) Σ_s H[p_s] (aleatoric, expected
  entropy) + the mutual information between y and θ (epistemic, the rest).
- ``likelihood="gaussian"``: y | x, θ ~ N(μ(x; θ), σ²(x; θ)). With ``noise_std=σ`` the model returns μ (any shape,
  first axis over inputs) and σ is fixed; without it the model's last axis has size 2 and holds (μ, log σ²).
  Predictive mean m = (1/S) Σ_s μ_s and variance v = (1/S) Σ_s (σ_s² + μ_s²) − m² (law of total variance:
  aleatoric (1/S) Σ_s σ_s² plus epistemic Var_s μ_s). The predictive itself is a mixture, not a Gaussian.
- test log-likelihood: (1/n) Σ_i log (1/S) Σ_s p(y_i | x_i, θ_s), by log-sum-exp over draws in float64 (a
  Gaussian target with several components: their log densities summed per input).
- accuracy: share of inputs with argmax_k p̄(k | x_i) = y_i (ties: the first class, as torch.argmax).
- ECE (Guo et al. 2017): confidence c_i = max_k p̄(k | x_i), ``bins`` (15) equal-width bins (b/B, (b+1)/B]
  (c = 0 in the first); ECE = Σ_b (n_b / n) |acc_b − conf_b| over non-empty bins, acc_b the bin's accuracy and
  conf_b its mean confidence (`calibration_bins` gives them, for a reliability diagram).
- Brier score: (1/n) Σ_i Σ_k (p̄_ik − [y_i = k])², the multi-class sum (Brier 1950): 0 best, 2 worst.

Memory: one draw at a time. Each draw is read from its file, loaded into the model (eval mode, no autograd)
and run over the data in batches of ``batch_size``; accumulators hold O(n·K) numbers, whatever S is. A
DataLoader is iterated once per draw, so it must give the same examples in the same order each time
(``shuffle=False``; the targets are compared on every pass). The model's parameters are overwritten (by the
last draw); its train/eval mode is restored.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .chains.checkpoint import MANIFEST_FILE, CheckpointError, sha256
from .chains.params import FORMAT, INDEX_FILE, PARAMS_DIR

__all__ = ["LIKELIHOODS", "PosteriorEnsemble", "brier_score", "calibration_bins", "expected_calibration_error"]

LIKELIHOODS = ("categorical", "gaussian")
LOG_2PI = math.log(2 * math.pi)


# -- calibration of a predictive -------------------------------------------------------------------------------


def _probs_labels(probs: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(np.asarray(probs) if not isinstance(probs, torch.Tensor) else probs).detach().double().cpu()
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).detach().cpu().long()
    if p.ndim != 2 or y.shape != p.shape[:1]:
        raise ValueError(f"probs must be [n, classes] and labels [n], got {tuple(p.shape)} and {tuple(y.shape)}")
    return p, y


def calibration_bins(probs: Any, labels: Any, bins: int = 15) -> dict[str, np.ndarray]:
    """Reliability diagram data: for each of ``bins`` equal-width confidence bins (b/B, (b+1)/B], the count,
    the mean confidence (max_k p_k) and the accuracy of its inputs (NaN where empty), and the edges."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    p, y = _probs_labels(probs, labels)
    confidence, predicted = p.max(-1)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence, edges[1:-1], right=False)  # edges[b-1] < c <= edges[b]
    count = torch.bincount(which, minlength=bins).double()
    correct = torch.bincount(which, weights=(predicted == y).double(), minlength=bins)
    conf_sum = torch.bincount(which, weights=confidence, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"count": count.numpy().astype(np.int64), "confidence": (conf_sum / count).numpy(),
                "accuracy": (correct / count).numpy(), "edges": edges.numpy()}


def expected_calibration_error(probs: Any, labels: Any, bins: int = 15) -> float:
    """ECE = Σ_b (n_b / n) |acc_b − conf_b| over ``bins`` equal-width bins of the confidence max_k p_k."""
    b = calibration_bins(probs, labels, bins)
    n = b["count"].sum()
    full = b["count"] > 0
    return float((b["count"][full] / n * np.abs(b["accuracy"][full] - b["confidence"][full])).sum())


def brier_score(probs: Any, labels: Any) -> float:
    """(1/n) Σ_i Σ_k (p_ik − [y_i = k])² (the multi-class Brier score, in [0, 2])."""
    p, y = _probs_labels(probs, labels)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return float(((p - onehot) ** 2).sum(-1).mean())


# -- the ensemble ------------------------------------------------------------------------------------------------


def _not_an_ensemble(directory: Path) -> Exception:
    """The error for a directory without an ensemble index, saying what it holds instead and what to do."""
    manifest = directory / MANIFEST_FILE
    if manifest.exists():
        try:
            content = json.loads(manifest.read_text())
        except (OSError, ValueError):
            content = {}
        if not content.get("keep_params"):
            return ValueError(f"{directory} holds a vr_mcmc.sample run made without keep_params, so its parameter "
                              "draws were not kept: sample again with keep_params=k and a new checkpoint directory "
                              "(the posterior predictive of a run without them: record={'p': fn(model)})")
        if content.get("results"):
            return ValueError(f"{directory} holds a finished vr_mcmc.sample run with keep_params="
                              f"{content['keep_params']} but its {INDEX_FILE} is missing: call vr_mcmc.sample again "
                              "with the same arguments, which writes it again from the chains' checkpoints")
        return ValueError(f"{directory} holds a vr_mcmc.sample run with keep_params={content['keep_params']} that has "
                          f"not finished ({INDEX_FILE} is written at the end): call vr_mcmc.sample again with the same "
                          "arguments to resume and finish it")
    if (directory / PARAMS_DIR).is_dir():
        return ValueError(f"{directory} holds parameter files but no {INDEX_FILE}: a Recorder writes it with "
                          "recorder.save_ensemble() (or recorder.to_arviz()); vr_mcmc.sample at the end of the run")
    return ValueError(f"{directory} is not a posterior ensemble (no {INDEX_FILE}): give the checkpoint= directory "
                      "of vr_mcmc.sample(..., keep_params=k), or the directory of a Recorder(keep_params=k, "
                      "directory=...)")


def _read_index(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    directory = Path(path)
    if directory.is_file():
        if directory.name != INDEX_FILE:
            raise ValueError(f"{directory} is a file: give the directory that holds {INDEX_FILE} and {PARAMS_DIR}/ "
                             f"(the checkpoint= directory of the run), e.g. {str(directory.parent)!r}")
        directory = directory.parent
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist: give the checkpoint= directory of "
                                "vr_mcmc.sample(..., keep_params=k)")
    index_path = directory / INDEX_FILE
    if not index_path.exists():
        raise _not_an_ensemble(directory)
    try:
        content = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{index_path} is damaged ({exc}); the parameter files are untouched. If the run "
                              "was made by vr_mcmc.sample, calling it again with the same arguments writes it "
                              "again") from exc
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ValueError(f"{index_path} is not a vr_mcmc ensemble index (format {content.get('format')!r}, "
                         f"expected {FORMAT!r})" if isinstance(content, dict) else f"{index_path} is not an index")
    return directory, content


class PosteriorEnsemble:
    """The parameter draws in ``path`` (a ``checkpoint=`` directory of ``vr_mcmc.sample(..., keep_params=k)``),
    loaded lazily, one at a time, into ``model`` (a module of the sampled architecture: the run's ``model_fn()``).
    See the module docstring for the conventions.

    ``likelihood``: "categorical" (logits) or "gaussian" (with ``noise_std``, or (mean, log-variance) on the
    last axis). ``batch_size``: inputs per forward pass. ``verify``: check each file's sha256 the first time it
    is read (its size is always checked on opening).
    """

    def __init__(self, path: str | os.PathLike, model: torch.nn.Module, *, likelihood: str = "categorical",
                 noise_std: float | None = None, batch_size: int = 1024, verify: bool = True):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module of the sampled architecture (the run's model_fn()), "
                            f"got {type(model).__name__}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if noise_std is not None and (likelihood != "gaussian" or not noise_std > 0):
            raise ValueError(f"noise_std (a fixed Gaussian noise sd > 0) goes with likelihood='gaussian'; got "
                             f"noise_std={noise_std!r}, likelihood={likelihood!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.directory, self.index = _read_index(path)
        self.model, self.likelihood, self.noise_std = model, likelihood, noise_std
        self.batch_size, self.verify = batch_size, verify
        chains = self.index["chains"]
        self.chain_ids: list[int] = list(self.index.get("chain_ids", range(len(chains))))
        self._entries = [(c, e) for c, entries in enumerate(chains) for e in entries]
        if not self._entries:
            raise ValueError(f"the ensemble in {self.directory} holds no draws (keep_params larger than the draws "
                             "of each chain?)")
        self._verified: set[int] = set()
        self._check_files()
        self._check_architecture()

    # -- the draws -------------------------------------------------------------------------------------------

    @property
    def num_chains(self) -> int:
        return len(self.index["chains"])

    @property
    def draws_per_chain(self) -> list[int]:
        return [len(entries) for entries in self.index["chains"]]

    @property
    def draw_indices(self) -> list[tuple[int, int]]:
        """(chain, posterior draw) of each member, in order: where it sits in the run's ``posterior`` group."""
        return [(self.chain_ids[c], int(e["draw"])) for c, e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"PosteriorEnsemble({str(self.directory)!r}, {len(self)} draws = {self.draws_per_chain} per chain, "
                f"likelihood={self.likelihood!r})")

    def path(self, i: int) -> Path:
        return self.directory / self._entries[self._position(i)][1]["file"]

    def _position(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"ensemble indices are integers, got {type(i).__name__}")
        n = len(self._entries)
        if not -n <= i < n:
            raise IndexError(f"draw {i} out of range: the ensemble has {n} draws")
        return int(i) % n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """The i-th draw's state dict (CPU tensors; chains in order: chain 0's draws, then chain 1's, ...)."""
        from safetensors.torch import load_file

        i = self._position(i)
        path, entry = self.path(i), self._entries[i][1]
        if self.verify and i not in self._verified:
            if sha256(path) != entry["sha256"]:
                raise CheckpointError(f"{path} does not match its checksum in {INDEX_FILE} (corrupted or replaced); "
                                      "nothing was changed. Restore the file, or sample the run again")
            self._verified.add(i)
        return load_file(path)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]

    def models(self) -> Iterator[torch.nn.Module]:
        """The model with each draw loaded in turn (eval mode; the caller's mode is restored at the end)."""
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(len(self)):
                self.model.load_state_dict(self[i])
                yield self.model
        finally:
            self.model.train(was_training)

    def _check_files(self) -> None:
        for c, entry in self._entries:
            path = self.directory / entry["file"]
            if not path.exists():
                problem = "is missing"
            elif path.stat().st_size != entry["bytes"]:
                problem = f"has {path.stat().st_size} bytes where {entry['bytes']} were written"
            else:
                continue
            raise CheckpointError(f"the draw {entry['draw']} of chain {self.chain_ids[c]} ({path}) {problem}; nothing "
                                  "was changed. Restore it, or sample the run again")

    def _check_architecture(self) -> None:
        saved = {k: tuple(v["shape"]) for k, v in self.index["state_dict"].items()}
        here = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        if saved == here:
            return
        # in the model's (and the draws') own order: layer by layer
        only_draws, only_model = [k for k in saved if k not in here], [k for k in here if k not in saved]
        shapes = [f"{k}: draws {saved[k]}, model {here[k]}" for k in here if k in saved and saved[k] != here[k]]
        parts = [f"keys only in the draws: {_few(only_draws)}" if only_draws else "",
                 f"keys only in the model: {_few(only_model)}" if only_model else "",
                 f"shapes differ: {_few(shapes, sep='; ')}" if shapes else ""]
        raise ValueError(f"the draws in {self.directory} are of another architecture than this model ("
                         f"{'. '.join(p for p in parts if p)}): pass a model built as the sampled one (the run's "
                         "model_fn(), with the same layer replacements, e.g. replace_batchnorm)")

    # -- data --------------------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        for t in (*self.model.parameters(), *self.model.buffers()):
            return t.device
        return torch.device("cpu")

    def _batches(self, data: Any) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """(x, y) batches of ``data``: a tensor x, a tuple (x, y) of tensors/arrays, or an iterable of batches
        (a DataLoader yielding x, (x, y), or (idx, x, y) over a vr_mcmc.data.IndexedDataset)."""
        if isinstance(data, (torch.Tensor, np.ndarray)):
            data = (data,)
        if isinstance(data, (tuple, list)) and data and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in data):
            if len(data) > 2:
                raise ValueError(f"data must be x or (x, y), got a tuple of {len(data)} arrays")
            tensors = [torch.as_tensor(t) for t in data]
            if len({t.shape[0] for t in tensors}) != 1:
                raise ValueError(f"x and y must have as many rows, got {[tuple(t.shape) for t in tensors]}")
            for start in range(0, tensors[0].shape[0], self.batch_size):
                part = [t[start : start + self.batch_size] for t in tensors]
                yield part[0], (part[1] if len(part) > 1 else None)
            return
        if not isinstance(data, Iterable):
            raise TypeError(f"data must be a tensor x, a tuple (x, y), or a DataLoader of (x, y) batches, got "
                            f"{type(data).__name__}")
        sampler = getattr(data, "sampler", None)
        if isinstance(sampler, torch.utils.data.RandomSampler):
            raise ValueError("the DataLoader shuffles (shuffle=True): the ensemble reads the data once per draw and "
                             "needs the same order each time; use a DataLoader with shuffle=False")
        from .data import IndexedDataset

        indexed = isinstance(getattr(data, "dataset", None), IndexedDataset)
        for batch in data:
            if isinstance(batch, torch.Tensor):
                yield batch, None
                continue
            batch = list(batch)[1:] if indexed else list(batch)
            if len(batch) not in (1, 2):
                raise ValueError("a batch must be x or (x, y) (or (idx, x, y) over an IndexedDataset), got "
                                 f"{len(batch)} items")
            yield batch[0], (torch.as_tensor(batch[1]) if len(batch) == 2 else None)

    def _outputs(self, data: Any, targets: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(output [n, ...] float64 on the CPU, targets [n, ...] or None) for each draw in turn."""
        device = self._device()
        first: torch.Tensor | None = None
        with torch.no_grad():
            for s, model in enumerate(self.models()):
                outs, ys = [], []
                for x, y in self._batches(data):
                    x = x.to(device) if isinstance(x, torch.Tensor) else x
                    outs.append(model(x).detach().to("cpu", torch.float64))
                    if y is not None:
                        ys.append(y.detach().cpu())
                if not outs:
                    raise ValueError("the data is empty")
                out = torch.cat(outs)
                y = torch.cat(ys) if ys else None
                if targets and (y is None or len(y) != len(out)):
                    raise ValueError("this needs targets: pass (x, y), or a DataLoader yielding (x, y) batches")
                if s == 0:
                    first = y
                elif y is not None and (first is None or y.shape != first.shape or not torch.equal(y, first)):
                    raise ValueError(f"the data gave other targets at draw {s} than at draw 0: it is read once per "
                                     "draw and must give the same examples in the same order (a DataLoader with "
                                     "shuffle=False, no random sampler)")
                yield out, (first if targets else None)

    # -- the likelihood ----------------------------------------------------------------------------------------

    def _gaussian(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ²) of one draw's output."""
        if self.noise_std is not None:
            return out, torch.full_like(out, float(self.noise_std) ** 2)
        if out.shape[-1] != 2:
            raise ValueError(f"likelihood='gaussian' without noise_std needs the model's last axis to hold (mean, "
                             f"log-variance), size 2; the output has shape {tuple(out.shape)}. Give noise_std=σ for a "
                             "model that returns the mean only")
        return out[..., 0], out[..., 1].exp()

    @staticmethod
    def _logits(out: torch.Tensor) -> torch.Tensor:
        if out.ndim != 2:
            raise ValueError(f"likelihood='categorical' needs logits [n, classes]; the model returned shape "
                             f"{tuple(out.shape)}. A binary classifier with one logit z: wrap it to return "
                             "torch.stack([torch.zeros_like(z), z], -1)")
        return out

    def _log_prob(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(y_i | x_i, θ) [n] for one draw."""
        if self.likelihood == "categorical":
            return self._logits(out).log_softmax(-1).gather(-1, y.long().view(-1, 1)).squeeze(-1)
        mean, var = self._gaussian(out)
        y = y.to(torch.float64).reshape(mean.shape)
        logp = -0.5 * (LOG_2PI + var.log() + (y - mean) ** 2 / var)
        return logp.reshape(len(logp), -1).sum(-1)

    # -- the predictive ----------------------------------------------------------------------------------------

    def predict(self, x: Any) -> Any:
        """The posterior predictive at ``x`` (a tensor, or a DataLoader of inputs): categorical, the mean class
        probabilities p̄ [n, K] (float64); gaussian, (mean, variance), each of the target's shape."""
        total = second = None
        count = 0
        for out, _ in self._outputs(x, targets=False):
            if self.likelihood == "categorical":
                p = self._logits(out).softmax(-1)
                total = p if total is None else total + p
            else:
                mean, var = self._gaussian(out)
                total = mean if total is None else total + mean
                second = var + mean**2 if second is None else second + var + mean**2
            count += 1
        if self.likelihood == "categorical":
            return total / count
        mean = total / count
        return mean, (second / count - mean**2).clamp_min(0.0)

    def predictive_entropy(self, x: Any, decompose: bool = False) -> Any:
        """H[p̄(· | x)] in nats [n] (categorical); with ``decompose``, (total, aleatoric, epistemic): the mean of
        the draws' entropies and the mutual information H[p̄] − mean_s H[p_s]."""
        if self.likelihood != "categorical":
            raise ValueError("predictive_entropy is for likelihood='categorical'; for a Gaussian predictive use "
                             "predict(x), whose variance splits the same way (aleatoric + epistemic)")
        total = expected = None
        count = 0
        for out, _ in self._outputs(x, targets=False):
            logp = self._logits(out).log_softmax(-1)
            p = logp.exp()
            h = -(p * logp).sum(-1)
            total = p if total is None else total + p
            expected = h if expected is None else expected + h
            count += 1
        mean = total / count
        entropy = -(mean * mean.clamp_min(1e-300).log()).sum(-1)
        if not decompose:
            return entropy
        aleatoric = expected / count
        return entropy, aleatoric, entropy - aleatoric

    def evaluate(self, data: Any, bins: int = 15) -> dict[str, float]:
        """Scores of the posterior predictive on ``data`` ((x, y) tensors or a DataLoader of (x, y) batches):
        ``log_likelihood`` (mean over inputs of log (1/S) Σ_s p(y|x, θ_s)), and for a classifier ``accuracy``,
        ``ece`` (``bins`` equal-width bins) and ``brier``; for a Gaussian ``rmse`` of the predictive mean and
        ``mean_variance``. Also ``num_draws``, ``num_obs``."""
        lse = total = second = None
        labels = None
        count = 0
        for out, y in self._outputs(data, targets=True):
            logp = self._log_prob(out, y)
            lse = logp if lse is None else torch.logaddexp(lse, logp)
            if self.likelihood == "categorical":
                p = out.softmax(-1)
                total = p if total is None else total + p
            else:
                mean, var = self._gaussian(out)
                total = mean if total is None else total + mean
                second = var + mean**2 if second is None else second + var + mean**2
            labels, count = y, count + 1
        scores = {"log_likelihood": float((lse - math.log(count)).mean()), "num_draws": count, "num_obs": len(lse)}
        if self.likelihood == "categorical":
            probs = total / count
            scores.update(accuracy=float((probs.argmax(-1) == labels).double().mean()),
                          ece=expected_calibration_error(probs, labels, bins), brier=brier_score(probs, labels))
        else:
            mean = total / count
            var = (second / count - mean**2).clamp_min(0.0)
            target = labels.to(torch.float64).reshape(mean.shape)
            scores.update(rmse=float(((mean - target) ** 2).mean().sqrt()), mean_variance=float(var.mean()))
        return scores

    def to_arviz(self, data: Any, var_name: str = "y", seed: int = 0) -> Any:
        """ArviZ groups for ``data`` ((x, y) or a DataLoader of (x, y)): ``log_likelihood`` (log p(y_i | x_i, θ)
        per draw, dims (chain, draw, obs): what ``az.loo`` reads), ``posterior_predictive`` (y_rep ~ p(y | x_i, θ)
        per draw, drawn with a generator seeded by ``seed``), ``observed_data`` (y), and ``posterior`` with two
        scalars per draw, ``param_norm`` (‖θ‖₂ over the model's parameters) and ``log_likelihood_total``
        (Σ_i log p(y_i | x_i, θ)): ArviZ 0.x's ``loo`` needs a posterior group and takes its relative efficiency
        from their effective sample sizes. Chains of unequal
        lengths (a Recorder's) are cut to the shortest, with a warning. `az.InferenceData` on ArviZ 0.x,
        `xarray.DataTree` on ArviZ 1.x."""
        import xarray as xr

        from .recorder import to_arviz

        gen = torch.Generator().manual_seed(seed)
        loglik, replicated, norms, labels = [], [], [], None
        for out, y in self._outputs(data, targets=True):
            loglik.append(self._log_prob(out, y).numpy())
            norms.append(np.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in self.model.parameters())))
            if self.likelihood == "categorical":
                replicated.append(torch.multinomial(out.softmax(-1), 1, generator=gen).squeeze(-1).numpy())
            else:
                mean, var = self._gaussian(out)
                noise = torch.randn(mean.shape, generator=gen, dtype=torch.float64)
                replicated.append((mean + var.sqrt() * noise).numpy())
            labels = y
        lengths = self.draws_per_chain
        m = min(lengths)
        if len(set(lengths)) > 1:
            warnings.warn(f"the chains hold different numbers of draws {lengths}: keeping the first {m} of each",
                          stacklevel=2)
        starts = np.cumsum([0, *lengths[:-1]])

        def by_chain(values: list[np.ndarray]) -> np.ndarray:
            return np.stack([np.stack(values[s : s + m]) for s in starts])

        observed = labels.numpy() if self.likelihood == "categorical" else labels.to(torch.float64).reshape(
            replicated[0].shape).numpy()
        extra = tuple(f"{var_name}_dim_{k}" for k in range(observed.ndim - 1))
        coords = {"chain": np.asarray(self.chain_ids), "draw": np.arange(m)}
        groups = {
            # scalars per draw: ArviZ 0.x's loo needs a posterior group, and estimates its relative efficiency
            # (reff) from their effective sample sizes
            "posterior": xr.Dataset({"param_norm": (("chain", "draw"), by_chain(norms)),
                                     "log_likelihood_total": (("chain", "draw"), by_chain([v.sum() for v in loglik]))},
                                    coords=coords),
            "posterior_predictive": xr.Dataset({var_name: (("chain", "draw", "obs", *extra), by_chain(replicated))},
                                               coords=coords),
            "log_likelihood": xr.Dataset({var_name: (("chain", "draw", "obs"), by_chain(loglik))}, coords=coords),
            "observed_data": xr.Dataset({var_name: (("obs", *extra), observed)}),
        }
        return to_arviz(groups, ensemble=str(self.directory), likelihood=self.likelihood)


def _few(items: list[str], limit: int = 6, sep: str = ", ") -> str:
    shown = sep.join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

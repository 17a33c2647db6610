"""Pieces every sampler shares: option checks, Gaussian noise, and the plain-value state dict."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from .priors import prior_from_dict

__all__ = ["check_full_precision", "check_number", "check_probability", "gaussian_noise", "restore_generator",
           "state_from_plain", "state_to_plain"]


def check_number(name: str, value: Any, low: float, *, strict: bool, high: float | None = None) -> float:
    """``value`` as a float, checked to be finite and > ``low`` (``strict``) or >= ``low``, and < ``high``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (value <= low) if strict else (value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high}, got {value!r}")
    return float(value)


def check_probability(name: str, value: Any) -> float:
    """``value`` as a float strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def check_full_precision(params: list[torch.Tensor], sampler: str) -> None:
    """Refuses bfloat16/float16 parameters: a Metropolis step's tiny moves round to no move at all
    (about 1% of such parameters ever change) while the acceptance still reads 1."""
    low = sorted({str(p.dtype) for p in params if p.dtype in (torch.float16, torch.bfloat16)})
    if low:
        raise TypeError(f"{sampler} needs float32 or float64 parameters, got {', '.join(low)}: in low precision "
                        "its steps round to no move while the acceptance reads 1. Sample a float32 copy "
                        "(model.float()) and cast the draws, or use an SG sampler")


def gaussian_noise(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """ξ ~ N(0, I) shaped like ``p``; drawn on the generator's device (so a CPU generator drives CUDA chains)."""
    if generator is None:
        return torch.randn_like(p)
    return torch.randn(p.shape, generator=generator, device=generator.device, dtype=p.dtype).to(p.device)


def state_to_plain(state: dict[str, Any], generator: torch.Generator | None) -> dict[str, Any]:
    """An optimizer state dict with priors as plain dicts and the generator's state, so that it loads
    with ``torch.load(weights_only=True)``."""
    for g in state["param_groups"]:
        if g.get("prior") is not None:
            g["prior"] = g["prior"].to_dict()
    state["generator"] = None if generator is None else generator.get_state()
    return state


def state_from_plain(state_dict: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
    """The inverse of `state_to_plain`: (a copy with priors rebuilt and no generator entry, the generator state)."""
    state_dict = dict(state_dict)
    generator = state_dict.pop("generator", None)
    state_dict["param_groups"] = [
        {**g, "prior": prior_from_dict(g["prior"]) if isinstance(g.get("prior"), dict) else g.get("prior")}
        for g in state_dict["param_groups"]
    ]
    return state_dict, generator


def restore_generator(generator: torch.Generator | None, saved: torch.Tensor | None) -> None:
    if saved is None:
        return
    if generator is None:
        warnings.warn("the saved sampler had a generator= but this one has none: its noise will differ", stacklevel=3)
    else:
        generator.set_state(saved)

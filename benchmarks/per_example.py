"""Per-example gradients: our engine against a plain backward, torch.func and Opacus, in one run.

For each model and batch size, times (median of repeats, methods interleaved so that drift in the
machine's speed hits them alike):

- plain:      forward + backward of the mean cross-entropy (the unit every ratio is given in);
- ours norms: the same with the engine attached, + collect() + per-example squared norms of all
              parameters;
- ours dense: the same + dense() of every parameter (B full gradients materialized);
- torch.func: vmap(grad) of the per-example loss over the batch (dense), + the squared norms;
- opacus:     GradSampleModule forward + backward (dense grad_sample), + the squared norms, when
              opacus is installed (pip install -e ".[bench]").

Single layers (issue 13.5), loss ½‖layer(x) − t‖² per example: LayerNorm(512) on [128, 32, 512],
MultiheadAttention E=128 H=4 on [32, 32, 128] (self-attention), Conv2d 64→64 3×3 on [64, 64, 32, 32];
same columns.

Usage: python benchmarks/per_example.py [--device cuda] [--batch-sizes 128 512] [--repeats 7]
       [--models mlp cnn layernorm attention conv]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from vr_mcmc.models import cnn, mlp
from vr_mcmc.per_example import PerExampleGradients, sq_norms

try:
    from opacus import GradSampleModule
except ImportError:  # optional benchmark dependency
    GradSampleModule = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention (batch_first) applied to one sequence as query, key and value."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the per-example loss ½‖out_i − t_i‖²."""
    return 0.5 * (out - target).square().sum() / out.shape[0]


def make_methods(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable = F.cross_entropy
) -> dict[str, Callable[[], object]]:
    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    ours_model = copy.deepcopy(model)
    engine = PerExampleGradients(ours_model, loss_reduction="mean")

    def ours_norms():
        ours_model.zero_grad(set_to_none=True)
        loss_fn(ours_model(x), y).backward()
        return sq_norms(engine.collect())

    def ours_dense():
        ours_model.zero_grad(set_to_none=True)
        loss_fn(ours_model(x), y).backward()
        grads = engine.collect()
        return sq_norms(grads), [g.dense() for g in grads.values()]

    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_example_grad = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def torch_func():
        g = per_example_grad(params, x, y)
        return sum(t.flatten(1).square().sum(1) for t in g.values())

    methods = {"plain": plain, "ours norms": ours_norms, "ours dense": ours_dense, "torch.func": torch_func}
    if GradSampleModule is not None:
        opacus_model = GradSampleModule(copy.deepcopy(model))

        def opacus():
            opacus_model.zero_grad(set_to_none=True)
            loss_fn(opacus_model(x), y).backward()
            return sum(p.grad_sample.flatten(1).square().sum(1) for p in opacus_model.parameters())

        methods["opacus"] = opacus
    return methods


def check_agreement(methods: dict[str, Callable[[], object]]) -> float:
    """Largest relative difference of per-example squared norms between methods (a sanity check)."""
    ref = methods["torch.func"]()
    worst = 0.0
    for name in ("ours norms", "opacus"):
        if name in methods:
            got = methods[name]()
            worst = max(worst, float(((got - ref).abs() / ref.abs().clamp_min(1e-12)).max()))
    return worst


def time_methods(methods: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():  # warm-up: allocator, kernel choice, vmap tracing
        fn()
        fn()
    _sync(device)
    for _ in range(repeats):
        for name, fn in methods.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


# Single layers of issue 13.5: (label, builder, input shape with the batch first).
LAYERS = {
    "layernorm": ("LayerNorm 512 on [128,32,512]", lambda: nn.LayerNorm(512), (128, 32, 512)),
    "attention": ("MHA E=128 H=4 T=32", lambda: SelfAttention(128, 4), (32, 32, 128)),
    "conv": ("Conv2d 64->64 3x3 32x32", lambda: nn.Conv2d(64, 64, 3, padding=1), (64, 64, 32, 32)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--models", nargs="+", default=["mlp", "cnn", *LAYERS], choices=["mlp", "cnn", *LAYERS],
        help="the single layers run at their own batch size (--batch-sizes applies to mlp and cnn)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", category=UserWarning)  # opacus / functorch chatter
    torch.manual_seed(0)

    builders = {
        "mlp": ("MLP 784-512-512-10", lambda: mlp((784, 512, 512, 10)), (784,)),
        "cnn": ("CNN 3x32x32, 4 conv + Linear", lambda: cnn((3, 32, 32), (32, 32, 64, 64), 10), (3, 32, 32)),
    }
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"torch {torch.__version__}, device {device} ({gpu}), {torch.get_num_threads()} threads, float32, "
        f"median of {args.repeats}; opacus {'yes' if GradSampleModule is not None else 'not installed'}"
    )
    header = f"{'model':<30}{'B':>5}{'plain ms':>10}"
    names = ["ours norms", "ours dense", "torch.func"] + (["opacus"] if GradSampleModule is not None else [])
    header += "".join(f"{n:>12}" for n in names) + f"{'func/ours norms':>17}{'func/ours dense':>17}{'max rel diff':>14}"
    print(header)
    print(f"{'':<45}" + "".join(f"{'(x plain)':>12}" for _ in names))
    for key in args.models:
        if key in LAYERS:
            label, build, shape = LAYERS[key]
            model = build().to(device)
            x = torch.randn(*shape, device=device)
            with torch.no_grad():
                y = torch.randn_like(model(x))
            runs = [(label, shape[0], model, x, y, squared_error)]
        else:
            label, build, shape = builders[key]
            runs = [
                (label, b, build().to(device), torch.randn(b, *shape, device=device),
                 torch.randint(0, 10, (b,), device=device), F.cross_entropy)
                for b in args.batch_sizes
            ]
        for label, b, model, x, y, loss_fn in runs:
            methods = make_methods(model, x, y, loss_fn)
            diff = check_agreement(methods)
            t = time_methods(methods, args.repeats, device)
            row = f"{label:<30}{b:>5}{t['plain'] * 1e3:>10.2f}"
            row += "".join(f"{t[n] / t['plain']:>12.2f}" for n in names)
            row += f"{t['torch.func'] / t['ours norms']:>17.2f}{t['torch.func'] / t['ours dense']:>17.2f}{diff:>14.1e}"
            print(row, flush=True)
            del methods


if __name__ == "__main__":
    main()

"""The `vr-mcmc` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import __version__
from .models import TransformerClassifier, cnn, mlp
from .per_example import PerExampleGradients, sq_norms
from .per_example.reference import loop_per_example_grads


def _demo(args: argparse.Namespace) -> int:
    """Per-example gradients of three networks, checked against a loop of single-example backward passes."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    b = args.batch_size
    cases = {
        "MLP 784-512-512-10": (mlp((784, 512, 512, 10)), torch.randn(b, 784)),
        "CNN 3x32x32, 4 conv": (cnn(), torch.randn(b, 3, 32, 32)),
        "Transformer block": (TransformerClassifier(), torch.randint(0, 50, (b, 12))),
    }
    print(f"vr-mcmc {__version__}: per-example gradients, batch {b}, float64, device {device}")
    print("(the sampling demo, SGLD / SAGA-LD / SVRG-LD on a real data set, lands with the chain manager)\n")
    print(f"{'model':<22}{'params':>10}{'max rel. error':>16}{'engine s':>10}{'loop s':>9}")
    worst = 0.0
    for name, (model, x) in cases.items():
        model = model.to(device, torch.float64)
        x = x.to(device, torch.float64) if x.is_floating_point() else x.to(device)
        y = torch.randint(0, 4, (b,), device=device)
        engine = PerExampleGradients(model, loss_reduction="mean")
        for _ in range(2):  # the first pass pays one-time costs (kernel selection, allocation)
            t0 = time.perf_counter()
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads = engine.collect()
            norms = sq_norms(grads)
            dense = {n: g.dense() for n, g in grads.items()}
            t_engine = time.perf_counter() - t0
        engine.remove()
        for _ in range(2):
            t0 = time.perf_counter()
            ref = loop_per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y)
            t_loop = time.perf_counter() - t0
        err = max(float((dense[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-300)) for n in ref)
        ref_norms = sum(r.flatten(1).square().sum(1) for r in ref.values())
        err = max(err, float(((norms - ref_norms).abs() / ref_norms).max()))
        worst = max(worst, err)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name:<22}{n_params:>10,}{err:>16.1e}{t_engine:>10.3f}{t_loop:>9.3f}")
    ok = worst <= 1e-10
    print(f"\n{'OK' if ok else 'FAILED'}: largest relative error {worst:.1e} (bar 1e-10 in float64)")
    return 0 if ok else 1


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input takes sizes joined by x, e.g. 3x32x32; got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--input sizes must be positive, got {text!r}")
    return shape


def _memory(args: argparse.Namespace) -> int:
    """The gradient-table memory of each strategy for an architecture and data size (DESIGN.md §4)."""
    from .models import ARCHITECTURES
    from .storage import plan

    build, default_shape = ARCHITECTURES[args.arch]
    shape = args.input or default_shape
    model = build(shape, args.num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    table = plan(model, torch.zeros(1, *shape), args.num_data, rank=args.rank, block_size=args.block_size)
    print(f"{args.arch}, input {'x'.join(map(str, shape))}, {n_params:,} parameters")
    print(table.format(per_layer=args.per_layer))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vr-mcmc",
        description="Variance-reduced SG-MCMC for PyTorch networks: per-example gradients, samplers, diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"vr-mcmc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the demonstration job", description=_demo.__doc__)
    demo.add_argument("--batch-size", type=int, default=32, help="examples per batch (default 32)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    memory = sub.add_parser(
        "memory", help="gradient-table memory of each storage strategy", description=_memory.__doc__
    )
    memory.add_argument("--arch", required=True, choices=["lenet5", "vgg16", "resnet34", "mlp"])
    memory.add_argument("--num-data", type=int, required=True, help="number of examples N")
    memory.add_argument("--input", type=_shape, default=None, help="input shape, e.g. 3x32x32 (default per arch)")
    memory.add_argument("--num-classes", type=int, default=10)
    memory.add_argument("--rank", type=int, default=1, help="rank r of the low-rank columns (default 1)")
    memory.add_argument("--block-size", type=int, default=128, help="partition block size k (default 128)")
    memory.add_argument("--per-layer", action="store_true", help="one row per layer, not only the total")
    memory.set_defaults(func=_memory)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be at least 1")
    for flag in ("num_data", "rank", "block_size", "num_classes"):
        if getattr(args, flag, 1) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

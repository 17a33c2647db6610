"""How sensitive is the engine's consistency check, and how close do legitimate runs come to it?

For a 784-512 Linear (batch 128) whose weight is also used by F.linear in the parent forward with a
factor s, a share s/(1+s) of its gradient bypasses the engine's hooks: count, over seeds, how often
collect() refuses it (float32, and bfloat16 autocast). Then report the largest check ratio (gap over
tolerance; > 1 fails) seen on legitimate float32 and bfloat16 runs of an MLP, a CNN and a transformer.

Usage: python benchmarks/check_detection.py [--seeds 10]
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

from vr_mcmc.models import PartlyOutside, TransformerClassifier, cnn, mlp
from vr_mcmc.per_example import PerExampleError, PerExampleGradients


def run(model, x, y, bf16: bool) -> PerExampleGradients:
    engine = PerExampleGradients(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)

    print("detection: share of fc.weight's gradient missing -> refused in how many seeds")
    for bf16, factors in [(False, [0.01, 0.003, 0.001]), (True, [0.5, 0.2, 0.1])]:
        for factor in factors:
            refused = 0
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                engine = run(PartlyOutside(factor), torch.randn(128, 784), torch.randint(0, 10, (128,)), bf16)
                try:
                    engine.collect()
                except PerExampleError:
                    refused += 1
                engine.remove()
            label = "bfloat16" if bf16 else "float32 "
            print(f"  {label} missing {factor / (1 + factor):7.2%}: refused {refused}/{args.seeds}")

    print("legitimate runs: largest check ratio over seeds and parameters (refused above 1)")
    cases = {
        "MLP 784-512-512-10": (lambda: mlp((784, 512, 512, 10)), lambda: torch.randn(64, 784), 10),
        "CNN 3x32x32": (cnn, lambda: torch.randn(64, 3, 32, 32), 10),
        "Transformer block": (
            lambda: TransformerClassifier(vocab=50, dim=32, heads=4, num_classes=4),
            lambda: torch.randint(0, 50, (64, 16)),
            4,
        ),
    }
    for name, (build, make_input, classes) in cases.items():
        for bf16 in (False, True):
            worst = 0.0
            for seed in range(max(1, args.seeds // 2)):
                torch.manual_seed(seed)
                engine = run(build(), make_input(), torch.randint(0, classes, (64,)), bf16)
                engine.collect()
                worst = max(worst, max(engine.check_ratios.values()))
                engine.remove()
            print(f"  {name:<20} {'bfloat16' if bf16 else 'float32 '}: {worst:.3g}")


if __name__ == "__main__":
    main()

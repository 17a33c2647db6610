"""BatchNorm with the per-example engine: `replace_batchnorm` (GroupNorm) and `freeze_batchnorm` (fixed running
statistics) give exact per-example gradients on a ResNet-style block, against a float64 loop of single-example
backward passes (tests/checks.py) and against torch.func (vmap of grad over a functional call)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from checks import check_engine, cross_entropy
from torch import nn
from torch.func import functional_call, grad, vmap

from vr_mcmc.per_example import (
    FrozenBatchNorm2d,
    MixedExamplesError,
    PerExampleGradients,
    freeze_batchnorm,
    replace_batchnorm,
)

F64 = torch.float64


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-BN-relu-conv-BN plus the identity, then relu."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


def resnet(c: int = 6, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), BasicBlock(c),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)).double()
    for m in model.modules():  # affine parameters away from (1, 0), so that a dropped one would show
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    return model


def _batch(b: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, 5, 5, generator=gen, dtype=F64), torch.randint(0, 3, (b,), generator=gen)


def func_per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """torch.func's per-example gradients of the cross-entropy: vmap of grad over one example at a time."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def engine_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    with PerExampleGradients(model, loss_reduction="mean") as engine:
        F.cross_entropy(model(x), y).backward()
        return {n: g.dense() for n, g in engine.collect().items()}


def assert_matches_torch_func(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    ours, ref = engine_grads(model, x, y), func_per_example(model, x, y)
    assert set(ours) == set(ref)
    for name, g in ours.items():
        err = float((g - ref[name]).norm() / ref[name].norm())
        assert err < 1e-10, f"{name}: relative error {err:.1e} against torch.func"


def test_training_batchnorm_is_refused_with_both_fixes_named():
    model = resnet()
    PerExampleGradients(model)
    x, _ = _batch()
    with pytest.raises(MixedExamplesError, match=r"'1' \(BatchNorm2d\).*replace_batchnorm\(model\).*freeze_batchnorm"):
        model(x)


def test_replace_batchnorm_gives_exact_per_example_gradients():
    model = resnet()
    weight = model[3].bn2.weight
    assert replace_batchnorm(model) is model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    gn = model[3].bn2
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 3 and gn.num_channels == 6
    assert gn.weight is weight  # the same Parameter: values and requires_grad kept
    x, y = _batch()
    model.train()
    check_engine(model, x, y, reduction="mean", loss=cross_entropy)
    assert_matches_torch_func(model, x, y)


def test_replaced_layer_computes_group_norm_with_the_batchnorms_parameters():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(12, eps=1e-3).double()
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    w, b = bn.weight.detach().clone(), bn.bias.detach().clone()
    gn = replace_batchnorm(bn, num_groups=4)  # a BatchNorm as the model: returned replaced
    x = torch.randn(3, 12, 4, 4, dtype=F64)
    # by hand: each example's 4 groups of 3 channels normalized with their own mean and (biased) variance
    g = x.reshape(3, 4, -1)
    xhat = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + 1e-3).sqrt()).reshape(x.shape)
    torch.testing.assert_close(gn(x), xhat * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1), rtol=1e-12, atol=1e-12)


def test_default_groups_and_bad_num_groups():
    model = nn.Sequential(nn.Linear(3, 10), nn.BatchNorm1d(10), nn.Conv2d(1, 48, 1), nn.BatchNorm2d(48),
                          nn.BatchNorm3d(7, affine=False))
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"num_groups=4 does not divide the 10 channels of layer '1' .*\[1, 2, 5, 10"):
        replace_batchnorm(model, num_groups=4)
    assert [type(m) for m in model] == [type(m) for m in before]  # refused before anything changed
    with pytest.raises(ValueError, match="positive integer"):
        replace_batchnorm(model, num_groups=0)
    replace_batchnorm(model)
    # BatchNorm1d: 1 group; else the largest divisor <= 32 with 2+ channels a group
    assert [m.num_groups for m in model if isinstance(m, nn.GroupNorm)] == [1, 24, 1]
    assert not model[4].affine and model[4].weight is None
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="does not know its channels yet: run one forward pass first"):
        replace_batchnorm(lazy)


def test_frozen_batchnorm_gives_exact_per_example_gradients():
    model = resnet()
    warm = [torch.randn(16, 2, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    keys = set(model.state_dict())
    freeze_batchnorm(model, inputs=warm)
    assert set(model.state_dict()) == keys  # the same layers: checkpoints load either way
    # the warm-up's statistics: the cumulative average of the batches' channel means (equal batch sizes)
    with torch.no_grad():
        first = torch.stack([model[0](x).mean((0, 2, 3)) for x in warm]).mean(0)
    torch.testing.assert_close(model[1].running_mean, first, rtol=1e-12, atol=1e-12)
    model.train()  # a training loop's model.train() leaves the frozen layers on their statistics
    assert model.training and isinstance(model[1], FrozenBatchNorm2d) and not model[1].training
    assert model[1].weight.requires_grad  # the affine parameters are still sampled
    stats = [b.clone() for b in model.buffers()]
    x, y = _batch()
    check_engine(model, x, y, reduction="mean", loss=cross_entropy)
    assert_matches_torch_func(model, x, y)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))  # never updated by a step


def test_freeze_keeps_the_statistics_it_holds_and_refuses_layers_without_them():
    model = resnet()
    with torch.no_grad():
        model(torch.randn(9, 2, 5, 5, dtype=F64))  # statistics of an earlier training
    held = model[1].running_var.clone()
    freeze_batchnorm(model)
    assert torch.equal(model[1].running_var, held)
    bad = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"layer '1' .*track_running_stats=False.*replace_batchnorm"):
        freeze_batchnorm(bad)


# -- through vr_mcmc.sample ------------------------------------------------------------------------------------

IMAGES = torch.randn(40, 2, 5, 5, generator=torch.Generator().manual_seed(2))
LABELS = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(3))


def _small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))


def _frozen_cnn() -> nn.Module:
    return freeze_batchnorm(_small_cnn(), inputs=IMAGES.split(20))


def _sagald(model: nn.Module):
    import torch_sample

    return torch_sample.SAGALD(model.parameters(), lr=1e-3, num_data=40, engine=PerExampleGradients(model),
                               prior=torch_sample.priors.Normal(1.0))


def _ce(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def test_sampling_a_cnn_with_batchnorm_refused_replaced_or_frozen():
    """SAGA-LD through vr_mcmc.sample: a training-mode BatchNorm fails the first step, naming both fixes; the
    replaced model samples; the frozen one samples with its statistics unchanged in every draw (they are the
    warm-up's, recomputed here by hand) while its BatchNorm weight moves."""
    import vr_mcmc

    options = dict(batch_size=10, num_chains=2, num_warmup=0, num_samples=8, progress=False, seed=1)
    with pytest.raises(MixedExamplesError, match=r"replace_batchnorm.*freeze_batchnorm"):
        vr_mcmc.sample(_small_cnn, _sagald, _ce, (IMAGES, LABELS), **options)
    replaced = vr_mcmc.sample(lambda: replace_batchnorm(_small_cnn()), _sagald, _ce, (IMAGES, LABELS), **options)
    assert np.isfinite(replaced.posterior["1.weight"].values).all()
    record = {"mean": lambda m: m[1].running_mean.clone(), "w": lambda m: m[1].weight.detach().clone()}
    frozen = vr_mcmc.sample(_frozen_cnn, _sagald, _ce, (IMAGES, LABELS), record=record, **options)
    means = frozen.posterior["mean"].values  # [chain, draw, 4]
    for c in range(2):
        torch.manual_seed(vr_mcmc.chains.chain_seeds(1, c)[0])  # the chain's model, as the driver builds it
        conv = _small_cnn()[0]
        with torch.no_grad():
            expected = torch.stack([conv(x).mean((0, 2, 3)) for x in IMAGES.split(20)]).mean(0)
        np.testing.assert_allclose(means[c], np.broadcast_to(expected.numpy(), means[c].shape), rtol=1e-5, atol=1e-6)
    assert (np.diff(frozen.posterior["w"].values, axis=1) != 0).any()

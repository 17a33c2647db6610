"""The check that Σ_i g_i equals each parameter's gradient: it must fire on real gaps (float32 included)
and stay quiet on legitimate training, including gradients that are zero up to rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from checks import check_engine, tanh_loss
from torch import nn

from vr_mcmc.models import PartlyOutside
from vr_mcmc.per_example import PerExampleError, PerExampleGradients, representations
from vr_mcmc.per_example.reference import loop_per_example_grads

F64 = torch.float64


class Attention(nn.Module):
    """Separate q/k/v projections with biases (BERT-style): k.bias has zero gradient in theory, since
    softmax ignores a score offset shared by all keys. Its per-example sums and .grad are pure rounding."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(1, 2) / 4
        return self.out((scores.softmax(-1) @ self.v(x)).mean(1))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_zero_gradient_bias_in_attention_is_not_a_false_alarm(seed, dtype):
    torch.manual_seed(seed)
    model = Attention().to(dtype)
    x, y = torch.randn(32, 24, 16, dtype=dtype), torch.randint(0, 3, (32,))
    with PerExampleGradients(model) as engine:
        F.cross_entropy(model(x), y).backward()
        grads = engine.collect()  # must not raise
    if dtype == F64:
        ref = loop_per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y)
        for n, r in ref.items():
            # k.bias is zero up to rounding: judge it on the scale of q.bias's gradients.
            scale = ref["q.bias"].norm() if n == "k.bias" else r.norm()
            assert (grads[n].dense() - r).norm() <= 1e-10 * scale, n


@pytest.mark.parametrize("norm", [lambda c: nn.InstanceNorm2d(c, affine=True), lambda c: nn.GroupNorm(c, c)])
def test_conv_bias_cancelled_by_a_norm_is_not_a_false_alarm(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), norm(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    with PerExampleGradients(model) as engine:
        F.cross_entropy(model(torch.randn(64, 3, 8, 8)), torch.randint(0, 4, (64,))).backward()
        grads = engine.collect()
    assert grads["0.bias"].sum().abs().max() < 1e-3 * grads["0.weight"].sum().abs().max()  # cancelled indeed


@pytest.mark.parametrize("scale", [1e-24, 1e20])
def test_tiny_and_huge_losses_are_not_false_alarms(scale):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4))
    with PerExampleGradients(model) as engine:
        (F.cross_entropy(model(torch.randn(64, 20)), torch.randint(0, 4, (64,))) * scale).backward()
        engine.collect()


def test_non_finite_gradients_are_returned_not_blamed_on_hooks():
    """An overflowing mixed-precision step makes gradients inf/NaN; the caller sees that in them."""
    model = nn.Sequential(nn.Linear(5, 3))
    with PerExampleGradients(model) as engine:
        (model(torch.randn(4, 5)).sum() * float("inf")).backward()
        grads = engine.collect()
    assert not torch.isfinite(grads["0.weight"].dense()).all()


@pytest.mark.parametrize("seed", range(3))
def test_float32_detects_five_percent_missing_in_a_large_layer(seed):
    torch.manual_seed(seed)
    model = PartlyOutside(0.05)
    with PerExampleGradients(model) as engine:
        F.cross_entropy(model(torch.randn(128, 784)), torch.randint(0, 10, (128,))).backward()
        with pytest.raises(PerExampleError, match=r"'fc\.weight' do not add up"):
            engine.collect()


def test_bfloat16_autocast_detects_a_large_missing_part_and_passes_a_clean_model():
    torch.manual_seed(0)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    for share, should_fire in [(0.5, True), (0.0, False)]:
        model = PartlyOutside(share)
        with PerExampleGradients(model) as engine:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            if should_fire:
                with pytest.raises(PerExampleError, match="do not add up"):
                    engine.collect()
            else:
                engine.collect()


def test_prior_folded_into_the_loss_is_named_as_a_cause():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 4))
    with PerExampleGradients(model) as engine:
        loss = F.cross_entropy(model(torch.randn(64, 20)), torch.randint(0, 4, (64,)))
        (loss + 0.5 * sum(p.square().sum() for p in model.parameters())).backward()
        with pytest.raises(PerExampleError, match=r"prior or weight decay added to the loss.*prior="):
            engine.collect()


def test_two_backward_passes_through_a_retained_graph_add_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, t = torch.randn(6, 5, dtype=F64), torch.randn(6, 3, dtype=F64)
    with PerExampleGradients(model, "sum") as engine:
        loss = tanh_loss(model(x), t).sum()
        loss.backward(retain_graph=True)
        loss.backward()
        grads = engine.collect()
    single = check_engine(model, x, t, reduction="sum")
    for n, rep in grads.items():
        torch.testing.assert_close(rep.dense(), 2 * single[n].dense(), rtol=1e-12, atol=1e-14)


def test_squared_norms_over_several_chunks(monkeypatch):
    monkeypatch.setattr(representations, "_CHUNK_ELEMENTS", 50)  # force many dense chunks
    g = torch.Generator().manual_seed(0)
    a, dz = torch.randn(9, 6, 3, generator=g, dtype=F64), torch.randn(9, 6, 2, generator=g, dtype=F64)
    rep = representations.Factored(a, dz)
    torch.testing.assert_close(rep.sq_norms(), rep.dense().flatten(1).square().sum(1), rtol=1e-12, atol=0)


def test_instance_norm_with_running_statistics_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
                          nn.Flatten(), nn.Linear(24, 3)).double()
    with torch.no_grad():
        model(torch.randn(16, 2, 8, dtype=F64) * 3 + 1)  # running statistics away from (0, 1)
    model.eval()
    check_engine(model, torch.randn(5, 2, 8, dtype=F64), torch.randn(5, 3, dtype=F64), reduction="mean")


def test_autocast_fallback_module_matches_the_float64_loop_to_bfloat16_precision():
    """A rule-less module (MultiheadAttention) replayed under the autocast it ran in."""
    from vr_mcmc.models import TransformerClassifier

    torch.manual_seed(0)
    model = TransformerClassifier(vocab=30, dim=16, heads=2, num_classes=4)
    tokens, y = torch.randint(0, 30, (8, 6)), torch.randint(0, 4, (8,))
    with PerExampleGradients(model) as engine:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(tokens).float(), y)
        loss.backward()
        grads = engine.collect()
    ref = loop_per_example_grads(model.double(), lambda o, t: F.cross_entropy(o, t, reduction="sum"), tokens, y)
    for n, r in ref.items():
        err = float((grads[n].dense().double() - r).norm() / r.norm().clamp_min(1e-12))
        assert err < 5e-2, f"{n}: relative error {err:.2e} beyond bfloat16 precision"


def test_check_ratios_are_reported_for_every_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    with PerExampleGradients(model) as engine:
        F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
        engine.collect()
    assert set(engine.check_ratios) == {n for n, _ in model.named_parameters()}
    assert all(0 <= r < 1e-2 for r in engine.check_ratios.values())  # float32 rounding is far below

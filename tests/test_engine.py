"""Engine behaviour: fallback, tied weights, repeated calls, refusals, hooks and .grad left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from checks import check_engine, cross_entropy, tanh_loss
from torch import nn

from vr_mcmc.per_example import (
    Dense,
    MixedExamplesError,
    PerExampleError,
    PerExampleGradients,
    UnsupportedLayerError,
    register_rule,
    sq_norms,
)
from vr_mcmc.per_example.reference import loop_per_example_grads

F64 = torch.float64


def _batch(b=5, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=F64), torch.randn(b, 3, generator=g, dtype=F64)


class Scale(nn.Module):
    """A module with no rule: y = x ⊙ s ⊙ tanh(x @ u)."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.randn(d))
        self.inner = nn.Linear(d, 1)  # used inside forward: the fallback must cover it too

    def forward(self, x):
        return x * self.s * torch.tanh(self.inner(x))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fallback_module_with_children(reduction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), Scale(6), nn.PReLU(), nn.Linear(6, 3)).double()
    x, t = _batch()
    engine = PerExampleGradients(model)
    assert dict(engine.layers) == {"0": "rule", "1": "torch.func", "2": "torch.func", "3": "rule"}
    engine.remove()
    check_engine(model, x, t, reduction=reduction)


def test_multihead_attention_uses_fallback_exactly():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    model = Net().double()
    x = torch.randn(4, 5, 8, dtype=F64)
    check_engine(model, x, torch.randint(0, 3, (4,)), reduction="mean", loss=cross_entropy)


def test_tied_weights_sum_contributions():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.mix = nn.Linear(4, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight  # one Parameter, two modules (RowSparse + Factored)

        def forward(self, idx):
            return self.out(torch.tanh(self.mix(self.embed(idx))))

    torch.manual_seed(0)
    model = Tied().double()
    idx = torch.randint(0, 10, (6, 3))
    grads = check_engine(model, idx, torch.randn(6, 3, 10, dtype=F64), reduction="mean")
    assert list(grads) == ["embed.weight", "mix.weight", "mix.bias"]  # the tied weight appears once


def test_module_called_twice_sums_and_stays_factored():
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = shared
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.shared(torch.tanh(self.shared(x))))

    model = Twice().double()
    x, t = _batch()
    grads = check_engine(model, x, t, reduction="sum")
    assert type(grads["shared.weight"]).__name__ == "Factored"
    assert grads["shared.weight"].num_positions == 2


def test_in_place_activation_after_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.PReLU(), nn.Hardtanh(inplace=True),
                          nn.Linear(8, 3)).double()
    x, t = _batch()
    check_engine(model, x, t, reduction="mean")


def test_grad_is_left_alone_and_accumulates_as_usual():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, t = _batch()
    tanh_loss(model(x), t).mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    engine = PerExampleGradients(model)
    tanh_loss(model(x), t).mean().backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, plain[n])
    engine.collect()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, plain[n])


def test_unused_and_frozen_parameters():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(6, 3)
            self.unused = nn.Linear(6, 3)
            self.frozen = nn.Linear(3, 3)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.frozen(self.used(x))

    model = Partial().double()
    x, t = _batch()
    with PerExampleGradients(model) as engine:
        tanh_loss(model(x), t).mean().backward()
        grads = engine.collect()
    assert set(grads) == {"used.weight", "used.bias", "unused.weight", "unused.bias"}
    zero = grads["unused.weight"]
    assert isinstance(zero, Dense) and zero.nbytes == 8  # one broadcast element
    assert torch.equal(zero.sq_norms(), torch.zeros(5, dtype=F64))


def test_no_grad_forwards_are_ignored_and_each_forward_starts_a_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).double()
    x, t = _batch(b=5)
    engine = PerExampleGradients(model)
    tanh_loss(model(torch.randn(9, 6, dtype=F64)), torch.randn(9, 3, dtype=F64)).mean().backward()
    model.zero_grad()
    tanh_loss(model(x), t).mean().backward()
    with torch.no_grad():
        model(torch.randn(2, 6, dtype=F64))  # an evaluation pass in between
    grads = engine.collect()
    ref = loop_per_example_grads(model, lambda o, y: tanh_loss(o, y).sum(), x, t)
    assert grads["0.weight"].batch_size == 5
    torch.testing.assert_close(grads["0.weight"].dense(), ref["0.weight"], rtol=1e-12, atol=1e-14)


def test_remove_detaches_everything():
    model = nn.Sequential(nn.Linear(6, 3)).double()
    engine = PerExampleGradients(model)
    engine.remove()
    assert not model._forward_hooks and not model._forward_pre_hooks and not model[0]._forward_hooks
    x, t = _batch()
    tanh_loss(model(x), t).mean().backward()
    with pytest.raises(PerExampleError, match="no gradients were captured"):
        engine.collect()


def test_sq_norms_of_the_whole_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, t = _batch()
    with PerExampleGradients(model, "sum") as engine:
        tanh_loss(model(x), t).sum().backward()
        total = sq_norms(engine.collect())
    ref = loop_per_example_grads(model, lambda o, y: tanh_loss(o, y).sum(), x, t)
    expected = sum(g.flatten(1).square().sum(1) for g in ref.values())
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("make", [nn.BatchNorm1d, nn.SyncBatchNorm, lambda c: nn.BatchNorm1d(c, affine=False)])
def test_batchnorm_in_training_mode_is_refused(make):
    model = nn.Sequential(nn.Linear(6, 4), make(4), nn.Linear(4, 3)).double()
    _engine = PerExampleGradients(model)
    x, _ = _batch()
    with pytest.raises(MixedExamplesError, match=r"'1' .*batch statistics.*replace_batchnorm.*freeze_batchnorm"):
        model(x)
    with torch.no_grad():
        model(x)  # no gradients: nothing to refuse
    model.eval()
    model[1].train(False)
    model(x)  # running statistics: fine


def test_batchnorm_without_running_stats_is_refused_even_in_eval():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3))
    PerExampleGradients(model.eval())
    with pytest.raises(MixedExamplesError):
        model(torch.randn(5, 6))


def test_batchnorm_eval_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        model(torch.randn(8, 2, 4, 4, dtype=F64))  # collect running statistics in train mode
    model.eval()
    x = torch.randn(5, 2, 4, 4, dtype=F64)
    check_engine(model, x, torch.randint(0, 3, (5,)), reduction="mean", loss=cross_entropy)


def test_embedding_scale_grad_by_freq_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(8, 3))
    with PerExampleGradients(model) as engine:
        model(torch.randint(0, 10, (5, 2))).sum().backward()
        with pytest.raises(MixedExamplesError, match="scale_grad_by_freq"):
            engine.collect()


class CentreBatch(nn.Module):
    """Subtracts the batch mean: mixes examples."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) * self.w


class NoisyScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return F.dropout(x, 0.5, training=True) * self.w


def test_fallback_detects_a_module_that_mixes_examples():
    model = nn.Sequential(nn.Linear(6, 4), CentreBatch(), nn.Linear(4, 3)).double()
    with PerExampleGradients(model) as engine:
        model(_batch()[0]).sum().backward()
        with pytest.raises(MixedExamplesError, match=r"layer '1' .*mixes examples"):
            engine.collect()


def test_fallback_refuses_random_modules():
    model = nn.Sequential(nn.Linear(6, 4), NoisyScale(), nn.Linear(4, 3)).double()
    with PerExampleGradients(model) as engine:
        model(_batch()[0]).sum().backward()
        with pytest.raises(UnsupportedLayerError, match=r"layer '1' .*random.*register_rule"):
            engine.collect()


def test_batch_must_be_dimension_zero():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1)  # batch_first=False: [T, B, E]
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.attn(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))[0].transpose(0, 1))

    model = SeqFirst()
    with pytest.raises(PerExampleError, match=r"'attn' \(MultiheadAttention\) has batch_first=False.*batch must be"):
        PerExampleGradients(model)


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_reduction must be 'mean' or 'sum'"):
        PerExampleGradients(nn.Linear(2, 2), loss_reduction="none")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        PerExampleGradients(lambda x: x)
    layer = nn.Linear(3, 2)
    with PerExampleGradients(layer) as engine:
        layer(torch.randn(3)).sum().backward()  # unbatched input
        with pytest.raises(PerExampleError, match="without a batch dimension"):
            engine.collect()


def test_custom_rule_and_subclass_lookup():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.tensor([1.5], dtype=F64))

        def forward(self, x):
            return x * self.g

    calls = []

    @register_rule(Gain)
    def gain_rule(module, inputs, grad_output):
        calls.append(1)
        return {"g": Dense((inputs[0] * grad_output).flatten(1).sum(1, keepdim=True))}

    class MyLinear(nn.Linear):  # keeps Linear.forward: the Linear rule applies
        pass

    class OddLinear(nn.Linear):  # overrides forward: the fallback applies
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyLinear(6, 4), Gain(), OddLinear(4, 3)).double()
    engine = PerExampleGradients(model)
    assert dict(engine.layers) == {"0": "rule", "1": "rule", "2": "torch.func"}
    engine.remove()
    x, t = _batch()
    check_engine(model, x, t, reduction="mean")
    assert calls

    with pytest.raises(TypeError):
        register_rule("Linear")


def test_rule_that_forgets_a_parameter_is_reported():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.ones(3))
            self.b = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.a + self.b

    @register_rule(Two)
    def incomplete(module, inputs, grad_output):
        return {"a": Dense(inputs[0] * grad_output)}

    model = Two()
    with PerExampleGradients(model) as engine:
        model(torch.randn(4, 3)).sum().backward()
        with pytest.raises(PerExampleError, match=r"returned no gradient for \['b'\]"):
            engine.collect()


class _ARLike(nn.Module):
    """A root with a bare parameter of its own (log σ) and a Linear child: the whole model is one fallback unit."""

    def __init__(self):
        super().__init__()
        self.ar = nn.Linear(4, 1)
        self.log_sigma = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return torch.cat([self.ar(x), self.log_sigma.expand(x.shape[0], 1)], 1)


class _TimeMajorOut(nn.Module):
    """No rule, an output whose batch is dimension 1: y[t, i] = w_t · x_i."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6))

    def forward(self, x):
        return (x @ self.w.t()).t()


def _attention():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0])

    return Net()


class _GRUNet(nn.Module):
    """A GRU (no rule; its aten backward may lack batching rules) on [B, 4, 6], the last state to a head."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(6, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0])


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(6, 6), Scale(6), nn.PReLU(), nn.Linear(6, 3)),
                                  lambda: nn.Sequential(nn.Linear(6, 4), _ARLike(), nn.Linear(2, 3)),
                                  lambda: nn.Sequential(_TimeMajorOut(), nn.Flatten(0, -1), nn.Unflatten(0, (3, -1)),
                                                        _Transpose(), nn.Linear(3, 3)),
                                  _attention, _GRUNet],
                         ids=["scale", "ar", "time-major", "attention", "gru"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fallback_after_its_verified_batches_gives_the_loops_gradients(make, reduction):
    """After the engine's first 8 batches (each example replayed alone under vmap, with the check that the module
    does not mix examples) the fallback replays the whole batch once and takes one batched backward of the masked
    output gradients: batches 9-12 must still equal a float64 loop of per-example backward passes (1e-10)."""
    torch.manual_seed(0)
    model = make().double()
    engine = PerExampleGradients(model, loss_reduction=reduction)
    g = torch.Generator().manual_seed(1)
    for batch in range(12):
        sequences = make in (_attention, _GRUNet)
        x = torch.randn(5, 4, 6, generator=g, dtype=F64) if sequences else torch.randn(5, 6, generator=g, dtype=F64)
        t = torch.randn(5, *([4] if sequences else []), 3, generator=g, dtype=F64)
        model.zero_grad()
        losses = tanh_loss(model(x), t)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
        got = engine.collect()
        assert engine._verify_replays == (batch < 8)
        if batch < 8:
            continue
        expected = loop_per_example_grads(model, tanh_loss, x, t)
        for name, rep in got.items():
            err = float((rep.dense() - expected[name]).norm())
            assert err <= 1e-10 * max(float(expected[name].norm()), 1e-30), (name, err)
    engine.remove()


class _Transpose(nn.Module):
    def forward(self, x):
        return x.t()

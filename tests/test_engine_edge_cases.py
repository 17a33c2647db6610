"""Edge cases from review: each either gives exact per-example gradients or a clear error, never wrong numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from checks import check_engine, tanh_loss
from torch import nn
from torch.nn.utils import parametrizations

from vr_mcmc.per_example import MixedExamplesError, PerExampleError, PerExampleGradients

F64 = torch.float64


def _loop(model, example_loss, b):
    """Reference: grad of example_loss(i) for each i, stacked, for every trainable parameter."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = [torch.autograd.grad(example_loss(i), list(params.values()), allow_unused=True) for i in range(b)]
    return {
        n: torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in rows])
        for j, (n, p) in enumerate(params.items())
    }


def _assert_exact(grads, ref):
    assert set(grads) == set(ref)
    for n in ref:
        torch.testing.assert_close(grads[n].dense(), ref[n], rtol=1e-10, atol=1e-12, msg=n)


def test_model_called_twice_per_loss():
    """Siamese use: both calls belong to the batch."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x1, x2 = torch.randn(6, 5, dtype=F64), torch.randn(6, 5, dtype=F64)
    with PerExampleGradients(net, "sum") as engine:
        (net(x1) - net(x2)).square().sum().backward()
        grads = engine.collect()
    ref = _loop(net, lambda i: (net(x1[i : i + 1]) - net(x2[i : i + 1])).square().sum(), 6)
    _assert_exact(grads, ref)


def test_loop_that_never_calls_the_root_model():
    """Each batch starts at the first forward after a backward, also when only submodules are called."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"enc": nn.Linear(5, 4), "head": nn.Linear(4, 2)}).double()
    engine = PerExampleGradients(model, "sum")
    for b in (7, 3):  # a different batch size each step
        x, t = torch.randn(b, 5, dtype=F64), torch.randn(b, 2, dtype=F64)
        model.zero_grad()
        tanh_loss(model["head"](torch.tanh(model["enc"](x))), t).sum().backward()
        grads = engine.collect()
    def example_loss(i):
        return tanh_loss(model["head"](torch.tanh(model["enc"](x[i : i + 1]))), t[i : i + 1]).sum()

    _assert_exact(grads, _loop(model, example_loss, 3))


class GPTTie(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(7, 4)
        self.mlp = nn.Linear(4, 4)

    def forward(self, idx):
        return torch.tanh(self.mlp(self.wte(idx))) @ self.wte.weight.t()  # weight used outside Embedding


def test_parameter_used_outside_its_module_is_refused():
    model = GPTTie().double()
    idx = torch.randint(0, 7, (4, 5))
    with PerExampleGradients(model) as engine:
        model(idx).square().mean().backward()
        with pytest.raises(PerExampleError, match=r"'wte.weight' do not add up.*outside the forward"):
            engine.collect()


def test_child_of_a_fallback_layer_called_directly_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.randn(4))
            self.proj = nn.Linear(4, 4)

        def forward(self, h):
            return self.proj(h) * self.gain

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.block.proj(torch.tanh(self.block(x)))))

    model = Net().double()
    with PerExampleGradients(model) as engine:
        model(torch.randn(4, 4, dtype=F64)).square().sum().backward()
        with pytest.raises(PerExampleError, match=r"'block.proj.weight' do not add up"):
            engine.collect()


def test_extra_autograd_pass_is_refused():
    model = nn.Sequential(nn.Linear(5, 3)).double()
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    with PerExampleGradients(model) as engine:
        loss = model(x).square().sum()
        torch.autograd.grad(loss, x, retain_graph=True)  # e.g. an input-gradient saliency map
        loss.backward()
        with pytest.raises(PerExampleError, match="do not add up"):
            engine.collect()


def test_input_modified_in_place_before_collect_is_refused():
    model = nn.Sequential(nn.Linear(5, 3)).double()
    x = torch.randn(4, 5, dtype=F64)
    with PerExampleGradients(model) as engine:
        model(x).square().sum().backward()
        x.copy_(torch.randn(4, 5, dtype=F64))  # the next batch written into the same buffer
        with pytest.raises(PerExampleError, match="modified in place"):
            engine.collect()


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("use_h_n", [False, True])
def test_recurrent_layers_through_the_fallback(rnn, use_h_n):
    """h_n keeps the batch in dim 1; aten's GRU has no working vmap rule (the loop path)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn(3, 5, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            out, h = self.rnn(x)
            h = h[0] if isinstance(h, tuple) else h
            return self.head(h[-1] if use_h_n else out[:, -1])

    torch.manual_seed(0)
    model = Net().double()
    check_engine(model, torch.randn(4, 6, 3, dtype=F64), torch.randn(4, 2, dtype=F64), reduction="mean")


def test_fallback_output_without_batch_dimension_is_refused():
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w, self.w.square().sum()  # an auxiliary scalar shared by the batch

    model = WithAux().double()
    with PerExampleGradients(model) as engine:
        out, aux = model(torch.randn(4, 3, dtype=F64))
        (out.sum() + aux).backward()
        with pytest.raises(PerExampleError, match=r"output 1 of layer '' .*no dimension of the batch"):
            engine.collect()


def test_autocast_gives_gradients_in_the_parameter_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    x = torch.randn(5, 2, 4, 4)
    with PerExampleGradients(model) as engine:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), torch.randint(0, 3, (5,)))
        loss.backward()
        grads = engine.collect()
    for n, p in model.named_parameters():
        assert grads[n].dtype == torch.float32
        # bfloat16 has 8 bits of mantissa: agreement to a few parts in a hundred.
        torch.testing.assert_close(grads[n].sum() / 5, p.grad, rtol=3e-2, atol=3e-3)


def test_rule_layer_called_with_a_keyword_input():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 4)
            self.ln = nn.LayerNorm(4)

        def forward(self, x):
            return self.ln(input=self.fc(input=x))

    torch.manual_seed(0)
    check_engine(Net().double(), torch.randn(4, 5, dtype=F64), torch.randn(4, 4, dtype=F64), reduction="sum")


def test_parametrized_weight_goes_through_the_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(5, 3)), nn.Tanh(), nn.Linear(3, 2)).double()
    engine = PerExampleGradients(model)
    assert dict(engine.layers)["0"] == "torch.func"
    engine.remove()
    check_engine(model, torch.randn(4, 5, dtype=F64), torch.randn(4, 2, dtype=F64), reduction="mean")


def test_empty_batch_gives_empty_gradients():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2), nn.LayerNorm(2))
    with PerExampleGradients(model) as engine:
        model(torch.randn(0, 2, 4, 4)).sum().backward()
        grads = engine.collect()
    for n, p in model.named_parameters():
        assert grads[n].dense().shape == (0, *p.shape)
        assert grads[n].sq_norms().shape == (0,)


def test_fallback_module_that_updates_a_buffer():
    class Ema(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x):
            self.seen += 1
            return x * self.w

    model = Ema().double()
    x = torch.randn(4, 3, dtype=F64)
    with PerExampleGradients(model, "sum") as engine:
        model(x).square().sum().backward()
        grads = engine.collect()
    assert float(model.seen) == 1  # collect() replays the module without touching its state
    torch.testing.assert_close(grads["w"].dense(), 2 * x.square())


def test_shared_buffer_argument_with_the_batch_size_is_not_sliced():
    class AddPos(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.randn(3))

        def forward(self, x, pos):
            return (x + pos) * self.g

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = AddPos()
            self.register_buffer("pos", torch.randn(4, 3))  # [T, d] with T equal to the batch size

        def forward(self, x):
            return self.a(x, self.pos)

    torch.manual_seed(0)
    check_engine(Net().double(), torch.randn(4, 4, 3, dtype=F64), torch.randn(4, 4, 3, dtype=F64), reduction="sum")


def test_rule_layer_applied_to_a_model_parameter_is_refused():
    class Codebook(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("codes", torch.randn(4, 3))  # the root owns no parameter: proj is a rule unit
            self.proj = nn.Linear(3, 3)

        def forward(self, x):
            return x @ self.proj(self.codes).t()

    model = Codebook()
    PerExampleGradients(model)
    with pytest.raises(PerExampleError, match="applied to a parameter or buffer"):
        model(torch.randn(4, 3))


def test_all_parameters_frozen_gives_nothing():
    model = nn.Linear(3, 2).requires_grad_(False)
    with PerExampleGradients(model) as engine:
        model(torch.randn(4, 3))
        assert engine.collect() == {}


def test_mixing_detection_still_applies_to_recurrent_fallback():
    class BatchCentred(nn.Module):  # own parameter: one fallback unit whose forward mixes examples
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.rnn = nn.GRU(3, 3, batch_first=True)

        def forward(self, x):
            out, _ = self.rnn((x - x.mean(0)) * self.scale)
            return out

    model = BatchCentred().double()
    with PerExampleGradients(model) as engine:
        model(torch.randn(4, 2, 3, dtype=F64)).sum().backward()
        with pytest.raises(MixedExamplesError):
            engine.collect()


def test_check_can_be_turned_off():
    model = GPTTie().double()
    idx = torch.randint(0, 7, (4, 5))
    with PerExampleGradients(model, check=False) as engine:
        model(idx).square().mean().backward()
        grads = engine.collect()  # no error: the caller opted out of the check
    assert grads["wte.weight"].batch_size == 4


def test_check_does_not_fire_at_an_optimum_in_float32():
    """At a least-squares optimum Σ_i g_i = 0 up to rounding while each g_i is large: the check's
    tolerance scales with the terms, not with the (vanishing) total, so it must stay quiet."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 300, generator=gen)
    y = x @ torch.randn(300, 1, generator=gen) + torch.randn(512, 1, generator=gen)
    layer = nn.Linear(300, 1)
    design = torch.cat([x, torch.ones(512, 1)], 1).double()
    solution = torch.linalg.lstsq(design, y.double()).solution
    with torch.no_grad():
        layer.weight.copy_(solution[:300].t())
        layer.bias.copy_(solution[300])
    with PerExampleGradients(layer, "mean") as engine:
        (layer(x) - y).square().mean().backward()
        grads = engine.collect()
    total = grads["weight"].sum().norm()
    typical = grads["weight"].sq_norms().sqrt().mean()
    assert total < 1e-2 * typical * 512  # the gradients do cancel

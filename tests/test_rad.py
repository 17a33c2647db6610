"""Randomized autodiff (vr_mcmc.rad): exactness where promised, unbiasedness and variance, memory, samplers.

Statistical tests use fixed seeds; each states its tolerance. Means are checked to 5 standard
errors per entry, with the standard error measured from the draws themselves (P(|z| > 5) ≈ 6e-7
per entry for a normal mean). Variances are checked against the documented formula to 10%, with
enough draws that the measured value's own standard error is at most 2.5% (asserted), so 10% is
at least 4 standard errors.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_sample
import vr_mcmc.rad as rad
from vr_mcmc.data import IndexedDataset
from vr_mcmc.estimators import SVRG
from vr_mcmc.models import mlp, rad_cnn
from vr_mcmc.per_example import PerExampleGradients
from vr_mcmc.per_example.errors import PerExampleError
from vr_mcmc.rad.sampling import Spec, compress, expand


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors, thousands of backward passes: one thread avoids intra-op overhead on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MODES = [("same", False), ("same", True), ("different", False), ("different", True), ("projection", False)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomized_copy(layer: nn.Module, keep: float, mode: str, replacement: bool = False, seed: int = 1) -> nn.Module:
    return rad.randomize(copy.deepcopy(layer), keep, mode, replacement=replacement, generator=gen(seed))


LAYERS = [
    pytest.param(lambda: nn.Linear(7, 5), (4, 7), id="linear"),
    pytest.param(lambda: nn.Linear(7, 5), (3, 2, 7), id="linear-3d-input"),
    pytest.param(lambda: nn.Linear(7, 5), (7,), id="linear-unbatched"),
    pytest.param(lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (3, 4, 11), id="conv1d"),
    pytest.param(lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (3, 4, 9, 8), id="conv2d"),
    pytest.param(lambda: nn.Conv2d(4, 6, (2, 3), padding="same", padding_mode="reflect"), (3, 4, 9, 8),
                 id="conv2d-same-reflect"),
    pytest.param(lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), (4, 9, 8), id="conv2d-unbatched"),
    pytest.param(lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 2, 4, 5, 3), id="conv3d"),
]


@pytest.mark.parametrize(("make", "shape"), LAYERS)
@pytest.mark.parametrize(("mode", "replacement"), MODES)
def test_forward_and_input_and_bias_gradients_are_exact(make, shape, mode, replacement):
    torch.manual_seed(0)
    exact = make().double()
    randomized = randomized_copy(exact, 0.3, mode, replacement)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = exact(x), randomized(x2)
    assert torch.equal(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    # The same library kernels on the same numbers: equal to the bit on this machine.
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(exact.bias.grad, randomized.bias.grad)
    assert randomized.weight.grad.shape == exact.weight.grad.shape
    assert not torch.equal(randomized.weight.grad, exact.weight.grad)  # it is randomized


@pytest.mark.parametrize(("make", "shape"), LAYERS[:1] + LAYERS[4:6])
@pytest.mark.parametrize("mode", ["same", "different"])
def test_keep_one_without_replacement_is_exact(make, shape, mode):
    torch.manual_seed(0)
    exact = make().double()
    randomized = randomized_copy(exact, 1.0, mode)
    x = torch.randn(shape, dtype=torch.float64)
    g = torch.randn_like(exact(x))
    exact(x).backward(g)
    randomized(x).backward(g)
    torch.testing.assert_close(randomized.weight.grad, exact.weight.grad, rtol=1e-12, atol=1e-12)


def test_weight_gradient_is_regenerated_from_the_seed():
    layer = rad.RandConv2d(3, 4, 3, padding=1, keep=0.2, generator=gen(3)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    loss = layer(x).square().sum()
    first = torch.autograd.grad(loss, layer.weight, retain_graph=True)[0]
    second = torch.autograd.grad(loss, layer.weight)[0]
    assert torch.equal(first, second)


def _weight_grad_draws(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, draws: int) -> torch.Tensor:
    out = []
    for _ in range(draws):
        layer.weight.grad = None
        layer(x).backward(g)
        out.append(layer.weight.grad.clone())
    return torch.stack(out)


def _assert_mean_within_5_se(draws: torch.Tensor, expected: torch.Tensor) -> None:
    se = draws.std(0) / math.sqrt(len(draws))
    z = (draws.mean(0) - expected) / se
    assert bool((se > 0).all())
    assert float(z.abs().max()) < 5, f"max |z| = {float(z.abs().max()):.2f}"


@pytest.mark.parametrize(("mode", "replacement"), MODES)
def test_linear_weight_gradient_is_unbiased_with_the_documented_variance(mode, replacement):
    torch.manual_seed(0)
    b, d, d_out, keep, draws = 6, 20, 4, 0.1, 3000
    exact = nn.Linear(d, d_out).double()
    x = torch.randn(b, d, dtype=torch.float64)
    g = torch.randn(b, d_out, dtype=torch.float64)
    exact(x).backward(g)
    grad = exact.weight.grad
    w = _weight_grad_draws(randomized_copy(exact, keep, mode, replacement), x, g, draws)
    _assert_mean_within_5_se(w, grad)

    k = rad.num_kept(keep, d)
    c = rad.variance_factor(d, k, mode, replacement)
    # "different": independent per example, Σ_i ‖dz_i‖²·c‖x_i‖²; otherwise Ĝ = G·S (or G·PPᵀ), one S per batch: c‖G‖²
    predicted = c * ((g.square().sum(1) * x.square().sum(1)).sum() if mode == "different" else grad.square().sum())
    sq_err = (w - grad).square().flatten(1).sum(1)
    rel_se = float(sq_err.std() / sq_err.mean()) / math.sqrt(draws)
    assert rel_se < 0.025
    assert abs(float(sq_err.mean() / predicted) - 1) < 0.10


@pytest.mark.parametrize(("mode", "replacement"), MODES)
def test_activation_estimate_variance_per_row(mode, replacement):
    """E‖â − a‖² = c·‖a‖² for each row of a [R, C, D] activation (C channels kept together, as in Conv)."""
    torch.manual_seed(0)
    rows, channels, d, keep, draws = 3, 4, 30, 0.1, 3000
    a = torch.randn(rows, channels, d, dtype=torch.float64)
    spec = Spec(keep, mode, replacement)
    sq_err = torch.stack([(expand(compress(a, spec, s), d, spec, s) - a).square().sum((1, 2)) for s in range(draws)])
    c = rad.variance_factor(d, rad.num_kept(keep, d), mode, replacement)
    ratio = sq_err.mean(0) / (c * a.square().sum((1, 2)))
    rel_se = sq_err.std(0) / sq_err.mean(0) / math.sqrt(draws)
    assert float(rel_se.max()) < 0.025
    assert float((ratio - 1).abs().max()) < 0.10, ratio


@pytest.mark.parametrize(("mode", "replacement"), [("same", False), ("different", True), ("projection", False)])
def test_conv_weight_gradient_is_unbiased(mode, replacement):
    torch.manual_seed(0)
    exact = nn.Conv2d(2, 3, 3, stride=1, padding=1).double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    g = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    exact(x).backward(g)
    w = _weight_grad_draws(randomized_copy(exact, 0.2, mode, replacement), x, g, 2000)
    _assert_mean_within_5_se(w, exact.weight.grad)


# -- memory --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", rad.MODES)
@pytest.mark.parametrize(("make", "x_shape"),
                         [(lambda: mlp((784, 300, 300, 300, 10)), (150, 784)), (rad_cnn, (8, 3, 32, 32))],
                         ids=["mlp-784-300-300-300-10-batch150", "cnn-3x32x32"])
def test_saved_activation_bytes_at_keep_01_within_a_fifth(make, x_shape, mode):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(x_shape)
    exact_bytes = rad.saved_activation_bytes(model, x)
    rad.randomize(model, 0.1, mode)
    randomized_bytes = rad.saved_activation_bytes(model, x)
    assert randomized_bytes <= 0.2 * exact_bytes, (randomized_bytes, exact_bytes)


def test_saved_activation_bytes_counts_each_storage_once():
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 10)
    # The input [5, 10] (first Linear) and the ReLU output [5, 6], which ReLU and the second Linear both save.
    assert rad.saved_activation_bytes(model, x) == 4 * (5 * 10 + 5 * 6)
    entries = rad.saved_tensors(model, x)
    assert sorted(e["count"] for e in entries) == [1, 2]
    assert rad.saved_activation_bytes(model, x, include_parameters=True) > rad.saved_activation_bytes(model, x)


def test_lean_relu_saves_one_bit_per_entry():
    x = torch.randn(5, 13, requires_grad=True)
    entries = rad.saved_tensors(rad.LeanReLU(), x)
    assert [(e["dtype"], e["bytes"]) for e in entries] == [(torch.uint8, math.ceil(5 * 13 / 8))]


LEAN = [
    (nn.ReLU(), rad.LeanReLU(), (3, 4, 5)),
    (nn.MaxPool2d(2), rad.LeanMaxPool2d(2), (2, 3, 8, 7)),
    (nn.MaxPool2d(3, stride=2, padding=1, dilation=1, ceil_mode=True), rad.LeanMaxPool2d(3, 2, 1, 1, ceil_mode=True),
     (2, 3, 9, 8)),
    (nn.MaxPool2d((3, 2), stride=1, dilation=2), rad.LeanMaxPool2d((3, 2), stride=1, dilation=2), (2, 3, 9, 8)),
    (nn.MaxPool1d(3, stride=2, padding=1), rad.LeanMaxPool1d(3, stride=2, padding=1), (2, 3, 11)),
    (nn.MaxPool3d(2), rad.LeanMaxPool3d(2), (2, 2, 4, 5, 6)),
    (nn.AvgPool2d(2), rad.LeanAvgPool2d(2), (2, 3, 8, 7)),
    (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), rad.LeanAvgPool2d(3, 2, 1, True, False),
     (2, 3, 9, 8)),
    (nn.AvgPool2d(2, divisor_override=3), rad.LeanAvgPool2d(2, divisor_override=3), (2, 3, 8, 8)),
    (nn.AvgPool1d(3, stride=2, padding=1), rad.LeanAvgPool1d(3, stride=2, padding=1), (2, 3, 11)),
    (nn.AvgPool3d(2), rad.LeanAvgPool3d(2), (2, 2, 4, 5, 6)),
]


@pytest.mark.parametrize(("torch_layer", "lean", "shape"), LEAN, ids=[type(t[1]).__name__ + str(i) for i, t in
                                                                        enumerate(LEAN)])
def test_lean_layers_match_torch_and_save_less(torch_layer, lean, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = torch_layer(x), lean(x2)
    assert torch.equal(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-14, atol=1e-14)
    assert rad.saved_activation_bytes(lean, x2) < rad.saved_activation_bytes(torch_layer, x)


# -- the model-level API ---------------------------------------------------------------------------------------


def test_randomize_keeps_parameters_names_dtype_and_a_checkpoint_loads():
    torch.manual_seed(0)
    exact = rad_cnn().double()
    model = copy.deepcopy(exact)
    params_before = list(model.parameters())
    assert rad.randomize(model, 0.1, "same") is model
    assert list(model.parameters()) == params_before  # the same Parameter objects: optimizers keep working
    assert isinstance(model[0], rad.RandConv2d) and isinstance(model[0], nn.Conv2d)
    assert isinstance(model[1], rad.LeanReLU) and isinstance(model[2], rad.LeanMaxPool2d)
    assert isinstance(model[8], rad.LeanAvgPool2d) and isinstance(model[10], rad.RandLinear)
    buf = io.BytesIO()
    torch.save(exact.state_dict(), buf)
    buf.seek(0)
    model.load_state_dict(torch.load(buf, weights_only=True))
    assert model.state_dict().keys() == exact.state_dict().keys()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = model(x)
    assert y.dtype == torch.float64 and torch.equal(y, exact(x))
    y.sum().backward()
    exact(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), exact.parameters()):
        assert p.grad.dtype == torch.float64 and p.grad.shape == q.grad.shape
        if name.endswith("bias"):  # exact; the weights' gradients are the randomized ones
            assert torch.equal(p.grad, q.grad), name
    rad.derandomize(model)
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.ReLU and type(model[10]) is nn.Linear


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_randomized_model_on_cuda():
    torch.manual_seed(0)
    model = rad_cnn().cuda()
    exact = copy.deepcopy(model)
    rad.randomize(model, 0.1, "different")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    y = model(x)
    torch.testing.assert_close(y, exact(x))
    y.sum().backward()
    assert all(p.grad.device.type == "cuda" and p.grad.dtype == torch.float32 for p in model.parameters())
    assert rad.saved_activation_bytes(model, x) <= 0.2 * rad.saved_activation_bytes(exact, x)


def test_no_grad_forward_and_frozen_weights_take_the_exact_path():
    layer = rad.RandLinear(5, 3, keep=0.2)
    with torch.no_grad():
        layer(torch.randn(2, 5))
    layer.weight.requires_grad_(False)
    layer(torch.randn(2, 5, requires_grad=True)).sum().backward()
    assert layer._rad_state.seeds == []  # nothing was randomized, nothing recorded


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_keep_is_refused(keep):
    with pytest.raises(ValueError, match=r"keep must be a fraction in \(0, 1\]"):
        rad.randomize(nn.Linear(3, 2), keep=keep)


def test_bad_mode_and_options_are_refused():
    with pytest.raises(ValueError, match=r"mode must be 'same'.*'different'.*'projection'"):
        rad.randomize(nn.Linear(3, 2), mode="bernoulli")
    with pytest.raises(ValueError, match="replacement=True applies to mode='same' or 'different'"):
        rad.randomize(nn.Linear(3, 2), mode="projection", replacement=True)
    with pytest.raises(ValueError, match="keep must be"):
        rad.RandLinear(3, 2, keep=2.0)
    with pytest.raises(TypeError, match=r"needs an nn\.Module"):
        rad.randomize(lambda x: x)


def test_model_without_supported_layer_is_refused():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return F.relu(F.linear(x, self.w))

    for model in (nn.Sequential(nn.ReLU(), nn.Tanh()), Functional()):
        with pytest.raises(ValueError, match=r"randomize found no supported layer.*nn\.Linear, nn\.Conv1d"):
            rad.randomize(model)


def test_parametrized_layers_are_left_exact_with_a_warning():
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="parametrized layers"):
        rad.randomize(model)
    assert isinstance(model[1], rad.RandLinear) and not isinstance(model[0], rad.RandLinear)


# -- patterns, contexts and the per-example engine ------------------------------------------------------------


def test_repeat_last_pattern_reuses_each_calls_pattern():
    torch.manual_seed(0)
    layer = rad.RandLinear(8, 3, keep=0.25, mode="different").double()
    x1, x2 = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)

    def grad():  # the layer called twice in one forward
        layer.weight.grad = None
        (layer(x1).square().sum() + layer(x2).sum()).backward()
        return layer.weight.grad.clone()

    first = grad()
    with rad.repeat_last_pattern():
        assert torch.equal(grad(), first)
    with rad.repeat_last_pattern():  # a new block replays from the first call again
        assert torch.equal(grad(), first)
    assert not torch.equal(grad(), first)  # outside: a fresh pattern
    with rad.repeat_last_pattern(), pytest.raises(RuntimeError, match="no pattern to repeat"):
        layer(x1).sum().backward()
        layer(x1).sum().backward()
        layer(x1)


def test_exact_context_gives_the_exact_gradient_and_wins_over_repeat():
    torch.manual_seed(0)
    exact = nn.Linear(6, 3).double()
    layer = randomized_copy(exact, 0.2, "same")
    x = torch.randn(5, 6, dtype=torch.float64)
    exact(x).sum().backward()
    with rad.exact(), rad.repeat_last_pattern():
        layer(x).sum().backward()
    assert torch.equal(layer.weight.grad, exact.weight.grad)


def test_per_example_engine_refuses_randomized_forwards_and_is_exact_inside_exact():
    torch.manual_seed(0)
    exact_model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    model = rad.randomize(copy.deepcopy(exact_model), 0.1)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    engine = PerExampleGradients(model)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(PerExampleError, match=r"randomizes its weight gradient.*vr_mcmc\.rad\.exact\(\)"):
        engine.collect()
    model.zero_grad()
    with rad.exact():
        F.cross_entropy(model(x), y).backward()
    got = engine.collect()
    with PerExampleGradients(exact_model) as reference:
        F.cross_entropy(exact_model(x), y).backward()
        expected = reference.collect()
    for name in expected:
        torch.testing.assert_close(got[name].dense(), expected[name].dense(), rtol=1e-12, atol=1e-12)


# -- samplers -----------------------------------------------------------------------------------------------


def _problem(seed=0, n=24):
    g = gen(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def _svrg_at(model, x, y, direction, distance, idx, repeats):
    """SVRG estimates at θ = θ̃ + distance·direction, snapshot θ̃ = the model's current parameters."""
    params = list(model.parameters())
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=8)
    est = SVRG(10**9, loader=loader, loss_fn=lambda xb, yb: F.cross_entropy(model(xb), yb))
    est.bind(params, len(x), "mean")

    def closure():
        for p in params:
            p.grad = None
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        return loss

    closure()
    est.estimate(idx, closure)  # the snapshot θ̃ and μ̃ (exact, inside rad.exact())
    with torch.no_grad():
        for p, u in zip(params, direction):
            p.add_(distance * u)
    out = []
    for _ in range(repeats):
        closure()  # at θ, a fresh pattern (as the sampler's step does)
        est.estimate(idx, closure)  # at θ̃, the same pattern
        out.append(torch.cat([p.grad.reshape(-1) for p in params]))
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["different", "projection"])
def test_svrg_on_a_randomized_model_is_unbiased_and_its_error_vanishes_at_the_snapshot(mode):
    torch.manual_seed(0)
    exact_model, x, y = _problem()
    direction = [torch.randn(p.shape, generator=gen(7), dtype=torch.float64) for p in exact_model.parameters()]
    idx = torch.arange(6)
    reference = {d: _svrg_at(copy.deepcopy(exact_model), x, y, direction, d, idx, 1)[0] for d in (0.3, 0.03, 0.003)}

    draws = _svrg_at(rad.randomize(copy.deepcopy(exact_model), 0.25, mode), x, y, direction, 0.3, idx, 1500)
    random_part = draws.std(0) > 0
    # The bias gradients are exact at θ and θ̃, so those entries equal the exact SVRG estimate.
    torch.testing.assert_close(draws[:, ~random_part], reference[0.3][~random_part].expand(len(draws), -1))
    _assert_mean_within_5_se(draws[:, random_part], reference[0.3][random_part])

    # The error's size shrinks in proportion to ‖θ − θ̃‖ (expected ratio 10 per factor 10 of distance).
    rms = {}
    for d in (0.3, 0.03, 0.003):
        model = rad.randomize(copy.deepcopy(exact_model), 0.25, mode)
        rms[d] = float((_svrg_at(model, x, y, direction, d, idx, 200) - reference[d]).square().mean().sqrt())
    assert 5 < rms[0.3] / rms[0.03] < 20 and 5 < rms[0.03] / rms[0.003] < 20, rms

    # With independent patterns at θ and θ̃ the error would not vanish: far above the repeated one.
    model = rad.randomize(copy.deepcopy(exact_model), 0.25, mode)
    with torch.no_grad():
        for p, u in zip(model.parameters(), direction):
            p.add_(0.003 * u)
    singles = []
    for _ in range(50):
        model.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        singles.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    independent_rms = float((torch.stack(singles[:25]) - torch.stack(singles[25:])).square().mean().sqrt()) * len(x)
    assert rms[0.003] < 0.05 * independent_rms, (rms, independent_rms)


def _two_steps(model, x, y, kind):
    """θ after each of two sampler steps (the same batches and the same injected noise every call), and lp."""
    n = len(x)
    common = dict(prior=torch_sample.priors.Normal(1.0), generator=gen(5))
    if kind == "sgld":
        sampler = torch_sample.SGLD(model.parameters(), lr=1e-3, num_data=n, **common)
    else:
        loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=8)
        sampler = torch_sample.SVRGLD(model.parameters(), lr=1e-3, num_data=n, snapshot_every=3, loader=loader,
                                      loss_fn=lambda xb, yb: F.cross_entropy(model(xb), yb), **common)
    thetas, lps = [], []
    for step in range(2):
        idx = torch.randperm(n, generator=gen(step))[:6]

        def closure(idx=idx):
            sampler.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            return loss

        sampler.step(closure, indices=idx)
        thetas.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        lps.append(sampler.stats["lp"])
    return torch.stack(thetas), torch.tensor(lps)


@pytest.mark.parametrize("kind", ["sgld", "svrg"])
def test_sampler_steps_on_a_randomized_model_are_the_exact_models_in_expectation(kind):
    """The same two steps (batches, injected noise) on the exact model and on 300 randomized copies
    (patterns from different seeds). The forward is exact, so the first step's lp is the exact
    model's; a step's update is linear in the gradient estimate, unbiased over patterns, so the mean
    θ over copies is the exact model's within 5 standard errors, and coordinates with exact gradients
    (the biases) match the exact run. SVRG's first step is at its snapshot, where the same pattern at θ
    and θ̃ cancels: it is the exact step itself."""
    torch.manual_seed(0)
    exact_model, x, y = _problem()
    reference, reference_lp = _two_steps(copy.deepcopy(exact_model), x, y, kind)
    runs = [_two_steps(rad.randomize(copy.deepcopy(exact_model), 0.25, "different", generator=gen(100 + r)), x, y,
                       kind) for r in range(300)]
    thetas = torch.stack([t for t, _ in runs])  # [copies, steps, parameters]
    assert all(float(lp[0]) == pytest.approx(float(reference_lp[0]), rel=1e-12) for _, lp in runs)
    if kind == "svrg":
        torch.testing.assert_close(thetas[:, 0], reference[0].expand(len(runs), -1), rtol=1e-12, atol=1e-12)
    for step in range(1 if kind == "svrg" else 0, 2):
        random_part = thetas[:, step].std(0) > 1e-12
        assert int(random_part.sum()) > 0  # the weights' updates are randomized
        torch.testing.assert_close(thetas[:, step, ~random_part], reference[step, ~random_part].expand(len(runs), -1),
                                   rtol=1e-12, atol=1e-12)
        _assert_mean_within_5_se(thetas[:, step, random_part], reference[step, random_part])


def test_sgld_on_a_randomized_model_samples_the_posterior_up_to_its_extra_noise():
    """Bayesian linear regression (N = 40, d = 4, prior N(0, 1), unit noise), full-batch SGLD at h = 2e-3
    (h·λmax = 0.12) on a RandLinear with keep = 0.5: the extra gradient noise leaves the mean right and
    inflates the variance by O(h) (measured 1-10% at this step, 6-19% at keep = 0.25).

    Tolerances: means within 0.35 posterior sd (about 5 Monte Carlo standard errors: autocorrelation
    time ≈ 1/(h·λmin) ≈ 25 steps, so ≈ 300 effective draws), variance ratios in (0.7, 1.5).
    """
    g = gen(0)
    n, d = 40, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, 1, generator=g, dtype=torch.float64) + torch.randn(n, 1, generator=g, dtype=torch.float64)
    cov = torch.linalg.inv(x.T @ x + torch.eye(d, dtype=torch.float64))
    mean = (cov @ x.T @ y).reshape(-1)
    model = rad.randomize(nn.Linear(d, 1, bias=False).double(), 0.5, "different", generator=gen(1))
    sampler = torch_sample.SGLD(model.parameters(), lr=2e-3, num_data=n, prior=torch_sample.priors.Normal(1.0),
                                generator=gen(2))
    draws = []
    for step in range(9000):
        sampler.zero_grad()
        (0.5 * (model(x) - y).square().mean()).backward()
        sampler.step()
        if step >= 1000:
            draws.append(model.weight.detach().reshape(-1).clone())
    draws = torch.stack(draws)
    sd = cov.diagonal().sqrt()
    assert float(((draws.mean(0) - mean) / sd).abs().max()) < 0.35
    ratio = draws.var(0) / cov.diagonal()
    assert float(ratio.min()) > 0.7 and float(ratio.max()) < 1.5, ratio

"""Each layer rule against a float64 loop of single-example backward passes, over drawn configurations.

Ranges follow Opacus's per-sample-gradient tests: channels 1–32, kernel 1–4, stride 1–3, dilation
1–3, groups (depthwise included), padding as int, 'same' and 'valid', all padding modes; batch 1–17;
both loss reductions; float64 (relative error ≤ 1e-10) and float32 (issue #2's bars).
"""

from __future__ import annotations

import math

import pytest
import torch
from checks import check_engine
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

from vr_mcmc.per_example import Dense, Factored, RowSparse

DTYPES = st.sampled_from([torch.float64, torch.float32])
REDUCTIONS = st.sampled_from(["mean", "sum"])
BATCH = st.integers(1, 17)


def _target_like(model: nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        shape = model(x).shape
    return torch.randn(shape, generator=gen, dtype=x.dtype if x.is_floating_point() else torch.float64)


@st.composite
def linear_case(draw):
    d_in, d_out = draw(st.integers(1, 32)), draw(st.integers(1, 32))
    extra = draw(st.lists(st.integers(1, 4), max_size=2))
    return d_in, d_out, extra, draw(st.booleans())


@settings(max_examples=150)
@given(case=linear_case(), batch=BATCH, reduction=REDUCTIONS, dtype=DTYPES, seed=st.integers(0, 2**16))
def test_linear(case, batch, reduction, dtype, seed):
    d_in, d_out, extra, bias = case
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    x = torch.randn(batch, *extra, d_in, generator=gen, dtype=dtype)
    grads = check_engine(layer, x, _target_like(layer, x, gen).to(dtype), reduction=reduction, kind="linear")
    t = math.prod(extra)
    # The smaller exact representation is chosen: factors when T·(d_in+d_out) ≤ d_in·d_out.
    expected = Factored if t * (d_in + d_out) <= d_in * d_out else Dense
    assert isinstance(grads["weight"], expected)


@st.composite
def conv_case(draw):
    n = draw(st.sampled_from([1, 2, 3]))
    cap = 32 if n < 3 else 8  # 3-D cases cost a cube of positions; smaller channels keep CI fast
    groups = draw(st.sampled_from([1, 2, 3, 4]))
    depthwise = draw(st.booleans())
    c_in = groups * (1 if depthwise else draw(st.integers(1, cap // groups)))
    c_out = groups * draw(st.integers(1, cap // groups))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(n))
    padding = draw(st.one_of(st.integers(0, 2), st.sampled_from(["same", "valid"])))
    stride = 1 if padding == "same" else draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    sizes = []
    for k, d in zip(kernel, dilation):
        span = d * (k - 1) + 1
        total = {"same": span - 1, "valid": 0}.get(padding, 2 * padding) if isinstance(padding, str) else 2 * padding
        side = (total + 1) // 2
        lo = max(1, span - total)
        if mode != "zeros":
            lo = max(lo, side + 1)  # reflect/circular padding needs more input than padding
        sizes.append(draw(st.integers(lo, lo + (5 if n < 3 else 2))))
    return n, c_in, c_out, kernel, stride, padding, dilation, groups, mode, bias, sizes


@settings(max_examples=400)
@given(case=conv_case(), batch=BATCH, reduction=REDUCTIONS, dtype=DTYPES, seed=st.integers(0, 2**16))
def test_conv(case, batch, reduction, dtype, seed):
    n, c_in, c_out, kernel, stride, padding, dilation, groups, mode, bias, sizes = case
    conv_type = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layer = conv_type(
        c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
        padding_mode=mode,
    ).to(dtype)
    x = torch.randn(batch, c_in, *sizes, generator=gen, dtype=dtype)
    grads = check_engine(layer, x, _target_like(layer, x, gen).to(dtype), reduction=reduction, kind="conv")
    # Coverage of the draw, shown by pytest --hypothesis-show-statistics.
    event(f"conv{n}d, weight {type(grads['weight']).__name__}")
    event("groups > 1" if groups > 1 else "groups = 1")
    event("channels >= 16" if max(c_in, c_out) >= 16 else "channels < 16")
    event(f"padding {padding if isinstance(padding, str) else 'int'}, mode {mode}")
    event("batch >= 10" if batch >= 10 else "batch < 10")


@pytest.mark.parametrize("shape", [(6, 8, 8), (32, 4, 4), (3, 32, 32)])
def test_conv_takes_the_smaller_representation(shape):
    """Factors for few output positions (late layers), dense for many (early layers); both exact."""
    c_in, h, w = shape
    layer = nn.Conv2d(c_in, 16, 3, padding=1).double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    grads = check_engine(layer, x, _target_like(layer, x, torch.Generator()), reduction="mean")
    factored_numbers = h * w * (c_in * 9 + 16)
    expected = Factored if factored_numbers <= 16 * c_in * 9 else Dense
    assert isinstance(grads["weight"], expected)


@settings(max_examples=100)
@given(
    num=st.integers(1, 30), dim=st.integers(1, 16), seq=st.lists(st.integers(1, 6), max_size=2),
    use_padding=st.booleans(), batch=BATCH, reduction=REDUCTIONS, dtype=DTYPES, seed=st.integers(0, 2**16),
)
def test_embedding(num, dim, seq, use_padding, batch, reduction, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    padding_idx = (seed % num) if use_padding else None
    layer = nn.Embedding(num, dim, padding_idx=padding_idx).to(dtype)
    idx = torch.randint(0, num, (batch, *seq), generator=gen)  # repeated rows within an example are likely
    grads = check_engine(layer, idx, _target_like(layer, idx, gen).to(dtype), reduction=reduction)
    assert isinstance(grads["weight"], RowSparse)
    if padding_idx is not None:
        assert grads["weight"].dense()[:, padding_idx].abs().max() == 0


def _norm_layers(c: int, spatial: list[int]):
    layers = [
        ("layernorm-last", lambda: nn.LayerNorm(spatial[-1] if spatial else c), "channels-last"),
        ("layernorm-2d", lambda: nn.LayerNorm([c, *spatial]), "channels-first"),
        ("groupnorm", lambda: nn.GroupNorm(math.gcd(c, 4), c), "channels-first"),
        ("instancenorm", lambda: nn.InstanceNorm1d(c, affine=True), "instance"),
        ("batchnorm-eval", lambda: nn.BatchNorm1d(c).eval(), "channels-first"),
    ]
    if hasattr(nn, "RMSNorm"):
        layers.append(("rmsnorm", lambda: nn.RMSNorm(spatial[-1] if spatial else c), "channels-last"))
    return layers


@settings(max_examples=150)
@given(
    c=st.integers(1, 12), length=st.integers(2, 6), which=st.integers(0, 5), bias=st.booleans(),
    batch=BATCH, reduction=REDUCTIONS, dtype=DTYPES, seed=st.integers(0, 2**16),
)
def test_normalization(c, length, which, bias, batch, reduction, dtype, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layers = _norm_layers(c, [length])
    _, make, _ = layers[which % len(layers)]
    layer = make().to(dtype)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
        if isinstance(layer, nn.BatchNorm1d):
            layer.running_mean.copy_(torch.randn(c, generator=gen, dtype=dtype))
            layer.running_var.copy_(torch.rand(c, generator=gen, dtype=dtype) + 0.5)
    if not bias and getattr(layer, "bias", None) is not None:
        layer.bias.requires_grad_(False)
    x = torch.randn(batch, c, length, generator=gen, dtype=dtype) * 3 + 1
    check_engine(layer, x, _target_like(layer, x, gen).to(dtype), reduction=reduction, kind="linear")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_conv_batch_spanning_several_chunks(reduction):
    """The dense path runs the grouped convolution on chunks of examples: 70 = 2 full chunks + 6."""
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2).double()
    x = torch.randn(70, 4, 9, 9, dtype=torch.float64)
    grads = check_engine(layer, x, _target_like(layer, x, torch.Generator()), reduction=reduction, kind="conv")
    assert isinstance(grads["weight"], Dense)

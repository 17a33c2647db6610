"""Engine hardening (issues 13 and 15): each case against an independent float64 reference
(a loop of single-example backward passes) or a clear error, never wrong numbers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from vr_mcmc.per_example import (
    PerExampleError,
    PerExampleGradients,
    RowSparse,
    SlowFallbackWarning,
    UnsupportedLayerError,
)

F64 = torch.float64


def _loop(model: nn.Module, example_loss, b: int) -> dict[str, torch.Tensor]:
    """Reference: the gradient of example_loss(i) for each i, stacked (sparse gradients densified)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(b):
        grads = torch.autograd.grad(example_loss(i), list(params.values()), allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g)
                     for g, p in zip(grads, params.values())])
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(params)}


def _assert_matches(grads, ref, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert set(grads) == set(ref)
    for n in ref:
        torch.testing.assert_close(grads[n].dense(), ref[n], rtol=rtol, atol=atol, msg=n)


# -- 13.1: Embedding(sparse=True) ----------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_sparse_embedding_is_checked_and_exact(reduction, padding_idx):
    torch.manual_seed(0)
    emb = nn.Embedding(11, 4, sparse=True, padding_idx=padding_idx).double()
    head = nn.Linear(4, 1).double()
    model = nn.Sequential(emb, nn.Tanh(), head)
    idx = torch.randint(0, 11, (6, 5))
    idx[0, :2] = 2  # a padding lookup and a repeated row

    def loss_of(out):
        return out.square().sum()

    with PerExampleGradients(model, reduction) as engine:
        out = model(idx)
        (loss_of(out) / (6 if reduction == "mean" else 1)).backward()
        assert emb.weight.grad.is_sparse
        grads = engine.collect()
    ref = _loop(model, lambda i: loss_of(model(idx[i : i + 1])), 6)
    _assert_matches(grads, ref)
    assert engine.check_ratios["0.weight"] < 1


def test_sparse_embedding_gradient_that_bypasses_the_hooks_is_refused():
    emb = nn.Embedding(11, 4, sparse=True).double()
    idx = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(0))
    with PerExampleGradients(emb, "sum") as engine:
        # The weight also used outside the module's forward: part of its (sparse) gradient is missed.
        (emb(idx).square().sum() + nn.functional.embedding(idx[:1], emb.weight, sparse=True).sum()).backward()
        with pytest.raises(PerExampleError, match="do not add up"):
            engine.collect()


# -- 13.2: EmbeddingBag, one example per bag ------------------------------------------------------


class BagClassifier(nn.Module):
    """torchtext's text classifier: a flat batch of tokens with offsets, one bag per text."""

    def __init__(self, bag: nn.EmbeddingBag):
        super().__init__()
        self.bag = bag
        self.head = nn.Linear(bag.embedding_dim, 2)

    def forward(self, text, offsets=None, per_sample_weights=None):
        return self.head(self.bag(text, offsets, per_sample_weights=per_sample_weights))


def _bags(b: int, num: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.randint(0, 5, (b,), generator=gen)
    lengths[0] = 4  # at least one long bag; empty bags are likely among the others
    text = torch.randint(0, num, (int(lengths.sum()),), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return text, offsets


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_embedding_bag_with_offsets_one_example_per_bag(mode, padding_idx, weighted, include_last_offset, reduction):
    if weighted and mode != "sum":
        pytest.skip("torch takes per_sample_weights in mode 'sum' only")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    b, num = 7, 9
    bag = nn.EmbeddingBag(num, 5, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset)
    model = BagClassifier(bag).double()
    text, offsets = _bags(b, num, gen)
    text[:3] = 1  # padding lookups and repeated rows in the first bag
    weights = torch.randn(text.shape, generator=gen, dtype=F64) if weighted else None
    target = torch.randn(b, 2, generator=gen, dtype=F64)
    if include_last_offset:
        offsets = torch.cat([offsets, offsets.new_tensor([text.numel()])])
    ends = [*offsets[1:].tolist(), text.numel()][:b]

    def loss(out, t):
        return (out.tanh() - t).square().sum()

    with PerExampleGradients(model, reduction) as engine:
        (loss(model(text, offsets, weights), target) / (b if reduction == "mean" else 1)).backward()
        grads = engine.collect()
    assert isinstance(grads["bag.weight"], RowSparse)

    def example_loss(i):
        s, e = int(offsets[i]), ends[i]
        one = torch.tensor([0, e - s]) if include_last_offset else torch.tensor([0])
        w = None if weights is None else weights[s:e]
        return loss(model(text[s:e], one, w), target[i : i + 1])

    _assert_matches(grads, _loop(model, example_loss, b))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_with_a_2d_input_and_keyword_weights(mode):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = BagClassifier(nn.EmbeddingBag(6, 3, mode=mode, padding_idx=0)).double()
    x = torch.randint(0, 6, (5, 4), generator=gen)
    w = torch.randn(5, 4, generator=gen, dtype=F64) if mode == "sum" else None
    with PerExampleGradients(model, "sum") as engine:
        model(x, per_sample_weights=w).tanh().sum().backward()
        grads = engine.collect()
    ref = _loop(model, lambda i: model(x[i : i + 1], None, None if w is None else w[i : i + 1]).tanh().sum(), 5)
    _assert_matches(grads, ref)


def test_fallback_that_cannot_replay_one_example_names_the_module():
    class MyBag(nn.EmbeddingBag):  # overrides forward: no rule, the fallback takes it
        def forward(self, text, offsets):
            return super().forward(text, offsets) * 2

    model = nn.Sequential()
    model.add_module("bag", MyBag(9, 3))
    text, offsets = _bags(5, 9, torch.Generator().manual_seed(0))
    with PerExampleGradients(model.bag) as engine:
        model.bag(text, offsets).sum().backward()
        with pytest.raises(UnsupportedLayerError, match=r"layer '' \(MyBag\).*could not run it on one example"):
            engine.collect()


# -- 15.5: the fallback's per-example loop is announced, once per module ---------------------------


class LastStep(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_fallback_loop_warns_once_per_module_and_stays_exact():
    torch.manual_seed(0)
    model = LastStep(nn.GRU(3, 4, batch_first=True)).double()  # aten's GRU has no working vmap rule
    x = torch.randn(5, 6, 3, dtype=F64)
    with PerExampleGradients(model, "sum") as engine, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model.zero_grad()
            model(x).tanh().sum().backward()
            grads = engine.collect()
    slow = [w for w in caught if issubclass(w.category, SlowFallbackWarning)]
    assert len(slow) == 1
    assert "layer 'rnn' (GRU)" in str(slow[0].message) and "up to about 5x slower" in str(slow[0].message)
    _assert_matches(grads, _loop(model, lambda i: model(x[i : i + 1]).tanh().sum(), 5))
    # A vectorizable fallback module stays silent.
    prelu = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4)).double()
    with PerExampleGradients(prelu, "sum") as engine, warnings.catch_warnings():
        warnings.simplefilter("error", SlowFallbackWarning)
        prelu(x[:, 0]).sum().backward()
        engine.collect()


# -- 13.3: the batch outside dimension 0 -----------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.MultiheadAttention(4, 2),
        lambda: nn.LSTM(4, 4),
        lambda: nn.GRU(4, 4),
        lambda: nn.RNN(4, 4),
        lambda: nn.TransformerEncoderLayer(4, 2, dim_feedforward=8),
        lambda: nn.Transformer(4, 2, 1, 1, dim_feedforward=8),
    ],
)
def test_sequence_first_modules_are_refused_outright(make):
    model = nn.Sequential(nn.Linear(4, 4), make())
    with pytest.raises(PerExampleError, match=r"batch_first=False.*batch must be dimension 0"):
        PerExampleGradients(model)
    make().requires_grad_(False)  # a frozen one has no per-example gradients to get wrong
    PerExampleGradients(nn.Sequential(nn.Linear(4, 4), make().requires_grad_(False))).remove()


def test_sequence_first_attention_with_one_step_was_silently_wrong_and_is_refused():
    """T = 1: [1, B, E] passed the size check (dim 0 is 1, not B) and gave wrong numbers; now refused."""

    class OneStep(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1)

        def forward(self, x):  # x [B, E] -> a sequence of one step, time-major [1, B, E]
            s = x.unsqueeze(0)
            return self.attn(s, s, s)[0][0]

    with pytest.raises(PerExampleError, match=r"'attn' \(MultiheadAttention\) has batch_first=False"):
        PerExampleGradients(OneStep())


class TimeMajorMiddle(nn.Module):
    """A position-wise Linear applied to the time-major view of a batch-major activation."""

    def __init__(self, from_input: bool):
        super().__init__()
        self.from_input = from_input
        self.enc = nn.Linear(3, 3)
        self.mid = nn.Linear(3, 3)

    def forward(self, x):  # [B, T, 3]
        h = x if self.from_input else self.enc(x)
        return self.mid(h.transpose(0, 1)).transpose(0, 1)


@pytest.mark.parametrize("from_input", [False, True])
def test_rule_layer_on_a_transposed_activation_with_t_equal_b_is_refused(from_input):
    model = TimeMajorMiddle(from_input).double()
    x = torch.randn(4, 4, 3, dtype=F64)  # T = B: the size check cannot see it
    with PerExampleGradients(model) as engine, pytest.raises(PerExampleError, match=r"layer 'mid'.*dimension 1"):
        model(x).tanh().sum().backward()
        engine.collect()


def test_time_major_data_viewed_batch_major_is_not_refused():
    """Data stored [T, B, E] and handed to the model as the batch-major view x = data.transpose(0, 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(4, 4, 3, dtype=F64).transpose(0, 1)
    with PerExampleGradients(model, "sum") as engine:
        model(x).tanh().sum().backward()
        grads = engine.collect()
    _assert_matches(grads, _loop(model, lambda i: model(x[i : i + 1]).tanh().sum(), 4))


# -- 13.4: PackedSequence inputs to recurrent layers, in input order -------------------------------


class PackedNet(nn.Module):
    """Pack padded sequences of different lengths, run the recurrent layer, use every output and h_n."""

    def __init__(self, kind: type[nn.RNNBase], layers: int, bidirectional: bool, with_h0: bool):
        super().__init__()
        self.rnn = kind(3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.with_h0 = with_h0
        width = 4 * (2 if bidirectional else 1)
        self.head = nn.Linear(width + 4, 2)
        self.h0 = nn.Linear(3, 4 * layers * (2 if bidirectional else 1))

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        if self.with_h0:  # an initial state computed per example from its first step
            h0 = self.h0(x[:, 0]).view(x.shape[0], -1, 4).transpose(0, 1).contiguous()
            out, h = self.rnn(packed, (h0, torch.zeros_like(h0)) if isinstance(self.rnn, nn.LSTM) else h0)
        else:
            out, h = self.rnn(packed)
        h = h[0] if isinstance(h, tuple) else h
        padded, _ = pad_packed_sequence(out, batch_first=True)
        return self.head(torch.cat([padded.sum(1), h[-1]], 1))


@pytest.mark.parametrize("kind", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize(("layers", "bidirectional", "with_h0"), [(1, False, False), (2, True, True)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_packed_sequences_give_per_example_gradients_in_input_order(kind, layers, bidirectional, with_h0, reduction):
    torch.manual_seed(0)
    model = PackedNet(kind, layers, bidirectional, with_h0).double()
    lengths = torch.tensor([3, 5, 1, 5, 2, 4])  # unsorted: the packing reorders, the result must not
    x = torch.randn(6, 5, 3, dtype=F64)
    target = torch.randn(6, 2, dtype=F64)

    def loss(out, t):
        return (out.tanh() - t).square().sum()

    with PerExampleGradients(model, reduction) as engine, warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowFallbackWarning)
        (loss(model(x, lengths), target) / (6 if reduction == "mean" else 1)).backward()
        grads = engine.collect()
    ref = _loop(model, lambda i: loss(model(x[i : i + 1, : lengths[i]], lengths[i : i + 1]), target[i : i + 1]), 6)
    _assert_matches(grads, ref)


# -- 15.13: the consistency check in its own module -------------------------------------------------


def test_consistency_check_stands_alone_and_releases_terms():
    from vr_mcmc.per_example import Dense
    from vr_mcmc.per_example.consistency import ConsistencyCheck, release_terms

    gen = torch.Generator().manual_seed(0)
    terms = torch.randn(5, 3, 4, 2, generator=gen, dtype=F64)  # 5 examples, 3 positions each
    param = nn.Parameter(torch.zeros(4, 2, dtype=F64))
    rep = Dense.from_terms(terms)
    check = ConsistencyCheck()
    check.run({"w": rep}, {"w": param}, {"w": terms.sum((0, 1))}, {"w": 0.0}, "sum")
    assert check.ratios["w"] < 1e-3
    with pytest.raises(PerExampleError, match="'w' do not add up"):
        check.run({"w": rep}, {"w": param}, {"w": terms[1:].sum((0, 1))}, {"w": 0.0}, "sum")
    assert check.ratios["w"] > 1
    release_terms({"w": rep})
    assert rep.terms is None


# -- 13.5: MultiheadAttention's dedicated rule --------------------------------------------------------


class Attend(nn.Module):
    def __init__(self, case: str):
        super().__init__()
        self.case = case
        kdim = 5 if case == "kdim" else None
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim,
                                          bias=case != "nobias", dropout=0.3)
        if case == "bias_k":
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
        self.attn.eval()  # dropout off: per-example gradients are defined

    def forward(self, x, kv, pad, mask):
        if self.case in ("self", "nobias", "bias_k"):
            out, _ = self.attn(x, x, x, key_padding_mask=pad, attn_mask=mask)
        elif self.case == "causal":
            causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
            out, _ = self.attn(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
        else:
            out, _ = self.attn(x, kv, kv, key_padding_mask=pad, need_weights=False)
        return out


@pytest.mark.parametrize("case", ["self", "nobias", "cross", "cross_t_eq_s", "kdim", "causal", "bias_k"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_attention_rule_matches_the_float64_loop(case, reduction):
    torch.manual_seed(0)
    model = Attend(case).double()
    b, t = 5, 4
    s = t if case in ("self", "nobias", "cross_t_eq_s", "causal", "bias_k") else 6
    x = torch.randn(b, t, 8, dtype=F64)
    kv = torch.randn(b, s, 5 if case == "kdim" else 8, dtype=F64)
    pad = torch.zeros(b, s, dtype=F64)
    pad[1, -2:] = float("-inf")  # example 1 ignores its last two keys
    mask = torch.randn(b * 2, t, s, dtype=F64) if case == "self" else None
    target = torch.randn(b, t, 8, dtype=F64)
    engine = PerExampleGradients(model, reduction)
    assert dict(engine.layers)["attn"] == ("torch.func" if case == "bias_k" else "rule")
    loss = (model(x, kv, pad, mask).tanh() - target).square().sum()
    (loss / (b if reduction == "mean" else 1)).backward()
    grads = engine.collect()
    engine.remove()

    def example_loss(i):
        m = None if mask is None else mask[2 * i : 2 * i + 2]
        return (model(x[i : i + 1], kv[i : i + 1], pad[i : i + 1], m).tanh() - target[i : i + 1]).square().sum()

    _assert_matches(grads, _loop(model, example_loss, b))


def test_attention_dropout_in_training_is_refused():
    attn = nn.MultiheadAttention(8, 2, batch_first=True, dropout=0.5)
    x = torch.randn(3, 4, 8)
    with PerExampleGradients(attn) as engine:
        attn(x, x, x)[0].sum().backward()
        with pytest.raises(UnsupportedLayerError, match="dropout"):
            engine.collect()


def test_transposed_result_of_a_parameter_free_op_stays_undetectable():
    """README's undetectable case: relu(h).transpose(0, 1) with T = B is a view of a tensor no hook saw.

    Pinned so that the README's list changes with the engine: if this starts raising, update both.
    """

    class Hidden(TimeMajorMiddle):
        def forward(self, x):
            return self.mid(torch.relu(self.enc(x)).transpose(0, 1)).transpose(0, 1)

    model = Hidden(False).double()
    x = torch.randn(4, 4, 3, dtype=F64)
    with PerExampleGradients(model, "sum") as engine:
        model(x).tanh().sum().backward()
        grads = engine.collect()  # no error: the engine cannot tell
    ref = _loop(model, lambda i: model(x[i : i + 1]).tanh().sum(), 4)
    assert not torch.allclose(grads["mid.weight"].dense(), ref["mid.weight"])  # and the numbers are wrong

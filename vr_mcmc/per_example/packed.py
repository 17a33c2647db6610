"""Per-example gradients of RNN/GRU/LSTM called on a `PackedSequence`, examples in input order.

A packed batch holds sequences of different lengths, sorted by length inside the packing. The
call is unpacked into its batch-major padded form (input order, as ``pad_packed_sequence`` gives
it), and each example is replayed alone on its own length through the torch.func fallback:
examples of equal length go together (one vmap per distinct length). Example i's cotangents are
its rows of the gradients of the packed output and of ``h_n`` (and ``c_n``), which torch keeps in
input order. The result is in input order, never in the packing's sorted order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .representations import Dense, PerExampleGradient

__all__ = ["is_packed_call", "packed_batch_size", "packed_rnn_rule"]


def is_packed_call(module: nn.Module, args: tuple) -> bool:
    """Whether ``module`` is a recurrent layer called on a PackedSequence."""
    return isinstance(module, nn.RNNBase) and bool(args) and isinstance(args[0], PackedSequence)


def packed_batch_size(packed: PackedSequence) -> int:
    """Number of sequences in a packed batch."""
    return int(packed.batch_sizes[0]) if packed.batch_sizes.numel() else 0


class _OneSequence(nn.Module):
    """``rnn`` on batch-major padded sequences of one length, hidden states batch-major too."""

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, *hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        hx = tuple(h.transpose(0, 1) for h in hidden)
        if not hx:
            out, h_n = self.rnn(x)
        else:
            out, h_n = self.rnn(x, hx if len(hx) == 2 else hx[0])
        if not self.rnn.batch_first:
            out = out.transpose(0, 1)
        h_n = h_n if isinstance(h_n, tuple) else (h_n,)
        return (out, *(h.transpose(0, 1) for h in h_n))


def _hidden_args(module: nn.RNNBase, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if hx is None:
        return ()
    hx = hx if isinstance(hx, tuple) else (hx,)
    return tuple(h.transpose(0, 1) for h in hx)  # torch takes hx in input order: [layers, B, H] -> [B, layers, H]


def packed_rnn_rule(
    module: nn.RNNBase,
    name: str,
    args: tuple,
    kwargs: dict,
    outputs: list[torch.Tensor],
    grad_outputs: list[torch.Tensor | None],
    fallback: Any,
    **options: Any,
) -> dict[str, PerExampleGradient]:
    """Dense per-example gradients of ``module``'s parameters for a call on a PackedSequence.

    ``outputs``: the call's flattened outputs (packed data, its index tensors, then h_n (, c_n));
    ``fallback``: the torch.func fallback, run once per distinct sequence length.
    """
    packed: PackedSequence = args[0]
    n_hidden = 2 if isinstance(module, nn.LSTM) else 1
    data, hidden = outputs[0], outputs[-n_hidden:]
    data_grad, hidden_grads = grad_outputs[0], grad_outputs[-n_hidden:]
    x, lengths = pad_packed_sequence(packed, batch_first=True)
    out = pad_packed_sequence(packed._replace(data=data.detach()), batch_first=True)[0]
    if data_grad is None:
        data_grad = torch.zeros_like(data)
    out_grad = pad_packed_sequence(packed._replace(data=data_grad), batch_first=True)[0]
    hidden = [h.detach().transpose(0, 1) for h in hidden]
    hidden_grads = [None if g is None else g.transpose(0, 1) for g in hidden_grads]
    h0 = _hidden_args(module, args, kwargs)
    adapter = _OneSequence(module)
    b = x.shape[0]
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    grads = {n: p.new_zeros(b, *p.shape) for n, p in trainable.items()}
    lengths = lengths.to(x.device)
    for length in torch.unique(lengths).tolist():
        idx = (lengths == length).nonzero().squeeze(1)
        group_out = [out[idx, :length], *(h[idx] for h in hidden)]
        group_grads = [out_grad[idx, :length], *(None if g is None else g[idx] for g in hidden_grads)]
        found = fallback(
            adapter, name, (x[idx, :length], *(h[idx] for h in h0)), {}, group_out,
            [t._version for t in group_out], group_grads, idx.numel(), **options,
        )
        for key, rep in found.items():
            grads[key.removeprefix("rnn.")][idx] = rep.dense().to(grads[key.removeprefix("rnn.")].dtype)
    return {n: Dense(g) for n, g in grads.items()}

"""nn.MultiheadAttention (batch_first): its four projections are Linear layers on known activations.

The output is ``out_proj(attention(q, k, v))`` with ``q = query W_qᵀ + b_q`` (k, v alike). Example
i's gradients are those of Linear layers: ``Σ_t dQ_itᵀ query_it`` for W_q, and ``Σ_t dZ_itᵀ O_it``
for ``out_proj.weight`` with O the attention output. O and the gradients dQ, dK, dV at the
projections' outputs are recomputed from the saved inputs and the captured output gradient dZ:
the three input projections (one matmul for self-attention), scaled dot-product attention and
its backward to q, k, v, with no weight gradients and no per-example replay. Self-attention, and
cross-attention with as many keys as queries, stay `Factored` (one factor pair per projection);
otherwise the in-projection is `Dense`.

Supported: masks (``attn_mask``, ``key_padding_mask``, ``is_causal``), separate key/value
dimensions. Not supported by this rule (the module goes through the torch.func fallback):
``bias_k``/``bias_v``, ``add_zero_attn``. Dropout on the attention weights in training mode draws
random numbers the recomputation cannot repeat and is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedLayerError
from ..registry import register_rule
from ..representations import Dense, Factored, PerExampleGradient
from .linear import factored_or_dense

_NAMES = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
          "is_causal")


def attention_rule_applies(module: nn.MultiheadAttention) -> bool:
    """Whether the dedicated rule covers this module's configuration."""
    return module.bias_k is None and module.bias_v is None and not module.add_zero_attn


def _additive_mask(
    module: nn.MultiheadAttention, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
    b: int, t: int, s: int, dtype: torch.dtype,
) -> torch.Tensor | None:
    """The float mask [B or 1, H or 1, T, S] that multi_head_attention_forward adds to the scores."""
    mask = None
    if attn_mask is not None:
        mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                 target_type=dtype, check_other=False)
        mask = mask.view(1, 1, t, s) if mask.dim() == 2 else mask.view(b, module.num_heads, t, s)
    if key_padding_mask is not None:
        pad = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask", other_type=None,
                                other_name="", target_type=dtype, check_other=False).view(b, 1, 1, s)
        mask = pad if mask is None else mask + pad
    return mask


def _in_weights(module: nn.MultiheadAttention) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    e = module.embed_dim
    bias = module.in_proj_bias
    if module._qkv_same_embed_dim:
        ws = module.in_proj_weight.detach().chunk(3)
    else:
        ws = (module.q_proj_weight.detach(), module.k_proj_weight.detach(), module.v_proj_weight.detach())
    bs = [None] * 3 if bias is None else [bias.detach()[j * e : (j + 1) * e] for j in range(3)]
    return list(zip(ws, bs))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two (detached) tensors are views of the same values: self-attention's query, key and value."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


@register_rule(nn.MultiheadAttention, children=True, applies=attention_rule_applies)
def attention_rule(module: nn.MultiheadAttention, inputs: tuple,
                   grad_output: torch.Tensor) -> dict[str, PerExampleGradient]:
    if module.training and module.dropout > 0:
        raise UnsupportedLayerError(
            f"{module!r} applies dropout {module.dropout} to its attention weights in training mode: random "
            "numbers that per-example gradients cannot be recomputed with. Use dropout=0 or eval mode."
        )
    args = dict(zip(_NAMES, (*inputs, *[None] * (len(_NAMES) - len(inputs)))))
    query, key, value = args["query"], args["key"], args["value"]
    if query.dim() != 3:
        raise UnsupportedLayerError(f"{module!r} received an unbatched query {tuple(query.shape)}")
    b, t, e = query.shape
    s = key.shape[1]
    h = module.num_heads
    d = e // h
    weights = _in_weights(module)
    self_attention = _same(query, key) and _same(key, value)
    with torch.no_grad():
        if self_attention and module._qkv_same_embed_dim:
            bias = None if module.in_proj_bias is None else module.in_proj_bias.detach()
            projected = F.linear(query, module.in_proj_weight.detach(), bias).chunk(3, dim=-1)
        else:
            projected = [F.linear(x, w, bb) for x, (w, bb) in zip((query, key, value), weights)]
    q, k, v = (p.detach().requires_grad_(True) for p in projected)
    mask = _additive_mask(module, args["attn_mask"], args["key_padding_mask"], b, t, s, q.dtype)
    with torch.enable_grad():
        heads = [x.view(b, -1, h, d).transpose(1, 2) for x in (q, k, v)]
        o = F.scaled_dot_product_attention(*heads, attn_mask=mask).transpose(1, 2).reshape(b, t, e)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), grad_output @ module.out_proj.weight.detach())
    out: dict[str, PerExampleGradient] = {}
    out_proj = module.out_proj
    if out_proj.weight.requires_grad:
        out["out_proj.weight"] = factored_or_dense(o.detach(), grad_output, out_proj.weight.shape)
    if out_proj.bias is not None and out_proj.bias.requires_grad:
        out["out_proj.bias"] = Dense.from_terms(grad_output)
    if module.in_proj_bias is not None and module.in_proj_bias.requires_grad:
        if dq.shape[1] == dk.shape[1]:
            terms = torch.cat([dq, dk, dv], 2)
        else:  # block rows: query positions feed b_q, key positions b_k and b_v
            terms = torch.zeros(b, t + 2 * s, 3 * e, dtype=dq.dtype, device=dq.device)
            terms[:, :t, :e], terms[:, t : t + s, e : 2 * e], terms[:, t + s :, 2 * e :] = dq, dk, dv
        out["in_proj_bias"] = Dense(torch.cat([g.sum(1) for g in (dq, dk, dv)], 1), terms)
    grads = (dq, dk, dv)
    if module._qkv_same_embed_dim:
        if module.in_proj_weight.requires_grad:
            if self_attention:
                out["in_proj_weight"] = factored_or_dense(query, torch.cat(grads, 2), module.in_proj_weight.shape)
            elif t == s and 3 * t * 2 * e <= 3 * e * e:
                out["in_proj_weight"] = Factored(torch.stack((query, key, value), 1), torch.stack(grads, 1),
                                                 module.in_proj_weight.shape)
            else:
                out["in_proj_weight"] = Dense(torch.cat(
                    [Factored(x, g).dense() for x, g in zip((query, key, value), grads)], 1))
    else:
        for name, x, g in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), (query, key, value), grads):
            if getattr(module, name).requires_grad:
                out[name] = factored_or_dense(x, g, getattr(module, name).shape)
    return out

"""Causal attention inside each row of a packed sequence, for passes that run a backward.

The forward engine's `engine._packed_attention` calls the fused CPU flash kernel once per row.
Its backward is slow at the short rows of instruction data: measured on this CPU (one thread,
bf16, SmolLM2's 9 query / 3 KV heads of 64), forward + backward of one row took 1.28 / 2.25 /
6.2 / 7.5 / 26 ms at 48 / 96 / 175 / 256 / 512 tokens with flash, and 0.33 / 0.61 / 1.8 / 3.8 /
19 ms as two batched matmuls and a softmax (below), whose gradients differ from flash's by the
same bf16 rounding (0.5-0.8% relative). So rows up to `BMM_MAX_TOKENS` run as

    S = (q * scale) K^T      (the query heads of one KV head stacked: one bmm per row, no copy of K)
    P = softmax(S + causal mask)
    O = P V

and longer rows keep the flash kernel (the [heads, n, n] scores grow with n^2).

    with PackedGradAttention(body):       # the body's config points here inside the block
        body(inputs_embeds=..., position_ids=..., thresher_bounds=bounds)
"""

from __future__ import annotations

import functools
import itertools

NAME = "thresher_packed_grad"      # the name under transformers' AttentionInterface
BMM_MAX_TOKENS = 384               # longer rows use the flash kernel


@functools.lru_cache(maxsize=64)
def _causal_mask(n: int, device: str):
    import torch

    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def _row_bmm(q, k, v, scale: float):
    """One row: q [H, n, D], k / v [Hkv, n, D] -> [H, n, D]; query head h reads KV head h // rep."""
    import torch

    H, n, D = q.shape
    Hkv = k.shape[0]
    rep = H // Hkv
    s = torch.bmm((q * scale).reshape(Hkv, rep * n, D), k.transpose(1, 2)).view(Hkv, rep, n, n)
    s = s.masked_fill(_causal_mask(n, str(q.device)), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.bmm(p.view(Hkv, rep * n, n), v).view(H, n, D)


def packed_attention_bmm(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         **kwargs):
    """`engine._packed_attention`'s contract (query [1, H, T, D], key/value [1, Hkv, T, D], row
    bounds in `thresher_bounds`; returns [1, T, H, D]), rows of up to BMM_MAX_TOKENS by bmm."""
    import torch
    import torch.nn.functional as F

    bounds = kwargs["thresher_bounds"]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for s, e in itertools.pairwise(bounds):
        q, k, v = query[0, :, s:e], key[0, :, s:e], value[0, :, s:e]
        if e - s <= BMM_MAX_TOKENS:
            o = _row_bmm(q, k, v, scale)
        else:
            o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                               scale=scale, enable_gqa=gqa)[0]
        rows.append(o.transpose(0, 1))
    return torch.cat(rows)[None], None


class PackedGradAttention:
    """Context: the body's config uses `packed_attention_bmm` inside, its own attention after."""

    def __init__(self, body):
        self.cfg = body.config

    def __enter__(self):
        from transformers import AttentionInterface

        if NAME not in AttentionInterface._global_mapping:
            AttentionInterface.register(NAME, packed_attention_bmm)
        self.saved = self.cfg._attn_implementation
        self.cfg._attn_implementation = NAME

    def __exit__(self, *exc):
        self.cfg._attn_implementation = self.saved

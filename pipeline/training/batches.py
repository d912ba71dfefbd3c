"""The trainer's input: rows encoded into examples (response-only loss masks, optional Q-Tuning
token masks), length-grouped batches, and the loss of one micro-batch (packed rows on a CPU,
padded batches elsewhere; the LM head only on loss positions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from thresher.pipeline.models.chat import encode

MEGABATCH = 50


@dataclass
class Example:
    id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray


def make_examples(tok, rows: list[dict], max_tokens: int,
                  token_masks: dict | None = None) -> tuple[list[Example], list[str], int]:
    """Encoded rows; the ids left with no loss token within max_tokens (long prompts); and how
    many rows a token-mask file drops whole (Q-Tuning's dropped samples), also left out."""
    out, empty, masked_out = [], [], 0
    for r in rows:
        e = encode(tok, r, max_tokens)
        mask = e.loss_mask
        if token_masks is not None:
            if r["id"] not in token_masks:
                raise KeyError(f"token-mask file has no entry for row {r['id']!r}")
            ids, keep = token_masks[r["id"]]
            if len(ids) != len(e.input_ids) or not np.array_equal(ids, e.input_ids):
                raise ValueError(f"row {r['id']!r}: token-mask file was made with another "
                                 "tokenizer or max_tokens (input_ids differ)")
            if e.loss_mask.any() and not (mask & keep).any():
                masked_out += 1
                continue
            mask = mask & keep
        if mask.any():
            out.append(Example(r["id"], e.input_ids, mask))
        else:
            empty.append(r["id"])
    return out, empty, masked_out


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-grouped batches: a seeded permutation cut into megabatches of 50 batches, each
    sorted by length (longest first) and cut into batches (HF's LengthGroupedSampler), then the
    batch order shuffled. A pure function of its arguments, so the data order after a resume is
    the order of the uninterrupted run."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    mega = batch_size * MEGABATCH
    batches = []
    for s in range(0, len(perm), mega):
        chunk = sorted(perm[s:s + mega].tolist(), key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: list[Example], pad_id: int):
    import torch

    L = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), L), dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.from_numpy(e.input_ids)
        att[i, :n] = 1
        mask[i, :n] = torch.from_numpy(e.loss_mask)
    return ids, att, mask


def masked_loss(model, parts, ids, att, mask):
    """Mean cross-entropy over the masked positions (position t scores token t).

    When the logits are exactly head(final hidden state) (`engine._body_and_head`), the LM head
    runs only on the positions that predict a loss token, as in the forward engine: prompt
    positions never reach the vocabulary projection (less compute, no [B, T, V] logits)."""
    import torch.nn.functional as F

    loss_mask = mask[:, 1:]
    if parts is not None:
        body, head = parts
        hidden = body(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][loss_mask])
    else:
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1][loss_mask]
    return F.cross_entropy(logits.float(), ids[:, 1:][loss_mask])


def packed_loss(parts, batch: list[Example], device):
    """`masked_loss` of a batch packed into one unpadded sequence: position ids restart at every
    row and attention stays inside each row (the forward engine's `_packed_attention`), so each
    row sees what it sees alone; no padding tokens go through the body. Returns (loss, tokens)."""
    import torch
    import torch.nn.functional as F
    from thresher.pipeline.models.engine import _PackedAttention

    body, head = parts
    lengths = np.array([len(e.input_ids) for e in batch])
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    lm = np.concatenate([e.loss_mask for e in batch])
    lm[bounds[:-1]] = False                           # a row's first token has no prediction
    ids = torch.from_numpy(np.concatenate([e.input_ids for e in batch])).to(device)
    pos = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths])).to(device)
    sel = torch.from_numpy(lm[1:]).to(device)
    with _PackedAttention(body):
        hidden = body(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                      thresher_bounds=bounds.tolist()).last_hidden_state[0]
    logits = head(hidden[:-1][sel])
    return F.cross_entropy(logits.float(), ids[1:][sel]), int(sel.sum())


def batch_loss(model, parts, pack: bool, batch: list[Example], pad_id: int, device):
    """(mean loss over the batch's loss tokens, their count): packed rows on a CPU (no padding,
    `packed_loss`), padded batches elsewhere (`masked_loss`)."""
    if pack:
        return packed_loss(parts, batch, device)
    ids, att, mask = (t.to(device) for t in collate(batch, pad_id))
    return masked_loss(model, parts, ids, att, mask), int(mask[:, 1:].sum())

"""Turn canonical rows into token ids plus a loss mask, the one way every model stage does it.

Chat rows are rendered with the tokenizer's own chat template; the loss mask covers the
assistant turns only (their content and the end-of-turn marker), found by rendering each
conversation prefix and mapping character spans to tokens through the fast tokenizer's offsets.
Plain-text rows score every token. `response_only=False` scores the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Used only when a tokenizer has no chat template (e.g. tiny test tokenizers); ChatML, as SmolLM2.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


@dataclass
class Encoded:
    input_ids: np.ndarray   # int64 [T]
    loss_mask: np.ndarray   # bool  [T]; position t scores the prediction of token t
    truncated: bool


def _render(tok, messages, add_generation_prompt=False) -> str:
    template = None if tok.chat_template else FALLBACK_TEMPLATE
    return tok.apply_chat_template(messages, tokenize=False, chat_template=template,
                                   add_generation_prompt=add_generation_prompt)


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = _render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tok, messages[:i], add_generation_prompt=True))
        end = len(_render(tok, messages[: i + 1]))
        if full[:end] != _render(tok, messages[: i + 1]):
            raise ValueError("chat template does not render conversations prefix-consistently; "
                             "response masks cannot be derived")
        spans.append((start, end))
    return full, spans


def encode(tok, row: dict, max_tokens: int, response_only: bool = True) -> Encoded:
    if row["kind"] == "text" or row.get("messages") is None:
        enc = tok(row["text"], add_special_tokens=True, truncation=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        mask = np.ones(len(ids), dtype=bool)
    else:
        text, spans = assistant_spans(tok, row["messages"])
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if response_only:
            offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
            mid = offsets[:, 1]  # a token belongs to the span that holds its last character
            mask = np.zeros(len(ids), dtype=bool)
            for s, e in spans:
                mask |= (mid > s) & (mid <= e)
        else:
            mask = np.ones(len(ids), dtype=bool)
    mask[0] = False  # the first token has no prediction
    truncated = len(ids) > max_tokens
    if truncated:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return Encoded(ids, mask, truncated)


def prompt_text(tok, messages: list[dict]) -> str:
    """The conversation up to (not including) its last assistant turn, ready for generation."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return _render(tok, messages[:last], add_generation_prompt=True)

"""LLM ratings read DEITA's way: one forward pass per prompt, no sampling.

    rater = Rater(model, tokenizer, load_rubric("edu"), max_tokens=1024)
    out = rater(rows)      # {"rating", "complexity", "quality", "n_tokens", "truncated", "reason"}

For each prompt (a rubric question filled from a row, `pipeline/models/rubrics.py`), the model
reads the prompt and the answer prefix ("Educational score:"); at the last position only the
logits of the rating tokens are taken (one small GEMV against those rows of the LM head, never
the vocabulary), and the rating is their expected value:

    rating = sum_k value_k * softmax(logits[label tokens])_k      (DEITA, scorer/base.py)

Rows: a "text" rubric rates `row_text(row, part)` (plain text, or the conversation); a "turns"
rubric rates every user/assistant turn pair and combines them DEITA's way (sum over turns of the
product of the questions' values; `complexity` and `quality` are their means over turns). A row
that cannot be rated (no text, a text row under a turns rubric, no turn pair) gets no rating and
a reason, which the stage counts; DEITA's 3.0 for a failure is not used.

Long fields are cut (by tokens, the longest first) so the whole prompt fits `max_tokens`; the
template and the answer prefix are never cut. Batching is the forward engine's
(`batching.pack_rows` packed sequences on a CPU, `length_batches` padded batches elsewhere).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
from thresher.pipeline.io.schema import row_text
from thresher.pipeline.models.batching import _in_workers, length_batches, pack_rows
from thresher.pipeline.models.chat import FALLBACK_TEMPLATE
from thresher.pipeline.models.engine import (
    _body_and_head,
    _model_device,
    _PackedAttention,
    default_batch_tokens,
    packing_supported,
)
from thresher.pipeline.models.rubrics import FIELDS, Question, Rubric

RATING_VERSION = 1
SENTINEL = "\x00{}\x00"


def answer_tokens(tok, prefix: str, labels: tuple[str, ...]) -> tuple[str, list[int]]:
    """(the answer prefix as used, the token id each label takes right after it), tokenised as
    the prompt's last piece.

    A prefix ending in a space is kept when the tokenizer gives the space a token of its own and
    each label one more (SmolLM2: ":", " ", "3"); where a label absorbs the space (" 3" one token)
    the space moves into the labels. A label that is not one token is a user error naming it."""
    tries = [(prefix, labels)]
    if prefix != prefix.rstrip():
        space = prefix[len(prefix.rstrip()):]
        tries.append((prefix.rstrip(), tuple(space + label for label in labels)))
    for pre, labs in tries:
        base = tok(pre, add_special_tokens=False)["input_ids"]
        out = []
        for label in labs:
            ids = tok(pre + label, add_special_tokens=False)["input_ids"]
            if len(ids) != len(base) + 1 or ids[:len(base)] != base:
                break
            out.append(int(ids[-1]))
        if len(out) == len(labs) and len(set(out)) == len(out):
            return pre, out
    raise ValueError(f"rating labels {', '.join(labels)} after {prefix!r} are not one distinct "
                     "token each for this model's tokenizer; choose other labels or another model")


class Prompt:
    """A question's prompt as literal pieces around its fields, each tokenised once."""

    def __init__(self, tok, question: Question, chat: bool):
        text = question.template
        for f in FIELDS:
            text = text.replace("{" + f + "}", SENTINEL.format(f))
        if chat:
            template = None if tok.chat_template else FALLBACK_TEMPLATE
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           chat_template=template, add_generation_prompt=True)
            start: list[int] = []
        else:
            start = list(tok("", add_special_tokens=True)["input_ids"])   # BOS, if the model uses one
        parts = text.split("\x00")
        self.pieces: list[list[int] | str] = []     # token ids (literal) or a field name
        for i, p in enumerate(parts):
            if i % 2:
                self.pieces.append(p)
            elif p:
                self.pieces.append(list(tok(p, add_special_tokens=False)["input_ids"]))
        self.start = start
        prefix, self.label_ids = answer_tokens(tok, question.prefix, question.labels)
        self.prefix = list(tok(prefix, add_special_tokens=False)["input_ids"])
        self.fixed = len(start) + len(self.prefix) + sum(len(p) for p in self.pieces
                                                          if isinstance(p, list))

    def ids(self, tok, values: dict[str, str], max_tokens: int) -> tuple[list[int], bool]:
        """The prompt's token ids with each field's text, the longest fields cut to fit."""
        field_ids = {f: list(tok(values[f], add_special_tokens=False)["input_ids"])
                     for f in {p for p in self.pieces if isinstance(p, str)}}
        room = max_tokens - self.fixed
        if room < len(field_ids):
            raise ValueError(f"max_tokens {max_tokens} leaves no room for the row's text (the "
                             f"prompt alone takes {self.fixed} tokens)")
        truncated = False
        while sum(len(v) for v in field_ids.values()) > room:
            longest = max(field_ids, key=lambda f: len(field_ids[f]))
            others = sum(len(v) for f, v in field_ids.items() if f != longest)
            field_ids[longest] = field_ids[longest][:max(1, room - others)]
            truncated = True
        out = list(self.start)
        for p in self.pieces:
            out.extend(field_ids[p] if isinstance(p, str) else p)
        return out + self.prefix, truncated


def turn_pairs(row: dict) -> list[tuple[str, str]]:
    """(instruction, response) for every assistant turn that follows a user turn."""
    pairs, last_user = [], None
    for m in row.get("messages") or []:
        if m["role"] == "user":
            last_user = m["content"]
        elif m["role"] == "assistant" and last_user is not None:
            pairs.append((last_user, m["content"]))
            last_user = None
    return pairs


def _row_items(rubric: Rubric, row: dict, part: str) -> tuple[list[dict], str | None]:
    """The field values to rate for one row (one per text, one per turn pair), or a reason."""
    if rubric.rows == "text":
        try:
            text = row_text(row, part)
        except StopIteration:
            return [], f"no {part} turn to rate"
        if not text or not text.strip():
            return [], "empty text"
        return [{"text": text}], None
    if row.get("kind") == "text" or row.get("messages") is None:
        return [], f"text row: the {rubric.name} rubric rates chat turns"
    pairs = [(i, r) for i, r in turn_pairs(row) if i.strip() and r.strip()]
    if not pairs:
        return [], "no user/assistant turn pair with text"
    return [{"instruction": i, "response": r} for i, r in pairs], None


class Rater:
    """A loaded causal LM and a rubric; `__call__(rows)` rates one shard of canonical rows."""

    def __init__(self, model, tokenizer, rubric: Rubric, max_tokens: int = 1024,
                 part: str = "conversation", batch_tokens: int | None = None):
        self.model, self.tok, self.rubric, self.part = model.eval(), tokenizer, rubric, part
        self.max_tokens = max_tokens
        self.prompts = [Prompt(tokenizer, q, rubric.chat) for q in rubric.questions]
        self.parts = _body_and_head(model)
        self.device = _model_device(model)
        self.batch_tokens = max(batch_tokens or default_batch_tokens(self.device.type), max_tokens)
        self.pack = (self.device.type == "cpu" and self.parts is not None
                     and packing_supported(self.parts[0]))
        self.n_params = sum(p.numel() for p in model.parameters())

    def __call__(self, rows: list[dict]) -> dict:
        n = len(rows)
        seqs, owner = [], []            # one sequence per (row, item, question)
        truncated = np.zeros(n, dtype=bool)
        reasons: list[str | None] = [None] * n
        for i, row in enumerate(rows):
            items, reasons[i] = _row_items(self.rubric, row, self.part)
            for j, item in enumerate(items):
                for q, prompt in enumerate(self.prompts):
                    ids, cut = prompt.ids(self.tok, item, self.max_tokens)
                    truncated[i] |= cut
                    seqs.append(np.asarray(ids, dtype=np.int64))
                    owner.append((i, j, q))
        expected = self._expected(seqs, owner)
        return self._combine(rows, owner, expected, truncated, reasons, seqs)

    def _expected(self, seqs: list[np.ndarray], owner: list[tuple]) -> np.ndarray:
        """The expected rating of every sequence (float64)."""
        out = np.zeros(len(seqs), dtype=np.float64)
        if not seqs:
            return out
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        batches = (pack_rows if self.pack else length_batches)(lengths, self.batch_tokens)
        qs = np.array([o[2] for o in owner])
        run = functools.partial(self._batch, seqs, lengths, qs)
        import torch

        workers = torch.get_num_threads() if self.device.type == "cpu" else 1
        with _PackedAttention(self.parts[0]) if self.pack else contextlib.nullcontext():
            for batch, res in _in_workers(run, batches, workers):
                out[batch] = res
        return out

    def _batch(self, seqs, lengths, qs, batch: np.ndarray) -> np.ndarray:
        """Expected ratings of one batch: the last position's hidden state against the label
        rows of the LM head, softmax, expectation (all in float32 then float64)."""
        import torch

        hidden_last = self._last_hidden(seqs, lengths, batch)            # [B, d] or logits
        out = np.zeros(len(batch), dtype=np.float64)
        for q, prompt in enumerate(self.prompts):
            sel = np.flatnonzero(qs[batch] == q)
            if not len(sel):
                continue
            idx = torch.tensor(prompt.label_ids, device=self.device)
            h = hidden_last[torch.from_numpy(sel).to(self.device)]
            if self.parts is not None:
                head = self.parts[1]
                logits = h.float() @ head.weight[idx].float().T
                if getattr(head, "bias", None) is not None:
                    logits = logits + head.bias[idx].float()
            else:
                logits = h[:, idx].float()
            p = torch.softmax(logits, dim=-1).double().cpu().numpy()
            out[sel] = p @ np.asarray(self.rubric.questions[q].values, dtype=np.float64)
        return out

    def _last_hidden(self, seqs, lengths, batch):
        import torch

        if self.pack:
            body = self.parts[0]
            ids = torch.from_numpy(np.concatenate([seqs[i] for i in batch])).to(self.device)
            bounds = np.concatenate([[0], np.cumsum(lengths[batch])])
            starts = torch.from_numpy(np.repeat(bounds[:-1], lengths[batch])).to(self.device)
            pos = torch.arange(len(ids), device=self.device) - starts
            hidden = body(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                          thresher_bounds=bounds.tolist()).last_hidden_state[0]
            return hidden[torch.from_numpy(bounds[1:] - 1).to(self.device)]
        T = int(lengths[batch].max())
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        ids = np.full((len(batch), T), pad, dtype=np.int64)
        am = np.zeros((len(batch), T), dtype=np.int64)
        for j, i in enumerate(batch):
            ids[j, :lengths[i]], am[j, :lengths[i]] = seqs[i], 1
        ids_t, am_t = torch.from_numpy(ids).to(self.device), torch.from_numpy(am).to(self.device)
        last = torch.from_numpy(lengths[batch] - 1).to(self.device)
        rows = torch.arange(len(batch), device=self.device)
        if self.parts is not None:
            hidden = self.parts[0](input_ids=ids_t, attention_mask=am_t,
                                   use_cache=False).last_hidden_state
            return hidden[rows, last]
        return self.model(input_ids=ids_t, attention_mask=am_t, use_cache=False).logits[rows, last]

    def _combine(self, rows, owner, expected, truncated, reasons, seqs) -> dict:
        n = len(rows)
        nq = len(self.prompts)
        per_q = np.full((n, nq), np.nan)
        rating = np.full(n, np.nan)
        n_tokens = np.zeros(n, dtype=np.int64)
        values: dict[int, list[np.ndarray]] = {}
        for k, (i, j, q) in enumerate(owner):
            n_tokens[i] += len(seqs[k])
            values.setdefault(i, []).append(expected[k])
        for i, vals in values.items():
            turns = np.asarray(vals).reshape(-1, nq)            # [items, questions]
            per_q[i] = turns.mean(axis=0)
            rating[i] = turns[0, 0] if self.rubric.rows == "text" else float(turns.prod(1).sum())
        out = {"rating": rating, "n_tokens": n_tokens, "truncated": truncated, "reason": reasons}
        if self.rubric.rows == "turns":
            for q, question in enumerate(self.rubric.questions):
                out[question.name] = per_q[:, q]
        return out

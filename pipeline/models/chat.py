"""Turn canonical rows into token ids plus a loss mask, the one way every model stage does it.

Chat rows are rendered with the tokenizer's own chat template; the loss mask covers the
assistant turns only (their content and the end-of-turn marker), found by rendering each
conversation prefix and mapping character spans to tokens through the fast tokenizer's offsets.
Plain-text rows score every token. `response_only=False` scores the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
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
        try:
            text, spans = assistant_spans(tok, row["messages"])
        except (ValueError, jinja2.exceptions.TemplateError) as e:   # the template refused it
            raise ValueError(f"row {row.get('id')!r}: the chat template cannot render it "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); pools "
                             "ingested now quarantine such rows: re-run `thresher ingest`") from e
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


class RenderCheck:
    """Whether the default chat model's template renders a conversation, for ingest's
    quarantine: the template's text only (no tokenizer, no weights), compiled once with
    jinja2's sandbox as transformers compiles it. `check(messages)` is the reason a row cannot
    be rendered, or None.

    The template is the default LM's (`chat_template.jinja` or `tokenizer_config.json` of its
    local copy); before that copy exists, and for a model without a template, the ChatML
    fallback every encode uses. What a template refuses is a sequence of roles (turns that do
    not alternate, a misplaced system turn, an unknown role): contents are plain strings by
    now. So each distinct sequence of roles is rendered once, with the first row that has it,
    and the verdict is reused (rendering every row cost ~19 us a row, +25% on ingest;
    bench/ingest_checks.py)."""

    def __init__(self, template: str | None = None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(template or FALLBACK_TEMPLATE)
        self.errors = (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError,
                       IndexError, AttributeError)
        self.verdicts: dict[tuple[str, ...], str | None] = {}

    @classmethod
    def default(cls) -> RenderCheck:
        return cls(default_template())

    def check(self, messages: list[dict]) -> str | None:
        roles = tuple(m["role"] for m in messages)
        if roles not in self.verdicts:
            self.verdicts[roles] = self.render(messages)
        return self.verdicts[roles]

    def render(self, messages: list[dict]) -> str | None:
        """The conversation, and its prompt before each assistant turn (as `encode` renders
        them for the loss mask)."""
        try:
            self.template.render(messages=messages, add_generation_prompt=False)
            for i, m in enumerate(messages):
                if m["role"] == "assistant":
                    self.template.render(messages=messages[:i], add_generation_prompt=True)
            return None
        except self.errors as e:
            return f"the default chat template cannot render this conversation: {e}"


def default_template() -> str | None:
    """The default LM's chat template text, read from its local copy (never converted or
    downloaded for this); None when there is none yet."""
    import json
    from pathlib import Path

    from thresher.pipeline.models.resolve import DEFAULT_LM, MissingPackage, resolve

    try:
        local = Path(resolve(DEFAULT_LM).path)
    except (MissingPackage, ValueError, OSError):
        return None
    if (local / "chat_template.jinja").is_file():
        return (local / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        template = json.loads((local / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    return template if isinstance(template, str) else None

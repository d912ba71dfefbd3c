"""Rating rubrics: the prompts a causal LM answers with one rating token, and how rows fill them.

    rubric = load_rubric("edu")            # FineWeb-Edu's educational value, 0-5 (text rows)
    rubric = load_rubric("deita")          # DEITA's complexity and quality, 1-6 (chat turns)
    rubric = load_rubric("my_rubric.yaml") # a user rubric (the same fields, YAML or JSON)

Both shipped rubrics are APPROXIMATIONS of the scorers they are named after:

- `edu` keeps the FineWeb-Edu annotation prompt's criteria verbatim (FineWeb paper, appendix F.1:
  Llama-3-70B-Instruct rated 450k web pages with it), but the original asks for a justification
  first and parses "Educational score: N" from the generated text; here the answer starts at
  "Educational score:" and the rating is read from that one position (no generation).
- `deita` uses DEITA's two prompts (`hkust-nlp/deita`, `selection/scorer/base.py`) verbatim,
  plus one sentence stating the 1-6 scale: DEITA's own scorers are LLaMA models fine-tuned to
  answer them, a generic instruction model has to be told the scale. With DEITA's released
  scorers on disk, `deita-raw` feeds them the prompts exactly as DEITA does (no chat template).

Every rubric is read DEITA's way (`pipeline/models/rating.py`): the expected value of the rating
over the softmax of the rating tokens' logits at the answer position.

A rubric file (YAML or JSON) has: name, approximates (what it stands in for), rows ("text": one
prompt per row from `{text}`; "turns": per user/assistant turn pair from `{instruction}` and
`{response}`, combined DEITA's way), chat (render through the model's chat template, default
true), questions: [{name, template, prefix, labels, values}], and optionally threshold (the cut
its authors use, on the rating).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FIELDS = ("text", "instruction", "response")

EDU_TEMPLATE = """Below is an extract from a web page. Evaluate whether the page has a high \
educational value and could be useful in an educational setting for teaching from primary school \
to grade school levels using the additive 5-point scoring system described below. Points are \
accumulated based on the satisfaction of each criterion:

- Add 1 point if the extract provides some basic information relevant to educational topics, \
even if it includes some irrelevant or non-academic content like advertisements and promotional \
material.
- Add another point if the extract addresses certain elements pertinent to education but does \
not align closely with educational standards. It might mix educational content with \
non-educational material, offering a superficial overview of potentially useful topics, or \
presenting information in a disorganized manner and incoherent writing style.
- Award a third point if the extract is appropriate for educational use and introduces key \
concepts relevant to school curricula. It is coherent though it may not be comprehensive or \
could include some extraneous information. It may resemble an introductory section of a \
textbook or a basic tutorial that is suitable for learning but has notable limitations like \
treating concepts that are too complex for grade school students.
- Grant a fourth point if the extract highly relevant and beneficial for educational purposes \
for a level not higher than grade school, exhibiting a clear and consistent writing style. It \
could be similar to a chapter from a textbook or a tutorial, offering substantial educational \
content, including exercises and solutions, with minimal irrelevant information, and the \
concepts aren't too advanced for grade school students. The content is coherent, focused, and \
valuable for structured learning.
- Bestow a fifth point if the extract is outstanding in its educational value, perfectly suited \
for teaching either at primary school or grade school. It follows detailed reasoning, the \
writing style is easy to follow and offers profound and thorough insights into the subject \
matter, devoid of any non-educational or complex content.

The extract: {text}.

After examining the extract:
- Conclude with the score using the format: "Educational score: <total points>\""""

DEITA_COMPLEXITY = ("You are a helpful assistant. Please identify the complexity score of the "
                    "following user query. \n##Query: {instruction}  \n")
DEITA_QUALITY = ("You are a helpful assistant. Please identify the quality score of the Response "
                 "corresponding to the Question. \n #Question#:\n{instruction}\n#Response#:\n"
                 "{response} \n")
SCALE_1_6 = "Answer with one score from 1 (lowest) to 6 (highest).\n"


@dataclass(frozen=True)
class Question:
    name: str
    template: str                  # the prompt, with {text} or {instruction} / {response}
    prefix: str                    # the start of the answer; the rating token follows it
    labels: tuple[str, ...]        # the rating tokens' text, e.g. "0".."5"
    values: tuple[float, ...]      # the value of each label

    def fields(self) -> list[str]:
        return [f for f in FIELDS if "{" + f + "}" in self.template]


@dataclass(frozen=True)
class Rubric:
    name: str
    approximates: str
    rows: str                          # "text" or "turns"
    questions: tuple[Question, ...]
    chat: bool = True
    threshold: float | None = None     # the published cut on the rating, if any
    source: str = field(default="built-in", compare=False)

    def as_dict(self) -> dict:
        return {"name": self.name, "approximates": self.approximates, "rows": self.rows,
                "chat": self.chat, "threshold": self.threshold,
                "questions": [q.__dict__ | {"labels": list(q.labels), "values": list(q.values)}
                              for q in self.questions]}


DIGITS_0_5 = tuple(str(i) for i in range(6))
DIGITS_1_6 = tuple(str(i) for i in range(1, 7))

BUILT_IN = {
    "edu": Rubric(
        name="edu", rows="text", threshold=2.5,
        approximates="an approximation of FineWeb-Edu's educational-value annotation (Llama-3-70B-Instruct, 0-5; "
                     "FineWeb paper appendix F.1), read from one forward pass",
        questions=(Question("rating", EDU_TEMPLATE, "Educational score: ", DIGITS_0_5,
                            tuple(float(i) for i in range(6))),)),
    "deita": Rubric(
        name="deita", rows="turns",
        approximates="an approximation of DEITA's complexity and quality scorers (hkust-nlp/deita, 1-6 each; "
                     "score = sum over turns of complexity x quality) with a generic LM",
        questions=(Question("complexity", DEITA_COMPLEXITY + SCALE_1_6, "##Complexity: ",
                            DIGITS_1_6, tuple(float(i) for i in range(1, 7))),
                   Question("quality", DEITA_QUALITY + SCALE_1_6, "##Quality: ", DIGITS_1_6,
                            tuple(float(i) for i in range(1, 7))))),
    "deita-raw": Rubric(
        name="deita-raw", rows="turns", chat=False,
        approximates="DEITA's prompts exactly as DEITA feeds its own scorers (no chat "
                     "template): for hkust-nlp/deita-complexity-scorer / -quality-scorer",
        questions=(Question("complexity", DEITA_COMPLEXITY, "##Complexity: ", DIGITS_1_6,
                            tuple(float(i) for i in range(1, 7))),
                   Question("quality", DEITA_QUALITY, "##Quality: ", DIGITS_1_6,
                            tuple(float(i) for i in range(1, 7))))),
}


def load_rubric(name: str) -> Rubric:
    """A built-in rubric by name, or a rubric file (YAML or JSON)."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"rubric {name!r}: not a built-in ({', '.join(BUILT_IN)}) and "
                                "no such file")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        else:
            spec = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable rubric ({str(e).splitlines()[0]})") from None
    return _from_spec(spec, path)


def _from_spec(spec, path: Path) -> Rubric:
    if not isinstance(spec, dict):
        raise TypeError(f"{path}: a rubric is a mapping with name, rows and questions")
    try:
        questions = tuple(_question(q, path) for q in spec["questions"])
        rubric = Rubric(name=str(spec["name"]), approximates=str(spec.get("approximates", "")),
                        rows=str(spec.get("rows", "text")), questions=questions,
                        chat=bool(spec.get("chat", True)),
                        threshold=None if spec.get("threshold") is None else float(spec["threshold"]),
                        source=str(path))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: rubric field missing or of the wrong type ({e})") from None
    check_rubric(rubric, str(path))
    return rubric


def _question(q: dict, path: Path) -> Question:
    labels = tuple(str(x) for x in q["labels"])
    values = tuple(float(x) for x in q.get("values", range(len(labels))))
    return Question(str(q["name"]), str(q["template"]), str(q.get("prefix", "")), labels, values)


def check_rubric(rubric: Rubric, where: str) -> None:
    if rubric.rows not in ("text", "turns"):
        raise ValueError(f"{where}: rows must be 'text' or 'turns', got {rubric.rows!r}")
    if not rubric.questions:
        raise ValueError(f"{where}: a rubric needs at least one question")
    if rubric.rows == "turns" and len(rubric.questions) > 2:
        raise ValueError(f"{where}: a turns rubric has one or two questions (complexity, quality)")
    for q in rubric.questions:
        want = {"text"} if rubric.rows == "text" else {"instruction", "response"}
        if not set(q.fields()) or not set(q.fields()) <= want:
            raise ValueError(f"{where}: question {q.name!r} must use "
                             f"{' / '.join('{' + f + '}' for f in sorted(want))} in its template")
        if len(q.labels) < 2 or len(q.labels) != len(q.values) or len(set(q.labels)) != len(q.labels):
            raise ValueError(f"{where}: question {q.name!r} needs 2+ distinct labels, one value each")

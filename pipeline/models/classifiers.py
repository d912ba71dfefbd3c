"""Quality-classifier files: what `thresher classifier train` writes and `--method classifier`
reads, plus the two published formats a user may have on disk. Nothing here unpickles.

    info = describe_model("edu-head/")     # ClassifierInfo: kind, task, threshold, part, ...
    ft = FastTextModel("model.bin")        # fastText's own binary format; p(hq) DCLM's way
    head = Head.load("edu-head/")          # safetensors weights + classifier.json

Kinds:
  fasttext   a fastText supervised model (`model.bin`), labels __label__hq / __label__cc as DCLM's;
             text normalised DCLM's way (`fasttext_text`); score = p(hq), read as DCLM's enricher
             does (top label, inverted when it is __label__cc)
  head       a linear (logistic / least-squares) or one-hidden-layer MLP head on a sentence
             embedder's vectors (`head.safetensors`): numpy only at prediction time
  hf         a Hugging Face sequence-classification directory with one regression output (the
             FineWeb-Edu classifier's format): score = clip(logit, 0, 5), 512 tokens

A directory written by `thresher classifier train` holds classifier.json (kind, task, text part,
threshold, held-out metrics, the training data's fingerprints) beside the model file. A bare
fastText `.bin` whose labels are DCLM's (__label__hq, __label__cc) is DCLM's classifier: its
published cut is p(hq) >= 0.018112 (`fasttext_filter.yaml`). A directory with a config.json of a
`...ForSequenceClassification` with one label is a FineWeb-Edu-format regressor: cut at 2.5
(NeMo Curator's `high_quality`; FineWeb-Edu keeps int_score >= 3).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from thresher.pipeline.io.schema import row_text

CLASSIFIER_JSON = "classifier.json"
FASTTEXT_FILE = "model.bin"
HEAD_FILE = "head.safetensors"
POSITIVE, NEGATIVE = "__label__hq", "__label__cc"
DCLM_THRESHOLD = 0.018112
FINEWEB_EDU_THRESHOLD = 2.5
FINEWEB_EDU_MAX_TOKENS = 512
FORMAT_VERSION = 1
FASTTEXT_MAGIC = 793712314          # the int32 every fastText model file starts with
PARTS = ("first_user", "conversation", "response")


@dataclass
class ClassifierInfo:
    kind: str                          # fasttext | head | hf
    task: str                          # binary (score = probability) | regression (score = value)
    part: str = "conversation"         # the text of a row the model reads
    threshold: float | None = None     # the cut: published, or chosen when training
    threshold_source: str = ""
    embedder: dict | None = None       # head: {model, identity, part, dtype, max_seq_length, dim}
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    published: str | None = None       # "dclm" | "fineweb-edu" for a published model's format
    clip: list[float] | None = None    # regression: predictions clipped to the labels' range
    format_version: int = FORMAT_VERSION

    def as_dict(self) -> dict:
        return asdict(self)


def fasttext_text(row: dict, part: str) -> str:
    """A row's text as fastText reads it: the part's text (a conversation's turn contents, no
    role names), then DCLM's normalisation, `" ".join(text.strip().splitlines())`."""
    if row.get("kind") == "chat" and row.get("messages") is not None and part == "conversation":
        text = "\n".join(m["content"] for m in row["messages"])
    else:
        text = row_text(row, part)
    return " ".join(text.strip().splitlines())


def part_text(row: dict, part: str) -> str | None:
    """The part's text, or None when the row has none (a chat row without that turn)."""
    try:
        text = row_text(row, part)
    except StopIteration:
        return None
    return text if text and text.strip() else None


def file_identity(path: Path) -> str:
    """A model's identity: size plus the first and last MiB of each file (large fastText models
    are gigabytes); a retrained model differs there, a copy does not."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        size = f.stat().st_size
        h.update(f"{rel}:{size}\n".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


def _is_fasttext(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and int.from_bytes(head, "little", signed=True) == FASTTEXT_MAGIC


def describe_model(path: str | Path) -> ClassifierInfo:
    """What a `--param model=PATH` holds, or a one-line ValueError saying why it is not a model."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such classifier file or directory")
    if path.is_file():
        if not _is_fasttext(path):
            raise ValueError(f"{path}: not a quality classifier (not a fastText model file, nor "
                             "a directory from `thresher classifier train` or a Hugging Face "
                             "sequence-classification model)")
        return ClassifierInfo("fasttext", "binary", "conversation", DCLM_THRESHOLD,
                              "published: DCLM keeps p(hq) >= 0.018112 (its top 10%)",
                              published="dclm")
    if (path / CLASSIFIER_JSON).is_file():
        return _read_info(path / CLASSIFIER_JSON)
    if (path / "config.json").is_file():
        return _describe_hf(path)
    raise ValueError(f"{path}: not a quality classifier directory (no {CLASSIFIER_JSON} from "
                     "`thresher classifier train`, no Hugging Face config.json)")


def _read_info(path: Path) -> ClassifierInfo:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        info = ClassifierInfo(**spec)
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable classifier description ({str(e).splitlines()[0]})") from None
    if info.format_version != FORMAT_VERSION:
        raise ValueError(f"{path}: classifier format {info.format_version}, this thresher reads "
                         f"{FORMAT_VERSION}; retrain it")
    if info.kind not in ("fasttext", "head") or info.task not in ("binary", "regression") \
            or info.part not in PARTS:
        raise ValueError(f"{path}: unknown kind {info.kind!r}, task {info.task!r} or part {info.part!r}")
    model_file = path.parent / (FASTTEXT_FILE if info.kind == "fasttext" else HEAD_FILE)
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file}: missing beside {path.name}")
    return info


def _describe_hf(path: Path) -> ClassifierInfo:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / 'config.json'}: unreadable ({e})") from None
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"{path}: a Hugging Face model but not a sequence classifier "
                         f"(architectures {archs}); expected the FineWeb-Edu classifier's format")
    n = cfg.get("num_labels", len(cfg.get("id2label") or {}) or 2)
    if n != 1:
        raise ValueError(f"{path}: a sequence classifier with {n} outputs; only single-output "
                         "regression heads (the FineWeb-Edu classifier's format) are supported")
    return ClassifierInfo("hf", "regression", "conversation", FINEWEB_EDU_THRESHOLD,
                          "published: FineWeb-Edu keeps score >= 2.5 (int_score >= 3)",
                          published="fineweb-edu")


class FastTextModel:
    """A fastText model loaded with the `fasttext` module (fasttext-numpy2, or the predict-only
    fasttext-predict: only single-string `predict` is used, which both provide)."""

    def __init__(self, path: str | Path):
        try:
            import fasttext
        except ModuleNotFoundError:
            raise ModuleNotFoundError("fastText classifiers need the fasttext module: pip install "
                                      "fasttext-numpy2 (or fasttext-predict to score only)") from None
        try:
            self.model = fasttext.load_model(str(path))
        except ValueError as e:
            raise ValueError(f"{path}: not a fastText model ({str(e).strip()})") from None
        labels, _ = self.model.predict("", k=-1)
        self.labels = sorted(labels)
        if self.labels != sorted([POSITIVE, NEGATIVE]):
            raise ValueError(f"{path}: a fastText model with labels {self.labels[:4]}; a quality "
                             f"classifier has {POSITIVE} and {NEGATIVE} (DCLM's)")

    def p_positive(self, text: str) -> float:
        """DCLM's reading: the top label's probability, inverted when the top label is the
        negative one (`quality_prediction_enrichers_calc_fasttext.py`)."""
        labels, probs = self.model.predict(text, k=1)
        p = min(float(probs[0]), 1.0)        # fastText adds 1e-5 to each probability
        return p if labels[0] == POSITIVE else 1.0 - p


@dataclass
class Head:
    """A small MLP on embedding vectors: layers of (W [in, out], b [out]), ReLU between them;
    the output is sigmoid(logit) for a binary task, the value itself for regression."""

    weights: list[tuple[np.ndarray, np.ndarray]]
    task: str

    def predict(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float32)
        for i, (w, b) in enumerate(self.weights):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        z = h[:, 0].astype(np.float64)
        return 1.0 / (1.0 + np.exp(-z)) if self.task == "binary" else z

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        tensors = {}
        for i, (w, b) in enumerate(self.weights):
            tensors[f"layer{i}.weight"] = np.ascontiguousarray(w, dtype=np.float32)
            tensors[f"layer{i}.bias"] = np.ascontiguousarray(b, dtype=np.float32)
        save_file(tensors, str(directory / HEAD_FILE), metadata={"task": self.task})

    @classmethod
    def load(cls, directory: Path) -> Head:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(directory) / HEAD_FILE
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: not a safetensors head ({str(e).splitlines()[0]})") from None
        n = len(tensors) // 2
        try:
            weights = [(tensors[f"layer{i}.weight"], tensors[f"layer{i}.bias"]) for i in range(n)]
        except KeyError as e:
            raise ValueError(f"{path}: missing tensor {e}") from None
        info = _read_info(Path(directory) / CLASSIFIER_JSON)
        for (w, b), (w2, _) in zip(weights, weights[1:] + [(None, None)]):
            if w.ndim != 2 or b.shape != (w.shape[1],) or (w2 is not None and w2.shape[0] != w.shape[1]):
                raise ValueError(f"{path}: layer shapes do not chain")
        if weights[-1][0].shape[1] != 1:
            raise ValueError(f"{path}: the last layer must have one output")
        return cls(weights, info.task)

"""The classifier-scores stage: a quality classifier (`pipeline/models/classifiers.py`) applied to
every pool row, cached per shard, on any executor.

    ClassifierScores(model="edu-head/")                # the stage, as `--method classifier` declares it
    res = run_stage(ClassifierScores(model="dclm.bin"), pool, store)
    res.frame()        # id, quality_score (+ int_score for a FineWeb-Edu-format model), reason

Per kind: fastText reads each row's normalised text; a head embeds the rows with the embedder it
was trained on (the same `ShardEmbedder` as the embedding stage, so the same vectors) and
applies its layers in numpy; a FineWeb-Edu-format model runs its encoder on the first 512 tokens
in length-sorted batches. A row the model cannot read (no text in the part it reads) gets no
score and a reason; the stage counts reasons in its statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
from thresher.pipeline.artifacts import ArtifactDir
from thresher.pipeline.models.classifiers import (
    FASTTEXT_FILE,
    FINEWEB_EDU_MAX_TOKENS,
    PARTS,
    ClassifierInfo,
    FastTextModel,
    Head,
    describe_model,
    fasttext_text,
    file_identity,
    part_text,
)
from thresher.pipeline.stage import (
    Resources,
    ShardResult,
    Stage,
    StageRun,
    concat_shard_tables,
    reason_counts,
)

SCORE = "quality_score"


@dataclass
class ClassifierResult:
    dir: ArtifactDir

    @property
    def fingerprint(self) -> str:
        return f"quality:{self.dir.key}"

    def frame(self) -> pl.DataFrame:
        """id, quality_score (null where unreadable), int_score (FineWeb-Edu format), reason."""
        return pl.read_parquet(self.dir.path("quality.parquet"))


class _FastTextWorker:
    def __init__(self, path: Path, info: ClassifierInfo, part: str):
        self.model = FastTextModel(path if path.is_file() else path / FASTTEXT_FILE)
        self.part = part

    def __call__(self, rows: list[dict]) -> tuple[np.ndarray, dict, list]:
        scores = np.full(len(rows), np.nan)
        reasons: list[str | None] = [None] * len(rows)
        for i, r in enumerate(rows):
            if part_text(r, self.part) is None:
                reasons[i] = f"no {self.part} text"
                continue
            scores[i] = self.model.p_positive(fasttext_text(r, self.part))
        return scores, {}, reasons


class _HeadWorker:
    def __init__(self, path: Path, info: ClassifierInfo, part: str, device: str, batch_size: int):
        from thresher.pipeline.models.resolve import model_identity
        from thresher.pipeline.stages.embed import ShardEmbedder

        emb = info.embedder or {}
        if model_identity(emb["model"]) != emb["identity"]:
            raise ValueError(f"{path}: the head was trained on embedder {emb['model']} "
                             f"({emb['identity']}), which now resolves to "
                             f"{model_identity(emb['model'])}; retrain the head")
        self.head, self.clip = Head.load(path), info.clip
        self.embedder = ShardEmbedder(emb["model"], part, device, emb.get("dtype"), batch_size,
                                      emb.get("max_seq_length"), emb.get("normalize", True))
        self.part, self.tokens = part, 0

    def __call__(self, rows: list[dict]) -> tuple[np.ndarray, dict, list]:
        ok = [i for i, r in enumerate(rows) if part_text(r, self.part) is not None]
        scores = np.full(len(rows), np.nan)
        before = self.embedder.tokens_seen
        if ok:
            vec = self.embedder([rows[i] for i in ok]).astype(np.float32)
            scores[ok] = self.head.predict(vec)
            if self.clip:
                scores[ok] = np.clip(scores[ok], *self.clip)
        self.tokens += self.embedder.tokens_seen - before
        readable = set(ok)
        return scores, {}, [None if i in readable else f"no {self.part} text" for i in range(len(rows))]


class _HfWorker:
    """A FineWeb-Edu-format regressor: the first 512 tokens, logits[:, 0]."""

    def __init__(self, path: Path, part: str, device: str, dtype: str, batch_size: int):
        import torch
        from thresher.pipeline.models.engine import engine_dtype
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, dtype=engine_dtype(device, dtype)).to(device).eval()
        except OSError as e:
            raise ValueError(f"{path}: cannot load the sequence classifier "
                             f"({str(e).strip().splitlines()[0]})") from None
        self.torch, self.device, self.part, self.batch_size = torch, device, part, batch_size
        self.tokens = 0

    def __call__(self, rows: list[dict]) -> tuple[np.ndarray, dict, list]:
        texts = [part_text(r, self.part) for r in rows]
        ok = [i for i, t in enumerate(texts) if t is not None]
        raw = np.full(len(rows), np.nan)
        enc = self.tok([texts[i] for i in ok], truncation=True, max_length=FINEWEB_EDU_MAX_TOKENS)
        lengths = np.array([len(x) for x in enc["input_ids"]], dtype=np.int64)
        self.tokens += int(lengths.sum())
        order = np.argsort(-lengths, kind="stable")
        with self.torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                batch = self.tok.pad({k: [enc[k][j] for j in idx] for k in enc}, return_tensors="pt")
                out = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
                raw[[ok[j] for j in idx]] = out[:, 0].float().cpu().numpy().astype(np.float64)
        score = np.clip(raw, 0.0, 5.0)
        ints = [None if np.isnan(v) else int(np.round(v)) for v in score]
        reasons = [None if t is not None else f"no {self.part} text" for t in texts]
        return score, {"int_score": ints}, reasons


@dataclass(frozen=True)
class ClassifierScores(Stage):
    """A quality classifier's score for every row (higher = better)."""

    kind: ClassVar[str] = "quality"
    loads_model: ClassVar[bool] = True
    model: str = ""
    part: str | None = None          # None: the text part the model was trained on
    dtype: str = "auto"              # the FineWeb-Edu-format encoder's dtype (bind)
    batch_size: int = field(default=64, compare=False, metadata={"key": False})

    def __post_init__(self):
        if not self.model:
            raise ValueError("the classifier stage needs a model (--param model=PATH)")
        if self.part is not None and self.part not in PARTS:
            raise ValueError(f"unknown text part {self.part!r}; expected one of {', '.join(PARTS)}")

    def info(self) -> ClassifierInfo:
        return describe_model(self.model)

    def text_part(self) -> str:
        return self.part or self.info().part

    def bind(self, device: str) -> ClassifierScores:
        from thresher.pipeline.models.engine import engine_dtype

        return dataclasses.replace(self, dtype=str(engine_dtype(device, self.dtype)).removeprefix("torch."))

    def key_extra(self) -> dict:
        return {"model": file_identity(Path(self.model)), "part": self.text_part()}

    def resources(self) -> Resources:
        kind = self.info().kind
        return Resources(cpus=1, gpus=0 if kind == "fasttext" else 0.25, memory_gb=2)

    def open_worker(self, device: str):
        info, path = self.info(), Path(self.model)
        if info.kind == "fasttext":
            return _FastTextWorker(path, info, self.text_part())
        if info.kind == "head":
            return _HeadWorker(path, info, self.text_part(), device, self.batch_size)
        return _HfWorker(path, self.text_part(), device, self.dtype, self.batch_size)

    def run_shard(self, worker, rows: list[dict]) -> ShardResult:
        before = getattr(worker, "tokens", 0)
        scores, extra, reasons = worker(rows)
        cols = {"id": pa.array([r["id"] for r in rows], pa.string()),
                SCORE: pa.array([None if np.isnan(v) else float(v) for v in scores], pa.float64())}
        for k, v in extra.items():
            cols[k] = pa.array(v, pa.int64())
        cols["reason"] = pa.array(reasons, pa.string())
        return ShardResult(tables={"quality": pa.table(cols)},
                           tokens=getattr(worker, "tokens", 0) - before)

    def assemble(self, run: StageRun) -> dict:
        frame = concat_shard_tables(run, "quality.parquet")
        return {"rows": frame.height, "scored": int(frame[SCORE].is_not_null().sum()),
                "reasons": reason_counts(frame)}

    def load(self, run: StageRun) -> ClassifierResult:
        return ClassifierResult(run.dir)

"""Building a selection's manifest: what `run_select` (`pipeline/select.py`) records beside its
output (reading one back: `pipeline/io/manifests.py`).

    manifest = selection_manifest(prep, inputs, scored, chosen, sel, tally, stats, budget, ...)

A manifest records the plan's per-stage statistics (rows, tokens, seconds, device, FLOPs,
cached), the method's parameters and notes, the selector, the model identities, the pool it
read (`inputs_record`), the counts and the package versions. `Tally` counts the rows per source
(and their tokens when no token-count stage ran) as the writer streams them past.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import platform
import sys
from pathlib import Path

import polars as pl
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.method import Inputs
from thresher.pipeline.stage import StageStats

VERSIONED = ["thresher", "polars", "pyarrow", "numpy", "torch", "transformers", "peft",
             "sentence-transformers", "faiss-cpu", "faiss-gpu-cu12", "scikit-learn", "ray"]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def inputs_record(pool: Pool) -> dict:
    """What a manifest says of its pool: its absolute path and fingerprint (`report` and
    `verify` find the pool by them, and refuse another), and the files it was ingested from."""
    return {"pool": str(pool.path.resolve()), "pool_fingerprint": pool.fingerprint,
            "files": [{"path": i["path"], "sha256": i["sha256"]} for i in pool.info["inputs"]]}


class Tally:
    """Rows per source, and tokens when no token-count stage ran, of rows seen one at a time.

    `prep`: the selection's `select.Prepared`."""

    def __init__(self, prep, inputs: Inputs):
        from thresher.pipeline.models.resolve import load_tokenizer, resolve

        self.by_source: dict[str, int] = {}
        self.n_tokens = self.n_loss = 0
        self.tok = None if "n_tokens" in inputs.candidates.columns else \
            load_tokenizer(resolve(prep.method.tokenizer(prep.params)))

    def add(self, row: dict) -> None:
        from thresher.pipeline.models.chat import encode
        from thresher.pipeline.stages.tokens import NO_LIMIT

        self.by_source[row["source"]] = self.by_source.get(row["source"], 0) + 1
        if self.tok is not None:
            enc = encode(self.tok, row, NO_LIMIT)
            self.n_tokens += len(enc.input_ids)
            self.n_loss += int(enc.loss_mask.sum())


def selected_tokens(prep, inputs: Inputs, chosen: pl.DataFrame, tally: Tally) -> dict:
    """Tokens of the selected rows, by the tokenizer only (never model weights)."""
    name = prep.method.tokenizer(prep.params)
    if "n_tokens" in inputs.candidates.columns:
        picked = chosen.select("id").join(inputs.candidates, on="id", how="left")
        n_tokens, n_loss = picked["n_tokens"].sum(), picked["n_loss_tokens"].sum()
    else:
        n_tokens, n_loss = tally.n_tokens, tally.n_loss
    from thresher.pipeline.models.resolve import model_identity

    return {"selected": int(n_tokens), "selected_loss": int(n_loss),
            "tokenizer": model_identity(name)}


def model_identities(stats: list[StageStats]) -> dict:
    """Model identities the plan's stages used, by stage kind (no entry: no model loaded)."""
    out = {}
    for s in stats:
        for key in ("model", "tokenizer"):
            if key in s.config and isinstance(s.config[key], str):
                out[f"{s.stage}.{key}" if s.stage != "embed" else "embedder"] = s.config[key]
    return {("lm" if k == "forward.model" else k): v for k, v in out.items()}


def selection_manifest(prep, inputs, scored, chosen, sel, tally, stats, budget, fmt, out,
                       sidecar, scores_path, store, executor) -> dict:
    """The manifest of a selection (before the caller's label, eligible count and timings)."""
    pool = prep.request.pool
    return {
        "method": prep.method.name,
        "summary": prep.method.summary,
        "budget": str(budget),
        "seed": inputs.seed,
        "format": fmt,
        "output": str(out),
        "selection": str(sidecar),
        "scores": str(scores_path),
        "config": {"method": {**dataclasses.asdict(prep.params), **inputs.notes,
                              "decisions": str(scores_path)},
                   "selector": {"name": type(sel).__name__,
                                **({k: v for k, v in dataclasses.asdict(sel).items() if k != "notes"}
                                   if dataclasses.is_dataclass(sel) else {})},
                   "targets": [str(t) for t in prep.request.targets]},
        "plan": [s.describe() for s in prep.plan.stages],
        "artifacts": {name: str(o.dir.dir) for name, o in inputs.outputs.items()
                      if hasattr(getattr(o, "dir", None), "dir")},
        "stages": [s.as_dict() for s in stats],
        "executor": executor,
        "models": model_identities(stats),
        "inputs": inputs_record(pool),
        "counts": {"read": pool.info["read"], "quarantined": pool.info["quarantined"],
                   "duplicate_ids": pool.info["duplicate_ids"],
                   "candidates": inputs.candidates.height, "scored": scored.height,
                   "unscored": inputs.candidates.height - scored.height, "selected": chosen.height},
        "tokens": {**selected_tokens(prep, inputs, chosen, tally),
                   **({"budget": int(budget.value)} if budget.kind == "tokens" else {})},
        "by_source": dict(sorted(tally.by_source.items())),
        "versions": versions(),
        "workdir": str(store.root),
        "command": sys.argv if sys.argv and "thresher" in Path(sys.argv[0]).name else None,
    }


def annotation_manifest(prep, inputs: Inputs, table: pl.DataFrame, scores: pl.DataFrame,
                        scores_path: Path, stats: list[StageStats], out: Path, store,
                        executor: str) -> dict:
    """The manifest of an annotate-only run: every row's score columns in `table` (before the
    caller's label and timings)."""
    pool = prep.request.pool
    counts = {"read": pool.info["read"], "quarantined": pool.info["quarantined"],
              "duplicate_ids": pool.info["duplicate_ids"],
              "candidates": inputs.candidates.height, "scored": scores.height,
              "unscored": inputs.candidates.height - scores.height}
    if "keep" in table.columns and table.schema["keep"] == pl.Boolean:
        counts["keep"] = int(table["keep"].fill_null(False).sum())
        counts["drop"] = table.height - counts["keep"]
    return {
        "method": prep.method.name, "summary": prep.method.summary, "annotate_only": True,
        "seed": inputs.seed, "format": "parquet", "output": str(out),
        "scores": str(scores_path),
        "config": {"method": {**dataclasses.asdict(prep.params), **inputs.notes},
                   "targets": [str(t) for t in prep.request.targets]},
        "plan": [s.describe() for s in prep.plan.stages],
        "artifacts": {name: str(o.dir.dir) for name, o in inputs.outputs.items()
                      if hasattr(getattr(o, "dir", None), "dir")},
        "stages": [s.as_dict() for s in stats], "executor": executor,
        "models": model_identities(stats),
        "inputs": inputs_record(pool),
        "counts": counts, "versions": versions(), "workdir": str(store.root),
        "command": sys.argv if sys.argv and "thresher" in Path(sys.argv[0]).name else None,
    }

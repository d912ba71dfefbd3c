"""Run one selection method on a pool and write the subset, its reasons and its manifest.

The CLI, the Prefect flows and library users all call `run_select`.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
from thresher.pipeline import registry
from thresher.pipeline.artifacts import ArtifactStore, atomic_path
from thresher.pipeline.budget import Budget
from thresher.pipeline.chat import encode
from thresher.pipeline.method import Context
from thresher.pipeline.models import DEFAULT_LM, load_tokenizer, resolve
from thresher.pipeline.pool import Pool
from thresher.pipeline.tokens import NO_LIMIT, token_counts
from thresher.pipeline.writers import FORMATS, write_manifest, write_rows

VERSIONED = ["thresher", "polars", "pyarrow", "numpy", "torch", "transformers", "peft",
             "sentence-transformers", "faiss-cpu", "faiss-gpu-cu12", "scikit-learn"]


def default_workdir(pool: Path) -> Path:
    """Artifacts live beside the pool, shared by every pool in that folder (keys differ)."""
    return Path(pool).resolve().parent / ".thresher-work"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def run_select(pool_path: Path | str, method: str, budget: str | Budget, out: Path | str,
               fmt: str = "messages", seed: int = 0, workdir: Path | str | None = None,
               options: dict[str, Any] | None = None) -> dict:
    t_start = time.perf_counter()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    pool = Pool(pool_path)
    store = ArtifactStore(workdir or default_workdir(pool.path))
    impl = registry.get(method)
    ctx = Context(pool=pool, store=store, budget=budget, seed=seed, options=dict(options or {}))

    counting = resolve(ctx.options.get("model") or DEFAULT_LM)
    counts = None
    if budget.kind == "tokens":
        with ctx.timed("token_counts"):
            counts = token_counts(pool, store, counting)
        ctx._candidates = ctx.candidates.join(counts.select("id", "n_tokens"), on="id",
                                              how="left", maintain_order="left")
    with ctx.timed("method"):
        chosen = impl.select(ctx)
    from thresher.selectors.base import check_selection

    chosen = check_selection(chosen, ctx.candidates)
    if chosen.height == 0:
        raise ValueError(f"method {method} selected nothing under budget {budget}")

    out = Path(out)
    with ctx.timed("write"):
        rows = pool.rows(chosen["id"].to_list())
        write_rows(rows, out, fmt)
        sidecar = out.with_name(out.name + ".selection.parquet")
        with atomic_path(sidecar) as tmp:
            chosen.with_row_index("rank").write_parquet(tmp)
    with ctx.timed("token_counts"):
        if counts is None:  # only the selected rows need counting
            tok = load_tokenizer(counting)
            encs = [encode(tok, r, NO_LIMIT) for r in rows]
            n_tokens = sum(len(e.input_ids) for e in encs)
            n_loss = sum(int(e.loss_mask.sum()) for e in encs)
        else:  # a token budget already counted every row
            picked = chosen.select("id").join(counts, on="id", how="left")
            n_tokens, n_loss = picked["n_tokens"].sum(), picked["n_loss_tokens"].sum()
    ctx.models.setdefault("tokenizer", counting.identity)

    manifest = {
        "method": method,
        "summary": impl.summary,
        "budget": str(budget),
        "seed": seed,
        "format": fmt,
        "output": str(out),
        "selection": str(sidecar),
        "config": {"options": {k: v for k, v in ctx.options.items() if v is not None},
                   "method": ctx.config},
        "models": ctx.models,
        "inputs": {"pool": str(pool.path), "pool_fingerprint": pool.fingerprint,
                   "files": [{"path": i["path"], "sha256": i["sha256"]} for i in pool.info["inputs"]]},
        "counts": {"read": pool.info["read"], "quarantined": pool.info["quarantined"],
                   "duplicate_ids": pool.info["duplicate_ids"], "candidates": ctx.candidates.height,
                   "selected": chosen.height},
        "tokens": {"selected": int(n_tokens), "selected_loss": int(n_loss),
                   "tokenizer": counting.identity},
        "by_source": dict(sorted(pl.DataFrame({"source": [r["source"] for r in rows]})
                                 ["source"].value_counts().iter_rows())),
        "versions": versions(),
        "workdir": str(store.root),
        "command": sys.argv if sys.argv and "thresher" in Path(sys.argv[0]).name else None,
    }
    ctx.timings["total"] = round(time.perf_counter() - t_start, 3)
    manifest["timings"] = ctx.timings
    write_manifest(out, manifest)
    return manifest

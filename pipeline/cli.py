"""The `thresher` command line. Each command is a thin shell over a stage function."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Select and curate LLM training data.")

# Errors a user can cause with bad input: one line on stderr, exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, ModuleNotFoundError)


def _fail(e: Exception) -> None:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
def ingest(
    sources: Annotated[list[Path], typer.Argument(help="Input files or directories (JSONL, JSON, Parquet, CSV).")],
    out: Annotated[Path, typer.Option("--out", help="Pool directory to write (replaced if it exists).")],
    format: Annotated[str | None, typer.Option("--format", help="messages|sharegpt|alpaca|text; default: detect per file.")] = None,
    rows_per_shard: Annotated[int, typer.Option(help="Rows per Parquet shard.")] = 10_000,
):
    """Read instruction or text data into a pool of canonical Parquet shards."""
    from tqdm import tqdm

    from thresher.pipeline.pool import ingest as run_ingest

    try:
        with tqdm(unit=" rows", desc="ingest", disable=None) as bar:
            rep = run_ingest(sources, out, shape=format, rows_per_shard=rows_per_shard,
                             progress=bar.update)
    except USER_ERRORS as e:
        _fail(e)
    for i in rep.inputs:
        if i.quarantined:
            typer.echo(f"  {i.path}: {i.quarantined} of {i.read} rows quarantined", err=True)
    if rep.quarantined:
        typer.echo(f"  reasons and line numbers: {out / 'quarantine.jsonl'}", err=True)
    dup = f", {rep.duplicate_ids} duplicate ids renamed (see duplicate_ids.jsonl)" if rep.duplicate_ids else ""
    typer.echo(f"ingested {len(rep.inputs)} files: read {rep.read} = kept {rep.kept} + "
               f"quarantined {rep.quarantined}{dup} -> {out}")


@app.command()
def select(
    pool: Annotated[Path, typer.Argument(help="Pool directory made by `thresher ingest`.")],
    method: Annotated[str, typer.Option("--method", help="Selection method; see `thresher methods`.")],
    budget: Annotated[str, typer.Option("--budget", help="Rows (100), percent (10%) or tokens (50000tok).")],
    out: Annotated[Path, typer.Option("--out", help="Output file for the subset.")],
    format: Annotated[str, typer.Option("--format", help="messages|alpaca|sharegpt|parquet")] = "messages",
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 0,
    workdir: Annotated[Path | None, typer.Option(help="Artifact directory (default: .thresher-work beside the pool).")] = None,
    model: Annotated[str | None, typer.Option(help="Causal LM for model-based methods and token counts (default smollm2-135m-instruct).")] = None,
    embedder: Annotated[str | None, typer.Option(help="Sentence-transformers model (default all-minilm-l6-v2).")] = None,
    target: Annotated[list[Path] | None, typer.Option(help="Target set file(s) for targeted methods; repeat for several tasks.")] = None,
    keep: Annotated[str | None, typer.Option(help="Which end of a score to keep: top|bottom|middle (hard|easy for prototypes/semdedup).")] = None,
    by: Annotated[str | None, typer.Option(help="Group column for balanced selection: source, cluster, or an original field such as capability.")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Method-specific setting KEY=VALUE (repeatable).")] = None,
):
    """Select a subset of a pool under a budget and write it with a manifest."""
    from thresher.pipeline.select import run_select

    options = {"model": model, "embedder": embedder, "keep": keep, "by": by, "device": device,
               "target": [str(t) for t in target] if target else None}
    try:
        for kv in param or []:
            if "=" not in kv:
                raise ValueError(f"--param {kv!r}: expected KEY=VALUE")
            k, v = kv.split("=", 1)
            options[k.strip().replace("-", "_")] = json.loads(v) if _is_json(v) else v
        m = run_select(pool, method, budget, out, fmt=format, seed=seed, workdir=workdir,
                       options=options)
    except USER_ERRORS as e:
        _fail(e)
    c = m["counts"]
    typer.echo(f"selected {c['selected']} of {c['candidates']} rows ({m['tokens']['selected']} tokens) "
               f"by {method} -> {out} (manifest: {out}.manifest.json) in {m['timings']['total']:.1f}s")


def _is_json(v: str) -> bool:
    try:
        json.loads(v)
        return True
    except ValueError:
        return False


@app.command()
def embed(
    pool: Annotated[Path, typer.Argument(help="Pool directory made by `thresher ingest`.")],
    model: Annotated[str, typer.Option("--model", help="Sentence-transformers model: built-in name, directory, or org/name.")] = "all-minilm-l6-v2",
    part: Annotated[str, typer.Option("--part", help="Text to embed: first_user|conversation|response.")] = "conversation",
    workdir: Annotated[Path | None, typer.Option(help="Artifact directory (default: .thresher-work beside the pool).")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
    batch_size: Annotated[int, typer.Option(help="Texts per batch.")] = 64,
):
    """Embed every row of a pool (cached, resumable per shard) and print the matrix path."""
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.embed import embed_pool
    from thresher.pipeline.pool import Pool
    from thresher.pipeline.select import default_workdir

    try:
        p = Pool(pool)
        store = ArtifactStore(workdir or default_workdir(p.path))
        e = embed_pool(p, store, model, part=part, device=device, batch_size=batch_size,
                       progress=lambda shard, n: typer.echo(f"  embedded {shard} ({n} rows)", err=True))
    except USER_ERRORS as err:
        _fail(err)
    typer.echo(f"embeddings {e.rows} x {e.dim} float16 ({e.model}, {e.part}) -> {e.path}")


@app.command()
def cluster(
    pool: Annotated[Path, typer.Argument(help="Pool directory made by `thresher ingest`.")],
    k: Annotated[int, typer.Option("--k", help="Number of clusters.")],
    spherical: Annotated[bool, typer.Option("--spherical", help="Spherical k-means (cosine).")] = False,
    niter: Annotated[int, typer.Option(help="k-means iterations.")] = 20,
    seed: Annotated[int, typer.Option(help="k-means seed.")] = 1234,
    model: Annotated[str, typer.Option("--model", help="Sentence-transformers model for the embeddings.")] = "all-minilm-l6-v2",
    part: Annotated[str, typer.Option("--part", help="Text to embed: first_user|conversation|response.")] = "conversation",
    workdir: Annotated[Path | None, typer.Option(help="Artifact directory (default: .thresher-work beside the pool).")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
):
    """k-means over a pool's embeddings (embedding first if needed); print the artifact paths."""
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.cluster import cluster_matrix
    from thresher.pipeline.embed import embed_pool
    from thresher.pipeline.pool import Pool
    from thresher.pipeline.select import default_workdir

    try:
        p = Pool(pool)
        store = ArtifactStore(workdir or default_workdir(p.path))
        e = embed_pool(p, store, model, part=part, device=device)
        c = cluster_matrix(store, e.matrix(), k, fingerprint=e.fingerprint, niter=niter,
                           seed=seed, spherical=spherical)
    except USER_ERRORS as err:
        _fail(err)
    typer.echo(f"embeddings -> {e.path}")
    for name, path in c.paths().items():
        typer.echo(f"{name} -> {path}")
    sizes = c.stage.info()["sizes"]
    typer.echo(f"k={k}: cluster sizes min {min(sizes)}, median {sorted(sizes)[len(sizes) // 2]}, max {max(sizes)}")


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False):
    """List the selection methods, what each needs and what it costs."""
    from thresher.pipeline.registry import describe

    rows = describe()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['method']:<12} {r['summary']}\n{'':<12} needs: {r['needs']}; cost: {r['cost']}")


def main() -> None:
    logging.basicConfig(level=os.environ.get("THRESHER_LOG", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted; completed shards are kept and a rerun resumes", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

"""The `thresher` command line: a thin layer over the Python API (`pipeline/api.py`) and the
training commands. Every user or environment error becomes one `error:` line and exit 2.

One file, over 400 lines, on purpose: it is one Typer app, and every command's options are
declared here with their help, in one place (the declarations are most of the file); each
command body is a few lines that call one function. Split across modules, the commands would
have to register on a shared app imported from elsewhere, and the CLI would lose its one-page
view of every option (tests/test_module_size.py allows this file by name).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from thresher.pipeline import logs
from thresher.pipeline.models.resolve import MissingPackage, check_device

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Select and curate LLM training data.")


classifier_app = typer.Typer(add_completion=False, no_args_is_help=True,
                              help="Quality classifiers: train one from examples or LM ratings.")
app.add_typer(classifier_app, name="classifier")

# Errors a user or the environment causes: one line on stderr, exit code 2. Anything else is a
# bug and keeps its traceback (KeyError, TypeError, AssertionError... are never caught here).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError,
               NotADirectoryError, PermissionError)
# OSErrors that are the machine's state, not a bug: disk full, quota, read-only file system,
# permissions, a name too long, too many open files, a missing device.
ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
              errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.ENODEV, errno.ENXIO,
              errno.EFBIG, errno.EIO}


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for a user or environment error, or None for a programming error."""
    if isinstance(e, OSError) and (isinstance(e, USER_ERRORS) or e.errno in ENV_ERRNOS):
        if e.filename is not None and e.strerror:
            return f"{e.filename}: {e.strerror}"
        return str(e) or type(e).__name__
    if isinstance(e, USER_ERRORS + (MissingPackage,)):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _fail(e: Exception) -> None:
    msg = user_error_message(e)
    if msg is None:
        raise e
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
def ingest(
    sources: Annotated[list[Path], typer.Argument(help="Input files or directories (JSONL, JSON, Parquet, CSV).")],
    out: Annotated[Path, typer.Option("--out", help="Pool directory to write (replaced if it exists).")],
    format: Annotated[str | None, typer.Option("--format", help="messages|sharegpt|alpaca|text; default: detect per file.")] = None,
    rows_per_shard: Annotated[int, typer.Option(help="Rows per Parquet shard.")] = 10_000,
    encoding: Annotated[str | None, typer.Option(help="Text encoding of files without a byte-order mark (default UTF-8).")] = None,
):
    """Read instruction or text data into a pool of canonical Parquet shards."""
    from thresher.pipeline import api
    from tqdm import tqdm

    try:
        with tqdm(unit=" rows", desc="ingest", disable=None) as bar:
            rep = api.ingest(sources, out, format=format, rows_per_shard=rows_per_shard,
                             progress=bar.update, encoding=encoding)
    except Exception as e:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(e)
    for i in rep.inputs:
        if i.quarantined:
            typer.echo(f"  {i.path}: {i.quarantined} of {i.read} rows quarantined", err=True)
    if rep.quarantined:
        typer.echo(f"  reasons and line numbers: {out / 'quarantine.jsonl'}", err=True)
    if rep.skipped:
        from thresher.pipeline.io.inputs import describe_skipped

        typer.echo(f"  files: {describe_skipped(rep.skipped)} (listed in {out / 'pool.json'})",
                   err=True)
    dup = f", {rep.duplicate_ids} duplicate ids renamed (see duplicate_ids.jsonl)" if rep.duplicate_ids else ""
    typer.echo(f"ingested {len(rep.inputs)} files: read {rep.read} = kept {rep.kept} + "
               f"quarantined {rep.quarantined}{dup} -> {out}")


@app.command()
def select(
    pool: Annotated[Path, typer.Argument(help="Pool directory made by `thresher ingest`.")],
    budget: Annotated[str | None, typer.Option("--budget", help="Rows (100), percent (10%) or tokens (50000tok); not with --annotate-only.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="Selection method; see `thresher methods`. With --target and no --method: the measured target default (less: LoRA gradient features, 2 warm-up checkpoints, at most half the budget from one source).")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Output file for the subset (a directory for --format hf).")] = None,
    format: Annotated[str, typer.Option("--format", help="messages|alpaca|sharegpt|parquet|hf (a Hugging Face dataset directory with its card)")] = "messages",
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 0,
    workdir: Annotated[Path | None, typer.Option(help="Artifact directory (default: .thresher-work beside the pool).")] = None,
    target: Annotated[list[Path] | None, typer.Option(help="Target set file(s) for targeted methods; repeat for several tasks.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Method (or selector) parameter KEY=VALUE, repeatable; `thresher methods NAME` lists them.")] = None,
    selector: Annotated[str | None, typer.Option("--selector", help="Cut the method's scores with another selector: band|stratified|balanced|threshold|random|keep.")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
    executor: Annotated[str, typer.Option("--executor", help="local (in-process) or ray.")] = "local",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray cluster address (default: a local cluster, or RAY_ADDRESS).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and what is cached; run nothing.")] = False,
    annotate_only: Annotated[bool, typer.Option("--annotate-only", help="Run the stages and the scoring; write every row's columns (a filter's keep and reason too) as Parquet at --out with a manifest, and no subset.")] = False,
):
    """Select a subset of a pool under a budget and write it with a manifest."""
    from thresher.pipeline import api, registry

    try:
        _check_annotate_only(annotate_only, budget, format, selector)
        params = parse_param_options(param)
        if out is None and not dry_run:
            raise ValueError("--out is required (the subset file to write)")
        if annotate_only:
            got = api.annotate(pool, method, out, seed=seed, params=params, targets=target or (),
                               workdir=workdir, device=device, executor=executor,
                               ray_address=ray_address, dry_run=dry_run)
        else:
            got = api.select(pool, method, budget, out or "-", format=format, seed=seed,
                             params=params, selector=selector, targets=target or (),
                             workdir=workdir, device=device, executor=executor,
                             ray_address=ray_address, dry_run=dry_run)
        method = registry.method_for(method, target, params)[0]
    except Exception as e:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(e)
    if dry_run:
        typer.echo(f"plan for {method} ({len(got)} stages):")
        for line in got or ["(no stages: scores come from the pool itself)"]:
            typer.echo(f"  {line}")
        return
    m = got.manifest
    for line in m["config"]["method"].get("report_lines", []):
        typer.echo(line)
    c, tok = m["counts"], m.get("tokens", {})
    if annotate_only:
        kept = f" ({c['keep']} keep, {c['drop']} drop)" if "keep" in c else ""
        typer.echo(f"annotated {c['scored']} of {c['candidates']} rows{kept} by {method} -> {out} "
                   f"(manifest: {out}.manifest.json) in {m['timings']['total']:.1f}s")
        return
    used = f" of a {tok['budget']}-token budget" if "budget" in tok else ""
    typer.echo(f"selected {c['selected']} of {c['candidates']} rows ({tok['selected']} tokens{used}) "
               f"by {method} -> {out} (manifest: {out}.manifest.json) in {m['timings']['total']:.1f}s")


def _check_annotate_only(annotate_only: bool, budget: str | None, fmt: str,
                         selector: str | None) -> None:
    if not annotate_only:
        if budget is None:
            raise ValueError("--budget is required (rows, a percentage or tokens), "
                             "unless --annotate-only")
        return
    if budget is not None:
        raise ValueError("--annotate-only selects nothing: drop --budget")
    if selector is not None:
        raise ValueError("--annotate-only selects nothing: drop --selector")
    if fmt != "messages":
        raise ValueError("--annotate-only writes Parquet (every row's columns): drop --format")


def parse_param_options(param: list[str] | None) -> dict:
    """`--param KEY=VALUE` options as a dict of strings (typed later by the method's Params)."""
    out = {}
    for kv in param or []:
        if "=" not in kv:
            raise ValueError(f"--param {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


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
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.select import open_store
    from thresher.pipeline.stages.embed import embed_pool

    try:
        check_device(device)
        p = Pool(pool)
        store = open_store(workdir, p)
        e = embed_pool(p, store, model, part=part, device=device, batch_size=batch_size)
    except Exception as err:  # noqa: BLE001 - _fail re-raises programming errors
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
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.select import open_store
    from thresher.pipeline.stages.cluster import cluster_matrix
    from thresher.pipeline.stages.embed import embed_pool

    try:
        check_device(device)
        p = Pool(pool)
        store = open_store(workdir, p)
        e = embed_pool(p, store, model, part=part, device=device)
        c = cluster_matrix(store, e.matrix(), k, fingerprint=e.fingerprint, niter=niter,
                           seed=seed, spherical=spherical)
    except Exception as err:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(err)
    typer.echo(f"embeddings -> {e.path}")
    for name, path in c.paths().items():
        typer.echo(f"{name} -> {path}")
    sizes = c.dir.info()["sizes"]
    typer.echo(f"k={k}: cluster sizes min {min(sizes)}, median {sorted(sizes)[len(sizes) // 2]}, max {max(sizes)}")


def _train_config(model, epochs, lr, batch_size, grad_accum, max_tokens, seed, save_steps=None,
                  every=0, device=None, merge=False, qtuning=False, sample_ratio=0.25,
                  token_ratio=0.5, prune_scope="sample"):
    from thresher.pipeline.training.qtuning import QTuningConfig
    from thresher.pipeline.training.train import TrainConfig

    check_device(device)
    steps = [int(s) for s in (save_steps or "").replace(" ", "").split(",") if s]
    q = QTuningConfig(sample_ratio=sample_ratio, token_ratio=token_ratio,
                      prune_scope=prune_scope) if qtuning else None
    return TrainConfig(model=model or "smollm2-135m-instruct", epochs=epochs, lr=lr,
                       batch_size=batch_size, grad_accum=grad_accum, max_tokens=max_tokens,
                       seed=seed, save_steps=tuple(steps), every=every, device=device, merge=merge,
                       qtuning=q)


@app.command()
def train(
    subset: Annotated[Path, typer.Argument(help="Training rows: any input file (JSONL, JSON, Parquet, CSV) or a pool directory.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory (adapter, checkpoints, logs); a rerun resumes.")],
    model: Annotated[str | None, typer.Option(help="Causal LM (default smollm2-135m-instruct).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule, 3% warmup).")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Rows per micro-batch (Q-Tuning's EU-plane batch).")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    max_tokens: Annotated[int, typer.Option(help="Truncate rows to this many tokens.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, dropout and data order.")] = 0,
    save_steps: Annotated[str | None, typer.Option(help="Checkpoint after these optimizer steps, e.g. 10,20,40.")] = None,
    every: Annotated[int, typer.Option(help="Also checkpoint every N steps (0 = off).")] = 0,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Also save the merged model (base + adapter).")] = False,
    qtuning: Annotated[bool, typer.Option("--qtuning", help="Dynamic Q-Tuning: per-batch sample and token pruning.")] = False,
    sample_ratio: Annotated[float, typer.Option(help="Q-Tuning sample ratio r_sample.")] = 0.25,
    token_ratio: Annotated[float, typer.Option(help="Q-Tuning token ratio r_token (of Q2 samples' tokens).")] = 0.5,
    prune_scope: Annotated[str, typer.Option(help="Q-Tuning token pruning scope: sample (the paper: each Q2 sample keeps its share) | batch (the released code: one budget per batch).")] = "sample",
    token_masks: Annotated[Path | None, typer.Option(help="Per-token keep masks from `thresher qtuning-masks`.")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore checkpoints in --out and start over.")] = False,
):
    """Train a LoRA adapter on a subset (response-only loss), with checkpoints and resume."""
    from thresher.pipeline.training.train import train_file

    try:
        cfg = _train_config(model, epochs, lr, batch_size, grad_accum, max_tokens, seed,
                            save_steps, every, device, merge, qtuning, sample_ratio, token_ratio,
                            prune_scope)
        s = train_file(subset, out, cfg, resume=not fresh, token_masks=token_masks)
    except Exception as e:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(e)
    if s.get("quarantined"):
        typer.echo(f"  {subset}: {s['quarantined']} rows quarantined (see {out / 'quarantine.jsonl'})", err=True)
    if s["no_loss_token_rows"]:
        typer.echo(f"  {s['no_loss_token_rows']} rows have no response token within "
                   f"{max_tokens} tokens and were not trained on", err=True)
    if s.get("masked_out_rows"):
        typer.echo(f"  {s['masked_out_rows']} rows are dropped whole by {token_masks}", err=True)
    typer.echo(f"trained {s['trained_rows']} rows, {s['steps']} steps, loss {s['first_loss']:.4f} -> "
               f"{s['final_loss']:.4f} in {s['seconds']:.1f}s -> {out / 'adapter'}")
    if "qtuning" in s:
        q = s["qtuning"]
        q2 = f"{q['q2_token_frac']:.3f}" if q["q2_token_frac"] is not None else "-"
        typer.echo(f"Q-Tuning: kept {q['sample_frac']:.3f} of samples, {q['token_frac']:.3f} of "
                   f"label tokens ({q2} of Q2 tokens) over {q['batches']} batches -> {out / 'qtuning.jsonl'}")


@app.command()
def verify(
    subset: Annotated[list[Path], typer.Option("--subset", help="Selected subset file; repeat to compare methods at equal size.")],
    eval: Annotated[list[Path], typer.Option("--eval", help="Held-out eval set file; repeatable.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (verify.json, verify.md, runs/).")] = Path("verify-out"),
    pool: Annotated[Path | None, typer.Option(help="Pool for the random subset (default: from the subset's manifest).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Also train on the whole pool.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the random subset and training.")] = 0,
    seeds: Annotated[int, typer.Option("--seeds", help="Train every subset and its random twin with K seeds; report mean, spread and paired bootstrap intervals vs random.")] = 1,
    model: Annotated[str | None, typer.Option(help="Causal LM (default smollm2-135m-instruct).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Rows per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    max_tokens: Annotated[int, typer.Option(help="Truncate rows to this many tokens.")] = 512,
    max_eval: Annotated[int, typer.Option(help="Evaluate on the first N rows of each eval set.")] = 100,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length for exact match (0 = no generation).")] = 256,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
    base_model: Annotated[str | None, typer.Option("--base-model", help="Model to recover (e.g. a `thresher prune` output): trained and evaluated instead of --model; its unpruned source is evaluated as `original`.")] = None,
):
    """Train on each subset and on a random subset of the same size; compare held-out loss and accuracy."""
    from thresher.pipeline import api
    from thresher.pipeline.training.prune import prune_info

    try:
        if base_model and model and model != base_model:
            raise ValueError("--base-model and --model name different models; give one")
        reference = (prune_info(base_model) or {}).get("source") if base_model else None
        cfg = _train_config(base_model or model, epochs, lr, batch_size, grad_accum, max_tokens,
                            seed, device=device)
        r = api.verify(subset, eval, out, pool=pool, full=full, seed=seed, cfg=cfg,
                       max_eval=max_eval, max_new_tokens=max_new_tokens, reference=reference,
                       seeds=seeds)
    except Exception as e:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(e)
    typer.echo(r["markdown"])
    typer.echo(f"verify took {r['seconds']:.0f}s -> {out / 'verify.json'}, {out / 'verify.md'}, "
               f"{r['report']}")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Selection outputs (X.jsonl), verify directories, or a directory of selections.")],
    out: Annotated[str | None, typer.Option("--out", help="HTML file to write (default: X.jsonl.report.html, or DIR/report.html).")] = None,
    embedder: Annotated[str | None, typer.Option(help="Embedder for the map when no embeddings are cached (default all-minilm-l6-v2).")] = None,
    max_points: Annotated[int, typer.Option(help="Most pool rows drawn on the map (a seeded sample beyond).")] = 5000,
):
    """Write one self-contained HTML report (offline): funnel, map, scores, examples, verify."""
    from thresher.pipeline import api

    try:
        path = api.report(runs, out, embedder=embedder, max_points=max_points)
    except Exception as e:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(e)
    typer.echo(f"report -> {path}")


@app.command("qtuning-masks")
def qtuning_masks(
    source: Annotated[Path, typer.Argument(help="Pool directory or any input file.")],
    out: Annotated[str, typer.Option("--out", help="JSONL of {id, keep, quadrant, ppl, entropy, input_ids, keep_mask}.")],
    model: Annotated[str | None, typer.Option(help="Causal LM that scores the rows (default smollm2-135m-instruct).")] = None,
    sample_ratio: Annotated[float, typer.Option(help="Q-Tuning sample ratio r_sample.")] = 0.25,
    token_ratio: Annotated[float, typer.Option(help="Q-Tuning token ratio r_token.")] = 0.5,
    prune_scope: Annotated[str, typer.Option(help="sample (paper) | batch (released code).")] = "sample",
    max_tokens: Annotated[int, typer.Option(help="Truncate rows to this many tokens.")] = 512,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
):
    """Offline Q-Tuning: base-model EU plane over all rows at once; per-row token keep masks."""
    from thresher.pipeline.io.guard import check_outputs, file_output
    from thresher.pipeline.io.pool import load_rows
    from thresher.pipeline.training.qtuning import QTuningConfig, write_masks

    try:
        check_device(device)
        out = file_output(out)
        check_outputs([out], inputs=[source])
        rows, bad = load_rows(source)
        if bad:
            typer.echo(f"  {source}: {len(bad)} rows quarantined, e.g. {bad[0]['location']}: {bad[0]['reason']}", err=True)
        info = write_masks(rows, out, model or "smollm2-135m-instruct",
                           QTuningConfig(sample_ratio=sample_ratio, token_ratio=token_ratio,
                                         prune_scope=prune_scope), max_tokens=max_tokens, device=device)
    except Exception as e:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(e)
    typer.echo(f"kept {info['kept_samples']} of {info['samples']} rows, {info['kept_tokens']} of "
               f"{info['label_tokens']} label tokens -> {out}")


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="Causal LM to prune: built-in name, HF directory, .gguf or org/name.")],
    ratio: Annotated[float, typer.Option("--ratio", help="Fraction removed: MLP channels (structured) or weights per row (magnitude, wanda).")],
    out: Annotated[Path, typer.Option("--out", help="New directory for the pruned model (must not exist or be empty).")],
    method: Annotated[str, typer.Option("--method", help="structured (MLP channels, LLM-Pruner-like) | magnitude | wanda.")] = "structured",
    calib: Annotated[Path | None, typer.Option("--calib", help="Calibration rows for wanda: a pool directory or any input file.")] = None,
    calib_rows: Annotated[int, typer.Option(help="Calibration rows taken (seeded sample).")] = 32,
    max_tokens: Annotated[int, typer.Option(help="Truncate calibration rows to this many tokens.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for the calibration sample.")] = 0,
):
    """Prune a causal LM (the degraded model PASER recovers); the output loads with transformers."""
    from thresher.pipeline.training.prune import prune_model

    try:
        rows = _calibration_rows(calib, calib_rows, seed) if calib else None
        info = prune_model(model, ratio, out, method=method, calib=rows,
                           calib_source=str(calib) if calib else None, max_tokens=max_tokens)
    except Exception as e:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(e)
    shape = (f", intermediate_size {info['intermediate_size'][0]} -> {info['intermediate_size'][1]}"
             if "intermediate_size" in info else "")
    typer.echo(f"pruned {model} ({method}, ratio {ratio}): parameters {info['params_before']:,} -> "
               f"{info['params_after']:,}, non-zero {info['nonzero_before']:,} -> "
               f"{info['nonzero_after']:,}{shape} -> {out}")


def _calibration_rows(source: Path, n: int, seed: int) -> list[dict]:
    import random

    from thresher.pipeline.io.pool import Pool, load_rows

    if source.is_dir() and (source / "pool.json").exists():
        p = Pool(source)
        ids = p.frame(["id"])["id"].to_list()
        return p.rows(sorted(random.Random(seed).sample(ids, min(n, len(ids)))))
    rows, _ = load_rows(source)
    return random.Random(seed).sample(rows, min(n, len(rows)))


@app.command("capability-clusters")
def capability_clusters(
    pool: Annotated[Path, typer.Argument(help="Pool directory made by `thresher ingest`.")],
    k: Annotated[int | None, typer.Option("--k", help="Number of clusters (default: the NMF reconstruction-error rule).")] = None,
    algo: Annotated[str, typer.Option("--algo", help="nmf (the paper's) | kmeans | umap (UMAP + k-means).")] = "nmf",
    neighbours: Annotated[int, typer.Option(help="Neighbours per row in the kNN graph.")] = 15,
    label: Annotated[str, typer.Option("--label", help="Original field to compare the clusters with (adjusted mutual information).")] = "capability",
    workdir: Annotated[Path | None, typer.Option(help="Artifact directory (default: .thresher-work beside the pool).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the eigensolver, NMF and k-means.")] = 0,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
):
    """PASER's capability clusters of a pool's instructions; prints the cluster table and the AMI with --label."""
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.select import open_store
    from thresher.pipeline.stages.capability import cluster_table, pool_clusters

    try:
        p = Pool(pool)
        store = open_store(workdir, p)
        cl = pool_clusters(p, store, k=k, algo=algo, neighbours=neighbours, seed=seed, device=device)
        table = cluster_table(p, cl.labels, label=label)
    except Exception as e:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(e)
    for line in table["lines"]:
        typer.echo(line)
    ami = f"; adjusted mutual information with {label}: {table['ami']:.3f}" if table["ami"] is not None else ""
    typer.echo(f"{cl.k} clusters ({algo}) of {len(cl.labels)} rows{ami}")


@app.command()
def methods(
    name: Annotated[str | None, typer.Argument(help="One method to show in full.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """List the selection methods: parameters with defaults, needs (stages) and cost."""
    from thresher.pipeline import api
    from thresher.pipeline.registry import describe_selectors

    try:
        rows = api.methods(name)
    except Exception as e:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(e)
    if as_json:
        out = rows[0] if name else {"methods": rows, "selectors": describe_selectors()}
        typer.echo(json.dumps(out, indent=2, default=str))
        return
    for r in rows:
        typer.echo(f"{r['method']}: {r['summary']}")
        if not name:
            continue
        typer.echo(f"  cost: {r['cost']}; targets: {r['targets']}; score column: {r['score_column']}")
        typer.echo("  needs: " + ("; ".join(n["describe"] for n in r["needs"]) or "nothing"))
        typer.echo("  method parameters (--param KEY=VALUE, or method.KEY=VALUE):")
        for prm in r["params"]:
            flag = f"--param {prm['name']}={prm['default']}"
            typer.echo(f"    {flag:<40} {prm['type']:<34} {prm['help']}")
        if r["score_column"] is None:
            typer.echo("  selector parameters: none (this method makes its own cut)")
            continue
        typer.echo(f"  selector parameters (with --selector NAME cutting {r['score_column']}; "
                   "--param selector.KEY=VALUE):")
        for sel in describe_selectors():
            for prm in sel["params"]:
                flag = f"{sel['selector']}: --param selector.{prm['name']}={prm['default']}"
                typer.echo(f"    {flag:<50} {prm['type']:<24} {prm['help']}")
    if not name:
        typer.echo("\n`thresher methods NAME` shows a method's parameters and needs; --json for programs.")


@classifier_app.command("train")
def classifier_train(
    out: Annotated[Path, typer.Option("--out", help="Classifier directory to write (model + classifier.json).")],
    kind: Annotated[str, typer.Option("--kind", help="fasttext (DCLM's recipe) | head (a linear or MLP head on embeddings).")] = "fasttext",
    positive: Annotated[list[Path] | None, typer.Option("--positive", help="Positive examples: a file or a pool; repeatable.")] = None,
    negative: Annotated[list[Path] | None, typer.Option("--negative", help="Negative examples: a file or a pool; repeatable.")] = None,
    pool: Annotated[Path | None, typer.Option("--pool", help="One pool, labelled by --label or rated by --rate.")] = None,
    label: Annotated[str | None, typer.Option("--label", help="FIELD (0/1 or a number), FIELD>=X (or >, <=, <), FIELD=A,B or FIELD!=A,B; FIELD: source, kind, an original field, or (with --rate) rating, complexity, quality.")] = None,
    rate: Annotated[str | None, typer.Option("--rate", help="Label --pool with LM ratings on this rubric: edu | deita | deita-raw | a rubric file.")] = None,
    rate_model: Annotated[str, typer.Option("--rate-model", help="The rating causal LM.")] = "smollm2-135m-instruct",
    rate_sample: Annotated[float, typer.Option("--rate-sample", help="Rate this seeded fraction of the pool.")] = 1.0,
    rate_max_tokens: Annotated[int, typer.Option("--rate-max-tokens", help="Rating prompt length cap.")] = 1024,
    task: Annotated[str | None, typer.Option("--task", help="binary | regression (default: regression for --rate with a plain rating, else binary).")] = None,
    part: Annotated[str, typer.Option("--part", help="Text of a row: conversation | response | first_user.")] = "conversation",
    threshold: Annotated[float | None, typer.Option("--threshold", help="The cut stored with the model (default for --rate: the rubric's).")] = None,
    holdout: Annotated[float, typer.Option("--holdout", help="Fraction held out for accuracy / AUC.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed for the split, the rating sample and the fit.")] = 0,
    embedder: Annotated[str, typer.Option("--embedder", help="head: the sentence embedder.")] = "all-minilm-l6-v2",
    hidden: Annotated[int, typer.Option("--hidden", help="head: 0 = linear, else one hidden layer of this size.")] = 0,
    epochs: Annotated[int, typer.Option("--epochs", help="fastText epochs.")] = 5,
    lr: Annotated[float, typer.Option("--lr", help="fastText learning rate.")] = 0.1,
    ngrams: Annotated[int, typer.Option("--ngrams", help="fastText word n-grams.")] = 2,
    bucket: Annotated[int, typer.Option("--bucket", help="fastText n-gram hash buckets (the model file is about bucket x 400 bytes).")] = 2_000_000,
    workdir: Annotated[Path | None, typer.Option(help="Artifact directory (default: .thresher-work beside the pool).")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
):
    """Train a quality classifier; print and store its held-out accuracy and AUC."""
    from thresher.pipeline import api

    try:
        info = api.train_classifier(
            out, kind, positive or (), negative or (), pool, label, rate, rate_model,
            rate_sample, rate_max_tokens, task, workdir, device, part=part, holdout=holdout,
            seed=seed, threshold=threshold, embedder=embedder, hidden=hidden, epochs=epochs,
            lr=lr, ngrams=ngrams, bucket=bucket)
    except Exception as e:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(e)
    for line in _classifier_summary(info, out):
        typer.echo(line)


def _classifier_summary(info, out: Path) -> list[str]:
    h = info.metrics["held_out"]
    counts = info.training["counts"]
    rows = (f"{counts['positive']} positive, {counts['negative']} negative" if info.task == "binary"
            else f"{counts['rows']} rows, labels {counts['min']:g}..{counts['max']:g}")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    parts = [f"accuracy {fmt(h.get('accuracy'))}", f"AUC {fmt(h.get('auc'))}"]
    if info.task == "regression":
        parts = [f"MSE {fmt(h['mse'])}", f"Spearman {fmt(h['spearman'])}"] + \
            ([f"at >= {h['cut']:g}: " + ", ".join(parts)] if "cut" in h else [])
    lines = [(f"trained a {info.kind} {info.task} classifier on {rows} "
             f"({info.training['config']['part']} text) in {info.training['seconds']:.1f}s")]
    for where, n in info.training.get("unreadable", {}).items():
        lines.append(f"  {where}: {n} rows without text left out")
    lines.append(f"held-out ({h['rows']} rows): " + ", ".join(parts))
    lines.append(f"-> {out} (metrics and training fingerprints in {out / 'classifier.json'})")
    return lines


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file (see data/recipes/).")],
    executor: Annotated[str, typer.Option(help="local|ray: where stage units run.")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local one).")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the steps and the plan; run nothing.")] = False,
):
    """Run a recipe once, in this process (no Prefect server): ingest, one plan, every selection."""
    from thresher.pipeline.recipe import load_recipe
    from thresher.pipeline.run import dry_run_lines, run_recipe

    try:
        spec = load_recipe(recipe)
        if dry_run:
            for line in dry_run_lines(spec, device):
                typer.echo(line)
            return
        summary = run_recipe(spec, executor, ray_address, device,
                             echo=lambda line: typer.echo(line, err=True))
    except Exception as e:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(e)
    n = sum(1 for s in summary["steps"] if s["step"] in ("select", "annotate"))
    typer.echo(f"ran recipe {spec.name}: {n} subsets with manifests and cards in "
               f"{summary['seconds']:.1f}s -> {spec.out} (statistics: {spec.out}/run.json)")


@app.command()
def serve(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    cron: Annotated[str, typer.Option("--cron", help='Schedule, e.g. "0 3 * * *" (03:00 daily).')],
    executor: Annotated[str, typer.Option(help="local|ray")] = "local",
    name: Annotated[str | None, typer.Option(help="Deployment name (default: the recipe's name).")] = None,
):
    """Serve a recipe as a scheduled Prefect deployment on the server in PREFECT_API_URL."""
    try:
        from thresher.flows.recipe_flow import serve as serve_recipe

        serve_recipe(str(recipe), cron, executor, name)
    except Exception as e:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(e)


def main() -> None:
    # OpenMP threads that spin while waiting made the forward pass and FAISS k-means 3-5x slower
    # on a shared CPU (bench/RESULTS.md); passive waiting matched one thread. Set before torch and
    # faiss load; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    level = os.environ.get("THRESHER_LOG", "WARNING").strip().upper() or "WARNING"
    if not isinstance(logging.getLevelName(level), int):
        typer.echo(f"error: THRESHER_LOG={os.environ['THRESHER_LOG']!r}: unknown log level; use "
                   "DEBUG, INFO, WARNING, ERROR or CRITICAL", err=True)
        sys.exit(2)
    logs.configure()   # library warnings and bars off the terminal, into WORKDIR/thresher.log
    try:
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C inside a command into exit code 130, silently
            code = _interrupted()
    except (typer.Abort, KeyboardInterrupt):
        code = _interrupted()
    except typer.TyperException as e:  # misuse: unknown option, missing argument, bad value
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        typer.echo(f"error: {msg.splitlines()[0]} (see thresher --help)", err=True)
        code = 2
    except Exception as e:  # user errors raised outside a command's own handler
        msg = user_error_message(e)
        if msg is None:
            raise
        typer.echo(f"error: {msg}", err=True)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)


def _interrupted() -> int:
    typer.echo("interrupted: no output was written (outputs are renamed into place only when "
               "complete); finished cache shards are kept and a rerun resumes from them", err=True)
    return 130


if __name__ == "__main__":
    main()

"""The Python API: what the `thresher` command line does, for notebooks and training repositories.

    import thresher.pipeline.api as th

    report = th.ingest(["data/sample/pool"], "out/pool")                 # an IngestReport
    sel = th.select("out/pool", "rds", budget=64, out="out/rds.jsonl",
                    targets=["data/sample/targets/gsm8k_test.jsonl"],
                    params={"vectors": "embed", "max_share": 0.5})       # a Selection
    sel.frame()          # polars: the selected rows (canonical pool columns), in rank order
    sel.reasons()        # polars: id, rank, reason and the scores of every selected row
    sel.dataset()        # datasets.Dataset of the written subset, as a trainer loads it
    sel.manifest         # the manifest (method, parameters, counts, stages, versions)
    th.open_selection("out/rds.jsonl")                                    # the same, later
    th.annotate("out/pool", "quality-rules", out="out/rules.parquet").frame()   # look first
    th.verify(["out/rds.jsonl"], evals=["held_out.jsonl"], out="out/verify")
    th.report(["out/rds.jsonl"], out="out/report.html")
    th.methods()         # every method with its parameters, needs and cost

The command line is a thin layer over these functions: the same checks, the same one-line
errors (a `ValueError`, `FileNotFoundError` or `FileExistsError` whose message names the file,
line or option; the CLI prints it as `error: ...` and exits 2), the same files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

PathLike = str | Path


@dataclass
class Selection:
    """A written subset: its file (or `--format hf` directory) and its manifest."""

    path: Path
    manifest: dict

    @property
    def ids(self) -> list[str]:
        """The selected ids, in rank order."""
        return self.reasons()["id"].to_list()

    def reasons(self) -> pl.DataFrame:
        """id, rank, reason and the score columns of every selected row (the sidecar)."""
        return pl.read_parquet(self.manifest["selection"])

    def frame(self) -> pl.DataFrame:
        """The selected rows as canonical pool columns (id, source, kind, messages, text,
        n_chars, meta), in rank order."""
        from thresher.pipeline.io.pool import Pool

        ids = self.ids
        order = pl.DataFrame({"id": ids, "rank": range(len(ids))})
        rows = Pool(self.manifest["inputs"]["pool"]).scan().filter(pl.col("id").is_in(ids))
        return order.join(rows.collect(), on="id", how="left").sort("rank").drop("rank")

    def arrow(self):
        """`frame()` as a pyarrow Table."""
        return self.frame().to_arrow()

    def dataset(self):
        """The written subset as a `datasets.Dataset`, loaded the way a training repository
        loads it (JSON lines, Parquet, or the Hugging Face dataset directory)."""
        import datasets

        fmt = self.manifest["format"]
        if fmt == "hf":
            return datasets.load_dataset(str(self.path), split="train")
        kind = "parquet" if fmt == "parquet" else "json"
        return datasets.load_dataset(kind, data_files=str(self.path), split="train")


def open_selection(path: PathLike) -> Selection:
    """A subset written earlier by `select` (or a recipe), from its manifest beside it."""
    from thresher.pipeline.io.manifests import read_manifest
    from thresher.pipeline.io.writers import manifest_path

    path = Path(path)
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise FileNotFoundError(f"{path}: no manifest ({mpath.name}) beside it; not a subset "
                                "written by thresher")
    return Selection(path, read_manifest(mpath))


def ingest(sources: Sequence[PathLike], out: PathLike, format: str | None = None,
           rows_per_shard: int = 10_000, encoding: str | None = None,
           progress: Callable[[int], object] | None = None):
    """Read files or folders into a pool of canonical Parquet shards at `out`; rows that
    cannot be read go to `out/quarantine.jsonl` with file, line and reason. Returns the
    `IngestReport` (read = kept + quarantined, per input file)."""
    from thresher.pipeline.io.ingest import ingest as run_ingest

    return run_ingest([Path(s) for s in sources], Path(out), shape=format,
                      rows_per_shard=rows_per_shard, progress=progress, encoding=encoding)


def select(pool: PathLike, method: str | None, budget: str | int, out: PathLike,
           format: str = "messages", seed: int = 0, params: dict[str, Any] | None = None,
           selector: str | None = None, targets: Sequence[PathLike] = (),
           workdir: PathLike | None = None, device: str | None = None, executor: str = "local",
           ray_address: str | None = None, dry_run: bool = False) -> Selection | list[str]:
    """Select a subset of `pool` under `budget` (rows, "10%", "50000tok") and write it to `out`
    with its manifest and reasons. `method=None` with `targets` runs the measured target
    default. `params` are the method's (and, qualified `selector.KEY`, the selector's).
    `dry_run=True` returns the plan's lines (what would run, what is cached) instead."""
    from thresher.pipeline import registry
    from thresher.pipeline.models.resolve import check_device
    from thresher.pipeline.select import run_select

    check_device(device)
    targets = [Path(t) for t in targets or ()]
    method, params = registry.method_for(method, targets, dict(params or {}))
    m = run_select(pool, method, budget, out, fmt=format, seed=seed, workdir=workdir,
                   params=params, selector=selector, targets=targets, device=device,
                   executor=executor, ray_address=ray_address, dry_run=dry_run)
    return m["plan"] if dry_run else Selection(Path(m["output"]), m)


@dataclass
class Annotation:
    """An annotate-only output: every pool row's score columns (a filter's `keep` and `reason`
    too) as one Parquet table, and its manifest."""

    path: Path
    manifest: dict

    def frame(self) -> pl.DataFrame:
        return pl.read_parquet(self.path)


def annotate(pool: PathLike, method: str | None, out: PathLike, seed: int = 0,
             params: dict[str, Any] | None = None, targets: Sequence[PathLike] = (),
             workdir: PathLike | None = None, device: str | None = None,
             executor: str = "local", ray_address: str | None = None,
             dry_run: bool = False) -> Annotation | list[str]:
    """Run a method's stages and scoring and write every row's columns (no subset) as Parquet
    at `out` with a manifest: look before dropping anything (`thresher select --annotate-only`).
    `dry_run=True` returns the plan's lines instead."""
    from thresher.pipeline import registry
    from thresher.pipeline.models.resolve import check_device
    from thresher.pipeline.select import run_select

    check_device(device)
    targets = [Path(t) for t in targets or ()]
    method, params = registry.method_for(method, targets, dict(params or {}))
    m = run_select(pool, method, None, out, fmt="messages", seed=seed, workdir=workdir,
                   params=params, targets=targets, device=device, executor=executor,
                   ray_address=ray_address, dry_run=dry_run, annotate_only=True)
    return m["plan"] if dry_run else Annotation(Path(m["output"]), m)


def verify(subsets: Sequence[PathLike], evals: Sequence[PathLike], out: PathLike, **kwargs) -> dict:
    """Train a LoRA adapter on each subset and on a random subset of the same size (seeded),
    evaluate held-out loss (and exact match) on `evals`, write OUT/verify.json, verify.md and
    report.html; returns the comparison (`["table"]`, `["comparisons"]`, `["runs"]`).
    `kwargs`: pool, full, seed, seeds, cfg (a `TrainConfig`), max_eval, max_new_tokens,
    reference (see `pipeline/training/verify.run_verify`)."""
    from thresher.pipeline.run import verify_with_report

    return verify_with_report([Path(s) for s in subsets], [Path(e) for e in evals], Path(out),
                              **kwargs)


def report(runs: Sequence[PathLike], out: PathLike | None = None, embedder: str | None = None,
           max_points: int = 5000) -> Path:
    """One self-contained HTML report of selections (or verify folders); returns its path."""
    from thresher.pipeline.report.build import default_out, write_report

    runs = [Path(r) for r in runs]
    return write_report(runs, out if out else default_out(runs), embedder=embedder,
                        max_points=max_points)


def train_classifier(out: PathLike, kind: str = "fasttext",
                     positive: Sequence[PathLike] = (), negative: Sequence[PathLike] = (),
                     pool: PathLike | None = None, label: str | None = None,
                     rate: str | None = None, rate_model: str = "smollm2-135m-instruct",
                     rate_sample: float = 1.0, rate_max_tokens: int = 1024,
                     task: str | None = None, workdir: PathLike | None = None,
                     device: str | None = None, **config):
    """Train a quality classifier (`thresher classifier train`): from positive and negative
    files or pools, or one pool labelled by a rule (`label="source=gsm8k"`, "score>=3") or by LM
    ratings on a rubric (`rate="edu"`). `config`: part, holdout, seed, threshold, embedder,
    hidden, epochs, lr, ngrams, bucket (`pipeline/training/classifier.ClassifierConfig`).
    Returns the `ClassifierInfo` also written to OUT/classifier.json (held-out accuracy, AUC,
    the training data's fingerprints)."""
    from dataclasses import replace

    from thresher.pipeline.io.outputs import check_outputs
    from thresher.pipeline.models.resolve import check_device, pick_device
    from thresher.pipeline.training.classifier import ClassifierConfig
    from thresher.pipeline.training.classifier import train_classifier as fit

    check_device(device)
    positive, negative = [Path(p) for p in positive or ()], [Path(n) for n in negative or ()]
    pool = Path(pool) if pool else None
    check_outputs([], [*positive, *negative, *([pool] if pool else [])], dir_outputs=[Path(out)])
    plain_rating = rate is not None and (label is None or label.strip() in ("rating",))
    cfg = ClassifierConfig(kind=kind, task=task or ("regression" if plain_rating else "binary"),
                           device=pick_device(device), **config)
    cfg.check()
    sets, rubric_threshold, store = _labelled_sets(
        positive, negative, pool, label, rate, rate_model, rate_sample, rate_max_tokens,
        config.get("seed", 0), device, workdir)
    if cfg.threshold is None and rubric_threshold is not None and cfg.task == "regression":
        cfg = replace(cfg, threshold=rubric_threshold)
    return fit(sets, Path(out), cfg, store)


def _labelled_sets(positive, negative, pool, label, rate, rate_model, rate_sample, max_tokens,
                   seed, device, workdir):
    """The labelled inputs and, with --rate, the rubric's threshold."""
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.select import default_workdir
    from thresher.pipeline.training.labels import from_files, from_rule

    if (positive or negative) and pool:
        raise ValueError("give --positive/--negative inputs, or --pool with --label or --rate, "
                         "not both")
    if positive or negative:
        if label or rate:
            raise ValueError("--label and --rate go with --pool")
        store = ArtifactStore(workdir or default_workdir(Path(positive[0] if positive else negative[0])))
        return from_files(list(positive or []), list(negative or [])), None, store
    if pool is None:
        raise ValueError("give --positive and --negative (files or pools), or --pool with "
                         "--label RULE or --rate RUBRIC")
    p = Pool(pool)
    store = ArtifactStore(workdir or default_workdir(p.path))
    if not rate:
        if not label:
            raise ValueError("--pool needs --label RULE (e.g. 'source=gsm8k', 'quality_label', "
                             "'score>=3') or --rate RUBRIC")
        return from_rule(p, label), None, store
    from thresher.pipeline.models.resolve import pick_device
    from thresher.pipeline.models.rubrics import load_rubric
    from thresher.pipeline.plan import run_stage
    from thresher.pipeline.stages.ratings import LmRatings

    stage = LmRatings(model=rate_model, rubric=rate, sample=rate_sample, seed=seed,
                      max_tokens=max_tokens)
    ratings = run_stage(stage, p, store, pick_device(device))
    extra = ratings.frame()
    return (from_rule(p, label or "rating", extra, f"{ratings.fingerprint}"),
            load_rubric(rate).threshold, store)


def methods(name: str | None = None) -> list[dict]:
    """Every method (or one): its summary, cost, typed parameters and needed stages."""
    from thresher.pipeline.registry import describe

    return describe(name)

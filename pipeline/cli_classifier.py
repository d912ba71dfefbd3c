"""`thresher classifier ...`: train a quality classifier from examples (the sub-commands of
`pipeline/cli.py`; the work is in `pipeline/training/classifier.py`).

    thresher classifier train --out clf --kind fasttext --positive good.jsonl --negative web/
    thresher classifier train --out clf --pool POOL --label 'source=gsm8k,mbpp'
    thresher classifier train --out edu --kind head --pool SAMPLE --rate edu --rate-sample 0.2
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Quality classifiers: train one from examples or LM ratings.")


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


@app.command()
def train(
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
    from thresher.pipeline.cli import _fail
    from thresher.pipeline.io.outputs import check_outputs
    from thresher.pipeline.models.resolve import check_device, pick_device
    from thresher.pipeline.training.classifier import ClassifierConfig, train_classifier

    try:
        check_device(device)
        inputs = [*(positive or []), *(negative or []), *([pool] if pool else [])]
        check_outputs([], inputs, dir_outputs=[out])
        plain_rating = rate is not None and (label is None or label.strip() in ("rating",))
        cfg = ClassifierConfig(kind=kind, task=task or ("regression" if plain_rating else "binary"),
                               part=part, holdout=holdout, seed=seed, threshold=threshold,
                               embedder=embedder, hidden=hidden, epochs=epochs, lr=lr,
                               ngrams=ngrams, bucket=bucket, device=pick_device(device))
        cfg.check()
        sets, rubric_threshold, store = _labelled_sets(
            positive, negative, pool, label, rate, rate_model, rate_sample, rate_max_tokens,
            seed, device, workdir)
        if cfg.threshold is None and rubric_threshold is not None and cfg.task == "regression":
            from dataclasses import replace

            cfg = replace(cfg, threshold=rubric_threshold)
        info = train_classifier(sets, out, cfg, store)
    except Exception as e:  # noqa: BLE001 - _fail re-raises programming errors
        _fail(e)
    for line in summary_lines(info, out):
        typer.echo(line)


def summary_lines(info, out: Path) -> list[str]:
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

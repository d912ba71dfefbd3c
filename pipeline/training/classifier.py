"""Train a quality classifier from labelled rows (`labels.py`) and write it as one directory.

    cfg = ClassifierConfig(kind="fasttext")                 # DCLM's recipe
    cfg = ClassifierConfig(kind="head", task="regression")  # FineWeb-Edu's recipe (on LM ratings)
    info = train_classifier(sets, Path("out/clf"), cfg, store)

fastText (DCLM, `baselines/train_fasttext_classifier.py` and the published model's name
"..._bigram_..."): lr 0.1, dim 100, window 5, 5 epochs, minCount 1, word bigrams, on the
normalised text (`classifiers.fasttext_text`); one thread, seeded, so a rerun gives the same model.

head: the embedding stage's vectors (a pool's cached `Embed` output; a file's rows embedded in
memory with the same `ShardEmbedder`), then scikit-learn: logistic regression (binary) or ridge
regression (regression) when `hidden` is 0 (FineWeb-Edu: one linear regression output on a frozen
encoder), their regularisation chosen by cross-validation on the training rows (RidgeCV's
leave-one-out, LogisticRegressionCV's 5 folds by ROC AUC), else a one-hidden-layer MLP;
exported to safetensors (`classifiers.Head`).

Held-out rows are chosen by a seeded hash of the id (`holdout` of them); the metrics (accuracy,
ROC AUC; for a regression also MSE and Spearman's rho, and accuracy / AUC of the values cut at
`threshold`) go to classifier.json beside the model with every input's fingerprint and rule.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from thresher.pipeline.models.classifiers import (
    CLASSIFIER_JSON,
    FASTTEXT_FILE,
    NEGATIVE,
    PARTS,
    POSITIVE,
    ClassifierInfo,
    FastTextModel,
    Head,
    fasttext_text,
    part_text,
)
from thresher.pipeline.training.labels import LabelledSet, check_classes

KINDS = ("fasttext", "head")
TASKS = ("binary", "regression")


@dataclass(frozen=True)
class ClassifierConfig:
    kind: str = "fasttext"
    task: str = "binary"
    part: str = "conversation"
    holdout: float = 0.1
    seed: int = 0
    threshold: float | None = None        # the cut stored with the model (and for metrics)
    embedder: str = "all-minilm-l6-v2"    # head
    hidden: int = 0                       # head: 0 = linear, else one hidden layer of this size
    epochs: int = 5                       # fastText
    lr: float = 0.1                       # fastText
    ngrams: int = 2                       # fastText word n-grams
    bucket: int = 2_000_000               # fastText n-gram hash buckets (its default; the model
                                          # file is about bucket x 100 x 4 bytes)
    balance: bool = True                  # binary: repeat the smaller class's rows to match
    device: str = "cpu"

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r}: expected one of {', '.join(TASKS)}")
        if self.part not in PARTS:
            raise ValueError(f"--part {self.part!r}: expected one of {', '.join(PARTS)}")
        if self.kind == "fasttext" and self.task == "regression":
            raise ValueError("--kind fasttext trains classes; for a regression use --kind head, "
                             "or cut the values with --label 'FIELD>=X'")
        if not 0 < self.holdout < 1:
            raise ValueError(f"--holdout {self.holdout}: must be in (0, 1)")
        if self.hidden < 0 or self.epochs < 1 or self.ngrams < 1 or self.lr <= 0 or self.bucket < 1:
            raise ValueError("--hidden must be >= 0, --epochs, --ngrams and --bucket >= 1, --lr > 0")


def _held_out(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    from thresher.pipeline.stages.ratings import in_sample

    return np.array([in_sample(f"holdout:{i}", fraction, seed) for i in ids], dtype=bool)


def _texts(s: LabelledSet, part: str) -> list[dict]:
    if s.rows is not None:
        return s.rows
    cols = ["id", "source", "kind", "messages", "text"]
    frame = s.pool.frame(cols)[s.pool_rows]
    return frame.to_dicts()


def _readable(rows: list[dict], part: str) -> np.ndarray:
    return np.array([part_text(r, part) is not None for r in rows], dtype=bool)


def _metrics(y: np.ndarray, score: np.ndarray, task: str, threshold: float | None) -> dict:
    from sklearn.metrics import mean_squared_error, roc_auc_score

    def auc(labels, s):
        return float(roc_auc_score(labels, s)) if 0 < labels.sum() < len(labels) else None

    out: dict = {"rows": len(y)}
    if task == "binary":
        cut = 0.5 if threshold is None else threshold
        out.update(accuracy=float(((score >= cut) == (y == 1)).mean()), auc=auc(y, score),
                   cut=cut, positive=int(y.sum()), negative=int(len(y) - y.sum()))
        return out
    from scipy.stats import spearmanr

    out.update(mse=float(mean_squared_error(y, score)),
               spearman=float(spearmanr(y, score).statistic) if np.unique(y).size > 1 else None)
    if threshold is not None:
        yb = (y >= threshold).astype(float)
        out.update(cut=threshold, accuracy=float(((score >= threshold) == (yb == 1)).mean()),
                   auc=auc(yb, score), positive=int(yb.sum()), negative=int(len(yb) - yb.sum()))
    return out


def _training_order(y: np.ndarray, cfg: ClassifierConfig) -> np.ndarray:
    """Indices of the training rows in a seeded shuffled order (fastText's SGD reads its file in
    order: class blocks would skew it); with `balance`, the smaller class repeated (tiled) up to
    the larger one's count, as DCLM trained on equal classes."""
    idx = np.arange(len(y))
    if cfg.task == "binary" and cfg.balance:
        pos, neg = idx[y == 1], idx[y == 0]
        small, big = (pos, neg) if len(pos) < len(neg) else (neg, pos)
        idx = np.concatenate([big, np.resize(small, len(big))])
    return idx[np.random.default_rng(cfg.seed).permutation(len(idx))]


def _fit_fasttext(texts: list[str], y: np.ndarray, cfg: ClassifierConfig, out: Path):
    try:
        import fasttext
    except ModuleNotFoundError:
        raise ModuleNotFoundError("--kind fasttext needs fastText's trainer: pip install "
                                  "fasttext-numpy2") from None
    if not hasattr(fasttext, "train_supervised"):
        raise ModuleNotFoundError("the installed fasttext module predicts only (fasttext-predict); "
                                  "training needs: pip install fasttext-numpy2")
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.txt"
        with open(train, "w", encoding="utf-8") as f:
            f.writelines(f"{POSITIVE if y[i] == 1 else NEGATIVE} {texts[i]}\n"
                         for i in _training_order(y, cfg))
        try:
            model = fasttext.train_supervised(input=str(train), lr=cfg.lr, dim=100, ws=5,
                                              epoch=cfg.epochs, minCount=1, wordNgrams=cfg.ngrams,
                                              bucket=cfg.bucket, thread=1, seed=cfg.seed, verbose=0)
        except RuntimeError as e:
            if "NaN" not in str(e):
                raise
            raise ValueError(f"fastText training diverged ({e}); retry with a lower --lr "
                             f"(was {cfg.lr})") from None
    model.save_model(str(out / FASTTEXT_FILE))
    ft = FastTextModel(out / FASTTEXT_FILE)
    return lambda ts: np.array([ft.p_positive(t) for t in ts])


def _fit_head(x: np.ndarray, y: np.ndarray, cfg: ClassifierConfig) -> Head:
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    order = _training_order(y, cfg)
    x, y = x[order].astype(np.float64), y[order]
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6       # standardised inputs, folded back below
    z = (x - mu) / sd
    if cfg.hidden == 0:      # the regularisation chosen by cross-validation on the training rows
        if cfg.task == "binary":
            folds = int(min(5, (y == 1).sum(), (y == 0).sum()))
            model = LogisticRegressionCV(Cs=np.logspace(-4, 2, 7), cv=max(folds, 2),
                                         scoring="roc_auc", max_iter=5000)
        else:
            model = RidgeCV(alphas=np.logspace(-2, 5, 15))
        model.fit(z, y)
        layers = [(np.asarray(model.coef_).reshape(1, -1).T,
                   np.atleast_1d(np.asarray(model.intercept_)).reshape(1))]
    else:
        cls = MLPClassifier if cfg.task == "binary" else MLPRegressor
        model = cls(hidden_layer_sizes=(cfg.hidden,), random_state=cfg.seed, max_iter=1000,
                    early_stopping=len(y) >= 1000)
        model.fit(z, y)
        layers = list(zip(model.coefs_, model.intercepts_))
    w0, b0 = layers[0]                 # ((x - mu) / sd) @ W + b  ==  x @ (W / sd) + (b - (mu / sd) @ W)
    layers[0] = (w0 / sd[:, None], b0 - (mu / sd) @ w0)
    return Head([(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in layers],
                cfg.task)


def _vectors(sets: list[LabelledSet], rows_of: list[list[dict]], cfg: ClassifierConfig,
             store) -> tuple[np.ndarray, dict]:
    """Embedding vectors of every labelled row: a pool's from its cached embedding stage."""
    from thresher.pipeline.models.resolve import model_identity
    from thresher.pipeline.plan import run_stage
    from thresher.pipeline.stages.embed import Embed

    stage = Embed(model=cfg.embedder, part=cfg.part).bind(cfg.device)
    parts, embedder = [], None
    for s, rows in zip(sets, rows_of):
        if s.pool is not None:
            emb = run_stage(stage, s.pool, store, cfg.device)
            parts.append(np.asarray(emb.matrix()[s.pool_rows], dtype=np.float32))
        else:
            embedder = embedder or stage.open_worker(cfg.device)
            parts.append(embedder(rows).astype(np.float32))
    info = {"model": cfg.embedder, "identity": model_identity(cfg.embedder), "part": cfg.part,
            "dtype": stage.dtype, "max_seq_length": None, "normalize": True,
            "dim": int(parts[0].shape[1])}
    return np.concatenate(parts), info


def train_classifier(sets: list[LabelledSet], out: Path, cfg: ClassifierConfig, store) -> ClassifierInfo:
    """Fit on the rows outside the held-out split, measure on it, write `out/` (a temporary
    directory, renamed onto `out` when complete)."""
    from thresher.pipeline.artifacts import write_json_atomic
    from thresher.pipeline.io.outputs import clean_stale, replace_dir, temp_name

    cfg.check()
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not (out / CLASSIFIER_JSON).is_file():
        raise FileExistsError(f"{out} exists and is not a classifier directory written by "
                              "thresher; refusing to replace it")
    t0 = time.perf_counter()
    counts = check_classes(sets, cfg.task)
    rows_of = [_texts(s, cfg.part) for s in sets]
    ok = [_readable(r, cfg.part) for r in rows_of]
    unreadable = {s.name: int((~k).sum()) for s, k in zip(sets, ok) if (~k).any()}
    sets = [_subset(s, k) for s, k in zip(sets, ok)]
    rows_of = [[r for r, keep in zip(rows, k) if keep] for rows, k in zip(rows_of, ok)]
    counts = check_classes(sets, cfg.task)
    y = np.concatenate([s.labels for s in sets])
    ids = [f"{k}:{r['id']}" for k, rows in enumerate(rows_of) for r in rows]   # not the paths
    test = _held_out(ids, cfg.holdout, cfg.seed)
    if test.all() or not test.any():
        raise ValueError(f"{len(y)} rows are too few to hold {cfg.holdout:.0%} out; give more rows")
    check_classes([LabelledSet("train", y[~test])], cfg.task)
    clean_stale(out)
    tmp = temp_name(out)
    tmp.mkdir(parents=True)
    try:
        embedder = None
        if cfg.kind == "fasttext":
            texts = [fasttext_text(r, cfg.part) for rows in rows_of for r in rows]
            predict = _fit_fasttext([t for t, h in zip(texts, test) if not h], y[~test], cfg, tmp)
            score = predict(texts)
        else:
            x, embedder = _vectors(sets, rows_of, cfg, store)
            head = _fit_head(x[~test], y[~test], cfg)
            head.save(tmp)
            score = head.predict(x)
            if cfg.task == "regression":
                score = np.clip(score, y.min(), y.max())
        info = ClassifierInfo(
            kind=cfg.kind, task=cfg.task, part=cfg.part, threshold=cfg.threshold,
            threshold_source="given when training" if cfg.threshold is not None else "",
            embedder=embedder,
            clip=[float(y.min()), float(y.max())] if cfg.task == "regression" else None,
            metrics={"held_out": _metrics(y[test], score[test], cfg.task, cfg.threshold),
                     "train": _metrics(y[~test], score[~test], cfg.task, cfg.threshold)},
            training={"inputs": [s.describe() for s in sets], "counts": counts,
                      "unreadable": unreadable, "holdout": cfg.holdout, "seed": cfg.seed,
                      "config": cfg.__dict__, "seconds": round(time.perf_counter() - t0, 2)})
        write_json_atomic(tmp / CLASSIFIER_JSON, info.as_dict())
        replace_dir(tmp, out, lambda p: (p / CLASSIFIER_JSON).is_file())
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _subset(s: LabelledSet, keep: np.ndarray) -> LabelledSet:
    if keep.all():
        return s
    from dataclasses import replace

    excluded = dict(s.excluded)
    excluded["no text"] = excluded.get("no text", 0) + int((~keep).sum())
    if s.rows is not None:
        return replace(s, rows=[r for r, k in zip(s.rows, keep) if k], labels=s.labels[keep],
                       excluded=excluded)
    return replace(s, pool_rows=s.pool_rows[keep], labels=s.labels[keep], excluded=excluded)

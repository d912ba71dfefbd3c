"""Quality models on the shared pool: what a DCLM-style classifier keeps, what each scorer costs,
and how far a classifier trained on LM ratings agrees with them (issue 24).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/quality_models.py [--data DIR] [--rows 400]

(a) dclm      the whole shared pool ingested; a fastText classifier (DCLM's recipe: word bigrams,
              normalised text) trained on instruction responses (every chat row's assistant turns,
              `--label kind=chat --part response`) vs web text (the pool's C4 and Wikipedia rows);
              held-out accuracy / AUC, and what the top 10% (DCLM's keep share) holds by
              capability, against the pool.
(c) speed     `--rows` rows (an equal seeded share of every pool file) in shards of 100; each stage
              run over them in one process, one after the other, on a fresh artifact store: the
              embedding stage (MiniLM), the forward stage (SmolLM2, loss statistics), the
              classifier stage for fastText, for an embedding head, and for a FineWeb-Edu-format
              encoder (a random BERT-base stand-in of the real classifier's shape: 12 layers,
              768 wide, 512 tokens; the weights cannot be fetched, the cost does not depend on
              them), and LM ratings with the edu and deita rubrics (SmolLM2). Rows/s of each
              (model load excluded: timed apart) and the ratio to the embedding stage.
(d) agreement the edu and deita ratings of (c)'s rows (the same stages, in a stable artifact
              store) train a regression head each (the FineWeb-Edu recipe: MiniLM vectors,
              linear, its regularisation cross-validated, 25% held out); Spearman's rho between the rating and
              the head's score on the held-out rows, and the agreement of the two at the rubric's
              cut (edu: 2.5) or at the median (deita).

Outputs under `--out` (default bench/out/quality-models): results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import polars as pl
import shared_data

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args) -> str:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "thresher.pipeline.cli", *map(str, args)],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"thresher {' '.join(map(str, args[:3]))} failed: {r.stderr.strip()}")
    return r.stdout


def dclm(a, out: Path) -> dict:
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.select import run_select

    pool_dir = out / "shared-pool"
    if not (pool_dir / "pool.json").exists():
        ingest([a.data / "pool"], pool_dir)
    pool = Pool(pool_dir)
    clf = out / "dclm-ft"
    t0 = time.perf_counter()
    if not (clf / "classifier.json").exists():
        run_cli("classifier", "train", "--out", clf, "--pool", pool_dir, "--label", "kind=chat",
                "--part", "response", "--workdir", out / "work")
    train_s = time.perf_counter() - t0
    info = json.loads((clf / "classifier.json").read_text())
    sel = out / "dclm-top10.jsonl"
    t0 = time.perf_counter()
    m = run_select(pool_dir, "classifier", "10%", sel, workdir=out / "work",
                   params={"model": str(clf)})
    score_s = time.perf_counter() - t0
    scores = pl.read_parquet(m["scores"])
    cap = pool.frame(["id", "source"]).with_columns(pool.meta_field("capability"))
    kept = set(pl.read_parquet(f"{sel}.selection.parquet")["id"])
    frame = cap.join(scores, on="id").with_columns(kept=pl.col("id").is_in(list(kept)))
    by_cap = frame.group_by("capability").agg(pool=pl.len(), kept=pl.col("kept").sum(),
                                              median=pl.col("quality_score").median())
    web = frame.filter(pl.col("capability") == "pretrain")
    from thresher.pipeline.models.classifiers import DCLM_THRESHOLD
    return {"pool_rows": pool.n_rows, "held_out": info["metrics"]["held_out"],
            "counts": info["training"]["counts"], "train_seconds": round(train_s, 1),
            "score_seconds": round(score_s, 1), "kept": len(kept),
            "by_capability": sorted(by_cap.to_dicts(), key=lambda r: -r["kept"]),
            "web_rows_kept": int(web["kept"].sum()), "web_rows": web.height,
            "saturated": int((frame["quality_score"] >= 0.9999).sum()),
            "web_above_dclm_cut": int((web["quality_score"] >= DCLM_THRESHOLD).sum()),
            "chat_above_dclm_cut": int((frame.filter(pl.col("capability") != "pretrain")
                                        ["quality_score"] >= DCLM_THRESHOLD).sum())}


def speed_pool(a, out: Path):
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.io.pool import Pool

    pool_dir = out / f"speed-pool-{a.rows}"
    if not (pool_dir / "pool.json").exists():
        files = sorted(p.name for p in (a.data / "pool").glob("*.jsonl"))
        rows = shared_data.sample_rows(a.rows, files, seed=0)
        src = out / f"speed-rows-{a.rows}.jsonl"
        with open(src, "w") as f:
            for r in rows:
                rec = {"id": r["id"], "source": r["source"]}
                rec.update({"messages": r["messages"]} if r["kind"] == "chat" else {"text": r["text"]})
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        ingest([src], pool_dir, rows_per_shard=100)
    return Pool(pool_dir)


def fineweb_edu_standin(out: Path) -> Path:
    """A random BERT-base with one regression output and MiniLM's tokenizer: the published
    FineWeb-Edu classifier's shape (its base, Snowflake arctic-embed-m, is a BERT-base)."""
    d = out / "fineweb-edu-standin"
    if (d / "config.json").exists():
        return d
    import torch
    from thresher.pipeline.models.resolve import DEFAULT_EMBEDDER, resolve
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(resolve(DEFAULT_EMBEDDER).path)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, num_labels=1,
                                                     problem_type="regression"))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _load_seconds(stage) -> float:
    t0 = time.perf_counter()
    worker = stage.open_worker("cpu")
    seconds = time.perf_counter() - t0
    del worker
    return seconds


def timed_stage(stage, pool, store) -> dict:
    """The stage through the plan (model load, every shard, the artifacts written); the model's
    load is timed again after it (from the page cache, as the plan's own load was: a first,
    cold load comes before) and subtracted for rows/s."""
    from thresher.pipeline.executors import LocalExecutor
    from thresher.pipeline.plan import make_plan

    plan = make_plan([stage], "cpu")
    bound = plan.roots[0]
    _load_seconds(bound)                       # cold: files into the page cache
    outputs, stats = plan.run(pool, store, LocalExecutor())
    load = _load_seconds(bound)
    st = stats[-1]
    # a stage whose whole run is within the load's noise (fastText) gets rows / total seconds:
    # a lower bound, marked
    bound_only = st.seconds <= 2 * load
    compute = st.seconds if bound_only else st.seconds - load
    return {"stage": st.stage, "describe": bound.describe(), "rows": pool.n_rows,
            "tokens": st.tokens, "load_s": round(load, 2), "total_s": round(st.seconds, 2),
            "rows_per_s": round(pool.n_rows / compute, 2), "lower_bound": bound_only,
            "output": outputs[bound]}


def speed(a, out: Path, pool) -> tuple[list[dict], dict]:
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.stages.classifier_scores import ClassifierScores
    from thresher.pipeline.stages.embed import Embed
    from thresher.pipeline.stages.forward import Forward
    from thresher.pipeline.stages.ratings import LmRatings

    store = ArtifactStore(out / f"speed-work-{time.strftime('%Y%m%d%H%M%S')}")
    # the classifiers scored here: (a)'s fastText model, and a head on the pool's own labels
    head = out / "speed-head"
    if not (head / "classifier.json").exists():
        run_cli("classifier", "train", "--out", head, "--kind", "head", "--pool", pool.path,
                "--label", "kind=chat", "--workdir", out / "work")
    stages = [("embed (MiniLM)", Embed()),
              ("forward (SmolLM2, loss stats)", Forward(stats=True, max_tokens=a.max_tokens)),
              ("classifier: fastText", ClassifierScores(model=str(out / "dclm-ft"))),
              ("classifier: MiniLM + linear head", ClassifierScores(model=str(head))),
              ("classifier: FineWeb-Edu format (BERT-base)",
               ClassifierScores(model=str(fineweb_edu_standin(out)))),
              ("LM rating: edu (SmolLM2)", LmRatings(rubric="edu", max_tokens=a.max_tokens)),
              ("LM rating: deita (SmolLM2)", LmRatings(rubric="deita", max_tokens=a.max_tokens))]
    rows, outputs = [], {}
    for label, stage in stages:
        r = timed_stage(stage, pool, store)
        outputs[label] = r.pop("output")
        rows.append({"label": label, **r})
        print(f"  {label}: {r['rows_per_s']} rows/s (load {r['load_s']} s)", flush=True)
    base = rows[0]["rows_per_s"]
    for r in rows:
        r["vs_embed"] = round(r["rows_per_s"] / base, 3)
    return rows, outputs


def agreement(a, out: Path, pool) -> list[dict]:
    """The ratings from a stable artifact store (`out/work`: computed once, then cached)."""
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.plan import run_stage
    from thresher.pipeline.stages.ratings import LmRatings
    from thresher.pipeline.training.classifier import ClassifierConfig, train_classifier
    from thresher.pipeline.training.labels import from_rule

    store = ArtifactStore(out / "work")
    res = []
    for rubric in ("edu", "deita"):
        ratings = run_stage(LmRatings(rubric=rubric, max_tokens=a.max_tokens), pool, store)
        frame = ratings.frame()
        sets = from_rule(pool, "rating", frame, ratings.fingerprint)
        cut = 2.5 if rubric == "edu" else float(frame["rating"].median())
        cfg = ClassifierConfig(kind="head", task="regression", holdout=0.25, threshold=cut)
        info = train_classifier(sets, out / f"{rubric}-head", cfg, store)
        held = info.metrics["held_out"]
        rated = frame.filter(pl.col("rating").is_not_null())
        res.append({"rubric": rubric, "rated": rated.height, "unrated": frame.height - rated.height,
                    "rating_mean": float(rated["rating"].mean()),
                    "rating_sd": float(rated["rating"].std()), "cut": cut,
                    "held_out": held, "train_spearman": info.metrics["train"]["spearman"]})
    return res


def markdown(res: dict) -> str:
    lines = []
    if "dclm" in res:
        d = res["dclm"]
        h = d["held_out"]
        lines += [(f"(a) DCLM-style fastText, instruction responses ({d['counts']['positive']}) vs "
                  f"web text ({d['counts']['negative']}) of the {d['pool_rows']}-row shared pool: "
                  f"held-out accuracy {h['accuracy']:.3f}, AUC {h['auc']:.3f} ({h['rows']} rows); "
                  f"trained in {d['train_seconds']} s, scored and cut in {d['score_seconds']} s. "
                  f"Top 10% ({d['kept']} rows) keeps {d['web_rows_kept']} of {d['web_rows']} "
                  f"web rows; {d['saturated']} rows score p(hq) >= 0.9999 (ties, cut by id); at "
                  f"DCLM's published cut (p >= 0.018112) {d['web_above_dclm_cut']} of "
                  f"{d['web_rows']} web rows and {d['chat_above_dclm_cut']} chat rows pass."), "",
                  "| capability | pool rows | kept (top 10%) | share kept | median p(hq) |",
                  "|---|---:|---:|---:|---:|"]
        for r in d["by_capability"]:
            lines.append(f"| {r['capability']} | {r['pool']} | {r['kept']} | "
                         f"{r['kept'] / r['pool']:.1%} | {r['median']:.3f} |")
        lines.append("")
    if "speed" in res:
        lines += ["(c) scoring speed, one process, the same rows:", "",
                  "| stage | rows | tokens | load s | total s | rows/s | vs embed |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in res["speed"]:
            at_least = ">= " if r.get("lower_bound") else ""
            lines.append(f"| {r['label']} | {r['rows']} | {r['tokens']} | {r['load_s']} | "
                         f"{r['total_s']} | {at_least}{r['rows_per_s']} | {at_least}{r['vs_embed']}x |")
        lines.append("")
    if "agreement" in res:
        lines += ["(d) a regression head (MiniLM, linear) trained on the LM's ratings:", "",
                  ("| rubric | rated rows | rating mean (sd) | held-out rows | Spearman (held "
                   "out) | MSE | cut | agreement at the cut | AUC at the cut |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["agreement"]:
            h = r["held_out"]
            auc = "-" if h.get("auc") is None else f"{h['auc']:.3f}"
            lines.append(f"| {r['rubric']} | {r['rated']} | {r['rating_mean']:.3f} "
                         f"({r['rating_sd']:.3f}) | {h['rows']} | {h['spearman']:.3f} | "
                         f"{h['mse']:.4f} | {r['cut']:.3g} | {h.get('accuracy', float('nan')):.3f} "
                         f"| {auc} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=shared_data.SHARED)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "quality-models")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=768)
    ap.add_argument("--parts", nargs="+", default=["dclm", "speed", "agreement"],
                    choices=["dclm", "speed", "agreement"])
    a = ap.parse_args(argv)
    if not (a.data / "pool").is_dir():
        ap.error(f"{a.data}/pool not found: the shared data is needed (--data DIR)")
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict = {"args": {k: str(v) for k, v in vars(a).items()}}
    if "dclm" in a.parts or "speed" in a.parts:      # speed scores with (a)'s classifier
        res["dclm"] = dclm(a, a.out)
        print(markdown({"dclm": res["dclm"]}), flush=True)
    if "speed" in a.parts:
        res["speed"], _ = speed(a, a.out, speed_pool(a, a.out))
    if "agreement" in a.parts:
        res["agreement"] = agreement(a, a.out, speed_pool(a, a.out))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    text = markdown(res)
    (a.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (a.out / "table.md").write_text(text)
    print(text + f"\n{res['seconds']:.0f} s; {a.out / 'table.md'}")


if __name__ == "__main__":
    main()

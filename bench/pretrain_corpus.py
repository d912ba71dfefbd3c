"""Build a pretraining pool of N documents (100k, 1M, ...) with planted duplicates, rule failures
and evaluation leaks, and its ground truth, for bench/pretrain_scale.py.

    .venv/bin/python bench/pretrain_corpus.py --docs 1000000 [--out bench/out/pretrain] [--seed 0]

Writes under OUT/<N>/ (bench/out/ is git-ignored):
    src/part-XXXX.parquet   id, text: 100,000 documents per file
    truth/pairs.parquet     planted near-duplicate pairs: id_a (the original), id_b (the copy),
                            level (the Jaccard aimed at), jaccard (the exact word 5-gram Jaccard
                            after DataTrove's normalisation, measured), cluster (a group id for
                            copies of one original made as a cluster, else null)
    truth/rules.parquet     id, failure: documents made to fail one quality rule
    truth/leaks.parquet     id, eval_file, eval_id: documents holding an evaluation row
    truth/bad.parquet       id, kind: hostile inputs (a 10 MB document, one repeated character,
                            binary junk, mixed scripts, whitespace only; not with --no-bad)
    info.json               counts, the command, seconds

Documents: paragraphs of 2-7 sentences drawn at random from the sentences of the shared data's
plain-text rows (C4 and Wikipedia samples: about 12k sentences), until a length drawn from a
log-normal of mean 2,500 characters. Two such documents share a sentence or two at most, so
background pairs have word 5-gram Jaccard near 0.

Near-duplicates (`--dup-share`, default 4% of documents): a copy of an earlier document with each
word replaced, with probability e, by a random word of the vocabulary, e chosen so that the
expected Jaccard is the level aimed at (q / (2 - q), q = (1 - e)^5 the share of intact 5-grams);
level 1.0 is an exact copy with its case and spacing changed. The levels are spread from 0.3 to
1.0 so that recall (pairs at >= 0.8) and false duplicates (pairs below 0.5) can both be counted;
the exact Jaccard of every pair is measured and recorded. A further 0.2% of originals get 4
copies each at levels 0.85-1.0 (clusters of 5).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shared_data

ROOT = Path(__file__).resolve().parent.parent
FILE_DOCS = 100_000
LEVELS = np.array([0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0])
RULE_FAILURES = ("too_short", "repeated_lines", "bullets", "lorem_ipsum", "curly_brace",
                 "ellipsis_lines", "hash_symbols", "non_alpha")
EVAL_FILES = ("gsm8k_test.jsonl", "mbpp_test.jsonl", "t0_p3_heldout.jsonl")


TEXT_SOURCES = ("llamafactory_c4_demo", "llamafactory_wiki_demo")


def sentences(sources: tuple[str, ...] = TEXT_SOURCES) -> list[str]:
    out = []
    for name in (f"{s}.jsonl" for s in sources):
        for line in (shared_data.SHARED / "pool" / name).read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            for para in re.split(r"\n+", json.loads(line)["text"]):
                out += [s for s in re.split(r"(?<=[.!?])\s+", para.strip()) if len(s.split()) >= 4]
    return out


def make_doc(rng: np.random.Generator, sents: list[str], mean_len: float = 2500) -> str:
    target = rng.lognormal(np.log(mean_len - 300) - 0.18, 0.6)   # + the last paragraph ~= mean_len
    paras, size = [], 0
    while size < target:
        para = " ".join(sents[i] for i in rng.integers(0, len(sents), rng.integers(2, 8)))
        paras.append(para)
        size += len(para) + 2
    return "\n\n".join(paras)


def edit_rate(level: float) -> float:
    q = 2 * level / (1 + level)           # J = q / (2 - q)
    return 1 - q ** (1 / 5)


def near_copy(rng: np.random.Generator, text: str, level: float, vocab: list[str]) -> str:
    if level >= 1.0:                       # same words: case and spacing only
        return text.upper().replace(" ", "  ", 3)
    parts = re.split(r"(\s+)", text)
    e = edit_rate(level)
    for i in range(0, len(parts), 2):
        if parts[i] and rng.random() < e:
            parts[i] = vocab[rng.integers(len(vocab))]
    return "".join(parts)


def jaccards(a: list[str], b: list[str]) -> np.ndarray:
    """Exact word 5-gram Jaccard (DataTrove normalisation, xxh64 shingles) of each pair."""
    from thresher.pipeline.stages.decontam import ngrams_of

    ha, oa, _ = ngrams_of(a, 5, True)
    hb, ob, _ = ngrams_of(b, 5, True)
    out = np.empty(len(a))
    for i in range(len(a)):
        x, y = np.unique(ha[oa[i]:oa[i + 1]]), np.unique(hb[ob[i]:ob[i + 1]])
        union = len(np.union1d(x, y))
        out[i] = len(np.intersect1d(x, y, assume_unique=True)) / union if union else 1.0
    return out


def rule_failure(rng: np.random.Generator, kind: str, sents: list[str], base: str) -> str:
    pick = lambda k: [sents[i] for i in rng.integers(0, len(sents), k)]
    if kind == "too_short":
        return " ".join(base.split()[: int(rng.integers(8, 40))])
    if kind == "repeated_lines":
        line = pick(1)[0]
        return "\n".join([line] * int(rng.integers(8, 30)) + pick(2))
    if kind == "bullets":
        return "\n".join("• " + s for s in pick(int(rng.integers(10, 25))))
    if kind == "lorem_ipsum":
        return base + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit, sed do."
    if kind == "curly_brace":
        return base + "\n\nfunction update(state) { return state.value + 1; } is the handler."
    if kind == "ellipsis_lines":
        return "\n".join(s.rstrip(".!?") + "..." for s in pick(int(rng.integers(10, 25))))
    if kind == "hash_symbols":
        return " ".join(w if rng.random() > 0.3 else "#" for w in base.split())
    return "\n".join(" ".join(str(int(x)) for x in rng.integers(0, 10**6, 12))
                     for _ in range(int(rng.integers(20, 40))))


def eval_rows(files: list[Path], min_words: int = 20) -> list[tuple[str, str, str]]:
    """(file, id, text) of evaluation rows long enough to hold 13-grams: the user turn."""
    out = []
    for path in files:
        name = path.name
        for line in path.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            r = json.loads(line)
            text = next(m["content"] for m in r["messages"] if m["role"] == "user")
            if len(text.split()) >= min_words:
                out.append((name, r["id"], text))
    return out


def bad_inputs(rng: np.random.Generator, sents: list[str]) -> list[tuple[str, str]]:
    big = []
    while sum(map(len, big)) < 10_000_000:
        big.append(" ".join(sents[i] for i in rng.integers(0, len(sents), 50)))
    junk = bytes(rng.integers(0, 256, 20_000, dtype=np.uint8)).decode("latin-1")
    return [("ten_megabytes", "\n\n".join(big)), ("one_character", "a" * 200_000),
            ("binary_junk", junk), ("mixed_scripts", "Hello мир 世界 مرحبا 123 こんにちは " * 50),
            ("whitespace_only", " \n\t " * 100)]


def foreign_docs(rng: np.random.Generator, n: int) -> list[str]:
    """Chinese documents: the answers of the shared Chinese Alpaca sample, a few per document."""
    path = shared_data.SHARED / "pool" / "llamafactory_alpaca_zh_demo.jsonl"
    answers = [json.loads(x)["messages"][-1]["content"]
               for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]
    return ["\n\n".join(answers[i] for i in rng.integers(0, len(answers), 4)) for _ in range(n)]


def build_chunk(rng, n, start, sents, vocab, evals, args) -> tuple[list, dict]:
    ids = [f"doc-{start + i:08d}" for i in range(n)]
    texts = [make_doc(rng, sents) for _ in range(n)]
    truth: dict[str, list] = {"pairs": [], "rules": [], "leaks": []}
    free = rng.permutation(n)
    take = iter(free)
    n_pairs = int(n * args.dup_share)
    for _ in range(n_pairs):                   # originals stay; copies overwrite other docs
        a, b = next(take), next(take)
        level = float(rng.choice(LEVELS))
        texts[b] = near_copy(rng, texts[a], level, vocab)
        truth["pairs"].append((ids[a], ids[b], level, None))
    for c in range(int(n * 0.002)):
        a = next(take)
        for _ in range(4):
            b = next(take)
            level = float(rng.choice([0.85, 0.9, 0.95, 1.0]))
            texts[b] = near_copy(rng, texts[a], level, vocab)
            truth["pairs"].append((ids[a], ids[b], level, f"{start}-{c}"))
    for _ in range(int(n * args.rule_share)):
        i = next(take)
        kind = RULE_FAILURES[int(rng.integers(len(RULE_FAILURES)))]
        texts[i] = rule_failure(rng, kind, sents, texts[i])
        truth["rules"].append((ids[i], kind))
    for _ in range(max(1, int(n * args.leak_share))):
        i = next(take)
        name, eid, text = evals[int(rng.integers(len(evals)))]
        paras = texts[i].split("\n\n")
        paras.insert(int(rng.integers(len(paras) + 1)), text)
        texts[i] = "\n\n".join(paras)
        truth["leaks"].append((ids[i], name, eid))
    return list(zip(ids, texts)), truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "pretrain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dup-share", type=float, default=0.04)
    ap.add_argument("--rule-share", type=float, default=0.02)
    ap.add_argument("--leak-share", type=float, default=0.0005)
    ap.add_argument("--leak-from", type=Path, nargs="+",
                    default=[shared_data.SHARED / "eval" / e for e in EVAL_FILES],
                    help="evaluation files whose rows are planted as leaks")
    ap.add_argument("--no-bad", action="store_true", help="no hostile inputs")
    ap.add_argument("--foreign", type=int, default=0, help="add this many Chinese documents")
    ap.add_argument("--sources", nargs="+", default=list(TEXT_SOURCES), choices=TEXT_SOURCES,
                    help="shared plain-text files the sentences come from")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = args.out / str(args.docs)
    (out / "src").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    sents = sentences(tuple(args.sources))
    vocab = sorted({w for s in sents for w in s.split()})
    evals = eval_rows(args.leak_from)
    truth: dict[str, list] = {"pairs": [], "rules": [], "leaks": []}
    for k, start in enumerate(range(0, args.docs, FILE_DOCS)):
        n = min(FILE_DOCS, args.docs - start)
        docs, part = build_chunk(rng, n, start, sents, vocab, evals, args)
        if k == 0 and args.foreign:
            docs += [(f"zh-{i:04d}", t) for i, t in enumerate(foreign_docs(rng, args.foreign))]
        if k == 0 and not args.no_bad:
            bad = bad_inputs(rng, sents)
            docs += [(f"bad-{kind}", text) for kind, text in bad]
            truth["bad"] = [(f"bad-{kind}", kind) for kind, _ in bad]
        for key in part:
            truth[key] += part[key]
        pq.write_table(pa.table({"id": [d[0] for d in docs], "text": [d[1] for d in docs]}),
                       out / "src" / f"part-{k:04d}.parquet")
        print(f"part {k}: {len(docs)} documents [{time.perf_counter() - t0:.0f}s]", flush=True)
    texts = {}
    for f in sorted((out / "src").glob("*.parquet")):
        t = pq.read_table(f)
        want = {p[0] for p in truth["pairs"]} | {p[1] for p in truth["pairs"]}
        for i, txt in zip(t["id"].to_pylist(), t["text"].to_pylist()):
            if i in want:
                texts[i] = txt
    pairs = truth["pairs"]
    jac = jaccards([texts[a] for a, *_ in pairs], [texts[b] for _, b, *_ in pairs])
    pq.write_table(pa.table({"id_a": [p[0] for p in pairs], "id_b": [p[1] for p in pairs],
                             "level": [p[2] for p in pairs], "jaccard": jac,
                             "cluster": pa.array([p[3] for p in pairs], pa.string())}),
                   out / "truth" / "pairs.parquet")
    for key, cols in (("rules", ("id", "failure")), ("leaks", ("id", "eval_file", "eval_id")),
                      ("bad", ("id", "kind"))):
        rows = truth.get(key, [])
        pq.write_table(pa.table({c: [r[j] for r in rows] for j, c in enumerate(cols)}),
                       out / "truth" / f"{key}.parquet")
    info = {"docs": args.docs, "seed": args.seed, "pairs": len(pairs),
            "pairs_at_least_0.8": int((jac >= 0.8).sum()), "pairs_below_0.5": int((jac < 0.5).sum()),
            "rule_failures": len(truth["rules"]), "leaks": len(truth["leaks"]),
            "bad": len(truth.get("bad", [])), "sentences": len(sents),
            "command": " ".join(sys.argv), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()

"""Build a synthetic pool of N rows (100k, 1M, ...) from the shared data, for the scale benchmark.

    .venv/bin/python bench/scale_data.py --rows 1000000 [--out bench/out/scale] [--seed 0]

Writes under OUT/<N>/ (bench/out/ is git-ignored; nothing here is committed):
    src/part-XXXX.jsonl   the rows, 100,000 per file, in the `messages` / `text` shapes
    embeddings.npy        float16 [N, 384]: stand-ins for all-MiniLM-L6-v2 vectors (unit norm)
    rds.npy               float16 [N, 576]: stand-ins for SmolLM2 RDS+ vectors (unit norm)
    targets_rds.npy       float16 [50, 576]: target-set vectors for RDS+
    info.json             counts of planted duplicates, sizes, the command

Rows: recombined from ../shared/data/pool (every source file): a chat row takes the prompt
turns of one conversation and the final assistant answer of another conversation of the same
source (so lengths stay realistic and nearly every row is new); a plain-text row joins two texts
of its source. Each row keeps `origin` (its source file) as a meta field for balanced selection.
Planted duplicates: 1% exact copies of an earlier row (new id) and 1% near copies (" Thanks."
appended to the first user turn, or to the text).

Vectors are synthetic (embedding 1M rows with MiniLM takes a day on this CPU; the embedding
stage is benchmarked on its own in bench/embedding.py): a row's vector is its source's topic
direction + its prompt's direction + noise, L2-normalised; an exact copy gets its original's
vector, a near copy its original's plus small noise (cosine ~0.99). Everything is seeded, and
vectors are written in blocks (memory stays bounded at any N).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import shared_data

ROOT = Path(__file__).resolve().parent.parent
SHARED = shared_data.SHARED / "pool"
FILE_ROWS = 100_000
BLOCK = 65_536
EMB_DIM, RDS_DIM, N_TARGETS = 384, 576, 50


def load_sources() -> dict[str, list[dict]]:
    from thresher.pipeline.io.readers import read_records
    from thresher.pipeline.io.schema import detect_shape, to_canonical

    out = {}
    for path in sorted(SHARED.glob("*.jsonl")):
        recs = [r for _, r, err in read_records(path) if err is None]
        shape = detect_shape(recs[0])
        rows = []
        for rec in recs:
            try:
                rows.append(to_canonical(rec, shape, path.stem))
            except ValueError:
                continue
        out[path.stem] = rows
    return out


def recombine(a: dict, b: dict) -> dict:
    """a's prompt turns with b's final answer (chat), or a's text + b's text (plain text)."""
    if a["kind"] == "text" or not a.get("messages"):
        return {"text": a["text"] + "\n\n" + (b.get("text") or "")}
    msgs = [dict(m) for m in a["messages"]]
    last_b = next((m for m in reversed(b.get("messages") or []) if m["role"] == "assistant"), None)
    last_a = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    if last_b is not None:
        msgs[last_a] = {"role": "assistant", "content": last_b["content"]}
    return {"messages": msgs[:last_a + 1]}


def near_copy(rec: dict) -> dict:
    if "text" in rec:
        return {"text": rec["text"] + " Thanks."}
    msgs = [dict(m) for m in rec["messages"]]
    i = next(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[i]["content"] += " Thanks."
    return {"messages": msgs}


def write_rows(sources, n: int, out: Path, seed: int):
    """The JSONL files; returns per row the prompt row (index over all source rows), the row it
    copies (or -1), the copy kind (0 none, 1 exact, 2 near), and the planted counts."""
    rng = random.Random(seed)
    names = sorted(sources)
    weights = [len(sources[s]) for s in names]
    offset = np.concatenate([[0], np.cumsum(weights)])
    src_of = np.zeros(n, dtype=np.int32)
    tmpl_of = np.zeros(n, dtype=np.int64)
    copy_of = np.full(n, -1, dtype=np.int64)
    copy_kind = np.zeros(n, dtype=np.int8)
    kinds = {"exact": 0, "near": 0}
    recent: list[dict] = []            # a window of earlier rows to copy from
    (out / "src").mkdir(parents=True, exist_ok=True)
    f = None
    for i in range(n):
        if i % FILE_ROWS == 0:
            if f:
                f.close()
            f = open(out / "src" / f"part-{i // FILE_ROWS:04d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        r = rng.random()
        if recent and r < 0.02:
            j = rng.randrange(len(recent))
            orig = recent[j]
            rec = dict(orig["rec"]) if r < 0.01 else near_copy(orig["rec"])
            kinds["exact" if r < 0.01 else "near"] += 1
            src_of[i], tmpl_of[i], copy_of[i] = orig["src"], orig["tmpl"], orig["i"]
            copy_kind[i] = 1 if r < 0.01 else 2
        else:
            s = rng.choices(range(len(names)), weights)[0]
            rows = sources[names[s]]
            a, b = rng.randrange(len(rows)), rng.randrange(len(rows))
            rec = recombine(rows[a], rows[b])
            src_of[i], tmpl_of[i] = s, offset[s] + a
            if len(recent) < 20_000:
                recent.append({"rec": rec, "src": s, "tmpl": a, "i": i})
            else:
                recent[rng.randrange(len(recent))] = {"rec": rec, "src": s, "tmpl": a, "i": i}
        rec = {"id": f"s{i:07d}", **rec, "origin": names[src_of[i]]}
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.close()
    return src_of, tmpl_of, copy_of, copy_kind, kinds


def write_vectors(path: Path, dim: int, src_of, tmpl_of, copy_of, copy_kind, seed: int) -> None:
    """float16 unit vectors: topic(source) + direction(prompt row) + noise; copies follow
    their original (exact: the same vector; near: plus small noise). Written block by block."""
    n = len(src_of)
    rng = np.random.default_rng([seed, dim])
    topics = rng.normal(size=(int(src_of.max()) + 1, dim)).astype(np.float32)
    prompts = rng.normal(size=(int(tmpl_of.max()) + 1, dim)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for start in range(0, n, BLOCK):
        idx = np.arange(start, min(n, start + BLOCK))
        v = 2.0 * topics[src_of[idx]] + 1.2 * prompts[tmpl_of[idx]] + \
            rng.normal(size=(len(idx), dim)).astype(np.float32)
        orig = copy_of[idx] >= 0                      # copies point to earlier rows: done first
        for k in np.flatnonzero(orig):
            v[k] = out[copy_of[idx[k]]] if copy_of[idx[k]] < start else v[copy_of[idx[k]] - start]
            if copy_kind[idx[k]] == 2:
                v[k] += 0.1 / np.sqrt(dim) * rng.normal(size=dim)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out[idx] = v.astype(np.float16)
    out.flush()
    del out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "scale"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out) / str(args.rows)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sources = load_sources()
    src_of, tmpl_of, copy_of, copy_kind, kinds = write_rows(sources, args.rows, out, args.seed)
    t1 = time.perf_counter()
    for name, dim in (("embeddings.npy", EMB_DIM), ("rds.npy", RDS_DIM)):
        write_vectors(out / name, dim, src_of, tmpl_of, copy_of, copy_kind, args.seed)
    rng = np.random.default_rng([args.seed, 9])
    rds = np.load(out / "rds.npy", mmap_mode="r")
    t = rds[np.sort(rng.choice(args.rows, N_TARGETS, replace=False))].astype(np.float32)
    t += 0.5 / np.sqrt(RDS_DIM) * rng.normal(size=t.shape)
    np.save(out / "targets_rds.npy", (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float16))
    info = {"rows": args.rows, "sources": len(sources), "planted_exact": kinds["exact"],
            "planted_near": kinds["near"], "seconds_rows": round(t1 - t0, 1),
            "seconds_vectors": round(time.perf_counter() - t1, 1), "command": " ".join(sys.argv)}
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()

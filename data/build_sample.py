"""Build the bundled sample in data/sample from the shared corpus (../shared/data).

Only permissively licensed sources are taken (see data/README.md). Rows are chosen by a
seeded shuffle, and the files are written in several input shapes on purpose, so the demo and
the tests exercise format detection: messages JSONL, an Alpaca JSON array, ShareGPT JSONL and
plain-text Parquet.

    python data/build_sample.py ../shared/data
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
OUT = HERE / "sample"
SHAREGPT = {"user": "human", "assistant": "gpt", "system": "system"}


def take(path: Path, n: int, seed: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    random.Random(seed).shuffle(rows)
    return sorted(rows[:n], key=lambda r: r["id"])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def keep(r: dict, *fields: str) -> dict:
    return {k: r[k] for k in ("id", "source", "capability", *fields) if k in r}


def main(shared: Path) -> None:
    pool, ev = shared / "pool", shared / "eval"
    write_jsonl(OUT / "pool" / "gsm8k_train.jsonl",
                [keep(r, "messages") for r in take(pool / "gsm8k_train.jsonl", 300)])
    write_jsonl(OUT / "pool" / "mbpp.jsonl",
                [keep(r, "messages") for r in take(pool / "mbpp_train_val_prompt.jsonl", 150)])
    seeds = []
    for r in take(pool / "self_instruct_seed_tasks.jsonl", 175):
        user, reply = r["messages"][0]["content"], r["messages"][-1]["content"]
        seeds.append({**keep(r), "instruction": user, "input": "", "output": reply})
    (OUT / "pool" / "self_instruct_seeds.json").write_text(
        json.dumps(seeds, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    write_jsonl(OUT / "pool" / "glaive_toolcall.jsonl", [
        {**keep(r), "conversations": [{"from": SHAREGPT[m["role"]], "value": m["content"]}
                                      for m in r["messages"]]}
        for r in take(pool / "llamafactory_glaive_toolcall_en_demo.jsonl", 100)])
    c4 = [keep(r, "text") for r in take(pool / "llamafactory_c4_demo.jsonl", 50)]
    pq.write_table(pa.Table.from_pylist(c4), OUT / "pool" / "c4.parquet")
    write_jsonl(OUT / "targets" / "gsm8k_test.jsonl",
                [keep(r, "messages") for r in take(ev / "gsm8k_test.jsonl", 100)])
    write_jsonl(OUT / "targets" / "mbpp_test.jsonl",
                [keep(r, "messages") for r in take(ev / "mbpp_test.jsonl", 50)])
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parent.parent / "shared" / "data"))

"""Build the acceptance pool for the training-dynamics methods from the shared data: GSM8K
train mixed with code and general instruction rows (seeded sample, rows under --max-chars
characters), plus an eval file of GSM8K test rows. Writes OUT/rows.jsonl, OUT/eval_gsm8k.jsonl.

    python bench/dynamics_pool.py --out out/dyn --gsm8k 160 --code 80 --general 80 --eval 100
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from shared_data import SHARED

SOURCES = {"gsm8k": ["gsm8k_train.jsonl"],
           "code": ["code_alpaca_2k.jsonl", "mbpp_train_val_prompt.jsonl"],
           "general": ["llamafactory_alpaca_en_demo.jsonl", "self_instruct_seed_tasks.jsonl"]}


def short_rows(files: list[str], data: Path, a_max_chars: int) -> list[dict]:
    out = []
    for name in files:
        with open(data / "pool" / name) as f:
            for line in f:
                r = json.loads(line)
                if sum(len(m["content"]) for m in r["messages"]) < a_max_chars:
                    out.append({"id": r["id"], "source": r["source"], "capability": r["capability"],
                                "messages": r["messages"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--gsm8k", type=int, default=160)
    ap.add_argument("--code", type=int, default=80)
    ap.add_argument("--general", type=int, default=80)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-chars", type=int, default=1500, help="longest row kept (all turns)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for group, n in (("gsm8k", a.gsm8k), ("code", a.code), ("general", a.general)):
        rows += rng.sample(short_rows(SOURCES[group], a.data, a.max_chars), n)
    rng.shuffle(rows)
    with open(a.out / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(a.data / "eval" / "gsm8k_test.jsonl") as f, open(a.out / "eval_gsm8k.jsonl", "w") as g:
        for i, line in enumerate(f):
            if i >= a.eval:
                break
            g.write(line)
    print(f"{len(rows)} pool rows -> {a.out / 'rows.jsonl'}; {a.eval} eval rows -> {a.out / 'eval_gsm8k.jsonl'}")


if __name__ == "__main__":
    main()

"""MinHash signatures: thresher against DataTrove, side by side in one run on the same documents.

    make bench-datatrove                              # once: bench/.venv-datatrove (git-ignored)
    heavy --alone .venv/bin/python bench/minhash_datatrove.py [--docs 5000] [--data N]

Takes the first `--docs` documents of the generated pool bench/out/pretrain/<N>/src (built by
bench/pretrain_corpus.py; about 2,500 characters each) and signs them
    1. with DataTrove's `MinhashDedupSignature.get_shingles` + `get_signature` (14 x 8, word
       5-grams, xxh64, its spaCy English tokenizer), one process, in its own venv
       (`bench/.venv-datatrove/bin/python`, run as a child of this script);
    2. with thresher's `sign_texts` on one thread, then on every core.
Both timings cover text in -> signatures out, imports and model loading excluded. Prints docs/s,
the ratios, and how far the signatures agree: documents whose 112 values are all equal, and the
share of equal values over all documents (thresher reproduces DataTrove's normalisation exactly
and spaCy's contraction splits, but not its splits of symbols, units and currency signs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DT_PYTHON = ROOT / "bench" / ".venv-datatrove" / "bin" / "python"

DATATROVE_CHILD = r"""
import json, sys, time
import numpy as np
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
texts = json.load(open(sys.argv[1]))
step = MinhashDedupSignature(output_folder=sys.argv[3], config=MinhashConfig())
step.get_signature(step.get_shingles("warm up the tokenizer and the parameters here"))
out = np.full((len(texts), 112), np.iinfo(np.uint64).max, np.uint64)
t0 = time.perf_counter()
for i, t in enumerate(texts):
    sh = step.get_shingles(t)
    if sh.size:
        out[i] = np.concatenate(step.get_signature(sh))
seconds = time.perf_counter() - t0
np.save(sys.argv[2], out)
print(json.dumps({"seconds": seconds}))
"""


def main() -> None:
    import pyarrow.parquet as pq
    from thresher.pipeline.stages.minhash import (
        MinHashSignatures,
        sign_texts,
        threads_available,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=5000)
    ap.add_argument("--data", type=int, default=100_000, help="which generated pool")
    args = ap.parse_args()
    if not DT_PYTHON.exists():
        sys.exit(f"error: {DT_PYTHON} missing; run `make bench-datatrove` first")
    src = ROOT / "bench" / "out" / "pretrain" / str(args.data) / "src" / "part-0000.parquet"
    texts = pq.read_table(src, columns=["text"])["text"].to_pylist()[: args.docs]
    chars = sum(map(len, texts)) / len(texts)
    stage = MinHashSignatures(cjk_chars=False)        # DataTrove has no CJK tokens
    sign_texts(texts[:10], stage)                      # compiled kernels loaded, tables built
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "texts.json").write_text(json.dumps(texts))
        proc = subprocess.run([str(DT_PYTHON), "-c", DATATROVE_CHILD, f"{tmp}/texts.json",
                               f"{tmp}/dt.npy", f"{tmp}/sigs"], check=True, capture_output=True,
                              text=True)
        dt_seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
        dt = np.load(f"{tmp}/dt.npy")
    t0 = time.perf_counter()
    sig, _, _ = sign_texts(texts, stage, threads=1)
    one = time.perf_counter() - t0
    cores = threads_available()
    t0 = time.perf_counter()
    sign_texts(texts, stage, threads=cores)
    many = time.perf_counter() - t0
    n = len(texts)
    print(f"{n} documents, {chars:,.0f} characters on average")
    print(f"  DataTrove (1 process)      {n / dt_seconds:10,.0f} docs/s")
    print(f"  thresher (1 thread)        {n / one:10,.0f} docs/s   x{dt_seconds / one:.1f}")
    print(f"  thresher ({cores} threads)       {n / many:10,.0f} docs/s   x{dt_seconds / many:.1f}")
    same = (sig == dt).all(axis=1)
    print(f"  signatures equal to DataTrove's: {same.mean():.4f} of documents, "
          f"{(sig == dt).mean():.5f} of values")


if __name__ == "__main__":
    main()

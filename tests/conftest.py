"""Shared fixtures: paths to the bundled sample, and a tiny random causal LM built in code; and
the helpers several test files use (`from conftest import run_cli`).

The tiny LM uses the real SmolLM2 tokenizer (so chat templates and masks are realistic) with a
2-layer, 64-wide Llama body, so forward passes and training steps take milliseconds on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
SHARED = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# as the CLI does (pipeline/cli.py main): spinning OpenMP threads ran 3-5x slower on shared CPUs
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs on loopback, started here and stopped after the module."""
    import ray  # installed by `make setup` (the ray extra)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_pool_dir() -> Path:
    return SAMPLE / "pool"


@pytest.fixture(scope="session")
def sample_pool(tmp_path_factory, sample_pool_dir):
    """The bundled sample ingested once per test run (read-only for tests)."""
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.io.pool import Pool

    out = tmp_path_factory.mktemp("sample") / "pool"
    ingest([sample_pool_dir], out)
    return Pool(out)


@pytest.fixture(scope="session")
def smollm_tokenizer_dir() -> Path:
    from thresher.pipeline.models.resolve import DEFAULT_LM, local_weights, resolve

    return Path(local_weights(resolve(DEFAULT_LM)))


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    """A randomly initialised 2-layer Llama saved as a normal HF directory, seeded."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory):
    """A 1-layer, 32-wide random BERT with MiniLM's tokenizer, saved as a sentence-transformer."""
    import torch
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:   # sentence-transformers < 6
        from sentence_transformers import models
    from thresher.pipeline.models.resolve import DEFAULT_EMBEDDER, resolve
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-st")
    tok = AutoTokenizer.from_pretrained(resolve(DEFAULT_EMBEDDER).path)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=256))
    (out / "bert").mkdir()
    bert.save_pretrained(out / "bert")
    tok.save_pretrained(out / "bert")
    body = models.Transformer(str(out / "bert"), max_seq_length=128)
    st = SentenceTransformer(modules=[body, models.Pooling(32, "mean")], device="cpu")
    st.save(str(out / "st"))
    return str(out / "st")


def mixed_pool(d: Path, sample_pool, per_source: int, max_chars: int, rows_per_shard: int):
    """A pool in `d` of the first `per_source` rows under `max_chars` of every sample source."""
    import polars as pl

    frame = sample_pool.frame(["id", "source", "kind", "messages", "text", "n_chars"])
    frame = frame.filter(pl.col("n_chars") < max_chars)
    rows = [r for src in sorted(set(frame["source"]))
            for r in frame.filter(pl.col("source") == src).head(per_source).to_dicts()]
    return pool_of_rows(d, rows, rows_per_shard)


def pool_of_rows(d: Path, rows: list[dict], rows_per_shard: int):
    """A pool in `d/pool` of `rows` (pool rows: id, source, kind, and messages or text), ingested
    from `d/rows.jsonl`."""
    import json

    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.io.pool import Pool

    with open(d / "rows.jsonl", "w") as f:
        for r in rows:
            rec = {"id": r["id"], "source": r["source"]}
            rec.update({"messages": r["messages"]} if r["kind"] == "chat" else {"text": r["text"]})
            f.write(json.dumps(rec) + "\n")
    ingest([d / "rows.jsonl"], d / "pool", rows_per_shard=rows_per_shard)
    return Pool(d / "pool")


@pytest.fixture(scope="session")
def dyn_pool(tmp_path_factory, sample_pool):
    """A small mixed pool (5 short rows per sample source, shards of 8) for the training-dynamics
    stages and methods."""
    return mixed_pool(tmp_path_factory.mktemp("dynpool"), sample_pool, 5, 700, 8)


def dedup_then_pick_recipe(name: str, out, sources, embedder: str, pick: int, fmt: str = "") -> str:
    """A two-step recipe (semantic dedup with the tiny embedder, then `pick` random rows of its
    survivors) for the flow and serve tests."""
    return (f"name: {name}\nout: {out}\nsources: [{sources}]\nselections:\n"
            f"  - name: dedup\n    method: semdedup\n"
            f"    params: {{eps: 0.001, embedder: {embedder}, k: 2}}\n    budget: 100%\n"
            f"  - name: pick\n    method: random\n    from: dedup\n    budget: {pick}\n"
            + (f"    format: {fmt}\n" if fmt else ""))


def chat_jsonl(n: int, start: int = 0, word: str = "question") -> str:
    """JSONL text of `n` two-turn chat rows, ids r<start>..: "<word> <i>", "answer <i>"."""
    import json

    return "".join(json.dumps({"id": f"r{i}", "messages": [
        {"role": "user", "content": f"{word} {i}"},
        {"role": "assistant", "content": f"answer {i}"}]}) + "\n" for i in range(start, start + n))


def run_cli(monkeypatch, capsys, args):
    """`thresher *args` in this process: (exit code, stdout, stderr)."""
    import sys

    from thresher.pipeline import cli

    monkeypatch.setattr(sys, "argv", ["thresher", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def snapshot(d: Path) -> dict[str, str]:
    """Every file under d with the hash of its bytes (the cache included)."""
    import hashlib

    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}

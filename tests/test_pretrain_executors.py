"""Fuzzy dedup and decontamination under `--executor ray` (a local 2-CPU cluster on loopback,
started and stopped here) write the same bytes as under the local executor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.select import run_select


@pytest.fixture(scope="module")
def text_pool(tmp_path_factory, sample_pool_dir):
    """The sample's C4 texts and chat rows, with near-copies, in 60-row shards."""
    import polars as pl

    d = tmp_path_factory.mktemp("pretrain")
    texts = pl.read_parquet(sample_pool_dir / "c4.parquet")["text"].to_list()[:150]
    rows = [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)]
    rows += [{"id": f"c{i}", "text": t.replace(" the ", " a ", 2)} for i, t in enumerate(texts[:30])]
    (d / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest([d / "texts.jsonl", sample_pool_dir / "gsm8k_train.jsonl"], d / "pool",
           rows_per_shard=60)
    return Pool(d / "pool")


@pytest.mark.parametrize("method", ["fuzzy-dedup", "decontaminate"])
def test_ray_annotations_are_byte_identical_to_local(tmp_path, text_pool, ray_cluster, method,
                                                     sample_pool_dir):
    targets = [str(sample_pool_dir.parent / "targets" / "gsm8k_test.jsonl")] \
        if method == "decontaminate" else []
    outs = {}
    for executor in ("local", "ray"):
        out = tmp_path / f"{executor}.jsonl"
        m = run_select(text_pool.path, method, "100%", out, workdir=tmp_path / f"w-{executor}",
                       targets=targets, executor=executor)
        outs[executor] = (out, m)
    (lo, ml), (ro, mr) = outs["local"], outs["ray"]
    assert lo.read_bytes() == ro.read_bytes()
    assert Path(f"{lo}.selection.parquet").read_bytes() == Path(f"{ro}.selection.parquet").read_bytes()
    assert ml["config"]["method"]["removed"] > 0
    kinds = ("minhash", "minhash_clusters") if method == "fuzzy-dedup" else ("decontam",)
    for kind in kinds:
        files_l = sorted(p.relative_to(tmp_path / "w-local")
                         for p in (tmp_path / "w-local" / kind).rglob("*")
                         if p.is_file() and p.suffix in (".npy", ".parquet"))
        assert files_l, kind
        for rel in files_l:
            assert (tmp_path / "w-local" / rel).read_bytes() == \
                (tmp_path / "w-ray" / rel).read_bytes(), rel
    first = next(s for s in mr["stages"] if s["stage"] == kinds[0])
    assert mr["executor"] == "ray" and first["units_computed"] == len(text_pool.shards) >= 4

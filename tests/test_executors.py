"""Plans and executors: the Ray executor gives the same bytes as the local one; the plan shows
what is cached; nothing outside a plan loads a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.select import run_select


@pytest.fixture(scope="module")
def sharded_sample(tmp_path_factory, sample_pool_dir):
    """The bundled sample in 100-row shards (9 shards: shards never span two input files)."""
    out = tmp_path_factory.mktemp("sharded") / "pool"
    ingest([sample_pool_dir], out, rows_per_shard=100)
    return Pool(out)


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory, sample_pool_dir):
    """120 rows of the bundled sample (its GSM8K and MBPP files cut to 60 rows each) in 15-row
    shards: the forward pass of even a tiny LM over all 775 rows takes minutes on 2 CPUs."""
    d = tmp_path_factory.mktemp("small")
    for name in ("gsm8k_train.jsonl", "mbpp.jsonl"):
        lines = (sample_pool_dir / name).read_text().splitlines()[:60]
        (d / name).write_text("\n".join(lines) + "\n")
    ingest([d / "gsm8k_train.jsonl", d / "mbpp.jsonl"], d / "pool", rows_per_shard=15)
    return Pool(d / "pool")


def _run(pool, tmp, method, executor, params, name):
    out = tmp / f"{name}-{executor}.jsonl"
    m = run_select(pool.path, method, "40%", out, workdir=tmp / f"work-{executor}", params=params,
                   executor=executor)
    return out, m


@pytest.mark.parametrize("method", ["semdedup", "perplexity"])
def test_ray_executor_is_byte_identical_to_local(tmp_path, sharded_sample, small_sample, ray_cluster,
                                                 method, tiny_lm_dir, tiny_embedder):
    params = {"embedder": tiny_embedder} if method == "semdedup" else {"model": str(tiny_lm_dir),
                                                                         "max_tokens": "256"}
    pool = sharded_sample if method == "semdedup" else small_sample
    local, _ml = _run(pool, tmp_path, method, "local", params, method)
    remote, mr = _run(pool, tmp_path, method, "ray", params, method)
    assert local.read_bytes() == remote.read_bytes()
    sel_l = Path(str(local) + ".selection.parquet").read_bytes()
    assert sel_l == Path(str(remote) + ".selection.parquet").read_bytes()
    # the artifacts themselves are the same bytes, shard by shard
    kind = "embed" if method == "semdedup" else "forward"
    shards_l = sorted((tmp_path / "work-local" / kind).glob("*/units/*"))
    shards_r = sorted((tmp_path / "work-ray" / kind).glob("*/units/*"))
    assert [p.name for p in shards_l] == [p.name for p in shards_r] and len(shards_l) >= 8
    for a, b in zip(shards_l, shards_r):
        if a.suffix != ".json":
            assert a.read_bytes() == b.read_bytes(), a.name
    first = next(s for s in mr["stages"] if s["stage"] == kind)
    assert mr["executor"] == "ray" and first["units_computed"] == len(pool.shards)


def test_dry_run_shows_plan_then_cached(tmp_path, sharded_sample, tiny_embedder):
    kw = {"workdir": tmp_path / "w", "params": {"embedder": tiny_embedder}}
    plan = run_select(sharded_sample.path, "semdedup", "50%", tmp_path / "o.jsonl", dry_run=True, **kw)
    assert [line.split(".", 1)[0] for line in plan["plan"]] == ["1", "2"]
    assert "to run (0 of 9 units cached)" in plan["plan"][0] and "kmeans" in plan["plan"][1]
    assert not (tmp_path / "o.jsonl").exists()
    assert not (tmp_path / "w").exists()                   # a dry run writes nothing, not even specs
    m = run_select(sharded_sample.path, "semdedup", "50%", tmp_path / "o.jsonl", **kw)
    again = run_select(sharded_sample.path, "semdedup", "50%", tmp_path / "o.jsonl", dry_run=True, **kw)
    assert all(": cached (" in line for line in again["plan"]), again["plan"]
    before = sorted((tmp_path / "w").rglob("*"))
    other = run_select(sharded_sample.path, "semdedup", "50%", tmp_path / "o.jsonl", dry_run=True,
                       workdir=tmp_path / "w", params={"embedder": tiny_embedder, "k": 3})
    assert "cached" in other["plan"][0] and "to run" in other["plan"][1]
    assert sorted((tmp_path / "w").rglob("*")) == before   # the new k-means key made no folder
    stages = {s["stage"]: s for s in m["stages"]}
    assert stages["embed"]["rows_out"] == sharded_sample.n_rows and stages["embed"]["flops"] > 0
    assert stages["embed"]["tokens"] > sharded_sample.n_rows and stages["embed"]["seconds"] > 0
    rerun = run_select(sharded_sample.path, "semdedup", "50%", tmp_path / "o2.jsonl", **kw)
    cached = {s["stage"]: s for s in rerun["stages"]}
    assert cached["embed"]["cached"] and cached["embed"]["units_computed"] == 0
    assert cached["embed"]["flops"] == 0 and cached["kmeans"]["cached"]


def test_unknown_param_and_selector_errors(tmp_path, sample_pool):
    with pytest.raises(ValueError, match=r"unknown parameter 'epz'; valid: .*\beps\b"):
        run_select(sample_pool.path, "semdedup", "10", tmp_path / "o.jsonl", params={"epz": "0.1"})
    with pytest.raises(ValueError, match="keep.*'sideways'"):
        run_select(sample_pool.path, "perplexity", "10", tmp_path / "o.jsonl", params={"keep": "sideways"})
    with pytest.raises(ValueError, match="unknown selector"):
        run_select(sample_pool.path, "random", "10", tmp_path / "o.jsonl", selector="best")
    with pytest.raises(ValueError, match="no score column"):
        run_select(sample_pool.path, "random", "10", tmp_path / "o.jsonl", selector="band")
    with pytest.raises(ValueError, match="does not use a target"):
        run_select(sample_pool.path, "random", "10", tmp_path / "o.jsonl", targets=["x.jsonl"])
    assert not (tmp_path / "o.jsonl").exists()


def test_selector_override_cuts_method_scores(tmp_path, sample_pool, tiny_lm_dir):
    m = run_select(sample_pool.path, "perplexity", "30", tmp_path / "s.jsonl", workdir=tmp_path / "w",
                   params={"model": str(tiny_lm_dir), "bins": "5", "max_tokens": "128"},
                   selector="stratified")
    assert m["config"]["selector"] == {"name": "Stratified", "column": "ppl", "bins": 5,
                                       "hard_prune": 0.0}
    assert m["counts"]["selected"] == 30
    import polars as pl

    sel = pl.read_parquet(str(tmp_path / "s.jsonl") + ".selection.parquet")
    assert sel["reason"].str.starts_with("stratum").all()


def test_random_plans_no_stage_and_loads_no_model(tmp_path, sample_pool, monkeypatch):
    from thresher.pipeline.models import resolve as models

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_causal_lm", boom)
    monkeypatch.setattr(models, "load_embedder", boom)
    m = run_select(sample_pool.path, "random", "10", tmp_path / "r.jsonl", workdir=tmp_path / "w")
    assert m["plan"] == [] and m["models"] == {}
    assert json.loads(Path(str(tmp_path / "r.jsonl") + ".manifest.json").read_text())["counts"]["selected"] == 10


def test_missing_optional_dependency_names_the_install_command(tmp_path, sample_pool, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentence_transformers" else real(name, *a))
    with pytest.raises(ModuleNotFoundError,
                       match=r"embed stage needs sentence_transformers: pip install 'sentence-transformers"):
        run_select(sample_pool.path, "prototypes", "10", tmp_path / "o.jsonl", dry_run=True)


def test_readme_worked_example_is_a_working_method(tmp_path, small_sample, tiny_lm_dir, monkeypatch):
    """docs/architecture.md's "Writing a method" example, run as written: one file + one registry
    line."""
    import re
    import sys
    import types

    from thresher.pipeline import registry

    readme = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n# scoring/hard_tokens.py\n(.*?)```", readme, re.DOTALL).group(1)
    module = types.ModuleType("hard_tokens_example")
    monkeypatch.setitem(sys.modules, "hard_tokens_example", module)   # dataclasses look it up
    exec(compile(code, "architecture.md", "exec"), module.__dict__)  # noqa: S102 (our own docs)
    monkeypatch.setitem(registry.METHODS, "hard-tokens", "hard_tokens_example:HardTokensMethod")
    m = run_select(small_sample.path, "hard-tokens", "5", tmp_path / "h.jsonl", workdir=tmp_path / "w",
                   params={"model": str(tiny_lm_dir), "keep": "top"})
    import polars as pl

    sel = pl.read_parquet(str(tmp_path / "h.jsonl") + ".selection.parquet")
    scores = pl.read_parquet(m["scores"])
    assert sel["loss"].to_list() == sorted(scores["loss"].to_list(), reverse=True)[:5]
    assert m["plan"][0].startswith("forward(")

"""LESS: the blockwise Rademacher projection, the Adam-preconditioned features against a manual
computation from a saved optimizer state, the per-shard cache, and `select --method less` end to
end, on the tiny random Llama (conftest) with tiny d."""

from __future__ import annotations

import json
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from thresher.pipeline.artifacts import ArtifactStore
from thresher.pipeline.models.less_maths import (
    ROW_BLOCK,
    project,
    rademacher_block,
    rademacher_matrix,
)
from thresher.pipeline.plan import make_plan
from thresher.pipeline.stages.grad_features import GradFeatures
from thresher.pipeline.stages.proxy import warmup_proxy
from thresher.pipeline.stages.targets import TargetPool
from thresher.scoring.less import (
    less_representation,
    less_scores,
    less_similarity,
    less_task_scores,
)

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
D = 48


def test_projection_is_the_dense_rademacher_product():
    P = 2 * ROW_BLOCK + 37                        # a partial last block
    R = rademacher_matrix(P, D, seed=3)
    assert R.shape == (P, D) and set(torch.unique(R).tolist()) == {-1.0, 1.0}
    assert abs(float(R.mean())) < 0.02            # balanced signs
    g = torch.randn(5, P, generator=torch.Generator().manual_seed(0))
    dense = g.double() @ R.double()
    assert torch.allclose(project(g, D, seed=3).double(), dense, rtol=1e-5, atol=1e-3)
    # row by row is the same map (rows never interact), and another seed is another matrix
    assert torch.allclose(project(g[2:3], D, seed=3), project(g, D, seed=3)[2:3], atol=1e-4)
    assert not torch.allclose(project(g, D, seed=4), project(g, D, seed=3))
    # the bf16 product is close (bf16 inputs, float32 accumulation)
    cos = torch.nn.functional.cosine_similarity(project(g, D, 3, torch.bfloat16), project(g, D, 3))
    assert cos.min() > 0.999
    assert torch.equal(rademacher_block(3, 1, 5, D, torch.bfloat16).float(), R[ROW_BLOCK:ROW_BLOCK + 5])
    # the definition: bit 1 of default_rng([seed, block])'s bytes, most significant first, is -1
    raw = np.random.default_rng([3, 1]).bytes(ROW_BLOCK * D // 8)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:5 * D].reshape(5, D)
    assert np.array_equal(R[ROW_BLOCK:ROW_BLOCK + 5].numpy(), 1.0 - 2.0 * bits)


def test_projection_keeps_norms_and_angles_roughly():
    """Johnson-Lindenstrauss: |gR|^2 / d ~ |g|^2 for a wide enough d."""
    g = torch.randn(6, 3000, generator=torch.Generator().manual_seed(1))
    y = project(g, 2048, seed=0)
    ratio = (y.norm(dim=1) ** 2 / 2048) / g.norm(dim=1) ** 2
    assert ((ratio - 1).abs() < 0.15).all()


def test_scores_agree_with_the_similarity_matrix_and_the_representation():
    rng = np.random.default_rng(0)
    pool = [rng.normal(size=(30, 16)).astype(np.float16) for _ in range(3)]
    tgt_a = [rng.normal(size=(4, 16)).astype(np.float16) for _ in range(3)]
    tgt_b = [rng.normal(size=(2, 16)).astype(np.float16) for _ in range(3)]
    etas = np.array([0.5, 0.3, 0.2])
    sim = less_similarity(pool, tgt_a, etas)
    unit = lambda x: x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    manual = sum(e * unit(p) @ unit(t).T for e, p, t in zip(etas, pool, tgt_a))
    assert np.allclose(sim, manual, atol=1e-5)
    assert np.allclose(less_scores(pool, tgt_a, etas), manual.mean(axis=1), atol=1e-5)
    rep_p, rep_t = less_representation(pool, etas), less_representation(tgt_a, etas)
    assert np.allclose(np.linalg.norm(rep_p, axis=1), 1.0, atol=1e-5)
    assert np.allclose(rep_p @ rep_t.T, manual, atol=1e-5)
    score, best = less_task_scores(pool, [tgt_a, tgt_b], etas, rows=[3, 7, 11])
    per = np.stack([less_scores(pool, tgt_a, etas), less_scores(pool, tgt_b, etas)], axis=1)[[3, 7, 11]]
    assert np.allclose(score, per.max(axis=1)) and (best == per.argmax(axis=1)).all()


@pytest.fixture(scope="module")
def target_file(tmp_path_factory) -> Path:
    lines = (SAMPLE / "targets" / "gsm8k_test.jsonl").read_text().splitlines()[:3]
    out = tmp_path_factory.mktemp("less-target") / "gsm3.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def _stages(pool, tiny_lm_dir, target):
    warm = warmup_proxy(pool.n_rows, str(tiny_lm_dir), part=0.05, min_rows=8, epochs=2, lr=2e-2,
                        batch_size=4, max_tokens=256)
    common = {"proxy": warm, "d": D, "seed": 5, "max_tokens": 256, "dtype": "fp32", "grad_dtype": "fp32",
              "project_rows": 4}
    return GradFeatures(**common), GradFeatures(**common, over=TargetPool(path=str(target)))


def _run(stages, pool, store):
    plan = make_plan(stages, "cpu")
    outputs, stats = plan.run(pool, store, __import__(
        "thresher.pipeline.executors", fromlist=["LocalExecutor"]).LocalExecutor())
    pool_stats = {s.stage: s for s in stats if s.config.get("over") is None}
    return [outputs[s] for s in plan.roots], pool_stats


def _manual(ckpt, rows, adam: bool, how: str = "loop") -> np.ndarray:
    """Unit float64 features of `rows` at `ckpt`, computed here from the saved state."""
    from thresher.pipeline.io.safestate import load_state
    from thresher.pipeline.models.chat import encode
    from thresher.pipeline.models.grads import flatten, iter_grads, select_params
    from thresher.pipeline.training.train import load_trained

    model, tok = load_trained(ckpt, "cpu")
    params = select_params(model, "lora")
    enc = [encode(tok, r, 256) for r in rows]
    g = torch.zeros(len(rows), sum(p.numel() for p in params.values()))
    for idx, grads in iter_grads(model, enc, params, how=how):
        g[torch.as_tensor(idx)] = flatten(grads)
    if adam:
        st = load_state(ckpt, "state")["optimizer"]["state"]
        m = torch.cat([st[i]["exp_avg"].reshape(-1) for i in sorted(st)])
        v = torch.cat([st[i]["exp_avg_sq"].reshape(-1) for i in sorted(st)])
        g = (0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g ** 2 + 1e-8)
    y = (g.double() @ rademacher_matrix(g.shape[1], D, seed=5).double()).numpy()
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def test_features_are_adam_for_the_pool_sgd_for_targets_and_cached(dyn_pool, tiny_lm_dir,
                                                                    target_file, tmp_path):
    from thresher.pipeline.io.pool import Pool

    store = ArtifactStore(tmp_path / "w")
    (pool_fs, tgt_fs), stats = _run(_stages(dyn_pool, tiny_lm_dir, target_file), dyn_pool, store)
    st = stats["grad_features"]
    assert pool_fs.n_checkpoints == 2 and pool_fs.features(0).shape == (dyn_pool.n_rows, D)
    assert pool_fs.features(1).dtype == np.float16 and tgt_fs.features(0).shape == (3, D)
    assert np.isclose(pool_fs.etas.sum(), 1.0) and pool_fs.etas[0] > pool_fs.etas[1]  # cosine decay
    assert pool_fs.info["mode"] == "adam" and tgt_fs.info["mode"] == "sgd"
    proxy = json.loads((Path(pool_fs.info["checkpoints"][0]).parent.parent
                        / "_COMPLETE.json").read_text())
    assert proxy["trained_rows"] == 8                              # min_rows beats 5% of the pool
    ckpt = Path(pool_fs.info["checkpoints"][1])
    rows = list(dyn_pool.iter_rows())[:6]
    assert np.allclose(pool_fs.features(1)[:6], _manual(ckpt, rows, adam=True), atol=2e-3)
    target_rows = list(Pool(next((tmp_path / "w" / "target").glob("*/pool"))).iter_rows())
    ok = ~tgt_fs.no_loss()
    assert ok.any() and not np.asarray(tgt_fs.features(1))[~ok].any()
    assert np.allclose(tgt_fs.features(1)[ok], _manual(ckpt, target_rows, adam=False)[ok], atol=2e-3)
    assert not np.allclose(pool_fs.features(1)[:3], _manual(ckpt, rows[:3], adam=False), atol=2e-2)
    assert st.units_computed == 2 * len(dyn_pool.shards) and st.rows_computed == 2 * dyn_pool.n_rows

    # a rerun computes nothing; a lost unit is the only one recomputed
    _, stats = _run(_stages(dyn_pool, tiny_lm_dir, target_file), dyn_pool, store)
    assert stats["grad_features"].cached and stats["grad_features"].units_computed == 0
    unit_files = sorted((tmp_path / "w" / "grad_features").glob("*/units/*.features.npy"))
    assert len(unit_files) == 2 * len(dyn_pool.shards) + 2         # + the target's, per checkpoint
    before = np.array(pool_fs.features(1))
    (pool_fs.dir.dir / "_COMPLETE.json").unlink()
    victim = next(f for f in unit_files if np.load(f).shape[0] == 8)
    victim.unlink()
    Path(str(victim).replace(".features.npy", ".done.json")).unlink()
    (again, _), stats = _run(_stages(dyn_pool, tiny_lm_dir, target_file), dyn_pool, store)
    st = stats["grad_features"]
    assert st.units_computed == 1 and st.units_cached == 2 * len(dyn_pool.shards) - 1
    assert np.array_equal(np.asarray(again.features(1)), before)


def test_select_less_end_to_end(dyn_pool, tiny_lm_dir, target_file, tmp_path):
    from thresher.pipeline.cli import app
    from typer.testing import CliRunner

    out, work = tmp_path / "less.jsonl", tmp_path / "w"
    args = ["select", str(dyn_pool.path), "--method", "less", "--budget", "5", "--out", str(out),
            "--workdir", str(work)]
    params = ["--param", f"model={tiny_lm_dir}", "--param", f"d={D}", "--param", "max_tokens=256",
              "--param", "epochs=2", "--param", "proxy_min_rows=8", "--param", "proxy_lr=2e-2",
              "--param", "proxy_batch_size=4"]
    res = CliRunner().invoke(app, [*args, "--target", str(target_file), *params])
    assert res.exit_code == 0, res.output
    picked = [json.loads(ln)["id"] for ln in out.read_text().splitlines()]
    assert len(picked) == 5
    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    kinds = [s["stage"] for s in manifest["stages"]]
    assert {"proxy", "target", "grad_features"} <= set(kinds)
    etas = manifest["config"]["method"]["etas"]
    assert len(etas) == 2 and abs(sum(etas) - 1) < 1e-5
    # recompute the score from the cached features through the [N, M] similarity path
    feats = {json.loads((d / "_COMPLETE.json").read_text())["mode"]: d
             for d in (work / "grad_features").iterdir() if (d / "_COMPLETE.json").exists()}
    load = lambda d: [np.load(d / "c000.npy"), np.load(d / "c001.npy")]
    sim = less_similarity(load(feats["adam"]), load(feats["sgd"]), etas)
    ids = dyn_pool.frame(["id"])["id"].to_list()
    score = dict(zip(ids, sim.mean(axis=1)))
    no_loss = np.load(feats["adam"] / "no_loss.npy")
    ranked = sorted((i for i, bad in zip(ids, no_loss) if not bad), key=lambda i: -score[i])
    assert set(picked) == set(ranked[:5])
    side = pl.read_parquet(str(out) + ".selection.parquet")
    assert "less" in side.columns
    # the diversity guard: the same ranking walked down past sources that hold their share
    source = dict(dyn_pool.frame(["id", "source"]).iter_rows())
    top_source = max({source[i] for i in picked}, key=[source[i] for i in picked].count)
    assert [source[i] for i in picked].count(top_source) >= 3       # uncapped: the guard can bind
    capped = tmp_path / "capped.jsonl"
    res = CliRunner().invoke(app, [*args[:-4], "--out", str(capped), *args[-2:], "--target",
                                   str(target_file), *params, "--param", "max_share=0.4"])
    assert res.exit_code == 0, res.output
    got = [json.loads(ln)["id"] for ln in capped.read_text().splitlines()]
    per_source = {s: [source[i] for i in got].count(s) for s in {source[i] for i in got}}
    assert len(got) == 5 and max(per_source.values()) <= 2               # ceil(0.4 x 5)
    walk = []                                        # the uncapped ranking, skipping full sources
    for i in ranked:
        if [source[j] for j in walk].count(source[i]) < 2:
            walk.append(i)
    assert got == walk[:5]
    guard = json.loads(Path(str(capped) + ".manifest.json").read_text())["config"]["method"]["guard"]
    assert guard["cap_rows"] == 2 and guard["rows_per_group"] == per_source
    bad = CliRunner().invoke(app, [*args, "--target", str(target_file), *params, "--param", "max_share=0"])
    assert bad.exit_code == 2 and "bad parameter: max_share must be in (0, 1], got 0.0" in bad.output
    # no target: a one-line error
    bad = CliRunner().invoke(app, [*args, *params])
    assert bad.exit_code == 2 and "needs --target" in bad.output


def test_methods_lists_less_parameters():
    from thresher.pipeline.cli import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["methods", "less"])
    assert res.exit_code == 0, res.output
    for name in ("d=8192", "proxy_part=0.05", "epochs=4", "proj_seed=0", "grad_features"):
        assert name in res.output


def test_target_without_method_runs_the_measured_default(dyn_pool, tiny_lm_dir, target_file, tmp_path,
                                                         monkeypatch, capsys):
    """`select --target F` with no --method: TARGET_DEFAULT's method and parameters (the guard on),
    recorded in the manifest; a user parameter still wins."""
    import math
    import sys

    from thresher.pipeline import cli, registry

    out = tmp_path / "o.jsonl"
    monkeypatch.setattr(sys, "argv", [
        "thresher", "select", str(dyn_pool.path), "--budget", "8", "--target", str(target_file),
        "--out", str(out), "--workdir", str(tmp_path / "w"), "--param", f"model={tiny_lm_dir}",
        "--param", f"d={D}", "--param", "max_tokens=256", "--param", "proxy_min_rows=8",
        "--param", "proxy_lr=2e-2", "--param", "proxy_batch_size=4"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code in (0, None), capsys.readouterr().err
    m = json.loads(Path(f"{out}.manifest.json").read_text())
    name, defaults = registry.TARGET_DEFAULT
    assert m["method"] == name == "less"
    params = m["config"]["method"]
    assert {k: params[k] for k in defaults} == defaults and params["model"] == str(tiny_lm_dir)
    assert len(params["etas"]) == defaults["epochs"]                    # one checkpoint per epoch
    guard = params["guard"]
    cap = math.ceil(defaults["max_share"] * 8)
    assert guard["max_share"] == defaults["max_share"] < 1 and guard["cap_rows"] == cap
    assert max(guard["rows_per_group"].values()) <= cap and sum(guard["rows_per_group"].values()) == 8


def test_packed_bf16_features_match_vmap_fp32_and_select_the_same_rows(dyn_pool, tiny_lm_dir,
                                                                       target_file, tmp_path):
    """The default gradient pass (rows packed, bf16 autocast) against the float32 vmap path it
    replaced: per-row cosine of the stored features, and the rows LESS keeps."""
    from thresher.pipeline.io.pool import Pool

    store = ArtifactStore(tmp_path / "w")
    pool_st, tgt_st = (dataclasses_replace(s, grad_dtype="bf16")
                       for s in _stages(dyn_pool, tiny_lm_dir, target_file))
    (pool_fs, tgt_fs), _ = _run([pool_st, tgt_st], dyn_pool, store)
    assert pool_fs.info["mode"] == "adam"
    rows = list(dyn_pool.iter_rows())
    target_rows = list(Pool(next((tmp_path / "w" / "target").glob("*/pool"))).iter_rows())
    ok, tok_ok = ~pool_fs.no_loss(), ~tgt_fs.no_loss()
    ref_pool, ref_tgt = [], []
    for j, ckpt in enumerate(pool_fs.info["checkpoints"]):
        ref = _manual(Path(ckpt), rows, adam=True, how="vmap")
        got = np.asarray(pool_fs.features(j), dtype=np.float64)
        cos = (got[ok] * ref[ok]).sum(1) / np.linalg.norm(got[ok], axis=1)
        assert cos.min() >= 0.99, (j, cos.min())
        ref_pool.append(ref)
        tref = _manual(Path(ckpt), target_rows, adam=False, how="vmap")
        tgot = np.asarray(tgt_fs.features(j), dtype=np.float64)
        tcos = (tgot[tok_ok] * tref[tok_ok]).sum(1) / np.linalg.norm(tgot[tok_ok], axis=1)
        assert tcos.min() >= 0.99, (j, tcos.min())
        ref_tgt.append(tref[tok_ok])
    new = less_scores(pool_fs.all(), [np.asarray(f)[tok_ok] for f in tgt_fs.all()], pool_fs.etas)
    old = less_scores(ref_pool, ref_tgt, pool_fs.etas)
    budget = ok.sum() // 2
    top = lambda s: set(np.flatnonzero(ok)[np.argsort(-s[ok], kind="stable")[:budget]])
    assert len(top(new) & top(old)) >= 0.95 * budget
    assert len(top(new) & top(-old)) < 0.8 * budget           # the ranking means something


def test_shortlist_takes_each_tasks_nearest_rows_in_turn():
    from thresher.pipeline.stages.shortlist import nearest_scores, round_robin_top

    rng = np.random.default_rng(0)
    pool = rng.normal(size=(40, 8)).astype(np.float16)
    a, b = pool[[3, 4]] + 0.01, pool[[30]] + 0.01        # task a near rows 3, 4; task b near 30
    sa, sb = nearest_scores(pool, a), nearest_scores(pool, b)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    manual = (unit(pool.astype(np.float64)) @ unit(a.astype(np.float64)).T).max(axis=1)
    assert np.allclose(sa, manual, atol=2e-3)
    assert set(round_robin_top([sa], 2)) == {3, 4}
    two = round_robin_top([sa, sb], 3)                   # a's best, b's best, a's second
    assert set(two) == {3, 4, 30} and list(two) == sorted(two)
    assert len(round_robin_top([sa, sb], 40)) == 40 and len(round_robin_top([sa, sb], 7)) == 7
    assert len(set(round_robin_top([sa, sa], 5))) == 5   # a row taken once, the turn walks down


def test_two_stage_less_is_less_over_the_shortlist(dyn_pool, tiny_lm_dir, tiny_embedder,
                                                    target_file, tmp_path):
    """shortlist=2 with a budget of 4: the embedder's 8 rows nearest the target, then LESS with
    those 8 rows as its pool (warm-up included): the same picks and scores as full LESS run on a
    pool of just those rows; every other row counted in the manifest."""
    from thresher.pipeline.cli import app
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.io.pool import Pool
    from typer.testing import CliRunner

    work = tmp_path / "w"
    common = ["--budget", "4", "--workdir", str(work), "--target", str(target_file),
              "--param", f"model={tiny_lm_dir}", "--param", f"d={D}", "--param", "max_tokens=256",
              "--param", "epochs=2", "--param", "proxy_min_rows=8", "--param", "proxy_lr=2e-2",
              "--param", "proxy_batch_size=4", "--param", "grad_dtype=fp32",
              "--param", f"embedder={tiny_embedder}"]
    run = lambda pool, out, *extra: CliRunner().invoke(app, ["select", str(pool), "--method",
                                                             "less", "--out", str(out), *common, *extra])
    res = run(dyn_pool.path, tmp_path / "two.jsonl", "--param", "shortlist=2")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "two.jsonl.manifest.json").read_text())
    note = m["config"]["method"]["shortlist"]
    assert note["rows"] == 8 and note["outside"] == dyn_pool.n_rows - 8
    kinds = [s["stage"] for s in m["stages"]]
    assert {"embed", "shortlist", "proxy", "grad_features"} <= set(kinds)
    feats = next(d for d in (work / "grad_features").iterdir()
                 if (d / "rows.npy").exists())
    listed = np.load(feats / "rows.npy")
    assert len(listed) == 8 and np.load(feats / "c000.npy").shape == (8, D)
    frame = dyn_pool.frame(["id", "source", "kind", "messages", "text"])
    ids = frame["id"].to_list()
    picked = [json.loads(ln)["id"] for ln in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(picked) == 4 and {ids.index(i) for i in picked} <= set(listed.tolist())
    assert pl.read_parquet(tmp_path / "two.jsonl.selection.parquet").height == 4

    # full LESS over a pool of only the shortlisted rows (pool order): the same warm-up rows,
    # checkpoints, features, scores and picks
    with open(tmp_path / "short.jsonl", "w") as f:
        for r in frame[listed.tolist()].to_dicts():
            body = {"messages": r["messages"]} if r["kind"] == "chat" else {"text": r["text"]}
            f.write(json.dumps({"id": r["id"], "source": r["source"], **body}) + "\n")
    ingest([tmp_path / "short.jsonl"], tmp_path / "short", rows_per_shard=8)
    res = run(Pool(tmp_path / "short").path, tmp_path / "sub.jsonl")
    assert res.exit_code == 0, res.output
    sub = [json.loads(ln)["id"] for ln in (tmp_path / "sub.jsonl").read_text().splitlines()]
    assert sub == picked
    score = lambda name: dict(pl.read_parquet(tmp_path / f"{name}.jsonl.selection.parquet")
                              .select("id", "less").iter_rows())
    two, whole = score("two"), score("sub")
    assert all(abs(two[i] - whole[i]) < 1e-4 for i in picked)


def test_shortlist_is_off_for_small_pools_and_unknown_budgets(dyn_pool, target_file):
    from thresher.pipeline.method import Request
    from thresher.scoring.less import LessMethod, LessParams

    req = Request(pool=dyn_pool, targets=(target_file,), budget_rows=4)
    on = LessMethod().needs(LessParams(shortlist=2), req)
    assert on["shortlist"].m == 8 and on["pool"].rows == on["shortlist"]
    above = LessMethod().needs(LessParams(shortlist=2, shortlist_above=dyn_pool.n_rows), req)
    assert "shortlist" not in above and above["pool"].rows is None
    unknown = LessMethod().needs(LessParams(shortlist=2), Request(pool=dyn_pool, targets=(target_file,)))
    assert "shortlist" not in unknown
    whole = LessMethod().needs(LessParams(shortlist=1000), req)        # the shortlist is the pool
    assert "shortlist" not in whole
    with pytest.raises(ValueError, match="shortlist"):
        LessParams(shortlist=-1)


@pytest.mark.parametrize("bad,match", [({"grad_tokens": 0}, "grad_tokens must be >= 1"),
                                       ({"grad_tokens": -5}, "grad_tokens must be >= 1"),
                                       ({"unit_rows": 0}, "unit_rows must be >= 1")])
def test_gradient_batch_and_unit_sizes_must_be_positive(bad, match):
    """0 is a mistake, not "the default": the value is refused, never replaced silently."""
    from thresher.scoring.less import LessParams

    with pytest.raises(ValueError, match=match):
        LessParams(**bad)

"""Perplexity, EL2N and the error-uncertainty plane on top of the forward pass (tiny model)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from conftest import mixed_pool
from thresher.pipeline.artifacts import ArtifactStore
from thresher.pipeline.select import run_select
from thresher.pipeline.stages.forward import forward_signals
from thresher.selectors.quadrants import eu_keep, eu_quadrants, search_alpha


@pytest.fixture(scope="module")
def lm_pool(tmp_path_factory, sample_pool):
    return mixed_pool(tmp_path_factory.mktemp("lmpool"), sample_pool, 8, 1200, 16)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


def select(pool, method, budget, out, work, **opts):
    m = run_select(pool.path, method, budget, out, workdir=work,
                   params={k: v for k, v in opts.items() if v is not None})
    return pl.read_parquet(str(out) + ".selection.parquet"), m


def scores(pool, work, model, **kw):
    return forward_signals(pool, ArtifactStore(work), model, {"loss"}, **kw).scores()


@pytest.mark.parametrize("keep", ["top", "bottom", "middle", None])
def test_perplexity_keep(lm_pool, work, tiny_lm_dir, tmp_path, keep):
    sel, m = select(lm_pool, "perplexity", "10", tmp_path / "o.jsonl", work, model=str(tiny_lm_dir), keep=keep)
    ppl = dict(scores(lm_pool, work, str(tiny_lm_dir)).select("id", "ppl").iter_rows())
    chosen = [ppl[i] for i in sel["id"]]
    rest = [v for k, v in ppl.items() if k not in set(sel["id"])]
    assert sel.height == 10
    if keep == "top":
        assert min(chosen) >= max(rest)
    elif keep == "bottom":
        assert max(chosen) <= min(rest)
    else:   # middle is the default (Marion et al.)
        above = sum(v > max(chosen) for v in rest)
        below = sum(v < min(chosen) for v in rest)
        assert above + below == len(rest) and abs(above - below) <= 1
        assert m["config"]["method"]["keep"] == "middle"
    assert m["config"]["method"]["response_only"] is True
    assert m["config"]["method"]["max_tokens"] == 2048
    assert m["models"]["lm"].startswith(tiny_lm_dir.name)


def test_el2n_single_default_keeps_the_hardest_and_scores_are_stable(lm_pool, work, tiny_lm_dir, tmp_path):
    sel, m = select(lm_pool, "el2n-single", "6", tmp_path / "o.jsonl", work, model=str(tiny_lm_dir))
    el2n = dict(forward_signals(lm_pool, ArtifactStore(work), str(tiny_lm_dir), {"el2n"}).scores()
                .select("id", "el2n").iter_rows())
    chosen = [el2n[i] for i in sel["id"]]
    assert min(chosen) >= max(v for k, v in el2n.items() if k not in set(sel["id"]))
    assert all(0 <= v <= np.sqrt(2) for v in el2n.values())
    assert m["config"]["method"]["keep"] == "top"
    sel2, _ = select(lm_pool, "el2n-single", "6", tmp_path / "o2.jsonl", work, model=str(tiny_lm_dir))
    assert sel2["id"].equals(sel["id"])


def test_whole_sequence_switch_is_a_separate_recorded_setting(lm_pool, work, tiny_lm_dir, tmp_path):
    _, m = select(lm_pool, "perplexity", "5", tmp_path / "o.jsonl", work, model=str(tiny_lm_dir),
                  response_only=False, max_tokens=256)
    assert m["config"]["method"]["response_only"] is False and m["config"]["method"]["max_tokens"] == 256
    full = scores(lm_pool, work, str(tiny_lm_dir), response_only=False, max_tokens=256)
    resp = scores(lm_pool, work, str(tiny_lm_dir))
    assert (full["n_loss_tokens"] >= resp["n_loss_tokens"].clip(upper_bound=255)).all()
    assert (full["n_loss_tokens"] > resp["n_loss_tokens"]).any()
    with pytest.raises(ValueError, match="response_only=.maybe.: Input should be a valid boolean"):
        select(lm_pool, "perplexity", "5", tmp_path / "x.jsonl", work, model=str(tiny_lm_dir),
               response_only="maybe")


def test_eu_quadrants_by_hand():
    ppl = np.array([10.0, 10.0, 1.0, 1.0, 5.0])
    ent = np.array([3.0, 0.5, 0.5, 3.0, 1.5])
    # the median row (5, 1.5) sits on both thresholds: "<=" puts it low/low, as the code does
    assert eu_quadrants(ppl, ent, 0.5).tolist() == ["Q1", "Q2", "Q3", "Q4", "Q3"]
    # alpha=0.25: q(0.75) is 10 for ppl and 3 for entropy (nothing strictly above either),
    # q(0.25) is 1 and 0.5: only row 2 is low on both
    assert eu_quadrants(ppl, ent, 0.25).tolist() == ["-", "-", "Q3", "-", "-"]
    with pytest.raises(ValueError):
        eu_quadrants(ppl, ent, 0.7)


def test_eu_keep_bisects_and_fills():
    rng = np.random.default_rng(0)
    ppl, ent = rng.lognormal(size=400), rng.normal(size=400)
    res = eu_keep(ppl, ent, 0.25)
    # bisection lands within its tolerance (0.01) of the ratio, so nothing needs filling
    assert abs(res["kept"].mean() - 0.25) < 0.01 and not res["fill"].any()
    assert res["kept"].sum() + res["fill"].sum() >= 100
    assert set(res["labels"][res["kept"]]) <= {"Q2", "Q4"}
    alpha = search_alpha(ppl, ent, 0.25)
    assert 0 < alpha < 0.49 and res["alpha"] == alpha
    # perfectly correlated error and uncertainty: Q2 and Q4 are empty, all comes from the fill
    corr = eu_keep(ppl, np.log(ppl), 0.1)
    assert corr["kept"].sum() == 0 and corr["fill"].sum() == 40
    assert not corr["q2_like"][~corr["fill"]].any()


def test_eu_plane_method(lm_pool, work, tiny_lm_dir, tmp_path):
    sel, m = select(lm_pool, "eu-plane", "8", tmp_path / "o.jsonl", work, model=str(tiny_lm_dir))
    assert sel.height == 8 and sel["id"].n_unique() == 8
    kept = sel.filter(~pl.col("reason").str.starts_with("fill"))
    assert set(kept["quadrant"]) <= {"Q2", "Q4"}
    cfg = m["config"]["method"]
    assert sum(cfg["quadrant_counts"].values()) == lm_pool.n_rows and 0 < cfg["alpha_found"] < 0.5
    sel2, _ = select(lm_pool, "eu-plane", "8", tmp_path / "o2.jsonl", work, model=str(tiny_lm_dir),
                     alpha=0.5, keep_quadrants="Q1")
    assert set(sel2.filter(~pl.col("reason").str.starts_with("fill"))["quadrant"]) <= {"Q1"}
    with pytest.raises(ValueError, match="keep_quadrants"):
        select(lm_pool, "eu-plane", "8", tmp_path / "o3.jsonl", work, model=str(tiny_lm_dir), keep_quadrants="Q5")


def test_a_key_two_classes_declare_must_be_qualified(lm_pool, work, tiny_lm_dir, tmp_path):
    """`--method perplexity --selector band --param keep=bottom` once gave `keep` to the method
    and cut the top band; now the bare key is an error and `selector.keep` reaches the band."""
    with pytest.raises(ValueError, match="declared by both method perplexity and selector band; "
                                         "write method.keep or selector.keep"):
        run_select(lm_pool.path, "perplexity", "10", tmp_path / "a.jsonl", workdir=work,
                   params={"model": str(tiny_lm_dir), "keep": "bottom"}, selector="band")
    m = run_select(lm_pool.path, "perplexity", "10", tmp_path / "b.jsonl", workdir=work,
                   params={"model": str(tiny_lm_dir), "selector.keep": "bottom"}, selector="band")
    sel = pl.read_parquet(str(tmp_path / "b.jsonl") + ".selection.parquet")
    ppl = dict(scores(lm_pool, work, str(tiny_lm_dir)).select("id", "ppl").iter_rows())
    chosen = [ppl[i] for i in sel["id"]]
    assert max(chosen) <= min(v for k, v in ppl.items() if k not in set(sel["id"]))
    assert m["config"]["selector"]["keep"] == "bottom"
    assert m["config"]["method"]["keep"] == "middle"      # the method's own, untouched


def test_parameter_namespaces_name_their_mistakes():
    from thresher.pipeline.registry import choose

    with pytest.raises(ValueError, match="no --selector is named"):
        choose("perplexity", {"selector.keep": "top"})
    with pytest.raises(ValueError, match="unknown namespace 'sel'"):
        choose("perplexity", {"sel.keep": "top"}, "band")
    with pytest.raises(ValueError, match="unknown selector parameter 'eps'"):
        choose("perplexity", {"selector.eps": "1"}, "band")
    c = choose("perplexity", {"method.keep": "top", "selector.keep": "bottom"}, "band")
    assert c.params.keep == "top" and c.selector_params["keep"] == "bottom"


def test_methods_shows_method_and_selector_namespaces():
    from thresher.pipeline.cli import app
    from typer.testing import CliRunner

    out = CliRunner().invoke(app, ["methods", "perplexity"]).output
    method_part, selector_part = out.split("selector parameters")
    assert "--param keep=middle" in method_part
    assert "band: --param selector.keep=top" in selector_part
    s2l = CliRunner().invoke(app, ["methods", "s2l"]).output
    assert "selector parameters: none (this method makes its own cut)" in s2l
    assert "--param selector." not in s2l

"""The pretraining recipe (data/recipes/pretrain.yaml) on the bundled sample, as a user runs it:
each step removes what was planted for it, every row is accounted for, a rerun computes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from thresher.pipeline.recipe import load_recipe
from thresher.pipeline.run import run_recipe

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "pretrain"


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    recipe_file = ROOT / "data" / "recipes" / "pretrain.yaml"
    text = recipe_file.read_text()
    folder = tmp_path_factory.mktemp("recipe")
    recipe = load_recipe(recipe_file)
    recipe = recipe.model_copy(update={"out": str(folder / "out"), "report": None})
    assert "fuzzy-dedup" in text and "decontaminate" in text
    return recipe, run_recipe(recipe)


def _ids(recipe, name):
    return set(pl.read_parquet(Path(recipe.out) / name / f"{name}.parquet.selection.parquet")["id"])


def _manifest(recipe, name):
    return json.loads((Path(recipe.out) / name / f"{name}.parquet.manifest.json").read_text())


def test_each_step_removes_what_was_planted(ran):
    recipe, summary = ran
    assert summary['steps'][0]['step'] == 'ingest' and len(summary['steps']) > 6
    english, quality = _ids(recipe, "english"), _ids(recipe, "quality")
    dedup, clean, train = (_ids(recipe, n) for n in ("dedup", "decontaminated", "train"))
    foreign = {json.loads(x)["id"] for x in
               (SAMPLE / "other_languages.jsonl").read_text().splitlines()}
    assert not foreign & english and len(english) >= 290
    assert train <= clean <= dedup <= quality <= english
    pairs = pl.read_parquet(SAMPLE / "truth" / "pairs.parquet")
    for a, b, j in pairs.select("id_a", "id_b", "jaccard").iter_rows():
        if j >= 0.9 and {a, b} <= quality:
            assert not {a, b} <= dedup, (a, b, j)       # one of each near-duplicate pair goes
    leaks = pl.read_parquet(SAMPLE / "truth" / "leaks.parquet")
    assert not set(leaks["id"]) & clean
    assert set(leaks["id"]) & dedup                    # they reached that step and were caught
    files = _manifest(recipe, "decontaminated")["config"]["method"]["eval_files"]
    assert sum(f["rows_matched"] for f in files) >= len(set(leaks["id"]) & dedup)
    m = _manifest(recipe, "train")
    assert 0 < m["tokens"]["selected"] <= 100_000 and m["counts"]["selected"] < len(clean)
    for name in ("english", "quality", "dedup", "decontaminated", "train"):
        c = _manifest(recipe, name)["counts"]
        assert c["candidates"] == c["read"] - c["quarantined"] == 306


def test_rerun_computes_nothing(ran):
    recipe, _ = ran
    again = run_recipe(recipe)
    stages = [s for s in again["steps"] if s["step"] == "stage"]
    assert stages and all(s["cached"] for s in stages)

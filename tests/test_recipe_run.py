"""`thresher run RECIPE`: one plan for every selection, cached reruns, incremental curation."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from thresher.pipeline.recipe import load_recipe
from thresher.pipeline.run import run_recipe

RECIPE = """\
name: grow
out: out
sources: [src]
selections:
  - name: dedup
    method: semdedup
    params: {{eps: 0.2, embedder: {embedder}, k: 3}}
    budget: 100%
  - name: proto
    method: prototypes
    params: {{embedder: {embedder}, k: 3}}
    budget: 10
    format: parquet
  - name: pick
    method: random
    from: dedup
    budget: 8
    format: hf
"""


def _source_files(sample_pool_dir, dest, names=("gsm8k_train.jsonl", "mbpp.jsonl", "glaive_toolcall.jsonl"),
                  rows=20):
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        lines = (sample_pool_dir / name).read_text().splitlines()[:rows]
        (dest / name).write_text("\n".join(lines) + "\n")


def _recipe(folder, embedder):
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(embedder=embedder))
    return load_recipe(path)


def _steps(summary, kind):
    return [s for s in summary["steps"] if s["step"] == kind]


def _ids(path):
    return pl.read_parquet(f"{path}.selection.parquet")["id"].to_list()


def test_selections_share_one_plan_and_a_rerun_computes_nothing(tmp_path, sample_pool_dir,
                                                                 tiny_embedder):
    _source_files(sample_pool_dir, tmp_path / "src")
    recipe = _recipe(tmp_path, tiny_embedder)
    first = run_recipe(recipe)
    stages = _steps(first, "stage")
    assert [s["stage"] for s in stages].count("embed") == 1    # dedup and proto share it
    assert not any(s["cached"] for s in stages)
    out = Path(recipe.out)
    for name, data in (("dedup", "dedup/dedup.jsonl"), ("proto", "proto/proto.parquet"),
                       ("pick", "pick/pick/data/train-00000-of-00001.parquet")):
        assert (out / data).exists(), data
        card = out / name / "README.md" if name != "pick" else out / "pick" / "pick" / "README.md"
        assert card.read_text().startswith("---\n")
    assert set(_ids(out / "pick" / "pick")) <= set(_ids(out / "dedup" / "dedup.jsonl"))
    manifest = json.loads((out / "dedup" / "dedup.jsonl.manifest.json").read_text())
    embed = next(s for s in manifest["stages"] if s["stage"] == "embed")
    assert embed["cached"] is False and embed["rows_in"] == 60   # the cost this run paid
    assert json.loads((out / "run.json").read_text())["steps"] == first["steps"]

    subsets = ("dedup/dedup.jsonl", "proto/proto.parquet", "pick/pick")
    before = {sel: _ids(out / sel) for sel in subsets}
    again = run_recipe(recipe)
    ing = _steps(again, "ingest")[0]
    assert (ing["files_read"], ing["files_reused"], ing["read_now"]) == (0, 3, 0)
    assert all(s["cached"] for s in _steps(again, "stage"))
    assert {sel: _ids(out / sel) for sel in subsets} == before


def test_a_new_file_is_the_only_work_and_the_selection_equals_a_fresh_run(tmp_path,
                                                                          sample_pool_dir,
                                                                          tiny_embedder):
    grow = tmp_path / "grow"
    _source_files(sample_pool_dir, grow / "src", names=("gsm8k_train.jsonl", "mbpp.jsonl"))
    recipe = _recipe(grow, tiny_embedder)
    run_recipe(recipe)
    _source_files(sample_pool_dir, grow / "src", names=("glaive_toolcall.jsonl",), rows=15)
    second = run_recipe(recipe)
    ing = _steps(second, "ingest")[0]
    assert (ing["files_read"], ing["files_reused"], ing["read_now"]) == (1, 2, 15)
    embed = next(s for s in _steps(second, "stage") if s["stage"] == "embed")
    assert (embed["units_computed"], embed["units_cached"]) == (1, 2)
    assert embed["rows_computed"] == 15                     # only the new file's rows embedded

    fresh = tmp_path / "fresh"
    shutil.copytree(grow / "src", fresh / "src")
    fresh_recipe = _recipe(fresh, tiny_embedder)
    run_recipe(fresh_recipe)
    for sel in ("dedup/dedup.jsonl", "proto/proto.parquet", "pick/pick"):
        assert _ids(Path(recipe.out) / sel) == _ids(Path(fresh_recipe.out) / sel), sel
    assert (Path(recipe.out) / "dedup" / "dedup.jsonl").read_bytes() == \
        (Path(fresh_recipe.out) / "dedup" / "dedup.jsonl").read_bytes()

    (grow / "src" / "mbpp.jsonl").unlink()
    third = run_recipe(recipe)
    ing = _steps(third, "ingest")[0]
    assert [r["kept"] for r in ing["removed"]] == [20] and ing["kept"] == 35


def test_thresher_run_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: o\nsources: [x]\nselections:\n  - {name: a, method: random, budget: 5, epz: 1}\n")
    r = subprocess.run([sys.executable, "-m", "thresher.pipeline.cli", "run", str(bad)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {bad}:4: selections[0].epz: unknown field 'epz'; expected one of annotate_only, budget,")


@pytest.mark.parametrize("params, field", [("{epz: 0.1}", "eps")])
def test_bad_method_parameters_name_the_valid_ones(tmp_path, params, field):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text("{}\n")
    (tmp_path / "r.yaml").write_text(
        f"out: o\nsources: [src]\nselections:\n  - name: a\n    method: semdedup\n"
        f"    params: {params}\n    budget: 5\n")
    from thresher.pipeline.recipe import RecipeError

    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    assert "r.yaml:" in str(e.value) and field in str(e.value) and "selections[0]" in str(e.value)


def _cli(args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "thresher.pipeline.cli", *args], capture_output=True,
                          text=True, check=False, env=env, cwd=cwd)


def test_dry_run_and_serve_mistakes(tmp_path, sample_pool_dir):
    import os

    _source_files(sample_pool_dir, tmp_path / "src", names=("mbpp.jsonl",), rows=5)
    (tmp_path / "r.yaml").write_text("name: dr\nout: out\nsources: [src]\nselections:\n"
                                     "  - {name: a, method: random, budget: 3}\n")
    r = _cli(["run", str(tmp_path / "r.yaml"), "--dry-run"])
    assert r.returncode == 0, r.stderr
    assert "plan: after the first ingest (no pool yet)" in r.stdout
    assert f"select a: random, budget 3 -> {tmp_path / 'out' / 'a' / 'a.jsonl'}" in r.stdout
    assert not (tmp_path / "out").exists()     # a dry run writes nothing

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    r = _cli(["serve", str(tmp_path / "r.yaml"), "--cron", "0 3 * * *"], env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: thresher serve needs a Prefect server")
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"     # never contacted: the cron is checked first
    r = _cli(["serve", str(tmp_path / "r.yaml"), "--cron", "61 * * *"], env=env)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --cron '61 * * *': not a cron schedule (e.g. \"0 3 * * *\": minute hour "
        "day-of-month month day-of-week)")
    r = _cli(["serve", str(tmp_path / "r.yaml"), "--cron", "0 3 * * *"], env=env)   # nobody there
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: PREFECT_API_URL=http://127.0.0.1:9/api: no Prefect server")

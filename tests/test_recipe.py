"""Recipe files: validated with pydantic; every mistake is one line naming the file, line and field."""

from pathlib import Path

import pytest
from thresher.pipeline.recipe import RecipeError, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
name: demo
out: out/demo
sources: [pool]
ingest: {format: null, rows_per_shard: 500}
selections:
  - name: dedup
    method: semdedup
    params: {eps: 0.05}
    budget: 100%
  - name: gsm8k
    method: rds
    from: dedup
    targets: [targets/gsm8k_test.jsonl]
    budget: 64
    format: hf
verify: {selections: [gsm8k], eval: [targets/gsm8k_test.jsonl], max_eval: 24}
report: true
"""


def _layout(tmp_path):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "a.jsonl").write_text("{}\n")
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "gsm8k_test.jsonl").write_text("{}\n")


def test_a_good_recipe_loads_with_paths_relative_to_the_file(tmp_path):
    _layout(tmp_path)
    (tmp_path / "r.yaml").write_text(GOOD)
    r = load_recipe(tmp_path / "r.yaml")
    assert r.out == str(tmp_path / "out" / "demo")
    assert r.sources == [str(tmp_path / "pool")]
    assert r.selections[1].from_ == "dedup" and r.selections[1].format == "hf"
    assert r.selections[1].targets == [str(tmp_path / "targets" / "gsm8k_test.jsonl")]
    assert r.selections[0].budget == "100%" and r.selections[1].budget == "64"
    assert r.verify.eval == [str(tmp_path / "targets" / "gsm8k_test.jsonl")]
    assert r.report.out == str(tmp_path / "out" / "demo" / "report.html")
    assert r.ingest.rows_per_shard == 500 and r.seed == 0


@pytest.mark.parametrize("edit, expected", [
    (("    budget: 64\n", "    budget: 64x\n"), "r.yaml:14: selections[1].budget: bad budget '64x'"),
    (("    params: {eps: 0.05}\n", "    params: {eps: 0.05}\n    epz: 1\n"),
     "r.yaml:9: selections[0].epz: unknown field 'epz'; expected one of annotate_only, budget, format,"),
    (("    method: rds\n", "    method: rsd\n"), "r.yaml:11: selections[1].method: unknown method 'rsd'"),
    (("    budget: 64\n", ""), "r.yaml:10: selections[1].budget: required field is missing"),
    (("    format: hf\n", "    format: csv\n"), "r.yaml:15: selections[1].format: Input should be"),
    (("out: out/demo\n", ""), "r.yaml:1: out: required field is missing"),
    (("    from: dedup\n", "    from: gsm8k\n"), "'gsm8k' is not an earlier selection"),
    (("  - name: gsm8k\n", "  - name: dedup\n"), "selection names must be unique; repeated: dedup"),
    (("{format: null, rows_per_shard: 500}", "{format: csv}"), "r.yaml:4: ingest.format: Input should be"),
    (("verify: {selections: [gsm8k]", "verify: {selections: [nope]"), "verify.selections: no selection named nope"),
    (("report: true", "report: {out: r.html, open: yes}"), "r.yaml:17: report.open: unknown field 'open'"),
])
def test_mistakes_name_the_line_and_field(tmp_path, edit, expected):
    _layout(tmp_path)
    text = GOOD.replace(*edit)
    assert text != GOOD
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    msg = str(e.value)
    assert expected in msg and "\n" not in msg


def test_bad_yaml_and_missing_sources(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml:2: not valid YAML"):
        parse_recipe("a: [1,\nb: }", "r.yaml")
    with pytest.raises(RecipeError, match="a recipe is a YAML mapping"):
        parse_recipe("- 1\n", "r.yaml")
    (tmp_path / "r.yaml").write_text(GOOD)
    with pytest.raises(RecipeError, match=r"sources\[0\]: 'pool': no such file or directory"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "g.yaml").write_text(GOOD.replace("[pool]", "['in/*.jsonl.gz']"))
    with pytest.raises(RecipeError, match=r"sources\[0\]: 'in/\*.jsonl.gz' matches no file"):
        load_recipe(tmp_path / "g.yaml")
    with pytest.raises(FileNotFoundError, match="no such recipe file"):
        load_recipe(tmp_path / "none.yaml")


def test_globs_expand_sorted(tmp_path):
    _layout(tmp_path)
    (tmp_path / "in").mkdir()
    for n in ("b.jsonl.gz", "a.jsonl.gz", "c.jsonl.zst"):
        (tmp_path / "in" / n).write_bytes(b"")
    (tmp_path / "r.yaml").write_text(GOOD.replace("[pool]", "['in/*.jsonl.*', pool]"))
    r = load_recipe(tmp_path / "r.yaml")
    assert [Path(s).name for s in r.sources] == ["a.jsonl.gz", "b.jsonl.gz", "c.jsonl.zst", "pool"]

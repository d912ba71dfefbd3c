"""The report's filter-rule section, from a quality-rules selection and an annotate-only run over
the sample's C4 documents: counts per rule, a histogram per threshold rule with its cut, seeded
examples of removed rows and kept rows nearest each threshold; drawn in headless chromium."""

from __future__ import annotations

import json

import polars as pl
import pytest
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.select import run_select


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_pool_dir):
    d = tmp_path_factory.mktemp("rules-report")
    extra = [{"id": "short", "text": "Too short to keep."},
             {"id": "list", "text": "\n".join(f"- item {i}" for i in range(30))},
             {"id": "code", "text": "def f(x):\n    return {x: 1}\n" * 10}]
    (d / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))
    ingest([sample_pool_dir / "c4.parquet", d / "extra.jsonl"], d / "pool")
    sel = run_select(d / "pool", "quality-rules", "100%", d / "kept.jsonl", workdir=d / "w", seed=3)
    ann = run_select(d / "pool", "quality-rules", None, d / "values.parquet", workdir=d / "w",
                     annotate_only=True)
    return d, sel, ann


def test_rule_section_counts_histograms_and_examples(runs):
    from thresher.pipeline.report.build import write_report

    d, sel, ann = runs
    html = write_report([d / "kept.jsonl", d / "values.parquet"], d / "report.html").read_text()
    assert "Filter rules: what each rule removed" in html
    assert "rule-kept-gopher_quality-short_doc" in html and "rule-values-fineweb-list_ratio" in html
    assert "kept, nearest the threshold" in html and "removed" in html
    rules = sel["config"]["method"]["rules"]["rules"]
    assert rules["gopher_quality:short_doc"]["first"] >= 1       # "Too short to keep."
    assert rules["gopher_quality:short_doc"]["column"] == "gq_words"
    assert rules["gopher_quality:short_doc"]["threshold"] == 50
    assert ann["counts"]["keep"] == sel["counts"]["selected"]
    table = pl.read_parquet(d / "values.parquet")
    assert table.filter(pl.col("id") == "short")["reason"].item().startswith("gopher_")


def test_rule_section_draws_in_chromium(runs):
    from test_report import CHROMIUM, render
    from thresher.pipeline.report.build import write_report

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium")
    d, _, _ = runs
    report = write_report([d / "kept.jsonl"], d / "only.html")
    got = render(report, d / "only.png")
    assert got["errors"] == [] and got["requests"] == []
    rule_plots = [p for p in got["plots"] if p["id"].startswith("rule-")]
    assert len(rule_plots) >= 20
    for p in rule_plots:
        assert p["traces"] >= 1 and p["points"] > 0 and p["shapes"] >= 1, p["id"]   # cut drawn

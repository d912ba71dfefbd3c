"""The curation report: built from a real run over the bundled sample (tiny embedder, tiny LM for
verify), opened in Debian's chromium (headless, driven by Playwright, no browser download), with
every network request refused and recorded."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOCAL = ("file:", "data:", "blob:", "about:")

# every plotly figure: traces, data points, drawn SVG marks; the map's visible pool points
PLOTS_JS = """() => [...document.querySelectorAll('.js-plotly-plot')].map(gd => ({
  id: gd.id,
  traces: gd.data.length,
  points: gd._fullData.reduce((n, t) => n + Math.max((t.x || []).length, (t.y || []).length,
                                                (t.z || []).length), 0),
  drawn: gd.querySelectorAll('g.trace, g.hm, .funnellayer path, .barlayer path').length,
  visiblePool: gd._fullData.filter(t => t.visible === true && t.meta === 'pool')
                           .reduce((n, t) => n + t.x.length, 0),
  visibleSelected: gd._fullData.filter(t => t.visible === true && t.meta === 'selected')
                               .reduce((n, t) => n + t.x.length, 0),
  domPoints: gd.querySelectorAll('path.point').length,
  shapes: (gd.layout.shapes || []).length,
}))"""


def render(html: Path, screenshot: Path) -> dict:
    """Open `html` in headless chromium; screenshot it; return plot facts, errors and every
    non-local request (each one refused)."""
    from playwright.sync_api import sync_playwright

    errors, requests = [], []
    profile = tempfile.mkdtemp(prefix="thresher-chromium-")
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), headless=True, args=FLAGS,
                viewport={"width": 1366, "height": 900}, service_workers="block")

            def refuse(route):
                requests.append(route.request.url)
                route.abort()

            ctx.route(lambda url: not url.startswith(LOCAL), refuse)
            page = ctx.new_page()
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.on("console", lambda m: m.type == "error" and errors.append(f"console: {m.text}"))
            page.on("requestfailed", lambda r: r.url.startswith(LOCAL) or requests.append(r.url))
            page.goto(html.resolve().as_uri(), wait_until="load")
            page.wait_for_function("window.thresherReady !== undefined")
            page.evaluate("() => window.thresherReady.then(() => true)")
            plots = page.evaluate(PLOTS_JS)
            hover = _hover_text(page)
            page.screenshot(path=str(screenshot), full_page=True)
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return {"errors": errors, "requests": requests, "plots": plots, "hover": hover}


def _hover_text(page) -> str:
    """Move the mouse onto the map's first drawn point and read the hover label."""
    page.locator("#map").scroll_into_view_if_needed()
    box = page.evaluate("() => { const r = document.querySelector('#map path.point')"
                        ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }")
    page.mouse.move(*box)
    page.wait_for_selector("#map .hoverlayer .hovertext", timeout=5000)
    return page.text_content("#map .hoverlayer .hovertext") or ""


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, sample_pool, tiny_embedder, tiny_lm_dir):
    """The sample run: two selections of the bundled sample and verify on both."""
    from thresher.pipeline.select import run_select
    from thresher.pipeline.training.train import TrainConfig
    from thresher.pipeline.training.verify import run_verify

    out = tmp_path_factory.mktemp("run")
    work = out / "work"
    run_select(sample_pool.path, "semdedup", "16", out / "semdedup.jsonl", workdir=work,
               params={"embedder": tiny_embedder, "k": 7, "eps": 0.002})
    run_select(sample_pool.path, "random", "16", out / "rand.jsonl", seed=1, workdir=work)
    cfg = TrainConfig(model=str(tiny_lm_dir), batch_size=8, max_tokens=128, lr=1e-2)
    run_verify([out / "semdedup.jsonl", out / "rand.jsonl"],
               [Path(__file__).parent.parent / "data/sample/targets/gsm8k_test.jsonl"],
               out / "verify", cfg=cfg, max_eval=3, max_new_tokens=0, progress=False)
    return out


@pytest.fixture(scope="module")
def report(sample_run):
    from thresher.pipeline.report.build import write_report

    return write_report([sample_run], sample_run / "report.html")


def test_report_renders_in_chromium_offline(report, sample_run, sample_pool):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium")
    shot = sample_run / "report.png"
    got = render(report, shot)
    assert got["errors"] == []
    assert got["requests"] == [], "the report tried to reach the network"
    plots = {p["id"]: p for p in got["plots"]}
    for pid, p in plots.items():
        assert p["traces"] > 0 and p["points"] > 0 and p["drawn"] > 0, f"empty plot {pid}"
    for pid in ("funnel", "by-source", "by-capability", "map", "overlap", "clusters-map"):
        assert pid in plots, f"missing plot {pid}"
    assert any(pid.startswith("hist-semdedup") for pid in plots)
    assert any(pid.startswith("trainloss-") for pid in plots)
    m = plots["map"]
    assert m["visiblePool"] == sample_pool.n_rows          # every pool row is on the map
    assert m["visibleSelected"] == 32                      # 16 + 16 selected rows marked
    assert m["domPoints"] >= sample_pool.n_rows + 32       # and drawn
    assert "semdedup: " in got["hover"] and "scores: " in got["hover"]   # why, and the scores
    assert shot.stat().st_size > 50_000


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, sample_run, sample_pool):
    """A selection as the model-based methods write it: a score frame for every candidate
    (named by the manifest's `scores`), EU-plane columns, a PASER-style cluster table and
    per-stage statistics; rows from the sample pool, cut to the top 40 by `ppl`."""
    from thresher.selectors.quadrants import eu_quadrants

    out = tmp_path_factory.mktemp("scored")
    rng = np.random.default_rng(0)
    ids = sample_pool.frame(["id"])["id"].to_list()
    ppl = np.exp(rng.normal(2.0, 0.6, len(ids)))
    ent = rng.gamma(2.0, 0.5, len(ids))
    frame = pl.DataFrame({"id": ids, "ppl": ppl, "entropy": ent,
                          "quadrant": eu_quadrants(ppl, ent, 0.3).tolist()})
    frame.write_parquet(out / "scores.parquet")
    chosen = frame.sort("ppl", descending=True).head(40).with_columns(
        reason=pl.lit("top ppl")).with_row_index("rank")
    chosen.write_parquet(out / "eu.jsonl.selection.parquet")
    (out / "eu.jsonl").write_text("")
    manifest = json.loads((sample_run / "rand.jsonl.manifest.json").read_text())
    manifest.update(method="eu-plane", budget="40", scores=str(out / "scores.parquet"),
                    output=str(out / "eu.jsonl"), alpha_found=0.3,
                    cluster_table=[{"cluster": c, "size": 100 + c, "budget": 10 - c,
                                    "degradation": 0.1 * (c + 1)} for c in range(5)],
                    stages=[{"stage": "forward", "config": {}, "rows_in": len(ids),
                             "rows_out": len(ids), "tokens": 12345, "seconds": 3.5,
                             "device": "cpu", "flops": 2.5e12, "cached": False}])
    manifest["counts"]["selected"] = 40
    manifest["config"]["selector"] = {"name": "ScoreBand", "column": "ppl", "keep": "top"}
    (out / "eu.jsonl.manifest.json").write_text(json.dumps(manifest))
    return out / "eu.jsonl"


def test_scored_selection_renders_eu_plane_and_cluster_table(scored_run, sample_run):
    from thresher.pipeline.report.build import write_report

    html = write_report([scored_run], sample_run / "scored.html")
    got = render(html, sample_run / "scored.png")
    assert got["errors"] == [] and got["requests"] == []
    plots = {p["id"]: p for p in got["plots"]}
    for pid, p in plots.items():
        assert p["traces"] > 0 and p["points"] > 0 and p["drawn"] > 0, f"empty plot {pid}"
    assert {"eu-eu", "clusters-eu", "hist-eu-ppl", "hist-eu-entropy"} <= set(plots)
    assert plots["eu-eu"]["points"] == 775 + 40      # every candidate, plus the ringed picks
    assert plots["hist-eu-ppl"]["shapes"] == 1           # the top-40 cut on ppl is marked
    assert "<td class='num'>2.5e+12</td>" in html.read_text()   # FLOPs from the stages
    # why a row was left out: its ppl lies below the cut on the selector's column
    from thresher.pipeline.report.data import load_runs
    from thresher.pipeline.report.map import _why

    sel = load_runs([scored_run])[0][0]
    lowest = sel.decisions.sort("ppl")["id"][0]
    top = sel.chosen["id"][0]
    why_low, why_top = _why(sel, [lowest, top])
    assert why_low.startswith("not selected: ppl=") and "below the cut" in why_low
    assert why_top == "selected #0: top ppl"


def test_report_html_is_self_contained(report):
    html = report.read_text()
    assert "<script src=" not in html and "<link " not in html
    for anchor in ("funnel", "map", "scores", "clusters", "examples", "compare", "verify",
                   "manifest"):
        assert f"<section id='sec-{anchor}'>" in html


def test_report_reads_every_selection_and_the_verify(sample_run):
    from thresher.pipeline.report.data import load_runs

    sels, verifies = load_runs([sample_run])
    assert sorted(s.name for s in sels) == ["rand", "semdedup"]
    assert [v.path for v in verifies] == [sample_run / "verify"]
    assert set(verifies[0].train_logs) == {"semdedup", "rand", "random"}
    # the verify directory alone brings its subsets along
    sels2, _ = load_runs([sample_run / "verify"])
    assert sorted(s.name for s in sels2) == ["rand", "semdedup"]
    semdedup = next(s for s in sels if s.name == "semdedup")
    assert semdedup.decisions is not None and semdedup.decisions.height == 775


def test_recipe_layout_one_folder_per_selection(tmp_path, sample_run):
    from thresher.pipeline.report.data import load_runs

    for name in ("semdedup", "rand"):
        (tmp_path / name).mkdir()
        for f in sample_run.glob(f"{name}.jsonl*"):
            shutil.copy(f, tmp_path / name / f.name)
    sels, verifies = load_runs([tmp_path])
    assert sorted(s.name for s in sels) == ["rand", "semdedup"] and verifies == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no selection manifests"):
        load_runs([tmp_path / "empty"])


def test_cli_report_and_user_errors(tmp_path, sample_run):
    from thresher.pipeline.cli import app
    from typer.testing import CliRunner

    out = tmp_path / "r.html"
    r = CliRunner().invoke(app, ["report", str(sample_run / "semdedup.jsonl"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.exists() and "semdedup" in out.read_text()[:2000]
    r = CliRunner().invoke(app, ["report", str(tmp_path / "nothing.jsonl"), "--out", str(out)])
    assert r.exit_code == 2 and "error:" in r.output and "nothing.jsonl" in r.output
    sidecar = sample_run / "semdedup.jsonl.selection.parquet"      # never written over an input
    before = sidecar.read_bytes()
    r = CliRunner().invoke(app, ["report", str(sample_run / "semdedup.jsonl"), "--out", str(sidecar)])
    assert r.exit_code == 2 and "error:" in r.output and sidecar.read_bytes() == before


# ------------------------------------------------------------------ units

def test_cuts_mark_only_the_ends_inside_the_range():
    from thresher.pipeline.report.data import cuts

    every = np.arange(100, dtype=float)
    assert cuts(every, every[60:]) == [60.0]                 # top band: one lower cut
    assert cuts(every, every[:30]) == [29.0]                 # bottom band
    assert cuts(every, every[20:80]) == [20.0, 79.0]         # middle band: both ends
    assert cuts(every, every[::3]) == []                     # spread over the range: no cut
    assert cuts(None, every) == []


def test_funnel_steps_count_dedup_from_the_method(tmp_path):
    from thresher.pipeline.report.data import Selection
    from thresher.pipeline.report.sections import funnel_steps

    m = {"counts": {"read": 100, "quarantined": 10, "candidates": 90, "selected": 40},
         "config": {"method": {"exact_duplicates": 5, "semantic_duplicates": 15}}}
    sel = Selection("s", tmp_path / "s.jsonl", m, pl.DataFrame({"id": ["a"], "rank": [0]}))
    assert funnel_steps(sel) == [("read", 100), ("kept (not quarantined)", 90),
                                 ("after exact dedup", 85), ("after near dedup", 70),
                                 ("selected", 40)]


def test_recorded_relative_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    from thresher.pipeline.io.manifests import recorded_path

    (tmp_path / "out" / "pool").mkdir(parents=True)
    manifest = tmp_path / "out" / "x.jsonl.manifest.json"
    manifest.write_text(json.dumps({}))
    monkeypatch.chdir(tmp_path / "out")     # elsewhere than where `select` ran
    assert recorded_path("out/pool", manifest, "out/x.jsonl") == tmp_path / "out" / "pool"


def test_projection_is_cached_and_subsampled(tmp_path, monkeypatch):
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.stages import umap2d as projection

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.05, size=(40, 8)) for c in (-1.0, 1.0)]).astype(np.float32)
    store = ArtifactStore(tmp_path)
    p = projection.project_umap(store, x, "test:blobs", max_points=60)
    rows, xy = p.rows, p.coords
    assert len(rows) == 60 and np.all(np.diff(rows) > 0) and xy.shape == (60, 2)
    # the two blobs stay apart on the map
    first = rows < 40
    gap = np.linalg.norm(xy[first].mean(0) - xy[~first].mean(0))
    assert gap > 3 * max(xy[first].std(0).max(), xy[~first].std(0).max())
    monkeypatch.setattr(projection, "fit_umap", lambda *a: pytest.fail("refit a cached map"))
    again = projection.project_umap(store, x, "test:blobs", max_points=60)
    np.testing.assert_array_equal(again.coords, xy)

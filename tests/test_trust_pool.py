"""A run knows its pool: pool.json is checked field by field, a pool replaced under a running
command is caught before anything is written, and report and verify use the pool a manifest
records (an absolute path) and refuse one whose fingerprint differs."""

import json

import pytest
from conftest import chat_jsonl, run_cli
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.io.poolfile import check_pool_json

GOOD = {"format_version": 2, "fingerprint": "f" * 32, "read": 3, "kept": 2, "quarantined": 1,
        "duplicate_ids": 0, "inputs": [{"path": "a.jsonl", "sha256": "0" * 64}],
        "shards": [{"name": "part-00000.parquet", "rows": 2, "bytes": 10, "sha256": "0" * 64}]}
DAMAGED = [
    ([], "a JSON list, expected an object"),
    ({**GOOD, "format_version": 7}, "pool format version 7"),
    ({k: v for k, v in GOOD.items() if k != "shards"}, "'shards' is not a list"),
    ({**GOOD, "shards": 5}, "'shards' is not a list"),
    ({**GOOD, "shards": [{"nam": "x"}]}, "shards[0] has no name"),
    ({**GOOD, "shards": [{"name": "../../in.jsonl"}]}, "is not a shard file name"),
    ({**GOOD, "shards": [{"name": "part-00000.parquet", "rows": -1}]}, "shards[0].rows is -1"),
    ({**GOOD, "shards": [GOOD["shards"][0]] * 2}, "a shard is listed twice"),
    ({k: v for k, v in GOOD.items() if k != "kept"}, "'kept' is None, expected a count"),
    ({**GOOD, "read": "3"}, "'read' is '3'"),
    ({**GOOD, "read": 9}, "read 9 != kept 2 + quarantined 1"),
    ({**GOOD, "kept": 5, "read": 6}, "its shards hold 2 rows, 'kept' says 5"),
    ({k: v for k, v in GOOD.items() if k != "fingerprint"}, "no fingerprint"),
    ({**GOOD, "inputs": [{"path": 1}]}, "inputs[0] lacks its path or sha256"),
]


@pytest.mark.parametrize("info, message", DAMAGED, ids=[m for _, m in DAMAGED])
def test_a_damaged_pool_json_is_named(tmp_path, info, message):
    with pytest.raises(ValueError, match="pool.json") as e:
        check_pool_json(info, tmp_path / "pool.json")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert check_pool_json(json.loads(json.dumps(GOOD)), tmp_path / "pool.json")["shards"]


@pytest.mark.parametrize("text", ["{broken", "\xff\xfe", "", "null", "[1, 2]"])
def test_damaged_pool_json_through_the_cli_is_one_line(tmp_path, monkeypatch, capsys, text):
    (tmp_path / "in.jsonl").write_text(chat_jsonl(4))
    ingest([tmp_path / "in.jsonl"], tmp_path / "pool")
    (tmp_path / "pool" / "pool.json").write_text(text)
    code, _, err = run_cli(monkeypatch, capsys, ["select", str(tmp_path / "pool"), "--method",
                                                 "random", "--budget", "2", "--out",
                                                 str(tmp_path / "o.jsonl")])
    assert code == 2 and err.count("\n") == 1 and f"{tmp_path / 'pool' / 'pool.json'}:" in err
    assert "re-run `thresher ingest`" in err


def test_a_pool_replaced_under_a_running_select_writes_nothing(tmp_path, monkeypatch):
    """`ingest` swaps a new pool in while `select` runs (here: between its stages and the
    write): the rows written would be another pool's, so nothing is written."""
    from thresher.pipeline import plan
    from thresher.pipeline.select import run_select

    (tmp_path / "a.jsonl").write_text(chat_jsonl(20))
    (tmp_path / "b.jsonl").write_text(chat_jsonl(30, 100))
    ingest([tmp_path / "a.jsonl"], tmp_path / "pool")
    real = plan.Plan.run

    def run_then_reingest(self, pool, store, executor):
        out = real(self, pool, store, executor)
        ingest([tmp_path / "b.jsonl"], tmp_path / "pool")
        return out

    monkeypatch.setattr(plan.Plan, "run", run_then_reingest)
    with pytest.raises(ValueError, match="the pool changed while this command ran"):
        run_select(tmp_path / "pool", "random", "15", tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()
    assert not (tmp_path / "o.jsonl.manifest.json").exists()


def test_reads_of_a_replaced_pool_stop(tmp_path):
    (tmp_path / "a.jsonl").write_text(chat_jsonl(20))
    ingest([tmp_path / "a.jsonl"], tmp_path / "pool", rows_per_shard=5)
    pool = Pool(tmp_path / "pool")
    it = pool.iter_rows(["id"])
    next(it)
    ingest([tmp_path / "a.jsonl"], tmp_path / "pool", rows_per_shard=7)   # same rows, new shards
    with pytest.raises(ValueError, match="the pool changed"):
        list(it)
    with pytest.raises(ValueError, match="the pool changed"):
        pool.frame(["id"])


@pytest.fixture
def two_pools(tmp_path, monkeypatch):
    """sel/s.jsonl selected from here/pool (as `select pool ...` run in `here`), and a
    different pool of the same name in `there`."""
    from thresher.pipeline.select import run_select

    for d, word in (("here", "question"), ("there", "other")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "in.jsonl").write_text(chat_jsonl(12, word=word))
        ingest([tmp_path / d / "in.jsonl"], tmp_path / d / "pool")
    monkeypatch.chdir(tmp_path / "here")
    (tmp_path / "here" / "sel").mkdir()
    m = run_select("pool", "random", "4", "sel/s.jsonl")
    return tmp_path, m


def test_the_manifest_records_the_pool_it_was_selected_from(two_pools):
    tmp_path, m = two_pools
    assert m["inputs"]["pool"] == str(tmp_path / "here" / "pool")
    assert m["inputs"]["pool_fingerprint"] == Pool(tmp_path / "here" / "pool").fingerprint


def test_report_and_verify_use_the_manifest_s_pool_from_any_directory(two_pools, monkeypatch):
    from thresher.pipeline.report.build import ReportContext
    from thresher.pipeline.report.data import load_runs
    from thresher.pipeline.training.verify import find_pool

    tmp_path, _ = two_pools
    monkeypatch.chdir(tmp_path / "there")             # holds another `pool`
    subset = tmp_path / "here" / "sel" / "s.jsonl"
    ctx = ReportContext(*load_runs([subset]), None, False, 100)
    assert ctx.pool.path == tmp_path / "here" / "pool"
    assert find_pool([subset], None).path == tmp_path / "here" / "pool"


def test_a_pool_with_another_fingerprint_is_refused(two_pools, monkeypatch, capsys):
    tmp_path, _ = two_pools
    subset = tmp_path / "here" / "sel" / "s.jsonl"
    ingest([tmp_path / "there" / "in.jsonl"], tmp_path / "here" / "pool")   # re-ingested
    for args in (["report", str(subset), "--out", str(tmp_path / "r.html")],
                 ["verify", "--subset", str(subset), "--eval", str(tmp_path / "here" / "in.jsonl"),
                  "--out", str(tmp_path / "v")],
                 ["verify", "--subset", str(subset), "--eval", str(tmp_path / "here" / "in.jsonl"),
                  "--pool", str(tmp_path / "there" / "pool"), "--out", str(tmp_path / "v")]):
        code, _, err = run_cli(monkeypatch, capsys, args)
        assert code == 2 and err.count("\n") == 1, err
        assert "is not that of the pool" in err and "re-ingested or is another one" in err
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "v").exists()


def test_an_older_manifest_with_a_relative_pool_resolves_beside_it(two_pools, monkeypatch):
    from thresher.pipeline.report.data import load_runs, pool_path

    tmp_path, _ = two_pools
    manifest = tmp_path / "here" / "sel" / "s.jsonl.manifest.json"
    m = json.loads(manifest.read_text())
    m["inputs"]["pool"], m["output"] = "pool", "sel/s.jsonl"   # as recorded before: relative
    manifest.write_text(json.dumps(m))
    monkeypatch.chdir(tmp_path / "there")             # its own `pool` is not the one
    (sel,), _ = load_runs([tmp_path / "here" / "sel" / "s.jsonl"])
    assert pool_path(sel) == tmp_path / "here" / "pool"

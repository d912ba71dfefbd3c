"""CLI misuse, table-driven: every user mistake, bad file or environment problem is exit 2 with a
one-line `error: ...` naming the file or option; a programming error keeps its traceback;
Ctrl-C leaves no temporary behind."""

import errno
import json
import sys

import pytest
from conftest import run_cli
from thresher.pipeline import cli

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a small input file, a pool, an empty pool, a pool with a truncated shard."""
    from thresher.pipeline.io.ingest import ingest

    d = tmp_path_factory.mktemp("cli")
    rows = [{"id": f"r{i}", **CHAT, "messages": [{"role": "user", "content": f"q{i}"},
                                                {"role": "assistant", "content": f"a{i}"}]}
            for i in range(12)]
    (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest([d / "in.jsonl"], d / "pool", rows_per_shard=5)
    (d / "empty.jsonl").write_text("{}\n")
    ingest([d / "empty.jsonl"], d / "empty")
    ingest([d / "in.jsonl"], d / "broken", rows_per_shard=5)
    shard = d / "broken" / "shards" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-7])
    (d / "afile.txt").write_text("not a pool")
    (d / "adir").mkdir()
    return d


SEL = ["select", "{d}/pool", "--method", "random", "--budget", "3", "--out", "{d}/o.jsonl"]


def sel(**change):
    args = list(SEL)
    for k, v in change.items():
        flag = "--" + k
        if flag in args:
            i = args.index(flag)
            args[i + 1:i + 2] = [v] if v is not None else []
            if v is None:
                del args[i]
        else:
            args += [flag, v]
    return args


MISUSE = [
    (["nosuch"], "No such command"),
    (["select", "{d}/pool"], "--budget is required"),
    (sel(budget="lots"), "bad budget"),
    (sel(budget="0"), "bad budget"),
    (sel(budget="150%"), "bad budget"),
    (sel(method="bogus"), "unknown method 'bogus'"),
    (sel(method=None), "--method is required (or give --target"),
    (sel(format="xml"), "unknown format 'xml'"),
    (sel(seed="abc"), "--seed"),
    (sel(param="noequals"), "expected KEY=VALUE"),
    (sel(device="tpu"), "--device 'tpu'"),
    (sel(device="cuda:x"), "--device 'cuda:x'"),
    (["select", "{d}/nopool"] + SEL[2:], "not a pool"),
    (["select", "{d}/afile.txt"] + SEL[2:], "not a pool"),
    (["select", "{d}/broken"] + SEL[2:], "part-00001.parquet"),
    (sel(out="{d}/pool/shards/part-00000.parquet"), "inside the input"),
    (sel(out="{d}/pool/pool.json"), "inside the input"),
    (sel(out="{d}/pool"), "is a directory"),
    (sel(out="{d}/adir"), "is a directory"),
    (["ingest", "{d}/missing.jsonl", "--out", "{d}/p2"], "no such file"),
    (["ingest", "{d}/in.jsonl", "--out", "{d}/p2", "--format", "bogus"], "unknown format"),
    (["ingest", "{d}/in.jsonl", "--out", "{d}/p2", "--encoding", "klingon"], "--encoding"),
    (["ingest", "{d}/in.jsonl", "--out", "{d}/p2", "--rows-per-shard", "0"], "--rows-per-shard"),
    (["ingest", "{d}/in.jsonl", "--out", "{d}/afile.txt"], "is not a pool"),
    (["ingest", "{d}/in.jsonl", "--out", "{d}/adir"], "is not a pool"),
    (["ingest", "{d}/pool", "--out", "{d}/pool"], "would replace the input"),
    (["ingest", "{d}/pool", "--out", "{d}/pool/inner"], "inside the input pool"),
    (["ingest", "{d}/in.jsonl", "--out", "{d}/in.jsonl"], "would replace the input"),
    (["ingest", "{d}/afile.txt", "--out", "{d}/p3"], "unsupported file type"),
    (["ingest", "{d}/adir", "--out", "{d}/p3"], "holds no"),
    (["ingest", "{d}/*.nothing", "--out", "{d}/p3"], "matches no supported file"),
    (["train", "{d}/in.jsonl", "--out", "{d}/run", "--device", "tpu"], "--device 'tpu'"),
    (["train", "{d}/missing.jsonl", "--out", "{d}/run"], "no such file"),
    (["train", "{d}/pool", "--out", "{d}/pool/run"], "inside the input"),
    (["qtuning-masks", "{d}/in.jsonl", "--out", "{d}/in.jsonl"], "is the input"),
    (["verify", "--subset", "{d}/in.jsonl", "--eval", "{d}/in.jsonl", "--pool", "{d}/pool",
      "--out", "{d}/pool"],
     "inside the input"),
]


def listing(d):
    """Every path under d, except the artifact cache (a cache, not an output)."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if ".thresher-work" not in p.parts)


@pytest.mark.parametrize("args, message", MISUSE, ids=[" ".join(a[:1] + a[-2:]) for a, _ in MISUSE])
def test_misuse_is_one_line_exit_2(ws, monkeypatch, capsys, args, message):
    before = listing(ws)
    code, _, err = run_cli(monkeypatch, capsys, [a.format(d=ws) for a in args])
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert listing(ws) == before  # nothing written, nothing left over


def test_disk_full_is_one_line(ws, monkeypatch, capsys, tmp_path):
    from thresher.pipeline.io import ingest as pool

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "p" / "x"))

    monkeypatch.setattr(pool._ShardWriter, "flush", full)
    code, _, err = run_cli(monkeypatch, capsys, ["ingest", str(ws / "in.jsonl"), "--out",
                                                 str(tmp_path / "p")])
    assert code == 2 and err.strip() == f"error: {tmp_path / 'p' / 'x'}: No space left on device"
    assert list(tmp_path.iterdir()) == []  # the temporary pool is gone


def test_programming_errors_keep_their_traceback(ws, monkeypatch, tmp_path):
    from thresher.pipeline.io import ingest as pool

    def bug(*a, **k):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(pool, "ingest", bug)
    monkeypatch.setattr(sys, "argv", ["thresher", "ingest", str(ws / "in.jsonl"), "--out",
                                      str(tmp_path / "p")])
    with pytest.raises(KeyError):
        cli.main()


def test_ctrl_c_during_ingest_leaves_no_temporary(ws, monkeypatch, capsys, tmp_path):
    from thresher.pipeline.io import ingest as pool

    real = pool._ShardWriter.flush

    def interrupted(self):
        real(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(pool._ShardWriter, "flush", interrupted)
    code, _, err = run_cli(monkeypatch, capsys, ["ingest", str(ws / "in.jsonl"), "--out",
                                                 str(tmp_path / "p"), "--rows-per-shard", "2"])
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_hub_name_without_network_is_one_line(ws, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(monkeypatch, capsys, sel(param="model=nobody-x/no-such-model", method="perplexity")[:1] + [
        a.format(d=ws) for a in sel(param="model=nobody-x/no-such-model", method="perplexity")[1:]])
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "nobody-x/no-such-model" in err


def test_two_trainings_into_one_directory_are_refused(ws, tmp_path):
    from thresher.pipeline.io.outputs import output_lock
    from thresher.pipeline.training.train import train_file

    (tmp_path / "run").mkdir()
    with output_lock(tmp_path / "run"), pytest.raises(ValueError, match="another thresher run"):
        train_file(ws / "in.jsonl", tmp_path / "run")


def test_hf_directory_output_replaces_an_earlier_one_whole(tmp_path):
    from thresher.pipeline.io.outputs import OutputSet

    out = tmp_path / "ds"
    for n in (1, 2):
        with OutputSet([out, tmp_path / "ds.manifest.json"], dir_outputs=[out]) as outs:
            (outs.temp(out) / "data").mkdir(parents=True)
            (outs.temp(out) / "data" / f"part{n}").write_text("x")
            outs.temp(tmp_path / "ds.manifest.json").write_text(str(n))
    assert [p.name for p in (out / "data").iterdir()] == ["part2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds.manifest.json"]


def test_a_rejected_select_leaves_no_work_directory(tmp_path, monkeypatch, capsys):
    from thresher.pipeline.io.ingest import ingest

    (tmp_path / "in.jsonl").write_text("".join(json.dumps(
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(4)))
    ingest([tmp_path / "in.jsonl"], tmp_path / "pool")
    for bad in (["--method", "random", "--param", "epz=1"], ["--method", "bogus"], []):
        code, _, err = run_cli(monkeypatch, capsys, ["select", str(tmp_path / "pool"), "--budget", "2",
                                                     "--out", str(tmp_path / "o.jsonl"), *bad])
        assert code == 2 and err.startswith("error: "), err
    assert not (tmp_path / ".thresher-work").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "pool"]


def test_a_parameter_refused_by_the_method_itself_is_one_named_line(tmp_path, monkeypatch, capsys):
    """A check in a method's own parameter class (its __post_init__) reads as that check's
    message, not as pydantic's field-less `?=...: Value error, ...`."""
    from thresher.pipeline.io.ingest import ingest

    (tmp_path / "in.jsonl").write_text("".join(json.dumps(
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(4)))
    ingest([tmp_path / "in.jsonl"], tmp_path / "pool")
    for param, says in (("max_share=0", "max_share must be in (0, 1]"), ("eps=3", "eps must be in [0, 2)")):
        method = "rds" if param.startswith("max_share") else "semdedup"
        extra = ["--target", str(tmp_path / "in.jsonl")] if method == "rds" else []
        code, _, err = run_cli(monkeypatch, capsys, ["select", str(tmp_path / "pool"), "--budget", "2",
                                                     "--method", method, "--param", param, *extra,
                                                     "--out", str(tmp_path / "o.jsonl")])
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"error: bad parameter: {says}, got "), err
        assert "?" not in err and "Value error" not in err

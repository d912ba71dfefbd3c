"""Inputs read once and announced, and rows that cannot be rendered quarantined at ingest:
directory walks end on link cycles and read a file once by device and inode, every file found
and not read is listed with its reason, .xz and .tsv are read, a thresher subset read again is
the rows it was made from, and a conversation no chat template can render never enters a pool."""

import json
import lzma
import os
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.inputs import describe_skipped, walk_inputs
from thresher.pipeline.io.pool import Pool


def chat(i, roles=("user", "assistant")):
    return {"id": f"r{i}", "messages": [{"role": r, "content": f"{r} {i}"} for r in roles]}


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.fixture
def no_hang():
    """A walk that loops fails the test instead of hanging it."""
    def boom(*_):
        raise TimeoutError("the walk did not finish")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_link_cycles_end_and_every_file_is_read_once(tmp_path, no_hang):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    write(d / "a.jsonl", [chat(i) for i in range(3)])
    write(d / "sub" / "b.jsonl", [chat(i) for i in range(3, 5)])
    (d / "s1").symlink_to(".")
    (d / "s2").symlink_to(".")
    (d / "sub" / "up").symlink_to("..")
    os.link(d / "a.jsonl", d / "hard.jsonl")
    (d / "soft.jsonl").symlink_to(d / "a.jsonl")
    found = walk_inputs([d, d / "a.jsonl", d / "sub"])
    assert [p.name for p in found.files] == ["a.jsonl", "b.jsonl"]
    reasons = sorted(s["reason"].split(" (")[0].split(" as ")[0] for s in found.skipped)
    assert reasons.count("a directory already read") == 4      # s1, s2, sub/up, the named sub
    assert reasons.count("the same file") == 3                  # hard.jsonl, soft.jsonl, a.jsonl
    rep = ingest([d], tmp_path / "pool")
    assert (rep.read, rep.kept) == (5, 5) and len(rep.skipped) == 5


def test_files_not_read_are_listed_with_a_count(tmp_path, monkeypatch, capsys):
    import sys

    from thresher.pipeline import cli

    d = tmp_path / "data"
    d.mkdir()
    write(d / "a.jsonl", [chat(1)])
    for name in ("notes.txt", "b.jsonl.manifest.json", "c.yaml", ".hidden.jsonl", "NOEXT"):
        (d / name).write_text("x")
    (d / ".thresher-work").mkdir()                 # thresher's own: passed over silently
    monkeypatch.setattr(sys, "argv", ["thresher", "ingest", str(d), "--out", str(tmp_path / "p")])
    with pytest.raises(SystemExit):
        cli.main()
    err = capsys.readouterr().err
    assert "files: 5 found and not read: " in err
    for part in ("unsupported type .txt (notes.txt)", "unsupported type .yaml (c.yaml)",
                 "unsupported type: no extension (NOEXT)", "hidden (.hidden.jsonl)",
                 "a thresher sidecar (b.jsonl.manifest.json)"):
        assert part in err
    info = Pool(tmp_path / "p").info["skipped_files"]
    assert info["count"] == 5 and sum(info["by_reason"].values()) == 5
    assert {e["path"] for e in info["examples"]} == {str(d / n) for n in (
        ".hidden.jsonl", "NOEXT", "b.jsonl.manifest.json", "c.yaml", "notes.txt")}


def test_a_folder_of_unsupported_files_says_what_it_found(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds no .* files \(found only: a.txt\)"):
        walk_inputs([tmp_path / "d"])


def test_describe_skipped_counts_by_reason():
    line = describe_skipped([{"path": f"/d/{n}", "reason": "unsupported type .txt"}
                             for n in ("a.txt", "b.txt", "c.txt", "d.txt")])
    assert line == "4 found and not read: 4 unsupported type .txt (a.txt, b.txt, c.txt, ...)"


def test_xz_and_tsv_are_read_like_the_others(tmp_path):
    body = "".join(json.dumps(chat(i)) + "\n" for i in range(4)).encode()
    (tmp_path / "a.jsonl.xz").write_bytes(lzma.compress(body))
    (tmp_path / "b.tsv").write_text("instruction\toutput\tnote\nadd 1+1\t2\tx, y\n")
    (tmp_path / "c.jsonl.xz").write_bytes(lzma.compress(body)[:40])     # truncated: counted
    rep = ingest([tmp_path], tmp_path / "p")
    by = {os.path.basename(i.path): i for i in rep.inputs}
    assert by["a.jsonl.xz"].kept == 4 and by["b.tsv"].kept == 1
    assert by["c.jsonl.xz"].read == by["c.jsonl.xz"].quarantined >= 1
    row = next(r for r in Pool(tmp_path / "p").iter_rows() if r["source"] == "b")
    assert row["messages"][0]["content"] == "add 1+1" and json.loads(row["meta"]) == {"note": "x, y"}


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(extra=st.dictionaries(st.sampled_from(["capability", "score", "meta", "kind", "tags"]),
                             st.none() | st.integers() | st.text(max_size=5), max_size=3),
       fmt=st.sampled_from(["parquet", "hf", "messages"]), text_row=st.booleans())
def test_a_subset_read_again_is_the_rows_it_was_made_from(tmp_path_factory, extra, fmt, text_row):
    """`--format parquet` (or hf, or messages) written, then ingested again: `meta` is not
    wrapped in another `meta`; every row is the row it was (id, text, fields)."""
    from thresher.pipeline.io.writers import HF_DATA, write_rows

    d = tmp_path_factory.mktemp("again")
    rec = {"id": "x1", **extra}
    rec.update({"text": "plain text"} if text_row else chat(1))
    rec["id"] = "x1"
    write(d / "in.jsonl", [rec])
    ingest([d / "in.jsonl"], d / "p1")
    (row,) = Pool(d / "p1").iter_rows()
    out = d / ("sub.parquet" if fmt == "parquet" else "sub" if fmt == "hf" else "sub.jsonl")
    write_rows([row], out, fmt)
    ingest([out / HF_DATA if fmt == "hf" else out], d / "p2")
    (again,) = Pool(d / "p2").iter_rows()
    if fmt == "messages":   # the JSONL shapes carry no original fields
        assert (again["id"], again["messages"], again["text"]) == \
            (row["id"], row["messages"], row["text"])
    else:
        assert again == row


ROLES = [
    (("assistant", "user", "assistant"), "turn 0 (assistant) comes before any user turn"),
    (("system", "assistant", "user", "assistant"), "turn 1 (assistant) comes before any user turn"),
    (("user", "assistant"), None),
    (("system", "user", "assistant", "user"), None),
]


@pytest.mark.parametrize("roles, reason", ROLES, ids=["-".join(r) for r, _ in ROLES])
def test_a_reply_to_nothing_is_quarantined_with_file_and_line(tmp_path, roles, reason):
    write(tmp_path / "in.jsonl", [chat(0), chat(1, roles), chat(2)])
    rep = ingest([tmp_path / "in.jsonl"], tmp_path / "p")
    q = [json.loads(x) for x in (tmp_path / "p" / "quarantine.jsonl").read_text().splitlines()]
    if reason is None:
        assert (rep.kept, rep.quarantined) == (3, 0)
        return
    assert (rep.kept, rep.quarantined) == (2, 1)
    assert q[0]["file"] == str(tmp_path / "in.jsonl") and q[0]["location"] == "line 2"
    assert reason in q[0]["reason"]


def test_every_pool_row_renders_and_random_select_works(tmp_path):
    """The issue's case: one conversation starting with the assistant blocked every select."""
    from thresher.pipeline.select import run_select

    write(tmp_path / "in.jsonl", [chat(1, ("assistant", "user", "assistant"))] +
          [chat(i) for i in range(2, 8)])
    ingest([tmp_path / "in.jsonl"], tmp_path / "p")
    m = run_select(tmp_path / "p", "random", "6", tmp_path / "o.jsonl")
    assert m["counts"]["selected"] == 6 and m["counts"]["quarantined"] == 1


def test_the_chat_template_decides_what_renders(tmp_path, monkeypatch):
    """A template that refuses a role order (as Llama-2's refuses non-alternating turns)
    quarantines those rows at ingest; each order of roles is rendered once."""
    from thresher.pipeline.models import chat as chat_mod

    strict = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == "
              "messages[loop.index0 - 1]['role'] %}{{ raise_exception('roles must alternate') }}"
              "{% endif %}{{ m['content'] }}{% endfor %}")
    monkeypatch.setattr(chat_mod, "default_template", lambda: strict)
    calls = []
    real = chat_mod.RenderCheck.render
    monkeypatch.setattr(chat_mod.RenderCheck, "render",
                        lambda self, m: calls.append(1) or real(self, m))
    write(tmp_path / "in.jsonl", [chat(i) for i in range(5)] +
          [chat(9, ("user", "user", "assistant"))])
    rep = ingest([tmp_path / "in.jsonl"], tmp_path / "p")
    assert (rep.kept, rep.quarantined) == (5, 1) and len(calls) == 2
    q = json.loads((tmp_path / "p" / "quarantine.jsonl").read_text())
    assert q["location"] == "line 6" and "roles must alternate" in q["reason"]


def test_the_default_template_is_read_without_a_tokenizer(monkeypatch):
    from thresher.pipeline.models import chat as chat_mod
    from thresher.pipeline.models import resolve

    monkeypatch.setattr(resolve, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded"))
    check = chat_mod.RenderCheck.default()
    assert check.check(chat(1)["messages"]) is None

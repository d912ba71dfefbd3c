"""The output guard (pipeline/io/guard.py): every writer refuses, before any work, to write over
or into what it reads, into a pool or a work directory's cache, or over a folder of files thresher
did not write; the refusal is one `error:` line, exit 2, and nothing on disk changes."""

import os

import pytest
from conftest import chat_jsonl, run_cli, snapshot
from thresher.pipeline.io.guard import (
    check_outputs,
    check_replace_dir,
    check_replace_file,
    check_workdir,
    check_writes_into,
    file_output,
    protected,
)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """in.jsonl, its pool, a selection r.jsonl of it, the default work directory with one
    artifact, someone's dataset folder and someone's notes folder."""
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.select import run_select

    d = tmp_path_factory.mktemp("guard")
    (d / "in.jsonl").write_text(chat_jsonl(12))
    ingest([d / "in.jsonl"], d / "pool")
    run_select(d / "pool", "random", "4", d / "r.jsonl")
    art = ArtifactStore(d / ".thresher-work").dir("embed", ["x"], {"model": "m"})
    (art.path("embeddings.npy")).write_bytes(b"cached")
    ds = d / "myds"
    (ds / "data").mkdir(parents=True)
    for name in ("train-00000-of-00001.parquet", "test-00000-of-00001.parquet"):
        (ds / "data" / name).write_bytes(b"someone's split")
    (ds / "README.md").write_text("hand-written card")
    (ds / "NOTES.txt").write_text("notes")
    (d / "notes").mkdir()
    for name in ("README.md", "quarantine.jsonl", "report.html", "verify.md"):
        (d / "notes" / name).write_text(f"someone's {name}")
    (d / "afile.txt").write_text("not a report")
    return d


SEL = ["select", "{d}/pool", "--method", "random", "--budget", "3"]
WORK = "{d}/.thresher-work/embed/" + "{key}"
HOSTILE = [
    # --format hf over someone's dataset folder: its test split, card and notes stay
    (SEL + ["--format", "hf", "--out", "{d}/myds"], "holds files thresher did not write"),
    (SEL + ["--format", "hf", "--out", "{d}/pool"], "is the input"),
    (SEL + ["--out", "{d}/pool/pool.json"], "inside the input"),
    (SEL + ["--out", "{d}/in.jsonl"], "is the input"),          # the file the pool came from
    (SEL + ["--out", WORK + "/embeddings.npy"], "lies inside the work directory"),
    (SEL + ["--out", "{d}/o.jsonl", "--workdir", "{d}/pool/wk"], "lies inside the pool"),
    (SEL + ["--out", "{d}/o.jsonl", "--workdir", "{d}/notes"], "not thresher's cache"),
    (SEL + ["--out", "{d}/o.jsonl", "--workdir", WORK], "lies inside the work directory cache"),
    (SEL + ["--out", "{d}/.thresher-work/o.jsonl"], "lies inside the work directory"),
    (SEL + ["--out", "{d}/newdir/"], "ends with '/'"),
    (SEL + ["--out", "{d}/o.jsonl", "--dry-run", "--workdir", "{d}/pool/wk"], "lies inside the pool"),
    (SEL + ["--out", "{d}/pool/x.jsonl", "--dry-run"], "inside the input"),
    (["report", "{d}/r.jsonl", "--out", "{d}/pool/pool.json"], "not a thresher report"),
    (["report", "{d}/r.jsonl", "--out", "{d}/pool/shards/new.html"], "inside the input"),
    (["report", "{d}/r.jsonl", "--out", "{d}/in.jsonl"], "not a thresher report"),
    (["report", "{d}/r.jsonl", "--out", "{d}/r.jsonl.selection.parquet"], "not a thresher report"),
    (["report", "{d}/r.jsonl", "--out", "{d}/pool/new.html"], "inside the input"),
    (["report", "{d}/r.jsonl", "--out", WORK + "/map.html"], "inside the work directory"),
    (["report", "{d}/r.jsonl", "--out", "{d}/rep/"], "ends with '/'"),
    (["verify", "--subset", "{d}/r.jsonl", "--eval", "{d}/in.jsonl", "--out", "{d}/pool"],
     "lies inside the input"),
    (["verify", "--subset", "{d}/r.jsonl", "--eval", "{d}/in.jsonl", "--out", "{d}/notes"],
     "which thresher did not write"),
    (["train", "{d}/r.jsonl", "--out", "{d}/pool"], "lies inside the pool"),
    (["train", "{d}/r.jsonl", "--out", "{d}/notes"], "which thresher did not write"),
    (["train", "{d}/r.jsonl", "--out", WORK], "lies inside the work directory cache"),
    (["qtuning-masks", "{d}/pool", "--out", "{d}/pool/masks.jsonl"], "inside the input"),
    (["qtuning-masks", "{d}/in.jsonl", "--out", WORK + "/m.jsonl"], "work directory cache"),
    (["qtuning-masks", "{d}/in.jsonl", "--out", "{d}/m/"], "ends with '/'"),
    (["prune", "smollm2-135m-instruct", "--ratio", "0.5", "--out", "{d}/pool/pruned"],
     "lies inside the pool"),
    (["prune", "smollm2-135m-instruct", "--ratio", "0.5", "--out", "{d}/notes"], "not empty"),
    (["ingest", "{d}/in.jsonl", "--out", "{d}/pool/inner"], "lies inside the pool"),
    (["ingest", "{d}/in.jsonl", "--out", WORK + "/pool"], "work directory cache"),
    (["embed", "{d}/pool", "--workdir", "{d}/pool/shards"], "lies inside the pool"),
]


@pytest.mark.parametrize("args, message", HOSTILE,
                         ids=[" ".join(a[:1] + a[-2:]) for a, _ in HOSTILE])
def test_every_writer_refuses_and_changes_nothing(ws, monkeypatch, capsys, args, message):
    key = next((ws / ".thresher-work" / "embed").iterdir()).name
    before = snapshot(ws)
    code, _, err = run_cli(monkeypatch, capsys, [a.format(d=ws, key=key) for a in args])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert snapshot(ws) == before


# ------------------------------------------------------------------ the rules, one by one

@pytest.fixture
def pool(tmp_path):
    p = tmp_path / "pool"
    (p / "shards").mkdir(parents=True)
    (p / "pool.json").write_text("{}")
    return p


def test_a_pool_or_a_cache_is_protected_whether_or_not_it_is_read(tmp_path, pool):
    (tmp_path / "w" / "embed" / "k1").mkdir(parents=True)
    (tmp_path / "w" / "embed" / "k1" / "_SPEC.json").write_text("{}")
    (tmp_path / "w" / "tokens" / "c" / "units").mkdir(parents=True)
    (tmp_path / "w" / "tokens" / "c" / "units" / "ab.done.json").write_text("{}")
    assert protected(pool / "shards" / "x.parquet") == (pool, "pool")
    assert protected(tmp_path / "w" / "embed" / "k1" / "e.npy")[1] == "work directory cache"
    assert protected(tmp_path / "w" / "tokens" / "c" / "units" / "n.parquet")[1] == \
        "work directory cache"
    (tmp_path / "a" / ".thresher-work").mkdir(parents=True)
    assert protected(tmp_path / "a" / ".thresher-work" / "x")[1] == "work directory cache"
    assert protected(tmp_path / "elsewhere.jsonl") is None
    for out in (pool / "a.jsonl", tmp_path / "w" / "embed" / "k1" / "e.npy"):
        with pytest.raises(ValueError, match="lies inside the"):
            check_outputs([out])
    check_outputs([], dir_outputs=[pool], pools=[pool])   # ingest replaces a pool: allowed
    with pytest.raises(ValueError, match="lies inside the pool"):
        check_outputs([], dir_outputs=[pool])             # any other writer: refused
    target = tmp_path / "w" / "embed" / "k1" / "pool"     # a stage's pool in its own artifact
    check_outputs([], dir_outputs=[target], pools=[target], cache=True)
    with pytest.raises(ValueError, match="work directory cache"):
        check_outputs([], dir_outputs=[target], pools=[target])
    with pytest.raises(ValueError, match="lies inside the pool"):
        check_outputs([], dir_outputs=[pool / "p"], pools=[pool / "p"], cache=True)


def test_links_to_an_input_are_the_input(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    os.link(src, tmp_path / "hard.jsonl")
    (tmp_path / "soft.jsonl").symlink_to(src)
    (tmp_path / "dirlink").symlink_to(tmp_path)
    for out in ("hard.jsonl", "soft.jsonl", "dirlink/in.jsonl"):
        with pytest.raises(ValueError, match="is the input"):
            check_outputs([tmp_path / out], inputs=[src])


def test_a_directory_replaced_whole_must_be_thresher_s(tmp_path):
    out, record = tmp_path / "ds", tmp_path / "ds.manifest.json"
    check_replace_dir(out, ["data/x.parquet", "README.md"], record)        # new: fine
    (out / "data").mkdir(parents=True)
    check_replace_dir(out, ["data/x.parquet", "README.md"], record)        # empty: fine
    (out / "data" / "x.parquet").write_bytes(b"x")
    with pytest.raises(ValueError, match="was not written by thresher"):  # no record beside
        check_replace_dir(out, ["data/x.parquet", "README.md"], record)
    record.write_text("{}")
    check_replace_dir(out, ["data/x.parquet", "README.md"], record)        # ours
    (out / "data" / "y.parquet").write_bytes(b"y")
    with pytest.raises(ValueError, match=r"holds files thresher did not write \(data/y.parquet\)"):
        check_replace_dir(out, ["data/x.parquet", "README.md"], record)


def test_fixed_names_are_written_into_a_folder_only_when_it_is_an_earlier_run(tmp_path):
    check_writes_into(tmp_path / "new", ["a.json"], "a.json")
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / "other.txt").write_text("mine")
    check_writes_into(tmp_path, ["a.json", "b.md"], "a.json")   # nothing collides
    with pytest.raises(ValueError, match="holds README.md, which thresher did not write"):
        check_writes_into(tmp_path, ["README.md", "a.json"], "a.json")
    (tmp_path / "a.json").write_text("{}")                     # an earlier run's record
    check_writes_into(tmp_path, ["README.md", "a.json"], "a.json")


def test_a_file_is_overwritten_only_by_its_own_kind(tmp_path):
    f = tmp_path / "x.html"
    check_replace_file(f, lambda p: False, "a report")        # missing: fine
    f.write_text("data")
    with pytest.raises(ValueError, match="exists and is not a report"):
        check_replace_file(f, lambda p: False, "a report")
    check_replace_file(f, lambda p: True, "a report")


def test_work_directory_rules(tmp_path, pool):
    check_workdir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_workdir(tmp_path / "empty")
    check_workdir(tmp_path / "a" / ".thresher-work")
    used = tmp_path / "used"
    (used / "embed" / "k" ).mkdir(parents=True)
    (used / "embed" / "k" / "_SPEC.json").write_text("{}")
    check_workdir(used)                                     # an existing work directory
    (used / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds files that are not thresher's cache \(embed, mine.txt\)"):
        check_workdir(used)
    with pytest.raises(ValueError, match="lies inside the pool"):
        check_workdir(pool / "w")
    with pytest.raises(ValueError, match="lies inside the pool"):
        check_workdir(pool)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_workdir(tmp_path / "f")


@pytest.mark.parametrize("text, ok", [("a.jsonl", True), ("d/a.jsonl", True), ("d/", False),
                                      ("d//", False), ("/", True)])
def test_a_trailing_slash_names_a_directory(text, ok):
    if ok:
        assert str(file_output(text)) == str(text).rstrip("/") or text == "/"
    else:
        with pytest.raises(ValueError, match="ends with '/'"):
            file_output(text)


def test_hf_output_with_a_trailing_slash_is_the_directory(ws, tmp_path):
    from thresher.pipeline.io.writers import HF_DATA
    from thresher.pipeline.select import run_select

    m = run_select(ws / "pool", "random", "3", f"{tmp_path / 'ds'}/", fmt="hf",
                   workdir=tmp_path / "w")
    assert (tmp_path / "ds" / HF_DATA).is_file() and (tmp_path / "ds" / "README.md").is_file()
    assert (tmp_path / "ds.manifest.json").is_file() and m["counts"]["selected"] == 3
    again = run_select(ws / "pool", "random", "2", tmp_path / "ds", fmt="hf", workdir=tmp_path / "w")
    assert again["counts"]["selected"] == 2                 # its own directory: replaced whole
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["README.md", "data"]

"""Recipes under the output guard: every output is checked against every source, target and eval
file before any step runs (and by --dry-run the same), outputs never overlap, and a recipe's own
outputs are never read back as its sources."""


import pytest
from conftest import chat_jsonl, run_cli, snapshot


def recipe(d, body: str):
    path = d / "r.yaml"
    path.write_text(body)
    return path


@pytest.fixture
def src(tmp_path):
    """d15/code/code.jsonl and d15/math/math.jsonl, plus a target and an eval file."""
    (tmp_path / "d15" / "code").mkdir(parents=True)
    (tmp_path / "d15" / "math").mkdir()
    (tmp_path / "d15" / "code" / "code.jsonl").write_text(chat_jsonl(5))
    (tmp_path / "d15" / "math" / "math.jsonl").write_text(chat_jsonl(5, 5))
    (tmp_path / "t.jsonl").write_text(chat_jsonl(2, 50))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("someone's card")
    return tmp_path


SEL = "selections:\n  - {name: code, method: random, budget: 3}\n"
RDS = "out: o\nsources: [d15/code]\nselections:\n  - {name: s, method: rds, budget: 3, targets: "
HOSTILE = [
    # a selection named like a source folder would write the subset among its sources
    ("out: d15\nsources: [d15/code, d15/math]\n" + SEL, "its folder", "holds the source"),
    # a report over a source file, into the pool, or onto the recipe itself
    ("out: o\nsources: [d15/code]\n" + SEL + "report: {out: ../d15/code/code.jsonl}\n",
     "report.out:", "not a thresher report"),
    ("out: o\nsources: [d15/code]\n" + SEL + "report: {out: pool/pool.json}\n",
     "recipe outputs overlap", "report.out"),
    ("out: o\nsources: [d15/code]\n" + SEL + "report: {out: ../r.yaml}\n",
     "report.out is this recipe file", ""),
    # outputs inside one another
    ("out: o\nsources: [d15/code]\nselections:\n  - {name: pool, method: random, budget: 3}\n",
     "recipe outputs overlap", "selection 'pool'"),
    ("out: o\nworkdir: o/code\nsources: [d15/code]\n" + SEL, "recipe outputs overlap",
     "the work directory"),
    # a selection folder, OUT, a work directory holding someone's files
    ("out: .\nsources: [d15/code]\nselections:\n  - {name: notes, method: random, budget: 3}\n",
     "selection 'notes':", "holds README.md, which thresher did not write"),
    ("out: o\nworkdir: notes\nsources: [d15/code]\n" + SEL, "workdir:", "not thresher's cache"),
    # targets and eval files: read before any work
    (RDS + "[empty.jsonl]}\n", "--target", "no usable rows (the file is empty)"),
    (RDS + "[bad.jsonl]}\n", "--target", "no usable rows (1 unusable, e.g. line 1: malformed JSON"),
    (RDS + "[t.jsonl, d15]}\n", "--target", "is a directory"),
    ("out: o\nsources: [d15/code]\n" + SEL + "verify: {eval: [missing.jsonl]}\n",
     "verify.eval", "no such file"),
    ("out: o\nsources: [d15/code]\n" + SEL + "verify: {eval: [empty.jsonl]}\n",
     "verify.eval", "no usable rows"),
]


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("body, says, also", HOSTILE, ids=[h[1] + " " + h[2] for h in HOSTILE])
def test_recipe_mistakes_are_refused_before_any_step(src, monkeypatch, capsys, body, says, also,
                                                     dry):
    path = recipe(src, body)
    before = snapshot(src)
    code, _, err = run_cli(monkeypatch, capsys, ["run", str(path)] + (["--dry-run"] if dry else []))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert says in lines[0] and also in lines[0]
    assert snapshot(src) == before            # no pool, no cache, no subset: nothing at all


def test_a_recipe_never_reads_its_own_outputs(src, monkeypatch, capsys):
    """out: its own source folder; globs that match earlier outputs too."""
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.recipe import load_recipe
    from thresher.pipeline.run import run_recipe

    path = recipe(src, "out: d15/code\nsources: [d15/code, 'd15/code/**/*.jsonl']\n"
                       "selections:\n  - {name: sub, method: random, budget: 3}\n"
                       "report: {out: report.jsonl}\n")
    first = run_recipe(load_recipe(path))
    pool = Pool(src / "d15" / "code" / "pool")
    assert (src / "d15" / "code" / "sub" / "sub.jsonl").is_file() and pool.n_rows == 5
    second = run_recipe(load_recipe(path))
    again = Pool(src / "d15" / "code" / "pool")
    assert again.n_rows == 5 and again.fingerprint == pool.fingerprint
    assert first["steps"][0]["read"] == second["steps"][0]["read"] == 5
    skipped = again.info["skipped_files"]
    reasons = {e["path"].split("/code/")[-1]: e["reason"] for e in skipped["examples"]}
    for own in ("sub", "pool", "run.json", "report.jsonl"):
        assert reasons[own].startswith("an output of this run"), reasons


def test_a_source_that_is_the_recipes_own_pool_is_refused(src, monkeypatch, capsys):
    from thresher.pipeline.recipe import load_recipe
    from thresher.pipeline.run import run_recipe

    run_recipe(load_recipe(recipe(src, "out: o\nsources: [d15/code]\n" + SEL)))
    path = recipe(src, "out: o\nsources: [o/pool]\n" + SEL)
    code, _, err = run_cli(monkeypatch, capsys, ["run", str(path)])
    assert code == 2 and "an output of this run" not in err and err.startswith("error: "), err


def test_someone_s_run_json_in_out_is_not_overwritten(src, monkeypatch, capsys):
    (src / "o").mkdir()
    (src / "o" / "run.json").write_text("someone's")
    code, _, err = run_cli(monkeypatch, capsys,
                           ["run", str(recipe(src, "out: o\nsources: [d15/code]\n" + SEL))])
    assert code == 2 and "holds run.json, which thresher did not write" in err
    assert (src / "o" / "run.json").read_text() == "someone's"

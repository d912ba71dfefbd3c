"""pipeline/io/outputs.py: refuse outputs over inputs; commit a run's outputs as one unit."""

import os
import threading

import pytest
from thresher.pipeline.io.outputs import (
    OutputSet,
    check_outputs,
    clean_stale,
    output_lock,
    temp_name,
)


@pytest.fixture
def pool(tmp_path):
    p = tmp_path / "pool"
    (p / "shards").mkdir(parents=True)
    (p / "pool.json").write_text("{}")
    (p / "shards" / "part-00000.parquet").write_bytes(b"x")
    return p


@pytest.mark.parametrize("rel", ["pool/pool.json", "pool/shards/part-00000.parquet",
                                 "pool/new.jsonl", "pool"])
def test_outputs_inside_or_onto_an_input_are_refused(tmp_path, pool, rel):
    with pytest.raises(ValueError, match="--out"):
        check_outputs([tmp_path / rel], inputs=[pool])


def test_hard_link_and_symlink_to_an_input_are_refused(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    os.link(src, tmp_path / "hard.jsonl")
    (tmp_path / "soft.jsonl").symlink_to(src)
    for out in ("hard.jsonl", "soft.jsonl"):
        with pytest.raises(ValueError, match="is the input"):
            check_outputs([tmp_path / out], inputs=[src])


def test_directory_output_holding_an_input_is_refused(tmp_path, pool):
    with pytest.raises(ValueError, match="holding the input"):
        check_outputs([], inputs=[pool / "shards" / "part-00000.parquet"], dir_outputs=[tmp_path])
    check_outputs([tmp_path / "elsewhere.jsonl"], inputs=[pool])  # fine


def test_file_output_naming_a_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        check_outputs([tmp_path], inputs=[])


def test_commit_renames_all_and_the_record_last(tmp_path):
    finals = [tmp_path / "o.jsonl", tmp_path / "o.jsonl.selection.parquet",
              tmp_path / "o.jsonl.manifest.json"]
    (tmp_path / "o.jsonl.manifest.json").write_text("old")
    with OutputSet(finals) as outs:
        for f in finals:
            outs.temp(f).write_text(f"new {f.name}")
        assert (tmp_path / "o.jsonl.manifest.json").read_text() == "old"  # nothing final yet
    assert [f.read_text() for f in finals] == [f"new {f.name}" for f in finals]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in finals)


def test_failure_and_interrupt_leave_finals_untouched_and_no_temporaries(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("old")
    for exc in (ValueError, KeyboardInterrupt):
        with pytest.raises(exc), OutputSet([out]) as outs:
            outs.temp(out).write_text("partial")
            raise exc()
        assert out.read_text() == "old"
        assert [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    out = tmp_path / "o.jsonl"
    dead = out.with_name(f".o.jsonl.thresher-tmp-{2**22 + 12345}-abcd")  # no such pid
    dead.write_text("left by a killed run")
    mine = temp_name(out)
    mine.write_text("this run")
    clean_stale(out)
    assert not dead.exists() and mine.exists()


def test_concurrent_runs_never_interleave(tmp_path):
    """Many writers commit the same three outputs; each file set on disk comes from one run."""
    finals = [tmp_path / "o.jsonl", tmp_path / "o.side", tmp_path / "o.manifest"]

    def run(tag):
        for _ in range(20):
            with OutputSet(finals) as outs:
                for f in finals:
                    outs.temp(f).write_text(tag)

    threads = [threading.Thread(target=run, args=(f"run{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({f.read_text() for f in finals}) == 1


def test_lock_without_wait_refuses_a_second_holder(tmp_path):
    with output_lock(tmp_path), pytest.raises(ValueError, match="another thresher run"), \
            output_lock(tmp_path, wait=False):
        pass

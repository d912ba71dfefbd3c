"""Kill and resume: `select` SIGKILLed in the middle of the embedding stage and of the
forward-pass stage, then rerun, writes byte-identical outputs to an uninterrupted run, and no
unit finished before the kill is computed again.

The killed run kills itself (SIGKILL) right after writing its second unit of the stage, patched
in the child process only: the kill always lands mid-stage, with no timing involved; the rerun is
not patched."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DYING = textwrap.dedent("""
    import os, signal, sys
    import thresher.pipeline.executors as ex
    kind, real, done = sys.argv.pop(1), ex.write_unit, []
    def dying(run, unit, *args, **kwargs):
        info = real(run, unit, *args, **kwargs)
        if run.stage.kind == kind:
            done.append(unit.key)
            if len(done) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return info
    ex.write_unit = dying
    from thresher.pipeline.cli import main
    main()
""")


def _select(pool, out, workdir, method, params, kill_in=None):
    args = ["select", str(pool), "--method", method, "--budget", "50%", "--out", str(out),
            "--workdir", str(workdir), *[a for p in params for a in ("--param", p)]]
    if kill_in:
        return [sys.executable, "-c", DYING, kill_in, *args]
    return [sys.executable, "-c", "from thresher.pipeline.cli import main; main()", *args]


def _markers(workdir: Path, kind: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in workdir.glob(f"{kind}/*/units/*.done.json")}


def _outputs(out: Path) -> dict[str, bytes]:
    names = [out, out.with_name(out.name + ".selection.parquet")]
    return {p.name: p.read_bytes() for p in names}


@pytest.fixture(scope="module")
def shard_pool(tmp_path_factory):
    from thresher.pipeline.io.ingest import ingest

    d = tmp_path_factory.mktemp("kill")
    rows = [{"id": f"r{i}", "messages": [
        {"role": "user", "content": f"question {i}: what is {i} plus {i * 3}?"},
        {"role": "assistant", "content": f"{i} plus {i * 3} is {i * 4}."}]} for i in range(48)]
    (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest([d / "in.jsonl"], d / "pool", rows_per_shard=4)   # 12 shards
    return d / "pool"


@pytest.mark.slow
@pytest.mark.parametrize("method, kind, model_param", [
    ("semdedup", "embed", "embedder"),
    ("perplexity", "forward", "model"),
])
def test_sigkill_mid_stage_then_rerun_is_byte_identical(tmp_path, shard_pool, method, kind,
                                                        model_param, request):
    fixture = "tiny_embedder" if kind == "embed" else "tiny_lm_dir"
    params = [f"{model_param}={request.getfixturevalue(fixture)}"]
    if method == "semdedup":
        params.append("k=3")
    n_shards = len(list((shard_pool / "shards").iterdir()))

    ref = tmp_path / "ref" / "o.jsonl"
    r = subprocess.run(_select(shard_pool, ref, tmp_path / "ref-work", method, params),
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]

    out, work = tmp_path / "run" / "o.jsonl", tmp_path / "work"
    r = subprocess.run(_select(shard_pool, out, work, method, params, kill_in=kind),
                       capture_output=True, text=True, check=False)
    assert r.returncode == -9, r.stderr[-3000:]
    before = _markers(work, kind)
    assert len(before) == 2 < n_shards    # killed in the middle of the stage
    assert not out.exists()               # nothing final written by the killed run

    r = subprocess.run(_select(shard_pool, out, work, method, params),
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _markers(work, kind)
    assert len(after) == n_shards
    assert {p: after[p] for p in before} == before  # finished shards were not recomputed
    assert _outputs(out) == _outputs(ref)
    assert not [p for p in out.parent.iterdir() if "thresher-tmp" in p.name]

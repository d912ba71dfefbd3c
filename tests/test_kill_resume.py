"""Kill and resume: `select` SIGKILLed in the middle of the embedding stage and of the
forward-pass stage, then rerun, writes byte-identical outputs to an uninterrupted run, and no
shard finished before the kill is computed again.

The killed run is slowed (a pause after each finished shard, patched in the child process
only) so the kill reliably lands mid-stage on any machine; the rerun is not patched."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SLOW = textwrap.dedent("""
    import sys, time
    import thresher.pipeline.executors as ex
    real = ex.write_shard
    def slow(*args, **kwargs):
        real(*args, **kwargs)
        time.sleep(0.4)
    ex.write_shard = slow
    from thresher.pipeline.cli import main
    main()
""")


def _select(pool, out, workdir, method, params, slow=False):
    args = ["select", str(pool), "--method", method, "--budget", "50%", "--out", str(out),
            "--workdir", str(workdir), *[a for p in params for a in ("--param", p)]]
    code = SLOW if slow else "from thresher.pipeline.cli import main; main()"
    return [sys.executable, "-c", code, *args]


def _markers(workdir: Path, kind: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in workdir.glob(f"{kind}/*/shards/*.done.json")}


def _outputs(out: Path) -> dict[str, bytes]:
    names = [out, out.with_name(out.name + ".selection.parquet")]
    return {p.name: p.read_bytes() for p in names}


@pytest.fixture(scope="module")
def shard_pool(tmp_path_factory):
    from thresher.pipeline.io.pool import ingest

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
    proc = subprocess.Popen(_select(shard_pool, out, work, method, params, slow=True),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while len(_markers(work, kind)) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the stage never finished two shards"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _markers(work, kind)
    assert 2 <= len(before) < n_shards  # killed in the middle of the stage
    assert not out.exists()              # nothing final written by the killed run

    r = subprocess.run(_select(shard_pool, out, work, method, params),
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _markers(work, kind)
    assert len(after) == n_shards
    assert {p: after[p] for p in before} == before  # finished shards were not recomputed
    assert _outputs(out) == _outputs(ref)
    assert not [p for p in out.parent.iterdir() if "thresher-tmp" in p.name]

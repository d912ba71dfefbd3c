"""Every stage's work is units the executor runs. For the gradient methods (LESS, the `--target`
default; S2L; DEALRec) on a small pool with the tiny LM:

- `--executor ray` (a local 2-CPU cluster, started here on loopback) writes the same subset and
  the same unit files, byte for byte, as `--executor local`;
- a `select` killed right after its multi-unit stage finished two units (SIGKILL, sent by the
  process itself after writing the second unit's marker: no timing involved) resumes on a rerun
  without recomputing those two units, and its subset equals the uninterrupted run's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import SAMPLE

DYING = textwrap.dedent("""
    import os, signal
    import thresher.pipeline.executors as ex
    real, done = ex.write_unit, []
    def dying(run, unit, *args, **kwargs):
        info = real(run, unit, *args, **kwargs)
        if run.stage.kind == os.environ["THRESHER_TEST_KILL_KIND"]:
            done.append(unit.key)
            if len(done) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return info
    ex.write_unit = dying
    from thresher.pipeline.cli import main
    main()
""")

FAST = ["max_tokens=128", "proxy_batch_size=4", "proxy_lr=2e-2"]
METHODS = {   # method: (its parameters, the multi-unit stage a kill lands in)
    "less": ([*FAST, "epochs=2", "proxy_min_rows=8", "d=64", "unit_rows=4"], "grad_features"),
    "s2l": ([*FAST, "epochs=1", "checkpoints=2", "k=3"], "trajectories"),
    "dealrec": ([*FAST, "epochs=1", "checkpoints=1", "depth=8", "scale=50", "bins=4"], "influence"),
}


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    lines = (SAMPLE / "targets" / "gsm8k_test.jsonl").read_text().splitlines()[:3]
    out = tmp_path_factory.mktemp("units-target") / "gsm3.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def _args(method, pool, out, work, tiny_lm_dir, target, executor="local"):
    params, _ = METHODS[method]
    args = ["select", str(pool.path), "--method", method, "--budget", "6", "--out", str(out),
            "--workdir", str(work), "--executor", executor, "--param", f"model={tiny_lm_dir}"]
    args += [a for p in params for a in ("--param", p)]
    return args + (["--target", str(target)] if method == "less" else [])


def _units(work: Path, kind: str) -> dict[str, bytes]:
    return {p.relative_to(work).as_posix(): p.read_bytes()
            for p in sorted(work.glob(f"{kind}/*/units/*")) if not p.name.endswith(".json")}


def _markers(work: Path, kind: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in work.glob(f"{kind}/*/units/*.done.json")}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_ray_and_local_agree_and_a_killed_run_resumes(method, tmp_path, dyn_pool, tiny_lm_dir,
                                                      target, ray_cluster):
    from thresher.pipeline.cli import app
    from typer.testing import CliRunner

    _, kind = METHODS[method]
    outs = {}
    for executor in ("local", "ray"):
        out, work = tmp_path / executor / "o.jsonl", tmp_path / f"work-{executor}"
        res = CliRunner().invoke(app, _args(method, dyn_pool, out, work, tiny_lm_dir, target,
                                            executor))
        assert res.exit_code == 0, res.output
        outs[executor] = (out.read_bytes(), Path(f"{out}.selection.parquet").read_bytes(),
                          _units(work, kind))
    assert outs["local"][:2] == outs["ray"][:2]
    assert len(outs["local"][2]) >= 3 and outs["local"][2] == outs["ray"][2]

    out, work = tmp_path / "killed" / "o.jsonl", tmp_path / "work-killed"
    env = {**os.environ, "THRESHER_TEST_KILL_KIND": kind}
    args = _args(method, dyn_pool, out, work, tiny_lm_dir, target)
    r = subprocess.run([sys.executable, "-c", DYING, *args], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == -9, r.stderr[-3000:]
    before = _markers(work, kind)
    assert len(before) == 2 and not out.exists()
    r = subprocess.run([sys.executable, "-c", "from thresher.pipeline.cli import main; main()",
                        *args], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _markers(work, kind)
    assert {p: after[p] for p in before} == before          # the two finished units were kept
    assert len(after) > len(before)
    assert out.read_bytes() == outs["local"][0]

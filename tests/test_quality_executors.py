"""The quality stages give the same bytes on the Ray executor (a local 2-CPU cluster on
loopback, started and stopped here) as in-process: classifier scores of a fastText model and of
an embedding head, and LM ratings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from thresher.pipeline.select import run_select


@pytest.fixture(scope="module")
def pool(tmp_path_factory, sample_pool):
    from conftest import mixed_pool

    return mixed_pool(tmp_path_factory.mktemp("qexec"), sample_pool, 6, 600, 6)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, pool, tiny_embedder):
    d = tmp_path_factory.mktemp("qclf")
    out = {}
    for kind, extra in (("fasttext", ["--bucket", "100000"]), ("head", ["--embedder", tiny_embedder, "--hidden", "4"])):
        out[kind] = d / kind
        r = subprocess.run([sys.executable, "-m", "thresher.pipeline.cli", "classifier", "train",
                            "--out", str(out[kind]), "--kind", kind, "--pool", str(pool.path),
                            "--label", "kind=chat", "--holdout", "0.3", "--workdir", str(d / "w"),
                            *extra], check=False, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return out


def _shards(work: Path, kind: str) -> list[Path]:
    return sorted(p for p in (work / kind).glob("*/units/*") if p.suffix != ".json")


@pytest.mark.parametrize("case", ["fasttext", "head", "lm-rating"])
def test_quality_stages_are_byte_identical_on_ray(case, tmp_path, pool, classifiers, ray_cluster,
                                                  tiny_lm_dir):
    if case == "lm-rating":
        method, kind = "lm-rating", "ratings"
        params = {"rubric": "deita", "model": str(tiny_lm_dir), "max_tokens": "384", "cut": "top"}
    else:
        method, kind, params = "classifier", "quality", {"model": str(classifiers[case])}
    outs = {}
    for executor in ("local", "ray"):
        outs[executor] = tmp_path / f"{executor}.jsonl"
        m = run_select(pool.path, method, "50%", outs[executor], workdir=tmp_path / f"w-{executor}",
                       params=params, executor=executor)
        stage = next(s for s in m["stages"] if s["stage"] == kind)
        assert stage["units_computed"] == len(pool.shards) >= 4
    assert outs["local"].read_bytes() == outs["ray"].read_bytes()
    local, remote = _shards(tmp_path / "w-local", kind), _shards(tmp_path / "w-ray", kind)
    assert [p.name for p in local] == [p.name for p in remote] and local
    for a, b in zip(local, remote):
        assert a.read_bytes() == b.read_bytes(), a.name
    manifest = json.loads(Path(f"{outs['ray']}.manifest.json").read_text())
    assert manifest["executor"] == "ray"

"""The Prefect flow runs the real stages end to end against a temporary Prefect server."""

import json

import pytest


@pytest.mark.slow
def test_curate_flow_runs_ingest_and_select(tmp_path, sample_pool_dir, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    from prefect.testing.utilities import prefect_test_harness
    from thresher.flows.curate import curate

    with prefect_test_harness(server_startup_timeout=120):
        result = curate([str(sample_pool_dir)], str(tmp_path / "out"), method="random",
                        budget="20", seed=1)
    assert result["ingest"]["read"] == 775 == result["ingest"]["kept"] + result["ingest"]["quarantined"]
    assert result["select"]["counts"]["selected"] == 20
    lines = (tmp_path / "out" / "random.jsonl").read_text().splitlines()
    assert len(lines) == 20 and all("id" in json.loads(l) for l in lines)
    manifest = json.loads((tmp_path / "out" / "random.jsonl.manifest.json").read_text())
    assert manifest["seed"] == 1

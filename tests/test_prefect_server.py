"""Flows against a real Prefect server on loopback (its own PREFECT_HOME and SQLite database)."""

import json
import subprocess
import sys
import urllib.request

import pytest
from prefect_server import prefect_server


def api(server, path, body=None):
    req = urllib.request.Request(f"{server.url}/{path}", data=json.dumps(body or {}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_a_flow_run_is_recorded_by_the_server_without_telemetry(tmp_path, sample_pool_dir):
    with prefect_server(tmp_path / "prefect") as server:
        r = subprocess.run([sys.executable, "-m", "thresher.flows.curate", str(sample_pool_dir),
                            "--out", str(tmp_path / "out"), "--method", "random", "--budget", "20"],
                           env=server.env, capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        runs = api(server, "flow_runs/filter")
        assert [run["state_type"] for run in runs] == ["COMPLETED"]
    assert len((tmp_path / "out" / "random.jsonl").read_text().splitlines()) == 20
    assert "telemetry" not in (r.stdout + r.stderr + server.log_text()).lower()

"""`thresher serve` against a real Prefect server on loopback: deploy, trigger, wait, check."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import dedup_then_pick_recipe
from prefect_server import PREFECT, prefect_server, stop

THRESHER = str(Path(sys.executable).with_name("thresher"))



def api(server, path, body=None):
    req = urllib.request.Request(f"{server.url}/{path}", data=json.dumps(body or {}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def wait_for_deployment(server, name, proc, log, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [d for d in api(server, "deployments/filter") if d["name"] == name]
        if found:
            return found[0]
        assert proc.poll() is None, f"thresher serve exited: {log.read_text()[-3000:]}"
        time.sleep(1)
    raise AssertionError(f"no deployment {name} after {timeout}s: {log.read_text()[-3000:]}")


@pytest.mark.slow
def test_serve_a_recipe_then_trigger_a_run_by_hand(tmp_path, sample_pool_dir,
                                                   tiny_embedder):
    (tmp_path / "src").mkdir()
    for name in ("gsm8k_train.jsonl", "mbpp.jsonl"):
        lines = (sample_pool_dir / name).read_text().splitlines()[:15]
        (tmp_path / "src" / name).write_text("\n".join(lines) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(dedup_then_pick_recipe("served", "out", "src", tiny_embedder, 10))

    with prefect_server(tmp_path / "prefect") as server:
        log = tmp_path / "serve.log"
        with open(log, "wb") as out:
            serving = subprocess.Popen([THRESHER, "serve", str(recipe), "--cron", "0 3 * * *"],
                                       env=server.env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=tmp_path)
        try:
            dep = wait_for_deployment(server, "served", serving, log)
            assert dep["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
            run = subprocess.run([PREFECT, "deployment", "run", "thresher-recipe/served", "--watch",
                                  "--watch-timeout", "900"], env=server.env, capture_output=True,
                                 text=True, timeout=960, check=False)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + log.read_text()[-3000:]
            runs = api(server, "flow_runs/filter",
                       {"deployments": {"id": {"any_": [dep["id"]]}}})
            assert [r["state_type"] for r in runs if r["state_type"] != "SCHEDULED"] == ["COMPLETED"]
            keys = {a["key"] for a in api(server, "artifacts/filter") if a.get("key")}
        finally:
            stop(serving)
    out = tmp_path / "out"
    assert len((out / "pick" / "pick.jsonl").read_text().splitlines()) == 10
    assert (out / "dedup" / "README.md").exists() and (out / "pick" / "README.md").exists()
    summary = json.loads((out / "run.json").read_text())
    kinds = [s["step"] for s in summary["steps"]]
    assert kinds[0] == "ingest" and kinds.count("select") == 2 and "stage" in kinds
    # every step published its statistics as a table artifact
    assert {"served-ingest-ingest", "served-select-dedup", "served-select-pick", "served-run"} <= keys
    assert any(k.startswith("served-stage-embed") for k in keys)
    assert "telemetry" not in (log.read_text() + server.log_text()).lower()
    assert os.environ.get("PREFECT_API_URL") != server.url   # the test never leaked its server

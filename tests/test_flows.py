"""The recipe flow runs the same plan as `thresher run`: same steps, same bytes."""

import json
from pathlib import Path

import pytest
from conftest import dedup_then_pick_recipe


@pytest.mark.slow
def test_flow_and_thresher_run_give_the_same_outputs(tmp_path, sample_pool_dir, monkeypatch,
                                                     tiny_embedder):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("gsm8k_train.jsonl", "mbpp.jsonl"):
        lines = (sample_pool_dir / name).read_text().splitlines()[:12]
        (src / name).write_text("\n".join(lines) + "\n")
    for which in ("flow", "cli"):
        (tmp_path / f"{which}.yaml").write_text(
            dedup_then_pick_recipe("flowtest", tmp_path / which, src, tiny_embedder, 6, "parquet"))

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    from prefect.testing.utilities import prefect_test_harness
    from thresher.flows.recipe_flow import recipe_flow
    from thresher.pipeline.recipe import load_recipe
    from thresher.pipeline.run import run_recipe

    with prefect_test_harness(server_startup_timeout=180):
        flowed = recipe_flow(str(tmp_path / "flow.yaml"))
    ran = run_recipe(load_recipe(tmp_path / "cli.yaml"))

    def shape(summary):
        return [(s["step"], s.get("stage"), s.get("name"), s.get("selected"),
                 s.get("units_computed")) for s in summary["steps"]]

    assert shape(flowed) == shape(ran)
    embed = next(s for s in flowed["steps"] if s.get("stage") == "embed")
    assert (embed["units_computed"], embed["rows_computed"]) == (2, 24)   # one task per shard
    for rel in ("dedup/dedup.jsonl", "pick/pick.parquet"):
        assert (tmp_path / "flow" / rel).read_bytes() == (tmp_path / "cli" / rel).read_bytes()
    assert json.loads((tmp_path / "flow" / "run.json").read_text())["recipe"] == "flowtest"
    assert Path(tmp_path / "flow" / "pick" / "README.md").exists()

"""The Prefect flow of a recipe: one task per step of `pipeline/run.py`, built from its plan.

    ingest ─► stage 1 ─► stage 2 ... (the recipe's one plan) ─► select A ─► select B ─► verify ─► report

Every task calls the same step function `thresher run` calls (no second code path) and passes
only paths, indexes and fingerprints (large objects through the orchestrator leak memory:
prefect#10952, #12668); a stage task reopens the pool and rebuilds the plan, which computes and
loads nothing. Stages that may fail transiently (loading a model, a worker lost) retry. Each
step's statistics are published as a Prefect table artifact, readable in the UI, and the flow
ends with a table of every step.

    thresher serve data/recipes/sample.yaml --cron "0 3 * * *"   # a deployment, on a server
    python -m thresher.flows.recipe_flow data/recipes/sample.yaml # once (a temporary server)
"""

from __future__ import annotations

import re
import sys
import threading
import time
import uuid
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from thresher.flows import prefect_env  # noqa: F401  (analytics off before prefect loads)
from thresher.pipeline.recipe import load_recipe
from thresher.pipeline.recipe_outputs import check_recipe
from thresher.pipeline.run import (
    describe_step,
    finish,
    ingest_step,
    plan_of,
    report_step,
    selection_step,
    stage_step,
    verify_step,
)

FLOW_NAME = "thresher-recipe"


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:120]


def publish(recipe_name: str, step: dict) -> None:
    """A step's statistics as a two-column table artifact (one row per statistic)."""
    label = step.get("name") or step.get("describe") or step["step"]
    rows = [{"statistic": k, "value": v if isinstance(v, int | float | str) else str(v)}
            for k, v in step.items()]
    create_table_artifact(table=rows, key=artifact_key(recipe_name, step["step"], label),
                          description=describe_step(step))


# -- unit tasks: the local executor's units, one Prefect task run per missing unit ----------------
# A stage task registers its StageRun here and maps `unit_task` over the missing units, so each
# unit is retried alone and shows in the UI; tasks pass only the registration key and the unit.
# Workers (models) are opened once per stage and worker key, and used by one unit at a time.
# (With `--executor ray` the stage task hands its units to Ray actors instead.)
_RUNS: dict[str, dict] = {}


class PrefectTasks:
    """The flow's in-process executor: the same unit code (`executors.run_one`), one task each."""

    name = "prefect-tasks"

    def run(self, run, units, update) -> None:
        key = uuid.uuid4().hex
        _RUNS[key] = {"run": run, "workers": {}, "lock": threading.Lock()}
        try:
            for unit, future in zip(units, unit_task.map(key, units)):
                update(unit, future.result())
        finally:
            _RUNS.pop(key, None)


@task(name="unit", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def unit_task(key: str, unit) -> dict:
    from thresher.pipeline.executors import open_worker, run_one

    entry = _RUNS[key]
    with entry["lock"]:
        workers = entry["workers"]
        if unit.worker not in workers:
            workers.clear()                  # one loaded worker at a time
            workers[unit.worker] = open_worker(entry["run"], unit)
        return run_one(entry["run"], unit, workers[unit.worker])


def _executor(name: str):
    from thresher.pipeline.executors import make_executor

    return PrefectTasks() if name == "local" else make_executor(name)


def _published(recipe_name: str, step: dict | None) -> dict | None:
    """Every task's ending: the step's statistics as a Prefect artifact and a log line."""
    if step:
        publish(recipe_name, step)
        print(describe_step(step))
    return step


@task(name="ingest", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def ingest_task(recipe_path: str) -> dict:
    recipe = load_recipe(recipe_path)
    return _published(recipe.name, ingest_step(recipe))


@task(name="stage", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def stage_task(recipe_path: str, index: int, executor: str, pool_fingerprint: str) -> dict:
    """Stage `index` of the recipe's plan over the pool with this fingerprint."""
    planned = plan_of(load_recipe(recipe_path))
    if planned.pool.fingerprint != pool_fingerprint:
        raise RuntimeError(f"the pool changed under the flow ({planned.pool.fingerprint} is not "
                           f"{pool_fingerprint}); another run wrote {planned.pool.path}?")
    return _published(planned.recipe.name, stage_step(planned, index, _executor(executor)))


@task(name="select", cache_policy=NO_CACHE)
def selection_task(recipe_path: str, name: str, stage_stats: list[dict], executor: str) -> dict:
    planned = plan_of(load_recipe(recipe_path))
    return _published(planned.recipe.name, selection_step(planned, name, stage_stats, executor))


@task(name="verify", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def verify_task(recipe_path: str) -> dict | None:
    recipe = load_recipe(recipe_path)
    return _published(recipe.name, verify_step(recipe))


@task(name="report", cache_policy=NO_CACHE)
def report_task(recipe_path: str) -> dict | None:
    recipe = load_recipe(recipe_path)
    return _published(recipe.name, report_step(recipe))


@flow(name=FLOW_NAME, log_prints=True)
def recipe_flow(recipe: str, executor: str = "local") -> dict:
    """Run a recipe file: the tasks follow its plan, stage by stage."""
    t_start = time.perf_counter()
    spec = load_recipe(recipe)
    check_recipe(spec)   # every output, target and eval file, before the first task
    ingested = ingest_task(recipe)
    planned = plan_of(spec)
    stages = [stage_task.with_options(task_run_name=f"stage-{i + 1}-{stage.kind}")(
                  recipe, i, executor, ingested["fingerprint"])
              for i, stage in enumerate(planned.plan.stages)]
    selected = [selection_task.with_options(task_run_name=f"select-{s.name}")(
                    recipe, s.name, stages, executor) for s in spec.selections]
    steps = [ingested, *stages, *selected, verify_task(recipe), report_task(recipe)]
    summary = finish(spec, steps, t_start, executor)
    create_table_artifact(
        table=[{"step": describe_step(s).split(":")[0], "line": describe_step(s)}
               for s in summary["steps"]],
        key=artifact_key(spec.name, "run"), description=f"recipe {spec.name}: every step")
    return summary


def serve(recipe: str, cron: str, executor: str = "local", name: str | None = None) -> None:
    """Serve the recipe as a deployment on the Prefect server in PREFECT_API_URL (blocks)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ValueError("thresher serve needs a Prefect server: start one with "
                         "`prefect server start` and set PREFECT_API_URL (see docs/recipes.md)")
    spec = load_recipe(recipe)   # fail now on a bad recipe, not at 3 a.m.
    check_recipe(spec)
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise ValueError(f"--cron {cron!r}: not a cron schedule (e.g. \"0 3 * * *\": "
                         "minute hour day-of-month month day-of-week)") from None
    check_server(PREFECT_API_URL.value())

    recipe_flow.serve(name=name or spec.name, cron=cron, pause_on_shutdown=False,
                      parameters={"recipe": str(Path(recipe).resolve()), "executor": executor})


def check_server(url: str, timeout: float = 5.0) -> None:
    """One line when no Prefect server answers at `url` (PREFECT_API_URL), not a client's
    hundred-line retry traceback."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as r:
            if r.status == 200:
                return
            why = f"HTTP {r.status}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = str(getattr(e, "reason", e))
    raise ValueError(f"PREFECT_API_URL={url}: no Prefect server answers ({why}); start one with "
                     "`prefect server start` or point PREFECT_API_URL at a running one")


if __name__ == "__main__":
    print(recipe_flow(sys.argv[1], *sys.argv[2:3]))

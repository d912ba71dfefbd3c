"""Scheduled curation: ingest the sources, select a subset, write it (Prefect 3).

The flow only wires the same stage functions the CLI calls; tasks pass paths, never frames
(large objects through the orchestrator leak memory: prefect#10952, #12668).

Run once (no server needed; Prefect starts a temporary one):
    .venv/bin/python -m thresher.flows.curate data/sample/pool --out out/flow --method random --budget 10%
Serve on a schedule (needs a persistent `prefect server start`; a temporary server cannot schedule):
    .venv/bin/python -m thresher.flows.curate data/sample/pool --out out/flow --cron "0 3 * * *"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task


@task(name="ingest", retries=0)
def ingest_task(sources: list[str], pool_dir: str) -> dict:
    from thresher.pipeline.pool import ingest

    rep = ingest([Path(s) for s in sources], Path(pool_dir))
    return {"pool": pool_dir, "read": rep.read, "kept": rep.kept, "quarantined": rep.quarantined,
            "fingerprint": rep.fingerprint}


@task(name="select")
def select_task(pool_dir: str, method: str, budget: str, out: str, fmt: str, seed: int,
                params: dict) -> dict:
    from thresher.pipeline.select import run_select

    m = run_select(pool_dir, method, budget, out, fmt=fmt, seed=seed, params=params)
    return {"output": out, "manifest": out + ".manifest.json", "counts": m["counts"]}


@flow(name="thresher-curate", log_prints=True)
def curate(sources: list[str], out_dir: str, method: str = "random", budget: str = "10%",
           fmt: str = "messages", seed: int = 0, params: dict | None = None) -> dict:
    out = Path(out_dir)
    ing = ingest_task(sources, str(out / "pool"))
    print(f"ingested: read {ing['read']} = kept {ing['kept']} + quarantined {ing['quarantined']}")
    suffix = "parquet" if fmt == "parquet" else "jsonl"
    sel = select_task(ing["pool"], method, budget, str(out / f"{method}.{suffix}"), fmt, seed,
                      params or {})
    print(f"selected {sel['counts']['selected']} of {sel['counts']['candidates']} -> {sel['output']}")
    return {"ingest": ing, "select": sel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", default="random")
    ap.add_argument("--budget", default="10%")
    ap.add_argument("--format", default="messages")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cron", help="serve as a deployment on this schedule instead of running once")
    a = ap.parse_args()
    params = dict(sources=a.sources, out_dir=a.out, method=a.method, budget=a.budget,
                  fmt=a.format, seed=a.seed)
    if a.cron:
        curate.serve(name="thresher-curate", cron=a.cron, parameters=params)
    else:
        curate(**params)


if __name__ == "__main__":
    main()

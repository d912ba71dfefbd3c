"""Recipe reruns and incremental curation vs from-scratch runs, in one process.

    .venv/bin/python bench/recipe_incremental.py [--rds] [--keep DIR]

The sources are the bundled sample pool minus one file (`self_instruct_seeds.json`, 175 rows).
Runs, each timed:
    A  cold: the recipe from scratch over 4 files          (baseline for B)
    B  warm: the same recipe again, nothing changed
    C  incremental: the held-back file added, same output folder
    D  from scratch over all 5 files in a fresh folder      (baseline for C)
Prints B/A and C/D, what C computed (files read, rows embedded), and whether C's subsets are
byte-identical to D's. The recipe: MiniLM semantic dedup + a random baseline among the survivors
(+ RDS+ toward the GSM8K test set with SmolLM2 with --rds).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELD_BACK = "self_instruct_seeds.json"

RECIPE = """\
name: bench
out: out
sources: [src]
selections:
  - {name: dedup, method: semdedup, params: {eps: 0.05}, budget: 100%}
  - {name: pick, method: random, from: dedup, budget: 64}
"""
RDS = """\
  - {{name: rds, method: rds, from: dedup, targets: [{targets}], budget: 64}}
"""


def timed_run(recipe_path: Path) -> tuple[float, dict]:
    from thresher.pipeline.recipe import load_recipe
    from thresher.pipeline.run import run_recipe

    t0 = time.perf_counter()
    summary = run_recipe(load_recipe(recipe_path))
    return time.perf_counter() - t0, summary


def write_recipe(folder: Path, rds: bool) -> Path:
    text = RECIPE
    if rds:
        text += RDS.format(targets=ROOT / "data/sample/targets/gsm8k_test.jsonl")
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rds", action="store_true", help="add the RDS+ selection (SmolLM2 forward pass)")
    ap.add_argument("--keep", type=Path, help="work here (kept) instead of a temporary folder")
    a = ap.parse_args()
    base = a.keep or Path(tempfile.mkdtemp(prefix="thresher-bench-"))
    grow, fresh = base / "grow", base / "fresh"
    (grow / "src").mkdir(parents=True, exist_ok=True)
    for f in sorted((ROOT / "data/sample/pool").iterdir()):
        if f.name != HELD_BACK:
            shutil.copy(f, grow / "src" / f.name)
    recipe = write_recipe(grow, a.rds)

    t_a, _ = timed_run(recipe)
    t_b, _ = timed_run(recipe)
    shutil.copy(ROOT / "data/sample/pool" / HELD_BACK, grow / "src" / HELD_BACK)
    t_c, run_c = timed_run(recipe)
    shutil.copytree(grow / "src", fresh / "src")
    t_d, _ = timed_run(write_recipe(fresh, a.rds))

    ing = next(s for s in run_c["steps"] if s["step"] == "ingest")
    stages = [s for s in run_c["steps"] if s["step"] == "stage" and s["units_computed"] + s["units_cached"]]
    names = [s["name"] for s in run_c["steps"] if s["step"] == "select"]
    same = all((grow / "out" / n / f"{n}.jsonl").read_bytes() == (fresh / "out" / n / f"{n}.jsonl").read_bytes()
               for n in names)
    print(f"A cold (4 files)          {t_a:8.1f} s")
    print(f"B warm rerun              {t_b:8.1f} s   B/A = {t_b / t_a:.3f}")
    print(f"C one file added          {t_c:8.1f} s")
    print(f"D from scratch (5 files)  {t_d:8.1f} s   C/D = {t_c / t_d:.3f}")
    print(f"C ingest: {ing['files_read']} file read ({ing['read_now']} rows), {ing['files_reused']} reused")
    for s in stages:
        print(f"C stage {s['stage']}: {s['units_computed']} of {s['units_computed'] + s['units_cached']} "
              f"shards computed, {s['rows_computed']} rows")
    print(f"C subsets byte-identical to D: {same} ({', '.join(names)})")
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()

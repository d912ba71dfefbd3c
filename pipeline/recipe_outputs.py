"""Where a run of a recipe writes, and the output guard over all of it before any step runs.

    check_recipe(recipe)       # `thresher run` and the Prefect flow, dry run or not

Everything lands under the recipe's `out`: `pool/` (`pool_dir`), `.thresher-work/` (`workdir`,
unless the recipe names one), one folder per selection (`subset_path`, its dataset card at
`card_location`), `verify/`, `run.json`, and the report at `report.out`. `check_recipe` checks
every one of them against every source, target and eval file (`pipeline/io/guard.py`); the
steps that write them are in `pipeline/run.py`.
"""

from __future__ import annotations

from pathlib import Path

from thresher.pipeline.io.writers import HF_DATA
from thresher.pipeline.recipe import Recipe, SelectionSpec


def pool_dir(recipe: Recipe) -> Path:
    return Path(recipe.out) / "pool"


def workdir(recipe: Recipe) -> Path:
    return Path(recipe.workdir) if recipe.workdir else Path(recipe.out) / ".thresher-work"


def subset_path(recipe: Recipe, sel: SelectionSpec) -> Path:
    """OUT/<name>/<name>.<ext>; for `hf`, the dataset directory OUT/<name>/<name>/; for an
    annotate-only step, its per-row table OUT/<name>/<name>.parquet."""
    ext = {"parquet": ".parquet", "hf": ""}.get(sel.format, ".jsonl")
    if sel.annotate_only:
        ext = ".parquet"
    return Path(recipe.out) / sel.name / f"{sel.name}{ext}"


def card_location(recipe: Recipe, sel: SelectionSpec) -> tuple[Path, str]:
    """(folder of the README.md card, data files relative to it)."""
    path = subset_path(recipe, sel)
    return (path, HF_DATA) if sel.format == "hf" else (path.parent, path.name)


def own_outputs(recipe: Recipe) -> list[Path]:
    """Everything a run of the recipe writes: never read as one of its sources."""
    out = Path(recipe.out)
    paths = [pool_dir(recipe), workdir(recipe), out / "run.json", out / "verify",
             *(out / s.name for s in recipe.selections)]
    return paths + ([Path(recipe.report.out)] if recipe.report else [])


def check_recipe(recipe: Recipe) -> None:
    """The output guard (pipeline/io/guard.py) for every output of the recipe against every
    source, target and eval file, and those files' rows: before any step runs, and for a dry
    run the same. The run's own outputs are never its inputs (ingest skips them)."""
    from thresher.pipeline.io.guard import check_outputs, check_workdir
    from thresher.pipeline.io.inputs import walk_inputs
    from thresher.pipeline.io.pool import check_rows_file

    out = Path(recipe.out)
    _check_disjoint(recipe)
    _check_owned(recipe)     # what exists at an output path is this recipe's earlier output
    found = walk_inputs(recipe.sources, exclude=own_outputs(recipe))
    evals = [Path(e) for e in (recipe.verify.eval if recipe.verify else [])]
    inputs = [*found.files, *evals, *(Path(t) for s in recipe.selections for t in s.targets)]
    check_outputs([out / "run.json"], inputs, label="out:")
    check_outputs([], found.files, [pool_dir(recipe)], pools=[pool_dir(recipe)], label="out:")
    check_workdir(workdir(recipe), inputs, label="workdir:")
    for sel in recipe.selections:
        _check_selection_outputs(recipe, sel, inputs)
    if recipe.verify:
        from thresher.pipeline.training.verify_output import VERIFY_FILES

        folder = out / "verify"
        check_outputs([folder / f for f in VERIFY_FILES], inputs, [folder / "runs"],
                      workdir=workdir(recipe), label="verify:")
        for e in evals:
            check_rows_file(e, "verify.eval:")
    if recipe.report:
        check_outputs([Path(recipe.report.out)], inputs, workdir=workdir(recipe),
                      label="report.out:")


def _check_owned(recipe: Recipe) -> None:
    """Files already at the recipe's output paths are overwritten only when an earlier run of
    it wrote them (pipeline/io/guard.py rule 3); a selection's files: `_check_selection_outputs`."""
    from thresher.pipeline.io.guard import check_replace_file, check_writes_into

    out = Path(recipe.out)
    check_writes_into(out, ["run.json"], "pool/pool.json", label="out:")
    if recipe.verify:
        from thresher.pipeline.training.verify_output import VERIFY_FILES

        check_writes_into(out / "verify", [*VERIFY_FILES, "runs"], "verify.json",
                          label="verify:")
    if recipe.report:
        from thresher.pipeline.report.html import is_report

        check_replace_file(Path(recipe.report.out), is_report, "a thresher report",
                           label="report.out:")


def _check_disjoint(recipe: Recipe) -> None:
    """No output of the recipe lies in another (a selection named `pool` would write into the
    pool, a report inside a selection's folder would replace its files)."""
    from thresher.pipeline.io.guard import real

    out = Path(recipe.out)
    named = [("the pool", pool_dir(recipe)), ("the work directory", workdir(recipe)),
             ("run.json", out / "run.json")]
    named += [(f"selection {s.name!r}", out / s.name) for s in recipe.selections]
    named += [("verify", out / "verify")] if recipe.verify else []
    named += [("report.out", Path(recipe.report.out))] if recipe.report else []
    for i, (a, pa) in enumerate(named):
        for b, pb in named[i + 1:]:
            if real(pa) == real(pb) or real(pa).is_relative_to(real(pb)) \
                    or real(pb).is_relative_to(real(pa)):
                raise ValueError(f"recipe outputs overlap: {a} ({pa}) and {b} ({pb}); rename "
                                 "one")


def _check_selection_outputs(recipe: Recipe, sel: SelectionSpec, inputs: list[Path]) -> None:
    from thresher.pipeline.io.guard import (
        check_outputs,
        check_replace_dir,
        check_writes_into,
        real,
    )
    from thresher.pipeline.io.writers import HF_OWN, manifest_path
    from thresher.pipeline.stages.targets import check_targets

    label = f"selection {sel.name!r}:"
    folder, path = Path(recipe.out) / sel.name, subset_path(recipe, sel)
    record = manifest_path(path)
    files = [path.with_name(path.name + ".selection.parquet"), record]
    own = {real(f) for f in [*files, path, folder / "README.md"]}
    for src in map(real, recipe.sources):
        if src.is_relative_to(real(folder)) and src not in own \
                and not src.is_relative_to(real(path)):
            raise ValueError(f"{label} its folder {folder} holds the source {src}; rename the "
                             "selection (its outputs would land among the sources)")
    hf = sel.format == "hf"
    check_outputs(files + ([] if hf else [path, folder / "README.md"]), inputs,
                  [path] if hf else [], workdir=workdir(recipe), label=label)
    if hf:
        check_replace_dir(path, HF_OWN, record, label=label)
    check_writes_into(folder, [p.name for p in files] + [path.name, "README.md"], record.name,
                      label=label)
    check_targets(sel.targets)

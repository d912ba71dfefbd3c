"""Recipes: one YAML file that says what to curate, validated before anything runs.

    name: sample-curation
    out: ../../out/recipe-sample           # relative paths are relative to the recipe file
    sources: [../sample/pool, "../extra/*.jsonl.gz"]   # files, directories, globs
    ingest: {format: null}                 # messages|sharegpt|alpaca|text; null = detect per row
    selections:
      - name: dedup
        method: semdedup
        params: {eps: 0.05}
        budget: 100%
      - name: gsm8k
        method: rds
        from: dedup                        # choose among another selection's rows only
        targets: [../sample/targets/gsm8k_test.jsonl]
        budget: 64
        format: messages                   # messages|alpaca|sharegpt|parquet|hf
    verify: {selections: [gsm8k], eval: [../sample/targets/gsm8k_test.jsonl], max_eval: 24}
    report: true

`load_recipe(path)` parses and validates the file (pydantic v2 models, unknown keys refused) and
returns a `Recipe` whose paths are absolute. Every mistake is a `RecipeError` (a ValueError)
with one line naming the file, the line and the field: `recipe.yaml:12: selections[1].budget:
bad budget '10x' ...`, which the CLI prints as `error: ...` with exit code 2.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from thresher.pipeline.budget import Budget
from thresher.pipeline.io.schema import SHAPES

OUTPUT_FORMATS = ("messages", "alpaca", "sharegpt", "parquet", "hf")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RecipeError(ValueError):
    """A mistake in a recipe file; its message is one line naming the file, line and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class IngestSpec(_Strict):
    format: Literal[SHAPES] | None = Field(  # type: ignore[valid-type]
        None, description="Input shape of every row; null detects it per row.")
    rows_per_shard: int = Field(10_000, gt=0, description="Most rows in one Parquet shard; "
                                "a shard never spans two input files.")


class SelectionSpec(_Strict):
    name: str = Field(description="Names the output folder OUT/<name>/.")
    method: str = Field(description="A method from `thresher methods`.")
    params: dict[str, Any] = Field(default_factory=dict, description="The method's parameters.")
    selector: str | None = Field(None, description="Override the method's default selector.")
    budget: str | None = Field(None, description="Rows (100), percent (10%) or tokens "
                               "(50000tok); none with annotate_only.")
    annotate_only: bool = Field(False, description="Write every row's score columns (a "
                                "filter's keep and reason too) as OUT/<name>/<name>.parquet with "
                                "its manifest, and no subset.")
    targets: list[str] = Field(default_factory=list, description="Target set files.")
    format: Literal[OUTPUT_FORMATS] = "messages"  # type: ignore[valid-type]
    from_: str | None = Field(None, alias="from",
                              description="Select among the rows another selection kept.")
    seed: int | None = Field(None, description="Overrides the recipe's seed.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError(f"{v!r} is not a folder name (letters, digits, '_', '-', '.')")
        return v

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> str | None:
        return None if v is None else str(Budget.parse(v))

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from thresher.pipeline import registry

        if v not in registry.METHODS:
            raise ValueError(f"unknown method {v!r}; `thresher methods` lists: "
                             + ", ".join(registry.METHODS))
        return v

    @model_validator(mode="after")
    def _params(self) -> SelectionSpec:
        """The method's (and selector's) typed parameters, checked as `--param` checks them."""
        from thresher.pipeline import registry

        if self.annotate_only and (self.budget is not None or self.selector is not None):
            raise ValueError("annotate_only: selects nothing; drop budget and selector")
        if not self.annotate_only and self.budget is None:
            raise ValueError("budget: required field is missing (or annotate_only: true)")
        try:
            impl = registry.choose(self.method, self.params, self.selector).method
        except ValueError as e:
            where = "selector" if str(e).startswith("unknown selector ") else "params"
            raise ValueError(f"{where}: {e}") from None
        if self.targets and not impl.needs_targets:
            raise ValueError(f"targets: method {self.method} does not use a target set")
        if impl.needs_targets and not self.targets:
            raise ValueError(f"targets: method {self.method} needs a target set (targets: [FILE])")
        return self


class VerifySpec(_Strict):
    selections: list[str] | None = Field(None, description="Which subsets to train on "
                                         "(default: all; they must have the same size).")
    eval: list[str] = Field(min_length=1, description="Held-out eval set files.")
    max_eval: int = Field(100, gt=0)
    max_new_tokens: int = Field(256, ge=0)
    full: bool = False
    train: dict[str, Any] = Field(default_factory=dict,
                                  description="TrainConfig overrides (epochs, lr, max_steps...).")


    @field_validator("train")
    @classmethod
    def _train(cls, v: dict[str, Any]) -> dict[str, Any]:
        import dataclasses

        from thresher.pipeline.training.train import TrainConfig

        valid = [f.name for f in dataclasses.fields(TrainConfig)]
        unknown = sorted(set(v) - set(valid))
        if unknown:
            raise ValueError(f"unknown training setting {', '.join(unknown)}; expected one of "
                             + ", ".join(valid))
        return v


class ReportSpec(_Strict):
    out: str = "report.html"


class Recipe(_Strict):
    name: str | None = None
    out: str = Field(description="Output folder: OUT/pool, OUT/<selection>/, OUT/run.json.")
    workdir: str | None = Field(None, description="Artifact cache (default OUT/.thresher-work).")
    seed: int = 0
    sources: list[str] = Field(min_length=1)
    ingest: IngestSpec = IngestSpec()
    selections: list[SelectionSpec] = Field(min_length=1)
    verify: VerifySpec | None = None
    report: ReportSpec | None = Field(None, description="true, or {out: FILE}; HTML report.")

    @field_validator("report", mode="before")
    @classmethod
    def _report(cls, v: Any) -> Any:
        return {} if v is True else (None if v is False else v)

    @model_validator(mode="after")
    def _references(self) -> Recipe:
        names = [s.name for s in self.selections]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"selection names must be unique; repeated: {', '.join(dup)}")
        for i, s in enumerate(self.selections):
            if s.from_ is not None and s.from_ not in names[:i]:
                raise ValueError(f"selections[{i}].from: {s.from_!r} is not an earlier selection "
                                 f"(earlier: {', '.join(names[:i]) or 'none'})")
            if s.from_ is not None and self.selection(s.from_).annotate_only:
                raise ValueError(f"selections[{i}].from: {s.from_!r} is annotate_only and "
                                 "keeps no rows to select among")
        if self.verify and self.verify.selections:
            unknown = [n for n in self.verify.selections if n not in names]
            if unknown:
                raise ValueError(f"verify.selections: no selection named {', '.join(unknown)}")
            only = [n for n in self.verify.selections if self.selection(n).annotate_only]
            if only:
                raise ValueError(f"verify.selections: {', '.join(only)} is annotate_only (no subset)")
        return self

    def selection(self, name: str) -> SelectionSpec:
        return next(s for s in self.selections if s.name == name)


# ------------------------------------------------------------------ loading and errors

def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the YAML node at a pydantic error location (the deepest that exists)."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == part), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "recipe"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None:
            field = next((f for f in model.model_fields.values() if f.alias == part), None)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
        if model is None:
            return None
    return model


def _message(err: dict) -> str:
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = sorted(f.alias or n for n, f in parent.model_fields.items()) if parent else []
        return f"unknown field {loc[-1]!r}" + (f"; expected one of {', '.join(valid)}" if valid else "")
    if err["type"] == "missing":
        return "required field is missing"
    msg = err["msg"]
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _fail(path: Path, root: yaml.Node | None, err: dict, more: int) -> RecipeError:
    loc = tuple(err["loc"])
    head = _message(err).split(": ", 1)
    model = _model_at(loc)
    if len(head) == 2 and model is not None and head[0] in {
            f.alias or n for n, f in model.model_fields.items()}:
        loc = (*loc, head[0])        # a model check about one field: point at that field
        err = {**err, "msg": head[1], "loc": loc, "type": "value_error"}
    line = _line_of(root, loc[:-1] if err["type"] == "missing" else loc)
    where = f"{path}:{line}" if line else str(path)
    extra = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return RecipeError(f"{where}: {_field_path(loc)}: {_message(err)}{extra}")


def parse_recipe(text: str, path: Path | str = "<recipe>") -> Recipe:
    """Validate recipe text; paths stay as written (see `load_recipe`)."""
    path = Path(path)
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name, out, sources, selections...)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        errs = e.errors(include_url=False)
        raise _fail(path, root, errs[0], len(errs) - 1) from None


def expand_sources(patterns: list[str], base: Path) -> list[Path]:
    """Files and directories named by the recipe's sources (globs expanded, sorted)."""
    out: list[Path] = []
    for i, pattern in enumerate(patterns):
        p = Path(pattern).expanduser()
        p = p if p.is_absolute() else base / p
        if glob.has_magic(str(p)):
            hits = sorted(Path(h) for h in glob.glob(str(p), recursive=True))
            if not hits:
                raise RecipeError(f"sources[{i}]: {pattern!r} matches no file")
            out.extend(hits)
        elif p.exists():
            out.append(p)
        else:
            raise RecipeError(f"sources[{i}]: {pattern!r}: no such file or directory ({p})")
    return out


def _abs(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe file; every path in it becomes absolute (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe file")
    recipe = parse_recipe(path.read_text(encoding="utf-8"), path)
    base = path.resolve().parent
    sels = [s.model_copy(update={"targets": [_abs(t, base) for t in s.targets]})
            for s in recipe.selections]
    verify = recipe.verify and recipe.verify.model_copy(
        update={"eval": [_abs(e, base) for e in recipe.verify.eval]})
    report = recipe.report and recipe.report.model_copy(
        update={"out": _abs(recipe.report.out, Path(_abs(recipe.out, base)))})
    if report and Path(report.out) == path.resolve():
        raise RecipeError(f"{path}: report.out is this recipe file; give another file name")
    return recipe.model_copy(update={
        "name": recipe.name or path.stem,
        "out": _abs(recipe.out, base),
        "workdir": _abs(recipe.workdir, base) if recipe.workdir else None,
        "sources": [str(p.resolve()) for p in expand_sources(recipe.sources, base)],
        "selections": sels, "verify": verify, "report": report,
    })

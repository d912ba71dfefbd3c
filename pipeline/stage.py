"""A stage: one kind of derived data, declared as a frozen config; its work is units an executor runs.

    @dataclass(frozen=True)
    class Embed(Stage):
        kind = "embed"
        model: str = DEFAULT_EMBEDDER
        part: str = "conversation"

        def resources(self): return Resources(cpus=1, gpus=0.25, memory_gb=2)
        def open_worker(self, device): return ShardEmbedder(...)      # the model, once per process / actor
        def run_shard(self, worker, rows): return ShardResult({"vectors": ...}, tokens=..., flops=...)
        def assemble(self, run): ...                                # unit files -> pool-level output
        def load(self, run): return Embeddings(...)                  # what methods receive

The stage's fields are its cache key (with the model's identity, not its name: `key_config`).
Its work is a list of `Unit`s (`units(run)`): by default one per pool shard (`per_shard = True`),
keyed by the shard's content, or one unit for the whole pool (`run_whole`). A stage with phases
declares them as stages it depends on (LESS: the warm-up proxy, then gradient features as
(checkpoint x row chunk) units, assembled per checkpoint), and a stage whose units need
something loaded per unit (a checkpoint's model) names it in `Unit.worker`. An executor
(`pipeline/executors.py`: in-process or Ray actors) runs the missing units through `run_unit`;
each unit's files and its statistics (rows, tokens, FLOPs, seconds) are written here
(`write_unit`), atomically, its marker last, so a killed run resumes at the first missing unit
and a pool that gains a shard computes only that shard's units. Then `assemble` builds the
pool-level output from the unit files. `deps()` names the stages whose outputs it reads; `over`
(a TargetPool stage, or None for the main pool) names the pool it runs over.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from thresher.pipeline.artifacts import ArtifactDir, ArtifactStore, config_key

if TYPE_CHECKING:
    import polars as pl
    from thresher.pipeline.io.pool import Pool


@dataclass(frozen=True)
class Resources:
    """What one unit of a stage needs (one actor of the Ray executor is sized by it)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float = 1.0


WHOLE = "whole"     # the key of a whole-pool stage's one unit


@dataclass(frozen=True)
class Unit:
    """One piece of a stage's work that an executor runs.

    `key` names its files in the stage's unit directory (a shard's content hash, with whatever
    else its output depends on: a checkpoint's fingerprint, a row range); `shard` and `rows` say
    what it reads (a pool shard, a half-open row range of it; None: all of it; or only the
    shard-local rows of `positions`); units whose
    `worker` is equal share one loaded worker (a checkpoint's model); `size` is what its
    progress counts; `label` names it in logs."""

    key: str
    shard: str | None = None
    rows: tuple[int, int] | None = None
    worker: tuple = ()
    size: int = 1
    label: str = ""
    positions: tuple[int, ...] | None = None   # only these shard-local rows (ascending), if given


@dataclass
class ShardResult:
    """One unit's output: named arrays (saved as .npy) and/or tables (saved as .parquet)."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)      # name -> pyarrow.Table
    tokens: int = 0
    flops: float = 0.0
    rows: int | None = None        # rows it covers (default: the first array's or table's length)
    info: dict = field(default_factory=dict)   # more statistics for its marker (JSON values)


@dataclass
class StageStats:
    stage: str
    config: dict
    rows_in: int = 0
    rows_out: int = 0
    tokens: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    flops: float = 0.0
    cached: bool = False
    units_computed: int = 0
    units_cached: int = 0
    rows_computed: int = 0      # rows of the units computed (not found cached) by this run

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["seconds"] = round(d["seconds"], 3)
        d["flops"] = float(f"{d['flops']:.4g}")
        return d


@dataclass
class StageRun:
    """Where one stage runs: its pool, the store, the device, and the outputs of its deps."""

    stage: Stage
    pool: Pool
    store: ArtifactStore
    device: str = "cpu"
    deps: dict[Stage, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)       # extra statistics the stage reports

    @property
    def dir(self) -> ArtifactDir:
        """Pool-level outputs: keyed by the stage config, the pool and the inputs' fingerprints."""
        inputs = ([self.pool.fingerprint] if self.stage.uses_pool else []) + \
            [fingerprint_of(v) for v in self.deps.values()]
        return self.store.dir(self.stage.kind, inputs, self.stage.key_config())

    def unit_dir(self) -> Path:
        """Unit outputs, keyed by the stage's config and each unit's own key: shared by every
        pool holding the same shard content."""
        d = self.store.root / self.stage.kind / config_key(self.stage.key_config()) / "units"
        if not self.store.read_only:
            d.mkdir(parents=True, exist_ok=True)
        return d

    def unit_prefix(self, unit: Unit) -> Path:
        """Where a unit's files live: the pool-level directory for the whole-pool unit."""
        if unit.key == WHOLE:
            return self.dir.path("unit")
        return self.unit_dir() / unit.key

    def shard_unit(self, shard: Path | str) -> Unit:
        """A per-shard stage's unit of one pool shard."""
        return Unit(self.pool.shard_fingerprint(shard)[:32], str(shard),
                    size=self.pool.shard_rows(shard), label=Path(shard).stem)


def fingerprint_of(output: Any) -> str:
    """A stage output's identity for downstream cache keys (outputs carry `.fingerprint`)."""
    fp = getattr(output, "fingerprint", None)
    if fp is None:
        raise TypeError(f"stage output {type(output).__name__} has no fingerprint")
    return fp


@dataclass(frozen=True)
class Stage:
    """Base of every stage; subclasses are frozen dataclasses whose fields are the config."""

    kind: ClassVar[str]
    per_shard: ClassVar[bool] = True
    loads_model: ClassVar[bool] = False      # False: planning it never loads model weights
    counts: ClassVar[str] = "rows"            # what its progress bar counts
    uses_pool: ClassVar[bool] = True          # False: the output does not depend on the pool
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()   # (module, pip requirement) it imports

    over: Any = field(default=None, kw_only=True)   # the pool it runs over: a TargetPool stage, or None (the main pool)

    # -- declaration ----------------------------------------------------------------------
    def deps(self) -> tuple[Stage, ...]:
        return (self.over,) if self.over is not None else ()

    def resources(self) -> Resources:
        return Resources()

    def check_requirements(self) -> None:
        """A missing optional dependency is an error that names the install command."""
        import importlib.util

        for module, requirement in self.requires:
            if importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(f"the {self.kind} stage needs {module}: "
                                          f"pip install '{requirement}' (or `make setup`)")

    def key_config(self) -> dict:
        """The cache key: every field, stages by their own key, plus `key_extra()`."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("key") is False:      # e.g. batch sizes: no effect on the output
                continue
            v = getattr(self, f.name)
            out[f.name] = v.key_config() if isinstance(v, Stage) else v
        out.update(self.key_extra())
        return out

    def key_extra(self) -> dict:
        """Things that change the output but are not fields (a model's file identity...)."""
        return {}

    def describe(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                           if f.name != "over" and f.repr)
        over = f" over {self.over.describe()}" if self.over is not None else ""
        return f"{self.kind}({fields}){over}"

    # -- units ---------------------------------------------------------------------------
    def units(self, run: StageRun) -> list[Unit]:
        """The stage's work: one unit per pool shard, or one for the whole pool."""
        if self.per_shard:
            return [run.shard_unit(s) for s in run.pool.shards]
        return [Unit(WHOLE, size=run.pool.n_rows if self.uses_pool else 1, label="whole")]

    def open_worker(self, device: str, key: tuple = ()) -> Any:
        """What units need loaded (a model), once per process or actor and `Unit.worker` key."""
        return None

    def run_unit(self, run: StageRun, worker: Any, unit: Unit) -> ShardResult | dict:
        """One unit's output: a shard's `run_shard`, or the whole-pool `run_whole` (which writes
        into `run.dir` and returns its statistics)."""
        if unit.key == WHOLE:
            return self.run_whole(run) or {}
        try:
            rows = read_unit_rows(unit, self.columns())
        except OSError:
            run.pool.check_unchanged()   # a shard gone mid-read: the pool was replaced
            raise
        run.pool.check_unchanged()   # never cache a replaced pool's rows under this shard's key
        return self.run_shard(worker, rows)

    # -- per-shard stages -----------------------------------------------------------------
    def run_shard(self, worker: Any, rows: list[dict]) -> ShardResult:
        raise NotImplementedError

    def columns(self) -> list[str]:
        """Pool columns a unit's rows need."""
        return ["id", "kind", "messages", "text"]

    def assemble(self, run: StageRun) -> dict:
        """Build pool-level outputs from the unit files; returns extra statistics (by default,
        the whole-pool unit's own)."""
        if self.per_shard:
            return {}
        info = unit_done(run, Unit(WHOLE)) or {}
        return {k: v for k, v in info.items() if k not in UNIT_STATS}

    # -- whole-pool stages ----------------------------------------------------------------
    def run_whole(self, run: StageRun) -> dict:
        raise NotImplementedError

    # -- both -----------------------------------------------------------------------------
    def load(self, run: StageRun) -> Any:
        """The output methods receive (e.g. Embeddings with a memory-mapped matrix)."""
        raise NotImplementedError

    def done(self, run: StageRun) -> bool:
        return run.dir.done


UNIT_STATS = ("rows", "tokens", "flops", "seconds")


def read_unit_rows(unit: Unit, columns: list[str]) -> list[dict]:
    """The rows a unit reads: its shard's `columns` (those present), its row range only."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(unit.shard)
    table = pq.read_table(unit.shard, columns=[c for c in columns if c in schema.names])
    if unit.rows is not None:
        table = table.slice(unit.rows[0], unit.rows[1] - unit.rows[0])
    if unit.positions is not None:
        table = table.take(list(unit.positions))
    return table.to_pylist()


def write_unit(run: StageRun, unit: Unit, result: ShardResult | dict, seconds: float) -> dict:
    """Save one unit's result atomically, the marker (with its statistics) last."""
    import pyarrow.parquet as pq
    from thresher.pipeline.artifacts import atomic_path

    prefix = run.unit_prefix(unit)
    if isinstance(result, dict):          # a whole-pool unit wrote its own files: its statistics
        info = {"rows": int(result.get("rows", unit.size)), "tokens": int(result.get("tokens", 0)),
                "flops": float(result.get("flops", 0.0)),
                **{k: v for k, v in result.items() if k not in UNIT_STATS}}
    else:
        for name, arr in result.arrays.items():
            with atomic_path(Path(f"{prefix}.{name}.npy")) as tmp, open(tmp, "wb") as f:
                np.save(f, arr)
        for name, table in result.tables.items():
            with atomic_path(Path(f"{prefix}.{name}.parquet")) as tmp:
                pq.write_table(table, tmp)
        rows = (result.rows if result.rows is not None
                else int(next(iter(result.arrays.values())).shape[0]) if result.arrays
                else int(next(iter(result.tables.values())).num_rows) if result.tables else 0)
        info = {**result.info, "rows": int(rows), "tokens": int(result.tokens),
                "flops": float(result.flops)}
    info["seconds"] = round(float(seconds), 4)
    with atomic_path(Path(f"{prefix}.done.json")) as tmp:
        tmp.write_text(json.dumps(info))
    return info


def unit_done(run: StageRun, unit: Unit) -> dict | None:
    """A finished unit's statistics, or None."""
    marker = Path(f"{run.unit_prefix(unit)}.done.json")
    return json.loads(marker.read_text()) if marker.exists() else None


def unit_file(run: StageRun, unit: Unit, name: str) -> Path:
    """Path of one of a unit's outputs (`name` is e.g. "vectors.npy")."""
    return Path(f"{run.unit_prefix(unit)}.{name}")


def gather_units(run: StageRun, units: list[Unit], name: str) -> np.ndarray:
    """One array made of every unit's `name` file (e.g. "norms.npy"), in the units' order."""
    return np.concatenate([np.load(unit_file(run, u, name)) for u in units])


def shard_file(run: StageRun, shard: Path, name: str) -> Path:
    """Path of one output of a per-shard stage's unit for `shard`."""
    return unit_file(run, run.shard_unit(shard), name)


def concat_shard_tables(run: StageRun, name: str, out: str | None = None,
                        columns: list[str] | None = None) -> pl.DataFrame:
    """Every shard's `name` table of a per-shard stage (e.g. "scores.parquet"; only `columns` when
    given) as one polars DataFrame in pool order, written as the stage's `out` (default `name`)."""
    import polars as pl

    frame = pl.concat([pl.read_parquet(shard_file(run, s, name), columns=columns)
                       for s in run.pool.shards])
    with run.dir.writing(out or name) as tmp:
        frame.write_parquet(tmp)
    return frame


def reason_counts(frame: pl.DataFrame) -> dict[str, int]:
    """How many rows of `frame` give each (non-null) `reason`."""
    import polars as pl

    counts = frame.filter(pl.col("reason").is_not_null())["reason"].value_counts()
    return dict(zip(counts["reason"].to_list(), counts["count"].to_list()))

"""A stage: one kind of derived data, declared as a frozen config, run per shard or per pool.

    @dataclass(frozen=True)
    class Embed(Stage):
        kind = "embed"
        model: str = DEFAULT_EMBEDDER
        part: str = "conversation"

        def resources(self): return Resources(cpus=1, gpus=0.25, memory_gb=2)
        def open_worker(self, env): return ShardEmbedder(...)      # the model, once per process / actor
        def run_shard(self, worker, rows): return ShardResult({"vectors": ...}, tokens=..., flops=...)
        def assemble(self, run): ...                                # per-shard files -> pool-level output
        def load(self, run): return Embeddings(...)                  # what methods receive

The stage's fields are its cache key (with the model's identity, not its name: `key_config`).
A per-shard stage (`per_shard = True`) writes one file set per pool shard, keyed by the shard's
content hash, so a killed run resumes at the first missing shard, a pool that gains a file only
computes the new shards, and any executor (in-process, Ray actors) can fill the shards; then
`assemble` builds the pool-level output. A whole-pool stage implements `run_whole` instead.
`deps()` names the stages whose outputs it reads; `source` (a TargetPool stage or None for the
main pool) says which pool it runs over. Every stage reports the same `StageStats`.
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
    from thresher.pipeline.io.pool import Pool


@dataclass(frozen=True)
class Resources:
    """What one unit of a stage needs (one actor of the Ray executor is sized by it)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float = 1.0


@dataclass
class ShardResult:
    """One shard's output: named arrays (saved as .npy) and/or tables (saved as .parquet)."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)      # name -> pyarrow.Table
    tokens: int = 0
    flops: float = 0.0


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
    shards_computed: int = 0
    shards_cached: int = 0
    rows_computed: int = 0      # rows of the shards computed (not found cached) by this run

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

    def shard_dir(self) -> Path:
        """Per-shard outputs, shared by every pool holding the same shard content."""
        d = self.store.root / self.stage.kind / config_key(self.stage.key_config()) / "shards"
        if not self.store.read_only:
            d.mkdir(parents=True, exist_ok=True)
        return d

    def shard_prefix(self, shard: Path) -> Path:
        return self.shard_dir() / self.pool.shard_fingerprint(shard)[:32]


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
    unit: ClassVar[str] = "rows"              # what its progress bar counts
    uses_pool: ClassVar[bool] = True          # False: the output does not depend on the pool
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()   # (module, pip requirement) it imports

    source: Any = field(default=None, kw_only=True)   # a TargetPool stage, or None: the main pool

    # -- declaration ----------------------------------------------------------------------
    def deps(self) -> tuple[Stage, ...]:
        return (self.source,) if self.source is not None else ()

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
                           if f.name != "source" and f.repr)
        over = f" over {self.source.describe()}" if self.source is not None else ""
        return f"{self.kind}({fields}){over}"

    # -- per-shard stages -----------------------------------------------------------------
    def open_worker(self, device: str) -> Any:
        return None

    def run_shard(self, worker: Any, rows: list[dict]) -> ShardResult:
        raise NotImplementedError

    def columns(self) -> list[str]:
        """Pool columns a shard's rows need."""
        return ["id", "kind", "messages", "text"]

    def assemble(self, run: StageRun) -> dict:
        """Build pool-level outputs from the shard files; returns extra statistics."""
        return {}

    # -- whole-pool stages ----------------------------------------------------------------
    def run_whole(self, run: StageRun) -> dict:
        raise NotImplementedError

    # -- both -----------------------------------------------------------------------------
    def load(self, run: StageRun) -> Any:
        """The output methods receive (e.g. Embeddings with a memory-mapped matrix)."""
        raise NotImplementedError

    def done(self, run: StageRun) -> bool:
        return run.dir.done


def write_shard(run: StageRun, shard: Path, result: ShardResult) -> None:
    """Save one shard's result atomically, the marker file (last suffix) last."""
    import pyarrow.parquet as pq
    from thresher.pipeline.artifacts import atomic_path

    prefix = run.shard_prefix(shard)
    for name, arr in result.arrays.items():
        with atomic_path(Path(f"{prefix}.{name}.npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    for name, table in result.tables.items():
        with atomic_path(Path(f"{prefix}.{name}.parquet")) as tmp:
            pq.write_table(table, tmp)
    info = {"rows": int(next(iter(result.arrays.values())).shape[0]) if result.arrays
            else int(next(iter(result.tables.values())).num_rows),
            "tokens": int(result.tokens), "flops": float(result.flops)}
    with atomic_path(Path(f"{prefix}.done.json")) as tmp:
        tmp.write_text(json.dumps(info))


def shard_done(run: StageRun, shard: Path) -> dict | None:
    marker = Path(f"{run.shard_prefix(shard)}.done.json")
    return json.loads(marker.read_text()) if marker.exists() else None


def shard_file(run: StageRun, shard: Path, name: str) -> Path:
    """Path of one of a shard's outputs (`name` is e.g. "vectors.npy")."""
    return Path(f"{run.shard_prefix(shard)}.{name}")

"""Annotate, then filter: per-row columns computed per shard, cached, assembled in pool order.

    @dataclass(frozen=True)
    class LangId(AnnotationStage):
        kind = "langid"
        model: str = "lite"

        def schema(self): return pa.schema([("lang", pa.string()), ("lang_score", pa.float32())])
        def open_worker(self, device): return load_model(self.model)     # once per process
        def annotate(self, worker, rows): return {"lang": [...], "lang_score": [...]}

    ann = inputs["lang"]                    # an `Annotations` output
    ann.frame(["lang"])                     # id + lang, in pool order
    ann.scan().filter(pl.col("lang_score") < 0.65)   # lazily, never the whole pool in memory

A subclass declares its columns (`schema`) and computes them for one shard's rows (`annotate`);
the base adds `id`, checks the lengths and types, and hands the table to the per-shard machinery
of `pipeline/stage.py`: each shard's table is cached under the shard's content hash, so a pool
that gains a file annotates that file alone, a killed run resumes at the first missing shard and
any executor can fill the shards. `assemble` then streams the shard tables, one at a time, into
one pool-level `annotations.parquet` (id + columns, pool order; one row group per shard).

Nothing here drops a row: dropping is a selection step that reads the columns (a filter method's
`score` adds `keep` and `reason`; see `pipeline/filtering.py` and `selectors/keep_flag.py`), so a
user can look at every value first and a changed threshold recomputes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from thresher.pipeline.artifacts import ArtifactDir
from thresher.pipeline.stage import ShardResult, Stage, StageRun, shard_file

FILE = "annotations.parquet"


@dataclass
class Annotations:
    """A pool-level annotation table: `id` plus the stage's columns, one row per pool row."""

    dir: ArtifactDir
    kind: str

    @property
    def fingerprint(self) -> str:
        return f"{self.kind}:{self.dir.key}"

    @property
    def path(self):
        return self.dir.path(FILE)

    @property
    def columns(self) -> list[str]:
        return pq.read_schema(self.path).names

    def scan(self) -> pl.LazyFrame:
        return pl.scan_parquet(self.path)

    def frame(self, columns: list[str] | None = None) -> pl.DataFrame:
        """`id` and the given columns (default: all), in pool order."""
        if columns is None:
            return pl.read_parquet(self.path)
        return pl.read_parquet(self.path, columns=["id", *[c for c in columns if c != "id"]])


@dataclass(frozen=True)
class AnnotationStage(Stage):
    """Base of the per-row annotation stages (language ID, rule values, signatures...)."""

    kind: ClassVar[str] = "annotate"

    def schema(self) -> pa.Schema:
        """The columns `annotate` returns (without `id`), with their types."""
        raise NotImplementedError

    def annotate(self, worker: Any, rows: list[dict]) -> dict[str, Any] | pa.Table:
        """Per-row values for one shard's rows, in row order: {column: list or array}."""
        raise NotImplementedError

    def run_shard(self, worker: Any, rows: list[dict]) -> ShardResult:
        schema = self.schema()
        if "id" in schema.names:
            raise TypeError(f"{type(self).__name__}.schema() must not declare 'id'")
        cols = self.annotate(worker, rows)
        if isinstance(cols, pa.Table):
            cols = {name: cols[name] for name in cols.column_names}
        missing = [n for n in schema.names if n not in cols]
        extra = [n for n in cols if n not in schema.names]
        if missing or extra:
            raise TypeError(f"{type(self).__name__}.annotate returned columns {sorted(cols)}; "
                            f"its schema declares {schema.names}")
        arrays = [pa.array([r["id"] for r in rows], pa.string())]
        for f in schema:
            arr = cols[f.name]
            arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else \
                pa.array(arr, type=f.type, from_pandas=False)
            if len(arr) != len(rows):
                raise ValueError(f"{type(self).__name__}: column {f.name} has {len(arr)} values "
                                 f"for {len(rows)} rows")
            arrays.append(arr.cast(f.type))
        table = pa.Table.from_arrays(arrays, schema=pa.schema([("id", pa.string()), *schema]))
        return ShardResult(tables={"annotations": table})

    def assemble(self, run: StageRun) -> dict:
        """Stream the shard tables into one `annotations.parquet` in pool order."""
        schema = pa.schema([("id", pa.string()), *self.schema()])
        n = 0
        with run.dir.writing(FILE) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            for shard in run.pool.shards:
                table = pq.read_table(shard_file(run, shard, "annotations.parquet"))
                writer.write_table(table.cast(schema))
                n += table.num_rows
        if n != run.pool.n_rows:     # an invariant: every pool row has its annotations
            raise AssertionError(f"{self.kind}: {n} annotation rows for {run.pool.n_rows} pool rows")
        return {"rows": n}

    def load(self, run: StageRun) -> Annotations:
        return Annotations(run.dir, self.kind)

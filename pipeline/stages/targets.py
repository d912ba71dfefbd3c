"""A target set as a stage: a target file ingested once into the work directory, keyed by its
content, so target-aware methods can run other stages over it (`Forward(..., over=TargetPool(p))`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from thresher.pipeline.artifacts import file_fingerprint
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool, check_rows_file
from thresher.pipeline.stage import Stage, StageRun

log = logging.getLogger(__name__)


def check_targets(paths) -> None:
    """Every target file exists and holds a usable row: checked before any stage runs (a
    mistake found after the pool's stages would cost their whole run)."""
    for p in paths:
        check_rows_file(p, "--target")


@dataclass(frozen=True)
class TargetPool(Stage):
    kind: ClassVar[str] = "target"
    per_shard: ClassVar[bool] = False
    counts: ClassVar[str] = "files"
    uses_pool: ClassVar[bool] = False
    path: str = ""

    def key_extra(self) -> dict:
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"target file {self.path} does not exist")
        return {"path": Path(self.path).name, "sha256": file_fingerprint(Path(self.path))}

    def describe(self) -> str:
        return f"target({self.path})"

    def run_whole(self, run: StageRun) -> dict:
        out = run.dir.path("pool")
        ingest([Path(self.path)], out, cache=True)   # its own artifact directory
        pool = Pool(out)
        if pool.info["quarantined"]:
            log.warning("target %s: %d of %d rows could not be read (see %s)", self.path,
                        pool.info["quarantined"], pool.info["read"], out / "quarantine.jsonl")
        if pool.n_rows == 0:
            raise ValueError(f"target file {self.path} has no usable rows "
                             f"(see {out / 'quarantine.jsonl'})")
        return {"rows": pool.n_rows}

    def load(self, run: StageRun) -> Pool:
        return Pool(run.dir.path("pool"))

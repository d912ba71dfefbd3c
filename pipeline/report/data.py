"""What the report reads: selections, their pool, verify outputs. No plotting here.

A RUN given to `thresher report` (or `write_report`) is any of:
  - a selection's output `X.jsonl` (or its `X.jsonl.manifest.json` / `X.jsonl.selection.parquet`):
    the manifest and the per-row sidecar beside it;
  - a verify output directory (or its `verify.json`): the verify results, plus every subset it
    names (each a selection, when its manifest is beside it);
  - a directory holding several selections (a recipe's output): every `*.manifest.json` in it
    or in a direct subdirectory (a recipe writes OUT/<name>/), and `verify.json` in a direct
    subdirectory.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from thresher.pipeline.io.manifests import read_manifest, recorded_path

log = logging.getLogger(__name__)

MANIFEST = ".manifest.json"
SIDECAR = ".selection.parquet"


@dataclass
class Selection:
    """One selection: its manifest, the chosen rows (sidecar) and, when the method saved them,
    every candidate's scores and decisions (`decisions`: id + columns, kept or not)."""

    name: str
    path: Path
    manifest: dict
    chosen: pl.DataFrame
    decisions: pl.DataFrame | None = None

    @property
    def method(self) -> str:
        return self.manifest.get("method", "?")

    @property
    def method_config(self) -> dict:
        return self.manifest.get("config", {}).get("method", {}) or {}

    def files(self) -> list[Path]:
        """What the report reads of this selection (never to be overwritten by it)."""
        return [self.path, Path(f"{self.path}{MANIFEST}"), Path(f"{self.path}{SIDECAR}")]

    def lookup(self, key: str):
        """A method statistic wherever the manifest keeps it: top level, `counts`, `notes`,
        `stats`, or the method's config (first found)."""
        for where in (self.manifest, self.manifest.get("counts", {}),
                      self.manifest.get("notes", {}), self.manifest.get("stats", {}),
                      self.method_config):
            if isinstance(where, dict) and key in where:
                return where[key]
        return None


@dataclass
class VerifyRun:
    path: Path                     # the verify output directory
    data: dict                     # verify.json
    train_logs: dict[str, list[dict]] = field(default_factory=dict)   # run name -> steps


def read_table(path: Path, what: str) -> pl.DataFrame:
    """A Parquet file the report reads, or ValueError naming it."""
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: unreadable {what} ({str(e).splitlines()[0]})") from None


def load_selection(path: Path, name: str) -> Selection:
    path = Path(path)
    manifest_path = Path(f"{path}{MANIFEST}")
    manifest = read_manifest(manifest_path)
    sidecar = Path(f"{path}{SIDECAR}")
    if manifest.get("annotate_only"):      # the per-row table itself; "chosen": what it keeps
        decisions = pl.read_parquet(path)
        keep = pl.col("keep").fill_null(False) if "keep" in decisions.columns else pl.lit(True)
        chosen = decisions.filter(keep).select("id").with_row_index("rank").with_columns(
            reason=pl.lit("would be kept (annotate only)"))
        return Selection(name, path, manifest, chosen, decisions)
    if not sidecar.exists():
        raise FileNotFoundError(f"{sidecar}: missing (the per-row reasons of {path.name})")
    chosen = read_table(sidecar, "selection sidecar")
    if "id" not in chosen.columns:
        raise ValueError(f"{sidecar}: not a selection sidecar (no id column)")
    if "rank" not in chosen.columns:
        chosen = chosen.with_row_index("rank")
    decisions = None
    for key in ("scores", "decisions"):
        recorded = manifest.get(key) or manifest.get("config", {}).get("method", {}).get(key)
        if isinstance(recorded, str):
            p = recorded_path(recorded, manifest_path, manifest.get("output"))
            if p.exists():
                decisions = read_table(p, "score frame")
                break
            log.warning("%s: recorded %s %s not found; scores of unselected rows unknown",
                        manifest_path, key, recorded)
    return Selection(name, path, manifest, chosen, decisions)


def selection_base(path: Path) -> Path | None:
    """X for X.jsonl / X.jsonl.manifest.json / X.jsonl.selection.parquet, when X has a manifest."""
    s = str(path)
    for suffix in (MANIFEST, SIDECAR):
        s = s.removesuffix(suffix)
    return Path(s) if Path(f"{s}{MANIFEST}").exists() else None


def load_verify(path: Path) -> VerifyRun:
    data = read_manifest(path / "verify.json")
    logs = {}
    for name in data.get("runs", {}):
        log_file = path / "runs" / name / "train_log.jsonl"
        if log_file.exists():
            logs[name] = [json.loads(line) for line in log_file.read_text().splitlines() if line]
    return VerifyRun(path, data, logs)


def _expand(run: Path) -> tuple[list[Path], list[Path]]:
    """(selection bases, verify dirs) named by one RUN argument."""
    if run.name == "verify.json" and run.is_file():
        run = run.parent
    if run.is_dir():
        if (run / "verify.json").exists():
            return [], [run]
        manifests = [*run.glob(f"*{MANIFEST}"), *run.glob(f"*/*{MANIFEST}")]   # recipe: OUT/<name>/
        bases = sorted(b for b in (selection_base(m) for m in manifests) if b is not None)
        verifies = sorted(d.parent for d in run.glob("*/verify.json"))
        if not bases and not verifies:
            raise FileNotFoundError(f"{run}: no selection manifests (*{MANIFEST}) and no "
                                    "verify.json here")
        return bases, verifies
    base = selection_base(run)
    if base is None:
        raise FileNotFoundError(f"{run}: not a selection output (no {run.name}{MANIFEST} beside "
                                "it), a verify directory or a directory of selections")
    return [base], []


def _unique_names(paths: list[Path]) -> list[str]:
    names, seen = [], Counter()
    for p in paths:
        base = p.name.split(".")[0]
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def load_runs(runs: list[Path]) -> tuple[list[Selection], list[VerifyRun]]:
    """Every selection and verify output the RUN arguments name (a verify's subsets included)."""
    if not runs:
        raise ValueError("report needs at least one RUN (a selection output, a verify directory "
                         "or a directory of selections)")
    bases: list[Path] = []
    verifies: list[VerifyRun] = []
    for run in runs:
        b, v = _expand(Path(run))
        bases += b
        verifies += [load_verify(d) for d in v]
    for v in verifies:
        for subset in v.data.get("subsets", {}).values():
            p = recorded_path(subset, v.path / "verify.json", None)
            base = selection_base(p)
            if base is not None:
                bases.append(base)
    unique = list(dict.fromkeys(b.resolve() for b in bases))
    selections = [load_selection(b, n) for b, n in zip(unique, _unique_names(unique))]
    return selections, verifies


def pool_path(sel: Selection) -> Path | None:
    """The pool the selection was made from, as its manifest records it (None: not found)."""
    inputs = sel.manifest.get("inputs")
    recorded = inputs.get("pool") if isinstance(inputs, dict) else None
    if not isinstance(recorded, str):
        return None
    p = recorded_path(recorded, Path(f"{sel.path}{MANIFEST}"), sel.manifest.get("output"))
    if not (p / "pool.json").exists():
        log.warning("%s: its pool %s is gone; pool sections are left out", sel.path, p)
        return None
    return p


def open_pool(sel: Selection):
    """The selection's pool, refused when its fingerprint is not the one the manifest records
    (re-ingested since, or another pool of the same name): its rows would not be the ones
    the selection was made from."""
    from thresher.pipeline.io.pool import Pool

    path = pool_path(sel)
    if path is None:
        return None
    pool = Pool(path)
    want = sel.manifest.get("inputs", {}).get("pool_fingerprint")
    if want and want != pool.fingerprint:
        raise ValueError(f"{path}: fingerprint {pool.fingerprint} is not that of the pool "
                         f"{sel.path.name} was selected from ({want}): the pool was re-ingested "
                         "or is another one; report it with the pool it was selected from")
    return pool


def workdir(sel: Selection) -> Path | None:
    w = sel.manifest.get("workdir")
    return Path(w) if isinstance(w, str) and w else None


def quarantine_reasons(pool_dir: Path, top: int = 10) -> list[tuple[str, int]]:
    """The most frequent quarantine reasons (the text before the first ':' of detail)."""
    f = pool_dir / "quarantine.jsonl"
    if not f.exists():
        return []
    counts: Counter = Counter()
    with open(f, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                reason = str(json.loads(line).get("reason", "?"))
                counts[reason[:90]] += 1
    return counts.most_common(top)


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def first_user_turn(row: dict, limit: int = 240) -> str:
    """The row's first user message (or its text), whitespace collapsed, cut to `limit`."""
    if row.get("kind") == "text" or not row.get("messages"):
        s = row.get("text") or ""
    else:
        s = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
    s = " ".join(str(s).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


NOT_SCORES = {"rank", "row", "n_chars", "n_tokens", "n_loss_tokens", "cluster", "tier",
              "index", "shard", "group"}


def score_columns(frame: pl.DataFrame) -> list[str]:
    return [c for c, t in frame.schema.items() if t.is_numeric() and c not in NOT_SCORES]


def cuts(all_values: np.ndarray | None, chosen: np.ndarray) -> list[float]:
    """Where the selection cut a score: the selected range's ends that lie inside the range of
    all candidates (none when rows were chosen across the whole range)."""
    chosen = chosen[np.isfinite(chosen)]
    if all_values is None or chosen.size == 0:
        return []
    all_values = all_values[np.isfinite(all_values)]
    lo, hi = float(chosen.min()), float(chosen.max())
    span = float(all_values.max() - all_values.min()) or 1.0
    out = []
    if lo > all_values.min() + 1e-9 * span and (all_values < lo).sum() > 0.02 * all_values.size:
        out.append(lo)
    if hi < all_values.max() - 1e-9 * span and (all_values > hi).sum() > 0.02 * all_values.size:
        out.append(hi)
    return out

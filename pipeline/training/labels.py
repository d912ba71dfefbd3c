"""The examples a quality classifier learns from: rows with a label, and where each came from.

    sets = from_files(positives=[Path("good.jsonl")], negatives=[Path("web/")])   # files or pools
    sets = from_rule(Pool("out/pool"), "source=gsm8k,mbpp")                      # a pool column
    sets = from_rule(pool, "rating>=3", extra=ratings_frame)                      # LM ratings

A rule is `FIELD` (a boolean or 0/1 field: the label; or any number, for a regression),
`FIELD>=X` / `>` / `<=` / `<` (a threshold), `FIELD=A,B` (a value among these: positive) or
`FIELD!=A,B`. FIELD is a pool column (`source`, `kind`), a column of `extra` (the LM-ratings
stage's `rating`, `complexity`, `quality`), or an original field of the rows (`meta`, e.g. the
shared pool's `capability` or `quality_label`). Rows without a value are left out and counted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from thresher.pipeline.artifacts import file_fingerprint
from thresher.pipeline.io.pool import Pool, load_rows

RULE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|!=|>|<|=)?\s*(.*?)\s*$")


@dataclass
class LabelledSet:
    """Rows from one input, with a label each (1/0, or a value for a regression)."""

    name: str                          # the input's path
    labels: np.ndarray                 # float64, one per row
    rows: list[dict] | None = None     # a file's rows (in memory)
    pool: Pool | None = None           # or a pool's ...
    pool_rows: np.ndarray | None = None   # ... row indices (pool order)
    fingerprint: str = ""
    rule: str = ""
    excluded: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"input": self.name, "kind": "pool" if self.pool is not None else "file",
                "fingerprint": self.fingerprint, "rule": self.rule, "rows": len(self.labels),
                "excluded": self.excluded}

    def ids(self) -> list[str]:
        if self.pool is not None:
            return self.pool.frame(["id"])["id"].gather(self.pool_rows).to_list()
        return [r["id"] for r in self.rows]


def _load(path: Path, label: float, rule: str) -> LabelledSet:
    path = Path(path)
    if path.is_dir() and (path / "pool.json").exists():
        pool = Pool(path)
        if pool.n_rows == 0:
            raise ValueError(f"{path}: the pool has no rows")
        return LabelledSet(str(path), np.full(pool.n_rows, label), pool=pool,
                           pool_rows=np.arange(pool.n_rows), fingerprint=pool.fingerprint, rule=rule)
    if path.is_dir():
        raise ValueError(f"{path}: a directory but not a pool (no pool.json); give a file or "
                         "run `thresher ingest` on it")
    if path.exists() and path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    rows, bad = load_rows(path)
    return LabelledSet(str(path), np.full(len(rows), label), rows=rows,
                       fingerprint=file_fingerprint(path), rule=rule,
                       excluded={"unreadable": len(bad)} if bad else {})


def from_files(positives: list[Path], negatives: list[Path]) -> list[LabelledSet]:
    """Every row of each positive input labelled 1, of each negative input 0."""
    if not positives or not negatives:
        raise ValueError("--positive and --negative: give at least one of each (files or pools)")
    return [_load(p, 1.0, "positive") for p in positives] + \
        [_load(p, 0.0, "negative") for p in negatives]


def _column(pool: Pool, name: str, extra: pl.DataFrame | None) -> pl.Series:
    """A field's values for every pool row, in pool order."""
    if name in ("source", "kind", "n_chars"):
        return pool.frame([name])[name]
    if extra is not None and name in extra.columns and name != "id":
        ids = pool.frame(["id"])
        return ids.join(extra.select("id", name), on="id", how="left",
                        maintain_order="left")[name]
    meta = pool.frame(["meta"])["meta"]
    parsed = [json.loads(m) if m else {} for m in meta.to_list()]
    if not any(name in m for m in parsed):
        known = sorted({k for m in parsed[:1000] for k in m if not k.startswith("_")})
        extra_cols = [c for c in (extra.columns if extra is not None else []) if c != "id"]
        raise ValueError(f"--label: no field {name!r} in pool {pool.path}; fields: "
                         + ", ".join(["source", "kind", *extra_cols, *known]))
    return pl.Series(name, [_scalar(m.get(name)) for m in parsed], dtype=pl.Object)


def _scalar(v):
    return v if isinstance(v, (bool, int, float, str)) or v is None else json.dumps(v)


def _number(v, name: str) -> float | None:
    if v is None or isinstance(v, str) and not v.strip():
        return None
    if isinstance(v, bool):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return float(v.lower() == "true")
        raise ValueError(f"--label: field {name!r} holds {v!r}, not a number or a boolean; "
                         f"use {name}=VALUE for a category") from None


def parse_rule(rule: str) -> tuple[str, str | None, str]:
    m = RULE.match(rule or "")
    if not m or (m.group(2) and not m.group(3)):
        raise ValueError(f"--label {rule!r}: expected FIELD, FIELD>=X (or >, <=, <), FIELD=A,B "
                         "or FIELD!=A,B")
    return m.group(1), m.group(2), m.group(3)


def label_values(values: list, rule: str) -> np.ndarray:
    """Apply a rule to one field's values: float labels, NaN where a row has no value."""
    name, op, arg = parse_rule(rule)
    out = np.full(len(values), np.nan)
    if op in ("=", "!="):
        wanted = {a.strip() for a in arg.split(",")}
        for i, v in enumerate(values):
            if v is not None:
                hit = str(v).lower() in {w.lower() for w in wanted} if isinstance(v, bool) \
                    else str(v) in wanted
                out[i] = float(hit if op == "=" else not hit)
        return out
    try:
        x = float(arg) if op else None
    except ValueError:
        raise ValueError(f"--label {rule!r}: {arg!r} is not a number") from None
    for i, v in enumerate(values):
        num = _number(v, name)
        if num is None or np.isnan(num):
            continue
        out[i] = num if op is None else float({">=": num >= x, ">": num > x, "<=": num <= x,
                                               "<": num < x}[op])
    return out


def from_rule(pool: Pool, rule: str, extra: pl.DataFrame | None = None,
              extra_name: str = "") -> list[LabelledSet]:
    """One pool labelled by a rule on one of its fields (rows with no value left out)."""
    name, _, _ = parse_rule(rule)
    if pool.n_rows == 0:
        raise ValueError(f"{pool.path}: the pool has no rows")
    labels = label_values(_column(pool, name, extra).to_list(), rule)
    keep = np.flatnonzero(~np.isnan(labels))
    fingerprint = pool.fingerprint + (f"+{extra_name}" if extra_name else "")
    excluded = {f"no {name} value": int(len(labels) - len(keep))} if len(keep) < len(labels) else {}
    if not len(keep):
        raise ValueError(f"--label {rule!r}: no row of {pool.path} has a value for {name!r}")
    return [LabelledSet(str(pool.path), labels[keep], pool=pool, pool_rows=keep,
                        fingerprint=fingerprint, rule=rule, excluded=excluded)]


def check_classes(sets: list[LabelledSet], task: str) -> dict:
    """Counts per class (binary) or the value range (regression); one class is a user error."""
    y = np.concatenate([s.labels for s in sets])
    if len(y) == 0:
        raise ValueError("no labelled rows to train on")
    if task == "binary":
        if not np.isin(y, (0.0, 1.0)).all():
            raise ValueError("labels are not 0/1: give a threshold (--label 'rating>=3') for a "
                             "classifier, or --task regression")
        pos, neg = int((y == 1).sum()), int((y == 0).sum())
        if pos == 0 or neg == 0:
            which = "positive" if pos == 0 else "negative"
            raise ValueError(f"the training set has one class only ({pos} positive, {neg} "
                             f"negative rows): no {which} example")
        return {"positive": pos, "negative": neg}
    if np.unique(y).size < 2:
        raise ValueError(f"the training set has one value only ({y[0]:g}) to regress on")
    return {"rows": len(y), "min": float(y.min()), "max": float(y.max()),
            "mean": float(y.mean())}

"""Method and selector names -> "module:Class", imported lazily so `thresher --help` stays fast.

A new method is one file under scoring/ plus one line in METHODS; a new selector, one file
under selectors/ plus one line in SELECTORS (selectors listed here can be named by `--selector`
to cut any method's score column).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from thresher.pipeline.method import Method, Request
from thresher.pipeline.params import describe_params

METHODS: dict[str, str] = {
    "random": "thresher.scoring.random_baseline:RandomMethod",
    "semdedup": "thresher.scoring.semdedup:SemDeDupMethod",
    "prototypes": "thresher.scoring.prototypes:PrototypesMethod",
    "balanced": "thresher.scoring.balanced:BalancedMethod",
    "diversity": "thresher.scoring.diversity:DiversityMethod",
    "perplexity": "thresher.scoring.perplexity:PerplexityMethod",
    "el2n": "thresher.scoring.el2n:El2nMethod",
    "el2n-single": "thresher.scoring.el2n_single:El2nSingleMethod",
    "grand": "thresher.scoring.grand:GrandMethod",
    "s2l": "thresher.scoring.s2l:S2LMethod",
    "dealrec": "thresher.scoring.dealrec:DealrecMethod",
    "eu-plane": "thresher.scoring.eu_plane:EuPlaneMethod",
    "rds": "thresher.scoring.rds:RdsMethod",
    "paser": "thresher.scoring.paser:PaserMethod",
    "less": "thresher.scoring.less:LessMethod",
    "classifier": "thresher.scoring.classifier:ClassifierMethod",
    "lm-rating": "thresher.scoring.lm_rating:LmRatingMethod",
}

# What `thresher select --target F` runs when no --method is given: the combination that won
# most often on bench/quality.py (LESS gradient features, two warm-up checkpoints), with the
# diversity guard kept on at the loosest measured cap (README, "Target-aware selection").
TARGET_DEFAULT: tuple[str, dict] = ("less", {"epochs": 2, "max_share": 0.5})


def method_for(method: str | None, targets, params: dict) -> tuple[str, dict]:
    """The method to run and its parameters: `method` as given, or with targets and no method
    the target default (its parameters under the caller's)."""
    if method:
        return method, params
    if not targets:
        raise ValueError("--method is required (or give --target FILE for the default "
                         "target-aware selection)")
    name, defaults = TARGET_DEFAULT
    return name, {**defaults, **params}


SELECTORS: dict[str, str] = {
    "band": "thresher.selectors.score_band:ScoreBand",
    "stratified": "thresher.selectors.stratified:Stratified",
    "balanced": "thresher.selectors.balanced:Balanced",
    "threshold": "thresher.selectors.threshold:Threshold",
    "random": "thresher.selectors.random_sample:RandomSelector",
}


def _load(target: str):
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; `thresher methods` lists: {', '.join(METHODS)}")
    return _load(METHODS[name])()


def selector_class(name: str) -> type:
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; expected one of {', '.join(SELECTORS)}")
    return _load(SELECTORS[name])


class _Sketch:
    """Stands in for a pool when `thresher methods` shows needs without one (10,000 rows)."""

    n_rows = 10_000
    fingerprint = "(pool)"


def describe(name: str | None = None) -> list[dict]:
    """Every method's (or one method's) parameters with defaults, and its needs as stages."""
    out = []
    for m_name in [name] if name else list(METHODS):
        method = get(m_name)
        p = dataclasses.replace(method.Params(), **method.example)
        req = Request(pool=_Sketch(), targets=(Path("TARGET.jsonl"),) if method.needs_targets else ())
        needs = method.needs(p, req)
        out.append({
            "method": m_name, "summary": method.summary, "cost": method.cost,
            "params": describe_params(method.Params),
            "needs": [{"name": k, "stage": st.kind, "describe": st.describe(),
                       "config": {f.name: getattr(st, f.name) for f in dataclasses.fields(st)
                                  if not dataclasses.is_dataclass(getattr(st, f.name))}}
                      for k, st in needs.items()],
            "targets": "required" if method.needs_targets else "no",
            "score_column": method.score_column,
        })
    return out


def describe_selectors() -> list[dict]:
    return [{"selector": n, "params": [p for p in describe_params(_load(t)) if p["name"] != "column"]}
            for n, t in SELECTORS.items()]

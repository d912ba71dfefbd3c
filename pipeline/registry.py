"""Method and selector names -> "module:Class", imported lazily so `thresher --help` stays fast.

A new method is one file under scoring/ plus one line in METHODS; a new selector, one file
under selectors/ plus one line in SELECTORS (selectors listed here can be named by `--selector`
to cut any method's score column).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thresher.pipeline.method import Method, Request
from thresher.pipeline.params import describe_params, parse_params, route_params

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
    "quality-rules": "thresher.scoring.quality_rules:QualityRulesMethod",
    "langid": "thresher.scoring.langid:LangIdMethod",
    "fuzzy-dedup": "thresher.scoring.fuzzy_dedup:FuzzyDedupMethod",
    "decontaminate": "thresher.scoring.decontaminate:DecontaminateMethod",
    "classifier": "thresher.scoring.classifier:ClassifierMethod",
    "lm-rating": "thresher.scoring.lm_rating:LmRatingMethod",
}

# What `thresher select --target F` runs when no --method is given: the combination that won
# most often on bench/quality.py (LESS gradient features, two warm-up checkpoints), with the
# diversity guard kept on at the loosest measured cap (docs/target-aware.md).
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
    given = {k.removeprefix("method.") for k in params}
    return name, {**{k: v for k, v in defaults.items() if k not in given}, **params}


SELECTORS: dict[str, str] = {
    "band": "thresher.selectors.score_band:ScoreBand",
    "stratified": "thresher.selectors.stratified:Stratified",
    "balanced": "thresher.selectors.balanced:Balanced",
    "threshold": "thresher.selectors.threshold:Threshold",
    "random": "thresher.selectors.random_sample:RandomSelector",
    "keep": "thresher.selectors.keep_flag:KeepFlag",
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


@dataclass(frozen=True)
class Choice:
    """A method with its typed parameters and its cut, checked before any work: what `select`,
    recipes and the Python API run. `selector_params` (raw, the score column filled in) are
    typed again when the cut is made; None for `selector_cls` means the method's own cut."""

    name: str
    method: Method
    params: Any
    selector_cls: type | None = None
    selector_params: dict = dataclasses.field(default_factory=dict)


def choose(method: str, params: dict | None = None, selector: str | None = None) -> Choice:
    """Resolve and check a method, its parameters and an optional `--selector`: each key goes to
    the class that declares it (`pipeline/params.route_params`); mistakes are one-line errors."""
    impl = get(method)
    sel_cls = selector_class(selector) if selector else None
    method_raw, sel_raw = route_params(params, impl.Params, sel_cls,
                                       (f"method {method}", f"selector {selector}"))
    p = parse_params(impl.Params, method_raw)
    if sel_cls is None:
        return Choice(method, impl, p)
    if impl.score_column is None and "column" not in sel_raw:
        raise ValueError(f"--selector: method {method} has no score column to cut; "
                         "give --param selector.column=NAME or use its own selector")
    sel_raw = {"column": impl.score_column, **sel_raw}
    parse_params(sel_cls, sel_raw, "selector parameter")
    return Choice(method, impl, p, sel_cls, sel_raw)


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

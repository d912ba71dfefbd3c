"""Method name -> "module:Class". Imported lazily so `thresher --help` stays fast."""

from __future__ import annotations

import importlib

from thresher.pipeline.method import Method

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
}


def get(name: str) -> Method:
    try:
        target = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; `thresher methods` lists: {', '.join(METHODS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()


def describe() -> list[dict]:
    out = []
    for name, target in METHODS.items():
        module, cls = target.split(":")
        m = getattr(importlib.import_module(module), cls)
        out.append({"method": name, "needs": m.needs, "cost": m.cost, "summary": m.summary})
    return out

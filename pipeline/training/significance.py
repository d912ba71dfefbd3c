"""Signal or noise? Seed spread and paired bootstrap intervals for `thresher verify --seeds K`.

    d = paired_bootstrap(method_rows, random_rows, weights=tokens, seed=0)
    d["diff"], d["lo"], d["hi"]      # method - random, with a 95% interval over eval rows
    verdict(d, lower_is_better=True)  # "better" only when the interval excludes zero

Each eval row's value (its mean response-token loss, or 1/0 exact match) is first averaged over
the K training seeds of a run, so the pairing is by eval row: the same rows, scored by the
subset's models and by the random twin's models. The statistic is the weighted mean over rows
(token-weighted for loss, as the held-out loss itself); rows are resampled with replacement
`n_boot` times and the interval is the percentile interval of the resampled differences.
"""

from __future__ import annotations

import numpy as np

N_BOOT = 2000


def paired_bootstrap(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None,
                     n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0) -> dict:
    """Weighted mean of (a - b) over rows and its percentile bootstrap interval."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = np.ones_like(a) if weights is None else np.asarray(weights, np.float64)
    if a.shape != b.shape or a.shape != w.shape or a.ndim != 1:
        raise ValueError(f"paired rows differ in shape: {a.shape}, {b.shape}, {w.shape}")
    ok = np.isfinite(a) & np.isfinite(b) & (w > 0)
    a, b, w = a[ok], b[ok], w[ok]
    if len(a) == 0:
        raise ValueError("no eval row has a value for both runs")
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boots = (d[idx] * w[idx]).sum(1) / w[idx].sum(1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(boots, [tail, 100 - tail])
    return {"diff": float((d * w).sum() / w.sum()), "lo": float(lo), "hi": float(hi),
            "rows": len(d), "n_boot": n_boot, "level": level}


def verdict(d: dict, lower_is_better: bool) -> str:
    """'better' / 'worse' than random only when the interval excludes zero, else 'no difference'."""
    if d["hi"] < 0:
        return "better" if lower_is_better else "worse"
    if d["lo"] > 0:
        return "worse" if lower_is_better else "better"
    return "no clear difference"


def seed_mean(rows_per_seed: list[list[float | None]]) -> np.ndarray:
    """Per-row mean over seeds (None -> NaN)."""
    arr = np.array([[np.nan if v is None else v for v in r] for r in rows_per_seed], np.float64)
    return arr.mean(axis=0)


def spread(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

"""Q-Tuning (Wang et al. 2025, arXiv 2509.23873): per-batch sample and token pruning.

Spec: methods-b.md §2. Q-Tuning is a trainer plug-in, not an offline selector: each mini-batch
is placed on the error-uncertainty (EU) plane with the model being trained, then

    Q1 high PPL, high Ent  noise          dropped
    Q2 high PPL, low Ent   misconception  kept; its highest-smoothed-PPL tokens masked out
    Q3 low PPL,  low Ent   redundant      dropped
    Q4 low PPL,  high Ent  calibration    kept whole

The quantile level alpha (= beta, bisected jointly as in the released code) is searched so that
|Q2 u Q4| / B is within `tol` of the sample ratio; when the quadrants hold fewer than
K = max(1, round(B * r_sample)) samples, the rest are filled by |minmax(PPL) - minmax(Ent)|
(§2.3). Everything here works on numpy arrays aligned to token positions (position t scores the
prediction of token t, as `pipeline/chat.encode` lays out its loss mask), so it is tested on
hand-built arrays; `pipeline/training/train.py` calls `prune_batch` once per micro-batch and
`write_masks` is the offline mode.

Choices where the spec leaves room (also in docs/training.md, "Q-Tuning"):
- token pruning scope: `prune_scope="sample"` (default) is the paper's per-sample rule: each Q2 sample
  keeps round(r_token * its label tokens) (at least 1), dropping the highest smoothed scores.
  `prune_scope="batch"` is the released code's batch-global budget (§2.4).
- entropy is averaged over the response (label) positions by default, the paper's formula;
  `entropy_over="all"` averages over all non-pad positions as the released code does (§2.2).
- compute: the trainer scores the batch with a separate no-grad forward (eval mode) and trains
  on the kept samples only, the "two-pass" variant §2.4 suggests, so dropped samples cost no
  backward pass. The released code reads the scores from the training forward instead.
- ties in token scores are broken by position (the earlier token is dropped first); rounding
  uses Python's round (half to even).
- the plane itself (quadrants, the alpha bisection, the fill-up) is `selectors/quadrants.eu_keep`,
  shared with the static `eu-plane` method; this module adds the per-batch scoring, the token
  pruning and the reports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from thresher.selectors.quadrants import eu_keep


@dataclass
class QTuningConfig:
    sample_ratio: float = 0.25     # r_sample; paper grid {0.125, 0.25, 0.5}
    token_ratio: float = 0.5       # r_token; paper grid {0.5, 0.7}
    lam: float = 0.5               # wise_lambda: neighbour weight in the smoothed token score
    prune_scope: str = "sample"   # "sample" (paper text) or "batch" (released code)
    entropy_over: str = "response"  # "response" (paper formula) or "all" (released code)
    tol: float = 0.01
    max_iter: int = 10

    def __post_init__(self):
        for name in ("sample_ratio", "token_ratio"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"Q-Tuning {name} must be in (0, 1], got {v}")
        if not 0 <= self.lam <= 1:
            raise ValueError(f"Q-Tuning lam must be in [0, 1], got {self.lam}")
        if self.prune_scope not in ("sample", "batch"):
            raise ValueError(f"Q-Tuning prune_scope must be 'sample' or 'batch', got {self.prune_scope!r}")
        if self.entropy_over not in ("response", "all"):
            raise ValueError(f"Q-Tuning entropy_over must be 'response' or 'all', got {self.entropy_over!r}")


def sample_scores(nll: np.ndarray, ent: np.ndarray, loss_mask: np.ndarray,
                  attention: np.ndarray, entropy_over: str = "response") -> tuple[np.ndarray, np.ndarray]:
    """Per-sample PPL (exp of the mean label-token NLL) and mean entropy, from [B, T] arrays."""
    mask = loss_mask.astype(bool)
    n = mask.sum(1)
    if (n == 0).any():
        raise ValueError("Q-Tuning: a sample has no loss tokens; it cannot be placed on the EU plane")
    ppl = np.exp((np.where(mask, nll, 0.0).sum(1) / n).astype(np.float64))
    if entropy_over == "all":
        pos = attention.astype(bool).copy()
        pos[:, 0] = False  # the first token has no prediction
    else:
        pos = mask
    ent = np.where(pos, ent, 0.0).sum(1) / np.maximum(pos.sum(1), 1)
    return ppl, ent.astype(np.float64)


def smoothed_token_scores(nll: np.ndarray, valid: np.ndarray, lam: float = 0.5) -> np.ndarray:
    """s_i = (1 - lam) PPL_i + lam (PPL_{i-1} + PPL_{i+1}), neighbours 0 outside valid labels (§2.4).

    Works on [T] or [B, T]; positions that are not valid get -inf (never chosen to drop).
    """
    valid = valid.astype(bool)
    p = np.where(valid, np.exp(np.where(valid, nll, 0.0).astype(np.float64)), 0.0)
    left = np.zeros_like(p)
    right = np.zeros_like(p)
    left[..., 1:] = p[..., :-1]
    right[..., :-1] = p[..., 1:]
    s = (1 - lam) * p + lam * (left + right)
    return np.where(valid, s, -np.inf)


def _drop_highest(scores: np.ndarray, n: int) -> np.ndarray:
    """Flat indices of the n highest finite scores (stable: earlier positions first on ties)."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    flat = scores.ravel()
    order = np.argsort(-flat, kind="stable")
    order = order[np.isfinite(flat[order])]
    return order[:n]


@dataclass
class BatchPrune:
    keep: np.ndarray        # bool [B]: samples trained on
    loss_mask: np.ndarray   # bool [B, T]: tokens that keep their loss (all False for dropped rows)
    quadrant: np.ndarray    # int [B]: 1..4 on the EU plane (2/4 include fill-ups), 0 = between
    report: dict


def prune_batch(nll: np.ndarray, ent: np.ndarray, loss_mask: np.ndarray, attention: np.ndarray,
                cfg: QTuningConfig) -> BatchPrune:
    """Apply Q-Tuning to one batch of [B, T] per-token NLL / entropy arrays (position-aligned)."""
    mask = loss_mask.astype(bool)
    attention = attention.astype(bool)
    B = mask.shape[0]
    ppl, ent_s = sample_scores(nll, ent, mask, attention, cfg.entropy_over)
    plane = eu_keep(ppl, ent_s, cfg.sample_ratio)    # bisection + fill-up, §2.3
    labels, alpha, filled = plane["labels"], plane["alpha"], int(plane["fill"].sum())
    q2 = plane["q2_like"]                             # Q2 and Q2-like fill-ups: token-pruned
    keep = plane["kept"] | plane["fill"]
    q4 = keep & ~q2

    new = mask & keep[:, None]
    scores = smoothed_token_scores(nll, mask, cfg.lam)
    if cfg.prune_scope == "sample":
        for i in np.flatnonzero(q2):
            n = int(mask[i].sum())
            n_keep = max(1, round(n * cfg.token_ratio))
            new[i, _drop_highest(scores[i], n - n_keep)] = False
    else:  # batch-global budget of the released code (§2.4)
        t_total = int(attention[:, 1:].sum())
        keep_tok = round(t_total * cfg.sample_ratio * cfg.token_ratio)
        removed = int(attention[~keep, 1:].sum())
        drop_need = t_total - keep_tok - removed
        cand = np.where(q2[:, None] & mask, scores, -np.inf)
        flat = _drop_highest(cand, drop_need)
        new.reshape(-1)[flat] = False

    q2_tokens = int(mask[q2].sum())
    report = {
        "samples": B, "kept_samples": int(keep.sum()), "q2": int((labels == "Q2").sum()),
        "q4": int((labels == "Q4").sum()),
        "filled": filled, "alpha": round(float(alpha), 6),
        "label_tokens": int(mask.sum()), "kept_sample_tokens": int(mask[keep].sum()),
        "kept_tokens": int(new.sum()), "q2_tokens": q2_tokens,
        "q2_kept_tokens": int(new[q2].sum()),
    }
    report["sample_frac"] = report["kept_samples"] / B
    report["token_frac"] = report["kept_tokens"] / max(report["label_tokens"], 1)
    report["q2_token_frac"] = report["q2_kept_tokens"] / q2_tokens if q2_tokens else None
    quadrant = np.select([q2, q4, labels == "Q1", labels == "Q3"], [2, 4, 1, 3], 0)
    return BatchPrune(keep, new, quadrant, report)


def summarize(reports: list[dict]) -> dict:
    """Totals over batches: kept-sample and kept-token fractions (token ones over label tokens)."""
    tot = {k: sum(r[k] for r in reports) for k in
           ("samples", "kept_samples", "label_tokens", "kept_tokens", "q2_tokens",
            "q2_kept_tokens", "filled")}
    return {
        "batches": len(reports), **tot,
        "sample_frac": tot["kept_samples"] / max(tot["samples"], 1),
        "token_frac": tot["kept_tokens"] / max(tot["label_tokens"], 1),
        "q2_token_frac": tot["q2_kept_tokens"] / tot["q2_tokens"] if tot["q2_tokens"] else None,
    }


# ---------------------------------------------------------------- per-token statistics

def score_tokens(model, tok, encoded: list, entropy_over: str = "response"):
    """Padded [B, T] arrays (nll, entropy, loss_mask, attention) for `chat.encode` results, from
    one pass of the fused forward engine (`pipeline/engine.run_forward`, eval mode, no grad).

    Position t holds the NLL / entropy of the prediction of token t. With entropy_over="all"
    every position after the first is scored (so entropy covers prompt + response); the NLL is
    still read at the loss positions only.
    """
    from thresher.pipeline.models.chat import Encoded
    from thresher.pipeline.models.engine import run_forward

    B = len(encoded)
    T = max(len(e.input_ids) for e in encoded)
    mask = np.zeros((B, T), dtype=bool)
    att = np.zeros((B, T), dtype=bool)
    for i, e in enumerate(encoded):
        mask[i, :len(e.input_ids)] = e.loss_mask
        att[i, :len(e.input_ids)] = True
    scored = mask if entropy_over == "response" else att.copy()
    scored[:, 0] = False
    encs = [Encoded(e.input_ids, scored[i, :len(e.input_ids)].copy(), False)
            for i, e in enumerate(encoded)]
    res = run_forward(model, tok, [{}] * B, {"token_loss", "token_entropy"}, encoded=encs)
    nll = np.zeros((B, T))
    ent = np.zeros((B, T))
    for i in range(B):
        nll[i, scored[i]] = res["token_loss"][i]
        ent[i, scored[i]] = res["token_entropy"][i]
    return nll, ent, mask, att


# ---------------------------------------------------------------- offline mode

def write_masks(rows: list[dict], out: Path, model_name: str, cfg: QTuningConfig,
                max_tokens: int = 512, device: str | None = None) -> dict:
    """Offline approximation (§2.1): score every row once with the base model, apply the
    quadrant rule globally (all rows as one batch), and write one JSONL line per row:
    {id, keep, quadrant, ppl, entropy, input_ids, keep_mask}. `keep_mask[t]` = 1 where token t
    keeps its loss (chat.encode layout); dropped rows have an all-zero mask. `thresher train
    --token-masks FILE` applies them. Not the published (dynamic) method."""
    import torch
    from thresher.pipeline.models.chat import encode
    from thresher.pipeline.models.resolve import (
        load_causal_lm,
        load_tokenizer,
        pick_device,
        resolve,
    )

    resolved = resolve(model_name)
    tok = load_tokenizer(resolved)
    model = load_causal_lm(resolved, pick_device(device), dtype=torch.float32)
    encs = [encode(tok, r, max_tokens) for r in rows]
    empty = [r["id"] for r, e in zip(rows, encs) if not e.loss_mask.any()]
    if empty:
        raise ValueError(f"{len(empty)} rows have no response tokens within {max_tokens} tokens "
                         f"(e.g. {empty[:3]}); raise --max-tokens or drop them")
    nll, ent, mask, att = score_tokens(model, tok, encs, cfg.entropy_over)
    ppl, ent_s = sample_scores(nll, ent, mask, att, cfg.entropy_over)
    res = prune_batch(nll, ent, mask, att, cfg)
    from thresher.pipeline.artifacts import atomic_path

    with atomic_path(Path(out)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i, (r, e) in enumerate(zip(rows, encs)):
            n = len(e.input_ids)
            f.write(json.dumps({
                "id": r["id"], "keep": bool(res.keep[i]), "quadrant": int(res.quadrant[i]),
                "ppl": float(ppl[i]), "entropy": float(ent_s[i]),
                "input_ids": e.input_ids.tolist(),
                "keep_mask": res.loss_mask[i, :n].astype(int).tolist()}) + "\n")
    return {"rows": len(rows), "model": resolved.identity, "config": asdict(cfg), **res.report}


def read_masks(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """id -> (input_ids, keep_mask) from a file written by `write_masks`."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out[rec["id"]] = (np.asarray(rec["input_ids"], dtype=np.int64),
                                  np.asarray(rec["keep_mask"], dtype=bool))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path} line {lineno}: not a Q-Tuning mask record ({e})") from None
    return out

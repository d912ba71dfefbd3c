"""Evaluation of a model on held-out rows: held-out loss over the response tokens and, where the
reference carries a final answer (GSM8K's `#### N`), exact match of greedy generations.

    evaluate(model, tok, {"gsm8k": rows}, max_tokens=512, max_new_tokens=256)
    # {"gsm8k": {"rows", "loss", "ppl", "tokens", "exact_match", "answered", ...}}

The prediction is the number after the generation's last `####`, else its last number.
"""

from __future__ import annotations

import math
import re
import time

import numpy as np
from thresher.pipeline.models.chat import prompt_text

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


# ---------------------------------------------------------------- answers

def _number(text: str) -> str | None:
    """A number string normalised for comparison: no commas, no trailing zeros after a point."""
    text = text.replace(",", "").strip().rstrip(".")
    try:
        v = float(text)
    except ValueError:
        return None
    return str(int(v)) if v == int(v) else repr(v)


def reference_answer(text: str) -> str | None:
    """GSM8K: the number after `####` in the reference solution, else None (no final answer)."""
    if "####" not in text:
        return None
    m = NUMBER.search(text.rsplit("####", 1)[1])
    return _number(m.group()) if m else None


def predicted_answer(text: str) -> str | None:
    """The number after the last `####` of a generation, else its last number."""
    if "####" in text:
        m = NUMBER.search(text.rsplit("####", 1)[1])
        if m:
            return _number(m.group())
    found = NUMBER.findall(text)
    return _number(found[-1]) if found else None


def _reference(row: dict) -> str | None:
    if row["kind"] != "chat":
        return None
    last = [m["content"] for m in row["messages"] if m["role"] == "assistant"][-1]
    return reference_answer(last)


# ---------------------------------------------------------------- evaluation

def heldout_loss(model, tok, rows: list[dict], max_tokens: int) -> dict:
    """Response-only NLL, token-weighted over rows, through the fused forward engine."""
    from thresher.pipeline.models.engine import run_forward

    out = run_forward(model, tok, rows, {"loss"}, max_tokens=max_tokens)
    n = out["n_loss_tokens"].astype(np.float64)
    ok = n > 0
    if not ok.any():
        raise ValueError(f"no eval row has a response token within {max_tokens} tokens")
    loss = float((out["loss"][ok] * n[ok]).sum() / n[ok].sum())
    return {"loss": loss, "ppl": math.exp(loss), "rows": int(ok.sum()), "tokens": int(n.sum()),
            "rows_without_response_tokens": int((~ok).sum()),
            "row_loss": [float(v) if k else None for v, k in zip(out["loss"], ok)],
            "row_tokens": n.astype(int).tolist()}


def exact_match(model, tok, rows: list[dict], max_new_tokens: int, batch_size: int = 8) -> dict | None:
    """Greedy-generation accuracy on the rows whose reference has a final answer (None if none)."""
    import torch

    items = [(r, _reference(r)) for r in rows]
    items = [(r, a) for r, a in items if a is not None]
    if not items or max_new_tokens <= 0:
        return None
    device = next(model.parameters()).device
    stop = [t for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
            if isinstance(t, int) and t != tok.unk_token_id]
    side = tok.padding_side
    tok.padding_side = "left"
    correct, samples, row_correct = 0, [], []
    try:
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            prompts = [prompt_text(tok, r["messages"]) for r, _ in chunk]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=stop or None)
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for (r, ref), text in zip(chunk, texts):
                pred = predicted_answer(text)
                correct += pred == ref
                row_correct.append(int(pred == ref))
                if len(samples) < 3:
                    samples.append({"id": r["id"], "reference": ref, "predicted": pred,
                                    "generation": text[-300:]})
    finally:
        tok.padding_side = side
    return {"exact_match": correct / len(items), "correct": correct, "n": len(items),
            "max_new_tokens": max_new_tokens, "samples": samples, "row_correct": row_correct}


def evaluate(model, tok, evals: dict[str, list[dict]], max_tokens: int,
             max_new_tokens: int) -> dict:
    out = {}
    for name, rows in evals.items():
        t0 = time.perf_counter()
        res = heldout_loss(model, tok, rows, max_tokens)
        em = exact_match(model, tok, rows, max_new_tokens)
        if em is not None:
            res.update(em)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        out[name] = res
    return out

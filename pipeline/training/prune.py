"""Pruning a causal LM, to make the degraded model that PASER selects recovery data for.

    info = prune_model("smollm2-135m-instruct", ratio=0.25, out="out/smollm2-p25")           # structured
    info = prune_model("smollm2-135m-instruct", 0.5, "out/wanda50", method="wanda", calib=rows)

Methods (`ratio` is the fraction removed):
  structured  MLP channels by magnitude, LLM-Pruner-like (Ma et al. 2023, its "L2 / vector"
              importance without gradients): channel i of a gated MLP is the group
              (gate_proj row i, up_proj row i, down_proj column i); its importance is the L2 norm of
              the group's weights; every layer keeps the same number of channels, round(I(1-R)), so
              the model is a plain smaller model (config.intermediate_size shrinks) that
              `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads with no extra code.
  magnitude   unstructured: in every linear layer of the decoder blocks, the fraction R of weights
              with the smallest |W| in each output row are set to zero (the matrices stay dense).
  wanda       unstructured, Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, X_j = input feature j
              of that layer over the calibration tokens (a few pool rows, hooks on each linear);
              the smallest fraction R in each output row is zeroed.

Deviations from LLM-Pruner, stated here and in docs/paser.md: importance is weight magnitude only (no
first-order Taylor term, so no calibration backward pass); all layers are pruned uniformly
(LLM-Pruner skips the first and last blocks) because a Hugging Face config carries one
intermediate_size; attention heads are not pruned. Embeddings and the LM head are never pruned.

The output directory gets the model, its tokenizer and `prune.json` (source model, method, ratio,
parameter counts, calibration rows), which `thresher select --method paser` reads to find the
original model when --model is not given.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from thresher.pipeline.artifacts import atomic_path

log = logging.getLogger(__name__)

METHODS = ("structured", "magnitude", "wanda")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INFO = "prune.json"


def gated_mlps(model) -> list:
    """The MLP module of every decoder layer (LLaMA / Mistral / Qwen shape: gate, up, down)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no model.layers; structured pruning supports "
                         "LLaMA-style decoders")
    mlps = [getattr(layer, "mlp", None) for layer in layers]
    if not all(m is not None and all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
               for m in mlps):
        raise ValueError(f"{type(model).__name__}: MLPs are not gate/up/down projections; "
                         "use --method magnitude or wanda")
    return mlps


def channel_importance(mlp):
    """L2 norm of each intermediate channel's weight group (gate row, up row, down column)."""
    sq = (mlp.gate_proj.weight.float() ** 2).sum(1) + (mlp.up_proj.weight.float() ** 2).sum(1)
    sq = sq + (mlp.down_proj.weight.float() ** 2).sum(0)
    return sq.sqrt()


def _sliced(linear, keep, dim: int):
    import torch

    w = linear.weight.detach().index_select(dim, keep).clone()
    bias = linear.bias is not None
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if bias:
        b = linear.bias.detach()
        new.bias.data.copy_(b.index_select(0, keep) if dim == 0 else b)
    return new


def prune_mlp_channels(model, ratio: float) -> dict:
    """Remove the fraction `ratio` of MLP channels (lowest group L2 norm) from every layer, in place."""
    import torch

    mlps = gated_mlps(model)
    size = mlps[0].gate_proj.out_features
    n_keep = max(1, round(size * (1.0 - ratio)))
    for mlp in mlps:
        imp = channel_importance(mlp)
        keep = torch.sort(torch.topk(imp, n_keep).indices).values
        mlp.gate_proj = _sliced(mlp.gate_proj, keep, 0)
        mlp.up_proj = _sliced(mlp.up_proj, keep, 0)
        mlp.down_proj = _sliced(mlp.down_proj, keep, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = n_keep
    model.config.intermediate_size = n_keep
    return {"intermediate_size": [size, n_keep]}


def decoder_linears(model) -> dict:
    """name -> nn.Linear for the projections inside the decoder blocks (no embeddings, no head)."""
    import torch

    out = {name: mod for name, mod in model.named_modules()
           if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR_NAMES}
    if not out:
        raise ValueError(f"{type(model).__name__}: no decoder projections named {LINEAR_NAMES}")
    return out


def input_norms(model, tok, rows: list[dict], max_tokens: int = 512) -> tuple[dict, int]:
    """||X_j||_2 per input feature of every decoder linear over the calibration rows' tokens."""
    import torch
    from thresher.pipeline.models.chat import encode

    linears = decoder_linears(model)
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}

    def hook(name):
        def fn(_mod, args, _out):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] += (x ** 2).sum(0).cpu()
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    tokens = 0
    try:
        with torch.inference_mode():
            for r in rows:                  # one row at a time: no padding tokens in the norms
                ids = torch.from_numpy(encode(tok, r, max_tokens).input_ids)[None]
                model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
                tokens += ids.shape[1]
    finally:
        for h in handles:
            h.remove()
    return {n: s.sqrt() for n, s in sums.items()}, tokens


def prune_unstructured(model, ratio: float, norms: dict | None = None) -> dict:
    """Zero the fraction `ratio` of each output row's weights with the lowest |W| (x ||X_j||), in place."""
    import torch

    zeroed = total = 0
    for name, lin in decoder_linears(model).items():
        w = lin.weight.data
        score = w.abs().float()
        if norms is not None:
            score = score * norms[name].to(score.device, score.dtype)[None, :]
        k = int(w.shape[1] * ratio)
        if k == 0:
            total += w.numel()
            continue
        idx = torch.topk(score, k, dim=1, largest=False).indices
        w.scatter_(1, idx, 0.0)
        zeroed += idx.numel()
        total += w.numel()
    return {"zeroed_weights": zeroed, "prunable_weights": total}


def _counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return total, nonzero


def check_out(out: Path, source: Path | None, calib_source: str | None = None) -> None:
    """The output guard for a new model directory: empty or new, never the model or the
    calibration data, never inside a pool or a work directory's cache."""
    from thresher.pipeline.io.guard import check_outputs

    if source is not None and out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the model being pruned")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out (nothing is overwritten)")
    inputs = [p for p in (source, Path(calib_source) if calib_source else None) if p is not None]
    check_outputs([], inputs, [out])


def prune_model(model: str, ratio: float, out: Path | str, method: str = "structured",
                calib: list[dict] | None = None, calib_source: str | None = None,
                max_tokens: int = 512) -> dict:
    """Prune `model` (anything `models.resolve` accepts) and save a loadable HF directory at `out`."""
    import torch
    from thresher.pipeline.models.resolve import load_causal_lm, load_tokenizer, resolve

    if method not in METHODS:
        raise ValueError(f"unknown prune method {method!r}; expected one of {', '.join(METHODS)}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"--ratio must be in (0, 1), got {ratio}")
    if method == "wanda" and not calib:
        raise ValueError("wanda needs calibration rows: pass --calib POOL_OR_FILE")
    out = Path(out)
    resolved = resolve(model)
    check_out(out, None if resolved.remote else Path(resolved.path), calib_source)
    t0 = time.perf_counter()
    tok = load_tokenizer(resolved)
    lm = load_causal_lm(resolved, "cpu", torch.float32)
    before = _counts(lm)
    info: dict = {"source": model, "source_identity": resolved.identity, "method": method,
                  "ratio": ratio}
    if method == "structured":
        info.update(prune_mlp_channels(lm, ratio))
    else:
        norms = None
        if method == "wanda":
            norms, n_tok = input_norms(lm, tok, calib, max_tokens)
            info["calibration"] = {"source": calib_source, "rows": len(calib), "tokens": n_tok}
        info.update(prune_unstructured(lm, ratio, norms))
    after = _counts(lm)
    info.update({"params_before": before[0], "params_after": after[0],
                 "nonzero_before": before[1], "nonzero_after": after[1],
                 "seconds": round(time.perf_counter() - t0, 2)})
    with atomic_path(out) as tmp:
        lm.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
    log.info("pruned %s (%s, %.2f) -> %s", model, method, ratio, out)
    return info


def prune_info(model_dir: str | Path) -> dict | None:
    """The `prune.json` a pruned directory carries (None for a model pruned elsewhere)."""
    p = Path(model_dir) / INFO
    return json.loads(p.read_text()) if p.is_file() else None

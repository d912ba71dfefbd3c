"""Per-sample gradients over a chosen parameter subset, Hessian-vector products and the LiSSA
inverse-Hessian-vector estimate: the shared math of GraNd, DEALRec and (later) LESS features.

    params = select_params(model, "lora")                         # or fnmatch patterns, "{last}"
    for idx, g in iter_grads(model, encoded, params):            # idx: positions in `encoded`
        flat = flatten(g)                                         # [B, P] float32, params order
    norms = grad_norms(model, encoded, params)                    # float64 [N]
    u = lissa(lambda h, i: hvp(model, [encoded[j] for j in i], params, h), v, n=len(encoded))

The loss of one sample is its mean token cross-entropy over the loss tokens (`chat.encode`'s
mask: the response by default), the trainer's loss (`train.masked_loss`) for a batch of one.

Three ways to the same per-sample gradients (`how`):
- "packed" (the default where it applies, `packed_grads.py`): rows packed into unpadded
  sequences, one forward and one backward per pack, each row's gradient of a Linear layer formed
  from the inputs and output gradients the layer saw on that row's tokens (LoRA A/B matrices
  are Linear layers). Optional bf16 autocast (`dtype="bf16"`); float32 otherwise.
- "vmap": `torch.func`'s `vmap(grad(loss))` over `functional_call` with only the chosen
  parameters as inputs, so the rest of the model is a constant. Rows are right-padded within a
  length batch and run *without* an attention mask: under a causal mask a real position never
  attends to a later (padding) position, and padding positions carry no loss, so each sample's
  gradient is exactly its unpadded one (HF's mask construction branches on tensor values, which
  vmap cannot trace). The fallback for parameters that are not Linear weights (embeddings, a
  tied LM head).
- "loop": the reference, one forward and backward call per sample (also the fallback when vmap
  cannot trace a model).
In the vmap and loop ways the LM head runs only on the positions that predict a loss token
(gathered with a fixed-size index, padded with weight-0 entries), as in the forward engine.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
from thresher.pipeline.models.batching import length_batches
from thresher.pipeline.models.chat import Encoded
from thresher.pipeline.models.engine import _body_and_head

log = logging.getLogger(__name__)

DEFAULT_GRAD_TOKENS = 2048      # tokens per batch (vmap: padded, its activations of B samples at
                                # once; packed: real tokens of one packed sequence)
How = Literal["auto", "packed", "vmap", "loop"]


# ---------------------------------------------------------------- parameters

def last_layer(model) -> int:
    """Index of the last decoder layer (from parameter names `...layers.<i>....`)."""
    found = [int(n.split("layers.")[1].split(".")[0]) for n, _ in model.named_parameters()
             if "layers." in n and n.split("layers.")[1].split(".")[0].isdigit()]
    if not found:
        raise ValueError("model has no `layers.<i>` parameters; name the parameters explicitly")
    return max(found)


def select_params(model, spec: str | Sequence[str] = "lora") -> dict:
    """{name: parameter} for a subset, in the model's parameter order.

    `spec`: "lora" (every LoRA A/B matrix), "all", or fnmatch patterns over parameter names
    (a comma-separated string or a list) where `{last}` stands for the last decoder layer's
    index, e.g. "*layers.{last}.self_attn.o_proj.lora_B*". No match is an error."""
    names = [n for n, _ in model.named_parameters()]
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    spec = list(spec)
    if spec == ["lora"]:
        spec = ["*lora_A*", "*lora_B*"]
    elif spec == ["all"]:
        spec = ["*"]
    if any("{last}" in s for s in spec):
        spec = [s.replace("{last}", str(last_layer(model))) for s in spec]
    chosen = {n: p for n, p in model.named_parameters() if any(fnmatch.fnmatchcase(n, s) for s in spec)}
    if not chosen:
        raise ValueError(f"no model parameter matches {spec}; e.g. {names[:3]} ... {names[-2:]}")
    return chosen


def n_params(params: dict) -> int:
    return int(sum(p.numel() for p in params.values()))


@contextlib.contextmanager
def only_grad(model, params: dict):
    """Within the block exactly `params` require grad (the model's flags are restored after)."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    chosen = {id(p) for p in params.values()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


def flatten(grads: dict):
    """[B, P] float32: every parameter's per-sample gradient flattened, in dict order."""
    import torch

    return torch.cat([g.reshape(g.shape[0], -1).float() for g in grads.values()], dim=1)


# ---------------------------------------------------------------- the per-sample loss

def _loss_module(model):
    """A module whose forward(ids [T], pos [K], y [K], w [K]) is one sample's mean loss; its
    parameter names are the model's prefixed with `model.`."""
    import torch
    import torch.nn.functional as F

    parts = _body_and_head(model)

    class SampleLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, pos, y, w):
            if parts is not None:
                body, head = parts
                hidden = body(input_ids=ids[None], use_cache=False).last_hidden_state[0]
                logits = head(hidden.index_select(0, pos))
            else:
                logits = self.model(input_ids=ids[None], use_cache=False).logits[0].index_select(0, pos)
            nll = F.cross_entropy(logits.float(), y, reduction="none")
            return (nll * w).sum() / w.sum().clamp_min(1.0)

    return SampleLoss()


def _pad(encoded: list[Encoded], device):
    """ids [B, T] right-padded; pos/y/w [B, K]: the positions predicting each loss token, the
    targets and weights (0 on padding entries)."""
    import torch

    T = max(len(e.input_ids) for e in encoded)
    K = max(1, max(int(e.loss_mask[1:].sum()) for e in encoded))
    ids = np.zeros((len(encoded), T), dtype=np.int64)
    pos = np.zeros((len(encoded), K), dtype=np.int64)
    y = np.zeros((len(encoded), K), dtype=np.int64)
    w = np.zeros((len(encoded), K), dtype=np.float32)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = e.input_ids
        t = np.flatnonzero(e.loss_mask[1:])        # hidden state t predicts token t + 1
        pos[i, :len(t)], y[i, :len(t)], w[i, :len(t)] = t, e.input_ids[t + 1], 1.0
    as_t = lambda a: torch.from_numpy(a).to(device)
    return as_t(ids), as_t(pos), as_t(y), as_t(w)


def _grads_vmap(module, names, params, batch):
    from torch.func import functional_call, grad, vmap

    def f(p, ids, pos, y, w):
        return functional_call(module, p, (ids, pos, y, w))

    inputs = {"model." + n: p.detach() for n, p in params.items()}
    g = vmap(grad(f), in_dims=(None, 0, 0, 0, 0))(inputs, *batch)
    return {n: g["model." + n] for n in names}


def _grads_loop(module, names, params, batch):
    import torch

    ids, pos, y, w = batch
    out = {n: [] for n in names}
    plist = [params[n] for n in names]
    for i in range(ids.shape[0]):
        k = int((w[i] > 0).sum()) or 1
        n_tok = int(pos[i, :k].max()) + 2 if (w[i] > 0).any() else ids.shape[1]
        loss = module(ids[i, :n_tok], pos[i, :k], y[i, :k], w[i, :k])
        for n, g in zip(names, torch.autograd.grad(loss, plist, allow_unused=True)):
            out[n].append(torch.zeros_like(params[n]) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def _vmap_untraceable(err: RuntimeError) -> bool:
    return "vmap" in str(err) or "functorch" in str(err) or "Batching rule" in str(err)


def _autocast_dtype(dtype):
    """None (float32) or torch.bfloat16 from "bf16" / "fp32" / None / a torch dtype."""
    import torch

    if dtype in (None, "fp32", torch.float32):
        return None
    if dtype in ("bf16", torch.bfloat16):
        return torch.bfloat16
    raise ValueError(f"per-sample gradient dtype must be bf16 or fp32, got {dtype!r}")


def resolve_how(model, params: dict, how: How = "auto") -> str:
    """The way `iter_grads` takes: "auto" is "packed" where it applies, else "vmap"."""
    from thresher.pipeline.models import packed_grads

    if how not in ("auto", "packed", "vmap", "loop"):
        raise ValueError(f"how must be auto, packed, vmap or loop, got {how!r}")
    if how == "auto":
        return "packed" if packed_grads.supported(model, params) else "vmap"
    return how


def iter_grads(model, encoded: list[Encoded], params: dict, how: How = "auto",
               batch_tokens: int = DEFAULT_GRAD_TOKENS, dtype=None,
               workers: int | None = None) -> Iterator[tuple[np.ndarray, dict]]:
    """Per-sample gradients in batches: yields (indices into `encoded`, {name: [B, ...]}).

    The model runs in eval mode (no dropout) and its mode is restored; only `params` are
    differentiated. Rows with no loss token get a zero gradient. `how="auto"` packs rows
    (`packed_grads.py`) when every parameter is a Linear layer's, else uses vmap, which falls
    back to the one-sample loop (with a warning) when it cannot trace the model. `dtype`
    ("bf16" or "fp32"/None) is the packed forward's autocast; vmap and loop run in float32.
    `workers` (packed only; default: torch's intra-op threads on a CPU, else 1) runs that many
    packs at once, each on its share of the threads."""
    how = resolve_how(model, params, how)
    if how == "packed":
        from thresher.pipeline.models.packed_grads import iter_packed_grads

        device = next(model.parameters()).device
        if workers is None:
            import torch

            workers = torch.get_num_threads() if device.type == "cpu" else 1
        yield from iter_packed_grads(model, encoded, params, batch_tokens,
                                     _autocast_dtype(dtype), workers)
        return
    yield from _iter_padded(model, encoded, params, how, batch_tokens)


def _iter_padded(model, encoded, params, how, batch_tokens):
    names = list(params)
    module = _loss_module(model)
    device = next(model.parameters()).device
    lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    was_training = model.training
    model.eval()
    mode = how
    try:
        with only_grad(model, params):
            for batch_idx in length_batches(lengths, batch_tokens):
                batch = _pad([encoded[i] for i in batch_idx], device)
                if mode == "vmap":
                    try:
                        g = _grads_vmap(module, names, params, batch)
                    except RuntimeError as err:
                        if how == "vmap" or not _vmap_untraceable(err):
                            raise
                        log.warning("per-sample gradients: vmap cannot trace this model (%s); "
                                    "using one backward call per sample", str(err).splitlines()[0])
                        mode = "loop"
                if mode == "loop":
                    g = _grads_loop(module, names, params, batch)
                yield batch_idx, {n: t.detach() for n, t in g.items()}
    finally:
        model.train(was_training)


def grad_norms(model, encoded: list[Encoded], params: dict, how: How = "auto",
               batch_tokens: int = DEFAULT_GRAD_TOKENS, progress=None, dtype=None) -> np.ndarray:
    """||grad_params loss(x_i)||_2 for every row (GraNd; DEALRec's effort score), float64 [N]."""
    out = np.zeros(len(encoded), dtype=np.float64)
    for idx, g in iter_grads(model, encoded, params, how, batch_tokens, dtype):
        out[idx] = flatten(g).norm(dim=1).double().cpu().numpy()
        if progress is not None:
            progress(len(idx))
    return out


def sum_grad(model, encoded: list[Encoded], params: dict, how: How = "auto",
             batch_tokens: int = DEFAULT_GRAD_TOKENS, dtype=None):
    """sum_i grad loss(x_i), flat [P] float32 (DEALRec's v is the pool's sum over its count)."""
    total = None
    for _, g in iter_grads(model, encoded, params, how, batch_tokens, dtype):
        s = flatten(g).sum(0)
        total = s if total is None else total + s
    return total


def mean_grad(model, encoded: list[Encoded], params: dict, how: How = "auto",
              batch_tokens: int = DEFAULT_GRAD_TOKENS):
    """(1/n) sum_i grad loss(x_i), flat [P] float32 (DEALRec's v)."""
    return sum_grad(model, encoded, params, how, batch_tokens) / len(encoded)


def grad_dots(model, encoded: list[Encoded], params: dict, u, how: How = "auto",
              batch_tokens: int = DEFAULT_GRAD_TOKENS, progress=None, dtype=None) -> np.ndarray:
    """u . grad loss(x_i) for every row (DEALRec's influence score), float64 [N]."""
    out = np.zeros(len(encoded), dtype=np.float64)
    for idx, g in iter_grads(model, encoded, params, how, batch_tokens, dtype):
        out[idx] = (flatten(g) @ u.float()).double().cpu().numpy()
        if progress is not None:
            progress(len(idx))
    return out


# ---------------------------------------------------------------- Hessian-vector products

def hvp(model, encoded: list[Encoded], params: dict, vec):
    """H v for the mean loss of `encoded` (flat `vec` [P]; double backward), flat float32 [P]."""
    import torch

    names = list(params)
    module = _loss_module(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with only_grad(model, params), torch.enable_grad():
            ids, pos, y, w = _pad(encoded, device)
            loss = 0.0
            for i in range(ids.shape[0]):
                k = max(1, int((w[i] > 0).sum()))
                loss = loss + module(ids[i], pos[i, :k], y[i, :k], w[i, :k])
            loss = loss / ids.shape[0]
            plist = [params[n] for n in names]
            g = torch.autograd.grad(loss, plist, create_graph=True)
            flat_g = torch.cat([t.reshape(-1) for t in g])
            hv = torch.autograd.grad(flat_g @ vec.to(flat_g), plist)
            return torch.cat([t.reshape(-1) for t in hv]).detach().float()
    finally:
        model.train(was_training)


def lissa(hvp_fn: Callable, v, n: int, depth: int = 5000, damp: float = 0.01, scale: float = 25.0,
          batch: int = 1, seed: int = 0, progress=None):
    """Stochastic inverse-Hessian-vector estimate (DEALRec Alg. 1 / Koh & Liang's LiSSA):

        h_0 = v;  h_t = v + (1 - damp) h_{t-1} - H_{s_t} h_{t-1} / scale,  s_t ~ Uniform(n)

    `hvp_fn(h, indices)` returns the HVP of the mean loss over those samples. The fixed point is
    h = scale (H + damp*scale I)^{-1} v; this returns h / scale, an estimate of
    (H + damp*scale I)^{-1} v (the released DEALRec code keeps h: a constant factor that the
    min-max normalisation removes). Diverging iterates (|h| growing without bound: H has
    eigenvalues above ~2*scale or below -damp*scale) raise a ValueError asking for a larger scale."""
    import torch

    if depth < 1 or batch < 1 or scale <= 0 or not 0 <= damp < 1:
        raise ValueError(f"lissa: need depth >= 1, batch >= 1, scale > 0, 0 <= damp < 1; got "
                         f"depth={depth}, batch={batch}, scale={scale}, damp={damp}")
    rng = np.random.default_rng(seed)
    h = v.clone()
    limit = 1e6 * max(float(v.norm()), 1e-12)
    for t in range(depth):
        idx = rng.integers(0, n, size=batch)
        h = v + (1.0 - damp) * h - hvp_fn(h, idx) / scale
        if not torch.isfinite(h).all() or float(h.norm()) > limit:
            raise ValueError(f"LiSSA diverged at step {t + 1} (|h| = {float(h.norm()):.3g}); "
                             "raise --param scale (the Hessian's top eigenvalue must stay below ~2*scale)")
        if progress is not None:
            progress(1)
    return h / scale

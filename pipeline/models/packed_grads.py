"""Per-sample gradients of Linear layers from one packed forward and backward (no vmap).

For a Linear layer y_t = W x_t + b applied at every token t, the gradient of a loss L is

    dL/dW = sum_t d_t x_t^T,    dL/db = sum_t d_t,    d_t = dL/dy_t.

Rows are packed back to back into one unpadded sequence (`batching.pack_rows`), position ids
restarting at every row and attention kept inside each row (`packed_attention.py`), and
L = sum_r L_r with L_r row r's mean loss over its loss tokens. Nothing crosses a row boundary,
so at a token t of row r, d_t = dL_r/dy_t, and row r's own gradient is the sum over its segment
alone: grad_W L_r = sum_{t in r} d_t x_t^T. A forward hook on each chosen Linear saves its input
x and hooks its output's gradient d; after one backward call every row's gradient is one small
[out, T_r] x [T_r, in] product per layer.

LoRA (peft: y = W0 x + s * B(A(dropout(x)))) is two Linear modules, lora_A on x and lora_B on
A x, whose output gradients the hooks see as B^T (s d) and s d (d: the wrapped layer's output
gradient). So grad B = s sum_t d_t (A x_t)^T and grad A = s sum_t (B^T d_t) x_t^T per row, with
LoRA's scaling s = alpha / r already in the captured gradients; dropout is off (eval mode).

The backward pass computes no weight gradient at all: every parameter is frozen for the call,
and the input embeddings are the one leaf that asks for a gradient (what makes autograd run
through the layers; their gradient is discarded). Forward in bf16 autocast when asked (`dtype`);
captured tensors are multiplied out in float32.

Supported: the chosen parameters are weights (and biases) of `torch.nn.Linear` modules, each
parameter used by one module, inside a decoder the engine can pack (`engine.packing_supported`).
`supported()` says whether a model and parameter set qualify; `grads.iter_grads` falls back to
vmap otherwise.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from thresher.pipeline.models.batching import pack_rows
from thresher.pipeline.models.chat import Encoded
from thresher.pipeline.models.engine import _body_and_head, packing_supported
from thresher.pipeline.models.packed_attention import PackedGradAttention

_active = threading.local()      # the capture of the forward pass running in this thread
GROUP_PACKS = 8                  # packs per worker computed between two handovers to the caller


@dataclass
class _Target:
    """One hooked Linear module: which of its parameters are wanted, under which names."""

    module: object
    weight: str | None = None     # parameter name of the weight, when chosen
    bias: str | None = None       # ... of the bias


@dataclass
class _Capture:
    """What one packed forward + backward saw: per hooked module its input and output gradient."""

    x: dict = field(default_factory=dict)
    d: dict = field(default_factory=dict)


def _targets(model, params: dict) -> dict[int, _Target] | None:
    """{id(module): _Target} for the chosen parameters, or None when one is not a Linear's own
    weight or bias (or is shared by several modules, e.g. a tied LM head)."""
    import torch

    owners: dict[int, list] = {}
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod, pname))
    out: dict[int, _Target] = {}
    for name, p in params.items():
        found = owners.get(id(p), [])
        if len(found) != 1:
            return None
        mod, pname = found[0]
        if not isinstance(mod, torch.nn.Linear) or pname not in ("weight", "bias"):
            return None
        t = out.setdefault(id(mod), _Target(mod))
        setattr(t, pname, name)
    return out


def supported(model, params: dict) -> bool:
    """True when `iter_packed_grads` can take these parameters' per-sample gradients."""
    parts = _body_and_head(model)
    return (parts is not None and packing_supported(parts[0])
            and _targets(model, params) is not None)


@contextlib.contextmanager
def _hooks(targets: dict[int, _Target]):
    """Forward hooks on the target modules, recording into this thread's active capture."""

    def hook(mod, inputs, output):
        cap = getattr(_active, "cap", None)
        if cap is None or not output.requires_grad:
            return
        key = id(mod)
        cap.x[key] = inputs[0].detach()
        output.register_hook(lambda g: cap.d.__setitem__(key, g.detach()))

    handles = [t.module.register_forward_hook(hook) for t in targets.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _frozen(model):
    """Every parameter frozen within the block (flags restored after): the backward pass then
    computes activation gradients only."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _cast_linears(body, dtype):
    """The decoder body's Linear weights held in `dtype` within the block (the float32 tensors
    restored after): under autocast every layer would otherwise cast its float32 weight again at
    every call, since autocast caches casts only of weights that require grad. Norms, embeddings
    and the LM head keep their dtype (the residual stream stays float32, as under autocast)."""
    import torch

    if dtype is None:
        yield
        return
    saved = []
    try:
        for mod in body.modules():
            if isinstance(mod, torch.nn.Linear) and mod.weight.dtype != dtype:
                saved.append((mod.weight, mod.weight.data))
                mod.weight.data = mod.weight.data.to(dtype)
        yield
    finally:
        for p, data in saved:
            p.data = data


def _pack_loss(body, head, ids, loss_mask, lengths, autocast_dtype):
    """sum over rows of each row's mean loss over its loss tokens, for one packed sequence
    (ids / loss_mask [T], a row's first token already unmasked); also the loss-token bounds."""
    import torch
    import torch.nn.functional as F

    bounds = np.concatenate([[0], np.cumsum(lengths)])
    starts = torch.from_numpy(np.repeat(bounds[:-1], lengths)).to(ids.device)
    pos = torch.arange(len(ids), device=ids.device) - starts
    emb = body.get_input_embeddings()(ids).detach().requires_grad_(True)
    ctx = (torch.autocast(ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        hidden = body(inputs_embeds=emb[None], position_ids=pos[None], use_cache=False,
                      thresher_bounds=bounds.tolist()).last_hidden_state[0]
        sel = loss_mask[1:]                       # hidden state t predicts token t + 1
        logits = head(hidden[:-1][sel])
    nll = F.cross_entropy(logits.float(), ids[1:][sel], reduction="none")
    counts = np.add.reduceat(loss_mask.cpu().numpy().astype(np.int64), bounds[:-1]) \
        if len(lengths) else np.zeros(0, np.int64)
    weight = torch.from_numpy(np.repeat(1.0 / np.maximum(counts, 1), counts)).to(nll)
    loss_bounds = np.concatenate([[0], np.cumsum(counts)])
    return (nll * weight).sum(), emb, bounds, loss_bounds


def _row_grads(targets, cap: _Capture, bounds, loss_bounds, n_rows: int) -> dict:
    """{param name: [n_rows, *shape] float32}: each row's segment sum of d_t x_t^T (and d_t)."""
    import torch

    out: dict = {}
    n_tokens, n_loss = int(bounds[-1]), int(loss_bounds[-1])
    as_float = {}          # q, k and v's LoRA A matrices see the same input: convert it once

    def flat(t):
        key = (t.data_ptr(), tuple(t.shape))
        if key not in as_float:
            as_float[key] = t.reshape(-1, t.shape[-1]).float()
        return as_float[key]

    for key, t in targets.items():
        w = t.module.weight
        gw = torch.zeros((n_rows, *w.shape), dtype=torch.float32, device=w.device) \
            if t.weight is not None else None
        gb = torch.zeros((n_rows, w.shape[0]), dtype=torch.float32, device=w.device) \
            if t.bias is not None else None
        if key in cap.d:                          # else its output never reached the loss
            x, d = flat(cap.x[key]), cap.d[key].reshape(-1, cap.d[key].shape[-1]).float()
            if len(x) not in (n_tokens, n_loss) or len(d) != len(x):
                raise RuntimeError(f"packed per-sample gradients: a hooked layer saw {len(x)} "
                                   f"positions, neither the pack's {n_tokens} tokens nor its "
                                   f"{n_loss} loss positions")
            seg = bounds if len(x) == n_tokens else loss_bounds
            for r in range(n_rows):
                s, e = int(seg[r]), int(seg[r + 1])
                if e > s and gw is not None:
                    torch.mm(d[s:e].T, x[s:e], out=gw[r])
                if e > s and gb is not None:
                    torch.sum(d[s:e], dim=0, out=gb[r])
        if gw is not None:
            out[t.weight] = gw
        if gb is not None:
            out[t.bias] = gb
    return out


def pack_grads(model, encoded: list[Encoded], params: dict, rows, autocast_dtype=None,
               targets=None) -> dict:
    """{name: [len(rows), *shape] float32}: per-sample gradients of `params` for the rows
    `rows` of `encoded`, packed into one sequence (the caller holds eval mode)."""
    import torch

    body, head = _body_and_head(model)
    targets = targets if targets is not None else _targets(model, params)
    device = next(model.parameters()).device
    lengths = np.array([len(encoded[i].input_ids) for i in rows], dtype=np.int64)
    ids = torch.from_numpy(np.concatenate([encoded[i].input_ids for i in rows])).to(device)
    mask = np.concatenate([encoded[i].loss_mask for i in rows])
    mask[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = False      # a row's first token
    cap = _Capture()
    _active.cap = cap
    try:
        with torch.enable_grad():
            loss, emb, bounds, loss_bounds = _pack_loss(
                body, head, ids, torch.from_numpy(mask).to(device), lengths, autocast_dtype)
            _active.cap = None
            if loss.requires_grad:
                torch.autograd.grad(loss, emb)
    finally:
        _active.cap = None
    return _row_grads(targets, cap, bounds, loss_bounds, len(rows))


def iter_packed_grads(model, encoded: list[Encoded], params: dict, batch_tokens: int,
                      autocast_dtype=None, workers: int = 1) -> Iterator[tuple[np.ndarray, dict]]:
    """Per-sample gradients in packs of at most `batch_tokens` tokens: yields (indices into
    `encoded`, {name: [B, *shape] float32}), as `grads.iter_grads` does. `workers` > 1 runs
    that many packs at once on Python threads of one intra-op thread each (as the forward
    engine does on a CPU). The model runs in eval mode; its mode and flags are restored."""

    targets = _targets(model, params)
    if targets is None:
        raise ValueError("packed per-sample gradients need Linear weights or biases used by one "
                         "module each; use how='vmap'")
    body, _ = _body_and_head(model)
    lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    packs = pack_rows(lengths, batch_tokens)
    group = GROUP_PACKS * max(1, workers)

    def run(rows):
        return pack_grads(model, encoded, params, rows, autocast_dtype, targets)

    for g in range(0, len(packs), group):
        # the hooks, frozen flags and packed attention hold only while this group runs: the
        # caller may use the model between two yields
        was_training = model.training
        model.eval()
        try:
            with _frozen(model), _cast_linears(body, autocast_dtype), _hooks(targets), \
                    PackedGradAttention(body):
                done = list(_in_threads(run, packs[g:g + group], workers))
        finally:
            model.train(was_training)
        yield from done


def _in_threads(fn, items: list, workers: int):
    """(item, fn(item)) in order; on `workers` threads of threads // workers intra-op threads
    each when workers > 1 (`batching._in_workers`, with autograd allowed)."""
    import torch

    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield item, fn(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()

    def start():
        torch.set_num_threads(max(1, threads // workers))

    pool = ThreadPoolExecutor(min(workers, len(items)), initializer=start)
    try:
        pending = [pool.submit(fn, it) for it in items[:workers]]
        for i, item in enumerate(items):
            res = pending[i].result()
            if i + workers < len(items):
                pending.append(pool.submit(fn, items[i + workers]))
            pending[i] = None
            yield item, res
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


"""The arithmetic of LESS gradient features (methods-b.md §4.2), apart from any stage: the
seeded Rademacher projection, LESS's Adam direction from a trainer checkpoint's moments, and the
checkpoints' learning-rate weights. `pipeline/stages/grad_features.py` is the cached stage.

    R = rademacher_matrix(P, d, seed)                  # [P, d] +-1 (tests and small P only)
    y = project(grads, d, seed, torch.bfloat16)        # grads [B, P] @ R, block by block
    m, v = adam_moments(checkpoint, params)            # the AdamW state, flat, in params order
    gamma = adam_precondition(g, m, v)                 # m' / sqrt(v' + eps)
    etas = checkpoint_etas(checkpoints)                # mean lr per epoch, sum 1
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

ROW_BLOCK = 1024                 # parameters per block of R (part of R's definition)
PROJECT_BLOCKS = 8               # blocks of R per product (a larger GEMM; not part of R)
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8     # LESS obtain_gradients_with_adam


# ---------------------------------------------------------------- the random projection

_WORDS = {"float32": (np.uint32, np.int32, 0x3F800000, 0xBF800000),    # +1.0, -1.0
          "bfloat16": (np.uint16, np.int16, 0x3F80, 0xBF80)}


@functools.lru_cache(maxsize=4)
def _sign_table(dtype_name: str):
    """[256, 8] words: byte value -> its 8 bits (most significant first) as +-1.0 in `dtype`."""
    import torch

    unsigned, signed, plus, minus = _WORDS[dtype_name]
    bits = (np.arange(256)[:, None] >> np.arange(7, -1, -1)) & 1
    return torch.from_numpy(np.where(bits == 1, minus, plus).astype(unsigned).view(signed))


def _dtype_name(dtype) -> str:
    import torch

    if dtype in (None, torch.float32):
        return "float32"
    if dtype == torch.bfloat16:
        return "bfloat16"
    raise ValueError(f"rademacher_block: unsupported dtype {dtype}")


def rademacher_block(seed: int, block: int, rows: int, d: int, dtype=None, out=None):
    """Rows [block*ROW_BLOCK, block*ROW_BLOCK + rows) of R: +-1 entries as a torch tensor
    [rows, d] (bit 1 of `default_rng([seed, block])`'s bytes, most significant first, is -1).
    Each byte becomes its 8 signs by one table look-up (the float words of +-1, no arithmetic);
    `out` (a contiguous [rows, d] tensor of `dtype`, rows * d a multiple of 8) is filled in place."""
    import torch

    name = _dtype_name(dtype)
    raw = np.random.default_rng([seed, block]).bytes((ROW_BLOCK * d + 7) // 8)
    idx = torch.frombuffer(bytearray(raw), dtype=torch.uint8)[:(rows * d + 7) // 8].int()
    table = _sign_table(name)
    if out is not None and (rows * d) % 8 == 0:
        torch.index_select(table, 0, idx, out=out.view(table.dtype).view(-1, 8))
        return out
    words = table[idx].view(-1)[:rows * d]
    return words.view(getattr(torch, name)).view(rows, d)


def rademacher_matrix(n_params: int, d: int, seed: int = 0):
    """R whole, float32 [n_params, d]: for tests and small P only."""
    import torch

    blocks = [rademacher_block(seed, b, min(ROW_BLOCK, n_params - b * ROW_BLOCK), d)
              for b in range(-(-n_params // ROW_BLOCK))]
    return torch.cat(blocks)


def project(grads, d: int, seed: int = 0, dtype=None):
    """grads [B, P] @ R -> float32 [B, d], R drawn block by block and never held whole (the
    product runs over PROJECT_BLOCKS blocks of R at a time, drawn into one reused buffer);
    `dtype` is the product's dtype (float32 or bfloat16; the products are summed in float32)."""
    import torch

    dtype = dtype or torch.float32
    n_params = grads.shape[1]
    out = torch.zeros(grads.shape[0], d, dtype=torch.float32)
    buf = torch.empty(PROJECT_BLOCKS * ROW_BLOCK, d, dtype=dtype)
    for lo in range(0, n_params, PROJECT_BLOCKS * ROW_BLOCK):
        hi = min(n_params, lo + PROJECT_BLOCKS * ROW_BLOCK)
        for b0 in range(lo, hi, ROW_BLOCK):
            rows = min(ROW_BLOCK, n_params - b0)
            part = buf[b0 - lo:b0 - lo + rows]
            filled = rademacher_block(seed, b0 // ROW_BLOCK, rows, d, dtype, out=part)
            if filled is not part:
                part.copy_(filled)
        r = buf[:hi - lo].to(grads.device)
        out += (grads[:, lo:hi].to(dtype) @ r).float().cpu()
    return out.to(grads.device)


def normalize_rows(x):
    """Each row / its L2 norm (zero rows stay zero)."""
    import torch

    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------- Adam state and LRs

def adam_moments(checkpoint: Path, params: dict):
    """(m, v): the checkpoint's AdamW exp_avg / exp_avg_sq, flat float32 [P] in `params` order.

    The trainer's optimizer holds exactly the LoRA parameters in model order, which is the order
    `select_params(model, "lora")` gives for the reloaded model; shapes are checked."""
    import torch
    from thresher.pipeline.io.safestate import load_state

    opt = load_state(checkpoint, "state")["optimizer"]
    order = [i for g in opt["param_groups"] for i in g["params"]]
    if len(order) != len(params):
        raise ValueError(f"{checkpoint}: optimizer state has {len(order)} parameters, the model "
                         f"{len(params)} LoRA parameters; LESS needs the trainer's own checkpoints")
    m, v = [], []
    for i, (name, p) in zip(order, params.items()):
        st = opt["state"].get(i)
        if st is None or st["exp_avg"].shape != p.shape:
            raise ValueError(f"{checkpoint}: no matching Adam state for {name}")
        m.append(st["exp_avg"].reshape(-1).float())
        v.append(st["exp_avg_sq"].reshape(-1).float())
    return torch.cat(m), torch.cat(v)


def adam_precondition(g, m, v):
    """LESS's Adam direction for per-sample gradients g [B, P]: m' / sqrt(v' + eps)."""
    m2 = BETA1 * m + (1 - BETA1) * g
    v2 = BETA2 * v + (1 - BETA2) * g * g
    return m2 / (v2 + ADAM_EPS).sqrt()


def checkpoint_etas(checkpoints: list[Path]) -> np.ndarray:
    """eta_j: the mean learning rate over the steps after checkpoint j-1 up to checkpoint j
    (an epoch with one checkpoint per epoch), renormalised to sum 1 (LESS matching.py)."""
    from thresher.pipeline.io.safestate import load_state

    history = load_state(checkpoints[-1], "state")["history"]
    lr = {int(r["step"]): float(r["lr"]) for r in history}
    steps = [int(Path(c).name.split("-")[1]) for c in checkpoints]
    means, prev = [], 0
    for s in steps:
        window = [lr[k] for k in range(prev + 1, s + 1) if k in lr]
        if not window:
            raise ValueError(f"{checkpoints[-1]}: no learning rate logged for steps {prev + 1}..{s}")
        means.append(np.mean(window))
        prev = s
    etas = np.asarray(means, dtype=np.float64)
    return etas / etas.sum()

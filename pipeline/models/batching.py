"""How the forward passes group rows and run batches: length-sorted padded batches
(`length_batches`, their arrays `padded_batch`), unpadded packs (`pack_rows`), and batches side
by side on worker threads (`_in_workers`). Used by the forward engine
(`pipeline/models/engine.py`), the LM rater, the gradient features and the JSD stage; none of it
loads a model.
"""

from __future__ import annotations

import contextlib

import numpy as np


def length_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Row indices grouped into batches, longest first, each padded size <= batch_tokens.

    A row longer than the budget forms a batch of its own."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, cur, longest = [], [], 0
    for i in order:
        n = int(lengths[i])
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            batches.append(np.asarray(cur))
            cur, longest = [], 0
        cur.append(int(i))
        longest = max(longest, n)
    if cur:
        batches.append(np.asarray(cur))
    return batches


def padded_batch(encoded: list, batch: np.ndarray, lengths: np.ndarray,
                 pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input ids, attention mask, loss mask), each [len(batch), longest row], of the `batch` rows
    of `encoded` (`chat.encode` results), right-padded with the token `pad`."""
    T = int(lengths[batch].max())
    ids = np.full((len(batch), T), pad, dtype=np.int64)
    am = np.zeros((len(batch), T), dtype=np.int64)
    loss_mask = np.zeros((len(batch), T), dtype=bool)
    for j, i in enumerate(batch):
        L = lengths[i]
        ids[j, :L], am[j, :L], loss_mask[j, :L] = encoded[i].input_ids, 1, encoded[i].loss_mask
    return ids, am, loss_mask


def pack_rows(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Row indices grouped into packs of at most batch_tokens real tokens (no padding).

    Longest rows first; each pack is topped up with the shortest remaining rows (two pointers
    over the sorted lengths, O(n)). A row longer than the budget forms a pack of its own."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    packs, i, j = [], 0, len(order) - 1
    while i <= j:
        cur, total = [int(order[i])], int(lengths[order[i]])
        i += 1
        while i <= j and total + lengths[order[i]] <= batch_tokens:
            cur.append(int(order[i]))
            total += int(lengths[order[i]])
            i += 1
        while i <= j and total + lengths[order[j]] <= batch_tokens:
            cur.append(int(order[j]))
            total += int(lengths[order[j]])
            j -= 1
        packs.append(np.asarray(cur))
    return packs


def _in_workers(fn, items: list, workers: int):
    """(item, fn(item)) for each item, in order: on `workers` Python threads of threads // workers
    intra-op threads each when workers > 1, else in this thread.

    Why (bench/RESULTS.md): on a CPU, the body of a ~1k-token batch of a small model is hundreds
    of small ops per layer (norms, rotary, SiLU, per-row attention); with two intra-op threads
    every one of them ends in a barrier, so a core idles through the serial parts and waits for
    a preempted partner on a shared machine. Two batches side by side, one thread each, keep both
    cores busy. Grad mode and autocast are thread-local: the workers run in inference mode with
    the caller's autocast state. Each batch's numbers do not depend on which worker ran it."""
    import torch

    if workers <= 1 or len(items) <= 1:
        with torch.inference_mode():
            for item in items:
                yield item, fn(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")
                if torch.is_autocast_enabled(d)]

    def start():
        torch.set_num_threads(max(1, threads // workers))

    def call(item):
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for d, dtype in autocast:
                stack.enter_context(torch.autocast(d, dtype=dtype))
            return fn(item)

    pool = ThreadPoolExecutor(min(workers, len(items)), initializer=start)
    try:
        yield from zip(items, pool.map(call, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)      # the workers' setting also reaches MKL's global one

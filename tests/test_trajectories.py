"""The proxy + checkpoint-trajectory stage on the tiny random Llama: checkpoints where planned,
trajectories equal to direct forward passes at each checkpoint, cached and resumable per shard."""

from __future__ import annotations

import numpy as np
import pytest
from thresher.pipeline.artifacts import ArtifactStore
from thresher.pipeline.models.engine import run_forward
from thresher.pipeline.stages import trajectories as traj
from thresher.pipeline.stages.proxy import ProxySpec, planned_steps, proxy_rows, train_proxy
from thresher.pipeline.stages.trajectories import trajectories


def spec(tiny_lm_dir, **kw):
    base = {"model": str(tiny_lm_dir), "batch_size": 4, "max_tokens": 128, "lr": 2e-2, "seed": 1}
    return ProxySpec(**{**base, **kw})


def test_planned_steps_spread_over_the_run():
    assert planned_steps(40, ProxySpec(batch_size=8, epochs=3, checkpoints=3)) == (15, (5, 10, 15))
    assert planned_steps(40, ProxySpec(batch_size=8, save_steps=(2,), stop_after=3)) == (5, (2,))
    assert planned_steps(80, ProxySpec(batch_size=8, stop_fraction=0.55)) == (10, (6,))
    with pytest.raises(ValueError, match="fraction"):
        ProxySpec(fraction=0)


def test_proxy_fraction_is_seeded(dyn_pool):
    a = [r["id"] for r in proxy_rows(dyn_pool, 0.5, 0)]
    assert a == [r["id"] for r in proxy_rows(dyn_pool, 0.5, 0)]
    assert a != [r["id"] for r in proxy_rows(dyn_pool, 0.5, 1)]
    assert len(a) == round(dyn_pool.n_rows / 2)


def test_trajectories_equal_direct_forward_passes(tmp_path, dyn_pool, tiny_lm_dir, monkeypatch):
    from thresher.pipeline.training.train import load_trained

    store = ArtifactStore(tmp_path / "work")
    run = train_proxy(dyn_pool, store, spec(tiny_lm_dir, epochs=1, checkpoints=2))
    assert run.steps[-1] == run.total_steps and len(run.checkpoints) == 2
    tr = trajectories(dyn_pool, store, run.checkpoints, max_tokens=128, dtype="fp32")
    loss, el2n = np.asarray(tr.loss()), np.asarray(tr.el2n())
    assert loss.shape == el2n.shape == (dyn_pool.n_rows, 2) and loss.dtype == np.float16
    rows = list(dyn_pool.iter_rows())
    for t, ckpt in enumerate(run.checkpoints):
        model, tok = load_trained(ckpt, merge=True)
        direct = run_forward(model, tok, rows, {"loss", "el2n"}, max_tokens=128)
        np.testing.assert_allclose(loss[:, t], direct["loss"].astype(np.float16), rtol=2e-3)
        np.testing.assert_allclose(el2n[:, t], direct["el2n"].astype(np.float16), rtol=2e-3)
    assert not np.allclose(loss[:, 0], loss[:, -1])         # training moved the losses

    # cached: a second call computes nothing; resumable: only the missing shard file is redone
    calls = []
    real = traj.run_forward
    monkeypatch.setattr(traj, "run_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = trajectories(dyn_pool, store, train_proxy(dyn_pool, store, spec(
        tiny_lm_dir, epochs=1, checkpoints=2)).checkpoints, max_tokens=128, dtype="fp32")
    assert calls == [] and again.stage.dir == tr.stage.dir
    tr.stage.path("_COMPLETE.json").unlink()
    tr.stage.path("loss.npy").unlink()
    markers = sorted((store.root / "trajectories").glob("*/units/*.done.json"))
    assert len(markers) == 2 * len(dyn_pool.shards)       # one unit per (checkpoint, shard)
    markers[-1].unlink()
    redo = trajectories(dyn_pool, store, run.checkpoints, max_tokens=128, dtype="fp32")
    assert len(calls) == 1
    np.testing.assert_array_equal(np.asarray(redo.loss()), loss)


def test_early_stop_keeps_only_early_checkpoints(tmp_path, dyn_pool, tiny_lm_dir):
    store = ArtifactStore(tmp_path / "work")
    run = train_proxy(dyn_pool, store, spec(tiny_lm_dir, fraction=0.5, batch_size=2, save_steps=(2,),
                                               stop_after=2))
    assert run.steps == [2] and run.total_steps > 2
    assert not (run.dir / "adapter").exists()                # stopped early, no final adapter
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        trajectories(dyn_pool, store, [tmp_path])

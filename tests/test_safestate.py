"""Training state without pickle: a round trip of everything a checkpoint holds."""

import random

import numpy as np
import torch
from thresher.pipeline.io.safestate import load_state, save_state


def test_round_trip_of_optimizer_scheduler_and_rng_state(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                     "torch": torch.get_rng_state()},
             "history": [{"step": 1, "loss": float("nan")}], "key": "abc", 7: (1, 2)}
    save_state(tmp_path, "state", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    back = load_state(tmp_path, "state")
    assert back["optimizer"]["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    assert back["rng"]["python"] == random.getstate()
    np_state = np.random.get_state()
    assert back["rng"]["numpy"][0] == np_state[0]
    assert (back["rng"]["numpy"][1] == np_state[1]).all()
    assert back["rng"]["numpy"][1].dtype == np_state[1].dtype
    assert back["rng"]["torch"].equal(torch.get_rng_state())
    assert back[7] == (1, 2) and back["key"] == "abc"
    # the loaded states drive real objects
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=0.1)
    opt2.load_state_dict(back["optimizer"])
    random.setstate(back["rng"]["python"])
    np.random.set_state(back["rng"]["numpy"])


def test_unsupported_types_fail_loudly(tmp_path):
    import pytest

    with pytest.raises(TypeError, match="cannot save a object"):
        save_state(tmp_path, "state", {"x": object()})

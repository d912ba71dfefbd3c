"""The demo flow (ingest, then a MiniLM semantic dedup; token counts with SmolLM2) with networking
disabled: every socket connection and name lookup fails and is recorded, the hub's offline
switches are NOT set, and the run must still succeed without a single attempt."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

GUARD = textwrap.dedent("""
    import socket, sys
    LOG = sys.argv.pop(1)
    def deny(*args, **kwargs):
        with open(LOG, "a") as f:
            f.write(repr(args[:2]) + "\\n")
        raise OSError("network disabled by test_offline")
    socket.socket.connect = deny
    socket.socket.connect_ex = deny
    socket.create_connection = deny
    socket.getaddrinfo = deny
    from thresher.pipeline.cli import main
    main()
""")


@pytest.mark.slow
def test_demo_flow_makes_no_network_attempt(tmp_path, sample_pool_dir):
    small = tmp_path / "in.jsonl"
    with open(sample_pool_dir / "gsm8k_train.jsonl") as f:
        small.write_text("".join(next(f) for _ in range(40)))
    log = tmp_path / "attempts.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}

    def thresher(*args):
        r = subprocess.run([sys.executable, "-c", GUARD, str(log), *map(str, args)],
                           capture_output=True, text=True, env=env, check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    thresher("ingest", small, "--out", tmp_path / "pool")
    thresher("select", tmp_path / "pool", "--method", "semdedup", "--budget", "50%",
             "--out", tmp_path / "semdedup.jsonl")
    assert not log.exists(), log.read_text()
    manifest = json.loads((tmp_path / "semdedup.jsonl.manifest.json").read_text())
    assert manifest["counts"]["selected"] == 20


def test_the_guard_sees_a_hub_attempt(tmp_path, sample_pool_dir):
    """The guard works: a hub name does try the network, and fails with one line."""
    log = tmp_path / "attempts.log"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    (tmp_path / "in.jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    subprocess.run([sys.executable, "-c", GUARD, str(log), "ingest", str(tmp_path / "in.jsonl"),
                    "--out", str(tmp_path / "pool")], check=True, env=env, capture_output=True)
    r = subprocess.run([sys.executable, "-c", GUARD, str(log), "select", str(tmp_path / "pool"),
                        "--method", "perplexity", "--budget", "1", "--out", str(tmp_path / "o.jsonl"),
                        "--param", "model=nobody-x/no-such-model"], env=env, capture_output=True, text=True,
                       check=False)
    assert log.exists()
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: model")

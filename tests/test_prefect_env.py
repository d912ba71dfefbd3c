"""Prefect's analytics stay off unless the user turns them on."""

from thresher.flows.prefect_env import quiet_prefect


def test_analytics_off_by_default():
    env = {}
    assert quiet_prefect(env) == env == {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                                         "DO_NOT_TRACK": "1"}


def test_the_users_choice_wins():
    on = {"PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
    assert quiet_prefect(on) == {} and on == {"PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
    partial = {"DO_NOT_TRACK": "0"}
    quiet_prefect(partial)
    assert partial == {"DO_NOT_TRACK": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def test_importing_the_flows_applies_it():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k != "DO_NOT_TRACK"}
    code = ("import os, thresher.flows, prefect; "
            "print(os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'], os.environ['DO_NOT_TRACK'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["false", "1"]

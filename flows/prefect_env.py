"""Prefect settings thresher applies before Prefect is imported: nothing reaches for the network.

Prefect 3 sends usage analytics by default: a server's telemetry service posts to Prefect's
collector (offline it logs `ERROR ... Failed to send telemetry`), and the client emits events
unless `DO_NOT_TRACK` is set. thresher turns both off unless the user chose otherwise: a value
the user set in the environment for either variable is left as it is, so
`PREFECT_SERVER_ANALYTICS_ENABLED=true` turns Prefect's analytics back on.

Import this module before `prefect` (every module in `thresher.flows` does).
"""

from __future__ import annotations

import os

OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",   # the server's (and temporary server's) telemetry
    "DO_NOT_TRACK": "1",                           # the client's analytics events
}


def quiet_prefect(environ: dict | None = None) -> dict[str, str]:
    """Turn Prefect's analytics off in `environ` (default: this process, inherited by the
    temporary server and flow-run subprocesses it starts) unless the user turned them on."""
    env = os.environ if environ is None else environ
    if env.get("PREFECT_SERVER_ANALYTICS_ENABLED", "").lower() in ("true", "1", "yes"):
        return {}
    applied = {}
    for key, value in OFF.items():
        if key not in env:
            env[key] = applied[key] = value
    return applied


quiet_prefect()

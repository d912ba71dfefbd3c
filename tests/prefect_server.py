"""A real Prefect server on loopback for tests: `prefect server start` on a free port, with its own
PREFECT_HOME and SQLite database, stopped (with every process it started) when the block exits.

    with prefect_server(tmp_path / "prefect") as server:
        subprocess.run([...], env=server.env)     # clients: PREFECT_API_URL points at it
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str          # http://127.0.0.1:PORT/api
    home: Path
    env: dict         # environment for clients of this server
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, wait: float = 30) -> None:
    """Stop a process started with start_new_session=True, and its children (its group)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def prefect_server(home: Path, startup_timeout: float = 180):
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=base, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}:\n"
                                   + log.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy after {startup_timeout}s:\n"
                                   + log.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        yield Server(url=url, home=home, env={**base, "PREFECT_API_URL": url}, log=log)
    finally:
        stop(proc, signal.SIGTERM)

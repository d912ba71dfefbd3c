"""Prefect flows that wire the same stage functions the CLI calls (no math here)."""

from thresher.flows import prefect_env as _prefect_env  # noqa: F401  (analytics off before prefect loads)

"""Prefect flows that wire the same stage functions the CLI calls (no math here)."""

"""Files in and out: the canonical row schema, readers, the pool, writers, output guards."""

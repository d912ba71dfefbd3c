"""Stages: cached, derived data over a pool (embeddings, clusters, forward signals, gradients...)."""
